"""lora.py: exact start, only adapters train, merge/unmerge, NF4 bases, and peft interop both ways."""
import json

import pytest
import torch

from lora import LoRALinear, _dropout_mask, apply_lora, load_adapter, merge_lora, save_adapter, unmerge_lora
from formats import load_model
from nf4 import NF4Linear, dequantize_nf4


def _tiny(path):
    return load_model(path, torch.float32, device="cpu")


def _randomize_b(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def test_zero_b_equals_base_and_only_adapters_train(tiny_ckpt):
    model = _tiny(tiny_ckpt[0])
    ids = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        base = model(ids)
    info = apply_lora(model, ["q_proj", "v_proj", "down_proj"], r=4, alpha=8)
    # per layer: q (64 -> 64), v (64 -> 32 with 2 KV heads of 16), down (128 -> 64), rank 4
    assert len(info["wrapped"]) == 6 and info["trainable"] == 2 * 4 * ((64 + 64) + (64 + 32) + (128 + 64))
    with torch.no_grad():
        assert torch.equal(model(ids), base)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(ids).logsumexp(-1).mean().backward()
    opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("lora_" in n for n in changed)
    assert any("lora_A" in n for n in changed) and any("lora_B" in n for n in changed)


def test_merge_unmerge(tiny_ckpt):
    model = _tiny(tiny_ckpt[0])
    apply_lora(model, ["q_proj", "k_proj", "o_proj", "up_proj"], r=4, alpha=8)
    _randomize_b(model)
    ids = torch.randint(0, 256, (2, 16))
    w0 = {n: p.detach().clone() for n, p in model.named_parameters() if "base" in n}
    with torch.no_grad():
        unmerged = model(ids)
        merge_lora(model)
        merged = model(ids)
        w1 = {n: p.detach().clone() for n, p in model.named_parameters()}
        merge_lora(model)   # a second merge changes nothing
        assert all(torch.equal(p, w1[n]) for n, p in model.named_parameters())
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=0)
    unmerge_lora(model)
    for n, p in model.named_parameters():
        if n in w0:
            torch.testing.assert_close(p, w0[n], atol=1e-6, rtol=0)


def test_target_matching_nothing_lists_names(tiny_ckpt):
    with pytest.raises(ValueError, match=r"match no linear layer.*down_proj.*q_proj"):
        apply_lora(_tiny(tiny_ckpt[0]), ["query"], r=4, alpha=8)


def test_nf4_base_grads_and_equivalence():
    torch.manual_seed(0)
    lin = torch.nn.Linear(128, 64, bias=False)
    q = LoRALinear(NF4Linear.from_linear(lin), r=4, alpha=8)
    ref = LoRALinear(torch.nn.Linear(128, 64, bias=False), r=4, alpha=8)
    with torch.no_grad():
        ref.base.weight.copy_(dequantize_nf4(q.base.state(), torch.float32))
        ref.lora_A.weight.copy_(q.lora_A.weight)
        q.lora_B.weight.normal_()
        ref.lora_B.weight.copy_(q.lora_B.weight)
    ref.base.weight.requires_grad_(False)
    x = torch.randn(3, 128)
    y = q(x)
    torch.testing.assert_close(y, ref(x), atol=1e-5, rtol=0)
    y.square().sum().backward()
    ref(x).square().sum().backward()
    grads = {n for n, p in q.named_parameters() if p.grad is not None}
    assert grads == {"lora_A.weight", "lora_B.weight"}
    torch.testing.assert_close(q.lora_A.weight.grad, ref.lora_A.weight.grad, atol=1e-4, rtol=1e-5)


def test_nf4_merge_refused_unless_asked(tiny_ckpt):
    model = load_model(tiny_ckpt[0], torch.float32, quantize="nf4", device="cpu")
    apply_lora(model, ["q_proj"], r=4, alpha=8)
    _randomize_b(model)
    with pytest.raises(ValueError, match="merge.py"):
        merge_lora(model)
    ids = torch.randint(0, 256, (1, 8))
    with torch.no_grad():
        before = model(ids)
        merge_lora(model, on_nf4="dequantize")
        torch.testing.assert_close(model(ids), before, atol=1e-4, rtol=0)


def test_peft_loads_our_adapter(tmp_path, tiny_ckpt):
    peft = pytest.importorskip("peft")
    path, hf = tiny_ckpt
    model = _tiny(path)
    apply_lora(model, ["q_proj", "v_proj", "gate_proj"], r=4, alpha=8)
    _randomize_b(model)
    save_adapter(model, tmp_path / "ad", base_name=str(path))
    pm = peft.PeftModel.from_pretrained(hf, tmp_path / "ad").eval()
    ids = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(pm(ids).logits, model(ids), atol=1e-4, rtol=0)


def test_we_load_peft_adapter(tmp_path, tiny_ckpt):
    peft = pytest.importorskip("peft")
    path, hf = tiny_ckpt
    cfg = peft.LoraConfig(r=8, lora_alpha=32, target_modules=["k_proj", "o_proj", "up_proj", "down_proj"],
                          lora_dropout=0.0, task_type="CAUSAL_LM")
    pm = peft.get_peft_model(hf, cfg)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    pm.save_pretrained(tmp_path / "peft_ad")
    model = _tiny(path)
    load_adapter(model, tmp_path / "peft_ad")
    ids = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), pm.eval()(ids).logits, atol=1e-4, rtol=0)


