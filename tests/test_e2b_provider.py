"""The E2B driver against the stand-in E2B server: the real e2b SDK, real HTTP, real containers."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any

import docker
import e2b
import httpx
import pytest
from pydantic import SecretStr

import providers.e2b as e2b_driver
from providers.base import LABEL_OWNER, LABEL_REQUEST_ID, LABEL_TENANT_ID, Sandbox, SandboxSpec
from providers.e2b import E2BConfig, E2BProvider
from tests.conftest import wait_for
from tests.standins.e2b import E2BStandIn
from tests.standins.sse_server import SOURCE as SSE_SOURCE
from worker import pins
from worker.errors import (
    ConfigurationError,
    InvalidRequest,
    ProviderAuthError,
    ProviderError,
    ProviderRateLimited,
    ProviderUnavailable,
    SandboxGone,
)

pytestmark = pytest.mark.integration

OWNER = f"e2btest-{uuid.uuid4().hex[:8]}"
CREATE = r"^/v2/sandboxes$"


@pytest.fixture(scope="module")
def standin(docker_client: docker.DockerClient) -> Iterator[E2BStandIn]:
    with E2BStandIn(pins.SANDBOX_IMAGE) as server:
        yield server


@pytest.fixture
def e2b_server(standin: E2BStandIn) -> Iterator[E2BStandIn]:
    """The module's stand-in with no faults queued; every sandbox a test leaves behind is removed after it."""
    standin.clear_faults()
    yield standin
    standin.clear_faults()
    for sandbox_id in standin.sandbox_ids():
        standin.vanish(sandbox_id)
    standin.remove_containers()


def make_config(server: E2BStandIn, **overrides: Any) -> E2BConfig:
    settings: dict[str, Any] = {
        "api_key": SecretStr(server.api_key),
        "api_url": server.url,
        "sandbox_url": server.url,
        "domain": server.domain,
        "template": pins.SANDBOX_IMAGE,
        "port_scheme": "http",
        "port_proxy_url": server.url,
        "request_timeout": 20,
        "start_timeout": 60,
        **overrides,
    }
    return E2BConfig(**settings)


@pytest.fixture
def provider(e2b_server: E2BStandIn) -> Iterator[E2BProvider]:
    driver = E2BProvider(make_config(e2b_server))
    yield driver
    driver.close()


def spec(**overrides: Any) -> SandboxSpec:
    labels = {LABEL_OWNER: OWNER, LABEL_REQUEST_ID: uuid.uuid4().hex}
    fields: dict[str, Any] = {"image": None, "labels": labels, "ttl_seconds": 600, **overrides}
    fields["labels"] = {**labels, **overrides.get("labels", {})}
    return SandboxSpec(**fields)


def processes(provider: E2BProvider, sandbox: Sandbox) -> str:
    """Command lines of every process in the sandbox, one per line (the image has no procps)."""
    script = 'for f in /proc/[0-9]*/cmdline; do tr "\\0" " " < "$f"; echo; done 2>/dev/null'
    return provider.exec(sandbox, ["sh", "-c", script]).stdout


# -- lifecycle ----------------------------------------------------------------------------------------


def test_start_applies_labels_env_and_ttl(provider: E2BProvider, e2b_server: E2BStandIn) -> None:
    """A started sandbox carries the spec's labels as metadata, its env in every command, and its TTL."""
    sandbox = provider.start(spec(labels={LABEL_TENANT_ID: "acme"}, env={"GREETING": "hello there"}, ttl_seconds=900))

    assert sandbox.provider == "e2b"
    assert provider.exec(sandbox, ["printenv", "GREETING"]).stdout == "hello there\n"
    container = e2b_server.sandboxes.container(sandbox.sandbox_id)
    assert container.labels[LABEL_TENANT_ID] == "acme"
    assert container.labels[LABEL_OWNER] == OWNER
    [create] = e2b_server.create_requests
    assert create["body"]["timeout"] == 900
    assert create["body"]["templateID"] == pins.SANDBOX_IMAGE
    found = provider.find(sandbox.sandbox_id)
    assert found is not None
    assert found.labels[LABEL_TENANT_ID] == "acme"
    assert found.state == "running"


