"""
Generate text with the KV cache: a base model, a base + LoRA adapter, or a merged folder.

    python generate.py --prompt "What is the capital of France?"           # default model, chat format
    python generate.py --model runs/merged --prompt "Tell me a joke." --temperature 0.7 --top-p 0.9
    python generate.py --adapter runs/qlora --qlora --prompt "..."         # NF4 base + adapter, as trained
    python generate.py --no-chat --prompt "Once upon a time"               # raw continuation
"""
import allocator

if __name__ == "__main__":   # before torch is imported: re-executes this command line with mimalloc, if installed
    allocator.preload()

import argparse
import sys
import time

import torch

from data import encode_prompt, load_tokenizer, prompt_format
from formats import load_model
from lora import load_adapter
from model import KVCache


@torch.no_grad()
def generate(model, ids: list[int], max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
             stop_ids=(), seed: int = 0):
    """Yield new token ids one at a time, until one of `stop_ids` (the EOS, an end-of-turn token). temperature 0 = greedy."""
    device = next(model.parameters()).device
    g = torch.Generator(device=device).manual_seed(seed)
    cache = KVCache(model.args.n_layers, capacity=min(len(ids) + max_new_tokens, model.args.max_seq_len))
    x = torch.tensor([ids], device=device)
    for _ in range(max_new_tokens):
        logits = model(x, cache=cache, last_only=True)[0, -1].float()
        if temperature <= 0:
            nxt = int(logits.argmax())
        else:
            probs = torch.softmax(logits / temperature, dim=-1)
            sorted_p, order = probs.sort(descending=True)
            # Keep the smallest set of tokens whose mass reaches top_p (always at least one).
            keep = sorted_p.cumsum(0) - sorted_p < top_p
            sorted_p = torch.where(keep, sorted_p, 0)
            nxt = int(order[torch.multinomial(sorted_p / sorted_p.sum(), 1, generator=g)])
        if nxt in stop_ids:
            return
        yield nxt
        if len(cache) + 1 > model.args.max_seq_len:
            return
        x = torch.tensor([[nxt]], device=device)


@torch.no_grad()
def generate_batch(model, prompts: list[list[int]], max_new_tokens: int, stop_ids=(), pad_id: int = 0) -> list[list[int]]:
    """Greedy continuations of several prompts at once, each as generate() gives it alone: the prompts are
    left-padded into one batch (the padding is a segment of its own, so no row attends to it), prefilled
    together, then decoded a token per row per step until every row has stopped."""
    device = next(model.parameters()).device
    n = max(map(len, prompts))
    max_new_tokens = min(max_new_tokens, model.args.max_seq_len - n)   # the longest row stays within the model's limit
    ids = torch.tensor([[pad_id] * (n - len(p)) + p for p in prompts], device=device)
    segments = torch.tensor([[0] * (n - len(p)) + [1] * len(p) for p in prompts], device=device)
    cache = KVCache(model.args.n_layers, capacity=n + max_new_tokens)
    logits = model(ids, segments, cache=cache, last_only=True)
    # From here on each row's positions start after its padding, and no row attends to its padding keys.
    cache.pad = segments.eq(0).sum(1, keepdim=True)
    cache.mask = (torch.arange(cache.capacity, device=device) >= cache.pad)[:, None, None, :]
    out, done = [[] for _ in prompts], [False] * len(prompts)
    for _ in range(max_new_tokens):
        nxt = logits[:, -1].float().argmax(-1).tolist()
        for b, t in enumerate(nxt):
            if not done[b]:
                done[b] = t in stop_ids
                if not done[b]:
                    out[b].append(t)
        if all(done):
            break
        logits = model(torch.tensor([[t] for t in nxt], device=device), cache=cache, last_only=True)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default", help="HF folder, .gguf file, or 'default' (SmolLM2-135M-Instruct)")
    p.add_argument("--adapter", help="a run directory (or folder) with adapter_config.json + adapter_model.safetensors")
    p.add_argument("--qlora", action="store_true", help="load the base in NF4 (as QLoRA trained it)")
    p.add_argument("--prompt", required=True, help="the user message (or raw text with --no-chat)")
    p.add_argument("--chat", action=argparse.BooleanOptionalAction, default=True,
                   help="wrap the prompt in the model's prompt format (default on)")
    p.add_argument("--prompt-format", choices=["chatml", "llama3", "llama2", "alpaca"],
                   help="a named format instead of the model's own chat template")
    p.add_argument("--max-new-tokens", type=int, default=128, help="stop after this many tokens")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling mass when temperature > 0")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--device", help="cpu or cuda (default: cuda if available)")
    p.add_argument("--force", action="store_true", help="use the adapter even if it records another base model")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="default: bf16 on GPU, fp32 on CPU")
    a = p.parse_args(argv)

    try:
        tok = load_tokenizer(a.model)
        model = load_model(a.model, getattr(torch, a.dtype) if a.dtype else None, "nf4" if a.qlora else None, a.device)
        if a.adapter:
            load_adapter(model, a.adapter, a.force)
        if a.chat:
            ids = encode_prompt(tok, prompt_format(tok, a.prompt_format), [dict(role="user", content=a.prompt)])
        else:
            ids = tok.encode_text(a.prompt)   # BOS only where the tokenizer's config adds one (SmolLM2's does not)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    t0, out = time.time(), []
    for t in generate(model, ids, a.max_new_tokens, a.temperature, a.top_p, tok.stop_ids, a.seed):
        # Decode the whole answer each time: a token may be half of a multi-byte character.
        new = tok.decode(out + [t])
        sys.stdout.write(new[len(tok.decode(out)):])
        sys.stdout.flush()
        out.append(t)
    dt = time.time() - t0
    print(f"\n[{len(out)} tokens, {len(out) / max(dt, 1e-9):.1f} tok/s]", file=sys.stderr)


if __name__ == "__main__":
    main()
