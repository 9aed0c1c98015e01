"""
Fine-tune a Llama-family model with LoRA (16-bit base) or QLoRA (NF4 base + paged 8-bit AdamW).

    python train.py --qlora                          # SmolLM2-135M-Instruct on AlpacaEval's pairs, 50 steps
    python train.py                                  # LoRA on the same
    python train.py --qlora --model path/to/hf_folder --data my.jsonl --max-steps -1 --seq-len 1024
    python train.py --show-example                   # the first training example as the model sees it
    python train.py --qlora --resume                 # continue runs/qlora where it stopped
    python train.py --qlora --compile                # torch.compile each block: ~1 min to compile, then faster steps
    python train.py --qlora --dora                   # QDoRA: DoRA's learned row lengths over the NF4 base
    python train.py --qlora --init loftq             # LoftQ: A and B start from an SVD of the NF4 error
    torchrun --nproc_per_node 2 train.py --qlora     # data-parallel on 2 GPUs (or CPU processes)
    torchrun --nproc_per_node 2 train.py --qlora --fsdp   # the base sharded over them (FSDP2): 1/2 each

Stopping: Ctrl-C, SIGTERM (what SLURM, Kubernetes and spot instances send) or --stop-after finish the
optimizer step under way, save a checkpoint and exit with code 75; the same command with --resume then
continues exactly. Under torchrun every rank stops at the same step. A second Ctrl-C stops at once,
without a checkpoint. A loss or gradient norm that is not finite stops the run before the update
(exit code 4), naming the step; the last good save is left as it was.

A run directory holds the adapter in peft's format (adapter_config.json, adapter_model.safetensors),
train_config.json, metrics.jsonl (one JSON object per step and eval), summary.json and
checkpoint.safetensors (adapters, optimizer, RNG states, step: what --resume needs; safetensors and
JSON, so loading it cannot run code); with --init loftq --loftq-iters 2 or more also
loftq_base.safetensors, the NF4 codes the adapter was trained over (one iteration keeps QLoRA's own,
NF4 of the base model's weights, which anything that loads the adapter rebuilds). Exit codes: 0 done,
2 bad input, 3 out of memory, 4 diverged, 74 a save failed (a full disk: the previous save is intact),
75 stopped with a checkpoint.
"""
import allocator

if __name__ == "__main__":   # before torch is imported: re-executes this command line with mimalloc, if installed
    allocator.preload()

import argparse
import json
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, fields
from typing import NamedTuple

import torch
import torch.distributed as dist

from data import (IGNORE, check_eos, collate, collate_packed, encode_chat, encode_example, load_examples,
                  load_tokenizer, pack, prompt_format, show_example)
from formats import build_empty, gpu_dtype, load_model, read_args
from fsdp import device_mesh, full, is_sharded, local_base_bytes, local_bytes, move_unsharded, shard_block
from generate import generate_batch
from lora import (apply_loftq, apply_lora, base_fingerprint, lora_layers, lora_scaling, loftq_quantizer, save_loftq_base,
                  use_loftq_base)
from nf4 import NF4Linear, place_tables
from optim import AdamW8bit
from runs import Diverged, Metrics, Run, SaveFailed, StopSignals, atomic_write, check_out_dir, last_good, resume, save
from score import METRICS, mcnemar, pick_metric, score, wilson


@dataclass
class TrainConfig:
    model: str = "default"          # HF folder, .gguf file, or "default" (SmolLM2-135M-Instruct, fetched once)
    data: str = "default"           # JSONL or JSON file, or "default" (AlpacaEval's 805 pairs, fetched once)
    out: str = ""                   # run directory (default runs/qlora or runs/lora)
    qlora: bool = False             # NF4 base + paged 8-bit AdamW (QLoRA); otherwise LoRA on the 16-bit base
    rank: int = 8                   # LoRA rank r
    alpha: float = 16.0             # LoRA alpha (scale = alpha / r)
    dropout: float = 0.05           # dropout on the LoRA input
    targets: str = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"  # linears to adapt
    rslora: bool = False            # scale alpha / sqrt(r) instead of alpha / r
    dora: bool = False              # DoRA: also learn a length per output row of each adapted weight (QDoRA with --qlora); peft's use_dora
    init: str = "kaiming"           # adapter start: kaiming (A random, B zero: the model starts at the base) | loftq (with --qlora: A, B from an SVD of the NF4 error, so the model starts nearer the 16-bit one)
    loftq_iters: int = 1            # --init loftq: alternations of NF4 and SVD (1 keeps QLoRA's base; more change the NF4 codes, saved in the run as loftq_base.safetensors)
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
    last_turn_only: bool = False    # in multi-turn conversations, loss on the last assistant turn only (default: every assistant turn)
    prompt_format: str = ""         # chatml | llama3 | llama2 | alpaca: a named format instead of the model's own chat template (the default, where it has one)
    eval_examples: int = 100        # held-out examples (a fixed seeded split)
    eval_every: int = 0             # evaluate every N steps (0 = only before and after training); with --eval-generate, score answers then too
    eval_generate: int = 0          # also greedy-generate answers to N held-out examples before and after training and score them against the references (accuracy, 95% interval, paired test)
    eval_metric: str = "auto"       # how --eval-generate scores an answer: exact | contains | numeric | choice | regex (score.py), or loglik: records with "choices", the choice of highest log-probability (no generation); auto: loglik if the records have choices, choice if the references are letters, numeric if numbers, else exact
    eval_regex: str = ""            # the pattern for --eval-metric regex (its first group, or the match, must equal the reference)
    eval_max_new_tokens: int = 64   # --eval-generate stops an answer after this many tokens (or at a stop token)
    save_every: int = 0             # save adapter + checkpoint every N steps (0 = only at the end)
    log_every: int = 1              # progress line every N steps
    grad_checkpoint: bool = False   # recompute each block in backward to save activation memory
    fsdp: bool = False              # under torchrun: shard each block's base and adapters over the ranks (FSDP2), each keeping 1/N, for models one GPU cannot hold
    fsdp_cpu_offload: bool = False  # with --fsdp on GPUs: keep each rank's shards in host memory, on the GPU only while gathered (FSDP2's CPUOffloadPolicy; the optimizer steps on the CPU): a 70B on 24 GB cards
    compile: bool = False           # torch.compile each block (one compilation serves every layer; the first two steps pay for it)
    resume: bool = False            # continue the run in --out from its checkpoint (the number of processes, --batch-size and --grad-accum may change if each step keeps its examples)
    stop_after: int = 0             # stop after this many steps with a resumable checkpoint (0 = run to the end)
    overwrite: bool = False         # replace an existing run in --out
    force: bool = False             # resume even if the checkpoint was made on another base model
    show_example: bool = False      # print the first training example as the model sees it (loss tokens marked), then exit
    seed: int = 0                   # data order, adapter init, dropout
    device: str = ""                # cpu | cuda (default: cuda if available)
    dtype: str = ""                 # float32 | bfloat16 | float16 (default: bf16 on GPUs with it, else fp16 + loss scaling; CPU: the faster of fp32/bf16)
    cpu_mmap_kb: int = 256          # CPU on glibc (no tcmalloc, jemalloc or mimalloc): allocations over this many KB get their own mapping (lower: less memory, slower)


