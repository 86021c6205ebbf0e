"""The operations commands on real database files: backupdb, restoredb, vacuumdb, seeddb.

Commands run in-process with call_command on the file Django's connection uses
(which the tests point at a file of their own), and in a process
of their own (manage.py with CLINICAL_DB_PATH) where a process is the point:
a full disk, no terminal, a migration, determinism across runs.
"""

import os
import pty
import re
import resource
import signal
import sqlite3
import subprocess
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing, contextmanager
from datetime import UTC, datetime, timedelta
from io import StringIO
from pathlib import Path

import pytest
from asgiref.sync import sync_to_async
from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import connection
from django.utils import timezone

from clinical.backups import NAME_PATTERN, BackupError, check_copy, prune
from clinical.models import IdempotencyKey, LoginAttempt, Token
from clinical.tokens import token_issue
from recordings.models import Recording, Status
from recordings.seeding import LIFE_CYCLE
from tests.ops import CORRUPTIONS, break_an_index, integrity, manage, query, recording_ids, sha256
from tests.server import Server, clone_database

pytestmark = pytest.mark.sqlite_only  # SQLite's own files, pragmas and backup API

SEEDED = 1_000
NOT_A_DATABASE = b"this is not a SQLite database, only text where a backup should be\n" * 64
# Drawn relative to the time of the run (the digest covers recorded_at).
TIME_FIELDS = ("recorded_at", "created_at", "updated_at", "audio_path", "digest")


@pytest.fixture(scope="session")
def migrated_db(tmp_path_factory):
    """A migrated database file with one clinician; tests copy it."""
    template = Server(tmp_path_factory.mktemp("ops-migrated"))
    template.prepare("alice")
    return template.db_path


@pytest.fixture(scope="session")
def seeded_db(tmp_path_factory, migrated_db):
    """The migrated file with SEEDED recordings of alice (a few MB)."""
    path = tmp_path_factory.mktemp("ops-seeded") / "clinical.db"
    clone_database(migrated_db, path)
    done = manage(path, "seeddb", "--count", str(SEEDED), "--user", "alice", "--seed", "1")
    assert done.returncode == 0, done.stderr
    return path


@contextmanager
def connected_to(path: Path):
    """Django's default connection on another file for a while: what the commands work on."""
    original = connection.settings_dict["NAME"]
    connection.close()
    connection.settings_dict["NAME"] = path
    try:
        yield path
    finally:
        connection.close()
        connection.settings_dict["NAME"] = original


@pytest.fixture
def live_db(tmp_path, seeded_db, django_db_blocker):
    """Our own copy of the seeded file, as the connection's database: what backupdb and restoredb work on."""
    path = tmp_path / "live" / "clinical.db"
    path.parent.mkdir()
    clone_database(seeded_db, path)
    with django_db_blocker.unblock(), connected_to(path):
        yield path


def run(*args, **options) -> tuple[str, str]:
    out, err = StringIO(), StringIO()
    call_command(*args, stdout=out, stderr=err, **options)
    return out.getvalue(), err.getvalue()


def ours(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir() if NAME_PATTERN.match(path.name))


# backupdb


def test_backupdb_writes_a_checked_copy_and_says_where(live_db, tmp_path, capsys):
    output = tmp_path / "backups"
    started = datetime.now(UTC).replace(microsecond=0)

    out, _ = run("backupdb", output_dir=output)

    [name] = ours(output)
    backup = output / name
    stamp = datetime.strptime(name, "clinical-%Y%m%dT%H%M%SZ.db").replace(tzinfo=UTC)
    assert started <= stamp <= datetime.now(UTC)
    assert os.listdir(output) == [name]  # no temporary file left beside it
    assert integrity(backup) == [("ok",)]
    assert recording_ids(backup) == recording_ids(live_db)
    assert query(backup, "PRAGMA journal_mode") == [("delete",)]  # one self-contained file
    assert f"Backed up to {backup}" in out
    assert f"({backup.stat().st_size:,} bytes, {SEEDED:,} recordings, " in out
    assert re.search(r", \d+\.\d\d s\)", out)
    assert capsys.readouterr().err == ""  # no progress display without a terminal


