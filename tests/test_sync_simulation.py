"""A randomized simulation of offline devices syncing through the whole ASGI stack.

Two clinicians with three devices each create recordings (with ids they choose),
patch them (with the version they last saw, resolving 409 from the current
recording in its body), delete them and pull the feed, all at once. Some answers
are dropped on the floor: the request completes, the device ignores the answer
and later sends the very same request again with the same Idempotency-Key,
sometimes while the first is still in flight. At the end every device pulls
the feed from its stored cursor, and what it holds must be exactly the server's
state, with nothing of the other clinician's.

Here it runs in-process, through httpx's ASGI transport; tests/test_scale_out.py
runs the same simulation against real server processes (`run_simulation` with
another `api` and a `ServerStore`).

Every assertion message carries the seed. Replay a failure, or soak for longer:

    SYNC_SIM_SEED=1234 scripts/test tests/test_sync_simulation.py
    SYNC_SIM_OPS=20000 scripts/test tests/test_sync_simulation.py
"""

import asyncio
import os
import random
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field

import pytest
from asgiref.sync import sync_to_async
from django.contrib.auth import get_user_model

from clinical.tokens import token_issue
from recordings.models import Recording
from recordings.services import STALE_VERSION

pytestmark = pytest.mark.django_db(transaction=True)

SEED = int(os.environ.get("SYNC_SIM_SEED") or random.SystemRandom().randrange(2**32))
OPERATIONS = int(os.environ.get("SYNC_SIM_OPS") or 360)
CLINICIANS = ("alice", "bob")
DEVICES_PER_CLINICIAN = 3
PAGE = 7  # small, so that walks span many pages
DROP = 0.15  # share of mutating requests whose answer is lost
PATCH_ATTEMPTS = 20
REPLAYED = "Idempotent-Replayed"
WHY = f"SYNC_SIM_SEED={SEED}"

# The SPEC's transition table, written out here rather than read from the code under test.
ALLOWED = {
    "pending": ["uploaded", "failed"],
    "uploaded": ["transcribing", "failed"],
    "transcribing": ["transcribed", "failed"],
    "transcribed": ["verified", "transcribing", "failed"],
    "failed": ["pending"],
    "verified": [],
}
TOMBSTONE_KEYS = {"id", "deleted", "owner", "version", "change_seq", "updated_at", "deleted_at", "digest"}
COMPARED = ("patient_ref", "title", "status", "transcript", "version", "change_seq")


@dataclass
class Ledger:
    """What the server acknowledged, as every device (and the harness, for dropped answers) saw it."""

    created: Counter = field(default_factory=Counter)  # id -> 201 answers that did the work
    patched: Counter = field(default_factory=Counter)  # id -> 200 answers that did the work
    deleted: set = field(default_factory=set)  # ids with a 204 answer
    gone: set = field(default_factory=set)  # ids a patch found deleted (404)
    versions: dict = field(default_factory=dict)  # (id, version) -> the answer that made it
    operations: Counter = field(default_factory=Counter)
    requests: int = 0


class OrmStore:
    """The server's state through the ORM: the in-process server's database is the test's own."""

    async def is_deleted(self, recording_id: str) -> bool:
        return await Recording.objects.filter(pk=recording_id, deleted_at__isnull=False).aexists()

    async def state(self, username: str) -> dict[str, dict]:
        """Every recording of `username`, tombstones included: id -> {"deleted_at", *COMPARED}."""
        rows = Recording.objects.filter(owner__username=username).values("id", "deleted_at", *COMPARED)
        return {str(row["id"]): row async for row in rows}


