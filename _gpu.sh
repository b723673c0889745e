#!/bin/bash
# prefill helper's GPU check (< 100 s incl. compiles): compile in parallel, the prefill GPU tests, then the prefill
# bench (kernels.moe as dsv4.py calls it; burst / graph / sustained, clocks; torch bf16 baseline and bf16 matmul in
# the same run; ablations paired with default rows).
cd "$(dirname "$0")"
if ! python3 -c "import torch, sys, importlib.util as u; sys.exit(0 if torch.cuda.is_available() and u.find_spec('cutlass') else 1)"; then
    echo "no CUDA GPU or no CuTe DSL here: nothing to run"; exit 0
fi
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit,memory.total --format=csv,noheader
date -u +"start %T"
timeout 22 python3 bench.py moe --prefill-warm --ablate-prefill 2>&1 | tail -3
date -u +"compiled %T"
timeout 44 python3 -u -m pytest -q -x -p no:cacheprovider --tb=line -rf test_dsv4.py -k "prefill and gpu and \
(flash_dims_matches or small_dims or deterministic or threshold or default_launches or many_ctas or session2_path)" 2>&1 | tail -4
date -u +"tested %T"
timeout 30 python3 bench.py moe --prefill --ablate-prefill 2>&1
date -u +"end %T"