def test_backupdb_shows_progress_on_a_terminal(seeded_db, tmp_path):
    source = tmp_path / "live" / "clinical.db"
    source.parent.mkdir()
    clone_database(seeded_db, source)
    controller, terminal = pty.openpty()
    try:
        done = manage(
            source,
            "backupdb",
            "--output-dir",
            str(tmp_path / "backups"),
            capture_output=False,
            stdout=subprocess.PIPE,
            stderr=terminal,
        )
        os.close(terminal)
        terminal = None
        shown = b""
        while chunk := _read(controller):
            shown += chunk
    finally:
        os.close(controller)
        if terminal is not None:
            os.close(terminal)

    assert done.returncode == 0
    assert "Copying: 100%" in shown.decode()


def _read(fd: int) -> bytes:
    try:
        return os.read(fd, 65536)
    except OSError:  # EIO: the other end is closed
        return b""


def test_backupdb_keeps_the_newest_n_of_its_own_and_nothing_else_goes(live_db, tmp_path):
    output = tmp_path / "backups"
    output.mkdir()
    old = ["clinical-20200101T000000Z.db", "clinical-20200102T000000Z.db", "clinical-20200103T000000Z.db"]
    foreign = [
        "clinical-latest.db",
        "clinical-20190101T000000Z.db.bak",
        "clinical-20190101T000000Z.sqlite",
        "other-20190101T000000Z.db",
        "clinical-2019-01-01.db",
        "notes.txt",
    ]
    for name in old + foreign:
        (output / name).write_bytes(name.encode())

    run("backupdb", output_dir=output, keep=2)

    kept = ours(output)
    assert len(kept) == 2
    assert kept[0] == "clinical-20200103T000000Z.db"
    assert integrity(output / kept[1]) == [("ok",)]
    assert all((output / name).read_bytes() == name.encode() for name in foreign)


class FrozenClock(datetime):
    @classmethod
    def now(cls, tz=None):
        return datetime(2024, 1, 1, 12, 0, 0, tzinfo=tz)


def test_backupdb_twice_in_one_second_keeps_the_newer_backup(live_db, tmp_path, monkeypatch):
    monkeypatch.setattr("clinical.backups.datetime", FrozenClock)
    run("backupdb", output_dir=tmp_path, keep=1)

    out, _ = run("backupdb", output_dir=tmp_path, keep=1)

    assert ours(tmp_path) == ["clinical-20240101T120000Z-2.db"]
    assert f"Backed up to {tmp_path / 'clinical-20240101T120000Z-2.db'}" in out


def test_prune_keeps_the_later_of_two_backups_made_in_the_same_second(tmp_path):
    # _publish names the second backup of a second -2, the tenth -10: each newer than the one before.
    for name in ("clinical-20240101T000000Z.db", "clinical-20240101T000000Z-2.db", "clinical-20240101T000000Z-10.db"):
        (tmp_path / name).write_bytes(b"")

    prune(tmp_path, 1)

    assert ours(tmp_path) == ["clinical-20240101T000000Z-10.db"]


def test_backupdb_refuses_to_keep_nothing(live_db, tmp_path):
    with pytest.raises(CommandError, match="--keep must be at least 1"):
        run("backupdb", output_dir=tmp_path, keep=0)

    assert ours(tmp_path) == []


def test_backupdb_of_a_missing_database_fails_and_writes_nothing(tmp_path):
    missing = tmp_path / "nowhere" / "clinical.db"
    output = tmp_path / "backups"

    with (
        connected_to(missing),
        pytest.raises(CommandError, match=r"There is no database at .*nowhere.*CLINICAL_DB_PATH"),
    ):
        run("backupdb", output_dir=output)

    assert not missing.exists()
    assert not output.exists() or os.listdir(output) == []


