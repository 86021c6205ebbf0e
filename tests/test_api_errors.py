"""Errors under /api/: always JSON with a detail, never a 500, whatever the input."""

import json
import os
import random
import string
import uuid

import orjson
import pytest

from clinical.asgi import application
from clinical.bodies import MALFORMED_JSON, MAX_DEPTH
from recordings.models import RESULTS_TOO_DEEP, RESULTS_TOO_LARGE, Recording
from recordings.schemas import BAD_DATETIME

pytestmark = pytest.mark.django_db(transaction=True)

MiB = 1024 * 1024


def assert_json_error(response, status: int | tuple[int, ...]) -> None:
    statuses = status if isinstance(status, tuple) else (status,)
    assert response.status_code in statuses, (response.status_code, response.text[:500])
    assert response.headers["content-type"].startswith("application/json")
    assert "detail" in response.json()


def error_messages(response) -> str:
    return " ".join(error["msg"] for error in response.json()["detail"])


async def post_raw(api, user, body: bytes, path: str = "/recordings", method: str = "POST", headers=None):
    headers = {"Content-Type": "application/json", **(headers or {})}
    return await api.request(method, path, content=body, user=user, headers=headers)


async def asgi_call(path: str, body_chunks: list[bytes], headers: list[tuple[bytes, bytes]], method: str = "POST"):
    """Talk ASGI to the application directly, for requests httpx will not send."""
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"localhost"), *headers],
        "client": ("127.0.0.1", 1234),
        "server": ("localhost", 80),
    }
    messages = [
        {"type": "http.request", "body": chunk, "more_body": index < len(body_chunks) - 1}
        for index, chunk in enumerate(body_chunks)
    ]
    sent = []

    async def receive():
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    await application(scope, receive, send)
    start = next(message for message in sent if message["type"] == "http.response.start")
    body = b"".join(message.get("body", b"") for message in sent if message["type"] == "http.response.body")
    return start["status"], dict(start["headers"]), body


# Every answer is JSON


async def test_unknown_path_is_a_json_404(api, alice):
    answers = [
        await api.get("/nope", user=alice),
        await api.get("/nope"),
        await api.get(f"/recordings/{uuid.uuid4()}/extra", user=alice),
        await api.post("/recordings/", {"patient_ref": "x"}, user=alice),
    ]

    for response in answers:
        assert_json_error(response, 404)


async def test_wrong_method_is_a_json_405_with_allow(api, alice, make_recording):
    recording = await make_recording(owner=alice)

    answers = {
        "PUT /recordings": await api.request("PUT", "/recordings", {"patient_ref": "x"}, user=alice),
        "DELETE /recordings": await api.delete("/recordings", user=alice),
        "POST /recordings/{id}": await api.post(f"/recordings/{recording.id}", {}, user=alice),
        "POST /health": await api.post("/health", {}),
        "GET /auth/token": await api.get("/auth/token"),
    }

    for response in answers.values():
        assert_json_error(response, 405)
    assert {name: set(response.headers["allow"].replace(" ", "").split(",")) for name, response in answers.items()} == {
        "PUT /recordings": {"GET", "POST"},
        "DELETE /recordings": {"GET", "POST"},
        "POST /recordings/{id}": {"GET", "PATCH", "DELETE"},
        "POST /health": {"GET"},
        "GET /auth/token": {"POST", "DELETE"},
    }
    assert await Recording.objects.acount() == 1


async def test_api_answers_are_never_cached(api, alice, make_recording):
    recording = await make_recording(owner=alice)

    answers = [
        await api.get("/health"),
        await api.get("/recordings", user=alice),
        await api.get(f"/recordings/{recording.id}", user=alice),
        await api.post("/recordings", {"patient_ref": "PAT-2"}, user=alice),
        await api.delete(f"/recordings/{recording.id}", user=alice),
        await api.get("/recordings"),
        await api.get("/nope"),
        await api.request("PUT", "/recordings", user=alice),
        await post_raw(api, alice, b"{"),
        await post_raw(api, alice, b"x" * (2 * MiB + 1)),
    ]

    assert [response.headers.get("cache-control") for response in answers] == ["no-store"] * len(answers)


