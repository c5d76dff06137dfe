"""Running the real agents of the sandbox image against the stand-in LLM API (tests/standins/llm_api.py).

What each agent needs to talk to an LLM API at ``llm_url`` with ``key`` (seen with the pinned versions in
worker/pins.py; see the agents report), as data: :func:`agent_setup`. A small ACP-over-HTTP client that times
every call and answers permission requests: :class:`AcpProbe`. A container of the image with the daemon
started the way the worker starts it: :class:`AgentContainer`.

By hand (the stand-in bound to the Docker bridge)::

    python -m tests.standins.llm_api --host 172.17.0.1 --port 8787 &
    python -m tests.agents_support claude --llm-url http://172.17.0.1:8787 --scenario tool
"""

from __future__ import annotations

import argparse
import contextlib
import json
import secrets
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx

from worker import pins

DATA_DIR = "/root/.local/share/sandbox-agent"
CWD = "/workspace"
LABEL = "sandbox-worker.agents-support"

# Keeps Claude Code from calling Anthropic's own hosts past ANTHROPIC_BASE_URL (with the key!) and makes an
# LLM API error fail the turn in about a second instead of ~12 retries over ~3 minutes.
CLAUDE_QUIET_ENV = {
    "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
    "DISABLE_TELEMETRY": "1",
    "DISABLE_ERROR_REPORTING": "1",
    "CLAUDE_CODE_MAX_RETRIES": "1",
    # bypassPermissions is offered to root only when this is set.
    "IS_SANDBOX": "1",
}


@dataclass
class AgentSetup:
    """Environment for the daemon (the agent inherits it), files to write first, and ACP steps."""

    env: dict[str, str]
    files: dict[str, str] = field(default_factory=dict)
    auth_method: str | None = None  # `authenticate` methodId, after initialize, before session/new
    mode: str | None = None  # session/set_mode after session/new


def agent_setup(agent: str, llm_url: str, key: str, *, mode: str | None = None) -> AgentSetup:
    """What ``agent`` needs to use the LLM API at ``llm_url`` (no trailing slash, no /v1) with ``key``."""
    if agent == "claude":
        return AgentSetup(
            env={"ANTHROPIC_BASE_URL": llm_url, "ANTHROPIC_API_KEY": key, **CLAUDE_QUIET_ENV},
            mode=mode or "bypassPermissions",
        )
    if agent == "codex":
        # codex-acp ignores OPENAI_BASE_URL: only a model provider in $CODEX_HOME/config.toml moves it.
        config = (
            'model = "gpt-5.4"\n'
            'model_provider = "llm"\n'
            "\n"
            "[model_providers.llm]\n"
            'name = "llm"\n'
            f'base_url = "{llm_url}/v1"\n'
            'env_key = "OPENAI_API_KEY"\n'
            'wire_api = "responses"\n'
        )
        return AgentSetup(
            env={"OPENAI_API_KEY": key, "CODEX_HOME": "/root/.codex"},
            files={"/root/.codex/config.toml": config},
            auth_method="openai-api-key",
            # Codex's own sandbox (bubblewrap) is unavailable in a container: "read-only"/"auto" tools fail.
            mode=mode or "full-access",
        )
    if agent == "opencode":
        opencode_config: dict[str, Any] = {
            "$schema": "https://opencode.ai/config.json",
            "model": "anthropic/claude-sonnet-4-5",
            "autoupdate": False,
            "share": "disabled",
            "provider": {"anthropic": {"options": {"baseURL": f"{llm_url}/v1"}}},
        }
        return AgentSetup(
            env={"ANTHROPIC_API_KEY": key, "OPENCODE_DISABLE_MODELS_FETCH": "1"},
            files={"/root/.config/opencode/opencode.json": json.dumps(opencode_config, indent=2) + "\n"},
            mode=mode,
        )
    raise ValueError(f"no setup for agent {agent!r}")


# --------------------------------------------------------------------------------------------------------


PermissionAnswer = Callable[[dict[str, Any]], str | None]


def allow_once(params: dict[str, Any]) -> str | None:
    """Pick the "allow once" option of a session/request_permission (else any allow option)."""
    options = params.get("options") or []
    for kind in ("allow_once", "allow_always"):
        for option in options:
            if option.get("kind") == kind:
                return str(option["optionId"])
    return None


