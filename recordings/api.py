"""The recordings API: thin async operations over services and selectors."""

from uuid import UUID

from ninja import Query, Router

from clinical.idempotency import aidempotent
from clinical.requests import client_ip
from clinical.responses import ajson_response, json_response
from clinical.tokens import as_user
from recordings.schemas import (
    ChangesOut,
    ChangesQuery,
    RecordingFilters,
    RecordingIn,
    RecordingList,
    RecordingOut,
    RecordingPatch,
    recording_data,
)
from recordings.selectors import changes_since, recording_get, recording_list
from recordings.services import recording_create, recording_delete, recording_update

router = Router(tags=["recordings"])
sync_router = Router(tags=["sync"])


@router.post("", response={200: RecordingOut, 201: RecordingOut})
async def create_recording(request, data: RecordingIn):
    """Create a recording; with the `id` of one you already created, returns it (200)."""

    def work(user):
        # dict(), not model_dump(): the validated values as they are, without a deep copy.
        recording, created = recording_create(owner=user, ip=client_ip(request), validated=True, **dict(data))
        return (201 if created else 200), recording_data(recording)

    return await aidempotent(request, work, replay=recording_get)


@router.get("", response=RecordingList)
async def list_recordings(request, filters: Query[RecordingFilters]):
    """Your recordings, newest first, with how many match the filters in all.

    A page holds fewer than `limit` items when its recordings are large (the
    page budget, at least one item a page): move `offset` on by the items you got.
    """
    page = await as_user(request, recording_list, ip=client_ip(request), **filters.model_dump())
    return await ajson_response(page.build, text=page.text)


@router.get("/{recording_id}", response=RecordingOut)
async def get_recording(request, recording_id: UUID):
    return json_response(await as_user(request, recording_get, recording_id=recording_id, ip=client_ip(request)))


@router.patch("/{recording_id}", response=RecordingOut)
async def update_recording(request, recording_id: UUID, data: RecordingPatch):
    """Change the given fields; `version` must be the version you last saw."""

    def work(user):
        changes = {name: getattr(data, name) for name in data.model_fields_set}
        recording = recording_update(
            owner=user, recording_id=recording_id, ip=client_ip(request), validated=True, **changes
        )
        return 200, recording_data(recording)

    return await aidempotent(request, work, replay=recording_get)


@router.delete("/{recording_id}", response={204: None})
async def delete_recording(request, recording_id: UUID):
    """Delete a recording; a tombstone stays for the sync feed."""

    def work(user):
        recording_delete(owner=user, recording_id=recording_id, ip=client_ip(request))
        return 204, None

    return await aidempotent(request, work, replay=recording_get)


@sync_router.get("/changes", response=ChangesOut)
async def list_changes(request, query: Query[ChangesQuery]):
    """Your recordings created, changed or deleted after cursor `since`, oldest change first.

    Store `cursor` and ask again from it until `has_more` is false: every change
    is seen, once, at its latest state; deleted recordings come as tombstones.
    A page holds fewer than `limit` changes when its recordings are large (the
    page budget, at least one change a page), and then says `has_more`.
    """
    page = await as_user(request, changes_since, ip=client_ip(request), **query.model_dump())
    return await ajson_response(page.build, text=page.text)
