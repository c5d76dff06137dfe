"""Sessions on the ``sandbox-worker`` command: ``submit``, ``status``, ``terminate``, ``sessions list``, and the
request ``schema``."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.live import Live
from rich.table import Table

from worker.cli import output
from worker.cli.output import plain
from worker.models import Agent, ProviderName, SessionResult, SessionState, Strategy, parse_request

if TYPE_CHECKING:
    from worker.client import SessionClient

SCHEMA_PATH = Path("docs") / "session-request.schema.json"
sessions_app = typer.Typer(no_args_is_help=True, help="The session records in Redis (an operator's view).")
AsJson = Annotated[bool, typer.Option("--json", help="Print the SessionResult as JSON on stdout.")]


def _client() -> SessionClient:
    from worker.client import SessionClient  # keeps `--help` and `schema` free of Redis

    return SessionClient()


def _print_result(result: SessionResult, as_json: bool) -> None:
    if as_json:
        output.json_doc(result)
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
        table.add_row(plain(key, "bold"), plain(text))  # replies and error messages come from the sandbox
    output.show(table)


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
        table.add_row(mark, plain(stage))
    return table


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
    as_json: AsJson = False,
    timeout: Annotated[float, typer.Option(help="Seconds to wait with --wait.")] = 900.0,
) -> None:
    """Queue a session request (and with --wait, follow it to the end)."""
    pairs = [item.partition("=") for item in env or []]
    if any(not sep for _, sep, _ in pairs):
        raise output.fail("--env takes NAME=VALUE", field="env")
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
    request = parse_request(payload)  # an InvalidRequest naming the field: one line, exit 2
    client = _client()
    client.submit(request)
    if not wait:
        if as_json:
            output.json_doc(
                SessionResult(
                    request_id=request.request_id,
                    tenant_id=request.tenant_id,
                    state=SessionState.queued,
                    provider=request.provider,
                    agent=request.agent,
                )
            )
        else:
            output.line(request.request_id)
        return
    result = _follow(client, request.request_id, timeout, as_json)
    _print_result(result, as_json)
    raise typer.Exit(0 if result.state is SessionState.ready else 1)


def _follow(client: SessionClient, request_id: str, timeout: float, as_json: bool) -> SessionResult:
    """Wait for the request to end, showing its stages live on stderr (gone when the result is JSON)."""
    with Live(_progress_view(None), console=output.stderr, transient=as_json) as live:
        try:
            result = client.wait(
                request_id, timeout=timeout, on_progress=lambda stage: live.update(_progress_view(stage))
            )
        except (TimeoutError, RuntimeError) as exc:
            raise output.fail(str(exc), code=1) from None
        live.update(_progress_view(result.stage, result.state))
    return result


def status(
    request_id: str,
    as_json: AsJson = False,
    show_token: Annotated[
        bool,
        typer.Option(
            help="Also print the daemon's bearer token and any header its provider needs (secrets); with --json, "
            "as `token` and `headers`."
        ),
    ] = False,
    watch: Annotated[
        bool, typer.Option("--watch", help="Follow the request's stages live until it is ready, failed or terminated.")
    ] = False,
    timeout: Annotated[float, typer.Option(help="Seconds to wait with --watch.")] = 900.0,
) -> None:
    """Show a request's state and result."""
    client = _client()
    result = client.status(request_id)
    if result is None:
        raise output.fail(f"no request {request_id}", field="request_id", code=1)
    if watch and not result.state.terminal:
        result = _follow(client, request_id, timeout, as_json)
    access = client.access(request_id) if show_token else None
    if show_token and access is None:
        if as_json:  # the one document, saying there is no token
            output.json_doc({**result.model_dump(mode="json"), "token": None, "headers": {}})
        else:
            _print_result(result, as_json)
        raise output.fail("no token: the session is not ready", code=1)
    if as_json:
        document = result.model_dump(mode="json")
        if access is not None:
            document["token"] = access.token.get_secret_value()
            document["headers"] = {name: value.get_secret_value() for name, value in access.headers.items()}
        output.json_doc(document)
        return
    _print_result(result, as_json)
    if access is not None:
        output.line(access.token.get_secret_value())
        for name, value in access.headers.items():
            output.line(f"{name}: {value.get_secret_value()}")


def terminate(request_id: str, as_json: AsJson = False) -> None:
    """End a session: close the agent, remove the sandbox, release credentials."""
    result = _client().terminate(request_id)
    assert result is not None  # None only when not waiting for the result
    _print_result(result, as_json)
    raise typer.Exit(0 if result.state is SessionState.terminated else 1)


def schema(
    write: Annotated[bool, typer.Option(help=f"Write {SCHEMA_PATH} instead of printing.")] = False,
) -> None:
    """The JSON Schema of a session request."""
    from worker.models import SessionRequest

    text = json.dumps(SessionRequest.model_json_schema(), indent=2, sort_keys=True) + "\n"
    if write:
        SCHEMA_PATH.write_text(text)
        output.show(plain(f"wrote {SCHEMA_PATH}"))
    else:
        output.line(text.removesuffix("\n"))


@sessions_app.command("list")
def sessions_list(
    tenant: Annotated[str | None, typer.Option(help="Only this tenant's.")] = None,
    state: Annotated[SessionState | None, typer.Option(help="Only those in this state.")] = None,
    limit: Annotated[int, typer.Option(min=1, help="At most this many, the latest updated first.")] = 100,
    as_json: Annotated[bool, typer.Option("--json", help="Print the results as one JSON list on stdout.")] = False,
) -> None:
    """List session records, the latest updated first. Reads Redis directly: an operator's command (a signed web app's
    Redis user cannot read the records; it asks about its own requests with `status`)."""
    from worker.config import get_settings
    from worker.store import Store

    found = [
        result
        for result in Store.from_settings(get_settings()).results()
        if (tenant is None or result.tenant_id == tenant) and (state is None or result.state is state)
    ]
    found = sorted(found, key=lambda result: result.updated_at, reverse=True)[:limit]
    if as_json:
        output.json_doc([result.model_dump(mode="json") for result in found])
        return
    if not found:
        output.show("no sessions")
        return
    table = Table(box=None)
    table.add_column("request_id", no_wrap=True)
    for column in ("tenant", "state", "stage", "provider", "agent", "warm", "updated", "error"):
        table.add_column(column, overflow="fold")
    now = time.time()
    for result in found:
        cells = (
            result.request_id,
            result.tenant_id or "",
            result.state.value,
            result.stage or "",
            result.provider.value if result.provider else "",
            result.agent.value if result.agent else "",
            "yes" if result.warm else "",
            f"{now - result.updated_at:.0f}s ago",
            result.error.code if result.error else "",
        )
        table.add_row(*(plain(cell) for cell in cells))  # ids and stages come from requests and sandboxes
    output.show(table)


def register(app: typer.Typer) -> None:
    for command in (submit, status, terminate, schema):
        app.command()(command)
    app.add_typer(sessions_app, name="sessions")
