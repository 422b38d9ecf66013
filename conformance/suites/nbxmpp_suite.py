"""nbxmpp (Gajim's XMPP library) against Starling.

A second, independent client stack: nbxmpp runs on GLib/Gio, so TLS is
GnuTLS through glib-networking (slixmpp uses OpenSSL), its XML parser,
SASL code, stream-management code and stream-feature handling are its own.
The point is to catch what one stack tolerates and another does not.

Why nbxmpp rather than aioxmpp: nbxmpp is what Gajim runs today (7.x,
maintained); aioxmpp's last release is from 2023 and its current wheel does
not even import without an undeclared dependency (pytz). nbxmpp needs
PyGObject, pycairo and libsoup 3 from Debian (`python3-gi`,
`python3-cairo`, `gir1.2-soup-3.0`: seven small packages), which
`conformance/run` installs; the PyPI package itself is pure Python.

Cases are plain functions that drive the GLib main context themselves
(`pump`) until a condition holds or a time limit passes.
"""

from __future__ import annotations

import secrets
import time
from typing import Any, Callable

import gi

gi.require_version("Gio", "2.0")
gi.require_version("GLib", "2.0")
from gi.repository import Gio, GLib  # noqa: E402

from nbxmpp.client import Client  # noqa: E402
from nbxmpp.const import ConnectionProtocol, ConnectionType  # noqa: E402
from nbxmpp.protocol import JID, Message, Presence  # noqa: E402
from nbxmpp.structs import StanzaHandler  # noqa: E402

from harness.suite import (Account, Context, Fail, Suite, check, service,  # noqa: E402
                           stream_feature)

suite = Suite("nbxmpp", "nbxmpp 7.4 (Gajim's library), GLib + GnuTLS")

MAIN = GLib.MainContext.default()


def pump(cond: Callable[[], bool], timeout: float, what: str) -> None:
    """Run the GLib main context until cond() is true (Fail after timeout)."""
    deadline = time.monotonic() + timeout
    # A periodic source so that iteration(True) wakes up to check the clock.
    tick = GLib.timeout_add(50, lambda: True)
    try:
        while not cond():
            if time.monotonic() > deadline:
                raise Fail(f"timed out after {timeout:.0f}s waiting for {what}")
            MAIN.iteration(True)
    finally:
        GLib.source_remove(tick)


def spin(seconds: float) -> None:
    """Run the GLib main context for a while (lets nbxmpp write what it queued)."""
    deadline = time.monotonic() + seconds
    try:
        pump(lambda: time.monotonic() >= deadline, seconds + 5, "")
    except Fail:
        pass


class NbClient:
    """One nbxmpp client with the events a case waits for."""

    def __init__(self, ctx: Context, account: Account, resource: str = "gajim",
                 mechs: set[str] | None = None, direct_tls: bool = False):
        self.account = account
        user, domain = account.jid.split("@", 1)
        c = Client(log_context=user)
        c.set_domain(domain)
        c.set_username(user)
        c.set_password(account.password)
        c.set_resource(resource)
        port = ctx.tls_port if direct_tls else ctx.starttls_port
        kind = ConnectionType.DIRECT_TLS if direct_tls else ConnectionType.START_TLS
        c.set_custom_host(f"{ctx.host}:{port}", ConnectionProtocol.TCP, kind)
        # Trust exactly the certificate Starling generated for this run.
        c.set_accepted_certificates([Gio.TlsCertificate.new_from_file(ctx.cafile)])
        if mechs:
            c.set_mechs(set(mechs))
        self.client = c
        self.events: list[str] = []
        self.messages: list[tuple[Any, Any]] = []
        self.presences: list[tuple[Any, Any]] = []
        for sig in ("connected", "connection-failed", "disconnected",
                    "resume-successful", "resume-failed", "login-successful"):
            c.subscribe(sig, self._on_signal)
        c.register_handler(StanzaHandler(name="message", callback=self._on_message))
        c.register_handler(StanzaHandler(name="presence", callback=self._on_presence))

    def _on_signal(self, _client, signal_name: str) -> None:
        self.events.append(signal_name)

    def _on_message(self, _client, stanza, properties) -> None:
        self.messages.append((stanza, properties))

    def _on_presence(self, _client, stanza, properties) -> None:
        self.presences.append((stanza, properties))

    @property
    def mechanism(self) -> str | None:
        mech = getattr(self.client._sasl, "_mechanism", None)  # nbxmpp keeps it private
        return getattr(mech, "name", None)

    def connect(self, timeout: float = 10) -> "NbClient":
        self.client.connect()
        pump(lambda: any(e in self.events for e in ("connected", "connection-failed", "disconnected")),
             timeout, f"login of {self.account.jid}")
        if "connected" not in self.events:
            err = self.client.get_error()
            raise Fail(f"login of {self.account.jid} failed: {self.events[-1]} {err}")
        return self

    def close(self) -> None:
        c = self.client
        if "connected" in self.events and "disconnected" not in self.events:
            try:
                c.disconnect()
                pump(lambda: "disconnected" in self.events, 5, "disconnect")
            except Fail:
                c.disconnect(immediate=True)

    def wait_message(self, pred: Callable[[Any, Any], bool], what: str, timeout: float = 5):
        box: list = []

        def found() -> bool:
            for s, p in self.messages:
                if pred(s, p):
                    box.append((s, p))
                    return True
            return False
        pump(found, timeout, what)
        return box[0]

    def request(self, module: str, method: str, *args, timeout: float = 10):
        """Run an nbxmpp module request (a Task) and return its result."""
        done: list = []

        # nbxmpp holds callbacks weakly (keep this one referenced here) and
        # clears a task's result once its callbacks ran: take it inside.
        def on_done(task) -> None:
            try:
                done.append((task.finish(), None))
            except Exception as e:
                done.append((None, e))
        getattr(self.client.get_module(module), method)(*args, callback=on_done)
        pump(lambda: bool(done), timeout, f"{module}.{method}")
        result, error = done[0]
        if error is not None:
            raise Fail(f"{module}.{method}: {type(error).__name__}: {error}")
        return result


