"""nano-dsv4 weights: memory-mapped safetensors loading of DeepSeek-V4 checkpoints, and a tiny-checkpoint writer.

Checkpoint formats (Checkpoint.fmt):
  "fp8"   official DeepSeek-V4: linears e4m3 [out, in] + `.scale` e8m0 [ceil(out/128), ceil(in/128)]; routed experts
          MXFP4: I8 packed [out, in/2] (element 2k in the low nibble) + `.scale` e8m0 [out, in/32].
  "nvfp4" NVIDIA ModelOpt: routed experts U8 packed [out, in/2] + `weight_scale` e4m3 [out, in/16] + 0-d fp32
          `weight_scale_2` (multiplied) + 0-d fp32 `input_scale`; every other tensor as in "fp8".
  "bf16"  unquantized routed experts.
In every format a linear (or an expert) may instead be stored as BF16/F32 with no scale tensor (mixed per tensor).
Tensors come back as views over a private copy-on-write mmap of the files: nothing is read until touched, and an
in-place op on a returned tensor never reaches the file.
"""
from __future__ import annotations

import json
import math
import mmap
import os
import shutil
import struct
import tempfile
from typing import NamedTuple

import torch
import torch.nn.functional as F

import kernels


class CheckpointError(Exception):
    """A checkpoint that cannot be used; the message names the file and, where one is at fault, the tensor."""


# safetensors dtype name -> torch dtype. "F4" holds two e2m1 codes per byte and its header shape counts codes.
ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
             "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
             "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
             "F8_E8M0": torch.float8_e8m0fnu, "F4": torch.float4_e2m1fn_x2}
TORCH_TO_ST = {v: k for k, v in ST_DTYPES.items()}
PACKED = ("I8", "U8")              # byte dtypes that hold packed e2m1 pairs (only routed-expert weights use them)
FP4 = PACKED + ("F4",)
FLOAT = ("BF16", "F32")
FORMATS = ("fp8", "nvfp4", "bf16")
FP8_BLOCK = 128
QUANT_CONFIG = {"quant_method": "fp8", "fmt": "e4m3", "scale_fmt": "ue8m0", "activation_scheme": "dynamic",
                "weight_block_size": [FP8_BLOCK, FP8_BLOCK]}
NVFP4_CONFIG = {**QUANT_CONFIG, "moe_quant_algo": "NVFP4", "quant_algo": "MIXED_PRECISION", "group_size": 16}
SHAPE_KEYS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "head_dim", "q_lora_rank",
              "o_groups", "o_lora_rank", "moe_intermediate_size", "n_routed_experts", "num_experts_per_tok")


# ----------------------------------------------------------------------------------------------------------------
# safetensors files: our own header parser (checks every entry against the file size) and writer.
class SafetensorsFile:
    """One .safetensors file. The header is parsed at open; tensors are views over an mmap made on first use."""

    def __init__(self, path: str):
        self.path, self._mm = path, None
        try:
            self.size = os.path.getsize(path)
            with open(path, "rb") as f:
                head = f.read(8)
                n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
                if not 0 <= n <= self.size - 8:
                    raise CheckpointError(f"{path}: truncated safetensors file (header of {n} bytes, file {self.size})")
                header = json.loads(f.read(n))
        except OSError as e:
            raise CheckpointError(f"{path}: cannot read ({e.strerror})") from None
        except (ValueError, UnicodeDecodeError):
            raise CheckpointError(f"{path}: safetensors header is not valid JSON") from None
        header.pop("__metadata__", None)
        self.data_start = 8 + n
        self.entries = {}   # name -> (dtype name, shape as in the header, byte offset in the data section)
        for name, e in header.items():
            try:
                dt, shape, (a, b) = e["dtype"], tuple(int(s) for s in e["shape"]), e["data_offsets"]
            except (KeyError, TypeError, ValueError):
                raise CheckpointError(f"{name} in {path}: malformed header entry") from None
            if dt not in ST_DTYPES:
                raise CheckpointError(f"{name} in {path}: unsupported dtype {dt}")
            nbytes = math.prod(shape) // 2 if dt == "F4" else math.prod(shape) * ST_DTYPES[dt].itemsize
            if not 0 <= a <= b or b - a != nbytes:
                raise CheckpointError(f"{name} in {path}: data_offsets {a}..{b} do not fit shape {list(shape)} {dt}")
            if self.data_start + b > self.size:
                raise CheckpointError(f"{name} in {path}: truncated file (tensor ends at byte {self.data_start + b}, "
                                      f"file has {self.size})")
            self.entries[name] = (dt, shape, a)

    def get(self, name: str) -> torch.Tensor:
        dt, shape, start = self.entries[name]
        dtype = ST_DTYPES[dt]
        if dt == "F4":
            shape = shape[:-1] + (shape[-1] // 2,)
        nbytes = math.prod(shape) * dtype.itemsize
        if nbytes == 0:
            return torch.empty(shape, dtype=dtype)
        if self._mm is None:
            with open(self.path, "rb") as f:
                mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)   # private: writes never reach the file
            if len(mm) != self.size:
                raise CheckpointError(f"{self.path}: file changed size since its header was read")
            self._mm = mm
        raw = torch.frombuffer(self._mm, dtype=torch.uint8, count=nbytes, offset=self.data_start + start)
        return raw.view(dtype).reshape(shape)