def parse_args(argv=None) -> TrainConfig:
    """TrainConfig -> argparse: one flag per field, help from the field's comment."""
    import inspect
    src = inspect.getsource(TrainConfig)
    helps = {l.split(":")[0].strip(): l.split("#", 1)[1].strip() for l in src.splitlines() if "#" in l and ":" in l}
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in fields(TrainConfig):
        flag, h = "--" + f.name.replace("_", "-"), helps.get(f.name, "").replace("%", "%%")   # argparse formats help with %
        if f.type in (bool, "bool"):
            p.add_argument(flag, action="store_true", help=h)
        else:
            typ = {"int": int, "float": float, "str": str}.get(f.type, f.type) if isinstance(f.type, str) else f.type
            p.add_argument(flag, type=typ, default=f.default, help=f"{h} (default: {f.default!r})")
    return TrainConfig(**vars(p.parse_args(argv)))


# ----------------------------------------------------------------------------------------------
# Setup: where we run, the data, the model

def start(cfg: TrainConfig) -> Run:
    """Check the flags, pick device and dtype, join the other ranks under torchrun, check --out."""
    cfg.out = cfg.out or ("runs/qlora" if cfg.qlora else "runs/lora")
    cfg.optim = cfg.optim or ("paged_adamw8bit" if cfg.qlora else "adamw")
    if cfg.optim not in ("adamw", "adamw8bit", "paged_adamw8bit"):
        raise ValueError(f"--optim {cfg.optim!r}: choose adamw, adamw8bit or paged_adamw8bit")
    if cfg.init not in ("kaiming", "loftq"):
        raise ValueError(f"--init {cfg.init!r}: choose kaiming or loftq")
    if cfg.init == "loftq" and not cfg.qlora:
        raise ValueError("--init loftq starts the adapter by undoing the NF4 error of the base: it needs --qlora")
    if cfg.loftq_iters < 1:
        raise ValueError(f"--loftq-iters {cfg.loftq_iters}: at least 1")
    if not 0 < cfg.cpu_mmap_kb <= 32 << 10:
        raise ValueError(f"--cpu-mmap-kb {cfg.cpu_mmap_kb}: choose 1 to 32768 (glibc's largest mmap threshold is 32 MB)")
    if cfg.fsdp_cpu_offload and not cfg.fsdp:
        raise ValueError("--fsdp-cpu-offload offloads the shards of --fsdp: add --fsdp")
    if cfg.fsdp and "LOCAL_RANK" not in os.environ:
        raise ValueError("--fsdp shards the base over torchrun's processes: run it under torchrun "
                         "(torchrun --nproc_per_node N train.py ... --fsdp)")
    if cfg.fsdp and cfg.init == "loftq":
        raise ValueError("--fsdp with --init loftq is not supported yet")
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    device, dtype = pick_device_dtype(cfg)
    if cfg.fsdp_cpu_offload and device.type != "cuda":
        raise ValueError("--fsdp-cpu-offload moves a GPU's shards to host memory; on the CPU they are there already")
    if device.type == "cuda":   # always: streams and synchronize() use the current device
        if world > 1:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        elif device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
    if world > 1:
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cpu" and allocator.name() == "glibc":
        allocator.limit_heap_retention(cfg.cpu_mmap_kb)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)   # fp16 gradients underflow unscaled
    return Run(cfg, device, dtype, rank, world, check_out_dir(cfg), scaler)


def pick_device_dtype(cfg):
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if cfg.dtype:
        return device, getattr(torch, cfg.dtype)
    if device.type == "cuda":
        return device, gpu_dtype(device)   # fp16 (pre-Ampere) trains with a loss scaler
    # On CPU, bf16 matmuls are ~50x slower than fp32 unless the CPU has bf16 units (AVX512-BF16 or
    # AMX); only then do we time both and take the faster. The two are timed in alternation, best of 10
    # rounds each: timed one after the other, a burst of another tenant's load on a shared machine fell on
    # bf16's samples alone once and a bench run trained in fp32 at 0.66x the speed.
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        flags = ""
    if "avx512_bf16" not in flags and "amx_bf16" not in flags:
        return device, torch.float32
    pairs = {dt: (torch.randn(512, 1024, dtype=dt), torch.randn(1024, 1024, dtype=dt))
             for dt in (torch.bfloat16, torch.float32)}
    best = dict.fromkeys(pairs, float("inf"))
    for i in range(11):
        for dt, (a, b) in pairs.items():
            t = time.perf_counter()
            a @ b
            if i:   # the first round warms up (oneDNN builds its bf16 kernel on the first call)
                best[dt] = min(best[dt], time.perf_counter() - t)
    return device, torch.bfloat16 if best[torch.bfloat16] < 0.8 * best[torch.float32] else torch.float32


