"""GPU check of the moemid helper (session 7): routed MoE decode T = 4..256 at Flash dims (nvfp4 random records),
variants (kernels knobs) against the defaults in one process: bit-equality with the default path, CUDA-graph replays
over 4 weight copies, medians (min..max) of interleaved rounds, % of the same-run copy bandwidth, and per-kernel
traces of one replay. `--precompile i n`: compile the kernels of work items i::n (disk cache) and exit."""
import os
import sys
import time

import torch

import kernels as K

T0 = time.time()
D, I, E, k, LIMIT = 4096, 2048, 256, 6, 10.0
N_COPIES = 4
ROUNDS = int(os.environ.get("MID_ROUNDS", "7"))
TS = tuple(int(t) for t in os.environ.get("MID_TS", "4,16,64,128,256").split(","))


def parse_variants(spec):
    """'name=KNOB:value;KNOB:value@T,T name2=...' -> {name: (knobs, Ts or None)}"""
    out = {}
    for item in spec.split():
        name, rest = item.split("=", 1)
        ts = None
        if "@" in rest:
            rest, t = rest.split("@")
            ts = tuple(int(v) for v in t.split(","))
        knobs = {}
        for kv in rest.split(";"):
            key, v = kv.split(":", 1)
            knobs[key] = eval(v)            # noqa: S307 - our own script's arguments
        out[name] = (knobs, ts)
    return out


VARIANTS = {"base": ({}, None)}
VARIANTS.update(parse_variants(os.environ.get("MID_VARIANTS", "")))


