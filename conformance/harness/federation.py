"""Federation on loopback: Starling and a peer server (Prosody or ejabberd),
each on its own domain and loopback address, finding each other through real
SRV records served by dnsmasq, with certificates from a test CA made here.

    env = Federation(ctx, "prosody")
    env.ensure("external")      # (re)start everything with the CA trusted
    ...                         # cases: env.starling_account(), env.peer_account()
    env.ensure("dialback")      # restart: every server trusts another CA
    env.stop()

Modes:
- `external`: every server trusts the CA that signed every certificate:
  servers authenticate each other with SASL EXTERNAL (XEP-0178);
- `dialback`: every server trusts only an unrelated CA, so no certificate
  verifies: Server Dialback (XEP-0220) over TLS;
- `xmppaddr` (ejabberd): like `external`, but Starling's certificate also
  carries an id-on-xmppAddr SAN, on which ejabberd 23.01 drops the incoming
  stream during EXTERNAL (PEERS.md): Starling must retry with dialback.

Layout: a /24 of loopback picked at random per run (127.X.Y.0, so that
parallel runs never meet): .1 dnsmasq on port 53, .2 Starling, .3 the peer.
Listeners use free ports (SRV records carry them). Domains `starling.test`
and `<peer>.test` plus their `conference.` subdomains have SRV records and no
A records, so a server that skips SRV fails visibly. Every process is started
through `spawn` (which records its PID) and stopped by PID.
"""

from __future__ import annotations

import random
import secrets
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Callable

from harness.suite import Account, Fail, Skip

STARLING = "starling.test"


def peer_domain(kind: str) -> str:
    return f"{kind}.test"


def _free_port(ip: str) -> int:
    s = socket.socket()
    s.bind((ip, 0))
    port = s.getsockname()[1]
    s.close()
    return port


def _pick_net() -> str:
    """A loopback /24 whose .1:53 is free."""
    for _ in range(50):
        base = f"127.{random.randint(60, 250)}.{random.randint(1, 250)}"
        try:
            for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
                s = socket.socket(socket.AF_INET, kind)
                s.bind((f"{base}.1", 53))
                s.close()
            return base
        except OSError:
            continue
    raise Fail("no free loopback address for the test DNS server")


def _openssl(*args: str) -> None:
    r = subprocess.run(["openssl", *args], capture_output=True, text=True, timeout=60)
    if r.returncode != 0:
        raise Fail(f"openssl {args[0]} failed: {r.stderr.strip()}")


class Pki:
    """A test CA (and an unrelated one), leaf certificates per domain."""

    def __init__(self, d: Path):
        self.dir = d
        d.mkdir(parents=True, exist_ok=True)
        self.ca = self._ca("ca", "Starling federation test CA")
        self.other_ca = self._ca("other-ca", "Unrelated CA")

    def _ca(self, name: str, cn: str) -> Path:
        crt, key = self.dir / f"{name}.crt", self.dir / f"{name}.key"
        _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                 "-keyout", str(key), "-out", str(crt), "-subj", f"/CN={cn}",
                 "-addext", "basicConstraints=critical,CA:TRUE",
                 "-addext", "keyUsage=critical,keyCertSign,cRLSign")
        return crt

    def leaf(self, domain: str, xmpp_addr: bool = False) -> tuple[Path, Path]:
        """(chain, key) for `domain` and `conference.<domain>`: DNS-IDs (as
        public CAs issue), EKU serverAuth and clientAuth; with `xmpp_addr`
        an id-on-xmppAddr SAN too."""
        stem = domain + ("-xmppaddr" if xmpp_addr else "")
        key, csr = self.dir / f"{stem}.key", self.dir / f"{stem}.csr"
        crt, chain, ext = (self.dir / f"{stem}.crt", self.dir / f"{stem}.chain.pem",
                           self.dir / f"{stem}.ext")
        san = f"DNS:{domain},DNS:conference.{domain}"
        if xmpp_addr:
            san += f",otherName:1.3.6.1.5.5.7.8.5;UTF8:{domain}"
        ext.write_text(f"subjectAltName={san}\nextendedKeyUsage=serverAuth,clientAuth\n"
                       "keyUsage=critical,digitalSignature,keyEncipherment\n"
                       "basicConstraints=CA:FALSE\n")
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(csr),
                 "-subj", f"/CN={domain}")
        _openssl("x509", "-req", "-in", str(csr), "-CA", str(self.ca),
                 "-CAkey", str(self.dir / "ca.key"), "-CAcreateserial", "-days", "2",
                 "-out", str(crt), "-extfile", str(ext))
        chain.write_text(crt.read_text() + self.ca.read_text())
        return chain, key