def prepare_data(cfg: TrainConfig, tok, log=print):
    """Tokenized (ids, targets) for the train and eval splits; every check of the data happens here."""
    fmt = prompt_format(tok, cfg.prompt_format or None)
    train_convs, eval_convs = load_examples(cfg.data, cfg.eval_examples, seed=0)
    check_eos(tok, fmt, train_convs + eval_convs, str(cfg.data))
    encode = lambda convs: [encode_example(tok, fmt, c, cfg.seq_len, cfg.train_on_prompt, cfg.last_turn_only)
                            for c in convs]
    train_ex, eval_ex = encode(train_convs), encode(eval_convs)
    n_trunc = sum(t for _, _, t in train_ex)
    train_ex = [(i, t) for i, t, _ in train_ex if any(x != IGNORE for x in t)]
    eval_ex = [(i, t) for i, t, _ in eval_ex if any(x != IGNORE for x in t)]
    if not train_ex:
        raise ValueError(f"{cfg.data}: no training example has a response token within --seq-len {cfg.seq_len}")
    log(f"data: {len(train_ex)} train / {len(eval_ex)} eval examples ({train_convs.describe()} records), "
        f"format {fmt['name']}, "
        f"{n_trunc} truncated to {cfg.seq_len} tokens, {len(train_convs) - len(train_ex)} dropped (no response left)")
    return train_ex, eval_ex


class Question(NamedTuple):
    """A held-out question for --eval-generate: its prompt's tokens, the reference answer, the question's
    text (for the log), and for --eval-metric loglik the choices, each as (ids, loss mask) of the whole
    conversation with that choice as the answer."""
    prompt_ids: list[int]
    reference: str
    text: str
    choices: tuple = ()
    choice_examples: tuple = ()


EVAL_METRICS = METRICS + ("loglik",)
# Answers generated per batch: each decoding step reads every weight once (and dequantizes every NF4 one),
# so wide batches are what make scoring hundreds of answers cheap; the KV cache of 64 short rows is small.
GENERATE_BATCH = 64


def generation_set(cfg: TrainConfig, tok) -> list[Question]:
    """--eval-generate: the first N held-out conversations as questions; the prompt is everything before
    the last assistant turn, the reference that turn. loglik takes the multiple-choice ones only."""
    if cfg.eval_metric not in ("auto",) + EVAL_METRICS or (cfg.eval_metric == "regex") != bool(cfg.eval_regex):
        raise ValueError(f"--eval-metric {cfg.eval_metric!r}: choose auto or one of {', '.join(EVAL_METRICS)}; "
                         "--eval-regex goes with regex, and only with it")
    fmt = prompt_format(tok, cfg.prompt_format or None)
    _, eval_convs = load_examples(cfg.data, cfg.eval_examples, seed=0)
    convs = [c for c in eval_convs if c[-1]["role"] == "assistant"]
    if cfg.eval_metric == "auto":   # resolved here, once, into the config the run records
        picked = convs[:cfg.eval_generate]
        cfg.eval_metric = ("loglik" if picked and all("choices" in c[-1] for c in picked)
                           else pick_metric([c[-1]["content"] for c in picked]))
    loglik = cfg.eval_metric == "loglik"
    convs = [c for c in convs if not loglik or "choices" in c[-1]]
    if loglik and not convs:
        raise ValueError(f"--eval-metric loglik scores multiple-choice records ({{..., \"choices\": [...]}}, the "
                         f"answer one of them): none of the {len(eval_convs)} held-out records of {cfg.data} has choices")
    return [Question(encode_chat(tok, c[:-1], add_generation_prompt=True, fmt=fmt)[0], c[-1]["content"],
                     c[-2]["content"] if len(c) > 1 else "", tuple(c[-1]["choices"]) if loglik else (),
                     tuple(encode_chat(tok, c[:-1] + [dict(role="assistant", content=x)], fmt=fmt)
                           for x in c[-1]["choices"]) if loglik else ())
            for c in convs[:cfg.eval_generate]]


@torch.no_grad()
def answer_logliks(model, examples: list[tuple[list[int], list[bool]]], batch: int = 8) -> list[float]:
    """For each (ids, loss mask): the summed log-probability of its answer tokens (the masked ones) given
    the tokens before them. Only those positions go through lm_head (the vocabulary is large)."""
    dev, out = model.lm_head.weight.device, []
    for i in range(0, len(examples), batch):
        chunk = [(ids, [t if m else IGNORE for t, m in zip(ids[1:], mask[1:])] + [IGNORE])   # position j predicts j+1
                 for ids, mask in examples[i:i + batch]]
        ids, tgt, seg = (t.to(dev) for t in collate(chunk))
        h = model.hidden(ids, seg)
        where = tgt != IGNORE
        lp = model.lm_head(h[where]).float().log_softmax(-1).gather(-1, tgt[where][:, None])[:, 0]
        row = where.nonzero()[:, 0]
        out += torch.zeros(len(chunk), dtype=torch.float64, device=dev).index_add_(0, row, lp.double()).tolist()
    return out


