"""The ceiling scenario: the orchestration alone, as a deployment runs it, with nothing slow behind it.

``processes`` worker processes (a prefork pool's children; ``sandbox-worker worker`` starts two by default) each
run ``Pipeline.create`` for their share of the sessions, one after another, against a real Redis, the null provider
(providers/fake.py: sandboxes in memory) and the stand-in daemons. The stand-in daemons serve from a process of their
own (their token table shared through a ``multiprocessing`` manager, a process too), so what each worker process
spends is the worker's alone: sessions/s is over the wall clock of the timed window, worker CPU per session the
worker processes' CPU (every thread) over the sessions they brought up.

Its baseline in the same run is the daemon protocol alone: before the timed window each worker process also holds,
one after another, the conversation a session has with its daemon (its token given to the stand-in, ``initialize``,
the event stream, ``session/new`` and the prompt, over the worker's own client code) with no orchestration around
it: no record, no lease, no stages. The worker's CPU over that floor is what the orchestration costs, comparable
across hours of a machine whose speed swings; the absolute figures are not.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import queue
import time
import uuid
from dataclasses import dataclass, field
from multiprocessing.managers import SyncManager
from multiprocessing.synchronize import Barrier, Event
from pathlib import Path
from typing import Any

from bench.harness import Bench
from providers.base import Endpoint
from providers.fake import DaemonTables, FakeProvider, StandInDaemons
from worker import daemon
from worker.acp import AcpConnection
from worker.config import Settings
from worker.credentials.broker import build_broker
from worker.models import SessionState, parse_request
from worker.pipeline import Pipeline
from worker.store import Store

WARM_UP = 5  # sessions per process before the timed window: imports, connections, caches
_CTX = multiprocessing.get_context("fork")  # the children inherit the bench's settings and logging as they are


class RemoteDaemons(DaemonTables):
    """What the null provider needs of the stand-in daemons (their tables, their address) when they serve from
    another process: the token table is shared with it; the environments stay here (the server never reads them)."""

    def __init__(self, tokens: Any, port: int) -> None:
        super().__init__(tokens=tokens)
        self.port = port

    def url(self, sandbox_id: str) -> str:
        return f"http://127.0.0.1:{self.port}/d/{sandbox_id}"

    def close(self) -> None:
        return None  # the process serving them is the scenario's to stop


@dataclass
class Share:
    """One worker process's outcome, sent back to the scenario."""

    latencies_ms: list[float] = field(default_factory=list)
    stages_ms: list[dict[str, float]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    cpu_s: float = 0.0
    protocol_sessions: int = 0
    protocol_cpu_s: float = 0.0  # the daemon protocol alone, for as many sessions


@dataclass
class Measured:
    shares: list[Share]
    wall_s: float
    stand_in_cpu_s: float  # the stand-in daemons' process and the manager process holding their tables


def process_cpu_seconds(pid: int) -> float:
    """CPU seconds (user + system) process ``pid`` has used so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _serve(tokens: Any, port: Any, stop: Event) -> None:
    daemons = StandInDaemons(tokens=tokens)
    port.value = daemons.port
    stop.wait()
    daemons.close()


def protocol_only(settings: Settings, daemons: RemoteDaemons, payload: dict[str, Any]) -> None:
    """What a session of ``payload`` says to its daemon, and nothing else: the daemon started with a new token (in the
    stand-in's table, as the null provider starts it), ACP ``initialize``, ``session/new`` and the prompt, with the
    event stream read, through the worker's DaemonClient and AcpConnection."""
    request = parse_request(payload)
    assert request.session.prompt is not None
    sandbox_id = f"protocol-{uuid.uuid4().hex[:12]}"
    token = daemon.new_token()
    daemons.start(sandbox_id, {"SW_FRONT_TOKEN": token.get_secret_value()})
    client = daemon.DaemonClient(Endpoint(url=daemons.url(sandbox_id)), token, timeout=settings.session_timeout)
    acp = AcpConnection(client, f"sw-{sandbox_id}-1", request.agent.value)
    try:
        acp.initialize(settings.session_timeout)
        session_id = acp.new_session(request.session.cwd, settings.session_timeout)
        acp.prompt(session_id, request.session.prompt, settings.prompt_timeout)
    finally:
        acp.detach()
        client.close()


def _work(bench: Bench, daemons: RemoteDaemons, sessions: int, start: Barrier, out: Any) -> None:
    settings = bench.settings()
    store = Store.from_settings(settings)
    provider = FakeProvider(daemons=daemons)  # type: ignore[arg-type]
    pipeline = Pipeline(settings, store, lambda _name: provider, build_broker(settings, store))
    for _ in range(WARM_UP):
        pipeline.create(bench.request("mock"))
    share = Share(protocol_sessions=sessions)
    cpu = time.process_time()
    for _ in range(sessions):
        protocol_only(settings, daemons, bench.request("mock"))
    share.protocol_cpu_s = time.process_time() - cpu
    start.wait()
    cpu = time.process_time()
    for _ in range(sessions):
        began = time.perf_counter()
        result = pipeline.create(bench.request("mock"))
        if result.state is SessionState.ready:
            share.latencies_ms.append((time.perf_counter() - began) * 1000)
            share.stages_ms.append(dict(result.timings_ms))
        else:
            share.errors.append(f"{result.error.code if result.error else result.state}")
    share.cpu_s = time.process_time() - cpu
    out.put(share)
    store.redis.close()


def _collect(out: Any, workers: list[multiprocessing.process.BaseProcess]) -> list[Share]:
    """Every worker process's share, as each finishes; processes that ended without sending one fail the measurement
    (once all have ended, what they sent has arrived within seconds)."""
    shares: list[Share] = []
    while len(shares) < len(workers):
        ended = not any(worker.is_alive() for worker in workers)
        try:
            shares.append(out.get(timeout=5 if ended else 1))
        except queue.Empty:
            if ended:
                raise RuntimeError("a worker process of the ceiling ended without reporting") from None
    return shares


def measure(bench: Bench, sessions: int, processes: int) -> Measured:
    """``sessions`` bring-ups spread over ``processes`` worker processes, all started together."""
    bench.redis  # noqa: B018 - started before the fork, so every child uses the same one
    manager: SyncManager = _CTX.Manager()
    stop, port = _CTX.Event(), _CTX.Value("i", 0)
    tokens = manager.dict()
    server = _CTX.Process(target=_serve, args=(tokens, port, stop), name="stand-in-daemons", daemon=True)
    server.start()
    workers: list[multiprocessing.process.BaseProcess] = []
    try:
        deadline = time.monotonic() + 10
        while not port.value:
            if time.monotonic() > deadline or not server.is_alive():
                raise RuntimeError("the stand-in daemons' process did not start")
            time.sleep(0.01)
        daemons = RemoteDaemons(tokens, port.value)
        start, out = _CTX.Barrier(processes + 1), _CTX.Queue()
        counts = [sessions // processes + (i < sessions % processes) for i in range(processes)]
        for count in counts:
            workers.append(_CTX.Process(target=_work, args=(bench, daemons, count, start, out), daemon=True))
            workers[-1].start()
        start.wait(timeout=120)
        helpers = [server.pid, manager._process.pid]  # type: ignore[attr-defined]
        stand_in = sum(process_cpu_seconds(pid) for pid in helpers if pid)
        began = time.perf_counter()
        shares = _collect(out, workers)
        wall = time.perf_counter() - began
        stand_in = sum(process_cpu_seconds(pid) for pid in helpers if pid) - stand_in
        return Measured(shares, wall, stand_in)
    finally:
        for worker in workers:
            worker.join(timeout=10)
            if worker.is_alive():
                worker.kill()
        stop.set()
        server.join(timeout=10)
        with contextlib.suppress(Exception):
            manager.shutdown()
