"""Tests for the fp4 grouped MoE kernel (kernels.py): CPU tests of the repack and routing metadata, GPU tests of the
CuTe DSL path against the fp32 reference (skipped cleanly without CUDA sm_90 + CuTe DSL)."""
import glob
import math
import os
import subprocess
import sys

import pytest
import torch

import kernels as K


def random_fp4_experts(E, D, I, fmt, device="cpu", seed=0, alpha_gate=0.02, alpha_up=0.03, alpha_down=0.05):
    """Random fp4 experts; scales in a realistic range (nvfp4 e4m3 ~2^-3..2^3, mxfp4 e8m0 2^-10..2^0)."""
    g = torch.Generator(device=device).manual_seed(seed)
    g_ = K.FP4_GROUP[fmt]

    def codes(*shape):
        return torch.randint(0, 256, shape, generator=g, dtype=torch.uint8, device=device)

    def scales(*shape):
        if fmt == "nvfp4":
            v = torch.exp2(torch.randint(-3, 4, shape, generator=g, device=device).float())
            v = v * (1 + torch.randint(0, 8, shape, generator=g, device=device) / 8)
            return v.to(torch.float8_e4m3fn)
        return torch.randint(117, 128, shape, generator=g, dtype=torch.uint8, device=device).view(torch.float8_e8m0fnu)

    ex = K.Experts(
        fmt=fmt,
        w13=codes(E, 2 * I, D // 2).view(torch.float4_e2m1fn_x2), w13_scale=scales(E, 2 * I, D // g_),
        w2=codes(E, D, I // 2).view(torch.float4_e2m1fn_x2), w2_scale=scales(E, D, I // g_),
        alpha_gate=alpha_gate * (1 + torch.rand(E, generator=g, device=device)),
        alpha_up=alpha_up * (1 + torch.rand(E, generator=g, device=device)),
        alpha_down=alpha_down * (1 + torch.rand(E, generator=g, device=device)))
    if fmt == "mxfp4":     # e8m0 scales ~2^-5 on average: scale the alphas back up
        ex.alpha_gate *= 32; ex.alpha_up *= 32; ex.alpha_down *= 32
    return ex


# ---------------------------------------------------------------------------------------------------- CPU tests
def _valid_scale_bytes(fmt, shape, g):
    """Positive, nonzero, in-range block-scale bytes (nvfp4: every finite positive e4m3 incl. subnormals)."""
    if fmt == "nvfp4":
        return torch.randint(1, 0x7F, shape, generator=g, dtype=torch.uint8)
    return torch.randint(K._E8M0_MIN, K._E8M0_MAX + 1, shape, generator=g, dtype=torch.uint8)


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
def test_repack_round_trip_gives_back_codes_and_scales(fmt):
    g = torch.Generator().manual_seed(0)
    E, M, Kd = 2, 256, 256
    w = torch.randint(0, 256, (E, M, Kd // 2), generator=g, dtype=torch.uint8)
    s = _valid_scale_bytes(fmt, (E, M, Kd // K.FP4_GROUP[fmt]), g)
    rec = K.repack_fp4(w, s, fmt)
    assert rec.shape == (E, (M // 128) * (Kd // 64), K.record_bytes(fmt) // 256, 256)
    w2, s2 = K.unpack_fp4(rec, fmt, M, Kd)
    assert torch.equal(w, w2) and torch.equal(s, s2)


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
def test_record_is_exactly_the_checkpoint_bytes(fmt):
    g = K.FP4_GROUP[fmt]
    assert K.record_bytes(fmt) == 128 * 64 // 2 + 128 * 64 // g       # codes + one byte per block scale
    D, I = 4096, 2048
    assert K.weight_bytes_per_expert(fmt, D, I) == 3 * D * I // 2 + 3 * D * I // g


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
@pytest.mark.parametrize("special", [False, True])
def test_emulated_kernel_decode_equals_dequant(fmt, special):
    """The kernel's rotate/mask decode and scale encoding, emulated bit for bit, give exactly dequant_fp4's values;
    special=True adds zero, negative, subnormal and extreme scales (nvfp4) / tiny and largest scales (mxfp4)."""
    gen = torch.Generator().manual_seed(1)
    gs = K.FP4_GROUP[fmt]
    M, Kd = 256, 128
    w = torch.randint(0, 256, (1, M, Kd // 2), generator=gen, dtype=torch.uint8)
    s = _valid_scale_bytes(fmt, (1, M, Kd // gs), gen)
    if special and fmt == "nvfp4":
        s[0, :8, 0] = torch.tensor([0x00, 0x80, 0x01, 0x81, 0x7E, 0xFE, 0x07, 0x08], dtype=torch.uint8)
    if special and fmt == "mxfp4":
        s[0, :4, 0] = torch.tensor([0, 5, K._E8M0_MIN, K._E8M0_MAX], dtype=torch.uint8)
    rec = K.repack_fp4(w, s, fmt)
    dtype = torch.float8_e4m3fn if fmt == "nvfp4" else torch.float8_e8m0fnu
    ref = K.dequant_fp4(w, s.view(dtype), fmt)
    if special and fmt == "mxfp4":          # scales below 2^-109 are treated as zero (documented)
        ref[0, :2, :gs] = 0.0
    got = K.emulate_record_decode(rec, fmt, M, Kd)
    assert torch.equal(got, ref)


def test_repack_rejects_unsupported_scales():
    w = torch.zeros(1, 128, 64, dtype=torch.uint8)
    s = torch.full((1, 128, 8), 0x38, dtype=torch.uint8)
    s[0, 5, 1] = 0x7F                                   # e4m3 NaN
    with pytest.raises(ValueError, match="NaN"):
        K.repack_fp4(w, s, "nvfp4")
    s = torch.full((1, 128, 4), 127, dtype=torch.uint8)
    s[0, 0, 0] = K._E8M0_MAX + 1
    with pytest.raises(ValueError, match="above"):
        K.repack_fp4(w, s, "mxfp4")


def test_gate_up_interleave_puts_matching_rows_in_one_tile():
    order = K._gate_up_row_order(256, "cpu")
    assert sorted(order.tolist()) == list(range(512))
    tile = order[128:256]                      # second 128-row tile: gate 64..127, up 256+64..256+127
    assert torch.equal(tile[:64], torch.arange(64, 128)) and torch.equal(tile[64:], torch.arange(320, 384))


@pytest.mark.parametrize("tile_n", [8, 16, 128])
@pytest.mark.parametrize("seed", [0, 1])
def test_route_tiles_matches_a_simple_loop(tile_n, seed):
    g = torch.Generator().manual_seed(seed)
    T, k, E = 37, 6, 12
    ids = torch.randint(-2, E + 2, (T, k), generator=g, dtype=torch.int32)   # includes skipped slots
    order, pos, tiles = K.route_tiles(ids, E, tile_n)
    flat = ids.reshape(-1).tolist()
    expect_order = [s for e in range(E) for s in range(T * k) if flat[s] == e]
    valid = len(expect_order)
    assert order[:valid].tolist() == expect_order
    assert sorted(order[valid:].tolist()) == [s for s in range(T * k) if not 0 <= flat[s] < E]
    for s in range(T * k):
        assert pos[s].item() == (expect_order.index(s) if 0 <= flat[s] < E else T * k)
    expect_tiles, row = [], 0
    for e in range(E):
        n = sum(1 for v in flat if v == e)
        for t0 in range(0, n, tile_n):
            expect_tiles.append((e, row + t0, min(tile_n, n - t0)))
        row += n
    got = [tuple(r) for r in tiles.tolist() if r[2] > 0]
    assert got == expect_tiles
    assert tiles.shape[0] >= len(expect_tiles)


def test_moe_falls_back_to_reference_on_cpu():
    ex = random_fp4_experts(4, 128, 128, "nvfp4")
    x = torch.randn(3, 128, dtype=torch.bfloat16)
    ids = torch.tensor([[0, 1], [2, -1], [3, 0]], dtype=torch.int32)
    w = torch.rand(3, 2)
    assert torch.equal(K.moe(x, ids, w, ex, 7.0), K.moe_reference(x, ids, w, ex, 7.0))


# ---------------------------------------------------------------------------------------------------- GPU tests
def _gpu_ok():
    return torch.cuda.is_available() and K.HAVE_CUTE and torch.cuda.get_device_capability() == (9, 0)


gpu = pytest.mark.skipif(not _gpu_ok(), reason="needs an sm_90 GPU and CuTe DSL")


def _routing(T, k, E, kind, device, seed):
    g = torch.Generator(device="cpu").manual_seed(seed)
    if kind == "random":
        ids = torch.argsort(torch.rand(T, E, generator=g), dim=1)[:, :k]
    elif kind == "one_expert":                   # every token's first slot on expert 3, the rest skipped
        ids = torch.full((T, k), -1)
        ids[:, 0] = 3
    elif kind == "empty_experts":                # only experts 0..k+1 used; skipped slots (remote ids) sprinkled in
        ids = torch.argsort(torch.rand(T, k + 2, generator=g), dim=1)[:, :k]
        ids[torch.rand(T, k, generator=g) < 0.2] = E + 5
    ids = ids.to(torch.int32).to(device)
    w = torch.rand(T, k, generator=g).to(device)
    return ids, w / w.sum(1, keepdim=True)


def _check(ex, T, k, routing, seed, limit=7.0):
    dev = "cuda"
    E = ex.num_experts
    D = 2 * ex.w13.shape[2]
    x = torch.randn(T, D, generator=torch.Generator().manual_seed(seed)).to(dev, torch.bfloat16)
    ids, w = _routing(T, k, E, routing, dev, seed)
    K.POISON_BUFFERS = True
    try:
        y = K.moe_fp4(x, ids, w, ex, limit)
        torch.cuda.synchronize()
    finally:
        K.POISON_BUFFERS = False
    ref = K.moe_reference(x.float(), ids, w, ex, limit)     # fp32 throughout, same dequantized weights
    # the kernel rounds the intermediate to bf16 like moe_reference does for bf16 x; compare to fp32 reference
    assert torch.isfinite(y).all()
    yf, rf = y.float(), ref.float()
    cos = torch.nn.functional.cosine_similarity(yf.flatten(), rf.flatten(), dim=0).item()
    rel = ((yf - rf).norm() / rf.norm().clamp_min(1e-30)).item()
    assert cos >= 0.9999 and rel <= 1e-2, f"T={T} {routing}: cos={cos:.6f} rel={rel:.2e}"
    return cos, rel


_SMALL = {}


def _small(fmt):
    if fmt not in _SMALL:
        _SMALL[fmt] = K.prepare_experts(random_fp4_experts(16, 512, 256, fmt, device="cuda", seed=1))
    return _SMALL[fmt]


@gpu
@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
@pytest.mark.parametrize("T", [1, 2, 3, 7, 64, 255, 256, 1000, 4096])
@pytest.mark.parametrize("routing", ["random", "empty_experts", "one_expert"])
def test_fp4_moe_kernel_matches_fp32_reference(fmt, T, routing):
    _check(_small(fmt), T, 6 if routing != "one_expert" else 2, routing, seed=T)


@gpu
@pytest.mark.parametrize("T, E, tile_n", [(1, 256, 8), (37, 12, 16), (5000, 384, 128)])
def test_routing_kernel_matches_torch_route_tiles(T, E, tile_n):
    k = 6
    ids = torch.randint(-2, E + 2, (T, k), dtype=torch.int32, device="cuda")
    w = torch.rand(T, k, device="cuda")
    R = T * k
    order, pos_ref, tiles_ref = K.route_tiles(ids, E, tile_n)
    src = torch.full((R,), -7, dtype=torch.int32, device="cuda")
    row_w = torch.full((R,), float("nan"), device="cuda")
    pos = torch.full((R,), -7, dtype=torch.int32, device="cuda")
    tiles = torch.full((K.max_tiles(R, E, tile_n), 3), -7, dtype=torch.int32, device="cuda")
    K._compile_routing(E, k, tile_n)(ids.reshape(-1), w.reshape(-1), src, row_w, pos, tiles)
    used = tiles_ref[:, 2] > 0                              # same table (counts, starts) as the torch version
    assert torch.equal(tiles[used], tiles_ref[used]) and (tiles[~used, 2] == 0).all()
    valid = (ids.reshape(-1) >= 0) & (ids.reshape(-1) < E)
    assert torch.equal(pos[~valid], torch.full_like(pos[~valid], R))
    p = pos[valid].long()                                   # inside an expert the order may differ: check consistency
    assert torch.equal(torch.sort(p).values, torch.sort(pos_ref[valid].long()).values)
    slots = torch.arange(R, device="cuda")[valid]
    assert torch.equal(src[p].long(), slots // k) and torch.equal(row_w[p], w.reshape(-1)[valid])


@gpu
def test_fp4_moe_kernel_output_is_poison_free_and_deterministic():
    ex = _small("nvfp4")
    x = torch.randn(300, 512, device="cuda", dtype=torch.bfloat16)
    ids, w = _routing(300, 6, 16, "random", "cuda", 3)
    y1 = K.moe_fp4(x, ids, w, ex, 7.0)
    y2 = K.moe_fp4(x, ids, w, ex, 7.0)
    assert torch.isfinite(y1).all() and torch.equal(y1, y2)


@gpu
@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
@pytest.mark.parametrize("T", [1, 64, 16384])
def test_fp4_moe_kernel_flash_dims(fmt, T):
    ex = K.prepare_experts(random_fp4_experts(256, 4096, 2048, fmt, device="cuda", seed=2))
    _check(ex, T, 6, "random", seed=T)


@gpu
@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
def test_fp4_moe_kernel_small_dims_large_T(fmt):
    _check(_small(fmt), 16384, 6, "random", seed=7)


@gpu
@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
def test_fp4_moe_kernel_pro_dims(fmt):
    ex = K.prepare_experts(random_fp4_experts(384, 7168, 3072, fmt, device="cuda", seed=3))
    for T in (3, 256):
        _check(ex, T, 6, "random", seed=T)


@gpu
@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
@pytest.mark.parametrize("T", [1, 2, 7])
def test_split_k_matches_reference_and_is_deterministic(fmt, T, monkeypatch):
    """Small dims have too few k-tiles for the default split rule: allow 2-tile slices so K splits 2-4 ways."""
    monkeypatch.setattr(K, "SPLIT_MIN_K_TILES", 1)
    ex = _small(fmt)
    D, I = 512, 256
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    assert K.pick_k_splits(T * 6, 16, 2 * I // 128, D // 64, sms) > 1      # the path under test is taken
    _check(ex, T, 6, "random", seed=T)
    x = torch.randn(T, D, device="cuda", dtype=torch.bfloat16)
    ids, w = _routing(T, 6, 16, "random", "cuda", 5)
    outs = [K.moe_fp4(x, ids, w, ex, 7.0) for _ in range(3)]
    assert all(torch.equal(outs[0], o) for o in outs[1:])


@gpu
@pytest.mark.parametrize("T", [1, 7, 300])
def test_pdl_launches_give_the_same_bits_as_plain_launches(T, monkeypatch):
    """Programmatic dependent launch (weights prefetched while the previous kernel ends) changes no result: outputs
    of back-to-back calls equal the plainly launched ones bit for bit (a missing wait would read stale/NaN rows)."""
    monkeypatch.setattr(K, "SPLIT_MIN_K_TILES", 1)          # split-K on too (shared counters across the two GEMMs)
    monkeypatch.setattr(K, "POISON_BUFFERS", True)
    ex = _small("nvfp4")
    x = torch.randn(T, 512, device="cuda", dtype=torch.bfloat16)
    ids, w = _routing(T, 6, 16, "empty_experts", "cuda", 11)
    monkeypatch.setattr(K, "USE_PDL", False)
    ref = K.moe_fp4(x, ids, w, ex, 7.0)
    monkeypatch.setattr(K, "USE_PDL", True)
    outs = [K.moe_fp4(x, ids, w, ex, 7.0) for _ in range(4)]
    assert torch.isfinite(ref).all() and all(torch.equal(ref, o) for o in outs)


_CACHE_SCRIPT = """
import sys, torch, kernels as K
from _wip_test_kernels import random_fp4_experts
if sys.argv[1] == "second":
    def refuse(*a, **kw):
        raise RuntimeError("compiled although the disk cache holds this kernel")
    K.cute.compile = refuse
ex = K.prepare_experts(random_fp4_experts(8, 256, 128, "nvfp4", device="cuda", seed=0))
x = torch.randn(3, 256, generator=torch.Generator().manual_seed(0)).to("cuda", torch.bfloat16)
ids = torch.tensor([[0, 1], [2, 3], [4, 5]], dtype=torch.int32, device="cuda")
y = K.moe_fp4(x, ids, torch.full((3, 2), 0.5, device="cuda"), ex, 7.0)
torch.save(y.cpu(), sys.argv[2])
"""


@gpu
def test_second_process_loads_kernels_from_disk_cache(tmp_path):
    """A fresh process with the same HOME loads the exported kernels instead of compiling (cute.compile refuses)."""
    env = dict(os.environ, HOME=str(tmp_path))
    here = os.path.dirname(os.path.abspath(__file__))
    for which in ("first", "second"):
        subprocess.run([sys.executable, "-c", _CACHE_SCRIPT, which, str(tmp_path / f"{which}.pt")], env=env,
                       cwd=here, check=True, timeout=900)
    objs = glob.glob(str(tmp_path / ".cache" / "nano-dsv4" / "cute" / "*.o"))
    assert len(objs) >= 4                                   # routing + 2 GEMMs + combine
    assert torch.equal(torch.load(tmp_path / "first.pt"), torch.load(tmp_path / "second.pt"))
