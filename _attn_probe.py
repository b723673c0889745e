"""attn helper's GPU check (session 5): precompile (argv: pre i n), then timing + phase stamps (argv: time).
Not product code: run by _gpu.sh only."""
import contextlib
import statistics
import sys
import time

import torch

import kernels as K

HD, W, H, SMS = 512, 128, 64, 132
DEFAULTS = dict(ATTN_WIDE=True, ATTN_MAX_SPLITS=16, ATTN_MAX_CHUNK=80, ATTN_LDSM=True, ATTN_QK_CHAINS=1,
                ATTN_PREFETCH=False, ATTN_QK_DSPLIT=False, ATTN_QK_PAIRS=False, ATTN_CTAS_PER_SM=1, ATTN_BULK=False,
                ATTN_COMBINE_PRE=False)
VARIANTS = {"old": dict(ATTN_WIDE=False), "new": {}, "new +pre": dict(ATTN_COMBINE_PRE=True),
            "new w8": dict(ATTN_MAX_SPLITS=8), "new c48": dict(ATTN_MAX_CHUNK=48), "new pairs": dict(ATTN_QK_PAIRS=True),
            "new fit2": dict(ATTN_CTAS_PER_SM=2)}
CASES = [("csa", 1, 1000), ("hca", 1, 1000), ("csa", 8, 1000), ("hca", 8, 1000), ("csa", 1, 65000),
         ("hca", 1, 65000)]


@contextlib.contextmanager
def settings(**kw):
    old = {k: getattr(K, k) for k in DEFAULTS}
    for k, v in {**DEFAULTS, **kw}.items():
        setattr(K, k, v)
    try:
        yield
    finally:
        for k, v in old.items():
            setattr(K, k, v)


def wide_cfg(B, Hh, hd, Ww, n, mode, rd, stamps=False):
    return ("_compile_attention_wide", (hd, mode, *K.attention_wide_batch_plan(B, Hh, Ww, n, SMS), rd, stamps))


def plan_configs():
    """(settings, compile fn name, args) of every attention kernel the tests and the timing below use."""
    import test_dsv4 as T
    out = []
    n_of = lambda hd, Tc, mode: {"window": 0, "hca": max(Tc, 1), "csa": 512 if hd == 512 else 12}[mode]  # noqa: E731
    for B, Hh, hd, Ww, Tc, mode, pos in T.WIDE_CASES:
        n = n_of(hd, Tc, mode)
        for ms in (8, 16):
            out.append((dict(ATTN_MAX_SPLITS=ms), *wide_cfg(B, Hh, hd, Ww, n, mode, 0)))
        if hd == 512:
            out.append(({}, *wide_cfg(B, Hh, hd, Ww, n, mode, 64)))
            out.append(({}, "_compile_attention_cluster", (hd, mode, *K.attention_cluster_plan(Ww, n))))
    for B, Hh, hd, Ww, Tc, mode, pos in T.WIDE_VARIANT_CASES:
        n = n_of(hd, Tc, mode)
        for st in (dict(ATTN_LDSM=False), dict(ATTN_QK_CHAINS=2), dict(ATTN_PREFETCH=True), {}, dict(ATTN_BULK=True),
                   dict(ATTN_BULK=True, ATTN_PREFETCH=True), dict(ATTN_COMBINE_PRE=False),
                   dict(ATTN_COMBINE_PRE=False, ATTN_MAX_SPLITS=8), dict(ATTN_MAX_SPLITS=8)):
            out.append((st, *wide_cfg(B, Hh, hd, Ww, n, mode, 0)))
    for B, Hh, hd, Ww, Tc, mode, pos in T.WIDE_DSPLIT_CASES:
        for ms in (8, 16):
            out.append((dict(ATTN_QK_DSPLIT=True, ATTN_MAX_SPLITS=ms), *wide_cfg(B, Hh, hd, Ww, Tc, mode, 0)))
    for mode in ("hca", "csa"):
        for ms in (8, 16):
            for pf in (False, True):
                for bk in (False, True):
                    st = dict(ATTN_MAX_SPLITS=ms, ATTN_PREFETCH=pf, ATTN_BULK=bk)
                    out.append((st, *wide_cfg(2, H, HD, W, 512, mode, 64)))
    for B, Hh, hd, Ww, Tc, mode, pos in [(2, 64, 512, 128, 512, "hca", 300), (1, 64, 512, 128, 8192, "hca", 1000000)]:
        for st in ({}, dict(ATTN_BULK=True), dict(ATTN_BULK=True, ATTN_PREFETCH=True)):
            out.append((st, *wide_cfg(B, Hh, hd, Ww, Tc, mode, 0)))
    out.append(({}, "_compile_rope", (512, 64, True, True)))
    for mode, B, pos in CASES:
        for v, st in VARIANTS.items():
            if v == "old":
                out.append((st, "_compile_attention_cluster", (HD, mode, *K.attention_cluster_plan(W, 512), 64)))
            else:
                out.append((st, *wide_cfg_in(st, B, mode)))
                if B == 1 and pos == 1000:
                    out.append((st, *wide_cfg_in(st, B, mode, stamps=True)))
    return out


