"""What the Conversations compliance tester checks, and what other clients expect.

The checks of iNPUTmice's ComplianceTester ("Conversations Compliance
Suite" = Advanced Server Core + IM + CSI, HTTP upload, proxy65, push), plus
the expectations of Gajim, Monal, Dino and Conversations recorded in
/work/shared/CLIENTS.md. Each check looks at what a logged-in client sees:
stream features, disco#info of the server and of the account, disco#items of
the server (the probe collects these with slixmpp), and a direct TLS
handshake.

A check that is not met is a hard failure only when Starling claims the
feature: a page in xeps/ with that `spec:` and `status: complete`, or a page
listing the namespace in its `features:`. Otherwise it is reported `miss`:
informational, so the table shows at a glance which client expectations we
still miss.
"""

from __future__ import annotations

import asyncio
import secrets
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from harness.suite import Fail, Features, Miss, Suite

suite = Suite("compliance", "Conversations compliance tester checks and client expectations")


def xeps_claims(repo_root: str) -> tuple[set[str], set[str]]:
    """(specs with status complete, features listed on any page) from xeps/*.md."""
    complete, features = set(), set()
    for page in sorted(Path(repo_root, "xeps").glob("*.md")):
        if page.name == "README.md":
            continue
        front = _front_matter(page.read_text())
        if front.get("status", "").split()[:1] == ["complete"]:
            complete.add(front.get("spec", "").strip())
        features.update(front.get("features", "").split())
    return complete, features


def _front_matter(text: str) -> dict[str, str]:
    lines = text.splitlines()
    if not lines or lines[0].strip() != "```":
        return {}
    out = {}
    for line in lines[1:]:
        if line.strip() == "```":
            break
        key, _, value = line.partition(":")
        out[key.strip()] = value.strip()
    return out


@dataclass
class Expectation:
    name: str
    spec: str             # as in the xeps/ front matter, e.g. "XEP-0198"
    namespaces: list[str]  # any of these listed on a page counts as a claim
    who: str              # which clients rely on it
    test: Callable[[Features], tuple[bool, str]]


def _stream(ns: str, name: str):
    return lambda f: (f.stream_has(ns, name), f"stream features after login: {sorted(f.stream)}")


def _server(*nss: str):
    return lambda f: (any(n in f.server for n in nss), f"server features lack {' / '.join(nss)}")


def _account(*nss: str):
    return lambda f: (any(n in f.account for n in nss), f"account features lack {' / '.join(nss)}")


def _service(ns: str):
    return lambda f: (f.service_with(ns) is not None,
                      f"no item in disco#items of the server advertises {ns} (items: {sorted(f.services)})")


def _pep(f: Features):
    ok = any(i["category"] == "pubsub" and i["type"] == "pep" for i in f.account_identities)
    return ok, "the account has no pubsub/pep identity"


def _omemo(f: Features):
    ok, why = _pep(f)
    if not ok:
        return ok, why
    return ("http://jabber.org/protocol/pubsub#publish-options" in f.account,
            "the account lacks pubsub#publish-options (OMEMO needs access_model=open)")


MONAL_PEP = ["publish-options", "persistent-items", "config-node-max", "subscribe", "auto-create",
             "multi-items", "item-ids"]


def _monal_pep(f: Features):
    missing = [x for x in MONAL_PEP if f"http://jabber.org/protocol/pubsub#{x}" not in f.account]
    return not missing, "the account lacks pubsub#" + ", #".join(missing)


def _abuse(f: Features):
    for form in f.server_forms:
        if form.get("FORM_TYPE") == ["http://jabber.org/network/serverinfo"] and form.get("abuse-addresses"):
            return True, ""
    return False, "no serverinfo form with abuse-addresses in the server's disco#info"


def _scram_sha1(f: Features):
    return "SCRAM-SHA-1" in f.sasl_mechanisms, f"mechanisms offered: {f.sasl_mechanisms}"


