"""--fsdp under torchrun (gloo on CPU): FSDP2 shards each block's base and adapters over the ranks, and training
gives what one process gives with the same global batch."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from test_train import _adapter, _cfg
from train import train

ROOT = Path(__file__).resolve().parent.parent
ENV = dict(os.environ, OMP_NUM_THREADS="1")


def torchrun(world, port, args, extra=(), env=ENV):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world), "--master_port", str(port),
           *extra, str(ROOT / "train.py"), *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)


def cli_args(tiny_run, out, batch, steps, **flags):
    model, data = tiny_run
    args = ["--model", model, "--data", data, "--out", out, "--eval-examples", 8, "--max-steps", steps,
            "--batch-size", batch, "--seq-len", 64, "--lr", 5e-3, "--warmup-steps", 1, "--dropout", 0,
            "--dtype", "float32", "--device", "cpu", "--log-every", 100, "--fsdp"]
    for k, v in flags.items():
        args += [f"--{k.replace('_', '-')}"] + ([] if v is True else [v])
    return args


def assert_same_adapter(a, b):
    assert set(a) == set(b)
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("world,qlora,ckpt,dora,compile", [(3, False, True, False, False), (2, True, False, False, True),
                                                           (3, True, True, False, False), (2, True, True, True, False)])
def test_fsdp_equals_one_process(tiny_run, tmp_path, world, qlora, ckpt, dora, compile):
    """6 examples per step in all: one process with batch 6, or `world` ranks with 6 / world each. Shards are
    uneven at world 3 (64 rows, r = 8, NF4 codes of 2048 bytes over 3 ranks). The same adapter (in peft's
    format, written once), losses, eval loss and generated answers; each rank holds its part of the base.
    QDoRA too: FSDP2 gathers each step's new A and B with their version counters kept, so DoRA's norm cache
    must be dropped after each step (without that, 1e-2 apart after 3 steps). And with --compile (each sharded
    block compiled in place), against one process in eager mode."""
    flags = dict(qlora=qlora, grad_checkpoint=ckpt, dora=dora)
    gen = dict(eval_generate=5, eval_max_new_tokens=4)
    one = train(_cfg(tiny_run, tmp_path, out=str(tmp_path / "one"), batch_size=6, max_steps=3, **flags, **gen))
    r = torchrun(world, 29540 + world + 2 * qlora + 4 * dora, cli_args(tiny_run, tmp_path / "fsdp", 6 // world, 3, **gen,
                                                            **{k: True for k, v in dict(flags, compile=compile).items() if v}))
    assert r.returncode == 0, r.stderr[-3000:]
    answers = json.loads((Path(one["out"]) / "summary.json").read_text())["accuracy_after"]
    assert ("blocks compiled" in r.stdout) == compile
    assert_same_adapter(_adapter(one["out"]), _adapter(tmp_path / "fsdp"))
    s = json.loads((tmp_path / "fsdp" / "summary.json").read_text())
    assert s["losses"] == pytest.approx(one["losses"], rel=1e-5)
    assert s["eval_loss_after"] == pytest.approx(one["eval_loss_after"], rel=1e-5)
    assert s["accuracy_after"]["n"] == 5 and s["accuracy_after"]["correct"] == answers["correct"]
    held = s["base_bytes_per_rank"]
    assert len(held) == world and r.stdout.count("--fsdp: blocks sharded") == 1
    blocks, rest, args = held_by_one(tiny_run, qlora)   # what one process holds: every block whole
    # each rank: the unsharded rest plus its rows of the blocks, ~1/N (22, 21, 21 of 64 rows at world 3),
    # the parts adding up to the blocks exactly (nothing held twice)
    assert sum(h - rest for h in held) == blocks
    assert all(abs((h - rest) / blocks - 1 / world) <= 0.02 for h in held), (held, rest, blocks)
    # the estimator (audit.py --estimate-only --fsdp N) predicts the mean of them
    from audit import estimate_memory
    est = estimate_memory(args, "qlora" if qlora else "lora", 6 // world, 64, dtype_bytes=4, fsdp=world, dora=dora)
    assert est["base_weights"] == pytest.approx(sum(held) / world, rel=2e-3)


def held_by_one(tiny_run, qlora):
    """(bytes of the blocks' frozen tensors, bytes of the rest of the base, ModelArgs) of the tiny model."""
    from formats import load_model
    from lora import apply_lora
    m = load_model(tiny_run[0], torch.float32, quantize="nf4" if qlora else None, device="cpu")
    apply_lora(m, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], 8, 16)
    frozen = lambda mod: sum(t.numel() * t.element_size() for t in list(mod.parameters()) + list(mod.buffers())
                             if not t.requires_grad)
    blocks = sum(frozen(b) for b in m.model.layers)
    nested = sum(t.numel() * t.element_size() for b in m.model.layers for n, t in b.named_buffers()
                 if n.endswith(("nested_absmax", "offset")))   # small fp32 scales FSDP leaves whole
    return blocks - nested, frozen(m) - blocks + nested, m.args


