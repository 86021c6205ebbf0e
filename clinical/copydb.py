"""Moving a clinic from SQLite to PostgreSQL: one consistent snapshot copied, in one transaction, and verified.

The source is the configured SQLite database, read inside one read
transaction (a snapshot: a running server's later writes are not in it, and
it is never written to). The target is an empty PostgreSQL database, reached
through a second connection alias made at run time. Everything in the target
happens in one transaction, schema included (PostgreSQL's DDL is
transactional): migrate, copy every table with its primary keys, move the id
sequences and the change sequence past what was copied, verify, commit. A
failure or a refusal at any step rolls all of it back, and the target is left
as it was.
"""

import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit

import dj_database_url
from django.apps import apps
from django.contrib.contenttypes.models import ContentType
from django.core.management import call_command
from django.core.management.color import no_style
from django.db import DEFAULT_DB_ALIAS, DatabaseError, connections, router, transaction
from django.db.migrations.executor import MigrationExecutor

from clinical.audit import TABLE as AUDIT_TABLE
from clinical.backups import sqlite_uri
from clinical.chain import verify
from clinical.models import ChangeSequence
from recordings.digests import stored
from recordings.models import Recording

SOURCE = "copydb_source"
TARGET = "copydb_target"
BATCH = 2_000
POSTGRESQL = "django.db.backends.postgresql"
# Rows that migrate itself writes into the target (post_migrate). They are
# replaced by the source's, ids kept, so that every row naming one (user and
# group permissions, the admin log) names the same thing it did.
MADE_BY_MIGRATE = ("contenttypes.ContentType", "auth.Permission")

SOURCE_NOT_SQLITE = (
    "copydb copies the SQLite database into PostgreSQL: run it without DATABASE_URL "
    "(the SQLite file is CLINICAL_DB_PATH, or data/clinical.db), and name the target with --to."
)
NO_SOURCE = "There is no SQLite database at {path}: check CLINICAL_DB_PATH."
BAD_URL = "--to must be a PostgreSQL URL, postgres://user[:password]@host[:port]/name[?sslmode=…]; {reason}"
NOT_POSTGRESQL = "The target must be a PostgreSQL database (postgres://…), not {engine}."
NO_NAME = "The target URL names no database: end it with /name (create one with createdb)."
UNREACHABLE = "Cannot connect to the target database {target}: {reason}"
SOURCE_BEHIND = (
    "The SQLite database lacks {count} migration(s) of this code (first: {first}): "
    "run manage.py migrate on it first, so that both databases have the same tables."
)
SOURCE_AHEAD = (
    "The SQLite database has migrations this code does not know ({names}): run copydb with the code that made it."
)
HOLDS_DATA = (
    "The target database {target} holds data: {tables}. copydb fills an empty database only, and left this "
    "one unchanged: create a new database (createdb) and name it with --to."
)
FAILED = "The copy failed while {step}: {reason}. Nothing was committed: the target is as it was before."
MISMATCH = "Verification failed, so nothing was committed and the target is as it was before: {problems}."

# Column types whose values, as Django reads them from SQLite, psycopg writes to PostgreSQL as they are.
AS_READ = frozenset(
    {
        "AutoField",
        "BigAutoField",
        "SmallAutoField",
        "IntegerField",
        "BigIntegerField",
        "SmallIntegerField",
        "PositiveIntegerField",
        "PositiveBigIntegerField",
        "PositiveSmallIntegerField",
        "FloatField",
        "BooleanField",
        "CharField",
        "TextField",
        "DateTimeField",
        "UUIDField",
    }
)

Progress = Callable[[int, int], None]


class CopyError(Exception):
    """copydb refused or failed; the message says what to do, and the target is unchanged."""


@dataclass
class Copied:
    """What database_copy did."""

    source: Path
    target: str  # the URL without its password
    rows: dict[str, int] = field(default_factory=dict)  # table: rows copied, in the order copied
    change_seq: int = 0  # the highest change number of a recording, the same in both
    sequence: int = 0  # where the target's change sequence stands
    checks: list[str] = field(default_factory=list)  # what was verified, in words
    not_copied: list[str] = field(default_factory=list)  # source tables no model names
    source_changed: bool = False  # written during the copy: the target holds the state at its start
    seconds: float = 0.0


