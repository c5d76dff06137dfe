"""Unit tests of the stand-in LLM API (tests/standins/llm_api.py): wire shapes, scenarios, recording."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest

from tests.standins.llm_api import LLMApi

TOOLS_ANTHROPIC = [{"name": "Read", "input_schema": {}}, {"name": "Bash", "input_schema": {}}]
TOOLS_RESPONSES = [{"type": "function", "name": "exec_command", "parameters": {}}]


def sse(text: str) -> list[tuple[str, dict[str, Any]]]:
    events = []
    for frame in text.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in frame.splitlines())
        events.append((lines["event"], json.loads(lines["data"])))
    return events


def anthropic_body(content: Any, *, tools: bool = True, stream: bool = True) -> dict[str, Any]:
    body: dict[str, Any] = {"model": "claude-sonnet-4-6", "max_tokens": 32000, "stream": stream}
    body["messages"] = [{"role": "user", "content": content}]
    if tools:
        body["tools"] = TOOLS_ANTHROPIC
    return body


@pytest.fixture
def api() -> LLMApi:
    return LLMApi()


class Client:
    """Synchronous calls into the ASGI app through httpx's ASGITransport (no server, no thread)."""

    def __init__(self, api: LLMApi) -> None:
        self.transport = httpx.ASGITransport(app=api.app())

    def request(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        async def call() -> httpx.Response:
            async with httpx.AsyncClient(transport=self.transport, base_url="http://llm.test:8787") as client:
                return await client.request(method, url, **kwargs)

        return asyncio.run(call())

    def post(self, url: str, **kwargs: Any) -> httpx.Response:
        return self.request("POST", url, **kwargs)

    def get(self, url: str) -> httpx.Response:
        return self.request("GET", url)

    def head(self, url: str) -> httpx.Response:
        return self.request("HEAD", url)


@pytest.fixture
def client(api: LLMApi) -> Client:
    return Client(api)


def test_anthropic_text_stream_has_the_api_event_sequence_and_echoes_a_word(api: LLMApi, client: Client) -> None:
    """A streamed text turn goes message_start .. message_stop, and its text echoes the prompt's last word."""
    content = [
        {"type": "text", "text": "<system-reminder>ignore</system-reminder>"},
        {"type": "text", "text": "hi Ada"},
    ]
    response = client.post("/v1/messages?beta=true", json=anthropic_body(content), headers={"x-api-key": "sk-a"})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    events = sse(response.text)
    assert [name for name, _ in events] == [
        "message_start", "ping", "content_block_start", "content_block_delta", "content_block_delta",
        "content_block_stop", "message_delta", "message_stop",
    ]  # fmt: skip
    assert all(data["type"] == name for name, data in events)
    text = "".join(d["delta"]["text"] for n, d in events if n == "content_block_delta")
    assert text == "Stand-in reply: Ada."
    assert events[-2][1]["delta"]["stop_reason"] == "end_turn"
    assert "output_tokens" in events[-2][1]["usage"]
    (seen,) = api.model_requests()
    assert (seen.credential, seen.scheme, seen.host, seen.model) == (
        "sk-a",
        "x-api-key",
        "llm.test:8787",
        "claude-sonnet-4-6",
    )
    assert seen.tools and seen.stream and seen.prompt == "hi Ada"


def test_anthropic_tool_scenario_calls_bash_then_finishes_after_the_tool_result(api: LLMApi, client: Client) -> None:
    """The tool scenario answers a Bash tool_use writing the file, then a final text once the tool_result comes."""
    api.scenario = "tool"
    events = sse(client.post("/v1/messages", json=anthropic_body("write it"), headers={"x-api-key": "k"}).text)
    start = next(d for n, d in events if n == "content_block_start" and d["content_block"]["type"] == "tool_use")
    arguments = "".join(
        d["delta"]["partial_json"] for n, d in events if n == "content_block_delta" and d["index"] == start["index"]
    )
    assert start["content_block"]["name"] == "Bash"
    assert json.loads(arguments)["command"] == "echo hi > file.txt"
    assert events[-2][1]["delta"]["stop_reason"] == "tool_use"

    follow_up = anthropic_body([{"type": "tool_result", "tool_use_id": start["content_block"]["id"], "content": ""}])
    reply = client.post("/v1/messages", json=dict(follow_up, stream=False), headers={"x-api-key": "k"}).json()
    assert reply["content"] == [{"type": "text", "text": "Stand-in done: wrote file.txt."}]
    assert reply["stop_reason"] == "end_turn"
    assert [r.tool_result for r in api.model_requests()] == [False, True]


def test_a_request_without_tools_gets_text_whatever_the_scenario(api: LLMApi, client: Client) -> None:
    """Title generation and similar tool-less calls never get a tool call."""
    api.scenario = "tool"
    reply = client.post("/v1/messages", json=anthropic_body("name this", tools=False, stream=False)).json()
    assert reply["content"][0]["type"] == "text"


def test_responses_tool_scenario_calls_exec_command_then_finishes(api: LLMApi, client: Client) -> None:
    """Codex's Responses turn: exec_command {"cmd"} first, a text after the function_call_output."""
    api.scenario = "tool"
    user = {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "write it"}]}
    body = {"model": "gpt-5.4", "stream": True, "input": [user], "tools": TOOLS_RESPONSES}
    events = sse(client.post("/v1/responses", json=body, headers={"authorization": "Bearer sk-o"}).text)
    names = [n for n, _ in events]
    assert names[:2] == ["response.created", "response.in_progress"]
    assert names[-1] == "response.completed"
    assert "response.function_call_arguments.done" in names
    item = next(d["item"] for n, d in events if n == "response.output_item.done")
    assert (item["type"], item["name"]) == ("function_call", "exec_command")
    assert json.loads(item["arguments"]) == {"cmd": "echo hi > file.txt"}
    assert [d["sequence_number"] for _, d in events] == list(range(len(events)))

    output = {"type": "function_call_output", "call_id": item["call_id"], "output": "ok"}
    body["input"] = [user, item, output]
    events = sse(client.post("/v1/responses", json=body, headers={"authorization": "Bearer sk-o"}).text)
    done = next(d for n, d in events if n == "response.output_text.done")
    assert done["text"] == "Stand-in done: wrote file.txt."
    completed = events[-1][1]["response"]
    assert completed["status"] == "completed" and completed["usage"]["total_tokens"] > 0
    assert {(r.scheme, r.credential) for r in api.model_requests()} == {("bearer", "sk-o")}


