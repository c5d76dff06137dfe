"""compose.yaml for real: the images built from this repository, the stack up with two workers and the example web
app, sessions submitted from the host through the published Redis come up ready on each worker, the sandbox
network's host rules installed from inside a worker container; a session started and chatted with from the web app
in a real browser shows in a worker's metrics and its summary log line. A compose project, owner label and sandbox network of its own;
everything is torn down (containers, volumes, sandboxes, network and rules) even when the test fails.

The image layers are cached by the engine: the first build takes minutes, later ones seconds.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import docker
import httpx
import pytest
from playwright.sync_api import expect, sync_playwright

from providers import docker_isolation
from tests.conftest import FERNET_KEY, ROOT, VENV_BIN
from worker import pins

pytestmark = [
    pytest.mark.integration,
    pytest.mark.timeout(1500),
    pytest.mark.skipif(shutil.which("docker-compose") is None, reason="docker-compose missing (scripts/setup.sh)"),
]

CHROMIUM = "/usr/bin/chromium"
BRIDGE_IP = "172.17.0.1"  # compose.yaml's default DOCKER_BRIDGE_IP
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
BUILD_CA = ROOT / "deploy" / "docker" / "ca" / "host-bundle.crt"


def _has_command(*args: str) -> bool:
    """Whether this checkout's CLI has a command: the health checks and metrics come with the ops branch."""
    return (
        subprocess.run([str(VENV_BIN / "sandbox-worker"), *args, "--help"], check=False, capture_output=True).returncode
        == 0
    )


