"""Benchmarks. `python bench.py moe`: the routed MoE (fp4 CuTe DSL kernel vs torch bf16 grouped_mm) at Flash dims."""
import sys
import time

import torch

import kernels as K


def _time_ms(fn, iters, graph):
    """Median ms per call of fn (a list of calls over rotating weight copies is one 'call' group)."""
    if graph:
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            fn()                                    # warm-up / compile outside capture
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
        run = g.replay
    else:
        fn()
        run = fn
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        run()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    times.sort()
    return times[len(times) // 2]


def ceilings():
    n = 1 << 30
    src = torch.empty(n, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = _time_ms(lambda: dst.copy_(src), 20, False)
    copy_bw = 2 * n / ms / 1e9          # TB/s (read + write)
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ms = _time_ms(lambda: a @ b, 10, False)
    return copy_bw, 2 * 8192 ** 3 / ms / 1e9


def bf16_grouped_moe(x, ids, w, w13t, w2t, limit):
    """Baseline: same permute, torch._grouped_mm over bf16 experts (w13t [E, D, 2I], w2t [E, I, D])."""
    T, k = ids.shape
    E = w13t.shape[0]
    order, pos, _ = K.route_tiles(ids, E, 128)
    xs = x[order // k]
    flat = ids.reshape(-1).long()
    counts = torch.zeros(E, dtype=torch.int64, device=flat.device).scatter_add_(0, flat, torch.ones_like(flat))
    offs = torch.cumsum(counts, 0).to(torch.int32)
    hu = torch._grouped_mm(xs, w13t, offs=offs)
    inter = hu.shape[1] // 2
    h, u = hu[:, :inter].float().clamp(max=limit), hu[:, inter:].float().clamp(-limit, limit)
    a = (w.reshape(-1)[order][:, None] * torch.nn.functional.silu(h) * u).to(torch.bfloat16)
    yr = torch._grouped_mm(a, w2t, offs=offs)
    return yr[pos.view(T, k)].float().sum(1).to(torch.bfloat16)


def bench_moe():
    from _wip_test_kernels import random_fp4_experts
    torch.manual_seed(0)
    dev = torch.cuda.get_device_name()
    copy_bw, mm_tflops = ceilings()
    D, I, E, k, limit = 4096, 2048, 256, 6, 10.0
    n_copies = 4                                     # 4 x 3.4 GB of fp4 experts: L2 (50 MB) never holds them
    fp4 = [K.prepare_experts(random_fp4_experts(E, D, I, "nvfp4", device="cuda", seed=s)) for s in range(n_copies)]
    for ex in fp4:                                   # the kernel reads only the packed copy
        ex.w13 = ex.w13[:1]; ex.w2 = ex.w2[:1]
    torch.cuda.empty_cache()
    bf16 = []
    for s in range(2):                               # 2 x 12.9 GB of bf16 experts
        w13t = (torch.randn(E, D, 2 * I, device="cuda", dtype=torch.bfloat16) * 0.02)
        w2t = (torch.randn(E, I, D, device="cuda", dtype=torch.bfloat16) * 0.02)
        bf16.append((w13t, w2t))
    bytes_per_expert = K.weight_bytes_per_expert("nvfp4", D, I)    # codes + 1-byte block scales, read once

    def measure(Ts, with_baseline=True):
        rows = []
        for T in Ts:
            x = torch.randn(T, D, device="cuda", dtype=torch.bfloat16)
            ids = torch.argsort(torch.rand(T, E, device="cuda"), dim=1)[:, :k].to(torch.int32)
            w = torch.rand(T, k, device="cuda")
            w = w / w.sum(1, keepdim=True)
            touched = torch.unique(ids).numel()
            graph = T <= 256
            iters = 20 if T >= 4096 else 50
            try:
                ms_k = _time_ms(lambda: [K.moe_fp4(x, ids, w, ex, limit) for ex in fp4], iters, graph) / n_copies
            except RuntimeError as e:       # e.g. a driver that cannot capture PDL launches: measure without PDL
                if not K.USE_PDL:
                    raise
                print(f"T={T}: {e!r}; PDL turned off", flush=True)
                torch.cuda.synchronize()
                K.USE_PDL = False
                ms_k = _time_ms(lambda: [K.moe_fp4(x, ids, w, ex, limit) for ex in fp4], iters, graph) / n_copies
            ms_b = (_time_ms(lambda: [bf16_grouped_moe(x, ids, w, a, b, limit) for a, b in bf16], iters, graph) / 2
                    if with_baseline else float("nan"))
            flops = 2 * T * k * (D * 2 * I + I * D)
            wbytes = touched * bytes_per_expert
            floor_us = wbytes / (copy_bw * 1e12) * 1e6
            rows.append((T, touched, ms_k * 1e3, ms_b * 1e3, wbytes / (ms_k * 1e-3) / 1e12,
                         flops / (ms_k * 1e-3) / 1e12, floor_us))
            print(rows[-1], flush=True)
        return rows

    def table(title, rows):
        print(f"\n{title}")
        print(f"{'T':>6} {'experts':>7} {'fp4 us':>9} {'bf16 us':>9} {'speedup':>7} {'W TB/s':>7} {'%copy':>6} "
              f"{'TFLOP/s':>8} {'floor us':>9}")
        for T, e, k_us, b_us, bw, tf, fl in rows:
            print(f"{T:>6} {e:>7} {k_us:>9.1f} {b_us:>9.1f} {b_us / k_us:>7.2f} {bw:>7.2f} "
                  f"{100 * bw / copy_bw:>6.1f} {tf:>8.1f} {fl:>9.1f}")

    if "--ablate-v4" in sys.argv:       # v4 knobs one at a time: PDL off, split-K to 4 CTAs/SM
        K.USE_PDL = False
        table("ablation: PDL off (GEMMs + combine launched plainly)", measure((1, 4, 16, 256), with_baseline=False))
        K.USE_PDL = True
        K.SPLIT_CTAS_PER_SM, per_sm = 4, K.SPLIT_CTAS_PER_SM
        table("ablation: split-K up to 4 CTAs per SM (the GEMM's occupancy: 98 registers)",
              measure((1, 4), with_baseline=False))
        K.SPLIT_CTAS_PER_SM = per_sm
    if "--ablate" in sys.argv:          # decode knobs off (no split-K, 72 KB pipelines), same data
        K.SPLIT_K, budget = False, K.DECODE_SMEM_BUDGET
        K.DECODE_SMEM_BUDGET = 72 * 1024
        table("ablation: SPLIT_K off, decode smem 72 KB", measure((1, 4, 16, 64, 256), with_baseline=False))
        K.SPLIT_K, K.DECODE_SMEM_BUDGET = True, budget
        K.SPLIT_CTAS_PER_SM, per_sm = 16, K.SPLIT_CTAS_PER_SM
        table("ablation: split-K up to 16 CTAs per SM", measure((1, 4), with_baseline=False))
        K.SPLIT_CTAS_PER_SM = per_sm
    rows = measure((1, 4, 16, 64, 256, 1024, 4096, 16384))   # main table: all v4 knobs at their defaults
    print(f"\nceilings: copy {copy_bw:.2f} TB/s, bf16 matmul 8192^3 {mm_tflops:.0f} TFLOP/s")
    table(f"MoE at Flash dims (D {D}, I {I}, {E} experts, top-{k}, nvfp4, random routing) on {dev}", rows)


def profile_moe():
    """`python bench.py moe-profile`: device time per kernel of one moe_fp4 call at decode sizes (torch profiler)."""
    from torch.profiler import profile, ProfilerActivity
    from _wip_test_kernels import random_fp4_experts
    D, I, E, k = 4096, 2048, 256, 6
    ex = K.prepare_experts(random_fp4_experts(E, D, I, "nvfp4", device="cuda", seed=0))
    for T in (1, 4, 64):
        x = torch.randn(T, D, device="cuda", dtype=torch.bfloat16)
        ids = torch.argsort(torch.rand(T, E, device="cuda"), dim=1)[:, :k].to(torch.int32)
        w = torch.full((T, k), 1.0 / k, device="cuda")
        for _ in range(3):
            K.moe_fp4(x, ids, w, ex, 10.0)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(10):
                K.moe_fp4(x, ids, w, ex, 10.0)
            torch.cuda.synchronize()
        print(f"\nT={T}: device time per call, by kernel (10 calls)")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=60))


if __name__ == "__main__":
    what = sys.argv[1] if len(sys.argv) > 1 else "moe"
    if what not in ("moe", "moe-profile"):
        print(f"unknown benchmark {what!r} (known: moe, moe-profile)", file=sys.stderr)
        sys.exit(2)
    if not (torch.cuda.is_available() and K.HAVE_CUTE):
        print(f"bench.py {what} needs a CUDA GPU and CuTe DSL", file=sys.stderr)
        sys.exit(2)
    profile_moe() if what == "moe-profile" else bench_moe()
