"""`make bench`: every scenario of bench/scenarios.py in one run, side by side, printed and in bench/results.json.

    .venv/bin/python -m bench [--runs N] [--scenarios baseline,cold-mock,...] [--burst 100] [--max-seconds S]

Nothing is asserted: these machines are shared and noisy; the figures are read, not tested.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from bench.harness import RESULTS, STAGE_COLUMNS, Bench, Row, document
from bench.scenarios import SCENARIOS
from worker.logs import configure_logging

_SHORT = {"credentials": "creds", "environment": "env"}


def table(rows: list[Row], doc: dict[str, object]) -> Table:
    scenarios: dict[str, dict[str, object]] = doc["scenarios"]  # type: ignore[assignment]
    title = "enqueue -> ready (ms; warm-*: claim -> ready); stage columns are medians (ms)"
    out = Table(title=title, title_justify="left")
    out.add_column("scenario")
    out.add_column("ok", justify="right")
    for name in ("p50", "p95", "p99", "x base"):
        out.add_column(name, justify="right")
    for stage in STAGE_COLUMNS:
        out.add_column(_SHORT.get(stage, stage), justify="right")
    out.add_column("notes")
    for row in rows:
        figures = scenarios[row.name]
        summary, stages = row.summary(), row.stage_p50()
        ratio = figures["ratio_p50_to_baseline_p50"]
        extra = ", ".join(f"{k} {v}" for k, v in row.extra.items())
        out.add_row(
            row.name,
            f"{len(row.latencies_ms)}/{len(row.latencies_ms) + len(row.errors) + row.skipped}",
            *(f"{summary[q]:.0f}" if summary else "-" for q in ("p50", "p95", "p99")),
            f"{ratio:.2f}" if isinstance(ratio, float) else "-",
            *(f"{stages[s]:.0f}" if s in stages else "" for s in STAGE_COLUMNS),
            extra,
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=10, help="timed sessions per scenario (after one warm-up)")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS), help=f"comma-separated, of: {', '.join(SCENARIOS)}")
    parser.add_argument("--burst", type=int, default=100, help="sessions submitted at once by the burst scenario")
    parser.add_argument("--ceiling-sessions", type=int, default=300, help="sessions of the ceiling scenario")
    parser.add_argument(
        "--ceiling-processes", type=int, default=2, help="worker processes of the ceiling scenario (as --concurrency)"
    )
    parser.add_argument("--max-seconds", type=float, default=600.0, help="no new timed run starts after this")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    names = [name.strip() for name in args.scenarios.split(",") if name.strip()]
    unknown = sorted(set(names) - set(SCENARIOS))
    if unknown:
        parser.error(f"unknown scenario(s): {', '.join(unknown)}")
    configure_logging("console", level=logging.WARNING)
    console = Console(stderr=True)
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    bench = Bench(args.runs, args.max_seconds, args.burst, args.ceiling_sessions, args.ceiling_processes)
    rows: list[Row] = []
    try:
        for name in names:
            console.print(f"[bold]{name}[/bold] ...")
            began = time.monotonic()
            rows.append(SCENARIOS[name](bench))
            console.print(f"  {name}: {len(rows[-1].latencies_ms)} ok in {time.monotonic() - began:.0f}s")
    finally:
        bench.close()
    doc = document(rows, bench, started)
    args.output.write_text(json.dumps(doc, indent=2) + "\n")
    Console(width=max(Console().width, 160)).print(table(rows, doc))
    m = doc["machine"]
    print(f"machine: {m['nproc']} x {m['cpu']}, {m['ram_gib']} GiB, load {m['load_average']}; written: {args.output}")
    for row in rows:
        for error in sorted(set(row.errors)):
            print(f"  {row.name} failed {row.errors.count(error)}x: {error}")


if __name__ == "__main__":
    main()
