#!/bin/bash
# l2lane round script (session 8, R1): (1) the IndexQuery -> IndexerTopK fold probe (_fold_probe.py: the most a fold
# can save, and IndexQuery's cost), (2) the L2-lane tables again for wo_a / wo_b (R0 was an H200; this may be an H100).
# Must finish in < 150 s incl. compiles.
cd "$(dirname "$0")"
export CUTE_DSL_ARCH=sm_90a
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,power.draw --format=csv,noheader 2>/dev/null
SECONDS=0
python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" && \
  timeout 40 python3 _l2lane.py precompile 2>&1 | grep -v -i "warn\|leaked" | tail -3
echo "[t=${SECONDS}s] fold probe"
timeout $((100 - SECONDS)) python3 _fold_probe.py 2>&1 | grep -v Warning
echo "[t=${SECONDS}s] tests"
timeout 20 python3 -m pytest -q -x -p no:cacheprovider test_dsv4.py -k "l2_lane" 2>&1 | tail -2
echo "[t=${SECONDS}s] L2 lane"
timeout $((143 - SECONDS)) python3 _l2lane.py wo_a wo_b 2>&1 | grep -v Warning
echo "[t=${SECONDS}s] done"
