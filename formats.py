"""
Checkpoint file formats: everything we read and write, and `load_model`, which streams a checkpoint
into model.py's transformer one tensor at a time (quantizing each block linear to NF4 as it arrives, for QLoRA).

    safetensors          read a tensor at a time (no mmap); a state file = tensors + a JSON object, one file
    HF folders           config.json + model.safetensors (or shards + index), written whole or not at all
    bitsandbytes 4-bit   the layout transformers + bitsandbytes write for an NF4 model
    GGUF                 llama.cpp's files: weights (dequantized by the gguf package), the tokenizer, export
    the default model    SmolLM2-135M-Instruct, converted once to an HF folder from the GGUF defaults.py fetches

Nothing here can run code from a file: safetensors and JSON only, never pickle. A file that is
missing, truncated or holds something unexpected is one ValueError / FileNotFoundError naming it.

    from formats import load_model
    model = load_model("default")                      # or an HF folder, or a .gguf file
    model = load_model("path/to/hf_folder", quantize="nf4")
"""
import json
import shutil
import struct
import sys
from pathlib import Path

import torch
import torch.nn as nn

from allocator import release_freed_memory
from defaults import cache_dir, default_gguf
from model import Llama, ModelArgs, precompute_rope
from nf4 import DYNAMIC_SIGNED, NF4_LEVELS, NF4Linear, quantize_nf4

# ----------------------------------------------------------------------------------------------
# safetensors

_ST_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "U8": torch.uint8,
              "I8": torch.int8, "I16": torch.int16, "I32": torch.int32, "I64": torch.int64,
              "F64": torch.float64, "BOOL": torch.bool}


def read_safetensors_header(file: Path) -> tuple[dict, dict, int]:
    """(tensor entries, __metadata__, offset of the data), every entry checked against the file's size."""
    size = file.stat().st_size
    with open(file, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{file}: truncated safetensors file (no header)")
        n = struct.unpack("<Q", head)[0]
        if n > size - 8:
            raise ValueError(f"{file}: not a safetensors file, or truncated (header of {n} bytes in a "
                             f"{size}-byte file)")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{file}: corrupt safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{file}: corrupt safetensors header (not a JSON object)")
    meta = header.pop("__metadata__", None) or {}
    end = 0
    for name, e in header.items():
        ok = (isinstance(e, dict) and e.get("dtype") in _ST_DTYPES and isinstance(e.get("shape"), list)
              and all(isinstance(s, int) and s >= 0 for s in e["shape"]) and isinstance(e.get("data_offsets"), list)
              and len(e["data_offsets"]) == 2 and all(isinstance(o, int) for o in e["data_offsets"]))
        if ok:
            a, b = e["data_offsets"]
            numel = 1
            for s in e["shape"]:
                numel *= s
            ok = 0 <= a <= b and b - a == numel * _ST_DTYPES[e["dtype"]].itemsize
        if not ok:
            raise ValueError(f"{file}: corrupt safetensors entry for {name!r}: {e}")
        end = max(end, e["data_offsets"][1])
    if size < 8 + n + end:
        raise ValueError(f"{file}: truncated safetensors file ({size} bytes, header says {8 + n + end})")
    return header, meta, 8 + n


def read_safetensors(file: Path):
    """Yield (name, tensor) one at a time with plain reads.

    We do not mmap (safetensors' safe_open does): mapped pages of the whole file count in the
    process's memory, which is what streaming is meant to avoid."""
    header, _, base = read_safetensors_header(file)
    with open(file, "rb") as f:
        for name, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
            a, b = info["data_offsets"]
            f.seek(base + a)
            buf = bytearray(b - a)
            f.readinto(buf)
            dt = _ST_DTYPES[info["dtype"]]
            t = torch.frombuffer(buf, dtype=dt) if b > a else torch.empty(0, dtype=dt)
            yield name, t.reshape(info["shape"])


def save_state(path: Path, tensors: dict, meta: dict):
    """Tensors and a JSON object (the non-tensor state) in one safetensors file; load_state reads it back."""
    from safetensors.torch import save_file
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path),
              metadata={"format": "pt", "state": json.dumps(meta)})


