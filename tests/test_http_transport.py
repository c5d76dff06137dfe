"""The daemons' HTTP transport (worker/http_transport.py) against real servers on loopback: keep-alive, what it never
reuses, bodies as they arrive, TLS, and httpx's exceptions where httpx's own transport raises them."""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from tests.standins.server import free_port
from tests.standins.tls import self_signed
from worker.http_transport import HTTPClientTransport

Handle = Callable[[BaseHTTPRequestHandler], None]


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    connections = 0


def _answer(handler: BaseHTTPRequestHandler, body: bytes, *, status: int = 200, close: bool = False) -> None:
    handler.send_response(status)
    handler.send_header("Content-Length", str(len(body)))
    handler.send_header("X-Seen", f"{handler.command} {handler.path}")
    if close:
        handler.send_header("Connection", "close")
    handler.end_headers()
    handler.wfile.write(body)


def _echo(handler: BaseHTTPRequestHandler) -> None:
    length = int(handler.headers.get("Content-Length") or 0)
    _answer(handler, handler.rfile.read(length) or b"empty")


@contextlib.contextmanager
def _serving(handle: Handle, *, tls: ssl.SSLContext | None = None) -> Iterator[_Server]:
    """An HTTP/1.1 server on loopback that counts the connections it accepted and answers each request by ``handle``."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def setup(self) -> None:
            server.connections += 1
            super().setup()

        def do_GET(self) -> None:
            handle(self)

        do_POST = do_GET

        def log_message(self, *args: object) -> None:
            return None

    server = _Server(("127.0.0.1", 0), Handler)
    if tls is not None:
        server.socket = tls.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def _url(server: _Server, path: str = "/", scheme: str = "http") -> str:
    return f"{scheme}://127.0.0.1:{server.server_address[1]}{path}"


def _send(transport: httpx.BaseTransport, method: str, url: str, **kwargs: object) -> httpx.Response:
    """As worker.daemon.DaemonClient sends: an httpx.Request straight to the transport, the body read and closed."""
    timeout = kwargs.pop("timeout", 5.0)
    request = httpx.Request(method, url, extensions={"timeout": httpx.Timeout(timeout).as_dict()}, **kwargs)  # type: ignore[arg-type]
    response = transport.handle_request(request)
    try:
        response.read()
    finally:
        response.close()
    return response


@pytest.fixture
def transport() -> Iterator[HTTPClientTransport]:
    transport = HTTPClientTransport(tls=ssl.create_default_context())
    yield transport
    transport.close()


def test_requests_to_one_server_share_one_kept_alive_connection(transport: HTTPClientTransport) -> None:
    with _serving(_echo) as server:
        for n in range(5):
            response = _send(transport, "POST", _url(server, f"/v1/acp/s?n={n}"), content=b'{"n": %d}' % n)
            assert (response.status_code, response.content) == (200, b'{"n": %d}' % n)
            assert response.headers["x-seen"] == f"POST /v1/acp/s?n={n}"
        assert _send(transport, "GET", _url(server)).content == b"empty"
        assert server.connections == 1


def test_a_connection_the_server_closes_is_not_reused(transport: HTTPClientTransport) -> None:
    """Closed by the server after its answer, with ``Connection: close`` or without a word (as a server does to a
    connection idle too long): the next request goes over a new connection and is answered."""

    def close_after(handler: BaseHTTPRequestHandler) -> None:
        said = handler.path == "/said"
        _answer(handler, b"bye", close=said)
        handler.close_connection = True

    with _serving(close_after) as server:
        for path in ("/said", "/said", "/unsaid", "/unsaid", "/said"):
            time.sleep(0.05)  # the unsaid close reaches the client before its next request
            assert _send(transport, "GET", _url(server, path)).content == b"bye"
        assert server.connections == 5


def test_a_body_not_read_to_its_end_closes_its_connection(transport: HTTPClientTransport) -> None:
    with _serving(lambda handler: _answer(handler, b"x" * 200_000)) as server:
        request = httpx.Request("GET", _url(server), extensions={"timeout": httpx.Timeout(5.0).as_dict()})
        response = transport.handle_request(request)
        assert next(response.iter_bytes())
        response.close()
        assert len(_send(transport, "GET", _url(server)).content) == 200_000
        assert server.connections == 2


def test_a_body_arrives_as_the_server_sends_it(transport: HTTPClientTransport) -> None:
    """A chunked stream (an event stream) is read chunk by chunk, not kept until its end."""
    go_on = threading.Event()

    def stream(handler: BaseHTTPRequestHandler) -> None:
        handler.send_response(200)
        handler.send_header("Transfer-Encoding", "chunked")
        handler.end_headers()
        for data in (b"data: 1\n\n", b"data: 2\n\n"):
            handler.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            handler.wfile.flush()
            go_on.wait(10)
        handler.wfile.write(b"0\r\n\r\n")

    with _serving(stream) as server:
        request = httpx.Request("GET", _url(server), extensions={"timeout": httpx.Timeout(5.0).as_dict()})
        response = transport.handle_request(request)
        chunks = response.iter_bytes()
        assert next(chunks) == b"data: 1\n\n"  # the server waits for this before it sends the rest
        go_on.set()
        assert b"".join(chunks) == b"data: 2\n\n"
        response.close()
        assert _send(transport, "GET", _url(server)).status_code == 200
        assert server.connections == 1  # read to its end: kept


def test_failures_raise_httpx_exceptions(transport: HTTPClientTransport) -> None:
    """As httpx's own transport raises them, so callers tell "not listening yet" from "took it, said nothing"."""

    def slow_or_short(handler: BaseHTTPRequestHandler) -> None:
        if handler.path == "/slow":
            time.sleep(1.0)
            _answer(handler, b"late")
        elif handler.path == "/short":
            handler.send_response(200)
            handler.send_header("Content-Length", "100")
            handler.end_headers()
            handler.wfile.write(b"ten bytes.")
            handler.close_connection = True
        else:
            handler.close_connection = True  # no answer at all

    with pytest.raises(httpx.ConnectError):
        _send(transport, "GET", f"http://127.0.0.1:{free_port()}/")
    with _serving(slow_or_short) as server:
        with pytest.raises(httpx.ReadTimeout):
            _send(transport, "GET", _url(server, "/slow"), timeout=0.2)
        with pytest.raises(httpx.RemoteProtocolError):
            _send(transport, "GET", _url(server, "/short"))
        with pytest.raises(httpx.RemoteProtocolError):
            _send(transport, "GET", _url(server, "/silent"))
    with pytest.raises(httpx.UnsupportedProtocol):
        _send(transport, "GET", "ftp://127.0.0.1/")


