"""nano-dsv4: DeepSeek-V4 (Flash and Pro) in one file.

Config -> precision primitives -> mHC -> attention (window, HCA/CSA compressors, lightning indexer) -> MoE ->
block -> model -> KV cache -> sampling -> CLI. Shapes: B batch, S chunk length, D hidden, H heads.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field, fields

import torch
import torch.nn as nn
import torch.nn.functional as F


# ----------------------------------------------------------------------------------------------------------------
# Config: the fields are the keys of the checkpoint's config.json (HF names, as DeepSeek publishes them).
@dataclass
class ModelConfig:
    vocab_size: int = 129280
    hidden_size: int = 4096
    num_hidden_layers: int = 43
    num_attention_heads: int = 64
    num_key_value_heads: int = 1
    head_dim: int = 512
    qk_rope_head_dim: int = 64
    q_lora_rank: int = 1024
    o_groups: int = 8
    o_lora_rank: int = 1024
    moe_intermediate_size: int = 2048
    n_routed_experts: int = 256
    n_shared_experts: int = 1
    num_experts_per_tok: int = 6
    routed_scaling_factor: float = 1.5
    scoring_func: str = "sqrtsoftplus"
    topk_method: str = "noaux_tc"
    norm_topk_prob: bool = True
    num_hash_layers: int = 3
    swiglu_limit: float = 10.0
    hidden_act: str = "silu"
    sliding_window: int = 128
    index_n_heads: int = 64
    index_head_dim: int = 128
    index_topk: int = 512
    hc_mult: int = 4
    hc_sinkhorn_iters: int = 20
    hc_eps: float = 1e-6
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    compress_rope_theta: float = 160000.0
    rope_scaling: dict | None = field(default_factory=lambda: {
        "type": "yarn", "factor": 16, "original_max_position_embeddings": 65536, "beta_fast": 32, "beta_slow": 1})
    max_position_embeddings: int = 1048576
    num_nextn_predict_layers: int = 1
    compress_ratios: list = field(default_factory=lambda: [0, 0] + [4, 128] * 20 + [4, 0])
    quantization_config: dict | None = None
    expert_dtype: str | None = None
    bos_token_id: int = 0
    eos_token_id: int = 1
    tie_word_embeddings: bool = False
    torch_dtype: str = "bfloat16"

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    @classmethod
    def from_json(cls, path: str) -> "ModelConfig":
        with open(path) as f:
            return cls.from_dict(json.load(f))

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def ratio(self, layer: int) -> int:
        """Compression ratio of a main layer: 0 (window only), 4 (CSA + indexer) or 128 (HCA).
        compress_ratios may carry one extra entry (the MTP block); it is ignored."""
        return int(self.compress_ratios[layer])

    @property
    def rope_dim(self) -> int:
        return self.qk_rope_head_dim


# ----------------------------------------------------------------------------------------------------------------
# Precision primitives. The official reference *simulates* low precision in a few places; with quant_sim=True we do
# the same (FP8 activations before FP8 GEMMs, FP8 KV no-rope dims, FP4 indexer q/k), with quant_sim=False none of it.
FP8_MAX, FP4_MAX = 448.0, 6.0


def pow2_scale(amax: torch.Tensor, qmax: float) -> torch.Tensor:
    """ue8m0 scales: the smallest power of two s with amax / s <= qmax."""
    return torch.exp2(torch.ceil(torch.log2(amax / qmax)))


def act_quant(x: torch.Tensor, block: int = 128) -> torch.Tensor:
    """Q8: FP8 e4m3 quantize-dequantize over contiguous blocks of the last dim, power-of-two scale per block."""
    shape = x.shape
    xb = x.float().unflatten(-1, (shape[-1] // block, block))
    s = pow2_scale(xb.abs().amax(-1, keepdim=True).clamp(min=1e-4), FP8_MAX)
    q = (xb / s).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).float()
    return (q * s).flatten(-2).to(x.dtype)


E2M1_BOUNDS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)   # midpoints between the e2m1 magnitudes
E2M1_GRID = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


def round_e2m1(x: torch.Tensor) -> torch.Tensor:
    """Round fp32 values (|x| <= 6) to the nearest e2m1 value, ties to the even code."""
    bounds = torch.tensor(E2M1_BOUNDS, device=x.device)
    a = x.abs()
    code = torch.bucketize(a, bounds)                                     # bounds[code-1] < a <= bounds[code]
    tie = (a == bounds[code.clamp(max=len(E2M1_BOUNDS) - 1)]) & (code % 2 == 1)
    code = code + tie.long()                                               # at an odd tie, go up to the even code
    return torch.tensor(E2M1_GRID, device=x.device)[code] * x.sign()


def fp4_quant(x: torch.Tensor, block: int = 32) -> torch.Tensor:
    """Q4: FP4 e2m1 quantize-dequantize with a power-of-two scale per block (the indexer's q and k)."""
    shape = x.shape
    xb = x.float().unflatten(-1, (shape[-1] // block, block))
    s = pow2_scale(xb.abs().amax(-1, keepdim=True).clamp(min=FP4_MAX * 2.0 ** -126), FP4_MAX)
    q = round_e2m1((xb / s).clamp(-FP4_MAX, FP4_MAX))
    return (q * s).flatten(-2).to(x.dtype)


def hadamard_matrix(d: int) -> torch.Tensor:
    """Sylvester-ordered Hadamard matrix scaled by d^-1/2 (orthonormal)."""
    h = torch.ones(1, 1)
    while h.shape[0] < d:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / math.sqrt(d)


def dequant_fp8(w: torch.Tensor, scale: torch.Tensor, dtype) -> torch.Tensor:
    """FP8 e4m3 weight [out, in] with one e8m0 scale per 128x128 block -> dense weight."""
    s = scale.float().repeat_interleave(128, 0)[: w.shape[0]].repeat_interleave(128, 1)[:, : w.shape[1]]
    return (w.float() * s).to(dtype)


class Linear(nn.Module):
    """y = x Wᵀ for a weight that is either FP8 e4m3 + e8m0 128x128 block scales (official) or plain float.
    FP8 weights stay FP8 in memory; the quant-sim rounds activations to FP8 first, as the reference kernel does."""

    def __init__(self, in_features: int, out_features: int, dtype=torch.float8_e4m3fn):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype), requires_grad=False)
        scale = torch.empty(-(-out_features // 128), -(-in_features // 128), dtype=torch.float8_e8m0fnu)
        self.scale = nn.Parameter(scale, requires_grad=False) if dtype == torch.float8_e4m3fn else None
        self.quant_sim = True
        self.dequantize_at_load = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.scale is None:
            return F.linear(x, self.weight.to(x.dtype))
        if self.quant_sim:
            x = act_quant(x, 128)
        return F.linear(x, dequant_fp8(self.weight, self.scale, x.dtype))


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=torch.float32), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (self.weight * (xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + self.eps))).to(x.dtype)


# ----------------------------------------------------------------------------------------------------------------
# RoPE: partial (last rope_dim dims), interleaved pairs. Window-only layers: theta 1e4, no YaRN; compressed layers:
# compress_rope_theta with static YaRN and no mscale.
def rope_freqs(cfg: ModelConfig, compressed: bool, max_pos: int) -> torch.Tensor:
    """[max_pos, rope_dim/2] angles."""
    dim = cfg.rope_dim
    base = cfg.compress_rope_theta if compressed else cfg.rope_theta
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    ys = cfg.rope_scaling
    if compressed and ys and ys.get("type", ys.get("rope_type")) == "yarn":
        factor, l0 = ys["factor"], ys["original_max_position_embeddings"]
        corr = lambda r: dim * math.log(l0 / (2 * math.pi * r)) / (2 * math.log(base))
        low = max(math.floor(corr(ys.get("beta_fast", 32))), 0)
        high = min(math.ceil(corr(ys.get("beta_slow", 1))), dim - 1)
        ramp = ((torch.arange(dim // 2, dtype=torch.float64) - low) / max(high - low, 1e-3)).clamp(0, 1)
        freqs = freqs / factor * ramp + freqs * (1 - ramp)
    return torch.outer(torch.arange(max_pos, dtype=torch.float64), freqs).float()


def apply_rope(x: torch.Tensor, angles: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """Rotate the last 2*angles.shape[-1] dims of x by the angles; x [..., S, (h,) d], angles [S, d_r/2]
    broadcast over any head dim between them (pass angles already shaped to broadcast)."""
    rd = angles.shape[-1] * 2
    xr = x[..., -rd:].float().unflatten(-1, (-1, 2))
    cos, sin = angles.cos(), angles.sin()
    if inverse:
        sin = -sin
    re = xr[..., 0] * cos - xr[..., 1] * sin
    im = xr[..., 0] * sin + xr[..., 1] * cos
    return torch.cat([x[..., :-rd], torch.stack([re, im], -1).flatten(-2).to(x.dtype)], -1)


# ----------------------------------------------------------------------------------------------------------------
# Manifold-constrained hyper-connections: 4 residual streams, collapsed before each sub-block and re-expanded after.
def hc_pre(h: torch.Tensor, fn, scale, base, n: int, iters: int, eps: float, norm_eps: float):
    """h [B,S,n,D] -> (x [B,S,D], post [B,S,n], comb [B,S,n,n]) with a Sinkhorn-projected comb."""
    xf = h.flatten(2).float()
    mix = (xf @ fn.T) * torch.rsqrt(xf.square().mean(-1, keepdim=True) + norm_eps)    # [B,S,(2+n)n]
    pre = torch.sigmoid(mix[..., :n] * scale[0] + base[:n]) + eps
    post = 2 * torch.sigmoid(mix[..., n:2 * n] * scale[1] + base[n:2 * n])
    comb = (mix[..., 2 * n:] * scale[2] + base[2 * n:]).unflatten(-1, (n, n))
    comb = comb.softmax(-1) + eps
    comb = comb / (comb.sum(-2, keepdim=True) + eps)
    for _ in range(iters - 1):
        comb = comb / (comb.sum(-1, keepdim=True) + eps)
        comb = comb / (comb.sum(-2, keepdim=True) + eps)
    x = (pre.unsqueeze(-1) * h.float()).sum(2).to(h.dtype)
    return x, post, comb


def hc_post(f: torch.Tensor, res: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
    """out[k] = post_k·f + Σ_j comb[j,k]·res[j]   (f [B,S,D], res [B,S,n,D])."""
    out = post.unsqueeze(-1) * f.float().unsqueeze(-2) + comb.transpose(-1, -2) @ res.float()
    return out.to(res.dtype)


def hc_head(h: torch.Tensor, fn, scale, base, eps: float, norm_eps: float) -> torch.Tensor:
    """Final collapse of the streams: h [B,S,n,D] -> [B,S,D] (no Sinkhorn, no post)."""
    xf = h.flatten(2).float()
    mix = (xf @ fn.T) * torch.rsqrt(xf.square().mean(-1, keepdim=True) + norm_eps)
    pre = torch.sigmoid(mix * scale + base) + eps
    return (pre.unsqueeze(-1) * h.float()).sum(2).to(h.dtype)


# ----------------------------------------------------------------------------------------------------------------
# Attention: low-rank q, one shared 512-wide KV head (K = V), partial RoPE, attention sink, sliding window of 128 raw
# tokens plus compressed blocks (HCA: every block; CSA: the indexer's top-k), grouped low-rank output projection.
class Compressor(nn.Module):
    """Pools every `ratio` tokens into one KV entry with a learned per-channel softmax gate.
    ratio 4 overlaps (each entry sees 8 tokens: A-halves of the previous block + B-halves of its own)."""

    def __init__(self, cfg: ModelConfig, dim: int, ratio: int, rotate: bool):
        super().__init__()
        self.dim, self.ratio, self.rotate = dim, ratio, rotate
        self.overlap = ratio == 4
        c = 2 if self.overlap else 1
        D = cfg.hidden_size
        self.wkv = Linear(D, c * dim, dtype=torch.float32)          # bf16 on disk, run in fp32 like the reference
        self.wgate = Linear(D, c * dim, dtype=torch.float32)
        self.ape = nn.Parameter(torch.empty(ratio, c * dim, dtype=torch.float32), requires_grad=False)
        self.norm = RMSNorm(dim, cfg.rms_norm_eps)
        self.rope_dim = cfg.rope_dim
        self.quant_sim = True
        self.kv_cache = self.kv_state = self.score_state = None   # set by setup_cache

    def setup_cache(self, batch: int, max_seq_len: int, dtype, device):
        c = 2 if self.overlap else 1
        self.kv_cache = torch.zeros(batch, -(-max_seq_len // self.ratio), self.dim, dtype=dtype, device=device)
        # unfinished-block rows of raw (a, g+ape); with overlap, rows 0..r-1 hold the previous full block
        self.kv_state = torch.zeros(batch, c * self.ratio, c * self.dim, device=device)
        self.score_state = torch.full((batch, c * self.ratio, c * self.dim), float("-inf"), device=device)

    def reset(self, batch: int):
        self.kv_state[:batch].zero_()
        self.score_state[:batch].fill_(float("-inf"))

    def forward(self, x: torch.Tensor, start_pos: int, angles: torch.Tensor, hadamard: torch.Tensor | None):
        """x [B,S,D] (the attn_norm output). Writes every block completed by this chunk into kv_cache;
        returns the number of blocks available to the chunk's last token."""
        B, S, _ = x.shape
        r, d, p = self.ratio, self.dim, start_pos
        a = self.wkv(x.float())                                        # [B,S,c*d] fp32
        g = self.wgate(x.float()) + self.ape[torch.arange(p, p + S, device=x.device) % r]
        p0 = p - p % r                                                 # first position of the open block
        off = r if self.overlap else 0                                 # rows of the previous full block
        A = torch.cat([self.kv_state[:B, :off + p % r], a], 1)        # rows = positions p0-off .. p+S-1
        G = torch.cat([self.score_state[:B, :off + p % r], g], 1)
        n = (p + S) // r - p0 // r                                     # blocks completed in this chunk
        if n > 0:
            if self.overlap:
                As, Gs = A[:, :(n + 1) * r].unflatten(1, (n + 1, r)), G[:, :(n + 1) * r].unflatten(1, (n + 1, r))
                kv = torch.cat([As[:, :-1, :, :d], As[:, 1:, :, d:]], 2)      # [B,n,2r,d]
                sc = torch.cat([Gs[:, :-1, :, :d], Gs[:, 1:, :, d:]], 2)
            else:
                kv, sc = A[:, :n * r].unflatten(1, (n, r)), G[:, :n * r].unflatten(1, (n, r))
            pooled = (kv * sc.softmax(2)).sum(2)                       # per-channel softmax over the block's rows
            C = self.norm(pooled.to(self.kv_cache.dtype))
            j0 = p0 // r
            C = apply_rope(C, angles[torch.arange(j0, j0 + n, device=x.device) * r])   # at the block's first token
            if self.rotate:          # indexer keys: Hadamard + FP4 sim
                if self.quant_sim:
                    C = fp4_quant((C.float() @ hadamard).to(C.dtype), 32)
            elif self.quant_sim:     # attention keys: FP8 sim of the no-rope dims
                C = torch.cat([act_quant(C[..., :-self.rope_dim], 64), C[..., -self.rope_dim:]], -1)
            self.kv_cache[:B, j0:j0 + n] = C
        end = p + S
        rem, first = end % r, (end - end % r) - (p0 - off)            # A-row index of the new open block
        if self.overlap and n > 0:
            self.kv_state[:B, :r], self.score_state[:B, :r] = A[:, first - r:first], G[:, first - r:first]
        self.kv_state[:B, off:off + rem] = A[:, first:first + rem]
        self.score_state[:B, off:off + rem] = G[:, first:first + rem]
        return end // r


class Indexer(nn.Module):
    """Lightning indexer (CSA layers): scores compressed blocks per query, keeps the top index_topk."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.head_dim, self.topk = cfg.index_n_heads, cfg.index_head_dim, cfg.index_topk
        self.wq_b = Linear(cfg.q_lora_rank, self.n_heads * self.head_dim)
        self.weights_proj = Linear(cfg.hidden_size, self.n_heads, dtype=torch.bfloat16)
        self.compressor = Compressor(cfg, self.head_dim, 4, rotate=True)
        self.register_buffer("hadamard", hadamard_matrix(self.head_dim), persistent=False)
        self.quant_sim = True

    def forward(self, x, qr, start_pos: int, angles: torch.Tensor) -> torch.Tensor:
        """-> [B,S,k] indices into the compressed cache, -1 where a pick is not (yet) a completed block."""
        B, S, _ = x.shape
        pos = torch.arange(start_pos, start_pos + S, device=x.device)
        q = self.wq_b(qr).unflatten(-1, (self.n_heads, self.head_dim))
        q = apply_rope(q, angles[pos][:, None])
        if self.quant_sim:
            q = fp4_quant((q.float() @ self.hadamard).to(q.dtype), 32)
        T = self.compressor(x, start_pos, angles, self.hadamard)
        if T == 0:
            return torch.empty(B, S, 0, dtype=torch.long, device=x.device)
        K = self.compressor.kv_cache[:B, :T]
        w = self.weights_proj(x).float() * (self.head_dim ** -0.5 * self.n_heads ** -0.5)
        # fp64 q·k: with the FP4 sim the products are exact, so equal blocks tie exactly in every chunking
        score = (torch.einsum("bshd,btd->bsht", q.double(), K.double()).float().relu() * w[..., None]).sum(2)
        visible = (pos + 1) // 4                                       # [S] blocks completed by each query
        future = torch.arange(T, device=x.device)[None, :] >= visible[:, None]   # [S,T]
        # stable sort: equal scores (relu zeros are common) pick the earlier block, whatever the chunking
        idx = score.masked_fill(future, float("-inf")).sort(dim=-1, descending=True, stable=True).indices[..., :self.topk]
        return torch.where(idx >= visible[:, None], -1, idx)


def sparse_attention(q, window_kv, window_pos, comp_kv, comp_idx, q_pos, sink, scale, window: int, ratio: int):
    """Attention of queries q [B,Q,H,d] at positions q_pos [Q] over
    - window keys window_kv [B,W,d] at positions window_pos [W] (t - window < pos <= t, pos >= 0), and
    - compressed keys comp_kv [B,T,d]: all blocks j < (t+1)//ratio (HCA, comp_idx None) or the indexer's picks
      comp_idx [B,Q,k] (CSA, -1 = none).
    K = V (one shared KV head); a per-head sink logit joins the softmax with no value. -> [B,Q,H,d]"""
    logits = torch.einsum("bqhd,bkd->bhqk", q, window_kv).float() * scale
    ok = (window_pos[None, :] <= q_pos[:, None]) & (window_pos[None, :] > q_pos[:, None] - window) \
        & (window_pos[None, :] >= 0)
    logits = logits.masked_fill(~ok, float("-inf"))
    parts = [logits]
    if comp_kv is not None and comp_idx is None:                     # HCA: every completed block
        lc = torch.einsum("bqhd,bkd->bhqk", q, comp_kv).float() * scale
        done = torch.arange(comp_kv.shape[1], device=q.device)[None, :] < ((q_pos + 1) // ratio)[:, None]
        parts.append(lc.masked_fill(~done, float("-inf")))
    elif comp_kv is not None:                                        # CSA: the indexer's top-k blocks
        gathered = comp_kv[torch.arange(q.shape[0], device=q.device)[:, None, None], comp_idx.clamp(min=0)]
        lc = torch.einsum("bqhd,bqkd->bhqk", q, gathered).float() * scale
        parts.append(lc.masked_fill((comp_idx < 0)[:, None], float("-inf")))
    B, H, Q = logits.shape[:3]
    parts.append(sink.float()[None, :, None, None].expand(B, H, Q, 1))

    probs = torch.cat(parts, -1).softmax(-1).to(q.dtype)             # probabilities rounded like the kernel's
    W = window_kv.shape[1]
    o = torch.einsum("bhqk,bkd->bqhd", probs[..., :W], window_kv)
    if comp_kv is not None and comp_idx is None:
        o = o + torch.einsum("bhqk,bkd->bqhd", probs[..., W:-1], comp_kv)
    elif comp_kv is not None:
        o = o + torch.einsum("bhqk,bqkd->bqhd", probs[..., W:-1], gathered)
    return o


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.cfg, self.ratio = cfg, cfg.ratio(layer)
        H, hd, D = cfg.num_attention_heads, cfg.head_dim, cfg.hidden_size
        self.n_heads, self.head_dim, self.window = H, hd, cfg.sliding_window
        self.wq_a = Linear(D, cfg.q_lora_rank)
        self.q_norm = RMSNorm(cfg.q_lora_rank, cfg.rms_norm_eps)
        self.wq_b = Linear(cfg.q_lora_rank, H * hd)
        self.wkv = Linear(D, hd)
        self.kv_norm = RMSNorm(hd, cfg.rms_norm_eps)
        # wo_a is FP8 on disk; the reference dequantizes it at load and runs a bf16 grouped einsum
        self.wo_a = Linear(H * hd // cfg.o_groups, cfg.o_groups * cfg.o_lora_rank, dtype=torch.bfloat16)
        self.wo_a.dequantize_at_load = True
        self.wo_b = Linear(cfg.o_groups * cfg.o_lora_rank, D)
        self.attn_sink = nn.Parameter(torch.empty(H, dtype=torch.float32), requires_grad=False)
        self.compressor = Compressor(cfg, hd, self.ratio, rotate=False) if self.ratio else None
        self.indexer = Indexer(cfg) if self.ratio == 4 else None
        self.quant_sim = True
        self.kv_window = None                                        # [B, window, hd] ring, set by setup_cache

    def setup_cache(self, batch: int, max_seq_len: int, dtype, device):
        self.kv_window = torch.zeros(batch, self.window, self.head_dim, dtype=dtype, device=device)
        for m in (self.compressor, self.indexer and self.indexer.compressor):
            if m is not None:
                m.setup_cache(batch, max_seq_len, dtype, device)

    def forward(self, x: torch.Tensor, start_pos: int, angles: torch.Tensor, query_block: int = 256):
        B, S, _ = x.shape
        H, hd, W, p = self.n_heads, self.head_dim, self.window, start_pos
        pos = torch.arange(p, p + S, device=x.device)
        ang = angles[pos]
        qr = self.q_norm(self.wq_a(x))                                           # [B,S,q_lora]
        q = self.wq_b(qr).unflatten(-1, (H, hd))
        q = (q.float() * torch.rsqrt(q.float().square().mean(-1, keepdim=True) + self.cfg.rms_norm_eps)).to(x.dtype)
        q = apply_rope(q, ang[:, None])
        kv = apply_rope(self.kv_norm(self.wkv(x)), ang)                          # [B,S,hd]
        if self.quant_sim:
            kv = torch.cat([act_quant(kv[..., :-self.cfg.rope_dim], 64), kv[..., -self.cfg.rope_dim:]], -1)
        comp_kv, comp_idx = None, None
        if self.compressor is not None:                              # new blocks land before anything reads them
            T = self.compressor(x, p, angles, None)
            comp_kv = self.compressor.kv_cache[:B, :T]
            if self.indexer is not None:
                comp_idx = self.indexer(x, qr, p, angles)
        # ring slot s holds the latest position < p that is ≡ s (mod W); negative = empty
        slots = torch.arange(W, device=x.device)
        ring_pos = p - 1 - (p - 1 - slots) % W
        ring = self.kv_window[:B]
        o = torch.empty(B, S, H, hd, dtype=x.dtype, device=x.device)
        for qs in range(0, S, query_block):                          # bounded memory for long prefills
            qe, ks = min(S, qs + query_block), max(0, qs - W + 1)
            keys = torch.cat([ring, kv[:, ks:qe]], 1)
            kpos = torch.cat([ring_pos, pos[ks:qe]])
            o[:, qs:qe] = sparse_attention(q[:, qs:qe], keys, kpos, comp_kv,
                                           None if comp_idx is None else comp_idx[:, qs:qe],
                                           pos[qs:qe], self.attn_sink, hd ** -0.5, W, max(self.ratio, 1))
        n = min(S, W)
        self.kv_window[:B, (pos[-n:] % W)] = kv[:, -n:]
        o = apply_rope(o, ang[:, None], inverse=True)                # K = V carried rope: undo it at the query pos
        G = self.cfg.o_groups
        z = torch.einsum("bsgi,gri->bsgr", o.flatten(2).unflatten(-1, (G, -1)),
                         self.wo_a.weight.to(o.dtype).unflatten(0, (G, -1)))
        return self.wo_b(z.flatten(2))


# ----------------------------------------------------------------------------------------------------------------
# MoE: sqrtsoftplus router in fp32; hash routing (tid2eid) on the first num_hash_layers layers, else top-k of
# score + bias (bias only for selection); weights normalised x routed_scaling_factor; routed experts in kernels.moe.
class Gate(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        E, self.k = cfg.n_routed_experts, cfg.num_experts_per_tok
        self.hash = layer < cfg.num_hash_layers
        self.route_scale, self.score_func = cfg.routed_scaling_factor, cfg.scoring_func
        self.weight = nn.Parameter(torch.empty(E, cfg.hidden_size, dtype=torch.bfloat16), requires_grad=False)
        if self.hash:
            self.tid2eid = nn.Parameter(torch.empty(cfg.vocab_size, self.k, dtype=torch.int64), requires_grad=False)
        else:
            self.bias = nn.Parameter(torch.empty(E, dtype=torch.float32), requires_grad=False)

    def forward(self, x: torch.Tensor, tokens: torch.Tensor):
        """x [N,D], tokens [N] -> (expert ids [N,k] int32, weights [N,k] fp32)."""
        logits = x.float() @ self.weight.float().T
        if self.score_func == "sqrtsoftplus":
            s = F.softplus(logits).sqrt()
        elif self.score_func == "sigmoid":
            s = logits.sigmoid()
        else:
            s = logits.softmax(-1)
        ids = self.tid2eid[tokens] if self.hash else (s + self.bias).topk(self.k, -1).indices
        w = s.gather(1, ids)
        w = w / w.sum(-1, keepdim=True) * self.route_scale
        return ids.int(), w


class Expert(nn.Module):
    """The shared expert: clamped SwiGLU over FP8 linears."""

    def __init__(self, dim: int, inter: int, limit: float):
        super().__init__()
        self.w1, self.w2, self.w3 = Linear(dim, inter), Linear(inter, dim), Linear(dim, inter)
        self.limit = limit

    def forward(self, x):
        g, u = self.w1(x).float(), self.w3(x).float()
        if self.limit:
            g, u = g.clamp(max=self.limit), u.clamp(-self.limit, self.limit)
        return self.w2((F.silu(g) * u).to(x.dtype))


def meta_experts(cfg: ModelConfig, n: int):
    """The official MXFP4 layout of n experts on the meta device (for memory planning before load)."""
    import kernels
    E, I, D = n, cfg.moe_intermediate_size, cfg.hidden_size
    t = lambda *s, dt: torch.empty(*s, dtype=dt, device="meta")
    ones = t(E, dt=torch.float32)
    return kernels.Experts("mxfp4", t(E, 2 * I, D // 2, dt=torch.float4_e2m1fn_x2),
                           t(E, 2 * I, D // 32, dt=torch.float8_e8m0fnu), t(E, D, I // 2, dt=torch.float4_e2m1fn_x2),
                           t(E, D, I // 32, dt=torch.float8_e8m0fnu), ones, ones, ones)


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.gate = Gate(cfg, layer)
        self.shared_experts = Expert(cfg.hidden_size, cfg.moe_intermediate_size, cfg.swiglu_limit)
        self.limit = cfg.swiglu_limit
        self.experts = meta_experts(cfg, cfg.n_routed_experts)     # replaced by the checkpoint's at load
        self.expert_offset = 0                                     # first global expert id held here (EP)

    def forward(self, x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        import kernels
        shape = x.shape
        x = x.flatten(0, 1)
        ids, w = self.gate(x, tokens.flatten())
        y = kernels.moe(x, ids - self.expert_offset, w, self.experts, self.limit)
        return (y.float() + self.shared_experts(x).float()).to(x.dtype).view(shape)


# ----------------------------------------------------------------------------------------------------------------
class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.cfg = cfg
        D, n = cfg.hidden_size, cfg.hc_mult
        mix = (2 + n) * n
        self.attn_norm, self.ffn_norm = RMSNorm(D, cfg.rms_norm_eps), RMSNorm(D, cfg.rms_norm_eps)
        self.attn, self.ffn = Attention(cfg, layer), MoE(cfg, layer)
        for site in ("attn", "ffn"):
            setattr(self, f"hc_{site}_fn", nn.Parameter(torch.empty(mix, n * D), requires_grad=False))
            setattr(self, f"hc_{site}_base", nn.Parameter(torch.empty(mix), requires_grad=False))
            setattr(self, f"hc_{site}_scale", nn.Parameter(torch.empty(3), requires_grad=False))

    def _hc_pre(self, h, site):
        c = self.cfg
        return hc_pre(h, getattr(self, f"hc_{site}_fn"), getattr(self, f"hc_{site}_scale"),
                      getattr(self, f"hc_{site}_base"), c.hc_mult, c.hc_sinkhorn_iters, c.hc_eps, c.rms_norm_eps)

    def forward(self, h, start_pos: int, tokens, angles):
        x, post, comb = self._hc_pre(h, "attn")
        h = hc_post(self.attn(self.attn_norm(x), start_pos, angles), h, post, comb)
        x, post, comb = self._hc_pre(h, "ffn")
        return hc_post(self.ffn(self.ffn_norm(x), tokens), h, post, comb)


# ----------------------------------------------------------------------------------------------------------------
class Transformer(nn.Module):
    """embed -> hc_mult streams -> blocks -> hc_head -> norm -> head (fp32 logits for every position)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        D, n = cfg.hidden_size, cfg.hc_mult
        self.embed = nn.Embedding(cfg.vocab_size, D, dtype=torch.bfloat16)
        self.embed.weight.requires_grad_(False)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(D, cfg.rms_norm_eps)
        self.head = Linear(D, cfg.vocab_size, dtype=torch.bfloat16)
        self.hc_head_fn = nn.Parameter(torch.empty(n, n * D), requires_grad=False)
        self.hc_head_base = nn.Parameter(torch.empty(n), requires_grad=False)
        self.hc_head_scale = nn.Parameter(torch.empty(1), requires_grad=False)
        self.max_seq_len = self.max_batch_size = 0
        self.quant_sim = True

    def set_quant_sim(self, on: bool):
        self.quant_sim = on
        for m in self.modules():
            if hasattr(m, "quant_sim"):
                m.quant_sim = on

    def setup_cache(self, max_batch_size: int, max_seq_len: int):
        """Preallocate every layer's KV state and the two RoPE tables for max_seq_len positions."""
        dev, dt = self.embed.weight.device, self.embed.weight.dtype
        self.max_batch_size, self.max_seq_len = max_batch_size, max_seq_len
        self.angles = {False: rope_freqs(self.cfg, False, max_seq_len).to(dev),
                       True: rope_freqs(self.cfg, True, max_seq_len).to(dev)}
        for layer in self.layers:
            layer.attn.setup_cache(max_batch_size, max_seq_len, dt, dev)

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, start_pos: int = 0) -> torch.Tensor:
        B, S = tokens.shape
        if B > self.max_batch_size or start_pos + S > self.max_seq_len or S < 1:
            raise ValueError(f"batch {B} x positions {start_pos}..{start_pos + S} exceed the cache "
                             f"({self.max_batch_size} x {self.max_seq_len}); raise max_batch_size/max_seq_len")
        if start_pos == 0:                                           # new sequences: drop partial compressor blocks
            for m in self.modules():
                if isinstance(m, Compressor):
                    m.reset(B)
        h = self.embed(tokens).unsqueeze(2).repeat(1, 1, self.cfg.hc_mult, 1)      # [B,S,n,D]
        for layer in self.layers:
            h = layer(h, start_pos, tokens, self.angles[layer.attn.ratio > 0])
        x = hc_head(h, self.hc_head_fn, self.hc_head_scale, self.hc_head_base, self.cfg.hc_eps, self.cfg.rms_norm_eps)
        x = self.norm(x)
        return F.linear(x.float(), self.head.weight.float())

    def weight_bytes(self) -> int:
        """Bytes of every weight held (experts included)."""
        n = sum(p.numel() * p.element_size() for p in self.parameters())
        for layer in self.layers:
            e = layer.ffn.experts
            n += sum(t.numel() * t.element_size() for t in (e.w13, e.w13_scale, e.w2, e.w2_scale) if t is not None)
        return n

    def weight_bytes_per_token(self) -> int:
        """Weight bytes one batch-1 decode step reads: everything but the embedding table, with only
        num_experts_per_tok routed experts per layer."""
        n = self.weight_bytes() - self.embed.weight.numel() * self.embed.weight.element_size()
        k = self.cfg.num_experts_per_tok
        for layer in self.layers:
            e = layer.ffn.experts
            per = sum(t.numel() * t.element_size() for t in (e.w13, e.w13_scale, e.w2, e.w2_scale) if t is not None)
            n -= per - per * min(k, e.num_experts) // max(e.num_experts, 1)
        return n


# ----------------------------------------------------------------------------------------------------------------
# Loading: module names are the official checkpoint names, so the walk below is the whole mapping.
FP32_PARAMS = ("norm.weight", "ape", "hc_", "attn_sink", "gate.bias")


def load_model(path: str, device="cpu", dtype=torch.bfloat16, max_seq_len: int = 4096, max_batch_size: int = 1,
               quant_sim: bool = True) -> Transformer:
    """Build the model for a checkpoint folder (config.json + safetensors) and load its weights onto `device`.
    Raises weights.CheckpointError for a bad checkpoint."""
    import kernels
    import weights
    ckpt = weights.load_checkpoint(path)                         # validates every tensor header first
    cfg = ModelConfig.from_dict(ckpt.config)
    device = torch.device(device)
    with torch.device("meta"):
        model = Transformer(cfg)
    linears = {name: m for name, m in model.named_modules() if isinstance(m, Linear)}
    for name, m in linears.items():
        w, s = ckpt.linear(name)
        if s is not None and m.dequantize_at_load:
            w, s = dequant_fp8(w.to(device), s.to(device), dtype), None
        if s is None:                                              # unquantized: compute dtype (fp32 ones stay fp32)
            wd = torch.float32 if m.weight.dtype == torch.float32 else dtype
            m.weight = nn.Parameter(w.to(device=device, dtype=wd), requires_grad=False)
            m.scale = None
        else:
            m.weight = nn.Parameter(w.to(device), requires_grad=False)
            m.scale = nn.Parameter(s.to(device), requires_grad=False)
    for name, param in list(model.named_parameters()):
        mod_name, _, attr = name.rpartition(".")
        if mod_name in linears:
            continue
        t = ckpt.tensor(name)
        if t.dtype == torch.int64 or t.dtype == torch.int32:
            t = t.to(device=device, dtype=torch.int64)
        elif any(k in name for k in FP32_PARAMS):
            t = t.to(device=device, dtype=torch.float32)
        else:
            t = t.to(device=device, dtype=dtype)
        setattr(model.get_submodule(mod_name), attr, nn.Parameter(t, requires_grad=False))
    for i, layer in enumerate(model.layers):
        e = ckpt.experts(i)
        e = kernels.Experts(e.fmt, *(None if t is None else t.to(device) for t in
                                     (e.w13, e.w13_scale, e.w2, e.w2_scale, e.alpha_gate, e.alpha_up, e.alpha_down,
                                      e.input_scale_13, e.input_scale_2)))
        if e.fmt == "bf16":
            e.w13, e.w2 = e.w13.to(dtype), e.w2.to(dtype)
        if hasattr(kernels, "prepare_experts"):
            e = kernels.prepare_experts(e)
        layer.ffn.experts = e
    for name, buf in list(model.named_buffers()):                # non-persistent constants (Hadamard)
        mod_name, _, attr = name.rpartition(".")
        model.get_submodule(mod_name).register_buffer(attr, buf.to(device) if buf.device.type != "meta" else
                                                      hadamard_matrix(buf.shape[0]).to(device), persistent=False)
    model.setup_cache(max_batch_size, max_seq_len)
    model.set_quant_sim(quant_sim)
    return model.eval()
