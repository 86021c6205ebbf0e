"""Behaviour of a real uvicorn process: restart, crash, concurrent writers, WAL files, broken databases, shutdown.

Every test gets its own server process and its own database file (the function-scoped
fixtures below); none of them touches pytest-django's test database.
"""

import asyncio
import random
import signal
import time
import uuid

import pytest

from tests.server import Server

USERS = ("alice", "bob", "carol", "dave")
CLIENTS = 32
OPERATIONS = 50
NEXT_STATUS = {"pending": "uploaded", "uploaded": "transcribing", "transcribing": "transcribed"}
FULL_RECORDING = {
    "patient_ref": "  PAT-ÅÉ-00042 ",
    "title": "Follow-up after surgery",
    "note_type": "consult",
    "status": "uploaded",
    "audio_path": "audio/2024/05/rec-42.webm",
    "duration_seconds": 187.25,
    "transcript": "Patient reports less pain.\nNo fever. Ünïcode ✓",
    "verification_results": {"checks": [{"name": "dose", "ok": True}], "score": 0.93, "notes": None},
    "recorded_at": "2024-05-03T08:15:30.123456+02:00",
}
GARBAGE = b"this is not a SQLite database, just text that happens to sit where one should be\n" * 64


@pytest.fixture(scope="session")
def template(tmp_path_factory):
    """One migrated database with USERS, which each test copies: migrating costs seconds."""
    template = Server(tmp_path_factory.mktemp("template"))
    template.prepare(*USERS)
    return template


@pytest.fixture
def server(tmp_path, template):
    """A started server over the test's own copy of the migrated database (on the suite's engine)."""
    server = Server(tmp_path / "server", template=template)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def bare_server(tmp_path):
    """A server over a database file the test writes itself; started by the test."""
    server = Server(tmp_path / "server")
    yield server
    server.stop()


def by_id(responses) -> dict[str, dict]:
    return {response.json()["id"]: response.json() for response in responses}


def differences(expected: dict[str, dict], actual: dict[str, dict]) -> list[str]:
    """One line per recording missing, unexpected or with a field that differs; empty when equal."""
    lines = [f"{key} missing" for key in expected.keys() - actual.keys()]
    lines += [f"{key} unexpected" for key in actual.keys() - expected.keys()]
    for key in expected.keys() & actual.keys():
        fields = expected[key].keys() | actual[key].keys()
        lines += [
            f"{key} {field}: {expected[key].get(field)!r} != {actual[key].get(field)!r}"
            for field in sorted(fields)
            if expected[key].get(field) != actual[key].get(field)
        ]
    return sorted(lines)


def test_recording_survives_a_restart(server):
    token = server.login("alice")
    with server.client(token) as client:
        created = client.post("/recordings", json=FULL_RECORDING)
        patched = client.patch(f"/recordings/{created.json()['id']}", json={"version": 1, "status": "transcribing"})

    server.stop()
    server.start()
    with server.client(token) as client:
        fetched = client.get(f"/recordings/{created.json()['id']}")

    assert created.status_code == 201
    assert patched.status_code == 200
    assert patched.json()["version"] == 2
    assert fetched.status_code == 200
    assert fetched.json() == patched.json()


@pytest.mark.sqlite_only  # SQLite's WAL recovery; PostgreSQL's crash recovery is its own
def test_acknowledged_writes_survive_a_crash(server):
    token = server.login("bob")
    with server.client(token) as client:
        first = client.post("/recordings", json=FULL_RECORDING).json()
        updated = client.patch(f"/recordings/{first['id']}", json={"version": 1, "title": "changed"})
        creates = [client.post("/recordings", json={"patient_ref": f"PAT-{n}"}) for n in range(10)]

        server.kill()  # right after the last 201: no shutdown, no checkpoint
    unrecovered_wal = server.wal_path.stat().st_size

    server.start()
    with server.client(token) as client:
        after = [client.get(f"/recordings/{response.json()['id']}") for response in [updated, *creates]]

    assert unrecovered_wal > 0  # the writes were still in the WAL: the restart had to recover them
    assert [response.status_code for response in creates] == [201] * 10
    assert [response.status_code for response in after] == [200] * 11
    assert differences(by_id([updated, *creates]), by_id(after)) == []


async def run_client(server, token: str, index: int) -> tuple[dict[str, dict], list[str]]:
    """OPERATIONS creates and patches of this client's own recordings: their last acknowledged state, and failures."""
    rng = random.Random(index)
    acknowledged: dict[str, dict] = {}
    failures: list[str] = []
    async with server.async_client(token) as client:
        for operation in range(OPERATIONS):
            title = f"client {index} operation {operation}"
            if not acknowledged or rng.random() < 0.4:
                response = await client.post(
                    "/recordings", json={"patient_ref": f"PAT-{index}-{operation}", "title": title}
                )
                expected = 201
            else:
                current = acknowledged[rng.choice(list(acknowledged))]
                changes = {"version": current["version"], "title": title}
                if current["status"] in NEXT_STATUS:
                    changes["status"] = NEXT_STATUS[current["status"]]
                response = await client.patch(f"/recordings/{current['id']}", json=changes)
                expected = 200
            if response.status_code != expected:
                failures.append(f"{response.request.method} {response.status_code} {response.text[:300]}")
                continue
            acknowledged[response.json()["id"]] = response.json()
    return acknowledged, failures


