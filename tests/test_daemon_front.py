"""The daemon's token front (worker/assets/daemon-front), run as the sandbox runs it (python3 -I -S) on loopback in front
of a stand-in daemon that records what reaches it: the token is checked before anything is forwarded, one request per
connection, bodies and streams relayed whole and as they come. Its LLM relay, in front of a stand-in LLM endpoint
(plain, or TLS behind a CONNECT proxy): nothing relayed before a binding, which only the token holder can give, and
after it the agent's requests reach the bound endpoint with the bound headers instead of the agent's own."""

from __future__ import annotations

import base64
import contextlib
import http.client
import json
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path

import pytest

from tests.standins.server import free_port
from tests.standins.tls import self_signed

TOKEN = "front-test-token"
SCRIPT = resources.files("worker").joinpath("assets", "daemon-front")


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
            if self.path.endswith("/v1/events"):  # the relay puts its endpoint's path before it
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


def _serving(server: ThreadingHTTPServer) -> int:
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return int(server.server_address[1])


@contextlib.contextmanager
def _front(daemon_port: int, env: dict[str, str] | None = None) -> Iterator[tuple[int, int]]:
    """The front on a free port and its relay on another, in front of ``daemon_port``."""
    port, relay = free_port(), free_port()
    process = subprocess.Popen(
        [sys.executable, "-I", "-S", str(SCRIPT), str(port), str(daemon_port), str(relay)],
        env={"SANDBOX_WORKER_DAEMON_TOKEN": TOKEN, **(env or {})},
    )
    try:
        deadline = time.monotonic() + 10
        for listening in (port, relay):
            while True:
                try:
                    socket.create_connection(("127.0.0.1", listening), timeout=1).close()
                    break
                except OSError:
                    assert time.monotonic() < deadline, "the front did not listen"
                    time.sleep(0.01)
        yield port, relay
    finally:
        process.kill()
        process.wait()


@pytest.fixture(scope="module")
def front() -> Iterator[tuple[int, Daemon]]:
    daemon = Daemon()
    server = _stand_in(daemon)
    with _front(_serving(server)) as (port, _):
        yield port, daemon
    server.shutdown()


def _request(
    port: int,
    method: str,
    path: str,
    *,
    token: str | None = TOKEN,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    auth = {"Authorization": f"Bearer {token}"} if token is not None else {}
    connection.request(method, path, body=body, headers={**auth, **(headers or {})})
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
    argv = [sys.executable, "-I", "-S", str(SCRIPT), str(free_port()), "1", str(free_port())]
    result = subprocess.run(argv, env={}, capture_output=True, timeout=30, check=False)
    assert result.returncode != 0
    assert b"SANDBOX_WORKER_DAEMON_TOKEN is not set" in result.stderr


# -- the LLM relay ---------------------------------------------------------------------------------------------
BINDING = "/sandbox-worker/v1/llm-binding"
AGENT_HEADERS = {"x-api-key": "sandbox-worker-llm-relay", "anthropic-version": "2023-06-01"}


def _bind(port: int, base_url: str, headers: dict[str, str], *, token: str | None = TOKEN) -> int:
    body = json.dumps({"base_url": base_url, "headers": headers}).encode()
    _, response = _request(port, "PUT", BINDING, token=token, body=body)
    response.read()
    return response.status


def test_the_relay_answers_503_until_the_token_holder_binds_it() -> None:
    llm = Daemon()
    server = _stand_in(llm)
    llm_url = f"http://127.0.0.1:{_serving(server)}"
    with _front(free_port()) as (port, relay):
        _, response = _request(relay, "POST", "/v1/messages", token=None, body=b"{}", headers=AGENT_HEADERS)
        assert response.status == 503 and b"no LLM credential bound" in response.read()
        assert _bind(port, llm_url, {"x-api-key": "sk-tenant"}, token="wrong") == 401
        _, response = _request(relay, "POST", "/v1/messages", token=None, body=b"{}", headers=AGENT_HEADERS)
        assert response.status == 503
        assert llm.requests == []
        assert _bind(port, llm_url, {"x-api-key": "sk-tenant"}) == 204
        _, response = _request(relay, "POST", "/v1/messages", token=None, body=b"{}", headers=AGENT_HEADERS)
        assert response.status == 200
    assert [(method, path) for method, path, _, _ in llm.requests] == [("POST", "/v1/messages")]
    server.shutdown()


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        json.dumps({"base_url": "ftp://llm.test", "headers": {}}).encode(),
        json.dumps({"base_url": "http://llm.test", "headers": {"x-api-key": "a\r\nX-Injected: 1"}}).encode(),
        json.dumps({"base_url": "http://llm.test"}).encode(),
    ],
)
def test_a_malformed_binding_is_refused(front: tuple[int, Daemon], body: bytes) -> None:
    port, daemon = front
    before = len(daemon.requests)
    _, response = _request(port, "PUT", BINDING, body=body)
    assert response.status == 400
    assert len(daemon.requests) == before  # answered by the front, never the daemon's


