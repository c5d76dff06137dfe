"""Celery remote control (shutdown, pool changes: anyone on the broker may send them) is off unless enabled."""

from __future__ import annotations

import time
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
    """A shutdown broadcast from a client stops a worker only when the operator enabled remote control. Broadcasts
    are Redis pub/sub, lost when sent before the worker subscribes: the test broadcasts every second, after the worker
    has served a task."""
    env = {"SANDBOX_WORKER_REMOTE_CONTROL": "true"} if enabled else {}
    worker = worker_factory(env=env, providers="docker")
    app = create_app(get_settings())
    assert send_status("no-such-request", app=app).get(timeout=30) is None  # it serves tasks

    def stopped_after_a_broadcast() -> bool:
        app.control.broadcast("shutdown")
        return worker.process.poll() is not None

    if enabled:
        wait_for(stopped_after_a_broadcast, 30, 1.0, "the worker to obey the shutdown")
        return
    for _ in range(5):
        assert not stopped_after_a_broadcast()
        time.sleep(1.0)
    assert send_status("no-such-request", app=app).get(timeout=30) is None  # it still serves tasks