# Malformed bodies


@pytest.mark.parametrize(
    "body",
    [
        b"{",
        b'{"patient_ref": "x",}',
        b"{'patient_ref': 'x'}",
        b'{"patient_ref": "x"} trailing',
        b"patient_ref=x",
        b'{"patient_ref": "\xff\xfe"}',
        b'\xef\xbb\xbf{"patient_ref": "x"}',
        b'{"patient_ref": "x", "duration_seconds": NaN}',
        b'{"patient_ref": "x", "duration_seconds": Infinity}',
        b'{"patient_ref": "x", "duration_seconds": -Infinity}',
    ],
    ids=[
        "truncated",
        "trailing-comma",
        "single-quotes",
        "trailing-garbage",
        "form-encoded",
        "not-utf8",
        "utf8-bom",
        "nan",
        "infinity",
        "minus-infinity",
    ],
)
async def test_malformed_json_is_a_400(api, alice, body):
    response = await post_raw(api, alice, body)

    assert_json_error(response, 400)
    assert response.json()["detail"].startswith(MALFORMED_JSON)
    assert await Recording.objects.acount() == 0


async def test_a_lone_surrogate_escape_is_refused(api, alice):
    answers = [
        await post_raw(api, alice, b'{"patient_ref": "\\ud800"}'),
        await post_raw(api, alice, b'{"patient_ref": "x", "title": "a\\udfffb"}'),
        await post_raw(api, alice, b'{"patient_ref": "x", "verification_results": {"\\ud800": 1}}'),
    ]

    for response in answers:
        assert_json_error(response, (400, 422))
    assert await Recording.objects.acount() == 0


async def test_deeply_nested_json_is_refused(api, alice):
    depth = 5000
    nested = b"[" * depth + b"]" * depth
    wrapped = b'{"patient_ref": "x", "verification_results": {"a": ' + nested + b"}}"

    answers = [await post_raw(api, alice, nested), await post_raw(api, alice, wrapped)]

    for response in answers:
        assert_json_error(response, (400, 422))
    assert await Recording.objects.acount() == 0


@pytest.mark.parametrize("depth", [33, MAX_DEPTH - 1])
async def test_verification_results_nested_too_deep_is_a_422(api, alice, depth):
    nested = b'{"n":' * (depth - 1) + b"{}" + b"}" * (depth - 1)

    response = await post_raw(api, alice, b'{"patient_ref": "x", "verification_results": ' + nested + b"}")

    assert_json_error(response, 422)
    assert RESULTS_TOO_DEEP in error_messages(response)
    assert await Recording.objects.acount() == 0


@pytest.mark.parametrize("depth", [MAX_DEPTH, 100, 300, 1000, 5000])
async def test_a_body_nested_deeper_than_the_bound_is_a_400(api, alice, depth):
    nested = b'{"n":' * (depth - 1) + b"{}" + b"}" * (depth - 1)

    response = await post_raw(api, alice, b'{"patient_ref": "x", "verification_results": ' + nested + b"}")

    assert_json_error(response, 400)
    assert await Recording.objects.acount() == 0


async def test_verification_results_at_32_levels_are_stored(api, alice):
    nested: list = []
    for _ in range(31):
        nested = [nested]

    response = await api.post("/recordings", {"patient_ref": "x", "verification_results": nested}, user=alice)

    assert response.status_code == 201
    assert response.json()["verification_results"] == nested