def random_packed_experts(seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    rec = K.record_bytes("nvfp4")

    def records(m, kk):
        r = torch.randint(0, 256, (E, (m // K.TILE_M) * (kk // K.TILE_K), rec), generator=g, dtype=torch.uint8,
                          device="cuda")
        r[..., K.CODE_BYTES:] = torch.randint(56, 88, r[..., K.CODE_BYTES:].shape, generator=g, dtype=torch.uint8,
                                              device="cuda")
        return r.view(E, -1, rec // K.REC_ROW, K.REC_ROW)

    ex = K.Experts(fmt="nvfp4", w13=torch.zeros(1, 2 * I, D // 2, dtype=torch.uint8, device="cuda"), w13_scale=None,
                   w2=torch.zeros(1, D, I // 2, dtype=torch.uint8, device="cuda"), w2_scale=None,
                   alpha_gate=torch.full((E,), 0.02, device="cuda"), alpha_up=torch.full((E,), 0.02, device="cuda"),
                   alpha_down=torch.full((E,), 0.02, device="cuda"))
    ex.packed = K.PackedExperts(fmt="nvfp4", w13=records(2 * I, D), w2=records(D, I), dim=D, inter=I,
                                alphas=tuple(torch.full((E,), 0.02 * K.ACC_FIX, device="cuda") for _ in range(3)))
    return ex


def routing(T):
    g = torch.Generator(device="cuda").manual_seed(T)
    ids = torch.argsort(torch.rand(T, E, device="cuda", generator=g), dim=1)[:, :k].to(torch.int32)
    w = torch.rand(T, k, device="cuda", generator=g)
    return torch.randn(T, D, device="cuda", dtype=torch.bfloat16, generator=g), ids, w / w.sum(1, keepdim=True)


def with_knobs(knob, fn):
    saved = {name: getattr(K, name) for name in knob}
    for name, v in knob.items():
        setattr(K, name, v)
    try:
        return fn()
    finally:
        for name, v in saved.items():
            setattr(K, name, v)


def applies(name, T):
    ts = VARIANTS[name][1]
    return ts is None or T in ts


def copy_tbs():
    n = 1 << 30
    src = torch.empty(n, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    for _ in range(5):
        dst.copy_(src)
    torch.cuda.synchronize()
    times = []
    for _ in range(20):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        dst.copy_(src)
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    del src, dst
    torch.cuda.empty_cache()
    return 2 * n / (sorted(times)[10] * 1e-3) / 1e12


def precompile(i, n):
    ex = [random_packed_experts(0)]
    items = [(name, T, False) for T in TS for name in VARIANTS if applies(name, T)]
    items += [(v, int(T), True) for T, v in (key.split(":") for key in os.environ.get("MID_STAMPS", "").split())]
    buf = torch.zeros(2 * 8192 * 48, dtype=torch.uint8, device="cuda")
    for name, T, st in items[i::n]:
        print(f"plan {name} {T}", flush=True)
    for name, T, st in items[i::n]:
        x, ids, w = routing(T)
        knobs = dict(VARIANTS[name][0], MOE_GEMV_STAMPS=buf) if st else VARIANTS[name][0]
        y = with_knobs(knobs, lambda: K.moe_fp4(x, ids, w, ex[0], LIMIT))
        torch.cuda.synchronize()
        print(f"done {name} {T} {bool(torch.isfinite(y).all())}", flush=True)
    torch.cuda.synchronize()


def capture(fn):
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = fn()
    torch.cuda.synchronize()
    return g, out


def replay_ms(g, iters):
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return sorted(times)[len(times) // 2]


def replay_q_ms(g, n, iters):
    """n replays queued back to back between the events (the host's graph launch latency hidden behind the previous
    replay's kernels): median ms per replay."""
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        g.replay()
        a.record()
        for _ in range(n):
            g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / n)
    return sorted(times)[len(times) // 2]


def trace(g, title):
    from torch.profiler import profile as torch_profile, ProfilerActivity
    g.replay()
    torch.cuda.synchronize()
    with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
        g.replay()
        torch.cuda.synchronize()
    ev = sorted([e for e in prof.events() if e.device_type.name == "CUDA" and "Memcpy" not in e.name
                 and "Memset" not in e.name], key=lambda e: e.time_range.start)
    if not ev:
        print(f"trace {title}: no events")
        return
    t0 = ev[0].time_range.start
    print(f"trace {title} (one replay = {N_COPIES} calls; name start dur end us): " + "; ".join(
        f"{e.name.replace('kernel_cutlass_', '')[:16]} {e.time_range.start - t0:.1f} "
        f"{e.time_range.end - e.time_range.start:.1f} {e.time_range.end - t0:.1f}" for e in ev[:13]), flush=True)


def stamps(T, v, rt, ex, bw):
    """One eager call at T with the phase stamps on (after a plain call on another weight copy): per launch the
    phase percentiles (us from GEMM1's first CTA entry) and a 2-us profile of the weight stream (each active CTA's
    bytes spread evenly over its entry .. loop end)."""
    x, ids, w = rt[T]
    nb = 8192 * 48
    buf = torch.zeros(2 * nb, dtype=torch.uint8, device="cuda")
    with_knobs(VARIANTS[v][0], lambda: K.moe_fp4(x, ids, w, ex[1], LIMIT))
    with_knobs(dict(VARIANTS[v][0], MOE_GEMV_STAMPS=buf), lambda: K.moe_fp4(x, ids, w, ex[2], LIMIT))
    torch.cuda.synchronize()
    st = buf.view(torch.int64).view(2, 8192, 6).cpu()
    rec = K.record_bytes("nvfp4")
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    g1, g2 = K.moe_gemv_configs("nvfp4", T * k, E, D, I, sms, T * k <= K.GATHER_MAX_ROWS)
    act = [st[i][st[i][:, 0] > 0] for i in range(2)]
    if not len(act[0]):
        print(f"stamps {v} T={T}: none written")
        return
    t0 = act[0][:, 0].min()
    print(f"stamps {v} T={T}: active CTAs GEMM1 {len(act[0])}, GEMM2 {len(act[1])}; us from GEMM1's first entry "
          f"(min p10 p50 p90 max):")
    prof = {}
    for i, (cfg, kd) in enumerate(((g1, D), (g2, I))):
        a = act[i]
        if not len(a):
            continue
        for f, nm in ((0, "entry"), (1, "tokens"), (5, "loop start"), (2, "loop end"), (3, "exit")):
            q = ((a[:, f] - t0).double() / 1000).sort().values
            pick = lambda p: q[min(len(q) - 1, int(p * (len(q) - 1)))].item()   # noqa: E731
            print(f"  GEMM{i + 1} {nm:9s} " + " ".join(f"{pick(p):7.2f}" for p in (0, .1, .5, .9, 1)))
        tl = ((a[:, 5] - a[:, 1]).double() / 1000).sort().values
        print(f"  GEMM{i + 1} token load us: p50 {tl[len(tl) // 2].item():.2f} p90 {tl[int(0.9 * (len(tl) - 1))].item():.2f}"
              f"; main loop us p50 {((a[:, 2] - a[:, 5]).double().median() / 1000).item():.2f}")
        per_sm = torch.bincount(a[:, 4], minlength=sms)
        print(f"  GEMM{i + 1} CTAs per SM min {int(per_sm.min())} max {int(per_sm.max())}; "
              f"SMs by last exit: p10 {((a[:, 3] - t0).double().quantile(0.1) / 1000).item():.1f}")
        cbytes = cfg[9] * (kd // 64 // cfg[4]) * rec
        for row in a.tolist():
            b0, b1 = (row[1 if i else 0] - t0.item()) / 1000, (row[2] - t0.item()) / 1000   # GEMM2: after its wait
            for j in range(int(b0 // 2), int(b1 // 2) + 1):
                lo, hi = max(b0, 2 * j), min(b1, 2 * j + 2)
                if hi > lo:
                    prof[j] = prof.get(j, 0) + cbytes * (hi - lo) / max(b1 - b0, 1e-3)
    print("  stream TB/s per 2 us: " + " ".join(f"{prof.get(j, 0) / 2e-6 / 1e12:.1f}"
                                                  for j in range(max(prof) + 1)) + f" (copy {bw:.2f})", flush=True)


def main():
    name = torch.cuda.get_device_name()
    ex = [random_packed_experts(s) for s in range(N_COPIES)]
    bpe = K.weight_bytes_per_expert("nvfp4", D, I)
    rt = {T: routing(T) for T in TS}
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for T in TS:
        x, ids, w = rt[T]
        hit = torch.unique(ids).numel()
        cnt = torch.bincount(ids.flatten(), minlength=E)
        print(f"T={T}: {hit} experts hit, rows/expert max {int(cnt.max())}, > 8 rows {int((cnt > 8).sum())}; "
              f"configs {K.moe_gemv_configs('nvfp4', T * k, E, D, I, sms, T * k <= K.GATHER_MAX_ROWS)}", flush=True)
    graphs, outs = {}, {}
    for T in TS:
        x, ids, w = rt[T]
        for v in VARIANTS:
            if not applies(v, T):
                continue
            try:
                graphs[T, v], outs[T, v] = with_knobs(
                    VARIANTS[v][0], lambda: capture(lambda: [K.moe_fp4(x, ids, w, e, LIMIT) for e in ex]))
            except Exception as err:   # noqa: BLE001
                print(f"T={T} {v}: capture failed: {err!r}"[:600], flush=True)
    print(f"== graphs captured ({time.time() - T0:.0f} s)", flush=True)
    for T in TS:
        msg = []
        for v in VARIANTS:
            if (T, v) in outs and v != "base":
                eq = all(torch.equal(a, b) for a, b in zip(outs[T, v], outs[T, "base"]))
                msg.append(f"{v} {'bit-equal' if eq else 'DIFFERS'}")
        fin = all(torch.isfinite(o).all().item() for o in outs[T, "base"])
        print(f"T={T}: vs base: {', '.join(msg) or '-'}; base finite {fin}", flush=True)
    bw = copy_tbs()
    print(f"{name}: copy {bw:.2f} TB/s (read + write of 1 GiB, eager copies, median of 20)", flush=True)
    us = {key: [] for key in graphs}
    uq = {key: [] for key in graphs}
    budget = float(os.environ.get("MID_BUDGET_S", "40"))
    t_b = time.time()
    r = 0
    for r in range(ROUNDS):
        for T in TS:
            for v in VARIANTS:
                if (T, v) in graphs:
                    us[T, v].append(replay_ms(graphs[T, v], 10) / N_COPIES * 1e3)
                    uq[T, v].append(replay_q_ms(graphs[T, v], 4, 3) / N_COPIES * 1e3)
        if time.time() - t_b > budget:
            break
    print(f"\nMoE decode, Flash dims nvfp4, {name}, copy {bw:.2f} TB/s; kernels.moe_fp4 CUDA-graph replays over "
          f"{N_COPIES} weight copies, median (min..max) of {r + 1} interleaved rounds, us per call")
    print(f"{'T':>4} {'variant':>10} {'us':>8} {'(min..max)':>17} {'%copy':>6} {'vs base':>7} {'floor us':>8}"
          f" | queued: {'us':>7} {'%copy':>6} {'vs base':>7}")
    for T in TS:
        hit = torch.unique(rt[T][1]).numel()
        floor = hit * bpe / (bw * 1e12) * 1e6
        b = sorted(us[T, "base"])[len(us[T, "base"]) // 2]
        bq = sorted(uq[T, "base"])[len(uq[T, "base"]) // 2]
        for v in VARIANTS:
            if (T, v) not in us or not us[T, v]:
                continue
            vals = sorted(us[T, v])
            m = vals[len(vals) // 2]
            mq = sorted(uq[T, v])[len(uq[T, v]) // 2]
            print(f"{T:>4} {v:>10} {m:>8.1f} ({vals[0]:>7.1f}..{vals[-1]:>7.1f}) {100 * floor / m:>6.1f} "
                  f"{m / b:>7.3f} {floor:>8.1f} |         {mq:>7.1f} {100 * floor / mq:>6.1f} {mq / bq:>7.3f}",
                  flush=True)
    for key in os.environ.get("MID_STAMPS", "").split():
        T, v = key.split(":")
        try:
            stamps(int(T), v, rt, ex, bw)
        except Exception as err:   # noqa: BLE001 - a probe only
            print(f"stamps {key} failed: {err!r}"[:400], flush=True)
    for key in os.environ.get("MID_TRACE", "").split():
        T, v = key.split(":")
        if (int(T), v) in graphs:
            try:
                trace(graphs[int(T), v], f"{v} T={T}")
            except Exception as err:   # noqa: BLE001 - a probe only
                print(f"trace {key} failed: {err!r}"[:400], flush=True)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--precompile":
        precompile(int(sys.argv[2]), int(sys.argv[3]))
    else:
        main()
