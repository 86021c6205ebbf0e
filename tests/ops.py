"""Helpers for the operations tests: manage.py on a database file of our own, and ways to break one."""

import hashlib
import sqlite3
import subprocess
import sys
from contextlib import closing
from pathlib import Path

from clinical.backups import sqlite_open
from tests.server import REPO_ROOT, Server

COMMAND_TIMEOUT = 120


def manage(db_path: Path, *args: str, **run_options) -> subprocess.CompletedProcess:
    """`manage.py *args` in a process of its own, on `db_path` (CLINICAL_DB_PATH), output captured as text."""
    options = {"capture_output": True, "text": True, "timeout": COMMAND_TIMEOUT, **run_options}
    return subprocess.run(_manage_command(*args), cwd=REPO_ROOT, env=_manage_env(db_path), check=False, **options)


def manage_started(db_path: Path, *args: str, **popen_options) -> subprocess.Popen:
    """`manage.py *args` started on `db_path`, for a test that talks to it while it runs (a prompt)."""
    return subprocess.Popen(_manage_command(*args), cwd=REPO_ROOT, env=_manage_env(db_path), **popen_options)


def _manage_command(*args: str) -> list[str]:
    return [sys.executable, "manage.py", *args]


def _manage_env(db_path: Path) -> dict[str, str]:
    return Server(Path(db_path).parent, db_path=db_path).env


def query(db_path: Path, sql: str, params=()) -> list[tuple]:
    with closing(sqlite3.connect(db_path)) as db:
        return db.execute(sql, params).fetchall()


def write(db_path: Path, sql: str, params=()) -> int:
    """One statement, committed, as a change behind the server's back (an operator's shell); rows changed."""
    with closing(sqlite3.connect(db_path, timeout=30)) as db, db:
        return db.execute(sql, params).rowcount


def integrity(db_path: Path) -> list[tuple]:
    with closing(sqlite_open(db_path, "ro")) as db:  # read only, whatever characters the path holds
        return db.execute("PRAGMA integrity_check").fetchall()


def recording_ids(db_path: Path) -> set[str]:
    """The ids in a database file, as 32 hex digits (how Django stores a UUID on SQLite)."""
    return {row[0] for row in query(db_path, "SELECT id FROM recordings_recording")}


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def checkpoint(db_path: Path) -> None:
    """Move everything in the WAL into the main file, so that its bytes are the whole database."""
    with closing(sqlite3.connect(db_path)) as db:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")


def break_an_index(db_path: Path, index: str = "rec_status") -> None:
    """Change rows behind an index's back: the file still opens, and integrity_check lists the damage."""
    checkpoint(db_path)
    with closing(sqlite3.connect(db_path, isolation_level=None)) as db:
        row = db.execute("SELECT type, name, tbl_name, rootpage, sql FROM sqlite_master WHERE name = ?", [index])
        definition = row.fetchone()
        db.execute("PRAGMA writable_schema = ON")
        db.execute("DELETE FROM sqlite_master WHERE name = ?", [index])
    with closing(sqlite3.connect(db_path, isolation_level=None)) as db:
        db.execute("UPDATE recordings_recording SET status = 'failed' WHERE rowid IN (1, 2, 3)")
        db.execute("PRAGMA writable_schema = ON")
        db.execute("INSERT INTO sqlite_master VALUES (?, ?, ?, ?, ?)", definition)


def break_a_page(db_path: Path, table: str) -> None:
    """Overwrite the root page of a table or index with garbage."""
    checkpoint(db_path)
    with closing(sqlite3.connect(db_path)) as db:
        (root,) = db.execute("SELECT rootpage FROM sqlite_master WHERE name = ?", [table]).fetchone()
        (page_size,) = db.execute("PRAGMA page_size").fetchone()
    with open(db_path, "r+b") as file:
        file.seek((root - 1) * page_size)
        file.write(b"\xff" * page_size)


CORRUPTIONS = {
    # integrity_check answers with a list of what is wrong
    "stale-index": break_an_index,
    "garbage-table-page": lambda path: break_a_page(path, "recordings_recording"),
    # integrity_check itself fails: "database disk image is malformed"
    "garbage-index-page": lambda path: break_a_page(path, "rec_status"),
}
