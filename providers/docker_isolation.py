"""What a Docker sandbox can reach: its network, and the engine host's packet filter for it.

Sandboxes run on a bridge network of their own (``DockerConfig.network``) created with inter-container traffic
off (``com.docker.network.bridge.enable_icc=false``) and a bridge interface named after the network, so the
engine host's rules can name it. Two iptables chains on the engine host, rebuilt from the settings each time a
driver starts (idempotent, so every worker sharing the engine must share these settings):

* ``SWI-<id>``, jumped to from ``INPUT`` for packets from the bridge: replies to connections the host opened
  (the worker reaching a daemon through its published port), never a link-local address, TCP to
  ``allowed_host_ports`` on any other host address (the egress proxy, a local LLM endpoint), nothing else: no DNS, no ssh, no Redis, no engine API.
* ``SWF-<id>``, jumped to from ``DOCKER-USER`` (Docker's place for operator rules in ``FORWARD``) for
  packets from the bridge: replies, never another sandbox, never link-local (169.254.0.0/16, the cloud
  metadata service), then connections to an allowed host port that the engine forwards to a container (a
  published port), then ``allowed_destinations`` (``CIDR`` or ``CIDR:port``), nothing else.

Who installs them: the driver, through a short-lived helper container (the host's PID and network
namespaces, the few capabilities ``nsenter`` and ``iptables`` need) that enters the mount and network
namespaces of the engine itself (the ``dockerd`` process, found in /proc) and runs the engine host's own
``iptables`` there. So it works with a remote engine as well as a local one, needs no root on the worker host,
and needs only ``sh`` and ``nsenter`` (util-linux) in the helper image; the engine host has the ``iptables``
its Docker uses anyway.
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
from collections.abc import Sequence
from typing import TYPE_CHECKING

from worker.errors import ProviderError

if TYPE_CHECKING:
    import docker

ICC_OPTION = "com.docker.network.bridge.enable_icc"
BRIDGE_NAME_OPTION = "com.docker.network.bridge.name"
NETWORK_LABEL = "sandbox-worker-network"
LINK_LOCAL = "169.254.0.0/16"
# Enters the engine's namespaces and runs the script given as $0 with the host's shell there.
_ENTER_ENGINE = (
    'for p in /proc/[0-9]*; do [ "$(cat "$p/comm" 2>/dev/null)" = dockerd ] && engine=${p#/proc/} && break; done; '
    '[ -n "$engine" ] || { echo "no dockerd process found" >&2; exit 3; }; '
    'exec nsenter -t "$engine" -m -n -- sh -c "$0"'
)
_HELPER_CAPS = ["SYS_ADMIN", "SYS_PTRACE", "SYS_CHROOT", "NET_ADMIN", "NET_RAW"]


def suffix(network: str) -> str:
    """A short stable id for the network: interface names have 15 characters at most."""
    return hashlib.sha256(network.encode()).hexdigest()[:8]


def bridge_name(network: str) -> str:
    return f"sw-{suffix(network)}"


def parse_destination(value: str) -> tuple[str, int | None]:
    """``CIDR`` or ``CIDR:port`` (an address alone is a /32): the network and the TCP port, if any."""
    address, _, port = value.rpartition(":") if value.count(":") == 1 else (value, "", "")
    network = ipaddress.IPv4Network(address, strict=False)
    if port and not (port.isdigit() and 0 < int(port) < 65536):
        raise ValueError(f"{value!r}: the port must be 1-65535")
    return str(network), int(port) if port else None


def rules_script(network: str, allowed_host_ports: Sequence[int], allowed_destinations: Sequence[str]) -> str:
    """The host-side shell script that (re)builds the two chains and hooks them in, once.

    The chains are replaced in one ``iptables-restore --noflush`` transaction (a declared chain is created, or
    flushed, and refilled atomically): every worker process rebuilds them when its driver starts, and rebuilds by
    separate commands running at once could interleave into a chain whose DROP comes before the rule accepting
    replies, cutting the host off from every daemon on the network until the next rebuild."""
    bridge, sid = bridge_name(network), suffix(network)
    into, forward = f"SWI-{sid}", f"SWF-{sid}"
    rules = [
        "*filter",
        f":{into} - [0:0]",
        f":{forward} - [0:0]",
        f"-A {into} -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT",
        f"-A {into} -d {LINK_LOCAL} -j DROP",
        *(f"-A {into} -p tcp --dport {port} -j ACCEPT" for port in allowed_host_ports),
        f"-A {into} -j DROP",
        f"-A {forward} -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT",
        f"-A {forward} -o {bridge} -j DROP",
        f"-A {forward} -d {LINK_LOCAL} -j DROP",
        # An allowed host port the engine forwards to a container (a published port, e.g. the egress proxy run by
        # compose) arrives here after DNAT: allow it by the port the sandbox asked for.
        *(
            f"-A {forward} -p tcp -m conntrack --ctstate DNAT --ctorigdstport {port} -j ACCEPT"
            for port in allowed_host_ports
        ),
    ]
    for destination in allowed_destinations:
        cidr, port = parse_destination(destination)
        rules.append(f"-A {forward} -d {cidr}" + (f" -p tcp --dport {port}" if port else "") + " -j ACCEPT")
    rules += [f"-A {forward} -j DROP", "COMMIT"]
    # Hooking in twice at once (both checks before either insert) leaves a second jump that is never reached: each
    # chain ends in a verdict.
    return "\n".join(
        [
            "set -e",
            'ipt() { iptables -w 10 "$@"; }',
            "iptables-restore -w 10 --noflush <<'RULES'",
            *rules,
            "RULES",
            f"ipt -C INPUT -i {bridge} -j {into} 2>/dev/null || ipt -I INPUT 1 -i {bridge} -j {into}",
            f"ipt -C DOCKER-USER -i {bridge} -j {forward} 2>/dev/null || ipt -I DOCKER-USER 1 -i {bridge} -j {forward}",
        ]
    )


def removal_script(network: str) -> str:
    """Unhooks and deletes the network's chains (for ``remove``)."""
    bridge, sid = bridge_name(network), suffix(network)
    return "\n".join(
        [
            f"while iptables -w 10 -D INPUT -i {bridge} -j SWI-{sid} 2>/dev/null; do :; done",
            f"while iptables -w 10 -D DOCKER-USER -i {bridge} -j SWF-{sid} 2>/dev/null; do :; done",
            *(
                f"iptables -w 10 -F {c}-{sid} 2>/dev/null; iptables -w 10 -X {c}-{sid} 2>/dev/null"
                for c in ("SWI", "SWF")
            ),
            "exit 0",
        ]
    )


