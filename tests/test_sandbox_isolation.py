"""What a Docker sandbox can reach, and what a host user can read of its daemon: real Docker, real daemon.

Two sandboxes on the isolated network (one running a daemon and a service its "agent" started), host services
on the bridge address (one allowed, one not) and at the cloud metadata address, probed from the other sandbox.
The same probes on the engine's default bridge without isolation come out open: they can see a connection.
"""

from __future__ import annotations

import contextlib
import http.server
import os
import shutil
import socket
import subprocess
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import docker
import pytest
from cryptography.fernet import Fernet
from pydantic import SecretStr

from providers import docker_isolation
from providers.base import LABEL_OWNER, Sandbox, SandboxSpec
from providers.docker import DockerConfig, DockerProvider
from tests.conftest import OWNER, ROOT, SANDBOX_NETWORK, wait_for
from tests.standins.credentials import bridge_address
from tests.standins.server import free_port
from worker import daemon
from worker.config import Settings
from worker.errors import InvalidRequest
from worker.models import InstallMode

pytestmark = pytest.mark.integration

METADATA = "169.254.169.254"
SERVICE_PORT = 8000  # what the sandbox's "agent" serves on: python3 -m http.server
DAEMON_PORT = 2468
# Prints OPEN or CLOSED for host:port, from inside a sandbox (python3 is in the image; no curl, no nc).
PROBE = (
    "import socket, sys\n"
    "try:\n"
    "    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=2).close(); print('OPEN')\n"
    "except OSError as exc:\n"
    "    print('CLOSED', type(exc).__name__)\n"
)


