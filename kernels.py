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
            return n
    return 128


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
    from cutlass import Int32, Float32, BFloat16, Uint8, const_expr
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

    def _decode_asm() -> str:
        m6, m14 = _R3_MASK
        pm = _BF16_PAIR_MASK
        return (
            "{\n.reg .b32 d0, d1, d2, d3, t, u;\n"
            f"and.b32 d0, $6, {pm:#x};\n"
            f"shf.l.wrap.b32 t, $6, $6, {_ROT[1][0]};\nand.b32 d1, t, {pm:#x};\n"
            f"shf.l.wrap.b32 t, $6, $6, {_ROT[2][0]};\nand.b32 d2, t, {pm:#x};\n"
            f"shf.l.wrap.b32 t, $6, $6, 6;\nshf.l.wrap.b32 u, $6, $6, 14;\n"
            f"and.b32 t, t, {m6:#x};\nand.b32 u, u, {m14:#x};\nor.b32 d3, t, u;\n"
            "mul.rn.bf16x2 $0, d0, $4;\nmul.rn.bf16x2 $1, d1, $5;\n"
            "mul.rn.bf16x2 $2, d2, $4;\nmul.rn.bf16x2 $3, d3, $5;\n}")

    @dsl_user_op
    def decode_fp4x8_scaled(word: Int32, scale_r: Int32, scale_r8: Int32, *, loc=None, ip=None):
        """One stored code word (8 e2m1) + bf16x2 scales (s_r, s_r), (s_r8, s_r8) -> the 4 bf16x2 fragment
        registers R0..R3 (rows r, r+8, r, r+8) times their scale: rotate + mask places the bits (see _ROT)."""
        res = _llvm.inline_asm(
            _ir.Type.parse("!llvm.struct<(i32, i32, i32, i32)>"),
            [Int32(scale_r).ir_value(loc=loc, ip=ip), Int32(scale_r8).ir_value(loc=loc, ip=ip),
             Int32(word).ir_value(loc=loc, ip=ip)],
            _decode_asm(), "=r,=r,=r,=r,r,r,r", has_side_effects=False, loc=loc, ip=ip)
        return _struct4(res, loc, ip)

    @dsl_user_op
    def scale_pair_bf16x2(word: Int32, byte: int, fmt: str, *, loc=None, ip=None) -> Int32:
        """Stored scale byte `byte` of word -> bf16x2 (s, s) with s = bf16(scale * 2^SCALE_EXP): prmt + mad."""
        shift, base = (4, (SCALE_EXP + 118) << 7) if fmt == "nvfp4" else (7, SCALE_EXP << 7)
        sel = 0x4040 | byte | (byte << 8)
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
                     smem_budget: int = 72 * 1024, pdl: bool = False):
            self.fmt, self.tile_n, self.k_dim, self.n_out, self.swiglu = fmt, tile_n, k_dim, n_out, swiglu
            self.k_splits = k_splits
            self.pdl = pdl          # programmatic dependent launch: weights prefetched before the previous kernel ends
            assert (k_dim // TILE_K) % (2 * k_splits) == 0, "each K slice needs an even number of 64-k tiles"
            self.k_tiles = k_dim // TILE_K // k_splits           # k-tiles per CTA (one K slice)
            self.m_tiles = (2 * n_out if swiglu else n_out) // TILE_M
            self.rec_rows = record_bytes(fmt) // REC_ROW
            stage_bytes = record_bytes(fmt) + tile_n * TILE_K * 2
            self.stages = max(3, min(10, self.k_tiles, smem_budget // stage_bytes))
            self.threads = 128

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
            if const_expr(self.pdl):
                # the next kernel may be scheduled once every CTA of this one has started (it waits for our end
                # before touching what we write); the tile table and the weights were ready before this kernel
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

                prod = pipeline.make_pipeline_state(pipeline.PipelineUserType.Producer, self.stages)
                cons = pipeline.make_pipeline_state(pipeline.PipelineUserType.Consumer, self.stages)
                rel = pipeline.make_pipeline_state(pipeline.PipelineUserType.Consumer, self.stages)
                k_tiles = self.k_tiles
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
                if const_expr(self.pdl):
                    cute.arch.griddepcontrol_wait()
                if warp_idx == 0:
                    pro_b = pipeline.make_pipeline_state(pipeline.PipelineUserType.Producer, self.stages)
                    for _ in cutlass.range(n_pro, unroll=1):
                        cute.copy(tma_b, tBgB[(None, kt0 + pro_b.count)], tBsB[(None, pro_b.index)],
                                  tma_bar_ptr=pipe.producer_get_barrier(pro_b))
                        pro_b.advance()

                for kt in cutlass.range(0, k_tiles, 2, unroll=1):
                    for h in cutlass.range_constexpr(2):
                        frag = frags[h]
                        pipe.consumer_wait(cons)
                        stage = cons.index
                        for a in cutlass.range_constexpr(2):
                            cute.autovec_copy(sW32[None, tidx, a, stage], codes[None, a])
                        for a in cutlass.range_constexpr(2):
                            cute.autovec_copy(sS32[None, quad, a, stage], scl[None, a])
                        for a in cutlass.range_constexpr(2):
                            for kb in cutlass.range_constexpr(4):
                                if const_expr(self.fmt == "nvfp4"):
                                    # per atom: word 0 = s_r of k16 blocks 0..3, word 1 = s_r8
                                    s_r = scale_pair_bf16x2(scl[0, a], kb, self.fmt)
                                    s_r8 = scale_pair_bf16x2(scl[1, a], kb, self.fmt)
                                else:
                                    # per atom: one word = (s_r, s_r) of k32 groups 0, 1, then (s_r8, s_r8)
                                    s_r = scale_pair_bf16x2(scl[0, a], kb // 2, self.fmt)
                                    s_r8 = scale_pair_bf16x2(scl[0, a], 2 + kb // 2, self.fmt)
                                r0, r1, r2, r3 = decode_fp4x8_scaled(codes[kb, a], s_r, s_r8)
                                frag[(0, 0, 0), a, kb] = r0
                                frag[(0, 1, 0), a, kb] = r1
                                frag[(0, 0, 1), a, kb] = r2
                                frag[(0, 1, 1), a, kb] = r3
                        warpgroup.fence()
                        for kb in cutlass.range_constexpr(4):
                            cute.gemm(tiled_mma, acc, (frag0, frag1)[h][None, None, kb],
                                      tCrB[None, None, kb, stage], acc)
                        warpgroup.commit_group()
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
        pos = R (skipped ids) add nothing. One thread per 8 columns (16-B loads and stores), grid (T, D / (8 threads))."""

        def __init__(self, top_k: int, dim: int, pdl: bool = False):
            self.k, self.dim, self.pdl = top_k, dim, pdl
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

# ----------------------------------------------------------------------------------------------------------------
# Compile cache: in memory, and on disk as exported objects (the second process start loads instead of compiling).
_COMPILED: dict = {}
_CACHE_DIR = os.path.join(os.path.expanduser("~"), ".cache", "nano-dsv4", "cute")


def _cache_key(config: tuple) -> str:
    with open(__file__, "rb") as f:
        src = f.read()
    ver = getattr(cutlass, "__version__", "?") if HAVE_CUTE else "-"
    return hashlib.sha256(src + repr((ver, config)).encode()).hexdigest()[:24]


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


def _compile_combine(top_k: int, dim: int, pdl: bool):
    def build():
        rows, tokens = cute.sym_int(), cute.sym_int()
        args = (cute.runtime.make_fake_compact_tensor(BFloat16, (rows, dim), stride_order=(1, 0), assumed_align=16),
                cute.runtime.make_fake_compact_tensor(Int32, (cute.sym_int(),), assumed_align=4),
                cute.runtime.make_fake_compact_tensor(BFloat16, (tokens, dim), stride_order=(1, 0),
                                                      assumed_align=16),
                cute.runtime.make_fake_stream(use_tvm_ffi_env_stream=True))
        return MoeCombine(top_k, dim, pdl), args
    return _load_or_compile(("combine", top_k, dim, pdl), build)


def _compile_gemm(fmt: str, tile_n: int, k_dim: int, n_out: int, swiglu: bool, k_splits: int = 1,
                  smem_budget: int = 72 * 1024, pdl: bool = False):
    """Compiled Fp4GroupedGemm for one static config (TVM-FFI entry: call with torch tensors on the current stream)."""
    config = (fmt, tile_n, k_dim, n_out, swiglu, k_splits, smem_budget, pdl)

    def build():
        gemm = Fp4GroupedGemm(fmt, tile_n, k_dim, n_out, swiglu, k_splits, smem_budget, pdl)
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
_COUNTERS: dict = {}


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
    zero between launches). Shared by all split-K launches on a device: launches must not run concurrently."""
    buf = _COUNTERS.get(device)
    if buf is None or buf.numel() < n:
        buf = torch.zeros(max(n, 1 << 16), dtype=torch.int32, device=device)
        _COUNTERS[device] = buf
    return buf


def moe_fp4(x, topk_ids, topk_weights, experts: Experts, swiglu_limit: float):
    """Routed MoE through the two grouped fp4 GEMMs (needs sm_90 + CuTe DSL + packed fp4 experts, x bf16).
    Everything stays on the device: no host sync, graph-capturable; the sum over the k slots has a fixed order."""
    pk = experts.packed if experts.packed is not None else prepare_experts(experts).packed
    T, D = x.shape
    k = topk_ids.shape[1]
    E, inter = pk.w13.shape[0], pk.inter
    R = T * k
    tile_n = pick_tile_n(T, k, E)
    dev = x.device
    src_tok = torch.empty(R, dtype=torch.int32, device=dev)         # sorted row -> token
    row_w = torch.empty(R, dtype=torch.float32, device=dev)         # routing weight of each sorted row
    pos = torch.empty(R, dtype=torch.int32, device=dev)             # slot -> sorted row (R: skipped)
    tiles = torch.empty(max_tiles(R, E, tile_n), 3, dtype=torch.int32, device=dev)
    _compile_routing(E, k, tile_n)(topk_ids.reshape(-1).to(torch.int32), topk_weights.reshape(-1).to(torch.float32),
                                   src_tok, row_w, pos, tiles)
    x_sorted = x.index_select(0, src_tok)                           # [R, D] rows grouped by expert
    act = torch.empty(R, inter, dtype=torch.bfloat16, device=x.device)
    y_rows = torch.empty(R, D, dtype=torch.bfloat16, device=x.device)   # one row per routed slot (sorted)
    if POISON_BUFFERS:        # tests: NaN-fill the intermediates so an unwritten element shows up in y
        act.fill_(float("nan"))
        y_rows.fill_(float("nan"))
    limit = float(swiglu_limit) if swiglu_limit else math.inf
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    smem = DECODE_SMEM_BUDGET if tile_n <= 16 else 72 * 1024
    s1 = pick_k_splits(R, E, 2 * inter // TILE_M, D // TILE_K, sms)
    s2 = pick_k_splits(R, E, D // TILE_M, inter // TILE_K, sms)
    gemm1 = _compile_gemm(pk.fmt, tile_n, D, inter, True, s1, smem, USE_PDL)
    gemm2 = _compile_gemm(pk.fmt, tile_n, inter, D, False, s2, smem, USE_PDL)
    n_tab = tiles.shape[0]
    counters = _split_counters(dev, n_tab * max(2 * inter, D) // TILE_M)
    unused = _COUNTERS.setdefault((dev, "unused"), torch.zeros(1, 1, 4, dtype=torch.float32, device=dev))
    part1 = torch.empty(s1, R, 2 * inter, dtype=torch.float32, device=dev) if s1 > 1 else unused   # fp32 partials
    part2 = torch.empty(s2, R, D, dtype=torch.float32, device=dev) if s2 > 1 else unused
    a_gate, a_up, a_down = pk.alphas                                # already times ACC_FIX
    gemm1(pk.w13.permute(3, 2, 1, 0), x_sorted, act, tiles, a_gate, a_up, row_w, limit, part1, counters)
    gemm2(pk.w2.permute(3, 2, 1, 0), act, y_rows, tiles, a_down, a_down, row_w, limit, part2, counters)
    y = torch.empty(T, D, dtype=x.dtype, device=dev)
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


def moe(x, topk_ids, topk_weights, experts: Experts, swiglu_limit: float):
    """Routed MoE: the CuTe DSL kernel where it can run (sm_90 + CuTe DSL + fp4 experts), else the reference."""
    global _NOTICE_SHOWN
    reason = kernel_unavailable_reason(x, experts)
    if reason is None:
        return moe_fp4(x, topk_ids, topk_weights, experts, swiglu_limit)
    if not _NOTICE_SHOWN:
        _NOTICE_SHOWN = True
        print(f"nano-dsv4: MoE falls back to the torch reference ({reason})", file=sys.stderr)
    return moe_reference(x, topk_ids, topk_weights, experts, swiglu_limit)
