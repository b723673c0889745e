#!/bin/bash
# decstage GPU check (session 3): a Flash-dims smoke test of the v6 decode loop (bits vs the v5 loop), the MoE
# decode tests with the v6 defaults, then the decode bench with the v6 ablations (baseline + copy BW in the same run).
export MOEDEC_T0=$(date +%s)
python3 -c "import torch; assert torch.cuda.is_available()" 2>/dev/null || { echo "no GPU: skipped"; exit 0; }
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv,noheader
# compile every GEMM config of the smoke test, the tests and the bench in 12 background processes (disk cache:
# the later processes load them in ~ms instead of compiling one after another, ~1 s each)
cat > /tmp/decstage_pre.py <<'PY'
import sys, kernels as K
me, n = int(sys.argv[1]), int(sys.argv[2])
knobsets = [dict(), dict(DECODE_RING=False), dict(DECODE_RING=False, TILE_N_SD=0), dict(TILE_N_SD=0), dict(TILE_N_SD=0, DECODE_PAIR=True, PAIR_SPLIT=True),
            dict(TILE_N_SD=0, DECODE_PAIR=True), dict(RING_MSHARE=True, RING_REFILL_WARPS=8), dict(RING_DIAG="nodecode"),
            dict(PAIR_MIN_ROWS=1.0, TILE_N_SD=0, DECODE_PAIR=True, PAIR_SPLIT=True),
            dict(PAIR_MIN_ROWS=1.0, TILE_N_SD=0, DECODE_PAIR=True), dict(PAIR_MIN_ROWS=1.0, TILE_N_SD=0)]
small = [dict(), dict(DECODE_RING=False), dict(RING_MSHARE=True, RING_REFILL_WARPS=8),
         dict(PAIR_MIN_ROWS=1.0, TILE_N_SD=0, DECODE_PAIR=True, PAIR_SPLIT=True),
         dict(PAIR_MIN_ROWS=1.0, TILE_N_SD=0, DECODE_PAIR=True), dict(PAIR_MIN_ROWS=1.0, TILE_N_SD=0)]
cfgs = []
for kn in knobsets:
    saved = {k: getattr(K, k) for k in kn}
    for k, v in kn.items():
        setattr(K, k, v)
    dims = [("nvfp4", 256, 4096, 2048, (1, 4, 16, 64, 256))]
    if kn in small:
        dims += [("nvfp4", 64, 512, 256, (1, 7, 45, 60, 100)), ("mxfp4", 64, 512, 256, (1, 7, 45, 60, 100))]
    for fmt, E, D, I, Ts in dims:
        for T in Ts:
            for cfg in K.gemm_configs(fmt, 6 * T, E, D, I, K.pick_tile_n(T, 6, E), 132):
                if cfg not in cfgs:
                    cfgs.append(cfg)
    for k, v in saved.items():
        setattr(K, k, v)
for cfg in cfgs[me::n]:
    K._compile_gemm(*cfg)
PY
for i in $(seq 0 11); do PYTHONPATH=$PWD timeout 40 python3 /tmp/decstage_pre.py $i 12 > /dev/null 2>&1 & done
wait
echo "precompiled after $(( $(date +%s) - MOEDEC_T0 )) s"
timeout 25 python3 - <<'PY' || export DECSTAGE_RING_OFF=1
import torch, kernels as K, bench
ex = bench.random_packed_experts(256, 4096, 2048, "cuda", 0)
for T in (16, 64, 256):
    g = torch.Generator(device="cuda").manual_seed(T)
    ids = torch.argsort(torch.rand(T, 256, device="cuda", generator=g), dim=1)[:, :6].to(torch.int32)
    w = torch.rand(T, 6, device="cuda", generator=g)
    x = torch.randn(T, 4096, device="cuda", dtype=torch.bfloat16, generator=g)
    out = {}
    variants = {"v5": dict(DECODE_RING=False), "v6 default": dict(), "ring 8-row": dict(TILE_N_SD=0),
                "ring pairsplit": dict(TILE_N_SD=0, DECODE_PAIR=True, PAIR_SPLIT=True),
                "ring mshare": dict(RING_MSHARE=True, RING_REFILL_WARPS=8)}
    for name, kn in variants.items():
        saved = {k: getattr(K, k) for k in kn}
        for k, v in kn.items():
            setattr(K, k, v)
        out[name] = K.moe_fp4(x, ids, w, ex, 10.0)
        for k, v in saved.items():
            setattr(K, k, v)
    torch.cuda.synchronize()
    print(f"smoke Flash T={T}: finite {bool(torch.isfinite(out['v5']).all())}, same bits as v5: " + ", ".join(
        f"{n} {torch.equal(out['v5'], o)}" for n, o in out.items() if n != "v5"), flush=True)
PY
BENCH_ROUNDS=3 BENCH_BUDGET_S=80 timeout $(( 78 - ($(date +%s) - MOEDEC_T0) )) python3 bench.py moe --decode-only --ablate-v6
echo "bench done after $(( $(date +%s) - MOEDEC_T0 )) s"
R=test_dsv4.py::test_ring_main_loop_gives_the_bits_of_the_v5_loop
P=test_dsv4.py::test_paired_tiles_give_the_bits_of_unpaired_tiles
timeout $(( 98 - ($(date +%s) - MOEDEC_T0) )) python3 -m pytest -v -p no:randomly --tb=line \
  "test_dsv4.py::test_flash_dims_decode_matches_reference[256]" "$P[split-60-False-nvfp4]" "$P[split-45-True-mxfp4]" \
  "test_dsv4.py::test_decode_default_path_matches_reference[nvfp4-100]" "$R[w8s8mshare-nvfp4-60]" \
  "$P[n16-45-True-nvfp4]" "$R[w4s8-nvfp4-60]" "$R[w4s8-mxfp4-7]" "$R[w4s8-nvfp4-1]" \
  "test_dsv4.py::test_default_path_is_bitwise_repeatable_and_pdl_neutral" \
  "test_dsv4.py::test_flash_dims_decode_matches_reference[64]" \
  "test_dsv4.py::test_fp4_moe_kernel_matches_fp32_reference[random-1-nvfp4]" \
  "test_dsv4.py::test_fp4_moe_kernel_matches_fp32_reference[empty_experts-3-mxfp4]" \
  "test_dsv4.py::test_split_k_matches_reference_and_is_deterministic[2-nvfp4]" \
  "test_dsv4.py::test_ring_with_split_k_slices_of_two_k_tiles[7]" 2>&1 | \
  grep -E "PASSED|FAILED|ERROR|^E |passed|failed" | sed 's/^test_dsv4.py:://' | cut -c1-160 | head -40
echo "tests done after $(( $(date +%s) - MOEDEC_T0 )) s"
