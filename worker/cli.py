"""The ``sandbox-worker`` command."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from cryptography.fernet import Fernet
from rich.console import Console
from rich.live import Live
from rich.table import Table

from worker.config import get_settings
from worker.errors import SandboxWorkerError
from worker.models import Agent, ProviderName, SessionRequest, SessionResult, SessionState, Strategy

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Bring up AI coding-agent sessions in sandboxes.")
console = Console(stderr=True)
SCHEMA_PATH = Path("docs") / "session-request.schema.json"
SETTINGS_PATH = Path("docs") / "configuration.md"


def _client() -> Any:
    from worker.client import SessionClient  # keeps `--help` and `schema` free of Redis

    return SessionClient()


def _fail(message: str, code: int = 2) -> typer.Exit:
    console.print(f"[red]error:[/red] {message}")
    return typer.Exit(code)


def _print_result(result: SessionResult, as_json: bool) -> None:
    if as_json:
        typer.echo(result.model_dump_json(indent=2))
        return
    table = Table(show_header=False, box=None)
    for key, value in result.model_dump(mode="json", exclude_none=True).items():
        text = str(value)
        if key == "timings_ms":
            text = ", ".join(f"{stage} {ms:.0f} ms" for stage, ms in value.items())
        elif key == "error":
            text = f"{value['code']} at {value.get('stage')}: {value['message']}" + (
                f" (field {value['field']})" if value.get("field") else ""
            )
        table.add_row(f"[bold]{key}[/bold]", text)
    console.print(table)


def _progress_view(current: str | None, outcome: SessionState | None = None) -> Table:
    """Stages before ``current`` are done (quick ones pass between two polls); ``current`` is running, or
    finished with ``outcome``."""
    from worker.fleet import STAGES

    at = STAGES.index(current) if current in STAGES else -1
    table = Table(show_header=False, box=None)
    for index, stage in enumerate(STAGES):
        if index < at or (index == at and outcome is SessionState.ready):
            mark = "[green]✔[/green]"
        elif index == at and outcome is not None:
            mark = "[red]✘[/red]"
        elif index == at:
            mark = "[yellow]…[/yellow]"
        else:
            mark = "[dim]·[/dim]"
        table.add_row(mark, stage)
    return table


@app.command()
def worker(
    concurrency: Annotated[int, typer.Option(help="Parallel bring-ups (prefork processes).")] = 2,
    providers: Annotated[
        str, typer.Option(help="Comma-separated providers this worker serves.")
    ] = "docker,e2b,daytona",
    loglevel: Annotated[str, typer.Option()] = "INFO",
    beat: Annotated[bool, typer.Option(help="Also run the scheduler (single-host setups).")] = False,
) -> None:
    """Start a Celery worker."""
    from worker.celery_app import SESSIONS_QUEUE, provider_queue
    from worker.celery_app import app as celery

    names = [p.strip() for p in providers.split(",") if p.strip()]
    unknown = sorted(set(names) - {p.value for p in ProviderName})
    if unknown:
        raise _fail(f"unknown provider(s): {', '.join(unknown)}")
    queues = ",".join([SESSIONS_QUEUE, *(provider_queue(p) for p in names)])
    argv = ["worker", f"--concurrency={concurrency}", f"--queues={queues}", f"--loglevel={loglevel}"]
    if beat:
        argv.append("--beat")
    celery.worker_main(argv)


@app.command()
def submit(
    agent: Annotated[Agent, typer.Option(help="Agent to run.")],
    provider: Annotated[ProviderName, typer.Option(help="Sandbox provider.")],
    tenant: Annotated[str, typer.Option(help="Tenant id.")] = "default",
    prompt: Annotated[str | None, typer.Option(help="First prompt.")] = None,
    request_id: Annotated[str | None, typer.Option(help="Idempotency key (generated when absent).")] = None,
    image: Annotated[str | None, typer.Option(help="Image, template or snapshot.")] = None,
    ttl: Annotated[int, typer.Option(help="Lifetime of the session in seconds.")] = 3600,
    env: Annotated[list[str] | None, typer.Option("--env", help="NAME=VALUE for the sandbox (repeatable).")] = None,
    strategy: Annotated[Strategy | None, typer.Option(help="Credential strategy.")] = None,
    secret_ref: Annotated[str | None, typer.Option(help="Secret name for 'byok'.")] = None,
    vault: Annotated[list[str] | None, typer.Option("--vault", help="Vault to attach (repeatable).")] = None,
    wait: Annotated[bool, typer.Option(help="Follow the bring-up until it ends.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the SessionResult as JSON on stdout.")] = False,
    timeout: Annotated[float, typer.Option(help="Seconds to wait with --wait.")] = 900.0,
) -> None:
    """Queue a session request (and with --wait, follow it to the end)."""
    pairs = [item.partition("=") for item in env or []]
    if any(not sep for _, sep, _ in pairs):
        raise _fail("--env takes NAME=VALUE")
    payload: dict[str, Any] = {
        "tenant_id": tenant,
        "agent": agent.value,
        "provider": provider.value,
        "sandbox": {"ttl_seconds": ttl, "env": {k: v for k, _, v in pairs}, **({"image": image} if image else {})},
        "session": {"prompt": prompt} if prompt else {},
        "credentials": {
            k: v for k, v in {"strategy": strategy, "secret_ref": secret_ref, "vaults": vault}.items() if v
        },
    }
    if request_id:
        payload["request_id"] = request_id
    try:
        request = SessionRequest.model_validate(payload)
    except ValueError as exc:
        raise _fail(str(exc)) from None
    client = _client()
    client.submit(request)
    if not wait:
        typer.echo(request.request_id)
        return
    with Live(_progress_view(None), console=console, transient=as_json) as live:
        try:
            result = client.wait(
                request.request_id, timeout=timeout, on_progress=lambda stage: live.update(_progress_view(stage))
            )
        except (TimeoutError, RuntimeError) as exc:
            raise _fail(str(exc), 1) from None
        live.update(_progress_view(result.stage, result.state))
    _print_result(result, as_json)
    raise typer.Exit(0 if result.state is SessionState.ready else 1)


@app.command()
def status(
    request_id: str,
    as_json: Annotated[bool, typer.Option("--json", help="Print the SessionResult as JSON on stdout.")] = False,
    show_token: Annotated[
        bool, typer.Option(help="Also print the daemon's bearer token and any header its provider needs (secrets).")
    ] = False,
) -> None:
    """Show a request's state and result."""
    client = _client()
    result = client.status(request_id)
    if result is None:
        raise _fail(f"no request {request_id}", 1)
    _print_result(result, as_json)
    if show_token:
        access = client.access(request_id)
        if access is None:
            raise _fail("no token: the session is not ready", 1)
        typer.echo(access.token.get_secret_value())
        for name, value in access.headers.items():
            typer.echo(f"{name}: {value.get_secret_value()}")