def test_spec_image_overrides_template(provider: E2BProvider, e2b_server: E2BStandIn) -> None:
    """spec.image names the template to start from instead of the configured one."""
    provider.start(spec(image="custom-template"))

    assert [r["body"]["templateID"] for r in e2b_server.create_requests] == ["custom-template"]


def test_stop_removes_the_sandbox_and_is_idempotent(provider: E2BProvider, e2b_server: E2BStandIn) -> None:
    """stop kills the sandbox (its container goes), a second stop returns False, and find returns None."""
    sandbox = provider.start(spec())

    assert provider.stop(sandbox.sandbox_id) is True
    assert sandbox.sandbox_id not in e2b_server.container_ids()
    assert provider.stop(sandbox.sandbox_id) is False
    assert provider.find(sandbox.sandbox_id) is None
    with pytest.raises(SandboxGone):
        provider.exec(sandbox, ["true"])


def test_ttl_expiry_removes_the_sandbox(provider: E2BProvider, e2b_server: E2BStandIn) -> None:
    """The TTL is a hard lifetime: the sandbox disappears when it elapses."""
    sandbox = provider.start(spec(ttl_seconds=2))

    wait_for(lambda: provider.find(sandbox.sandbox_id) is None, 15, 0.1, "the sandbox to expire")
    assert sandbox.sandbox_id not in e2b_server.container_ids()


def test_list_owned_filters_by_labels_across_pages(
    provider: E2BProvider, e2b_server: E2BStandIn, monkeypatch: pytest.MonkeyPatch
) -> None:
    """list_owned returns exactly the sandboxes carrying every given label, following every page."""
    monkeypatch.setattr(e2b_driver, "LIST_PAGE_SIZE", 1)
    first = provider.start(spec(labels={LABEL_TENANT_ID: "tenant-a"}))
    second = provider.start(spec(labels={LABEL_TENANT_ID: "tenant-a"}))
    other = provider.start(spec(labels={LABEL_TENANT_ID: "tenant-b"}))
    stranger = provider.start(spec(labels={LABEL_OWNER: "someone-else"}))

    tenant_a = provider.list_owned({LABEL_OWNER: OWNER, LABEL_TENANT_ID: "tenant-a"})
    mine = provider.list_owned({LABEL_OWNER: OWNER})

    assert {s.sandbox_id for s in tenant_a} == {first.sandbox_id, second.sandbox_id}
    assert {s.sandbox_id for s in mine} == {first.sandbox_id, second.sandbox_id, other.sandbox_id}
    assert stranger.sandbox_id not in {s.sandbox_id for s in mine}
    assert all(s.labels[LABEL_OWNER] == OWNER and s.state == "running" for s in mine)
    assert len(e2b_server.requests_to(CREATE, "GET")) >= 5  # two pages of tenant-a, three of mine


# -- commands, files, daemons -------------------------------------------------------------------------


def test_exec_returns_exit_code_stdout_and_stderr(provider: E2BProvider) -> None:
    """A non-zero exit is a result with both streams, never an exception; env and cwd apply."""
    sandbox = provider.start(spec())

    failed = provider.exec(sandbox, ["sh", "-c", "echo out; echo err >&2; exit 3"])
    ok = provider.exec(sandbox, ["sh", "-c", 'echo "$A $(pwd)"'], env={"A": "x y"}, cwd="/tmp")

    assert (failed.exit_code, failed.stdout, failed.stderr) == (3, "out\n", "err\n")
    assert not failed
    assert (ok.exit_code, ok.stdout) == (0, "x y /tmp\n")
    assert provider.exec(sandbox, ["echo", "it's; $(not) run"]).stdout == "it's; $(not) run\n"