class AcpProbe:
    """One ACP server on a daemon: POSTs with timing, every SSE envelope kept, permission requests answered."""

    def __init__(self, base_url: str, token: str, agent: str, *, permission: PermissionAnswer = allow_once) -> None:
        self.agent = agent
        self.server_id = f"probe-{agent}-{secrets.token_hex(4)}"
        self.client = httpx.Client(base_url=base_url, headers={"Authorization": f"Bearer {token}"}, timeout=200)
        self.permission = permission
        self.events: list[tuple[float, dict[str, Any]]] = []
        self.permission_requests: list[dict[str, Any]] = []
        self.t0: float | None = None
        self._ids = iter(range(1, 1_000_000))
        self._stop = threading.Event()
        self._reader: threading.Thread | None = None

    def now_ms(self) -> int:
        return round((time.monotonic() - (self.t0 or time.monotonic())) * 1000)

    def call(self, method: str, params: dict[str, Any], *, timeout: float = 200) -> tuple[dict[str, Any], int]:
        """POST a JSON-RPC request; (reply envelope, ms since the first POST of this server when it came)."""
        first = self.t0 is None
        if first:
            self.t0 = time.monotonic()
        envelope = {"jsonrpc": "2.0", "id": next(self._ids), "method": method, "params": params}
        response = self.client.post(
            f"/v1/acp/{self.server_id}", params={"agent": self.agent} if first else None, json=envelope, timeout=timeout
        )
        done = self.now_ms()
        if response.status_code != 200:
            return {"http_status": response.status_code, "body": response.text[:500]}, done
        if first:
            self._reader = threading.Thread(target=self._read, daemon=True)
            self._reader.start()
        reply: dict[str, Any] = response.json()
        return reply, done

    def _read(self) -> None:
        # The daemon or the container went away, or close() closed the client under it.
        with contextlib.suppress(httpx.HTTPError, RuntimeError):
            self._read_stream()

    def _read_stream(self) -> None:
        with self.client.stream(
            "GET", f"/v1/acp/{self.server_id}", headers={"Accept": "text/event-stream"}, timeout=None
        ) as response:
            for line in response.iter_lines():
                if self._stop.is_set():
                    return
                if not line.startswith("data:"):
                    continue
                message = json.loads(line[5:])
                self.events.append((self.now_ms(), message))
                if message.get("method") == "session/request_permission":
                    self.permission_requests.append(message)
                    option = self.permission(message.get("params") or {})
                    outcome = {"outcome": "selected", "optionId": option} if option else {"outcome": "cancelled"}
                    self.client.post(
                        f"/v1/acp/{self.server_id}",
                        json={"jsonrpc": "2.0", "id": message["id"], "result": {"outcome": outcome}},
                    )

    def updates(self) -> Iterator[dict[str, Any]]:
        for _, message in self.events:
            if message.get("method") == "session/update":
                yield message["params"]["update"]

    def text(self) -> str:
        return "".join(
            u["content"].get("text", "") for u in self.updates() if u.get("sessionUpdate") == "agent_message_chunk"
        )

    def close(self) -> None:
        self._stop.set()
        self.client.close()


# --------------------------------------------------------------------------------------------------------


def docker(*args: str, check: bool = True, input_text: str | None = None) -> str:
    result = subprocess.run(["docker", *args], capture_output=True, text=True, check=False, input=input_text)
    if check and result.returncode != 0:
        raise RuntimeError(f"docker {args[0]} failed: {result.stderr.strip()[:500]}")
    return result.stdout


class AgentContainer:
    """A container of the sandbox image (labelled LABEL) with the daemon started by ``docker exec``."""

    def __init__(self, image: str = pins.SANDBOX_IMAGE) -> None:
        self.image = image
        self.token = secrets.token_urlsafe(24)
        self.id = docker("run", "-d", "--init", "--label", f"{LABEL}=1", "-p", "127.0.0.1::2468", image).strip()
        port = docker("port", self.id, "2468/tcp").split(":")[-1].strip()
        self.url = f"http://127.0.0.1:{port}"

    def write(self, path: str, content: str) -> None:
        docker("exec", "-i", self.id, "sh", "-c", 'mkdir -p "$(dirname "$0")" && cat > "$0"', path, input_text=content)

    def exec(self, *argv: str) -> str:
        return docker("exec", self.id, *argv, check=False)

    def start_daemon(self, env: dict[str, str]) -> float:
        """Start the daemon the way the worker does; seconds until /v1/health answered."""
        env = dict(env, SANDBOX_AGENT_REQUIRE_PREINSTALL="1")
        flags = [arg for name, value in env.items() for arg in ("-e", f"{name}={value}")]
        start = time.monotonic()
        docker(
            "exec", "-d", "-w", CWD, *flags, self.id, "sandbox-agent", "server", "--no-telemetry",
            "--host", "0.0.0.0", "--port", "2468", f"--token={self.token}",
        )  # fmt: skip
        while time.monotonic() - start < 15:
            try:
                if httpx.get(f"{self.url}/v1/health", headers={"Authorization": f"Bearer {self.token}"}).is_success:
                    return time.monotonic() - start
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        raise RuntimeError("daemon did not become healthy")

    def stop_daemon(self) -> None:
        """SIGTERM every `sandbox-agent server` (as worker.daemon.stop_daemon does)."""
        self.exec(
            "sh", "-c",
            'for p in /proc/[0-9]*; do case "$(tr "\\0" " " < $p/cmdline 2>/dev/null)" in '
            '"sandbox-agent server"*) kill -TERM "${p#/proc/}";; esac; done',
        )  # fmt: skip

    def processes(self) -> list[str]:
        """Every process in the container but PID 1's init: "pid ppid pgid cmdline" lines, from /proc."""
        out = self.exec(
            "sh", "-c",
            'for p in /proc/[0-9]*; do c="$(tr "\\0" " " < $p/cmdline 2>/dev/null)"; [ -n "$c" ] || continue; '
            's="$(cat $p/stat 2>/dev/null)"; s="${s##*) }"; set -- $s; echo "${p#/proc/} $2 $3 $c"; done',
        )  # fmt: skip
        return [line for line in out.splitlines() if line.strip() and " sh -c for p in" not in line]

    def remove(self) -> None:
        docker("rm", "-f", self.id, check=False)


