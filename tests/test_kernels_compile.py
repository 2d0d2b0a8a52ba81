"""Every fused kernel compiles for a Hopper GPU (sm_90), in the variants the engine launches, on any machine.

The kernel cases (``tests/kernel_cases*.py``) run the kernels' arithmetic on CPU under Triton's interpreter, which
never runs the compiler: a kernel whose two branches yield different types, or a constexpr variant that does not
lower (an FP8 path built inside a branch it never takes, say), passes there and fails only on a GPU, where the
start-up check would then turn its kind off. ``triton.compile`` of each kernel's source for an sm_90 target
needs no GPU and catches those here. Pointer arguments, and the integer arguments the engine passes as multiples
of 16, carry Triton's divisibility hint, as Triton specialises them at launch, so that the lowering is the one
a GPU gets (vectorised, asynchronous loads).
"""

from __future__ import annotations

import os

import pytest

triton = pytest.importorskip("triton", reason="Triton is not installed (pip install triton)")
tl = pytest.importorskip("triton.language")
pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1",
                                reason="under Triton's interpreter the kernels are not compiled")

BF16_MOE = {"a_ptr": "*bf16", "w_ptr": "*bf16", "scale_ptr": "*bf16", "out_ptr": "*bf16", "pair_ptr": "*i64",
            "block_expert_ptr": "*i64", "num_padded_ptr": "*i64", "route_w_ptr": "*fp32"}
FP8_MOE = {**BF16_MOE, "w_ptr": "*fp8e4nv", "scale_ptr": "*fp32"}
MOE_DIV16 = {"N", "K", "stride_am", "stride_we", "stride_wn", "stride_om"}
GEMV = {"x_ptr": "*bf16", "w_ptr": "*bf16", "s_ptr": "*bf16", "part_ptr": "*fp32", "local_ptr": "*i64",
        "sh_ptr": "*bf16", "part_up_ptr": "*fp32", "route_w_ptr": "*fp32", "out_ptr": "*bf16"}
GEMV_DIV16 = {"N", "K", "inter", "stride_x", "stride_we", "stride_wn", "sh_piece", "sh_stride_n", "stride_o"}
ROUTE = {"logits_ptr": "*fp32", "bias_ptr": "*fp32", "weights_ptr": "*fp32", "ids_ptr": "*i64", "scaling": "fp32",
         "count_ptr": "*i64", "count_weight_ptr": "*fp32", "num_decode_ptr": "*i64", "slot_map_ptr": "*i64",
         "slots_ptr": "*i64"}
KV_ROWS = {"kv_ptr": "*bf16", "norm_w_ptr": "*bf16", "pos_ptr": "*i64", "cos_ptr": "*fp32", "sin_ptr": "*fp32",
           "slot_ptr": "*i64", "cache_ptr": "*bf16", "eps": "fp32", "q_ptr": "*bf16", "q_out_ptr": "*bf16"}
MLA_DECODE = {"q_ptr": "*bf16", "cache_ptr": "*bf16", "tables_ptr": "*i32", "lens_ptr": "*i32", "out_ptr": "*fp32",
              "lse_ptr": "*fp32", "scale": "fp32"}
V2_ROUTER = dict(E=64, BLOCK_E=64, TOP_K=6, BLOCK_K=8, N_GROUP=1, TOPK_GROUP=1, SIGMOID=False, METHOD=0,
                 HAS_BIAS=False, NORM=False)
V3_ROUTER = dict(E=256, BLOCK_E=256, TOP_K=8, BLOCK_K=8, N_GROUP=8, TOPK_GROUP=4, SIGMOID=True, METHOD=2,
                 HAS_BIAS=True, NORM=True)
MLA_WIDTHS = dict(PAGE=64, LATENT=512, ROPE=64, LATENT_P=512, ROPE_P=64, BLOCK_T=32, PRECISION="tf32")

