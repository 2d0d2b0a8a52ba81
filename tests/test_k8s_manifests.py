"""deploy/k8s/ against the Kubernetes API: core and apps kinds through the ``kubernetes`` client's models
(strict: unknown keys and wrong types are errors), the LeaderWorkerSet and ServiceMonitor through the schemas
committed from their upstream CRDs (deploy/k8s/schemas/SOURCES.md); every container's command parses with
moeserve's own argument parser into a layout that fits the pod's GPUs; the Dockerfile's RUN steps are the
README's install command."""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
from pathlib import Path
from typing import Any

import pydantic
import pytest
import yaml

kubernetes = pytest.importorskip("kubernetes", reason="the kubernetes client is not installed (a test extra)")
jsonschema = pytest.importorskip("jsonschema", reason="jsonschema is not installed (a test extra)")

from moeserve.launch.cli import build_parser  # noqa: E402
from moeserve.launch.engine_args import engine_config  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "k8s"
CORE = {("v1", "Service"): "V1Service", ("apps/v1", "Deployment"): "V1Deployment"}
CRDS = {("leaderworkerset.x-k8s.io/v1", "LeaderWorkerSet"): "leaderworkerset-v1.json",
        ("monitoring.coreos.com/v1", "ServiceMonitor"): "servicemonitor-v1.json"}
MODEL_KEYWORD = "x-moeserve-kubernetes-model"  # scripts/crd_schema.py: a subtree the client's model checks
LWS_ENV = {"LWS_GROUP_SIZE": "2", "LWS_LEADER_ADDRESS": "moeserve-deepseek-v3-0.moeserve-deepseek-v3",
           "LWS_WORKER_INDEX": "1"}

DOCS = [(f"{path.name}:{doc['kind']}", doc) for path in sorted(K8S.glob("*.yaml"))
        for doc in yaml.safe_load_all(path.read_text())]


def _model_keyword(validator, model: str, instance: Any, schema: dict):
    try:
        getattr(kubernetes.client, model).model_validate(instance)
    except Exception as e:  # noqa: BLE001 - pydantic's ValidationError, reported as the schema's
        yield jsonschema.ValidationError(f"not a valid {model}: {e}")


CrdValidator = jsonschema.validators.extend(jsonschema.Draft7Validator, {MODEL_KEYWORD: _model_keyword})


def validate(doc: dict) -> None:
    key = (doc.get("apiVersion"), doc.get("kind"))
    if key in CORE:
        getattr(kubernetes.client, CORE[key]).model_validate(doc)
    elif key in CRDS:
        schema = json.loads((K8S / "schemas" / CRDS[key]).read_text())
        CrdValidator(schema).validate(doc)
    else:
        raise AssertionError(f"no schema for {key}: add one to this test")


@pytest.mark.parametrize("doc", [d for _, d in DOCS], ids=[i for i, _ in DOCS])
def test_manifest_is_valid(doc: dict) -> None:
    validate(doc)


def _find(docs: list, kind: str) -> dict:
    (doc,) = [d for _, d in docs if d["kind"] == kind]
    return copy.deepcopy(doc)


@pytest.mark.parametrize("kind, path, bad", [
    ("Deployment", ["spec", "template", "spec", "containers", 0], {"resourcez": {}}),
    ("Deployment", ["spec", "template", "spec", "containers", 0, "ports", 0], {"containerPort": "8000"}),
    ("LeaderWorkerSet", ["spec"], {"leaderWorkerTemplat": {}}),
    ("LeaderWorkerSet", ["spec", "leaderWorkerTemplate"], {"size": "2"}),
    ("LeaderWorkerSet", ["spec", "leaderWorkerTemplate", "leaderTemplate", "spec", "containers", 0],
     {"readinesProbe": {}}),
    ("ServiceMonitor", ["spec", "endpoints", 0], {"pathh": "/metrics"}),
])
def test_validation_rejects_a_mistake(kind: str, path: list, bad: dict) -> None:
    """A misspelt key or a wrong type, in each kind and inside the LWS pod template, is an error."""
    doc = _find(DOCS, kind)
    node: Any = doc
    for step in path:
        node = node[step]
    node.update(bad)
    with pytest.raises((jsonschema.ValidationError, pydantic.ValidationError)):
        validate(doc)


