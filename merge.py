"""
Merge a LoRA or QLoRA adapter into its base and write what deployment tools load.

    python merge.py --adapter runs/qlora --out runs/merged                       # default base, bf16 HF folder
    python merge.py --model path/to/base --adapter runs/lora --out merged --dtype float16
    python merge.py --adapter runs/qlora --out merged --requantize nf4           # + merged-nf4/ (bitsandbytes layout)
    python merge.py --adapter runs/qlora --out merged --gguf q8_0                # + merged.q8_0.gguf (llama.cpp, ollama)

A QLoRA adapter was trained against NF4 weights, but it is merged into the base *reloaded in
16-bit*: merging into the 4-bit weights would need requantizing the sum, which rounds away much of a
small update (audit.py measures how much). --from-nf4 merges into the dequantized NF4 weights instead
(reproduces the trained model exactly, quantization error included). The output folder is written
under a temporary name and renamed when complete; an adapter that does not fit the base is refused
before anything is written. At the end a fidelity line compares the merged model, as written, with
base + adapter.
"""
import argparse
import json
import shutil
import sys
from pathlib import Path

import torch

from data import load_tokenizer, prompt_format, render
from lora import load_adapter, merge_lora, read_adapter
from model import (ModelArgs, atomic_dir, build_empty, default_model_dir, gguf_args, load_model, model_tensors,
                   save_hf_folder)
from nf4 import NF4Linear, bnb_quantization_config

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                   "chat_template.jinja", "generation_config.json")
PROBE_PROMPTS = ["What is the capital of France?", "Write a haiku about autumn.",
                 "Explain what a linked list is in two sentences.", "Give three tips for staying focused."]


def base_args(source) -> ModelArgs:
    """The base model's shape, read without loading its weights."""
    if str(source) == "default":
        source = default_model_dir()
    p = Path(source)
    if p.suffix == ".gguf":
        from gguf import GGUFReader
        return gguf_args(GGUFReader(str(p)), str(p))
    if not (p / "config.json").is_file():
        raise FileNotFoundError(f"{p}: no config.json (need an HF folder, a .gguf file or 'default')")
    return ModelArgs.from_hf_config(json.loads((p / "config.json").read_text()), str(p / "config.json"))


def check_base_and_adapter(source, adapter):
    """Everything that can refuse a merge, checked before any weight is loaded or file written: the
    adapter loaded into a weightless (meta) copy of the base surfaces shape and target errors, and
    the base's config.json is built (it refuses what it cannot describe)."""
    args = base_args(source)
    load_adapter(build_empty(args), adapter)
    args.to_hf_config()


@torch.no_grad()
def probe_logits(model, tok, fmt) -> list[torch.Tensor]:
    outs = []
    for q in PROBE_PROMPTS:
        text = "".join(t for t, _ in render([dict(role="user", content=q)], fmt, tok, generation=True))
        ids = torch.tensor([tok.encode(text)], device=next(model.parameters()).device)
        outs.append(model(ids)[0].float().cpu())
    return outs


def fidelity(ref: list, new: list) -> dict:
    d = torch.cat([(a - b).abs().reshape(-1) for a, b in zip(ref, new)])
    p, q = torch.cat(ref).log_softmax(-1), torch.cat(new).log_softmax(-1)
    return dict(max_abs_logit_diff=d.max().item(), mean_abs_logit_diff=d.mean().item(),
                kl=(p.exp() * (p - q)).sum(-1).mean().item())


def copy_tokenizer(source, out: Path):
    if str(source) == "default":
        source = default_model_dir()
    src = Path(source)
    if src.suffix == ".gguf":
        from gguf import GGUFReader
        from data import save_tokenizer_files
        save_tokenizer_files(GGUFReader(str(src)), out)
        return
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy(src / name, out / name)


def requantize_nf4(model):
    """Replace every block linear of a (merged) 16-bit model by its NF4 version, in place."""
    for name, mod in list(model.named_modules()):
        if isinstance(mod, torch.nn.Linear) and name.startswith("model.layers."):
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent), attr, NF4Linear.from_linear(mod, compute_dtype=mod.weight.dtype))