# (id, module, kernel, argument types (ints default to i32), constexprs, integer arguments divisible by 16);
# the types and hints may name other kernels' arguments too (one table a module)
# (the sorted expert GEMM, ``_moe_gemm``, compiles at each of the engine's tile picks below)
CASES = [
    ("align", "moe_align", "_align",
     {n: "*i64" for n in ("local_ptr", "cursor_ptr", "pair_ids_ptr", "block_expert_ptr", "num_padded_ptr")},
     dict(BLOCK_P=512, BLOCK_E=128, BLOCK_R=1024, BLOCK_B=32, BM=32), set()),
    ("sum_pairs", "fused_moe", "_sum_pairs", {"rows_ptr": "*bf16", "local_ptr": "*i64", "out_ptr": "*bf16"},
     dict(TOP_K=6, BLOCK_N=512), {"N"}),
    *[(f"gemv-gate_up-pieces{pieces}-pdl{pdl}", "moe_gemv_programs", "_gate_up", GEMV,
       dict(TOP_K=6, PIECES=pieces, FP8=False, SCALE_BLOCK=128, BLOCK_N=16, BLOCK_K=128, PDL=pdl), GEMV_DIV16)
      for pieces, pdl in ((0, False), (2, False), (2, True))],  # PDL: the grid dependency control instructions
    *[(f"gemv-gate_up-fp8-n{block_n}", "moe_gemv_programs", "_gate_up", {**GEMV, "w_ptr": "*fp8e4nv", "s_ptr": "*fp32"},
       dict(TOP_K=8, PIECES=0, FP8=True, SCALE_BLOCK=128, BLOCK_N=block_n, BLOCK_K=256), GEMV_DIV16)
      for block_n in (16, 32)],
    *[(f"gemv-down-fp8-n{block_n}", "moe_gemv_programs", "_down", {**GEMV, "w_ptr": "*fp8e4nv", "s_ptr": "*fp32"},
       dict(TOP_K=8, PIECES=0, SPLIT_UP=1, FP8=True, SCALE_BLOCK=128, BLOCK_N=block_n, BLOCK_K=block_k,
            DTYPE=tl.bfloat16), GEMV_DIV16) for block_n, block_k in ((32, 256), (64, 128))],
    *[(f"gemv-down-pieces{pieces}", "moe_gemv_programs", "_down", GEMV,
       dict(TOP_K=6, PIECES=pieces, SPLIT_UP=2, FP8=False, SCALE_BLOCK=128, BLOCK_N=16, BLOCK_K=128,
            DTYPE=tl.bfloat16), GEMV_DIV16) for pieces in (0, 2)],
    *[(f"gemv-combine-pieces{pieces}", "moe_gemv_programs", "_combine", GEMV,
       dict(TOP_K=6, PIECES=pieces, SPLIT=2, BLOCK_N=256), GEMV_DIV16) for pieces in (0, 2)],
    *[(f"route-{name}-slots", "router", "_route", ROUTE,
       dict(spec, COUNT=True, HAS_COUNT_WEIGHT=True, HAS_SLOTS=True), set())
      for name, spec in (("v2", V2_ROUTER), ("v3", V3_ROUTER))],
    *[(f"kv_rows-query{has_q}-absorb{absorb}", "mla_kv_write", "_kv_rows",
       {**KV_ROWS, "qn_ptr": "*bf16", "w_uk_ptr": "*bf16", "lat_ptr": "*bf16"},
       dict(LORA=512, LORA_BLOCK=512, HALF=32, INTERLEAVE=True, HAS_Q=has_q, BLOCK_H=16, ABSORB=absorb,
            NOPE_P=128 if absorb else 16, BLOCK_C=32), set())
      for has_q, absorb in ((True, False), (False, False), (True, True))],
    *[(f"mla_decode-final{final}-heads{heads}", "mla_decode", "_mla_decode_split",
       {**MLA_DECODE, "out_ptr": "*bf16" if final else "*fp32"},
       dict(MLA_WIDTHS, NUM_SPLITS=1 if final else 16, BLOCK_H=heads, FINAL=final), set())
      for final in (True, False) for heads in (16, 64)],
    ("mla_decode_merge-32", "mla_decode", "_mla_decode_merge",
     {"part_ptr": "*fp32", "lse_ptr": "*fp32", "out_ptr": "*bf16"},
     dict(NUM_SPLITS=32, SPLIT_BLOCK=16, LATENT=512, LATENT_P=512), set()),
    *[(f"router_logits-{block_h}-norm{norm}", "router", "_logits",
       {"x_ptr": "*bf16", "w_ptr": "*fp32", "out_ptr": "*fp32", "res_ptr": "*bf16", "norm_w_ptr": "*bf16",
        "normed_ptr": "*bf16", "res_out_ptr": "*bf16", "eps": "fp32"},
       dict(BLOCK_E=1, BLOCK_H=block_h, NORM=norm), {"H", "stride_x", "stride_w"})
      for block_h, norm in ((2048, False), (4096, False), (2048, True), (8192, True))],
    ("silu_and_mul", "activation", "_silu_and_mul", {"h_ptr": "*bf16", "out_ptr": "*bf16"}, dict(BLOCK=1024),
     {"inter", "stride_h", "stride_o"}),
    *[(f"rms_norm-residual{res}-pdl{pdl}", "rmsnorm", "_rms_norm",
       {"x_ptr": "*bf16", "res_ptr": "*bf16", "w_ptr": "*bf16", "out_ptr": "*bf16", "res_out_ptr": "*bf16",
        "eps": "fp32"}, dict(HAS_RES=res, BLOCK=2048, PDL=pdl), set()) for res, pdl in ((True, False), (False, False),
                                                                                      (True, True))],
    ("rope", "rope", "_rope", {"x_ptr": "*bf16", "pos_ptr": "*i64", "cos_ptr": "*fp32", "sin_ptr": "*fp32",
                               "out_ptr": "*bf16"}, dict(HALF=32, INTERLEAVE=True, BLOCK_H=16), set()),
    ("mla_prefill", "mla_prefill", "_mla_prefill",
     {**{n: "*bf16" for n in ("qn_ptr", "qp_ptr", "kn_ptr", "kp_ptr", "v_ptr", "out_ptr")},
      "q_start_ptr": "*i32", "ctx_start_ptr": "*i32", "qk_scale": "fp32"},
     dict(NOPE=128, ROPE=64, VDIM=128, NOPE_P=128, ROPE_P=64, V_P=128, BLOCK_M=64, BLOCK_N=64, PRECISION="tf32"),
     set()),
    ("expert_count", "expert_count", "_count",
     {"ids_ptr": "*i64", "slot_ptr": "*i64", "weight_ptr": "*fp32", "num_decode_ptr": "*i64",
      "logical_ptr": "*i64", "physical_ptr": "*i64"}, dict(TOP_K=6, HAS_WEIGHT=True, HAS_SLOT=True, BLOCK=1024),
     set()),
]