def database_copy(
    url: str,
    *,
    progress: Callable[[str], Progress | None] = lambda table: None,
    say: Callable[[str], None] = lambda line: None,
) -> Copied:
    """Copy the configured SQLite database into the empty PostgreSQL database at `url`.

    `progress(table)` gives a (done, total) callback for that table, or None;
    `say` takes a line about each step. Raises CopyError, with the target
    unchanged, on any refusal or failure.
    """
    started = time.monotonic()
    if connections[DEFAULT_DB_ALIAS].vendor != "sqlite":
        raise CopyError(SOURCE_NOT_SQLITE)
    source = Path(connections[DEFAULT_DB_ALIAS].settings_dict["NAME"])
    if not source.is_file():
        raise CopyError(NO_SOURCE.format(path=source))
    copied = Copied(source=source, target=shown(url))
    with _connected(source, target_settings(url), copied.target):
        steps = _Steps(say)
        try:
            steps.now("reading the SQLite database")
            _check_source()
            with transaction.atomic(using=TARGET):
                snapshot = _copy_into_target(copied, steps, progress)
                steps.now("committing")
        except DatabaseError as exc:
            raise CopyError(FAILED.format(step=steps.current, reason=_first_line(exc))) from exc
        copied.source_changed = snapshot.changed()
    copied.seconds = time.monotonic() - started
    return copied


class _Steps:
    """Which step the copy is at: for the operator as it goes, and for the message if it fails."""

    def __init__(self, say: Callable[[str], None]):
        self.say = say
        self.current = "connecting"

    def now(self, step: str, *, shown: bool = False) -> None:
        self.current = step
        if shown:
            self.say(f"{step[0].upper()}{step[1:]}…")


def _copy_into_target(copied: Copied, steps: _Steps, progress) -> "_Snapshot":
    """Inside the target's transaction: check, migrate, copy, finish the sequences, verify."""
    models = copied_models()
    steps.now("checking that the target is empty")
    _refuse_data(models, copied.target)
    steps.now("migrating the target", shown=True)
    _migrate_target()
    with _snapshot() as snapshot:
        for model in models:
            table = model._meta.db_table
            steps.now(f"copying {table}")
            copied.rows[table] = _copy_table(model, progress(table))
        steps.now("verifying", shown=True)
        copied.change_seq, copied.sequence = _finish_sequences(models)
        copied.checks = _verify(models, copied)
        copied.not_copied = _tables_not_copied(models)
    return snapshot


def target_settings(url: str) -> dict:
    """The target's connection settings from its URL; CopyError for anything but a PostgreSQL database."""
    try:
        params = dj_database_url.parse(url, conn_max_age=0)
    except (ValueError, dj_database_url.UnknownSchemeError) as exc:
        raise CopyError(BAD_URL.format(reason=f"{shown(url)!r} is not one.")) from exc
    if params["ENGINE"] != POSTGRESQL:
        raise CopyError(NOT_POSTGRESQL.format(engine=params["ENGINE"].rsplit(".", 1)[-1]))
    if not params["NAME"]:
        raise CopyError(NO_NAME)
    return params


