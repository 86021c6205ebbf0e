"""Figures for the operations commands: seeddb at scale, and backupdb idle and under writes.

Run from anywhere with the project's virtual environment (stdlib only; the
server and manage.py run with the same interpreter):

    .venv/bin/python bench/ops_figures.py [--count 100000] [--clients 8] [--keep]

On a fresh SQLite file in a temporary folder: ``manage.py migrate``, then
``manage.py seeddb --count N`` (timed), then ``manage.py backupdb`` (timed)
twice: (a) with nothing else running, (b) while a uvicorn server on the same
file takes continuous ``POST /api/recordings`` from --clients concurrent
clients. For (b) it checks that the backup holds every recording the server
acknowledged (201) before the backup began, and passes integrity_check.

A benchmark, not a test: it prints figures and asserts nothing about time.
Exit status 0, or 1 when a command failed or the backup misses an
acknowledged recording. Every process started here is stopped by its PID.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
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
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
USERNAME = "bench"
ISSUE_TOKEN = """
import django
django.setup()
from django.contrib.auth import get_user_model
from clinical.tokens import token_issue
raw, _ = token_issue(user=get_user_model().objects.get(username="bench"))
print(raw)
"""
WARMUP_S = 2.0
AFTER_S = 0.5


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


@dataclass
class Timed:
    seconds: float
    stdout: str


class Ops:
    """manage.py and uvicorn on one database file."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.db = folder / "clinical.db"
        self.backups = folder / "backups"
        self.server: subprocess.Popen | None = None
        self.port = 0

    @property
    def env(self) -> dict[str, str]:
        env = {key: value for key, value in os.environ.items() if key != "DJANGO_DEBUG"}
        env.update(CLINICAL_DB_PATH=str(self.db), DJANGO_SECRET_KEY="ops-figures-only-" + "k" * 40)
        return env

    def manage(self, *args: str) -> Timed:
        started = time.monotonic()
        done = subprocess.run(
            [sys.executable, "manage.py", *args],
            cwd=REPO,
            env=self.env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=3600,
            check=False,
        )
        seconds = time.monotonic() - started
        if done.returncode != 0:
            raise SystemExit(f"manage.py {' '.join(args)} failed ({done.returncode}):\n{done.stderr[-2000:]}")
        return Timed(seconds, done.stdout)

    def start_server(self) -> None:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        argv = [sys.executable, "-m", "uvicorn", "clinical.asgi:application", "--host", "127.0.0.1",
                "--port", str(self.port), "--no-access-log", "--log-level", "warning"]  # fmt: skip
        with open(self.folder / "server.log", "ab") as server_log:
            self.server = subprocess.Popen(
                argv, cwd=REPO, env=self.env, stdin=subprocess.DEVNULL, stdout=server_log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.server.poll() is not None:
                raise SystemExit(f"uvicorn exited with {self.server.returncode}; see {self.folder / 'server.log'}")
            try:
                if call(self.port, "GET", "/api/health")[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.1)
        raise SystemExit("uvicorn did not become healthy within 60 s")

    def stop_server(self) -> None:
        if self.server is not None and self.server.poll() is None:
            self.server.send_signal(signal.SIGTERM)
            try:
                self.server.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.server.kill()
                self.server.wait()


def call(port: int, method: str, path: str, body=None, token=None, conn=None) -> tuple[int, dict | None]:
    own = conn is None
    conn = conn or http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    try:
        conn.request(method, path, body=json.dumps(body).encode() if body is not None else None, headers=headers)
        response = conn.getresponse()
        raw = response.read()
    finally:
        if own:
            conn.close()
    return response.status, (json.loads(raw) if raw else None)


@dataclass
class Writers:
    """Client threads, each on its own keep-alive connection, creating recordings until stopped."""

    port: int
    token: str
    clients: int
    acknowledged: list[tuple[float, str]] = field(default_factory=list)  # (time of the 201, id)
    failures: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __enter__(self) -> Writers:
        self.threads = [threading.Thread(target=self._write, args=(index,)) for index in range(self.clients)]
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join()

    def _write(self, index: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        number = 0
        while not self.stop.is_set():
            body = {"patient_ref": f"PAT-{index}-{number}", "title": f"client {index}, write {number}"}
            try:
                status, answer = call(self.port, "POST", "/api/recordings", body, self.token, conn)
            except (OSError, http.client.HTTPException) as exc:
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
                status, answer = 0, {"error": repr(exc)}
            with self.lock:
                if status == 201:
                    self.acknowledged.append((time.monotonic(), answer["id"]))
                else:
                    self.failures.append(f"{status} {str(answer)[:200]}")
            number += 1
        conn.close()

    def snapshot(self) -> list[tuple[float, str]]:
        with self.lock:
            return list(self.acknowledged)


def check_backup(path: Path, expected: set[str]) -> tuple[str, int, int]:
    """(integrity_check, rows, acknowledged recordings missing from the backup)."""
    # A quoted URI: `#`, `?` or `%` in the path must name that path (clinical.backups.sqlite_uri).
    with closing(sqlite3.connect(f"{path.absolute().as_uri()}?mode=ro", uri=True)) as db:
        result = db.execute("PRAGMA integrity_check").fetchone()[0]
        ids = {row[0] for row in db.execute("SELECT id FROM recordings_recording")}
    return result, len(ids), len(expected - ids)


def newest_backup(stdout: str) -> Path:
    match = re.search(r"Backed up to (\S+)", stdout)
    if not match:
        raise SystemExit(f"backupdb printed no path:\n{stdout}")
    return Path(match.group(1))


def mib(size: int) -> str:
    return f"{size / 2**20:,.1f} MiB"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=100_000, help="recordings to seed (default 100000)")
    parser.add_argument("--clients", type=int, default=8, help="concurrent writers during backup (b) (default 8)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    options = parser.parse_args()

    ops = Ops(Path(tempfile.mkdtemp(prefix="ops-figures-")))
    try:
        log(f"working in {ops.folder}")
        ops.manage("migrate", "--noinput")
        rows = [seed(ops, options.count), backup_idle(ops)]
        row, report, ok = backup_under_writes(ops, options.clients)
        rows.append(row)
    finally:
        ops.stop_server()
        if options.keep:
            log(f"kept {ops.folder}")
        else:
            shutil.rmtree(ops.folder, ignore_errors=True)

    print("| step | result | size | wall s | backupdb's own s |")
    print("| --- | --- | --- | --- | --- |")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print()
    print(report)
    return 0 if ok and all("check ok" in row[1] for row in rows[1:]) else 1


def seed(ops: Ops, count: int) -> tuple[str, ...]:
    log(f"seeddb --count {count}")
    seeded = ops.manage("seeddb", "--count", str(count), "--user", USERNAME, "--seed", "1")
    return ("seeddb", f"{count:,} recordings", mib(ops.db.stat().st_size), f"{seeded.seconds:.1f}", "")


def backup_idle(ops: Ops) -> tuple[str, ...]:
    log("backupdb, idle")
    idle = ops.manage("backupdb", "--output-dir", str(ops.backups), "--keep", "10")
    backup = newest_backup(idle.stdout)
    result, count, _ = check_backup(backup, set())
    size = mib(backup.stat().st_size)
    return ("backupdb (a) idle", f"{count:,} rows, check {result}", size, f"{idle.seconds:.2f}", own(idle.stdout))


def backup_under_writes(ops: Ops, clients: int) -> tuple[tuple[str, ...], str, bool]:
    token = ops.manage("shell", "-c", ISSUE_TOKEN).stdout.strip().splitlines()[-1]
    ops.start_server()
    log(f"backupdb while {clients} clients create recordings through the server")
    with Writers(ops.port, token, clients) as writers:
        time.sleep(WARMUP_S)
        before = writers.snapshot()
        began = time.monotonic()
        loaded = ops.manage("backupdb", "--output-dir", str(ops.backups), "--keep", "10")
        ended = time.monotonic()
        time.sleep(AFTER_S)
    ops.stop_server()
    backup = newest_backup(loaded.stdout)
    result, count, missing = check_backup(backup, {uuid.UUID(key).hex for _, key in before})
    during = sum(began <= stamp <= ended for stamp, _ in writers.acknowledged)
    warm = sum(stamp >= began - 1 for stamp, _ in before)  # the last second before it began
    report = (
        f"Under writes: {len(before):,} recordings acknowledged before the backup began, {missing:,} of them "
        f"missing from it; {during:,} acknowledged while backupdb ran ({during / (ended - began):,.0f}/s, "
        f"against {warm:,}/s just before); {len(writers.failures)} failed requests.\n"
        + ("Every acknowledged recording is in the backup." if missing == 0 else "LOST: the backup misses some.")
    )
    row = (
        f"backupdb (b) under {clients} writers",
        f"{count:,} rows, check {result}",
        mib(backup.stat().st_size),
        f"{loaded.seconds:.2f}",
        own(loaded.stdout),
    )
    return row, report, missing == 0 and not writers.failures


def own(stdout: str) -> str:
    """The seconds backupdb reports for its own work, without Django's start-up."""
    match = re.search(r"([\d.]+) s\)", stdout)
    return match.group(1) if match else "?"


if __name__ == "__main__":
    sys.exit(main())