SM90_SHARED_MEMORY = 232448  # bytes a block may take on sm_90 (227 KB); a launch past it fails on the GPU


def _compile(module: str, name: str, types: dict, constexprs: dict, div16: set, **options):
    import importlib

    from triton.backends import backends
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if "nvidia" not in backends:
        pytest.skip("this Triton has no NVIDIA backend")
    kernel = getattr(importlib.import_module(f"moeserve.kernels.{module}"), name)
    # the types and hints are shared by a module's kernels; each constexpr must be this kernel's
    unknown = set(constexprs) - set(kernel.arg_names)
    assert not unknown, f"{name} has no arguments {sorted(unknown)}: the case is out of date"
    signature, attrs = {}, {}
    for i, arg in enumerate(kernel.arg_names):
        signature[arg] = "constexpr" if arg in constexprs else types.get(arg, "i32")
        if signature[arg].startswith("*") or arg in div16:
            attrs[(i,)] = [["tt.divisibility", 16]]
    compiled = triton.compile(ASTSource(kernel, signature, dict(constexprs), attrs), target=GPUTarget("cuda", 90, 32),
                              options=options)
    assert compiled.asm.get("ptx"), f"{name}: no PTX"
    return compiled


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_kernel_compiles_for_sm90(case) -> None:
    _, module, name, types, constexprs, div16 = case
    _compile(module, name, types, constexprs, div16)


@pytest.mark.parametrize("gated", [True, False], ids=["gate_up", "down"])
@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
@pytest.mark.parametrize("num_pairs", [64, 512, 2048])
def test_moe_gemm_tiles_fit_sm90_shared_memory(num_pairs, fp8, gated) -> None:
    """The sorted expert GEMM at the tiles and stages ``gemm_config`` picks for a step's pairs fits a Hopper
    block's shared memory (227 KB: a launch that asks for more is refused on the GPU)."""
    from moeserve.kernels.fused_moe import gemm_config

    cfg = gemm_config(num_pairs, fp8)
    compiled = _compile("fused_moe", "_moe_gemm", FP8_MOE if fp8 else BF16_MOE,
                        dict(A_DIV=8 if gated else 1, GATED=gated, MUL_ROUTE=not gated, FP8=fp8, SCALE_BLOCK=128,
                             BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
                             PRECISION="tf32"), MOE_DIV16, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    assert compiled.metadata.shared <= SM90_SHARED_MEMORY, (cfg, compiled.metadata.shared)


def test_launches_take_pdl_only_on_a_cuda_device_that_has_it(monkeypatch) -> None:
    """Programmatic dependent launch (kernels/pdl.py) is asked for only on CUDA devices of compute capability 9.0
    and later, and never under Triton's interpreter or with MOESERVE_PDL=0: elsewhere the kernels' PDL constexpr
    is off and no launch option is passed."""
    import torch

    from moeserve.kernels import pdl

    assert pdl.pdl_args(torch.device("cpu")) == {"PDL": False}
    monkeypatch.setattr(pdl, "_device_supports", lambda index: True)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv(pdl.PDL_ENV, raising=False)
    on = pdl.pdl_args(torch.device("cuda", 0))
    assert on == ({"PDL": True, "launch_pdl": True} if pdl.gdc_wait is not None else {"PDL": False})
    monkeypatch.setenv(pdl.PDL_ENV, "0")
    assert pdl.pdl_args(torch.device("cuda", 0)) == {"PDL": False}
    monkeypatch.delenv(pdl.PDL_ENV)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert pdl.pdl_args(torch.device("cuda", 0)) == {"PDL": False}
