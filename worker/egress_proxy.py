"""The egress proxy of the vault strategy: ``sandbox-worker egress-proxy``.

    sandbox ──placeholder──► http://<proxy>/<llm host>/<path> ──real credential──► <scheme>://<llm host>/<path>

* A request must carry a live placeholder (bound to a session at grant, deleted at release) in ``x-api-key``
  or ``Authorization: Bearer``; anything else gets 401, a dead or unknown placeholder 403.
* The first path segment names the upstream host. Only the host of the placeholder's vault ``llm_base_url``
  is served (403 otherwise); the scheme comes from the vault, never from the sandbox.
* Only the engine's model API is served: the method and the raw path must match one of
  :data:`worker.credentials.vault.MODEL_ROUTES` exactly (403 otherwise, naming the routes served), so files,
  batches, admin routes, dot segments and percent-encoded tricks never reach the upstream.
* A placeholder bound to its sandbox's private address (Docker) is refused from any other address (403).
* The real credential replaces the placeholder in the header that carried it. The upstream is asked for an
  uncompressed body, and the response streams back chunk by chunk as it arrives (SSE included) with any echo
  of the real credential masked on the way.
* One log line per request: request id, tenant, vault, upstream host, method, status, milliseconds; never a
  header, a query string or a body.

Sync Redis lookups run in the thread pool; everything else is async (uvicorn, starlette, httpx).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Callable
from typing import Any
from urllib.parse import urlsplit

import httpx
import structlog
from pydantic import SecretStr
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from worker import metrics
from worker.config import Settings
from worker.credentials.settings import EgressSettings
from worker.credentials.vault import MODEL_ROUTES, Binding, Placeholders, Vault, VaultStore, resolve
from worker.redaction import MASK
from worker.secret_store import SecretStore

log = structlog.get_logger(__name__)

Resolver = Callable[[str], "tuple[Binding, Vault, SecretStr] | None"]

METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "HEAD"]
# Hop-by-hop headers and those we set ourselves.
_DROP_REQUEST = {
    "connection",
    "keep-alive",
    "proxy-authorization",
    "te",
    "trailer",
    "upgrade",
    "host",
    "accept-encoding",
}
_DROP_RESPONSE = {
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "te",
    "trailer",
    "upgrade",
    "transfer-encoding",
    "content-length",
}


def carried_placeholder(headers: Headers) -> tuple[str, str] | None:
    """(header name, placeholder) from ``x-api-key`` or ``Authorization: Bearer``."""
    if key := headers.get("x-api-key"):
        return "x-api-key", key.strip()
    scheme, _, token = headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return "authorization", token.strip()
    return None


class Masker:
    """Masks a secret in a byte stream, holding back only a tail that could be the start of it."""

    def __init__(self, secret: str) -> None:
        self.secret = secret.encode()
        self.held = b""

    def feed(self, chunk: bytes) -> bytes:
        data = (self.held + chunk).replace(self.secret, MASK.encode())
        keep = next(
            (n for n in range(min(len(self.secret) - 1, len(data)), 0, -1) if data.endswith(self.secret[:n])), 0
        )
        self.held = data[len(data) - keep :]
        return data[: len(data) - keep]

    def flush(self) -> bytes:
        held, self.held = self.held, b""
        return held


def _refuse(status: int, message: str) -> JSONResponse:
    metrics.EGRESS_REQUESTS.labels("unreachable" if status == 502 else "refused", str(status)).inc()
    return JSONResponse({"error": {"type": "egress_proxy", "message": message}}, status_code=status)


def _misuse(
    binding: Binding, vault: Vault, client: str | None, method: str, authority: str, path: str
) -> tuple[str, str] | None:
    """Why a live placeholder may not be used for this request, (reason logged, message to the sandbox); None when
    it may: from its own sandbox, to its vault's host, for a model API route."""
    upstream = urlsplit(vault.llm_base_url).netloc
    if binding.source is not None and client != binding.source:
        return "not its sandbox", "this credential is valid only from the sandbox it was issued to"
    if authority.lower() != upstream.lower():
        return "host not allowed", f"this credential is valid for {upstream} only"
    if not vault.model_route(method, path):
        served = ", ".join(f"{m} {route or '/'}" for m, route in sorted(MODEL_ROUTES[vault.engine]))
        return "not a model route", (
            f"{method} {path[:200] or '/'} is not a model API route: this proxy forwards only {served} "
            f"under {vault.llm_base_url}"
        )
    return None


