"""Benchmark how get, list, feed and create change as the database grows.

Run from anywhere with the project's virtual environment (stdlib only):

    .venv/bin/python bench/growth.py [--sizes 2000,20000,200000,1000000] [--duration 10]

Two layouts, each in its own fresh SQLite file under /tmp, grown size by size
with ``seeddb`` (so the largest size is seeded once per layout):

- many: 2,000 recordings per clinician (clin0001, clin0002, ...); the measured
  clinician owns 2,000;
- one: the measured clinician ("bigclin") owns 100,000 (or all of them below
  that) and 2,000-recording clinicians hold the rest.

At each size: uvicorn started on the file, a login as the measured clinician,
then wrk for ``--duration`` seconds per scenario (get, list, list deep, feed
from the middle and from 0, create), the server stopped with SIGTERM. Prints a
markdown table and writes ``growth.md`` and ``growth.json`` to ``--out``.
A figure, never an assertion on time.
"""

from __future__ import annotations

import argparse
import datetime as dt
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LUA_DIR = Path(__file__).resolve().parent / "lua"
PASSWORD = "growth-pass-123-not-secret"
PER_CLINICIAN, BIG = 2_000, 100_000
MEASURED = {"many": "clin0001", "one": "bigclin"}
PORTS = range(8300, 8400)
WRK_TIMEOUT_S = 10

# A fixed GET (its path is script argument 1); counting and BENCH_JSON come from common.lua.
PATH_LUA = f"""dofile("{LUA_DIR / "common.lua"}")
local req
function init(args)
   common_init(args, false)
   req = wrk.format("GET", args[1], get_headers)
end
function request() return req end
"""

# One Django process per step: seeddb through call_command, because hundreds of
# clinicians at 1,000,000 rows would otherwise pay Django's start-up hundreds of times.
STEP_CODE = """
import io, json, os, time
from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.db.models import Count
from clinical.chain import seal
from clinical.models import AuditEvent
from recordings.models import Recording

plan = json.load(open(os.environ["GROWTH_PLAN"]))
users = get_user_model().objects
# The last create cell's rows (create.lua's audio paths) go, so that the layout stays exact.
mine = Recording.objects.filter(owner__username=plan["measured"])
dropped = mine.filter(audio_path__startswith="audio/bench/").delete()[0]
if not users.filter(username=plan["measured"]).exists():
    users.create_user(plan["measured"], password=plan["password"])
have = dict(Recording.objects.values_list("owner__username").annotate(n=Count("pk")))
started = time.monotonic()
for name, want in plan["targets"].items():
    if want > have.get(name, 0):
        call_command("seeddb", count=want - have.get(name, 0), user=name, seed=plan["seed"], yes=True,
                     verbosity=0, stdout=io.StringIO())
seconds = time.monotonic() - started
# A running server seals new events within a second: the seeded ones are sealed
# here, or the server would seal the whole backlog while the first scenario runs.
sealing = time.monotonic()
seal()
seal_s = time.monotonic() - sealing
count = mine.count()
mid = mine.order_by("change_seq").values_list("change_seq", flat=True)[count // 2]
ids = [str(pk) for pk in mine.order_by("?").values_list("pk", flat=True)[:2000]]
open(plan["ids"], "w").write("\\n".join(ids) + "\\n")
json.dump({"seed_s": seconds, "seal_s": seal_s, "dropped": dropped, "measured_count": count, "mid_cursor": mid,
           "total": Recording.objects.count(), "audit_events": AuditEvent.objects.count()}, open(plan["out"], "w"))
"""


class BenchError(Exception):
    """An expected failure, printed as one message."""


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def targets(size: int, layout: str) -> dict[str, int]:
    """Recordings per clinician; monotone in `size`, so a layout grows by adding rows only."""
    first = min(size, BIG if layout == "one" else PER_CLINICIAN)
    counts, rest, k = {MEASURED[layout]: first}, size - first, 1
    while rest > 0:
        name = f"clin{k:04d}"
        k += 1
        if name not in counts:
            counts[name] = min(PER_CLINICIAN, rest)
            rest -= counts[name]
    return counts


