"""The Daytona driver against the stand-in Daytona server: the real SDK, real HTTP, real containers."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator

import docker
import httpx
import pytest
from daytona import AsyncDaytona, SessionExecuteRequest
from daytona import DaytonaConfig as SdkConfig

from providers.base import LABEL_OWNER, SandboxSpec
from providers.daytona import LABEL_IDEMPOTENCY_KEY, DaytonaConfig, DaytonaProvider
from tests.conftest import wait_for
from tests.standins.daytona import DaytonaStandIn
from tests.standins.faults import Fault
from tests.standins.sse_server import SOURCE as SSE_SOURCE
from worker import pins
from worker.errors import InvalidRequest, ProviderAuthError, ProviderError, ProviderUnavailable, SandboxGone

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

API_KEY = "test-daytona-key"
CREATE = r"^/api/sandbox$"


@pytest.fixture(scope="module")
def standin() -> Iterator[DaytonaStandIn]:
    try:
        docker.from_env().images.get(pins.SANDBOX_IMAGE)
    except docker.errors.ImageNotFound:
        pytest.fail(f"{pins.SANDBOX_IMAGE} is missing: build it with scripts/build-image.sh")
    # A short start delay makes the SDK poll `starting` → `started` on every create; page_size=2 makes
    # every listing of three sandboxes walk nextCursor.
    with DaytonaStandIn(pins.SANDBOX_IMAGE, api_key=API_KEY, start_delay=0.3, page_size=2) as server:
        yield server


@pytest.fixture(autouse=True)
def _clean_faults(standin: DaytonaStandIn) -> Iterator[None]:
    standin.faults.clear()
    yield
    standin.faults.clear()


def _config(api_url: str, **overrides: object) -> DaytonaConfig:
    values: dict[str, object] = {
        "api_key": API_KEY,
        "api_url": api_url,
        "target": "us",
        "request_timeout": 20.0,
        "start_timeout": 60.0,
        "create_backoff": 0.05,
        "create_backoff_max": 0.2,
    }
    values.update(overrides)
    return DaytonaConfig.model_validate(values)


@pytest.fixture
def owner() -> str:
    return f"test-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def provider(standin: DaytonaStandIn, owner: str) -> Iterator[DaytonaProvider]:
    driver = DaytonaProvider(_config(standin.api_url))
    yield driver
    standin.faults.clear()
    try:
        for sandbox in driver.list_owned({LABEL_OWNER: owner}):
            driver.stop(sandbox.sandbox_id)
    finally:
        driver.close()


def _spec(owner: str, **overrides: object) -> SandboxSpec:
    values: dict[str, object] = {"image": None, "labels": {LABEL_OWNER: owner}}
    values.update(overrides)
    return SandboxSpec(**values)  # type: ignore[arg-type]


def _creates(standin: DaytonaStandIn) -> int:
    return sum(1 for method, path in standin.requests if method == "POST" and path == "/api/sandbox")


def test_start_sets_labels_env_and_lifetime(standin: DaytonaStandIn, provider: DaytonaProvider, owner: str) -> None:
    """A started sandbox carries the spec's labels, its env reaches exec, and its lifetime is bounded by the TTL."""
    spec = _spec(owner, labels={LABEL_OWNER: owner, "team": "blue"}, env={"GREETING": "hello world"}, ttl_seconds=150)

    sandbox = provider.start(spec)

    assert sandbox.provider == "daytona"
    assert sandbox.state == "running"
    assert sandbox.labels[LABEL_OWNER] == owner and sandbox.labels["team"] == "blue"
    assert sandbox.labels[LABEL_IDEMPOTENCY_KEY]
    assert provider.exec(sandbox, ["sh", "-c", 'printf %s "$GREETING"']).stdout == "hello world"
    described = standin.describe(sandbox.sandbox_id)
    assert described is not None
    assert (described["ttlMinutes"], described["autoStopInterval"], described["autoDeleteInterval"]) == (3, 3, 0)
    container = standin.containers.container(sandbox.sandbox_id)
    assert container.labels[LABEL_OWNER] == owner
    assert provider.find(sandbox.sandbox_id) == sandbox


