"""Benchmark the clinical recordings API under uvicorn with wrk.

Run from anywhere with the project's virtual environment (stdlib only; the
server and manage.py run with the same interpreter):

    .venv/bin/python bench/run.py [--duration 10] [--conns 1,16,64] [--scenarios create,get,list,mixed]

Once: a fresh SQLite file in a temporary folder, ``manage.py migrate``, one
user, the server started (one uvicorn worker), a login (``POST
/api/auth/token``), 2,000 realistic recordings created through the API, the
server stopped, the file checkpointed: that is the seed snapshot.

Then one cell per scenario and concurrency: a fresh copy of the snapshot, the
server started on it, a short read-only warm-up, wrk with a Lua script from
``bench/lua/`` for ``--duration`` seconds, the server stopped, the rows in the
file counted. Every cell starts from the same data, so cells do not depend on
each other's writes and their order does not matter. Every request carries
the bearer token obtained at seeding time (stored in the snapshot), so
authentication is measured too.

After a write scenario (create, mixed) the rows in the file must be at least
the seeded rows plus the 201 answers: an acknowledged write that is not in
the file is a lost write. More rows are fine (requests still in flight when
wrk stopped were committed but never counted).

Prints a markdown table and writes ``results.json`` and ``results.md`` to
``--out``. Every process started here is stopped by its PID on exit,
Ctrl-C and SIGTERM included.
"""

from __future__ import annotations

import argparse
import atexit
import datetime as dt
import hashlib
import http.client
import json
import os
import random
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LUA_DIR = Path(__file__).resolve().parent / "lua"
SCENARIOS = {  # name: writes? (decides the lost-write check)
    "create": True,
    "get": False,
    "list": False,
    "mixed": True,
}
USERNAME, PASSWORD = "bench", "bench-pass-123-not-secret"
COUNT_SQL = "SELECT COUNT(*) FROM recordings_recording"
SEED_THREADS = 4
WRK_MAX_THREADS = 2
WRK_TIMEOUT_S = 10


class BenchError(Exception):
    """An expected failure: printed as one clear message, without a traceback."""


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- processes

_started: dict[int, subprocess.Popen] = {}  # every process started here and not yet reaped


def spawn(argv: list[str], **kwargs) -> subprocess.Popen:
    # Own session: Ctrl-C reaches only this script, which then stops the
    # children itself, in order, instead of racing them.
    process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, start_new_session=True, **kwargs)
    _started[process.pid] = process
    return process


