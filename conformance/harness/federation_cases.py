"""The federation cases, run against a peer server (Prosody or ejabberd).

For each trust mode (see harness/federation.py) and in both directions:
chat, mutual presence subscription, a room on the other server, errors for
an unknown user and an unknown domain, offline delivery. Each case checks in
Starling's log which authentication the streams used (SASL EXTERNAL with the
CA trusted, dialback without). The environment is started once per mode and
reused by the cases of that mode.
"""

from __future__ import annotations

import asyncio
import secrets
import xml.etree.ElementTree as ET

from harness.federation import STARLING, Federation
from harness.slix import Client
from harness.suite import Fail, Skip, Suite, answers, check

MUC = "http://jabber.org/protocol/muc"
MUC_USER = "http://jabber.org/protocol/muc#user"
MUC_OWNER = "http://jabber.org/protocol/muc#owner"
STANZAS = "urn:ietf:params:xml:ns:xmpp-stanzas"

# The negotiated method per mode: (Starling -> peer, peer -> Starling).
EXPECTED = {
    "external": ("EXTERNAL", "EXTERNAL"),
    "dialback": ("dialback", "dialback"),
    # ejabberd drops our EXTERNAL attempt over the xmppAddr SAN: dialback
    # on the retry; its own certificate is fine for EXTERNAL towards us.
    "xmppaddr": ("dialback", "EXTERNAL"),
}
LABEL = {"external": "EXTERNAL", "dialback": "dialback",
         "xmppaddr": "EXTERNAL dropped by the peer, dialback retry"}

_env: dict[str, Federation] = {}


def env_for(ctx, kind: str, mode: str) -> Federation:
    if ctx.backend != "sqlite":
        raise Skip("federation runs once per conformance run, on the sqlite pass "
                   "(its Starling has a database of its own)")
    e = _env.get(kind)
    if e is None:
        e = _env[kind] = Federation(ctx, kind)
    e.ensure(mode)
    return e


def stop_all() -> list[str]:
    problems = []
    for e in _env.values():
        e.stop()
        problems.extend(e.problems)
    _env.clear()
    return problems


async def _pair(ctx, env: Federation) -> tuple[Client, Client]:
    s_acc, p_acc = env.starling_account(), env.peer_account()
    s = Client(ctx, s_acc, resource="fed", server=env.starling_server())
    p = Client(ctx, p_acc, resource="fed", server=env.peer_server())
    await s.online(timeout=20)
    await p.online(timeout=20)
    return s, p


async def _close(*clients: Client) -> None:
    for c in clients:
        await c.close()


def _token() -> str:
    return secrets.token_hex(4)


def _error_condition(stanza) -> str:
    err = stanza.xml.find("{jabber:client}error")
    if err is None:
        return ""
    for child in err:
        if child.tag.startswith("{" + STANZAS + "}") and not child.tag.endswith("}text"):
            return child.tag.split("}", 1)[1]
    return ""


def check_methods(env: Federation, mode: str) -> None:
    out, inc = env.methods()
    want_out, want_in = EXPECTED[mode]
    check(want_out in out, f"Starling -> {env.peer_domain} authenticated with {sorted(out)}, "
                           f"expected {want_out} (see {env.starling.log})")
    check(want_in in inc, f"{env.peer_domain} -> Starling authenticated with {sorted(inc)}, "
                          f"expected {want_in}")


async def chat(ctx, kind: str, mode: str) -> None:
    env = env_for(ctx, kind, mode)
    s, p = await _pair(ctx, env)
    try:
        t = _token()
        s.send_message(mto=p.boundjid.bare, mbody=f"to {kind} {t}", mtype="chat")
        m = await p.next_message(lambda m: m["body"] == f"to {kind} {t}", timeout=30,
                                 what=f"the message from Starling")
        check(m["from"] == s.boundjid, f"from {m['from']}")
        p.send_message(mto=s.boundjid.bare, mbody=f"from {kind} {t}", mtype="chat")
        m = await s.next_message(lambda m: m["body"] == f"from {kind} {t}", timeout=30,
                                 what=f"the message from {kind}")
        check(m["from"] == p.boundjid, f"from {m['from']}")
        # A second message each way rides on the same streams.
        s.send_message(mto=p.boundjid.full, mbody="again", mtype="chat")
        await p.next_message(lambda m: m["body"] == "again", timeout=10, what="a second message")
        check_methods(env, mode)
        if mode == "xmppaddr":
            check("dropped the stream during SASL EXTERNAL" in env.starling.log_text(),
                  "Starling's log does not show the EXTERNAL drop and retry")
    finally:
        await _close(s, p)