async def test_verification_results_over_256_kib_are_a_422(api, alice, make_recording):
    too_big = {"blob": "x" * (256 * 1024)}
    recording = await make_recording(owner=alice)

    created = await api.post("/recordings", {"patient_ref": "x", "verification_results": too_big}, user=alice)
    patched = await api.patch(
        f"/recordings/{recording.id}", {"version": 1, "verification_results": too_big}, user=alice
    )

    for response in (created, patched):
        assert_json_error(response, 422)
        assert RESULTS_TOO_LARGE in error_messages(response)
    assert await Recording.objects.acount() == 1
    assert (await Recording.objects.aget(pk=recording.id)).version == 1


async def test_verification_results_just_under_256_kib_are_stored(api, alice):
    results = {"blob": "x" * (256 * 1024 - len(b'{"blob":""}'))}

    response = await api.post("/recordings", {"patient_ref": "x", "verification_results": results}, user=alice)

    assert response.status_code == 201
    assert response.json()["verification_results"] == results


# Numbers and dates out of range


async def test_huge_numbers_are_a_client_error(api, alice, make_recording):
    recording = await make_recording(owner=alice)
    path = f"/recordings/{recording.id}"
    before = await Recording.objects.filter(pk=recording.id).values().aget()

    answers = {
        "version 10**30": await post_raw(api, alice, b'{"version": 1000000000000000000000000000000}', path, "PATCH"),
        "version -10**30": await post_raw(api, alice, b'{"version": -1000000000000000000000000000000}', path, "PATCH"),
        "version 1e400": await post_raw(api, alice, b'{"version": 1e400}', path, "PATCH"),
        "duration 1e400": await post_raw(api, alice, b'{"patient_ref": "x", "duration_seconds": 1e400}'),
        "duration -1e400": await post_raw(api, alice, b'{"patient_ref": "x", "duration_seconds": -1e400}'),
        "duration 10**30 in patch": await post_raw(
            api, alice, b'{"version": 1, "duration_seconds": -1000000000000000000000000000000}', path, "PATCH"
        ),
        "recorded_at 10**30": await post_raw(
            api, alice, b'{"patient_ref": "x", "recorded_at": 1000000000000000000000000000000}'
        ),
        "limit 10**30": await api.get(f"/recordings?limit={10**30}", user=alice),
        "offset 10**30": await api.get(f"/recordings?offset={10**30}", user=alice),
        "limit -10**30": await api.get(f"/recordings?limit=-{10**30}", user=alice),
    }

    assert {name: 400 <= response.status_code < 500 for name, response in answers.items()} == dict.fromkeys(
        answers, True
    )
    for response in answers.values():
        assert "detail" in response.json()
    assert await Recording.objects.acount() == 1
    assert await Recording.objects.filter(pk=recording.id).values().aget() == before


@pytest.mark.parametrize(
    "query",
    [
        "limit=0",
        "limit=201",
        "limit=-1",
        "limit=abc",
        "limit=1.5",
        "limit=",
        "offset=-1",
        f"offset={10**20}",
        "offset=x",
        "status=bogus",
        "status=PENDING",
        "patient_ref=" + "p" * 65,
    ],
)
async def test_query_parameters_out_of_range_are_a_422(api, alice, query):
    response = await api.get(f"/recordings?{query}", user=alice)

    assert_json_error(response, 422)


async def test_recorded_at_that_cannot_be_converted_to_utc_is_a_422(api, alice, make_recording):
    recording = await make_recording(owner=alice)
    values = ["9999-12-31T23:59:59-05:00", "9999-12-31T23:00:00-23:59", "0001-01-01T00:00:00+01:00"]

    created = [
        await api.post("/recordings", {"patient_ref": "x", "recorded_at": value}, user=alice) for value in values
    ]
    patched = [
        await api.patch(f"/recordings/{recording.id}", {"version": 1, "recorded_at": value}, user=alice)
        for value in values
    ]

    for response in created + patched:
        assert_json_error(response, 422)
        assert BAD_DATETIME in error_messages(response)
    assert await Recording.objects.acount() == 1


