"""Hot backups, restores and maintenance of the PostgreSQL database, with pg_dump, pg_restore and psql.

A backup is `pg_dump --format=custom` of one snapshot: this process opens a
repeatable-read transaction, counts the recordings in it and hands its
snapshot to pg_dump (--snapshot), so the count is of the backup and every
write committed before the command started is in it. The dump goes to a
hidden file, is read back whole by pg_restore (and must hold the clinical
tables), is flushed, and only then linked to its final name.

A restore streams `pg_restore --clean --if-exists --no-owner` as SQL into
psql, in one transaction that this module opens and commits only once
pg_restore has read the whole file without error: nothing is half restored.
The transaction first takes every table of the schema in one LOCK, waiting
at most LOCK_TIMEOUT_MS for each (well under PostgreSQL's deadlock_timeout,
a second by default) and starting over while the server's own transactions
hold them, so that the restore, not a request, is what gives way when the two
wait for each other; it then drops those tables, so that the database ends as
the backup had it, with no table of a later version left behind. The server's
connections are never cut: its requests wait for the locks, then find the new
tables by name and see the restored data. The audit trail's append-only
trigger comes back with its table, and is made again before the commit in
case the backup lacks it.

Child processes get the connection from the settings through libpq's
environment variables (PGHOST, PGPASSWORD, PGSSLMODE...), never on their
command line, where other users of the machine could read a password.
"""

import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

from django.conf import settings
from django.db import DatabaseError, transaction

from clinical.audit import SEAL_TABLE, triggers_sql
from clinical.audit import TABLE as AUDIT_TABLE
from clinical.backups import (
    CLINICAL_TABLES,
    DUMP_MAGIC,
    SQLITE_MAGIC,
    Backup,
    BackupError,
    MaintenanceError,
    Progress,
    backup_folder,
    file_identity,
    file_magic,
    fsync,
    identity_and_digest,
    known_migrations,
    prune,
    publish,
)
from clinical.models import AuditEvent, ChangeSequence
from recordings.models import Recording

SUFFIX = ".dump"
NAME_PATTERN = re.compile(r"^clinical-(\d{8}T\d{6}Z)(?:-(\d+))?\.dump$")
BINDIR_SETTING = "CLINICAL_PG_BINDIR"
LOCK_TIMEOUT_MS = 200
LOCK_PATIENCE = 120.0  # seconds of retries before a restore gives up on a busy server
RETRY_STATES = ("55P03", "40P01")  # lock_not_available, deadlock_detected: nothing was changed
# Taken in this order: the table every write starts with first, those every write ends with last.
LOCK_FIRST = (Recording._meta.db_table,)
LOCK_LAST = (ChangeSequence._meta.db_table, AuditEvent._meta.db_table)
# Connection options that libpq also reads from the environment.
OPTION_VARIABLES = {
    "sslmode": "PGSSLMODE",
    "sslrootcert": "PGSSLROOTCERT",
    "sslcert": "PGSSLCERT",
    "sslkey": "PGSSLKEY",
    "sslcrl": "PGSSLCRL",
    "sslcrldir": "PGSSLCRLDIR",
    "sslsni": "PGSSLSNI",
    "ssl_min_protocol_version": "PGSSLMINPROTOCOLVERSION",
    "ssl_max_protocol_version": "PGSSLMAXPROTOCOLVERSION",
    "channel_binding": "PGCHANNELBINDING",
    "gssencmode": "PGGSSENCMODE",
    "require_auth": "PGREQUIREAUTH",
    "passfile": "PGPASSFILE",
    "service": "PGSERVICE",
    "options": "PGOPTIONS",
    "connect_timeout": "PGCONNECT_TIMEOUT",
    "application_name": "PGAPPNAME",
    "target_session_attrs": "PGTARGETSESSIONATTRS",
    "hostaddr": "PGHOSTADDR",
}
TABLES_FROM = (  # the tables (plain and partitioned) of the database, by schema n
    "FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace WHERE c.relkind IN ('r', 'p')"
)
# One script, stopped at its first error, which psql prints with its SQLSTATE.
PSQL_OPTIONS = ("--no-psqlrc", "--quiet", "--no-password", "--set=ON_ERROR_STOP=1", "--set=VERBOSITY=verbose")
SETTINGS_VARIABLES = {
    "HOST": "PGHOST",
    "PORT": "PGPORT",
    "USER": "PGUSER",
    "NAME": "PGDATABASE",
    "PASSWORD": "PGPASSWORD",
}


