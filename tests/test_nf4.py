"""nf4.py against bitsandbytes (CPU): same bytes, same absmax, same values; NF4Linear's autograd."""
import pytest
import torch

from nf4 import (DYNAMIC_SIGNED, DYNAMIC_UNSIGNED, NF4_LEVELS, NF4Linear, dequantize_nf4,
                 quantize_nf4)

SHAPES = [(64, 64), (576, 1536), (3, 7), (1, 1), (130, 9), (4097,), (2, 3, 65)]


def _bnb():
    return pytest.importorskip("bitsandbytes.functional")


def test_maps_equal_bitsandbytes():
    F = _bnb()
    assert torch.equal(DYNAMIC_SIGNED, F.create_dynamic_map(signed=True))
    assert torch.equal(DYNAMIC_UNSIGNED, F.create_dynamic_map(signed=False))
    assert torch.equal(NF4_LEVELS, F.get_4bit_type("nf4", device="cpu"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
def test_quantize_equals_bitsandbytes(dtype, shape):
    F = _bnb()
    w = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(dtype)
    packed, qs = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=False)
    ours = quantize_nf4(w, 64, double_quant=False)
    assert torch.equal(ours["packed"], packed.reshape(-1))
    assert torch.equal(ours["absmax"], qs.absmax)
    assert torch.equal(dequantize_nf4(ours), F.dequantize_4bit(packed, qs))


@pytest.mark.parametrize("block", [32, 128, 4096])
def test_other_block_sizes_equal_bitsandbytes(block):
    F = _bnb()
    w = torch.randn(300, 70)
    packed, qs = F.quantize_4bit(w, blocksize=block, quant_type="nf4")
    ours = quantize_nf4(w, block, double_quant=False)
    assert torch.equal(ours["packed"], packed.reshape(-1)) and torch.equal(ours["absmax"], qs.absmax)


def test_double_quant_against_bitsandbytes():
    """Packed bytes and offset equal. bitsandbytes' CPU kernel for the 8-bit absmax codes looks codes up
    with a binary search over a coarse table that sometimes returns the upper neighbour; we round to
    the nearest code (as its CUDA kernel and its pure-PyTorch backend do). So we count: the codes may
    differ only by one, in a small share, and where they differ ours is never farther from the value."""
    F = _bnb()
    w = torch.randn(1536, 1536, generator=torch.Generator().manual_seed(0))
    packed, qs = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    ours = quantize_nf4(w, 64, double_quant=True)
    assert torch.equal(ours["packed"], packed.reshape(-1))
    assert ours["offset"].item() == qs.offset.item()
    assert torch.equal(ours["nested_absmax"], qs.state2.absmax)
    diff = ours["absmax"].int() - qs.absmax.int()
    n_diff = int((diff != 0).sum())
    print(f"nested absmax codes differing from bitsandbytes CPU: {n_diff} of {diff.numel()}")
    assert diff.abs().max() <= 1 and n_diff <= 0.01 * diff.numel()
    # The value each code stands for: (absmax - offset) scaled into [-1, 1] by its block of 256.
    absmax = w.reshape(-1, 64).abs().amax(1)
    target = (absmax - qs.offset) / qs.state2.absmax.repeat_interleave(256)[:absmax.numel()]
    err = lambda codes: (DYNAMIC_SIGNED[codes.long()] - target).abs()
    assert (err(ours["absmax"]) <= err(qs.absmax)).all()


def test_double_quant_dequantize_close_to_bitsandbytes():
    F = _bnb()
    w = torch.randn(512, 384, generator=torch.Generator().manual_seed(1))
    packed, qs = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    ours = dequantize_nf4(quantize_nf4(w))
    theirs = F.dequantize_4bit(packed, qs)
    same = (ours == theirs).float().mean().item()
    assert same > 0.99 and (ours - theirs).abs().max() < 1e-2 * w.abs().max()


def test_zero_block_and_odd_tail():
    w = torch.zeros(129)
    s = quantize_nf4(w, double_quant=False)
    assert s["packed"].numel() == 65 and (s["packed"] == 0x77).all()
    assert torch.equal(dequantize_nf4(s), w)


def test_bits_per_parameter():
    layer = NF4Linear.from_weight(torch.randn(1536, 576))
    assert abs(8 * layer.nbytes() / (1536 * 576) - 4.127) < 0.01 * 4.127


def test_nf4_linear_forward_and_grads():
    torch.manual_seed(0)
    lin = torch.nn.Linear(96, 40)
    q = NF4Linear.from_linear(lin)
    w = dequantize_nf4(quantize_nf4(lin.weight.detach()))
    x = torch.randn(5, 7, 96, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    y = q(x)
    torch.testing.assert_close(y, x2 @ w.T + lin.bias.detach(), atol=1e-5, rtol=0)
    g = torch.randn_like(y)
    y.backward(g)
    (x2 @ w.T).backward(g)
    torch.testing.assert_close(x.grad, x2.grad, atol=1e-5, rtol=0)
    assert not any(p.requires_grad for p in q.parameters())
    assert all(not b.requires_grad and b.grad is None for b in q.buffers())


def test_nf4_linear_saves_nothing_of_weight_size():
    q = NF4Linear.from_weight(torch.randn(256, 128))
    saved = []
    x = torch.randn(4, 128, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        y = q(x)
    y.sum().backward()
    assert all(n < 256 * 128 for n in saved), saved
    assert x.grad is not None


# -- whole models ------------------------------------------------------------------------------------

def _bnb_logits(hf, ids):
    """transformers+bitsandbytes logits through bitsandbytes' training path (dequantize_4bit, then an
    fp32 matmul), which runs when autograd is on. Its no-grad CPU inference kernel (gemm_4bit) is
    not an exact fp32 GEMM: it differs from that path by ~3e-3 on its own, so we only bound it."""
    with torch.enable_grad():
        exact = hf(ids).logits.detach().float()
    with torch.no_grad():
        assert (hf(ids).logits.float() - exact).abs().max() < 1e-2
    return exact


def _save_ours_4bit(model, out):
    from formats import bnb_quantization_config, model_tensors, save_hf_folder
    save_hf_folder(out, model.args, model_tensors(model),
                   config_extra={"quantization_config": bnb_quantization_config(torch.float32)})


def test_our_4bit_folder_loads_in_transformers(tmp_path, tiny_ckpt):
    pytest.importorskip("bitsandbytes")
    import transformers
    from formats import load_model
    ours = load_model(tiny_ckpt[0], torch.float32, quantize="nf4", device="cpu")
    _save_ours_4bit(ours, tmp_path / "q")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "q", device_map="cpu").eval()
    assert any("Linear4bit" in type(m).__name__ for m in hf.modules())
    ids = torch.randint(0, 256, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(_bnb_logits(hf, ids), ours(ids), atol=1e-4, rtol=0)
    # ... and reads back in ours, bit for bit.
    again = load_model(tmp_path / "q", torch.float32, device="cpu")
    with torch.no_grad():
        assert torch.equal(again(ids), ours(ids))


def test_transformers_4bit_folder_loads_in_ours(tmp_path, tiny_ckpt):
    pytest.importorskip("bitsandbytes")
    import transformers
    from formats import load_model
    q = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                        bnb_4bit_compute_dtype=torch.float32)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_ckpt[0], quantization_config=q, device_map="cpu",
                                                           dtype=torch.float32).eval()
    hf.save_pretrained(tmp_path / "hfq")
    ours = load_model(tmp_path / "hfq", torch.float32, device="cpu")
    ids = torch.randint(0, 256, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), _bnb_logits(hf, ids), atol=1e-4, rtol=0)


