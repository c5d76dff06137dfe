"""Last line of defence for secrets in text: values registered here are masked wherever we print or store.

Secrets are SecretStr from the moment they enter, so our own code never puts them in a message; this catches what
the sandbox sends back. The agent is untrusted: it can read its credential and echo it in its reply, a tool
call's title, its session id, an error, the daemon's log. A bring-up registers the session's secret values and
placeholders (:meth:`Redactor.register`) and every text that leaves the worker passes through :data:`REDACTOR`:

* records and results: :meth:`Redactor.redact_data` over the result before it is written (worker.store) or
  returned (tasks.sessions);
* log lines: :class:`RedactingFormatter` wraps the formatter of every logging handler, Celery's included, so the
  final text of a line (message, arguments, traceback) is masked whatever logger wrote it;
* exceptions a task raises (stored by Celery in its result backend): masked by the task base class in tasks/.

Celery logs a task's outcome ("Task … succeeded in …: <result>") after the task function returned, so a task
*holds* the redactor (:meth:`Redactor.hold`, tasks/__init__.py) and what the bring-up forgets is forgotten only
when the task has ended, its last line written.

Exact matches only: an agent that encodes its key (base64, reversed, split) defeats any filter. The strategies that
never hand the sandbox a real key (vault: a placeholder; gateway: a scoped, budgeted key) are the real protection.
"""

from __future__ import annotations

import json
import logging
import threading
from collections import Counter
from collections.abc import Iterable, MutableMapping
from typing import Any

MASK = "[redacted]"
_MIN_LENGTH = 6  # shorter values would mask ordinary words


class Redactor:
    """The values to mask, counted (two sessions of one process may share a value, such as an org key: the
    first to end must not unmask it for the other)."""

    def __init__(self) -> None:
        self._values: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._held = threading.local()  # the forgets deferred by hold(), per thread
        # The values longest first (a value containing another is masked whole), and each as it reads inside a JSON
        # string: kept between changes, as every log line and record write asks for them.
        self._sorted: list[str] = []
        self._in_json: list[str] = []

    def _changed(self) -> None:
        """With the lock held: the registered values changed."""
        self._sorted = sorted(self._values, key=len, reverse=True)
        self._in_json = sorted(
            {form for v in self._sorted for form in (json.dumps(v)[1:-1], json.dumps(v, ensure_ascii=False)[1:-1])}
        )

    def register(self, values: Iterable[str]) -> None:
        added = [v for v in values if len(v) >= _MIN_LENGTH]
        if not added:  # a grant or an endpoint with no secret: nothing to re-sort on a bring-up's path
            return
        with self._lock:
            self._values.update(added)
            self._changed()

    def forget(self, values: Iterable[str]) -> None:
        kept = [v for v in values if len(v) >= _MIN_LENGTH]
        pending: list[str] | None = getattr(self._held, "pending", None)
        if pending is not None:
            pending.extend(kept)
            return
        with self._lock:
            self._values.subtract(kept)
            self._values = +self._values  # drop the values no longer registered by anyone
            self._changed()

    def hold(self) -> None:
        """Until :meth:`release`, what this thread forgets stays masked (a task's own last log lines)."""
        self._held.pending = []

    def release(self) -> None:
        pending: list[str] = getattr(self._held, "pending", None) or []
        self._held.pending = None
        self.forget(pending)

    def redact(self, text: str) -> str:
        for value in self._sorted:  # read once: a change replaces the list, never alters it
            text = text.replace(value, MASK)
        return text

    def found_in_json(self, text: str) -> bool:
        """Whether a registered value may be in the JSON document ``text`` (as it is, or escaped in a string): when
        not, nothing in the data it encodes needs masking. May say yes where nothing needs it, never no where
        something does."""
        return any(form in text for form in self._in_json)

    def redact_data(self, data: Any) -> Any:
        """JSON-like data (dicts, lists, strings, numbers) with every string, key or value, redacted."""
        if isinstance(data, str):
            return self.redact(data)
        if isinstance(data, dict):
            return {self.redact_data(k): self.redact_data(v) for k, v in data.items()}
        if isinstance(data, list | tuple):
            return [self.redact_data(item) for item in data]
        return data

    def processor(self, _logger: Any, _name: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        """structlog processor masking registered values in every string field."""
        for key, value in event.items():
            if isinstance(value, str):
                event[key] = self.redact(value)
        return event


REDACTOR = Redactor()


class RedactingFormatter(logging.Formatter):
    """A handler's formatter, its output masked: whatever a record carries (arguments, a traceback, a repr) is
    masked in the text that is written."""

    def __init__(self, inner: logging.Formatter | None, redactor: Redactor = REDACTOR) -> None:
        super().__init__()
        self.inner = inner or logging.Formatter()
        self.redactor = redactor

    def format(self, record: logging.LogRecord) -> str:
        return self.redactor.redact(self.inner.format(record))


def redact_handlers() -> None:
    """Mask the output of every handler of every logger there is now (the root's, Celery's, libraries')."""
    loggers = [
        logging.getLogger(),
        *(v for v in logging.root.manager.loggerDict.values() if isinstance(v, logging.Logger)),
    ]
    for logger in loggers:
        for handler in logger.handlers:
            if not isinstance(handler.formatter, RedactingFormatter):
                handler.setFormatter(RedactingFormatter(handler.formatter))