class PostgresDatabase:
    """The operations on a Django connection's PostgreSQL database, as the commands and clinical.restore call them."""

    def __init__(self, connection):
        self.connection = connection
        self.settings = connection.settings_dict
        self._bindir: Path | None = None

    @property
    def name(self) -> str:
        host, port = self.settings.get("HOST") or "", self.settings.get("PORT") or "5432"
        where = host if host.startswith("/") else f"{host}:{port}" if host else f"the local socket (port {port})"
        return f"{self.settings.get('NAME')} on {where}"

    def describe(self) -> str:
        return f"PostgreSQL database {self.name}"

    def exists(self) -> bool:
        """Whether there is a database to replace: a table in the schema."""
        return bool(self._tables())

    # Backups

    def backup(
        self, output_dir: Path, *, keep: int | None, progress: Progress | None = None, damaged_ok: bool = False
    ) -> Backup:
        """Dump into output_dir/clinical-<UTC timestamp>.dump, checked, then keep the newest `keep` (all: None).

        With damaged_ok (a restore saving what it replaces), a dump without the
        clinical tables (a database that was never migrated) is kept all the same.
        """
        started = time.monotonic()
        bindir = self.programs()
        backup_folder(output_dir)
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        partial = output_dir / f".clinical-{stamp}.{os.getpid()}.partial"
        try:
            recordings = self._dump(bindir, partial, progress)
            fsync(partial)
            self.check_dump(partial, shown_as=None, clinical=not damaged_ok)
            final = publish(partial, output_dir, stamp, SUFFIX)
        finally:
            partial.unlink(missing_ok=True)
        if keep is not None:
            prune(output_dir, keep, spare=final, pattern=NAME_PATTERN)
        return Backup(final, final.stat().st_size, recordings, time.monotonic() - started)

    def _dump(self, bindir: Path, target: Path, progress: Progress | None) -> int:
        # pg_dump works in this transaction's snapshot, which stays open until it is done.
        try:
            with transaction.atomic(using=self.connection.alias), self.connection.cursor() as cursor:
                cursor.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
                cursor.execute("SELECT pg_export_snapshot()")
                snapshot = cursor.fetchone()[0]
                cursor.execute("SELECT to_regclass(%s) IS NOT NULL", [Recording._meta.db_table])
                recordings = 0
                if cursor.fetchone()[0]:
                    table = self.connection.ops.quote_name(Recording._meta.db_table)
                    cursor.execute(f"SELECT count(*) FROM {table}")  # noqa: S608 (a name from the model)
                    recordings = cursor.fetchone()[0]
                cursor.execute(
                    f"SELECT count(*) {TABLES_FROM} AND n.nspname <> 'information_schema' AND n.nspname !~ '^pg_'"
                )
                tables = cursor.fetchone()[0]
                self._run_dump(bindir, target, snapshot, tables, progress)
        except DatabaseError as exc:
            raise BackupError(f"The backup failed: {exc}. Nothing was written under a final name.") from exc
        return recordings

    def _run_dump(self, bindir: Path, target: Path, snapshot: str, tables: int, progress: Progress | None) -> None:
        command = [bindir / "pg_dump", "--format=custom", f"--snapshot={snapshot}", "--no-password", "--verbose"]
        dumping = subprocess.Popen(  # noqa: S603 (our arguments, no shell)
            [*command, f"--file={target}"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=self.environment(),
            text=True,
            errors="replace",
        )
        done, said = 0, []
        for line in dumping.stderr:
            if "dumping contents of table" in line:
                done = min(done + 1, tables)
                if progress:
                    progress(done, max(tables, 1))
            elif not line.startswith("pg_dump: ") or re.match(r"pg_dump: (error|detail|hint|warning):", line):
                said.append(line.strip())
        if dumping.wait() != 0:
            raise BackupError(f"The dump failed: {_said(said, 'pg_dump')}. Nothing was written under a final name.")
        if progress and done < tables:
            progress(tables, tables)

    def check_dump(self, path: Path, *, shown_as: Path | None, clinical: bool = True) -> set[str]:
        """Check that pg_restore reads the whole dump, and that it holds the clinical tables; the tables it fills.

        Messages name `shown_as` (an operator's file) when it is given, and speak of "the copy" otherwise.
        """
        tables = self._listed_tables(path, shown_as)
        if clinical and not CLINICAL_TABLES <= tables:
            if shown_as is not None:
                raise BackupError(
                    f"{shown_as} is a PostgreSQL backup, but not of a clinical database; it was not restored."
                )
            raise BackupError(
                f"The {self.describe()} holds no clinical tables: run `manage.py migrate` first, or check "
                "DATABASE_URL. Nothing was written under a final name."
            )
        # Reading every block decompresses it and checks its checksum: a damaged file fails here.
        done = self._run("pg_restore", f"--file={os.devnull}", str(path))
        if done.returncode != 0:
            what = f"{shown_as} is damaged" if shown_as else "The dump failed its check"
            end = "it was not restored" if shown_as else "it was discarded"
            raise BackupError(
                f"{what}: pg_restore could not read all of it ({_said(done.stderr, 'pg_restore')}); {end}."
            )
        return tables

    def _listed_tables(self, path: Path, shown_as: Path | None) -> set[str]:
        done = self._run("pg_restore", "--list", str(path))
        if done.returncode != 0:
            if shown_as is not None:
                said = _said(done.stderr, "pg_restore")
                raise BackupError(f"{shown_as} cannot be read by pg_restore ({said}); it was not restored.")
            raise BackupError(f"The dump failed its check ({_said(done.stderr, 'pg_restore')}); it was discarded.")
        # "3531; 0 16522 TABLE DATA public recordings_recording owner"
        return {match[1] for match in re.finditer(r"^\d+; \d+ \d+ TABLE DATA \S+ (\S+)(?: |$)", done.stdout, re.M)}

    # Restores

    @contextmanager
    def private_copy(self, file: Path, folder: Path) -> Iterator[tuple[Path, str]]:
        """(a private copy of `file` in `folder`, the SHA-256 of `file`); the copy is removed on the way out.

        The copy and the digest come from one read of one open file: what is
        restored is what was checked, whatever happens to `file` meanwhile.
        """
        if not file.is_file():
            raise BackupError(f"There is no file at {file}.")
        descriptor, name = tempfile.mkstemp(prefix=".clinical-restore-", suffix=SUFFIX, dir=backup_folder(folder))
        os.close(descriptor)
        copy = Path(name)
        try:
            identity, digest = identity_and_digest(file, copy_to=copy)
            if file_identity(file.stat()) != identity:
                raise BackupError(
                    f"{file} changed while it was being read; it was not restored: restore a file at rest."
                )
            yield copy, digest
        finally:
            copy.unlink(missing_ok=True)

    def inspect_restore_source(self, copy: Path, *, shown_as: Path) -> set[tuple[str, str]]:
        """Check a copy is a whole dump of a clinical database this code knows; its applied migrations."""
        magic = file_magic(copy)
        if magic.startswith(SQLITE_MAGIC):
            raise BackupError(
                f"{shown_as} is an SQLite database, and this database is PostgreSQL: restore it on SQLite "
                "(without DATABASE_URL), or copy an SQLite database into PostgreSQL with copydb; it was not restored."
            )
        if not magic.startswith(DUMP_MAGIC):
            raise BackupError(
                f"{shown_as} is not a PostgreSQL backup in pg_dump's custom format (what backupdb writes on "
                "PostgreSQL); it was not restored."
            )
        self.check_dump(copy, shown_as=shown_as)
        return known_migrations(self._applied_migrations(copy, shown_as), shown_as=shown_as)

    def _applied_migrations(self, path: Path, shown_as: Path) -> set[tuple[str, str]]:
        done = self._run("pg_restore", "--data-only", "--table=django_migrations", "--file=-", str(path))
        if done.returncode != 0:
            raise BackupError(
                f"Cannot read the migrations in {shown_as} ({_said(done.stderr, 'pg_restore')}); it was not restored."
            )
        return {(row["app"], row["name"]) for row in _copy_rows(done.stdout, "django_migrations")}

    def restore(self, copy: Path, *, secure: list[tuple[str, str, list]]) -> None:
        """Replace the database's tables with the dump's, then run `secure`, all in one transaction.

        Retried while the server holds locks. How many admin sessions the dump held is not known: None.
        """
        self.connection.ensure_connection()
        secured = "".join(
            # Where the table exists: an older backup may lack it. compose_sql quotes the values as literals.
            f"DO $$ BEGIN IF to_regclass('{table}') IS NOT NULL THEN "
            f"{self.connection.ops.compose_sql(statement, params)}; END IF; END $$;\n"
            for table, statement, params in secure
        ).encode()
        deadline = time.monotonic() + LOCK_PATIENCE
        delay = 0.05
        while True:
            failure = self._restore_once(copy, secured)
            if failure is None:
                return
            if not any(state in failure for state in RETRY_STATES):
                raise BackupError(f"The restore failed, and nothing of it was kept: {failure}.")
            if time.monotonic() > deadline:
                raise BackupError(
                    f"Other connections held the tables for {LOCK_PATIENCE:.0f} s without a pause, so nothing was "
                    "restored: look for a transaction left open (pg_stat_activity), or try again when it is quieter."
                )
            time.sleep(delay)
            delay = min(delay * 2, 1.0)

    def _restore_once(self, copy: Path, secured: bytes) -> str | None:
        """One attempt: None once committed, else what went wrong (nothing is committed then)."""
        bindir, env = self.programs(), self.environment()
        prelude = self._restore_prelude()
        with tempfile.TemporaryFile() as reader_said, tempfile.TemporaryFile() as writer_said:
            reader = subprocess.Popen(  # noqa: S603
                [bindir / "pg_restore", "--clean", "--if-exists", "--no-owner", "--file=-", str(copy)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=reader_said,
                env=env,
            )
            writer = subprocess.Popen(  # noqa: S603
                [bindir / "psql", *PSQL_OPTIONS, "--file=-"],
                stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                stderr=writer_said,
                env=env,
            )
            try:
                writer.stdin.write(prelude)
                shutil.copyfileobj(reader.stdout, writer.stdin, 1 << 20)
                # COMMIT only after pg_restore read the whole file: at an early end, psql's EOF rolls back.
                if reader.wait() == 0:
                    writer.stdin.write(self._restore_postlude(secured))
                writer.stdin.close()
            except BrokenPipeError:  # psql stopped at an error
                pass
            finally:
                reader.stdout.close()
                if reader.poll() is None:
                    reader.kill()
                reader.wait()
                _close_quietly(writer.stdin)
                writer.wait()
            if writer.returncode != 0:
                return _said(_read(writer_said), "psql")
            if reader.returncode != 0:
                return _said(_read(reader_said), "pg_restore")
        return None

    def _restore_prelude(self) -> bytes:
        quote = self.connection.ops.quote_name
        last = {name: rank for rank, name in enumerate(LOCK_LAST)}
        tables = sorted(self._tables(), key=lambda name: (name not in LOCK_FIRST, last.get(name, -1), name))
        schema = quote(self._schema())
        names = ", ".join(f"{schema}.{quote(name)}" for name in tables)
        lines = ["BEGIN;", f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT_MS}ms';"]
        if names:
            lines += [f"LOCK TABLE {names} IN ACCESS EXCLUSIVE MODE;", f"DROP TABLE {names} CASCADE;"]
        return ("\n".join(lines) + "\n").encode()

    def _restore_postlude(self, secured: bytes) -> bytes:
        ensure = ";\n".join(triggers_sql("postgresql"))
        ensure_seals = ";\n".join(triggers_sql("postgresql", SEAL_TABLE))
        return (
            b"RESET search_path;\n"
            + secured
            + (
                f"SELECT to_regclass('{AUDIT_TABLE}') IS NOT NULL AS audit_table \\gset\n"
                f"\\if :audit_table\n{ensure};\n\\endif\n"
                f"SELECT to_regclass('{SEAL_TABLE}') IS NOT NULL AS seal_table \\gset\n"
                f"\\if :seal_table\n{ensure_seals};\n\\endif\n"
                "COMMIT;\n"
            ).encode()
        )

    # Maintenance

    def sizes(self) -> list[tuple[str, int]]:
        with self.connection.cursor() as cursor:
            cursor.execute("SELECT pg_database_size(current_database())")
            return [("Database", cursor.fetchone()[0])]

    def maintain(self) -> None:
        """VACUUM (ANALYZE) every table this user owns; it runs beside the server's reads and writes."""
        try:
            with self.connection.cursor() as cursor:
                cursor.execute("VACUUM (ANALYZE)")
        except DatabaseError as exc:
            raise MaintenanceError(f"Maintenance stopped: {exc}. Try again when the server is less busy.") from exc

    # The client programs and how they connect

    def programs(self) -> Path:
        """The folder of pg_dump, pg_restore and psql, checked to be new enough for the server."""
        if self._bindir is None:
            try:
                server = self.connection.pg_version
            except DatabaseError as exc:
                raise BackupError(f"Cannot connect to the {self.describe()}: {exc}. Check DATABASE_URL.") from exc
            self._bindir = client_programs(_server_version(server))
        return self._bindir

    def environment(self) -> dict[str, str]:
        """This process's environment, with the connection settings as libpq's variables, for a child."""
        env = {key: value for key, value in os.environ.items() if key not in ("LC_ALL", "LANGUAGE")}
        env["LC_MESSAGES"] = "C"  # messages we show, and look for SQLSTATEs in, in English
        for key, variable in SETTINGS_VARIABLES.items():
            if self.settings.get(key):
                env[variable] = str(self.settings[key])
        for option, value in self.settings.get("OPTIONS", {}).items():
            if option in OPTION_VARIABLES and value is not None:
                env[OPTION_VARIABLES[option]] = str(value)
        return env

    def _run(self, program: str, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(  # noqa: S603
            [self.programs() / program, *args],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            errors="replace",
            env=self.environment(),
            check=False,
        )

    def _schema(self) -> str:
        with self.connection.cursor() as cursor:
            cursor.execute("SELECT current_schema()")
            return cursor.fetchone()[0]

    def _tables(self) -> list[str]:
        try:
            with self.connection.cursor() as cursor:
                cursor.execute(f"SELECT c.relname {TABLES_FROM} AND n.nspname = current_schema()")
                return [row[0] for row in cursor.fetchall()]
        except DatabaseError as exc:
            raise BackupError(f"Cannot read the {self.describe()}: {exc}.") from exc


def client_programs(server: tuple[int, ...]) -> Path:
    """The folder of the newest pg_dump found (with pg_restore and psql beside it); a BackupError if it is too old.

    CLINICAL_PG_BINDIR names the folder; otherwise `pg_config --bindir`, then PATH.
    """
    wanted = _shown(server)
    configured = getattr(settings, BINDIR_SETTING, None) or os.environ.get(BINDIR_SETTING, "")
    folders = [Path(configured)] if configured else _candidate_folders()
    found = [(version, folder) for folder in folders if (version := _dump_version(folder)) is not None]
    install = (
        f"install PostgreSQL {wanted}'s client programs or newer (Debian: apt-get install postgresql-client-{wanted})"
    )
    if not found:
        where = f"in {configured} ({BINDIR_SETTING})" if configured else "on this machine"
        raise BackupError(f"pg_dump is not installed {where}: {install}, or set {BINDIR_SETTING} to their folder.")
    version, folder = max(found)
    if version < server:
        raise BackupError(
            f"pg_dump {_shown(version)} (in {folder}) is older than the PostgreSQL {wanted} server, and cannot back "
            f"it up: {install}, and set {BINDIR_SETTING} to their folder if they are not found on their own."
        )
    missing = [name for name in ("pg_restore", "psql") if not os.access(folder / name, os.X_OK)]
    if missing:
        raise BackupError(f"{' and '.join(missing)} missing beside pg_dump in {folder}: {install}.")
    return folder


def _candidate_folders() -> list[Path]:
    folders = []
    pg_config = shutil.which("pg_config")
    if pg_config:
        done = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, check=False)  # noqa: S603
        if done.returncode == 0 and done.stdout.strip():
            folders.append(Path(done.stdout.strip()))
    on_path = shutil.which("pg_dump")
    if on_path:
        folders.append(Path(on_path).parent)
    return list(dict.fromkeys(folders))


def _dump_version(folder: Path) -> tuple[int, ...] | None:
    program = folder / "pg_dump"
    if not os.access(program, os.X_OK):
        return None
    try:
        done = subprocess.run([program, "--version"], capture_output=True, text=True, timeout=30, check=False)  # noqa: S603
    except (OSError, subprocess.TimeoutExpired):
        return None
    match = re.search(r"\(PostgreSQL\) (\d+)(?:\.(\d+))?", done.stdout)
    if match is None:
        return None
    major = int(match[1])
    return (major,) if major >= 10 else (major, int(match[2] or 0))


def _server_version(number: int) -> tuple[int, ...]:
    # 150018 is 15.18; 90624 is 9.6.24, whose major version is 9.6.
    major = number // 10000
    return (major,) if major >= 10 else (major, number // 100 % 100)


def _shown(version: tuple[int, ...]) -> str:
    return ".".join(map(str, version))


def _copy_rows(script: str, table: str) -> Iterator[dict[str, str]]:
    """The rows of `table` in a plain-format dump's COPY block, by column name."""
    lines = iter(script.splitlines())
    for line in lines:
        match = re.match(rf"COPY (?:\S+\.)?{re.escape(table)} \((.*)\) FROM stdin;$", line)
        if match is None:
            continue
        columns = [name.strip().strip('"') for name in match[1].split(",")]
        for row in lines:
            if row == "\\.":
                return
            yield dict(zip(columns, (_copy_text(value) for value in row.split("\t")), strict=True))


def _copy_text(value: str) -> str:
    # COPY's text format escapes backslash, tab, newline and carriage return.
    escapes = {"\\\\": "\\", "\\t": "\t", "\\n": "\n", "\\r": "\r"}
    return re.sub(r"\\[\\tnr]", lambda match: escapes[match[0]], value)


def _said(output, program: str) -> str:
    """What a program printed, on one line, for a message."""
    lines = output.splitlines() if isinstance(output, str) else output
    text = " ".join(line.strip() for line in lines if line.strip())
    return text or f"{program} said nothing more"


def _read(file) -> str:
    file.seek(0)
    return file.read().decode(errors="replace")


def _close_quietly(stream) -> None:
    try:
        stream.close()
    except BrokenPipeError:
        pass
