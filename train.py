"""
Fine-tune a Llama-family model with LoRA (16-bit base) or QLoRA (NF4 base + paged 8-bit AdamW).

    python train.py --qlora                          # SmolLM2-135M-Instruct on AlpacaEval's pairs, 50 steps
    python train.py                                  # LoRA on the same
    python train.py --qlora --model path/to/hf_folder --data my.jsonl --max-steps -1 --seq-len 1024
    python train.py --qlora --resume                 # continue runs/qlora where it stopped
    torchrun --nproc_per_node 2 train.py --qlora     # data-parallel on 2 GPUs (or CPU processes)

A run directory holds the adapter in peft's format (adapter_config.json, adapter_model.safetensors),
train_config.json, metrics.jsonl (one JSON object per step and eval), summary.json and checkpoint.pt
(adapters, optimizer, RNG: what --resume needs).
"""
import argparse
import json
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.distributed as dist

from data import IGNORE, collate, collate_packed, encode_example, load_examples, load_tokenizer, pack, prompt_format
from lora import apply_lora, lora_layers, save_adapter
from formats import load_model, release_freed_memory
from nf4 import NF4Linear
from optim import AdamW8bit


@dataclass
class TrainConfig:
    model: str = "default"          # HF folder, .gguf file, or "default" (SmolLM2-135M-Instruct, fetched once)
    data: str = "default"           # JSONL file, or "default" (AlpacaEval's 805 pairs, fetched once)
    out: str = ""                   # run directory (default runs/qlora or runs/lora)
    qlora: bool = False             # NF4 base + paged 8-bit AdamW (QLoRA); otherwise LoRA on the 16-bit base
    rank: int = 8                   # LoRA rank r
    alpha: float = 16.0             # LoRA alpha (scale = alpha / r)
    dropout: float = 0.05           # dropout on the LoRA input
    targets: str = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"  # linears to adapt
    rslora: bool = False            # scale alpha / sqrt(r) instead of alpha / r
    optim: str = ""                 # adamw | adamw8bit | paged_adamw8bit (default: paged_adamw8bit with --qlora, else adamw)
    lr: float = 5e-4                # peak learning rate
    warmup_steps: int = 5           # linear warmup, then cosine decay to lr * min_lr_ratio
    min_lr_ratio: float = 0.1       # final learning rate as a fraction of lr
    weight_decay: float = 0.0       # decoupled weight decay on the adapters
    grad_clip: float = 1.0          # clip the global gradient norm (0 = off)
    batch_size: int = 4             # examples per micro-batch (per process)
    grad_accum: int = 1             # micro-batches per optimizer step
    epochs: float = 1.0             # passes over the training set (when max_steps = -1)
    max_steps: int = 50             # optimizer steps; -1 = run `epochs` full epochs
    seq_len: int = 256              # truncate examples to this many tokens
    pack: bool = False              # pack several examples per row (attention stays within each)
    train_on_prompt: bool = False   # also put loss on prompt tokens
    prompt_format: str = ""         # chatml | llama3 | llama2 | alpaca (default: from the model's chat template)
    eval_examples: int = 100        # held-out examples (a fixed seeded split)
    eval_every: int = 0             # evaluate every N steps (0 = only before and after training)
    save_every: int = 0             # save adapter + checkpoint every N steps (0 = only at the end)
    log_every: int = 1              # progress line every N steps
    grad_checkpoint: bool = False   # recompute each block in backward to save activation memory
    resume: bool = False            # continue the run in --out from its checkpoint
    stop_after: int = 0             # stop after this many steps with a resumable checkpoint (0 = run to the end)
    overwrite: bool = False         # replace an existing run in --out
    seed: int = 0                   # data order, adapter init, dropout
    device: str = ""                # cpu | cuda (default: cuda if available)
    dtype: str = ""                 # float32 | bfloat16 | float16 (default: bf16 on GPU, the faster of fp32/bf16 on CPU)
    cpu_mmap_kb: int = 256          # CPU: allocations over this many KB get their own mapping (lower: less memory, slower)


