"""The page budget: a page of the list or of the feed ends early when its recordings' text would pass it.

settings.CLINICAL_PAGE_BUDGET is in bytes of JSON (ASCII text here: one a character); the tests shrink it so
that a few hundred thousand characters are "large". A page always holds at
least one recording, however large.
"""

import json
import threading
import uuid

import orjson
import pytest
from asgiref.sync import sync_to_async

from clinical import responses
from clinical.connections import on_db_thread
from clinical.models import AuditEvent
from recordings.schemas import ChangesOut, RecordingList
from recordings.services import recording_create, recording_delete
from tests.server import Server

pytestmark = pytest.mark.django_db(transaction=True)

BUDGET = 300_000
DEFAULT_BUDGET = 4 * 1024 * 1024
# Over 256 KiB of text: an answer the API builds and renders in a worker thread.
LARGE_ANSWER = 300_000
# The text a recording weighs against the budget, as the API answers it.
TEXT_KEYS = ("patient_ref", "title", "note_type", "status", "audio_path", "transcript", "error")


def text_of(recording: dict) -> int:
    if recording.get("deleted"):
        return 0
    # Stored as Django's JSONField writes it: json.dumps with its default separators.
    return sum(len(recording[key]) for key in TEXT_KEYS) + len(json.dumps(recording["verification_results"]))


def page_text(records: list[dict]) -> int:
    return sum(text_of(record) for record in records)


def ids(records: list[dict]) -> list[str]:
    return [record["id"] for record in records]


@pytest.fixture
def budget(settings):
    settings.CLINICAL_PAGE_BUDGET = BUDGET
    return BUDGET


async def make_large(owner, sizes: list[int], *, prefix: str = "PAT") -> list:
    """Recordings whose transcripts hold these many characters, created in this order."""

    def create():
        return [
            recording_create(owner=owner, patient_ref=f"{prefix}-{n:05}", transcript=chr(ord("a") + n % 26) * size)[0]
            for n, size in enumerate(sizes)
        ]

    return await sync_to_async(create)()


async def walk_feed(api, user, limit: int = 500) -> list[dict]:
    """Every page of the feed from cursor 0, as a client walks it."""
    pages, since = [], 0
    while True:
        response = await api.get(f"/sync/changes?since={since}&limit={limit}", user=user)
        assert response.status_code == 200, response.text
        page = response.json()
        pages.append(page)
        since = page["cursor"]
        if not page["has_more"]:
            return pages


async def walk_list(api, user, limit: int = 200, query: str = "") -> list[dict]:
    """Every page of the list, the offset moved on by the items each page held."""
    pages, offset = [], 0
    while True:
        response = await api.get(f"/recordings?limit={limit}&offset={offset}{query}", user=user)
        assert response.status_code == 200, response.text
        page = response.json()
        pages.append(page)
        offset += len(page["items"])
        if not page["items"] or offset >= page["count"]:
            return pages


def assert_within_budget(pages: list[list[dict]], budget: int) -> None:
    """Each page holds one recording, or no more text than the budget; and ends only where the next would pass it."""
    for page, following in zip(pages, [*pages[1:], []], strict=True):
        assert len(page) == 1 or page_text(page) <= budget
        if following:
            assert page_text(page) + text_of(following[0]) > budget


async def read_events() -> list[str]:
    events = AuditEvent.objects.filter(action=AuditEvent.Action.READ).order_by("id")
    return [str(event.recording_id) async for event in events]


# The feed


async def test_a_feed_walk_over_large_recordings_delivers_every_change_once_in_order(api, alice, budget):
    recordings = await make_large(alice, [100_000, 60_000, 180_000, 120_000, 90_000, 30_000, 250_000, 140_000])

    pages = await walk_feed(api, alice)

    changes = [change for page in pages for change in page["changes"]]
    assert ids(changes) == [str(recording.id) for recording in recordings]
    sequence = [change["change_seq"] for change in changes]
    assert sequence == sorted(set(sequence))
    assert len(pages) > 1
    assert_within_budget([page["changes"] for page in pages], budget)
    assert [page["has_more"] for page in pages] == [True] * (len(pages) - 1) + [False]
    assert [page["cursor"] for page in pages] == [page["changes"][-1]["change_seq"] for page in pages]


async def test_a_recording_larger_than_the_budget_comes_alone_between_smaller_ones(api, alice, settings):
    settings.CLINICAL_PAGE_BUDGET = 100_000
    small, huge, *rest = await make_large(alice, [20_000, 250_000, 20_000, 20_000])

    pages = await walk_feed(api, alice)

    assert [ids(page["changes"]) for page in pages] == [[str(small.id)], [str(huge.id)], [str(r.id) for r in rest]]
    assert pages[1]["changes"][0]["transcript"] == huge.transcript
    assert [page["has_more"] for page in pages] == [True, True, False]


async def test_tombstones_count_little_and_still_come_through(api, alice, settings):
    settings.CLINICAL_PAGE_BUDGET = 150_000
    (first,) = await make_large(alice, [100_000])
    deleted = await make_large(alice, [100_000] * 5, prefix="GONE")
    for recording in deleted:
        await sync_to_async(recording_delete)(owner=alice, recording_id=recording.id)
    (last,) = await make_large(alice, [100_000])

    pages = await walk_feed(api, alice)

    assert [ids(page["changes"]) for page in pages] == [
        [str(first.id), *(str(recording.id) for recording in deleted)],
        [str(last.id)],
    ]
    assert [change["deleted"] for change in pages[0]["changes"]] == [False] + [True] * 5