def stop(process: subprocess.Popen, grace: float = 15.0) -> None:
    """SIGTERM by PID, then SIGKILL if it does not exit within `grace` seconds."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            log(f"pid {process.pid} ignored SIGTERM for {grace:.0f}s: SIGKILL")
            process.kill()
            process.wait(timeout=10)
    _started.pop(process.pid, None)


def stop_all() -> None:
    for process in list(_started.values()):
        stop(process, grace=10.0)


def run_command(argv: list[str], env: dict[str, str], what: str) -> None:
    process = spawn(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        output, _ = process.communicate(timeout=300)
    finally:
        stop(process)
    if process.returncode != 0:
        raise BenchError(f"{what} failed (exit {process.returncode}):\n{output[-2000:]}")


# ---------------------------------------------------------------- HTTP


def http_call(port: int, method: str, path: str, body=None, token: str | None = None, conn=None):
    """(status, parsed JSON body); reuses `conn` when given (keep-alive)."""
    own = conn is None
    conn = conn or http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    headers = {"Content-Type": "application/json"} if body is not None else {}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    try:
        conn.request(method, path, body=json.dumps(body).encode() if body is not None else None, headers=headers)
        response = conn.getresponse()
        raw = response.read()
    finally:
        if own:
            conn.close()
    try:
        return response.status, json.loads(raw) if raw else None
    except ValueError:
        return response.status, raw[:300].decode("utf-8", "replace")


def port_in_use(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ---------------------------------------------------------------- server


@dataclass
class Server:
    python: str
    port: int
    log_path: Path
    process: subprocess.Popen | None = None

    def env(self, db: Path) -> dict[str, str]:
        env = dict(os.environ)
        env.update(CLINICAL_DB_PATH=str(db), DJANGO_SECRET_KEY="bench-only", DJANGO_DEBUG="0", PYTHONUNBUFFERED="1")
        return env

    def start(self, db: Path, label: str) -> None:
        if port_in_use(self.port):
            raise BenchError(f"port {self.port} is already in use; stop whatever holds it or pass --port N")
        argv = [self.python, "-m", "uvicorn", "clinical.asgi:application", "--host", "127.0.0.1",
                "--port", str(self.port), "--no-access-log", "--log-level", "warning"]  # fmt: skip
        with open(self.log_path, "a") as log_file:
            log_file.write(f"\n==== {dt.datetime.now().isoformat(timespec='seconds')} {label}\n")
            log_file.flush()
            self.process = spawn(argv, cwd=REPO, env=self.env(db), stdout=log_file, stderr=subprocess.STDOUT)
        try:
            self.wait_healthy()
        except BaseException:
            self.stop()  # never leave a half-started server holding the port
            raise

    def wait_healthy(self, timeout: float = 60.0) -> None:
        deadline, last = time.monotonic() + timeout, "no answer"
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise BenchError(f"server exited with code {self.process.returncode} at start-up\n{self.log_tail()}")
            try:
                status, body = http_call(self.port, "GET", "/api/health")
                if status == 200:
                    return
                last = f"HTTP {status} {body}"
            except OSError as exc:
                last = repr(exc)
            time.sleep(0.1)
        raise BenchError(f"server not healthy after {timeout:.0f}s: {last}\n{self.log_tail()}")

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self) -> None:
        # SIGTERM lets uvicorn run the lifespan shutdown, which closes the
        # database connection cleanly (and checkpoints the WAL).
        if self.process is not None:
            stop(self.process)
            self.process = None

    def cpu_seconds(self) -> float:
        """User + system CPU time of the server process so far (all its threads), from /proc."""
        stat = Path(f"/proc/{self.process.pid}/stat").read_text()
        fields = stat[stat.rindex(")") + 2 :].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def log_tail(self, lines: int = 25) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


# ---------------------------------------------------------------- database


def count_rows(db: Path) -> int:
    with sqlite3.connect(db) as conn:
        return conn.execute(COUNT_SQL).fetchone()[0]


def checkpoint(db: Path) -> None:
    """Fold the WAL into the main file, so that copying the main file alone is a full copy."""
    conn = sqlite3.connect(db)
    try:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        conn.close()


def remove_db(db: Path) -> None:
    for suffix in ("", "-wal", "-shm", "-journal"):
        Path(f"{db}{suffix}").unlink(missing_ok=True)


def prepare_database(server: Server, db: Path) -> None:
    env = server.env(db)
    log("migrate and create the bench user")
    run_command([server.python, "manage.py", "migrate", "--noinput", "-v", "0"], env, "manage.py migrate")
    create_user = (
        "import os; from django.contrib.auth import get_user_model; "
        "get_user_model().objects.create_user(os.environ['BENCH_USER'], password=os.environ['BENCH_PASSWORD'])"
    )
    env.update(BENCH_USER=USERNAME, BENCH_PASSWORD=PASSWORD)
    run_command([server.python, "manage.py", "shell", "-v", "0", "-c", create_user], env, "creating the bench user")


# ---------------------------------------------------------------- seeding

WORDS = (
    "patient reports headache fever cough fatigue nausea dizziness chest pain shortness of breath blood "
    "pressure stable follow up in two weeks prescribed ibuprofen advised rest and fluids history asthma "
    "allergies none known examination unremarkable plan review results denies vomiting abdomen soft"
).split()
NOTE_TYPES = ("general", "consultation", "discharge", "follow_up", "referral")


def seed_body(rng: random.Random, i: int) -> dict:
    """A recording as the PWA would sync it; the client chooses the id, so a retry is harmless."""
    note_type = rng.choice(NOTE_TYPES)
    recorded = dt.datetime(2024, 1, 1, tzinfo=dt.UTC) + dt.timedelta(seconds=rng.randrange(300 * 86400))
    return {
        "id": str(uuid.UUID(int=rng.getrandbits(128), version=4)),
        "patient_ref": f"PAT-{rng.randrange(1, 400):05d}",
        "title": f"{note_type.replace('_', ' ').title()} note {i}",
        "note_type": note_type,
        "status": rng.choice(("pending", "uploaded")),
        "audio_path": f"audio/seed/{i:06d}.webm",
        "duration_seconds": round(rng.uniform(5, 900), 1),
        "transcript": " ".join(rng.choice(WORDS) for _ in range(rng.randrange(30, 301))),
        "verification_results": {
            "checked": rng.random() < 0.5,
            "score": round(rng.random(), 3),
            "flags": rng.sample(["dosage", "allergy", "name", "date"], rng.randrange(0, 3)),
        },
        "recorded_at": recorded.isoformat(),
    }


def login(port: int) -> str:
    status, body = http_call(port, "POST", "/api/auth/token", {"username": USERNAME, "password": PASSWORD})
    if status != 201 or not isinstance(body, dict) or "token" not in body:
        raise BenchError(f"login failed: HTTP {status} {str(body)[:300]}")
    return body["token"]


def seed_via_api(port: int, token: str, count: int, seed: int) -> list[str]:
    """POST `count` recordings from a few threads; returns their ids in creation order."""
    rng = random.Random(seed)
    bodies = [seed_body(rng, i) for i in range(count)]
    errors: list[str] = []

    def worker(first: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        try:
            for i in range(first, count, SEED_THREADS):
                status, body = http_call(port, "POST", "/api/recordings", bodies[i], token, conn)
                if status != 201:
                    errors.append(f"recording #{i}: HTTP {status} {str(body)[:300]}")
                    return
        except (OSError, http.client.HTTPException) as exc:
            errors.append(f"POST /api/recordings: {exc!r}")
        finally:
            conn.close()

    threads = [threading.Thread(target=worker, args=(k,), daemon=True) for k in range(SEED_THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise BenchError(f"seeding failed: {errors[0]}")
    return [body["id"] for body in bodies]


def build_snapshot(server: Server, db: Path, ids_file: Path, count: int) -> tuple[str, int]:
    """Seed a fresh database through the API; returns (token, rows)."""
    prepare_database(server, db)
    server.start(db, "seed")
    try:
        token = login(server.port)
        started = time.monotonic()
        ids = seed_via_api(server.port, token, count, seed=1)
        seconds = time.monotonic() - started
        status, body = http_call(server.port, "GET", "/api/recordings?limit=1", token=token)
        if status != 200 or body.get("count") != count:
            raise BenchError(f"after seeding, the list answered HTTP {status} count={body.get('count')!r}")
    finally:
        server.stop()
    rows = count_rows(db)
    if rows != count:
        raise BenchError(f"{rows} rows in the seeded database, expected {count}")
    checkpoint(db)
    ids_file.write_text("\n".join(ids) + "\n")
    log(f"seeded {count} recordings in {seconds:.1f}s ({count / seconds:.0f}/s through the API)")
    return token, rows


# ---------------------------------------------------------------- wrk


def run_wrk(port: int, token: str, script: str, conns: int, duration: int, ids_file: Path, save_to: Path | None):
    """Run wrk once; returns the BENCH_JSON summary that the Lua script printed."""
    threads = min(WRK_MAX_THREADS, conns)  # wrk needs at least one connection per thread
    argv = ["wrk", "-t", str(threads), "-c", str(conns), "-d", f"{duration}s", "--latency",
            "--timeout", f"{WRK_TIMEOUT_S}s", "-s", str(LUA_DIR / f"{script}.lua"),
            "-H", f"Authorization: Bearer {token}",
            f"http://127.0.0.1:{port}", "--", str(ids_file), "0.2", "1"]  # fmt: skip
    process = spawn(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        output, errors = process.communicate(timeout=duration + WRK_TIMEOUT_S + 30)
    finally:
        stop(process, grace=5)
    if save_to is not None:
        save_to.write_text(output + (f"\n--- stderr\n{errors}" if errors else ""))
    if process.returncode != 0:
        raise BenchError(f"wrk exited {process.returncode}: {(errors or output).strip()[:500]}")
    line = next((ln for ln in output.splitlines() if ln.startswith("BENCH_JSON ")), None)
    if line is None:
        raise BenchError(f"wrk printed no BENCH_JSON line (Lua error?)\n{output[-800:]}\n{errors[-800:]}")
    return json.loads(line.removeprefix("BENCH_JSON "))


# ---------------------------------------------------------------- cells


@dataclass
class Context:
    server: Server
    token: str
    snapshot: Path
    seeded: int
    ids_file: Path
    work_dir: Path
    out_dir: Path
    args: argparse.Namespace


def run_cell(ctx: Context, scenario: str, conns: int) -> dict:
    """One measured cell on a fresh copy of the seed snapshot."""
    label = f"{scenario} c={conns}"
    db = ctx.work_dir / f"cell-{scenario}-c{conns}.db"
    shutil.copyfile(ctx.snapshot, db)
    try:
        ctx.server.start(db, label)
        try:
            if ctx.args.warmup > 0:  # read-only, so it adds no rows
                run_wrk(ctx.server.port, ctx.token, "get", conns, ctx.args.warmup, ctx.ids_file, None)
            # Server CPU per request says what a request costs even when other
            # load on the machine (wrk included) blurs the throughput.
            cpu_before, load_before = ctx.server.cpu_seconds(), os.getloadavg()[0]
            result = run_wrk(ctx.server.port, ctx.token, scenario, conns, ctx.args.duration, ctx.ids_file,
                             ctx.out_dir / f"wrk-{scenario}-c{conns}.txt")  # fmt: skip
            if not ctx.server.alive():
                raise BenchError(f"server died during {label}\n{ctx.server.log_tail()}")
            result["server_cpu_s"] = ctx.server.cpu_seconds() - cpu_before
            result["loadavg_before"] = load_before
        finally:
            ctx.server.stop()
        rows_after = count_rows(db)  # after a clean stop: what a restart would find
    finally:
        if not ctx.args.keep:
            remove_db(db)
    return summarize(scenario, conns, result, ctx.seeded, rows_after)


def summarize(scenario: str, conns: int, result: dict, rows_before: int, rows_after: int) -> dict:
    latency = result["latency_us"]
    p50, p99 = latency["p50"] / 1000, latency["p99"] / 1000
    created = result["statuses"].get("201", 0)
    cell = {
        "scenario": scenario,
        "conns": conns,
        "requests": result["requests"],
        "rps": result["rps"],
        "p50_ms": round(p50, 2),
        "p99_ms": round(p99, 2),
        "p99_over_p50": round(p99 / p50, 1) if p50 else None,
        "max_ms": round(latency["max"] / 1000, 2),
        "non2xx": result["non2xx"],
        "socket_errors": result["socket_errors"],
        "socket_errors_detail": result["socket_errors_detail"],
        "statuses": result["statuses"],
        "server_cpu_ms_per_req": round(result["server_cpu_s"] * 1000 / result["requests"], 2)
        if result["requests"]
        else None,
        "loadavg_before": round(result["loadavg_before"], 2),
        "rows_before": rows_before,
        "rows_after": rows_after,
        "created_201": created,
        "lost_writes": None,
    }
    if SCENARIOS[scenario]:
        cell["lost_writes"] = max(0, rows_before + created - rows_after)
        cell["unacknowledged_rows"] = max(0, rows_after - rows_before - created)  # in flight at the end
    elif rows_after != rows_before:
        cell["rows_changed_by_reads"] = rows_after - rows_before
    log(
        f"{scenario:>6} c={conns:<3} {cell['rps']:>8.1f} req/s  p50 {p50:7.2f} ms  p99 {p99:8.2f} ms  "
        f"non-2xx {cell['non2xx']}  socket {cell['socket_errors']}  cpu {cell['server_cpu_ms_per_req']} ms/req"
        + (f"  201s {created}  lost {cell['lost_writes']}" if SCENARIOS[scenario] else "")
    )
    return cell


# ---------------------------------------------------------------- report


def markdown(cells: list[dict]) -> str:
    lines = [
        "| scenario | conns | req/s | p50 ms | p99 ms | p99/p50 | errors (non-2xx + socket) | lost writes |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c in cells:
        if "error" in c:
            lines.append(f"| {c['scenario']} | {c['conns']} | FAILED: {c['error'][:100]} | | | | | |")
            continue
        ratio = "n/a" if c["p99_over_p50"] is None else f"{c['p99_over_p50']:.1f}"
        lost = "n/a" if c["lost_writes"] is None else str(c["lost_writes"])
        errors = c["non2xx"] + c["socket_errors"]
        lines.append(
            f"| {c['scenario']} | {c['conns']} | {c['rps']:.0f} | {c['p50_ms']:.2f} | {c['p99_ms']:.2f} "
            f"| {ratio} | {errors} | {lost} |"
        )
    return "\n".join(lines) + "\n"


def write_results(out_dir: Path, meta: dict, cells: list[dict]) -> None:
    (out_dir / "results.json").write_text(json.dumps({"meta": meta, "cells": cells}, indent=2) + "\n")
    (out_dir / "results.md").write_text(markdown(cells))


# ---------------------------------------------------------------- main


def parse_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=int, default=10, help="seconds of wrk per cell (default 10)")
    parser.add_argument("--conns", default="1,16,64", help="comma-separated concurrency levels (default 1,16,64)")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS), help="comma-separated subset of %(default)s")
    parser.add_argument("--port", type=int, default=0, help="server port (default: a free one)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary databases (seed and per cell)")
    parser.add_argument("--out", help="folder for results.json, results.md, wrk and server logs (default: a tmp dir)")
    parser.add_argument("--warmup", type=int, default=1, help="seconds of read-only warm-up per cell (0: none)")
    parser.add_argument("--seed-count", type=int, default=2000, help="recordings seeded through the API")
    args = parser.parse_args(argv)
    args.scenario_list = parse_list(args.scenarios)
    unknown = [s for s in args.scenario_list if s not in SCENARIOS]
    if unknown:
        parser.error(f"unknown scenario(s) {', '.join(unknown)}; known: {', '.join(SCENARIOS)}")
    try:
        args.conns_list = [int(c) for c in parse_list(args.conns)]
    except ValueError:
        parser.error("--conns must be comma-separated integers")
    if args.duration < 1 or args.warmup < 0 or args.seed_count < 1 or min(args.conns_list, default=0) < 1:
        parser.error("--duration, --seed-count and --conns must be positive, --warmup at least 0")
    return args


def check_tools(python: str) -> None:
    if not shutil.which("wrk"):
        raise BenchError("wrk is not installed: apt-get install -y wrk")
    probe = subprocess.run([python, "-c", "import django, uvicorn"], capture_output=True, text=True, check=False)
    if probe.returncode != 0:
        raise BenchError(f"{python} cannot import django and uvicorn; run with the project's venv: "
                         ".venv/bin/python bench/run.py")  # fmt: skip


def source_state(skip: Path) -> dict | None:
    """The commit, the uncommitted files and a hash of the code as it is on disk.

    Every cell starts a new server, so an edit made during a run is measured
    from the next cell on: the state is taken at the start and at the end. The
    hash covers the files themselves, so committing unchanged code mid-run does
    not count as a change; `skip` (the results folder) is left out. Only
    read-only git calls.
    """
    git = ["git", "--no-optional-locks", "-C", str(REPO)]  # no index refresh: changes nothing
    try:
        commit = _git_output([*git, "rev-parse", "HEAD"]).strip()
        dirty = _git_output([*git, "status", "--porcelain", "--untracked-files=no"]).splitlines()
        files = _git_output([*git, "ls-files", "--cached", "--others", "--exclude-standard", "-z"]).split("\0")
    except (OSError, subprocess.CalledProcessError):
        return None
    return {"commit": commit, "dirty_files": sorted(line[3:] for line in dirty), "code_sha256": hash_files(files, skip)}


def _git_output(argv: list[str]) -> str:
    return subprocess.run(argv, capture_output=True, text=True, check=True).stdout


def hash_files(names: list[str], skip: Path) -> str:
    digest = hashlib.sha256()
    for name in sorted(set(filter(None, names))):
        path = REPO / name
        if path.is_file() and not path.resolve().is_relative_to(skip):
            digest.update(name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # SIGTERM and SIGHUP take the same way out as Ctrl-C: the finally blocks stop every process.
    # SIGINT is set explicitly: a shell starts background jobs with it ignored.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _raise_interrupt)
    signal.signal(signal.SIGHUP, _raise_interrupt)
    atexit.register(stop_all)
    python = sys.executable
    check_tools(python)
    out_dir = Path(args.out).resolve() if args.out else Path(tempfile.mkdtemp(prefix="clinical-bench-out-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    work_dir = Path(tempfile.mkdtemp(prefix="clinical-bench-db-"))
    server = Server(python=python, port=args.port or free_port(), log_path=out_dir / "server.log")
    meta = run_meta(args, out_dir)
    cells: list[dict] = []
    interrupted = False
    log(f"results in {out_dir}; databases in {work_dir}; server port {server.port}")
    try:
        snapshot, ids_file = work_dir / "seed.db", work_dir / "ids.txt"
        token, seeded = build_snapshot(server, snapshot, ids_file, args.seed_count)
        run_cells(Context(server, token, snapshot, seeded, ids_file, work_dir, out_dir, args), cells)
    except KeyboardInterrupt:
        interrupted = True
        log("interrupted: stopping every process started here")
    finally:
        server.stop()
        stop_all()
        finish_meta(meta, out_dir, interrupted)
        write_results(out_dir, meta, cells)
        if args.keep:
            log(f"kept the databases in {work_dir}")
        else:
            shutil.rmtree(work_dir, ignore_errors=True)
    print("\n" + markdown(cells))
    log(f"wrote {out_dir / 'results.json'} and {out_dir / 'results.md'}")
    return report_status(cells, interrupted)


def run_cells(ctx: Context, cells: list[dict]) -> None:
    """Every scenario at every concurrency; appends to `cells` as it goes, so Ctrl-C keeps what is done."""
    for scenario in ctx.args.scenario_list:
        for conns in ctx.args.conns_list:
            try:
                cells.append(run_cell(ctx, scenario, conns))
            except BenchError as exc:  # one failed cell should not hide the others
                log(f"{scenario} c={conns} FAILED: {exc}")
                cells.append({"scenario": scenario, "conns": conns, "error": str(exc).splitlines()[0]})


def run_meta(args: argparse.Namespace, out_dir: Path) -> dict:
    meta = {
        "started": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "cpus": os.cpu_count(),
        "duration_s": args.duration,
        "warmup_s": args.warmup,
        "seed_count": args.seed_count,
        "uvicorn_workers": 1,
        "wrk_threads": f"min({WRK_MAX_THREADS}, conns)",
        "wrk_timeout_s": WRK_TIMEOUT_S,
        "database": "fresh copy of the seed snapshot per cell, server restarted per cell",
        "auth": "Authorization: Bearer <token> on every request",
        "source_at_start": source_state(out_dir),
    }
    if meta["source_at_start"]:
        source = meta["source_at_start"]
        log(f"measuring commit {source['commit'][:12]} with {len(source['dirty_files'])} uncommitted file(s)")
    return meta


def finish_meta(meta: dict, out_dir: Path, interrupted: bool) -> None:
    meta["finished"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    meta["interrupted"] = interrupted
    meta["source_at_end"] = source_state(out_dir)
    if (meta["source_at_start"] or {}).get("code_sha256") != (meta["source_at_end"] or {}).get("code_sha256"):
        log("warning: the source tree changed during the run; cells measured different code")


def report_status(cells: list[dict], interrupted: bool) -> int:
    """130 when interrupted, 1 when a cell failed or a write was lost, else 0."""
    if interrupted:
        return 130
    lost = sum(c.get("lost_writes") or 0 for c in cells)
    failed = [c for c in cells if "error" in c]
    if lost:
        log(f"LOST WRITES: {lost} acknowledged creates are missing from the database")
    if failed:
        log(f"{len(failed)} cell(s) failed")
    errors = sum(c.get("non2xx", 0) + c.get("socket_errors", 0) for c in cells)
    if errors:
        log(f"note: {errors} non-2xx answers or socket errors in all; see the wrk-*.txt and server.log files")
    return 1 if lost or failed else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchError as exc:
        stop_all()
        print(f"bench/run.py: error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        stop_all()
        sys.exit(130)
