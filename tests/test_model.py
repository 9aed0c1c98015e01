"""model.py against transformers: same logits from the same files; loading errors; memory while loading."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import VARIANTS, make_hf_checkpoint, needs_default
from formats import load_model, model_tensors, save_hf_folder
from model import KVCache, ModelArgs

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_equal_transformers(tmp_path, variant):
    hf = make_hf_checkpoint(tmp_path / "m", variant, shard="100KB" if "sharded" in variant else None)
    ours = load_model(tmp_path / "m", dtype=torch.float32, device="cpu")
    ids = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, atol=1e-4, rtol=0)


def test_classic_config_keys(tmp_path):
    """rope_theta / rope_scaling at the top level (configs written before transformers 4.56)."""
    hf = make_hf_checkpoint(tmp_path / "m", "llama3_scaling")
    cfg = json.loads((tmp_path / "m/config.json").read_text())
    rp = cfg.pop("rope_parameters")
    cfg["rope_theta"] = rp.pop("rope_theta")
    cfg["rope_scaling"] = rp
    (tmp_path / "m/config.json").write_text(json.dumps(cfg))
    args = ModelArgs.from_hf_config(cfg)
    assert args.rope_theta == 500000.0 and args.rope_scaling["rope_type"] == "llama3"
    ids = torch.randint(0, 256, (1, 64))
    with torch.no_grad():
        torch.testing.assert_close(load_model(tmp_path / "m", torch.float32, device="cpu")(ids), hf(ids).logits,
                                   atol=1e-4, rtol=0)


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_matches_unpadded(tiny_ckpt, side):
    path, hf = tiny_ckpt
    ours = load_model(path, torch.float32, device="cpu")
    a, b = torch.randint(0, 256, (1, 30)), torch.randint(0, 256, (1, 18))
    pad = torch.zeros(1, 12, dtype=torch.long)
    bb = torch.cat([pad, b], 1) if side == "left" else torch.cat([b, pad], 1)
    seg = torch.ones(2, 30, dtype=torch.long)
    if side == "left":
        seg[1, :12] = 0
    else:
        seg[1, 18:] = 0
    with torch.no_grad():
        out = ours(torch.cat([a, bb]), seg)
        real = out[1, 12:] if side == "left" else out[1, :18]
        torch.testing.assert_close(out[0], hf(a).logits[0], atol=1e-4, rtol=0)
        torch.testing.assert_close(real, hf(b).logits[0], atol=1e-4, rtol=0)


def test_packed_segments_equal_separate_sequences(tiny_ckpt):
    path, _ = tiny_ckpt
    m = load_model(path, torch.float32, device="cpu")
    a, b = torch.randint(0, 256, (1, 10)), torch.randint(0, 256, (1, 7))
    seg = torch.tensor([[1] * 10 + [2] * 7 + [0] * 3])
    with torch.no_grad():
        out = m(torch.cat([a, b, torch.zeros(1, 3, dtype=torch.long)], 1), seg)
        torch.testing.assert_close(out[0, :10], m(a)[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(out[0, 10:17], m(b)[0], atol=1e-5, rtol=0)


def test_kv_cache_equals_full_forward(tiny_ckpt):
    path, _ = tiny_ckpt
    m = load_model(path, torch.float32, device="cpu")
    ids = torch.randint(0, 256, (1, 12))
    cache = KVCache(m.args.n_layers)
    with torch.no_grad():
        full = m(ids)
        step = [m(ids[:, :5], cache=cache)[:, -1]] + [m(ids[:, t:t + 1], cache=cache)[:, -1] for t in range(5, 12)]
    torch.testing.assert_close(torch.stack(step, 1), full[:, 4:], atol=1e-5, rtol=0)


def test_save_hf_folder_round_trip(tmp_path, tiny_ckpt):
    path, hf = tiny_ckpt
    m = load_model(path, torch.float32, device="cpu")
    save_hf_folder(tmp_path / "out", m.args, model_tensors(m), shard_bytes=50_000)
    assert (tmp_path / "out/model.safetensors.index.json").is_file()
    ids = torch.randint(0, 256, (1, 16))
    with torch.no_grad():
        torch.testing.assert_close(load_model(tmp_path / "out", torch.float32, device="cpu")(ids), hf(ids).logits,
                                   atol=1e-4, rtol=0)


# -- bad input --------------------------------------------------------------------------------------

def test_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        load_model(tmp_path / "nope")


def test_unknown_model_type(tiny_ckpt):
    path, _ = tiny_ckpt
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps(dict(cfg, model_type="gpt2")))
    with pytest.raises(ValueError, match=r"config.json: model_type 'gpt2'"):
        load_model(path)


def test_truncated_safetensors(tiny_ckpt):
    path, _ = tiny_ckpt
    f = path / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])
    with pytest.raises(ValueError, match="model.safetensors: truncated"):
        load_model(path)


def _rewrite(path, fn):
    from safetensors.torch import load_file, save_file
    sd = load_file(path / "model.safetensors")
    fn(sd)
    save_file(sd, path / "model.safetensors")


def test_missing_tensor(tiny_ckpt):
    path, _ = tiny_ckpt
    _rewrite(path, lambda sd: sd.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ValueError, match="missing tensor.*layers.1.mlp.up_proj"):
        load_model(path)


def test_unexpected_tensor(tiny_ckpt):
    path, _ = tiny_ckpt
    _rewrite(path, lambda sd: sd.__setitem__("model.layers.0.self_attn.extra.weight", torch.zeros(2)))
    with pytest.raises(ValueError, match="model.safetensors: unexpected tensor 'model.layers.0.self_attn.extra"):
        load_model(path)


def test_wrong_shape(tiny_ckpt):
    path, _ = tiny_ckpt
    _rewrite(path, lambda sd: sd.__setitem__("model.norm.weight", torch.zeros(65)))
    with pytest.raises(ValueError, match=r"'model.norm.weight' has shape \(65,\)"):
        load_model(path)


def test_gguf_unsupported_architecture(tmp_path):
    import gguf
    w = gguf.GGUFWriter(str(tmp_path / "x.gguf"), "gpt2")
    w.add_tensor("token_embd.weight", torch.zeros(4, 4).numpy())
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    with pytest.raises(ValueError, match=r"x.gguf: GGUF architecture 'gpt2' is not supported"):
        load_model(tmp_path / "x.gguf")


def test_sequence_too_long(tiny_ckpt):
    """The limit is per sequence: a row of packed examples may be longer than it (positions restart in
    each segment, as training's one-row micro-batches on CPU need), a segment may not."""
    m = load_model(tiny_ckpt[0], torch.float32, device="cpu")
    with pytest.raises(ValueError, match="a sequence of 257 tokens is longer than the model's limit of 256"):
        m(torch.zeros(1, 257, dtype=torch.long))
    ids = torch.randint(0, 256, (1, 300))
    seg = torch.tensor([[1] * 200 + [2] * 100])
    with torch.no_grad():
        packed = m(ids, seg)
        torch.testing.assert_close(packed[:, :200], m(ids[:, :200]), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(packed[:, 200:], m(ids[:, 200:]), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="a sequence of 257 tokens"):
        m(ids[:, :300], torch.tensor([[1] * 257 + [2] * 43]))


# -- the default model ------------------------------------------------------------------------------

@needs_default
def test_default_gguf_equals_transformers_gguf_load():
    """Our GGUF path (dequantize, un-permute q/k) against transformers' own GGUF loader, same file."""
    import transformers
    from defaults import default_gguf
    from data import load_tokenizer
    g = default_gguf()
    hf = transformers.AutoModelForCausalLM.from_pretrained(g.parent, gguf_file=g.name, dtype=torch.float32).eval()
    ours = load_model(g, torch.float32, device="cpu")
    tok = load_tokenizer("default")
    ids = torch.tensor([tok.encode("<|im_start|>user\nWrite a story about a cat who learns to sail.<|im_end|>\n"
                                   "<|im_start|>assistant\n")])
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, atol=1e-3, rtol=0)
        x, y = ids, ids
        for _ in range(32):
            x = torch.cat([x, ours(x)[:, -1:].argmax(-1)], 1)
        y = hf.generate(ids, max_new_tokens=32, do_sample=False, min_new_tokens=32)
    assert y.shape[1] == ids.shape[1] + 32 and x.tolist() == y.tolist()


@needs_default
def test_default_tokenizer_equals_transformers():
    import transformers
    from defaults import default_gguf
    from data import load_tokenizer
    g = default_gguf()
    hf = transformers.AutoTokenizer.from_pretrained(g.parent, gguf_file=g.name)
    ours, folder = load_tokenizer(g), load_tokenizer("default")
    texts = ["Hello world", "  runs   of spaces\n\n\nand newlines\t\ttabs", "digits 1234567 3.14159 2026-11-29",
             "unicode: héllo wörld — 日本語 🙂 ñ", "def f(x):\n    return x**2  # code\n",
             "<|im_start|>user\nHi<|im_end|>\n", "mixed<|endoftext|>special", "", "éèê àù ç œ ß"]
    for t in texts:
        want = hf.encode(t, add_special_tokens=False)
        assert ours.encode(t) == want, t
        assert folder.encode(t) == want, t
        assert ours.decode(want) == hf.decode(want)


def load_peak_growth(dtype: str, quantize) -> tuple[int, int]:
    """Load the default model in a fresh process: (peak RSS minus RSS before loading, bf16 model bytes).
    VmHWM, not ru_maxrss: ru_maxrss survives exec and would count the forking pytest process."""
    code = ("import torch, sys; sys.path.insert(0, %r); from formats import load_model, default_model_dir;"
            "p = default_model_dir();"
            "hwm = lambda k: int(next(l for l in open('/proc/self/status') if l.startswith(k)).split()[1]) * 1024;"
            "r0 = hwm('VmRSS:'); m = load_model(p, torch.%s, quantize=%r, device='cpu'); peak = hwm('VmHWM:');"
            "n = sum(p.numel() for p in m.parameters()) * 2; print(peak - r0, n)") % (str(ROOT), dtype, quantize)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return tuple(map(int, out.split()))


@needs_default
def test_bf16_load_peak_memory_under_two_copies():
    """Streaming load: peak RSS growth while loading stays under 2x the model's bf16 size."""
    grow, size = load_peak_growth("bfloat16", None)
    print(f"bf16 load: peak RSS growth {grow / 2**20:.0f} MiB for a {size / 2**20:.0f} MiB model")
    assert grow < 2 * size


def test_swiglu_backward_matches_autograd():
    from model import SwiGLU
    g, u = torch.randn(7, 33, requires_grad=True), torch.randn(7, 33, requires_grad=True)
    g2, u2 = g.detach().requires_grad_(), u.detach().requires_grad_()
    w = torch.randn(7, 33)
    (SwiGLU.apply(g, u) * w).sum().backward()
    (torch.nn.functional.silu(g2) * u2 * w).sum().backward()
    torch.testing.assert_close(g.grad, g2.grad, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(u.grad, u2.grad, atol=1e-6, rtol=1e-5)


def test_sentencepiece_tokenizer_folder(tmp_path):
    """A folder with tokenizer.model (Llama 1/2, Mistral) loads through sentencepiece, BOS/EOS by name."""
    import sentencepiece as spm
    text = tmp_path / "corpus.txt"
    text.write_text("\n".join(f"the quick brown fox {i} jumps over the lazy dog number {i * 7}" for i in range(300)))
    spm.SentencePieceTrainer.train(input=str(text), model_prefix=str(tmp_path / "tokenizer"), vocab_size=80,
                                   model_type="bpe", bos_id=1, eos_id=2, unk_id=0)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    from data import load_tokenizer
    tok = load_tokenizer(tmp_path)
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "tokenizer.model"))
    assert tok.encode("the lazy fox 42") == sp.encode("the lazy fox 42")
    assert (tok.bos_id, tok.eos_id) == (1, 2)
    assert tok.decode(tok.encode("the lazy fox 42")) == "the lazy fox 42"


