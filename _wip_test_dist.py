"""Tensor + expert parallel inference over torch.distributed: 2 CPU ranks (gloo) must reproduce one process."""
import json
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import dsv4
import weights

# Every layer kind (window, CSA + indexer, HCA), hash + biased routing. Heads, o_groups, experts and the vocab split in
# two; moe_intermediate_size 256 splits the shared expert into whole 128-blocks, 128 keeps it replicated.
DIST = dict(vocab_size=512, hidden_size=256, num_hidden_layers=4, num_attention_heads=4, head_dim=128,
            qk_rope_head_dim=64, q_lora_rank=128, o_groups=2, o_lora_rank=128, moe_intermediate_size=256,
            n_routed_experts=8, num_experts_per_tok=2, num_hash_layers=1, index_n_heads=4, index_head_dim=128,
            index_topk=8, sliding_window=128, compress_ratios=[0, 4, 128, 4], max_position_embeddings=4096)
CASES = {"fp8": ("fp8", {}), "nvfp4": ("nvfp4", {}), "bf16": ("bf16", {}),
         "fp8-shared-replicated": ("fp8", {"moe_intermediate_size": 128})}
PROMPT, DECODE, GREEDY, MAX_SEQ = 133, 4, 6, 160     # 133 > 128: one HCA block and a full window ring


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tokens_for(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (2, PROMPT + DECODE), generator=torch.Generator().manual_seed(7))


def run_model(model, tokens, quant_sim: bool) -> dict:
    """Prefill logits of the prompt, logits of DECODE one-token steps after it, and GREEDY argmax tokens."""
    model.set_quant_sim(quant_sim)
    prefill = model(tokens[:, :PROMPT])
    decode = torch.cat([model(tokens[:, p:p + 1], p) for p in range(PROMPT, PROMPT + DECODE)], 1)
    nxt, greedy = model(tokens[:1, :PROMPT])[:, -1].argmax(-1), []
    for i in range(GREEDY):
        greedy.append(int(nxt))
        nxt = model(nxt.view(1, 1), PROMPT + i)[:, -1].argmax(-1)
    return {"prefill": prefill, "decode": decode, "greedy": greedy}


def held_bytes(model) -> tuple[int, int]:
    """(dense, experts): bytes a loaded model holds in parameters and in routed experts (every field, the kernel's
    repack included; tensors left on the meta device hold nothing)."""
    dense = sum(p.numel() * p.element_size() for p in model.parameters())
    experts = 0
    for layer in model.layers:
        e = layer.ffn.experts
        ts = [v for v in vars(e).values() if isinstance(v, torch.Tensor)]
        ts += [v for v in vars(e.packed).values() if isinstance(v, torch.Tensor)] if e.packed is not None else []
        experts += sum(t.numel() * t.element_size() for t in ts if t.device.type != "meta")
    return dense, experts


def _worker(rank: int, world: int, port: int, jobs: list, out: str):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    par, device = dsv4.init_distributed("cpu")
    assert (par.size, par.rank, device.type) == (world, rank, "cpu") and dist.get_backend() == "gloo"
    results = {}
    for name, path, vocab in jobs:
        model = dsv4.load_model(path, dtype=torch.float32, max_seq_len=MAX_SEQ, max_batch_size=2)
        tokens = tokens_for(vocab)
        results[name] = {q: run_model(model, tokens, q) for q in (False, True)}
        results[name]["bytes"] = (*held_bytes(model), model.cache_bytes())
        results[name]["local_experts"] = model.layers[0].ffn.experts.num_experts
        results[name]["expert_offset"] = model.layers[0].ffn.expert_offset
    results["broadcast"] = [dsv4.broadcast_ids([1000 + rank, 7], par, device), dsv4.broadcast_ids(None, par, device)]
    torch.save(results, f"{out}.{rank}")
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    out = {}
    for name, (fmt, over) in CASES.items():
        cfg = dsv4.ModelConfig.from_dict({**DIST, **over})
        out[name] = (str(weights.write_checkpoint(str(root / name), cfg, fmt, seed=3)), cfg, fmt)
    return out


