#!/bin/bash
# fusedmoe GPU check (session 4): Fp4MoeGemvFused (GEMM1 + GEMM2 of the decode MoE in one launch) vs the two GEMV
# launches: bit-equality tests + the existing Fp4MoeGemv tests, then the timing table (graph replays, same run).
T0=$(date +%s)
python3 -c "import torch; assert torch.cuda.is_available()" 2>/dev/null || { echo "no GPU: skipped"; exit 0; }
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv,noheader
# every kernel config of the tests and the bench, compiled by 14 processes into the disk cache
for i in $(seq 0 13); do PYTHONPATH=$PWD timeout 32 python3 _gpu_precompile.py $i 14 > /tmp/fusedmoe_pre_$i.log 2>&1 & done
wait
echo "precompiled after $(( $(date +%s) - T0 )) s"; cat /tmp/fusedmoe_pre_*.log | grep -v "^$" | tail -5
echo "== fused tests ($(( $(date +%s) - T0 )) s)"
timeout 25 python3 -m pytest -q -x test_dsv4.py -p no:cacheprovider -k "moe_gemv_fused" 2>&1 | tail -8
echo "== bench: fused vs two launches ($(( $(date +%s) - T0 )) s)"
timeout 22 python3 bench.py moe --decode-only --ablate-fused 2>&1 | tail -9
echo "== existing Fp4MoeGemv tests ($(( $(date +%s) - T0 )) s)"
left=$(( 97 - ($(date +%s) - T0) ))
timeout $left python3 -m pytest -q test_dsv4.py -p no:cacheprovider -k "moe_gemv_gemm1_by_slot or moe_gemv_without_and_with or moe_gemv_is_deterministic or moe_gemv_matches_reference" 2>&1 | tail -6
echo "== done ($(( $(date +%s) - T0 )) s)"
