#!/bin/bash
# mhc (session 6): HcSiteCluster (one-launch mHC site) tests, then CUDA-graph timings of chained sites, the old
# two-kernel path (HC_SITE=two) vs the new one in the same run, + in-kernel phase stamps.
T0=$(date +%s)
python3 - 2>/dev/null <<'PY' || { echo "no CUDA/CuTe here: skip"; exit 0; }
import torch
assert torch.cuda.is_available()
import cutlass.cute
PY
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv,noheader
# precompile (parallel processes, shared disk cache): the site kernels and the old pair at the shapes used below
cat > /tmp/mhc_pre.py <<'PY'
import sys, time
me = int(sys.argv[1])
time.sleep(0.2 * me)
import kernels as K
jobs = []
site = lambda *a, **k: jobs.append(lambda: K._compile_site(*a, **k))
for D, tbs in ((4096, (1, 2)), (256, (1, 2)), (1024, (1,))):
    for tb in tbs:
        for fuse in (False, True):
            for norm in (False, True):
                site(D, 4, 24, 20, fuse, norm, tb, 8)
    for fuse in (False, True):
        jobs.append(lambda D=D, fuse=fuse: K._compile_mix(D, 4, 24, fuse))
    for norm in (False, True):
        for loop in (False, True):
            jobs.append(lambda D=D, norm=norm, loop=loop: K._compile_finalize(D, 4, 24, 20, False, norm,
                                                                               sinkhorn_loop=loop))
    jobs.append(lambda D=D: K._compile_post(D, 4))
for D, tb in ((4096, 1), (4096, 2), (256, 2)):
    for norm in (False, True):
        site(D, 4, 24, 20, True, norm, tb, 8, mbar=False)
for D, tb in ((4096, 1), (4096, 2), (256, 1)):
    site(D, 4, 24, 20, True, True, tb, 8, add_f2=True)
site(4096, 4, 24, 20, True, True, 1, 8, add_f2=True, mbar=False)
site(4096, 4, 24, 20, True, True, 1, 8, stamps=True)
for tb in (1, 2):
    site(4096, 4, 24, 20, True, True, tb, 8, lanes=False)
    site(4096, 4, 24, 20, True, True, tb, 8, lanes=False, add_f2=True)
site(4096, 4, 24, 20, True, True, 2, 8, add_f2=True, mbar=False)
for i, j in enumerate(jobs):
    if i % 14 == me:
        j()
PY
for i in $(seq 0 13); do PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" python3 /tmp/mhc_pre.py $i > /tmp/mhc_pre_$i.log 2>&1 & done
wait
echo "precompiled after $(( $(date +%s) - T0 )) s"
for f in /tmp/mhc_pre_*.log; do [ -s $f ] && tail -n 4 $f; done
# smoke run of the st.async + mbarrier exchange (a wrong byte count would hang): exclude it below if it fails
timeout 12 python3 - <<'PY' && export MHC_MBAR_OK=1 || echo "mbar smoke run FAILED (rc $?): mbar variants and tests skipped"
import torch, kernels as K
dev = "cuda"
scale, base, w = torch.tensor([0.5, 0.7, 2.0], device=dev), torch.randn(24, device=dev), torch.ones(4096, device=dev)
for M in (1, 3, 8):
    h = torch.randn(M, 4, 4096, device=dev).to(torch.bfloat16)
    fn = torch.randn(24, 4 * 4096, device=dev) / 128
    f = torch.randn(M, 4096, device=dev).to(torch.bfloat16)
    post, comb = torch.rand(M, 4, device=dev), torch.rand(M, 4, 4, device=dev)
    outs = []
    for mb in (True, False):
        K.HC_CLUSTER_MBAR = mb
        outs.append(K.hc_post_pre_fused(f, h, post, comb, fn, scale, base, 4, 20, 1e-6, 1e-6, norm_weight=w))
        torch.cuda.synchronize()
    assert all(torch.equal(a, b) for a, b in zip(*outs)), M
print("mbar smoke ok")
PY
SEL="hc_site or unsummed or hc_post_pre_fused or fused_is_deterministic"
[ -z "$MHC_MBAR_OK" ] && SEL="($SEL) and not mbar"
timeout 42 python3 -m pytest -q test_dsv4.py -k "$SEL" -p no:cacheprovider > /tmp/mhc_t.log 2>&1
echo "pytest rc=$? $(head -n 1 /tmp/mhc_t.log | cut -c1-120)"; grep -E "passed|failed|FAILED|Error" /tmp/mhc_t.log | head -20
echo "tests done after $(( $(date +%s) - T0 )) s"
BUDGET=$(( 92 - ($(date +%s) - T0) )); [ $BUDGET -gt 40 ] && BUDGET=40
cat > /tmp/mhc_time.py <<'PY'
"""mhc timing (session 6): CUDA-graph replays of chained mHC sites (hc_post_pre_fused + RMSNorm, Flash dims),
old two-kernel path vs new variants in the same run, medians of interleaved rounds. Run by _gpu.sh on the GPU."""
import os, statistics, sys, time, torch
import kernels as K

