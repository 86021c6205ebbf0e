"""backupdb and restoredb against a real uvicorn process that serves, and takes writes, while they run.

Every test has its own server process over its own database file, and runs the
commands as an operator would: manage.py in a process of its own, on the same
file (CLINICAL_DB_PATH).
"""

import asyncio
import os
import subprocess
import sys
import time
import uuid

import pytest

from tests.ops import integrity, manage, query, recording_ids
from tests.server import REPO_ROOT, Server, clone_database

pytestmark = pytest.mark.sqlite_only  # SQLite's own files, pragmas and backup API

USERS = ("alice", "bob", "carol", "dave")
WRITERS = 8
SEEDED = 5_000  # about 15 MB: the copy takes several steps of the backup API
BOUND = 60.0  # seconds; a backup that restarts under writes would never finish


@pytest.fixture(scope="session")
def users_db(tmp_path_factory):
    """A migrated database with USERS (each with tests.server's password)."""
    template = Server(tmp_path_factory.mktemp("ops-users"))
    template.prepare(*USERS)
    return template.db_path


@pytest.fixture(scope="session")
def big_db(tmp_path_factory, users_db):
    path = tmp_path_factory.mktemp("ops-big") / "clinical.db"
    clone_database(users_db, path)
    done = manage(path, "seeddb", "--count", str(SEEDED), "--user", "alice", "--seed", "1")
    assert done.returncode == 0, done.stderr
    return path


@pytest.fixture(scope="session")
def bob_first_db(tmp_path_factory, users_db):
    """Three recordings of bob, the first changes in the database, then SEEDED of alice's."""
    path = tmp_path_factory.mktemp("ops-bob-first") / "clinical.db"
    clone_database(users_db, path)
    for user, count in (("bob", 3), ("alice", SEEDED)):
        done = manage(path, "seeddb", "--count", str(count), "--user", user, "--seed", "2")
        assert done.returncode == 0, done.stderr
    return path


def started(tmp_path, template) -> Server:
    server = Server(tmp_path / "server")
    clone_database(template, server.db_path)
    server.start()
    return server


@pytest.fixture
def server(tmp_path, users_db):
    server = started(tmp_path, users_db)
    yield server
    server.stop()


@pytest.fixture
def big_server(tmp_path, big_db):
    server = started(tmp_path, big_db)
    yield server
    server.stop()


@pytest.fixture
def bob_first_server(tmp_path, bob_first_db):
    server = started(tmp_path, bob_first_db)
    yield server
    server.stop()


async def amanage(server: Server, *args: str) -> tuple[int, str, str, float]:
    """manage.py on the server's database, while the test's clients go on: (exit code, stdout, stderr, seconds)."""
    began = time.monotonic()
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "manage.py",
        *args,
        cwd=REPO_ROOT,
        env=server.env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(process.communicate(), BOUND)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    return process.returncode, out.decode(), err.decode(), time.monotonic() - began


class Writers:
    """WRITERS clients creating recordings through the server, each as fast as it is answered, until the block ends."""

    def __init__(self, server: Server, tokens: list[str]):
        self.server = server
        self.tokens = tokens
        self.acknowledged: list[str] = []  # ids, in the order of their 201s
        self.failures: list[str] = []
        self.stop = asyncio.Event()
        self.tasks: list[asyncio.Task] = []

    async def __aenter__(self) -> "Writers":
        self.tasks = [asyncio.create_task(self._write(index)) for index in range(WRITERS)]
        return self

    async def __aexit__(self, *exc_info) -> None:
        self.stop.set()
        await asyncio.gather(*self.tasks)

    async def until(self, count: int, within: float = 30) -> None:
        deadline = time.monotonic() + within
        while len(self.acknowledged) < count:
            assert time.monotonic() < deadline, f"only {len(self.acknowledged)} writes in {within} s: {self.failures}"
            await asyncio.sleep(0.01)

    async def _write(self, index: int) -> None:
        async with self.server.async_client(self.tokens[index % len(self.tokens)]) as client:
            number = 0
            while not self.stop.is_set():
                body = {"patient_ref": f"PAT-{index}-{number}", "title": f"writer {index}, write {number}"}
                response = await client.post("/recordings", json=body)
                if response.status_code == 201:
                    self.acknowledged.append(response.json()["id"])
                else:
                    self.failures.append(f"{response.status_code} {response.text[:200]}")
                number += 1


