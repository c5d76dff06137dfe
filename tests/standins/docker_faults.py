"""A fault-injecting TCP proxy in front of the Docker engine's unix socket.

The Docker driver talks to ``tcp://127.0.0.1:<port>``; each request head is matched against the queued
faults (answered with that status and closed) or forwarded to the engine with ``Connection: close``, so the
next request comes on a new connection and is matched too. Upgraded connections (``docker exec`` attaches)
are piped both ways untouched.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading

from tests.standins.faults import FaultQueue
from tests.standins.server import free_port

ENGINE_SOCKET = "/var/run/docker.sock"


class DockerFaultProxy(FaultQueue):
    def __init__(self, socket_path: str = ENGINE_SOCKET) -> None:
        super().__init__()
        self.socket_path = socket_path
        self.port = free_port()
        self.url = f"tcp://127.0.0.1:{self.port}"
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="docker-fault-proxy", daemon=True)

    def __enter__(self) -> DockerFaultProxy:
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("docker fault proxy did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        server = self._loop.run_until_complete(asyncio.start_server(self._handle, "127.0.0.1", self.port))
        self._ready.set()
        try:
            self._loop.run_forever()
        finally:
            server.close()

    async def _handle(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        try:
            head = await client_reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            client_writer.close()
            return
        method, target = head.split(b" ", 2)[:2]
        fault = self.take(method.decode(), target.decode())
        if fault is not None:
            body = json.dumps({"message": f"injected fault {fault.status}"}).encode()
            extra = "".join(f"{k}: {v}\r\n" for k, v in fault.headers.items())
            client_writer.write(
                f"HTTP/1.1 {fault.status} Injected\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
                f"{extra}Connection: close\r\n\r\n".encode()
                + body
            )
            await client_writer.drain()
            client_writer.close()
            return
        if b"upgrade" not in head.lower():
            lines = [line for line in head.split(b"\r\n") if not line.lower().startswith(b"connection:")]
            head = b"\r\n".join([*lines[:-2], b"Connection: close", b"", b""])
        engine_reader, engine_writer = await asyncio.open_unix_connection(self.socket_path)
        engine_writer.write(head)
        await asyncio.gather(_pipe(client_reader, engine_writer), _pipe(engine_reader, client_writer))


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        with contextlib.suppress(RuntimeError):
            writer.close()
