"""Last line of defence for secrets in text: values registered here are masked wherever we print.

Secrets are SecretStr from the moment they enter, so they should never reach a message in the first place;
this catches what a third party echoes back (a daemon log tail, an SDK error body).
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, MutableMapping
from typing import Any

MASK = "[redacted]"
_MIN_LENGTH = 6  # shorter values would mask ordinary words


class Redactor:
    def __init__(self) -> None:
        self._values: set[str] = set()
        self._lock = threading.Lock()

    def register(self, values: Iterable[str]) -> None:
        with self._lock:
            self._values.update(v for v in values if len(v) >= _MIN_LENGTH)

    def forget(self, values: Iterable[str]) -> None:
        with self._lock:
            self._values.difference_update(values)

    def redact(self, text: str) -> str:
        with self._lock:
            values = sorted(self._values, key=len, reverse=True)
        for value in values:
            text = text.replace(value, MASK)
        return text

    def processor(self, _logger: Any, _name: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        """structlog processor masking registered values in every string field."""
        for key, value in event.items():
            if isinstance(value, str):
                event[key] = self.redact(value)
        return event


REDACTOR = Redactor()
