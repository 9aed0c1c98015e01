"""llama.cpp itself runs our GGUF exports: greedy continuations and perplexity equal ours.

Runs where llama.cpp's binaries are in the cache (build them once with `bash bench/llama_cpp.sh`, about
10 minutes on 2 cores), or in $LLAMA_CPP_DIR; skipped otherwise.
"""
import math
import os
import re
import subprocess
from pathlib import Path

import pytest
import torch

from conftest import needs_default
from defaults import cache_dir

LLAMA_CPP = Path(os.environ.get("LLAMA_CPP_DIR") or cache_dir() / "llama.cpp-11434.0.0")
pytestmark = [needs_default, pytest.mark.skipif(
    not (LLAMA_CPP / "llama-simple").is_file() or not (LLAMA_CPP / "llama-perplexity").is_file(),
    reason=f"no llama.cpp binaries in {LLAMA_CPP}: bash bench/llama_cpp.sh builds them")]

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,"]
N_NEW, N_CTX = 16, 128


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    """A rank-8 adapter on the default model with a visible effect (B not zero), saved in peft's format."""
    from formats import load_model
    from lora import apply_lora, lora_layers, save_adapter
    m = load_model("default", torch.float32)
    torch.manual_seed(0)   # A's initialisation
    apply_lora(m, ["q_proj", "v_proj", "down_proj"], r=8, alpha=16)
    g = torch.Generator().manual_seed(0)
    for layer in lora_layers(m).values():
        layer.lora_B.weight.data = torch.randn(layer.lora_B.weight.shape, generator=g) * 0.02
    out = tmp_path_factory.mktemp("adapter")
    save_adapter(m, out, "default")
    return out


def llama_simple(path, prompt) -> str:
    r = subprocess.run([str(LLAMA_CPP / "llama-simple"), "-m", str(path), "-n", str(N_NEW), prompt],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


def llama_perplexity(path, text_file) -> float:
    r = subprocess.run([str(LLAMA_CPP / "llama-perplexity"), "-m", str(path), "-f", str(text_file), "-c", str(N_CTX),
                        "-b", str(N_CTX), "-t", "2"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return float(re.search(r"Final estimate: PPL = ([0-9.]+)", r.stdout + r.stderr).group(1))


@torch.no_grad()
def our_perplexity(model, tok, text) -> float:
    """llama-perplexity's protocol: the text tokenized once (BOS if the tokenizer adds it), cut into chunks
    of N_CTX tokens (BOS in place of each chunk's first token where the tokenizer adds one), and the
    negative log-likelihood of each chunk's second half."""
    ids = tok.encode_text(text)
    nll, count, first = 0.0, 0, N_CTX // 2
    for c in range(len(ids) // N_CTX):
        chunk = ids[c * N_CTX:(c + 1) * N_CTX]
        if tok.add_bos:
            chunk[0] = tok.bos_id
        logp = torch.log_softmax(model(torch.tensor([chunk]))[0].double(), -1)
        nll -= sum(float(logp[j, chunk[j + 1]]) for j in range(first, N_CTX - 1))
        count += N_CTX - 1 - first
    return math.exp(nll / count)


@pytest.mark.parametrize("base", ["hf-folder", "gguf"])
@pytest.mark.parametrize("kind", ["f16", "q8_0"])
def test_llama_cpp_runs_our_export_as_we_do(tmp_path, adapter, base, kind):
    """A merged model, exported to GGUF from an HF-folder base (tokenizer.json) and from a GGUF base: llama.cpp
    loads it, continues each prompt greedily with the tokens we choose, and its perplexity is ours."""
    from data import load_examples, load_tokenizer
    from defaults import default_gguf
    from formats import default_model_dir, load_model
    from generate import generate
    from merge import merge
    source = str(default_model_dir() if base == "hf-folder" else default_gguf())
    path = Path(merge(source, str(adapter), str(tmp_path / "merged"), gguf=kind,   # the GGUF from the fp32 merge
                      log=lambda *a: None)["gguf"])
    model, tok = load_model(path, torch.float32), load_tokenizer(path)
    assert tok.chat_template and tok.stop_ids   # the template and the stop tokens travel in the file
    exact = 0
    for prompt in PROMPTS:
        ids = tok.encode_text(prompt)
        ours = tok.decode(generate(model, ids, N_NEW, stop_ids=tok.stop_ids))
        theirs = llama_simple(path, prompt)
        assert theirs.startswith(prompt), theirs
        theirs = theirs[len(prompt):].rstrip("\n")
        exact += ours == theirs
        if ours != theirs:
            # llama.cpp rounds activations to f16 / 8 bits: where our two best tokens are nearly tied it may
            # take the other. Follow its text with our model: at the first token where we differ, its choice
            # must be within 2% of our best logit (a near tie), and our choice its near tie.
            their_ids = tok.encode(theirs)
            logits = model(torch.tensor([ids + their_ids]))[0, len(ids) - 1:-1].float()
            j = next(j for j, t in enumerate(their_ids) if int(logits[j].argmax()) != t)
            best, theirs_logit = float(logits[j].max()), float(logits[j, their_ids[j]])
            assert best - theirs_logit < 0.02 * abs(best), (prompt, ours, theirs, best, theirs_logit)
            print(f"{prompt!r}: llama.cpp took a near tie at token {j} (logits {best:.3f} vs {theirs_logit:.3f})")
    train, _ = load_examples("default")
    text_file = tmp_path / "text.txt"
    text_file.write_text("\n\n".join(c[-1]["content"] for c in train[:40]))
    ppl_ours, ppl_theirs = our_perplexity(model, tok, text_file.read_text()), llama_perplexity(path, text_file)
    print(f"{base} {kind}: {exact} of {len(PROMPTS)} continuations equal; perplexity ours {ppl_ours:.4f}, "
          f"llama.cpp {ppl_theirs:.4f}")
    # llama.cpp's CPU matmuls round the activations to the weights' type before multiplying (f16; for q8_0
    # weights, q8_0 blocks of 32 with an f16 scale), and keep K and V in f16; we compute in fp32. With f16
    # weights the perplexities agree to 0.003% (11.0277 and 11.0280 here); with q8_0 they differ by 0.39%
    # (11.0180 and 11.0605). Rounding our own activations to q8_0 blocks (tried once, not kept) reproduced
    # half of such a gap; the rest is llama.cpp's f16 attention.
    assert abs(ppl_theirs / ppl_ours - 1) < (1e-3 if kind == "f16" else 1e-2), (ppl_ours, ppl_theirs)