def env_for(db: Path) -> dict[str, str]:
    env = dict(os.environ, CLINICAL_DB_PATH=str(db), DJANGO_SECRET_KEY="bench-only-secret", DJANGO_DEBUG="0")
    for name in ("DATABASE_URL", "CLINICAL_REPLICA_URL"):  # always the fresh SQLite file, nothing else
        env.pop(name, None)
    return env


def manage(db: Path, *argv: str, extra_env: dict | None = None) -> None:
    result = subprocess.run([sys.executable, "manage.py", *argv], cwd=REPO, env={**env_for(db), **(extra_env or {})},
                            capture_output=True, text=True, check=False)  # fmt: skip
    if result.returncode != 0:
        raise BenchError(f"manage.py {argv[0]} failed:\n{(result.stderr or result.stdout)[-2000:]}")


def grow(work: Path, db: Path, layout: str, size: int, step: int) -> dict:
    """Seed `db` up to `size` in `layout`; the measured clinician's ids go to work/ids.txt."""
    plan = {"targets": targets(size, layout), "measured": MEASURED[layout], "password": PASSWORD,
            "seed": step, "ids": str(work / "ids.txt"), "out": str(work / "step.json")}  # fmt: skip
    (work / "plan.json").write_text(json.dumps(plan))
    manage(db, "shell", "-v", "0", "-c", STEP_CODE, extra_env={"GROWTH_PLAN": str(work / "plan.json")})
    info = json.loads((work / "step.json").read_text())
    info["db_mb"] = sum(p.stat().st_size for p in db.parent.glob(db.name + "*")) / 1e6  # with -wal
    log(
        f"{layout} {size:,}: seeded in {info['seed_s']:.1f} s, sealed in {info['seal_s']:.1f} s; "
        f"{info['total']:,} rows, {info['measured_count']:,} measured, {info['audit_events']:,} audit events, "
        f"{info['db_mb']:.0f} MB"
    )
    return info


# ---------------------------------------------------------------- server and wrk


def http_call(port: int, method: str, path: str, body=None, token: str | None = None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    headers = {"Content-Type": "application/json"} if body is not None else {}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    try:
        conn.request(method, path, body=json.dumps(body) if body is not None else None, headers=headers)
        response = conn.getresponse()
        return response.status, json.loads(response.read() or b"null")
    finally:
        conn.close()


def free_port() -> int:
    for port in PORTS:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) != 0:
                return port
    raise BenchError(f"no free port in {PORTS.start}-{PORTS.stop - 1}")


def start_server(db: Path, port: int, workers: int, log_path: Path) -> subprocess.Popen:
    argv = [sys.executable, "-m", "uvicorn", "clinical.asgi:application", "--host", "127.0.0.1", "--port", str(port),
            "--workers", str(workers), "--no-access-log", "--log-level", "warning"]  # fmt: skip
    with open(log_path, "a") as out:  # own session: stopped by its own PID and group, never by name
        server = subprocess.Popen(argv, cwd=REPO, env=env_for(db), stdin=subprocess.DEVNULL, stdout=out,
                                  stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and server.poll() is None:
        try:
            if http_call(port, "GET", "/api/health")[0] == 200:
                return server
        except OSError:
            pass
        time.sleep(0.1)
    stop_server(server)
    raise BenchError(f"server not healthy on port {port}; see {log_path}")


def stop_server(server: subprocess.Popen) -> None:
    # SIGTERM lets uvicorn close the database cleanly (and checkpoint the WAL).
    server.send_signal(signal.SIGTERM)
    try:
        server.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()


def run_wrk(port: int, token: str, script: Path, args: list[str], conns: int, duration: int) -> dict:
    argv = ["wrk", "-t", str(min(2, conns)), "-c", str(conns), "-d", f"{duration}s", "--latency",
            "--timeout", f"{WRK_TIMEOUT_S}s", "-s", str(script), "-H", f"Authorization: Bearer {token}",
            f"http://127.0.0.1:{port}", "--", *args]  # fmt: skip
    result = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 60, check=False)
    line = next((ln for ln in result.stdout.splitlines() if ln.startswith("BENCH_JSON ")), None)
    if result.returncode != 0 or line is None:
        raise BenchError(f"wrk failed ({result.returncode}): {(result.stderr or result.stdout)[-800:]}")
    return json.loads(line.removeprefix("BENCH_JSON "))


