"""nano-dsv4 kernels: CuTe DSL kernels for Hopper (sm_90a) and a pure-torch reference for each kernel.

Every torch-facing function here has a reference beside it with identical semantics; the reference is the
fallback wherever CUDA or CuTe DSL is missing (and what CPU tests run). Each kernel is a class (config in __init__,
a @cute.jit launcher, a @cute.kernel body), compiled once per static config by a `_compile_*` function (memory and
disk cache, `_load_or_compile`) and called through a thin torch-facing function. Sections, in file order:

  Grouped FP4 x BF16 MoE        Experts / prepare_experts (fragment-order records, once at load), Fp4GroupedGemm
                                (wgmma, 257..3071 tokens), MoeRouting(Gather), MoeCombine; moe() -> moe_fp4(),
                                moe_reference()                                              (dsv4.MoE, issue #3)
  Decode-step kernels (#5)      dsv4.py's torch code is their reference; fused_unavailable_reason()
    FP8 GEMV                    Fp8Gemv: FP8 linears at M = 1..16 with the 128x128 block scales in the kernel, on
                                packed weights; fp8_gemv(), bf16_gemv_fp32(), fp8_gemv_grouped() (wo_a, W8A16)
    FP4 MoE GEMV                Fp4MoeGemv (mma.sync, weights streamed to registers, T <= 256), Fp4MoeGemvPair
                                (T >= 128), Fp4MoeGemvFused (both GEMMs in one launch, T <= 3); picked by moe_fp4()
    mHC                         HcSiteCluster (one launch per decode site: hc_post + hc_pre + RMSNorm), HcMix /
                                HcFinalize / HcPost (M > 8, hc_head); hc_post_pre_fused(), hc_pre/post/head_fused()
    Attention glue              RmsNorm, QNormRope, KvNormRopeQuant, IndexQuery, RopeInplace; *_fused()
    Shared-expert SwiGLU        SwiGlu; swiglu_fused()
    TP all-reduce (torchrun)    TpAllReduce: a decode activation's partial sums over 2-8 GPUs in one launch (pushed
                                into the peers' symmetric memory, a flag in every word); tp_all_reduce(),
                                tp_all_reduce_reference()
    Compressor step             CompressorDecode; compressor_decode()
    Attention, indexer, router  SparseAttentionDecodeWide (batch <= 2) / ...Cluster / SparseAttentionDecode,
                                IndexerTopK(Query) / TopKSelectVisible / IndexerScores, MoeGateDecode;
                                sparse_attention_decode(), indexer_(query_)topk_decode(), gate_decode()
  MoE prefill (#3)              Fp4PrefillGemm (warp-specialized, persistent, >= 3072 tokens), PrefillCount /
                                PrefillTables / PrefillPlace (multi-CTA routing + gather); moe_fp4_prefill()

Module-level UPPER_CASE names are the switches and size rules; notes/kernel.md and notes/decode.md give the
measurement behind each.
"""
from __future__ import annotations

from dataclasses import dataclass

import struct

import torch


def _f32_round(v: float) -> float:
    """v rounded to the nearest fp32 value (a kernel constant as the GPU holds it)."""
    return struct.unpack("f", struct.pack("f", v))[0]


def _f32_div(a: float, b: float) -> float:
    """a / b in fp32 arithmetic (correctly rounded), as a kernel constant."""
    return (torch.tensor(a, dtype=torch.float32) / torch.tensor(b, dtype=torch.float32)).item()


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


def random_fp4_experts(E, D, I, fmt, device="cpu", seed=0, alpha_gate=0.02, alpha_up=0.03, alpha_down=0.05):
    """Random fp4 experts; scales in a realistic range (nvfp4 e4m3 ~2^-3..2^3, mxfp4 e8m0 2^-10..2^0)."""
    g = torch.Generator(device=device).manual_seed(seed)
    g_ = FP4_GROUP[fmt]

    def codes(*shape):
        return torch.randint(0, 256, shape, generator=g, dtype=torch.uint8, device=device)

    def scales(*shape):
        if fmt == "nvfp4":
            v = torch.exp2(torch.randint(-3, 4, shape, generator=g, device=device).float())
            v = v * (1 + torch.randint(0, 8, shape, generator=g, device=device) / 8)
            return v.to(torch.float8_e4m3fn)
        return torch.randint(117, 128, shape, generator=g, dtype=torch.uint8, device=device).view(torch.float8_e8m0fnu)

    ex = Experts(
        fmt=fmt,
        w13=codes(E, 2 * I, D // 2).view(torch.float4_e2m1fn_x2), w13_scale=scales(E, 2 * I, D // g_),
        w2=codes(E, D, I // 2).view(torch.float4_e2m1fn_x2), w2_scale=scales(E, D, I // g_),
        alpha_gate=alpha_gate * (1 + torch.rand(E, generator=g, device=device)),
        alpha_up=alpha_up * (1 + torch.rand(E, generator=g, device=device)),
        alpha_down=alpha_down * (1 + torch.rand(E, generator=g, device=device)))
    if fmt == "mxfp4":     # e8m0 scales ~2^-5 on average: scale the alphas back up
        ex.alpha_gate *= 32; ex.alpha_up *= 32; ex.alpha_down *= 32
    return ex


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




# ================================================================================================================
# Grouped FP4 x BF16 MoE for Hopper (sm_90a), CuTe DSL.
#
# Swap-AB: the expert weight is the wgmma A operand (M = weight rows, 64 per warpgroup atom), decoded from e2m1 to
# bf16 in registers and multiplied by its block scale there (RS wgmma); the tokens routed to the expert are the B
# operand (N = tokens, a narrow 8..128 tile), TMA-loaded from the expert-sorted activations. One CTA = one
# (weight-row tile of 128, token tile of one expert); per-tile (expert, first row, rows) come from a device table
# built by torch ops without host sync, so routing changes neither recompile nor sync, and the call graph-captures.
#
# Packed weight layout (prepare_experts, once at load): per expert, per 128-row tile, per 64-wide k-tile one
# contiguous record that one TMA copies to shared memory (exactly the checkpoint's bytes: codes + 1 B per scale):
#   [atom a (2)][thread t (128)][16 B codes]   then   [atom a][quad q (32)][scale bytes: 8 (nvfp4) | 4 (mxfp4)]
# Thread t = 32*warp + lane owns rows r = 16*warp + lane//4 and r+8 of each 64-row atom and k = 2*(lane%4) + {0,1,8,9}
# of each k16 block (the wgmma register fragment of A). Its 4 code words (one per k16 block) hold the 8 codes of
# fragment registers R0..R3 = (r,k..k+1), (r+8,k..k+1), (r,k+8..k+9), (r+8,k+8..k+9), bit-permuted (_ROT) so that a
# rotate + mask drops each code's bits onto bf16 bits (see SCALE_EXP below). The 4 threads of quad q = t//4 share
# rows r, r+8 and read the same scale bytes (s_r groups..., s_r8 groups...).
# Split-K (decode): grid z = K slices; the last slice of a tile to arrive sums the fp32 partials in slice order.
# GEMM1 rows are interleaved per 64: tile t = gate rows 64t..64t+63, then up rows 64t..64t+63, so the epilogue has
# gate and up of the same intermediate column in the same thread.
# ================================================================================================================
import hashlib
import math
import os
import sys

TILE_M = 128          # weight rows per CTA (two 64-row wgmma atoms, one warpgroup)
TILE_K = 64           # K per pipeline stage (4 k16 wgmma blocks)
REC_ROW = 256         # bytes per TMA box row of a packed record
CODE_BYTES = 2 * 128 * 16   # codes of one record: [atom 2][thread 128][4 words]

# Shift decode: a code's magnitude bits (m, e0, e1) land on bf16 bits 6, 7, 8 and its sign on bit 15 (bits 22..24, 31
# for the high half), which reads as value * 2^-126 (e2m1's subnormal 0.5 becomes a bf16 subnormal). The block scale
# is stored so that it decodes to bf16(scale * 2^SCALE_EXP); the product is value * scale * 2^(SCALE_EXP - 126),
# exact in bf16 (<= 6 significant bits, normal range), and the epilogue multiplies by ACC_FIX = 2^(126 - SCALE_EXP).
SCALE_EXP = 110
ACC_FIX = 2.0 ** (126 - SCALE_EXP)
_BF16_BITS = (6, 7, 8, 15, 22, 23, 24, 31)      # (m, e0, e1, sign) of the low, then the high bf16 half
# Left-rotation of the stored word that brings each of those bits of fragment register R0..R3 into place. R0..R2 need
# one rotation each, R3 two (a 32-bit word can't hold four single-rotation patterns; found by exhaustive search).
_ROT = ((0,) * 8, (4,) * 8, (10,) * 8, (6, 6, 14, 6, 6, 6, 14, 6))
_SRC_BIT = tuple(tuple((p - x) % 32 for p, x in zip(_BF16_BITS, rot)) for rot in _ROT)   # [reg][bit] -> word bit
assert sorted(b for reg in _SRC_BIT for b in reg) == list(range(32))
_R3_MASK = tuple(sum(1 << p for p, x in zip(_BF16_BITS, _ROT[3]) if x == r) for r in (6, 14))
_BF16_PAIR_MASK = sum(1 << p for p in _BF16_BITS)        # 0x81C081C0
# Rotations 4 (R1) and 6 (R3's m6 bits) wrap no bit their masks keep, so they are plain shifts: ptxas issues those
# as IMAD.SHL on the FMA pipe, and the decode loops' ALU pipe (LOP3 / SHF / PRMT / LEA, half rate: the busiest
# pipe of the T = 1 loop) gets 32 of its 181 instructions per 2 k-tiles off (SASS). Same bits. H200, same-run rows:
# 3-4% faster at T = 1..4, 5-8% at T = 16..256 (DECODE_SHIFT "rot": the funnel shifts of sessions 1-27).
assert all(p >= 4 for p in _BF16_BITS) and all(p >= 6 for p, x in zip(_BF16_BITS, _ROT[3]) if x == 6)
DECODE_SHIFT = "shl"


def _decode_key() -> tuple:
    """Compile-cache key part of every kernel that traces the e2m1 decode (empty for the default)."""
    return () if DECODE_SHIFT == "shl" else (("decode", DECODE_SHIFT),)


def _scale_words_per_atom(fmt: str) -> int:
    return 2 if fmt == "nvfp4" else 1      # per 4-thread quad: rows (r, r+8) x (4 | 2) groups of the k-tile, 1 B each


def record_bytes(fmt: str) -> int:
    """Bytes of one packed (128-row, 64-k) record: codes 4096 + one byte per block scale (512 | 256)."""
    return CODE_BYTES + 2 * 32 * 4 * _scale_words_per_atom(fmt)


def weight_bytes_per_expert(fmt: str, dim: int, inter: int) -> int:
    """Bytes the kernel reads per expert (= the checkpoint's fp4 codes + 1-byte block scales)."""
    return ((2 * inter // TILE_M) * (dim // TILE_K) + (dim // TILE_M) * (inter // TILE_K)) * record_bytes(fmt)


def _fragment_index_maps(device):
    """For the 128 threads of a warpgroup: row-in-atom r (and r+8) and the byte column offset c of their fragment."""
    t = torch.arange(128, device=device)
    warp, lane = t // 32, t % 32
    r = 16 * warp + lane // 4
    c = lane % 4
    return r, c


def _pack_word_bits(codes8: torch.Tensor) -> torch.Tensor:
    """codes8 [..., 8] (v_0..v_7 e2m1 codes of fragment registers R0..R3, low half first) -> int64 stored word."""
    word = torch.zeros(codes8.shape[:-1], dtype=torch.int64, device=codes8.device)
    for j in range(4):
        for half in range(2):
            v = codes8[..., 2 * j + half]
            for b in range(4):
                word |= ((v >> b) & 1) << _SRC_BIT[j][4 * half + b]
    return word


def _unpack_word_bits(word: torch.Tensor) -> torch.Tensor:
    codes = torch.zeros(word.shape + (8,), dtype=torch.int64, device=word.device)
    for j in range(4):
        for half in range(2):
            for b in range(4):
                codes[..., 2 * j + half] |= ((word >> _SRC_BIT[j][4 * half + b]) & 1) << b
    return codes


def _e4m3_tables():
    """e4m3 byte -> stored byte (-1: zero, -2: NaN), and stored byte -> e4m3 byte of the positive value.
    Stored byte = (E + 9) << 3 | mant for |scale| = 2^E (1 + mant/8), E in -9..8 (subnormal e4m3 renormalised), so
    (byte << 4) + ((SCALE_EXP + 118) << 7) is bf16(|scale| * 2^SCALE_EXP) (one prmt + one mad in the kernel)."""
    enc = [0] * 256
    dec = [0] * 256
    for byte in range(128):
        e, m = byte >> 3, byte & 7
        if byte == 0:
            enc[0] = enc[0x80] = -1
            continue
        if byte == 0x7F:
            enc[0x7F] = enc[0xFF] = -2
            continue
        if e == 0:                                    # subnormal: m * 2^-9 -> normalise
            E = -9 + m.bit_length() - 1
            mant = ((m << (3 - (m.bit_length() - 1))) & 7)
        else:
            E, mant = e - 7, m
        enc[byte] = enc[byte | 0x80] = ((E + 9) << 3) | mant
        dec[((E + 9) << 3) | mant] = byte
    return enc, dec


_E4M3_ENC, _E4M3_DEC = _e4m3_tables()
_E8M0_MIN, _E8M0_MAX = 18, 126 + 128 - SCALE_EXP   # e8m0 range whose products stay normal bf16 (2^-109 .. 2^17)


def _encode_scales(s: torch.Tensor, fmt: str):
    """Block-scale bytes -> (stored bytes, code_sign_flip bool, zero_block bool), all [..., groups].
    A zero (or, mxfp4, negligible < 2^-109) scale zeroes its block's codes; a negative one flips the codes' signs."""
    s = s.to(torch.int64)
    if fmt == "nvfp4":
        enc = torch.tensor(_E4M3_ENC, dtype=torch.int64, device=s.device)[s]
        if (enc == -2).any():
            raise ValueError("nvfp4 block scales contain NaN (e4m3 0x7f/0xff)")
        zero = enc == -1
        return torch.where(zero, torch.zeros_like(enc), enc), (s >= 0x80) & ~zero, zero
    if (s == 0xFF).any():
        raise ValueError("mxfp4 block scales contain NaN (e8m0 0xff)")
    if (s > _E8M0_MAX).any():
        raise ValueError(f"mxfp4 block scale above 2^{_E8M0_MAX - 127}: not supported by the fp4 kernel")
    zero = s < _E8M0_MIN
    return torch.where(zero, torch.full_like(s, _E8M0_MIN), s), torch.zeros_like(zero), zero


def _decode_scales(b: torch.Tensor, fmt: str) -> torch.Tensor:
    if fmt == "nvfp4":
        return torch.tensor(_E4M3_DEC, dtype=torch.int64, device=b.device)[b.to(torch.int64)]
    return b.to(torch.int64)


def _gate_up_row_order(inter: int, device) -> torch.Tensor:
    """Row permutation of w13 [2I] so that each 128-row tile is (gate 64 rows, matching up 64 rows)."""
    t = torch.arange(inter // 64, device=device)[:, None]
    j = torch.arange(64, device=device)[None, :]
    return torch.cat([64 * t + j, inter + 64 * t + j], dim=1).reshape(-1)


def repack_fp4(w: torch.Tensor, scale: torch.Tensor, fmt: str) -> torch.Tensor:
    """[E, M, K/2] packed e2m1 + [E, M, K/g] scales -> records uint8 [E, M/128 * K/64, rows, 256] (rows = rec/256).
    Works on a few experts at a time so the int64 intermediates stay ~1 GB."""
    E, M, K2 = w.shape
    chunk = max(1, (1 << 27) // (M * K2 * 2))
    return torch.cat([_repack_fp4_chunk(w[i:i + chunk], scale[i:i + chunk], fmt) for i in range(0, E, chunk)])


def _fragment_gather(codes, r, c):
    """codes [E,Mt,atom,row,Kt,kb,k16] -> per thread, per k16 block, v_0..v_7 = (r,2c),(r,2c+1),(r+8,2c),(r+8,2c+1),
    (r,2c+8),(r,2c+9),(r+8,2c+8),(r+8,2c+9): [E, Mt, Kt, atom, t, kb, 8]."""
    rows = torch.stack([r, r, r + 8, r + 8, r, r, r + 8, r + 8], dim=-1)                 # [128, 8]
    cols = torch.stack([2 * c, 2 * c + 1, 2 * c, 2 * c + 1, 2 * c + 8, 2 * c + 9, 2 * c + 8, 2 * c + 9], dim=-1)
    v = codes[:, :, :, rows, :, :, cols]            # advanced indices first: [128, 8, E, Mt, atom, Kt, kb]
    return v.permute(2, 3, 5, 4, 0, 6, 1), rows, cols


def _repack_fp4_chunk(w: torch.Tensor, scale: torch.Tensor, fmt: str) -> torch.Tensor:
    E, M, K2 = w.shape
    K = 2 * K2
    assert M % TILE_M == 0 and K % (2 * TILE_K) == 0, f"fp4 MoE kernel needs M % 128 == 0, K % 128 == 0 (M={M}, K={K})"
    g = FP4_GROUP[fmt]
    Mt, Kt = M // TILE_M, K // TILE_K
    sb, flip, zero = _encode_scales(scale.view(torch.uint8), fmt)            # [E, M, K/g]
    b = w.view(torch.uint8).to(torch.int64)
    codes = torch.stack([b & 0xF, b >> 4], dim=-1).reshape(E, M, K)
    codes = codes ^ (flip.repeat_interleave(g, dim=-1).to(torch.int64) << 3)
    codes = torch.where(zero.repeat_interleave(g, dim=-1), torch.zeros_like(codes), codes)
    codes = codes.reshape(E, Mt, 2, 64, Kt, 4, 16)                           # [E,Mt,atom,row,Kt,kb,k16]
    r, c = _fragment_index_maps(w.device)
    v, _, _ = _fragment_gather(codes, r, c)                                   # [E, Mt, Kt, atom, t, kb, 8]
    words = _pack_word_bits(v).to(torch.int32)                               # wraps to int32 bit pattern
    code_bytes = words.contiguous().view(torch.uint8).reshape(E, Mt, Kt, CODE_BYTES)
    # scales: per atom, per quad q (rows r = 16*(q//8) + q%8 and r+8): [s_r groups..., s_r8 groups...] (1 B each)
    q = torch.arange(32, device=w.device)
    rq = 16 * (q // 8) + q % 8
    s = sb.reshape(E, Mt, 2, 64, Kt, TILE_K // g)
    sp = torch.stack([s[:, :, :, rq], s[:, :, :, rq + 8]], dim=4)            # [E,Mt,atom,q,2,Kt,grp]
    if fmt == "nvfp4":
        sp = sp.permute(0, 1, 5, 2, 3, 4, 6)                                 # [E,Mt,Kt,atom,q,(r|r8),grp 4]
    else:
        sp = sp.permute(0, 1, 5, 2, 3, 4, 6)                                 # [E,Mt,Kt,atom,q,(r|r8),grp 2]
    scale_bytes = sp.reshape(E, Mt, Kt, -1).to(torch.uint8)
    rec = torch.cat([code_bytes, scale_bytes], dim=-1)
    return rec.reshape(E, Mt * Kt, record_bytes(fmt) // REC_ROW, REC_ROW).contiguous()


def _record_fields(rec: torch.Tensor, fmt: str, M: int, K: int):
    """records -> (codes [E,Mt,2,64,Kt,4,16] int64, stored scale bytes [E, M, K/g] int64)."""
    E = rec.shape[0]
    g = FP4_GROUP[fmt]
    Mt, Kt = M // TILE_M, K // TILE_K
    rec = rec.reshape(E, Mt, Kt, record_bytes(fmt))
    words = rec[..., :CODE_BYTES].contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    v = _unpack_word_bits(words.reshape(E, Mt, Kt, 2, 128, 4))               # [E,Mt,Kt,atom,t,kb,8]
    r, c = _fragment_index_maps(rec.device)
    codes = torch.zeros(E, Mt, 2, 64, Kt, 4, 16, dtype=torch.int64, device=rec.device)
    rows = torch.stack([r, r, r + 8, r + 8, r, r, r + 8, r + 8], dim=-1)
    cols = torch.stack([2 * c, 2 * c + 1, 2 * c, 2 * c + 1, 2 * c + 8, 2 * c + 9, 2 * c + 8, 2 * c + 9], dim=-1)
    codes[:, :, :, rows, :, :, cols] = v.permute(4, 6, 0, 1, 3, 2, 5)
    q = torch.arange(32, device=rec.device)
    rq = 16 * (q // 8) + q % 8
    sp = rec[..., CODE_BYTES:].to(torch.int64).reshape(E, Mt, Kt, 2, 32, 2, TILE_K // g)   # [E,Mt,Kt,atom,q,r|r8,grp]
    s = torch.zeros(E, Mt, 2, 64, Kt, TILE_K // g, dtype=torch.int64, device=rec.device)
    s[:, :, :, rq] = sp[:, :, :, :, :, 0].permute(0, 1, 3, 4, 2, 5)
    s[:, :, :, rq + 8] = sp[:, :, :, :, :, 1].permute(0, 1, 3, 4, 2, 5)
    return codes, s.reshape(E, M, K // g)


def unpack_fp4(rec: torch.Tensor, fmt: str, M: int, K: int):
    """Inverse of repack_fp4 (for positive, nonzero, in-range scales): records -> ([E, M, K/2] uint8 packed codes,
    [E, M, K/g] uint8 scale bytes)."""
    codes, sb = _record_fields(rec, fmt, M, K)
    E = rec.shape[0]
    codes = codes.reshape(E, M, K // 2, 2)
    packed = (codes[..., 0] | (codes[..., 1] << 4)).to(torch.uint8)
    return packed, _decode_scales(sb, fmt).to(torch.uint8)


def emulate_record_decode(rec: torch.Tensor, fmt: str, M: int, K: int) -> torch.Tensor:
    """What the kernel's decode computes, bit for bit, in torch: records -> [E, M, K] fp32 weights (bf16 values of
    value * scale * 2^(SCALE_EXP - 126), times ACC_FIX). Checks the rotation/mask layout and the scale encoding."""
    E = rec.shape[0]
    Mt, Kt = M // TILE_M, K // TILE_K
    g = FP4_GROUP[fmt]
    recw = rec.reshape(E, Mt, Kt, record_bytes(fmt))
    words = recw[..., :CODE_BYTES].contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    words = words.reshape(E, Mt, Kt, 2, 128, 4)
    regs = []
    for j in range(4):                                       # rotate + mask, as the PTX does
        rot = {x: ((words << x) | (words >> (32 - x))) & 0xFFFFFFFF if x else words for x in set(_ROT[j])}
        out = torch.zeros_like(words)
        for x, rw in rot.items():
            mask = sum(1 << p for p, xx in zip(_BF16_BITS, _ROT[j]) if xx == x)
            out |= rw & mask
        regs.append(out)
    halves = torch.stack([torch.stack([rg & 0xFFFF, rg >> 16], -1) for rg in regs], -2)   # [...,4 regs,2]
    bf = halves.reshape(-1).to(torch.int16).view(torch.bfloat16).float().reshape(halves.shape)
    _, sb = _record_fields(rec, fmt, M, K)
    shift, base = (4, (SCALE_EXP + 118) << 7) if fmt == "nvfp4" else (7, SCALE_EXP << 7)
    sbits = (sb << shift) + base
    sval = sbits.to(torch.int16).view(torch.bfloat16).float()                  # [E, M, K/g]
    # regs -> element positions: R0 (r,2c..), R1 (r+8,2c..), R2 (r,2c+8..), R3 (r+8,2c+8..)
    v = bf.reshape(E, Mt, Kt, 2, 128, 4, 8)                                     # [..., t, kb, v_0..v_7]
    r, c = _fragment_index_maps(rec.device)
    vals = torch.zeros(E, Mt, 2, 64, Kt, 4, 16, dtype=torch.float32, device=rec.device)
    rows = torch.stack([r, r, r + 8, r + 8, r, r, r + 8, r + 8], dim=-1)
    cols = torch.stack([2 * c, 2 * c + 1, 2 * c, 2 * c + 1, 2 * c + 8, 2 * c + 9, 2 * c + 8, 2 * c + 9], dim=-1)
    vals[:, :, :, rows, :, :, cols] = v.permute(4, 6, 0, 1, 3, 2, 5)
    w = vals.reshape(E, M, K) * sval.repeat_interleave(g, dim=-1)
    return w.to(torch.bfloat16).float() * ACC_FIX



@dataclass
class PackedExperts:
    """The kernel's one-time layout of an Experts (see the layout comment above)."""
    fmt: str
    w13: torch.Tensor          # [E, (2I/128)*(D/64), rows, 256] uint8, gate/up interleaved per 64 rows
    w2: torch.Tensor           # [E, (D/128)*(I/64), rows, 256] uint8
    dim: int
    inter: int
    alphas: tuple = ()         # (gate, up, down) fp32 [E] times ACC_FIX (undoes the decode's 2^-ACC_FIX)


def prepare_experts(experts: Experts) -> Experts:
    """Repack fp4 experts into the kernel's fragment-order records once, at load (experts.packed). Returns experts."""
    if experts.fmt not in FP4_GROUP:
        experts.packed = None
        return experts
    E, two_i, d2 = experts.w13.shape
    inter, dim = two_i // 2, 2 * d2
    order = _gate_up_row_order(inter, experts.w13.device)
    w13 = experts.w13.view(torch.uint8)[:, order]
    s13 = experts.w13_scale.view(torch.uint8)[:, order]
    experts.packed = PackedExperts(
        fmt=experts.fmt,
        w13=repack_fp4(w13, s13, experts.fmt),
        w2=repack_fp4(experts.w2.view(torch.uint8), experts.w2_scale.view(torch.uint8), experts.fmt),
        dim=dim, inter=inter,
        alphas=tuple(a.to(torch.float32) * ACC_FIX for a in (experts.alpha_gate, experts.alpha_up,
                                                             experts.alpha_down)))
    return experts


def pick_tile_n(num_tokens: int, top_k: int, num_experts: int) -> int:
    """Token tile: the smallest of 8..128 covering the average rows per hit expert. (v4 tried mean + 2 sd: no gain at
    T=256, where an expert's 2nd tile is read right after its 1st and hits L2, and +19% at T=1024 with tile_n 64.)"""
    rows = num_tokens * top_k
    per_expert = rows / max(1, min(num_experts, rows))
    for n in (8, 16, 32, 64):
        if per_expert <= n:
            break
    else:
        return 128
    if TILE_N_SD and n <= 8:      # decode: cover mean + TILE_N_SD sd (Poisson), so few experts need a 2nd tile
        wide = per_expert + TILE_N_SD * math.sqrt(per_expert)
        n = 8 if wide <= 8 else 16
    return n


def max_tiles(rows: int, num_experts: int, tile_n: int) -> int:
    """Token-tile table size: every hit expert adds at most one partial tile."""
    return min(num_experts, rows) + (rows + tile_n - 1) // tile_n


def route_tiles(topk_ids: torch.Tensor, num_experts: int, tile_n: int):
    """Device-side routing metadata, no host sync. topk_ids [T, k] ->
    order [T*k] (slot ids sorted by expert, skipped slots last), pos [T*k] (sorted row of each slot, R for skipped),
    tiles [max_tiles, 3] int32 (expert, first sorted row, rows; rows = 0 for unused table entries)."""
    T, k = topk_ids.shape
    R = T * k
    E = num_experts
    flat = topk_ids.reshape(-1).to(torch.int64)
    flat = torch.where((flat >= 0) & (flat < E), flat, torch.full_like(flat, E))
    order = torch.argsort(flat, stable=True)
    counts = torch.zeros(E + 1, dtype=torch.int64, device=flat.device).scatter_add_(0, flat, torch.ones_like(flat))
    starts = torch.cumsum(counts, 0) - counts
    ntiles = (counts[:E] + tile_n - 1) // tile_n
    tile_end = torch.cumsum(ntiles, 0)
    j = torch.arange(max_tiles(R, E, tile_n), device=flat.device)
    e = torch.searchsorted(tile_end, j, right=True)
    ec = e.clamp(max=E - 1)
    row0 = starts[ec] + (j - (tile_end[ec] - ntiles[ec])) * tile_n
    rows = (starts[ec] + counts[ec] - row0).clamp(0, tile_n)
    rows = torch.where(e < E, rows, torch.zeros_like(rows))
    tiles = torch.stack([ec, row0, rows], dim=1).to(torch.int32)
    pos = torch.empty_like(order)
    pos[order] = torch.arange(R, device=flat.device)
    pos = torch.where(flat < E, pos, torch.full_like(pos, R))
    return order, pos, tiles


# ----------------------------------------------------------------------------------------------------------------
# CuTe DSL kernel
try:
    import cutlass
    import cutlass.cute as cute
    import cutlass.pipeline as pipeline
    import cutlass.utils.hopper_helpers as sm90_utils
    from cutlass import Int32, Int64, Float32, BFloat16, Uint8, const_expr
    from cutlass.cutlass_dsl import T as _T, dsl_user_op
    from cutlass._mlir import ir as _ir
    from cutlass._mlir.dialects import llvm as _llvm
    from cutlass.cute.nvgpu import warpgroup, cpasync, OperandMajorMode
    from cutlass.tensor_utils import LayoutEnum
    HAVE_CUTE = True
except Exception as _e:   # noqa: BLE001 - any import problem means "no CuTe DSL here"
    HAVE_CUTE = False
    _CUTE_IMPORT_ERROR = repr(_e)

if HAVE_CUTE:
    _I32X4 = None

    def _struct4(res, loc, ip):
        return tuple(Int32(_llvm.extractvalue(_T.i32(), res, [i], loc=loc, ip=ip)) for i in range(4))

    def _rotl_no_wrap(dst: str, r: int) -> str:
        """$6 rotated left by r, for a rotation whose mask keeps no wrapped bit: a plain shift, which ptxas issues
        as IMAD.SHL on the FMA pipe (DECODE_SHIFT "shl"), or the funnel shift SHF.L.W on the ALU pipe ("rot")."""
        if DECODE_SHIFT == "shl":
            return f"shl.b32 {dst}, $6, {r};\n"
        return f"shf.l.wrap.b32 {dst}, $6, $6, {r};\n"

    def _decode_asm(half: int = -1) -> str:
        """half -1: $4, $5 are bf16x2 (s, s) scales; half 0 | 1: $4, $5 hold two scales (s_kb, s_kb+1) and the low |
        high one is broadcast (ptxas folds the broadcast into HMUL2's .H0_H0 / .H1_H1 operand swizzle)."""
        m6, m14 = _R3_MASK
        pm = _BF16_PAIR_MASK
        if half >= 0:
            pick = ("{\n.reg .b16 a0, a1, b0, b1;\n.reg .b32 sa, sb;\n"
                    "mov.b32 {a0, a1}, $4;\nmov.b32 {b0, b1}, $5;\n"
                    f"mov.b32 sa, {{a{half}, a{half}}};\nmov.b32 sb, {{b{half}, b{half}}};\n")
            body = _decode_asm().replace("$4", "sa").replace("$5", "sb")
            return pick + body + "}"
        return (
            "{\n.reg .b32 d0, d1, d2, d3, t, u;\n"
            f"and.b32 d0, $6, {pm:#x};\n"
            f"{_rotl_no_wrap('t', _ROT[1][0])}and.b32 d1, t, {pm:#x};\n"
            f"shf.l.wrap.b32 t, $6, $6, {_ROT[2][0]};\nand.b32 d2, t, {pm:#x};\n"
            f"{_rotl_no_wrap('t', 6)}shf.l.wrap.b32 u, $6, $6, 14;\n"
            f"and.b32 t, t, {m6:#x};\nand.b32 u, u, {m14:#x};\nor.b32 d3, t, u;\n"
            "mul.rn.bf16x2 $0, d0, $4;\nmul.rn.bf16x2 $1, d1, $5;\n"
            "mul.rn.bf16x2 $2, d2, $4;\nmul.rn.bf16x2 $3, d3, $5;\n}")

    @dsl_user_op
    def decode_fp4x8_scaled(word: Int32, scale_r: Int32, scale_r8: Int32, half: int = -1, *, loc=None, ip=None):
        """One stored code word (8 e2m1) + bf16x2 scales (s_r, s_r), (s_r8, s_r8) -> the 4 bf16x2 fragment
        registers R0..R3 (rows r, r+8, r, r+8) times their scale: rotate + mask places the bits (see _ROT).
        half 0 | 1: the scale registers hold two blocks' scales; the low | high one is used."""
        res = _llvm.inline_asm(
            _ir.Type.parse("!llvm.struct<(i32, i32, i32, i32)>"),
            [Int32(scale_r).ir_value(loc=loc, ip=ip), Int32(scale_r8).ir_value(loc=loc, ip=ip),
             Int32(word).ir_value(loc=loc, ip=ip)],
            _decode_asm(half), "=r,=r,=r,=r,r,r,r", has_side_effects=False, loc=loc, ip=ip)
        return _struct4(res, loc, ip)

    @dsl_user_op
    def scale_pair_bf16x2(word: Int32, byte: int, fmt: str, byte_hi: int = -1, *, loc=None, ip=None) -> Int32:
        """Stored scale byte `byte` of word -> bf16x2 (s, s) with s = bf16(scale * 2^SCALE_EXP): prmt + mad.
        byte_hi >= 0: (s[byte], s[byte_hi]) instead (two blocks' scales in one register)."""
        shift, base = (4, (SCALE_EXP + 118) << 7) if fmt == "nvfp4" else (7, SCALE_EXP << 7)
        sel = 0x4040 | byte | ((byte if byte_hi < 0 else byte_hi) << 8)
        asm = (f"{{\n.reg .b32 t;\nprmt.b32 t, $1, 0, {sel:#x};\n"
               f"mad.lo.u32 $0, t, {1 << shift}, {base | (base << 16):#x};\n}}")
        return Int32(_llvm.inline_asm(_T.i32(), [Int32(word).ir_value(loc=loc, ip=ip)], asm, "=r,r",
                                      has_side_effects=False, loc=loc, ip=ip))

    class Fp4GroupedGemm:
        """One grouped GEMM over experts: out[rows of expert e, cols] = B[rows] · W_e^T (W_e fp4, decoded to bf16).

        swiglu=True (GEMM1): W = interleaved w13, epilogue a = w_route·silu(min(h·α_gate, L))·clamp(u·α_up, ±L)
        -> bf16 out [rows, I]. swiglu=False (GEMM2): W = w2, out = acc·α_down -> bf16 [rows, D] (one row per slot).
        """

        def __init__(self, fmt: str, tile_n: int, k_dim: int, n_out: int, swiglu: bool, k_splits: int = 1,
                     smem_budget: int = 72 * 1024, pdl: bool = False, wait_first: bool = False, ring: tuple = ()):
            self.fmt, self.tile_n, self.k_dim, self.n_out, self.swiglu = fmt, tile_n, k_dim, n_out, swiglu
            self.wait_first = wait_first   # PDL: the tile table comes from the kernel right before (fused gather)
            self.k_splits = k_splits
            self.pdl = pdl          # programmatic dependent launch: weights prefetched before the previous kernel ends
            assert (k_dim // TILE_K) % (2 * k_splits) == 0, "each K slice needs an even number of 64-k tiles"
            self.k_tiles = k_dim // TILE_K // k_splits           # k-tiles per CTA (one K slice)
            self.m_tiles = (2 * n_out if swiglu else n_out) // TILE_M
            self.rec_rows = record_bytes(fmt) // REC_ROW
            stage_bytes = record_bytes(fmt) + tile_n * TILE_K * 2
            self.stages = max(3, min(10, self.k_tiles, smem_budget // stage_bytes))
            self.threads = 128
            # ring = (stages, refill warps): the main loop unrolled over the stage ring (static smem addresses and
            # barrier indices), no empty barriers (a stage is free once this warp's wait_group(1) shows its wgmma
            # done: that wgmma needed every warp's decoded fragment), refills spread over the warps.
            self.ring = tuple(ring)
            if self.ring:
                stages, self.refill_warps = self.ring
                while self.k_tiles % stages or stages % 2:         # a whole number of rings, even (frag buffers)
                    stages -= 1
                assert stages >= 2, "the ring main loop needs an even number of k-tiles per K slice"
                self.stages = stages

        @cute.jit
        def __call__(self, mW: cute.Tensor, mB: cute.Tensor, mOut: cute.Tensor, mTiles: cute.Tensor,
                     mAlpha0: cute.Tensor, mAlpha1: cute.Tensor, mRowW: cute.Tensor, limit: Float32,
                     mPartial: cute.Tensor, mCount: cute.Tensor, stream):
            tiled_mma = sm90_utils.make_trivial_tiled_mma(
                BFloat16, BFloat16, OperandMajorMode.K, OperandMajorMode.K, Float32, (1, 1, 1),
                tiler_mn=(64, self.tile_n), a_source=warpgroup.OperandSource.RMEM)
            w_smem_layout = cute.make_layout((REC_ROW, self.rec_rows, self.stages))
            b_smem_layout = sm90_utils.make_smem_layout_b(
                LayoutEnum.ROW_MAJOR, (TILE_M, self.tile_n, TILE_K), BFloat16, self.stages)
            tma_w, tma_mW = cpasync.make_tiled_tma_atom(
                cpasync.CopyBulkTensorTileG2SOp(), mW, cute.slice_(w_smem_layout, (None, None, 0)),
                (REC_ROW, self.rec_rows))
            tma_b, tma_mB = cpasync.make_tiled_tma_atom(
                cpasync.CopyBulkTensorTileG2SOp(), mB, cute.slice_(b_smem_layout, (None, None, 0)),
                (self.tile_n, TILE_K))

            @cute.struct
            class SharedStorage:
                bars: cute.struct.MemRange[cutlass.Int64, self.stages * 2]
                sW: cute.struct.Align[cute.struct.MemRange[Uint8, cute.cosize(w_smem_layout)], 1024]
                sB: cute.struct.Align[cute.struct.MemRange[BFloat16, cute.cosize(b_smem_layout)], 1024]
                arrived: cute.struct.MemRange[Int32, 4]

            self.shared_storage = SharedStorage
            num_tiles = cute.size(mTiles, mode=[0])
            # one CTA per (token tile, row tile, K slice)
            self.kernel(tiled_mma, tma_w, tma_mW, tma_b, tma_mB, mOut, mTiles, mAlpha0, mAlpha1, mRowW, limit,
                        mPartial, mCount, w_smem_layout, b_smem_layout).launch(
                grid=[num_tiles, self.m_tiles, self.k_splits], block=[self.threads, 1, 1], stream=stream,
                use_pdl=self.pdl)

        @cute.kernel
        def kernel(self, tiled_mma: cute.TiledMma, tma_w: cute.CopyAtom, mW: cute.Tensor, tma_b: cute.CopyAtom,
                   mB: cute.Tensor, mOut: cute.Tensor, mTiles: cute.Tensor, mAlpha0: cute.Tensor,
                   mAlpha1: cute.Tensor, mRowW: cute.Tensor, limit: Float32, mPartial: cute.Tensor,
                   mCount: cute.Tensor, w_smem_layout: cute.Layout, b_smem_layout: cute.ComposedLayout):
            tidx, _, _ = cute.arch.thread_idx()
            bid_t, bid_m, bid_k = cute.arch.block_idx()
            warp_idx = cute.arch.make_warp_uniform(cute.arch.warp_idx())
            if const_expr(self.pdl and not self.wait_first):
                # the next kernel may be scheduled once every CTA of this one has started (it waits for our end
                # before touching what we write); the tile table and the weights were ready before this kernel
                cute.arch.griddepcontrol_launch_dependents()
            if const_expr(self.pdl and self.wait_first):
                # the kernel right before wrote the tile table (routing + gather): wait for it first, and let the
                # next kernel start only after that (it reads the table before its own wait)
                cute.arch.griddepcontrol_wait()
                cute.arch.griddepcontrol_launch_dependents()
            expert = mTiles[bid_t, 0]
            row0 = mTiles[bid_t, 1]
            nrows = mTiles[bid_t, 2]
            if nrows > 0:
                if warp_idx == 0:
                    cpasync.prefetch_descriptor(tma_w)
                    cpasync.prefetch_descriptor(tma_b)
                smem = cutlass.utils.SmemAllocator()
                storage = smem.allocate(self.shared_storage)
                tx_bytes = record_bytes(self.fmt) + self.tile_n * TILE_K * 2
                pipe = pipeline.PipelineTmaAsync.create(
                    barrier_storage=storage.bars.data_ptr(), num_stages=self.stages,
                    producer_group=pipeline.CooperativeGroup(pipeline.Agent.Thread),
                    consumer_group=pipeline.CooperativeGroup(pipeline.Agent.Thread, self.threads // 32),
                    tx_count=tx_bytes, cta_layout_vmnk=cute.make_layout((1, 1, 1, 1)), defer_sync=False)
                sW = storage.sW.get_tensor(w_smem_layout)
                sB = storage.sB.get_tensor(b_smem_layout.outer, swizzle=b_smem_layout.inner)

                # TMA views: weight records of this (expert, m-tile), token rows row0.. of the sorted activations
                gW = mW[None, None, None, expert]                                   # (256, rows, MK)
                tWsW, tWgW = cpasync.tma_partition(tma_w, 0, cute.make_layout(1),
                                                   cute.group_modes(sW, 0, 2), cute.group_modes(gW, 0, 2))
                gB = cute.local_tile(cute.domain_offset((row0, 0), mB), (self.tile_n, TILE_K), (0, None))
                tBsB, tBgB = cpasync.tma_partition(tma_b, 0, cute.make_layout(1),
                                                   cute.group_modes(sB, 0, 2), cute.group_modes(gB, 0, 2))
                kt0 = bid_k * self.k_tiles                                    # first k-tile of this K slice
                rec0 = bid_m * self.k_tiles * self.k_splits + kt0

                thr_mma = tiled_mma.get_slice(tidx)
                tCsB = thr_mma.partition_B(sB)
                tCrB = tiled_mma.make_fragment_B(tCsB)
                frag0 = tiled_mma.make_fragment_A(thr_mma.partition_shape_A((TILE_M, TILE_K)))
                frag1 = tiled_mma.make_fragment_A(thr_mma.partition_shape_A((TILE_M, TILE_K)))
                frags = (cute.recast_tensor(frag0, Int32), cute.recast_tensor(frag1, Int32))
                acc = cute.make_rmem_tensor(thr_mma.partition_shape_C((TILE_M, self.tile_n)), Float32)
                acc.fill(0.0)
                tiled_mma.set(warpgroup.Field.ACCUMULATE, True)

                # this thread's words in a stage: codes [4 words] per atom, scale words after the codes
                sW32 = cute.make_tensor(cute.recast_ptr(sW.iterator, dtype=Int32),
                                        cute.make_layout((4, 128, 2, self.stages),
                                                         stride=(1, 4, 512, self.rec_rows * REC_ROW // 4)))
                nw = _scale_words_per_atom(self.fmt)                   # per quad (rows r, r+8), per atom
                sS32 = cute.make_tensor(cute.recast_ptr(sW.iterator, dtype=Int32) + CODE_BYTES // 4,
                                        cute.make_layout((nw, 32, 2, self.stages),
                                                         stride=(1, nw, 32 * nw, self.rec_rows * REC_ROW // 4)))
                codes = cute.make_rmem_tensor((4, 2), Int32)
                scl = cute.make_rmem_tensor((nw, 2), Int32)
                quad = tidx // 4

                k_tiles = self.k_tiles
                if const_expr(self.ring):
                    self.ring_mainloop(pipe, tma_w, tWgW, tWsW, tma_b, tBgB, tBsB, rec0, kt0, tiled_mma, acc, frag0,
                                       frag1, tCrB, sW32, sS32, codes, scl, tidx, quad, warp_idx, nrows)
                else:
                    prod = pipeline.make_pipeline_state(pipeline.PipelineUserType.Producer, self.stages)
                    cons = pipeline.make_pipeline_state(pipeline.PipelineUserType.Consumer, self.stages)
                    rel = pipeline.make_pipeline_state(pipeline.PipelineUserType.Consumer, self.stages)
                    # prologue: the weight records of the first stages (they do not depend on the previous kernel),
                    # then (PDL: after the previous kernel has ended) the token tiles of the same stages
                    n_pro = min(self.stages, k_tiles)
                    if warp_idx == 0:
                        for _ in cutlass.range(n_pro, unroll=1):
                            pipe.producer_acquire(prod)
                            cute.copy(tma_w, tWgW[(None, rec0 + prod.count)], tWsW[(None, prod.index)],
                                      tma_bar_ptr=pipe.producer_get_barrier(prod))
                            pipe.producer_commit(prod)
                            prod.advance()
                    if const_expr(self.pdl and not self.wait_first):
                        cute.arch.griddepcontrol_wait()
                    if warp_idx == 0:
                        pro_b = pipeline.make_pipeline_state(pipeline.PipelineUserType.Producer, self.stages)
                        for _ in cutlass.range(n_pro, unroll=1):
                            cute.copy(tma_b, tBgB[(None, kt0 + pro_b.count)], tBsB[(None, pro_b.index)],
                                      tma_bar_ptr=pipe.producer_get_barrier(pro_b))
                            pro_b.advance()

                    for kt in cutlass.range(0, k_tiles, 2, unroll=1):
                        for h in cutlass.range_constexpr(2):
                            pipe.consumer_wait(cons)
                            self.mma_k_tile(tiled_mma, acc, frags[h], (frag0, frag1)[h], tCrB, sW32, sS32, codes, scl,
                                            tidx, quad, cons.index)
                            warpgroup.wait_group(1)
                            if kt + h > 0:
                                pipe.consumer_release(rel)
                                rel.advance()
                            cons.advance()
                            # refill the stage just released (tile k-1) with tile k-1+stages
                            if warp_idx == 0 and kt + h > 0:
                                if prod.count < k_tiles:
                                    pipe.producer_acquire(prod)
                                    cute.copy(tma_w, tWgW[(None, rec0 + prod.count)], tWsW[(None, prod.index)],
                                              tma_bar_ptr=pipe.producer_get_barrier(prod))
                                    cute.copy(tma_b, tBgB[(None, kt0 + prod.count)], tBsB[(None, prod.index)],
                                              tma_bar_ptr=pipe.producer_get_barrier(prod))
                                    pipe.producer_commit(prod)
                                    prod.advance()
                    warpgroup.wait_group(0)

                # epilogue: acc element (m, n) = weight row m of the tile, token n of the tile
                cC = cute.make_identity_tensor((TILE_M, self.tile_n))
                tCcC = thr_mma.partition_C(cC)
                if const_expr(self.k_splits == 1):
                    self.epilogue(acc, tCcC, mOut, mAlpha0, mAlpha1, mRowW, limit, expert, row0, nrows, bid_m)
                else:
                    # split-K: every slice stores its fp32 partial; the last slice to arrive (counter per tile)
                    # sums all partials in slice order 0..S-1 (so the result does not depend on who is last),
                    # resets the counter and runs the epilogue.
                    col0 = bid_m * TILE_M
                    for v in cutlass.range_constexpr(cute.size(acc, mode=[0])):
                        for a in cutlass.range_constexpr(2):
                            m, n = tCcC[v, a, 0]
                            if n < nrows:
                                mPartial[bid_k, row0 + n, col0 + m] = acc[v, a, 0]
                    cute.arch.fence_acq_rel_gpu()
                    cute.arch.sync_threads()
                    arrived = storage.arrived.get_tensor(cute.make_layout(4))
                    counter = bid_t * self.m_tiles + bid_m
                    if tidx == 0:
                        arrived[0] = cute.arch.atomic_add(mCount.iterator + counter, Int32(1), sem="acq_rel",
                                                          scope="gpu")
                    cute.arch.sync_threads()
                    if arrived[0] == self.k_splits - 1:
                        cute.arch.fence_acq_rel_gpu()
                        acc.fill(0.0)
                        for z in cutlass.range_constexpr(self.k_splits):
                            for v in cutlass.range_constexpr(cute.size(acc, mode=[0])):
                                for a in cutlass.range_constexpr(2):
                                    m, n = tCcC[v, a, 0]
                                    if n < nrows:
                                        off = cute.crd2idx((z, row0 + n, col0 + m), mPartial.layout)
                                        acc[v, a, 0] = acc[v, a, 0] + cute.arch.load(mPartial.iterator + off,
                                                                                      Float32, cop="cg")
                        if tidx == 0:
                            mCount[counter] = 0
                        self.epilogue(acc, tCcC, mOut, mAlpha0, mAlpha1, mRowW, limit, expert, row0, nrows,
                                      bid_m)

        @cute.jit
        def ring_mainloop(self, pipe, tma_w, tWgW, tWsW, tma_b, tBgB, tBsB, rec0, kt0, tiled_mma, acc, frag0, frag1,
                          tCrB, sW32, sS32, codes, scl, tidx, quad, warp_idx, nrows):
            """Main loop unrolled over the ring of S stages: k-tile r*S + s sits in stage s (static smem offsets and
            barrier addresses); full[s] completes once per ring round (parity r & 1). No empty barriers: after this
            warp's wait_group(1) for tile k, tile k-1's wgmma is done, and it could only start once every warp of the
            warpgroup had read its codes from smem and issued it, so stage (k-1) % S is free; warp s % refill_warps
            refills it (the TMA issue work is spread over the warps instead of stalling warp 0)."""
            S = self.stages
            rounds = self.k_tiles // S
            full = pipe.sync_object_full
            tx = record_bytes(self.fmt) + self.tile_n * TILE_K * 2
            frags = (cute.recast_tensor(frag0, Int32), cute.recast_tensor(frag1, Int32))
            # prologue: weights of every stage first (independent of the previous kernel), then (PDL: once the
            # previous kernel has ended) the token tiles
            if warp_idx == 0:
                for s in cutlass.range_constexpr(S):
                    full.arrive_and_expect_tx(s, tx)
                    cute.copy(tma_w, tWgW[(None, rec0 + s)], tWsW[(None, s)], tma_bar_ptr=full.get_barrier(s))
            if const_expr(self.pdl and not self.wait_first):
                cute.arch.griddepcontrol_wait()
            if warp_idx == 0:
                for s in cutlass.range_constexpr(S):
                    cute.copy(tma_b, tBgB[(None, kt0 + s)], tBsB[(None, s)], tma_bar_ptr=full.get_barrier(s))
            for r in cutlass.range(rounds, unroll=1):
                phase = r & 1
                # B descriptors of stage s + zr (zr = 0, but varies with r and a loaded value for the compiler):
                # with static stages LLVM hoists all 4S 64-bit descriptors out of the loop and ptxas keeps them in
                # 8S registers, moving each into uniform registers before its wgmma
                zr = (r + nrows) >> 30
                for s in cutlass.range_constexpr(S):
                    full.wait(s, phase)
                    self.mma_k_tile(tiled_mma, acc, frags[s % 2], (frag0, frag1)[s % 2], tCrB, sW32, sS32, codes,
                                    scl, tidx, quad, s, s + zr)
                    warpgroup.wait_group(1)
                    # refill stage q = (s - 1) % S (k-tile r*S + s - 1, now done) with k-tile r*S + s - 1 + S
                    q = (s - 1) % S
                    kt_new = r * S + s - 1 + S
                    go = r > 0 if const_expr(s == 0) else r < rounds - 1
                    if go and warp_idx == s % self.refill_warps:
                        full.arrive_and_expect_tx(q, tx)
                        cute.copy(tma_w, tWgW[(None, rec0 + kt_new)], tWsW[(None, q)], tma_bar_ptr=full.get_barrier(q))
                        cute.copy(tma_b, tBgB[(None, kt0 + kt_new)], tBsB[(None, q)], tma_bar_ptr=full.get_barrier(q))
            warpgroup.wait_group(0)

        @cute.jit
        def mma_k_tile(self, tiled_mma, acc, frag, frag_bf16, tCrB, sW32, sS32, codes, scl, tidx, quad, stage,
                       stage_b=None):
            """One 64-k tile from smem stage `stage`: load this thread's code and scale words, decode them into the
            A fragment (frag: its Int32 view), issue the 4 k16 wgmmas as one commit group (not waited for).
            Block scales: one prmt + mad per two k16 blocks; the decode broadcasts the half it needs."""
            for a in cutlass.range_constexpr(2):
                cute.autovec_copy(sW32[None, tidx, a, stage], codes[None, a])
            for a in cutlass.range_constexpr(2):
                cute.autovec_copy(sS32[None, quad, a, stage], scl[None, a])
            for a in cutlass.range_constexpr(2):
                if const_expr(self.fmt == "nvfp4"):
                    # per atom: word 0 = s_r of k16 blocks 0..3, word 1 = s_r8
                    pr = (scale_pair_bf16x2(scl[0, a], 0, self.fmt, 1),
                          scale_pair_bf16x2(scl[0, a], 2, self.fmt, 3))
                    pr8 = (scale_pair_bf16x2(scl[1, a], 0, self.fmt, 1),
                           scale_pair_bf16x2(scl[1, a], 2, self.fmt, 3))
                else:
                    # per atom: one word = (s_r, s_r) of k32 groups 0, 1, then (s_r8, s_r8)
                    p_r = scale_pair_bf16x2(scl[0, a], 0, self.fmt, 1)
                    p_r8 = scale_pair_bf16x2(scl[0, a], 2, self.fmt, 3)
                    pr, pr8 = (p_r, p_r), (p_r8, p_r8)
                for kb in cutlass.range_constexpr(4):
                    if const_expr(self.fmt == "nvfp4"):
                        r0, r1, r2, r3 = decode_fp4x8_scaled(codes[kb, a], pr[kb // 2], pr8[kb // 2], kb % 2)
                    else:
                        r0, r1, r2, r3 = decode_fp4x8_scaled(codes[kb, a], pr[0], pr8[0], kb // 2)
                    frag[(0, 0, 0), a, kb] = r0
                    frag[(0, 1, 0), a, kb] = r1
                    frag[(0, 0, 1), a, kb] = r2
                    frag[(0, 1, 1), a, kb] = r3
            warpgroup.fence()
            sb = stage if const_expr(stage_b is None) else stage_b
            for kb in cutlass.range_constexpr(4):
                cute.gemm(tiled_mma, acc, frag_bf16[None, None, kb], tCrB[None, None, kb, sb], acc)
            warpgroup.commit_group()

        @cute.jit
        def epilogue(self, acc, tCcC, mOut: cute.Tensor, mAlpha0: cute.Tensor, mAlpha1: cute.Tensor,
                     mRowW: cute.Tensor, limit: Float32, expert, row0, nrows, bid_m):
            if const_expr(self.swiglu):
                a_gate = mAlpha0[expert]
                a_up = mAlpha1[expert]
                for v in cutlass.range_constexpr(cute.size(acc, mode=[0])):
                    m, n = tCcC[v, 0, 0]
                    if n < nrows:
                        hh = cute.math.min(acc[v, 0, 0] * a_gate, limit)
                        uu = cute.math.max(cute.math.min(acc[v, 1, 0] * a_up, limit), -limit)
                        act = mRowW[row0 + n] * hh / (1.0 + cute.math.exp(-hh)) * uu
                        mOut[row0 + n, bid_m * 64 + m] = act.to(BFloat16)
            else:
                a_down = mAlpha0[expert]
                for v in cutlass.range_constexpr(cute.size(acc, mode=[0])):
                    for a in cutlass.range_constexpr(2):
                        m, n = tCcC[v, a, 0]
                        if n < nrows:
                            mOut[row0 + n, bid_m * TILE_M + m] = (acc[v, a, 0] * a_down).to(BFloat16)

    class MoeCombine:
        """y[t] = sum over slots j = 0..k-1 (in this order, fp32) of y_rows[pos[t*k + j]] -> x.dtype (bf16); slots with
        pos = R (skipped ids) add nothing. One thread per 8 columns (16-B loads and stores), grid (T, D / (8 threads)).
        by_slot_experts = E > 0: y_rows is by routed slot (row t*k + j) and mPos holds topk_ids: slot j adds its row
        where 0 <= id < E (the same sum in the same order)."""

        def __init__(self, top_k: int, dim: int, pdl: bool = False, by_slot_experts: int = 0):
            self.k, self.dim, self.pdl, self.E = top_k, dim, pdl, by_slot_experts
            vecs = dim // 8
            self.threads = 128
            while vecs % self.threads:
                self.threads //= 2
            self.col_blocks = vecs // self.threads

        @cute.jit
        def __call__(self, mY: cute.Tensor, mPos: cute.Tensor, mOut: cute.Tensor, stream):
            num_tokens = cute.size(mOut, mode=[0])
            self.kernel(mY, mPos, mOut).launch(grid=[num_tokens, self.col_blocks, 1], block=[self.threads, 1, 1],
                                               stream=stream, use_pdl=self.pdl)

        @cute.kernel
        def kernel(self, mY: cute.Tensor, mPos: cute.Tensor, mOut: cute.Tensor):
            tidx, _, _ = cute.arch.thread_idx()
            tok, cb, _ = cute.arch.block_idx()
            R = cute.size(mY, mode=[0])
            vec = cb * self.threads + tidx                         # which 8-column group of D
            if const_expr(self.pdl):
                cute.arch.griddepcontrol_wait()                    # y_rows is written by the previous kernel
            acc = cute.make_rmem_tensor((1, 8), Float32)
            acc.fill(0.0)
            v = cute.make_rmem_tensor((1, 8), BFloat16)
            for j in cutlass.range_constexpr(self.k):
                p = mPos[tok * self.k + j]
                if const_expr(self.E > 0):
                    if p >= 0 and p < self.E:                      # p = the slot's expert id
                        cute.autovec_copy(cute.local_tile(mY, (1, 8), (tok * self.k + j, vec)), v)
                        acc.store(acc.load() + v.load().to(Float32))
                else:
                    if p < R:
                        cute.autovec_copy(cute.local_tile(mY, (1, 8), (p, vec)), v)
                        acc.store(acc.load() + v.load().to(Float32))
            v.store(acc.load().to(BFloat16))
            cute.autovec_copy(v, cute.local_tile(mOut, (1, 8), (tok, vec)))

    class MoeRouting:
        """Routing metadata in one CTA (replaces ~25 small torch ops): per slot s of the flat [T*k] routing, its
        sorted row p (grouped by expert; order inside an expert is arbitrary but results do not depend on it):
        src_tok[p] = s // k, row_w[p] = w[s], pos[s] = p (R for skipped ids), and the token-tile table
        tiles[j] = (expert, first row, rows) (rows = 0 past the used entries)."""

        def __init__(self, num_experts: int, top_k: int, tile_n: int):
            self.E, self.k, self.tile_n, self.threads = num_experts, top_k, tile_n, 1024

        @cute.jit
        def __call__(self, mIds: cute.Tensor, mW: cute.Tensor, mSrc: cute.Tensor, mRowW: cute.Tensor,
                     mPos: cute.Tensor, mTiles: cute.Tensor, stream):
            @cute.struct
            class SharedStorage:
                cnt: cute.struct.MemRange[Int32, self.E + 1]
                start: cute.struct.MemRange[Int32, self.E + 1]
                tstart: cute.struct.MemRange[Int32, self.E + 2]

            self.shared_storage = SharedStorage
            self.kernel(mIds, mW, mSrc, mRowW, mPos, mTiles).launch(
                grid=[1, 1, 1], block=[self.threads, 1, 1], stream=stream)

        @cute.kernel
        def kernel(self, mIds: cute.Tensor, mW: cute.Tensor, mSrc: cute.Tensor, mRowW: cute.Tensor,
                   mPos: cute.Tensor, mTiles: cute.Tensor):
            self.route(mIds, mW, mSrc, mRowW, mPos, mTiles)

        @cute.jit
        def route(self, mIds: cute.Tensor, mW: cute.Tensor, mSrc: cute.Tensor, mRowW: cute.Tensor,
                  mPos: cute.Tensor, mTiles: cute.Tensor):
            tidx, _, _ = cute.arch.thread_idx()
            E = self.E
            R = cute.size(mIds, mode=[0])
            n_tab = cute.size(mTiles, mode=[0])
            smem = cutlass.utils.SmemAllocator()
            storage = smem.allocate(self.shared_storage)
            cnt = storage.cnt.get_tensor(cute.make_layout(E + 1))
            start = storage.start.get_tensor(cute.make_layout(E + 1))
            tstart = storage.tstart.get_tensor(cute.make_layout(E + 2))
            for e in cutlass.range(tidx, E + 1, self.threads, unroll=1):
                cnt[e] = 0
            cute.arch.sync_threads()
            for s in cutlass.range(tidx, R, self.threads, unroll=1):
                e = mIds[s]
                if e < 0 or e >= E:
                    e = E
                mPos[s] = cute.arch.atomic_add(cnt.iterator + e, Int32(1), scope="cta")   # rank inside e
            cute.arch.sync_threads()
            if tidx < 32:        # warp 0: exclusive prefix sums of rows and token tiles, 32 experts per step
                lane = tidx
                acc = Int32(0)
                tacc = Int32(0)
                for base in cutlass.range(0, E + 1, 32, unroll=1):
                    e = base + lane
                    c = Int32(0)
                    t = Int32(0)
                    if e <= E:
                        c = cnt[e]
                        if e < E:
                            t = (c + self.tile_n - 1) // self.tile_n
                    ci = c
                    ti = t
                    for d in cutlass.range_constexpr(5):          # inclusive warp scan
                        cu = cute.arch.shuffle_sync_up(ci, 1 << d)
                        tu = cute.arch.shuffle_sync_up(ti, 1 << d)
                        if lane >= (1 << d):
                            ci = ci + cu
                            ti = ti + tu
                    if e <= E:
                        start[e] = acc + ci - c
                        tstart[e] = tacc + ti - t
                    acc = acc + cute.arch.shuffle_sync(ci, 31)
                    tacc = tacc + cute.arch.shuffle_sync(ti, 31)
                if lane == 0:
                    tstart[E + 1] = tacc
            cute.arch.sync_threads()
            for s in cutlass.range(tidx, R, self.threads, unroll=1):
                e = mIds[s]
                if e < 0 or e >= E:
                    e = E
                p = start[e] + mPos[s]
                mSrc[p] = s // self.k
                mRowW[p] = mW[s]
                mPos[s] = p if e < E else R
            total = tstart[E]
            for j in cutlass.range(tidx, n_tab, self.threads, unroll=1):
                ex = Int32(0)
                r0 = Int32(0)
                nr = Int32(0)
                if j < total:
                    lo = Int32(0)          # largest e with tstart[e] <= j (experts with no tiles are skipped)
                    hi = Int32(E)
                    while hi - lo > 1:
                        mid = (lo + hi) // 2
                        if tstart[mid] <= j:
                            lo = mid
                        else:
                            hi = mid
                    ex = lo
                    t = j - tstart[lo]
                    r0 = start[lo] + t * self.tile_n
                    nr = cutlass.min(self.tile_n, cnt[lo] - t * self.tile_n)
                mTiles[j, 0] = ex
                mTiles[j, 1] = r0
                mTiles[j, 2] = nr

    class MoeRoutingGather(MoeRouting):
        """MoeRouting + the token gather x_sorted[p] = x[src_tok[p]] in the same CTA (16-B vectors; decode sizes
        only: one CTA copies R*D*2 bytes), which saves the index_select launch."""

        def __init__(self, num_experts: int, top_k: int, tile_n: int, dim: int):
            super().__init__(num_experts, top_k, tile_n)
            self.dim = dim

        @cute.jit
        def __call__(self, mIds: cute.Tensor, mW: cute.Tensor, mSrc: cute.Tensor, mRowW: cute.Tensor,
                     mPos: cute.Tensor, mTiles: cute.Tensor, mX: cute.Tensor, mXs: cute.Tensor, stream):
            @cute.struct
            class SharedStorage:
                cnt: cute.struct.MemRange[Int32, self.E + 1]
                start: cute.struct.MemRange[Int32, self.E + 1]
                tstart: cute.struct.MemRange[Int32, self.E + 2]

            self.shared_storage = SharedStorage
            self.kernel_gather(mIds, mW, mSrc, mRowW, mPos, mTiles, mX, mXs).launch(
                grid=[1, 1, 1], block=[self.threads, 1, 1], stream=stream)

        @cute.kernel
        def kernel_gather(self, mIds: cute.Tensor, mW: cute.Tensor, mSrc: cute.Tensor, mRowW: cute.Tensor,
                          mPos: cute.Tensor, mTiles: cute.Tensor, mX: cute.Tensor, mXs: cute.Tensor):
            # GEMM1 (PDL, wait_first) may start its CTAs now: it waits for our end before reading what we write
            cute.arch.griddepcontrol_launch_dependents()
            self.route(mIds, mW, mSrc, mRowW, mPos, mTiles)
            cute.arch.sync_threads()                     # src_tok (global, this CTA's writes) is complete
            tidx, _, _ = cute.arch.thread_idx()
            vecs = self.dim // 8
            R = cute.size(mIds, mode=[0])
            v = cute.make_rmem_tensor((1, 8), BFloat16)
            for i in cutlass.range(tidx, R * vecs, self.threads, unroll=1):
                p = i // vecs
                c = i - p * vecs
                cute.autovec_copy(cute.local_tile(mX, (1, 8), (mSrc[p], c)), v)
                cute.autovec_copy(v, cute.local_tile(mXs, (1, 8), (p, c)))

# ----------------------------------------------------------------------------------------------------------------
# Compile cache: in memory, and on disk as exported objects (the second process start loads instead of compiling).
_COMPILED: dict = {}
_CACHE_DIR = os.path.join(os.environ.get("NANO_DSV4_CACHE") or os.path.join(os.path.expanduser("~"), ".cache",
                                                                            "nano-dsv4"), "cute")
_COMPILE_NOTICE_SHOWN = False


def _cache_key(config: tuple) -> str:
    with open(__file__, "rb") as f:
        src = f.read()
    ver = getattr(cutlass, "__version__", "?") if HAVE_CUTE else "-"
    return hashlib.sha256(src + repr((ver, _target_arch(), config)).encode()).hexdigest()[:24]


def _target_arch() -> str:
    """The architecture compiles target: CUTE_DSL_ARCH, else the current GPU's (an object built for another chip,
    e.g. by a process that saw no GPU, must not be loaded from the disk cache)."""
    arch = os.environ.get("CUTE_DSL_ARCH")
    if arch:
        return arch
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        return f"sm_{major}{minor}"
    return "?"


def _load_or_compile(config: tuple, build):
    """Memory cache -> disk cache (exported object) -> compile + export. build() -> (callable object, fake args)."""
    fn = _COMPILED.get(config)
    if fn is not None:
        return fn
    key = _cache_key(config)
    name = f"nano_dsv4_{config[0]}_{key}"
    obj = os.path.join(_CACHE_DIR, name + ".o")
    if os.path.exists(obj):
        try:
            fn = getattr(cute.runtime.load_module(obj, enable_tvm_ffi=True), name)
        except Exception:   # noqa: BLE001 - a stale or broken object: recompile below
            fn = None
    if fn is None:
        global _COMPILE_NOTICE_SHOWN
        if not _COMPILE_NOTICE_SHOWN:      # a first run compiles dozens of kernels, seconds each: say why it waits
            _COMPILE_NOTICE_SHOWN = True
            print(f"nano-dsv4: compiling CuTe DSL kernels for {_target_arch()} on first use (cached in {_CACHE_DIR}; "
                  "later runs load them)", file=sys.stderr, flush=True)
        op, args = build()
        fn = cute.compile(op, *args, options="--enable-tvm-ffi")
        try:
            os.makedirs(_CACHE_DIR, exist_ok=True)
            tmp = obj + f".{os.getpid()}.tmp"
            fn.export_to_c(object_file_path=tmp, function_name=name)
            os.replace(tmp, obj)
        except Exception as e:   # noqa: BLE001 - the disk cache is an optimisation only
            print(f"nano-dsv4: could not write the kernel cache {obj}: {e}", file=sys.stderr)
    _COMPILED[config] = fn
    return fn


_ARRIVALS: dict = {}


def arrival_counters(device, n: int, minimum: int) -> torch.Tensor:
    """Zeroed int32 arrival counters for kernels whose last-arriving CTA finishes split work (it resets its counter,
    so the buffer is zero again after every launch). One buffer per (device, stream): launches on one stream run in
    order and can share it; launches on two streams (the parallel branches of a decode step) may overlap."""
    key = (device, torch.cuda.current_stream(device).cuda_stream)
    buf = _ARRIVALS.get(key)
    if buf is None or buf.numel() < n:
        buf = _ARRIVALS[key] = torch.zeros(max(n, minimum), dtype=torch.int32, device=device)
    return buf


def _compile_routing(num_experts: int, top_k: int, tile_n: int):
    def build():
        r, n_tab = cute.sym_int(), cute.sym_int()
        i32 = lambda shape: cute.runtime.make_fake_compact_tensor(Int32, shape, assumed_align=4)   # noqa: E731
        args = (i32((r,)), cute.runtime.make_fake_compact_tensor(Float32, (r,), assumed_align=4), i32((r,)),
                cute.runtime.make_fake_compact_tensor(Float32, (r,), assumed_align=4), i32((r,)),
                cute.runtime.make_fake_compact_tensor(Int32, (n_tab, 3), stride_order=(1, 0), assumed_align=4),
                cute.runtime.make_fake_stream(use_tvm_ffi_env_stream=True))
        return MoeRouting(num_experts, top_k, tile_n), args
    return _load_or_compile(("route", num_experts, top_k, tile_n), build)


def _compile_routing_gather(num_experts: int, top_k: int, tile_n: int, dim: int):
    def build():
        r, n_tab, t = cute.sym_int(), cute.sym_int(), cute.sym_int()
        i32 = lambda shape: cute.runtime.make_fake_compact_tensor(Int32, shape, assumed_align=4)   # noqa: E731
        bf16 = lambda rows: cute.runtime.make_fake_compact_tensor(BFloat16, (rows, dim), stride_order=(1, 0),  # noqa
                                                                  assumed_align=16)
        args = (i32((r,)), cute.runtime.make_fake_compact_tensor(Float32, (r,), assumed_align=4), i32((r,)),
                cute.runtime.make_fake_compact_tensor(Float32, (r,), assumed_align=4), i32((r,)),
                cute.runtime.make_fake_compact_tensor(Int32, (n_tab, 3), stride_order=(1, 0), assumed_align=4),
                bf16(t), bf16(r), cute.runtime.make_fake_stream(use_tvm_ffi_env_stream=True))
        return MoeRoutingGather(num_experts, top_k, tile_n, dim), args
    return _load_or_compile(("route_gather", num_experts, top_k, tile_n, dim), build)


def _compile_combine(top_k: int, dim: int, pdl: bool, by_slot_experts: int = 0):
    def build():
        rows, tokens = cute.sym_int(), cute.sym_int()
        args = (cute.runtime.make_fake_compact_tensor(BFloat16, (rows, dim), stride_order=(1, 0), assumed_align=16),
                cute.runtime.make_fake_compact_tensor(Int32, (cute.sym_int(),), assumed_align=4),
                cute.runtime.make_fake_compact_tensor(BFloat16, (tokens, dim), stride_order=(1, 0),
                                                      assumed_align=16),
                cute.runtime.make_fake_stream(use_tvm_ffi_env_stream=True))
        return MoeCombine(top_k, dim, pdl, by_slot_experts), args
    return _load_or_compile(("combine", top_k, dim, pdl) + ((by_slot_experts,) if by_slot_experts else ()), build)


def _compile_gemm(fmt: str, tile_n: int, k_dim: int, n_out: int, swiglu: bool, k_splits: int = 1,
                  smem_budget: int = 72 * 1024, pdl: bool = False, wait_first: bool = False, ring: tuple = ()):
    """Compiled Fp4GroupedGemm for one static config (TVM-FFI entry: call with torch tensors on the current stream);
    ring = (stages, refill warps): Fp4GroupedGemm's ring-unrolled main loop."""
    config = (fmt, tile_n, k_dim, n_out, swiglu, k_splits, smem_budget, pdl, wait_first, tuple(ring)) + _decode_key()

    def build():
        gemm = Fp4GroupedGemm(fmt, tile_n, k_dim, n_out, swiglu, k_splits, smem_budget, pdl, wait_first, ring)
        rows_b, rows_o, n_exp, n_tiles = (cute.sym_int() for _ in range(4))
        mk = gemm.m_tiles * gemm.k_tiles * gemm.k_splits
        rec = gemm.rec_rows * REC_ROW
        w = cute.runtime.make_fake_tensor(Uint8, (REC_ROW, gemm.rec_rows, mk, n_exp),
                                          stride=(1, REC_ROW, rec, cute.sym_int64(divisibility=rec)),
                                          assumed_align=128)
        b = cute.runtime.make_fake_compact_tensor(BFloat16, (rows_b, k_dim), stride_order=(1, 0), assumed_align=16)
        out = cute.runtime.make_fake_compact_tensor(BFloat16, (rows_o, n_out), stride_order=(1, 0),
                                                    assumed_align=16)
        tiles = cute.runtime.make_fake_compact_tensor(Int32, (n_tiles, 3), stride_order=(1, 0), assumed_align=4)
        alpha0 = cute.runtime.make_fake_compact_tensor(Float32, (n_exp,), assumed_align=4)
        alpha1 = cute.runtime.make_fake_compact_tensor(Float32, (n_exp,), assumed_align=4)
        row_w = cute.runtime.make_fake_compact_tensor(Float32, (cute.sym_int(),), assumed_align=4)
        partial = cute.runtime.make_fake_compact_tensor(Float32, (cute.sym_int(), cute.sym_int(), cute.sym_int()),
                                                        stride_order=(2, 1, 0), assumed_align=16)
        count = cute.runtime.make_fake_compact_tensor(Int32, (cute.sym_int(),), assumed_align=4)
        stream = cute.runtime.make_fake_stream(use_tvm_ffi_env_stream=True)
        return gemm, (w, b, out, tiles, alpha0, alpha1, row_w, Float32(0.0), partial, count, stream)
    return _load_or_compile(config, build)


USE_PDL = True                    # GEMMs + combine start (prefetch weights) while the previous kernel finishes
SPLIT_K = True                    # decode: split K over CTAs when too few (expert, row-tile) CTAs fill the GPU
SPLIT_MIN_K_TILES = 8             # fewest 64-k tiles per K slice
SPLIT_CTAS_PER_SM = 6             # split until about this many CTAs per SM
DECODE_SMEM_BUDGET = 40 * 1024    # pipeline smem per CTA for tile_n <= 16 (more CTAs per SM); else 72 KB
GATHER_MAX_ROWS = 24              # routed rows up to which the routing kernel gathers x itself (T <= 4 at top-6)
TILE_N_SD = 2                     # pick_tile_n: > 0 widens tile_n 8 to 16 where mean + TILE_N_SD sd rows > 8 (v6:
                                  # on the ring loop T=256 1178 vs 1212 us at tile_n 8, H200 R2 medians; T <= 128 keep 8)
DECODE_RING = True                # tile_n <= 16: Fp4GroupedGemm's main loop unrolled over the stage ring (v6)
RING_STAGES = 8                   # its stages (the largest even count <= this dividing the k-tiles per K slice)
RING_REFILL_WARPS = 4             # warps taking turns at the TMA refills (1: warp 0 issues them all, as v5)
# (Variants whose ablations lost were removed in session 4, see notes/kernel.md "session 4 pruning": the persistent
# Fp4DecodeGemm, one scale per prmt, the all-warps routing scan, and the ring's pairing / mshare / spin / evict-first
# / min-CTAs / diagnostic options.)
_COUNTERS: dict = {}              # made-once small device buffers (dummies, the router's counter), keyed (device, name)


def pick_k_splits(num_rows: int, num_experts: int, m_tiles: int, k_tiles: int, num_sms: int) -> int:
    """K slices per (expert, row-tile) CTA: a power of 2 that brings the CTA count to ~SPLIT_CTAS_PER_SM per SM,
    keeping >= SPLIT_MIN_K_TILES k-tiles per slice. min(num_experts, num_rows) bounds the hit experts (no host sync)."""
    ctas = min(num_experts, num_rows) * m_tiles
    splits = 1
    while (SPLIT_K and ctas * splits * 2 <= SPLIT_CTAS_PER_SM * num_sms and k_tiles % (4 * splits) == 0
           and k_tiles // (2 * splits) >= SPLIT_MIN_K_TILES):
        splits *= 2
    return splits


def _split_counters(device, n: int) -> torch.Tensor:
    """Zeroed per-tile arrival counters for split-K (the last CTA of a tile resets its counter, so the buffer stays
    zero between launches); one buffer per stream (arrival_counters)."""
    return arrival_counters(device, n, 1 << 16)


def gemm_configs(fmt: str, R: int, E: int, D: int, inter: int, tile_n: int, sms: int):
    """_compile_gemm arguments of GEMM1 and GEMM2 for R routed rows (from the knobs above)."""
    smem = DECODE_SMEM_BUDGET if tile_n <= 16 else 72 * 1024
    s1 = pick_k_splits(R, E, 2 * inter // TILE_M, D // TILE_K, sms)
    s2 = pick_k_splits(R, E, D // TILE_M, inter // TILE_K, sms)
    gather = R <= GATHER_MAX_ROWS                         # the routing kernel gathers x (GEMM1 follows it)
    ring = (RING_STAGES, RING_REFILL_WARPS) if DECODE_RING and tile_n <= 16 else ()
    return ((fmt, tile_n, D, inter, True, s1, smem, USE_PDL, gather, ring),
            (fmt, tile_n, inter, D, False, s2, smem, USE_PDL, False, ring))


def _no_routing_config(pk, T: int, D: int, k: int, sms: int):
    """_compile_moe_gemv_fused config of moe_fp4's fused launch (no routing kernel) for T tokens at top-k, or None
    where moe_fp4 takes another path: <= 32 slots (one ballot), the decode GEMV and the fused bound apply."""
    R = T * k
    if R > 32 or T >= PREFILL_MIN_TOKENS:
        return None
    if not (DECODE_GEMV and R <= MOE_GEMV_MAX_ROWS and moe_gemv_supported(D, pk.inter)):
        return None
    return moe_gemv_fused_config(pk.fmt, R, pk.w13.shape[0], D, pk.inter, sms)


def _sm_count(device) -> int:
    n = _SM90.get((device, "sms"))
    if n is None:
        n = _SM90[(device, "sms")] = torch.cuda.get_device_properties(device).multi_processor_count
    return n


@dataclass
class RoutedSlots:
    """The routed MoE's output before the sum over the k slots (moe(slots=True), decode sizes without a routing
    kernel): rows [T*k, D] bf16, row t*k + j = slot j of token t, already weighted; ids [T*k] int32, the slot's
    expert (a slot counts where 0 <= id < num_experts). The output y [T, D] is MoeCombine's sum of the counted rows
    in slot order (routed_sum); the next mHC site's HcSiteCluster sums them itself (HC_FOLD_COMBINE)."""
    rows: torch.Tensor
    ids: torch.Tensor
    top_k: int
    num_experts: int


def routed_sum(y):
    """y as a [T, D] tensor: RoutedSlots summed by the MoeCombine kernel (what moe() returns without slots); a
    tensor as it is."""
    if not isinstance(y, RoutedSlots):
        return y
    T, D = y.rows.shape[0] // y.top_k, y.rows.shape[1]
    out = torch.empty(T, D, dtype=y.rows.dtype, device=y.rows.device)
    _compile_combine(y.top_k, D, USE_PDL, y.num_experts)(y.rows, y.ids, out)
    return out


def moe_fp4(x, topk_ids, topk_weights, experts: Experts, swiglu_limit: float, slots: bool = False):
    """Routed MoE through the two grouped fp4 GEMMs (needs sm_90 + CuTe DSL + packed fp4 experts, x bf16).
    Everything stays on the device: no host sync, graph-capturable; the sum over the k slots has a fixed order.
    Many tokens (>= PREFILL_MIN_TOKENS) take the warp-specialized prefill GEMM (moe_fp4_prefill); one or two tokens
    (T <= MOE_CHUNKS_MAX_TOKENS) take Fp4MoeChunks (MOE_CHUNKS), which sums the slots itself. slots: where the fused
    launch runs without routing, RoutedSlots instead of y (the sum left to the consumer)."""
    if x.shape[0] >= PREFILL_MIN_TOKENS and prefill_unavailable_reason(x, experts) is None:
        return moe_fp4_prefill(x, topk_ids, topk_weights, experts, swiglu_limit)
    pk = experts.packed if experts.packed is not None else prepare_experts(experts).packed
    T, D = x.shape
    k = topk_ids.shape[1]
    E, inter = pk.w13.shape[0], pk.inter
    R = T * k
    gemv = DECODE_GEMV and R <= MOE_GEMV_MAX_ROWS and moe_gemv_supported(D, inter)   # decode: Fp4MoeGemv
    tile_n = MOE_GEMV_TILE_N if gemv else pick_tile_n(T, k, E)
    dev = x.device
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    cfg1, cfg2 = gemm_configs(pk.fmt, R, E, D, inter, tile_n, sms)
    ids32, w32 = topk_ids.reshape(-1).to(torch.int32), topk_weights.reshape(-1).to(torch.float32)
    limit = float(swiglu_limit) if swiglu_limit else math.inf
    a_gate, a_up, a_down = pk.alphas                                # already times ACC_FIX
    chunks = moe_chunks_config(pk.fmt, T, k, D, inter, sms) if gemv else None
    if chunks is not None:
        # T <= MOE_CHUNKS_MAX_TOKENS: both GEMMs per 64-column act chunk (one round per token), no routing kernel,
        # y summed in the same launch
        rows = R * (inter // TILE_K) + 2 * (MOE_CHUNKS_PROBE == 3)
        part = _COUNTERS.get((dev, "chunk_parts", rows, D))      # persistent: PART_SENTINEL wherever no partial is
        if part is None:                                          # (every launch puts it back)
            part = _COUNTERS[(dev, "chunk_parts", rows, D)] = torch.full(
                (rows, D), PART_SENTINEL, dtype=torch.int32, device=dev).view(torch.float32)
        y = torch.empty(T, D, dtype=x.dtype, device=dev)
        if POISON_BUFFERS:
            y.fill_(float("nan"))
        _compile_moe_chunks(*chunks)(pk.w13.permute(3, 2, 1, 0), pk.w2.permute(3, 2, 1, 0), x.contiguous(), y,
                                     part, a_gate, a_up, a_down, w32, limit, ids32)
        return y
    fused = _no_routing_config(pk, T, D, k, sms)    # GEMM1 + GEMM2 in one launch (None: a path below)
    if fused is not None:
        # one launch, no routing kernel: the fused launch reads topk_ids / weights and x itself, rows by slot
        act = torch.empty(R, inter, dtype=torch.bfloat16, device=dev)
        y_rows = torch.empty(R, D, dtype=torch.bfloat16, device=dev)
        if POISON_BUFFERS:
            act.fill_(float("nan"))
            y_rows.fill_(float("nan"))
        y = torch.empty(T, D, dtype=x.dtype, device=dev)
        dummy = _COUNTERS.get((dev, "i32x3"))
        if dummy is None:
            dummy = _COUNTERS[(dev, "i32x3")] = torch.zeros(1, 3, dtype=torch.int32, device=dev)
        counters = _fused_counters(dev, 1 + R * fused[3])
        _compile_moe_gemv_fused(*fused, top_k=k)(
            pk.w13.permute(3, 2, 1, 0), pk.w2.permute(3, 2, 1, 0), x.contiguous(), act, y_rows, dummy, a_gate, a_up,
            a_down, w32, limit, ids32, ids32, counters, dummy.view(-1), y)
        if slots:
            return RoutedSlots(y_rows, ids32, k, E)
        _compile_combine(k, D, USE_PDL, E)(y_rows, ids32, y)
        return y
    dgv = moe_gemv_direct_configs(pk.fmt, R, E, D, inter, sms, k) if gemv and fused is None else None
    if dgv is not None:
        # no routing kernel, two launches (MOE_GEMV_DIRECT): GEMM1 reads topk_ids and x itself, rows by slot
        act = torch.empty(R, inter, dtype=torch.bfloat16, device=dev)
        y_rows = torch.empty(R, D, dtype=torch.bfloat16, device=dev)
        if POISON_BUFFERS:
            act.fill_(float("nan"))
            y_rows.fill_(float("nan"))
        y = torch.empty(T, D, dtype=x.dtype, device=dev)
        dummy = _COUNTERS.get((dev, "i32x3"))
        if dummy is None:
            dummy = _COUNTERS[(dev, "i32x3")] = torch.zeros(1, 3, dtype=torch.int32, device=dev)
        w2_base = pk.w2.view(-1)[:16]          # (the kernels' unused mNext argument)
        tok = MOE_GEMV_TOK_ASYNC and R <= MOE_GEMV_TOK_ASYNC_MAX_ROWS
        gemm1 = _compile_moe_gemv(*dgv[0], direct_k=k, tok_async=tok)
        gemm2 = _compile_moe_gemv(*dgv[1], direct_k=k, tok_async=tok)
        gemm1(pk.w13.permute(3, 2, 1, 0), x.contiguous(), act, dummy, a_gate, a_up, w32, limit, ids32, ids32,
              w2_base)
        gemm2(pk.w2.permute(3, 2, 1, 0), act, y_rows, dummy, a_down, a_down, w32, limit, ids32, ids32, w2_base)
        _compile_combine(k, D, USE_PDL, E)(y_rows, ids32, y)
        return y
    src_tok = torch.empty(R, dtype=torch.int32, device=dev)         # sorted row -> token
    row_w = torch.empty(R, dtype=torch.float32, device=dev)         # routing weight of each sorted row
    pos = torch.empty(R, dtype=torch.int32, device=dev)             # slot -> sorted row (R: skipped)
    tiles = torch.empty(max_tiles(R, E, tile_n), 3, dtype=torch.int32, device=dev)
    gather = R <= GATHER_MAX_ROWS
    if gather:                           # the routing CTA also gathers the (few) token rows: one launch less
        x_sorted = torch.empty(R, D, dtype=x.dtype, device=dev)
        _compile_routing_gather(E, k, tile_n, D)(ids32, w32, src_tok, row_w, pos, tiles, x.contiguous(), x_sorted)
    else:
        _compile_routing(E, k, tile_n)(ids32, w32, src_tok, row_w, pos, tiles)
        g1 = moe_gemv_configs(pk.fmt, R, E, D, inter, sms, gather)[0] if gemv else ()
        if len(g1) > 12 and g1[12]:         # the pair GEMM1 reads x rows through src_tok
            x_sorted = x.contiguous()
        else:
            x_sorted = x.index_select(0, src_tok)                   # [R, D] rows grouped by expert
    act = torch.empty(R, inter, dtype=torch.bfloat16, device=x.device)
    y_rows = torch.empty(R, D, dtype=torch.bfloat16, device=x.device)   # one row per routed slot (sorted)
    if POISON_BUFFERS:        # tests: NaN-fill the intermediates so an unwritten element shows up in y
        act.fill_(float("nan"))
        y_rows.fill_(float("nan"))
    y = torch.empty(T, D, dtype=x.dtype, device=dev)
    if gemv:
        g1, g2 = moe_gemv_configs(pk.fmt, R, E, D, inter, sms, gather)
        w2_base = pk.w2.view(-1)[:16]          # (the kernels' unused mNext argument)
        by_src = len(g1) > 12 and g1[12]                         # x rows through src_tok (mPos = src_tok)
        tok = MOE_GEMV_TOK_ASYNC and R <= MOE_GEMV_TOK_ASYNC_MAX_ROWS
        gemm1 = _compile_moe_gemv(*g1, tok_async=tok)
        gemm2 = _compile_moe_gemv(*g2, tok_async=tok)
        gemm1(pk.w13.permute(3, 2, 1, 0), x_sorted, act, tiles, a_gate, a_up, row_w, limit, ids32,
              src_tok if by_src else pos, w2_base)
        gemm2(pk.w2.permute(3, 2, 1, 0), act, y_rows, tiles, a_down, a_down, row_w, limit, ids32, pos, w2_base)
        _compile_combine(k, D, USE_PDL)(y_rows, pos, y)
        return y
    gemm1, gemm2 = _compile_gemm(*cfg1), _compile_gemm(*cfg2)
    s1, s2 = cfg1[5], cfg2[5]
    n_tab = tiles.shape[0]
    counters = _split_counters(dev, n_tab * max(2 * inter, D) // TILE_M)
    unused = _COUNTERS.get((dev, "unused"))              # made once: setdefault would allocate + fill every call
    if unused is None:
        unused = _COUNTERS[(dev, "unused")] = torch.zeros(1, 1, 4, dtype=torch.float32, device=dev)
    part1 = torch.empty(s1, R, 2 * inter, dtype=torch.float32, device=dev) if s1 > 1 else unused   # fp32 partials
    part2 = torch.empty(s2, R, D, dtype=torch.float32, device=dev) if s2 > 1 else unused
    gemm1(pk.w13.permute(3, 2, 1, 0), x_sorted, act, tiles, a_gate, a_up, row_w, limit, part1, counters)
    gemm2(pk.w2.permute(3, 2, 1, 0), act, y_rows, tiles, a_down, a_down, row_w, limit, part2, counters)
    _compile_combine(k, D, USE_PDL)(y_rows, pos, y)                  # fixed slot order, fp32 sum, one kernel
    return y


_NOTICE_SHOWN = False
POISON_BUFFERS = False


def kernel_unavailable_reason(x, experts: Experts):
    """None if moe() can take the CuTe DSL path for these inputs, else a short reason."""
    if experts.fmt not in FP4_GROUP:
        return f"experts are {experts.fmt}, not fp4"
    if not HAVE_CUTE:
        return "CuTe DSL is not installed"
    if not (x.is_cuda and torch.cuda.get_device_capability(x.device) == (9, 0)):
        return "no sm_90 GPU"
    if x.dtype != torch.bfloat16:
        return f"x is {x.dtype}, not bf16"
    D, inter = 2 * experts.w13.shape[2], experts.inter_dim
    if D % 128 or inter % 128:
        return f"dims D={D}, I={inter} are not multiples of 128"
    return None


def moe(x, topk_ids, topk_weights, experts: Experts, swiglu_limit: float, slots: bool = False):
    """Routed MoE: the CuTe DSL kernel where it can run (sm_90 + CuTe DSL + fp4 experts), else the reference.
    slots: RoutedSlots where the kernel path can leave the sum over the k slots to the caller, else y [T, D]."""
    global _NOTICE_SHOWN
    reason = kernel_unavailable_reason(x, experts)
    if reason is None:
        return moe_fp4(x, topk_ids, topk_weights, experts, swiglu_limit, slots)
    if not _NOTICE_SHOWN:
        _NOTICE_SHOWN = True
        print(f"nano-dsv4: MoE falls back to the torch reference ({reason})", file=sys.stderr)
    return moe_reference(x, topk_ids, topk_weights, experts, swiglu_limit)


# ====================================================================================================================
# Decode-step kernels (issue #5). dsv4.py's torch code is their reference and the CPU path; on an sm_90 GPU with CuTe
# DSL, dsv4.fused(x) sends the decode hot spots here. Each torch-facing function below also falls back to its own
# reference for inputs its kernel does not take (shapes, dtypes), so a call is always correct.
# ====================================================================================================================
_SM90: dict = {}


def _sm90(device) -> bool:
    """device is an sm_90 GPU (the capability query cached per device)."""
    if device not in _SM90:
        _SM90[device] = torch.cuda.get_device_capability(device) == (9, 0)
    return _SM90[device]


def fused_unavailable_reason(x: torch.Tensor) -> str | None:
    """None if the decode-step kernels can run for activation x (bf16 on an sm_90 GPU with CuTe DSL), else why not."""
    if not HAVE_CUTE:
        return "CuTe DSL is not installed"
    if not x.is_cuda:
        return "not a CUDA tensor"
    if not _sm90(x.device):
        return "no sm_90 GPU"
    return None if x.dtype == torch.bfloat16 else f"x is {x.dtype}, not bf16"


# ====================================================================================================================
# FP8 GEMV for decode-sized M (issue #5)
# ====================================================================================================================
# FP8 skinny GEMM for decode (M = 1..16 rows) on Hopper, CuTe DSL: the FP8 linears' activation quantization and the
# block-scaled product in one kernel that streams the e4m3 weight at memory bandwidth.
#
#     y[m, n] = sum over 128-wide k blocks b of (sum_{k in b} q[m,k] W[n,k]) * sx[m,b] * sw[n//128, b]   (fp32) -> bf16
#     (q, sx) = dsv4.act_quant_fp8(x): per row and 128-k block, sx = 2^ceil(log2(max(amax, 1e-4) / 448)),
#     q = e4m3(x / sx) (round to nearest even, clamp +-448); W [N, K] e4m3 (checkpoint layout), sw e8m0 [N/128, K/128].
#
# Design (one CTA = R weight rows x one K slice; grid (N/R, S)):
# - The CTA quantizes its K slice of x (all M rows) into shared memory as f16 (every e4m3 value is exact in f16) plus
#   the fp32 block scales sx, while its first weight loads are already in flight.
# - Each warp owns 16*RT weight rows and streams them over the slice with 16-byte register loads (prefetched D k-blocks
#   ahead). Tensor cores: mma.sync m16n8k16 f16 x f16 -> f32, weight rows = the 16-row A operand (e4m3 -> f16x2 with
#   one cvt per two weights: exact), tokens = N (8 per n8 tile, one or two tiles). (sm_90 has no fp8 mma.sync: ptxas
#   lowers the e4m3 form to the same cvt + HMMA, so we do it ourselves and keep the activations as f16 in smem.)
#   Products of two e4m3 values are exact in the f32 accumulation; each 128-k block starts a fresh accumulator that is
#   scaled by sx*sw (a power of two) into the running fp32 sum.
# - K permutation: inside a 128-k block the sum is order-free, so thread (g, t) of a warp (g = lane/4, t = lane%4) loads
#   bytes [16t, 16t+16) and [64+16t, 64+16t+16) of weight rows g and g+8, and word i of those 32 bytes feeds k16 MMA i:
#   its bytes (0,1) are the fragment's logical k (2t, 2t+1), bytes (2,3) are (2t+8, 2t+9). The activation fragment of
#   the same MMA is then the f16 pairs of the same physical k: plain 16-byte shared-memory loads, no shuffles.
# - Split-K (S > 1), default (cluster=True, S <= 8): the S CTAs of a row group are one thread-block cluster; each puts
#   its fp32 partial in its shared memory, and after a cluster barrier CTA z sums its 1/S share of the outputs over the
#   S CTAs in rank order through DSMEM (deterministic), writes bf16, and a second barrier keeps the smem alive until
#   all have read it. cluster=False (any S): every CTA stores its fp32 partial [S, M, Npad] in global memory; the last
#   CTA of a row group to arrive (counter per row group) sums the S partials in slice order 0..S-1, writes bf16 and
#   resets the counter (H200: ~1-1.5 us slower per call than the cluster path on the small Flash linears).

BLOCK = 128            # k block of both scales
FP8_MAX = 448.0
SX_MIN_EXP = -22       # act_quant_fp8 clamps amax at 1e-4: 2^ceil(log2(1e-4 / 448)) = 2^-22
MAX_ROWS = 16          # decode rows the kernel takes (two n8 token tiles)
MAX_SLICE_BLOCKS = 16  # k blocks per CTA (the slice's f16 activations live in smem: 16 x 2048 x 2 B = 64 KB)
# PTX qualifiers of the weight loads (Fp8Gemv's codes, Fp4MoeGemv's codes and scale words). L2::128B, not 256B: H200
# session 17, same bits, graphs of 20 back-to-back M = 1 GEMVs, three runs: wq_b|iwq_b -6.5%, wo_a -4%, wo_b -4%, shared
# w1|w3 -4%, w2 -2..-4%; the fp4 MoE's codes at T <= 4 0.2-3% faster, its scale words (no size before) at T >= 4 ~1%
WEIGHT_LD_HINT = ".nc.L1::no_allocate.L2::128B"
BIG_WEIGHT_BYTES = 16 << 20   # from here on the weight streams at bandwidth: bigger CTAs, global split-K if any


# ----------------------------------------------------------------------------------------------------------------
# Torch reference (the fallback and what the tests compare against)
def act_quant_fp8_exact(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """dsv4.act_quant_fp8 with the scale exponent computed exactly from the bits (what the kernel does):
    x [..., K] -> (e4m3 [..., K], fp32 power-of-two scales [..., K/128]). For bf16 x it equals dsv4.act_quant_fp8
    bit for bit: a bf16 amax is never within an fp32 ulp above a power of two times 448, so log2/ceil can't misround."""
    xb = x.float().unflatten(-1, (-1, BLOCK))
    amax = xb.abs().amax(-1, keepdim=True).clamp(min=1e-4)
    mant, exp = torch.frexp(amax / FP8_MAX)                      # v = mant * 2^exp, mant in [0.5, 1)
    e = torch.where(mant == 0.5, exp - 1, exp)                   # ceil(log2 v) exactly; amax < 1e-4 -> -22
    s = torch.ldexp(torch.ones_like(amax), e)
    q = (xb / s).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q.flatten(-2), s.squeeze(-1)


def dequant_fp8_weight(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """e4m3 [N, K] + e8m0 [ceil(N/128), ceil(K/128)] -> fp32 [N, K] (= dsv4.dequant_fp8(w, scale, torch.float32))."""
    s = scale.float().repeat_interleave(BLOCK, 0)[: w.shape[0]].repeat_interleave(BLOCK, 1)[:, : w.shape[1]]
    return w.float() * s


def fp8_gemv_reference(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Q8(x) @ (W*s)^T in fp32, rounded to x.dtype once: x [..., K] -> [..., N]. Same semantics as fp8_gemv."""
    q, s = act_quant_fp8_exact(x)
    xq = (q.float().unflatten(-1, (-1, BLOCK)) * s[..., None]).flatten(-2)
    y = torch.nn.functional.linear(xq, dequant_fp8_weight(weight, scale))
    return y.to(x.dtype)


# Packed weight layout (sessions 8-9): the order in which Fp8Gemv's warps consume W. Tile (r16, kb) = rows
# [16 r16, 16 r16 + 16) x k [128 kb, 128 kb + 128) = 2 KB at byte (kb * N16/16 + r16) * 2048 (k-block major: the CTAs
# of a wave read neighbouring tiles), inside it [h][half][lane = 4 g + t][16 B] = row 16 r16 + 8 h + g, bytes
# [64 half + 16 t, +16) of the k block: each warp load instruction (fixed h, half) reads 512 contiguous bytes, a warp's
# stage one 2 KB run. Every config (rows per warp/CTA, stages, K splits over CTAs or warps) reads the same layout.
# (Session 8's row-tile-major order 1, a warp's whole K slice one run, made the many-CTA split-K GEMVs ~1.2 us slower
# in a chain and never won in the step; removed in session 11.)
PACK_TILE_BYTES = 2048


def pack_fp8_gemv_weight(weight: torch.Tensor) -> torch.Tensor:
    """[N, K] (any 1-byte dtype, K % 128 == 0) -> same dtype [N16, K] in the packed tile order (N16 = N rounded up to
    16; the pad rows are zeros). A one-time copy at load; unpack_fp8_gemv_weight inverts it."""
    N, Kd = weight.shape
    assert Kd % BLOCK == 0 and weight.element_size() == 1, (tuple(weight.shape), weight.dtype)
    n16 = -(-N // 16) * 16
    w = weight.view(torch.uint8)
    if n16 != N:
        w = torch.cat([w, w.new_zeros(n16 - N, Kd)])
    # [r16][h][g][kb][half][t][16 B] -> [kb][r16][h][half][g][t][16 B]
    t = w.reshape(n16 // 16, 2, 8, Kd // BLOCK, 2, 4, 16).permute(3, 0, 1, 4, 2, 5, 6)
    return t.contiguous().view(n16, Kd).view(weight.dtype)


def unpack_fp8_gemv_weight(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of pack_fp8_gemv_weight: packed [N16, K] -> [n, K] in row-major checkpoint order."""
    n16, Kd = packed.shape
    t = packed.view(torch.uint8).reshape(Kd // BLOCK, n16 // 16, 2, 2, 8, 4, 16)
    t = t.permute(1, 2, 4, 0, 3, 5, 6)
    return t.contiguous().view(n16, Kd)[:n].view(packed.dtype)


def fp8_gemv_packed_reference(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, n: int) -> torch.Tensor:
    """fp8_gemv_reference of the weight a packed tensor holds (n rows)."""
    return fp8_gemv_reference(x, unpack_fp8_gemv_weight(packed, n), scale)


# ----------------------------------------------------------------------------------------------------------------
# Static configuration
def pick_gemv_config(N: int, K: int, M: int, num_sms: int, cluster: bool | None = None,
                     elem_bytes: int = 1) -> dict:
    """Static kernel config for an [M, K] x [N, K]^T product with a weight of elem_bytes per element (1: e4m3,
    2: bf16 = bf16_gemv_fp32): _pick_gemv_config_s5 (session 5's layouts on the s4 rules' K partition); with
    cluster given (the tests' path knob: cluster or global split-K) the s4 rules themselves."""
    if cluster is not None:
        return _pick_gemv_config_s4(N, K, M, num_sms, cluster)
    return _pick_gemv_config_s5(N, K, M, num_sms, elem_bytes)


# CTAs per SM of the register-path layouts the s5 rules use (n8 = 1, one row tile; ptxas -v for sm_90a, CuTe DSL
# 4.8.1): 8 warps x 2 stages ~90 registers -> 2; 4 warps x 2 stages ~86-92 -> 5 (65536 registers per SM)
GEMV_CTAS_PER_SM = {(8, 2): 2, (4, 2): 5}
# k blocks in flight per warp of the k_warps layouts (one 16-warp CTA per SM, K split over its warps: shared w1|w3,
# shared w2, wo_a). 2 since session 17 (4 before; same bits; 128B weight loads, graphs of 20 M = 1 calls, 4 -> 2 stages):
# H200 shared w1|w3 6.48 -> 6.00 and 6.39 -> 6.02 us, wo_a 10.33 -> 9.76 and 10.22 -> 9.71; H100 7.52 -> 7.20, 12.74 ->
# 12.36. (3 stages: shared w1|w3 5.86 / 6.60 us, wo_a 10.02-10.08 / 12.62: not taken, one value for both)
GEMV_KWARP_STAGES = 2


def _pick_gemv_config_s5(N: int, K: int, M: int, num_sms: int, elem_bytes: int = 1) -> dict:
    """Session-5 rules: the s4 config's K partition (S parts summed in order: it fixes the bits, so s5 gives s4's
    outputs, up to the sign of an all-zero sum) with layouts that keep every CTA resident in one wave and fewer
    registers per CTA. H200 (s5 R0 sweep, Flash, M = 1, kernel us, s4 -> s5):
    - bf16 weights (bf16_gemv_fp32; twice the registers per stage): 64-row CTAs of 4 warps, K over a cluster of S
      (csa compressors 2560x4096: 12.2 -> 8.6, 1 -> 3 CTAs per SM; hca 1024x4096: 5.3 -> 5.1).
    - one K slice, s4's 128-row CTAs more than 2 per SM: 64-row CTAs of 4 warps, 2 stages (5 per SM, one wave;
      wq_b|indexer wq_b 40960x1024: 14.1 -> 12.3).
    - K split S in 2, 4, 8 with <= 4 K blocks per slice, K <= 4096 (the CTA's activations in smem) and rows that
      make ~one 16-warp CTA per SM at 16 * 16 / S rows each: K split over the 16 warps of the CTA instead (k_warps
      = S, partials summed in smem in the same order, no cluster / global partials; shared w2 4096x2048: 5.7 -> 4.8,
      shared w1|w3 4096x4096: 8.5 -> 7.9, and faster still behind a PDL predecessor: 7.1 -> 6.8).
    - other big weights with global split-K (s4: 128-row CTAs of 4 warps x 2 row tiles, 4 stages, ~174 registers):
      2 stages, 128-row CTAs of 8 warps if they fit one wave at 2 per SM, else 64-row CTAs of 4 warps (5 per SM), else
      the layout with fewer waves (wo_b 4096x8192: 13.2 -> 11.5). Else (wq_a|wkv) s4.
    H100 (s5 R1, copy 2.98 TB/s, M = 1, s4 -> s5): csa 15.3 -> 11.3, wq_b|iwq_b 16.7 -> 15.9, wo_b 15.3 -> 14.8,
    w2 7.1 -> 5.3. M > 8 (two token tiles, more registers): s4 (not timed)."""
    c = _pick_gemv_config_s4(N, K, M, num_sms)
    S, kb = c["k_splits"], K // BLOCK
    if c["n8"] != 1:
        return c
    if elem_bytes == 2:
        return dict(c, warps=4, row_tiles=1, stages=min(4, kb // S), cluster=1 < S <= 8)
    if S == 1:
        if -(-N // (16 * c["warps"] * c["row_tiles"])) > 2 * num_sms and -(-N // 64) <= 5 * num_sms:
            return dict(c, warps=4, row_tiles=1, stages=min(2, kb), cluster=False)
        return c
    rows = 16 * 16 // S
    if S in (2, 4, 8) and kb // S <= 4 and K <= 4096 and 0.9 * num_sms <= N / rows <= num_sms:
        return dict(c, k_splits=1, k_warps=S, warps=16, row_tiles=1, stages=min(GEMV_KWARP_STAGES, kb // S),
                    cluster=False)
    if N * K >= BIG_WEIGHT_BYTES:
        return dict(c, **_big_split_layout(N, S, num_sms), row_tiles=1, stages=min(2, kb // S), cluster=False)
    return c


def _big_split_layout(N: int, S: int, num_sms: int) -> dict:
    """Warps of the 2-stage layout for a global K split S (see _pick_gemv_config_s5): 8 (128 rows) if one wave fits,
    else 4 (64 rows) if it fits, else the one with fewer waves."""
    waves = {}
    for w in (8, 4):
        waves[w] = -(-N // (16 * w)) * S / (GEMV_CTAS_PER_SM[(w, 2)] * num_sms)
        if waves[w] <= 1:
            return dict(warps=w)
    return dict(warps=min(waves, key=waves.get))


def _pick_gemv_config_s4(N: int, K: int, M: int, num_sms: int, cluster: bool = True) -> dict:
    """Static kernel config for an [M, K] x [N, K]^T product (rules from H200 timings, see notes in the report).
    n8: token tiles (1: M <= 8, 2: M <= 16); warps x row_tiles x 16 = R weight rows per CTA; splits S: K slices over
    CTAs (a divisor of K/128, each slice <= MAX_SLICE_BLOCKS blocks); stages: k blocks in flight per warp.
    - weights >= 16 MiB (bandwidth-bound): K/128 <= 16 -> no split, 128-row CTAs of 8 warps (wq_b: 9.0 us, 89% of the
      copy-bandwidth floor); else global split-K, 128-row CTAs of 4 warps x 2 row tiles, S >= 1.5 CTAs per SM (wo_b).
    - smaller weights (latency-bound), cluster (default): the S slices of a row group form a cluster and sum their
      partials through DSMEM, so S <= 8; the largest R in 128, 64, 32 whose smallest such S gives >= one CTA per SM.
    - cluster=False: global fp32 partials + last-arriving CTA (any S; ~2 CTAs per SM).
    (The base of _pick_gemv_config_s5, and the config of every M > 8; the s5 docstring says what it changes.)"""
    kb = K // BLOCK
    n8 = 1 if M <= 8 else 2
    divisors = [d for d in range(1, kb + 1) if kb % d == 0]
    if N * K >= BIG_WEIGHT_BYTES:
        if kb <= MAX_SLICE_BLOCKS:
            return dict(k_dim=K, k_splits=1, n8=n8, row_tiles=1, warps=8, stages=min(kb, 4), cluster=False)
        row_ctas = -(-N // 128)
        fits = [d for d in divisors if kb // d <= MAX_SLICE_BLOCKS and 2 * n8 * d <= 64]
        if fits:
            enough = [d for d in fits if 2 * row_ctas * d >= 3 * num_sms]
            splits = min(enough) if enough else max(fits)
            return dict(k_dim=K, k_splits=splits, n8=n8, row_tiles=2, warps=4, stages=min(kb // splits, 4),
                        cluster=False)
    if cluster:
        fits = [d for d in divisors if d <= 8 and kb // d <= MAX_SLICE_BLOCKS]
        best = None
        for warps, row_tiles in ((8, 1), (4, 1), (2, 1)):
            row_ctas = -(-N // (warps * 16 * row_tiles))
            enough = [d for d in fits if row_ctas * d >= num_sms]
            if enough:
                best = (warps, row_tiles, min(enough))
                break
            if fits and (best is None or row_ctas * max(fits) >= -(-N // (best[0] * 16 * best[1])) * best[2]):
                best = (warps, row_tiles, max(fits))
        if best is not None:
            warps, row_tiles, splits = best
            return dict(k_dim=K, k_splits=splits, n8=n8, row_tiles=row_tiles, warps=warps,
                        stages=min(kb // splits, 4), cluster=splits > 1)
    warps, row_tiles = (4, 1) if N <= 1024 else (4, 2)
    rows = warps * 16 * row_tiles
    row_ctas = -(-N // rows)
    fits = [d for d in divisors if kb // d <= MAX_SLICE_BLOCKS and row_tiles * n8 * d <= 64]
    if not fits:
        fits = [max(d for d in divisors if kb // d <= MAX_SLICE_BLOCKS)]
    enough = [d for d in fits if row_ctas * d >= 2 * num_sms]
    splits = min(enough) if enough else max(fits)
    kbc = kb // splits
    stages = min(kbc, 4 if row_tiles == 1 else 2)
    return dict(k_dim=K, k_splits=splits, n8=n8, row_tiles=row_tiles, warps=warps, stages=stages, cluster=False)



if HAVE_CUTE:
    import cutlass
    import cutlass.cute as cute
    from cutlass import Int32, Int64, Float32, BFloat16, Uint8, const_expr
    from cutlass.cutlass_dsl import T as _T, dsl_user_op
    from cutlass._mlir import ir as _ir
    from cutlass._mlir.dialects import llvm as _llvm, nvvm as _nvvm

    def _i32(v, loc, ip):
        return Int32(v).ir_value(loc=loc, ip=ip)

    @dsl_user_op
    def _bits_f32(v: Int32, *, loc=None, ip=None) -> Float32:
        return Float32(_llvm.bitcast(_T.f32(), _i32(v, loc, ip), loc=loc, ip=ip))

    @dsl_user_op
    def _ld_v4(addr: Int64, hint: str, sem: str = "", *, loc=None, ip=None):
        """16-byte global load -> 4 Int32 (hint: PTX qualifiers, e.g. WEIGHT_LD_HINT; sem: e.g. ".relaxed.gpu", 4
        single-copy-atomic words another CTA may be writing)."""
        res = _llvm.inline_asm(
            _ir.Type.parse("!llvm.struct<(i32, i32, i32, i32)>"), [Int64(addr).ir_value(loc=loc, ip=ip)],
            f"ld{sem}.global{hint}.v4.b32 {{$0, $1, $2, $3}}, [$4];", "=r,=r,=r,=r,l",
            has_side_effects=True, loc=loc, ip=ip)
        return tuple(Int32(_llvm.extractvalue(_T.i32(), res, [i], loc=loc, ip=ip)) for i in range(4))

    @dsl_user_op
    def _ld_v2(addr: Int64, hint: str, *, loc=None, ip=None):
        """8-byte global load -> 2 Int32 (hint: PTX qualifiers, e.g. '.cg')."""
        res = _llvm.inline_asm(
            _ir.Type.parse("!llvm.struct<(i32, i32)>"), [Int64(addr).ir_value(loc=loc, ip=ip)],
            f"ld.global{hint}.v2.b32 {{$0, $1}}, [$2];", "=r,=r,l", has_side_effects=True, loc=loc, ip=ip)
        return tuple(Int32(_llvm.extractvalue(_T.i32(), res, [i], loc=loc, ip=ip)) for i in range(2))

    @dsl_user_op
    def _ld_b32(addr: Int64, hint: str, *, loc=None, ip=None) -> Int32:
        """4-byte global load (hint: PTX qualifiers, e.g. WEIGHT_LD_HINT)."""
        return Int32(_llvm.inline_asm(_T.i32(), [Int64(addr).ir_value(loc=loc, ip=ip)],
                                      f"ld.global{hint}.b32 $0, [$1];", "=r,l",
                                      has_side_effects=True, loc=loc, ip=ip))

    @dsl_user_op
    def _cp_async_4(smem_addr: Int32, gmem_addr: Int64, *, loc=None, ip=None):
        """4 bytes global -> shared, asynchronous (cp.async.ca: through L1)."""
        _llvm.inline_asm(None, [Int32(smem_addr).ir_value(loc=loc, ip=ip), Int64(gmem_addr).ir_value(loc=loc, ip=ip)],
                         "cp.async.ca.shared.global [$0], [$1], 4;", "r,l", has_side_effects=True, loc=loc, ip=ip)

    @dsl_user_op
    def _cp_async_weight(smem_addr: Int32, gmem_addr: Int64, n: int, *, loc=None, ip=None):
        """n (4 | 8 | 16) bytes of a weight record global -> shared, asynchronous (16 B bypass L1: .cg)."""
        kind = "cg" if n == 16 else "ca"
        _llvm.inline_asm(None, [Int32(smem_addr).ir_value(loc=loc, ip=ip), Int64(gmem_addr).ir_value(loc=loc, ip=ip)],
                         f"cp.async.{kind}.shared.global.L2::128B [$0], [$1], {n};", "r,l", has_side_effects=True,
                         loc=loc, ip=ip)

    @dsl_user_op
    def _lds_words(smem_addr: Int32, n: int, *, loc=None, ip=None):
        """n (1 | 2 | 4) 32-bit words from shared memory -> a tuple of Int32."""
        vec = {1: "b32 $0", 2: "v2.b32 {$0, $1}", 4: "v4.b32 {$0, $1, $2, $3}"}[n]
        res = _llvm.inline_asm(
            _ir.Type.parse(f"!llvm.struct<({', '.join(['i32'] * n)})>"), [Int32(smem_addr).ir_value(loc=loc, ip=ip)],
            f"ld.shared.{vec}, [${n}];", ",".join(["=r"] * n) + ",r",
            has_side_effects=True, loc=loc, ip=ip)
        return tuple(Int32(_llvm.extractvalue(_T.i32(), res, [i], loc=loc, ip=ip)) for i in range(n))

    @dsl_user_op
    def _sync_threads_from_roles(*, loc=None, ip=None):
        """Barrier 0 over the whole CTA where warp roles reach it from different instructions (an if / else on the
        warp): cute.arch.sync_threads is bar.sync, i.e. .aligned, which needs every thread at the same instruction
        (compute-sanitizer's synccheck: "divergent threads"); barrier.cta.sync without .aligned does not."""
        _nvvm.barrier_cta_sync(Int32(0).ir_value(loc=loc, ip=ip), aligned=False, loc=loc, ip=ip)

    @dsl_user_op
    def _cp_async_commit(*, loc=None, ip=None):
        _llvm.inline_asm(None, [], "cp.async.commit_group;", "", has_side_effects=True, loc=loc, ip=ip)

    @dsl_user_op
    def _cp_async_wait(pending: int, *, loc=None, ip=None):
        """Wait until at most `pending` of this thread's cp.async groups are still in flight."""
        _llvm.inline_asm(None, [], f"cp.async.wait_group {pending};", "", has_side_effects=True, loc=loc, ip=ip)

    @dsl_user_op
    def _ld_dsmem_f32(smem_addr: Int32, rank: Int32, *, loc=None, ip=None) -> Float32:
        """fp32 at this CTA's shared address smem_addr, read from CTA `rank` of the cluster (DSMEM)."""
        return Float32(_llvm.inline_asm(
            _T.f32(), [Int32(smem_addr).ir_value(loc=loc, ip=ip), Int32(rank).ir_value(loc=loc, ip=ip)],
            "{\n.reg .b32 a;\nmapa.shared::cluster.u32 a, $1, $2;\nld.shared::cluster.f32 $0, [a];\n}",
            "=f,r,r", has_side_effects=True, loc=loc, ip=ip))

    @dsl_user_op
    def _mbar_init(smem_addr: Int32, count: int, *, loc=None, ip=None):
        _llvm.inline_asm(None, [Int32(smem_addr).ir_value(loc=loc, ip=ip)],
                         f"mbarrier.init.shared::cta.b64 [$0], {count};", "r", has_side_effects=True, loc=loc, ip=ip)

    @dsl_user_op
    def _mbar_expect_tx(smem_addr: Int32, nbytes: int, *, loc=None, ip=None):
        """Arrive on this CTA's mbarrier and make its phase also wait for nbytes of asynchronous stores / copies."""
        _llvm.inline_asm(None, [Int32(smem_addr).ir_value(loc=loc, ip=ip)],
                         f"mbarrier.arrive.expect_tx.shared::cta.b64 _, [$0], {nbytes};", "r",
                         has_side_effects=True, loc=loc, ip=ip)

    @dsl_user_op
    def _mbar_wait_cluster(smem_addr: Int32, parity: int, *, loc=None, ip=None):
        """Block until this CTA's mbarrier at smem_addr completes its phase of this parity (acquire, cluster scope)."""
        _llvm.inline_asm(None, [Int32(smem_addr).ir_value(loc=loc, ip=ip)],
                         "{\n.reg .pred p;\nWAIT:\n"
                         f"mbarrier.try_wait.parity.acquire.cluster.shared::cta.b64 p, [$0], {parity};\n"
                         "@!p bra WAIT;\n}", "r", has_side_effects=True, loc=loc, ip=ip)

    @dsl_user_op
    def _ld_u8(addr: Int64, *, loc=None, ip=None) -> Int32:
        """One byte from global memory (read-only data), zero-extended."""
        return Int32(_llvm.inline_asm(_T.i32(), [Int64(addr).ir_value(loc=loc, ip=ip)],
                                      "ld.global.nc.u8 $0, [$1];", "=r,l", has_side_effects=True, loc=loc, ip=ip))

    @dsl_user_op
    def _ld_cg_v4f(addr: Int64, *, loc=None, ip=None):
        """16-byte L2 load (bypasses L1: other CTAs wrote it) -> 4 Float32."""
        res = _llvm.inline_asm(
            _ir.Type.parse("!llvm.struct<(f32, f32, f32, f32)>"), [Int64(addr).ir_value(loc=loc, ip=ip)],
            "ld.global.cg.v4.f32 {$0, $1, $2, $3}, [$4];", "=f,=f,=f,=f,l",
            has_side_effects=True, loc=loc, ip=ip)
        return tuple(Float32(_llvm.extractvalue(_T.f32(), res, [i], loc=loc, ip=ip)) for i in range(4))

    @dsl_user_op
    def _st_v4_fill(addr: Int64, v: Int32, *, loc=None, ip=None):
        """16-byte global store of one word four times."""
        _llvm.inline_asm(None, [Int64(addr).ir_value(loc=loc, ip=ip), _i32(v, loc, ip)],
                         "st.global.v4.b32 [$0], {$1, $1, $1, $1};", "l,r", has_side_effects=True, loc=loc, ip=ip)

    def _any_sentinel(w):
        """Some word of a 16-B piece of Fp4MoeChunks' partials is still PART_SENTINEL (not written yet)."""
        return (w[0] == PART_SENTINEL) | (w[1] == PART_SENTINEL) | (w[2] == PART_SENTINEL) | (w[3] == PART_SENTINEL)

    def _all_written(w):
        """No word of the piece is PART_SENTINEL any more."""
        return (w[0] != PART_SENTINEL) & (w[1] != PART_SENTINEL) & (w[2] != PART_SENTINEL) & (w[3] != PART_SENTINEL)

    @dsl_user_op
    def _nanosleep(ns: int, *, loc=None, ip=None):
        _llvm.inline_asm(None, [], f"nanosleep.u32 {ns};", "", has_side_effects=True, loc=loc, ip=ip)

    @dsl_user_op
    def _e4m3x4_to_f16x2x2(word: Int32, *, loc=None, ip=None):
        """4 e4m3 bytes b0..b3 -> f16x2 (b0, b1), f16x2 (b2, b3) (exact)."""
        res = _llvm.inline_asm(
            _ir.Type.parse("!llvm.struct<(i32, i32)>"), [_i32(word, loc, ip)],
            "{\n.reg .b16 lo, hi;\nmov.b32 {lo, hi}, $2;\n"
            "cvt.rn.f16x2.e4m3x2 $0, lo;\ncvt.rn.f16x2.e4m3x2 $1, hi;\n}",
            "=r,=r,r", has_side_effects=False, loc=loc, ip=ip)
        return tuple(Int32(_llvm.extractvalue(_T.i32(), res, [i], loc=loc, ip=ip)) for i in range(2))

    @dsl_user_op
    def _e4m3x4_to_bf16x2x2_scaled(word: Int32, *, loc=None, ip=None):
        """4 e4m3 bytes b0..b3 -> bf16x2 (b0, b2), bf16x2 (b1, b3) of v * 2^-120, integer ops only (no convert, no
        multiply): a byte's 7 exponent+mantissa bits moved under bf16's exponent field (4 bits down) give the bf16
        of v * 2^-120, subnormals included (e4m3 subnormals become bf16 subnormals); the sign bit stays on top.
        Bytes 1, 3 already sit in the top bytes of the halves; bytes 0, 2 are shifted up 8 first."""
        res = _llvm.inline_asm(
            _ir.Type.parse("!llvm.struct<(i32, i32)>"), [_i32(word, loc, ip)],
            "{\n.reg .b32 u, m0, m1;\nshl.b32 u, $2, 8;\n"
            "and.b32 m0, u, 0x7F007F00;\nand.b32 m1, $2, 0x7F007F00;\n"
            "shr.b32 m0, m0, 4;\nshr.b32 m1, m1, 4;\n"
            "lop3.b32 $0, m0, u, 0x80008000, 0xF8;\nlop3.b32 $1, m1, $2, 0x80008000, 0xF8;\n}",   # a | (b & c)
            "=r,=r,r", has_side_effects=False, loc=loc, ip=ip)
        return tuple(Int32(_llvm.extractvalue(_T.i32(), res, [i], loc=loc, ip=ip)) for i in range(2))

    @dsl_user_op
    def _quant_pair_f16x2(lo: Float32, hi: Float32, *, loc=None, ip=None) -> Int32:
        """(lo, hi) fp32 -> e4m3 with round-to-nearest-even, saturating at +-448 -> back to f16x2 (lo, hi), exact."""
        return Int32(_llvm.inline_asm(
            _T.i32(), [Float32(hi).ir_value(loc=loc, ip=ip), Float32(lo).ir_value(loc=loc, ip=ip)],
            "{\n.reg .b16 q;\ncvt.rn.satfinite.e4m3x2.f32 q, $1, $2;\ncvt.rn.f16x2.e4m3x2 $0, q;\n}",
            "=r,f,f", has_side_effects=False, loc=loc, ip=ip))

    @dsl_user_op
    def _mma_f16(a0, a1, a2, a3, b0, b1, c, *, loc=None, ip=None):
        """mma.sync m16n8k16 row.col f32 += f16 x f16: A regs a0..a3, B regs b0, b1, C/D 4 fp32."""
        res = _llvm.inline_asm(
            _ir.Type.parse("!llvm.struct<(f32, f32, f32, f32)>"),
            [_i32(v, loc, ip) for v in (a0, a1, a2, a3, b0, b1)] + [Float32(v).ir_value(loc=loc, ip=ip) for v in c],
            "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {$0, $1, $2, $3}, {$4, $5, $6, $7}, {$8, $9}, "
            "{$10, $11, $12, $13};",
            "=f,=f,=f,=f,r,r,r,r,r,r,f,f,f,f", has_side_effects=False, loc=loc, ip=ip)
        return [Float32(_llvm.extractvalue(_T.f32(), res, [i], loc=loc, ip=ip)) for i in range(4)]

    @dsl_user_op
    def _mma_bf16(a0, a1, a2, a3, b0, b1, c, *, loc=None, ip=None):
        """mma.sync m16n8k16 row.col f32 += bf16 x bf16: A regs a0..a3, B regs b0, b1, C/D 4 fp32."""
        res = _llvm.inline_asm(
            _ir.Type.parse("!llvm.struct<(f32, f32, f32, f32)>"),
            [_i32(v, loc, ip) for v in (a0, a1, a2, a3, b0, b1)] + [Float32(v).ir_value(loc=loc, ip=ip) for v in c],
            "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {$0, $1, $2, $3}, {$4, $5, $6, $7}, {$8, $9}, "
            "{$10, $11, $12, $13};",
            "=f,=f,=f,=f,r,r,r,r,r,r,f,f,f,f", has_side_effects=False, loc=loc, ip=ip)
        return [Float32(_llvm.extractvalue(_T.f32(), res, [i], loc=loc, ip=ip)) for i in range(4)]

    @dsl_user_op
    def _e8m0_to_f32(byte: Int32, *, loc=None, ip=None) -> Float32:
        """e8m0 byte e -> 2^(e-127) as fp32 (e = 0 -> 2^-127, a subnormal; 255 (NaN) -> NaN)."""
        b = Int32(byte)
        bits = Int32(_llvm.inline_asm(
            _T.i32(), [b.ir_value(loc=loc, ip=ip)],
            "{\n.reg .pred z;\n.reg .b32 s;\nsetp.eq.u32 z, $1, 0;\nshl.b32 s, $1, 23;\n"
            "selp.b32 $0, 0x400000, s, z;\n}", "=r,r", has_side_effects=False, loc=loc, ip=ip))
        return _bits_f32(bits, loc=loc, ip=ip)

    class Fp8Gemv:
        """y [M, N] bf16 = act_quant_fp8(x [M, K] bf16) x (W [N, K] e4m3 * sw)^T for M <= 8 * n8 (see module doc).
        Static: K, splits S, n8 token tiles, rows per CTA (warps x row_tiles x 16), prefetch stages. N, M symbolic.
        a16 (W8A16): x stays bf16 (no act quant: its bf16 pairs go to smem as they are), the weight goes e4m3 -> bf16
        exactly in registers, mma.sync bf16, each 128-k partial scaled by sw only. group_rows R > 0 (grouped, a16
        only): x is [M * G, K] (token-major, G = N / R groups), weight row n reads x row m * G + n // R (wo_a).
        The a16 weight's power-of-two offset is not undone per weight but folded into the block factor: the bf16 of
        v * 2^-120 from 7 integer ops per 4 weights (no convert; e4m3 subnormals become bf16 subnormals). Each
        (token, 128-k block) of x is scaled by 2^k (exact) to put its max in [2^100, 2^101), so the products stay
        fp32-normal, and the partial is multiplied back by 2^(120 - k), then by sw. (Measured alternatives, same bits,
        H200, Flash wo_a M = 1: cvt + multiply 11.3 us, an f16-convert fold 11.4, this 10.8; removed in session 11.)"""

        def __init__(self, k_dim: int, k_splits: int, n8: int, row_tiles: int, warps: int, stages: int,
                     pdl: bool = True, cluster: bool = False, min_ctas: int = 0, a16: bool = False,
                     group_rows: int = 0, w16: bool = False, k_warps: int = 1, packed: bool = False):
            assert k_dim % BLOCK == 0 and (k_dim // BLOCK) % k_splits == 0
            self.ld_hint = WEIGHT_LD_HINT
            # packed: W is pack_fp8_gemv_weight's tile order (a warp's stage = 2 KB contiguous, one 512-B run per
            # load instruction; tiles k-block major); N comes from mOut (mW's shape is only its storage); same
            # fragments and bits
            self.packed = bool(packed)
            assert not (packed and w16)
            # k_warps KW > 1: the CTA's K slice is split over KW warps of each row group (split-K inside the CTA,
            # partials summed through shared memory in warp order): KW x fewer rows per CTA, no global partials
            self.KW = k_warps
            assert warps % k_warps == 0 and (k_dim // BLOCK // k_splits) % k_warps == 0
            assert k_warps == 1 or k_splits == 1
            # w16: bf16 weight [N, K] (no scales) straight into the MMA, bf16 x, fp32 output (matmul_fp32 at decode)
            self.w16 = w16
            assert not w16 or not group_rows
            self.fold = a16 and not w16                                 # a16 weights as v * 2^-120 (see above)
            a16 = a16 or w16
            self.a16, self.group_rows = a16, group_rows
            assert not group_rows or (a16 and group_rows % (warps // k_warps * 16 * row_tiles) == 0)   # one group
            self.K, self.S, self.n8, self.RT, self.W = k_dim, k_splits, n8, row_tiles, warps
            self.kbc = k_dim // BLOCK // k_splits          # k blocks per CTA
            self.kbw = self.kbc // k_warps                 # k blocks per warp
            self.D = max(1, min(stages, self.kbw))
            self.rows = warps // k_warps * 16 * row_tiles
            self.mpad = 8 * n8
            self.row_words = self.kbc * BLOCK // 2 + 4     # f16 pairs per token row in smem (+16 B: no bank conflict)
            self.threads = 32 * warps
            self.row_blocks = -(-self.rows // BLOCK)       # 128-row scale blocks a CTA's rows touch
            assert self.row_blocks * self.kbc <= self.threads
            self.pdl = pdl      # programmatic dependent launch: weight loads start before the previous kernel ends
            # cluster: the S K slices of a row group form one thread-block cluster; partials meet in shared memory
            # (DSMEM) instead of global memory + an arrival counter (S <= 8, the portable cluster size)
            self.cluster = cluster and k_splits > 1
            self.min_ctas = min_ctas        # > 0: ptxas keeps registers low enough for this many CTAs per SM
            # fp32 partials in smem: cluster split-K [rows][tokens]; k_warps [KW][rows][tokens]
            self.red_words = self.rows * self.mpad * (1 if self.cluster else k_warps) \
                if self.cluster or k_warps > 1 else 4
            assert not self.cluster or k_splits <= 8

        @cute.jit
        def __call__(self, mX: cute.Tensor, mW: cute.Tensor, mS: cute.Tensor, mOut: cute.Tensor,
                     mPart: cute.Tensor, mCount: cute.Tensor, stream):
            @cute.struct
            class SharedStorage:
                q: cute.struct.Align[cute.struct.MemRange[Int32, self.mpad * self.row_words], 16]
                sx: cute.struct.Align[cute.struct.MemRange[Float32, self.kbc * self.mpad], 16]
                sw: cute.struct.Align[cute.struct.MemRange[Float32, self.kbc * self.row_blocks], 16]
                arrived: cute.struct.MemRange[Int32, 4]
                wbuf: cute.struct.Align[cute.struct.MemRange[Int32, 4], 128]   # (unused: keeps red's offset)
                red: cute.struct.Align[cute.struct.MemRange[
                    Float32, self.red_words], 16]

            self.shared_storage = SharedStorage
            n = cute.size(mOut, mode=[1]) if const_expr(self.packed) else cute.size(mW, mode=[0])
            self.kernel(mX, mW, mS, mOut, mPart, mCount).launch(
                grid=[(n + self.rows - 1) // self.rows, self.S, 1], block=[self.threads, 1, 1], stream=stream,
                cluster=[1, self.S if self.cluster else 1, 1], use_pdl=self.pdl,
                min_blocks_per_mp=self.min_ctas, preferred_smem_carveout=100 if self.min_ctas else None)

        @cute.kernel
        def kernel(self, mX: cute.Tensor, mW: cute.Tensor, mS: cute.Tensor, mOut: cute.Tensor,
                   mPart: cute.Tensor, mCount: cute.Tensor):
            tidx, _, _ = cute.arch.thread_idx()
            bid_n, bid_k, _ = cute.arch.block_idx()
            if const_expr(self.pdl):
                # the next kernel may be scheduled once all our CTAs have started; it waits for our end itself
                cute.arch.griddepcontrol_launch_dependents()
            warp = cute.arch.make_warp_uniform(cute.arch.warp_idx())
            lane = tidx % 32
            g = lane // 4
            t = lane % 4
            M = cute.size(mOut if const_expr(self.group_rows) else mX, mode=[0])
            N = cute.size(mOut, mode=[1]) if const_expr(self.packed) else cute.size(mW, mode=[0])
            Kd = self.K
            kbc = self.kbc
            mpad = self.mpad
            kb0 = bid_k * kbc                                   # first global k block of this CTA
            warp_r, warp_k = warp, 0                            # the warp's row group and K part (k_warps)
            if const_expr(self.KW > 1):
                warp_r, warp_k = warp % (self.W // self.KW), warp // (self.W // self.KW)
            row_w = bid_n * self.rows + warp_r * (16 * self.RT)  # first weight row of this warp
            smem = cutlass.utils.SmemAllocator()
            storage = smem.allocate(self.shared_storage)
            # smem activations: [token][chunk of 4 f16x2 words], chunks of 8 k
            sQ = storage.q.get_tensor(cute.make_layout((4, self.row_words // 4, mpad),
                                                       stride=(1, 4, self.row_words)))
            sX = storage.sx.get_tensor(cute.make_layout((mpad, kbc), stride=(1, mpad)))

            # ---- weight prefetch: stage = one k block of the warp's 16*RT rows: [stage][rt][row g | g+8][8 words]
            w_base = mW.iterator.toint()
            wreg = cute.make_rmem_tensor((self.D, self.RT, 2, 16 if self.w16 else 8), Int32)
            row_addr = []
            for rt in cutlass.range_constexpr(self.RT):
                for h in cutlass.range_constexpr(2):
                    r = cutlass.min(row_w + 16 * rt + g + 8 * h, N - 1)        # rows past N: read row N-1, unused
                    if const_expr(self.packed):
                        # 2 KB tile (16-row tile, k block) = [h][half][lane][16 B]; tiles past N: the last, unused
                        tile = cutlass.min((row_w + 16 * rt) // 16, (N - 1) // 16)
                        row_addr.append(w_base + (Int64(kb0 + warp_k * self.kbw) * ((N + 15) // 16)
                                                  + Int64(tile)) * PACK_TILE_BYTES + Int64(h * 1024 + lane * 16))
                    elif const_expr(self.w16):                                  # 2 bytes per weight
                        row_addr.append(w_base + Int64(r) * (2 * Kd)
                                        + Int64((kb0 + warp_k * self.kbw) * BLOCK * 2 + 32 * t))
                    else:
                        row_addr.append(w_base + Int64(r) * Kd + Int64((kb0 + warp_k * self.kbw) * BLOCK + 16 * t))

            # packed: bytes from one k block's tile to the next of the same rows
            kb_step = Int64(PACK_TILE_BYTES)
            if const_expr(self.packed):
                kb_step = Int64((N + 15) // 16) * PACK_TILE_BYTES

            def load_stage(kb, st):
                for rt in cutlass.range_constexpr(self.RT):
                    for h in cutlass.range_constexpr(2):
                        if const_expr(self.w16):   # k [16t, 16t+16) and [64+16t, ...) of the block: 4 x 16 B
                            for q in cutlass.range_constexpr(4):
                                v = _ld_v4(row_addr[2 * rt + h] + (kb * BLOCK * 2 + 128 * (q // 2) + 16 * (q % 2)),
                                           self.ld_hint)
                                for i in cutlass.range_constexpr(4):
                                    wreg[st, rt, h, 4 * q + i] = v[i]
                        for half in cutlass.range_constexpr(0 if self.w16 else 2):
                            src = row_addr[2 * rt + h] + (kb * BLOCK + 64 * half)
                            if const_expr(self.packed):
                                src = row_addr[2 * rt + h] + (kb_step * kb + 512 * half)
                            v = _ld_v4(src, self.ld_hint)
                            for i in cutlass.range_constexpr(4):
                                wreg[st, rt, h, 4 * half + i] = v[i]

            for kb in cutlass.range_constexpr(self.D):
                load_stage(kb, kb)
            n_tasks = self.n8 * kbc
            if const_expr(self.pdl):
                # weights and scales are constant; x (and the memory we write) belong to the previous kernels.
                # (A branch ptxas can't fold keeps the weight loads above the wait in the schedule.)
                if N > 0:
                    cute.arch.griddepcontrol_wait()

            # ---- weight block scales of the CTA's rows and slice -> smem fp32 [row block][k block]
            sW = storage.sw.get_tensor(cute.make_layout((self.row_blocks, kbc), stride=(kbc, 1)))
            if const_expr(not self.w16):
                if tidx < self.row_blocks * kbc:
                    rb = tidx // kbc
                    r = cutlass.min(bid_n * self.rows + rb * BLOCK, N - 1)
                    sW[rb, tidx % kbc] = _e8m0_to_f32(Int32(mS[r // BLOCK, kb0 + tidx % kbc]))

            x_base = mX.iterator.toint()
            # ---- quantize this CTA's K slice of x: warp task (token tile j, k block kb); thread (g, t) takes
            # token 8j+g, k = 16t..16t+15 and 64+16t..64+16t+15 of the block (the same k its MMA fragments use)
            xv = cute.make_rmem_tensor((16,), Int32)
            for it in cutlass.range_constexpr((n_tasks + self.W - 1) // self.W):
                task = warp + self.W * it
                if task < n_tasks:
                    j = task // kbc
                    kb = task % kbc
                    m = 8 * j + g
                    for i in cutlass.range_constexpr(16):
                        xv[i] = Int32(0)
                    if m < M:
                        xrow = Int64(m)
                        if const_expr(self.group_rows):                 # this CTA's group: x row m * G + group
                            xrow = Int64(m) * (N // self.group_rows) + (bid_n * self.rows) // self.group_rows
                        xa = x_base + (xrow * Kd + Int64((kb0 + kb) * BLOCK + 16 * t)) * 2
                        for c in cutlass.range_constexpr(4):
                            v = _ld_v4(xa + (c % 2) * 16 + (c // 2) * 128, ".cg")   # L2: x was just written
                            for i in cutlass.range_constexpr(4):
                                xv[4 * c + i] = v[i]
                    if const_expr(self.fold):
                        # x * 2^k with k = clamp(227 - E(amax), 0, 127): the block max lands in [2^100, 2^101)
                        amax = Int32(0)
                        for i in cutlass.range_constexpr(16):
                            w = xv[i]
                            amax = cutlass.max(amax, cutlass.max(w & 0x7FFF, (w >> 16) & 0x7FFF))
                        amax = cutlass.max(amax, cute.arch.shuffle_sync_bfly(amax, 1))
                        amax = cutlass.max(amax, cute.arch.shuffle_sync_bfly(amax, 2))
                        kx = cutlass.min(cutlass.max(227 - (amax >> 7), 0), 127)
                        up = _bits_f32((127 + kx) << 23)
                        for c in cutlass.range_constexpr(4):
                            qw = cute.make_rmem_tensor((4,), Int32)
                            for p in cutlass.range_constexpr(2):
                                w0 = xv[4 * c + 2 * p]                      # (x0, x1)
                                w1 = xv[4 * c + 2 * p + 1]                  # (x2, x3)
                                x0, x1 = _bits_f32(w0 << 16) * up, _bits_f32(w0 & -65536) * up
                                x2, x3 = _bits_f32(w1 << 16) * up, _bits_f32(w1 & -65536) * up
                                qw[2 * p] = pack_bf16x2(x0, x2)           # pairs (x0, x2), (x1, x3): the
                                qw[2 * p + 1] = pack_bf16x2(x1, x3)       # weights' pairing
                            chunk = kb * 16 + (c // 2) * 8 + 2 * t + (c % 2)
                            cute.autovec_copy(qw, sQ[None, chunk, 8 * j + g])
                        if t == 0:
                            sX[8 * j + g, kb] = _bits_f32((127 + 120 - kx) << 23)
                    elif const_expr(self.a16):                          # w16: bf16 pairs as they are
                        for c in cutlass.range_constexpr(4):
                            qw = cute.make_rmem_tensor((4,), Int32)
                            for i in cutlass.range_constexpr(4):
                                qw[i] = xv[4 * c + i]
                            chunk = kb * 16 + (c // 2) * 8 + 2 * t + (c % 2)
                            cute.autovec_copy(qw, sQ[None, chunk, 8 * j + g])
                    else:
                        amax = Int32(0)                                     # |bf16| bits; ints order like the values
                        for i in cutlass.range_constexpr(16):
                            w = xv[i]
                            amax = cutlass.max(amax, cutlass.max(w & 0x7FFF, (w >> 16) & 0x7FFF))
                        amax = cutlass.max(amax, cute.arch.shuffle_sync_bfly(amax, 1))
                        amax = cutlass.max(amax, cute.arch.shuffle_sync_bfly(amax, 2))
                        # ceil(log2(amax / 448)) from the bits: amax = 1.m * 2^p, 448 = 1.75 * 2^8
                        e = (amax >> 7) - 135 + Int32((amax & 0x7F) > 0x60)
                        e = cutlass.max(e, SX_MIN_EXP)
                        inv = _bits_f32((127 - e) << 23)
                        for c in cutlass.range_constexpr(4):
                            qw = cute.make_rmem_tensor((4,), Int32)
                            for i in cutlass.range_constexpr(4):
                                w = xv[4 * c + i]
                                qw[i] = _quant_pair_f16x2(_bits_f32(w << 16) * inv, _bits_f32(w & -65536) * inv)
                            chunk = kb * 16 + (c // 2) * 8 + 2 * t + (c % 2)
                            cute.autovec_copy(qw, sQ[None, chunk, 8 * j + g])
                        if t == 0:
                            sX[8 * j + g, kb] = _bits_f32((127 + e) << 23)
            cute.arch.sync_threads()

            # ---- main loop over the slice's k blocks
            acc = cute.make_rmem_tensor((self.RT, self.n8, 4), Float32)
            acc.fill(0.0)
            bq = cute.make_rmem_tensor((4, 4, self.n8), Int32)        # [word][chunk][token tile]: f16 pairs
            for kbl in cutlass.range_constexpr(self.kbw):
                kb = kbl if const_expr(self.KW == 1) else warp_k * self.kbw + kbl   # k block within the CTA slice
                st = kbl % self.D
                rs = st
                for j in cutlass.range_constexpr(self.n8):
                    for c in cutlass.range_constexpr(4):
                        chunk = kb * 16 + (c // 2) * 8 + 2 * t + (c % 2)
                        cute.autovec_copy(sQ[None, chunk, 8 * j + g], bq[None, c, j])
                for rt in cutlass.range_constexpr(self.RT):
                    sw = Float32(1.0)
                    if const_expr(not self.w16):
                        sw = sW[(warp_r * (16 * self.RT) + 16 * rt) // BLOCK, kb]
                    af = cute.make_rmem_tensor((8, 4), Int32)       # f16 (a16: bf16) A fragments of the 8 MMAs
                    cvt = _e4m3x4_to_bf16x2x2_scaled if const_expr(self.fold) else _e4m3x4_to_f16x2x2
                    for i in cutlass.range_constexpr(8):
                        if const_expr(self.w16):                      # bf16 pairs as loaded: words 2i, 2i+1
                            a0, a2 = wreg[rs, rt, 0, 2 * i], wreg[rs, rt, 0, 2 * i + 1]
                            a1, a3 = wreg[rs, rt, 1, 2 * i], wreg[rs, rt, 1, 2 * i + 1]
                        else:
                            a0, a2 = cvt(wreg[rs, rt, 0, i])
                            a1, a3 = cvt(wreg[rs, rt, 1, i])
                        af[i, 0] = a0
                        af[i, 1] = a1
                        af[i, 2] = a2
                        af[i, 3] = a3
                    for j in cutlass.range_constexpr(self.n8):
                        d = [Float32(0.0), Float32(0.0), Float32(0.0), Float32(0.0)]
                        mma = _mma_bf16 if const_expr(self.a16) else _mma_f16
                        for i in cutlass.range_constexpr(8):
                            d = mma(af[i, 0], af[i, 1], af[i, 2], af[i, 3], bq[(2 * i) % 4, i // 2, j],
                                    bq[(2 * i + 1) % 4, i // 2, j], d)
                        f0 = f1 = sw                                  # a16: the weight's block scale only
                        if const_expr(self.fold):                     # (d * 2^(120 - k)) * sw: no overflow
                            d = [d[0] * sX[8 * j + 2 * t, kb], d[1] * sX[8 * j + 2 * t + 1, kb],
                                 d[2] * sX[8 * j + 2 * t, kb], d[3] * sX[8 * j + 2 * t + 1, kb]]
                        elif const_expr(not self.a16):
                            f0 = sX[8 * j + 2 * t, kb] * sw
                            f1 = sX[8 * j + 2 * t + 1, kb] * sw
                        if const_expr(self.w16):                      # unscaled
                            for c in cutlass.range_constexpr(4):
                                acc[rt, j, c] = acc[rt, j, c] + d[c]
                        else:
                            acc[rt, j, 0] = acc[rt, j, 0] + d[0] * f0
                            acc[rt, j, 1] = acc[rt, j, 1] + d[1] * f1
                            acc[rt, j, 2] = acc[rt, j, 2] + d[2] * f0
                            acc[rt, j, 3] = acc[rt, j, 3] + d[3] * f1
                if const_expr(kbl + self.D < self.kbw):
                    load_stage(kbl + self.D, st)

            # ---- epilogue: acc[rt, j, c] = (weight row row_w + 16rt + g + 8(c//2), token 8j + 2t + c%2)
            if const_expr(self.KW > 1):
                # partials -> smem red[part][row][token]; the CTA sums the KW parts in order (deterministic)
                red = storage.red.get_tensor(cute.make_layout((self.KW, self.rows, mpad),
                                                              stride=(self.rows * mpad, 1, self.rows)))
                for rt in cutlass.range_constexpr(self.RT):
                    for j in cutlass.range_constexpr(self.n8):
                        for c in cutlass.range_constexpr(4):
                            red[warp_k, warp_r * (16 * self.RT) + 16 * rt + g + 8 * (c // 2), 8 * j + 2 * t + c % 2] = \
                                acc[rt, j, c]
                cute.arch.sync_threads()
                for it in cutlass.range_constexpr((self.rows * mpad + self.threads - 1) // self.threads):
                    e = tidx + self.threads * it
                    if e < self.rows * mpad:
                        row = e % self.rows
                        m = e // self.rows
                        ssum = red[0, row, m]
                        for z in cutlass.range_constexpr(1, self.KW):
                            ssum = ssum + red[z, row, m]
                        n = bid_n * self.rows + row
                        if m < M and n < N:
                            mOut[m, n] = ssum.to(mOut.element_type)
            elif const_expr(self.S == 1):
                for rt in cutlass.range_constexpr(self.RT):
                    for j in cutlass.range_constexpr(self.n8):
                        for c in cutlass.range_constexpr(4):
                            n = row_w + 16 * rt + g + 8 * (c // 2)
                            m = 8 * j + 2 * t + c % 2
                            if n < N and m < M:
                                mOut[m, n] = acc[rt, j, c].to(mOut.element_type)
            elif const_expr(self.cluster):
                # partial -> own smem red[m][row]; cluster barrier; CTA z of the cluster sums elements
                # [z E/S, (z+1) E/S) over the S CTAs in rank order (deterministic); barrier again before exit
                red = storage.red.get_tensor(cute.make_layout((self.rows, mpad), stride=(1, self.rows)))
                for rt in cutlass.range_constexpr(self.RT):
                    for j in cutlass.range_constexpr(self.n8):
                        for c in cutlass.range_constexpr(4):
                            red[warp * (16 * self.RT) + 16 * rt + g + 8 * (c // 2), 8 * j + 2 * t + c % 2] = \
                                acc[rt, j, c]
                cute.arch.cluster_arrive()
                cute.arch.cluster_wait()
                red_base = storage.red.data_ptr().toint()
                n_el = self.rows * mpad
                chunk = -(-n_el // self.S)                                  # S need not divide (e.g. S = 3)
                for it in cutlass.range_constexpr((chunk + self.threads - 1) // self.threads):
                    e = bid_k * chunk + tidx + self.threads * it
                    if tidx + self.threads * it < chunk and e < n_el:
                        ssum = Float32(0.0)
                        for z in cutlass.range_constexpr(self.S):
                            ssum = ssum + _ld_dsmem_f32(red_base + e * 4, z)
                        m = e // self.rows
                        n = bid_n * self.rows + e % self.rows
                        if m < M and n < N:
                            mOut[m, n] = ssum.to(mOut.element_type)
                cute.arch.cluster_arrive()
                cute.arch.cluster_wait()
            else:
                for rt in cutlass.range_constexpr(self.RT):
                    for j in cutlass.range_constexpr(self.n8):
                        for c in cutlass.range_constexpr(4):
                            n = row_w + 16 * rt + g + 8 * (c // 2)
                            m = 8 * j + 2 * t + c % 2
                            if m < M:
                                mPart[bid_k, m, n] = acc[rt, j, c]
                cute.arch.fence_acq_rel_gpu()
                cute.arch.sync_threads()
                arrived = storage.arrived.get_tensor(cute.make_layout(4))
                if tidx == 0:
                    arrived[0] = cute.arch.atomic_add(mCount.iterator + bid_n, Int32(1), sem="acq_rel", scope="gpu")
                cute.arch.sync_threads()
                if arrived[0] == self.S - 1:
                    # last slice of this row group: y = sum_z partial[z] in slice order, 4 rows per thread per step
                    cute.arch.fence_acq_rel_gpu()
                    npad = cute.size(mPart, mode=[2])
                    p_base = mPart.iterator.toint()
                    quads = self.rows // 4
                    for it in cutlass.range_constexpr(self.RT * self.n8):
                        idx = tidx + self.threads * it
                        m = idx // quads
                        n = bid_n * self.rows + 4 * (idx % quads)
                        if m < M:
                            s = [Float32(0.0)] * 4
                            for z in cutlass.range_constexpr(self.S):
                                v = _ld_cg_v4f(p_base + ((Int64(z) * M + m) * npad + n) * 4)
                                s = [s[u] + v[u] for u in range(4)]
                            for u in cutlass.range_constexpr(4):
                                if n + u < N:
                                    mOut[m, n + u] = s[u].to(mOut.element_type)
                    if tidx == 0:
                        mCount[bid_n] = 0


def _compile_gemv(k_dim: int, k_splits: int, n8: int, row_tiles: int, warps: int, stages: int, pdl: bool = True,
                  cluster: bool = False, min_ctas: int = 0, a16: bool = False, group_rows: int = 0, w16: bool = False,
                  k_warps: int = 1, packed: bool = False):
    """Compiled Fp8Gemv for one static config (TVM-FFI entry: call with torch tensors on the current stream).
    packed (pack_fp8_gemv_weight's layout): the weight argument is its data viewed as uint8 [N16, K]."""
    config = ("gemv", k_dim, k_splits, n8, row_tiles, warps, stages, pdl, cluster, min_ctas) + \
        (("a16", group_rows) if a16 else ()) + (("w16",) if w16 else ()) + (("kw", k_warps) if k_warps > 1 else ()) + \
        (("packed",) if packed else ()) + (WEIGHT_LD_HINT,)

    def build():
        op = Fp8Gemv(k_dim, k_splits, n8, row_tiles, warps, stages, pdl, cluster, min_ctas, a16, group_rows, w16,
                     k_warps, packed)
        m, n, nb = cute.sym_int(), cute.sym_int(), cute.sym_int()
        mx = cute.sym_int() if group_rows else m                           # grouped: x is [M * G, K]
        nw = cute.sym_int() if packed else n                               # packed: N rounded up to 16 rows
        mk = cute.runtime.make_fake_compact_tensor
        args = (mk(BFloat16, (mx, k_dim), stride_order=(1, 0), assumed_align=16),
                mk(Uint8, (nw, 2 * k_dim if w16 else k_dim), stride_order=(1, 0), assumed_align=16),   # w16: bytes
                mk(Uint8, (nb, k_dim // BLOCK), stride_order=(1, 0), assumed_align=1),
                mk(Float32 if w16 else BFloat16, (m, n), stride_order=(1, 0), assumed_align=4),
                mk(Float32, (cute.sym_int(), cute.sym_int(), cute.sym_int()), stride_order=(2, 1, 0),
                   assumed_align=16),
                mk(Int32, (cute.sym_int(),), assumed_align=4),
                cute.runtime.make_fake_stream(use_tvm_ffi_env_stream=True))
        return op, args
    return _load_or_compile(config, build)


# ----------------------------------------------------------------------------------------------------------------
# Torch-facing
GEMV_USE_PDL = True
_NUM_SMS: dict = {}


def _row_counters(device, n: int) -> torch.Tensor:
    """Zeroed per-row-group arrival counters for split-K (the last CTA resets its counter, so the buffer stays zero
    between launches); one buffer per stream (arrival_counters)."""
    return arrival_counters(device, n, 1 << 12)


def _gemv_takes(x: torch.Tensor, weight: torch.Tensor, weight_dtype) -> bool:
    """Fp8Gemv's input contract: CuTe DSL + sm_90 GPU, bf16 x with <= MAX_ROWS rows, weight [N, K] of weight_dtype
    with K a multiple of 128 and contiguous 16-byte aligned rows."""
    if not (HAVE_CUTE and x.is_cuda and weight.is_cuda and x.dtype == torch.bfloat16
            and weight.dtype == weight_dtype and weight.dim() == 2):
        return False
    if not _sm90(x.device):
        return False
    N, Kd = weight.shape
    M = math.prod(x.shape[:-1])
    return (x.shape[-1] == Kd and Kd % BLOCK == 0 and 1 <= M <= MAX_ROWS and N >= 1
            and weight.stride(1) == 1 and weight.stride(0) == Kd and weight.data_ptr() % 16 == 0)


def fp8_gemv_supported(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """True if fp8_gemv runs the kernel for these inputs: CuTe DSL + sm_90 GPU, bf16 x with <= 16 rows,
    e4m3 weight [N, K] with K a multiple of 128 (act_quant's block) and contiguous rows."""
    return _gemv_takes(x, weight, torch.float8_e4m3fn)


GEMV_PACKED = os.environ.get("NANO_DSV4_GEMV_PACKED", "1") != "0"   # decode GEMVs read the packed weight copies
                        # (pack_fp8_gemv_weight; dsv4 Linear.packed, made at load where this is on): same bits. H200,
                        # bench decode --layers 4, same run, every FP8 linear packed (dsv4.GEMV_PACK "all", order 2)
                        # vs row-major: s8 R2 -0.015 / -0.008 ms per step at B = 1 / 8, s9 (7 rounds) -0.012 / -0.011;
                        # wo_a alone (s8 R1): 0.121 vs 0.120 ms/layer (noise)
def fp8_gemv(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, config: dict | None = None,
             packed_rows: int = 0) -> torch.Tensor:
    """act_quant_fp8(x) x (weight * scale)^T for decode: x [..., K] bf16 (M = prod of leading dims <= 16),
    weight [N, K] float8_e4m3fn, scale [ceil(N/128), K/128] float8_e8m0fnu -> [..., N] bf16. One kernel launch,
    no host sync (CUDA-graph capturable). Semantics: fp8_gemv_reference. Raises ValueError for inputs it can't take
    (check fp8_gemv_supported first).
    packed_rows = N > 0: weight is pack_fp8_gemv_weight's [N16, K] of an [N, K] weight (same bits, same config)."""
    Kd = x.shape[-1]
    N = packed_rows or weight.shape[0]
    M = math.prod(x.shape[:-1])
    if M == 0:
        return x.new_empty(*x.shape[:-1], N)
    if M > MAX_ROWS:
        raise ValueError(f"fp8_gemv takes at most {MAX_ROWS} rows, got {M} (use the GEMM path)")
    if not fp8_gemv_supported(x, weight):
        raise ValueError(f"fp8_gemv can't take x {tuple(x.shape)} {x.dtype} {x.device}, weight {tuple(weight.shape)} "
                         f"{weight.dtype}: needs CuTe DSL, sm_90, bf16 x, e4m3 weight, K % 128 == 0")
    nb, kb = -(-N // BLOCK), Kd // BLOCK
    if tuple(scale.shape) != (nb, kb) or scale.dtype != torch.float8_e8m0fnu:
        raise ValueError(f"fp8_gemv: scale must be float8_e8m0fnu [{nb}, {kb}], got {tuple(scale.shape)} {scale.dtype}")
    dev = x.device
    if dev not in _NUM_SMS:
        _NUM_SMS[dev] = torch.cuda.get_device_properties(dev).multi_processor_count
    cfg = {"pdl": GEMV_USE_PDL, **(config or pick_gemv_config(N, Kd, M, _NUM_SMS[dev]))}   # config: benchmarks only
    if packed_rows:
        if weight.shape[0] != -(-N // 16) * 16:
            raise ValueError(f"fp8_gemv: a packed weight of {N} rows is [{-(-N // 16) * 16}, K], got {tuple(weight.shape)}")
        cfg["packed"] = True
    fn = _compile_gemv(**cfg)
    rows = cfg["warps"] // cfg.get("k_warps", 1) * 16 * cfg["row_tiles"]
    row_ctas = -(-N // rows)
    x2 = x.reshape(M, Kd).contiguous()
    if x2.data_ptr() % 16:                                           # a view at an odd offset: 16-byte loads
        x2 = x2.clone()
    out = torch.empty(M, N, dtype=torch.bfloat16, device=dev)
    if cfg["k_splits"] > 1 and not cfg.get("cluster"):
        part = torch.empty(cfg["k_splits"], M, row_ctas * rows, dtype=torch.float32, device=dev)
    else:
        part = _COUNTERS.get((dev, "unused"))
        if part is None:      # made once (not per call: a fill inside a graph capture would add a kernel node)
            part = _COUNTERS[(dev, "unused")] = torch.zeros(1, 1, 4, dtype=torch.float32, device=dev)
    fn(x2, weight.view(torch.uint8), scale.contiguous().view(torch.uint8), out, part, _row_counters(dev, row_ctas))
    return out.view(*x.shape[:-1], N)


# ----------------------------------------------------------------------------------------------------------------
# bf16 GEMV with an fp32 output (dsv4.matmul_fp32 at decode: compressor wkv|wgate, indexer weights_proj)
#
#     y[m, n] = sum_k x[m, k] * W[n, k]   (bf16 values, exact products, fp32 sums, fp32 out)
#
# The Fp8Gemv kernel with w16: the bf16 weight rows go straight into mma.sync bf16 (no scales, no act quant).
def bf16_gemv_fp32_reference(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [..., K] @ weight [N, K]^T in fp32 (the reference's fp32 matmul of bf16 values) -> [..., N] fp32."""
    return torch.nn.functional.linear(x.float(), weight.float())


def bf16_gemv_fp32_supported(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """True if bf16_gemv_fp32 runs the kernel: CuTe DSL + sm_90, bf16 x with <= 16 rows, bf16 weight [N, K] with
    K % 128 == 0 and contiguous 16-byte aligned rows."""
    return _gemv_takes(x, weight, torch.bfloat16)


def bf16_gemv_fp32(x: torch.Tensor, weight: torch.Tensor, config: dict | None = None) -> torch.Tensor:
    """x [..., K] bf16 (M = prod of leading dims <= 16) @ weight [N, K] bf16 ^T -> [..., N] fp32, one launch, no host
    sync (CUDA-graph capturable). Semantics: bf16_gemv_fp32_reference (fp32 sums in another order)."""
    Kd = x.shape[-1]
    N = weight.shape[0]
    M = math.prod(x.shape[:-1])
    if M == 0:
        return x.new_empty(*x.shape[:-1], N, dtype=torch.float32)
    if not bf16_gemv_fp32_supported(x, weight):
        raise ValueError(f"bf16_gemv_fp32 can't take x {tuple(x.shape)} {x.dtype} {x.device}, weight "
                         f"{tuple(weight.shape)} {weight.dtype}: needs CuTe DSL, sm_90, bf16, <= {MAX_ROWS} rows, "
                         "K % 128 == 0")
    dev = x.device
    if dev not in _NUM_SMS:
        _NUM_SMS[dev] = torch.cuda.get_device_properties(dev).multi_processor_count
    cfg = {"pdl": GEMV_USE_PDL, **(config or pick_gemv_config(N, Kd, M, _NUM_SMS[dev], elem_bytes=2)), "w16": True}
    fn = _compile_gemv(**cfg)
    rows = cfg["warps"] // cfg.get("k_warps", 1) * 16 * cfg["row_tiles"]
    row_ctas = -(-N // rows)
    x2 = x.reshape(M, Kd).contiguous()
    if x2.data_ptr() % 16:
        x2 = x2.clone()
    out = torch.empty(M, N, dtype=torch.float32, device=dev)
    if cfg["k_splits"] > 1 and not cfg.get("cluster"):
        part = torch.empty(cfg["k_splits"], M, row_ctas * rows, dtype=torch.float32, device=dev)
    else:
        part = _COUNTERS.get((dev, "unused"))
        if part is None:
            part = _COUNTERS[(dev, "unused")] = torch.zeros(1, 1, 4, dtype=torch.float32, device=dev)
    no_scale = _COUNTERS.get((dev, "no_scale", Kd))
    if no_scale is None:                       # the scale argument's shape; w16 reads none of it
        no_scale = _COUNTERS[(dev, "no_scale", Kd)] = torch.zeros(1, Kd // BLOCK, dtype=torch.uint8, device=dev)
    fn(x2, weight.view(torch.uint8), no_scale, out, part, _row_counters(dev, row_ctas))
    return out.view(*x.shape[:-1], N)


# ----------------------------------------------------------------------------------------------------------------
# Grouped W8A16 GEMV (attention's wo_a at decode, issue #5)
#
#     z[m, g, r] = sum_k x[m, g, k] * W[g R + r, k] * sw[(g R + r) // 128, k // 128]   (fp32) -> bf16 once
#
# x [M, G, K] bf16 is NOT quantized; W [G R, K] e4m3 with e8m0 128x128 block scales (wo_a as stored: the reference
# dequantizes it to bf16 at load and runs a bf16 einsum; W * sw is exact in bf16, so this is the same math up to the
# fp32 summation order, reading half the bytes). The Fp8Gemv kernel with a16 + group_rows = R: activations go to smem
# as bf16, weights e4m3 -> bf16 exactly in registers, mma.sync bf16 with fp32 accumulation, each 128-k block's partial
# times sw in fp32; a CTA's rows lie in one group g and read x row m * G + g.
def fp8_gemv_grouped_reference(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [..., G, K] (any float dtype), weight [G R, K] e4m3, scale [ceil(G R / 128), K / 128] e8m0 -> [..., G, R] in
    x.dtype: dequantized fp32 weight, fp32 products and sums, one rounding. Semantics of fp8_gemv_grouped."""
    G, Kd = x.shape[-2:]
    w = dequant_fp8_weight(weight, scale).unflatten(0, (G, -1))              # [G, R, K] fp32
    return torch.einsum("...gk,grk->...gr", x.float(), w).to(x.dtype)


GROUPED_CHUNK_ROWS = 256   # fp8_gemv_grouped runs up to this many rows as launches of 16 (prefill of short prompts:
                           # H200 R2, Flash wo_a, T=64: ~4 x 11 us vs 250 us for the per-call dequant + einsum)


def pick_grouped_gemv_config(N: int, K: int, M: int, group_rows: int, num_sms: int) -> dict:
    """Static config of the grouped W8A16 kernel for x [M, G, K], W [N = G R, K] (session 4's rules; session 5 kept
    them: its k_warps layout already is _pick_gemv_config_s5's; measured alternatives, Flash wo_a, M = 1, s5 R0 H200
    / R1 H100, kernel us, behind a PDL GEMV in brackets: these 12.6 (10.9) / 15.1 (13.2); 4 global K slices of
    128-row 2-stage CTAs 12.0 (13.4) / 15.3 (16.2): not taken). Big weights (wo_a: 32/64 MB,
    bandwidth-bound): the first layout whose CTAs fill >= 90% of one wave of resident CTAs:
    64-row CTAs of 16 warps splitting K four ways inside the CTA (k_warps=4; one CTA per SM), else 128-row CTAs of
    8 warps with K split over 2, 4 or 8 CTAs (global partials; two CTAs per SM). H200 R2, M=1: Flash (128 CTAs)
    k_warps 10.4 us vs 10.8 for 4 CTA slices (12.5-16 us for other shapes); Pro: 2 CTA slices 19.4 us vs 20.0
    (k_warps, 2 waves) and 20.3 (4 slices). Else pick_gemv_config's rules. A CTA's rows divide R (one group)."""
    kb = K // BLOCK
    c = _pick_gemv_config_s4(N, K, M, num_sms)
    if N * K >= BIG_WEIGHT_BYTES and group_rows % 128 == 0:
        choice = None
        if kb % 4 == 0 and 0.9 * num_sms <= N / 64 <= num_sms:
            choice = dict(k_splits=1, k_warps=4, warps=16, row_tiles=1, stages=GEMV_KWARP_STAGES)
        for splits in (2, 4, 8):
            if choice is None and kb % splits == 0 and kb // splits <= MAX_SLICE_BLOCKS \
                    and 0.9 * 2 * num_sms <= N / 128 * splits <= 2 * num_sms:
                choice = dict(k_splits=splits, warps=8, row_tiles=1, stages=4)
        if choice is None:                           # the most CTAs of at most 8 slices: latency-bound anyway
            splits = max(d for d in (1, 2, 4, 8) if kb % d == 0 and kb // d <= MAX_SLICE_BLOCKS)
            choice = dict(k_splits=splits, warps=8, row_tiles=1, stages=4)
        c = dict(c, **choice, cluster=False)
    while group_rows % (c["warps"] // c.get("k_warps", 1) * 16 * c["row_tiles"]):
        c = {**c, "row_tiles": 1} if c["row_tiles"] > 1 else {**c, "warps": c["warps"] // 2}
    return {**c, "a16": True, "group_rows": group_rows}


def fp8_gemv_grouped_supported(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """True if fp8_gemv_grouped runs the kernel: CuTe DSL + sm_90 GPU, bf16 x [..., G, K] with <= 256 leading rows,
    e4m3 weight [G R, K] with K % 128 == 0, R % 32 == 0, contiguous rows."""
    if not (HAVE_CUTE and x.is_cuda and weight.is_cuda and x.dtype == torch.bfloat16 and x.dim() >= 2
            and weight.dtype == torch.float8_e4m3fn and weight.dim() == 2):
        return False
    if not _sm90(x.device):
        return False
    N, Kd = weight.shape
    G = x.shape[-2]
    M = math.prod(x.shape[:-2])
    return (x.shape[-1] == Kd and Kd % BLOCK == 0 and 1 <= M <= GROUPED_CHUNK_ROWS and G >= 1 and N % G == 0
            and (N // G) % 32 == 0 and weight.stride(1) == 1 and weight.stride(0) == Kd
            and weight.data_ptr() % 16 == 0)


def fp8_gemv_grouped(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                     config: dict | None = None, packed: bool = False) -> torch.Tensor:
    """Grouped W8A16 product for decode: x [..., G, K] bf16 (M = prod of leading dims <= 256), weight [G R, K]
    float8_e4m3fn, scale [G R / 128, K / 128] float8_e8m0fnu -> [..., G, R] bf16. One kernel launch per 16 rows
    (decode: one), no host sync (CUDA-graph capturable). Semantics: fp8_gemv_grouped_reference. Raises ValueError
    for inputs it can't take (check fp8_gemv_grouped_supported first). packed: weight is pack_fp8_gemv_weight's
    (R % 32 == 0: no pad rows, same shape)."""
    G, Kd = x.shape[-2:]
    N = weight.shape[0]
    M = math.prod(x.shape[:-2])
    R = N // max(G, 1)
    if M == 0:
        return x.new_empty(*x.shape[:-1], R)
    if M > GROUPED_CHUNK_ROWS:
        raise ValueError(f"fp8_gemv_grouped takes at most {GROUPED_CHUNK_ROWS} rows, got {M} (use the GEMM path)")
    if not fp8_gemv_grouped_supported(x, weight):
        raise ValueError(f"fp8_gemv_grouped can't take x {tuple(x.shape)} {x.dtype} {x.device}, weight "
                         f"{tuple(weight.shape)} {weight.dtype}: needs CuTe DSL, sm_90, bf16 x [..., G, K], e4m3 "
                         "weight [G R, K], K % 128 == 0, R % 32 == 0")
    nb, kb = -(-N // BLOCK), Kd // BLOCK
    if tuple(scale.shape) != (nb, kb) or scale.dtype != torch.float8_e8m0fnu:
        raise ValueError(f"fp8_gemv_grouped: scale must be float8_e8m0fnu [{nb}, {kb}], got {tuple(scale.shape)} "
                         f"{scale.dtype}")
    dev = x.device
    if dev not in _NUM_SMS:
        _NUM_SMS[dev] = torch.cuda.get_device_properties(dev).multi_processor_count
    x2 = x.reshape(M * G, Kd).contiguous()
    if x2.data_ptr() % 16:                                           # a view at an odd offset: 16-byte loads
        x2 = x2.clone()
    out = torch.empty(M, N, dtype=torch.bfloat16, device=dev)
    w8, s8 = weight.view(torch.uint8), scale.contiguous().view(torch.uint8)
    for m0 in range(0, M, MAX_ROWS):                                 # decode: one launch
        m = min(MAX_ROWS, M - m0)
        cfg = {"pdl": GEMV_USE_PDL, **(config or pick_grouped_gemv_config(N, Kd, m, R, _NUM_SMS[dev]))}
        if packed:
            cfg["packed"] = True
        if not cfg.get("a16") or cfg.get("group_rows") != R:
            raise ValueError(f"fp8_gemv_grouped: config must have a16=True and group_rows={R}, got {cfg}")
        fn = _compile_gemv(**cfg)
        rows = cfg["warps"] // cfg.get("k_warps", 1) * 16 * cfg["row_tiles"]
        row_ctas = -(-N // rows)
        if cfg["k_splits"] > 1 and not cfg.get("cluster"):
            part = torch.empty(cfg["k_splits"], m, row_ctas * rows, dtype=torch.float32, device=dev)
        else:
            part = _COUNTERS.get((dev, "unused"))
            if part is None:      # made once (not per call: a fill inside a graph capture would add a kernel node)
                part = _COUNTERS[(dev, "unused")] = torch.zeros(1, 1, 4, dtype=torch.float32, device=dev)
        fn(x2[m0 * G:(m0 + m) * G], w8, s8, out[m0:m0 + m], part, _row_counters(dev, row_ctas))
    return out.view(*x.shape[:-1], R)


# ====================================================================================================================
# FP4 MoE GEMV for decode (issues #3, #5): the routed-expert GEMMs at small T on mma.sync, weights streamed to registers
# ====================================================================================================================
# Same records (prepare_experts), same routing outputs (the MoeRouting / MoeRoutingGather tile table at tile_n 8,
# x_sorted, row_w) and the same MoeCombine as moe_fp4; only the two GEMMs differ (Fp4MoeGemv instead of
# Fp4GroupedGemm), built like Fp8Gemv:
# - Fragment identity: in a record, thread t = 32*warp + lane of the wgmma warpgroup holds rows 16*warp + lane//4 and
#   +8 of each 64-row atom and k = 2*(lane%4) + {0,1,8,9} of each k16 block, as registers R0..R3 = (r, k), (r+8, k),
#   (r, k+8), (r+8, k+8). That is exactly the mma.sync m16n8k16 A fragment of lane (groupID = lane//4,
#   threadID_in_group = lane%4) for the warp's 16-row slab (a0a1, a2a3, a4a5, a6a7), so a warp's slab of a record is
#   its 512 contiguous code bytes (16 B per lane) + its 8 quads' scale bytes: no register permutation, no new layout.
# - CTA = (K slice z, 128-row tile m, token tile j), 4 warps; warp w streams slab w of both atoms of each record
#   (GEMM1: 16 gate rows and the matching 16 up rows: SwiGLU stays in-thread) with 16-B ld.global.nc loads, `stages`
#   k-tiles (1152 B nvfp4) in flight per warp, decodes with decode_fp4x8_scaled / scale pairs and runs 8 mma.sync
#   m16n8k16 bf16 (fp32 accumulators) per 64-k tile, the tile's <= 8 tokens being the n8 B operand.
# - Tokens: the tile's rows of x_sorted for the K slice go to smem once, permuted inside each 64-k tile so that lane
#   (g, t) reads its B fragments (token g, k = 16kb + 2t + {0,1,8,9}) of two k16 blocks with one 16-B load; lanes of
#   tokens >= rows read the last real row (their columns are discarded). Row pitch +64 B: conflict-free.
# - Split-K: the S slices of (m, j) form one thread-block cluster; each puts its fp32 partial in its smem, and after a
#   cluster barrier slice z sums its 1/S share of (row, token) outputs over the S CTAs in rank order (DSMEM,
#   deterministic) and runs the epilogue (same math as Fp4GroupedGemm.epilogue).
# - PDL as Fp4GroupedGemm: weight loads are issued before griddepcontrol.wait (GEMM2 streams its weights while GEMM1
#   drains); wait_first: the tile table itself comes from the kernel right before (routing + gather).
MOE_GEMV_TILE_N = 8          # token tile of the routing table the GEMV reads (one n8 mma tile)
MOE_GEMV_MAX_K_TILES = 32    # 64-k tiles per CTA at most (smem holds 8 token rows of the K slice: 33 KB)
MOE_GEMV_STAGES = 4          # k-tiles of weight loads in flight per warp
MOE_GEMV_WARPS_PER_SM = 24   # resident warps per SM the config rule plans for (ptxas fits the registers: <= 80)
MOE_GEMV_WAVES = 1           # the config rule's target: all CTAs in this many waves of resident warps
MOE_GEMV_FORCE = (None, None)   # benchmarks: (S, MT) of GEMM1 / GEMM2 instead of the rule


if HAVE_CUTE:
    @dsl_user_op
    def _atom_inc_gpu(addr: Int64, limit: int, *, loc=None, ip=None) -> Int32:
        """atom.inc (relaxed, gpu scope) on a global u32: old >= limit ? 0 : old + 1; returns old."""
        return Int32(_llvm.inline_asm(_T.i32(), [Int64(addr).ir_value(loc=loc, ip=ip), _i32(limit, loc, ip)],
                                      "atom.relaxed.gpu.global.inc.u32 $0, [$1], $2;", "=r,l,r",
                                      has_side_effects=True, loc=loc, ip=ip))

    @dsl_user_op
    def _nth_set_bit(mask: Int32, n: Int32, *, loc=None, ip=None) -> Int32:
        """Bit position of the n-th (1-based) set bit of mask, counting up from bit 0 (fns); 0xffffffff if none."""
        return Int32(_llvm.inline_asm(_T.i32(), [Int32(mask).ir_value(loc=loc, ip=ip),
                                                 Int32(n).ir_value(loc=loc, ip=ip)],
                                      "fns.b32 $0, $1, 0, $2;", "=r,r,r", has_side_effects=False, loc=loc, ip=ip))

    @dsl_user_op
    def _ld_dsmem_i32(smem_addr: Int32, rank: Int32, *, loc=None, ip=None) -> Int32:
        """Int32 at this CTA's shared address smem_addr, read from CTA `rank` of the cluster (DSMEM)."""
        return Int32(_llvm.inline_asm(
            _T.i32(), [Int32(smem_addr).ir_value(loc=loc, ip=ip), Int32(rank).ir_value(loc=loc, ip=ip)],
            "{\n.reg .b32 a;\nmapa.shared::cluster.u32 a, $1, $2;\nld.shared::cluster.u32 $0, [a];\n}",
            "=r,r,r", has_side_effects=True, loc=loc, ip=ip))

    class Fp4MoeGemv:
        """One grouped decode GEMM over experts on mma.sync (see the section comment): out[rows of tile j] =
        x_sorted[rows] · W_e^T with W_e fp4 records. swiglu=True (GEMM1): W = interleaved w13, epilogue
        a = w_route·silu(min(h·α_gate, L))·clamp(u·α_up, ±L) -> bf16 [rows, I]; swiglu=False (GEMM2): W = w2,
        out = acc·α_down -> bf16 [rows, D]. Static: format, K, output width, K slices, stages, 128-row tiles per CTA
        (m_per_cta: 4 warps each, sharing the CTA's token smem); rows/experts symbolic."""

        def __init__(self, fmt: str, k_dim: int, n_out: int, swiglu: bool, k_splits: int = 1, stages: int = 4,
                     pdl: bool = False, wait_first: bool = False, min_ctas: int = 0, m_per_cta: int = 1,
                     by_slot: bool = False, direct_k: int = 0):
            self.fmt, self.k_dim, self.n_out, self.swiglu = fmt, k_dim, n_out, swiglu
            # by_slot (GEMM1 right after the routing kernel): CTA z-index = routed slot s; its expert comes from
            # topk_ids (ready before routing ends), so its weight loads start while the routing kernel still runs.
            # The slots of one expert, in slot order, share its rows in x_sorted (contiguous: [min pos, + count)) by
            # groups of 8: the slot whose rank o among them is a multiple of 8 takes rows o .. o+7; the other slots
            # (and skipped ones) exit.
            self.by_slot = by_slot
            assert not by_slot or direct_k or (pdl and wait_first), "by_slot: a PDL launch right after the routing kernel"
            self.S = k_splits
            self.k_tiles = k_dim // TILE_K
            assert self.k_tiles % k_splits == 0 and k_splits <= 8, "K slices: a divisor of K/64, a portable cluster"
            self.kpc = self.k_tiles // k_splits                     # k-tiles per CTA (its K slice)
            self.D = max(1, min(stages, self.kpc))
            while self.kpc % self.D:
                self.D -= 1
            self.m_tiles = (2 * n_out if swiglu else n_out) // TILE_M
            self.MT = m_per_cta
            assert self.m_tiles % m_per_cta == 0
            self.rec = record_bytes(fmt)
            self.nw = _scale_words_per_atom(fmt)
            self.row_words = self.kpc * 32 + 16                     # Int32 words per token row in smem (+64 B)
            self.threads = 128 * m_per_cta
            self.pdl, self.wait_first, self.min_ctas = pdl, wait_first, min_ctas
            # Fp4MoeGemvFused roles (0: a launch of its own): signal_kpc > 0 (GEMM1): after its stores each CTA adds 1
            # to the readiness counter of (slot, GEMM2 K slice of its act columns), GEMM2 slices of signal_kpc k-tiles;
            # wait_target > 0 (GEMM2): a CTA waits for its (slot, K slice) counter to reach wait_target before
            # reading act, then counts itself as one of wait_readers readers (the last one wraps the counter to 0)
            self.signal_kpc, self.wait_target, self.wait_readers = 0, 0, 0
            self.in_fused = False          # Fp4MoeGemvFused's roles (item from ticket smem)
            self.stamps = False            # probe (Fp4MoeGemvFused stamps): %globaltimer per CTA into mNext (Int32)
            # fused, no routing kernel (direct_k = top-k > 0; by_slot, <= 32 routed slots): the item of slot s reads
            # topk_ids itself (after griddepcontrol.wait: the router is the kernel right before); its rows are the
            # slots of its expert in slot order (rank o .. o+7 of them, from one ballot mask), row n = slot s_n:
            # GEMM1 reads x[s_n // k] and writes act[s_n], GEMM2 reads act[s_n] and writes y_rows[s_n]; the routing
            # weight is topk_weights[s_n] (mRowW = the flat weights). The slots s_n live in ticket smem [16 + n].
            self.direct_k = direct_k
            # direct_k in a launch of its own (MOE_GEMV_DIRECT, two launches without a routing kernel): GEMM1
            # (wait_first) waits for the router before it reads the ids; GEMM2 (pdl, not wait_first) reads them at
            # once (GEMM1's CTAs started only after the router's end), issues its weight loads and then waits for act
            self.direct_wait = wait_first or not pdl
            # tok_async (MOE_GEMV_TOK_ASYNC): the token rows go to smem by 4-byte cp.async (every load of a thread in
            # flight at once, no register staging; same words, same places) instead of 16-byte loads + 4 st.shared
            # per chunk (one L2 round trip per loop iteration)
            self.tok_async = False
            self.ld_hint = WEIGHT_LD_HINT

        def smem_words(self) -> int:
            """Int32 words of token smem (and, S > 1, of the fp32 partial [MT, 2, 64, 8] after the main loop)."""
            return max(MOE_GEMV_TILE_N * self.row_words, self.MT * 2 * 64 * MOE_GEMV_TILE_N if self.S > 1 else 0)

        def storage_struct(self):
            """Shared storage of a launch of its own: token rows (+ the partials); direct_k: + the item's slots."""
            fields = {"xs": cute.struct.Align[cute.struct.MemRange[Int32, self.smem_words()], 16]}
            if self.direct_k > 0:                               # [16..31]: the item's slots and input rows
                fields["ticket"] = cute.struct.Align[cute.struct.MemRange[Int32, 32], 16]
            return cute.struct(type("SharedStorage", (), {"__annotations__": fields}))

        @cute.jit
        def __call__(self, mW: cute.Tensor, mX: cute.Tensor, mOut: cute.Tensor, mTiles: cute.Tensor,
                     mAlpha0: cute.Tensor, mAlpha1: cute.Tensor, mRowW: cute.Tensor, limit: Float32,
                     mIds: cute.Tensor, mPos: cute.Tensor, mNext: cute.Tensor, stream):
            self.shared_storage = self.storage_struct()
            n_tab = cute.size(mTiles, mode=[0])
            if const_expr(self.by_slot):
                n_tab = cute.size(mIds, mode=[0])
            self.kernel(mW, mX, mOut, mTiles, mAlpha0, mAlpha1, mRowW, limit, mIds, mPos, mNext).launch(
                grid=[self.S, self.m_tiles // self.MT, n_tab], block=[self.threads, 1, 1], stream=stream,
                cluster=[self.S, 1, 1], use_pdl=self.pdl, min_blocks_per_mp=self.min_ctas,
                preferred_smem_carveout=100 if self.min_ctas else None)

        @cute.jit
        def slot_rows(self, mIds: cute.Tensor, mPos: cute.Tensor, expert, rank):
            """by_slot, after the weight prologue: wait for the routing + gather kernel, then this slot's rows:
            [min pos over the expert's slots + rank, + min(count - rank, 8))."""
            if expert < (1 << 30):              # (a branch ptxas can't fold keeps the weight loads above the wait)
                cute.arch.griddepcontrol_wait()
            cute.arch.griddepcontrol_launch_dependents()
            tidx, _, _ = cute.arch.thread_idx()
            n_slots = cute.size(mIds, mode=[0])
            count = Int32(0)
            row0 = Int32(1 << 30)
            for base2 in cutlass.range(0, Int32(n_slots), 32, unroll=1):
                j2 = base2 + tidx % 32
                p_j2 = Int32(1 << 30)
                e_j2 = Int32(-1)
                if j2 < n_slots:
                    e_j2 = mIds[j2]
                    p_j2 = mPos[j2]
                if e_j2 != expert:
                    p_j2 = Int32(1 << 30)
                count = count + Int32(cute.arch.popc(cute.arch.vote_ballot_sync(e_j2 == expert)))
                row0 = cutlass.min(row0, Int32(cute.arch.warp_redux_sync(p_j2, "min")))
            return row0 + rank, cutlass.min(count - rank, MOE_GEMV_TILE_N)

        @cute.kernel
        def kernel(self, mW: cute.Tensor, mX: cute.Tensor, mOut: cute.Tensor, mTiles: cute.Tensor,
                   mAlpha0: cute.Tensor, mAlpha1: cute.Tensor, mRowW: cute.Tensor, limit: Float32,
                   mIds: cute.Tensor, mPos: cute.Tensor, mNext: cute.Tensor):
            tidx, _, _ = cute.arch.thread_idx()
            bid_k, bid_m, bid_t = cute.arch.block_idx()
            smem = cutlass.utils.SmemAllocator()
            storage = smem.allocate(self.shared_storage)
            self.tile(storage, mW, mX, mOut, mTiles, mAlpha0, mAlpha1, mRowW, limit, mIds, mPos, mNext, mIds,
                      tidx, bid_k, bid_m, bid_t)

        @cute.jit
        def tile(self, storage, mW: cute.Tensor, mX: cute.Tensor, mOut: cute.Tensor, mTiles: cute.Tensor,
                 mAlpha0: cute.Tensor, mAlpha1: cute.Tensor, mRowW: cute.Tensor, limit: Float32, mIds: cute.Tensor,
                 mPos: cute.Tensor, mNext: cute.Tensor, mCnt: cute.Tensor, tidx, bid_k, bid_m, bid_t):
            """One work item: K slice bid_k of 128-row tiles bid_m*MT.. of token tile (by_slot: routed slot) bid_t.
            mCnt: the fused launch's readiness counters (roles above; unused otherwise)."""
            if const_expr(self.pdl and not self.wait_first):
                # the next kernel may be scheduled once all our CTAs have started; it waits for our end itself
                cute.arch.griddepcontrol_launch_dependents()
            if const_expr(self.pdl and self.wait_first and not self.by_slot):
                # the kernel right before wrote the tile table (routing + gather): wait first; the next kernel may
                # start after that (it reads the table before its own wait)
                cute.arch.griddepcontrol_wait()
                cute.arch.griddepcontrol_launch_dependents()
            expert = Int32(0)
            row0 = Int32(0)
            nrows = Int32(0)
            rank = Int32(0)
            if const_expr(self.direct_k > 0):
                if const_expr(self.direct_wait):
                    # the router (the kernel right before) wrote topk_ids / weights: wait
                    cute.arch.griddepcontrol_wait()
                if const_expr(self.direct_wait):
                    cute.arch.griddepcontrol_launch_dependents()      # the next kernel may start its prologue
                expert = mIds[bid_t]
                e_j = Int32(-1)
                if tidx % 32 < cute.size(mIds, mode=[0]):
                    e_j = mIds[tidx % 32]
                mask = Int32(cute.arch.vote_ballot_sync(e_j == expert))        # slots of this expert (<= 32)
                rank = Int32(cute.arch.popc(mask & ((Int32(1) << bid_t) - 1)))
                if expert >= 0 and expert < cute.size(mAlpha0, mode=[0]):
                    if rank % MOE_GEMV_TILE_N == 0:
                        nrows = cutlass.min(Int32(cute.arch.popc(mask)) - rank, MOE_GEMV_TILE_N)
                        if tidx < nrows:
                            sSlot = storage.ticket.get_tensor(cute.make_layout(32))
                            slot = _nth_set_bit(mask, rank + tidx + 1)
                            sSlot[16 + tidx] = slot
                            sSlot[24 + tidx] = slot // self.direct_k if const_expr(self.swiglu) else slot
                cute.arch.sync_threads()           # the slots are in smem (mask / rank die before the weight loads)
                self.stamp(mNext, tidx, 4)
            elif const_expr(self.by_slot):
                # rank = earlier slots of this expert: lane j of every warp looks at slot base + j (one round trip
                # for up to 32 slots; no serial chain of dependent loads)
                n_slots = cute.size(mIds, mode=[0])
                expert = mIds[bid_t]
                for base in cutlass.range(0, bid_t, 32, unroll=1):
                    j = base + tidx % 32
                    e_j = Int32(-1)
                    if j < bid_t:
                        e_j = mIds[j]
                    rank = rank + Int32(cute.arch.popc(cute.arch.vote_ballot_sync(e_j == expert)))
                if expert >= 0 and expert < cute.size(mAlpha0, mode=[0]):
                    if rank % MOE_GEMV_TILE_N == 0:
                        nrows = Int32(1)                                # active (rows known after the wait)
            else:
                expert = mTiles[bid_t, 0]
                row0 = mTiles[bid_t, 1]
                nrows = mTiles[bid_t, 2]
            if nrows > 0:                        # the same for every CTA of a cluster (same table entry)
                wid = cute.arch.make_warp_uniform(cute.arch.warp_idx())
                warp = wid % 4                                        # slab of the 128-row tile
                m_tile = bid_m * self.MT + wid // 4                   # this warp's 128-row tile
                lane = tidx % 32
                g = lane // 4
                t = lane % 4
                kpc = self.kpc
                rec = self.rec
                nw = self.nw
                kt0 = bid_k * kpc                                     # first k-tile of this CTA's K slice
                base = mW.iterator.toint() + (Int64(expert) * (self.m_tiles * self.k_tiles)
                                              + Int64(m_tile * self.k_tiles + kt0)) * rec
                code_addr = base + (32 * warp + lane) * 16            # atom a: + 2048 (wgmma thread 32w + lane)
                # scale words of quad 8w + g (atom a: + 128 nw), as a 32-bit offset from code_addr (one register)
                scale_off = CODE_BYTES + (8 * warp + g) * (4 * nw) - (32 * warp + lane) * 16

                # ---- weight register ring: slot s = k-tile i (i % D == s): codes [atom][kb], scale words [atom][w]
                wc = cute.make_rmem_tensor((self.D, 2, 4), Int32)
                ws = cute.make_rmem_tensor((self.D, 2, nw), Int32)

                for s in cutlass.range_constexpr(self.D):
                    self.load_k_tile(wc, ws, code_addr, scale_off, s, s)
                if const_expr(self.by_slot and self.direct_k == 0):
                    # routing + gather done -> the expert's sorted rows: [min pos, + count) over its slots
                    row0, nrows = self.slot_rows(mIds, mPos, expert, rank)
                if const_expr(self.wait_target > 0):
                    if const_expr(self.in_fused):
                        if tidx == 0:               # (read by nothing since session 11 removed the folded
                                                    # combine; kept: the default kernel's PTX stays the same)
                            sRows = storage.ticket.get_tensor(cute.make_layout(16))
                            sRows[3] = row0
                            sRows[4] = nrows
                    self.stamp(mNext, tidx, 5)
                    self.wait_ready(mCnt, tidx, bid_k, bid_t)
                    self.stamp(mNext, tidx, 6)
                if const_expr(self.pdl and not self.wait_first and self.wait_target == 0):
                    # weights are constant; x_sorted / act and what we write belong to the previous kernels. (A branch
                    # ptxas can't fold keeps the weight loads above the wait in the schedule.)
                    if row0 >= 0:
                        cute.arch.griddepcontrol_wait()

                # ---- the tile's token rows of this K slice -> smem, permuted per 64-k tile: natural word
                # 8kb + 4p + t (k = 16kb + 8p + 2t) -> stored word 16(kb//2) + 4t + 2(kb%2) + p
                sXw = storage.xs.get_tensor(cute.make_layout((self.row_words, MOE_GEMV_TILE_N),
                                                             stride=(1, self.row_words)))
                sXv = storage.xs.get_tensor(cute.make_layout((4, self.row_words // 4, MOE_GEMV_TILE_N),
                                                             stride=(1, 4, self.row_words)))
                x_base = mX.iterator.toint()
                sx_base = storage.xs.data_ptr().toint()
                chunks = kpc * 8                                      # 16-B chunks of a row's K slice
                for idx in cutlass.range(tidx, nrows * chunks, self.threads, unroll=1):
                    n = idx // chunks
                    q = idx - n * chunks
                    xrow = row0 + n
                    if const_expr(self.direct_k > 0):                  # GEMM1: x[s_n // k], GEMM2: act[s_n]
                        xrow = storage.ticket.get_tensor(cute.make_layout(32))[24 + n]
                    xa = x_base + (Int64(xrow) * self.k_dim + Int64(kt0 * TILE_K + q * 8)) * 2
                    i = q // 8
                    kb = (q % 8) // 2
                    p = q % 2
                    w0 = i * 32 + 16 * (kb // 2) + 2 * (kb % 2) + p
                    if const_expr(self.tok_async):
                        dst = sx_base + (n * self.row_words + w0) * 4
                        for tt in cutlass.range_constexpr(4):
                            _cp_async_4(dst + 16 * tt, xa + 4 * tt)
                    else:
                        v = _ld_v4(xa, ".cg")                         # L2: x_sorted was just written
                        for tt in cutlass.range_constexpr(4):
                            sXw[w0 + 4 * tt, n] = v[tt]
                if const_expr(self.tok_async):
                    _cp_async_commit()
                    _cp_async_wait(0)
                cute.arch.sync_threads()
                self.stamp(mNext, tidx, 7)

                # ---- main loop: per k-tile, B fragments of token min(g, rows-1), then per atom decode + 4 mma
                brow = cutlass.min(g, nrows - 1)
                acc = cute.make_rmem_tensor((2, 4), Float32)
                acc.fill(0.0)
                bq = cute.make_rmem_tensor((4, 2), Int32)             # [2(kb%2) + p][kb//2]: token g's k pairs

                for i0 in cutlass.range(0, kpc - self.D, self.D, unroll=1):
                    for s in cutlass.range_constexpr(self.D):
                        self.mma_k_tile(acc, bq, wc, ws, sXv, t, brow, i0 + s, s)
                        self.load_k_tile(wc, ws, code_addr, scale_off, i0 + s + self.D, s)
                for s in cutlass.range_constexpr(self.D):              # the last D k-tiles: nothing more to load
                    self.mma_k_tile(acc, bq, wc, ws, sXv, t, brow, kpc - self.D + s, s)
                self.stamp(mNext, tidx, 8)

                if const_expr(self.in_fused and (self.signal_kpc > 0 or self.wait_target > 0)):
                    # fused: the item's row tiles and slot come back from smem (no registers held over the loop)
                    sItem = storage.ticket.get_tensor(cute.make_layout(16))
                    bid_m = sItem[1]
                    bid_t = sItem[2]
                    m_tile = bid_m * self.MT + wid // 4
                # ---- epilogue: acc[a, c] = (row 16w + g + 8(c//2) of atom a, token 2t + c%2)
                if const_expr(self.S == 1):
                    for c in cutlass.range_constexpr(4):
                        n = 2 * t + c % 2
                        if n < nrows:
                            self.store(mOut, mAlpha0, mAlpha1, mRowW, limit, expert, self.out_row(storage, row0, n),
                                       0, m_tile, 16 * warp + g + 8 * (c // 2), acc[0, c], acc[1, c])
                    self.signal(mCnt, tidx, bid_k, bid_m, bid_t)
                else:
                    # partial -> own smem red[atom][row][token]; cluster barrier; slice z sums its share of the
                    # (row, token) pairs over the S slices in rank order (DSMEM); barrier again before exit
                    cute.arch.sync_threads()                         # every warp is done reading the tokens
                    red = cute.make_tensor(cute.recast_ptr(storage.xs.data_ptr(), dtype=Float32),
                                           cute.make_layout((self.MT, 2, 64, MOE_GEMV_TILE_N),
                                                            stride=(2 * 64 * MOE_GEMV_TILE_N, 64 * MOE_GEMV_TILE_N,
                                                                    MOE_GEMV_TILE_N, 1)))
                    for a in cutlass.range_constexpr(2):
                        for c in cutlass.range_constexpr(4):
                            red[wid // 4, a, 16 * warp + g + 8 * (c // 2), 2 * t + c % 2] = acc[a, c]
                    cute.arch.cluster_arrive()
                    cute.arch.cluster_wait()
                    self.stamp(mNext, tidx, 9)
                    red_base = storage.xs.data_ptr().toint()
                    pairs = 64 * MOE_GEMV_TILE_N                           # (row, token) pairs per 128-row tile
                    share = -(-(self.MT * pairs) // self.S)
                    for it in cutlass.range_constexpr((share + self.threads - 1) // self.threads):
                        pp = tidx + self.threads * it
                        e = bid_k * share + pp                          # (tile mt, row r, token n)
                        mt = e // pairs
                        r = (e % pairs) // MOE_GEMV_TILE_N
                        n = e % MOE_GEMV_TILE_N
                        if pp < share and e < self.MT * pairs and n < nrows:
                            s0 = Float32(0.0)
                            s1 = Float32(0.0)
                            off = mt * 2 * pairs + e % pairs
                            for z in cutlass.range_constexpr(self.S):
                                s0 = s0 + _ld_dsmem_f32(red_base + off * 4, z)
                                s1 = s1 + _ld_dsmem_f32(red_base + (off + pairs) * 4, z)
                            self.store(mOut, mAlpha0, mAlpha1, mRowW, limit, expert,
                                       self.out_row(storage, row0, n), 0, bid_m * self.MT + mt, r, s0, s1)
                    self.signal(mCnt, tidx, bid_k, bid_m, bid_t)
                    self.stamp(mNext, tidx, 10)
                    cute.arch.cluster_arrive()                       # peers keep their smem until it is read
                    cute.arch.cluster_wait()
                    self.stamp(mNext, tidx, 11)
            else:
                if const_expr(self.S > 1 and self.in_fused and (self.signal_kpc > 0 or self.wait_target > 0)):
                    # fused: an idle item's cluster still meets once (rank 0 holds the ticket its peers read)
                    cute.arch.cluster_arrive()
                    cute.arch.cluster_wait()

        @cute.jit
        def stamp(self, mSt: cute.Tensor, tidx, i: int, value=None):
            """Probe: thread 0 writes value (default: the low 32 bits of %globaltimer) into slot i of this CTA's
            16-word row."""
            if const_expr(self.stamps):
                if tidx == 0:
                    bx, by, _ = cute.arch.block_idx()
                    mSt[(by * self.S + bx) * 16 + i] = cute.arch.globaltimer_lo() if const_expr(value is None) \
                        else value

        def out_row(self, storage, row0, n):
            """Output / routing-weight row of the item's row n: row0 + n (sorted rows), or slot s_n (direct_k)."""
            if const_expr(self.direct_k > 0):
                return storage.ticket.get_tensor(cute.make_layout(32))[16 + n]
            return row0 + n

        @cute.jit
        def signal(self, mCnt: cute.Tensor, tidx, bid_k, bid_m, bid_t):
            """Fused GEMM1: this CTA's act stores are done -> +1 on the counter of (slot bid_t, GEMM2 K slice of its
            columns): every thread's fence + bar.sync, then one release add."""
            if const_expr(self.signal_kpc > 0):
                cute.arch.fence_acq_rel_gpu()
                cute.arch.sync_threads()
                if tidx == 0:
                    z2 = (bid_m * self.MT) // self.signal_kpc
                    cute.arch.atomic_add(mCnt.iterator + (1 + bid_t * self.S + z2), Int32(1), sem="release",
                                         scope="gpu")

        @cute.jit
        def wait_ready(self, mCnt: cute.Tensor, tidx, bid_k, bid_t):
            """Fused GEMM2: act rows of this item (slot / tile), columns of this K slice, are complete
            once all GEMM1 CTAs writing them have counted (release after their stores; acquire here, then bar.sync);
            this CTA then counts itself as a reader (the last one wraps the counter to 0)."""
            if tidx == 0:
                ctr = mCnt.iterator + (1 + bid_t * self.S + bid_k)
                seen = cute.arch.load(ctr, Int32, sem="acquire", scope="gpu")
                while seen < self.wait_target:
                    seen = cute.arch.load(ctr, Int32, sem="acquire", scope="gpu")
                _atom_inc_gpu(ctr.toint(), self.wait_target + self.wait_readers - 1)
            cute.arch.sync_threads()

        @cute.jit
        def load_k_tile(self, wc, ws, code_addr, scale_off, i, s: int):
            """Loads of k-tile i of the slice into register slot s: per atom 16 B of codes + the quad's scale words."""
            for a in cutlass.range_constexpr(2):
                addr = code_addr + Int64(i) * self.rec
                v = _ld_v4(addr + a * 2048, self.ld_hint)
                for q in cutlass.range_constexpr(4):
                    wc[s, a, q] = v[q]
                if const_expr(self.nw == 2):
                    u = _ld_v2(addr + Int64(scale_off + a * 256), self.ld_hint)
                    ws[s, a, 0] = u[0]
                    ws[s, a, 1] = u[1]
                else:
                    ws[s, a, 0] = _ld_b32(addr + Int64(scale_off + a * 128), self.ld_hint)

        @cute.jit
        def mma_k_tile(self, acc, bq, wc, ws, sXv, t, brow, i, s: int):
            """k-tile i from register slot s: B fragments of token `brow` from smem, then per atom decode + 4 mma."""
            for h in cutlass.range_constexpr(2):
                cute.autovec_copy(sXv[None, i * 8 + 4 * h + t, brow], bq[None, h])
            for a in cutlass.range_constexpr(2):
                if const_expr(self.fmt == "nvfp4"):
                    pr = (scale_pair_bf16x2(ws[s, a, 0], 0, self.fmt, 1),
                          scale_pair_bf16x2(ws[s, a, 0], 2, self.fmt, 3))
                    pr8 = (scale_pair_bf16x2(ws[s, a, 1], 0, self.fmt, 1),
                           scale_pair_bf16x2(ws[s, a, 1], 2, self.fmt, 3))
                else:
                    p_r = scale_pair_bf16x2(ws[s, a, 0], 0, self.fmt, 1)
                    p_r8 = scale_pair_bf16x2(ws[s, a, 0], 2, self.fmt, 3)
                    pr, pr8 = (p_r, p_r), (p_r8, p_r8)
                for kb in cutlass.range_constexpr(4):
                    if const_expr(self.fmt == "nvfp4"):
                        r0, r1, r2, r3 = decode_fp4x8_scaled(wc[s, a, kb], pr[kb // 2], pr8[kb // 2], kb % 2)
                    else:
                        r0, r1, r2, r3 = decode_fp4x8_scaled(wc[s, a, kb], pr[0], pr8[0], kb // 2)
                    d = _mma_bf16(r0, r1, r2, r3, bq[2 * (kb % 2), kb // 2], bq[2 * (kb % 2) + 1, kb // 2],
                                  [acc[a, 0], acc[a, 1], acc[a, 2], acc[a, 3]])
                    for c in cutlass.range_constexpr(4):
                        acc[a, c] = d[c]

        @cute.jit
        def store(self, mOut: cute.Tensor, mAlpha0: cute.Tensor, mAlpha1: cute.Tensor, mRowW: cute.Tensor,
                  limit: Float32, expert, row0, n, bid_m, r, v0, v1):
            """Epilogue of (row r of both atoms of 128-row tile bid_m, token n): v0 / v1 = atom 0 / 1 accumulators."""
            if const_expr(self.swiglu):
                hh = cute.math.min(v0 * mAlpha0[expert], limit)
                uu = cute.math.max(cute.math.min(v1 * mAlpha1[expert], limit), -limit)
                act = mRowW[row0 + n] * hh / (1.0 + cute.math.exp(-hh)) * uu
                mOut[row0 + n, bid_m * 64 + r] = act.to(BFloat16)
            else:
                a_down = mAlpha0[expert]
                mOut[row0 + n, bid_m * TILE_M + r] = (v0 * a_down).to(BFloat16)
                mOut[row0 + n, bid_m * TILE_M + 64 + r] = (v1 * a_down).to(BFloat16)


    class Fp4MoeGemvPair(Fp4MoeGemv):
        """Fp4MoeGemv, table path with unsplit K (S = 1), where an expert's token tiles 2i and 2i+1 (> 8 routed rows)
        run in one CTA: each decoded A fragment feeds two n8 mma.sync (the two tiles' tokens), so such an expert's
        weights are streamed and decoded once instead of twice; the CTA of tile 2i+1 exits. Per (row, token) the fp32
        accumulation is Fp4MoeGemv's (same k order, same mma): bit-identical outputs. Token smem = 16 row slots of
        half the K slice: a pair CTA holds tokens 0-15 of k-tiles [0, K/2) and reloads them with [K/2, K) halfway
        through its main loop (one barrier); a single CTA puts its <= 8 tokens' first half in slots 0-7 and second
        half in slots 8-15 (one load, no barrier). Same smem as Fp4MoeGemv (+512 B). A pair CTA's weight register
        ring has pair_stages k-tiles (its second accumulator set must fit the registers of the single CTAs')."""

        def __init__(self, fmt: str, k_dim: int, n_out: int, swiglu: bool, stages: int = 4, pdl: bool = False,
                     wait_first: bool = False, min_ctas: int = 0, m_per_cta: int = 1, pair_stages: int = 2,
                     x_by_src: bool = False, by_slot: bool = False):
            # by_slot: GEMM1 right after the routing + gather kernel, CTA z = routed slot (Fp4MoeGemv's by_slot
            # rules; no pairs: <= 24 rows)
            super().__init__(fmt, k_dim, n_out, swiglu, 1, stages, pdl, wait_first, min_ctas, m_per_cta, by_slot)
            # x_by_src (GEMM1 right after MoeRouting): token row of sorted row p = x[src_tok[p]] (mX = x, mPos =
            # src_tok), so no index_select launch builds x_sorted
            self.x_by_src = x_by_src
            assert not x_by_src or (swiglu and (wait_first or not pdl)), "x_by_src: GEMM1 waiting for the routing"
            self.kph = self.kpc // 2                                # k-tiles per token half
            self.D2 = pair_stages
            assert self.kpc % 2 == 0 and self.kph % self.D == 0 and self.kph % self.D2 == 0, \
                "token halves of whole register rings"
            self.row_words = self.kph * 32 + 16                     # Int32 words per token slot (+64 B)

        def smem_words(self) -> int:
            return 2 * MOE_GEMV_TILE_N * self.row_words

        @cute.jit
        def tile(self, storage, mW: cute.Tensor, mX: cute.Tensor, mOut: cute.Tensor, mTiles: cute.Tensor,
                 mAlpha0: cute.Tensor, mAlpha1: cute.Tensor, mRowW: cute.Tensor, limit: Float32, mIds: cute.Tensor,
                 mPos: cute.Tensor, mNext: cute.Tensor, mCnt: cute.Tensor, tidx, bid_k, bid_m, bid_t):
            """Row tiles bid_m*MT.. of token tile bid_t (and of tile bid_t + 1 where it is the same expert's next
            and bid_t is the expert's tile 0, 2, 4, ..)."""
            if const_expr(self.pdl and not self.wait_first):
                cute.arch.griddepcontrol_launch_dependents()
            if const_expr(self.pdl and self.wait_first and not self.by_slot):
                cute.arch.griddepcontrol_wait()
                cute.arch.griddepcontrol_launch_dependents()
            rank = Int32(0)
            if const_expr(self.by_slot):
                expert, rank, nrows = self.slot_expert(mIds, mAlpha0, tidx, bid_t)
                row0 = Int32(0)
                rows2 = Int32(0)
            else:
                expert, row0, nrows, rows2 = self.table_entry(mTiles, bid_t)
            if nrows > 0:
                wid = cute.arch.make_warp_uniform(cute.arch.warp_idx())
                warp = wid % 4
                m_tile = bid_m * self.MT + wid // 4
                lane = tidx % 32
                g = lane // 4
                t = lane % 4
                kpc, kph = self.kpc, self.kph
                base = mW.iterator.toint() + (Int64(expert) * (self.m_tiles * self.k_tiles)
                                              + Int64(m_tile * self.k_tiles)) * self.rec
                code_addr = base + (32 * warp + lane) * 16
                scale_off = CODE_BYTES + (8 * warp + g) * (4 * self.nw) - (32 * warp + lane) * 16
                sXw = storage.xs.get_tensor(cute.make_layout((self.row_words, 2 * MOE_GEMV_TILE_N),
                                                             stride=(1, self.row_words)))
                sXv = storage.xs.get_tensor(cute.make_layout((4, self.row_words // 4, 2 * MOE_GEMV_TILE_N),
                                                             stride=(1, 4, self.row_words)))
                brow = cutlass.min(g, nrows - 1)
                acc = cute.make_rmem_tensor((2, 4), Float32)
                acc.fill(0.0)
                if rows2 > 0:
                    # ---- pair: tokens 0-7 (tile q) in slots 0-7, 8-15 (tile q+1) in slots 8-15, K in two halves
                    D = self.D2
                    wc = cute.make_rmem_tensor((D, 2, 4), Int32)
                    ws = cute.make_rmem_tensor((D, 2, self.nw), Int32)
                    for s in cutlass.range_constexpr(D):
                        self.load_k_tile(wc, ws, code_addr, scale_off, s, s)
                    self.pdl_wait(row0)
                    brow2 = MOE_GEMV_TILE_N + cutlass.min(g, rows2 - 1)
                    acc2 = cute.make_rmem_tensor((2, 4), Float32)
                    acc2.fill(0.0)
                    bq = cute.make_rmem_tensor((4,), Int32)
                    bq2 = cute.make_rmem_tensor((4,), Int32)
                    self.load_tokens(sXw, mX, mPos, row0, nrows + rows2, 0, kph, tidx)
                    cute.arch.sync_threads()
                    for i0 in cutlass.range(0, kph, D, unroll=1):
                        for s in cutlass.range_constexpr(D):
                            self.mma_k_tile2(acc, acc2, bq, bq2, wc, ws, sXv, t, brow, brow2, i0 + s, s)
                            self.load_k_tile(wc, ws, code_addr, scale_off, i0 + s + D, s)
                    cute.arch.sync_threads()                          # every warp is done with the first half
                    self.load_tokens(sXw, mX, mPos, row0, nrows + rows2, kph, kph, tidx)
                    cute.arch.sync_threads()
                    for i0 in cutlass.range(kph, kpc - D, D, unroll=1):
                        for s in cutlass.range_constexpr(D):
                            self.mma_k_tile2(acc, acc2, bq, bq2, wc, ws, sXv, t, brow, brow2, i0 + s - kph, s)
                            self.load_k_tile(wc, ws, code_addr, scale_off, i0 + s + D, s)
                    for s in cutlass.range_constexpr(D):
                        self.mma_k_tile2(acc, acc2, bq, bq2, wc, ws, sXv, t, brow, brow2, kph - D + s, s)
                    for c in cutlass.range_constexpr(4):
                        n = 2 * t + c % 2                               # tile q is full (8 rows)
                        self.store(mOut, mAlpha0, mAlpha1, mRowW, limit, expert, row0 + n, 0, m_tile,
                                   16 * warp + g + 8 * (c // 2), acc[0, c], acc[1, c])
                    for c in cutlass.range_constexpr(4):
                        n = 2 * t + c % 2
                        if n < rows2:
                            self.store(mOut, mAlpha0, mAlpha1, mRowW, limit, expert, row0 + MOE_GEMV_TILE_N + n, 0,
                                       m_tile, 16 * warp + g + 8 * (c // 2), acc2[0, c], acc2[1, c])
                else:
                    # ---- single tile: first K half in slots 0-7, second half in slots 8-15
                    D = self.D
                    wc = cute.make_rmem_tensor((D, 2, 4), Int32)
                    ws = cute.make_rmem_tensor((D, 2, self.nw), Int32)
                    for s in cutlass.range_constexpr(D):
                        self.load_k_tile(wc, ws, code_addr, scale_off, s, s)
                    if const_expr(self.by_slot):
                        row0, nrows = self.slot_rows(mIds, mPos, expert, rank)
                        brow = cutlass.min(g, nrows - 1)
                    else:
                        self.pdl_wait(row0)
                    bq = cute.make_rmem_tensor((4, 2), Int32)
                    self.load_tokens(sXw, mX, mPos, row0, nrows, 0, kpc, tidx)
                    cute.arch.sync_threads()
                    for i0 in cutlass.range(0, kph, D, unroll=1):
                        for s in cutlass.range_constexpr(D):
                            self.mma_k_tile(acc, bq, wc, ws, sXv, t, brow, i0 + s, s)
                            self.load_k_tile(wc, ws, code_addr, scale_off, i0 + s + D, s)
                    for i0 in cutlass.range(kph, kpc - D, D, unroll=1):
                        for s in cutlass.range_constexpr(D):
                            self.mma_k_tile(acc, bq, wc, ws, sXv, t, brow + MOE_GEMV_TILE_N, i0 + s - kph, s)
                            self.load_k_tile(wc, ws, code_addr, scale_off, i0 + s + D, s)
                    for s in cutlass.range_constexpr(D):
                        self.mma_k_tile(acc, bq, wc, ws, sXv, t, brow + MOE_GEMV_TILE_N, kph - D + s, s)
                    for c in cutlass.range_constexpr(4):
                        n = 2 * t + c % 2
                        if n < nrows:
                            self.store(mOut, mAlpha0, mAlpha1, mRowW, limit, expert, row0 + n, 0, m_tile,
                                       16 * warp + g + 8 * (c // 2), acc[0, c], acc[1, c])

        @cute.jit
        def pdl_wait(self, row0):
            """PDL, tile table read before: wait for the previous kernel's outputs (x_sorted / act; our outputs)
            after the weight loads above (a branch ptxas can't fold keeps them above the wait)."""
            if const_expr(self.pdl and not self.wait_first):
                if row0 >= 0:
                    cute.arch.griddepcontrol_wait()

        @cute.jit
        def table_entry(self, mTiles: cute.Tensor, bid_t):
            """(expert, first row, rows, partner rows) of tile bid_t; rows 0 where tile bid_t - 1's CTA takes it."""
            n_tab = cute.size(mTiles, mode=[0])
            # this entry and the neighbours' in one round trip: _ld_b32's inline asm has side effects, so LLVM neither
            # sinks these loads into a branch nor chains them behind one (no dependent chain)
            tab = mTiles.iterator.toint()
            expert = _ld_b32(tab + Int64(bid_t * 3) * 4, "")
            row0 = _ld_b32(tab + Int64(bid_t * 3 + 1) * 4, "")
            nrows = _ld_b32(tab + Int64(bid_t * 3 + 2) * 4, "")
            e_m1 = _ld_b32(tab + Int64(cutlass.max(bid_t - 1, 0) * 3) * 4, "")
            e_m2 = _ld_b32(tab + Int64(cutlass.max(bid_t - 2, 0) * 3) * 4, "")
            e_p1 = _ld_b32(tab + Int64(cutlass.min(bid_t + 1, n_tab - 1) * 3) * 4, "")
            n_p1 = _ld_b32(tab + Int64(cutlass.min(bid_t + 1, n_tab - 1) * 3 + 2) * 4, "")
            # branch-free (selects: ptxas would otherwise sink the neighbour loads into the branches, a dependent
            # chain of table reads): q1 = this tile is the expert's second or later, q2 = third or later
            q1 = cutlass.select_(bid_t >= 1, cutlass.select_(e_m1 == expert, Int32(1), Int32(0)), Int32(0))
            q2 = cutlass.select_(bid_t >= 2, cutlass.select_(e_m2 == expert, q1, Int32(0)), Int32(0))
            nxt = cutlass.select_(bid_t + 1 < n_tab, cutlass.select_(e_p1 == expert, n_p1, Int32(0)), Int32(0))
            q = q1
            if q2 > 0:                           # > 16 rows: walk back over the earlier tiles (rare)
                if nrows > 0:
                    q = Int32(2)
                    jj = bid_t - 2
                    more = Int32(1)
                    while more > 0:
                        more = Int32(0)
                        if jj >= 1:
                            if mTiles[jj - 1, 0] == expert:
                                q = q + 1
                                jj = jj - 1
                                more = Int32(1)
            nrows = cutlass.select_(q % 2 == 1, Int32(0), nrows)     # tile q - 1's CTA takes these rows
            rows2 = cutlass.select_(q % 2 == 1, Int32(0), nxt)       # rows of tile q + 1 taken by this CTA
            return expert, row0, nrows, rows2

        @cute.jit
        def slot_expert(self, mIds: cute.Tensor, mAlpha0: cute.Tensor, tidx, bid_t):
            """by_slot (Fp4MoeGemv's rules): expert of slot bid_t, its rank among the earlier slots of that expert,
            and 1 where this slot's CTA is active (a valid expert, rank a multiple of 8), else 0."""
            expert = mIds[bid_t]
            rank = Int32(0)
            for base in cutlass.range(0, bid_t, 32, unroll=1):
                j = base + tidx % 32
                e_j = Int32(-1)
                if j < bid_t:
                    e_j = mIds[j]
                rank = rank + Int32(cute.arch.popc(cute.arch.vote_ballot_sync(e_j == expert)))
            active = Int32(0)
            if expert >= 0 and expert < cute.size(mAlpha0, mode=[0]):
                if rank % MOE_GEMV_TILE_N == 0:
                    active = Int32(1)
            return expert, rank, active

        @cute.jit
        def load_tokens(self, sXw, mX: cute.Tensor, mSrc: cute.Tensor, row0, rows, kt_lo: int, n_kt: int, tidx):
            """Token rows row0 .. row0+rows-1 (x_by_src: x rows src[row0 ..]), k-tiles kt_lo .. kt_lo+n_kt-1 ->
            smem, permuted per 64-k tile as Fp4MoeGemv's; k-tile i (from kt_lo) of row n goes to slot n + 8 (i // kph),
            position i % kph."""
            x_base = mX.iterator.toint()
            sx_base = sXw.iterator.toint()
            chunks = n_kt * 8                                     # 16-B chunks per row
            src_l = Int32(0)
            if const_expr(self.x_by_src and self.tok_async and chunks % 32 == 0):
                # lane l holds src[row0 + l] (<= 16 rows): one round trip, then shuffles (a warp's chunks share a row)
                if tidx % 32 < rows:
                    src_l = mSrc[row0 + tidx % 32]
            for idx in cutlass.range(tidx, rows * chunks, self.threads, unroll=1):
                n = idx // chunks
                q = idx - n * chunks
                xrow = row0 + n
                if const_expr(self.x_by_src):
                    if const_expr(self.tok_async and chunks % 32 == 0):
                        xrow = cute.arch.shuffle_sync(src_l, n)
                    else:
                        xrow = mSrc[row0 + n]
                xa = x_base + (Int64(xrow) * self.k_dim + Int64(kt_lo * TILE_K + q * 8)) * 2
                i = q // 8
                kb = (q % 8) // 2
                p = q % 2
                w0 = (i % self.kph) * 32 + 16 * (kb // 2) + 2 * (kb % 2) + p
                slot = n + MOE_GEMV_TILE_N * (i // self.kph)
                if const_expr(self.tok_async):
                    dst = sx_base + (slot * self.row_words + w0) * 4
                    for tt in cutlass.range_constexpr(4):
                        _cp_async_4(dst + 16 * tt, xa + 4 * tt)
                else:
                    v = _ld_v4(xa, ".cg")                         # L2: x_sorted / act were just written
                    for tt in cutlass.range_constexpr(4):
                        sXw[w0 + 4 * tt, slot] = v[tt]
            if const_expr(self.tok_async):
                _cp_async_commit()
                _cp_async_wait(0)

        @cute.jit
        def mma_k_tile2(self, acc, acc2, bq, bq2, wc, ws, sXv, t, brow, brow2, i, s: int):
            """k-tile i (of the token half in smem) from register slot s for two token groups: per k32 half h the
            B fragments of tokens brow (group 0) and brow2 (group 1), then per atom two decodes, each feeding two
            mma (per accumulator the k order of mma_k_tile)."""
            for h in cutlass.range_constexpr(2):
                cute.autovec_copy(sXv[None, i * 8 + 4 * h + t, brow], bq)
                cute.autovec_copy(sXv[None, i * 8 + 4 * h + t, brow2], bq2)
                for a in cutlass.range_constexpr(2):
                    if const_expr(self.fmt == "nvfp4"):
                        p_r = scale_pair_bf16x2(ws[s, a, 0], 2 * h, self.fmt, 2 * h + 1)
                        p_r8 = scale_pair_bf16x2(ws[s, a, 1], 2 * h, self.fmt, 2 * h + 1)
                    else:
                        p_r = scale_pair_bf16x2(ws[s, a, 0], 0, self.fmt, 1)
                        p_r8 = scale_pair_bf16x2(ws[s, a, 0], 2, self.fmt, 3)
                    for kk in cutlass.range_constexpr(2):
                        half = kk if const_expr(self.fmt == "nvfp4") else h
                        r0, r1, r2, r3 = decode_fp4x8_scaled(wc[s, a, 2 * h + kk], p_r, p_r8, half)
                        d = _mma_bf16(r0, r1, r2, r3, bq[2 * kk], bq[2 * kk + 1],
                                      [acc[a, 0], acc[a, 1], acc[a, 2], acc[a, 3]])
                        d2 = _mma_bf16(r0, r1, r2, r3, bq2[2 * kk], bq2[2 * kk + 1],
                                       [acc2[a, 0], acc2[a, 1], acc2[a, 2], acc2[a, 3]])
                        for c in cutlass.range_constexpr(4):
                            acc[a, c] = d[c]
                            acc2[a, c] = d2[c]

    class Fp4MoeGemvFused:
        """GEMM1 -> GEMM2 of the decode MoE in one launch (both by routed slot, right after the router: no routing
        kernel, Fp4MoeGemv.direct_k = top_k; PDL). Work items: GEMM1 (slot, 128-row tiles b*MT..) then GEMM2 (slot, tiles b2*MT..), each one
        cluster of S K slices (both GEMMs split K S ways). A cluster takes its item from a ticket (atom.inc on
        counter 0, wrapping to 0 after the last ticket: the buffer is zero again for the next launch), so a cluster
        runs item i only after the clusters of items < i have started: a GEMM2 CTA waits only on GEMM1 items, which
        have smaller tickets, are running and never wait on anything of this launch -> no deadlock whatever the
        occupancy. GEMM2 CTAs issue their weight loads first, then wait for their act slice (per (slot, GEMM2 K
        slice) counters, see Fp4MoeGemv.signal_kpc); same per-element math and summation order as the two
        launches (bit-identical)."""

        def __init__(self, fmt: str, D: int, inter: int, k_splits: int, stages: int, min_ctas: int, m_per_cta: int,
                     pdl: bool, top_k: int, stamps: bool = False):
            self.pdl = pdl                 # False (profiling): a plain launch; the griddepcontrol ops are then no-ops
            # no routing kernel before (Fp4MoeGemv.direct_k = top_k): x, act, y_rows, weights by routed slot
            assert top_k > 0
            self.top_k = top_k
            self.g1 = Fp4MoeGemv(fmt, D, inter, True, k_splits, stages, True, True, min_ctas, m_per_cta, True)
            self.g2 = Fp4MoeGemv(fmt, inter, D, False, k_splits, stages, True, True, min_ctas, m_per_cta, True)
            self.g1.direct_k = self.g2.direct_k = top_k
            self.g1.in_fused = self.g2.in_fused = True
            self.g1.stamps = self.g2.stamps = stamps
            self.stamps = stamps
            self.S, self.MT, self.min_ctas = k_splits, m_per_cta, min_ctas
            self.m1 = self.g1.m_tiles // m_per_cta                 # GEMM1 items per slot
            self.m2 = self.g2.m_tiles // m_per_cta                 # GEMM2 items per slot
            kpc2 = self.g2.kpc                                     # act columns / 64 per GEMM2 K slice
            assert kpc2 % m_per_cta == 0, "a GEMM1 item's act columns lie in one GEMM2 K slice"
            self.g1.signal_kpc = kpc2
            self.g2.wait_target = k_splits * (kpc2 // m_per_cta)   # GEMM1 CTAs writing one (slot, K slice)
            self.g2.wait_readers = self.m2                         # GEMM2 CTAs reading it
            self.threads = 128 * m_per_cta

        @cute.jit
        def __call__(self, mW1: cute.Tensor, mW2: cute.Tensor, mX: cute.Tensor, mAct: cute.Tensor, mY: cute.Tensor,
                     mTiles: cute.Tensor, mAlphaG: cute.Tensor, mAlphaU: cute.Tensor, mAlphaD: cute.Tensor,
                     mRowW: cute.Tensor, limit: Float32, mIds: cute.Tensor, mPos: cute.Tensor, mCnt: cute.Tensor,
                     mSrc: cute.Tensor, mOut: cute.Tensor, stream):
            @cute.struct
            class SharedStorage:
                xs: cute.struct.Align[cute.struct.MemRange[Int32, max(self.g1.smem_words(), self.g2.smem_words())],
                                      16]
                # [0] ticket, [1] item tiles, [2] item slot, [3] / [4] written, never read (the removed folded
                # combine's rows), [16..23] the item's slots, [24..31] their input rows (top_k > 0)
                ticket: cute.struct.Align[cute.struct.MemRange[Int32, 32], 16]

            self.shared_storage = SharedStorage
            n_items = (self.m1 + self.m2) * cute.size(mIds, mode=[0])
            self.kernel(mW1, mW2, mX, mAct, mY, mTiles, mAlphaG, mAlphaU, mAlphaD, mRowW, limit, mIds, mPos,
                        mCnt, mSrc, mOut).launch(grid=[self.S, n_items, 1], block=[self.threads, 1, 1], stream=stream,
                                     cluster=[self.S, 1, 1], use_pdl=self.pdl, min_blocks_per_mp=self.min_ctas,
                                     preferred_smem_carveout=100 if self.min_ctas else None)

        @cute.kernel
        def kernel(self, mW1: cute.Tensor, mW2: cute.Tensor, mX: cute.Tensor, mAct: cute.Tensor, mY: cute.Tensor,
                   mTiles: cute.Tensor, mAlphaG: cute.Tensor, mAlphaU: cute.Tensor, mAlphaD: cute.Tensor,
                   mRowW: cute.Tensor, limit: Float32, mIds: cute.Tensor, mPos: cute.Tensor, mCnt: cute.Tensor,
                   mSrc: cute.Tensor, mOut: cute.Tensor):
            tidx, _, _ = cute.arch.thread_idx()
            bid_k, _, _ = cute.arch.block_idx()                   # = rank in the cluster (cluster [S, 1, 1])
            smem = cutlass.utils.SmemAllocator()
            storage = smem.allocate(self.shared_storage)
            n_slots = cute.size(mIds, mode=[0])
            n_items = (self.m1 + self.m2) * n_slots
            sT = storage.ticket.get_tensor(cute.make_layout(16))
            self.g1.stamp(mSrc, tidx, 0)
            if bid_k == 0 and tidx == 0:
                sT[0] = _atom_inc_gpu(mCnt.iterator.toint(), n_items - 1)
            item = Int32(0)
            if const_expr(self.S > 1):
                cute.arch.cluster_arrive()                         # release rank 0's smem write ...
                cute.arch.cluster_wait()                           # ... acquire: the ticket is in rank 0's smem
                item = _ld_dsmem_i32(storage.ticket.data_ptr().toint(), Int32(0))
            else:
                cute.arch.sync_threads()
                item = sT[0]
            n1 = self.m1 * n_slots
            if const_expr(self.stamps):
                self.g1.stamp(mSrc, tidx, 1)
                self.g1.stamp(mSrc, tidx, 2, item)
                self.g1.stamp(mSrc, tidx, 3, Int32(cute.arch.smid()))
            rest = item
            per_slot = Int32(self.m1)
            if item >= n1:
                rest = item - n1
                per_slot = Int32(self.m2)
            item_m = rest % per_slot
            item_t = rest // per_slot
            if tidx == 0:                   # read back after the main loop (Fp4MoeGemv.tile): fewer live registers
                sT[1] = item_m
                sT[2] = item_t
                sT[4] = 0                   # (GEMM2 rows of the removed folded combine; kept: same PTX)
            if item >= n1:
                self.g2.tile(storage, mW2, mAct, mY, mTiles, mAlphaD, mAlphaD, mRowW, limit, mIds, mPos,
                             mSrc if const_expr(self.stamps) else mW2, mCnt, tidx, bid_k, item_m, item_t)
            else:
                self.g1.tile(storage, mW1, mX, mAct, mTiles, mAlphaG, mAlphaU, mRowW, limit, mIds, mPos,
                             mSrc if const_expr(self.stamps) else mW2, mCnt, tidx, bid_k, item_m, item_t)


def _fake_records(g, fmt: str, n_exp):
    """Fake tensor of Fp4MoeGemv g's packed records as the kernels take them: (256, rows, records, E), E symbolic."""
    rec = record_bytes(fmt)
    return cute.runtime.make_fake_tensor(Uint8, (REC_ROW, rec // REC_ROW, g.m_tiles * g.k_tiles, n_exp),
                                         stride=(1, REC_ROW, rec, cute.sym_int64(divisibility=rec)), assumed_align=128)


def _compile_moe_gemv_fused(fmt: str, D: int, inter: int, k_splits: int, stages: int, min_ctas: int,
                            m_per_cta: int, pdl: bool, top_k: int, stamps: bool = False):
    """Compiled Fp4MoeGemvFused (TVM-FFI entry, no routing kernel before it): w13 and w2 records permuted as for
    _compile_moe_gemv, x [T, D], act [T*k, I] and y_rows [T*k, D] by routed slot, tiles, alpha_gate, alpha_up,
    alpha_down, the flat topk weights, limit, topk_ids (flat), pos, counters, src, out. tiles / pos / src / out are
    read by nothing (the routed variant, the router's ready flag and the folded combine were removed in session 11;
    the launch signature stays so the default kernels' PTX is unchanged)."""
    config = ("moe_gemv_fused", fmt, D, inter, k_splits, stages, min_ctas, m_per_cta, pdl, top_k) + \
        (("stamps",) if stamps else ()) + (WEIGHT_LD_HINT,) + _decode_key()

    def build():
        op = Fp4MoeGemvFused(fmt, D, inter, k_splits, stages, min_ctas, m_per_cta, pdl, top_k, stamps)
        rows, n_exp, n_tiles, slots = (cute.sym_int() for _ in range(4))
        mk = cute.runtime.make_fake_compact_tensor
        alpha = [mk(Float32, (n_exp,), assumed_align=4) for _ in range(3)]
        x_rows, src_rows = cute.sym_int(), cute.sym_int()
        args = (_fake_records(op.g1, fmt, n_exp), _fake_records(op.g2, fmt, n_exp),
                mk(BFloat16, (x_rows, D), stride_order=(1, 0), assumed_align=16),
                mk(BFloat16, (rows, inter), stride_order=(1, 0), assumed_align=16),
                mk(BFloat16, (rows, D), stride_order=(1, 0), assumed_align=16),
                mk(Int32, (n_tiles, 3), stride_order=(1, 0), assumed_align=4), *alpha,
                mk(Float32, (cute.sym_int(),), assumed_align=4), Float32(0.0),
                mk(Int32, (slots,), assumed_align=4), mk(Int32, (slots,), assumed_align=4),
                mk(Int32, (cute.sym_int(),), assumed_align=16), mk(Int32, (src_rows,), assumed_align=4),
                mk(BFloat16, (cute.sym_int(), D), stride_order=(1, 0), assumed_align=16),
                cute.runtime.make_fake_stream(use_tvm_ffi_env_stream=True))
        return op, args
    return _load_or_compile(config, build)


def _compile_moe_gemv(fmt: str, k_dim: int, n_out: int, swiglu: bool, k_splits: int, stages: int, pdl: bool,
                      wait_first: bool, min_ctas: int, m_per_cta: int = 1, by_slot: bool = False, pair: int = 0,
                      x_by_src: bool = False, direct_k: int = 0, tok_async: bool | None = None):
    """Compiled Fp4MoeGemv for one static config (TVM-FFI entry: call with torch tensors on the current stream).
    Arguments as Fp4GroupedGemm's: records permuted to (256, rows, records, E), x_sorted, out, tiles, alphas, row_w,
    limit. pair > 0: Fp4MoeGemvPair with a pair ring of this many k-tiles (an expert's tiles 2i, 2i+1 in one CTA; K
    unsplit, table path; same bits); x_by_src (with pair, GEMM1): x rows through src_tok instead of x_sorted.
    direct_k = top-k > 0 (MOE_GEMV_DIRECT, by_slot):
    no routing kernel; x / act / out rows and row_w by routed slot, topk_ids as mIds (tiles / pos are not read)."""
    config = ("moe_gemv", fmt, k_dim, n_out, swiglu, k_splits, stages, pdl, wait_first, min_ctas, m_per_cta,
              by_slot) + ((pair, x_by_src) if pair else ()) + (("direct", direct_k) if direct_k else ())
    tok_async = bool(tok_async)          # moe_fp4 passes MOE_GEMV_TOK_ASYNC for <= MOE_GEMV_TOK_ASYNC_MAX_ROWS rows
    config += (("tok_async",) if tok_async else ()) + (WEIGHT_LD_HINT,) + _decode_key()

    def build():
        if pair:
            assert k_splits == 1
            op = Fp4MoeGemvPair(fmt, k_dim, n_out, swiglu, stages, pdl, wait_first, min_ctas, m_per_cta, pair,
                                x_by_src, by_slot)
        else:
            op = Fp4MoeGemv(fmt, k_dim, n_out, swiglu, k_splits, stages, pdl, wait_first, min_ctas, m_per_cta,
                            by_slot, direct_k)
        op.tok_async = tok_async
        assert not direct_k or (by_slot and not pair and pdl)
        rows_b, rows_o, n_exp, n_tiles, slots = (cute.sym_int() for _ in range(5))
        mk = cute.runtime.make_fake_compact_tensor
        args = (_fake_records(op, fmt, n_exp), mk(BFloat16, (rows_b, k_dim), stride_order=(1, 0), assumed_align=16),
                mk(BFloat16, (rows_o, n_out), stride_order=(1, 0), assumed_align=16),
                mk(Int32, (n_tiles, 3), stride_order=(1, 0), assumed_align=4),
                mk(Float32, (n_exp,), assumed_align=4), mk(Float32, (n_exp,), assumed_align=4),
                mk(Float32, (cute.sym_int(),), assumed_align=4), Float32(0.0),
                mk(Int32, (slots,), assumed_align=4), mk(Int32, (slots,), assumed_align=4),
                mk(Uint8, (cute.sym_int(),), assumed_align=128),
                cute.runtime.make_fake_stream(use_tvm_ffi_env_stream=True))
        return op, args
    return _load_or_compile(config, build)


if HAVE_CUTE:
    class Fp4MoeChunks:
        """The decode MoE of one token without a hand-off between SMs. Work unit u = (routed slot j, act columns
        64c..64c+63), u = j * I/64 + c; a 2-CTA cluster (one CTA of 6 warpgroups per SM) runs 3 units, each on 4
        warpgroups ("quarters" q, 12 per cluster: warpgroup G = 6 rank + wg runs quarter G % 4 of unit 3 cluster +
        G // 4). Quarter q of a unit:
          - GEMM1: k-tiles [q K/256, (q+1) K/256) of gate/up tile c -> fp32 partials, handed to the unit's 4
            quarters; each quarter then sums the unit's 4 partials in quarter order (the fused launch's K-split
            order at T = 1) and applies Fp4MoeGemv's SwiGLU epilogue (act, bf16, in its own smem);
          - GEMM2: w2's row tiles [q D/512, (q+1) D/512) of k-tile c: act · W2ᵀ · α_down of the unit's 64 columns
            -> an fp32 partial [units, D] in global memory.
        The boundary (session 24): each quarter pushes its fp32 partials into its unit's 4 warpgroups' shared memory
        by st.async, which complete on an mbarrier per warpgroup (2 KB expected), so a warpgroup waits for its own unit
        only and no fence waits for the loads in flight (a cluster barrier's release is a MEMBAR.GPU that would). The
        weight register ring runs across the boundary: w2's first records go out between the pushes and the wait. x
        and the epilogue scalars load first (session 21: after the weight loads their L2 hits queued behind them).
        Each SM holds the same work (3 units per 2 SMs; Flash top-6: 192 units in 128 CTAs, one wave on 132 SMs), and
        no CTA waits on another cluster's act. y is summed over the slots in fp32 and rounded once, as in
        moe_reference (the fused launch rounds each slot's row to bf16 first).
        The reduction (session 25): n_red CTAs each sum RED_ROWS rows of the partials over the units in a fixed order
        (thread groups of units ug, ug + 32, ..., then the 32 groups in order: deterministic) and write y [1, D]. The
        partials are their own signal: they live in a persistent buffer that holds PART_SENTINEL wherever no partial
        is; CTA b reduces chunk b, each thread polls its 16-B pieces until no word is the sentinel (all pending
        pieces' loads in flight at once per sweep) and then puts the sentinel back (each piece is read once per
        launch) — no fence, count or wait for every CTA. A reducer still waits for other CTAs, and with n_red = all
        CTAs (Flash) that needs every CTA to get an SM: moe_chunks_config launches it only where its CTAs fit the SMs
        at once (one per SM), nothing this launch waits for holds an SM it needs, and the dependent launch (PDL)
        starts only after all its CTAs have started. A skipped slot's units write zero partials. The last
        MOE_CHUNKS_W2_SMEM ring depths of each warp's w2 records are copied into smem by cp.async over the GEMM1 ->
        GEMM2 boundary (more bytes in flight while the act waits). T tokens (session 26, T <= MOE_CHUNKS_MAX_TOKENS):
        T rounds on the same CTAs, round r runs token r's units (unit r U + the CTA's local unit) with its own x row,
        sInfo / consts rows, recv buffers and mbarriers (each used once); the register ring runs on from one round's
        last w2 records into the next round's first GEMM1 records; reducer CTA b sums chunks b, b + n_ctas, .. of
        every token. Each token's partials and sums are those of the token alone: the same bits per row. The
        reducers sum in smem of their own (rsum), never in red: a warpgroup whose unit is a skipped slot reaches the
        reduction at once, while the CTA's other warpgroups (and at T > 1 the later rounds) still pass their GEMM1
        partials through red (session 32)."""

        def __init__(self, fmt: str, D: int, inter: int, top_k: int, stages: int, pdl: bool, tokens: int = 1):
            self.g1 = Fp4MoeGemv(fmt, D, inter, True, 4, stages)      # load / decode / mma of one k-tile
            self.g2 = Fp4MoeGemv(fmt, inter, D, False, 1, stages)
            self.fmt, self.D, self.inter, self.top_k, self.pdl = fmt, D, inter, top_k, pdl
            self.k1 = D // TILE_K // 4               # GEMM1 k-tiles per quarter
            self.r2 = D // TILE_M // 4               # w2 row tiles per quarter
            self.S = stages
            assert self.k1 % stages == 0 and self.r2 % stages == 0
            self.cols = inter // TILE_K              # units per routed slot
            self.T = tokens                          # rounds: round r runs token r's units on the same warpgroups
            self.U = top_k * self.cols               # units per token (per round)
            self.n_units = tokens * self.U
            self.wgs = 6                             # warpgroups per CTA (2 CTAs = 3 units x 4 quarters)
            self.threads = 128 * self.wgs
            self.n_ctas = 2 * (-(-self.U // 3))
            self.row_chunks = D // RED_ROWS          # reducer chunks of one y row
            self.chunks = tokens * self.row_chunks
            self.probe = MOE_CHUNKS_PROBE
            assert self.probe in (0, 2, 3, 4), "probes: 2 = no decode + mma, 3 = phase stamps, 4 = no act wait"
            assert self.probe != 3 or STAMP_SLOTS * self.n_ctas <= 2 * D, "probe 3: the stamps need two rows of D"
            # each warp's last w2 records, copied into smem by cp.async over the boundary
            w2s = stages * MOE_CHUNKS_W2_SMEM
            self.w2_smem = w2s if self.r2 >= w2s + stages else 0
            self.extra_rows = self.w2_smem * 2 * self.threads            # [record e][atom][thread]
            self.extra_words = self.extra_rows * (4 + self.g1.nw)        # 16 B codes + the scale words

        @cute.jit
        def __call__(self, mW1: cute.Tensor, mW2: cute.Tensor, mX: cute.Tensor, mY: cute.Tensor,
                     mPart: cute.Tensor, mAlphaG: cute.Tensor, mAlphaU: cute.Tensor, mAlphaD: cute.Tensor,
                     mRowW: cute.Tensor, limit: Float32, mIds: cute.Tensor, stream):
            w2_words = self.extra_words

            @cute.struct
            class SharedStorage:
                xs: cute.struct.Align[cute.struct.MemRange[Int32, self.D // 2 * self.T], 16]  # x rows, permuted
                act: cute.struct.Align[cute.struct.MemRange[Int32, 32 * self.wgs], 16]      # per wg, permuted
                red: cute.struct.Align[cute.struct.MemRange[Float32, 128 * self.wgs], 16]      # GEMM1's partials
                # the reducers' sums [32 unit groups][RED_ROWS], never in red (the docstring's last sentences)
                rsum: cute.struct.Align[cute.struct.MemRange[Float32, 32 * RED_ROWS], 16]
                misc: cute.struct.Align[cute.struct.MemRange[Int32, 4 * self.wgs * self.T], 16]  # per round, wg
                consts: cute.struct.Align[cute.struct.MemRange[Float32, 4 * self.wgs * self.T], 16]  # alphas, weight
                # the pushed partials [wg][quarter][gate|up][64] and per wg the mbarrier of its recv
                recv: cute.struct.Align[cute.struct.MemRange[Float32, 512 * self.wgs * self.T], 16]
                mbar: cute.struct.Align[cute.struct.MemRange[Int64, self.wgs * self.T], 8]
                extra: cute.struct.Align[cute.struct.MemRange[Int32, w2_words], 16]   # w2 records (MOE_CHUNKS_W2_SMEM)

            self.shared_storage = SharedStorage
            self.kernel(mW1, mW2, mX, mY, mPart, mAlphaG, mAlphaU, mAlphaD, mRowW, limit, mIds).launch(
                grid=[self.n_ctas, 1, 1], block=[self.threads, 1, 1], cluster=[2, 1, 1], stream=stream,
                use_pdl=self.pdl, min_blocks_per_mp=1, preferred_smem_carveout=100)

        @cute.kernel
        def kernel(self, mW1: cute.Tensor, mW2: cute.Tensor, mX: cute.Tensor, mY: cute.Tensor, mPart: cute.Tensor,
                   mAlphaG: cute.Tensor, mAlphaU: cute.Tensor, mAlphaD: cute.Tensor, mRowW: cute.Tensor,
                   limit: Float32, mIds: cute.Tensor):
            tidx, _, _ = cute.arch.thread_idx()
            bid, _, _ = cute.arch.block_idx()
            smem = cutlass.utils.SmemAllocator()
            storage = smem.allocate(self.shared_storage)
            n_exp = cute.size(mAlphaG, mode=[0])
            self.stamp(mPart, 0)
            self.stamp(mPart, STAMP_SMID, cute.arch.smid())
            if tidx == 0:                        # before the router's wait: nothing here depends on it
                for i in cutlass.range_constexpr(self.wgs * self.T):   # 4 quarters x 128 fp32 partials per wg
                    _mbar_init(storage.mbar.data_ptr().toint() + 8 * i, 1)
                    _mbar_expect_tx(storage.mbar.data_ptr().toint() + 8 * i, 4 * 128 * 4)
                cute.arch.mbarrier_init_fence()
            # the router (the kernel right before) wrote topk_ids / weights: wait; the next kernel may then start
            # (its CTAs launch once all of ours have started)
            cute.arch.griddepcontrol_wait()
            cute.arch.griddepcontrol_launch_dependents()
            for r in cutlass.range_constexpr(self.T):   # x first: its L2 hits then do not queue behind the weights
                self.load_x_row(storage, mX, tidx, r)
            wid = cute.arch.make_warp_uniform(cute.arch.warp_idx())
            lane = tidx % 32
            wg = wid // 4
            warp = wid % 4
            g = lane // 4
            t = lane % 4
            rank = bid % 2
            gq = 6 * rank + wg
            q = gq % 4                                                 # quarter of ...
            unit = 3 * (bid // 2) + gq // 4                            # ... this unit
            slot = unit // self.cols
            col = unit - slot * self.cols
            expert, valid = self.slot_expert(mIds, unit, slot, n_exp)
            # the warpgroup's unit comes back from smem after GEMM1 (fewer registers live over its loop)
            # rows r * wgs + wg: round r's unit of warpgroup wg
            sInfo = storage.misc.get_tensor(cute.make_layout((self.wgs * self.T, 4), stride=(4, 1)))
            if tidx % 128 == 0:
                self.record_unit(storage, sInfo, wg, expert, unit, valid, slot, mAlphaG, mAlphaU, mAlphaD, mRowW)
                for r in cutlass.range_constexpr(1, self.T):   # the later rounds: token r's unit
                    unit_r = unit + r * self.U
                    slot_r = unit_r // self.cols
                    expert_r, valid_r = self.slot_expert(mIds, unit, slot_r, n_exp)
                    self.record_unit(storage, sInfo, r * self.wgs + wg, expert_r, unit_r, valid_r, slot_r, mAlphaG,
                                     mAlphaU, mAlphaD, mRowW)
            _cp_async_commit()
            rec = self.g1.rec
            nw = self.g1.nw
            thr = (32 * warp + lane) * 16
            code1 = mW1.iterator.toint() + (Int64(expert) * (self.g1.m_tiles * self.g1.k_tiles)
                                            + Int64(col * self.g1.k_tiles + q * self.k1)) * rec + thr
            stride2 = self.g2.k_tiles                                  # records between w2 row tiles
            scale_off = CODE_BYTES + (8 * warp + g) * (4 * nw) - (32 * warp + lane) * 16
            wc = cute.make_rmem_tensor((self.S, 2, 4), Int32)
            ws = cute.make_rmem_tensor((self.S, 2, nw), Int32)
            if valid != 0:
                for s in cutlass.range_constexpr(self.S):
                    self.g1.load_k_tile(wc, ws, code1, scale_off, s, s)

            _cp_async_wait(0)
            cute.arch.sync_threads()
            cute.arch.cluster_arrive_relaxed()   # the mbarriers are initialised: peers may push after the wait
            self.stamp(mPart, 1)
            sConst = storage.consts.get_tensor(cute.make_layout((self.wgs * self.T, 4), stride=(4, 1)))
            sXv = storage.xs.get_tensor(cute.make_layout((4, self.D // 8, 1), stride=(1, 4, self.D // 2)))
            red = storage.red.get_tensor(cute.make_layout((self.wgs, 2, 64), stride=(128, 64, 1)))
            bq = cute.make_rmem_tensor((4, 2), Int32)

            for rd in cutlass.range_constexpr(self.T):   # round rd: token rd's unit (T = 1: one round)
                row = wg                                  # this warpgroup's row of sInfo / sConst in round rd
                if const_expr(rd > 0):
                    row = rd * self.wgs + wg
                    prev_valid = valid
                    expert, unit, valid, slot, gq, q = self.unit_info(sInfo, rank, wg, row)
                    sXv = cute.make_tensor(storage.xs.data_ptr() + rd * (self.D // 2),
                                           cute.make_layout((4, self.D // 8, 1), stride=(1, 4, self.D // 2)))
                    code1 = self.w1_address(mW1, sInfo, row, q, warp, lane)
                    if valid != 0:
                        if prev_valid == 0:           # (a skipped previous round issued none of these)
                            for s in cutlass.range_constexpr(self.S):
                                self.g1.load_k_tile(wc, ws, code1, scale_off, s, s)
                # ---- GEMM1: quarter q of gate/up tile `col` (gate rows = atom 0, up rows = atom 1)
                if valid != 0:
                    acc = cute.make_rmem_tensor((2, 4), Float32)
                    acc.fill(0.0)
                    kt0 = q * self.k1
                    for i0 in cutlass.range(0, self.k1 - self.S, self.S, unroll=1):
                        for s in cutlass.range_constexpr(self.S):
                            self.math(self.g1, acc, bq, wc, ws, sXv, t, kt0 + i0 + s, s)
                            self.g1.load_k_tile(wc, ws, code1, scale_off, i0 + s + self.S, s)
                    for s in cutlass.range_constexpr(self.S):             # GEMM1's last k-tiles
                        self.math(self.g1, acc, bq, wc, ws, sXv, t, kt0 + self.k1 - self.S + s, s)
                    self.stamp(mPart, 2)
                    self.stamp_wg(mPart, 16, wg)
                    if t == 0:                                             # token 0: c = 0 / 2 = rows g / g + 8
                        for a in cutlass.range_constexpr(2):
                            red[wg, a, 16 * warp + g] = acc[a, 0]
                            red[wg, a, 16 * warp + g + 8] = acc[a, 2]
                if const_expr(rd == 0):
                    cute.arch.cluster_wait()          # (the start's arrive) the peer's mbarriers are initialised
                expert, unit, valid, slot, gq, q = self.unit_info(sInfo, rank, wg, row)
                if valid != 0:
                    if t == 0:                    # this quarter's partials -> recv[wg'][q] of the unit's 4 wgs
                        recv_base = storage.recv.data_ptr().toint()
                        mbar_base = storage.mbar.data_ptr().toint()
                        if const_expr(rd > 0):    # round rd's own buffers and mbarriers (each used once)
                            recv_base = recv_base + rd * 512 * self.wgs * 4
                            mbar_base = mbar_base + rd * self.wgs * 8
                        for a in cutlass.range_constexpr(2):
                            for hi in cutlass.range_constexpr(2):
                                r = 16 * warp + g + 8 * hi
                                v = red[wg, a, r]
                                for qq in cutlass.range_constexpr(4):
                                    dst = 4 * (gq // 4) + qq
                                    _st_async_f32(recv_base + ((dst % 6) * 512 + q * 128 + a * 64 + r) * 4,
                                                  dst // 6, v, mbar_base + 8 * (dst % 6))
                    self.w2_first_loads(mW2, sInfo, wc, ws, scale_off, wg, warp, lane, row)
                    if const_expr(self.w2_smem > 0):     # w2's last records -> smem over the boundary
                        code2 = self.w2_address(mW2, sInfo, wg, warp, lane, row)
                        for e in cutlass.range_constexpr(self.w2_smem):
                            self.copy_record_to_smem(storage, code2, scale_off,
                                                     (self.r2 - self.w2_smem + e) * self.g2.k_tiles, e, tidx)
                        _cp_async_commit()
                    if const_expr(self.probe != 4):
                        # round rd > 0 rewrites act below: this wait orders it after every warp's round rd - 1 reads
                        # (each of the unit's warps pushes its round-rd partials after them); racecheck misses that
                        _mbar_wait_cluster(storage.mbar.data_ptr().toint() + 8 * row, 0)
                        self.stamp(mPart, 3)
                        rcv_layout = cute.make_layout((self.wgs, 4, 2, 64), stride=(512, 128, 64, 1))
                        rcv = storage.recv.get_tensor(rcv_layout)
                        if const_expr(rd > 0):
                            rcv = cute.make_tensor(storage.recv.data_ptr() + rd * 512 * self.wgs, rcv_layout)
                        self.swiglu_act(storage, mPart, sConst, limit, wg, warp, lane,
                                        lambda qq, k, a: rcv[wg, qq, a, k], row)
                self.stamp(mPart, 4)
                self.stamp_wg(mPart, 22, wg)

                # ---- GEMM2: w2 row tiles q*r2 .. of k-tile `col` against act -> fp32 partials (x alpha_down)
                part = mPart.iterator.toint() + Int64(unit) * (self.D * 4)
                if valid != 0:
                    code2 = self.w2_address(mW2, sInfo, wg, warp, lane, row)
                    sAv = storage.act.get_tensor(cute.make_layout((4, 8 * self.wgs, 1), stride=(1, 4, 32 * self.wgs)))
                    a_down = sConst[row, 2]                       # (the start copied alpha_down there)
                    acc2 = cute.make_rmem_tensor((2, 4), Float32)
                    for j0 in cutlass.range(0, self.r2 - self.w2_smem - self.S, self.S, unroll=1):
                        for s in cutlass.range_constexpr(self.S):
                            acc2.fill(0.0)
                            self.math(self.g2, acc2, bq, wc, ws, sAv, t, wg, s)
                            self.g2.load_k_tile(wc, ws, code2, scale_off, (j0 + s + self.S) * stride2, s)
                            self.store_partial(part, acc2, a_down, q * self.r2 + j0 + s, warp, g, t)
                    if const_expr(self.w2_smem > 0):                     # the ring's last records, refilled from smem
                        _cp_async_wait(0)
                        for j0 in cutlass.range_constexpr(self.r2 - self.w2_smem - self.S, self.r2 - self.S, self.S):
                            for s in cutlass.range_constexpr(self.S):
                                acc2.fill(0.0)
                                self.math(self.g2, acc2, bq, wc, ws, sAv, t, wg, s)
                                self.load_record_from_smem(storage, wc, ws,
                                                           j0 + s + self.S - (self.r2 - self.w2_smem), s, tidx)
                                self.store_partial(part, acc2, a_down, q * self.r2 + j0 + s, warp, g, t)
                    if const_expr(rd + 1 < self.T):      # the next round's first GEMM1 loads go out as the ring empties
                        n_valid = sInfo[row + self.wgs, 2]
                        n_code1 = self.w1_address(mW1, sInfo, row + self.wgs, q, warp, lane)
                    for s in cutlass.range_constexpr(self.S):
                        acc2.fill(0.0)
                        self.math(self.g2, acc2, bq, wc, ws, sAv, t, wg, s)
                        if const_expr(rd + 1 < self.T):
                            if n_valid != 0:
                                self.g1.load_k_tile(wc, ws, n_code1, scale_off, s, s)
                        self.store_partial(part, acc2, a_down, q * self.r2 + self.r2 - self.S + s, warp, g, t)
                elif unit < (rd + 1) * self.U:            # a skipped slot (remote expert): zero partials
                    for i in cutlass.range_constexpr(self.r2):
                        _st_f32(part + Int64((q * self.r2 + i) * TILE_M + tidx % 128) * 4, Float32(0.0))

                if const_expr(self.probe == 4):   # the pushes' wait after GEMM2 (no CTA exits under them)
                    if valid != 0:
                        _mbar_wait_cluster(storage.mbar.data_ptr().toint() + 8 * row, 0)
                self.stamp(mPart, 5)
                self.stamp_wg(mPart, 28, wg)
            n_red = min(self.n_ctas, self.chunks)
            rsum = storage.rsum.get_tensor(
                cute.make_layout((32, RED_ROWS), stride=(RED_ROWS, 1)))
            rq = tidx % 8                      # reducer thread: (row quad rq, unit group ug of 32)
            ug = tidx // 8
            n_it = (self.U + 31) // 32               # unit groups of 32 per token
            # ---- the reduction, no fence or count: the partials are the signal. Reducer CTA b sums chunks b,
            # b + n_ctas, ...; each thread polls its 16-B pieces until no word is the sentinel, then puts it back
            self.stamp(mPart, 13)
            if bid < n_red:
                for ch in cutlass.range(bid, self.chunks, self.n_ctas, unroll=1):
                    if tidx < 256:
                        v = cute.make_rmem_tensor((n_it, 4), Int32)
                        pending = Int32(0)
                        for i in cutlass.range_constexpr(n_it):
                            w = self.load_piece(mPart, v, ug, i, ch, rq)
                            if ug + 32 * i < self.U:
                                if _any_sentinel(w):
                                    pending = pending | (1 << i)
                        while pending != 0:
                            _nanosleep(PART_POLL_NS)
                            # every pending piece's load first (predicated on a snapshot: no load waits for
                            # another's answer), then the checks: one round trip per sweep (session 29)
                            snap = pending
                            for i in cutlass.range_constexpr(n_it):
                                if (snap >> i) & 1:
                                    self.load_piece(mPart, v, ug, i, ch, rq)
                            for i in cutlass.range_constexpr(n_it):
                                if (snap >> i) & 1:
                                    if _all_written((v[i, 0], v[i, 1], v[i, 2], v[i, 3])):
                                        pending = pending & ~(1 << i)
                        for i in cutlass.range_constexpr(n_it):   # read once per launch: back to the sentinel
                            if ug + 32 * i < self.U:
                                _st_v4_fill(self.part_address(mPart, ug, i, ch, rq), Int32(PART_SENTINEL))
                        self.stamp(mPart, 7)
                        self.unit_sum(rsum, ug, rq, lambda i, c: _bits_f32(v[i, c]))
                    self.write_y(rsum, mY, ch, tidx)
            self.stamp(mPart, 8)

        @cute.jit
        def copy_record_to_smem(self, storage, code_addr, scale_off, i, e: int, tidx):
            """This thread's words of record i (load_k_tile's) -> its smem slot e by cp.async (not committed)."""
            base = storage.extra.data_ptr().toint()
            nw = self.g1.nw
            for a in cutlass.range_constexpr(2):
                addr = code_addr + Int64(i) * self.g1.rec
                row = (2 * e + a) * self.threads + tidx
                _cp_async_weight(base + row * 16, addr + a * 2048, 16)
                _cp_async_weight(base + self.extra_rows * 16 + row * 4 * nw,
                                 addr + Int64(scale_off + a * (256 if nw == 2 else 128)), 4 * nw)

        @cute.jit
        def load_record_from_smem(self, storage, wc, ws, e: int, s: int, tidx):
            """This thread's smem slot e (its own cp.async copies, waited for) -> register slot s."""
            base = storage.extra.data_ptr().toint()
            nw = self.g1.nw
            for a in cutlass.range_constexpr(2):
                row = (2 * e + a) * self.threads + tidx
                v = _lds_words(base + row * 16, 4)
                for q in cutlass.range_constexpr(4):
                    wc[s, a, q] = v[q]
                u = _lds_words(base + self.extra_rows * 16 + row * 4 * nw, nw)
                for w in cutlass.range_constexpr(nw):
                    ws[s, a, w] = u[w]

        @cute.jit
        def part_address(self, mPart: cute.Tensor, ug, i: int, ch, rq):
            """Reducer thread (ug, rq): its 16 B of unit ug + 32 i's partial in chunk ch (a unit past the last one: the
            last one again, dropped from the sum)."""
            u = ug + 32 * i
            if const_expr(32 * (i + 1) > self.U):
                u = cutlass.min(u, self.U - 1)
            if const_expr(self.T > 1):          # chunk ch of token ch // row_chunks: that token's units
                tok = ch // self.row_chunks
                return mPart.iterator.toint() + (Int64(u + tok * self.U) * self.D
                                                 + (ch - tok * self.row_chunks) * RED_ROWS + 4 * rq) * 4
            return mPart.iterator.toint() + (Int64(u) * self.D + ch * RED_ROWS + 4 * rq) * 4

        def load_piece(self, mPart: cute.Tensor, v, ug, i: int, ch, rq):
            """Reducer thread (ug, rq): unit ug + 32 i's 16 B of chunk ch (a relaxed gpu-scope load) -> v[i]; returns
            the 4 words."""
            w = _ld_v4(self.part_address(mPart, ug, i, ch, rq), "", ".relaxed.gpu")
            for c in range(4):              # (a plain helper, unrolled as traced)
                v[i, c] = w[c]
            return w

        @cute.jit
        def unit_sum(self, rsum, ug, rq, get):
            """Reducer thread (ug, rq): the sum of its units' 4 rows (get(i, c): unit ug + 32 i, row 4 rq + c) in unit
            order -> rsum[ug]."""
            n_it = (self.U + 31) // 32
            s4 = cute.make_rmem_tensor(4, Float32)
            s4.fill(0.0)
            for i in cutlass.range_constexpr(n_it):
                if const_expr(32 * (i + 1) <= self.U):
                    for c in cutlass.range_constexpr(4):
                        s4[c] = s4[c] + get(i, c)
                else:
                    if ug + 32 * i < self.U:
                        for c in cutlass.range_constexpr(4):
                            s4[c] = s4[c] + get(i, c)
            for c in cutlass.range_constexpr(4):
                rsum[ug, 4 * rq + c] = s4[c]

        @cute.jit
        def write_y(self, rsum, mY: cute.Tensor, ch, tidx):
            """The 32 unit groups' sums of chunk ch in group order -> y rows (bf16); both CTA barriers."""
            cute.arch.sync_threads()
            if tidx < RED_ROWS:
                y = Float32(0.0)
                for w in cutlass.range_constexpr(32):
                    y = y + rsum[w, tidx]
                if const_expr(self.T > 1):      # chunk ch: token ch // row_chunks
                    tok = ch // self.row_chunks
                    mY[tok, (ch - tok * self.row_chunks) * RED_ROWS + tidx] = y.to(BFloat16)
                else:
                    mY[0, ch * RED_ROWS + tidx] = y.to(BFloat16)
            cute.arch.sync_threads()

        @cute.jit
        def slot_expert(self, mIds: cute.Tensor, unit, slot, n_exp):
            """(expert, valid) of a routed slot; unit: the CTA's first-round unit (past the last one: no slot)."""
            expert = Int32(-1)
            if unit < self.U:
                expert = mIds[slot]
            valid = Int32(0)
            if expert >= 0 and expert < n_exp:
                valid = Int32(1)
            return expert, valid

        @cute.jit
        def record_unit(self, storage, sInfo, row, expert, unit, valid, slot, mAlphaG: cute.Tensor,
                        mAlphaU: cute.Tensor, mAlphaD: cute.Tensor, mRowW: cute.Tensor):
            """A round's unit -> sInfo row `row`; its epilogue scalars -> sConst row `row` by cp.async with x (loaded
            after GEMM1 they would queue behind w2's weight loads: session 21)."""
            sInfo[row, 0] = expert
            sInfo[row, 1] = unit
            sInfo[row, 2] = valid
            if valid != 0:
                c_base = storage.consts.data_ptr().toint() + 16 * row
                _cp_async_4(c_base, mAlphaG.iterator.toint() + Int64(expert) * 4)
                _cp_async_4(c_base + 4, mAlphaU.iterator.toint() + Int64(expert) * 4)
                _cp_async_4(c_base + 8, mAlphaD.iterator.toint() + Int64(expert) * 4)
                _cp_async_4(c_base + 12, mRowW.iterator.toint() + Int64(slot) * 4)

        @cute.jit
        def unit_info(self, sInfo, rank, wg, row):
            """The warpgroup's (expert, unit, valid, slot, quarter index gq in the cluster, quarter q) of the round
            whose sInfo row is row, back from smem after GEMM1 (fewer registers live over its loop)."""
            expert = sInfo[row, 0]
            unit = sInfo[row, 1]
            return expert, unit, sInfo[row, 2], unit // self.cols, 6 * rank + wg, (6 * rank + wg) % 4

        @cute.jit
        def swiglu_act(self, storage, mPart, sConst, limit: Float32, wg, warp, lane, partial, row):
            """Warp 0: the unit's act columns 2 lane, 2 lane + 1 (partial(qq, k, a): quarter qq's fp32 partial of gate
            (a = 0) / up (a = 1) row k, summed in quarter order) through Fp4MoeGemv's SwiGLU epilogue -> one permuted
            bf16x2 word of the warpgroup's act; then the warpgroup's barrier."""
            if warp == 0:
                sAh = cute.make_tensor(cute.recast_ptr(storage.act.data_ptr(), dtype=BFloat16),
                                       cute.make_layout(64 * self.wgs))
                kb = lane // 8                                     # natural word lane: k = 16 kb + 8 p + 2 tt
                wst = 16 * (kb // 2) + 4 * (lane % 4) + 2 * (kb % 2) + (lane % 8) // 4
                for e in cutlass.range_constexpr(2):
                    k = 2 * lane + e
                    hs = Float32(0.0)
                    us_ = Float32(0.0)
                    for qq in cutlass.range_constexpr(4):          # the unit's quarters in order
                        hs = hs + partial(qq, k, 0)
                        us_ = us_ + partial(qq, k, 1)
                    hh = cute.math.min(hs * sConst[row, 0], limit)               # x alpha_gate
                    uu = cute.math.max(cute.math.min(us_ * sConst[row, 1], limit), -limit)   # x alpha_up
                    av = sConst[row, 3] * hh / (1.0 + cute.math.exp(-hh)) * uu  # x the routing weight
                    sAh[64 * wg + 2 * wst + e] = av.to(BFloat16)
                self.stamp(mPart, 11)
            cute.arch.barrier(barrier_id=1 + wg, number_of_threads=128)
            self.stamp(mPart, 12)

        @cute.jit
        def w2_first_loads(self, mW2: cute.Tensor, sInfo, wc, ws, scale_off, wg, warp, lane, row):
            """w2's first S records of the warpgroup's unit -> the register ring (a skipped slot: none)."""
            if sInfo[row, 2] != 0:
                code2 = self.w2_address(mW2, sInfo, wg, warp, lane, row)
                for s in cutlass.range_constexpr(self.S):
                    self.g1.load_k_tile(wc, ws, code2, scale_off, s * self.g2.k_tiles, s)

        @cute.jit
        def load_x_row(self, storage, mX: cute.Tensor, tidx, r: int):
            """Token r's x row -> smem (cp.async, not committed), permuted per 64-k tile (Fp4MoeGemv's layout)."""
            sx_base = storage.xs.data_ptr().toint()
            xa0 = mX.iterator.toint()
            if const_expr(r > 0):
                sx_base = sx_base + r * self.D * 2
                xa0 = xa0 + r * self.D * 2
            for i in cutlass.range_constexpr(-(-(self.D // 8) // self.threads)):
                qq = tidx + i * self.threads
                if qq < self.D // 8:
                    kb = (qq % 8) // 2
                    w0 = (qq // 8) * 32 + 16 * (kb // 2) + 2 * (kb % 2) + qq % 2
                    for tt in cutlass.range_constexpr(4):
                        _cp_async_4(sx_base + (w0 + 4 * tt) * 4, xa0 + qq * 16 + 4 * tt)

        @cute.jit
        def stamp(self, mPart: cute.Tensor, i: int, value=None):
            """Probe 3: thread 0 writes the low 32 bits of %globaltimer (or value) as phase i of this CTA into the two
            rows past the partials (mPart has n_units + 2 rows then; STAMP_SLOTS per CTA)."""
            if const_expr(self.probe == 3):
                if cute.arch.thread_idx()[0] == 0:
                    off = self.n_units * self.D + STAMP_SLOTS * cute.arch.block_idx()[0] + i
                    v = cute.arch.globaltimer_lo() if const_expr(value is None) else value
                    _st_f32(mPart.iterator.toint() + Int64(off) * 4, _bits_f32(v))

        @cute.jit
        def stamp_wg(self, mPart: cute.Tensor, i: int, wg):
            """Probe 3: the first thread of each warpgroup stamps phase i + wg (the warpgroups' own phase ends)."""
            if const_expr(self.probe == 3):
                if cute.arch.thread_idx()[0] % 128 == 0:
                    off = self.n_units * self.D + STAMP_SLOTS * cute.arch.block_idx()[0] + i + wg
                    _st_f32(mPart.iterator.toint() + Int64(off) * 4, _bits_f32(cute.arch.globaltimer_lo()))

        @cute.jit
        def math(self, gm, acc, bq, wc, ws, sv, t, i, s: int):
            """Decode + mma of k-tile i from register slot s (probe 2: only an xor of the loaded words, no math)."""
            if const_expr(self.probe == 2):
                x = wc[s, 0, 0]
                for a in cutlass.range_constexpr(2):
                    for kb in cutlass.range_constexpr(4):
                        x = x ^ wc[s, a, kb]
                    for w in cutlass.range_constexpr(self.g1.nw):
                        x = x ^ ws[s, a, w]
                acc[0, 0] = acc[0, 0] + Float32(x & 1)
            else:
                gm.mma_k_tile(acc, bq, wc, ws, sv, t, 0, i, s)

        @cute.jit
        def w2_address(self, mW2: cute.Tensor, sInfo, wg, warp, lane, row):
            """Address of this thread's first w2 record (row tile q*r2, k-tile col of the warpgroup's unit in the round
            whose sInfo row is row)."""
            expert = sInfo[row, 0]
            unit = sInfo[row, 1]
            col = unit % self.cols
            q = (6 * (cute.arch.block_idx()[0] % 2) + wg) % 4
            return mW2.iterator.toint() + (Int64(expert) * (self.g2.m_tiles * self.g2.k_tiles)
                                           + Int64(q * self.r2 * self.g2.k_tiles + col)) * self.g2.rec \
                + (32 * warp + lane) * 16

        @cute.jit
        def w1_address(self, mW1: cute.Tensor, sInfo, row, q, warp, lane):
            """Address of this thread's first GEMM1 record (k-tile q*k1 of gate/up tile col) in the round whose sInfo
            row is row (rounds > 0; round 0's is made at the start)."""
            expert = sInfo[row, 0]
            col = sInfo[row, 1] % self.cols
            return mW1.iterator.toint() + (Int64(expert) * (self.g1.m_tiles * self.g1.k_tiles)
                                           + Int64(col * self.g1.k_tiles + q * self.k1)) * self.g1.rec \
                + (32 * warp + lane) * 16

        @cute.jit
        def store_partial(self, part, acc2, a_down, m_tile, warp, g, t):
            """Token 0 of one w2 record (lanes t == 0): rows 64a + 16 warp + g (+ 8) of 128-row tile m_tile."""
            if t == 0:                            # one row pointer, the four rows at immediate offsets
                pr = part + Int64(m_tile * TILE_M + 16 * warp + g) * 4
                for a in cutlass.range_constexpr(2):
                    _st_f32(pr + 256 * a, acc2[a, 0] * a_down)
                    _st_f32(pr + (256 * a + 32), acc2[a, 2] * a_down)

    @dsl_user_op
    def _st_f32(addr: Int64, v: Float32, *, loc=None, ip=None):
        """4-byte global store."""
        _llvm.inline_asm(None, [Int64(addr).ir_value(loc=loc, ip=ip), Float32(v).ir_value(loc=loc, ip=ip)],
                         "st.global.f32 [$0], $1;", "l,f", has_side_effects=True, loc=loc, ip=ip)


MOE_CHUNKS = True           # T <= MOE_CHUNKS_MAX_TOKENS: Fp4MoeChunks (both GEMMs per act chunk, partials summed in
                            # the same launch; H200 session 21: 27.6-28.6 vs the fused launch's 33.3-33.9 us in four
                            # same-run rows, decode step -0.071 ms per 8 layers at batch 1)
MOE_CHUNKS_STAGES = 2       # k-tiles of weight loads in flight per warp (H200, medians of 7 rounds: 2 -> 29.9-30.0
                            # us, 4 -> 33.6, 1 -> 31.6 in session 21's first run; 8 spills)
MOE_CHUNKS_PROBE = 0        # benchmarks only: 2 = no decode + mma (an xor of the loaded words; y meaningless), 3 =
                            # phase stamps per CTA (bench.py moe-stamps 1 --chunks), 4 = GEMM2 without waiting for
                            # the act (the pushes waited for after it; y meaningless)
RED_ROWS = 32               # rows of y per reducer chunk
PART_SENTINEL = -1          # 0xffffffff: a NaN no fp32 multiply returns (a NaN result is 0x7fffffff on NVIDIA GPUs)
MOE_CHUNKS_W2_SMEM = 1      # w2's last records of each warp, in ring depths, copied into smem by cp.async over the
                            # GEMM1 -> GEMM2 boundary: more bytes in flight while the act waits (session 25, same bits;
                            # H200: 2 records -1.6..-1.9% in four same-run rows, 4 records +4..8%, GEMM1's last 2 at the
                            # start too +4%; bulk copies instead of cp.async level)
MOE_CHUNKS_MAX_TOKENS = 2   # Fp4MoeChunks for T <= this: token r's units in round r on the same CTAs (session 26, H200
                            # same run: T = 2 54.3 -> 52.0 us per graph call, queued 52.1 -> 50.0; T = 3 level, T = 4
                            # +2%: the fused launch / Fp4MoeGemv there)
PART_POLL_NS = 64           # reducers' back-off between polls of pieces not yet written
STAMP_SLOTS = 48            # probe 3: stamps per CTA (0-15 the CTA's phases, 16 / 22 / 28 + wg: each warpgroup's
                            # GEMM1 loop end / act ready / GEMM2 loop end)
STAMP_SMID = 40             # probe 3: the slot that holds the CTA's SM (%smid) instead of a time


def moe_chunks_config(fmt: str, T: int, k: int, D: int, inter: int, sms: int):
    """_compile_moe_chunks arguments for T tokens at top-k, or None where moe_fp4 takes another path. Only where its
    CTAs (one per SM, 2-CTA clusters of 3 units) fit the SMs at once: every CTA is a reducer waiting for the partials
    of all the others, so a launch wider than the GPU could wait forever (Flash top-6: 128 CTAs on 132 SMs; Pro's 192
    and a 114-SM H100 PCIe take the fused launch)."""
    if not (MOE_CHUNKS and 1 <= T <= MOE_CHUNKS_MAX_TOKENS and k <= 32 and inter % TILE_K == 0 and D % 512 == 0):
        return None
    if 2 * -(-(k * (inter // TILE_K)) // 3) > sms:
        return None
    s = MOE_CHUNKS_STAGES             # the largest count <= this dividing both loops (GEMM1 k-tiles, w2 row tiles)
    while s > 1 and ((D // TILE_K // 4) % s or (D // TILE_M // 4) % s):
        s -= 1
    return (fmt, D, inter, k, s, USE_PDL, T)


def _compile_moe_chunks(fmt: str, D: int, inter: int, top_k: int, stages: int, pdl: bool, tokens: int = 1):
    """Compiled Fp4MoeChunks: w13 / w2 records permuted as for _compile_moe_gemv, x [T, D], y [T, D], partials
    [slots * I/64, D] fp32 (PART_SENTINEL where no partial is), alpha_gate / up / down, the flat topk weights,
    limit, topk_ids (flat)."""
    config = ("moe_chunks", fmt, D, inter, top_k, stages, pdl, WEIGHT_LD_HINT, PART_SENTINEL, PART_POLL_NS) + \
        (("probe", MOE_CHUNKS_PROBE) if MOE_CHUNKS_PROBE else ()) + \
        (("w2_smem", MOE_CHUNKS_W2_SMEM) if MOE_CHUNKS_W2_SMEM else ()) + \
        ((("tokens", tokens),) if tokens > 1 else ()) + _decode_key()

    def build():
        op = Fp4MoeChunks(fmt, D, inter, top_k, stages, pdl, tokens)
        n_exp = cute.sym_int()
        mk = cute.runtime.make_fake_compact_tensor
        alpha = [mk(Float32, (n_exp,), assumed_align=4) for _ in range(3)]
        args = (_fake_records(op.g1, fmt, n_exp), _fake_records(op.g2, fmt, n_exp),
                mk(BFloat16, (cute.sym_int(), D), stride_order=(1, 0), assumed_align=16),
                mk(BFloat16, (cute.sym_int(), D), stride_order=(1, 0), assumed_align=16),
                mk(Float32, (cute.sym_int(), D), stride_order=(1, 0), assumed_align=16), *alpha,
                mk(Float32, (cute.sym_int(),), assumed_align=4), Float32(0.0),
                mk(Int32, (cute.sym_int(),), assumed_align=4),
                cute.runtime.make_fake_stream(use_tvm_ffi_env_stream=True))
        return op, args
    return _load_or_compile(config, build)


DECODE_GEMV = True           # moe_fp4: both GEMMs on Fp4MoeGemv for up to MOE_GEMV_MAX_ROWS routed rows (T*k)
MOE_GEMV_MAX_ROWS = 1536     # T <= 256 at top-6 (H200 R1/R2, same run: 5-15% faster than the wgmma path at T 16..256)
MOE_GEMV_PAIR = True          # Fp4MoeGemvPair (an expert's two n8 token tiles share one weight stream + decode) ...
MOE_GEMV_PAIR_MIN_ROWS = 768  # ... from this many routed rows (T >= 128 at top-6) where K is unsplit (same bits)
MOE_GEMV_PAIR_STAGES = 2      # k-tiles of weight loads in flight per warp of a pair CTA (registers: its second
                              # accumulator set; 4 spills at the 80 registers of 24 resident warps)


MOE_GEMV_TOK_ASYNC = True    # Fp4MoeGemv(Pair): token rows -> smem by 4-byte cp.async (all in flight; same bits) ...
MOE_GEMV_TOK_ASYNC_MAX_ROWS = 32   # ... up to this many routed rows (T <= 5; s7 R1 H200: slower at T 64, 128)
MOE_GEMV_DIRECT = True       # R <= MOE_GEMV_DIRECT_MAX_ROWS past the fused launch's bound: the two GEMV launches by
MOE_GEMV_DIRECT_MAX_ROWS = 32  # routed slot without a routing kernel (direct_k: ids / x read by GEMM1 itself; same bits)


MOE_GEMV_FUSED = True        # R <= MOE_GEMV_FUSED_MAX_ROWS: GEMM1 + GEMM2 in one launch (Fp4MoeGemvFused) ...
MOE_GEMV_FUSED_MAX_ROWS = 18  # ... (T <= 3 at top-6; H200 session 12, same bits, vs the direct two launches: T=3
                              # 92.9 -> 86.6 / 93.4 -> 86.9 us nvfp4, 88.0 -> 79.1 mxfp4; T=4 8-11% slower, as in
                              # session 4; by-slot items also need R <= GATHER_MAX_ROWS).
                              # No routing kernel before it: it reads topk_ids / weights / x itself, rows by slot
                              # (session 5: T=1 39.25 -> 34.26 us; the routed variant was removed in session 11)
MOE_GEMV_FUSED_MT2_MAX_S = 2   # fused launch: two 128-row tiles per CTA (3 CTAs of 8 warps per SM) where its K split
                               # S <= this (same bits; H200 session 12, two runs: T=2 (S 2) 58.8 -> 55.2 and 57.6 ->
                               # 53.9 us; T=1 (S 4) 10% slower, so the rule stops at 2)
MOE_GEMV_FUSED_MIN_S = 2       # fused launch: split K at least this many ways, past the two-launch rule's one wave
                               # (T = 3: S 1 -> 2, 288 -> 576 CTAs of 8 warps = 1.45 waves; H200 session 12: 87.1 ->
                               # 75.6 us; T = 2 already has S 2, T = 1 S 4)
_FUSED_COUNTERS: dict = {}


def moe_gemv_fused_config(fmt: str, R: int, E: int, D: int, inter: int, sms: int):
    """_compile_moe_gemv_fused arguments for R routed rows, or None where the fused launch does not apply: the
    two-launch configs' K split S must agree (one cluster shape; where they differ, e.g. Pro T 2, 3, both at the
    larger split measured level with the two launches, H200 session 12); MT (changes no bit) is
    GEMM1's where GEMM2's K slices hold whole GEMM1 items and the token smem of both fits (H200 R1, T=4: MT 1 where
    GEMM1 wants 2 halves its resident CTAs: 114.8 vs 103.6 us two-launch), else GEMM2's; but 2 first where S <=
    MOE_GEMV_FUSED_MT2_MAX_S and no MOE_GEMV_FORCE is set. Without a forced (S, MT), K is split at least
    MOE_GEMV_FUSED_MIN_S ways where that divides both GEMMs' k-tiles (T = 3: other bits than the two launches' S 1,
    still one fixed order). Without USE_PDL (profiling) a plain launch."""
    if not (MOE_GEMV_FUSED and R <= MOE_GEMV_FUSED_MAX_ROWS and R <= GATHER_MAX_ROWS):
        return None
    g1, g2 = moe_gemv_configs(fmt, R, E, D, inter, sms, True)
    s = g1[4]
    if g2[4] != s or s > 4:   # S 8 (8-CTA clusters): never run on a GPU in this launch yet
        return None
    by_rule = MOE_GEMV_FORCE == (None, None)        # a forced (S, MT) is taken as it is
    s2 = max(s, MOE_GEMV_FUSED_MIN_S)
    if by_rule and (D // TILE_K) % s2 == 0 and (inter // TILE_K) % s2 == 0:
        s = s2
    smem = max(_moe_gemv_smem_bytes(D // TILE_K // s), _moe_gemv_smem_bytes(inter // TILE_K // s))
    order = ((2,) if by_rule and s <= MOE_GEMV_FUSED_MT2_MAX_S else ()) + (g1[9], g2[9])
    for mt in dict.fromkeys(order):
        per_sm = MOE_GEMV_WARPS_PER_SM // (4 * mt)
        if (inter // TILE_K // s) % mt == 0 and (D // TILE_M) % mt == 0 and per_sm * (smem + 1024) <= 228 * 1024:
            return (fmt, D, inter, s, MOE_GEMV_STAGES, per_sm, mt, USE_PDL)
    return None


def _fused_counters(device, n: int) -> torch.Tensor:
    """Zeroed ticket + readiness counters of Fp4MoeGemvFused (every launch leaves them zero again). Shared by all
    fused launches on a device: launches must not run concurrently (as _split_counters)."""
    buf = _FUSED_COUNTERS.get(device)
    if buf is None or buf.numel() < n:
        buf = torch.zeros(max(n, 1 << 12), dtype=torch.int32, device=device)
        _FUSED_COUNTERS[device] = buf
    return buf


def moe_gemv_supported(D: int, inter: int) -> bool:
    """Fp4MoeGemv takes these dims: both GEMMs' K split into <= 8 slices whose token smem fits a CTA."""
    return all(_moe_gemv_candidates(kt, 2) for kt in (D // TILE_K, inter // TILE_K))


def _moe_gemv_smem_bytes(k_per_cta: int) -> int:
    return MOE_GEMV_TILE_N * (k_per_cta * 128 + 64)


def _moe_gemv_candidates(k_tiles: int, m_tiles: int):
    """(S, MT) pairs whose CTAs fit: S | k_tiles, S <= 8 (portable cluster), MT | m_tiles, MT <= 2, and the
    resident CTAs (MOE_GEMV_WARPS_PER_SM / 4 MT per SM) hold their token smem (+1 KB reserved each) in 228 KB."""
    out = []
    for mt in (1, 2):
        per_sm = MOE_GEMV_WARPS_PER_SM // (4 * mt)
        for s in range(1, 9):
            if k_tiles % s == 0 and m_tiles % mt == 0 and \
                    per_sm * (_moe_gemv_smem_bytes(k_tiles // s) + 1024) <= 228 * 1024:
                out.append((s, mt))
    return out


def pick_moe_gemv_config(tiles_bound: int, m_tiles: int, k_tiles: int, num_sms: int) -> tuple[int, int]:
    """K slices S and 128-row tiles per CTA MT for Fp4MoeGemv: the most K slices (more loads in flight) within
    MOE_GEMV_WAVES waves of resident warps (MOE_GEMV_WARPS_PER_SM per SM, 4 MT per CTA, tiles_bound * m_tiles * S /
    MT CTAs), then the smallest CTA; if none fits, the fewest waves. tiles_bound: used token tiles at most (no host
    sync)."""
    cands = _moe_gemv_candidates(k_tiles, m_tiles)
    if not cands:
        raise ValueError(f"Fp4MoeGemv: no K split of {64 * k_tiles} fits (see moe_gemv_supported)")

    def key(c):
        s, mt = c
        waves = -(-tiles_bound * m_tiles * s * 4 // (MOE_GEMV_WARPS_PER_SM * num_sms))
        return (waves > MOE_GEMV_WAVES, waves if waves > MOE_GEMV_WAVES else 0, -s, mt)
    return min(cands, key=key)


def moe_gemv_configs(fmt: str, R: int, E: int, D: int, inter: int, sms: int, gather: bool):
    """_compile_moe_gemv arguments of GEMM1 and GEMM2 for R routed rows (tile_n MOE_GEMV_TILE_N)."""
    m = min(E, R)
    bound = m + (R - m) // MOE_GEMV_TILE_N          # tiles with rows: one per hit expert + one per 8 more rows
    s1, mt1 = MOE_GEMV_FORCE[0] or pick_moe_gemv_config(bound, 2 * inter // TILE_M, D // TILE_K, sms)
    s2, mt2 = MOE_GEMV_FORCE[1] or pick_moe_gemv_config(bound, D // TILE_M, inter // TILE_K, sms)
    # GEMM1 after the fused gather (R <= 24) by routed slot: expert from topk_ids, its weight loads start during
    # routing (PDL; session 3 H200 R2: T=4 108.6 -> 104.3 us against GEMM1 by tile)
    by_slot = USE_PDL and gather
    w = MOE_GEMV_WARPS_PER_SM
    pair = MOE_GEMV_PAIR and R >= MOE_GEMV_PAIR_MIN_ROWS      # Fp4MoeGemvPair where it applies (appended: True)
    pair1 = pair and _moe_gemv_pair_ok(D // TILE_K, s1)
    pair2 = pair and _moe_gemv_pair_ok(inter // TILE_K, s2)
    # the pair GEMM1 right after MoeRouting reads x rows through src_tok (no index_select for x_sorted; session 6
    # H200 R1 T=256: 1066.2 vs 1078.1 us); it waits first
    by_src = pair1 and not gather
    return ((fmt, D, inter, True, s1, MOE_GEMV_STAGES, USE_PDL, gather or by_src, w // (4 * mt1), mt1, by_slot)
            + ((MOE_GEMV_PAIR_STAGES, by_src) if pair1 else ()),
            (fmt, inter, D, False, s2, MOE_GEMV_STAGES, USE_PDL, False, w // (4 * mt2), mt2, False)
            + ((MOE_GEMV_PAIR_STAGES, False) if pair2 else ()))


def moe_gemv_direct_configs(fmt: str, R: int, E: int, D: int, inter: int, sms: int, top_k: int):
    """_compile_moe_gemv arguments of the routing-free two-launch GEMV (MOE_GEMV_DIRECT), or None where it does not
    apply: <= 32 routed slots (one ballot), PDL, no pair kernel. Same S / MT / stages as the routed
    by-slot path (moe_gemv_configs with the fused gather): same bits."""
    if not (MOE_GEMV_DIRECT and USE_PDL and R <= min(32, MOE_GEMV_DIRECT_MAX_ROWS)):
        return None
    g1, g2 = moe_gemv_configs(fmt, R, E, D, inter, sms, True)
    if len(g1) > 11 or len(g2) > 11:
        return None
    g1 = g1[:7] + (True,) + g1[8:10] + (True,)
    g2 = g2[:7] + (False,) + g2[8:10] + (True,)
    return g1, g2


def _moe_gemv_pair_ok(k_tiles: int, s: int) -> bool:
    """Fp4MoeGemvPair takes this GEMM: K unsplit, two token halves of whole register rings (Fp4MoeGemv's D)."""
    d = max(1, min(MOE_GEMV_STAGES, k_tiles))
    while k_tiles % d:
        d -= 1
    return s == 1 and k_tiles % 2 == 0 and (k_tiles // 2) % d == 0 and (k_tiles // 2) % MOE_GEMV_PAIR_STAGES == 0


# ====================================================================================================================
# mHC: fused hc_pre / hc_post / hc_head (issue #5)
# ====================================================================================================================
# mHC kernels (issue #5): fused hc_pre / hc_post / hc_head for Hopper (CuTe DSL), with a pure-torch reference beside
# each torch-facing function. Work in progress of the `mhc` helper; the lead merges it into kernels.py.
#
# Shapes: M tokens (decode: B = 1..8; prefill: thousands), n = hc_mult = 4 streams of D (multiple of 128) columns,
# mix = (2 + n) * n = 24 mixing rows (hc_head: mix = n). The kernels keep fp32 everywhere and round to bf16 once.
#
# hc_pre in two kernels:
#   HcMix      grid (D / 32 column groups, token blocks), one warp per CTA. Lane l of group g owns column 32g + l of
#              every stream: it holds fn[r, j*D + col] for all (r, j) in registers (fn, 1.5 MB at Flash dims, is read
#              from HBM exactly once per call, spread over 128 warps) and, per token, forms the 24 partial dot products
#              plus the partial sum of squares; a transposing butterfly (31 shuffles) leaves slot s of the warp-sum in
#              lane s, so each warp writes part[g, m, 0:32] with one coalesced store.
#   HcFinalize grid (M, slices), 128 threads. Each CTA sums part[:, m, :] in a fixed order (4 warps x D/128 groups,
#              then the 4 warp sums in order: deterministic and identical in every CTA of the token), applies the RMS
#              factor, scale, base and the sigmoids. Slice CTAs write x = sum_j pre_j * h_j (fp32, one bf16 rounding);
#              the last CTA (alone when slices > 1) writes post and runs softmax + Sinkhorn on the 4x4 comb in one
#              thread (the 39 normalizations use a reciprocal per row/column and 16 multiplies).
# hc_post: HcPost, elementwise, one thread per 8 columns of one token (16-byte loads/stores), all n outputs.
# hc_post + next hc_pre fused: HcMix with fuse_post=True computes the new residual slice (stored as bf16) and dots the
#              rounded values with the next fn slice right away; then HcFinalize as above.
# hc_head: HcMix + HcFinalize with head=True (mix = n rows, no post/comb).
# Decode sites (M <= HC_CLUSTER_MAX_TOKENS): HcSiteCluster does HcMix + HcFinalize in one
#              launch, one thread-block cluster (16 CTAs at D = 4096) per token block; the partials and the norm's
#              sums of squares travel through distributed shared memory, every sum in HcFinalize's order (same
#              bits). It can also add the MoE's routed + shared outputs into f itself (HC_FOLD_ADD: one torch kernel
#              less per layer). The Sinkhorn thread is the tail of the site: its softmax rows + post run on n lanes
#              (the 16 IEEE divisions were serialized in one thread), its rounds as a loop (less code; H200 only
#              ~0.1-0.25 us per site). The DSMEM exchanges are st.async + mbarriers (cluster barriers' release
#              half is a GPU-scope memory barrier: 0.9-2.7 us per site slower on the H200, removed in session 11).
# Everything stays on the device (no host sync); scratch buffers are torch.empty (CUDA-graph pool friendly).
# Validated on H200 for M <= 8 (D 256, 4096) and in a tiny model (prefill M = 72 and decode, bit-equal logits); the
# hc_pre / hc_head kernels are used for M <= MAX_KERNEL_TOKENS only (prefill M = 300 at D = 4096 failed, cause open).

HC_COLS = 32        # columns of each stream per mix warp (one per lane)
HC_SLOTS = 32       # partial slots per (group, token): mix dot products, then the sum of squares, then zeros
FIN_THREADS = 128   # finalize CTA: 4 warps split the column groups; one thread per 8 columns of x
HC_USE_PDL = True      # programmatic dependent launch: the mix kernel loads fn while the previous kernel drains
HC_CLUSTER_MAX_TOKENS = 8   # a decode site (hc_pre + RMSNorm, hc_post fused or not) up to this M: HcSiteCluster (one
                            # launch, one thread-block cluster per token block); beyond, HcMix + HcFinalize (same bits)
HC_CLUSTER_NT = 8       # HcFinalize threads per cluster CTA (D = 4096: 16 CTAs of 8 mix warps + the Sinkhorn warp)
HC_CLUSTER_TB = 0       # tokens per cluster (0: _site_tok_block's choice)
HC_FOLD_ADD = True      # dsv4: the MoE's routed + shared bf16 add runs inside the next site's HcSiteCluster launch
HC_FOLD_COMBINE = True  # ... and so does the sum over the k routed slots (no MoeCombine launch where the fused MoE runs
                        # without routing: kernels.moe(slots=True) hands back RoutedSlots; session 7, same bits)
MAX_KERNEL_TOKENS = 64   # hc_pre / hc_head kernels for M <= this; larger M (prefill) takes the torch reference:
                         # H200 round 2 failed the kernel path at M = 300, D = 4096 (M = 300, D = 256 and every
                         # M <= 8 passed); see the report. hc_post's elementwise kernel passed at every M.



# ----------------------------------------------------------------------------------------------------------------
# Pure-torch references ([M, ...] views of dsv4.hc_pre / hc_post / hc_head; same formulas, same op order)
def hc_pre_reference(h, fn, scale, base, n: int, iters: int, eps: float, norm_eps: float):
    """h [M,n,D] -> (x [M,D] h.dtype, post [M,n] fp32, comb [M,n,n] fp32)."""
    xf = h.flatten(1).float()
    mix = (xf @ fn.T) * torch.rsqrt(xf.square().mean(-1, keepdim=True) + norm_eps)
    pre = torch.sigmoid(mix[..., :n] * scale[0] + base[:n]) + eps
    post = 2 * torch.sigmoid(mix[..., n:2 * n] * scale[1] + base[n:2 * n])
    comb = (mix[..., 2 * n:] * scale[2] + base[2 * n:]).unflatten(-1, (n, n))
    comb = comb.softmax(-1) + eps
    comb = comb / (comb.sum(-2, keepdim=True) + eps)
    for _ in range(iters - 1):
        comb = comb / (comb.sum(-1, keepdim=True) + eps)
        comb = comb / (comb.sum(-2, keepdim=True) + eps)
    x = (pre.unsqueeze(-1) * h.float()).sum(1).to(h.dtype)
    return x, post, comb


def hc_post_reference(f, res, post, comb):
    """out[k] = post_k·f + Σ_j comb[j,k]·res[j]: f [M,D], res [M,n,D], post [M,n], comb [M,n,n] -> [M,n,D]."""
    out = post.unsqueeze(-1) * f.float().unsqueeze(-2) + comb.transpose(-1, -2) @ res.float()
    return out.to(res.dtype)


def hc_head_reference(h, fn, scale, base, eps: float, norm_eps: float):
    """h [M,n,D] -> [M,D]: the final collapse (mix = n rows, no Sinkhorn, no post)."""
    xf = h.flatten(1).float()
    mix = (xf @ fn.T) * torch.rsqrt(xf.square().mean(-1, keepdim=True) + norm_eps)
    pre = torch.sigmoid(mix * scale + base) + eps
    return (pre.unsqueeze(-1) * h.float()).sum(1).to(h.dtype)


def hc_pre_emulated(h, fn, scale, base, n: int, iters: int, eps: float, norm_eps: float):
    """The kernels' arithmetic in torch fp32 (CPU tests pin the algorithm): per-group partials summed in the kernel's
    order, Sinkhorn with one reciprocal per row/column. Returns (x, post, comb) like hc_pre_reference."""
    M, _, D = h.shape
    G = D // HC_COLS
    hf = h.float()
    hg = hf.unflatten(-1, (G, HC_COLS))                                        # [M, n, G, 32]
    fg = fn.float().unflatten(-1, (n, G, HC_COLS))                             # [mix, n, G, 32]
    dots = torch.einsum("mjgc,rjgc->gmr", hg, fg)                             # [G, M, mix] (order differs: fine)
    ssq = hg.square().sum((1, 3)).T                                           # [G, M]
    part = torch.cat([dots, ssq.unsqueeze(-1)], -1)                           # [G, M, mix+1]
    q = part.unflatten(0, (4, G // 4))
    w = q[:, 0]
    for i in range(1, G // 4):                                                # each warp: its groups in order
        w = w + q[:, i]
    tot = ((w[0] + w[1]) + w[2]) + w[3]                                       # [M, mix+1]
    mix = fn.shape[0]
    rms = torch.rsqrt(tot[:, mix] * (1.0 / (n * D)) + norm_eps)
    mx = tot[:, :mix] * rms[:, None]
    pre = torch.sigmoid(mx[:, :n] * scale[0] + base[:n]) + eps
    post = 2 * torch.sigmoid(mx[:, n:2 * n] * scale[1] + base[n:2 * n])
    comb = (mx[:, 2 * n:] * scale[2] + base[2 * n:]).unflatten(-1, (n, n)).softmax(-1) + eps
    comb = comb * (1.0 / (comb.sum(-2, keepdim=True) + eps))
    for _ in range(iters - 1):
        comb = comb * (1.0 / (comb.sum(-1, keepdim=True) + eps))
        comb = comb * (1.0 / (comb.sum(-2, keepdim=True) + eps))
    x = pre[:, 0, None] * hf[:, 0]
    for j in range(1, n):
        x = x + pre[:, j, None] * hf[:, j]
    return x.to(h.dtype), post, comb


# ----------------------------------------------------------------------------------------------------------------
# CuTe DSL kernels
if HAVE_CUTE:
    import cutlass
    import cutlass.cute as cute
    from cutlass import Int32, Int64, Float32, BFloat16, const_expr
    from cutlass.cutlass_dsl import T as _T, dsl_user_op
    from cutlass._mlir.dialects import llvm as _llvm

    _HC_RN = cute.math.RoundingMode.NEAREST_EVEN

    def _mul_rn(a, b):
        return cute.math.mul(Float32(a), Float32(b), rounding=_HC_RN)      # never contracted into an FMA

    def _add_rn(a, b):
        return cute.math.add(Float32(a), Float32(b), rounding=_HC_RN)

    def _fma(a, b, c):
        return cute.math.fma(Float32(a), Float32(b), Float32(c))

    def _sigmoid(z):
        return Float32(1.0) / (Float32(1.0) + cute.math.exp(-z))

    def _warp_transpose_sum(vals, lane):
        """vals: 32 Float32 per lane -> the warp-wide sum of vals[lane]. Each butterfly stage sends the half of the
        list the partner keeps and keeps the other half (lane bit `off` picks which), 16+8+4+2+1 shuffles."""
        off = len(vals) // 2
        while off >= 1:
            upper = (lane & off) != 0
            nxt = []
            for i in range(off):
                lo, hi = vals[i], vals[i + off]
                send = Float32(cutlass.select_(upper, lo, hi))
                keep = Float32(cutlass.select_(upper, hi, lo))
                nxt.append(keep + cute.arch.shuffle_sync_bfly(send, offset=off))
            vals = nxt
            off //= 2
        return vals[0]

    class HcMix:
        """part[g, m, s] = Σ over column group g (32 columns of each of the n streams) of fn[s]·h (s < mix) and of
        h² (s = mix), slots mix+1.. = 0. fuse_post: h is first built from the previous sub-block,
        h[k] = bf16(post_k·f + Σ_j comb[j,k]·res[j]), and written to mHout (hc_post fused with the next hc_pre).
        A CTA (one warp) holds its fn columns in registers and walks its tok_block tokens in chunks of TB: all loads
        of a chunk are issued before any arithmetic (one memory round trip per chunk, not per token)."""

        TB = 8

        def __init__(self, dim: int, n: int, mix: int, fuse_post: bool, pdl: bool):
            assert dim % (4 * HC_COLS) == 0 and mix + 1 <= HC_SLOTS
            self.dim, self.n, self.mix, self.fuse_post, self.pdl = dim, n, mix, fuse_post, pdl
            self.groups = dim // HC_COLS
            self.pc = n + n * n                  # post + comb floats per token (fused variant, staged in smem)

        @cute.jit
        def __call__(self, mH: cute.Tensor, mFn: cute.Tensor, mPart: cute.Tensor, mF: cute.Tensor,
                     mPost: cute.Tensor, mComb: cute.Tensor, mHout: cute.Tensor, tok_block: Int32, stream):
            @cute.struct
            class SharedStorage:
                pc: cute.struct.MemRange[Float32, self.TB * self.pc]

            self.shared_storage = SharedStorage
            num_tokens = cute.size(mH, mode=[0])
            blocks = (num_tokens + tok_block - 1) // tok_block
            self.kernel(mH, mFn, mPart, mF, mPost, mComb, mHout, tok_block).launch(
                grid=[self.groups, blocks, 1], block=[32, 1, 1], stream=stream, use_pdl=self.pdl)

        def _fn_column(self, mFn, col):
            return [[mFn[r, j * self.dim + col] for j in range(self.n)] for r in range(self.mix)]

        def _token_slots(self, w, hv):
            vals = []
            for r in range(self.mix):
                acc = w[r][0] * hv[0]
                for j in range(1, self.n):
                    acc = _fma(w[r][j], hv[j], acc)
                vals.append(acc)
            ssq = hv[0] * hv[0]
            for j in range(1, self.n):
                ssq = _fma(hv[j], hv[j], ssq)
            vals.append(ssq)
            while len(vals) < HC_SLOTS:
                vals.append(Float32(0.0))
            return vals

        def _post_h(self, sPC, t, fv, res, mHout, m, col):
            """New residual column of token m (chunk slot t): out[k] = post_k·f + Σ_j comb[j,k]·res[j] (fp32: the
            product post·f rounded, the comb sum an FMA chain in j order, as HcPost), stored as bf16; returns the
            rounded values."""
            n = self.n
            base = t * self.pc
            hv = []
            for k in range(n):
                mm = _mul_rn(sPC[base + n + k], res[0])
                for j in range(1, n):
                    mm = _fma(sPC[base + n + j * n + k], res[j], mm)
                o = _add_rn(_mul_rn(sPC[base + k], fv), mm).to(BFloat16)
                mHout[m, k * self.dim + col] = o
                hv.append(o.to(Float32))
            return hv

        @cute.kernel
        def kernel(self, mH: cute.Tensor, mFn: cute.Tensor, mPart: cute.Tensor, mF: cute.Tensor,
                   mPost: cute.Tensor, mComb: cute.Tensor, mHout: cute.Tensor, tok_block: Int32):
            lane, _, _ = cute.arch.thread_idx()
            g, mb, _ = cute.arch.block_idx()
            n, TB = self.n, self.TB
            num_tokens = cute.size(mH, mode=[0])
            col = g * HC_COLS + lane
            smem = cutlass.utils.SmemAllocator()
            storage = smem.allocate(self.shared_storage)
            sPC = storage.pc.get_tensor(cute.make_layout(TB * self.pc))
            w = self._fn_column(mFn, col)               # weights do not depend on the previous kernel
            if const_expr(self.pdl):
                cute.arch.griddepcontrol_launch_dependents()   # the next kernel may start its weight loads now
                cute.arch.griddepcontrol_wait()
            m_begin = mb * tok_block
            m_end = cutlass.min(m_begin + tok_block, num_tokens)
            hbuf = cute.make_rmem_tensor((TB * n,), Float32)
            fbuf = cute.make_rmem_tensor((TB,), Float32)
            for c0 in cutlass.range(m_begin, m_end, TB, unroll=1):
                hbuf.fill(0.0)
                fbuf.fill(0.0)
                for t in cutlass.range_constexpr(TB):                  # phase 1: every load of the chunk
                    if c0 + t < m_end:
                        for j in cutlass.range_constexpr(n):
                            hbuf[t * n + j] = mH[c0 + t, j * self.dim + col].to(Float32)
                        if const_expr(self.fuse_post):
                            fbuf[t] = mF[c0 + t, col].to(Float32)
                if const_expr(self.fuse_post):                         # post/comb of the chunk -> smem
                    for i in cutlass.range_constexpr((TB * self.pc + 31) // 32):
                        q = lane + 32 * i
                        t = q // self.pc
                        e = q - t * self.pc
                        if q < TB * self.pc and c0 + t < m_end:
                            if e < n:
                                sPC[q] = mPost[c0 + t, e]
                            else:
                                sPC[q] = mComb[c0 + t, e - n]
                    cute.arch.sync_warp()
                for t in cutlass.range_constexpr(TB):                  # phase 2: arithmetic + one store per token
                    if c0 + t < m_end:
                        hv = [hbuf[t * n + j] for j in range(n)]
                        if const_expr(self.fuse_post):
                            hv = self._post_h(sPC, t, fbuf[t], hv, mHout, c0 + t, col)
                        mPart[g, c0 + t, lane] = _warp_transpose_sum(self._token_slots(w, hv), lane)
                if const_expr(self.fuse_post):
                    cute.arch.sync_warp()                              # sPC is rewritten by the next chunk

    class HcFinalize:
        """Per token m: mix = (Σ_g part[g, m, :mix]) · rsqrt(Σ_g part[g, m, mix] / (n·D) + norm_eps), then
        pre = sigmoid(mix[:n]·scale0 + base) + eps and x[m] = bf16(Σ_j pre_j·h[m, j]) over CTA slices 0..S-1 of the
        columns; unless head: the last CTA of the token writes post = 2·sigmoid(mix[n:2n]·scale1 + base) and the
        Sinkhorn-projected comb (softmax rows + eps, column normalization, iters-1 rounds of row then column).
        grid (M, slices): slices > 1 puts post/comb in a CTA of its own (decode); slices == 1 does all in one."""

        def __init__(self, dim: int, n: int, mix: int, iters: int, head: bool, norm: bool, pdl: bool):
            assert dim % (4 * HC_COLS) == 0 and mix + 1 <= HC_SLOTS
            self.dim, self.n, self.mix, self.iters, self.head, self.pdl = dim, n, mix, iters, head, pdl
            self.norm = norm            # x is returned RMS-normalized (one CTA holds the whole row)
            self.groups = dim // HC_COLS
            self.threads = FIN_THREADS
            self.vecs = dim // 8
            self.vpt = -(-self.vecs // self.threads)       # 8-column vectors per thread (norm: the whole row)

        @cute.jit
        def __call__(self, mPart: cute.Tensor, mH: cute.Tensor, mScale: cute.Tensor, mBase: cute.Tensor,
                     mX: cute.Tensor, mPost: cute.Tensor, mComb: cute.Tensor, mW: cute.Tensor, eps: Float32,
                     norm_eps: Float32, slices: Int32, stream):
            @cute.struct
            class SharedStorage:
                red: cute.struct.MemRange[Float32, 4 * HC_SLOTS]
                nrm: cute.struct.MemRange[Float32, 4]
                w_base: cute.struct.MemRange[Float32, HC_SLOTS]
                w_scale: cute.struct.MemRange[Float32, 4]

            self.shared_storage = SharedStorage
            num_tokens = cute.size(mX, mode=[0])
            self.kernel(mPart, mH, mScale, mBase, mX, mPost, mComb, mW, eps, norm_eps).launch(
                grid=[num_tokens, slices, 1], block=[self.threads, 1, 1], stream=stream, use_pdl=self.pdl)

        def _x_slice(self, mH, mX, m, pre, v):
            """Columns 8v..8v+7 of x[m] = Σ_j pre_j·h[m, j] (products rounded, summed in j order, like torch)."""
            hb = cute.make_rmem_tensor((1, 8), BFloat16)
            hf = cute.make_rmem_tensor((1, 8), Float32)
            acc = cute.make_rmem_tensor((1, 8), Float32)
            vecs = self.dim // 8
            for j in range(self.n):
                cute.autovec_copy(cute.local_tile(mH, (1, 8), (m, j * vecs + v)), hb)
                hf.store(hb.load().to(Float32))
                for i in range(8):
                    p = _mul_rn(pre[j], hf[0, i])
                    acc[0, i] = p if j == 0 else _add_rn(acc[0, i], p)
            hb.store(acc.load().to(BFloat16))
            cute.autovec_copy(hb, cute.local_tile(mX, (1, 8), (m, v)))

        def _x_vec(self, mH, m, pre, v, xs, i):
            """xs[i, :] = float(bf16(x[m, 8v..8v+7])) (as _x_slice, kept for the norm)."""
            hb = cute.make_rmem_tensor((1, 8), BFloat16)
            hf = cute.make_rmem_tensor((1, 8), Float32)
            acc = cute.make_rmem_tensor((1, 8), Float32)
            for j in range(self.n):
                cute.autovec_copy(cute.local_tile(mH, (1, 8), (m, j * self.vecs + v)), hb)
                hf.store(hb.load().to(Float32))
                for k in range(8):
                    p = _mul_rn(pre[j], hf[0, k])
                    acc[0, k] = p if j == 0 else _add_rn(acc[0, k], p)
            hb.store(acc.load().to(BFloat16))
            hf.store(hb.load().to(Float32))
            for k in range(8):
                xs[i, k] = hf[0, k]

        def _y_vec(self, mW, mX, m, v, xs, i, rstd):
            wv = cute.make_rmem_tensor((1, 8), Float32)
            yv = cute.make_rmem_tensor((1, 8), Float32)
            yb = cute.make_rmem_tensor((1, 8), BFloat16)
            cute.autovec_copy(cute.local_tile(mW, (1, 8), (0, v)), wv)
            for k in range(8):
                yv[0, k] = _mul_rn(wv[0, k], _mul_rn(xs[i, k], rstd))
            yb.store(yv.load().to(BFloat16))
            cute.autovec_copy(yb, cute.local_tile(mX, (1, 8), (m, v)))

        def _sinkhorn(self, red, rms, mScale, mBase, mPost, mComb, m, eps):
            n = self.n

            def mix(r):
                return self._slot(red, r) * rms

            for j in range(n):
                mPost[m, j] = Float32(2.0) * _sigmoid(mix(n + j) * mScale[1] + mBase[n + j])
            c = [[mix(2 * n + j * n + k) * mScale[2] + mBase[2 * n + j * n + k] for k in range(n)]
                 for j in range(n)]
            for j in range(n):                                   # softmax over k, then + eps
                mx = c[j][0]
                for k in range(1, n):
                    mx = cute.arch.fmax(mx, c[j][k])
                e = [cute.math.exp(c[j][k] - mx) for k in range(n)]
                s = e[0]
                for k in range(1, n):
                    s = s + e[k]
                c[j] = [e[k] / s + eps for k in range(n)]

            c = self._project(c, eps)
            for j in range(n):
                for k in range(n):
                    mComb[m, j * n + k] = c[j][k]

        def _project(self, c, eps):
            """Column normalization, then iters-1 rounds of row + column normalization (lists of n x n values)."""
            n = self.n
            c = self._col_norm(c, eps)
            if const_expr(self.iters > 1):
                # the iters-1 rounds as a loop (unrolled, as in sessions 2-5: ~1400 straight-line instructions; the
                # loop measured 0.1-0.25 us per site faster on the H200); same operations, same order
                cr = cute.make_rmem_tensor((n * n,), Float32)
                for j in range(n):
                    for k in range(n):
                        cr[j * n + k] = c[j][k]
                self._sinkhorn_rounds(cr, eps)
                c = [[cr[j * n + k] for k in range(n)] for j in range(n)]
            return c

        @cute.jit
        def _sinkhorn_rounds(self, cr: cute.Tensor, eps: Float32):
            n = self.n
            for _ in cutlass.range(self.iters - 1, unroll=1):
                c = [[cr[j * n + k] for k in range(n)] for j in range(n)]
                c = self._col_norm(self._row_norm(c, eps), eps)
                for j in cutlass.range_constexpr(n):
                    for k in cutlass.range_constexpr(n):
                        cr[j * n + k] = c[j][k]

        @staticmethod
        def _tree_sum(v):                     # pairwise: a shorter dependency chain than left to right
            while len(v) > 1:
                v = [v[i] + v[i + 1] for i in range(0, len(v) - 1, 2)] + ([v[-1]] if len(v) % 2 else [])
            return v[0]

        def _col_norm(self, c, eps):
            n = self.n
            for k in range(n):
                s = self._tree_sum([c[j][k] for j in range(n)])
                r = cute.arch.rcp_approx(s + eps)
                for j in range(n):
                    c[j][k] = c[j][k] * r
            return c

        def _row_norm(self, c, eps):
            n = self.n
            for j in range(n):
                s = self._tree_sum(list(c[j]))
                r = cute.arch.rcp_approx(s + eps)
                c[j] = [c[j][k] * r for k in range(n)]
            return c

        def _slot(self, red, r):
            """Full sum of slot r in a fixed order (the 4 warp sums, in warp order)."""
            return ((red[r] + red[HC_SLOTS + r]) + red[2 * HC_SLOTS + r]) + red[3 * HC_SLOTS + r]

        def _pre(self, red, rms, mScale, mBase, eps):
            return [_sigmoid(self._slot(red, j) * rms * mScale[0] + mBase[j]) + eps for j in range(self.n)]

        @cute.kernel
        def kernel(self, mPart: cute.Tensor, mH: cute.Tensor, mScale: cute.Tensor, mBase: cute.Tensor,
                   mX: cute.Tensor, mPost: cute.Tensor, mComb: cute.Tensor, mW: cute.Tensor, eps: Float32,
                   norm_eps: Float32):
            tidx, _, _ = cute.arch.thread_idx()
            m, s, _ = cute.arch.block_idx()
            _, slices, _ = cute.arch.grid_dim()
            warp = tidx // 32
            lane = tidx % 32
            smem = cutlass.utils.SmemAllocator()
            storage = smem.allocate(self.shared_storage)
            red = storage.red.get_tensor(cute.make_layout(4 * HC_SLOTS))
            sBase = storage.w_base.get_tensor(cute.make_layout(HC_SLOTS))
            sScale = storage.w_scale.get_tensor(cute.make_layout(4))
            if tidx < self.mix:                   # weights: loaded before waiting on the previous kernel
                sBase[tidx] = mBase[tidx]
            if tidx < (1 if self.head else 3):
                sScale[tidx] = mScale[tidx]
            if const_expr(self.pdl):
                cute.arch.griddepcontrol_launch_dependents()   # the next kernel may start its weight loads now
                cute.arch.griddepcontrol_wait()
            per_warp = self.groups // 4
            acc = Float32(0.0)
            for g in cutlass.range(per_warp, unroll=min(per_warp, 32)):      # all loads in flight at once
                acc = acc + mPart[warp * per_warp + g, m, lane]
            red[warp * HC_SLOTS + lane] = acc
            cute.arch.sync_threads()
            rms = cute.math.rsqrt(self._slot(red, self.mix) * Float32(1.0 / (self.n * self.dim)) + norm_eps)
            x_ctas = slices
            if const_expr(self.norm):
                x_ctas = 1
            elif const_expr(not self.head):
                x_ctas = cutlass.max(slices - 1, 1)
            if s < x_ctas:
                pre = self._pre(red, rms, sScale, sBase, eps)
                if const_expr(self.norm):
                    # the whole row here: x (bf16-rounded, kept as fp32), its sum of squares over the CTA (lanes,
                    # then the 4 warps in order), then y = bf16(w * (x * rsqrt(mean(x^2) + eps))) as RMSNorm
                    xs = cute.make_rmem_tensor((self.vpt, 8), Float32)
                    xs.fill(0.0)
                    for i in cutlass.range_constexpr(self.vpt):
                        v = tidx + i * self.threads
                        if v < self.vecs:
                            self._x_vec(mH, m, pre, v, xs, i)
                    ss = Float32(0.0)
                    for i in cutlass.range_constexpr(self.vpt):
                        for k in cutlass.range_constexpr(8):
                            ss = _fma(xs[i, k], xs[i, k], ss)
                    for o in cutlass.range_constexpr(5):
                        ss = ss + cute.arch.shuffle_sync_bfly(ss, offset=1 << o)
                    nrm = storage.nrm.get_tensor(cute.make_layout(4))
                    if lane == 0:
                        nrm[warp] = ss
                    cute.arch.sync_threads()
                    ssq = ((nrm[0] + nrm[1]) + nrm[2]) + nrm[3]
                    rstd = cute.math.rsqrt(ssq * Float32(1.0 / self.dim) + norm_eps)
                    for i in cutlass.range_constexpr(self.vpt):
                        v = tidx + i * self.threads
                        if v < self.vecs:
                            self._y_vec(mW, mX, m, v, xs, i, rstd)
                else:
                    for v in cutlass.range(s * self.threads + tidx, self.vecs, x_ctas * self.threads, unroll=1):
                        self._x_slice(mH, mX, m, pre, v)
            if const_expr(not self.head):
                if s == slices - 1 and tidx == 0:
                    self._sinkhorn(red, rms, sScale, sBase, mPost, mComb, m, eps)

    class HcPost:
        """out[m, k] = bf16(post_k·f + Σ_j comb[j,k]·res[j]) for all n streams; one thread per 8 columns of one
        token (16-byte loads/stores); grid (M, D / 8 / threads)."""

        def __init__(self, dim: int, n: int, pdl: bool):
            self.dim, self.n, self.pdl = dim, n, pdl
            vecs = dim // 8
            self.threads = 128
            while vecs % self.threads:
                self.threads //= 2
            self.col_blocks = vecs // self.threads

        @cute.jit
        def __call__(self, mF: cute.Tensor, mRes: cute.Tensor, mPost: cute.Tensor, mComb: cute.Tensor,
                     mOut: cute.Tensor, stream):
            num_tokens = cute.size(mF, mode=[0])
            self.kernel(mF, mRes, mPost, mComb, mOut).launch(
                grid=[num_tokens, self.col_blocks, 1], block=[self.threads, 1, 1], stream=stream, use_pdl=self.pdl)

        @cute.kernel
        def kernel(self, mF: cute.Tensor, mRes: cute.Tensor, mPost: cute.Tensor, mComb: cute.Tensor,
                   mOut: cute.Tensor):
            tidx, _, _ = cute.arch.thread_idx()
            m, cb, _ = cute.arch.block_idx()
            v = cb * self.threads + tidx
            if const_expr(self.pdl):
                cute.arch.griddepcontrol_launch_dependents()   # the next kernel may start its weight loads now
                cute.arch.griddepcontrol_wait()
            self._columns(mF, mRes, mPost, mComb, mOut, m, v)

        def _columns(self, mF, mRes, mPost, mComb, mOut, m, v):
            n = self.n
            vecs = self.dim // 8
            hb = cute.make_rmem_tensor((1, 8), BFloat16)
            fv = cute.make_rmem_tensor((1, 8), Float32)
            ov = cute.make_rmem_tensor((1, 8), Float32)
            rv = [cute.make_rmem_tensor((1, 8), Float32) for _ in range(n)]
            cute.autovec_copy(cute.local_tile(mF, (1, 8), (m, v)), hb)
            fv.store(hb.load().to(Float32))
            for j in range(n):
                cute.autovec_copy(cute.local_tile(mRes, (1, 8), (m, j * vecs + v)), hb)
                rv[j].store(hb.load().to(Float32))
            for k in range(n):
                pk = mPost[m, k]
                ck = [mComb[m, j * n + k] for j in range(n)]
                for i in range(8):
                    mm = _mul_rn(ck[0], rv[0][0, i])
                    for j in range(1, n):
                        mm = _fma(ck[j], rv[j][0, i], mm)
                    ov[0, i] = _add_rn(_mul_rn(pk, fv[0, i]), mm)
                hb.store(ov.load().to(BFloat16))
                cute.autovec_copy(hb, cute.local_tile(mOut, (1, 8), (m, k * vecs + v)))

    @dsl_user_op
    def _st_async_f32(smem_addr: Int32, rank: Int32, val: Float32, mbar_addr: Int32, *, loc=None, ip=None):
        """st.async of val to smem_addr in cluster CTA `rank`; its 4 bytes complete a transaction on that CTA's
        mbarrier at mbar_addr (no fence on this thread's other stores, unlike a release barrier)."""
        _llvm.inline_asm(None, [Int32(smem_addr).ir_value(loc=loc, ip=ip), Int32(rank).ir_value(loc=loc, ip=ip),
                                Float32(val).ir_value(loc=loc, ip=ip), Int32(mbar_addr).ir_value(loc=loc, ip=ip)],
                         "{\n.reg .b32 a, b;\nmapa.shared::cluster.u32 a, $0, $1;\nmapa.shared::cluster.u32 b, $3, $1;\n"
                         "st.async.shared::cluster.mbarrier::complete_tx::bytes.f32 [a], $2, [b];\n}",
                         "r,r,f,r", has_side_effects=True, loc=loc, ip=ip)

    class _Offset:
        """red[base + i]: one token's [4 x HC_SLOTS] warp sums inside a TB-token array (for HcFinalize's helpers)."""

        def __init__(self, t, base):
            self.t, self.base = t, base

        def __getitem__(self, i):
            return self.t[self.base + i]

    class HcSiteCluster(HcFinalize):
        """One mHC site in one launch: (hc_post fused with) hc_pre + RMSNorm of x, bit-identical to HcMix +
        HcFinalize (norm). grid (C, token blocks of TB), one thread-block cluster of C <= 16 CTAs per token block.
        HcFinalize's norm CTA gives 128 threads 8-column vectors v = t + 128 i; CTA c of the cluster takes the columns
        of its nt of those threads (t in [c nt, (c+1) nt), every i) = nt/4 * vpt groups of 32 columns, one warp each:
        - mix warps (one per group, lane = column, as HcMix): fn column in registers (loaded before
          griddepcontrol.wait: fn is constant), then h (+ the fused hc_post: new streams written to mHout), the
          24 dot products + sum of squares, the transposing butterfly; the warp's 32-slot partial is stored into
          every CTA's shared memory (DSMEM) -> cluster barrier -> every CTA sums all partials in HcFinalize's order
          (4 chains of G/4 groups per slot, then the 4 chain sums in order), rms, pre; x of its own columns (kept in
          registers: no second pass over h); the norm's sum of squares: each of its nt virtual threads chains its
          32 columns in HcFinalize's order, an nt-lane butterfly, that value into every CTA's smem -> cluster
          barrier -> the rest of HcFinalize's butterfly (a pairwise tree over the CTAs of a warp) + the 4 warps in
          order -> y = bf16(w * (x * rstd)).
        - one more warp: loads scale/base, and in the last CTA runs the Sinkhorn (HcFinalize._sinkhorn, lane t for
          token t) off the critical path of the x/y columns, then writes post/comb.
        mStamp and the smem field stamp are unused (the phase-stamp probe's, removed in session 11; kept so the
        kernel's parameters and shared-memory layout, hence its PTX, stay the same)."""

        def __init__(self, dim: int, n: int, mix: int, iters: int, fuse_post: bool, norm: bool, tok_block: int,
                     nt: int = 8, pdl: bool = True, add_f2: bool = False, slots: tuple = ()):
            assert mix + 1 <= HC_SLOTS and site_cluster_dim_ok(dim)
            # slots = (k, E): f is the MoE's unsummed routed rows [T*k, D] (RoutedSlots): f = MoeCombine's sum of
            # token m's rows m*k + j whose id mIds[m*k + j] is in [0, E), j in order, fp32 from 0, one bf16 rounding
            self.slots = tuple(slots) if fuse_post else ()
            # softmax rows + post over n lanes per token (16 serialized IEEE divisions in one thread before, session
            # 6); more than 32 lanes' worth (n * tok_block > 32): one thread per token, as before
            self.lanes = n * tok_block <= 32
            assert nt % 4 == 0 and 32 % nt == 0 and nt * tok_block <= 32
            self.dim, self.n, self.mix, self.iters, self.pdl = dim, n, mix, iters, pdl
            self.head, self.norm, self.fuse_post, self.TB, self.nt = False, norm, fuse_post, tok_block, nt
            self.add_f2 = add_f2 and fuse_post       # f = bf16(f + f2) first (the MoE's routed + shared add)
            self.groups = dim // HC_COLS
            self.vpt = max(dim // (8 * FIN_THREADS), 1)       # HcFinalize's vectors per thread (all used)
            self.active = min(FIN_THREADS, dim // 8)           # HcFinalize threads that own columns
            self.ctas = self.active // nt
            assert 1 <= self.ctas <= 16
            self.gpc = nt // 4                                 # groups per CTA in each 1024-column chunk
            self.mix_warps = self.gpc * self.vpt
            self.cols = 32 * self.mix_warps                    # columns per CTA = mix threads
            self.threads = self.cols + 32
            self.pc = n + n * n
            self.cpw = 32 // nt                                # CTAs per HcFinalize warp
            self.chains = tok_block * 4 * (mix + 1)

        @cute.jit
        def __call__(self, mH: cute.Tensor, mFn: cute.Tensor, mF: cute.Tensor, mF2: cute.Tensor, mPost: cute.Tensor,
                     mComb: cute.Tensor, mHout: cute.Tensor, mScale: cute.Tensor, mBase: cute.Tensor,
                     mW: cute.Tensor, mX: cute.Tensor, mPostOut: cute.Tensor, mCombOut: cute.Tensor,
                     mStamp: cute.Tensor, mIds: cute.Tensor, eps: Float32, norm_eps: Float32, stream):
            @cute.struct
            class SharedStorage:
                part: cute.struct.Align[cute.struct.MemRange[Float32, self.TB * self.groups * HC_SLOTS], 16]
                red: cute.struct.MemRange[Float32, self.TB * 4 * HC_SLOTS]
                xs: cute.struct.MemRange[Float32, self.TB * self.cols]
                ssq: cute.struct.MemRange[Float32, self.TB * 16]
                w_base: cute.struct.MemRange[Float32, HC_SLOTS]
                w_scale: cute.struct.MemRange[Float32, 4]
                stamp: cute.struct.Align[cute.struct.MemRange[Int64, 16], 8]     # (unused: keeps mbar's offset)
                mbar: cute.struct.Align[cute.struct.MemRange[Int64, 2], 8]

            self.shared_storage = SharedStorage
            num_tokens = cute.size(mX, mode=[0])
            blocks = (num_tokens + self.TB - 1) // self.TB
            self.kernel(mH, mFn, mF, mF2, mPost, mComb, mHout, mScale, mBase, mW, mX, mPostOut, mCombOut, mStamp,
                        mIds, eps, norm_eps).launch(grid=[self.ctas, blocks, 1], block=[self.threads, 1, 1],
                                         cluster=[self.ctas, 1, 1], stream=stream, use_pdl=self.pdl)

        def _lane_butterfly(self, ss):
            """The first log2(nt) stages of HcFinalize's xor butterfly (lanes of one CTA's virtual threads)."""
            o = 1
            while o < self.nt:
                ss = ss + cute.arch.shuffle_sync_bfly(ss, offset=o)
                o *= 2
            return ss

        def _warp_sums(self, sS, t):
            """HcFinalize's 4 warp sums of squares of token t from the CTAs' nt-lane sums sS[t, c]: the remaining
            butterfly stages (offsets nt .. 16) are a pairwise tree over the CTAs of a warp (+ is commutative)."""
            nrm = []
            for q4 in range(4):
                if q4 * 32 < self.active:
                    v = [sS[t * 16 + q4 * self.cpw + u] for u in range(self.cpw)]
                    while len(v) > 1:
                        v = [v[u] + v[u + 1] for u in range(0, len(v), 2)]
                    nrm.append(v[0])
                else:
                    nrm.append(Float32(0.0))
            return nrm

        def _post_and_row(self, rv, rms, sScale, sBase, eps, j):
            """post_j and row j of the comb softmax (+ eps) with HcFinalize._sinkhorn's operations (j dynamic)."""
            n = self.n
            pj = Float32(2.0) * _sigmoid(self._slot(rv, n + j) * rms * sScale[1] + sBase[n + j])
            row = [self._slot(rv, 2 * n + j * n + k) * rms * sScale[2] + sBase[2 * n + j * n + k] for k in range(n)]
            mx = row[0]
            for k in range(1, n):
                mx = cute.arch.fmax(mx, row[k])
            e = [cute.math.exp(row[k] - mx) for k in range(n)]
            sm = e[0]
            for k in range(1, n):
                sm = sm + e[k]
            return pj, [e[k] / sm + eps for k in range(n)]

        def _gather_rows(self, row, t):
            """The n rows of token t from lanes t*n .. t*n+n-1 (every lane takes part in the shuffles)."""
            n = self.n
            return [[cute.arch.shuffle_sync(row[k], offset=t * n + jj) for k in range(n)] for jj in range(n)]

        def _push(self, addr, rank, val, mbar_addr):
            _st_async_f32(addr, rank, val, mbar_addr)

        @cute.kernel
        def kernel(self, mH: cute.Tensor, mFn: cute.Tensor, mF: cute.Tensor, mF2: cute.Tensor, mPost: cute.Tensor,
                   mComb: cute.Tensor, mHout: cute.Tensor, mScale: cute.Tensor, mBase: cute.Tensor,
                   mW: cute.Tensor, mX: cute.Tensor, mPostOut: cute.Tensor, mCombOut: cute.Tensor,
                   mStamp: cute.Tensor, mIds: cute.Tensor, eps: Float32, norm_eps: Float32):
            tidx, _, _ = cute.arch.thread_idx()
            c, mb, _ = cute.arch.block_idx()                   # c = rank in the cluster (cluster [C, 1, 1])
            warp = tidx // 32
            lane = tidx % 32
            n, TB, G = self.n, self.TB, self.groups
            num_tokens = cute.size(mX, mode=[0])
            smem = cutlass.utils.SmemAllocator()
            storage = smem.allocate(self.shared_storage)
            sPart = storage.part.get_tensor(cute.make_layout(TB * G * HC_SLOTS))
            red = storage.red.get_tensor(cute.make_layout(TB * 4 * HC_SLOTS))
            sX = storage.xs.get_tensor(cute.make_layout(TB * self.cols))
            sS = storage.ssq.get_tensor(cute.make_layout(TB * 16))
            sBase = storage.w_base.get_tensor(cute.make_layout(HC_SLOTS))
            sScale = storage.w_scale.get_tensor(cute.make_layout(4))
            mbar_ptr = storage.mbar.data_ptr()
            mbar_addr = mbar_ptr.toint()
            # two one-shot mbarriers: the partials (phase 1) and the sums of squares (phase 2); thread 0 arrives
            # once on each, expecting the bytes the peers will store into this CTA for the valid tokens
            if tidx == 0:
                valid = cutlass.min(num_tokens - mb * TB, TB)
                per = cutlass.select_(c == self.ctas - 1, Int32(self.mix + 1), Int32(n + 1))
                cute.arch.mbarrier_init(mbar_ptr, 1)
                cute.arch.mbarrier_init(mbar_ptr + 1, 1)
                cute.arch.mbarrier_init_fence()
                cute.arch.mbarrier_arrive_and_expect_tx(mbar_ptr, valid * G * per * 4)
                cute.arch.mbarrier_arrive_and_expect_tx(mbar_ptr + 1, valid * self.ctas * 4)
            cute.arch.cluster_arrive_relaxed()        # phase 0: this CTA runs (peers may store into its smem)
            if warp < self.mix_warps:
                i = warp // self.gpc
                g = i * 32 + c * self.gpc + (warp - i * self.gpc)          # this warp's group of 32 columns
                col = g * HC_COLS + lane
                w = HcMix._fn_column(self, mFn, col)   # fn does not depend on the previous kernel
                if const_expr(self.pdl):
                    cute.arch.griddepcontrol_launch_dependents()
                    cute.arch.griddepcontrol_wait()
                hb = cute.make_rmem_tensor((TB * n,), Float32)
                fb = cute.make_rmem_tensor((TB,), Float32)
                pcb = cute.make_rmem_tensor((TB * self.pc,), Float32)
                f2b = cute.make_rmem_tensor((TB,), Float32)
                hb.fill(0.0)
                fb.fill(0.0)
                f2b.fill(0.0)
                pcb.fill(0.0)
                for t in cutlass.range_constexpr(TB):                      # every load first
                    m = mb * TB + t
                    if m < num_tokens:
                        for j in cutlass.range_constexpr(n):
                            hb[t * n + j] = mH[m, j * self.dim + col].to(Float32)
                        if const_expr(self.slots):
                            # MoeCombine: slots whose id is not in [0, E) add nothing (a +0.0 here: a sum that
                            # starts at +0.0 never becomes -0.0, so adding +0.0 changes no bit)
                            nk = self.slots[0]
                            acc = Float32(0.0)
                            for j in cutlass.range_constexpr(nk):
                                e = mIds[m * nk + j]
                                v = cutlass.select_(e >= 0, mF[m * nk + j, col].to(Float32), Float32(0.0))
                                acc = _add_rn(acc, cutlass.select_(e < self.slots[1], v, Float32(0.0)))
                            fb[t] = acc.to(BFloat16).to(Float32)
                        elif const_expr(self.fuse_post):
                            fb[t] = mF[m, col].to(Float32)
                        if const_expr(self.fuse_post):
                            if const_expr(self.add_f2):
                                f2b[t] = mF2[m, col].to(Float32)
                            for e in cutlass.range_constexpr(n):
                                pcb[t * self.pc + e] = mPost[m, e]
                            for e in cutlass.range_constexpr(n * n):
                                pcb[t * self.pc + n + e] = mComb[m, e]
                cute.arch.cluster_wait()                                   # phase 0 done: peers run
                part_base = storage.part.data_ptr().toint()
                for t in cutlass.range_constexpr(TB):
                    m = mb * TB + t
                    if m < num_tokens:
                        hv = [hb[t * n + j] for j in range(n)]
                        if const_expr(self.fuse_post):
                            fv = fb[t]
                            if const_expr(self.add_f2):        # torch's bf16 + bf16: one fp32 add, one rounding
                                fv = _add_rn(fv, f2b[t]).to(BFloat16).to(Float32)
                            hv = HcMix._post_h(self, pcb, t, fv, hv, mHout, m, col)
                            for j in cutlass.range_constexpr(n):
                                hb[t * n + j] = hv[j]
                        s = _warp_transpose_sum(HcMix._token_slots(self, w, hv), lane)
                        # pre's slots and the sum of squares go to every CTA, all slots to the Sinkhorn CTA
                        addr = part_base + ((t * G + g) * HC_SLOTS + lane) * 4
                        if lane < n or lane == self.mix:
                            for r in cutlass.range_constexpr(self.ctas - 1):
                                self._push(addr, r, s, mbar_addr)
                        if lane <= self.mix:
                            self._push(addr, self.ctas - 1, s, mbar_addr)
                cute.arch.mbarrier_wait(mbar_ptr, 0)                       # every partial of this CTA arrived
                per_warp = G // 4
                sink = c == self.ctas - 1
                ns = cutlass.select_(sink, Int32(self.mix + 1), Int32(n + 1))     # slots summed in this CTA
                per_tok = 4 * ns
                for q in cutlass.range(tidx, TB * per_tok, self.cols, unroll=1):   # HcFinalize's order
                    t = q // per_tok
                    rem = q - t * per_tok
                    w4 = rem // ns
                    si = rem - w4 * ns
                    s = cutlass.select_(si < n, si, cutlass.select_(sink, si, Int32(self.mix)))
                    base = (t * G + w4 * per_warp) * HC_SLOTS + s
                    acc = Float32(0.0)
                    for gg in cutlass.range(per_warp, unroll=min(per_warp, 32)):
                        acc = acc + sPart[base + gg * HC_SLOTS]
                    red[t * 4 * HC_SLOTS + w4 * HC_SLOTS + s] = acc
                _sync_threads_from_roles()                                 # (the Sinkhorn warp too)
                local = warp * 32 + lane
                for t in cutlass.range_constexpr(TB):
                    m = mb * TB + t
                    if m < num_tokens:
                        rv = _Offset(red, t * 4 * HC_SLOTS)
                        rms = cute.math.rsqrt(self._slot(rv, self.mix) * Float32(1.0 / (self.n * self.dim))
                                              + norm_eps)
                        pre = self._pre(rv, rms, sScale, sBase, eps)
                        acc = _mul_rn(pre[0], hb[t * n])
                        for j in cutlass.range_constexpr(1, n):
                            acc = _add_rn(acc, _mul_rn(pre[j], hb[t * n + j]))
                        xb = acc.to(BFloat16)
                        if const_expr(self.norm):
                            sX[t * self.cols + local] = xb.to(Float32)
                        else:
                            mX[m, col] = xb
                if const_expr(self.norm):
                    cute.arch.barrier(barrier_id=1, number_of_threads=self.cols)   # the mix warps' x in smem
                    if warp == 0:
                        tl = lane % self.nt
                        t = lane // self.nt
                        ss = Float32(0.0)
                        if t < TB:
                            for i2 in cutlass.range_constexpr(self.vpt):
                                for k in cutlass.range_constexpr(8):
                                    v = sX[t * self.cols + i2 * 32 * self.gpc + 8 * tl + k]
                                    ss = _fma(v, v, ss)
                        ss = self._lane_butterfly(ss)
                        if t < TB and tl == 0 and mb * TB + t < num_tokens:
                            ss_base = storage.ssq.data_ptr().toint() + (t * 16 + c) * 4
                            for r in cutlass.range_constexpr(self.ctas):
                                self._push(ss_base, r, ss, mbar_addr + 8)
                    cute.arch.mbarrier_wait(mbar_ptr + 1, 0)
                    for t in cutlass.range_constexpr(TB):
                        m = mb * TB + t
                        if m < num_tokens:
                            nrm = self._warp_sums(sS, t)
                            ssq = ((nrm[0] + nrm[1]) + nrm[2]) + nrm[3]
                            rstd = cute.math.rsqrt(ssq * Float32(1.0 / self.dim) + norm_eps)
                            y = _mul_rn(mW[0, col], _mul_rn(sX[t * self.cols + local], rstd))
                            mX[m, col] = y.to(BFloat16)
            else:
                # the Sinkhorn warp: scale / base -> smem before the wait, then the barriers of the mix warps
                if lane < self.mix:
                    sBase[lane] = mBase[lane]
                if lane < 3:
                    sScale[lane] = mScale[lane]
                if const_expr(self.pdl):
                    cute.arch.griddepcontrol_launch_dependents()
                    cute.arch.griddepcontrol_wait()
                cute.arch.cluster_wait()
                _sync_threads_from_roles()                                 # red is complete
                if const_expr(self.lanes):
                    # lane t*n + j: row j of token t's softmax and post_j (their divisions no longer one after the
                    # other in one thread), then lane t*n gathers the rows and runs the normalization rounds
                    if c == self.ctas - 1:
                        t = lane // n
                        j = lane - t * n
                        tt = cutlass.min(t, TB - 1)
                        m = mb * TB + t
                        rv = _Offset(red, tt * 4 * HC_SLOTS)
                        rms = cute.math.rsqrt(self._slot(rv, self.mix) * Float32(1.0 / (self.n * self.dim))
                                              + norm_eps)
                        pj, row = self._post_and_row(rv, rms, sScale, sBase, eps, j)
                        if t < TB and m < num_tokens:
                            mPostOut[m, j] = pj
                        cm = self._gather_rows(row, t)
                        if j == 0 and t < TB and m < num_tokens:
                            cm = self._project(cm, eps)
                            for jj in cutlass.range_constexpr(n):
                                for k in cutlass.range_constexpr(n):
                                    mCombOut[m, jj * n + k] = cm[jj][k]
                elif c == self.ctas - 1 and lane < TB:
                    m = mb * TB + lane
                    if m < num_tokens:
                        rv = _Offset(red, lane * 4 * HC_SLOTS)
                        rms = cute.math.rsqrt(self._slot(rv, self.mix) * Float32(1.0 / (self.n * self.dim))
                                              + norm_eps)
                        self._sinkhorn(rv, rms, sScale, sBase, mPostOut, mCombOut, m, eps)


# ----------------------------------------------------------------------------------------------------------------
# Compile cache (kernels.py's: memory dict -> exported object on disk -> compile)
def _fake_2d(dtype, rows, cols, align=16):
    return cute.runtime.make_fake_compact_tensor(dtype, (rows, cols), stride_order=(1, 0), assumed_align=align)


def _compile_mix(dim: int, n: int, mix: int, fuse_post: bool, pdl: bool | None = None):
    pdl = HC_USE_PDL if pdl is None else pdl

    def build():
        m = cute.sym_int()
        args = (_fake_2d(BFloat16, m, n * dim, 2), _fake_2d(Float32, mix, n * dim, 4),
                cute.runtime.make_fake_compact_tensor(Float32, (dim // HC_COLS, m, HC_SLOTS), stride_order=(2, 1, 0),
                                                      assumed_align=16),
                _fake_2d(BFloat16, cute.sym_int(), dim, 2), _fake_2d(Float32, cute.sym_int(), n, 4),
                _fake_2d(Float32, cute.sym_int(), n * n, 4), _fake_2d(BFloat16, cute.sym_int(), n * dim, 2),
                Int32(1), cute.runtime.make_fake_stream(use_tvm_ffi_env_stream=True))
        return HcMix(dim, n, mix, fuse_post, pdl), args
    return _load_or_compile(("hc_mix", dim, n, mix, fuse_post, pdl), build)


def _compile_finalize(dim: int, n: int, mix: int, iters: int, head: bool, norm: bool, pdl: bool | None = None):
    pdl = HC_USE_PDL if pdl is None else pdl

    def build():
        m = cute.sym_int()
        args = (cute.runtime.make_fake_compact_tensor(Float32, (dim // HC_COLS, cute.sym_int(), HC_SLOTS),
                                                      stride_order=(2, 1, 0), assumed_align=16),
                _fake_2d(BFloat16, m, n * dim), cute.runtime.make_fake_compact_tensor(Float32, (cute.sym_int(),)),
                cute.runtime.make_fake_compact_tensor(Float32, (mix,)), _fake_2d(BFloat16, m, dim),
                _fake_2d(Float32, cute.sym_int(), n, 4), _fake_2d(Float32, cute.sym_int(), n * n, 4),
                _fake_2d(Float32, cute.sym_int(), cute.sym_int(), 16),
                Float32(0.0), Float32(0.0), Int32(1), cute.runtime.make_fake_stream(use_tvm_ffi_env_stream=True))
        return HcFinalize(dim, n, mix, iters, head, norm, pdl), args
    return _load_or_compile(("hc_fin", dim, n, mix, iters, head, norm, pdl), build)


def _compile_post(dim: int, n: int, pdl: bool | None = None):
    pdl = HC_USE_PDL if pdl is None else pdl

    def build():
        m = cute.sym_int()
        args = (_fake_2d(BFloat16, m, dim), _fake_2d(BFloat16, m, n * dim), _fake_2d(Float32, m, n, 4),
                _fake_2d(Float32, m, n * n, 4), _fake_2d(BFloat16, m, n * dim),
                cute.runtime.make_fake_stream(use_tvm_ffi_env_stream=True))
        return HcPost(dim, n, pdl), args
    return _load_or_compile(("hc_post", dim, n, pdl), build)


def _compile_site(dim: int, n: int, mix: int, iters: int, fuse_post: bool, norm: bool, tok_block: int, nt: int,
                  pdl: bool | None = None, add_f2: bool = False, slots: tuple = ()):
    pdl = HC_USE_PDL if pdl is None else pdl

    def build():
        m = cute.sym_int()
        args = (_fake_2d(BFloat16, cute.sym_int(), n * dim, 2), _fake_2d(Float32, mix, n * dim, 4),
                _fake_2d(BFloat16, cute.sym_int(), dim, 2), _fake_2d(BFloat16, cute.sym_int(), dim, 2),
                _fake_2d(Float32, cute.sym_int(), n, 4),
                _fake_2d(Float32, cute.sym_int(), n * n, 4), _fake_2d(BFloat16, cute.sym_int(), n * dim, 2),
                cute.runtime.make_fake_compact_tensor(Float32, (cute.sym_int(),)),
                cute.runtime.make_fake_compact_tensor(Float32, (mix,)),
                _fake_2d(Float32, cute.sym_int(), cute.sym_int(), 4), _fake_2d(BFloat16, m, dim, 2),
                _fake_2d(Float32, cute.sym_int(), n, 4), _fake_2d(Float32, cute.sym_int(), n * n, 4),
                cute.runtime.make_fake_compact_tensor(Int64, (cute.sym_int(),)),
                cute.runtime.make_fake_compact_tensor(Int32, (cute.sym_int(),)),
                Float32(0.0), Float32(0.0), cute.runtime.make_fake_stream(use_tvm_ffi_env_stream=True))
        return HcSiteCluster(dim, n, mix, iters, fuse_post, norm, tok_block, nt, pdl, add_f2, slots), args
    return _load_or_compile(("hc_site", dim, n, mix, iters, fuse_post, norm, tok_block, nt, pdl, add_f2) +
                            (("slots",) + tuple(slots) if slots else ()), build)


# ----------------------------------------------------------------------------------------------------------------
# Torch-facing functions (CUDA + CuTe DSL; bf16 h / f / res, fp32 fn / scale / base / post / comb)
def _tok_block(M: int) -> int:
    """Tokens per mix CTA: decode 2 (more CTAs share the arithmetic; the extra fn reads hit L2: H200 M=8 mix kernel
    2.8 us vs 4.3 us at 8), prefill 32 (each CTA reads its fn slice from L2 once per 32 tokens)."""
    return 2 if M <= 64 else 32


def site_cluster_dim_ok(D: int) -> bool:
    """HcSiteCluster's column split needs every HcFinalize thread to own the same number of whole vectors."""
    return D % 1024 == 0 or (D < 1024 and D % 256 == 0)


def _site_tok_block(M: int) -> int:
    """Tokens per cluster of HcSiteCluster: 1 up to 4 tokens (<= 4 clusters of 16 CTAs), then 2 (HC_CLUSTER_TB:
    a fixed value, for measurements)."""
    if HC_CLUSTER_TB:
        return HC_CLUSTER_TB
    return 1 if M <= 4 else 2


def _site_kernel(h2, fn, scale, base, n, iters, eps, norm_eps, post_args, norm_weight):
    """One HcSiteCluster launch (decode, M <= HC_CLUSTER_MAX_TOKENS): same outputs as HcMix + HcFinalize."""
    M, D = h2.shape[0], h2.shape[1] // n
    mix = fn.shape[0]
    dev = h2.device
    x = torch.empty(M, D, dtype=h2.dtype, device=dev)
    post = torch.empty(M, n, dtype=torch.float32, device=dev)
    comb = torch.empty(M, n, n, dtype=torch.float32, device=dev)
    comb2 = comb.view(M, n * n)
    norm = norm_weight is not None
    w = norm_weight.reshape(1, D) if norm else fn          # fn: placeholder, unused without the norm
    tb = _site_tok_block(M)
    stamps = _unused_stamps(dev)
    f2 = post_args[4] if post_args is not None and len(post_args) > 4 else None
    f = post_args[0] if post_args is not None else None
    slots = isinstance(f, RoutedSlots)
    op = _compile_site(D, n, mix, iters, post_args is not None, norm, tb, HC_CLUSTER_NT,
                       add_f2=f2 is not None, slots=(f.top_k, f.num_experts) if slots else ())
    ids = f.ids if slots else _unused_ids(dev)
    if post_args is None:       # h2 is the input; f / f2 / post / comb / hout only fill unused arguments
        op(h2, fn, x, x, post, comb2, h2, scale, base, w, x, post, comb2, stamps, ids, float(eps), float(norm_eps))
    else:
        res2, post_in, comb_in = post_args[1:4]
        f = f.rows if slots else f
        op(res2, fn, f, f if f2 is None else f2, post_in, comb_in, h2, scale, base, w, x, post, comb2, stamps, ids,
           float(eps), float(norm_eps))
    return x, post, comb


def _unused_stamps(dev) -> torch.Tensor:
    """HcSiteCluster's (unused) stamps argument, made once (a fill inside a graph capture would add a kernel node)."""
    t = _COUNTERS.get((dev, "site_stamps"))
    if t is None:
        t = _COUNTERS[(dev, "site_stamps")] = torch.zeros(1, dtype=torch.int64, device=dev)
    return t


def _unused_ids(dev) -> torch.Tensor:
    """HcSiteCluster's ids argument where f is not RoutedSlots (made once: a fill inside a graph capture would add
    a kernel node)."""
    t = _COUNTERS.get((dev, "site_ids"))
    if t is None:
        t = _COUNTERS[(dev, "site_ids")] = torch.full((1,), -1, dtype=torch.int32, device=dev)
    return t


def _site_cluster_takes(M: int, D: int, mix: int, head: bool) -> bool:
    return not head and M <= HC_CLUSTER_MAX_TOKENS and site_cluster_dim_ok(D) and \
        mix + 1 <= HC_SLOTS and min(FIN_THREADS, D // 8) // HC_CLUSTER_NT <= 16


def _pre_kernels(h2, fn, scale, base, n, iters, eps, norm_eps, head, post_args=None, norm_weight=None):
    """HcMix (plain or fused with the previous hc_post: post_args = (f, res2, post, comb2)) + HcFinalize, or at
    decode sizes HcSiteCluster (M <= HC_CLUSTER_MAX_TOKENS). h2 [M, n*D] is the collapsed input (fused: the new residual, written by
    the kernel)."""
    M, D = h2.shape[0], h2.shape[1] // n
    mix = fn.shape[0]
    dev = h2.device
    if _site_cluster_takes(M, D, mix, head):
        return _site_kernel(h2, fn, scale, base, n, iters, eps, norm_eps, post_args, norm_weight)
    part = torch.empty(D // HC_COLS, M, HC_SLOTS, dtype=torch.float32, device=dev)
    x = torch.empty(M, D, dtype=h2.dtype, device=dev)
    rows = 1 if head else M                      # hc_head has no post/comb: 1-row placeholders
    post = torch.empty(rows, n, dtype=torch.float32, device=dev)
    comb = torch.empty(rows, n, n, dtype=torch.float32, device=dev)
    comb2 = comb.view(rows, n * n)
    if post_args is None:       # x, post, comb, h2 only fill the unused fused-post arguments (never touched)
        _compile_mix(D, n, mix, False)(h2, fn, part, x, post, comb2, h2, _tok_block(M))
    else:
        f, res2, post_in, comb_in = post_args
        _compile_mix(D, n, mix, True)(res2, fn, part, f, post_in, comb_in, h2, _tok_block(M))
    norm = norm_weight is not None
    w = norm_weight.reshape(1, D) if norm else fn          # fn: placeholder, unused without the norm
    _compile_finalize(D, n, mix, iters, head, norm)(part, h2, scale, base, x, post, comb2, w, float(eps),
                                                    float(norm_eps), _pre_slices(M, D, head, norm))
    return x, post, comb


def _pre_slices(M: int, D: int, head: bool, norm: bool) -> int:
    """HcFinalize CTAs per token: decode spreads x over D/1024 CTAs (the norm needs the row in one CTA) + 1 CTA
    of its own for post/comb; prefill (many tokens) does everything of a token in one CTA."""
    if M > 64:
        return 1
    x_ctas = 1 if norm else -(-D // (8 * FIN_THREADS))
    return x_ctas if head else x_ctas + 1


def hc_pre_fused(h, fn, scale, base, n: int, iters: int, eps: float, norm_eps: float, norm_weight=None):
    """= hc_pre_reference: h [M,n,D] bf16 contiguous -> (x [M,D] bf16, post [M,n] fp32, comb [M,n,n] fp32).
    norm_weight [D] fp32 (optional): x comes back as RMSNorm(x) with that weight and eps norm_eps (dsv4.RMSNorm)."""
    M, _, D = h.shape
    if M > MAX_KERNEL_TOKENS or hc_unavailable_reason(h) is not None:
        x, post, comb = hc_pre_reference(h, fn, scale, base, n, iters, eps, norm_eps)
        return (x if norm_weight is None else rms_norm_reference(x, norm_weight, norm_eps)), post, comb
    return _pre_kernels(h.reshape(M, n * D), fn, scale, base, n, iters, eps, norm_eps, False,
                        norm_weight=norm_weight)


def hc_post_fused(f, res, post, comb):
    """= hc_post_reference: f [M,D] bf16, res [M,n,D] bf16, post [M,n], comb [M,n,n] fp32 -> [M,n,D] bf16."""
    M, n, D = res.shape
    if hc_unavailable_reason(res) is not None:
        return hc_post_reference(f, res, post, comb)
    out = torch.empty(M, n, D, dtype=res.dtype, device=res.device)
    _compile_post(D, n)(f.reshape(M, D).contiguous(), res.reshape(M, n * D), post.reshape(M, n).contiguous(),
                        comb.reshape(M, n * n).contiguous(), out.view(M, n * D))
    return out


def hc_post_pre_fused(f, res, post, comb, fn, scale, base, n: int, iters: int, eps: float, norm_eps: float,
                      norm_weight=None):
    """hc_post followed by the next hc_pre (+ optional RMSNorm of x), in one launch (HcSiteCluster) or two kernels:
    -> (h [M,n,D] bf16, x [M,D], post' [M,n], comb' [M,n,n]). f may be a pair (a, b) of bf16 [M,D] meaning the
    bf16 sum a + b (the MoE's routed + shared outputs): HcSiteCluster adds them itself, else torch does first."""
    M, _, D = res.shape
    f2 = None
    if isinstance(f, tuple):
        if _site_cluster_takes(M, D, fn.shape[0], False) and hc_unavailable_reason(res) is None:
            f, f2 = f[0], f[1].reshape(M, D).contiguous()
        else:
            f = routed_sum(f[0]).view(f[1].shape) + f[1]
    f = routed_sum(f) if isinstance(f, RoutedSlots) and f2 is None else f     # RoutedSlots only with the pair
    if M > MAX_KERNEL_TOKENS or hc_unavailable_reason(res) is not None:
        h = hc_post_fused(f, res, post, comb)
        return (h,) + hc_pre_fused(h, fn, scale, base, n, iters, eps, norm_eps, norm_weight)
    h = torch.empty(M, n, D, dtype=res.dtype, device=res.device)
    x, post2, comb2 = _pre_kernels(h.view(M, n * D), fn, scale, base, n, iters, eps, norm_eps, False,
                                   (f if isinstance(f, RoutedSlots) else f.reshape(M, D).contiguous(),
                                    res.reshape(M, n * D),
                                    post.reshape(M, n).contiguous(), comb.reshape(M, n * n).contiguous())
                                   + ((f2,) if f2 is not None else ()), norm_weight)
    return h, x, post2, comb2


def hc_head_fused(h, fn, scale, base, eps: float, norm_eps: float, norm_weight=None):
    """= hc_head_reference: h [M,n,D] bf16 -> [M,D] bf16 (fn [n, n*D], scale [1], base [n]); norm_weight: the
    final RMSNorm fused (dsv4: model.norm)."""
    M, n, D = h.shape
    if M > MAX_KERNEL_TOKENS or hc_unavailable_reason(h) is not None:
        x = hc_head_reference(h, fn, scale, base, eps, norm_eps)
        return x if norm_weight is None else rms_norm_reference(x, norm_weight, norm_eps)
    return _pre_kernels(h.reshape(M, n * D), fn, scale, base, n, 1, eps, norm_eps, True, norm_weight=norm_weight)[0]


def hc_unavailable_reason(h: torch.Tensor):
    """None if the fused hc kernels can run on h ([M,n,D] or [..., n, D]), else a short reason."""
    if not HAVE_CUTE:
        return "CuTe DSL is not installed"
    if not (h.is_cuda and torch.cuda.get_device_capability(h.device) == (9, 0)):
        return "no sm_90 GPU"
    if h.dtype != torch.bfloat16:
        return f"h is {h.dtype}, not bf16"
    if h.shape[-1] % 128:
        return f"D={h.shape[-1]} is not a multiple of 128"
    return None


# ====================================================================================================================
# Attention glue: norms, RoPE, FP8/FP4 sims (issue #5)
# ====================================================================================================================
# Fused element-wise glue around the attention projections (issue #5, GPU decode with M = B tokens = 1..8).
#
# Each kernel replaces a chain of 10-40 tiny torch ops of dsv4.py and reproduces its rounding points: fp32 math where
# the torch code computes in fp32 (every product and sum rounded on its own: explicit .rn multiplies/adds so nothing is
# contracted into an FMA), bf16 where it rounds to bf16, the same libm-class sin/cos/log2 and the same rsqrt.approx.
# What cannot be the same is the order of a long fp32 sum (the mean of squares of RMSNorm, the Hadamard product); see
# the GPU tests for how often that flips a bf16 result (it is at most 1 bf16 ulp of the rounded value).
#
# Torch-facing functions (bf16 CUDA tensors, contiguous; `angles` = the [max_pos, rope_dim/2] fp32 RoPE table and `pos`
# = int64 [1] position on the device, or pos=None with `angles` = the one row [1, rope_dim/2]):
#   rms_norm_fused(x, weight, eps)                                    = dsv4.RMSNorm.forward
#   q_norm_rope_fused(q, angles, pos, eps)                            = Attention._qkv's q tail
#   kv_norm_rope_quant_fused(kv, weight, angles, pos, eps, quant_sim) = Attention._qkv's kv tail
#   index_query_fused(q, angles, pos, quant_sim)                      = Indexer._query after wq_b
#   rope_inverse_fused(o, angles, pos)                                = Attention._out's apply_rope(inverse=True), in place
# Each has a `*_reference` (pure torch, the dsv4 math) beside it; the fused function falls back to it off-GPU.

FP8_MAX, FP4_MAX = 448.0, 6.0
QUANT_BLOCK_KV = 64        # act_quant block of the kv no-rope dims
QUANT_BLOCK_INDEX = 32     # fp4_quant block of the indexer queries
# torch on CUDA divides by a Python scalar as a * (1/b) with 1/b rounded to fp32 (div_true_kernel_cuda); pow2_scale's
# `amax / qmax` runs that way on the GPU, so the kernels multiply by the fp32 reciprocal (checked by a GPU test).
DIV_BY_RECIPROCAL = True
# The indexer's Hadamard in IndexQuery / IndexerTopKQuery (its queries) and index_key_fused (its keys at compressor
# entries; CompressorDecode, the decode step's compressor, keeps its own sequential order): "fwht" = butterflies in
# fp32, then one multiply by h; "fma_chain" = sum_j fma(x_j, +-h, acc) in j order (a GEMM's per-thread order). Neither
# gives cuBLAS's bits for (q.float() @ H) (GPU tests: both within tolerance of it).
# fwht since session 19: H200, the CSA index chain (iwq_b GEMV -> IndexQuery -> IndexerTopK, PDL, 16 steps per graph)
# 15.12 -> 10.27 us per step, IndexQuery alone 3.61 -> 2.02; decode step (8 layers, 4 CSA), two runs: -0.013 / -0.010
# ms per step at batch 1, -0.027 / -0.014 at batch 8, same logits there (pos 1000).
HADAMARD_MODE = "fwht"
POISON = False                # tests: NaN-fill outputs before the kernel so an unwritten element shows up
GLUE_PDL = True               # the decode glue kernels below (norms, RoPE, compressor, attention, indexer, router)
                              # launch as programmatic dependents: their launch overlaps the previous kernel's drain


def _pdl_enter():
    """First statement of a glue kernel launched with GLUE_PDL: wait until the previous kernel has finished (its
    results visible), then let the next kernel start its prologue (its own wait covers this kernel's results)."""
    if GLUE_PDL:
        cute.arch.griddepcontrol_wait()
        cute.arch.griddepcontrol_launch_dependents()



def _f32(v: float) -> float:
    return _f32_round(v)


def _recip_f32(q: float) -> float:
    return _f32_div(1.0, q)


def hadamard_scale(d: int) -> float:
    """The fp32 magnitude of dsv4.hadamard_matrix(d)'s entries: ones divided by sqrt(d) on the CPU in fp32."""
    return float(torch.ones(1) / math.sqrt(d))


TORCH_ORDER_SUMS = True   # RMSNorm sums of squares in the order of torch's CUDA reduce kernel (bit-exact norms)
SUM_SLOTS = 4             # torch's per-thread accumulator sets: the k-th vector of a thread goes to set k % SUM_SLOTS


def torch_sum_layout(n: int, rows: int):
    """(bw, vec, slots): how torch's CUDA reduce kernel (ATen Reduce.cuh) sums each row of a contiguous fp32
    [rows, n] tensor over its last dim: bw threads per row; thread t's k-th vec-wide vector (index t + k*bw; vec = 4:
    16-B loads, used when n > 128) is added element-wise into accumulator set k % slots; per element the sets are
    combined in order, then the vec elements in order; then the bw partials in a tree (pairs t, t + off for
    off = bw/2 .. 32 through shared memory, then a warp tree with offsets 1, 2, .., 16).
    None where this layout cannot be mirrored exactly (a partial vector per thread, < 32 threads, split rows)."""
    vec = 4 if n > 128 and n % 4 == 0 else 1
    dim0, mnt = n // vec, 512
    last_pow2 = lambda v: 1 << (v.bit_length() - 1)   # noqa: E731
    d0 = last_pow2(dim0) if dim0 < mnt else mnt
    d1 = last_pow2(rows) if rows < mnt else mnt
    bw = min(d0, 32)
    bh = min(d1, mnt // bw)
    bw = min(d0, mnt // bh)
    per_thread = n // bw                                 # values per thread: torch splits rows over warps (y) if big
    if bw < 32 or dim0 % bw or per_thread >= bh * 16 or per_thread >= 256:
        return None
    return bw, vec, SUM_SLOTS


# ----------------------------------------------------------------------------------------------------------------
# Torch references: the dsv4.py math, op for op (CPU tests check them against dsv4's own functions bitwise).
def _rope_reference(x: torch.Tensor, ang: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """dsv4.apply_rope with one angle row ang [rd/2] broadcast over every leading dim of x [..., d]."""
    rd = ang.shape[-1] * 2
    xr = x[..., -rd:].float().unflatten(-1, (-1, 2))
    cos, sin = ang.cos(), ang.sin()
    if inverse:
        sin = -sin
    re = xr[..., 0] * cos - xr[..., 1] * sin
    im = xr[..., 0] * sin + xr[..., 1] * cos
    return torch.cat([x[..., :-rd], torch.stack([re, im], -1).flatten(-2).to(x.dtype)], -1)


def _pow2_scale(amax: torch.Tensor, qmax: float) -> torch.Tensor:
    return torch.exp2(torch.ceil(torch.log2(amax / qmax)))


def _act_quant_reference(x: torch.Tensor, block: int) -> torch.Tensor:
    """dsv4.act_quant: FP8 e4m3 quantize-dequantize, power-of-two scale per block of the last dim."""
    xb = x.float().unflatten(-1, (-1, block))
    s = _pow2_scale(xb.abs().amax(-1, keepdim=True).clamp(min=1e-4), FP8_MAX)
    q = (xb / s).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return (q.float() * s).flatten(-2).to(x.dtype)


_E2M1_BOUNDS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)
_E2M1_GRID = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


_E2M1_TABLES: dict = {}


def _round_e2m1_reference(x: torch.Tensor) -> torch.Tensor:
    """dsv4.round_e2m1 (bucketize on the midpoints, odd ties up to the even code); tables made once per device (a
    CUDA-graph capture must not copy from the host)."""
    if x.device not in _E2M1_TABLES:
        _E2M1_TABLES[x.device] = (torch.tensor(_E2M1_BOUNDS, device=x.device), torch.tensor(_E2M1_GRID, device=x.device))
    bounds, grid = _E2M1_TABLES[x.device]
    a = x.abs()
    code = torch.bucketize(a, bounds)
    tie = (a == bounds[code.clamp(max=len(_E2M1_BOUNDS) - 1)]) & (code % 2 == 1)
    return grid[code + tie.long()] * x.sign()


def round_e2m1_arith(x: torch.Tensor) -> torch.Tensor:
    """The kernels' e2m1 rounding in torch: round-half-even on the grid's three spacings (0.5 below 2, 1 below 4,
    2 up to 6), sign as torch.sign (zero -> +0). Must equal round_e2m1 for |x| <= 6 (CPU test, exhaustive grid)."""
    a = x.abs()
    m = torch.where(a < 2, torch.round(a * 2) * 0.5, torch.where(a < 4, torch.round(a), torch.round(a * 0.5) * 2))
    return m * x.sign()


def _fp4_quant_reference(x: torch.Tensor, block: int) -> torch.Tensor:
    """dsv4.fp4_quant: e2m1 quantize-dequantize, power-of-two scale per block."""
    shape = x.shape
    xb = x.float().unflatten(-1, (shape[-1] // block, block))
    s = _pow2_scale(xb.abs().amax(-1, keepdim=True).clamp(min=FP4_MAX * 2.0 ** -126), FP4_MAX)
    q = _round_e2m1_reference((xb / s).clamp(-FP4_MAX, FP4_MAX))
    return (q * s).flatten(-2).to(x.dtype)


def _hadamard_reference(d: int, device) -> torch.Tensor:
    """dsv4.hadamard_matrix(d) on device."""
    h = torch.ones(1, 1)
    while h.shape[0] < d:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return (h / math.sqrt(d)).to(device)


def _angle_row(angles: torch.Tensor, pos: torch.Tensor | None, pos_shift: int = 0) -> torch.Tensor:
    """[rd/2] angles of the position: angles[(pos + pos_shift).clamp(min=0)] (pos int64 [1]), or the given row."""
    if pos is None:
        return angles.reshape(-1)
    return angles[(pos + pos_shift).clamp(min=0) if pos_shift else pos].reshape(-1)


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """dsv4.RMSNorm.forward: x [..., D] -> x.dtype, weight fp32 [D]."""
    xf = x.float()
    return (weight * (xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps))).to(x.dtype)


def q_norm_rope_reference(q: torch.Tensor, angles: torch.Tensor, pos: torch.Tensor | None, eps: float):
    """Attention._qkv after wq_b: q [..., hd] -> per-head RMS (no weight) -> q.dtype -> RoPE of the last rd dims."""
    q = (q.float() * torch.rsqrt(q.float().square().mean(-1, keepdim=True) + eps)).to(q.dtype)
    return _rope_reference(q, _angle_row(angles, pos))


def kv_norm_rope_quant_reference(kv: torch.Tensor, weight: torch.Tensor, angles: torch.Tensor,
                                 pos: torch.Tensor | None, eps: float, quant_sim: bool, pos_shift: int = 0):
    """Attention._qkv after wkv: kv [..., hd] bf16 -> kv_norm -> RoPE -> (quant_sim) FP8 sim of the no-rope dims.
    Also Compressor._entry (rotate=False): kv = the pooled fp32 rows (rounded to bf16 first), pos_shift = 1 - ratio."""
    ang = _angle_row(angles, pos, pos_shift)
    rd = 2 * ang.shape[0]
    kv = _rope_reference(rms_norm_reference(kv.to(torch.bfloat16), weight, eps), ang)
    if quant_sim:
        kv = torch.cat([_act_quant_reference(kv[..., :-rd], QUANT_BLOCK_KV), kv[..., -rd:]], -1)
    return kv


def index_key_reference(x: torch.Tensor, weight: torch.Tensor, angles: torch.Tensor, pos: torch.Tensor | None,
                        eps: float, quant_sim: bool, pos_shift: int = 0, hadamard: torch.Tensor | None = None):
    """Compressor._entry for rotate=True (indexer keys): pooled rows x [..., d] fp32 -> bf16 -> RMSNorm -> RoPE ->
    (quant_sim) fp4_quant((C.float() @ H).to(bf16), 32)."""
    C = _rope_reference(rms_norm_reference(x.to(torch.bfloat16), weight, eps), _angle_row(angles, pos, pos_shift))
    if quant_sim:
        h = hadamard if hadamard is not None else _hadamard_reference(C.shape[-1], C.device)
        C = _fp4_quant_reference((C.float() @ h).to(C.dtype), QUANT_BLOCK_INDEX)
    return C


def index_query_reference(q: torch.Tensor, angles: torch.Tensor, pos: torch.Tensor | None, quant_sim: bool,
                          hadamard: torch.Tensor | None = None):
    """Indexer._query after wq_b: q [..., hd] -> RoPE -> (quant_sim) fp4_quant((q.float() @ H).to(bf16), 32)."""
    q = _rope_reference(q, _angle_row(angles, pos))
    if quant_sim:
        h = hadamard if hadamard is not None else _hadamard_reference(q.shape[-1], q.device)
        q = _fp4_quant_reference((q.float() @ h).to(q.dtype), QUANT_BLOCK_INDEX)
    return q


def rope_inverse_reference(o: torch.Tensor, angles: torch.Tensor, pos: torch.Tensor | None):
    """Attention._out's first line: undo the RoPE of the last rd dims of o [..., hd]."""
    return _rope_reference(o, _angle_row(angles, pos), inverse=True)


# ----------------------------------------------------------------------------------------------------------------
# CuTe DSL kernels
if HAVE_CUTE:
    import cutlass
    import cutlass.cute as cute
    from cutlass import Int32, Int64, Float32, BFloat16, const_expr
    from cutlass.cutlass_dsl import T as _T, dsl_user_op
    from cutlass._mlir.dialects import llvm as _llvm

    _GLUE_RN = cute.math.RoundingMode.NEAREST_EVEN

    # fp32 arithmetic with explicit round-to-nearest: never contracted into FMAs (ptxas fuses plain mul.f32+add.f32)
    def _mul(a, b):
        return cute.math.mul(Float32(a), Float32(b), rounding=_GLUE_RN)

    def _add(a, b):
        return cute.math.add(Float32(a), Float32(b), rounding=_GLUE_RN)

    def _sub(a, b):
        return cute.math.add(Float32(a), -Float32(b), rounding=_GLUE_RN)     # a + (-b) == a - b exactly

    @dsl_user_op
    def _bits(x: Float32, *, loc=None, ip=None) -> Int32:
        return Int32(_llvm.bitcast(_T.i32(), Float32(x).ir_value(loc=loc, ip=ip), loc=loc, ip=ip))

    @dsl_user_op
    def _from_bits(i: Int32, *, loc=None, ip=None) -> Float32:
        return Float32(_llvm.bitcast(_T.f32(), Int32(i).ir_value(loc=loc, ip=ip), loc=loc, ip=ip))

    def _pow2(k):
        """2^k as fp32 for an integer k in [-126, 127] (exactly what exp2f gives for those)."""
        return _from_bits((Int32(k) + 127) << 23)

    def _warp_sum(v, lanes: int):
        off = lanes // 2
        while off > 0:
            v = _add(v, cute.arch.shuffle_sync_bfly(v, offset=off))
            off //= 2
        return v

    def _warp_max(v, lanes: int):
        off = lanes // 2
        while off > 0:
            v = cute.arch.fmax(v, cute.arch.shuffle_sync_bfly(v, offset=off))
            off //= 2
        return v

    @cute.jit
    def _pow2_scale_exp(amax, amin: float, qmax: float):
        """k with 2^k = pow2_scale(max(amax, amin), qmax): exp2(ceil(log2(amax / qmax))) as torch runs it on CUDA."""
        a = cute.arch.fmax(amax, Float32(amin))
        t = _mul(a, Float32(_recip_f32(qmax))) if const_expr(DIV_BY_RECIPROCAL) else a / Float32(qmax)
        return Int32(cute.math.ceil(cute.math.log2(t)))

    @cute.jit
    def _round_e4m3(v):
        """fp32 |v| <= 448 -> nearest e4m3fn value (ties to even), as torch's .to(float8_e4m3fn): spacing 2^(e-3)
        for 2^e <= |v| (e >= -6), 2^-9 below 2^-6."""
        e = ((_bits(v) >> 23) & 0xFF) - 127
        qe = cutlass.max(e, Int32(-6)) - 3
        return _mul(cute.math.roundeven(_mul(v, _pow2(-qe))), _pow2(qe))

    @cute.jit
    def _round_e2m1(v):
        """fp32 |v| <= 6 -> nearest e2m1 value (ties to the even code) times torch.sign(v)."""
        a = cute.math.abs(v)
        m = Float32(0.0)
        if a < Float32(2.0):
            m = _mul(cute.math.roundeven(_mul(a, 2.0)), 0.5)
        elif a < Float32(4.0):
            m = cute.math.roundeven(a)
        else:
            m = _mul(cute.math.roundeven(_mul(a, 0.5)), 2.0)
        r = Float32(0.0)
        if v > Float32(0.0):
            r = m
        elif v < Float32(0.0):
            r = -m
        return r

    @cute.jit
    def _rotate(x0, x1, ang, inverse: bool):
        """dsv4.apply_rope on one pair: (x0 c - x1 s, x0 s + x1 c), each product and sum rounded to fp32."""
        c = cute.math.cos(ang)
        s = cute.math.sin(ang)
        if const_expr(inverse):
            s = -s
        return _sub(_mul(x0, c), _mul(x1, s)), _add(_mul(x0, s), _mul(x1, c))

    @cute.jit
    def _ang_index(mPos, indexed: bool, shift: int):
        """Row of the angle table: max(pos + shift, 0) (pos read on the device), or 0 when the row itself is given."""
        p = Int32(0)
        if const_expr(indexed):
            p = cutlass.max(Int32(mPos[0]) + shift, Int32(0))
        return p

    @cute.jit
    def _thread_sum(get, per: int, vec: int, slots: int):
        """One torch reduce thread: get(k, i) = element i of its k-th vector; set k % slots accumulates it, the sets
        are combined per element, then the elements (the layout of torch_sum_layout)."""
        ns = min(slots, per)
        acc = cute.make_rmem_tensor((ns, vec), Float32)
        acc.fill(0.0)
        for k in cutlass.range_constexpr(per):
            for i in cutlass.range_constexpr(vec):
                acc[k % ns, i] = _add(acc[k % ns, i], get(k, i))
        a = Float32(0.0)
        for i in cutlass.range_constexpr(vec):
            e = acc[0, i]
            for u in cutlass.range_constexpr(1, ns):
                e = _add(e, acc[u, i])
            if const_expr(i == 0):
                a = e
            else:
                a = _add(a, e)
        return a

    @cute.jit
    def _torch_order_row_sum(srow, col, lane, n: int, bw: int, vec: int, slots: int):
        """Sum of srow[0..n-1, col] (fp32 squares in shared memory) by one warp, in torch_sum_layout's order: lane l
        plays threads l, l + 32, ..; the smem tree's partners are then in the same lane; every lane gets the sum."""
        J = bw // 32
        per = n // (vec * bw)
        part = cute.make_rmem_tensor((J,), Float32)
        for j in cutlass.range_constexpr(J):
            t = lane + 32 * j
            part[j] = _thread_sum(lambda k, i: srow[(t + k * bw) * vec + i, col], per, vec, slots)
        for step in cutlass.range_constexpr(J.bit_length() - 1):     # shared-memory steps bw/2 .. 32
            off = J >> (step + 1)
            for j in cutlass.range_constexpr(off):
                part[j] = _add(part[j], part[j + off])
        s = part[0]
        for o in (1, 2, 4, 8, 16):                               # shfl_down tree, lane 0's association
            s = _add(s, cute.arch.shuffle_sync_bfly(s, offset=o))
        return s

    class RmsNorm:
        """y = bf16(w * (x * rsqrt(mean(x^2) + eps))) per row of x [M, D] (dsv4.RMSNorm). One CTA per row.
        layout (bw, vec) = torch_sum_layout(D, M): bw threads, thread t squaring the vec-wide vectors t, t + bw, ..
        and summing them exactly like torch's reduce kernel (then the same smem + warp tree): bit-exact. layout
        None: 8-wide vectors per thread, a warp butterfly and the warps' partials in order (not torch's order)."""

        def __init__(self, dim: int, eps: float, layout=None):
            self.dim, self.eps, self.layout = dim, _f32(eps), layout
            if layout is None:
                assert dim % 256 == 0, "dim must be a multiple of 256"
                self.vec = 8
                vecs = dim // 8
                self.threads = min(vecs, 512)
                while vecs % self.threads:
                    self.threads //= 2
            else:
                self.threads, self.vec, self.slots = layout
            self.per_thread = dim // (self.vec * self.threads)
            self.warps = self.threads // 32

        @cute.jit
        def __call__(self, mX: cute.Tensor, mW: cute.Tensor, mOut: cute.Tensor, stream):
            @cute.struct
            class SharedStorage:
                part: cute.struct.MemRange[Float32, self.threads + 1]

            self.shared_storage = SharedStorage
            self.kernel(mX, mW, mOut).launch(grid=[cute.size(mX, mode=[0]), 1, 1], block=[self.threads, 1, 1],
                                             stream=stream, use_pdl=GLUE_PDL)

        @cute.kernel
        def kernel(self, mX: cute.Tensor, mW: cute.Tensor, mOut: cute.Tensor):
            tidx, _, _ = cute.arch.thread_idx()
            _pdl_enter()
            row, _, _ = cute.arch.block_idx()
            smem = cutlass.utils.SmemAllocator()
            storage = smem.allocate(self.shared_storage)
            part = storage.part.get_tensor(cute.make_layout(self.threads + 1))
            n, vec, T = self.per_thread, self.vec, self.threads
            xv = cute.make_rmem_tensor((1, vec * n), BFloat16)
            for v in cutlass.range_constexpr(n):
                cute.autovec_copy(cute.local_tile(mX, (1, vec), (row, v * T + tidx)),
                                  cute.local_tile(xv, (1, vec), (0, v)))
            xf = cute.make_rmem_tensor((1, vec * n), Float32)
            xf.store(xv.load().to(Float32))
            total = Float32(0.0)
            if const_expr(self.layout is not None):
                sq = cute.make_rmem_tensor((vec * n,), Float32)
                for i in cutlass.range_constexpr(vec * n):
                    sq[i] = _mul(xf[0, i], xf[0, i])
                a = _thread_sum(lambda k, i: sq[k * vec + i], n, vec, self.slots)
                part[tidx] = a
                for step in cutlass.range_constexpr((T // 32).bit_length() - 1):   # torch's shared-memory tree
                    off = T >> (step + 1)
                    cute.arch.sync_threads()
                    if tidx < off:
                        a = _add(a, part[tidx + off])
                        part[tidx] = a
                cute.arch.sync_threads()
                for o in (1, 2, 4, 8, 16):                             # then warp 0's shfl_down tree
                    a = _add(a, cute.arch.shuffle_sync_bfly(a, offset=o))
                if tidx == 0:
                    part[T] = a
                cute.arch.sync_threads()
                total = part[T]
            else:
                acc = Float32(0.0)
                for i in cutlass.range_constexpr(vec * n):
                    acc = _add(acc, _mul(xf[0, i], xf[0, i]))
                acc = _warp_sum(acc, 32)
                if tidx % 32 == 0:
                    part[tidx // 32] = acc
                cute.arch.sync_threads()
                total = part[0]
                for w in cutlass.range_constexpr(1, self.warps):
                    total = _add(total, part[w])
            r = cute.math.rsqrt(_add(_mul(total, _recip_f32(self.dim)), self.eps))
            wv = cute.make_rmem_tensor((vec * n,), Float32)
            for v in cutlass.range_constexpr(n):
                cute.autovec_copy(cute.local_tile(mW, (vec,), (v * T + tidx,)), cute.local_tile(wv, (vec,), (v,)))
            for i in cutlass.range_constexpr(vec * n):
                xf[0, i] = _mul(wv[i], _mul(xf[0, i], r))
            xv.store(xf.load().to(BFloat16))
            for v in cutlass.range_constexpr(n):
                cute.autovec_copy(cute.local_tile(xv, (1, vec), (0, v)),
                                  cute.local_tile(mOut, (1, vec), (row, v * T + tidx)))

    class HeadRows:
        """Shared logic of the per-row warp kernels: a row of head_dim values is held by one warp, lane l holding the
        `width`-wide chunks c = v*32 + l (v < vecs), so 16-B loads stay coalesced and RoPE pairs and quant blocks
        never straddle a lane's chunk. Rows are bf16, or fp32 (in_fp32: rounded to bf16 first, as `.to(bf16)`)."""

        def __init__(self, head_dim: int, rope_dim: int, warps: int, in_fp32: bool = False, layout=None):
            assert head_dim % 64 == 0 and rope_dim % 8 == 0 and rope_dim <= head_dim
            self.hd, self.rd, self.warps, self.in_fp32, self.layout = head_dim, rope_dim, warps, in_fp32, layout
            self.width = min(8, head_dim // 32)
            self.vecs = head_dim // (32 * self.width)
            assert rope_dim % self.width == 0

        @cute.jit
        def set_smem(self):
            @cute.struct
            class SharedStorage:
                row: cute.struct.MemRange[Float32, self.warps * self.hd]

            self.shared_storage = SharedStorage

        def smem_rows(self):
            """This CTA's per-warp fp32 rows [hd, warps] in shared memory."""
            smem = cutlass.utils.SmemAllocator()
            storage = smem.allocate(self.shared_storage)
            return storage.row.get_tensor(cute.make_layout((self.hd, self.warps)))

        def launch(self, args, rows, stream):
            self.kernel(*args).launch(grid=[cute.ceil_div(rows, self.warps), 1, 1], block=[32 * self.warps, 1, 1],
                                      stream=stream, use_pdl=GLUE_PDL)

        @cute.jit
        def load_row(self, mX, row, lane):
            """-> fp32 [1, width*vecs] of this lane's chunks, each value bf16-exact."""
            n, w = self.vecs, self.width
            xf = cute.make_rmem_tensor((1, w * n), Float32)
            if const_expr(self.in_fp32):
                xi = cute.make_rmem_tensor((1, w * n), Float32)
                for v in cutlass.range_constexpr(n):
                    cute.autovec_copy(cute.local_tile(mX, (1, w), (row, v * 32 + lane)),
                                      cute.local_tile(xi, (1, w), (0, v)))
                xf.store(xi.load().to(BFloat16).to(Float32))
            else:
                xv = cute.make_rmem_tensor((1, w * n), BFloat16)
                for v in cutlass.range_constexpr(n):
                    cute.autovec_copy(cute.local_tile(mX, (1, w), (row, v * 32 + lane)),
                                      cute.local_tile(xv, (1, w), (0, v)))
                xf.store(xv.load().to(Float32))
            return xf

        @cute.jit
        def store_row(self, xf, mOut, row, lane):
            n, w = self.vecs, self.width
            xv = cute.make_rmem_tensor((1, w * n), BFloat16)
            xv.store(xf.load().to(BFloat16))
            for v in cutlass.range_constexpr(n):
                cute.autovec_copy(cute.local_tile(xv, (1, w), (0, v)), cute.local_tile(mOut, (1, w), (row, v * 32 + lane)))

        @cute.jit
        def to_bf16(self, xf):
            """Round every value to bf16 (kept as fp32)."""
            xf.store(xf.load().to(BFloat16).to(Float32))

        @cute.jit
        def rms_norm(self, xf, mW, lane, eps: float, weighted: bool, srow, warp):
            """xf <- bf16([w *] (x * rsqrt(mean(x^2) + eps))) over the whole row (dsv4.RMSNorm / the q head norm).
            layout set: the squares go through srow[:, warp] and are summed in torch's order (bit-exact)."""
            n, w = self.vecs, self.width
            acc = Float32(0.0)
            if const_expr(self.layout is not None):
                for v in cutlass.range_constexpr(n):
                    for i in cutlass.range_constexpr(w):
                        srow[(v * 32 + lane) * w + i, warp] = _mul(xf[0, v * w + i], xf[0, v * w + i])
                cute.arch.sync_warp()
                acc = _torch_order_row_sum(srow, warp, lane, self.hd, *self.layout)
                cute.arch.sync_warp()                                   # srow may be reused after this
            else:
                for i in cutlass.range_constexpr(w * n):
                    acc = _add(acc, _mul(xf[0, i], xf[0, i]))
                acc = _warp_sum(acc, 32)
            r = cute.math.rsqrt(_add(_mul(acc, _recip_f32(self.hd)), eps))
            if const_expr(weighted):
                wv = cute.make_rmem_tensor((w * n,), Float32)
                for v in cutlass.range_constexpr(n):
                    cute.autovec_copy(cute.local_tile(mW, (w,), (v * 32 + lane,)), cute.local_tile(wv, (w,), (v,)))
                for i in cutlass.range_constexpr(w * n):
                    xf[0, i] = _mul(wv[i], _mul(xf[0, i], r))
            else:
                for i in cutlass.range_constexpr(w * n):
                    xf[0, i] = _mul(xf[0, i], r)
            self.to_bf16(xf)

        @cute.jit
        def rope(self, xf, mAng, p, lane, inverse: bool = False):
            """Rotate the pairs of the chunks in the last rope_dim dims, then round them to bf16 (dsv4.apply_rope)."""
            n, w = self.vecs, self.width
            first = (self.hd - self.rd) // w                         # first rope chunk
            for v in cutlass.range_constexpr(n):
                c = v * 32 + lane
                if c >= first:
                    j0 = (c - first) * (w // 2)
                    for i in cutlass.range_constexpr(w // 2):
                        a, b = _rotate(xf[0, v * w + 2 * i], xf[0, v * w + 2 * i + 1], mAng[p, j0 + i], inverse)
                        xf[0, v * w + 2 * i] = a
                        xf[0, v * w + 2 * i + 1] = b
            self.to_bf16(xf)

        @cute.jit
        def block_quant(self, xf, lane, block: int, qmax: float, amin: float, fp4: bool, first_rope: int):
            """Quantize-dequantize each `block`-wide block of chunks c < first_rope (others untouched): power-of-two
            scale s = exp2(ceil(log2(max(amax, amin) / qmax))), code = round(clamp(x / s, +-qmax)) in e4m3 or e2m1,
            value code * s (exact in bf16)."""
            n, w = self.vecs, self.width
            for v in cutlass.range_constexpr(n):
                amax = Float32(0.0)
                for i in cutlass.range_constexpr(w):
                    amax = cute.arch.fmax(amax, cute.math.abs(xf[0, v * w + i]))
                amax = _warp_max(amax, block // w)                     # every lane joins the shuffles
                k = _pow2_scale_exp(amax, amin, qmax)
                if v * 32 + lane < first_rope:
                    for i in cutlass.range_constexpr(w):
                        q = _mul(xf[0, v * w + i], _pow2(-k))          # x / s, exact (s a power of two)
                        q = cute.arch.fmin(cute.arch.fmax(q, Float32(-qmax)), Float32(qmax))
                        if const_expr(fp4):
                            q = _round_e2m1(q)
                        else:
                            q = _round_e4m3(q)
                        xf[0, v * w + i] = _mul(q, _pow2(k))

    class QNormRope(HeadRows):
        """q [R, hd] bf16 (R = tokens x heads) -> bf16(q * rsqrt(mean(q^2) + eps)) -> RoPE of the last rd dims ->
        bf16. One warp per row."""

        def __init__(self, head_dim: int, rope_dim: int, eps: float, indexed: bool, layout=None, warps: int = 4):
            super().__init__(head_dim, rope_dim, warps, False, layout)
            self.eps, self.indexed = _f32(eps), indexed

        @cute.jit
        def __call__(self, mX: cute.Tensor, mAng: cute.Tensor, mPos: cute.Tensor, mOut: cute.Tensor, stream):
            self.set_smem()
            self.launch((mX, mAng, mPos, mOut), cute.size(mX, mode=[0]), stream)

        @cute.kernel
        def kernel(self, mX: cute.Tensor, mAng: cute.Tensor, mPos: cute.Tensor, mOut: cute.Tensor):
            _pdl_enter()
            tidx, _, _ = cute.arch.thread_idx()
            bidx, _, _ = cute.arch.block_idx()
            lane = tidx % 32
            row = bidx * self.warps + tidx // 32
            srow = self.smem_rows()
            if row < cute.size(mX, mode=[0]):
                p = _ang_index(mPos, self.indexed, 0)
                xf = self.load_row(mX, row, lane)
                self.rms_norm(xf, mX, lane, self.eps, False, srow, tidx // 32)   # q.to(bf16) before the RoPE
                self.rope(xf, mAng, p, lane)
                self.store_row(xf, mOut, row, lane)

    class KvNormRopeQuant(HeadRows):
        """kv [M, hd] bf16 (or fp32: compressor entries) -> RMSNorm with weight -> bf16 -> RoPE of the last rd dims
        (angle row max(pos + pos_shift, 0)) -> bf16 -> (quant_sim) FP8 e4m3 quantize-dequantize of each 64-block of
        the no-rope dims with a power-of-two scale -> bf16. One warp per row. = Attention._qkv's kv tail, and
        Compressor._entry for rotate=False. ring > 0 (decode, indexed): row b goes to row b * ring + pos % ring of
        mOut, i.e. straight into its slot of the [B, ring, hd] sliding-window ring."""

        def __init__(self, head_dim: int, rope_dim: int, eps: float, quant_sim: bool, indexed: bool,
                     in_fp32: bool = False, pos_shift: int = 0, layout=None, warps: int = 1, ring: int = 0):
            super().__init__(head_dim, rope_dim, warps, in_fp32, layout)
            self.eps, self.quant_sim, self.indexed, self.pos_shift = _f32(eps), quant_sim, indexed, pos_shift
            self.ring = ring
            assert not ring or indexed
            self.block = QUANT_BLOCK_KV
            assert (head_dim - rope_dim) % self.block == 0 and self.block % self.width == 0
            assert 32 % (self.block // self.width) == 0

        @cute.jit
        def __call__(self, mX: cute.Tensor, mW: cute.Tensor, mAng: cute.Tensor, mPos: cute.Tensor,
                     mOut: cute.Tensor, stream):
            self.set_smem()
            self.launch((mX, mW, mAng, mPos, mOut), cute.size(mX, mode=[0]), stream)

        @cute.kernel
        def kernel(self, mX: cute.Tensor, mW: cute.Tensor, mAng: cute.Tensor, mPos: cute.Tensor, mOut: cute.Tensor):
            _pdl_enter()
            tidx, _, _ = cute.arch.thread_idx()
            bidx, _, _ = cute.arch.block_idx()
            lane = tidx % 32
            row = bidx * self.warps + tidx // 32
            srow = self.smem_rows()
            if row < cute.size(mX, mode=[0]):
                p = _ang_index(mPos, self.indexed, self.pos_shift)
                xf = self.load_row(mX, row, lane)
                self.rms_norm(xf, mW, lane, self.eps, True, srow, tidx // 32)
                self.rope(xf, mAng, p, lane)
                if const_expr(self.quant_sim):
                    self.block_quant(xf, lane, self.block, FP8_MAX, _f32(1e-4), False,
                                     (self.hd - self.rd) // self.width)
                if const_expr(self.ring > 0):
                    self.store_row(xf, mOut, row * self.ring + Int32(mPos[0]) % self.ring, lane)
                else:
                    self.store_row(xf, mOut, row, lane)

    class IndexQuery(HeadRows):
        """Indexer rows x [R, hd] -> (norm: RMSNorm with weight -> bf16) -> RoPE (angle row max(pos + pos_shift, 0))
        -> bf16 -> (quant_sim) Hadamard in fp32 -> bf16 -> FP4 e2m1 quantize-dequantize per 32-block with a
        power-of-two scale -> bf16. One warp per row. norm=False: Indexer._query after wq_b (R = tokens x heads);
        norm=True, fp32 rows: Compressor._entry for rotate=True (the indexer's keys).
        Hadamard: "fma_chain" = out_k = fma chain over j = 0..hd-1 of x_j * (+-h) (a GEMM's per-thread order);
        "fwht" = fast Walsh-Hadamard butterflies in fp32, then one multiply by h."""

        def __init__(self, head_dim: int, rope_dim: int, quant_sim: bool, indexed: bool, hadamard_mode: str,
                     norm: bool = False, eps: float = 1e-6, in_fp32: bool = False, pos_shift: int = 0,
                     layout=None, warps: int = 4):
            super().__init__(head_dim, rope_dim, warps, in_fp32, layout)
            assert self.vecs == 1 and head_dim & (head_dim - 1) == 0, "head_dim must be a power of two <= 256"
            self.quant_sim, self.indexed, self.mode = quant_sim, indexed, hadamard_mode
            self.norm, self.eps, self.pos_shift = norm, _f32(eps), pos_shift
            self.h = hadamard_scale(head_dim)
            self.block = QUANT_BLOCK_INDEX
            assert self.block % self.width == 0 and 32 % (self.block // self.width) == 0

        @cute.jit
        def __call__(self, mX: cute.Tensor, mW: cute.Tensor, mAng: cute.Tensor, mPos: cute.Tensor,
                     mOut: cute.Tensor, stream):
            self.set_smem()
            self.launch((mX, mW, mAng, mPos, mOut), cute.size(mX, mode=[0]), stream)

        @cute.kernel
        def kernel(self, mX: cute.Tensor, mW: cute.Tensor, mAng: cute.Tensor, mPos: cute.Tensor, mOut: cute.Tensor):
            _pdl_enter()
            tidx, _, _ = cute.arch.thread_idx()
            bidx, _, _ = cute.arch.block_idx()
            lane = tidx % 32
            warp = tidx // 32
            row = bidx * self.warps + warp
            srow = self.smem_rows()
            if row < cute.size(mX, mode=[0]):
                p = _ang_index(mPos, self.indexed, self.pos_shift)
                xf = self.load_row(mX, row, lane)
                if const_expr(self.norm):
                    self.rms_norm(xf, mW, lane, self.eps, True, srow, warp)
                self.transform(xf, mAng, p, lane, srow, warp)
                self.store_row(xf, mOut, row, lane)

        @cute.jit
        def transform(self, xf, mAng, p, lane, srow, warp):
            """xf (this lane's chunk of a row, bf16-exact) <- RoPE -> (quant_sim) Hadamard -> bf16 -> FP4 sim (srow:
            this warp's fp32 scratch row [hd, warp]). Also IndexerTopKQuery's query rows (same ops, same bits)."""
            w = self.width
            self.rope(xf, mAng, p, lane)
            if const_expr(self.quant_sim):
                if const_expr(self.mode == "fwht"):
                    self.fwht(xf, lane)
                else:
                    for i in cutlass.range_constexpr(w):
                        srow[lane * w + i, warp] = xf[0, i]
                    cute.arch.sync_warp()
                    acc = cute.make_rmem_tensor((1, w), Float32)
                    acc.fill(0.0)
                    for j in cutlass.range_constexpr(self.hd):
                        xj = srow[j, warp]
                        for i in cutlass.range_constexpr(w):
                            odd = cute.arch.popc(Int32(j) & (lane * w + i)) & 1
                            hj = Float32(self.h)
                            if odd != 0:
                                hj = Float32(-self.h)
                            acc[0, i] = cute.math.fma(xj, hj, acc[0, i])
                    xf.store(acc.load())
                self.to_bf16(xf)                                       # (q.float() @ H).to(bf16)
                self.block_quant(xf, lane, self.block, FP4_MAX, FP4_MAX * 2.0 ** -126, True, 32)

        @cute.jit
        def fwht(self, xf, lane):
            """In place: xf (this lane's chunk of the row) <- (row @ H) with H the Sylvester Hadamard matrix."""
            w = self.width
            for s in cutlass.range_constexpr(w.bit_length() - 1):     # strides inside the lane's chunk
                h = 1 << s
                for i in cutlass.range_constexpr(w):
                    if const_expr(i & h == 0):
                        a, b = xf[0, i], xf[0, i + h]
                        xf[0, i] = _add(a, b)
                        xf[0, i + h] = _sub(a, b)
            for s in cutlass.range_constexpr(5):                       # strides across lanes: lane xor off
                off = 1 << s
                for i in cutlass.range_constexpr(w):
                    mine = xf[0, i]
                    other = cute.arch.shuffle_sync_bfly(mine, offset=off)
                    res = _add(mine, other)
                    if lane & off != 0:
                        res = _sub(other, mine)
                    xf[0, i] = res
            for i in cutlass.range_constexpr(w):
                xf[0, i] = _mul(xf[0, i], self.h)

    class RopeInplace:
        """x [R, hd] bf16: rotate the pairs of the last rd dims by the position's angles (inverse: by minus them), in
        place. One thread per 8-wide chunk of the rope dims."""

        def __init__(self, head_dim: int, rope_dim: int, inverse: bool, indexed: bool, threads: int = 128):
            assert rope_dim % 8 == 0 and rope_dim <= head_dim and head_dim % 8 == 0
            self.hd, self.rd, self.inverse, self.indexed, self.threads = head_dim, rope_dim, inverse, indexed, threads
            self.chunks = rope_dim // 8

        @cute.jit
        def __call__(self, mX: cute.Tensor, mAng: cute.Tensor, mPos: cute.Tensor, stream):
            work = cute.size(mX, mode=[0]) * self.chunks
            self.kernel(mX, mAng, mPos).launch(grid=[cute.ceil_div(work, self.threads), 1, 1],
                                               block=[self.threads, 1, 1], stream=stream, use_pdl=GLUE_PDL)

        @cute.kernel
        def kernel(self, mX: cute.Tensor, mAng: cute.Tensor, mPos: cute.Tensor):
            _pdl_enter()
            tidx, _, _ = cute.arch.thread_idx()
            bidx, _, _ = cute.arch.block_idx()
            t = bidx * self.threads + tidx
            row = t // self.chunks
            ch = t % self.chunks
            if row < cute.size(mX, mode=[0]):
                p = _ang_index(mPos, self.indexed, 0)
                c = (self.hd - self.rd) // 8 + ch
                xv = cute.make_rmem_tensor((1, 8), BFloat16)
                cute.autovec_copy(cute.local_tile(mX, (1, 8), (row, c)), xv)
                xf = cute.make_rmem_tensor((1, 8), Float32)
                xf.store(xv.load().to(Float32))
                for i in cutlass.range_constexpr(4):
                    a, b = _rotate(xf[0, 2 * i], xf[0, 2 * i + 1], mAng[p, ch * 4 + i], self.inverse)
                    xf[0, 2 * i] = a
                    xf[0, 2 * i + 1] = b
                xv.store(xf.load().to(BFloat16))
                cute.autovec_copy(xv, cute.local_tile(mX, (1, 8), (row, c)))


# ----------------------------------------------------------------------------------------------------------------
# Compile cache (kernels._load_or_compile: memory -> disk object -> compile). The key carries this file's hash.
def _bf16_rows(rows, cols):
    return cute.runtime.make_fake_compact_tensor(BFloat16, (rows, cols), stride_order=(1, 0), assumed_align=16)


def _angle_args(half_rope: int):
    ang = cute.runtime.make_fake_compact_tensor(Float32, (cute.sym_int(), half_rope), stride_order=(1, 0),
                                                assumed_align=4)
    pos = cute.runtime.make_fake_compact_tensor(Int64, (cute.sym_int(),), assumed_align=8)
    return ang, pos


def _stream():
    return cute.runtime.make_fake_stream(use_tvm_ffi_env_stream=True)


def _compile_rms_norm(dim: int, eps: float, layout=None):
    def build():
        rows = cute.sym_int()
        w = cute.runtime.make_fake_compact_tensor(Float32, (dim,), assumed_align=16)
        return RmsNorm(dim, eps, layout), (_bf16_rows(rows, dim), w, _bf16_rows(rows, dim), _stream())
    return _load_or_compile(("glue_rms", GLUE_PDL, dim, _f32(eps), layout), build)


def _compile_q_norm_rope(head_dim: int, rope_dim: int, eps: float, indexed: bool, layout=None):
    def build():
        rows = cute.sym_int()
        return QNormRope(head_dim, rope_dim, eps, indexed, layout), (
            _bf16_rows(rows, head_dim), *_angle_args(rope_dim // 2), _bf16_rows(rows, head_dim), _stream())
    return _load_or_compile(("glue_qrope", GLUE_PDL, head_dim, rope_dim, _f32(eps), indexed, layout), build)


def _compile_kv_norm_rope_quant(head_dim: int, rope_dim: int, eps: float, quant_sim: bool, indexed: bool,
                                in_fp32: bool = False, pos_shift: int = 0, layout=None, ring: int = 0):
    def build():
        rows = cute.sym_int()
        w = cute.runtime.make_fake_compact_tensor(Float32, (head_dim,), assumed_align=16)
        x = (cute.runtime.make_fake_compact_tensor(Float32, (rows, head_dim), stride_order=(1, 0), assumed_align=16)
             if in_fp32 else _bf16_rows(rows, head_dim))
        out = _bf16_rows(cute.sym_int() if ring else rows, head_dim)
        return KvNormRopeQuant(head_dim, rope_dim, eps, quant_sim, indexed, in_fp32, pos_shift, layout, ring=ring), (
            x, w, *_angle_args(rope_dim // 2), out, _stream())
    key = ("glue_kv", GLUE_PDL, head_dim, rope_dim, _f32(eps), quant_sim, indexed, in_fp32, pos_shift, layout)
    return _load_or_compile(key + (("ring", ring),) if ring else key, build)


def _compile_index_query(head_dim: int, rope_dim: int, quant_sim: bool, indexed: bool, mode: str, norm: bool = False,
                         eps: float = 1e-6, in_fp32: bool = False, pos_shift: int = 0, layout=None):
    def build():
        rows = cute.sym_int()
        w = cute.runtime.make_fake_compact_tensor(Float32, (cute.sym_int(),), assumed_align=16)   # norm weight
        x = (cute.runtime.make_fake_compact_tensor(Float32, (rows, head_dim), stride_order=(1, 0), assumed_align=16)
             if in_fp32 else _bf16_rows(rows, head_dim))
        return IndexQuery(head_dim, rope_dim, quant_sim, indexed, mode, norm, eps, in_fp32, pos_shift, layout), (
            x, w, *_angle_args(rope_dim // 2), _bf16_rows(rows, head_dim), _stream())
    return _load_or_compile(("glue_iq", GLUE_PDL, head_dim, rope_dim, quant_sim, indexed, mode, norm, _f32(eps), in_fp32,
                               pos_shift, layout), build)


def _compile_rope(head_dim: int, rope_dim: int, inverse: bool, indexed: bool):
    def build():
        rows = cute.sym_int()
        return RopeInplace(head_dim, rope_dim, inverse, indexed), (_bf16_rows(rows, head_dim),
                                                                   *_angle_args(rope_dim // 2), _stream())
    return _load_or_compile(("glue_rope", GLUE_PDL, head_dim, rope_dim, inverse, indexed), build)


# ----------------------------------------------------------------------------------------------------------------
# Torch-facing functions: the kernel on an sm_90 GPU with CuTe DSL, else the reference.
def glue_unavailable_reason(x: torch.Tensor, dtypes=(torch.bfloat16,)) -> str | None:
    """None if the fused kernels can run on x, else why not."""
    if not HAVE_CUTE:
        return "CuTe DSL is not installed"
    if not (x.is_cuda and torch.cuda.get_device_capability(x.device) == (9, 0)):
        return "no sm_90 GPU"
    if x.dtype not in dtypes:
        return f"x is {x.dtype}, not {' or '.join(str(d) for d in dtypes)}"
    if not x.is_contiguous():
        return "x is not contiguous"
    return None


def _pos_arg(angles: torch.Tensor, pos: torch.Tensor | None):
    """(table [P, rd/2], pos int64 tensor, indexed) for the kernels. pos=None: angles is the position's row and the
    kernel reads row 0 (an empty int64 tensor stands in for pos, never read)."""
    ang = angles.reshape(-1, angles.shape[-1])
    if pos is None:
        return ang, torch.empty(0, dtype=torch.int64, device=ang.device), False
    return ang, pos, True


def _layout(n: int, rows: int):
    """The static sum layout of a norm over rows of n values: torch's (bit-exact) where it can be mirrored."""
    return torch_sum_layout(n, rows) if TORCH_ORDER_SUMS else None


def _rows(x: torch.Tensor, d: int) -> torch.Tensor:
    return x.reshape(-1, d)


def _out_like(x: torch.Tensor, dtype=None) -> torch.Tensor:
    out = torch.empty(x.shape, dtype=dtype or x.dtype, device=x.device)
    if POISON:
        out.fill_(float("nan"))
    return out


def rms_norm_fused(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """dsv4.RMSNorm.forward (x [..., D] bf16, weight fp32 [D]) in one kernel."""
    if glue_unavailable_reason(x) is not None or (_layout(x.shape[-1], x.numel() // max(x.shape[-1], 1)) is None
                                                  and x.shape[-1] % 256):
        return rms_norm_reference(x, weight, eps)
    D = x.shape[-1]
    out = _out_like(x)
    _compile_rms_norm(D, eps, _layout(D, x.numel() // D))(_rows(x, D), weight, _rows(out, D))
    return out


def q_norm_rope_fused(q: torch.Tensor, angles: torch.Tensor, pos: torch.Tensor | None, eps: float) -> torch.Tensor:
    """q [..., hd] bf16 -> per-head RMS -> bf16 -> RoPE (last 2*angles.shape[-1] dims) -> bf16, one kernel."""
    if glue_unavailable_reason(q) is not None:
        return q_norm_rope_reference(q, angles, pos, eps)
    hd, rd = q.shape[-1], 2 * angles.shape[-1]
    ang, p, indexed = _pos_arg(angles, pos)
    out = _out_like(q)
    _compile_q_norm_rope(hd, rd, eps, indexed, _layout(hd, q.numel() // hd))(_rows(q, hd), ang, p, _rows(out, hd))
    return out


def kv_norm_rope_quant_fused(kv: torch.Tensor, weight: torch.Tensor, angles: torch.Tensor,
                             pos: torch.Tensor | None, eps: float, quant_sim: bool, pos_shift: int = 0,
                             ring: torch.Tensor | None = None) -> torch.Tensor:
    """kv [..., hd] bf16 (or fp32 pooled compressor rows) -> kv_norm -> RoPE at row max(pos + pos_shift, 0) ->
    (quant_sim) FP8 sim of the no-rope dims -> bf16 [..., hd], one kernel. ring [B, W, hd] (decode: kv [B, 1, hd],
    pos given): the rows go straight into their sliding-window slot ring[:, pos % W] (returns ring)."""
    if glue_unavailable_reason(kv, (torch.bfloat16, torch.float32)) is not None or (
            ring is not None and (pos is None or not ring.is_contiguous() or ring.dtype != torch.bfloat16)):
        out = kv_norm_rope_quant_reference(kv, weight, angles, pos, eps, quant_sim, pos_shift)
        if ring is None:
            return out
        return ring.index_copy_(1, pos % ring.shape[1], out.reshape(ring.shape[0], 1, -1).to(ring.dtype))
    hd, rd = kv.shape[-1], 2 * angles.shape[-1]
    ang, p, indexed = _pos_arg(angles, pos)
    out = _out_like(kv, torch.bfloat16) if ring is None else ring
    rows = kv.numel() // hd
    _compile_kv_norm_rope_quant(hd, rd, eps, quant_sim, indexed, kv.dtype == torch.float32, pos_shift if indexed else 0,
                                _layout(hd, rows), 0 if ring is None else ring.shape[1])(
        _rows(kv, hd), weight, ang, p, _rows(out, hd))
    return out


def index_query_fused(q: torch.Tensor, angles: torch.Tensor, pos: torch.Tensor | None, quant_sim: bool) -> torch.Tensor:
    """Indexer queries q [..., hd] bf16 -> RoPE -> (quant_sim) Hadamard + FP4 sim -> bf16, one kernel. The Hadamard
    matrix is dsv4.hadamard_matrix(hd) (the Indexer's buffer)."""
    if glue_unavailable_reason(q) is not None or q.shape[-1] > 256:
        return index_query_reference(q, angles, pos, quant_sim)
    hd, rd = q.shape[-1], 2 * angles.shape[-1]
    ang, p, indexed = _pos_arg(angles, pos)
    out = _out_like(q, torch.bfloat16)
    _compile_index_query(hd, rd, quant_sim, indexed, HADAMARD_MODE)(_rows(q, hd), ang.reshape(-1), ang, p,
                                                                    _rows(out, hd))
    return out


def index_key_fused(x: torch.Tensor, weight: torch.Tensor, angles: torch.Tensor, pos: torch.Tensor | None,
                    eps: float, quant_sim: bool, pos_shift: int = 0) -> torch.Tensor:
    """Compressor._entry for the indexer keys (rotate=True): pooled rows x [..., d] fp32 (or bf16) -> bf16 -> RMSNorm
    -> RoPE at row max(pos + pos_shift, 0) -> (quant_sim) Hadamard + FP4 sim -> bf16, one kernel."""
    if glue_unavailable_reason(x, (torch.bfloat16, torch.float32)) is not None or x.shape[-1] > 256:
        return index_key_reference(x, weight, angles, pos, eps, quant_sim, pos_shift)
    hd, rd = x.shape[-1], 2 * angles.shape[-1]
    ang, p, indexed = _pos_arg(angles, pos)
    out = _out_like(x, torch.bfloat16)
    _compile_index_query(hd, rd, quant_sim, indexed, HADAMARD_MODE, True, eps, x.dtype == torch.float32,
                         pos_shift if indexed else 0, _layout(hd, x.numel() // hd))(_rows(x, hd), weight, ang, p,
                                                                                     _rows(out, hd))
    return out


def rope_inverse_fused(o: torch.Tensor, angles: torch.Tensor, pos: torch.Tensor | None) -> torch.Tensor:
    """Undo the RoPE of the last rd dims of o [..., hd] bf16, IN PLACE (returns o); the other dims are untouched."""
    if glue_unavailable_reason(o) is not None:
        return rope_inverse_reference(o, angles, pos)
    hd, rd = o.shape[-1], 2 * angles.shape[-1]
    ang, p, indexed = _pos_arg(angles, pos)
    _compile_rope(hd, rd, True, indexed)(_rows(o, hd), ang, p)
    return o


# ====================================================================================================================
# Shared-expert SwiGLU (issue #5): the element-wise tail between the merged w1|w3 GEMV and w2, one kernel
# ====================================================================================================================
# dsv4.Expert: a = bf16(silu(min(g, limit)) * clamp(u, -limit, limit)) in fp32 (limit 0: no clamp), where
# gu = [g | u] is the one [M, 2I] output of the merged w1|w3 projection. Seven torch kernels at decode -> one.
SWIGLU_THREADS = 128
SWIGLU_USE_PDL = True     # starts while the w1|w3 GEMV drains; w2's GEMV starts while it runs


def swiglu_reference(gu: torch.Tensor, limit: float) -> torch.Tensor:
    """gu [..., 2I] -> [..., I] in gu.dtype: dsv4.Expert's activation."""
    g, u = gu.float().chunk(2, -1)
    if limit:
        g, u = g.clamp(max=limit), u.clamp(-limit, limit)
    return (torch.nn.functional.silu(g) * u).to(gu.dtype)


if HAVE_CUTE:
    class SwiGlu:
        """out[m, i] = bf16(silu(min(g, L)) * clamp(u, +-L)), g = gu[m, i], u = gu[m, I + i]; one thread per 8
        columns (16-byte loads/stores), grid (M, I / 8 / threads)."""

        def __init__(self, inter: int, clamp: bool, pdl: bool = True):
            self.inter, self.clamp, self.pdl = inter, clamp, pdl
            self.threads = SWIGLU_THREADS
            while (inter // 8) % self.threads:
                self.threads //= 2
            self.col_blocks = inter // 8 // self.threads

        @cute.jit
        def __call__(self, mGU: cute.Tensor, mOut: cute.Tensor, limit: Float32, stream):
            self.kernel(mGU, mOut, limit).launch(grid=[cute.size(mGU, mode=[0]), self.col_blocks, 1],
                                                 block=[self.threads, 1, 1], stream=stream, use_pdl=self.pdl)

        @cute.kernel
        def kernel(self, mGU: cute.Tensor, mOut: cute.Tensor, limit: Float32):
            tidx, _, _ = cute.arch.thread_idx()
            m, cb, _ = cute.arch.block_idx()
            v = cb * self.threads + tidx
            if const_expr(self.pdl):
                cute.arch.griddepcontrol_launch_dependents()   # w2 may start streaming its weights now
                cute.arch.griddepcontrol_wait()
            hb = cute.make_rmem_tensor((1, 8), BFloat16)
            gv = cute.make_rmem_tensor((1, 8), Float32)
            uv = cute.make_rmem_tensor((1, 8), Float32)
            cute.autovec_copy(cute.local_tile(mGU, (1, 8), (m, v)), hb)
            gv.store(hb.load().to(Float32))
            cute.autovec_copy(cute.local_tile(mGU, (1, 8), (m, self.inter // 8 + v)), hb)
            uv.store(hb.load().to(Float32))
            for i in cutlass.range_constexpr(8):
                g, u = gv[0, i], uv[0, i]
                if const_expr(self.clamp):
                    g = cute.arch.fmin(g, limit)
                    u = cute.arch.fmax(cute.arch.fmin(u, limit), -limit)
                gv[0, i] = g / (Float32(1.0) + cute.math.exp(-g)) * u
            hb.store(gv.load().to(BFloat16))
            cute.autovec_copy(hb, cute.local_tile(mOut, (1, 8), (m, v)))


def _compile_swiglu(inter: int, clamp: bool, pdl: bool = True):
    def build():
        rows = cute.sym_int()
        return SwiGlu(inter, clamp, pdl), (_bf16_rows(rows, 2 * inter), _bf16_rows(rows, inter), Float32(0.0),
                                           _stream())
    return _load_or_compile(("swiglu", inter, clamp, pdl), build)


def swiglu_fused(gu: torch.Tensor, limit: float) -> torch.Tensor:
    """= swiglu_reference, one kernel on an sm_90 GPU with CuTe DSL (bf16 gu, I % 8 == 0), else the reference."""
    I2 = gu.shape[-1]
    if glue_unavailable_reason(gu) is not None or I2 % 16:
        return swiglu_reference(gu, limit)
    out = torch.empty(*gu.shape[:-1], I2 // 2, dtype=gu.dtype, device=gu.device)
    _compile_swiglu(I2 // 2, bool(limit), SWIGLU_USE_PDL)(_rows(gu.contiguous(), I2), _rows(out, I2 // 2),
                                                          float(limit or 0.0))
    return out


# ====================================================================================================================
# Tensor-parallel all-reduce of a decode activation (torchrun, 2-8 GPUs of one node): one launch per call
# ====================================================================================================================
# dsv4.reduce_sum: out = dtype(sum over ranks r, in rank order, of the fp32 sum of rank r's parts), parts = one or two
# tensors of n elements (bf16 / fp32). A decode step does it twice per layer (wo_b's partial rows; the MoE's routed
# partial + the split shared expert's) on [B, D] rows: latency, not bandwidth. torch needed a convert, an add, the
# symmetric-memory one-shot (copy in, barrier, sum, barrier: ~6.4 us inside a graph on 2x H200 with both ranks
# arriving together) and a convert back: ~16 us from the MoE's end to the next mHC site.
#
# TpAllReduce pushes instead of pulling, and every word carries its own flag (NCCL's "LL" protocol), so there is no
# fence, no barrier and no flag round trip: one NVLink one-way latency. Every rank owns a symmetric-memory buffer
# (torch.distributed._symmetric_memory, mapped into every rank's address space) of 8-byte words, slots
# [2][world][TP_CAP]. Thread t of CTA c (its 8 elements) on rank r, at its epoch e (this thread's call count, kept in a
# local int32 [TP_MAX_CTAS * 128]):
#   1. sums its 8 elements of the parts in fp32 (registers) and stores each as one 8-byte word (fp32 bits, e) into
#      slot [e & 1][r] of every peer's buffer (st.relaxed.sys.b64: single-copy atomic, so a reader that sees e in the
#      high half sees this call's value in the low half);
#   2. loads the other ranks' words from its own slot [e & 1][q] (8 loads in flight) until all carry e
#      (ld.relaxed.sys.b64);
#   3. adds the ranks' values in rank order (its own from registers) and writes out.
# Slot reuse: a peer writes slot [e & 1] again at epoch e + 2 only after it has read this rank's epoch-(e + 1) words,
# which this thread stores after its epoch-e call (a rank's calls that all-reduce are data-dependent, so they never
# overlap). Every rank makes the same calls in the same order (as for any collective), so the epochs of a thread index
# agree on every rank. A wait that has spun ~10 s traps (a peer that never came: an error, not a hang).
TP_MAX_CTAS = 32
TP_CHUNK = 1024                    # elements per CTA: 128 threads x 8 (a bf16 16-B vector, two fp32 ones)
TP_CAP = TP_MAX_CTAS * TP_CHUNK    # elements per call (32768: batch 8 at D 4096)
TP_SPIN_LIMIT = 1 << 24            # polls of one word before a wait gives up with a trap


def tp_buffer_bytes(world: int) -> int:
    """Bytes of one rank's symmetric buffer for TpAllReduce: 8-byte words, slots [2][world][TP_CAP]."""
    return 8 * 2 * world * TP_CAP


def tp_all_reduce_reference(parts, dtype: torch.dtype, group=None) -> torch.Tensor:
    """tp_all_reduce's semantics through torch.distributed: the fp32 sum of the parts, summed over the ranks in
    rank order (an all-gather, then rank 0 + rank 1 + ...: the same bits on every rank), as dtype."""
    import torch.distributed as dist
    local = parts[0].float() + parts[1] if len(parts) > 1 else parts[0].float()
    every = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(every, local.contiguous(), group=group)
    acc = every[0]
    for t in every[1:]:
        acc += t
    return acc.to(dtype)


if HAVE_CUTE:
    @dsl_user_op
    def _st_word_sys(addr: Int64, v: Float32, flag: Int32, *, loc=None, ip=None):
        """One 8-byte word (fp32 bits of v, flag) stored single-copy atomically at system scope (a peer's memory)."""
        _llvm.inline_asm(None, [Int64(addr).ir_value(loc=loc, ip=ip), Float32(v).ir_value(loc=loc, ip=ip),
                                _i32(flag, loc, ip)],
                         "{\n.reg .b64 w;\n.reg .b32 lo;\nmov.b32 lo, $1;\nmov.b64 w, {lo, $2};\n"
                         "st.relaxed.sys.global.b64 [$0], w;\n}", "l,f,r", has_side_effects=True, loc=loc, ip=ip)

    @dsl_user_op
    def _ld_word_sys(addr: Int64, *, loc=None, ip=None):
        """One 8-byte word -> (low half as fp32, high half), single-copy atomic, system scope."""
        res = _llvm.inline_asm(
            _ir.Type.parse("!llvm.struct<(f32, i32)>"), [Int64(addr).ir_value(loc=loc, ip=ip)],
            "{\n.reg .b64 w;\n.reg .b32 lo;\nld.relaxed.sys.global.b64 w, [$2];\nmov.b64 {lo, $1}, w;\n"
            "mov.b32 $0, lo;\n}", "=f,=r,l", has_side_effects=True, loc=loc, ip=ip)
        return (Float32(_llvm.extractvalue(_T.f32(), res, [0], loc=loc, ip=ip)),
                Int32(_llvm.extractvalue(_T.i32(), res, [1], loc=loc, ip=ip)))

    @dsl_user_op
    def _trap(*, loc=None, ip=None):
        _llvm.inline_asm(None, [], "trap;", "", has_side_effects=True, loc=loc, ip=ip)

    class TpAllReduce:
        """out[i] = out dtype(sum over ranks q = 0..world-1 of (a_q[i] + b_q[i]) in fp32), on rank `rank`; grid
        (ceil(n / TP_CHUNK)), 128 threads, 8 elements each, no barrier. ptrs [world] int64: every rank's symmetric
        buffer as mapped here; epochs [TP_MAX_CTAS * 128] int32: this rank's call counts per thread (local)."""

        def __init__(self, world: int, rank: int, has_b: bool):
            assert 2 <= world <= 8 and 0 <= rank < world
            self.world, self.rank, self.has_b = world, rank, has_b
            self.threads = TP_CHUNK // 8

        @cute.jit
        def __call__(self, mA: cute.Tensor, mB: cute.Tensor, mOut: cute.Tensor, mPtrs: cute.Tensor,
                     mEpochs: cute.Tensor, stream):
            n = cute.size(mA, mode=[0])
            self.kernel(mA, mB, mOut, mPtrs, mEpochs, n).launch(
                grid=[(n + TP_CHUNK - 1) // TP_CHUNK, 1, 1], block=[self.threads, 1, 1], stream=stream)

        @cute.kernel
        def kernel(self, mA: cute.Tensor, mB: cute.Tensor, mOut: cute.Tensor, mPtrs: cute.Tensor,
                   mEpochs: cute.Tensor, n: Int32):
            tidx, _, _ = cute.arch.thread_idx()
            c, _, _ = cute.arch.block_idx()
            v = c * self.threads + tidx                      # this thread's 8-element vector
            epoch = mEpochs[v] + 1
            mEpochs[v] = epoch                                # every launched thread counts, live or not
            if v * 8 < n:
                acc = cute.make_rmem_tensor((8,), Float32)
                ra = cute.make_rmem_tensor((8,), mA.element_type)
                cute.autovec_copy(cute.local_tile(mA, (8,), (v,)), ra)
                acc.store(ra.load().to(Float32))
                if const_expr(self.has_b):
                    rb = cute.make_rmem_tensor((8,), mB.element_type)
                    cute.autovec_copy(cute.local_tile(mB, (8,), (v,)), rb)
                    acc.store(acc.load() + rb.load().to(Float32))
                # 1. push this rank's 8 words into slot [e & 1][rank] of every peer
                slot = Int64((epoch & 1) * self.world) * TP_CAP + Int64(v) * 8
                for q in cutlass.range_constexpr(self.world):
                    if const_expr(q != self.rank):
                        dst = mPtrs[q] + Int64(8) * (slot + Int64(self.rank) * TP_CAP)
                        for i in cutlass.range_constexpr(8):
                            _st_word_sys(dst + 8 * i, acc[i], epoch)
                # 2. + 3. the ranks' values in rank order, each word waited for until it carries this epoch
                tot = cute.make_rmem_tensor((8,), Float32)
                mine = mPtrs[self.rank]
                for q in cutlass.range_constexpr(self.world):
                    if const_expr(q == self.rank):
                        part = acc.load()
                    else:
                        got = cute.make_rmem_tensor((8,), Float32)
                        src = mine + Int64(8) * (slot + Int64(q) * TP_CAP)
                        miss = Int32(0)                       # all 8 loads in flight at once, then their flags
                        for i in cutlass.range_constexpr(8):
                            got[i], flag = _ld_word_sys(src + 8 * i)
                            miss = miss | (flag ^ epoch)
                        polls = Int32(0)
                        while miss != 0:
                            miss = Int32(0)
                            for i in cutlass.range_constexpr(8):
                                got[i], flag = _ld_word_sys(src + 8 * i)
                                miss = miss | (flag ^ epoch)
                            polls += 1
                            if polls > TP_SPIN_LIMIT:
                                _trap()
                        part = got.load()
                    if const_expr(q == 0):
                        tot.store(part)
                    else:
                        tot.store(tot.load() + part)
                ro = cute.make_rmem_tensor((8,), mOut.element_type)
                ro.store(tot.load().to(mOut.element_type))
                cute.autovec_copy(ro, cute.local_tile(mOut, (8,), (v,)))


def _compile_tp_all_reduce(world: int, rank: int, a_dtype, b_dtype, out_dtype):
    def build():
        n = cute.sym_int(divisibility=8)
        cd = {torch.bfloat16: BFloat16, torch.float32: Float32}

        def flat(dt):
            return cute.runtime.make_fake_compact_tensor(cd[dt], (n,), assumed_align=16)
        ptrs = cute.runtime.make_fake_compact_tensor(Int64, (world,), assumed_align=8)
        epochs = cute.runtime.make_fake_compact_tensor(Int32, (TP_MAX_CTAS * TP_CHUNK // 8,), assumed_align=4)
        return TpAllReduce(world, rank, b_dtype is not None), (flat(a_dtype), flat(b_dtype or a_dtype),
                                                               flat(out_dtype), ptrs, epochs, _stream())
    return _load_or_compile(("tp_allreduce", world, rank, str(a_dtype), str(b_dtype), str(out_dtype)), build)


def tp_all_reduce_unavailable_reason(parts, out: torch.Tensor, world: int) -> str | None:
    """None if TpAllReduce can reduce these parts into out over `world` ranks, else why not."""
    if not HAVE_CUTE:
        return "CuTe DSL is not installed"
    if not 2 <= world <= 8:
        return f"{world} ranks: the kernel pushes to at most 7 peers of one node"
    x = parts[0]
    if not (x.is_cuda and torch.cuda.get_device_capability(x.device) == (9, 0)):
        return "no sm_90 GPU"
    n = x.numel()
    for t in (*parts, out):
        if t.numel() != n or not t.is_contiguous() or t.dtype not in (torch.bfloat16, torch.float32) \
                or t.data_ptr() % 16:
            return "parts and out must be contiguous bf16 / fp32 tensors of one size, 16-B aligned"
    if n % 8 or n > TP_CAP or len(parts) > 2:
        return f"n = {n}: needs a multiple of 8 up to {TP_CAP}, and at most two parts"
    return None


def tp_all_reduce(parts, out: torch.Tensor, ptrs: torch.Tensor, epochs: torch.Tensor, rank: int) -> torch.Tensor:
    """out <- sum over ranks (rank order) of the fp32 sum of this rank's parts (one or two tensors), in one launch
    (TpAllReduce; tp_all_reduce_reference gives its semantics). ptrs: int64 [world] device tensor of every rank's
    symmetric buffer (tp_buffer_bytes(world), zeroed before first use on every rank), epochs: int32 [TP_CAP / 8]
    zeros on first use, kept across calls. Every rank must make the same calls, in the same order. out may be
    parts[0]."""
    world = ptrs.numel()
    a, b = parts[0], (parts[1] if len(parts) > 1 else None)
    fn = _compile_tp_all_reduce(world, rank, a.dtype, None if b is None else b.dtype, out.dtype)
    fn(a.view(-1), (a if b is None else b).view(-1), out.view(-1), ptrs, epochs)
    return out


# ====================================================================================================================
# Compressor decode step (issue #5)
# ====================================================================================================================
# Fused compressor decode step (issue #5): everything in dsv4.Compressor.decode after the two fp32 linears, in one
# CuTe DSL kernel per call. Owner: comp helper (to be merged into kernels.py by the lead).
#
# Per sequence b (grid y) and channel chunk (grid x = cluster of `splits` CTAs when the block is long):
#   1. state row  off + pos % r  <- (a, g + ape[pos % r])                    (every step)
#   2. if (pos + 1) % r == 0 (the token completes its block), per channel:
#      softmax over the block's rows of the score (overlap: A-halves [:d] of rows 0..r-1, B-halves [d:] of rows r..2r-1)
#      as max, exp(s - max), sum, divide; pooled = sum(kv * p) in fp32; with overlap rows r..2r-1 move to 0..r-1;
#   3. CTA 0 of the cluster gathers the pooled vector (DSMEM) and builds the cache entry like Compressor._entry:
#      bf16 round -> RMSNorm (fp32, rounding points of the torch code) -> bf16 -> RoPE on the last rope_dim dims at
#      angles[max(pos + 1 - r, 0)] -> quant sim (attention keys: FP8 e4m3 sim of the no-rope dims in 64-blocks;
#      indexer keys: Hadamard as an fp32 dot product with the given matrix, bf16, FP4 e2m1 sim in 32-blocks)
#      -> kv_cache[b, pos // r].
# Every fp32 op that torch runs as its own kernel is an explicitly rounded PTX op here (no FMA contraction), so the
# states are bit-exact and the cache differs only where fp32 summation order differs (softmax sum, pooled sum, RMSNorm
# sum of squares, Hadamard dot product) and that moves a bf16 rounding.

HAVE_CUTE = HAVE_CUTE
# Summation orders of the two per-channel sums over the block's rows (max is order-free):
#   "simple": each thread sums its contiguous rows, row groups combined in order (softmax sum and pooled sum);
#   "vt4":    torch's CUDA order if the sum(1) reduce gives one thread all rows with 4 interleaved accumulators
#             (acc_i = rows i, i+4, ...; ((a0+a1)+a2)+a3); softmax denominator sequential over the rows (torch's
#             spatial softmax for inner size > 64);
#   "y4vt4":  as vt4 but the reduce splits the rows over 4 threads (rows y+4j), each with 4 accumulators
#             (j = i mod 4), combined (v0+v2)+(v1+v3); same as vt4 for 8-row blocks.
# Measured on an H200 (torch 2.11+cu130, 2026-11-26 R2): "y4vt4" gives pooled values bit-equal to the torch decode for
# all three compressor kinds (0/2048, 0/512, 0/2048 differ), "vt4" only for the 8-row blocks, "simple" for none.
SUM_ORDERS = ("simple", "vt4", "y4vt4")
ORDER = "y4vt4"
# A block-completing step's loads that no kernel of the step writes (earlier rows, ape, norm weight, RoPE angle,
# Hadamard column) are issued before the PDL wait (CompressorDecode.preload_values). Same values, same arithmetic.
COMPRESSOR_PRELOAD = True
FP8_MAX, FP4_MAX = 448.0, 6.0
E2M1_BOUNDS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)   # same tables as dsv4.round_e2m1
E2M1_GRID = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
# torch on CUDA divides by a Python scalar as a multiply by its fp32 reciprocal (div_true_kernel_cuda)
INV_FP8_MAX = _f32_div(1.0, FP8_MAX)
INV_FP4_MAX = _f32_div(1.0, FP4_MAX)
FP8_AMAX_MIN = _f32_round(1e-4)
FP4_AMAX_MIN = _f32_round(FP4_MAX * 2.0 ** -126)


if HAVE_CUTE:
    import cutlass
    import cutlass.cute as cute
    from cutlass import Int32, Float32, BFloat16, Int64, const_expr
    from cutlass.cutlass_dsl import T as _T, dsl_user_op
    from cutlass._mlir.dialects import llvm as _llvm

    def _asm_f32(asm: str, *vals, loc=None, ip=None):
        args = [Float32(v).ir_value(loc=loc, ip=ip) for v in vals]
        cons = "=f," + ",".join("f" for _ in vals)
        return Float32(_llvm.inline_asm(_T.f32(), args, asm, cons, has_side_effects=False, loc=loc, ip=ip))

    # Explicitly rounded fp32 ops: a plain mul/add may be contracted into an FMA by ptxas, torch's separate
    # elementwise kernels never are.
    @dsl_user_op
    def mul_rn(a, b, *, loc=None, ip=None):
        return _asm_f32("mul.rn.f32 $0, $1, $2;", a, b, loc=loc, ip=ip)

    @dsl_user_op
    def add_rn(a, b, *, loc=None, ip=None):
        return _asm_f32("add.rn.f32 $0, $1, $2;", a, b, loc=loc, ip=ip)

    @dsl_user_op
    def sub_rn(a, b, *, loc=None, ip=None):
        return _asm_f32("sub.rn.f32 $0, $1, $2;", a, b, loc=loc, ip=ip)

    @dsl_user_op
    def div_rn(a, b, *, loc=None, ip=None):
        return _asm_f32("div.rn.f32 $0, $1, $2;", a, b, loc=loc, ip=ip)

    @dsl_user_op
    def fma_rn(a, b, c, *, loc=None, ip=None):
        return _asm_f32("fma.rn.f32 $0, $1, $2, $3;", a, b, c, loc=loc, ip=ip)

    @dsl_user_op
    def bf16_round(a, *, loc=None, ip=None):
        """fp32 -> nearest-even bf16 -> fp32 (torch's .to(bfloat16))."""
        return _asm_f32("{\n.reg .b16 h;\ncvt.rn.bf16.f32 h, $1;\nmov.b32 $0, {0, h};\n}", a, loc=loc, ip=ip)

    @dsl_user_op
    def e4m3_round(a, *, loc=None, ip=None):
        """fp32 (|a| <= 448) -> nearest-even e4m3 (subnormals included) -> fp32 (torch's .to(float8_e4m3fn))."""
        return _asm_f32("{\n.reg .b16 h;\n.reg .b32 w;\n.reg .f16 lo, hi;\n"
                        "cvt.rn.satfinite.e4m3x2.f32 h, $1, $1;\ncvt.rn.f16x2.e4m3x2 w, h;\n"
                        "mov.b32 {lo, hi}, w;\ncvt.f32.f16 $0, lo;\n}", a, loc=loc, ip=ip)

    @dsl_user_op
    def ld_dsmem_f32(smem_addr, rank, *, loc=None, ip=None):
        """fp32 at this CTA's shared address smem_addr, read from CTA `rank` of the cluster (DSMEM)."""
        args = [Int32(smem_addr).ir_value(loc=loc, ip=ip), Int32(rank).ir_value(loc=loc, ip=ip)]
        asm = "{\n.reg .b32 ra;\nmapa.shared::cluster.u32 ra, $1, $2;\nld.shared::cluster.f32 $0, [ra];\n}"
        return Float32(_llvm.inline_asm(_T.f32(), args, asm, "=f,r,r", has_side_effects=True, loc=loc, ip=ip))

    class CompressorDecode:
        """One decode step of a compressor (see the module docstring). Static: ratio, dim, overlap, rotate,
        quant_sim, rope_dim, eps, splits (CTAs per sequence = cluster size), row_groups (threads per channel),
        order (fp32 summation order of the softmax denominator and the pooled sum, see SUM_ORDERS), preload
        (COMPRESSOR_PRELOAD: what a block-completing step reads from earlier steps and constants, before the wait),
        block (the deferred projections, dsv4.DEFER_COMPRESSOR_PROJECTIONS: launched only at a block's last token,
        with the r projected rows of the block as a and g; the state keeps only the previous block's rows)."""

        def __init__(self, ratio: int, dim: int, overlap: bool, rotate: bool, quant_sim: bool, rope_dim: int,
                     eps: float, splits: int, row_groups: int, debug: bool = False, order: str = ORDER,
                     preload: bool = False, block: bool = False):
            self.r, self.d, self.overlap, self.rotate, self.quant_sim = ratio, dim, overlap, rotate, quant_sim
            self.preload = preload
            self.block = block          # a, g hold the whole block's r rows (row b * r + k), not this token's row
            assert order in SUM_ORDERS
            self.order = order
            # pooled sum: accumulators inside a thread (rows k mod nacc), then row groups in order or as a tree
            self.nacc = 1 if order == "simple" or (order == "vt4" and row_groups > 1) else 4
            self.tree_combine = order == "y4vt4" and row_groups == 4
            self.rd, self.eps, self.splits, self.ny, self.debug = rope_dim, eps, splits, row_groups, debug
            self.c = 2 if overlap else 1
            self.rows = 2 * ratio if overlap else ratio            # rows of one pooled block
            self.dc = dim // splits                                # channels per CTA
            self.rt = self.rows // row_groups                      # rows per thread
            self.threads = self.dc * row_groups
            self.per = -(-dim // self.threads)                     # entry elements per thread (CTA 0)
            assert dim % splits == 0 and self.rows % row_groups == 0 and self.threads % 32 == 0
            assert not overlap or row_groups == 1, "overlap rows pick their half statically"
            assert self.threads <= 1024 and splits <= 8
            assert (dim - rope_dim) % 64 == 0 and dim % 32 == 0 and rope_dim % 2 == 0
            assert not preload or rope_dim // 2 <= self.threads, "preload: one RoPE pair per thread"

        @cute.jit
        def __call__(self, mA: cute.Tensor, mG: cute.Tensor, mApe: cute.Tensor, mKv: cute.Tensor, mSc: cute.Tensor,
                     mCache: cute.Tensor, mPos: cute.Tensor, mAngles: cute.Tensor, mNormW: cute.Tensor,
                     mHad: cute.Tensor, mDbg: cute.Tensor, stream):
            @cute.struct
            class SharedStorage:
                red: cute.struct.MemRange[Float32, self.ny * self.dc]     # cross-row-group partials
                full: cute.struct.MemRange[Float32, self.d]               # pooled vector, then entry values
                ent: cute.struct.MemRange[Float32, self.d]                # Hadamard output
                warp: cute.struct.MemRange[Float32, 32]                   # per-warp partial sums
                exps: cute.struct.MemRange[Float32, self.rows * self.dc if self.ny > 1 and self.order != "simple"
                                           else 1]                        # exp(s - max) [row, channel]

            self.shared_storage = SharedStorage
            B = cute.size(mA, mode=[0])
            if const_expr(self.block):                             # r rows per sequence
                B = B // self.r
            cluster = [self.splits, 1, 1] if const_expr(self.splits > 1) else None
            self.kernel(mA, mG, mApe, mKv, mSc, mCache, mPos, mAngles, mNormW, mHad, mDbg).launch(
                grid=[self.splits, B, 1], block=[self.threads, 1, 1], cluster=cluster, stream=stream, use_pdl=GLUE_PDL)

        @cute.kernel
        def kernel(self, mA: cute.Tensor, mG: cute.Tensor, mApe: cute.Tensor, mKv: cute.Tensor, mSc: cute.Tensor,
                   mCache: cute.Tensor, mPos: cute.Tensor, mAngles: cute.Tensor, mNormW: cute.Tensor,
                   mHad: cute.Tensor, mDbg: cute.Tensor):
            tidx, _, _ = cute.arch.thread_idx()
            split, b, _ = cute.arch.block_idx()
            r, d, dc, T = self.r, self.d, self.dc, self.threads
            pre = None
            if const_expr(self.preload):
                pre = self.preload_values(mApe, mKv, mSc, mPos, mAngles, mNormW, mHad, b, split, tidx)
            _pdl_enter()
            smem = cutlass.utils.SmemAllocator()
            storage = smem.allocate(self.shared_storage)
            red = storage.red.get_tensor(cute.make_layout(self.ny * dc))
            full = storage.full.get_tensor(cute.make_layout(d))
            ent = storage.ent.get_tensor(cute.make_layout(d))
            wsum = storage.warp.get_tensor(cute.make_layout(32))
            eall = storage.exps.get_tensor(cute.make_layout(self.rows * dc if self.ny > 1 and self.order != "simple"
                                                            else 1))

            pos = pre["pos"] if const_expr(self.preload) else Int32(mPos[0])
            slot = pos % r
            row = slot + (r if const_expr(self.overlap) else 0)
            c0 = split * dc                                        # first channel of this CTA
            if const_expr(not self.block):
                # 1. the token's row: channels c0.. (and their B-halves d + c0.. with overlap)
                for k in cutlass.range(tidx, self.c * dc, T, unroll=1):
                    col = c0 + k
                    if const_expr(self.overlap):
                        if k >= dc:
                            col = col + (d - dc)
                    mKv[b, row, col] = mA[b, col]
                    mSc[b, row, col] = add_rn(mG[b, col], mApe[slot, col])
                cute.arch.sync_threads()                           # the row is read back below

            if (pos + 1) % r == 0:                                 # uniform over the grid
                cx = tidx % dc
                ry = tidx // dc
                ch = c0 + cx
                # 2. pool channel ch over this thread's rows: ry*rt + k ("simple") or ry + ny*k (torch orders)
                sv = []
                kv = []
                for k in cutlass.range_constexpr(self.rt):
                    if const_expr(self.block and self.overlap):
                        if const_expr(k < r):                      # the previous block's A-halves: the state
                            if const_expr(self.preload):
                                sv.append(pre["sv"][k])
                                kv.append(pre["kv"][k])
                            else:
                                sv.append(mSc[b, k, ch])
                                kv.append(mKv[b, k, ch])
                        else:                                      # this block's B-halves: the projected rows
                            ape = pre["ape_b"][k - r] if const_expr(self.preload) else mApe[k - r, ch + d]
                            sv.append(add_rn(mG[b * r + (k - r), ch + d], ape))
                            kv.append(mA[b * r + (k - r), ch + d])
                    elif const_expr(self.block):
                        if const_expr(self.order == "simple"):
                            rr = ry * self.rt + k
                        else:
                            rr = ry + self.ny * k
                        ape = pre["ape"][k] if const_expr(self.preload) else mApe[rr, ch]
                        sv.append(add_rn(mG[b * r + rr, ch], ape))
                        kv.append(mA[b * r + rr, ch])
                    elif const_expr(self.overlap and self.preload):
                        if const_expr(k < self.rt - 1):            # rows of earlier steps: loaded before the wait
                            sv.append(pre["sv"][k])
                            kv.append(pre["kv"][k])
                        else:                                      # this token's row, as step 1 wrote it
                            col = ch + d
                            sv.append(add_rn(mG[b, col], pre["ape_b"]))
                            kv.append(mA[b, col])
                    elif const_expr(self.overlap):
                        col = ch + (d if k >= r else 0)
                        sv.append(mSc[b, k, col])
                        kv.append(mKv[b, k, col])
                    else:
                        if const_expr(self.order == "simple"):
                            rr = ry * self.rt + k
                        else:
                            rr = ry + self.ny * k
                        sv.append(mSc[b, rr, ch])
                        kv.append(mKv[b, rr, ch])
                m = sv[0]
                for k in cutlass.range_constexpr(1, self.rt):
                    m = cute.arch.fmax(m, sv[k])
                if const_expr(self.ny > 1):
                    red[tidx] = m
                    cute.arch.sync_threads()
                    m = red[cx]
                    for y in cutlass.range_constexpr(1, self.ny):
                        m = cute.arch.fmax(m, red[y * dc + cx])
                    cute.arch.sync_threads()
                ex = [cute.math.exp(sub_rn(sv[k], m)) for k in range(self.rt)]
                if const_expr(self.ny > 1 and self.order != "simple"):   # denominator: one chain over all rows
                    for k in cutlass.range_constexpr(self.rt):
                        eall[(ry + self.ny * k) * dc + cx] = ex[k]
                    cute.arch.sync_threads()
                    if ry == 0:
                        s = eall[cx]
                        for rr in cutlass.range(1, self.rows, unroll=16):
                            s = add_rn(s, eall[rr * dc + cx])
                        red[cx] = s
                    cute.arch.sync_threads()
                    s = red[cx]
                    cute.arch.sync_threads()
                else:
                    s = ex[0]
                    for k in cutlass.range_constexpr(1, self.rt):
                        s = add_rn(s, ex[k])
                    if const_expr(self.ny > 1):
                        red[tidx] = s
                        cute.arch.sync_threads()
                        s = red[cx]
                        for y in cutlass.range_constexpr(1, self.ny):
                            s = add_rn(s, red[y * dc + cx])
                        cute.arch.sync_threads()
                prod = [mul_rn(kv[k], div_rn(ex[k], s)) for k in range(self.rt)]
                nacc = self.nacc
                accs = [prod[i] for i in range(nacc)]
                for k in cutlass.range_constexpr(nacc, self.rt):
                    accs[k % nacc] = add_rn(accs[k % nacc], prod[k])
                acc = accs[0]
                for i in cutlass.range_constexpr(1, nacc):
                    acc = add_rn(acc, accs[i])
                if const_expr(self.ny > 1):
                    red[tidx] = acc
                    cute.arch.sync_threads()
                    if ry == 0:
                        if const_expr(self.tree_combine):
                            acc = add_rn(add_rn(red[cx], red[2 * dc + cx]), add_rn(red[dc + cx], red[3 * dc + cx]))
                        else:
                            acc = red[cx]
                            for y in cutlass.range_constexpr(1, self.ny):
                                acc = add_rn(acc, red[y * dc + cx])
                if ry == 0:
                    full[ch] = acc
                    if const_expr(self.debug):
                        mDbg[b, ch] = acc
                if const_expr(self.block and self.overlap):        # this block -> previous block
                    for k in cutlass.range_constexpr(r):
                        ape = pre["ape_a"][k] if const_expr(self.preload) else mApe[k, ch]
                        mKv[b, k, ch] = mA[b * r + k, ch]
                        mSc[b, k, ch] = add_rn(mG[b * r + k, ch], ape)
                        mKv[b, k, d + ch] = kv[r + k]
                        mSc[b, k, d + ch] = sv[r + k]
                elif const_expr(self.overlap and self.preload):    # completed block -> previous block
                    for k in cutlass.range_constexpr(r):
                        if const_expr(k < r - 1):
                            kv_a, sc_a = pre["kv_a"][k], pre["sc_a"][k]
                        else:                                      # this token's row (A-half), as step 1 wrote it
                            kv_a, sc_a = mA[b, ch], add_rn(mG[b, ch], pre["ape_a"])
                        mKv[b, k, ch] = kv_a
                        mSc[b, k, ch] = sc_a
                        mKv[b, k, d + ch] = kv[r + k]
                        mSc[b, k, d + ch] = sv[r + k]
                elif const_expr(self.overlap):                     # completed block -> previous block
                    for k in cutlass.range_constexpr(r):           # only this thread reads rows 0..r-1 of ch
                        mKv[b, k, ch] = mKv[b, r + k, ch]
                        mSc[b, k, ch] = mSc[b, r + k, ch]
                        mKv[b, k, d + ch] = mKv[b, r + k, d + ch]
                        mSc[b, k, d + ch] = mSc[b, r + k, d + ch]
                if const_expr(self.splits > 1):                    # CTA 0 gathers the chunks of the others
                    cute.arch.cluster_arrive()
                    cute.arch.cluster_wait()
                    if split == 0:
                        for o in cutlass.range_constexpr(1, self.splits):
                            for i in cutlass.range(tidx, dc, T, unroll=1):
                                full[o * dc + i] = ld_dsmem_f32((full.iterator + (o * dc + i)).toint(), o)
                    cute.arch.cluster_arrive()                     # peers keep their smem until it is read
                    cute.arch.cluster_wait()
                else:
                    cute.arch.sync_threads()
                if split == 0:
                    self.entry(full, ent, wsum, mCache, mAngles, mNormW, mHad, b, pos, tidx, pre)

        def preload_values(self, mApe, mKv, mSc, mPos, mAngles, mNormW, mHad, b, split, tidx) -> dict:
            """What a completing step reads that no kernel of this step writes (COMPRESSOR_PRELOAD), loaded before
            the PDL wait: the state rows of earlier steps (overlap), ape, the norm weight, the RoPE angle and (indexer
            keys) the thread's Hadamard column. pos is the step's input, written before the step starts. Loaded at
            every step (a few KB; 64 KB of Hadamard): after the wait a completing step is then one round of loads
            (a, g) and arithmetic instead of ~20 dependent global round trips, which a saturated HBM makes ~1 us each."""
            r, d, dc, T = self.r, self.d, self.dc, self.threads
            pos = Int32(mPos[0])
            slot = pos % r
            pre = {"pos": pos}
            if const_expr(self.block and self.overlap):            # the previous block's rows; ape of every row
                ch = split * dc + tidx % dc
                pre["sv"] = [mSc[b, k, ch] for k in range(r)]
                pre["kv"] = [mKv[b, k, ch] for k in range(r)]
                pre["ape_a"] = [mApe[k, ch] for k in range(r)]
                pre["ape_b"] = [mApe[k, d + ch] for k in range(r)]
            elif const_expr(self.block):                           # ape of this thread's rows
                ch = split * dc + tidx % dc
                ry = tidx // dc
                pre["ape"] = []
                for k in range(self.rt):
                    if const_expr(self.order == "simple"):
                        pre["ape"].append(mApe[ry * self.rt + k, ch])
                    else:
                        pre["ape"].append(mApe[ry + self.ny * k, ch])
            elif const_expr(self.overlap):                         # one thread per channel: ch = tidx
                ch = split * dc + tidx % dc
                pre["sv"] = [mSc[b, k, ch + (d if k >= r else 0)] for k in range(self.rt - 1)]
                pre["kv"] = [mKv[b, k, ch + (d if k >= r else 0)] for k in range(self.rt - 1)]
                pre["kv_a"] = [mKv[b, r + k, ch] for k in range(r - 1)]
                pre["sc_a"] = [mSc[b, r + k, ch] for k in range(r - 1)]
                pre["ape_a"] = mApe[slot, ch]
                pre["ape_b"] = mApe[slot, d + ch]
            pre["norm_w"] = [mNormW[cutlass.min(tidx + q * T, d - 1)] for q in range(self.per)]
            rd2 = self.rd // 2
            ang = mAngles[cutlass.max(pos + 1 - r, 0), cutlass.min(tidx, rd2 - 1)]
            pre["cos"], pre["sin"] = cute.math.cos(ang), cute.math.sin(ang)
            if const_expr(self.rotate and self.quant_sim):
                pre["had"] = [[mHad[jj, cutlass.min(tidx + q * T, d - 1)] for jj in range(d)]
                              for q in range(self.per)]
            return pre

        @cute.jit
        def entry(self, full, ent, wsum, mCache, mAngles, mNormW, mHad, b, pos, tidx, pre=None):
            """pooled [d] fp32 in smem -> kv_cache[b, pos // r] (as Compressor._entry); pre: preload_values."""
            d, T, rd = self.d, self.threads, self.rd
            # RMSNorm: x = bf16(pooled); ms = sum(x^2) * (1/d); y = bf16(w * (x * rsqrt(ms + eps)))
            part = Float32(0.0)
            for q in cutlass.range_constexpr(self.per):
                i = tidx + q * T
                if i < d:
                    x = bf16_round(full[i])
                    full[i] = x
                    part = add_rn(part, mul_rn(x, x))
            for sh in cutlass.range_constexpr(5):
                part = add_rn(part, cute.arch.shuffle_sync_bfly(part, 16 >> sh))
            if tidx % 32 == 0:
                wsum[tidx // 32] = part
            cute.arch.sync_threads()
            ss = wsum[0]
            for w in cutlass.range_constexpr(1, T // 32):
                ss = add_rn(ss, wsum[w])
            rs = cute.math.rsqrt(add_rn(mul_rn(ss, 1.0 / d), self.eps))
            for q in cutlass.range_constexpr(self.per):
                i = tidx + q * T
                if i < d:
                    w = pre["norm_w"][q] if const_expr(self.preload) else mNormW[i]
                    full[i] = bf16_round(mul_rn(w, mul_rn(full[i], rs)))
            cute.arch.sync_threads()
            # RoPE on the last rd dims, interleaved pairs, at the block's first position
            apos = cutlass.max(pos + 1 - self.r, 0)
            for k in cutlass.range(tidx, rd // 2, T, unroll=1):
                i0 = d - rd + 2 * k
                if const_expr(self.preload):                       # rd / 2 <= T: k is tidx
                    cs, sn = pre["cos"], pre["sin"]
                else:
                    ang = mAngles[apos, k]
                    cs = cute.math.cos(ang)
                    sn = cute.math.sin(ang)
                x0 = full[i0]
                x1 = full[i0 + 1]
                full[i0] = bf16_round(sub_rn(mul_rn(x0, cs), mul_rn(x1, sn)))
                full[i0 + 1] = bf16_round(add_rn(mul_rn(x0, sn), mul_rn(x1, cs)))
            cute.arch.sync_threads()
            j = pos // self.r
            if const_expr(self.rotate and self.quant_sim):
                # Hadamard: h[i] = sum_j x[j] * H[j, i] (fp32, sequential j), bf16; then FP4 sim in 32-blocks
                for q in cutlass.range_constexpr(self.per):
                    i = tidx + q * T
                    if i < d:
                        h = Float32(0.0)
                        if const_expr(self.preload):
                            for jj in cutlass.range_constexpr(d):
                                h = fma_rn(full[jj], pre["had"][q][jj], h)
                        else:
                            for jj in cutlass.range(d, unroll=8):
                                h = fma_rn(full[jj], mHad[jj, i], h)
                        ent[i] = bf16_round(h)
                cute.arch.sync_threads()
                for q in cutlass.range_constexpr(self.per):
                    i = tidx + q * T
                    if i < d:
                        blk = i - i % 32
                        amax = Float32(FP4_AMAX_MIN)
                        for t in cutlass.range(32, unroll=8):
                            amax = cute.arch.fmax(amax, cute.math.absf(ent[blk + t]))
                        sc = cute.math.exp2(cute.math.ceil(cute.math.log2(mul_rn(amax, INV_FP4_MAX))))
                        y = div_rn(ent[i], sc)
                        y = cute.arch.fmin(cute.arch.fmax(y, -FP4_MAX), FP4_MAX)
                        a = cute.math.absf(y)
                        qv = Float32(0.0)
                        for k in cutlass.range_constexpr(len(E2M1_BOUNDS)):     # boundaries crossed, ties to even
                            bd = E2M1_BOUNDS[k]
                            if const_expr(k % 2 == 1):
                                if a >= bd:
                                    qv = Float32(E2M1_GRID[k + 1])
                            else:
                                if a > bd:
                                    qv = Float32(E2M1_GRID[k + 1])
                        qv = cute.math.copysign(qv, y)
                        mCache[b, j, i] = mul_rn(qv, sc).to(BFloat16)
            else:
                for q in cutlass.range_constexpr(self.per):
                    i = tidx + q * T
                    if i < d:
                        x = full[i]
                        if const_expr(self.quant_sim and not self.rotate):
                            if i < d - rd:                      # FP8 e4m3 sim of the no-rope dims, 64-blocks
                                blk = i - i % 64
                                amax = Float32(0.0)
                                for t in cutlass.range(64, unroll=8):
                                    amax = cute.arch.fmax(amax, cute.math.absf(full[blk + t]))
                                amax = cute.arch.fmax(amax, FP8_AMAX_MIN)
                                sc = cute.math.exp2(cute.math.ceil(cute.math.log2(mul_rn(amax, INV_FP8_MAX))))
                                y = div_rn(x, sc)
                                y = cute.arch.fmin(cute.arch.fmax(y, -FP8_MAX), FP8_MAX)
                                x = mul_rn(e4m3_round(y), sc)
                        mCache[b, j, i] = x.to(BFloat16)


def pick_layout(ratio: int, dim: int, overlap: bool) -> tuple[int, int]:
    """(splits, row_groups): short overlapping blocks (8 rows) -> one CTA per sequence, one thread per channel;
    ratio-128 blocks -> a cluster of CTAs over 64-channel chunks, 4 threads per channel (32 rows each)."""
    if overlap or ratio < 16:
        return 1, 1
    splits = max(1, min(8, dim // 64))
    return splits, 4


def _compile_compressor(ratio, dim, overlap, rotate, quant_sim, rope_dim, eps, debug=False, order=None,
                        block=False):
    splits, groups = pick_layout(ratio, dim, overlap)
    order = order or ORDER
    preload = COMPRESSOR_PRELOAD
    config = ("compressor", GLUE_PDL, ratio, dim, overlap, rotate, quant_sim, rope_dim, float(eps), splits, groups,
              debug, order) + (("preload",) if preload else ()) + (("block",) if block else ())

    def build():
        op = CompressorDecode(ratio, dim, overlap, rotate, quant_sim, rope_dim, float(eps), splits, groups, debug,
                              order, preload, block)
        c = 2 if overlap else 1
        bsz, bmax, tmax, npos, hd = (cute.sym_int() for _ in range(5))
        f32 = lambda shape, order: cute.runtime.make_fake_compact_tensor(   # noqa: E731
            Float32, shape, stride_order=order, assumed_align=4)
        rows = lambda: cute.runtime.make_fake_tensor(Float32, (bsz, c * dim), stride=(cute.sym_int(), 1),  # noqa: E731
                                                     assumed_align=4)       # a, g may be column slices of one GEMM
        args = (rows(), rows(), f32((ratio, c * dim), (1, 0)),
                f32((bmax, c * ratio, c * dim), (2, 1, 0)), f32((bmax, c * ratio, c * dim), (2, 1, 0)),
                cute.runtime.make_fake_compact_tensor(BFloat16, (bmax, tmax, dim), stride_order=(2, 1, 0),
                                                      assumed_align=2),
                cute.runtime.make_fake_compact_tensor(Int64, (1,), assumed_align=8),
                f32((npos, rope_dim // 2), (1, 0)), f32((dim,), (0,)), f32((hd, hd), (1, 0)),
                f32((cute.sym_int(), cute.sym_int()), (1, 0)),
                cute.runtime.make_fake_stream(use_tvm_ffi_env_stream=True))
        return op, args
    return _load_or_compile(config, build)


def compressor_kernel_unavailable_reason(comp, a: torch.Tensor) -> str | None:
    """None if compressor_decode_fused can run this compressor's decode step, else a short reason."""
    if not HAVE_CUTE:
        return "CuTe DSL is not installed"
    if not (a.is_cuda and torch.cuda.get_device_capability(a.device) == (9, 0)):
        return "no sm_90 GPU"
    if comp.kv_cache is None or comp.kv_cache.dtype != torch.bfloat16:
        return "kv_cache is not bf16"
    d, rd = comp.dim, comp.rope_dim
    if (d - rd) % 64 or d % 64 or rd % 2 or d > 1024:
        return f"dim {d} / rope_dim {rd} not supported"
    return None


def compressor_decode_fused(comp, a: torch.Tensor, g: torch.Tensor, pos: torch.Tensor, angles: torch.Tensor,
                            hadamard: torch.Tensor | None, debug_pooled: torch.Tensor | None = None,
                            order: str | None = None, block: bool = False) -> None:
    """The part of Compressor.decode after the linears, in one kernel: a = wkv(x) [B,1,c*d] fp32, g = wgate(x)
    [B,1,c*d] fp32 WITHOUT ape (added in the kernel; a and g may be column slices of one [B,1,2*c*d] GEMM output),
    pos int64 [1] on the device. Updates comp.kv_state,
    comp.score_state and (when the block completes) comp.kv_cache in place; no host sync, graph-capturable.
    block: the deferred form (Compressor.decode with defer): a, g [B,r,c*d] are the projections of the block's r
    inputs, pos is the block's last position, and the state holds only the previous block's rows (overlap).
    comp: anything with ratio, dim, overlap, rotate, quant_sim, rope_dim, norm.weight, norm.eps, ape, kv_state,
    score_state, kv_cache (a dsv4.Compressor). debug_pooled [B,d] fp32: also receives the pooled vector (tests)."""
    B = a.shape[0]
    rows = B * comp.ratio if block else B
    a2, g2 = a.reshape(rows, -1), g.reshape(rows, -1)           # views (rows may be strided, columns contiguous)
    rotate_q = comp.rotate and comp.quant_sim
    fn = _compile_compressor(comp.ratio, comp.dim, comp.overlap, rotate_q, comp.quant_sim, comp.rope_dim,
                             comp.norm.eps, debug_pooled is not None, order, block)
    had = hadamard if rotate_q else comp.norm.weight.data[:1].view(1, 1)
    dbg = debug_pooled if debug_pooled is not None else comp.norm.weight.data.view(1, -1)   # unused, compact
    fn(a2, g2, comp.ape.data, comp.kv_state, comp.score_state, comp.kv_cache, pos, angles, comp.norm.weight.data,
       had, dbg)


def compressor_linears(comp, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """a = wkv(x), g = wgate(x) (no ape), fp32 [B,1,c*d], called exactly as Compressor.decode calls them (bf16 weights
    with fp32 output take x as it is; older fp32 weights took x.float())."""
    xin = x if getattr(comp.wkv, "fp32_out", False) else x.float()
    return comp.wkv(xin), comp.wgate(xin)


def compressor_decode(comp, x: torch.Tensor, pos: torch.Tensor, angles: torch.Tensor,
                      hadamard: torch.Tensor | None) -> None:
    """What Compressor.decode becomes (proposed replacement): the two fp32 linears, then the fused kernel where it
    runs (CUDA sm_90 + CuTe DSL + bf16 cache), else the torch code (compressor_decode_reference = today's decode)."""
    a, g = compressor_linears(comp, x)                                # [B,1,c*d] fp32
    if x.is_cuda and compressor_kernel_unavailable_reason(comp, a) is None:
        compressor_decode_fused(comp, a, g, pos, angles, hadamard)
    else:
        compressor_decode_reference(comp, a, g, pos, angles, hadamard)


def compressor_decode_reference(comp, a: torch.Tensor, g: torch.Tensor, pos: torch.Tensor, angles: torch.Tensor,
                                hadamard: torch.Tensor | None) -> None:
    """Torch reference of compressor_decode_fused: dsv4.Compressor.decode after its linears (same in-place updates)."""
    B = a.shape[0]
    r, d = comp.ratio, comp.dim
    off = r if comp.overlap else 0
    a, g = a.reshape(B, 1, -1), g.reshape(B, 1, -1) + comp.ape[pos % r]
    kv_state, score_state = comp.kv_state[:B], comp.score_state[:B]
    kv_state.index_copy_(1, off + pos % r, a)
    score_state.index_copy_(1, off + pos % r, g)
    if comp.overlap:
        kv = torch.cat([kv_state[:, :r, :d], kv_state[:, r:, d:]], 1)
        sc = torch.cat([score_state[:, :r, :d], score_state[:, r:, d:]], 1)
    else:
        kv, sc = kv_state, score_state
    pooled = (kv * sc.softmax(1)).sum(1, keepdim=True)
    C = comp._entry(pooled, angles[(pos + 1 - r).clamp(min=0)], hadamard)     # dsv4.Compressor._entry
    done, j = (pos + 1) % r == 0, pos // r
    cache = comp.kv_cache[:B]
    cache.index_copy_(1, j, torch.where(done, C, cache.index_select(1, j)))
    if comp.overlap:
        kv_state[:, :r] = torch.where(done, kv_state[:, r:], kv_state[:, :r])
        score_state[:, :r] = torch.where(done, score_state[:, r:], score_state[:, :r])
    return pooled


def compressor_block_reference(comp, a: torch.Tensor, g: torch.Tensor, pos: torch.Tensor, angles: torch.Tensor,
                               hadamard: torch.Tensor | None) -> torch.Tensor:
    """Torch reference of compressor_decode_fused(block=True): dsv4.Compressor.decode with deferred projections at a
    block's last position pos, after its linears (a, g [B,r,c*d] of the block's r inputs, g without ape). Writes the
    entry kv_cache[:, pos // r] and (overlap) this block's rows as the previous block; -> the pooled vector [B,1,d]."""
    B, r, d = a.shape[0], comp.ratio, comp.dim
    g = g + comp.ape
    if comp.overlap:
        kv = torch.cat([comp.kv_state[:B, :r, :d], a[..., d:]], 1)
        sc = torch.cat([comp.score_state[:B, :r, :d], g[..., d:]], 1)
    else:
        kv, sc = a, g
    pooled = (kv * sc.softmax(1)).sum(1, keepdim=True)
    comp.kv_cache[:B].index_copy_(1, pos // r, comp._entry(pooled, angles[pos + 1 - r], hadamard))
    if comp.overlap:
        comp.kv_state[:B, :r], comp.score_state[:B, :r] = a, g
    return pooled


# ---------------------------------------------------------------------------------------------------------- bench


# ====================================================================================================================
# Sparse attention, indexer top-k and router for decode (issue #5)
# ====================================================================================================================
# nano-dsv4 decode kernels for attention, the indexer and the MoE gate (WIP of the `sattn` helper; to be merged
# into kernels.py).
#
# Batch-1..8 decode (one query per sequence at position pos, an int64 device tensor [1]), no host sync, CUDA-graph
# capturable, deterministic (fixed reduction orders):
# - sparse_attention_decode: dsv4.sparse_attention for Q = 1 in ONE CuTe DSL kernel, flash-decoding style: the keys
#   [window ring | compressed keys] are split over a cluster of <= 8 CTAs per (sequence, 16-head group), each CTA runs
#   its chunks of 64 keys with an online softmax (tensor-core QK^T and PV, mma.sync), and the partials are combined
#   through distributed shared memory (SparseAttentionDecodeCluster). SparseAttentionDecode is the earlier variant
#   that combines through global memory (last CTA to arrive).
# - indexer_topk_decode: the lightning indexer's scores in one kernel (tensor-core q·k, relu, head weights, head sum,
#   future-block mask) written as order-preserving int64 sort keys (score, then lower index first); the last CTA to
#   finish orders the visible keys (rank or bitonic sort; IndexerTopK): exactly the reference's stable descending
#   order in 1 kernel (beyond FUSED_TOPK_MAX_SLOTS visible keys + a radix select + rank sort kernel,
#   TopKSelectVisible).
# - gate_decode: dsv4.Gate.forward (sqrtsoftplus router, biased top-k or hash routing) in one kernel.
#
# Each torch-facing function has its pure-torch reference beside it (dsv4.py's own code); the function falls back to
# it wherever CUDA sm_90 or CuTe DSL is missing.


HEAD_TILE = 16          # attention heads per CTA (one m16 tensor-core tile)
ATTN_CHUNK = 64         # keys per CTA (window slots first, then the compressed keys)
INDEX_CHUNK = 128       # indexer keys per CTA
DEVICE_TOPK = True      # indexer: the top-k on the device (IndexerTopK: scores + top-k of the visible keys in one
                        # launch, beyond what it covers + TopKSelectVisible), else IndexerScores + torch.topk on the
                        # sort keys (also what takes more keys than TopKSelectVisible can)
TOPK_CLUSTER = True     # IndexerTopK where T <= 8 x INDEX_CHUNK: its CTAs form one cluster and rank the visible keys
                        # through DSMEM; else the last CTA to arrive orders <= FUSED_TOPK_MAX_SLOTS (a power of 2)
FUSED_TOPK_MAX_SLOTS = 1024
FUSED_SMALL_CHUNK_MAX_T = 4096   # last-CTA mode: 64-key score CTAs up to this many key slots (else INDEX_CHUNK)
TOPK_RANK_MAX = 256     # last-CTA mode: <= this many visible keys are ordered by ranking, more by a bitonic sort
ATTN_CLUSTER = True     # attention: SparseAttentionDecodeCluster (else the global-memory combine kernel)
ATTN_WIDE = True        # attention: SparseAttentionDecodeWide (keys dealt over up to ATTN_MAX_SPLITS CTAs per head group)
ATTN_WIDE_MAX_BATCH = 2  # ... for batches up to this (H100, bench.py decode same run: per step B=1 -0.027 ms, B=2 -0.017,
                         # B=4 +0.024, B=8 +0.069 ms with it; above, the cluster kernel)
ATTN_MAX_SPLITS = 16    # cluster size cap of the wide kernel (> 8: non-portable cluster sizes, up to 16 on H100/H200)
ATTN_MAX_CHUNK = 80     # key rows per CTA and pass of the wide kernel (80: ~108 KB of smem, two CTAs per SM)
ATTN_CTAS_PER_SM = 1    # wide kernel: fewer splits where B x head groups x splits would exceed this many CTAs per SM


# ----------------------------------------------------------------------------------------------------------------
# references (dsv4.py's code)
def sparse_attention_decode_reference(q, window_kv, comp_kv, comp_idx, pos, sink, scale: float, ratio: int):
    """dsv4.sparse_attention for one query per sequence, as Attention.decode calls it: q [B,1,H,hd] at position pos
    (int64 [1]); window_kv [B,W,hd] is the ring (slot s holds the latest position <= pos that is = s mod W);
    comp_kv [B,Tc,hd] the whole compressed cache (None: window only); comp_idx [B,1,k] the indexer's picks (CSA, -1 =
    none) or None (HCA: every completed block j < (pos+1)//ratio). -> [B,1,H,hd] in q.dtype."""
    import dsv4
    W = window_kv.shape[1]
    ring_pos = pos - (pos - torch.arange(W, device=q.device)) % W
    return dsv4.sparse_attention(q, window_kv, ring_pos, comp_kv, comp_idx, pos, sink, scale, W, max(ratio, 1))


def indexer_topk_reference(q, keys, weights, pos, topk: int, ratio: int = 4):
    """Indexer._top_blocks for one query per sequence: q [B,1,h,d] (FP4-simulated), keys [B,T,d] (the whole
    indexer cache), weights [B,1,h] fp32 (weights_proj(x) * d^-0.5 * h^-0.5), pos int64 [1]
    -> [B,1,min(topk,T)] int64 block ids, -1 where a pick is not a completed block."""
    T = keys.shape[1]
    score = (torch.einsum("bshd,btd->bsht", q.double(), keys.double()).float().relu() * weights[..., None]).sum(2)
    visible = (pos + 1) // ratio
    future = torch.arange(T, device=q.device)[None, :] >= visible[:, None]
    idx = score.masked_fill(future, float("-inf")).sort(dim=-1, descending=True, stable=True).indices[..., :topk]
    return torch.where(idx >= visible[:, None], -1, idx)


def attention_key_sources(B, W, Tc, comp_idx, pos, ratio: int, device):
    """The kernel's key list per sequence: [window slots 0..W-1 | compressed keys] -> source row [B, N] (slot s < W,
    W + compressed row j, -1 = masked): slot s iff s <= pos; HCA (comp_idx None) block j iff j < (pos+1)//ratio;
    CSA pick c iff 0 <= comp_idx[b,0,c] < Tc."""
    s = torch.arange(W, device=device)
    win = torch.where(s <= pos, s, -1).expand(B, W)
    if Tc is None:
        return win
    if comp_idx is None:
        j = torch.arange(Tc, device=device)
        comp = torch.where(j < (pos + 1) // ratio, W + j, -1).expand(B, Tc)
    else:
        j = comp_idx.reshape(B, -1)
        comp = torch.where((j >= 0) & (j < Tc), W + j, -1)
    return torch.cat([win, comp], 1)


def sparse_attention_decode_emulated(q, window_kv, comp_kv, comp_idx, pos, sink, scale: float, ratio: int,
                                     chunk: int = ATTN_CHUNK):
    """The kernel's arithmetic in torch (for CPU tests; same signature as the reference): per chunk of keys,
    logits = bf16(q·k) * scale (masked -inf), local max m, e = exp(l - m), z = sum e, o = bf16(e)·V in fp32; then
    M = max(sink, m_s), o = sum_s exp(m_s - M) o_s / (exp(sink - M) + sum_s exp(m_s - M) z_s), rounded once."""
    B, _, H, hd = q.shape
    W = window_kv.shape[1]
    src = attention_key_sources(B, W, None if comp_kv is None else comp_kv.shape[1], comp_idx, pos, ratio, q.device)
    rows = window_kv if comp_kv is None else torch.cat([window_kv, comp_kv], 1)
    kv = torch.gather(rows, 1, src.clamp(min=0)[..., None].expand(-1, -1, hd)).float()
    kv = kv * (src >= 0)[..., None]                                    # zero-filled invalid rows
    N = src.shape[1]
    S = (N + chunk - 1) // chunk
    kv = torch.nn.functional.pad(kv, (0, 0, 0, S * chunk - N))
    valid = torch.nn.functional.pad(src >= 0, (0, S * chunk - N))
    logits = (torch.einsum("bhd,bnd->bhn", q[:, 0].float(), kv).to(torch.bfloat16).float() * scale)
    logits = logits.masked_fill(~valid[:, None], float("-inf")).unflatten(-1, (S, chunk))        # [B,H,S,C]
    m = logits.amax(-1)
    e = torch.exp(logits - torch.where(m == float("-inf"), 0.0, m)[..., None])
    z = e.sum(-1)
    o_s = torch.einsum("bhsc,bscd->bhsd", e.to(torch.bfloat16).float(), kv.unflatten(1, (S, chunk)))
    snk = sink.float()[None, :, None]
    M = torch.maximum(snk[..., 0], m.amax(-1))[..., None]                                        # [B,H,1]
    w = torch.exp(m - M)
    Z = torch.exp(snk[..., 0:1].expand_as(M) - M) + (w * z).sum(-1, keepdim=True)
    o = (w[..., None] * o_s).sum(2) / Z
    return o.to(q.dtype)[:, None]


def attention_wide_sources(B, W, Tc, comp_idx, pos, ratio: int, splits: int, rows: int):
    """The key rows SparseAttentionDecodeWide gives each CTA (torch version, for CPU tests): source ids [B, S, rows]
    (slot s < W, W + compressed row j, -1 = masked / empty). window / HCA (comp_idx None): the n valid keys
    [slots 0..min(pos+1,W)-1 | blocks 0..] dealt ceil(n/S) per CTA in order; CSA: CTA s takes ring slots
    s*ceil(W/S).. then picks s, s+S, ..; rows = chunk * passes."""
    p = int(pos)
    src = torch.full((B, splits, rows), -1, dtype=torch.long)
    n_win = min(p + 1, W)
    if comp_idx is None:
        n = n_win + (0 if Tc is None else min((p + 1) // ratio, Tc))
        keys = torch.arange(n)
        keys = torch.where(keys < n_win, keys, W + keys - n_win)
        per = -(-n // splits)
        for s in range(splits):
            mine = keys[s * per:(s + 1) * per]
            src[:, s, :mine.numel()] = mine
        return src
    k = comp_idx.shape[-1]
    w_per, p_per = -(-W // splits), -(-k // splits)
    picks = comp_idx.reshape(B, k).cpu()
    for s in range(splits):
        for x in range(w_per):
            slot = s * w_per + x
            if slot < W and slot <= p:
                src[:, s, x] = slot
        for x in range(p_per):
            c = s + splits * x                          # round-robin: the valid picks (a prefix) spread evenly
            if c < k:
                j = picks[:, c]
                src[:, s, w_per + x] = torch.where((j >= 0) & (j < Tc), W + j, -1)
    return src


def sparse_attention_decode_wide_emulated(q, window_kv, comp_kv, comp_idx, pos, sink, scale: float, ratio: int,
                                          max_splits: int = 8, max_chunk: int = 80):
    """SparseAttentionDecodeWide's arithmetic in torch (CPU tests; same signature as the reference): per CTA its
    rows (attention_wide_sources) in passes of `chunk` rows with an online softmax (logits bf16(q.k)*scale,
    probabilities rounded to bf16 for PV), then M = max(sink, m_s), w_s = exp(m_s - M), o = sum_s w_s o_s / (exp(sink
    - M) + sum_s w_s z_s), rounded once. Sums in torch's order (the kernel's fp32 order differs)."""
    B, _, H, hd = q.shape
    W = window_kv.shape[1]
    Tc = None if comp_kv is None else comp_kv.shape[1]
    n_comp = 0 if comp_kv is None else (Tc if comp_idx is None else comp_idx.shape[-1])
    S, chunk, passes = attention_wide_plan(W, n_comp, max_splits, max_chunk)
    src = attention_wide_sources(B, W, Tc, comp_idx, pos, max(ratio, 1), S, chunk * passes).to(q.device)
    rows = window_kv if comp_kv is None else torch.cat([window_kv, comp_kv], 1)
    qf = q[:, 0].float()                                                           # [B,H,hd]
    neg = float("-inf")
    m = torch.full((B, S, H), neg)
    z = torch.zeros(B, S, H)
    o = torch.zeros(B, S, H, hd)
    for c in range(passes):
        sc = src[:, :, c * chunk:(c + 1) * chunk]                                  # [B,S,C]
        kv = torch.gather(rows, 1, sc.clamp(min=0).reshape(B, -1, 1).expand(-1, -1, hd)).float()
        kv = (kv * (sc >= 0).reshape(B, -1, 1)).reshape(B, S, chunk, hd)
        lg = torch.einsum("bhd,bscd->bshc", qf, kv).to(torch.bfloat16).float() * scale
        lg = lg.masked_fill((sc < 0)[:, :, None, :], neg)
        m_new = torch.maximum(m, lg.amax(-1))
        m_use = torch.where(m_new == neg, 0.0, m_new)
        alpha = torch.exp(m - m_use)
        e = torch.exp(lg - m_use[..., None])
        z = z * alpha + e.sum(-1)
        o = o * alpha[..., None] + torch.einsum("bshc,bscd->bshd", e.to(torch.bfloat16).float(), kv)
        m = m_new
    snk = sink.float()[None, :]
    M = torch.maximum(snk, m.amax(1))                                              # [B,H]
    w = torch.exp(m - M[:, None])
    Z = torch.exp(snk - M) + (w * z).sum(1)
    return ((w[..., None] * o).sum(1) / Z[..., None]).to(q.dtype)[:, None]


def score_sort_keys(score, visible):
    """What the indexer kernel writes (torch version, for CPU tests): fp32 scores [B,T] -> int64 keys ordered by
    (score, then lower index first); blocks t >= visible -> INT64_MIN. ~key's low word is the block id (-1)."""
    T = score.shape[-1]
    bits = (score.float() + 0.0).view(torch.int32).long()                 # + 0.0: -0 sorts as +0
    key32 = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    t = torch.arange(T, device=score.device)
    keys = key32 * (1 << 32) + (0xFFFFFFFF - t)
    return torch.where(t < visible, keys, torch.full_like(keys, -(1 << 63)))


def sort_keys_to_blocks(top):
    """torch.topk values of score_sort_keys -> block ids [.., k] int64 (-1 for future blocks)."""
    return (~top).view(torch.int32)[..., 0::2].long()


# ----------------------------------------------------------------------------------------------------------------
# CuTe DSL kernels
if HAVE_CUTE:
    import cutlass
    import cutlass.cute as cute
    from cutlass import Int32, Int64, Float32, BFloat16, const_expr
    from cutlass.cutlass_dsl import T as _T, dsl_user_op
    from cutlass._mlir import ir as _ir
    from cutlass._mlir.dialects import llvm as _llvm
    try:
        from cutlass.memory import SmemAllocator as _SmemAllocator     # 4.8: cutlass.utils' copy is deprecated
    except ImportError:
        from cutlass.utils import SmemAllocator as _SmemAllocator

    @dsl_user_op
    def mma_bf16_16816(a0, a1, a2, a3, b0, b1, c0, c1, c2, c3, *, loc=None, ip=None):
        """One warp-wide mma.sync m16n8k16 (bf16 in, fp32 accumulate). Fragments (g = lane/4, t = lane%4):
        A regs (row g, k 2t..2t+1), (g+8, 2t..), (g, 2t+8..), (g+8, 2t+8..); B regs (k 2t..2t+1, n g), (k 2t+8.., n g);
        C/D (g, n 2t), (g, 2t+1), (g+8, 2t), (g+8, 2t+1)."""
        ops = [Int32(x).ir_value(loc=loc, ip=ip) for x in (a0, a1, a2, a3, b0, b1)]
        ops += [Float32(x).ir_value(loc=loc, ip=ip) for x in (c0, c1, c2, c3)]
        res = _llvm.inline_asm(
            _ir.Type.parse("!llvm.struct<(f32, f32, f32, f32)>"), ops,
            "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {$0,$1,$2,$3}, {$4,$5,$6,$7}, {$8,$9}, "
            "{$10,$11,$12,$13};",
            "=f,=f,=f,=f,r,r,r,r,r,r,f,f,f,f", has_side_effects=False, loc=loc, ip=ip)
        return tuple(Float32(_llvm.extractvalue(_T.f32(), res, [i], loc=loc, ip=ip)) for i in range(4))

    @dsl_user_op
    def cp_async_16(smem_addr, gmem_addr, src_bytes, *, loc=None, ip=None):
        """16-byte cp.async global -> shared (L2 only); src_bytes = 0 zero-fills the destination."""
        _llvm.inline_asm(None, [Int32(smem_addr).ir_value(loc=loc, ip=ip), Int64(gmem_addr).ir_value(loc=loc, ip=ip),
                                Int32(src_bytes).ir_value(loc=loc, ip=ip)],
                         "cp.async.cg.shared.global [$0], [$1], 16, $2;", "r,l,r", has_side_effects=True,
                         loc=loc, ip=ip)

    @cute.jit
    def _key_source(v, W, pos, Tc, ratio, mIdx: cute.Tensor, b, mode: str):
        """Source row of key v of the list [window ring slots 0..W-1 | compressed keys]: ring slot v (if <= pos), W + j
        for compressed row j (HCA: the completed blocks j < (pos+1)//ratio; CSA: the indexer's pick v - W, if valid),
        -1 = masked."""
        src = Int32(-1)
        if v < W:
            if v <= pos:
                src = v
        else:
            c = v - W
            if const_expr(mode == "hca"):
                if c < Tc and c < (pos + 1) // ratio:
                    src = W + c
            if const_expr(mode == "csa"):
                if c < cute.size(mIdx, mode=[1]):
                    j = mIdx[b, c].to(Int32)
                    if j >= 0 and j < Tc:
                        src = W + j
        return src

    @cute.jit
    def _copy_key_piece(sK: cute.Tensor, r, c, row: int, src, W, b, mWin: cute.Tensor, mComp: cute.Tensor, bc):
        """cp.async of 16-B piece c of key row src (ring slot < W of row b, else compressed row src - W of row bc;
        -1: zero-filled) into padded smem row r."""
        gaddr = (mWin.iterator + cute.crd2idx((b, cutlass.max(cutlass.min(src, W - 1), 0), 4 * c),
                                              mWin.layout)).toint()
        if src >= W:
            gaddr = (mComp.iterator + cute.crd2idx((bc, src - W, 4 * c), mComp.layout)).toint()
        nbytes = Int32(0)
        if src >= 0:
            nbytes = Int32(16)
        cp_async_16((sK.iterator + r * row + 4 * c).toint(), gaddr, nbytes)

    @cute.jit
    def _pv_mma_words(acc2: cute.Tensor, a0, a1, a2, a3, sK: cute.Tensor, k, d0, g, sel, d_tiles: int):
        """acc2 += P fragment (a0..a3) x V for keys k, k+1, k+8, k+9 and the warp's d_tiles n8 d tiles from d0: the
        B fragment pairs two keys' bf16 of one d column (word loads + prmt; K = V rows in sK)."""
        for j in cutlass.range_constexpr(d_tiles):
            w = (d0 + 8 * j) // 2 + g // 2
            b0 = prmt(sK[k, w], sK[k + 1, w], sel)
            b1 = prmt(sK[k + 8, w], sK[k + 9, w], sel)
            d = mma_bf16_16816(a0, a1, a2, a3, b0, b1, acc2[4 * j], acc2[4 * j + 1], acc2[4 * j + 2], acc2[4 * j + 3])
            for e in cutlass.range_constexpr(4):
                acc2[4 * j + e] = d[e]

    @cute.jit
    def _rescale_rows(acc2: cute.Tensor, a_lo, a_hi, d_tiles: int):
        """The online softmax's rescale of the PV accumulators: rows g (a_lo) and g + 8 (a_hi) of each n8 d tile."""
        for j in cutlass.range_constexpr(d_tiles):
            acc2[4 * j] = acc2[4 * j] * a_lo
            acc2[4 * j + 1] = acc2[4 * j + 1] * a_lo
            acc2[4 * j + 2] = acc2[4 * j + 2] * a_hi
            acc2[4 * j + 3] = acc2[4 * j + 3] * a_hi

    @cute.jit
    def _publish_partial(sO: cute.Tensor, sML: cute.Tensor, acc2: cute.Tensor, m_run, z_run, g, t, d0, hh, part,
                         d_tiles: int):
        """This CTA's partial (o, m, z) -> its own shared memory, then a cluster barrier: the peers may read it."""
        for j in cutlass.range_constexpr(d_tiles):
            for e in cutlass.range_constexpr(4):
                sO[g + 8 * (e // 2), d0 + 8 * j + 2 * t + e % 2] = acc2[4 * j + e]
        if part == 0:
            sML[hh, 0] = m_run
            sML[hh, 1] = z_run
        cute.arch.cluster_arrive()
        cute.arch.cluster_wait()

    @dsl_user_op
    def load_cg_f32x4(gmem_addr, *, loc=None, ip=None):
        """4 fp32 from a 16-B aligned global address through L2 only (written by other CTAs of this launch)."""
        res = _llvm.inline_asm(_ir.Type.parse("!llvm.struct<(f32, f32, f32, f32)>"),
                               [Int64(gmem_addr).ir_value(loc=loc, ip=ip)],
                               "ld.global.cg.v4.f32 {$0,$1,$2,$3}, [$4];", "=f,=f,=f,=f,l",
                               has_side_effects=True, loc=loc, ip=ip)
        return tuple(Float32(_llvm.extractvalue(_T.f32(), res, [i], loc=loc, ip=ip)) for i in range(4))

    @dsl_user_op
    def prmt(a, b, sel, *, loc=None, ip=None) -> Int32:
        return Int32(_llvm.inline_asm(_T.i32(), [Int32(a).ir_value(loc=loc, ip=ip), Int32(b).ir_value(loc=loc, ip=ip),
                                                 Int32(sel).ir_value(loc=loc, ip=ip)],
                                      "prmt.b32 $0, $1, $2, $3;", "=r,r,r,r", has_side_effects=False, loc=loc, ip=ip))

    @dsl_user_op
    def pack_bf16x2(lo, hi, *, loc=None, ip=None) -> Int32:
        """(lo, hi) fp32 -> one word of two round-to-nearest bf16 (lo in the low half)."""
        return Int32(_llvm.inline_asm(_T.i32(), [Float32(hi).ir_value(loc=loc, ip=ip),
                                                 Float32(lo).ir_value(loc=loc, ip=ip)],
                                      "cvt.rn.bf16x2.f32 $0, $1, $2;", "=r,f,f", has_side_effects=False,
                                      loc=loc, ip=ip))

    @dsl_user_op
    def score_key(score, t, *, loc=None, ip=None) -> Int64:
        """fp32 score, key index t -> int64 whose signed order is (score, then lower t first): high word = the
        score's bits made sign-orderable (-0 -> +0 first), low word = ~t."""
        asm = ("{\n.reg .f32 x;\n.reg .b32 i, m;\n.reg .b64 h, l;\n"
               "add.f32 x, $1, 0f00000000;\nmov.b32 i, x;\nshr.s32 m, i, 31;\nand.b32 m, m, 0x7FFFFFFF;\n"
               "xor.b32 i, i, m;\ncvt.s64.s32 h, i;\nshl.b64 h, h, 32;\nnot.b32 m, $2;\ncvt.u64.u32 l, m;\n"
               "or.b64 $0, h, l;\n}")
        return Int64(_llvm.inline_asm(_T.i64(), [Float32(score).ir_value(loc=loc, ip=ip),
                                                 Int32(t).ir_value(loc=loc, ip=ip)],
                                      asm, "=l,f,r", has_side_effects=False, loc=loc, ip=ip))

    class SparseAttentionDecode:
        """o[b,h] = softmax over {window ring slots s <= pos, compressed keys (HCA: blocks j < (pos+1)//ratio; CSA:
        picks >= 0), sink_h} of bf16(q·k)*scale, probabilities rounded to bf16, times the same keys (K = V).

        Grid (splits, ceil(H/16), B); CTA (s, g, b) takes keys s*chunk.. of [window slots 0..W-1 | compressed
        0..n_comp-1] and heads 16g..16g+15. 256 threads = 8 warps. Keys (zero-filled when invalid) and q go to
        padded shared rows (hd/2 + 4 words: conflict-free fragment loads) by cp.async; QK^T by mma.sync (warp w:
        keys w*chunk/8..), logits -> smem, per-head max/exp/sum (16 threads per head), P as bf16 pairs in smem,
        PV by mma.sync (warp w: d columns w*hd/8..), fp32 partial (o, m, z) to global. The last CTA of (b, g) to
        arrive (atomic counter, reset after) combines the splits in order 0..S-1 with the sink and writes bf16."""

        def __init__(self, head_dim: int, mode: str, splits: int, chunk: int = ATTN_CHUNK):
            assert head_dim % 64 == 0 and chunk % 64 == 0 and chunk <= 256 and mode in ("window", "hca", "csa")
            self.hd, self.mode, self.splits, self.chunk = head_dim, mode, splits, chunk
            self.words = head_dim // 2               # int32 words (bf16 pairs) per row
            self.row = self.words + 4                # padded smem row
            self.p_row = chunk // 2 + 4              # P words per head
            self.threads = 256
            self.key_tiles = chunk // 64             # n8 key tiles per warp in QK^T
            self.d_tiles = head_dim // 64            # n8 d tiles per warp in PV

        @cute.jit
        def __call__(self, mQ: cute.Tensor, mWin: cute.Tensor, mComp: cute.Tensor, mIdx: cute.Tensor,
                     mPos: cute.Tensor, mSink: cute.Tensor, mOut: cute.Tensor, mPartO: cute.Tensor,
                     mPartML: cute.Tensor, mCount: cute.Tensor, scale: Float32, ratio: Int32, stream):
            B = cute.size(mQ, mode=[0])
            H = cute.size(mQ, mode=[1])

            @cute.struct
            class SharedStorage:
                sK: cute.struct.Align[cute.struct.MemRange[Int32, self.chunk * self.row], 16]
                sQ: cute.struct.Align[cute.struct.MemRange[Int32, HEAD_TILE * self.row], 16]
                sL: cute.struct.MemRange[Float32, HEAD_TILE * self.chunk]
                sP: cute.struct.MemRange[Int32, HEAD_TILE * self.p_row]
                sSrc: cute.struct.MemRange[Int32, self.chunk]
                flag: cute.struct.MemRange[Int32, 4]

            self.shared_storage = SharedStorage
            self.kernel(mQ, mWin, mComp, mIdx, mPos, mSink, mOut, mPartO, mPartML, mCount, scale, ratio).launch(
                grid=[self.splits, (H + HEAD_TILE - 1) // HEAD_TILE, B], block=[self.threads, 1, 1], stream=stream, use_pdl=GLUE_PDL)

        @cute.kernel
        def kernel(self, mQ: cute.Tensor, mWin: cute.Tensor, mComp: cute.Tensor, mIdx: cute.Tensor,
                   mPos: cute.Tensor, mSink: cute.Tensor, mOut: cute.Tensor, mPartO: cute.Tensor,
                   mPartML: cute.Tensor, mCount: cute.Tensor, scale: Float32, ratio: Int32):
            _pdl_enter()
            tidx, _, _ = cute.arch.thread_idx()
            split, grp, b = cute.arch.block_idx()
            _, n_grp, _ = cute.arch.grid_dim()
            warp = tidx // 32
            lane = tidx % 32
            g = lane // 4
            t = lane % 4
            H = cute.size(mQ, mode=[1])
            W = cute.size(mWin, mode=[1])
            Tc = cute.size(mComp, mode=[1])
            h0 = grp * HEAD_TILE
            chunk, row, vec = self.chunk, self.row, self.words // 4      # vec: 16-B pieces per row
            neg_inf = Float32(-math.inf)

            smem = _SmemAllocator()
            storage = smem.allocate(self.shared_storage)
            sK = storage.sK.get_tensor(cute.make_layout((chunk, row), stride=(row, 1)))
            sQ = storage.sQ.get_tensor(cute.make_layout((HEAD_TILE, row), stride=(row, 1)))
            sL = storage.sL.get_tensor(cute.make_layout((HEAD_TILE, chunk), stride=(chunk, 1)))
            sP = storage.sP.get_tensor(cute.make_layout((HEAD_TILE, self.p_row), stride=(self.p_row, 1)))
            sSrc = storage.sSrc.get_tensor(cute.make_layout(chunk))
            flag = storage.flag.get_tensor(cute.make_layout(4))

            pos = mPos[0].to(Int32)
            # source row of each key of this chunk: slot s < W of the ring, W + j for compressed row j, -1 = masked
            if tidx == 0:
                flag[0] = Int32(0)
            cute.arch.sync_threads()
            for r in cutlass.range(tidx, chunk, self.threads, unroll=1):
                src = _key_source(split * chunk + r, W, pos, Tc, ratio, mIdx, b, self.mode)
                sSrc[r] = src
                if src >= 0:
                    flag[0] = Int32(1)
            cute.arch.sync_threads()
            has_work = flag[0] != 0

            if has_work:
                # q rows of the head group and the chunk's key rows -> padded smem (invalid rows zero-filled)
                for i in cutlass.range(tidx, HEAD_TILE * vec, self.threads, unroll=1):
                    r = i // vec
                    c = i % vec
                    head = cutlass.min(h0 + r, H - 1)
                    gaddr = (mQ.iterator + cute.crd2idx((b, head, 4 * c), mQ.layout)).toint()
                    nbytes = Int32(0)
                    if h0 + r < H:
                        nbytes = Int32(16)
                    cp_async_16((sQ.iterator + r * row + 4 * c).toint(), gaddr, nbytes)
                for i in cutlass.range(tidx, chunk * vec, self.threads, unroll=4):
                    _copy_key_piece(sK, i // vec, i % vec, row, sSrc[i // vec], W, b, mWin, mComp, b)
                cute.arch.cp_async_commit_group()
                cute.arch.cp_async_wait_group(0)
                cute.arch.sync_threads()

                # logits: warp w -> keys w*chunk/8 + 8j + (g | 2t, 2t+1)
                key0 = warp * (chunk // 8)
                acc = cute.make_rmem_tensor((self.key_tiles * 4,), Float32)
                acc.fill(0.0)
                for kk in cutlass.range_constexpr(self.hd // 16):
                    a0 = sQ[g, kk * 8 + t]
                    a1 = sQ[g + 8, kk * 8 + t]
                    a2 = sQ[g, kk * 8 + 4 + t]
                    a3 = sQ[g + 8, kk * 8 + 4 + t]
                    for j in cutlass.range_constexpr(self.key_tiles):
                        n = key0 + 8 * j + g
                        d = mma_bf16_16816(a0, a1, a2, a3, sK[n, kk * 8 + t], sK[n, kk * 8 + 4 + t],
                                           acc[4 * j], acc[4 * j + 1], acc[4 * j + 2], acc[4 * j + 3])
                        for e in cutlass.range_constexpr(4):
                            acc[4 * j + e] = d[e]
                for j in cutlass.range_constexpr(self.key_tiles):
                    for e in cutlass.range_constexpr(4):
                        key = key0 + 8 * j + 2 * t + e % 2
                        lg = acc[4 * j + e].to(BFloat16).to(Float32) * scale     # the reference's bf16 einsum
                        if sSrc[key] < 0:
                            lg = neg_inf
                        sL[g + 8 * (e // 2), key] = lg
                cute.arch.sync_threads()

                # per head: max, exp, sum over the chunk (16 threads per head, chunk/16 keys each)
                hh = tidx // 16
                part = tidx % 16
                per = chunk // 16
                m = neg_inf
                for i in cutlass.range_constexpr(per):
                    m = cute.math.max(m, sL[hh, part * per + i])
                for o in cutlass.range_constexpr(4):
                    m = cute.math.max(m, cute.arch.shuffle_sync_bfly(m, 1 << o))
                m_use = m
                if m == neg_inf:
                    m_use = Float32(0.0)
                z = Float32(0.0)
                for i in cutlass.range_constexpr(per // 2):
                    k2 = part * per + 2 * i
                    p0 = cute.math.exp(sL[hh, k2] - m_use)
                    p1 = cute.math.exp(sL[hh, k2 + 1] - m_use)
                    z = z + p0 + p1
                    sP[hh, k2 // 2] = pack_bf16x2(p0, p1)
                for o in cutlass.range_constexpr(4):
                    z = z + cute.arch.shuffle_sync_bfly(z, 1 << o)
                if part == 0:
                    mPartML[b, grp, split, hh, 0] = m
                    mPartML[b, grp, split, hh, 1] = z
                cute.arch.sync_threads()

                # PV: warp w -> d columns w*hd/8 + 8j + (g | 2t, 2t+1); B fragment pairs keys (2t, 2t+1) of one d
                d0 = warp * (self.hd // 8)
                sel = Int32(0x5410)                          # low (even d) or high (odd d) bf16 of both words
                if g % 2 == 1:
                    sel = Int32(0x7632)
                acc2 = cute.make_rmem_tensor((self.d_tiles * 4,), Float32)
                acc2.fill(0.0)
                for kk in cutlass.range_constexpr(chunk // 16):
                    a0 = sP[g, kk * 8 + t]
                    a1 = sP[g + 8, kk * 8 + t]
                    a2 = sP[g, kk * 8 + 4 + t]
                    a3 = sP[g + 8, kk * 8 + 4 + t]
                    k = kk * 16 + 2 * t
                    _pv_mma_words(acc2, a0, a1, a2, a3, sK, k, d0, g, sel, self.d_tiles)
                for j in cutlass.range_constexpr(self.d_tiles):
                    for e in cutlass.range_constexpr(4):
                        mPartO[b, grp, split, g + 8 * (e // 2), d0 + 8 * j + 2 * t + e % 2] = acc2[4 * j + e]
            else:
                if tidx < HEAD_TILE:
                    mPartML[b, grp, split, tidx, 0] = neg_inf
                    mPartML[b, grp, split, tidx, 1] = Float32(0.0)

            # the last CTA of (b, grp) to arrive combines the splits in a fixed order
            cute.arch.fence_acq_rel_gpu()
            cute.arch.sync_threads()
            counter = b * n_grp + grp
            if tidx == 0:
                flag[1] = cute.arch.atomic_add(mCount.iterator + counter, Int32(1), sem="acq_rel", scope="gpu")
            cute.arch.sync_threads()
            if flag[1] == self.splits - 1:
                cute.arch.fence_acq_rel_gpu()
                ch = tidx // 16                              # head of the group
                cp = tidx % 16                               # 4 d columns per 64
                head = h0 + ch
                if head < H:
                    sink = mSink[head]
                    M = sink
                    ms = cute.make_rmem_tensor((self.splits,), Float32)
                    for s in cutlass.range_constexpr(self.splits):
                        off = cute.crd2idx((b, grp, s, ch, 0), mPartML.layout)
                        ms[s] = cute.arch.load(mPartML.iterator + off, Float32, cop="cg")
                        M = cute.math.max(M, ms[s])
                    Z = cute.math.exp(sink - M)
                    for s in cutlass.range_constexpr(self.splits):
                        off = cute.crd2idx((b, grp, s, ch, 1), mPartML.layout)
                        zs = cute.arch.load(mPartML.iterator + off, Float32, cop="cg")
                        ms[s] = cute.math.exp(ms[s] - M)       # split weight (0 for an empty split)
                        Z = Z + zs * ms[s]
                    inv = 1.0 / Z
                    for p in cutlass.range(self.hd // 64, unroll=1):
                        o = cute.make_rmem_tensor((4,), Float32)
                        o.fill(0.0)
                        for s in cutlass.range_constexpr(self.splits):
                            if ms[s] > 0.0:
                                off = cute.crd2idx((b, grp, s, ch, 64 * p + 4 * cp), mPartO.layout)
                                v = load_cg_f32x4((mPartO.iterator + off).toint())
                                for e in cutlass.range_constexpr(4):
                                    o[e] = o[e] + ms[s] * v[e]
                        for e in cutlass.range_constexpr(4):
                            mOut[b, head, 64 * p + 4 * cp + e] = (o[e] * inv).to(BFloat16)
                if tidx == 0:
                    mCount[counter] = 0

    @dsl_user_op
    def load_dsmem_f32x4(local_addr, rank, *, loc=None, ip=None):
        """4 fp32 at this shared-memory address in the cluster CTA `rank` (distributed shared memory)."""
        res = _llvm.inline_asm(_ir.Type.parse("!llvm.struct<(f32, f32, f32, f32)>"),
                               [Int32(local_addr).ir_value(loc=loc, ip=ip), Int32(rank).ir_value(loc=loc, ip=ip)],
                               "{\n.reg .b32 ra;\nmapa.shared::cluster.u32 ra, $4, $5;\n"
                               "ld.shared::cluster.v4.f32 {$0,$1,$2,$3}, [ra];\n}", "=f,=f,=f,=f,r,r",
                               has_side_effects=True, loc=loc, ip=ip)
        return tuple(Float32(_llvm.extractvalue(_T.f32(), res, [i], loc=loc, ip=ip)) for i in range(4))

    class SparseAttentionDecodeCluster:
        """SparseAttentionDecode with the combine in distributed shared memory: grid (S, ceil(H/16), B) in clusters
        of the S <= 8 splits of one (b, head group); each CTA runs chunks_per_cta chunks of keys (online softmax:
        running max / sum per head, the PV accumulators rescaled), keeps its partial (o, m, z) in its shared
        memory, and after a cluster barrier CTA r combines every S-th 4-column piece of the 16 x hd output from all
        S CTAs (fixed order 0..S-1) and writes bf16; a second barrier keeps the shared memory alive until all
        reads are done. No global partials, no atomics. rope_dim > 0: the written bf16 values of the last rope_dim
        columns are then rotated back by the position's angles (mAng), as RopeInplace(inverse) would do after.
        rows (sparse_attention_rows, prefill): row b has its own position mPos[b] and all rows read the compressed
        keys of mComp row 0."""

        def __init__(self, head_dim: int, mode: str, splits: int, chunks_per_cta: int, chunk: int = ATTN_CHUNK,
                     rope_dim: int = 0, rows: bool = False):
            assert head_dim % 64 == 0 and chunk == 64 and mode in ("window", "hca", "csa") and 1 <= splits <= 8
            assert rope_dim % 4 == 0 and rope_dim <= head_dim and not (rows and rope_dim)
            self.hd, self.mode, self.splits, self.n_ch, self.chunk = head_dim, mode, splits, chunks_per_cta, chunk
            self.rd, self.rows = rope_dim, rows
            self.words = head_dim // 2
            self.row = self.words + 4
            self.p_row = chunk // 2 + 4
            self.threads = 256
            self.d_tiles = head_dim // 64
            assert HEAD_TILE * head_dim <= chunk * self.row     # the partial o reuses the key rows' space

        @cute.jit
        def __call__(self, mQ: cute.Tensor, mWin: cute.Tensor, mComp: cute.Tensor, mIdx: cute.Tensor,
                     mPos: cute.Tensor, mSink: cute.Tensor, mOut: cute.Tensor, mAng: cute.Tensor, scale: Float32,
                     ratio: Int32, stream):
            B = cute.size(mQ, mode=[0])
            H = cute.size(mQ, mode=[1])

            @cute.struct
            class SharedStorage:
                sK: cute.struct.Align[cute.struct.MemRange[Int32, self.chunk * self.row], 16]
                sQ: cute.struct.Align[cute.struct.MemRange[Int32, HEAD_TILE * self.row], 16]
                sL: cute.struct.MemRange[Float32, HEAD_TILE * self.chunk]
                sP: cute.struct.MemRange[Int32, HEAD_TILE * self.p_row]
                sSrc: cute.struct.MemRange[Int32, self.chunk]
                sAlpha: cute.struct.MemRange[Float32, HEAD_TILE]
                sML: cute.struct.Align[cute.struct.MemRange[Float32, HEAD_TILE * 4], 16]
                flag: cute.struct.MemRange[Int32, 4]

            self.shared_storage = SharedStorage
            self.kernel(mQ, mWin, mComp, mIdx, mPos, mSink, mOut, mAng, scale, ratio).launch(
                grid=[self.splits, (H + HEAD_TILE - 1) // HEAD_TILE, B], block=[self.threads, 1, 1],
                cluster=[self.splits, 1, 1], stream=stream, use_pdl=GLUE_PDL)

        @cute.kernel
        def kernel(self, mQ: cute.Tensor, mWin: cute.Tensor, mComp: cute.Tensor, mIdx: cute.Tensor,
                   mPos: cute.Tensor, mSink: cute.Tensor, mOut: cute.Tensor, mAng: cute.Tensor, scale: Float32,
                   ratio: Int32):
            _pdl_enter()
            tidx, _, _ = cute.arch.thread_idx()
            split, grp, b = cute.arch.block_idx()
            warp = tidx // 32
            lane = tidx % 32
            g = lane // 4
            t = lane % 4
            H = cute.size(mQ, mode=[1])
            W = cute.size(mWin, mode=[1])
            Tc = cute.size(mComp, mode=[1])
            h0 = grp * HEAD_TILE
            chunk, row, vec = self.chunk, self.row, self.words // 4
            neg_inf = Float32(-math.inf)

            smem = _SmemAllocator()
            storage = smem.allocate(self.shared_storage)
            sK = storage.sK.get_tensor(cute.make_layout((chunk, row), stride=(row, 1)))
            sO = cute.make_tensor(cute.recast_ptr(sK.iterator, dtype=Float32),          # the key rows, after PV
                                  cute.make_layout((HEAD_TILE, self.hd), stride=(self.hd, 1)))
            sQ = storage.sQ.get_tensor(cute.make_layout((HEAD_TILE, row), stride=(row, 1)))
            sL = storage.sL.get_tensor(cute.make_layout((HEAD_TILE, chunk), stride=(chunk, 1)))
            sP = storage.sP.get_tensor(cute.make_layout((HEAD_TILE, self.p_row), stride=(self.p_row, 1)))
            sSrc = storage.sSrc.get_tensor(cute.make_layout(chunk))
            sAlpha = storage.sAlpha.get_tensor(cute.make_layout(HEAD_TILE))
            sML = storage.sML.get_tensor(cute.make_layout((HEAD_TILE, 4), stride=(4, 1)))
            flag = storage.flag.get_tensor(cute.make_layout(4))
            pos = mPos[0].to(Int32)
            bc = b                                  # the row of mComp this CTA reads
            if const_expr(self.rows):
                pos = mPos[b].to(Int32)
                bc = Int32(0)

            # q rows of the head group -> padded smem, once
            for i in cutlass.range(tidx, HEAD_TILE * vec, self.threads, unroll=1):
                r = i // vec
                c = i % vec
                head = cutlass.min(h0 + r, H - 1)
                gaddr = (mQ.iterator + cute.crd2idx((b, head, 4 * c), mQ.layout)).toint()
                nbytes = Int32(0)
                if h0 + r < H:
                    nbytes = Int32(16)
                cp_async_16((sQ.iterator + r * row + 4 * c).toint(), gaddr, nbytes)
            cute.arch.cp_async_commit_group()

            hh = tidx // 16                     # softmax: head hh, keys part*chunk/16.. of each chunk
            part = tidx % 16
            per = chunk // 16
            m_run = neg_inf
            z_run = Float32(0.0)
            d0 = warp * (self.hd // 8)          # PV: warp's d columns
            sel = Int32(0x5410)
            if g % 2 == 1:
                sel = Int32(0x7632)
            acc2 = cute.make_rmem_tensor((self.d_tiles * 4,), Float32)
            acc2.fill(0.0)
            for ch in cutlass.range(self.n_ch, unroll=1):
                v0 = (split * self.n_ch + ch) * chunk
                if tidx == 0:
                    flag[0] = Int32(0)
                cute.arch.sync_threads()
                for r in cutlass.range(tidx, chunk, self.threads, unroll=1):
                    src = _key_source(v0 + r, W, pos, Tc, ratio, mIdx, b, self.mode)
                    sSrc[r] = src
                    if src >= 0:
                        flag[0] = Int32(1)
                cute.arch.sync_threads()
                if flag[0] != 0:
                    for i in cutlass.range(tidx, chunk * vec, self.threads, unroll=4):
                        _copy_key_piece(sK, i // vec, i % vec, row, sSrc[i // vec], W, b, mWin, mComp, bc)
                    cute.arch.cp_async_commit_group()
                    cute.arch.cp_async_wait_group(0)
                    cute.arch.sync_threads()

                    key0 = warp * (chunk // 8)            # logits: warp w -> keys 8w + (2t, 2t+1), rows g, g+8
                    acc = cute.make_rmem_tensor((4,), Float32)
                    acc.fill(0.0)
                    for kk in cutlass.range_constexpr(self.hd // 16):
                        n = key0 + g
                        d = mma_bf16_16816(sQ[g, kk * 8 + t], sQ[g + 8, kk * 8 + t], sQ[g, kk * 8 + 4 + t],
                                           sQ[g + 8, kk * 8 + 4 + t], sK[n, kk * 8 + t], sK[n, kk * 8 + 4 + t],
                                           acc[0], acc[1], acc[2], acc[3])
                        for e in cutlass.range_constexpr(4):
                            acc[e] = d[e]
                    for e in cutlass.range_constexpr(4):
                        key = key0 + 2 * t + e % 2
                        lg = acc[e].to(BFloat16).to(Float32) * scale
                        if sSrc[key] < 0:
                            lg = neg_inf
                        sL[g + 8 * (e // 2), key] = lg
                    cute.arch.sync_threads()

                    m_c = neg_inf
                    for i in cutlass.range_constexpr(per):
                        m_c = cute.math.max(m_c, sL[hh, part * per + i])
                    for o in cutlass.range_constexpr(4):
                        m_c = cute.math.max(m_c, cute.arch.shuffle_sync_bfly(m_c, 1 << o))
                    m_new = cute.math.max(m_run, m_c)
                    m_use = m_new
                    if m_new == neg_inf:
                        m_use = Float32(0.0)
                    alpha = cute.math.exp(m_run - m_use)          # rescales what the earlier chunks summed
                    zc = Float32(0.0)
                    for i in cutlass.range_constexpr(per // 2):
                        k2 = part * per + 2 * i
                        p0 = cute.math.exp(sL[hh, k2] - m_use)
                        p1 = cute.math.exp(sL[hh, k2 + 1] - m_use)
                        zc = zc + p0 + p1
                        sP[hh, k2 // 2] = pack_bf16x2(p0, p1)
                    for o in cutlass.range_constexpr(4):
                        zc = zc + cute.arch.shuffle_sync_bfly(zc, 1 << o)
                    z_run = z_run * alpha + zc
                    m_run = m_new
                    if part == 0:
                        sAlpha[hh] = alpha
                    cute.arch.sync_threads()

                    _rescale_rows(acc2, sAlpha[g], sAlpha[g + 8], self.d_tiles)
                    for kk in cutlass.range_constexpr(chunk // 16):
                        a0 = sP[g, kk * 8 + t]
                        a1 = sP[g + 8, kk * 8 + t]
                        a2 = sP[g, kk * 8 + 4 + t]
                        a3 = sP[g + 8, kk * 8 + 4 + t]
                        k = kk * 16 + 2 * t
                        _pv_mma_words(acc2, a0, a1, a2, a3, sK, k, d0, g, sel, self.d_tiles)
                cute.arch.sync_threads()                           # sK / sP are reused by the next chunk
            cute.arch.cp_async_wait_group(0)                       # (q's copy, if no chunk had keys)

            # partial (o, m, z) of this CTA -> its own shared memory, then the cluster combines
            _publish_partial(sO, sML, acc2, m_run, z_run, g, t, d0, hh, part, self.d_tiles)
            units = HEAD_TILE * self.hd // 4
            for u in cutlass.range(split + self.splits * tidx, units, self.splits * self.threads, unroll=1):
                ch_ = u // (self.hd // 4)
                col = (u % (self.hd // 4)) * 4
                head = h0 + ch_
                if head < H:
                    sink = mSink[head]
                    M = sink
                    ms = cute.make_rmem_tensor((self.splits,), Float32)
                    zs = cute.make_rmem_tensor((self.splits,), Float32)
                    for s_ in cutlass.range_constexpr(self.splits):
                        mz = load_dsmem_f32x4((sML.iterator + ch_ * 4).toint(), Int32(s_))
                        ms[s_] = mz[0]
                        zs[s_] = mz[1]
                        M = cute.math.max(M, mz[0])
                    Z = cute.math.exp(sink - M)
                    o = cute.make_rmem_tensor((4,), Float32)
                    o.fill(0.0)
                    for s_ in cutlass.range_constexpr(self.splits):
                        wgt = cute.math.exp(ms[s_] - M)
                        Z = Z + zs[s_] * wgt
                        if wgt > 0.0:
                            ov = load_dsmem_f32x4((sO.iterator + ch_ * self.hd + col).toint(), Int32(s_))
                            for e in cutlass.range_constexpr(4):
                                o[e] = o[e] + wgt * ov[e]
                    inv = 1.0 / Z
                    ob = cute.make_rmem_tensor((4,), Float32)
                    for e in cutlass.range_constexpr(4):
                        ob[e] = (o[e] * inv).to(BFloat16).to(Float32)       # the bf16 output value
                    if const_expr(self.rd > 0):
                        if col >= self.hd - self.rd:                       # inverse RoPE of the bf16 values
                            p = _ang_index(mPos, True, 0)
                            for i in cutlass.range_constexpr(2):
                                a0, a1 = _rotate(ob[2 * i], ob[2 * i + 1],
                                                 mAng[p, (col - (self.hd - self.rd)) // 2 + i], True)
                                ob[2 * i] = a0
                                ob[2 * i + 1] = a1
                    for e in cutlass.range_constexpr(4):
                        mOut[b, head, col + e] = ob[e].to(BFloat16)
            cute.arch.cluster_arrive()                             # peers may still read this CTA's partial
            cute.arch.cluster_wait()

    @dsl_user_op
    def store_b32x2(gmem_addr, w0, w1, *, loc=None, ip=None):
        """One 8-byte global store of two words (4 bf16)."""
        _llvm.inline_asm(None, [Int64(gmem_addr).ir_value(loc=loc, ip=ip), Int32(w0).ir_value(loc=loc, ip=ip),
                                Int32(w1).ir_value(loc=loc, ip=ip)],
                         "st.global.v2.b32 [$0], {$1, $2};", "l,r,r", has_side_effects=True, loc=loc, ip=ip)

    @dsl_user_op
    def ldsm_x4(smem_addr, trans: bool = False, *, loc=None, ip=None):
        """ldmatrix .x4: four 8x8 bf16 matrices whose row addresses lanes 8m..8m+7 give (16 B each) -> one word of
        each per lane (row lane/4, column pair lane%4; .trans: column lane/4, row pair lane%4)."""
        res = _llvm.inline_asm(_ir.Type.parse("!llvm.struct<(i32, i32, i32, i32)>"),
                               [Int32(smem_addr).ir_value(loc=loc, ip=ip)],
                               "ldmatrix.sync.aligned.m8n8.x4%s.shared.b16 {$0,$1,$2,$3}, [$4];"
                               % (".trans" if trans else ""), "=r,=r,=r,=r,r", has_side_effects=True,
                               loc=loc, ip=ip)
        return tuple(Int32(_llvm.extractvalue(_T.i32(), res, [i], loc=loc, ip=ip)) for i in range(4))

    class SparseAttentionDecodeWide:
        """SparseAttentionDecodeCluster laid out for latency: grid (S, ceil(H/16), B) in clusters of the S <= 16
        splits of one (b, head group); each CTA loads its keys once (one pass of <= `chunk` rows, a multiple of 16;
        more passes only for very long caches) and the combine runs in distributed shared memory.
        - Key assignment. window / HCA: the valid keys are known from pos alone (ring slots s <= pos, then the
          completed blocks j < (pos+1)//ratio), so the n valid keys are dealt evenly, ceil(n/S) per CTA: at pos 1000
          an HCA layer's 135 keys take 17 rows per CTA (8 splits) instead of 64-key chunks of mostly empty slots.
          CSA: CTA s takes ring slots s*ceil(W/S).. and picks s, s+S, .. (the top-k puts its -1s last, so the valid
          picks of a short sequence spread evenly; a -1 is a masked row; ring
          slots past pos are copied and masked with the logits, so the copies need neither pos nor a second pass).
        - The rows are copied by cp.async (CSA: every pick load of a thread in flight before its copies); rows past
          the CTA's count are neither copied nor multiplied.
        - Per-unit constants (the head's sink, cos/sin of the inverse RoPE): before the wait under PDL, else while
          the copies are in flight.
        - QK^T / online softmax / PV by mma.sync with ldmatrix fragments (PV where a warp has an odd number of n8
          d tiles, head_dim 64, 192, ..: word loads); probabilities rounded to bf16 as in
          SparseAttentionDecodeCluster; thread `part` of a head takes key pairs part, part+16, ...
        - Combine: CTA s owns a contiguous 1/S of the group's 4-column output units (a warp's DSMEM reads are
          consecutive 16-B pieces, no bank conflicts); per unit all S (m, z) and partial columns are loaded at once,
          M = max(sink, m_s), w_s = exp(m_s - M), Z = exp(sink - M) + sum_s z_s w_s, o = sum_s w_s o_s (order s),
          times 1/Z, bf16; the last rope_dim columns rotated back; one 8-byte store. The exit cluster barrier is
          relaxed (it only keeps the shared memory alive for the peers' reads).
        - q_norm = (eps, bw, vec, slots) (ATTN_FOLD_Q_NORM, rope_dim > 0): q is wq_b's raw output; the CTA makes
          QNormRope's query in shared memory (per-head RMS in torch_sum_layout(hd, B*H)'s order, bf16, RoPE of the
          last rope_dim dims at pos, bf16: bit-identical), while its first key rows are still in flight.
        Tried and dropped: TMA bulk row copies, copying the unchanged rows before the PDL wait, per-head combine
        weights, split dot products / accumulators, paired key tiles per warp (notes/decode.md, session 5)."""

        def __init__(self, head_dim: int, mode: str, splits: int, chunk: int, chunks_per_cta: int = 1,
                     rope_dim: int = 0, q_norm: tuple = ()):
            self.qn, self.fold_q = tuple(q_norm), bool(q_norm)
            assert not q_norm or (rope_dim > 0 and q_norm[2] == 4 and q_norm[1] % 32 == 0
                                  and head_dim % (q_norm[1] * q_norm[2]) == 0)
            assert head_dim % 64 == 0 and mode in ("window", "hca", "csa") and 1 <= splits <= 16
            assert chunk % 16 == 0 and 16 <= chunk <= 128 and chunks_per_cta >= 1
            assert rope_dim % 4 == 0 and rope_dim <= head_dim
            self.hd, self.mode, self.splits, self.chunk, self.n_ch = head_dim, mode, splits, chunk, chunks_per_cta
            self.rd = rope_dim
            self.words = head_dim // 2
            self.row = self.words + 4
            self.p_row = chunk // 2 + 4
            self.threads = 256
            self.d_tiles = head_dim // 64
            self.key_tiles = chunk // 8                      # n8 key tiles of QK^T
            self.tiles_per_warp = -(-self.key_tiles // 8)
            self.pairs_per_thread = -(-(chunk // 2) // 16)
            self.uw = 4                                      # output columns per unit of the combine
            self.units = HEAD_TILE * head_dim // self.uw
            self.units_per_cta = -(-self.units // splits)
            self.units_per_thread = -(-self.units_per_cta // self.threads)
            self.copies = -(-chunk * (self.words // 4) // self.threads)     # 16-B pieces per thread and chunk
            self.k_words = max(chunk * self.row, HEAD_TILE * head_dim)      # the partial o reuses the key rows

        @cute.jit
        def __call__(self, mQ: cute.Tensor, mWin: cute.Tensor, mComp: cute.Tensor, mIdx: cute.Tensor,
                     mPos: cute.Tensor, mSink: cute.Tensor, mOut: cute.Tensor, mAng: cute.Tensor,
                     scale: Float32, ratio: Int32, stream):
            B = cute.size(mQ, mode=[0])
            H = cute.size(mQ, mode=[1])

            @cute.struct
            class SharedStorage:
                sK: cute.struct.Align[cute.struct.MemRange[Int32, self.k_words], 16]
                sQ: cute.struct.Align[cute.struct.MemRange[Int32, HEAD_TILE * self.row], 16]
                sL: cute.struct.MemRange[Float32, HEAD_TILE * self.chunk]
                sP: cute.struct.MemRange[Int32, HEAD_TILE * self.p_row]
                sSrc: cute.struct.MemRange[Int32, self.chunk]
                sAlpha: cute.struct.MemRange[Float32, HEAD_TILE]
                sML: cute.struct.Align[cute.struct.MemRange[Float32, HEAD_TILE * 4], 16]

            self.shared_storage = SharedStorage
            self.kernel(mQ, mWin, mComp, mIdx, mPos, mSink, mOut, mAng, scale, ratio).launch(
                grid=[self.splits, (H + HEAD_TILE - 1) // HEAD_TILE, B], block=[self.threads, 1, 1],
                cluster=[self.splits, 1, 1], stream=stream, use_pdl=GLUE_PDL,
                min_blocks_per_mp=2, preferred_smem_carveout=100)   # <= 128 registers: two CTAs per SM

        @cute.jit
        def copy_rows(self, sK, sSrc, mWin, mComp, mIdx, b, split, tidx, x0, cnt, v_begin, w_per, k_picks, n_win, W,
                      Tc):
            """cp.async of key rows 0..cnt16-1 of a chunk (list positions x0 + r; rows cnt.. zero-filled) + their source
            ids into sSrc. First every source of this thread (CSA: all pick loads in flight at once), then the copies."""
            vec = self.words // 4
            row = self.row
            S = self.splits
            cnt16 = (cnt + 15) // 16 * 16
            srcs = cute.make_rmem_tensor((self.copies,), Int32)
            for k in cutlass.range_constexpr(self.copies):
                r = (tidx + self.threads * k) // vec
                x = x0 + r
                src = Int32(-1)
                if const_expr(self.mode == "csa"):
                    slot = split * w_per + x
                    c = split + S * (x - w_per)         # picks dealt round-robin: the valid ones come first
                    if x < w_per:
                        if slot < W:                    # slots > pos are masked with the logits (put_logits)
                            src = slot
                    else:
                        j = mIdx[b, cutlass.max(cutlass.min(c, k_picks - 1), 0)].to(Int32)
                        if c < k_picks and j >= 0 and j < Tc:
                            src = W + j
                else:
                    v = v_begin + x
                    src = v
                    if v >= n_win:
                        src = W + v - n_win
                if r >= cnt:
                    src = Int32(-1)
                srcs[k] = src
            for k in cutlass.range_constexpr(self.copies):
                i = tidx + self.threads * k
                r = i // vec
                c = i % vec
                if r < cnt16:
                    src = srcs[k]
                    _copy_key_piece(sK, r, c, row, src, W, b, mWin, mComp, b)
                    if c == 0:
                        sSrc[r] = src
            cute.arch.cp_async_commit_group()

        @cute.jit
        def unit_constants(self, mSink, mAng, sinks, cs, pos, split, tidx, h0, H):
            """Output units (uw columns of one head) of this CTA: a contiguous range, so a warp's DSMEM reads are
            consecutive pieces. sinks: per unit the head's sink; cs: for the rope columns (cos, -sin) per column pair."""
            uw = self.uw
            p_ang = cutlass.max(pos, Int32(0))
            for i in cutlass.range_constexpr(self.units_per_thread):
                a_u = cutlass.min(split * self.units_per_cta + tidx + self.threads * i, self.units - 1)
                a_col = (a_u % (self.hd // uw)) * uw
                sinks[i] = mSink[cutlass.min(h0 + a_u // (self.hd // uw), H - 1)]
                if const_expr(self.rd > 0):
                    if a_col >= self.hd - self.rd:
                        for k2 in cutlass.range_constexpr(uw // 2):
                            ang = mAng[p_ang, (a_col - (self.hd - self.rd)) // 2 + k2]
                            cs[4 * i + 2 * k2] = cute.math.cos(ang)
                            cs[4 * i + 2 * k2 + 1] = -cute.math.sin(ang)

        @cute.jit
        def q_norm_rope(self, sQ, mAng, pos, warp, lane):
            """QNormRope of the group's 16 query rows in place in sQ (bf16 pairs): warp w takes rows w, w + 8."""
            bw, vec, slots = self.qn[1:]
            J, per = bw // 32, self.hd // (vec * bw)
            half = (self.hd - self.rd) // 2                       # first word (pair) of the rope dims
            p_ang = cutlass.max(pos, Int32(0))
            for hh in cutlass.range_constexpr(HEAD_TILE // (self.threads // 32)):
                hr = warp + (self.threads // 32) * hh
                part = cute.make_rmem_tensor((J,), Float32)
                for j in cutlass.range_constexpr(J):
                    sq = cute.make_rmem_tensor((per * vec,), Float32)
                    for k in cutlass.range_constexpr(per):
                        for i2 in cutlass.range_constexpr(vec // 2):
                            w = sQ[hr, (lane + 32 * j + k * bw) * (vec // 2) + i2]
                            lo = _bits_f32(w << 16)
                            hi = _bits_f32(w & -65536)
                            sq[k * vec + 2 * i2] = _mul(lo, lo)
                            sq[k * vec + 2 * i2 + 1] = _mul(hi, hi)
                    part[j] = _thread_sum(lambda k, i: sq[k * vec + i], per, vec, slots)
                for step in cutlass.range_constexpr(J.bit_length() - 1):
                    off = J >> (step + 1)
                    for j in cutlass.range_constexpr(off):
                        part[j] = _add(part[j], part[j + off])
                ssum = part[0]
                for o in (1, 2, 4, 8, 16):
                    ssum = _add(ssum, cute.arch.shuffle_sync_bfly(ssum, offset=o))
                rinv = cute.math.rsqrt(_add(_mul(ssum, _recip_f32(self.hd)), _f32(self.qn[0])))
                for u in cutlass.range_constexpr(self.words // 32):
                    wi = lane + 32 * u
                    w = sQ[hr, wi]
                    lo = _mul(_bits_f32(w << 16), rinv).to(BFloat16).to(Float32)
                    hi = _mul(_bits_f32(w & -65536), rinv).to(BFloat16).to(Float32)
                    if wi >= half:
                        a, b = _rotate(lo, hi, mAng[p_ang, cutlass.max(wi - half, 0)], False)
                        lo = a
                        hi = b
                    sQ[hr, wi] = pack_bf16x2(lo, hi)

        @cute.jit
        def qk_dot(self, sQ, sK, j, lane, nt: int = 1):
            """Warp-wide logits of key tiles j, j + 8, .. (nt of them, interleaved: independent mma chains, one read of
            the q fragments for all) x 16 heads: fp32 [tile][(head g | g+8) x (key 2t | 2t+1)], g = lane/4, t = lane%4."""
            row = self.row
            acc = cute.make_rmem_tensor((4 * nt,), Float32)
            acc.fill(0.0)
            q_addr = (sQ.iterator + (lane % 8 + 8 * ((lane // 8) % 2)) * row + 4 * (lane // 16)).toint()
            k_addr = (sK.iterator + (8 * j + lane % 8) * row + 4 * (lane // 8)).toint()
            for k2 in cutlass.range_constexpr(self.hd // 32):
                for h2 in cutlass.range_constexpr(2):
                    kk = 2 * k2 + h2
                    qa = ldsm_x4(q_addr + 32 * kk)
                    for i in cutlass.range_constexpr(nt):
                        bk = ldsm_x4(k_addr + 4 * 8 * 8 * row * i + 64 * k2)     # b0, b1 of kk = 2k2, 2k2 + 1
                        d = mma_bf16_16816(qa[0], qa[1], qa[2], qa[3], bk[2 * h2], bk[2 * h2 + 1],
                                           acc[4 * i], acc[4 * i + 1], acc[4 * i + 2], acc[4 * i + 3])
                        for e in cutlass.range_constexpr(4):
                            acc[4 * i + e] = d[e]
            return acc

        @cute.jit
        def put_logits(self, sL, sSrc, acc, off: int, j, g, t, cnt, scale, pos, W):
            """acc[off..off+3] -> logits bf16(q.k) * scale of key tile j in sL (-inf: past cnt, a masked row or a
            ring slot past pos)."""
            for e in cutlass.range_constexpr(4):
                key = 8 * j + 2 * t + e % 2
                lg = acc[off + e].to(BFloat16).to(Float32) * scale
                if key >= cnt:
                    lg = Float32(-math.inf)
                else:
                    src = sSrc[key]
                    if src < 0:
                        lg = Float32(-math.inf)
                    elif src < W and src > pos:          # a ring slot not written yet (CSA copies skip the check)
                        lg = Float32(-math.inf)
                sL[g + 8 * (e // 2), key] = lg

        @cute.jit
        def qk_all(self, sQ, sK, sL, sSrc, warp, lane, g, t, cnt, cnt16, scale, pos, W):
            """Whole dot products: warp w takes key tiles w, w + 8, .. (interleaved mma chains); tiles past cnt16 are
            only written as -inf."""
            tpw = self.tiles_per_warp
            acc = cute.make_rmem_tensor((4 * tpw,), Float32)
            acc.fill(0.0)
            if const_expr(tpw == 1):
                if warp * 8 < cnt16:
                    dot = self.qk_dot(sQ, sK, warp, lane)
                    for e in cutlass.range_constexpr(4):
                        acc[e] = dot[e]
            else:
                assert tpw == 2
                if (warp + 8) * 8 < cnt16 and warp + 8 < self.key_tiles:
                    dot = self.qk_dot(sQ, sK, warp, lane, 2)
                    for e in cutlass.range_constexpr(8):
                        acc[e] = dot[e]
                elif warp * 8 < cnt16:
                    dot = self.qk_dot(sQ, sK, warp, lane)
                    for e in cutlass.range_constexpr(4):
                        acc[e] = dot[e]
            for i in cutlass.range_constexpr(tpw):
                if warp + 8 * i < self.key_tiles:
                    self.put_logits(sL, sSrc, acc, 4 * i, warp + 8 * i, g, t, cnt, scale, pos, W)

        @cute.kernel
        def kernel(self, mQ: cute.Tensor, mWin: cute.Tensor, mComp: cute.Tensor, mIdx: cute.Tensor,
                   mPos: cute.Tensor, mSink: cute.Tensor, mOut: cute.Tensor, mAng: cute.Tensor,
                   scale: Float32, ratio: Int32):
            tidx, _, _ = cute.arch.thread_idx()
            split, grp, b = cute.arch.block_idx()
            warp = tidx // 32
            lane = tidx % 32
            g = lane // 4
            t = lane % 4
            H = cute.size(mQ, mode=[1])
            W = cute.size(mWin, mode=[1])
            Tc = cute.size(mComp, mode=[1])
            S = self.splits
            h0 = grp * HEAD_TILE
            chunk, row, vec = self.chunk, self.row, self.words // 4
            neg_inf = Float32(-math.inf)

            smem = _SmemAllocator()
            storage = smem.allocate(self.shared_storage)
            sK = storage.sK.get_tensor(cute.make_layout((chunk, row), stride=(row, 1)))
            sO = cute.make_tensor(cute.recast_ptr(sK.iterator, dtype=Float32),
                                  cute.make_layout((HEAD_TILE, self.hd), stride=(self.hd, 1)))
            sQ = storage.sQ.get_tensor(cute.make_layout((HEAD_TILE, row), stride=(row, 1)))
            sL = storage.sL.get_tensor(cute.make_layout((HEAD_TILE, chunk), stride=(chunk, 1)))
            sP = storage.sP.get_tensor(cute.make_layout((HEAD_TILE, self.p_row), stride=(self.p_row, 1)))
            sSrc = storage.sSrc.get_tensor(cute.make_layout(chunk))
            sAlpha = storage.sAlpha.get_tensor(cute.make_layout(HEAD_TILE))
            sML = storage.sML.get_tensor(cute.make_layout((HEAD_TILE, 4), stride=(4, 1)))

            # ---- prologue: nothing here is written by an earlier kernel of the step (pos is set before the replay)
            pos = mPos[0].to(Int32)
            n_win = cutlass.min(pos + 1, W)
            k_picks = cute.size(mIdx, mode=[1])
            # this CTA's list of key positions: window / HCA: the valid keys compacted ([ring slots 0..n_win-1 |
            # blocks 0..]) and dealt evenly; CSA: its share of the ring slots, then its share of the picks
            v_begin = Int32(0)
            w_per = (W + S - 1) // S
            p_per = (k_picks + S - 1) // S
            n_mine = w_per + p_per
            if const_expr(self.mode != "csa"):
                n_keys = n_win
                if const_expr(self.mode == "hca"):
                    n_keys = n_win + cutlass.min((pos + 1) // ratio, Tc)
                per = (n_keys + S - 1) // S
                v_begin = split * per
                n_mine = cutlass.max(cutlass.min(n_keys - v_begin, per), 0)
            # per output unit: the head's sink, (cos, -sin) of the rope columns; before the wait under PDL (hidden
            # behind the previous kernel), else once the key copies are in flight
            sinks = cute.make_rmem_tensor((self.units_per_thread,), Float32)
            cs = cute.make_rmem_tensor((self.units_per_thread * 4,), Float32)
            if const_expr(GLUE_PDL or self.n_ch > 1):
                self.unit_constants(mSink, mAng, sinks, cs, pos, split, tidx, h0, H)
            _pdl_enter()

            # q rows of the head group -> padded smem
            for i in cutlass.range(tidx, HEAD_TILE * vec, self.threads, unroll=1):
                r = i // vec
                c = i % vec
                head = cutlass.min(h0 + r, H - 1)
                gaddr = (mQ.iterator + cute.crd2idx((b, head, 4 * c), mQ.layout)).toint()
                nbytes = Int32(0)
                if h0 + r < H:
                    nbytes = Int32(16)
                cp_async_16((sQ.iterator + r * row + 4 * c).toint(), gaddr, nbytes)
            cute.arch.cp_async_commit_group()
            if const_expr(self.fold_q and self.n_ch > 1):           # q_norm folded, several passes: before the first
                cute.arch.cp_async_wait_group(0)
                cute.arch.sync_threads()
                self.q_norm_rope(sQ, mAng, pos, warp, lane)
                cute.arch.sync_threads()

            hh = tidx // 16                     # softmax: head hh, key pairs part, part + 16, ..
            part = tidx % 16
            m_run = neg_inf
            z_run = Float32(0.0)
            d0 = warp * (self.hd // 8)          # PV: warp's d columns
            sel = Int32(0x5410)
            if g % 2 == 1:
                sel = Int32(0x7632)
            acc2 = cute.make_rmem_tensor((self.d_tiles * 4,), Float32)
            acc2.fill(0.0)
            for ch in cutlass.range(self.n_ch, unroll=1):
                cnt = cutlass.max(cutlass.min(n_mine - ch * chunk, chunk), 0)
                cnt16 = (cnt + 15) // 16 * 16
                if cnt > 0:
                    self.copy_rows(sK, sSrc, mWin, mComp, mIdx, b, split, tidx, ch * chunk, cnt, v_begin, w_per,
                                   k_picks, n_win, W, Tc)
                    if const_expr(not GLUE_PDL and self.n_ch == 1):
                        self.unit_constants(mSink, mAng, sinks, cs, pos, split, tidx, h0, H)
                    if const_expr(self.fold_q and self.n_ch == 1):       # q_norm folded: q (the first group) has
                        cute.arch.cp_async_wait_group(1)             # landed; normalize it while the keys load
                        cute.arch.sync_threads()
                        self.q_norm_rope(sQ, mAng, pos, warp, lane)
                    cute.arch.cp_async_wait_group(0)
                    cute.arch.sync_threads()

                    # logits: warp w -> key tiles w, w + 8, ..: keys 8j + (2t, 2t+1), heads g, g + 8
                    self.qk_all(sQ, sK, sL, sSrc, warp, lane, g, t, cnt, cnt16, scale, pos, W)
                    cute.arch.sync_threads()

                    m_c = neg_inf
                    for i in cutlass.range_constexpr(self.pairs_per_thread):
                        q2 = part + 16 * i
                        if q2 < chunk // 2:
                            m_c = cute.math.max(m_c, cute.math.max(sL[hh, 2 * q2], sL[hh, 2 * q2 + 1]))
                    for o in cutlass.range_constexpr(4):
                        m_c = cute.math.max(m_c, cute.arch.shuffle_sync_bfly(m_c, 1 << o))
                    m_new = cute.math.max(m_run, m_c)
                    m_use = m_new
                    if m_new == neg_inf:
                        m_use = Float32(0.0)
                    alpha = cute.math.exp(m_run - m_use)          # rescales what the earlier chunks summed
                    zc = Float32(0.0)
                    for i in cutlass.range_constexpr(self.pairs_per_thread):
                        q2 = part + 16 * i
                        if q2 < chunk // 2:
                            p0 = cute.math.exp(sL[hh, 2 * q2] - m_use)
                            p1 = cute.math.exp(sL[hh, 2 * q2 + 1] - m_use)
                            zc = zc + p0 + p1
                            sP[hh, q2] = pack_bf16x2(p0, p1)
                    for o in cutlass.range_constexpr(4):
                        zc = zc + cute.arch.shuffle_sync_bfly(zc, 1 << o)
                    z_run = z_run * alpha + zc
                    m_run = m_new
                    if part == 0:
                        sAlpha[hh] = alpha
                    cute.arch.sync_threads()

                    _rescale_rows(acc2, sAlpha[g], sAlpha[g + 8], self.d_tiles)
                    for kk in cutlass.range_constexpr(chunk // 16):
                        if kk * 16 < cnt16:
                            a0 = sP[g, kk * 8 + t]
                            a1 = sP[g + 8, kk * 8 + t]
                            a2 = sP[g, kk * 8 + 4 + t]
                            a3 = sP[g + 8, kk * 8 + 4 + t]
                            k = kk * 16 + 2 * t
                            if const_expr(self.d_tiles % 2 == 0):
                                v_addr = (sK.iterator + (kk * 16 + 8 * ((lane // 8) % 2) + lane % 8) * row
                                          + d0 // 2 + 4 * (lane // 16)).toint()
                                for j2 in cutlass.range_constexpr(self.d_tiles // 2):
                                    bv = ldsm_x4(v_addr + 32 * j2, True)   # b0, b1 of d tiles 2j2, 2j2 + 1
                                    for h2 in cutlass.range_constexpr(2):
                                        j = 2 * j2 + h2
                                        d = mma_bf16_16816(a0, a1, a2, a3, bv[2 * h2], bv[2 * h2 + 1], acc2[4 * j],
                                                           acc2[4 * j + 1], acc2[4 * j + 2], acc2[4 * j + 3])
                                        for e in cutlass.range_constexpr(4):
                                            acc2[4 * j + e] = d[e]
                            else:
                                _pv_mma_words(acc2, a0, a1, a2, a3, sK, k, d0, g, sel, self.d_tiles)
                else:
                    if const_expr(not GLUE_PDL and self.n_ch == 1):
                        self.unit_constants(mSink, mAng, sinks, cs, pos, split, tidx, h0, H)
                cute.arch.sync_threads()                           # sK / sP are reused by the next chunk
            cute.arch.cp_async_wait_group(0)                       # (q's copy, if no chunk had keys)

            # partial (o, m, z) of this CTA -> its own shared memory, then the cluster combines
            _publish_partial(sO, sML, acc2, m_run, z_run, g, t, d0, hh, part, self.d_tiles)
            uw = self.uw
            for i in cutlass.range_constexpr(self.units_per_thread):
                u = split * self.units_per_cta + tidx + self.threads * i
                if u < self.units and u < (split + 1) * self.units_per_cta:
                    u_h = u // (self.hd // uw)
                    u_col = (u % (self.hd // uw)) * uw
                    u_head = h0 + u_h
                    if u_head < H:
                        u_o = cute.make_rmem_tensor((uw,), Float32)
                        u_o.fill(0.0)
                        u_ov = cute.make_rmem_tensor((S * uw,), Float32)      # all S loads in flight at once
                        for s_ in cutlass.range_constexpr(S):
                            vals = load_dsmem_f32x4((sO.iterator + u_h * self.hd + u_col).toint(), Int32(s_))
                            for e in cutlass.range_constexpr(uw):
                                u_ov[uw * s_ + e] = vals[e]
                        # every split's (m, z) of the head, then the weights of this unit
                        u_ml = cute.make_rmem_tensor((S * 2,), Float32)
                        for s_ in cutlass.range_constexpr(S):
                            mz = load_dsmem_f32x4((sML.iterator + u_h * 4).toint(), Int32(s_))
                            u_ml[2 * s_] = mz[0]
                            u_ml[2 * s_ + 1] = mz[1]
                        u_sink = sinks[i]
                        M = u_sink
                        for s_ in cutlass.range_constexpr(S):
                            M = cute.math.max(M, u_ml[2 * s_])
                        Z = cute.math.exp(u_sink - M)
                        for s_ in cutlass.range_constexpr(S):
                            u_w = cute.math.exp(u_ml[2 * s_] - M)              # 0 for an empty split
                            Z = Z + u_ml[2 * s_ + 1] * u_w
                            if u_w > 0.0:
                                for e in cutlass.range_constexpr(uw):
                                    u_o[e] = u_o[e] + u_w * u_ov[uw * s_ + e]
                        u_inv = 1.0 / Z
                        u_ob = cute.make_rmem_tensor((uw,), Float32)
                        for e in cutlass.range_constexpr(uw):
                            u_ob[e] = (u_o[e] * u_inv).to(BFloat16).to(Float32)       # the bf16 output value
                        if const_expr(self.rd > 0):
                            if u_col >= self.hd - self.rd:                       # inverse RoPE of the bf16 values
                                for k2 in cutlass.range_constexpr(uw // 2):
                                    c_ = cs[4 * i + 2 * k2]
                                    s_n = cs[4 * i + 2 * k2 + 1]
                                    x0 = u_ob[2 * k2]
                                    x1 = u_ob[2 * k2 + 1]
                                    u_ob[2 * k2] = _sub(_mul(x0, c_), _mul(x1, s_n))
                                    u_ob[2 * k2 + 1] = _add(_mul(x0, s_n), _mul(x1, c_))
                        gaddr = (mOut.iterator + cute.crd2idx((b, u_head, u_col), mOut.layout)).toint()
                        store_b32x2(gaddr, pack_bf16x2(u_ob[0], u_ob[1]), pack_bf16x2(u_ob[2], u_ob[3]))
            cute.arch.cluster_arrive_relaxed()                     # peers may still read this CTA's partial (their
            cute.arch.cluster_wait()                               # reads are done when they arrive: no release)

    class IndexerScores:
        """keys_out[b, t] = score_key(sum_h relu(q[b,h]·K[b,t]) * w[b,h], t) for t < (pos+1)//ratio, else INT64_MIN
        (decodes to -1). Grid (ceil(T/chunk), B), 256 threads: q [h,d] and the chunk's keys -> padded smem by
        cp.async; warp w: keys w*chunk/8.. x all heads by mma.sync (fp32 accumulate); relu, x w_h, sum over heads
        in a fixed order (own 2*h/16 rows, then a butterfly over the 8 row lanes). w_bf16: w is the bf16
        weights_proj output and the kernel forms w_h = fp32(w) * w_scale itself (dsv4's .float() * scale)."""

        def __init__(self, n_heads: int, head_dim: int, chunk: int = INDEX_CHUNK, w_bf16: bool = False):
            assert n_heads % 16 == 0 and head_dim % 64 == 0 and chunk % 64 == 0
            self.nh, self.hd, self.chunk, self.w_bf16 = n_heads, head_dim, chunk, w_bf16
            self.words = head_dim // 2
            self.row = self.words + 4
            self.threads = 256
            self.key_tiles = chunk // 64
            self.m_tiles = n_heads // 16

        @cute.jit
        def __call__(self, mQ: cute.Tensor, mK: cute.Tensor, mW: cute.Tensor, mPos: cute.Tensor, mOut: cute.Tensor,
                     ratio: Int32, w_scale: Float32, stream):
            B = cute.size(mK, mode=[0])
            T = cute.size(mK, mode=[1])

            @cute.struct
            class SharedStorage:
                sK: cute.struct.Align[cute.struct.MemRange[Int32, self.chunk * self.row], 16]
                sQ: cute.struct.Align[cute.struct.MemRange[Int32, self.nh * self.row], 16]

            self.shared_storage = SharedStorage
            self.kernel(mQ, mK, mW, mPos, mOut, ratio, w_scale).launch(
                grid=[(T + self.chunk - 1) // self.chunk, B, 1], block=[self.threads, 1, 1], stream=stream, use_pdl=GLUE_PDL)

        @cute.kernel
        def kernel(self, mQ: cute.Tensor, mK: cute.Tensor, mW: cute.Tensor, mPos: cute.Tensor, mOut: cute.Tensor,
                   ratio: Int32, w_scale: Float32):
            _pdl_enter()
            tidx, _, _ = cute.arch.thread_idx()
            blk, b, _ = cute.arch.block_idx()
            T = cute.size(mK, mode=[1])
            chunk = self.chunk
            t0 = blk * chunk
            visible = (mPos[0].to(Int32) + 1) // ratio
            if t0 >= visible:                       # all future blocks: below every real score, decode to -1
                for r in cutlass.range(tidx, chunk, self.threads, unroll=1):
                    if t0 + r < T:
                        mOut[b, t0 + r] = Int64(-(2 ** 63))
            else:
                smem = _SmemAllocator()
                storage = smem.allocate(self.shared_storage)
                self.score_chunk(mQ, mK, mW, mOut, storage, b, t0, visible, w_scale)

        @cute.jit
        def issue_keys(self, mK: cute.Tensor, sK: cute.Tensor, b: Int32, t0: Int32, visible: Int32):
            """The chunk's keys -> sK (padded rows) by cp.async (zero-filled past the visible ones), not committed."""
            tidx, _, _ = cute.arch.thread_idx()
            T = cute.size(mK, mode=[1])
            chunk, row, vec = self.chunk, self.row, self.words // 4
            for i in cutlass.range(tidx, chunk * vec, self.threads, unroll=4):
                r = i // vec
                c = i % vec
                nbytes = Int32(0)
                if t0 + r < visible:
                    nbytes = Int32(16)
                gaddr = (mK.iterator + cute.crd2idx((b, cutlass.min(t0 + r, T - 1), 4 * c), mK.layout)).toint()
                cp_async_16((sK.iterator + r * row + 4 * c).toint(), gaddr, nbytes)

        @cute.jit
        def score_chunk(self, mQ: cute.Tensor, mK: cute.Tensor, mW: cute.Tensor, mOut: cute.Tensor, storage,
                        b: Int32, t0: Int32, visible: Int32, w_scale: Float32, sOut=None, q_ready: bool = False,
                        keys_issued: bool = False):
            """keys_out[b, t0 .. t0+chunk) of one CTA (some of them visible): q and the keys -> smem, mma.sync, relu,
            head weights, head sum, sort keys (sOut: into this smem [chunk] instead of mOut; q_ready: q is in smem
            already, mQ unused; keys_issued: issue_keys ran already, its copies not yet committed)."""
            tidx, _, _ = cute.arch.thread_idx()
            warp = tidx // 32
            lane = tidx % 32
            g = lane // 4
            t = lane % 4
            T = cute.size(mK, mode=[1])
            chunk, row, vec = self.chunk, self.row, self.words // 4
            sK = storage.sK.get_tensor(cute.make_layout((chunk, row), stride=(row, 1)))
            sQ = storage.sQ.get_tensor(cute.make_layout((self.nh, row), stride=(row, 1)))
            if const_expr(not q_ready):
                for i in cutlass.range(tidx, self.nh * vec, self.threads, unroll=4):
                    r = i // vec
                    c = i % vec
                    gaddr = (mQ.iterator + cute.crd2idx((b, r, 4 * c), mQ.layout)).toint()
                    cp_async_16((sQ.iterator + r * row + 4 * c).toint(), gaddr, 16)
            if const_expr(not keys_issued):
                self.issue_keys(mK, sK, b, t0, visible)
            # head weights of this thread's rows: g + 8*e2 + 16*mt
            wv = cute.make_rmem_tensor((self.m_tiles * 2,), Float32)
            for mt in cutlass.range_constexpr(self.m_tiles):
                for e2 in cutlass.range_constexpr(2):
                    if const_expr(self.w_bf16):
                        wv[2 * mt + e2] = mW[b, 16 * mt + 8 * e2 + g].to(Float32) * w_scale
                    else:
                        wv[2 * mt + e2] = mW[b, 16 * mt + 8 * e2 + g]
            cute.arch.cp_async_commit_group()
            cute.arch.cp_async_wait_group(0)
            cute.arch.sync_threads()

            key0 = warp * (chunk // 8)
            acc = cute.make_rmem_tensor((self.m_tiles * self.key_tiles * 4,), Float32)
            acc.fill(0.0)
            for kk in cutlass.range_constexpr(self.hd // 16):
                for j in cutlass.range_constexpr(self.key_tiles):
                    n = key0 + 8 * j + g
                    b0 = sK[n, kk * 8 + t]
                    b1 = sK[n, kk * 8 + 4 + t]
                    for mt in cutlass.range_constexpr(self.m_tiles):
                        a = 4 * (mt * self.key_tiles + j)
                        d = mma_bf16_16816(sQ[16 * mt + g, kk * 8 + t], sQ[16 * mt + g + 8, kk * 8 + t],
                                           sQ[16 * mt + g, kk * 8 + 4 + t], sQ[16 * mt + g + 8, kk * 8 + 4 + t],
                                           b0, b1, acc[a], acc[a + 1], acc[a + 2], acc[a + 3])
                        for e in cutlass.range_constexpr(4):
                            acc[a + e] = d[e]
            for j in cutlass.range_constexpr(self.key_tiles):
                for e1 in cutlass.range_constexpr(2):          # key 2t + e1 of tile j
                    s = Float32(0.0)
                    for mt in cutlass.range_constexpr(self.m_tiles):
                        for e2 in cutlass.range_constexpr(2):  # row g + 8*e2
                            v = acc[4 * (mt * self.key_tiles + j) + 2 * e2 + e1]
                            s = s + cute.math.max(v, Float32(0.0)) * wv[2 * mt + e2]
                    for o in cutlass.range_constexpr(3):
                        s = s + cute.arch.shuffle_sync_bfly(s, 4 << o)
                    key = t0 + key0 + 8 * j + 2 * t + e1
                    if g == 0 and key < T:
                        kv = Int64(-(2 ** 63))
                        if key < visible:
                            kv = score_key(s, key)
                        if const_expr(sOut is None):
                            mOut[b, key] = kv
                        else:
                            sOut[key - t0] = kv


    @dsl_user_op
    def load_dsmem_i64(local_addr, rank, *, loc=None, ip=None) -> Int64:
        """int64 at this shared-memory address in the cluster CTA `rank` (distributed shared memory)."""
        return Int64(_llvm.inline_asm(_T.i64(), [Int32(local_addr).ir_value(loc=loc, ip=ip),
                                                 Int32(rank).ir_value(loc=loc, ip=ip)],
                                      "{\n.reg .b32 ra;\nmapa.shared::cluster.u32 ra, $1, $2;\n"
                                      "ld.shared::cluster.u64 $0, [ra];\n}", "=l,r,r", has_side_effects=True,
                                      loc=loc, ip=ip))

    class IndexerTopK(IndexerScores):
        """IndexerScores + the top-k in one launch: out[b, 0, :] = block ids of the k largest sort keys of row b in
        descending key order, i.e. exactly TopKSelect's / torch.topk's output, where V = min((pos+1)//ratio, T) <=
        max_slots (else only the keys, for TopKSelectVisible). Only the visible keys need ordering (the future ones
        are all INT64_MIN = -1 and sort last), so only the CTAs holding visible keys run: each writes its keys to the
        scratch row keys[b] (global, L2), then takes an arrival ticket (counter[b]); the last one to arrive (no
        co-residency assumption) loads the V keys into smem and orders them: V <= rank_max (<= 256 threads): each
        thread ranks one key against all V (keys are unique: rank = number of larger keys = its output slot); else a
        bitonic sort of the V keys padded with INT64_MIN to the next power of two P (log2(P)(log2(P)+1)/2 smem
        stages). Slots past min(V, P) get -1. V = 0: k times -1; V <= k (all_below): no scores, every
        complete block is a pick: 0 .. V-1 in ascending order, then -1. cluster > 0 (T <= cluster x chunk): see
        cluster_select."""

        def __init__(self, n_heads: int, head_dim: int, chunk: int, w_bf16: bool, max_slots: int, cluster: int = 0,
                     all_below: bool = False):
            super().__init__(n_heads, head_dim, chunk, w_bf16)
            assert max_slots & (max_slots - 1) == 0
            self.max_slots, self.cluster = max_slots, cluster
            self.all_below = all_below          # V <= k: no scores (indexer_topk_decode: INDEX_ALL_BELOW_TOPK)
            if cluster:                  # 2 threads rank each key of a CTA; all cluster keys fit the smem slots
                assert cluster <= 8 and 2 * chunk == self.threads and cluster * chunk <= max_slots

        @cute.jit
        def __call__(self, mQ: cute.Tensor, mK: cute.Tensor, mW: cute.Tensor, mPos: cute.Tensor, mKeys: cute.Tensor,
                     mOut: cute.Tensor, mCount: cute.Tensor, ratio: Int32, w_scale: Float32, rank_max: Int32, stream):
            B = cute.size(mK, mode=[0])
            T = cute.size(mK, mode=[1])

            @cute.struct
            class SharedStorage:
                sK: cute.struct.Align[cute.struct.MemRange[Int32, self.chunk * self.row], 16]
                sQ: cute.struct.Align[cute.struct.MemRange[Int32, self.nh * self.row], 16]
                sSel: cute.struct.Align[cute.struct.MemRange[Int64, self.max_slots], 16]
                sMine: cute.struct.Align[cute.struct.MemRange[Int64, self.chunk], 16]
                flag: cute.struct.MemRange[Int32, 4]

            self.shared_storage = SharedStorage
            if const_expr(self.cluster > 0):                            # T <= cluster x chunk
                self.kernel(mQ, mK, mW, mPos, mKeys, mOut, mCount, ratio, w_scale, rank_max).launch(
                    grid=[self.cluster, B, 1], block=[self.threads, 1, 1], cluster=[self.cluster, 1, 1],
                    stream=stream, use_pdl=GLUE_PDL)
            else:
                self.kernel(mQ, mK, mW, mPos, mKeys, mOut, mCount, ratio, w_scale, rank_max).launch(
                    grid=[(T + self.chunk - 1) // self.chunk, B, 1], block=[self.threads, 1, 1], stream=stream,
                    use_pdl=GLUE_PDL)

        @cute.kernel
        def kernel(self, mQ: cute.Tensor, mK: cute.Tensor, mW: cute.Tensor, mPos: cute.Tensor, mKeys: cute.Tensor,
                   mOut: cute.Tensor, mCount: cute.Tensor, ratio: Int32, w_scale: Float32, rank_max: Int32):
            _pdl_enter()
            tidx, _, _ = cute.arch.thread_idx()
            blk, b, _ = cute.arch.block_idx()
            T = cute.size(mK, mode=[1])
            k = cute.size(mOut, mode=[2])
            nth = self.threads
            visible = cutlass.min((mPos[0].to(Int32) + 1) // ratio, T)
            n_vis = (visible + self.chunk - 1) // self.chunk            # CTAs holding visible keys
            t0 = blk * self.chunk
            if self.picks_all(visible, k):
                self.write_all_visible(mOut, b, blk, visible)
            elif const_expr(self.cluster > 0):                          # one cluster holds all T keys
                self.cluster_select(mQ, mK, mW, mOut, b, blk, t0, visible, w_scale)
            elif blk < n_vis:
                smem = _SmemAllocator()
                storage = smem.allocate(self.shared_storage)
                flag = storage.flag.get_tensor(cute.make_layout(4))
                sSel = storage.sSel.get_tensor(cute.make_layout(self.max_slots))
                self.score_chunk(mQ, mK, mW, mKeys, storage, b, t0, visible, w_scale)
                if visible <= self.max_slots:                           # else TopKSelectVisible selects
                    cute.arch.fence_acq_rel_gpu()
                    cute.arch.sync_threads()
                    if tidx == 0:
                        flag[0] = cute.arch.atomic_add(mCount.iterator + b, Int32(1), sem="acq_rel", scope="gpu")
                    cute.arch.sync_threads()
                    if flag[0] == n_vis - 1:                            # last CTA of row b: all V keys written
                        cute.arch.fence_acq_rel_gpu()
                        if tidx == 0:
                            mCount[b] = 0                               # zero again for the next launch
                        self.select_visible(mKeys, mOut, sSel, b, visible, rank_max)

        @cute.jit
        def picks_all(self, visible: Int32, k: Int32):
            """No scores needed: no block is complete (V = 0), or (all_below) every complete block is a
            pick (V <= k, i.e. the first index_topk x ratio tokens of a sequence)."""
            if const_expr(self.all_below):
                return visible <= k
            return visible == 0

        @cute.jit
        def write_all_visible(self, mOut: cute.Tensor, b: Int32, blk: Int32, visible: Int32):
            """out[b, 0, :] = 0, 1, .., V - 1, then -1: every complete block in ascending order (V <= k; no scores)."""
            tidx, _, _ = cute.arch.thread_idx()
            n_blk, _, _ = cute.arch.grid_dim()
            for i in cutlass.range(blk * self.threads + tidx, cute.size(mOut, mode=[2]), n_blk * self.threads,
                                   unroll=1):
                v = Int64(-1)
                if i < visible:
                    v = Int64(i)
                mOut[b, 0, i] = v

        @cute.jit
        def count_larger(self, sSel: cute.Tensor, mine: Int64, start: Int32, stop: Int32, step: int) -> Int32:
            """Number of keys sSel[j] > mine for j = start, start + step, .. < stop: 8 loads in flight per step of
            the loop (a plain loop waits one smem latency per key)."""
            n = (stop - start + step - 1) // step
            n8 = n // 8 * 8
            cnt = Int32(0)
            for m in cutlass.range(0, n8, 8, unroll=1):
                vals = [sSel[start + (m + u) * step] for u in range(8)]
                for u in cutlass.range_constexpr(8):
                    if vals[u] > mine:
                        cnt = cnt + 1
            for m in cutlass.range(n8, n, unroll=1):
                if sSel[start + m * step] > mine:
                    cnt = cnt + 1
            return cnt

        @cute.jit
        def cluster_select(self, mQ: cute.Tensor, mK: cute.Tensor, mW: cute.Tensor, mOut: cute.Tensor, b: Int32,
                           blk: Int32, t0: Int32, visible: Int32, w_scale: Float32, query=None,
                           keys_issued: bool = False, storage=None):
            """Cluster mode (T <= cluster x chunk): CTA blk (its rank in the cluster) scores its keys into its smem;
            after a cluster barrier every CTA holding visible keys copies the V keys from its peers (DSMEM) and ranks
            its own keys against all of them (2 threads per key), writing each to its output slot; then the -1 tail.
            query = (mIq, mAng, mPos): the queries are made here first (IndexerTopKQuery.make_query); keys_issued:
            the key copies of CTAs holding visible keys went out already (issue_keys) into `storage` (the caller's
            smem allocation: every allocate() call takes a region of its own)."""
            tidx, _, _ = cute.arch.thread_idx()
            k = cute.size(mOut, mode=[2])
            nth = self.threads
            if const_expr(storage is None):
                smem = _SmemAllocator()
                storage = smem.allocate(self.shared_storage)
            sSel = storage.sSel.get_tensor(cute.make_layout(self.max_slots))
            sMine = storage.sMine.get_tensor(cute.make_layout(self.chunk))
            if const_expr(query is not None):
                self.make_query(storage, query[0], query[1], query[2], b, blk)
            if t0 < visible:
                self.score_chunk(mQ, mK, mW, mOut, storage, b, t0, visible, w_scale, sOut=sMine,
                                 q_ready=query is not None, keys_issued=keys_issued)
            cute.arch.cluster_arrive()                                  # keys in smem -> visible to the peers
            cute.arch.cluster_wait()
            if t0 < visible:
                mine_addr = sMine.iterator.toint()
                per = (self.cluster * self.chunk + nth - 1) // nth
                ld = cute.make_rmem_tensor((per,), Int64)
                for r in cutlass.range_constexpr(per):                  # all loads in flight
                    i = tidx + r * nth
                    if i < visible:
                        ld[r] = load_dsmem_i64(mine_addr + (i % self.chunk) * 8, i // self.chunk)
                for r in cutlass.range_constexpr(per):
                    if tidx + r * nth < visible:
                        sSel[tidx + r * nth] = ld[r]
                cute.arch.sync_threads()
                e = t0 + tidx // 2                                      # this thread's key; j of parity tidx % 2
                mine = Int64(-(2 ** 63))
                if e < visible:
                    mine = sSel[e]
                rank = self.count_larger(sSel, mine, tidx % 2, visible, 2)
                rank = rank + cute.arch.shuffle_sync_bfly(rank, 1)
                if e < visible and tidx % 2 == 0 and rank < k:
                    mOut[b, 0, rank] = sort_key_block(mine)
            for i in cutlass.range(cutlass.min(visible, k) + blk * nth + tidx, k, self.cluster * nth, unroll=1):
                mOut[b, 0, i] = Int64(-1)
            cute.arch.cluster_arrive()                                  # peers keep their smem until it is read
            cute.arch.cluster_wait()

        @cute.jit
        def select_visible(self, mKeys: cute.Tensor, mOut: cute.Tensor, sSel: cute.Tensor, b: Int32, visible: Int32,
                           rank_max: Int32):
            """out[b, 0, :] from the V = visible keys of row b (in global memory, written by this launch's CTAs)."""
            tidx, _, _ = cute.arch.thread_idx()
            k = cute.size(mOut, mode=[2])
            nth = self.threads
            int64_min = Int64(-(2 ** 63))
            P = Int32(1)
            while P < visible:
                P = P * 2
            per = (self.max_slots + nth - 1) // nth                 # keys per thread (static: all loads in flight)
            ld = cute.make_rmem_tensor((per,), Int64)
            for r in cutlass.range_constexpr(per):
                ld[r] = int64_min
                if tidx + r * nth < visible:
                    ld[r] = cute.arch.load(mKeys.iterator + cute.crd2idx((b, tidx + r * nth), mKeys.layout), Int64,
                                           cop="cg")
            for r in cutlass.range_constexpr(per):
                if tidx + r * nth < P:
                    sSel[tidx + r * nth] = ld[r]
            cute.arch.sync_threads()
            n_out = cutlass.min(visible, k)
            if visible <= cutlass.min(rank_max, nth):
                if tidx < visible:                      # rank = number of larger keys = out slot
                    mine = sSel[tidx]
                    rank = self.count_larger(sSel, mine, Int32(0), visible, 1)
                    if rank < k:
                        mOut[b, 0, rank] = sort_key_block(mine)
            else:
                # bitonic sort, descending: stage (size, stride) orders pairs (lo, lo + stride), lo's bit `stride`
                # clear; runs of `size` alternate descending / ascending, the last one (size P) descending
                # (each thread: its pairs' loads first, then the compare-exchanges: one smem latency per stage)
                pairs = cutlass.max(self.max_slots // (2 * nth), 1)
                ra = cute.make_rmem_tensor((pairs,), Int64)
                rc = cute.make_rmem_tensor((pairs,), Int64)
                half = P // 2
                size = Int32(2)
                while size <= P:
                    stride = size // 2
                    while stride > 0:
                        for r in cutlass.range_constexpr(pairs):
                            i = tidx + r * nth
                            if i < half:
                                lo = 2 * i - (i & (stride - 1))
                                ra[r] = sSel[lo]
                                rc[r] = sSel[lo + stride]
                        for r in cutlass.range_constexpr(pairs):
                            i = tidx + r * nth
                            if i < half:
                                lo = 2 * i - (i & (stride - 1))
                                a = ra[r]
                                c = rc[r]
                                swap = a > c                    # ascending run: the larger one moves up
                                if (lo & size) == 0:
                                    swap = a < c                # descending run
                                if swap:
                                    sSel[lo] = c
                                    sSel[lo + stride] = a
                        cute.arch.sync_threads()
                        stride = stride // 2
                    size = size * 2
                for i in cutlass.range(tidx, n_out, nth, unroll=1):
                    mOut[b, 0, i] = sort_key_block(sSel[i])
            for i in cutlass.range(n_out + tidx, k, nth, unroll=1):
                mOut[b, 0, i] = Int64(-1)

    @dsl_user_op
    def _st_shared_i64(smem_addr, v, *, loc=None, ip=None):
        _llvm.inline_asm(None, [Int32(smem_addr).ir_value(loc=loc, ip=ip), Int64(v).ir_value(loc=loc, ip=ip)],
                         "st.shared.b64 [$0], $1;", "r,l", has_side_effects=True, loc=loc, ip=ip)

    class IndexerTopKQuery(IndexerTopK):
        """IndexerTopK in cluster mode with the Indexer's queries made in the same launch (INDEX_FOLD_QUERY: one
        launch less on the CSA critical path, IndexQuery's): mIq = iwq_b's raw output [B * nh, hd] bf16. CTA r of the
        cluster makes head rows r*R .. (r+1)*R - 1 (R = ceil(nh / cluster); one warp per row, IndexQuery.transform:
        the same ops, so the same bits) as bf16 pairs in its own sQ, and after a cluster barrier loads the other
        rows from the CTAs that made them (DSMEM). Then IndexerTopK's cluster path on q in smem. It always scores
        (all_below off: see INDEX_ALL_BELOW_TOPK)."""

        def __init__(self, n_heads: int, head_dim: int, chunk: int, w_bf16: bool, max_slots: int, cluster: int,
                     rope_dim: int, quant_sim: bool, hadamard_mode: str):
            super().__init__(n_heads, head_dim, chunk, w_bf16, max_slots, cluster)
            assert cluster > 0
            self.qrow = IndexQuery(head_dim, rope_dim, quant_sim, True, hadamard_mode, warps=self.threads // 32)
            assert self.qrow.vecs == 1 and self.qrow.width == 4, "one 4-wide chunk per lane (head_dim 128)"
            self.rows_per = -(-n_heads // cluster)

        @cute.jit
        def __call__(self, mIq: cute.Tensor, mAng: cute.Tensor, mK: cute.Tensor, mW: cute.Tensor, mPos: cute.Tensor,
                     mKeys: cute.Tensor, mOut: cute.Tensor, mCount: cute.Tensor, ratio: Int32, w_scale: Float32,
                     rank_max: Int32, stream):
            B = cute.size(mK, mode=[0])

            @cute.struct
            class SharedStorage:
                sK: cute.struct.Align[cute.struct.MemRange[Int32, self.chunk * self.row], 16]
                sQ: cute.struct.Align[cute.struct.MemRange[Int32, self.nh * self.row], 16]
                sSel: cute.struct.Align[cute.struct.MemRange[Int64, self.max_slots], 16]
                sMine: cute.struct.Align[cute.struct.MemRange[Int64, self.chunk], 16]
                flag: cute.struct.MemRange[Int32, 4]
                sRow: cute.struct.Align[cute.struct.MemRange[Float32, self.hd * (self.threads // 32)], 16]

            self.shared_storage = SharedStorage
            self.kernel(mIq, mAng, mK, mW, mPos, mKeys, mOut, mCount, ratio, w_scale, rank_max).launch(
                grid=[self.cluster, B, 1], block=[self.threads, 1, 1], cluster=[self.cluster, 1, 1],
                stream=stream, use_pdl=GLUE_PDL)

        @cute.kernel
        def kernel(self, mIq: cute.Tensor, mAng: cute.Tensor, mK: cute.Tensor, mW: cute.Tensor, mPos: cute.Tensor,
                   mKeys: cute.Tensor, mOut: cute.Tensor, mCount: cute.Tensor, ratio: Int32, w_scale: Float32,
                   rank_max: Int32):
            tidx, _, _ = cute.arch.thread_idx()
            blk, b, _ = cute.arch.block_idx()
            T = cute.size(mK, mode=[1])
            k = cute.size(mOut, mode=[2])
            visible = cutlass.min((mPos[0].to(Int32) + 1) // ratio, T)
            t0 = blk * self.chunk
            storage = _SmemAllocator().allocate(self.shared_storage)              # once: see cluster_select
            sK = storage.sK.get_tensor(cute.make_layout((self.chunk, self.row), stride=(self.row, 1)))
            _pdl_enter()                                                # iq: the GEMV before this launch
            if self.picks_all(visible, k):                              # the same for every CTA of the cluster
                self.write_all_visible(mOut, b, blk, visible)
            else:
                if t0 < visible:                                        # in flight while the queries are made
                    self.issue_keys(mK, sK, b, t0, visible)
                self.cluster_select(None, mK, mW, mOut, b, blk, t0, visible, w_scale, query=(mIq, mAng, mPos),
                                    keys_issued=True, storage=storage)

        @cute.jit
        def make_query(self, storage, mIq: cute.Tensor, mAng: cute.Tensor, mPos: cute.Tensor, b: Int32, blk: Int32):
            """sQ [nh, row] (bf16 pairs) <- the queries of row b: own rows made here, the rest from the peers."""
            tidx, _, _ = cute.arch.thread_idx()
            warp = tidx // 32
            lane = tidx % 32
            warps = self.threads // 32
            row = self.row
            sQ = storage.sQ.get_tensor(cute.make_layout((self.nh, row), stride=(row, 1)))
            srow = storage.sRow.get_tensor(cute.make_layout((self.hd, warps)))
            p = _ang_index(mPos, True, 0)
            r0 = blk * self.rows_per
            r_end = cutlass.min(r0 + self.rows_per, self.nh)
            for it in cutlass.range_constexpr(-(-self.rows_per // warps)):   # static (a runtime loop spills here)
                r = r0 + warp + it * warps
                if r < r_end:
                    xf = self.qrow.load_row(mIq, b * self.nh + r, lane)
                    self.qrow.transform(xf, mAng, p, lane, srow, warp)
                    sQ[r, 2 * lane] = pack_bf16x2(xf[0, 0], xf[0, 1])
                    sQ[r, 2 * lane + 1] = pack_bf16x2(xf[0, 2], xf[0, 3])
                cute.arch.sync_warp()                                   # srow is rewritten by the next row
            cute.arch.cluster_arrive()                                  # own rows -> visible to the peers
            cute.arch.cluster_wait()
            pairs = self.words // 2                                     # 8-byte units per row
            per = (self.nh * pairs + self.threads - 1) // self.threads
            ld = cute.make_rmem_tensor((per,), Int64)
            base = sQ.iterator.toint()
            for u in cutlass.range_constexpr(per):                      # all loads in flight
                i = tidx + u * self.threads
                r = i // pairs
                if i < self.nh * pairs and r // self.rows_per != blk:
                    ld[u] = load_dsmem_i64(base + (r * row + 2 * (i % pairs)) * 4, r // self.rows_per)
            for u in cutlass.range_constexpr(per):
                i = tidx + u * self.threads
                r = i // pairs
                if i < self.nh * pairs and r // self.rows_per != blk:
                    _st_shared_i64(base + (r * row + 2 * (i % pairs)) * 4, ld[u])
            cute.arch.sync_threads()

    @dsl_user_op
    def match_any(v, *, loc=None, ip=None) -> Int32:
        """Mask of the warp's lanes holding the same 32-bit value (all lanes must execute it)."""
        return Int32(_llvm.inline_asm(_T.i32(), [Int32(v).ir_value(loc=loc, ip=ip)],
                                      "match.any.sync.b32 $0, $1, 0xffffffff;", "=r,r", has_side_effects=True,
                                      loc=loc, ip=ip))

    @dsl_user_op
    def sort_key_block(key, *, loc=None, ip=None) -> Int64:
        """int64 sort key -> block id (the low word of ~key, sign-extended: -1 for a future block)."""
        return Int64(_llvm.inline_asm(_T.i64(), [Int64(key).ir_value(loc=loc, ip=ip)],
                                      "{\n.reg .b64 n;\n.reg .b32 lo;\nnot.b64 n, $1;\ncvt.u32.u64 lo, n;\n"
                                      "cvt.s64.s32 $0, lo;\n}", "=l,l", has_side_effects=False, loc=loc, ip=ip))

    class TopKSelect:
        """The radix select of TopKSelectVisible (its launcher; session 5's two-launch path IndexerScores + a
        TopKSelect launch of its own was removed in session 11): out[b, 0, :] = block ids of the k largest int64 sort keys of row b, in descending key order (the keys are
        unique except INT64_MIN = future block, which decodes to -1). One CTA of 1024 threads per row, keys in
        registers (keys_per_thread static). Radix select, 8 bits per pass from the top (flipped sign bit =
        unsigned order): a shared 256-bin histogram of the keys matching the prefix so far (match.any: one atomic
        per distinct bin per warp), a one-warp scan from the top bin picks the digit; after 8 passes the k-th largest
        key K* is known. Keys > K* (fewer than k, unique) are compacted by a block scan and placed by rank (count
        of larger ones); the remaining slots take K*."""

        def __init__(self, keys_per_thread: int, max_k: int = 1024):
            self.n, self.max_k, self.threads = keys_per_thread, max_k, 1024

        @cute.jit
        def select(self, mKeys: cute.Tensor, mOut: cute.Tensor, b: Int32, T: Int32):
            """The top-k of row b's keys 0..T-1 (the rest of the 1024 x keys_per_thread slots count as INT64_MIN)."""
            tidx, _, _ = cute.arch.thread_idx()
            warp = tidx // 32
            lane = tidx % 32
            k = cute.size(mOut, mode=[2])
            smem = _SmemAllocator()
            storage = smem.allocate(self.shared_storage)
            sel = storage.sel.get_tensor(cute.make_layout(self.max_k))
            hist = storage.hist.get_tensor(cute.make_layout(256))
            warp_sum = storage.warp_sum.get_tensor(cute.make_layout(32))
            ctrl = storage.ctrl.get_tensor(cute.make_layout(4))
            int64_min = Int64(-(2 ** 63))

            u = cute.make_rmem_tensor((self.n,), Int64)          # keys with the sign bit flipped (unsigned order)
            for i in cutlass.range_constexpr(self.n):
                t = i * self.threads + tidx
                key = int64_min
                if t < T:
                    key = mKeys[b, t]
                u[i] = key ^ int64_min
            prefix = Int64(0)
            remaining = k.to(Int64)
            for p in cutlass.range_constexpr(8):
                shift = 56 - 8 * p
                if tidx < 256:
                    hist[tidx] = 0
                cute.arch.sync_threads()
                for i in cutlass.range_constexpr(self.n):
                    d = ((u[i] >> shift) & 0xFF).to(Int32)
                    if const_expr(p > 0):
                        if (u[i] >> (shift + 8)) != (prefix >> (shift + 8)):
                            d = Int32(256)                        # not under the prefix: counted nowhere
                    if const_expr(p > 0):
                        if cute.arch.vote_any_sync(d < 256):      # (most warps have no key under the prefix)
                            peers = match_any(d)
                            if d < 256 and (peers & ((Int32(1) << lane) - 1)) == 0:
                                cute.arch.atomic_add(hist.iterator + d, cute.arch.popc(peers), scope="cta")
                    else:
                        peers = match_any(d)
                        if d < 256 and (peers & ((Int32(1) << lane) - 1)) == 0:     # lowest lane of its bin
                            cute.arch.atomic_add(hist.iterator + d, cute.arch.popc(peers), scope="cta")
                cute.arch.sync_threads()
                if warp == 0:                                     # lane l: bins 255-8l .. 248-8l, top first
                    hs = cute.make_rmem_tensor((8,), Int32)
                    tot = Int32(0)
                    for j in cutlass.range_constexpr(8):
                        hs[j] = hist[255 - 8 * lane - j]
                        tot = tot + hs[j]
                    incl = tot
                    for o in cutlass.range_constexpr(5):
                        up = cute.arch.shuffle_sync_up(incl, 1 << o)
                        if lane >= (1 << o):
                            incl = incl + up
                    above = (incl - tot).to(Int64)               # keys under the prefix in higher bins
                    if above < remaining and remaining <= incl.to(Int64):
                        run = above
                        found = Int32(0)
                        for j in cutlass.range_constexpr(8):
                            if found == 0:
                                if run + hs[j].to(Int64) >= remaining:
                                    ctrl[0] = prefix | (Int64(255 - 8 * lane - j) << shift)
                                    ctrl[1] = remaining - run
                                    found = Int32(1)
                                else:
                                    run = run + hs[j].to(Int64)
                cute.arch.sync_threads()
                prefix = ctrl[0]
                remaining = ctrl[1]
                cute.arch.sync_threads()
            kth = prefix ^ int64_min                               # the k-th largest key (signed)

            # keys > K*: block-wide exclusive scan of per-thread counts, then compaction into sel[]
            cnt = Int32(0)
            for i in cutlass.range_constexpr(self.n):
                if (u[i] ^ int64_min) > kth:
                    cnt = cnt + 1
            incl = cnt
            for o in cutlass.range_constexpr(5):
                up = cute.arch.shuffle_sync_up(incl, 1 << o)
                if lane >= (1 << o):
                    incl = incl + up
            if lane == 31:
                warp_sum[warp] = incl
            cute.arch.sync_threads()
            if warp == 0:
                ws = warp_sum[lane]
                wi = ws
                for o in cutlass.range_constexpr(5):
                    up = cute.arch.shuffle_sync_up(wi, 1 << o)
                    if lane >= (1 << o):
                        wi = wi + up
                warp_sum[lane] = wi - ws                          # exclusive prefix of the warps
                if lane == 31:
                    ctrl[2] = wi.to(Int64)                        # number of keys > K*
            cute.arch.sync_threads()
            at = warp_sum[warp] + incl - cnt
            for i in cutlass.range_constexpr(self.n):
                key = u[i] ^ int64_min
                if key > kth:
                    sel[at] = key
                    at = at + 1
            cute.arch.sync_threads()
            c = ctrl[2].to(Int32)
            # rank of each selected key (2 threads per key: even / odd j), then the K* slots
            e = tidx // 2
            half = tidx % 2
            rank = Int32(0)
            mine = int64_min
            if e < c:
                mine = sel[e]
            for j in cutlass.range(half, c, 2, unroll=4):
                if sel[j] > mine:
                    rank = rank + 1
            rank = rank + cute.arch.shuffle_sync_bfly(rank, 1)
            if e < c and half == 0:
                mOut[b, 0, rank] = sort_key_block(mine)
            for j in cutlass.range(c + tidx, k, self.threads, unroll=1):
                mOut[b, 0, j] = sort_key_block(kth)

    @dsl_user_op
    def _order_key(v: Float32, *, loc=None, ip=None) -> Int32:
        """float -> int32 whose signed order is the float order (negative floats: the low 31 bits flipped)."""
        return Int32(_llvm.inline_asm(
            _T.i32(), [Float32(v).ir_value(loc=loc, ip=ip)],
            "{\n.reg .b32 b, t;\nmov.b32 b, $1;\nshr.s32 t, b, 31;\nand.b32 t, t, 0x7fffffff;\nxor.b32 $0, b, t;\n}",
            "=r,f", has_side_effects=False, loc=loc, ip=ip))

    class TopKSelectVisible(TopKSelect):
        """TopKSelect after IndexerTopK(max_slots = limit) where T > limit: runs only where V = min((pos+1)//ratio, T)
        > limit (IndexerTopK has written the output otherwise) and reads only the V visible keys (IndexerTopK writes
        no keys past the CTAs holding visible ones; the rest count as INT64_MIN, as they would be). Radix passes after
        the first skip match.any in warps with no key under the prefix."""

        @cute.jit
        def __call__(self, mKeys: cute.Tensor, mOut: cute.Tensor, mPos: cute.Tensor, ratio: Int32, limit: Int32,
                     stream):
            B = cute.size(mKeys, mode=[0])

            @cute.struct
            class SharedStorage:
                sel: cute.struct.MemRange[Int64, self.max_k]
                hist: cute.struct.MemRange[Int32, 256]
                warp_sum: cute.struct.MemRange[Int32, 32]
                ctrl: cute.struct.MemRange[Int64, 4]

            self.shared_storage = SharedStorage
            self.kernel(mKeys, mOut, mPos, ratio, limit).launch(grid=[B, 1, 1], block=[self.threads, 1, 1],
                                                                stream=stream, use_pdl=GLUE_PDL)

        @cute.kernel
        def kernel(self, mKeys: cute.Tensor, mOut: cute.Tensor, mPos: cute.Tensor, ratio: Int32, limit: Int32):
            _pdl_enter()
            b, _, _ = cute.arch.block_idx()
            visible = cutlass.min((mPos[0].to(Int32) + 1) // ratio, cute.size(mKeys, mode=[1]))
            if visible > limit:
                self.select(mKeys, mOut, b, visible)

    class MoeGateDecode:
        """Router for a few tokens (decode): logits = x·W^T (fp32), s = sqrt(softplus(logits)); hash layers take
        ids = tid2eid[token], the others the top-k of s + bias (ties: lower expert); w = s[ids] / sum * scale.
        Grid E/4 CTAs of 4 warps: warp = one expert, its weight row in registers (lanes split D, 16-B loads), then
        each token's dot product (x from L1/L2) and a butterfly sum;
        each CTA turns its logits into scores -> global scratch (the selecting CTA only adds the bias, loaded before
        the PDL wait); the last CTA to arrive does the selection (warp per token) and resets its counter. No
        gpu-scope fences: bar.sync + the acq_rel arrival atomic order the scores. Each top-k round is two redux.sync
        (max of an order-preserving int key of the score, then the min expert id among the lanes holding it); each
        lane keeps its slot's weight in a register, ids / weights stored after the rounds. (Session 5's "redux"
        mode; session 4's kernel "v0" and the butterfly "lean" mode gave the same bits and were removed in
        session 11.)"""

        def __init__(self, n_experts: int, dim: int, top_k: int, hash_routing: bool, max_tokens: int,
                     warps: int = 4):
            assert n_experts % 32 == 0 and dim % 256 == 0 and top_k <= 32 and warps in (1, 2, 4)
            self.E, self.D, self.k, self.hash, self.max_tokens = n_experts, dim, top_k, hash_routing, max_tokens
            self.warps = warps             # experts (warps) per CTA: E / warps CTAs load the weight rows (same bits)
            self.threads = 32 * warps
            self.per_lane = n_experts // 32

        @cute.jit
        def __call__(self, mX: cute.Tensor, mWt: cute.Tensor, mBias: cute.Tensor, mTid2Eid: cute.Tensor,
                     mTokens: cute.Tensor, mLogits: cute.Tensor, mCount: cute.Tensor, mIds: cute.Tensor,
                     mW: cute.Tensor, route_scale: Float32, stream):
            @cute.struct
            class SharedStorage:
                sS: cute.struct.MemRange[Float32, self.warps * self.E]
                flag: cute.struct.MemRange[Int32, 4]

            self.shared_storage = SharedStorage
            self.kernel(mX, mWt, mBias, mTid2Eid, mTokens, mLogits, mCount, mIds, mW, route_scale).launch(
                grid=[self.E // self.warps, 1, 1], block=[self.threads, 1, 1], stream=stream, use_pdl=GLUE_PDL)

        @cute.kernel
        def kernel(self, mX: cute.Tensor, mWt: cute.Tensor, mBias: cute.Tensor, mTid2Eid: cute.Tensor,
                   mTokens: cute.Tensor, mLogits: cute.Tensor, mCount: cute.Tensor, mIds: cute.Tensor,
                   mW: cute.Tensor, route_scale: Float32):
            tidx, _, _ = cute.arch.thread_idx()
            blk, _, _ = cute.arch.block_idx()
            n_blk, _, _ = cute.arch.grid_dim()
            warp = tidx // 32
            lane = tidx % 32
            N = cute.size(mX, mode=[0])
            smem = _SmemAllocator()
            storage = smem.allocate(self.shared_storage)
            flag = storage.flag.get_tensor(cute.make_layout(4))
            sS = storage.sS.get_tensor(cute.make_layout((self.warps, self.E), stride=(self.E, 1)))

            e = blk * self.warps + warp
            # the expert's weight row: D/256 16-B pieces per lane, all loads issued before any use
            wvs = [cute.make_rmem_tensor((1, 8), BFloat16) for _ in range(self.D // 256)]
            for i in cutlass.range_constexpr(self.D // 256):
                cute.autovec_copy(cute.local_tile(mWt, (1, 8), (e, lane + 32 * i)), wvs[i])
            bias = cute.make_rmem_tensor((self.per_lane,), Float32)     # the selection's bias, early
            if const_expr(not self.hash):
                for j in cutlass.range_constexpr(self.per_lane):
                    bias[j] = mBias[lane + 32 * j]
            _pdl_enter()                 # the weight row is loading; x comes from the previous kernel
            xvs = [cute.make_rmem_tensor((1, 8), BFloat16) for _ in range(self.D // 256)]
            for n in cutlass.range(N, unroll=1):
                v = Float32(0.0)
                for i in cutlass.range_constexpr(self.D // 256):
                    cute.autovec_copy(cute.local_tile(mX, (1, 8), (n, lane + 32 * i)), xvs[i])
                for i in cutlass.range_constexpr(self.D // 256):
                    xf = xvs[i].load().to(Float32)
                    wf = wvs[i].load().to(Float32)
                    for c in cutlass.range_constexpr(8):
                        v = v + xf[c] * wf[c]
                for o in cutlass.range_constexpr(5):
                    v = v + cute.arch.shuffle_sync_bfly(v, 1 << o)
                if lane == 0:             # the score, so the selecting CTA need not compute 256 of them
                    mLogits[n, e] = self.score(v)

            self.select(mBias, mTid2Eid, mTokens, mLogits, mCount, mIds, mW, route_scale, flag, sS, tidx, warp, lane,
                        n_blk, N, bias)

        @cute.jit
        def score(self, lg):
            """sqrt(softplus(logit)) as torch computes it (softplus = x above 20)."""
            sp = lg
            if lg <= 20.0:
                sp = cute.math.log1p(cute.math.exp(lg))
            return cute.math.sqrt(sp)

        @cute.jit
        def select(self, mBias: cute.Tensor, mTid2Eid: cute.Tensor, mTokens: cute.Tensor, mLogits: cute.Tensor,
                   mCount: cute.Tensor, mIds: cute.Tensor, mW: cute.Tensor, route_scale: Float32, flag, sS, tidx,
                   warp, lane, n_blk, N, bias):
            """Arrival (the last CTA continues), then per token (a warp each) scores, top-k ids and weights."""
            cute.arch.sync_threads()
            if tidx == 0:
                flag[0] = cute.arch.atomic_add(mCount.iterator, Int32(1), sem="acq_rel", scope="gpu")
            cute.arch.sync_threads()
            if flag[0] == n_blk - 1:
                for n in cutlass.range(warp, N, self.warps, unroll=1):  # warp per token
                    sel = cute.make_rmem_tensor((self.per_lane,), Float32)
                    for j in cutlass.range_constexpr(self.per_lane):
                        ex = lane + 32 * j
                        lg = cute.arch.load(mLogits.iterator + cute.crd2idx((n, ex), mLogits.layout), Float32,
                                            cop="cg")
                        sc = lg                                        # the scratch holds scores
                        sS[warp, ex] = sc
                        if const_expr(not self.hash):
                            sel[j] = sc + bias[j]                      # loaded before the wait
                    cute.arch.sync_warp()
                    total = Float32(0.0)
                    mine = Float32(0.0)                                # lane r: the weight of slot r ...
                    mine_id = Int32(0)                                 # ... and its expert (stored after the loop)
                    for r in cutlass.range_constexpr(self.k):
                        best = Int32(0)
                        if const_expr(self.hash):
                            best = mTid2Eid[mTokens[n], r].to(Int32)
                        else:
                            # max of key(s) (signed-int order = float order; -0.0 cannot occur: s >= 0 + bias), then
                            # the lowest expert holding it (ties: lower expert, as below)
                            bk = Int32(-2147483648)
                            for j in cutlass.range_constexpr(self.per_lane):
                                bk = cutlass.max(bk, _order_key(sel[j]))
                            bk = Int32(cute.arch.warp_redux_sync(bk, "max"))
                            bi = Int32(self.E)
                            for j in cutlass.range_constexpr(self.per_lane - 1, -1, -1):
                                if _order_key(sel[j]) == bk:
                                    bi = lane + 32 * j
                            best = Int32(cute.arch.warp_redux_sync(bi, "min"))
                            for j in cutlass.range_constexpr(self.per_lane):
                                if lane + 32 * j == best:
                                    sel[j] = Float32(-math.inf)
                        ws = sS[warp, best]
                        total = total + ws
                        if lane == r:
                            mine = ws
                            mine_id = best
                    if lane < self.k:
                        mIds[n, lane] = mine_id
                        mW[n, lane] = mine / total * route_scale
                    cute.arch.sync_warp()
                if tidx == 0:
                    mCount[0] = 0

# ----------------------------------------------------------------------------------------------------------------
# compile cache + torch-facing functions
def attention_splits(window: int, n_comp: int, chunk: int = ATTN_CHUNK) -> int:
    return (window + n_comp + chunk - 1) // chunk


def _compile_attention(head_dim: int, mode: str, splits: int, chunk: int = ATTN_CHUNK):
    def build():
        B, H, W, Tc, Bi, k, ng, n = (cute.sym_int() for _ in range(8))
        words = head_dim // 2
        i32 = lambda *shape: cute.runtime.make_fake_compact_tensor(   # noqa: E731
            Int32, shape, stride_order=tuple(range(len(shape) - 1, -1, -1)), assumed_align=16)
        f32 = lambda *shape: cute.runtime.make_fake_compact_tensor(   # noqa: E731
            Float32, shape, stride_order=tuple(range(len(shape) - 1, -1, -1)), assumed_align=16)
        args = (i32(B, H, words), i32(B, W, words), i32(B, Tc, words),
                cute.runtime.make_fake_compact_tensor(Int64, (Bi, k), stride_order=(1, 0), assumed_align=8),
                cute.runtime.make_fake_compact_tensor(Int64, (1,), assumed_align=8),
                cute.runtime.make_fake_compact_tensor(Float32, (H,), assumed_align=4),
                cute.runtime.make_fake_compact_tensor(BFloat16, (B, H, head_dim), stride_order=(2, 1, 0),
                                                      assumed_align=16),
                f32(B, ng, splits, HEAD_TILE, head_dim), f32(B, ng, splits, HEAD_TILE, 2),
                cute.runtime.make_fake_compact_tensor(Int32, (n,), assumed_align=4),
                Float32(1.0), Int32(1), cute.runtime.make_fake_stream(use_tvm_ffi_env_stream=True))
        return SparseAttentionDecode(head_dim, mode, splits, chunk), args
    return _load_or_compile(("sattn", GLUE_PDL, head_dim, mode, splits, chunk), build)


def attention_cluster_plan(window: int, n_comp: int, chunk: int = ATTN_CHUNK):
    """(splits <= 8, chunks per CTA) covering window + n_comp keys with the fewest chunks per CTA."""
    chunks = -(-(window + n_comp) // chunk)
    per = -(-chunks // 8)
    return -(-chunks // per), per


def _attention_fake_args(head_dim: int, rows: bool = False):
    """Fake arguments of the cluster / wide attention launchers: q, ring, compressed kv (bf16 pairs as int32 words),
    picks, pos (rows: one per row), sink, out, the RoPE table, scale, ratio, stream."""
    B, H, W, Tc, Bi, k = (cute.sym_int() for _ in range(6))
    Bc = cute.sym_int() if rows else B                    # rows: every row reads compressed row 0 of [1,Tc]
    words = head_dim // 2
    i32 = lambda *shape: cute.runtime.make_fake_compact_tensor(   # noqa: E731
        Int32, shape, stride_order=tuple(range(len(shape) - 1, -1, -1)), assumed_align=16)
    return (i32(B, H, words), i32(B, W, words), i32(Bc, Tc, words),
            cute.runtime.make_fake_compact_tensor(Int64, (Bi, k), stride_order=(1, 0), assumed_align=8),
            cute.runtime.make_fake_compact_tensor(Int64, (cute.sym_int() if rows else 1,), assumed_align=8),
            cute.runtime.make_fake_compact_tensor(Float32, (H,), assumed_align=4),
            cute.runtime.make_fake_compact_tensor(BFloat16, (B, H, head_dim), stride_order=(2, 1, 0), assumed_align=16),
            cute.runtime.make_fake_compact_tensor(Float32, (cute.sym_int(), cute.sym_int()), stride_order=(1, 0),
                                                  assumed_align=4),
            Float32(1.0), Int32(1), cute.runtime.make_fake_stream(use_tvm_ffi_env_stream=True))


def _compile_attention_cluster(head_dim: int, mode: str, splits: int, chunks_per_cta: int, rope_dim: int = 0,
                               rows: bool = False):
    def build():
        args = _attention_fake_args(head_dim, rows)
        return SparseAttentionDecodeCluster(head_dim, mode, splits, chunks_per_cta, rope_dim=rope_dim, rows=rows), args
    return _load_or_compile(("sattnc", GLUE_PDL, head_dim, mode, splits, chunks_per_cta, rope_dim) + (("rows",) if rows
                                                                                                    else ()), build)


def attention_wide_plan(window: int, n_comp: int, max_splits: int | None = None, max_chunk: int | None = None):
    """(splits, chunk, chunks per CTA) of SparseAttentionDecodeWide for a key list of window + n_comp slots: up to
    max_splits CTAs per head group, each with ceil(window/S) ring slots + ceil(n_comp/S) compressed keys (CSA; the
    window / HCA split by count needs no more), in the fewest passes of at most max_chunk rows (a multiple of 16)."""
    max_splits = ATTN_MAX_SPLITS if max_splits is None else max_splits
    max_chunk = ATTN_MAX_CHUNK if max_chunk is None else max_chunk
    splits = max(1, min(max_splits, -(-(window + n_comp) // 16)))
    rows = -(-window // splits) + -(-n_comp // splits)
    per = -(-rows // max_chunk)                        # passes per CTA
    chunk = -(-(-(-rows // per)) // 16) * 16
    return splits, chunk, per


def attention_wide_batch_plan(B: int, H: int, window: int, n_comp: int, num_sms: int):
    """attention_wide_plan with the splits capped so B x head groups x splits CTAs stay within ATTN_CTAS_PER_SM per SM
    (one wave; a cluster needs all its CTAs resident at once)."""
    groups = -(-H // HEAD_TILE)
    fit = ATTN_CTAS_PER_SM * num_sms // (B * groups)
    return attention_wide_plan(window, n_comp, min(ATTN_MAX_SPLITS, max(2, fit)))


def _compile_attention_wide(head_dim: int, mode: str, splits: int, chunk: int, chunks_per_cta: int,
                            rope_dim: int = 0, q_norm: tuple = ()):
    def build():
        args = _attention_fake_args(head_dim)
        return SparseAttentionDecodeWide(head_dim, mode, splits, chunk, chunks_per_cta, rope_dim, q_norm), args
    return _load_or_compile(("sattnw", GLUE_PDL, head_dim, mode, splits, chunk, chunks_per_cta, rope_dim) +
                            (("qnorm",) + tuple(q_norm) if q_norm else ()), build)


def _compile_indexer(n_heads: int, head_dim: int, chunk: int = INDEX_CHUNK, w_bf16: bool = False):
    def build():
        B, T = cute.sym_int(), cute.sym_int()
        words = head_dim // 2
        args = (cute.runtime.make_fake_compact_tensor(Int32, (B, n_heads, words), stride_order=(2, 1, 0),
                                                      assumed_align=16),
                cute.runtime.make_fake_compact_tensor(Int32, (B, T, words), stride_order=(2, 1, 0), assumed_align=16),
                cute.runtime.make_fake_compact_tensor(BFloat16 if w_bf16 else Float32, (B, n_heads),
                                                      stride_order=(1, 0), assumed_align=2 if w_bf16 else 4),
                cute.runtime.make_fake_compact_tensor(Int64, (1,), assumed_align=8),
                cute.runtime.make_fake_compact_tensor(Int64, (B, T), stride_order=(1, 0), assumed_align=8),
                Int32(4), Float32(1.0), cute.runtime.make_fake_stream(use_tvm_ffi_env_stream=True))
        return IndexerScores(n_heads, head_dim, chunk, w_bf16), args
    return _load_or_compile(("sidx", GLUE_PDL, n_heads, head_dim, chunk) + (("w_bf16",) if w_bf16 else ()), build)


def _compile_topk(keys_per_thread: int):
    """TopKSelectVisible (call: sort keys, out, pos, ratio, limit)."""
    def build():
        B, T, k = cute.sym_int(), cute.sym_int(), cute.sym_int()
        args = (cute.runtime.make_fake_compact_tensor(Int64, (B, T), stride_order=(1, 0), assumed_align=8),
                cute.runtime.make_fake_compact_tensor(Int64, (B, 1, k), stride_order=(2, 1, 0), assumed_align=8),
                cute.runtime.make_fake_compact_tensor(Int64, (1,), assumed_align=8), Int32(4), Int32(4096),
                cute.runtime.make_fake_stream(use_tvm_ffi_env_stream=True))
        return TopKSelectVisible(keys_per_thread), args
    return _load_or_compile(("stopk", GLUE_PDL, keys_per_thread, "visible"), build)


def _compile_indexer_topk(n_heads: int, head_dim: int, max_slots: int, chunk: int = INDEX_CHUNK,
                          w_bf16: bool = False, cluster: int = 0, all_below: bool = False):
    def build():
        B, T, k = cute.sym_int(), cute.sym_int(), cute.sym_int()
        words = head_dim // 2
        mk = cute.runtime.make_fake_compact_tensor
        args = (mk(Int32, (B, n_heads, words), stride_order=(2, 1, 0), assumed_align=16),
                mk(Int32, (B, T, words), stride_order=(2, 1, 0), assumed_align=16),
                mk(BFloat16 if w_bf16 else Float32, (B, n_heads), stride_order=(1, 0),
                   assumed_align=2 if w_bf16 else 4),
                mk(Int64, (1,), assumed_align=8),
                mk(Int64, (B, T), stride_order=(1, 0), assumed_align=8),
                mk(Int64, (B, 1, k), stride_order=(2, 1, 0), assumed_align=8),
                mk(Int32, (cute.sym_int(),), assumed_align=4),
                Int32(4), Float32(1.0), Int32(256), cute.runtime.make_fake_stream(use_tvm_ffi_env_stream=True))
        return IndexerTopK(n_heads, head_dim, chunk, w_bf16, max_slots, cluster, all_below), args
    return _load_or_compile(("sidxk", GLUE_PDL, n_heads, head_dim, max_slots, chunk, w_bf16, cluster) +
                            (("all_below",) if all_below else ()), build)


def _compile_indexer_topk_query(n_heads: int, head_dim: int, max_slots: int, chunk: int, w_bf16: bool, cluster: int,
                                rope_dim: int, quant_sim: bool, hadamard_mode: str):
    def build():
        B, T, k = cute.sym_int(), cute.sym_int(), cute.sym_int()
        words = head_dim // 2
        mk = cute.runtime.make_fake_compact_tensor
        args = (_bf16_rows(cute.sym_int(), head_dim),
                mk(Float32, (cute.sym_int(), rope_dim // 2), stride_order=(1, 0), assumed_align=4),
                mk(Int32, (B, T, words), stride_order=(2, 1, 0), assumed_align=16),
                mk(BFloat16 if w_bf16 else Float32, (B, n_heads), stride_order=(1, 0),
                   assumed_align=2 if w_bf16 else 4),
                mk(Int64, (1,), assumed_align=8),
                mk(Int64, (B, T), stride_order=(1, 0), assumed_align=8),
                mk(Int64, (B, 1, k), stride_order=(2, 1, 0), assumed_align=8),
                mk(Int32, (cute.sym_int(),), assumed_align=4),
                Int32(4), Float32(1.0), Int32(256), cute.runtime.make_fake_stream(use_tvm_ffi_env_stream=True))
        return IndexerTopKQuery(n_heads, head_dim, chunk, w_bf16, max_slots, cluster, rope_dim, quant_sim,
                                hadamard_mode), args
    return _load_or_compile(("sidxq", GLUE_PDL, n_heads, head_dim, max_slots, chunk, w_bf16, cluster, rope_dim,
                             quant_sim, hadamard_mode), build)


def fused_topk_slots(T: int) -> int:
    """Static smem size (key slots, a power of two >= T) of the one-launch indexer top-k."""
    return 1 << max(T - 1, 1).bit_length()


def _compile_gate(n_experts: int, dim: int, top_k: int, hash_routing: bool, max_tokens: int, warps: int = 4):
    def build():
        N, V = cute.sym_int(), cute.sym_int()
        mk = cute.runtime.make_fake_compact_tensor
        args = (mk(BFloat16, (N, dim), stride_order=(1, 0), assumed_align=16),
                mk(BFloat16, (n_experts, dim), stride_order=(1, 0), assumed_align=16),
                mk(Float32, (n_experts,), assumed_align=4),
                mk(Int64, (V, top_k), stride_order=(1, 0), assumed_align=8),
                mk(Int64, (cute.sym_int(),), assumed_align=8),
                mk(Float32, (N, n_experts), stride_order=(1, 0), assumed_align=4),
                mk(Int32, (cute.sym_int(),), assumed_align=4),
                mk(Int32, (N, top_k), stride_order=(1, 0), assumed_align=4),
                mk(Float32, (N, top_k), stride_order=(1, 0), assumed_align=4),
                Float32(1.0), cute.runtime.make_fake_stream(use_tvm_ffi_env_stream=True))
        return MoeGateDecode(n_experts, dim, top_k, hash_routing, max_tokens, warps), args
    return _load_or_compile(("sgate", GLUE_PDL, n_experts, dim, top_k, hash_routing, max_tokens, warps), build)


def _attention_counters(device, n: int) -> torch.Tensor:
    """Zeroed per-(sequence, head group) arrival counters; the combining CTA resets its own, so the buffer stays zero
    between launches; one buffer per stream (arrival_counters)."""
    return arrival_counters(device, n, 1024)


def _gpu_ok(*tensors) -> str | None:
    if not HAVE_CUTE:
        return "CuTe DSL is not installed"
    t = tensors[0]
    if not (t.is_cuda and torch.cuda.get_device_capability(t.device) == (9, 0)):
        return "no sm_90 GPU"
    if any(x.dtype != torch.bfloat16 for x in tensors):
        return "inputs are not bf16"
    return None


def attention_unavailable_reason(q, window_kv, comp_kv=None) -> str | None:
    reason = _gpu_ok(*[x for x in (q, window_kv, comp_kv) if x is not None])
    if reason is None and (q.shape[1] != 1 or q.shape[-1] % 64):
        reason = f"q {tuple(q.shape)}: needs one query and head_dim % 64 == 0"
    return reason


ATTN_FOLD_Q_NORM = True   # sparse_attention_decode(q_norm_eps=): QNormRope of the query inside the wide attention
                          # kernel (dsv4: no QNormRope launch at batch <= ATTN_WIDE_MAX_BATCH; session 7, same bits)


def attention_folds_q_norm(B: int, H: int, hd: int) -> bool:
    """sparse_attention_decode(q_norm_eps=...) makes the query inside the attention launch for this batch (else it
    launches QNormRope first)."""
    lay = torch_sum_layout(hd, B * H) if TORCH_ORDER_SUMS else None
    return (ATTN_FOLD_Q_NORM and ATTN_WIDE and ATTN_CLUSTER and B <= ATTN_WIDE_MAX_BATCH and lay is not None
            and lay[1] == 4 and lay[0] % 32 == 0 and hd % (lay[0] * lay[1]) == 0)


def _attention_keys(window_kv, comp_kv, comp_idx, pos, rows: int):
    """An attention launch's key kind -> (mode, compressed keys past the window, the compressed keys to pass, the
    picks to pass): "window" (no comp_kv: the ring stands in, unread), "hca" (every completed block) or "csa"
    (comp_idx [rows,1,k]; else a placeholder, unread)."""
    if comp_kv is None:
        mode, n_comp, comp_kv = "window", 0, window_kv
    elif comp_idx is None:
        mode, n_comp = "hca", comp_kv.shape[1]
    else:
        mode, n_comp = "csa", comp_idx.shape[-1]
    idx = comp_idx.reshape(rows, -1).long().contiguous() if comp_idx is not None else pos[:1].view(1, 1)
    return mode, n_comp, comp_kv, idx


def sparse_attention_decode(q, window_kv, comp_kv, comp_idx, pos, sink, scale: float, ratio: int, angles=None,
                            q_norm_eps: float | None = None):
    """dsv4.sparse_attention for one query per sequence (signature and semantics of
    sparse_attention_decode_reference) in one CuTe DSL kernel; the reference where the kernel cannot run. angles
    (the RoPE table [P, rd/2]): also undo the RoPE of the output's last rd dims at pos, i.e. return
    rope_inverse_fused(out, angles, pos) (in the kernel's epilogue: one launch less). q_norm_eps (with angles): q
    is the raw query projection; the attention takes q_norm_rope_fused(q, angles, pos, q_norm_eps), made inside
    the wide kernel where attention_folds_q_norm (same bits), else by a QNormRope launch first."""
    B, _, H, hd = q.shape
    fold_q = q_norm_eps is not None and angles is not None and attention_folds_q_norm(B, H, hd) and \
        attention_unavailable_reason(q, window_kv, comp_kv) is None
    if q_norm_eps is not None and not fold_q:
        q = q_norm_rope_fused(q, angles, pos, q_norm_eps)
    if attention_unavailable_reason(q, window_kv, comp_kv) is not None:
        out = sparse_attention_decode_reference(q, window_kv, comp_kv, comp_idx, pos, sink, scale, ratio)
        return out if angles is None else rope_inverse_fused(out, angles, pos)
    W = window_kv.shape[1]
    mode, n_comp, comp_kv, idx = _attention_keys(window_kv, comp_kv, comp_idx, pos, B)
    groups = (H + HEAD_TILE - 1) // HEAD_TILE
    dev = q.device
    words = lambda x: x.reshape(x.shape[0], -1, hd).view(torch.int32)   # noqa: E731  bf16 pairs
    out = torch.empty(B, 1, H, hd, dtype=q.dtype, device=dev)
    if ATTN_WIDE and ATTN_CLUSTER and B <= ATTN_WIDE_MAX_BATCH:
        if dev not in _NUM_SMS:
            _NUM_SMS[dev] = torch.cuda.get_device_properties(dev).multi_processor_count
        splits, chunk, per = attention_wide_batch_plan(B, H, W, n_comp, _NUM_SMS[dev])
        rd = 0 if angles is None else 2 * angles.shape[-1]
        ang = sink.detach().float().view(1, -1) if angles is None else angles.reshape(-1, angles.shape[-1])
        qn = (_f32(q_norm_eps),) + torch_sum_layout(hd, B * H) if fold_q else ()
        _compile_attention_wide(hd, mode, splits, chunk, per, rd, qn)(
            words(q), words(window_kv), words(comp_kv), idx, pos, sink.detach().float(), out.view(B, H, hd),
            ang, float(scale), int(max(ratio, 1)))
        return out
    if ATTN_CLUSTER:
        splits, per = attention_cluster_plan(W, n_comp)
        rd = 0 if angles is None else 2 * angles.shape[-1]
        ang = sink.detach().float().view(1, -1) if angles is None else angles.reshape(-1, angles.shape[-1])
        _compile_attention_cluster(hd, mode, splits, per, rd)(
            words(q), words(window_kv), words(comp_kv), idx, pos, sink.detach().float(), out.view(B, H, hd),
            ang, float(scale), int(max(ratio, 1)))
        return out
    splits = attention_splits(W, n_comp)
    part_o = torch.empty(B, groups, splits, HEAD_TILE, hd, dtype=torch.float32, device=dev)
    part_ml = torch.empty(B, groups, splits, HEAD_TILE, 2, dtype=torch.float32, device=dev)
    _compile_attention(hd, mode, splits)(
        words(q), words(window_kv), words(comp_kv), idx, pos,
        sink.detach().float(), out.view(B, H, hd), part_o, part_ml, _attention_counters(dev, B * groups),
        float(scale), int(max(ratio, 1)))
    return out if angles is None else rope_inverse_fused(out, angles, pos)


def sparse_attention_rows_reference(q, rings, comp_kv, comp_idx, pos, sink, scale: float, ratio: int):
    """The decode step's attention with a position per row: q [N,1,H,hd], rings [N,W,hd] (row n's window in the
    ring layout at pos[n]: slot s holds the key of the latest position <= pos[n] that is = s mod W), comp_kv [1,Tc,hd]
    shared by the rows (None: window only), comp_idx [N,1,k] (CSA picks, -1 = none) or None (HCA), pos [N] int64
    -> [N,1,H,hd]: row n is sparse_attention_decode_reference of row n alone."""
    return torch.cat([sparse_attention_decode_reference(q[n:n + 1], rings[n:n + 1], comp_kv,
                                                        None if comp_idx is None else comp_idx[n:n + 1], pos[n:n + 1],
                                                        sink, scale, ratio) for n in range(q.shape[0])])


def sparse_attention_rows(q, rings, comp_kv, comp_idx, pos, sink, scale: float, ratio: int):
    """sparse_attention_rows_reference as one SparseAttentionDecodeCluster launch (rows: each row its own position,
    the compressed keys shared): a prompt's queries as decode rows (Attention.forward's prefill, dsv4.window_rings)."""
    if attention_unavailable_reason(q, rings, comp_kv) is not None:
        return sparse_attention_rows_reference(q, rings, comp_kv, comp_idx, pos, sink, scale, ratio)
    N, _, H, hd = q.shape
    W = rings.shape[1]
    if comp_kv is not None and (comp_kv.shape[1] == 0 or (comp_idx is not None and comp_idx.shape[-1] == 0)):
        comp_kv = comp_idx = None                          # no compressed key yet (a prompt's first blocks)
    mode, n_comp, comp_kv, idx = _attention_keys(rings, comp_kv, comp_idx, pos, N)
    comp_kv = comp_kv[0].unsqueeze(0)                      # [1,Tc,hd] with compact strides (a slice of the cache)
    words = lambda x: x.reshape(x.shape[0], -1, hd).view(torch.int32)   # noqa: E731  bf16 pairs
    out = torch.empty(N, 1, H, hd, dtype=q.dtype, device=q.device)
    splits, per = attention_cluster_plan(W, n_comp)
    _compile_attention_cluster(hd, mode, splits, per, 0, rows=True)(
        words(q), words(rings), words(comp_kv), idx, pos.contiguous(), sink.detach().float(), out.view(N, H, hd),
        sink.detach().float().view(1, -1), float(scale), int(max(ratio, 1)))
    return out


def indexer_topk_decode(q, keys, weights, pos, topk: int, ratio: int = 4, weight_scale: float | None = None):
    """Indexer._top_blocks for one query per sequence (signature and semantics of indexer_topk_reference): one CuTe
    DSL kernel writes int64 sort keys (score, then lower index first; future blocks lowest), the largest min(topk, T)
    in descending order (unique keys: the order is exactly the stable sort's) give the block ids (their low words;
    -1 for future blocks). Where every complete block is a pick (V <= k, INDEX_ALL_BELOW_TOPK, batch <=
    INDEX_ALL_BELOW_TOPK_MAX_BATCH) the one-launch kernel makes no scores and lists the picks in ascending block order
    (the same set; the attention sums them in another order); the torch.topk path, larger batches and the fold
    (indexer_query_topk_decode from batch 2) keep the score order. The scoring kernel's cluster (T <= 8 chunks) or
    last CTA orders up to FUSED_TOPK_MAX_SLOTS visible keys itself (one launch), TopKSelectVisible takes more; beyond
    its limits (or DEVICE_TOPK off) IndexerScores + torch.topk, the same bits. weight_scale: weights are the raw bf16
    weights_proj output, scaled in the kernel."""
    reason = _gpu_ok(q, keys)
    B, _, nh, d = q.shape
    if reason is None and (nh % 16 or d % 64 or q.shape[1] != 1):
        reason = f"indexer q {tuple(q.shape)}: needs one query, heads % 16 == 0, head_dim % 64 == 0"
    if reason is not None:
        w = weights if weight_scale is None else weights.float() * weight_scale
        return indexer_topk_reference(q, keys, w, pos, topk, ratio)
    T = keys.shape[1]
    sort_keys = torch.empty(B, T, dtype=torch.int64, device=q.device)
    w_bf16 = weight_scale is not None and weights.dtype == torch.bfloat16
    w = weights.detach().reshape(B, nh)
    if weight_scale is not None and not w_bf16:
        w = w.float() * weight_scale
    k = min(topk, T)
    per_thread = -(-T // 1024)
    radix_ok = k <= 512 and per_thread <= 32                       # TopKSelectVisible's limits
    # one launch orders up to `covered` visible keys (a cluster of <= 8 CTAs, or the last CTA); more: TopKSelectVisible
    cluster = -(-T // INDEX_CHUNK) if TOPK_CLUSTER and 2 * INDEX_CHUNK == 256 and T <= 8 * INDEX_CHUNK else 0
    covered = cluster * INDEX_CHUNK if cluster else fused_topk_slots(min(T, FUSED_TOPK_MAX_SLOTS))
    chunk = INDEX_CHUNK if cluster or T > FUSED_SMALL_CHUNK_MAX_T else 64     # (R1 H100: 64 faster to T 4096)
    if DEVICE_TOPK and (T <= covered or radix_ok):
        slots = fused_topk_slots(covered)
        out = torch.empty(B, 1, k, dtype=torch.int64, device=q.device)
        if POISON:          # tests: an unwritten pick shows up as -7, an unwritten visible key as a top pick
            out.fill_(-7), sort_keys.fill_(2 ** 63 - 1)
        all_below = INDEX_ALL_BELOW_TOPK and B <= INDEX_ALL_BELOW_TOPK_MAX_BATCH
        _compile_indexer_topk(nh, d, slots, chunk, w_bf16, cluster, all_below)(
            q.reshape(B, nh, d).view(torch.int32), keys.view(torch.int32),
            w.contiguous() if w_bf16 else w.float().contiguous(), pos, sort_keys, out,
            arrival_counters(q.device, B, 1024), int(ratio), float(weight_scale) if w_bf16 else 1.0, TOPK_RANK_MAX)
        if T > covered:
            _compile_topk(per_thread)(sort_keys, out, pos, int(ratio), covered)
        return out
    _compile_indexer(nh, d, INDEX_CHUNK, w_bf16)(q.reshape(B, nh, d).view(torch.int32), keys.view(torch.int32),
                                                 w.contiguous() if w_bf16 else w.float().contiguous(), pos, sort_keys,
                                                 int(ratio), float(weight_scale) if w_bf16 else 1.0)
    top = torch.topk(sort_keys, k, dim=-1).values
    return sort_keys_to_blocks(top).view(B, 1, -1)


_ZERO_QUERIES: dict = {}


def index_picks_all(keys, pos, topk: int, ratio: int, n_heads: int, head_dim: int) -> torch.Tensor:
    """The indexer's picks for one query per sequence at position pos (int64 [1]) where it sees at most min(topk, T)
    complete blocks (the caller knows: dsv4.Transformer.index_picks_all): [B, 1, k] = 0 .. V-1 ascending, then -1,
    V = (pos + 1) // ratio. On an sm_90 GPU one IndexerTopK launch in its no-score form (INDEX_ALL_BELOW_TOPK) with
    zero queries and head weights, which it does not read there (were it to score them, every score would tie at
    0 and the lower block go first: the same picks); elsewhere torch."""
    B, T = keys.shape[0], keys.shape[1]
    k = min(topk, T)
    if (_gpu_ok(keys) is None and INDEX_ALL_BELOW_TOPK and B <= INDEX_ALL_BELOW_TOPK_MAX_BATCH
            and n_heads % 16 == 0 and head_dim % 64 == 0):
        key = (keys.device, B, n_heads, head_dim)
        zq = _ZERO_QUERIES.get(key)
        if zq is None:
            zq = _ZERO_QUERIES[key] = (torch.zeros(B, 1, n_heads, head_dim, dtype=torch.bfloat16, device=keys.device),
                                       torch.zeros(B, 1, n_heads, dtype=torch.bfloat16, device=keys.device))
        return indexer_topk_decode(zq[0], keys, zq[1], pos, topk, ratio, weight_scale=1.0)
    blocks = torch.arange(k, device=keys.device)
    return torch.where(blocks < (pos + 1) // ratio, blocks, -1).expand(B, 1, k).clone()


INDEX_ALL_BELOW_TOPK = True  # IndexerTopK: where every complete block is a pick (V <= k: the first topk x ratio
                             # tokens), 0 .. V-1 in ascending order with no scores (H200, 8-layer step at position
                             # 1000, batch 1: -0.020 / -0.021 ms in three runs). Only up to this batch: in the fold
INDEX_ALL_BELOW_TOPK_MAX_BATCH = 1   # (IndexerTopKQuery, batch >= 2) the same skip made the batch-8 step 0.037 ms
                                     # slower; larger batches keep scoring in either launch form
INDEX_FOLD_QUERY = True    # indexer_query_topk_decode: IndexQuery inside the one-cluster IndexerTopK launch (same bits)
INDEX_FOLD_MIN_BATCH = 2   # ... from this batch on. H200, bench.py decode --layers 8, 7 rotated rounds with an A/A
                           # control at +0.002 / -0.003 ms per step (s10): batch 8 -0.040 ms per step with the fold,
                           # batch 1 +0.007 (slower, as in both s9 readings: +0.003 / 4 layers, +0.009 / 8 layers)


def indexer_fold_query_ok(iq: torch.Tensor, keys: torch.Tensor, weights: torch.Tensor, weight_scale) -> bool:
    """Whether indexer_query_topk_decode runs as one IndexerTopKQuery launch: INDEX_FOLD_QUERY, a batch of at least
    INDEX_FOLD_MIN_BATCH, the one-launch cluster top-k (T <= 8 chunks), one bf16 query per sequence with head_dim
    128, bf16 head weights scaled in the kernel."""
    if not (INDEX_FOLD_QUERY and DEVICE_TOPK and TOPK_CLUSTER and 2 * INDEX_CHUNK == 256):
        return False
    if _gpu_ok(iq, keys) is not None or glue_unavailable_reason(iq) is not None:
        return False
    return (iq.dim() == 4 and iq.shape[0] >= INDEX_FOLD_MIN_BATCH and iq.shape[1] == 1 and iq.shape[-1] == 128 and iq.shape[-2] % 16 == 0 and
            iq.is_contiguous() and keys.shape[1] <= 8 * INDEX_CHUNK and weight_scale is not None and
            weights.dtype == torch.bfloat16)


def indexer_query_topk_decode(iq, angles, pos, quant_sim: bool, keys, weights, topk: int, ratio: int = 4,
                              weight_scale: float | None = None):
    """Indexer.decode's query + top-k: indexer_topk_decode(index_query_fused(iq, angles, pos, quant_sim), keys,
    weights, pos, topk, ratio, weight_scale), iq = the raw iwq_b output [B, 1, nh, hd]. Where indexer_fold_query_ok:
    one IndexerTopKQuery launch (the queries made by the cluster's CTAs: same bits, one launch less)."""
    if not indexer_fold_query_ok(iq, keys, weights, weight_scale):
        return indexer_topk_decode(index_query_fused(iq, angles, pos, quant_sim), keys, weights, pos, topk, ratio,
                                   weight_scale)
    B, _, nh, d = iq.shape
    T = keys.shape[1]
    k = min(topk, T)
    cluster = -(-T // INDEX_CHUNK)
    sort_keys = torch.empty(B, T, dtype=torch.int64, device=iq.device)
    out = torch.empty(B, 1, k, dtype=torch.int64, device=iq.device)
    if POISON:
        out.fill_(-7), sort_keys.fill_(2 ** 63 - 1)
    ang, p, _ = _pos_arg(angles, pos)
    _compile_indexer_topk_query(nh, d, fused_topk_slots(cluster * INDEX_CHUNK), INDEX_CHUNK, True, cluster,
                                2 * angles.shape[-1], quant_sim, HADAMARD_MODE)(
        iq.reshape(B * nh, d), ang, keys.view(torch.int32), weights.detach().reshape(B, nh).contiguous(), p,
        sort_keys, out, arrival_counters(iq.device, B, 1024), int(ratio), float(weight_scale), TOPK_RANK_MAX)
    return out


def gate_reference(gate, x, tokens):
    """dsv4.Gate.forward's torch math: x [N,D], tokens [N] -> (expert ids [N,k] int32, weights [N,k] fp32)."""
    logits = x.float() @ gate.weight.float().T
    if gate.score_func == "sqrtsoftplus":
        s = torch.nn.functional.softplus(logits).sqrt()
    elif gate.score_func == "sigmoid":
        s = logits.sigmoid()
    else:
        s = logits.softmax(-1)
    ids = gate.tid2eid[tokens] if gate.hash else (s + gate.bias).topk(gate.k, -1).indices
    w = s.gather(1, ids)
    w = w / w.sum(-1, keepdim=True) * gate.route_scale
    return ids.int(), w


GATE_MAX_TOKENS = 16
GATE_WARPS = 4            # experts (warps) per router CTA: E / GATE_WARPS CTAs (same bits for 1, 2, 4)


def gate_kernel_supported(gate, x) -> bool:
    """gate_decode's kernel runs for these inputs: <= 16 bf16 tokens on sm_90 with CuTe DSL, the sqrtsoftplus
    router, experts % 32 == 0, D % 256 == 0, top-k <= 32."""
    N, D = x.shape
    return (_gpu_ok(x, gate.weight) is None and gate.score_func == "sqrtsoftplus" and N <= GATE_MAX_TOKENS
            and gate.weight.shape[0] % 32 == 0 and D % 256 == 0 and gate.k <= 32
            and (not gate.hash or gate.tid2eid.is_contiguous()))


def gate_decode(gate, x, tokens):
    """dsv4.Gate.forward (gate: the module) in one CuTe DSL kernel (gate_kernel_supported), else gate_reference.
    Same ids in the same (descending score) order; weights to fp32 rounding."""
    if not gate_kernel_supported(gate, x):
        return gate_reference(gate, x, tokens)
    N, D = x.shape
    E = gate.weight.shape[0]
    max_tokens = GATE_MAX_TOKENS                    # one compile; unused token slots are predicated off
    dev = x.device
    if (dev, "gate") not in _COUNTERS:         # made once (setdefault would launch three fills per call)
        _COUNTERS[(dev, "gate")] = torch.zeros(4, dtype=torch.int32, device=dev)   # [0] arrivals, [1..3] unused
    if (dev, "gate", E, gate.k) not in _COUNTERS:  # the unused bias / tid2eid of this router shape
        _COUNTERS[(dev, "gate", E, gate.k)] = (torch.zeros(E, dtype=torch.float32, device=dev),
                                               torch.zeros(1, gate.k, dtype=torch.int64, device=dev))
    dummy_f, dummy_i = _COUNTERS[(dev, "gate", E, gate.k)]
    bias = dummy_f if gate.hash else gate.bias.data
    tid2eid = gate.tid2eid.data if gate.hash else dummy_i
    logits = torch.empty(N, E, dtype=torch.float32, device=dev)
    ids = torch.empty(N, gate.k, dtype=torch.int32, device=dev)
    w = torch.empty(N, gate.k, dtype=torch.float32, device=dev)
    counter = _COUNTERS[(dev, "gate")]
    _compile_gate(E, D, gate.k, gate.hash, max_tokens, GATE_WARPS)(
        x.contiguous(), gate.weight.data, bias, tid2eid, tokens.reshape(-1).long(), logits, counter, ids, w,
        float(gate.route_scale))
    return ids, w


# ====================================================================================================================
# MoE prefill GEMM (issue #3)
# ====================================================================================================================
# Prefill routed MoE (large T): a warp-specialized, persistent fp4 x bf16 grouped GEMM for Hopper (CuTe DSL, sm_90a).
#
# Same math, weight records, routing and combine as kernels.moe_fp4 (kernels.py); only the two GEMMs differ:
#
#   CTA tile = 256 weight rows (two consecutive 128-row records of kernels.repack_fp4) x tile_n tokens x 64 k.
#   Warpgroup 0 = producer (setmaxnreg down; its warp 0 issues the TMAs of both records + the shared token tile into a
#   multi-stage mbarrier pipeline), warpgroups 1 and 2 = consumers (setmaxnreg up): consumer c decodes record c (a whole
#   128-row record = 2 wgmma atoms, so GEMM1's gate atom and up atom of the same intermediate columns stay in the same
#   thread, exactly as kernels._gate_up_row_order lays them out) and runs RS wgmma m64 x tile_n x k16 on the shared B
#   tile. Epilogue: fp32 -> (SwiGLU | alpha) -> bf16 into a padded smem tile per consumer, then 16-B vector stores.
#   Persistent: grid = #SMs; CTA b takes work items b, b + grid, ... of (token tile j, row pair p), p fastest, so the
#   row pairs of one token tile run together (the tokens are read from HBM once, then from L2) and the producer loads
#   the next item while the consumers run the epilogue.

PREFILL_TILE_N = 128          # tokens per tile (widest wgmma N)
PREFILL_ABLATE: dict = {}      # bench only: timing-only Fp4PrefillGemm options (decode=False, mma_width=96,
                               # epilogue="nomath" | "nostore"; all give wrong values)
PREFILL_WIDTHS = None         # None: prefill_widths(T); (): one width (tile_n); e.g. (96, 128): one GEMM launch per
                              # wgmma width, each over the token tiles whose rows fit it best (tiles of the last width;
                              # an expert's partial tile goes to the narrowest width that holds it)
PREFILL_MIN_TOKENS = 3072     # moe_fp4_prefill from this many tokens on (R2, H200: 2048 tokens 2390 vs 2175 us,
                              # 3072 tokens 2797 vs 3640 us against kernels.moe_fp4, both as CUDA graphs)
# (Variants whose ablations lost were removed in session 4, see notes/kernel.md "session 4 pruning": GEMM1 gathering
# its token rows (cp.async), 2-CTA clusters, several wgmma widths or N chunks in one kernel, the per-width epilogue,
# the launch without .minnctapersm, store warps, sigmoid via tanh, the routing weight in the combine, PrefillRouting
# for one width. Session 11: the single-CTA routing launches (PREFILL_MULTI_ROUTING off: PrefillRouting's own kernel,
# MoeRouting for one width) and x_sorted by PrefillGather / index_select (PREFILL_GATHER_KERNEL); the routing runs
# over many CTAs: PrefillCount, PrefillTables, PrefillPlace.)
SMEM_BYTES = 227 * 1024       # sm_90 dynamic smem per CTA
PRODUCER_REGS, CONSUMER_REGS = 40, 232   # setmaxnreg split: 128 x 40 + 256 x 232 <= 64 K registers


if HAVE_CUTE:
    @dsl_user_op
    def stmatrix_x4_trans(smem_addr: Int32, r0: Int32, r1: Int32, r2: Int32, r3: Int32, *, loc=None, ip=None):
        """Four 8x8 bf16 tiles of the wgmma accumulator fragment, each stored transposed: thread t gives the 16-B row
        address of row t % 8 of tile t // 8 (smem row = token, 8 consecutive output columns)."""
        _llvm.inline_asm(None, [Int32(x).ir_value(loc=loc, ip=ip) for x in (smem_addr, r0, r1, r2, r3)],
                         "stmatrix.sync.aligned.m8n8.x4.trans.shared.b16 [$0], {$1, $2, $3, $4};", "r,r,r,r,r",
                         has_side_effects=True, loc=loc, ip=ip)

    class Fp4PrefillGemm:
        """Grouped GEMM over experts for many tokens per expert: out[rows of e, cols] = B[rows] · W_e^T.

        swiglu=True (GEMM1): W = kernels' interleaved w13 records, out = act [R, I] (bf16):
        a = w_route·silu(min(h·α_gate, L))·clamp(u·α_up, ±L). swiglu=False (GEMM2): W = w2 records, out = acc·α_down
        -> [R, D] bf16. K (= B's columns) and the output width are runtime sizes; tile_n and the format are static.
        """

        def __init__(self, fmt: str, tile_n: int, swiglu: bool, pdl: bool = False, decode: bool = True,
                     epilogue: str = "", mma_width: int = 0, chain: str = ""):
            self.fmt, self.tile_n, self.swiglu, self.pdl = fmt, tile_n, swiglu, pdl
            assert tile_n % 16 == 0
            # chain (PDL order of several GEMM launches over disjoint token tiles, see moe_fp4_prefill's widths):
            # "" = the only launch: trigger the dependents at once, wait for the previous kernel at the start;
            # "first" = the first of a chain: wait at the start, trigger the next launch only after that wait (so the
            # next one may read this one's inputs without waiting); "next" = a later launch: trigger at once, do not
            # wait at the start (its inputs are complete), wait at the end (its completion implies the previous
            # launch's, for the kernel after the chain)
            assert chain in ("", "first", "next")
            self.chain = chain
            # one wgmma width per kernel, tile_n (several widths in one kernel make ptxas serialize the wgmmas, C7512)
            # mma_width: ablation only (wrong values): every tile runs this wgmma width instead, e.g. narrower than
            # its rows, to time how much the MMAs alone cost
            self.mma_width = mma_width
            self.decode = decode        # False: ablation only (raw code words fed to wgmma: wrong values, no decode)
            # epilogue "nostore" / "nomath": ablations only (no global stores / no SwiGLU math, wrong values)
            self.epi_mode = epilogue
            self.rec_bytes = record_bytes(fmt)
            self.rec_rows = self.rec_bytes // REC_ROW
            self.out_cols = 64 if swiglu else TILE_M            # output columns per consumer per item
            self.out_pitch = self.out_cols + 8                  # smem row pitch (bf16): conflict-free writes
            epi_bytes = 2 * tile_n * self.out_pitch * 2
            stage_bytes = 2 * self.rec_bytes + tile_n * TILE_K * 2
            self.stages = max(2, min(8, (SMEM_BYTES - epi_bytes - 4096) // stage_bytes))
            self.threads = 384

        @cute.jit
        def __call__(self, mW: cute.Tensor, mB: cute.Tensor, mOut: cute.Tensor, mTiles: cute.Tensor,
                     mNumTiles: cute.Tensor, mAlpha0: cute.Tensor, mAlpha1: cute.Tensor, mRowW: cute.Tensor,
                     limit: Float32, num_ctas: Int32, stream):
            tiled_mma = sm90_utils.make_trivial_tiled_mma(
                BFloat16, BFloat16, OperandMajorMode.K, OperandMajorMode.K, Float32, (1, 1, 1),
                tiler_mn=(64, self.tile_n), a_source=warpgroup.OperandSource.RMEM)
            # weight smem: slot 2*stage + c = record of consumer c
            w_smem_layout = cute.make_layout((REC_ROW, self.rec_rows, 2 * self.stages))
            b_smem_layout = sm90_utils.make_smem_layout_b(
                LayoutEnum.ROW_MAJOR, (TILE_M, self.tile_n, TILE_K), BFloat16, self.stages)
            epi_layout = cute.make_layout((self.tile_n, self.out_pitch, 2),
                                          stride=(self.out_pitch, 1, self.tile_n * self.out_pitch))
            tma_w, tma_mW = cpasync.make_tiled_tma_atom(
                cpasync.CopyBulkTensorTileG2SOp(), mW, cute.slice_(w_smem_layout, (None, None, 0)),
                (REC_ROW, self.rec_rows))
            tma_b, tma_mB = cpasync.make_tiled_tma_atom(
                cpasync.CopyBulkTensorTileG2SOp(), mB, cute.slice_(b_smem_layout, (None, None, 0)),
                (self.tile_n, TILE_K))

            @cute.struct
            class SharedStorage:
                bars: cute.struct.MemRange[cutlass.Int64, self.stages * 2]
                sW: cute.struct.Align[cute.struct.MemRange[cutlass.Uint8, cute.cosize(w_smem_layout)], 1024]
                sB: cute.struct.Align[cute.struct.MemRange[BFloat16, cute.cosize(b_smem_layout)], 1024]
                sOut: cute.struct.Align[cute.struct.MemRange[BFloat16, cute.cosize(epi_layout)], 128]

            self.shared_storage = SharedStorage
            k_tiles = cute.size(mB, mode=[1]) // TILE_K
            m_pairs = cute.size(mOut, mode=[1]) // (2 * self.out_cols)
            # .minnctapersm 1 pins ptxas' register count at entry; without it ptxas may ignore setmaxnreg (C7508:
            # then every warp keeps the launch's 168 registers -> spills / serialized wgmmas, e.g. at tile_n 96)
            self.kernel(tiled_mma, tma_w, tma_mW, tma_b, tma_mB, mOut, mTiles, mNumTiles, mAlpha0, mAlpha1, mRowW,
                        limit, k_tiles, m_pairs, w_smem_layout, b_smem_layout, epi_layout).launch(
                grid=[num_ctas, 1, 1], block=[self.threads, 1, 1], stream=stream, use_pdl=self.pdl,
                min_blocks_per_mp=1)

        @cute.kernel
        def kernel(self, tiled_mma: cute.TiledMma, tma_w: cute.CopyAtom, mW: cute.Tensor, tma_b: cute.CopyAtom,
                   mB: cute.Tensor, mOut: cute.Tensor, mTiles: cute.Tensor, mNumTiles: cute.Tensor,
                   mAlpha0: cute.Tensor, mAlpha1: cute.Tensor, mRowW: cute.Tensor, limit: Float32,
                   k_tiles: Int32, m_pairs: Int32,
                   w_smem_layout: cute.Layout, b_smem_layout: cute.ComposedLayout, epi_layout: cute.Layout):
            tidx, _, _ = cute.arch.thread_idx()
            bid, _, _ = cute.arch.block_idx()
            nctas, _, _ = cute.arch.grid_dim()
            warp_idx = cute.arch.make_warp_uniform(cute.arch.warp_idx())
            wg = warp_idx // 4
            if const_expr(self.pdl and self.chain != "first"):
                cute.arch.griddepcontrol_launch_dependents()
            if warp_idx == 0:
                cpasync.prefetch_descriptor(tma_w)
                cpasync.prefetch_descriptor(tma_b)
            smem = cutlass.utils.SmemAllocator()
            storage = smem.allocate(self.shared_storage)
            # full barrier: TMA bytes; empty barrier: one arrival per consumer warp
            tx_bytes = 2 * self.rec_bytes + self.tile_n * TILE_K * 2
            pipe = pipeline.PipelineTmaAsync.create(
                barrier_storage=storage.bars.data_ptr(), num_stages=self.stages,
                producer_group=pipeline.CooperativeGroup(pipeline.Agent.Thread, 1),
                consumer_group=pipeline.CooperativeGroup(pipeline.Agent.Thread, 8),
                tx_count=tx_bytes, cta_layout_vmnk=cute.make_layout((1, 1, 1, 1)), defer_sync=False)
            # work items w = (token tile j, row pair p), p fastest: CTA bid takes bid, bid + grid, ...
            groups = m_pairs
            sW = storage.sW.get_tensor(w_smem_layout)
            sB = storage.sB.get_tensor(b_smem_layout.outer, swizzle=b_smem_layout.inner)
            # token tiles in the table (a width class's table: its count; entries past it have rows = 0)
            n_items = cutlass.min(cute.size(mTiles, mode=[0]), mNumTiles[0]) * groups

            if wg == 0:
                # ---------------------------------------------------------------- producer warpgroup (warp 0 works)
                cute.arch.setmaxregister_decrease(PRODUCER_REGS)
                if warp_idx == 0:
                    if const_expr(self.pdl and self.chain != "next"):
                        cute.arch.griddepcontrol_wait()       # the tokens come from the previous kernel
                        if const_expr(self.chain == "first"):
                            cute.arch.griddepcontrol_launch_dependents()
                    prod = pipeline.make_pipeline_state(pipeline.PipelineUserType.Producer, self.stages)
                    for w in cutlass.range(bid, n_items, nctas, unroll=1):
                        j = w // groups
                        p = w - j * groups
                        expert = mTiles[j, 0]
                        row0 = mTiles[j, 1]
                        nrows = mTiles[j, 2]
                        if nrows > 0:
                            gW = mW[None, None, None, expert]                          # (256, rows, MK)
                            tWsW, tWgW = cpasync.tma_partition(tma_w, 0, cute.make_layout(1),
                                                               cute.group_modes(sW, 0, 2),
                                                               cute.group_modes(gW, 0, 2))
                            gB = cute.local_tile(cute.domain_offset((row0, 0), mB), (self.tile_n, TILE_K),
                                                 (0, None))
                            tBsB, tBgB = cpasync.tma_partition(tma_b, 0, cute.make_layout(1),
                                                               cute.group_modes(sB, 0, 2),
                                                               cute.group_modes(gB, 0, 2))
                            rec_a = 2 * p * k_tiles                  # record (m-tile 2p, k 0); m-tile 2p+1 follows
                            for kt in cutlass.range(k_tiles, unroll=1):
                                pipe.producer_acquire(prod)
                                bar = pipe.producer_get_barrier(prod)
                                cute.copy(tma_w, tWgW[(None, rec_a + kt)], tWsW[(None, 2 * prod.index)],
                                          tma_bar_ptr=bar)
                                cute.copy(tma_w, tWgW[(None, rec_a + k_tiles + kt)],
                                          tWsW[(None, 2 * prod.index + 1)], tma_bar_ptr=bar)
                                cute.copy(tma_b, tBgB[(None, kt)], tBsB[(None, prod.index)], tma_bar_ptr=bar)
                                pipe.producer_commit(prod)
                                prod.advance()
            else:
                # ---------------------------------------------------------------- consumer warpgroups 1, 2
                cute.arch.setmaxregister_increase(CONSUMER_REGS)
                if const_expr(self.pdl and self.chain != "next"):
                    cute.arch.griddepcontrol_wait()           # our outputs may still be read by the previous kernel
                    if const_expr(self.chain == "first"):
                        cute.arch.griddepcontrol_launch_dependents()
                c = wg - 1
                ltid = tidx - 128 * wg
                thr_mma = tiled_mma.get_slice(ltid)
                frag0 = tiled_mma.make_fragment_A(thr_mma.partition_shape_A((TILE_M, TILE_K)))
                frag1 = tiled_mma.make_fragment_A(thr_mma.partition_shape_A((TILE_M, TILE_K)))
                frags = (cute.recast_tensor(frag0, Int32), cute.recast_tensor(frag1, Int32))

                slot_words = self.rec_rows * REC_ROW // 4
                sW32 = cute.make_tensor(cute.recast_ptr(sW.iterator, dtype=Int32),
                                        cute.make_layout((4, 128, 2, 2 * self.stages),
                                                         stride=(1, 4, 512, slot_words)))
                nw = _scale_words_per_atom(self.fmt)
                sS32 = cute.make_tensor(cute.recast_ptr(sW.iterator, dtype=Int32) + CODE_BYTES // 4,
                                        cute.make_layout((nw, 32, 2, 2 * self.stages),
                                                         stride=(1, nw, 32 * nw, slot_words)))
                codes = cute.make_rmem_tensor((4, 2), Int32)
                scl = cute.make_rmem_tensor((nw, 2), Int32)
                quad = ltid // 4
                sOut = storage.sOut.get_tensor(epi_layout)[None, None, c]       # (tile_n, pitch) bf16
                epi_bar = pipeline.NamedBarrier(barrier_id=1 + c, num_threads=128)

                acc_full = cute.make_rmem_tensor(thr_mma.partition_shape_C((TILE_M, self.tile_n)), Float32)
                lane = ltid % 32
                q = lane // 8                     # stmatrix: this thread addresses row lane % 8 of tile q
                s_addr = (storage.sOut.data_ptr().toint() + c * (self.tile_n * self.out_pitch * 2)
                          + (((8 * (q // 2) + lane % 8) * self.out_pitch + 16 * (ltid // 32) + 8 * (q % 2)) * 2))
                # the wgmma (width nv, one per kernel) accumulates into the first nv / 8 column groups of acc_full
                nv = self.mma_width if self.mma_width else self.tile_n
                mma_v = sm90_utils.make_trivial_tiled_mma(
                    BFloat16, BFloat16, OperandMajorMode.K, OperandMajorMode.K, Float32, (1, 1, 1),
                    tiler_mn=(64, nv), a_source=warpgroup.OperandSource.RMEM)
                mma_v.set(warpgroup.Field.ACCUMULATE, True)
                thr_v = mma_v.get_slice(ltid)
                sB_v = cute.composition(cute.domain_offset((0, 0, 0), sB), cute.make_layout(
                    (nv, TILE_K, self.stages), stride=(1, self.tile_n, self.tile_n * TILE_K)))
                tCrB = mma_v.make_fragment_B(thr_v.partition_B(sB_v))
                acc = cute.make_tensor(acc_full.iterator, cute.make_layout(
                    ((2, 2, nv // 8), 2, 1), stride=((1, 2, 4), self.tile_n // 2, 0)))

                cons = pipeline.make_pipeline_state(pipeline.PipelineUserType.Consumer, self.stages)
                rel = pipeline.make_pipeline_state(pipeline.PipelineUserType.Consumer, self.stages)
                for w in cutlass.range(bid, n_items, nctas, unroll=1):
                    j = w // groups
                    p = w - j * groups
                    expert = mTiles[j, 0]
                    row0 = mTiles[j, 1]
                    nrows = mTiles[j, 2]
                    if nrows > 0:
                        acc_full.fill(0.0)
                    if nrows > 0 and (nrows <= nv or self.mma_width):
                        for kt in cutlass.range(0, k_tiles, 2, unroll=1):
                            for h in cutlass.range_constexpr(2):
                                frag = frags[h]
                                pipe.consumer_wait(cons)
                                slot = 2 * cons.index + c
                                for a in cutlass.range_constexpr(2):
                                    cute.autovec_copy(sW32[None, ltid, a, slot], codes[None, a])
                                for a in cutlass.range_constexpr(2):
                                    cute.autovec_copy(sS32[None, quad, a, slot], scl[None, a])
                                for a in cutlass.range_constexpr(2):
                                    for kb in cutlass.range_constexpr(4 if self.decode else 0):
                                        # one register holds the scales of two k16 blocks (nvfp4) or the two k32
                                        # groups (mxfp4); the decode's HMUL2 picks its half
                                        if const_expr(self.fmt == "nvfp4"):
                                            b0, half = kb - kb % 2, kb % 2
                                            s_r = scale_pair_bf16x2(scl[0, a], b0, self.fmt, b0 + 1)
                                            s_r8 = scale_pair_bf16x2(scl[1, a], b0, self.fmt, b0 + 1)
                                        else:
                                            half = kb // 2
                                            s_r = scale_pair_bf16x2(scl[0, a], 0, self.fmt, 1)
                                            s_r8 = scale_pair_bf16x2(scl[0, a], 2, self.fmt, 3)
                                        r0, r1, r2, r3 = decode_fp4x8_scaled(codes[kb, a], s_r, s_r8, half)
                                        frag[(0, 0, 0), a, kb] = r0
                                        frag[(0, 1, 0), a, kb] = r1
                                        frag[(0, 0, 1), a, kb] = r2
                                        frag[(0, 1, 1), a, kb] = r3
                                    for kb in cutlass.range_constexpr(0 if self.decode else 4):   # timing only
                                        frag[(0, 0, 0), a, kb] = codes[kb, a]
                                        frag[(0, 1, 0), a, kb] = codes[kb, a] ^ scl[0, a]
                                        frag[(0, 0, 1), a, kb] = codes[kb, a]
                                        frag[(0, 1, 1), a, kb] = codes[kb, a] ^ scl[0, a]
                                warpgroup.fence()
                                for kb in cutlass.range_constexpr(4):
                                    cute.gemm(mma_v, acc, (frag0, frag1)[h][None, None, kb],
                                              tCrB[None, None, kb, cons.index], acc)
                                warpgroup.commit_group()
                                warpgroup.wait_group(1)
                                if kt + h > 0:
                                    pipe.consumer_release(rel)
                                    rel.advance()
                                cons.advance()
                        warpgroup.wait_group(0)
                        pipe.consumer_release(rel)
                        rel.advance()
                    if nrows > 0:
                        # acc (m, n) = weight row m of this consumer's record, token n of the tile
                        self.epilogue(acc_full, sOut, s_addr, epi_bar, mOut, mAlpha0, mAlpha1, mRowW, limit, expert,
                                      row0, nrows, p, c, ltid)
                if const_expr(self.pdl and self.chain == "next"):
                    cute.arch.griddepcontrol_wait()           # complete only after the previous launch of the chain

        @cute.jit
        def epilogue(self, acc, sOut: cute.Tensor, s_addr, epi_bar, mOut: cute.Tensor, mAlpha0: cute.Tensor,
                     mAlpha1: cute.Tensor, mRowW: cute.Tensor, limit: Float32, expert, row0, nrows, p, c, ltid):
            """acc ((2,2,tile_n/8), atom, 1) fp32 -> (SwiGLU | alpha) -> bf16x2 packs -> stmatrix.trans into the
            padded smem tile -> out rows row0..row0+nrows-1, this consumer's columns (16-B vectors).
            Fragment register (i, jh, g) of atom a = (row 16 w + lane/4 + 8 jh + 64 a, token 8 g + 2 (lane%4) + i)."""
            epi_bar.arrive_and_wait()                        # the previous item's smem reads are done
            if const_expr(self.swiglu):
                a_gate = mAlpha0[expert]
                a_up = mAlpha1[expert]
                lane = ltid % 32
                for s in cutlass.range_constexpr(self.tile_n // 16):
                    regs = []
                    for qq in cutlass.range_constexpr(4):
                        jh, g = qq % 2, 2 * s + qq // 2
                        pair = []
                        for i in cutlass.range_constexpr(2):
                            tok = 8 * g + 2 * (lane % 4) + i
                            hh = cute.math.min(acc[(i, jh, g), 0, 0] * a_gate, limit)
                            uu = cute.math.max(cute.math.min(acc[(i, jh, g), 1, 0] * a_up, limit), -limit)
                            rw = mRowW[row0 + cutlass.min(tok, nrows - 1)]
                            if const_expr(self.epi_mode == "nomath"):          # ablation only
                                pair.append(acc[(i, jh, g), 0, 0] + acc[(i, jh, g), 1, 0])
                            else:
                                # silu(h) = h / (1 + e^-h): ex2.approx + rcp.approx (fp32 error ~1e-7 << bf16 rounding)
                                sig = cute.arch.rcp_approx(1.0 + cute.math.exp(-hh, fastmath=True))
                                pair.append(rw * hh * sig * uu)
                        regs.append(pack_bf16x2(pair[0], pair[1]))
                    stmatrix_x4_trans(s_addr + 16 * s * self.out_pitch * 2, regs[0], regs[1], regs[2], regs[3])
            else:
                a_down = mAlpha0[expert]
                for a in cutlass.range_constexpr(2):
                    for s in cutlass.range_constexpr(self.tile_n // 16):
                        regs = []
                        for qq in cutlass.range_constexpr(4):
                            jh, g = qq % 2, 2 * s + qq // 2
                            regs.append(pack_bf16x2(acc[(0, jh, g), a, 0] * a_down, acc[(1, jh, g), a, 0] * a_down))
                        stmatrix_x4_trans(s_addr + (16 * s * self.out_pitch + 64 * a) * 2, regs[0], regs[1],
                                          regs[2], regs[3])
            # the consumer warpgroup copies its bf16 tile (smem) to out rows row0.., 16-B vectors
            epi_bar.arrive_and_wait()
            vpr = self.out_cols // 8                         # 16-B vectors per output row
            rpp = 128 // vpr                                 # rows per pass
            vcol = ltid % vpr
            col_vec = ((2 * p + c) * self.out_cols) // 8 + vcol
            for r in cutlass.range(ltid // vpr, nrows if self.epi_mode != "nostore" else 0, rpp, unroll=1):
                cute.autovec_copy(cute.local_tile(sOut, (1, 8), (r, vcol)),
                                  cute.local_tile(mOut, (1, 8), (row0 + r, col_vec)))


    class PrefillRouting(MoeRouting):
        """moe_fp4_prefill's width classes (the helpers of PrefillTables): each expert's rows are cut into token tiles
        of widths[-1] rows (the last one partial), and a tile of nr rows goes to the table of the narrowest width >=
        nr: tiles[c, i] = (expert, first row, rows) compact, rows = 0 past counts[c]. (Its own single-CTA launch,
        PREFILL_MULTI_ROUTING off, was removed in session 11.)"""

        def __init__(self, num_experts: int, top_k: int, widths: tuple):
            super().__init__(num_experts, top_k, widths[-1])
            self.widths = tuple(widths)

        @cute.jit
        def width_class(self, rows):
            """Index of the narrowest width >= rows (rows in 1..widths[-1])."""
            cls = Int32(len(self.widths) - 1)
            for c in cutlass.range_constexpr(len(self.widths) - 2, -1, -1):
                if rows <= self.widths[c]:
                    cls = Int32(c)
            return cls

        @cute.jit
        def scan_counts(self, cnt: cute.Tensor, start: cute.Tensor, cstart: cute.Tensor, tidx):
            """Warp 0: start[e] = rows of experts < e (e = 0..E), cstart[e, c] = class-c tiles of experts < e."""
            E, tn, nc = self.E, self.tile_n, len(self.widths)
            if tidx < 32:        # warp 0: exclusive prefix sums of rows and of each class's tiles, 32 experts a step
                lane = tidx
                acc = Int32(0)
                cacc = cute.make_rmem_tensor((nc,), Int32)
                cacc.fill(0)
                for base in cutlass.range(0, E + 1, 32, unroll=1):
                    e = base + lane
                    c = Int32(0)
                    if e <= E:
                        c = cnt[e]
                    full = c // tn
                    rem = c - full * tn
                    rcls = Int32(-1)
                    if e < E and rem > 0:
                        rcls = self.width_class(rem)
                    ci = c
                    for d in cutlass.range_constexpr(5):              # inclusive warp scan of the rows
                        cu = cute.arch.shuffle_sync_up(ci, 1 << d)
                        if lane >= (1 << d):
                            ci = ci + cu
                    if e <= E:
                        start[e] = acc + ci - c
                    acc = acc + cute.arch.shuffle_sync(ci, 31)
                    for k in cutlass.range_constexpr(nc):             # tiles of class k of this expert
                        t = Int32(0)
                        if e < E:
                            if const_expr(k == nc - 1):
                                t = full
                            if rcls == k:
                                t = t + 1
                        ti = t
                        for d in cutlass.range_constexpr(5):
                            tu = cute.arch.shuffle_sync_up(ti, 1 << d)
                            if lane >= (1 << d):
                                ti = ti + tu
                        if e <= E:
                            cstart[e, k] = cacc[k] + ti - t
                        cacc[k] = cacc[k] + cute.arch.shuffle_sync(ti, 31)

        @cute.jit
        def write_tables(self, cnt: cute.Tensor, start: cute.Tensor, cstart: cute.Tensor, mTiles: cute.Tensor,
                         mCounts: cute.Tensor, tidx):
            """Every expert's token tiles into its class tables; entries past a table's count zeroed; counts."""
            E, tn, nc = self.E, self.tile_n, len(self.widths)
            n_tab = cute.size(mTiles, mode=[1])
            for e in cutlass.range(tidx, E, self.threads, unroll=1):     # each expert writes its own tiles
                c = cnt[e]
                full = c // tn
                rem = c - full * tn
                for t in cutlass.range(full, unroll=1):
                    i = cstart[e, nc - 1] + t
                    mTiles[nc - 1, i, 0] = e
                    mTiles[nc - 1, i, 1] = start[e] + t * tn
                    mTiles[nc - 1, i, 2] = tn
                if rem > 0:
                    rcls = self.width_class(rem)
                    i = cstart[e, rcls]
                    if rcls == nc - 1:
                        i = i + full
                    mTiles[rcls, i, 0] = e
                    mTiles[rcls, i, 1] = start[e] + full * tn
                    mTiles[rcls, i, 2] = rem
            for k in cutlass.range_constexpr(nc):
                total = cstart[E, k]
                for j in cutlass.range(total + tidx, n_tab, self.threads, unroll=1):
                    mTiles[k, j, 0] = 0
                    mTiles[k, j, 1] = 0
                    mTiles[k, j, 2] = 0
                if tidx == 0:
                    mCounts[k] = total

    class PrefillCount:
        """Routing over many CTAs, step 1: rank[s] = rank of slot s among its expert's rows (order arbitrary). Each
        CTA counts its slots per expert in shared memory (the single-CTA MoeRouting is bound by one SM's shared
        atomics), then takes a base per expert from counts (one global atomic per expert and CTA). counts [E + 1]
        must be zero on entry; on exit counts[e] = rows of expert e (counts[E]: skipped slots)."""

        def __init__(self, num_experts: int, threads: int = 256, per_thread: int = 8):
            self.E, self.threads, self.per_thread = num_experts, threads, per_thread

        @cute.jit
        def __call__(self, mIds: cute.Tensor, mRank: cute.Tensor, mCounts: cute.Tensor, stream):
            @cute.struct
            class SharedStorage:
                cnt: cute.struct.MemRange[Int32, self.E + 1]
                base: cute.struct.MemRange[Int32, self.E + 1]

            self.shared_storage = SharedStorage
            R = cute.size(mIds, mode=[0])
            chunk = self.threads * self.per_thread
            self.kernel(mIds, mRank, mCounts).launch(grid=[(R + chunk - 1) // chunk, 1, 1],
                                                     block=[self.threads, 1, 1], stream=stream)

        @cute.kernel
        def kernel(self, mIds: cute.Tensor, mRank: cute.Tensor, mCounts: cute.Tensor):
            tidx, _, _ = cute.arch.thread_idx()
            bid, _, _ = cute.arch.block_idx()
            E, nb = self.E, self.per_thread
            R = cute.size(mIds, mode=[0])
            smem = cutlass.utils.SmemAllocator()
            storage = smem.allocate(self.shared_storage)
            cnt = storage.cnt.get_tensor(cute.make_layout(E + 1))
            base = storage.base.get_tensor(cute.make_layout(E + 1))
            for e in cutlass.range(tidx, E + 1, self.threads, unroll=1):
                cnt[e] = 0
            cute.arch.sync_threads()
            s0 = bid * self.threads * nb + tidx
            ev = cute.make_rmem_tensor((nb,), Int32)
            rk = cute.make_rmem_tensor((nb,), Int32)
            for i in cutlass.range_constexpr(nb):
                s = s0 + i * self.threads
                ev[i] = E
                if s < R:
                    e = mIds[s]
                    if e >= 0 and e < E:
                        ev[i] = e
            for i in cutlass.range_constexpr(nb):
                if s0 + i * self.threads < R:
                    rk[i] = cute.arch.atomic_add(cnt.iterator + ev[i], Int32(1), scope="cta")
            cute.arch.sync_threads()
            for e in cutlass.range(tidx, E + 1, self.threads, unroll=1):
                c = cnt[e]
                if c > 0:
                    base[e] = cute.arch.atomic_add(mCounts.iterator + e, c, scope="gpu")
            cute.arch.sync_threads()
            for i in cutlass.range_constexpr(nb):
                s = s0 + i * self.threads
                if s < R:
                    mRank[s] = base[ev[i]] + rk[i]

    class PrefillTables(PrefillRouting):
        """Routing over many CTAs, step 2 (one CTA): from counts (PrefillCount), start[e] = first sorted row of
        expert e (e = 0..E) and PrefillRouting's width-class tile tables + their counts."""

        def __init__(self, num_experts: int, top_k: int, widths: tuple):
            super().__init__(num_experts, top_k, widths)
            self.threads = 256

        @cute.jit
        def __call__(self, mCounts: cute.Tensor, mStart: cute.Tensor, mTiles: cute.Tensor, mTileCounts: cute.Tensor,
                     stream):
            @cute.struct
            class SharedStorage:
                cnt: cute.struct.MemRange[Int32, self.E + 1]
                start: cute.struct.MemRange[Int32, self.E + 1]
                cstart: cute.struct.MemRange[Int32, len(self.widths) * (self.E + 1)]

            self.shared_storage = SharedStorage
            self.kernel_tables(mCounts, mStart, mTiles, mTileCounts).launch(
                grid=[1, 1, 1], block=[self.threads, 1, 1], stream=stream)

        @cute.kernel
        def kernel_tables(self, mCounts: cute.Tensor, mStart: cute.Tensor, mTiles: cute.Tensor,
                          mTileCounts: cute.Tensor):
            tidx, _, _ = cute.arch.thread_idx()
            E, nc = self.E, len(self.widths)
            smem = cutlass.utils.SmemAllocator()
            storage = smem.allocate(self.shared_storage)
            cnt = storage.cnt.get_tensor(cute.make_layout(E + 1))
            start = storage.start.get_tensor(cute.make_layout(E + 1))
            cstart = storage.cstart.get_tensor(cute.make_layout((E + 1, nc)))
            for e in cutlass.range(tidx, E + 1, 256, unroll=1):
                cnt[e] = mCounts[e]
            cute.arch.sync_threads()
            self.scan_counts(cnt, start, cstart, tidx)
            cute.arch.sync_threads()
            for e in cutlass.range(tidx, E + 1, 256, unroll=1):
                mStart[e] = start[e]
            self.write_tables(cnt, start, cstart, mTiles, mTileCounts, tidx)

    class PrefillPlace:
        """Routing over many CTAs, step 3 (+ the gather): for each slot s of expert e (routed), its sorted row
        p = start[e] + rank[s]: src_tok[p] = s // k, row_w[p] = w[s], pos[s] = p, x_sorted[p] = x[s // k] (16-B
        vectors, every thread's loads in flight before its stores); skipped slots: pos[s] = R. `slots` per CTA."""

        def __init__(self, num_experts: int, top_k: int, dim: int, slots: int = 4):
            self.E, self.k, self.dim, self.slots, self.threads = num_experts, top_k, dim, slots, 128
            self.vecs = dim // 8
            self.cols = (self.vecs + self.threads - 1) // self.threads

        @cute.jit
        def __call__(self, mIds: cute.Tensor, mW: cute.Tensor, mRank: cute.Tensor, mStart: cute.Tensor,
                     mX: cute.Tensor, mSrc: cute.Tensor, mRowW: cute.Tensor, mPos: cute.Tensor, mXs: cute.Tensor,
                     stream):
            R = cute.size(mIds, mode=[0])
            self.kernel(mIds, mW, mRank, mStart, mX, mSrc, mRowW, mPos, mXs).launch(
                grid=[(R + self.slots - 1) // self.slots, 1, 1], block=[self.threads, 1, 1], stream=stream)

        @cute.kernel
        def kernel(self, mIds: cute.Tensor, mW: cute.Tensor, mRank: cute.Tensor, mStart: cute.Tensor,
                   mX: cute.Tensor, mSrc: cute.Tensor, mRowW: cute.Tensor, mPos: cute.Tensor, mXs: cute.Tensor):
            tidx, _, _ = cute.arch.thread_idx()
            bid, _, _ = cute.arch.block_idx()
            E = self.E
            R = cute.size(mIds, mode=[0])
            v = [cute.make_rmem_tensor((1, 8), BFloat16) for _ in range(self.slots * self.cols)]
            ps = []
            for r in cutlass.range_constexpr(self.slots):
                s = bid * self.slots + r
                p = Int32(-1)
                if s < R:
                    e = mIds[s]
                    if e >= 0 and e < E:
                        p = mStart[e] + mRank[s]
                    if tidx == 0:
                        mPos[s] = p if p >= 0 else R
                        if p >= 0:
                            mSrc[p] = s // self.k
                            mRowW[p] = mW[s]
                ps.append(p)
            for r in cutlass.range_constexpr(self.slots):
                if ps[r] >= 0:
                    tok = (bid * self.slots + r) // self.k
                    for j in cutlass.range_constexpr(self.cols):
                        if const_expr(self.vecs % self.threads == 0) or j * self.threads + tidx < self.vecs:
                            cute.autovec_copy(cute.local_tile(mX, (1, 8), (tok, j * self.threads + tidx)),
                                              v[r * self.cols + j])
            for r in cutlass.range_constexpr(self.slots):
                if ps[r] >= 0:
                    for j in cutlass.range_constexpr(self.cols):
                        if const_expr(self.vecs % self.threads == 0) or j * self.threads + tidx < self.vecs:
                            cute.autovec_copy(v[r * self.cols + j],
                                              cute.local_tile(mXs, (1, 8), (ps[r], j * self.threads + tidx)))

def _compile_prefill_gemm(fmt: str, tile_n: int, swiglu: bool, pdl: bool = False, decode: bool = True,
                          epilogue: str = "", mma_width: int = 0, chain: str = ""):
    """Compiled Fp4PrefillGemm for one static config (TVM-FFI entry; K and the output width are runtime sizes)."""
    config = ("prefill", fmt, tile_n, swiglu, pdl, decode, epilogue, mma_width, chain) + _decode_key()

    def build():
        gemm = Fp4PrefillGemm(fmt, tile_n, swiglu, pdl, decode, epilogue, mma_width, chain)
        rows_b, rows_o, n_exp, n_tiles, mk = (cute.sym_int() for _ in range(5))
        k_dim, n_out = cute.sym_int(divisibility=128), cute.sym_int(divisibility=128)
        rec = gemm.rec_rows * REC_ROW
        w = cute.runtime.make_fake_tensor(cutlass.Uint8, (REC_ROW, gemm.rec_rows, mk, n_exp),
                                          stride=(1, REC_ROW, rec, cute.sym_int64(divisibility=rec)),
                                          assumed_align=128)
        b = cute.runtime.make_fake_compact_tensor(BFloat16, (rows_b, k_dim), stride_order=(1, 0), assumed_align=16)
        out = cute.runtime.make_fake_compact_tensor(BFloat16, (rows_o, n_out), stride_order=(1, 0),
                                                    assumed_align=16)
        tiles = cute.runtime.make_fake_compact_tensor(Int32, (n_tiles, 3), stride_order=(1, 0), assumed_align=4)
        num_tiles = cute.runtime.make_fake_compact_tensor(Int32, (1,), assumed_align=4)
        alpha0 = cute.runtime.make_fake_compact_tensor(Float32, (n_exp,), assumed_align=4)
        alpha1 = cute.runtime.make_fake_compact_tensor(Float32, (n_exp,), assumed_align=4)
        row_w = cute.runtime.make_fake_compact_tensor(Float32, (cute.sym_int(),), assumed_align=4)
        stream = cute.runtime.make_fake_stream(use_tvm_ffi_env_stream=True)
        return gemm, (w, b, out, tiles, num_tiles, alpha0, alpha1, row_w, Float32(0.0), Int32(1), stream)
    return _load_or_compile(config, build)


def _compile_prefill_count(num_experts: int):
    def build():
        r = cute.sym_int()
        i32 = lambda shape: cute.runtime.make_fake_compact_tensor(Int32, shape, assumed_align=4)   # noqa: E731
        return PrefillCount(num_experts), (i32((r,)), i32((r,)), i32((num_experts + 1,)),
                                           cute.runtime.make_fake_stream(use_tvm_ffi_env_stream=True))
    return _load_or_compile(("prefill_count", num_experts), build)


def _compile_prefill_tables(num_experts: int, top_k: int, widths: tuple):
    def build():
        n_tab = cute.sym_int()
        i32 = lambda shape: cute.runtime.make_fake_compact_tensor(Int32, shape, assumed_align=4)   # noqa: E731
        args = (i32((num_experts + 1,)), i32((num_experts + 1,)),
                cute.runtime.make_fake_compact_tensor(Int32, (len(widths), n_tab, 3), stride_order=(2, 1, 0),
                                                      assumed_align=4),
                i32((len(widths),)), cute.runtime.make_fake_stream(use_tvm_ffi_env_stream=True))
        return PrefillTables(num_experts, top_k, widths), args
    return _load_or_compile(("prefill_tables", num_experts, top_k, tuple(widths)), build)


def _compile_prefill_place(num_experts: int, top_k: int, dim: int):
    def build():
        r, t = cute.sym_int(), cute.sym_int()
        i32 = lambda shape: cute.runtime.make_fake_compact_tensor(Int32, shape, assumed_align=4)   # noqa: E731
        f32 = cute.runtime.make_fake_compact_tensor(Float32, (r,), assumed_align=4)
        bf16 = lambda rows: cute.runtime.make_fake_compact_tensor(BFloat16, (rows, dim), stride_order=(1, 0),  # noqa
                                                                  assumed_align=16)
        args = (i32((r,)), f32, i32((r,)), i32((num_experts + 1,)), bf16(t), i32((r,)), f32, i32((r,)), bf16(r),
                cute.runtime.make_fake_stream(use_tvm_ffi_env_stream=True))
        return PrefillPlace(num_experts, top_k, dim), args
    return _load_or_compile(("prefill_place", num_experts, top_k, dim), build)


def prefill_unavailable_reason(x, experts) -> str | None:
    """None if moe_fp4_prefill can run these inputs, else a short reason (then use kernels.moe)."""
    reason = kernel_unavailable_reason(x, experts)
    if reason is not None:
        return reason
    D, inter = 2 * experts.w13.shape[2], experts.inter_dim
    if D % 256:
        return f"D={D} is not a multiple of 256 (row pairs of the down projection)"
    return None


_SMS: dict = {}


def _grid(dev, work_items: int) -> int:
    """Persistent grid: one CTA per SM, at most one per work item."""
    if dev not in _SMS:
        _SMS[dev] = torch.cuda.get_device_properties(dev).multi_processor_count
    return max(1, min(_SMS[dev], work_items))


def prefill_widths(num_tokens: int, top_k: int, num_experts: int) -> tuple:
    """Default wgmma width classes (PREFILL_WIDTHS = None). H200, whole MoE, sustained, vs one 128 width: R1 at ~96
    rows per expert (T = 4096) (96, 112, 128) -12%, (64, 96, 128) -7%; at ~384 rows (T = 16384) (64, 96, 128) -3.9%,
    (96, 112, 128) -0.9%. R2: (64, 96, 112, 128) within 0.6% of the best of those at both T (the 64 class holds
    few tiles at T = 4096, the 112 class few at T = 16384), so one set for every T."""
    return (64, 96, 112, 128)


def prefill_kernels(fmt: str, num_experts: int, top_k: int, dim: int, num_tokens: int = 4096, **gemm_options):
    """The compiled kernels of moe_fp4_prefill for these switches/options (also warms the compile cache):
    (gemm1 list, gemm2 list (one per width class), combine, widths); the routing kernels (count, tables, place)
    are compiled too (_prefill_steps fetches them from the cache)."""
    gemm_options = {**PREFILL_ABLATE, **gemm_options}
    tile_n = gemm_options.pop("tile_n", PREFILL_TILE_N)
    widths = gemm_options.pop("widths", PREFILL_WIDTHS)
    if widths is None:               # auto: width classes unless one tile width is asked for
        widths = prefill_widths(num_tokens, top_k, num_experts) if tile_n == 128 else ()
    widths = tuple(widths) or (tile_n,)
    gemm1, gemm2 = [], []
    for c, width in enumerate(widths):
        # launched widest first: the chain's last launch (whose tail nothing else fills) has the shortest items
        chain = "" if len(widths) == 1 else "first" if c == len(widths) - 1 else "next"
        gemm1.append(_compile_prefill_gemm(fmt, width, True, USE_PDL, chain=chain, **gemm_options))
        gemm2.append(_compile_prefill_gemm(fmt, width, False, USE_PDL, chain=chain, **gemm_options))
    _compile_prefill_count(num_experts), _compile_prefill_tables(num_experts, top_k, widths)
    _compile_prefill_place(num_experts, top_k, dim)
    combine = _compile_combine(top_k, dim, USE_PDL)
    return gemm1, gemm2, combine, widths


def _prefill_steps(x, topk_ids, topk_weights, experts, swiglu_limit: float, **gemm_options):
    """The launches of moe_fp4_prefill as (name, fn) in order (the bench times them one by one); y = last output."""
    pk = experts.packed if experts.packed is not None else prepare_experts(experts).packed
    T, D = x.shape
    k = topk_ids.shape[1]
    E, inter = pk.w13.shape[0], pk.inter
    R = T * k
    gemm1, gemm2, combine, widths = prefill_kernels(pk.fmt, E, k, D, T, **gemm_options)
    nc, tile_n = len(widths), widths[-1]
    dev = x.device
    src_tok = torch.empty(R, dtype=torch.int32, device=dev)         # sorted row -> token
    row_w = torch.empty(R, dtype=torch.float32, device=dev)         # routing weight of each sorted row
    pos = torch.empty(R, dtype=torch.int32, device=dev)             # slot -> sorted row (R: skipped)
    tiles = torch.empty(nc, max_tiles(R, E, tile_n), 3, dtype=torch.int32, device=dev)   # one table per width
    counts = torch.empty(nc, dtype=torch.int32, device=dev)          # tiles per width table
    x_sorted = torch.empty(R, D, dtype=torch.bfloat16, device=dev)
    act = torch.empty(R, inter, dtype=torch.bfloat16, device=dev)
    y_rows = torch.empty(R, D, dtype=torch.bfloat16, device=dev)
    y = torch.empty(T, D, dtype=x.dtype, device=dev)
    if POISON_BUFFERS:        # tests: NaN-fill the intermediates so an unwritten element shows up in y
        act.fill_(float("nan"))
        y_rows.fill_(float("nan"))
    limit = float(swiglu_limit) if swiglu_limit else math.inf
    n_tab = tiles.shape[1]
    ctas1 = _grid(dev, n_tab * (inter // 128))
    ctas2 = _grid(dev, n_tab * (D // 256))
    a_gate, a_up, a_down = pk.alphas
    ids32, w32 = topk_ids.reshape(-1).to(torch.int32), topk_weights.reshape(-1).to(torch.float32)
    # routing over many CTAs (count, tables, place = gather; session 3: no single-SM atomics)
    rank = torch.empty(R, dtype=torch.int32, device=dev)
    expert_rows = torch.empty(2, E + 1, dtype=torch.int32, device=dev)          # rows per expert, first row
    count_k, tables_k = _compile_prefill_count(E), _compile_prefill_tables(E, k, widths)
    place_k = _compile_prefill_place(E, k, D)
    steps = [("zero", lambda: expert_rows[0].zero_()),
             ("count", lambda: count_k(ids32, rank, expert_rows[0])),
             ("tables", lambda: tables_k(expert_rows[0], expert_rows[1], tiles, counts)),
             ("place", lambda: place_k(ids32, w32, rank, expert_rows[1], x.contiguous(), src_tok, row_w, pos,
                                       x_sorted))]
    w13, w2 = pk.w13.permute(3, 2, 1, 0), pk.w2.permute(3, 2, 1, 0)
    sfx = (lambda c: "") if nc == 1 else (lambda c: f" N={widths[c]}")     # noqa: E731
    for c in reversed(range(nc)):    # GEMM1 of every width class, widest first, then GEMM2 (PDL chains, see chain)
        steps.append((f"gemm1{sfx(c)}", lambda c=c: gemm1[c](w13, x_sorted, act, tiles[c], counts[c:c + 1], a_gate,
                                                               a_up, row_w, limit, ctas1)))
    for c in reversed(range(nc)):
        steps.append((f"gemm2{sfx(c)}", lambda c=c: gemm2[c](w2, act, y_rows, tiles[c], counts[c:c + 1], a_down,
                                                               a_down, row_w, limit, ctas2)))
    steps.append(("combine", lambda: combine(y_rows, pos, y)))       # fixed slot order, fp32 sum
    return steps, y


def route_width_tables(topk_ids: torch.Tensor, num_experts: int, widths: tuple):
    """Torch reference of PrefillRouting's tables (no host sync): -> tables [len(widths), max_tiles, 3] int32
    (expert, first sorted row, rows; rows = 0 past the count), counts [len(widths)]. Class c holds, by expert, the
    tiles whose rows fit widths[c] best; the last class also every full tile (an expert's full tiles, then its
    partial one if that lands there too)."""
    order, pos, tiles = route_tiles(topk_ids, num_experts, widths[-1])
    rows = tiles[:, 2].long()
    w = torch.tensor(widths, device=rows.device)
    cls = torch.searchsorted(w, rows.clamp(min=1))                   # narrowest width >= rows
    out = torch.zeros(len(widths), tiles.shape[0], 3, dtype=torch.int32, device=tiles.device)
    counts = torch.zeros(len(widths), dtype=torch.int32, device=tiles.device)
    for c in range(len(widths)):
        sel = ((cls == c) & (rows > 0)).long()
        dest = torch.where(sel > 0, torch.cumsum(sel, 0) - 1, torch.full_like(sel, tiles.shape[0]))
        buf = torch.zeros(tiles.shape[0] + 1, 3, dtype=torch.int32, device=tiles.device)
        buf.index_copy_(0, dest, tiles)                              # non-members go to the dump row
        out[c] = buf[:-1]
        counts[c] = sel.sum().to(torch.int32)
    return out, counts

def moe_fp4_prefill(x, topk_ids, topk_weights, experts, swiglu_limit: float):
    """Routed MoE for many tokens: kernels.moe_fp4's contract and semantics (routing kernel, sorted activations,
    fixed-order combine), with both GEMMs on Fp4PrefillGemm. No host sync; graph-capturable."""
    steps, y = _prefill_steps(x, topk_ids, topk_weights, experts, swiglu_limit)
    for _, fn in steps:
        fn()
    return y
