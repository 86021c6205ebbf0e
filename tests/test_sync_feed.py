"""The sync feed, GET /api/sync/changes, and the change sequence behind its cursor."""

import threading

import pytest
from asgiref.sync import sync_to_async
from django.db import connection
from django.test import Client

from clinical import sql
from clinical.changes import next_change_seq
from clinical.models import ChangeSequence
from clinical.tokens import token_issue
from recordings.models import Recording
from recordings.services import recording_create

pytestmark = pytest.mark.django_db(transaction=True)

MAX_CURSOR = 2**63 - 1
WRITERS = 4
WRITES_EACH = 15
JSON = "application/json"
FEED_SQL = (
    f"SELECT change_seq FROM {Recording._meta.db_table} "
    "WHERE owner_id = %s AND change_seq > %s ORDER BY change_seq LIMIT 5"
)
# What a tombstone may carry: no patient, title, transcript or any other clinical content.
TOMBSTONE_KEYS = {"id", "deleted", "owner", "version", "change_seq", "updated_at", "deleted_at", "digest"}
CLINICAL_KEYS = {"patient_ref", "title", "note_type", "transcript", "verification_results", "audio_path", "error"}


async def feed(api, user, since: int = 0, limit: int | None = None) -> dict:
    query = f"since={since}" if limit is None else f"since={since}&limit={limit}"
    response = await api.get(f"/sync/changes?{query}", user=user)
    assert response.status_code == 200, response.text
    return response.json()


async def walk(api, user, since: int = 0, limit: int = 100) -> tuple[list[dict], list[dict]]:
    """Every change after `since`, page by page as a client would: (changes, pages)."""
    changes, pages = [], []
    while True:
        page = await feed(api, user, since, limit)
        pages.append(page)
        changes += page["changes"]
        since = page["cursor"]
        if not page["has_more"]:
            return changes, pages


def walk_with(client: Client) -> list[dict]:
    """The whole feed through a sync test client, page by page."""
    changes, since, more = [], 0, True
    while more:
        page = client.get(f"/api/sync/changes?since={since}&limit=7").json()
        changes += page["changes"]
        since, more = page["cursor"], page["has_more"]
    return changes


async def make_many(owner, count: int) -> list[Recording]:
    def create():
        return [recording_create(owner=owner, patient_ref=f"PAT-{i:05}")[0] for i in range(count)]

    return await sync_to_async(create)()


async def sequence_value() -> int:
    sequence = await ChangeSequence.objects.filter(pk=1).afirst()
    return sequence.value if sequence is not None else 0


async def patch(api, user, recording_id, version: int, **changes):
    response = await api.patch(f"/recordings/{recording_id}", {"version": version, **changes}, user=user)
    assert response.status_code == 200, response.text
    return response.json()


def ids(changes: list[dict]) -> list[str]:
    return [change["id"] for change in changes]


# Order and latest state


async def test_an_empty_feed_answers_no_changes_and_keeps_the_cursor(api, alice):
    page = await feed(api, alice, since=0)

    assert page == {"changes": [], "cursor": 0, "has_more": False}


async def test_changes_come_oldest_change_first(api, alice, make_recording):
    first = await make_recording(owner=alice, title="first")
    second = await make_recording(owner=alice, title="second")
    third = await make_recording(owner=alice, title="third")
    await patch(api, alice, first.id, 1, title="first, changed")

    page = await feed(api, alice)

    assert ids(page["changes"]) == [str(second.id), str(third.id), str(first.id)]
    sequence = [change["change_seq"] for change in page["changes"]]
    assert sequence == sorted(sequence)
    assert len(set(sequence)) == len(sequence)


async def test_each_recording_appears_once_at_its_latest_state(api, alice, make_recording):
    recording = await make_recording(owner=alice)
    await patch(api, alice, recording.id, 1, title="v2")
    await patch(api, alice, recording.id, 2, title="v3", status="uploaded")
    latest = await patch(api, alice, recording.id, 3, title="v4")

    page = await feed(api, alice)

    assert ids(page["changes"]) == [str(recording.id)]
    change = page["changes"][0]
    assert change["deleted"] is False
    assert change["version"] == 4
    assert {key: change[key] for key in latest} == latest


