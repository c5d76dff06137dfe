"""The secret store: per-tenant named secrets and sealed records, Fernet-encrypted in Redis.

Secrets enter as ``SecretStr`` (``sandbox-worker secrets put``, or :meth:`SecretStore.put`) and leave only
through :meth:`SecretStore.get`, again as ``SecretStr``. Nothing here logs, and no message carries a value.
Writing or reading a value needs the Fernet key (``SANDBOX_WORKER_FERNET_KEY``): without it the store raises
ConfigurationError instead of keeping anything in the clear. Listing names needs no key.

Keys (prefix ``sw:``):

* ``sw:secrets:<tenant>`` — hash: secret name → Fernet ciphertext of the value.
* ``sw:sealed:<kind>:<tenant>`` — hash: record name → Fernet ciphertext of a record's JSON
  (``gateway`` keys minted for the tenant, ``vault`` definitions).
* ``sw:default:<tenant>`` — the tenant's default credentials (a CredentialsSpec: references, no value).
* ``sw:lock:<name>`` — short-lived locks (minting a tenant's gateway key).
"""

from __future__ import annotations

import contextlib
import re
import threading
from collections.abc import Iterator
from typing import Annotated, TypeVar

import redis
from pydantic import BaseModel, PlainSerializer, SecretStr, SerializationInfo

from worker.errors import Busy, CredentialError, InvalidRequest
from worker.lease import renewed
from worker.models import CredentialsSpec
from worker.store import PREFIX, Cipher, Rekey, Store

_REVEAL = "reveal"
_TENANT = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")

Record = TypeVar("Record", bound=BaseModel)


def _reveal(value: SecretStr, info: SerializationInfo) -> str:
    """A SecretStr serialises in the clear only while a record is being sealed; masked everywhere else."""
    context = info.context
    if isinstance(context, dict) and context.get(_REVEAL):
        return value.get_secret_value()
    return str(value)


SealedStr = Annotated[SecretStr, PlainSerializer(_reveal, return_type=str)]
"""A secret field of a sealed record: stored encrypted with the record, masked in any other dump."""


def check_tenant(tenant: str) -> str:
    if not _TENANT.match(tenant):
        raise InvalidRequest(f"tenant id {tenant!r} is not valid (letters, digits, _ and -; 1-64)", field="tenant_id")
    return tenant


def check_name(name: str) -> str:
    if not _NAME.match(name):
        raise InvalidRequest(f"name {name!r} is not valid (letters, digits, _ . and -; 1-128)", field="name")
    return name


class SecretStore:
    def __init__(self, client: redis.Redis, cipher: Cipher) -> None:
        self.redis = client
        self.cipher = cipher

    @classmethod
    def from_store(cls, store: Store) -> SecretStore:
        return cls(store.redis, store.cipher)

    def __repr__(self) -> str:
        return "SecretStore()"

    # -- tenant secrets ---------------------------------------------------------------------------------
    def put(self, tenant: str, name: str, value: SecretStr) -> None:
        """Store (or replace) the tenant's secret ``name``."""
        check_name(name)
        if not value.get_secret_value().strip():
            raise InvalidRequest(f"secret {name} is empty", field="value")
        self.redis.hset(self._secrets(tenant), name, self.cipher.encrypt(value))

    def get(self, tenant: str, name: str, *, field: str | None = None) -> SecretStr:
        """The tenant's secret ``name``; CredentialError (naming ``field``) when it does not exist."""
        token = self.redis.hget(self._secrets(tenant), name)
        if token is None:
            raise CredentialError(f"tenant {tenant} has no secret named {name!r}", field=field)
        return self.cipher.decrypt(str(token))

    def names(self, tenant: str) -> list[str]:
        return sorted(str(name) for name in self.redis.hkeys(self._secrets(tenant)))

    def delete(self, tenant: str, name: str) -> bool:
        return bool(self.redis.hdel(self._secrets(tenant), name))

    # -- sealed records ---------------------------------------------------------------------------------
    def seal(self, kind: str, tenant: str, name: str, record: BaseModel) -> None:
        """Store ``record`` encrypted as a whole, its SealedStr fields in the clear inside the ciphertext."""
        plain = SecretStr(record.model_dump_json(context={_REVEAL: True}))
        self.redis.hset(self._sealed(kind, tenant), name, self.cipher.encrypt(plain))

    def unseal(self, kind: str, tenant: str, name: str, model: type[Record]) -> Record | None:
        token = self.redis.hget(self._sealed(kind, tenant), name)
        if token is None:
            return None
        return model.model_validate_json(self.cipher.decrypt(str(token)).get_secret_value())

    def sealed_names(self, kind: str, tenant: str) -> list[str]:
        return sorted(str(name) for name in self.redis.hkeys(self._sealed(kind, tenant)))

    def tenants_with(self, kind: str) -> list[str]:
        """The tenants holding any sealed record of ``kind``."""
        prefix = self._sealed(kind, "x")[:-1]
        return sorted(str(key)[len(prefix) :] for key in self.redis.scan_iter(match=f"{prefix}*", count=500))

    def drop(self, kind: str, tenant: str, name: str) -> bool:
        return bool(self.redis.hdel(self._sealed(kind, tenant), name))

    def rekey(self, rekey: Rekey) -> None:
        """Re-encrypt every tenant secret and sealed record with the first Fernet key."""
        rekey.hash_fields(f"{PREFIX}secrets:*")
        rekey.hash_fields(f"{PREFIX}sealed:*")

    # -- tenant defaults --------------------------------------------------------------------------------
    def set_default(self, tenant: str, spec: CredentialsSpec) -> None:
        """The credentials a request of ``tenant`` gets when it names no strategy."""
        if spec.strategy is None:
            raise InvalidRequest("a tenant default must name a strategy", field="strategy")
        self.redis.set(self._default(tenant), spec.model_dump_json(exclude_defaults=True))

    def default(self, tenant: str) -> CredentialsSpec | None:
        raw = self.redis.get(self._default(tenant))
        return CredentialsSpec.model_validate_json(raw) if raw else None

    # -- tenants ----------------------------------------------------------------------------------------
    def purge(self, tenant: str) -> None:
        """Forget everything kept for ``tenant``: secrets, sealed records, default."""
        sealed = list(self.redis.scan_iter(match=f"{PREFIX}sealed:*:{check_tenant(tenant)}", count=500))
        self.redis.delete(self._secrets(tenant), self._default(tenant), *sealed)

    @contextlib.contextmanager
    def locked(self, name: str, seconds: float) -> Iterator[None]:
        """Hold the Redis lock ``name`` (waiting up to ``seconds``); Busy when another holder keeps it."""
        lock = self.redis.lock(f"{PREFIX}lock:{name}", timeout=seconds, blocking_timeout=seconds, thread_local=False)
        if not lock.acquire():
            raise Busy(f"lock {name} is held by another worker")
        try:
            # Renewed while held: a slow mint must not let the lock expire and a second worker mint as well.
            with renewed(lock, seconds, threading.Event(), name=name):
                yield
        finally:
            with contextlib.suppress(redis.exceptions.LockError):
                lock.release()

    # -- keys -------------------------------------------------------------------------------------------
    @staticmethod
    def _secrets(tenant: str) -> str:
        return f"{PREFIX}secrets:{check_tenant(tenant)}"

    @staticmethod
    def _sealed(kind: str, tenant: str) -> str:
        return f"{PREFIX}sealed:{kind}:{check_tenant(tenant)}"

    @staticmethod
    def _default(tenant: str) -> str:
        return f"{PREFIX}default:{check_tenant(tenant)}"
