"""merge.py: merged folders that transformers loads, requantized folders bitsandbytes loads, GGUF."""
import pytest
import torch

from lora import apply_lora, save_adapter
from merge import merge
from formats import load_model


def _adapter(base, out, seed=0, **kw):
    m = load_model(base, torch.float32, device="cpu")
    apply_lora(m, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], r=4, alpha=8)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    save_adapter(m, out)
    return m


def _ids():
    return torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(3))


def test_merged_folder_loads_in_transformers(tiny_run, tmp_path):
    transformers = pytest.importorskip("transformers")
    base = tiny_run[0]
    ours = _adapter(base, tmp_path / "ad").eval()
    r = merge(str(base), str(tmp_path / "ad"), str(tmp_path / "merged"), dtype=torch.float32, device="cpu")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(_ids()).logits, ours(_ids()), atol=1e-4, rtol=0)
    assert r["fidelity"]["max_abs_logit_diff"] < 1e-4
    assert (tmp_path / "merged/tokenizer.json").is_file()
    assert not (tmp_path / "merged.tmp").exists()


def test_requantized_folder_loads_in_bitsandbytes(tiny_run, tmp_path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("bitsandbytes")
    from test_nf4 import _bnb_logits
    base = tiny_run[0]
    _adapter(base, tmp_path / "ad")
    merge(str(base), str(tmp_path / "ad"), str(tmp_path / "m"), dtype=torch.float32, requantize="nf4", device="cpu")
    ours = load_model(tmp_path / "m-nf4", torch.float32, device="cpu")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m-nf4", device_map="cpu").eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(_ids()), _bnb_logits(hf, _ids()), atol=1e-4, rtol=0)


@pytest.mark.parametrize("kind,tol", [("f16", 1e-2), ("q8_0", 0.1)])
def test_gguf_export_reads_back(tiny_run, tmp_path, kind, tol):
    import gguf
    base = tiny_run[0]
    _adapter(base, tmp_path / "ad")
    r = merge(str(base), str(tmp_path / "ad"), str(tmp_path / "m"), dtype=torch.float32, gguf=kind, device="cpu")
    reader = gguf.GGUFReader(r["gguf"])
    names = {t.name for t in reader.tensors}
    assert {"token_embd.weight", "output_norm.weight", "blk.1.attn_q.weight", "blk.0.ffn_down.weight"} <= names
    merged = load_model(tmp_path / "m", torch.float32, device="cpu")
    emb = next(t for t in reader.tensors if t.name == "token_embd.weight")
    assert tuple(int(s) for s in reversed(emb.shape)) == (320, 64)
    back = load_model(r["gguf"], torch.float32, device="cpu")
    with torch.no_grad():
        assert (back(_ids()) - merged(_ids())).abs().max() <= tol
    from data import load_tokenizer
    assert load_tokenizer(r["gguf"]).encode("red cat <|im_end|>") == load_tokenizer(base).encode("red cat <|im_end|>")


def test_adapter_for_another_base_fails_before_writing(tiny_run, tmp_path):
    import transformers
    other = tmp_path / "other"
    c = transformers.LlamaConfig(vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2)
    transformers.LlamaForCausalLM(c).save_pretrained(other)
    _adapter(other, tmp_path / "ad")
    with pytest.raises(ValueError, match="do not fit"):
        merge(str(tiny_run[0]), str(tmp_path / "ad"), str(tmp_path / "out"), device="cpu")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.tmp").exists()


def test_merge_computes_in_fp32_and_rounds_once(tiny_run, tmp_path):
    """--dtype float16: each written tensor is the fp32 merge W + s*B@A rounded once to fp16 (merge.py
    computes in fp32 on every device; a bf16 merge on a GPU would round through bf16 first)."""
    from safetensors.torch import load_file
    from lora import merge_lora
    base = tiny_run[0]
    ours = _adapter(base, tmp_path / "ad")
    merge(str(base), str(tmp_path / "ad"), str(tmp_path / "m"), dtype=torch.float16, device="cpu")
    written = load_file(str(tmp_path / "m/model.safetensors"))
    ref = dict(merge_lora(ours, unwrap=True).named_parameters())
    assert written.keys() == {k for k in ref if k != "lm_head.weight"}   # tied
    for k, t in written.items():
        assert t.dtype == torch.float16 and torch.equal(t, ref[k].detach().half()), k