# The list


async def test_list_pages_are_bounded_and_reach_every_recording_once_by_the_items_got(api, alice, budget):
    recordings = await make_large(alice, [100_000, 60_000, 180_000, 120_000, 90_000, 30_000, 250_000, 140_000])

    pages = await walk_list(api, alice)

    items = [item for page in pages for item in page["items"]]
    assert ids(items) == [str(recording.id) for recording in reversed(recordings)]
    assert len(pages) > 1
    assert {page["count"] for page in pages} == {len(recordings)}
    assert_within_budget([page["items"] for page in pages], budget)


@pytest.mark.parametrize("character", ["\u0001", "\U0001f600", '"'], ids=["control", "emoji", "quote"])
async def test_the_budget_is_bytes_of_json_whatever_the_characters(api, alice, settings, character):
    settings.CLINICAL_PAGE_BUDGET = 200_000

    def create():
        for number in range(12):
            recording_create(owner=alice, patient_ref=f"PAT-{number}", transcript=character * 30_000)

    await sync_to_async(create)()

    feed = await api.get("/sync/changes?since=0&limit=500", user=alice)
    listed = await api.get("/recordings?limit=200", user=alice)

    one_row = len(orjson.dumps(character * 30_000)) + 1_000
    assert feed.json()["has_more"] is True
    assert len(feed.content) <= 200_000 + one_row
    assert len(listed.content) <= 200_000 + one_row
    assert listed.json()["count"] == 12


async def test_count_stays_every_match_when_the_budget_ends_a_page(api, alice, budget):
    matching = await make_large(alice, [200_000] * 3, prefix="MATCH")
    await make_large(alice, [200_000] * 2, prefix="OTHER")

    pages = await walk_list(api, alice, query="&patient_ref=MATCH-00001")
    first = (await api.get("/recordings?limit=200", user=alice)).json()

    assert [ids(page["items"]) for page in pages] == [[str(matching[1].id)]]
    assert pages[0]["count"] == 1
    assert len(first["items"]) == 1
    assert first["count"] == 5


# Auditing


async def test_only_the_changes_delivered_are_audited_as_read(api, alice, budget):
    await make_large(alice, [120_000] * 5)

    page = (await api.get("/sync/changes?since=0&limit=500", user=alice)).json()

    assert len(page["changes"]) == 2
    assert await read_events() == ids(page["changes"])


async def test_only_the_items_delivered_are_audited_as_read(api, alice, budget):
    await make_large(alice, [120_000] * 5)

    page = (await api.get("/recordings?limit=200", user=alice)).json()

    assert len(page["items"]) == 2
    assert page["count"] == 5
    assert await read_events() == ids(page["items"])


# Where the answer is built


async def test_a_large_page_is_rendered_off_the_event_loop_and_a_small_one_on_it(api, alice, monkeypatch):
    threads = []
    render = responses.to_json

    def spying(data):
        threads.append(threading.get_ident())
        return render(data)

    monkeypatch.setattr(responses, "to_json", spying)

    small = await api.get("/sync/changes?since=0", user=alice)
    await make_large(alice, [LARGE_ANSWER])

    large = await api.get("/sync/changes?since=0", user=alice)
    listed = await api.get("/recordings", user=alice)

    loop_thread, db_thread = threading.get_ident(), await on_db_thread(threading.get_ident)
    assert small.status_code == large.status_code == listed.status_code == 200
    assert threads[0] == loop_thread
    assert threads[1] not in {loop_thread, db_thread}
    assert threads[2] not in {loop_thread, db_thread}
    assert ChangesOut.model_validate(large.json())
    assert RecordingList.model_validate(listed.json())
    assert large.headers["Content-Type"] == "application/json"
    assert large.json()["changes"][0]["transcript"] == listed.json()["items"][0]["transcript"]


# A real server, with the default budget


@pytest.fixture
def server(tmp_path, monkeypatch):
    monkeypatch.delenv("CLINICAL_PAGE_BUDGET_BYTES", raising=False)
    server = Server(tmp_path / "server")
    server.prepare("alice")
    server.start()
    yield server
    server.stop()


def large_recording(n: int) -> dict:
    """About 1.9 million characters: a full transcript, a long error and some results, under the 2 MiB body limit."""
    return {
        "id": str(uuid.uuid4()),
        "patient_ref": f"PAT-{n:05}",
        "transcript": "t" * 500_000,
        "error": "e" * 1_300_000,
        "verification_results": {"checks": ["ok" * 50] * 1_000},
    }


def test_a_real_server_keeps_feed_pages_over_large_recordings_within_the_default_budget(server):
    token = server.login("alice")
    with server.client(token) as client:
        created = [client.post("/recordings", json=large_recording(n)) for n in range(5)]
        pages, since = [], 0
        while not pages or pages[-1].json()["has_more"]:
            pages.append(client.get("/sync/changes", params={"since": since, "limit": 500}))
            since = pages[-1].json()["cursor"]

    assert [response.status_code for response in created] == [201] * 5
    assert all(response.status_code == 200 for response in pages)
    changes = [page.json()["changes"] for page in pages]
    assert [len(page) for page in changes] == [2, 2, 1]
    assert ids([change for page in changes for change in page]) == [response.json()["id"] for response in created]
    assert all(page_text(page) <= DEFAULT_BUDGET for page in changes)
    assert all(len(page.content) < DEFAULT_BUDGET + 64 * 1024 for page in pages)