@pytest.mark.parametrize("with_tokenizer_json", [False, True])
def test_gguf_sentencepiece_vocab_equals_sentencepiece(tmp_path, with_tokenizer_json):
    """An HF folder with tokenizer.model (Llama 2, Mistral) exports its vocabulary to GGUF as llama.cpp's
    converter does ('llama' model: pieces, scores, types, padded to the model's vocabulary), and that GGUF
    tokenizes as sentencepiece itself does, BOS added as the folder's config says, the chat template kept."""
    import gguf
    import sentencepiece as spm
    from formats import add_gguf_tokenizer
    text = tmp_path / "corpus.txt"
    text.write_text("\n".join(f"The quick brown fox {i} jumps over the lazy dog; naïve café {i * 13}." for i in range(400)))
    spm.SentencePieceTrainer.train(input=str(text), model_prefix=str(tmp_path / "tokenizer"), vocab_size=500,
                                   model_type="bpe", byte_fallback=True, bos_id=1, eos_id=2, unk_id=0,
                                   remove_extra_whitespaces=False, normalization_rule_name="identity")   # as Llama's
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "tokenizer.model"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(dict(
        bos_token="<s>", eos_token="</s>", add_bos_token=True, chat_template="{{ bos_token }}[INST]")))
    if with_tokenizer_json:   # Llama 2 and Mistral folders hold both; the export takes tokenizer.model
        from formats import _spm_bpe_tokenizer, sentencepiece_vocab
        _spm_bpe_tokenizer(*sentencepiece_vocab(tmp_path / "tokenizer.model", 500)).save(str(tmp_path / "tokenizer.json"))
    from data import load_tokenizer
    w = gguf.GGUFWriter(str(tmp_path / "t.gguf"), "llama")
    add_gguf_tokenizer(w, load_tokenizer(tmp_path), tmp_path, 512)   # 12 padding tokens, as a model rounds up
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    tok = load_tokenizer(tmp_path / "t.gguf")
    for t in ["The quick brown fox", "lazy dog 1234 café naïve", "  two  spaces", "unseen: 日本 ü", "fox.\nNew line"]:
        assert tok.encode(t) == sp.encode(t), t
        assert tok.decode(tok.encode(t)) == sp.decode(sp.encode(t))
        assert tok.encode_text(t) == [1] + sp.encode(t)
    assert (tok.bos_id, tok.eos_id) == (1, 2) and tok.chat_template == "{{ bos_token }}[INST]"