def test_accepted_refuses_any_other_key_in_each_apis_shape(api: LLMApi, client: Client) -> None:
    """With `accepted` set, another key (or none) gets a 401 shaped like the real API's."""
    api.accepted = {"good"}
    refused = client.post("/v1/messages", json=anthropic_body("x"), headers={"x-api-key": "bad"})
    assert refused.status_code == 401
    assert refused.json()["error"]["type"] == "authentication_error"
    assert client.post("/v1/responses", json={"input": "x"}).json()["error"]["code"] == "invalid_api_key"
    assert client.post("/v1/messages", json=anthropic_body("x"), headers={"x-api-key": "good"}).status_code == 200


def test_error_scenarios_and_the_per_prompt_marker(api: LLMApi, client: Client) -> None:
    """429 carries retry-after; a [scenario:NAME] mark in the prompt overrides the server's scenario."""
    api.scenario = "429"
    limited = client.post("/v1/messages", json=anthropic_body("x"))
    assert (limited.status_code, limited.headers["retry-after"]) == (429, "1")
    assert limited.json()["error"]["type"] == "rate_limit_error"
    assert client.post("/v1/messages", json=anthropic_body("go [scenario:401]")).status_code == 401
    reply = client.post("/v1/messages", json=anthropic_body("hello Bob [scenario:text]", stream=False)).json()
    assert reply["content"][0]["text"] == "Stand-in reply: Bob."
    with pytest.raises(ValueError, match="unknown scenario"):
        api.scenario = "nope"


def test_probe_and_control_routes(api: LLMApi, client: Client) -> None:
    """HEAD / answers 200 (Claude Code's probe); the control routes switch the scenario and list requests."""
    assert client.head("/").status_code == 200
    assert client.post("/_standin/scenario", json={"scenario": "slow", "slow_seconds": 0}).json() == {
        "scenario": "slow"
    }
    assert client.post("/v1/messages", json=anthropic_body("late", stream=False)).status_code == 200
    rows = client.get("/_standin/requests").json()
    assert [(r["method"], r["path"], r["scenario"]) for r in rows] == [
        ("HEAD", "/", None),
        ("POST", "/v1/messages", "slow"),
    ]
