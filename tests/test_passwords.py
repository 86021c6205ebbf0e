"""Password checks wait their turn in a small pool, the API's and the admin's alike."""

import asyncio
import os
import threading
import time

import httpx
import pytest
from django.contrib.auth import get_user_model
from django.contrib.auth.hashers import MD5PasswordHasher, PBKDF2PasswordHasher, check_password
from django.db import connections
from django.test import Client
from django.utils.module_loading import import_string

from clinical.asgi import application
from clinical.passwords import CHECKERS

pytestmark = pytest.mark.django_db(transaction=True)
HASHER = "tests.test_passwords.CountingHasher"
QUICK_PBKDF2 = "tests.test_passwords.QuickPBKDF2"
PASSWORD = "correct-horse-battery"


class QuickPBKDF2(PBKDF2PasswordHasher):
    iterations = 1000


class CountingHasher(MD5PasswordHasher):
    """MD5, slowed down, counting how many checks run at once."""

    lock = threading.Lock()
    running = 0
    most = 0

    def verify(self, password, encoded):
        with self.lock:
            CountingHasher.running += 1
            CountingHasher.most = max(CountingHasher.most, CountingHasher.running)
        try:
            time.sleep(0.05)
            return super().verify(password, encoded)
        finally:
            with self.lock:
                CountingHasher.running -= 1


async def test_logins_never_check_more_passwords_at_once_than_the_pool_allows(make_user, settings):
    settings.PASSWORD_HASHERS = [HASHER]
    settings.CLINICAL_LOGIN_MAX_FAILURES_PER_USER = settings.CLINICAL_LOGIN_MAX_FAILURES_PER_IP = 100  # no 429s here
    await asyncio.to_thread(make_user, "staffer", is_staff=True)
    counting = import_string(HASHER)  # the class Django loads, whatever name pytest gave this module
    counting.most = 0
    transport = httpx.ASGITransport(app=application, client=("127.0.0.1", 4321))

    async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as client:
        await client.get("/admin/login/")
        form = {"username": "staffer", "password": "wrong", "csrfmiddlewaretoken": client.cookies["csrftoken"]}
        api = [client.post("/api/auth/token", json={"username": "staffer", "password": "wrong"}) for _ in range(4)]
        admin = [client.post("/admin/login/", data=form) for _ in range(4)]
        answers = await asyncio.gather(*api, *admin)

    assert [answer.status_code for answer in answers[:4]] == [401] * 4
    assert [answer.status_code for answer in answers[4:]].count(200) >= 1  # the form again: refused
    # One fewer than the cores (the default), whatever else runs: a core is left to the API.
    assert CHECKERS._max_workers == max(1, (os.cpu_count() or 2) - 1)
    assert 1 <= counting.most <= CHECKERS._max_workers


def test_an_admin_login_leaves_the_password_checkers_without_a_database_connection(make_user):
    """The checkers hash and nothing else. Holding a connection of the pool each, they left
    the admin's requests none on PostgreSQL: 4 admin logins at once failed after the pool's 10 s."""
    make_user("staffer", password=PASSWORD, is_staff=True)

    answer = Client().post("/admin/login/", {"username": "staffer", "password": PASSWORD, "next": "/admin/"})

    assert answer.status_code == 302
    checkers = CHECKERS._max_workers
    all_busy = threading.Barrier(checkers)  # one call on each checker thread

    def has_a_connection() -> bool:
        all_busy.wait(10)
        return connections["default"].connection is not None

    calls = [CHECKERS.submit(has_a_connection) for _ in range(checkers)]
    assert [call.result() for call in calls] == [False] * checkers


def test_an_admin_login_upgrades_an_outdated_hash(make_user, settings):
    make_user("staffer", password=PASSWORD, is_staff=True)  # MD5, the tests' hasher
    settings.PASSWORD_HASHERS = [QUICK_PBKDF2, "django.contrib.auth.hashers.MD5PasswordHasher"]

    answer = Client().post("/admin/login/", {"username": "staffer", "password": PASSWORD, "next": "/admin/"})

    assert answer.status_code == 302
    stored = get_user_model().objects.get(username="staffer").password
    assert stored.startswith("pbkdf2_sha256$1000$")
    assert check_password(PASSWORD, stored)


def test_an_admin_login_with_a_wrong_password_changes_no_hash(make_user, settings):
    before = make_user("staffer", password=PASSWORD, is_staff=True).password
    settings.PASSWORD_HASHERS = [QUICK_PBKDF2, "django.contrib.auth.hashers.MD5PasswordHasher"]

    answer = Client().post("/admin/login/", {"username": "staffer", "password": "wrong", "next": "/admin/"})

    assert answer.status_code == 200  # the form again
    assert get_user_model().objects.get(username="staffer").password == before