@pytest.mark.parametrize("where", ["under-a-file", "is-a-file"])
def test_backupdb_into_a_folder_it_cannot_create_fails_clearly(live_db, tmp_path, where):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    output = blocker / "backups" if where == "under-a-file" else blocker

    with pytest.raises(CommandError, match=r"Cannot create the backup folder .*a-file"):
        run("backupdb", output_dir=output)

    assert blocker.read_text() == "not a folder"
    assert [path.name for path in tmp_path.iterdir() if path.is_file()] == ["a-file"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into any folder whatever its mode")
def test_backupdb_into_a_read_only_folder_fails_clearly(live_db, tmp_path):
    output = tmp_path / "read-only"
    output.mkdir()
    output.chmod(0o555)
    try:
        with pytest.raises(CommandError, match="is not writable"):
            run("backupdb", output_dir=output)
    finally:
        output.chmod(0o755)

    assert os.listdir(output) == []


def test_backupdb_on_a_full_disk_fails_clearly_and_leaves_nothing(seeded_db, tmp_path):
    source = tmp_path / "live" / "clinical.db"
    source.parent.mkdir()
    clone_database(seeded_db, source)
    output = tmp_path / "backups"
    output.mkdir()
    limit = source.stat().st_size // 3

    def small_disk():
        # A file can grow to `limit` bytes, then writes fail with EFBIG, as on a full disk.
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    done = manage(source, "backupdb", "--output-dir", str(output), preexec_fn=small_disk)

    assert done.returncode != 0
    # SQLite says "disk is full" on ENOSPC and "disk I/O error" on EFBIG, which is what the limit gives.
    assert "The copy failed:" in done.stderr
    assert "Nothing was written under a final name." in done.stderr
    assert "Traceback" not in done.stderr
    assert ours(output) == []
    assert os.listdir(output) == []  # nor any temporary file


@pytest.mark.parametrize("corruption", CORRUPTIONS)
def test_check_copy_refuses_a_corrupt_copy(seeded_db, tmp_path, corruption):
    copy = tmp_path / "copy.db"
    clone_database(seeded_db, copy)
    CORRUPTIONS[corruption](copy)

    with pytest.raises(BackupError, match="integrity check"):
        check_copy(copy)


@pytest.mark.parametrize("corruption", CORRUPTIONS)
def test_backupdb_of_a_corrupt_database_fails_clearly_and_leaves_nothing(live_db, tmp_path, corruption):
    CORRUPTIONS[corruption](live_db)
    output = tmp_path / "backups"

    with pytest.raises(CommandError, match="integrity check"):
        run("backupdb", output_dir=output)

    assert os.listdir(output) == []


@pytest.mark.django_db(transaction=True)
def test_backupdb_in_process_copies_the_database_django_is_connected_to(tmp_path):
    # No settings override here: the command must copy the file its own connection uses.
    owner = get_user_model().objects.create_user("in-process")
    call_command("seeddb", count=3, user=owner.username, seed=5, stdout=StringIO(), stderr=StringIO())
    expected = {recording.id.hex for recording in Recording.objects.filter(owner=owner)}

    run("backupdb", output_dir=tmp_path)

    [name] = ours(tmp_path)
    assert expected <= recording_ids(tmp_path / name)


# restoredb


def _not_clinical(path: Path) -> None:
    path.unlink()
    with closing(sqlite3.connect(path)) as db:
        db.execute("CREATE TABLE notes (id INTEGER PRIMARY KEY, text TEXT)")
        db.execute("INSERT INTO notes (text) VALUES ('shopping list')")
        db.commit()


def _from_a_newer_version(path: Path) -> None:
    with closing(sqlite3.connect(path)) as db:
        db.execute(
            "INSERT INTO django_migrations (app, name, applied) VALUES ('recordings', '0999_from_the_future', ?)",
            [datetime.now(UTC).isoformat()],
        )
        db.commit()


UNRESTORABLE = {
    "garbage": (lambda path: path.write_bytes(NOT_A_DATABASE), "not a readable SQLite database"),
    "not-clinical": (_not_clinical, "is an SQLite database, but not a clinical one"),
    "newer-schema": (_from_a_newer_version, r"newer version of this code \(migrations recordings.0999_from_the_future"),
    "fails-integrity-check": (break_an_index, "fails SQLite's integrity check"),
    "missing": (lambda path: path.unlink(), "There is no file at"),
}


@pytest.mark.parametrize("case", UNRESTORABLE)
def test_restoredb_refuses_what_it_cannot_restore_and_touches_nothing(live_db, tmp_path, case):
    candidate = tmp_path / "candidate.db"
    clone_database(live_db, candidate)
    spoil, message = UNRESTORABLE[case]
    spoil(candidate)
    before = sha256(live_db)
    output = tmp_path / "backups"

    with pytest.raises(CommandError, match=message):
        run("restoredb", candidate, yes=True, output_dir=output)

    assert sha256(live_db) == before
    assert not output.exists() or os.listdir(output) == []


def test_restoredb_without_yes_and_without_a_terminal_refuses(seeded_db, tmp_path):
    live = tmp_path / "live" / "clinical.db"
    live.parent.mkdir()
    clone_database(seeded_db, live)
    candidate = tmp_path / "candidate.db"
    clone_database(live, candidate)
    with closing(sqlite3.connect(candidate)) as db:
        db.execute("DELETE FROM recordings_recording")
        db.commit()
    before = sha256(live)
    output = tmp_path / "backups"

    done = manage(live, "restoredb", str(candidate), "--output-dir", str(output), stdin=subprocess.DEVNULL)

    assert done.returncode != 0
    assert "Refusing to restore without confirmation" in done.stderr
    assert "--yes" in done.stderr
    assert sha256(live) == before
    assert not output.exists() or os.listdir(output) == []


def test_restoredb_of_an_older_backup_migrates_it_and_backs_up_first(migrated_db, seeded_db, tmp_path):
    live = tmp_path / "live" / "clinical.db"
    live.parent.mkdir()
    clone_database(seeded_db, live)
    older = tmp_path / "older.db"
    clone_database(migrated_db, older)
    with closing(sqlite3.connect(older)) as db:  # as if made before the sessions app was installed
        db.execute("DROP TABLE django_session")
        db.execute("DELETE FROM django_migrations WHERE app = 'sessions'")
        db.commit()
    output = tmp_path / "backups"

    done = manage(live, "restoredb", str(older), "--yes", "--output-dir", str(output))

    assert done.returncode == 0, done.stderr
    assert query(live, "SELECT name FROM django_migrations WHERE app = 'sessions'") == [("0001_initial",)]
    assert query(live, "SELECT count(*) FROM sqlite_master WHERE name = 'django_session'") == [(1,)]
    assert query(live, "SELECT count(*) FROM recordings_recording") == [(0,)]
    assert integrity(live) == [("ok",)]
    [safety] = ours(output)
    assert f"Backed up the current database to {output / safety} first." in done.stdout
    assert query(output / safety, "SELECT count(*) FROM recordings_recording") == [(SEEDED,)]


# vacuumdb


@pytest.mark.django_db(transaction=True)
def test_vacuumdb_shrinks_the_file_and_purges_what_expired(settings):
    database = Path(connection.settings_dict["NAME"])  # what vacuumdb works on and measures
    call_command("seeddb", count=1_500, user="vacuum", seed=3, stdout=StringIO(), stderr=StringIO())
    call_command("seeddb", count=0, user="vacuum", clear=True, yes=True, stdout=StringIO(), stderr=StringIO())
    owner = get_user_model().objects.get(username="vacuum")
    now = timezone.now()
    tokens = [token_issue(user=owner)[1] for _ in range(3)]
    Token.objects.filter(pk__in=[tokens[0].pk, tokens[1].pk]).update(expires_at=now - timedelta(minutes=1))
    keys = [
        IdempotencyKey.objects.create(
            user=owner, key=f"key-{age}", fingerprint="f", status_code=201, body=b"{}", created_at=now - age
        )
        for age in (settings.CLINICAL_IDEMPOTENCY_TTL + timedelta(hours=1), timedelta(minutes=5))
    ]
    window = timedelta(minutes=settings.CLINICAL_LOGIN_WINDOW_MINUTES)
    attempts = [
        LoginAttempt.objects.create(username="vacuum", started_at=now - age, outcome="failed")
        for age in (window + timedelta(days=1, minutes=1), window)
    ]
    wal = database.with_name(database.name + "-wal")
    size_before = database.stat().st_size

    out, _ = run("vacuumdb")

    size_after = database.stat().st_size
    assert size_after < size_before / 2
    assert not wal.exists() or wal.stat().st_size == 0
    assert "Purged 2 expired tokens, 1 expired idempotency keys and 1 old login attempts." in out
    assert f"Database: {size_before:,} -> {size_after:,} bytes; WAL: " in out
    assert re.search(r"WAL: [\d,]+ -> 0 bytes\.", out)
    assert list(Token.objects.values_list("pk", flat=True)) == [tokens[2].pk]
    assert list(IdempotencyKey.objects.values_list("pk", flat=True)) == [keys[1].pk]
    assert list(LoginAttempt.objects.values_list("pk", flat=True)) == [attempts[1].pk]
    assert Recording.objects.filter(owner=owner).count() == 0


# seeddb


async def list_all(api, user) -> dict:
    items, total = {}, None
    while total is None or len(items) < total:
        response = await api.get(f"/recordings?limit=200&offset={len(items)}", user=user)
        assert response.status_code == 200, response.text
        page = response.json()
        total = page["count"]
        if not page["items"]:
            break
        items.update({item["id"]: item for item in page["items"]})
    return {"count": total, "items": items}


async def walk(api, user, since: int = 0) -> tuple[list[dict], int]:
    changes = []
    while True:
        response = await api.get(f"/sync/changes?since={since}&limit=500", user=user)
        assert response.status_code == 200, response.text
        page = response.json()
        changes += page["changes"]
        since = page["cursor"]
        if not page["has_more"]:
            return changes, since


@pytest.mark.django_db(transaction=True)
async def test_seeddb_recordings_are_listed_by_the_api_and_walked_by_the_sync_feed(api, make_recording):
    count = 600

    out, _ = await sync_to_async(run)("seeddb", count=count, user="carol", seed=7)

    carol = await get_user_model().objects.aget(username="carol")
    listed = await list_all(api, carol)
    changes, cursor = await walk(api, carol)
    assert "Created the clinician 'carol'" in out
    assert f"Seeded {count:,} recordings for 'carol'" in out
    assert listed["count"] == count
    assert len(listed["items"]) == count
    assert {item["status"] for item in listed["items"].values()} == {status.value for status in Status}
    assert all(item["version"] == LIFE_CYCLE[item["status"]] for item in listed["items"].values())
    assert all(item["patient_ref"].startswith("PAT-") and item["title"] for item in listed["items"].values())
    assert all(
        bool(item["transcript"]) == (item["status"] in ("transcribed", "verified")) for item in listed["items"].values()
    )
    assert [change["id"] for change in changes if not change["deleted"]] == [change["id"] for change in changes]
    assert {change["id"] for change in changes} == set(listed["items"])
    assert len(changes) == count
    numbers = [change["change_seq"] for change in changes]
    assert numbers == sorted(set(numbers))
    assert all(change["version"] == listed["items"][change["id"]]["version"] for change in changes)

    later = await make_recording(owner=carol, title="after the seeding")
    after, _ = await walk(api, carol, since=cursor)

    assert [change["id"] for change in after] == [str(later.id)]


@pytest.mark.django_db(transaction=True)
def test_seeddb_for_an_existing_clinician_does_not_create_one():
    get_user_model().objects.create_user("dora")

    out, _ = run("seeddb", count=5, user="dora", seed=1)

    assert "Created the clinician" not in out
    assert Recording.objects.filter(owner__username="dora").count() == 5


@pytest.mark.django_db(transaction=True)
def test_seeddb_twice_with_the_same_seed_says_what_to_do():
    run("seeddb", count=5, user="erin", seed=1)

    with pytest.raises(CommandError, match="add --clear, or use another --seed"):
        run("seeddb", count=5, user="erin", seed=1)


def _rows(db_path: Path) -> list[dict]:
    """Every recording in change order, without what is drawn relative to the time of the run."""
    with closing(sqlite3.connect(db_path)) as db:
        db.row_factory = sqlite3.Row
        rows = db.execute("SELECT * FROM recordings_recording ORDER BY change_seq").fetchall()
    return [
        {**{key: row[key] for key in row.keys() if key not in TIME_FIELDS}, "audio": row["audio_path"][-12:]}
        for row in rows
    ]


def test_seeddb_with_the_same_seed_gives_the_same_recordings(migrated_db, tmp_path):
    paths = [tmp_path / name / "clinical.db" for name in ("first", "second")]
    for path in paths:
        path.parent.mkdir()
        clone_database(migrated_db, path)

    with ThreadPoolExecutor(2) as pool:
        runs = list(pool.map(lambda path: manage(path, "seeddb", "--count", "300", "--seed", "42"), paths))

    assert [done.returncode for done in runs] == [0, 0], [done.stderr for done in runs]
    first, second = (_rows(path) for path in paths)
    assert len(first) == 300
    assert first == second


@pytest.mark.django_db(transaction=True)
def test_seeddb_clear_with_yes_replaces_the_clinicians_recordings():
    run("seeddb", count=5, user="fred", seed=1)
    before = set(Recording.objects.values_list("id", flat=True))

    out, _ = run("seeddb", count=4, user="fred", seed=2, clear=True, yes=True)

    after = set(Recording.objects.values_list("id", flat=True))
    assert "Deleted 5 recordings of 'fred'." in out
    assert len(after) == 4
    assert before.isdisjoint(after)


def test_seeddb_clear_without_yes_and_without_a_terminal_refuses(seeded_db, tmp_path):
    live = tmp_path / "live" / "clinical.db"
    live.parent.mkdir()
    clone_database(seeded_db, live)

    done = manage(live, "seeddb", "--clear", "--count", "5", "--user", "alice", stdin=subprocess.DEVNULL)

    assert done.returncode != 0
    assert "Refusing to delete recordings without confirmation: pass --yes." in done.stderr
    assert query(live, "SELECT count(*) FROM recordings_recording") == [(SEEDED,)]