def load_state(path: Path) -> tuple[dict, dict]:
    """(tensors, JSON object) of a file save_state wrote; anything else is one ValueError naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    _, meta, _ = read_safetensors_header(path)
    try:
        state = json.loads(meta["state"])
    except (KeyError, TypeError, json.JSONDecodeError):
        raise ValueError(f"{path}: a safetensors file, but not a training checkpoint (no 'state' metadata)") from None
    return dict(read_safetensors(path)), state


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


# ----------------------------------------------------------------------------------------------
# HF folders

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                   "chat_template.jinja", "generation_config.json")


def atomic_dir(out: Path, write) -> Path:
    """Run write(tmp_dir), then rename tmp_dir to out: an interrupted write leaves no half folder."""
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


def write_tokenizer_files(source, out: Path):
    """The base's tokenizer files into `out`: copied from its folder, or rebuilt from its GGUF."""
    src = Path(default_model_dir() if str(source) == "default" else source)
    if src.suffix == ".gguf":
        from gguf import GGUFReader
        save_tokenizer_files(GGUFReader(str(src)), out)
        return
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy(src / name, Path(out) / name)


# ----------------------------------------------------------------------------------------------
# The bitsandbytes / transformers file layout of a 4-bit linear

_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def to_bnb_tensors(layer: NF4Linear, prefix: str) -> dict:
    """`prefix.weight` and its quant-state tensors, as transformers + bitsandbytes save them."""
    meta = dict(quant_type="nf4", blocksize=layer.block_size, dtype=_DTYPE_NAMES[layer.orig_dtype],
                shape=[layer.out_features, layer.in_features])
    t = {f"{prefix}.weight": layer.packed.reshape(-1, 1), f"{prefix}.weight.absmax": layer.absmax,
         f"{prefix}.weight.quant_map": NF4_LEVELS.clone()}
    if layer.double_quant:
        meta.update(nested_blocksize=256, nested_dtype="float32", nested_offset=layer.offset.item())
        t[f"{prefix}.weight.nested_absmax"] = layer.nested_absmax
        t[f"{prefix}.weight.nested_quant_map"] = DYNAMIC_SIGNED.clone()
    t[f"{prefix}.weight.quant_state.bitsandbytes__nf4"] = torch.tensor(list(json.dumps(meta).encode()), dtype=torch.uint8)
    if layer.bias is not None:
        t[f"{prefix}.bias"] = layer.bias
    return {k: v.detach().contiguous().cpu() for k, v in t.items()}


def from_bnb_tensors(t: dict, prefix: str, compute_dtype, where: str = "") -> NF4Linear:
    key = f"{prefix}.weight.quant_state.bitsandbytes__nf4"
    if key not in t:
        raise ValueError(f"{where}: {prefix}.weight has no NF4 quant state ({key}); only nf4 4-bit files are supported")
    meta = json.loads(bytes(t[key].tolist()).decode())
    if not torch.equal(t[f"{prefix}.weight.quant_map"].float(), NF4_LEVELS):
        raise ValueError(f"{where}: {prefix}.weight.quant_map is not the NF4 map")
    state = dict(packed=t[f"{prefix}.weight"].reshape(-1).view(torch.uint8), absmax=t[f"{prefix}.weight.absmax"],
                 shape=tuple(meta["shape"]), dtype=getattr(torch, meta["dtype"]), block_size=meta["blocksize"])
    if "nested_offset" in meta:
        if meta.get("nested_blocksize", 256) != 256:
            raise ValueError(f"{where}: {prefix}: nested block size {meta['nested_blocksize']} (only 256)")
        state.update(nested_absmax=t[f"{prefix}.weight.nested_absmax"],
                     offset=torch.tensor(float(meta["nested_offset"]), dtype=torch.float32))
    return NF4Linear(state, t.get(f"{prefix}.bias"), compute_dtype)


