"""audit.py on a tiny checkpoint: every section with finite numbers; the estimator exact where it counts."""
import json
import math

import pytest
import torch

from audit import estimate_memory, linear_shapes, main, saved_bytes_per_token_layer
from lora import ALL_TARGETS, apply_lora
from formats import load_model
from optim import AdamW8bit
from train import loss_sum, memory_breakdown, to_batch


@pytest.mark.parametrize("mode,dora", [("lora", False), ("qlora", False), ("lora", True), ("qlora", True)])
def test_estimator_exact_for_weights_adapters_grads_optimizer(tiny_run, mode, dora):
    model = load_model(tiny_run[0], torch.float32, quantize="nf4" if mode == "qlora" else None, device="cpu")
    targets = ["q_proj", "v_proj", "down_proj"]
    apply_lora(model, targets, r=4, alpha=8, use_dora=dora)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = AdamW8bit(params, min_8bit_size=256) if mode == "qlora" else torch.optim.AdamW(params)
    model(torch.randint(0, 300, (1, 8))).sum().backward()
    opt.step()
    real = memory_breakdown(model, opt)
    est = estimate_memory(model.args, mode, 1, 8, rank=4, targets=targets, dtype_bytes=4, dora=dora)
    if mode == "qlora":   # the tiny adapters are under 4096 elements: the estimator's rule, with the test's threshold
        est["optimizer_states"] = sum(8 * p.numel() if p.numel() < 256 else 2 * 256 * -(-p.numel() // 256)
                                      + 8 * -(-p.numel() // 256) for p in params)   # codes in whole blocks
    for k in ("base_weights", "adapters", "gradients", "optimizer_states"):
        assert est[k] == real[k], k


def test_estimator_qlora_optimizer_rule():
    """With the default 4096-element threshold, the 8-bit state bytes match a real AdamW8bit."""
    from model import ModelArgs
    a = ModelArgs(dim=256, n_layers=2, n_heads=4, n_kv_heads=4, head_dim=64, intermediate_size=512, vocab_size=300)
    ps = []
    for _ in range(a.n_layers):
        for i, o in ((256, 256), (256, 256), (512, 256)):
            ps += [torch.nn.Parameter(torch.zeros(16, i)), torch.nn.Parameter(torch.zeros(o, 16))]
    opt = AdamW8bit(ps)
    for p in ps:
        p.grad = torch.ones_like(p)
    opt.step()
    est = estimate_memory(a, "qlora", 1, 8, rank=16, targets=["q_proj", "v_proj", "down_proj"])
    assert est["optimizer_states"] == opt.state_bytes()


def _saved_activation_bytes(args, dtype, targets, dropout, nf4=False, packed=True, compile=False, dora=False):
    """Bytes of the distinct storages autograd keeps for backward over one training forward
    (two packed examples in a row, or one sequence), parameters and NF4 buffers excluded."""
    from model import Llama
    from nf4 import NF4Linear
    torch.manual_seed(0)
    model = Llama(args).to(dtype)
    if nf4:
        for name, mod in list(model.named_modules()):
            for attr, child in list(mod.named_children()):
                if isinstance(child, torch.nn.Linear) and name.startswith("model.layers"):
                    setattr(mod, attr, NF4Linear.from_weight(child.weight, None, dtype))
    apply_lora(model, targets, r=4, alpha=8, dropout=dropout, use_dora=dora)
    model.train()
    if compile:
        model.compile_blocks()
    ids = torch.randint(0, args.vocab_size, (1, 40))
    seg = torch.tensor([[1] * 15 + [2] * 25]) if packed else None
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    params |= {t.untyped_storage().data_ptr() for t in model.buffers()}
    seen = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            seen[st.data_ptr()] = st.nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss_sum(model, to_batch(ids, ids, seg, 'cpu'))
    return sum(seen.values())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("targets,dropout,nf4,packed,dora", [
    (list(ALL_TARGETS), 0.1, False, True, False), (list(ALL_TARGETS), 0.0, True, True, False),
    (list(ALL_TARGETS), 0.1, True, False, False), (["q_proj", "v_proj"], 0.0, False, True, False),
    (["o_proj", "down_proj"], 0.1, True, True, False), (list(ALL_TARGETS), 0.1, False, True, True),
    (["q_proj", "v_proj", "down_proj"], 0.0, True, False, True)])
def test_estimator_activations_are_what_autograd_saves(dtype, targets, dropout, nf4, packed, dora):
    """The estimator's activation bytes equal the tensors autograd really keeps, exactly (DoRA included:
    its extra per layer is the output of q, k, o and down_proj, which nothing else keeps, and the row norm)."""
    from model import ModelArgs
    a = ModelArgs(dim=64, n_layers=3, n_heads=4, n_kv_heads=2, head_dim=16, intermediate_size=160, vocab_size=300)
    b = torch.finfo(dtype).bits // 8
    got = _saved_activation_bytes(a, dtype, targets, dropout, nf4, packed, dora=dora)
    fewer = ModelArgs(**{**vars(a), "n_layers": 2})
    per_layer = got - _saved_activation_bytes(fewer, dtype, targets, dropout, nf4, packed, dora=dora)
    outs = sum(o for n, (i, o) in linear_shapes(a).items() if n in targets)
    # two examples tiling a CPU row: attention runs in fp32 (model.segment_attention); one sequence: in dtype
    assert per_layer == 40 * saved_bytes_per_token_layer(a, targets, 4, b, packed, dora, packed) + dora * outs * 4
    if dora:   # the extra over plain LoRA, per layer and token: the outputs no other op keeps
        own = sum(o for n, (i, o) in linear_shapes(a).items() if n in targets and n not in ("v_proj", "gate_proj", "up_proj"))
        assert (saved_bytes_per_token_layer(a, targets, 4, b, packed, True)
                - saved_bytes_per_token_layer(a, targets, 4, b, packed)) == own * b
    est = estimate_memory(a, "qlora" if nf4 else "lora", 1, 40, rank=4, targets=targets, dtype_bytes=b, packed=packed,
                          dora=dora, fp32_attention=packed)
    if any(t in targets for t in ("q_proj", "k_proj", "v_proj")):
        assert est["activations"] == got
    else:   # the first block keeps no attention tensors then (no gradient reaches them); counted anyway
        assert 0 < est["activations"] - got < per_layer


def test_compiled_qlora_saves_no_dequantized_weight():
    """Compiled, NF4 blocks keep no more for backward than eager ones: no 16/32-bit copy of their weights
    (AOTAutograd's CSE would share the forward's dequantized weight with backward; compile_blocks turns it off)."""
    from model import ModelArgs
    args = ModelArgs(dim=256, n_layers=1, n_heads=4, n_kv_heads=2, head_dim=64, intermediate_size=512, vocab_size=64)
    eager = _saved_activation_bytes(args, torch.float32, list(ALL_TARGETS), 0.0, nf4=True)
    compiled = _saved_activation_bytes(args, torch.float32, list(ALL_TARGETS), 0.0, nf4=True, compile=True)
    weights = 4 * args.n_layers * sum(i * o for i, o in linear_shapes(args).values())
    assert compiled <= eager < weights, (compiled, eager, weights)


def test_audit_report_has_every_section(tiny_run, tmp_path):
    """Every section with finite numbers, accuracy for all nine variants and those of QDoRA and LoftQ
    with intervals and the paired tests, every plot; without --eval-generate the report says how to get accuracy."""
    from audit import VARIANTS, render_report, variant_names
    from score import mcnemar, wilson
    model, data = tiny_run
    main(["--out", str(tmp_path / "audit"), "--model", str(model), "--data", str(data), "--max-steps", "3",
          "--eval-examples", "8", "--seq-len", "64", "--batch-size", "4", "--lr", "5e-3", "--kl-tokens", "64",
          "--dtype", "float32", "--device", "cpu", "--eval-generate", "4", "--eval-max-new-tokens", "4",
          "--variants", "lora,qlora,qdora,loftq", "--loftq-iters", "2"])
    r = json.loads((tmp_path / "audit/report.json").read_text())
    nums = [r["quantization_damage"]["kl_16bit_to_nf4"], r["quantization_damage"]["eval_loss_gap"]]
    nums += [v for p in r["paths"].values() for k, v in p.items() if k != "accuracy"]
    modes = ("lora", "qlora", "qdora", "loftq")
    assert tuple(r["training"]) == tuple(r["estimator"]) == modes
    nums += [r["training"][m][k] for m in modes for k in ("peak_mem", "tokens_per_s", "eval_loss_after")]
    nums += [r["estimator"][m]["predicted_peak"] for m in modes]
    extra = {f"{m}_{k}" for m in ("qdora", "loftq") for k in ("as_trained", "merged_16bit", "merged_nf4")}
    assert set(r["paths"]) == set(VARIANTS) | extra == set(variant_names(r["paths"]))
    for name, p in r["paths"].items():
        a = p["accuracy"]
        assert a["n"] == 4 and a["right"] == sum(a["correct"]) and list(a["ci95"]) == pytest.approx(list(wilson(a["right"], 4)))
        nums += [a["accuracy"], *a["ci95"], p["model_bytes"]]
    assert all(math.isfinite(x) for x in nums)
    assert r["paths"]["base_nf4"]["model_bytes"] < r["paths"]["base_16bit"]["model_bytes"]
    q = r["paired"]["a_nf4_plus_adapter vs lora_as_trained"]
    assert {k: q[k] for k in ("a_only", "b_only", "p")} == mcnemar(r["paths"]["a_nf4_plus_adapter"]["accuracy"]["correct"],
                                                                   r["paths"]["lora_as_trained"]["accuracy"]["correct"])
    answers = [json.loads(l) for l in (tmp_path / "audit/answers.jsonl").read_text().splitlines()]
    assert len(answers) == 4 and set(answers[0]) == {"question", "reference", *VARIANTS, *extra}
    assert "qdora_as_trained vs a_nf4_plus_adapter" in r["paired"] and "loftq_as_trained vs lora_as_trained" in r["paired"]
    md = (tmp_path / "audit/report.md").read_text()
    for section in ("## Training", "## Quantization damage", "## Merge paths", "## Accuracy", "## Memory estimator",
                    "## Verdict", "QLoRA alone got", "![accuracy](accuracy.png)", "| | LoRA | QLoRA | QDoRA | LoftQ |",
                    "QDoRA: peak memory", "LoftQ: peak memory", "| LoftQ merged into the 16-bit base |"):
        assert section in md
    assert all((tmp_path / "audit" / f).is_file() for f in ("loss.png", "memory.png", "estimate.png", "accuracy.png"))
    for p in r["paths"].values():
        del p["accuracy"]
    r["paired"] = {}
    assert "Not measured: pass `--eval-generate N`" in render_report(r)


def test_estimator_counts_the_padding_of_padded_rows(tiny_run, tmp_path):
    """GPU micro-batches are right-padded rows: activations scale with rows x longest row, not the real
    tokens. The run records its largest micro-batch with padding, and the estimate uses that."""
    from audit import estimate_for_run
    from data import encode_example, load_tokenizer, prompt_format
    from formats import read_args
    from train import TrainConfig, make_batch, train
    model, data = tiny_run
    cfg = TrainConfig(model=str(model), data=str(data), out=str(tmp_path / "run"), max_steps=2, batch_size=4,
                      seq_len=64, eval_examples=8, pack=True, device="cpu", dtype="float32")
    s = train(cfg)
    tok = load_tokenizer(model)
    msgs = [[dict(role="user", content="Repeat: " + "red " * k), dict(role="assistant", content="red")] for k in (1, 9)]
    ex = [encode_example(tok, prompt_format(tok), m, 64)[:2] for m in msgs]
    padded = make_batch(ex, cfg, "cpu", flat=False)
    assert padded.ids.numel() == 2 * max(len(i) for i, _ in ex) > sum(len(i) for i, _ in ex)
    assert s["max_padded_tokens_per_micro_batch"] >= s["tokens_per_step"]   # packed rows, padded to the longest
    gpu = dict(s, device="cuda:0", dtype="bfloat16", max_padded_tokens_per_micro_batch=4 * 64)
    est = estimate_for_run(read_args(model), cfg, "lora", gpu)
    want = estimate_memory(read_args(model), "lora", 4, 64, tokens=4 * 64, dtype_bytes=2, packed=True)
    assert est["activations"] == want["activations"]