@pytest.fixture(scope="module")
def two_ranks(checkpoints, tmp_path_factory):
    """Results of both ranks of one 2-process gloo run over every checkpoint."""
    out = str(tmp_path_factory.mktemp("ranks") / "result")
    jobs = [(name, path, cfg.vocab_size) for name, (path, cfg, _) in checkpoints.items()]
    mp.start_processes(_worker, args=(2, free_port(), jobs, out), nprocs=2, join=True, start_method="spawn")
    return [torch.load(f"{out}.{r}") for r in range(2)]


@pytest.fixture(scope="module")
def one_rank(checkpoints):
    torch.set_num_threads(1)
    res = {}
    for name, (path, cfg, _) in checkpoints.items():
        model = dsv4.load_model(path, dtype=torch.float32, max_seq_len=MAX_SEQ, max_batch_size=2)
        res[name] = {q: run_model(model, tokens_for(cfg.vocab_size), q) for q in (False, True)}
    return res


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("case", list(CASES))
def test_two_ranks_reproduce_one_process_logits_and_greedy_tokens(two_ranks, one_rank, case):
    ref = one_rank[case][False]
    for r in range(2):
        got = two_ranks[r][case][False]
        assert rel(got["prefill"], ref["prefill"]) <= 1e-5, (r, rel(got["prefill"], ref["prefill"]))
        assert rel(got["decode"], ref["decode"]) <= 1e-5, (r, rel(got["decode"], ref["decode"]))
        assert got["greedy"] == ref["greedy"]
    assert torch.equal(two_ranks[0][case][False]["prefill"], two_ranks[1][case][False]["prefill"])


@pytest.mark.parametrize("case", list(CASES))
def test_two_ranks_match_one_process_with_the_fp8_fp4_rounding_sims(two_ranks, one_rank, case):
    # Summation order differs (row-parallel all-reduces), so a rare activation sits on the other side of an FP8/FP4
    # rounding step; the typical position must still agree to fp32 noise.
    ref = one_rank[case][True]
    got = two_ranks[0][case][True]
    for key in ("prefill", "decode"):
        per_pos = ((got[key] - ref[key]).norm(dim=-1) / ref[key].norm(dim=-1)).flatten()
        assert per_pos.median() <= 1e-5 and per_pos.max() <= 0.5, (key, per_pos.median(), per_pos.max())


@pytest.mark.parametrize("case", list(CASES))
def test_each_rank_holds_its_half_of_the_experts_and_the_planned_bytes(two_ranks, checkpoints, case):
    _, cfg, fmt = checkpoints[case]
    for r in range(2):
        res = two_ranks[r][case]
        assert (res["local_experts"], res["expert_offset"]) == (4, 4 * r)
        plan = dsv4.memory_plan(cfg, dsv4.Parallel(2, r), fmt, torch.float32, MAX_SEQ, 2, repack=False)
        assert res["bytes"] == (plan["dense"], plan["experts"], plan["kv_cache"]), (res["bytes"], plan)


def test_plan_halves_sharded_weights_but_not_the_kv_cache():
    cfg = dsv4.ModelConfig()                                   # Flash
    for repack in (False, True):
        one, two = (dsv4.memory_plan(cfg, dsv4.Parallel(n, 0), "fp8", repack=repack) for n in (1, 2))
        assert two["kv_cache"] == one["kv_cache"] > 0
        assert two["experts"] * 2 == one["experts"]
        assert 0.5 * one["dense"] < two["dense"] < 0.65 * one["dense"]   # replicated: wq_a, wkv, indexer, router, ...


@pytest.mark.parametrize("size,what", [(3, "vocab_size"), (16, "o_groups"), (5, "num_attention_heads")])
def test_a_world_size_that_does_not_divide_the_model_is_one_clear_error(size, what):
    with pytest.raises(dsv4.ShardError, match=f"{what} = .* not divisible by the number of GPUs \\({size}\\)"):
        with torch.device("meta"):
            dsv4.Transformer(dsv4.ModelConfig(), dsv4.Parallel(size, 0))