# Parts of compose.yaml served by other branches: their checks switch on when the code is there.
HAS_CHECK = _has_command("check")  # `sandbox-worker check --liveness` (the workers' health check), metrics


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Stack:
    project: str
    owner: str
    network: str
    env: dict[str, str]
    redis_url: str
    flower_port: int
    webapp_port: int

    def compose(self, *args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["docker-compose", "-p", self.project, "--profile", "webapp", *args],
            cwd=ROOT,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=True,
        )

    def containers(self, service: str) -> list[str]:
        out = subprocess.run(
            ["docker", "ps", "-q", "--filter", f"label=com.docker.compose.project={self.project}",
             "--filter", f"label=com.docker.compose.service={service}"],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
        return out.split()

    def submit(self) -> dict[str, object]:
        """A mock session submitted from the host with the CLI, through the published Redis, followed to its end."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("SANDBOX_WORKER_")}
        env.update(
            SANDBOX_WORKER_BROKER_URL=self.redis_url,
            SANDBOX_WORKER_RESULT_BACKEND=self.redis_url,
            SANDBOX_WORKER_REDIS_URL=self.redis_url,
            SANDBOX_WORKER_AUTH__MODE="open",
        )
        done = subprocess.run(
            [str(VENV_BIN / "sandbox-worker"), "submit", "--agent", "mock", "--provider", "docker",
             "--wait", "--json", "--timeout", "300"],
            env=env, capture_output=True, text=True, timeout=360, check=False,
        )  # fmt: skip
        assert done.returncode == 0, done.stdout + done.stderr
        result: dict[str, object] = json.loads(done.stdout)
        return result

    def served_by(self, request_id: str) -> list[str]:
        """The worker containers whose logs name the request."""
        return [c for c in self.containers("worker") if request_id in self.log(c)]

    @staticmethod
    def log(container: str) -> str:
        return subprocess.run(["docker", "logs", container], capture_output=True, text=True, check=False).stderr

    @staticmethod
    def metrics(container: str) -> str:
        """The worker's Prometheus endpoint, read from inside its container (it is not published)."""
        read = "import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:9808/metrics').read().decode())"
        done = subprocess.run(
            ["docker", "exec", container, "python", "-c", read], check=False, capture_output=True, text=True
        )
        assert done.returncode == 0, done.stderr
        return done.stdout


def _teardown(stack: Stack, client: docker.DockerClient) -> None:
    subprocess.run(
        ["docker-compose", "-p", stack.project, "--profile", "webapp", "down", "--volumes", "--remove-orphans", "--timeout", "20"],
        cwd=ROOT, env=stack.env, capture_output=True, timeout=300, check=False,
    )  # fmt: skip
    for container in client.containers.list(all=True, filters={"label": f"sandbox-worker-owner={stack.owner}"}):
        container.remove(force=True)
    docker_isolation.remove(client, pins.SANDBOX_IMAGE, stack.network)


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    # A network whose proxy re-signs TLS (this machine's) needs its CA in the image for pip: the host's bundle.
    if HOST_CA_BUNDLE.is_file() and not BUILD_CA.exists():
        shutil.copyfile(HOST_CA_BUNDLE, BUILD_CA)
    tag = uuid.uuid4().hex[:8]
    redis_port, flower_port, webapp_port = _free_port(), _free_port(), _free_port()
    stack = Stack(
        project=f"swcompose{tag}",
        owner=f"swcompose-{tag}",
        network=f"sw-compose-{tag}",
        env={
            **{k: v for k, v in os.environ.items() if not k.startswith("SANDBOX_WORKER_")},
            "SANDBOX_WORKER_FERNET_KEY": FERNET_KEY,
            "SANDBOX_WORKER_OWNER": f"swcompose-{tag}",
            "SANDBOX_WORKER_DOCKER__NETWORK": f"sw-compose-{tag}",
            "DOCKER_GID": str(os.stat("/var/run/docker.sock").st_gid),
            "REDIS_PORT": str(redis_port),
            "FLOWER_PORT": str(flower_port),
            "WEBAPP_PORT": str(webapp_port),
            "EGRESS_PROXY_PORT": str(_free_port()),
        },
        redis_url=f"redis://127.0.0.1:{redis_port}/0",
        flower_port=flower_port,
        webapp_port=webapp_port,
    )
    client = docker.from_env()
    try:
        started = time.monotonic()
        stack.compose("up", "-d", "--build", "--scale", "worker=2", timeout=1200)
        print(f"compose up --build: {time.monotonic() - started:.1f}s")
        yield stack
    finally:
        _teardown(stack, client)
        client.close()


def test_compose_stack_serves_sessions_on_each_worker(stack: Stack) -> None:
    workers = stack.containers("worker")
    assert len(workers) == 2
    for service in ("redis", "beat", "flower", "egress-proxy"):
        assert len(stack.containers(service)) == 1, service

    first = stack.submit()
    assert first["state"] == "ready", first
    # The daemon is published on the bridge address, which the workers' compose network reaches.
    assert str(first["daemon_url"]).startswith(f"http://{BRIDGE_IP}:")
    serving = stack.served_by(str(first["request_id"]))
    assert len(serving) == 1

    # The sandbox runs on the isolated network, whose host rules a worker installed through the helper container.
    client = docker.from_env()
    try:
        sandbox = client.containers.get(str(first["sandbox_id"]))
        assert list(sandbox.attrs["NetworkSettings"]["Networks"]) == [stack.network]
        assert sandbox.labels["sandbox-worker-owner"] == stack.owner
    finally:
        client.close()
    rules = subprocess.run(["iptables", "-w", "10", "-S", "DOCKER-USER"], capture_output=True, text=True, check=True)
    assert f"-i {docker_isolation.bridge_name(stack.network)} " in rules.stdout

    # The other worker serves too: with the first one stopped (a warm shutdown, nothing in flight), it gets the next.
    subprocess.run(["docker", "stop", "-t", "60", serving[0]], check=True, capture_output=True)
    second = stack.submit()
    assert second["state"] == "ready", second
    assert stack.served_by(str(second["request_id"])) == [c for c in workers if c != serving[0]]

    # Flower, installed in our image, answers on its published port.
    assert httpx.get(f"http://127.0.0.1:{stack.flower_port}/healthcheck", timeout=10).text == "OK"


@pytest.mark.skipif(not HAS_CHECK, reason="`sandbox-worker check` is not in this checkout yet")
def test_compose_workers_become_healthy(stack: Stack) -> None:
    """The workers' health check (`sandbox-worker check --liveness`, the heartbeat file) passes."""
    deadline = time.monotonic() + 120
    states: list[str] = []
    while time.monotonic() < deadline:
        states = [
            subprocess.run(
                ["docker", "inspect", "--format", "{{.State.Health.Status}}", c],
                capture_output=True,
                text=True,
                check=False,
            ).stdout.strip()
            for c in stack.containers("worker")
        ]
        if states and all(s == "healthy" for s in states):
            return
        time.sleep(2)
    pytest.fail(f"worker health: {states}")


def test_a_session_from_the_web_app_in_a_browser_shows_in_metrics_and_logs(stack: Stack) -> None:
    """What a newcomer does after `docker-compose --profile webapp up`: start a session in the web app's page,
    chat with the agent, then find the session in a worker's metrics and its one summary log line."""
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: run `make test` (scripts/setup.sh installs it)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
        try:
            page = browser.new_page()
            page.set_default_timeout(60_000)
            page.goto(f"http://127.0.0.1:{stack.webapp_port}")
            page.select_option("#agent", "mock")
            page.fill("#prompt", "hello")
            page.click("text=Start session")
            expect(page.locator("#state")).to_have_text("ready", timeout=180_000)
            request_id = page.locator("#request").inner_text()
            expect(page.locator("#chat .agent").first).to_have_text("mock: hello")
            page.fill("#message", "and again")
            page.click("text=Send")
            expect(page.locator("#chat .agent").last).to_have_text("mock: and again")
            page.click("text=End session")
            expect(page.locator("#state")).to_have_text("terminated")
        finally:
            browser.close()

    (serving,) = stack.served_by(request_id)
    summary = [line for line in stack.log(serving).splitlines() if "session summary" in line and request_id in line]
    assert len(summary) == 1 and json.loads(summary[0])["outcome"] == "ready", summary
    ready = [
        line
        for line in stack.metrics(serving).splitlines()
        if line.startswith("sandbox_worker_sessions_total{") and 'outcome="ready"' in line and 'agent="mock"' in line
    ]
    assert ready and sum(float(line.rsplit(" ", 1)[1]) for line in ready) >= 1, ready
