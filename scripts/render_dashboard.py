"""Render docs/grafana-dashboard.json from a real worker's ``/metrics`` into docs/dashboard.png.

Grafana cannot be installed here, so this draws the dashboard's panels itself: each panel's title and the values its
queries give on one real scrape. The scrape comes from a real ``sandbox-worker worker`` (private redis-server, its
own Docker network) that brings up a few mock sessions on Docker and fails one (an image that does not exist).
One scrape has no rates: a rate or increase is shown as the total since the worker started, a histogram as its
p50/p95 over all observations. The page is screenshotted with Debian's chromium through Playwright.

    .venv/bin/python scripts/render_dashboard.py            # run a worker, scrape, render docs/dashboard.png
    .venv/bin/python scripts/render_dashboard.py --scrape metrics.txt   # render a saved scrape instead
"""

from __future__ import annotations

import argparse
import html
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a file: the checkout's packages
VENV_BIN = Path(sys.executable).parent
DOCS = ROOT / "docs"

Labels = tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class Sample:
    name: str
    labels: dict[str, str]
    value: float


# --- a real worker, scraped ------------------------------------------------------------------------------------------


def _free_port() -> int:
    from tests.standins.server import free_port

    return free_port()


def _wait_for(predicate: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.1)


def _pings(port: int) -> bool:
    import redis

    try:
        return bool(redis.Redis(port=port).ping())
    except redis.ConnectionError:
        return False


def scrape_a_real_worker(workdir: Path) -> str:
    """Bring up three mock sessions and one that fails on a worker of its own, and return its ``/metrics`` text.
    Everything it started (redis-server, worker, sandboxes, network) is gone when it returns."""
    import docker
    import httpx
    from cryptography.fernet import Fernet

    from providers import docker_isolation
    from worker import pins

    redis_port, metrics_port = _free_port(), _free_port()
    owner = f"swdash-{uuid.uuid4().hex[:8]}"
    network = f"sw-{owner}"
    redis_url = f"redis://127.0.0.1:{redis_port}/0"
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("SANDBOX_WORKER_")},
        "SANDBOX_WORKER_BROKER_URL": redis_url,
        "SANDBOX_WORKER_RESULT_BACKEND": redis_url,
        "SANDBOX_WORKER_REDIS_URL": redis_url,
        "SANDBOX_WORKER_FERNET_KEY": Fernet.generate_key().decode(),
        "SANDBOX_WORKER_OWNER": owner,
        "SANDBOX_WORKER_AUTH__MODE": "open",
        "SANDBOX_WORKER_DOCKER__NETWORK": network,
        "SANDBOX_WORKER_METRICS_PORT": str(metrics_port),
        "SANDBOX_WORKER_METRICS_HOST": "127.0.0.1",
        "SANDBOX_WORKER_LOG_FORMAT": "json",
        "TMPDIR": str(workdir),
    }
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    redis_argv = [shutil.which("redis-server") or "redis-server", "--port", str(redis_port), "--bind", "127.0.0.1"]
    redis_argv += ["--save", "", "--appendonly", "no", "--dir", str(workdir)]
    redis_server = subprocess.Popen(
        redis_argv,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    log_path = workdir / "worker.log"
    worker: subprocess.Popen[bytes] | None = None
    client = docker.from_env()
    try:
        _wait_for(lambda: _pings(redis_port), 10, "redis-server")
        with log_path.open("ab") as log:
            worker = subprocess.Popen(
                [str(VENV_BIN / "sandbox-worker"), "worker", "--concurrency=2", "--providers=docker"],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
                start_new_session=True,
            )
        _wait_for(lambda: b"ready." in log_path.read_bytes() or worker.poll() is not None, 60, "the worker")
        if worker.poll() is not None:
            raise SystemExit(f"the worker exited:\n{log_path.read_text(errors='replace')[-3000:]}")
        # The in-process client reads the worker's settings (not its TMPDIR, which goes with the worker).
        os.environ.update({k: v for k, v in env.items() if k.startswith("SANDBOX_WORKER_")})
        from worker.client import SessionClient

        sessions = SessionClient()
        requests: dict[str, dict[str, str]] = {f"dash-{n}-{uuid.uuid4().hex[:6]}": {} for n in range(3)}
        requests[f"dash-bad-{uuid.uuid4().hex[:6]}"] = {"image": "sandbox-worker/no-such-image:0"}
        for request_id, sandbox in requests.items():
            sessions.submit(
                {"request_id": request_id, "tenant_id": "dash", "agent": "mock", "provider": "docker"}
                | {"session": {}, "sandbox": sandbox}
            )
        for request_id in requests:
            result = sessions.wait(request_id, timeout=180)
            sys.stderr.write(f"{request_id}: {result.state.value if result else 'no result'}\n")
        text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).text
        for request_id in requests:
            sessions.terminate(request_id)
        return text
    finally:
        if worker is not None and worker.poll() is None:
            os.killpg(worker.pid, signal.SIGTERM)
            worker.wait(timeout=60)
        for container in client.containers.list(all=True, filters={"label": f"sandbox-worker-owner={owner}"}):
            container.remove(force=True)
        docker_isolation.remove(client, pins.SANDBOX_IMAGE, network)
        client.close()
        redis_server.terminate()
        redis_server.wait(timeout=10)