def test_gguf_rope_freqs_equals_transformers_llama3(tmp_path):
    """A Llama 3.1-style GGUF, written as llama.cpp's converter does (q/k permuted, the llama3 RoPE
    scaling as a rope_freqs tensor of per-frequency divisors), gives transformers' logits for the
    HF checkpoint it came from. Writing it back as an HF folder is refused: config.json cannot say it."""
    import math
    import gguf
    import numpy as np
    from formats import add_gguf_llama_shape, gguf_tensor_name, permute_qk
    hf = make_hf_checkpoint(tmp_path / "hf", "llama3_scaling")
    c, rp = hf.config, VARIANTS["llama3_scaling"][1]["rope_parameters"]
    hd = c.hidden_size // c.num_attention_heads
    factors = []   # llama.cpp convert_hf_to_gguf.py, LlamaModel.generate_extra_tensors
    for f in 1.0 / (rp["rope_theta"] ** (np.arange(0, hd, 2, dtype=np.float32) / hd)):
        wavelen, old = 2 * math.pi / f, rp["original_max_position_embeddings"]
        if wavelen < old / rp["high_freq_factor"]:
            factors.append(1.0)
        elif wavelen > old / rp["low_freq_factor"]:
            factors.append(rp["factor"])
        else:
            smooth = (old / wavelen - rp["low_freq_factor"]) / (rp["high_freq_factor"] - rp["low_freq_factor"])
            factors.append(1 / ((1 - smooth) / rp["factor"] + smooth))
    w = gguf.GGUFWriter(str(tmp_path / "m.gguf"), "llama")
    add_gguf_llama_shape(w, ModelArgs.from_hf_config(json.loads((tmp_path / "hf/config.json").read_text())))
    w.add_tensor("rope_freqs.weight", np.array(factors, dtype=np.float32))
    for name, t in hf.state_dict().items():
        t = t.detach().float()
        if name.endswith("q_proj.weight"):
            t = permute_qk(t, c.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            t = permute_qk(t, c.num_key_value_heads)
        w.add_tensor(gguf_tensor_name(name), t.numpy())
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    ours = load_model(tmp_path / "m.gguf", torch.float32, device="cpu")
    ids = torch.randint(0, c.vocab_size, (2, 200))   # past original_max_position_embeddings (32): scaling matters
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="rope_freqs"):
        save_hf_folder(tmp_path / "out", ours.args, model_tensors(ours))
    assert not (tmp_path / "out").exists()


