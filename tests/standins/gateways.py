"""Stand-in gateways: OpenRouter, a LiteLLM proxy and Portkey, on their documented management endpoints.

Each records every management call it was sent (method, path, JSON body, query) and the keys it minted,
checks the management key, and serves its LLM endpoints (OpenAI- and Anthropic-compatible) to live keys
only, recording which key each LLM call used. ``mint_delay`` slows key creation (to widen a race) and
``fail_next`` makes the next management call answer with that status and a body echoing the management key.

    OpenRouter  POST /api/v1/keys · GET|DELETE /api/v1/keys/{hash}               Authorization: Bearer
                LLM: /api/v1/chat/completions, /api/v1/messages
    LiteLLM     POST /team/new, /key/generate, /key/delete, /team/delete · GET /team/info   Bearer
                LLM: /v1/chat/completions, /v1/messages
    Portkey     POST /v1/api-keys/{type}/{sub_type} · DELETE /v1/api-keys/{id}
                GET /v1/analytics/graphs/cost                                      x-portkey-api-key
                LLM: /v1/chat/completions, /v1/messages
"""

from __future__ import annotations

import asyncio
import secrets
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tests.standins.llm_upstream import credential_of


@dataclass
class Recorded:
    method: str
    path: str
    body: Any
    query: dict[str, str]


@dataclass
class MintedRecord:
    key: str
    key_id: str
    name: str
    body: dict[str, Any]
    revoked: bool = False


Handler = Callable[[Any, Request, Any], Awaitable[Response]]


def management(handler: Handler) -> Callable[[Any, Request], Awaitable[Response]]:
    """A management endpoint: the call is recorded and admitted (management key, forced failure) first."""

    async def endpoint(self: GatewayStandIn, request: Request) -> Response:
        body, refused = await self.admit(request)
        return refused or await handler(self, request, body)

    return endpoint


class GatewayStandIn:
    """Shared machinery; subclasses declare their management routes and LLM prefix."""

    llm_prefix = "/v1"
    key_prefix = "sk-standin-"

    def __init__(self, management_key: str, *, mint_delay: float = 0.0) -> None:
        self.management_key = management_key
        self.mint_delay = mint_delay
        self.fail_next: int | None = None
        # (HTTP method, path fragment, status): fail every such management call until cleared
        self.fail_calls: tuple[str, str, int] | None = None
        self.calls: list[Recorded] = []
        self.minted: list[MintedRecord] = []
        self.llm_calls: list[tuple[str, str]] = []  # (path, key)
        self.spend_usd: dict[str, float] = {}  # by key id
        # Where an authorised LLM call goes: None answers a fixed reply; an LLM API stand-in (tests/standins/llm_api.py)
        # serves real agents, which stream.
        self.upstream: Any = None

    def management_routes(self) -> list[Route]:
        raise NotImplementedError

    def presented_management_key(self, request: Request) -> str | None:
        return credential_of(request)[0]

    def app(self) -> Starlette:
        llm = [
            Route(f"{self.llm_prefix}/chat/completions", self.llm, methods=["POST"]),
            Route(f"{self.llm_prefix}/messages", self.llm, methods=["POST"]),
            Route(f"{self.llm_prefix}/responses", self.llm, methods=["POST"]),
            Route("/", self.root, methods=["GET", "HEAD"]),
        ]
        return Starlette(routes=[*self.management_routes(), *llm])

    # -- helpers ----------------------------------------------------------------------------------------
    def live(self) -> list[MintedRecord]:
        return [m for m in self.minted if not m.revoked]

    def creations(self) -> list[Recorded]:
        return [c for c in self.calls if c.method == "POST" and c.path == self.creation_path()]

    def creation_path(self) -> str:
        raise NotImplementedError

    def by_id(self, key_id: str) -> MintedRecord | None:
        return next((m for m in self.minted if m.key_id == key_id), None)

    async def admit(self, request: Request) -> tuple[Any, Response | None]:
        """Record a management call; a refusal when the key is wrong or a failure was asked for."""
        raw = await request.body()
        body = await request.json() if raw else None
        self.calls.append(Recorded(request.method, request.url.path, body, dict(request.query_params)))
        if self.presented_management_key(request) != self.management_key:
            return body, JSONResponse({"error": {"message": "invalid management key"}}, 401)
        if self.fail_calls is not None:
            method, fragment, status = self.fail_calls
            if request.method == method and fragment in request.url.path:
                return body, JSONResponse({"error": {"message": "failing on purpose"}}, status)
        if self.fail_next is not None:
            status, self.fail_next = self.fail_next, None
            return body, JSONResponse(
                {"error": {"message": f"failed on purpose; you sent {self.management_key}"}}, status
            )
        return body, None

    async def mint(self, key_id: str, name: str, body: dict[str, Any]) -> MintedRecord:
        if self.mint_delay:
            await asyncio.sleep(self.mint_delay)
        record = MintedRecord(self.key_prefix + secrets.token_hex(24), key_id, name, body)
        self.minted.append(record)
        return record

    async def llm(self, request: Request) -> Response:
        key, _ = credential_of(request)
        if key is None:
            key = request.headers.get("x-portkey-api-key")
        if key is None or key not in {m.key for m in self.live()}:
            return JSONResponse({"error": {"message": "unknown or revoked key"}}, 401)
        self.llm_calls.append((request.url.path, key))
        if self.upstream is not None:
            handler = self.upstream.responses if request.url.path.endswith("/responses") else self.upstream.messages
            response: Response = await handler(request)
            return response
        return JSONResponse({"id": "gw-standin", "content": [{"type": "text", "text": "pong from the gateway"}]})

    async def root(self, request: Request) -> Response:
        return Response(status_code=200)  # Claude Code probes the API's root first