def test_mismatched_adapters_fail_clearly(tmp_path, tiny_ckpt):
    path, _ = tiny_ckpt
    model = _tiny(path)
    apply_lora(model, ["q_proj"], r=4, alpha=8)
    save_adapter(model, tmp_path / "ad")
    # rank in the file other than the config's
    cfg = json.loads((tmp_path / "ad/adapter_config.json").read_text())
    (tmp_path / "ad/adapter_config.json").write_text(json.dumps(dict(cfg, r=8)))
    with pytest.raises(ValueError, match="rank 4 in the file but r=8"):
        load_adapter(_tiny(path), tmp_path / "ad")
    (tmp_path / "ad/adapter_config.json").write_text(json.dumps(cfg))
    # other hidden size
    import transformers
    big = transformers.LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2)
    transformers.LlamaForCausalLM(big).save_pretrained(tmp_path / "other")
    with pytest.raises(ValueError, match="do not fit the model's"):
        load_adapter(_tiny(tmp_path / "other"), tmp_path / "ad")
    # a target the model does not have
    (tmp_path / "ad/adapter_config.json").write_text(json.dumps(dict(cfg, target_modules=["c_attn"])))
    with pytest.raises(ValueError, match="match no linear layer"):
        load_adapter(_tiny(path), tmp_path / "ad")


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_lora_path_gradients_match_autograd(p, device):
    """Our in-place LoRA autograd function (mask redrawn in backward) against plain autograd with the same mask."""
    torch.manual_seed(0)
    layer = LoRALinear(torch.nn.Linear(32, 24, device=device), r=4, alpha=8, dropout=p).train()
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    x = torch.randn(2, 5, 32, requires_grad=True, device=device)
    torch.manual_seed(1)
    y = layer(x)
    g = torch.randn_like(y)
    y.backward(g)
    torch.manual_seed(1)
    mask = _dropout_mask(x, p, int(torch.randint(0, 2**62, (1,)))) != 0 if p > 0 else torch.ones_like(x, dtype=torch.bool)
    A, B = layer.lora_A.weight.detach().requires_grad_(), layer.lora_B.weight.detach().requires_grad_()
    x2 = x.detach().requires_grad_()
    ref = layer.base(x2) + (x2 * mask / (1 - p)) @ A.T @ B.T * layer.scaling
    ref.backward(g)
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=0)
    for ours, want in ((x.grad, x2.grad), (layer.lora_A.weight.grad, A.grad), (layer.lora_B.weight.grad, B.grad)):
        torch.testing.assert_close(ours, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_dropout_mask_rate_and_redraw(device):
    """The mask drops a share p of the values (within 6 standard deviations over 2M draws), and the
    same seed redraws the same mask, which is what lets backward skip storing it."""
    x = torch.empty(2000, 1000, device=device)
    for p in (0.05, 0.3):
        m = _dropout_mask(x, p, 123) != 0
        assert abs((1 - m.float().mean().item()) - p) < 6 * (p * (1 - p) / m.numel()) ** 0.5
        assert torch.equal(m, _dropout_mask(x, p, 123) != 0) and not torch.equal(m, _dropout_mask(x, p, 124) != 0)


@pytest.mark.parametrize("device", DEVICES)
def test_dropout_mask_is_the_comparison_and_drop_the_product(device):
    """The mask is all-ones words exactly where the generator's 16-bit draw r >= round(65536 p) - 32768 (the
    comparison, done in integers), zero elsewhere; _drop gives the product with that comparison (a dropped
    negative value is +0, not -0: the same sums) in every float dtype, and for a tensor wider than the mask
    (fp32 values under a bf16 input's mask)."""
    from lora import _drop
    x = torch.randn(37, 53, device=device)
    for p in (0.05, 0.5, 1e-7):
        g = torch.Generator(device).manual_seed(7)
        r = torch.empty((x.numel() + 3) // 4, dtype=torch.int64, device=device).random_(-2**63, None, generator=g)
        want = r.view(torch.int16)[:x.numel()].view(x.shape) >= max(round(p * 65536) - 32768, -32767)
        for dt in (torch.float32, torch.bfloat16, torch.float16):
            m = _dropout_mask(x.to(dt), p, 7)
            assert m.element_size() == x.to(dt).element_size() and set(m.unique().tolist()) <= {0, -1}
            assert torch.equal(m == -1, want)
            assert torch.equal(_drop(x.to(dt), m), x.to(dt) * want)
            assert torch.equal(_drop(x, m), x * want)   # a 16-bit mask on fp32 values
    assert (want == 0).sum() <= 2   # p below 1/65536 drops at the rate 1/65536


def test_base_fingerprint_names_the_weights_not_the_dtype(tiny_ckpt, tmp_path):
    """The same checkpoint in fp32 or bf16, 16-bit or NF4 base: one fingerprint; other weights of the
    same shapes: another. And a peft adapter, which records none, loads as before (test_we_load_peft_adapter)."""
    from conftest import make_hf_checkpoint
    from lora import base_fingerprint
    path, _ = tiny_ckpt
    fps = {base_fingerprint(load_model(path, dt, quantize=q, device="cpu"))
           for dt in (torch.float32, torch.bfloat16) for q in (None, "nf4")}
    assert len(fps) == 1
    make_hf_checkpoint(tmp_path / "other", seed=1)
    assert base_fingerprint(load_model(tmp_path / "other", torch.float32, device="cpu")) not in fps
