"""backupdb, restoredb, vacuumdb and seeddb on PostgreSQL, against a real server that the tests start.

One throwaway PostgreSQL server for the module (tests.postgres.Cluster), one
database per test. The commands run as an operator runs them: manage.py in a
process of its own with DATABASE_URL; behaviour about processes runs against
a real uvicorn process on the same database.
"""

import asyncio
import os
import pty
import re
import stat
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import psycopg
import pytest

from clinical.audit import APPEND_ONLY
from clinical.pg_backups import NAME_PATTERN
from tests.postgres import Cluster, bindir
from tests.server import REPO_ROOT, Server
from tests.test_ops_server import WRITERS, Device, Writers, amanage, create, list_all, retitle

pytestmark = pytest.mark.postgresql_only  # pg_dump, pg_restore, psql: once, in the PostgreSQL run

USERS = ("alice", "bob")
SEEDED = 2_000
COMMAND_TIMEOUT = 180
NOT_A_DUMP = b"this is not a backup, only text where one should be\n" * 64


@pytest.fixture(scope="module")
def cluster():
    with Cluster() as cluster:
        yield cluster


@pytest.fixture
def database(cluster) -> str:
    """The URL of a new empty database of this test's own."""
    return cluster.create_database(f"t_{uuid.uuid4().hex[:12]}")


@pytest.fixture
def server(tmp_path, database) -> Server:
    """A server on a migrated database with USERS, not yet started."""
    server = Server(tmp_path / "server", database_url=database)
    server.prepare(*USERS)
    yield server
    server.stop()


def manage(url: str, *args: str, env: dict | None = None, **run_options) -> subprocess.CompletedProcess:
    """`manage.py *args` in a process of its own on the database `url`, output captured as text."""
    environment = {**Server(Path(tempfile.gettempdir()), database_url=url).env, **(env or {})}
    options = {"capture_output": True, "text": True, "timeout": COMMAND_TIMEOUT, "stdin": subprocess.DEVNULL}
    return subprocess.run(
        [sys.executable, "manage.py", *args], cwd=REPO_ROOT, env=environment, check=False, **options | run_options
    )


def manage_started(url: str, *args: str, **popen_options) -> subprocess.Popen:
    """`manage.py *args` started on the database `url`, for a test that acts while it runs."""
    environment = Server(Path(tempfile.gettempdir()), database_url=url).env
    return subprocess.Popen([sys.executable, "manage.py", *args], cwd=REPO_ROOT, env=environment, **popen_options)


def seeded(url: str, count: int = SEEDED, user: str = "alice", seed: int = 1) -> None:
    done = manage(url, "seeddb", "--count", str(count), "--user", user, "--seed", str(seed))
    assert done.returncode == 0, done.stderr


def query(url: str, sql: str, params=()) -> list[tuple]:
    with psycopg.connect(url, autocommit=True) as connection:
        return connection.execute(sql, params).fetchall()


def execute(url: str, sql: str, params=()) -> None:
    """One statement, committed, behind the server's back (an operator's psql)."""
    with psycopg.connect(url, autocommit=True) as connection:
        connection.execute(sql, params)


def recording_ids(url: str) -> set[str]:
    return {str(row[0]) for row in query(url, "SELECT id FROM recordings_recording")}