async def presence(ctx, kind: str, mode: str) -> None:
    env = env_for(ctx, kind, mode)
    s, p = await _pair(ctx, env)
    try:
        # Starling's user asks; the peer's user accepts and asks back.
        s.send_presence(pto=p.boundjid.bare, ptype="subscribe")
        await p.next_presence(lambda x: x["type"] == "subscribe" and x["from"].bare == s.boundjid.bare,
                              timeout=30, what="the subscription request")
        p.send_presence(pto=s.boundjid.bare, ptype="subscribed")
        p.send_presence(pto=s.boundjid.bare, ptype="subscribe")
        await s.next_presence(lambda x: x["type"] == "subscribed" and x["from"].bare == p.boundjid.bare,
                              timeout=30, what="the subscription approval")
        await s.next_presence(lambda x: x["type"] == "subscribe" and x["from"].bare == p.boundjid.bare,
                              timeout=30, what="the request back")
        s.send_presence(pto=p.boundjid.bare, ptype="subscribed")
        # Both now see each other available (probes or the broadcast after
        # approval), and a status change travels.
        await s.next_presence(lambda x: x["from"] == p.boundjid and x["type"] == "available",
                              timeout=30, what=f"{kind} user's availability")
        await p.next_presence(lambda x: x["from"] == s.boundjid and x["type"] == "available",
                              timeout=30, what="Starling user's availability")
        s.send_presence(pstatus="busy in a test", pshow="dnd")
        await p.next_presence(lambda x: x["from"] == s.boundjid and x["status"] == "busy in a test",
                              timeout=20, what="the status change")
        p.send_presence(ptype="unavailable")
        await s.next_presence(lambda x: x["from"] == p.boundjid and x["type"] == "unavailable",
                              timeout=20, what="the unavailable presence")
    finally:
        await _close(s, p)


def _join(c: Client, room_jid: str, nick: str) -> None:
    pres = c.make_presence(pto=f"{room_jid}/{nick}")
    pres.append(ET.Element(f"{{{MUC}}}x"))
    pres.send()


async def _joined(c: Client, room_jid: str, nick: str):
    want = f"{room_jid}/{nick}"

    def ok(x) -> bool:
        if str(x["from"]) != want:
            return False
        if x["type"] == "error":
            raise Fail(f"joining {want} failed: {_error_condition(x)}")
        xs = x.xml.find(f"{{{MUC_USER}}}x")
        return xs is not None and any(st.get("code") == "110" for st in xs.findall(f"{{{MUC_USER}}}status"))
    return await c.next_presence(ok, timeout=30, what=f"self-presence from {want}")


async def _create_room(c: Client, room_jid: str, nick: str) -> None:
    _join(c, room_jid, nick)
    await _joined(c, room_jid, nick)
    # An instant room (XEP-0045 10.1.2): accept the default configuration.
    iq = c.make_iq_set(ito=room_jid)
    q = ET.Element(f"{{{MUC_OWNER}}}query")
    ET.SubElement(q, "{jabber:x:data}x", {"type": "submit"})
    iq.append(q)
    r = await iq.send(timeout=20)
    check(r["type"] == "result", f"room configuration: {r}")


async def room(ctx, kind: str, mode: str, host: str) -> None:
    """A room on `host` ("peer" or "starling"); its owner is a user of that
    server, the guest comes from the other one."""
    env = env_for(ctx, kind, mode)
    s, p = await _pair(ctx, env)
    try:
        owner, guest = (p, s) if host == "peer" else (s, p)
        domain = env.peer_domain if host == "peer" else STARLING
        room_jid = f"fed-{_token()}@conference.{domain}"
        await _create_room(owner, room_jid, "owner")
        _join(guest, room_jid, "guest")
        await _joined(guest, room_jid, "guest")
        await owner.next_presence(lambda x: str(x["from"]) == f"{room_jid}/guest", timeout=20,
                                  what="the guest's presence in the room")
        owner.send_message(mto=room_jid, mbody="welcome", mtype="groupchat")
        m = await guest.next_message(lambda m: m["type"] == "groupchat" and m["body"] == "welcome",
                                     timeout=20, what="the owner's groupchat message")
        check(str(m["from"]) == f"{room_jid}/owner", f"from {m['from']}")
        guest.send_message(mto=room_jid, mbody="thanks", mtype="groupchat")
        await owner.next_message(lambda m: m["type"] == "groupchat" and m["body"] == "thanks",
                                 timeout=20, what="the guest's groupchat message")
        await guest.next_message(lambda m: m["type"] == "groupchat" and m["body"] == "thanks",
                                 timeout=20, what="the reflection of the guest's message")
    finally:
        await _close(s, p)