def _login(ctx, mechs=None, direct_tls=False, want=None):
    acct = ctx.new_account("nb")
    c = NbClient(ctx, acct, mechs=mechs, direct_tls=direct_tls)
    try:
        c.connect()
        bound = c.client.get_bound_jid()
        check(bound is not None and str(bound.bare) == acct.jid, f"bound {bound}, account {acct.jid}")
        check(bound.resource == "gajim", f"asked for resource 'gajim', bound {bound.resource!r}")
        if want:
            check(c.mechanism == want, f"nbxmpp used {c.mechanism}, wanted {want}")
        check(c.client.tls_version == Gio.TlsProtocolVersion.TLS_1_3,
              f"TLS version {c.client.tls_version}")
    finally:
        c.close()


@suite.case("login with nbxmpp's own mechanism choice (STARTTLS, TLS 1.3)")
def login_default(ctx):
    _login(ctx, want="SCRAM-SHA-256")


@suite.case("login SCRAM-SHA-1 (STARTTLS)")
def login_sha1(ctx):
    _login(ctx, mechs={"SCRAM-SHA-1"}, want="SCRAM-SHA-1")


@suite.case("login PLAIN (STARTTLS)")
def login_plain(ctx):
    _login(ctx, mechs={"PLAIN"}, want="PLAIN")


@suite.case("login over direct TLS (XEP-0368)")
def login_direct_tls(ctx):
    _login(ctx, direct_tls=True)


@suite.case("wrong password is refused")
def wrong_password(ctx):
    acct = ctx.new_account("nb")
    acct.password += "-wrong"
    c = NbClient(ctx, acct)
    c.client.connect()
    try:
        pump(lambda: any(e in c.events for e in ("connected", "connection-failed", "disconnected")),
             10, "the login to fail")
        check("connected" not in c.events, "logged in with a wrong password")
        domain, error, text = c.client.get_error()
        check(error == "not-authorized", f"error {domain} {error} {text}")
    finally:
        c.close()


@suite.case("chat message round trip between two nbxmpp clients")
def message_round_trip(ctx):
    a, b = ctx.accounts(2, "nb")
    ca, cb = NbClient(ctx, a, resource="one"), NbClient(ctx, b, resource="two")
    try:
        ca.connect()
        cb.connect()
        ca.client.send_stanza(Presence())
        cb.client.send_stanza(Presence())
        body = "hello from gajim " + secrets.token_hex(4)
        ca.client.send_stanza(Message(to=f"{b.jid}/two", body=body, typ="chat"))
        _s, p = cb.wait_message(lambda s, p: p.body == body, f"message {body!r}")
        check(str(p.jid) == f"{a.jid}/one", f"from {p.jid}")
        check(p.type.value == "chat", f"type {p.type}")
        reply = "reply " + secrets.token_hex(4)
        cb.client.send_stanza(Message(to=a.jid, body=reply, typ="chat"))
        _s, p = ca.wait_message(lambda s, p: p.body == reply, f"reply {reply!r}")
        check(str(p.jid) == f"{b.jid}/two", f"reply from {p.jid}")
    finally:
        ca.close()
        cb.close()


