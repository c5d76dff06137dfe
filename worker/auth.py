"""Who may ask for what: per-app signing keys, the tenants and images each app may use, and the checks the worker
makes on every task before it touches a record, a credential or a sandbox.

A client configured with an app id and key signs each task it sends: HMAC-SHA256 with the app's key over a
canonical encoding of (operation, subject, issued_at), where the subject is the request itself for ``create``
(canonical JSON) and the request_id for ``terminate`` and ``status``. The signature travels beside the request
in the task (:class:`Envelope`, the task's ``auth`` argument), never the key. The worker recomputes it with the
key it has for that app, refuses one issued outside its window, then checks the app may act for the tenant and
use the image.

Replays inside the window do no harm: a request_id owns one record, so a replayed ``create`` answers from it and
a replayed ``terminate`` finds the session already ended. A task's retries and a redelivery re-run the same signed
message, possibly past the window: a ``create`` whose request already has its record is served then (the task
checks, :func:`tasks.sessions._check_create`).

``mode=open`` turns all of it off: any sender may name any tenant and image (one trusted app, or ``make demo``).
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import hmac
import json
import time
from collections.abc import Mapping
from enum import StrEnum
from typing import Any

from cryptography.fernet import Fernet
from pydantic import BaseModel, ConfigDict, Field, SecretStr

from worker.errors import InvalidRequest
from worker.models import SessionRequest

# The app id workers sign their own sends with (the reaper's requeues, batch sessions): any tenant.
WORKER_APP = "sandbox-worker"


class AuthMode(StrEnum):
    signed = "signed"
    open = "open"


class Operation(StrEnum):
    create = "create"
    terminate = "terminate"
    status = "status"
    access = "access"


class AppCredential(BaseModel):
    """One app that may send tasks: its key and what it may ask for."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    key: SecretStr = Field(
        min_length=32, description="The app's signing key (shared with the app), 32 characters or more."
    )
    tenants: list[str] = Field(
        default_factory=list, description="Tenants the app may act for: ids or fnmatch patterns (`acme-*`, `*`)."
    )
    images: list[str] | None = Field(
        None,
        description="Narrows the operator's image allow-list for this app (fnmatch patterns); all of it when absent.",
    )

    def may_act_for(self, tenant_id: str) -> bool:
        return _matches(tenant_id, self.tenants)

    def seal(self, secret: SecretStr) -> str:
        """``secret`` encrypted for this app alone: how a daemon token travels in a task result to it."""
        return _sealer(self.key).encrypt(secret.get_secret_value().encode()).decode()


class AuthSettings(BaseModel):
    """The ``SANDBOX_WORKER_AUTH__*`` block: the worker's side (mode, apps, images, window) and the client's
    (``app_id``, ``app_key``: what a web app or the CLI signs with)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    mode: AuthMode = Field(
        AuthMode.signed,
        description="'signed': every task must carry a valid signature of an app allowed for its tenant and image; "
        "'open': no checks (a single trusted app, or the demo).",
    )
    apps: dict[str, AppCredential] = Field(
        default_factory=dict,
        description='Apps that may send tasks (JSON): {"app_id": {"key": "...", "tenants": ["acme", "beta-*"], '
        '"images": ["registry.example/*"]}}.',
    )
    images: list[str] = Field(
        default_factory=list,
        description="Images, templates or snapshots a request may name (fnmatch patterns); each provider's configured "
        "default is always allowed.",
    )
    max_age_seconds: int = Field(
        3600,
        ge=60,
        description="How long a signature stays valid for a request without a record yet (a retry or redelivery of "
        "one that has its record is served past it).",
    )
    max_skew_seconds: int = Field(60, ge=0, description="How far in the future a signature's issued_at may be.")
    worker_key: SecretStr | None = Field(
        None,
        min_length=32,
        description=f"The key workers sign their own sends with (reaper requeues, batch sessions) as app "
        f"'{WORKER_APP}', any tenant; needed in signed mode for batches.",
    )
    app_id: str | None = Field(None, description="Client side: the app id this process signs its tasks as.")
    app_key: SecretStr | None = Field(None, description="Client side: that app's key.")

    def signer(self) -> Signer | None:
        """What this process signs with: the client's app, else the worker's own key; None when neither is set."""
        if self.app_id and self.app_key:
            return Signer(self.app_id, self.app_key)
        if self.worker_key:
            return Signer(WORKER_APP, self.worker_key)
        return None

    def credential(self, app_id: str) -> AppCredential | None:
        if app_id == WORKER_APP and self.worker_key is not None:
            return AppCredential(key=self.worker_key, tenants=["*"])
        return self.apps.get(app_id)


class Envelope(BaseModel):
    """A task's proof of its sender: carried as the task's ``auth`` argument, beside the request."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    app_id: str = Field(max_length=128)
    issued_at: float
    signature: str = Field(max_length=128)


