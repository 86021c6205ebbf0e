"""A throwaway PostgreSQL server for the tests: initdb and pg_ctl into a temporary folder, on loopback only.

    python -m tests.postgres COMMAND...   # runs COMMAND with DATABASE_URL naming a fresh server's database

scripts/test runs the suite this way for PostgreSQL. The server runs from the
machine's own binaries (`pg_config --bindir`, else Debian's
/usr/lib/postgresql/*/bin), listens on 127.0.0.1 and a free port, trusts
local connections, and is removed with its folder when COMMAND ends.
PostgreSQL refuses to run as root: as root, it runs as the `postgres` user.
"""

import glob
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

DATABASE = "clinical"
SUPERUSER = "postgres"
START_TIMEOUT = 60


class ClusterError(RuntimeError):
    """The server could not be set up; the message says what to install or check."""


def bindir() -> Path:
    """Where initdb, pg_ctl, pg_dump and pg_restore are."""
    found = shutil.which("pg_config")
    if found:
        path = subprocess.run([found, "--bindir"], capture_output=True, text=True, check=False).stdout.strip()
        if path and (Path(path) / "initdb").exists():
            return Path(path)
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), reverse=True)
    if candidates:
        return Path(candidates[0]).parent
    raise ClusterError("PostgreSQL's server binaries are missing: apt-get install postgresql")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Cluster:
    """One PostgreSQL server in a folder of its own; `with Cluster() as cluster: cluster.url`."""

    def __init__(self) -> None:
        self.bin = bindir()
        self.folder = Path(tempfile.mkdtemp(prefix="clinical-pg-"))
        self.data = self.folder / "data"
        self.port = free_port()
        self.run_as = _unprivileged_user()

    @property
    def url(self) -> str:
        return self.url_for(DATABASE)

    def url_for(self, database: str) -> str:
        return f"postgres://{SUPERUSER}@127.0.0.1:{self.port}/{database}"

    def start(self) -> "Cluster":
        if self.run_as is not None:
            os.chown(self.folder, self.run_as.pw_uid, self.run_as.pw_gid)
        self._run("initdb", "-D", self.data, "-U", SUPERUSER, "--auth=trust", "-E", "UTF8", "--locale=C")
        # Test speed over durability: the tests kill app servers, never this one.
        options = (
            f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.folder} -c fsync=off "
            "-c synchronous_commit=off -c full_page_writes=off -c max_connections=300"
        )
        self.options = options
        self.resume()
        self.create_database(DATABASE)
        return self

    def pause(self) -> None:
        """Stop the server, keeping its data: clients see PostgreSQL down."""
        self._run("pg_ctl", "-D", self.data, "-m", "fast", "-w", "stop")

    def resume(self) -> None:
        log = self.folder / "server.log"
        self._run("pg_ctl", "-D", self.data, "-o", self.options, "-l", log, "-w", "-t", str(START_TIMEOUT), "start")

    def create_database(self, name: str) -> str:
        """A new empty database on this server; its URL."""
        self._run("createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", SUPERUSER, name)
        return self.url_for(name)

    def stop(self) -> None:
        if self.data.exists():
            self._run("pg_ctl", "-D", self.data, "-m", "immediate", "-w", "stop", check=False)
        shutil.rmtree(self.folder, ignore_errors=True)

    def __enter__(self) -> "Cluster":
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def _run(self, program: str, *args, check: bool = True) -> None:
        user = {} if self.run_as is None else {"user": self.run_as.pw_uid, "group": self.run_as.pw_gid}
        done = subprocess.run(
            [self.bin / program, *map(str, args)], capture_output=True, text=True, check=False, **user
        )
        if check and done.returncode != 0:
            raise ClusterError(f"{program} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")


def new_database(url: str, name: str, *, template: str | None = None) -> str:
    """Create database `name` (a copy of database `template`, if given) on the server `url` points at; its URL."""
    import psycopg

    copy = f' TEMPLATE "{template}"' if template else ""
    with psycopg.connect(url, autocommit=True) as connection:
        connection.execute(f'CREATE DATABASE "{name}"{copy}')
    return url.rsplit("/", 1)[0] + f"/{name}"


def _unprivileged_user():
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam(SUPERUSER)
    except KeyError as exc:
        raise ClusterError("PostgreSQL will not run as root, and there is no `postgres` user to run it as.") from exc


def main(command: list[str]) -> int:
    if not command:
        raise SystemExit("usage: python -m tests.postgres COMMAND...")
    with Cluster() as cluster:
        print(f"PostgreSQL for the tests at {cluster.url}", file=sys.stderr)
        return subprocess.run(command, env={**os.environ, "DATABASE_URL": cluster.url}, check=False).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
