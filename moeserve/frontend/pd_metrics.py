"""The disaggregation router's /metrics (frontend/pd_router.py): its own counts, and the KV transfer families
of every instance behind it, read from their /metrics and labelled with the instance's URL."""

from __future__ import annotations

from collections.abc import Sequence

from prometheus_client.parser import text_string_to_metric_families

TRANSFER_FAMILIES = ("moeserve_kv_transfer_bytes", "moeserve_kv_transfer_seconds", "moeserve_kv_transfers",
                     "moeserve_kv_transfer_failures")


def router_metrics(counts: dict[tuple[str, str, str], int], instances: Sequence[tuple[str, str, bool]],
                   texts: Sequence[str]) -> str:
    """Prometheus text: ``counts`` (role, instance, outcome) -> requests; ``instances`` (role, url, up), and
    the /metrics text each gave (empty when it did not answer)."""
    lines = ["# TYPE moeserve_router_requests counter"]
    lines += [f'moeserve_router_requests_total{{role="{r}",instance="{u}",outcome="{o}"}} {n}'
              for (r, u, o), n in sorted(counts.items())]
    lines.append("# TYPE moeserve_router_instance_up gauge")
    lines += [f'moeserve_router_instance_up{{role="{role}",instance="{url}"}} {int(up)}'
              for role, url, up in instances]
    typed: set[str] = set()
    for (_role, url, _up), text in zip(instances, texts):
        for family in text_string_to_metric_families(text):
            if family.name not in TRANSFER_FAMILIES:
                continue
            if family.name not in typed:
                typed.add(family.name)
                lines.append(f"# TYPE {family.name} {family.type}")
            for s in family.samples:
                shown = ",".join(f'{k}="{v}"' for k, v in {**s.labels, "instance": url}.items())
                lines.append(f"{s.name}{{{shown}}} {s.value}")
    return "\n".join(lines) + "\n"
