"""Running the fleet on the ``sandbox-worker`` command: ``worker``, ``reap``, ``batch run FILE``,
``batch status RUN_ID``, ``forward-proxy``, the ``settings`` reference and the Redis users (``redis-acl``).

Redis, Celery and the runtime are imported only when a command runs.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Group
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from worker.cli import output
from worker.cli.output import plain
from worker.models import ProviderName

if TYPE_CHECKING:
    from worker.batches import Batches, BatchRun

SETTINGS_PATH = Path("docs") / "configuration.md"
batch_app = typer.Typer(no_args_is_help=True, help="Batches of sessions from YAML files (docs/operations.md).")
_STATE_COLOURS = {"ready": "green", "failed": "red", "terminated": "magenta", "starting": "yellow"}


def _log_to_stderr() -> None:
    """The commands below run pipeline and batch code, which logs: keep it off stdout (--json)."""
    from worker.config import get_settings
    from worker.logs import configure_logging

    configure_logging(get_settings().log_format)


def worker(
    concurrency: Annotated[int, typer.Option(help="Parallel bring-ups (prefork processes).")] = 2,
    providers: Annotated[
        str, typer.Option(help="Comma-separated providers this worker serves.")
    ] = "docker,e2b,daytona",
    loglevel: Annotated[str, typer.Option()] = "INFO",
    beat: Annotated[bool, typer.Option(help="Also run the scheduler (single-host setups).")] = False,
) -> None:
    """Start a Celery worker, with its metrics endpoint (SANDBOX_WORKER_METRICS_PORT) and heartbeat file
    (SANDBOX_WORKER_HEARTBEAT_FILE)."""
    import os
    import shutil
    import sys
    import tempfile

    # Before anything imports prometheus-client: every pool process then writes its samples where the main
    # process's endpoint reads them (worker.metrics). A directory the operator set is theirs to wipe.
    own_dir = None
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        # Its value class is chosen at import: imported already, every process would count in its own memory.
        assert "prometheus_client" not in sys.modules, "prometheus_client is imported before the worker command"
        own_dir = os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="sandbox-worker-metrics-")
    from worker.celery_app import SESSIONS_QUEUE, provider_queue
    from worker.celery_app import app as celery

    names = [p.strip() for p in providers.split(",") if p.strip()]
    unknown = sorted(set(names) - {p.value for p in ProviderName})
    if unknown:
        raise output.fail(f"unknown provider(s): {', '.join(unknown)}", field="providers")
    queues = ",".join([SESSIONS_QUEUE, *(provider_queue(p) for p in names)])
    argv = ["worker", f"--concurrency={concurrency}", f"--queues={queues}", f"--loglevel={loglevel}"]
    if beat:
        argv.append("--beat")
    try:
        celery.worker_main(argv)
    finally:
        if own_dir is not None:
            shutil.rmtree(own_dir, ignore_errors=True)


def _batches() -> Batches:
    """Batch runs wired to the task queue, as the tasks wire them."""
    from worker import queueing, runtime

    return queueing.batches(runtime.store())


def reap(
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only show what would be done.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the actions as JSON on stdout.")] = False,
) -> None:
    """Remove orphaned sandboxes, terminate sessions past their ttl, requeue requests whose worker died. Exits 1,
    doing nothing, without a fleet identity to trust (docs/operations.md)."""
    from worker.queueing import enqueue
    from worker.reaper import build_reaper

    _log_to_stderr()
    reaper = build_reaper(enqueue)
    if (why := reaper.refusal()) is not None:
        raise output.fail(why, code=1)
    items = reaper.run(dry_run=dry_run)
    if as_json:
        output.json_doc([dataclasses.asdict(item) for item in items])
        return
    table = Table(title="would do" if dry_run else "done", title_justify="left")
    for column in ("action", "request_id", "sandbox", "reason", "done"):
        table.add_column(column, overflow="fold")
    for item in items:
        sandbox = f"{item.provider}:{item.sandbox_id[:12]}" if item.sandbox_id else ""
        cells = (item.action, item.request_id, sandbox, item.reason, "yes" if item.done else "no")
        table.add_row(*(plain(cell) for cell in cells))  # reasons may quote a provider's error
    output.show(table if items else "nothing to reap")


def _run_view(run: BatchRun) -> Group:
    ended = sum(n for state, n in run.counts.items() if state in ("ready", "failed", "terminated"))
    now = run.finished_at or time.time()
    header = Text.assemble(
        (run.run_id, "bold"),
        f"  {run.state.value}  {ended}/{len(run.requests)} ended  "
        f"{now - run.started_at:.0f}s elapsed, deadline in {max(run.deadline_at - now, 0):.0f}s",
    )
    counts = Table(show_header=False, box=None)
    counts.add_row("progress", ProgressBar(total=len(run.requests), completed=ended, width=40))
    for state, count in sorted(run.counts.items()):
        counts.add_row(plain(state, _STATE_COLOURS.get(state, "white")), str(count))
    for name, ms in run.durations_ms.items():
        counts.add_row(plain(f"{name} ms", "dim"), f"{ms:.0f}")
    return Group(header, counts)


def _print_run(run: BatchRun, as_json: bool) -> None:
    if as_json:
        output.json_doc(run, exclude={"requests"})
    else:
        output.show(_run_view(run))


@batch_app.command("run")
def batch_run(
    file: Annotated[Path, typer.Argument(help="Batch file (YAML).", exists=True, dir_okay=False)],
    wait: Annotated[bool, typer.Option(help="Follow the run to its end, with live progress.")] = True,
    as_json: Annotated[bool, typer.Option("--json", help="Print the run record as JSON on stdout.")] = False,
) -> None:
    """Start a run of FILE now (its schedule aside) and follow it; exits 0 when every session is ready."""
    from worker.batches import load_batch, manual_run_id

    _log_to_stderr()
    spec = load_batch(file)
    runs = _batches()
    run = runs.start(spec, str(file), manual_run_id(spec.name, time.time()))
    assert run is not None  # a manual run id is new
    if not wait:
        if as_json:
            _print_run(run, as_json)
        else:
            output.line(run.run_id)
        return
    with Live(_run_view(run), console=output.stderr, transient=as_json) as live:
        while run.finished_at is None:
            time.sleep(1)
            run = runs.advance(run.run_id)
            live.update(_run_view(run))
    if as_json:
        _print_run(run, as_json)
    raise typer.Exit(0 if run.counts.get("ready", 0) == len(run.requests) else 1)


@batch_app.command("status")
def batch_status(
    run_id: str,
    as_json: Annotated[bool, typer.Option("--json", help="Print the run record as JSON on stdout.")] = False,
) -> None:
    """Show a batch run: counts by state, durations, deadline."""
    run = _batches().get(run_id)
    if run is None:
        raise output.fail(f"no batch run {run_id}", field="run_id", code=1)
    _print_run(run, as_json)


def settings_doc(
    write: Annotated[bool, typer.Option(help=f"Write {SETTINGS_PATH} instead of printing.")] = False,
) -> None:
    """The configuration reference (every SANDBOX_WORKER_* variable)."""
    from worker.config import settings_reference

    if write:
        SETTINGS_PATH.write_text(settings_reference())
        output.show(plain(f"wrote {SETTINGS_PATH}"))
    else:
        output.line(settings_reference().removesuffix("\n"))


def redis_acl(
    app_user: Annotated[str, typer.Option(help="The web apps' Redis user.")] = "sandbox-app",
    app_password: Annotated[
        str, typer.Option(envvar="SANDBOX_WORKER_ACL_APP_PASSWORD", prompt=True, hide_input=True)
    ] = "",
    worker_user: Annotated[str, typer.Option(help="The workers' Redis user.")] = "sandbox-worker",
    worker_password: Annotated[
        str, typer.Option(envvar="SANDBOX_WORKER_ACL_WORKER_PASSWORD", prompt=True, hide_input=True)
    ] = "",
    apply: Annotated[
        str | None, typer.Option(help="Apply the rules on this Redis (an admin's URL) instead of printing them.")
    ] = None,
) -> None:
    """The ACL SETUSER commands for a web app's user (enqueue, read its results) and the workers' user; printed
    (passwords only as SHA-256), or applied with --apply. docs/operations.md, "Redis users"."""
    from pydantic import SecretStr

    from worker.redis_acl import app_rules, setuser, worker_rules

    commands = [
        setuser(app_user, app_rules(SecretStr(app_password))),
        setuser(worker_user, worker_rules(SecretStr(worker_password))),
    ]
    if apply is None:
        for command in commands:
            output.line(" ".join(command))
        return
    import redis

    with redis.Redis.from_url(apply) as admin:
        for command in commands:
            admin.execute_command(*command)
    output.show(plain(f"applied: users {app_user} and {worker_user}"))


def forward_proxy(
    host: Annotated[str, typer.Option(help="Listen address: one sandboxes reach, e.g. the bridge gateway.")],
    port: Annotated[int, typer.Option(help="Listen port (the port of docker.forward_proxy_url).")],
    allow_private: Annotated[
        bool, typer.Option(help="Let listed names resolve to private, loopback or link-local addresses.")
    ] = False,
) -> None:
    """Run the forward proxy that enforces Docker sandboxes' egress allow-lists (docs/operations.md)."""
    import asyncio

    from providers.docker import DockerConfig
    from providers.docker_egress import ForwardProxy
    from worker.config import get_settings

    _log_to_stderr()
    config = get_settings().provider_config("docker")
    key = config.forward_proxy_key if isinstance(config, DockerConfig) else None
    if key is None:
        raise output.fail("SANDBOX_WORKER_DOCKER__FORWARD_PROXY_KEY is not set")
    asyncio.run(ForwardProxy(key, allow_private=allow_private).serve(host, port))


def register(app: typer.Typer) -> None:
    app.command("forward-proxy")(forward_proxy)
    app.command()(worker)
    app.command()(reap)
    app.command("redis-acl")(redis_acl)
    app.add_typer(batch_app, name="batch")
    app.command("settings")(settings_doc)