def shown(url: str) -> str:
    """The URL as printed: without a password, in its user part or its query."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        host = f"[{host}]" if ":" in host else host
        netloc = f"{parts.username}@{host}" if parts.username else host
        netloc += f":{parts.port}" if parts.port else ""
    except ValueError:
        return "(an unreadable URL)"
    query = urlencode([(key, value) for key, value in parse_qsl(parts.query) if key != "password"])
    return parts._replace(netloc=netloc, query=query).geturl()


def copied_models() -> list:
    """Every table of every installed app, each after the tables its foreign keys point at."""
    models = [model for model in apps.get_models(include_auto_created=True) if model._meta.managed]
    ordered = []

    def visit(model, path=()):
        if model in ordered or model in path:
            return
        for parent in [f.related_model for f in model._meta.concrete_fields if f.is_relation]:
            if parent in models:
                visit(parent, (*path, model))
        ordered.append(model)

    for model in models:
        visit(model)
    return ordered


@contextmanager
def _connected(source: Path, target: dict, shown_target: str):
    """The aliases SOURCE (the SQLite file, read only) and TARGET, for the time of the copy."""
    # DEFERRED: the read transaction takes no write lock, so a running server keeps writing.
    reader = {**connections.settings[DEFAULT_DB_ALIAS], "NAME": sqlite_uri(source, mode="rw")}
    reader["OPTIONS"] = {**reader["OPTIONS"], "transaction_mode": "DEFERRED"}
    configured = connections.configure_settings({DEFAULT_DB_ALIAS: {}, SOURCE: reader, TARGET: target})
    connections.settings[SOURCE], connections.settings[TARGET] = configured[SOURCE], configured[TARGET]
    try:
        try:
            connections[TARGET].ensure_connection()
        except DatabaseError as exc:
            raise CopyError(UNREACHABLE.format(target=shown_target, reason=_first_line(exc))) from exc
        yield
    finally:
        for alias in (SOURCE, TARGET):
            connections[alias].close()
            del connections[alias]
            del connections.settings[alias]
        ContentType.objects.clear_cache()


def _check_source() -> None:
    """The source is read only, and at this code's migrations: the two databases get the same tables."""
    with connections[SOURCE].cursor() as cursor:
        cursor.execute("PRAGMA query_only = ON")  # this copy never writes its source
    executor = MigrationExecutor(connections[SOURCE])
    graph = executor.loader.graph
    unknown = sorted(
        f"{app}.{name}" for app, name in executor.loader.applied_migrations if (app, name) not in graph.nodes
    )
    if unknown:
        raise CopyError(SOURCE_AHEAD.format(names=", ".join(unknown)))
    plan = executor.migration_plan(graph.leaf_nodes())
    if plan:
        migration = plan[0][0]
        raise CopyError(SOURCE_BEHIND.format(count=len(plan), first=f"{migration.app_label}.{migration.name}"))


def _refuse_data(models: list, shown_target: str) -> None:
    """Refuse a target with a row in any table copied into (but those migrate fills itself)."""
    db = connections[TARGET]
    existing = set(db.introspection.table_names())
    holding = []
    for model in models:
        table = model._meta.db_table
        if table in existing and model._meta.label not in MADE_BY_MIGRATE:
            rows = model._base_manager.using(TARGET).count()
            if rows:
                holding.append(f"{table} ({rows:,} row{'s' if rows > 1 else ''})")
    if holding:
        raise CopyError(HOLDS_DATA.format(target=shown_target, tables=", ".join(holding)))


class _Everything:
    """A database router that sends every query to one alias."""

    def __init__(self, alias: str):
        self.alias = alias

    def db_for_read(self, model, **hints):
        return self.alias

    db_for_write = db_for_read


def _migrate_target() -> None:
    # Some data migrations query through the default manager without
    # `.using(schema_editor.connection.alias)`: routed, they read and write the
    # target they migrate, never the SQLite source.
    saved = router.routers
    router.routers = [_Everything(TARGET)]
    try:
        call_command("migrate", database=TARGET, interactive=False, verbosity=0)
    finally:
        router.routers = saved
    with connections[TARGET].cursor() as cursor:
        for label in reversed(MADE_BY_MIGRATE):
            cursor.execute(f"DELETE FROM {apps.get_model(label)._meta.db_table}")  # noqa: S608 (a model's table)
    ContentType.objects.clear_cache()


class _Snapshot:
    """The source's read transaction; whether anyone wrote the source while it lasted."""

    def __init__(self):
        self.db = connections[SOURCE]
        self.version = None

    def data_version(self) -> int:
        with self.db.cursor() as cursor:
            # Another connection's commit changes it; this one's read snapshot does not.
            cursor.execute("PRAGMA data_version")
            return cursor.fetchone()[0]

    def changed(self) -> bool:
        return self.data_version() != self.version


@contextmanager
def _snapshot():
    snapshot = _Snapshot()
    with transaction.atomic(using=SOURCE):
        with snapshot.db.cursor() as cursor:
            cursor.execute("SELECT count(*) FROM sqlite_master")  # a read: the snapshot starts here
        snapshot.version = snapshot.data_version()
        yield snapshot


