"""Hot backups and restores of the SQLite database through SQLite's online backup API.

A backup copies the database in chunks of pages, for progress, while the
source connection holds one read transaction: the copy is one consistent
snapshot, and writers elsewhere (WAL mode) go on. Without that transaction,
SQLite restarts a chunked backup whenever another connection writes, and
under steady writes it never finishes.
"""

import os
import re
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from django.db import connections
from django.db.migrations.loader import MigrationLoader

PAGES_PER_STEP = 1024
NAME_PATTERN = re.compile(r"^clinical-(\d{8}T\d{6}Z)(?:-(\d+))?\.db$")
CLINICAL_TABLES = {"django_migrations", "recordings_recording", "clinical_changesequence", "auth_user"}

Progress = Callable[[int, int], None]  # (pages copied, pages in all)


class BackupError(Exception):
    """A backup or restore that cannot go on; the message says why and what to do."""


@dataclass
class Backup:
    path: Path
    size: int
    recordings: int
    seconds: float


def create_backup(source: Path, output_dir: Path, *, keep: int | None, progress: Progress | None = None) -> Backup:
    """Copy `source` into output_dir/clinical-<UTC timestamp>.db, checked, then keep the newest `keep` (all: None)."""
    started = time.monotonic()
    if not source.is_file():
        raise BackupError(f"There is no database at {source}: check CLINICAL_DB_PATH.")
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BackupError(f"Cannot create the backup folder {output_dir}: {exc.strerror}.") from exc
    if not os.access(output_dir, os.W_OK | os.X_OK):
        raise BackupError(f"The backup folder {output_dir} is not writable: fix its permissions or choose another.")
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    partial = output_dir / f".clinical-{stamp}.{os.getpid()}.partial"
    try:
        copy_database(source, partial, progress)
        recordings = check_copy(partial)
        final = _publish(partial, output_dir, stamp)
    finally:
        partial.unlink(missing_ok=True)
        partial.with_name(partial.name + "-journal").unlink(missing_ok=True)
    if keep is not None:
        prune(output_dir, keep, spare=final)
    return Backup(final, final.stat().st_size, recordings, time.monotonic() - started)


def copy_database(source: Path, target: Path, progress: Progress | None = None) -> None:
    """A consistent copy of `source` into a new single file `target`, flushed to disk."""
    try:
        with _closing(sqlite3.connect(source, timeout=30, isolation_level=None)) as src:
            src.execute("BEGIN")
            src.execute("SELECT count(*) FROM sqlite_master").fetchone()  # the snapshot starts here
            with _closing(sqlite3.connect(target, isolation_level=None)) as dst:
                src.backup(dst, pages=PAGES_PER_STEP, progress=_report(progress))
                dst.execute("PRAGMA journal_mode=DELETE")  # one self-contained file, no -wal beside it
            src.execute("COMMIT")
    except sqlite3.Error as exc:
        raise BackupError(f"The copy failed: {exc}. Nothing was written under a final name.") from exc
    _fsync(target)


def check_copy(path: Path) -> int:
    """Run integrity_check on a copy; the number of recordings in it."""
    try:
        with _closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
            result = db.execute("PRAGMA integrity_check(1)").fetchall()
            if result != [("ok",)]:
                raise BackupError(f"The copy failed its integrity check ({result[0][0]}); it was discarded.")
            return db.execute("SELECT count(*) FROM recordings_recording").fetchone()[0]
    except sqlite3.DatabaseError as exc:
        raise BackupError(f"The copy failed its integrity check ({exc}); it was discarded.") from exc


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


def inspect_restore_source(path: Path) -> set[tuple[str, str]]:
    """Check a file is a sound clinical database this code knows; its applied migrations."""
    if not path.is_file():
        raise BackupError(f"There is no file at {path}.")
    try:
        with _closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
            result = db.execute("PRAGMA integrity_check(1)").fetchall()
            tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            if result != [("ok",)]:
                raise BackupError(f"{path} fails SQLite's integrity check ({result[0][0]}); it was not restored.")
            if not CLINICAL_TABLES <= tables:
                raise BackupError(f"{path} is an SQLite database, but not a clinical one; it was not restored.")
            applied = set(db.execute("SELECT app, name FROM django_migrations").fetchall())
    except sqlite3.DatabaseError as exc:
        raise BackupError(f"{path} is not a readable SQLite database ({exc}); it was not restored.") from exc
    unknown = applied - set(MigrationLoader(None, ignore_no_migrations=True).disk_migrations)
    if unknown:
        names = ", ".join(f"{app}.{name}" for app, name in sorted(unknown))
        raise BackupError(f"{path} comes from a newer version of this code (migrations {names}); it was not restored.")
    return applied


def restore_into(source: Path, live: Path) -> None:
    """Overwrite the live database with `source` through the backup API.

    The pages are written through SQLite's own locking, so connections that
    the server holds open see the restored data at their next transaction.
    """
    try:
        with _closing(sqlite3.connect(f"file:{source}?mode=ro", uri=True)) as src:
            with _closing(sqlite3.connect(live, timeout=30)) as dst:
                src.backup(dst)
    except sqlite3.Error as exc:
        raise BackupError(f"The restore failed: {exc}. The backup taken just before is intact.") from exc


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
