"""Deadlines for request headers and bodies (clinical/protocol.py), against a real server process over raw sockets.

Each test starts its own server with timeouts of a second or a few, through the
environment variables that scripts/serve reads.
"""

import http.client
import json
import socket
import subprocess
import sys
import time

import pytest

from tests.server import REPO_ROOT, Server, free_port

MIB = 1024 * 1024
CLOSE_WITHIN = 6.0  # seconds: well past the timeouts below, well short of "forever"


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    template = Server(tmp_path_factory.mktemp("template"))
    template.prepare("alice")
    return template


@pytest.fixture
def start_server(tmp_path, template, monkeypatch):
    """start_server(header=1, body_idle=1, body=3, args=()): a started server with these timeouts, in seconds."""
    servers = []

    def start(*, header=1, body_idle=1, body=3, args=()):
        monkeypatch.setenv("CLINICAL_HEADER_TIMEOUT_SECONDS", str(header))
        monkeypatch.setenv("CLINICAL_BODY_IDLE_TIMEOUT_SECONDS", str(body_idle))
        monkeypatch.setenv("CLINICAL_BODY_TIMEOUT_SECONDS", str(body))
        server = Server(tmp_path / f"server{len(servers)}", template=template, args=args)
        servers.append(server)
        server.start()
        return server

    yield start
    for server in servers:
        server.stop()


def connect(server: Server) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.port), timeout=10)