def accuracy(model, tok, items: list[Question], cfg: TrainConfig) -> dict:
    """The --eval-generate questions answered and scored: right/n, accuracy, its 95% Wilson interval.
    Answers are greedy generations, or with loglik the choice of highest log-probability. Under torchrun
    each rank answers every world-th question and all ranks get every answer."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    if is_sharded(model):   # --fsdp: each token's forward gathers weights from all ranks, so every rank answers all
        rank, world = 0, 1
    mine, answers = items[rank::world], []
    model.eval()
    if cfg.eval_metric == "loglik":
        flat = answer_logliks(model, [x for q in mine for x in q.choice_examples])
        for q in mine:
            scores, flat = flat[:len(q.choices)], flat[len(q.choices):]
            answers.append(q.choices[max(range(len(scores)), key=scores.__getitem__)])
    else:
        room = model.args.max_seq_len - cfg.eval_max_new_tokens   # a longer prompt keeps its end
        if room < 1:
            raise ValueError(f"--eval-max-new-tokens {cfg.eval_max_new_tokens} leaves no room for a prompt in the "
                             f"model's {model.args.max_seq_len} tokens")
        # Prompts of similar length batched together (less padding), answers put back in order after.
        order, B = sorted(range(len(mine)), key=lambda j: len(mine[j].prompt_ids)), GENERATE_BATCH
        answers = [""] * len(mine)
        with torch.compiler.set_stance("force_eager"):   # with --compile, decoding would recompile for every length
            for i in range(0, len(order), B):
                rows = order[i:i + B]
                for j, a in zip(rows, generate_batch(model, [mine[j].prompt_ids[-room:] for j in rows],
                                                     cfg.eval_max_new_tokens, tok.stop_ids)):
                    answers[j] = tok.decode(a)
    model.train()
    if world > 1:
        parts = [None] * world
        dist.all_gather_object(parts, answers)
        answers = [parts[i % world][i // world] for i in range(len(items))]
    right = [a == q.reference if cfg.eval_metric == "loglik" else score(a, q.reference, cfg.eval_metric, cfg.eval_regex or None)
             for a, q in zip(answers, items)]
    k, n = sum(right), len(right)
    return dict(metric=cfg.eval_metric, right=k, n=n, accuracy=k / max(n, 1), ci95=wilson(k, n),
                correct=right, answers=answers)


def describe_accuracy(acc: dict) -> str:
    lo, hi = acc["ci95"]
    return f"{acc['right']}/{acc['n']} = {100 * acc['accuracy']:.1f}% (95% interval {100 * lo:.1f}-{100 * hi:.1f}%, {acc['metric']})"


def show(cfg: TrainConfig) -> dict:
    """--show-example: the first training example as the model sees it, then the data's checks."""
    tok = load_tokenizer(cfg.model)
    fmt = prompt_format(tok, cfg.prompt_format or None)
    train_convs, _ = load_examples(cfg.data, cfg.eval_examples, seed=0)
    text = show_example(tok, fmt, train_convs[0], cfg.seq_len, cfg.train_on_prompt, color=sys.stdout.isatty(),
                        last_turn_only=cfg.last_turn_only)
    print(text, flush=True)
    prepare_data(cfg, tok)   # and what training would refuse
    return dict(example=text)


def load_sharded(run: Run, targets, quantize):
    """--fsdp: the base streams in and each block, once its tensors are all there, gets its adapters and is
    sharded over the ranks (its whole tensors freed), so a rank never holds more than one block whole
    besides its shards. The adapters are drawn first, over an empty copy of the model, in the order and
    with the draws of one process without --fsdp, so the run starts from the same adapter."""
    from torch.distributed.fsdp import FSDPModule
    cfg = run.cfg
    shadow = build_empty(read_args(cfg.model))
    info = apply_lora(shadow, targets, cfg.rank, cfg.alpha, cfg.dropout, cfg.rslora, cfg.dora, device="cpu")
    adapters, mesh = lora_layers(shadow), device_mesh(run.device)

    def take(i, block):
        inside = f"model.layers.{i}."
        for name, lora in adapters.items():
            if name.startswith(inside):
                parent, _, attr = name[len(inside):].rpartition(".")
                owner = block.get_submodule(parent)
                lora.base = getattr(owner, attr)   # the real base (NF4 or 16-bit) in place of the empty one
                setattr(owner, attr, lora)
                if lora.use_dora:
                    lora.start_magnitude()
        shard_block(block, mesh, cfg.fsdp_cpu_offload)
    model = load_model(cfg.model, run.dtype, quantize=quantize, device="cpu", on_block=take)
    for i, block in enumerate(model.model.layers):
        if not isinstance(block, FSDPModule):   # a file that does not stream block by block (bitsandbytes 4-bit)
            take(i, block)
    move_unsharded(model, run.device)
    for n, p in model.named_parameters():
        p.requires_grad_("lora_" in n)
    model.lora_config = shadow.lora_config
    model.fingerprint = base_fingerprint(model)   # every rank (it gathers block 0's norms), once
    return model, info


def build_model(run: Run):
    """Load the base (NF4 as it streams in, for QLoRA), wrap the targets in LoRA, make the optimizer."""
    cfg = run.cfg
    torch.manual_seed(cfg.seed)   # the adapters' initialisation: the same on every rank
    targets = cfg.targets.split(",")
    loftq, found = cfg.init == "loftq" and not cfg.resume, {}   # a resumed run has its A and B in the checkpoint
    quantize = "nf4" if cfg.qlora else None
    if loftq:
        quantize = loftq_quantizer(targets, cfg.rank, lora_scaling(cfg.rank, cfg.alpha, cfg.rslora), cfg.loftq_iters,
                                   found)
    t0 = time.perf_counter()
    if cfg.fsdp:
        model, info = load_sharded(run, targets, quantize)
    else:
        model = load_model(cfg.model, run.dtype, quantize=quantize, device=run.device)
    load_peak = peak_memory(run.device)   # quantizing as weights stream in has a peak of its own
    if cfg.seq_len > model.args.max_seq_len:
        raise ValueError(f"--seq-len {cfg.seq_len} is above the model's limit of {model.args.max_seq_len} tokens")
    if not cfg.fsdp:
        info = apply_lora(model, targets, cfg.rank, cfg.alpha, cfg.dropout, cfg.rslora, cfg.dora)
    if loftq:
        apply_loftq(model, found, cfg.loftq_iters)
        errors = [e for _, _, e in found.values()]
        mean = lambda i: sum(e[i] for e in errors) / len(errors)
        run.log(f"LoftQ ({cfg.loftq_iters} iteration{'s' if cfg.loftq_iters > 1 else ''}) on {len(found)} layers, "
                f"{time.perf_counter() - t0:.0f} s with loading: ||W - (Q + sBA)|| / ||W||, mean over layers, "
                f"{mean(-1):.4f} (NF4 alone: {mean(0):.4f})")
    elif cfg.init == "loftq":
        model.lora_config["loftq_iters"] = cfg.loftq_iters
        use_loftq_base(model, run.out, cfg.loftq_iters)   # the base the checkpoint's adapter was trained over
    if cfg.fsdp:
        info["base_bytes_per_rank"] = held = run.gather(local_base_bytes(model))
        run.log(f"--fsdp: blocks sharded over {run.world} rank(s), holding {', '.join(f'{b / 2**20:.2f}' for b in held)} "
                f"MB of the base (embeddings, norms and lm_head whole on each)")
    if run.rank:   # rank 0 keeps the seed's stream (one process gives the same run with or without torchrun);
        torch.manual_seed(cfg.seed + 1_000_003 * run.rank)   # the others draw their own dropout masks
    model.grad_checkpoint = cfg.grad_checkpoint
    model.train()
    if cfg.compile:
        place_tables(run.device)
        model.compile_blocks()
        if cfg.dropout > 0:   # its mask comes from a generator of its own, which torch.compile cannot trace
            run.log(f"--compile with --dropout {cfg.dropout}: each LoRA add runs eagerly (graph breaks), which took the "
                    "gain away on a CPU (README); --dropout 0 compiles the whole block")
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optim == "adamw":
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    else:
        opt = AdamW8bit(params, lr=cfg.lr, weight_decay=cfg.weight_decay, paged=cfg.optim.startswith("paged"))
    run.log(f"model: {cfg.model} in {str(run.dtype).replace('torch.', '')} on {run.device}, "
            f"{'Q' if cfg.qlora else ''}{'DoRA' if cfg.dora else 'LoRA'}{' (NF4 base)' if cfg.qlora else ''}"
            f"{'; LoftQ init' if cfg.init == 'loftq' else ''}; {len(info['wrapped'])} layers adapted, "
            f"{info['trainable']:,} trainable of {info['total']:,} parameters; optimizer {cfg.optim}; "
            f"peak mem while loading {load_peak / 2**30:.2f} GB" + ("; blocks compiled" if cfg.compile else "")
            + (f"; allocator {allocator.name()}" if run.device.type == "cpu" else ""))
    return model, params, opt, dict(info, load_peak_mem=load_peak)


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