def test_rank_zero_broadcasts_prompt_ids_and_seed(two_ranks):
    assert two_ranks[0]["broadcast"] == two_ranks[1]["broadcast"] == [[1000, 7], None]


# ---------------------------------------------------------------------------------------------------------------
# The CLI under torchrun (2 CPU ranks, gloo) on the embedded demo model: rank 0 reads and prints, the text is the
# single process's.
HERE = os.path.dirname(os.path.abspath(__file__))
ENTRY = os.path.join(HERE, "dsv4.py")


@pytest.fixture(scope="module")
def demo_cache(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("cache"))
    subprocess.run([sys.executable, "-c", "import dsv4; dsv4.embedded_checkpoint()"], cwd=HERE, check=True,
                   env=dict(os.environ, NANO_DSV4_CACHE=root))
    return root


def cli(args, cache, nproc=0, stdin=None):
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc)] \
        if nproc else [sys.executable]
    env = dict(os.environ, NANO_DSV4_CACHE=cache, OMP_NUM_THREADS="1")
    return subprocess.run(launch + [ENTRY, *args], capture_output=True, text=True, env=env, input=stdin, timeout=300,
                          cwd=HERE)


@pytest.mark.parametrize("mode", [["--prompt", "Hello world", "-t", "0"], ["-i", "-t", "0"]])
def test_torchrun_two_ranks_print_what_one_process_prints(demo_cache, mode):
    args = ["--device", "cpu", "--dtype", "fp32", "-n", "6", *mode]
    stdin = "Hello world\nSecond turn\n" if "-i" in mode else None
    one, two = cli(args, demo_cache, stdin=stdin), cli(args, demo_cache, nproc=2, stdin=stdin)
    assert one.returncode == 0 and two.returncode == 0, two.stderr[-2000:]
    assert one.stdout.strip() and two.stdout == one.stdout           # only rank 0 prints the text
    turns = 2 if "-i" in mode else 1
    assert two.stderr.count("dsv4: prompt ") == turns and "loading layer 4/4 on 2 ranks" in two.stderr


def test_torchrun_prompt_error_on_rank_zero_is_one_line_and_stops_every_rank(demo_cache):
    r = cli(["--device", "cpu", "--prompt", "a prompt longer than the cache", "--max-seq-len", "2"], demo_cache, 2)
    assert r.returncode != 0 and r.stdout == ""
    assert r.stderr.count("dsv4: error: prompt is") == 1 and "rank 1: error" not in r.stderr


@pytest.fixture(scope="module")
def flash_config(tmp_path_factory):
    cfg = dsv4.ModelConfig().to_dict()
    cfg["quantization_config"] = weights.QUANT_CONFIG
    path = tmp_path_factory.mktemp("flash") / "config.json"
    path.write_text(json.dumps(cfg))
    return str(path)


def test_dry_run_prints_the_plan_of_each_gpu(flash_config):
    r = cli(["--dry-run", "--ckpt", flash_config, "--world-size", "4", "--max-seq-len", "65536"], "/nonexistent")
    assert r.returncode == 0, r.stderr
    plan = dsv4.memory_plan(dsv4.ModelConfig(), dsv4.Parallel(4, 0), "fp8", max_seq_len=65536)
    GiB = 2 ** 30
    assert f"weights {(plan['dense'] + plan['experts']) / GiB:.2f} GiB" in r.stdout
    assert f"KV cache {plan['kv_cache'] / GiB:.2f} GiB" in r.stdout and "64 of 256 per layer" in r.stdout
    assert "H100 80GB: yes" in r.stdout and "torchrun --nproc-per-node 4" in r.stdout


def test_dry_run_of_a_world_size_that_does_not_divide_the_model_is_one_line(flash_config):
    r = cli(["--dry-run", "--ckpt", flash_config, "--world-size", "3"], "/nonexistent")
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "not divisible" in r.stderr
