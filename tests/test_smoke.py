import pytest

pytestmark = pytest.mark.django_db(transaction=True)


async def test_create_then_get(api, alice):
    created = await api.post("/recordings", {"patient_ref": "PAT-1"}, user=alice)

    fetched = await api.get(f"/recordings/{created.json()['id']}", user=alice)

    assert created.status_code == 201
    assert fetched.json()["patient_ref"] == "PAT-1"


async def test_stale_version_is_a_conflict(api, alice, make_recording):
    recording = await make_recording(owner=alice)

    response = await api.patch(f"/recordings/{recording.id}", {"version": 0, "title": "x"}, user=alice)

    assert response.status_code == 409
    assert response.json()["version"] == recording.version


async def test_feed_walks_changes_once(api, alice, bob, make_recording):
    first = await make_recording(owner=alice)
    second = await make_recording(owner=alice)
    await make_recording(owner=bob)
    await api.delete(f"/recordings/{first.id}", user=alice)

    page = (await api.get("/sync/changes?since=0&limit=1", user=alice)).json()
    rest = (await api.get(f"/sync/changes?since={page['cursor']}", user=alice)).json()

    assert page["has_more"] is True
    assert [change["id"] for change in page["changes"] + rest["changes"]] == [str(second.id), str(first.id)]
    assert rest["changes"][-1]["deleted"] is True
    assert "patient_ref" not in rest["changes"][-1]
    assert rest["has_more"] is False
