"""Health on PostgreSQL: 503 while the database is down, 200 again by itself when it is back."""

import time

import httpx
import pytest

from tests.postgres import Cluster
from tests.server import Server

pytestmark = pytest.mark.postgresql_only
RECOVERY = 30.0


def health(server: Server) -> httpx.Response:
    return httpx.get(f"{server.url}/api/health", timeout=10)


def test_health_follows_postgresql_down_and_back(tmp_path):
    with Cluster() as cluster:
        server = Server(tmp_path, database_url=cluster.url)
        server.prepare("alice")
        with server:
            token = server.login("alice")
            up = health(server)

            cluster.pause()
            down = health(server)
            with server.client(token) as client:
                refused = client.post("/recordings", json={"patient_ref": "PAT-1"})

            cluster.resume()
            deadline, back = time.monotonic() + RECOVERY, None
            while time.monotonic() < deadline:
                back = health(server)
                if back.status_code == 200:
                    break
                time.sleep(0.2)
            with server.client(token) as client:
                created = client.post("/recordings", json={"patient_ref": "PAT-2"})

    assert (up.status_code, up.json()["engine"]) == (200, "postgresql")
    assert "journal_mode" not in up.json()
    assert (down.status_code, down.json()["status"]) == (503, "unavailable")
    assert (refused.status_code, refused.headers["retry-after"]) == (503, "5")
    assert back.status_code == 200
    assert created.status_code == 201
    assert "Internal Server Error" not in server.log_text()  # 503s, logged as the database unavailable


def test_health_is_503_on_an_unmigrated_database(tmp_path):
    with Cluster() as cluster:
        server = Server(tmp_path, database_url=cluster.create_database("empty"))

        response = server.start(healthy=False)
        server.stop()

    assert response.status_code == 503
    assert response.json()["pending_migrations"] > 0