def test_exec_reports_exit_codes_and_output(provider: DaytonaProvider, owner: str) -> None:
    """Exec returns the real exit code and combined output, keeps argv quoting, and honours env and cwd."""
    sandbox = provider.start(_spec(owner))

    failed = provider.exec(sandbox, ["sh", "-c", "echo out; echo err >&2; exit 3"])
    assert failed.exit_code == 3 and not failed
    assert "out" in failed.stdout and "err" in failed.stdout

    quoted = provider.exec(sandbox, ["printf", "%s|", "two words", "$HOME", "it's"])
    assert quoted and quoted.stdout == "two words|$HOME|it's|"

    here = provider.exec(sandbox, ["sh", "-c", 'echo "$(pwd) $ONLY_HERE"'], env={"ONLY_HERE": "yes"}, cwd="/tmp")
    assert here.stdout.strip() == "/tmp yes"


def test_exec_timeout_is_a_killed_result(provider: DaytonaProvider, owner: str) -> None:
    """A command that outlives its timeout is killed and reported as exit code 137, not raised."""
    sandbox = provider.start(_spec(owner))

    started = time.monotonic()
    result = provider.exec(sandbox, ["sleep", "30"], timeout=1)

    assert result.exit_code == 137
    assert time.monotonic() - started < 10


def test_upload_then_read_back_with_mode(provider: DaytonaProvider, owner: str) -> None:
    """An uploaded file lands at its absolute path, parents created, with the requested mode."""
    sandbox = provider.start(_spec(owner))
    payload = b"line one\nline two \x00\xff\n"

    provider.upload(sandbox, "/opt/sw/nested/secret.bin", payload, mode=0o600)

    assert provider.exec(sandbox, ["base64", "-w0", "/opt/sw/nested/secret.bin"]).stdout == (
        "bGluZSBvbmUKbGluZSB0d28gAP8K"
    )
    assert provider.exec(sandbox, ["stat", "-c", "%a", "/opt/sw/nested/secret.bin"]).stdout.strip() == "600"


def test_spawn_keeps_running_with_secret_env_only_in_its_process(
    standin: DaytonaStandIn, provider: DaytonaProvider, owner: str
) -> None:
    """A spawned process outlives the call, sees its env, and the secret is in no argv and not in the sandbox env."""
    sandbox = provider.start(_spec(owner))
    secret = f"s3cret-{uuid.uuid4().hex}"
    script = 'echo "token=$SW_SECRET" > /tmp/spawned.out; exec sleep 300'

    provider.spawn(
        sandbox, ["sh", "-c", script], env={"SW_SECRET": secret}, cwd="/workspace/run", log_path="/tmp/spawn.log"
    )

    def written() -> bool:
        return provider.exec(sandbox, ["cat", "/tmp/spawned.out"]).stdout.strip() == f"token={secret}"

    wait_for(written, 10, 0.1, "the spawned process to write its file")
    time.sleep(1)
    sleepers = provider.exec(sandbox, ["sh", "-c", "cat /proc/[0-9]*/cmdline | tr '\\0' ' '"]).stdout
    assert "sleep 300" in sleepers
    assert secret not in sleepers
    container_env = standin.containers.container(sandbox.sandbox_id).attrs["Config"]["Env"]
    assert not any(secret in item for item in container_env)
    assert provider.exec(sandbox, ["sh", "-c", 'printf %s "${SW_SECRET:-unset}"']).stdout == "unset"


def test_endpoint_reaches_port_with_preview_token_only(provider: DaytonaProvider, owner: str) -> None:
    """The preview endpoint reaches a server in the sandbox with its token header and is refused without it."""
    sandbox = provider.start(_spec(owner))
    provider.upload(sandbox, "/workspace/site/hello.txt", b"hello from the sandbox\n")
    provider.spawn(
        sandbox, ["python3", "-m", "http.server", "2468"], env={}, cwd="/workspace/site", log_path="/tmp/http.log"
    )

    endpoint = provider.endpoint(sandbox, 2468)

    assert endpoint.headers.keys() == {"X-Daytona-Preview-Token"}

    def served() -> bool:
        try:
            answer = httpx.get(f"{endpoint.url}/hello.txt", headers=dict(endpoint.headers), timeout=5)
        except httpx.HTTPError:
            return False
        return answer.status_code == 200 and answer.text == "hello from the sandbox\n"

    wait_for(served, 15, 0.1, "the http server behind the preview link")
    assert httpx.get(f"{endpoint.url}/hello.txt", timeout=5).status_code == 401
    wrong = {"X-Daytona-Preview-Token": "not-the-token"}
    assert httpx.get(f"{endpoint.url}/hello.txt", headers=wrong, timeout=5).status_code == 401