def test_idle_connections_are_kept_up_to_a_limit_and_for_a_while() -> None:
    transport = HTTPClientTransport(tls=ssl.create_default_context(), max_idle=2, idle_seconds=0.5)
    with _serving(_echo) as first, _serving(_echo) as second, _serving(_echo) as third:
        for server in (first, second, third, third):
            _send(transport, "GET", _url(server))
        _send(transport, "GET", _url(first))  # the oldest idle connection was closed for the third server's
        assert [server.connections for server in (first, second, third)] == [2, 1, 1]
        time.sleep(0.7)
        _send(transport, "GET", _url(second))  # idle for longer than half a second: closed
        assert second.connections == 2
    transport.close()


def test_https_is_verified_against_the_context_and_kept_alive(tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path, "127.0.0.1")
    server_side = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_side.load_cert_chain(cert, key)
    trusting = HTTPClientTransport(tls=ssl.create_default_context(cafile=str(cert)))
    untrusting = HTTPClientTransport(tls=ssl.create_default_context())
    with _serving(_echo, tls=server_side) as server:
        for _ in range(3):
            assert _send(trusting, "POST", _url(server, scheme="https"), content=b"sealed").content == b"sealed"
        assert server.connections == 1
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            _send(untrusting, "GET", _url(server, scheme="https"))
    trusting.close()
    untrusting.close()


def test_a_stream_blocked_in_a_read_ends_when_its_socket_is_shut_down(transport: HTTPClientTransport) -> None:
    """What worker.daemon does to end another thread's event stream at once: shut down the socket that the
    ``network_stream`` extension names."""

    def never_ends(handler: BaseHTTPRequestHandler) -> None:
        handler.send_response(200)
        handler.send_header("Transfer-Encoding", "chunked")
        handler.end_headers()
        handler.wfile.write(b"3\r\nhi\n\r\n")
        handler.wfile.flush()
        time.sleep(30)

    with _serving(never_ends) as server:
        request = httpx.Request("GET", _url(server), extensions={"timeout": httpx.Timeout(5.0, read=60).as_dict()})
        response = transport.handle_request(request)
        chunks = response.iter_bytes()
        assert next(chunks) == b"hi\n"
        ended = threading.Event()

        def read_on() -> None:
            with contextlib.suppress(httpx.TransportError):
                b"".join(chunks)
            ended.set()

        threading.Thread(target=read_on, daemon=True).start()
        sock = response.extensions["network_stream"].get_extra_info("socket")
        assert isinstance(sock, socket.socket)
        sock.shutdown(socket.SHUT_RDWR)
        assert ended.wait(10)
        response.close()
