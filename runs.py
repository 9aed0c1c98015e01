"""
A run directory, and what keeps it whole when a run is stopped, diverges or finds the disk full.

    runs/qlora/  adapter_config.json, adapter_model.safetensors   the adapter, in peft's format
                 checkpoint.safetensors   adapters, optimizer states, every rank's RNG state, the step
                 train_config.json, metrics.jsonl, summary.json

The checkpoint is safetensors with a JSON object in its metadata: loading it cannot run code (a
pickle would), and a file that is truncated, corrupt or not ours is one error naming it. Saves go to
temporary names first, so a save that fails leaves the last one whole; nothing that is not finite is
ever saved. SIGTERM and SIGINT become a request to stop at the next step boundary, with a checkpoint.

    run = Run(cfg, device, dtype, rank, world, check_out_dir(cfg))
    step = resume(run, model, opt)           # --resume
    save(run, model, opt, step)
"""
import json
import math
import os
import signal
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from formats import load_state, save_state
from fsdp import local, part_of, set_full, shard_like
from lora import PEFT_PREFIX, adapter_tensors, base_fingerprint, check_base, save_adapter
from optim import fp32_states


class Diverged(RuntimeError):
    """The loss or the gradients stopped being finite."""


class SaveFailed(RuntimeError):
    """A checkpoint could not be written (a full disk); the previous one is intact."""


CHECKPOINT = "checkpoint.safetensors"
CHECKPOINT_FORMAT = "pure-qlora training checkpoint, version 1"
# What must not change between a run and its --resume: the data order, the adapter's shape (and the examples
# of each step: --batch-size x --grad-accum x processes, checked on its own, so the number of processes may change).
RESUME_KEYS = ("model", "data", "rank", "targets", "qlora", "seq_len", "seed", "dora", "init", "loftq_iters", "fsdp")
OLDER_RUNS = dict(dora=False, init="kaiming", loftq_iters=1, fsdp=False)   # what checkpoints from before these flags ran


