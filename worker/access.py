"""How a client reaches a ready session's daemon: read from the record, handed out only on request."""

from __future__ import annotations

from dataclasses import dataclass, field

from pydantic import SecretStr

from worker.models import SessionState
from worker.store import Store


@dataclass(frozen=True)
class DaemonAccess:
    """Everything a client needs to reach a live session's daemon. Secret: handed out only on request."""

    url: str
    token: SecretStr
    headers: dict[str, SecretStr] = field(default_factory=dict)

    def http_headers(self) -> dict[str, str]:
        """The headers of every request to the daemon: the provider's, then the bearer token."""
        values = {name: value.get_secret_value() for name, value in self.headers.items()}
        return {**values, "Authorization": f"Bearer {self.token.get_secret_value()}"}


def access_for(store: Store, request_id: str) -> DaemonAccess | None:
    """How to reach the daemon of a ready session, for a client that asked for it explicitly."""
    record = store.get(request_id)
    if record is None or record.result.state is not SessionState.ready or not record.result.daemon_url:
        return None
    token = store.token_of(record)
    if token is None:
        return None
    return DaemonAccess(record.result.daemon_url, token, store.headers_of(record))
