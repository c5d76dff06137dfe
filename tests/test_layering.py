"""The dependency direction of docs/architecture.md, checked on the code: tasks and CLI -> runtime -> pipeline ->
(credentials, environment, daemon, acp, providers.base); models and errors at the bottom. A web app imports
worker.client without the pipeline, the daemon and ACP clients, the credential broker or any provider SDK (driver
and strategy modules may load for their settings models: they import their SDKs only where they call them)."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# What a web app must not load by importing the client: the bring-up machinery, strategies, drivers and SDKs.
NOT_FOR_CLIENTS = {
    "worker.pipeline",
    "worker.runtime",
    "worker.daemon",
    "worker.acp",
    "worker.teardown",
    "worker.credentials.broker",
    "tasks",
    "docker",
    "e2b",
    "daytona",
}


def _loaded_by(module: str) -> set[str]:
    code = f"import json, sys, {module}; print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return set(json.loads(out))


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from worker import pins` imports worker.pins, not the package as such
            top_level = node.module in ("worker", "providers", "tasks")
            names.update(f"{node.module}.{a.name}" for a in node.names) if top_level else names.add(node.module)
    return names


def test_the_client_loads_no_pipeline_broker_or_sdk() -> None:
    loaded = _loaded_by("worker.client")
    assert not loaded & NOT_FOR_CLIENTS, sorted(loaded & NOT_FOR_CLIENTS)


def test_worker_never_imports_tasks_and_providers_only_the_bottom_layer() -> None:
    for path in (ROOT / "worker").rglob("*.py"):
        upward = {name for name in _imports(path) if name == "tasks" or name.startswith("tasks.")}
        assert not upward, f"{path.relative_to(ROOT)} imports {upward}"
    bottom = {"worker.errors", "worker.pins", "worker.models", "worker.registry"}
    for path in (ROOT / "providers").glob("*.py"):
        from_worker = {name for name in _imports(path) if name.startswith("worker")}
        assert from_worker <= bottom, f"{path.relative_to(ROOT)} imports {from_worker - bottom}"


def test_models_and_errors_import_nothing_of_the_project_above_them() -> None:
    allowed = {"worker.errors", "providers.REGISTRY", "worker.credentials"}  # the registries: import-free data
    for name in ("models", "errors"):
        project = {n for n in _imports(ROOT / "worker" / f"{name}.py") if n.split(".")[0] in ("worker", "providers")}
        assert project <= allowed, f"worker/{name}.py imports {project - allowed}"
