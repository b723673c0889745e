#!/bin/bash
# moemid (session 7) GPU check: routed MoE decode T = 4..256 (Flash dims, nvfp4), variants vs the defaults, same run.
cd "$(dirname "$0")"
T0=$(date +%s)
if ! python3 -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "moemid _gpu.sh: no CUDA device here; skipped"; exit 0
fi
nvidia-smi --query-gpu=name,clocks.max.sm,clocks.sm,power.limit --format=csv,noheader
# variants: name=KNOB:value;...[@T,T]; "base" (defaults) always runs
export MID_VARIANTS="direct=MOE_GEMV_DIRECT:True@4 tokasync=MOE_GEMV_TOK_ASYNC:True dtok=MOE_GEMV_DIRECT:True;MOE_GEMV_TOK_ASYNC:True@4 ready=MOE_GEMV_READY:True@16,64,128,256 dtw=MOE_GEMV_DIRECT:True;MOE_GEMV_TOK_ASYNC:True;MOE_GEMV_FORCE:((1,1),(1,1));MOE_GEMV_WARPS_PER_SM:12;MOE_GEMV_STAGES:8@4 w12s8=MOE_GEMV_FORCE:((1,1),(1,1));MOE_GEMV_WARPS_PER_SM:12;MOE_GEMV_STAGES:8@16,64"
export MID_TS="4,16,64,128,256" MID_ROUNDS=25 MID_BUDGET_S=22 MID_TRACE="4:base 4:dtok" MID_STAMPS=""
for i in 0 1 2 3 4 5 6 7 8 9; do timeout 45 python3 _moemid_gpu.py --precompile $i 10 > pre_$i.txt 2>&1 & done
wait
grep -h -E "Error|error" pre_*.txt | head -5
# a variant whose precompile run did not finish (a hang / crash) is left out of the timing
for v in dtok ready tokasync direct dtw w12s8; do
    if [ "$(cat pre_*.txt | grep -c "^plan $v ")" != "$(cat pre_*.txt | grep -c "^done $v ")" ]; then
        echo "variant $v: no finished precompile run; left out"
        MID_VARIANTS=$(echo "$MID_VARIANTS" | tr ' ' '\n' | grep -v "^$v=" | tr '\n' ' ')
        MID_STAMPS=$(echo "$MID_STAMPS" | tr ' ' '\n' | grep -v ":$v\$" | tr '\n' ' ')
    fi
done
export MID_VARIANTS MID_STAMPS
echo "== precompiled ($(( $(date +%s) - T0 )) s)"
timeout $(( 78 - ($(date +%s) - T0) )) python3 _moemid_gpu.py 2>&1 | grep -v "^$" | cut -c1-2500
echo "== bench done ($(( $(date +%s) - T0 )) s)"
LEFT=$(( 92 - ($(date +%s) - T0) ))
if [ $LEFT -gt 8 ]; then
    timeout $LEFT python3 -m pytest -q -x test_dsv4.py -k "(moe_gemv_direct_gives and 1-2) or moe_gemv_direct_graph or (moe_gemv_ready_and and tokasync and nvfp4)" -p no:cacheprovider 2>&1 | tail -3
fi
echo "== done ($(( $(date +%s) - T0 )) s)"