class _Service(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@dataclass
class HostServices:
    bridge: str
    allowed: int
    closed: int


@pytest.fixture(scope="module")
def host_services(docker_client: docker.DockerClient) -> Iterator[HostServices]:
    """Listeners on the bridge address (an allowed port, a closed one) and on the metadata address, which is put
    on the host's loopback for the module so no packet leaves the machine."""
    bridge = bridge_address(docker_client)
    services = HostServices(bridge, free_port(), free_port())
    subprocess.run(["ip", "addr", "add", f"{METADATA}/32", "dev", "lo"], check=True)
    servers = [
        http.server.ThreadingHTTPServer((host, port), _Service)
        for host, port in [(bridge, services.allowed), (bridge, services.closed), (METADATA, services.allowed)]
    ]
    for server in servers:
        threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield services
    finally:
        for server in servers:
            server.shutdown()
            server.server_close()
        subprocess.run(["ip", "addr", "del", f"{METADATA}/32", "dev", "lo"], check=False)


@dataclass
class Pair:
    driver: DockerProvider
    target: Sandbox  # runs a daemon and a service its agent started
    prober: Sandbox
    token: str


def _pair(config: DockerConfig) -> Iterator[Pair]:
    driver = DockerProvider(config)
    labels = {LABEL_OWNER: OWNER, "isolation": uuid.uuid4().hex[:8]}
    spec = SandboxSpec(image=None, labels=labels, ttl_seconds=600, ports=(DAEMON_PORT,))
    target, prober = driver.start(spec), driver.start(spec)
    try:
        token = daemon.new_token()
        daemon.install_daemon(driver, target, InstallMode.preinstalled, Settings().daemon_binary, image=None)
        daemon.start_daemon(driver, target, token=token, port=DAEMON_PORT, cwd="/workspace", env={})
        daemon.DaemonClient(driver.endpoint(target, DAEMON_PORT), token).wait_healthy(30)
        service = ["python3", "-m", "http.server", str(SERVICE_PORT)]
        driver.spawn(target, service, env={}, cwd="/workspace", log_path="/tmp/service.log")
        wait_for(lambda: _probe(driver, target, "127.0.0.1", SERVICE_PORT) == "OPEN", 15, what="the agent's service")
        yield Pair(driver, target, prober, token.get_secret_value())
    finally:
        for sandbox in (target, prober):
            driver.stop(sandbox.sandbox_id)
        driver.close()


@pytest.fixture(scope="module")
def isolated(host_services: HostServices) -> Iterator[Pair]:
    yield from _pair(DockerConfig(network=SANDBOX_NETWORK, allowed_host_ports=[host_services.allowed]))


@pytest.fixture(scope="module")
def unprotected(host_services: HostServices) -> Iterator[Pair]:
    """The engine's default bridge with isolation off: what a sandbox reached before."""
    yield from _pair(DockerConfig(network=None, isolate=False))


def _probe(driver: DockerProvider, sandbox: Sandbox, host: str, port: int) -> str:
    return driver.exec(sandbox, ["python3", "-c", PROBE, host, str(port)], timeout=30).stdout.split(" ")[0].strip()


def _reachable(pair: Pair, services: HostServices) -> dict[str, str]:
    """What the prober sandbox reaches: the target's daemon and service, host services, the metadata address."""
    target_ip = pair.target.private_address
    assert target_ip, "the driver reports the sandbox's private address"
    probes = {
        "other sandbox's daemon": (target_ip, DAEMON_PORT),
        "other sandbox's service": (target_ip, SERVICE_PORT),
        "host service not allowed": (services.bridge, services.closed),
        "host service allowed": (services.bridge, services.allowed),
        "metadata address": (METADATA, services.allowed),
    }
    return {name: _probe(pair.driver, pair.prober, host, port) for name, (host, port) in probes.items()}


def test_a_sandbox_reaches_only_the_allowed_host_ports(isolated: Pair, host_services: HostServices) -> None:
    """No other sandbox (its daemon or its agent's service), no host port that is not allowed, no metadata
    address; an allowed host port (the egress proxy's, a local LLM endpoint's) works."""
    assert _reachable(isolated, host_services) == {
        "other sandbox's daemon": "CLOSED",
        "other sandbox's service": "CLOSED",
        "host service not allowed": "CLOSED",
        "host service allowed": "OPEN",
        "metadata address": "CLOSED",
    }


def test_the_probes_see_a_connection_where_nothing_isolates(unprotected: Pair, host_services: HostServices) -> None:
    """The control: on the default bridge without isolation every probe above connects."""
    assert set(_reachable(unprotected, host_services).values()) == {"OPEN"}


def test_host_rules_rebuilt_at_once_by_many_workers_end_whole(docker_client: docker.DockerClient) -> None:
    """Every worker process rebuilds its network's chains when its driver starts, so a fleet starting rebuilds them
    many times at once: they must end exactly as one rebuild leaves them, replies accepted before any DROP (built by
    separate commands, interleaved rebuilds left a DROP first now and then, and the host lost every daemon)."""
    network = f"sw-rules-{uuid.uuid4().hex[:8]}"
    image = DockerConfig().image
    script = docker_isolation.rules_script(network, [8089], ["10.1.0.0/16:443"])
    docker_isolation.ensure_network(docker_client, network)
    try:
        docker_isolation.run_on_host(docker_client, image, script)
        chains = [f"{kind}-{docker_isolation.suffix(network)}" for kind in ("SWI", "SWF")]
        expected = {chain: _rules(chain) for chain in chains}
        assert expected[chains[0]][1].endswith("--ctstate RELATED,ESTABLISHED -j ACCEPT")
        rebuilds = [
            threading.Thread(target=docker_isolation.run_on_host, args=(docker_client, image, script)) for _ in range(6)
        ]
        for rebuild in rebuilds:
            rebuild.start()
        for rebuild in rebuilds:
            rebuild.join()
        assert {chain: _rules(chain) for chain in chains} == expected
    finally:
        docker_isolation.remove(docker_client, image, network)


def _rules(chain: str) -> list[str]:
    """The chain's rules as the engine host lists them (this machine is the engine's host)."""
    return subprocess.run(
        ["iptables", "-w", "10", "-S", chain], check=True, capture_output=True, text=True
    ).stdout.split("\n")


def test_sandboxes_run_without_capabilities_and_with_limits(isolated: Pair) -> None:
    """Every capability dropped, no-new-privileges, default memory/CPU/process limits."""
    status = isolated.driver.exec(isolated.target, ["cat", "/proc/self/status"]).stdout
    fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
    assert fields["CapEff"].strip() == fields["CapBnd"].strip() == "0000000000000000"
    assert fields["NoNewPrivs"].strip() == "1"
    host_config = isolated.driver.client.containers.get(isolated.target.sandbox_id).attrs["HostConfig"]
    config = isolated.driver.config
    assert host_config["Memory"] == config.memory_mb * 2**20
    assert host_config["NanoCpus"] == int(config.cpu * 1e9)
    assert host_config["PidsLimit"] == config.pids_limit


# Reads every /proc/<pid>/cmdline and /proc/<pid>/environ it can and says where the needle (read from stdin, so it
# is on no command line itself) was found, and how many command lines it read.
_READ_PROC = """
import os, sys
needle, found, read = sys.stdin.read().encode(), [], 0
for pid in filter(str.isdigit, os.listdir("/proc")):
    for name in ("cmdline", "environ"):
        try:
            data = open(f"/proc/{pid}/{name}", "rb").read()
        except OSError:
            continue
        read += name == "cmdline"
        if needle in data:
            found.append(f"{pid}/{name}")
print(read, " ".join(found) or "-")
"""


def _as_nobody(needle: str) -> tuple[int, str]:
    setpriv = shutil.which("setpriv")
    assert setpriv, "setpriv (util-linux) is on the host"
    argv = [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups", "/usr/bin/python3", "-c", _READ_PROC]
    run = subprocess.run(argv, input=needle, capture_output=True, text=True, check=True, cwd="/")
    output = run.stdout.split(" ", 1)
    return int(output[0]), output[1].strip()


def test_an_unprivileged_host_user_cannot_read_the_daemon_token(isolated: Pair) -> None:
    """A host user other than root reads every command line and environment it can: the live daemon's token is
    in none. The control: a marker on a sandbox process's command line is found the same way."""
    read, found = _as_nobody(isolated.token)
    assert read > 10
    assert found == "-"

    marker = f"marker-{uuid.uuid4().hex}"
    isolated.driver.spawn(
        isolated.target, ["sh", "-c", "sleep 600; :", marker], env={}, cwd="/workspace", log_path="/dev/null"
    )
    found_marker = wait_for(lambda: _as_nobody(marker)[1].removesuffix("-"), 10, what="the marker")
    assert found_marker.endswith("/cmdline")


# From inside a sandbox: GET http://host:port/ through $http_proxy (urllib honours it), and the same through a
# CONNECT tunnel opened by hand; prints each status (or the error).
FETCH = """
import base64, os, socket, sys, urllib.error, urllib.parse, urllib.request
host, port = sys.argv[1], int(sys.argv[2])
try:
    print(urllib.request.urlopen(f"http://{host}:{port}/", timeout=10).status, end=" ")
except urllib.error.HTTPError as exc:
    print(exc.code, end=" ")
proxy = urllib.parse.urlsplit(os.environ["https_proxy"])
auth = base64.b64encode(f"{proxy.username}:{proxy.password}".encode()).decode()
with socket.create_connection((proxy.hostname, proxy.port), timeout=10) as sock:
    sock.sendall(f"CONNECT {host}:{port} HTTP/1.1\\r\\nProxy-Authorization: Basic {auth}\\r\\n\\r\\n".encode())
    print(sock.recv(4096).split(b" ")[1].decode())
"""


@pytest.fixture(scope="module")
def forward_proxy(host_services: HostServices, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """The real `sandbox-worker forward-proxy` on the bridge address. Its destinations here are host services on
    the bridge, so it may connect to private addresses (--allow-private)."""
    key, port = Fernet.generate_key().decode(), free_port(host_services.bridge)
    argv = [str(ROOT / ".venv/bin/sandbox-worker"), "forward-proxy", "--host", host_services.bridge]
    argv += ["--port", str(port), "--allow-private"]
    log = (tmp_path_factory.mktemp("forward-proxy") / "proxy.log").open("wb")
    env = {**os.environ, "SANDBOX_WORKER_DOCKER__FORWARD_PROXY_KEY": key}
    process = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        wait_for(lambda: _listening(host_services.bridge, port), 20, what="the forward proxy")
        yield f"http://{host_services.bridge}:{port}", key
    finally:
        process.terminate()
        process.wait(10)
        log.close()


def _owned_ids(driver: DockerProvider) -> set[str]:
    # sparse: other sessions' containers come and go meanwhile, and a full listing inspects each one.
    found = driver.client.containers.list(all=True, sparse=True, filters={"label": f"{LABEL_OWNER}={OWNER}"})
    return {container.id for container in found}


def _listening(host: str, port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=1):
        return True
    return False


def test_the_egress_allow_list_lets_through_only_what_it_lists(
    forward_proxy: tuple[str, str], host_services: HostServices
) -> None:
    """A sandbox whose request lists one destination reaches it through the forward proxy (plain HTTP and a
    CONNECT tunnel), not an unlisted one (403), and not the listed one directly; a request with an egress list
    on a worker without a forward proxy is refused naming the field, before any sandbox exists."""
    url, key = forward_proxy
    bridge, listed, unlisted = host_services.bridge, host_services.closed, host_services.allowed
    config = DockerConfig(
        network=SANDBOX_NETWORK, forward_proxy_url=url, forward_proxy_key=SecretStr(key), egress_always=[]
    )
    driver = DockerProvider(config)
    spec = SandboxSpec(image=None, labels={LABEL_OWNER: OWNER}, ttl_seconds=300, egress=(f"{bridge}:{listed}",))
    sandbox = driver.start(spec)
    try:
        fetch = ["python3", "-c", FETCH, bridge]
        assert driver.exec(sandbox, [*fetch, str(listed)], timeout=30).stdout.split() == ["200", "200"]
        assert driver.exec(sandbox, [*fetch, str(unlisted)], timeout=30).stdout.split() == ["403", "403"]
        assert _probe(driver, sandbox, bridge, listed) == "CLOSED"
    finally:
        driver.stop(sandbox.sandbox_id)
        driver.close()

    unconfigured = DockerProvider(DockerConfig(network=SANDBOX_NETWORK))
    before = _owned_ids(unconfigured)
    with pytest.raises(InvalidRequest) as refused:
        unconfigured.start(spec)
    assert refused.value.field == "sandbox.egress"
    assert _owned_ids(unconfigured) == before
    unconfigured.close()