class ServerStore:
    """The same reads in SQL on a real server's database (`tests.server.Server.query`), whichever the engine."""

    def __init__(self, server):
        self.server = server
        recording, user = Recording._meta, get_user_model()._meta
        columns = ", ".join(f"r.{recording.get_field(name).column}" for name in ("id", "deleted_at", *COMPARED))
        self.state_sql = (
            f"SELECT {columns} FROM {recording.db_table} r JOIN {user.db_table} u "
            f"ON u.{user.pk.column} = r.{recording.get_field('owner').column} "
            f"WHERE u.{get_user_model().USERNAME_FIELD} = %s"
        )
        deleted_at = recording.get_field("deleted_at").column
        self.deleted_sql = (
            f"SELECT 1 FROM {recording.db_table} WHERE {recording.pk.column} = %s AND {deleted_at} IS NOT NULL"
        )

    async def is_deleted(self, recording_id: str) -> bool:
        # Hex digits: SQLite stores a UUIDField so, and PostgreSQL's uuid reads them too.
        return bool(await asyncio.to_thread(self.server.query, self.deleted_sql, (uuid.UUID(recording_id).hex,)))

    async def state(self, username: str) -> dict[str, dict]:
        rows = await asyncio.to_thread(self.server.query, self.state_sql, (username,))
        names = ("id", "deleted_at", *COMPARED)
        return {str(uuid.UUID(str(row[0]))): dict(zip(names, row, strict=True)) for row in rows}


@dataclass
class Device:
    name: str
    username: str
    token: str
    rng: random.Random
    cursor: int = 0
    replica: dict = field(default_factory=dict)  # id -> latest change pulled from the feed
    known: dict = field(default_factory=dict)  # id -> latest live recording this device saw
    busy: set = field(default_factory=set)  # ids with a request whose answer it is still waiting for
    retries: list = field(default_factory=list)  # dropped requests to send again
    serial: int = 0

    def key(self) -> str:
        self.serial += 1
        return f"{self.name}-{self.serial}"


@dataclass
class Call:
    method: str
    path: str
    body: dict | None
    key: str
    on_answer: object  # coroutine function taking the answer the device finally reads


