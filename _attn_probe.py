"""attn helper's GPU check (session 5): precompile (argv: pre i n), then timing + phase stamps (argv: time).
Not product code: run by _gpu.sh only."""
import statistics
import sys
import time

import torch

import kernels as K

HD, W, H = 512, 128, 64


WIDE_DSPLIT_CASES = [(1, 64, 512, 128, 512, "hca", 1000), (3, 64, 512, 128, 512, "hca", 16000),
                     (2, 64, 512, 128, 512, "hca", 300), (1, 64, 512, 128, 0, "window", 40)]


def plan_configs():
    """(compile fn name, args) of every attention kernel the tests and the timing below use."""
    import test_dsv4 as T
    cfgs = set()
    for B, Hh, hd, Ww, Tc, mode, pos in T.WIDE_CASES:
        n = {"window": 0, "hca": max(Tc, 1), "csa": 512 if hd == 512 else 12}[mode]
        for ms in (8, 16):
            cfgs.add(("_compile_attention_wide", (hd, mode, *K.attention_wide_plan(Ww, n, ms), 0, False)))
        if hd == 512:
            cfgs.add(("_compile_attention_wide", (hd, mode, *K.attention_wide_plan(Ww, n, 8), 64, False)))
            cfgs.add(("_compile_attention_cluster", (hd, mode, *K.attention_cluster_plan(Ww, n))))
    for B, Hh, hd, Ww, Tc, mode, pos in T.WIDE_VARIANT_CASES:
        n = {"window": 0, "hca": max(Tc, 1), "csa": 512 if hd == 512 else 12}[mode]
        cfgs.add(("_compile_attention_wide", (hd, mode, *K.attention_wide_plan(Ww, n, 8), 0, False, False, 1)))
        cfgs.add(("_compile_attention_wide", (hd, mode, *K.attention_wide_plan(Ww, n, 8), 0, False, True, 2)))
        cfgs.add(("_compile_attention_wide", (hd, mode, *K.attention_wide_plan(Ww, n, 8), 0, False, True, 1, True)))
    for mode in ("hca", "csa"):                                   # the prefetch graph test
        cfgs.add(("_compile_attention_wide", (HD, mode, *K.attention_wide_plan(W, 512, 8), 64, False, True, 1, True)))
        cfgs.add(("_compile_attention_wide", (HD, mode, *K.attention_wide_plan(W, 512, 8), 64)))
    for B, Hh, hd, Ww, Tc, mode, pos in WIDE_DSPLIT_CASES:
        for ms in (8, 16):
            cfgs.add(("_compile_attention_wide", (hd, mode, *K.attention_wide_plan(Ww, Tc, ms), 0, False, True, 1,
                                                  False, True)))
    cfgs = {(nm, a + (0, False, True, 1, False, False)[len(a) - 5:] if nm == "_compile_attention_wide" else a)
            for nm, a in cfgs}
    cfgs.add(("_compile_rope", (512, 64, True, True)))
    for mode in ("hca", "csa"):
        cfgs.add(("_compile_attention_cluster", (HD, mode, *K.attention_cluster_plan(W, 512), 64)))
        for v in VARIANTS[1:]:
            cfgs.add(("_compile_attention_wide", wide_args(mode, v)))
            cfgs.add(("_compile_attention_wide", wide_args(mode, v, stamps=True)))
    return sorted(cfgs, key=str)


VARIANTS = ["old", "wide8", "wide8 no-ldsm", "wide8 2-chain", "wide8 prefetch", "wide8 dsplit", "wide16",
            "wide16 prefetch", "wide16 dsplit"]


def wide_args(mode, v, stamps=False):
    return (HD, mode, *K.attention_wide_plan(W, 512, 16 if "wide16" in v else 8), 64, stamps, "no-ldsm" not in v,
            2 if "2-chain" in v else 1, "prefetch" in v, "dsplit" in v)