def test_swiglu_backward_in_bf16_rounds_once():
    """bf16 inputs: the gradients are the exact (fp64) values rounded once to bf16, within one bf16 ulp;
    computed in bf16 throughout, the sigmoid's derivative is off by several ulps for large gates."""
    from model import SwiGLU
    torch.manual_seed(0)
    g = (torch.randn(64, 256) * 6).bfloat16().requires_grad_()
    u = torch.randn(64, 256).bfloat16().requires_grad_()
    w = torch.randn(64, 256).bfloat16()
    SwiGLU.apply(g, u).backward(w)
    g64, u64, w64 = g.detach().double(), u.detach().double(), w.double()
    sig = torch.sigmoid(g64)
    silu = g64 * sig
    for got, exact in ((g.grad, w64 * u64 * (sig + silu * (1 - sig))), (u.grad, w64 * silu)):
        ulp = torch.finfo(torch.bfloat16).eps * 2.0 ** torch.floor(torch.log2(exact.abs().clamp(min=1e-30)))
        assert ((got.double() - exact).abs() <= ulp).all()


def test_rmsnorm_in_bf16_saves_its_input_not_an_fp32_copy():
    """bf16: the gradients are fp32 autograd's on the same bf16 input, rounded once; what backward keeps
    is x in bf16 and 1/rms (autograd would keep x.float(): twice the bytes)."""
    from model import RMSNorm
    torch.manual_seed(0)
    norm = RMSNorm(96, 1e-5).bfloat16()
    with torch.no_grad():
        norm.weight.normal_(1, 0.2)
    x = torch.randn(5, 7, 96).bfloat16().requires_grad_()
    g = torch.randn(5, 7, 96).bfloat16()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = norm(x)
    xf, wf = x.detach().float().requires_grad_(), norm.weight.detach().float().requires_grad_()
    ref = wf * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5))
    torch.testing.assert_close(out.float(), ref, atol=0.05, rtol=0.02)   # bf16 output
    out.backward(g)
    ref.backward(g.float())
    torch.testing.assert_close(x.grad, xf.grad.bfloat16(), atol=0, rtol=1e-2)
    acts = [t for t in saved if t.data_ptr() != norm.weight.data_ptr()]
    assert sum(t.numel() * t.element_size() for t in acts) == 5 * 7 * (96 * 2 + 4)


