"""The benchmark's harness works (bench/): its figures, and the ceiling scenario end to end on a handful of
sessions. Nothing here is timed: speed is read from `make bench`, not asserted."""

from __future__ import annotations

import pytest

from bench.harness import Bench, Row, percentile
from bench.scenarios import SCENARIOS, ceiling
from worker.models import SessionResult, SessionState


def test_percentiles_and_ratio_to_the_baseline() -> None:
    assert percentile([5.0], 99) == 5.0
    assert percentile([float(v) for v in range(1, 101)], 50) == pytest.approx(50.5)
    row = Row("cold", "x", latencies_ms=[100.0, 200.0, 300.0])
    figures = row.as_json(baseline_p50=100.0)
    assert figures["ms"]["p50"] == 200.0
    assert figures["ratio_p50_to_baseline_p50"] == 2.0


def test_a_result_gives_enqueue_to_ready_and_the_queue_wait() -> None:
    row = Row("cold", "x")
    ready = SessionResult(
        request_id="r1", state=SessionState.ready, started_at=10.25, ready_at=11.0, timings_ms={"sandbox": 500.0}
    )
    row.add_result(ready, submitted=10.0)
    row.add_result(SessionResult(request_id="r2", state=SessionState.failed), submitted=10.0)
    assert row.latencies_ms == [1000.0]
    assert row.stages_ms == [{"queue": 250.0, "sandbox": 500.0}]
    assert row.errors == ["failed"]


def test_every_scenario_is_registered_by_name() -> None:
    assert {"baseline", "cold-mock", "cold-claude", "cold-codex", "burst", "ceiling"} <= set(SCENARIOS)


@pytest.mark.integration
def test_ceiling_smoke() -> None:
    """Five sessions through the real pipeline on a private Redis, the fake provider and stand-in daemons, against the
    same run's daemon protocol alone (its CPU is part of the worker's, so the ratio is above one)."""
    bench = Bench(runs=1, max_seconds=60, ceiling_sessions=5)
    try:
        row = ceiling(bench)
        assert bench.workdir.is_dir()  # its private Redis's
    finally:
        bench.close()
    assert not bench.workdir.exists()  # nothing of the run is left in the temporary directory
    assert row.errors == []
    assert len(row.latencies_ms) == 5
    assert set(row.stage_p50()) >= {"claim", "sandbox", "daemon", "session", "ready"}
    assert row.extra["sessions_per_s"] > 0
    assert row.extra["worker_cpu_ms_per_session"] > 0
    assert 0 < row.extra["protocol_cpu_ms_per_session"] < row.extra["worker_cpu_ms_per_session"]
    assert row.extra["worker_cpu_over_protocol"] > 1


@pytest.mark.integration
def test_a_warm_scenario_removes_its_pool_and_the_burst_counts_its_own_sandboxes() -> None:
    """On Docker, through real workers: a warm scenario's pool (which outlives its worker by design) is drained when
    the scenario ends, so nothing of it runs under the scenarios after it; the burst counts the sandboxes of its own
    sessions."""
    bench = Bench(runs=1, max_seconds=120, burst=3)
    try:
        warm = SCENARIOS["warm-mock"](bench)
        assert warm.errors == [] and len(warm.latencies_ms) == 1
        assert bench.running_sandboxes() == 0
        burst = SCENARIOS["burst"](bench)
    finally:
        bench.close()
    assert burst.errors == [] and burst.extra["all_ready"] and burst.extra["cap_held"]
    assert 0 < burst.extra["peak_running_sandboxes"] <= 3
    assert burst.extra["removed_after"] == 3  # the burst's sessions, left running until the burst removes them
