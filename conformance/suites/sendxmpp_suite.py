"""go-sendxmpp (Debian package) against Starling.

The command-line sender that scripts and monitoring use to send alerts: a
Go client (its own XML, SASL and TLS code, Go's crypto/tls). It sends; a
slixmpp client receives and checks. Go's TLS trusts the run's certificate
through SSL_CERT_FILE, so verification stays on (without it the handshake
fails with "certificate signed by unknown authority").
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil

from slixmpp import JID

from harness.slix import Client, online
from harness.suite import Fail, Skip, Suite, check, service

suite = Suite("go-sendxmpp", "go-sendxmpp (Debian), Go crypto/tls")

NS_MUC = "http://jabber.org/protocol/muc"


def _precondition(_ctx) -> None:
    if not shutil.which("go-sendxmpp"):
        raise Skip("go-sendxmpp is not installed (Debian package go-sendxmpp)")


suite.precondition = _precondition


async def sendxmpp(ctx, sender, args: list[str], text: str, direct_tls: bool = False,
                   timeout: float = 20) -> tuple[int, str]:
    port = ctx.tls_port if direct_tls else ctx.starttls_port
    cmd = ["go-sendxmpp", "-u", sender.jid, "-p", sender.password,
           "-j", f"{ctx.host}:{port}", "--timeout", "10"]
    if direct_tls:
        cmd.append("-t")
    env = dict(os.environ, SSL_CERT_FILE=ctx.cafile, HOME=ctx.work_dir)
    proc = await asyncio.create_subprocess_exec(
        *cmd, *args, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT, env=env)
    try:
        out, _ = await asyncio.wait_for(proc.communicate(text.encode()), timeout)
    except asyncio.TimeoutError:
        proc.kill()
        await proc.wait()
        raise Fail(f"go-sendxmpp did not finish within {timeout:.0f}s")
    return proc.returncode, out.decode(errors="replace").strip()


async def _alert_to_user(ctx, direct_tls: bool):
    sender, rcpt = ctx.accounts(2, "alert")
    c = await online(ctx, rcpt)
    try:
        text = f"ALERT disk full on db-{secrets.token_hex(3)}\nsecond line of the alert"
        rc, out = await sendxmpp(ctx, sender, [rcpt.jid], text, direct_tls=direct_tls)
        check(rc == 0, f"go-sendxmpp exited {rc}: {out}")
        m = await c.next_message(lambda m: m["body"].startswith(text.splitlines()[0]),
                                 what="the alert")
        check(m["from"].bare == sender.jid, f"from {m['from']}")
        check(m["body"].strip() == text, f"body {m['body']!r}, sent {text!r}")
    finally:
        await c.close()


@suite.case("alert to a user over STARTTLS, received by slixmpp")
async def alert_starttls(ctx):
    await _alert_to_user(ctx, direct_tls=False)


@suite.case("alert to a user over direct TLS (-t), received by slixmpp")
async def alert_direct_tls(ctx):
    await _alert_to_user(ctx, direct_tls=True)


@suite.case("wrong password: go-sendxmpp reports an auth failure")
async def wrong_password(ctx):
    sender, rcpt = ctx.accounts(2, "alert")
    sender.password += "-wrong"
    rc, out = await sendxmpp(ctx, sender, [rcpt.jid], "should not arrive")
    check(rc != 0, "go-sendxmpp succeeded with a wrong password")
    check("auth failure" in out, f"output: {out}")


@suite.case("alert to a room (-c), received by an occupant", requires=[service(NS_MUC)])
async def alert_room(ctx):
    muc_service = ctx.features.service_with(NS_MUC)
    sender, occupant = ctx.accounts(2, "alert")
    c = Client(ctx, occupant, plugins=("xep_0030", "xep_0045"))
    await c.online()
    try:
        room = f"alerts-{secrets.token_hex(4)}@{muc_service}"
        from suites.slixmpp_suite import _create_room
        await _create_room(c, room, "oncall")
        text = f"ALERT room {secrets.token_hex(3)}"
        rc, out = await sendxmpp(ctx, sender, ["-c", "-a", "alertbot", room], text)
        check(rc == 0, f"go-sendxmpp exited {rc}: {out}")
        m = await c.next_message(lambda m: m["body"].strip() == text, what="the room alert")
        check(m["type"] == "groupchat", f"type {m['type']}")
        check(m["from"] == JID(f"{room}/alertbot"), f"from {m['from']}")
    finally:
        await c.close()


if __name__ == "__main__":
    suite.main()
