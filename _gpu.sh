#!/bin/bash
# mhc GPU check (session 4, issue #5): mHC in one launch per site (kernels.HcOneLaunch) vs the HcMix + HcFinalize pair.
# 1. precompile the hc kernels the timing and the tests use (10 background processes -> disk cache); also the
#    branch point's kernels.py (_mhc_base_kernels.py = main at 26843e8) as the untouched baseline
# 2. timing: CUDA-graph replays of 8 chained sites at Flash dims (D 4096, n 4, mix 24, 20 Sinkhorn iterations, fused
#    RMSNorm): main's two kernels, this branch's two kernels, one launch; then per-kernel GPU times (torch.profiler)
# 3. correctness: one-launch == two-kernel bit for bit, counters back to zero, both paths vs dsv4's functions
export MHC_T0=$(date +%s)
python3 -c "import torch; assert torch.cuda.is_available()" 2>/dev/null || { echo "no GPU: skipped"; exit 0; }
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv,noheader
cat > /tmp/mhc_pre.py <<'PY'
import sys, time, traceback
me, n = int(sys.argv[1]), int(sys.argv[2])
time.sleep(0.3 * me)                    # stagger the CuTe DSL imports
import kernels as K
try:
    import _mhc_base_kernels as KB          # main's kernels.py at the branch point (untracked; optional)
except ImportError:
    KB = K
if not (K.HAVE_CUTE and KB.HAVE_CUTE):
    try:
        import cutlass.cute  # noqa: F401
    except Exception:
        traceback.print_exc(limit=2)
    sys.exit(1)
cfgs = []
for D in (4096, 256):
    cfgs += [("mix", D, 4, 24, False), ("mix", D, 4, 24, True), ("mix", D, 4, 4, False)]
    cfgs += [("fin", D, 4, 24, 20, False, nm) for nm in (False, True)] + [("fin", D, 4, 4, 1, True, nm) for nm in (False, True)]
    for pf in ((True, False) if D == 4096 else (True,)):     # prefetch: M <= 4 at D 4096 (grid <= SMs)
        cfgs += [("one", D, 4, 24, 20, False, nm, fu, 1, None, pf) for nm in (False, True) for fu in (False, True)]
        cfgs += [("one", D, 4, 4, 1, True, nm, False, 1, None, pf) for nm in (False, True)]
cfgs += [("one", 4096, 4, 24, 20, False, True, True, tb, None, False) for tb in (2, 3)]
cfgs += [("bmix", 4096, 4, 24, True), ("bfin", 4096, 4, 24, 20, False, True), ("bmix", 4096, 4, 4, False),
         ("bfin", 4096, 4, 4, 1, True, True), ("bmix", 4096, 4, 24, False)]
cfgs += [("mix", 4096, 4, 24, True, False), ("fin", 4096, 4, 24, 20, False, True, False), ("mix", 4096, 4, 4, False, False),
         ("fin", 4096, 4, 4, 1, True, True, False), ("one", 4096, 4, 24, 20, False, True, True, 1, False, True),
         ("one", 4096, 4, 4, 1, True, True, False, 1, False, True)]          # PDL off
fns = dict(mix=K._compile_mix, fin=K._compile_finalize, one=K._compile_one_launch, bmix=KB._compile_mix,
           bfin=KB._compile_finalize)
for c in cfgs[me::n]:
    fns[c[0]](*c[1:])
PY
for i in $(seq 0 9); do PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} timeout 30 python3 /tmp/mhc_pre.py $i 10 > /tmp/mhc_pre_$i.log 2>&1 & done
wait
echo "precompiled after $(( $(date +%s) - MHC_T0 )) s"; for f in $(grep -l -i "error" /tmp/mhc_pre_*.log | head -2); do tail -n 3 $f; done
cat > /tmp/mhc_time.py <<'PY'
import statistics, sys, time, torch
import kernels as K
try:
    import _mhc_base_kernels as KB          # main's kernels.py at the branch point (untracked; optional)
except ImportError:
    KB = None
from torch.profiler import profile, ProfilerActivity
t_end = time.time() + float(sys.argv[1])
dev = "cuda"
D, n, mix, iters, eps, neps, SITES = 4096, 4, 24, 20, 1e-6, 1e-6, 8
g = torch.Generator(device=dev).manual_seed(0)
fn = torch.randn(mix, n * D, device=dev, generator=g) / (n * D) ** 0.5
hfn = torch.randn(n, n * D, device=dev, generator=g) / (n * D) ** 0.5
scale, hscale = torch.tensor([0.5, 0.7, 2.0], device=dev), torch.tensor([0.7], device=dev)
base, hbase = torch.randn(mix, device=dev, generator=g) * 0.5, torch.randn(n, device=dev, generator=g) * 0.5
w = 1 + 0.5 * torch.randn(D, device=dev, generator=g)
_why = K.hc_unavailable_reason(torch.zeros(1, n, D, device=dev, dtype=torch.bfloat16))
assert _why is None, f"the hc kernels would fall back to torch here: {_why}"