def test_exec_timeout_kills_the_command(provider: E2BProvider) -> None:
    """A command that overruns its timeout is killed in the sandbox and reported as exit 137."""
    sandbox = provider.start(spec())

    started = time.monotonic()
    result = provider.exec(sandbox, ["sleep", "30"], timeout=1)

    assert result.exit_code == 137
    assert time.monotonic() - started < 5
    assert "sleep 30" not in processes(provider, sandbox)


def test_upload_then_cat(provider: E2BProvider) -> None:
    """upload writes the bytes, creates the parent directories and applies the mode."""
    sandbox = provider.start(spec())
    data = b"#!/bin/sh\necho uploaded\n\x00\xff"

    provider.upload(sandbox, "/opt/deep/er/tool.sh", data, mode=0o750)

    assert (
        provider.exec(sandbox, ["cat", "/opt/deep/er/tool.sh"]).stdout.encode(errors="surrogateescape")[:22]
        == (data[:22])
    )
    assert provider.exec(sandbox, ["stat", "-c", "%a %s", "/opt/deep/er/tool.sh"]).stdout == f"750 {len(data)}\n"


def test_spawn_keeps_running_with_secret_env_only_in_its_process(provider: E2BProvider, e2b_server: E2BStandIn) -> None:
    """spawn returns at once; the process keeps running, logs to the file, and only it sees the secret env."""
    sandbox = provider.start(spec())
    argv = ["sh", "-c", 'echo "started with $SECRET_TOKEN"; exec sleep 300']

    started = time.monotonic()
    provider.spawn(sandbox, argv, env={"SECRET_TOKEN": "s3cr3t-value"}, cwd="/srv/daemon", log_path="/tmp/daemon.log")

    assert time.monotonic() - started < 5
    wait_for(
        lambda: "started with s3cr3t-value" in provider.exec(sandbox, ["cat", "/tmp/daemon.log"]).stdout,
        10,
        0.1,
        "the daemon's log line",
    )
    time.sleep(1.5)
    assert "sleep 300" in processes(provider, sandbox)
    container = e2b_server.sandboxes.container(sandbox.sandbox_id)
    assert not any("s3cr3t" in item for item in container.attrs["Config"]["Env"] or [])
    assert "s3cr3t" not in str(e2b_server.create_requests)
    assert "SECRET_TOKEN" not in provider.exec(sandbox, ["env"]).stdout


def test_spawn_reports_a_launch_that_cannot_start(provider: E2BProvider) -> None:
    """A working directory that cannot be created fails the spawn instead of passing silently."""
    sandbox = provider.start(spec())

    with pytest.raises(ProviderError) as caught:
        provider.spawn(sandbox, ["sleep", "1"], env={}, cwd="/etc/hostname/below-a-file", log_path="/tmp/x.log")

    assert not caught.value.transient
    assert "exited 1" in caught.value.message


def test_endpoint_reaches_a_server_through_the_proxy(provider: E2BProvider) -> None:
    """endpoint(port) routes through the stand-in's Host-header proxy to a server in the sandbox."""
    sandbox = provider.start(spec(ports=(2468,)))
    provider.upload(sandbox, "/srv/www/hello.txt", b"hello from the sandbox\n")
    provider.spawn(
        sandbox,
        ["python3", "-m", "http.server", "2468", "--directory", "/srv/www"],
        env={},
        cwd="/srv/www",
        log_path="/tmp/http.log",
    )

    endpoint = provider.endpoint(sandbox, 2468)
    assert endpoint.headers["Host"] == f"2468-{sandbox.sandbox_id}.{provider.config.domain}"
    with httpx.Client(base_url=endpoint.url, headers=dict(endpoint.headers), timeout=10, trust_env=False) as client:
        response = wait_for(
            lambda: (r := client.get("/hello.txt")).status_code == 200 and r, 20, 0.1, "the sandbox's HTTP server"
        )
    assert response.text == "hello from the sandbox\n"