def run_session(
    container: AgentContainer,
    agent: str,
    setup: AgentSetup,
    prompts: list[str],
    *,
    permission: PermissionAnswer = allow_once,
) -> dict[str, Any]:
    """initialize [, authenticate], session/new [, set_mode], then each prompt; timings in ms."""
    probe = AcpProbe(container.url, container.token, agent, permission=permission)
    report: dict[str, Any] = {"agent": agent, "steps": []}

    def step(name: str, method: str, params: dict[str, Any]) -> dict[str, Any]:
        before = probe.now_ms() if probe.t0 else 0
        reply, done = probe.call(method, params)
        row = {"step": name, "start_ms": before, "done_ms": done, "took_ms": done - before}
        if "error" in reply or "http_status" in reply:
            row["error"] = reply.get("error") or reply
        else:
            row["result"] = json.dumps(reply.get("result"))[:160]
        report["steps"].append(row)
        return reply

    try:
        init = step(
            "initialize", "initialize", {"protocolVersion": 1, "clientInfo": {"name": "agents-support", "version": "1"}}
        )
        report["auth_methods"] = [m.get("id") for m in (init.get("result") or {}).get("authMethods") or []]
        if setup.auth_method:
            step("authenticate", "authenticate", {"methodId": setup.auth_method})
        new = step("session/new", "session/new", {"cwd": CWD, "mcpServers": []})
        session_id = (new.get("result") or {}).get("sessionId")
        report["modes"] = ((new.get("result") or {}).get("modes") or {}).get("availableModes")
        if session_id and setup.mode:
            step("set_mode", "session/set_mode", {"sessionId": session_id, "modeId": setup.mode})
        for n, text in enumerate(prompts):
            if session_id:
                step(
                    f"prompt{n + 1}",
                    "session/prompt",
                    {"sessionId": session_id, "prompt": [{"type": "text", "text": text}]},
                )
        time.sleep(0.3)
        report["text"] = probe.text()
        report["tool_calls"] = [
            {k: u.get(k) for k in ("title", "kind", "status")}
            for u in probe.updates()
            if u.get("sessionUpdate") in ("tool_call", "tool_call_update")
        ]
        report["permission_requests"] = [
            [o.get("kind") for o in (m.get("params") or {}).get("options", [])] for m in probe.permission_requests
        ]
    finally:
        probe.close()
    return report


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.agents_support")
    parser.add_argument("agent", choices=["claude", "codex", "opencode"])
    parser.add_argument("--llm-url", default="http://172.17.0.1:8787")
    parser.add_argument("--key", default="sk-standin-test")
    parser.add_argument("--mode", default=None)
    parser.add_argument("--prompt", action="append", default=None)
    parser.add_argument("--image", default=pins.SANDBOX_IMAGE)
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    setup = agent_setup(args.agent, args.llm_url, args.key, mode=args.mode)
    container = AgentContainer(args.image)
    try:
        for path, content in setup.files.items():
            container.write(path, content)
        ready = container.start_daemon(setup.env)
        report = run_session(container, args.agent, setup, args.prompt or ["Say hello to Ferdinand"])
        report["daemon_ready_s"] = round(ready, 3)
        report["workspace"] = container.exec("sh", "-c", f'cd {CWD} && for f in *; do echo "$f: $(cat $f)"; done')
        report["processes"] = container.processes()
        print(json.dumps(report, indent=1))
    finally:
        if args.keep:
            print(f"kept container {container.id}")
        else:
            container.remove()


if __name__ == "__main__":
    main()