def test_a_bound_relay_sends_the_agents_requests_on_with_the_bound_headers_instead_of_its_own() -> None:
    """To the bound endpoint under its path, the agent's key and host replaced, the body whole, a stream as it comes;
    directly, as NO_PROXY says, though the sandbox has a proxy (a dead one here)."""
    llm = Daemon()
    server = _stand_in(llm)
    llm_port = _serving(server)
    env = {"HTTPS_PROXY": f"http://127.0.0.1:{free_port()}", "NO_PROXY": "localhost,127.0.0.1"}
    with _front(free_port(), env) as (port, relay):
        assert _bind(port, f"http://127.0.0.1:{llm_port}/gateway/", {"Authorization": "Bearer sk-tenant"}) == 204
        body = b"m" * 300_000
        _, response = _request(relay, "POST", "/v1/messages?beta=true", token=None, body=body, headers=AGENT_HEADERS)
        assert (response.status, response.read()) == (200, b"300000")
        _, stream = _request(relay, "GET", "/v1/events", token=None, headers=AGENT_HEADERS)
        assert stream.status == 200 and stream.fp.readline() == b"data: one\n"
        llm.first_event_seen.set()
        assert stream.read().endswith(b"data: two\n\n")
    method, path, headers, received = llm.requests[0]
    assert (method, path, received) == ("POST", "/gateway/v1/messages?beta=true", body)
    assert headers["authorization"] == "Bearer sk-tenant" and "x-api-key" not in headers
    assert headers["host"] == f"127.0.0.1:{llm_port}" and headers["anthropic-version"] == "2023-06-01"
    assert headers["connection"] == "close"
    server.shutdown()


@dataclass
class TunnelProxy:
    """A CONNECT proxy that records each tunnel's request line and Proxy-Authorization, and opens every tunnel to
    ``target`` on loopback whatever host it names."""

    target: int
    tunnels: list[tuple[str, str]] = field(default_factory=list)

    def start(self) -> int:
        server = socket.create_server(("127.0.0.1", 0))
        threading.Thread(target=self._accept, args=(server,), daemon=True).start()
        return int(server.getsockname()[1])

    def _accept(self, server: socket.socket) -> None:
        while True:
            conn, _ = server.accept()
            threading.Thread(target=self._tunnel, args=(conn,), daemon=True).start()

    def _tunnel(self, conn: socket.socket) -> None:
        head = b""
        while b"\r\n\r\n" not in head:
            head += conn.recv(4096)
        lines = head.decode().split("\r\n")
        auth = next(
            (line.split(":", 1)[1].strip() for line in lines if line.lower().startswith("proxy-authorization")), ""
        )
        self.tunnels.append((lines[0], auth))
        upstream = socket.create_connection(("127.0.0.1", self.target))
        conn.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
        for source, sink in ((conn, upstream), (upstream, conn)):
            threading.Thread(target=_copy, args=(source, sink), daemon=True).start()


def _copy(source: socket.socket, sink: socket.socket) -> None:
    with contextlib.suppress(OSError):
        while data := source.recv(65536):
            sink.sendall(data)
        sink.shutdown(socket.SHUT_WR)


def test_the_relay_reaches_an_https_endpoint_through_the_sandboxs_proxy(tmp_path: Path) -> None:
    """CONNECT with the proxy's credential, then TLS checked against the CA store for the endpoint's name."""
    cert, key = self_signed(tmp_path, "llm.test")
    llm = Daemon()
    server = _stand_in(llm)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    proxy = TunnelProxy(_serving(server))
    env = {"HTTPS_PROXY": f"http://sandbox:pass%2Fword@127.0.0.1:{proxy.start()}", "SSL_CERT_FILE": str(cert)}
    with _front(free_port(), env) as (port, relay):
        assert _bind(port, "https://llm.test/api", {"x-api-key": "sk-tenant"}) == 204
        _, response = _request(relay, "POST", "/v1/messages", token=None, body=b"{}", headers=AGENT_HEADERS)
        assert (response.status, response.read()) == (200, b"2")
    assert proxy.tunnels == [
        ("CONNECT llm.test:443 HTTP/1.1", "Basic " + base64.b64encode(b"sandbox:pass/word").decode())
    ]
    method, path, headers, _ = llm.requests[0]
    assert (method, path, headers["host"], headers["x-api-key"]) == (
        "POST",
        "/api/v1/messages",
        "llm.test",
        "sk-tenant",
    )
    server.shutdown()
