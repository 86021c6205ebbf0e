"""Hot backups, restores and maintenance of the SQLite database, through SQLite's online backup API.

A backup copies the database in chunks of pages, for progress, while the
source connection holds one read transaction: the copy is one consistent
snapshot, and writers elsewhere (WAL mode) go on. Without that transaction,
SQLite restarts a chunked backup whenever another connection writes, and
under steady writes it never finishes.

Every file is opened through sqlite_uri(), never by pasting a path into a
`file:` URI: SQLite reads `#`, `?` and `%` there as URI syntax.

database_operations() is the one place that chooses an engine: the commands
and clinical.restore call what it returns (SQLiteDatabase here, or
clinical.pg_backups.PostgresDatabase) and never look at the vendor.
"""

import hashlib
import os
import re
import sqlite3
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import quote, urlencode

from django.db import OperationalError, connection, connections
from django.db.migrations.loader import MigrationLoader

if TYPE_CHECKING:
    from clinical.pg_backups import PostgresDatabase

PAGES_PER_STEP = 1024
NAME_PATTERN = re.compile(r"^clinical-(\d{8}T\d{6}Z)(?:-(\d+))?\.db$")
DAMAGED_SUFFIX = "-damaged"  # outside NAME_PATTERN: never pruned, never taken for a checked backup
CLINICAL_TABLES = {"django_migrations", "recordings_recording", "clinical_changesequence", "auth_user"}
SIDE_FILES = ("-journal", "-wal", "-shm")
SQLITE_MAGIC = b"SQLite format 3\x00"
DUMP_MAGIC = b"PGDMP"  # pg_dump's custom format

Progress = Callable[[int, int], None]  # (pages copied, pages in all)


class BackupError(Exception):
    """A backup or restore that cannot go on; the message says why and what to do."""


class UnreadableDatabase(BackupError):
    """The source of a copy does not open as an SQLite database; `reason` is SQLite's word for it."""

    def __init__(self, reason: str):
        super().__init__(f"The copy failed: {reason}. Nothing was written under a final name.")
        self.reason = reason


class DamagedCopy(BackupError):
    """A copy that fails its integrity check."""


class MaintenanceError(BackupError):
    """Maintenance that stopped part way; the message says when to try again."""


@dataclass
class Backup:
    path: Path
    size: int
    recordings: int | None  # None: kept although it failed its check (damaged_ok)
    seconds: float

    @property
    def damaged(self) -> bool:
        return self.recordings is None


def sqlite_uri(path: Path, **params: str) -> str:
    """A `file:` URI naming exactly `path`, whatever its characters, with these query parameters.

    as_uri() percent-encodes every byte but letters, digits, `/` and `_.-~`
    (so `#`, `?`, `%`, spaces and non-ASCII bytes), and SQLite decodes %HH in
    the path; quote() rather than urlencode's default quote_plus, because
    SQLite does not read `+` as a space.
    """
    uri = Path(path).absolute().as_uri()
    return f"{uri}?{urlencode(params, quote_via=quote)}" if params else uri


def sqlite_open(path: Path, mode: str, **options) -> sqlite3.Connection:
    """Open `path` by URI: mode "ro" (read only), "rw" (never creates it) or "rwc"."""
    return sqlite3.connect(sqlite_uri(path, mode=mode), uri=True, **options)


def create_backup(
    source: Path, output_dir: Path, *, keep: int | None, progress: Progress | None = None, damaged_ok: bool = False
) -> Backup:
    """Copy `source` into output_dir/clinical-<UTC timestamp>.db, checked, then keep the newest `keep` (all: None).

    With damaged_ok (a restore saving what it replaces), a copy that fails its
    check is kept all the same, as clinical-<UTC timestamp>-damaged.db.
    """
    started = time.monotonic()
    if not source.is_file():
        raise BackupError(f"There is no database at {source}: check CLINICAL_DB_PATH.")
    backup_folder(output_dir)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    partial = output_dir / f".clinical-{stamp}.{os.getpid()}.partial"
    try:
        copy_database(source, partial, progress)
        try:
            recordings = check_copy(partial)
        except DamagedCopy:
            if not damaged_ok:
                raise
            recordings = None
        final = publish(partial, output_dir, stamp + ("" if recordings is not None else DAMAGED_SUFFIX))
    finally:
        _remove(partial)
    if keep is not None:
        prune(output_dir, keep, spare=final)
    return Backup(final, final.stat().st_size, recordings, time.monotonic() - started)