def bnb_quantization_config(compute_dtype) -> dict:
    """The `quantization_config` that transformers writes into config.json for a 4-bit NF4 model."""
    return {"quant_method": "bitsandbytes", "load_in_4bit": True, "load_in_8bit": False,
            "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True,
            "bnb_4bit_compute_dtype": _DTYPE_NAMES[compute_dtype], "bnb_4bit_quant_storage": "uint8",
            "llm_int8_skip_modules": None, "llm_int8_threshold": 6.0, "llm_int8_has_fp16_weight": False,
            "llm_int8_enable_fp32_cpu_offload": False}


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


# ----------------------------------------------------------------------------------------------
# GGUF (llama.cpp's `llama` architecture), in and out

_GGUF_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
               "output.weight": "lm_head.weight"}
_GGUF_BLOCK = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
               "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
               "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm",
               "ffn_norm": "post_attention_layernorm"}
_HF_NAMES = {v: k for k, v in _GGUF_NAMES.items()}
_HF_BLOCK = {v: k for k, v in _GGUF_BLOCK.items()}


def gguf_name(name: str, where: str) -> str:
    """GGUF tensor name -> HF name."""
    if name in _GGUF_NAMES:
        return _GGUF_NAMES[name]
    parts = name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in _GGUF_BLOCK:
        return f"model.layers.{parts[1]}.{_GGUF_BLOCK[parts[2]]}.{parts[3]}"
    raise ValueError(f"{where}: unexpected GGUF tensor {name!r}")


def gguf_tensor_name(name: str) -> str:
    """HF name -> GGUF tensor name (the inverse of gguf_name)."""
    if name in _HF_NAMES:
        return _HF_NAMES[name]
    _, _, i, rest = name.split(".", 3)
    mod, _, kind = rest.rpartition(".")
    return f"blk.{i}.{_HF_BLOCK[mod]}.{kind}"


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


def permute_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """HF's rotate-half layout -> llama.cpp's interleaved one (the inverse of unpermute_qk)."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


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


# The pre-tokenizer splits that llama.cpp names in `tokenizer.ggml.pre` (regexes from the HF tokenizer.json files).
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def gguf_tokenizer(reader, where):
    """(tokenizers' Tokenizer, bos id, eos id, chat template) rebuilt from a GGUF vocabulary:
    byte-level BPE ('gpt2') or SentencePiece ('llama')."""
    from tokenizers import AddedToken, Regex, Tokenizer as HFTokenizer, decoders, models, pre_tokenizers
    kind = gguf_field(reader, "tokenizer.ggml.model")
    if kind not in ("gpt2", "llama"):
        raise ValueError(f"{where}: GGUF tokenizer model {kind!r} is not supported (byte-level BPE 'gpt2' or "
                         "SentencePiece 'llama'); pass the HF folder with tokenizer.json or tokenizer.model instead")
    tokens = gguf_field(reader, "tokenizer.ggml.tokens")
    types = gguf_field(reader, "tokenizer.ggml.token_type")
    bos, eos = gguf_field(reader, "tokenizer.ggml.bos_token_id"), gguf_field(reader, "tokenizer.ggml.eos_token_id")
    template = gguf_field(reader, "tokenizer.chat_template", "")
    if kind == "llama":
        return _spm_bpe_tokenizer(tokens, gguf_field(reader, "tokenizer.ggml.scores"), types), bos, eos, template
    merges = [tuple(m.split(" ", 1)) for m in gguf_field(reader, "tokenizer.ggml.merges") or []]
    tk = HFTokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges, fuse_unk=False))
    pre = gguf_field(reader, "tokenizer.ggml.pre", "default")
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=pre not in ("llama-bpe", "qwen2"))
    if pre == "smollm":
        tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    elif pre in ("llama-bpe", "qwen2"):
        split = pre_tokenizers.Split(Regex(_LLAMA3_SPLIT if pre == "llama-bpe" else _QWEN2_SPLIT), "isolated")
        tk.pre_tokenizer = pre_tokenizers.Sequence([split, byte_level])
    else:
        tk.pre_tokenizer = byte_level
    tk.decoder = decoders.ByteLevel()
    # Control (3) and user-defined (4) tokens match whole, before BPE, as HF's added tokens do.
    tk.add_tokens([AddedToken(tokens[i], special=types[i] == 3, normalized=False)
                   for i in range(len(tokens)) if types[i] in (3, 4)])
    return tk, bos, eos, template


def _spm_bpe_tokenizer(tokens, scores, types):
    """A SentencePiece BPE vocabulary (llama.cpp's 'llama' model: pieces, scores, types) as a tokenizers
    BPE. SentencePiece merges the pair whose result has the highest score; BPE applies merges in list
    order, so the merge list is every split of every piece into two pieces, ordered by the piece's score."""
    from tokenizers import AddedToken, Tokenizer as HFTokenizer, decoders, models, normalizers
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = []
    for piece, score in sorted(zip(tokens, scores), key=lambda x: -x[1]):
        local = [(piece[:k], piece[k:]) for k in range(1, len(piece)) if piece[:k] in vocab and piece[k:] in vocab]
        merges += sorted(local, key=lambda m: (vocab[m[0]], vocab[m[1]]))
    unk = next((t for t, ty in zip(tokens, types) if ty == 2), None)
    tk = HFTokenizer(models.BPE(vocab, merges, unk_token=unk, fuse_unk=True, byte_fallback=True))
    # SentencePiece marks word starts with U+2581 and adds one at the very start (add_dummy_prefix).
    tk.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    tk.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                    decoders.Strip(" ", 1, 0)])
    tk.add_tokens([AddedToken(tokens[i], special=True, normalized=False)
                   for i in range(len(tokens)) if types[i] in (3, 4)])
    return tk


