"""copydb: a clinic's SQLite database moved into PostgreSQL, served from there, with every device's cursor intact."""

import json
import subprocess
import sys
import threading
import uuid
from contextlib import closing
from datetime import UTC, datetime
from uuid import UUID

import psycopg
import pytest

from clinical.copydb import HOLDS_DATA, NO_NAME, SOURCE_NOT_SQLITE
from clinical.management.commands.copydb import SNAPSHOT_NOTE, WRITTEN_DURING_COPY
from tests.ops import checkpoint, manage, query, sha256, write
from tests.postgres import Cluster, free_port
from tests.server import REPO_ROOT, Server

# The source is SQLite whichever engine the suite runs on, and these tests start their own PostgreSQL.
pytestmark = pytest.mark.sqlite_only

TABLES = (
    "auth_user",
    "clinical_token",
    "clinical_changesequence",
    "clinical_idempotencykey",
    "clinical_loginattempt",
    "clinical_auditevent",
    "recordings_recording",
    "django_content_type",
    "auth_permission",
)
TOKENS = (
    "SELECT key_hash, user_id, password_stamp, CASE WHEN revoked_at IS NULL THEN 1 ELSE 0 END "
    "FROM clinical_token ORDER BY id"
)
RECORDING_COLUMNS = (
    "id, owner_id, patient_ref, title, note_type, status, audio_path, duration_seconds, transcript, "
    "verification_results, error, recorded_at, created_at, updated_at, version, change_seq, deleted_at"
)


@pytest.fixture(scope="module")
def cluster():
    with Cluster() as cluster:
        yield cluster


@pytest.fixture
def target(cluster, request):
    """The URL of a new, empty PostgreSQL database."""
    return cluster.create_database(request.node.name.split("[")[0][-50:].lower())


@pytest.fixture
def seeded(tmp_path):
    """A migrated SQLite file holding alice's 2,000 fake recordings."""
    server = Server(tmp_path / "sqlite", db_path=tmp_path / "sqlite" / "clinical.db")  # SQLite on either suite
    server.prepare("alice")
    seeding = manage(server.db_path, "seeddb", "--count", "2000", "--user", "alice", "--seed", "7")
    assert seeding.returncode == 0, seeding.stderr
    return server


def pg(url: str, sql: str, params=()) -> list[tuple]:
    with closing(psycopg.connect(url)) as db:
        return db.execute(sql, params).fetchall()


def counts_pg(url: str) -> dict[str, int]:
    return {table: pg(url, f"SELECT count(*) FROM {table}")[0][0] for table in TABLES}


def counts_sqlite(db_path) -> dict[str, int]:
    return {table: query(db_path, f"SELECT count(*) FROM {table}")[0][0] for table in TABLES}


def walk(client, cursor: int, limit: int = 500) -> tuple[list[dict], int]:
    """Every change after `cursor`, page by page as a device pulls them; and the cursor it ends with."""
    changes = []
    while True:
        page = client.get("/sync/changes", params={"since": cursor, "limit": limit}).json()
        changes += page["changes"]
        cursor = page["cursor"]
        if not page["has_more"]:
            return changes, cursor


def sqlite_recording(row: tuple) -> tuple:
    """A recordings_recording row read from SQLite, in the types PostgreSQL answers with."""
    values = list(row)
    values[0] = UUID(hex=values[0])
    values[9] = json.loads(values[9])
    for index in (11, 12, 13, 16):
        if values[index] is not None:
            values[index] = datetime.fromisoformat(values[index]).replace(tzinfo=UTC)
    return tuple(values)


