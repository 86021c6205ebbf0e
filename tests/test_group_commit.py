"""Group commit: reads' audit events and SQLite's writes committed together, each answered only once committed.

The database thread is held busy (a write waiting on a gate) while requests
arrive, so that they wait together and go in one batch for certain.
"""

import asyncio
import threading
import uuid

import pytest
from asgiref.sync import sync_to_async
from django.db import DatabaseError, connection, connections, transaction

from clinical.models import AuditEvent
from clinical.writes import on_write_thread
from recordings.models import Recording
from recordings.services import recording_create

pytestmark = pytest.mark.django_db(transaction=True)

GATE_SECONDS = 10


async def hold_database_thread(gate: threading.Event) -> asyncio.Task:
    """A write that keeps the database thread until the gate opens (GATE_SECONDS at most)."""
    holding = asyncio.ensure_future(on_write_thread(gate.wait, GATE_SECONDS))
    await asyncio.sleep(0.1)
    return holding


async def test_writes_waiting_together_are_kept_and_one_refused_is_undone_alone(alice):
    gate = threading.Event()
    holding = await hold_database_thread(gate)

    def create(title):
        recording, _ = recording_create(owner=alice, patient_ref="PAT-1", title=title)
        return recording.pk

    @transaction.atomic  # one write, as every service is
    def create_then_fail():
        recording_create(owner=alice, patient_ref="PAT-1", title="undone")
        raise ValueError("refused after its insert")

    writes = [asyncio.ensure_future(on_write_thread(create, f"kept {n}")) for n in range(20)]
    writes.insert(7, asyncio.ensure_future(on_write_thread(create_then_fail)))
    await asyncio.sleep(0.1)
    if connection.vendor == "sqlite":  # PostgreSQL runs them at once, each in its own transaction
        assert not any(write.done() for write in writes)
    gate.set()
    await holding
    outcomes = await asyncio.gather(*writes, return_exceptions=True)

    assert isinstance(outcomes.pop(7), ValueError)
    assert all(isinstance(outcome, uuid.UUID) for outcome in outcomes)
    titles = {title async for title in Recording.objects.values_list("title", flat=True)}
    assert titles == {f"kept {n}" for n in range(20)}
    creates = AuditEvent.objects.filter(action="create")
    assert {rid async for rid in creates.values_list("recording_id", flat=True)} == set(outcomes)
    numbers = sorted([seq async for seq in Recording.objects.values_list("change_seq", flat=True)])
    assert numbers == list(range(1, 21))  # the undone write's number was undone with it


@pytest.mark.sqlite_only  # SQLite's own rollback of a whole transaction (disk full, I/O error)
async def test_a_write_after_which_sqlite_rolled_back_the_batch_fails_the_whole_batch(alice):
    gate = threading.Event()
    holding = await hold_database_thread(gate)

    def create(title):
        return recording_create(owner=alice, patient_ref="PAT-1", title=title)[0].pk

    def transaction_lost():
        connection.connection.execute("ROLLBACK")  # as SQLite does itself on SQLITE_FULL or SQLITE_IOERR
        raise DatabaseError("database or disk is full")

    writes = [asyncio.ensure_future(on_write_thread(create, f"lost {n}")) for n in range(3)]
    writes.append(asyncio.ensure_future(on_write_thread(transaction_lost)))
    writes += [asyncio.ensure_future(on_write_thread(create, f"not run {n}")) for n in range(3)]
    await asyncio.sleep(0.1)
    gate.set()
    await holding
    outcomes = await asyncio.gather(*writes, return_exceptions=True)

    assert all(isinstance(outcome, DatabaseError) for outcome in outcomes)  # none is answered as done
    assert await Recording.objects.acount() == 0


@pytest.mark.sqlite_only  # PostgreSQL has threads to spare: its reads do not wait behind the held one
async def test_reads_are_answered_only_once_their_events_are_committed(api, alice, make_recording):
    recordings = [await make_recording(alice, title=f"note {n}") for n in range(5)]
    await api.token_for(alice)
    gate = threading.Event()
    holding = await hold_database_thread(gate)

    reads = [asyncio.ensure_future(api.get(f"/recordings/{r.pk}", user=alice)) for r in recordings * 4]
    reads.append(asyncio.ensure_future(api.get("/recordings?limit=3", user=alice)))
    await asyncio.sleep(0.3)
    assert not any(read.done() for read in reads)  # read, but their events not yet written
    assert await asyncio.to_thread(_reads_written) == 0  # on a thread of its own: the database thread is held
    gate.set()
    await holding
    answers = await asyncio.gather(*reads)

    assert [answer.status_code for answer in answers] == [200] * len(reads)
    per_recording = {
        r.pk: await AuditEvent.objects.filter(action="read", recording_id=r.pk).acount() for r in recordings
    }
    newest = {r.pk for r in recordings[-3:]}
    assert per_recording == {r.pk: 4 + (r.pk in newest) for r in recordings}