def measure(work: Path, db: Path, info: dict, layout: str, args: argparse.Namespace, log_path: Path) -> dict:
    """Every scenario on one server; create last, as it is the one that writes recordings."""
    port, ids = free_port(), str(work / "ids.txt")
    (work / "path.lua").write_text(PATH_LUA)
    scenarios = {
        "get": (LUA_DIR / "get.lua", [ids]),
        "list": (work / "path.lua", ["/api/recordings?limit=50&offset=0"]),
        "list_deep": (work / "path.lua", ["/api/recordings?limit=50&offset=1000"]),
        "feed_mid": (work / "path.lua", [f"/api/sync/changes?since={info['mid_cursor']}&limit=100"]),
        "feed_0": (work / "path.lua", ["/api/sync/changes?since=0&limit=100"]),  # the oldest changes
        "create": (LUA_DIR / "create.lua", []),
    }
    server = start_server(db, port, args.workers, log_path)
    try:
        status, body = http_call(port, "POST", "/api/auth/token", {"username": MEASURED[layout], "password": PASSWORD})
        if status != 201:
            raise BenchError(f"login failed: HTTP {status} {body}")
        token = body["token"]
        status, body = http_call(port, "GET", "/api/recordings?limit=1", token=token)
        if status != 200 or body["count"] != info["measured_count"]:
            raise BenchError(f"the list answered HTTP {status}, count {body.get('count')}")
        run_wrk(port, token, LUA_DIR / "get.lua", [ids], args.conns, 1)  # warm-up: gets only, no new recordings
        results = {}
        for name, (script, script_args) in scenarios.items():
            results[name] = run_wrk(port, token, script, script_args, args.conns, args.duration)
            r, latency = results[name], results[name]["latency_us"]
            log(
                f"  {name:>9}: {r['rps']:8.1f} req/s  p50 {latency['p50'] / 1000:7.2f} ms  "
                f"p99 {latency['p99'] / 1000:8.2f} ms  non-2xx {r['non2xx']}  socket {r['socket_errors']}"
            )
            if r["non2xx"] or r["socket_errors"]:
                log(f"  {name}: NOT ALL 2xx: statuses {r['statuses']}, socket errors {r['socket_errors_detail']}")
    finally:
        stop_server(server)
    return results


# ---------------------------------------------------------------- report


def ms(cell: dict, name: str) -> str:
    latency = cell["results"][name]["latency_us"]
    return f"{latency['p50'] / 1000:.2f} / {latency['p99'] / 1000:.2f}"


COLUMNS = ["size", "layout", "clinicians", "measured owns", "audit events", "DB MB", "get p50/p99 ms",
           "list p50/p99 ms", "list req/s", "list deep p50/p99 ms", "feed mid p50/p99 ms", "feed since=0 p50/p99 ms",
           "create req/s", "create p99 ms", "non-2xx + socket errors"]  # fmt: skip


def row(c: dict) -> list[str]:
    r = c["results"]
    errors = sum(v["non2xx"] + v["socket_errors"] for v in r.values())
    return [str(c["clinicians"]), f"{c['measured_count']:,}", f"{c['audit_events']:,}", f"{c['db_mb']:.0f}",
            ms(c, "get"), ms(c, "list"), f"{r['list']['rps']:.0f}", ms(c, "list_deep"), ms(c, "feed_mid"),
            ms(c, "feed_0"), f"{r['create']['rps']:.0f}", f"{r['create']['latency_us']['p99'] / 1000:.2f}",
            str(errors)]  # fmt: skip


