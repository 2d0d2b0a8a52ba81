"""Turn an upstream CustomResourceDefinition into the JSON schema that tests/test_k8s_manifests.py validates
deploy/k8s/ against (committed under deploy/k8s/schemas/, with the CRD's origin):

    python3 scripts/crd_schema.py CRD.yaml VERSION [--pod-templates] > deploy/k8s/schemas/KIND.json

It takes the ``openAPIV3Schema`` of VERSION, drops descriptions (most of the bytes), and closes every object
that lists its properties (``additionalProperties: false`` unless the CRD preserves unknown fields): as
kubectl's strict field validation, a misspelt key is an error. ``--pod-templates`` replaces embedded
PodTemplateSpecs by a marker the test resolves with the Kubernetes client's own models (``V1PodTemplateSpec``),
so the core schema is not copied into the repository."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import yaml

POD_TEMPLATE_KEYS = {"metadata", "spec"}
MARKER = {"x-moeserve-kubernetes-model": "V1PodTemplateSpec"}


def is_pod_template(schema: dict) -> bool:
    spec = schema.get("properties", {}).get("spec", {})
    return set(schema.get("properties", {})) == POD_TEMPLATE_KEYS and "containers" in spec.get("properties", {})


def prune(schema: Any, pod_templates: bool) -> Any:
    if isinstance(schema, list):
        return [prune(s, pod_templates) for s in schema]
    if not isinstance(schema, dict):
        return schema
    if pod_templates and is_pod_template(schema):
        return dict(MARKER)
    out = {k: prune(v, pod_templates) for k, v in schema.items() if k != "description"}
    if "properties" in out and "additionalProperties" not in out \
            and not out.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("crd")
    p.add_argument("version")
    p.add_argument("--pod-templates", action="store_true")
    args = p.parse_args()
    with open(args.crd) as f:
        crd = yaml.safe_load(f)
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == args.version]
    schema = prune(version["schema"]["openAPIV3Schema"], args.pod_templates)
    json.dump(schema, sys.stdout, indent=None, separators=(",", ":"), sort_keys=True)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