def micro_batches(train_ex, step, run: Run) -> list[list]:
    """This rank's examples of optimizer step `step`, split into grad_accum micro-batches."""
    b, a = run.cfg.batch_size, run.cfg.grad_accum
    idx = step_examples(len(train_ex), len(train_ex), step, b * a * run.world, run.cfg.seed)
    return [[train_ex[j] for j in idx[(k * run.world + run.rank) * b:(k * run.world + run.rank + 1) * b]]
            for k in range(a)]


class Batch(NamedTuple):
    """One micro-batch on the device: ids (B, T), segment ids (B, T) or None, and the flat positions
    that carry loss with their target ids. The positions are found on the CPU, before the copy: a
    boolean mask applied on the GPU would make every step wait for the device to count them."""
    ids: torch.Tensor
    seg: torch.Tensor | None
    where: torch.Tensor
    targets: torch.Tensor


def to_batch(ids, tgt, seg, device) -> Batch:
    where = (tgt.reshape(-1) != IGNORE).nonzero().squeeze(1)
    to = lambda t: None if t is None else t.to(device, non_blocking=True)
    return Batch(to(ids), to(seg), to(where), to(tgt.reshape(-1)[where]))


def make_batch(examples, cfg, device, flat: bool, bucket: bool = False) -> Batch:
    """One micro-batch. `flat` concatenates the examples into one row with segment ids: no compute at
    all on padding (CPU). Otherwise right-padded rows with the fused causal kernel (GPU). `bucket` pads
    the flat row to bucket_length with a segment of its own that has no targets."""
    if cfg.pack:
        ids, tgt, seg = collate_packed(pack(examples, cfg.seq_len))
    elif flat:
        n = sum(len(e[0]) for e in examples)
        pad = bucket_length(n) - n if bucket else 0
        ids, tgt, seg = collate_packed([list(examples) + ([([0] * pad, [IGNORE] * pad)] if pad else [])])
    else:
        ids, tgt, seg = collate(examples)
        seg = None   # right padding: causal attention never looks at the pads that follow
    return to_batch(ids, tgt, seg, device)


def batch_layout(run: Run) -> tuple[bool, bool]:
    """make_batch's (flat, bucket) for this run: one row of segments on CPUs, padded to bucket_length there in
    16 bits (fp32 matmuls keep nothing per shape: no padding needed)."""
    flat = run.device.type == "cpu"
    return flat, flat and run.dtype != torch.float32