async def test_recorded_at_at_the_edges_of_the_calendar_is_stored_in_utc(api, alice):
    values = {
        "9999-12-31T23:59:59+05:00": "9999-12-31T18:59:59+00:00",
        "0001-01-01T00:00:00-01:00": "0001-01-01T01:00:00+00:00",
        "2024-06-01T12:00:00": "2024-06-01T12:00:00+00:00",
    }

    answers = {
        value: await api.post("/recordings", {"patient_ref": "x", "recorded_at": value}, user=alice) for value in values
    }

    assert {value: response.status_code for value, response in answers.items()} == dict.fromkeys(values, 201)
    assert {
        value: response.json()["recorded_at"].replace("Z", "+00:00") for value, response in answers.items()
    } == values


# Body size


async def test_a_body_over_2_mib_with_content_length_is_a_413(api, alice):
    body = orjson.dumps({"patient_ref": "x", "transcript": "a" * (2 * MiB)})

    response = await post_raw(api, alice, body)

    assert_json_error(response, 413)
    assert await Recording.objects.acount() == 0


async def test_a_streamed_body_over_2_mib_is_a_413(api, alice):
    async def chunks():
        yield b'{"patient_ref": "x", "transcript": "'
        for _ in range(3):
            yield b"a" * MiB
        yield b'"}'

    response = await api.post("/recordings", content=chunks(), user=alice, headers={"Content-Type": "application/json"})

    assert_json_error(response, 413)
    assert await Recording.objects.acount() == 0


async def test_a_body_of_exactly_2_mib_is_accepted(api, alice):
    body = orjson.dumps({"patient_ref": "x", "transcript": "\U0001f600" * 500_000})
    body += b" " * (2 * MiB - len(body))

    response = await post_raw(api, alice, body)

    assert len(body) == 2 * MiB
    assert response.status_code == 201
    assert len(response.json()["transcript"]) == 500_000


async def test_a_body_one_byte_over_2_mib_is_a_413(api, alice):
    body = orjson.dumps({"patient_ref": "x"}) + b" " * (2 * MiB)
    body = body[: 2 * MiB + 1]

    response = await post_raw(api, alice, body)

    assert_json_error(response, 413)


async def test_a_streamed_body_that_lies_about_its_length_is_a_413():
    body = [b'{"patient_ref": "x", "transcript": "', b"a" * (2 * MiB), b'"}']

    status, headers, content = await asgi_call(
        "/api/recordings", body, [(b"content-type", b"application/json"), (b"content-length", b"10")]
    )

    assert status == 413
    assert headers[b"content-type"] == b"application/json"
    assert "detail" in json.loads(content)
    assert await Recording.objects.acount() == 0


@pytest.mark.parametrize("length", [b"abc", b"-1", b"+5", b"1e3", b""])
async def test_a_content_length_that_is_not_a_number_is_a_400(length):
    status, headers, content = await asgi_call(
        "/api/recordings", [b"{}"], [(b"content-type", b"application/json"), (b"content-length", length)]
    )

    assert status == 400
    assert "detail" in json.loads(content)
    assert headers[b"cache-control"] == b"no-store"


# Field rules


async def test_transcript_over_500000_characters_is_a_422(api, alice, make_recording):
    recording = await make_recording(owner=alice)

    created = await api.post("/recordings", {"patient_ref": "x", "transcript": "a" * 500_001}, user=alice)
    patched = await api.patch(f"/recordings/{recording.id}", {"version": 1, "transcript": "a" * 500_001}, user=alice)

    assert_json_error(created, 422)
    assert_json_error(patched, 422)
    assert await Recording.objects.acount() == 1
    assert (await Recording.objects.aget(pk=recording.id)).transcript == ""


async def test_transcript_of_500000_characters_is_stored(api, alice):
    response = await api.post("/recordings", {"patient_ref": "x", "transcript": "é" * 500_000}, user=alice)

    assert response.status_code == 201
    assert (await Recording.objects.aget(pk=response.json()["id"])).transcript == "é" * 500_000


