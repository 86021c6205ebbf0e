"""Hot backups and restores of the SQLite database through SQLite's online backup API.

A backup copies the database in chunks of pages, for progress, while the
source connection holds one read transaction: the copy is one consistent
snapshot, and writers elsewhere (WAL mode) go on. Without that transaction,
SQLite restarts a chunked backup whenever another connection writes, and
under steady writes it never finishes.

Every file is opened through sqlite_uri(), never by pasting a path into a
`file:` URI: SQLite reads `#`, `?` and `%` there as URI syntax.
"""

import hashlib
import os
import re
import sqlite3
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import quote, urlencode

from django.db import connections
from django.db.migrations.loader import MigrationLoader

PAGES_PER_STEP = 1024
NAME_PATTERN = re.compile(r"^clinical-(\d{8}T\d{6}Z)(?:-(\d+))?\.db$")
DAMAGED_SUFFIX = "-damaged"  # outside NAME_PATTERN: never pruned, never taken for a checked backup
CLINICAL_TABLES = {"django_migrations", "recordings_recording", "clinical_changesequence", "auth_user"}
SIDE_FILES = ("-journal", "-wal", "-shm")

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
        final = _publish(partial, output_dir, stamp + ("" if recordings is not None else DAMAGED_SUFFIX))
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
    _fsync(target)


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


def prune(output_dir: Path, keep: int, spare: Path | None = None) -> list[Path]:
    """Delete this command's own backups beyond the newest `keep` (never `spare`); what went."""
    ours = sorted((path for path in output_dir.iterdir() if NAME_PATTERN.match(path.name)), key=_age)
    doomed = [path for path in (ours[:-keep] if keep else ours) if path != spare]
    for path in doomed:
        path.unlink(missing_ok=True)
    return doomed


def _age(path: Path) -> tuple[str, int]:
    stamp, suffix = NAME_PATTERN.match(path.name).groups()
    return stamp, int(suffix or 1)


def database_path() -> Path:
    """The file the default connection uses (the test database under pytest)."""
    return Path(connections["default"].settings_dict["NAME"])


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
    descriptor, name = tempfile.mkstemp(prefix=".clinical-restore-", suffix=".db", dir=backup_folder(folder))
    os.close(descriptor)
    copy = Path(name)
    try:
        identity, digest = _identity_and_digest(file)
        try:
            copy_database(file, copy, read_only=True)
        except UnreadableDatabase as exc:
            raise BackupError(f"{file} is not a readable SQLite database ({exc.reason}); it was not restored.") from exc
        if _identity(file.stat()) != identity:
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
    unknown = applied - set(MigrationLoader(None, ignore_no_migrations=True).disk_migrations)
    if unknown:
        names = ", ".join(f"{app}.{name}" for app, name in sorted(unknown))
        raise BackupError(f"{name} comes from a newer version of this code (migrations {names}); it was not restored.")
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


def _identity_and_digest(path: Path) -> tuple[tuple[int, ...], str]:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        identity = _identity(os.fstat(file.fileno()))
        while chunk := file.read(1 << 20):
            digest.update(chunk)
    return identity, digest.hexdigest()


def _identity(stat: os.stat_result) -> tuple[int, ...]:
    return stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns


def _remove(path: Path) -> None:
    for name in (path.name, *(path.name + side for side in SIDE_FILES)):
        path.with_name(name).unlink(missing_ok=True)


def _publish(partial: Path, output_dir: Path, stamp: str) -> Path:
    # link() never overwrites: two backups in the same second get -2, -3, ...
    for attempt in range(1, 100):
        final = output_dir / (f"clinical-{stamp}.db" if attempt == 1 else f"clinical-{stamp}-{attempt}.db")
        try:
            os.link(partial, final)
        except FileExistsError:
            continue
        _fsync(output_dir)
        return final
    raise BackupError(f"Too many backups named clinical-{stamp}*.db in {output_dir}.")


def _fsync(path: Path) -> None:
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
