"""The ASGI entry point: the API's work on the one database thread, nothing slow there."""

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from django.contrib.auth.signals import user_logged_in, user_login_failed

from clinical.asgi import application
from clinical.connections import on_db_thread
from tests.server import PASSWORD, Server

pytestmark = pytest.mark.django_db(transaction=True)


def admin_login_form(client, username: str, password: str) -> dict:
    client.get("/admin/login/")
    return {
        "username": username,
        "password": password,
        "next": "/admin/",
        "csrfmiddlewaretoken": client.cookies["csrftoken"],
    }


@pytest.mark.parametrize("password", ["wrong", "correct-horse-battery"])
async def test_the_admin_login_checks_its_password_off_the_database_thread(make_user, password):
    await on_db_thread(make_user, "staffer", is_staff=True)
    threads = []

    def seen(**kwargs):
        threads.append(threading.get_ident())

    user_login_failed.connect(seen)
    user_logged_in.connect(seen)
    try:
        transport = httpx.ASGITransport(app=application, client=("127.0.0.1", 4321))
        async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as client:
            await client.get("/admin/login/")
            form = {"username": "staffer", "password": password, "next": "/admin/"}
            form["csrfmiddlewaretoken"] = client.cookies["csrftoken"]
            response = await client.post("/admin/login/", data=form)
    finally:
        user_login_failed.disconnect(seen)
        user_logged_in.disconnect(seen)

    assert response.status_code in (200, 302)
    assert len(threads) == 1
    assert threads[0] != await on_db_thread(threading.get_ident)


def test_the_api_answers_while_admin_logins_hash_their_passwords(tmp_path):
    # A hash of about a second each: the API must not wait for them.
    server = Server(tmp_path)
    server.prepare("staffer", iterations=2_000_000)
    finished = {}

    def admin_login(number: int) -> None:
        with httpx.Client(base_url=server.url, timeout=120) as client:
            client.post("/admin/login/", data=admin_login_form(client, "staffer", PASSWORD))
        finished[f"login {number}"] = time.monotonic()

    with server, ThreadPoolExecutor(4) as pool:
        logins = [pool.submit(admin_login, number) for number in range(4)]
        time.sleep(0.3)  # the logins are hashing now
        health = httpx.get(f"{server.url}/api/health", timeout=120)
        finished["health"] = time.monotonic()
        for login in logins:
            login.result()

    assert health.status_code == 200
    assert min(finished, key=finished.get) == "health"