def test_a_clinic_moves_to_postgresql_and_a_stored_cursor_sees_every_later_change_once(seeded, target, tmp_path):
    sqlite_server = seeded
    with sqlite_server, sqlite_server.client(sqlite_server.login("alice")) as client:
        token = client.headers["Authorization"].removeprefix("Bearer ")
        created = [client.post("/recordings", json={"patient_ref": f"PAT-NEW-{n}"}).json() for n in range(3)]
        keyed = client.post("/recordings", json={"patient_ref": "PAT-KEYED"}, headers={"Idempotency-Key": "k-1"})
        seeded_ids = [item["id"] for item in client.get("/recordings", params={"limit": 3}).json()["items"]]
        patched = client.patch(f"/recordings/{created[0]['id']}", json={"version": 1, "status": "uploaded"})
        deleted = client.delete(f"/recordings/{created[1]['id']}")
        early, cursor = walk(client, 0)
    checkpoint(sqlite_server.db_path)
    source_before, counts_before = sha256(sqlite_server.db_path), counts_sqlite(sqlite_server.db_path)
    audit_before = query(sqlite_server.db_path, "SELECT id, action, username FROM clinical_auditevent ORDER BY id")

    copied = manage(sqlite_server.db_path, "copydb", "--to", target)

    pg_server = Server(tmp_path / "postgresql", database_url=target)
    pg_server.migrate()  # as scripts/serve does on every start: nothing left to do
    with pg_server, pg_server.client(token) as client:
        nothing_yet, _ = walk(client, cursor)
        replayed = client.post("/recordings", json={"patient_ref": "PAT-KEYED"}, headers={"Idempotency-Key": "k-1"})
        tokens = client.get("/auth/tokens")
        made = client.post("/recordings", json={"patient_ref": "PAT-ON-PG"}).json()
        old = client.get(f"/recordings/{seeded_ids[0]}").json()
        changed = client.patch(f"/recordings/{old['id']}", json={"version": old["version"], "title": "on PG"})
        removed = client.delete(f"/recordings/{seeded_ids[1]}")
        moved_on = client.patch(f"/recordings/{created[0]['id']}", json={"version": 2, "status": "transcribing"})
        later, later_cursor = walk(client, cursor, limit=2)
        again, _ = walk(client, later_cursor)
    audit_after = pg(target, "SELECT id, action, username FROM clinical_auditevent ORDER BY id")

    assert (patched.status_code, deleted.status_code, keyed.status_code) == (200, 204, 201)
    assert len({change["id"] for change in early}) == len(early) == 2_000 + 4
    assert copied.returncode == 0, copied.stderr
    assert "Verified: row counts equal" in copied.stdout
    assert SNAPSHOT_NOTE in copied.stdout
    assert WRITTEN_DURING_COPY not in copied.stdout
    assert sha256(sqlite_server.db_path) == source_before  # the source is only read
    assert nothing_yet == []
    assert replayed.status_code == 201
    assert replayed.headers["Idempotent-Replayed"] == "true"
    assert replayed.json()["id"] == keyed.json()["id"]
    assert tokens.status_code == 200
    assert (changed.status_code, removed.status_code, moved_on.status_code) == (200, 204, 200)
    assert [change["id"] for change in later] == [made["id"], old["id"], seeded_ids[1], created[0]["id"]]
    assert all(change["change_seq"] > cursor for change in later)
    assert later[2]["deleted"] is True
    assert later[3]["version"] == 3
    assert again == []
    assert audit_after[: len(audit_before)] == audit_before
    assert len(audit_after) > len(audit_before)
    assert counts_before["recordings_recording"] == 2_000 + 4
    assert "Traceback" not in pg_server.log_text()


def test_a_copy_while_the_server_writes_is_one_consistent_snapshot(seeded, target):
    statuses, stop = [], threading.Event()
    with seeded, seeded.client(seeded.login("alice")) as client:

        def keep_writing():
            while not stop.is_set():
                statuses.append(client.post("/recordings", json={"patient_ref": "PAT-BUSY"}).status_code)

        writer = threading.Thread(target=keep_writing)
        writer.start()
        try:
            copied = manage(seeded.db_path, "copydb", "--to", target)
        finally:
            stop.set()
            writer.join()

    [(high_water, copied_recordings)] = pg(target, "SELECT max(change_seq), count(*) FROM recordings_recording")
    [(last_event, copied_events)] = pg(target, "SELECT max(id), count(*) FROM clinical_auditevent")
    assert copied.returncode == 0, copied.stderr
    assert WRITTEN_DURING_COPY in copied.stdout
    assert set(statuses) == {201}  # the copy's read transaction never held the server's writers up
    assert query(seeded.db_path, "SELECT count(*) FROM recordings_recording")[0][0] > copied_recordings
    # One snapshot: every change up to its moment and none after, in every table alike.
    sql = "SELECT count(*) FROM recordings_recording WHERE change_seq <= ?"
    assert query(seeded.db_path, sql, [high_water]) == [(copied_recordings,)]
    assert query(seeded.db_path, "SELECT count(*) FROM clinical_auditevent WHERE id <= ?", [last_event]) == [
        (copied_events,)
    ]
    assert pg(target, "SELECT value FROM clinical_changesequence") == [(high_water,)]


