"""recordings.services called directly: each write one transaction that takes one change number."""

import uuid

import pytest
from django.core.exceptions import ValidationError
from django.db import transaction

from clinical.changes import next_change_seq
from clinical.models import ChangeSequence
from recordings.models import Recording
from recordings.services import (
    ID_DELETED,
    ID_TAKEN,
    STALE_VERSION,
    RecordingConflict,
    recording_create,
    recording_delete,
    recording_update,
    transition_refused,
)

pytestmark = pytest.mark.django_db(transaction=True)


def sequence_value() -> int:
    sequence = ChangeSequence.objects.filter(pk=1).first()
    return sequence.value if sequence is not None else 0


def row(recording_id) -> dict:
    return Recording.objects.filter(pk=recording_id).values().get()


def create(owner, **fields) -> Recording:
    recording, _ = recording_create(owner=owner, **{"patient_ref": "PAT-1", **fields})
    return recording


# next_change_seq


def test_next_change_seq_refuses_to_run_outside_a_transaction():
    with pytest.raises(RuntimeError):
        next_change_seq()

    assert sequence_value() == 0


def test_next_change_seq_counts_up_from_one_inside_transactions():
    with transaction.atomic():
        first = next_change_seq()
    with transaction.atomic():
        second = next_change_seq()
        third = next_change_seq()

    assert [first, second, third] == [1, 2, 3]
    assert sequence_value() == 3


def test_a_rolled_back_transaction_gives_its_change_number_back():
    with pytest.raises(ZeroDivisionError), transaction.atomic():
        next_change_seq()
        1 / 0  # noqa: B018

    with transaction.atomic():
        taken = next_change_seq()

    assert taken == 1


# Create


def test_create_stores_a_recording_at_version_1(alice):
    recording, created = recording_create(owner=alice, patient_ref="PAT-1", title="Knee")

    stored = Recording.objects.get(pk=recording.pk)
    assert created is True
    assert (stored.owner_id, stored.patient_ref, stored.title, stored.version) == (alice.pk, "PAT-1", "Knee", 1)
    assert stored.created_at == stored.updated_at
    assert stored.deleted_at is None
    assert stored.change_seq == sequence_value() == 1


def test_create_keeps_a_client_chosen_id(alice):
    chosen = uuid.uuid4()

    recording, created = recording_create(owner=alice, id=chosen, patient_ref="PAT-1")

    assert created is True
    assert recording.pk == chosen
    assert Recording.objects.filter(pk=chosen).exists()


def test_a_retried_create_returns_the_stored_recording_unchanged(alice):
    original = create(alice, title="First")
    before = row(original.pk)

    again, created = recording_create(owner=alice, id=original.pk, patient_ref="PAT-2", title="Second")

    assert created is False
    assert again.pk == original.pk
    assert again.title == "First"
    assert row(original.pk) == before
    assert sequence_value() == original.change_seq


def test_create_with_another_owners_id_is_a_conflict(alice, bob):
    original = create(alice)
    before = row(original.pk)

    with pytest.raises(RecordingConflict) as conflict:
        recording_create(owner=bob, id=original.pk, patient_ref="PAT-2")

    assert conflict.value.detail == ID_TAKEN
    assert conflict.value.recording is None
    assert row(original.pk) == before
    assert sequence_value() == original.change_seq


def test_create_with_a_deleted_id_is_a_conflict(alice):
    original = create(alice)
    recording_delete(owner=alice, recording_id=original.pk)
    taken = sequence_value()

    with pytest.raises(RecordingConflict) as conflict:
        recording_create(owner=alice, id=original.pk, patient_ref="PAT-1")

    assert conflict.value.detail == ID_DELETED
    assert sequence_value() == taken


@pytest.mark.parametrize("status", ["transcribing", "transcribed", "verified", "failed"])
def test_create_refuses_a_status_that_is_not_initial(alice, status):
    with pytest.raises(RecordingConflict):
        recording_create(owner=alice, patient_ref="PAT-1", status=status)

    assert Recording.objects.count() == 0
    assert sequence_value() == 0


@pytest.mark.parametrize(
    "fields",
    [{"patient_ref": "x" * 65}, {"title": "t" * 201}, {"duration_seconds": -1}, {"transcript": "a" * 500_001}],
    ids=["patient_ref", "title", "duration", "transcript"],
)
def test_a_failing_create_writes_nothing_and_takes_no_change_number(alice, fields):
    with pytest.raises(ValidationError):
        recording_create(owner=alice, **{"patient_ref": "PAT-1", **fields})

    assert Recording.objects.count() == 0
    assert sequence_value() == 0


# Update


def test_update_changes_the_fields_and_bumps_version_and_change_seq(alice):
    recording = create(alice, title="Old")

    updated = recording_update(owner=alice, recording_id=recording.pk, version=1, title="New", status="uploaded")

    stored = Recording.objects.get(pk=recording.pk)
    assert (stored.title, stored.status, stored.version) == ("New", "uploaded", 2)
    assert stored.change_seq == updated.change_seq == recording.change_seq + 1
    assert stored.updated_at > recording.updated_at
    assert stored.created_at == recording.created_at