def test_batched_greedy_generation_equals_one_at_a_time(tiny_ckpt):
    """Prompts of different lengths, left-padded into one batch: each row's continuation is the one
    generate() gives that prompt alone, stop tokens included (a row that stops early stays stopped)."""
    from generate import generate, generate_batch
    path, _ = tiny_ckpt
    m = load_model(path, torch.float32, device="cpu")
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (3, 17, 9, 17, 1)]
    alone = [list(generate(m, p, 12)) for p in prompts]
    assert generate_batch(m, prompts, 12) == alone
    stop = {alone[1][4], alone[2][0]}   # rows 1 and 2 stop early, on tokens the others may never emit
    want = [list(generate(m, p, 12, stop_ids=stop)) for p in prompts]
    assert generate_batch(m, prompts, 12, stop_ids=stop) == want and len(want[2]) == 0


def test_generation_computes_logits_for_the_last_position_only(tiny_ckpt):
    """The prefill projects one position onto the vocabulary, not every prompt position; the cache
    grows past its first capacity and the tokens stay those of the full forward."""
    from generate import generate
    path, _ = tiny_ckpt
    m = load_model(path, torch.float32, device="cpu")
    shapes = []
    m.lm_head.register_forward_hook(lambda mod, inp, out: shapes.append(tuple(inp[0].shape)))
    ids = torch.randint(0, 256, (20,)).tolist()
    out = list(generate(m, ids, 8))
    assert shapes[0] == (1, 1, 64) and all(s == (1, 1, 64) for s in shapes)
    x = torch.tensor([ids])
    with torch.no_grad():
        for _ in range(8):
            x = torch.cat([x, m(x)[:, -1:].argmax(-1)], 1)
    assert out == x[0, 20:].tolist()
    cache = KVCache(m.args.n_layers, capacity=4)
    with torch.no_grad():
        m(torch.tensor([ids[:3]]), cache=cache)
        for t in ids[3:12]:
            last = m(torch.tensor([[t]]), cache=cache, last_only=True)
    torch.testing.assert_close(last[:, -1], m(torch.tensor([ids[:12]]))[:, -1], atol=1e-5, rtol=0)


