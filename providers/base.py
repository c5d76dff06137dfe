"""The provider interface: where a sandbox runs, not how we talk to the daemon inside it.

A driver (one module per backend, named after the vendor) implements :class:`Provider`. It knows nothing of
Celery, of credentials or of the daemon protocol: it starts a sandbox from a :class:`SandboxSpec`, runs
commands in it, uploads files, says how to reach a port, stops it, and lists the sandboxes it owns by label.
Every SDK exception is translated at the driver boundary into :mod:`worker.errors` classes, so callers
decide transient versus permanent in one place.

A driver module holds its config model (a :class:`ProviderConfig`) next to its driver class and imports its
SDK only inside the functions that call it, so loading the settings never needs the SDK (see
``providers/__init__.py``, the registry).
"""

from __future__ import annotations

import ipaddress
import shlex
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

from pydantic import BaseModel, ConfigDict, Field

from worker.errors import ProviderError, ProviderUnavailable

# Label keys carried by every sandbox we start. E2B filters metadata with a double-encoded query, so keys and
# values are kept to [A-Za-z0-9_-] (request and tenant ids are validated to that alphabet).
LABEL_OWNER = "sandbox-worker-owner"
LABEL_REQUEST_ID = "sandbox-worker-request-id"
LABEL_TENANT_ID = "sandbox-worker-tenant-id"
LABEL_CREATED_AT = "sandbox-worker-created-at"
LABEL_EXPIRES_AT = "sandbox-worker-expires-at"

# The exit code of a command killed at its deadline (SIGKILL: `timeout -s KILL` and Daytona's daemon alike).
EXIT_KILLED_AT_TIMEOUT = 137


def egress_network(entry: str) -> str | None:
    """The IPv4 network an egress entry names (an address or CIDR with no port), or None for a host name, a
    wildcard or an entry with a port: for providers whose allow-lists take networks only."""
    try:
        return str(ipaddress.IPv4Network(entry, strict=False))
    except ValueError:
        return None