def test_preview_streams_server_sent_events_unbuffered(provider: DaytonaProvider, owner: str) -> None:
    """Events sent through the preview link arrive as they are written, not when the response ends."""
    sandbox = provider.start(_spec(owner))
    provider.upload(sandbox, "/opt/sse.py", SSE_SOURCE)
    provider.spawn(sandbox, ["python3", "/opt/sse.py", "2468"], env={}, cwd="/opt", log_path="/tmp/sse.log")
    endpoint = provider.endpoint(sandbox, 2468)
    arrivals: list[tuple[float, str]] = []

    def stream() -> bool:
        try:
            with httpx.stream("GET", f"{endpoint.url}/events", headers=dict(endpoint.headers), timeout=10) as answer:
                if answer.status_code != 200:  # the server in the sandbox is not listening yet
                    return False
                started = time.monotonic()
                for line in answer.iter_lines():
                    if line.startswith("data:"):
                        arrivals.append((time.monotonic() - started, line))
        except httpx.HTTPError:
            return False
        return True

    wait_for(stream, 20, 0.1, "the SSE server behind the preview link")
    assert [line for _, line in arrivals] == ["data: tick-0", "data: tick-1"]
    assert arrivals[0][0] < 1.0 <= arrivals[1][0]


def test_stop_removes_the_sandbox_and_is_idempotent(
    standin: DaytonaStandIn, provider: DaytonaProvider, owner: str
) -> None:
    """Stop deletes the sandbox and its container; a second stop and a lookup report it gone."""
    sandbox = provider.start(_spec(owner))

    assert provider.stop(sandbox.sandbox_id) is True

    with pytest.raises(KeyError):
        standin.containers.container(sandbox.sandbox_id)
    assert provider.find(sandbox.sandbox_id) is None
    assert provider.stop(sandbox.sandbox_id) is False
    with pytest.raises(SandboxGone):
        provider.exec(sandbox, ["true"])


def test_list_owned_filters_by_labels_across_pages(provider: DaytonaProvider, owner: str) -> None:
    """list_owned returns every sandbox carrying all the labels, across pages, and nothing else."""
    other_owner = f"{owner}-other"
    mine = [provider.start(_spec(owner, labels={LABEL_OWNER: owner, "pool": "a"})) for _ in range(2)]
    mine.append(provider.start(_spec(owner, labels={LABEL_OWNER: owner, "pool": "b"})))
    other = provider.start(_spec(other_owner, labels={LABEL_OWNER: other_owner}))
    try:
        assert {s.sandbox_id for s in provider.list_owned({LABEL_OWNER: owner})} == {s.sandbox_id for s in mine}
        pool_a = provider.list_owned({LABEL_OWNER: owner, "pool": "a"})
        assert {s.sandbox_id for s in pool_a} == {s.sandbox_id for s in mine[:2]}
        assert all(s.state == "running" for s in pool_a)
        assert provider.list_owned({LABEL_OWNER: f"{owner}-nobody"}) == []
    finally:
        provider.stop(other.sandbox_id)


@pytest.mark.parametrize("statuses", [(429,), (503,), (429, 503, 502)])
def test_create_retries_transient_statuses_to_one_sandbox(
    standin: DaytonaStandIn, provider: DaytonaProvider, owner: str, statuses: tuple[int, ...]
) -> None:
    """Transient create answers are retried until the create succeeds, leaving exactly one sandbox."""
    for status in statuses:
        headers = {"Retry-After": "0.1"} if status == 429 else {}
        standin.faults.add(Fault(path=CREATE, method="POST", status=status, headers=headers))

    sandbox = provider.start(_spec(owner))

    assert _creates(standin) == len(statuses) + 1
    assert [s.sandbox_id for s in provider.list_owned({LABEL_OWNER: owner})] == [sandbox.sandbox_id]