async def errors(ctx, kind: str, mode: str) -> None:
    env = env_for(ctx, kind, mode)
    s, p = await _pair(ctx, env)
    try:
        s.send_message(mto=f"nobody-{_token()}@{env.peer_domain}", mbody="anyone?", mtype="chat")
        e = await s.next_message(lambda m: m["type"] == "error", timeout=30,
                                 what=f"the error from {kind} for an unknown user")
        check(_error_condition(e) == "service-unavailable",
              f"{kind} answered {_error_condition(e)!r} for an unknown user")
        p.send_message(mto=f"nobody-{_token()}@{STARLING}", mbody="anyone?", mtype="chat")
        e = await p.next_message(lambda m: m["type"] == "error", timeout=30,
                                 what="Starling's error for an unknown user")
        check(_error_condition(e) == "service-unavailable",
              f"Starling answered {_error_condition(e)!r} for an unknown user")
        # An unknown domain: NXDOMAIN from the test DNS.
        s.send_message(mto="someone@nowhere.test", mbody="anyone?", mtype="chat")
        e = await s.next_message(lambda m: m["type"] == "error" and m["from"].domain == "nowhere.test",
                                 timeout=30, what="the bounce for an unknown domain")
        check(_error_condition(e) == "remote-server-not-found",
              f"Starling bounced with {_error_condition(e)!r}")
        # The peer's users see the same for a domain that does not exist.
        p.send_message(mto="someone@nowhere.test", mbody="anyone?", mtype="chat")
        e = await p.next_message(lambda m: m["type"] == "error" and m["from"].domain == "nowhere.test",
                                 timeout=30, what=f"{kind}'s bounce for an unknown domain")
        check(_error_condition(e) in ("remote-server-not-found", "remote-server-timeout"),
              f"{kind} bounced with {_error_condition(e)!r}")
    finally:
        await _close(s, p)


async def offline(ctx, kind: str, mode: str) -> None:
    env = env_for(ctx, kind, mode)
    s_acc, p_acc = env.starling_account("so"), env.peer_account("po")
    s = Client(ctx, s_acc, resource="fed", server=env.starling_server())
    await s.online(timeout=20)
    t = _token()
    try:
        # To the peer's user, who is offline: the peer stores it.
        s.send_message(mto=p_acc.jid, mbody=f"stored at {kind} {t}", mtype="chat")
        await asyncio.sleep(2)
        p = Client(ctx, p_acc, resource="fed", server=env.peer_server())
        await p.online(timeout=20)
        try:
            m = await p.next_message(lambda m: m["body"] == f"stored at {kind} {t}", timeout=30,
                                     what="the offline message from Starling")
            check(m["from"].bare == s_acc.jid, f"from {m['from']}")
            check(m.xml.find("{urn:xmpp:delay}delay") is not None, "no <delay/> on the offline message")
            await s.close()
            # And back: Starling stores for its offline user.
            p.send_message(mto=s_acc.jid, mbody=f"stored at Starling {t}", mtype="chat")
            await asyncio.sleep(2)
        finally:
            await p.close()
        s = Client(ctx, s_acc, resource="fed2", server=env.starling_server())
        await s.online(timeout=20)
        m = await s.next_message(lambda m: m["body"] == f"stored at Starling {t}", timeout=30,
                                 what=f"the offline message from {kind}")
        check(m["from"].bare == p_acc.jid, f"from {m['from']}")
        check(m.xml.find("{urn:xmpp:delay}delay") is not None, "no <delay/> on the offline message")
    finally:
        await s.close()


def register(suite: Suite, kind: str, modes: list[str]) -> None:
    """Declare the federation cases with `kind` for each mode."""
    peer = {"prosody": "Prosody", "ejabberd": "ejabberd"}[kind]
    for mode in modes:
        label = LABEL[mode]

        def add(name, fn, *args, requires=None, timeout=120.0):
            async def case(ctx, fn=fn, args=args):
                await fn(ctx, kind, *args)
            suite.case(f"federation {label}: {name}", requires=requires, timeout=timeout)(case)

        add(f"chat both ways with {peer}", chat, mode)
        if mode == "xmppaddr":
            continue
        add(f"mutual subscription and presence with {peer}", presence, mode,
            requires=[answers("jabber:iq:roster")])
        add(f"Starling user joins a room on {peer}", room, mode, "peer")
        add(f"{peer} user joins a room on Starling", room, mode, "starling")
        add("errors for an unknown user and an unknown domain", errors, mode)
        add("offline delivery both ways", offline, mode)
