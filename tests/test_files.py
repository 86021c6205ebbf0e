"""Patient data on disk is its owner's alone: folders 0700, files 0600, whatever the umask."""

import os
import stat
from pathlib import Path

import pytest

from tests.ops import manage
from tests.server import Server

pytestmark = pytest.mark.sqlite_only  # SQLite's own files, pragmas and backup API


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def loose_umask():
    os.umask(0o022)


def test_a_new_database_its_wal_and_a_backup_are_private_under_a_loose_umask(tmp_path):
    db_path = tmp_path / "data" / "clinical.db"
    backups = tmp_path / "backups"
    server = Server(tmp_path, db_path=db_path)

    migrated = manage(db_path, "migrate", "--noinput", preexec_fn=loose_umask)
    server.create_users("alice")
    previous = os.umask(0o022)  # the server process inherits it
    try:
        with server:
            with server.client(server.login("alice")) as client:
                client.post("/recordings", json={"patient_ref": "PAT-1"})
            backed_up = manage(db_path, "backupdb", "--output-dir", str(backups), preexec_fn=loose_umask)
            files = [db_path, server.wal_path, server.shm_path, *backups.iterdir()]
            modes = {path.name: mode(path) for path in files}
    finally:
        os.umask(previous)

    assert (migrated.returncode, backed_up.returncode) == (0, 0), backed_up.stderr
    assert mode(db_path.parent) == 0o700
    assert mode(backups) == 0o700
    assert len(modes) == 4
    assert modes == dict.fromkeys(modes, 0o600)


def test_modes_made_before_are_repaired_at_start_with_a_log_line(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    db_path = folder / "clinical.db"
    manage(db_path, "migrate", "--noinput")
    folder.chmod(0o755)
    side = [db_path.with_name("clinical.db-wal"), db_path.with_name("clinical.db-shm")]
    for path in [db_path, *side]:
        path.touch()
        path.chmod(0o644)

    checked = manage(db_path, "check", preexec_fn=loose_umask)

    assert checked.returncode == 0
    assert {path.name: mode(path) for path in [db_path, *side]} == dict.fromkeys(
        [p.name for p in [db_path, *side]], 0o600
    )
    assert f"Made {db_path} private: mode 644 -> 600" in checked.stderr
    assert mode(folder) == 0o755  # a folder CLINICAL_DB_PATH names is the operator's: /tmp must stay /tmp

    again = manage(db_path, "check")

    assert "private" not in again.stderr
