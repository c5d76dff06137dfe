"""Probes and facts on the ``sandbox-worker`` command: ``check`` (readiness or, with ``--liveness``, the heartbeat)
and ``version``."""

from __future__ import annotations

import dataclasses
from typing import Annotated

import typer
from rich.table import Table

from worker.cli import output
from worker.cli.output import plain

HEARTBEATS_MISSED = 6  # --max-age's default, in heartbeat intervals: a busy host may delay a touch or two


def check(
    liveness: Annotated[
        bool, typer.Option("--liveness", help="Check only the heartbeat file's age (no broker, store or provider).")
    ] = False,
    max_age: Annotated[
        float | None,
        typer.Option(help=f"With --liveness: the oldest heartbeat that passes (s); {HEARTBEATS_MISSED} intervals."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the checks as one JSON document on stdout.")] = False,
) -> None:
    """Check the broker, the store and each configured provider (SANDBOX_WORKER_PROVIDERS), or with --liveness the
    worker's heartbeat file: exit 0 when all pass, 1 otherwise. For health probes (docs/operations.md)."""
    from worker import health
    from worker.config import get_settings

    settings = get_settings()
    if liveness:
        limit = max_age if max_age is not None else HEARTBEATS_MISSED * settings.heartbeat_seconds
        checks = [health.liveness(settings.heartbeat_file, limit)]
    else:
        checks = health.readiness(settings)
    ok = all(item.ok for item in checks)
    if as_json:
        output.json_doc({"ok": ok, "checks": [dataclasses.asdict(item) for item in checks]})
    else:
        table = Table(show_header=False, box=None)
        for item in checks:
            verdict = plain("ok" if item.ok else "FAIL", "green" if item.ok else "red")
            table.add_row(plain(item.name, "bold"), verdict, plain(item.detail))  # details quote errors
        output.show(table)
    raise typer.Exit(0 if ok else 1)


def version(
    as_json: Annotated[bool, typer.Option("--json", help="Print the versions as one JSON document on stdout.")] = False,
) -> None:
    """This package's version, and the pins it runs: the sandbox-agent daemon, the sandbox image, each agent."""
    from importlib.metadata import version as installed

    from worker import pins

    adapters = {
        "claude": f"{pins.CLAUDE_AGENT_ACP_NPM_PACKAGE}@{pins.CLAUDE_AGENT_ACP_VERSION}",
        "codex": f"{pins.CODEX_ACP_NPM_PACKAGE}@{pins.CODEX_ACP_VERSION}",
        "opencode": f"{pins.OPENCODE_NPM_PACKAGE}@{pins.OPENCODE_VERSION}",
    }
    document = {
        "sandbox_worker": installed("sandbox-worker"),
        "sandbox_agent": pins.SANDBOX_AGENT_VERSION,
        "sandbox_image": pins.SANDBOX_IMAGE,
        "agents": {
            name: {"package": package, "reports": pins.AGENT_VERSIONS[name]} for name, package in adapters.items()
        },
    }
    if as_json:
        output.json_doc(document)
        return
    table = Table(show_header=False, box=None)
    table.add_row("sandbox-worker", installed("sandbox-worker"))
    table.add_row("sandbox-agent", pins.SANDBOX_AGENT_VERSION)
    table.add_row("sandbox image", pins.SANDBOX_IMAGE)
    for name, package in adapters.items():
        table.add_row(f"agent {name}", f"{package} (reports {pins.AGENT_VERSIONS[name]})")
    output.show(table)


def register(app: typer.Typer) -> None:
    app.command()(check)
    app.command()(version)