def ensure_network(client: docker.DockerClient, network: str) -> None:
    """The sandbox network, created with ICC off if missing; an existing one must have ICC off."""
    import docker.errors

    try:
        found = client.networks.get(network)
    except docker.errors.NotFound:
        try:
            client.networks.create(
                network,
                driver="bridge",
                options={ICC_OPTION: "false", BRIDGE_NAME_OPTION: bridge_name(network)},
                labels={NETWORK_LABEL: "1"},
                check_duplicate=True,
            )
            return
        except docker.errors.APIError:
            # Another worker created it first: 409, or 403 "networks have same bridge name" when both raced.
            raced = [found for found in client.networks.list(names=[network]) if found.name == network]
            if not raced:
                raise
            found = client.networks.get(raced[0].id)
    options = found.attrs.get("Options") or {}
    if options.get(ICC_OPTION) != "false" or options.get(BRIDGE_NAME_OPTION) != bridge_name(network):
        raise ProviderError(
            f"docker network {network} exists without {ICC_OPTION}=false and {BRIDGE_NAME_OPTION}="
            f"{bridge_name(network)}: sandboxes on it could reach each other; remove it (the driver recreates it) "
            "or name another network",
            provider="docker",
        )


def run_on_host(client: docker.DockerClient, image: str, script: str) -> None:
    """Run ``script`` with the engine host's own shell and tools, in its namespaces."""
    import docker.errors

    try:
        client.containers.run(
            image,
            entrypoint=["sh", "-c", _ENTER_ENGINE, script],
            command=[],
            cap_drop=["ALL"],
            cap_add=_HELPER_CAPS,
            security_opt=["apparmor=unconfined"],
            pid_mode="host",
            network_mode="host",
            remove=True,
            labels={NETWORK_LABEL: "firewall"},
        )
    except docker.errors.ContainerError as exc:
        detail = (exc.stderr or b"").decode(errors="replace").strip()[-300:]
        raise ProviderError(
            f"installing the sandbox network's host rules failed (exit {exc.exit_status}): {detail}",
            provider="docker",
        ) from exc


def install(
    client: docker.DockerClient,
    image: str,
    network: str,
    allowed_host_ports: Sequence[int],
    allowed_destinations: Sequence[str],
) -> None:
    """The network and its host rules, idempotently."""
    ensure_network(client, network)
    run_on_host(client, image, rules_script(network, allowed_host_ports, allowed_destinations))


def remove(client: docker.DockerClient, image: str, network: str) -> None:
    """The network's host rules and the network (its sandboxes must be gone)."""
    import docker.errors

    run_on_host(client, image, removal_script(network))
    with contextlib.suppress(docker.errors.NotFound):
        client.networks.get(network).remove()
