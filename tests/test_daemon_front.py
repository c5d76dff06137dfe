"""The daemon's token front (worker/assets/daemon-front), run as the sandbox runs it (python3 -I -S) on loopback in front
of a stand-in daemon that records what reaches it: the token is checked before anything is forwarded, one request per
connection, bodies and streams relayed whole and as they come."""

from __future__ import annotations

import http.client
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources

import pytest

from tests.standins.server import free_port

TOKEN = "front-test-token"


@dataclass
class Daemon:
    """What reached the stand-in daemon, and a gate the streaming route waits on between its two events."""

    requests: list[tuple[str, str, dict[str, str], bytes]] = field(default_factory=list)
    first_event_seen: threading.Event = field(default_factory=threading.Event)


def _stand_in(daemon: Daemon) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _record(self) -> None:
            body = self.rfile.read(int(self.headers.get("content-length") or 0))
            daemon.requests.append((self.command, self.path, {k.lower(): v for k, v in self.headers.items()}, body))

        def do_GET(self) -> None:
            self._record()
            if self.path == "/v1/events":
                self.send_response(200)
                self.send_header("content-type", "text/event-stream")
                self.end_headers()
                self.wfile.write(b"data: one\n\n")
                self.wfile.flush()
                daemon.first_event_seen.wait(10)  # the client holds the first event before the second is written
                self.wfile.write(b"data: two\n\n")
                self.close_connection = True
                return
            body = b'{"status":"ok"}'
            self.send_response(200)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_POST(self) -> None:
            self._record()
            body = str(len(daemon.requests[-1][3])).encode()
            self.send_response(200)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_: object) -> None:
            pass

    return ThreadingHTTPServer(("127.0.0.1", 0), Handler)


@pytest.fixture(scope="module")
def front() -> Iterator[tuple[int, Daemon]]:
    daemon = Daemon()
    server = _stand_in(daemon)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = free_port()
    script = resources.files("worker").joinpath("assets", "daemon-front")
    process = subprocess.Popen(
        [sys.executable, "-I", "-S", str(script), str(port), str(server.server_address[1])],
        env={"SANDBOX_WORKER_DAEMON_TOKEN": TOKEN},
    )
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            assert time.monotonic() < deadline, "the front did not listen"
            time.sleep(0.01)
    yield port, daemon
    process.kill()
    process.wait()
    server.shutdown()


def _request(
    port: int, method: str, path: str, *, token: str | None = TOKEN, body: bytes | None = None
) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    connection.request(method, path, body=body, headers=headers)
    return connection, connection.getresponse()


@pytest.mark.parametrize("token", [None, "wrong", TOKEN + "x", ""])
def test_a_request_without_the_token_gets_401_and_reaches_nothing(front: tuple[int, Daemon], token: str | None) -> None:
    port, daemon = front
    before = len(daemon.requests)
    _, response = _request(port, "GET", "/v1/health", token=token)
    assert response.status == 401
    assert b"token_invalid" in response.read()
    assert len(daemon.requests) == before


def test_a_request_with_the_token_is_relayed_with_connection_close(front: tuple[int, Daemon]) -> None:
    port, daemon = front
    body = b"x" * 300_000  # several reads and writes each way
    _, response = _request(port, "POST", "/v1/acp/s1?agent=mock", body=body)
    assert (response.status, response.read()) == (200, b"300000")
    method, path, headers, received = daemon.requests[-1]
    assert (method, path, received) == ("POST", "/v1/acp/s1?agent=mock", body)
    assert headers["connection"] == "close"
    assert headers["authorization"] == f"Bearer {TOKEN}"


def test_one_request_per_connection(front: tuple[int, Daemon]) -> None:
    """A connection that proved the token once carries nothing more: an edge proxy may pool it across clients."""
    port, daemon = front
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        first = f"GET /v1/health HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\nConnection: keep-alive\r\n\r\n"
        second = "GET /v1/second HTTP/1.1\r\nHost: x\r\n\r\n"
        sock.sendall((first + second).encode())
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    assert received.count(b"HTTP/1.1 ") == 1
    assert "/v1/second" not in [path for _, path, _, _ in daemon.requests]


def test_a_stream_is_relayed_as_it_comes(front: tuple[int, Daemon]) -> None:
    """The daemon writes its second event only after the client has read the first: a buffering front would hang."""
    port, daemon = front
    _, response = _request(port, "GET", "/v1/events")
    assert response.status == 200
    assert response.fp.readline() == b"data: one\n"
    daemon.first_event_seen.set()
    assert response.read().endswith(b"data: two\n\n")


def test_an_oversized_head_is_dropped_unforwarded(front: tuple[int, Daemon]) -> None:
    port, daemon = front
    before = len(daemon.requests)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        head = f"GET / HTTP/1.1\r\nAuthorization: Bearer {TOKEN}\r\nX-Pad: {'a' * 200_000}\r\n\r\n".encode()
        try:
            sock.sendall(head)
            assert sock.recv(65536) == b""
        except ConnectionResetError:
            pass  # closed while we were still sending
    assert len(daemon.requests) == before


def test_the_front_refuses_to_start_without_a_token() -> None:
    script = resources.files("worker").joinpath("assets", "daemon-front")
    argv = [sys.executable, "-I", "-S", str(script), str(free_port()), "1"]
    result = subprocess.run(argv, env={}, capture_output=True, timeout=30, check=False)
    assert result.returncode != 0
    assert b"SANDBOX_WORKER_DAEMON_TOKEN is not set" in result.stderr
