"""ModelConfig: every field of a DeepSeek-V2 / V3 / R1 ``config.json`` that changes the math.

One frozen value per checkpoint, validated once in ``__post_init__``; derived sizes are properties.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moeserve.errors import UserError

SUPPORTED_MODEL_TYPES = ("deepseek_v2", "deepseek_v3")
SCORING_FUNCS = ("softmax", "sigmoid")
TOPK_METHODS = ("greedy", "group_limited_greedy", "noaux_tc")
ROPE_TYPES = ("default", "yarn")


class ConfigError(UserError, ValueError):
    """A config.json that moeserve cannot serve; the message names the field."""


@dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding settings, from ``rope_scaling`` (older) or ``rope_parameters`` (newer)."""

    theta: float = 10000.0
    rope_type: str = "default"
    factor: float = 1.0
    original_max_position_embeddings: int | None = None
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None
    interleave: bool = True

    def __post_init__(self) -> None:
        if self.rope_type not in ROPE_TYPES:
            raise ConfigError(f"rope type {self.rope_type!r} is not supported (supported: {ROPE_TYPES})")
        if self.theta <= 0:
            raise ConfigError(f"rope_theta must be positive, got {self.theta}")
        if self.rope_type == "yarn" and self.factor <= 0:
            raise ConfigError(f"rope scaling factor must be positive, got {self.factor}")