def chain_for(mod, kind, M):
    h = torch.randn(M, n, D, device=dev, generator=g).to(torch.bfloat16)
    f = torch.randn(M, D, device=dev, generator=g).to(torch.bfloat16)
    post = torch.rand(M, n, device=dev, generator=g) * 2
    comb = torch.softmax(torch.randn(M, n, n, device=dev, generator=g), -1)
    def chain():
        hh, x, p, c = h, f, post, comb
        for _ in range(SITES):
            if kind == "post_pre":
                hh, x, p, c = mod.hc_post_pre_fused(x, hh, p, c, fn, scale, base, n, iters, eps, neps, norm_weight=w)
            elif kind == "pre":
                x = mod.hc_pre_fused(h, fn, scale, base, n, iters, eps, neps, norm_weight=w)[0]
            else:
                x = mod.hc_head_fused(h, hfn, hscale, hbase, eps, neps, norm_weight=w)
        return hh, x
    return chain

def variant(name):
    """-> the module to call, with this branch's switches set for the variant."""
    K.HC_ONE_LAUNCH, K.HC_ONE_TOK_BLOCK, K.HC_ONE_PREFETCH = name.startswith("one"), 1, "no-pf" not in name
    K.HC_USE_PDL = "nopdl" not in name
    if "tb=2" in name:
        K.HC_ONE_TOK_BLOCK = 2
    return KB if name == "main 2-kernel" else K

def graph_for(chain):
    chain(); torch.cuda.synchronize()
    gr = torch.cuda.CUDAGraph()
    with torch.cuda.graph(gr):
        chain()
    for _ in range(3):
        gr.replay()
    torch.cuda.synchronize()
    return gr

def time_graph(gr, reps=20):
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(reps):
        gr.replay()
    e.record(); torch.cuda.synchronize()
    return s.elapsed_time(e) * 1e3 / reps / SITES          # us per site

def time_eager(chain, reps=5):
    chain(); torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(reps):
        chain()
    e.record(); torch.cuda.synchronize()
    return s.elapsed_time(e) * 1e3 / reps / SITES

def kernel_times(chain):
    """GPU time per kernel (torch.profiler, eager, one site at a time) -> {short name: (count, avg us)}."""
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(2):
            chain(); torch.cuda.synchronize()
    out = {}
    for ev in prof.key_averages():
        tot = getattr(ev, "device_time_total", None)
        if tot is None:
            tot = getattr(ev, "cuda_time_total", 0.0)
        if tot <= 0 or ev.count == 0:
            continue
        t = tot / ev.count
        name = next((k for k in ("HcOneLaunch", "HcMix", "HcFinalize", "HcPost") if k in ev.key), ev.key[:28])
        out[name] = (ev.count, t)
    return out

_t = torch.zeros(1024, device=dev)
def _tiny():
    for _ in range(2 * SITES):
        _t.add_(1.0)
print(f"sanity: graph of {2 * SITES} tiny torch kernels: {time_graph(graph_for(_tiny)) / 2:.2f} us per kernel", flush=True)
print(f"{torch.cuda.get_device_name()}; us per site = CUDA-graph replay of {SITES} chained sites / {SITES}; "
      "min and median of 10 interleaved rounds", flush=True)
NAMES = ["main 2-kernel", "2-kernel", "one", "one no-pf"] if KB is not None else ["2-kernel", "2-kernel ", "one", "one no-pf"]
for kind, M, names in (("post_pre", 1, NAMES + ["2-kernel nopdl", "one nopdl"]), ("head", 1, NAMES[:3] + ["2-kernel nopdl", "one nopdl"]),
                       ("post_pre", 8, NAMES[:3] + ["one tb=2"]), ("pre", 1, NAMES[:3]), ("post_pre", 2, NAMES[:3]), ("post_pre", 4, NAMES)):
    graphs = []
    for nm in names:
        mod = variant(nm)
        graphs.append((nm, graph_for(chain_for(mod, kind, M))))
    res = {nm: [] for nm in names}
    for _ in range(10):
        for nm, gr in graphs:
            variant(nm)
            res[nm].append(time_graph(gr))
    b = statistics.median(res[names[0]])
    print("  ".join(f"{kind} M={M} {nm}: {min(res[nm]):.2f}/{statistics.median(res[nm]):.2f}" for nm in names),
          f"(median vs {names[0]}: {' '.join(f'{statistics.median(res[nm]) - b:+.2f}' for nm in names[1:])})", flush=True)
    if M == 1 and kind != "pre":
        print(f"   eager (launch-bound, no graph) {kind} M={M}: " + "  ".join(
            f"{nm} {time_eager(chain_for(variant(nm), kind, M)):.2f}" for nm in names), flush=True)
    if M == 1 and kind != "pre":
        for nm in names[:3]:
            kt = kernel_times(chain_for(variant(nm), kind, M))
            print(f"   kernels [{kind} M={M} {nm}]: " + ", ".join(f"{k} x{c} {t:.2f} us" for k, (c, t) in kt.items()),
                  flush=True)
    if time.time() > t_end:
        print("time budget reached"); break
print("counters zero after replays:", all(int(c.abs().sum()) == 0 for c in K._HC_COUNTERS.values()), flush=True)
PY
PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} timeout 40 python3 /tmp/mhc_time.py 30
echo "timing done after $(( $(date +%s) - MHC_T0 )) s"
timeout $(( 98 - ($(date +%s) - MHC_T0) )) python3 -m pytest -q -p no:cacheprovider test_dsv4.py \
    -k "test_gpu_ and (one_launch or both_paths or fused_is_deterministic)" 2>&1 | grep -E "passed|failed|FAILED|rror" | head -20
echo "done after $(( $(date +%s) - MHC_T0 )) s"