def test_a_recording_edited_behind_the_applications_back_is_not_copied(seeded, target):
    write(seeded.db_path, "UPDATE recordings_recording SET transcript = 'Edited by hand' WHERE rowid = 1")
    [(edited,)] = query(seeded.db_path, "SELECT id FROM recordings_recording WHERE rowid = 1")

    copied = manage(seeded.db_path, "copydb", "--to", target)

    assert copied.returncode == 1
    assert "1 recordings do not match their digests in the target" in copied.stderr
    assert str(uuid.UUID(edited)) in copied.stderr
    assert pg_count_or_none(target) in (None, 0)  # rolled back: nothing arrived


def pg_count_or_none(url: str) -> int | None:
    try:
        return pg(url, "SELECT count(*) FROM recordings_recording")[0][0]
    except psycopg.errors.UndefinedTable:
        return None


def test_the_audit_trail_is_append_only_on_arrival(seeded, target):
    copied = manage(seeded.db_path, "copydb", "--to", target)

    with closing(psycopg.connect(target)) as db, pytest.raises(psycopg.errors.RaiseException) as refused:
        db.execute("UPDATE clinical_auditevent SET outcome = 'rewritten'")

    assert copied.returncode == 0, copied.stderr
    assert "append-only" in str(refused.value)
    assert pg(target, "SELECT count(*) FROM clinical_auditevent WHERE outcome = 'rewritten'") == [(0,)]


def test_every_row_arrives_with_its_keys_versions_and_change_numbers(seeded, target):
    db_path = seeded.db_path
    [(first, version)] = query(db_path, "SELECT id, version FROM recordings_recording WHERE rowid = 1")
    with seeded:
        with seeded.client(seeded.login("alice")) as client:  # a token, a login attempt, a login event
            edit = {"version": version, "transcript": 'Ünïcode ✓ and "quotes"'}
            assert client.patch(f"/recordings/{uuid.UUID(first)}", json=edit).status_code == 200
        with seeded.client(seeded.login("alice")) as client:
            client.delete("/auth/token")  # a revoked token, copied too

    copied = manage(db_path, "copydb", "--to", target)

    source_rows = [
        sqlite_recording(row)
        for row in query(db_path, f"SELECT {RECORDING_COLUMNS} FROM recordings_recording ORDER BY id")
    ]
    target_rows = pg(target, f"SELECT {RECORDING_COLUMNS} FROM recordings_recording ORDER BY id")
    assert copied.returncode == 0, copied.stderr
    assert counts_pg(target) == counts_sqlite(db_path)
    assert target_rows == source_rows
    assert pg(target, "SELECT value FROM clinical_changesequence") == [(2_001,)]  # the seeding, then the patch
    assert pg(target, TOKENS) == query(db_path, TOKENS)
    assert [revoked for *_, revoked in pg(target, TOKENS)] == [1, 0]
    assert pg(target, "SELECT password FROM auth_user") == query(db_path, "SELECT password FROM auth_user")


def test_the_source_is_only_read(seeded, target):
    # A tombstone that still holds text (written behind the application's back, its digest still
    # right: deleted_at is not content): a data migration run against the source instead of the
    # target would clear it there.
    write(seeded.db_path, "UPDATE recordings_recording SET deleted_at = updated_at WHERE rowid = 1")
    [(title,)] = query(seeded.db_path, "SELECT title FROM recordings_recording WHERE rowid = 1")
    checkpoint(seeded.db_path)
    before = sha256(seeded.db_path)

    copied = manage(seeded.db_path, "copydb", "--to", target)

    assert copied.returncode == 0, copied.stderr
    assert title
    assert sha256(seeded.db_path) == before
    assert query(seeded.db_path, "SELECT title FROM recordings_recording WHERE rowid = 1") == [(title,)]
    assert pg(
        target, "SELECT count(*) FROM recordings_recording WHERE title = %s AND deleted_at IS NOT NULL", [title]
    ) == [(1,)]


