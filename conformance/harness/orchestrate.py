"""Run every conformance suite against a real Starling, once per backend.

For each storage backend (SQLite, then PostgreSQL in a database of its own):
write a throwaway config and data directory, start `starling serve` on
loopback ports, probe what it advertises, run each suite as a subprocess with
a time limit, stop the server (checking that it shuts down cleanly and never
panicked) and drop the database. Then print the results table and write
`results.json`, `results.md` and `junit.xml` into the output directory.

Every process started here is recorded in `<out>/pids` (one PID per line) so
that `conformance/run` can stop it even if this program is killed.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent  # conformance/
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

# Every module in suites/ is a suite; these run first, in this order.
SUITE_ORDER = ["slixmpp_suite", "nbxmpp_suite", "sendxmpp_suite", "compliance", "peer_prosody",
               "peer_ejabberd"]
_found = sorted(p.stem for p in (HERE / "suites").glob("*.py") if not p.stem.startswith("_"))
SUITES = [s for s in SUITE_ORDER if s in _found] + [s for s in _found if s not in SUITE_ORDER]
SUITE_TIMEOUT = float(os.environ.get("CONFORMANCE_SUITE_TIMEOUT", "240"))
DEFAULT_PG = "postgres://postgres@127.0.0.1:5432/test"
DOMAIN = "localhost"


def log(msg: str) -> None:
    print(f"[conformance] {msg}", flush=True)


class Run:
    def __init__(self, out: Path, binary: Path, pidfile: Path):
        self.out = out
        self.binary = binary
        self.rows: list[dict] = []
        self.pidfile = pidfile
        self.children: list[subprocess.Popen] = []

    # --- process bookkeeping -----------------------------------------------

    def spawn(self, args: list[str], **kw) -> subprocess.Popen:
        p = subprocess.Popen(args, start_new_session=True, **kw)
        self.children.append(p)
        with open(self.pidfile, "a") as f:
            f.write(f"{p.pid}\n")
        return p

    @staticmethod
    def stop(p: subprocess.Popen, grace: float = 10.0) -> int | None:
        """SIGTERM, then SIGKILL after `grace` seconds; returns the exit code."""
        if p.poll() is not None:
            return p.returncode
        try:
            p.send_signal(signal.SIGTERM)
            return p.wait(grace)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(5)
            return None

    def stop_all(self) -> None:
        for p in self.children:
            if p.poll() is None:
                self.stop(p, 5)

    def row(self, suite: str, case: str, backend: str, status: str, detail: str = "",
            seconds: float = 0.0) -> None:
        r = {"suite": suite, "case": case, "backend": backend, "status": status,
             "detail": detail, "seconds": round(seconds, 3)}
        self.rows.append(r)
        mark = {"pass": "ok  ", "fail": "FAIL", "skip": "skip", "miss": "miss"}[status]
        log(f"[{mark}] {suite} / {case} ({backend})" + (f": {detail}" if detail else ""))


# --- the server --------------------------------------------------------------


def free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def wait_listening(port: int, proc: subprocess.Popen, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return True
        except OSError:
            time.sleep(0.1)
    return False


def pg_admin(url: str, sql: str) -> tuple[bool, str]:
    try:
        r = subprocess.run(["psql", url, "-v", "ON_ERROR_STOP=1", "-qAtc", sql],
                           capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        return False, str(e)
    return r.returncode == 0, (r.stderr or r.stdout).strip()


def with_database(url: str, db: str) -> str:
    u = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit((u.scheme, u.netloc, "/" + db, u.query, u.fragment))


def write_config(path: Path, work: Path, ports: list[int], db_url: str) -> None:
    path.write_text(f"""# Throwaway configuration written by conformance/run.
[server]
domains = ["{DOMAIN}"]
data_dir = "{work / 'data'}"
shutdown_grace_secs = 3