class EgressProxy:
    def __init__(self, resolver: Resolver, *, timeout: float = 600.0) -> None:
        self.resolver = resolver
        self.client = httpx.AsyncClient(timeout=httpx.Timeout(timeout, connect=10.0), follow_redirects=False)

    def app(self) -> Starlette:
        @contextlib.asynccontextmanager
        async def lifespan(_app: Starlette) -> AsyncIterator[None]:
            yield
            await self.client.aclose()

        return Starlette(
            routes=[
                Route("/-/health", self.health, methods=["GET"]),
                Route("/{target:path}", self.forward, methods=METHODS),
            ],
            lifespan=lifespan,
        )

    async def health(self, _request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def forward(self, request: Request) -> Response:
        started = time.perf_counter()
        # The raw path, not the decoded one: what is matched is exactly what would be sent upstream.
        raw = request.scope.get("raw_path") or request.scope["path"].encode()
        _, _, target = raw.decode("latin-1").partition("/")
        authority, slash, rest = target.partition("/")
        path = slash + rest
        carried = carried_placeholder(request.headers)
        if carried is None:
            log.info("egress refused", reason="no placeholder", upstream=authority, method=request.method)
            return _refuse(401, "no credential: send the session's placeholder as x-api-key or a bearer token")
        header, placeholder = carried
        found = await run_in_threadpool(self.resolver, placeholder)
        if found is None:
            log.info("egress refused", reason="dead placeholder", upstream=authority, method=request.method)
            return _refuse(403, "this credential is not valid (unknown, or its session has ended)")
        binding, vault, credential = found
        upstream = urlsplit(vault.llm_base_url)
        context: dict[str, Any] = {
            "request_id": binding.request_id,
            "tenant_id": binding.tenant_id,
            "vault": binding.vault,
            "upstream": authority,
            "method": request.method,
        }
        client = request.client.host if request.client else None
        if misuse := _misuse(binding, vault, client, request.method, authority, path):
            log.info("egress refused", reason=misuse[0], **context)
            return _refuse(403, misuse[1])
        url = f"{upstream.scheme}://{upstream.netloc}{path}"
        if request.url.query:
            url = f"{url}?{request.url.query}"
        secret = credential.get_secret_value()
        headers = {k: v for k, v in request.headers.items() if k not in _DROP_REQUEST}
        headers[header] = secret if header == "x-api-key" else f"Bearer {secret}"
        headers["accept-encoding"] = "identity"
        has_body = "content-length" in request.headers or "transfer-encoding" in request.headers
        outgoing = self.client.build_request(
            request.method, url, headers=headers, content=request.stream() if has_body else None
        )
        try:
            response = await self.client.send(outgoing, stream=True)
        except httpx.TransportError as exc:
            log.warning("egress upstream unreachable", error=type(exc).__name__, **context)
            return _refuse(502, f"{upstream.netloc} is unreachable ({type(exc).__name__})")
        masker = Masker(secret)

        async def body() -> AsyncIterator[bytes]:
            try:
                async for chunk in response.aiter_raw():
                    if out := masker.feed(chunk):
                        yield out
                if tail := masker.flush():
                    yield tail
            finally:
                await response.aclose()
                ms = round((time.perf_counter() - started) * 1000, 1)
                log.info("egress", status=response.status_code, ms=ms, **context)
                metrics.EGRESS_REQUESTS.labels("forwarded", str(response.status_code)).inc()

        response_headers = {
            k: v.replace(secret, MASK) for k, v in response.headers.items() if k.lower() not in _DROP_RESPONSE
        }
        return StreamingResponse(body(), status_code=response.status_code, headers=response_headers)


def build_app(settings: Settings, secrets: SecretStore) -> Starlette:
    egress = settings.credentials.egress
    placeholders, vaults = Placeholders(secrets), VaultStore(secrets)

    def resolver(placeholder: str) -> tuple[Binding, Vault, SecretStr] | None:
        return resolve(placeholder, placeholders=placeholders, vaults=vaults, egress=egress)

    return EgressProxy(resolver, timeout=egress.upstream_timeout).app()


def serve(settings: Settings, *, host: str | None = None, port: int | None = None) -> None:
    """Run the proxy until interrupted (uvicorn, one process)."""
    import uvicorn

    from worker.logs import configure_logging
    from worker.store import Store

    configure_logging(settings.log_format)
    if settings.metrics_port:  # its own endpoint, on a port sandboxes are not given (the proxy's is theirs)
        from prometheus_client import start_http_server

        start_http_server(settings.metrics_port, addr=settings.metrics_host)
    egress: EgressSettings = settings.credentials.egress
    app = build_app(settings, SecretStore.from_store(Store.from_settings(settings)))
    log.info("egress proxy starting", host=host or egress.listen_host, port=port or egress.listen_port)
    # proxy_headers off: a forwarded-for header must never stand in for the source address a placeholder is
    # bound to. h11 and asyncio named, not picked: what the tests install for their stand-ins (httptools, uvloop)
    # must not change the proxy they test.
    uvicorn.run(
        app,
        host=host or egress.listen_host,
        port=port or egress.listen_port,
        access_log=False,
        log_config=None,
        proxy_headers=False,
        http="h11",
        loop="asyncio",
    )
