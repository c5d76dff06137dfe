"""The per-session egress allow-list of Docker sandboxes: ``sandbox-worker forward-proxy``.

An isolated Docker sandbox has no route beyond the engine host (providers/docker_isolation.py). When
``docker.forward_proxy_url`` is set, the driver gives each sandbox ``HTTPS_PROXY``/``HTTP_PROXY`` pointing at
this proxy, with a **pass** as the proxy credential: a Fernet token (``docker.forward_proxy_key``) sealing the
sandbox's allow-list (``docker.egress_always``, the LLM endpoints, plus the request's ``sandbox.egress``) and
its expiry (the sandbox's ttl). The proxy keeps no state: a pass it cannot open, or one past its expiry, is
refused (407), and so is every destination the pass does not list (403).

* ``CONNECT host:port`` (HTTPS and any TLS) and absolute-URI ``http://`` requests; each connection carries one
  request or one tunnel, so every request is checked.
* An entry is ``host``, ``*.domain`` (any subdomain) or either with ``:port``; without a port it allows 443
  and 80. The host is matched as the sandbox names it.
* The proxy resolves the name itself and connects to the address it checked: a destination that resolves to
  a loopback, private, link-local or otherwise non-global address is refused unless ``--allow-private``, so a
  listed name cannot be pointed at the proxy's own host or network.
* One log line per connection: destination, allowed or why not; never the pass.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import fnmatch
import ipaddress
import json
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass

import structlog
from cryptography.fernet import Fernet, InvalidToken
from pydantic import SecretStr

log = structlog.get_logger(__name__)

PASS_USER = "sandbox"  # noqa: S105 - the user name of the proxy credential, not a secret
DEFAULT_PORTS = (443, 80)
HEAD_MAX = 64 * 1024


@dataclass(frozen=True, slots=True)
class Entry:
    host: str
    port: int | None

    @classmethod
    def parse(cls, value: str) -> Entry:
        host, _, port = value.strip().lower().rpartition(":") if ":" in value else (value.strip().lower(), "", "")
        return cls(host, int(port) if port else None)

    def allows(self, host: str, port: int) -> bool:
        ports = (self.port,) if self.port is not None else DEFAULT_PORTS
        return port in ports and fnmatch.fnmatchcase(host.lower(), self.host)


def mint(key: SecretStr, allow: Sequence[str], expires_at: float) -> str:
    """The pass a sandbox presents to the proxy."""
    payload = json.dumps({"allow": list(allow), "exp": int(expires_at)}).encode()
    return Fernet(key.get_secret_value().encode()).encrypt(payload).decode()


def open_pass(key: SecretStr, token: str, now: float | None = None) -> list[Entry] | None:
    """The allow-list a pass seals, or None when it is not ours or has expired."""
    try:
        payload = json.loads(Fernet(key.get_secret_value().encode()).decrypt(token.encode()))
    except (InvalidToken, ValueError):
        return None
    if payload.get("exp", 0) < (now or time.time()):
        return None
    return [Entry.parse(value) for value in payload.get("allow", [])]


def proxy_url(base: str, token: str) -> str:
    """``http://sandbox:<pass>@host:port``: the form HTTPS_PROXY takes (Fernet tokens are URL-safe)."""
    scheme, _, rest = base.partition("://")
    return f"{scheme}://{PASS_USER}:{token}@{rest.rstrip('/')}"


def _reply(status: str, message: str = "") -> bytes:
    body = message.encode()
    return f"HTTP/1.1 {status}\r\nconnection: close\r\ncontent-length: {len(body)}\r\n\r\n".encode() + body


def _carried_pass(lines: list[bytes]) -> str:
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"proxy-authorization":
            scheme, _, encoded = value.strip().partition(b" ")
            if scheme.lower() == b"basic":
                with contextlib.suppress(binascii.Error, UnicodeDecodeError):
                    return base64.b64decode(encoded.strip()).decode().partition(":")[2]
    return ""


def _target(lines: list[bytes]) -> tuple[str, int, bytes | None]:
    """(host, port, the request head to send upstream or None for a tunnel) from the request line."""
    method, target, version = lines[0].decode("latin-1").split(" ", 2)
    if method.upper() == "CONNECT":
        host, _, port = target.rpartition(":")
        return host.strip("[]"), int(port), None
    if not target.lower().startswith("http://"):
        raise ValueError("only CONNECT and absolute http:// requests")
    authority, _, path = target[len("http://") :].partition("/")
    host, _, port = authority.rpartition(":") if ":" in authority else (authority, "", "")
    hop = (b"proxy-authorization", b"proxy-connection", b"connection", b"keep-alive")
    kept = [line for line in lines[1:] if line.partition(b":")[0].strip().lower() not in hop]
    head = b"\r\n".join([f"{method} /{path} {version}".encode("latin-1"), *kept, b"Connection: close"]) + b"\r\n\r\n"
    return host, int(port or 80), head


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError, OSError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()


class ForwardProxy:
    def __init__(self, key: SecretStr, *, allow_private: bool = False, connect_timeout: float = 10.0) -> None:
        self.key = key
        self.allow_private = allow_private
        self.connect_timeout = connect_timeout

    async def _address(self, host: str, port: int) -> str | None:
        """An address of ``host`` the proxy may connect to, or None."""
        loop = asyncio.get_running_loop()
        try:
            infos = await loop.getaddrinfo(host, port, family=socket.AF_INET, type=socket.SOCK_STREAM)
        except OSError:
            return None
        for *_, sockaddr in infos:
            address = str(sockaddr[0])
            if self.allow_private or ipaddress.ip_address(address).is_global:
                return address
        return None

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await self._handle(reader, writer)
        finally:
            writer.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            lines = (await reader.readuntil(b"\r\n\r\n"))[:-4].split(b"\r\n")
            host, port, head = _target(lines)
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError, ValueError):
            writer.write(_reply("400 Bad Request", "a CONNECT or an absolute http:// request"))
            return
        allow = open_pass(self.key, _carried_pass(lines))
        if allow is None:
            log.info("egress refused", host=host, port=port, reason="no valid pass")
            writer.write(_reply('407 Proxy Authentication Required\r\nproxy-authenticate: Basic realm="egress"'))
            return
        if not any(entry.allows(host, port) for entry in allow):
            log.info("egress refused", host=host, port=port, reason="not on the allow-list")
            writer.write(_reply("403 Forbidden", f"{host}:{port} is not on this sandbox's egress allow-list"))
            return
        address = await self._address(host, port)
        if address is None:
            log.info("egress refused", host=host, port=port, reason="no public address")
            writer.write(_reply("403 Forbidden", f"{host} does not resolve to a public address"))
            return
        try:
            up_reader, up_writer = await asyncio.wait_for(
                asyncio.open_connection(address, port), timeout=self.connect_timeout
            )
        except (OSError, TimeoutError):
            writer.write(_reply("502 Bad Gateway", f"cannot connect to {host}:{port}"))
            return
        log.info("egress allowed", host=host, port=port)
        if head is None:
            writer.write(b"HTTP/1.1 200 Connection Established\r\n\r\n")
        else:
            up_writer.write(head)
        request = asyncio.ensure_future(_pipe(reader, up_writer))
        await _pipe(up_reader, writer)
        request.cancel()
        up_writer.close()

    async def serve(self, host: str, port: int) -> None:
        server = await asyncio.start_server(self.handle, host=host, port=port, limit=HEAD_MAX)
        log.info("forward proxy listening", host=host, port=port)
        async with server:
            await server.serve_forever()