@pytest.mark.skipif(__import__("os").environ.get("PURE_QLORA_SKIP_DEFAULT") == "1", reason="no default model")
def test_default_model_nf4_bits_memory_and_kl():
    from formats import load_model
    from nf4 import NF4Linear
    from test_model import load_peak_growth
    m = load_model("default", torch.float32, quantize="nf4", device="cpu")
    layers = [x for x in m.modules() if isinstance(x, NF4Linear)]
    assert len(layers) == 7 * m.args.n_layers
    bits = 8 * sum(x.nbytes() for x in layers) / sum(x.in_features * x.out_features for x in layers)
    assert abs(bits - 4.127) < 0.01 * 4.127
    g16, size = load_peak_growth("bfloat16", None)
    g4, _ = load_peak_growth("bfloat16", "nf4")
    print(f"load peak RSS growth: bf16 {g16 / 2**20:.0f} MiB, nf4 {g4 / 2**20:.0f} MiB ({g4 / g16:.2f}x)")
    assert g4 <= 0.75 * g16
    from data import load_tokenizer
    tok = load_tokenizer("default")
    ids = torch.tensor([tok.encode("The quick brown fox jumps over the lazy dog. Paris is the capital of France, "
                                   "and Berlin is the capital of Germany. Water boils at 100 degrees Celsius.")])
    full = load_model("default", torch.float32, device="cpu")
    with torch.no_grad():
        p, q = full(ids).log_softmax(-1), m(ids).log_softmax(-1)
    kl = (p.exp() * (p - q)).sum(-1).mean().item()
    print(f"KL(16-bit || NF4) on a paragraph: {kl:.4f} nats/token; {bits:.4f} bits/param")
    assert 0 < kl < 1.0


