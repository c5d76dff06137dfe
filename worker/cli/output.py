"""Everything the ``sandbox-worker`` command prints goes through here.

* :data:`stdout` carries what scripts read: ids, names, values and ``--json`` documents (one per command run).
  :func:`line` and :func:`json_doc` write to it, plain: no markup, no emoji codes, no wrapping.
* :data:`stderr` carries what people read: tables, live progress, notes and errors.
* :func:`error` is the one way to report a failure: one line, ``error: <reason> (field <field>)``.
  :func:`fail` prints it and returns the :class:`typer.Exit` to raise.
* Text that comes from sandboxes and agents (replies, error messages, reasons) may hold anything, ``[/x]``
  included: :func:`plain` wraps it in a :class:`rich.text.Text`, which rich never reads as markup.
"""

from __future__ import annotations

import json
from typing import Any

import typer
from pydantic import BaseModel
from rich.console import Console, RenderableType
from rich.text import Text

stdout = Console(emoji=False, highlight=False)
stderr = Console(stderr=True, emoji=False, highlight=False)


def plain(text: object, style: str = "") -> Text:
    """``text`` as it is, never parsed as markup: for anything a sandbox, an agent or a user wrote."""
    return Text(str(text), style=style)


def line(text: str) -> None:
    """One line on stdout, exactly as given."""
    stdout.out(text, highlight=False)


def json_doc(data: BaseModel | Any, **dump: Any) -> None:
    """One JSON document on stdout: a pydantic model (``dump`` goes to ``model_dump_json``) or plain data."""
    text = data.model_dump_json(indent=2, **dump) if isinstance(data, BaseModel) else json.dumps(data, indent=2)
    line(text)


def show(renderable: RenderableType) -> None:
    """A table, a view or a note for people, on stderr. Strings are markup: data belongs in :func:`plain`."""
    stderr.print(renderable)


def error(message: str, field: str | None = None) -> None:
    """The one way to report a failure: ``error: <message> (field <field>)`` on one line of stderr."""
    text = Text.assemble(("error:", "red"), " ", message, f" (field {field})" if field else "")
    stderr.print(text, soft_wrap=True)


def fail(message: str, *, field: str | None = None, code: int = 2) -> typer.Exit:
    """Report a failure and return the exit to raise: ``raise fail(...)``. Code 2 is a mistake in the
    command, 1 a command that ran and did not succeed (no such request, a session that failed)."""
    error(message, field)
    return typer.Exit(code)
