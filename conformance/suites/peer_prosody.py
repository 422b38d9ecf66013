"""Prosody (Debian) as a second server on loopback, for federation.

`harness/prosody.py` runs a private Prosody: throwaway config and data
directory, its own ports on 127.0.0.1, a self-signed certificate for its
domain and its MUC subdomain, accounts with prosodyctl, PID recorded and
stopped by PID. The first case proves the harness itself (Prosody starts and
a slixmpp client logs in and talks to it), so the federation cases can rely
on it.

The federation cases (harness/federation_cases.py) run Starling and Prosody
on their own domains and loopback addresses, resolved through real SRV
records from dnsmasq, with certificates from a test CA: chat, presence
subscriptions, rooms on either server, errors, offline delivery, once with
SASL EXTERNAL and once with dialback.
"""

from __future__ import annotations

import atexit
import secrets
from pathlib import Path

from harness import federation_cases, prosody
from harness.slix import Client
from harness.suite import Account, Fail, Skip, Suite, check

suite = Suite("peer-prosody", "Prosody 0.12 (Debian) as a second server")

PEER_DOMAIN = "peer.localhost"


def _precondition(_ctx) -> None:
    if not prosody.available():
        raise Skip("prosody is not installed (Debian package prosody)")


suite.precondition = _precondition


def start_peer(ctx) -> prosody.Prosody:
    import socket
    ports = []
    for _ in range(3):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        ports.append(s)
    c2s, s2s, tls = (s.getsockname()[1] for s in ports)
    for s in ports:
        s.close()
    work = Path(ctx.work_dir) / f"prosody-{secrets.token_hex(3)}"
    peer = prosody.Prosody(work, PEER_DOMAIN, c2s_port=c2s, s2s_port=s2s, direct_tls_port=tls)
    try:
        peer.start(prosody.recording_spawn(ctx.raw.get("pidfile")))
    except RuntimeError as e:
        peer.stop()
        raise Fail(str(e))
    return peer


@suite.case("Prosody peer starts on loopback; a client logs in and messages itself", timeout=40)
async def peer_harness(ctx):
    peer = start_peer(ctx)
    try:
        user, password = f"peer-{secrets.token_hex(3)}", "pw-" + secrets.token_hex(6)
        peer.register(user, password)
        acct = Account(f"{user}@{PEER_DOMAIN}", password)
        c = Client(ctx, acct, resource="harness",
                   server=(peer.interface, peer.c2s_port, str(peer.cafile)))
        try:
            await c.online()
            body = "peer check " + secrets.token_hex(4)
            c.send_message(mto=c.boundjid.full, mbody=body, mtype="chat")
            m = await c.next_message(lambda m: m["body"] == body, what="the message to itself")
            check(m["from"] == c.boundjid, f"from {m['from']}")
            info = await c.plugin["xep_0030"].get_items(jid=PEER_DOMAIN, timeout=10)
            items = [str(j) for j, _n, _name in info["disco_items"]["items"]]
            check(f"conference.{PEER_DOMAIN}" in items, f"peer items {items}")
        finally:
            await c.close()
    finally:
        code = peer.stop()
        if code not in (0, None):
            raise Fail(f"prosody exited with status {code}; see {peer.log}")


# Federation with this Prosody's sibling: Starling on starling.test and
# Prosody on prosody.test, each on its own loopback address, found through
# SRV records served by dnsmasq, certificates from a test CA
# (harness/federation.py); first with the CA trusted (SASL EXTERNAL), then
# with every server trusting another CA (dialback).
federation_cases.register(suite, "prosody", ["external", "dialback"])


@suite.case("federation: every server stopped cleanly, Starling never panicked", timeout=60)
def federation_shutdown(ctx):
    if ctx.backend != "sqlite":
        raise Skip("federation runs on the sqlite pass")
    problems = federation_cases.stop_all()
    check(not problems, "; ".join(problems))


atexit.register(federation_cases.stop_all)


if __name__ == "__main__":
    suite.main()
