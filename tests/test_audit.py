"""The audit trail: one event for each write, read and login, in the work's transaction, and append-only."""

import uuid
from datetime import UTC, datetime

import pytest
from asgiref.sync import sync_to_async
from django.contrib.auth import get_user_model
from django.db import DatabaseError, connection, transaction

from clinical.audit import audit_record
from clinical.models import AuditEvent, ChangeSequence
from recordings.models import Recording

pytestmark = pytest.mark.django_db(transaction=True)

PASSWORD = "correct-horse-battery"
CLIENT_IP = "127.0.0.1"  # httpx's ASGITransport speaks for this address
EVENT_COLUMNS = [field.attname for field in AuditEvent._meta.concrete_fields]


async def events(**filters) -> list[AuditEvent]:
    return [event async for event in AuditEvent.objects.filter(**filters).order_by("id")]


async def actions(recording_id) -> list[str]:
    return [event.action for event in await events(recording_id=recording_id)]


async def row(recording_id) -> dict:
    return await Recording.objects.filter(pk=recording_id).values().aget()


# Writes through the API


async def test_a_create_is_one_event_naming_the_fields_given(api, alice):
    before = datetime.now(UTC)

    response = await api.post(
        "/recordings", {"patient_ref": "PAT-7", "title": "Knee", "status": "uploaded"}, user=alice
    )

    recording_id = uuid.UUID(response.json()["id"])
    [event] = await events(action="create")
    assert response.status_code == 201
    assert (event.user_id, event.username, event.recording_id) == (alice.pk, "alice", recording_id)
    assert {"patient_ref", "title", "status"} <= set(event.fields)
    assert set(event.fields) <= {field.name for field in Recording._meta.fields}
    assert (event.status_from, event.status_to) == ("", "uploaded")
    assert (event.client_ip, event.outcome) == (CLIENT_IP, "success")
    assert before <= event.at <= datetime.now(UTC)


async def test_a_patch_of_title_and_status_is_exactly_one_update_event(api, alice, make_recording):
    recording = await make_recording(owner=alice)

    response = await api.patch(
        f"/recordings/{recording.id}", {"version": 1, "title": "Knee, left", "status": "uploaded"}, user=alice
    )

    [update] = await events(action="update")
    assert response.status_code == 200
    assert await actions(recording.id) == ["create", "update"]
    assert (update.user_id, update.username, update.recording_id) == (alice.pk, "alice", recording.id)
    assert update.fields == ["status", "title"]
    assert (update.status_from, update.status_to) == ("pending", "uploaded")
    assert (update.client_ip, update.outcome) == (CLIENT_IP, "success")


async def test_a_change_without_status_leaves_the_status_columns_empty(api, alice, make_recording):
    recording = await make_recording(owner=alice)

    await api.patch(f"/recordings/{recording.id}", {"version": 1, "note_type": "letter", "error": "x"}, user=alice)

    [update] = await events(action="update")
    assert update.fields == ["error", "note_type"]
    assert (update.status_from, update.status_to) == ("", "")


async def test_only_the_fields_that_changed_are_named(api, alice, make_recording):
    recording = await make_recording(owner=alice, title="Knee")

    await api.patch(f"/recordings/{recording.id}", {"version": 1, "title": "Knee", "note_type": "x"}, user=alice)

    [update] = await events(action="update")
    assert update.fields == ["note_type"]


async def test_a_patch_that_changes_nothing_is_no_update_event(api, alice, make_recording):
    recording = await make_recording(owner=alice, title="Knee")

    response = await api.patch(f"/recordings/{recording.id}", {"version": 1, "title": "Knee"}, user=alice)

    assert response.status_code == 200
    assert await events(action="update") == []
    assert (await row(recording.id))["version"] == 1


async def test_a_delete_is_one_event_and_deleting_again_adds_none(api, alice, make_recording):
    recording = await make_recording(owner=alice)

    first = await api.delete(f"/recordings/{recording.id}", user=alice)
    again = await api.delete(f"/recordings/{recording.id}", user=alice)

    [delete] = await events(action="delete")
    assert (first.status_code, again.status_code) == (204, 204)
    assert await actions(recording.id) == ["create", "delete"]
    assert (delete.user_id, delete.username, delete.recording_id) == (alice.pk, "alice", recording.id)
    assert (delete.fields, delete.client_ip, delete.outcome) == ([], CLIENT_IP, "success")


# Reads through the API