def test_proxy_streams_sse_and_request_bodies(provider: E2BProvider) -> None:
    """The port proxy passes server-sent events through as they are written, and forwards request bodies."""
    sandbox = provider.start(spec())
    provider.upload(sandbox, "/srv/sse.py", SSE_SOURCE)
    provider.spawn(sandbox, ["python3", "/srv/sse.py", "2468"], env={}, cwd="/srv", log_path="/tmp/sse.log")
    endpoint = provider.endpoint(sandbox, 2468)

    with httpx.Client(base_url=endpoint.url, headers=dict(endpoint.headers), timeout=10, trust_env=False) as client:
        wait_for(lambda: client.post("/echo", content=b"ping").status_code == 200, 20, 0.1, "the SSE server")
        assert client.post("/echo", content=b"x" * 100_000).content == b"x" * 100_000
        arrivals: list[tuple[float, str]] = []
        started = time.monotonic()
        with client.stream("GET", "/events") as response:
            assert response.headers["content-type"] == "text/event-stream"
            for line in response.iter_lines():
                if line.startswith("data:"):
                    arrivals.append((time.monotonic() - started, line))

    assert [line for _, line in arrivals] == ["data: tick-0", "data: tick-1"]
    assert arrivals[0][0] < 1.0  # not held back until the stream ends
    assert arrivals[1][0] - arrivals[0][0] > 1.0


def test_private_ports_need_the_traffic_token(e2b_server: E2BStandIn) -> None:
    """With public_traffic off, endpoint() carries the sandbox's traffic token, which the edge requires."""
    provider = E2BProvider(make_config(e2b_server, public_traffic=False))
    sandbox = provider.start(spec())
    provider.spawn(sandbox, ["python3", "-m", "http.server", "2468"], env={}, cwd="/", log_path="/tmp/http.log")
    endpoint = provider.endpoint(sandbox, 2468)

    assert endpoint.headers.get("e2b-traffic-access-token")
    with httpx.Client(base_url=endpoint.url, timeout=10, trust_env=False) as client:
        wait_for(lambda: client.get("/", headers=dict(endpoint.headers)).status_code == 200, 20, 0.1, "the server")
        assert client.get("/", headers={"Host": endpoint.headers["Host"]}).status_code == 403


def test_endpoint_without_proxy_uses_the_scheme_and_host(e2b_server: E2BStandIn) -> None:
    """Without port_proxy_url the endpoint is the SDK's host under the configured scheme."""
    provider = E2BProvider(make_config(e2b_server, port_proxy_url=None, port_scheme="https"))
    sandbox = provider.start(spec())

    endpoint = provider.endpoint(sandbox, 2468)

    assert endpoint.url == f"https://2468-{sandbox.sandbox_id}.{e2b_server.domain}"
    assert dict(endpoint.headers) == {}


def test_a_fresh_provider_reconnects_to_an_existing_sandbox(provider: E2BProvider, e2b_server: E2BStandIn) -> None:
    """A driver that did not start the sandbox (another worker, a restart) connects to it by id."""
    sandbox = provider.start(spec(env={"FROM": "first"}))

    other = E2BProvider(make_config(e2b_server))
    assert other.exec(sandbox, ["printenv", "FROM"]).stdout == "first\n"
    assert e2b_server.requests_to(rf"^/v2/sandboxes/{sandbox.sandbox_id}/connect$", "POST")


# -- idempotency and faults ---------------------------------------------------------------------------


def test_same_idempotency_key_returns_the_same_sandbox(provider: E2BProvider, e2b_server: E2BStandIn) -> None:
    """Two creates with one idempotency key give one sandbox; keys E2B would refuse are digested."""
    key = "Request_0001:attempt"  # uppercase and punctuation: not a valid E2B key as it is

    first = provider.start(spec(idempotency_key=key))
    second = provider.start(spec(idempotency_key=key))

    assert first.sandbox_id == second.sandbox_id
    assert e2b_server.container_ids() == [first.sandbox_id]
    sent = {r["idempotency_key"] for r in e2b_server.create_requests}
    assert len(sent) == 1
    assert sent.pop().startswith("sw-")


