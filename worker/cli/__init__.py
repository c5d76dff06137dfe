"""The ``sandbox-worker`` command: one typer app, one module per command group, one output module.

* :mod:`worker.cli.sessions`: ``submit``, ``status``, ``terminate``, ``schema``.
* :mod:`worker.cli.ops`: ``worker``, ``reap``, ``batch run|status``, ``settings``.
* :mod:`worker.cli.health`: ``check``, ``version``.
* :mod:`worker.cli.credentials`: ``keygen``, ``secrets``, ``gateway``, ``tenant``, ``vault``, ``egress-proxy``.
* :mod:`worker.cli.output`: the consoles, errors, JSON.

Redis, Celery and the runtime are imported only when a command that needs them runs, so ``--help`` and
``schema`` work without them.
"""

from __future__ import annotations

import sys

import typer
from pydantic import ValidationError
from redis.exceptions import RedisError

from worker.cli import credentials, health, ops, output, sessions
from worker.config import get_settings
from worker.errors import SandboxWorkerError
from worker.redaction import REDACTOR

__all__ = ["app", "main"]

# Shell completion: `sandbox-worker --install-completion` (bash, zsh, fish, PowerShell). Pretty exceptions off: a
# user's mistake is one line (main), and a bug's traceback is plain, with no local variables (secrets) in it.
app = typer.Typer(
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    help="Bring up AI coding-agent sessions in sandboxes.",
)
for _group in (ops, health, sessions, credentials):
    _group.register(app)


def main() -> None:
    """The entry point: a SandboxWorkerError or an invalid value ends the command with one line, exit code 2; Redis
    out of reach, with one line, exit code 1."""
    output.state = output.State(json="--json" in sys.argv[1:])
    try:
        get_settings()
        app()
    except SandboxWorkerError as exc:
        output.error(exc.message, exc.field)
        raise SystemExit(2) from None
    except RedisError as exc:
        output.error(f"Redis did not answer: {type(exc).__name__}: {REDACTOR.redact(str(exc))}")
        raise SystemExit(1) from None
    except ValidationError as exc:
        first = exc.errors(include_url=False, include_input=False)[0]
        output.error(first["msg"], ".".join(str(part) for part in first["loc"]) or None)
        raise SystemExit(2) from None