def reference_varlen(q, k, v, cu_q, cu_k, max_q, max_k, window_size, enable_gqa):
    """What torch's flash varlen_attn computes, written as a loop (it has no CPU kernel): causal
    attention within each run of the packed (tokens, heads, hd) batch that cu_q cuts out."""
    assert window_size == (-1, 0) and cu_q is cu_k and cu_q.dtype == torch.int32
    bounds = cu_q.tolist()
    assert max_q >= max(e - s for s, e in zip(bounds, bounds[1:]))
    run = lambda t, s, e: t[s:e].transpose(0, 1)[None]   # (1, heads, length, hd)
    return torch.cat([torch.nn.functional.scaled_dot_product_attention(
        run(q, s, e), run(k, s, e), run(v, s, e), is_causal=True, enable_gqa=enable_gqa)[0].transpose(0, 1)
        for s, e in zip(bounds, bounds[1:])])


def segment_attention_both_ways(device, dtype, monkeypatch):
    """segment_attention's loop and its variable-length path, outputs and gradients, on odd segments
    (rows with padding, a row of one segment, a one-token segment)."""
    import model
    torch.manual_seed(0)
    q = torch.randn(2, 6, 13, 8, device=device, dtype=dtype, requires_grad=True)
    k, v = (torch.randn(2, 3, 13, 8, device=device, dtype=dtype, requires_grad=True) for _ in range(2))
    spans = torch.tensor([[0, 0, 5], [0, 5, 6], [0, 6, 11], [1, 0, 13]])
    out = {}
    for path in ("loop", "varlen"):
        monkeypatch.setattr(model, "use_varlen", lambda q: path == "varlen")
        y = model.segment_attention(q, k, v, spans, True)
        (y.float() * torch.linspace(-1, 1, 8, device=device)).sum().backward()
        out[path] = [y.detach()] + [t.grad for t in (q, k, v)]
        q.grad = k.grad = v.grad = None
    return out


