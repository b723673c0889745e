"""L2-lane round script (session 8, helper l2lane; not product code).

python3 _l2lane.py precompile     # compile the GEMV configs + the prefetch kernel + the spin kernel (parallel processes)
python3 _l2lane.py [shapes...]    # timings

Per Flash decode GEMV (M = 1), CUDA-graph replays over rotating weight copies (>= 160 MB: nothing L2-hot by accident),
us per call, medians of interleaved rounds:
  cold   : [spin 20 us, GEMV] - [spin 20 us]               (GEMV with PDL behind a one-warp latency-bound kernel)
  warm X : [prefetch X of w, spin 20 us, GEMV] - [prefetch X, spin 20 us]   (the prefetch has landed by then)
  lane   : stream A [spin S us, GEMV], a forked branch prefetches X of w's bytes meanwhile, joined after the GEMV:
           exp = pair - spin alone, vs the same pair without the branch (and with an empty branch: fork/join cost).
Prefetch parts: "all" = the first X MB of the weight's bytes; "tail" = the last X/size of every row; "slice" = the
last X/size of every K slice of a row (k_splits x k_warps slices: what each warp reads last; its first register
stages go out under PDL anyway).
"""
import os
import statistics
import sys
import time

import torch

import kernels as K

SHAPES = {"wo_a": (8192, 4096, "grouped"), "wo_b": (4096, 8192, "fp8"), "wq_b|iwq_b": (40960, 1024, "fp8"),
          "wq_a|wkv": (1536, 4096, "fp8")}
SMS = int(os.environ.get("L2_SMS", "132"))
CLK_GHZ = float(os.environ.get("L2_CLOCK_GHZ", "1.98"))
CHUNKS = (4096, 16384, 65536)
SWEEP = os.environ.get("L2_SWEEP") == "1"     # only the lane's prefetch sizes (chunk bytes) x CTAs
SWEEP_CFGS = ((8, 4096), (8, 65536), (32, 65536), (8, 262144))


def gemv_config(name, M=1, sms=SMS):
    N, Kd, kind = SHAPES[name]
    return (K.pick_grouped_gemv_config(N, Kd, M, 1024, sms) if kind == "grouped" else K.pick_gemv_config(N, Kd, M, sms))


def _compile_one(job):
    t = time.time()
    if job[0] == "gemv":
        K._compile_gemv(**job[1])
    elif job[0] == "pf":
        K._compile_l2_prefetch(job[1], K.L2_PREFETCH_THREADS)
    else:
        _compile_spin()
    return time.time() - t


def precompile(procs=12):
    import multiprocessing as mp
    jobs = [("spin",)] + [("pf", c) for c in CHUNKS + (262144,)]
    for name in SHAPES:
        for pdl in (False, True):
            jobs.append(("gemv", {**gemv_config(name), "pdl": pdl}))
    t = time.time()
    with mp.get_context("spawn").Pool(procs) as pool:
        secs = pool.map(_compile_one, jobs, chunksize=1)
    print(f"precompiled {len(jobs)} kernels in {time.time() - t:.1f} s (max one {max(secs):.1f} s)", flush=True)


if K.HAVE_CUTE:
    import cutlass
    import cutlass.cute as cute
    from cutlass import Int32, Int64, BFloat16
    from cutlass.cutlass_dsl import T as _T, dsl_user_op
    from cutlass._mlir.dialects import llvm as _llvm

    @dsl_user_op
    def _clock64(*, loc=None, ip=None) -> Int64:
        return Int64(_llvm.inline_asm(_T.i64(), [], "mov.u64 $0, %clock64;", "=l", has_side_effects=True,
                                      loc=loc, ip=ip))

    class SpinPred:
        """Latency-bound stand-in (like the attention before wo_a): one warp; waits for its predecessor, lets the
        next kernel launch (PDL), spins `cycles` clocks, writes x[0] = src[0] (the GEMV's wait covers this write)."""

        @cute.jit
        def __call__(self, mX: cute.Tensor, mSrc: cute.Tensor, cycles: Int32, stream):
            self.kernel(mX, mSrc, cycles).launch(grid=[1, 1, 1], block=[32, 1, 1], stream=stream, use_pdl=True)

        @cute.kernel
        def kernel(self, mX: cute.Tensor, mSrc: cute.Tensor, cycles: Int32):
            tidx, _, _ = cute.arch.thread_idx()
            cute.arch.griddepcontrol_wait()
            cute.arch.griddepcontrol_launch_dependents()
            t0 = _clock64()
            now = _clock64()
            while now - t0 < Int64(cycles):
                now = _clock64()
            if tidx == 0:
                mX[0] = mSrc[0]

    def _compile_spin():
        def build():
            mk = cute.runtime.make_fake_compact_tensor
            return SpinPred(), (mk(BFloat16, (cute.sym_int(),), assumed_align=16),
                                mk(BFloat16, (cute.sym_int(),), assumed_align=16), Int32(1000),
                                cute.runtime.make_fake_stream(use_tvm_ffi_env_stream=True))
        return K._load_or_compile(("l2lane_spin", 1), build)