class Simulation:
    """`api`: anything with `async request(method, path, json, *, token, headers)` answering httpx responses.

    `store`: how the harness reads the server's state (OrmStore, ServerStore).
    """

    def __init__(self, api, store, devices: list[Device]):
        self.api = api
        self.store = store
        self.devices = devices
        self.ledger = Ledger()

    # Talking to the server

    async def send(self, device: Device, call: Call):
        self.ledger.requests += 1
        headers = {"Idempotency-Key": call.key} if call.key else None
        answer = await self.api.request(call.method, call.path, call.body, token=device.token, headers=headers)
        assert answer.status_code < 500, f"{WHY}: {call.method} {call.path} answered {answer.status_code} {answer.text}"
        self.account(call, answer)
        return answer

    def account(self, call: Call, answer) -> None:
        """Count the work each answer says it did: a replay did none."""
        if REPLAYED in answer.headers:
            return
        if call.method == "POST" and answer.status_code == 201:
            self.ledger.created[answer.json()["id"]] += 1
        elif call.method == "PATCH" and answer.status_code == 200:
            self.ledger.patched[answer.json()["id"]] += 1
        if answer.status_code in (200, 201):
            body = answer.json()
            made = (body["id"], body["version"])
            earlier = self.ledger.versions.setdefault(made, body)
            assert earlier == body, f"{WHY}: two different answers made version {made}: {earlier} and {body}"

    async def perform(self, device: Device, call: Call) -> None:
        """Send; maybe lose the answer, then (now or later) send the very same request again."""
        if device.rng.random() >= DROP:
            await call.on_answer(await self.send(device, call))
            return
        self.ledger.operations["dropped"] += 1
        if device.rng.random() < 0.3:
            # The retry leaves while the first is still in flight.
            lost, answer = await asyncio.gather(self.send(device, call), self.send(device, call))
            await self.check_replay(call, lost, answer, concurrent=True)
            await call.on_answer(answer if answer.status_code < 300 else lost)
            return
        lost = await self.send(device, call)
        device.retries.append((call, lost))

    async def retry(self, device: Device) -> None:
        call, lost = device.retries.pop(device.rng.randrange(len(device.retries)))
        answer = await self.send(device, call)
        await self.check_replay(call, lost, answer, concurrent=False)
        await call.on_answer(answer)

    async def check_replay(self, call: Call, lost, answer, *, concurrent: bool) -> None:
        self.ledger.operations["retried"] += 1
        what = f"{WHY}: {call.method} {call.path} with key {call.key} (concurrent={concurrent})"
        if lost.status_code >= 300 and not concurrent:
            return  # a refused answer is not stored: the retry is a request of its own
        if lost.status_code >= 300 and answer.status_code >= 300:
            return  # both refused: nothing done, nothing stored
        if concurrent and min(lost.status_code, answer.status_code) < 300 < max(lost.status_code, answer.status_code):
            done, refused = (lost, answer) if lost.status_code < 300 else (answer, lost)
            if refused.status_code == 404 and await self.deleted_since(done):
                # Another device deleted the note between the two: its stored answers went with it.
                return
            # Allowed for a repeat that arrives while the first is still running, and no work done.
            assert max(lost.status_code, answer.status_code) == 409, f"{what}: {lost.text} / {answer.text}"
            return
        if not concurrent and REPLAYED not in answer.headers and await self.deleted_since(lost):
            # A deleted note's stored answers went with it: the retry is done afresh, and refused.
            assert answer.status_code in (404, 409), f"{what}: {answer.status_code} {answer.text}"
            return
        first, second = (lost, answer) if REPLAYED not in lost.headers else (answer, lost)
        assert REPLAYED not in first.headers, f"{what}: both answers claim to be replays"
        assert second.headers.get(REPLAYED) == "true", f"{what}: the work was done twice, or the answer lost"
        assert (second.status_code, second.content) == (first.status_code, first.content), what

    async def deleted_since(self, answer) -> bool:
        """Whether `answer` carried a recording that is deleted now."""
        if not answer.content or answer.status_code >= 300:
            return False
        return await self.store.is_deleted(answer.json()["id"])

    # What a device does

    async def run(self, device: Device, operations: int) -> None:
        for _ in range(operations):
            if device.retries and device.rng.random() < 0.4:
                await self.retry(device)
            choice = device.rng.random()
            live = [rid for rid in device.known if rid not in device.busy]
            if choice < 0.25 or not live:
                await self.create(device)
            elif choice < 0.65:
                await self.patch(device, device.rng.choice(live))
            elif choice < 0.75:
                await self.delete(device, device.rng.choice(live))
            else:
                await self.pull(device, pages=device.rng.choice([1, None]))
            await asyncio.sleep(0)
        while device.retries:
            await self.retry(device)

    async def create(self, device: Device) -> None:
        self.ledger.operations["create"] += 1
        recording_id = str(uuid.UUID(int=device.rng.getrandbits(128), version=4))
        body = {
            "id": recording_id,
            "patient_ref": f"PAT-{device.rng.randrange(10**5):05}",
            "title": f"{device.name} created",
            "status": device.rng.choice(["pending", "uploaded"]),
        }
        device.busy.add(recording_id)

        async def on_answer(answer):
            device.busy.discard(recording_id)
            if answer.status_code == 409 and await self.store.is_deleted(recording_id):
                return  # a retry after another device deleted it: a deleted note is not served again
            assert answer.status_code == 201, f"{WHY}: create {recording_id} answered {answer.status_code}"
            self.learn(device, answer.json())

        await self.perform(device, Call("POST", "/recordings", body, device.key(), on_answer))

    async def patch(self, device: Device, recording_id: str, attempt: int = 1) -> None:
        self.ledger.operations["patch" if attempt == 1 else "patch retried after 409"] += 1
        assert attempt <= PATCH_ATTEMPTS, f"{WHY}: {recording_id} still conflicting after {PATCH_ATTEMPTS} patches"
        seen = device.known[recording_id]
        body = {"version": seen["version"], "title": f"{device.name} patch {device.serial}"}
        if ALLOWED[seen["status"]] and device.rng.random() < 0.5:
            body["status"] = device.rng.choice(ALLOWED[seen["status"]])
        if device.rng.random() < 0.2:
            body["transcript"] = f"Transcript {device.rng.getrandbits(32):08x}"
        device.busy.add(recording_id)

        async def on_answer(answer):
            device.busy.discard(recording_id)
            what = f"{WHY}: PATCH {recording_id} {body}"
            if answer.status_code == 200:
                self.learn(device, answer.json())
            elif answer.status_code == 409:
                current = answer.json()["current"]
                assert answer.json()["detail"] == STALE_VERSION, f"{what}: {answer.json()['detail']}"
                assert current["version"] > body["version"], f"{what}: 409 without a newer version"
                self.learn(device, current)
                await self.patch(device, recording_id, attempt + 1)
            else:
                assert answer.status_code == 404, f"{what}: answered {answer.status_code} {answer.text}"
                self.ledger.gone.add(recording_id)
                device.known.pop(recording_id, None)

        await self.perform(device, Call("PATCH", f"/recordings/{recording_id}", body, device.key(), on_answer))

    async def delete(self, device: Device, recording_id: str) -> None:
        self.ledger.operations["delete"] += 1
        device.busy.add(recording_id)

        async def on_answer(answer):
            assert answer.status_code == 204, f"{WHY}: DELETE {recording_id} answered {answer.status_code}"
            device.busy.discard(recording_id)
            self.ledger.deleted.add(recording_id)
            device.known.pop(recording_id, None)

        await self.perform(device, Call("DELETE", f"/recordings/{recording_id}", None, device.key(), on_answer))

    async def pull(self, device: Device, pages: int | None = None) -> list[dict]:
        """Walk the feed from the stored cursor; `pages` pages, or until has_more is false."""
        self.ledger.operations["pull"] += 1
        walked = []
        while pages is None or pages > 0:
            self.ledger.requests += 1
            since = device.cursor
            path = f"/sync/changes?since={since}&limit={PAGE}"
            answer = await self.api.request("GET", path, None, token=device.token, headers=None)
            assert answer.status_code == 200, f"{WHY}: {device.name} pull answered {answer.status_code} {answer.text}"
            page = answer.json()
            self.check_page(device, since, page)
            for change in page["changes"]:
                self.apply(device, change)
            walked += page["changes"]
            device.cursor = page["cursor"]
            pages = None if pages is None else pages - 1
            if not page["has_more"]:
                break
        return walked

    def check_page(self, device: Device, since: int, page: dict) -> None:
        numbers = [change["change_seq"] for change in page["changes"]]
        what = f"{WHY}: {device.name} page after {since}: {numbers}"
        assert len(page["changes"]) <= PAGE, what
        assert all(number > since for number in numbers), what
        assert numbers == sorted(set(numbers)), what
        assert page["cursor"] == (numbers[-1] if numbers else since), what
        assert not page["has_more"] or len(numbers) == PAGE, what
        assert {change["owner"] for change in page["changes"]} <= {device.username}, what

    def apply(self, device: Device, change: dict) -> None:
        held = device.replica.get(change["id"])
        what = f"{WHY}: {device.name} pulled {change}"
        assert held is None or change["version"] > held["version"], f"{what} after {held}"
        assert held is None or not held["deleted"], f"{what} after its tombstone"
        if change["deleted"]:
            assert set(change) == TOMBSTONE_KEYS, what
        device.replica[change["id"]] = change
        if change["deleted"]:
            device.known.pop(change["id"], None)
        else:
            self.learn(device, change)

    def learn(self, device: Device, recording: dict) -> None:
        """Keep the newest live state this device has seen of a recording."""
        rid = recording["id"]
        if rid in device.replica and device.replica[rid]["deleted"]:
            return
        if rid not in device.known or recording["version"] > device.known[rid]["version"]:
            device.known[rid] = recording