async def test_unknown_fields_are_a_422(api, alice, make_recording):
    recording = await make_recording(owner=alice)

    created = await api.post("/recordings", {"patient_ref": "x", "colour": "blue"}, user=alice)
    patched = await api.patch(f"/recordings/{recording.id}", {"version": 1, "colour": "blue"}, user=alice)
    owner = await api.post("/recordings", {"patient_ref": "x", "owner": "bob"}, user=alice)
    version = await api.post("/recordings", {"patient_ref": "x", "version": 7}, user=alice)

    for response in (created, patched, owner, version):
        assert_json_error(response, 422)
    assert await Recording.objects.acount() == 1


async def test_validation_errors_do_not_echo_the_input(api, alice):
    secret = "PATIENT-SECRET-" + "z" * 300

    response = await api.post("/recordings", {"patient_ref": secret, "title": secret}, user=alice)

    assert_json_error(response, 422)
    assert "PATIENT-SECRET" not in response.text


@pytest.mark.parametrize("body", [b"", b"null", b"[]", b'"text"', b"42", b"true", b"{}"])
async def test_bodies_that_are_not_a_recording_are_refused(api, alice, body):
    response = await post_raw(api, alice, body)

    assert_json_error(response, (400, 422))
    assert await Recording.objects.acount() == 0


async def test_a_path_id_that_is_not_a_uuid_is_refused(api, alice):
    answers = [
        await api.get("/recordings/not-a-uuid", user=alice),
        await api.patch("/recordings/not-a-uuid", {"version": 1}, user=alice),
        await api.delete("/recordings/not-a-uuid", user=alice),
        await api.get("/recordings/" + "9" * 5000, user=alice),
    ]

    for response in answers:
        assert_json_error(response, (404, 422))


# Fuzz


def random_string(rng: random.Random) -> str:
    kind = rng.randrange(6)
    if kind == 0:
        return "".join(rng.choice(string.printable) for _ in range(rng.randrange(0, 80)))
    if kind == 1:
        return "".join(chr(rng.randrange(0, 0x250)) for _ in range(rng.randrange(0, 40)))
    if kind == 2:
        return "".join(chr(rng.choice([rng.randrange(0, 0x20), rng.randrange(0x7F, 0xA0)])) for _ in range(5))
    if kind == 3:
        return rng.choice(["pending", "uploaded", "transcribing", "transcribed", "verified", "failed", "", " "])
    if kind == 4:
        return rng.choice(["2024-01-01T00:00:00Z", "9999-12-31T23:59:59-23:59", "0001-01-01T00:00:00+23:59", "1e9"])
    return "x" * rng.choice([1, 64, 65, 200, 201, 500, 501, 5000])


def random_value(rng: random.Random, depth: int = 0):
    kind = rng.randrange(20 if depth < 4 else 16)
    if kind == 0:
        return None
    if kind == 1:
        return rng.choice([True, False])
    if kind in (2, 3, 4):
        return rng.choice([0, -1, 1, 2**31, 2**63 - 1, 2**64 - 1, -(2**63), 10**30, -(10**30)])
    if kind in (5, 6, 7):
        return rng.choice([0.0, -0.0, 1.5, -1e-300, 1e308, -1e308, 5e-324])
    if kind == 8:
        return rng.choice([float("nan"), float("inf"), float("-inf")])
    if kind < 16:
        return random_string(rng)
    if kind < 18:
        return [random_value(rng, depth + 1) for _ in range(rng.randrange(4))]
    return {random_string(rng): random_value(rng, depth + 1) for _ in range(rng.randrange(4))}


FIELDS = [
    "id",
    "patient_ref",
    "title",
    "note_type",
    "status",
    "audio_path",
    "duration_seconds",
    "transcript",
    "verification_results",
    "error",
    "recorded_at",
    "version",
    "owner",
]


VALID = {
    "patient_ref": "PAT-1",
    "title": "Visit",
    "status": "uploaded",
    "duration_seconds": 3.5,
    "verification_results": {"ok": True},
    "recorded_at": "2024-01-01T08:00:00+01:00",
}


