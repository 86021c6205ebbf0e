"""A real server process (uvicorn, as scripts/serve runs it) on a free port with its own SQLite file."""

import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import uuid
from contextlib import closing
from pathlib import Path

import httpx

from tests.postgres import new_database

REPO_ROOT = Path(__file__).resolve().parent.parent
SECRET_KEY = "server-process-tests-only-" + "k" * 40
PASSWORD = "correct-horse-battery-staple"
START_TIMEOUT = 30.0
STOP_GRACE = 10.0
LOG_TAIL = 4000

# The stored hash names its own algorithm and iteration count, so the server
# checks it with its stock PBKDF2 hasher; 1,000 rounds keep a login cheap.
CREATE_USERS = """
import sys
import django
django.setup()
from django.contrib.auth import get_user_model
from django.contrib.auth.hashers import PBKDF2PasswordHasher, make_password

class QuickPBKDF2(PBKDF2PasswordHasher):
    iterations = 1000

password, iterations, *usernames = sys.argv[1:]
QuickPBKDF2.iterations = int(iterations)
for username in usernames:
    get_user_model().objects.create(username=username, password=make_password(password, hasher=QuickPBKDF2()))
"""


class ServerError(RuntimeError):
    """The server could not be prepared, started or stopped; the message carries its log tail."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def clone_database(source: Path, target: Path) -> None:
    """A consistent copy of a SQLite file, through SQLite's online backup API."""
    with closing(sqlite3.connect(source)) as original, closing(sqlite3.connect(target)) as copy:
        original.backup(copy)


