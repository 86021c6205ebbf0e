"""Reads of recordings, async; a clinician only ever sees their own."""

import uuid

from recordings.models import Recording


def _live_of(owner):
    return Recording.objects.filter(owner=owner, deleted_at__isnull=True)


async def arecording_get(*, owner, recording_id: uuid.UUID) -> Recording:
    """The owner's live recording; Recording.DoesNotExist for anyone else's."""
    return await _live_of(owner).select_related("owner").aget(pk=recording_id)


async def arecording_list(
    *, owner, status: str | None = None, patient_ref: str | None = None, limit: int = 50, offset: int = 0
) -> tuple[list[Recording], int]:
    """A page of the owner's recordings, newest first, and how many match in all."""
    recordings = _live_of(owner)
    if status is not None:
        recordings = recordings.filter(status=status)
    if patient_ref is not None:
        recordings = recordings.filter(patient_ref=patient_ref)
    page = recordings.select_related("owner").order_by("-created_at", "-id")[offset : offset + limit]
    return [recording async for recording in page], await recordings.acount()
