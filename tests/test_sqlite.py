"""SQLite configured for production: pragmas, IMMEDIATE write transactions, settings, the secret key."""

import sqlite3
import stat
import threading
import time
from pathlib import Path

import pytest
from django.conf import settings
from django.db import connection, connections, transaction

from clinical.models import ChangeSequence
from clinical.secret_key import load_or_create_secret_key

pytestmark = pytest.mark.sqlite_only  # SQLite's own files, pragmas and backup API

PRODUCTION = {"journal_mode": "wal", "synchronous": 1, "busy_timeout": 5000, "foreign_keys": 1, "secure_delete": 1}


def pragmas(conn) -> dict:
    with conn.cursor() as cursor:
        values = {}
        for name in ("journal_mode", "synchronous", "busy_timeout", "foreign_keys", "secure_delete"):
            cursor.execute(f"PRAGMA {name}")
            values[name] = cursor.fetchone()[0]
    return values


def hold_write_transaction(entered: threading.Event, release: threading.Event, seconds: float = 5) -> None:
    """In a thread of its own (and so a Django connection of its own): open atomic() and wait."""
    try:
        with transaction.atomic():
            entered.set()
            release.wait(seconds)
    finally:
        connection.close()


# Pragmas


@pytest.mark.django_db(transaction=True)
def test_the_connection_django_opened_has_the_production_pragmas():
    connection.ensure_connection()

    values = pragmas(connection)

    assert values == PRODUCTION


@pytest.mark.django_db(transaction=True)
def test_every_new_connection_gets_the_pragmas():
    fresh = connections.create_connection("default")
    assert fresh.settings_dict["NAME"] == connection.settings_dict["NAME"]

    try:
        fresh.ensure_connection()
        values = pragmas(fresh)
    finally:
        fresh.close()

    assert values == PRODUCTION


@pytest.mark.django_db(transaction=True)
def test_a_connection_in_another_thread_gets_the_pragmas():
    found = {}

    def read():
        try:
            found.update(pragmas(connection))
        finally:
            connection.close()

    thread = threading.Thread(target=read)
    thread.start()
    thread.join(10)

    assert found == PRODUCTION


# Write transactions


def test_write_transactions_are_immediate_in_settings():
    options = settings.DATABASES["default"]["OPTIONS"]

    assert options["transaction_mode"] == "IMMEDIATE"


@pytest.mark.django_db(transaction=True)
def test_atomic_takes_the_write_lock_at_begin():
    entered, release = threading.Event(), threading.Event()
    holder = threading.Thread(target=hold_write_transaction, args=(entered, release))
    holder.start()
    assert entered.wait(5)
    other = sqlite3.connect(connection.settings_dict["NAME"], timeout=0, isolation_level=None)

    try:
        with pytest.raises(sqlite3.OperationalError, match="database is locked"):
            other.execute("BEGIN IMMEDIATE")
    finally:
        release.set()
        holder.join(10)
    other.execute("BEGIN IMMEDIATE")
    other.execute("ROLLBACK")
    other.close()


@pytest.mark.django_db(transaction=True)
def test_a_second_writer_waits_for_the_first_instead_of_failing():
    entered, release = threading.Event(), threading.Event()
    holder = threading.Thread(target=hold_write_transaction, args=(entered, release, 0.5))
    holder.start()
    assert entered.wait(5)
    started = time.monotonic()

    with transaction.atomic():
        ChangeSequence.objects.update_or_create(pk=1, defaults={"value": 7})
    waited = time.monotonic() - started
    holder.join(10)

    assert waited >= 0.3
    assert ChangeSequence.objects.get(pk=1).value == 7


# Settings


def test_connections_are_not_kept_by_age_and_requests_are_not_atomic():
    database = settings.DATABASES["default"]

    assert database["CONN_MAX_AGE"] == 0
    assert database["ATOMIC_REQUESTS"] is False


def test_time_is_utc():
    assert settings.USE_TZ is True
    assert settings.TIME_ZONE == "UTC"


def test_the_database_is_a_file():
    assert settings.DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3"
    assert str(settings.DATABASES["default"]["NAME"]).endswith(".db")


# The secret key


def test_secret_key_is_created_in_a_private_file(tmp_path):
    path = tmp_path / "nested" / "secret_key"

    key = load_or_create_secret_key(path)

    assert len(key) >= 50
    assert path.read_text().strip() == key
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [entry.name for entry in path.parent.iterdir()] == ["secret_key"]


def test_secret_key_is_the_same_the_second_time(tmp_path):
    path = tmp_path / "secret_key"
    first = load_or_create_secret_key(path)

    second = load_or_create_secret_key(path)

    assert second == first


def test_an_existing_secret_key_is_read_not_replaced(tmp_path):
    path = tmp_path / "secret_key"
    path.write_text("an-existing-key-from-an-earlier-start\n")

    key = load_or_create_secret_key(path)

    assert key == "an-existing-key-from-an-earlier-start"


def test_an_empty_secret_key_file_is_an_error(tmp_path):
    path = tmp_path / "secret_key"
    path.write_text("")

    with pytest.raises(RuntimeError):
        load_or_create_secret_key(path)


def test_two_fresh_keys_differ(tmp_path):
    first = load_or_create_secret_key(tmp_path / "one")
    second = load_or_create_secret_key(tmp_path / "two")

    assert first != second


# Health


@pytest.mark.django_db(transaction=True)
async def test_health_reports_wal_and_no_pending_migrations(api):
    response = await api.get("/health")

    assert response.status_code == 200
    assert response.json()["journal_mode"] == "wal"
    assert response.json()["pending_migrations"] == 0
    assert response.json()["status"] == "ok"


@pytest.mark.django_db(transaction=True)
def test_a_deleted_note_does_not_linger_in_the_database_file(alice):
    from recordings.services import recording_create, recording_delete

    secret = "lingering-transcript-" + "q" * 20_000  # overflow pages, freed on delete
    recording, _ = recording_create(owner=alice, patient_ref="PAT-LINGER", transcript=secret)
    recording_delete(owner=alice, recording_id=recording.pk)
    with connection.cursor() as cursor:
        cursor.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    database = Path(connection.settings_dict["NAME"]).read_bytes()

    assert b"lingering-transcript-" not in database
    assert b"PAT-LINGER" not in database