def _median_times(graphs, copies, rounds=7, iters=6):
    times = {k: [] for k in graphs}
    for _ in range(rounds):
        for k, g in graphs.items():
            g.replay()
            torch.cuda.synchronize()
            t0 = torch.cuda.Event(enable_timing=True)
            t1 = torch.cuda.Event(enable_timing=True)
            t0.record()
            for _ in range(iters):
                g.replay()
            t1.record()
            torch.cuda.synchronize()
            times[k].append(t0.elapsed_time(t1) * 1e3 / iters / copies)
    return {k: statistics.median(v) for k, v in times.items()}


def run(names, M=1):
    from bench import copy_bandwidth, graph_of
    dev = "cuda"
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    bw = copy_bandwidth(dev)
    l2 = getattr(torch.cuda.get_device_properties(dev), "L2_cache_size", 0)
    print(f"{torch.cuda.get_device_name(dev)} ({sms} SMs, L2 {l2 / 2**20:.0f} MiB), copy {bw / 1e12:.2f} TB/s; "
          f"us per call, graph replays on rotating weights, medians of 7 interleaved rounds", flush=True)
    spin = _compile_spin()
    g = torch.Generator(device=dev).manual_seed(0)
    side = torch.cuda.Stream()
    for name in names:
        N, Kd, kind = SHAPES[name]
        wbytes = N * Kd
        mb = wbytes / 2**20
        copies = max(4, -(-(200 << 20) // wbytes))
        ws = []
        for _ in range(copies):
            c = torch.randint(0, 256, (N, Kd), dtype=torch.uint8, device=dev, generator=g)
            c[(c & 0x7F) == 0x7F] = 0x3F
            sc = torch.randint(118, 126, (-(-N // 128), Kd // 128), dtype=torch.uint8, device=dev, generator=g)
            ws.append((c.view(torch.float8_e4m3fn), sc.view(torch.float8_e8m0fnu)))
        x = torch.randn(*((M, 8, Kd) if kind == "grouped" else (M, Kd)), device=dev, generator=g).to(torch.bfloat16)
        xsrc = x.reshape(-1).clone()
        call = K.fp8_gemv_grouped if kind == "grouped" else K.fp8_gemv
        cfg = {**gemv_config(name, M, sms), "pdl": True}
        ref = call(x, *ws[0], config=cfg).clone()

        def gemv(i):
            return call(x, *ws[i], config=cfg)

        def sp(us):
            spin(x.view(-1), xsrc, int(us * CLK_GHZ * 1e3))

        views = {}
        pieces = cfg["k_splits"] * cfg.get("k_warps", 1)     # the K slices of the GEMV's warps
        for part in ("all", "tail", "slice"):
            for want in (8, 16, 24, 32, mb):
                if want > mb + 1e-6 or (part != "all" and want == mb) or (part == "slice" and pieces == 1):
                    continue
                views[(part, want)] = [K.l2_prefetch_view(w[0], min(1.0, want / mb), "tail" if part == "slice"
                                                          else part, pieces if part == "slice" else 1) for w in ws]
        graphs = {} if SWEEP else {("spin", 20): graph_of(lambda: [sp(20) for _ in range(copies)]),
                                   ("cold", 20): graph_of(lambda: [(sp(20), gemv(i)) for i in range(copies)])}
        bits = []
        for key, vs in (() if SWEEP else views.items()):
            graphs[("pf+spin",) + key] = graph_of(lambda vs=vs: [(K.l2_prefetch(vs[i]), sp(20)) for i in range(copies)])
            graphs[("warm",) + key] = graph_of(lambda vs=vs: [(K.l2_prefetch(vs[i]), sp(20), gemv(i))
                                                             for i in range(copies)])
        if not SWEEP:  # landed by 20 us? the same with a 40-us spin
            vs = views[("all", mb)]
            graphs[("spin", 40)] = graph_of(lambda: [sp(40) for _ in range(copies)])
            graphs[("pf+spin40",)] = graph_of(lambda: [(K.l2_prefetch(vs[i]), sp(40)) for i in range(copies)])
            graphs[("warm40",)] = graph_of(lambda: [(K.l2_prefetch(vs[i]), sp(40), gemv(i)) for i in range(copies)])
        out = gemv(0)
        K.l2_prefetch(views[("all", mb)][0])
        bits.append(torch.equal(gemv(0), ref) and torch.equal(out, ref))

        def lane(us, vs, ctas=None, chunk=None):
            def body():
                main = torch.cuda.current_stream()
                for i in range(copies):
                    side.wait_stream(main)
                    with torch.cuda.stream(side):
                        if vs is not None:
                            K.l2_prefetch(vs[i], ctas=ctas, chunk=chunk)
                    sp(us)
                    gemv(i)
                    main.wait_stream(side)
            return body

        lanes = []
        if SWEEP:      # separate process: a bulk-prefetch size the hardware refuses must not take the main table down
            graphs = {}
            for us in (6,):
                graphs[("spin", us)] = graph_of(lambda us=us: [sp(us) for _ in range(copies)])
                graphs[("pair", us)] = graph_of(lambda us=us: [(sp(us), gemv(i)) for i in range(copies)])
            for ctas, chunk in SWEEP_CFGS:
                graphs[("lanecfg", ctas, chunk)] = graph_of(lane(6, views[("all", mb)], ctas, chunk))
            t = _median_times(graphs, copies)
            print(f"{name}: spin 6 us, exp no lane {t[('pair', 6)] - t[('spin', 6)]:.2f}; full lane, ctas x chunk: " +
                  ", ".join(f"{c}x{k >> 10}K {t[('lanecfg', c, k)] - t[('spin', 6)]:.2f}" for c, k in SWEEP_CFGS),
                  flush=True)
            continue
        for us in (3, 6, 10):
            graphs[("spin", us)] = graph_of(lambda us=us: [sp(us) for _ in range(copies)])
            graphs[("pair", us)] = graph_of(lambda us=us: [(sp(us), gemv(i)) for i in range(copies)])
            graphs[("lane0", us)] = graph_of(lane(us, None))
            for key in (("all", mb), ("tail", 16), ("slice", 16), ("all", 16)):
                if key in views:
                    graphs[("lane", us) + key] = graph_of(lane(us, views[key]))
                    lanes.append((us,) + key)
        for ctas in (4, 16, 32):
            graphs[("lanecfg", ctas, 16384)] = graph_of(lane(6, views[("all", mb)], ctas, 16384))
        graphs[("pfonly",)] = graph_of(lambda: [K.l2_prefetch(views[("all", mb)][i]) for i in range(copies)])
        t = _median_times(graphs, copies)
        floor = wbytes / bw * 1e6
        cold = t[("cold", 20)] - t[("spin", 20)]
        print(f"\n{name} M={M} {wbytes / 1e6:.1f} MB (copy floor {floor:.2f} us), {copies} copies, {pieces} K slices "
              f"per row; bits with a "
              f"prefetch before: {'same' if all(bits) else 'DIFF'}; prefetch kernel alone (issue only, "
              f"{K.L2_PREFETCH_CTAS} CTAs x {K.L2_PREFETCH_CHUNK >> 10} KB) {t[('pfonly',)]:.2f}", flush=True)
        print(f"  (a) cold behind 20-us spin: {cold:.2f}")
        for key in views:
            w = t[("warm",) + key] - t[("pf+spin",) + key]
            print(f"  (b) warm {key[0]:>4} {key[1]:5.1f} MB: {w:6.2f}  ({w - cold:+.2f} vs cold; pf+spin "
                  f"{t[('pf+spin',) + key]:.2f} vs spin {t[('spin', 20)]:.2f})")
        print(f"  (b) warm  all {mb:5.1f} MB behind a 40-us spin: {t[('warm40',)] - t[('pf+spin40',)]:6.2f}")
        for us in (3, 6, 10):
            base = t[("pair", us)] - t[("spin", us)]
            line = (f"  (c) spin {us:>2} us ({t[('spin', us)]:.2f}): exp no lane {base:.2f}, empty lane "
                    f"{t[('lane0', us)] - t[('spin', us)]:.2f}")
            for lk in lanes:
                if lk[0] == us:
                    line += f", {lk[1]} {lk[2]:.0f}MB {t[('lane',) + lk] - t[('spin', us)]:.2f}"
            print(line)
        print("  (c) spin 6, full lane, ctas x 16K: " + ", ".join(
            f"{c} {t[('lanecfg', c, 16384)] - t[('spin', 6)]:.2f}" for c in (4, 16, 32)), flush=True)
        del graphs, ws, views
        torch.cuda.empty_cache()


if __name__ == "__main__":
    args = sys.argv[1:]
    if args and args[0] == "precompile":
        if not K.HAVE_CUTE:
            print("precompile: no CuTe DSL, skipped")
        else:
            precompile()
    elif not (torch.cuda.is_available() and K.HAVE_CUTE):
        print("l2lane timings: no CUDA GPU / CuTe DSL, skipped")
    else:
        run(args or list(SHAPES))