def bucket_length(n: int) -> int:
    """n rounded up to a multiple of 64 (from 2048 tokens on, of a 16th of the power of two below n). oneDNN, which
    runs bf16 matmuls on CPUs, builds kernels for every new number of rows and keeps them (~16 MB for each
    new micro-batch length of the default model, never freed): a bf16 run that met a new length every step
    grew by that much a step (`python bench/revs.py` measures the default run against a commit before)."""
    step = 1 << max(6, n.bit_length() - 5)
    return -(-n // step) * step


def loss_sum(model, batch: Batch):
    """Sum of cross-entropy over target tokens. Only target positions go through lm_head: with a
    49k vocabulary the prompt tokens' logits would cost as much as the rest of the model."""
    h = model.hidden(batch.ids, batch.seg)
    return LMHeadLoss.apply(h.reshape(-1, h.shape[-1]).index_select(0, batch.where), model.lm_head.weight,
                            batch.targets)


class LMHeadLoss(torch.autograd.Function):
    """sum_i CE(h_i W^T, y_i) over chunks of tokens, with dL/dh computed in the forward pass.

    Keeping the (tokens, vocab) logits and their softmax for backward would be the largest
    activation of a small model (49k vocabulary); this keeps one chunk's at a time instead, and
    only dL/dh (tokens, dim) until backward. The lm_head weight is frozen, so it needs no gradient."""
    CHUNK = 256

    @staticmethod
    def forward(ctx, h, weight, targets):
        n = h.shape[0]
        grad = torch.empty_like(h) if ctx.needs_input_grad[0] else None
        if h.dtype != torch.float32 and not h.is_cuda and n % 32:   # whole multiples of 32 rows: bucket_length says why
            h, targets = torch.nn.functional.pad(h, (0, 0, 0, -n % 32)), torch.nn.functional.pad(targets, (0, -n % 32))
        loss = torch.zeros((), dtype=torch.float32, device=h.device)
        for i in range(0, h.shape[0], LMHeadLoss.CHUNK):
            t = targets[i:i + LMHeadLoss.CHUNK]
            logits = (h[i:i + LMHeadLoss.CHUNK] @ weight.T).float()
            target_logit = logits.gather(1, t[:, None]).squeeze(1)
            # log-sum-exp and softmax in place of the logits: one (chunk, vocab) buffer, no temporaries
            top = logits.amax(-1, keepdim=True)
            p = logits.sub_(top).exp_()
            total = p.sum(-1, keepdim=True)
            loss += (total.log() + top - target_logit[:, None])[:n - i].sum()   # not the padding rows
            if grad is not None:
                p.div_(total)                                         # softmax
                p[torch.arange(len(t), device=t.device), t] -= 1      # d CE / d logits = softmax - onehot
                grad[i:i + LMHeadLoss.CHUNK] = (p.to(h.dtype) @ weight)[:n - i]
        ctx.save_for_backward(grad if grad is not None else h.new_empty(0))
        return loss

    @staticmethod
    def backward(ctx, g):
        (grad,) = ctx.saved_tensors
        return grad * g.to(grad.dtype), None, None


@torch.no_grad()
def evaluate(model, batches, run: Run) -> tuple[float, int]:
    """Token-weighted mean loss over the eval batches (each rank its share), and the token count."""
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=run.device)
    for b in batches:
        total[0] += loss_sum(model, b).double()
        total[1] += b.targets.numel()
    loss, n = run.sum(total).tolist()
    model.train()
    return (loss / n if n else float("nan")), int(n)   # nan: no eval split (--eval-examples 0)


def get_lr(step, cfg, total):
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / (cfg.warmup_steps + 1)
    progress = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def sum_gradients(run: Run, params, loss, stop: bool):
    """Under torchrun: one all-reduce of all adapter gradients (a few MB; each rank's are already
    normalized by the whole step's tokens, so the sum is the mean), and one of (loss, stop votes),
    so that every rank logs the same loss and stops at the same step."""
    if run.world == 1:
        return loss, stop
    if not run.cfg.fsdp:   # FSDP has reduce-scattered each block's gradients in backward already
        all_reduce_gradients(params)
    both = run.sum(torch.stack([loss, torch.tensor(float(stop), dtype=loss.dtype, device=loss.device)]))
    return both[0], bool(both[1] > 0)


def all_reduce_gradients(params):
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    dist.all_reduce(flat)
    off = 0
    for p in params:
        p.grad.copy_(flat[off:off + p.numel()].view_as(p))
        off += p.numel()


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
    """Bytes of each kind of live tensor, counted from the real tensors (this rank's parts under --fsdp)."""
    lora = [p for m in lora_layers(model).values() for p in (m.lora_A.weight, m.lora_B.weight, m.lora_magnitude_vector)
            if p is not None]
    ids = {id(p) for p in lora}
    base = sum(local_bytes(p) for p in model.parameters() if id(p) not in ids)
    base += sum(local_bytes(b) for m in model.modules() if isinstance(m, NF4Linear) for b in m.buffers())
    adapters = sum(local_bytes(p) for p in lora)
    state = [t for st in opt.state.values() for t in st.values() if torch.is_tensor(t)]
    return dict(base_weights=base, adapters=adapters, gradients=adapters, optimizer_states=sum(local_bytes(t) for t in state))


def runtime_bytes(model, opt) -> int:
    """Everything resident that is not a tensor (Python, torch's code and threads, the tokenizer, the
    data, oneDNN's cache of bf16 matmul kernels, which grows with each new micro-batch length): RSS
    less the weights, adapters and optimizer states alive. train() measures it after the last step,
    with the allocator's free memory handed back first."""
    live = memory_breakdown(model, opt)
    return status_bytes("VmRSS") - live["base_weights"] - live["adapters"] - live["optimizer_states"]


# ----------------------------------------------------------------------------------------------
# The loop

class StepResult(NamedTuple):
    loss: float        # the step's mean loss over its target tokens, all ranks
    grad_norm: float   # before clipping
    skipped: bool      # fp16 gradients overflowed: the update was not applied
    stop_vote: bool    # some rank was asked to stop
    tokens: int        # this rank's real tokens, padding not counted
    max_micro: int     # the largest micro-batch with padding: what activations scale with


def train_step(run: Run, model, params, opt, micro: list[list], step: int, lr: float, stop: bool = False) -> StepResult:
    """One optimizer step over this rank's micro-batches: forward and backward of each, the gradients summed
    across ranks, clipped, applied and zeroed. train() calls it, and so does bench/train.py's timed worker."""
    cfg = run.cfg
    flat, bucket = batch_layout(run)
    # Normalize by the target tokens of the whole step on all ranks, so that the update is the
    # mean over tokens, however the tokens fall into micro-batches and processes.
    n_tok = float(sum(sum(t != IGNORE for t in ex[1]) for m in micro for ex in m))
    if run.world > 1:
        n_tok = run.sum(torch.tensor(n_tok, device=run.device))
    for g in opt.param_groups:
        g["lr"] = lr
    loss, tokens, max_micro = torch.zeros((), dtype=torch.float64, device=run.device), 0, 0
    for m in micro:
        batch = make_batch(m, cfg, run.device, flat, bucket)
        micro_loss = loss_sum(model, batch) / n_tok
        run.scaler.scale(micro_loss).backward()
        loss += micro_loss.detach()
        tokens += sum(len(ex[0]) for ex in m)
        max_micro = max(max_micro, batch.ids.numel())
    loss, stop_vote = sum_gradients(run, params, loss, stop)
    run.scaler.unscale_(opt)
    gnorm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
    loss, gnorm = loss.item(), full(gnorm).item()
    skipped = run.scaler.is_enabled() and not math.isfinite(gnorm)   # fp16 overflow: a smaller scale next
    if not math.isfinite(loss) or not (math.isfinite(gnorm) or skipped):
        raise Diverged(f"step {step + 1}: the loss is {loss} and the gradient norm {gnorm}: training "
                       f"diverged (learning rate {lr:.2e}{'' if cfg.grad_clip > 0 else ', no --grad-clip'}); "
                       f"the step was not applied and nothing was saved. {last_good(run)}")
    run.scaler.step(opt)   # opt.step(), unless fp16 gradients overflowed
    if cfg.fsdp and cfg.dora:
        for m in lora_layers(model).values():
            m.forget_norm()   # the step changed A and B where DoRA's norm cache cannot see it
    run.scaler.update()
    opt.zero_grad(set_to_none=True)
    if flat:
        allocator.release_freed_memory()   # glibc: the step's small freed blocks, or they pile up
    return StepResult(loss, gnorm, skipped, stop_vote, tokens, max_micro)


