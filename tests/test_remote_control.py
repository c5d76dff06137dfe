"""Celery remote control (shutdown, pool changes: anyone on the broker may send them) is off unless enabled."""

from __future__ import annotations

from typing import Any

import docker
import pytest

from tests.conftest import wait_for
from worker.celery_app import create_app
from worker.config import get_settings
from worker.queueing import send_status

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("enabled", [False, True])
def test_remote_control_is_off_unless_enabled(
    enabled: bool, worker_factory: Any, docker_client: docker.DockerClient
) -> None:
    """A shutdown broadcast from a client stops a worker only when the operator enabled remote control."""
    env = {"SANDBOX_WORKER_REMOTE_CONTROL": "true"} if enabled else {}
    worker = worker_factory(env=env, providers="docker")
    app = create_app(get_settings())
    app.control.broadcast("shutdown")
    if enabled:
        wait_for(lambda: worker.process.poll() is not None, 30, 0.1, "the worker to obey the shutdown")
        return
    assert send_status("no-such-request", app=app).get(timeout=30) is None  # it still serves tasks
    assert worker.process is not None and worker.process.poll() is None
