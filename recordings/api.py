"""The recordings API: thin async operations over services and selectors."""

from uuid import UUID

import orjson
from django.http import HttpResponse, HttpResponseNotModified
from ninja import Query, Router

from clinical.conditional import IfMatch, IfNoneMatch, etag_documented, if_none_match_passes, tagged
from clinical.idempotency import aidempotent
from clinical.reads import read_as_user
from clinical.requests import client_ip
from clinical.responses import ajson_response, json_response
from recordings.schemas import (
    ChangesOut,
    ChangesQuery,
    RecordingFilters,
    RecordingIn,
    RecordingList,
    RecordingOut,
    RecordingPatch,
    RecordingRefused,
    check_precondition,
    recording_data,
)
from recordings.selectors import changes_since, recording_get, recording_list
from recordings.services import recording_create, recording_delete, recording_update

router = Router(tags=["recordings"])
sync_router = Router(tags=["sync"])


@router.post("", response={200: RecordingOut, 201: RecordingOut}, openapi_extra=etag_documented(200, 201))
async def create_recording(request, data: RecordingIn):
    """Create a recording; with the `id` of one you already created, returns it (200)."""

    def work(user):
        # dict(), not model_dump(): the validated values as they are, without a deep copy.
        recording, created = recording_create(owner=user, ip=client_ip(request), validated=True, **dict(data))
        return (201 if created else 200), recording_data(recording)

    return _tagged(await aidempotent(request, work, replay=recording_get))


@router.get("", response=RecordingList)
async def list_recordings(request, filters: Query[RecordingFilters]):
    """Your recordings, newest first, with how many match the filters in all.

    A page holds fewer than `limit` items when its recordings are large (the
    page budget, at least one item a page): move `offset` on by the items you got.
    """
    page = await read_as_user(request, recording_list.read, **filters.model_dump())
    return await ajson_response(page.build, text=page.text)


@router.get("/{recording_id}", response={200: RecordingOut, 304: None}, openapi_extra=etag_documented(200, 304))
async def get_recording(request, recording_id: UUID, if_none_match: IfNoneMatch = None):
    """One of your recordings; with If-None-Match naming its current ETag, 304 and no body."""
    recording = await read_as_user(request, recording_get.read, recording_id=recording_id)
    # Compared once the read is audited: a 304 tells the client that its copy is current, a read all the same.
    if if_none_match_passes(if_none_match, recording["digest"]):
        return tagged(json_response(recording), recording["digest"])
    return tagged(HttpResponseNotModified(), recording["digest"])


@router.patch(
    "/{recording_id}",
    response={200: RecordingOut, 409: RecordingRefused, 412: RecordingRefused},
    openapi_extra=etag_documented(200, 409, 412),
)
async def update_recording(request, recording_id: UUID, data: RecordingPatch, if_match: IfMatch = None):
    """Change the given fields of the state you last saw: its `version` in the body, its ETag in If-Match, or both."""
    check_precondition(data, if_match)

    def work(user):
        changes = {name: getattr(data, name) for name in data.model_fields_set}
        recording = recording_update(
            owner=user, recording_id=recording_id, if_match=if_match, ip=client_ip(request), validated=True, **changes
        )
        return 200, recording_data(recording)

    return _tagged(await aidempotent(request, work, replay=recording_get))


@router.delete("/{recording_id}", response={204: None, 412: RecordingRefused}, openapi_extra=etag_documented(412))
async def delete_recording(request, recording_id: UUID, if_match: IfMatch = None):
    """Delete a recording, if If-Match (when given) names its current ETag; a tombstone stays for the sync feed."""

    def work(user):
        recording_delete(owner=user, recording_id=recording_id, if_match=if_match, ip=client_ip(request))
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
    page = await read_as_user(request, changes_since.read, **query.model_dump())
    return await ajson_response(page.build, text=page.text)


def _tagged(response: HttpResponse) -> HttpResponse:
    """A write's answer, or its replay, with the ETag of the recording it carries (a 204 carries none)."""
    if not response.content:
        return response
    return tagged(response, orjson.loads(response.content)["digest"])
