"""Ask a running Starling what it advertises, the way clients find out.

Logs in with slixmpp over STARTTLS and records: the stream features of every
negotiation step, the SASL mechanisms, disco#info of the server and of the
account, disco#items of the server with disco#info of each item, and which
unlisted IQ namespaces (the roster) answer. Suites use this to decide which
cases apply (`requires=`); the compliance suite compares it with what clients
expect.

Run by the orchestrator: `python -m harness.probe` with CONFORMANCE_CONTEXT
set; writes JSON to the path given as the first argument.
"""

from __future__ import annotations

import asyncio
import json
import sys

from slixmpp.exceptions import IqError, IqTimeout

from harness.slix import Client
from harness.suite import Context


def _identities(info) -> list[dict]:
    out = []
    for ident in info["disco_info"]["identities"]:
        category, itype, _lang, name = ident
        out.append({"category": category, "type": itype, "name": name})
    return out


def _forms(info) -> list[dict]:
    forms = []
    for form in info["disco_info"].xml.findall("{jabber:x:data}x"):
        fields = {}
        for fld in form.findall("{jabber:x:data}field"):
            values = [v.text or "" for v in fld.findall("{jabber:x:data}value")]
            fields[fld.get("var", "")] = values
        forms.append(fields)
    return forms


async def probe(ctx: Context) -> dict:
    account = ctx.new_account("probe")
    c = Client(ctx, account, resource="probe")
    await c.login()
    disco = c.plugin["xep_0030"]
    try:
        server = await disco.get_info(jid=ctx.domain, timeout=10, cached=False)
        acct = await disco.get_info(jid=account.jid, timeout=10, cached=False)
        items = await disco.get_items(jid=ctx.domain, timeout=10)
        services = {}
        for jid, _node, _name in items["disco_items"]["items"]:
            try:
                info = await disco.get_info(jid=jid, timeout=10, cached=False)
                services[str(jid)] = {
                    "features": sorted(info["disco_info"]["features"]),
                    "identities": _identities(info),
                }
            except (IqError, IqTimeout) as e:
                services[str(jid)] = {"features": [], "identities": [], "error": str(e)}
        works = []
        for ns, payload in [("jabber:iq:roster", "query")]:
            iq = c.make_iq_get(queryxmlns=ns, ito=None)
            try:
                await iq.send(timeout=10)
                works.append(ns)
            except IqError:
                pass
        return {
            "server": sorted(server["disco_info"]["features"]),
            "account": sorted(acct["disco_info"]["features"]),
            "server_identities": _identities(server),
            "account_identities": _identities(acct),
            "server_forms": _forms(server),
            "stream_steps": c.stream_steps,
            "sasl_mechanisms": c.sasl_offered,
            "services": services,
            "works": works,
        }
    finally:
        await c.close()


def main() -> None:
    ctx = Context.load()
    result = asyncio.run(asyncio.wait_for(probe(ctx), 60))
    with open(sys.argv[1], "w") as f:
        json.dump(result, f, indent=2, sort_keys=True)


if __name__ == "__main__":
    main()
