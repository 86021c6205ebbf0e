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