class ProviderConfig(BaseModel):
    """Settings every driver takes; a driver's own config model extends it and becomes one
    ``SANDBOX_WORKER_<PROVIDER>__*`` block of :class:`worker.config.Settings`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    request_timeout: float = Field(30.0, gt=0, description="Seconds allowed for one provider API call.")
    start_timeout: float = Field(120.0, gt=0, description="Seconds allowed for a sandbox to start.")


@dataclass(frozen=True, slots=True)
class SandboxSpec:
    """What to start. ``env`` is the sandbox's non-secret environment; secrets only reach the daemon's
    process (see :meth:`Provider.spawn`)."""

    image: str | None
    labels: Mapping[str, str]
    env: Mapping[str, str] = field(default_factory=dict)
    cpu: float | None = None
    memory_mb: int | None = None
    ttl_seconds: int = 3600
    ports: tuple[int, ...] = ()
    idempotency_key: str | None = None
    # Destinations the sandbox may reach beyond what the operator allows every sandbox (the request's
    # sandbox.egress: host, *.domain or a CIDR, with an optional :port); each driver maps it onto what its
    # provider enforces, or refuses it.
    egress: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Sandbox:
    """A handle on a started sandbox."""

    provider: str
    sandbox_id: str
    labels: Mapping[str, str] = field(default_factory=dict)
    state: str = "running"
    # The address the sandbox's traffic comes from on the host's private network (Docker), when the provider
    # has one: the egress proxy accepts a vault placeholder only from it. None where traffic leaves through the
    # provider's egress (E2B, Daytona).
    private_address: str | None = None


@dataclass(frozen=True, slots=True)
class Endpoint:
    """How to reach a port of a sandbox: a base URL plus any headers the provider's edge requires
    (a traffic token, a preview token, or a Host header when routing through a proxy)."""

    url: str
    headers: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ExecResult:
    """A finished command. Drivers that cannot separate the streams put everything in ``stdout``."""

    exit_code: int
    stdout: str
    stderr: str

    def __bool__(self) -> bool:
        return self.exit_code == 0


def detached_command(argv: Sequence[str], *, cwd: str, log_path: str) -> str:
    """A POSIX shell line that starts ``argv`` in the background from ``cwd``, its output appended to
    ``log_path``, and exits at once (reporting a ``cwd`` it cannot create).

    Only the command goes to the background: in ``a && b && c &`` the ``&`` would take the whole list, and the
    subshell running it would hold the launcher's stdout open for the daemon's lifetime, so the launching
    exec would not end.
    """
    return (
        f"mkdir -p {shlex.quote(cwd)} && cd {shlex.quote(cwd)} && "
        f"{{ nohup {shlex.join(argv)} >>{shlex.quote(log_path)} 2>&1 </dev/null & }} && exit 0"
    )


class Provider(ABC):
    """One sandbox backend. Implementations must be safe to call from one thread at a time and must map
    their SDK's exceptions (and raw transport errors) to :mod:`worker.errors`.

    A driver sets ``name`` (its registry name) and ``config_model``, takes an instance of that model in its
    constructor, and implements the abstract methods; :meth:`spawn` is built on :meth:`exec` here."""

    name: ClassVar[str]
    config_model: ClassVar[type[ProviderConfig]]
    config: ProviderConfig

    def __init__(self, config: ProviderConfig) -> None:
        self.config = config

    @abstractmethod
    def start(self, spec: SandboxSpec) -> Sandbox:
        """Start a sandbox and return once commands can run in it."""

    @abstractmethod
    def find(self, sandbox_id: str) -> Sandbox | None:
        """The sandbox with this id, or None when it does not exist (any more)."""

    @abstractmethod
    def exec(
        self,
        sandbox: Sandbox,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        timeout: float = 60.0,
    ) -> ExecResult:
        """Run a command to completion. A non-zero exit is a result, not an exception."""

    def spawn(
        self,
        sandbox: Sandbox,
        argv: Sequence[str],
        *,
        env: Mapping[str, str],
        cwd: str,
        log_path: str,
    ) -> None:
        """Start a long-running process (the daemon) in the background and return at once. ``env`` may hold
        secrets: it must reach the process environment only, never argv, labels or the sandbox's own env.

        A launcher (:func:`detached_command`) is run with :meth:`exec`, ``env`` as that one command's
        environment (a docker exec's ``Env``, E2B's ``envs``, Daytona's ``process.exec`` body: never the
        command line nor the sandbox's env), which the backgrounded process inherits. The launcher exits as
        soon as the process is in the background, so the call is bounded by ``request_timeout`` and the
        driver's own command deadline never reaches the process. A launcher that fails (a ``cwd`` it cannot
        create) is a :class:`ProviderError`; one that does not finish in time is transient.
        """
        timeout = self.config.request_timeout
        launcher = detached_command(argv, cwd=cwd, log_path=log_path)
        result = self.exec(sandbox, ["sh", "-c", launcher], env=env, timeout=timeout)
        if result.exit_code == EXIT_KILLED_AT_TIMEOUT:
            raise ProviderUnavailable(
                f"{self.name} spawn failed: the launch command did not finish within {timeout:g}s",
                provider=self.name,
                sandbox_id=sandbox.sandbox_id,
            )
        if not result:
            output = (result.stderr or result.stdout).strip()[:200]
            raise ProviderError(
                f"{self.name} spawn failed: the launch command exited {result.exit_code}: {output}",
                provider=self.name,
                sandbox_id=sandbox.sandbox_id,
            )

    @abstractmethod
    def upload(self, sandbox: Sandbox, path: str, data: bytes, *, mode: int = 0o644) -> None:
        """Write ``data`` to the absolute ``path`` in the sandbox, creating parent directories."""

    @abstractmethod
    def endpoint(self, sandbox: Sandbox, port: int) -> Endpoint:
        """How the worker reaches ``port`` inside the sandbox."""

    @abstractmethod
    def stop(self, sandbox_id: str) -> bool:
        """Stop and remove the sandbox. Idempotent: returns False when it was already gone."""

    @abstractmethod
    def list_owned(self, labels: Mapping[str, str]) -> list[Sandbox]:
        """Every sandbox carrying all of ``labels`` (the owner label at least)."""

    def close(self) -> None:  # noqa: B027 - most drivers hold nothing worth closing
        """Release clients and connection pools."""
