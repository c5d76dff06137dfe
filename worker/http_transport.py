"""An httpx transport over the standard library's ``http.client``, for the worker's requests to daemons.

Every session says four things to its daemon (``initialize``, the event stream, ``session/new``, the prompt), so the
cost of one request is paid four times per session. Measured on the 2-core benchmark machine, one small POST to a
loopback server costs ~1.4 ms of CPU through httpx's own transport (httpcore and h11) and ~0.7 ms through
``http.client``; in the orchestration benchmark's A/B (bench/ceiling.py) this transport took a fifth off the worker's
CPU per session. The rest of the worker keeps httpx's interface: requests and responses are httpx's, and this
transport raises httpx's exceptions, as its own transport would in each case.

What it does not do, because a daemon's requests do not need it: proxies (a proxied daemon goes through httpx's own
transport, see worker.daemon.pool_for), HTTP/2, compression, redirects. Keep-alive follows httpcore's defaults: idle
connections are kept up to :data:`MAX_IDLE` in all, each for :data:`IDLE_SECONDS`, and one the server closed while
idle is never reused.
"""

from __future__ import annotations

import collections
import contextlib
import http.client
import select
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx

MAX_IDLE = 20  # connections kept open between requests, over every daemon (httpx's default keep-alive limit)
IDLE_SECONDS = 5.0  # how long an idle connection is kept (httpcore's keepalive_expiry)
_CHUNK = 65536

Origin = tuple[str, str, int]


@contextlib.contextmanager
def _mapped(
    request: httpx.Request, timeout: type[httpx.TimeoutException], failed: type[httpx.TransportError]
) -> Iterator[None]:
    """http.client's and the socket's exceptions as httpx's transport raises them, in one phase of a request:
    connecting, writing or reading."""
    try:
        yield
    except TimeoutError as exc:
        raise timeout(str(exc) or "timed out", request=request) from exc
    except http.client.HTTPException as exc:  # RemoteDisconnected too: the server closed without answering
        raise httpx.RemoteProtocolError(str(exc) or type(exc).__name__, request=request) from exc
    except OSError as exc:
        raise failed(str(exc) or type(exc).__name__, request=request) from exc


