"""DoRA / QDoRA and LoftQ (lora.py): peft parity both ways, gradients, merging, LoftQ's error and its base."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from formats import load_model
from lora import (ALL_TARGETS, LoRALinear, apply_loftq, apply_lora, load_adapter, loftq, loftq_quantizer, lora_layers, merge_lora,
                  save_adapter, save_loftq_base, unmerge_lora)
from nf4 import NF4Linear, dequantize_nf4, quantize_nf4
from conftest import make_hf_checkpoint

ROOT = Path(__file__).resolve().parent.parent


def _perturb(model, seed=0):
    """Random B and magnitudes off their start, so every DoRA term matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
            if "lora_magnitude_vector" in n:
                p.mul_(1 + 0.2 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("variant", ["llama_gqa_tied", "qwen2_bias"])
def test_dora_starts_at_the_base_and_matches_peft_both_ways(tmp_path, variant):
    peft = pytest.importorskip("peft")
    hf = make_hf_checkpoint(tmp_path / "tiny", variant)
    ids = torch.randint(0, 256, (2, 16))
    ours = load_model(tmp_path / "tiny", torch.float32, device="cpu")
    with torch.no_grad():
        base = ours(ids)
    apply_lora(ours, ["q_proj", "v_proj", "o_proj", "down_proj"], r=4, alpha=8, use_dora=True)
    with torch.no_grad():
        assert torch.equal(ours(ids), base)   # m = ||W||, B = 0: exactly the base
    _perturb(ours)
    save_adapter(ours, tmp_path / "ours")
    pm = peft.PeftModel.from_pretrained(hf, tmp_path / "ours").eval()
    with torch.no_grad():
        torch.testing.assert_close(pm(ids).logits, ours(ids), atol=1e-5, rtol=0)
    # and the other way: an adapter peft makes and saves
    hf2 = make_hf_checkpoint(tmp_path / "tiny2", variant)
    pm2 = peft.get_peft_model(hf2, peft.LoraConfig(r=8, lora_alpha=32, target_modules=["k_proj", "up_proj", "down_proj"],
                                                   lora_dropout=0.0, use_dora=True))
    _perturb(pm2, seed=1)
    pm2.save_pretrained(tmp_path / "theirs")
    m2 = load_model(tmp_path / "tiny2", torch.float32, device="cpu")
    cfg = load_adapter(m2, tmp_path / "theirs")
    assert cfg["use_dora"] and all(m.use_dora for m in lora_layers(m2).values())
    with torch.no_grad():
        torch.testing.assert_close(m2(ids), pm2.eval()(ids).logits, atol=1e-5, rtol=0)


def _dora_reference(x, W, bias, A, B, m, s):
    """DoRA written out with plain autograd: the row norm detached, as the paper's section 4.3 says."""
    V = W + s * B @ A
    return (m / V.norm(dim=1).detach()) * (x @ V.T) + (0 if bias is None else bias)


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")


@pytest.mark.parametrize("nf4,dtype,device", [
    (False, torch.float32, "cpu"), (True, torch.float32, "cpu"), (False, torch.bfloat16, "cpu"), (True, torch.bfloat16, "cpu"),
    pytest.param(False, torch.bfloat16, "cuda", marks=CUDA), pytest.param(True, torch.bfloat16, "cuda", marks=CUDA)])
def test_dora_gradients_equal_plain_autograd(nf4, dtype, device):
    """Over nn.Linear (with a bias) and over NF4 (QDoRA, against the dequantized weight), in fp32 and in
    bf16 (against the same formula in fp32): the same output and gradients for A, B, the magnitude, the input."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(128, 96, bias=not nf4, device=device)
    base = NF4Linear.from_linear(lin, compute_dtype=dtype) if nf4 else lin.to(dtype)
    layer = LoRALinear(base, r=4, alpha=8, use_dora=True)
    W = dequantize_nf4(base.state(), torch.float32) if nf4 else lin.weight.detach().float()
    torch.testing.assert_close(layer.lora_magnitude_vector.detach(), W.norm(dim=1))   # starts at ||W||
    with torch.no_grad():
        layer.lora_B.weight.normal_(0, 0.1)
        layer.lora_magnitude_vector.mul_(1.1)
    params = [layer.lora_A.weight, layer.lora_B.weight, layer.lora_magnitude_vector]
    ref_params = [p.detach().clone().requires_grad_() for p in params]
    x = torch.randn(2, 5, 128, device=device).to(dtype).requires_grad_()
    xr = x.detach().float().requires_grad_()
    y = layer(x)
    assert y.dtype == dtype
    yr = _dora_reference(xr, W, None if nf4 else lin.bias.detach().float(), *ref_params, layer.scaling)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(y.float(), yr, **tol)
    g = torch.randn_like(yr)
    y.backward(g.to(dtype))
    yr.backward(g)
    for p, q in zip(params + [x], ref_params + [xr]):
        rel = (p.grad.float() - q.grad).norm() / q.grad.norm()
        assert rel < (2e-6 if dtype == torch.float32 else 1e-2), rel   # measured: 3e-7, 5e-3


def test_dora_norm_is_cached_until_the_adapter_changes():
    torch.manual_seed(0)
    layer = LoRALinear(NF4Linear.from_linear(torch.nn.Linear(64, 32, bias=False)), r=2, alpha=4, use_dora=True)
    first = layer.weight_norm()
    assert layer.weight_norm() is first
    with torch.no_grad():
        layer.lora_B.weight.add_(0.5)   # an optimizer step changes the version: computed again
    second = layer.weight_norm()
    assert second is not first and not torch.equal(second, first)


def test_dora_merge_unmerge_and_nf4_merge(tiny_ckpt):
    path, _ = tiny_ckpt
    ids = torch.randint(0, 256, (2, 16))
    model = load_model(path, torch.float32, device="cpu")
    apply_lora(model, ["q_proj", "k_proj", "gate_proj", "down_proj"], r=4, alpha=8, use_dora=True)
    _perturb(model)
    w0 = {n: p.detach().clone() for n, p in model.named_parameters() if "base" in n}
    with torch.no_grad():
        before = model(ids)
        merge_lora(model)
        torch.testing.assert_close(model(ids), before, atol=1e-5, rtol=0)
        unmerge_lora(model)
        for n, p in model.named_parameters():
            if n in w0:
                torch.testing.assert_close(p, w0[n], atol=1e-6, rtol=0)
        torch.testing.assert_close(model(ids), before, atol=1e-6, rtol=0)
    q = load_model(path, torch.float32, quantize="nf4", device="cpu")
    apply_lora(q, ["q_proj", "up_proj"], r=4, alpha=8, use_dora=True)
    _perturb(q)
    with torch.no_grad():
        before = q(ids)
        merge_lora(q, on_nf4="dequantize", unwrap=True)
        assert not lora_layers(q)
        torch.testing.assert_close(q(ids), before, atol=1e-5, rtol=0)


def test_loftq_error_below_nf4_and_falling_with_iterations():
    torch.manual_seed(0)
    w = torch.randn(192, 128) + torch.randn(192, 8) @ torch.randn(8, 128)   # a weight with a few strong directions
    state, A, B, errors = loftq(w, r=8, scaling=2.0, iters=4)
    assert len(errors) == 5
    plain = (w - dequantize_nf4(quantize_nf4(w), torch.float32)).norm() / w.norm()
    assert errors[0] == pytest.approx(plain.item(), rel=1e-6)
    assert all(b < a for a, b in zip(errors, errors[1:])), errors
    # errors[-1] is the error of what is returned: the base of the last iterate plus s B A
    final = (w - dequantize_nf4(state, torch.float32) - 2.0 * B @ A).norm() / w.norm()
    assert final.item() == pytest.approx(errors[-1], rel=1e-4)
    # one iteration keeps QLoRA's own base bit for bit
    one, *_ = loftq(w, r=8, scaling=2.0, iters=1)
    assert all(torch.equal(one[k], quantize_nf4(w)[k]) for k in ("packed", "absmax", "nested_absmax"))


def _loftq_model(path, iters, dora=False, targets=ALL_TARGETS):
    """What train.py builds with --qlora --init loftq: LoftQ as the weights stream in, then the adapters."""
    found = {}
    model = load_model(path, torch.float32, quantize=loftq_quantizer(targets, 4, 2.0, iters, found), device="cpu")
    apply_lora(model, targets, r=4, alpha=8, use_dora=dora)
    apply_loftq(model, found, iters)
    return model


@pytest.mark.parametrize("iters,dora", [(1, False), (3, False), (2, True)])
def test_loftq_adapter_reloads_on_its_own_base(tiny_ckpt, tmp_path, iters, dora):
    """Starting point: closer to the 16-bit model than QLoRA's. Saved and loaded again over an NF4 base and
    over the 16-bit base (merge.py's), the model is the same: the base it was made on is rebuilt or read."""
    path, _ = tiny_ckpt
    ids = torch.randint(0, 256, (2, 16))
    model = _loftq_model(path, iters, dora)
    w16 = load_model(path, torch.float32, device="cpu")
    qlora = load_model(path, torch.float32, quantize="nf4", device="cpu")
    with torch.no_grad():
        ref, want, plain = model(ids), w16(ids), qlora(ids)
    assert (ref - want).abs().mean() < (plain - want).abs().mean()
    for name, m in lora_layers(model).items():
        W = w16.get_submodule(name).weight.detach()
        got = m.dense_base() + m.delta()
        assert (W - got).norm() < (W - qlora.get_submodule(name).dequantize()).norm()
    save_adapter(model, tmp_path / "ad")
    if iters > 1:
        save_loftq_base(model, tmp_path / "ad")
    for quantize in ("nf4", None):   # every linear adapted: the 16-bit reload has Q in all of them too
        again = load_model(path, torch.float32, quantize=quantize, device="cpu")
        load_adapter(again, tmp_path / "ad")
        with torch.no_grad():
            torch.testing.assert_close(again(ids), ref, atol=1e-5, rtol=0)
    if iters > 1:
        (tmp_path / "ad" / "loftq_base.safetensors").unlink()
        with pytest.raises(FileNotFoundError, match="loftq_base.safetensors: missing"):
            load_adapter(load_model(path, torch.float32, quantize="nf4", device="cpu"), tmp_path / "ad")


def test_loftq_layers_without_adapters_keep_their_16bit_weights_when_merged(tiny_ckpt, tmp_path):
    path, _ = tiny_ckpt
    model = _loftq_model(path, 1, targets=["q_proj", "down_proj"])
    save_adapter(model, tmp_path / "ad")
    w16 = load_model(path, torch.float32, device="cpu")
    load_adapter(w16, tmp_path / "ad")
    for name, mod in w16.named_modules():
        if name.endswith("_proj") and name.startswith("model.layers."):
            got = mod.base.weight if name.endswith(("q_proj", "down_proj")) else mod.weight
            q = model.get_submodule(name)
            want = q.base.dequantize() if name.endswith(("q_proj", "down_proj")) else None
            if want is None:   # not adapted: the reloaded 16-bit weight, as in QLoRA's merge path (b)
                assert not torch.equal(got, q.dequantize())
            else:
                assert torch.equal(got, want)


def test_merge_of_a_loftq_adapter_is_the_trained_model(tiny_run, tmp_path):
    """merge.py on a LoftQ run (3 iterations) writes Q + s B A, not W + s B A (which adds the NF4 error twice)."""
    from merge import merge
    from train import TrainConfig, train
    model, data = tiny_run
    cfg = TrainConfig(model=str(model), data=str(data), out=str(tmp_path / "run"), eval_examples=8, max_steps=3,
                      batch_size=4, seq_len=64, lr=5e-3, dropout=0.0, qlora=True, init="loftq", loftq_iters=3,
                      dtype="float32", device="cpu", log_every=100)
    train(cfg)
    assert (tmp_path / "run" / "loftq_base.safetensors").is_file()
    merge(str(model), str(tmp_path / "run"), str(tmp_path / "merged"), dtype=torch.float32, log=lambda *a: None)
    trained = load_model(model, torch.float32, quantize="nf4", device="cpu")
    load_adapter(trained, tmp_path / "run")
    naive = load_model(model, torch.float32, device="cpu")
    apply_lora(naive, ALL_TARGETS, r=8, alpha=16)
    with torch.no_grad():   # the adapter's own tensors over the original W: what ignoring the LoftQ base gives
        for n, m in lora_layers(naive).items():
            t = lora_layers(trained)[n]
            m.lora_A.weight.copy_(t.lora_A.weight), m.lora_B.weight.copy_(t.lora_B.weight)
    ids = torch.randint(0, 300, (2, 16))
    with torch.no_grad():
        want, got = trained(ids), load_model(tmp_path / "merged", torch.float32, device="cpu")(ids)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
        assert (naive(ids) - want).abs().max() > 100 * (got - want).abs().max()


def test_qdora_loftq_resume_is_exact(tiny_run, tmp_path):
    """QDoRA with LoftQ (2 iterations) stopped at step 3 and resumed = run straight to 6."""
    from train import TrainConfig, train
    from safetensors.torch import load_file
    model, data = tiny_run
    kw = dict(model=str(model), data=str(data), eval_examples=8, max_steps=6, batch_size=4, seq_len=64, lr=5e-3,
              dropout=0.1, qlora=True, dora=True, init="loftq", loftq_iters=2, dtype="float32", device="cpu",
              log_every=100)
    full = train(TrainConfig(out=str(tmp_path / "full"), **kw))
    part = TrainConfig(out=str(tmp_path / "part"), stop_after=3, **kw)
    assert train(part)["interrupted"]
    part.stop_after, part.resume = 0, True
    assert train(part)["steps"] == 6
    a, b = (load_file(str(tmp_path / d / "adapter_model.safetensors")) for d in ("full", "part"))
    assert any("lora_magnitude_vector" in k for k in a) and all(torch.equal(a[k], b[k]) for k in a)
    assert full["eval_loss_after"] < full["eval_loss_before"]


def test_loftq_without_qlora_is_one_clear_error(tiny_run, tmp_path):
    model, data = tiny_run
    r = subprocess.run([sys.executable, str(ROOT / "train.py"), "--model", str(model), "--data", str(data),
                        "--out", str(tmp_path / "x"), "--init", "loftq"], capture_output=True, text=True)
    assert r.returncode == 2 and "--init loftq" in r.stderr and "--qlora" in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "x").exists()
