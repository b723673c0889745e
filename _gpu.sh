#!/bin/bash
# l2lane round script (session 8): the L2 prefetch kernel's no-data-change test, then the go/no-go timings of
# _l2lane.py (cold vs warm GEMV, the lane beside a latency-bound kernel). Must finish in < 150 s incl. compiles.
cd "$(dirname "$0")"
export CUTE_DSL_ARCH=sm_90a
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,power.draw --format=csv,noheader 2>/dev/null
SECONDS=0
python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" && \
  timeout 60 python3 _l2lane.py precompile 2>&1 | grep -v -i "warn\|leaked" | tail -3
echo "[t=${SECONDS}s] tests"
timeout 20 python3 -m pytest -q -x -p no:cacheprovider test_dsv4.py -k "l2_lane and not decode" 2>&1 | tail -3
echo "[t=${SECONDS}s] timings"
timeout $((125 - SECONDS)) python3 _l2lane.py 2>&1 | grep -v Warning
echo "[t=${SECONDS}s] prefetch sizes (own process: a refused size must not take the table above down)"
L2_SWEEP=1 timeout $((143 - SECONDS)) python3 _l2lane.py wo_a wo_b 2>&1 | grep -v Warning | tail -4
echo "[t=${SECONDS}s] done"
