"""
Merge a LoRA or QLoRA adapter into its base and write what deployment tools load.

    python merge.py --adapter runs/qlora --out runs/merged                       # default base, bf16 HF folder
    python merge.py --model path/to/base --adapter runs/lora --out merged --dtype float16
    python merge.py --adapter runs/qlora --out merged --requantize nf4           # + merged-nf4/ (bitsandbytes layout)
    python merge.py --adapter runs/qlora --out merged --gguf q8_0                # + merged.q8_0.gguf (llama.cpp, ollama)

A QLoRA adapter was trained against NF4 weights, but it is merged into the base *reloaded in
16-bit*: merging into the 4-bit weights would need requantizing the sum, which rounds away much of a
small update (audit.py measures how much). --from-nf4 merges into the dequantized NF4 weights instead
(reproduces the trained model exactly, quantization error included). A LoftQ adapter is always merged
over the NF4 codes it was trained with (dequantized) in the layers it adapts: it starts by undoing
their error, so merged into W it would count that error twice. DoRA adapters merge as peft merges them:
each row of W + sBA rescaled to its learned length. The output folder is written
under a temporary name and renamed when complete; an adapter that does not fit the base is refused
before anything is written. At the end a fidelity line compares the merged model, as written, with
base + adapter.
"""
import allocator

if __name__ == "__main__":   # before torch is imported: re-executes this command line with mimalloc, if installed
    allocator.preload()

import argparse
import sys
from pathlib import Path

import torch

from data import encode_prompt, load_tokenizer, prompt_format
from formats import (atomic_dir, bnb_quantization_config, build_empty, load_model, model_tensors, read_args,
                     save_hf_folder, write_gguf, write_tokenizer_files)
from lora import load_adapter, merge_lora, read_adapter
from nf4 import NF4Linear

PROBE_PROMPTS = ["What is the capital of France?", "Write a haiku about autumn.",
                 "Explain what a linked list is in two sentences.", "Give three tips for staying focused."]


def check_base_and_adapter(source, adapter):
    """Everything that can refuse a merge, checked before any weight is loaded or file written: the
    adapter loaded into a weightless (meta) copy of the base surfaces shape and target errors, and
    the base's config.json is built (it refuses what it cannot describe)."""
    args = read_args(source)
    load_adapter(build_empty(args), adapter)
    args.to_hf_config()


@torch.no_grad()
def probe_logits(model, tok, fmt) -> list[torch.Tensor]:
    outs = []
    for q in PROBE_PROMPTS:
        ids = torch.tensor([encode_prompt(tok, fmt, [dict(role="user", content=q)])],
                           device=next(model.parameters()).device)
        outs.append(model(ids)[0].float().cpu())
    return outs


def fidelity(ref: list, new: list) -> dict:
    d = torch.cat([(a - b).abs().reshape(-1) for a, b in zip(ref, new)])
    p, q = torch.cat(ref).log_softmax(-1), torch.cat(new).log_softmax(-1)
    return dict(max_abs_logit_diff=d.max().item(), mean_abs_logit_diff=d.mean().item(),
                kl=(p.exp() * (p - q)).sum(-1).mean().item())


def requantize_nf4(model):
    """Replace every block linear of a (merged) 16-bit model by its NF4 version, in place."""
    for name, mod in list(model.named_modules()):
        if isinstance(mod, torch.nn.Linear) and name.startswith("model.layers."):
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent), attr, NF4Linear.from_linear(mod, compute_dtype=mod.weight.dtype))


def merge(model: str, adapter: str, out: str, dtype=torch.bfloat16, requantize: str | None = None,
          gguf: str | None = None, from_nf4: bool = False, device=None, log=print, force: bool = False) -> dict:
    out = Path(out)
    if gguf not in (None, "f16", "q8_0"):
        raise ValueError(f"--gguf {gguf!r}: choose f16 or q8_0")
    if requantize not in (None, "nf4"):
        raise ValueError(f"--requantize {requantize!r}: only nf4")
    read_adapter(adapter)
    check_base_and_adapter(model, adapter)   # before anything is written
    # Compute in fp32 on every device (a bf16 merge would round embeddings, norms and W + BA through
    # bf16 before a float16/float32 file is written); the files are written in `dtype`, rounded once.
    compute = torch.float32
    tok = load_tokenizer(model)
    fmt = prompt_format(tok)
    m = load_model(model, compute, quantize="nf4" if from_nf4 else None, device=device)
    cfg = load_adapter(m, adapter, force)   # refuses an adapter trained on another base: before any write
    ref = probe_logits(m, tok, fmt)   # base + adapter, unmerged
    merge_lora(m, on_nf4="dequantize" if from_nf4 else None, unwrap=True)
    where = " (dequantized NF4 weights)" if from_nf4 else " (16-bit weights)"
    if cfg.get("loftq_iters") and not from_nf4:   # load_adapter put them there: W itself would add the NF4 error twice
        where = " (16-bit weights; the adapted layers hold the NF4 codes LoftQ trained over, dequantized)"
    log(f"merged rank-{cfg['r']} {'DoRA' if cfg.get('use_dora') else 'LoRA'} adapter from {adapter} into {model}{where}")
    cast = lambda: ((n, t.to(dtype) if t.is_floating_point() else t) for n, t in model_tensors(m))

    def write(tmp):
        save_hf_folder(tmp, m.args, cast(), config_extra=dict(torch_dtype=str(dtype).replace("torch.", "")))
        write_tokenizer_files(model, tmp)
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
            write_tokenizer_files(model, tmp)
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
    p.add_argument("--force", action="store_true",
                   help="merge even if the adapter records another base model than --model (same shapes)")
    a = p.parse_args(argv)
    try:
        merge(a.model, a.adapter, a.out, getattr(torch, a.dtype), a.requantize, a.gguf, a.from_nf4, a.device,
              force=a.force)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
