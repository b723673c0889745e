"""`python bench.py decode` (to be merged into bench.py): decode of a Flash-dims layer stack on one GPU.

A DeepSeek-V4-Flash config cut to N layers (alternating CSA / HCA like layers 2..42, the first one hash-routed), random
weights in the real formats (FP8 e4m3 linears with e8m0 128x128 scales, NVFP4 routed experts, bf16 / fp32 where the
model keeps them), made directly on the GPU: a Flash-dims checkpoint on disk would be tens of GB per few layers.
Measures batch-1 and batch-8 decode steps, eager and as a CUDA graph, against the byte floor of the same step (every
weight byte the step reads, the touched experts only, plus the KV state it reads, over the device-to-device copy
bandwidth measured in the same run), and projects the 43-layer model.
"""
import argparse
import math
import statistics
import sys
import time

import torch
import torch.nn as nn

import dsv4
import kernels

FLASH_LAYERS = 43


def stack_config(n_layers: int) -> dsv4.ModelConfig:
    ratios = [4, 128] * (n_layers // 2) + [4] * (n_layers % 2)
    return dsv4.ModelConfig(num_hidden_layers=n_layers, compress_ratios=ratios + [0], num_hash_layers=1)


def random_experts(cfg, device, g) -> kernels.Experts:
    """NVFP4 experts like a ModelOpt checkpoint's: random e2m1 codes, e4m3 block scales 2^-3..2^3, per-expert alphas
    that keep the projections' outputs O(1); repacked for the kernel, then (if the kernel runs here) the raw copy is
    dropped: the kernel reads only the packed one."""
    E, I, D = cfg.n_routed_experts, cfg.moe_intermediate_size, cfg.hidden_size

    def codes(*shape):
        return torch.randint(0, 256, shape, generator=g, device=device, dtype=torch.uint8).view(torch.float4_e2m1fn_x2)

    def scales(*shape):
        return torch.exp2(torch.randint(-3, 4, shape, generator=g, device=device).float()).to(torch.float8_e4m3fn)

    alpha = lambda k: (1 + torch.rand(E, generator=g, device=device)) / (15 * k ** 0.5)   # |code x scale| ~ 10
    ex = kernels.Experts("nvfp4", codes(E, 2 * I, D // 2), scales(E, 2 * I, D // 16), codes(E, D, I // 2),
                         scales(E, D, I // 16), alpha(D), alpha(D), alpha(I))
    ex = kernels.prepare_experts(ex)
    if kernels.kernel_unavailable_reason(torch.empty(1, D, device=device, dtype=torch.bfloat16), ex) is None:
        ex.w13, ex.w2 = ex.w13[:1].clone(), ex.w2[:1].clone()
        ex.w13_scale, ex.w2_scale = ex.w13_scale[:1].clone(), ex.w2_scale[:1].clone()
    return ex


def random_model(cfg, device, max_batch_size: int, max_seq_len: int, seed: int = 0) -> dsv4.Transformer:
    """dsv4.Transformer with random weights in load_model's dtypes, built on the meta device and filled on `device`."""
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.device("meta"):
        model = dsv4.Transformer(cfg)
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
            t = torch.rand(shape[0], cfg.n_routed_experts, generator=g, device=device).argsort(-1)[:, :shape[1]]
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
    for layer in model.layers:
        layer.ffn.experts = random_experts(cfg, device, g)
    for name, buf in list(model.named_buffers()):
        mod_name, _, attr = name.rpartition(".")
        model.get_submodule(mod_name).register_buffer(attr, dsv4.hadamard_matrix(buf.shape[0]).to(device),
                                                      persistent=False)
    model.setup_cache(max_batch_size, max_seq_len)
    for m in model.modules():                                 # decode state: random, as after a long prompt
        if isinstance(m, dsv4.Attention):
            m.kv_window.normal_(generator=g)
        elif isinstance(m, dsv4.Compressor):
            m.kv_cache.normal_(generator=g)
            m.kv_state.normal_(generator=g)
            m.score_state.normal_(generator=g)
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
        n += nbytes(a.kv_window[:B])
        for c in (a.compressor, a.indexer and a.indexer.compressor):
            if c is not None:       # the live entries, the open block's state
                n += B * (pos // c.ratio + 1) * c.dim * c.kv_cache.element_size()
                n += nbytes(c.kv_state[:B]) + nbytes(c.score_state[:B])
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
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def graph_of(fn) -> torch.cuda.CUDAGraph:
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
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
    top = sorted(by_name.items(), key=lambda kv: -kv[1][1])[:12]
    return len(kernels_), heavy, total - heavy, top


def fp8_linear_table(model, copy_bw):
    """Each FP8 linear shape of a layer at M = 1, as a graph of 20 calls: us, floor us (weight + scale bytes)."""
    layer = model.layers[0]
    rows = []
    for name in ("attn.wq_a", "attn.wq_b", "attn.wkv", "attn.wo_b", "attn.indexer.wq_b", "ffn.shared_experts.w1",
                 "ffn.shared_experts.w2"):
        lin = layer.get_submodule(name)
        x = torch.randn(1, lin.in_features, device="cuda", dtype=torch.bfloat16)
        g = graph_of(lambda: [lin(x) for _ in range(20)])
        us = time_ms(g.replay, 20) / 20 * 1e3
        floor = (nbytes(lin.weight) + nbytes(lin.scale)) / copy_bw * 1e6
        rows.append((name, lin.out_features, lin.in_features, us, floor))
    return rows


@torch.inference_mode()
def bench_decode(args):
    dev = torch.device("cuda")
    name = torch.cuda.get_device_name(dev)
    t_start = time.time()
    copy_bw = copy_bandwidth(dev)
    cfg = stack_config(args.layers)
    model = random_model(cfg, dev, max(args.batches), args.max_seq_len)
    torch.cuda.synchronize()
    print(f"built {args.layers} Flash-dims layers on {name} in {time.time() - t_start:.0f} s "
          f"({torch.cuda.memory_allocated() / 2**30:.1f} GiB); fp4 MoE kernel: "
          f"{kernels.kernel_unavailable_reason(torch.empty(1, device=dev, dtype=torch.bfloat16), model.layers[0].ffn.experts) or 'yes'}; "
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
        graph = model.decode_graphs[B]
        graph_ms = time_ms(graph.graph.replay, args.iters)
        eager = model.logits(tokens, pos_t)                 # same position, same state: replays must give the same
        graph.graph.replay()
        torch.cuda.synchronize()
        graph_err = ((graph.logits - eager).norm() / eager.norm()).item()
        assert torch.isfinite(eager).all() and graph_err <= 1e-3, f"graph replay != eager step: rel err {graph_err}"
        h = torch.randn(B, 1, cfg.hc_mult, cfg.hidden_size, device=dev, dtype=torch.bfloat16)

        def tail():
            x = dsv4.hc_head(h, model.hc_head_fn, model.hc_head_scale, model.hc_head_base, cfg.hc_eps, cfg.rms_norm_eps)
            return dsv4.head_logits(model.norm(x), model.head.weight)
        tail_ms = time_ms(graph_of(tail).replay, args.iters)
        layers_b, tail_b, embed_b = step_bytes(model, B, pos, touched)
        layer_ms = (graph_ms - tail_ms) / args.layers
        floor_layer_ms = sum(layers_b) / args.layers / copy_bw * 1e3
        floor_tail_ms = tail_b / copy_bw * 1e3
        full_ms = FLASH_LAYERS * layer_ms + tail_ms
        full_floor_ms = FLASH_LAYERS * floor_layer_ms + floor_tail_ms
        n_k, heavy_us, small_us, top = kernel_profile(graph.graph.replay, args.layers)
        results.append(dict(B=B, eager_ms=eager_ms, graph_ms=graph_ms, tail_ms=tail_ms, layer_ms=layer_ms,
                            floor_layer_ms=floor_layer_ms, layer_mb=sum(layers_b) / args.layers / 1e6,
                            full_ms=full_ms, full_floor_ms=full_floor_ms, touched=statistics.mean(touched),
                            kernels=n_k, heavy_us=heavy_us, small_us=small_us, top=top, tail_floor_ms=floor_tail_ms,
                            tokens=tokens, reference=reference))
        print(f"B={B}: eager {eager_ms:.2f} ms, graph {graph_ms:.2f} ms (vs eager step: rel err {graph_err:.1e}), "
              f"tail {tail_ms:.3f} ms; "
              f"{n_k} kernels/step, GEMM-class {heavy_us / 1e3:.2f} ms, others {small_us / 1e3:.2f} ms", flush=True)
        for k, (cnt, us) in top:
            print(f"   {cnt:5d} x {us / max(cnt, 1):8.1f} us = {us / 1e3:7.3f} ms  {k}")
    lin_rows = fp8_linear_table(model, copy_bw)
    if args.compile:
        compile_experiment(model, args, results)

    print(f"\nFP8 linears at M=1 on {name} (blockwise scaled_mm; graph of 20 calls)")
    print(f"{'linear':<24} {'N':>6} {'K':>6} {'us':>7} {'floor us':>8} {'%floor':>6}")
    for n, N, K, us, fl in lin_rows:
        print(f"{n:<24} {N:>6} {K:>6} {us:>7.1f} {fl:>8.1f} {100 * fl / us:>6.1f}")
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
        if "compiled_ms" in r:
            layer_ms = (r["compiled_ms"] - r["tail_ms"]) / args.layers
            full_ms = FLASH_LAYERS * layer_ms + r["tail_ms"]
            print(f"B={r['B']} with torch.compile'd helpers (experiment): {layer_ms:.3f} ms/layer, "
                  f"{100 * r['floor_layer_ms'] / layer_ms:.1f}% of floor, {r['compiled_kernels'] / args.layers:.0f} "
                  f"kernels/layer, 43 layers {full_ms:.2f} ms = {1e3 * r['B'] / full_ms:.1f} tok/s")
    return results


def compile_experiment(model, args, results):
    """What fusing the launch-heavy elementwise chains would buy: the same graph step with torch.compile (Inductor)
    on dsv4's pure helpers (mHC pre/post with the Sinkhorn loop, activation FP8 quant, RoPE). Not the product path."""
    names = ("hc_pre", "hc_post", "act_quant_fp8", "apply_rope")
    originals = {n: getattr(dsv4, n) for n in names}
    pos_t = torch.tensor([args.pos], device="cuda")
    try:
        for n in names:
            setattr(dsv4, n, torch.compile(originals[n]))
        for r in results:
            B, t0 = r["B"], time.time()
            model.decode_graphs.clear()
            model.decode(r["tokens"], args.pos)                                   # eager step (compiles) + capture
            compile_s = time.time() - t0
            g = model.decode_graphs[B]
            ms = time_ms(g.graph.replay, args.iters)
            err = ((g.logits - r["reference"]).norm() / r["reference"].norm()).item()
            n_k = kernel_profile(g.graph.replay, args.layers)[0]
            r.update(compiled_ms=ms, compiled_kernels=n_k)
            print(f"B={B} with compiled helpers: graph {ms:.2f} ms ({r['graph_ms'] / ms:.2f}x), {n_k} kernels/step, "
                  f"logits vs uncompiled rel err {err:.1e}, compile+capture {compile_s:.0f} s", flush=True)
    except Exception as e:   # noqa: BLE001 - an experiment: report and go on
        print(f"compile experiment failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
    finally:
        for n, f in originals.items():
            setattr(dsv4, n, f)
        model.decode_graphs.clear()


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--pos", type=int, default=1000, help="context position of the timed step")
    p.add_argument("--max-seq-len", type=int, default=4096)
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--eager-iters", type=int, default=5)
    p.add_argument("--compile", action="store_true", help="also time the graph with torch.compile'd helpers")
    return p.parse_args(argv)


if __name__ == "__main__":
    if not torch.cuda.is_available():
        print("bench decode needs a CUDA GPU", file=sys.stderr)
        sys.exit(2)
    bench_decode(parse_args())
