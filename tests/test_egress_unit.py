"""Unit tests of the Docker sandboxes' egress pieces: allow-list entries, the forward proxy's passes, the host
rules and the settings that feed them (no Docker: tests/test_sandbox_isolation.py runs them for real)."""

from __future__ import annotations

import time
from urllib.parse import urlsplit

import pytest
from cryptography.fernet import Fernet
from pydantic import SecretStr, ValidationError

from providers import docker_egress, docker_isolation
from providers.base import SandboxSpec
from providers.docker import DockerConfig, DockerProvider
from worker.errors import InvalidRequest

KEY = SecretStr(Fernet.generate_key().decode())


@pytest.mark.parametrize(
    ("entry", "host", "port", "allowed"),
    [
        ("pypi.org", "pypi.org", 443, True),
        ("pypi.org", "PyPI.org", 80, True),
        ("pypi.org", "pypi.org", 22, False),
        ("pypi.org", "evil-pypi.org", 443, False),
        ("*.github.com", "api.github.com", 443, True),
        ("*.github.com", "github.com", 443, False),
        ("10.0.0.5:8080", "10.0.0.5", 8080, True),
        ("10.0.0.5:8080", "10.0.0.5", 443, False),
    ],
)
def test_an_entry_allows_its_host_and_ports_only(entry: str, host: str, port: int, allowed: bool) -> None:
    """host[:port] and *.domain[:port]; no port means 443 and 80."""
    assert docker_egress.Entry.parse(entry).allows(host, port) is allowed


def test_a_pass_opens_with_its_key_until_it_expires() -> None:
    """The pass seals the list; another key, a forged token or an expired pass opens to nothing."""
    token = docker_egress.mint(KEY, ["pypi.org", "*.github.com:22"], time.time() + 60)
    opened = docker_egress.open_pass(KEY, token)
    assert opened == [docker_egress.Entry("pypi.org", None), docker_egress.Entry("*.github.com", 22)]
    assert docker_egress.open_pass(SecretStr(Fernet.generate_key().decode()), token) is None
    forged = token[:40] + ("A" if token[40] != "A" else "B") + token[41:]
    assert docker_egress.open_pass(KEY, forged) is None
    assert docker_egress.open_pass(KEY, token, now=time.time() + 120) is None


def test_the_driver_hands_a_sandbox_its_pass_or_refuses_its_egress() -> None:
    """With a forward proxy: proxy variables whose pass holds the operator's hosts then the request's, and the
    proxy's port opened on the host; without one, a request with egress is refused naming the field."""
    config = DockerConfig(forward_proxy_url="http://172.17.0.1:8090", forward_proxy_key=KEY, allowed_host_ports=[8089])
    spec = SandboxSpec(image=None, labels={}, ttl_seconds=300, egress=("pypi.org",))
    env = DockerProvider(config)._egress_env(spec)
    proxy = urlsplit(env["HTTPS_PROXY"])
    assert (proxy.hostname, proxy.port, proxy.username) == ("172.17.0.1", 8090, docker_egress.PASS_USER)
    opened = docker_egress.open_pass(KEY, proxy.password or "")
    assert [entry.host for entry in opened or []] == ["api.anthropic.com", "api.openai.com", "pypi.org"]
    assert env["NO_PROXY"] == "localhost,127.0.0.1"
    assert config.host_ports() == [8089, 8090]

    with pytest.raises(InvalidRequest) as refused:
        DockerProvider(DockerConfig())._egress_env(spec)
    assert refused.value.field == "sandbox.egress"
    assert DockerProvider(DockerConfig())._egress_env(SandboxSpec(image=None, labels={})) == {}


def test_settings_refuse_what_the_rules_cannot_express() -> None:
    with pytest.raises(ValidationError, match="port must be"):
        DockerConfig(allowed_destinations=["10.0.0.0/8:99999"])
    with pytest.raises(ValidationError):
        DockerConfig(allowed_destinations=["example.com"])
    with pytest.raises(ValidationError, match="forward_proxy_key"):
        DockerConfig(forward_proxy_url="http://172.17.0.1:8090")


def test_the_host_rules_close_everything_but_what_is_allowed() -> None:
    """Replies first, then the fixed refusals (other sandboxes, link-local), then the allowances, then DROP."""
    script = docker_isolation.rules_script("sandbox-worker", [8089], ["10.1.0.0/16:443"])
    bridge = docker_isolation.bridge_name("sandbox-worker")
    assert len(bridge) <= 15
    rules = [line for line in script.splitlines() if line.startswith("-A SWF")]
    assert [rule.split(" -j ")[-1] for rule in rules] == ["ACCEPT", "DROP", "DROP", "ACCEPT", "ACCEPT", "DROP"]
    assert f"-o {bridge} -j DROP" in rules[1] and "-d 169.254.0.0/16 -j DROP" in rules[2]
    assert "--ctorigdstport 8089" in rules[3] and "-d 10.1.0.0/16 -p tcp --dport 443" in rules[4]
    assert f"ipt -I INPUT 1 -i {bridge}" in script and f"ipt -I DOCKER-USER 1 -i {bridge}" in script