def save_tokenizer_files(reader, out: Path):
    """tokenizer.json + tokenizer_config.json rebuilt from a GGUF, so the folder is a complete HF model."""
    tk, bos, eos, template = gguf_tokenizer(reader, "gguf")
    tk.save(str(Path(out) / "tokenizer.json"))
    cfg = dict(tokenizer_class="PreTrainedTokenizerFast", bos_token=tk.id_to_token(bos), eos_token=tk.id_to_token(eos),
               chat_template=template, model_max_length=8192, clean_up_tokenization_spaces=False)
    (Path(out) / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))


def write_gguf(m: Llama, tok, source, path: Path, kind: str):
    """The model as a llama.cpp GGUF file: f16, or q8_0 for the matrices (norms stay f32, as llama.cpp keeps them)."""
    import gguf
    import numpy as np
    a = m.args
    if a.attention_bias or a.rope_scaling:
        raise ValueError("GGUF export supports plain Llama models (no q/k/v biases, no rope scaling)")
    tmp = path.with_name(path.name + ".tmp")
    w = gguf.GGUFWriter(str(tmp), "llama")
    w.add_name(Path(str(source)).stem)
    add_gguf_llama_shape(w, a)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0 if kind == "q8_0" else gguf.LlamaFileType.MOSTLY_F16)
    add_gguf_tokenizer(w, tok, source, a.vocab_size)
    qtype = gguf.GGMLQuantizationType.Q8_0 if kind == "q8_0" else gguf.GGMLQuantizationType.F16
    for name, t in model_tensors(m):
        t = t.detach().float().cpu()
        if name.endswith("q_proj.weight"):
            t = permute_qk(t, a.n_heads)
        elif name.endswith("k_proj.weight"):
            t = permute_qk(t, a.n_kv_heads)
        arr = t.numpy()
        if t.ndim == 1:
            w.add_tensor(gguf_tensor_name(name), arr.astype(np.float32))
        elif qtype == gguf.GGMLQuantizationType.Q8_0 and arr.shape[-1] % 32 == 0:
            w.add_tensor(gguf_tensor_name(name), gguf.quants.quantize(arr, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(gguf_tensor_name(name), arr.astype(np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    tmp.rename(path)


def add_gguf_llama_shape(w, a: ModelArgs):
    """The llama.* keys that give a GGUF model's shape, as llama.cpp's converter writes them."""
    w.add_block_count(a.n_layers)
    w.add_context_length(a.max_seq_len)
    w.add_embedding_length(a.dim)
    w.add_feed_forward_length(a.intermediate_size)
    w.add_head_count(a.n_heads)
    w.add_head_count_kv(a.n_kv_heads)
    w.add_key_length(a.head_dim)
    w.add_value_length(a.head_dim)
    w.add_rope_dimension_count(a.head_dim)
    w.add_rope_freq_base(a.rope_theta)
    w.add_layer_norm_rms_eps(a.norm_eps)
    w.add_vocab_size(a.vocab_size)


# llama.cpp refuses a BPE vocabulary whose `tokenizer.ggml.pre` it does not know, and splits text by that
# name. Its converter (convert_hf_to_gguf.py, get_vocab_base_pre) names it by a hash: sha256 of str() of the
# ids the tokenizer gives this text (BOS included where the tokenizer adds one). These are its hashes of
# the Llama, Mistral, Qwen and SmolLM families' tokenizers, copied from llama.cpp b11434's converter.
_PRE_CHECK_TEXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫\ufe0f (multiple emojis "
    "concatenated) \u2705 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 "
    "\u1780\u17b6\u1793\u17cb\u178f\u17c2\u1796\u17b7\u179f\u17c1\u179f\u17a2\u17b6\u1785😁 ?\u6211\u60f3\u5728apple"
    "\u5de5\u4f5c1314151\u5929\uff5e ------======= \u043d\u0435\u0449\u043e \u043d\u0430 \u0411\u044a\u043b\u0433\u0430\u0440"
    "\u0441\u043a\u0438 \'\'\'\'\'\'```````\"\"\"\"......!!!!!!?????? I\'ve been \'told he\'s there, \'RE you sure? \'M not "
    "sure I\'ll make it, \'D you like some tea? We\'Ve a\'lL")
_PRE_BY_HASH = {
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",   # meta-llama/Meta-Llama-3-8B
    "c136ed14d01c2745d4f60a9596ae66800e2b61fa45643e72436041855ad4089d": "smaug-bpe",   # Smaug-Llama-3-70B-Instruct
    "d353350c764d8c3b39c763113960e4fb4919bea5fbf208a0e3b22e8469dc7406": "llama4",      # Llama-4-Scout-17B-16E
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",      # HuggingFaceTB/SmolLM-135M
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",       # Qwen/Qwen1.5-7B
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",       # Qwen/Qwen3-Embedding-0.6B
    "d30d75d9059f1aa2c19359de71047b3ae408c70875e8a3ccf8c5fba56c9d8af4": "qwen35",      # Qwen/Qwen3.5-9B-Instruct
    "b3f499bb4255f8ca19fccd664443283318f2fd2414d5e0b040fbdd0cc195d6c5": "deepseek-r1-qwen",  # R1-Distill-Qwen-1.5B
    "877081d19cf6996e2c4ff0e1236341e9b7bde288f5311a56a937f0afbbb3aeb5": "deepseek-v3",  # deepseek-ai/DeepSeek-V3
    "049ecf7629871e3041641907f3de7c733e4dbfdc736f57d882ba0b0845599754": "deepseek-llm",  # deepseek-llm-7b-base
    "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": "tekken",      # Mistral-Nemo-Base-2407
    "0e9433cbbb161f89e264eb32e8e64bfe69e834973ffca5d41d3948a604a3e2a3": "pixtral",     # mistral-community/pixtral-12b
    "9d032fcbd5501f4a38150912590928bfb36091efb5df11b8e2124b0390e3fb1e": "falcon3",     # tiiuae/Falcon3-7B-Base
    "b6dc8df998e1cfbdc4eac8243701a65afe638679230920b50d6f17d81c098166": "olmo",        # allenai/OLMo-1.7-7B-hf
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",       # openai-community/gpt2
}


def gguf_pre_tokenizer(tok, tokenizer_json: dict) -> str:
    """`tokenizer.ggml.pre` as llama.cpp's converter names it; for a tokenizer it does not know, the
    closest of the splits llama.cpp has, said on stderr (llama.cpp's converter would refuse it)."""
    import hashlib
    name = _PRE_BY_HASH.get(hashlib.sha256(str(tok.encode_text(_PRE_CHECK_TEXT)).encode()).hexdigest())
    if name:
        return name
    pre_json = json.dumps(tokenizer_json.get("pre_tokenizer"))
    name = ("smollm" if "Digits" in pre_json else "llama-bpe" if "\\\\p{N}{1,3}" in pre_json
            else "qwen2" if "\\\\p{N}" in pre_json else "gpt-2")
    print(f"warning: the tokenizer's pre-tokenizer is not one llama.cpp's converter knows by its hash; "
          f"wrote tokenizer.ggml.pre = {name!r}, the closest split llama.cpp has", file=sys.stderr)
    return name


def add_gguf_tokenizer(w, tok, source, vocab_size):
    """Tokenizer metadata: copied from the base GGUF, or built from tokenizer.json (byte-level BPE) or
    tokenizer.model (SentencePiece), as llama.cpp's converter builds them."""
    src = default_model_dir() if str(source) == "default" else Path(source)
    tj = src / "tokenizer.json" if src.is_dir() else None
    j = json.loads(tj.read_text()) if tj is not None and tj.is_file() else None
    if j is not None and j["model"].get("byte_fallback") and (src / "tokenizer.model").is_file():
        j = None   # Llama 2 / Mistral folders carry both; llama.cpp's converter takes the SentencePiece model
    scores = merges = None
    if src.suffix == ".gguf":
        from gguf import GGUFReader
        r = GGUFReader(str(src))
        kind = gguf_field(r, "tokenizer.ggml.model")
        tokens, types = gguf_field(r, "tokenizer.ggml.tokens"), gguf_field(r, "tokenizer.ggml.token_type")
        merges, pre = gguf_field(r, "tokenizer.ggml.merges"), gguf_field(r, "tokenizer.ggml.pre", "default")
        scores = gguf_field(r, "tokenizer.ggml.scores") if kind == "llama" else None
    elif j is not None:
        if j["model"]["type"] != "BPE" or j["model"].get("byte_fallback"):
            raise ValueError(f"{tj}: GGUF export supports byte-level BPE tokenizer.json files and SentencePiece "
                             "tokenizer.model files; this tokenizer.json is neither (keep its tokenizer.model beside it)")
        kind, vocab = "gpt2", dict(j["model"]["vocab"])
        special = {t["content"]: t["id"] for t in j.get("added_tokens", [])}
        vocab.update(special)
        tokens = [f"[PAD{i}]" for i in range(vocab_size)]
        for t, i in vocab.items():
            if i < vocab_size:
                tokens[i] = t
        types = [3 if t in special else 1 for t in tokens]
        merges = [m if isinstance(m, str) else " ".join(m) for m in j["model"]["merges"]]
        pre = gguf_pre_tokenizer(tok, j)
    elif src.is_dir() and (src / "tokenizer.model").is_file():
        kind, pre = "llama", "default"
        tokens, scores, types = sentencepiece_vocab(src / "tokenizer.model", vocab_size)
    else:
        raise ValueError(f"{src}: no tokenizer.json or tokenizer.model to export to GGUF")
    w.add_tokenizer_model(kind)
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    if scores is not None:
        w.add_token_scores(scores)
    if merges:
        w.add_token_merges(merges)
    for add, tid in ((w.add_bos_token_id, tok.bos_id), (w.add_eos_token_id, tok.eos_id)):
        if tid is not None and tid >= 0:
            add(tid)
    eot = sorted(tok.stop_ids - {tok.eos_id})
    if eot:
        w.add_eot_token_id(eot[0])   # llama.cpp stops at the EOS and at this end-of-turn token
    w.add_add_bos_token(bool(tok.add_bos))
    w.add_add_eos_token(bool(tok.add_eos))
    if tok.chat_template:
        w.add_chat_template(tok.chat_template)


def sentencepiece_vocab(model_file: Path, vocab_size: int):
    """(pieces, scores, GGUF token types) of a SentencePiece model, padded to vocab_size as llama.cpp's
    converter pads it (types: 1 normal, 2 unknown, 3 control, 5 unused, 6 byte)."""
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=str(model_file))
    tokens, scores, types = [f"[PAD{i}]" for i in range(vocab_size)], [-1000.0] * vocab_size, [5] * vocab_size
    for i in range(min(sp.get_piece_size(), vocab_size)):
        tokens[i], scores[i] = sp.id_to_piece(i), sp.get_score(i)
        types[i] = (2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 5 if sp.is_unused(i)
                    else 6 if sp.is_byte(i) else 1)
    return tokens, scores, types


# ----------------------------------------------------------------------------------------------
# Loading: stream a checkpoint into a model built on the meta device

def gpu_dtype(device) -> torch.dtype:
    """bf16 where the GPU computes it natively (compute capability 8.0, Ampere, and later), else fp16:
    torch.cuda.is_bf16_supported() also says yes where bf16 is only emulated (a T4, a V100), and
    emulated bf16 is slow and falls back to the math attention kernel."""
    return torch.bfloat16 if torch.cuda.get_device_capability(device) >= (8, 0) else torch.float16


def _target_dtype(dtype, device):
    if dtype is not None:
        return dtype
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    # On a CPU without bf16 matmul units fp32 is ~50x faster than bf16 (DESIGN.md), so fp32 there.
    return gpu_dtype(dev) if dev.type == "cuda" else torch.float32


def _is_quantizable(name: str) -> bool:
    # QLoRA quantizes the linears inside the blocks; embeddings, norms and lm_head stay 16-bit.
    return name.startswith("model.layers.") and name.endswith("_proj.weight")


def _block_of(name: str) -> int | None:
    """The block a parameter name belongs to (model.layers.<i>....), or None."""
    return int(name.split(".")[2]) if name.startswith("model.layers.") else None


class _Placer:
    """Fills a model built on the meta device, one tensor at a time, as the tensors arrive."""

    def __init__(self, model: Llama, dtype, device, quantize, where, on_block=None):
        self.model, self.dtype, self.device, self.quantize, self.where = model, dtype, device, quantize, where
        self.expected = {n for n, _ in model.named_parameters(remove_duplicate=True)}
        self.seen = set()
        self.on_block, self.left = on_block, {}   # tensors each block still waits for
        for n in self.expected if on_block else ():
            if (i := _block_of(n)) is not None:
                self.left[i] = self.left.get(i, 0) + 1

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
        if self.quantize and pname == "weight" and _is_quantizable(name):
            # The one place where a linear becomes 4-bit as it arrives: the 16-bit model never exists whole.
            parent, _, attr = mod_name.rpartition(".")
            w = tensor.to(self.device)
            state = quantize_nf4(w) if self.quantize == "nf4" else self.quantize(name, w)
            q = NF4Linear(state, bias=None, compute_dtype=self.dtype)
            if mod.bias is not None:
                q.bias = mod.bias   # still meta; filled when its own tensor arrives
            setattr(self.model.get_submodule(parent), attr, q)
            release_freed_memory()
        else:
            t = tensor.to(device=self.device, dtype=self.dtype)
            setattr(mod, pname, nn.Parameter(t, requires_grad=False))
            if tensor.nbytes > 1 << 24:
                release_freed_memory()
        if self.on_block and (i := _block_of(name)) is not None:   # a block whole: the caller may take it now
            self.left[i] -= 1
            if not self.left[i]:
                self.on_block(i, self.model.model.layers[i])

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
            p.requires_grad_(p.is_floating_point())   # NF4 codes that on_block made parameters stay frozen
        return m.eval()


def build_empty(args: ModelArgs) -> Llama:
    """The model with no storage (meta tensors): its shapes, for checks and for the placer to fill."""
    with torch.device("meta"):
        model = Llama(args)
    return model


def load_model(source, dtype=None, quantize=None, device=None, on_block=None) -> Llama:
    """Load an HF folder, a .gguf file or "default", streaming tensor by tensor (see _Placer).
    dtype None = bf16 on a GPU that has it, fp32 on CPU; quantize "nf4" = the block linears in NF4, or
    a function (name, 16-bit weight) -> NF4 state that quantizes them its own way (LoftQ).
    on_block(i, block): called as soon as block i has all its tensors (train.py --fsdp shards it then, so
    no rank ever holds the whole model); blocks a file does not stream one by one are not passed."""
    if quantize not in (None, "nf4") and not callable(quantize):
        raise ValueError(f"quantize={quantize!r}: only None or 'nf4'")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = _target_dtype(dtype, device)
    path = Path(default_model_dir() if str(source) == "default" else source)
    if path.suffix == ".gguf" and path.is_file():
        args, _, tensors = read_gguf(path)
        placer = _Placer(build_empty(args), dtype, device, quantize, str(path), on_block)
        for name, t in tensors:
            placer.place(name, t)
        model = placer.finish()
    else:
        args = read_args(path)
        placer = _Placer(build_empty(args), dtype, device, quantize, str(path), on_block)
        if "quantization_config" in args.extra:
            model = _load_bnb_4bit(path, placer)
        else:
            for file in safetensors_files(path):
                for name, t in read_safetensors(file):
                    placer.where = str(file)
                    placer.place(name, t)
            placer.where = str(path)
            model = placer.finish()
    model.source = str(source)   # named in errors about adapters trained on another base
    return model


def read_args(source) -> ModelArgs:
    """A model's shape (ModelArgs) from its config.json or GGUF header, without reading its weights."""
    p = Path(default_model_dir() if str(source) == "default" else source)
    if p.suffix == ".gguf" and p.is_file():
        from gguf import GGUFReader
        try:
            reader = GGUFReader(str(p))
        except Exception as e:
            raise ValueError(f"{p}: not a readable GGUF file ({e})") from None
        return gguf_args(reader, str(p))
    if not p.is_dir():
        raise FileNotFoundError(f"{p}: no such model folder or .gguf file")
    cfg = p / "config.json"
    if not cfg.is_file():
        raise FileNotFoundError(f"{cfg}: missing (an HF model folder needs config.json)")
    try:
        return ModelArgs.from_hf_config(json.loads(cfg.read_text()), str(cfg))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{cfg}: not valid JSON ({e})") from None
    except KeyError as e:
        raise ValueError(f"{cfg}: missing field {e}") from None


# ----------------------------------------------------------------------------------------------
# The default model

def default_model_dir() -> Path:
    """SmolLM2-135M-Instruct as an fp32 HF folder, converted once from the GGUF in the PyPI wheel."""
    out = cache_dir() / "SmolLM2-135M-Instruct"
    if not (out / "config.json").is_file():
        src = default_gguf()
        print(f"converting {src.name} to an HF folder at {out} (once) ...", file=sys.stderr)
        args, reader, tensors = read_gguf(src)
        args.extra = dict(args.to_hf_config(), torch_dtype="float32", bos_token_id=1, eos_token_id=2)

        def write(tmp):
            save_hf_folder(tmp, args, tensors)
            save_tokenizer_files(reader, tmp)   # the tokenizer is rebuilt from the GGUF vocabulary
        atomic_dir(out, write)
    return out