def _cb_endpoint(f: Features):
    after_tls = f.stream_steps[1] if len(f.stream_steps) > 1 else []
    return ("{urn:xmpp:sasl-cb:0}sasl-channel-binding" in after_tls,
            "no <sasl-channel-binding/> in the SASL stream features")


EXPECTATIONS = [
    # The Conversations Compliance Suite, in the tester's order.
    Expectation("XEP-0115 entity capabilities in stream features", "XEP-0115",
                ["http://jabber.org/protocol/caps"], "Conversations",
                _stream("http://jabber.org/protocol/caps", "c")),
    Expectation("XEP-0163 PEP (pubsub/pep identity on the account)", "XEP-0163",
                ["http://jabber.org/protocol/pubsub"], "Conversations, Gajim, Monal, Dino", _pep),
    Expectation("roster versioning stream feature", "RFC 6121",
                ["urn:xmpp:features:rosterver"], "Conversations, Gajim",
                _stream("urn:xmpp:features:rosterver", "ver")),
    Expectation("XEP-0280 message carbons", "XEP-0280", ["urn:xmpp:carbons:2"],
                "Conversations, Gajim, Dino, Monal", _server("urn:xmpp:carbons:2")),
    Expectation("XEP-0191 blocking command", "XEP-0191", ["urn:xmpp:blocking"],
                "Conversations, Gajim, Dino", _server("urn:xmpp:blocking")),
    Expectation("XEP-0045 MUC service in disco#items", "XEP-0045",
                ["http://jabber.org/protocol/muc"], "every client", _service("http://jabber.org/protocol/muc")),
    Expectation("XEP-0198 stream management", "XEP-0198", ["urn:xmpp:sm:3"],
                "Conversations, Monal, Gajim", _stream("urn:xmpp:sm:3", "sm")),
    Expectation("XEP-0313 message archive (urn:xmpp:mam:2 on the account)", "XEP-0313",
                ["urn:xmpp:mam:2"], "Conversations, Gajim (mam:2 only), Monal, Dino",
                _account("urn:xmpp:mam:2")),
    Expectation("XEP-0352 client state indication", "XEP-0352", ["urn:xmpp:csi:0"],
                "Conversations, Monal", _stream("urn:xmpp:csi:0", "csi")),
    Expectation("XEP-0363 HTTP file upload service", "XEP-0363", ["urn:xmpp:http:upload:0"],
                "Conversations, Gajim, Monal, Dino", _service("urn:xmpp:http:upload:0")),
    Expectation("XEP-0065 SOCKS5 bytestreams proxy", "XEP-0065",
                ["http://jabber.org/protocol/bytestreams"], "Conversations",
                _service("http://jabber.org/protocol/bytestreams")),
    Expectation("XEP-0357 push notifications (on the account)", "XEP-0357", ["urn:xmpp:push:0"],
                "Conversations, Monal", _account("urn:xmpp:push:0")),
    # The tester's other checks and what CLIENTS.md records.
    Expectation("XEP-0384 OMEMO: PEP with publish-options", "XEP-0384",
                ["http://jabber.org/protocol/pubsub#publish-options"],
                "Conversations, Gajim, Dino, Monal", _omemo),
    Expectation("XEP-0160 offline messages (msgoffline)", "XEP-0160", ["msgoffline"],
                "every client", _server("msgoffline")),
    Expectation("XEP-0359 stanza-id advertised on the account", "XEP-0359", ["urn:xmpp:sid:0"],
                "Conversations, Gajim (trust stanza-ids only then)", _account("urn:xmpp:sid:0")),
    Expectation("XEP-0157 abuse contact address", "XEP-0157",
                ["http://jabber.org/network/serverinfo"], "Conversations", _abuse),
    Expectation("XEP-0402 bookmarks with compat-pep", "XEP-0402",
                ["urn:xmpp:bookmarks:1#compat-pep"], "Gajim",
                _account("urn:xmpp:bookmarks:1#compat-pep")),
    Expectation("PEP features Monal requires", "XEP-0060",
                [f"http://jabber.org/protocol/pubsub#{x}" for x in MONAL_PEP], "Monal", _monal_pep),
    Expectation("XEP-0215 external services (STUN/TURN for calls)", "XEP-0215",
                ["urn:xmpp:extdisco:2"], "Conversations, Dino, Monal", _server("urn:xmpp:extdisco:2")),
    Expectation("SCRAM-SHA-1 offered", "RFC 5802", [], "Dino (SCRAM-SHA-1 or PLAIN only)", _scram_sha1),
    Expectation("XEP-0440 channel-binding types advertised", "XEP-0440", [],
                "Monal, Conversations", _cb_endpoint),
]