class OpenRouterStandIn(GatewayStandIn):
    llm_prefix = "/api/v1"
    key_prefix = "sk-or-v1-"

    def creation_path(self) -> str:
        return "/api/v1/keys"

    def management_routes(self) -> list[Route]:
        return [
            Route("/api/v1/keys", self.create, methods=["POST"]),
            Route("/api/v1/keys/{hash}", self.get, methods=["GET"]),
            Route("/api/v1/keys/{hash}", self.delete, methods=["DELETE"]),
        ]

    def _data(self, record: MintedRecord) -> dict[str, Any]:
        usage = self.spend_usd.get(record.key_id, 0.0)
        limit = record.body.get("limit")
        return {
            "hash": record.key_id,
            "name": record.name,
            "label": record.key[:12] + "...",
            "disabled": record.revoked,
            "limit": limit,
            "limit_remaining": None if limit is None else limit - usage,
            "limit_reset": record.body.get("limit_reset"),
            "usage": usage,
        }

    @management
    async def create(self, request: Request, body: Any) -> Response:
        if not isinstance(body, dict) or not body.get("name"):
            return JSONResponse({"error": {"message": "name is required"}}, 400)
        record = await self.mint(secrets.token_hex(32), body["name"], body)
        return JSONResponse({"data": self._data(record), "key": record.key}, 201)

    @management
    async def get(self, request: Request, body: Any) -> Response:
        record = self.by_id(request.path_params["hash"])
        if record is None:
            return JSONResponse({"error": {"message": "not found"}}, 404)
        return JSONResponse({"data": self._data(record)})

    @management
    async def delete(self, request: Request, body: Any) -> Response:
        record = self.by_id(request.path_params["hash"])
        if record is None:
            return JSONResponse({"error": {"message": "not found"}}, 404)
        record.revoked = True
        return JSONResponse({"deleted": True})


