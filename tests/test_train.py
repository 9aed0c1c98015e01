"""train.py on a tiny checkpoint: learning, exact accumulation, exact resume, masks, DDP, bad input."""
import json
import os
import re
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
    assert {"adapter_config.json", "adapter_model.safetensors", "metrics.jsonl", "checkpoint.safetensors",
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


def test_resume_may_split_the_step_into_other_micro_batches(tiny_run, tmp_path):
    """--resume may change --batch-size and --grad-accum (a smaller micro-batch after running out of memory),
    not the examples of each step: 4 x 1 stopped at 3 and resumed as 2 x 2 ends where 4 x 1 ends; 2 x 1 is refused."""
    full = train(_cfg(tiny_run, tmp_path, out=str(tmp_path / "full")))
    assert train(_cfg(tiny_run, tmp_path, out=str(tmp_path / "part"), stop_after=3))["interrupted"]
    with pytest.raises(ValueError, match="its steps took 4 examples each .* this run's would take 2"):
        train(_cfg(tiny_run, tmp_path, out=str(tmp_path / "part"), batch_size=2, resume=True))
    resumed = train(_cfg(tiny_run, tmp_path, out=str(tmp_path / "part"), batch_size=2, grad_accum=2, resume=True))
    assert resumed["steps"] == 6
    for k, v in _adapter(resumed["out"]).items():
        torch.testing.assert_close(v, _adapter(full["out"])[k], atol=1e-6, rtol=1e-5)


def test_prompt_tokens_carry_no_loss(tiny_run):
    from data import IGNORE, encode_example, load_tokenizer, prompt_format
    tok = load_tokenizer(tiny_run[0])
    fmt = prompt_format(tok)
    msgs = [dict(role="user", content="Repeat: red cat"), dict(role="assistant", content="red cat")]
    ids, tgt, _ = encode_example(tok, fmt, msgs, 128)
    assert tok.decode([t for t in tgt if t != IGNORE]) == "red cat<|im_end|>"
    ids2, tgt2, _ = encode_example(tok, fmt, msgs, 128, train_on_prompt=True)
    assert all(t != IGNORE for t in tgt2) and ids2 == ids


def test_two_process_torchrun_equals_one_process(tiny_run, tmp_path, capsys):
    """The same adapter, and the same answers to --eval-generate (each rank answers half the questions)."""
    one = train(_cfg(tiny_run, tmp_path, out=str(tmp_path / "one"), batch_size=4, max_steps=3, eval_generate=5,
                     eval_max_new_tokens=4))
    model, data = tiny_run
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
           str(ROOT / "train.py"), "--model", str(model), "--data", str(data), "--out", str(tmp_path / "two"),
           "--eval-examples", "8", "--max-steps", "3", "--batch-size", "2", "--seq-len", "64", "--lr", "5e-3",
           "--warmup-steps", "1", "--dropout", "0", "--dtype", "float32", "--device", "cpu", "--eval-generate", "5",
           "--eval-max-new-tokens", "4"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = _adapter(one["out"]), _adapter(tmp_path / "two")
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-5, rtol=1e-4)
    s1, s2 = (json.loads((p / "summary.json").read_text()) for p in (Path(one["out"]), tmp_path / "two"))
    for key in ("accuracy_before", "accuracy_after"):
        assert s2[key]["n"] == 5 and s2[key]["correct"] == s1[key]["correct"]
    assert r.stdout.count("answers after training: ") == 1   # logged once, by rank 0
    shown = lambda text: [l for l in text.splitlines() if l.startswith("    answer ")]   # three answers, from both ranks
    assert len(shown(r.stdout)) == 3 and shown(r.stdout) == shown(capsys.readouterr().out)


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


# -- through the real CLI: checkpoints that cannot run code, preemption, divergence, bad data --------------

def _cli(tiny_run, out, *extra, timeout=300, **popen):
    """argv of train.py on the tiny run (fp32, CPU, no dropout unless asked)."""
    model, data = tiny_run
    return [sys.executable, str(ROOT / "train.py"), "--model", str(model), "--data", str(data), "--out", str(out),
            "--eval-examples", "8", "--batch-size", "4", "--seq-len", "64", "--lr", "5e-3", "--warmup-steps", "1",
            "--log-every", "100", "--dtype", "float32", "--device", "cpu", *map(str, extra)]


def _run(argv, **kw):
    return subprocess.run(argv, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, OMP_NUM_THREADS="1"), **kw)


def _stopped_run(tiny_run, tmp_path, name="part"):
    """A run stopped at step 2 with a resumable checkpoint (the same exit as Ctrl-C or SIGTERM)."""
    r = _run(_cli(tiny_run, tmp_path / name, "--max-steps", "6", "--stop-after", "2"))
    assert r.returncode == 75, r.stderr[-2000:]
    return tmp_path / name


