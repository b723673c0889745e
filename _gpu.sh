#!/bin/bash
# attn helper GPU check (session 5): sparse attention decode latency. SparseAttentionDecodeWide (ATTN_WIDE, new
# default) vs the cluster kernel of main (ATTN_WIDE=False, same run), Flash dims.
# 1. precompile every attention config of the tests + timing (12 background processes -> disk cache)
# 2. timing: CUDA-graph replays (20 calls, median of 15 interleaved rounds), PDL on/off; in-kernel phase stamps
# 3. correctness: the new GPU tests (wide vs reference/fp64, RoPE epilogue bit-equal, graph replays, old path)
T0=$(date +%s)
python3 -c "import torch; assert torch.cuda.is_available()" 2>/dev/null || { echo "no GPU: skipped"; exit 0; }
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm --format=csv,noheader
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
for i in $(seq 0 15); do timeout 50 python3 _attn_probe.py pre $i 16 > /tmp/attn_pre_$i.log 2>&1 & done
wait
echo "precompiled after $(( $(date +%s) - T0 )) s"
for f in $(grep -l -i "error\|Traceback" /tmp/attn_pre_*.log | head -2); do tail -n 6 $f; done
timeout 38 python3 _attn_probe.py time 2>&1 | grep -v Warning
echo "timing done after $(( $(date +%s) - T0 )) s"
timeout $(( 97 - ($(date +%s) - T0) )) python3 -m pytest -q -rf --tb=no test_dsv4.py -p no:cacheprovider \
    -k "(wide_attention or attention_wide or cluster_attention_kernel_behind) and not compiles" 2>&1 | cut -c1-240 | tail -n 30
echo "== done after $(( $(date +%s) - T0 )) s"