def backup_folder(output_dir: Path) -> Path:
    """Create the backup folder if need be; a BackupError when it cannot be written to."""
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BackupError(f"Cannot create the backup folder {output_dir}: {exc.strerror}.") from exc
    if not os.access(output_dir, os.W_OK | os.X_OK):
        raise BackupError(f"The backup folder {output_dir} is not writable: fix its permissions or choose another.")
    return output_dir


def copy_database(source: Path, target: Path, progress: Progress | None = None, *, read_only: bool = False) -> None:
    """A consistent copy of `source` into a single file `target` (new or empty), flushed to disk.

    The live database is opened "rw", so that a missing one is never created;
    an operator's file "ro", so that nothing is written to it.
    """
    with _closing(_snapshot(source, "ro" if read_only else "rw")) as src:
        try:
            with _closing(sqlite_open(target, "rwc", isolation_level=None)) as dst:
                src.backup(dst, pages=PAGES_PER_STEP, progress=_report(progress))
                dst.execute("PRAGMA journal_mode=DELETE")  # one self-contained file, no -wal beside it
            src.execute("COMMIT")
        except sqlite3.Error as exc:
            raise BackupError(f"The copy failed: {exc}. Nothing was written under a final name.") from exc
    fsync(target)


def _snapshot(source: Path, mode: str) -> sqlite3.Connection:
    # A connection inside a read transaction that has read: the snapshot starts there.
    src = None
    try:
        src = sqlite_open(source, mode, timeout=30, isolation_level=None)
        src.execute("BEGIN")
        src.execute("SELECT count(*) FROM sqlite_master").fetchone()
    except sqlite3.Error as exc:
        if src is not None:
            src.close()
        raise UnreadableDatabase(str(exc)) from exc
    return src


def check_copy(path: Path) -> int:
    """Run integrity_check on a copy; the number of recordings in it."""
    try:
        with _closing(sqlite_open(path, "ro")) as db:
            result = db.execute("PRAGMA integrity_check(1)").fetchall()
            if result != [("ok",)]:
                raise DamagedCopy(f"The copy failed its integrity check ({result[0][0]}); it was discarded.")
            return db.execute("SELECT count(*) FROM recordings_recording").fetchone()[0]
    except sqlite3.DatabaseError as exc:
        raise DamagedCopy(f"The copy failed its integrity check ({exc}); it was discarded.") from exc


def prune(output_dir: Path, keep: int, spare: Path | None = None, pattern: re.Pattern = NAME_PATTERN) -> list[Path]:
    """Delete this command's own backups (names matching `pattern`) beyond the newest `keep`, never `spare`."""
    ours = sorted(
        (path for path in output_dir.iterdir() if pattern.match(path.name)), key=lambda path: _age(path, pattern)
    )
    doomed = [path for path in (ours[:-keep] if keep else ours) if path != spare]
    for path in doomed:
        path.unlink(missing_ok=True)
    return doomed


def _age(path: Path, pattern: re.Pattern) -> tuple[str, int]:
    stamp, suffix = pattern.match(path.name).groups()
    return stamp, int(suffix or 1)


def database_path() -> Path:
    """The file the default connection uses (the test database under pytest)."""
    return Path(connections["default"].settings_dict["NAME"])


def database_operations() -> "SQLiteDatabase | PostgresDatabase":
    """Backups, restores and maintenance for the default connection's engine: the one place that chooses."""
    if connections["default"].vendor == "postgresql":
        from clinical.pg_backups import PostgresDatabase  # it builds on this module

        return PostgresDatabase(connections["default"])
    return SQLiteDatabase(database_path())


