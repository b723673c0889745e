"""Benchmarks (GPU). Each prints a short table; numbers are only comparable within one run on one card.

  python bench.py moe                  the routed MoE at Flash dims: fp4 CuTe DSL kernel vs torch bf16 _grouped_mm,
                                       with the device copy bandwidth and a bf16 matmul as ceilings
  python bench.py moe --decode-only    the same at T = 1..256 only, in under a minute: per graph replay, device time
                                       (behind a spin kernel), chained (a graph of 16 calls) and marginal (the
                                       slope over graphs of 4, 16 and 64 calls behind the spin); --ablate-gemv: the
                                       mma.sync decode GEMV vs the wgmma GEMM, and the GEMV's knobs
                                       --ablate-mid: session 7's switches (MID_SWITCHES) old vs new at T = 4..256,
                                       medians of interleaved rounds, per replay and queued back to back;
                                       --ablate-depth / --ablate-shape: the same for DEPTH_SWITCHES (loads in flight per warp,
                                       T 1..4) / SHAPE_SWITCHES (row tiles per CTA, T 1..256); --ablate-hint:
                                       HINT_SWITCHES (the weight loads' L2 prefetch size, T 1..256); --ablate-decode:
                                       DECODE_SWITCHES (the e2m1 decode's shifts, T 1..256); --ablate-chunks:
                                       CHUNKS_SWITCHES (Fp4MoeChunks vs the fused launch at T = 1, its probes);
                                       --read-ceiling: a plain read of the same bytes, 1 and 2 launches, T 1..4;
                                       --mxfp4: MXFP4 records; --pro: Pro dims (D 7168, I 3072, 384 experts)
  python bench.py moe --prefill        T = 4096 / 16384 as dsv4.py calls the MoE (burst, graph, sustained, with the SM
                                       clock and power; --ablate-prefill: the prefill switches next to default rows)
  python bench.py moe-profile          per-kernel device time of the fp4 MoE
  python bench.py moe-stamps [T]       per-CTA phase timeline of the fused decode MoE (T <= 3; T = 1 with MOE_CHUNKS
                                       off); moe-stamps 1 --chunks: of Fp4MoeChunks
  python bench.py decode [--layers N]  decode step of a Flash-dims layer stack, eager vs CUDA graph, vs its byte floor
  python bench.py gemv                 the batch-1 decode GEMVs under the s5 vs s4 config rules (same run), vs copy
                                       (--ld-hints: each with the weight loads' L2 prefetch sizes 256B / none / 64B /
                                       128B, the default since session 17)
  python bench.py fold                 session 7's folds as chains of the kernels they touch, folded vs not (same run)
  python bench.py handoff              megakernel stage 0 (notes/megakernel.md): one-way latency of an in-kernel handoff
                                       through a global counter (two CTAs ping-pong), idle and while the other SMs stream
                                       256 MB; a ticket counter's claim latency; the PDL kernel boundary (graph of tiny
                                       kernels, with and without PDL), all in one run (< 1 min)
  python bench.py prefill              eager prefill (time to first token) of a Flash-dims layer stack at prompts of
                                       1K / 4K / 16K tokens: ms per layer, tokens/s, TTFT projected for 43 layers,
                                       matmul TFLOP/s vs a bf16 matmul, peak memory; the kernels of one 4K prefill
  python bench.py dist write DIR       2-GPU check (torchrun): a reduced-layer Flash-dims NVFP4 checkpoint,
  python bench.py dist run DIR OUT.pt  its prefill/decode logits and decode ms/token (run under torchrun for N GPUs;
                                       --fp32: one GPU in float32, the yardstick for bf16 noise),
  python bench.py dist compare A B [R] and the 1-vs-N GPU agreement (R: the --fp32 run)
"""
import argparse
import gc
import json
import math
import os
import statistics
import sys
import time

import torch
import torch.nn as nn

import dsv4
import kernels as K
import weights


# ======================================================================================================================
# The routed MoE kernel
# ======================================================================================================================

BLOCK_CYCLES = 1 << 20      # _time_ms(blocked=True): the spin before each timed call (~0.5 ms at 1.98 GHz)


