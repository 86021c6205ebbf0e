"""Figures for continuous replication: the writes a lost machine loses (RPO), and restoring 100,000 recordings.

Run from anywhere with the project's virtual environment (stdlib only; the
server, manage.py and Litestream run from the same virtual environment):

    .venv/bin/python bench/replica_figures.py [--count 100000] [--rpo-runs 3] [--clients 8] [--seconds 20] [--keep]

RPO: on a fresh database, the server as scripts/serve runs it (python -m
clinical.serve, which runs manage.py replicate beside uvicorn) replicating to
a file replica; --clients clients create recordings for --seconds seconds;
then Litestream, manage.py replicate and the server are killed with SIGKILL
(in that order, within a millisecond), the database and its -wal, -shm and
Litestream state are removed, and ``manage.py restoredb --from-replica``
restores it. Reported: how many acknowledged (201) writes are missing, and
the oldest of them: how long before the kill it was acknowledged (the RPO
window). Repeated --rpo-runs times.

Restore: ``manage.py seeddb --count N`` into a fresh database, replicated by
``manage.py replicate`` until the replica holds it (timed: the first full
copy), then ``manage.py restoredb --from-replica --yes`` into a new, empty
database path, as on a new machine (timed: Litestream's restore, the checks,
migrate and the renumbering), and ``litestream restore`` alone for
comparison.

A benchmark, not a test: it prints figures and asserts nothing about time.
Exit status 0, or 1 when a command failed or a kill lost a write acknowledged
more than a second before it. Every process started here is stopped by its PID.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
from contextlib import closing
from pathlib import Path

from ops_figures import ISSUE_TOKEN, REPO, USERNAME, Ops, Writers, call, log

LITESTREAM = Path(sys.executable).parent / "litestream"
RPO_SECONDS = 1.0


class Replicated(Ops):
    """manage.py, the server and Litestream on one database file, replicating to a folder beside it."""

    def __init__(self, folder: Path, replica: Path):
        super().__init__(folder)
        self.replica = replica
        self.replicate: subprocess.Popen | None = None

    @property
    def env(self) -> dict[str, str]:
        return {**super().env, "CLINICAL_REPLICA_URL": self.replica.as_uri()}

    @property
    def socket(self) -> Path:
        return self.db.with_name(f".{self.db.name}-litestream.sock")

    def start_serve(self) -> None:
        """The server as scripts/serve runs it: replication beside uvicorn."""
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        argv = [sys.executable, "-m", "clinical.serve", "--port", str(self.port), "--log-level", "warning"]
        with open(self.folder / "server.log", "ab") as server_log:
            self.server = subprocess.Popen(
                argv, cwd=REPO, env=self.env,
                stdin=subprocess.DEVNULL, stdout=server_log, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        self._wait(lambda: call(self.port, "GET", "/api/health")[1].get("replication", {}).get("running"))

    def start_replicate(self) -> None:
        with open(self.folder / "replicate.log", "ab") as replicate_log:
            self.replicate = subprocess.Popen(
                [sys.executable, "manage.py", "replicate"], cwd=REPO,
                env=self.env, stdin=subprocess.DEVNULL, stdout=replicate_log, stderr=subprocess.STDOUT,
            )  # fmt: skip
        self._wait(self.socket.exists)

    def sync(self) -> None:
        """Until the replica holds everything Litestream has seen."""
        subprocess.run(
            [str(LITESTREAM), "sync", "-wait", "-timeout", "3600", "-socket", self.socket.name, str(self.db)],
            cwd=self.db.parent, check=True, capture_output=True, timeout=3700,
        )  # fmt: skip

    def litestream_pids(self) -> tuple[int, int]:
        info = subprocess.run(
            [str(LITESTREAM), "info", "-json", "-socket", self.socket.name],
            cwd=self.db.parent, check=True, capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        pid = json.loads(info.stdout)["pid"]
        with open(f"/proc/{pid}/stat") as stat:
            return pid, int(stat.read().rsplit(")", 1)[1].split()[1])

    def stop_replicate(self) -> None:
        if self.replicate is not None and self.replicate.poll() is None:
            self.replicate.send_signal(signal.SIGTERM)
            self.replicate.wait(timeout=120)

    def _wait(self, ready, within: float = 120) -> None:
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            try:
                if ready():
                    return
            except (OSError, AttributeError, ValueError):
                pass
            time.sleep(0.1)
        raise SystemExit(f"not ready within {within:.0f} s; see the logs in {self.folder}")


def rpo_run(folder: Path, clients: int, seconds: float) -> dict:
    folder.mkdir()
    ops = Replicated(folder, folder / "replica")
    ops.manage("migrate", "--noinput")
    ops.manage("seeddb", "--count", "1", "--user", USERNAME, "--yes")
    token = ops.manage("shell", "-c", ISSUE_TOKEN).stdout.strip().splitlines()[-1]
    ops.start_serve()
    litestream, replicate = ops.litestream_pids()
    with Writers(ops.port, token, clients) as writers:
        time.sleep(seconds)
        killed_at = time.monotonic()
        for pid in (litestream, replicate):
            os.kill(pid, signal.SIGKILL)
        os.killpg(ops.server.pid, signal.SIGKILL)
    ops.server.wait()
    for name in (ops.db.name, ops.db.name + "-wal", ops.db.name + "-shm"):
        (folder / name).unlink(missing_ok=True)
    shutil.rmtree(folder / f".{ops.db.name}-litestream", ignore_errors=True)
    restored = ops.manage("restoredb", "--from-replica", "--yes", "--output-dir", str(folder / "backups"))
    with closing(sqlite3.connect(ops.db)) as db:
        ids = {row[0] for row in db.execute("SELECT id FROM recordings_recording")}
        integrity = db.execute("PRAGMA integrity_check").fetchone()[0]
    lost = [killed_at - at for at, key in writers.acknowledged if uuid.UUID(key).hex not in ids]
    return {
        "acknowledged": len(writers.acknowledged),
        "refused": len(writers.failures),
        "lost": len(lost),
        "oldest_lost_s": max(lost, default=0.0),
        "integrity": integrity,
        "restore_s": restored.seconds,
    }


def restore_figures(folder: Path, count: int) -> dict:
    ops = Replicated(folder / "live", folder / "replica")
    ops.folder.mkdir()
    ops.manage("migrate", "--noinput")
    seeded = ops.manage("seeddb", "--count", str(count), "--user", USERNAME, "--yes")
    size = ops.db.stat().st_size
    began = time.monotonic()
    ops.start_replicate()
    ops.sync()
    first_copy = time.monotonic() - began
    ops.stop_replicate()
    replica_bytes = sum(path.stat().st_size for path in ops.replica.rglob("*") if path.is_file())
    machine = Replicated(folder / "new-machine", ops.replica)
    machine.folder.mkdir()
    restored = machine.manage("restoredb", "--from-replica", "--yes", "--output-dir", str(machine.folder / "backups"))
    with closing(sqlite3.connect(machine.db)) as db:
        rows = db.execute("SELECT COUNT(*) FROM recordings_recording").fetchone()[0]
    began = time.monotonic()
    bare = folder / "bare.db"
    subprocess.run([str(LITESTREAM), "restore", "-o", str(bare), ops.replica.as_uri()], check=True, capture_output=True)
    bare_seconds = time.monotonic() - began
    return {
        "recordings": rows,
        "database_bytes": size,
        "replica_bytes": replica_bytes,
        "seed_s": seeded.seconds,
        "first_copy_s": first_copy,
        "restoredb_from_replica_s": restored.seconds,
        "litestream_restore_s": bare_seconds,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=100_000)
    parser.add_argument("--rpo-runs", type=int, default=3)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="replica-figures-"))
    failed = False
    try:
        for run in range(args.rpo_runs):
            log(f"RPO run {run + 1}: {args.clients} clients for {args.seconds:.0f} s, then SIGKILL")
            figures = rpo_run(folder / f"rpo-{run + 1}", args.clients, args.seconds)
            print(json.dumps({"rpo_run": run + 1, **figures}), flush=True)
            failed |= figures["oldest_lost_s"] > RPO_SECONDS or figures["integrity"] != "ok"
            failed |= figures["acknowledged"] < args.clients
        log(f"Restore: {args.count:,} recordings")
        figures = restore_figures(folder, args.count)
        print(json.dumps({"restore": figures}), flush=True)
        failed |= figures["recordings"] < args.count
    finally:
        if args.keep:
            log(f"kept {folder}")
        else:
            shutil.rmtree(folder, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