def markdown(cells: list[dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---:|" * len(COLUMNS)]
    for c in sorted(cells, key=lambda c: (c["size"], list(MEASURED).index(c["layout"]))):
        if "skipped" in c or "error" in c:
            rest = [c.get("skipped") or "FAILED: " + c["error"][:120]] + [""] * (len(COLUMNS) - 3)
        else:
            rest = row(c)
        lines.append("| " + " | ".join([f"{c['size']:,}", c["layout"], *rest]) + " |")
    return "\n".join(lines) + "\n"


def write_out(out: Path, meta: dict, cells: list[dict]) -> None:
    # After every cell: a long run interrupted keeps what it measured.
    (out / "growth.json").write_text(json.dumps({"meta": meta, "cells": cells}, indent=2) + "\n")
    (out / "growth.md").write_text(markdown(cells))


def run_layout(layout: str, args: argparse.Namespace, out: Path, meta: dict, cells: list, seen: dict) -> None:
    work = Path(tempfile.mkdtemp(prefix=f"growth-{layout}-"))
    db = work / "clinical.db"
    try:
        manage(db, "migrate", "--noinput", "-v", "0")
        for step, size in enumerate(args.sizes, start=1):
            counts = targets(size, layout)
            shape = (size, counts[MEASURED[layout]], tuple(sorted(counts.values())))
            cell = {"size": size, "layout": layout, "clinicians": len(counts)}
            if shape in seen:  # same data, same numbers: not worth the minutes
                cell["skipped"] = f"skipped: same data as the {seen[shape]} layout at this size"
                log(f"{layout} {size:,}: {cell['skipped']}")
            else:
                seen[shape] = layout
                try:
                    cell.update(grow(work, db, layout, size, step))
                    cell["results"] = measure(work, db, cell, layout, args, out / "server.log")
                except BenchError as exc:  # one failed cell should not hide the others
                    log(f"{layout} {size:,} FAILED: {exc}")
                    cell["error"] = str(exc).splitlines()[0]
            cells.append(cell)
            write_out(out, meta, cells)
    finally:
        if args.keep:
            log(f"kept {db} (it holds the last create cell's rows too)")
        else:
            shutil.rmtree(work, ignore_errors=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="2000,20000,200000,1000000", help="total recordings, comma-separated")
    parser.add_argument("--duration", type=int, default=10, help="seconds of wrk per scenario (default 10)")
    parser.add_argument("--workers", type=int, default=1, help="uvicorn workers (default 1)")
    parser.add_argument("--conns", type=int, default=16, help="wrk connections (default 16)")
    parser.add_argument("--out", help="folder for growth.md, growth.json, server.log (default: a new tmp folder)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary databases")
    args = parser.parse_args(argv)
    try:
        args.sizes = sorted({int(s) for s in args.sizes.split(",") if s.strip()})
    except ValueError:
        parser.error("--sizes must be comma-separated integers")
    if not args.sizes or min(args.sizes) < 1 or min(args.duration, args.workers, args.conns) < 1:
        parser.error("--sizes, --duration, --workers and --conns must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # the finally blocks stop the server
    if not shutil.which("wrk"):
        raise BenchError("wrk is not installed: apt-get install -y wrk")
    out = Path(args.out).resolve() if args.out else Path(tempfile.mkdtemp(prefix="growth-out-"))
    out.mkdir(parents=True, exist_ok=True)
    meta = {"started": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "cpus": os.cpu_count(),
            "sizes": args.sizes, "duration_s": args.duration, "workers": args.workers, "conns": args.conns,
            "wrk_threads": min(2, args.conns), "per_clinician": PER_CLINICIAN, "big": BIG}  # fmt: skip
    cells: list[dict] = []
    seen: dict = {}
    log(f"results in {out}")
    for layout in MEASURED:  # one database at a time: at 1,000,000 rows each takes some GB
        run_layout(layout, args, out, meta, cells, seen)
    print("\n" + markdown(cells))
    log(f"wrote {out / 'growth.md'} and {out / 'growth.json'}")
    bad = any("error" in c or any(v["non2xx"] or v["socket_errors"] for v in c.get("results", {}).values())
              for c in cells)  # fmt: skip
    return 1 if bad else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchError as exc:
        print(f"bench/growth.py: error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)