@dataclass
class Run:
    """Where and how this process trains: its config (train.TrainConfig), device, place among the ranks, run directory."""
    cfg: object
    device: torch.device
    dtype: torch.dtype
    rank: int
    world: int
    out: Path
    scaler: object = None           # torch.amp.GradScaler: loss scaling for fp16 (pre-Ampere GPUs), else a no-op
    saved_step: int | None = None   # the step of the last complete save, named when something goes wrong

    def log(self, *a):
        if self.rank == 0:
            print(*a, flush=True)

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over the ranks (nccl reduces CUDA tensors only, so it lives on the training device)."""
        if self.world > 1:
            dist.all_reduce(t)
        return t

    def gather(self, value) -> list:
        """`value` of every rank, in rank order (a collective under torchrun: every rank must call it)."""
        every = [value] * self.world
        if self.world > 1:
            dist.all_gather_object(every, value)
        return every


def check_out_dir(cfg) -> Path:
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: exists and is not a directory")
    has_run = (out / "train_config.json").is_file()
    if cfg.resume and not ((out / CHECKPOINT).is_file() or (out / "checkpoint.pt").is_file()):
        raise ValueError(f"--resume: {out}/{CHECKPOINT} does not exist (nothing to resume)")
    if has_run and not cfg.resume and not cfg.overwrite:
        raise ValueError(f"--out {out} already holds a run; pass --resume to continue it, --overwrite to replace it, "
                         "or choose another --out")
    parent = out
    while not parent.exists():
        parent = parent.parent
    try:   # a real write, not just the permission bits (read-only mounts, quotas)
        import tempfile
        tempfile.TemporaryFile(dir=parent).close()
    except OSError:
        raise PermissionError(f"--out {out}: {parent} is not writable") from None
    return out


def atomic_write(path: Path, text: str):
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------
# Checkpoints: safetensors + JSON, written whole or not at all

def save(run: Run, model, opt, step: int):
    """The adapter in peft's format and checkpoint.safetensors (adapters, optimizer, RNG states, step).
    Nothing non-finite is ever written, and a write that fails (a full disk) leaves the last save whole:
    the checkpoint goes to a temporary name and replaces the old one only once the adapter is written too.
    Every rank takes part (the RNG states are gathered); rank 0 writes."""
    adapter = adapter_tensors(model)   # every rank: under --fsdp it is gathered from all of them
    tensors, meta = checkpoint_state(run, model, opt, step, adapter)
    bad = [k for k, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise Diverged(f"after step {step} {bad[0]} (and {len(bad) - 1} more) holds values that are not finite: "
                       f"training diverged; nothing was saved. {last_good(run)}")
    if run.rank == 0:
        tmp = run.out / (CHECKPOINT + ".tmp")
        try:
            save_state(tmp, tensors, meta)
            save_adapter(model, run.out, base_name=run.cfg.model, tensors=adapter)
            os.replace(tmp, run.out / CHECKPOINT)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise SaveFailed(f"could not save step {step} in {run.out} ({e.strerror or e}). {last_good(run)}") from None
    run.saved_step = step


def last_good(run: Run) -> str:
    if run.saved_step is None:
        return "No checkpoint had been saved before (--save-every N keeps one)."
    return f"The last good checkpoint, step {run.saved_step}, is intact in {run.out}: continue with --resume."


def checkpoint_state(run: Run, model, opt, step: int, adapter: dict) -> tuple[dict, dict]:
    """(tensors, JSON-able rest) of everything --resume needs; adapter: adapter_tensors(model), whose peft
    names are the model's parameter names behind peft's prefix."""
    tensors = {f"adapter.{k[len(PEFT_PREFIX):]}": v for k, v in adapter.items()}
    osd, scalars, mine = opt.state_dict(), {}, {}
    for i, st in osd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                mine[f"optimizer.{i}.{k}"] = local(v).cpu()
            else:
                scalars.setdefault(str(i), {})[k] = v
    if run.cfg.fsdp and run.world > 1:   # each rank's optimizer holds the states of its own shards
        # (gathered as pickles between our own processes; the file holds tensors only)
        mine = {f"rank{r}.{k}": v for r, part in enumerate(run.gather(mine)) for k, v in part.items()}
    tensors.update(mine)
    states = {"cpu": torch.get_rng_state()}
    if run.device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(run.device)
    for kind, s in states.items():   # every rank's own stream (dropout differs per rank)
        every = [s]
        if run.world > 1:
            every = [torch.empty_like(s, device=run.device) for _ in range(run.world)]
            dist.all_gather(every, s.to(run.device))
        tensors.update({f"rng.{kind}.{r}": t.cpu() for r, t in enumerate(every)})
    meta = dict(format=CHECKPOINT_FORMAT, step=step, world=run.world, config=asdict(run.cfg),
                base_fingerprint=base_fingerprint(model),
                optimizer=dict(param_groups=osd["param_groups"], scalars=scalars))
    if run.scaler is not None and run.scaler.is_enabled():
        meta["grad_scaler"] = run.scaler.state_dict()
    return tensors, meta


def resume(run: Run, model, opt) -> int:
    """Restore adapters, optimizer and RNG from checkpoint.safetensors; return its step. Nothing in the
    file is executed; anything unexpected in it is one error naming it."""
    path, cfg = run.out / CHECKPOINT, run.cfg
    if not path.is_file():   # only the pickle checkpoint of an older version: never unpickled
        raise ValueError(f"--resume: {run.out}/checkpoint.pt is a pickle checkpoint from an older version; it is "
                         "not loaded, because unpickling a file can run any code in it. Start the run again "
                         "(--overwrite)")
    tensors, meta = load_state(path)
    try:
        if meta.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"its format is {meta.get('format')!r}, not {CHECKPOINT_FORMAT!r}")
        for k in RESUME_KEYS:
            if meta["config"].get(k, OLDER_RUNS.get(k)) != getattr(cfg, k):
                raise ValueError(f"--{k.replace('_', '-')} {getattr(cfg, k)!r} differs from the run's "
                                 f"{meta['config'][k]!r}")
        saved, world = meta["config"], meta["world"]
        before, now = saved["batch_size"] * saved["grad_accum"] * world, cfg.batch_size * cfg.grad_accum * run.world
        if before != now:
            raise ValueError(f"its steps took {before} examples each ({world} process(es) x --batch-size "
                             f"{saved['batch_size']} x --grad-accum {saved['grad_accum']}), this run's would take {now}")
        check_base(model, meta["base_fingerprint"], str(path), meta["config"]["model"], cfg.force)
        named = dict(model.named_parameters())
        adapters = {k[len("adapter."):]: v for k, v in tensors.items() if k.startswith("adapter.")}
        if set(adapters) != {n for n, p in named.items() if p.requires_grad}:
            raise ValueError("it holds other adapter tensors than this model has")
        for k, v in adapters.items():
            if v.shape != named[k].shape:
                raise ValueError(f"{k} has shape {tuple(v.shape)}, the model's is {tuple(named[k].shape)}")
        state = optimizer_states(tensors, world, run, opt)
        for i, d in meta["optimizer"]["scalars"].items():
            state.setdefault(int(i), {}).update(d)
        groups = [{k: tuple(v) if isinstance(v, list) and k != "params" else v for k, v in g.items()}
                  for g in meta["optimizer"]["param_groups"]]
        opt.load_state_dict(dict(state=state, param_groups=groups))
        if cfg.fsdp:   # torch's AdamW keeps sharded states like its sharded parameters
            for p in opt.state:
                for k, v in opt.state[p].items():
                    if torch.is_tensor(v) and v.dim() and v.shape == local(p).shape:
                        opt.state[p][k] = shard_like(p, v)
        with torch.no_grad():
            for k, v in adapters.items():
                set_full(named[k], v)
        if "grad_scaler" in meta and run.scaler is not None:
            run.scaler.load_state_dict(meta["grad_scaler"])
        if f"rng.cpu.{run.rank}" in tensors:   # a rank the saving run did not have keeps its seeded stream
            torch.set_rng_state(tensors[f"rng.cpu.{run.rank}"])
        if run.device.type == "cuda" and f"rng.cuda.{run.rank}" in tensors:
            torch.cuda.set_rng_state(tensors[f"rng.cuda.{run.rank}"], run.device)
        step = int(meta["step"])
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        msg = f"missing {e}" if isinstance(e, KeyError) else str(e).splitlines()[0]
        raise ValueError(f"--resume: {path}: cannot resume from it: {msg}") from None
    run.saved_step = step
    run.log(f"resumed from {path} at step {step}")
    return step


def optimizer_states(tensors: dict, world: int, run: Run, opt) -> dict:
    """This rank's optimizer states from a checkpoint saved by `world` processes. Under --fsdp each saved rank
    holds the states of its own shards (`rank{r}.optimizer.*`): at the same world size this rank takes its own;
    at another, every parameter's states are put whole again from all the saved ranks' parts (as fp32:
    8-bit codes dequantized) and cut as this run shards the parameter (AdamW8bit requantizes them into its
    blocks, which no longer fall where they did: 8-bit states resume within their quantization error)."""
    parts = [{} for _ in range(world if run.cfg.fsdp and world > 1 else 1)]
    for k, v in tensors.items():
        owner, _, key = k.partition(".") if len(parts) > 1 and k.startswith("rank") else ("rank0", "", k)
        if key.startswith("optimizer."):
            _, i, name = key.split(".", 2)
            parts[int(owner[len("rank"):])].setdefault(int(i), {})[name] = v
    if len(parts) == 1 and not (run.cfg.fsdp and run.world > 1):
        return parts[0]   # one saved copy of whole states, for every rank (one process, or data-parallel)
    if len(parts) == run.world:
        return parts[run.rank]
    params = [p for g in opt.param_groups for p in g["params"]]
    state = {}
    for i, p in enumerate(params):
        if i not in parts[0]:
            continue   # no step had given it a gradient yet
        whole = [fp32_states(part[i]) for part in parts]
        state[i] = {k: part_of(p, torch.cat([w[k] for w in whole]).view(p.shape)) for k in whole[0]}
        if torch.is_tensor(parts[0][i].get("step")):   # torch's AdamW keeps its step count as a tensor
            state[i]["step"] = parts[0][i]["step"]
    return state


class Metrics:
    """metrics.jsonl (rank 0): one JSON object per step and eval. On --resume, lines past the
    checkpoint's step (steps done after the last save) are dropped, as those steps run again."""

    def __init__(self, run: Run, step: int):
        self.f = None
        if run.rank == 0:
            path = run.out / "metrics.jsonl"
            kept = []
            if step and path.is_file():
                kept = [l for l in path.read_text().splitlines() if l.strip() and json.loads(l).get("step", 0) <= step]
            self.f = open(path, "w")
            self.f.writelines(l + "\n" for l in kept)

    def record(self, **kv):
        if self.f:   # a number that is not finite is written as null: the file stays valid JSON
            kv = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in kv.items()}
            self.f.write(json.dumps(kv) + "\n")
            self.f.flush()

    def close(self):
        if self.f:
            self.f.close()


class StopSignals:
    """SIGTERM and SIGINT (Ctrl-C) ask the loop to stop after the step under way, with a checkpoint.
    A second Ctrl-C stops at once; one within 2 s of the first is the same request (torchrun forwards
    the terminal's Ctrl-C to each process, which then sees it twice)."""

    def __init__(self):
        self.requested, self.first, self.old = None, None, {}
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGTERM, signal.SIGINT):
                self.old[s] = signal.signal(s, self.handle)

    def handle(self, signum, frame):
        now = time.monotonic()
        if self.first is None:
            self.first, self.requested = now, signal.Signals(signum).name
            os.write(2, f"\n{self.requested}: stopping after this step, with a checkpoint (Ctrl-C again to stop "
                        "at once, without one)\n".encode())
        elif signum == signal.SIGINT and now - self.first > 2:
            raise KeyboardInterrupt

    def restore(self):
        for s, h in self.old.items():
            signal.signal(s, h)
