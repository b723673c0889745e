#!/bin/bash
# moemid (session 7) GPU check: routed MoE decode T = 4..256 (Flash dims, nvfp4), variants vs the defaults, same run.
cd "$(dirname "$0")"
T0=$(date +%s)
if ! python3 -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "moemid _gpu.sh: no CUDA device here; skipped"; exit 0
fi
nvidia-smi --query-gpu=name,clocks.max.sm,clocks.sm,power.limit --format=csv,noheader
# variants: name=KNOB:value;...[@T,T]; "base" (defaults) always runs
export MID_VARIANTS="direct=MOE_GEMV_DIRECT:True@4 dready=MOE_GEMV_DIRECT:True;MOE_GEMV_READY:True@4 g1mt1=MOE_GEMV_FORCE:((1,1),None)@4 ready=MOE_GEMV_READY:True@16,64,128,256 tokasync=MOE_GEMV_TOK_ASYNC:True w16p4=MOE_GEMV_WARPS_PER_SM:16;MOE_GEMV_PAIR_STAGES:4@64,256 nopair=MOE_GEMV_PAIR:False@256"
export MID_TS="4,16,64,128,256" MID_ROUNDS=15 MID_BUDGET_S=12 MID_TRACE="4:base 4:direct 256:base" MID_STAMPS="4:base 4:direct 4:tokasync 64:base 64:tokasync 256:nopair"
for i in 0 1 2 3 4 5 6 7 8 9; do timeout 45 python3 _moemid_gpu.py --precompile $i 10 > pre_$i.txt 2>&1 & done
wait
grep -h -E "Error|error" pre_*.txt | head -5
# a variant whose precompile run did not finish (a hang / crash) is left out of the timing
for v in dready ready tokasync direct; do
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
LEFT=$(( 97 - ($(date +%s) - T0) ))
if [ $LEFT -gt 8 ]; then
    timeout $LEFT python3 -m pytest -q -x test_dsv4.py -k "(moe_gemv_direct_gives and nvfp4 and 1-2) or moe_gemv_direct_graph or (moe_gemv_ready_and and nvfp4)" -p no:cacheprovider 2>&1 | tail -4
fi
echo "== done ($(( $(date +%s) - T0 )) s)"