def random_fields(rng: random.Random, version: int | None) -> dict:
    """Mostly a valid body with one or two fields gone wrong, so the writes get past validation too."""
    if rng.random() < 0.3:
        return {name: random_value(rng) for name in rng.sample(FIELDS, rng.randrange(len(FIELDS)))}
    fields = dict(VALID)
    if version is not None:
        fields["version"] = version if rng.random() < 0.7 else rng.choice([0, -1, 10**30])
    for name in rng.sample(FIELDS, rng.randrange(3)):
        fields[name] = random_value(rng)
    return fields


def random_body(rng: random.Random, version: int | None = None) -> bytes:
    kind = rng.randrange(6)
    if kind == 0:
        return bytes(rng.randrange(256) for _ in range(rng.randrange(64)))
    body = json.dumps(random_fields(rng, version), allow_nan=True).encode()
    if kind == 1:
        position = rng.randrange(len(body))
        body = body[:position] + bytes([rng.randrange(256)]) + body[position + 1 :]
    if kind == 2:
        body = body[: rng.randrange(len(body) + 1)]
    return body


def random_query(rng: random.Random) -> str:
    names = ["limit", "offset", "status", "patient_ref", "since", rng.choice(string.ascii_letters)]
    values = ["0", "1", "200", "201", "-1", str(10**20), "abc", "", "%00", "%FF", "pending", "1.5", "nan", "%F0%9F%98"]
    pairs = [f"{rng.choice(names)}={rng.choice(values)}" for _ in range(rng.randrange(4))]
    return "&".join(pairs)


def random_headers(rng: random.Random) -> dict:
    """Sometimes an Idempotency-Key, drawn from a few that repeat, and odd ones."""
    if rng.random() < 0.6:
        return {}
    key = rng.choice([b"k1", b"k2", b"", b"x" * 255, b"x" * 256, b"\xff\xfe", b"k 1", str(uuid.uuid4()).encode()])
    return {"Idempotency-Key": key}


async def test_random_requests_never_cause_a_5xx(api, alice, make_recording):
    seed = int(os.environ.get("FUZZ_SEED") or random.SystemRandom().randrange(2**32))
    rng = random.Random(seed)
    recording = await make_recording(owner=alice)
    failures = []

    for _ in range(200):
        headers = {"Content-Type": "application/json", **random_headers(rng)}
        action = rng.randrange(5)
        if action == 0:
            response = await api.request("POST", "/recordings", content=random_body(rng), user=alice, headers=headers)
        elif action == 1:
            path = f"/recordings/{recording.id}"
            version = (await Recording.objects.aget(pk=recording.id)).version
            response = await api.request("PATCH", path, content=random_body(rng, version), user=alice, headers=headers)
        elif action == 2:
            response = await api.get(f"/recordings?{random_query(rng)}", user=alice)
        elif action == 3:
            response = await api.request("POST", "/auth/token", content=random_body(rng), headers=headers)
        else:
            segment = rng.choice([str(uuid.uuid4()), "x", "%00", "%ff", "..", "0" * 40])
            method = rng.choice(["GET", "PATCH", "DELETE"])
            response = await api.request(method, f"/recordings/{segment}", user=alice, headers=headers)
        if response.status_code >= 500 or (response.status_code >= 400 and "detail" not in response.json()):
            failures.append((response.request.method, str(response.request.url), response.status_code, response.text))

    assert failures == [], f"FUZZ_SEED={seed}: {failures[:5]}"