@app.command()
def terminate(request_id: str, as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """End a session: close the agent, remove the sandbox, release credentials."""
    result = _client().terminate(request_id)
    _print_result(result, as_json)
    raise typer.Exit(0 if result.state is SessionState.terminated else 1)


@app.command()
def schema(
    write: Annotated[bool, typer.Option(help=f"Write {SCHEMA_PATH} instead of printing.")] = False,
) -> None:
    """The JSON Schema of a session request."""
    from worker.models import SessionRequest

    text = json.dumps(SessionRequest.model_json_schema(), indent=2, sort_keys=True) + "\n"
    if write:
        SCHEMA_PATH.write_text(text)
        console.print(f"wrote {SCHEMA_PATH}")
    else:
        sys.stdout.write(text)


@app.command("settings")
def settings_doc(
    write: Annotated[bool, typer.Option(help=f"Write {SETTINGS_PATH} instead of printing.")] = False,
) -> None:
    """The configuration reference (every SANDBOX_WORKER_* variable)."""
    from worker.config import settings_reference

    if write:
        SETTINGS_PATH.write_text(settings_reference())
        console.print(f"wrote {SETTINGS_PATH}")
    else:
        sys.stdout.write(settings_reference())


@app.command()
def keygen() -> None:
    """Print a new Fernet key for SANDBOX_WORKER_FERNET_KEY."""
    typer.echo(Fernet.generate_key().decode())


def main() -> None:
    try:
        get_settings()
        app()
    except SandboxWorkerError as exc:
        console.print(f"[red]error:[/red] {exc.message}" + (f" (field {exc.field})" if exc.field else ""))
        raise SystemExit(2) from None


# Sub-command groups live beside the code they drive; each registers itself here.
from worker.credentials.cli import register as _register_credentials  # noqa: E402

_register_credentials(app)

from worker.ops_cli import register as _register_ops  # noqa: E402

_register_ops(app)
