"""Run uvicorn with the safe defaults for production: `python -m clinical.serve [uvicorn options]`.

scripts/serve and the tests' server processes both start the server this way,
so that what is tested is what runs. Options given after ours win.
"""

import os
import sys

from uvicorn.main import main as uvicorn_command

from clinical.protocol import timeouts_from


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


def main(argv: list[str]) -> None:
    try:
        timeouts_from(os.environ)  # here, rather than as each worker's first connection fails
    except ValueError as exc:
        raise SystemExit(f"scripts/serve: {exc}") from None
    uvicorn_command.main(args=[*uvicorn_args(), *argv], prog_name="scripts/serve")


if __name__ == "__main__":
    main(sys.argv[1:])