def test_new_rows_take_ids_above_the_copied_ones(seeded, target):
    copied = manage(seeded.db_path, "copydb", "--to", target)

    (highest,) = query(seeded.db_path, "SELECT max(id) FROM clinical_auditevent")[0]
    (next_id,) = pg(target, "SELECT nextval(pg_get_serial_sequence('clinical_auditevent', 'id'))")[0]
    assert copied.returncode == 0, copied.stderr
    assert next_id == highest + 1


def test_a_target_holding_data_is_refused_and_left_unchanged(seeded, target):
    first = manage(seeded.db_path, "copydb", "--to", target)
    before = counts_pg(target)
    write(seeded.db_path, "UPDATE auth_user SET first_name = 'Alice'")

    second = manage(seeded.db_path, "copydb", "--to", target)

    assert first.returncode == 0, first.stderr
    assert second.returncode != 0
    assert HOLDS_DATA.split("{tables}. ")[1] in second.stderr
    assert "recordings_recording (2,000 rows)" in second.stderr
    assert "auth_user (1 row)" in second.stderr
    assert counts_pg(target) == before
    assert pg(target, "SELECT first_name FROM auth_user") == [("",)]


def test_a_failed_copy_leaves_the_target_as_it_was(seeded, target):
    # PostgreSQL cannot store U+0000; a row written behind the application's back can hold one.
    write(seeded.db_path, "UPDATE recordings_recording SET transcript = 'a' || char(0) || 'b' WHERE rowid = 5")

    failed = manage(seeded.db_path, "copydb", "--to", target)

    assert failed.returncode != 0
    assert "while copying recordings_recording" in failed.stderr
    assert "Nothing was committed" in failed.stderr
    assert "Traceback" not in failed.stderr
    assert pg(target, "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'") == [(0,)]


@pytest.mark.parametrize(
    ("url", "sentence"),
    [
        ("nonsense", "--to must be a PostgreSQL URL"),
        ("https://example.org/clinic", "--to must be a PostgreSQL URL"),
        ("sqlite:////tmp/other.db", "The target must be a PostgreSQL database (postgres://…), not sqlite3."),
        ("mysql://clinic@localhost/clinic", "The target must be a PostgreSQL database (postgres://…), not mysql."),
        ("postgres://clinic@localhost:5432", NO_NAME),
    ],
)
def test_a_target_that_is_not_a_postgresql_database_is_refused(tmp_path, url, sentence):
    server = Server(tmp_path, db_path=tmp_path / "clinical.db")
    server.prepare()

    refused = manage(server.db_path, "copydb", "--to", url)

    assert refused.returncode != 0
    assert sentence in refused.stderr
    assert "Traceback" not in refused.stderr


def test_an_unreachable_target_is_refused_with_a_clear_sentence(tmp_path):
    server = Server(tmp_path, db_path=tmp_path / "clinical.db")
    server.prepare()

    refused = manage(server.db_path, "copydb", "--to", f"postgres://clinic:s3cret@127.0.0.1:{free_port()}/clinic")

    assert refused.returncode != 0
    assert "Cannot connect to the target database postgres://clinic@127.0.0.1:" in refused.stderr
    assert "s3cret" not in refused.stdout + refused.stderr
    assert "Traceback" not in refused.stderr


def test_a_missing_sqlite_database_is_refused_and_not_created(tmp_path, cluster):
    missing = tmp_path / "nowhere.db"

    refused = manage(missing, "copydb", "--to", cluster.url)

    assert refused.returncode != 0
    assert f"There is no SQLite database at {missing}" in refused.stderr
    assert not missing.exists()


def test_copydb_on_postgresql_is_refused(tmp_path, cluster):
    env = Server(tmp_path, database_url=cluster.url).env

    refused = subprocess.run(
        [sys.executable, "manage.py", "copydb", "--to", cluster.url],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )

    assert refused.returncode != 0
    assert SOURCE_NOT_SQLITE in refused.stderr
