"""Tests for weights.py: safetensors loading (fp8 / nvfp4 / bf16), validation errors, mmap, and the tiny writer."""
import collections
import gc
import json
import os
import shutil

import pytest
import torch

import kernels
import weights
from dsv4 import ModelConfig
from weights import CheckpointError

TINY = dict(vocab_size=256, hidden_size=256, num_hidden_layers=4, num_attention_heads=4, head_dim=128,
            q_lora_rank=128, o_groups=2, o_lora_rank=128, moe_intermediate_size=128, n_routed_experts=8,
            num_experts_per_tok=2, num_hash_layers=1, compress_ratios=[0, 4, 128, 4], index_n_heads=4,
            index_head_dim=128, index_topk=8)
FORMATS = ("fp8", "nvfp4", "bf16")
SEED = 7


def tiny_config(**overrides):
    return ModelConfig(**{**TINY, **overrides})


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """One single-file checkpoint per format, plus a sharded fp8 one; reused read-only (copy before mutating)."""
    root = tmp_path_factory.mktemp("ckpt")
    out = {fmt: weights.write_checkpoint(str(root / fmt), tiny_config(), fmt, SEED) for fmt in FORMATS}
    out["fp8-sharded"] = weights.write_checkpoint(str(root / "fp8-sharded"), tiny_config(), "fp8", SEED,
                                                  max_shard_bytes=1 << 20)
    return out


def copy_of(checkpoints, key, tmp_path):
    return shutil.copytree(checkpoints[key], tmp_path / key)


def rewrite(path, edit, file="model.safetensors"):
    """Rewrite one safetensors file of a checkpoint after edit(tensors) mutates its name -> tensor dict."""
    f = weights.SafetensorsFile(os.path.join(path, file))
    tensors = {n: f.get(n).clone() for n in f.entries}
    edit(tensors)
    weights.save_safetensors(os.path.join(path, file + ".new"), tensors)
    os.replace(os.path.join(path, file + ".new"), os.path.join(path, file))


def edit_config(path, edit):
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    edit(cfg)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f)


# Hand decoders written from the format definitions (independent of kernels.E2M1_VALUES).
def e2m1_value(code):               # s e1 e0 m, exponent bias 1, e=0 subnormal
    e, m = (code >> 1) & 3, code & 1
    mag = m * 0.5 if e == 0 else (1 + m / 2) * 2.0 ** (e - 1)
    return -mag if code & 8 else mag


def decode_fp4(packed):             # [..., K/2] bytes -> [..., K], element 2k from the low nibble
    b = packed.view(torch.uint8).long()
    lo = torch.tensor([e2m1_value(x & 15) for x in range(256)])[b]
    hi = torch.tensor([e2m1_value(x >> 4) for x in range(256)])[b]
    return torch.stack([lo, hi], -1).flatten(-2)


def decode_e4m3(scale):             # positive e4m3 bytes, bias 7
    b = scale.view(torch.uint8).long()
    e, m = (b >> 3) & 15, (b & 7).float()
    return torch.where(e == 0, m / 8 * 2.0 ** -6, (1 + m / 8) * torch.exp2(e.float() - 7))


def decode_e8m0(scale):
    return torch.exp2(scale.view(torch.uint8).float() - 127)


def same_bytes(a, b):
    return torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


# ----------------------------------------------------------------------------------------------------------------
def test_inventory_matches_official_flash_and_pro_index_counts():
    # Official index totals minus the MTP block (Flash 69,187 - 1,575; Pro 145,116 - 2,343), with Flash dtype counts.
    flash = weights.checkpoint_inventory(ModelConfig(), "fp8")
    assert len(flash) == 67612
    assert collections.Counter(s.dtypes[0] for s in flash.values()) == {
        "F8_E8M0": 33389, "I8": 33024, "BF16": 425, "F32": 406, "F8_E4M3": 365, "I64": 3}
    pro = ModelConfig(hidden_size=7168, num_hidden_layers=61, num_attention_heads=128, q_lora_rank=1536, o_groups=16,
                      moe_intermediate_size=3072, n_routed_experts=384, compress_ratios=[128, 128] + [4, 128] * 29 + [4, 0])
    inv = weights.checkpoint_inventory(pro, "fp8")
    assert len(inv) == 142773
    assert inv["layers.5.attn.wo_a.weight"].shape == (16384, 4096) and inv["layers.5.attn.wo_a.scale"].shape == (128, 32)
    assert inv["layers.0.ffn.experts.3.w2.scale"].shape == (7168, 96)