[c2s]
starttls = ["127.0.0.1:{ports[0]}"]
direct_tls = ["127.0.0.1:{ports[1]}"]

[tls]
cert_dir = "{work / 'certs'}"

[s2s]
# Federation listener on loopback only, on a port of its own (the default,
# 0.0.0.0:5269, could collide with another server on this machine).
listen = ["127.0.0.1:{ports[2]}"]

[database]
url = "{db_url}"

[auth]
# Cases log in with wrong passwords on purpose; keep throttling out of the way
# of the cases that follow.
max_failures = 50
""")


def run_backend(run: Run, backend: str, suites: list[str], versions: dict) -> None:
    work = run.out / "work" / backend
    shutil.rmtree(work, ignore_errors=True)
    (work / "data").mkdir(parents=True)
    pg_db = None
    admin_url = os.environ.get("STARLING_TEST_DATABASE_URL") or DEFAULT_PG
    if backend == "sqlite":
        db_url = f"sqlite://{work / 'data' / 'starling.db'}"
    else:
        pg_db = f"starling_conformance_{os.getpid()}_{secrets.token_hex(3)}"
        ok, err = pg_admin(admin_url, f"CREATE DATABASE {pg_db}")
        if not ok:
            strict = os.environ.get("CI") or os.environ.get("STARLING_TEST_DATABASE_URL")
            run.row("server", "PostgreSQL database for the run", backend,
                    "fail" if strict else "skip", f"cannot create a database at {admin_url}: {err}")
            return
        db_url = with_database(admin_url, pg_db)
    ports = free_ports(3)  # c2s STARTTLS, c2s direct TLS, s2s
    cfg = work / "starling.toml"
    write_config(cfg, work, ports, db_url)
    server_log = work / "server.log"
    env = dict(os.environ, NO_COLOR="1", RUST_LOG=os.environ.get("CONFORMANCE_RUST_LOG", "info"))
    t0 = time.monotonic()
    with open(server_log, "w") as logf:
        server = run.spawn([str(run.binary), "--config", str(cfg), "serve"],
                           stdout=logf, stderr=subprocess.STDOUT, env=env, cwd=work)
    try:
        up = wait_listening(ports[0], server, 30) and wait_listening(ports[1], server, 5)
        if not up:
            run.row("server", "starts and listens", backend, "fail",
                    f"not listening on {ports} after 30s; see {server_log}")
            return
        run.row("server", "starts and listens", backend, "pass", "", time.monotonic() - t0)
        context = {
            "backend": backend, "host": "127.0.0.1", "domain": DOMAIN,
            "starttls_port": ports[0], "tls_port": ports[1],
            "binary": str(run.binary), "config": str(cfg),
            "cafile": str(work / "certs" / f"{DOMAIN}.crt"),
            "results": str(work / "results.jsonl"),
            "work_dir": str(work), "repo_root": str(ROOT),
            "pidfile": str(run.pidfile), "versions": versions,
        }
        probe_and_run(run, backend, work, context, suites)
    finally:
        code = run.stop(server, 15)
        text = server_log.read_text(errors="replace") if server_log.exists() else ""
        if any(r["status"] == "fail" and r["backend"] == backend for r in run.rows):
            warn = [line for line in text.splitlines() if " WARN " in line or " ERROR " in line][-20:]
            if warn:
                log(f"warnings and errors in {server_log} (last {len(warn)}):")
                print("\n".join("    " + line for line in warn), flush=True)
        if "panicked" in text:
            line = next(l for l in text.splitlines() if "panicked" in l)
            run.row("server", "never panicked", backend, "fail", line.strip()[:300])
        else:
            run.row("server", "never panicked", backend, "pass")
        run.row("server", "clean shutdown on SIGTERM", backend,
                "pass" if code == 0 else "fail",
                "" if code == 0 else f"exit status {code} (None: killed after 15s)")
        if pg_db:
            ok, err = pg_admin(admin_url, f"DROP DATABASE IF EXISTS {pg_db} WITH (FORCE)")
            if not ok:
                log(f"could not drop database {pg_db}: {err}")


def probe_and_run(run: Run, backend: str, work: Path, context: dict, suites: list[str]) -> None:
    """Probe what the server advertises, then run every suite against it."""
    ctx_path = work / "context.json"
    ctx_path.write_text(json.dumps(context, indent=2))
    env = dict(os.environ, CONFORMANCE_CONTEXT=str(ctx_path), PYTHONPATH=str(HERE),
               PYTHONDONTWRITEBYTECODE="1")
    features_path = work / "features.json"
    t1 = time.monotonic()
    p = run.spawn([sys.executable, "-m", "harness.probe", str(features_path)],
                  cwd=HERE, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = p.communicate(timeout=90)
    except subprocess.TimeoutExpired:
        run.stop(p)
        out = "timed out after 90s"
    if p.returncode == 0 and features_path.exists():
        context["features"] = json.loads(features_path.read_text())
        run.row("probe", "login and service discovery", backend, "pass", "", time.monotonic() - t1)
    else:
        context["features"] = {}
        lines = (out or "").strip().splitlines()
        run.row("probe", "login and service discovery", backend, "fail",
                lines[-1] if lines else f"probe exited with {p.returncode}")
    ctx_path.write_text(json.dumps(context, indent=2))
    for suite in suites:
        run_suite(run, suite, backend, work, env)


def run_prosody_target(run: Run, suites: list[str], versions: dict) -> None:
    """Developer check: the client suites against Prosody instead of Starling."""
    from harness.prosody import Prosody
    work = run.out / "work" / "prosody"
    shutil.rmtree(work, ignore_errors=True)
    c2s, s2s, tls = free_ports(3)
    prosody = Prosody(work, DOMAIN, c2s_port=c2s, s2s_port=s2s, direct_tls_port=tls)
    try:
        prosody.start(run.spawn)
        run.row("server", "starts and listens", "prosody", "pass")
        context = {
            "backend": "prosody", "host": "127.0.0.1", "domain": DOMAIN,
            "starttls_port": c2s, "tls_port": tls, "binary": "", "config": str(prosody.config),
            "cafile": str(prosody.cafile), "results": str(work / "results.jsonl"),
            "work_dir": str(work), "repo_root": str(ROOT), "pidfile": str(run.pidfile),
            "versions": versions, "add_user": prosody.add_user_command(), "target": "prosody",
        }
        probe_and_run(run, "prosody", work, context, suites)
    except RuntimeError as e:
        run.row("server", "starts and listens", "prosody", "fail", str(e))
    finally:
        prosody.stop()


def run_suite(run: Run, suite: str, backend: str, work: Path, env: dict) -> None:
    results = work / "results.jsonl"
    before = _read_rows(results)
    log(f"suite {suite} on {backend}")
    stderr_path = work / f"{suite}.stderr"
    t0 = time.monotonic()
    with open(stderr_path, "w") as errf:
        p = run.spawn([sys.executable, "-m", f"suites.{suite}"], cwd=HERE, env=env,
                      stdout=subprocess.DEVNULL if os.environ.get("CONFORMANCE_QUIET") else None,
                      stderr=errf)
        try:
            p.wait(SUITE_TIMEOUT)
            timed_out = False
        except subprocess.TimeoutExpired:
            timed_out = True
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait(5)
    rows = _read_rows(results)[len(before):]
    run.rows.extend(rows)
    if timed_out or p.returncode != 0:
        # CI keeps only stdout: show what the suite said about its failures.
        tail = stderr_path.read_text(errors="replace").strip().splitlines()[-25:]
        if tail:
            log(f"last lines of {stderr_path.name}:")
            print("\n".join("    " + line for line in tail), flush=True)
    if timed_out:
        run.row(suite, "(suite time limit)", backend, "fail",
                f"killed after {SUITE_TIMEOUT:.0f}s; see {stderr_path}", time.monotonic() - t0)
    elif p.returncode != 0 and not any(r["status"] == "fail" for r in rows):
        tail = stderr_path.read_text(errors="replace").strip().splitlines()[-1:]
        run.row(suite, "(suite crashed)", backend, "fail",
                f"exit status {p.returncode}: {tail[0] if tail else ''}")


def _read_rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# --- reports -------------------------------------------------------------------


STATUS_TEXT = {"pass": "pass", "fail": "FAIL", "skip": "skip", "miss": "miss"}


def table(rows: list[dict], backends: list[str], markdown: bool) -> str:
    keys: list[tuple[str, str]] = []
    cells: dict[tuple[str, str], dict[str, str]] = {}
    for r in rows:
        k = (r["suite"], r["case"])
        if k not in cells:
            keys.append(k)
            cells[k] = {}
        cells[k][r["backend"]] = STATUS_TEXT[r["status"]]
    head = ["suite", "case"] + backends
    body = [[s, c] + [cells[(s, c)].get(b, "-") for b in backends] for s, c in keys]
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
        lines += ["| " + " | ".join(x.replace("|", "\\|") for x in row) + " |" for row in body]
        return "\n".join(lines)
    widths = [max(len(x[i]) for x in [head] + body) for i in range(len(head))]
    fmt = "  ".join("{:<%d}" % w for w in widths)
    lines = [fmt.format(*head), fmt.format(*["-" * w for w in widths])]
    lines += [fmt.format(*row) for row in body]
    return "\n".join(lines)


def notes(rows: list[dict]) -> str:
    """Details of everything that did not pass, grouped."""
    out = []
    for status, title in [("fail", "Failures"), ("miss", "Client expectations not met (informational)"),
                          ("skip", "Skipped")]:
        seen = {}
        for r in rows:
            if r["status"] == status:
                key = (r["suite"], r["case"], r["detail"])
                seen.setdefault(key, []).append(r["backend"])
        if seen:
            out.append(f"{title}:")
            for (s, c, d), bs in seen.items():
                out.append(f"  - {s} / {c} [{', '.join(bs)}]: {d}")
    return "\n".join(out)


def junit(rows: list[dict]) -> str:
    from xml.sax.saxutils import escape, quoteattr
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["suite"], r["backend"]), []).append(r)
    parts = ['<?xml version="1.0" encoding="UTF-8"?>', "<testsuites name=\"starling-conformance\">"]
    for (suite, backend), rs in groups.items():
        fails = sum(r["status"] == "fail" for r in rs)
        skips = sum(r["status"] in ("skip", "miss") for r in rs)
        t = sum(r["seconds"] for r in rs)
        parts.append(f"  <testsuite name={quoteattr(f'{suite} ({backend})')} tests=\"{len(rs)}\" "
                     f"failures=\"{fails}\" errors=\"0\" skipped=\"{skips}\" time=\"{t:.3f}\">")
        for r in rs:
            parts.append(f"    <testcase classname={quoteattr(f'conformance.{suite}.{backend}')} "
                         f"name={quoteattr(r['case'])} time=\"{r['seconds']:.3f}\">")
            if r["status"] == "fail":
                parts.append(f"      <failure message={quoteattr(r['detail'][:500])}>"
                             f"{escape(r['detail'])}</failure>")
            elif r["status"] == "skip":
                parts.append(f"      <skipped message={quoteattr(r['detail'][:500])}/>")
            elif r["status"] == "miss":
                parts.append(f"      <skipped message={quoteattr('informational, not claimed: ' + r['detail'][:480])}/>")
            parts.append("    </testcase>")
        parts.append("  </testsuite>")
    parts.append("</testsuites>")
    return "\n".join(parts) + "\n"


def update_readme(md: str, versions: dict) -> None:
    readme = ROOT / "README.md"
    text = readme.read_text()
    start = text.index("<!-- conformance-table:start")
    start = text.index("\n", start) + 1
    end = text.index("<!-- conformance-table:end -->")
    used = ", ".join(f"{k} {v}" for k, v in versions.items())
    readme.write_text(text[:start] + md + f"\n\nWith {used}.\n" + text[end:])
    log(f"updated the table in {readme}")


def tool_versions() -> dict:
    v = {}
    try:
        import slixmpp
        v["slixmpp"] = slixmpp.__version__
    except Exception:
        pass
    try:
        from importlib.metadata import version
        v["nbxmpp"] = version("nbxmpp")
    except Exception:
        pass
    for name, cmd in [("go-sendxmpp", ["dpkg-query", "-W", "-f=${Version}", "go-sendxmpp"]),
                      ("prosody", ["dpkg-query", "-W", "-f=${Version}", "prosody"]),
                      ("ejabberd", ["dpkg-query", "-W", "-f=${Version}", "ejabberd"]),
                      ("dnsmasq", ["dpkg-query", "-W", "-f=${Version}", "dnsmasq-base"])]:
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
            if r.returncode == 0 and r.stdout:
                v[name] = r.stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            pass
    return v


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--binary", required=True, type=Path)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--pidfile", type=Path, help="append the PID of every process started here")
    ap.add_argument("--backends", default=os.environ.get("CONFORMANCE_BACKENDS", "sqlite,postgresql"))
    ap.add_argument("--suites", default=os.environ.get("CONFORMANCE_SUITES", ",".join(SUITES)))
    ap.add_argument("--update-readme", action="store_true",
                    help="replace the results table in README.md (section Compatibility)")
    ap.add_argument("--target", default="starling", choices=["starling", "prosody"],
                    help="prosody: run the client suites against Prosody (to check the cases)")
    args = ap.parse_args()
    out: Path = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    for f in ["results.json", "results.md", "junit.xml"]:
        (out / f).unlink(missing_ok=True)
    run = Run(out, args.binary.resolve(), (args.pidfile or out / "pids").resolve())

    def on_signal(signum, _frame):
        log(f"signal {signum}: stopping everything started")
        run.stop_all()
        sys.exit(128 + signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    backends = [b for b in args.backends.split(",") if b]
    suites = [s for s in args.suites.split(",") if s]
    versions = tool_versions()
    log("clients and peers: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    started = time.time()
    try:
        if args.target == "prosody":
            backends = ["prosody"]
            run_prosody_target(run, suites, versions)
        else:
            for backend in backends:
                log(f"=== backend {backend}")
                run_backend(run, backend, suites, versions)
    finally:
        run.stop_all()
    duration = time.time() - started
    counts = {s: sum(r["status"] == s for r in run.rows) for s in ["pass", "fail", "skip", "miss"]}
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True).stdout.strip()
    report = {
        "commit": commit, "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "seconds": round(duration, 1), "backends": backends, "versions": versions,
        "counts": counts, "results": run.rows,
    }
    (out / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "junit.xml").write_text(junit(run.rows))
    md = table(run.rows, backends, markdown=True)
    (out / "results.md").write_text(md + "\n")
    print()
    print(table(run.rows, backends, markdown=False))
    print()
    n = notes(run.rows)
    if n:
        print(n)
        print()
    print(f"Clients and peers: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    print(f"Results: {out / 'results.json'}, {out / 'junit.xml'}, {out / 'results.md'} "
          f"({duration:.0f}s, commit {commit})")
    if args.update_readme:
        update_readme(md, versions)
    print(f"{counts['miss']} informational rows (client expectations not claimed yet)")
    print(f"conformance: {counts['pass']} passed, {counts['fail']} failed, {counts['skip']} skipped")
    return 1 if counts["fail"] else 0


if __name__ == "__main__":
    sys.exit(main())