def parse_scrape(text: str) -> list[Sample]:
    from prometheus_client.parser import text_string_to_metric_families

    return [
        Sample(s.name, dict(s.labels), s.value)
        for family in text_string_to_metric_families(text)
        for s in family.samples
    ]


# --- the panels' queries, on one scrape ------------------------------------------------------------------------------

_SELECTOR = re.compile(r"(sandbox_worker_\w+)(?:\{([^}]*)\})?")
_MATCHER = re.compile(r'(\w+)(=~|=)"([^"]*)"')
_BY = re.compile(r"by \(([^)]*)\)")
_QUANTILE = re.compile(r"histogram_quantile\(([\d.]+),")


def _selected(samples: Iterable[Sample], selector: str) -> list[Sample]:
    """The samples a PromQL selector picks; ``instance`` is Prometheus's label, absent from a raw scrape."""
    match = _SELECTOR.search(selector)
    assert match, selector
    name, matchers = match.group(1), _MATCHER.findall(match.group(2) or "")

    def keep(sample: Sample) -> bool:
        for label, op, value in matchers:
            if label == "instance":
                continue
            have = sample.labels.get(label, "")
            if not (re.fullmatch(value, have) if op == "=~" else have == value):
                return False
        return True

    return [s for s in samples if s.name == name and keep(s)]


def _quantile(q: float, buckets: dict[float, float]) -> float:
    """Prometheus's ``histogram_quantile``: linear interpolation inside the bucket the rank falls in."""
    bounds = sorted(buckets)
    total = buckets[bounds[-1]]
    if total == 0:
        return math.nan
    rank, lower, below = q * total, 0.0, 0.0
    for bound in bounds:
        if buckets[bound] >= rank:
            if math.isinf(bound):
                return lower
            return lower + (bound - lower) * (rank - below) / (buckets[bound] - below)
        lower, below = bound, buckets[bound]
    return lower


def evaluate(expr: str, samples: list[Sample]) -> dict[Labels, float]:
    """One panel query's series on a single scrape: ``sum``/``max by`` over the selected samples (a rate or increase
    read as the total so far), ``histogram_quantile`` over the buckets, one ``a / b`` for the ratio panels."""
    if " / " in expr:
        numerator, denominator = (evaluate(part, samples).get((), math.nan) for part in expr.split(" / ", 1))
        return {(): numerator / denominator if denominator else math.nan}
    by_match = _BY.search(expr)
    by = [label.strip() for label in by_match.group(1).split(",")] if by_match else []
    selected = _selected(samples, expr)
    quantile = _QUANTILE.match(expr)
    if quantile:
        buckets: dict[Labels, dict[float, float]] = defaultdict(lambda: defaultdict(float))
        for s in selected:
            key = tuple((label, s.labels.get(label, "")) for label in by if label != "le")
            buckets[key][float(s.labels["le"])] += s.value
        values = {key: _quantile(float(quantile.group(1)), b) for key, b in buckets.items()}
        return {key: value for key, value in values.items() if not math.isnan(value)}
    series: dict[Labels, list[float]] = defaultdict(list)
    for s in selected:
        series[tuple((label, s.labels.get(label, "")) for label in by)].append(s.value)
    combine: Callable[[list[float]], float] = max if expr.startswith("max") else sum
    return {key: combine(values) for key, values in series.items()}


# --- the page --------------------------------------------------------------------------------------------------------


def _format(value: float, unit: str | None) -> str:
    if unit == "percentunit":
        return f"{value:.0%}"
    if unit == "s":
        return f"{value:.2f} s" if value < 10 else f"{value:.0f} s"
    return f"{value:g}"


def _legend(template: str | None, labels: Labels) -> str:
    values = dict(labels)
    return re.sub(r"\{\{(\w+)\}\}", lambda m: values.get(m.group(1), ""), template or "") or "value"