def test_create_whose_answer_was_lost_is_adopted_not_duplicated(
    standin: DaytonaStandIn, provider: DaytonaProvider, owner: str
) -> None:
    """A create that succeeded behind a 504 is found by its idempotency label on retry instead of created twice."""
    standin.fail_after("POST", CREATE, 504)

    sandbox = provider.start(_spec(owner))

    assert _creates(standin) == 1
    assert [s.sandbox_id for s in provider.list_owned({LABEL_OWNER: owner})] == [sandbox.sandbox_id]
    assert provider.exec(sandbox, ["true"])


def test_start_with_a_known_idempotency_key_adopts(provider: DaytonaProvider, owner: str) -> None:
    """Starting again with the same idempotency key returns the existing sandbox."""
    spec = _spec(owner, idempotency_key=f"key-{uuid.uuid4().hex}")

    first = provider.start(spec)
    second = provider.start(spec)

    assert second.sandbox_id == first.sandbox_id
    assert len(provider.list_owned({LABEL_OWNER: owner})) == 1


def test_create_giving_up_raises_unavailable_and_leaves_nothing(
    standin: DaytonaStandIn, provider: DaytonaProvider, owner: str
) -> None:
    """When every create attempt answers 503 the driver raises a transient error after bounded attempts."""
    standin.faults.add(Fault(path=CREATE, method="POST", status=503, count=50))

    with pytest.raises(ProviderUnavailable) as caught:
        provider.start(_spec(owner))

    assert caught.value.transient and caught.value.status == 503
    assert _creates(standin) == provider.config.create_attempts
    assert provider.list_owned({LABEL_OWNER: owner}) == []


def test_wrong_api_key_fails_fast_with_auth_error(standin: DaytonaStandIn, owner: str) -> None:
    """A rejected API key raises ProviderAuthError at once, without retries."""
    driver = DaytonaProvider(_config(standin.api_url, api_key="wrong-key"))
    try:
        started = time.monotonic()
        with pytest.raises(ProviderAuthError) as caught:
            driver.start(_spec(owner))
        assert time.monotonic() - started < 5
    finally:
        driver.close()
    assert caught.value.status == 401 and not caught.value.transient
    assert _creates(standin) == 1


def test_unreachable_api_is_unavailable(owner: str) -> None:
    """A refused connection is a transient ProviderUnavailable."""
    driver = DaytonaProvider(_config("http://127.0.0.1:9/api", request_timeout=5.0))
    try:
        with pytest.raises(ProviderUnavailable):
            driver.find("no-such-sandbox")
    finally:
        driver.close()


def test_vanished_sandbox_raises_sandbox_gone(standin: DaytonaStandIn, provider: DaytonaProvider, owner: str) -> None:
    """A sandbox removed behind the driver's back makes exec raise SandboxGone, find None and stop False."""
    sandbox = provider.start(_spec(owner))
    assert provider.exec(sandbox, ["true"])

    standin.vanish(sandbox.sandbox_id)

    with pytest.raises(SandboxGone) as caught:
        provider.exec(sandbox, ["true"])
    assert caught.value.sandbox_id == sandbox.sandbox_id
    assert provider.find(sandbox.sandbox_id) is None
    assert provider.stop(sandbox.sandbox_id) is False


def test_create_that_does_not_start_in_time_is_removed(owner: str) -> None:
    """A sandbox still starting at start_timeout is deleted and the failure is transient."""
    with DaytonaStandIn(pins.SANDBOX_IMAGE, api_key=API_KEY, start_delay=60) as slow:
        driver = DaytonaProvider(_config(slow.api_url, start_timeout=5.0))
        try:
            with pytest.raises(ProviderUnavailable):
                driver.start(_spec(owner))
            assert slow.sandbox_ids() == []
            assert slow.container_ids() == []
        finally:
            driver.close()


def test_ttl_destroys_a_forgotten_sandbox(owner: str) -> None:
    """The hard lifetime derived from ttl_seconds destroys a sandbox nobody stops (1 s stand-in minutes)."""
    with DaytonaStandIn(pins.SANDBOX_IMAGE, api_key=API_KEY, minute=1.0) as fast:
        driver = DaytonaProvider(_config(fast.api_url))
        try:
            sandbox = driver.start(_spec(owner, ttl_seconds=60))
            wait_for(lambda: driver.find(sandbox.sandbox_id) is None, 15, 0.1, "the TTL to destroy the sandbox")
            wait_for(lambda: fast.container_ids() == [], 10, 0.1, "the container to be removed")
        finally:
            driver.close()