def test_a_lost_create_response_is_retried_without_a_second_sandbox(
    provider: E2BProvider, e2b_server: E2BStandIn
) -> None:
    """When the create is processed but its answer lost (502), the SDK's retry with the key finds the first one."""
    e2b_server.lose_response(CREATE, method="POST", status=502)

    sandbox = provider.start(spec(idempotency_key="req-lost-response"))

    assert len(e2b_server.create_requests) == 2
    assert e2b_server.container_ids() == [sandbox.sandbox_id]
    assert provider.exec(sandbox, ["true"]).exit_code == 0


@pytest.mark.parametrize("status", [429, 503])
def test_create_is_retried_by_the_sdk_to_success(provider: E2BProvider, e2b_server: E2BStandIn, status: int) -> None:
    """Throttling (429) and busy (503) answers on create are retried by the SDK until it succeeds."""
    e2b_server.add_fault(CREATE, status, method="POST", count=2, headers={"Retry-After": "0"})

    sandbox = provider.start(spec(idempotency_key=f"retry-{status}"))

    assert len(e2b_server.requests_to(CREATE, "POST")) == 3
    assert e2b_server.container_ids() == [sandbox.sandbox_id]


@pytest.mark.parametrize(
    ("status", "error"), [(429, ProviderRateLimited), (503, ProviderUnavailable), (502, ProviderUnavailable)]
)
def test_exhausted_retries_are_transient_errors(
    e2b_server: E2BStandIn, status: int, error: type[ProviderUnavailable]
) -> None:
    """When every retry is refused, the final answer maps to a transient error of the right class."""
    provider = E2BProvider(make_config(e2b_server, retries=1))
    e2b_server.add_fault(CREATE, status, method="POST", count=5, headers={"Retry-After": "0"})

    with pytest.raises(error) as caught:
        provider.start(spec())

    assert caught.value.transient
    assert caught.value.status == status
    assert len(e2b_server.requests_to(CREATE, "POST")) == 2
    assert e2b_server.container_ids() == []


def test_a_stalled_control_plane_is_unavailable(e2b_server: E2BStandIn) -> None:
    """A create that outlives its timeout (a raw httpx timeout inside the SDK) is ProviderUnavailable."""
    provider = E2BProvider(make_config(e2b_server, start_timeout=1))
    e2b_server.add_fault(CREATE, 0, method="POST", delay=3)  # status 0: delay, then let it through

    started = time.monotonic()
    with pytest.raises(ProviderUnavailable):
        provider.start(spec())
    assert time.monotonic() - started < 2.5