class Device:
    """A client that keeps its recordings in sync through the feed, as the PWA does."""

    def __init__(self, client):
        self.client = client
        self.cursor = 0
        self.recordings: dict[str, dict] = {}
        self.cursors: list[int] = []
        self.failures: list[str] = []

    async def sync(self) -> None:
        while True:
            response = await self.client.get("/sync/changes", params={"since": self.cursor, "limit": 500})
            if response.status_code != 200:
                self.failures.append(f"{response.status_code} {response.text[:200]}")
                return
            page = response.json()
            self.recordings.update({change["id"]: change for change in page["changes"]})
            self.cursor = page["cursor"]
            self.cursors.append(self.cursor)
            if not page["has_more"]:
                return

    async def keep_syncing(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await self.sync()
            await asyncio.sleep(0.005)


async def create(client, title: str) -> dict:
    response = await client.post("/recordings", json={"patient_ref": "PAT-7", "title": title})
    assert response.status_code == 201, response.text
    return response.json()


async def retitle(client, recording: dict, title: str) -> dict:
    response = await client.patch(
        f"/recordings/{recording['id']}", json={"version": recording["version"], "title": title}
    )
    assert response.status_code == 200, response.text
    return response.json()


async def list_all(client) -> dict[str, dict]:
    found: dict[str, dict] = {}
    while True:
        page = (await client.get("/recordings", params={"limit": 200, "offset": len(found)})).json()
        if not page["items"]:
            return found
        found.update({item["id"]: item for item in page["items"]})


def hexes(ids) -> set[str]:
    return {uuid.UUID(value).hex for value in ids}


# backupdb


async def test_backupdb_while_clients_write_finishes_checked_and_holds_every_acknowledged_recording(
    big_server, tmp_path
):
    output = tmp_path / "backups"
    tokens = [big_server.login(username) for username in USERS]

    async with Writers(big_server, tokens) as writers:
        await writers.until(WRITERS * 5)
        before = hexes(writers.acknowledged)
        code, out, err, seconds = await amanage(big_server, "backupdb", "--output-dir", str(output))
        during = len(writers.acknowledged) - len(before)

    assert code == 0, err
    assert seconds < BOUND
    assert during > 0  # the server went on taking writes while the command ran
    assert writers.failures == []
    [backup] = output.glob("clinical-*.db")
    assert os.listdir(output) == [backup.name]
    assert integrity(backup) == [("ok",)]
    in_backup = recording_ids(backup)
    assert before <= in_backup
    assert len(in_backup) >= SEEDED + len(before)
    assert f"{len(in_backup):,} recordings" in out
    assert "Traceback" not in big_server.log_text()


# restoredb


async def test_restoredb_while_the_server_runs_puts_the_backup_back_and_devices_resync(server, tmp_path):
    output = tmp_path / "backups"
    token = server.login("bob")  # before the backup, so that the restored database knows it
    async with server.async_client(token) as client:
        early = [await create(client, f"early {number}") for number in range(3)]
        early[0] = await retitle(client, early[0], "early 0, as backed up")
        backed_up = await amanage(server, "backupdb", "--output-dir", str(output))
        [backup] = output.glob("clinical-*.db")
        late = [await create(client, f"late {number}") for number in range(3)]
        await retitle(client, early[0], "early 0, changed after the backup")
        device = Device(client)
        await device.sync()  # a device in step with the server just before the restore
        old_cursor = device.cursor

        restored = await amanage(server, "restoredb", str(backup), "--yes", "--output-dir", str(output))

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
    assert server.running
    assert refused.status_code == 401
    assert health.status_code == 200
    assert set(listed) == {recording["id"] for recording in early}
    assert listed[early[0]["id"]]["title"] == "early 0, as backed up"
    assert listed[early[0]["id"]]["version"] == 2
    assert late_answers == [404, 404, 404]
    feed = {change["id"]: change for change in changes["changes"]}
    assert made["id"] in feed
    assert {recording["id"] for recording in early} <= set(feed)  # renumbered above the device's cursor
    assert feed[early[0]["id"]]["title"] == "early 0, as backed up"
    assert not {recording["id"] for recording in late} & set(feed)
    safety = sorted(set(output.glob("clinical-*.db")) - {backup})
    assert len(safety) == 1
    assert hexes(recording["id"] for recording in late) <= recording_ids(safety[0])
    assert "Traceback" not in server.log_text()


async def test_restoredb_while_clients_write_no_device_misses_the_restored_state(bob_first_server, tmp_path):
    # The restore renumbers recordings in their old order, so bob's three come first, just above the
    # high-water mark restoredb read; a device that already holds a cursor above that must still get them.
    server, output = bob_first_server, tmp_path / "backups"
    token = server.login("bob")
    async with server.async_client(token) as bob:
        backed_up = await amanage(server, "backupdb", "--output-dir", str(output))
        [backup] = output.glob("clinical-*.db")
        backed_up_state = await list_all(bob)
        kept = {key: recording["title"] for key, recording in backed_up_state.items()}
        for recording in backed_up_state.values():
            await retitle(bob, recording, "changed after the backup")
        device = Device(bob)
        stop = asyncio.Event()
        async with Writers(server, [token]) as writers:
            syncing = asyncio.create_task(device.keep_syncing(stop))
            await writers.until(WRITERS * 5)
            restored = await amanage(server, "restoredb", str(backup), "--yes", "--output-dir", str(output))
            stop.set()
            await syncing
        # Every token from before the restore is refused: the device logs in again.
        bob.headers["Authorization"] = f"Bearer {await asyncio.to_thread(server.login, 'bob')}"
        await device.sync()
        on_server = await list_all(bob)

    assert backed_up[0] == 0, backed_up[2]
    assert restored[0] == 0, restored[2]
    assert len(kept) == 3
    assert {key: on_server[key]["title"] for key in kept} == kept
    seen = {key: (change["version"], change["title"]) for key, change in device.recordings.items()}
    stale = {key: seen.get(key) for key, now in on_server.items() if seen.get(key) != (now["version"], now["title"])}
    placeholders = ", ".join("?" * len(kept))
    renumbered = [
        row[0]
        for row in query(
            server.db_path,
            f"SELECT change_seq FROM recordings_recording WHERE id IN ({placeholders}) ORDER BY change_seq",
            sorted(hexes(kept)),
        )
    ]
    held = sorted({cursor for cursor in device.cursors if cursor >= renumbered[0]})[:3]
    assert stale == {}, f"bob's restored recordings went to {renumbered}; the device already held cursors {held}"
    assert [failure for failure in writers.failures if failure.startswith("500")] == []
    assert [failure for failure in device.failures if not failure.startswith("401")] == []
    assert "Traceback" not in server.log_text()