def pod_templates() -> list[tuple[str, dict, dict]]:
    """(name, pod spec, LWS group env or {}) of every pod the manifests make."""
    deployment, lws = _find(DOCS, "Deployment"), _find(DOCS, "LeaderWorkerSet")
    group = lws["spec"]["leaderWorkerTemplate"]
    env = {**LWS_ENV, "LWS_GROUP_SIZE": str(group["size"])}
    return [("deployment", deployment["spec"]["template"]["spec"], {}),
            ("lws leader", group["leaderTemplate"]["spec"], env),
            ("lws worker", group["workerTemplate"]["spec"], env)]


def moeserve_argv(container: dict, env: dict[str, str]) -> list[str]:
    argv = list(container["command"]) + list(container.get("args", []))
    if argv[:2] == ["/bin/sh", "-c"]:  # LWS: the group's variables, as the shell expands them
        argv = shlex.split(re.sub(r'"?\$(\w+)"?', lambda m: shlex.quote(env[m.group(1)]), argv[2]))
        assert argv[0] == "exec"
        argv = argv[1:]
    assert argv[0] == "moeserve", argv
    return argv[1:]


@pytest.mark.parametrize("name, pod, env", pod_templates(), ids=[t[0] for t in pod_templates()])
def test_command_is_a_moeserve_command_that_fits_the_pod(name: str, pod: dict, env: dict) -> None:
    (container,) = pod["containers"]
    args = build_parser().parse_args(moeserve_argv(container, env))
    config = engine_config(args, progress=False)
    gpus = int(container["resources"]["limits"]["nvidia.com/gpu"])
    assert container["resources"]["requests"]["nvidia.com/gpu"] == str(gpus)
    if args.command == "launch":  # one node of the group: its ranks take its GPUs
        assert args.nnodes == int(env["LWS_GROUP_SIZE"]) and args.procs_per_node == gpus
        assert args.procs_per_node * args.nnodes == config.pp * config.tp
        assert args.master_addr == env["LWS_LEADER_ADDRESS"]
        assert args.node_rank == (0 if "leader" in name else int(env["LWS_WORKER_INDEX"]))
    else:
        assert config.pp * config.tp == gpus
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"
    assert config.model.startswith("/models/") and volumes[mounts["/models"]]["persistentVolumeClaim"]
    if "worker" in name:
        return  # the workers serve no HTTP: nothing to probe
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert (ports["http"], ports["rpc"], args.host) == (args.port, args.rpc_port, "0.0.0.0")
    assert container["readinessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    if args.command == "launch":
        assert ports["control"] == args.master_port and ports["coordinator"] == args.master_port + 1
        assert ports["rendezvous"] == args.master_port + 2


def test_services_select_the_pods_and_the_monitor_the_services() -> None:
    deployment, lws, monitor = _find(DOCS, "Deployment"), _find(DOCS, "LeaderWorkerSet"), _find(DOCS, "ServiceMonitor")
    services = [d for _, d in DOCS if d["kind"] == "Service"]
    pods = [deployment["spec"]["template"]["metadata"]["labels"],
            {**lws["spec"]["leaderWorkerTemplate"]["leaderTemplate"]["metadata"]["labels"],
             "leaderworkerset.sigs.k8s.io/name": lws["metadata"]["name"]}]
    for service in services:
        selected = [p for p in pods if service["spec"]["selector"].items() <= p.items()]
        assert len(selected) == 1, service["metadata"]["name"]
        assert {p["name"] for p in service["spec"]["ports"]} == {"http", "rpc"}
        assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert monitor["spec"]["endpoints"] == [{"port": "http", "path": "/metrics", "interval": "15s"}]


def test_dockerfile_runs_the_readme_install_steps() -> None:
    readme = (ROOT / "README.md").read_text()
    quick_start = readme.split("## Quick start", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    installs = [line.split("#")[0].strip() for line in quick_start.splitlines() if line.startswith("pip install")]
    dockerfile = (K8S / "Dockerfile").read_text()
    runs = [line.removeprefix("RUN ").strip() for line in dockerfile.splitlines() if line.startswith("RUN ")]
    assert installs and runs == installs
    copied = {p for line in dockerfile.splitlines() if line.startswith("COPY ") for p in line.split()[1:-1]}
    assert {"pyproject.toml", "moeserve"} <= copied and all(os.path.exists(ROOT / p) for p in copied)