async def test_a_live_change_is_the_recording_as_get_answers_it(api, alice, make_recording):
    recording = await make_recording(owner=alice, transcript="Patient well.", verification_results={"ok": True})
    await patch(api, alice, recording.id, 1, status="uploaded")
    got = (await api.get(f"/recordings/{recording.id}", user=alice)).json()

    change = (await feed(api, alice))["changes"][0]

    assert {key: value for key, value in change.items() if key not in {"deleted", "change_seq"}} == got


async def test_the_cursor_is_the_number_of_the_last_change_returned(api, alice, make_recording):
    await make_recording(owner=alice)
    last = await make_recording(owner=alice)

    page = await feed(api, alice)

    assert page["cursor"] == page["changes"][-1]["change_seq"]
    assert page["cursor"] == (await Recording.objects.aget(pk=last.id)).change_seq


async def test_asking_again_from_the_cursor_gives_only_what_changed_since(api, alice, make_recording):
    first = await make_recording(owner=alice)
    await make_recording(owner=alice)
    cursor = (await feed(api, alice))["cursor"]
    changed = await patch(api, alice, first.id, 1, title="after the pull")

    page = await feed(api, alice, since=cursor)

    assert ids(page["changes"]) == [str(first.id)]
    assert page["changes"][0]["version"] == changed["version"]
    assert page["cursor"] > cursor


async def test_asking_from_the_last_cursor_when_nothing_changed_is_empty(api, alice, make_recording):
    await make_recording(owner=alice)
    cursor = (await feed(api, alice))["cursor"]

    page = await feed(api, alice, since=cursor)

    assert page == {"changes": [], "cursor": cursor, "has_more": False}


@pytest.mark.parametrize("beyond", [1, 1000, MAX_CURSOR])
async def test_since_past_the_end_is_empty_and_keeps_the_cursor(api, alice, make_recording, beyond):
    await make_recording(owner=alice)
    since = min(await sequence_value() + beyond, MAX_CURSOR)

    page = await feed(api, alice, since=since)

    assert page == {"changes": [], "cursor": since, "has_more": False}


# Paging


async def test_paging_with_a_limit_walks_every_change_exactly_once(api, alice):
    recordings = await make_many(alice, 7)

    changes, pages = await walk(api, alice, limit=3)

    assert [len(page["changes"]) for page in pages] == [3, 3, 1]
    assert [page["has_more"] for page in pages] == [True, True, False]
    assert ids(changes) == [str(recording.id) for recording in recordings]
    assert [page["cursor"] for page in pages] == [page["changes"][-1]["change_seq"] for page in pages]


async def test_a_page_that_ends_exactly_at_the_last_change_has_no_more(api, alice):
    await make_many(alice, 3)

    page = await feed(api, alice, limit=3)

    assert len(page["changes"]) == 3
    assert page["has_more"] is False


async def test_a_change_made_during_a_walk_is_seen_once_at_its_new_place(api, alice):
    recordings = await make_many(alice, 4)
    first_page = await feed(api, alice, limit=2)
    await patch(api, alice, recordings[0].id, 1, title="changed between pages")

    rest, _ = await walk(api, alice, since=first_page["cursor"], limit=2)

    assert ids(first_page["changes"]) == [str(recordings[0].id), str(recordings[1].id)]
    assert ids(rest) == [str(recordings[2].id), str(recordings[3].id), str(recordings[0].id)]
    assert rest[-1]["version"] == 2


async def test_limit_defaults_to_100(api, alice):
    await make_many(alice, 101)

    page = await feed(api, alice)

    assert len(page["changes"]) == 100
    assert page["has_more"] is True


@pytest.mark.parametrize("limit", [1, 500])
async def test_limit_accepts_its_bounds(api, alice, limit):
    await make_many(alice, 2)

    page = await feed(api, alice, limit=limit)

    assert len(page["changes"]) == min(limit, 2)
    assert page["has_more"] is (limit < 2)


@pytest.mark.parametrize(
    "query",
    [
        "limit=0",
        "limit=501",
        "limit=-1",
        "limit=abc",
        "limit=1.5",
        "since=-1",
        f"since={MAX_CURSOR + 1}",
        f"since={10**30}",
        "since=abc",
        "since=1.5",
    ],
)
async def test_limit_or_since_out_of_range_is_a_422(api, alice, query):
    response = await api.get(f"/sync/changes?{query}", user=alice)

    assert response.status_code == 422
    assert "detail" in response.json()