class SQLiteDatabase:
    """The operations on the SQLite database file, as the commands and clinical.restore call them."""

    def __init__(self, path: Path):
        self.path = path

    @property
    def name(self) -> str:
        return str(self.path)

    def describe(self) -> str:
        return f"SQLite database {self.path}"

    def exists(self) -> bool:
        return self.path.exists()

    def backup(
        self, output_dir: Path, *, keep: int | None, progress: Progress | None = None, damaged_ok: bool = False
    ) -> Backup:
        return create_backup(self.path, output_dir, keep=keep, progress=progress, damaged_ok=damaged_ok)

    def private_copy(self, file: Path, folder: Path):
        return private_copy(file, folder)

    def inspect_restore_source(self, copy: Path, *, shown_as: Path) -> set[tuple[str, str]]:
        return inspect_restore_source(copy, shown_as=shown_as)

    def restore(self, copy: Path, *, secure: list[tuple[str, str, list]]) -> int:
        """Put the copy in place, after running `secure` in it; how many admin sessions it held."""
        try:
            with _closing(sqlite_open(copy, "rw")) as db:
                tables = {name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
                has_sessions = "django_session" in tables
                (sessions,) = db.execute("SELECT COUNT(*) FROM django_session").fetchone() if has_sessions else (0,)
                for table, statement, params in secure:
                    if table in tables:
                        db.execute(statement.replace("%s", "?"), params)
                db.commit()
        except sqlite3.Error as exc:
            raise BackupError(f"The restore failed: {exc}.") from exc
        with self._replication_paused():
            restore_into(copy, self.path)
        return sessions

    @contextmanager
    def _replication_paused(self) -> Iterator[None]:
        # Litestream, while it replicates, must reopen the file once it is rewritten (clinical.replication).
        from clinical.replication import ReplicaError, configured_replication  # they build on this module

        replication = configured_replication()
        try:
            with replication.paused() if replication is not None else nullcontext():
                yield
        except ReplicaError as exc:  # only stopping it raises: nothing was restored yet
            message = f"Replication could not be paused for the restore ({exc}). Nothing was restored."
            raise BackupError(message) from exc

    def sizes(self) -> list[tuple[str, int]]:
        """(what, bytes): the file and its WAL."""
        wal = self.path.with_name(self.path.name + "-wal")
        return [
            (label, path.stat().st_size if path.exists() else 0)
            for label, path in (("Database", self.path), ("WAL", wal))
        ]

    def maintain(self) -> None:
        """Checkpoint and truncate the WAL, rebuild the file (VACUUM), refresh the planner's statistics.

        With a replica configured, Litestream owns the checkpoints: it holds a
        read transaction so that nobody checkpoints past what it has copied,
        and a TRUNCATE checkpoint would only wait out the busy timeout and
        fail; it checkpoints the WAL itself once it has shipped the VACUUM.
        """
        from clinical.replication import configured_replication  # it builds on this module

        checkpoint = [] if configured_replication() else ["PRAGMA wal_checkpoint(TRUNCATE)"]
        try:
            with connection.cursor() as cursor:
                for statement in [*checkpoint, "VACUUM", *checkpoint, "PRAGMA optimize"]:
                    cursor.execute(statement)
        except OperationalError as exc:
            raise MaintenanceError(f"Maintenance stopped: {exc}. Try again when the server is less busy.") from exc


@contextmanager
def private_copy(file: Path, folder: Path) -> Iterator[tuple[Path, str]]:
    """(a private copy of `file` in `folder`, the SHA-256 of `file`); the copy is removed on the way out.

    A restore checks and restores this copy, never `file` again by name: what
    is restored is what was checked, whatever happens to `file` meanwhile.
    The digest is of `file`'s bytes (what `sha256sum` prints), read from the
    same file that was copied: one that changes during the copy is refused.
    """
    if not file.is_file():
        raise BackupError(f"There is no file at {file}.")
    if file_magic(file).startswith(DUMP_MAGIC):
        raise BackupError(
            f"{file} is a PostgreSQL backup (pg_dump's custom format), and this database is SQLite: restore it "
            "where DATABASE_URL names a PostgreSQL database; it was not restored."
        )
    descriptor, name = tempfile.mkstemp(prefix=".clinical-restore-", suffix=".db", dir=backup_folder(folder))
    os.close(descriptor)
    copy = Path(name)
    try:
        identity, digest = identity_and_digest(file)
        try:
            copy_database(file, copy, read_only=True)
        except UnreadableDatabase as exc:
            raise BackupError(f"{file} is not a readable SQLite database ({exc.reason}); it was not restored.") from exc
        if file_identity(file.stat()) != identity:
            raise BackupError(f"{file} changed while it was being read; it was not restored: restore a file at rest.")
        yield copy, digest
    finally:
        _remove(copy)


def inspect_restore_source(path: Path, *, shown_as: Path | None = None) -> set[tuple[str, str]]:
    """Check a file is a sound clinical database this code knows; its applied migrations.

    Messages name `shown_as` (the operator's file) when `path` is a copy of it.
    """
    name = shown_as or path
    if not path.is_file():
        raise BackupError(f"There is no file at {name}.")
    try:
        with _closing(sqlite_open(path, "ro")) as db:
            result = db.execute("PRAGMA integrity_check(1)").fetchall()
            tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            if result != [("ok",)]:
                raise BackupError(f"{name} fails SQLite's integrity check ({result[0][0]}); it was not restored.")
            if not CLINICAL_TABLES <= tables:
                raise BackupError(f"{name} is an SQLite database, but not a clinical one; it was not restored.")
            applied = set(db.execute("SELECT app, name FROM django_migrations").fetchall())
    except sqlite3.DatabaseError as exc:
        raise BackupError(f"{name} is not a readable SQLite database ({exc}); it was not restored.") from exc
    return known_migrations(applied, shown_as=name)


def known_migrations(applied: set[tuple[str, str]], *, shown_as) -> set[tuple[str, str]]:
    """`applied` (app, name) pairs when this code has every one of them; a BackupError naming the others."""
    unknown = applied - set(MigrationLoader(None, ignore_no_migrations=True).disk_migrations)
    if unknown:
        names = ", ".join(f"{app}.{name}" for app, name in sorted(unknown))
        raise BackupError(
            f"{shown_as} comes from a newer version of this code (migrations {names}); it was not restored."
        )
    return applied


def restore_into(source: Path, live: Path) -> None:
    """Overwrite the live database with `source` (a private copy) through the backup API.

    The pages are written through SQLite's own locking, so connections that
    the server holds open see the restored data at their next transaction.
    """
    try:
        with _closing(sqlite_open(source, "ro")) as src, _closing(sqlite_open(live, "rwc", timeout=30)) as dst:
            src.backup(dst)
    except sqlite3.Error as exc:
        raise BackupError(f"The restore failed: {exc}.") from exc


def identity_and_digest(path: Path, copy_to: Path | None = None) -> tuple[tuple[int, ...], str]:
    """The file's identity (file_identity) as opened, and the SHA-256 of what was read; a copy of it into `copy_to`."""
    digest = hashlib.sha256()
    with path.open("rb") as file, copy_to.open("wb") if copy_to else nullcontext() as copy:
        identity = file_identity(os.fstat(file.fileno()))
        while chunk := file.read(1 << 20):
            digest.update(chunk)
            if copy is not None:
                copy.write(chunk)
    return identity, digest.hexdigest()


def file_identity(stat: os.stat_result) -> tuple[int, ...]:
    """What changes when a file is replaced or written to."""
    return stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns


def file_magic(path: Path) -> bytes:
    """The first bytes of a file, which say what kind of file it is."""
    with path.open("rb") as file:
        return file.read(len(SQLITE_MAGIC))


def _remove(path: Path) -> None:
    for name in (path.name, *(path.name + side for side in SIDE_FILES)):
        path.with_name(name).unlink(missing_ok=True)


def publish(partial: Path, output_dir: Path, stamp: str, suffix: str = ".db") -> Path:
    """Give a checked `partial` its final name, clinical-<stamp><suffix>, never replacing a file."""
    # link() never overwrites: two backups in the same second get -2, -3, ...
    for attempt in range(1, 100):
        final = output_dir / (f"clinical-{stamp}{suffix}" if attempt == 1 else f"clinical-{stamp}-{attempt}{suffix}")
        try:
            os.link(partial, final)
        except FileExistsError:
            continue
        fsync(output_dir)
        return final
    raise BackupError(f"Too many backups named clinical-{stamp}*{suffix} in {output_dir}.")


def fsync(path: Path) -> None:
    """Flush a file, or a folder's entries, to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _report(progress: Progress | None):
    if progress is None:
        return None
    return lambda status, remaining, total: progress(total - remaining, total)


class _closing:
    """sqlite3 connections' own context manager commits; this one closes."""

    def __init__(self, connection: sqlite3.Connection):
        self.connection = connection

    def __enter__(self) -> sqlite3.Connection:
        return self.connection

    def __exit__(self, *exc_info) -> None:
        self.connection.close()
