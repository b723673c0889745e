"""Fold probe (session 8, helper l2lane; not product code): what folding the CSA layer's IndexQuery into IndexerTopK
could gain at most, at Flash dims, batch 1, pos 1000 (250 visible blocks of a 1024-slot key cache).

Chains as CUDA-graph replays (16 steps per graph, medians of 7 interleaved rounds), every launch as in the decode step
(PDL on): A = iwq_b GEMV -> IndexQuery -> IndexerTopK (main); B = iwq_b GEMV -> IndexerTopK on ready queries (what a
free fold would leave); the difference is the most a fold can save. Also the IndexQuery's work: 64 head rows of
RoPE + a 128 x 128 fp32 Hadamard as an in-order fma chain (the reference's bits) = 1.05 M FMA per token, which a fold
would move from IndexQuery's 16 CTAs into the TopK cluster's CTAs; timed here as IndexQuery launches over 64 rows
(16 CTAs) and over 4 rows (1 CTA, 1 row per warp), and 8 back-to-back 4-row launches (the serial rows one warp of a
folded CTA would run)."""
import statistics
import sys

import torch

import dsv4
import kernels as K


def main():
    from bench import copy_bandwidth, graph_of
    dev = "cuda"
    cfg = dsv4.ModelConfig()
    nh, hd, topk, qr_dim = cfg.index_n_heads, cfg.index_head_dim, cfg.index_topk, cfg.q_lora_rank
    print(f"{torch.cuda.get_device_name(dev)}, copy {copy_bandwidth(dev) / 1e12:.2f} TB/s; IndexQuery fold probe "
          f"(nh {nh}, hd {hd}, topk {topk}), us per step", flush=True)
    g = torch.Generator(device=dev).manual_seed(0)
    angles = dsv4.rope_freqs(cfg, True, 4096).to(dev)
    pos = torch.tensor([1000], device=dev)
    qr = torch.randn(1, 1, qr_dim, device=dev, generator=g).to(torch.bfloat16)
    w8 = torch.randint(0, 256, (nh * hd, qr_dim), dtype=torch.uint8, device=dev, generator=g)
    w8[(w8 & 0x7F) == 0x7F] = 0x3F
    w = w8.view(torch.float8_e4m3fn)
    sc = torch.randint(118, 126, (nh * hd // 128, qr_dim // 128), dtype=torch.uint8, device=dev,
                       generator=g).view(torch.float8_e8m0fnu)
    keys = torch.randn(1, 1024, hd, device=dev, generator=g).to(torch.bfloat16)
    head_w = torch.randn(1, 1, nh, device=dev, generator=g).to(torch.bfloat16)
    wscale = hd ** -0.5 * nh ** -0.5
    iq = K.fp8_gemv(qr, w, sc).unflatten(-1, (nh, hd))
    q_ready = K.index_query_fused(iq, angles, pos, True)
    ref = K.indexer_topk_decode(q_ready, keys, head_w, pos, topk, weight_scale=wscale)
    rows4 = iq.reshape(-1, hd)[:4].clone()

    def chain_a():
        q = K.index_query_fused(K.fp8_gemv(qr, w, sc).unflatten(-1, (nh, hd)), angles, pos, True)
        return K.indexer_topk_decode(q, keys, head_w, pos, topk, weight_scale=wscale)

    def chain_c():                       # the fold: one IndexerTopKQuery launch after the GEMV
        iq_ = K.fp8_gemv(qr, w, sc).unflatten(-1, (nh, hd))
        return K.indexer_query_topk_decode(iq_, angles, pos, True, keys, head_w, topk, weight_scale=wscale)

    def chain_b():
        K.fp8_gemv(qr, w, sc)
        return K.indexer_topk_decode(q_ready, keys, head_w, pos, topk, weight_scale=wscale)

    same = torch.equal(chain_a(), ref) and torch.equal(chain_b(), ref)
    K.INDEX_FOLD_QUERY = True
    same_fold = torch.equal(chain_c(), ref)
    K.INDEX_FOLD_EARLY_KEYS = True
    same_fold = same_fold and torch.equal(chain_c(), ref)
    K.INDEX_FOLD_EARLY_KEYS = False
    steps = 16
    graphs = {
        "A: GEMV -> IndexQuery -> TopK": graph_of(lambda: [chain_a() for _ in range(steps)]),
        "B: GEMV -> TopK (query free)": graph_of(lambda: [chain_b() for _ in range(steps)]),
        "C: GEMV -> TopK with the query (fold)": graph_of(lambda: [chain_c() for _ in range(steps)]),
        "D: C + key copies before the wait": graph_of(lambda: [(setattr(K, "INDEX_FOLD_EARLY_KEYS", True), chain_c(),
                                                               setattr(K, "INDEX_FOLD_EARLY_KEYS", False))[1]
                                                              for _ in range(steps)]),
        "GEMV alone": graph_of(lambda: [K.fp8_gemv(qr, w, sc) for _ in range(steps)]),
        "TopK alone": graph_of(lambda: [K.indexer_topk_decode(q_ready, keys, head_w, pos, topk, weight_scale=wscale)
                                        for _ in range(steps)]),
        "IndexQuery 64 rows (16 CTAs)": graph_of(lambda: [K.index_query_fused(iq, angles, pos, True)
                                                          for _ in range(steps)]),
        "IndexQuery 4 rows (1 CTA)": graph_of(lambda: [K.index_query_fused(rows4, angles, pos, True)
                                                       for _ in range(steps)]),
        "TopK with the query (fold) alone": graph_of(lambda: [K.indexer_query_topk_decode(
            iq, angles, pos, True, keys, head_w, topk, weight_scale=wscale) for _ in range(steps)]),
    }
    K.INDEX_FOLD_QUERY = False
    times = {k: [] for k in graphs}
    for _ in range(7):
        for k, gr in graphs.items():
            gr.replay()
            torch.cuda.synchronize()
            t0, t1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            t0.record()
            for _ in range(20):
                gr.replay()
            t1.record()
            torch.cuda.synchronize()
            times[k].append(t0.elapsed_time(t1) * 1e3 / 20 / steps)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"  chain outputs = the eager top-k: {'same' if same else 'DIFF'}; fold: {'same' if same_fold else 'DIFF'}")
    for k, v in med.items():
        print(f"  {k:<34} {v:7.2f}")
    a, b, c = (med[k] for k in list(med)[:3])
    d = med["D: C + key copies before the wait"]
    print(f"  most a fold can save (A - B): {a - b:.2f} us per CSA layer; the fold saves (A - C): {a - c:.2f}, "
          f"with early keys (A - D): {a - d:.2f}", flush=True)