def parse_args(argv=None) -> TrainConfig:
    """TrainConfig -> argparse: one flag per field, help from the field's comment."""
    import inspect
    src = inspect.getsource(TrainConfig)
    helps = {l.split(":")[0].strip(): l.split("#", 1)[1].strip() for l in src.splitlines() if "#" in l and ":" in l}
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in fields(TrainConfig):
        flag, h = "--" + f.name.replace("_", "-"), helps.get(f.name, "")
        if f.type in (bool, "bool"):
            p.add_argument(flag, action="store_true", help=h)
        else:
            typ = {"int": int, "float": float, "str": str}.get(f.type, f.type) if isinstance(f.type, str) else f.type
            p.add_argument(flag, type=typ, default=f.default, help=f"{h} (default: {f.default!r})")
    return TrainConfig(**vars(p.parse_args(argv)))


# ----------------------------------------------------------------------------------------------
# Setup helpers

def pick_device_dtype(cfg):
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if cfg.dtype:
        return device, getattr(torch, cfg.dtype)
    if device.type == "cuda":
        return device, torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    # On CPU, bf16 matmuls are ~50x slower than fp32 unless the CPU has bf16 units (AVX512-BF16 or
    # AMX); only then do we time both (best of several, so one noisy sample cannot decide) and take the faster.
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        flags = ""
    if "avx512_bf16" not in flags and "amx_bf16" not in flags:
        return device, torch.float32

    def best_time(dt):
        a, b = torch.randn(512, 1024, dtype=dt), torch.randn(1024, 1024, dtype=dt)
        a @ b
        times = []
        for _ in range(5):
            t = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - t)
        return min(times)
    return device, torch.bfloat16 if best_time(torch.bfloat16) < 0.8 * best_time(torch.float32) else torch.float32


def limit_heap_retention(kb: int = 256):
    """On CPU, send every allocation over `kb` KB to its own mapping, returned to the OS when freed,
    so that resident memory follows the live tensors (what the audit's estimator counts).

    glibc raises its mmap threshold as large blocks are freed; activations then come from the heap,
    and freed pages stay resident, fragmented between live blocks: the default QLoRA run peaked at
    3.5 GB for ~1.5 GB of live tensors. Even at a fixed 1 MB threshold, big blocks are served from
    free heap space that smaller saved tensors (per-segment attention outputs, dropout masks) keep
    fragmented: forward grew 70-100 KB per token and layer for 41 KB of saved tensors (2.2 GB peak).
    At 256 KB the heap holds only small objects and the peak is the saved tensors plus one loss
    chunk (1.54 GB for the default QLoRA run). The price is speed: a fresh page costs ~1 us to fault
    in on this VM, and steps ran at 95 tokens/s against 121-135 at 1 MB."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").mallopt(-3, kb << 10)   # -3 = M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass   # not glibc


def status_bytes(field: str) -> int:
    """A memory line of /proc/self/status in bytes: VmRSS (resident now), VmHWM (peak resident)."""
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith(field + ":"))


def peak_memory(device) -> int:
    """Peak bytes: CUDA max allocated, or the process's peak RSS (VmHWM) on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return status_bytes("VmHWM")


def memory_breakdown(model, opt) -> dict:
    """Bytes of each kind of live tensor, counted from the real tensors."""
    lora = [p for m in lora_layers(model).values() for p in (m.lora_A.weight, m.lora_B.weight)]
    ids = {id(p) for p in lora}
    base = sum(p.numel() * p.element_size() for p in model.parameters() if id(p) not in ids)
    base += sum(b.numel() * b.element_size() for m in model.modules() if isinstance(m, NF4Linear) for b in m.buffers())
    adapters = sum(p.numel() * p.element_size() for p in lora)
    state = [t for st in opt.state.values() for t in st.values() if torch.is_tensor(t)]
    return dict(base_weights=base, adapters=adapters, gradients=adapters,
                optimizer_states=sum(t.numel() * t.element_size() for t in state))


def check_out_dir(cfg) -> Path:
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: exists and is not a directory")
    has_run = (out / "train_config.json").is_file()
    if cfg.resume and not (out / "checkpoint.pt").is_file():
        raise ValueError(f"--resume: {out}/checkpoint.pt does not exist (nothing to resume)")
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
# Data: a fixed order of examples; step k reads its slice, so resuming needs only k