def _panel(panel: dict[str, Any], samples: list[Sample]) -> str:
    unit = panel.get("fieldConfig", {}).get("defaults", {}).get("unit")
    span = f"grid-column: span {panel['gridPos']['w']}"
    title = html.escape(panel["title"])
    if panel["type"] == "stat":
        value = evaluate(panel["targets"][0]["expr"], samples).get((), math.nan)
        shown = '<p class="empty">No data</p>' if math.isnan(value) else f"<p>{_format(value, unit)}</p>"
        return f'<div class="panel stat" style="{span}"><h3>{title}</h3>{shown}</div>'
    rows = [
        (_legend(target.get("legendFormat"), labels), value)
        for target in panel["targets"]
        for labels, value in sorted(evaluate(target["expr"], samples).items())
    ]
    top = max((value for _, value in rows), default=0.0) or 1.0
    bars = "".join(
        f'<div class="bar"><span class="name">{html.escape(name)}</span><span class="track">'
        f'<span class="fill" style="width:{100 * value / top:.1f}%"></span></span>'
        f'<span class="value">{_format(value, unit)}</span></div>'
        for name, value in rows
    )
    return f'<div class="panel" style="{span}"><h3>{title}</h3>{bars or "<p class=empty>No data</p>"}</div>'


_STYLE = """
body { margin: 0; padding: 16px; background: #111217; color: #ccccdc; font: 13px/1.35 system-ui, sans-serif; }
header h1 { margin: 0; font-size: 20px; color: #fff; } header p { margin: 4px 0 8px; color: #8e8ea0; }
.grid { display: grid; grid-template-columns: repeat(24, 1fr); gap: 8px; }
.row { grid-column: span 24; margin: 10px 0 0; font-size: 15px; color: #fff; }
.panel { background: #181b1f; border: 1px solid #2c3235; border-radius: 3px; padding: 8px 10px; }
.panel h3 { margin: 0 0 6px; font-size: 13px; font-weight: 500; color: #fff; }
.stat p { margin: 4px 0; font-size: 34px; font-weight: 600; color: #73bf69; }
.bar { display: grid; grid-template-columns: minmax(0, 45%) 1fr 70px; gap: 6px; align-items: center; margin: 3px 0; }
.name { overflow: hidden; text-overflow: ellipsis; white-space: nowrap; }
.track { background: #22252b; height: 10px; } .fill { display: block; height: 10px; background: #5794f2; }
.value { text-align: right; font-variant-numeric: tabular-nums; }
.panel .empty { color: #6e6e80; margin: 4px 0; font-size: 13px; font-weight: 400; }
"""


def render_html(dashboard: dict[str, Any], samples: list[Sample]) -> str:
    parts = [
        f'<h2 class="row">{html.escape(p["title"])}</h2>' if p["type"] == "row" else _panel(p, samples)
        for p in sorted(dashboard["panels"], key=lambda p: (p["gridPos"]["y"], p["gridPos"]["x"]))
    ]
    return (
        f"<!doctype html><meta charset=utf-8><style>{_STYLE}</style><header><h1>{html.escape(dashboard['title'])}"
        "</h1><p>docs/grafana-dashboard.json on one scrape of a real worker: rates and increases shown as totals "
        "since it started, histograms as quantiles over all observations.</p></header>"
        f'<div class="grid">{"".join(parts)}</div>'
    )


def screenshot(page_html: str, out: Path) -> None:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", headless=True)
        page = browser.new_page(viewport={"width": 1200, "height": 800})
        page.set_content(page_html)
        page.screenshot(path=str(out), full_page=True)
        browser.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scrape", type=Path, help="a saved /metrics text to render instead of running a worker")
    parser.add_argument("--save-scrape", type=Path, help="also write the worker's /metrics text here")
    parser.add_argument("--out", type=Path, default=DOCS / "dashboard.png")
    args = parser.parse_args()
    if args.scrape:
        text = args.scrape.read_text()
    else:
        with tempfile.TemporaryDirectory(prefix="sw-dash-") as workdir:
            text = scrape_a_real_worker(Path(workdir))
        if args.save_scrape:
            args.save_scrape.write_text(text)
    dashboard = json.loads((DOCS / "grafana-dashboard.json").read_text())
    screenshot(render_html(dashboard, parse_scrape(text)), args.out)
    sys.stdout.write(f"{args.out}: {args.out.stat().st_size} bytes\n")


if __name__ == "__main__":
    main()