def precompile(i, n):
    time.sleep(0.2 * i)
    cfgs = plan_configs()
    for name, args in cfgs[i::n]:
        getattr(K, name)(*args)
    # the PDL-off variants (GLUE_PDL is part of the compile key)
    K.GLUE_PDL = False
    off = [("_compile_attention_cluster", (HD, m, *K.attention_cluster_plan(W, 512), 64)) for m in ("hca", "csa")]
    off += [("_compile_attention_wide", wide_args(m, v)) for m in ("hca", "csa") for v in VARIANTS[1:]]
    for name, args in off[i::n]:
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


def set_variant(v):
    K.ATTN_WIDE = v != "old"
    K.ATTN_MAX_SPLITS = 16 if "wide16" in v else 8
    K.ATTN_PREFETCH = "prefetch" in v
    K.ATTN_QK_DSPLIT = "dsplit" in v
    K.ATTN_LDSM = "no-ldsm" not in v
    K.ATTN_QK_CHAINS = 2 if "2-chain" in v else 1


def graph_of(args, v, calls=20):
    set_variant(v)
    q, ring, comp, idx, pos, sink, scale, ratio, angles = args
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
    set_variant(v)
    q, ring, comp, idx, pos, sink, scale, ratio, angles = args
    B = q.shape[0]
    splits = K.attention_wide_plan(W, 512)[0]
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
    names = ["prologue", "pdl wait", "q+keys landed", "QK^T", "softmax", "PV", "barrier 1", "combine", "barrier 2"]
    slots = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]
    parts = []
    for nm, a, b_ in zip(names, slots[:-1], slots[1:]):
        ok = (st[:, b_] != 0) & (st[:, a] != 0)                        # CTAs without keys skip slots 4-6
        d = (st[ok, b_] - st[ok, a]) / ghz / 1e3                       # us
        parts.append(f"{nm} {d.median().item():.2f}/{d.max().item():.2f}" if ok.any() else f"{nm} -")
    span = (gt1.max() - gt0.min()).item() / 1e3
    skew = (gt0.max() - gt0.min()).item() / 1e3
    print(f"  stamps {v} ({st.shape[0]} CTAs, {ghz:.2f} GHz): first start -> last end {span:.2f} us, start skew "
          f"{skew:.2f} us; per phase median/max us: " + ", ".join(parts))


def main():
    dev = torch.cuda.get_device_name()
    print(f"{dev}: sparse_attention_decode at Flash dims (H 64, hd 512, W 128, + inverse RoPE), CUDA graph of 20 "
          f"calls, median of 15 interleaved rounds, us per call")
    cases = [("csa", 1, 1000), ("hca", 1, 1000), ("csa", 8, 1000), ("hca", 8, 1000), ("csa", 1, 65000),
             ("hca", 1, 65000)]
    variants = VARIANTS
    print("| mode | B | pos | keys | PDL | " + " | ".join(variants) + " | wide8 vs old: rel diff | max abs diff |")
    print("|---|--:|--:|--:|---|" + "--:|" * len(variants) + "---|---|")
    for mode, B, pos in cases:
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
            if "old" in graphs and "wide8" in graphs:
                o_old, o_new = graphs["old"][1].float(), graphs["wide8"][1].float()
                d = (o_old - o_new).abs().max().item()
                rel = ((o_old - o_new).norm() / o_old.norm()).item()
            print(f"| {mode} | {B} | {pos} | {nkeys} | {'on' if pdl else 'off'} | "
                  + " | ".join(f"{t[v]:.2f}" for v in variants) + f" | {rel:.2e} | {d:.3g} |", flush=True)
            del graphs
        K.GLUE_PDL = True
        if pos == 1000 and B == 1:
            for v in ("wide8", "wide8 no-ldsm", "wide8 dsplit", "wide16"):
                try:
                    stamps(args, v)
                except Exception as e:  # noqa: BLE001
                    print(f"  stamps {v}: {type(e).__name__}: {str(e)[:200]}")


if __name__ == "__main__":
    if sys.argv[1] == "pre":
        precompile(int(sys.argv[2]), int(sys.argv[3]))
    else:
        main()