def _compile_one(job):
    name, a = job
    getattr(K, name)(*a)


def precompile(procs=10):
    """The fold test's and this probe's CuTe configs (cluster top-k with/without the query, IndexQuery), in parallel."""
    import multiprocessing as mp
    import time
    jobs = []
    for cl in (8, 3, 2):
        slots = K.fused_topk_slots(cl * 128)
        jobs.append(("_compile_indexer_topk", (64, 128, slots, 128, True, cl)))
        for qs in (True, False):
            for early in (False, True):
                jobs.append(("_compile_indexer_topk_query",
                             (64, 128, slots, 128, True, cl, 64, qs, K.HADAMARD_MODE, early)))
    for qs in (True, False):
        jobs.append(("_compile_index_query", (128, 64, qs, True, K.HADAMARD_MODE)))
    t = time.time()
    with mp.get_context("spawn").Pool(procs) as pool:
        pool.map(_compile_one, jobs, chunksize=1)
    print(f"fold probe: precompiled {len(jobs)} configs in {time.time() - t:.1f} s", flush=True)


if __name__ == "__main__":
    if sys.argv[1:] == ["precompile"]:
        if K.HAVE_CUTE:
            precompile()
    elif not (torch.cuda.is_available() and K.HAVE_CUTE):
        print("fold probe: no CUDA GPU / CuTe DSL, skipped")
    else:
        main()