async def test_getting_a_recording_is_one_read_event(api, alice, make_recording):
    recording = await make_recording(owner=alice)

    response = await api.get(f"/recordings/{recording.id}", user=alice)

    [read] = await events(action="read")
    assert response.status_code == 200
    assert (read.user_id, read.username, read.recording_id) == (alice.pk, "alice", recording.id)
    assert (read.fields, read.status_from, read.status_to) == ([], "", "")
    assert (read.client_ip, read.outcome) == (CLIENT_IP, "success")


async def test_a_list_is_one_read_event_per_recording_returned(api, alice, make_recording):
    for number in range(3):
        await make_recording(owner=alice, patient_ref=f"PAT-{number}")

    response = await api.get("/recordings?limit=2", user=alice)

    returned = [uuid.UUID(item["id"]) for item in response.json()["items"]]
    reads = await events(action="read")
    assert len(returned) == 2
    assert sorted(event.recording_id for event in reads) == sorted(returned)
    assert {(event.user_id, event.client_ip) for event in reads} == {(alice.pk, CLIENT_IP)}


async def test_a_list_that_returns_nothing_is_no_read_event(api, alice, make_recording):
    await make_recording(owner=alice, patient_ref="PAT-1")

    response = await api.get("/recordings?patient_ref=PAT-NONE", user=alice)

    assert response.json()["items"] == []
    assert await events(action="read") == []


async def test_the_sync_feed_is_one_read_event_per_live_recording_returned(api, alice, make_recording):
    kept = [await make_recording(owner=alice, patient_ref=f"PAT-{number}") for number in range(2)]
    gone = await make_recording(owner=alice, patient_ref="PAT-GONE")
    await api.delete(f"/recordings/{gone.id}", user=alice)

    response = await api.get("/sync/changes?since=0", user=alice)

    reads = await events(action="read")
    assert len(response.json()["changes"]) == 3
    assert sorted(event.recording_id for event in reads) == sorted(recording.id for recording in kept)


async def test_a_retried_create_answering_the_stored_recording_is_a_read(api, alice):
    body = {"id": str(uuid.uuid4()), "patient_ref": "PAT-1"}
    await api.post("/recordings", body, user=alice)

    retried = await api.post("/recordings", body, user=alice)

    assert retried.status_code == 200
    assert await actions(uuid.UUID(body["id"])) == ["create", "read"]


async def test_an_idempotent_replay_that_answers_a_recording_is_a_read(api, alice, make_recording):
    recording = await make_recording(owner=alice)
    headers = {"Idempotency-Key": "patch-1"}
    await api.patch(f"/recordings/{recording.id}", {"version": 1, "title": "Knee"}, user=alice, headers=headers)

    replayed = await api.patch(
        f"/recordings/{recording.id}", {"version": 1, "title": "Knee"}, user=alice, headers=headers
    )

    assert replayed.headers.get("idempotent-replayed") == "true"
    assert replayed.json()["id"] == str(recording.id)
    assert await actions(recording.id) == ["create", "update", "read"]


async def test_reads_are_not_audited_when_the_setting_is_off(api, alice, make_recording, settings):
    settings.CLINICAL_AUDIT_READS = False
    recording = await make_recording(owner=alice)

    answers = [
        await api.get(f"/recordings/{recording.id}", user=alice),
        await api.get("/recordings", user=alice),
        await api.get("/sync/changes?since=0", user=alice),
        await api.patch(f"/recordings/{recording.id}", {"version": 1, "title": "Knee"}, user=alice),
    ]

    assert [response.status_code for response in answers] == [200, 200, 200, 200]
    assert await actions(recording.id) == ["create", "update"]


# Logins and revocations


async def test_a_login_is_audited(api, alice):
    response = await api.post("/auth/token", {"username": "alice", "password": PASSWORD})

    [login] = await events()
    assert response.status_code == 201
    assert (login.action, login.user_id, login.username, login.recording_id) == ("login", alice.pk, "alice", None)
    assert (login.client_ip, login.outcome) == (CLIENT_IP, "success")


@pytest.mark.parametrize("username", ["alice", "nobody"])
async def test_a_failed_login_is_audited_as_failed(api, alice, username):
    response = await api.post("/auth/token", {"username": username, "password": "wrong"})

    [failure] = await events()
    assert response.status_code == 401
    assert (failure.action, failure.outcome, failure.username) == ("login_failed", "failed", username)
    assert (failure.user_id, failure.recording_id, failure.client_ip) == (None, None, CLIENT_IP)


