"""How scripts/serve runs the server (clinical/serve.py): proxy headers only from trusted proxies."""

import pytest

from clinical.serve import uvicorn_args
from tests.server import PASSWORD, Server

FORGED = ["not-an-ip<script>", "198.51.100.7", "2001:db8::66"]


def failed_login_addresses(server: Server) -> list:
    rows = server.query("SELECT client_ip FROM clinical_auditevent WHERE action = 'login_failed' ORDER BY id")
    return [None if row[0] is None else str(row[0]) for row in rows]


def login(client, forwarded_for: str, password: str = "wrong"):
    return client.post(
        "/auth/token", json={"username": "alice", "password": password}, headers={"X-Forwarded-For": forwarded_for}
    )


def test_by_default_x_forwarded_for_is_ignored(tmp_path, monkeypatch):
    monkeypatch.delenv("CLINICAL_TRUSTED_PROXIES", raising=False)
    server = Server(tmp_path)
    server.prepare("alice")

    with server, server.client() as client:
        answers = [login(client, forged).status_code for forged in FORGED]

    assert answers == [401] * len(FORGED)
    assert failed_login_addresses(server) == ["127.0.0.1"] * len(FORGED)


def test_new_forged_addresses_do_not_reset_the_per_address_count(tmp_path, monkeypatch):
    monkeypatch.delenv("CLINICAL_TRUSTED_PROXIES", raising=False)
    monkeypatch.setenv("CLINICAL_LOGIN_MAX_FAILURES_PER_USER", "1000")
    server = Server(tmp_path)
    server.prepare("alice")

    with server, server.client() as client:
        answers = [login(client, f"198.51.100.{number}").status_code for number in range(21)]
        right_password = login(client, "198.51.100.200", PASSWORD)

    assert answers == [401] * 20 + [429]
    assert right_password.status_code == 429


def test_a_trusted_proxys_client_address_is_recorded_and_garbage_is_not(tmp_path, monkeypatch):
    monkeypatch.setenv("CLINICAL_TRUSTED_PROXIES", "127.0.0.1")
    server = Server(tmp_path)
    server.prepare("alice")

    with server, server.client() as client:
        for forged in FORGED:
            login(client, forged)

    assert failed_login_addresses(server) == [None, "198.51.100.7", "2001:db8::66"]


@pytest.mark.parametrize(
    ("proxies", "expected"),
    [
        ("", ["--no-proxy-headers"]),
        ("  ", ["--no-proxy-headers"]),
        ("10.0.0.5,10.0.0.6", ["--proxy-headers", "--forwarded-allow-ips", "10.0.0.5,10.0.0.6"]),
    ],
)
def test_proxy_headers_are_trusted_only_from_the_configured_proxies(proxies, expected):
    args = uvicorn_args({"CLINICAL_TRUSTED_PROXIES": proxies})

    assert all(arg in args for arg in expected)
    assert ("--proxy-headers" in args) == bool(proxies.strip())