t_end = time.time() + float(sys.argv[1]) if len(sys.argv) > 1 else time.time() + 80
dev = "cuda"
D, n, mix, ITERS, EPS = 4096, 4, 24, 20, 1e-6
g = torch.Generator(device=dev).manual_seed(0)
NFN = 48                                       # 48 x 1.5 MB of fn > L2: every site reads its fn from HBM, as in the model
fns = [torch.randn(mix, n * D, device=dev, generator=g) / (n * D) ** 0.5 for _ in range(NFN)]
scale = torch.tensor([0.5, 0.7, 2.0], device=dev)
base = torch.randn(mix, device=dev, generator=g) * 0.5
w = 1 + 0.5 * torch.randn(D, device=dev, generator=g)
Wq = (torch.randn(D, D, device=dev, generator=g) * 0.5).to(torch.float8_e4m3fn)
Ws = torch.full((D // 128, D // 128), 2.0 ** -6, device=dev).to(torch.float8_e8m0fnu)

MAIN = {"HC_SITE": "two", "HC_FOLD_ADD": False, "HC_SINKHORN_LOOP": False}       # = session 5's code path
ALL = [("2-kernel", MAIN), ("cluster", {"HC_SITE": "cluster"}),
       ("cluster barrier", {"HC_SITE": "cluster", "HC_CLUSTER_MBAR": False}),
       ("cluster 1-lane", {"HC_SITE": "cluster", "HC_SINKHORN_LANES": False})]
M8 = []
VARIANTS = [(nm, sw) for nm, sw in ALL if all(hasattr(K, k) for k in sw if k != "HC_SITE") and
            ("HC_SITE" not in sw or hasattr(K, "HC_SITE") or sw["HC_SITE"] == "two")]


def variant(sw):
    saved = {k: getattr(K, k) for k in sw if hasattr(K, k)}
    for k, v in sw.items():
        if hasattr(K, k):
            setattr(K, k, v)
    return saved


def inputs(M):
    h = (torch.randn(M, n, D, device=dev, generator=g) * 0.7).to(torch.bfloat16)
    f = torch.randn(M, D, device=dev, generator=g).to(torch.bfloat16)
    post = torch.rand(M, n, device=dev, generator=g) * 2
    comb = torch.softmax(torch.randn(M, n, n, device=dev, generator=g), -1)
    return h, f, post, comb


INPUTS = {}


def chain(M, sites, gemv):
    if M not in INPUTS:                    # the same inputs for every variant (their outputs are compared)
        INPUTS[M] = inputs(M)
    h0, f0, post0, comb0 = INPUTS[M]
    s_add = f0.roll(1, -1)

    def run():
        h, f, post, comb = h0, f0, post0, comb0
        x = f0
        for i in range(sites):
            if gemv:
                f = K.fp8_gemv(x, Wq, Ws)
            if gemv == "add":                     # + the MoE's shared part: torch's add, or inside the site
                f = (f, s_add) if K.HC_FOLD_ADD else f + s_add
            if gemv != "only":
                h, x, post, comb = K.hc_post_pre_fused(f, h.view(M, n, D), post, comb, fns[i % NFN], scale, base, n,
                                                       ITERS, EPS, EPS, norm_weight=w)
                f = x
            else:
                x = f
        return h, x, post, comb
    return run


def capture(fn):
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        out = fn()
    torch.cuda.current_stream().wait_stream(s)
    gr = torch.cuda.CUDAGraph()
    with torch.cuda.graph(gr, stream=s):
        out = fn()
    return gr, out


def time_graph(gr, reps=5):
    gr.replay()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(reps):
        gr.replay()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) * 1e3 / reps


def stamps(M, sites, gemv, mbar=False):
    """One replay of a chain with HC_STAMPS: per-site phase times (ns, %globaltimer) relative to the moment the
    site's CTAs pass griddepcontrol.wait (max over CTAs), and the gap after the previous site's end."""
    saved = variant({"HC_SITE": "cluster", "HC_STAMPS": True, "HC_CLUSTER_MBAR": mbar})
    try:
        fn = chain(M, sites, gemv)
        fn()
        ring, nxt = K._HC_STAMP_RING[torch.device(dev, torch.cuda.current_device())]
        nxt[0] = 0
        gr, _ = capture(fn)
        first = nxt[0] - sites                    # the captured calls' rows (the warm-up run took the ones before)
        for _ in range(3):
            gr.replay()
        torch.cuda.synchronize()
        ring.zero_()
        gr.replay()
        torch.cuda.synchronize()
    finally:
        variant(saved)
    NS = K.HcSiteCluster.N_STAMPS
    C = 16
    blocks = -(-M // K._site_tok_block(M))
    st = ring[first:first + sites, :blocks * C * NS].reshape(sites, blocks * C, NS).cpu().double()
    rows = []
    prev_end = None
    for k in range(sites):
        s = st[k]
        wait = s[:, 1].max()
        end = max(s[:, 7].max(), s[:, 8].max())
        r = {"entry": s[:, 0].min() - wait, "wait spread": wait - s[:, 1].min()}
        for i, nm in ((2, "h+dots+push"), (3, "barrier1"), (4, "chains"), (5, "x+ssq+push"), (6, "barrier2"),
                      (7, "y"), ):
            r[nm] = s[:, i].max() - wait
        r["sinkhorn end"] = s[:, 8].max() - wait
        r["end"] = end - wait
        for i, nm in ((2, "c:h+dots+push"), (3, "c:barrier1"), (4, "c:chains"), (5, "c:x+ssq+push"), (6, "c:barrier2"),
                      (7, "c:y")):
            r[nm] = (s[:, 9 + i] - s[:, 9 + i - 1]).mean()       # cycles, thread 0, mean over CTAs
        r["c:sinkhorn"] = s[:, 17].max()
        if prev_end is not None:
            r["wait - prev end"] = wait - prev_end
            r["entry - prev end"] = s[:, 0].min() - prev_end
        prev_end = end
        rows.append(r)
    keys = list(rows[-1].keys())
    med = {kk: statistics.median(float(r[kk]) for r in rows[1:] if kk in r) for kk in keys}
    print(f"  stamps{' mbar' if mbar else ''} M={M} {dict([(False, 'sites'), (True, 'gemv+site'), ('add', 'gemv+add+site')])[gemv]} (ns, median over sites; phases = max over CTAs, from "
          f"the last CTA's wait return; c: = %clock64 cycles of each phase, thread 0, mean over CTAs): " +
          "  ".join(f"{kk} {v:.0f}" for kk, v in med.items()), flush=True)


print(f"{torch.cuda.get_device_name()}; variants: {[nm for nm, _ in VARIANTS]}", flush=True)
CASES = [(1, 48, False), (1, 16, "add"), (8, 16, "add"), (1, 16, True), (8, 48, False), (2, 48, False),
         (1, 16, "only")]
for M, sites, gemv in CASES:
    if time.time() > t_end - 8:
        print("time budget reached", flush=True)
        break
    graphs, outs = [], {}
    vs = VARIANTS if M == 1 else [(nm, sw) for nm, sw in VARIANTS if "nopdl" not in nm and "unrolled" not in nm]
    vs = vs + (M8 if M == 8 and gemv is False and hasattr(K, "HC_CLUSTER_TB") else [])
    for nm, sw in (vs if gemv != "only" else VARIANTS[:1]):
        saved = variant(sw)
        try:
            gr, out = capture(chain(M, sites, gemv))
            graphs.append((nm, gr))
            outs[nm] = out
        except Exception as e:                               # noqa: BLE001
            print(f"  {nm} M={M}: {type(e).__name__}: {str(e)[:200]}", flush=True)
        finally:
            variant(saved)
    torch.cuda.synchronize()
    res = {nm: [] for nm, _ in graphs}
    for _ in range(9):
        for nm, gr in graphs:
            res[nm].append(time_graph(gr))
    base_nm = graphs[0][0]
    same = {nm: all(torch.equal(a, b) for a, b in zip(outs[nm], outs[base_nm])) for nm in outs}
    what = {False: f"{sites} sites", True: f"{sites} x (fp8 GEMV 4096x4096 + site)", "only": f"{sites} fp8 GEMVs",
            "add": f"{sites} x (fp8 GEMV + bf16 add + site; cluster: add in the site)"}[gemv]
    b = statistics.median(res[base_nm])
    print(f"M={M} {what}: us per site/pair, median (min) of 9 rounds; " + "  ".join(
        f"{nm}: {statistics.median(v) / sites:.2f} ({min(v) / sites:.2f}) {(statistics.median(v) - b) / sites:+.2f}"
        f"{'' if same[nm] else ' DIFFERENT BITS'}" for nm, v in res.items()), flush=True)
    if hasattr(K, "HC_STAMPS") and gemv in (False, True) and M in (1, 8):
        for mb in ((True,) if os.environ.get("MHC_MBAR_OK") and M == 1 and gemv is False else ()):
            try:
                stamps(M, sites, gemv, mb)
            except Exception as e:                           # noqa: BLE001
                print(f"  stamps: {type(e).__name__}: {str(e)[:300]}", flush=True)
PY
[ $BUDGET -gt 8 ] && PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" timeout $(( BUDGET + 4 )) python3 /tmp/mhc_time.py $BUDGET
echo "done after $(( $(date +%s) - T0 )) s"
