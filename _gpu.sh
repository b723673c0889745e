#!/bin/bash
# mhc GPU check (session 4, issue #5): mHC in one launch per site (kernels.HcOneLaunch) vs the HcMix + HcFinalize pair.
# 1. precompile every hc kernel the tests and the timing use (16 background processes -> disk cache)
# 2. correctness: the mHC GPU tests (both paths; one-launch == two-kernel bit for bit; counters back to zero)
# 3. timing: CUDA-graph replays of 8 chained sites at Flash dims (D 4096, n 4, mix 24, 20 Sinkhorn iterations, fused
#    RMSNorm), two-kernel path (baseline) vs one launch, same run, interleaved rounds, median.
export MHC_T0=$(date +%s)
python3 -c "import torch; assert torch.cuda.is_available()" 2>/dev/null || { echo "no GPU: skipped"; exit 0; }
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv,noheader
cat > /tmp/mhc_pre.py <<'PY'
import sys, kernels as K
me, n = int(sys.argv[1]), int(sys.argv[2])
cfgs = []
for D in (4096, 256):
    cfgs += [("mix", D, 4, 24, False), ("mix", D, 4, 24, True), ("mix", D, 4, 4, False), ("post", D, 4)]
    cfgs += [("fin", D, 4, 24, 20, False, nm) for nm in (False, True)] + [("fin", D, 4, 4, 1, True, nm) for nm in (False, True)]
    for pf in ((True, False) if D == 4096 else (True,)):     # prefetch: M <= 4 at D 4096 (grid <= SMs)
        cfgs += [("one", D, 4, 24, 20, False, nm, fu, 1, None, pf) for nm in (False, True) for fu in (False, True)]
        cfgs += [("one", D, 4, 4, 1, True, nm, False, 1, None, pf) for nm in (False, True)]
cfgs += [("one", 4096, 4, 24, 20, False, True, True, tb, None, False) for tb in (2, 3, 4, 8)]
cfgs += [("one", 4096, 4, 24, 20, False, True, True, 1, None, pf, mw) for mw in (1, 2) for pf in (True, False)]
cfgs += [("one", 4096, 4, 24, 20, False, True, False, 1, None, True, 1), ("one", 4096, 4, 4, 1, True, True, False, 1, None, True, 1)]
fns = dict(mix=K._compile_mix, fin=K._compile_finalize, one=K._compile_one_launch, post=K._compile_post)
for c in cfgs[me::n]:
    fns[c[0]](*c[1:])
PY
for i in $(seq 0 15); do PYTHONPATH=$PWD timeout 35 python3 /tmp/mhc_pre.py $i 16 > /tmp/mhc_pre_$i.log 2>&1 & done
wait
echo "precompiled after $(( $(date +%s) - MHC_T0 )) s"; for f in $(grep -l -i "error" /tmp/mhc_pre_*.log | head -2); do tail -n 2 $f; done
timeout 45 python3 -m pytest -q -p no:cacheprovider test_dsv4.py \
    -k "test_gpu_ and (one_launch or both_paths or fused_is_deterministic)" 2>&1 | grep -E "passed|failed|FAILED|Error" | head -25
echo "tests done after $(( $(date +%s) - MHC_T0 )) s"
cat > /tmp/mhc_time.py <<'PY'
import statistics, sys, time, torch
import kernels as K
budget = float(sys.argv[1])
t_end = time.time() + budget
dev = "cuda"
D, n, mix, iters, eps, neps, SITES = 4096, 4, 24, 20, 1e-6, 1e-6, 8
g = torch.Generator(device=dev).manual_seed(0)
fn = torch.randn(mix, n * D, device=dev, generator=g) / (n * D) ** 0.5
hfn = torch.randn(n, n * D, device=dev, generator=g) / (n * D) ** 0.5
scale, hscale = torch.tensor([0.5, 0.7, 2.0], device=dev), torch.tensor([0.7], device=dev)
base, hbase = torch.randn(mix, device=dev, generator=g) * 0.5, torch.randn(n, device=dev, generator=g) * 0.5
w = 1 + 0.5 * torch.randn(D, device=dev, generator=g)