def test_varlen_segment_attention_equals_the_loop(monkeypatch):
    """The gather into one packed batch and the scatter back (padding zeros, gradients through both)."""
    import model
    monkeypatch.setattr(model, "varlen_attn", reference_varlen)
    out = segment_attention_both_ways("cpu", torch.float32, monkeypatch)
    assert out["loop"][0][0, :, 11:].abs().max() == 0 == out["varlen"][0][0, :, 11:].abs().max()
    for a, b in zip(out["loop"], out["varlen"]):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_segments_tiling_one_row_attend_each_on_its_own():
    """A CPU micro-batch is one row its segments tile (split and concatenated, not written into zeros):
    outputs and gradients equal each segment's attention computed alone."""
    import model
    torch.manual_seed(0)
    q = torch.randn(1, 6, 13, 8, requires_grad=True)
    k, v = (torch.randn(1, 3, 13, 8, requires_grad=True) for _ in range(2))
    w = torch.linspace(-1, 1, 13 * 8).view(13, 8)
    y = model.segment_attention(q, k, v, torch.tensor([[0, 0, 5], [0, 5, 6], [0, 6, 13]]), True)
    (y * w).sum().backward()
    for s, e in ((0, 5), (5, 6), (6, 13)):
        a, b, c = (t.detach()[:, :, s:e].requires_grad_() for t in (q, k, v))
        alone = torch.nn.functional.scaled_dot_product_attention(a, b, c, is_causal=True, enable_gqa=True)
        (alone * w[s:e]).sum().backward()
        torch.testing.assert_close(y[:, :, s:e], alone, atol=1e-6, rtol=0)
        for t, g in ((q, a), (k, b), (v, c)):
            torch.testing.assert_close(t.grad[:, :, s:e], g.grad, atol=1e-6, rtol=0)


@pytest.mark.parametrize("spans", [[[0, 0, 5], [0, 5, 13]], [[0, 0, 5], [1, 2, 13]]], ids=["tiling", "padded rows"])
def test_bf16_segments_on_a_cpu_attend_in_fp32(spans):
    """bf16 segments on a CPU (tiling a row, or in rows with padding): output and gradients are fp32
    attention's on the same inputs, rounded once to bf16 (torch's bf16 CPU flash backward keeps kernels
    built for each new segment length for good; test_train checks what a run's memory does)."""
    import model
    torch.manual_seed(0)
    q = torch.randn(len(spans), 6, 13, 8).bfloat16().requires_grad_()
    k, v = (torch.randn(len(spans), 3, 13, 8).bfloat16().requires_grad_() for _ in range(2))
    w = torch.linspace(-1, 1, 13 * 8).view(13, 8).bfloat16()
    y = model.segment_attention(q, k, v, torch.tensor(spans), True)
    (y * w).sum().backward()
    assert y.dtype == torch.bfloat16
    for row, s, e in spans:
        a, b, c = (t.detach()[row:row + 1, :, s:e].float().requires_grad_() for t in (q, k, v))
        alone = torch.nn.functional.scaled_dot_product_attention(a, b, c, is_causal=True, enable_gqa=True)
        (alone * w[s:e].float()).sum().backward()
        assert torch.equal(y[row:row + 1, :, s:e], alone.bfloat16())
        for t, g in ((q, a), (k, b), (v, c)):
            assert torch.equal(t.grad[row:row + 1, :, s:e], g.grad.bfloat16())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")
def test_varlen_segment_attention_on_cuda(monkeypatch):
    """torch's own flash varlen kernel (bf16) against the per-segment SDPA loop, forward and backward."""
    import model
    if not model.use_varlen(torch.empty(1, 1, 1, 8, device="cuda", dtype=torch.bfloat16)):
        pytest.skip("no flash varlen kernel on this GPU")
    out = segment_attention_both_ways("cuda", torch.bfloat16, monkeypatch)
    for a, b in zip(out["loop"], out["varlen"]):
        torch.testing.assert_close(a.float(), b.float(), atol=2e-2, rtol=2e-2)
