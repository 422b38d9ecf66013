"""Federation with ejabberd (Debian, 23.01).

Starling on starling.test and ejabberd on ejabberd.test, each on its own
loopback address, found through real SRV records served by dnsmasq, with
certificates from a test CA made for the run (harness/federation.py);
ejabberd runs as a private, non-distributed Erlang VM in its own mount
namespace (harness/ejabberd.py). Cases both ways: chat, presence
subscriptions, rooms on either server, errors, offline delivery; once with
the CA trusted (SASL EXTERNAL), once with every server trusting another CA
(dialback), and once with an xmppAddr SAN in Starling's certificate, on
which ejabberd 23.01 drops the stream during EXTERNAL (Starling retries with
dialback).
"""

from __future__ import annotations

import atexit

from harness import ejabberd, federation_cases
from harness.suite import Skip, Suite, check

suite = Suite("peer-ejabberd", "ejabberd 23.01 (Debian) as a federated server")


def _precondition(ctx) -> None:
    if not ejabberd.available():
        raise Skip("ejabberd is not installed (Debian package ejabberd)")


suite.precondition = _precondition

federation_cases.register(suite, "ejabberd", ["external", "dialback", "xmppaddr"])


@suite.case("federation: every server stopped cleanly, Starling never panicked", timeout=60)
def federation_shutdown(ctx):
    if ctx.backend != "sqlite":
        raise Skip("federation runs on the sqlite pass")
    problems = federation_cases.stop_all()
    check(not problems, "; ".join(problems))


atexit.register(federation_cases.stop_all)


if __name__ == "__main__":
    suite.main()
