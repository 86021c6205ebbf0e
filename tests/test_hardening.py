"""Deployment hardening: an all-async middleware stack, deploy checks, no caching, no tracebacks, strong passwords."""

import inspect
import logging
import os
import secrets
import subprocess
import sys

import httpx
import pytest
from django.conf import settings
from django.contrib.auth import get_user_model
from django.contrib.auth.password_validation import validate_password
from django.core.exceptions import ValidationError
from django.core.handlers.asgi import ASGIHandler
from django.core.handlers.wsgi import WSGIHandler
from django.middleware import clickjacking, csrf, security
from django.utils.module_loading import import_string

from clinical import middleware
from clinical.asgi import application
from clinical.models import AuditEvent, ChangeSequence
from recordings.models import Recording

PASSWORD = "correct-horse-battery"


# The middleware stack


@pytest.mark.parametrize("path", settings.MIDDLEWARE)
def test_every_middleware_is_async_capable(path):
    loaded = import_string(path)

    assert getattr(loaded, "async_capable", False) is True


@pytest.mark.filterwarnings("ignore:Django checks for ServeStatic")
def test_the_asgi_stack_adapts_no_handler_between_sync_and_async(caplog, settings):
    settings.DEBUG = True  # Django reports each adaptation only in DEBUG

    with caplog.at_level(logging.DEBUG, logger="django.request"):
        ASGIHandler()

    assert [record.getMessage() for record in caplog.records if "adapted" in record.getMessage()] == []


@pytest.mark.filterwarnings("ignore:Django checks for ServeStatic")
def test_the_adaptation_check_sees_an_adaptation_when_there_is_one(caplog, settings):
    settings.DEBUG = True

    with caplog.at_level(logging.DEBUG, logger="django.request"):
        WSGIHandler()  # a sync stack: the async-only middleware must be adapted

    assert [record for record in caplog.records if "adapted" in record.getMessage()] != []


def test_view_hooks_run_on_the_event_loop():
    hooks = [
        import_string(path).process_view for path in settings.MIDDLEWARE if hasattr(import_string(path), "process_view")
    ]

    assert hooks != []
    assert all(inspect.iscoroutinefunction(hook) for hook in hooks)


@pytest.mark.parametrize(
    ("ours", "djangos", "check"),
    [
        (middleware.SecurityMiddleware, security.SecurityMiddleware, "security.W001"),
        (middleware.XFrameOptionsMiddleware, clickjacking.XFrameOptionsMiddleware, "security.W002"),
        (middleware.CsrfViewMiddleware, csrf.CsrfViewMiddleware, "security.W003"),
    ],
)
def test_the_silenced_checks_are_covered_by_subclasses_of_djangos_middleware(ours, djangos, check):
    assert issubclass(ours, djangos)
    assert f"{ours.__module__}.{ours.__name__}" in settings.MIDDLEWARE
    assert check in settings.SILENCED_SYSTEM_CHECKS


def test_no_other_check_is_silenced():
    assert set(settings.SILENCED_SYSTEM_CHECKS) <= {"security.W001", "security.W002", "security.W003"}


# manage.py check --deploy


