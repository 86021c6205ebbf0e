"""Several server processes on one database: two app servers on PostgreSQL, `--workers 2` on either engine.

32 clients write at once (creates and versioned patches of their own
recordings), spread over the processes: nothing acknowledged is lost, nothing
is done twice, no answer is a 5xx, and every change takes one change number.
The randomized sync simulation (tests/test_sync_simulation.py) runs over them
too, each request to the next process in turn, as a load balancer sends it.
"""

import asyncio
import itertools
import uuid
from contextlib import AsyncExitStack

import httpx
import pytest

from tests.server import Server
from tests.test_server_process import CLIENTS, OPERATIONS, USERS, differences, list_all, run_client
from tests.test_sync_simulation import CLINICIANS, DEVICES_PER_CLINICIAN, ServerStore, run_simulation

COLUMNS = ("version", "title", "status", "patient_ref")
SEAL_WAIT = 15  # seconds: a second's sealing rounds, past the wait for an id still in flight (clinical.chain)


async def write_at_once(servers: list[Server], tokens: dict[str, str]) -> tuple[list, list[str]]:
    owners = [USERS[index % len(USERS)] for index in range(CLIENTS)]
    runs = [run_client(servers[index % len(servers)], tokens[owner], index) for index, owner in enumerate(owners)]
    return list(zip(owners, await asyncio.gather(*runs), strict=True)), owners


async def assert_every_write_kept(servers: list[Server], tokens: dict[str, str], results: list) -> None:
    assert [failure for _, (_, failures) in results for failure in failures] == []
    for server in servers:
        assert "Traceback" not in server.log_text()
        assert "database is locked" not in server.log_text().lower()
    acknowledged = {username: {} for username in USERS}
    for owner, (recordings, _) in results:
        acknowledged[owner].update(recordings)
    expected = {
        key: {name: rec[name] for name in COLUMNS} for recs in acknowledged.values() for key, rec in recs.items()
    }
    rows = servers[0].query(f"SELECT id, {', '.join(COLUMNS)} FROM recordings_recording")
    stored = {str(uuid.UUID(str(row[0]))): dict(zip(COLUMNS, row[1:], strict=True)) for row in rows}
    assert differences(expected, stored) == []
    assert sum(recording["version"] for recording in stored.values()) == CLIENTS * OPERATIONS
    assert servers[0].query("SELECT value FROM clinical_changesequence") == [(CLIENTS * OPERATIONS,)]
    for server in servers:  # each process sees every write
        for username in USERS:
            assert differences(acknowledged[username], await list_all(server, tokens[username])) == []
    await assert_records_verify(servers[0])


async def assert_records_verify(server: Server) -> None:
    """The servers sealed every event into the audit chain by themselves, and both checks pass."""
    events = "SELECT count(*) FROM clinical_auditevent"
    sealed = "SELECT count(*) FROM clinical_auditseal"
    for _ in range(SEAL_WAIT * 10):
        if server.query(sealed) == server.query(events):
            break
        await asyncio.sleep(0.1)
    assert server.query(sealed) == server.query(events)
    audit, digests = server.manage("verifyaudit"), server.manage("verifydb")
    assert audit.returncode == 0, audit.stderr
    assert f"{server.query(events)[0][0]} events, head " in audit.stdout
    assert digests.returncode == 0, digests.stderr


@pytest.mark.postgresql_only
async def test_two_app_servers_on_one_database_lose_nothing(tmp_path):
    first = Server(tmp_path / "first")
    first.prepare(*USERS)
    second = Server(tmp_path / "second", database_url=first.database_url)

    with first, second:
        tokens = {username: first.login(username) for username in USERS}  # a token works on either
        results, _ = await write_at_once([first, second], tokens)
        await assert_every_write_kept([first, second], tokens, results)


async def test_two_workers_lose_nothing(tmp_path):
    server = Server(tmp_path / "server", args=("--workers", "2"))
    server.prepare(*USERS)

    with server:
        tokens = {username: server.login(username) for username in USERS}
        results, _ = await write_at_once([server], tokens)
        await assert_every_write_kept([server], tokens, results)


class RoundRobin:
    """The simulation's `api` over several processes: each request goes to the next client in turn."""

    def __init__(self, clients: list[httpx.AsyncClient]):
        self.clients = itertools.cycle(clients)

    async def request(self, method: str, path: str, json=None, *, token: str, headers=None) -> httpx.Response:
        headers = {**(headers or {}), "Authorization": f"Bearer {token}"}
        return await next(self.clients).request(method, path, json=json, headers=headers)


async def sync_across(servers: list[Server]) -> None:
    """The sync simulation with its devices' requests spread over `servers`; its assertions, and clean logs."""
    logins = itertools.cycle(servers)  # a token works on every process
    tokens = {username: [next(logins).login(username) for _ in range(DEVICES_PER_CLINICIAN)] for username in CLINICIANS}
    # A connection each request: the workers of one server take turns by accepting connections, and one
    # worker kept hold of nearly every kept-alive one.
    fresh = httpx.Limits(max_keepalive_connections=0)
    async with AsyncExitStack() as stack:
        clients = [await stack.enter_async_context(server.async_client(limits=fresh)) for server in servers]
        await run_simulation(RoundRobin(clients), ServerStore(servers[0]), tokens)
    await assert_records_verify(servers[0])
    for server in servers:
        assert "Traceback" not in server.log_text(), server.log_tail()
        assert "database is locked" not in server.log_text().lower(), server.log_tail()


@pytest.mark.postgresql_only
async def test_devices_syncing_through_two_app_servers_end_with_their_state(tmp_path):
    first = Server(tmp_path / "first")
    first.prepare(*CLINICIANS)
    second = Server(tmp_path / "second", database_url=first.database_url)

    with first, second:
        await sync_across([first, second])


async def test_devices_syncing_through_two_workers_end_with_their_state(tmp_path):
    server = Server(tmp_path / "server", args=("--workers", "2"))
    server.prepare(*CLINICIANS)

    with server:
        await sync_across([server])