# Tombstones


async def test_a_deleted_recording_comes_as_a_tombstone_without_clinical_content(api, alice, make_recording):
    recording = await make_recording(owner=alice, transcript="Sensitive.", audio_path="a/b.webm")

    deleted = await api.delete(f"/recordings/{recording.id}", user=alice)
    page = await feed(api, alice)

    assert deleted.status_code == 204
    tombstone = page["changes"][0]
    assert set(tombstone) == TOMBSTONE_KEYS
    assert not CLINICAL_KEYS & set(tombstone)
    assert tombstone["id"] == str(recording.id)
    assert tombstone["deleted"] is True
    assert tombstone["version"] == 2
    assert tombstone["owner"] == "alice"
    assert tombstone["deleted_at"] is not None


async def test_a_recording_created_and_deleted_between_pulls_comes_only_as_a_tombstone(api, alice, make_recording):
    cursor = (await feed(api, alice))["cursor"]
    recording = await make_recording(owner=alice)
    await patch(api, alice, recording.id, 1, title="briefly")
    await api.delete(f"/recordings/{recording.id}", user=alice)

    page = await feed(api, alice, since=cursor)

    assert [(change["id"], change["deleted"], change["version"]) for change in page["changes"]] == [
        (str(recording.id), True, 3)
    ]


async def test_a_tombstone_moves_the_recording_to_the_end_of_the_feed(api, alice, make_recording):
    first = await make_recording(owner=alice)
    second = await make_recording(owner=alice)

    await api.delete(f"/recordings/{first.id}", user=alice)
    page = await feed(api, alice)

    assert ids(page["changes"]) == [str(second.id), str(first.id)]
    assert page["changes"][-1]["deleted"] is True


async def test_deleting_again_is_not_a_new_change(api, alice, make_recording):
    recording = await make_recording(owner=alice)
    await api.delete(f"/recordings/{recording.id}", user=alice)
    cursor = (await feed(api, alice))["cursor"]

    again = await api.delete(f"/recordings/{recording.id}", user=alice)
    page = await feed(api, alice, since=cursor)

    assert again.status_code == 204
    assert page["changes"] == []


# Isolation between clinicians


async def test_another_clinicians_changes_never_appear(api, alice, bob, make_recording):
    alices = [await make_recording(owner=alice, patient_ref="PAT-A1")]
    bobs = [await make_recording(owner=bob, patient_ref="PAT-B1")]
    alices.append(await make_recording(owner=alice, patient_ref="PAT-A2"))
    bobs.append(await make_recording(owner=bob, patient_ref="PAT-B2"))
    await patch(api, bob, bobs[0].id, 1, title="bob's change")
    await api.delete(f"/recordings/{bobs[1].id}", user=bob)

    alice_changes, _ = await walk(api, alice, limit=1)
    bob_changes, _ = await walk(api, bob, limit=1)

    assert ids(alice_changes) == [str(recording.id) for recording in alices]
    assert {change["owner"] for change in alice_changes} == {"alice"}
    assert sorted(ids(bob_changes)) == sorted(str(recording.id) for recording in bobs)
    assert {change["owner"] for change in bob_changes} == {"bob"}


async def test_a_cursor_past_another_clinicians_changes_still_sees_ones_own(api, alice, bob, make_recording):
    await make_recording(owner=alice)
    cursor = (await feed(api, alice))["cursor"]
    for _ in range(3):
        await make_recording(owner=bob)
    mine = await make_recording(owner=alice)

    page = await feed(api, alice, since=cursor, limit=1)

    assert ids(page["changes"]) == [str(mine.id)]
    assert page["has_more"] is False


async def test_the_feed_needs_a_token(api):
    response = await api.get("/sync/changes?since=0")

    assert response.status_code == 401


# The change sequence