@suite.case("disco#info, ping, version and time through nbxmpp's modules")
def server_queries(ctx):
    c = NbClient(ctx, ctx.new_account("nb"))
    try:
        c.connect()
        info = c.request("Discovery", "disco_info", ctx.domain)
        idents = {(i.category, i.type) for i in info.identities}
        check(("server", "im") in idents, f"identities {idents}")
        check("urn:xmpp:ping" in info.features, f"features {info.features}")
        c.request("Ping", "ping", JID.from_string(ctx.domain))
        version = c.request("SoftwareVersion", "request_software_version", JID.from_string(ctx.domain))
        check(version.name, f"version {version}")
        t = c.request("EntityTime", "request_entity_time", JID.from_string(ctx.domain))
        check(t, f"entity time {t!r}")
    finally:
        c.close()


@suite.case("MUC: join with self-presence (110) and talk through nbxmpp's MUC parsing (XEP-0045)",
            requires=[service("http://jabber.org/protocol/muc")], timeout=30)
def muc_join(ctx):
    import asyncio

    from harness.slix import Client as SlixClient
    from suites.slixmpp_suite import _create_room

    muc = ctx.features.service_with("http://jabber.org/protocol/muc")
    owner_acct, acct = ctx.accounts(2, "nbmuc")
    room = f"gajim-{secrets.token_hex(4)}@{muc}"
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)  # slixmpp binds to the current loop when constructed
    owner = SlixClient(ctx, owner_acct, plugins=("xep_0030", "xep_0045"))
    loop.run_until_complete(owner.online())
    c = NbClient(ctx, acct)
    try:
        loop.run_until_complete(_create_room(owner, room, "owner"))
        c.connect()
        join = Presence(to=f"{room}/gajim")
        join.setTag("x", namespace="http://jabber.org/protocol/muc")
        c.client.send_stanza(join)
        found: list = []

        def self_presence() -> bool:
            for _s, p in c.presences:
                if getattr(p, "from_muc", False) and p.is_muc_self_presence:
                    found.append(p)
                    return True
            return False
        pump(self_presence, 10, "the MUC self-presence (status 110)")
        p = found[0]
        check(str(p.muc_jid) == room and p.muc_nickname == "gajim", f"self-presence {p.jid}")
        check(p.muc_user is not None and p.muc_user.role.value == "participant",
              f"role {p.muc_user.role if p.muc_user else None}")
        body = "from gajim " + secrets.token_hex(4)
        c.client.send_stanza(Message(to=room, body=body, typ="groupchat"))
        spin(0.3)  # nbxmpp writes from the GLib loop, which does not run while asyncio does
        got = loop.run_until_complete(owner.next_message(lambda m: m["body"] == body,
                                                        what="nbxmpp's groupchat message"))
        check(str(got["from"]) == f"{room}/gajim", f"from {got['from']}")
        reply = "to gajim " + secrets.token_hex(4)
        owner.send_message(mto=room, mbody=reply, mtype="groupchat")
        # Let slixmpp flush its send queue, then wait in GLib.
        loop.run_until_complete(asyncio.sleep(0.2))
        _s, m = c.wait_message(lambda s, m: m.body == reply, "the owner's groupchat message")
        check(m.type.value == "groupchat" and m.muc_nickname == "owner",
              f"type {m.type} nick {m.muc_nickname}")
    finally:
        c.close()
        loop.run_until_complete(owner.close())
        pending = asyncio.all_tasks(loop)
        for t in pending:
            t.cancel()
        loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        asyncio.set_event_loop(None)
        loop.close()


@suite.case("stream management: enabled, then resumed after the socket is cut (XEP-0198)",
            requires=[stream_feature("urn:xmpp:sm:3", "sm")])
def sm_resume(ctx):
    a, b = ctx.accounts(2, "nb")
    ca, cb = NbClient(ctx, a, resource="laptop"), NbClient(ctx, b)
    try:
        ca.connect()
        smacks = ca.client._smacks  # nbxmpp exposes SM state only here
        pump(lambda: smacks.enabled, 5, "<enabled/>")
        check(ca.client.resumeable, "SM enabled without resumption")
        cb.connect()
        # Cut the socket without </stream:stream>, as a phone losing the network.
        ca.client.disconnect(immediate=True)
        pump(lambda: "disconnected" in ca.events, 5, "the socket to close")
        body = "sent while you were cut off " + secrets.token_hex(4)
        cb.client.send_stanza(Message(to=f"{a.jid}/laptop", body=body, typ="chat"))
        ca.client.connect()
        pump(lambda: any(e in ca.events for e in ("resume-successful", "resume-failed")),
             10, "the resumption")
        check("resume-successful" in ca.events, f"resumption failed: {ca.events}")
        ca.wait_message(lambda s, p: p.body == body, "the message sent while cut off")
    finally:
        ca.close()
        cb.close()


if __name__ == "__main__":
    suite.main()