def _copy_table(model, progress: Progress | None) -> int:
    """Stream one table, primary keys and all, into the target with COPY, in bounded memory."""
    fields = model._meta.concrete_fields
    db = connections[TARGET]
    preps = [(index, partial(f.get_db_prep_save, connection=db)) for index, f in enumerate(fields) if _needs_prep(f)]
    rows = model._base_manager.using(SOURCE).order_by("pk").values_list(*[f.attname for f in fields])
    total = rows.count()
    columns = ", ".join(db.ops.quote_name(f.column) for f in fields)
    done = 0
    with db.cursor() as cursor, db.wrap_database_errors:
        with cursor.copy(f"COPY {db.ops.quote_name(model._meta.db_table)} ({columns}) FROM STDIN") as copy:
            for row in rows.iterator(chunk_size=BATCH):
                if preps:
                    row = list(row)
                    for index, prep in preps:
                        row[index] = prep(row[index])
                copy.write_row(row)
                done += 1
                if progress and done % BATCH == 0:
                    progress(done, total)
    if progress:
        progress(done, total)
    return done


def _needs_prep(field) -> bool:
    # The source's converters made these values of the Python type psycopg
    # writes for the column as it is: Django's preparation would only hand them
    # back (it took half the copy's time). Every other type (JSON, IP
    # addresses, bytes) goes through the field, as an ORM save would.
    kind = (field.target_field if field.is_relation else field).get_internal_type()
    return kind not in AS_READ


def _finish_sequences(models: list) -> tuple[int, int]:
    """New rows must not collide with copied ones: id sequences past the highest id, the change sequence too.

    The change sequence goes to at least the highest change number of a
    recording, so that every later change numbers above any device's cursor.
    Returns (highest change number, change sequence).
    """
    highest = _max_change_seq(TARGET)
    counter = ChangeSequence.objects.using(TARGET).filter(pk=1).values_list("value", flat=True).first() or 0
    sequence = max(counter, highest)
    ChangeSequence.objects.using(TARGET).update_or_create(pk=1, defaults={"value": sequence})
    db = connections[TARGET]
    with db.cursor() as cursor:
        for statement in db.ops.sequence_reset_sql(no_style(), models):
            cursor.execute(statement)
    return highest, sequence


def _max_change_seq(alias: str) -> int:
    return Recording.objects.using(alias).order_by("-change_seq").values_list("change_seq", flat=True).first() or 0


def _verify(models: list, copied: Copied) -> list[str]:
    """Compare the target with the source's snapshot; CopyError (and so a rollback) on any difference."""
    problems = []
    for model in models:
        table = model._meta.db_table
        source, target = (model._base_manager.using(alias).count() for alias in (SOURCE, TARGET))
        written = copied.rows[table]
        if not source == target == written:
            problems.append(f"{table}: {source:,} rows in SQLite, {written:,} copied, {target:,} in the target")
    source_high = _max_change_seq(SOURCE)
    if source_high != copied.change_seq:
        problems.append(f"the highest change number: {source_high:,} in SQLite, {copied.change_seq:,} in the target")
    if not _audit_append_only():
        problems.append(f"{AUDIT_TABLE} lacks its append-only trigger")
    problems += _verify_digests() + _verify_chain()
    if problems:
        raise CopyError(MISMATCH.format(problems="; ".join(problems)))
    return [
        f"row counts equal in {len(models)} tables",
        f"highest change number {copied.change_seq:,} in both; change sequence at {copied.sequence:,}",
        "the audit trail is append-only in the target",
        "every recording matches its digest, and the audit chain is whole, in the target",
    ]


def _verify_digests() -> list[str]:
    """Every recording's digest, as copied, matches its content as the target holds it (a few ids, then a count)."""
    altered = [rid for batch in stored(connections[TARGET]) for rid, kept, computed in batch if kept != computed]
    if not altered:
        return []
    shown = ", ".join(str(rid) for rid in altered[:5])
    return [f"{len(altered):,} recordings do not match their digests in the target ({shown})"]


def _verify_chain() -> list[str]:
    verdict = verify(connections[TARGET])
    return [] if verdict.problem is None else [f"the audit chain in the target: {verdict.problem}"]


def _audit_append_only() -> bool:
    with connections[TARGET].cursor() as cursor:
        cursor.execute(
            "SELECT count(*) FROM pg_trigger WHERE tgrelid = %s::regclass AND tgname = %s AND tgenabled <> 'D'",
            [AUDIT_TABLE, f"{AUDIT_TABLE}_append_only"],
        )
        return cursor.fetchone()[0] == 1


def _tables_not_copied(models: list) -> list[str]:
    known = {model._meta.db_table for model in models} | {"django_migrations"}
    return sorted(set(connections[SOURCE].introspection.table_names()) - known)


def _first_line(exc: Exception) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0].rstrip(".")
