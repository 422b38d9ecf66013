"""A private ejabberd (Debian package, 23.01) on loopback, for federation.

Never the system service, and never a distributed Erlang node: the VM is
started directly (`erl -noinput -noshell ... -s ejabberd`, no `-sname`, so the
machine's epmd is untouched), with a throwaway config, Mnesia directory and
log, its PID recorded and stopped by PID (SIGTERM makes the VM stop
cleanly). Accounts are created through `mod_http_api` from loopback.

Settings from /work/shared/PEERS.md: listeners with `backlog: 1024`;
`mod_s2s_dialback`, `s2s_cafile`, `s2s_use_starttls: required`,
`s2s_max_retry_delay: 10`; SRV lookups go through Erlang's resolver
(`ERL_INETRC` with our resolv.conf) but the SRV target's address through
libc, which reads only /etc/resolv.conf: so the VM runs in a private mount
namespace with our resolv.conf bind-mounted over /etc/resolv.conf.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Callable

ERL_LIBS = "/usr/lib/x86_64-linux-gnu"


def available() -> bool:
    return (shutil.which("erl") is not None
            and any(Path(ERL_LIBS).glob("ejabberd-*/ebin/ejabberd.app")))


def version() -> str:
    r = subprocess.run(["dpkg-query", "-W", "-f=${Version}", "ejabberd"],
                       capture_output=True, text=True, timeout=10)
    return r.stdout.strip() if r.returncode == 0 else ""


class Ejabberd:
    def __init__(self, work: Path, domain: str, *, interface: str, c2s_port: int,
                 s2s_port: int, http_port: int, cert: tuple[Path, Path],
                 s2s_cafile: Path, resolv_conf: Path):
        self.work = work
        self.domain = domain
        self.muc_domain = f"conference.{domain}"
        self.interface = interface
        self.c2s_port = c2s_port
        self.s2s_port = s2s_port
        self.http_port = http_port
        self.cert = cert
        self.s2s_cafile = s2s_cafile
        self.resolv_conf = resolv_conf
        self.config = work / "ejabberd.yml"
        self.log = work / "log" / "ejabberd.log"
        self.proc: subprocess.Popen | None = None

    def write_config(self) -> None:
        (self.work / "spool").mkdir(parents=True, exist_ok=True)
        (self.work / "log").mkdir(parents=True, exist_ok=True)
        pem = self.work / f"{self.domain}.pem"
        pem.write_text(Path(self.cert[0]).read_text() + Path(self.cert[1]).read_text())
        os.chmod(pem, 0o600)
        (self.work / "inetrc").write_text(
            f'{{resolv_conf, "{self.resolv_conf}"}}.\n{{hosts_file, ""}}.\n{{lookup, [dns]}}.\n')
        self.config.write_text(f"""# Throwaway ejabberd written by conformance/harness/ejabberd.py
hosts:
  - {self.domain}
loglevel: info
certfiles:
  - {pem}
listen:
  -
    port: {self.c2s_port}
    ip: "{self.interface}"
    module: ejabberd_c2s
    starttls_required: true
    backlog: 1024
  -
    port: {self.s2s_port}
    ip: "{self.interface}"
    module: ejabberd_s2s_in
    backlog: 1024
  -
    port: {self.http_port}
    ip: "{self.interface}"
    module: ejabberd_http
    request_handlers:
      /api: mod_http_api
s2s_use_starttls: required
s2s_cafile: {self.s2s_cafile}
s2s_max_retry_delay: 10
s2s_timeout: 20
auth_method: internal
default_db: mnesia
acl:
  local:
    user_regexp: ""
access_rules:
  local:
    allow: local
  c2s:
    allow: all
  s2s:
    allow: all
api_permissions:
  "register from loopback":
    from: mod_http_api
    who:
      ip: 127.0.0.0/8
    what: "register"
modules:
  mod_s2s_dialback: {{}}
  mod_roster: {{}}
  mod_disco: {{}}
  mod_muc:
    host: "{self.muc_domain}"
    access_create: all
  mod_offline: {{}}
  mod_ping: {{}}
  mod_version: {{}}
  mod_vcard: {{}}
  mod_stream_mgmt: {{}}
  mod_carboncopy: {{}}
  mod_http_api: {{}}
""")

    def start(self, spawn: Callable[..., subprocess.Popen], timeout: float = 40) -> None:
        self.write_config()
        env = dict(os.environ, ERL_LIBS=ERL_LIBS, EJABBERD_CONFIG_PATH=str(self.config),
                   EJABBERD_LOG_PATH=str(self.log), ERL_INETRC=str(self.work / "inetrc"),
                   HOME=str(self.work), ERL_CRASH_DUMP=str(self.work / "erl_crash.dump"))
        mnesia = f'"{self.work / "spool"}"'
        # unshare execs sh, which execs erl: the PID is the VM's.
        cmd = (f'mount --bind "{self.resolv_conf}" /etc/resolv.conf && exec erl -noinput -noshell '
               f"-mnesia dir '{mnesia}' -s ejabberd")
        out = open(self.work / "ejabberd.stdout", "w")
        self.proc = spawn(["unshare", "--mount", "--propagation", "private", "sh", "-c", cmd],
                          stdout=out, stderr=subprocess.STDOUT, cwd=self.work, env=env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ejabberd exited with {self.proc.returncode}; see {self.log}")
            if self.log.exists() and "Failed to start ejabberd" in self.log.read_text(errors="replace"):
                raise RuntimeError(f"ejabberd did not start; see {self.log}")
            try:
                with socket.create_connection((self.interface, self.http_port), timeout=1):
                    with socket.create_connection((self.interface, self.c2s_port), timeout=1):
                        return
            except OSError:
                time.sleep(0.2)
        raise RuntimeError(f"ejabberd not listening on {self.interface} after {timeout:.0f}s; "
                           f"see {self.log}")

    def register(self, user: str, password: str) -> None:
        body = json.dumps({"user": user, "host": self.domain, "password": password}).encode()
        req = urllib.request.Request(
            f"http://{self.interface}:{self.http_port}/api/register", data=body,
            headers={"Content-Type": "application/json"}, method="POST")
        with urllib.request.urlopen(req, timeout=20) as r:
            if r.status != 200:
                raise RuntimeError(f"registering {user}: HTTP {r.status}")

    def stop(self, grace: float = 15) -> int | None:
        if not self.proc or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.terminate()
        try:
            return self.proc.wait(grace)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
            return None