async def list_all(server, token: str) -> dict[str, dict]:
    found: dict[str, dict] = {}
    async with server.async_client(token) as client:
        while True:
            page = (await client.get("/recordings", params={"limit": 200, "offset": len(found)})).json()
            found.update({item["id"]: item for item in page["items"]})
            if not page["items"]:
                return found


async def test_concurrent_clients_lose_nothing_and_never_fail(server):
    tokens = {username: server.login(username) for username in USERS}
    owners = [USERS[index % len(USERS)] for index in range(CLIENTS)]

    results = await asyncio.gather(*(run_client(server, tokens[owner], index) for index, owner in enumerate(owners)))

    assert [failure for _, failures in results for failure in failures] == []
    log = server.log_text()
    assert "database is locked" not in log.lower()
    assert "Traceback" not in log
    acknowledged = {username: {} for username in USERS}
    for owner, (recordings, _) in zip(owners, results, strict=True):
        acknowledged[owner].update(recordings)
    columns = ("version", "title", "status", "patient_ref")
    expected_rows = {
        key: {name: recording[name] for name in columns}
        for recordings in acknowledged.values()
        for key, recording in recordings.items()
    }
    rows = server.query(f"SELECT id, {', '.join(columns)} FROM recordings_recording")
    stored = {str(uuid.UUID(str(row[0]))): dict(zip(columns, row[1:], strict=True)) for row in rows}
    assert differences(expected_rows, stored) == []
    # Every acknowledged write is one version step and one change number: nothing lost, nothing twice.
    assert sum(recording["version"] for recording in stored.values()) == CLIENTS * OPERATIONS
    assert server.query("SELECT value FROM clinical_changesequence") == [(CLIENTS * OPERATIONS,)]
    for username in USERS:
        assert differences(acknowledged[username], await list_all(server, tokens[username])) == []


@pytest.mark.sqlite_only
def test_running_server_keeps_the_database_in_wal_mode(server):
    with server.client(server.login("carol")) as client:
        client.post("/recordings", json={"patient_ref": "PAT-1"})

    wal_exists, shm_exists = server.wal_path.exists(), server.shm_path.exists()  # before we open it ourselves
    journal_mode = server.query("PRAGMA journal_mode")

    assert wal_exists
    assert shm_exists
    assert journal_mode == [("wal",)]


@pytest.mark.sqlite_only
@pytest.mark.parametrize("content", [b"", GARBAGE], ids=["unmigrated-empty-file", "garbage-file"])
def test_health_is_503_on_an_unusable_database(bare_server, content):
    bare_server.db_path.write_bytes(content)

    response = bare_server.start(healthy=False)

    assert response.status_code == 503
    assert response.headers["content-type"].startswith("application/json")
    assert response.json()["status"] == "unavailable"


@pytest.mark.sqlite_only
@pytest.mark.parametrize("content", [b"", GARBAGE], ids=["unmigrated-empty-file", "garbage-file"])
def test_api_is_503_not_500_on_an_unusable_database(bare_server, content):
    bare_server.db_path.write_bytes(content)
    bare_server.start(healthy=False)

    with bare_server.client("some-token") as client:
        answers = [
            client.post("/auth/token", json={"username": "alice", "password": "secret"}),
            client.get("/recordings"),
            client.post("/recordings", json={"patient_ref": "PAT-1"}),
            # Input refused before the token's check: the check cannot be made.
            client.get("/recordings?limit=0"),
        ]

    assert [(answer.request.method, answer.status_code) for answer in answers] == [
        ("POST", 503),
        ("GET", 503),
        ("POST", 503),
        ("GET", 503),
    ]
    assert all(answer.headers["retry-after"] == "5" for answer in answers)
    assert all(answer.headers["content-type"].startswith("application/json") for answer in answers)
    assert all("detail" in answer.json() for answer in answers)


def test_sigterm_shuts_down_cleanly(server):
    with server.client(server.login("dave")) as client:
        statuses = [client.post("/recordings", json={"patient_ref": f"PAT-{n}"}).status_code for n in range(20)]
    started = time.monotonic()

    code = server.stop()

    elapsed = time.monotonic() - started
    assert statuses == [201] * 20
    # uvicorn (0.29 and later) re-raises the SIGTERM it handled once shutdown is complete, so a
    # clean stop ends "killed by SIGTERM"; the log tells a graceful shutdown from a plain kill.
    assert code in (0, -signal.SIGTERM)
    assert "Application shutdown complete." in server.log_since_start()
    assert "Finished server process" in server.log_since_start()
    assert elapsed < 5
    assert server.query("SELECT count(*) FROM recordings_recording") == [(20,)]
    if server.engine == "sqlite":  # a clean close checkpoints the WAL
        assert not server.wal_path.exists() or server.wal_path.stat().st_size == 0
        assert server.query("PRAGMA integrity_check") == [("ok",)]