def merge(model: str, adapter: str, out: str, dtype=torch.bfloat16, requantize: str | None = None,
          gguf: str | None = None, from_nf4: bool = False, device=None, log=print) -> dict:
    out = Path(out)
    if gguf not in (None, "f16", "q8_0"):
        raise ValueError(f"--gguf {gguf!r}: choose f16 or q8_0")
    if requantize not in (None, "nf4"):
        raise ValueError(f"--requantize {requantize!r}: only nf4")
    read_adapter(adapter)
    check_base_and_adapter(model, adapter)   # before anything is written
    # Compute in fp32 on CPU (bf16 matmuls are ~50x slower there); the files are written in `dtype`.
    compute = None if (device or ("cuda" if torch.cuda.is_available() else "cpu")) != "cpu" else torch.float32
    tok = load_tokenizer(model)
    fmt = prompt_format(tok)
    m = load_model(model, compute, quantize="nf4" if from_nf4 else None, device=device)
    cfg = load_adapter(m, adapter)
    ref = probe_logits(m, tok, fmt)   # base + adapter, unmerged
    merge_lora(m, on_nf4="dequantize" if from_nf4 else None, unwrap=True)
    log(f"merged rank-{cfg['r']} adapter from {adapter} into {model}"
        f"{' (dequantized NF4 weights)' if from_nf4 else ' (16-bit weights)'}")
    cast = lambda: ((n, t.to(dtype) if t.is_floating_point() else t) for n, t in model_tensors(m))

    def write(tmp):
        save_hf_folder(tmp, m.args, cast(), config_extra=dict(torch_dtype=str(dtype).replace("torch.", "")))
        copy_tokenizer(model, tmp)
    atomic_dir(out, write)
    log(f"wrote {out}")
    result = dict(out=str(out))
    if gguf:
        path = out.with_name(f"{out.name}.{gguf}.gguf")
        write_gguf(m, tok, model, path, gguf)
        result["gguf"] = str(path)
        log(f"wrote {path}")
    if requantize:
        requantize_nf4(m)
        qout = out.with_name(out.name + "-nf4")

        def write_q(tmp):
            save_hf_folder(tmp, m.args, model_tensors(m),
                           config_extra=dict(quantization_config=bnb_quantization_config(dtype)))
            copy_tokenizer(model, tmp)
        atomic_dir(qout, write_q)
        result["nf4"] = str(qout)
        log(f"wrote {qout} (NF4, bitsandbytes layout)")
    del m
    merged = load_model(out, compute, device=device)
    fid = fidelity(ref, probe_logits(merged, tok, fmt))
    result["fidelity"] = fid
    log(f"fidelity, merged ({str(dtype).replace('torch.', '')}) vs base + adapter on {len(PROBE_PROMPTS)} prompts: "
        f"max |dlogit| {fid['max_abs_logit_diff']:.4f}, mean {fid['mean_abs_logit_diff']:.5f}, KL {fid['kl']:.2e}")
    return result


# ----------------------------------------------------------------------------------------------
# GGUF export (llama.cpp's `llama` architecture)

_TO_GGUF = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
            "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
            "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


def gguf_tensor_name(name: str) -> str:
    if name == "model.embed_tokens.weight":
        return "token_embd.weight"
    if name == "model.norm.weight":
        return "output_norm.weight"
    if name == "lm_head.weight":
        return "output.weight"
    _, _, i, rest = name.split(".", 3)
    mod, _, kind = rest.rpartition(".")
    return f"blk.{i}.{_TO_GGUF[mod]}.{kind}"


def permute_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """HF's rotate-half layout -> llama.cpp's interleaved one (the inverse of model.unpermute_qk)."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def write_gguf(m, tok, source, path: Path, kind: str):
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
        if t.ndim == 1:   # norms stay F32, as llama.cpp's converter keeps them
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


def add_gguf_tokenizer(w, tok, source, vocab_size):
    """Tokenizer metadata: copied from the base GGUF, or built from tokenizer.json (byte-level BPE)."""
    src = default_model_dir() if str(source) == "default" else Path(source)
    tj = src / "tokenizer.json" if src.is_dir() else None
    if src.suffix == ".gguf":
        from gguf import GGUFReader
        from model import gguf_field
        r = GGUFReader(str(src))
        tokens, types = gguf_field(r, "tokenizer.ggml.tokens"), gguf_field(r, "tokenizer.ggml.token_type")
        merges, pre = gguf_field(r, "tokenizer.ggml.merges"), gguf_field(r, "tokenizer.ggml.pre", "default")
        template = gguf_field(r, "tokenizer.chat_template", "")
    elif tj is not None and tj.is_file():
        j = json.loads(tj.read_text())
        if j["model"]["type"] != "BPE":
            raise ValueError(f"{tj}: GGUF export supports byte-level BPE tokenizers only")
        vocab = dict(j["model"]["vocab"])
        special = {t["content"]: t["id"] for t in j.get("added_tokens", [])}
        vocab.update(special)
        tokens = [f"[PAD{i}]" for i in range(vocab_size)]
        for t, i in vocab.items():
            if i < vocab_size:
                tokens[i] = t
        types = [3 if t in special else 1 for t in tokens]
        merges = [m if isinstance(m, str) else " ".join(m) for m in j["model"]["merges"]]
        pre_json = json.dumps(j.get("pre_tokenizer"))
        pre = "smollm" if "Digits" in pre_json else "llama-bpe" if "\\\\p{N}{1,3}" in pre_json else "gpt2"
        template = tok.chat_template
    else:
        raise ValueError(f"{src}: no tokenizer.json to export to GGUF")
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    if tok.bos_id is not None:
        w.add_bos_token_id(tok.bos_id)
    if tok.eos_id is not None:
        w.add_eos_token_id(tok.eos_id)
    if template:
        w.add_chat_template(template)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default", help="the base: HF folder, .gguf file, or 'default'")
    p.add_argument("--adapter", required=True, help="run directory (or folder) with the peft-format adapter")
    p.add_argument("--out", required=True, help="output folder for the merged HF model")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                   help="dtype of the written weights (default bfloat16)")
    p.add_argument("--requantize", choices=["nf4"], help="also write OUT-nf4/, a 4-bit folder transformers+bitsandbytes load")
    p.add_argument("--gguf", choices=["f16", "q8_0"], help="also write OUT.<type>.gguf for llama.cpp / ollama")
    p.add_argument("--from-nf4", action="store_true",
                   help="merge into the dequantized NF4 weights (what QLoRA trained against) instead of the 16-bit base")
    p.add_argument("--device", help="cpu or cuda (default: cuda if available)")
    a = p.parse_args(argv)
    try:
        merge(a.model, a.adapter, a.out, getattr(torch, a.dtype), a.requantize, a.gguf, a.from_nf4, a.device)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