class SignatureExpired(InvalidRequest):
    """A signature that matches but is older than the window; ``app`` signed it."""

    def __init__(self, app: AppCredential, max_age_seconds: int) -> None:
        super().__init__(f"the signature expired (older than {max_age_seconds} s)", field="auth.issued_at")
        self.app = app


def _matches(value: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatchcase(value, pattern) for pattern in patterns)


def canonical(operation: Operation, subject: Any, issued_at: float) -> bytes:
    """The bytes signed: one JSON array with sorted keys and no spaces, so the client and the worker encode the
    same request the same way whatever order its keys arrived in."""
    return json.dumps(
        [operation.value, subject, issued_at], sort_keys=True, separators=(",", ":"), ensure_ascii=True
    ).encode()


def _mac(key: SecretStr, message: bytes) -> str:
    return hmac.new(key.get_secret_value().encode(), message, hashlib.sha256).hexdigest()


def _sealer(key: SecretStr) -> Fernet:
    """A Fernet key of its own derived from the app's key, so sealing never uses the signing key itself."""
    derived = hmac.new(key.get_secret_value().encode(), b"sandbox-worker seal", hashlib.sha256).digest()
    return Fernet(base64.urlsafe_b64encode(derived))


class Signer:
    """Signs tasks as one app."""

    def __init__(self, app_id: str, key: SecretStr) -> None:
        self.app_id = app_id
        self._key = key

    def sign(self, operation: Operation, subject: Any, now: float | None = None) -> dict[str, Any]:
        issued_at = round(time.time() if now is None else now, 3)
        signature = _mac(self._key, canonical(operation, subject, issued_at))
        return Envelope(app_id=self.app_id, issued_at=issued_at, signature=signature).model_dump()

    def unseal(self, sealed: str) -> SecretStr:
        return SecretStr(_sealer(self._key).decrypt(sealed.encode()).decode())

    def __repr__(self) -> str:
        return f"Signer(app_id={self.app_id!r})"


def authenticate(
    settings: AuthSettings, operation: Operation, subject: Any, auth: Any, now: float | None = None
) -> AppCredential | None:
    """The app that signed this task; None in open mode. Raises InvalidRequest(field='auth') naming the reason."""
    if settings.mode is AuthMode.open:
        return None
    if auth is None:
        raise InvalidRequest(
            "the task is not signed (no auth): configure the client's app_id and app_key", field="auth"
        )
    if not isinstance(auth, Mapping):
        raise InvalidRequest("auth must be an object with app_id, issued_at and signature", field="auth")
    try:
        envelope = Envelope.model_validate(auth)
    except ValueError:
        raise InvalidRequest("auth must be an object with app_id, issued_at and signature", field="auth") from None
    app = settings.credential(envelope.app_id)
    if app is None:
        raise InvalidRequest(f"unknown app {envelope.app_id!r}", field="auth.app_id")
    expected = _mac(app.key, canonical(operation, subject, envelope.issued_at))
    if not hmac.compare_digest(expected, envelope.signature):
        raise InvalidRequest(
            "the signature does not match (wrong key, or the task was altered)", field="auth.signature"
        )
    now = time.time() if now is None else now
    if envelope.issued_at > now + settings.max_skew_seconds:
        raise InvalidRequest("the signature is issued in the future (clock skew)", field="auth.issued_at")
    if envelope.issued_at < now - settings.max_age_seconds:
        raise SignatureExpired(app, settings.max_age_seconds)
    return app


def authorize_tenant(app: AppCredential | None, tenant_id: str | None) -> None:
    """Raises InvalidRequest(field='tenant_id') unless ``app`` may act for ``tenant_id`` (always, in open mode)."""
    if app is not None and (tenant_id is None or not app.may_act_for(tenant_id)):
        raise InvalidRequest(f"the app may not act for tenant {tenant_id!r}", field="tenant_id")


def authorize_request(
    settings: AuthSettings, app: AppCredential | None, request: SessionRequest, default_images: list[str]
) -> None:
    """The tenant and the image of ``request`` against what ``app`` and the operator allow (nothing in open mode).
    ``default_images`` are the providers' configured defaults, always allowed."""
    if app is None:
        return
    authorize_tenant(app, request.tenant_id)
    image = request.sandbox.image
    if image is None or image in default_images:
        return
    if not _matches(image, settings.images):
        raise InvalidRequest(f"image {image!r} is not on the operator's allow-list", field="sandbox.image")
    if app.images is not None and not _matches(image, app.images):
        raise InvalidRequest(f"image {image!r} is not allowed for this app", field="sandbox.image")
