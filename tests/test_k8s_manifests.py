"""deploy/k8s validated offline: every Kubernetes object against the API's own schemas (kubernetes-validate bundles
them; strict: an unknown field fails), KEDA's ScaledObject against the trimmed CRD schema in tests/schemas, and
the wiring between them (queues, probes, names) against the code."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from worker.celery_app import provider_queue
from worker.config import Settings

K8S = Path(__file__).resolve().parent.parent / "deploy" / "k8s"
K8S_VERSION = "1.30.0"
SCALEDOBJECT_SCHEMA = json.loads((Path(__file__).parent / "schemas" / "keda-scaledobject.schema.json").read_text())

Manifest = dict[str, Any]


def _manifests() -> list[Manifest]:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    return [doc for name in kustomization["resources"] for doc in yaml.safe_load_all((K8S / name).read_text()) if doc]


def _validate(doc: Manifest) -> None:
    if doc["kind"] == "ScaledObject":
        jsonschema.Draft202012Validator(SCALEDOBJECT_SCHEMA).validate(doc)
    else:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def _find(docs: list[Manifest], kind: str, name: str) -> Manifest:
    [doc] = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    return doc


def _container(deployment: Manifest) -> Manifest:
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    return container


def test_kustomization_lists_every_manifest() -> None:
    listed = set(yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"])
    assert listed == {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}


@pytest.mark.parametrize("doc", _manifests(), ids=lambda d: f"{d['kind']}/{d['metadata']['name']}")
def test_manifest_is_valid(doc: Manifest) -> None:
    _validate(doc)


def _set(kind: str, name: str, change: Callable[[Manifest], None]) -> Callable[[list[Manifest]], Manifest]:
    def broken(docs: list[Manifest]) -> Manifest:
        doc = copy.deepcopy(_find(docs, kind, name))
        change(doc)
        return doc

    return broken


BROKEN = {
    "replicas not a number": _set("Deployment", "sandbox-worker", lambda d: d["spec"].update(replicas="two")),
    "probe command a string": _set(
        "Deployment",
        "sandbox-worker",
        lambda d: _container(d)["livenessProbe"]["exec"].update(command="sandbox-worker check --liveness"),
    ),
    "misspelt field": _set("Deployment", "sandbox-worker-beat", lambda d: _container(d).update(envfrom=[])),
    "service port a name": _set("Service", "flower", lambda d: d["spec"]["ports"][0].update(port="http")),
    "keda list length not a string": _set(
        "ScaledObject", "sandbox-worker", lambda d: d["spec"]["triggers"][0]["metadata"].update(listLength=4)
    ),
    "keda misspelt field": _set("ScaledObject", "sandbox-worker", lambda d: d["spec"].update(minReplicas=1)),
    "keda trigger without type": _set("ScaledObject", "sandbox-worker", lambda d: d["spec"]["triggers"][0].pop("type")),
}


@pytest.mark.parametrize("breakage", BROKEN.values(), ids=BROKEN.keys())
def test_broken_manifest_fails(breakage: Callable[[list[Manifest]], Manifest]) -> None:
    with pytest.raises((kubernetes_validate.ValidationError, jsonschema.ValidationError)):
        _validate(breakage(_manifests()))


def test_wiring_matches_the_code() -> None:
    docs = _manifests()
    config = _find(docs, "ConfigMap", "sandbox-worker")["data"]
    worker = _find(docs, "Deployment", "sandbox-worker")
    container = _container(worker)

    # The workers serve the configured providers, and KEDA watches exactly those providers' queues.
    providers = json.loads(config["SANDBOX_WORKER_PROVIDERS"])
    args = container["args"]
    assert args[args.index("--providers") + 1].split(",") == providers
    assert "docker" not in providers  # no Docker engine in a cluster
    scaled = _find(docs, "ScaledObject", "sandbox-worker")
    assert scaled["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "sandbox-worker"}
    assert [t["metadata"]["listName"] for t in scaled["spec"]["triggers"]] == [provider_queue(p) for p in providers]
    assert all(t["type"] == "redis" for t in scaled["spec"]["triggers"])

    # Probes: the heartbeat for liveness, the full check for readiness.
    assert container["livenessProbe"]["exec"]["command"] == ["sandbox-worker", "check", "--liveness"]
    assert container["readinessProbe"]["exec"]["command"] == ["sandbox-worker", "check"]
    # A warm shutdown lets the longest bring-up finish.
    grace = worker["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > Settings.model_fields["task_time_limit"].default

    beat = _find(docs, "Deployment", "sandbox-worker-beat")
    assert beat["spec"]["replicas"] == 1 and beat["spec"]["strategy"] == {"type": "Recreate"}

    # Every pod runs as the ServiceAccount, with the shared settings and the Secret holding the Fernet key.
    secret = _find(docs, "Secret", "sandbox-worker")
    assert "SANDBOX_WORKER_FERNET_KEY" in secret["stringData"]
    _find(docs, "ServiceAccount", "sandbox-worker")
    for deployment in (d for d in docs if d["kind"] == "Deployment"):
        assert deployment["spec"]["template"]["spec"]["serviceAccountName"] == "sandbox-worker"
        assert _container(deployment)["envFrom"] == [
            {"configMapRef": {"name": "sandbox-worker"}},
            {"secretRef": {"name": "sandbox-worker"}},
        ]
    # Every setting named in the ConfigMap and the Secret is one the worker knows (a typo is silently ignored).
    known = Settings.model_fields.keys()
    for name in (*config, *secret["stringData"]):
        assert name.removeprefix("SANDBOX_WORKER_").split("__")[0].lower() in known, name
