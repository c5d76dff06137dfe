"""Everything the ``sandbox-worker`` command prints goes through here.

* :data:`stdout` carries what scripts read: ids, names, values and ``--json`` documents (one per command run).
  :func:`line` and :func:`json_doc` write to it, plain: no markup, no emoji codes, no wrapping.
* :data:`stderr` carries what people read: tables, live progress, notes and errors.
* :func:`error` is the one way to report a failure: one line, ``error: <reason> (field <field>)``.
  :func:`fail` prints it and returns the :class:`typer.Exit` to raise.
* Text that comes from sandboxes and agents (replies, error messages, reasons) may hold anything, ``[/x]`` and
  terminal escapes included: :func:`plain` shows control characters escaped (``\\x1b``) in a
  :class:`rich.text.Text`, which rich never reads as markup; JSON documents are ASCII, every other character
  escaped.
* With ``--json`` on the command line (:data:`state`), a failure is a JSON document on stdout too
  (``{"error": {"message": ..., "field": ...}}``) unless the command already printed its one document.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

import typer
from pydantic import BaseModel
from rich.console import Console, RenderableType
from rich.text import Text

stdout = Console(emoji=False, highlight=False)
stderr = Console(stderr=True, emoji=False, highlight=False)
# C0 controls but tab and newline, DEL, C1 controls (0x9b is a CSI on some terminals), bidi overrides and isolates.
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


@dataclass
class State:
    """Of this command run: whether it was asked for JSON (set by :func:`worker.cli.main`), and whether its one
    document is out."""

    json: bool = False
    printed: bool = False


state = State()


def escape_controls(text: str) -> str:
    """``text`` with every control character shown as an escape (``\\x1b``), so none reaches the terminal."""
    return _CONTROL.sub(lambda match: match.group().encode("unicode_escape").decode("ascii"), text)


def plain(text: object, style: str = "") -> Text:
    """``text`` as it is, never parsed as markup nor passed to the terminal as a control sequence: for anything a
    sandbox, an agent or a user wrote."""
    return Text(escape_controls(str(text)), style=style)


def line(text: str) -> None:
    """One line on stdout, exactly as given."""
    stdout.out(text, highlight=False)


def json_doc(data: BaseModel | Any, **dump: Any) -> None:
    """The command's one JSON document on stdout: a pydantic model (``dump`` goes to ``model_dump``) or plain
    data; ASCII (``ensure_ascii``), so no character of it is a terminal control."""
    value = data.model_dump(mode="json", **dump) if isinstance(data, BaseModel) else data
    line(json.dumps(value, indent=2))
    state.printed = True


def show(renderable: RenderableType) -> None:
    """A table, a view or a note for people, on stderr. Strings are markup: data belongs in :func:`plain`."""
    stderr.print(renderable)


def error(message: str, field: str | None = None) -> None:
    """The one way to report a failure: ``error: <message> (field <field>)`` on one line of stderr; with --json,
    also the command's document when it has not printed one."""
    text = Text.assemble(("error:", "red"), " ", plain(message), f" (field {field})" if field else "")
    stderr.print(text, soft_wrap=True)
    if state.json and not state.printed:
        json_doc({"error": {"message": message, "field": field}})


def fail(message: str, *, field: str | None = None, code: int = 2) -> typer.Exit:
    """Report a failure and return the exit to raise: ``raise fail(...)``. Code 2 is a mistake in the
    command, 1 a command that ran and did not succeed (no such request, a session that failed)."""
    error(message, field)
    return typer.Exit(code)