def test_update_with_a_stale_version_is_a_conflict_carrying_the_current_recording(alice):
    recording = create(alice)
    recording_update(owner=alice, recording_id=recording.pk, version=1, title="Second")
    before = row(recording.pk)

    with pytest.raises(RecordingConflict) as conflict:
        recording_update(owner=alice, recording_id=recording.pk, version=1, title="Lost")

    assert conflict.value.detail == STALE_VERSION
    assert conflict.value.recording.version == 2
    assert conflict.value.recording.title == "Second"
    assert row(recording.pk) == before


@pytest.mark.parametrize(
    ("old", "new"),
    [("pending", "transcribed"), ("pending", "verified"), ("uploaded", "pending"), ("verified", "failed")],
)
def test_update_refuses_a_transition_the_table_does_not_allow(alice, old, new):
    recording = create(alice)
    Recording.objects.filter(pk=recording.pk).update(status=old)
    before = row(recording.pk)

    with pytest.raises(RecordingConflict) as conflict:
        recording_update(owner=alice, recording_id=recording.pk, version=1, status=new, title="x")

    assert conflict.value.detail == transition_refused(old, new)
    assert conflict.value.recording.status == old
    assert row(recording.pk) == before
    assert sequence_value() == recording.change_seq


def test_update_that_changes_nothing_keeps_version_and_change_seq(alice):
    recording = create(alice, title="Same", status="uploaded")
    before = row(recording.pk)

    same = recording_update(owner=alice, recording_id=recording.pk, version=1, title="Same", status="uploaded")

    assert same.version == 1
    assert row(recording.pk) == before
    assert sequence_value() == recording.change_seq


def test_update_stores_a_json_value_of_another_type_that_compares_equal(alice):
    recording = create(alice, verification_results={"ok": True})

    updated = recording_update(owner=alice, recording_id=recording.pk, version=1, verification_results={"ok": 1})

    stored = Recording.objects.get(pk=recording.pk)
    assert updated.version == 2
    assert type(stored.verification_results["ok"]) is int


@pytest.mark.parametrize(
    "changes",
    [{"title": "t" * 201}, {"patient_ref": ""}, {"duration_seconds": -5}, {"transcript": "a" * 500_001}],
    ids=["title", "patient_ref", "duration", "transcript"],
)
def test_a_failing_update_leaves_no_change_and_takes_no_change_number(alice, changes):
    recording = create(alice)
    before = row(recording.pk)

    with pytest.raises(ValidationError):
        recording_update(owner=alice, recording_id=recording.pk, version=1, **changes)
    later = create(alice)

    assert row(recording.pk) == before
    assert later.change_seq == recording.change_seq + 1


def test_update_of_another_owners_recording_does_not_exist(alice, bob):
    recording = create(alice)
    before = row(recording.pk)

    with pytest.raises(Recording.DoesNotExist):
        recording_update(owner=bob, recording_id=recording.pk, version=1, title="Bob's")

    assert row(recording.pk) == before


def test_update_of_a_deleted_recording_does_not_exist(alice):
    recording = create(alice)
    recording_delete(owner=alice, recording_id=recording.pk)
    before = row(recording.pk)

    with pytest.raises(Recording.DoesNotExist):
        recording_update(owner=alice, recording_id=recording.pk, version=2, title="x")

    assert row(recording.pk) == before


# Delete


def test_delete_keeps_a_tombstone_with_a_new_version_and_change_number(alice):
    recording = create(alice)

    deleted = recording_delete(owner=alice, recording_id=recording.pk)

    stored = Recording.objects.get(pk=recording.pk)
    assert stored.deleted_at is not None
    assert stored.version == deleted.version == 2
    assert stored.change_seq == recording.change_seq + 1
    assert stored.updated_at == stored.deleted_at


def test_deleting_twice_changes_nothing_the_second_time(alice):
    recording = create(alice)
    recording_delete(owner=alice, recording_id=recording.pk)
    before = row(recording.pk)
    taken = sequence_value()

    recording_delete(owner=alice, recording_id=recording.pk)

    assert row(recording.pk) == before
    assert sequence_value() == taken


def test_delete_of_another_owners_or_an_unknown_recording_does_not_exist(alice, bob):
    recording = create(alice)
    before = row(recording.pk)

    with pytest.raises(Recording.DoesNotExist):
        recording_delete(owner=bob, recording_id=recording.pk)
    with pytest.raises(Recording.DoesNotExist):
        recording_delete(owner=alice, recording_id=uuid.uuid4())

    assert row(recording.pk) == before
    assert sequence_value() == recording.change_seq


def test_every_write_takes_the_next_change_number(alice, bob):
    first = create(alice)
    second = create(bob)
    updated = recording_update(owner=alice, recording_id=first.pk, version=1, status="uploaded")
    deleted = recording_delete(owner=bob, recording_id=second.pk)

    numbers = [first.change_seq, second.change_seq, updated.change_seq, deleted.change_seq]

    assert numbers == [1, 2, 3, 4]
    assert sequence_value() == 4
