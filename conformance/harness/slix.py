"""A slixmpp client wired for the conformance suites.

It trusts exactly the certificate Starling generated for the run (hostname
verification stays on), picks STARTTLS or direct TLS, can be limited to one
SASL mechanism, records every <stream:features> it is offered and queues
every message and presence it receives, so cases can wait for them.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from typing import Callable

import slixmpp
from slixmpp.xmlstream.handler import Callback
from slixmpp.xmlstream.matcher import MatchXPath

from harness.suite import Account, Context, Fail

# slixmpp logs connection errors at ERROR level; the cases report them.
logging.getLogger("slixmpp").setLevel(logging.CRITICAL)

DEFAULT_PLUGINS = ("xep_0030", "xep_0199", "xep_0092", "xep_0202")


class Client(slixmpp.ClientXMPP):
    def __init__(self, ctx: Context, account: Account, *, resource: str | None = None,
                 mech: str | None = None, direct_tls: bool = False,
                 plugins: tuple[str, ...] = DEFAULT_PLUGINS,
                 server: tuple[str, int, str] | None = None):
        """`server` = (host, port, cafile) of another server (a peer);
        default: the Starling under test."""
        jid = account.jid + (f"/{resource}" if resource else "")
        super().__init__(jid, account.password, sasl_mech=mech)
        self.ctx = ctx
        self.target_server = server
        self.ssl_context = ssl.create_default_context(cafile=server[2] if server else ctx.cafile)
        self.direct_tls = direct_tls
        self.enable_direct_tls = direct_tls
        self.enable_starttls = not direct_tls
        self.enable_plaintext = False
        for p in plugins:
            self.register_plugin(p)
        self.stream_steps: list[list[str]] = []
        self.sasl_offered: list[str] = []
        self.messages: asyncio.Queue = asyncio.Queue()
        self.presences: asyncio.Queue = asyncio.Queue()
        # Every message and presence in order of arrival, for order checks.
        self.arrivals: list = []

        def on_message(m):
            self.arrivals.append(m)
            self.messages.put_nowait(m)

        def on_presence(p):
            self.arrivals.append(p)
            self.presences.put_nowait(p)
        self.register_handler(Callback(
            "conformance messages", MatchXPath("{jabber:client}message"), on_message))
        self.register_handler(Callback(
            "conformance presences", MatchXPath("{jabber:client}presence"), on_presence))

    async def _handle_stream_features(self, features):  # noqa: D401 (slixmpp hook)
        self.stream_steps.append([child.tag for child in features.xml])
        mechs = features.xml.find("{urn:ietf:params:xml:ns:xmpp-sasl}mechanisms")
        if mechs is not None:
            self.sasl_offered = [m.text or "" for m in mechs]
        return await super()._handle_stream_features(features)

    @property
    def mechanism_used(self) -> str | None:
        mech = self.plugin["feature_mechanisms"].mech
        return mech.name if mech else None

    async def login(self, timeout: float = 10.0) -> None:
        """Connect, authenticate and bind; raise Fail on any failure."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future = loop.create_future()

        def finish(outcome: str):
            def handler(event=None):
                if not done.done():
                    done.set_result((outcome, event))
            return handler

        self.add_event_handler("session_start", finish("ok"))
        self.add_event_handler("session_resumed", finish("ok"))
        self.add_event_handler("failed_all_auth", finish("authentication failed"))
        self.add_event_handler("failed_auth", finish("authentication failed"))
        self.add_event_handler("connection_failed", finish("connection failed"))
        self.add_event_handler("stream_error", finish("stream error"))
        self.add_event_handler("disconnected", finish("disconnected"))
        if self.target_server:
            host, port = self.target_server[0], self.target_server[1]
        else:
            host = self.ctx.host
            port = self.ctx.tls_port if self.direct_tls else self.ctx.starttls_port
        self.connect(host, port)
        try:
            outcome, event = await asyncio.wait_for(done, timeout)
        except asyncio.TimeoutError:
            self.abort()
            raise Fail(f"login of {self.boundjid.bare} timed out after {timeout:.0f}s")
        if outcome != "ok":
            self.abort()
            detail = ""
            if event is not None and hasattr(event, "get"):
                try:
                    detail = f" ({event['condition']})"
                except Exception:
                    detail = f" ({event})"
            raise Fail(f"login of {self.boundjid.bare}: {outcome}{detail}")

    async def online(self, timeout: float = 10.0, presence: bool = True) -> "Client":
        await self.login(timeout)
        if presence:
            self.send_presence()
        return self

    async def close(self) -> None:
        try:
            await asyncio.wait_for(self.disconnect(wait=1.0), 3)
        except Exception:
            self.abort()

    async def next_message(self, pred: Callable | None = None, timeout: float = 5.0,
                           what: str = "a message"):
        return await _next(self.messages, pred, timeout, what, self.boundjid.full)

    async def next_presence(self, pred: Callable | None = None, timeout: float = 5.0,
                            what: str = "a presence"):
        return await _next(self.presences, pred, timeout, what, self.boundjid.full)

    async def no_message(self, pred: Callable | None = None, seconds: float = 0.5) -> None:
        try:
            m = await _next(self.messages, pred, seconds, "", "")
        except Fail:
            return
        raise Fail(f"{self.boundjid.full} received an unexpected message: {m}")


async def _next(queue: asyncio.Queue, pred, timeout: float, what: str, who: str):
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        left = deadline - loop.time()
        if left <= 0:
            raise Fail(f"{who} did not receive {what} within {timeout:.0f}s")
        try:
            item = await asyncio.wait_for(queue.get(), left)
        except asyncio.TimeoutError:
            raise Fail(f"{who} did not receive {what} within {timeout:.0f}s") from None
        if pred is None or pred(item):
            return item


async def online(ctx: Context, account: Account, presence: bool = True, **kw) -> Client:
    """A logged-in client (with initial presence unless presence=False)."""
    c = Client(ctx, account, **kw)
    await c.online(presence=presence)
    return c


def body_of(msg) -> str:
    return msg["body"]
