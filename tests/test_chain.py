"""The audit trail's hash chain: tampering as someone with write access to the database would do it.

Each attack first drops the append-only triggers, as such an attacker could.
verifyaudit names the first event changed, removed, inserted or reordered.
"""

import hashlib
import re
import uuid
from datetime import UTC, datetime, timedelta

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import DatabaseError, connection, transaction
from django.utils import timezone

from clinical.audit import SEAL_TABLE, audit_record, drop_triggers_sql
from clinical.chain import GAP_GRACE, GENESIS, event_hash, head, moment, seal, verify
from clinical.models import AuditCheck, AuditEvent, AuditSeal
from recordings.selectors import recording_get
from recordings.services import recording_create, recording_update
from tests.server import Server

pytestmark = pytest.mark.django_db(transaction=True)
OK = re.compile(r"^(\d+) events, head ([0-9a-f]{64})$", re.MULTILINE)


def events(alice, count: int = 6) -> list[int]:
    """`count` events of several kinds: creates, changes, reads."""
    for number in range(count // 3):
        recording, _ = recording_create(owner=alice, patient_ref=f"PAT-{number}", ip="10.0.0.1")
        recording_update(owner=alice, recording_id=recording.pk, version=1, status="uploaded")
        recording_get(alice, recording_id=recording.pk, ip="2001:db8::1")
    return list(AuditEvent.objects.order_by("id").values_list("id", flat=True))


def verifyaudit(capsys, *args) -> tuple[int, str]:
    """(exit status, what it printed or the error)."""
    try:
        call_command("verifyaudit", *args)
    except CommandError as exc:
        return 1, str(exc)
    return 0, capsys.readouterr().out


def attack(statement: str, params=()) -> None:
    with connection.cursor() as cursor:
        for drop in drop_triggers_sql(connection.vendor, SEAL_TABLE) + drop_triggers_sql(connection.vendor):
            cursor.execute(drop)
        cursor.execute(statement, params)


def test_an_untouched_trail_verifies_with_its_count_and_head(alice, capsys):
    ids = events(alice)

    status, out = verifyaudit(capsys)

    assert status == 0, out
    count, printed = OK.search(out).groups()
    assert int(count) == len(ids)
    assert printed == head()[1] == AuditSeal.objects.get(event_id=ids[-1]).hash
    assert AuditCheck.objects.get().ok


def test_each_hash_covers_the_event_and_the_one_before(alice):
    ids = events(alice, 3)
    seal()
    seals = dict(AuditSeal.objects.values_list("event_id", "hash"))
    first = AuditEvent.objects.get(pk=ids[0])

    assert seals[ids[0]] != seals[ids[1]]
    # Recomputed by hand from the documented form, with no key set.
    canonical = (
        f'[{first.id},"{first.at.strftime("%Y-%m-%dT%H:%M:%S.%fZ")}",{first.user_id},"alice","create",'
        f'"{first.recording_id}",["patient_ref"],"","pending","10.0.0.1","success",null]'
    )
    assert seals[ids[0]] == hashlib.sha256(f"{GENESIS}\n{canonical}".encode()).hexdigest()


@pytest.mark.parametrize("microsecond", [0, 120])
def test_an_event_at_a_whole_second_is_hashed_in_the_documented_form(alice, monkeypatch, microsecond):
    # SQLite keeps such a time without its fraction: the form still writes six digits.
    monkeypatch.setattr(timezone, "now", lambda: datetime(2026, 12, 3, 15, 0, 0, microsecond, tzinfo=UTC))
    audit_record(actor=alice, action="read", recording_id=uuid.UUID(int=1), ip="10.0.0.1")
    (event_id,) = AuditEvent.objects.values_list("id", flat=True)
    seal()

    canonical = (
        f'[{event_id},"2026-12-03T15:00:00.{microsecond:06d}Z",{alice.pk},"alice","read",'
        '"00000000-0000-0000-0000-000000000001",[],"","","10.0.0.1","success",null]'
    )
    expected = hashlib.sha256(f"{GENESIS}\n{canonical}".encode()).hexdigest()
    assert AuditSeal.objects.get(event_id=event_id).hash == expected
    assert verify().problem is None


@pytest.mark.parametrize("microsecond", [0, 1, 999_999])
def test_sqlites_text_of_a_time_has_the_canonical_form_of_the_time(microsecond):
    at = datetime(2026, 12, 3, 15, 0, 0, microsecond)
    stored = connection.ops.adapt_datetimefield_value(at.replace(tzinfo=UTC))  # as events are written

    assert moment(str(at)) == moment(at) == moment(at.replace(tzinfo=UTC)) == moment(stored)
    assert moment(at) == f"2026-12-03T15:00:00.{microsecond:06d}Z"


@pytest.mark.parametrize(("age", "sealed"), [(0, False), (GAP_GRACE.total_seconds() + 1, True)])
def test_the_sealer_waits_at_a_missing_id_until_the_event_after_it_is_old_enough(alice, age, sealed):
    events(alice, 3)
    sealed_to, _ = seal()
    at = timezone.now() - timedelta(seconds=age)
    AuditEvent.objects.create(id=sealed_to + 2, at=at, username="alice", action="login")  # sealed_to + 1 may commit

    assert seal()[0] == (sealed_to + 2 if sealed else sealed_to)


def test_events_written_since_the_last_seal_are_sealed_before_the_check(alice, capsys):
    events(alice, 3)
    seal()
    audit_record(actor=alice, action=AuditEvent.Action.LOGIN, ip="10.0.0.2")

    status, out = verifyaudit(capsys)

    assert status == 0
    assert OK.search(out).group(1) == "4"


@pytest.mark.sqlite_only  # PostgreSQL's column takes only times
@pytest.mark.parametrize("at", ["not a time", "2026-13-45 25:61:00", ""])
def test_a_time_that_is_not_one_is_named(alice, capsys, at):
    ids = events(alice)
    seal()
    attack("UPDATE clinical_auditevent SET at = %s WHERE id = %s", [at, ids[2]])

    status, error = verifyaudit(capsys)

    assert status == 1
    assert f"event {ids[2]} does not match its seal" in error


def test_a_changed_field_is_named(alice, capsys):
    ids = events(alice)
    seal()
    attack("UPDATE clinical_auditevent SET username = %s WHERE id = %s", ["mallory", ids[2]])

    status, error = verifyaudit(capsys)

    assert status == 1
    assert f"event {ids[2]} does not match its seal" in error
    assert not AuditCheck.objects.get().ok


def test_an_event_deleted_from_the_middle_is_named(alice, capsys):
    ids = events(alice)
    seal()
    attack("DELETE FROM clinical_auditevent WHERE id = %s", [ids[3]])

    status, error = verifyaudit(capsys)

    assert (status, f"event {ids[3]} was removed" in error) == (1, True), error


def test_a_seal_moved_to_another_recording_is_named(alice, capsys):
    # The chain holds, but a search by recording (the seals' index) would miss the event.
    ids = events(alice)
    seal()
    attack("UPDATE clinical_auditseal SET recording_id = NULL WHERE event_id = %s", [ids[2]])

    status, error = verifyaudit(capsys)

    assert status == 1
    assert f"the seal of event {ids[2]} names another recording" in error


def test_a_seal_carries_its_events_recording(alice):
    events(alice)
    seal()

    seals = dict(AuditSeal.objects.values_list("event_id", "recording_id"))

    assert seals == dict(AuditEvent.objects.values_list("id", "recording_id"))
    assert any(seals.values())


def test_an_event_deleted_with_its_seal_breaks_the_next_one(alice, capsys):
    ids = events(alice)
    seal()
    attack("DELETE FROM clinical_auditseal WHERE event_id = %s", [ids[3]])
    attack("DELETE FROM clinical_auditevent WHERE id = %s", [ids[3]])

    status, error = verifyaudit(capsys)

    assert status == 1
    assert f"event {ids[4]} does not match its seal" in error


def test_an_event_inserted_below_the_sealed_ones_is_named(alice, capsys):
    ids = events(alice)
    seal()
    attack(
        "INSERT INTO clinical_auditevent (id, at, username, action, fields, status_from, status_to, outcome) "
        "SELECT 0, at, 'mallory', 'read', '[]', '', '', 'success' FROM clinical_auditevent WHERE id = %s",
        [ids[0]],
    )

    status, error = verifyaudit(capsys)

    assert status == 1
    assert "event 0 is not in the chain" in error


def test_an_event_inserted_by_moving_the_later_ones_up_is_named(alice, capsys):
    ids = events(alice)
    seal()
    for eid in reversed(ids[3:]):
        attack("UPDATE clinical_auditevent SET id = id + 1 WHERE id = %s", [eid])
    attack(
        "INSERT INTO clinical_auditevent (id, at, username, action, fields, status_from, status_to, outcome) "
        "SELECT %s, at, 'mallory', 'read', '[]', '', '', 'success' FROM clinical_auditevent WHERE id = %s",
        [ids[3], ids[0]],
    )

    status, error = verifyaudit(capsys)

    assert status == 1
    assert f"event {ids[3]} does not match its seal" in error


def test_two_swapped_events_are_named(alice, capsys):
    ids = events(alice)
    seal()
    first, second = ids[1], ids[2]
    attack("UPDATE clinical_auditevent SET id = -1 WHERE id = %s", [first])
    attack("UPDATE clinical_auditevent SET id = %s WHERE id = %s", [first, second])
    attack("UPDATE clinical_auditevent SET id = %s WHERE id = -1", [second])

    status, error = verifyaudit(capsys)

    assert status == 1
    assert f"event {first} does not match its seal" in error


def test_a_tail_cut_after_an_anchor_is_caught_by_the_anchor(alice, capsys):
    ids = events(alice)
    status, out = verifyaudit(capsys)
    anchor = OK.search(out).group(2)
    more = events(alice)[len(ids) :]
    assert verifyaudit(capsys, "--head", anchor)[0] == 0
    cut = ids[-2]
    attack("DELETE FROM clinical_auditseal WHERE event_id >= %s", [cut])
    attack("DELETE FROM clinical_auditevent WHERE id >= %s", [cut])

    whole, _ = verifyaudit(capsys)  # what remains is a chain in itself
    status, error = verifyaudit(capsys, "--head", anchor)

    assert more
    assert whole == 0
    assert status == 1
    assert f"head {anchor} is not part of the chain" in error


def test_a_chain_rewritten_without_the_key_is_caught(alice, capsys, settings):
    settings.CLINICAL_AUDIT_KEY = b"k" * 32
    ids = events(alice)
    seal()
    attack("UPDATE clinical_auditevent SET username = 'mallory' WHERE id = %s", [ids[1]])
    # The attacker recomputes every seal, but without the key.
    previous = GENESIS
    with connection.cursor() as cursor:
        cursor.execute("SELECT * FROM clinical_auditevent ORDER BY id")
        columns = [column[0] for column in cursor.description]
        rows = cursor.fetchall()
    for row in rows:
        values = dict(zip(columns, row, strict=True))
        settings.CLINICAL_AUDIT_KEY = b""
        previous = event_hash(previous, [values[name] for name in AUDIT_COLUMNS])
        attack("UPDATE clinical_auditseal SET hash = %s WHERE event_id = %s", [previous, values["id"]])
    settings.CLINICAL_AUDIT_KEY = b"k" * 32

    status, error = verifyaudit(capsys)

    assert status == 1
    assert f"event {ids[0]} does not match its seal" in error


def test_the_key_changes_every_hash(alice, settings):
    events(alice, 3)
    plain = seal()[1]
    settings.CLINICAL_AUDIT_KEY = b"k" * 32
    row = AuditEvent.objects.order_by("-id").values_list(*AUDIT_COLUMNS).first()

    assert event_hash(GENESIS, row) != hashlib.sha256(b"").hexdigest()
    assert plain != event_hash(GENESIS, row)


def test_a_bad_head_is_refused(capsys):
    with pytest.raises(CommandError, match="64 lowercase hex digits"):
        call_command("verifyaudit", "--head", "xyz")


AUDIT_COLUMNS = (
    "id",
    "at",
    "user_id",
    "username",
    "action",
    "recording_id",
    "fields",
    "status_from",
    "status_to",
    "client_ip",
    "outcome",
    "detail",
)


def test_a_restored_database_verifies_and_still_holds_the_head_its_backup_printed(tmp_path):
    server = Server(tmp_path / "server")
    server.prepare("alice")
    with server:
        server.login("alice")  # a login event
    backup = server.manage("backupdb", "--output-dir", str(tmp_path / "backups"))
    assert backup.returncode == 0, backup.stderr
    anchor = re.search(r"Audit chain head: ([0-9a-f]{64})", backup.stdout).group(1)
    path = re.search(r"Backed up to (\S+)", backup.stdout).group(1)
    with server:
        server.login("alice")  # after the backup: gone with the restore

    restored = server.manage("restoredb", path, "--yes")
    checked = server.manage("verifyaudit", "--head", anchor)

    assert restored.returncode == 0, restored.stderr
    assert checked.returncode == 0, checked.stderr
    assert re.search(r"^2 events, head [0-9a-f]{64}$", checked.stdout, re.MULTILINE)  # the login, the restore


def test_the_migration_gives_existing_seals_their_recordings_and_keeps_them_append_only(alice):
    ids = events(alice)
    call_command("migrate", "clinical", "0005", verbosity=0)
    old_seals = "INSERT INTO clinical_auditseal (event_id, hash) VALUES (%s, %s)"  # as 0005 wrote them
    with connection.cursor() as cursor:
        cursor.executemany(old_seals, [[i, "0" * 64] for i in ids])

    call_command("migrate", "clinical", verbosity=0)

    seals = dict(AuditSeal.objects.values_list("event_id", "recording_id"))
    assert seals == dict(AuditEvent.objects.values_list("id", "recording_id"))
    with pytest.raises(DatabaseError, match="append-only"), transaction.atomic():
        AuditSeal.objects.filter(event_id=ids[0]).update(hash="1" * 64)
    with connection.cursor() as cursor:
        indexed = connection.introspection.get_constraints(cursor, "clinical_auditevent").values()
    assert not [index for index in indexed if index["columns"] == ["recording_id"]]
