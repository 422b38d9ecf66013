"""What every conformance suite is made of: cases, requirements, results.

A suite is a Python module under `conformance/suites/` that builds a `Suite`,
declares cases with `@suite.case(...)` and calls `suite.main()`. The
orchestrator (`harness/orchestrate.py`) runs it as a subprocess, once per
storage backend, with the environment variable CONFORMANCE_CONTEXT naming a
JSON file that describes the running Starling (see `Context`). Each case's
outcome is appended to the results file as one JSON line as soon as it is
known, so a suite killed by its time limit still reports what it finished.

A case:

    @suite.case("carbons: copy of a sent message",
                requires=[server_feature("urn:xmpp:carbons:2")])
    async def carbons_sent(ctx):
        ...
        check(got == want, f"got {got!r}")

- async functions run in a fresh asyncio loop each; plain functions are
  called as they are (a GLib-based client runs its own loop);
- `requires` lists what the server must advertise (disco#info of the server
  or of an account, a stream feature after authentication, or a service in
  disco#items): when the server does not advertise it the case is reported
  `skip` with the reason, so cases for features still being built can be
  written ahead and start counting the day the feature lands;
- raise `Skip(reason)` inside a case for conditions only known at run time,
  `Fail(reason)` or `check(cond, reason)` for failures; any other exception
  or a timeout is a failure too.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import os
import secrets
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable

PASS, FAIL, SKIP, MISS = "pass", "fail", "skip", "miss"
# `miss` is informational: a client expectation the server does not meet
# and does not claim to meet. It never fails the run.


class Skip(Exception):
    """The case cannot run here (feature not advertised, tool missing)."""


class Fail(AssertionError):
    """The case ran and the server did not behave as it should."""


class Miss(Exception):
    """Informational: a client expectation that is not met (not a failure)."""


def check(cond: Any, reason: str) -> None:
    if not cond:
        raise Fail(reason)


# --- what the server advertises ------------------------------------------


@dataclass
class Features:
    """What the server advertised to a logged-in client (from the probe)."""

    server: set[str] = field(default_factory=set)
    account: set[str] = field(default_factory=set)
    server_identities: list[dict] = field(default_factory=list)
    account_identities: list[dict] = field(default_factory=list)
    server_forms: list[dict] = field(default_factory=list)
    # Children of <stream:features> as "{namespace}name", per negotiation
    # step: [before TLS, after TLS, after SASL].
    stream_steps: list[list[str]] = field(default_factory=list)
    # disco#items of the server: jid -> {"features": [...], "identities": [...]}
    services: dict[str, dict] = field(default_factory=dict)
    sasl_mechanisms: list[str] = field(default_factory=list)
    # IQ namespaces that answered a plain `get` with a result (e.g. the
    # roster, which servers do not list in disco#info).
    works: set[str] = field(default_factory=set)

    @classmethod
    def from_json(cls, d: dict) -> "Features":
        return cls(
            server=set(d.get("server", [])),
            account=set(d.get("account", [])),
            server_identities=d.get("server_identities", []),
            account_identities=d.get("account_identities", []),
            server_forms=d.get("server_forms", []),
            stream_steps=d.get("stream_steps", []),
            services=d.get("services", {}),
            sasl_mechanisms=d.get("sasl_mechanisms", []),
            works=set(d.get("works", [])),
        )

    @property
    def stream(self) -> set[str]:
        """Stream features after authentication, as "{ns}name"."""
        return set(self.stream_steps[-1]) if self.stream_steps else set()

    def stream_has(self, ns: str, name: str | None = None) -> bool:
        for tag in self.stream:
            t_ns, _, t_name = tag[1:].partition("}")
            if t_ns == ns and (name is None or t_name == name):
                return True
        return False

    def service_with(self, feature: str) -> str | None:
        """The first disco item of the server that advertises `feature`."""
        for jid, info in sorted(self.services.items()):
            if feature in info.get("features", []):
                return jid
        return None


@dataclass
class Requirement:
    what: str
    test: Callable[[Features], bool]

    def met(self, f: Features) -> bool:
        return self.test(f)


def server_feature(ns: str) -> Requirement:
    return Requirement(f"server disco#info feature {ns}", lambda f: ns in f.server)


def account_feature(ns: str) -> Requirement:
    return Requirement(f"account disco#info feature {ns}", lambda f: ns in f.account)


def stream_feature(ns: str, name: str | None = None) -> Requirement:
    label = f"{{{ns}}}{name}" if name else ns
    return Requirement(f"stream feature {label}", lambda f: f.stream_has(ns, name))


def service(feature: str) -> Requirement:
    return Requirement(
        f"a service in disco#items with {feature}",
        lambda f: f.service_with(feature) is not None,
    )


def answers(ns: str) -> Requirement:
    return Requirement(f"an answer to an IQ get in {ns}", lambda f: ns in f.works)


def any_of(*reqs: Requirement) -> Requirement:
    return Requirement(
        " or ".join(r.what for r in reqs), lambda f: any(r.met(f) for r in reqs)
    )


# --- the server under test ---------------------------------------------------


@dataclass
class Account:
    jid: str  # bare JID
    password: str

    @property
    def user(self) -> str:
        return self.jid.split("@", 1)[0]


class Context:
    """The running Starling a suite talks to, read from CONFORMANCE_CONTEXT."""

    def __init__(self, d: dict):
        self.raw = d
        self.backend: str = d["backend"]
        self.host: str = d["host"]
        self.domain: str = d["domain"]
        self.starttls_port: int = d["starttls_port"]
        self.tls_port: int = d["tls_port"]
        self.binary: str = d["binary"]
        self.config_path: str = d["config"]
        self.cafile: str = d["cafile"]
        self.results_path: str = d["results"]
        self.work_dir: str = d["work_dir"]
        self.repo_root: str = d["repo_root"]
        self.features = Features.from_json(d.get("features", {}))
        self.peers: dict = d.get("peers", {})
        self._n = 0

    @classmethod
    def load(cls) -> "Context":
        path = os.environ.get("CONFORMANCE_CONTEXT")
        if not path:
            sys.exit("CONFORMANCE_CONTEXT is not set: run suites through conformance/run")
        with open(path) as f:
            return cls(json.load(f))

    def new_account(self, hint: str = "u") -> Account:
        """A fresh account, created with the `starling user add` CLI."""
        self._n += 1
        user = f"{hint}-{self._n}-{secrets.token_hex(3)}".lower()
        password = "pw-" + secrets.token_urlsafe(12)
        jid = f"{user}@{self.domain}"
        # The server's own account command: `starling user add` for Starling
        # (a prosodyctl line when the suites are pointed at Prosody).
        template = self.raw.get("add_user") or [
            self.binary, "--config", self.config_path, "user", "add", "{jid}",
            "--password", "{password}"]
        cmd = [a.format(jid=jid, user=user, domain=self.domain, password=password)
               for a in template]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
        if r.returncode != 0:
            raise Fail(f"creating {jid} with {cmd[0]} failed: {(r.stderr or r.stdout).strip()}")
        return Account(jid, password)

    def accounts(self, n: int, hint: str = "u") -> list[Account]:
        return [self.new_account(hint) for _ in range(n)]


# --- running cases ------------------------------------------------------------


@dataclass
class Case:
    name: str
    fn: Callable
    requires: list[Requirement]
    timeout: float


class Suite:
    def __init__(self, name: str, description: str = ""):
        self.name = name
        self.description = description
        self.cases: list[Case] = []
        # Called once before the cases; may raise Skip for the whole suite
        # (e.g. a client tool that is not installed).
        self.precondition: Callable[[Context], None] | None = None

    def case(self, name: str, requires: list[Requirement] | None = None,
             timeout: float = 20.0):
        def deco(fn: Callable) -> Callable:
            self.cases.append(Case(name, fn, list(requires or []), timeout))
            return fn
        return deco

    def _record(self, ctx: Context, case: str, status: str, detail: str,
                seconds: float) -> None:
        row = {
            "suite": self.name, "case": case, "backend": ctx.backend,
            "status": status, "detail": detail, "seconds": round(seconds, 3),
        }
        with open(ctx.results_path, "a") as f:
            f.write(json.dumps(row) + "\n")
        mark = {PASS: "ok  ", FAIL: "FAIL", SKIP: "skip", MISS: "miss"}[status]
        print(f"  [{mark}] {self.name} / {case} ({ctx.backend}, {seconds:.1f}s)"
              + (f": {detail}" if detail else ""), flush=True)

    def run_case(self, ctx: Context, case: Case) -> str:
        missing = [r.what for r in case.requires if not r.met(ctx.features)]
        if missing:
            self._record(ctx, case.name, SKIP,
                         "server does not advertise " + "; ".join(missing), 0.0)
            return SKIP
        t0 = time.monotonic()
        try:
            if inspect.iscoroutinefunction(case.fn):
                asyncio.run(asyncio.wait_for(case.fn(ctx), case.timeout))
            else:
                case.fn(ctx)
            status, detail = PASS, ""
        except Skip as e:
            status, detail = SKIP, str(e)
        except Miss as e:
            status, detail = MISS, str(e)
        except (asyncio.TimeoutError, TimeoutError) as e:
            status, detail = FAIL, f"timed out after {case.timeout:.0f}s {e}".strip()
        except Fail as e:
            status, detail = FAIL, str(e)
        except Exception as e:  # any crash of a case is a failure of it
            tb = traceback.format_exc(limit=4)
            status, detail = FAIL, f"{type(e).__name__}: {e}"
            print(tb, file=sys.stderr)
        self._record(ctx, case.name, status, detail, time.monotonic() - t0)
        return status

    def main(self) -> None:
        ctx = Context.load()
        only = os.environ.get("CONFORMANCE_CASES")  # substring filter, for local runs
        if self.precondition:
            try:
                self.precondition(ctx)
            except Skip as e:
                for c in self.cases:
                    self._record(ctx, c.name, SKIP, str(e), 0.0)
                return
        failed = 0
        for c in self.cases:
            if only and only not in c.name:
                continue
            if self.run_case(ctx, c) == FAIL:
                failed += 1
        sys.exit(1 if failed else 0)