class Server:
    """One uvicorn process over one database file; start and stop it as often as a test needs.

    server = Server(tmp_path)
    server.prepare("alice")        # migrate, then create the users
    with server:                   # start, wait for a healthy /api/health; SIGTERM on the way out
        token = server.login("alice")
    """

    def __init__(
        self,
        directory: Path,
        *,
        db_path: Path | None = None,
        database_url: str | None = None,
        template: "Server | None" = None,
        args: tuple[str, ...] = (),
    ):
        """On SQLite (db_path, or directory/clinical.db), or on the PostgreSQL database `database_url` names.

        When the suite itself runs on PostgreSQL (DATABASE_URL), a server given
        neither gets a fresh database of its own on that server. With a
        `template` (a prepared, stopped server), it starts from a copy of that
        server's database, on the template's engine: migrating costs seconds.
        """
        self.directory = Path(directory)
        if template is not None and template.database_url is not None:
            name = f"server_{uuid.uuid4().hex[:16]}"
            database_url = new_database(template.database_url, name, template=template.database_url.rsplit("/", 1)[1])
        elif database_url is None and db_path is None and template is None and os.environ.get("DATABASE_URL"):
            database_url = new_database(os.environ["DATABASE_URL"], f"server_{uuid.uuid4().hex[:16]}")
        self.database_url = database_url
        self.args = tuple(args)  # more uvicorn options, such as ("--workers", "2")
        self.directory.mkdir(parents=True, exist_ok=True)
        self.db_path = Path(db_path) if db_path is not None else self.directory / "clinical.db"
        self.log_path = self.directory / "server.log"
        if template is not None and template.database_url is None:
            clone_database(template.db_path, self.db_path)
        self.process: subprocess.Popen | None = None
        self.port: int | None = None
        self.starts = 0
        self._log_offset = 0

    @property
    def env(self) -> dict[str, str]:
        env = {key: value for key, value in os.environ.items() if key not in ("DJANGO_DEBUG", "DATABASE_URL")}
        env.update(
            DJANGO_SETTINGS_MODULE="clinical.settings",
            DJANGO_SECRET_KEY=SECRET_KEY,
            CLINICAL_DB_PATH=str(self.db_path),
            PYTHONUNBUFFERED="1",
        )
        if self.database_url is not None:
            env["DATABASE_URL"] = self.database_url
        return env

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def wal_path(self) -> Path:
        return self.db_path.with_name(self.db_path.name + "-wal")

    @property
    def shm_path(self) -> Path:
        return self.db_path.with_name(self.db_path.name + "-shm")

    @property
    def engine(self) -> str:
        return "sqlite" if self.database_url is None else "postgresql"

    def query(self, statement: str, params=()) -> list[tuple]:
        """Rows of one statement (%s placeholders) on the server's database, whichever the engine."""
        if self.database_url is None:
            with closing(sqlite3.connect(self.db_path)) as db, db:
                return db.execute(statement.replace("%s", "?"), params).fetchall()
        import psycopg

        with psycopg.connect(self.database_url, autocommit=True) as db:
            cursor = db.execute(statement, params)
            return cursor.fetchall() if cursor.description else []

    # Preparing the database

    def migrate(self) -> None:
        self._run([sys.executable, "manage.py", "migrate", "--noinput"])

    def create_users(self, *usernames: str, password: str = PASSWORD, iterations: int = 1000) -> None:
        self._run([sys.executable, "-c", CREATE_USERS, password, str(iterations), *usernames])

    def prepare(self, *usernames: str, password: str = PASSWORD, iterations: int = 1000) -> None:
        """A migrated database file with these users, each with `password` (hashed with this many PBKDF2 rounds)."""
        self.migrate()
        if usernames:
            self.create_users(*usernames, password=password, iterations=iterations)

    def manage(self, *args: str) -> subprocess.CompletedProcess:
        """`manage.py *args` on this server's database, output captured as text."""
        command = [sys.executable, "manage.py", *args]
        return subprocess.run(command, cwd=REPO_ROOT, env=self.env, capture_output=True, text=True, timeout=300)

    def _run(self, command: list[str]) -> None:
        done = subprocess.run(command, cwd=REPO_ROOT, env=self.env, capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise ServerError(f"{command[1:3]} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")

    # The process

    def start(self, *, healthy: bool = True, timeout: float = START_TIMEOUT) -> httpx.Response:
        """Start uvicorn and wait until /api/health answers (200 when healthy); returns that answer."""
        if self.running:
            raise ServerError("The server is already running.")
        for _ in range(3):  # another process may take the free port before uvicorn binds it
            self._spawn()
            try:
                return self._wait_until_answering(healthy=healthy, timeout=timeout)
            except ServerError:
                if self.process.poll() is None or "address already in use" not in self.log_since_start().lower():
                    self.kill()
                    raise
        raise ServerError(f"No free port found.\n{self.log_tail()}")

    def _spawn(self) -> None:
        self.port = free_port()
        self.starts += 1
        with self.log_path.open("ab") as log:
            self._log_offset = log.tell()
            log.write(f"--- start {self.starts} on port {self.port}\n".encode())
            log.flush()
            self.process = subprocess.Popen(
                # What scripts/serve runs, with its safe defaults (clinical/serve.py).
                [sys.executable, "-m", "clinical.serve", "--host", "127.0.0.1", "--port", str(self.port), *self.args],
                cwd=REPO_ROOT,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a Ctrl-C in pytest does not reach it; we stop it ourselves
            )

    def _wait_until_answering(self, *, healthy: bool, timeout: float) -> httpx.Response:
        deadline = time.monotonic() + timeout
        last = "no answer"
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServerError(f"The server exited with {self.process.returncode}.\n{self.log_tail()}")
            try:
                response = httpx.get(f"{self.url}/api/health", timeout=2)
            except httpx.TransportError as exc:
                last = repr(exc)
            else:
                if response.status_code == 200 or not healthy:
                    return response
                last = f"{response.status_code} {response.text}"
            time.sleep(0.05)
        raise ServerError(f"/api/health not ready after {timeout} s (last: {last}).\n{self.log_tail()}")

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, *, grace: float = STOP_GRACE) -> int | None:
        """SIGTERM, then SIGKILL after `grace` seconds; the exit code (negative: killed by that signal)."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def kill(self) -> int | None:
        """SIGKILL: a crash, with no chance to close the database."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        return self.process.returncode

    def __enter__(self) -> "Server":
        self.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    # Talking to it

    def client(self, token: str | None = None, **kwargs) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=f"{self.url}/api", headers=headers, timeout=30, **kwargs)

    def async_client(self, token: str | None = None, **kwargs) -> httpx.AsyncClient:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.AsyncClient(base_url=f"{self.url}/api", headers=headers, timeout=60, **kwargs)

    def login(self, username: str, password: str = PASSWORD) -> str:
        """A bearer token from POST /api/auth/token."""
        response = httpx.post(
            f"{self.url}/api/auth/token", json={"username": username, "password": password}, timeout=30
        )
        if response.status_code != 201:
            raise ServerError(f"Login as {username} answered {response.status_code}: {response.text}")
        return response.json()["token"]

    # Its log

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_since_start(self) -> str:
        if not self.log_path.exists():
            return ""
        with self.log_path.open("rb") as log:
            log.seek(self._log_offset)
            return log.read().decode(errors="replace")

    def log_tail(self, size: int = LOG_TAIL) -> str:
        return f"--- server log tail ({self.log_path}):\n{self.log_text()[-size:]}"