@pytest.mark.parametrize("fmt,key", [("fp8", "fp8"), ("nvfp4", "nvfp4"), ("bf16", "bf16"), ("fp8", "fp8-sharded")])
def test_round_trip_dtypes_bytes_and_values(checkpoints, fmt, key):
    ck = weights.load_checkpoint(checkpoints[key])
    assert ck.fmt == fmt and ck.path == checkpoints[key]
    if key.endswith("sharded"):
        assert len({f for f in os.listdir(ck.path) if f.endswith(".safetensors")}) > 2
    masters = weights.random_weights(tiny_config(), SEED)
    for name, m in masters.items():
        prefix = name.rsplit(".", 1)[0]
        if ck.has(prefix + ".scale") and ".experts." not in name:           # fp8 linear: e4m3 + e8m0 128x128
            w, s = ck.linear(prefix)
            assert w.dtype == torch.float8_e4m3fn and s.dtype == torch.float8_e8m0fnu
            q_ref, s_ref = weights.quantize_fp8_block(m)
            assert same_bytes(w, q_ref) and same_bytes(s, s_ref), name
            block = decode_e8m0(s).repeat_interleave(128, 0)[:m.shape[0]].repeat_interleave(128, 1)[:, :m.shape[1]]
            err = (weights.dequant_fp8_block(w, s) - m).abs()
            assert (err <= m.abs() / 16 + block * 2.0 ** -10).all(), name     # e4m3: 3 mantissa bits
        elif ".experts." not in name:
            t = ck.tensor(name)
            assert torch.equal(t, m.to(t.dtype)), name
            assert t.dtype == weights.ST_DTYPES[ck.inventory[name].dtypes[0]], name
    for layer in range(4):
        ex = ck.experts(layer)
        assert ex.fmt == {"fp8": "mxfp4", "nvfp4": "nvfp4", "bf16": "bf16"}[fmt] and ex.num_experts == 8
        for e in range(8):
            got = kernels.expert_weights(ex, e)
            for proj, w in zip(("w1", "w3", "w2"), got):
                p = f"layers.{layer}.ffn.experts.{e}.{proj}"
                m = masters[p + ".weight"]
                if fmt == "bf16":
                    assert torch.equal(w, m.to(torch.bfloat16).float())
                    continue
                packed = ck.tensor(p + ".weight")
                assert packed.dtype == torch.float4_e2m1fn_x2 and packed.shape == (m.shape[0], m.shape[1] // 2)
                if fmt == "fp8":
                    q_ref, s_ref = weights.quantize_mxfp4(m)
                    s = ck.tensor(p + ".scale")
                    block = decode_e8m0(s).repeat_interleave(32, -1)
                else:
                    q_ref, s_ref, s2_ref = weights.quantize_nvfp4(m)
                    s = ck.tensor(p + ".weight_scale")
                    assert torch.equal(ck.tensor(p + ".weight_scale_2"), s2_ref)
                    block = decode_e4m3(s).repeat_interleave(16, -1) * s2_ref
                assert same_bytes(packed, q_ref) and same_bytes(s, s_ref), p
                err = (w - m).abs()       # e2m1: half a grid step, <= a quarter of the value or of the block scale
                assert (err <= torch.maximum(m.abs() / 4, block / 4) * (1 + 1e-6)).all(), p
                assert (w - m).norm() / m.norm() < 0.13, p


def test_tid2eid_rows_hold_distinct_valid_experts(checkpoints):
    t = weights.load_checkpoint(checkpoints["fp8"]).tensor("layers.0.ffn.gate.tid2eid")
    assert t.dtype == torch.int64 and t.shape == (256, 2)
    assert ((t >= 0) & (t < 8)).all() and (t[:, 0] != t[:, 1]).all()


@pytest.mark.parametrize("fmt", FORMATS)
def test_config_json_carries_the_format_quantization_config(checkpoints, fmt):
    with open(os.path.join(checkpoints[fmt], "config.json")) as f:
        cfg = json.load(f)
    assert ModelConfig.from_dict(cfg).hidden_size == 256
    qc = cfg.get("quantization_config")
    if fmt == "bf16":
        assert qc is None and "expert_dtype" not in cfg
    else:
        assert cfg["expert_dtype"] == "fp4" and qc["quant_method"] == "fp8" and qc["scale_fmt"] == "ue8m0"
        assert qc["weight_block_size"] == [128, 128] and qc["activation_scheme"] == "dynamic"
        assert qc.get("moe_quant_algo") == ("NVFP4" if fmt == "nvfp4" else None)


def test_quantizers_round_to_nearest_with_ties_to_even_code():
    vals = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0, -0.25, -0.1, 0.3, -2.9, 0.0, 4.4, -6.0, 1.0]
    packed, scale = weights.quantize_mxfp4(torch.tensor(vals + [0.0] * 16)[None])
    assert scale.view(torch.uint8).tolist() == [[127]]            # amax 6 -> scale 2^0
    codes = decode_fp4(packed)[0, :16].tolist()
    assert codes == [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 6.0, -0.0, -0.0, 0.5, -3.0, 0.0, 4.0, -6.0, 1.0]
    low = packed.view(torch.uint8)[0, :4].tolist()                # pairs (0.25, 0.75) -> codes (0, 2): byte 0x20
    assert low == [0x20, 0x42, 0x64, 0x76]
    q, s = weights.quantize_fp8_block(torch.full((130, 200), 448.0).index_fill_(0, torch.tensor([129]), 449.0))
    assert s.shape == (2, 2) and s.view(torch.uint8).tolist() == [[127, 127], [128, 128]]
    w = torch.randn(64, 96)
    q, s, s2 = weights.quantize_nvfp4(w)
    assert s2 == w.abs().max() / (6 * 448) and q.shape == (64, 48) and s.shape == (64, 6)
    assert decode_e4m3(s).max() == 448.0                          # the amax block uses the full e4m3 range


