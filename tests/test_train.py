"""train.py on a tiny checkpoint: learning, exact accumulation, exact resume, masks, DDP, bad input."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from train import TrainConfig, train

ROOT = Path(__file__).resolve().parent.parent


def _cfg(tiny_run, tmp_path, **kw):
    model, data = tiny_run
    base = dict(model=str(model), data=str(data), out=str(tmp_path / "run"), eval_examples=8, max_steps=6,
                batch_size=4, seq_len=64, lr=5e-3, warmup_steps=1, dropout=0.0, log_every=100, dtype="float32",
                device="cpu")
    return TrainConfig(**dict(base, **kw))


def _adapter(out):
    return load_file(str(Path(out) / "adapter_model.safetensors"))


@pytest.mark.parametrize("qlora", [False, True])
def test_steps_lower_the_loss(tiny_run, tmp_path, qlora):
    s = train(_cfg(tiny_run, tmp_path, qlora=qlora, max_steps=30, lr=1e-2))
    assert s["eval_loss_after"] < s["eval_loss_before"] - 0.2   # from ~ln(320): the model starts uniform
    assert sum(s["losses"][-5:]) < sum(s["losses"][:5])
    out = Path(s["out"])
    assert {"adapter_config.json", "adapter_model.safetensors", "metrics.jsonl", "checkpoint.pt",
            "summary.json", "train_config.json"} <= {p.name for p in out.iterdir()}
    lines = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [l["step"] for l in lines if "loss" in l] == list(range(1, 31))


def test_accumulation_equals_one_batch(tiny_run, tmp_path):
    """Loss normalized by the window's target tokens: 1x4 = 2x2 = 4x1 micro-batches, same update."""
    runs = [train(_cfg(tiny_run, tmp_path, out=str(tmp_path / f"r{b}"), batch_size=b, grad_accum=4 // b,
                       max_steps=2)) for b in (4, 2, 1)]
    ref = _adapter(runs[0]["out"])
    for r in runs[1:]:
        for k, v in _adapter(r["out"]).items():
            torch.testing.assert_close(v, ref[k], atol=1e-6, rtol=1e-5)
        assert r["losses"] == pytest.approx(runs[0]["losses"], rel=1e-5)


def test_resume_is_exact(tiny_run, tmp_path):
    """Stopped at step 3 and resumed = run straight to 6 (dropout on, so the RNG must be restored)."""
    full = train(_cfg(tiny_run, tmp_path, out=str(tmp_path / "full"), dropout=0.1))
    part = _cfg(tiny_run, tmp_path, out=str(tmp_path / "part"), dropout=0.1, stop_after=3)
    assert train(part)["interrupted"]
    part.stop_after, part.resume = 0, True
    resumed = train(part)
    assert resumed["steps"] == 6
    a, b = _adapter(full["out"]), _adapter(resumed["out"])
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_prompt_tokens_carry_no_loss(tiny_run):
    from data import IGNORE, encode_example, load_tokenizer, prompt_format
    tok = load_tokenizer(tiny_run[0])
    fmt = prompt_format(tok)
    msgs = [dict(role="user", content="Repeat: red cat"), dict(role="assistant", content="red cat")]
    ids, tgt, _ = encode_example(tok, fmt, msgs, 128)
    assert tok.decode([t for t in tgt if t != IGNORE]) == "red cat<|im_end|>"
    ids2, tgt2, _ = encode_example(tok, fmt, msgs, 128, train_on_prompt=True)
    assert all(t != IGNORE for t in tgt2) and ids2 == ids


def test_two_process_torchrun_equals_one_process(tiny_run, tmp_path):
    one = train(_cfg(tiny_run, tmp_path, out=str(tmp_path / "one"), batch_size=4, max_steps=3))
    model, data = tiny_run
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
           str(ROOT / "train.py"), "--model", str(model), "--data", str(data), "--out", str(tmp_path / "two"),
           "--eval-examples", "8", "--max-steps", "3", "--batch-size", "2", "--seq-len", "64", "--lr", "5e-3",
           "--warmup-steps", "1", "--dropout", "0", "--dtype", "float32", "--device", "cpu"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = _adapter(one["out"]), _adapter(tmp_path / "two")
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-5, rtol=1e-4)


# -- bad input: one clear error, no run directory -------------------------------------------------------

def _fails(cfg, match):
    with pytest.raises((ValueError, PermissionError, FileNotFoundError), match=match):
        train(cfg)
    assert not Path(cfg.out).exists()


def test_malformed_jsonl_line(tiny_run, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(tiny_run[1].read_text().splitlines()[0] + "\n{not json\n")
    _fails(_cfg(tiny_run, tmp_path, data=str(bad)), r"bad.jsonl:2: not valid JSON")


def test_empty_dataset(tiny_run, tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n")
    _fails(_cfg(tiny_run, tmp_path, data=str(tmp_path / "empty.jsonl")), "empty")


def test_targets_matching_nothing(tiny_run, tmp_path):
    _fails(_cfg(tiny_run, tmp_path, targets="c_attn"), "match no linear layer")


def test_bad_mmap_threshold(tiny_run, tmp_path):
    _fails(_cfg(tiny_run, tmp_path, cpu_mmap_kb=0), "--cpu-mmap-kb 0: choose 1 to 32768")


def test_seq_len_above_model_limit(tiny_run, tmp_path):
    _fails(_cfg(tiny_run, tmp_path, seq_len=4096), "above the model's limit of 256")


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_unwritable_out(tiny_run, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o500)
    _fails(_cfg(tiny_run, tmp_path, out=str(ro / "run")), "not writable")


def test_out_is_a_file(tiny_run, tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(ValueError, match="not a directory"):
        train(_cfg(tiny_run, tmp_path, out=str(tmp_path / "f")))
    assert (tmp_path / "f").read_text() == "x"


def test_existing_run_is_not_overwritten(tiny_run, tmp_path):
    cfg = _cfg(tiny_run, tmp_path, max_steps=1)
    train(cfg)
    with pytest.raises(ValueError, match="already holds a run"):
        train(_cfg(tiny_run, tmp_path, max_steps=1))