@dataclass(frozen=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    q_lora_rank: int | None
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    n_routed_experts: int
    n_shared_experts: int
    num_experts_per_tok: int
    moe_intermediate_size: int
    first_k_dense_replace: int
    moe_layer_freq: int
    routed_scaling_factor: float
    scoring_func: str
    topk_method: str
    n_group: int
    topk_group: int
    norm_topk_prob: bool
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    rope: RopeConfig
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    torch_dtype: str = "bfloat16"
    quant_block_size: tuple[int, int] | None = None  # FP8 weight_scale_inv block, e.g. (128, 128)
    # multi-token-prediction modules after the main layers (DeepSeek-V3/R1: 1, the tensors of layer
    # ``num_hidden_layers``; see model/mtp.py)
    num_nextn_predict_layers: int = 0

    def __post_init__(self) -> None:
        positive = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "kv_lora_rank",
                    "qk_rope_head_dim", "v_head_dim", "max_position_embeddings")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.qk_rope_head_dim % 2:
            raise ConfigError(f"qk_rope_head_dim must be even, got {self.qk_rope_head_dim}")
        if self.q_lora_rank is not None and self.q_lora_rank <= 0:
            raise ConfigError(f"q_lora_rank must be null or positive, got {self.q_lora_rank}")
        if self.scoring_func not in SCORING_FUNCS:
            raise ConfigError(f"scoring_func {self.scoring_func!r} is not supported (supported: {SCORING_FUNCS})")
        if self.topk_method not in TOPK_METHODS:
            raise ConfigError(f"topk_method {self.topk_method!r} is not supported (supported: {TOPK_METHODS})")
        if self.num_nextn_predict_layers < 0:
            raise ConfigError(f"num_nextn_predict_layers must be >= 0, got {self.num_nextn_predict_layers}")
        if self.n_routed_experts:
            self._check_moe()

    def _check_moe(self) -> None:
        if not 0 < self.num_experts_per_tok <= self.n_routed_experts:
            raise ConfigError(f"num_experts_per_tok must be in 1..n_routed_experts ({self.n_routed_experts}), "
                              f"got {self.num_experts_per_tok}")
        if self.moe_intermediate_size <= 0:
            raise ConfigError(f"moe_intermediate_size must be positive, got {self.moe_intermediate_size}")
        if self.moe_layer_freq <= 0:
            raise ConfigError(f"moe_layer_freq must be positive, got {self.moe_layer_freq}")
        if self.n_routed_experts % self.n_group:
            raise ConfigError(f"n_routed_experts ({self.n_routed_experts}) must be divisible by n_group "
                              f"({self.n_group})")
        if not 0 < self.topk_group <= self.n_group:
            raise ConfigError(f"topk_group must be in 1..n_group ({self.n_group}), got {self.topk_group}")
        if self.topk_method == "noaux_tc" and self.n_routed_experts // self.n_group < 2:
            raise ConfigError("noaux_tc needs at least 2 experts per group (n_routed_experts / n_group)")

    # ---- derived sizes ----
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def kv_cache_dim(self) -> int:
        """Values cached per token per layer: the compressed latent plus the decoupled rope key."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    @property
    def mtp_layer_id(self) -> int:
        """The layer index of the (first) MTP module's tensors in the checkpoint."""
        return self.num_hidden_layers

    def is_moe_layer(self, layer_id: int) -> bool:
        return (self.n_routed_experts > 0 and layer_id >= self.first_k_dense_replace
                and layer_id % self.moe_layer_freq == 0)

    @property
    def softmax_scale(self) -> float:
        """Attention scale, including YaRN's mscale correction (applied squared, as DeepSeek does)."""
        scale = self.qk_head_dim ** -0.5
        if self.rope.rope_type == "yarn" and self.rope.mscale_all_dim:
            m = yarn_get_mscale(self.rope.factor, self.rope.mscale_all_dim)
            scale *= m * m
        return scale

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_hf(cls, path: str | Path) -> ModelConfig:
        """Read ``config.json`` from a checkpoint directory (or the file itself)."""
        path = Path(path)
        file = path / "config.json" if path.is_dir() else path
        if not file.is_file():
            raise ConfigError(f"{path} is not a checkpoint: no config.json found")
        try:
            raw = json.loads(file.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{file}: invalid JSON ({e})") from e
        return cls.from_dict(raw)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ModelConfig:
        return _parse(raw)


def yarn_get_mscale(scale: float, mscale: float = 1.0) -> float:
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


# ---------------------------------------------------------------------------------------------
# parsing
# ---------------------------------------------------------------------------------------------

def _get(raw: dict[str, Any], name: str, kind: type, default: Any = ..., nullable: bool = False) -> Any:
    if name not in raw or (raw[name] is None and not nullable):
        if default is ...:
            raise ConfigError(f"config.json: required field {name!r} is missing")
        return default
    value = raw[name]
    if value is None:
        return None
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if kind is int and isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConfigError(f"config.json: field {name!r} must be {kind.__name__}, got {value!r}")
    return value


def _parse_rope(raw: dict[str, Any]) -> RopeConfig:
    params = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    if not isinstance(params, dict):
        raise ConfigError(f"config.json: rope_parameters/rope_scaling must be an object, got {params!r}")
    rope_type = params.get("rope_type", params.get("type", "default")) or "default"
    theta = params.get("rope_theta", raw.get("rope_theta", 10000.0))
    factor = params.get("factor")
    orig = params.get("original_max_position_embeddings")
    if rope_type == "yarn":
        if orig is None:
            orig = raw.get("original_max_position_embeddings", raw.get("max_position_embeddings"))
        if factor is None:
            factor = raw["max_position_embeddings"] / orig
    return RopeConfig(
        theta=float(theta), rope_type=str(rope_type), factor=float(factor or 1.0),
        original_max_position_embeddings=orig,
        beta_fast=float(params.get("beta_fast") or 32.0), beta_slow=float(params.get("beta_slow") or 1.0),
        mscale=params.get("mscale"), mscale_all_dim=params.get("mscale_all_dim"),
        attention_factor=params.get("attention_factor"),
        interleave=bool(raw.get("rope_interleave", True)),
    )


def _eos_ids(raw: dict[str, Any]) -> tuple[int, ...]:
    eos = raw.get("eos_token_id")
    if eos is None:
        return ()
    if isinstance(eos, int):
        return (eos,)
    if isinstance(eos, list) and all(isinstance(e, int) for e in eos):
        return tuple(eos)
    raise ConfigError(f"config.json: field 'eos_token_id' must be int or list of int, got {eos!r}")


def _quant_block(raw: dict[str, Any]) -> tuple[int, int] | None:
    quant = raw.get("quantization_config")
    if not quant:
        return None
    method = quant.get("quant_method")
    if method != "fp8" or quant.get("fmt", "e4m3") != "e4m3":
        raise ConfigError(f"config.json: quantization_config {method!r}/{quant.get('fmt')!r} is not supported "
                          "(supported: fp8 e4m3 with block scales)")
    block = quant.get("weight_block_size", [128, 128])
    return int(block[0]), int(block[1])


def _parse(raw: dict[str, Any]) -> ModelConfig:
    model_type = raw.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(f"config.json: model_type {model_type!r} is not supported "
                          f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
    is_v3 = model_type == "deepseek_v3"
    act = raw.get("hidden_act", "silu")
    if act != "silu":
        raise ConfigError(f"config.json: hidden_act {act!r} is not supported (supported: 'silu')")
    if raw.get("attention_bias") or raw.get("mlp_bias"):
        raise ConfigError("config.json: attention_bias / mlp_bias = true is not supported")
    n_routed = _get(raw, "n_routed_experts", int, 0)
    n_group = _get(raw, "n_group", int, 1)
    return ModelConfig(
        model_type=model_type,
        vocab_size=_get(raw, "vocab_size", int),
        hidden_size=_get(raw, "hidden_size", int),
        intermediate_size=_get(raw, "intermediate_size", int),
        num_hidden_layers=_get(raw, "num_hidden_layers", int),
        num_attention_heads=_get(raw, "num_attention_heads", int),
        q_lora_rank=_get(raw, "q_lora_rank", int, None, nullable=True),
        kv_lora_rank=_get(raw, "kv_lora_rank", int),
        qk_nope_head_dim=_get(raw, "qk_nope_head_dim", int),
        qk_rope_head_dim=_get(raw, "qk_rope_head_dim", int),
        v_head_dim=_get(raw, "v_head_dim", int),
        n_routed_experts=n_routed,
        n_shared_experts=_get(raw, "n_shared_experts", int, 0),
        num_experts_per_tok=_get(raw, "num_experts_per_tok", int, 0 if not n_routed else ...),
        moe_intermediate_size=_get(raw, "moe_intermediate_size", int, 0),
        first_k_dense_replace=_get(raw, "first_k_dense_replace", int, 0),
        moe_layer_freq=_get(raw, "moe_layer_freq", int, 1),
        routed_scaling_factor=_get(raw, "routed_scaling_factor", float, 1.0),
        scoring_func=_get(raw, "scoring_func", str, "sigmoid" if is_v3 else "softmax"),
        topk_method=_get(raw, "topk_method", str, "noaux_tc" if is_v3 else "greedy"),
        n_group=n_group,
        topk_group=_get(raw, "topk_group", int, n_group),
        norm_topk_prob=bool(_get(raw, "norm_topk_prob", bool, is_v3)),
        rms_norm_eps=_get(raw, "rms_norm_eps", float, 1e-6),
        max_position_embeddings=_get(raw, "max_position_embeddings", int, 4096),
        tie_word_embeddings=bool(_get(raw, "tie_word_embeddings", bool, False)),
        rope=_parse_rope(raw),
        bos_token_id=_get(raw, "bos_token_id", int, None, nullable=True),
        eos_token_ids=_eos_ids(raw),
        torch_dtype=str(raw.get("torch_dtype") or raw.get("dtype") or "bfloat16"),
        quant_block_size=_quant_block(raw),
        num_nextn_predict_layers=_get(raw, "num_nextn_predict_layers", int, 0),
    )
