"""Login throttling: repeated failures for a username, or from one address, make logins wait."""

import asyncio
import time
from contextlib import asynccontextmanager
from datetime import timedelta

import httpx
import pytest
from django.test import AsyncClient, Client
from django.utils import timezone

from clinical.api import TOO_MANY_FAILURES
from clinical.asgi import application
from clinical.models import AuditEvent, LoginAttempt, Token
from tests.server import Server

pytestmark = pytest.mark.django_db(transaction=True)

PASSWORD = "correct-horse-battery"
WINDOW_MINUTES = 15


@pytest.fixture(autouse=True)
def throttle_limits(settings):
    # The documented defaults, whatever the environment says.
    settings.CLINICAL_LOGIN_MAX_FAILURES_PER_USER = 5
    settings.CLINICAL_LOGIN_MAX_FAILURES_PER_IP = 20
    settings.CLINICAL_LOGIN_WINDOW_MINUTES = WINDOW_MINUTES


@asynccontextmanager
async def client_from(ip: str):
    transport = httpx.ASGITransport(app=application, client=(ip, 4321))
    async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as client:
        yield client


async def login(client, username: str, password: str = PASSWORD):
    return await client.post("/api/auth/token", json={"username": username, "password": password})


async def fail(client, username: str, times: int) -> list[int]:
    return [(await login(client, username, "wrong")).status_code for _ in range(times)]


async def failures_at(at, username: str, ip: str = "127.0.0.1", count: int = 5) -> None:
    """Failed logins that started at `at`, as the throttle records them."""
    for _ in range(count):
        await LoginAttempt.objects.acreate(started_at=at, username=username, client_ip=ip, outcome="failed")


def retry_after(response) -> int:
    value = response.headers["retry-after"]
    assert value.isdigit(), value
    return int(value)


async def outcomes(username: str) -> list[str]:
    return [event.outcome async for event in AuditEvent.objects.filter(username=username).order_by("id")]


# Per username


async def test_five_failures_lock_the_username_even_for_the_right_password(alice):
    async with client_from("127.0.0.1") as client:
        failures = await fail(client, "alice", 5)

        response = await login(client, "alice")

    assert failures == [401] * 5
    assert response.status_code == 429
    assert response.json() == {"detail": TOO_MANY_FAILURES}
    assert 0 < retry_after(response) <= WINDOW_MINUTES * 60 + 1
    assert "token" not in response.json()
    assert await Token.objects.acount() == 0


async def test_four_failures_still_let_the_right_password_in(alice):
    async with client_from("127.0.0.1") as client:
        await fail(client, "alice", 4)

        response = await login(client, "alice")

    assert response.status_code == 201


async def test_failures_and_throttled_attempts_are_audited(alice):
    async with client_from("10.1.2.3") as client:
        await fail(client, "alice", 5)

        await login(client, "alice")
        await login(client, "alice", "wrong")

    events = [event async for event in AuditEvent.objects.filter(username="alice").order_by("id")]
    assert [(event.action, event.outcome) for event in events] == [("login_failed", "failed")] * 5 + [
        ("login_failed", "throttled")
    ] * 2
    assert {(event.client_ip, event.user_id) for event in events} == {("10.1.2.3", None)}


async def test_the_lock_is_for_that_username_only(alice, bob):
    async with client_from("127.0.0.1") as client:
        await fail(client, "alice", 5)

        response = await login(client, "bob")

    assert response.status_code == 201


async def test_the_setting_decides_how_many_failures_lock(alice, settings):
    settings.CLINICAL_LOGIN_MAX_FAILURES_PER_USER = 2
    async with client_from("127.0.0.1") as client:
        await fail(client, "alice", 2)

        response = await login(client, "alice")

    assert response.status_code == 429


async def test_retry_after_counts_down_to_when_the_oldest_failure_leaves_the_window(alice):
    await failures_at(timezone.now() - timedelta(minutes=WINDOW_MINUTES - 1), "alice")

    async with client_from("127.0.0.1") as client:
        response = await login(client, "alice")

    assert response.status_code == 429
    assert 55 <= retry_after(response) <= 61


async def test_failures_older_than_the_window_lock_nothing(alice):
    await failures_at(timezone.now() - timedelta(minutes=WINDOW_MINUTES, seconds=1), "alice")

    async with client_from("127.0.0.1") as client:
        response = await login(client, "alice")

    assert response.status_code == 201


async def test_throttled_attempts_do_not_extend_the_window(alice, settings):
    settings.CLINICAL_LOGIN_WINDOW_MINUTES = 3 / 60  # three seconds
    async with client_from("127.0.0.1") as client:
        await fail(client, "alice", 5)
        last_failure = time.monotonic()
        throttled = [(await login(client, "alice")).status_code]
        await asyncio.sleep(1.5)
        throttled.append((await login(client, "alice")).status_code)
        # Past the window of the real failures, but not of the throttled attempts.
        await asyncio.sleep(max(0.0, last_failure + 3.3 - time.monotonic()))

        response = await login(client, "alice")

    assert throttled == [429, 429]
    assert response.status_code == 201
    assert await outcomes("alice") == ["failed"] * 5 + ["throttled"] * 2 + ["success"]


