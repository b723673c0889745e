#!/bin/bash
# decstage GPU check (session 3): MoE decode tests with the v6 defaults, then the decode bench with v6 ablations.
export MOEDEC_T0=$(date +%s)
python3 -c "import torch; assert torch.cuda.is_available()" 2>/dev/null || { echo "no GPU: skipped"; exit 0; }
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv,noheader
timeout 45 python3 -m pytest -q -x test_dsv4.py -k "test_ring_main_loop or test_ring_with_split or test_decode_default_path or test_flash_dims_decode or test_split_k_matches or test_pdl_launches or test_default_path_is_bitwise or test_fused_gather or (test_fp4_moe_kernel_matches_fp32_reference and not 1000 and not 4096)" 2>&1 | tail -4
echo "tests done after $(( $(date +%s) - MOEDEC_T0 )) s"
BENCH_BUDGET_S=92 timeout $(( 97 - ($(date +%s) - MOEDEC_T0) )) python3 bench.py moe --decode-only --ablate-v6
