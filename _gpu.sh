#!/bin/bash
# decstage GPU check (session 3): a Flash-dims smoke test of the v6 decode loop (bits vs the v5 loop), the MoE
# decode tests with the v6 defaults, then the decode bench with the v6 ablations (baseline + copy BW in the same run).
export MOEDEC_T0=$(date +%s)
python3 -c "import torch; assert torch.cuda.is_available()" 2>/dev/null || { echo "no GPU: skipped"; exit 0; }
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv,noheader
timeout 25 python3 - <<'PY' || export DECSTAGE_RING_OFF=1
import torch, kernels as K, bench
ex = bench.random_packed_experts(256, 4096, 2048, "cuda", 0)
for T in (16, 64, 256):
    g = torch.Generator(device="cuda").manual_seed(T)
    ids = torch.argsort(torch.rand(T, 256, device="cuda", generator=g), dim=1)[:, :6].to(torch.int32)
    w = torch.rand(T, 6, device="cuda", generator=g)
    x = torch.randn(T, 4096, device="cuda", dtype=torch.bfloat16, generator=g)
    out = {}
    for ring, pair in ((False, False), (True, False), (True, True)):
        K.DECODE_RING, K.DECODE_PAIR = ring, pair
        out[ring, pair] = K.moe_fp4(x, ids, w, ex, 10.0)
    torch.cuda.synchronize()
    ok = [torch.equal(out[False, False], out[True, False]), torch.equal(out[False, False], out[True, True])]
    print(f"smoke Flash T={T}: ring == v5 loop {ok[0]}, ring+pair == v5 loop {ok[1]}, "
          f"finite {bool(torch.isfinite(out[False, False]).all())}", flush=True)
PY
timeout 30 python3 -m pytest -q test_dsv4.py -k "(test_ring_main_loop and (w4s8 or w3s2) and not spin) or test_paired_tiles or test_default_path_is_bitwise" 2>&1 | tail -5
echo "tests done after $(( $(date +%s) - MOEDEC_T0 )) s"
BENCH_BUDGET_S=90 timeout $(( 98 - ($(date +%s) - MOEDEC_T0) )) python3 bench.py moe --decode-only --ablate-v6