async def test_every_create_change_and_delete_takes_the_next_number(api, alice):
    before = await sequence_value()

    created = await api.post("/recordings", {"patient_ref": "PAT-1"}, user=alice)
    after_create = (await feed(api, alice, since=before))["cursor"]
    await patch(api, alice, created.json()["id"], 1, title="changed")
    after_change = (await feed(api, alice, since=before))["cursor"]
    await api.delete(f"/recordings/{created.json()['id']}", user=alice)
    after_delete = (await feed(api, alice, since=before))["cursor"]

    assert [after_create, after_change, after_delete] == [before + 1, before + 2, before + 3]
    assert await sequence_value() == before + 3


async def test_the_sequence_is_shared_by_every_clinician(api, alice, bob, make_recording):
    first = await make_recording(owner=alice)
    second = await make_recording(owner=bob)
    third = await make_recording(owner=alice)

    numbers = [(await Recording.objects.aget(pk=r.id)).change_seq for r in (first, second, third)]

    assert numbers == [numbers[0], numbers[0] + 1, numbers[0] + 2]


async def test_a_refused_write_takes_no_number(api, alice, bob, make_recording):
    recording = await make_recording(owner=alice)
    before = await sequence_value()

    stale = await api.patch(f"/recordings/{recording.id}", {"version": 7, "title": "x"}, user=alice)
    taken = await api.post("/recordings", {"id": str(recording.id), "patient_ref": "PAT-2"}, user=bob)
    invalid = await api.post("/recordings", {"patient_ref": ""}, user=alice)
    unchanged = await api.patch(f"/recordings/{recording.id}", {"version": 1, "title": recording.title}, user=alice)

    assert [stale.status_code, taken.status_code, invalid.status_code, unchanged.status_code] == [409, 409, 422, 200]
    assert await sequence_value() == before
    assert (await feed(api, alice, since=before))["changes"] == []


def test_a_number_is_only_taken_inside_a_write_transaction(transactional_db):
    with pytest.raises(RuntimeError):
        next_change_seq()

    assert not ChangeSequence.objects.filter(value__gt=0).exists()


def test_numbers_are_taken_in_commit_order_by_writers_on_separate_connections(alice):
    # Each writer thread has a database connection of its own, as several server
    # processes would (on PostgreSQL, several app servers). The reader polls with
    # the feed's condition on the driver's connection of a thread of its own: a
    # request through the Python stack polls too slowly to catch a number
    # committed behind a cursor that has already moved past it.
    auth = {"HTTP_AUTHORIZATION": f"Bearer {token_issue(user=alice)[0]}"}
    writing = threading.Event()
    writing.set()
    errors, seen, cursor = [], set(), [0]

    def write(number: int) -> None:
        client = Client(**auth)
        try:
            for index in range(WRITES_EACH):
                created = client.post("/api/recordings", {"patient_ref": f"PAT-{number}-{index}"}, JSON)
                if index % 3 == 0:
                    client.patch(f"/api/recordings/{created.json()['id']}", {"version": 1, "title": "changed"}, JSON)
        except Exception as error:  # reported by the assertion below
            errors.append(error)
        finally:
            connection.close()

    def read() -> None:
        try:
            db = sql.db()  # this thread's own connection, in autocommit: each poll sees what has committed
            while writing.is_set():
                rows = sql.execute(db, FEED_SQL, (alice.pk, cursor[0])).fetchall()
                seen.update(number for (number,) in rows)
                cursor[0] = rows[-1][0] if rows else cursor[0]
        finally:
            connection.close()

    writers = [threading.Thread(target=write, args=(number,)) for number in range(WRITERS)]
    reader = threading.Thread(target=read)
    for thread in [reader, *writers]:
        thread.start()
    for thread in writers:
        thread.join()
    writing.clear()
    reader.join()

    walked = walk_with(Client(**auth))

    assert errors == []
    stored = {str(row["id"]): row["change_seq"] for row in Recording.objects.values("id", "change_seq")}
    assert len(stored) == WRITERS * WRITES_EACH
    assert sorted(set(stored.values()) - seen) == sorted(number for number in stored.values() if number > cursor[0])
    assert {change["id"]: change["change_seq"] for change in walked} == stored
    assert len(walked) == len(stored)
    assert ChangeSequence.objects.get().value == WRITERS * (WRITES_EACH + len(range(0, WRITES_EACH, 3)))
