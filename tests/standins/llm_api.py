"""A stand-in LLM API for running the real agents (Claude Code, Codex, OpenCode) offline, with scripted turns.

    POST /v1/messages               Anthropic Messages, streaming (SSE) or not: Claude Code, OpenCode
    POST /v1/messages/count_tokens  Anthropic token count
    POST /v1/responses              OpenAI Responses, streaming (SSE) or not: Codex
    HEAD|GET /                      200 (Claude Code probes the base URL before each turn)
    GET  /_standin/requests         what it recorded (JSON), for use from another process
    POST /_standin/scenario         {"scenario": "tool"}: switch the scenario of a running server

Every request is recorded (:class:`LLMRequest`): credential and scheme (``x-api-key`` or ``bearer``), Host,
path, model, whether tools were offered, whether it carried a tool result.

Scenarios (``LLMApi.scenario``, or per prompt: ``[scenario:NAME]`` anywhere in the user's last message):

    text   a text reply echoing the last word of the prompt: ``Stand-in reply: <word>.``
    tool   a request without a tool result gets one tool call that writes ``tool_file`` in the agent's cwd:
           Anthropic ``Bash`` (Claude Code) / ``bash`` (OpenCode) ``{"command": "echo hi > file.txt", ...}``,
           Responses ``exec_command {"cmd": ...}`` (Codex; ``shell`` with an argv if that is what is offered).
           A request carrying the tool's result (``tool_result`` / ``function_call_output``) gets a final
           text, ``Stand-in done: wrote file.txt.``
    leak   HOSTILE, a prompt-injected turn: like ``tool``, but the command prints every environment the agent's
           tool can read (``env``, ``/proc/*/environ``, ``/proc/*/cmdline``), and the final text repeats the tool's output:
           ``Stand-in leak: <output>``, credentials included
    401    authentication error in the API's own shape
    429    rate-limit error with ``retry-after: 1``
    slow   the text reply, after ``slow_seconds`` with nothing sent

A request that offers no tools (title generation, quota probes) always gets a text reply, whatever the scenario.
``accepted`` makes any other (or a missing) credential a 401. Replies never contain a credential, except what
an agent's tool printed in the ``leak`` scenario.

Run by hand (binding a container-reachable address such as the Docker bridge, never 0.0.0.0)::

    python -m tests.standins.llm_api --host 172.17.0.1 --port 8787 --scenario tool --accepted-key sk-test
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import secrets
import signal
import threading
import time
from collections.abc import AsyncIterator, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from tests.standins.llm_upstream import credential_of
from tests.standins.server import ThreadedServer

SCENARIOS = ("text", "tool", "leak", "401", "429", "slow")
LEAK_COMMAND = "env; cat /proc/[0-9]*/environ /proc/[0-9]*/cmdline 2>/dev/null | tr '\\0' '\\n' | sort -u"
_SCENARIO_MARK = re.compile(r"\[scenario:([A-Za-z0-9]+)\]")
_WORD = re.compile(r"[A-Za-z0-9_\-]+")


@dataclass
class LLMRequest:
    """One request as the stand-in saw it."""

    api: str  # "anthropic", "openai" or "other"
    method: str
    path: str
    host: str | None
    credential: str | None
    scheme: str | None  # "x-api-key" or "bearer"
    model: str | None = None
    stream: bool = False
    tools: bool = False
    tool_names: list[str] = field(default_factory=list)
    tool_result: bool = False  # carries a tool_result / function_call_output
    tool_output: str = ""  # the last tool result it carries, as JSON
    prompt: str = ""  # the user's last text, as far as it could be told apart
    scenario: str | None = None  # what was answered
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    body: Any = None
    at: float = field(default_factory=time.time)


_KEPT_HEADERS = ("user-agent", "anthropic-version", "anthropic-beta", "x-app", "openai-beta", "originator")


def _text_of(content: Any) -> str:
    """Text of an Anthropic or Responses content value (a string or a list of blocks)."""
    if isinstance(content, str):
        return content
    texts = []
    for block in content if isinstance(content, list) else []:
        if (
            isinstance(block, dict)
            and block.get("type") in ("text", "input_text")
            and isinstance(block.get("text"), str)
        ):
            text = block["text"]
            # Claude Code and Codex add context blocks (<system-reminder>, <environment_context>, ...).
            if not text.lstrip().startswith("<"):
                texts.append(text)
    return "\n".join(texts)


def _anthropic_view(body: dict[str, Any]) -> tuple[str, bool]:
    """(the user's last text, whether the last user message carries a tool_result)."""
    messages = [m for m in body.get("messages") or [] if isinstance(m, dict) and m.get("role") == "user"]
    if not messages:
        return "", False
    last = messages[-1].get("content")
    has_result = isinstance(last, list) and any(isinstance(b, dict) and b.get("type") == "tool_result" for b in last)
    prompt = ""
    for message in reversed(messages):
        prompt = _text_of(message.get("content"))
        if prompt:
            break
    return prompt, has_result


def _responses_view(body: dict[str, Any]) -> tuple[str, bool]:
    items = body.get("input")
    if isinstance(items, str):
        return items, False
    items = [i for i in items or [] if isinstance(i, dict)]
    # A tool result counts when it comes after the last user message (i.e. this call continues a tool turn).
    prompt, has_result = "", False
    for item in reversed(items):
        if item.get("type") == "function_call_output":
            has_result = True
        if item.get("role") == "user" and (text := _text_of(item.get("content"))):
            prompt = text
            break
    return prompt, has_result


def _tool_output(body: dict[str, Any]) -> str:
    """The last tool result of a request (Anthropic ``tool_result``, Responses ``function_call_output``), as JSON."""
    found: list[str] = []
    items: list[Any] = [body.get("messages") or body.get("input")]
    while items:
        item = items.pop(0)
        if isinstance(item, dict) and item.get("type") in ("tool_result", "function_call_output"):
            found.append(json.dumps(item.get("content", item.get("output"))))
        elif isinstance(item, dict):
            items += item.values()
        elif isinstance(item, list):
            items += item
    return found[-1] if found else ""


def _last_word(text: str) -> str:
    words = _WORD.findall(_SCENARIO_MARK.sub("", text))
    return words[-1] if words else "nothing"


def _sse(event: str, data: dict[str, Any]) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


class LLMApi:
    """The stand-in's state and ASGI app. ``scenario`` and ``accepted`` may be changed between turns."""

    def __init__(
        self,
        scenario: str = "text",
        *,
        accepted: Iterable[str] | None = None,
        slow_seconds: float = 30.0,
        tool_file: str = "file.txt",
        tool_content: str = "hi",
        log_requests: bool = False,
    ) -> None:
        self.scenario = scenario
        self.accepted = set(accepted) if accepted is not None else None
        self.slow_seconds = slow_seconds
        self.tool_file = tool_file
        self.tool_content = tool_content
        self.log_requests = log_requests
        self.requests: list[LLMRequest] = []
        self._lock = threading.Lock()

    @property
    def scenario(self) -> str:
        return self._scenario

    @scenario.setter
    def scenario(self, value: str) -> None:
        if value not in SCENARIOS:
            raise ValueError(f"unknown scenario {value!r}; one of {SCENARIOS}")
        self._scenario = value

    @property
    def tool_command(self) -> str:
        return f"echo {self.tool_content} > {self.tool_file}"

    def model_requests(self) -> list[LLMRequest]:
        """The requests to /v1/messages and /v1/responses (not probes or token counts)."""
        with self._lock:
            return [r for r in self.requests if r.path in ("/v1/messages", "/v1/responses")]

    def clear(self) -> None:
        with self._lock:
            self.requests.clear()

    def app(self) -> Starlette:
        return Starlette(
            routes=[
                Route("/", self.root, methods=["GET", "HEAD"]),
                Route("/v1/messages", self.messages, methods=["POST"]),
                Route("/v1/messages/count_tokens", self.count_tokens, methods=["POST"]),
                Route("/v1/responses", self.responses, methods=["POST"]),
                Route("/_standin/requests", self.recorded, methods=["GET"]),
                Route("/_standin/scenario", self.set_scenario, methods=["POST"]),
            ]
        )

    # --- plumbing -------------------------------------------------------------------------------------------

    async def _record(self, request: Request, api: str) -> tuple[LLMRequest, dict[str, Any]]:
        credential, scheme = credential_of(request)
        raw = await request.body()
        try:
            body = json.loads(raw) if raw else {}
        except ValueError:
            body = {"_unparsed": raw[:2000].decode("utf-8", "replace")}
        if not isinstance(body, dict):
            body = {"_value": body}
        tools = [t for t in body.get("tools") or [] if isinstance(t, dict)]
        if api == "anthropic":
            prompt, has_result = _anthropic_view(body)
        elif api == "openai":
            prompt, has_result = _responses_view(body)
        else:
            prompt, has_result = "", False
        record = LLMRequest(
            api=api,
            method=request.method,
            path=request.url.path,
            host=request.headers.get("host"),
            credential=credential,
            scheme=scheme,
            model=body.get("model") if isinstance(body.get("model"), str) else None,
            stream=bool(body.get("stream")),
            tools=bool(tools),
            tool_names=[str(t.get("name") or t.get("type")) for t in tools],
            tool_result=has_result,
            tool_output=_tool_output(body) if has_result else "",
            prompt=prompt,
            headers={k: v for k, v in request.headers.items() if k in _KEPT_HEADERS},
            body=body,
        )
        with self._lock:
            self.requests.append(record)
        return record, body

    def _decide(self, record: LLMRequest) -> str:
        if self.accepted is not None and record.credential not in self.accepted:
            return "401"
        mark = _SCENARIO_MARK.search(record.prompt)
        scenario = mark.group(1) if mark and mark.group(1) in SCENARIOS else self.scenario
        if scenario in ("tool", "leak") and (not record.tools or record.tool_result):
            scenario = f"{scenario}-done" if record.tool_result else "text"
        return scenario

    def _log(self, record: LLMRequest) -> None:
        if self.log_requests:
            shown = {k: v for k, v in asdict(record).items() if k not in ("body", "credential", "prompt")}
            shown["credential"] = f"{record.credential[:6]}...({len(record.credential)})" if record.credential else None
            shown["prompt"] = record.prompt[:80]
            print(json.dumps(shown), flush=True)

    def _reply_text(self, record: LLMRequest, scenario: str) -> str:
        if scenario == "tool-done":
            return f"Stand-in done: wrote {self.tool_file}."
        if scenario == "leak-done":
            return f"Stand-in leak: {record.tool_output}"
        if (
            not record.tools
            and record.api == "anthropic"
            and "title" in json.dumps(record.body.get("system", "")).lower()
        ):
            return "Stand-in title"
        return f"Stand-in reply: {_last_word(record.prompt)}."

    # --- routes ---------------------------------------------------------------------------------------------

    async def root(self, request: Request) -> Response:
        with self._lock:
            self.requests.append(
                LLMRequest("other", request.method, "/", request.headers.get("host"), *credential_of(request))
            )
        return Response(b"", 200) if request.method == "HEAD" else JSONResponse({"standin": "llm_api"})

    async def recorded(self, request: Request) -> Response:
        with self._lock:
            rows = [{k: v for k, v in asdict(r).items() if k != "body"} for r in self.requests]
        return JSONResponse(rows)

    async def set_scenario(self, request: Request) -> Response:
        body = await request.json()
        try:
            self.scenario = str(body.get("scenario"))
        except ValueError as exc:
            return JSONResponse({"error": str(exc)}, 400)
        if "accepted" in body:
            keys = body["accepted"]
            self.accepted = set(keys) if keys is not None else None
        if "slow_seconds" in body:
            self.slow_seconds = float(body["slow_seconds"])
        return JSONResponse({"scenario": self.scenario})

    async def count_tokens(self, request: Request) -> Response:
        record, _ = await self._record(request, "anthropic")
        scenario = self._decide(record)
        record.scenario = scenario
        self._log(record)
        if scenario in ("401", "429"):
            return self._anthropic_error(record, int(scenario))
        return JSONResponse({"input_tokens": 42})

    async def messages(self, request: Request) -> Response:
        record, body = await self._record(request, "anthropic")
        scenario = self._decide(record)
        record.scenario = scenario
        self._log(record)
        if scenario in ("401", "429"):
            return self._anthropic_error(record, int(scenario))
        if scenario == "slow":
            await asyncio.sleep(self.slow_seconds)
        blocks = self._anthropic_blocks(record, scenario)
        message_id = "msg_standin_" + secrets.token_hex(8)
        model = record.model or "claude-sonnet-4-6"
        stop_reason = "tool_use" if any(b["type"] == "tool_use" for b in blocks) else "end_turn"
        usage = {"input_tokens": 42, "output_tokens": 7, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0}
        if not body.get("stream"):
            return JSONResponse(
                {
                    "id": message_id,
                    "type": "message",
                    "role": "assistant",
                    "model": model,
                    "content": blocks,
                    "stop_reason": stop_reason,
                    "stop_sequence": None,
                    "usage": usage,
                },
                headers={"request-id": "req_standin"},
            )

        async def events() -> AsyncIterator[bytes]:
            for chunk in self._anthropic_stream(message_id, model, blocks, stop_reason, usage):
                yield chunk

        return StreamingResponse(events(), media_type="text/event-stream", headers={"request-id": "req_standin"})

    async def responses(self, request: Request) -> Response:
        record, body = await self._record(request, "openai")
        scenario = self._decide(record)
        record.scenario = scenario
        self._log(record)
        if scenario in ("401", "429"):
            return self._openai_error(int(scenario))
        if scenario == "slow":
            await asyncio.sleep(self.slow_seconds)
        items = self._responses_items(record, scenario)
        response = {
            "id": "resp_standin_" + secrets.token_hex(8),
            "object": "response",
            "created_at": int(time.time()),
            "status": "completed",
            "model": record.model or "gpt-5.4",
            "output": items,
            "parallel_tool_calls": False,
            "usage": {
                "input_tokens": 42,
                "input_tokens_details": {"cached_tokens": 0},
                "output_tokens": 7,
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": 49,
            },
        }
        if not body.get("stream"):
            return JSONResponse(response)

        async def events() -> AsyncIterator[bytes]:
            for chunk in self._responses_stream(response):
                yield chunk

        return StreamingResponse(events(), media_type="text/event-stream")

    # --- Anthropic shapes -----------------------------------------------------------------------------------

    def _command(self, scenario: str) -> str:
        return LEAK_COMMAND if scenario == "leak" else self.tool_command

    def _anthropic_blocks(self, record: LLMRequest, scenario: str) -> list[dict[str, Any]]:
        if scenario in ("tool", "leak"):
            name = next((n for n in record.tool_names if n.lower() == "bash"), None)
            if name is not None:
                return [
                    {"type": "text", "text": f"I will run {self._command(scenario)}."},
                    {
                        "type": "tool_use",
                        "id": "toolu_standin_" + secrets.token_hex(8),
                        "name": name,
                        "input": {"command": self._command(scenario), "description": f"Write {self.tool_file}"},
                    },
                ]
            scenario = "text"
        return [{"type": "text", "text": self._reply_text(record, scenario)}]

    @staticmethod
    def _anthropic_stream(
        message_id: str, model: str, blocks: list[dict[str, Any]], stop_reason: str, usage: dict[str, int]
    ) -> Iterator[bytes]:
        start_usage = dict(usage, output_tokens=1)
        yield _sse(
            "message_start",
            {
                "type": "message_start",
                "message": {
                    "id": message_id,
                    "type": "message",
                    "role": "assistant",
                    "model": model,
                    "content": [],
                    "stop_reason": None,
                    "stop_sequence": None,
                    "usage": start_usage,
                },
            },
        )
        yield _sse("ping", {"type": "ping"})
        for index, block in enumerate(blocks):
            if block["type"] == "text":
                yield _sse(
                    "content_block_start",
                    {"type": "content_block_start", "index": index, "content_block": {"type": "text", "text": ""}},
                )
                text = block["text"]
                half = len(text) // 2
                for piece in (text[:half], text[half:]):
                    yield _sse(
                        "content_block_delta",
                        {"type": "content_block_delta", "index": index, "delta": {"type": "text_delta", "text": piece}},
                    )
            else:
                yield _sse(
                    "content_block_start",
                    {
                        "type": "content_block_start",
                        "index": index,
                        "content_block": {"type": "tool_use", "id": block["id"], "name": block["name"], "input": {}},
                    },
                )
                arguments = json.dumps(block["input"])
                cut = len(arguments) // 2
                for piece in ("", arguments[:cut], arguments[cut:]):
                    yield _sse(
                        "content_block_delta",
                        {
                            "type": "content_block_delta",
                            "index": index,
                            "delta": {"type": "input_json_delta", "partial_json": piece},
                        },
                    )
            yield _sse("content_block_stop", {"type": "content_block_stop", "index": index})
        yield _sse(
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": stop_reason, "stop_sequence": None},
                "usage": {"output_tokens": usage["output_tokens"]},
            },
        )
        yield _sse("message_stop", {"type": "message_stop"})

    @staticmethod
    def _anthropic_error(record: LLMRequest, status: int) -> Response:
        kind, message = (
            ("authentication_error", "invalid x-api-key")
            if status == 401
            else ("rate_limit_error", "Number of request tokens has exceeded your rate limit (stand-in).")
        )
        headers = {"request-id": "req_standin_error"}
        if status == 429:
            headers["retry-after"] = "1"
        return JSONResponse(
            {"type": "error", "error": {"type": kind, "message": message}, "request_id": "req_standin_error"},
            status,
            headers=headers,
        )

    # --- OpenAI Responses shapes ----------------------------------------------------------------------------

    def _responses_items(self, record: LLMRequest, scenario: str) -> list[dict[str, Any]]:
        if scenario in ("tool", "leak"):
            call: dict[str, Any] | None = None
            if "exec_command" in record.tool_names:
                call = {"name": "exec_command", "arguments": json.dumps({"cmd": self._command(scenario)})}
            elif "shell" in record.tool_names:
                call = {"name": "shell", "arguments": json.dumps({"command": ["bash", "-lc", self._command(scenario)]})}
            if call is not None:
                return [
                    {
                        "id": "fc_standin_" + secrets.token_hex(8),
                        "type": "function_call",
                        "status": "completed",
                        "call_id": "call_standin_" + secrets.token_hex(8),
                        **call,
                    }
                ]
            scenario = "text"
        return [
            {
                "id": "msg_standin_" + secrets.token_hex(8),
                "type": "message",
                "status": "completed",
                "role": "assistant",
                "content": [{"type": "output_text", "text": self._reply_text(record, scenario), "annotations": []}],
            }
        ]

    @staticmethod
    def _responses_stream(response: dict[str, Any]) -> Iterator[bytes]:
        sequence = iter(range(1_000_000))

        def event(kind: str, **data: Any) -> bytes:
            return _sse(kind, {"type": kind, "sequence_number": next(sequence), **data})

        in_progress = dict(response, status="in_progress", output=[], usage=None)
        yield event("response.created", response=in_progress)
        yield event("response.in_progress", response=in_progress)
        for index, item in enumerate(response["output"]):
            if item["type"] == "message":
                text = item["content"][0]["text"]
                yield event(
                    "response.output_item.added", output_index=index, item=dict(item, status="in_progress", content=[])
                )
                part = {"type": "output_text", "text": "", "annotations": []}
                yield event(
                    "response.content_part.added", item_id=item["id"], output_index=index, content_index=0, part=part
                )
                half = len(text) // 2
                for piece in (text[:half], text[half:]):
                    yield event(
                        "response.output_text.delta",
                        item_id=item["id"],
                        output_index=index,
                        content_index=0,
                        delta=piece,
                    )
                yield event(
                    "response.output_text.done", item_id=item["id"], output_index=index, content_index=0, text=text
                )
                yield event(
                    "response.content_part.done",
                    item_id=item["id"],
                    output_index=index,
                    content_index=0,
                    part=dict(part, text=text),
                )
            else:
                arguments = item["arguments"]
                yield event(
                    "response.output_item.added",
                    output_index=index,
                    item=dict(item, status="in_progress", arguments=""),
                )
                cut = len(arguments) // 2
                for piece in (arguments[:cut], arguments[cut:]):
                    yield event(
                        "response.function_call_arguments.delta", item_id=item["id"], output_index=index, delta=piece
                    )
                yield event(
                    "response.function_call_arguments.done", item_id=item["id"], output_index=index, arguments=arguments
                )
            yield event("response.output_item.done", output_index=index, item=item)
        yield event("response.completed", response=response)

    @staticmethod
    def _openai_error(status: int) -> Response:
        if status == 401:
            error = {
                "message": "Incorrect API key provided (stand-in).",
                "type": "invalid_request_error",
                "param": None,
                "code": "invalid_api_key",
            }
            return JSONResponse({"error": error}, 401)
        error = {
            "message": "Rate limit reached (stand-in). Please try again in 1s.",
            "type": "requests",
            "param": None,
            "code": "rate_limit_exceeded",
        }
        return JSONResponse({"error": error}, 429, headers={"retry-after": "1"})