def wide_cfg_in(st, B, mode, stamps=False):
    with settings(**st):
        return wide_cfg(B, H, HD, W, 512, mode, 64, stamps)


def precompile(i, n):
    time.sleep(0.2 * i)
    jobs, seen = [], set()
    for st, name, args in plan_configs()[::-1]:                  # timing configs first, then the tests'
        key = (tuple(sorted({**DEFAULTS, **st}.items())), name, args)
        if key not in seen:
            seen.add(key)
            jobs.append((st, name, args))
    for st, name, args in jobs[i::n]:
        with settings(**st):
            getattr(K, name)(*args)
    # the PDL-off timing variants (GLUE_PDL is part of the compile key)
    K.GLUE_PDL = False
    off = []
    for mode in ("hca", "csa"):
        for v, st in VARIANTS.items():
            if v == "old":
                off.append((st, "_compile_attention_cluster", (HD, mode, *K.attention_cluster_plan(W, 512), 64)))
            else:
                off.append((st, *wide_cfg_in(st, 1, mode)))
    for st, name, args in off[i::n]:
        with settings(**st):
            getattr(K, name)(*args)


def inputs(B, mode, pos, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    Tc = 512 if mode == "hca" else 16384
    q = torch.randn(B, 1, H, HD, device="cuda", generator=g).to(torch.bfloat16)
    ring = torch.randn(B, W, HD, device="cuda", generator=g).to(torch.bfloat16)
    comp = torch.randn(B, Tc, HD, device="cuda", generator=g).to(torch.bfloat16)
    idx = None
    if mode == "csa":
        vis = min((pos + 1) // 4, Tc)
        idx = torch.full((B, 1, 512), -1, dtype=torch.long, device="cuda")     # top-k order: -1s last
        for b in range(B):
            picks = torch.randperm(vis, device="cuda", generator=g)[:512]
            idx[b, 0, :picks.numel()] = picks
    sink = torch.randn(H, device="cuda", generator=g)
    angles = torch.rand(65536, 32, device="cuda", generator=g) * 6.3
    return (q, ring, comp, idx, torch.tensor([pos], device="cuda"), sink, HD ** -0.5, 128 if mode == "hca" else 4,
            angles)


def graph_of(args, v, calls=20):
    q, ring, comp, idx, pos, sink, scale, ratio, angles = args
    with settings(**VARIANTS[v]):
        fn = lambda: K.sparse_attention_decode(q, ring, comp, idx, pos, sink, scale, ratio, angles=angles)  # noqa: E731
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            fn()
        torch.cuda.current_stream().wait_stream(s)
        gr = torch.cuda.CUDAGraph()
        with torch.cuda.graph(gr):
            for _ in range(calls):
                out = fn()
    return gr, out


def time_graphs(graphs, rounds=15, calls=20):
    ts = {k: [] for k in graphs}
    for _ in range(rounds):
        for k, (gr, _) in graphs.items():
            gr.replay()
            torch.cuda.synchronize()
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record()
            gr.replay()
            e1.record()
            torch.cuda.synchronize()
            ts[k].append(e0.elapsed_time(e1) * 1e3 / calls)
    return {k: statistics.median(v) for k, v in ts.items()}


def stamps(args, v):
    q, ring, comp, idx, pos, sink, scale, ratio, angles = args
    B = q.shape[0]
    with settings(**VARIANTS[v]):
        splits = K.attention_wide_batch_plan(B, H, W, 512, SMS)[0]
        buf = torch.zeros(B * 4 * splits * 16, dtype=torch.int64, device="cuda")
        K._ATTN_STAMPS["buffer"] = buf
        try:
            for _ in range(5):
                K.sparse_attention_decode(q, ring, comp, idx, pos, sink, scale, ratio, angles=angles)
            torch.cuda.synchronize()
        finally:
            K._ATTN_STAMPS.clear()
    st = buf.view(-1, 16).cpu().double()
    gt0, gt1 = st[:, 0], st[:, 11]
    cyc = st[:, 10] - st[:, 1]
    ghz = (cyc / (gt1 - gt0)).median().item()
    names = ["prologue", "pdl wait", "q+keys", "QK", "softmax", "PV", "barrier1", "combine", "barrier2"]
    slots = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]
    parts = []
    for nm, a, b_ in zip(names, slots[:-1], slots[1:]):
        ok = (st[:, b_] != 0) & (st[:, a] != 0)                        # CTAs without keys skip slots 4-6
        d = (st[ok, b_] - st[ok, a]) / ghz / 1e3                       # us
        parts.append(f"{nm} {d.median().item():.2f}/{d.max().item():.2f}" if ok.any() else f"{nm} -")
    span = (gt1.max() - gt0.min()).item() / 1e3
    print(f"  stamps {v} ({st.shape[0]} CTAs, {ghz:.2f} GHz): first start -> last end {span:.2f} us; "
          "median/max us: " + ", ".join(parts))


def main():
    dev = torch.cuda.get_device_name()
    print(f"{dev}: sparse_attention_decode at Flash dims (H 64, hd 512, W 128, + inverse RoPE), CUDA graph of 20 "
          f"calls, median of 15 interleaved rounds, us per call. old = main's cluster kernel; new = wide kernel with "
          f"the defaults (<= 16 splits, <= 1 CTA/SM, combine weights once per head); -pre: weights per unit; w8: <= 8 "
          f"splits; c48: 48-row passes; pairs: 2 key tiles per warp; fit2: <= 2 CTAs/SM")
    variants = list(VARIANTS)
    print("| mode | B | pos | keys | PDL | " + " | ".join(variants) + " | new vs old: rel diff | max abs diff |")
    print("|---|--:|--:|--:|---|" + "--:|" * len(variants) + "---|---|")
    for mode, B, pos in CASES:
        args = inputs(B, mode, pos, seed=pos)
        nkeys = min(pos + 1, W) + (512 if mode == "csa" else min((pos + 1) // 128, 512))
        for pdl in ((True, False) if B == 1 and pos == 1000 else (True,)):
            K.GLUE_PDL = pdl
            graphs = {}
            for v in variants:
                try:
                    graphs[v] = graph_of(args, v)
                except Exception as e:  # noqa: BLE001 - report and time the others
                    print(f"  {v}: {type(e).__name__}: {str(e)[:200]}")
            t = time_graphs(graphs)
            t = {v: t.get(v, float("nan")) for v in variants}
            rel, d = float("nan"), float("nan")
            if "old" in graphs and "new" in graphs:
                o_old, o_new = graphs["old"][1].float(), graphs["new"][1].float()
                d = (o_old - o_new).abs().max().item()
                rel = ((o_old - o_new).norm() / o_old.norm()).item()
            print(f"| {mode} | {B} | {pos} | {nkeys} | {'on' if pdl else 'off'} | "
                  + " | ".join(f"{t[v]:.2f}" for v in variants) + f" | {rel:.2e} | {d:.3g} |", flush=True)
            del graphs
        K.GLUE_PDL = True
        if pos == 1000 and B == 1:
            for v in ("new", "new -pre", "new w8"):
                try:
                    stamps(args, v)
                except Exception as e:  # noqa: BLE001
                    print(f"  stamps {v}: {type(e).__name__}: {str(e)[:200]}")


if __name__ == "__main__":
    if sys.argv[1] == "pre":
        precompile(int(sys.argv[2]), int(sys.argv[3]))
    else:
        main()