def test_configured_image_builds_with_requested_resources(standin: DaytonaStandIn, owner: str) -> None:
    """With config.image the sandbox is built from that image, and cpu/memory are rounded up to whole units."""
    driver = DaytonaProvider(_config(standin.api_url, image=pins.SANDBOX_IMAGE, snapshot=None))
    try:
        sandbox = driver.start(_spec(owner, cpu=1.5, memory_mb=1500))
        described = standin.describe(sandbox.sandbox_id)
        assert described is not None
        assert described["buildInfo"]["dockerfileContent"].strip() == f"FROM {pins.SANDBOX_IMAGE}"
        assert (described["cpu"], described["memory"], described["snapshot"]) == (2, 2, None)
        limits = standin.containers.container(sandbox.sandbox_id).attrs["HostConfig"]
        assert (limits["CpuQuota"], limits["Memory"]) == (200_000, 2 * 2**30)
        assert driver.exec(sandbox, ["cat", "/etc/os-release"])
    finally:
        for leftover in driver.list_owned({LABEL_OWNER: owner}):
            driver.stop(leftover.sandbox_id)
        driver.close()


def test_missing_snapshot_is_a_permanent_error(provider: DaytonaProvider, owner: str) -> None:
    """A snapshot Daytona does not know is a permanent provider error, not retried."""
    with pytest.raises(ProviderError) as caught:
        provider.start(_spec(owner, image="no-such-snapshot"))

    assert type(caught.value) is ProviderError and caught.value.status == 400


def test_standin_sessions_behave_like_daytona(standin: DaytonaStandIn, provider: DaytonaProvider, owner: str) -> None:
    """Stand-in sessions run commands in order in one shell, and async commands keep running after the call."""
    sandbox = provider.start(_spec(owner))

    async def scenario() -> None:
        async with AsyncDaytona(SdkConfig(api_key=API_KEY, api_url=standin.api_url, target="us")) as client:
            handle = await client.get(sandbox.sandbox_id)
            await handle.process.create_session("s1")
            run = handle.process.execute_session_command
            await run("s1", SessionExecuteRequest(command="cd /tmp && export MARK=kept"))
            same = await run("s1", SessionExecuteRequest(command='echo "$(pwd) $MARK"; echo oops >&2; false'))
            assert (same.exit_code, same.stdout, same.stderr) == (1, "/tmp kept\n", "oops\n")
            background = await run("s1", SessionExecuteRequest(command="sleep 1; echo done", run_async=True))
            assert (await handle.process.get_session_command("s1", background.cmd_id)).exit_code is None
            for _ in range(50):
                if (await handle.process.get_session_command("s1", background.cmd_id)).exit_code is not None:
                    break
                await asyncio.sleep(0.1)
            logs = await handle.process.get_session_command_logs("s1", background.cmd_id)
            assert logs.stdout == "done\n"
            await handle.process.delete_session("s1")

    asyncio.run(asyncio.wait_for(scenario(), 60))


def test_egress_maps_onto_daytonas_cidr_allow_list(
    standin: DaytonaStandIn, provider: DaytonaProvider, owner: str
) -> None:
    """A request's CIDRs become network_allow_list (after the operator's); blocking with no list is block-all;
    a host name, which Daytona cannot filter on, is refused naming the field before any create."""
    listing = DaytonaProvider(_config(standin.api_url, block_egress=True, egress_cidrs=["10.9.0.0/16"]))
    blocking = DaytonaProvider(_config(standin.api_url, block_egress=True))
    try:
        listed = listing.start(_spec(owner, egress=("192.0.2.7",)))
        blocked = blocking.start(_spec(owner))
        described = [standin.describe(s.sandbox_id) or {} for s in (listed, blocked)]
        assert described[0]["networkAllowList"] == "10.9.0.0/16,192.0.2.7/32"
        assert (described[1]["networkBlockAll"], described[1]["networkAllowList"]) == (True, None)

        creates = _creates(standin)
        with pytest.raises(InvalidRequest) as refused:
            provider.start(_spec(owner, egress=("pypi.org",)))
        assert refused.value.field == "sandbox.egress"
        assert _creates(standin) == creates
    finally:
        listing.close()
        blocking.close()
