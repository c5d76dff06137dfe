"""Failover: which providers a request may run on, in order, and which failures move it to the next one.

A request runs on ``provider``; when its create fails on the provider's side (an outage or a quota, after the
stage's retries) or the provider's circuit breaker (:mod:`worker.breaker`) is open, the sandbox stage tries the
next provider of the request's ``fallback_providers``, or of the operator's ``fleet.failover`` list for
``provider`` when the request names none. A bad request, a rejected key or a capacity wait never fails over: they
would fail the same way anywhere, or are the operator's to fix.

Images, templates and snapshots are named differently on each provider, so ``sandbox.image`` applies to the first
choice only; a fallback starts its own default image.
"""

from __future__ import annotations

from worker.errors import ProviderAuthError, ProviderError, ProviderUnavailable, SandboxGone, SandboxWorkerError
from worker.fleet import FleetConfig
from worker.models import ProviderName, SessionRequest


def candidates(request: SessionRequest, config: FleetConfig) -> list[ProviderName]:
    """The providers ``request`` may run on, first choice first, each once."""
    if request.fallback_providers is not None:
        fallbacks = request.fallback_providers
    else:
        fallbacks = config.failover.get(request.provider, [])
    return list(dict.fromkeys([request.provider, *fallbacks]))


def provider_side(error: SandboxWorkerError) -> bool:
    """Did the provider fail, rather than the request or our account? Only these fail over and count against the
    provider's breaker."""
    if isinstance(error, ProviderUnavailable):  # 5xx, unreachable, 429 or out of quota
        return True
    if isinstance(error, ProviderAuthError | SandboxGone) or not isinstance(error, ProviderError):
        return False
    # A plain provider error is the request's fault when it names a field or the provider answered 4xx.
    return error.field is None and (error.status is None or error.status >= 500)


def image_for(request: SessionRequest, provider: ProviderName) -> str | None:
    """The request's image on its first choice; the provider's default on a fallback."""
    return request.sandbox.image if provider == request.provider else None