async def test_a_failed_login_keeps_no_password(api, alice):
    await api.post("/auth/token", {"username": "alice", "password": "hunter2-not-it"})

    values = await AuditEvent.objects.values_list(*EVENT_COLUMNS).aget()

    assert all("hunter2" not in str(value) for value in values)


async def test_a_token_revocation_is_audited(api, alice):
    token = await api.token_for(alice)

    response = await api.delete("/auth/token", token=token)

    [revoked] = await events(action="token_revoked")
    assert response.status_code == 204
    assert (revoked.user_id, revoked.username, revoked.client_ip, revoked.outcome) == (
        alice.pk,
        "alice",
        CLIENT_IP,
        "success",
    )


async def test_the_username_outlives_the_user(api, make_user):
    carol = await sync_to_async(make_user)("carol")
    carol_id = carol.pk
    await api.post("/auth/token", {"username": "carol", "password": PASSWORD})

    await sync_to_async(carol.delete)()

    [login] = await events(action="login")
    assert not await get_user_model().objects.filter(pk=carol_id).aexists()
    assert (login.username, login.user_id) == ("carol", carol_id)


# No clinical text


async def test_no_patient_text_or_transcript_reaches_the_audit_trail(api, alice):
    secrets = ["PAT-SECRET-4711", "Sore left knee", "patient reports chest pain", "dose-checked", "/audio/x.m4a"]
    created = await api.post(
        "/recordings",
        {
            "patient_ref": secrets[0],
            "title": secrets[1],
            "transcript": secrets[2],
            "verification_results": {"check": secrets[3]},
            "audio_path": secrets[4],
        },
        user=alice,
    )
    path = f"/recordings/{created.json()['id']}"
    await api.patch(
        path, {"version": 1, "transcript": "new words about the patient", "patient_ref": "PAT-OTHER-99"}, user=alice
    )
    await api.get(path, user=alice)
    await api.get("/recordings", user=alice)
    await api.delete(path, user=alice)

    stored = await sync_to_async(audit_table_text)()

    assert await actions(uuid.UUID(created.json()["id"])) == ["create", "update", "read", "read", "delete"]
    assert [secret for secret in [*secrets, "new words", "PAT-OTHER-99"] if secret in stored] == []


def audit_table_text() -> str:
    """Every value of every stored event, as the database holds it."""
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT * FROM {AuditEvent._meta.db_table}")
        return " ".join(str(value) for stored_row in cursor.fetchall() for value in stored_row)


# A refused write leaves nothing behind


async def test_a_stale_version_leaves_no_event_and_no_change(api, alice, make_recording):
    recording = await make_recording(owner=alice)
    await api.patch(f"/recordings/{recording.id}", {"version": 1, "title": "first"}, user=alice)
    before = await row(recording.id)

    response = await api.patch(f"/recordings/{recording.id}", {"version": 1, "title": "second"}, user=alice)

    assert response.status_code == 409
    assert await row(recording.id) == before
    assert await actions(recording.id) == ["create", "update"]


async def test_a_refused_transition_leaves_no_event_and_no_change(api, alice, make_recording):
    recording = await make_recording(owner=alice)
    before = await row(recording.id)

    response = await api.patch(
        f"/recordings/{recording.id}", {"version": 1, "status": "verified", "title": "x"}, user=alice
    )

    assert response.status_code == 409
    assert await row(recording.id) == before
    assert await actions(recording.id) == ["create"]


async def test_an_invalid_patch_leaves_no_event_and_no_change(api, alice, make_recording):
    recording = await make_recording(owner=alice)
    before = await row(recording.id)

    response = await api.patch(f"/recordings/{recording.id}", {"version": 1, "title": "x" * 201}, user=alice)

    assert response.status_code == 422
    assert await row(recording.id) == before
    assert await actions(recording.id) == ["create"]


async def test_an_invalid_create_leaves_no_event_and_no_recording(api, alice):
    response = await api.post("/recordings", {"patient_ref": "   ", "title": "x"}, user=alice)

    assert response.status_code == 422
    assert await Recording.objects.acount() == 0
    assert await events(action="create") == []


async def test_a_refused_create_of_someone_elses_id_leaves_no_event(api, alice, bob, make_recording):
    recording = await make_recording(owner=alice)

    response = await api.post("/recordings", {"id": str(recording.id), "patient_ref": "PAT-B"}, user=bob)

    assert response.status_code == 409
    assert await actions(recording.id) == ["create"]