@pytest.mark.parametrize("fmt", ["fp8", "nvfp4"])
def test_fp4_dequant_of_hand_made_bytes_through_the_loader(checkpoints, tmp_path, fmt):
    path = copy_of(checkpoints, fmt, tmp_path)
    g = torch.Generator().manual_seed(1)
    hand = {}

    def edit(tensors):
        for proj, shape in (("w1", (128, 256)), ("w3", (128, 256)), ("w2", (256, 128))):
            p = f"layers.2.ffn.experts.5.{proj}"
            packed = torch.randint(0, 256, (shape[0], shape[1] // 2), generator=g, dtype=torch.uint8)
            packed[0, :4] = torch.tensor([0x80, 0x08, 0x10, 0x01], dtype=torch.uint8)   # -0 code 8 in each nibble
            if fmt == "fp8":
                scale = torch.randint(118, 136, (shape[0], shape[1] // 32), generator=g, dtype=torch.uint8)
                hand[proj] = decode_fp4(packed) * decode_e8m0(scale).repeat_interleave(32, -1)
                tensors.update({p + ".weight": packed.view(torch.int8), p + ".scale": scale.view(torch.float8_e8m0fnu)})
            else:
                scale = torch.randint(0x01, 0x7F, (shape[0], shape[1] // 16), generator=g, dtype=torch.uint8)
                s2 = torch.tensor({"w1": 3.7e-4, "w3": 9.1e-5, "w2": 1.3e-3}[proj])
                hand[proj] = decode_fp4(packed) * decode_e4m3(scale).repeat_interleave(16, -1) * s2
                tensors.update({p + ".weight": packed, p + ".weight_scale": scale.view(torch.float8_e4m3fn),
                                p + ".weight_scale_2": s2})
            hand[proj + "_bytes"] = packed, scale
    rewrite(path, edit)
    ck = weights.load_checkpoint(str(path))
    for ex, i in ((ck.experts(2, [5]), 0), (ck.experts(2), 5)):
        got = dict(zip(("w1", "w3", "w2"), kernels.expert_weights(ex, i)))
        for proj in ("w1", "w3", "w2"):
            assert torch.equal(got[proj], hand[proj]), proj
            assert torch.equal(torch.signbit(got[proj]), torch.signbit(hand[proj])), proj       # -0 stays -0
        packed, scale = hand["w1_bytes"]
        assert same_bytes(ex.w13[i, :128], packed) and same_bytes(ex.w13_scale[i, :128], scale)
        assert same_bytes(ex.w2[i], hand["w2_bytes"][0]) and same_bytes(ex.w2_scale[i], hand["w2_bytes"][1])


def test_unequal_gate_up_global_scales_stay_exact(checkpoints):
    ck = weights.load_checkpoint(checkpoints["nvfp4"])
    ex = ck.experts(3)
    assert (ex.alpha_gate != ex.alpha_up).all()             # the writer computes amax per tensor, like ModelOpt
    assert ex.input_scale_13.shape == (8, 2) and torch.equal(ex.input_scale_13[:, 0], ex.input_scale_13[:, 1])
    assert ex.input_scale_2.shape == (8,) and not torch.equal(ex.input_scale_2, ex.input_scale_13[:, 0])
    for e in range(8):
        for proj, w in zip(("w1", "w3", "w2"), kernels.expert_weights(ex, e)):
            p = f"layers.3.ffn.experts.{e}.{proj}"
            block = decode_e4m3(ck.tensor(p + ".weight_scale")).repeat_interleave(16, -1)
            by_hand = decode_fp4(ck.tensor(p + ".weight")) * block * ck.tensor(p + ".weight_scale_2")
            assert torch.equal(w, by_hand), p


def test_expert_subset_stacks_the_requested_experts_in_order(checkpoints):
    ck = weights.load_checkpoint(checkpoints["nvfp4"])
    full, sub = ck.experts(1), ck.experts(1, [6, 2])
    for field in ("w13", "w13_scale", "w2", "w2_scale", "alpha_gate", "alpha_up", "alpha_down", "input_scale_13"):
        t = getattr(full, field)
        picked = t.view(torch.uint8)[[6, 2]] if t.element_size() == 1 else t[[6, 2]]
        assert same_bytes(getattr(sub, field), picked), field
    with pytest.raises(ValueError):
        ck.experts(1, [8])


def test_fp8_linear_and_float_linear_mix_in_one_checkpoint(checkpoints, tmp_path):
    path = copy_of(checkpoints, "fp8", tmp_path)
    m = weights.random_weights(tiny_config(), SEED)["layers.1.attn.wo_b.weight"]

    def edit(tensors):
        del tensors["layers.1.attn.wo_b.scale"]
        tensors["layers.1.attn.wo_b.weight"] = m.to(torch.bfloat16)
        tensors["mtp.0.enorm.weight"] = torch.ones(3)                        # mtp.* is ignored
    rewrite(path, edit)
    ck = weights.load_checkpoint(str(path))
    w, s = ck.linear("layers.1.attn.wo_b")
    assert s is None and w.dtype == torch.bfloat16 and torch.equal(w, m.to(torch.bfloat16))
    w, s = ck.linear("layers.1.attn.wo_a")
    assert w.dtype == torch.float8_e4m3fn and s.dtype == torch.float8_e8m0fnu and s.shape == (2, 2)
    assert ck.has("mtp.0.enorm.weight")
    w, s = weights.load_checkpoint(checkpoints["bf16"]).linear("layers.0.attn.wq_a")
    assert w.dtype == torch.bfloat16 and s is None


def test_safetensors_library_reads_written_files(checkpoints):
    safe_open = pytest.importorskip("safetensors").safe_open
    ck = weights.load_checkpoint(checkpoints["nvfp4"])
    with safe_open(os.path.join(checkpoints["nvfp4"], "model.safetensors"), "pt") as f:
        for name in ("layers.1.ffn.experts.3.w2.weight", "layers.1.ffn.experts.3.w2.weight_scale", "embed.weight",
                     "layers.1.attn.wq_b.scale", "layers.1.ffn.experts.3.w2.weight_scale_2"):
            assert same_bytes(f.get_tensor(name), ck.tensor(name)), name


def test_experts_stored_as_safetensors_f4_load_like_packed_bytes(checkpoints, tmp_path):
    path = copy_of(checkpoints, "fp8", tmp_path)

    def edit(tensors):
        for name in [n for n in tensors if ".experts." in n and n.endswith(".weight")]:
            tensors[name] = tensors[name].view(torch.uint8).view(torch.float4_e2m1fn_x2)
    rewrite(path, edit)
    a, b = weights.load_checkpoint(str(path)).experts(2), weights.load_checkpoint(checkpoints["fp8"]).experts(2)
    assert same_bytes(a.w13, b.w13) and same_bytes(a.w2, b.w2) and a.fmt == "mxfp4"


# ----------------------------------------------------------------------------------------------------------------
# Bad checkpoints: each names the tensor and/or the file.
def _drop(name):
    return lambda t: t.pop(name)


def _replace(name, value):
    return lambda t: t.__setitem__(name, value)


BAD_TENSORS = {
    "missing_tensor": (_drop("layers.2.attn.compressor.ape"), "layers.2.attn.compressor.ape"),
    "missing_scale": (_drop("layers.1.attn.wq_b.scale"), "layers.1.attn.wq_b.scale"),
    "missing_expert_scale": (_drop("layers.3.ffn.experts.7.w2.scale"), "layers.3.ffn.experts.7.w2.scale"),
    "wrong_shape": (_replace("layers.1.attn.wkv.weight", torch.zeros(127, 256, dtype=torch.float8_e4m3fn)),
                    "layers.1.attn.wkv.weight"),
    "wrong_expert_shape": (_replace("layers.0.ffn.experts.2.w3.weight", torch.zeros(128, 256, dtype=torch.int8)),
                           "layers.0.ffn.experts.2.w3.weight"),
    "wrong_dtype": (_replace("layers.0.hc_attn_fn", torch.zeros(24, 1024, dtype=torch.bfloat16)), "layers.0.hc_attn_fn"),
    "wrong_float_dtype": (_replace("head.weight", torch.zeros(256, 256, dtype=torch.float16)), "head.weight"),
    "float_weight_with_scale": (_replace("layers.0.attn.wo_a.weight", torch.zeros(256, 256, dtype=torch.bfloat16)),
                                "layers.0.attn.wo_a.scale"),
}


@pytest.mark.parametrize("case", list(BAD_TENSORS))
def test_bad_tensor_raises_naming_tensor_and_file(checkpoints, tmp_path, case):
    edit, tensor = BAD_TENSORS[case]
    path = copy_of(checkpoints, "fp8", tmp_path)
    rewrite(path, edit)
    with pytest.raises(CheckpointError) as err:
        weights.load_checkpoint(str(path))
    assert tensor in str(err.value) and "model.safetensors" in str(err.value)
    if case in ("wrong_shape", "wrong_dtype"):       # also caught lazily, without validate()
        ck = weights.load_checkpoint(str(path), validate=False)
        with pytest.raises(CheckpointError, match=tensor):
            ck.tensor(tensor)


def test_missing_dir_config_and_invalid_config(checkpoints, tmp_path):
    with pytest.raises(CheckpointError, match="nope"):
        weights.load_checkpoint(str(tmp_path / "nope"))
    path = copy_of(checkpoints, "bf16", tmp_path)
    edit_config(path, lambda c: c.pop("hidden_size"))
    with pytest.raises(CheckpointError, match="config.json.*hidden_size"):
        weights.load_checkpoint(str(path))
    (path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="invalid config.json"):
        weights.load_checkpoint(str(path))
    os.remove(path / "config.json")
    with pytest.raises(CheckpointError, match="missing config.json"):
        weights.load_checkpoint(str(path))


def test_missing_shard_and_tensor_missing_from_its_shard(checkpoints, tmp_path):
    path = copy_of(checkpoints, "fp8-sharded", tmp_path)
    with open(path / "model.safetensors.index.json") as f:
        weight_map = json.load(f)["weight_map"]
    shard = weight_map["layers.2.attn.wq_a.weight"]
    rewrite(path, _drop("layers.2.attn.wq_a.weight"), file=shard)
    with pytest.raises(CheckpointError, match=f"layers.2.attn.wq_a.weight.*{shard}"):
        weights.load_checkpoint(str(path))
    os.remove(path / shard)
    with pytest.raises(CheckpointError, match=f"names shard {shard}"):
        weights.load_checkpoint(str(path))
    os.remove(path / "model.safetensors.index.json")
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        weights.load_checkpoint(str(path))


@pytest.mark.parametrize("cut", [40, 2_000_000, 5])
def test_truncated_file_raises_naming_file(checkpoints, tmp_path, cut):
    path = copy_of(checkpoints, "fp8", tmp_path)
    file = path / "model.safetensors"
    os.truncate(file, max(0, os.path.getsize(file) - cut) if cut > 5 else cut)
    with pytest.raises(CheckpointError, match="model.safetensors.*truncated"):
        weights.load_checkpoint(str(path))


UNKNOWN_QUANT = {
    "quant_method": lambda c: c["quantization_config"].update(quant_method="gptq"),
    "moe_quant_algo": lambda c: c["quantization_config"].update(moe_quant_algo="W4A8_AWQ"),
    "block_size": lambda c: c["quantization_config"].update(weight_block_size=[64, 64]),
    "expert_dtype_fp8": lambda c: c.update(expert_dtype="fp8"),
}


@pytest.mark.parametrize("case", list(UNKNOWN_QUANT))
def test_unknown_quantization_config_raises(checkpoints, tmp_path, case):
    path = copy_of(checkpoints, "fp8", tmp_path)
    edit_config(path, UNKNOWN_QUANT[case])
    with pytest.raises(CheckpointError, match="quantization|FP8 routed experts"):
        weights.load_checkpoint(str(path))


def test_fp8_experts_of_base_checkpoints_raise(checkpoints, tmp_path):
    path = copy_of(checkpoints, "bf16", tmp_path)
    rewrite(path, _replace("layers.0.ffn.experts.0.w1.weight", torch.zeros(128, 256, dtype=torch.float8_e4m3fn)))
    with pytest.raises(CheckpointError, match="FP8 routed experts.*layers.0.ffn.experts.0.w1.weight"):
        weights.load_checkpoint(str(path))


def test_nvfp4_config_over_mxfp4_tensors_raises(checkpoints, tmp_path):
    path = copy_of(checkpoints, "fp8", tmp_path)
    edit_config(path, lambda c: c["quantization_config"].update(moe_quant_algo="NVFP4"))
    with pytest.raises(CheckpointError, match="experts.0.w1.weight_scale"):
        weights.load_checkpoint(str(path))


# ----------------------------------------------------------------------------------------------------------------
# Memory mapping and the writer's atomicity
def _mapping_of(address):
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split()
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            if lo <= address < hi:
                return parts[5] if len(parts) > 5 else ""
    return None


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="needs Linux /proc")
def test_tensors_are_views_over_a_file_mapping_and_rss_stays_flat(tmp_path):
    path = weights.write_checkpoint(str(tmp_path / "big"), tiny_config(vocab_size=65536), "bf16", 0)  # ~64 MiB
    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    gc.collect()
    before = rss()
    ck = weights.load_checkpoint(path)
    views = [ck.tensor(n) for n in ck.names()]
    assert rss() - before < 16 << 20
    embed = ck.tensor("embed.weight")
    assert os.path.realpath(_mapping_of(embed.data_ptr())) == os.path.realpath(os.path.join(path, "model.safetensors"))
    embed[0].zero_()                                         # copy-on-write: the file is untouched
    del ck, views
    gc.collect()
    fresh = weights.load_checkpoint(path).tensor("embed.weight")
    assert torch.equal(fresh[0], weights.random_weights(tiny_config(vocab_size=65536), 0)["embed.weight"][0].bfloat16())
    assert (embed[0] == 0).all()                             # a view outlives its Checkpoint


def test_failed_write_leaves_nothing_and_existing_dirs_are_not_overwritten(tmp_path, monkeypatch):
    def boom(path, tensors):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")
    monkeypatch.setattr(weights, "save_safetensors", boom)
    with pytest.raises(OSError, match="disk full"):
        weights.write_checkpoint(str(tmp_path / "ck"), tiny_config(), "fp8", 0)
    assert os.listdir(tmp_path) == []
    monkeypatch.undo()
    (tmp_path / "ck").mkdir()
    (tmp_path / "ck" / "keep").write_text("x")
    with pytest.raises(FileExistsError):
        weights.write_checkpoint(str(tmp_path / "ck"), tiny_config(), "fp8", 0)
    assert os.listdir(tmp_path / "ck") == ["keep"]