async def test_throttled_attempts_do_not_push_retry_after_back(alice):
    await failures_at(timezone.now() - timedelta(minutes=WINDOW_MINUTES - 1), "alice")

    async with client_from("127.0.0.1") as client:
        first = await login(client, "alice")
        for _ in range(5):
            await login(client, "alice", "wrong")
        last = await login(client, "alice")

    assert (first.status_code, last.status_code) == (429, 429)
    assert retry_after(last) <= retry_after(first)


# Per address


async def test_twenty_failures_from_one_address_lock_every_username_from_it(alice, bob):
    async with client_from("10.9.9.9") as client:
        for number in range(19):
            await login(client, f"guess{number}", "wrong")
        before_the_limit = await login(client, "bob")
        await login(client, "guess19", "wrong")

        answers = {username: await login(client, username) for username in ("alice", "bob", "nobody")}

    assert before_the_limit.status_code == 201
    assert {username: response.status_code for username, response in answers.items()} == dict.fromkeys(answers, 429)
    assert all(retry_after(response) > 0 for response in answers.values())


async def test_an_address_lock_leaves_other_addresses_alone(alice):
    async with client_from("10.9.9.9") as client:
        for number in range(20):
            await login(client, f"guess{number}", "wrong")

    async with client_from("10.8.8.8") as elsewhere:
        response = await login(elsewhere, "alice")

    assert response.status_code == 201


# The admin's login


def admin_login(client: Client, username: str, password: str):
    return client.post("/admin/login/", {"username": username, "password": password, "next": "/admin/"})


@pytest.fixture
def staffer(make_user):
    return make_user("staffer", is_staff=True, is_superuser=True)


def test_admin_login_failures_are_audited(staffer):
    client = Client()

    response = admin_login(client, "staffer", "wrong")

    event = AuditEvent.objects.get()
    assert response.status_code == 200
    assert "_auth_user_id" not in client.session
    assert (event.action, event.outcome, event.username, event.client_ip) == (
        "login_failed",
        "failed",
        "staffer",
        "127.0.0.1",
    )


def test_admin_login_is_audited(staffer):
    client = Client()

    response = admin_login(client, "staffer", PASSWORD)

    event = AuditEvent.objects.get()
    assert response.status_code == 302
    assert (event.action, event.outcome, event.user_id, event.username) == ("login", "success", staffer.pk, "staffer")


def test_a_throttled_username_cannot_log_in_to_the_admin_even_with_the_right_password(staffer):
    client = Client()
    failures = [admin_login(client, "staffer", "wrong").status_code for _ in range(5)]

    response = admin_login(client, "staffer", PASSWORD)

    assert failures == [200] * 5
    assert response.status_code == 200
    assert "_auth_user_id" not in client.session
    assert client.get("/admin/").status_code == 302
    assert list(AuditEvent.objects.order_by("id").values_list("outcome", flat=True)) == ["failed"] * 5 + ["throttled"]


async def test_admin_and_api_failures_count_together(staffer):
    admin = AsyncClient()
    form = {"username": "staffer", "password": "wrong", "next": "/admin/"}
    admin_failures = [(await admin.post("/admin/login/", form)).status_code for _ in range(3)]
    async with client_from("127.0.0.1") as client:
        api_failures = await fail(client, "staffer", 2)

        api_answer = await login(client, "staffer")
    admin_answer = await admin.post("/admin/login/", {**form, "password": PASSWORD})

    assert (admin_failures, api_failures) == ([200] * 3, [401] * 2)
    assert api_answer.status_code == 429
    assert admin_answer.status_code == 200
    assert (await admin.get("/admin/")).status_code == 302
    assert await outcomes("staffer") == ["failed"] * 5 + ["throttled"] * 2


# A burst: every attempt counts from the moment it starts


async def test_a_burst_of_attempts_for_one_user_is_held_to_the_limit(alice):
    async with client_from("127.0.0.1") as client:
        wrong = [login(client, "alice", "wrong") for _ in range(15)]
        answers = await asyncio.gather(*wrong, login(client, "alice"))

    statuses = [response.status_code for response in answers]
    assert statuses.count(429) >= len(answers) - 5
    assert len([status for status in statuses if status != 429]) <= 5
    assert await Token.objects.acount() == statuses.count(201)
    assert await LoginAttempt.objects.exclude(outcome="pending").acount() == len(answers) - statuses.count(429)


async def test_a_burst_from_one_address_is_held_to_its_limit(make_user):
    async with client_from("10.7.7.7") as client:
        answers = await asyncio.gather(*[login(client, f"guess{number}", "wrong") for number in range(30)])

    statuses = [response.status_code for response in answers]
    assert statuses.count(401) == 20
    assert statuses.count(429) == 10


def test_a_burst_across_two_workers_is_held_to_the_limit(tmp_path):
    server = Server(tmp_path, args=("--workers", "2"))
    server.prepare("alice", iterations=100_000)  # a hash slow enough for the attempts to overlap

    with server:

        async def burst():
            async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
                body = {"username": "alice", "password": "wrong"}
                return await asyncio.gather(*[client.post("/api/auth/token", json=body) for _ in range(16)])

        answers = asyncio.run(burst())

    statuses = [response.status_code for response in answers]
    assert statuses.count(401) == 5
    assert statuses.count(429) == 11