def graph_for(kind, M, one, tb, pf, mw):
    K.HC_ONE_LAUNCH, K.HC_ONE_TOK_BLOCK, K.HC_ONE_PREFETCH, K.HC_ONE_MIX_WARPS = one, tb, pf, mw
    h = torch.randn(M, n, D, device=dev, generator=g).to(torch.bfloat16)
    f = torch.randn(M, D, device=dev, generator=g).to(torch.bfloat16)
    post = torch.rand(M, n, device=dev, generator=g) * 2
    comb = torch.softmax(torch.randn(M, n, n, device=dev, generator=g), -1)
    def chain():
        hh, x, p, c = h, f, post, comb
        outs = []
        for _ in range(SITES):
            if kind == "post_pre":
                hh, x, p, c = K.hc_post_pre_fused(x, hh, p, c, fn, scale, base, n, iters, eps, neps, norm_weight=w)
            elif kind == "pre":
                outs.append(K.hc_pre_fused(h, fn, scale, base, n, iters, eps, neps, norm_weight=w))
            else:
                outs.append(K.hc_head_fused(h, hfn, hscale, hbase, eps, neps, norm_weight=w))
        return hh, x, outs
    chain(); torch.cuda.synchronize()
    gr = torch.cuda.CUDAGraph()
    with torch.cuda.graph(gr):
        out = chain()
    for _ in range(5):
        gr.replay()
    torch.cuda.synchronize()
    return gr, out

def time_graph(gr, reps=20):
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(reps):
        gr.replay()
    e.record(); torch.cuda.synchronize()
    return s.elapsed_time(e) * 1e3 / reps / SITES          # us per site

rows = []
for kind, M, tbs in (("post_pre", 1, (1,)), ("post_pre", 8, (1, 2, 4, 8)), ("post_pre", 2, (1, 2)),
                     ("pre", 1, (1,)), ("head", 1, (1,)), ("post_pre", 4, (1, 2)), ("post_pre", 16, (1, 2))):
    variants = [("two-kernel", False, 1, True, 4)] + [(f"one tb={tb}", True, tb, True, 4) for tb in tbs]
    if M <= 4 and kind == "post_pre":
        variants.append(("one no-pf", True, 1, False, 4))            # tb 1 without the h prefetch
    if M <= 2:
        variants += [("one mw=1", True, 1, True, 1)] + ([("one mw=2", True, 1, True, 2)] if kind == "post_pre" else [])
    graphs = [(name, graph_for(kind, M, *v)[0]) for name, *v in variants]
    res = {name: [] for name, _ in graphs}
    for _ in range(15):                              # interleaved rounds: min (robust to a shared GPU) and median
        for name, gr in graphs:
            res[name].append(time_graph(gr))
    base_min, base_med = min(res["two-kernel"]), statistics.median(res["two-kernel"])
    for name, _ in graphs:
        lo, med = min(res[name]), statistics.median(res[name])
        print(f"{kind:8s} M={M:2d} {name:11s} min {lo:7.2f} us/site ({lo - base_min:+6.2f})  median {med:7.2f} "
              f"({med - base_med:+6.2f} vs two-kernel)", flush=True)
    if time.time() > t_end:
        print("time budget reached"); break
print("counters zero after replays:", all(int(c.abs().sum()) == 0 for c in K._HC_COUNTERS.values()))
PY
PYTHONPATH=$PWD timeout $(( 97 - ($(date +%s) - MHC_T0) )) python3 /tmp/mhc_time.py $(( 88 - ($(date +%s) - MHC_T0) ))
echo "done after $(( $(date +%s) - MHC_T0 )) s"
