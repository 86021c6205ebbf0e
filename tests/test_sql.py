"""The hot-path statements on the driver's connection behave as Django's cursor would."""

import pytest
from django.db import DatabaseError, IntegrityError, OperationalError, ProgrammingError, connection, transaction
from django.db.transaction import TransactionManagementError

from clinical import sql
from clinical.models import ChangeSequence

pytestmark = pytest.mark.django_db(transaction=True)
# What a missing table raises: SQLite says OperationalError, PostgreSQL ProgrammingError.
MISSING_TABLE = (OperationalError, ProgrammingError)


def test_statements_take_django_placeholders():
    db = sql.db()

    row = sql.execute(db, "SELECT %s, %s + 1", [7, 41]).fetchone()

    assert tuple(row) == (7, 42)


def test_a_closed_connection_is_opened_again():
    connection.close()

    (one,) = sql.execute(sql.db(), "SELECT 1").fetchone()

    assert one == 1


@pytest.mark.sqlite_only
def test_a_closed_connection_is_opened_with_its_pragmas():
    connection.close()

    (mode,) = sql.execute(sql.db(), "PRAGMA journal_mode").fetchone()

    assert mode == "wal"


def test_driver_errors_become_djangos():
    db = sql.db()
    sql.execute(db, "INSERT INTO clinical_changesequence (id, value) VALUES (%s, %s)", [1, 5])

    with pytest.raises(IntegrityError):
        sql.execute(db, "INSERT INTO clinical_changesequence (id, value) VALUES (%s, %s)", [1, 6])
    with pytest.raises(MISSING_TABLE):
        sql.executemany(db, "INSERT INTO no_such_table VALUES (%s)", [[1]])
    assert issubclass(OperationalError, DatabaseError)


def test_a_failed_statement_marks_the_connection_for_the_health_check():
    db = sql.db()
    db.errors_occurred = False

    with pytest.raises(MISSING_TABLE):
        sql.execute(db, "SELECT * FROM no_such_table")

    assert db.errors_occurred


def test_a_broken_transaction_refuses_further_statements():
    db = sql.db()
    with transaction.atomic():
        db.set_rollback(True)
        with pytest.raises(TransactionManagementError):
            sql.execute(db, "SELECT 1")


def test_writes_join_the_surrounding_transaction():
    db = sql.db()

    with pytest.raises(RuntimeError), transaction.atomic():
        sql.execute(db, "INSERT INTO clinical_changesequence (id, value) VALUES (%s, %s)", [1, 5])
        raise RuntimeError("roll back")

    assert not ChangeSequence.objects.exists()
