"""Run uvicorn with the safe defaults for production: `python -m clinical.serve [uvicorn options]`.

scripts/serve and the tests' server processes both start the server this way,
so that what is tested is what runs. Options given after ours win.

With CLINICAL_REPLICA_URL set (SQLite), replication (`manage.py replicate`)
runs beside uvicorn as a child: started first, stopped last, after uvicorn
has finished its requests, so that Litestream ships their changes; if it
dies, the server stops too (and a supervisor restarts both).
"""

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

from uvicorn.main import main as uvicorn_command

from clinical.protocol import timeouts_from

BASE_DIR = Path(__file__).resolve().parent.parent
REPLICATION_STOP_SECONDS = 60


def uvicorn_args(environ=os.environ) -> list[str]:
    """The options we put before the caller's."""
    args = [
        "clinical.asgi:application",
        "--host",
        environ.get("HOST", "127.0.0.1"),
        "--port",
        environ.get("PORT", "8000"),
        # No access log: query strings can carry patient references.
        "--no-access-log",
        "--timeout-graceful-shutdown",
        "20",
        # httptools (uvicorn's default) with deadlines for request headers and
        # bodies: CLINICAL_HEADER_TIMEOUT_SECONDS, CLINICAL_BODY_IDLE_TIMEOUT_SECONDS,
        # CLINICAL_BODY_TIMEOUT_SECONDS. An `--http` given after ours drops them.
        "--http",
        "clinical.protocol:TimedHttpToolsProtocol",
    ]
    # The client's address comes from X-Forwarded-For (and the scheme from
    # X-Forwarded-Proto) only when the peer is a proxy we were told to trust;
    # uvicorn on its own would trust any process on this machine.
    proxies = environ.get("CLINICAL_TRUSTED_PROXIES", "").strip()
    args += ["--proxy-headers", "--forwarded-allow-ips", proxies] if proxies else ["--no-proxy-headers"]
    return args


class ReplicationBeside:
    """manage.py replicate as a child of the server: if it stops by itself, the server is stopped (SIGTERM)."""

    def __init__(self):
        from clinical.replication import stop_with_parent

        self.stopping = False
        self.died_with: int | None = None
        self.process = subprocess.Popen(  # noqa: S603 (our own command)
            [sys.executable, str(BASE_DIR / "manage.py"), "replicate"],
            cwd=BASE_DIR,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # a terminal's Ctrl-C stops uvicorn first; we stop replication after it
            preexec_fn=stop_with_parent,  # if this process is killed, replication still stops cleanly
        )
        threading.Thread(target=self._watch, name="replication", daemon=True).start()

    def _watch(self) -> None:
        code = self.process.wait()
        if not self.stopping:
            self.died_with = code
            print(f"scripts/serve: replication stopped (exit code {code}); stopping the server.", file=sys.stderr)
            os.kill(os.getpid(), signal.SIGTERM)

    def stop(self) -> None:
        self.stopping = True
        if self.process.poll() is None:
            self.process.terminate()  # Litestream ships what it has, then stops
            try:
                self.process.wait(timeout=REPLICATION_STOP_SECONDS)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def replication_beside() -> ReplicationBeside | None:
    """Start replication beside the server when a replica is configured and nothing replicates the database yet."""
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "clinical.settings")
    from django.conf import settings

    if not settings.CLINICAL_REPLICA_URL:
        return None
    if settings.DATABASE_URL:
        print(
            "scripts/serve: CLINICAL_REPLICA_URL is set, but the database is PostgreSQL, whose replication is its "
            "own (streaming replication, WAL archiving): Litestream is not started.",
            file=sys.stderr,
        )
        return None
    from clinical.replication import Replication

    if Replication(settings.DB_PATH).running_elsewhere():
        print(f"scripts/serve: replication of {settings.DB_PATH} runs already; not starting another.", file=sys.stderr)
        return None
    return ReplicationBeside()


class Stopped(BaseException):
    """A SIGTERM or SIGINT that uvicorn, once it has shut down, raises again to end the process."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _stopped(signum, frame) -> None:
    raise Stopped(signum)


def main(argv: list[str]) -> None:
    try:
        timeouts_from(os.environ)  # here, rather than as each worker's first connection fails
    except ValueError as exc:
        raise SystemExit(f"scripts/serve: {exc}") from None
    replication = replication_beside()
    if replication is None:
        uvicorn_command.main(args=[*uvicorn_args(), *argv], prog_name="scripts/serve")
        return
    # uvicorn takes SIGTERM and SIGINT while it serves, and raises the signal again once it has shut down,
    # through the handler it found: ours, which stops replication before the process ends the same way.
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, _stopped)
    received = None
    try:
        uvicorn_command.main(args=[*uvicorn_args(), *argv], prog_name="scripts/serve")
    except Stopped as stopped:
        received = stopped.signum
    finally:
        replication.stop()
    if replication.died_with is not None:
        raise SystemExit(1)
    if received is not None:
        signal.signal(received, signal.SIG_DFL)
        signal.raise_signal(received)


if __name__ == "__main__":
    main(sys.argv[1:])
