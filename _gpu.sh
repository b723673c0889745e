#!/bin/bash
# l2lane round script (session 8, R2): the IndexQuery -> IndexerTopK fold (kernels.INDEX_FOLD_QUERY): bit tests vs the
# two-launch path, the CSA query chain with / without it (_fold_probe.py), then the decode step with the fold flipped
# (bench.py decode ablation "indexfold": same-run timing + logits vs the default step). < 150 s incl. compiles.
cd "$(dirname "$0")"
export CUTE_DSL_ARCH=sm_90a
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,power.draw --format=csv,noheader 2>/dev/null
SECONDS=0
python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" || { echo "no GPU"; exit 0; }
timeout 40 python3 _fold_probe.py precompile 2>&1 | grep -v -i "warn\|leaked" | tail -2
echo "[t=${SECONDS}s] tests"
timeout 30 python3 -m pytest -q -p no:cacheprovider test_dsv4.py -k "gpu_index_fold" 2>&1 | grep -E "FAILED|passed|failed|rror" | cut -c1-200 | tail -8
echo "[t=${SECONDS}s] fold probe"
timeout 35 python3 _fold_probe.py 2>&1 | grep -v Warning
echo "[t=${SECONDS}s] decode step"
timeout $((146 - SECONDS)) python3 -u bench.py decode --layers 4 --batches 1 --precompile 12 --no-baseline \
  --no-linears --rounds 5 --ablations indexfold 2>&1 | grep -v -i "warn"
echo "[t=${SECONDS}s] done"
