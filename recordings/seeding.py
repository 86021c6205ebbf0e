"""Realistic fake recordings for demos and load tests: Faker data, never real patients."""

import random
import uuid
from datetime import timedelta

from django.db import connection, transaction
from django.utils import timezone
from faker import Faker

from clinical.audit import Action, audit_many
from recordings.models import Recording, Status
from recordings.services import insert_recordings

NOTE_TYPES = ("general", "consultation", "follow_up", "discharge", "referral", "procedure", "telephone")
# Each status with the path a recording took to reach it: its version is the path's length.
LIFE_CYCLE = {
    Status.PENDING: 1,
    Status.UPLOADED: 2,
    Status.TRANSCRIBING: 3,
    Status.TRANSCRIBED: 4,
    Status.VERIFIED: 5,
    Status.FAILED: 3,
}
STATUS_WEIGHTS = (10, 10, 5, 25, 45, 5)
BATCH = 2_000


def seed_recordings(*, owner, count: int, seed: int | None, progress=None) -> int:
    """Insert `count` fake recordings of `owner` in batches; the same seed gives the same data."""
    # Per clinician, so that two clinicians seeded alike get different ids.
    rng = random.Random(None if seed is None else f"{seed}:{owner.username}")  # noqa: S311 (fake data)
    fake = Faker()
    fake.seed_instance(seed)
    # Faker is slow per call: draw from pools it filled once.
    sentences = [fake.sentence(nb_words=rng.randint(6, 16)) for _ in range(2_000)]
    patients = [f"PAT-{rng.randrange(10**6):06d}" for _ in range(max(count // 20, 1))]
    made = 0
    while made < count:
        size = min(BATCH, count - made)
        _insert_batch([_fake_recording(owner, sentences, rng, patients, made + i) for i in range(size)])
        made += size
        if progress:
            progress(made, count)
    return made


@transaction.atomic
def _insert_batch(recordings: list[Recording]) -> None:
    # One block of change numbers per batch, taken in the transaction that writes it.
    last = _take_change_numbers(len(recordings))
    for offset, recording in enumerate(recordings):
        recording.change_seq = last - len(recordings) + 1 + offset
    insert_recordings(recordings)
    audit_many(
        actor=recordings[0].owner,
        action=Action.CREATE,
        recording_ids=[recording.pk for recording in recordings],
        statuses=[recording.status for recording in recordings],
    )


def _take_change_numbers(count: int) -> int:
    with connection.cursor() as cursor:
        cursor.execute(
            "INSERT INTO clinical_changesequence (id, value) VALUES (1, %s) "
            "ON CONFLICT (id) DO UPDATE SET value = clinical_changesequence.value + %s RETURNING value",
            [count, count],
        )
        return cursor.fetchone()[0]


def _fake_recording(owner, sentences: list[str], rng: random.Random, patients: list[str], index: int) -> Recording:
    status = rng.choices(list(LIFE_CYCLE), weights=STATUS_WEIGHTS)[0]
    note_type = rng.choice(NOTE_TYPES)
    recorded_at = timezone.now() - timedelta(minutes=rng.randrange(60 * 24 * 365))
    created_at = recorded_at + timedelta(minutes=rng.randrange(1, 600))
    has_text = status in (Status.TRANSCRIBED, Status.VERIFIED)
    return Recording(
        id=uuid.UUID(int=rng.getrandbits(128), version=4),
        owner=owner,
        patient_ref=rng.choice(patients),
        title=f"{note_type.replace('_', ' ').title()}: {rng.choice(sentences)[:150].rstrip('.')}",
        note_type=note_type,
        status=status,
        audio_path=f"audio/{recorded_at:%Y/%m}/{index:07d}.webm",
        duration_seconds=round(rng.uniform(15, 1200), 1),
        transcript=" ".join(rng.choices(sentences, k=rng.randint(10, 60))) if has_text else "",
        verification_results=_verification(rng) if status == Status.VERIFIED else {},
        error="Transcription service timed out." if status == Status.FAILED else "",
        recorded_at=recorded_at,
        created_at=created_at,
        updated_at=created_at + timedelta(minutes=rng.randrange(0, 120)),
        version=LIFE_CYCLE[status],
    )


def _verification(rng: random.Random) -> dict:
    checks = ("medication_names", "dosages", "allergies", "patient_identity")
    return {
        "score": round(rng.uniform(0.7, 1.0), 3),
        "checks": [{"name": name, "passed": rng.random() > 0.1} for name in checks],
        "reviewed_by_clinician": True,
    }


@transaction.atomic
def clear_recordings(*, owner) -> int:
    """Delete the owner's recordings outright (demo databases only), audited; how many went."""
    ids = list(Recording.objects.filter(owner=owner).values_list("pk", flat=True))
    Recording.objects.filter(owner=owner).delete()
    audit_many(actor=owner, action=Action.DELETE, recording_ids=ids)
    return len(ids)