def request_head(method: str, path: str, *, length: int | None = None, token: str | None = None) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1"]
    if token:
        lines.append(f"Authorization: Bearer {token}")
    if length is not None:
        lines += ["Content-Type: application/json", f"Content-Length: {length}"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def read_until_closed(sock: socket.socket, within: float = CLOSE_WITHIN) -> bytes | None:
    """What the server sent before it closed the connection; None if still open after `within` seconds."""
    deadline = time.monotonic() + within
    received = b""
    while (left := deadline - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            return None
        except ConnectionResetError:
            return received
        if not chunk:
            return received
        received += chunk
    return None


def recording_body(size: int) -> bytes:
    return json.dumps({"patient_ref": "PAT-UPLOAD", "transcript": "x" * size}).encode()


@pytest.mark.parametrize("args", [(), ("--workers", "2")], ids=["one process", "two workers"])
def test_partial_headers_are_answered_408_and_closed(start_server, args):
    server = start_server(header=1, args=args)
    sock = connect(server)

    sock.sendall(b"POST /api/recordings HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-")
    answer = read_until_closed(sock)

    assert answer is not None
    assert answer.startswith(b"HTTP/1.1 408 ")
    assert b"connection: close" in answer.lower()


def test_headers_then_part_of_a_body_then_silence_is_closed(start_server):
    server = start_server(body_idle=1, body=30)
    token = server.login("alice")
    sock = connect(server)

    sock.sendall(request_head("POST", "/api/recordings", length=1000, token=token) + b'{"patient_ref": ')
    answer = read_until_closed(sock)

    assert answer is not None
    assert answer.startswith(b"HTTP/1.1 408 ")


def test_a_trickling_body_is_closed_at_the_body_deadline(start_server):
    server = start_server(body_idle=1, body=3)
    token = server.login("alice")
    sock = connect(server)
    sock.sendall(request_head("POST", "/api/recordings", length=1000, token=token))
    answer, trickle_until = None, time.monotonic() + 3 * CLOSE_WITHIN

    while answer is None and time.monotonic() < trickle_until:
        try:
            sock.sendall(b" ")  # a byte every 0.3 s: never idle for the idle timeout
        except OSError:
            answer = b""
            break
        answer = read_until_closed(sock, within=0.3)

    assert answer is not None
    assert answer == b"" or answer.startswith(b"HTTP/1.1 408 ")


def test_a_slow_steady_upload_succeeds_while_a_stalled_one_is_closed(start_server):
    server = start_server(body_idle=1, body=20)
    token = server.login("alice")
    body = recording_body(200_000)
    stalled = connect(server)
    stalled.sendall(request_head("POST", "/api/recordings", length=len(body), token=token) + body[:1000])
    slow = connect(server)
    slow.sendall(request_head("POST", "/api/recordings", length=len(body), token=token))

    for start in range(0, len(body), 10_000):  # about 3 s in all, three times the idle timeout
        time.sleep(0.15)
        slow.sendall(body[start : start + 10_000])
    response = http.client.HTTPResponse(slow, method="POST")
    response.begin()
    created = json.loads(response.read())
    stalled_answer = read_until_closed(stalled)

    assert response.status == 201
    assert len(created["transcript"]) == 200_000
    assert stalled_answer is not None
    assert stalled_answer.startswith(b"HTTP/1.1 408 ")


def test_keep_alive_serves_ordinary_requests_and_times_out_a_late_next_one(start_server):
    server = start_server(header=1, body_idle=1, body=3)
    token = server.login("alice")
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    statuses, ports = [], set()

    for method, path, body in [
        ("GET", "/api/health", None),
        ("POST", "/api/recordings", recording_body(490_000)),  # past uvicorn's 64 KiB read buffer
        ("GET", "/api/recordings", None),
        ("GET", "/api/health", None),
    ]:
        connection.request(method, path, body=body, headers=headers)
        response = connection.getresponse()
        response.read()
        statuses.append(response.status)
        ports.add(connection.sock.getsockname()[1])
    connection.sock.sendall(b"GET /api/hea")  # the first bytes of a request that never ends
    answer = read_until_closed(connection.sock)

    assert statuses == [200, 201, 200, 200]
    assert len(ports) == 1
    assert answer is not None
    assert answer.startswith(b"HTTP/1.1 408 ")


def test_many_stalled_connections_are_all_closed_and_the_server_still_answers(start_server):
    server = start_server(header=1, body_idle=1, body=3)
    silent = [connect(server) for _ in range(10)]
    partial_headers = [connect(server) for _ in range(10)]
    for sock in partial_headers:
        sock.sendall(b"GET /api/health HTTP/1.1\r\nHost: 127.0.0.1\r\n")
    nearly_full_bodies = [connect(server) for _ in range(10)]
    for sock in nearly_full_bodies:  # the review's attack: a body of 2 MiB less one byte, then silence
        sock.sendall(request_head("POST", "/api/recordings", length=2 * MIB) + b"x" * (2 * MIB - 1))

    answers = [read_until_closed(sock) for sock in silent + partial_headers + nearly_full_bodies]
    health = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    health.request("GET", "/api/health")

    assert answers[:10] == [b""] * 10  # a connection that never spoke gets no answer
    assert all(answer is not None and answer.startswith(b"HTTP/1.1 408 ") for answer in answers[10:])
    assert health.getresponse().status == 200


def test_serve_refuses_a_timeout_that_is_not_a_positive_number(tmp_path):
    env = Server(tmp_path).env | {"CLINICAL_BODY_TIMEOUT_SECONDS": "two minutes"}

    done = subprocess.run(
        [sys.executable, "-m", "clinical.serve", "--port", str(free_port())],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )

    assert done.returncode != 0
    assert "CLINICAL_BODY_TIMEOUT_SECONDS must be a positive number of seconds" in done.stderr


def test_a_client_that_stops_reading_its_answer_is_cut_off(start_server, monkeypatch):
    monkeypatch.setenv("CLINICAL_SEND_TIMEOUT_SECONDS", "1")
    # An answer of about 12 MB, three times what the kernel may buffer for a socket here
    # (net.ipv4.tcp_wmem's 4 MB): a page of 3 MB sometimes fitted whole in the buffers.
    monkeypatch.setenv("CLINICAL_PAGE_BUDGET_BYTES", str(64 * 2**20))
    server = start_server()
    token = server.login("alice")
    with server.client(token) as client:
        for number in range(8):
            big = {"patient_ref": f"PAT-{number}", "transcript": "x" * 500_000, "error": "y" * 1_000_000}
            assert client.post("/recordings", json=big).status_code == 201
    stalled = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # the answer cannot all sit in our buffer
    stalled.connect(("127.0.0.1", server.port))
    stalled.sendall(request_head("GET", "/api/recordings?limit=200", token=token))

    time.sleep(3)  # reading nothing, past the send timeout
    received = read_until_closed(stalled, within=CLOSE_WITHIN)
    with server.client(token) as client:
        whole = client.get("/recordings?limit=200")

    assert received is not None  # closed, not still open
    assert len(received) < len(whole.content)
    assert whole.status_code == 200
    assert len(whole.json()["items"]) == 8