def restored_copy(cluster, dump: Path) -> str:
    """The dump restored by pg_restore into a new database: what an operator gets back from it."""
    url = cluster.create_database(f"copy_{uuid.uuid4().hex[:12]}")
    done = subprocess.run(
        [bindir() / "pg_restore", "--no-owner", "--exit-on-error", f"--dbname={url}", str(dump)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return url


def ours(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir() if NAME_PATTERN.match(path.name))


def described(url: str) -> str:
    info = psycopg.conninfo.conninfo_to_dict(url)
    return f"PostgreSQL database {info['dbname']} on {info['host']}:{info['port']}"


def backup(url: str, output: Path) -> Path:
    done = manage(url, "backupdb", "--output-dir", str(output))
    assert done.returncode == 0, done.stderr
    return Path(re.search(r"^Backed up to (.+\.dump) \(", done.stdout, re.M)[1])


# backupdb


def test_backupdb_writes_a_checked_dump_and_says_which_database(cluster, database, tmp_path):
    manage(database, "migrate", "--noinput")
    seeded(database)
    output = tmp_path / "backups"
    started = datetime.now(UTC).replace(microsecond=0)

    done = manage(database, "backupdb", "--output-dir", str(output))

    assert done.returncode == 0, done.stderr
    [name] = ours(output)
    dump = output / name
    stamp = datetime.strptime(name, "clinical-%Y%m%dT%H%M%SZ.dump").replace(tzinfo=UTC)
    assert started <= stamp <= datetime.now(UTC)
    assert os.listdir(output) == [name]  # no partial file beside it
    assert stat.S_IMODE(dump.stat().st_mode) == 0o600
    assert dump.read_bytes()[:5] == b"PGDMP"
    assert done.stdout.splitlines()[0] == described(database)
    assert f"Backed up to {dump} ({dump.stat().st_size:,} bytes, {SEEDED:,} recordings, " in done.stdout
    assert recording_ids(restored_copy(cluster, dump)) == recording_ids(database)


def test_backupdb_shows_progress_on_a_terminal(database, tmp_path):
    manage(database, "migrate", "--noinput")
    controller, terminal = pty.openpty()
    try:
        done = manage(
            database,
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
    assert re.search(r"Copying: 100% \((\d+)/\1\)", shown.decode())


def _read(fd: int) -> bytes:
    try:
        return os.read(fd, 65536)
    except OSError:  # EIO: the other end is closed
        return b""


def test_backupdb_keeps_the_newest_n_dumps_and_nothing_else_goes(database, tmp_path):
    manage(database, "migrate", "--noinput")
    output = tmp_path / "backups"
    output.mkdir()
    old = ["clinical-20200101T000000Z.dump", "clinical-20200102T000000Z.dump", "clinical-20200103T000000Z.dump"]
    foreign = ["clinical-20190101T000000Z.db", "clinical-20190101T000000Z.dump.bak", "clinical-latest.dump", "x.txt"]
    for name in old + foreign:
        (output / name).write_bytes(name.encode())

    done = manage(database, "backupdb", "--output-dir", str(output), "--keep", "2")

    assert done.returncode == 0, done.stderr
    kept = ours(output)
    assert len(kept) == 2
    assert kept[0] == "clinical-20200103T000000Z.dump"
    assert all((output / name).read_bytes() == name.encode() for name in foreign)


def _old_pg_dump(folder: Path) -> dict:
    folder.mkdir()
    for program in ("pg_dump", "pg_restore", "psql"):
        script = folder / program
        script.write_text('#!/bin/sh\necho "pg_dump (PostgreSQL) 9.6.24"\n')
        script.chmod(0o755)
    return {"CLINICAL_PG_BINDIR": str(folder)}


def _empty_bindir(folder: Path) -> dict:
    folder.mkdir()
    return {"CLINICAL_PG_BINDIR": str(folder)}


def _nothing_on_path(folder: Path) -> dict:
    folder.mkdir()
    return {"PATH": str(folder)}


MISSING_OR_OLD = {
    "older": (_old_pg_dump, r"pg_dump 9\.6 \(in .*\) is older than the PostgreSQL \d+ server"),
    "not-in-bindir": (_empty_bindir, r"pg_dump is not installed in .* \(CLINICAL_PG_BINDIR\)"),
    "not-installed": (_nothing_on_path, "pg_dump is not installed on this machine"),
}


@pytest.mark.parametrize("case", MISSING_OR_OLD)
def test_backupdb_refuses_a_missing_or_older_pg_dump_saying_what_to_install(database, tmp_path, case):
    manage(database, "migrate", "--noinput")
    make, message = MISSING_OR_OLD[case]
    env = make(tmp_path / "bin")
    output = tmp_path / "backups"

    done = manage(database, "backupdb", "--output-dir", str(output), env=env)

    assert done.returncode != 0
    assert re.search(message, done.stderr), done.stderr
    assert re.search(r"install PostgreSQL \d+'s client programs or newer \(Debian: apt-get install", done.stderr)
    assert "Traceback" not in done.stderr
    assert not output.exists() or os.listdir(output) == []


async def test_backupdb_while_clients_write_holds_every_recording_acknowledged_before_it(cluster, server, tmp_path):
    seeded(server.database_url)
    output = tmp_path / "backups"
    server.start()
    tokens = [server.login(username) for username in USERS]

    async with Writers(server, tokens) as writers:
        await writers.until(WRITERS * 5)
        before = set(writers.acknowledged)
        code, out, err, _ = await amanage(server, "backupdb", "--output-dir", str(output))
        during = len(writers.acknowledged) - len(before)

    assert code == 0, err
    assert during > 0  # the server went on taking writes while the command ran
    assert writers.failures == []
    [name] = ours(output)
    in_backup = recording_ids(restored_copy(cluster, output / name))
    assert before <= in_backup
    assert f"{len(in_backup):,} recordings" in out  # counted in the dump's own snapshot
    assert "Traceback" not in server.log_text()


# restoredb


async def test_restoredb_while_the_server_runs_puts_the_backup_back_and_devices_resync(server, tmp_path):
    output = tmp_path / "backups"
    server.start()
    token = server.login("bob")  # before the backup, so that the restored database knows it
    async with server.async_client(token) as client:
        early = [await create(client, f"early {number}") for number in range(3)]
        early[0] = await retitle(client, early[0], "early 0, as backed up")
        backed_up = await amanage(server, "backupdb", "--output-dir", str(output))
        [dump] = output.glob("clinical-*.dump")
        late = [await create(client, f"late {number}") for number in range(3)]
        await retitle(client, early[0], "early 0, changed after the backup")
        device = Device(client)
        await device.sync()  # a device in step with the server just before the restore
        old_cursor = device.cursor

        restored = await amanage(server, "restoredb", str(dump), "--yes", "--output-dir", str(output))

        # The same server process, at once: no restart. Every token from before is refused: log in again.
        refused = await client.get("/recordings")
        client.headers["Authorization"] = f"Bearer {await asyncio.to_thread(server.login, 'bob')}"
        health = await client.get("/health")
        listed = await list_all(client)
        late_answers = [(await client.get(f"/recordings/{recording['id']}")).status_code for recording in late]
        made = await create(client, "made after the restore")
        changes = (await client.get("/sync/changes", params={"since": old_cursor, "limit": 500})).json()

    assert backed_up[0] == 0, backed_up[2]
    assert restored[0] == 0, restored[2]
    assert restored[1].splitlines()[0] == described(server.database_url)
    assert server.running
    assert refused.status_code == 401
    assert health.status_code == 200
    assert set(listed) == {recording["id"] for recording in early}
    assert listed[early[0]["id"]]["title"] == "early 0, as backed up"
    assert late_answers == [404, 404, 404]
    feed = {change["id"]: change for change in changes["changes"]}
    assert made["id"] in feed
    assert {recording["id"] for recording in early} <= set(feed)  # renumbered above the device's cursor
    assert feed[early[0]["id"]]["title"] == "early 0, as backed up"
    assert not {recording["id"] for recording in late} & set(feed)
    [safety] = sorted(set(output.glob("clinical-*.dump")) - {dump})
    assert f"Backed up the current database to {safety} first." in restored[1]
    assert "Traceback" not in server.log_text()


async def test_restoredb_while_clients_write_keeps_serving_and_no_device_misses_the_restored_state(server, tmp_path):
    seeded(server.database_url, count=3, user="bob", seed=2)
    seeded(server.database_url)
    output = tmp_path / "backups"
    server.start()
    token = server.login("bob")
    async with server.async_client(token) as bob:
        backed_up = await amanage(server, "backupdb", "--output-dir", str(output))
        [dump] = output.glob("clinical-*.dump")
        backed_up_state = await list_all(bob)
        kept = {key: recording["title"] for key, recording in backed_up_state.items()}
        for recording in backed_up_state.values():
            await retitle(bob, recording, "changed after the backup")
        device = Device(bob)
        stop = asyncio.Event()
        async with Writers(server, [token]) as writers:
            syncing = asyncio.create_task(device.keep_syncing(stop))
            await writers.until(WRITERS * 5)
            restored = await amanage(server, "restoredb", str(dump), "--yes", "--output-dir", str(output))
            stop.set()
            await syncing
        bob.headers["Authorization"] = f"Bearer {await asyncio.to_thread(server.login, 'bob')}"
        await device.sync()
        on_server = await list_all(bob)

    assert backed_up[0] == 0, backed_up[2]
    assert restored[0] == 0, restored[2]
    assert len(kept) == 3
    assert {key: on_server[key]["title"] for key in kept} == kept
    seen = {key: (change["version"], change["title"]) for key, change in device.recordings.items()}
    stale = {key: seen.get(key) for key, now in on_server.items() if seen.get(key) != (now["version"], now["title"])}
    assert stale == {}
    assert [failure for failure in writers.failures if not failure.startswith("401")] == []
    assert [failure for failure in device.failures if not failure.startswith("401")] == []
    assert "Traceback" not in server.log_text()


def test_a_restore_revokes_every_token_is_audited_and_the_audit_trail_stays_append_only(server, tmp_path):
    output = tmp_path / "backups"
    server.start()
    before_backup = server.login("alice")
    execute(server.database_url, "DROP TRIGGER clinical_auditevent_append_only ON clinical_auditevent")
    dump = backup(server.database_url, output)  # a backup without the trigger: the restore makes it again
    after_backup = server.login("bob")

    done = manage(server.database_url, "restoredb", str(dump), "--yes", "--output-dir", str(output))

    assert done.returncode == 0, done.stderr
    with server.client(before_backup) as first, server.client(after_backup) as second:
        assert [first.get("/recordings").status_code, second.get("/recordings").status_code] == [401, 401]
    with server.client(server.login("alice")) as again:
        assert again.get("/recordings").status_code == 200
    [(username, detail)] = query(
        server.database_url, "SELECT username, detail FROM clinical_auditevent WHERE action = 'restore'"
    )
    assert username.endswith(" (restoredb)")
    assert f"restored {dump} (SHA-256 " in detail
    assert "1 tokens revoked" in detail
    assert query(server.database_url, "SELECT count(*) FROM clinical_token WHERE revoked_at IS NULL") == [(1,)]
    with pytest.raises(psycopg.errors.RaiseException, match=APPEND_ONLY):
        execute(server.database_url, "UPDATE clinical_auditevent SET username = 'someone else'")
    with pytest.raises(psycopg.errors.RaiseException, match=APPEND_ONLY):
        execute(server.database_url, "TRUNCATE clinical_auditevent")


def _garbage(cluster, url: str, path: Path) -> None:
    path.write_bytes(NOT_A_DUMP)


def _sqlite(cluster, url: str, path: Path) -> None:
    sqlite = Server(path.parent / "sqlite", db_path=path.parent / "sqlite" / "clinical.db")  # SQLite, whatever the run
    sqlite.prepare("alice")
    path.write_bytes(sqlite.db_path.read_bytes())


def _truncated(cluster, url: str, path: Path) -> None:
    whole = backup(url, path.parent / "whole")
    path.write_bytes(whole.read_bytes()[: whole.stat().st_size * 2 // 3])


def _not_clinical(cluster, url: str, path: Path) -> None:
    other = cluster.create_database(f"notes_{uuid.uuid4().hex[:12]}")
    execute(other, "CREATE TABLE notes (id serial PRIMARY KEY, text text)")
    execute(other, "INSERT INTO notes (text) VALUES ('shopping list')")
    done = subprocess.run(
        [bindir() / "pg_dump", "--format=custom", f"--file={path}", other], capture_output=True, check=False
    )
    assert done.returncode == 0, done.stderr


def _from_a_newer_version(cluster, url: str, path: Path) -> None:
    future = "INSERT INTO django_migrations (app, name, applied) VALUES ('recordings', '0999_from_the_future', now())"
    execute(url, future)
    whole = backup(url, path.parent / "future")
    execute(url, "DELETE FROM django_migrations WHERE name = '0999_from_the_future'")
    path.write_bytes(whole.read_bytes())


UNRESTORABLE = {
    "garbage": (_garbage, "is not a PostgreSQL backup in pg_dump's custom format"),
    "sqlite": (_sqlite, "is an SQLite database, and this database is PostgreSQL"),
    "truncated": (_truncated, "(is damaged: pg_restore could not read all of it|cannot be read by pg_restore)"),
    "not-clinical": (_not_clinical, "is a PostgreSQL backup, but not of a clinical database"),
    "newer-schema": (_from_a_newer_version, r"newer version of this code \(migrations recordings.0999_from_the_future"),
    "missing": (lambda cluster, url, path: None, "There is no file at"),
}


@pytest.mark.parametrize("case", UNRESTORABLE)
def test_restoredb_refuses_what_it_cannot_restore_and_touches_nothing(cluster, server, tmp_path, case):
    seeded(server.database_url, count=50)
    candidate = tmp_path / "candidates" / "candidate.dump"
    candidate.parent.mkdir()
    make, message = UNRESTORABLE[case]
    make(cluster, server.database_url, candidate)
    before = recording_ids(server.database_url)
    output = tmp_path / "backups"

    done = manage(server.database_url, "restoredb", str(candidate), "--yes", "--output-dir", str(output))

    assert done.returncode != 0
    assert re.search(message, done.stderr), done.stderr
    assert "it was not restored" in done.stderr or case == "missing"
    assert "Traceback" not in done.stderr
    assert recording_ids(server.database_url) == before
    assert not output.exists() or os.listdir(output) == []


def test_restoredb_of_an_older_backup_replaces_every_table_then_migrates_it(server, tmp_path):
    seeded(server.database_url, count=20)
    execute(server.database_url, "DROP TABLE django_session")  # as if made before the sessions app was installed
    execute(server.database_url, "DELETE FROM django_migrations WHERE app = 'sessions'")
    older = backup(server.database_url, tmp_path / "older")
    server.migrate()
    seeded(server.database_url, count=30, user="bob")

    done = manage(server.database_url, "restoredb", str(older), "--yes", "--output-dir", str(tmp_path / "backups"))

    assert done.returncode == 0, done.stderr
    sessions = "SELECT name FROM django_migrations WHERE app = 'sessions'"
    assert query(server.database_url, sessions) == [("0001_initial",)]
    assert query(server.database_url, "SELECT to_regclass('django_session') IS NOT NULL") == [(True,)]
    assert query(server.database_url, "SELECT count(*) FROM recordings_recording") == [(20,)]


def test_restoredb_into_an_empty_database_says_there_was_nothing_to_replace(cluster, server, tmp_path):
    dump = backup(server.database_url, tmp_path / "backups")
    empty = cluster.create_database(f"empty_{uuid.uuid4().hex[:12]}")

    done = manage(empty, "restoredb", str(dump), "--yes", "--output-dir", str(tmp_path / "backups"))

    assert done.returncode == 0, done.stderr
    assert "There was no database to replace" in done.stdout
    assert query(empty, "SELECT username FROM auth_user ORDER BY username") == [(name,) for name in USERS]


def test_restoredb_waits_for_an_open_transaction_which_commits_then_sees_the_restored_data(server, tmp_path):
    dump = backup(server.database_url, tmp_path / "backups")  # no recordings
    seeded(server.database_url, count=10)
    attempt = "INSERT INTO clinical_loginattempt (username, started_at, outcome) VALUES ('alice', now(), 'failed')"
    with psycopg.connect(server.database_url) as other:  # a connection of the server's, mid-transaction
        other.execute(attempt)
        restoring = manage_started(
            server.database_url,
            "restoredb",
            str(dump),
            "--yes",
            "--output-dir",
            str(tmp_path / "backups"),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        waited = _a_session_waits_for_a_lock(server.database_url)
        other.commit()
        out, err = restoring.communicate(timeout=COMMAND_TIMEOUT)
        seen = other.execute("SELECT count(*) FROM recordings_recording").fetchone()

    assert waited  # the restore waited for the transaction, which was not cancelled
    assert restoring.returncode == 0, err
    assert "Restored " in out
    assert seen == (0,)  # the same connection, at its next statement, sees the restored data


def _a_session_waits_for_a_lock(url: str) -> bool:
    waiting = "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND datname = current_database()"
    deadline = time.monotonic() + COMMAND_TIMEOUT
    while time.monotonic() < deadline:
        if query(url, waiting) != [(0,)]:
            return True
        time.sleep(0.01)
    return False


def test_restoredb_refuses_without_yes_and_without_a_terminal(server, tmp_path):
    dump = backup(server.database_url, tmp_path / "backups")
    seeded(server.database_url, count=10)

    done = manage(server.database_url, "restoredb", str(dump), "--output-dir", str(tmp_path / "backups"))

    assert done.returncode != 0
    assert "Refusing to restore without confirmation" in done.stderr
    assert len(recording_ids(server.database_url)) == 10


# vacuumdb and seeddb


def test_vacuumdb_purges_then_vacuums_and_analyzes_and_says_the_sizes(server):
    url = server.database_url
    seeded(url, count=500)
    execute(url, "DELETE FROM recordings_recording WHERE status = 'failed'")
    execute(
        url,
        "INSERT INTO clinical_loginattempt (username, client_ip, started_at, outcome) "
        "VALUES ('alice', NULL, now() - interval '3 days', 'failed'), ('alice', NULL, now(), 'failed')",
    )

    done = manage(url, "vacuumdb")

    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == described(url)
    assert "Purged 0 expired tokens, 0 expired idempotency keys and 1 old login attempts." in done.stdout
    assert re.search(r"^Database: [\d,]+ -> [\d,]+ bytes\.$", done.stdout, re.M)  # pg_database_size, no WAL
    assert query(url, "SELECT count(*) FROM clinical_loginattempt") == [(1,)]
    vacuumed = "SELECT last_vacuum IS NOT NULL, last_analyze IS NOT NULL FROM pg_stat_user_tables WHERE relname = %s"
    assert query(url, vacuumed, ["recordings_recording"]) == [(True, True)]


def test_seeddb_fills_a_postgresql_database_and_says_what_to_do_on_a_second_run(server):
    url = server.database_url

    first = manage(url, "seeddb", "--count", "2500", "--user", "carol", "--seed", "4")
    again = manage(url, "seeddb", "--count", "2500", "--user", "carol", "--seed", "4")
    cleared = manage(url, "seeddb", "--count", "5", "--user", "carol", "--seed", "4", "--clear", "--yes")

    assert first.returncode == 0, first.stderr
    assert "Seeded 2,500 recordings for 'carol'" in first.stdout
    assert again.returncode != 0
    assert "add --clear, or use another --seed" in again.stderr
    assert cleared.returncode == 0, cleared.stderr
    numbers = query(url, "SELECT change_seq FROM recordings_recording ORDER BY change_seq")
    assert len(numbers) == 5
    assert len(set(numbers)) == 5
