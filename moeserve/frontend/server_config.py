"""What one ``moeserve serve`` process serves and how (``Server``'s settings, checked when built)."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

from moeserve.coordinator.config import EngineConfig
from moeserve.frontend.limits import ServerLimits
from moeserve.frontend.load_metrics import LoadMetricsConfig
from moeserve.frontend.reasoning import PARSERS as REASONING_PARSERS
from moeserve.frontend.router import POLICIES
from moeserve.frontend.tool_calls import PARSERS as TOOL_PARSERS


@dataclass(frozen=True)
class ServerConfig:
    engine: EngineConfig = field(default_factory=EngineConfig)
    host: str = "127.0.0.1"
    port: int = 8000  # 0 = any free port
    rpc_port: int = 5555  # 0 = any free port
    replicas: int = 1
    api_key: str | None = None  # comma-separated keys; None = the MOESERVE_API_KEY environment variable
    audit_log: str | None = None
    served_model_name: str = ""  # "" = the checkpoint directory's name
    routing: str = "affinity"
    limits: ServerLimits = field(default_factory=ServerLimits)
    drain_timeout_s: float = 30.0
    failure_grace_s: float = 2.0  # once the engine failed: /health says 503 "failed" this long, then the exit
    replica_threads: int = 0  # torch threads per replica process; 0 = the cores split evenly
    reasoning_parser: str | None = None  # "deepseek_r1": <think>...</think> -> reasoning_content
    tool_call_parser: str | None = None  # "deepseek_v3": the model's tool calls -> tool_calls
    expert_metrics: LoadMetricsConfig = field(default_factory=LoadMetricsConfig)
    # once ready, gc.freeze(): a full collection skips the start-up heap (~190k objects, a 40 ms stall of a step
    # on the 2-core CPU machine). For a process that serves one engine for life: frozen cycles are never freed
    freeze_gc: bool = False

    def __post_init__(self) -> None:
        if self.replicas < 1:
            raise ValueError(f"replicas must be >= 1, got {self.replicas}")
        if self.reasoning_parser not in (None, *REASONING_PARSERS):
            raise ValueError(f"reasoning_parser must be one of {REASONING_PARSERS}, got {self.reasoning_parser!r}")
        if self.tool_call_parser not in (None, *TOOL_PARSERS):
            raise ValueError(f"tool_call_parser must be one of {TOOL_PARSERS}, got {self.tool_call_parser!r}")
        if self.routing not in POLICIES:
            raise ValueError(f"routing must be one of {POLICIES}, got {self.routing!r}")
        if self.engine.disaggregation_mode and self.replicas != 1:
            raise ValueError("--disaggregation-mode serves one replica per instance (start more instances)")
        for name in ("port", "rpc_port"):
            if not 0 <= getattr(self, name) < 65536:
                raise ValueError(f"{name} must be in [0, 65536), got {getattr(self, name)}")

    @property
    def is_loopback(self) -> bool:
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False

    @property
    def model_name(self) -> str:
        if self.served_model_name:
            return self.served_model_name
        return "moeserve-default" if not self.engine.model else self.engine.model_path.name