def _make_case(exp: Expectation):
    def run(ctx):
        ok, why = exp.test(ctx.features)
        if ok:
            return
        complete, listed = xeps_claims(ctx.repo_root)
        claimed = exp.spec in complete or any(ns in listed for ns in exp.namespaces)
        msg = f"{why}; needed by {exp.who}"
        if claimed:
            raise Fail(f"claimed in xeps/ but not advertised: {msg}")
        raise Miss(msg)
    run.__name__ = "check_" + exp.spec.replace("-", "_").replace(" ", "_").lower()
    return run


for _exp in EXPECTATIONS:
    suite.case(_exp.name)(_make_case(_exp))


@suite.case("XEP-0368 direct TLS: ALPN xmpp-client, certificate valid for the domain")
async def direct_tls(ctx):
    tls = ssl.create_default_context(cafile=ctx.cafile)
    tls.set_alpn_protocols(["xmpp-client"])
    loop = asyncio.get_running_loop()

    def handshake():
        with socket.create_connection((ctx.host, ctx.tls_port), timeout=5) as raw:
            with tls.wrap_socket(raw, server_hostname=ctx.domain) as s:
                return s.selected_alpn_protocol(), s.version()
    try:
        alpn, version = await loop.run_in_executor(None, handshake)
    except (OSError, ssl.SSLError) as e:
        raise Fail(f"direct TLS handshake with {ctx.domain} failed: {e}")
    if alpn != "xmpp-client":
        raise Fail(f"ALPN negotiated {alpn!r}, want 'xmpp-client'")
    if version not in ("TLSv1.2", "TLSv1.3"):
        raise Fail(f"TLS version {version}")


@suite.case("XEP-0313 MUC archive (a new room advertises urn:xmpp:mam:2)")
async def muc_mam(ctx):
    from harness.slix import Client
    from suites.slixmpp_suite import _create_room
    service = ctx.features.service_with("http://jabber.org/protocol/muc")
    complete, listed = xeps_claims(ctx.repo_root)
    claimed = "XEP-0045" in complete and ("XEP-0313" in complete or "urn:xmpp:mam:2" in listed)
    if not service:
        msg = "no MUC service to create a room on; needed by Conversations, Gajim (groups lose messages around reconnects)"
        if claimed:
            raise Fail(msg)
        raise Miss(msg)
    c = Client(ctx, ctx.new_account("compliance"), plugins=("xep_0030", "xep_0045"))
    await c.online()
    try:
        room = f"compliance-{secrets.token_hex(4)}@{service}"
        await _create_room(c, room, "tester")
        info = await c.plugin["xep_0030"].get_info(jid=room, cached=False, timeout=10)
        feats = info["disco_info"]["features"]
        if "urn:xmpp:mam:2" not in feats:
            msg = f"room features lack urn:xmpp:mam:2: {sorted(feats)}; needed by Conversations, Gajim"
            if claimed:
                raise Fail(msg)
            raise Miss(msg)
    finally:
        await c.close()


if __name__ == "__main__":
    suite.main()