def _time_ms(fn, iters, graph, blocked=False):
    """Median ms per call of fn (a list of calls over rotating weight copies is one 'call' group), by CUDA events
    around one call (or graph replay) on an idle GPU: that includes the host's launch latency (the event before the
    call is recorded at once, the call's first kernel starts only once the host has launched it). blocked: the GPU
    first spins for BLOCK_CYCLES while the host queues the events and the call behind the spin, so the events time
    the device's work alone (NVBench's blocking-kernel protocol)."""
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
        if blocked:
            torch.cuda._sleep(BLOCK_CYCLES)
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
    torch.manual_seed(0)
    dev = torch.cuda.get_device_name()
    copy_bw, mm_tflops = ceilings()
    D, I, E, k, limit = 4096, 2048, 256, 6, 10.0
    n_copies = 4                                     # 4 x 3.4 GB of fp4 experts: L2 (50 MB) never holds them
    fp4 = [K.prepare_experts(K.random_fp4_experts(E, D, I, "nvfp4", device="cuda", seed=s)) for s in range(n_copies)]
    for ex in fp4:                                   # the kernel reads only the packed copy
        ex.w13 = ex.w13[:1]; ex.w2 = ex.w2[:1]
    torch.cuda.empty_cache()
    bf16 = []
    for s in range(2):                               # 2 x 12.9 GB of bf16 experts
        w13t = (torch.randn(E, D, 2 * I, device="cuda", dtype=torch.bfloat16) * 0.02)
        w2t = (torch.randn(E, I, D, device="cuda", dtype=torch.bfloat16) * 0.02)
        bf16.append((w13t, w2t))
    bytes_per_expert = K.weight_bytes_per_expert("nvfp4", D, I)    # codes + 1-byte block scales, read once

    clocks = _Clocks()

    def measure(Ts, with_baseline=True):
        """T <= 256: CUDA-graph replays over the weight copies; larger T: kernels.moe as dsv4.py calls it, eager,
        back to back after 0.5 s of the same load (the clock a long prefill runs at; see bench.py moe --prefill)."""
        rows = []
        for T in Ts:
            x = torch.randn(T, D, device="cuda", dtype=torch.bfloat16)
            ids = torch.argsort(torch.rand(T, E, device="cuda"), dim=1)[:, :k].to(torch.int32)
            w = torch.rand(T, k, device="cuda")
            w = w / w.sum(1, keepdim=True)
            touched = torch.unique(ids).numel()
            graph = T <= 256
            iters = 20 if T >= 4096 else 50
            fp4_calls = lambda: [K.moe(x, ids, w, ex, limit) for ex in fp4]      # noqa: E731
            t0 = time.time()
            try:
                ms_k = (_time_ms(fp4_calls, iters, graph) if graph
                        else _sustained_ms(fp4_calls, 0.5, max(2, iters // 4))) / n_copies
            except RuntimeError as e:       # e.g. a driver that cannot capture PDL launches: measure without PDL
                if not K.USE_PDL:
                    raise
                print(f"T={T}: {e!r}; PDL turned off", flush=True)
                torch.cuda.synchronize()
                K.USE_PDL = False
                ms_k = _time_ms(fp4_calls, iters, graph) / n_copies
            mhz = clocks.mean(t0, time.time())[0]
            bf16_calls = lambda: [bf16_grouped_moe(x, ids, w, a, b, limit) for a, b in bf16]   # noqa: E731
            ms_b = ((_time_ms(bf16_calls, iters, graph) if graph else _sustained_ms(bf16_calls, 0.5, 3)) / 2
                    if with_baseline else float("nan"))
            flops = 2 * T * k * (D * 2 * I + I * D)
            wbytes = touched * bytes_per_expert
            floor_us = wbytes / (copy_bw * 1e12) * 1e6
            rows.append((T, touched, ms_k * 1e3, ms_b * 1e3, wbytes / (ms_k * 1e-3) / 1e12,
                         flops / (ms_k * 1e-3) / 1e12, floor_us, mhz))
            print(rows[-1], flush=True)
        return rows

    def table(title, rows):
        print(f"\n{title}")
        print(f"{'T':>6} {'experts':>7} {'fp4 us':>9} {'bf16 us':>9} {'speedup':>7} {'W TB/s':>7} {'%copy':>6} "
              f"{'TFLOP/s':>8} {'floor us':>9} {'SM MHz':>6}")
        for T, e, k_us, b_us, bw, tf, fl, mhz in rows:
            print(f"{T:>6} {e:>7} {k_us:>9.1f} {b_us:>9.1f} {b_us / k_us:>7.2f} {bw:>7.2f} "
                  f"{100 * bw / copy_bw:>6.1f} {tf:>8.1f} {fl:>9.1f} {mhz:>6.0f}")

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
    clocks.stop()
    table(f"MoE at Flash dims (D {D}, I {I}, {E} experts, top-{k}, nvfp4, random routing) on {dev}; timed: "
          f"kernels.moe; T <= 256 CUDA-graph replays, larger T eager calls back to back after 0.5 s of load "
          f"(SM MHz = mean clock of that fp4 row)", rows)


# ---------------------------------------------------------------------------------------------------------------------
# Prefill sizes (issue #3: T >= 4096): `python bench.py moe --prefill [--ablate-prefill]`
# The timed region is kernels.moe(x, ids, w, experts, limit) exactly as dsv4.py's MoE calls it (eager: routing
# metadata, gather, both GEMMs and the combine). The GPU's SM clock drops under sustained load (power), so every row
# also says the mean SM clock and board power while it ran (nvidia-smi, sampled every 100 ms), and three modes are
# timed: "burst" = median of single synced calls after 3 warm-up calls (what bench.py moe reported before),
# "graph" = the same as CUDA-graph replays, "sustained" = calls back to back after ~1.5 s of back-to-back load
# (a long prefill through 43 layers looks like this), total time / calls.

PREFILL_ABLATIONS = {            # name -> kernels.py switches (rows next to default rows: same clock state)
    "widths 96,112,128": dict(PREFILL_WIDTHS=(96, 112, 128)),
    "widths 64,96,128": dict(PREFILL_WIDTHS=(64, 96, 128)),
    "one 128 width": dict(PREFILL_WIDTHS=()),
}
PREFILL_ABLATE_BOTH_T = 6        # the first this many also at T = 16384 (the rest at T = 4096 only)


# the other configs the GPU tests of _gpu.sh compile (warmed in parallel with the bench's)
PREFILL_TEST_CONFIGS = [("mxfp4", dict(PREFILL_WIDTHS=())), ("nvfp4", dict(PREFILL_WIDTHS=(32, 64, 128))), ("mxfp4", dict(PREFILL_WIDTHS=(32, 64, 128))),
                        ("mxfp4", dict(PREFILL_WIDTHS=(96, 128)))]


class _Knobs:
    """with _Knobs(PREFILL_TILE_N=112): kernels.py module switches set inside, restored after."""

    def __init__(self, **knobs):
        self.knobs, self.saved = knobs, {}

    def __enter__(self):
        self.saved = {name: getattr(K, name) for name in self.knobs}
        for name, v in self.knobs.items():
            setattr(K, name, v)

    def __exit__(self, *exc):
        for name, v in self.saved.items():
            setattr(K, name, v)


class _Clocks:
    """nvidia-smi in the background: SM clock (MHz), power (W) every 100 ms; mean over a wall-clock interval."""

    def __init__(self):
        import subprocess
        import threading
        self.samples = []
        try:
            self.proc = subprocess.Popen(
                ["nvidia-smi", "--query-gpu=clocks.sm,power.draw,temperature.gpu", "--format=csv,noheader,nounits",
                 "-lms", "100", "-i", str(torch.cuda.current_device())],
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        except OSError:
            self.proc = None
            return
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            try:
                mhz, watts, temp = (float(v) for v in line.split(","))
            except ValueError:
                continue
            self.samples.append((time.time(), mhz, watts, temp))

    def mean(self, t0, t1):
        time.sleep(0.11)
        sel = [s for s in self.samples if t0 <= s[0] <= t1 + 0.1]
        if not sel:
            return float("nan"), float("nan")
        return sum(s[1] for s in sel) / len(sel), sum(s[2] for s in sel) / len(sel)

    def stop(self):
        if self.proc is not None:
            self.proc.terminate()


def _burst_ms(fn, iters):
    for _ in range(3):
        fn()
    return _time_ms(fn, iters, False)


def _sustained_ms(fn, warm_s, calls):
    """ms per call of calls back-to-back calls, after warm_s seconds of back-to-back calls (synced every 8)."""
    t0 = time.time()
    i = 0
    while time.time() - t0 < warm_s:
        fn()
        i += 1
        if i % 8 == 0:
            torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(calls):
        fn()
    b.record()
    b.synchronize()
    return a.elapsed_time(b) / calls


def _graph_ms(fn, iters):
    return _time_ms(fn, iters, True)


def _prefill_warm_job(job):
    fmt, knobs = job
    t = time.time()
    try:
        with _Knobs(**knobs):
            for T in (4096, 16384):                 # (the default width classes depend on the rows per expert)
                K.prefill_kernels(fmt, 256, 6, 4096, T)
    except Exception as e:       # noqa: BLE001 - the bench compiles (and reports) it again
        return repr(e)[:200]
    return time.time() - t


def prefill_warm(fmts=("nvfp4", "mxfp4"), ablations=True):
    """Compile every kernel the prefill bench runs, in parallel processes, into the disk cache."""
    import concurrent.futures as cf
    import multiprocessing as mp
    jobs = [(fmt, {}) for fmt in fmts] + ([("nvfp4", kn) for kn in PREFILL_ABLATIONS.values()] if ablations else [])
    jobs += [(fmt, kn) for fmt, kn in PREFILL_TEST_CONFIGS if (fmt, kn) not in jobs]
    t = time.time()
    with cf.ProcessPoolExecutor(max_workers=min(len(jobs), os.cpu_count() or 1),
                                mp_context=mp.get_context("spawn")) as pool:
        secs = list(pool.map(_prefill_warm_job, jobs))
    print(f"compiled {len(jobs)} prefill kernel sets in {time.time() - t:.1f} s: "
          + ", ".join(f"{f}{kn or ''} {s:.1f}s" if isinstance(s, float) else f"{f}{kn} FAILED {s}"
                      for (f, kn), s in zip(jobs, secs)), flush=True)


def bench_moe_prefill():
    t_start = time.time()
    torch.manual_seed(0)
    dev = torch.cuda.get_device_name()
    clocks = _Clocks()
    rows = []
    D, I, E, k, limit = 4096, 2048, 256, 6, 10.0
    flops_of = lambda T: 2 * T * k * 3 * D * I                        # noqa: E731

    def add(T, what, mode, fn_ms, flops):
        t0 = time.time()
        ms = fn_ms()
        mhz, watts = clocks.mean(t0, time.time())
        rows.append((T, what, mode, ms * 1e3, flops / (ms * 1e-3) / 1e12 if flops else 0.0, mhz, watts))
        print(f"{T:>6} {what:<44} {mode:<9} {ms * 1e3:>9.1f} us {rows[-1][4]:>6.1f} TFLOP/s {mhz:>5.0f} MHz "
              f"{watts:>4.0f} W", flush=True)
        return ms

    n = 1 << 30
    src = torch.empty(n, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    copy_ms = add(0, "copy 1 GiB (read + write)", "burst", lambda: _burst_ms(lambda: dst.copy_(src), 20), 0)
    copy_bw = 2 * n / copy_ms / 1e9
    del src, dst
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    mm_ms = add(0, "bf16 matmul 8192^3", "burst", lambda: _burst_ms(lambda: a @ b, 10), 2 * 8192 ** 3)
    experts = {fmt: K.prepare_experts(K.random_fp4_experts(E, D, I, fmt, device="cuda", seed=1))
               for fmt in ("nvfp4", "mxfp4")}
    for ex in experts.values():                      # the kernel reads only the packed records
        ex.w13, ex.w2 = ex.w13[:1], ex.w2[:1]
    torch.cuda.empty_cache()
    w13t = torch.randn(E, D, 2 * I, device="cuda", dtype=torch.bfloat16) * 0.02
    w2t = torch.randn(E, I, D, device="cuda", dtype=torch.bfloat16) * 0.02
    inputs = {}
    for T in (4096, 16384):                          # random routing, as bench.py moe
        g = torch.Generator(device="cuda").manual_seed(T)
        x = torch.randn(T, D, device="cuda", dtype=torch.bfloat16, generator=g)
        ids = torch.argsort(torch.rand(T, E, device="cuda", generator=g), dim=1)[:, :k].to(torch.int32)
        w = torch.rand(T, k, device="cuda", generator=g)
        inputs[T] = x, ids, w / w.sum(1, keepdim=True)
    print(f"setup {time.time() - t_start:.1f} s", flush=True)

    def moe(T, fmt="nvfp4"):
        x, ids, w = inputs[T]
        ex = experts[fmt]
        return lambda: K.moe(x, ids, w, ex, limit)

    for T in (4096, 16384):
        add(T, "kernels.moe nvfp4", "burst", lambda: _burst_ms(moe(T), 20), flops_of(T))
        for fmt in ("nvfp4", "mxfp4"):
            add(T, f"kernels.moe {fmt}", "graph", lambda: _graph_ms(moe(T, fmt), 20), flops_of(T))
        x, ids, w = inputs[T]
        add(T, "torch bf16 _grouped_mm", "burst",
            lambda: _burst_ms(lambda: bf16_grouped_moe(x, ids, w, w13t, w2t, limit), 5), flops_of(T))
    for T in (4096, 16384):
        for fmt in ("nvfp4", "mxfp4"):
            add(T, f"kernels.moe {fmt}", "sustained", lambda: _sustained_ms(moe(T, fmt), 0.8, 20), flops_of(T))
    add(0, "bf16 matmul 8192^3", "sustained", lambda: _sustained_ms(lambda: a @ b, 1.0, 20), 2 * 8192 ** 3)
    if "--ablate-prefill" in sys.argv:               # each variant right after a default row: same clock state
        for T in (4096, 16384):
            for i, (name, knobs) in enumerate(PREFILL_ABLATIONS.items()):
                if T != 4096 and i >= PREFILL_ABLATE_BOTH_T:
                    break
                if i % 3 == 0:          # a default row before every 3 variants: the clock state they ran in
                    add(T, "default", "sustained", lambda: _sustained_ms(moe(T), 0.25, 10), flops_of(T))
                with _Knobs(**knobs):
                    add(T, name, "sustained", lambda: _sustained_ms(moe(T), 0.25, 10), flops_of(T))
            add(T, "default", "sustained", lambda: _sustained_ms(moe(T), 0.25, 10), flops_of(T))
    prefill_profile(inputs, experts["nvfp4"], limit)
    clocks.stop()
    print(f"\nprefill MoE at Flash dims (D {D}, I {I}, {E} experts, top-{k}, random routing) on {dev}: timed region "
          f"= kernels.moe(...) as dsv4.py calls it; copy {copy_bw:.2f} TB/s, bf16 matmul 8192^3 "
          f"{2 * 8192 ** 3 / mm_ms / 1e9:.0f} TFLOP/s (burst); total {time.time() - t_start:.0f} s")
    print(f"{'T':>6} {'path':<56} {'mode':<9} {'us':>9} {'TFLOP/s':>7} {'MHz':>5} {'W':>4}")
    for T, what, mode, us, tf, mhz, watts in rows:
        print(f"{T:>6} {what:<56} {mode:<9} {us:>9.1f} {tf:>7.1f} {mhz:>5.0f} {watts:>4.0f}")


def prefill_profile(inputs, ex, limit, calls=6):
    """Device time per kernel of back-to-back kernels.moe calls (torch profiler), us per call."""
    from torch.profiler import profile as torch_profile, ProfilerActivity
    for T, (x, ids, w) in inputs.items():
        for _ in range(2):
            K.moe(x, ids, w, ex, limit)
        torch.cuda.synchronize()
        with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(calls):
                K.moe(x, ids, w, ex, limit)
            torch.cuda.synchronize()
        dt = lambda e: getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)   # noqa: E731
        rows = sorted(((e.key, e.count, dt(e)) for e in prof.key_averages() if dt(e) > 0), key=lambda r: -r[2])
        total = sum(r[2] for r in rows) / calls
        print(f"profile T={T} nvfp4 ({calls} back-to-back calls; device us per call, sum {total:.0f}): " + "; ".join(
            f"{name[:48]} x{cnt // calls} {t / calls:.1f}" for name, cnt, t in rows), flush=True)


def random_routing(T, D, E, k):
    """(x [T, D] bf16, topk_ids [T, k] int32: k distinct random experts per token, weights [T, k] summing to 1),
    seeded by T, on the GPU."""
    g = torch.Generator(device="cuda").manual_seed(T)
    ids = torch.argsort(torch.rand(T, E, device="cuda", generator=g), dim=1)[:, :k].to(torch.int32)
    w = torch.rand(T, k, device="cuda", generator=g)
    return torch.randn(T, D, device="cuda", dtype=torch.bfloat16, generator=g), ids, w / w.sum(1, keepdim=True)


def random_packed_experts(E, D, I, device, seed, fmt="nvfp4"):
    """Flash-dims fp4 experts for timing only: random record bytes (codes, and scale bytes in a sane range) written
    straight into the kernel's layout (prepare_experts' repack of 256 experts takes seconds; values do not matter)."""
    g = torch.Generator(device=device).manual_seed(seed)
    rec = K.record_bytes(fmt)
    lo, hi = (56, 88) if fmt == "nvfp4" else (125, 130)     # stored scale bytes ~2^-2 .. 2^2 (e4m3 code | e8m0)

    def records(m, k):
        r = torch.randint(0, 256, (E, (m // K.TILE_M) * (k // K.TILE_K), rec), generator=g, dtype=torch.uint8,
                          device=device)
        r[..., K.CODE_BYTES:] = torch.randint(lo, hi, r[..., K.CODE_BYTES:].shape, generator=g, dtype=torch.uint8,
                                              device=device)
        return r.view(E, -1, rec // K.REC_ROW, K.REC_ROW)

    ex = K.Experts(fmt=fmt, w13=torch.zeros(1, 2 * I, D // 2, dtype=torch.uint8, device=device), w13_scale=None,
                   w2=torch.zeros(1, D, I // 2, dtype=torch.uint8, device=device), w2_scale=None,
                   alpha_gate=torch.full((E,), 0.02, device=device), alpha_up=torch.full((E,), 0.02, device=device),
                   alpha_down=torch.full((E,), 0.02, device=device))
    ex.packed = K.PackedExperts(fmt=fmt, w13=records(2 * I, D), w2=records(D, I), dim=D, inter=I,
                                alphas=tuple(torch.full((E,), 0.02 * K.ACC_FIX, device=device) for _ in range(3)))
    return ex


def bench_moe_decode():
    """`python bench.py moe --decode-only [--ablate-gemv]`: the decode sizes (T 1..256) only, in well under a minute:
    random records instead of repacked experts; baseline (torch bf16 _grouped_mm) and copy bandwidth in the same run."""
    t_start = float(os.environ.get("MOEDEC_T0", time.time()))       # the GPU check passes its own start time
    torch.manual_seed(0)
    dev = torch.cuda.get_device_name()
    n = 1 << 30
    src = torch.empty(n, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    copy_host = 2 * n / _time_ms(lambda: dst.copy_(src), 20, False) / 1e9
    copy_bw = 2 * n / _time_ms(lambda: dst.copy_(src), 20, False, blocked=True) / 1e9   # device time: the ceiling
    del src, dst
    D, I, E, k, limit = (7168, 3072, 384, 6, 10.0) if "--pro" in sys.argv else (4096, 2048, 256, 6, 10.0)
    n_copies = 4                                      # 4 x 3.4 GB (Pro: 14.3 GB) of fp4 records: L2 never holds them
    fmt = "mxfp4" if "--mxfp4" in sys.argv else "nvfp4"
    fp4 = [random_packed_experts(E, D, I, "cuda", s, fmt) for s in range(n_copies)]
    bf16 = [(torch.randn(E, D, 2 * I, device="cuda", dtype=torch.bfloat16) * 0.02,
             torch.randn(E, I, D, device="cuda", dtype=torch.bfloat16) * 0.02)
            for _ in range(2 if not {"--moefront", "--ablate-mid", "--ablate-depth", "--ablate-shape", "--ablate-hint",
                                     "--read-ceiling", "--ablate-chunks", "--ablate-decode"} & set(sys.argv) else 0)]
    bytes_per_expert = K.weight_bytes_per_expert(fmt, D, I)
    Ts = (1, 2, 4, 16, 64, 256) if "--ablate-fused" not in sys.argv else (1, 2, 4)
    if "--ablate-mid" in sys.argv:
        Ts = (4, 16, 64, 128, 256)
    if "--ablate-depth" in sys.argv:
        Ts = (1, 2, 4)
    if "--read-ceiling" in sys.argv:
        Ts = (1, 2, 3, 4)
    if "--ablate-shape" in sys.argv:
        Ts = (1, 2, 3) if "--pro" in sys.argv else (1, 2, 3, 4, 16, 64, 256)
    if "--ablate-hint" in sys.argv or "--ablate-decode" in sys.argv:
        Ts = (1, 2, 3, 4, 16, 64, 256)
    if "--ablate-chunks" in sys.argv:
        Ts = (1, 2)
    routings = {}
    for T in Ts:                                      # one routing per T, shared by every variant below
        x, ids, w = random_routing(T, D, E, k)
        routings[T] = (x, ids, w, torch.unique(ids).numel())

    def fp4_us(T, blocked=False, passes=1):
        """us per call of a graph of `passes` x n_copies calls (one call per weight copy per pass)."""
        x, ids, w, _ = routings[T]
        return _time_ms(lambda: [K.moe_fp4(x, ids, w, ex, limit) for _ in range(passes) for ex in fp4], 30, True,
                        blocked) / (passes * n_copies) * 1e3

    def pct(T, us):
        return 100 * routings[T][3] * bytes_per_expert / (us * 1e-6) / 1e12 / copy_bw

    def bf16_us(T):
        x, ids, w, _ = routings[T]
        return _time_ms(lambda: [bf16_grouped_moe(x, ids, w, a, b, limit) for a, b in bf16], 10, True) / 2 * 1e3

    def with_knobs(knob, fn):
        saved = {name: getattr(K, name) for name in knob}
        for name, v in knob.items():
            setattr(K, name, v)
        try:
            return fn()
        finally:
            for name, v in saved.items():
                setattr(K, name, v)

    print(f"{dev}: copy {copy_bw:.2f} TB/s (read + write of 1 GiB, device time; {copy_host:.2f} with the host's "
          f"launch latency)", flush=True)
    if "--ablate-gemv" in sys.argv:
        gemv_ablation(Ts, routings, fp4_us, pct, with_knobs, copy_bw, bytes_per_expert, dev, t_start, fp4)
        return
    if "--moefront" in sys.argv:
        moefront_ablation(fp4, with_knobs, dev)
        return
    if "--ablate-mid" in sys.argv:
        mid_ablation(Ts, routings, pct, with_knobs, copy_bw, bytes_per_expert, dev, fp4, limit)
        return
    for flag, switches in (("--ablate-depth", DEPTH_SWITCHES), ("--ablate-shape", SHAPE_SWITCHES),
                           ("--ablate-hint", HINT_SWITCHES), ("--ablate-chunks", CHUNKS_SWITCHES),
                           ("--ablate-decode", DECODE_SWITCHES)):
        if flag in sys.argv:
            mid_ablation(Ts, routings, pct, with_knobs, copy_bw, bytes_per_expert, dev, fp4, limit, switches=switches)
            return
    if "--ablate-fused" in sys.argv:
        fused_ablation(Ts, routings, fp4_us, pct, with_knobs, copy_bw, bytes_per_expert, dev)
        for T in (1, 4):                                   # device time per kernel, PDL off: two launches, fused
            for f in (False, True):
                try:
                    print(f"{'fused' if f else 'two launches'}: ", end="")
                    with_knobs(dict(USE_PDL=False, MOE_GEMV_FUSED=f, MOE_GEMV_FUSED_MAX_ROWS=24),
                               lambda: profile_decode(routings, T, fp4))
                except Exception as e:      # noqa: BLE001 - a diagnostic only
                    print(f"profile failed: {e!r}", flush=True)
        return
    if "--read-ceiling" in sys.argv:
        read_ceiling(Ts, routings, fp4_us, copy_bw, bytes_per_expert, dev)
        return
    clocks = _Clocks()
    main, dev_us, chain, marg, over, base, mhz = {}, {}, {}, {}, {}, {}, {}
    for T in Ts:                    # a T's rows back to back: the card's clock (power, heat) moves over the run
        t0 = time.time()
        main[T], dev_us[T], chain[T] = fp4_us(T), fp4_us(T, blocked=True), fp4_us(T, blocked=True, passes=4)
        # marginal: the least-squares slope of a graph's time over its call count (4, 16, 64 calls behind the spin),
        # i.e. what one more call in a PDL chain costs, without the graph's fixed start (over: the intercept). Only
        # where the clock holds over a 64-call graph: from T = 16 on the card power-caps during it (H200: 1.7 GHz at
        # T = 64), which a slope would count as the kernel's (a negative intercept shows it)
        marg[T] = over[T] = None
        if T <= 4:
            ns = (n_copies, 4 * n_copies, 16 * n_copies)
            tot = (dev_us[T] * ns[0], chain[T] * ns[1], fp4_us(T, blocked=True, passes=16) * ns[2])
            mn, mt = sum(ns) / 3, sum(tot) / 3
            marg[T] = sum((n - mn) * (v - mt) for n, v in zip(ns, tot)) / sum((n - mn) ** 2 for n in ns)
            over[T] = mt - marg[T] * mn
        mhz[T] = clocks.mean(t0, time.time())[0]
        base[T] = bf16_us(T)
    clocks.stop()
    print(f"\nMoE decode, {'Pro' if D == 7168 else 'Flash'} dims (D {D}, I {I}, {E} experts, top-{k}, {fmt}), "
          f"CUDA-graph replays over {n_copies} weight copies, {dev}. fp4 us / bf16 us: a graph of {n_copies} calls, "
          f"events around one replay on an idle GPU (the host's graph-launch latency included; the table's method "
          f"since session 1); device: the same replay queued behind a spin kernel (device time only: the first "
          f"call still starts cold); chained: a graph of {4 * n_copies} calls behind the spin (each call starts "
          f"behind the previous one by PDL, as in a decode step); marginal: the slope of a graph's device time "
          f"over 4, 16 and {16 * n_copies} calls (one more call in a chain; 'graph +us': the intercept, the "
          f"graph's fixed start, paid once; T <= 4 only: larger T power-cap the card over a long graph). %copy "
          f"against the copy's device time, "
          f"{copy_bw:.2f} TB/s; SM MHz: mean clock over the T's fp4 rows")
    print(f"{'T':>4} {'experts':>7} {'floor us':>8} {'fp4 us':>8} {'%copy':>6} {'device':>8} {'%copy':>6} "
          f"{'chained':>8} {'%copy':>6} {'marginal':>8} {'%copy':>6} {'graph +us':>9} {'bf16 us':>8} {'speedup':>7} "
          f"{'SM MHz':>6}")
    for T in Ts:
        hit = routings[T][3]
        print(f"{T:>4} {hit:>7} {hit * bytes_per_expert / (copy_bw * 1e12) * 1e6:>8.1f} {main[T]:>8.1f} "
              f"{pct(T, main[T]):>6.1f} {dev_us[T]:>8.1f} {pct(T, dev_us[T]):>6.1f} {chain[T]:>8.1f} "
              f"{pct(T, chain[T]):>6.1f} " + (f"{marg[T]:>8.1f} {pct(T, marg[T]):>6.1f} {over[T]:>9.1f}"
                                              if marg[T] is not None else f"{'-':>8} {'-':>6} {'-':>9}") +
              f" {base[T]:>8.1f} {base[T] / main[T]:>7.2f} {mhz[T]:>6.0f}", flush=True)


def read_ceiling(Ts, routings, fp4_us, copy_bw, bytes_per_expert, dev):
    """`bench.py moe --decode-only --read-ceiling`: what reading the touched experts' bytes costs with no math and no
    dependency, in the same protocol as the kernel (a graph of calls over 4 buffer copies): one launch of a plain
    read kernel (Triton, which CUDA builds of torch ship; the best of a few shapes), the same bytes as two
    stream-ordered launches (w1|w3's bytes, then w2's: the MoE's dependency at its cheapest), and a device copy
    moving the same bytes (half read, half written); next to the fp4 MoE at the same T."""
    import triton
    import triton.language as tl

    @triton.jit
    def read_kernel(ptr, out, n, PER: tl.constexpr, BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        base = pid.to(tl.int64) * PER
        acc = tl.zeros([BLOCK], dtype=tl.int32)
        for i in tl.static_range(0, PER, BLOCK):
            offs = base + i + tl.arange(0, BLOCK)
            acc ^= tl.load(ptr + offs, mask=offs < n, other=0, cache_modifier=".cg")
        tl.store(out + pid, tl.sum(acc, 0))

    def read(buf, out, per, block, warps):
        read_kernel[(triton.cdiv(buf.numel(), per),)](buf, out, buf.numel(), PER=per, BLOCK=block, num_warps=warps)

    def us(fn):
        return _time_ms(fn, 30, True) / 4 * 1e3

    shapes = ((8192, 1024, 4), (8192, 4096, 4), (16384, 1024, 8), (16384, 4096, 8))   # int32 per program, block, warps
    hits = {T: routings[T][3] for T in Ts}
    n_max = max(hits.values()) * bytes_per_expert // 4
    bufs = [torch.randint(-2 ** 31, 2 ** 31 - 1, (n_max,), dtype=torch.int32, device="cuda") for _ in range(4)]
    out = torch.empty(1 << 20, dtype=torch.int32, device="cuda")
    print(f"\nReading the touched experts' bytes, {dev}, copy {copy_bw:.2f} TB/s; us per call, % = byte floor / time")
    print(f"{'T':>3} {'experts':>7} {'floor':>6} {'read, 1 launch':>14} {'%':>5} {'read, 2 launches':>16} {'%':>5} "
          f"{'copy':>6} {'%':>5} {'fp4 MoE':>8} {'%':>5}")
    for T in Ts:
        n = hits[T] * bytes_per_expert // 4
        n1 = n * 2 // 3                                  # w1|w3: 2/3 of an expert's records, w2: 1/3
        one = [b[:n] for b in bufs]
        t1, best = min((us(lambda: [read(b, out, *sh) for b in one]), sh) for sh in shapes)
        t2 = us(lambda: [(read(b[:n1], out, *best), read(b[n1:n], out, *best)) for b in bufs])
        dst = [torch.empty(n // 2, dtype=torch.int32, device="cuda") for _ in bufs]
        tc = us(lambda: [d.copy_(b[:n // 2]) for d, b in zip(dst, bufs)])
        del dst
        tk = fp4_us(T)
        floor = hits[T] * bytes_per_expert / (copy_bw * 1e12) * 1e6
        print(f"{T:>3} {hits[T]:>7} {floor:>6.1f} {t1:>14.1f} {100 * floor / t1:>5.1f} {t2:>16.1f} {100 * floor / t2:>5.1f} "
              f"{tc:>6.1f} {100 * floor / tc:>5.1f} {tk:>8.1f} {100 * floor / tk:>5.1f}", flush=True)


MOE_GEMV_KNOBS = [    # bench.py moe --decode-only --ablate-gemv: one knob set at a time, timed at T=1 and T=4
    ("S=2 MT=2 both GEMMs (2-CTA clusters)", dict(MOE_GEMV_FORCE=((2, 2), (2, 2)))),
    ("PDL off", dict(USE_PDL=False)),
]


def gemv_ablation(Ts, routings, fp4_us, pct, with_knobs, copy_bw, bytes_per_expert, dev, t_start, fp4):
    """`bench.py moe --decode-only --ablate-gemv`: the mma.sync decode GEMV (Fp4MoeGemv, the default up to
    MOE_GEMV_MAX_ROWS routed rows) vs the wgmma grouped GEMM (DECODE_GEMV off), same run, same routing and weights; then
    the GEMV forced at every T (threshold), and its knobs."""
    gemv = {T: with_knobs(dict(MOE_GEMV_MAX_ROWS=1 << 30), lambda: fp4_us(T)) for T in Ts}
    wgmma = {T: with_knobs(dict(DECODE_GEMV=False), lambda: fp4_us(T)) for T in Ts}
    print(f"\nMoE decode, Flash dims (D 4096, I 2048, 256 experts, top-6, nvfp4), CUDA-graph replays, {dev}; "
          f"gemv = Fp4MoeGemv for both GEMMs, wgmma = Fp4GroupedGemm (DECODE_GEMV off), same run")
    print(f"{'T':>4} {'experts':>7} {'gemv us':>8} {'wgmma us':>8} {'%copy gemv':>10} {'%copy wgmma':>11} "
          f"{'floor us':>8}")
    for T in Ts:
        hit = routings[T][3]
        print(f"{T:>4} {hit:>7} {gemv[T]:>8.1f} {wgmma[T]:>8.1f} {pct(T, gemv[T]):>10.1f} {pct(T, wgmma[T]):>11.1f} "
              f"{hit * bytes_per_expert / (copy_bw * 1e12) * 1e6:>8.1f}", flush=True)
    budget = float(os.environ.get("BENCH_BUDGET_S", "60"))
    knobs = [(title, dict(knob, MOE_GEMV_MAX_ROWS=1 << 30)) for title, knob in MOE_GEMV_KNOBS]
    for title, knob in knobs:
        if time.time() - t_start > budget:
            print(f"(time budget spent: skipped '{title}' and the rest)")
            break
        us = with_knobs(knob, lambda: {T: fp4_us(T) for T in Ts[:2]})
        print(f"gemv ablation: {title}: " + ", ".join(f"T={T} {us[T]:.1f} us ({pct(T, us[T]):.0f}%, gemv {gemv[T]:.1f})"
                                                    for T in Ts[:2]), flush=True)
    if time.time() - t_start < budget:
        try:
            with_knobs(dict(USE_PDL=False), lambda: [profile_decode(routings, T, fp4) for T in Ts[:2]])
        except Exception as e:      # noqa: BLE001 - a diagnostic only
            print(f"profile failed: {e!r}", flush=True)


def fused_ablation(Ts, routings, fp4_us, pct, with_knobs, copy_bw, bytes_per_expert, dev, rounds=3):
    """`bench.py moe --decode-only --ablate-fused`: the decode GEMV's GEMM1 + GEMM2 in one launch (Fp4MoeGemvFused,
    MOE_GEMV_FUSED) vs the two launches, same run, same routing and weights, CUDA-graph replays; `rounds` interleaved
    rounds (two-launch, fused at each T), the median of each reported."""
    on = dict(MOE_GEMV_FUSED=True, MOE_GEMV_FUSED_MAX_ROWS=24)      # every T here, whatever the default bound
    variants = {False: dict(MOE_GEMV_FUSED=False), True: on}
    us = {(T, f): [] for T in Ts for f in variants}
    for r in range(rounds):
        for T in Ts:
            for f, knob in variants.items():
                us[T, f].append(with_knobs(knob, lambda: fp4_us(T)))
            print(f"round {r} T={T}: " + " ".join(f"{f}={us[T, f][-1]:.1f}" for f in variants), flush=True)
    med = {key: sorted(v)[len(v) // 2] for key, v in us.items()}
    print(f"\nMoE decode, Flash dims (D 4096, I 2048, 256 experts, top-6, nvfp4), CUDA-graph replays, {dev}; fused = "
          f"GEMM1 + GEMM2 in one launch, two = the two GEMV launches, same run, median of {rounds} interleaved rounds")
    print(f"{'T':>4} {'experts':>7} {'two us':>8} {'fused us':>8} {'speedup':>7} {'%copy two':>9} {'%copy fused':>11} "
          f"{'floor us':>8}  rounds two / fused")
    for T in Ts:
        hit = routings[T][3]
        a, b = med[T, False], med[T, True]
        print(f"{T:>4} {hit:>7} {a:>8.1f} {b:>8.1f} {a / b:>7.3f} {pct(T, a):>9.1f} {pct(T, b):>11.1f} "
              f"{hit * bytes_per_expert / (copy_bw * 1e12) * 1e6:>8.1f}  "
              + " ".join(f"{v:.1f}" for v in us[T, False]) + " / " + " ".join(f"{v:.1f}" for v in us[T, True]),
              flush=True)


MID_SWITCHES = [    # bench.py moe --decode-only --ablate-mid: (title, knobs of the new path, Ts); old = the knobs off
    ("direct: no routing kernel at 13..32 routed rows (MOE_GEMV_DIRECT)", dict(MOE_GEMV_DIRECT=True), (4,)),
    ("token rows by cp.async (MOE_GEMV_TOK_ASYNC)", dict(MOE_GEMV_TOK_ASYNC=True), (4, 16, 64, 128, 256)),
    ("direct + token cp.async", dict(MOE_GEMV_DIRECT=True, MOE_GEMV_TOK_ASYNC=True), (4,)),
]


DEPTH_SWITCHES = [  # bench.py moe --decode-only --ablate-depth: k-tiles of weight loads in flight per warp (session 12:
    # under a saturated stream every memory round trip waits behind the queued bytes, bench.py handoff)
    # (a ring depth must divide the CTA's k-tiles: at Flash dims 3 compiles to a 2-deep ring, session 13)
    ("MOE_GEMV_STAGES 3 (a 2-deep ring where 3 does not divide the slice's k-tiles)", dict(MOE_GEMV_STAGES=3),
     (1, 2, 4)),
    ("2 k-tiles in flight per warp (MOE_GEMV_STAGES 2)", dict(MOE_GEMV_STAGES=2), (1, 2, 4)),
]
SHAPE_SWITCHES = [  # bench.py moe --decode-only --ablate-shape: the same warps and loads in flight per SM as 3 CTAs of
    # 8 warps (two 128-row tiles per CTA, MT 2) instead of 6 CTAs of 4 (MT 1); the K split S as the default's (same
    # bits). Fewer CTAs: fewer CTA starts (ticket, ids, token rows: round trips under load), and the fused launch's
    # clusters are half as many (at 6 CTAs/SM only 186 of T=1's 192 GEMM1 clusters are placed at once)
    ("two row tiles per CTA, S 4 (MOE_GEMV_FORCE (4, 2))", dict(MOE_GEMV_FORCE=((4, 2), (4, 2))), (1,)),
    ("one row tile per CTA at S 2, the rule before session 12 (MOE_GEMV_FUSED_MT2_MAX_S 0)",
     dict(MOE_GEMV_FUSED_MT2_MAX_S=0), (1, 2)),      # Flash T=1 (S 4): an A/A row; Pro T=1 has S 2
    ("fused T 3 with the two launches' K split 1, the rule before (MOE_GEMV_FUSED_MIN_S 1)",
     dict(MOE_GEMV_FUSED_MIN_S=1), (3,)),
    ("GEMM2 with two row tiles per CTA (MOE_GEMV_FORCE (1, 2) both)", dict(MOE_GEMV_FORCE=((1, 2), (1, 2))),
     (4, 16, 64, 256)),
    ("T 3 by the two direct launches, the rule before session 12 (MOE_GEMV_FUSED_MAX_ROWS 12)",
     dict(MOE_GEMV_FUSED_MAX_ROWS=12), (3,)),
    ("the fused launch at T 4 too (S 1, MT 2; MOE_GEMV_FUSED_MAX_ROWS 24)", dict(MOE_GEMV_FUSED_MAX_ROWS=24), (4,)),
    # a K split past one wave (other bits: a different summation order, still fixed): T = 3's S 1 fills 0.73 of one
    ("K split 2, one row tile per CTA (MOE_GEMV_FORCE (2, 1): 1.45 waves; other bits)",
     dict(MOE_GEMV_FORCE=((2, 1), (2, 1))), (3, 4)),
    ("K split 2, two row tiles per CTA (MOE_GEMV_FORCE (2, 2): 1.45 waves; other bits)",
     dict(MOE_GEMV_FORCE=((2, 2), (2, 2))), (3, 4)),
]


CHUNKS_SWITCHES = [  # bench.py moe --decode-only --ablate-chunks: the one-token MoE by act chunks (sessions 20-29;
                     # the rows of the start, boundary and reduction it replaced are in notes/kernel.md). Old = the
                     # default
    ("Fp4MoeChunks at T = 1 (MOE_CHUNKS; old = the fused launch, other bits)", dict(MOE_CHUNKS=True), (1,)),
    ("probe: Fp4MoeChunks without decode + mma (MOE_CHUNKS_PROBE 2; an xor of the loaded words)",
     dict(MOE_CHUNKS_PROBE=2), (1,)),
    ("probe: GEMM2 without waiting for the act (MOE_CHUNKS_PROBE 4; the pushes waited for after GEMM2, y meaningless)",
     dict(MOE_CHUNKS_PROBE=4), (1, 2)),
    ("Fp4MoeChunks, 4 k-tiles in flight per warp (MOE_CHUNKS_STAGES; old = 2)", dict(MOE_CHUNKS_STAGES=4), (1,)),
    ("w2's last 2 records of each warp through the register ring, not copied into smem over the boundary "
     "(MOE_CHUNKS_W2_SMEM 0; old = 1)", dict(MOE_CHUNKS_W2_SMEM=0), (1,)),
    ("w2's last 4 records in smem (MOE_CHUNKS_W2_SMEM 2: 147 KB of smem)", dict(MOE_CHUNKS_W2_SMEM=2), (1,)),
    ("A/A control (MOE_CHUNKS_STAGES 2, the default)", dict(MOE_CHUNKS_STAGES=2), (1, 2)),
]


DECODE_SWITCHES = [  # bench.py moe --decode-only --ablate-decode: the e2m1 decode's instruction choice (session 28)
    ("e2m1 decode with the funnel shifts of sessions 1-27 (DECODE_SHIFT rot; same bits)", dict(DECODE_SHIFT="rot"),
     (1, 2, 3, 4, 16, 64, 256)),
]
HINT_SWITCHES = [  # bench.py moe --decode-only --ablate-hint: the weight loads' L2 prefetch size (session 17; same bits)
    ("weight loads with the L2::256B prefetch size of sessions 1-16 (WEIGHT_LD_HINT)",
     dict(WEIGHT_LD_HINT=".nc.L1::no_allocate.L2::256B"), (1, 2, 3, 4, 16, 64, 256)),
    ("weight loads without a prefetch size, the scale words' loads of sessions 1-16 (WEIGHT_LD_HINT .nc.L1::no_allocate)",
     dict(WEIGHT_LD_HINT=".nc.L1::no_allocate"), (1, 2, 4, 16, 64, 256)),
    ("A/A control (MOE_GEMV_STAGES 4, the default)", dict(MOE_GEMV_STAGES=4), (1, 2, 4)),
]


def mid_ablation(Ts, routings, pct, with_knobs, copy_bw, bytes_per_expert, dev, fp4, limit, rounds=7,
                 switches=MID_SWITCHES):
    """`bench.py moe --decode-only --ablate-mid`: each MID_SWITCHES entry on vs off (the other switches as they are)
    at its T, CUDA-graph replays of kernels.moe_fp4 over the rotating weight copies, interleaved rounds; per replay
    (the events around one replay: includes the host's graph launch latency) and queued (4 replays back to back
    between the events). Outputs of the two paths compared bit for bit."""
    def graph(T, knob):
        x, ids, w, _ = routings[T]
        fn = lambda: [K.moe_fp4(x, ids, w, ex, limit) for ex in fp4]   # noqa: E731
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            with_knobs(knob, fn)
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            out = with_knobs(knob, fn)
        return g, out

    def timed(g, queued):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        if queued:
            g.replay()
        a.record()
        for _ in range(4 if queued else 1):
            g.replay()
        b.record()
        b.synchronize()
        return a.elapsed_time(b) / (4 if queued else 1) / len(fp4) * 1e3

    print(f"\nMoE decode, D {fp4[0].packed.dim} I {fp4[0].packed.inter} {fp4[0].fmt}, {dev}, copy {copy_bw:.2f} TB/s: switches, old = off (or the default value) "
          f"/ new = the row's setting, "
          f"CUDA-graph replays over {len(fp4)} weight copies, median of {rounds} interleaved rounds (10 replays per "
          f"round; queued: 4 replays back to back between the events), us per call")
    print(f"{'T':>4} {'old us':>8} {'new us':>8} {'new/old':>7} {'%copy old':>9} {'%copy new':>9} {'q old':>7} "
          f"{'q new':>7} {'q %old':>6} {'q %new':>6}  bits  switch")
    for title, knob, ts in switches:
        # old: a bool switch the other way (before session 24: always False, so rows that turned a default-True
        # switch off timed the same setting twice), any other knob its current value
        off = {name: (not v) if isinstance(v, bool) else getattr(K, name) for name, v in knob.items()}
        for T in [t for t in ts if t in Ts]:
            (g0, o0), (g1, o1) = graph(T, off), graph(T, knob)
            us = {key: [] for key in ("o", "n", "qo", "qn")}
            for _ in range(rounds):
                us["o"].append(statistics.median(timed(g0, False) for _ in range(10)))
                us["n"].append(statistics.median(timed(g1, False) for _ in range(10)))
                us["qo"].append(timed(g0, True))
                us["qn"].append(timed(g1, True))
            # the graphs' outputs hold their last replay's results now (right after the capture they held nothing:
            # sessions 7-20 compared those unwritten buffers here, so this column's "same" meant nothing until then)
            torch.cuda.synchronize()
            same = all(torch.equal(a, b) for a, b in zip(o0, o1))
            m = {key: statistics.median(v) for key, v in us.items()}
            print(f"{T:>4} {m['o']:>8.1f} {m['n']:>8.1f} {m['n'] / m['o']:>7.3f} {pct(T, m['o']):>9.1f} "
                  f"{pct(T, m['n']):>9.1f} {m['qo']:>7.1f} {m['qn']:>7.1f} {pct(T, m['qo']):>6.1f} "
                  f"{pct(T, m['qn']):>6.1f}  {'same' if same else 'DIFF'}  {title}", flush=True)
            del g0, g1, o0, o1


def random_gates(n, E, D, k, device):
    """n Flash-dims routers (biased sqrtsoftplus top-k; distinct weights: n x 2 MB cycle out of L2) for timing."""
    import types
    g = torch.Generator(device=device).manual_seed(5)
    return [types.SimpleNamespace(weight=(torch.randn(E, D, device=device, generator=g) * D ** -0.5).to(torch.bfloat16),
                                  bias=torch.randn(E, device=device, generator=g) * 0.1, k=k, hash=False,
                                  route_scale=2.5, score_func="sqrtsoftplus", tid2eid=None) for _ in range(n)]


def moefront_ablation(fp4, with_knobs, dev, rounds=5, limit=10.0):
    """`bench.py moe --decode-only --moefront`: router + routed experts at batch 1-2 (interleaved rounds, medians;
    CUDA-graph replays): kernels.moe alone (as the decode table: includes combine), the router alone (chained calls
    over 24 weight copies, PDL on and off), and router + moe as one graph; then one traced replay of router + moe
    (kernel start / duration, us). --ablate-gate: also GATE_WARPS 2 / 1. (Session 5's same-run baseline, the
    session-4 router kernel and routed fused launch, was removed in session 11 with those paths.)"""
    D, I, E, k = 4096, 2048, 256, 6
    gates = random_gates(24, E, D, k, "cuda")
    tok = torch.zeros(2, dtype=torch.long, device="cuda")
    xs = {T: torch.randn(T, D, device="cuda", dtype=torch.bfloat16) for T in (1, 2)}
    routes = {}
    for T in (1, 2):
        g = torch.Generator(device="cuda").manual_seed(T)
        ids = torch.argsort(torch.rand(T, E, device="cuda", generator=g), dim=1)[:, :k].to(torch.int32)
        w = torch.rand(T, k, device="cuda", generator=g)
        routes[T] = (ids, w / w.sum(1, keepdim=True))

    def moe_us(T):
        ids, w = routes[T]
        return _time_ms(lambda: [K.moe(xs[T], ids, w, ex, limit) for ex in fp4], 30, True) / len(fp4) * 1e3

    def gate_us(T):
        return _time_ms(lambda: [K.gate_decode(g, xs[T], tok[:T]) for g in gates], 30, True) / len(gates) * 1e3

    def both(T):
        def step():                 # as dsv4.MoE.forward
            for i, g in enumerate(gates[:8]):
                ex = fp4[i % len(fp4)]
                ids, w = K.gate_decode(g, xs[T], tok[:T])
                K.moe(xs[T], ids, w, ex, limit)
        return step

    def both_us(T):
        return _time_ms(both(T), 30, True) / 8 * 1e3

    rows = {}

    def timed(key, knob, fn):
        rows.setdefault(key, []).append(with_knobs(knob, fn))
        print(f"{'/'.join(map(str, key))}={rows[key][-1]:.1f}", end=" ", flush=True)

    for r in range(rounds):
        print(f"round {r}:", end=" ")
        for T in (1, 2):
            timed(("moe", T, "default"), {}, lambda: moe_us(T))
        for warps in (4, 2, 1) if "--ablate-gate" in sys.argv else (4,):
            timed(("gate", 1, f"w{warps}"), dict(GATE_WARPS=warps), lambda: gate_us(1))
        timed(("gate no PDL", 1, "w4"), dict(GLUE_PDL=False), lambda: gate_us(1))
        timed(("gate", 2, "w4"), {}, lambda: gate_us(2))
        for T in (1, 2):
            timed(("gate+moe", T, "default"), {}, lambda: both_us(T))
        print(flush=True)
    print(f"\nMoE front at batch 1-2, Flash dims (D {D}, I {I}, {E} experts, top-{k}, nvfp4 records), {dev}, "
          f"CUDA-graph replays, median (min..max) of {rounds} interleaved rounds, us per call")
    for (what, T, name), v in rows.items():
        v = sorted(v)
        print(f"{what:>12} T={T} {name:>8}: {v[len(v) // 2]:7.2f} ({v[0]:.2f}..{v[-1]:.2f})")
    from torch.profiler import ProfilerActivity, profile

    def traced():
        run = both(1)
        run()
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            run()
        graph.replay()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            graph.replay()
            torch.cuda.synchronize()
        return prof
    try:
        prof = traced()
        ev = sorted((e for e in prof.events() if e.device_type.name == "CUDA"), key=lambda e: e.time_range.start)
        t0 = ev[0].time_range.start
        print("trace (router + moe x8, T=1; start dur end us): " + "; ".join(
            f"{e.name.replace('kernel_cutlass_kernel_', '').replace('kernels', '')[:18]} "
            f"{e.time_range.start - t0:.1f} {e.time_range.elapsed_us():.1f} {e.time_range.end - t0:.1f}"
            for e in ev[:16]), flush=True)
    except Exception as e:      # noqa: BLE001 - a diagnostic only
        print(f"trace failed: {e!r}", flush=True)


def profile_decode(routings, T, fp4, limit=10.0):
    """Device time per kernel of moe_fp4 at T (10 calls over the rotating weight copies; call with PDL off, else the
    kernels overlap)."""
    from torch.profiler import profile as torch_profile, ProfilerActivity
    x, ids, w, _ = routings[T]
    for ex in fp4:
        K.moe_fp4(x, ids, w, ex, limit)
    torch.cuda.synchronize()
    with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
        for i in range(10):
            K.moe_fp4(x, ids, w, fp4[i % len(fp4)], limit)
        torch.cuda.synchronize()
    dt = lambda e: getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)   # noqa: E731
    rows = [(e.key, e.count, dt(e) / e.count) for e in prof.key_averages() if dt(e) > 0]
    print(f"profile T={T} (PDL off, us per call): " + "; ".join(
        f"{name[:32]} x{cnt // 10} {t:.1f}" for name, cnt, t in sorted(rows, key=lambda r: -r[2] * r[1])),
        flush=True)


def profile_moe():
    """`python bench.py moe-profile`: device time per kernel of one moe_fp4 call at decode sizes (torch profiler)."""
    from torch.profiler import profile, ProfilerActivity
    D, I, E, k = 4096, 2048, 256, 6
    ex = K.prepare_experts(K.random_fp4_experts(E, D, I, "nvfp4", device="cuda", seed=0))
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

# ======================================================================================================================
# Decode of a Flash-dims layer stack. decode of a Flash-dims layer stack on one GPU.
# ======================================================================================================================
# A DeepSeek-V4-Flash config cut to N layers (alternating CSA / HCA like layers 2..42, the first one hash-routed), random
# weights in the real formats (FP8 e4m3 linears with e8m0 128x128 scales, NVFP4 routed experts, bf16 / fp32 where the
# model keeps them), made directly on the GPU: a Flash-dims checkpoint on disk would be tens of GB per few layers.
# Measures batch-1 and batch-8 decode steps, eager and as a CUDA graph, against the byte floor of the same step (every
# weight byte the step reads, the touched experts only, plus the KV state it reads, over the device-to-device copy
# bandwidth measured in the same run), and projects the 43-layer model.

FLASH_LAYERS = 43


def stack_config(n_layers: int) -> dsv4.ModelConfig:
    ratios = [4, 128] * (n_layers // 2) + [4] * (n_layers % 2)
    return dsv4.ModelConfig(num_hidden_layers=n_layers, compress_ratios=ratios + [0], num_hash_layers=1)


def random_experts(cfg, device, g) -> K.Experts:
    """NVFP4 experts like a ModelOpt checkpoint's: random e2m1 codes, e4m3 block scales 2^-3..2^3, per-expert alphas
    that keep the projections' outputs O(1); repacked for the kernel, then (if the kernel runs here) the raw copy is
    dropped: the kernel reads only the packed one."""
    E, I, D = cfg.n_routed_experts, cfg.moe_intermediate_size, cfg.hidden_size

    def codes(*shape):
        return torch.randint(0, 256, shape, generator=g, device=device, dtype=torch.uint8).view(torch.float4_e2m1fn_x2)

    def scales(*shape):
        return torch.exp2(torch.randint(-3, 4, shape, generator=g, device=device).float()).to(torch.float8_e4m3fn)

    alpha = lambda k: (1 + torch.rand(E, generator=g, device=device)) / (15 * k ** 0.5)   # |code x scale| ~ 10
    ex = K.Experts("nvfp4", codes(E, 2 * I, D // 2), scales(E, 2 * I, D // 16), codes(E, D, I // 2),
                         scales(E, D, I // 16), alpha(D), alpha(D), alpha(I))
    ex = K.prepare_experts(ex)
    if K.kernel_unavailable_reason(torch.empty(1, D, device=device, dtype=torch.bfloat16), ex) is None:
        ex.w13, ex.w2 = ex.w13[:1].clone(), ex.w2[:1].clone()
        ex.w13_scale, ex.w2_scale = ex.w13_scale[:1].clone(), ex.w2_scale[:1].clone()
    return ex


def random_model(cfg, device, max_batch_size: int, max_seq_len: int, seed: int = 0, mtp: bool = False
                 ) -> dsv4.Transformer:
    """dsv4.Transformer with random weights in load_model's dtypes, built on the meta device and filled on `device`
    (mtp: with an MTP block)."""
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.device("meta"):
        model = dsv4.Transformer(cfg, mtp=mtp)
        if dsv4.fp8_wo_a(device, torch.bfloat16):         # as load_model: wo_a FP8 where the grouped kernel runs
            model.keep_wo_a_fp8()
    for name, p in list(model.named_parameters()):
        mod_name, _, attr = name.rpartition(".")
        mod = model.get_submodule(mod_name)
        shape, fan_in = p.shape, p.shape[-1]
        randn = lambda dt=torch.float32: torch.randn(shape, generator=g, device=device, dtype=dt)
        if p.dtype == torch.float8_e4m3fn:
            t = randn().to(torch.float8_e4m3fn)                                   # e4m3 codes ~N(0,1)
        elif p.dtype == torch.float8_e8m0fnu:                                     # 2^-log2(sqrt(fan_in)) +- 1
            k = round(0.5 * math.log2(mod.in_features))
            t = torch.randint(126 - k, 129 - k, shape, generator=g, device=device, dtype=torch.uint8)
            t = t.view(torch.float8_e8m0fnu)
        elif p.dtype == torch.int64:                                              # tid2eid: k distinct experts
            t = torch.rand(shape[0], cfg.n_routed_experts, generator=g, device=device).argsort(-1)[:, :shape[1]].contiguous()
        elif name.endswith("norm.weight") or name.endswith("_scale"):
            t = 1 + 0.05 * randn()
        elif name.endswith("_fn"):
            t = 1e-2 * randn()
        elif name.endswith(("_base", ".ape", "gate.bias")):
            t = 0.1 * randn()
        elif name == "embed.weight" or name.endswith("attn_sink"):
            t = randn()
        else:                                                                     # float weights [out, in]
            t = randn() * fan_in ** -0.5
        setattr(mod, attr, nn.Parameter(t.to(p.dtype if p.dtype.is_floating_point else t.dtype), requires_grad=False))
    for layer in list(model.layers) + list(model.mtp):
        layer.ffn.experts = random_experts(cfg, device, g)
    for name, buf in list(model.named_buffers()):
        mod_name, _, attr = name.rpartition(".")
        model.get_submodule(mod_name).register_buffer(attr, dsv4.hadamard_matrix(buf.shape[0]).to(device),
                                                      persistent=False)
    model.merge_projections()
    if K.HAVE_CUTE and torch.device(device).type == "cuda":   # both layouts held: the gemvpack ablation flips them
        model.pack_gemv_weights(dsv4.GEMV_PACK or "wo_a", keep_row_major=True)
    model.setup_cache(max_batch_size, max_seq_len)
    for m in model.modules():                                 # decode state: random, as after a long prompt
        if isinstance(m, dsv4.Attention):
            m.kv_window.normal_(generator=g)
        elif isinstance(m, dsv4.Compressor):
            m.kv_cache.normal_(generator=g)
            m.kv_state.normal_(generator=g)
            m.score_state.normal_(generator=g)
            m.x_state.normal_(generator=g)
    return model.eval()


def nbytes(t) -> int:
    return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0


def step_bytes(model, B: int, pos: int, touched: list[int]) -> tuple[list[int], int, int]:
    """Bytes one decode step must read: per layer (all weights of the layer except tid2eid, of which B rows, and the
    routed experts, of which the touched ones, as the kernel stores them; plus the live KV state), and of the tail
    (hc_head, norm, head) and the B embedding rows."""
    layers = []
    for layer, n_exp in zip(model.layers, touched):
        n = sum(nbytes(p) for name, p in layer.named_parameters() if not name.endswith("tid2eid"))
        n += B * model.cfg.num_experts_per_tok * 8 if layer.ffn.gate.hash else 0
        e = layer.ffn.experts
        if e.packed is not None:
            per_expert = (nbytes(e.packed.w13) + nbytes(e.packed.w2)) // e.packed.w13.shape[0]
        else:
            per_expert = sum(nbytes(t) for t in (e.w13, e.w13_scale, e.w2, e.w2_scale)) // e.num_experts
        n += n_exp * per_expert + 3 * n_exp * 4                                    # + alphas
        a = layer.attn
        if a.indexer is not None and model.index_picks_all(B, pos):     # the step skips the indexer's linears
            n -= sum(nbytes(p) for m in (a.indexer.wq_b, a.indexer.weights_proj) for p in m.parameters())
        n += nbytes(a.kv_window[:B])
        for c in (a.compressor, a.indexer and a.indexer.compressor):
            if c is None:
                continue
            n += B * (pos // c.ratio + 1) * c.dim * c.kv_cache.element_size()   # the live entries
            own_x = c is a.compressor or c.x_state is not a.compressor.x_state   # CSA: one shared x_state
            if c.defer and (pos + 1) % c.ratio:     # deferred, no block closes: the token's input is kept, no more
                n -= sum(nbytes(p) for p in (c.wkv.weight, c.wgate.weight, c.ape))
                n += nbytes(c.x_state[:B, 0]) if own_x else 0
            else:                                   # the open block's state (deferred: its kept inputs)
                n += nbytes(c.kv_state[:B]) + nbytes(c.score_state[:B]) + \
                    (nbytes(c.x_state[:B]) if c.defer and own_x else 0)
        layers.append(n)
    tail = nbytes(model.head.weight) + nbytes(model.hc_head_fn) + nbytes(model.norm.weight)
    return layers, tail, B * model.embed.weight.shape[1] * model.embed.weight.element_size()


def copy_bandwidth(device) -> float:
    """Device-to-device copy, bytes read + written per second (median of 20, 1 GiB)."""
    n = 1 << 30
    src = torch.empty(n, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    return 2 * n / (time_ms(lambda: dst.copy_(src), 20) * 1e-3)


def time_ms(fn, iters: int) -> float:
    """Median ms of fn() over iters runs, CUDA events around each (one warm-up run first)."""
    return _time_ms(fn, iters, graph=False)


def graph_of(fn) -> torch.cuda.CUDAGraph:
    """fn run once on a side stream (compiles, per-stream counters), then captured on that same stream."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g, stream=s):
        fn()
    return g


def touched_experts(model, tokens, pos) -> list[int]:
    """Distinct routed experts each layer's gate picks for these tokens (one eager step, hooks on the gates)."""
    seen = []
    hooks = [layer.ffn.gate.register_forward_hook(lambda m, i, o: seen.append(int(torch.unique(o[0]).numel())))
             for layer in model.layers]
    model.logits(tokens, pos)
    for h in hooks:
        h.remove()
    return seen


def trace_step(run, path: str):
    """One graph replay under the profiler, written as a Chrome trace (kernels with start, duration and stream: the
    critical path and the parallel branches of the step can be read off it)."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        run()
        torch.cuda.synchronize()
    prof.export_chrome_trace(path)


def kernel_profile(run, n_layers: int):
    """One graph replay under the profiler: (kernel count, GEMM-class kernels us, other kernels us, top kernels)."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        run()
        torch.cuda.synchronize()
    kernels_ = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    gemm_words = ("gemm", "Gemm", "GEMM", "xmma", "nvjet", "cutlass", "Fp4", "fp4", "sm90", "wgmma", "cublas")
    us = lambda e: e.time_range.elapsed_us()
    heavy = sum(us(e) for e in kernels_ if any(w in e.name for w in gemm_words))
    total = sum(us(e) for e in kernels_)
    by_name = {}
    for e in kernels_:
        by_name.setdefault(e.name[:70], [0, 0.0])
        by_name[e.name[:70]][0] += 1
        by_name[e.name[:70]][1] += us(e)
    top = sorted(by_name.items(), key=lambda kv: -kv[1][1])[:20]
    return len(kernels_), heavy, total - heavy, top


def fp8_linear_table(model, copy_bw):
    """Each FP8 linear shape of a layer at M = 1, as a graph of 20 calls: us of Linear.forward (the fused FP8 GEMV
    where it runs) and of the cuBLASLt blockwise scaled_mm path, floor us (weight + scale bytes)."""
    layer = model.layers[0]
    rows = []
    for name in ("attn.wq_a", "attn.wq_b", "attn.wkv", "attn.wo_b", "attn.indexer.wq_b", "ffn.shared_experts.w1",
                 "ffn.shared_experts.w2"):
        lin = layer.get_submodule(name)
        x = torch.randn(1, lin.in_features, device="cuda", dtype=torch.bfloat16)
        us = time_ms(graph_of(lambda: [lin(x) for _ in range(20)]).replay, 20) / 20 * 1e3
        mm_scale = dsv4.mm_block_scales(lin.scale)
        mm_us = time_ms(graph_of(lambda: [dsv4.fp8_linear(x, lin.weight, mm_scale) for _ in range(20)]).replay,
                        20) / 20 * 1e3
        floor = (nbytes(lin.weight) + nbytes(lin.scale)) / copy_bw * 1e6
        rows.append((name, lin.out_features, lin.in_features, us, mm_us, floor))
    return rows


S4 = ((K, "ATTN_WIDE", False),)   # session 5's wide attention (the other session-4 alternatives went in session 11)
S5 = ((K, "HC_CLUSTER_MAX_TOKENS", 0), (K, "HC_FOLD_ADD", False))   # session 6's mHC site (two kernels)
DECODE_ABLATIONS = [   # (label, ((module, switch, off value), ...)): each timed in the same run as the default step
    ("session-5 mHC sites, two kernels + torch add (= the session-5 step but for the attention's buffer fill)", S5),
    ("sessions 5 and 6 off where still switchable (cluster attention instead of the wide one, session-5 mHC sites; "
     "their other alternatives were removed in session 11)", S4 + S5),
    ("one stream (NANO_DSV4_BRANCHES=0)", ((dsv4, "DECODE_BRANCHES", False),)),
    ("glue kernels without PDL (kernels.GLUE_PDL)", ((K, "GLUE_PDL", False),)),
    ("MoE GEMMs as two launches (kernels.MOE_GEMV_FUSED)", ((K, "MOE_GEMV_FUSED", False),)),
    ("s7: MoE slot sum in its own MoeCombine launch (kernels.HC_FOLD_COMBINE off)", ((K, "HC_FOLD_COMBINE", False),)),
    ("s7: q per-head norm + RoPE as its own QNormRope launch (kernels.ATTN_FOLD_Q_NORM off)",
     ((K, "ATTN_FOLD_Q_NORM", False),)),
    ("s7: all session-7 folds off",
     ((K, "HC_FOLD_COMBINE", False), (K, "ATTN_FOLD_Q_NORM", False))),
    (f"s8 indexfold: the CSA indexer's query "
     f"{'in its own IndexQuery launch' if K.INDEX_FOLD_QUERY else 'made inside its top-k launch'} "
     f"(kernels.INDEX_FOLD_QUERY {'off' if K.INDEX_FOLD_QUERY else 'on'})",
     ((K, "INDEX_FOLD_QUERY", not K.INDEX_FOLD_QUERY),)),
    ("s8 indexfold at batch 1 too (kernels.INDEX_FOLD_QUERY on, INDEX_FOLD_MIN_BATCH 1)",
     ((K, "INDEX_FOLD_QUERY", True), (K, "INDEX_FOLD_MIN_BATCH", 1))),
    (f"s8 gemvpack: decode FP8 GEMVs on the {'[N, K] row-major' if K.GEMV_PACKED else 'packed'} weights "
     f"(kernels.GEMV_PACKED {'off' if K.GEMV_PACKED else 'on'})", ((K, "GEMV_PACKED", not K.GEMV_PACKED),)),
    ("s17 ldhint: FP8 GEMV and MoE weight loads with the L2::256B prefetch size of sessions 1-16 "
     "(kernels.WEIGHT_LD_HINT)", ((K, "WEIGHT_LD_HINT", ".nc.L1::no_allocate.L2::256B"),)),
    ("s17 kwarp: the k_warps GEMVs (shared w1|w3, wo_a) with 4 k blocks in flight per warp, sessions 5-16 "
     "(kernels.GEMV_KWARP_STAGES)", ((K, "GEMV_KWARP_STAGES", 4),)),
    ("s20 chunks: the one-token MoE as the fused GEMM1 -> GEMM2 launch of sessions 4-19 (kernels.MOE_CHUNKS off)",
     ((K, "MOE_CHUNKS", False),)),
    ("s28 shl: the e2m1 decode of every FP4 kernel with the funnel shifts of sessions 1-27 (kernels.DECODE_SHIFT rot)",
     ((K, "DECODE_SHIFT", "rot"),)),
    ("s19 hadamard: the indexer's Hadamard as a sequential fma chain, sessions 2-18 (kernels.HADAMARD_MODE "
     "fma_chain)", ((K, "HADAMARD_MODE", "fma_chain"),)),
    ("s31 topk: the CSA indexer scores and orders its picks also where every complete block is one (the first "
     "index_topk x 4 tokens; kernels.INDEX_ALL_BELOW_TOPK off)", ((K, "INDEX_ALL_BELOW_TOPK", False),)),
    ("s35 preload: a block-completing compressor step issues its loads after the PDL wait, sessions 1-34 (time it "
     "at a completing position: --pos 1003; kernels.COMPRESSOR_PRELOAD off)", ((K, "COMPRESSOR_PRELOAD", False),)),
    ("s36 index: the CSA indexer's query projection, query and head weights also where it picks every complete "
     "block (the first index_topk x 4 tokens; dsv4.SKIP_INDEX_BELOW_TOPK off)", ((dsv4, "SKIP_INDEX_BELOW_TOPK", False),)),
    ("s37 defer: every decode step projects its token for the compressors (sessions 1-36), instead of the closing "
     "step projecting the block's kept inputs (dsv4.DEFER_COMPRESSOR_PROJECTIONS off; the floor counts the deferred "
     "step's bytes)", ((dsv4, "DEFER_COMPRESSOR_PROJECTIONS", False),)),
    ("s38 keep: a step that closes no block keeps x twice on the indexer's lane, which its scores wait for (session "
     "37; dsv4.KEEP_OFF_INDEX_LANE off: matters where the indexer scores, from position 2048)",
     ((dsv4, "KEEP_OFF_INDEX_LANE", False),)),
    ("s38 nocluster: the CSA indexer's top-k in its last-CTA form instead of one CTA cluster (kernels.TOPK_CLUSTER "
     "off; from position 2048)", ((K, "TOPK_CLUSTER", False),)),
    ("A/A control: the default step captured again, no switch changed (this method's noise: a real effect must "
     "exceed it)", ()),
]
DECODE_ROUNDS = 3      # the default step and every ablation are timed in this many interleaved rounds (medians)

# --probes: upper bounds, not alternatives. Each row takes one piece of work out of the captured step (where something
# reads its output, the eager step's output stands in, so those rows' logits are wrong), i.e. it says at most what
# any faster form of that piece could buy. Set by install_decode_probes.
PROBE = dict(qnorm=False, router=False, comp=False, index=False, shared=False, kvrow=False)
_probe = lambda *names: ((sys.modules[__name__], "PROBE", {n: n in names for n in PROBE}),)
DECODE_PROBES = [
    ("probe qnorm: no q RmsNorm launch (wq_b reads qa as is)", _probe("qnorm")),
    ("probe router: no router launch (the eager step's ids and weights)", _probe("router")),
    ("probe comp: no compressors (their GEMVs and steps; deferred: the kept inputs too)", _probe("comp")),
    ("probe index: no CSA index chain (indexer wq_b, head weights, query, top-k: the eager step's picks)",
     _probe("index")),
    ("probe shared: no shared expert (the eager step's output)", _probe("shared")),
    ("probe kvrow: no KvNormRopeQuant launch (the ring row the eager step wrote at the same position)",
     _probe("kvrow")),
    ("probe all six", _probe(*PROBE)),
    ("A/A control: the default step captured again, no switch changed", ()),
]


def install_decode_probes():
    """Wrap the dsv4 pieces the probes take out: with PROBE[name] set, a wrapped call runs eagerly as before (and keeps
    a copy of its result) but is left out of a CUDA-graph capture, which gets the kept copy instead."""
    kept = {}

    def cached(key, fn):
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            return kept[key]
        out = fn()
        kept[key] = tuple(t.clone() for t in out) if isinstance(out, tuple) else out.clone()
        return out

    def wrap(cls, name, probe, skip):
        orig = getattr(cls, name)
        setattr(cls, name, lambda self, *a, **k: skip(self, orig, *a, **k) if PROBE[probe] else orig(self, *a, **k))

    # the q norm and the indexer's linears: only the modules bench_decode marks `probed`
    wrap(dsv4.RMSNorm, "forward", "qnorm",
         lambda self, orig, x: x if getattr(self, "probed", False) else orig(self, x))
    wrap(dsv4.Gate, "forward", "router", lambda self, orig, *a: cached(("gate", id(self)), lambda: orig(self, *a)))
    wrap(dsv4.Compressor, "decode", "comp", lambda self, orig, *a, **k: None)
    wrap(dsv4.Compressor, "keep", "comp", lambda self, orig, *a, **k: None)    # deferred: the kept inputs
    wrap(dsv4.Attention, "_compressor_inputs", "comp", lambda self, orig, x: (None, None))
    wrap(dsv4.Indexer, "decode", "index", lambda self, orig, *a: cached(("index", id(self)), lambda: orig(self, *a)))
    wrap(dsv4.Linear, "forward", "index", lambda self, orig, x: cached(("lin", id(self)), lambda: orig(self, x))
         if getattr(self, "probed", False) else orig(self, x))
    wrap(dsv4.Expert, "forward", "shared", lambda self, orig, x: cached(("shared", id(self)), lambda: orig(self, x)))
    kv_row = K.kv_norm_rope_quant_fused

    def kv_row_probe(*a, ring=None, **k):
        if PROBE["kvrow"] and ring is not None and torch.cuda.is_current_stream_capturing():
            return ring
        return kv_row(*a, ring=ring, **k)
    K.kv_norm_rope_quant_fused = kv_row_probe


def cycle_positions(model, pos: int) -> tuple[int, list[tuple[int, frozenset, int]]]:
    """--cycle: the compressors' completion patterns repeat every L = lcm(ratios) positions; a pattern = the ratios
    whose open block a token completes (that step also pools, writes and quantizes a cache entry in those layers).
    -> (L, [(position, pattern, how many positions of a cycle have it)]): pos first, then for every other pattern
    the first later position with it."""
    ratios = model.compressor_ratios
    L = math.lcm(*ratios) if ratios else 1
    done = lambda p: frozenset(model.closing_ratios(p))   # noqa: E731
    count: dict = {}
    for p in range(L):
        count[done(p)] = count.get(done(p), 0) + 1
    first: dict = {}
    for p in range(pos, pos + L):
        first.setdefault(done(p), p)
    return L, [(p, d, count[d]) for d, p in first.items()]


def decode_ablations(args):
    """DECODE_ABLATIONS (--probes: DECODE_PROBES), or those whose label contains one of --ablations' words
    (--ablations none: no ablation)."""
    rows = DECODE_PROBES if args.probes else DECODE_ABLATIONS
    if args.ablations is None:
        return rows
    return [(label, sw) for label, sw in rows if any(w in label for w in args.ablations)]


def _with_switches(switches, fn):
    saved = [getattr(mod, sw) for mod, sw, _ in switches]
    try:
        for mod, sw, off in switches:
            setattr(mod, sw, off)
        return fn()
    finally:
        for (mod, sw, _), v in zip(switches, saved):
            setattr(mod, sw, v)


def install_compile_recorder(calls: list):
    """For the rest of this process: every kernels._compile_* call is appended to calls, and kernels launch as no-ops
    (nothing compiles; outputs garbage; buffers from torch.empty are zeroed, so ids and indices stay in range)."""
    def recorder(name, f):
        def wrapped(*a, **kw):
            calls.append((name, a, kw))
            return f(*a, **kw)
        return wrapped
    for name in [n for n in vars(K) if n.startswith("_compile") and callable(getattr(K, n))]:
        setattr(K, name, recorder(name, getattr(K, name)))
    K._load_or_compile = lambda config, build: (lambda *a, **kw: None)

    def zeroed(make):           # the no-op kernels leave their outputs as allocated: zeros keep ids and indices in
        def wrapped(*a, **kw):  # range, so torch ops downstream (gathers) cannot trip a device assert
            t = make(*a, **kw)
            if t.is_cuda and t.numel():
                try:
                    t.view(torch.uint8).zero_() if t.element_size() == 1 else t.zero_()
                except (RuntimeError, TypeError):
                    pass
            return t
        return wrapped
    torch.empty, torch.empty_like = zeroed(torch.empty), zeroed(torch.empty_like)


def save_compile_calls(calls: list, path: str):
    import pickle
    try:
        torch.cuda.synchronize()
    except Exception as e:   # noqa: BLE001 - a garbage index may have tripped a device assert; the calls are in
        print(f"record-compiles: sync failed: {type(e).__name__}: {e}", file=sys.stderr)
    calls = list(dict.fromkeys((n, a, tuple(sorted(kw.items()))) for n, a, kw in calls))
    with open(path, "wb") as fh:
        pickle.dump(calls, fh)
    print(f"record-compiles: {len(calls)} distinct compile calls -> {path}")


@torch.inference_mode()
def record_decode_compiles(args, path: str):
    """--record-compiles PATH: every kernels._compile_* call the decode bench makes (default step, the chosen
    ablations, the tail, the FP8 linear table), pickled to PATH, found without compiling (install_compile_recorder).
    precompile then compiles them in parallel processes."""
    calls = []
    install_compile_recorder(calls)
    dev = torch.device("cuda")
    cfg = stack_config(args.layers)
    model = random_model(cfg, dev, max(args.batches), args.max_seq_len, mtp=args.verify)
    pos_t = torch.tensor([args.pos], device=dev)
    if args.verify:
        try:
            model.start_speculation(1, 2)
            for i, p in enumerate(model.spec.pos):
                p.fill_(args.pos + i)
            model.verify_step()
            model.draft_step()
        except Exception as e:   # noqa: BLE001
            print(f"record-compiles: verify stopped at {type(e).__name__}: {e}", file=sys.stderr)
    for B in args.batches:
        tokens = torch.randint(0, cfg.vocab_size, (B, 1), device=dev)
        for label, switches in [(None, ())] + decode_ablations(args):
            try:
                _with_switches(switches, lambda: model.logits(tokens, pos_t))
            except Exception as e:   # noqa: BLE001 - garbage outputs may trip a check: record what was reached
                print(f"record-compiles: B={B} {label}: stopped at {type(e).__name__}: {e}", file=sys.stderr)
    try:
        n = cfg.hc_mult
        h = torch.randn(1, 1, n, cfg.hidden_size, device=dev, dtype=torch.bfloat16)
        f = torch.randn(1, 1, cfg.hidden_size, device=dev, dtype=torch.bfloat16)
        post, comb = torch.rand(1, 1, n, device=dev), torch.rand(1, 1, n, n, device=dev) / n
        x = dsv4.hc_head(dsv4.hc_post(f, h, post, comb), model.hc_head_fn, model.hc_head_scale, model.hc_head_base,
                         cfg.hc_eps, cfg.rms_norm_eps, model.norm)
        dsv4.matmul_fp32(x, model.head.weight)
        if not args.no_linears:
            layer = model.layers[0]
            for name in ("attn.wq_a", "attn.wq_b", "attn.wkv", "attn.wo_b", "attn.indexer.wq_b",
                         "ffn.shared_experts.w1", "ffn.shared_experts.w2"):
                lin = layer.get_submodule(name)
                lin(torch.randn(1, lin.in_features, device=dev, dtype=torch.bfloat16))
    except Exception as e:   # noqa: BLE001
        print(f"record-compiles: tail / linears stopped at {type(e).__name__}: {e}", file=sys.stderr)
    if args.fold:
        try:
            for chain, (step, switches) in fold_chains(dev).items():
                for on in (False, True):
                    _with_switches([(K, s, on) for s in switches], step)
        except Exception as e:   # noqa: BLE001
            print(f"record-compiles: fold chains stopped at {type(e).__name__}: {e}", file=sys.stderr)
    save_compile_calls(calls, path)


def _compile_calls_worker(chunk):
    os.environ.setdefault("CUTE_DSL_ARCH", "sm_90a")
    for name, a, kw in chunk:
        getattr(K, name)(*a, **dict(kw))
    return len(chunk)


def precompile(what: str, argv, procs: int):
    """--precompile N: record the compile calls of `bench.py what argv` in a subprocess (--record-compiles), then
    compile them in N processes into the disk cache, so the bench itself only loads kernels. Objects are keyed by
    the target arch, so every process here runs with CUTE_DSL_ARCH (sm_90a unless set)."""
    import multiprocessing as mp
    import pickle
    import subprocess
    import tempfile
    t = time.time()
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "calls.pkl")
        rest = [a for i, a in enumerate(argv) if a != "--precompile" and (i == 0 or argv[i - 1] != "--precompile")]
        r = subprocess.run([sys.executable, os.path.abspath(__file__), what, *rest, "--record-compiles", path])
        if r.returncode or not os.path.exists(path):
            print(f"precompile: recording failed (rc {r.returncode}); kernels compile on first use", flush=True)
            return
        with open(path, "rb") as fh:
            calls = pickle.load(fh)
    procs = max(1, min(procs, len(calls)))
    chunks = [calls[i::procs] for i in range(procs)]
    with mp.get_context("spawn").Pool(procs) as pool:
        n = sum(pool.map(_compile_calls_worker, chunks))
    print(f"precompile: {n} compile calls in {time.time() - t:.1f} s on {procs} processes", flush=True)


def with_precompile(what: str, args, record, run):
    """`bench.py what` with --record-compiles PATH (record(args, PATH) only) or --precompile N (precompile, then
    run()), else run()."""
    if args.precompile or args.record_compiles:
        os.environ.setdefault("CUTE_DSL_ARCH", "sm_90a")     # the disk cache keys objects by target arch
    if args.record_compiles:
        record(args, args.record_compiles)
        return
    if args.precompile:
        precompile(what, [a for a in sys.argv[2:] if a != "--precompile-only"], args.precompile)
    run()


@torch.inference_mode()
def bench_decode(args):
    dev = torch.device("cuda")
    name = torch.cuda.get_device_name(dev)
    t_start = time.time()
    copy_bw = copy_bandwidth(dev)
    cfg = stack_config(args.layers)
    model = random_model(cfg, dev, max(args.batches), args.max_seq_len, mtp=args.verify)
    if args.probes:                             # the modules the qnorm / index probes take out (install_decode_probes)
        for layer in model.layers:
            layer.attn.q_norm.probed = True
            if layer.attn.indexer is not None:
                layer.attn.indexer.wq_b.probed = layer.attn.indexer.weights_proj.probed = True
    torch.cuda.synchronize()
    print(f"built {args.layers} Flash-dims layers on {name} in {time.time() - t_start:.0f} s "
          f"({torch.cuda.memory_allocated() / 2**30:.1f} GiB); fp4 MoE kernel: "
          f"{K.kernel_unavailable_reason(torch.empty(1, device=dev, dtype=torch.bfloat16), model.layers[0].ffn.experts) or 'yes'}; "
          f"FP8 GEMM: {dsv4.fp8_gemm_unavailable(dev) or 'blockwise scaled_mm'}", flush=True)
    pos = args.pos
    results = []
    for B in args.batches:
        tokens = torch.randint(0, cfg.vocab_size, (B, 1), device=dev)
        pos_t = torch.tensor([pos], device=dev)
        touched = touched_experts(model, tokens, pos_t)
        reference = model.logits(tokens, pos_t).clone()
        eager_ms = time_ms(lambda: model.logits(tokens, pos_t), args.eager_iters)
        model.decode_graphs.clear()
        model.decode(tokens, pos)                                                  # eager step + capture
        graph = model.decode_graph(B, pos)
        graph_ms = time_ms(graph.graph.replay, args.iters)
        eager = model.logits(tokens, pos_t)                 # same position, same state: replays must give the same
        graph.graph.replay()
        torch.cuda.synchronize()
        graph_err = ((graph.out - eager).norm() / eager.norm()).item()
        assert torch.isfinite(eager).all() and graph_err <= 1e-3, f"graph replay != eager step: rel err {graph_err}"
        graphs = {None: graph}           # the same step with one decode-path feature off, same run
        for label, switches in decode_ablations(args):
            model.decode_graphs.clear()
            _with_switches(switches, lambda: model.decode(tokens, pos))
            graphs[label] = _with_switches(switches, lambda: model.decode_graph(B, pos))
        L, cycle = cycle_positions(model, pos) if args.cycle else (1, [(pos, frozenset(), 1)])
        own, cycle = cycle[0], cycle[1:]  # pos's own pattern is the default step
        for p, _, _ in cycle:            # the default step at positions of the other completion patterns
            model.decode_graphs.clear()  # (timed only: a completing step replayed twice is not the same step)
            model.decode(tokens, p)
            graphs[p] = model.decode_graph(B, p)
        same = {}                                    # each ablation's logits vs the default step's (same state)
        for label, g in graphs.items():
            if isinstance(label, int):
                continue
            g.graph.replay()
            torch.cuda.synchronize()
            if label is None:
                ref_logits = g.out.clone()
            else:
                err = ((g.out - ref_logits).norm() / ref_logits.norm()).item()
                same[label] = ("same bits" if torch.equal(g.out, ref_logits) else f"rel err {err:.1e}") + \
                    f", {kernel_profile(g.graph.replay, args.layers)[0] / args.layers:.1f} kernels/layer"
        times = {label: [] for label in graphs}      # interleaved rounds: clock / host drift hits every row alike;
        order = list(graphs)                         # the order rotates per round, so no row is always timed first
        for r in range(args.rounds):
            for label in order[r % len(order):] + order[:r % len(order)]:
                times[label].append(time_ms(graphs[label].graph.replay, args.iters))
        graph_ms = statistics.median(times.pop(None))
        at_pos = [(p, statistics.median(times.pop(p)), done, n) for p, done, n in cycle]
        ablations = {label: statistics.median(v) for label, v in times.items()}
        del graphs
        model.decode_graphs.clear()
        model.decode(tokens, pos)
        graph = model.decode_graph(B, pos)
        n = cfg.hc_mult
        h = torch.randn(B, 1, n, cfg.hidden_size, device=dev, dtype=torch.bfloat16)
        f = torch.randn(B, 1, cfg.hidden_size, device=dev, dtype=torch.bfloat16)
        post, comb = torch.rand(B, 1, n, device=dev), torch.rand(B, 1, n, n, device=dev) / n

        def tail():          # the last block's ffn hc_post, hc_head + norm, head
            x = dsv4.hc_head(dsv4.hc_post(f, h, post, comb), model.hc_head_fn, model.hc_head_scale,
                             model.hc_head_base, cfg.hc_eps, cfg.rms_norm_eps, model.norm)
            return dsv4.matmul_fp32(x, model.head.weight)
        tail_ms = time_ms(graph_of(tail).replay, args.iters)
        layers_b, tail_b, embed_b = step_bytes(model, B, pos, touched)
        floor_at = {p: sum(step_bytes(model, B, p, touched)[0]) / args.layers / copy_bw * 1e3 for p, _, _ in cycle}
        layer_ms = (graph_ms - tail_ms) / args.layers
        floor_layer_ms = sum(layers_b) / args.layers / copy_bw * 1e3
        floor_tail_ms = tail_b / copy_bw * 1e3
        full_ms = FLASH_LAYERS * layer_ms + tail_ms
        full_floor_ms = FLASH_LAYERS * floor_layer_ms + floor_tail_ms
        if args.verify and B == 1:
            verify = bench_verify(model, args, pos, tokens, tail_ms)
        n_k, heavy_us, small_us, top = kernel_profile(graph.graph.replay, args.layers)
        if args.trace:
            trace_step(graph.graph.replay, f"{args.trace}.B{B}.json")
        results.append(dict(B=B, eager_ms=eager_ms, graph_ms=graph_ms, tail_ms=tail_ms, layer_ms=layer_ms,
                            ablations=ablations, same=same, at_pos=at_pos, cycle=(L, own), floor_at=floor_at,
                            floor_layer_ms=floor_layer_ms, layer_mb=sum(layers_b) / args.layers / 1e6,
                            full_ms=full_ms, full_floor_ms=full_floor_ms, touched=statistics.mean(touched),
                            kernels=n_k, heavy_us=heavy_us, small_us=small_us, top=top, tail_floor_ms=floor_tail_ms,
                            tokens=tokens, reference=reference))
        print(f"B={B}: eager {eager_ms:.2f} ms, graph {graph_ms:.2f} ms (vs eager step: rel err {graph_err:.1e}), "
              f"tail {tail_ms:.3f} ms; "
              f"{n_k} kernels/step, GEMM-class {heavy_us / 1e3:.2f} ms, others {small_us / 1e3:.2f} ms", flush=True)
        for k, (cnt, us) in top:
            print(f"   {cnt:5d} x {us / max(cnt, 1):8.1f} us = {us / 1e3:7.3f} ms  {k}")
    lin_rows = [] if args.no_linears else fp8_linear_table(model, copy_bw)
    if not args.no_baseline:
        torch_ops_baseline(model, args, results)

    print(f"\nFP8 linears at M=1 on {name} (graph of 20 calls; Linear = the fused FP8 GEMV where it runs)")
    print(f"{'linear':<24} {'N':>6} {'K':>6} {'Linear us':>9} {'scaled_mm us':>12} {'floor us':>8} {'%floor':>6}")
    for n, N, Kdim, us, mm_us, fl in lin_rows:
        print(f"{n:<24} {N:>6} {Kdim:>6} {us:>9.1f} {mm_us:>12.1f} {fl:>8.1f} {100 * fl / us:>6.1f}")
    print(f"\nDecode of a {args.layers}-layer Flash-dims stack (CSA/HCA alternating, NVFP4 experts, FP8 linears) on "
          f"{name}, context position {pos}; copy bandwidth {copy_bw / 1e12:.2f} TB/s (read+write, same run)")
    print(f"{'B':>2} {'eager ms':>8} {'graph ms':>8} {'speedup':>7} {'ms/layer':>8} {'floor ms':>8} {'%floor':>6} "
          f"{'MB/layer':>8} {'experts':>7} {'kern/lyr':>8} {'43L ms':>7} {'43L floor':>9} {'tok/s':>7} {'floor tok/s':>11}")
    for r in results:
        print(f"{r['B']:>2} {r['eager_ms']:>8.2f} {r['graph_ms']:>8.2f} {r['eager_ms'] / r['graph_ms']:>7.1f} "
              f"{r['layer_ms']:>8.3f} {r['floor_layer_ms']:>8.3f} {100 * r['floor_layer_ms'] / r['layer_ms']:>6.1f} "
              f"{r['layer_mb']:>8.1f} {r['touched']:>7.1f} {r['kernels'] / args.layers:>8.0f} {r['full_ms']:>7.2f} "
              f"{r['full_floor_ms']:>9.2f} {1e3 * r['B'] / r['full_ms']:>7.1f} {1e3 * r['B'] / r['full_floor_ms']:>11.1f}")
    for r in results:
        if r["at_pos"]:
            L, (_, done, n) = r["cycle"]
            rows = [(pos, r["graph_ms"], done, n)] + r["at_pos"]
            floor = {**r["floor_at"], pos: r["floor_layer_ms"]}    # each position's own bytes (deferred projections)
            for p, ms, done, n in rows:
                layer_ms = (ms - r["tail_ms"]) / args.layers
                print(f"B={r['B']} position {p} (completes the blocks of ratios {sorted(done) or 'none'}: {n} of every "
                      f"{L} positions): graph {ms:.2f} ms, {layer_ms:.3f} ms/layer, floor {floor[p]:.4f} ms/layer, "
                      f"{100 * floor[p] / layer_ms:.1f}% of floor")
            mean = sum(ms * n for _, ms, _, n in rows) / L
            mean_floor = sum(floor[p] * n for p, _, _, n in rows) / L
            layer_ms = (mean - r["tail_ms"]) / args.layers
            full_ms = FLASH_LAYERS * layer_ms + r["tail_ms"]
            print(f"B={r['B']} mean over {L} consecutive positions: graph {mean:.2f} ms, "
                  f"{layer_ms:.3f} ms/layer, floor {mean_floor:.4f} ms/layer, {100 * mean_floor / layer_ms:.1f}% of "
                  f"floor, 43 layers {full_ms:.2f} ms = {1e3 * r['B'] / full_ms:.1f} tok/s")
        if r["B"] == 1 and args.verify:
            print_verify(verify, args)
        for label, ms in r["ablations"].items():
            layer_ms = (ms - r["tail_ms"]) / args.layers
            print(f"B={r['B']} same step with {label} (same run): graph {ms:.2f} ms, {layer_ms:.3f} ms/layer, "
                  f"{100 * r['floor_layer_ms'] / layer_ms:.1f}% of floor; {ms - r['graph_ms']:+.3f} ms/step vs the "
                  f"default ({'slower' if ms > r['graph_ms'] else 'faster'}); "
                  f"logits vs default: {r['same'][label]}")
    for r in results:
        if "torch_ms" in r:
            layer_ms = (r["torch_ms"] - r["tail_ms"]) / args.layers
            full_ms = FLASH_LAYERS * layer_ms + r["tail_ms"]
            print(f"B={r['B']} same step with torch ops (kernels off, same run): {layer_ms:.3f} ms/layer, "
                  f"{100 * r['floor_layer_ms'] / layer_ms:.1f}% of floor, {r['torch_kernels'] / args.layers:.0f} "
                  f"kernels/layer, 43 layers {full_ms:.2f} ms = {1e3 * r['B'] / full_ms:.1f} tok/s; fused is "
                  f"{r['torch_ms'] / r['graph_ms']:.2f}x faster")
    return results


VERIFY_ACCEPT = (0.6, 0.8, 0.9)          # assumed draft acceptance rates (a random MTP block keeps almost none)
VERIFY_SAMPLING = ((1.0, 0, 1.0), (1.0, 0, 0.95))   # sampled passes (temperature, top_k, top_p), timed beside greedy's


def bench_verify(model, args, pos: int, tokens, tail_ms: float) -> dict:
    """Speculative decoding at batch 1 (--verify), CUDA graphs timed side by side in interleaved rounds: the one-token
    step at pos and pos + 3 (a CSA block closes there), the verify step (two tokens: logits only) and a whole pass
    (Transformer.speculate's two graphs: the verify step, then the MTP block over both positions, its head included)
    at pos and pos + 2 (the second row closes a CSA block); the verify step on one stream (VERIFY_LANES off) and with
    the two rows' attentions in turn (VERIFY_RING_AHEAD off); passes that sample (VERIFY_SAMPLING).
    -> median ms per replay of each, the tail of one row, and speculative_e2e's rows."""
    dev = tokens.device
    two = torch.randint(0, model.cfg.vocab_size, (1, 2), device=dev)

    def capture(toks, p, switches=()):
        key = model._graph_key(1, p, toks.shape[1])
        model.decode_graphs.pop(key, None)
        _with_switches(switches, lambda: model.decode(toks, p))
        return model.decode_graphs[key].graph.replay

    def capture_pass(p, sampling=dsv4.GREEDY):   # speculate's two graphs, with its copy of the positions in
        model.start_speculation(*two[0].tolist(), sampling=sampling)
        key, draft_key = model.pass_keys(p)
        model.decode_graphs.pop(key, None)
        model.speculate(p)
        verify, draft = model.decode_graphs[key].graph, model.decode_graphs[draft_key].graph
        host = model.spec.inputs(p).clone().pin_memory()

        def run():
            model.spec.buf[2:].copy_(host, non_blocking=True)
            verify.replay()
            draft.replay()
        return run
    one_stream, in_turn = [(dsv4, "VERIFY_LANES", False)], [(dsv4, "VERIFY_RING_AHEAD", False)]
    runs = {"one": capture(tokens, pos), "one closing": capture(tokens, pos + 3), "two": capture(two, pos),
            "two closing": capture(two, pos + 2), "pass": capture_pass(pos), "pass closing": capture_pass(pos + 2),
            "two one-stream": capture(two, pos, one_stream), "two closing one-stream": capture(two, pos + 2, one_stream),
            "two in turn": capture(two, pos, in_turn), "two closing in turn": capture(two, pos + 2, in_turn),
            **{f"pass sampled {i}": capture_pass(pos, sp) for i, sp in enumerate(VERIFY_SAMPLING)}}
    times = {label: [] for label in runs}
    order = list(runs)
    for r in range(args.rounds):
        for label in order[r % len(order):] + order[:r % len(order)]:
            times[label].append(time_ms(runs[label], args.iters))
    if args.trace:
        trace_step(runs["pass"], f"{args.trace}.pass.json")
    del runs
    return {label: statistics.median(v) for label, v in times.items()} | {"tail": tail_ms,
                                                                          "e2e": speculative_e2e(model, args)}


def speculative_e2e(model, args, n_new: int = 64) -> list[tuple]:
    """Whole generations on this stack (host loop included, as the CLI runs them): greedy dsv4.generate, then
    dsv4.generate_speculative with an oracle in the draft's place (the MTP block still runs in every pass; its
    drafts are replaced by the plain run's tokens at a fixed share of the positions, by wrong ones elsewhere), after
    a prompt of --pos tokens; each run twice (the first captures the graphs), the second timed. -> [(rate, tok/s,
    kept, drafts, same tokens)], rate None = plain."""
    V = model.cfg.vocab_size
    prompt = torch.randint(0, V, (args.pos,), generator=torch.Generator().manual_seed(1)).tolist()
    plain = [dsv4.generate(model, prompt, n_new, temperature=0, eos_id=-1) for _ in range(2)][-1]
    seq = prompt + plain.tokens
    rows = [(None, plain.decode_tok_s, 0, 0, True)]
    draft, speculate = model.draft, model.speculate
    for rate in (1.0, 0.8, 0.0):
        def token(q, rate=rate):                                  # a fixed pattern with this share right
            right = q < len(seq) and (q * 0.6180339887) % 1 < rate
            return seq[q] if right else (seq[q] + 1) % V if q < len(seq) else 0

        def draft_oracle(h, start_pos, next_tokens, token=token):
            logits = draft(h, start_pos, next_tokens)
            logits[:, -1] = float("-inf")
            logits[:, -1, token(start_pos + next_tokens.shape[1] + 1)] = 0
            return logits
        def speculate_oracle(pos, token=token):                   # the next pass's draft, replaced
            kept, nxt0, nxt1 = speculate(pos)
            model.spec.tokens[0, 1] = token(pos + 3 if kept else pos + 2)
            return kept, nxt0, nxt1
        model.draft = draft_oracle
        model.speculate = speculate_oracle
        try:
            spec = [dsv4.generate_speculative(model, prompt, n_new, eos_id=-1) for _ in range(2)][-1]
        finally:
            del model.draft, model.speculate
        rows.append((rate, spec.decode_tok_s, spec.accepted, spec.drafts, spec.tokens == plain.tokens))
    return rows


def print_verify(v: dict, args):
    """The speculative table: per-layer cost of the verify step vs the one-token step (each averaged over a CSA
    block's four positions), a pass's MTP part, the projected tokens/s of the 43-layer model with drafts kept at
    VERIFY_ACCEPT rates, and the whole generations measured on this stack."""
    per_layer = lambda ms: (ms - v["tail"]) / args.layers                          # noqa: E731
    one = per_layer((3 * v["one"] + v["one closing"]) / 4)                          # 1 in 4 positions closes a block
    two = per_layer((v["two"] + v["two closing"]) / 2)                              # 1 in 2 pairs closes one
    mtp = (v["pass"] + v["pass closing"] - v["two"] - v["two closing"]) / 2         # the MTP block + head + argmaxes
    step1 = FLASH_LAYERS * one + v["tail"]
    pass_ms = FLASH_LAYERS * two + v["tail"] + mtp
    lanes_off = per_layer((v["two one-stream"] + v["two closing one-stream"]) / 2)
    in_turn = per_layer((v["two in turn"] + v["two closing in turn"]) / 2)
    print(f"B=1 speculative decoding (CUDA graphs, same run): one token {one:.3f} ms/layer; verify step (two tokens) "
          f"{two:.3f} ms/layer = {two / one:.2f}x (on one stream, VERIFY_LANES off: {lanes_off:.3f}; the two rows' "
          f"attentions in turn on one ring, VERIFY_RING_AHEAD off: {in_turn:.3f}); a pass's MTP "
          f"block + head {mtp:.3f} ms; 43 layers: plain {step1:.2f} ms/token = {1e3 / step1:.1f} tok/s, a pass "
          f"{pass_ms:.2f} ms")
    for i, (t, k, p) in enumerate(VERIFY_SAMPLING):
        print(f"B=1 a pass that samples (temperature {t}, top-k {k}, top-p {p}: filtered distributions, the "
              f"speculative rule, inverse-CDF draws) {v[f'pass sampled {i}'] - v['pass']:+.3f} ms beside the greedy "
              f"pass ({v['pass']:.3f} ms)")
    for a in VERIFY_ACCEPT:
        print(f"B=1 43 layers with drafts kept at rate {a:.1f} (assumed): {1 + a:.1f} tokens per pass = "
              f"{1e3 * (1 + a) / pass_ms:.1f} tok/s ({(1 + a) * step1 / pass_ms:.2f}x plain)")
    for rate, tok_s, kept, drafts, same in v["e2e"]:
        what = "plain greedy (generate)" if rate is None else \
            f"speculative, oracle drafts right at rate {rate:.1f}: kept {kept}/{drafts}, same tokens: {same}"
        print(f"B=1 measured, {args.layers}-layer stack, 64 tokens after {args.pos}, {what}: {tok_s:.1f} tok/s")


def torch_ops_baseline(model, args, results):
    """The same graph step with dsv4's fused kernels off (NANO_DSV4_KERNELS=0: torch ops + cuBLASLt FP8 GEMMs; the
    routed experts stay on the fp4 kernel): what the fused kernels buy, measured in the same run."""
    pos_t = torch.tensor([args.pos], device="cuda")
    try:
        dsv4.FUSED_KERNELS = False
        for r in results:
            B = r["B"]
            model.decode_graphs.clear()
            model.decode(r["tokens"], args.pos)                                   # eager step + capture
            g = model.decode_graph(B, args.pos)
            ms = time_ms(g.graph.replay, args.iters)
            err = ((g.out - r["reference"]).norm() / r["reference"].norm()).item()
            n_k = kernel_profile(g.graph.replay, args.layers)[0]
            r.update(torch_ms=ms, torch_kernels=n_k, torch_err=err)
            print(f"B={B} torch ops only: graph {ms:.2f} ms, {n_k} kernels/step, logits vs fused rel err {err:.1e}",
                  flush=True)
    finally:
        dsv4.FUSED_KERNELS = True
        model.decode_graphs.clear()


FOLD_SWITCHES = ("ATTN_FOLD_Q_NORM", "HC_FOLD_COMBINE")   # session 7's folds (fold_chains)


def fold_chains(dev, seed: int = 0):
    """Session 7's folds as chains of the decode kernels they touch (Flash dims, batch 1), each step feeding the
    next: name -> (step function, kernels.py switches it reads). 'q path': wq_a|wkv GEMV -> q_norm -> wq_b GEMV ->
    per-head norm + RoPE -> HCA attention (pos 1000); 'MoE -> site': routing-free fused MoE (T=1, 16 experts,
    fixed ids) -> the next mHC site (slot sum, shared add, hc_post, hc_pre, RMSNorm)."""
    g = torch.Generator(device=dev).manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, device=dev, generator=g)               # noqa: E731
    fp8 = lambda n, k: ((rnd(n, k) * 0.3).to(torch.float8_e4m3fn),          # noqa: E731
                        torch.randint(118, 124, (n // 128, k // 128), device=dev, dtype=torch.uint8, generator=g)
                        .view(torch.float8_e8m0fnu))
    eps, H, hd = 1e-6, 64, 512
    wa, sa = fp8(1536, 4096)
    wb, sb = fp8(H * hd, 1024)
    nw = 1 + 0.1 * rnd(1024)
    ring, comp = rnd(1, 128, hd).to(torch.bfloat16), rnd(1, 32, hd).to(torch.bfloat16)
    sink, pos = rnd(H), torch.tensor([1000], device=dev)
    angles = torch.rand(4096, 32, device=dev, generator=g) * 6.3
    x0 = rnd(1, 4096).to(torch.bfloat16)

    def q_path():
        qa = K.fp8_gemv(x0, wa, sa)[:, :1024]
        q = K.fp8_gemv(K.rms_norm_fused(qa, nw, eps), wb, sb).view(1, 1, H, hd)
        o = K.sparse_attention_decode(q, ring, comp, None, pos, sink, hd ** -0.5, 128, angles=angles,
                                      q_norm_eps=eps)                     # folds per ATTN_FOLD_Q_NORM
        x0[:, :2048].copy_(o.view(1, -1)[:, :2048])                         # the next step depends on this one
    ex = K.prepare_experts(K.random_fp4_experts(16, 4096, 2048, "nvfp4", device=dev, seed=seed))
    ids = torch.tensor([[3, 7, 1, 12, 5, 9]], device=dev)
    w = torch.softmax(rnd(1, 6), -1)
    n = 4
    h = [rnd(1, n, 4096).to(torch.bfloat16)]
    fn, scale, base = rnd(24, n * 4096) / 128, torch.tensor([0.5, 0.7, 2.0], device=dev), rnd(24) * 0.5
    post, comb = torch.rand(1, n, device=dev), torch.rand(1, n, n, device=dev) / n
    s, xm, nw4 = rnd(1, 4096).to(torch.bfloat16), [rnd(1, 4096).to(torch.bfloat16)], 1 + 0.1 * rnd(4096)

    def moe_site():
        y = K.moe(xm[0], ids, w, ex, 7.0, slots=K.HC_FOLD_COMBINE)
        h[0], xm[0], _, _ = K.hc_post_pre_fused((y, s), h[0], post, comb, fn, scale, base, n, 20, eps, eps,
                                                norm_weight=nw4)
    return {"q path (HCA)": (q_path, ("ATTN_FOLD_Q_NORM",)),
            "MoE -> site": (moe_site, ("HC_FOLD_COMBINE",))}


@torch.inference_mode()
def bench_fold(steps: int = 8, rounds: int = 7, iters: int = 50):
    """bench.py fold: each chain of fold_chains as a CUDA graph of `steps` steps, with its switches all off, each
    alone on, all on; us per step, medians of `rounds` interleaved rounds (each the median of `iters` replays)."""
    dev = torch.device("cuda")
    name = torch.cuda.get_device_name(dev)
    print(f"fold chains on {name}; copy bandwidth {copy_bandwidth(dev) / 1e12:.2f} TB/s", flush=True)
    for chain, (step, switches) in fold_chains(dev).items():
        variants = [("unfolded", {s: False for s in switches})] + \
            [(f"+{s}", {t: t == s for t in switches}) for s in switches] + \
            ([("all folded", {s: True for s in switches})] if len(switches) > 1 else [])
        graphs = {}
        for label, sw in variants:
            graphs[label] = _with_switches([(K, k, v) for k, v in sw.items()],
                                           lambda: graph_of(lambda: [step() for _ in range(steps)]))
        times = {label: [] for label in graphs}
        for _ in range(rounds):
            for label, gr in graphs.items():
                times[label].append(time_ms(gr.replay, iters) * 1e3 / steps)
        base = statistics.median(times["unfolded"])
        print(f"{chain}: us per step, median of {rounds} rounds (graph of {steps} steps, {iters} replays each): " +
              "  ".join(f"{label} {statistics.median(v):.2f} ({statistics.median(v) - base:+.2f})"
                        for label, v in times.items()), flush=True)
        del graphs


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="bench.py decode", description="decode of a Flash-dims layer stack")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--pos", type=int, default=1000, help="context position of the timed step")
    p.add_argument("--max-seq-len", type=int, default=4096)
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--eager-iters", type=int, default=5)
    p.add_argument("--no-baseline", action="store_true", help="skip the same step with the fused kernels off")
    p.add_argument("--trace", default="", help="write one graph replay per batch as a Chrome trace: TRACE.B<b>.json")
    p.add_argument("--ablations", nargs="*", default=None,
                   help="time only the ablations whose label contains one of these words (none: no ablation)")
    p.add_argument("--no-linears", action="store_true", help="skip the FP8 linear table")
    p.add_argument("--cycle", action="store_true",
                   help="also time the step at positions of the other compressor completion patterns (CSA blocks, "
                        "CSA + HCA blocks) and print the mean over a cycle of positions")
    p.add_argument("--probes", action="store_true",
                   help="instead of the ablations, upper bounds: the step without one piece of work (DECODE_PROBES)")
    p.add_argument("--precompile", type=int, default=0,
                   help="first compile the step's kernels in this many processes (precompile)")
    p.add_argument("--precompile-only", action="store_true", help="with --precompile: compile, then exit")
    p.add_argument("--rounds", type=int, default=DECODE_ROUNDS, help="interleaved timing rounds (medians)")
    p.add_argument("--verify", action="store_true",
                   help="batch 1: also time speculative decoding's verify step (two tokens) and the MTP block's "
                        "step, and project tokens/s at assumed draft acceptance rates")
    p.add_argument("--fold", action="store_true", help="also record the compiles of bench.py fold (precompile)")
    p.add_argument("--record-compiles", default="", help=argparse.SUPPRESS)
    return p.parse_args(argv)

# ======================================================================================================================
# Prefill (time to first token) of a Flash-dims layer stack: python bench.py prefill
# ======================================================================================================================

def parse_prefill_args(argv=None):
    p = argparse.ArgumentParser(prog="bench.py prefill", description="prefill of a Flash-dims layer stack")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--tokens", type=int, nargs="+", default=[1024, 4096, 16384], help="prompt lengths")
    p.add_argument("--chunks", type=int, nargs="+", default=[0],
                   help="positions per forward (0: dsv4.PREFILL_CHUNK); a chunk >= the prompt is one forward")
    p.add_argument("--query-blocks", type=int, nargs="+", default=[0],
                   help="queries per sparse_attention call (0: dsv4.ATTN_QUERY_BLOCK)")
    p.add_argument("--rounds", type=int, default=3, help="timed prefills per row (median)")
    p.add_argument("--profile", type=int, default=4096, help="kernel table of one prefill of this length (0: none)")
    p.add_argument("--precompile", type=int, default=0, help="first compile the kernels in this many processes")
    p.add_argument("--record-compiles", default="", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def prefill_rows(args) -> list[tuple[int, int, int]]:
    """(prompt length, chunk, query block) rows; a chunk at or above the prompt length is one forward (listed once)."""
    rows = []
    for S in args.tokens:
        for c in args.chunks:
            for qb in args.query_blocks:
                row = (S, min(c or dsv4.PREFILL_CHUNK, S), qb or dsv4.ATTN_QUERY_BLOCK)
                if row not in rows:
                    rows.append(row)
    return rows


def matmul_flops_per_token(model) -> int:
    """2 x the weights one prompt token multiplies in a layer: every Linear of the stack (attention, compressors,
    indexer, gate, shared expert; merged projections counted once) and top-k routed experts (w1, w3, w2)."""
    cfg = model.cfg
    dense = sum(m.in_features * m.out_features for layer in model.layers for m in layer.modules()
                if isinstance(m, dsv4.Linear))
    routed = len(model.layers) * cfg.num_experts_per_tok * 3 * cfg.hidden_size * cfg.moe_intermediate_size
    return 2 * (dense + routed)


@torch.inference_mode()
def record_prefill_compiles(args, path: str):
    calls = []
    install_compile_recorder(calls)
    dev = torch.device("cuda")
    model = random_model(stack_config(args.layers), dev, 1, max(args.tokens) + 1)
    for S, c, qb in prefill_rows(args):
        try:
            _with_switches([(dsv4, "ATTN_QUERY_BLOCK", qb)],
                           lambda: model.prefill(torch.zeros(1, S, dtype=torch.long, device=dev), c))
        except Exception as e:   # noqa: BLE001
            print(f"record-compiles: prefill {S} / {c} stopped at {type(e).__name__}: {e}", file=sys.stderr)
    save_compile_calls(calls, path)


PREFILL_PARTS = (   # module path below layers.N -> part of a layer (inclusive: "attention" holds the compressor's time)
    ("", "layer"), ("attn", "attention"), ("attn.compressor", "compressor"), ("attn.indexer", "indexer"),
    ("attn.wq_a", "attention linears"), ("attn.wkv", "attention linears"), ("attn.wq_b", "attention linears"),
    ("attn.wo_a", "attention linears"), ("attn.wo_b", "attention linears"), ("ffn", "moe"), ("ffn.gate", "router"),
    ("ffn.shared_experts", "shared expert"))


def prefill_parts_ms(model, run) -> dict:
    """ms of each PREFILL_PARTS part summed over the layers, for one run(), from CUDA events around the modules'
    forwards (one stream: prefill takes no side branches), with the exclusive rest of each: attention core (q/kv
    norms and RoPE, the sparse attention, merged projections), routed experts (+ routing, combine), mHC + norms."""
    parts = dict(PREFILL_PARTS)
    hooks, spans, running = [], [], {}
    for name, m in model.named_modules():
        bits = name.split(".")
        if len(bits) < 2 or bits[0] != "layers" or ".".join(bits[2:]) not in parts:
            continue
        label = parts[".".join(bits[2:])]

        def pre(mod, a, label=label):
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            spans.append([label, ev, None])
            running[mod] = spans[-1]

        def post(mod, a, o):
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            running.pop(mod)[2] = ev
        hooks += [m.register_forward_pre_hook(pre), m.register_forward_hook(post)]
    try:
        run()
        torch.cuda.synchronize()
    finally:
        for h in hooks:
            h.remove()
    ms = {}
    for label, a, b in spans:
        ms[label] = ms.get(label, 0.0) + a.elapsed_time(b)
    g = lambda k: ms.get(k, 0.0)   # noqa: E731
    ms["attention core"] = g("attention") - g("compressor") - g("indexer") - g("attention linears")
    ms["routed experts"] = g("moe") - g("router") - g("shared expert")
    ms["mHC, norms"] = g("layer") - g("attention") - g("moe")
    return ms


@torch.inference_mode()
def bench_prefill(args):
    """Eager prefill (Transformer.prefill: chunks, the head on the last position) of random prompts through a stack
    of Flash-dims layers (NVFP4 experts, FP8 linears, random weights): ms, ms per layer, prompt tokens/s, the time to
    the first token projected for Flash's 43 layers, the matmul TFLOP/s against a bf16 matmul of the same run, and
    the peak memory the prefill adds; then the kernels of one prefill by time."""
    dev = torch.device("cuda")
    copy_bw, peak = ceilings()
    cfg = stack_config(args.layers)
    model = random_model(cfg, dev, 1, max(args.tokens) + 1)
    flops = matmul_flops_per_token(model)
    n = len(model.layers)
    print(f"{torch.cuda.get_device_name(dev)}: copy {copy_bw:.2f} TB/s, bf16 matmul {peak:.0f} TFLOP/s; {n} layers "
          f"(ratios {cfg.compress_ratios[:n]}), {flops / n / 1e9:.2f} GFLOP of matmuls per token per layer", flush=True)
    rows = []
    for S, c, qb in prefill_rows(args):
        tokens = torch.randint(0, cfg.vocab_size, (1, S), device=dev)

        def timed_s():
            t = time.perf_counter()
            model.prefill(tokens, c)
            torch.cuda.synchronize()
            return time.perf_counter() - t
        first = _with_switches([(dsv4, "ATTN_QUERY_BLOCK", qb)], timed_s)   # compiles what the disk cache lacks
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
        times = [1e3 * _with_switches([(dsv4, "ATTN_QUERY_BLOCK", qb)], timed_s) for _ in range(args.rounds)]
        ms = statistics.median(times)
        extra = (torch.cuda.max_memory_allocated(dev) - base) / 2**30
        rows.append((S, c, qb, ms, first, extra))
        print(f"prefill {S} tokens in chunks of {c}, query blocks of {qb}: {ms:.1f} ms (first run {first:.1f} s), "
              f"peak +{extra:.2f} GiB", flush=True)
    if args.profile:
        S = args.profile
        tokens = torch.randint(0, cfg.vocab_size, (1, S), device=dev)
        model.prefill(tokens)
        torch.cuda.synchronize()
        count, heavy, other, top = kernel_profile(lambda: model.prefill(tokens), n)
        print(f"\none prefill of {S} tokens: {count} kernels, {(heavy + other) / 1e3:.1f} ms of kernel time "
              f"({heavy / 1e3:.1f} in GEMM-class kernels)\n| kernel | calls | ms | share |\n|---|--:|--:|--:|")
        for name, (calls, us) in top:
            print(f"| `{name}` | {calls} | {us / 1e3:.2f} | {100 * us / (heavy + other):.1f}% |")
        ms = prefill_parts_ms(model, lambda: model.prefill(tokens))
        print(f"\nwhere one prefill of {S} tokens goes (CUDA events around the modules, summed over {n} layers; the "
              f"hooks add host time, so launch-bound parts read high)\n"
              f"| part | ms | ms/layer | share of the layers |\n|---|--:|--:|--:|")
        for k in ("layer", "attention", "compressor", "indexer", "attention linears", "attention core", "moe",
                  "router", "shared expert", "routed experts", "mHC, norms"):
            print(f"| {k} | {ms.get(k, 0):.1f} | {ms.get(k, 0) / n:.2f} | {100 * ms.get(k, 0) / ms['layer']:.1f}% |")
    print(f"\n| prompt tokens | chunk | query block | ms | ms/layer | tokens/s | TTFT 43 layers (s) | matmul TFLOP/s | "
          f"% of bf16 matmul | peak + GiB | first run s |\n|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|")
    for S, c, qb, ms, first, extra in rows:
        tflops = flops * S / (ms * 1e-3) / 1e12
        print(f"| {S} | {c} | {qb} | {ms:.1f} | {ms / n:.2f} | {S / ms * 1e3:.0f} | {ms / n * 43 / 1e3:.2f} | "
              f"{tflops:.0f} | {100 * tflops / peak:.1f} | {extra:.2f} | {first:.1f} |")


# ======================================================================================================================
# Tensor + expert parallel on several GPUs: 2-GPU check of tensor + expert parallelism on a reduced-layer checkpoint of real Flash dimensions (NVFP4).
# ======================================================================================================================

PROMPT, CHUNK, DECODE, GREEDY = 192, 64, 32, 16     # 192 > 128: the HCA layer completes a block


def flash_config(small: bool) -> dsv4.ModelConfig:
    """Real Flash dims, layers 0..3 (window, window, CSA, HCA; hash routing on 0..2). --small: CPU-sized."""
    over = dict(num_hidden_layers=4, compress_ratios=[0, 0, 4, 128])
    if small:
        over.update(vocab_size=1024, hidden_size=256, num_attention_heads=4, head_dim=128, q_lora_rank=128,
                    o_groups=2, o_lora_rank=128, moe_intermediate_size=256, n_routed_experts=8, index_n_heads=4,
                    index_topk=8)
    return dsv4.ModelConfig.from_dict({**dsv4.ModelConfig().to_dict(), **over})


def random_tensor(name: str, spec, dev, g) -> torch.Tensor:
    """A tensor in its stored dtype with sane magnitudes: effective weights ~ N(0, 1/in), as weights.INIT."""
    st, shape = spec.dtypes[0], spec.shape
    if name.endswith("tid2eid"):
        return torch.rand(shape[0], CFG.n_routed_experts, device=dev, generator=g).argsort(-1)[:, :shape[1]]
    if st == "F8_E4M3" and name.endswith(".weight"):                        # FP8 linear, scale 2^e below
        return (torch.randn(shape, device=dev, generator=g) * 2).to(torch.float8_e4m3fn)
    if st == "F8_E8M0":                                                      # its 128x128 block scales
        e = round(-math.log2(2 * math.sqrt(weights_in[name])))
        return torch.full(shape, e + 127, dtype=torch.uint8, device=dev).view(torch.float8_e8m0fnu)
    if st == "U8":                                                           # e2m1 codes, rms 2.93
        return torch.randint(0, 256, shape[:-1] + (shape[-1] // 2,), dtype=torch.uint8, device=dev, generator=g)
    if name.endswith("weight_scale"):                                        # e4m3 block scales in [0.5, 1.5]
        return (0.5 + torch.rand(shape, device=dev, generator=g)).to(torch.float8_e4m3fn)
    if name.endswith("weight_scale_2"):
        return torch.tensor(1 / (2.93 * math.sqrt(weights_in[name])), device=dev)
    if name.endswith("input_scale"):
        return torch.tensor(1 / 448, device=dev)
    std, mean = next(((s, m) for ends, s, m in weights.INIT if name.endswith(ends)), (shape[-1] ** -0.5, 0.0))
    return (torch.randn(shape, device=dev, generator=g) * std + mean).to(weights.ST_DTYPES[st])


def write(path: str, small: bool):
    global CFG, weights_in
    CFG = flash_config(small)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    inv = weights.checkpoint_inventory(CFG, "nvfp4")
    weights_in = {}                                       # scale tensor name -> fan-in of its weight
    for name, spec in inv.items():
        base = name.rsplit(".", 1)[0]
        if name.endswith((".scale", "weight_scale_2")) and base + ".weight" in inv:
            weights_in[name] = inv[base + ".weight"].shape[1]
    os.makedirs(path)
    g = torch.Generator(device=dev).manual_seed(0)
    groups = {}
    for name in inv:                                      # one shard per layer + one for the rest
        groups.setdefault(name.split(".")[1] if name.startswith("layers.") else "rest", []).append(name)
    weight_map, t0 = {}, time.time()
    for i, (group, names) in enumerate(groups.items()):
        file = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        weights.save_safetensors(os.path.join(path, file),
                                 {n: random_tensor(n, inv[n], dev, g).cpu() for n in names})
        weight_map.update(dict.fromkeys(names, file))
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"weight_map": weight_map}, f)
    cfg = {"architectures": ["DeepseekV4ForCausalLM"], "model_type": "deepseek_v4", **CFG.to_dict(),
           "quantization_config": weights.NVFP4_CONFIG, "expert_dtype": "fp4"}
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f)
    size = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))
    print(f"wrote {path}: {size / 1e9:.1f} GB in {time.time() - t0:.0f} s")


def timed_decode(model, tokens, sync, graph: bool):
    """Teacher-forced decode of tokens[:, PROMPT:PROMPT+DECODE] after a chunked prefill -> (prefill logits,
    decode logits, ms/token over steps 2..DECODE)."""
    step = model.decode if graph else model
    pre = torch.cat([model(tokens[:, p:p + CHUNK], p) for p in range(0, PROMPT, CHUNK)], 1)
    outs = [step(tokens[:, PROMPT:PROMPT + 1], PROMPT)]                  # first step: warm-up / capture
    sync()
    t0 = time.perf_counter()
    for p in range(PROMPT + 1, PROMPT + DECODE):
        outs.append(step(tokens[:, p:p + 1], p))
    sync()
    return pre, torch.cat(outs, 1), (time.perf_counter() - t0) * 1e3 / (DECODE - 1)


def replay_us(graph, par, sync, rounds: int = 7, n: int = 20) -> float:
    """Median over rounds of the mean time of n back-to-back replays of a decode graph, by CUDA events (the ranks
    start each round together). Replays repeat the last step: same inputs, same cache slot written."""
    times = []
    for _ in range(rounds):
        if par.size > 1:
            torch.distributed.barrier()
        sync()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(n):
            graph.replay()
        end.record()
        sync()
        times.append(start.elapsed_time(end) * 1e3 / n)
    return sorted(times)[rounds // 2]


def run(path: str, out: str, fp32: bool = False):
    """fp32: eager float32 (reference MoE, per-call dequantized FP8 linears): how far bf16 itself moves the logits."""
    par, dev = dsv4.init_distributed("auto")
    say = print if par.rank == 0 else (lambda *a, **k: None)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    dtype = torch.bfloat16 if dev.type == "cuda" and not fp32 else torch.float32
    t0 = time.time()
    model = dsv4.load_model(path, device=dev, dtype=dtype, max_seq_len=PROMPT + DECODE + GREEDY, log=say)
    sync()
    cfg = model.cfg
    res = {"ranks": par.size, "load_s": time.time() - t0, "dtype": str(dtype).split(".")[-1],
           "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"}
    if dev.type == "cuda":
        import kernels
        e = model.layers[0].ffn.experts
        res["moe"] = K.kernel_unavailable_reason(torch.empty(1, cfg.hidden_size, dtype=dtype, device=dev), e) \
            or "CuTe DSL kernel"
        res["allocated_GiB"] = torch.cuda.memory_allocated(dev) / 2**30
        plan = dsv4.memory_plan(cfg, par, "nvfp4", dtype, model.max_seq_len, 1, repack=e.packed is not None,
                                wo_a_fp8=model.layers[0].attn.wo_a.scale is not None,
                                gemv_pack=dsv4.GEMV_PACK if model.layers[0].attn.wo_a.packed is not None else "")
        res["planned_GiB"] = sum(plan.values()) / 2**30
    say(f"rank 0 of {par.size}: loaded in {res['load_s']:.1f} s", {k: v for k, v in res.items() if k != "load_s"})
    tokens = torch.randint(0, cfg.vocab_size, (1, PROMPT + DECODE), generator=torch.Generator().manual_seed(1)).to(dev)
    pre, dec, res["eager_ms"] = timed_decode(model, tokens, sync, graph=False)
    res["prefill"], res["decode"] = pre.float().cpu(), dec.float().cpu()
    say(f"eager decode {res['eager_ms']:.2f} ms/token")
    if par.rank == 0:
        torch.save(res, out)                                 # in case the graph capture takes the process down
    if dtype == torch.float32:
        return
    try:
        _, dec_g, res["graph_ms"] = timed_decode(model, tokens, sync, graph=True)
        res["graph_vs_eager"] = ((dec_g.float() - dec.float()).norm() / dec.float().norm()).item()
        say(f"graph decode {res['graph_ms']:.2f} ms/token (rel diff to eager {res['graph_vs_eager']:.1e})")
        res["replay_us"] = replay_us(model.decode_graph(1, PROMPT + DECODE - 1).graph, par, sync)
        say(f"graph replay {res['replay_us']:.1f} us/token (CUDA events: the step alone, without the host loop)")
        pre = [model(tokens[:, p:p + CHUNK], p) for p in range(0, PROMPT, CHUNK)]   # chunks: the same MoE tiles
        nxt, greedy = pre[-1][:, -1].argmax(-1), []
        for i in range(GREEDY):
            greedy.append(int(nxt))
            nxt = model.decode(nxt.view(1, 1), PROMPT + i)[:, -1].argmax(-1)
        res["greedy"] = greedy
    except Exception as ex:                                  # report and keep the eager numbers
        res["graph_error"] = f"{type(ex).__name__}: {str(ex).splitlines()[0] if str(ex) else ''}"
        say("graph decode failed:", res["graph_error"])
    if par.rank == 0:
        torch.save(res, out)
    if par.size > 1:       # free the CUDA graphs (they hold NCCL resources) first: with them alive this hung once
        del model
        gc.collect()
        torch.cuda.synchronize()
        torch.distributed.destroy_process_group()


def compare(one_path: str, two_path: str, ref_path: str | None = None):
    """1-GPU vs N-GPU logits; with the fp32 run R, each bf16 run's distance to R is the yardstick: splitting the model
    over GPUs changes only summation order, so 1-vs-N should differ by about as much as bf16 itself moves logits."""
    one, two = torch.load(one_path), torch.load(two_path)
    ref = torch.load(ref_path) if ref_path else None

    def diff(a, b):
        per = ((a - b).norm(dim=-1) / b.norm(dim=-1)).flatten()
        top1 = (a.argmax(-1) == b.argmax(-1)).float().mean().item()
        return ((a - b).norm() / b.norm()).item(), per.median().item(), per.max().item(), top1

    pairs = [(f"{two['ranks']} vs {one['ranks']} GPU", two, one)]
    if ref is not None:
        pairs += [(f"{r['ranks']} GPU {r.get('dtype', 'bfloat16')} vs {ref.get('dtype')}", r, ref) for r in (one, two)]
    print("| logits | compared | rel err | per-position median | max | top-1 agreement |")
    print("|---|---|---:|---:|---:|---:|")
    for key in ("prefill", "decode"):
        for label, a, b in pairs:
            e, med, mx, top1 = diff(a[key], b[key])
            print(f"| {key} | {label} | {e:.2e} | {med:.2e} | {mx:.2e} | {top1:.3f} |")
    g1, g2 = one.get("greedy"), two.get("greedy")
    if g1 and g2:
        print(f"greedy: {sum(x == y for x, y in zip(g1, g2))}/{len(g1)} tokens equal; first divergence at "
              f"{next((i for i, (x, y) in enumerate(zip(g1, g2)) if x != y), None)}")
    for r in (one, two) + ((ref,) if ref is not None else ()):
        print(f"{r['ranks']} x {r['device']} ({r.get('dtype', 'bfloat16')}): MoE {r.get('moe')}, load "
              f"{r['load_s']:.1f} s, allocated {r.get('allocated_GiB', 0):.2f} GiB/GPU (planned "
              f"{r.get('planned_GiB', 0):.2f}), decode ms/token: eager {r['eager_ms']:.2f}, graph "
              f"{r.get('graph_ms', float('nan')):.2f}, graph replay alone {r.get('replay_us', float('nan')):.1f} us "
              f"{r.get('graph_error', '')}")


# ======================================================================================================================
# The CSA indexer's scores + top-k at batch 1 (issue #5)
# ======================================================================================================================

INDEXER_CASES = [(1024, 1000), (1024, 4095), (4096, 1000), (4096, 16383), (16384, 1000), (16384, 65535),
                 (32768, 131071)]
INDEXER_VARIANTS = {"old": dict(DEVICE_TOPK=False), "new": {}, "last": dict(TOPK_CLUSTER=False),
                    "cluster": dict(TOPK_CLUSTER=True),
                    "last-c128": dict(TOPK_CLUSTER=False, FUSED_SMALL_CHUNK_MAX_T=0),
                    "sorted": dict(TOPK_CLUSTER=False, TOPK_RANK_MAX=0)}


def bench_indexer(rounds: int = 7, chain: int = 16):
    """kernels.indexer_topk_decode at Flash dims (64 heads x 128, top 512, bf16 head weights scaled in the kernel),
    B=1, T key slots, position pos (visible V = min((pos+1)//4, T)). Variants: old = IndexerScores + torch.topk
    (DEVICE_TOPK=False; session 5's IndexerScores + TopKSelect was removed in session 11), new = the defaults, last = IndexerTopK whose last CTA to arrive orders <=
    FUSED_TOPK_MAX_SLOTS visible keys (ranks <= 256, else a bitonic sort; 64-key score CTAs up to T 4096), cluster =
    IndexerTopK whose first 8 CTAs form a cluster and rank <= 1024 visible keys through DSMEM, last-c128 = last with
    128-key score CTAs, sorted = last with the bitonic sort even for <= 256 keys; beyond what IndexerTopK covers
    + TopKSelectVisible. Each variant is one CUDA graph of `chain` dependent calls (PDL between them, as in the
    decode step); us/call = replay time / chain, median of `rounds` rounds interleaving the variants."""
    dev, g = torch.device("cuda"), torch.Generator().manual_seed(0)
    nh, d, scale = 64, 128, 128 ** -0.5 * 64 ** -0.5
    print(f"indexer top-k, {torch.cuda.get_device_name()}, B=1, {nh} heads x {d}, top 512, chain of {chain} calls "
          f"per graph, median of {rounds} interleaved rounds (us per call)")
    print(f"{'T':>6} {'pos':>7} {'V':>6} |" + "".join(f" {n:>9}" for n in INDEXER_VARIANTS) + " | new-old")
    for T, pos in INDEXER_CASES:
        q = torch.randn(1, 1, nh, d, generator=g).to(dev, torch.bfloat16)
        keys = torch.randn(1, T, d, generator=g).to(dev, torch.bfloat16)
        w = torch.randn(1, 1, nh, generator=g).to(dev, torch.bfloat16)
        p = torch.tensor([pos], device=dev)
        graphs, outs = {}, {}
        for name, knobs in INDEXER_VARIANTS.items():
            saved = {f: getattr(K, f) for f in knobs}
            for f, v in knobs.items():
                setattr(K, f, v)
            res = []
            graphs[name] = graph_of(lambda: res.extend(K.indexer_topk_decode(q, keys, w, p, 512, weight_scale=scale)
                                                       for _ in range(chain)))
            outs[name] = res[-1]                                 # the captured chain's last output
            for f, v in saved.items():
                setattr(K, f, v)
        times = {name: [] for name in graphs}
        for _ in range(rounds):
            for name, graph in graphs.items():
                graph.replay()
                torch.cuda.synchronize()
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                for _ in range(10):
                    graph.replay()
                b.record()
                b.synchronize()
                times[name].append(a.elapsed_time(b) * 1000 / (10 * chain))
        med = {name: statistics.median(v) for name, v in times.items()}
        same = all(torch.equal(outs[n], outs["old"]) for n in outs)
        print(f"{T:>6} {pos:>7} {min((pos + 1) // 4, T):>6} |" + "".join(f" {med[n]:9.2f}" for n in med)
              + f" | {med['new'] - med['old']:+7.2f}" + ("" if same else "  OUTPUTS DIFFER"), flush=True)


# ======================================================================================================================
# Batch-1 decode GEMVs: the default configs (session-5 rules) vs the s4 rules they refine, same run
# ======================================================================================================================
# name -> (N, K, kind) of one Flash CSA + HCA layer at batch 1: fp8 = fp8_gemv, w16 = bf16_gemv_fp32 (bf16 weight,
# fp32 out), grouped = fp8_gemv_grouped (wo_a: 8 groups of 1024 rows)
DECODE_GEMVS = {"csa compressors": (2560, 4096, "w16"), "hca compressor": (1024, 4096, "w16"),
                "wq_a|wkv": (1536, 4096, "fp8"), "wq_b|iwq_b": (40960, 1024, "fp8"), "iwq_b (B>1)": (8192, 1024, "fp8"),
                "wo_a": (8192, 4096, "grouped"), "wo_b": (4096, 8192, "fp8"), "shared w1|w3": (4096, 4096, "fp8"),
                "shared w2": (4096, 2048, "fp8")}


def _gemv_kernel_us(graphs, calls, reps=2):
    """Median GPU duration (us) of the Fp8Gemv kernels of each graph (profiler; graphs replayed one after another)."""
    from torch.profiler import profile, ProfilerActivity
    import tempfile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for g in graphs:
            for _ in range(reps):
                g.replay()
            torch.cuda.synchronize()
    path = os.path.join(tempfile.mkdtemp(), "trace.json")
    prof.export_chrome_trace(path)
    with open(path) as f:
        ks = sorted((e["ts"], e["dur"]) for e in json.load(f)["traceEvents"]
                    if e.get("cat") == "kernel" and "Fp8Gemv" in e.get("name", ""))
    n = reps * calls
    if len(ks) != n * len(graphs):
        return [float("nan")] * len(graphs)
    return [statistics.median(d for _, d in ks[i * n:(i + 1) * n]) for i in range(len(graphs))]


def _decode_gemv_weights(N, Kd, kind, copies, g, packed=True, dev="cuda"):
    """Rotating copies of one decode GEMV's weight (w16: bf16; fp8 and grouped (wo_a): e4m3 + e8m0 block scales,
    packed as the step's where packed and GEMV_PACKED)."""
    ws = []
    for _ in range(copies):
        if kind == "w16":
            ws.append(((torch.randn(N, Kd, device=dev, generator=g) * 0.02).to(torch.bfloat16),))
            continue
        c = torch.randint(0, 256, (N, Kd), dtype=torch.uint8, device=dev, generator=g)
        c[(c & 0x7F) == 0x7F] = 0x3F
        sc = torch.randint(118, 126, (-(-N // 128), Kd // 128), dtype=torch.uint8, device=dev, generator=g)
        w, s = c.view(torch.float8_e4m3fn), sc.view(torch.float8_e8m0fnu)
        ws.append((K.pack_fp8_gemv_weight(w), s) if packed and K.GEMV_PACKED else (w, s))
    return ws


def bench_gemv_hints(rounds=7, calls=20):
    """`python bench.py gemv --ld-hints`: each batch-1 decode GEMV with the weight loads' L2 prefetch size of
    sessions 1-16 (256B), none, 64B and 128B (WEIGHT_LD_HINT, the default): us per call of a CUDA graph of `calls`
    back-to-back calls (PDL, as in the step) on rotating weight copies, medians of interleaved rounds; same bits."""
    dev = "cuda"
    hints = {"256B": ".nc.L1::no_allocate.L2::256B", "none": ".nc.L1::no_allocate",
             "64B": ".nc.L1::no_allocate.L2::64B", "128B": ".nc.L1::no_allocate.L2::128B"}
    default = K.WEIGHT_LD_HINT
    print(f"{torch.cuda.get_device_name(dev)}, copy {copy_bandwidth(dev) / 1e12:.2f} TB/s; M = 1, us per call "
          f"(graph of {calls} calls, PDL), medians of {rounds} rounds; default {default}")
    print(f"{'GEMV':<16} {'MB':>5} " + " ".join(f"{h:>7}" for h in hints) + "  128B/256B  bits")
    g = torch.Generator(device=dev).manual_seed(0)
    for name, (N, Kd, kind) in DECODE_GEMVS.items():
        if name == "iwq_b (B>1)":
            continue
        wbytes = N * Kd * (2 if kind == "w16" else 1)
        copies = max(4, -(-(200 << 20) // wbytes))
        ws = _decode_gemv_weights(N, Kd, kind, copies, g)
        x = torch.randn(*((1, 8, Kd) if kind == "grouped" else (1, Kd)), device=dev, generator=g).to(torch.bfloat16)

        def call(i):
            if kind == "w16":
                return K.bf16_gemv_fp32(x, ws[i][0])
            if kind == "grouped":
                return K.fp8_gemv_grouped(x, *ws[i], packed=K.GEMV_PACKED)
            return K.fp8_gemv(x, *ws[i], packed_rows=N if K.GEMV_PACKED else 0)
        graphs, outs = {}, {}
        try:
            for label, h in hints.items():
                K.WEIGHT_LD_HINT = h
                outs[label] = call(0).clone()
                graphs[label] = graph_of(lambda: [call(j % copies) for j in range(calls)])
        finally:
            K.WEIGHT_LD_HINT = default
        times = {label: [] for label in hints}
        for r in range(rounds):
            for label in (list(hints) if r % 2 == 0 else list(hints)[::-1]):
                graphs[label].replay()
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                for _ in range(5):
                    graphs[label].replay()
                b.record()
                b.synchronize()
                times[label].append(a.elapsed_time(b) / (5 * calls) * 1e3)
        med = {label: statistics.median(v) for label, v in times.items()}
        same = all(torch.equal(o, outs["256B"]) for o in outs.values())
        print(f"{name:<16} {wbytes / 1e6:5.1f} " + " ".join(f"{m:7.2f}" for m in med.values()) +
              f"  {med['128B'] / med['256B']:9.3f}  {'same' if same else 'DIFF'}", flush=True)
        del graphs


def bench_gemv(Ms=(1, 8), rounds=5):
    """`python bench.py gemv`: each decode GEMV under the s4 and s5 config rules, same run: us per call of CUDA-graph
    replays of calls on rotating weight copies (>= 200 MB: no L2 reuse), without PDL (the kernel alone) and with PDL
    (back-to-back calls overlap), medians of interleaved rounds; the kernel's own duration (profiler) and its share of
    the copy-bandwidth floor; whether s5's output equals s4's bit for bit."""
    dev = "cuda"
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    bw = copy_bandwidth(dev)
    print(f"{torch.cuda.get_device_name(dev)} ({sms} SMs), copy {bw / 1e12:.2f} TB/s; us per call; kern = kernel "
          f"duration without PDL; %copy = weight bytes / copy rate / kern")
    print(f"{'GEMV':<16} {'M':>2} {'MB':>5} {'s4 pdl0':>8} {'s5 pdl0':>8} {'s4 pdl1':>8} {'s5 pdl1':>8} {'s4 kern':>8} "
          f"{'s5 kern':>8} {'s4 %copy':>8} {'s5 %copy':>8}  bits  s5 config")
    g = torch.Generator(device=dev).manual_seed(0)
    for name, (N, Kd, kind) in DECODE_GEMVS.items():
        wbytes = N * Kd * (2 if kind == "w16" else 1)
        copies = max(4, -(-(200 << 20) // wbytes))
        ws = _decode_gemv_weights(N, Kd, kind, copies, g, packed=False)
        for M in Ms:
            x = torch.randn(*((M, 8, Kd) if kind == "grouped" else (M, Kd)), device=dev, generator=g).to(torch.bfloat16)
            cfgs, graphs, outs = {}, {}, {}
            for rules in ("s4", "s5"):
                if kind == "grouped":                        # (one set of rules: both columns the same config)
                    cfgs[rules] = K.pick_grouped_gemv_config(N, Kd, M, 1024, sms)
                elif rules == "s5":
                    cfgs[rules] = K.pick_gemv_config(N, Kd, M, sms, elem_bytes=2 if kind == "w16" else 1)
                else:
                    cfgs[rules] = K._pick_gemv_config_s4(N, Kd, M, sms)
                for pdl in (False, True):
                    cfg = {**cfgs[rules], "pdl": pdl}
                    fn = ((lambda i, c=cfg: K.bf16_gemv_fp32(x, ws[i][0], config={**c, "w16": True})) if kind == "w16"
                          else (lambda i, c=cfg: K.fp8_gemv_grouped(x, *ws[i], config=c)) if kind == "grouped"
                          else (lambda i, c=cfg: K.fp8_gemv(x, *ws[i], config=c)))
                    outs[(rules, pdl)] = fn(0).clone()
                    graphs[(rules, pdl)] = graph_of(lambda f=fn: [f(i) for i in range(copies)])
            times = {k: [] for k in graphs}
            for _ in range(rounds):
                for k, gr in graphs.items():
                    times[k].append(time_ms(gr.replay, 10) * 1e3 / copies)
            t = {k: statistics.median(v) for k, v in times.items()}
            kern = dict(zip(("s4", "s5"), _gemv_kernel_us([graphs[("s4", False)], graphs[("s5", False)]], copies)))
            floor = wbytes / bw * 1e6
            same = torch.equal(outs[("s4", False)], outs[("s5", False)])
            c5 = cfgs["s5"]
            desc = (f"S{c5['k_splits']}" + (f" KW{c5['k_warps']}" if c5.get("k_warps", 1) > 1 else "") +
                    f" W{c5['warps']} RT{c5['row_tiles']} D{c5['stages']}" + (" cluster" if c5.get("cluster") else ""))
            print(f"{name:<16} {M:>2} {wbytes / 1e6:>5.1f} {t[('s4', False)]:>8.2f} {t[('s5', False)]:>8.2f} "
                  f"{t[('s4', True)]:>8.2f} {t[('s5', True)]:>8.2f} {kern['s4']:>8.2f} {kern['s5']:>8.2f} "
                  f"{100 * floor / kern['s4']:>8.1f} {100 * floor / kern['s5']:>8.1f}  {'same' if same else 'DIFF'}  "
                  f"{desc}", flush=True)
            del graphs
        del ws
        torch.cuda.empty_cache()



# ======================================================================================================================
# Per-CTA timeline of the fused decode MoE (session 13): Fp4MoeGemvFused(stamps=True) writes the low 32 bits of
# %globaltimer at each CTA's phase borders into the launch's unused `src` argument (16 words per CTA; words 2 / 3 = its
# ticket / SM id). Same bits as the default kernel (the stamps are compile-time; the default kernel's PTX has none).
STAMP_PHASES = {0: "entry", 1: "ticket", 4: "ids", 5: "act wait begin", 6: "act ready", 7: "tokens in smem",
                8: "main loop end", 9: "K partials met", 10: "stores + signal", 11: "exit"}


def _stamp_us(a, col):
    """Per-CTA stamps [CTAs, 16] (%globaltimer low words): column col in us after the launch's first CTA entry
    (column 0; 32-bit wrap)."""
    return ((a[:, col] - a[:, 0].min()) % (1 << 32)).double() / 1e3


def _stamp_percentiles(v):
    """p0, p10, p50, p90, p100 of a 1-D tensor."""
    v = sorted(v.tolist())
    return [v[min(len(v) - 1, int(p / 100 * len(v)))] for p in (0, 10, 50, 90, 100)]


def fused_moe_stamps(x, ids, w, experts, limit, stamps):
    """One fused-launch MoE call (kernels.moe_fp4 with the fused path) whose kernel writes its per-CTA stamps into
    `stamps` (int32, >= 16 per CTA); returns y (the same bits as the default kernel)."""
    real = K._compile_moe_gemv_fused

    def with_stamps(*a, **kw):
        op = real(*a, stamps=True, **kw)
        return lambda *args: op(*args[:14], stamps, *args[15:])
    K._compile_moe_gemv_fused = with_stamps
    chunks, K.MOE_CHUNKS = K.MOE_CHUNKS, False          # T = 1 would take Fp4MoeChunks
    try:
        return K.moe_fp4(x, ids, w, experts, limit)
    finally:
        K._compile_moe_gemv_fused = real
        K.MOE_CHUNKS = chunks


def bench_moe_stamps():
    """`python bench.py moe-stamps [T]`: phase percentiles of the fused decode MoE's CTAs (Flash dims, nvfp4, T <= 3),
    10 plain launches, each after calls on other weight copies; then per SM: is a GEMM1 CTA's main-loop time a
    property of its SM (split-half correlation of per-SM means) or spread among co-resident CTAs."""
    import collections
    T = int(sys.argv[2]) if len(sys.argv) > 2 else 1
    D, I, E, k, fmt, limit = 4096, 2048, 256, 6, "nvfp4", 10.0
    copies = [random_packed_experts(E, D, I, "cuda", s, fmt) for s in range(4)]
    x, ids, w = random_routing(T, D, E, k)
    cfg = K.moe_gemv_fused_config(fmt, T * k, E, D, I, torch.cuda.get_device_properties(0).multi_processor_count)
    if cfg is None:
        print(f"T={T}: not a fused-launch size", file=sys.stderr)
        sys.exit(2)
    S, MT = cfg[3], cfg[6]
    n1 = 2 * I // 128 // MT * T * k                       # GEMM1 tickets
    ncta = (2 * I // 128 + D // 128) // MT * T * k * S
    st = torch.zeros(16 * ncta, dtype=torch.int32, device="cuda")
    same = torch.equal(fused_moe_stamps(x, ids, w, copies[0], limit, st), K.moe_fp4(x, ids, w, copies[0], limit))
    runs = []
    for r in range(12):
        for _ in range(3):
            K.moe_fp4(x, ids, w, copies[(r + 1) % 4], limit)          # other weights through L2
        st.zero_()
        torch.cuda.synchronize()
        fused_moe_stamps(x, ids, w, copies[r % 4], limit, st)
        torch.cuda.synchronize()
        if r >= 2:
            runs.append(st.view(ncta, 16).to(torch.int64).cpu())

    rel, pct = _stamp_us, _stamp_percentiles
    print(f"{torch.cuda.get_device_name()}: fused decode MoE, T={T} (Flash dims, nvfp4), K split {S}, {MT} row "
          f"tile(s) per CTA, {ncta} CTAs ({n1 * S} GEMM1); bits with stamps vs default: {'same' if same else 'DIFF'}")
    print(f"{len(runs)} plain launches; us after the first CTA's entry, median over launches of each percentile")
    for label, sel in (("GEMM1", lambda a: a[:, 2] < n1), ("GEMM2", lambda a: a[:, 2] >= n1)):
        print(f"{label:>5} {'phase':>16} " + " ".join(f"{'p' + str(p):>6}" for p in (0, 10, 50, 90, 100)))
        for col, name in STAMP_PHASES.items():
            if label == "GEMM1" and col in (5, 6):
                continue
            rows = [pct(rel(a, col)[sel(a)]) for a in runs]
            print(f"{'':>5} {name:>16} " + " ".join(f"{statistics.median(r[i] for r in rows):6.1f}" for i in range(5)))
    print("span (last exit), us: " + " ".join(f"{rel(a, 11).max().item():.1f}" for a in runs))
    # the tail by routed slot (tickets are slot-major): GEMM1 items that start after the first wave (entry > 5 us)
    # and what each slot's GEMM2 CTAs wait for; the launch ends with the slowest slot
    m1, m2 = 2 * I // 128 // MT, D // 128 // MT

    def tickets(lo, hi):                                   # CTAs whose item is one of tickets lo .. hi-1
        return lambda a: (a[:, 2] >= lo) & (a[:, 2] < hi)

    def med(col, sel, f):                                  # median over launches of f(the stamps col of sel's CTAs)
        return statistics.median(f(rel(a, col)[sel(a)]) for a in runs)
    print(f"{'slot':>5} {'GEMM1 late CTAs':>15} {'GEMM1 exit max':>14} {'GEMM2 act ready p50':>19} "
          f"{'GEMM2 exit p50':>14} {'GEMM2 exit max':>14}")
    for s in range(T * k):
        g1, g2 = tickets(s * m1, (s + 1) * m1), tickets(n1 + s * m2, n1 + (s + 1) * m2)
        n_late = statistics.median(int(((rel(a, 0) > 5.0) & g1(a)).sum()) for a in runs)
        print(f"{s:>5} {n_late:>15.0f} {med(11, g1, lambda v: v.max().item()):>14.1f} "
              f"{med(6, g2, lambda v: v.median().item()):>19.1f} {med(11, g2, lambda v: v.median().item()):>14.1f} "
              f"{med(11, g2, lambda v: v.max().item()):>14.1f}")
    per_run = []                                           # per SM: mean main-loop time of its first-wave GEMM1 CTAs
    spread = []
    for a in runs:
        dur, by_sm = rel(a, 8) - rel(a, 0), collections.defaultdict(list)
        for c in torch.nonzero((a[:, 2] < n1) & (rel(a, 0) < 1.0)).flatten().tolist():
            by_sm[int(a[c, 3])].append(dur[c].item())
        per_run.append({sm: statistics.mean(v) for sm, v in by_sm.items()})
        spread += [max(v) - min(v) for v in by_sm.values() if len(v) > 1]
    sms = sorted(set.intersection(*[set(r) for r in per_run]))
    if len(sms) > 2 and len(per_run) > 1:
        ha = [statistics.mean(r[sm] for r in per_run[0::2]) for sm in sms]
        hb = [statistics.mean(r[sm] for r in per_run[1::2]) for sm in sms]
        allm = [statistics.mean(r[sm] for r in per_run) for sm in sms]
        print(f"GEMM1 first wave on {len(sms)} SMs: per-SM mean main-loop time {min(allm):.2f}..{max(allm):.2f} us, "
              f"split-half correlation {statistics.correlation(ha, hb):.2f}; co-resident CTAs of one SM end "
              f"{statistics.median(spread):.2f} us apart (median of max - min)")


CHUNK_PHASES = {0: "entry", 1: "x row in smem", 2: "GEMM1 loop end", 3: "GEMM1 partials in", 11: "SwiGLU in smem",
                12: "warpgroup barrier", 4: "act ready", 5: "GEMM2 loop end", 13: "reduction start",
                7: "pieces in", 8: "y rows written"}


def bench_chunk_stamps():
    """`python bench.py moe-stamps 1 --chunks`: phase percentiles of Fp4MoeChunks' CTAs (Flash dims, nvfp4, one token;
    MOE_CHUNKS_PROBE 3: thread 0 of each CTA stamps %globaltimer after each phase; phases 2 / 4 / 5 are warpgroup 0's;
    then each warpgroup's own phase ends), 10 plain launches, each after calls on other weight copies; us after the
    launch's first CTA entry."""
    D, I, E, k, fmt, limit = 4096, 2048, 256, 6, "nvfp4", 10.0
    copies = [random_packed_experts(E, D, I, "cuda", s, fmt) for s in range(4)]
    x, ids, w = random_routing(1, D, E, k)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    if K.moe_chunks_config(fmt, 1, k, D, I, sms) is None:
        print("Fp4MoeChunks does not run here (MOE_CHUNKS off or too few SMs)", file=sys.stderr)
        sys.exit(2)
    real, parts = K._compile_moe_chunks, []
    n_ctas = 2 * -(-(k * (I // 64)) // 3)                 # 2-CTA clusters of 3 units (the row past the partials)

    def keep_part(*a, **kw):
        op = real(*a, **kw)

        def call(*args):
            parts.append(args[4])
            return op(*args)
        return call
    ref = K.moe_fp4(x, ids, w, copies[0], limit)
    K._compile_moe_chunks, K.MOE_CHUNKS_PROBE = keep_part, 3
    try:
        same = torch.equal(K.moe_fp4(x, ids, w, copies[0], limit), ref)
        runs = []
        for r in range(12):
            for _ in range(3):
                K.moe_fp4(x, ids, w, copies[(r + 1) % 4], limit)          # other weights through L2
            parts.clear()
            K.moe_fp4(x, ids, w, copies[r % 4], limit)
            torch.cuda.synchronize()
            if r >= 2:
                slots = K.STAMP_SLOTS
                runs.append(parts[-1][-2:].reshape(-1).view(torch.int32)[: slots * n_ctas].view(n_ctas, slots)
                            .to(torch.int64).cpu())
    finally:
        K._compile_moe_chunks, K.MOE_CHUNKS_PROBE = real, 0
    rel, pct = _stamp_us, _stamp_percentiles
    print(f"{torch.cuda.get_device_name()}: Fp4MoeChunks, one token (Flash dims, nvfp4), {n_ctas} CTAs, ring depth "
          f"{K.MOE_CHUNKS_STAGES}; bits with stamps vs default: {'same' if same else 'DIFF'}")
    print(f"{len(runs)} plain launches; us after the first CTA's entry, median over launches of each percentile")
    print(f"{'phase':>22} " + " ".join(f"{'p' + str(p):>6}" for p in (0, 10, 50, 90, 100)))
    for col, name in CHUNK_PHASES.items():
        rows = [pct(rel(a, col)) for a in runs]
        print(f"{name:>22} " + " ".join(f"{statistics.median(r[i] for r in rows):6.1f}" for i in range(5)))
    chunk_stamps_by_warpgroup(runs)


def chunk_stamps_by_warpgroup(runs):
    """Each warpgroup's own phase ends (stamps 16 / 22 / 28 + wg): how far apart the warpgroups of one CTA, of one
    unit and of one cluster finish, and what the CTAs' ends would be if a CTA's (or a cluster's) warpgroups shared
    their GEMM2 work evenly (the mean of their GEMM2 loop ends instead of the latest). Medians over launches."""
    def us(a, col0):                                    # [CTAs, 6] us after the launch's first entry
        return torch.stack([_stamp_us(a, col0 + w) for w in range(6)], 1)

    stats = {}

    def add(name, v):
        stats.setdefault(name, []).append(_stamp_percentiles(v))

    for a in runs:
        g1, act, g2 = us(a, 16), us(a, 22), us(a, 28)
        n = g1.shape[0]
        add("GEMM1 end, spread in CTA", g1.max(1).values - g1.min(1).values)
        add("GEMM1 end, spread in unit A", g1[0::2, :4].max(1).values - g1[0::2, :4].min(1).values)
        add("act ready - GEMM1 end, wg", (act - g1).reshape(-1))
        add("GEMM2 loop, wg (end - act)", (g2 - act).reshape(-1))
        add("GEMM2 end, spread in CTA", g2.max(1).values - g2.min(1).values)
        add("GEMM2 end, CTA latest", g2.max(1).values)
        add("GEMM2 end, CTA mean", g2.mean(1))
        cl = g2.view(n // 2, 12)
        add("GEMM2 end, cluster mean", cl.mean(1))
        add("all wgs done (13)", _stamp_us(a, 13))
    print("per warpgroup (us; p0 / p10 / p50 / p90 / p100 over CTAs or warpgroups, median over launches):")
    for name, rows in stats.items():
        print(f"{name:>28} " + " ".join(f"{statistics.median(r[i] for r in rows):6.2f}" for i in range(5)))
    # is a CTA's lateness its SM's? (session 26, H200: split-half r 0.6-0.8, sd of the SMs' means ~0.2 us)
    late = {}
    for i, a in enumerate(runs):
        end = us(a, 28).max(1).values
        for sm, v in zip(a[:, K.STAMP_SMID].tolist(), (end - end.median()).tolist()):
            late.setdefault(int(sm), ([], []))[i % 2].append(v)
    sms = [sm for sm, (ev, od) in late.items() if ev and od]
    if len(sms) > 2:
        ev = [statistics.mean(late[sm][0]) for sm in sms]
        od = [statistics.mean(late[sm][1]) for sm in sms]
        print(f"GEMM2 end of a CTA's latest warpgroup by SM (%smid): split-half correlation of the SMs' mean "
              f"lateness {statistics.correlation(ev, od):.2f}, sd of the SMs' means "
              f"{statistics.stdev([(e + o) / 2 for e, o in zip(ev, od)]):.2f} us")


# Stage-0 handoff probe (notes/megakernel.md section 5): an in-kernel handoff through a global counter vs a PDL boundary
# ======================================================================================================================
# One launch, grid = n_active "active" CTAs + n_load "load" CTAs, one CTA per SM (HANDOFF_SMEM of shared memory each;
# the host keeps the grid <= the SM count, so every CTA is resident and the spins cannot deadlock). Every CTA counts
# itself on a 'started' word at entry; the active CTAs wait until all have started (+ warm_ns when load CTAs run, so
# the stream is at its steady rate) and then:
#   mode "pingpong" (n_active = 2, CTAs 0 and 1): `rounds` round trips. Side s waits (one lane spinning on
#     ld.acquire.gpu, optional nanosleep backoff) until the other side's counter reaches its target, bar.sync, every
#     thread reads its 16 B of the other side's 8-KB payload with plain loads (checked: a wrong word counts as an
#     error), writes its own payload, then signals: fence "all" = every thread fence.acq_rel.gpu, bar.sync, one
#     red.release.gpu.add (the design's producer, as Fp4MoeGemvFused.signal); fence "one" = bar.sync, one
#     red.release.gpu.add. Side 0 also waits for side 1's last signal: its %globaltimer span / (2 rounds) = one-way
#     handoff (signal + poll + barrier + payload round trip: what one dependency costs inside a persistent kernel).
#     stride: the two counters' distance in words (32 = own 128-B lines, 1 = one line). bulk: the consumer's thread
#     0 fences the proxies (fence.proxy.async.global) and brings the 8-KB payload in by one cp.async.bulk into smem
#     (mbarrier, complete_tx), every thread then reads its 16 B from smem: operands by TMA-like copies after a wait.
#     payload False: counters only (no payload read / write); fence "none": red.relaxed, no fence (a diagnostic, not a
#     valid producer); payload "ll": the payload is the signal (NCCL's LL idea): every thread stores two 8-B words
#     (data, round) with st.relaxed.gpu.b64 (single-copy atomic), no fence, and the other side's threads each poll
#     their own two words (ld.relaxed.gpu.b64) until both carry the round, then bar.sync (the CTA has all the data);
#     the runner zeroes the payload per launch so that no word of an earlier launch looks fresh. load_stages: the
#     load CTAs' batches in flight per lane (3 = 192 KB per SM, 1 = 64 KB: the queue every request waits behind).
#   mode "ticket": the n_active CTAs claim tickets from one counter (thread 0 atom.add.relaxed.gpu, the ticket to
#     smem, bar.sync: how Fp4MoeGemvFused takes items) until tickets run out (>= rounds): span / claims per CTA.
#   mode "nop": no smem, wait + launch_dependents (PDL), thread 0 of CTA b adds 1 to word b: the tiny kernel of the
#     PDL-boundary reference (a graph of a chain of them, with and without PDL).
# Load CTAs: warp w of load CTA c streams its own slice (slice_bytes, a multiple of 4 KB) of a large uint8 buffer in
# passes: batches of 8 x 16-B cp.async.cg per lane (4 KB contiguous per warp), 3 batches in flight in a smem ring
# (register loads would not do: ptxas kept ld.global.nc + sum only ~4 loads deep per thread, SASS checked), each
# landed batch summed as u32 words (mod 2^32) so nothing is optimised away; after each pass lane 0 reads the 'done'
# word and the warp stops once every active CTA has finished (or after HANDOFF_LOAD_LIMIT_NS). Per warp out: (sum,
# passes); sum = passes x the slice's word sum (the host checks it). Rate = whole passes' bytes / the load CTAs' span.
# Watchdogs: every spin gives up after HANDOFF_POLL_LIMIT polls (counted in res[:, 6]); nothing can hang a GPU test.
HANDOFF_THREADS = 512          # threads per CTA (pingpong payload: 16 B per thread = 8 KB)
HANDOFF_UNROLL = 8             # load CTAs: 16-B cp.async per lane per batch (a warp's batch: 4 KB contiguous)
HANDOFF_STAGES = 3             # batches in flight per lane (its ring: 3 x 8 x 16 B x 512 threads = 192 KB)
HANDOFF_SMEM = HANDOFF_STAGES * HANDOFF_UNROLL * 16 * HANDOFF_THREADS   # every CTA of modes pingpong / ticket
                               # (> half an SM's shared memory: one CTA per SM)
HANDOFF_POLL_LIMIT = 1 << 21   # spins give up after this many polls (a timeout, counted)
HANDOFF_LOAD_LIMIT_NS = 2_000_000_000   # load warps stop after this long even if the active CTAs never finish
HANDOFF_BACKOFF_NS = 64        # nanosleep between polls in the backoff variant (the design note's value, s10 moedyn)
# (label, static config) of the ping-pong variants `bench.py handoff` times, idle and with load CTAs
HANDOFF_VARIANTS = (
    ("base: all-thread fence, tight spin", dict(fence="all", backoff=0, stride=32)),
    ("nanosleep backoff", dict(fence="all", backoff=HANDOFF_BACKOFF_NS, stride=32)),
    ("counters in one 128-B line", dict(fence="all", backoff=0, stride=1)),
    ("one fence: bar.sync + red.release", dict(fence="one", backoff=0, stride=32)),
    ("payload by bulk copy + proxy fence", dict(fence="all", backoff=0, stride=32, bulk=True)),
    # session 12: what the loaded handoff is made of (payload, fence) and how it scales with the load's queue depth
    ("no payload: counters + fence only", dict(fence="all", backoff=0, stride=32, payload=False)),
    ("no payload, no fence (relaxed red; diag.)", dict(fence="none", backoff=0, stride=32, payload=False)),
    ("base, load ring 2 (128 KB/SM in flight)", dict(fence="all", backoff=0, stride=32, load_stages=2)),
    ("base, load ring 1 (64 KB/SM in flight)", dict(fence="all", backoff=0, stride=32, load_stages=1)),
    ("no payload, no fence, load ring 1 (diag.)", dict(fence="none", backoff=0, stride=32, payload=False,
                                                       load_stages=1)),
    # the payload is the signal (NCCL's LL idea): 8-B (data, round) words, 4 KB of data per side, no fence/counter
    ("LL: 8-B (data, round) words, no fence", dict(fence="none", backoff=0, stride=32, payload="ll")),
    ("LL, load ring 1 (64 KB/SM in flight)", dict(fence="none", backoff=0, stride=32, payload="ll", load_stages=1)),
)
HANDOFF_DIAGNOSTIC = ("diag.",)    # labels holding this are not valid producers: left out of the stage-0 rule
_H_STARTED, _H_DONE, _H_TICKET, _H_ERRORS = 64, 96, 128, 160   # control words, own 128-B lines (counters: 0, stride)
_H_CTL_WORDS = 256
_H_RES = 8                     # res row per CTA (int64): t0, t1, count, smid, -, polls, timeouts, - (errors: ctl)

if K.HAVE_CUTE:
    import cutlass
    import cutlass.cute as cute
    from cutlass import Int32, Int64, Uint8, const_expr
    from cutlass.cutlass_dsl import T as _T, dsl_user_op
    from cutlass._mlir import ir as _ir
    from cutlass._mlir.dialects import llvm as _llvm

    @dsl_user_op
    def _nanosleep(ns: int, *, loc=None, ip=None):
        """Suspend the thread for about ns nanoseconds (spin backoff; CuTe DSL 4.8 has no nanosleep intrinsic)."""
        _llvm.inline_asm(None, [], f"nanosleep.u32 {ns};", "", has_side_effects=True, loc=loc, ip=ip)

    @dsl_user_op
    def _ld_shared_v4(smem_addr: Int32, *, loc=None, ip=None):
        """16-byte shared load -> 4 Int32."""
        res = _llvm.inline_asm(
            _ir.Type.parse("!llvm.struct<(i32, i32, i32, i32)>"), [Int32(smem_addr).ir_value(loc=loc, ip=ip)],
            "ld.shared.v4.b32 {$0, $1, $2, $3}, [$4];", "=r,=r,=r,=r,r", has_side_effects=True, loc=loc, ip=ip)
        return tuple(Int32(_llvm.extractvalue(_T.i32(), res, [i], loc=loc, ip=ip)) for i in range(4))

    @dsl_user_op
    def _bulk_g2s(smem_addr: Int32, gmem_addr: Int64, nbytes: int, mbar_addr: Int32, *, loc=None, ip=None):
        """One bulk copy global -> this CTA's shared memory (async proxy), completing nbytes of tx on the mbarrier."""
        _llvm.inline_asm(None, [Int32(smem_addr).ir_value(loc=loc, ip=ip), Int64(gmem_addr).ir_value(loc=loc, ip=ip),
                                Int32(mbar_addr).ir_value(loc=loc, ip=ip)],
                         f"cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [$0], [$1], {nbytes}, [$2];",
                         "r,l,r", has_side_effects=True, loc=loc, ip=ip)

    @dsl_user_op
    def _st_v4(addr: Int64, a: Int32, b: Int32, c: Int32, d: Int32, *, loc=None, ip=None):
        """16-byte plain global store."""
        _llvm.inline_asm(None, [Int64(addr).ir_value(loc=loc, ip=ip)] + [Int32(v).ir_value(loc=loc, ip=ip)
                                                                         for v in (a, b, c, d)],
                         "st.global.v4.b32 [$0], {$1, $2, $3, $4};", "l,r,r,r,r", has_side_effects=True,
                         loc=loc, ip=ip)

    @dsl_user_op
    def _st_relaxed_b64(addr: Int64, lo: Int32, hi: Int32, *, loc=None, ip=None):
        """One 8-byte st.relaxed.gpu of (lo, hi): a scalar strong store, single-copy atomic (the LL word)."""
        _llvm.inline_asm(None, [Int64(addr).ir_value(loc=loc, ip=ip), Int32(lo).ir_value(loc=loc, ip=ip),
                                Int32(hi).ir_value(loc=loc, ip=ip)],
                         "{ .reg .b64 t; mov.b64 t, {$1, $2}; st.relaxed.gpu.global.b64 [$0], t; }", "l,r,r",
                         has_side_effects=True, loc=loc, ip=ip)

    @dsl_user_op
    def _ld_relaxed_b64(addr: Int64, *, loc=None, ip=None):
        """One 8-byte ld.relaxed.gpu -> (lo, hi): both halves from the same store (single-copy atomic)."""
        res = _llvm.inline_asm(
            _ir.Type.parse("!llvm.struct<(i32, i32)>"), [Int64(addr).ir_value(loc=loc, ip=ip)],
            "{ .reg .b64 t; ld.relaxed.gpu.global.b64 t, [$2]; mov.b64 {$0, $1}, t; }", "=r,=r,l",
            has_side_effects=True, loc=loc, ip=ip)
        return tuple(Int32(_llvm.extractvalue(_T.i32(), res, [i], loc=loc, ip=ip)) for i in range(2))

    class HandoffProbe:
        """The stage-0 probe kernel (see the section comment). Static: mode, fence ("all" | "one"), backoff (ns of
        nanosleep between polls, 0 = tight), stride (words between the two ping-pong counters), pdl (launch
        attribute; mode nop)."""

        def __init__(self, mode: str, fence: str = "all", backoff: int = 0, stride: int = 32, pdl: bool = False,
                     bulk: bool = False, payload: bool = True, load_stages: int = HANDOFF_STAGES):
            assert mode in ("pingpong", "ticket", "nop") and fence in ("all", "one", "none") and 1 <= stride < _H_STARTED
            assert 1 <= load_stages <= HANDOFF_STAGES and (payload is True or not bulk) and payload in (True, False, "ll")
            self.mode, self.fence, self.backoff, self.stride, self.pdl = mode, fence, backoff, stride, pdl
            self.bulk = bulk        # pingpong: the payload comes in by one bulk copy (async proxy) into smem
            self.payload = payload  # pingpong: False = counters only (no payload read / write); "ll" = the payload
                                    # is the signal: 8-B (data, round) words, no fence, no counter to poll
            self.load_stages = load_stages   # load CTAs: batches in flight per lane (the smem stays HANDOFF_SMEM)
            self.threads = 128 if mode == "nop" else HANDOFF_THREADS
            self.warps = self.threads // 32

        @cute.jit
        def __call__(self, mCtl: cute.Tensor, mPay: cute.Tensor, mBuf: cute.Tensor, mRes: cute.Tensor,
                     mWarp: cute.Tensor, rounds: Int32, n_active: Int32, n_load: Int32, slice_bytes: Int32,
                     warm_ns: Int32, stream):
            if const_expr(self.mode == "nop"):
                @cute.struct
                class SharedStorage:
                    slot: cute.struct.MemRange[Int32, 4]
            else:
                @cute.struct
                class SharedStorage:
                    mbar: cute.struct.MemRange[Int64, 1]
                    slot: cute.struct.MemRange[Int32, 4]
                    pad: cute.struct.Align[cute.struct.MemRange[Int32, HANDOFF_SMEM // 4], 128]   # one CTA per SM
            self.shared_storage = SharedStorage
            self.kernel(mCtl, mPay, mBuf, mRes, mWarp, rounds, n_active, n_load, slice_bytes, warm_ns).launch(
                grid=[n_active + n_load, 1, 1], block=[self.threads, 1, 1], stream=stream, use_pdl=self.pdl)

        @cute.jit
        def spin(self, ptr, target: Int32):
            """One lane: poll ptr (ld.acquire.gpu) until it reaches target or HANDOFF_POLL_LIMIT polls -> (last value
            seen, polls)."""
            seen = cute.arch.load(ptr, Int32, sem="acquire", scope="gpu")
            polls = Int32(1)
            while seen < target and polls < HANDOFF_POLL_LIMIT:
                if const_expr(self.backoff > 0):
                    _nanosleep(self.backoff)
                seen = cute.arch.load(ptr, Int32, sem="acquire", scope="gpu")
                polls = polls + 1
            return seen, polls

        @cute.jit
        def ll_wait(self, addr, target: Int32):
            """This thread: poll its two LL words at addr until both carry round >= target (or the poll limit) ->
            (polls, 1 if it gave up else 0)."""
            _d0, f0 = _ld_relaxed_b64(addr)
            _d1, f1 = _ld_relaxed_b64(addr + 8)
            polls = Int32(1)
            while (f0 < target or f1 < target) and polls < HANDOFF_POLL_LIMIT:
                _d0, f0 = _ld_relaxed_b64(addr)
                _d1, f1 = _ld_relaxed_b64(addr + 8)
                polls = polls + 1
            bad = Int32(0)
            if f0 < target or f1 < target:
                bad = Int32(1)
            return polls, bad

        @cute.kernel
        def kernel(self, mCtl: cute.Tensor, mPay: cute.Tensor, mBuf: cute.Tensor, mRes: cute.Tensor,
                   mWarp: cute.Tensor, rounds: Int32, n_active: Int32, n_load: Int32, slice_bytes: Int32,
                   warm_ns: Int32):
            tidx, _, _ = cute.arch.thread_idx()
            bid, _, _ = cute.arch.block_idx()
            smem = cutlass.utils.SmemAllocator()
            storage = smem.allocate(self.shared_storage)
            slot = storage.slot.get_tensor(cute.make_layout(4))
            ctl = mCtl.iterator
            if const_expr(self.mode == "nop"):
                cute.arch.griddepcontrol_wait()              # the previous kernel's word is written
                cute.arch.griddepcontrol_launch_dependents()
                if tidx == 0:
                    mCtl[bid] = mCtl[bid] + 1
            else:
                t_entry = cute.arch.globaltimer()
                if tidx == 0:
                    cute.arch.red(ctl + _H_STARTED, Int32(1), op="add", dtype="u32", sem="relaxed", scope="gpu")
                if bid < n_active:
                    self.active(mCtl, mPay, mRes, storage, slot, tidx, bid, rounds, n_active, n_load, warm_ns)
                else:
                    self.stream_load(mCtl, mBuf, mRes, mWarp, storage.pad.data_ptr().toint(), tidx, bid, n_active,
                                     slice_bytes, t_entry)

        @cute.jit
        def active(self, mCtl, mPay, mRes, storage, slot, tidx, bid, rounds, n_active, n_load, warm_ns):
            ctl = mCtl.iterator
            timeouts = Int32(0)
            polls = Int32(0)
            if tidx == 0:
                if const_expr(self.bulk):
                    cute.arch.mbarrier_init(storage.mbar.data_ptr(), 1)
                    cute.arch.mbarrier_init_fence()
                seen, _ = self.spin(ctl + _H_STARTED, n_active + n_load)      # (its polls are not counted)
                if seen < n_active + n_load:
                    timeouts = timeouts + 1
                if n_load > 0:                               # let the stream reach its steady rate
                    t_w = cute.arch.globaltimer()
                    while cute.arch.globaltimer() - t_w < Int64(warm_ns):
                        _nanosleep(256)
            cute.arch.sync_threads()
            errors = Int32(0)
            count = Int32(0)
            t0 = cute.arch.globaltimer()
            if const_expr(self.mode == "pingpong"):
                side = bid
                cnt_out = ctl + side * self.stride
                cnt_in = ctl + (1 - side) * self.stride
                pay = mPay.iterator.toint()
                pay_out = pay + Int64(side * (16 * HANDOFF_THREADS) + tidx * 16)
                pay_in = pay + Int64((1 - side) * (16 * HANDOFF_THREADS) + tidx * 16)
                sbuf = storage.pad.data_ptr().toint()
                n_bulk = Int32(0)
                i = Int32(0)
                if const_expr(self.payload == "ll"):
                    if tidx == 0:
                        slot[1] = 0                                # any thread's poll gave up: the run ends
                    cute.arch.sync_threads()
                    while i < rounds:
                        # every thread polls its own two LL words of the other side's round target - 1 (word 0: (want,
                        # round), word 1: (tidx, round)); the data arrive with their flag, so no fence and no counter
                        target = i + side
                        if target > 0:
                            n, bad = self.ll_wait(pay_in, target)
                            if tidx == 0:
                                polls = polls + n
                            if bad != 0:
                                slot[1] = 1
                        cute.arch.sync_threads()                   # the CTA has all of the payload
                        if slot[1] != 0:
                            timeouts = timeouts + 1
                            i = rounds
                        if target > 0:
                            want = ((target - 1) << 1) | (1 - side)
                            d0, _f0 = _ld_relaxed_b64(pay_in)
                            d1, _f1 = _ld_relaxed_b64(pay_in + 8)
                            if d0 != want or d1 != tidx:
                                errors = errors + 1
                        _st_relaxed_b64(pay_out, (i << 1) | side, i + 1)
                        _st_relaxed_b64(pay_out + 8, tidx, i + 1)
                        if tidx == 0:                              # fire and forget: only the host's counter check
                            cute.arch.red(cnt_out, Int32(1), op="add", dtype="u32", sem="relaxed", scope="gpu")
                        count = count + 1
                        i = i + 1
                else:
                    while i < rounds:
                        target = i + side          # side 0: the other side's i-th signal; side 1: side 0's (i+1)-th
                        if tidx == 0:
                            seen, n = self.spin(cnt_in, target)
                            polls = polls + n
                            slot[0] = seen
                        cute.arch.sync_threads()
                        if slot[0] < target:
                            timeouts = timeouts + 1
                            i = rounds                 # give up (the other side times out once, then ends too)
                        if target > 0 and const_expr(self.payload):
                            want = ((target - 1) << 1) | (1 - side)
                            v = (Int32(0), Int32(0), Int32(0), Int32(0))
                            if const_expr(self.bulk):
                                # the acquiring thread: generic-proxy writes (made visible by the acquire) -> async proxy
                                if tidx == 0:
                                    cute.arch.fence_proxy("async.global")
                                    cute.arch.mbarrier_arrive_and_expect_tx(storage.mbar.data_ptr(), 16 * self.threads)
                                    _bulk_g2s(sbuf, pay + Int64((1 - side) * (16 * HANDOFF_THREADS)), 16 * self.threads,
                                              storage.mbar.data_ptr().toint())
                                cute.arch.mbarrier_wait(storage.mbar.data_ptr(), n_bulk % 2)
                                n_bulk = n_bulk + 1
                                v = _ld_shared_v4(sbuf + tidx * 16)
                            else:
                                v = K._ld_v4(pay_in, "")
                            if v[0] != want or v[1] != tidx or v[2] != want + 1 or v[3] != want + 2:
                                errors = errors + 1
                        if const_expr(self.payload):
                            w = (i << 1) | side
                            _st_v4(pay_out, w, tidx, w + 1, w + 2)
                        if const_expr(self.fence == "all"):
                            cute.arch.fence_acq_rel_gpu()
                        cute.arch.sync_threads()
                        if tidx == 0:
                            cute.arch.red(cnt_out, Int32(1), op="add", dtype="u32",
                                          sem="relaxed" if const_expr(self.fence == "none") else "release", scope="gpu")
                        count = count + 1
                        i = i + 1
                if side == 0:                                    # side 1's last signal closes the span
                    if const_expr(self.payload == "ll"):
                        n, bad = self.ll_wait(pay_in, rounds)
                        if tidx == 0:
                            polls = polls + n
                            if bad != 0:
                                timeouts = timeouts + 1
                        cute.arch.sync_threads()
                    else:
                        if tidx == 0:
                            seen, n = self.spin(cnt_in, rounds)
                            polls = polls + n
                            if seen < rounds:
                                timeouts = timeouts + 1
            else:                                          # ticket
                t = Int32(0)
                while t < rounds:
                    if tidx == 0:
                        slot[0] = cute.arch.atomic_add(ctl + _H_TICKET, Int32(1), sem="relaxed", scope="gpu")
                    cute.arch.sync_threads()
                    t = slot[0]
                    count = count + 1
                    cute.arch.sync_threads()
            t1 = cute.arch.globaltimer()
            cute.arch.sync_threads()
            if tidx == 0:
                cute.arch.fence_acq_rel_gpu()
                cute.arch.red(ctl + _H_DONE, Int32(1), op="add", dtype="u32", sem="release", scope="gpu")
            # errors: any thread's payload mismatches (atomic: the counts of all threads)
            if errors > 0:
                cute.arch.atomic_add(ctl + _H_ERRORS, errors, sem="relaxed", scope="gpu")
            if tidx == 0:
                mRes[bid, 0] = t0
                mRes[bid, 1] = t1
                mRes[bid, 2] = Int64(count)
                mRes[bid, 3] = Int64(cute.arch.smid())
                mRes[bid, 5] = Int64(polls)
                mRes[bid, 6] = Int64(timeouts)

        @cute.jit
        def stream_load(self, mCtl, mBuf, mRes, mWarp, pad, tidx, bid, n_active, slice_bytes, t_entry):
            """Load CTA: each warp streams its slice in passes, HANDOFF_STAGES batches of HANDOFF_UNROLL 16-B
            cp.async per lane in flight (smem, not registers: ptxas keeps register loads only ~4 deep here), summing
            each landed batch from smem; the slice's batches in order, the pipeline running on across passes."""
            ctl = mCtl.iterator
            warp = cute.arch.make_warp_uniform(cute.arch.warp_idx())
            lane = tidx % 32
            gw = (bid - n_active) * self.warps + warp
            gbase = mBuf.iterator.toint() + Int64(gw) * Int64(slice_bytes) + Int64(lane * 16)
            sbase = pad + tidx * 16
            U, S = HANDOFF_UNROLL, self.load_stages
            batch = 512 * U                                # bytes of a warp's batch
            steps = slice_bytes // batch                   # batches per pass
            for st in cutlass.range_constexpr(S):          # prologue: batches 0 .. S-1 (steps >= S)
                for u in cutlass.range_constexpr(U):
                    K.cp_async_16(sbase + (st * U + u) * (16 * self.threads), gbase + (st * batch + u * 512), 16)
                cute.arch.cp_async_commit_group()
            acc = Int32(0)
            passes = Int32(0)
            go = Int32(1)
            k = Int32(0)                                   # batch being summed (its stage k % S)
            nxt = Int32(S)                                 # slice position of the batch issued next
            while go != 0:
                cute.arch.cp_async_wait_group(S - 1)
                st = k % S
                for u in cutlass.range_constexpr(U):
                    v = _ld_shared_v4(sbase + (st * U + u) * (16 * self.threads))
                    acc = acc + v[0] + v[1] + v[2] + v[3]
                if nxt == steps:
                    nxt = Int32(0)
                for u in cutlass.range_constexpr(U):
                    K.cp_async_16(sbase + (st * U + u) * (16 * self.threads), gbase + (Int64(nxt) * batch + u * 512), 16)
                cute.arch.cp_async_commit_group()
                nxt = nxt + 1
                k = k + 1
                if k % steps == 0:                         # a pass is summed: stop?
                    passes = passes + 1
                    stop = Int32(0)
                    if lane == 0:
                        done = cute.arch.load(ctl + _H_DONE, Int32, sem="relaxed", scope="gpu")
                        if done >= n_active or cute.arch.globaltimer() - t_entry > Int64(HANDOFF_LOAD_LIMIT_NS):
                            stop = Int32(1)
                    if cute.arch.shuffle_sync(stop, 0) != 0:
                        go = Int32(0)
            cute.arch.cp_async_wait_group(0)               # the last S batches land unsummed (not in the checksum)
            for o in (1, 2, 4, 8, 16):
                acc = acc + cute.arch.shuffle_sync_bfly(acc, offset=o)
            if lane == 0:
                mWarp[gw, 0] = acc
                mWarp[gw, 1] = passes
            cute.arch.sync_threads()
            if tidx == 0:
                mRes[bid, 0] = t_entry
                mRes[bid, 1] = cute.arch.globaltimer()
                mRes[bid, 2] = Int64(passes)
                mRes[bid, 3] = Int64(cute.arch.smid())


def _compile_handoff(mode: str, fence: str = "all", backoff: int = 0, stride: int = 32, pdl: bool = False,
                     bulk: bool = False, payload: bool = True, load_stages: int = HANDOFF_STAGES):
    """Compiled HandoffProbe for one static config (kernels.py's memory + disk cache; the key holds this file's
    hash, since kernels.py's key hashes only kernels.py). Call: (ctl i32 [256], pay i32 [2 * 4 * threads], buf u8,
    res i64 [grid, 8], warp i32 [load warps, 2], rounds, n_active, n_load, slice_bytes, warm_ns)."""
    import hashlib
    with open(__file__, "rb") as f:
        src = hashlib.sha256(f.read()).hexdigest()[:16]

    def build():
        mk = cute.runtime.make_fake_compact_tensor
        args = (mk(Int32, (cute.sym_int(),), assumed_align=16), mk(Int32, (cute.sym_int(),), assumed_align=16),
                mk(Uint8, (cute.sym_int(),), assumed_align=16),
                mk(Int64, (cute.sym_int(), _H_RES), stride_order=(1, 0), assumed_align=16),
                mk(Int32, (cute.sym_int(), 2), stride_order=(1, 0), assumed_align=8),
                Int32(1), Int32(1), Int32(0), Int32(8192), Int32(0),
                cute.runtime.make_fake_stream(use_tvm_ffi_env_stream=True))
        return HandoffProbe(mode, fence, backoff, stride, pdl, bulk, payload, load_stages), args
    return K._load_or_compile(("handoff", src, mode, fence, backoff, stride, pdl, bulk, payload, load_stages), build)


HANDOFF_ROUNDS = 4000          # ping-pong round trips per run (8000 one-way handoffs)
HANDOFF_TICKETS = 16384        # tickets per ticket run
HANDOFF_TICKET_CTAS = (1, 16)  # ticket CTAs claiming from one counter
HANDOFF_BUF_BYTES = 256 << 20  # the load CTAs' buffer (rotating: far above L2)
HANDOFF_WARM_NS = 20000        # active CTAs start this long after every CTA has started (the stream at speed)
HANDOFF_CHAIN = 64             # tiny kernels per graph in the PDL-boundary reference


class HandoffRunner:
    """Host side of the probe on one device: buffers, one launch per call, the checks. Used by `bench.py handoff`
    and the GPU test."""

    def __init__(self, dev, buf_bytes: int = HANDOFF_BUF_BYTES):
        self.dev = torch.device(dev)
        self.sms = torch.cuda.get_device_properties(self.dev).multi_processor_count
        self.warps = HANDOFF_THREADS // 32
        batch = 512 * HANDOFF_UNROLL
        nw = (self.sms - 1) * self.warps          # slices for the most load CTAs a launch has (one active CTA)
        self.slice = max(HANDOFF_STAGES, buf_bytes // max(nw, 1) // batch) * batch
        g = torch.Generator(device=self.dev).manual_seed(0)
        self.buf = torch.randint(0, 256, (max(nw, 1) * self.slice,), dtype=torch.uint8, device=self.dev, generator=g)
        # each load warp's slice, summed as int32 words (the kernel's checksum = passes x this, mod 2^32)
        self.slice_sums = self.buf.view(torch.int32).view(max(nw, 1), -1).sum(1, dtype=torch.int64).cpu()
        self.ctl = torch.zeros(_H_CTL_WORDS, dtype=torch.int32, device=self.dev)
        self.pay = torch.zeros(2 * 4 * HANDOFF_THREADS, dtype=torch.int32, device=self.dev)
        self.res = torch.zeros(self.sms + 16, _H_RES, dtype=torch.int64, device=self.dev)
        self.wsum = torch.zeros(max(nw, 1), 2, dtype=torch.int32, device=self.dev)

    def launch(self, mode: str, cfg: dict, rounds: int, n_active: int, load: bool):
        """One launch: n_active CTAs + (load) one load CTA on every other SM -> (ctl, res, per-warp (sum, passes) of
        the launch's load warps) on the host."""
        n_load = self.sms - n_active if load else 0
        assert 0 < n_active < self.sms, "every CTA must be resident (one per SM)"
        fn = _compile_handoff(mode, **cfg)
        self.ctl.zero_()
        self.pay.zero_()          # LL words carry their round: a previous launch's words must not look fresh
        self.res.zero_()
        self.wsum.zero_()
        fn(self.ctl, self.pay, self.buf, self.res, self.wsum, rounds, n_active, n_load, self.slice,
           HANDOFF_WARM_NS if load else 0)
        torch.cuda.synchronize(self.dev)
        return self.ctl.cpu(), self.res[:n_active + n_load].cpu(), self.wsum[:n_load * self.warps].cpu()

    def load_stats(self, res, wsum, n_active: int) -> dict:
        """The load CTAs' stream rate (bytes of whole passes / their span) and the checksum check."""
        passes = wsum[:, 1].to(torch.int64)
        want = (self.slice_sums[:len(passes)] * passes) & 0xFFFFFFFF
        got = wsum[:, 0].to(torch.int64) & 0xFFFFFFFF
        span = (res[n_active:, 1].max() - res[n_active:, 0].min()).item()
        return {"tbps": passes.sum().item() * self.slice / max(span, 1) / 1e3, "checksum_ok": torch.equal(want, got),
                "min_passes": passes.min().item(), "mb": passes.numel() * self.slice / 1e6}

    def pingpong(self, cfg: dict, rounds: int, load: bool) -> dict:
        ctl, res, wsum = self.launch("pingpong", cfg, rounds, 2, load)
        stride = cfg.get("stride", 32)
        out = {"ns": (res[0, 1] - res[0, 0]).item() / (2 * rounds), "polls": res[:2, 5].sum().item() / (2 * rounds),
               "errors": ctl[_H_ERRORS].item(), "timeouts": res[:2, 6].sum().item(),
               "counters_ok": ctl[0].item() == rounds and ctl[stride].item() == rounds
               and res[0, 2].item() == rounds and res[1, 2].item() == rounds,
               "smids": (res[0, 3].item(), res[1, 3].item())}
        if load:
            out.update(self.load_stats(res, wsum, 2))
        return out

    def ticket(self, ctas: int, tickets: int, load: bool) -> dict:
        ctl, res, wsum = self.launch("ticket", {}, tickets, ctas, load)
        claims = res[:ctas, 2]
        spans = (res[:ctas, 1] - res[:ctas, 0]).double()
        out = {"ns": statistics.median((spans / claims.double()).tolist()),
               "per_us": claims.sum().item() / max((res[:ctas, 1].max() - res[:ctas, 0].min()).item(), 1) * 1e3,
               "timeouts": res[:ctas, 6].sum().item(),
               "counters_ok": ctl[_H_TICKET].item() == tickets + ctas == claims.sum().item()}
        if load:
            out.update(self.load_stats(res, wsum, ctas))
        return out

    def nop_chain(self, grid: int, pdl: bool, chain: int = HANDOFF_CHAIN):
        """A CUDA graph of `chain` tiny kernels (grid CTAs each; PDL launch attribute or not) and its word check."""
        fn = _compile_handoff("nop", pdl=pdl)
        words = torch.zeros(max(grid, _H_CTL_WORDS), dtype=torch.int32, device=self.dev)
        g = graph_of(lambda: [fn(words, self.pay, self.buf, self.res, self.wsum, 0, grid, 0, 0, 0)
                              for _ in range(chain)])
        words.zero_()
        g.replay()
        torch.cuda.synchronize(self.dev)
        assert torch.all(words[:grid] == chain).item(), "nop chain: a kernel missed the previous one's word"
        return g


def bench_handoff(reps: int = 3, rounds: int = HANDOFF_ROUNDS, tickets: int = HANDOFF_TICKETS,
                  buf_bytes: int = HANDOFF_BUF_BYTES, dev="cuda"):
    """`python bench.py handoff` (megakernel stage 0): one-way latency of an in-kernel handoff through a global
    counter (ping-pong of two CTAs), idle and while the other SMs stream a 256-MB buffer; the claim latency of one
    ticket counter; and the kernel boundary of a CUDA graph of tiny kernels with / without PDL (same run)."""
    t_start = time.time()
    dev = torch.device(dev)
    name = torch.cuda.get_device_name(dev)
    bw = copy_bandwidth(dev)
    r = HandoffRunner(dev, buf_bytes)
    print(f"{name} ({r.sms} SMs), copy {bw / 1e12:.2f} TB/s (read + write, 1 GiB)", flush=True)
    print(f"probe: {HANDOFF_THREADS} threads, one CTA per SM; with load, every other SM runs a load CTA ({r.warps} "
          f"warps, {HANDOFF_STAGES} x {HANDOFF_UNROLL} x 16-B cp.async per lane in flight, {r.slice}-B slice per warp: "
          f"{(r.sms - 2) * r.warps * r.slice / 1e6:.0f} MB streamed per pass around the ping-pong pair); ping-pong "
          f"{rounds} round trips per run, ticket runs {tickets} tickets; medians of {reps} runs", flush=True)
    rows = []                          # (label, idle dict, load dict)
    runs = {label: ([], []) for label, _ in HANDOFF_VARIANTS}
    for label, cfg in HANDOFF_VARIANTS:
        _compile_handoff("pingpong", **cfg)
    for _ in range(reps):                                          # interleaved: variants see the same clock state
        for label, cfg in HANDOFF_VARIANTS:
            runs[label][0].append(r.pingpong(cfg, rounds, False))
            runs[label][1].append(r.pingpong(cfg, rounds, True))
    truns = {k: ([], []) for k in HANDOFF_TICKET_CTAS}
    for _ in range(reps):
        for k in HANDOFF_TICKET_CTAS:
            truns[k][0].append(r.ticket(k, tickets, False))
            truns[k][1].append(r.ticket(k, tickets, True))
    grids = (1, r.sms)
    graphs = {(gr, pdl): r.nop_chain(gr, pdl) for gr in grids for pdl in (False, True)}
    bt = {k: [] for k in graphs}
    for _ in range(2 * reps + 1):
        for k, gph in graphs.items():
            bt[k].append(time_ms(gph.replay, 20) * 1e3 / HANDOFF_CHAIN)
    del graphs

    def med(lst, key):
        return statistics.median(d[key] for d in lst)

    def check(lst):
        bad = []
        if any(d.get("errors", 0) for d in lst):
            bad.append(f"payload errors {max(d['errors'] for d in lst)}")
        if any(d["timeouts"] for d in lst):
            bad.append("TIMEOUT")
        if not all(d["counters_ok"] for d in lst):
            bad.append("counters")
        if not all(d.get("checksum_ok", True) for d in lst):
            bad.append("load checksum")
        if any(d.get("min_passes", 1) < 1 for d in lst):
            bad.append("load ended early")
        return ", ".join(bad) or "ok"

    smids = sorted({d["smids"] for lst in runs.values() for part in lst for d in part})
    rates = [d["tbps"] for lst in runs.values() for d in lst[1]] + [d["tbps"] for lst in truns.values() for d in lst[1]]
    print(f"ping-pong CTAs ran on SMs {', '.join(f'{a}+{b}' for a, b in smids[:6])}"
          f"{' ...' if len(smids) > 6 else ''}; load CTAs streamed {min(rates):.2f}-{max(rates):.2f} TB/s (read only) "
          f"over the loaded runs, copy {bw / 1e12:.2f} TB/s (read + write)")
    print(f"total {time.time() - t_start:.1f} s (compiles included)\n")
    w = 38
    print(f"{'ping-pong: one-way handoff':<{w}} {'idle ns':>9} {'load ns':>9} {'idle polls':>10} {'load polls':>10} "
          f"{'load TB/s':>9}  checks")
    for label, _ in HANDOFF_VARIANTS:
        idle, load = runs[label]
        print(f"{label:<{w}} {med(idle, 'ns'):>9.0f} {med(load, 'ns'):>9.0f} {med(idle, 'polls'):>10.2f} "
              f"{med(load, 'polls'):>10.2f} {med(load, 'tbps'):>9.2f}  {check(idle + load)}")
    print(f"{'ticket claim (atom.add, bar.sync)':<{w}} {'idle ns':>9} {'load ns':>9} {'idle /us':>10} {'load /us':>10} "
          f"{'load TB/s':>9}  checks")
    for k in HANDOFF_TICKET_CTAS:
        idle, load = truns[k]
        print(f"{f'{k} CTA(s) on one counter':<{w}} {med(idle, 'ns'):>9.0f} {med(load, 'ns'):>9.0f} "
              f"{med(idle, 'per_us'):>10.1f} {med(load, 'per_us'):>10.1f} {med(load, 'tbps'):>9.2f}  "
              f"{check(idle + load)}")
    print(f"{f'boundary: graph of {HANDOFF_CHAIN} tiny kernels':<{w}} {'no PDL us':>9} {'PDL us':>9}")
    for gr in grids:
        print(f"{f'grid {gr} (idle)':<{w}} {statistics.median(bt[(gr, False)]):>9.2f} "
              f"{statistics.median(bt[(gr, True)]):>9.2f}")
    base = med(runs[HANDOFF_VARIANTS[0][0]][1], "ns")
    best_label = min((lb for lb in runs if not any(d in lb for d in HANDOFF_DIAGNOSTIC)),
                     key=lambda lb: med(runs[lb][1], "ns"))
    best = med(runs[best_label][1], "ns")
    pdl_us = statistics.median(bt[(r.sms, True)])
    valid = all(check(lst[0] + lst[1]) == "ok" for lst in list(runs.values()) + list(truns.values()))
    print(f"stage 0 (notes/megakernel.md section 5: a loaded handoff above 1200 ns -> stop): loaded one-way handoff "
          f"base {base:.0f} ns, best {best:.0f} ns ({best_label}); PDL boundary {pdl_us * 1e3:.0f} ns (grid "
          f"{r.sms}) -> " + ("CHECKS FAILED: these numbers are not valid" if not valid else
                             "below 1200 ns: stage 1 may go ahead" if best <= 1200 else "above 1200 ns: STOP"))

if __name__ == "__main__":
    what = sys.argv[1] if len(sys.argv) > 1 else "moe"
    known = ("moe", "moe-profile", "moe-stamps", "decode", "prefill", "dist", "indexer", "gemv", "fold", "handoff")
    if what not in known:
        print(f"unknown benchmark {what!r} (known: {', '.join(known)})", file=sys.stderr)
        sys.exit(2)
    needs_cute = what.startswith("moe") or what in ("indexer", "gemv", "fold", "handoff")
    if not torch.cuda.is_available() or (needs_cute and not K.HAVE_CUTE):
        print(f"bench.py {what} needs a CUDA GPU" + (" and CuTe DSL" if needs_cute else ""), file=sys.stderr)
        sys.exit(2)
    if what == "moe" and "--prefill-warm" in sys.argv:
        prefill_warm(ablations="--ablate-prefill" in sys.argv)
    elif what == "moe" and "--prefill" in sys.argv:
        bench_moe_prefill()
    elif what == "moe" and "--decode-only" in sys.argv:
        bench_moe_decode()
    elif what == "moe":
        bench_moe()
    elif what == "moe-profile":
        profile_moe()
    elif what == "moe-stamps" and "--chunks" in sys.argv:
        bench_chunk_stamps()
    elif what == "moe-stamps":
        bench_moe_stamps()
    elif what == "decode":
        decode_args = parse_args(sys.argv[2:])

        def run_decode():
            if not decode_args.precompile_only:
                if decode_args.probes:
                    install_decode_probes()
                bench_decode(decode_args)
        with_precompile("decode", decode_args, record_decode_compiles, run_decode)
    elif what == "prefill":
        prefill_args = parse_prefill_args(sys.argv[2:])
        with_precompile("prefill", prefill_args, record_prefill_compiles, lambda: bench_prefill(prefill_args))
    elif what == "indexer":
        bench_indexer()
    elif what == "gemv":
        bench_gemv_hints() if "--ld-hints" in sys.argv else bench_gemv()
    elif what == "fold":
        bench_fold()
    elif what == "handoff":
        bench_handoff()
    elif sys.argv[2] == "write":
        write(sys.argv[3], "--small" in sys.argv)
    elif sys.argv[2] == "run":
        run(sys.argv[3], sys.argv[4], "--fp32" in sys.argv)
    else:
        compare(*sys.argv[3:6])