async def test_a_client_that_goes_away_mid_request_still_gets_its_work_done(api, alice):
    # The client sends its body and is gone at once (receive answers http.disconnect
    # from then on). The work cannot be cancelled once on the database thread; the
    # request runs to its end, so the PWA's retry finds the recording.
    recording_id = uuid.uuid4()
    token = await api.token_for(alice)
    body = orjson.dumps({"id": str(recording_id), "patient_ref": "PAT-GONE"})
    headers = [
        (b"authorization", f"Bearer {token}".encode()),
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
    ]

    status, _, _ = await asgi_call("/api/recordings", [body], headers)

    assert status == 201
    assert await Recording.objects.filter(pk=recording_id, patient_ref="PAT-GONE").aexists()
    retried = await api.post("/recordings", {"id": str(recording_id), "patient_ref": "PAT-GONE"}, user=alice)
    assert retried.status_code == 200


# A deep body, on every operation, whether or not it takes a body


def operations(schema: dict) -> list[tuple[str, str]]:
    """(method, path) of every operation the OpenAPI document publishes, without the /api prefix."""
    return [
        (method.upper(), path.removeprefix("/api"))
        for path, item in schema["paths"].items()
        for method in item
        if method in {"get", "post", "put", "patch", "delete"}
    ]


DEEP_BODY = b"[" * 300 + b"]" * 300


@pytest.mark.parametrize("token", ["bad", "good"])
async def test_a_deep_body_never_answers_500_on_any_operation(api, alice, make_recording, token):
    recording = await make_recording(owner=alice)
    schema = (await api.get("/openapi.json")).json()
    auth = {"user": alice} if token == "good" else {"token": "not-a-real-token"}
    headers = {"Idempotency-Key": "k", "Content-Type": "application/json"}
    answers = {}

    for method, template in operations(schema):
        path = template.format(recording_id=recording.id, token_id=1)
        response = await api.request(method, path, content=DEEP_BODY, headers=headers, **auth)
        answers[f"{method} {path}"] = response.status_code

    assert answers, "the OpenAPI document lists no operation"
    assert [name for name, status in answers.items() if status >= 500] == []
    if token == "bad":
        protected = set(answers) - {"GET /health", "POST /auth/token"}
        assert {name: answers[name] for name in protected} == dict.fromkeys(protected, 401)
    assert await Recording.objects.acount() == 1


async def test_delete_with_a_bad_token_and_a_deep_body_is_a_401(api, alice, make_recording):
    recording = await make_recording(owner=alice)
    headers = {"Authorization": "Bearer not-a-real-token", "Idempotency-Key": "k"}

    response = await api.request("DELETE", f"/recordings/{recording.id}", content=DEEP_BODY, headers=headers)

    assert_json_error(response, 401)
    assert (await Recording.objects.aget(pk=recording.id)).deleted_at is None


# NUL (U+0000): PostgreSQL cannot store it, so both engines refuse it alike


@pytest.mark.parametrize(
    "field", ["patient_ref", "title", "note_type", "audio_path", "transcript", "error", "results-key", "results-value"]
)
async def test_text_with_nul_is_a_422_on_create_and_patch(api, alice, make_recording, field):
    recording = await make_recording(owner=alice)
    if field == "results-key":
        change = {"verification_results": {"a\u0000b": 1}}
    elif field == "results-value":
        change = {"verification_results": [{"ok": ["x\u0000"]}]}
    else:
        change = {field: "before\u0000after"}

    created = await api.post("/recordings", {"patient_ref": "PAT-2", **change}, user=alice)
    patched = await api.patch(f"/recordings/{recording.id}", {"version": 1, **change}, user=alice)

    assert_json_error(created, 422)
    assert_json_error(patched, 422)
    assert await Recording.objects.acount() == 1
    assert (await Recording.objects.aget(pk=recording.id)).version == 1


@pytest.mark.parametrize("where", ["username", "password", "filter"])
async def test_nul_in_a_login_or_a_filter_is_a_422(api, alice, where):
    if where == "filter":
        response = await api.get("/recordings", params={"patient_ref": "PAT\u0000"}, user=alice)
    else:
        credentials = {"username": "alice", "password": "x", where: "ali\u0000ce"}
        response = await api.post("/auth/token", credentials)

    assert_json_error(response, 422)
