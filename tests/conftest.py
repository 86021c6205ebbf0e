"""Shared fixtures: users, tokens, a recording factory and an API client over the real ASGI stack."""

import os

import httpx
import pytest
from asgiref.sync import sync_to_async
from django.conf import settings
from django.contrib.auth import get_user_model
from django.db import connection

# The in-process server seals nothing by itself: the tests seal when they mean to
# (server processes seal as deployed).
settings.CLINICAL_AUDIT_SEAL_SECONDS = 0

from clinical.asgi import application  # noqa: E402
from clinical.audit import SEAL_TABLE, drop_triggers_sql, triggers_sql  # noqa: E402
from clinical.tokens import token_issue  # noqa: E402
from recordings.services import recording_create  # noqa: E402

ENGINE = "postgresql" if os.environ.get("DATABASE_URL") else "sqlite"


def pytest_report_header(config):
    return f"database engine: {ENGINE} (scripts/test runs the suite on both; CLINICAL_TEST_ENGINE picks one)"


def pytest_collection_modifyitems(config, items):
    """Tests about one engine's own behaviour (files, pragmas, pg_dump) run on that engine only."""
    for item in items:
        for engine in ("sqlite", "postgresql"):
            if item.get_closest_marker(f"{engine}_only") and engine != ENGINE:
                item.add_marker(pytest.mark.skip(reason=f"about {engine} itself; this run is on {ENGINE}"))


@pytest.fixture(scope="session", autouse=True)
def database_threads_let_go(django_db_setup, django_db_blocker):
    """On PostgreSQL, the API's database threads keep their connections: end them before the test database goes."""
    yield
    if ENGINE != "postgresql":
        return
    with django_db_blocker.unblock(), connection.cursor() as cursor:
        cursor.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )


@pytest.fixture(autouse=True)
def fast_password_hashing(settings):
    # Real hashing costs half a second a password; the tests are about the rest.
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


@pytest.fixture(autouse=True)
def audit_trail_flushable(request):
    """pytest-django empties every table after a transactional test; the audit trail's triggers refuse that.

    The triggers stand during the test and go only for the flush that follows it.
    """
    marker = request.node.get_closest_marker("django_db")
    if not (marker and marker.kwargs.get("transaction")) and "transactional_db" not in request.fixturenames:
        yield
        return
    request.getfixturevalue("transactional_db")
    _run_sql(triggers_sql(connection.vendor) + triggers_sql(connection.vendor, SEAL_TABLE))
    yield
    _run_sql(drop_triggers_sql(connection.vendor, SEAL_TABLE) + drop_triggers_sql(connection.vendor))


def _run_sql(statements: list[str]) -> None:
    with connection.cursor() as cursor:
        for sql in statements:
            cursor.execute(sql)


@pytest.fixture
def make_user(transactional_db):
    def make(username: str, password: str = "correct-horse-battery", **extra):
        return get_user_model().objects.create_user(username, password=password, **extra)

    return make


@pytest.fixture
def alice(make_user):
    return make_user("alice")


@pytest.fixture
def bob(make_user):
    return make_user("bob")


@pytest.fixture
def make_recording():
    """An async factory: await make_recording(owner=alice, **overrides)."""

    async def make(owner, **overrides):
        fields = {"patient_ref": "PAT-00001", "title": "Follow-up", **overrides}
        recording, _ = await sync_to_async(recording_create)(owner=owner, **fields)
        return recording

    return make


class Api:
    """httpx over clinical.asgi.application: every request goes through the whole ASGI stack."""

    def __init__(self, client: httpx.AsyncClient):
        self.client = client
        self.tokens: dict[int, str] = {}

    async def token_for(self, user) -> str:
        if user.pk not in self.tokens:
            raw, _ = await sync_to_async(token_issue)(user=user)
            self.tokens[user.pk] = raw
        return self.tokens[user.pk]

    async def request(self, method: str, path: str, json=None, *, user=None, token=None, headers=None, **kwargs):
        headers = dict(headers or {})
        if user is not None:
            token = await self.token_for(user)
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        return await self.client.request(method, f"/api{path}", json=json, headers=headers, **kwargs)

    async def get(self, path, **kwargs):
        return await self.request("GET", path, **kwargs)

    async def post(self, path, json=None, **kwargs):
        return await self.request("POST", path, json, **kwargs)

    async def patch(self, path, json=None, **kwargs):
        return await self.request("PATCH", path, json, **kwargs)

    async def delete(self, path, **kwargs):
        return await self.request("DELETE", path, **kwargs)


@pytest.fixture
async def api(transactional_db):
    transport = httpx.ASGITransport(app=application)
    async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as client:
        yield Api(client)
