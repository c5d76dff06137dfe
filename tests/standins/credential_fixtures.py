"""Fixtures of the credential tests, a pytest plugin: ``pytest_plugins = ["tests.standins.credential_fixtures"]``."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import docker
import pytest

from tests.conftest import OWNER
from tests.standins.credentials import CredentialStack, bridge_address, build_agent_image


@pytest.fixture(scope="session")
def agent_image(docker_client: docker.DockerClient) -> Iterator[str]:
    """The sandbox image with claude and codex installed as the stand-in agent, for this test session."""
    tag = build_agent_image(docker_client, f"sandbox-worker/test-agents:{OWNER}")
    yield tag
    with contextlib.suppress(docker.errors.ImageNotFound):
        docker_client.images.remove(tag, force=True)


@pytest.fixture(scope="module")
def credential_stack(
    base_env: dict[str, str],
    docker_client: docker.DockerClient,
    agent_image: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[CredentialStack]:
    """Stand-ins, egress proxy and one worker configured for every strategy, shared by a test module."""
    stack = CredentialStack(
        base_env=base_env,
        workdir=tmp_path_factory.mktemp("stack"),
        bridge=bridge_address(docker_client),
        image=agent_image,
    )
    try:
        yield stack.start()
    finally:
        stack.stop()