def step_examples(order_len, n_train, step, per_step, seed):
    """Indices of the examples for optimizer step `step`: successive slices of seeded epoch orders."""
    start, out = step * per_step, []
    epoch = start // n_train
    while len(out) < per_step:
        perm = list(range(n_train))
        random.Random(seed * 1000 + epoch).shuffle(perm)
        lo = start - epoch * n_train if not out else 0
        out += perm[lo:lo + per_step - len(out)]
        epoch += 1
    return out


def make_batch(examples, cfg, device, flat: bool):
    """Tensors for one micro-batch. `flat` concatenates the examples into one row with segment ids:
    no compute at all on padding (CPU). Otherwise right-padded rows with the fused causal kernel (GPU)."""
    if cfg.pack:
        ids, tgt, seg = collate_packed(pack(examples, cfg.seq_len))
    elif flat:
        ids, tgt, seg = collate_packed([examples])
    else:
        ids, tgt, seg = collate(examples)
        seg = None   # right padding: causal attention never looks at the pads that follow
    to = lambda t: None if t is None else t.to(device, non_blocking=True)
    return to(ids), to(tgt), to(seg)


def loss_sum(model, ids, tgt, seg):
    """Sum of cross-entropy over target tokens. Only target positions go through lm_head: with a
    49k vocabulary the prompt tokens' logits would cost as much as the rest of the model."""
    h = model.hidden(ids, seg)
    keep = tgt != IGNORE
    return LMHeadLoss.apply(h[keep], model.lm_head.weight, tgt[keep])


class LMHeadLoss(torch.autograd.Function):
    """sum_i CE(h_i W^T, y_i) over chunks of tokens, with dL/dh computed in the forward pass.

    Keeping the (tokens, vocab) logits and their softmax for backward would be the largest
    activation of a small model (49k vocabulary); this keeps one chunk's at a time instead, and
    only dL/dh (tokens, dim) until backward. The lm_head weight is frozen, so it needs no gradient."""
    CHUNK = 256

    @staticmethod
    def forward(ctx, h, weight, targets):
        loss = torch.zeros((), dtype=torch.float32, device=h.device)
        grad = torch.empty_like(h) if ctx.needs_input_grad[0] else None
        for i in range(0, h.shape[0], LMHeadLoss.CHUNK):
            t = targets[i:i + LMHeadLoss.CHUNK]
            logits = (h[i:i + LMHeadLoss.CHUNK] @ weight.T).float()
            target_logit = logits.gather(1, t[:, None]).squeeze(1)
            # log-sum-exp and softmax in place of the logits: one (chunk, vocab) buffer, no temporaries
            top = logits.amax(-1, keepdim=True)
            p = logits.sub_(top).exp_()
            total = p.sum(-1, keepdim=True)
            loss += (total.log() + top - target_logit[:, None]).sum()
            if grad is not None:
                p.div_(total)                                         # softmax
                p[torch.arange(len(t), device=t.device), t] -= 1      # d CE / d logits = softmax - onehot
                grad[i:i + LMHeadLoss.CHUNK] = p.to(h.dtype) @ weight
        ctx.save_for_backward(grad if grad is not None else h.new_empty(0))
        return loss

    @staticmethod
    def backward(ctx, g):
        (grad,) = ctx.saved_tensors
        return grad * g.to(grad.dtype), None, None


@torch.no_grad()
def evaluate(model, batches, world) -> tuple[float, int]:
    """Token-weighted mean loss over the eval batches (each rank its share), and the token count."""
    model.eval()
    total = torch.zeros(2, dtype=torch.float64)
    for ids, tgt, seg in batches:
        total[0] += loss_sum(model, ids, tgt, seg).double().cpu()
        total[1] += (tgt != IGNORE).sum().cpu()
    if world > 1:
        dist.all_reduce(total)
    model.train()
    if total[1] == 0:   # no eval split (--eval-examples 0)
        return float("nan"), 0
    return (total[0] / total[1]).item(), int(total[1])


def get_lr(step, cfg, total):
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / (cfg.warmup_steps + 1)
    progress = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


# ----------------------------------------------------------------------------------------------