def test_pickle_in_checkpoint_never_runs(tiny_run, tmp_path):
    """A pickle payload where a checkpoint should be is refused with one clear error, and never executed."""
    import pickle
    out = _stopped_run(tiny_run, tmp_path)
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))
    evil = pickle.dumps({"step": 1, "x": Payload()})
    (out / "checkpoint.safetensors").write_bytes(evil)
    r = _run(_cli(tiny_run, out, "--max-steps", "6", "--resume"))
    assert r.returncode == 2 and "error:" in r.stderr and "checkpoint.safetensors" in r.stderr, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    # An older version's pickle checkpoint.pt is not unpickled either.
    (out / "checkpoint.safetensors").unlink()
    (out / "checkpoint.pt").write_bytes(evil)
    r = _run(_cli(tiny_run, out, "--max-steps", "6", "--resume"))
    assert r.returncode == 2 and "checkpoint.pt is a pickle checkpoint" in r.stderr, r.stderr[-2000:]
    assert not marker.exists()


def test_truncated_or_foreign_checkpoint_is_one_clear_error(tiny_run, tmp_path):
    out = _stopped_run(tiny_run, tmp_path)
    ck = out / "checkpoint.safetensors"
    whole = ck.read_bytes()
    ck.write_bytes(whole[:len(whole) // 2])
    r = _run(_cli(tiny_run, out, "--max-steps", "6", "--resume"))
    assert r.returncode == 2 and f"{ck}: truncated safetensors file" in r.stderr, r.stderr[-2000:]
    # A valid safetensors file that is not a checkpoint (the adapter, say) is refused too.
    ck.write_bytes((out / "adapter_model.safetensors").read_bytes())
    r = _run(_cli(tiny_run, out, "--max-steps", "6", "--resume"))
    assert r.returncode == 2 and "not a training checkpoint" in r.stderr and "Traceback" not in r.stderr


def test_sigterm_then_resume_equals_uninterrupted(tiny_run, tmp_path):
    """SIGTERM mid-run: the step under way finishes, a checkpoint is written, exit code 75; --resume
    then ends with exactly the adapter of a run that was never stopped (dropout on: RNG restored)."""
    import signal
    args = ("--max-steps", "300", "--dropout", "0.1")
    p = subprocess.Popen(_cli(tiny_run, tmp_path / "part", *args), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    metrics = tmp_path / "part" / "metrics.jsonl"
    _wait_for_steps(p, metrics, 3)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=300)
    assert p.returncode == 75, err[-2000:]
    ck = json.loads(json.loads(open(tmp_path / "part/checkpoint.safetensors", "rb").read(
        8 + int.from_bytes(open(tmp_path / "part/checkpoint.safetensors", "rb").read(8), "little"))[8:])
        ["__metadata__"]["state"])
    assert 3 <= ck["step"] < 300
    r = _run(_cli(tiny_run, tmp_path / "part", *args, "--resume"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"resumed from {tmp_path / 'part'}/checkpoint.safetensors at step {ck['step']}" in r.stdout
    full = train(_cfg(tiny_run, tmp_path, out=str(tmp_path / "full"), max_steps=300, dropout=0.1))
    a, b = _adapter(full["out"]), _adapter(tmp_path / "part")
    assert all(torch.equal(a[k], b[k]) for k in a)
    steps = [json.loads(l)["step"] for l in metrics.read_text().splitlines() if '"loss"' in l]
    assert steps == list(range(1, 301))   # no step logged twice


def _pids_of_rank(parent: int, rank: int) -> list[int]:
    """Worker processes of a torchrun agent with the given RANK, read from /proc."""
    out = []
    for d in Path("/proc").iterdir():
        try:
            if d.name.isdigit() and int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]) == parent:
                if f"RANK={rank}".encode() in (d / "environ").read_bytes().split(b"\0"):
                    out.append(int(d.name))
        except OSError:
            pass
    return out


def _wait_for_steps(p, metrics: Path, n: int):
    """Until the run in process p has logged n steps in its metrics.jsonl (or has ended)."""
    import time
    while p.poll() is None and not (metrics.is_file() and metrics.read_text().count('"loss"') >= n):
        time.sleep(0.01)


def test_sigterm_to_one_rank_stops_all_at_the_same_step(tiny_run, tmp_path):
    """Under torchrun a signal that reaches one rank only stops every rank after the same step, with one
    checkpoint; --resume under torchrun then ends exactly where a torchrun run never stopped ends."""
    import signal
    model, data = tiny_run
    run_args = ["--model", str(model), "--data", str(data), "--out", str(tmp_path / "two"), "--eval-examples", "8",
                "--max-steps", "200", "--batch-size", "2", "--seq-len", "64", "--lr", "5e-3", "--warmup-steps", "1",
                "--dropout", "0", "--dtype", "float32", "--device", "cpu", "--log-every", "100"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29523",
                str(ROOT / "train.py")]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.Popen(torchrun + run_args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    _wait_for_steps(p, tmp_path / "two" / "metrics.jsonl", 3)
    (rank0,), (rank1,) = _pids_of_rank(p.pid, 0), _pids_of_rank(p.pid, 1)
    from allocator import choose
    chosen, lib = choose()
    if lib:   # every worker re-executed itself with the allocator preloaded
        assert all(f"lib{chosen}" in Path(f"/proc/{pid}/maps").read_text() for pid in (rank0, rank1))
    os.kill(rank1, signal.SIGTERM)
    out, err = p.communicate(timeout=300)
    assert "stopped (a signal to another rank): checkpoint saved at step" in out, (out + err)[-3000:]
    from formats import load_state
    tensors, meta = load_state(tmp_path / "two/checkpoint.safetensors")
    assert meta["world"] == 2 and not torch.equal(tensors["rng.cpu.0"], tensors["rng.cpu.1"])   # own dropout streams
    r = subprocess.run(torchrun + run_args + ["--resume"], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    args_full = [tmp_path / "full" if a == str(tmp_path / "two") else a for a in run_args]
    r = subprocess.run(torchrun + list(map(str, args_full)), capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = _adapter(tmp_path / "full"), _adapter(tmp_path / "two")
    assert all(torch.equal(a[k], b[k]) for k in a)


def _no_nan_anywhere(out: Path):
    """Every saved file of a run is finite: safetensors tensors and strict JSON (no NaN/Infinity)."""
    def strict(s):
        raise ValueError(f"non-finite number {s} in a saved file")
    for f in out.iterdir():
        if f.suffix == ".safetensors":
            assert all(torch.isfinite(t).all() for t in load_file(str(f)).values() if t.is_floating_point()), f
        elif f.suffix in (".json", ".jsonl"):
            for line in f.read_text().splitlines() if f.suffix == ".jsonl" else [f.read_text()]:
                json.loads(line, parse_constant=strict)


def test_divergence_stops_with_the_step_and_saves_no_nan(tiny_run, tmp_path):
    out = tmp_path / "div"
    r = _run(_cli(tiny_run, out, "--max-steps", "40", "--lr", "1e30", "--grad-clip", "0", "--warmup-steps", "0",
                  "--save-every", "1"))
    assert r.returncode == 4, (r.stdout + r.stderr)[-2000:]
    m = re.search(r"error: (?:step (\d+): the loss is \S+ and the gradient norm \S+|after step (\d+) .* not finite)",
                  r.stderr)
    assert m and "training diverged" in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
    step = int(m.group(1) or m.group(2))
    assert step < 40
    _no_nan_anywhere(out)
    if (out / "checkpoint.safetensors").is_file():   # the last good save is named and is a real one
        assert "The last good checkpoint, step" in r.stderr


BAD_DATA = {
    "instruction_not_a_string": ('{"instruction": "a", "output": "b"}\n{"instruction": 5, "output": "b"}\n',
                                 r":2: 'instruction' must be a string, got a number"),
    "output_null": ('{"instruction": "a", "output": null}\n', r":1: 'output' must be a string, got null"),
    "message_without_role": ('{"messages": [{"content": "hi"}, {"role": "assistant", "content": "x"}]}\n',
                             r":1: messages\[0\] has no 'role'"),
    "not_utf8": (b'{"instruction": "a", "output": "b"}\n{"instruction": "caf\xe9", "output": "b"}\n',
                 r":2: not UTF-8 text"),
    "neither_jsonl_nor_array": ("instruction,output\nhello,world\n", r":1: not valid JSON .*JSON Lines"),
    "array_bad_element": ('[\n  {"instruction": "a", "output": "b"},\n  {"instruction": "a"}\n]\n',
                          r":3: 'output' must be a string, got nothing"),
}


@pytest.mark.parametrize("case", BAD_DATA)
def test_bad_data_is_one_error_with_file_and_line(tiny_run, tmp_path, case):
    text, pattern = BAD_DATA[case]
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(text if isinstance(text, bytes) else text.encode())
    r = _run(_cli((tiny_run[0], bad), tmp_path / "run", "--max-steps", "2"))
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert re.search(re.escape(str(bad)) + pattern, r.stderr), r.stderr[-2000:]
    assert not (tmp_path / "run").exists()


def test_json_array_dataset_trains_like_jsonl(tiny_run, tmp_path):
    from data import read_dataset
    rows = [json.loads(l) for l in tiny_run[1].read_text().splitlines()]
    (tmp_path / "data.json").write_text(json.dumps(rows, indent=2))
    assert read_dataset(tmp_path / "data.json") == read_dataset(tiny_run[1])


def test_adapter_on_another_base_of_the_same_shapes_is_refused(tiny_run, tmp_path):
    """merge.py (and generate.py) refuse an adapter whose recorded base differs, before writing anything."""
    import transformers
    from conftest import write_tiny_tokenizer
    other = tmp_path / "other"
    torch.manual_seed(1)   # the same shapes as tiny_run's model, other weights
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**json.loads((tiny_run[0] / "config.json").read_text()))
                                  ).save_pretrained(other)
    write_tiny_tokenizer(other)
    run = train(_cfg(tiny_run, tmp_path, max_steps=1))
    for argv in ([str(ROOT / "merge.py"), "--model", str(other), "--adapter", run["out"], "--out", str(tmp_path / "m"),
                  "--device", "cpu"],
                 [str(ROOT / "generate.py"), "--model", str(other), "--adapter", run["out"], "--prompt", "hi",
                  "--device", "cpu", "--max-new-tokens", "2"]):
        r = _run([sys.executable, *argv])
        assert r.returncode == 2 and "was trained on another base" in r.stderr and "--force" in r.stderr, r.stderr
        assert "Traceback" not in r.stderr
    assert not (tmp_path / "m").exists() and not (tmp_path / "m.tmp").exists()
    r = _run([sys.executable, str(ROOT / "merge.py"), "--model", str(other), "--adapter", run["out"],
              "--out", str(tmp_path / "m"), "--device", "cpu", "--force"])
    assert r.returncode == 0 and (tmp_path / "m/model.safetensors").is_file(), r.stderr[-2000:]


def test_resume_on_another_base_is_refused(tiny_run, tmp_path):
    import transformers
    from conftest import write_tiny_tokenizer
    out = _stopped_run(tiny_run, tmp_path)
    other = tmp_path / "other"
    torch.manual_seed(1)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**json.loads((tiny_run[0] / "config.json").read_text()))
                                  ).save_pretrained(other)
    write_tiny_tokenizer(other)
    # the same --model path, other weights behind it: only the fingerprint can tell
    import shutil
    shutil.rmtree(tiny_run[0])
    shutil.copytree(other, tiny_run[0])
    r = _run(_cli(tiny_run, out, "--max-steps", "6", "--resume"))
    assert r.returncode == 2 and "was trained on another base" in r.stderr, r.stderr[-2000:]


def test_full_disk_during_save_leaves_the_last_checkpoint(tiny_run, tmp_path, monkeypatch):
    """The write of a save fails (ENOSPC): one clear error that says the previous save is intact, and it is."""
    import errno
    import safetensors.torch
    from formats import load_state
    from train import SaveFailed
    real, calls = safetensors.torch.save_file, []

    def fill_up(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) > 2:   # the save at step 2 writes two files; the one at step 4 finds the disk full
            with open(path, "wb") as f:
                f.write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        real(tensors, path, metadata=metadata)
    monkeypatch.setattr(safetensors.torch, "save_file", fill_up)
    cfg = _cfg(tiny_run, tmp_path, save_every=2, max_steps=6)
    with pytest.raises(SaveFailed, match=r"could not save step 4 .*No space left on device.*step 2, is intact"):
        train(cfg)
    out = Path(cfg.out)
    tensors, meta = load_state(out / "checkpoint.safetensors")
    assert meta["step"] == 2
    saved = load_file(str(out / "adapter_model.safetensors"))
    assert all(torch.equal(saved[f"base_model.model.{k[len('adapter.'):]}"], v)
               for k, v in tensors.items() if k.startswith("adapter."))
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def test_show_example_marks_the_loss_and_eos(tiny_run, tmp_path):
    r = _run(_cli(tiny_run, tmp_path / "run", "--show-example", "--seq-len", "256"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "<|im_start|>assistant\n[[" in r.stdout and "<|im_end|>]]" in r.stdout
    assert "'<|im_end|>' (id 257) ends every loss-carrying turn (1 of 1)" in r.stdout
    assert "(24 messages, 24 alpaca records)" in r.stdout
    assert not (tmp_path / "run").exists()


def test_responses_without_eos_are_refused(tiny_run, tmp_path):
    """A tokenizer whose EOS is not the format's end-of-turn token: training would never learn to stop."""
    cfg = json.loads((tiny_run[0] / "tokenizer_config.json").read_text())
    (tiny_run[0] / "tokenizer_config.json").write_text(json.dumps(dict(cfg, eos_token="<|im_start|>")))
    r = _run(_cli(tiny_run, tmp_path / "run", "--max-steps", "2"))
    assert r.returncode == 2 and "'<|im_start|>' (id 256), in the template prompt format" in r.stderr, r.stderr[-2000:]
    assert "never learn to stop" in r.stderr and "--prompt-format" in r.stderr
    assert not (tmp_path / "run").exists()


def test_fp16_trains_with_a_loss_scaler(tiny_run, tmp_path, monkeypatch):
    """fp16 (what pre-Ampere GPUs get instead of emulated bf16) scales the loss: updates whose gradients
    overflow are skipped and the scale lowered, the rest train; the scale survives --resume."""
    import functools
    from formats import load_state
    real = torch.amp.GradScaler
    monkeypatch.setattr(torch.amp, "GradScaler", functools.partial(real, init_scale=2.0 ** 40))
    s = train(_cfg(tiny_run, tmp_path, dtype="float16", max_steps=30, lr=1e-2))
    steps = [json.loads(l) for l in (Path(s["out"]) / "metrics.jsonl").read_text().splitlines() if '"loss"' in l]
    skipped = [m["step"] for m in steps if m.get("skipped")]
    assert skipped and skipped == list(range(1, len(skipped) + 1)) and len(skipped) < 25   # overflow at first, then not
    assert s["eval_loss_after"] < s["eval_loss_before"] - 0.2
    _no_nan_anywhere(Path(s["out"]))
    part = _cfg(tiny_run, tmp_path, out=str(tmp_path / "part"), dtype="float16", max_steps=30, lr=1e-2,
                stop_after=len(skipped) + 3)
    train(part)
    _, meta = load_state(tmp_path / "part/checkpoint.safetensors")
    assert meta["grad_scaler"]["scale"] < 2.0 ** 40
    part.stop_after, part.resume = 0, True
    resumed = train(part)
    a, b = _adapter(s["out"]), _adapter(resumed["out"])
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_log_names_the_allocator(tiny_run, tmp_path):
    """train.py re-executes itself with the fastest allocator installed (mimalloc from requirements.txt on
    a fresh machine) and says which; PURE_QLORA_ALLOCATOR=glibc keeps glibc (with its mmap threshold)."""
    from allocator import choose, mimalloc_path
    assert mimalloc_path()   # requirements.txt installs cmeel-mimalloc
    r = _run(_cli(tiny_run, tmp_path / "a", "--max-steps", "1"))
    assert r.returncode == 0 and f"allocator {choose()[0]}" in r.stdout, r.stderr
    r = subprocess.run(_cli(tiny_run, tmp_path / "b", "--max-steps", "1"), capture_output=True, text=True,
                       env=dict(os.environ, PURE_QLORA_ALLOCATOR="glibc"), timeout=600)
    assert r.returncode == 0 and "allocator glibc" in r.stdout, r.stderr
    r = subprocess.run(_cli(tiny_run, tmp_path / "c", "--max-steps", "1"), capture_output=True, text=True,
                       env=dict(os.environ, PURE_QLORA_ALLOCATOR="mimalloc"), timeout=600)
    assert r.returncode == 0 and "allocator mimalloc" in r.stdout, r.stderr


REUSE = r"""
import resource, sys, time
sys.path.insert(0, sys.argv[1])
import allocator
allocator.preload()
import torch
faults = []
for i in range(6):   # a step's activations: allocated, written, freed, then a pause longer than 10 ms
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    xs = [torch.ones(1 << 20) for _ in range(16)]   # 16 x 4 MB
    del xs
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    time.sleep(0.05)
print(allocator.name(), max(faults[1:]))
"""


def test_mimalloc_reuses_freed_memory_without_page_faults():
    """Memory freed in one step is reused by the next without faulting its pages in again: preload()
    keeps mimalloc from returning it to the OS after its default 10 ms (a caller's own setting wins,
    and shows what the default did)."""
    from allocator import mimalloc_path
    assert mimalloc_path()
    run = lambda **env: subprocess.run([sys.executable, "-c", REUSE, str(ROOT)], capture_output=True, text=True,
                                       env=dict(os.environ, PURE_QLORA_ALLOCATOR="mimalloc", **env), timeout=120)
    kept, purged = run(), run(MIMALLOC_PURGE_DELAY="10")
    assert kept.returncode == 0 and purged.returncode == 0, kept.stderr + purged.stderr
    (name, kept), (_, purged) = kept.stdout.split(), purged.stdout.split()
    assert name == "mimalloc" and int(kept) <= 20 and int(purged) >= 200, (kept, purged)


@pytest.mark.parametrize("qlora", [False, True])
def test_compiled_blocks_train_like_eager(tiny_run, tmp_path, qlora):
    """--compile: the same gradients as eager on micro-batches of different lengths and segment counts,
    and the same losses step by step through train() (QLoRA with gradient checkpointing); the blocks
    really ran compiled. (Adapters after Adam are not compared element by element: where a gradient is
    ~0, Adam's g / sqrt(v) turns last-bit differences of the summation order into visible ones.)"""
    from torch._dynamo.utils import counters
    from train import build_model, make_batch, loss_sum, prepare_data, start
    from data import load_tokenizer
    kw = dict(qlora=qlora, grad_checkpoint=qlora, max_steps=3, eval_examples=0, batch_size=3)
    counters.clear()
    grads = []
    for compile in (False, True):
        cfg = _cfg(tiny_run, tmp_path, out=str(tmp_path / f"g{compile}"), compile=compile, **kw)
        run = start(cfg)
        examples, _ = prepare_data(cfg, load_tokenizer(cfg.model), log=lambda *a: None)
        model, params, _, _ = build_model(run)
        torch.manual_seed(1)
        with torch.no_grad():   # B = 0 would hide the adapter's path through the block
            for p in params:
                p.normal_(0, 0.1)
        for lo, hi in ((0, 3), (3, 5), (5, 9)):
            loss_sum(model, make_batch(examples[lo:hi], cfg, run.device, True)).backward()
        grads.append([p.grad for p in params])
    assert counters["stats"]["unique_graphs"] > 0
    for eager, compiled in zip(*grads):   # relative to each tensor's scale: fused kernels sum in another order
        err = ((compiled - eager).abs().max() / eager.abs().max()).item()
        assert err < 1e-4, err
    eager = train(_cfg(tiny_run, tmp_path, out=str(tmp_path / "eager"), **kw))
    compiled = train(_cfg(tiny_run, tmp_path, out=str(tmp_path / "compiled"), compile=True, **kw))
    torch.testing.assert_close(compiled["losses"], eager["losses"], rtol=1e-5, atol=0)


def test_sharegpt_data_trains_without_an_eval_split(tiny_run, tmp_path):
    """ShareGPT conversations train through the CLI; --eval-examples 0 logs no eval rather than nan."""
    rows = [json.loads(l) for l in tiny_run[1].read_text().splitlines()]
    convs = [r["messages"] if "messages" in r else [dict(role="user", content=r["instruction"]),
                                                     dict(role="assistant", content=r["output"])] for r in rows]
    data = tmp_path / "sharegpt.jsonl"
    data.write_text("".join(json.dumps(dict(conversations=[{"from": "human" if m["role"] == "user" else "gpt",
                                                            "value": m["content"]} for m in c])) + "\n" for c in convs))
    r = _run(_cli((tiny_run[0], data), tmp_path / "run", "--max-steps", "2", "--eval-examples", "0"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "(48 sharegpt records)" in r.stdout and "no eval split (--eval-examples 0)" in r.stdout
    assert "nan" not in r.stdout and "eval before training" not in r.stdout


def test_eval_generate_scores_answers_before_and_after(tiny_run, tmp_path):
    """--eval-generate: greedy answers to held-out prompts, scored before and after training and at
    --eval-every, with the interval and the paired test in the summary and the log; a bad metric is
    refused before any write."""
    from score import mcnemar, wilson
    out = tmp_path / "run"
    r = _run(_cli(tiny_run, out, "--max-steps", "3", "--eval-every", "2", "--eval-generate", "5",
                  "--eval-metric", "contains", "--eval-max-new-tokens", "6"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert all(f"answers {w}: " in r.stdout for w in ("before training", "at step 2", "after training"))
    assert "(95% interval" in r.stdout and "McNemar's exact test p = " in r.stdout
    s = json.loads((out / "summary.json").read_text())
    for key in ("accuracy_before", "accuracy_after"):
        a = s[key]
        assert a["n"] == 5 and a["right"] == sum(a["correct"]) and a["metric"] == "contains"
        assert list(a["ci95"]) == pytest.approx(list(wilson(a["right"], 5)))
    assert s["accuracy_paired"] == mcnemar(s["accuracy_after"]["correct"], s["accuracy_before"]["correct"])
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows if "accuracy" in row] == [0, 2, 3]
    r = _run(_cli(tiny_run, tmp_path / "bad", "--eval-generate", "5", "--eval-metric", "bleu"))
    assert r.returncode == 2 and "--eval-metric 'bleu'" in r.stderr and not (tmp_path / "bad").exists()


def test_eval_answers_in_question_order(tiny_run, monkeypatch):
    """accuracy() batches prompts by length; each answer still belongs to its own question: the same as
    generating for that question alone."""
    import train as T
    from data import load_tokenizer
    from formats import load_model
    from generate import generate_batch
    cfg = T.TrainConfig(model=str(tiny_run[0]), data=str(tiny_run[1]), eval_examples=8, eval_generate=7,
                        eval_max_new_tokens=5, eval_metric="contains")
    tok, model = load_tokenizer(tiny_run[0]), load_model(tiny_run[0], torch.float32, device="cpu")
    torch.manual_seed(1)
    with torch.no_grad():   # larger random weights: answers that depend on the prompt
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    items = T.generation_set(cfg, tok)
    assert len({len(q.prompt_ids) for q in items}) > 2   # lengths differ: the sort reorders them
    monkeypatch.setattr(T, "GENERATE_BATCH", 3)
    alone = [tok.decode(generate_batch(model, [q.prompt_ids], 5, tok.stop_ids)[0]) for q in items]
    assert len(set(alone)) > 2   # answers differ: a mix-up would show
    assert T.accuracy(model, tok, items, cfg)["answers"] == alone


def _choice_data(path, n=48, seed=0):
    """Multiple-choice records in two shapes: the answer repeats the question's first word."""
    import random
    rng, words, rows = random.Random(seed), ["red", "blue", "cat", "dog", "sun", "moon"], []
    for i in range(n):
        q = rng.sample(words, 3)
        rec = dict(instruction=f"Which word comes first: {' '.join(q)}?", output=q[0], choices=sorted(q))
        rows.append(rec if i % 2 else dict(messages=[dict(role="user", content=rec["instruction"]),
                                                     dict(role="assistant", content=q[0])], choices=sorted(q)))
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_eval_metric_loglik_picks_the_most_likely_choice(tiny_run, tmp_path):
    """--eval-metric loglik: each choice's answer log-probability equals minus the training loss of the
    conversation with that answer (one at a time, through loss_sum), and the pick is the largest; through
    the CLI too. Data without choices, or a reference not among them, is refused with file and line."""
    from data import encode_example, load_tokenizer, prompt_format
    from formats import load_model
    from train import TrainConfig, accuracy, answer_logliks, generation_set, loss_sum, to_batch
    data = _choice_data(tmp_path / "mc.jsonl")
    cfg = TrainConfig(model=str(tiny_run[0]), data=str(data), eval_examples=8, eval_generate=6, eval_metric="loglik")
    tok, model = load_tokenizer(tiny_run[0]), load_model(tiny_run[0], torch.float32, device="cpu")
    items = generation_set(cfg, tok)
    assert len(items) == 6 and all(q.reference in q.choices and len(q.choice_examples) == 3 for q in items)
    acc = accuracy(model, tok, items, cfg)
    fmt = prompt_format(tok)
    for q, answer in zip(items, acc["answers"]):
        msgs = [dict(role="user", content=q.text)]
        one = []
        for c in q.choices:
            ids, tgt = encode_example(tok, fmt, msgs + [dict(role="assistant", content=c)], 64)[:2]
            with torch.no_grad():
                one.append(-loss_sum(model, to_batch(torch.tensor([ids]), torch.tensor([tgt]), None, "cpu")).item())
        assert answer_logliks(model, list(q.choice_examples)) == pytest.approx(one, abs=1e-4)
        assert answer == q.choices[one.index(max(one))]
    assert acc["right"] == sum(a == q.reference for a, q in zip(acc["answers"], items))
    out = tmp_path / "run"
    r = _run(_cli((tiny_run[0], data), out, "--max-steps", "2", "--eval-generate", "6"))   # auto: loglik, as there are choices
    assert r.returncode == 0, r.stderr[-2000:]
    assert "6 held-out questions, scored by loglik" in r.stdout
    s = json.loads((out / "summary.json").read_text())
    assert s["accuracy_after"]["metric"] == "loglik" and s["accuracy_after"]["n"] == 6
    r = _run(_cli(tiny_run, tmp_path / "bad", "--eval-generate", "5", "--eval-metric", "loglik"))
    assert r.returncode == 2 and "none of the 8 held-out records" in r.stderr and not (tmp_path / "bad").exists()
    bad = tmp_path / "badmc.jsonl"
    bad.write_text(data.read_text() + json.dumps(dict(instruction="Pick", output="x", choices=["a", "b"])) + "\n")
    r = _run(_cli((tiny_run[0], bad), tmp_path / "bad", "--eval-generate", "5", "--eval-metric", "loglik"))
    assert r.returncode == 2 and "badmc.jsonl:49: the answer 'x' is not one of its 'choices'" in r.stderr


def test_help_explains_every_flag():
    r = _run([sys.executable, str(ROOT / "train.py"), "--help"])
    assert r.returncode == 0, r.stderr[-2000:]
    from dataclasses import fields
    for f in fields(TrainConfig):
        assert "--" + f.name.replace("_", "-") in r.stdout
    assert "95% interval" in r.stdout


def test_bucketed_micro_batch_trains_as_the_unpadded_one(tiny_ckpt):
    """make_batch(bucket=True) pads the row to bucket_length with a segment of its own and no targets: the
    loss and every gradient are those of the unpadded row (fp32, so only the padding could differ)."""
    from formats import load_model
    from lora import apply_lora
    from train import bucket_length, loss_sum, make_batch
    assert [bucket_length(n) for n in (1, 64, 65, 700, 2047, 2049, 5000)] == [64, 64, 128, 704, 2048, 2176, 5120]
    model = load_model(tiny_ckpt[0], torch.float32, device="cpu")
    apply_lora(model, ["q_proj", "v_proj", "down_proj"])
    torch.manual_seed(0)
    params = [p for p in model.parameters() if p.requires_grad]
    with torch.no_grad():
        for p in params:
            p.normal_(0, 0.1)
    g = torch.Generator().manual_seed(0)
    ex = [(torch.randint(0, 256, (n,), generator=g).tolist(), torch.randint(0, 256, (n,), generator=g).tolist())
          for n in (9, 30, 28)]
    out = []
    for bucket in (False, True):
        batch = make_batch(ex, TrainConfig(seq_len=64), "cpu", True, bucket)
        assert batch.ids.shape == (1, 128 if bucket else 67)
        loss = loss_sum(model, batch)
        loss.backward()
        out.append([loss.detach()] + [p.grad.clone() for p in params])
        model.zero_grad()
    for a, b in zip(*out):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_lm_head_loss_in_bf16_on_a_cpu_leaves_its_padding_rows_out():
    """In bf16 on a CPU, LMHeadLoss pads its rows to a multiple of 32: the loss and dL/dh are those of
    the real rows (fp32 cross-entropy within bf16 rounding; 27 rows of padding would add ~150 to the loss)."""
    from train import LMHeadLoss
    torch.manual_seed(0)
    h = torch.randn(37, 64).bfloat16().requires_grad_()
    w = (torch.randn(300, 64) * 0.2).bfloat16()
    t = torch.randint(0, 300, (37,))
    loss = LMHeadLoss.apply(h, w, t)
    loss.backward()
    hf = h.detach().float().requires_grad_()
    ref = torch.nn.functional.cross_entropy(hf @ w.float().T, t, reduction="sum")
    ref.backward()
    torch.testing.assert_close(loss, ref, atol=0, rtol=1e-2)
    assert h.grad.shape == (37, 64)
    torch.testing.assert_close(h.grad.float(), hf.grad, atol=1e-2, rtol=2e-2)


MEMORY_OF_NEW_LENGTHS = r'''
import ctypes, random, sys, torch
sys.path.insert(0, sys.argv[1])
from formats import load_model
from lora import apply_lora
from train import TrainConfig, loss_sum, make_batch
model = load_model(sys.argv[2], torch.bfloat16, device="cpu")
apply_lora(model, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
rng = random.Random(0)
lengths = list(range(17, 65))
rng.shuffle(lengths)
def rss():
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    return int(open("/proc/self/status").read().split("VmRSS:")[1].split()[0]) / 1024
for i in range(16):   # 48 example lengths, 16 micro-batch lengths, targets on every token: each shape new
    ex = [([rng.randrange(256) for _ in range(n)],) * 2 for n in lengths[3 * i:3 * i + 3]]
    loss_sum(model, make_batch(ex, TrainConfig(seq_len=64), "cpu", True, bucket=True)).backward()
    if i == 3:
        first = rss()
print(rss() - first)
'''


def test_bf16_cpu_memory_does_not_grow_with_new_lengths(tiny_ckpt):
    """A bf16 run on a CPU meets new micro-batch, example and target-count lengths nearly every step.
    oneDNN keeps the kernels it builds for each new matmul shape, and torch's bf16 flash backward those for
    each new segment length, never freed: without the buckets and the fp32 attention these 12 micro-batches
    left 259 MB behind on a CPU with AVX512-BF16 (nothing on one without bf16 units: no kernels are built)."""
    r = subprocess.run([sys.executable, "-c", MEMORY_OF_NEW_LENGTHS, str(ROOT), str(tiny_ckpt[0])],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert float(r.stdout.split()[-1]) < 32, r.stdout
