"""The Docker driver on the real engine: a sandbox's ttl is its hard lifetime without any worker or reaper."""

from __future__ import annotations

import time

import docker
import pytest

from providers.base import LABEL_OWNER, LABEL_REQUEST_ID, SandboxSpec
from providers.docker import DockerConfig, DockerProvider
from tests.conftest import OWNER

pytestmark = pytest.mark.integration


def test_a_sandbox_nobody_stops_ends_by_itself_at_its_ttl(docker_client: docker.DockerClient) -> None:
    """A 3 s sandbox with its daemon's neighbour process running is gone (container removed) a few seconds after its
    ttl, with nothing but the engine left to end it."""
    provider = DockerProvider(DockerConfig())
    try:
        labels = {LABEL_OWNER: OWNER, LABEL_REQUEST_ID: "ttl-by-itself"}
        sandbox = provider.start(SandboxSpec(image=None, labels=labels, ttl_seconds=3))
        started = time.monotonic()
        assert provider.exec(sandbox, ["true"]).exit_code == 0
        provider.exec(sandbox, ["sh", "-c", "nohup sleep 600 >/dev/null 2>&1 &"])  # a process beside the idle one
        assert provider.find(sandbox.sandbox_id) is not None

        while provider.list_owned(labels) and time.monotonic() - started < 20:
            time.sleep(0.25)

        assert provider.list_owned(labels) == [] and provider.find(sandbox.sandbox_id) is None
        assert time.monotonic() - started >= 2.5  # not before its ttl
    finally:
        provider.close()