class LLMApiStandIn(LLMApi):
    """:class:`LLMApi` served by uvicorn from a background thread; a context manager.

    ``host`` defaults to loopback; bind the Docker bridge address (172.17.0.1) for agents in containers.
    """

    def __init__(
        self, scenario: str = "text", *, host: str = "127.0.0.1", port: int | None = None, **kwargs: Any
    ) -> None:
        super().__init__(scenario, **kwargs)
        self._server = ThreadedServer(self.app(), host=host, port=port)
        self.url = self._server.url

    def __enter__(self) -> LLMApiStandIn:
        self._server.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.stop()


def main(argv: Iterable[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.standins.llm_api", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8787)
    parser.add_argument("--scenario", default="text", choices=SCENARIOS)
    parser.add_argument("--accepted-key", action="append", dest="accepted", help="repeatable; others get 401")
    parser.add_argument("--slow-seconds", type=float, default=30.0)
    parser.add_argument("--quiet", action="store_true", help="do not print one JSON line per request")
    args = parser.parse_args(list(argv) if argv is not None else None)
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    standin = LLMApiStandIn(
        args.scenario,
        host=args.host,
        port=args.port,
        accepted=args.accepted,
        slow_seconds=args.slow_seconds,
        log_requests=not args.quiet,
    )
    with standin:
        print(f"stand-in LLM API on {standin.url} (scenario {standin.scenario})", flush=True)
        while not stop.wait(1):
            pass


if __name__ == "__main__":
    main()
