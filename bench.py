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
    rec_bytes = K.record_bytes("nvfp4")
    bytes_per_expert = (2 * I // 128) * (D // 64) * rec_bytes + (D // 128) * (I // 64) * rec_bytes
    rows = []
    for T in (1, 4, 16, 64, 256, 1024, 4096, 16384):
        x = torch.randn(T, D, device="cuda", dtype=torch.bfloat16)
        ids = torch.argsort(torch.rand(T, E, device="cuda"), dim=1)[:, :k].to(torch.int32)
        w = torch.rand(T, k, device="cuda")
        w = w / w.sum(1, keepdim=True)
        touched = torch.unique(ids).numel()
        graph = T <= 256
        iters = 20 if T >= 4096 else 50
        ms_k = _time_ms(lambda: [K.moe_fp4(x, ids, w, ex, limit) for ex in fp4], iters, graph) / n_copies
        ms_b = _time_ms(lambda: [bf16_grouped_moe(x, ids, w, a, b, limit) for a, b in bf16], iters, graph) / 2
        flops = 2 * T * k * (D * 2 * I + I * D)
        wbytes = touched * bytes_per_expert
        floor_us = wbytes / (copy_bw * 1e12) * 1e6
        rows.append((T, touched, ms_k * 1e3, ms_b * 1e3, wbytes / (ms_k * 1e-3) / 1e12, flops / (ms_k * 1e-3) / 1e12,
                     floor_us))
        print(rows[-1], flush=True)
    print(f"\nMoE at Flash dims (D {D}, I {I}, {E} experts, top-{k}, nvfp4, random routing) on {dev}")
    print(f"ceilings: copy {copy_bw:.2f} TB/s, bf16 matmul 8192^3 {mm_tflops:.0f} TFLOP/s")
    print(f"{'T':>6} {'experts':>7} {'fp4 us':>9} {'bf16 us':>9} {'speedup':>7} {'W TB/s':>7} {'%copy':>6} "
          f"{'TFLOP/s':>8} {'floor us':>9}")
    for T, e, k_us, b_us, bw, tf, fl in rows:
        print(f"{T:>6} {e:>7} {k_us:>9.1f} {b_us:>9.1f} {b_us / k_us:>7.2f} {bw:>7.2f} {100 * bw / copy_bw:>6.1f} "
              f"{tf:>8.1f} {fl:>9.1f}")


if __name__ == "__main__":
    what = sys.argv[1] if len(sys.argv) > 1 else "moe"
    if what != "moe":
        print(f"unknown benchmark {what!r} (known: moe)", file=sys.stderr)
        sys.exit(2)
    if not (torch.cuda.is_available() and K.HAVE_CUTE):
        print("bench.py moe needs a CUDA GPU and CuTe DSL", file=sys.stderr)
        sys.exit(2)
    bench_moe()
