"""The example web app (examples/webapp) in a real headless browser: Debian's chromium driven by Playwright, the
app served by uvicorn, a real worker and a Docker sandbox with the stand-in agent (uploaded, as in test_follow)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import expect, sync_playwright

from tests.conftest import ROOT, wait_for
from tests.standins.server import free_port
from worker.client import SessionClient

pytestmark = pytest.mark.integration

CHROMIUM = "/usr/bin/chromium"


def _up(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.TransportError:
        return False


@pytest.fixture
def webapp(base_env: dict[str, str], tmp_path: Path) -> Iterator[str]:
    port = free_port()
    env = {**os.environ, **base_env, "WEBAPP_TENANT": "web", "WEBAPP_PORT": str(port)}
    log = (tmp_path / "webapp.log").open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "examples.webapp"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: _up(url) or process.poll() is not None, 30, 0.1, "the web app")
        assert process.poll() is None, (tmp_path / "webapp.log").read_text()
        yield url
    finally:
        process.terminate()
        process.wait(timeout=10)


def test_submit_watch_and_chat_in_a_browser(worker_factory: Any, docker_client: Any, webapp: str) -> None:
    """Submit from the page, see the stages and 'ready', chat: a reply, a tool call, a permission allowed; the
    agent's markup is shown as text, never as HTML; end the session."""
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: run `make test` (scripts/setup.sh installs it)")
    worker_factory(env={"SANDBOX_WORKER_DAEMON_INSTALL": "upload"})
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
        page = browser.new_page()
        page.set_default_timeout(30_000)
        page.goto(webapp)
        page.select_option("#agent", "mock")
        page.fill("#prompt", "hello")
        page.click("text=Start session")
        expect(page.locator("#state")).to_have_text("ready", timeout=120_000)
        request_id = page.locator("#request").inner_text()
        try:
            assert page.locator("#stages li").count() >= 3  # e.g. sandbox, daemon, agent, prompt
            expect(page.locator("#chat .agent").first).to_have_text("mock: hello")

            page.fill("#message", "/tool notes.txt")
            page.click("text=Send")
            expect(page.locator("#chat .tool").first).to_have_text("⚙ Read notes.txt (completed)")
            expect(page.locator("#chat .agent").last).to_have_text("mock: read notes.txt")

            page.fill("#message", "/ask a.txt")
            page.click("text=Send")
            page.locator("#chat .permission button", has_text="Allow").click()
            expect(page.locator("#chat .agent").last).to_have_text("allowed: a.txt")

            hostile = '<img id="injected" src="x" onerror="document.title=1">'
            page.fill("#message", hostile)
            page.click("text=Send")
            expect(page.locator("#chat .agent").last).to_have_text(f"mock: {hostile}")
            assert page.locator("#injected").count() == 0

            page.click("text=End session")
            expect(page.locator("#state")).to_have_text("terminated")
        finally:
            browser.close()
            SessionClient().terminate(request_id)  # a no-op once the page ended it