class _Socket:
    """The response extension ``network_stream`` as httpx's transport gives it: what worker.daemon reads of it is
    the socket, to shut down a stream that another thread blocks on."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock

    def get_extra_info(self, name: str) -> Any:
        return self._sock if name == "socket" else None


class _Body(httpx.SyncByteStream):
    """A response body as it arrives; the connection goes back to the transport when the body was read to its end
    and the server keeps it open, and is closed otherwise."""

    def __init__(
        self,
        transport: HTTPClientTransport,
        origin: Origin,
        connection: http.client.HTTPConnection,
        response: http.client.HTTPResponse,
        request: httpx.Request,
    ) -> None:
        self._transport, self._origin, self._connection = transport, origin, connection
        self._response, self._request = response, request
        self._complete = self._closed = False

    def __iter__(self) -> Iterator[bytes]:
        response = self._response
        while True:
            with _mapped(self._request, httpx.ReadTimeout, httpx.ReadError):
                chunk = response.read1(_CHUNK)
            if chunk:
                yield chunk
                continue
            if response.length:  # read1 answers b"" at an early end of a body of known length
                raise httpx.RemoteProtocolError(
                    "the server closed the connection before the end of the body", request=self._request
                )
            self._complete = True
            return

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._response.close()
        if self._complete and not self._response.will_close:
            self._transport.check_in(self._origin, self._connection)
        else:
            self._connection.close()


class HTTPClientTransport(httpx.BaseTransport):
    """Direct HTTP/1.1 (and HTTPS with ``tls``) to any origin, over keep-alive ``http.client`` connections shared by
    the process's threads (each connection serves one request at a time)."""

    def __init__(self, *, tls: ssl.SSLContext, max_idle: int = MAX_IDLE, idle_seconds: float = IDLE_SECONDS) -> None:
        self._tls = tls
        self._max_idle, self._idle_seconds = max_idle, idle_seconds
        # Oldest first: (origin, connection, when it went idle).
        self._idle: collections.deque[tuple[Origin, http.client.HTTPConnection, float]] = collections.deque()
        self._lock = threading.Lock()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        url = request.url
        scheme = url.scheme
        if scheme not in ("http", "https"):
            raise httpx.UnsupportedProtocol(f"unsupported URL scheme {scheme!r}", request=request)
        origin = (scheme, url.host, url.port or (443 if scheme == "https" else 80))
        timeouts = request.extensions.get("timeout") or {}
        body = request.read()
        connection = self._check_out(origin)
        try:
            if connection.sock is None:
                connection.timeout = timeouts.get("connect")
                with _mapped(request, httpx.ConnectTimeout, httpx.ConnectError):
                    connection.connect()
            sock: socket.socket = connection.sock
            with _mapped(request, httpx.WriteTimeout, httpx.WriteError):
                sock.settimeout(timeouts.get("write"))
                # httpx's request carries its own Host and Content-Length headers: send exactly those.
                connection.putrequest(
                    request.method, url.raw_path.decode("ascii"), skip_host=True, skip_accept_encoding=True
                )
                for name, value in request.headers.raw:
                    connection.putheader(name, value)
                connection.endheaders(body or None)
            with _mapped(request, httpx.ReadTimeout, httpx.ReadError):
                sock.settimeout(timeouts.get("read"))
                response = connection.getresponse()
        except BaseException:
            connection.close()
            raise
        headers = [(name.encode("latin-1"), value.encode("latin-1")) for name, value in response.getheaders()]
        return httpx.Response(
            response.status,
            headers=headers,
            stream=_Body(self, origin, connection, response, request),
            extensions={
                "http_version": b"HTTP/1.1" if response.version == 11 else b"HTTP/1.0",
                "reason_phrase": response.reason.encode("latin-1"),
                "network_stream": _Socket(sock),
            },
        )

    def _check_out(self, origin: Origin) -> http.client.HTTPConnection:
        """An idle connection to ``origin`` the server has not closed, the most recent first; else a new one (not
        connected yet)."""
        stale: list[http.client.HTTPConnection] = []
        found = None
        with self._lock:
            self._expire(time.monotonic(), stale)
            for index in range(len(self._idle) - 1, -1, -1):
                if self._idle[index][0] == origin:
                    found = self._idle[index][1]
                    del self._idle[index]
                    break
        for connection in stale:
            connection.close()
        if found is not None:
            if not _closed_by_peer(found):
                return found
            found.close()
        if origin[0] == "https":
            return http.client.HTTPSConnection(origin[1], origin[2], context=self._tls)
        return http.client.HTTPConnection(origin[1], origin[2])

    def check_in(self, origin: Origin, connection: http.client.HTTPConnection) -> None:
        """``connection`` is idle again, its last response read to its end."""
        stale: list[http.client.HTTPConnection] = []
        now = time.monotonic()
        with self._lock:
            self._idle.append((origin, connection, now))
            self._expire(now, stale)
            while len(self._idle) > self._max_idle:
                stale.append(self._idle.popleft()[1])
        for old in stale:
            old.close()

    def _expire(self, now: float, stale: list[http.client.HTTPConnection]) -> None:
        """With the lock held: move the connections idle for too long into ``stale``."""
        while self._idle and now - self._idle[0][2] > self._idle_seconds:
            stale.append(self._idle.popleft()[1])

    def close(self) -> None:
        with self._lock:
            idle, self._idle = list(self._idle), collections.deque()
        for _origin, connection, _since in idle:
            connection.close()


def _closed_by_peer(connection: http.client.HTTPConnection) -> bool:
    """An idle connection with something to read has been closed by the server (or is out of step with it)."""
    sock = connection.sock
    if sock is None:
        return True
    poll = select.poll()
    poll.register(sock, select.POLLIN)
    return bool(poll.poll(0))