@pytest.fixture
def refuse_audit_inserts():
    """From the call on, the database takes no new audit event; until the test ends."""
    name = "test_refuse_audit_insert"

    table = AuditEvent._meta.db_table
    if connection.vendor == "sqlite":
        create = [f"CREATE TRIGGER {name} BEFORE INSERT ON {table} BEGIN SELECT RAISE(ABORT, 'refused'); END"]
        drop = [f"DROP TRIGGER IF EXISTS {name}"]
    else:
        create = [
            f"CREATE OR REPLACE FUNCTION {name}() RETURNS trigger AS $$ BEGIN RAISE EXCEPTION 'refused'; END $$ "
            "LANGUAGE plpgsql",
            f"CREATE TRIGGER {name} BEFORE INSERT ON {table} FOR EACH ROW EXECUTE FUNCTION {name}()",
        ]
        drop = [f"DROP TRIGGER IF EXISTS {name} ON {table}", f"DROP FUNCTION IF EXISTS {name}()"]

    def run(statements):
        with connection.cursor() as cursor:
            for statement in statements:
                cursor.execute(statement)

    yield sync_to_async(lambda: run(create))
    run(drop)


async def test_a_write_whose_audit_event_fails_is_undone(api, alice, make_recording, refuse_audit_inserts):
    recording = await make_recording(owner=alice)
    before = await row(recording.id)
    sequence = await ChangeSequence.objects.values().aget()
    await api.token_for(alice)
    await refuse_audit_inserts()

    response = await api.patch(f"/recordings/{recording.id}", {"version": 1, "title": "changed"}, user=alice)

    assert response.status_code >= 500
    assert await row(recording.id) == before
    assert await ChangeSequence.objects.values().aget() == sequence


async def test_a_create_whose_audit_event_fails_is_undone(api, alice, refuse_audit_inserts):
    await api.token_for(alice)
    await refuse_audit_inserts()

    response = await api.post("/recordings", {"patient_ref": "PAT-1"}, user=alice)

    assert response.status_code >= 500
    assert await Recording.objects.acount() == 0
    assert not await ChangeSequence.objects.filter(value__gt=0).aexists()


# Append-only


@pytest.fixture
def event(alice):
    with transaction.atomic():
        audit_record(actor=alice, action=AuditEvent.Action.LOGIN, ip="10.0.0.1")
    return AuditEvent.objects.get()


def stored(event) -> dict:
    return AuditEvent.objects.filter(pk=event.pk).values().get()


def change_through_queryset_update(event):
    AuditEvent.objects.filter(pk=event.pk).update(username="mallory")


def change_through_bulk_update(event):
    event.outcome = "failed"
    AuditEvent.objects.bulk_update([event], ["outcome"])


def change_through_save(event):
    event.username = "mallory"
    event.save()


def delete_through_queryset(event):
    AuditEvent.objects.filter(pk=event.pk).delete()


def delete_everything_through_queryset(event):
    AuditEvent.objects.all().delete()


def delete_through_instance(event):
    event.delete()


def update_through_sql(event):
    with connection.cursor() as cursor:
        cursor.execute(f"UPDATE {AuditEvent._meta.db_table} SET username = 'mallory'")


def delete_through_sql(event):
    with connection.cursor() as cursor:
        cursor.execute(f"DELETE FROM {AuditEvent._meta.db_table} WHERE id = %s", [event.pk])


@pytest.mark.parametrize(
    "tamper",
    [
        change_through_queryset_update,
        change_through_bulk_update,
        change_through_save,
        delete_through_queryset,
        delete_everything_through_queryset,
        delete_through_instance,
        update_through_sql,
        delete_through_sql,
    ],
)
def test_the_database_refuses_to_change_or_delete_an_event(event, tamper):
    before = stored(event)

    with pytest.raises(DatabaseError, match="append-only"):
        tamper(event)

    assert stored(event) == before
    assert AuditEvent.objects.count() == 1


def test_a_refused_tamper_inside_a_transaction_undoes_the_transaction(event, alice):
    with pytest.raises(DatabaseError, match="append-only"), transaction.atomic():
        audit_record(actor=alice, action=AuditEvent.Action.LOGIN)
        AuditEvent.objects.filter(pk=event.pk).delete()

    assert list(AuditEvent.objects.values_list("pk", flat=True)) == [event.pk]