class LiteLLMStandIn(GatewayStandIn):
    def __init__(self, management_key: str, **kwargs: Any) -> None:
        super().__init__(management_key, **kwargs)
        self.teams: dict[str, dict[str, Any]] = {}

    def creation_path(self) -> str:
        return "/key/generate"

    def management_routes(self) -> list[Route]:
        return [
            Route("/team/new", self.team_new, methods=["POST"]),
            Route("/team/info", self.team_info, methods=["GET"]),
            Route("/team/delete", self.team_delete, methods=["POST"]),
            Route("/key/generate", self.key_generate, methods=["POST"]),
            Route("/key/delete", self.key_delete, methods=["POST"]),
        ]

    @management
    async def team_new(self, request: Request, body: Any) -> Response:
        team_id = str(uuid.uuid4())
        self.teams[team_id] = {**body, "team_id": team_id, "deleted": False}
        return JSONResponse(
            {"team_id": team_id, "team_alias": body.get("team_alias"), "max_budget": body.get("max_budget")}
        )

    @management
    async def team_info(self, request: Request, body: Any) -> Response:
        team = self.teams.get(request.query_params.get("team_id", ""))
        if team is None:
            return JSONResponse({"detail": "team not found"}, 404)
        spend = sum(self.spend_usd.get(m.key_id, 0.0) for m in self.minted if m.body.get("team_id") == team["team_id"])
        info = {"spend": spend, "max_budget": team.get("max_budget"), "budget_duration": team.get("budget_duration")}
        return JSONResponse({"team_id": team["team_id"], "team_info": info, "keys": []})

    @management
    async def team_delete(self, request: Request, body: Any) -> Response:
        for team_id in body.get("team_ids", []):
            if team_id in self.teams:
                self.teams[team_id]["deleted"] = True
        return JSONResponse({"deleted_teams": body.get("team_ids", [])})

    @management
    async def key_generate(self, request: Request, body: Any) -> Response:
        team = self.teams.get(body.get("team_id", ""))
        if team is None or team["deleted"]:
            return JSONResponse({"detail": "team not found"}, 400)
        if any(m.body.get("key_alias") == body.get("key_alias") for m in self.minted):
            return JSONResponse({"detail": "key_alias already exists"}, 400)
        record = await self.mint(body["key_alias"], team.get("team_alias", ""), body)
        return JSONResponse(
            {"key": record.key, "key_alias": body["key_alias"], "team_id": body["team_id"], "token": uuid.uuid4().hex}
        )

    @management
    async def key_delete(self, request: Request, body: Any) -> Response:
        keys = set(body.get("keys", []))
        for record in self.minted:
            if record.key in keys:
                record.revoked = True
        return JSONResponse({"deleted_keys": sorted(keys)})


class PortkeyStandIn(GatewayStandIn):
    def presented_management_key(self, request: Request) -> str | None:
        return request.headers.get("x-portkey-api-key")

    def creation_path(self) -> str:
        return "/v1/api-keys/workspace/service"

    def management_routes(self) -> list[Route]:
        return [
            Route("/v1/api-keys/{type}/{sub_type}", self.create, methods=["POST"]),
            Route("/v1/api-keys/{id}", self.delete, methods=["DELETE"]),
            Route("/v1/analytics/graphs/cost", self.cost, methods=["GET"]),
        ]

    @management
    async def create(self, request: Request, body: Any) -> Response:
        if request.path_params["type"] == "workspace" and not body.get("workspace_id"):
            return JSONResponse({"error": {"message": "workspace_id is required"}}, 400)
        record = await self.mint(str(uuid.uuid4()), body.get("name", ""), body)
        return JSONResponse({"id": record.key_id, "key": record.key, "object": "api-key"})

    @management
    async def delete(self, request: Request, body: Any) -> Response:
        record = self.by_id(request.path_params["id"])
        if record is None:
            return JSONResponse({"error": {"message": "not found"}}, 404)
        record.revoked = True
        return JSONResponse({})

    @management
    async def cost(self, request: Request, body: Any) -> Response:
        ids = request.query_params.get("api_key_ids", "").split(",")
        cents = sum(self.spend_usd.get(key_id, 0.0) for key_id in ids) * 100
        return JSONResponse(
            {"summary": {"total_cost": cents, "avg_cost_per_req": 0}, "data_points": [], "object": "analytics-graph"}
        )