def test_a_stalled_command_stream_is_unavailable(
    provider: E2BProvider, e2b_server: E2BStandIn, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When envd stops answering, the SDK's stream deadline (the backstop behind `timeout`) is ProviderUnavailable."""
    monkeypatch.setattr(e2b_driver, "EXEC_GRACE_SECONDS", 0.5)
    sandbox = provider.start(spec())
    e2b_server.add_fault(r"^/process\.Process/Start$", 0, delay=4)

    started = time.monotonic()
    with pytest.raises(ProviderUnavailable):
        provider.exec(sandbox, ["true"], timeout=1)
    assert time.monotonic() - started < 3.5


def test_unauthorized_is_an_auth_error_without_retries(e2b_server: E2BStandIn) -> None:
    """A 401 fails fast as ProviderAuthError: no retry, whether injected or from a wrong key."""
    provider = E2BProvider(make_config(e2b_server))
    e2b_server.add_fault(CREATE, 401, method="POST")

    started = time.monotonic()
    with pytest.raises(ProviderAuthError) as caught:
        provider.start(spec())
    assert time.monotonic() - started < 2
    assert len(e2b_server.requests_to(CREATE, "POST")) == 1
    assert not caught.value.transient

    wrong_key = E2BProvider(make_config(e2b_server, api_key=SecretStr("e2b_wrong")))
    with pytest.raises(ProviderAuthError) as caught:
        wrong_key.start(spec())
    assert "e2b_wrong" not in str(caught.value)


def test_missing_api_key_is_a_configuration_error(e2b_server: E2BStandIn) -> None:
    """Without an API key the driver refuses to start rather than reading one from the environment."""
    provider = E2BProvider(make_config(e2b_server, api_key=None))

    with pytest.raises(ConfigurationError):
        provider.start(spec())


def test_unreachable_control_plane_is_unavailable(e2b_server: E2BStandIn) -> None:
    """A control plane that refuses connections (a raw httpx error in the SDK) is ProviderUnavailable."""
    closed = httpx.URL(e2b_server.url).copy_with(port=1).__str__()
    provider = E2BProvider(make_config(e2b_server, api_url=closed, request_timeout=5))

    with pytest.raises(ProviderUnavailable):
        provider.start(spec())
    with pytest.raises(ProviderUnavailable):
        provider.list_owned({LABEL_OWNER: OWNER})


def test_a_vanished_sandbox_is_gone(provider: E2BProvider, e2b_server: E2BStandIn) -> None:
    """A sandbox removed behind the SDK's back is SandboxGone for exec, upload and a fresh connect."""
    sandbox = provider.start(spec())
    assert provider.exec(sandbox, ["true"]).exit_code == 0

    assert e2b_server.vanish(sandbox.sandbox_id)

    with pytest.raises(SandboxGone) as caught:
        provider.exec(sandbox, ["true"])
    assert caught.value.sandbox_id == sandbox.sandbox_id
    with pytest.raises(SandboxGone):
        provider.upload(sandbox, "/tmp/x", b"x")
    with pytest.raises(SandboxGone):
        E2BProvider(make_config(e2b_server)).exec(sandbox, ["true"])
    assert provider.stop(sandbox.sandbox_id) is False


# -- the stand-in's own envd semantics ----------------------------------------------------------------


def test_standin_command_deadline_kills_but_disconnect_does_not(e2b_server: E2BStandIn) -> None:
    """As in envd: a disconnected background command keeps running, one past its deadline is killed."""
    client = e2b.E2B(api_key=e2b_server.api_key, api_url=e2b_server.url, sandbox_url=e2b_server.url, request_timeout=10)
    sandbox = client.Sandbox.create(timeout=120)

    survivor = sandbox.commands.run("sleep 60", background=True, timeout=0)
    survivor.disconnect()
    doomed = sandbox.commands.run("sleep 61", background=True, timeout=1)
    doomed.disconnect()

    wait_for(lambda: doomed.pid not in {p.pid for p in sandbox.commands.list()}, 10, 0.1, "the deadline kill")
    assert survivor.pid in {p.pid for p in sandbox.commands.list()}
    assert sandbox.commands.kill(survivor.pid) is True
    wait_for(lambda: not sandbox.commands.list(), 10, 0.1, "the killed command to end")
    assert sandbox.commands.kill(survivor.pid) is False
    sandbox.kill()


def test_egress_is_denied_but_for_the_llm_hosts_and_the_requests_list(
    provider: E2BProvider, e2b_server: E2BStandIn
) -> None:
    """The SDK sends E2B deny-all plus allow_out (the operator's hosts, then the request's); an entry E2B cannot
    enforce (a port) is refused naming the field, before any create."""
    provider.start(spec(egress=("pypi.org", "10.1.0.0/16")))
    [create] = e2b_server.create_requests
    assert create["body"]["network"]["denyOut"] == ["0.0.0.0/0"]
    assert create["body"]["network"]["allowOut"] == ["api.anthropic.com", "api.openai.com", "pypi.org", "10.1.0.0/16"]

    with pytest.raises(InvalidRequest) as refused:
        provider.start(spec(egress=("pypi.org:443",)))
    assert refused.value.field == "sandbox.egress"
    assert len(e2b_server.create_requests) == 1