def train(cfg: TrainConfig) -> dict:
    """Setup (flags, data, model, optimizer, resume), then the loop: forward, backward, clip, step, log,
    eval, save; a requested stop ends it with a checkpoint at a step boundary."""
    run = start(cfg)
    t_start = time.time()
    tok = load_tokenizer(cfg.model)
    train_ex, eval_ex = prepare_data(cfg, tok, run.log)
    gen_items = generation_set(cfg, tok) if cfg.eval_generate else []
    if gen_items:
        run.log(f"--eval-generate: {len(gen_items)} held-out questions, scored by {cfg.eval_metric}")
    model, params, opt, info = build_model(run)
    step = resume(run, model, opt) if cfg.resume else 0
    per_step = cfg.batch_size * cfg.grad_accum * run.world
    total = cfg.max_steps if cfg.max_steps > 0 else max(1, math.ceil(cfg.epochs * len(train_ex) / per_step))
    flat, bucket = batch_layout(run)
    eb = cfg.batch_size
    starts = list(range(0, len(eval_ex), eb))
    eval_batches = [make_batch(eval_ex[i:i + eb], cfg, run.device, flat, bucket) for i in starts[run.rank::run.world]]
    if cfg.fsdp and starts:   # as many forwards on every rank (FSDP's gathers are collectives): extra ones with no targets
        first = make_batch(eval_ex[:eb], cfg, run.device, flat, bucket)
        no_targets = first._replace(where=first.where[:0], targets=first.targets[:0])
        eval_batches += [no_targets] * (-(-len(starts) // run.world) - len(eval_batches))
    # Nothing is written before this point: bad input has stopped us with the directory untouched.
    if run.rank == 0:
        run.out.mkdir(parents=True, exist_ok=True)
        atomic_write(run.out / "train_config.json", json.dumps(asdict(cfg), indent=2))
        if cfg.init == "loftq" and cfg.loftq_iters > 1 and step == 0:
            save_loftq_base(model, run.out)   # the adapter is right over these NF4 codes only
    metrics, stop = Metrics(run, step), StopSignals()
    try:
        eval_before = None
        if step == 0 and eval_batches:
            eval_before, n_eval = evaluate(model, eval_batches, run)
            metrics.record(step=0, eval_loss=eval_before, eval_ppl=math.exp(eval_before))
            run.log(f"eval before training: loss {eval_before:.4f}, ppl {math.exp(eval_before):.2f} ({n_eval} tokens)")
        acc_before = None
        if step == 0 and gen_items:
            acc_before = accuracy(model, tok, gen_items, cfg)
            metrics.record(step=0, accuracy=acc_before["accuracy"], right=acc_before["right"], n=acc_before["n"])
            run.log(f"answers before training: {describe_accuracy(acc_before)}")
        if run.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(run.device)
        t0, first, tokens, losses, max_micro, runtime_rss = time.time(), step, 0, [], 0, None
        stopped = None
        while step < total and not stopped:
            lr = get_lr(step, cfg, total)
            r = train_step(run, model, params, opt, micro_batches(train_ex, step, run), step, lr, stop.requested is not None)
            loss, gnorm, skipped, stop_vote = r.loss, r.grad_norm, r.skipped, r.stop_vote
            tokens, max_micro = tokens + r.tokens, max(max_micro, r.max_micro)
            step += 1
            losses.append(loss)
            elapsed = time.time() - t0
            tok_s, peak = tokens * run.world / elapsed, peak_memory(run.device)
            metrics.record(step=step, loss=loss, lr=lr, grad_norm=gnorm, tokens=tokens * run.world, tok_s=tok_s,
                           elapsed=elapsed, peak_mem=peak, **(dict(skipped=True) if skipped else {}))
            if step % cfg.log_every == 0 or step == total or skipped:
                eta = elapsed / (step - first) * (total - step)
                run.log(f"step {step}/{total} | loss {loss:.4f} | lr {lr:.2e} | {tok_s:.1f} tok/s | "
                        f"ETA {eta / 60:.1f} min | peak mem {peak / 2**30:.2f} GB"
                        + (f" | update skipped (fp16 overflow; loss scale now {run.scaler.get_scale():g})" if skipped else ""))
            if cfg.eval_every and step % cfg.eval_every == 0 and step < total and eval_batches:
                ev, _ = evaluate(model, eval_batches, run)
                metrics.record(step=step, eval_loss=ev, eval_ppl=math.exp(ev))
                run.log(f"eval at step {step}: loss {ev:.4f}, ppl {math.exp(ev):.2f}")
                if gen_items:
                    acc = accuracy(model, tok, gen_items, cfg)
                    metrics.record(step=step, accuracy=acc["accuracy"], right=acc["right"], n=acc["n"])
                    run.log(f"answers at step {step}: {describe_accuracy(acc)}")
            if cfg.save_every and step % cfg.save_every == 0 and step < total:
                save(run, model, opt, step)
            if stop_vote or (cfg.stop_after and step >= cfg.stop_after):
                stopped = stop.requested or ("a signal to another rank" if stop_vote else "--stop-after")
        train_time = time.time() - t0
        if flat and step > first:   # after the last step, when the caches have grown to their size
            allocator.release_freed_memory(force=True)
            runtime_rss = runtime_bytes(model, opt)
        summary = dict(steps=step, total_steps=total, interrupted=step < total, final_loss=losses[-1] if losses else None,
                       losses=losses, eval_loss_before=eval_before, tokens_per_s=tokens * run.world / max(train_time, 1e-9),
                       train_time_s=train_time, peak_mem=peak_memory(run.device), load_peak_mem=info["load_peak_mem"],
                       device=str(run.device),
                       dtype=str(run.dtype).replace("torch.", ""), trainable=info["trainable"], total_params=info["total"],
                       memory=memory_breakdown(model, opt), runtime_rss=runtime_rss, out=str(run.out),
                       tokens_per_step=tokens * run.world / max(1, step - first), max_padded_tokens_per_micro_batch=max_micro,
                       **({"base_bytes_per_rank": info["base_bytes_per_rank"],
                           "peak_mem_per_rank": run.gather(peak_memory(run.device)),
                           "load_peak_mem_per_rank": run.gather(info["load_peak_mem"])} if cfg.fsdp else {}))
        if step < total:
            save(run, model, opt, step)
            run.log(f"stopped ({stopped}): checkpoint saved at step {step} in {run.out}; continue with the same "
                    "flags and --resume")
        else:
            finish(run, model, opt, summary, eval_batches, t_start, metrics, tok, gen_items, acc_before)
    finally:
        stop.restore()
        metrics.close()
    if run.world > 1:
        dist.barrier()
    return summary


def finish(run: Run, model, opt, summary: dict, eval_batches, t_start, metrics, tok, gen_items, acc_before):
    """After the last step: evaluate (loss, and answers with --eval-generate), save, write summary.json,
    say where everything is."""
    cfg, step = run.cfg, summary["steps"]
    ev, _ = evaluate(model, eval_batches, run)
    summary.update(eval_loss_after=ev, eval_ppl_after=math.exp(ev), total_time_s=time.time() - t_start)
    if gen_items:
        acc = accuracy(model, tok, gen_items, cfg)
        metrics.record(step=step, accuracy=acc["accuracy"], right=acc["right"], n=acc["n"])
        summary.update(accuracy_after={k: v for k, v in acc.items() if k != "answers"}, accuracy_before=acc_before and {
            k: v for k, v in acc_before.items() if k != "answers"})
        run.log(f"answers after training: {describe_accuracy(acc)}")
        if acc_before:
            paired = mcnemar(acc["correct"], acc_before["correct"])
            summary["accuracy_paired"] = paired
            run.log(f"  right only after training: {paired['a_only']}, only before: {paired['b_only']}; McNemar's "
                    f"exact test p = {paired['p']:.3g}{' (a real difference at 5%)' if paired['p'] < 0.05 else ''}")
        for q, j in zip(gen_items, range(3)):
            was = f" (before: {acc_before['answers'][j][:80]!r})" if acc_before else ""
            run.log(f"  Q {q.text[:80]!r}\n    reference {q.reference[:80]!r}\n    answer    {acc['answers'][j][:80]!r}{was}")
    save(run, model, opt, step)
    if run.rank == 0:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in summary.items()}
        atomic_write(run.out / "summary.json", json.dumps(clean, indent=2))
    before = f"{summary['eval_loss_before']:.4f} -> " if summary["eval_loss_before"] is not None else ""
    evals = (f"eval loss {before}{ev:.4f} (ppl {math.exp(ev):.2f})" if math.isfinite(ev)
             else "no eval split (--eval-examples 0)")
    run.log(f"done: {step} steps in {summary['train_time_s'] / 60:.1f} min; {evals}; adapter in {run.out}")
    if cfg.max_steps > 0 and run.device.type == "cpu":
        flags = ("--qlora " if cfg.qlora else "") + ("--dora " if cfg.dora else "") + (
            f"--init loftq --loftq-iters {cfg.loftq_iters} " if cfg.init == "loftq" else "")
        run.log(f"(a short run for a CPU; the full epoch on a GPU: python train.py {flags}"
                f"--max-steps -1 --seq-len 1024 --batch-size 8 --eval-every 50)")


def main(argv=None):
    cfg = parse_args(argv)
    code = 0
    try:
        summary = show(cfg) if cfg.show_example else train(cfg)
        code = 75 if summary.get("interrupted") else 0
    except Diverged as e:
        print(f"error: {e}", file=sys.stderr)
        code = 4
    except SaveFailed as e:
        print(f"error: {e}", file=sys.stderr)
        code = 74
    except (ValueError, FileNotFoundError, PermissionError) as e:
        print(f"error: {e}", file=sys.stderr)
        code = 2
    except torch.OutOfMemoryError as e:
        print(f"error: out of memory ({str(e).splitlines()[0]}); try --qlora, --grad-checkpoint, a smaller "
              "--batch-size (with --grad-accum to keep the batch) or a shorter --seq-len", file=sys.stderr)
        code = 3
    except KeyboardInterrupt:
        print("\nstopped at once (a second Ctrl-C), without a checkpoint", file=sys.stderr)
        code = 130
    finally:
        distributed = dist.is_initialized()
        if distributed:
            dist.destroy_process_group()
    if distributed:
        leave_without_finalizing(code)
    if code:
        sys.exit(code)


def leave_without_finalizing(code: int):
    """End a torchrun worker with os._exit, everything written and flushed, skipping the interpreter's
    finalization. gloo's worker threads free each finished collective themselves, and one launched in
    backward holds a Python object (autograd's context) that needs the GIL to be freed. If a thread gets
    there after finalization began, CPython ends it inside a C++ destructor and the process aborts
    ("terminate called without an active exception", SIGABRT: a finished run reported failed. Seen in
    CI; a core dump showed the main thread in Py_FinalizeEx and a pt_gloo_runloop thread freeing a
    barrier's prior all-reduce). Destroying the group would join those threads first, but DTensor's
    sharding cache keeps the device mesh, and with it the group, alive to the end."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