def as_stored(change: dict) -> dict:
    """A feed change in the shape of server_state's rows, to compare the two."""
    if change["deleted"]:
        return {"version": change["version"], "change_seq": change["change_seq"], "deleted": True}
    return {**{name: change[name] for name in COMPARED}, "deleted": False}


def row_as_stored(row: dict) -> dict:
    if row["deleted_at"] is not None:
        return {"version": row["version"], "change_seq": row["change_seq"], "deleted": True}
    return {**{name: row[name] for name in COMPARED}, "deleted": False}


async def run_simulation(api, store, tokens: dict[str, list[str]]) -> Ledger:
    """Every device at once, then a final walk from each cursor and from 0; assert the end state as `store` reads it.

    `tokens` maps each username of CLINICIANS to one token for each of its DEVICES_PER_CLINICIAN devices.
    """
    print(f"sync simulation: {WHY} SYNC_SIM_OPS={OPERATIONS}")
    master = random.Random(SEED)
    devices = []
    for username in CLINICIANS:
        for number, token in enumerate(tokens[username]):
            devices.append(Device(f"{username}-{number}", username, token, random.Random(master.getrandbits(64))))
    simulation = Simulation(api, store, devices)
    per_device = -(-OPERATIONS // len(devices))
    started = time.perf_counter()

    await asyncio.gather(*(simulation.run(device, per_device) for device in devices))
    ledger = simulation.ledger
    operations = sum(ledger.operations[name] for name in ("create", "patch", "delete", "pull"))
    elapsed = time.perf_counter() - started
    print(f"sync simulation: {operations} operations, {ledger.requests} requests in {elapsed:.1f} s")
    print(f"sync simulation: {dict(ledger.operations)}")
    final_walks = {device.name: await simulation.pull(device) for device in devices}
    fresh_walks = {}
    for device in devices:
        fresh_walks[device.name] = await simulation.pull(Device(device.name, device.username, device.token, master))

    assert operations >= OPERATIONS, WHY
    assert ledger.operations["dropped"] > 0, WHY
    states = {username: await store.state(username) for username in CLINICIANS}
    everyone = {rid for state in states.values() for rid in state}
    for device in devices:
        state = states[device.username]
        what = f"{WHY}: {device.name}"
        final_ids = [change["id"] for change in final_walks[device.name]]
        fresh_ids = [change["id"] for change in fresh_walks[device.name]]
        assert len(final_ids) == len(set(final_ids)), f"{what}: an id twice in the final walk"
        assert len(fresh_ids) == len(set(fresh_ids)), f"{what}: an id twice in a walk from 0"
        assert set(fresh_ids) == set(state), f"{what}: the walk from 0 is not every recording of its owner"
        assert set(device.replica) == set(state), f"{what}: its replica is not every recording of its owner"
        assert not set(device.replica) & (everyone - set(state)), f"{what}: holds another clinician's recordings"
        for change in fresh_walks[device.name]:
            assert as_stored(change) == row_as_stored(state[change["id"]]), f"{what}: walk from 0 {change}"
        for rid, change in device.replica.items():
            assert as_stored(change) == row_as_stored(state[rid]), f"{what}: replica {change} != server"
    for username, state in states.items():
        for rid, row in state.items():
            what = f"{WHY}: {username}'s {rid}"
            deleted = row["deleted_at"] is not None
            assert ledger.created[rid] == 1, f"{what} created {ledger.created[rid]} times"
            assert row["version"] == 1 + ledger.patched[rid] + deleted, f"{what}: version {row['version']}"
            assert deleted == (rid in ledger.deleted), f"{what}: deleted={deleted} but acknowledged otherwise"
    server_ids = set().union(*(set(state) for state in states.values()))
    assert set(ledger.created) == server_ids, f"{WHY}: acknowledged creates missing on the server"
    assert ledger.gone <= ledger.deleted, f"{WHY}: a patch found a recording deleted that nobody deleted"
    for (rid, version), answer in ledger.versions.items():
        row = states[answer["owner"]][rid]
        what = f"{WHY}: acknowledged {rid} v{version}"
        assert row["version"] >= version, f"{what} went back to v{row['version']}"
        if row["version"] == version:
            assert {name: answer[name] for name in COMPARED[:4]} == {name: row[name] for name in COMPARED[:4]}, what
    return ledger


async def test_devices_syncing_at_once_end_with_the_servers_state(api, alice, bob):
    tokens = {user.username: [] for user in (alice, bob)}
    for user in (alice, bob):
        for _ in range(DEVICES_PER_CLINICIAN):
            raw, _ = await sync_to_async(token_issue)(user=user)
            tokens[user.username].append(raw)

    await run_simulation(api, OrmStore(), tokens)
