"""The metrics as operators meet them: Prometheus names (prefix, units, ``_total``), and the Grafana dashboard and
docs/operations.md naming exactly the metrics the worker defines."""

from __future__ import annotations

import json
import re
from pathlib import Path

from prometheus_client import Counter, Gauge, Histogram
from prometheus_client.metrics import MetricWrapperBase

from worker import metrics

DOCS = Path(__file__).resolve().parent.parent / "docs"
DEFINED = {value for value in vars(metrics).values() if isinstance(value, MetricWrapperBase)}


def _exposed(metric: MetricWrapperBase) -> str:
    """The name a scrape shows (a counter's gets ``_total``)."""
    return f"{metric._name}_total" if isinstance(metric, Counter) else metric._name


def test_names_follow_prometheus_conventions() -> None:
    for metric in DEFINED:
        assert metric._name.startswith("sandbox_worker_"), metric._name
        if isinstance(metric, Histogram):
            assert metric._name.endswith("_seconds"), metric._name
        assert isinstance(metric, Counter | Gauge | Histogram)
        assert not {"tenant_id", "request_id", "tenant"} & set(metric._labelnames), metric._name  # cardinality


def test_the_dashboard_uses_the_defined_metrics_and_all_of_them() -> None:
    dashboard = json.loads((DOCS / "grafana-dashboard.json").read_text())
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]
    used = {
        re.sub(r"_(bucket|count|sum)$", "", name) for expr in exprs for name in re.findall(r"sandbox_worker_\w+", expr)
    }

    assert used == {_exposed(metric) for metric in DEFINED}


def test_operations_doc_lists_every_metric() -> None:
    text = (DOCS / "operations.md").read_text()
    for metric in DEFINED:
        name = _exposed(metric)
        short = name.removeprefix("sandbox_worker_pool")  # the pool rows abbreviate their siblings: `_misses_total`
        assert f"`{name}`" in text or f"`{short}`" in text, name
