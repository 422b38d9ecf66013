"""A private Prosody (Debian package) on loopback, for peer and cross-checks.

Never the system service: a throwaway config and data directory, run in the
foreground (`daemonize = false`), its PID recorded and stopped by PID. Used
by the peer suite (a second server for federation) and, with
`conformance/run --target prosody`, to run the client suites against a
reference server (which proves that cases for features Starling lacks can
pass at all).

Settings from /work/shared/PEERS.md: `run_as_root` when root, `pidfile`,
only the ports we choose, a `certificates` directory that exists, accounts
with `prosodyctl --config FILE register`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Callable


def recording_spawn(pidfile: str | None) -> Callable[..., subprocess.Popen]:
    """A `spawn` that appends each PID to `pidfile` (so conformance/run can
    stop it even if the suite is killed)."""
    def spawn(args: list[str], **kw) -> subprocess.Popen:
        p = subprocess.Popen(args, start_new_session=True, **kw)
        if pidfile:
            with open(pidfile, "a") as f:
                f.write(f"{p.pid}\n")
        return p
    return spawn


def available() -> bool:
    return shutil.which("prosody") is not None and shutil.which("prosodyctl") is not None


def make_cert(cert_dir: Path, domain: str) -> Path:
    """A self-signed certificate for `domain` and its subdomains."""
    cert_dir.mkdir(parents=True, exist_ok=True)
    crt, key = cert_dir / f"{domain}.crt", cert_dir / f"{domain}.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "7",
         "-keyout", str(key), "-out", str(crt), "-subj", f"/CN={domain}",
         "-addext", f"subjectAltName=DNS:{domain},DNS:*.{domain}"],
        check=True, capture_output=True, timeout=60)
    return crt


class Prosody:
    def __init__(self, work: Path, domain: str, *, interface: str = "127.0.0.1",
                 c2s_port: int, s2s_port: int, direct_tls_port: int | None = None,
                 muc: bool = True, extra_config: str = "",
                 cert: tuple[Path, Path] | None = None, client_cafile: Path | None = None,
                 s2s_cafile: Path | None = None, resolv_conf: Path | None = None):
        """For federation: `cert` = (chain, key) instead of a self-signed
        certificate, `client_cafile` what clients trust then, `s2s_cafile`
        the CA Prosody trusts for peers, `resolv_conf` a resolv.conf
        bind-mounted over /etc/resolv.conf in a private mount namespace
        (Prosody's resolver reads only that file; see PEERS.md)."""
        self.work = work
        self.cert = cert
        self.client_cafile = client_cafile
        self.s2s_cafile = s2s_cafile
        self.resolv_conf = resolv_conf
        self.domain = domain
        self.interface = interface
        self.c2s_port = c2s_port
        self.s2s_port = s2s_port
        self.direct_tls_port = direct_tls_port
        self.muc_domain = f"conference.{domain}" if muc else None
        self.extra_config = extra_config
        self.config = work / "prosody.cfg.lua"
        self.log = work / "prosody.log"
        self.proc: subprocess.Popen | None = None
        self.cafile: Path | None = None

    def write_config(self) -> None:
        self.work.mkdir(parents=True, exist_ok=True)
        (self.work / "data").mkdir(exist_ok=True)
        certs = self.work / "certs"
        if self.cert:
            certs.mkdir(parents=True, exist_ok=True)
            shutil.copy(self.cert[0], certs / f"{self.domain}.crt")
            shutil.copy(self.cert[1], certs / f"{self.domain}.key")
            self.cafile = self.client_cafile or certs / f"{self.domain}.crt"
        else:
            self.cafile = make_cert(certs, self.domain)
        s2s = ""
        if self.s2s_cafile or self.resolv_conf:
            # Federation on loopback: TLS required, certificates checked
            # against our test CA, dialback for the rest; libunbound (when
            # installed) must not answer *.test itself (PEERS.md).
            s2s = f'''
s2s_require_encryption = true
s2s_timeout = 20
ssl = {{ cafile = "{self.s2s_cafile or self.cafile}" }}
unbound = {{ resolvconf = "{self.resolv_conf or '/etc/resolv.conf'}"; hoststxt = false; options = {{ ["local-zone:"] = "test. transparent" }} }}
'''
        root = "true" if os.geteuid() == 0 else "false"
        direct = f"{{ {self.direct_tls_port} }}" if self.direct_tls_port else "{ }"
        muc = ""
        if self.muc_domain:
            muc = f'''
Component "{self.muc_domain}" "muc"
    modules_enabled = {{ "muc_mam" }}
    ssl = {{ certificate = "{certs}/{self.domain}.crt"; key = "{certs}/{self.domain}.key" }}
'''
        self.config.write_text(f'''-- Throwaway Prosody written by conformance/harness/prosody.py
daemonize = false
run_as_root = {root}
pidfile = "{self.work}/prosody.pid"
data_path = "{self.work}/data"
certificates = "{certs}"
log = {{ {{ levels = {{ min = "info" }}, to = "file", filename = "{self.log}" }} }}
interfaces = {{ "{self.interface}" }}
local_interfaces = {{ "{self.interface}" }}
c2s_ports = {{ {self.c2s_port} }}
c2s_direct_tls_ports = {direct}
s2s_ports = {{ {self.s2s_port} }}
http_ports = {{ }}
https_ports = {{ }}
component_ports = {{ }}
authentication = "internal_hashed"
allow_registration = false
c2s_require_encryption = true
s2s_secure_auth = false
modules_enabled = {{
    "roster"; "saslauth"; "tls"; "disco"; "carbons"; "pep"; "private"; "blocklist";
    "vcard4"; "vcard_legacy"; "version"; "uptime"; "time"; "ping"; "mam"; "csi_simple";
    "smacks"; "offline"; "dialback";
}}
{s2s}
{self.extra_config}
VirtualHost "{self.domain}"
    ssl = {{ certificate = "{certs}/{self.domain}.crt"; key = "{certs}/{self.domain}.key" }}
{muc}''')

    def start(self, spawn: Callable[..., subprocess.Popen], timeout: float = 20) -> None:
        """Start through `spawn` (which records the PID) and wait for c2s."""
        import socket
        self.write_config()
        logf = open(self.work / "prosody.stdout", "w")
        args = ["prosody", "--config", str(self.config)]
        if self.resolv_conf:
            # unshare execs sh, which execs prosody: the PID stays Prosody's.
            args = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                    f'mount --bind "{self.resolv_conf}" /etc/resolv.conf && exec prosody '
                    f'--config "{self.config}"']
        self.proc = spawn(args, stdout=logf, stderr=subprocess.STDOUT, cwd=self.work)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"prosody exited with {self.proc.returncode}; see {self.log}")
            try:
                with socket.create_connection((self.interface, self.c2s_port), timeout=1):
                    return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"prosody not listening on {self.interface}:{self.c2s_port} "
                           f"after {timeout:.0f}s; see {self.log}")

    def add_user_command(self) -> list[str]:
        """A command template (as in the suites' context) that creates an account."""
        return ["prosodyctl", "--config", str(self.config), "register",
                "{user}", "{domain}", "{password}"]

    def register(self, user: str, password: str) -> None:
        subprocess.run(["prosodyctl", "--config", str(self.config), "register",
                        user, self.domain, password],
                       check=True, capture_output=True, timeout=30)

    def stop(self, grace: float = 10) -> int | None:
        if not self.proc or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.terminate()
        try:
            return self.proc.wait(grace)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
            return None