def test_quantization_error_per_layer():
    from nf4 import quantization_error
    torch.manual_seed(0)
    m = torch.nn.Module()
    m.model = torch.nn.Module()
    m.model.layers = torch.nn.ModuleList([torch.nn.Linear(256, 128), torch.nn.Linear(128, 64)])
    err = quantization_error(m)
    assert set(err) == {"model.layers.0", "model.layers.1"}
    w = m.model.layers[0].weight.detach()
    d = dequantize_nf4(quantize_nf4(w)) - w
    assert err["model.layers.0"]["mean_abs"] == pytest.approx(d.abs().mean().item())
    assert 0.05 < err["model.layers.0"]["rel"] < 0.15   # 4 bits on uniform-init weights: ~10% relative


# -- large layers: chunked, with bounded temporaries; constant tables copied to a device once -----------

@pytest.mark.parametrize("shape", [(130, 9), (4097,), (96, 200)])
def test_chunked_quantize_and_dequantize_equal_whole(shape, monkeypatch):
    """Blocks are independent: chunk by chunk gives the same bytes and values as the whole weight at once
    (CHUNK: quantizing, and dequantizing in general; CPU_CAST_CHUNK: dequantizing to 16 bits on a CPU)."""
    import nf4
    w = torch.randn(shape) * 0.02
    whole = quantize_nf4(w)
    small = lambda n: [monkeypatch.setattr(nf4, k, n) for k in ("CHUNK", "CPU_CAST_CHUNK")]
    small(256)   # several chunks, a partial last block, an odd tail
    chunked = quantize_nf4(w)
    for k in ("packed", "absmax", "nested_absmax", "offset"):
        assert torch.equal(chunked[k], whole[k]), k
    for dt in (torch.float32, torch.bfloat16, torch.float16):
        many = dequantize_nf4(chunked, dt)
        small(1 << 40)
        assert torch.equal(many, dequantize_nf4(whole, dt))
        assert torch.equal(many, dequantize_nf4(whole, torch.float32).to(dt))   # fp32 values, one rounding
        small(256)


def _peak_growth(code: str) -> float:
    """Peak RSS growth of `code` (after `setup`, in a fresh process, allocations over 64 KB mapped so
    that freed memory leaves RSS), in MB."""
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parent.parent
    prog = ("import ctypes, sys, torch; sys.path.insert(0, %r); ctypes.CDLL('libc.so.6').mallopt(-3, 65536);"
            "from nf4 import quantize_nf4, dequantize_nf4;"
            "rss = lambda k: int(next(l for l in open('/proc/self/status') if l.startswith(k)).split()[1]) / 1024;"
            "w = torch.randn(4096, 4096).bfloat16(); s = quantize_nf4(w); ctypes.CDLL('libc.so.6').malloc_trim(0);"
            "open('/proc/self/clear_refs', 'w').write('5'); r0 = rss('VmRSS:');"
            "%s; print(rss('VmHWM:') - r0)") % (str(root), code)
    return float(subprocess.run([sys.executable, "-c", prog], capture_output=True, text=True, check=True).stdout)


def test_quantize_and_dequantize_temporaries_are_bounded():
    """A 4096 x 4096 bf16 weight (32 MB): quantizing it whole made ~29 bytes of temporaries per weight
    (fp32 copies, int64 indices: ~460 MB); in chunks they stay near one chunk's. Dequantizing to bf16
    writes the 32 MB output directly instead of an fp32 copy (64 MB) and its cast."""
    q = _peak_growth("quantize_nf4(w)")
    d = _peak_growth("x = dequantize_nf4(s, torch.bfloat16)")
    print(f"peak RSS growth: quantize {q:.0f} MB, dequantize to bf16 {d:.0f} MB (output 32 MB)")
    assert q < 160
    assert d < 32 + 60


def test_code_tables_are_copied_to_a_device_once(monkeypatch):
    """dequantize_blockwise (the 8-bit optimizer states, double-quant absmax) must not copy its 256-value
    table to the device on every call: on a GPU each copy is a host-device synchronisation."""
    from nf4 import dequantize_blockwise, quantize_blockwise
    q, absmax = quantize_blockwise(torch.randn(4096), DYNAMIC_SIGNED)
    state = quantize_nf4(torch.randn(64, 64))
    dequantize_blockwise(q, absmax, DYNAMIC_SIGNED)   # the first call may place it
    calls = []
    real = torch.Tensor.to
    monkeypatch.setattr(torch.Tensor, "to", lambda self, *a, **kw: calls.append(a) or real(self, *a, **kw))
    for _ in range(3):
        dequantize_blockwise(q, absmax, DYNAMIC_SIGNED)
        dequantize_nf4(state, torch.float32)
    assert calls == [(torch.float32,)] * 3   # dequantize_nf4's cast of its result, nothing else