def save_safetensors(path: str, tensors: dict[str, torch.Tensor]) -> None:
    """Write tensors as one safetensors file. Largest elements first, so every tensor is aligned to its size;
    float4_e2m1fn_x2 is written as F4 (header shape in codes), int8/uint8 as I8/U8."""
    header, blobs, offset = {}, [], 0
    for name, t in sorted(tensors.items(), key=lambda kv: (-kv[1].element_size(), kv[0])):
        t = t.detach().cpu().contiguous()
        shape = list(t.shape)
        if t.dtype == torch.float4_e2m1fn_x2:
            shape[-1] *= 2
        raw = t.reshape(-1).view(torch.uint8)
        header[name] = {"dtype": TORCH_TO_ST[t.dtype], "shape": shape, "data_offsets": [offset, offset + raw.numel()]}
        blobs.append(raw)
        offset += raw.numel()
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        for raw in blobs:
            f.write(raw.numpy().data)


# ----------------------------------------------------------------------------------------------------------------
# Inventory: every tensor the model reads (main layers; the MTP block mtp.0.* only when asked for: mtp=True).
class Spec(NamedTuple):
    """An expected tensor. shape is in elements (I8/U8 packed fp4 store the last dim halved; F4 headers count codes);
    dtypes are the allowed safetensors dtypes, the first is what write_checkpoint writes; need says when it must
    exist: "always", "if_fp8" (iff <prefix>.weight is F8_E4M3), "if_fp4" (iff it is packed fp4), "optional"."""
    shape: tuple
    dtypes: tuple
    need: str = "always"


def _model_config(config):
    """A dsv4.ModelConfig (or any object with its attributes) from a config object or a config.json dict."""
    if isinstance(config, dict):
        from dsv4 import ModelConfig     # lazy: dsv4 imports this module
        return ModelConfig.from_dict(config)
    return config