WORKER = '''
import json, os, sys, torch, torch.distributed as dist
sys.path.insert(0, sys.argv[1])
from torch.distributed.tensor import DTensor
from formats import load_model
from fsdp import device_mesh, local, move_unsharded, shard_block
from lora import apply_lora
dist.init_process_group("gloo")
mesh, done, earlier_sharded = device_mesh(torch.device("cpu")), [], []

def take(i, block):   # as train.py --fsdp does: each block sharded as soon as its tensors are in
    earlier_sharded.append(all(isinstance(p, DTensor) for b in done for p in b.parameters()))
    apply_lora(block, ["q_proj", "v_proj", "down_proj"], 8, 16)
    shard_block(block, mesh)
    done.append(block)
m = load_model(sys.argv[2], torch.float32, quantize="nf4", device="cpu", on_block=take)
move_unsharded(m, torch.device("cpu"))
for n, p in m.named_parameters():
    p.requires_grad_("lora_" in n)
q = m.model.layers[0].self_attn.q_proj.base
seen = []
m.model.layers[0].self_attn.q_proj.register_forward_pre_hook(lambda mod, a: seen.append(type(mod.base.packed)))
m(torch.randint(0, 300, (1, 9))).sum().backward()
# inside forward the codes were whole; after it (and after backward) each rank keeps its part again
row = [seen[0].__name__, type(q.packed).__name__, local(q.packed).numel(), q.packed.numel(),
       local(m.model.layers[1].mlp.down_proj.lora_A.weight).shape[0], len(done), all(earlier_sharded)]
open(f"{sys.argv[3]}/rank{dist.get_rank()}.json", "w").write(json.dumps(row))
dist.barrier()
dist.destroy_process_group()
os._exit(0)   # as train.py ends under torchrun (train.leave_without_finalizing: gloo can abort a finalizing process)
'''


