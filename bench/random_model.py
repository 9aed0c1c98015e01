"""
An HF folder with random weights at a public model's shapes and a real tokenizer, for measuring speed
and memory (which do not depend on the weights) where no checkpoint can be downloaded (bench/gpu.sh).

    python bench/random_model.py --preset Llama-3.2-1B --out /tmp/llama-1b            # the default model's tokenizer
    python bench/random_model.py --preset SmolLM2-135M --tokenizer .gpu/tok --out /tmp/smol

The vocabulary is the tokenizer's, so the shapes are the preset's but for the embedding rows. Weights are
N(0, 0.02) as Llama's initialisation, norms 1, written in bf16 (--dtype to change).
"""
import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from audit import MODEL_PRESETS, linear_shapes  # noqa: E402
from formats import atomic_dir, read_args, save_hf_folder, write_tokenizer_files  # noqa: E402
from model import ModelArgs  # noqa: E402


def random_tensors(args: ModelArgs, dtype, seed: int = 0):
    """(HF name, tensor) for every weight of a Llama of these shapes, one tensor at a time."""
    g = torch.Generator().manual_seed(seed)
    normal = lambda *shape: (torch.randn(*shape, generator=g) * 0.02).to(dtype)
    d = args.dim
    yield "model.embed_tokens.weight", normal(args.vocab_size, d)
    for i in range(args.n_layers):
        p = f"model.layers.{i}."
        yield p + "input_layernorm.weight", torch.ones(d, dtype=dtype)
        yield p + "post_attention_layernorm.weight", torch.ones(d, dtype=dtype)
        for name, (inp, out) in linear_shapes(args).items():
            yield p + ("mlp." if name in ("gate_proj", "up_proj", "down_proj") else "self_attn.") + name + ".weight", \
                normal(out, inp)
    yield "model.norm.weight", torch.ones(d, dtype=dtype)
    if not args.tie_embeddings:
        yield "lm_head.weight", normal(args.vocab_size, d)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", required=True, choices=list(MODEL_PRESETS), help="the shapes (audit.py's presets)")
    p.add_argument("--tokenizer", default="default", help="a model folder (tokenizer files and config.json, for the "
                   "vocabulary size), a GGUF, or 'default'")
    p.add_argument("--out", required=True, help="the HF folder to write")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    a = p.parse_args()
    vocab = read_args(a.tokenizer).vocab_size
    args = ModelArgs.from_hf_config(dict(MODEL_PRESETS[a.preset], model_type="llama", vocab_size=vocab,
                                         torch_dtype=a.dtype))
    dtype = getattr(torch, a.dtype)

    n = 0

    def counted():
        nonlocal n
        for name, t in random_tensors(args, dtype):
            n += t.numel()
            yield name, t

    def write(tmp):
        save_hf_folder(tmp, args, counted())
        write_tokenizer_files(a.tokenizer, tmp)
    atomic_dir(Path(a.out), write)
    print(f"{a.out}: {a.preset} shapes ({args.n_layers} layers, dim {args.dim}, vocabulary {vocab}), "
          f"{n / 1e6:.0f}M random weights in {a.dtype}")


if __name__ == "__main__":
    main()