def checkpoint_inventory(config, fmt: str, mtp: bool = False) -> dict[str, Spec]:
    """name -> Spec for every tensor of the main layers (dsv4_architecture.md §3.1-3.2), in writing order; mtp: also
    the multi-token-prediction block mtp.0 (a window-only, non-hash layer + e_proj / h_proj / enorm / hnorm / norm
    and its own hc_head; it shares embed and head)."""
    if fmt not in FORMATS:
        raise ValueError(f"fmt must be one of {FORMATS}, not {fmt!r}")
    c = _model_config(config)
    D, H, hd, qr, hc = c.hidden_size, c.num_attention_heads, c.head_dim, c.q_lora_rank, c.hc_mult
    G, R, I, E = c.o_groups, c.o_lora_rank, c.moe_intermediate_size, c.n_routed_experts
    mix, linear_dtypes = (2 + hc) * hc, ("BF16", "F32", "F8_E4M3") if fmt == "bf16" else ("F8_E4M3",) + FLOAT
    inv = {}

    def add(name, shape, dtypes, need="always"):
        inv[name] = Spec(tuple(shape), tuple(dtypes), need)

    def linear(p, out, inp):      # FP8 block-scaled in the official release; a float weight has no scale
        add(f"{p}.weight", (out, inp), linear_dtypes)
        add(f"{p}.scale", (-(-out // FP8_BLOCK), -(-inp // FP8_BLOCK)), ("F8_E8M0",), "if_fp8")

    def expert(p, out, inp):      # routed expert projection
        if fmt == "fp8":
            add(f"{p}.weight", (out, inp), ("I8", "U8", "F4") + FLOAT)
            add(f"{p}.scale", (out, inp // 32), ("F8_E8M0",), "if_fp4")
        elif fmt == "nvfp4":
            add(f"{p}.weight", (out, inp), ("U8", "I8", "F4") + FLOAT)
            add(f"{p}.weight_scale", (out, inp // 16), ("F8_E4M3",), "if_fp4")
            add(f"{p}.weight_scale_2", (), ("F32",), "if_fp4")
            add(f"{p}.input_scale", (), ("F32",), "optional")
        else:
            add(f"{p}.weight", (out, inp), FLOAT)

    def compressor(p, ratio, d):  # ratio 4 overlaps two blocks, so its projections are 2d wide
        w = (2 if ratio == 4 else 1) * d
        add(f"{p}.wkv.weight", (w, D), FLOAT)
        add(f"{p}.wgate.weight", (w, D), FLOAT)
        add(f"{p}.ape", (ratio, w), ("F32",))
        add(f"{p}.norm.weight", (d,), FLOAT)

    add("embed.weight", (c.vocab_size, D), FLOAT)
    add("head.weight", (c.vocab_size, D), FLOAT)
    add("norm.weight", (D,), FLOAT)
    add("hc_head_fn", (hc, hc * D), ("F32",))
    add("hc_head_base", (hc,), ("F32",))
    add("hc_head_scale", (1,), ("F32",))
    def block(p, ratio, hashed):
        for site in ("attn", "ffn"):
            add(f"{p}.hc_{site}_fn", (mix, hc * D), ("F32",))
            add(f"{p}.hc_{site}_base", (mix,), ("F32",))
            add(f"{p}.hc_{site}_scale", (3,), ("F32",))
            add(f"{p}.{site}_norm.weight", (D,), FLOAT)
        linear(f"{p}.attn.wq_a", qr, D)
        add(f"{p}.attn.q_norm.weight", (qr,), FLOAT)
        linear(f"{p}.attn.wq_b", H * hd, qr)
        linear(f"{p}.attn.wkv", hd, D)
        add(f"{p}.attn.kv_norm.weight", (hd,), FLOAT)
        linear(f"{p}.attn.wo_a", G * R, H * hd // G)
        linear(f"{p}.attn.wo_b", D, G * R)
        add(f"{p}.attn.attn_sink", (H,), ("F32",))
        if ratio:
            compressor(f"{p}.attn.compressor", ratio, hd)
        if ratio == 4:
            linear(f"{p}.attn.indexer.wq_b", c.index_n_heads * c.index_head_dim, qr)
            add(f"{p}.attn.indexer.weights_proj.weight", (c.index_n_heads, D), FLOAT)
            compressor(f"{p}.attn.indexer.compressor", 4, c.index_head_dim)
        add(f"{p}.ffn.gate.weight", (E, D), FLOAT)
        if hashed:
            add(f"{p}.ffn.gate.tid2eid", (c.vocab_size, c.num_experts_per_tok), ("I64", "I32"))
        else:
            add(f"{p}.ffn.gate.bias", (E,), ("F32",))
        for e in range(E):
            expert(f"{p}.ffn.experts.{e}.w1", I, D)
            expert(f"{p}.ffn.experts.{e}.w3", I, D)
            expert(f"{p}.ffn.experts.{e}.w2", D, I)
        Is = I * c.n_shared_experts
        linear(f"{p}.ffn.shared_experts.w1", Is, D)
        linear(f"{p}.ffn.shared_experts.w3", Is, D)
        linear(f"{p}.ffn.shared_experts.w2", D, Is)

    for layer in range(c.num_hidden_layers):
        block(f"layers.{layer}", int(c.compress_ratios[layer]), layer < c.num_hash_layers)
    if mtp:
        for j in range(c.num_nextn_predict_layers):
            p = f"mtp.{j}"
            block(p, 0, False)
            linear(f"{p}.e_proj", D, D)
            linear(f"{p}.h_proj", D, D)
            for norm in ("enorm", "hnorm", "norm"):
                add(f"{p}.{norm}.weight", (D,), FLOAT)
            add(f"{p}.hc_head_fn", (hc, hc * D), ("F32",))
            add(f"{p}.hc_head_base", (hc,), ("F32",))
            add(f"{p}.hc_head_scale", (1,), ("F32",))
    return inv


# ----------------------------------------------------------------------------------------------------------------
# Loading
def _read_config(path: str) -> dict:
    file = os.path.join(path, "config.json")
    try:
        with open(file) as f:
            cfg = json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{file}: missing config.json") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{file}: invalid config.json ({e})") from None
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{file}: invalid config.json (not a JSON object)")
    for key in SHAPE_KEYS:
        if not (isinstance(cfg.get(key), int) and cfg[key] > 0):
            raise CheckpointError(f"{file}: invalid config.json ({key} missing or not a positive integer)")
    ratios = cfg.get("compress_ratios")
    if not (isinstance(ratios, list) and len(ratios) >= cfg["num_hidden_layers"]
            and all(r in (0, 4, 128) for r in ratios)):
        raise CheckpointError(f"{file}: invalid config.json (compress_ratios must list 0/4/128 for every layer)")
    return cfg


class Checkpoint:
    """A DeepSeek-V4 checkpoint folder: config.json + model.safetensors, or model.safetensors.index.json + shards."""

    def __init__(self, path: str, validate: bool = True, mtp: bool = False):
        self.path = os.path.abspath(path)
        if not os.path.isdir(self.path):
            raise CheckpointError(f"{self.path}: checkpoint directory not found")
        self.config = _read_config(self.path)
        self._files: dict[str, SafetensorsFile] = {}
        index = os.path.join(self.path, "model.safetensors.index.json")
        if os.path.exists(index):
            try:
                with open(index) as f:
                    self._where = dict(json.load(f)["weight_map"])    # tensor name -> shard file name
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index}: invalid index ({e})") from None
            for shard in sorted(set(self._where.values())):
                if not os.path.isfile(os.path.join(self.path, shard)):
                    raise CheckpointError(f"{index}: names shard {shard}, which does not exist")
            self._source = index
        elif os.path.exists(os.path.join(self.path, "model.safetensors")):
            self._where = dict.fromkeys(self._file("model.safetensors").entries, "model.safetensors")
            self._source = os.path.join(self.path, "model.safetensors")
        else:
            raise CheckpointError(f"{self.path}: no model.safetensors or model.safetensors.index.json")
        try:
            self.model_config = _model_config(self.config)
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{self.path}/config.json: invalid config.json ({e})") from None
        self.fmt = self._detect_format()
        if mtp and not (self.model_config.num_nextn_predict_layers > 0 and self.has("mtp.0.e_proj.weight")):
            raise CheckpointError(f"{self.path}: no MTP block (mtp.0.*: num_nextn_predict_layers "
                                  f"{self.model_config.num_nextn_predict_layers}, mtp.0.e_proj.weight "
                                  f"{'present' if self.has('mtp.0.e_proj.weight') else 'absent'})")
        self.inventory = checkpoint_inventory(self.model_config, self.fmt, mtp)
        if validate:
            self.validate()

    def _file(self, shard: str) -> SafetensorsFile:
        if shard not in self._files:
            self._files[shard] = SafetensorsFile(os.path.join(self.path, shard))
        return self._files[shard]

    def _entry(self, name: str):
        """(file, dtype name, header shape) of a tensor, or CheckpointError naming it and where it was looked for."""
        if name not in self._where:
            raise CheckpointError(f"missing tensor {name} (not in {self._source})")
        f = self._file(self._where[name])
        if name not in f.entries:
            raise CheckpointError(f"missing tensor {name}: {self._source} maps it to {f.path}, which lacks it")
        dt, shape, _ = f.entries[name]
        return f, dt, shape

    def _check(self, name: str):
        f, dt, shape = self._entry(name)
        spec = self.inventory.get(name)
        if spec is None:
            return f, dt
        if dt not in spec.dtypes:
            raise CheckpointError(f"{name} in {f.path}: dtype {dt}, expected one of {list(spec.dtypes)}")
        want = spec.shape[:-1] + (spec.shape[-1] // 2,) if dt in PACKED else spec.shape
        if shape != want:
            raise CheckpointError(f"{name} in {f.path}: shape {list(shape)}, expected {list(want)} ({dt})")
        return f, dt

    def _detect_format(self) -> str:
        qc, expert_dtype = self.config.get("quantization_config"), self.config.get("expert_dtype")
        probe = "layers.0.ffn.experts.0.w1"
        w_dt = self._entry(probe + ".weight")[1] if self.has(probe + ".weight") else None
        if w_dt == "F8_E4M3" or expert_dtype not in (None, "fp4"):
            raise CheckpointError(f"{self.path}: unsupported quantization: FP8 routed experts (expert_dtype="
                                  f"{expert_dtype}, {probe}.weight {w_dt}, as in -Base checkpoints); "
                                  f"only FP4 (MXFP4/NVFP4) or BF16 experts are supported")
        if qc is None:      # no quantization_config: read the experts' format off the tensors
            return "nvfp4" if self.has(probe + ".weight_scale") else "fp8" if w_dt in FP4 else "bf16"
        if not isinstance(qc, dict) or qc.get("quant_method") != "fp8" or qc.get("fmt", "e4m3") != "e4m3" \
                or qc.get("weight_block_size", [128, 128]) != [128, 128] \
                or qc.get("activation_scheme", "dynamic") != "dynamic":
            raise CheckpointError(f"{self.path}/config.json: unknown quantization_config {qc} "
                                  f"(supported: DeepSeek fp8 e4m3 128x128 blocks, dynamic activations)")
        algo = qc.get("moe_quant_algo")
        if algo not in (None, "NVFP4"):
            raise CheckpointError(f"{self.path}/config.json: unknown quantization: moe_quant_algo {algo!r} "
                                  f"(supported: absent = MXFP4 experts, or NVFP4)")
        return "nvfp4" if algo == "NVFP4" else "fp8"

    def validate(self) -> None:
        """Check every expected tensor exists with the right shape and dtype, from the headers alone."""
        for name, spec in self.inventory.items():
            if spec.need in ("if_fp8", "if_fp4"):
                weight = name.rsplit(".", 1)[0] + ".weight"
                w_dt = self._entry(weight)[1] if self.has(weight) else None   # (a missing weight is its own error)
                needed = w_dt == "F8_E4M3" if spec.need == "if_fp8" else w_dt in FP4
                if not needed:
                    if self.has(name) and w_dt is not None:
                        raise CheckpointError(f"{name} in {self._source}: scale present but {weight} is {w_dt}")
                    continue
            elif spec.need == "optional" and not self.has(name):
                continue
            self._check(name)

    def has(self, name: str) -> bool:
        return name in self._where

    def names(self) -> list[str]:
        return list(self._where)

    def tensor(self, name: str) -> torch.Tensor:
        """A checked view over the mmap. Packed fp4 (I8/U8/F4) comes back as float4_e2m1fn_x2 [out, in/2]; every
        other tensor keeps its stored dtype (e4m3, e8m0, bf16, fp32, int64) unchanged."""
        f, dt = self._check(name)
        t = f.get(name)
        if dt in PACKED and name in self.inventory:
            t = t.view(torch.uint8).view(torch.float4_e2m1fn_x2)
        return t

    def linear(self, prefix: str):
        """(weight, scale): e4m3 [out, in] + e8m0 [ceil(out/128), ceil(in/128)], or a float weight and None."""
        w = self.tensor(prefix + ".weight")
        if w.dtype == torch.float4_e2m1fn_x2:
            raise ValueError(f"{prefix} is a packed fp4 routed expert: use Checkpoint.experts()")
        if w.dtype == torch.float8_e4m3fn:
            return w, self.tensor(prefix + ".scale")
        if self.has(prefix + ".scale"):
            raise CheckpointError(f"{prefix}.scale in {self._source}: scale present but {prefix}.weight is {w.dtype}")
        return w, None

    def _expert_kind(self, proj: str) -> str:
        dt = self._check(proj + ".weight")[1]
        return "bf16" if dt in FLOAT else self.fmt.replace("fp8", "mxfp4")

    def experts(self, layer, expert_ids=None) -> kernels.Experts:
        """Routed experts of a layer (its index, or a block's name prefix such as "mtp.0") stacked over expert_ids
        (default all), in the kernels.Experts layout: packed bytes and block scales copied as stored (no
        dequantization); alphas = each half's fp32 weight_scale_2 (nvfp4) or ones."""
        c = self.model_config
        ids = list(range(c.n_routed_experts)) if expert_ids is None else [int(e) for e in expert_ids]
        named = isinstance(layer, str)
        if (not named and not 0 <= layer < c.num_hidden_layers) or not ids or \
                not all(0 <= e < c.n_routed_experts for e in ids):
            raise ValueError(f"layer {layer} / experts {ids} out of range ({c.num_hidden_layers} layers, "
                             f"{c.n_routed_experts} experts)")
        p = f"{layer if named else f'layers.{layer}'}.ffn.experts"
        kinds = {self._expert_kind(f"{p}.{e}.{w}") for e in ids for w in ("w1", "w3", "w2")}
        if len(kinds) > 1:
            raise CheckpointError(f"{p}.* in {self._source}: layer {layer} mixes expert formats {sorted(kinds)}")
        kind = kinds.pop()

        def stack(suffix, projs):   # [n, rows, ...]: per expert, the projections' tensors concatenated along rows
            return torch.stack([torch.cat([self.tensor(f"{p}.{e}.{w}{suffix}") for w in projs]) for e in ids])

        def scalars(suffix, proj):  # [n] fp32
            return torch.stack([self.tensor(f"{p}.{e}.{proj}{suffix}") for e in ids]).float()

        if kind == "bf16":
            return kernels.Experts(kind, stack(".weight", ("w1", "w3")), None, stack(".weight", ("w2",)), None,
                                   *torch.ones(3, len(ids)))
        scale = ".weight_scale" if kind == "nvfp4" else ".scale"
        w13, s13 = stack(".weight", ("w1", "w3")), stack(scale, ("w1", "w3"))
        w2, s2 = stack(".weight", ("w2",)), stack(scale, ("w2",))
        if kind == "mxfp4":
            return kernels.Experts(kind, w13, s13, w2, s2, *torch.ones(3, len(ids)))
        alphas = [scalars(".weight_scale_2", w) for w in ("w1", "w3", "w2")]
        x_scale = None
        if all(self.has(f"{p}.{e}.{w}.input_scale") for e in ids for w in ("w1", "w3", "w2")):
            x_scale = [scalars(".input_scale", w) for w in ("w1", "w3", "w2")]
        return kernels.Experts(kind, w13, s13, w2, s2, *alphas, torch.stack(x_scale[:2], 1) if x_scale else None,
                               x_scale[2] if x_scale else None)


def load_checkpoint(path: str, validate: bool = True, mtp: bool = False) -> Checkpoint:
    """Open (and by default validate, headers only) a checkpoint folder; raises CheckpointError. mtp: the MTP block
    is read too (CheckpointError where the checkpoint has none)."""
    return Checkpoint(path, validate, mtp)


# ----------------------------------------------------------------------------------------------------------------
# Quantizers (round to nearest; e2m1 ties to the even code, as ModelOpt); the model's dsv4.dequant_fp8 undoes fp8.
E2M1_BOUNDS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)    # midpoints between consecutive e2m1 magnitudes


def _ceil_log2(x: torch.Tensor) -> torch.Tensor:
    """Exact ceil(log2(x)) for x > 0 (int32)."""
    m, e = torch.frexp(x)             # x = m * 2^e, m in [0.5, 1)
    return torch.where(m == 0.5, e - 1, e)


def _pow2(exponent: torch.Tensor) -> torch.Tensor:
    return torch.ldexp(torch.ones(exponent.shape), exponent)


def _e8m0(exponent: torch.Tensor) -> torch.Tensor:
    return (exponent.clamp(-127, 127) + 127).to(torch.uint8).view(torch.float8_e8m0fnu)


def _e2m1_pack(x: torch.Tensor) -> torch.Tensor:
    """[..., K] values in scale units -> [..., K/2] float4_e2m1fn_x2 (element 2k in the low nibble)."""
    m = x.abs().clamp(max=6.0)
    code = torch.zeros(x.shape, dtype=torch.uint8)
    for i, b in enumerate(E2M1_BOUNDS):   # odd bounds sit under an even code: a tie rounds up there
        code += (m >= b) if i % 2 else (m > b)
    code |= (x < 0).to(torch.uint8) << 3
    return (code[..., 0::2] | (code[..., 1::2] << 4)).view(torch.float4_e2m1fn_x2)


def quantize_fp8_block(w: torch.Tensor):
    """[out, in] -> (e4m3 [out, in], e8m0 [ceil(out/128), ceil(in/128)]) with power-of-two block scales."""
    out, inp = w.shape
    b = FP8_BLOCK
    padded = F.pad(w.float(), (0, -inp % b, 0, -out % b))
    blocks = padded.view(padded.shape[0] // b, b, padded.shape[1] // b, b)
    exponent = _ceil_log2(blocks.abs().amax(dim=(1, 3)).clamp(min=1e-4) / 448.0)
    scale = _pow2(exponent)[:, None, :, None]
    q = (blocks / scale).clamp(-448.0, 448.0).view(padded.shape)[:out, :inp].to(torch.float8_e4m3fn)
    return q, _e8m0(exponent)


def quantize_mxfp4(w: torch.Tensor):
    """[..., K] -> (float4_e2m1fn_x2 [..., K/2], e8m0 [..., K/32]): scale 2^ceil(log2(amax/6)) per 32."""
    blocks = w.float().unflatten(-1, (-1, 32))
    exponent = _ceil_log2(blocks.abs().amax(-1).clamp(min=6 * 2.0 ** -126) / 6.0)
    x = blocks / _pow2(exponent)[..., None]
    return _e2m1_pack(x.flatten(-2)), _e8m0(exponent)


def quantize_nvfp4(w: torch.Tensor):
    """[..., N, K] -> (float4_e2m1fn_x2 [..., N, K/2], e4m3 [..., N, K/16], fp32 scale_2 [...], one per matrix), the
    ModelOpt way: scale_2 = amax/(6*448); block = e4m3(block_amax/(6*scale_2)), zero blocks 1, clamped to [2^-9, 448]."""
    w = w.float()
    amax = w.abs().amax(dim=(-2, -1))
    scale_2 = torch.where(amax > 0, amax / (6 * 448), 1.0)
    blocks = w.unflatten(-1, (-1, 16))
    block = blocks.abs().amax(-1) / (6 * scale_2[..., None, None])
    block = torch.where(block == 0, 1.0, block).clamp(2.0 ** -9, 448.0).to(torch.float8_e4m3fn)
    x = blocks / (block.float() * scale_2[..., None, None])[..., None]
    return _e2m1_pack(x.flatten(-2)), block, scale_2


# ----------------------------------------------------------------------------------------------------------------
# Tiny-checkpoint writer
# (name endings, std, mean) of the non-linear tensors; every other weight [out, in] ~ N(0, 1/in)
INIT = ((("embed.weight", "attn_sink"), 1.0, 0.0), (("norm.weight", "_scale"), 0.05, 1.0), (("_fn",), 1e-2, 0.0),
        (("_base", ".ape"), 0.1, 0.0), (("gate.bias",), 0.05, 0.0))


def random_weights(config, seed: int = 0, mtp: bool = False) -> dict[str, torch.Tensor]:
    """The float32 master weights write_checkpoint quantizes, name -> logical shape (the same for every fmt, so the
    formats approximate one model; the MTP block's come after the main model's, which they leave as they are).
    tid2eid rows hold k distinct expert ids."""
    c = _model_config(config)
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, spec in checkpoint_inventory(c, "bf16", mtp).items():
        if spec.need != "always":         # scales: made by the quantizers
            continue
        if name.endswith("tid2eid"):
            out[name] = torch.rand(spec.shape[0], c.n_routed_experts, generator=g).argsort(-1)[:, :spec.shape[1]]
            continue
        std, mean = next(((s, m) for ends, s, m in INIT if name.endswith(ends)), (spec.shape[-1] ** -0.5, 0.0))
        out[name] = torch.randn(spec.shape, generator=g) * std + mean
    return out


def _encode(c, fmt: str, seed: int, mtp: bool = False) -> dict[str, torch.Tensor]:
    """random_weights quantized into fmt's on-disk tensors (name -> tensor as stored)."""
    inv = checkpoint_inventory(c, fmt, mtp)
    g = torch.Generator().manual_seed(seed + 1)              # nvfp4 input scales
    tensors, masters = {}, random_weights(c, seed, mtp)
    blocks = [f"layers.{i}" for i in range(c.num_hidden_layers)] + \
        [f"mtp.{j}" for j in range(c.num_nextn_predict_layers if mtp else 0)]
    for block in (blocks if fmt != "bf16" else []):          # fp4 experts: all experts of a projection at once
        for proj in ("w1", "w3", "w2"):
            prefixes = [f"{block}.ffn.experts.{e}.{proj}" for e in range(c.n_routed_experts)]
            w = torch.stack([masters.pop(p + ".weight") for p in prefixes])
            if fmt == "fp8":                    # official MXFP4
                q, s = quantize_mxfp4(w)
                for i, p in enumerate(prefixes):
                    tensors.update({p + ".weight": q[i].view(torch.int8), p + ".scale": s[i]})
            else:                               # ModelOpt NVFP4: a global scale per matrix; w1, w3 see one input
                q, s, s2 = quantize_nvfp4(w)
                if proj != "w3":
                    x_scale = (1 + 7 * torch.rand(len(prefixes), generator=g)) / (6 * 448)
                for i, p in enumerate(prefixes):
                    tensors.update({p + ".weight": q[i].view(torch.uint8), p + ".weight_scale": s[i],
                                    p + ".weight_scale_2": s2[i], p + ".input_scale": x_scale[i]})
    for name, m in masters.items():
        dtype = inv[name].dtypes[0]
        if dtype == "F8_E4M3":
            q, s = quantize_fp8_block(m)
            tensors.update({name: q, name.rsplit(".", 1)[0] + ".scale": s})
        else:
            tensors[name] = m.to(ST_DTYPES[dtype])
    return tensors


def write_checkpoint(path: str, config, fmt: str, seed: int = 0, max_shard_bytes: int | None = None,
                     mtp: bool = False) -> str:
    """Write config.json + random weights (random_weights, quantized into fmt's on-disk layout) to path, as one
    model.safetensors or, given max_shard_bytes, shards + index; mtp: with the MTP block (its config entry
    num_nextn_predict_layers must be > 0). Atomic: built in a temp dir, then renamed."""
    path = os.path.abspath(path)
    if os.path.exists(path) and (not os.path.isdir(path) or os.listdir(path)):
        raise FileExistsError(f"{path}: exists and is not an empty directory")
    c = _model_config(config)
    group = {"fp8": 32, "nvfp4": 16}.get(fmt, 1)
    if c.hidden_size % group or c.moe_intermediate_size % group:
        raise ValueError(f"{fmt} experts need hidden_size and moe_intermediate_size divisible by {group}")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)        # tiny tensors: a thread pool costs more than it saves (10-50x on a busy host)
    if mtp and c.num_nextn_predict_layers < 1:
        raise ValueError("mtp=True needs num_nextn_predict_layers >= 1 in the config")
    try:
        tensors = _encode(c, fmt, seed, mtp)
    finally:
        torch.set_num_threads(threads)
    cfg = {"architectures": ["DeepseekV4ForCausalLM"], "model_type": "deepseek_v4", **c.to_dict()}
    cfg["quantization_config"] = {"fp8": QUANT_CONFIG, "nvfp4": NVFP4_CONFIG}.get(fmt)
    cfg["expert_dtype"] = None if fmt == "bf16" else "fp4"
    cfg = {k: v for k, v in cfg.items() if v is not None}

    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.tmp-", dir=os.path.dirname(path))
    try:
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(cfg, f, indent=2)
        if max_shard_bytes is None:
            save_safetensors(os.path.join(tmp, "model.safetensors"), tensors)
        else:
            shards, size = [{}], 0
            for name, t in tensors.items():
                nbytes = t.numel() * t.element_size()
                if shards[-1] and size + nbytes > max_shard_bytes:
                    shards.append({})
                    size = 0
                shards[-1][name], size = t, size + nbytes
            weight_map = {}
            for i, shard in enumerate(shards):
                file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                save_safetensors(os.path.join(tmp, file), shard)
                weight_map.update(dict.fromkeys(shard, file))
            total = sum(t.numel() * t.element_size() for t in tensors.values())
            with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
                json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=1)
        if os.path.isdir(path):
            os.rmdir(path)                                   # empty, checked above
        os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path