def test_fsdp_gathers_a_block_for_its_forward_and_frees_it_after(tiny_run, tmp_path):
    """World 3, loading as train.py --fsdp loads: each block is sharded as soon as its tensors have streamed
    in, and every block finished before it is sharded by then (a rank never holds two blocks whole). Inside
    forward a layer sees its packed NF4 codes whole (a plain tensor); before and after, each rank holds a
    third of them (FSDP2's reshard after forward), uneven shards of the r = 8 rows."""
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "3", "--master_port", "29551",
           str(script), str(ROOT), str(tiny_run[0]), str(tmp_path)]
    r = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads((tmp_path / f"rank{i}.json").read_text()) for i in range(3)]
    for inside, after, mine, whole, _, blocks, earlier_sharded in rows:
        assert blocks == 2 and earlier_sharded
        assert inside in ("Tensor", "Parameter") and after == "DTensor"
        assert mine in (whole // 3, -(-whole // 3))
    assert sum(r[2] for r in rows) == rows[0][3]
    assert sorted(r[4] for r in rows) == [2, 3, 3]   # 8 rows of lora_A over 3 ranks


def test_fsdp_resume_is_exact(tiny_run, tmp_path):
    """QLoRA at world 2: stopped after 3 of 6 steps (each rank's optimizer shards in the one checkpoint),
    then --resume: the adapter one process gets in 6 steps."""
    one = train(_cfg(tiny_run, tmp_path, out=str(tmp_path / "one"), batch_size=6, max_steps=6, qlora=True))
    args = cli_args(tiny_run, tmp_path / "fsdp", 3, 6, qlora=True)
    r = torchrun(2, 29553, args + ["--stop-after", 3])   # torchrun reports a worker's exit 75 as a failure
    assert "stopped (--stop-after): checkpoint saved at step 3" in r.stdout, r.stderr[-3000:]
    from formats import load_state
    tensors, meta = load_state(tmp_path / "fsdp" / "checkpoint.safetensors")
    assert meta["world"] == 2 and {k.split(".")[0] for k in tensors if ".optimizer." in k} == {"rank0", "rank1"}
    r = torchrun(2, 29554, args + ["--resume"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert_same_adapter(_adapter(one["out"]), _adapter(tmp_path / "fsdp"))
    s = json.loads((tmp_path / "fsdp" / "summary.json").read_text())
    assert s["losses"] == pytest.approx(one["losses"][3:], rel=1e-5)
    # the adapter the ranks wrote loads in peft, which then computes what we compute
    peft, transformers = pytest.importorskip("peft"), pytest.importorskip("transformers")
    from formats import load_model
    from lora import load_adapter
    pm = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(
        tiny_run[0], dtype=torch.float32), tmp_path / "fsdp").eval()
    ours = load_model(tiny_run[0], torch.float32, device="cpu")
    load_adapter(ours, tmp_path / "fsdp")
    ids = torch.randint(0, 300, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(pm(ids).logits, ours(ids), atol=1e-4, rtol=0)


def test_fsdp_sigterm_to_one_rank_leaves_a_checkpoint_all_agree_on(tiny_run, tmp_path):
    """SIGTERM to rank 1 only: both ranks stop after the same step and write one checkpoint with both
    ranks' optimizer shards; --resume from it ends where one process ends without a stop."""
    import signal
    from test_train import _pids_of_rank, _wait_for_steps
    steps = 30
    one = train(_cfg(tiny_run, tmp_path, out=str(tmp_path / "one"), batch_size=6, max_steps=steps, qlora=True))
    args = cli_args(tiny_run, tmp_path / "fsdp", 3, steps, qlora=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29556",
           str(ROOT / "train.py"), *map(str, args)]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    _wait_for_steps(p, tmp_path / "fsdp" / "metrics.jsonl", 2)
    (rank1,) = _pids_of_rank(p.pid, 1)
    os.kill(rank1, signal.SIGTERM)
    out, err = p.communicate(timeout=300)
    assert "stopped (a signal to another rank): checkpoint saved at step" in out, (out + err)[-3000:]
    from formats import load_state
    tensors, meta = load_state(tmp_path / "fsdp" / "checkpoint.safetensors")
    assert meta["world"] == 2 and {k.split(".")[0] for k in tensors if ".optimizer." in k} == {"rank0", "rank1"}
    assert meta["step"] < steps
    r = torchrun(2, 29557, args + ["--resume"])
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert_same_adapter(_adapter(one["out"]), _adapter(tmp_path / "fsdp"))


@pytest.mark.parametrize("qlora,worlds", [(False, (3, 2)), (True, (2, 3))])
def test_fsdp_resume_on_another_number_of_ranks(tiny_run, tmp_path, qlora, worlds):
    """Stopped after 3 of 6 steps at one world size, resumed at another with the same 6 examples per step: each
    parameter's optimizer states are put whole from the saved ranks' shards and cut as the new ranks shard it.
    torch's AdamW (LoRA) then continues as one process does, to fp tolerance. AdamW8bit (QLoRA) requantizes its
    states into blocks that fall elsewhere: each state moves by at most half a code step (< 0.4% of its block's
    largest), so 3 more steps of lr 5e-3 may move the adapter by ~6e-4 of its scale at most (measured: 1.7e-5)."""
    one = train(_cfg(tiny_run, tmp_path, out=str(tmp_path / "one"), batch_size=6, max_steps=6, qlora=qlora))
    flags = dict(qlora=True) if qlora else {}
    r = torchrun(worlds[0], 29580, cli_args(tiny_run, tmp_path / "fsdp", 6 // worlds[0], 6, stop_after=3, **flags))
    assert "checkpoint saved at step 3" in r.stdout, r.stderr[-3000:]
    r = torchrun(worlds[1], 29581, cli_args(tiny_run, tmp_path / "fsdp", 6 // worlds[1], 6, resume=True, **flags))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    s = json.loads((tmp_path / "fsdp" / "summary.json").read_text())
    theirs, ours = _adapter(one["out"]), _adapter(tmp_path / "fsdp")
    err = max(((ours[k] - theirs[k]).abs().max() / theirs[k].abs().max()).item() for k in theirs)
    print(f"world {worlds[0]} -> {worlds[1]}: losses {s['losses']} vs {one['losses'][3:]}; adapter off by {err:.1e} of its scale")
    if not qlora:
        assert s["losses"] == pytest.approx(one["losses"][3:], rel=1e-5)
        assert_same_adapter(theirs, ours)
    else:
        assert s["losses"] == pytest.approx(one["losses"][3:], rel=1e-4) and err < 1e-3


def test_fsdp_two_nodes_equal_one(tiny_run, tmp_path):
    """Two torchrun launches, one process each, joined by a local rendezvous as two nodes would be:
    nothing assumes one node, and the run equals one process with the same global batch."""
    one = train(_cfg(tiny_run, tmp_path, out=str(tmp_path / "one"), batch_size=6, max_steps=3, qlora=True))
    args = cli_args(tiny_run, tmp_path / "nodes", 3, 3, qlora=True)
    node = lambda k: [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
                      "--node-rank", str(k), "--rdzv-backend", "c10d", "--rdzv-endpoint", "127.0.0.1:29571",
                      "--rdzv-id", "two-nodes", str(ROOT / "train.py"), *map(str, args)]
    procs = [subprocess.Popen(node(k), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV) for k in (0, 1)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs[0][1][-2000:] + outs[1][1][-2000:]
    assert_same_adapter(_adapter(one["out"]), _adapter(tmp_path / "nodes"))


def test_fsdp_flags_that_cannot_work_are_one_clear_error(tiny_run, tmp_path, monkeypatch):
    from test_train import _fails
    _fails(_cfg(tiny_run, tmp_path, fsdp=True), "run it under torchrun")
    _fails(_cfg(tiny_run, tmp_path, fsdp_cpu_offload=True), "add --fsdp")
    monkeypatch.setenv("LOCAL_RANK", "0")
    _fails(_cfg(tiny_run, tmp_path, fsdp=True, qlora=True, init="loftq"), "--fsdp with --init loftq is not supported")
    _fails(_cfg(tiny_run, tmp_path, fsdp=True, fsdp_cpu_offload=True), "on the CPU they are there already")


def test_a_torch_whose_fsdp2_refuses_integer_parameters_shards_the_codes_as_bf16(monkeypatch):
    """torch 2.11's fully_shard wraps each shard in nn.Parameter(requires_grad=True) before it copies the flag,
    which an integer tensor refuses (seen on a GPU machine). Such a torch is found by a probe, and the NF4 codes
    are then handed to it as bf16 pairs of bytes (an odd count padded): the layer still computes the same."""
    import torch.distributed.fsdp as F
    import fsdp
    from nf4 import NF4Linear

    def like_2_11(module, **kw):
        for p in module.parameters():
            torch.nn.Parameter(p.detach())   # requires_grad=True first, as 2.11 does
    monkeypatch.setattr(F, "fully_shard", like_2_11)
    monkeypatch.setattr(fsdp, "_integer_ok", {})
    mesh = type("Mesh", (), {"device_type": "cpu"})()
    assert not fsdp.integer_parameters_shard(mesh)
    layer = NF4Linear.from_weight(torch.randn(7, 64))   # 224 code bytes, 7 absmax codes: an odd count
    x = torch.randn(3, 64)
    before = layer(x)
    block = torch.nn.Sequential(layer)
    block.set_gradient_divide_factor = block.set_force_sum_reduction_for_comms = lambda *a: None
    fsdp.shard_block(block, mesh)
    assert layer.packed.dtype == layer.absmax.dtype == torch.bfloat16 and not layer.absmax.requires_grad
    assert torch.equal(layer(x), before)


def test_fsdp_with_the_codes_as_bf16_equals_one_process(tiny_run, tmp_path):
    """The bf16-bytes path for real (forced): world 3, uneven shards of padded byte pairs, QLoRA with checkpointing,
    the same losses and adapter as one process."""
    one = train(_cfg(tiny_run, tmp_path, out=str(tmp_path / "one"), batch_size=6, max_steps=3, qlora=True,
                     grad_checkpoint=True))
    r = torchrun(3, 29590, cli_args(tiny_run, tmp_path / "fsdp", 2, 3, qlora=True, grad_checkpoint=True),
                 env=dict(ENV, PURE_QLORA_FSDP_CODES_AS_FLOAT="1"))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    s = json.loads((tmp_path / "fsdp" / "summary.json").read_text())
    assert s["losses"] == pytest.approx(one["losses"], rel=1e-5)
    assert_same_adapter(_adapter(one["out"]), _adapter(tmp_path / "fsdp"))
