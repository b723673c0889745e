"""2-GPU check of tensor + expert parallelism on a reduced-layer checkpoint of real Flash dimensions (NVFP4).

  python _wip_dist_gpu.py write DIR [--small]        random NVFP4 checkpoint, generated on the GPU (fast)
  python _wip_dist_gpu.py run DIR OUT.pt             one process (or under torchrun: every rank; rank 0 saves)
  python _wip_dist_gpu.py compare ONE.pt TWO.pt      logits agreement + decode ms/token, 1 vs N GPUs
"""
import gc
import json
import math
import os
import sys
import time

import torch

import dsv4
import weights

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


def run(path: str, out: str):
    par, dev = dsv4.init_distributed("auto")
    say = print if par.rank == 0 else (lambda *a, **k: None)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    t0 = time.time()
    model = dsv4.load_model(path, device=dev, dtype=dtype, max_seq_len=PROMPT + DECODE + GREEDY, log=say)
    sync()
    cfg = model.cfg
    res = {"ranks": par.size, "load_s": time.time() - t0, "device": torch.cuda.get_device_name(dev)
           if dev.type == "cuda" else "cpu"}
    if dev.type == "cuda":
        import kernels
        e = model.layers[0].ffn.experts
        res["moe"] = kernels.kernel_unavailable_reason(torch.empty(1, cfg.hidden_size, dtype=dtype, device=dev), e) \
            or "CuTe DSL kernel"
        res["allocated_GiB"] = torch.cuda.memory_allocated(dev) / 2**30
        plan = dsv4.memory_plan(cfg, par, "nvfp4", dtype, model.max_seq_len, 1, repack=e.packed is not None)
        res["planned_GiB"] = sum(plan.values()) / 2**30
    say(f"rank 0 of {par.size}: loaded in {res['load_s']:.1f} s", {k: v for k, v in res.items() if k != "load_s"})
    tokens = torch.randint(0, cfg.vocab_size, (1, PROMPT + DECODE), generator=torch.Generator().manual_seed(1)).to(dev)
    pre, dec, res["eager_ms"] = timed_decode(model, tokens, sync, graph=False)
    res["prefill"], res["decode"] = pre.float().cpu(), dec.float().cpu()
    say(f"eager decode {res['eager_ms']:.2f} ms/token")
    if par.rank == 0:
        torch.save(res, out)                                 # in case the graph capture takes the process down
    try:
        _, dec_g, res["graph_ms"] = timed_decode(model, tokens, sync, graph=True)
        res["graph_vs_eager"] = ((dec_g.float() - dec.float()).norm() / dec.float().norm()).item()
        say(f"graph decode {res['graph_ms']:.2f} ms/token (rel diff to eager {res['graph_vs_eager']:.1e})")
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


def compare(one_path: str, two_path: str):
    one, two = torch.load(one_path), torch.load(two_path)
    for key in ("prefill", "decode"):
        a, b = two[key], one[key]
        per = ((a - b).norm(dim=-1) / b.norm(dim=-1)).flatten()
        top1 = (a.argmax(-1) == b.argmax(-1)).float().mean().item()
        print(f"{key}: rel err {((a - b).norm() / b.norm()).item():.2e}, per position median {per.median():.2e} max "
              f"{per.max():.2e}, top-1 agreement {top1:.3f}")
    g1, g2 = one.get("greedy"), two.get("greedy")
    if g1 and g2:
        print(f"greedy: {sum(x == y for x, y in zip(g1, g2))}/{len(g1)} tokens equal; first divergence at "
              f"{next((i for i, (x, y) in enumerate(zip(g1, g2)) if x != y), None)}")
    for r in (one, two):
        print(f"{r['ranks']} x {r['device']}: MoE {r.get('moe')}, load {r['load_s']:.1f} s, allocated "
              f"{r.get('allocated_GiB', 0):.2f} GiB/GPU (planned {r.get('planned_GiB', 0):.2f}), decode ms/token: "
              f"eager {r['eager_ms']:.2f}, graph {r.get('graph_ms', float('nan')):.2f} {r.get('graph_error', '')}")


if __name__ == "__main__":
    cmd = sys.argv[1]
    if cmd == "write":
        write(sys.argv[2], "--small" in sys.argv)
    elif cmd == "run":
        run(sys.argv[2], sys.argv[3])
    else:
        compare(sys.argv[2], sys.argv[3])