def deploy_check(tmp_path, **env) -> subprocess.CompletedProcess:
    environment = {key: value for key, value in os.environ.items() if key != "DJANGO_DEBUG"}
    environment.update(
        DJANGO_SECRET_KEY=secrets.token_urlsafe(64),
        CLINICAL_DB_PATH=str(tmp_path / "deploy.db"),
        **env,
    )
    if "CLINICAL_HTTPS" not in env:
        environment.pop("CLINICAL_HTTPS", None)
    return subprocess.run(
        [sys.executable, "manage.py", "check", "--deploy", "--fail-level", "WARNING"],
        cwd=settings.BASE_DIR,
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_deploy_check_passes_behind_https(tmp_path):
    result = deploy_check(tmp_path, CLINICAL_HTTPS="1")

    assert result.returncode == 0, result.stdout + result.stderr
    assert "no issues" in result.stdout


def test_the_deploy_check_fails_without_the_https_settings(tmp_path):
    result = deploy_check(tmp_path)

    assert result.returncode != 0
    assert "security.W" in result.stderr


def test_the_deploy_check_still_catches_hsts_turned_off(tmp_path):
    # Django's HSTS, SSL-redirect and nosniff checks look for its own SecurityMiddleware path.
    result = deploy_check(tmp_path, CLINICAL_HTTPS="1", CLINICAL_HSTS_SECONDS="0")

    assert result.returncode != 0
    assert "security.W004" in result.stderr


# What API answers carry


@pytest.mark.django_db(transaction=True)
async def test_api_answers_are_never_cached(api, alice, make_recording):
    recording = await make_recording(owner=alice)

    answers = {
        "health": await api.get("/health"),
        "login": await api.post("/auth/token", {"username": "alice", "password": PASSWORD}),
        "failed login": await api.post("/auth/token", {"username": "alice", "password": "wrong"}),
        "list": await api.get("/recordings", user=alice),
        "get": await api.get(f"/recordings/{recording.id}", user=alice),
        "create": await api.post("/recordings", {"patient_ref": "PAT-2"}, user=alice),
        "conflict": await api.patch(f"/recordings/{recording.id}", {"version": 9, "title": "x"}, user=alice),
        "invalid": await api.post("/recordings", {"patient_ref": ""}, user=alice),
        "delete": await api.delete(f"/recordings/{recording.id}", user=alice),
        "unauthorized": await api.get("/recordings"),
        "unknown path": await api.get("/nope"),
        "wrong method": await api.request("PUT", "/recordings", user=alice),
    }

    assert {name: response.headers.get("cache-control") for name, response in answers.items()} == dict.fromkeys(
        answers, "no-store"
    )


SECURITY_HEADERS = {"x-content-type-options": "nosniff", "x-frame-options": "DENY", "referrer-policy": "same-origin"}


def security_headers(response) -> dict:
    return {name: response.headers.get(name) for name in SECURITY_HEADERS}


@pytest.mark.django_db(transaction=True)
async def test_api_answers_carry_the_security_headers(api, alice):
    answers = [await api.get("/health"), await api.get("/recordings", user=alice), await api.get("/recordings")]

    assert [security_headers(response) for response in answers] == [SECURITY_HEADERS] * len(answers)


@pytest.mark.django_db(transaction=True)
async def test_errors_turned_into_json_keep_the_security_headers(api, alice):
    answers = [await api.get("/nope", user=alice), await api.request("PUT", "/health")]

    assert [security_headers(response) for response in answers] == [SECURITY_HEADERS] * len(answers)


# No tracebacks


async def broken_change_sequence():
    """The change sequence put back below numbers already handed out: the next write meets a UNIQUE constraint."""
    await ChangeSequence.objects.filter(pk=1).aupdate(value=0)


@pytest.mark.django_db(transaction=True)
async def test_an_unexpected_error_answers_json_without_a_traceback(api, alice, make_recording):
    await make_recording(owner=alice)
    await api.token_for(alice)
    await broken_change_sequence()

    response = await api.post("/recordings", {"patient_ref": "PAT-2", "transcript": "private words"}, user=alice)

    assert response.status_code == 500
    assert response.headers["content-type"].startswith("application/json")
    assert response.headers["cache-control"] == "no-store"
    assert response.json() == {"detail": "Internal Server Error."}
    assert [word for word in ("Traceback", "IntegrityError", "UNIQUE", "private words") if word in response.text] == []


@pytest.mark.django_db(transaction=True)
async def test_an_unexpected_error_leaves_no_half_done_write(api, alice, make_recording):
    await make_recording(owner=alice)
    await api.token_for(alice)
    await broken_change_sequence()

    await api.post("/recordings", {"patient_ref": "PAT-2"}, user=alice)

    assert await Recording.objects.acount() == 1
    assert await AuditEvent.objects.filter(action="create").acount() == 1


@pytest.mark.django_db(transaction=True)
async def test_djangos_own_errors_under_the_api_are_json_without_html(api, alice):
    not_found = await api.get("/no/such/path", user=alice)
    wrong_method = await api.request("PUT", "/health")

    assert not_found.status_code == 404
    assert wrong_method.status_code == 405
    assert not_found.json() == {"detail": "Not Found."}
    assert wrong_method.json() == {"detail": "Method Not Allowed."}
    assert "<" not in not_found.text + wrong_method.text


@pytest.mark.django_db(transaction=True)
async def test_the_admin_needs_its_csrf_token_under_asgi(alice):
    transport = httpx.ASGITransport(app=application)
    async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as client:
        page = await client.get("/admin/login/")
        forged = await client.post("/admin/login/", data={"username": "alice", "password": PASSWORD})

    assert page.status_code == 200
    assert page.headers.get("x-frame-options") == "DENY"
    assert forged.status_code == 403


# Passwords


def test_passwords_go_through_djangos_validators():
    assert settings.AUTH_PASSWORD_VALIDATORS != []

    with pytest.raises(ValidationError):
        validate_password("password")


@pytest.mark.parametrize("weak", ["password", "short1", "12345678901", "alice-clinic"])
def test_weak_passwords_are_refused(weak):
    with pytest.raises(ValidationError):
        validate_password(weak, user=get_user_model()(username="alice-clinic"))


def test_a_strong_password_passes():
    assert validate_password("violet-harbour-71-lantern", user=get_user_model()(username="alice")) is None
