"""The ``sandbox-worker`` command: one typer app, one module per command group, one output module.

* :mod:`worker.cli.sessions`: ``submit``, ``status``, ``terminate``, ``schema``.
* :mod:`worker.cli.ops`: ``worker``, ``reap``, ``batch run|status``, ``settings``.
* :mod:`worker.cli.credentials`: ``keygen``, ``secrets``, ``gateway``, ``tenant``, ``vault``, ``egress-proxy``.
* :mod:`worker.cli.output`: the consoles, errors, JSON.

Redis, Celery and the runtime are imported only when a command that needs them runs, so ``--help`` and
``schema`` work without them.
"""

from __future__ import annotations

import typer
from pydantic import ValidationError

from worker.cli import credentials, ops, output, sessions
from worker.config import get_settings
from worker.errors import SandboxWorkerError

__all__ = ["app", "main"]

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Bring up AI coding-agent sessions in sandboxes.")
for _group in (ops, sessions, credentials):
    _group.register(app)


def main() -> None:
    """The entry point: a SandboxWorkerError or an invalid value ends the command with one line, exit code 2."""
    try:
        get_settings()
        app()
    except SandboxWorkerError as exc:
        output.error(exc.message, exc.field)
        raise SystemExit(2) from None
    except ValidationError as exc:
        first = exc.errors(include_url=False, include_input=False)[0]
        output.error(first["msg"], ".".join(str(part) for part in first["loc"]) or None)
        raise SystemExit(2) from None