@pytest.mark.sqlite_only  # PostgreSQL writes reads' events apart from the writes, each write its own transaction
async def test_reads_events_commit_with_the_writes_waiting_and_a_refused_write_leaves_them(api, alice, make_recording):
    recording = await make_recording(alice)
    await api.token_for(alice)
    gate = threading.Event()
    holding = await hold_database_thread(gate)

    reads = [asyncio.ensure_future(api.get(f"/recordings/{recording.pk}", user=alice)) for _ in range(3)]
    writes = [asyncio.ensure_future(api.post("/recordings", {"patient_ref": "PAT-2"}, user=alice)) for _ in range(2)]
    writes.append(asyncio.ensure_future(api.post("/recordings", {"id": str(recording.pk)}, user=alice)))  # 422
    refused = asyncio.ensure_future(on_write_thread(_refused_write, alice))
    await asyncio.sleep(0.3)
    gate.set()
    await holding

    assert [(await read).status_code for read in reads] == [200] * 3
    assert [(await write).status_code for write in writes] == [201, 201, 422]
    with pytest.raises(ValueError, match="refused"):
        await refused
    assert await AuditEvent.objects.filter(action="read", recording_id=recording.pk).acount() == 3
    assert await Recording.objects.filter(patient_ref="PAT-2").acount() == 2
    assert not await Recording.objects.filter(patient_ref="PAT-undone").aexists()


@pytest.mark.sqlite_only
async def test_writes_waiting_with_reads_whose_events_fail_fail_with_them(api, alice, make_recording):
    recording = await make_recording(alice)
    await api.token_for(alice)
    await sync_to_async(_refuse_read_events)(True)  # as a full disk would, for the reads' statement alone
    try:
        gate = threading.Event()
        holding = await hold_database_thread(gate)
        read = asyncio.ensure_future(api.get(f"/recordings/{recording.pk}", user=alice))
        writes = [
            asyncio.ensure_future(api.post("/recordings", {"patient_ref": "PAT-2"}, user=alice)) for _ in range(2)
        ]
        await asyncio.sleep(0.3)
        gate.set()
        await holding
        answers = [await read, *[await write for write in writes]]
    finally:
        await sync_to_async(_refuse_read_events)(False)

    assert [answer.status_code >= 500 for answer in answers] == [True] * 3  # none answered as done
    assert "title" not in answers[0].text
    assert not await Recording.objects.filter(patient_ref="PAT-2").aexists()
    assert (
        not await AuditEvent.objects.filter(action__in=["read", "create"]).exclude(recording_id=recording.pk).aexists()
    )


def _refused_write(owner):
    with transaction.atomic():
        recording_create(owner=owner, patient_ref="PAT-undone")
        raise ValueError("refused after its insert")


def _refuse_read_events(on: bool) -> None:
    with connection.cursor() as cursor:
        cursor.execute(
            "CREATE TRIGGER gc_refuse_reads BEFORE INSERT ON clinical_auditevent WHEN NEW.action = 'read' "
            "BEGIN SELECT RAISE(ABORT, 'disk full'); END"
            if on
            else "DROP TRIGGER gc_refuse_reads"
        )


async def test_a_read_whose_events_cannot_be_written_is_not_answered(api, alice, make_recording):
    recording = await make_recording(alice)
    await api.token_for(alice)
    await sync_to_async(_refuse_audit_inserts)(True)  # as a full disk would
    try:
        answer = await api.get(f"/recordings/{recording.pk}", user=alice)
    finally:
        await sync_to_async(_refuse_audit_inserts)(False)
    # An error (SQLite names the trigger's refusal a constraint's, 500; PostgreSQL's, 503), never the recording.
    assert answer.status_code in (500, 503)
    assert "title" not in answer.text
    assert await AuditEvent.objects.filter(action="read").acount() == 0


def _reads_written() -> int:
    try:
        return AuditEvent.objects.filter(action="read").count()
    finally:
        connections.close_all()


def _refuse_audit_inserts(on: bool) -> None:
    with connection.cursor() as cursor:
        if connection.vendor == "sqlite":
            cursor.execute(
                "CREATE TRIGGER gc_refuse BEFORE INSERT ON clinical_auditevent "
                "BEGIN SELECT RAISE(ABORT, 'disk full'); END"
                if on
                else "DROP TRIGGER gc_refuse"
            )
        elif on:
            cursor.execute(
                "CREATE OR REPLACE FUNCTION gc_refuse() RETURNS trigger AS $$ "
                "BEGIN RAISE EXCEPTION 'disk full'; END $$ LANGUAGE plpgsql"
            )
            cursor.execute("CREATE TRIGGER gc_refuse BEFORE INSERT ON clinical_auditevent EXECUTE FUNCTION gc_refuse()")
        else:
            cursor.execute("DROP TRIGGER gc_refuse ON clinical_auditevent")