class Dnsmasq:
    """dnsmasq in the foreground, authoritative for `test`."""

    def __init__(self, work: Path, ip: str, records: list[tuple[str, str, str, int]]):
        """records: (domain, target host, target ip, port) for
        `_xmpp-server._tcp.<domain>`."""
        self.work, self.ip, self.records = work, ip, records
        self.proc: subprocess.Popen | None = None
        self.log = work / "dnsmasq.log"

    def start(self, spawn: Callable[..., subprocess.Popen]) -> None:
        if shutil.which("dnsmasq") is None:
            raise Skip("dnsmasq is not installed (Debian package dnsmasq-base)")
        args = ["dnsmasq", "-k", "-C", "/dev/null", "--no-resolv", "--no-hosts",
                f"--listen-address={self.ip}", "--bind-interfaces", "--port=53",
                f"--pid-file={self.work / 'dnsmasq.pid'}", "--local=/test/",
                "--log-queries", f"--log-facility={self.log}"]
        hosts = {}
        for domain, host, ip, port in self.records:
            args.append(f"--srv-host=_xmpp-server._tcp.{domain},{host},{port}")
            hosts[host] = ip
        for host, ip in hosts.items():
            args.append(f"--host-record={host},{ip}")
        out = open(self.work / "dnsmasq.stdout", "w")
        self.proc = spawn(args, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise Fail(f"dnsmasq exited with {self.proc.returncode}; see {self.work}")
            if self.log.exists() and "started" in self.log.read_text(errors="replace"):
                return
            time.sleep(0.1)
        raise Fail("dnsmasq did not start")

    def stop(self) -> None:
        _stop(self.proc)


def _stop(p: subprocess.Popen | None, grace: float = 10) -> int | None:
    if not p or p.poll() is not None:
        return p.returncode if p else None
    p.terminate()
    try:
        return p.wait(grace)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait(5)
        return None


class StarlingNode:
    """`starling serve` for `starling.test` with federation on."""

    def __init__(self, binary: str, work: Path, ip: str, dns_ip: str,
                 cert: tuple[Path, Path], trust: Path):
        self.binary, self.work, self.ip = binary, work, ip
        self.c2s_port = _free_port(ip)
        self.s2s_port = _free_port(ip)
        self.config = work / "starling.toml"
        self.log = work / "server.log"
        self.proc: subprocess.Popen | None = None
        (work / "data").mkdir(parents=True, exist_ok=True)
        self.config.write_text(f"""# Written by conformance/harness/federation.py
[server]
domains = ["{STARLING}"]
data_dir = "{work / 'data'}"
shutdown_grace_secs = 3

[c2s]
starttls = ["{ip}:{self.c2s_port}"]
direct_tls = []

[tls]
cert_dir = "{work / 'certs'}"
certificate = "{cert[0]}"
key = "{cert[1]}"

[database]
url = "sqlite://{work / 'data' / 'starling.db'}"

[auth]
max_failures = 50

[s2s]
listen = ["{ip}:{self.s2s_port}"]
resolver = "{dns_ip}"
ca_file = "{trust}"
system_roots = false
dns_timeout_secs = 3
connect_timeout_secs = 5
auth_timeout_secs = 20
retry_after_secs = 2
""")

    def start(self, spawn: Callable[..., subprocess.Popen]) -> None:
        import os
        env = dict(os.environ, NO_COLOR="1", RUST_LOG="info,starling::s2s=debug")
        out = open(self.log, "a")
        self.proc = spawn([self.binary, "--config", str(self.config), "serve"],
                          stdout=out, stderr=subprocess.STDOUT, env=env, cwd=self.work)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise Fail(f"starling exited with {self.proc.returncode}; see {self.log}")
            try:
                with socket.create_connection((self.ip, self.s2s_port), timeout=1):
                    return
            except OSError:
                time.sleep(0.1)
        raise Fail(f"starling not listening after 30s; see {self.log}")

    def add_user(self, user: str, password: str) -> None:
        r = subprocess.run([self.binary, "--config", str(self.config), "user", "add",
                            f"{user}@{STARLING}", "--password", password],
                           capture_output=True, text=True, timeout=30)
        if r.returncode != 0:
            raise Fail(f"starling user add: {(r.stderr or r.stdout).strip()}")

    def stop(self) -> int | None:
        return _stop(self.proc, 15)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


class Federation:
    def __init__(self, ctx, kind: str):
        self.ctx = ctx
        self.kind = kind  # "prosody" or "ejabberd"
        self.peer_domain = peer_domain(kind)
        self.spawn = self._recording_spawn(ctx.raw.get("pidfile"))
        self.mode: str | None = None
        self.work_root = Path(ctx.work_dir) / f"federation-{kind}-{secrets.token_hex(3)}"
        self.pki: Pki | None = None
        self.dns: Dnsmasq | None = None
        self.starling: StarlingNode | None = None
        self.peer = None
        self.n = 0
        self.problems: list[str] = []

    @staticmethod
    def _recording_spawn(pidfile: str | None):
        def spawn(args: list[str], **kw) -> subprocess.Popen:
            p = subprocess.Popen(args, start_new_session=True, **kw)
            if pidfile:
                with open(pidfile, "a") as f:
                    f.write(f"{p.pid}\n")
            return p
        return spawn

    # --- setup --------------------------------------------------------------

    def ensure(self, mode: str) -> None:
        if self.mode == mode:
            return
        self.stop()
        self.mode = mode
        try:
            self._start(mode)
        except BaseException:
            self.mode = None
            self.stop()
            raise

    def _start(self, mode: str) -> None:
        work = self.work_root / mode
        work.mkdir(parents=True, exist_ok=True)
        if self.pki is None:
            self.pki = Pki(self.work_root / "pki")
        net = _pick_net()
        dns_ip, st_ip, peer_ip = f"{net}.1", f"{net}.2", f"{net}.3"
        trust = self.pki.ca if mode in ("external", "xmppaddr") else self.pki.other_ca
        resolv = work / "resolv.conf"
        resolv.write_text(f"nameserver {dns_ip}\n")
        st_cert = self.pki.leaf(STARLING, xmpp_addr=(mode == "xmppaddr"))
        peer_cert = self.pki.leaf(self.peer_domain)
        self.starling = StarlingNode(self.ctx.binary, work / "starling", st_ip, dns_ip,
                                     st_cert, trust)
        peer_s2s = _free_port(peer_ip)
        records = []
        for d in (STARLING, f"conference.{STARLING}"):
            records.append((d, f"xmpp.{STARLING}", st_ip, self.starling.s2s_port))
        for d in (self.peer_domain, f"conference.{self.peer_domain}"):
            records.append((d, f"xmpp.{self.peer_domain}", peer_ip, peer_s2s))
        (work / "dns").mkdir(exist_ok=True)
        self.dns = Dnsmasq(work / "dns", dns_ip, records)
        self.dns.start(self.spawn)
        self.starling.start(self.spawn)
        if self.kind == "prosody":
            from harness import prosody
            if not prosody.available():
                raise Skip("prosody is not installed (Debian package prosody)")
            self.peer = prosody.Prosody(
                work / "prosody", self.peer_domain, interface=peer_ip,
                c2s_port=_free_port(peer_ip), s2s_port=peer_s2s,
                cert=peer_cert, client_cafile=self.pki.ca, s2s_cafile=trust,
                resolv_conf=resolv)
            try:
                self.peer.start(self.spawn)
            except RuntimeError as e:
                raise Fail(str(e))
        else:
            from harness import ejabberd
            if not ejabberd.available():
                raise Skip("ejabberd is not installed (Debian package ejabberd)")
            self.peer = ejabberd.Ejabberd(
                work / "ejabberd", self.peer_domain, interface=peer_ip,
                c2s_port=_free_port(peer_ip), s2s_port=peer_s2s,
                http_port=_free_port(peer_ip), cert=peer_cert, s2s_cafile=trust,
                resolv_conf=resolv)
            try:
                self.peer.start(self.spawn)
            except RuntimeError as e:
                raise Fail(str(e))

    def stop(self) -> None:
        if self.peer is not None:
            code = self.peer.stop()
            if code not in (0, None, -15, 143):
                self.problems.append(f"{self.kind} exited with status {code}")
            self.peer = None
        if self.starling is not None:
            code = self.starling.stop()
            text = self.starling.log_text()
            if "panicked" in text:
                self.problems.append("starling panicked: " + next(
                    l for l in text.splitlines() if "panicked" in l)[:300])
            if code != 0:
                self.problems.append(f"starling exited with status {code} "
                                     f"(see {self.starling.log})")
            self.starling = None
        if self.dns is not None:
            self.dns.stop()
            self.dns = None
        self.mode = None

    # --- accounts and clients ----------------------------------------------

    def _name(self, hint: str) -> tuple[str, str]:
        self.n += 1
        return f"{hint}{self.n}-{secrets.token_hex(2)}", "pw-" + secrets.token_hex(8)

    def starling_account(self, hint: str = "s") -> Account:
        user, pw = self._name(hint)
        self.starling.add_user(user, pw)
        return Account(f"{user}@{STARLING}", pw)

    def peer_account(self, hint: str = "p") -> Account:
        user, pw = self._name(hint)
        self.peer.register(user, pw)
        return Account(f"{user}@{self.peer_domain}", pw)

    def starling_server(self) -> tuple[str, int, str]:
        return (self.starling.ip, self.starling.c2s_port, str(self.pki.ca))

    def peer_server(self) -> tuple[str, int, str]:
        return (self.peer.interface, self.peer.c2s_port, str(self.pki.ca))

    def methods(self) -> tuple[set[str], set[str]]:
        """How Starling's streams with the peer authenticated, from its log:
        (outgoing methods, incoming methods)."""
        import re
        out, inc = set(), set()
        for line in self.starling.log_text().splitlines():
            if self.peer_domain not in line:
                continue
            m = re.search(r'method="?([A-Za-z]+)', line)
            if not m:
                continue
            if "outgoing stream established" in line:
                out.add(m.group(1))
            elif "incoming stream authenticated" in line:
                inc.add(m.group(1))
        return out, inc