def train(cfg: TrainConfig) -> dict:
    cfg.out = cfg.out or ("runs/qlora" if cfg.qlora else "runs/lora")
    cfg.optim = cfg.optim or ("paged_adamw8bit" if cfg.qlora else "adamw")
    if cfg.optim not in ("adamw", "adamw8bit", "paged_adamw8bit"):
        raise ValueError(f"--optim {cfg.optim!r}: choose adamw, adamw8bit or paged_adamw8bit")
    if not 0 < cfg.cpu_mmap_kb <= 32 << 10:
        raise ValueError(f"--cpu-mmap-kb {cfg.cpu_mmap_kb}: choose 1 to 32768 (glibc's largest mmap threshold is 32 MB)")
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    device, dtype = pick_device_dtype(cfg)
    if world > 1:
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    log = (lambda *a: print(*a, flush=True)) if rank == 0 else (lambda *a: None)
    if device.type == "cpu":
        limit_heap_retention(cfg.cpu_mmap_kb)
    out = check_out_dir(cfg)
    t_start = time.time()

    # -- data: everything is read and checked before anything is written
    tok = load_tokenizer(cfg.model)
    fmt = prompt_format(tok, cfg.prompt_format or None)
    train_convs, eval_convs = load_examples(cfg.data, cfg.eval_examples, seed=0)
    encode = lambda convs: [encode_example(tok, fmt, c, cfg.seq_len, cfg.train_on_prompt) for c in convs]
    train_ex, eval_ex = encode(train_convs), encode(eval_convs)
    n_trunc = sum(t for _, _, t in train_ex)
    train_ex = [(i, t) for i, t, _ in train_ex if any(x != IGNORE for x in t)]
    eval_ex = [(i, t) for i, t, _ in eval_ex if any(x != IGNORE for x in t)]
    if not train_ex:
        raise ValueError(f"{cfg.data}: no training example has a response token within --seq-len {cfg.seq_len}")
    log(f"data: {len(train_ex)} train / {len(eval_ex)} eval examples, format {fmt['name']}, "
        f"{n_trunc} truncated to {cfg.seq_len} tokens, {len(train_convs) - len(train_ex)} dropped (no response left)")

    # -- model: load (NF4 as it streams in, for QLoRA) -> LoRA -> freeze all but the adapters
    torch.manual_seed(cfg.seed)
    model = load_model(cfg.model, dtype, quantize="nf4" if cfg.qlora else None, device=device)
    if cfg.seq_len > model.args.max_seq_len:
        raise ValueError(f"--seq-len {cfg.seq_len} is above the model's limit of {model.args.max_seq_len} tokens")
    info = apply_lora(model, cfg.targets.split(","), cfg.rank, cfg.alpha, cfg.dropout, cfg.rslora)
    model.grad_checkpoint = cfg.grad_checkpoint
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optim == "adamw":
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    else:
        opt = AdamW8bit(params, lr=cfg.lr, weight_decay=cfg.weight_decay, paged=cfg.optim.startswith("paged"))
    log(f"model: {cfg.model} in {str(dtype).replace('torch.', '')} on {device}, {'QLoRA (NF4 base)' if cfg.qlora else 'LoRA'}; "
        f"{len(info['wrapped'])} layers adapted, {info['trainable']:,} trainable of {info['total']:,} parameters; "
        f"optimizer {cfg.optim}")

    per_step = cfg.batch_size * cfg.grad_accum * world
    total_steps = cfg.max_steps if cfg.max_steps > 0 else max(1, math.ceil(cfg.epochs * len(train_ex) / per_step))
    flat = device.type == "cpu"
    eb = cfg.batch_size
    eval_batches = [make_batch(eval_ex[i:i + eb], cfg, device, flat) for i in range(rank * eb, len(eval_ex), eb * world)]

    step, metrics_mode = 0, "w"
    if cfg.resume:
        ck = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=False)
        for k in ("model", "data", "rank", "targets", "qlora", "seq_len", "batch_size", "grad_accum", "seed"):
            if ck["config"][k] != getattr(cfg, k):
                raise ValueError(f"--resume: {k}={getattr(cfg, k)!r} differs from the run's {ck['config'][k]!r}")
        named = dict(model.named_parameters())
        if set(ck["adapters"]) != {n for n, p in named.items() if p.requires_grad}:
            raise ValueError(f"--resume: {out}/checkpoint.pt holds other adapter tensors than this model has")
        with torch.no_grad():
            for k, v in ck["adapters"].items():
                named[k].copy_(v)
        opt.load_state_dict(ck["optimizer"])
        torch.set_rng_state(ck["rng"]["torch"])
        if device.type == "cuda" and ck["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(ck["rng"]["cuda"][rank] if isinstance(ck["rng"]["cuda"], list) else ck["rng"]["cuda"])
        step, metrics_mode = ck["step"], "a"
        log(f"resumed from {out}/checkpoint.pt at step {step}")

    # Nothing is written before this point: bad input has stopped us with the directory untouched.
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write(out / "train_config.json", json.dumps(asdict(cfg), indent=2))
    metrics = open(out / "metrics.jsonl", metrics_mode) if rank == 0 else None

    def record(**kv):
        if metrics:
            metrics.write(json.dumps(kv) + "\n")
            metrics.flush()

    def save(step):
        """Adapter in peft's format + checkpoint.pt, each written to a temporary name then renamed."""
        if rank != 0:
            return
        save_adapter(model, out, base_name=cfg.model)
        ck = dict(step=step, config=asdict(cfg), optimizer=opt.state_dict(),
                  adapters={k: v.detach().cpu() for k, v in model.state_dict().items() if "lora_" in k},
                  rng=dict(torch=torch.get_rng_state(),
                           cuda=torch.cuda.get_rng_state() if device.type == "cuda" else None))
        torch.save(ck, out / "checkpoint.pt.tmp")
        os.replace(out / "checkpoint.pt.tmp", out / "checkpoint.pt")

    # -- the loop
    eval_before = None
    if step == 0:
        eval_before, n_eval_tok = evaluate(model, eval_batches, world)
        record(step=0, eval_loss=eval_before, eval_ppl=math.exp(eval_before))
        log(f"eval before training: loss {eval_before:.4f}, ppl {math.exp(eval_before):.2f} ({n_eval_tok} tokens)")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0, tokens_seen, first_step, losses, interrupted = time.time(), 0, step, [], False
    max_micro_tokens, runtime_rss = 0, None
    try:
        while step < total_steps:
            idx = step_examples(len(train_ex), len(train_ex), step, per_step, cfg.seed)
            micro = [[train_ex[j] for j in idx[(a * world + rank) * cfg.batch_size:(a * world + rank + 1) * cfg.batch_size]]
                     for a in range(cfg.grad_accum)]
            # Normalize by the target tokens of the whole window on all ranks, so that the update is the
            # mean over tokens, however the tokens fall into micro-batches and processes.
            n_tok = torch.tensor(float(sum(sum(t != IGNORE for t in ex[1]) for m in micro for ex in m)))
            if world > 1:
                dist.all_reduce(n_tok)
            lr = get_lr(step, cfg, total_steps)
            for g in opt.param_groups:
                g["lr"] = lr
            loss_total = 0.0
            for m in micro:
                ids, tgt, seg = make_batch(m, cfg, device, flat)
                loss = loss_sum(model, ids, tgt, seg) / n_tok.item()
                loss.backward()
                loss_total += loss.item()
                n_real = sum(len(ex[0]) for ex in m)   # real tokens, padding not counted
                tokens_seen += n_real
                max_micro_tokens = max(max_micro_tokens, n_real)
            if world > 1:   # one all-reduce of all adapter gradients (a few MB), summed: already normalized
                flat_g = torch.cat([p.grad.reshape(-1) for p in params])
                dist.all_reduce(flat_g)
                off = 0
                for p in params:
                    p.grad.copy_(flat_g[off:off + p.numel()].view_as(p))
                    off += p.numel()
                lt = torch.tensor(loss_total)
                dist.all_reduce(lt)
                loss_total = lt.item()
            gnorm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
            opt.step()
            opt.zero_grad(set_to_none=True)
            if device.type == "cpu":
                release_freed_memory()   # the step's small freed blocks, or they pile up in the heap
                if runtime_rss is None:
                    # Everything resident that is not a tensor (Python, torch's code and threads, the
                    # tokenizer, the data): RSS between two steps, less the weights, adapters and
                    # optimizer states alive then (gradients are freed).
                    live = memory_breakdown(model, opt)
                    runtime_rss = status_bytes("VmRSS") - live["base_weights"] - live["adapters"] - live["optimizer_states"]
            step += 1
            losses.append(loss_total)
            elapsed = time.time() - t0
            tok_s = tokens_seen * world / elapsed
            eta = elapsed / (step - first_step) * (total_steps - step)
            peak = peak_memory(device)
            record(step=step, loss=loss_total, lr=lr, grad_norm=float(gnorm), tokens=tokens_seen * world,
                   tok_s=tok_s, elapsed=elapsed, peak_mem=peak)
            if step % cfg.log_every == 0 or step == total_steps:
                log(f"step {step}/{total_steps} | loss {loss_total:.4f} | lr {lr:.2e} | {tok_s:.1f} tok/s | "
                    f"ETA {eta / 60:.1f} min | peak mem {peak / 2**30:.2f} GB")
            if cfg.eval_every and step % cfg.eval_every == 0 and step < total_steps:
                ev, _ = evaluate(model, eval_batches, world)
                record(step=step, eval_loss=ev, eval_ppl=math.exp(ev))
                log(f"eval at step {step}: loss {ev:.4f}, ppl {math.exp(ev):.2f}")
            if cfg.save_every and step % cfg.save_every == 0 and step < total_steps:
                save(step)
            if cfg.stop_after and step >= cfg.stop_after and step < total_steps:
                raise KeyboardInterrupt   # the same exit as Ctrl-C: checkpoint, then stop
    except KeyboardInterrupt:
        interrupted = True
        opt.zero_grad(set_to_none=True)
        save(step)
        log(f"\ninterrupted: checkpoint saved at step {step} in {out}; continue with the same flags and --resume")
    train_time = time.time() - t0
    summary = dict(steps=step, total_steps=total_steps, interrupted=interrupted, final_loss=losses[-1] if losses else None,
                   losses=losses, eval_loss_before=eval_before, tokens_per_s=tokens_seen * world / max(train_time, 1e-9),
                   train_time_s=train_time, peak_mem=peak_memory(device), device=str(device),
                   dtype=str(dtype).replace("torch.", ""), trainable=info["trainable"], total_params=info["total"],
                   memory=memory_breakdown(model, opt), runtime_rss=runtime_rss, out=str(out),
                   tokens_per_step=tokens_seen * world / max(1, step - first_step),
                   max_tokens_per_micro_batch=max_micro_tokens)
    if not interrupted:
        ev, _ = evaluate(model, eval_batches, world)
        record(step=step, eval_loss=ev, eval_ppl=math.exp(ev))
        summary.update(eval_loss_after=ev, eval_ppl_after=math.exp(ev), total_time_s=time.time() - t_start)
        save(step)
        if rank == 0:
            atomic_write(out / "summary.json", json.dumps(summary, indent=2))
        before = f"{eval_before:.4f} -> " if eval_before is not None else ""
        log(f"done: {step} steps in {train_time / 60:.1f} min; eval loss {before}{ev:.4f} (ppl {math.exp(ev):.2f}); "
            f"adapter in {out}")
        if cfg.max_steps > 0 and device.type == "cpu" and rank == 0:
            log(f"(a short run for a CPU; the full epoch on a GPU: python train.py {'--qlora ' if cfg.qlora else ''}"
                f"--max-steps -1 --seq-len 1024 --batch-size 8 --eval-every 50)")
    if metrics:
        metrics.close()
    if world > 1:
        dist.barrier()
    return summary


if __name__ == "__main__":
    cfg = parse_args()
    try:
        summary = train(cfg)
    except (ValueError, FileNotFoundError, PermissionError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except torch.OutOfMemoryError as e:
        print(f"error: out of memory ({str(e).splitlines()[0]}); try --qlora, --grad-checkpoint, a smaller "
              "--batch-size (with --grad-accum to keep the batch) or a shorter --seq-len", file=sys.stderr)
        sys.exit(3)
    if summary.get("interrupted"):
        sys.exit(130)
