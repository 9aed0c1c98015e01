"""
The audit: what LoRA and QLoRA really cost on your model and data, side by side, measured.

    python audit.py                                   # default model, generated task: ~25 min on a 2-core CPU (fp32)
    python audit.py --variants lora,qlora,qdora,loftq # + QDoRA (DoRA over NF4) and LoftQ's initialisation
    python audit.py --data default --max-steps 50     # AlpacaEval instead (loss and KL only: its answers are open)
    python audit.py --model path/to/hf_folder --data my.jsonl --eval-generate 200 --eval-metric numeric --out audit_mine
    python audit.py --estimate-only --preset Llama-2-7B --seq-len 512 --batch-size 1 --grad-checkpoint

Runs, with the same data, seed and hyperparameters (any train.py flag passes through):
  1. training with LoRA (16-bit base) and with QLoRA (NF4 base, paged 8-bit AdamW), each in its own
     process: peak memory with a breakdown, tokens/s, loss curves, eval loss before and after;
  2. the quantization damage alone: KL(16-bit base || NF4 base) and the eval-loss gap;
  3. the merge paths for the QLoRA adapter, (a) as trained ... (e) merged into 4-bit in place, and
     for LoRA the merged 16-bit model: eval loss, KL to the trained model, share of the effect kept;
  4. with --eval-generate N, accuracy: every variant (both bases, LoRA, QLoRA, each merge path) answers
     the same N held-out questions, scored by --eval-metric, with 95% intervals and McNemar's paired test;
  5. a memory estimator for models that do not fit here, checked against the measured peaks.
--variants adds DoRA (dora), QDoRA (qdora: DoRA over the NF4 base) and LoftQ (loftq: QLoRA started
from an SVD of the NF4 error, --loftq-iters), each trained the same way and measured like the others:
memory, speed, eval loss before and after, as trained, merged into the 16-bit base and requantized.
Without --data it uses the generated task of defaults.task_records (questions with one right answer,
which the default model gets wrong before training) and the flags in TASK_FLAGS; your flags win.
Writes OUT/report.md, OUT/report.json, OUT/answers.jsonl (every variant's answers) and OUT/*.png.
"""
import allocator

if __name__ == "__main__":   # before torch is imported: re-executes this command line with mimalloc, if installed
    allocator.preload()

import argparse
import json
import math
import subprocess
import sys
import time
from dataclasses import fields
from pathlib import Path

import torch

from data import IGNORE, encode_example, load_examples, load_tokenizer, prompt_format
from defaults import default_task_path
from lora import ALL_TARGETS, load_adapter, merge_lora
from formats import load_model, read_args
from merge import requantize_nf4
from model import ModelArgs
from optim import device_state_bytes
from score import mcnemar
from train import LMHeadLoss, TrainConfig, accuracy, describe_accuracy, generation_set, make_batch

GPU_SIZES_GB = (8, 12, 16, 24, 40, 80)
# Without --data: the generated task (defaults.task_records), with what it needs to be learned in a CPU
# budget and scored on enough held-out questions for a confidence interval of about +-6 points. Flags
# given on the command line come after these, so they win.
TASK_FLAGS = ["--max-steps", "100", "--batch-size", "8", "--lr", "1e-3", "--eval-examples", "270",
              "--eval-generate", "270", "--eval-metric", "exact", "--eval-max-new-tokens", "16"]
# Public configs of common models (config.json fields), for the estimator.
MODEL_PRESETS = {
    "Llama-2-7B": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=32, vocab_size=32000),
    "Llama-3-8B": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, vocab_size=128256),
    "Llama-2-13B": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                        num_key_value_heads=40, vocab_size=32000),
    "Llama-2-70B": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                        num_key_value_heads=8, vocab_size=32000),
    "SmolLM2-135M": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True),
    "Llama-3.2-1B": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
}


# ----------------------------------------------------------------------------------------------
# The memory estimator

def preset_args(name: str) -> ModelArgs:
    if name not in MODEL_PRESETS:
        raise ValueError(f"unknown preset {name!r}: choose one of {', '.join(MODEL_PRESETS)}")
    return ModelArgs.from_hf_config(dict(MODEL_PRESETS[name], model_type="llama"))


def linear_shapes(a: ModelArgs) -> dict:
    """(in, out) of each linear in one block."""
    q, kv = a.n_heads * a.head_dim, a.n_kv_heads * a.head_dim
    return dict(q_proj=(a.dim, q), k_proj=(a.dim, kv), v_proj=(a.dim, kv), o_proj=(q, a.dim),
                gate_proj=(a.dim, a.intermediate_size), up_proj=(a.dim, a.intermediate_size),
                down_proj=(a.intermediate_size, a.dim))


def nf4_bytes(n: int, block=64) -> int:
    """Bytes of one NF4 weight with double quantization, as nf4.py stores it."""
    blocks = -(-n // block)
    return -(-n // 2) + blocks + 4 * -(-blocks // 256) + 4


def saved_bytes_per_token_layer(a: ModelArgs, targets=ALL_TARGETS, rank: int = 8, b: int = 2,
                                packed: bool = False, dora: bool = False, fp32_attention: bool = False) -> int:
    """Bytes that autograd keeps per token in one block until backward, as model.py and lora.py save
    them (b = bytes per value of the compute dtype; fp32_attention: attention runs in fp32 whatever b is,
    as it does over segments on CPUs). tests/test_audit.py checks this against the
    tensors autograd really saves, in fp32 and bf16, with and without dropout, over 16-bit and NF4 bases."""
    shapes = linear_shapes(a)
    t = [n for n in shapes if n in targets]
    q, kv, inter = a.n_heads * a.head_dim, a.n_kv_heads * a.head_dim, a.intermediate_size
    norms = 2 * (a.dim * b + 4)                 # each RMSNorm keeps its input and 1/rms (fp32)
    ab = 4 if fp32_attention else b
    attn = (2 * q + 2 * kv) * ab + a.n_heads * 4  # q, k, v after RoPE, the attention output, its fp32 log-sum-exp
    mlp = 2 * inter * b                          # gate and up (SwiGLU recomputes the rest)
    # An adapter keeps its input (a frozen linear alone keeps nothing): the norm outputs feeding
    # q/k/v and gate/up, and down_proj's. o_proj's input is the attention output itself (a view),
    # except when a row holds several examples (packed; CPU micro-batches): attention then runs per
    # example and o_proj gets their concatenation, a second copy.
    inputs = a.dim * (any(n in t for n in ("q_proj", "k_proj", "v_proj")) + any(n in t for n in ("gate_proj", "up_proj")))
    inputs += q * ("o_proj" in t and packed) + inter * ("down_proj" in t)
    lora = len(t) * rank * b                     # each adapter's (tokens, r) product (its dropout mask is redrawn)
    if dora:   # the output, for the magnitude's gradient, where the next op does not keep it already (v, gate, up)
        kept = ("gate_proj", "up_proj") + (("v_proj",) if ab == b else ())   # attention keeps an fp32 copy of v
        lora += sum(shapes[n][1] for n in t if n not in kept) * b
    return norms + attn + mlp + inputs * b + lora


def estimate_memory(a: ModelArgs, mode: str, batch: int, seq: int, rank: int = 8, targets=ALL_TARGETS,
                    grad_checkpoint: bool = False, dtype_bytes: int = 2, paged_device: bool = False,
                    tokens: int | None = None, packed: bool = False, dora: bool = False, fsdp: int = 1,
                    cpu_offload: bool = False, fp32_attention: bool = False) -> dict:
    """Predicted peak bytes by kind for LoRA ('lora') or QLoRA ('qlora') training (DoRA: dora=True;
    LoftQ trains exactly as QLoRA does).

    Weights, adapters, gradients and optimizer states are counted exactly as this code stores them.
    Activations are what our backward keeps (saved_bytes_per_token_layer, or each block's input with
    checkpointing, plus one block recomputed); transient is the largest temporary on top of them:
    the lm_head loss chunk's fp32 logits, or a dequantized NF4 weight with a block's backward
    temporaries.
    tokens = real tokens in a micro-batch (default batch * seq); packed = rows hold several examples
    (train.py on CPU, or --pack); fp32_attention: attention in fp32 (train.py on CPU). paged_device: QLoRA's paged
    optimizer states live in host memory, not on the GPU. fsdp = N: per rank under --fsdp with N ranks
    (each holds 1/N of the blocks' weights, adapters, gradients and states, the embeddings, final norm and
    lm_head whole, and two blocks gathered whole: the one computing and the next, which FSDP2 prefetches);
    cpu_offload: the shards live in host memory, the GPU holds only what is gathered. Not counted: the
    runtime (Python and libraries, a CUDA context) and allocator slack; the audit measures the first on CPU."""
    b = dtype_bytes
    shapes = linear_shapes(a)
    lin = sum(i * o for i, o in shapes.values()) * a.n_layers
    other = a.vocab_size * a.dim * (1 if a.tie_embeddings else 2) + (2 * a.n_layers + 1) * a.dim
    if a.attention_bias:
        other += sum(o for n, (i, o) in shapes.items() if n in ("q_proj", "k_proj", "v_proj")) * a.n_layers
    if mode == "qlora":
        base = sum(nf4_bytes(i * o) for i, o in shapes.values()) * a.n_layers + other * b
    else:
        base = (lin + other) * b
    tensors = [(rank, i) for n, (i, o) in shapes.items() if n in targets] + \
              [(o, rank) for n, (i, o) in shapes.items() if n in targets]
    if dora:   # a magnitude per output row
        tensors += [(o, 1) for n, (i, o) in shapes.items() if n in targets]
    lora_params = sum(r * c for r, c in tensors) * a.n_layers
    adapters = grads = 4 * lora_params       # fp32 master weights and their gradients
    if mode == "qlora":   # 8-bit states in whole blocks, fp32 under 4096 elements; paged: two runs on the device
        numels = [n for _ in range(a.n_layers) for name, (i, o) in shapes.items() if name in targets
                  for n in (rank * i, o * rank) + ((o,) if dora else ())]   # the model's parameter order
        opt = device_state_bytes(numels, paged=paged_device)
    else:
        opt = 8 * lora_params + 4 * len(tensors) * a.n_layers   # AdamW: exp_avg, exp_avg_sq and a step tensor
    tokens = tokens or batch * seq
    layer = saved_bytes_per_token_layer(a, targets, rank, b, packed, dora, fp32_attention)
    # DoRA also keeps, per adapted layer and whatever the tokens, its row norm (fp32)
    fixed = sum(o for n, (i, o) in shapes.items() if n in targets) * 4 if dora else 0
    act = tokens * a.n_layers * (a.dim * b if grad_checkpoint else layer) + (0 if grad_checkpoint else a.n_layers * fixed)
    if grad_checkpoint:   # one block's activations exist again while it is recomputed for backward
        act += tokens * layer + fixed
    # Once per token: RoPE's cos and sin, the loss's dL/dh and the int64 positions it gathers (one per
    # target token; every token is counted as one, a small overestimate). (The final norm keeps
    # its input as every block's norms do, and the first block's attention norm keeps nothing: the
    # embeddings need no gradient. The two cancel. Without q/k/v adapters the first block keeps no
    # attention tensors either; we count them anyway, an overestimate of less than one block.)
    act += tokens * (2 * a.head_dim * b + a.dim * b + 8)
    chunk = min(tokens, LMHeadLoss.CHUNK)
    lm_head = chunk * a.vocab_size * (4 + (b if b != 4 else 0))   # one chunk's fp32 logits (+ the matmul's output)
    # a dequantized NF4 weight in a block's backward; DoRA's row norm needs a dense fp32 copy (in forward)
    widest = max(i * o for i, o in shapes.values())
    block = tokens * 4 * a.intermediate_size * b + max(widest * b if mode == "qlora" else 0, widest * 4 if dora else 0)
    out = dict(base_weights=int(base), adapters=int(adapters), gradients=int(grads), optimizer_states=int(opt),
               activations=int(act), transient=int(max(lm_head, block)))
    if fsdp > 1 or cpu_offload:
        root = (a.vocab_size * a.dim * (1 if a.tie_embeddings else 2) + a.dim) * b   # not sharded
        share = 0 if cpu_offload else 1 / fsdp
        per_block = (base - root + 2 * adapters) / a.n_layers   # a block's base, adapters and their gradients
        out = dict(out, base_weights=int(root + (base - root) * share), adapters=int(adapters * share),
                   gradients=int(grads * share), optimizer_states=int(opt * share), gathered_blocks=int(2 * per_block))
    out["total"] = sum(out.values())
    return out


# ----------------------------------------------------------------------------------------------
# Evaluating a model on the eval split: loss, and log-probs at target positions for KL

@torch.no_grad()
def eval_model(model, batches, keep_logprobs: int = 0):
    """Token-mean eval loss over train.Batch micro-batches; with keep_logprobs > 0, the log-probs at the
    first that many target tokens (the same tokens for every model, as the batches are the same)."""
    model.eval()
    total, n, kept = 0.0, 0, []
    for b in batches:
        h = model.hidden(b.ids, b.seg)
        h = h.reshape(-1, h.shape[-1]).index_select(0, b.where)
        total += LMHeadLoss.apply(h, model.lm_head.weight, b.targets).item()
        n += len(h)
        if sum(len(k) for k in kept) < keep_logprobs:
            kept.append((h @ model.lm_head.weight.T).float().log_softmax(-1)[:keep_logprobs])
    lp = torch.cat(kept)[:keep_logprobs] if kept else None
    return total / n, lp


def kl(p_log, q_log) -> float:
    n = min(len(p_log), len(q_log))
    return (p_log[:n].exp() * (p_log[:n] - q_log[:n])).sum(-1).mean().item()


def estimate_for_run(args: ModelArgs, cfg, mode: str, r: dict, dora: bool = False) -> dict:
    """The estimate for a training run as it ran (its summary.json): its largest micro-batch counted
    with padding (right-padded GPU rows compute on every position), its dtype and device."""
    on_gpu = r["device"].startswith("cuda")
    e = estimate_memory(args, mode, cfg.batch_size, cfg.seq_len, cfg.rank, cfg.targets.split(","), cfg.grad_checkpoint,
                        4 if r["dtype"] == "float32" else 2, tokens=r["max_padded_tokens_per_micro_batch"],
                        packed=cfg.pack or (not on_gpu and cfg.batch_size > 1), fp32_attention=not on_gpu,
                        paged_device=on_gpu and (cfg.optim or "paged").startswith("paged") and mode == "qlora", dora=dora)
    runtime = 0 if on_gpu else (r["runtime_rss"] or 0)   # CUDA's max_memory_allocated counts tensors only
    return dict(e, runtime=runtime, predicted_peak=e["total"] + runtime, measured_peak=r["peak_mem"],
                error=(e["total"] + runtime) / r["peak_mem"] - 1)


# ----------------------------------------------------------------------------------------------

# The trained variants --variants chooses from: train.py's flags and the report's name for each.
TRAINED = {"lora": ([], "LoRA"), "qlora": (["--qlora"], "QLoRA"), "dora": (["--dora"], "DoRA"),
           "qdora": (["--qlora", "--dora"], "QDoRA"), "loftq": (["--qlora", "--init", "loftq"], "LoftQ")}


def is_nf4(mode: str) -> bool:
    return "--qlora" in TRAINED[mode][0]


def run_training(mode, out_dir, passthrough, log):
    """train.py in its own process, so each mode's peak memory is its own."""
    cmd = [sys.executable, str(Path(__file__).parent / "train.py"), "--out", str(out_dir), "--overwrite"]
    cmd += TRAINED[mode][0] + passthrough
    log(f"[{mode}] {' '.join(cmd[1:])}")
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in p.stdout:
        log(f"[{mode}] {line.rstrip()}")
    if p.wait() != 0:
        raise RuntimeError(f"training ({mode}) failed with exit code {p.returncode}; see the lines above")
    summary = json.loads((out_dir / "summary.json").read_text())
    summary["metrics"] = [json.loads(l) for l in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return summary


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="audit", help="report folder (default: audit)")
    p.add_argument("--estimate-only", action="store_true", help="only print the memory estimate (no training)")
    p.add_argument("--preset", choices=list(MODEL_PRESETS), help="model for --estimate-only (or --config)")
    p.add_argument("--config", help="a config.json for --estimate-only")
    p.add_argument("--fsdp", type=int, default=1, metavar="N",
                   help="--estimate-only: per rank when train.py --fsdp shards the blocks over N ranks")
    p.add_argument("--cpu-offload", action="store_true",
                   help="--estimate-only with --fsdp: the shards in host memory, only the gathered blocks on the GPU")
    p.add_argument("--kl-tokens", type=int, default=2048, help="target tokens over which KL is measured")
    p.add_argument("--variants", default="lora,qlora",
                   help="what to train and compare, from " + ", ".join(f"{k} ({v[1]}: train.py {' '.join(v[0]) or 'alone'})"
                                                               for k, v in TRAINED.items())
                   + "; lora and qlora always (default: lora,qlora)")
    a, passthrough = p.parse_known_args(argv)
    known = {"--" + f.name.replace("_", "-") for f in fields(TrainConfig)}
    bad = [x for x in passthrough if x.startswith("--") and x.split("=")[0] not in known]
    reserved = ("--out", "--qlora", "--resume", "--dora", "--init")
    if bad or any(x.split("=")[0] in reserved for x in passthrough):
        p.error(f"unknown or reserved flags: {bad or '/'.join(reserved)} (train.py's flags pass through; "
                "--variants chooses LoRA, QLoRA, DoRA, QDoRA, LoftQ)")
    variants = [v.strip() for v in a.variants.split(",") if v.strip()]
    if any(v not in TRAINED for v in variants) or not {"lora", "qlora"} <= set(variants):
        p.error(f"--variants {a.variants!r}: choose from {', '.join(TRAINED)}, with lora and qlora among them "
                "(the report compares every variant with both)")
    variants = list(dict.fromkeys(["lora", "qlora"] + variants))
    if not a.estimate_only and not any(x.split("=")[0] == "--data" for x in passthrough):
        passthrough = ["--data", str(default_task_path())] + TASK_FLAGS + passthrough
    from train import parse_args
    cfg = parse_args(passthrough)

    if a.estimate_only:
        args = preset_args(a.preset) if a.preset else ModelArgs.from_hf_config(json.loads(Path(a.config).read_text()))
        for mode in ("lora", "qlora"):
            e = estimate_memory(args, mode, cfg.batch_size, cfg.seq_len, cfg.rank, cfg.targets.split(","),
                                cfg.grad_checkpoint, 2, paged_device=True, packed=cfg.pack, fsdp=a.fsdp,
                                cpu_offload=a.cpu_offload)
            print(f"{mode:6s} " + ", ".join(f"{k} {v / 2**30:.2f} GB" for k, v in e.items())
                  + (f" (per rank of {a.fsdp})" if a.fsdp > 1 else ""))
        return

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    logf = open(out / "audit.log", "w")

    def log(msg):
        line = f"[{(time.time() - t0) / 60:5.1f} min] {msg}"
        print(line, flush=True)
        logf.write(line + "\n")

    # 1. training, each mode in its own process
    # (--eval-generate 0 for them: the audit scores every variant itself, the trained ones included)
    runs = {m: run_training(m, out / m, passthrough + ["--eval-generate", "0"], log) for m in variants}

    # 2-3. quantization damage and merge paths, all on the same eval split
    dtype = torch.float32 if not torch.cuda.is_available() else torch.bfloat16
    tok = load_tokenizer(cfg.model)
    fmt = prompt_format(tok, cfg.prompt_format or None)
    _, eval_convs = load_examples(cfg.data, cfg.eval_examples, seed=0)
    ex = [encode_example(tok, fmt, c, cfg.seq_len) for c in eval_convs]
    ex = [(i, t) for i, t, _ in ex if any(x != IGNORE for x in t)]
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    batches = [make_batch(ex[i:i + cfg.batch_size], cfg, dev, flat=dev == "cpu") for i in range(0, len(ex), cfg.batch_size)]
    K = a.kl_tokens
    res, answers = {}, {}
    gen_items = generation_set(cfg, tok) if cfg.eval_generate else []

    def measure(name, model, ref=None):
        loss, lp = eval_model(model, batches, K)
        res[name] = dict(eval_loss=loss, ppl=math.exp(loss), kl_to_trained=kl(ref, lp) if ref is not None else 0.0,
                         model_bytes=sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers())))
        msg = f"{name}: eval loss {loss:.4f}" + (f", KL to as-trained {res[name]['kl_to_trained']:.2e}" if ref is not None else "")
        if gen_items:
            acc = accuracy(model, tok, gen_items, cfg)
            answers[name] = acc.pop("answers")
            res[name]["accuracy"] = acc
            msg += f"; answers {describe_accuracy(acc)}"
        log(msg)
        return lp

    qad, lad = str(out / "qlora"), str(out / "lora")
    m16 = load_model(cfg.model, dtype)
    lp16 = measure("base_16bit", m16)
    load_adapter(m16, lad)
    lp_lora = measure("lora_as_trained", m16)
    merge_lora(m16, unwrap=True)
    measure("lora_merged_16bit", m16, lp_lora)
    del m16
    m4 = load_model(cfg.model, dtype, quantize="nf4")
    lp4 = measure("base_nf4", m4)
    load_adapter(m4, qad)
    lp_a = measure("a_nf4_plus_adapter", m4)
    merge_lora(m4, on_nf4="dequantize", unwrap=True)
    measure("d_merged_into_dequantized_nf4", m4, lp_a)
    requantize_nf4(m4)
    measure("e_d_requantized_nf4", m4, lp_a)
    del m4
    mb = load_model(cfg.model, dtype)
    load_adapter(mb, qad)
    merge_lora(mb, unwrap=True)
    measure("b_merged_into_16bit_base", mb, lp_a)
    requantize_nf4(mb)
    measure("c_b_requantized_nf4", mb, lp_a)
    del mb
    # DoRA, QDoRA, LoftQ: as trained, merged into the 16-bit base (for LoftQ its adapted layers get the NF4
    # codes it was trained over, dequantized: load_adapter does that), and that requantized
    for v in variants[2:]:
        mv = load_model(cfg.model, dtype, quantize="nf4" if is_nf4(v) else None)
        load_adapter(mv, str(out / v))
        lp_v = measure(f"{v}_as_trained", mv)
        del mv
        mb = load_model(cfg.model, dtype)
        load_adapter(mb, str(out / v))
        merge_lora(mb, unwrap=True)
        measure(f"{v}_merged_16bit", mb, lp_v)
        if is_nf4(v):
            requantize_nf4(mb)
            measure(f"{v}_merged_nf4", mb, lp_v)
        del mb
    damage = dict(kl_16bit_to_nf4=kl(lp16, lp4), eval_loss_gap=res["base_nf4"]["eval_loss"] - res["base_16bit"]["eval_loss"])
    log(f"quantization damage: KL(16-bit || NF4) {damage['kl_16bit_to_nf4']:.4f} nats/token, "
        f"eval loss +{damage['eval_loss_gap']:.4f}")
    effect = res["base_nf4"]["eval_loss"] - res["a_nf4_plus_adapter"]["eval_loss"]
    start = {"a_nf4_plus_adapter": "base_nf4", "b_merged_into_16bit_base": "base_16bit", "c_b_requantized_nf4": "base_nf4",
             "d_merged_into_dequantized_nf4": "base_nf4", "e_d_requantized_nf4": "base_nf4"}
    for k, b in start.items():
        res[k]["effect_kept"] = (res[b]["eval_loss"] - res[k]["eval_loss"]) / effect if effect else float("nan")
    for v in variants[2:]:   # the same measure for DoRA, QDoRA, LoftQ, against their own as-trained effect
        b0 = "base_nf4" if is_nf4(v) else "base_16bit"
        ev = res[b0]["eval_loss"] - res[f"{v}_as_trained"]["eval_loss"]
        for k, b in (("as_trained", b0), ("merged_16bit", "base_16bit"), ("merged_nf4", "base_nf4")):
            if f"{v}_{k}" in res:
                res[f"{v}_{k}"]["effect_kept"] = (res[b]["eval_loss"] - res[f"{v}_{k}"]["eval_loss"]) / ev if ev else float("nan")
    le = res["base_16bit"]["eval_loss"] - res["lora_as_trained"]["eval_loss"]
    res["lora_merged_16bit"]["effect_kept"] = (res["base_16bit"]["eval_loss"] - res["lora_merged_16bit"]["eval_loss"]) / le

    # Paired comparisons on the same questions: QLoRA against LoRA, each merge path against (a), training against none
    pairs = {}
    if gen_items:
        extra = [(f"{v}_{k}", y) for v in variants[2:] for k, y in
                 (("as_trained", "a_nf4_plus_adapter"), ("as_trained", "lora_as_trained"), ("merged_16bit", f"{v}_as_trained"),
                  ("merged_nf4", f"{v}_as_trained")) if f"{v}_{k}" in res]
        for x, y in (("a_nf4_plus_adapter", "lora_as_trained"), ("b_merged_into_16bit_base", "a_nf4_plus_adapter"),
                     ("c_b_requantized_nf4", "a_nf4_plus_adapter"), ("d_merged_into_dequantized_nf4", "a_nf4_plus_adapter"),
                     ("e_d_requantized_nf4", "a_nf4_plus_adapter"), ("lora_merged_16bit", "lora_as_trained"),
                     ("lora_as_trained", "base_16bit"), ("a_nf4_plus_adapter", "base_nf4"), ("base_nf4", "base_16bit"), *extra):
            pairs[f"{x} vs {y}"] = dict(mcnemar(res[x]["accuracy"]["correct"], res[y]["accuracy"]["correct"]), a=x, b=y)
        q = pairs["a_nf4_plus_adapter vs lora_as_trained"]
        log(f"QLoRA vs LoRA on the same {len(gen_items)} questions: right only with QLoRA {q['a_only']}, only with "
            f"LoRA {q['b_only']}; McNemar's exact test p = {q['p']:.3g}")
        with open(out / "answers.jsonl", "w") as f:   # every answer of every variant, for a person to read
            for j, q in enumerate(gen_items):
                f.write(json.dumps(dict(question=q.text, reference=q.reference, **{k: dict(answer=v[j], right=res[k]["accuracy"]["correct"][j])
                                                                              for k, v in answers.items()})) + "\n")

    # 4. the estimator, checked against the measured peaks (CPU: peak RSS = runtime + tensors)
    args = read_args(cfg.model)
    est = {m: estimate_for_run(args, cfg, "qlora" if is_nf4(m) else "lora", runs[m], dora="--dora" in TRAINED[m][0])
           for m in variants}
    for m in variants:
        r = runs[m]
        log(f"estimator {m}: predicted {est[m]['predicted_peak'] / 2**30:.2f} GB vs measured {r['peak_mem'] / 2**30:.2f} GB "
            f"({100 * est[m]['error']:+.0f}%)")
    big = {}
    for name in ("Llama-3.2-1B", "Llama-2-7B", "Llama-3-8B", "Llama-2-13B", "Llama-2-70B"):
        pa = preset_args(name)
        big[name] = {m: estimate_memory(pa, m, 1, 512, cfg.rank, cfg.targets.split(","), True, 2, paged_device=True)
                     for m in ("lora", "qlora")}
        big[name]["params"] = sum(i * o for i, o in linear_shapes(pa).values()) * pa.n_layers + pa.vocab_size * pa.dim * (1 if pa.tie_embeddings else 2)

    # Llama-2-7B under the settings the quoted "16-24 GB LoRA / 8-10 GB QLoRA" figures come from
    pa = preset_args("Llama-2-7B")
    scenarios = {f"batch {bs}, seq {sl}, {'checkpointing' if ck else 'no checkpointing'}":
                 {m: estimate_memory(pa, m, bs, sl, cfg.rank, cfg.targets.split(","), ck, 2, paged_device=True)
                  for m in ("lora", "qlora")}
                 for bs, sl, ck in ((1, 512, True), (1, 512, False), (4, 512, False), (8, 1024, True))}

    report = dict(config={k: v for k, v in vars(cfg).items()}, training={m: {k: v for k, v in r.items() if k != "metrics"}
                  for m, r in runs.items()}, quantization_damage=damage, paths=res, paired=pairs, estimator=est, estimates_large=big,
                  llama2_7b_scenarios=scenarios, time_min=(time.time() - t0) / 60)
    (out / "report.json").write_text(json.dumps(report, indent=2))
    plots(runs, est, big, out, log, res)
    (out / "report.md").write_text(render_report(report))
    log(f"wrote {out}/report.md, report.json and plots in {(time.time() - t0) / 60:.1f} min")


# ----------------------------------------------------------------------------------------------
# Plots and the report

# Every scored variant, in the report's order, with the short name the plot and the tables use.
VARIANTS = {"base_16bit": "16-bit base", "base_nf4": "NF4 base", "lora_as_trained": "LoRA",
            "lora_merged_16bit": "LoRA merged", "a_nf4_plus_adapter": "QLoRA (a)", "b_merged_into_16bit_base": "(b)",
            "c_b_requantized_nf4": "(c)", "d_merged_into_dequantized_nf4": "(d)", "e_d_requantized_nf4": "(e)"}
NF4_VARIANTS = {"base_nf4", "a_nf4_plus_adapter", "c_b_requantized_nf4", "e_d_requantized_nf4"}   # the rest: 16-bit weights
# The paths of DoRA, QDoRA and LoftQ (with --variants): "{mode}_{path}"
EXTRA_PATHS = {"as_trained": "{}", "merged_16bit": "{} merged", "merged_nf4": "{} merged→NF4"}
AS_TRAINED = {"lora": "lora_as_trained", "qlora": "a_nf4_plus_adapter"}   # else f"{mode}_as_trained"


def variant_names(paths) -> dict:
    """Every scored variant in `paths` (a report's), in the report's order, with its short name."""
    out = dict(VARIANTS)
    for mode, (_, label) in TRAINED.items():
        if mode not in AS_TRAINED:
            out.update({f"{mode}_{k}": v.format(label) for k, v in EXTRA_PATHS.items() if f"{mode}_{k}" in paths})
    return out


def nf4_weights(name: str) -> bool:
    if name in NF4_VARIANTS or name.endswith("_merged_nf4"):
        return True
    mode = name.removesuffix("_as_trained")
    return mode != name and mode in TRAINED and is_nf4(mode)


def as_trained(mode: str) -> str:
    return AS_TRAINED.get(mode, f"{mode}_as_trained")


def spread(ys, gap):
    """Label heights near ys (sorted) at least `gap` apart, so that labels of nearby points do not overlap."""
    out = []
    for y in ys:
        out.append(max(y, out[-1] + gap) if out else y)
    shift = (sum(ys) - sum(out)) / len(out)   # re-centre the column on the points
    return [y + shift for y in out]


def accuracy_plot(plt, runs, res, out):
    """Accuracy (95% Wilson intervals) against memory: the trained models against their training peak,
    and every variant against the bytes its weights take; the dashed line joins the variants that no other
    beats on both (the Pareto front: less memory and more right answers)."""
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.5), gridspec_kw=dict(width_ratios=[1, 1.6]))

    def point(ax, x, acc, color, label=None):
        lo, hi = acc["ci95"]
        y = 100 * acc["accuracy"]
        ax.errorbar([x], [y], yerr=[[y - 100 * lo], [100 * hi - y]], fmt="o", color=color, capsize=3, label=label)
        return y
    for j, m in enumerate(runs):
        x = runs[m]["peak_mem"] / 2**30
        y = point(ax1, x, res[as_trained(m)]["accuracy"], f"C{j}")
        ax1.annotate(TRAINED[m][1], (x, y), textcoords="offset points", xytext=(8, 8 - 16 * (j % 2)), va="center")
    lo_x = min(r["peak_mem"] for r in runs.values()) / 2**30
    hi_x = max(r["peak_mem"] for r in runs.values()) / 2**30
    ax1.set_xlim(lo_x - 0.3 * (hi_x - lo_x) - 0.05, hi_x + 0.5 * (hi_x - lo_x) + 0.05)
    ax1.set_xlabel("training peak memory (GB)"), ax1.set_ylabel("held-out answers right (%)")
    ax1.set_title("Trained: accuracy vs training peak")

    label = variant_names(res)
    names = [k for k in label if "accuracy" in res.get(k, {})]
    pts = {k: (res[k]["model_bytes"] / 2**30, 100 * res[k]["accuracy"]["accuracy"]) for k in names}
    for k in names:
        point(ax2, pts[k][0], res[k]["accuracy"], "C1" if nf4_weights(k) else "C0")
    front = sorted((k for k in names if not any(pts[o][0] <= pts[k][0] and pts[o][1] >= pts[k][1] and pts[o] != pts[k]
                                                for o in names)), key=lambda k: pts[k][0])
    ax2.plot([pts[k][0] for k in front], [pts[k][1] for k in front], "ko--", lw=0.8, ms=12, mfc="none",
             label="Pareto front: nothing beats it on both")
    ax2.plot([], [], "o", color="C0", label="16-bit weights"), ax2.plot([], [], "o", color="C1", label="NF4 weights")
    # Variants of (nearly) the same size sit on one vertical line: their labels go in a column to its right.
    xs = sorted(x for x, _ in pts.values())
    width = max(xs[-1] - xs[0], 0.2 * xs[-1])
    groups = []
    for k in sorted(names, key=lambda k: pts[k][0]):
        if groups and pts[k][0] - pts[groups[-1][0]][0] < 0.05 * width:
            groups[-1].append(k)
        else:
            groups.append([k])
    ymin, ymax = ax2.get_ylim()
    gap, placed = 0.07 * (ymax - ymin), []
    for group in groups:
        group.sort(key=lambda k: pts[k][1])
        gx = max(pts[k][0] for k in group)
        for k, ly in zip(group, spread([pts[k][1] for k in group], gap)):
            ax2.annotate(f"{label[k]} {pts[k][1]:.1f}%", pts[k], xytext=(gx + 0.08 * width, ly), fontsize=8,
                         va="center", arrowprops=dict(arrowstyle="-", lw=0.4, color="grey"),
                         bbox=dict(boxstyle="square,pad=0.1", fc="white", ec="none", alpha=0.8))   # readable over the front
            placed.append(ly)
    ax2.set_ylim(min(ymin, min(placed) - gap), max(ymax, max(placed) + gap))
    ax2.set_xlim(max(0, xs[0] - 0.15 * width), xs[-1] + 0.45 * width)
    ax2.set_xlabel("model weights in memory (GB, as loaded here)")
    ax2.set_title("Every variant: accuracy vs weight memory")
    ax2.legend(fontsize=8, loc="best")
    fig.tight_layout(), fig.savefig(out / "accuracy.png", dpi=110), plt.close(fig)


def plots(runs, est, big, out, log, res):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib is not installed: no plots (pip install matplotlib)")
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    for j, (m, r) in enumerate(runs.items()):
        pts = [(x["step"], x["loss"]) for x in r["metrics"] if "loss" in x]
        ax.plot(*zip(*pts), color=f"C{j}", label=f"{TRAINED[m][1]} train loss", alpha=0.6)
        # eval points: before and at --eval-every from metrics.jsonl, after training from the summary
        ev = [(x["step"], x["eval_loss"]) for x in r["metrics"] if "eval_loss" in x] + [(r["steps"], r["eval_loss_after"])]
        ax.plot(*zip(*ev), "o--" if len(ev) > 2 else "o", color=f"C{j}", lw=2, label=f"{TRAINED[m][1]} eval loss")   # no line from 2 points
    ax.set_xlabel("step"), ax.set_ylabel("loss"), ax.legend(fontsize=8)
    ax.set_title("Loss: " + " vs ".join(TRAINED[m][1] for m in runs))
    fig.tight_layout(), fig.savefig(out / "loss.png", dpi=110), plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4))
    kinds = ["runtime", "base_weights", "adapters", "gradients", "optimizer_states", "activations", "transient"]
    for j, m in enumerate(runs):
        bottom = 0
        for k in kinds:
            v = est[m][k] / 2**30
            ax.bar(j, v, bottom=bottom, color=f"C{kinds.index(k)}", label=k if j == 0 else None)
            bottom += v
        ax.plot([j - 0.4, j + 0.4], [est[m]["measured_peak"] / 2**30] * 2, "k-", lw=2,
                label="measured peak" if j == 0 else None)
    ax.set_xticks(range(len(runs)), [TRAINED[m][1] for m in runs]), ax.set_ylabel("GB")
    ax.set_xlim(-0.6, len(runs) + 0.6)   # room for the legend
    ax.legend(fontsize=8, loc="upper right")
    ax.set_title("Memory breakdown (estimated parts, measured peak)")
    fig.tight_layout(), fig.savefig(out / "memory.png", dpi=110), plt.close(fig)

    fig, ax = plt.subplots(figsize=(8, 4.5))
    names = list(big)
    xs = [big[n]["params"] / 1e9 for n in names]
    for m, label in (("lora", "LoRA"), ("qlora", "QLoRA")):
        ys = [big[n][m]["total"] / 2**30 for n in names]
        ax.plot(xs, ys, "o-", label=label)
        for i, (n, x, y) in enumerate(zip(names, xs, ys)):
            if m == "qlora":   # its size below the point
                ax.annotate(f"{y:.1f} GB", (x, y), textcoords="offset points", fontsize=7, xytext=(0, -11), ha="center")
            else:   # the model's name above the point, or left of it for every other one: neighbours (7B, 8B) are close
                ax.annotate(n, (x, y), textcoords="offset points", fontsize=7, xytext=(-7, 0) if i % 2 else (0, 7),
                            ha="right" if i % 2 else "center", va="center" if i % 2 else "bottom")
    for g in GPU_SIZES_GB:
        ax.axhline(g, color="grey", lw=0.5, ls=":")
        ax.text(xs[0] * 0.8, g, f"{g} GB GPU", va="bottom", fontsize=7, color="grey")
    # Log axes with plain labels: matplotlib's default minor labels on a short log axis overlap ("3x10^0 4x10^0").
    ax.set_xscale("log"), ax.set_yscale("log"), ax.minorticks_off()
    ax.set_ylim(top=ax.get_ylim()[1] * 1.6)   # room for the top point's name
    ax.set_xticks(xs, [f"{x:.0f}B" if x >= 5 else f"{x:.1f}B" for x in xs])
    ticks = [t for t in (0.5, 1, 2, 4, 8, 16, 32, 64, 128, 256) if ax.get_ylim()[0] <= t <= ax.get_ylim()[1]]
    ax.set_yticks(ticks, [f"{t:g}" for t in ticks])
    ax.set_xlim(xs[0] * 0.7, xs[-1] * 1.3)
    ax.set_xlabel("parameters"), ax.set_ylabel("predicted peak GB")
    ax.set_title("Predicted training memory (r=8, seq 512, batch 1, checkpointing, bf16)")
    ax.legend(), fig.tight_layout(), fig.savefig(out / "estimate.png", dpi=110), plt.close(fig)
    if "accuracy" in res["base_16bit"]:
        accuracy_plot(plt, runs, res, out)


def render_report(r) -> str:
    L, Q = r["training"]["lora"], r["training"]["qlora"]
    gb = lambda b: f"{b / 2**30:.2f} GB"
    P, D = r["paths"], r["quantization_damage"]
    best = min((k for k in VARIANTS if k[:2] in ("a_", "b_", "c_", "d_", "e_")), key=lambda k: P[k]["eval_loss"])
    lines = [
        "# Audit: " + " vs ".join(TRAINED[m][1] for m in r["training"]), "",
        f"Model `{r['config']['model']}`, data `{r['config']['data']}`, {L['steps']} steps, batch {r['config']['batch_size']}, "
        f"seq ≤ {r['config']['seq_len']}, r={r['config']['rank']}, α={r['config']['alpha']}, on {L['device']} ({L['dtype']}). "
        f"Audit time {r['time_min']:.1f} min.", "",
        "## Training", "", *training_table(r), "", "![loss](loss.png)", "",
        "## Quantization damage alone (before training)", "",
        f"KL(16-bit base ‖ NF4 base) = {D['kl_16bit_to_nf4']:.4f} nats/token; eval loss {P['base_16bit']['eval_loss']:.4f} → "
        f"{P['base_nf4']['eval_loss']:.4f} ({D['eval_loss_gap']:+.4f}).", "",
        "## Merge paths", "",
        "| path | eval loss | KL to as-trained | effect kept | answers right |", "|---|---|---|---|---|"]
    for k, label in (("a_nf4_plus_adapter", "(a) NF4 base + adapter, as trained"),
                     ("b_merged_into_16bit_base", "(b) merged into the reloaded 16-bit base"),
                     ("c_b_requantized_nf4", "(c) (b) requantized to NF4"),
                     ("d_merged_into_dequantized_nf4", "(d) merged into dequantized NF4, kept 16-bit"),
                     ("e_d_requantized_nf4", "(e) (d) requantized: merging into 4-bit in place"),
                     ("lora_merged_16bit", "LoRA merged into its 16-bit base"), *extra_paths(P)):
        x = P[k]
        lines.append(f"| {label} | {x['eval_loss']:.4f} | {x['kl_to_trained']:.2e} | {100 * x['effect_kept']:.0f}% | "
                     f"{pct(x['accuracy']) if 'accuracy' in x else '-'} |")
    lines += ["", "Effect kept = how far the path moved the eval loss from its own untrained base, as a share of what "
              "training moved it ((a) against the NF4 base; (b) against the 16-bit base)." + (
                  " LoftQ merged: its adapted layers get the NF4 codes it was trained over, dequantized (merging into the "
                  "original W would count the NF4 error twice: in W, and in the adapter that starts by undoing it)."
                  if "loftq_merged_16bit" in P else ""), ""]
    lines += accuracy_section(r)
    lines += ["## Memory estimator", "",
              "| | runtime (measured) | weights | adapters + grads + optimizer | activations | transient | "
              "predicted | measured | error |", "|---|---|---|---|---|---|---|---|---|"]
    for m, e in r["estimator"].items():
        lines.append(f"| {TRAINED[m][1]} | {gb(e['runtime'])} | {gb(e['base_weights'])} | "
                     f"{gb(e['adapters'] + e['gradients'] + e['optimizer_states'])} | {gb(e['activations'])} | "
                     f"{gb(e['transient'])} | {gb(e['predicted_peak'])} | {gb(e['measured_peak'])} | {100 * e['error']:+.0f}% |")
    lines += ["", "Predicted = the runtime (on CPU: resident memory between steps less the live tensors; on CUDA "
              "0, as max_memory_allocated counts tensors only) + the tensors the estimator counts for the largest "
              "micro-batch: activations are exactly what autograd keeps (a test sums them), transient the largest "
              "temporary on top (the loss chunk's logits or a block's backward)."]
    lines += ["", "![memory](memory.png)", "",
              "Predicted for larger models (r=8, seq 512, batch 1, checkpointing, bf16, paged optimizer on the host):", "",
              "| model | LoRA | QLoRA |", "|---|---|---|"]
    for n, x in r["estimates_large"].items():
        lines.append(f"| {n} | {gb(x['lora']['total'])} | {gb(x['qlora']['total'])} |")
    lines += ["", "![estimate](estimate.png)", "",
              "Llama-2-7B (r as above, bf16, paged optimizer states on the host) beside the commonly quoted figures:", "",
              "| setting | LoRA | QLoRA |", "|---|---|---|"]
    sc = r["llama2_7b_scenarios"]
    for k, x in sc.items():
        lines.append(f"| {k} | {gb(x['lora']['total'])} | {gb(x['qlora']['total'])} |")
    act = [gb(x["lora"]["activations"]) for x in sc.values()]
    first = next(iter(sc.values()))
    lines += ["| quoted (\"LoRA on a 7B model 16–24 GB, QLoRA 8–10 GB\") | 16–24 GB | 8–10 GB |",
              "", "The QLoRA paper (Dettmers et al. 2023) fine-tunes a 65B model on one 48 GB GPU; the estimate for "
              f"Llama-2-70B (batch 1, seq 512, checkpointing) is {gb(r['estimates_large']['Llama-2-70B']['qlora']['total'])} "
              "with QLoRA and " + gb(r['estimates_large']['Llama-2-70B']['lora']['total']) + " with LoRA.", "",
              "The estimate counts tensors only. A real GPU adds the CUDA context (~0.5–1 GB) and the caching "
              "allocator's reserve above what is allocated (often 10–30%). The quoted ranges match settings with "
              f"more tokens in flight: activations are {act[0]} at one 512-token sequence with checkpointing, "
              f"{act[1]} without, {act[2]} at four, {act[3]} at eight 1024-token sequences with checkpointing; trainers "
              "that keep fp32 logits over the whole vocabulary add more. With checkpointing at batch 1 the base "
              f"weights dominate: {gb(first['lora']['base_weights'])} in bf16, {gb(first['qlora']['base_weights'])} in NF4.",
              "", "## Verdict", "",
              f"QLoRA used {100 * (1 - Q['peak_mem'] / L['peak_mem']):.0f}% less peak memory than LoRA here "
              f"(base weights {L['memory']['base_weights'] / Q['memory']['base_weights']:.1f}x smaller), ran at "
              f"{Q['tokens_per_s'] / L['tokens_per_s']:.2f}x LoRA's speed, and ended "
              f"{Q['eval_loss_after'] - L['eval_loss_after']:+.4f} nats of eval loss from LoRA "
              f"(the NF4 base alone costs {D['eval_loss_gap']:+.4f}). "
              f"Of the QLoRA merge paths, {best.split('_')[0]} gives the lowest eval loss; merging into 4-bit in place (e) "
              f"keeps {100 * P['e_d_requantized_nf4']['effect_kept']:.0f}% of the fine-tune's effect, and keeping the "
              f"dequantized merge in 16-bit (d) keeps {100 * P['d_merged_into_dequantized_nf4']['effect_kept']:.0f}%.",
              "", accuracy_verdict(r), *variants_verdict(r)]
    return "\n".join(lines) + "\n"


def training_table(r) -> list[str]:
    """One column per trained variant; memory and speed also as a ratio to LoRA's."""
    T, P = r["training"], r["paths"]
    L = T["lora"]
    gb = lambda b: f"{b / 2**30:.2f} GB"
    cols = list(T)
    row = lambda name, f: f"| {name} | " + " | ".join(f(m, T[m]) for m in cols) + " |"
    ratio = lambda x, y, m: "" if m == "lora" else f" ({x / y:.2f}x)"
    rows = [row("peak memory", lambda m, t: gb(t["peak_mem"]) + ratio(t["peak_mem"], L["peak_mem"], m)),
            row("tokens/s", lambda m, t: f"{t['tokens_per_s']:.1f}" + ratio(t["tokens_per_s"], L["tokens_per_s"], m)),
            row("eval loss before", lambda m, t: f"{t['eval_loss_before']:.4f}"),
            row("eval loss after", lambda m, t: f"{t['eval_loss_after']:.4f}" + (
                "" if m == "lora" else f" ({t['eval_loss_after'] - L['eval_loss_after']:+.4f})")),
            row("eval ppl after", lambda m, t: f"{t['eval_ppl_after']:.2f}"),
            row("base weights", lambda m, t: gb(t["memory"]["base_weights"])),
            row("optimizer states", lambda m, t: f"{t['memory']['optimizer_states'] / 2**20:.1f} MB")]
    if "accuracy" in P["base_16bit"]:
        rows.append(row("answers right", lambda m, t: pct(P[as_trained(m)]["accuracy"])))
    return ["| | " + " | ".join(TRAINED[m][1] for m in cols) + " |", "|---" * (len(cols) + 1) + "|", *rows,
            "", "Ratios are to LoRA's; eval loss after, its difference from LoRA's."]


def extra_paths(P) -> list[tuple[str, str]]:
    """(key, row label) of DoRA's, QDoRA's and LoftQ's paths in the merge table."""
    words = {"as_trained": "as trained", "merged_16bit": "merged into the 16-bit base", "merged_nf4": "merged, requantized to NF4"}
    return [(f"{m}_{k}", f"{label} {w}") for m, (_, label) in TRAINED.items() for k, w in words.items()
            if m not in AS_TRAINED and f"{m}_{k}" in P]


def variants_verdict(r) -> list[str]:
    """For DoRA, QDoRA and LoftQ: what each costs and buys against QLoRA (or LoRA), and how much of the
    gap between QLoRA and LoRA it closes, in eval loss and in answers."""
    T, P, pairs = r["training"], r["paths"], r["paired"]
    Q, L = T["qlora"], T["lora"]
    out = []
    for m in list(T)[2:]:
        t, label = T[m], TRAINED[m][1]
        ref, ref_label = (Q, "QLoRA") if is_nf4(m) else (L, "LoRA")
        gap = Q["eval_loss_after"] - L["eval_loss_after"]
        s = (f"{label}: peak memory {t['peak_mem'] / ref['peak_mem']:.2f}x {ref_label}'s, speed "
             f"{t['tokens_per_s'] / ref['tokens_per_s']:.2f}x, eval loss {t['eval_loss_before']:.4f} before training "
             f"({ref_label}: {ref['eval_loss_before']:.4f}) and {t['eval_loss_after']:.4f} after ({ref_label}: "
             f"{ref['eval_loss_after']:.4f})")
        if is_nf4(m) and gap > 0:
            s += f", closing {100 * (Q['eval_loss_after'] - t['eval_loss_after']) / gap:.0f}% of QLoRA's eval-loss gap to LoRA"
        key = f"{m}_as_trained vs {'a_nf4_plus_adapter' if is_nf4(m) else 'lora_as_trained'}"
        if key in pairs:
            x, acc = pairs[key], lambda k: 100 * P[k]["accuracy"]["accuracy"]
            ref_acc = acc(as_trained("qlora" if is_nf4(m) else "lora"))
            s += (f"; answers {acc(f'{m}_as_trained'):.1f}% right against {ref_label}'s {ref_acc:.1f}% (right only with "
                  f"{label} {x['a_only']}, only with {ref_label} {x['b_only']}, p = {x['p']:.2g}: {reading(x)})")
        out += ["", s + "."]
    return out


def pct(acc) -> str:
    lo, hi = acc["ci95"]
    return f"{100 * acc['accuracy']:.1f}% ({100 * lo:.1f}–{100 * hi:.1f})"


def reading(x) -> str:
    if x["a_only"] + x["b_only"] == 0:
        return "no difference: the same questions right"
    return "a real difference" if x["p"] < 0.05 else "could be chance at this sample size"


def size(b) -> str:
    return f"{b / 2**30:.2f} GB" if b >= 2**30 / 10 else f"{b / 2**20:.1f} MB"


def accuracy_section(r) -> list[str]:
    P = r["paths"]
    if "accuracy" not in P["base_16bit"]:
        return ["## Accuracy", "", "Not measured: pass `--eval-generate N` (and `--eval-metric`, see `train.py --help`) "
                "to score every variant's answers to N held-out examples against their references.", ""]
    a = P["base_16bit"]["accuracy"]
    lines = ["## Accuracy", "",
             f"Every variant greedy-answers the same {a['n']} held-out questions; an answer is right when it matches "
             f"the reference ({a['metric']}). Intervals are 95% Wilson intervals; answers.jsonl has every answer.", "",
             "| variant | answers right (95% interval) | eval loss | weights in memory |", "|---|---|---|---|"]
    names = variant_names(P)
    for k, name in names.items():
        lines.append(f"| {name} | {pct(P[k]['accuracy'])} | {P[k]['eval_loss']:.4f} | {size(P[k]['model_bytes'])} |")
    lines += ["", "![accuracy](accuracy.png)", "",
              "Paired on the same questions (McNemar's exact test on the questions only one of the two gets right):", "",
              "| first vs second | right only in the first | only in the second | p | reading (at 5%) |", "|---|---|---|---|---|"]
    for x in r["paired"].values():
        lines.append(f"| {names[x['a']]} vs {names[x['b']]} | {x['a_only']} | {x['b_only']} | {x['p']:.3g} | "
                     f"{reading(x)} |")
    return lines + [""]


def accuracy_verdict(r) -> str:
    """What the accuracy numbers say, in words: training against none, QLoRA against LoRA, the merge paths."""
    P, pairs = r["paths"], r["paired"]
    if not pairs:
        return "Accuracy was not measured (pass `--eval-generate N`)."
    acc = lambda k: 100 * P[k]["accuracy"]["accuracy"]
    q, t = pairs["a_nf4_plus_adapter vs lora_as_trained"], pairs["lora_as_trained vs base_16bit"]
    lo, la = P["lora_as_trained"]["accuracy"], P["a_nf4_plus_adapter"]["accuracy"]
    diff = acc("a_nf4_plus_adapter") - acc("lora_as_trained")
    out = (f"On {lo['n']} held-out questions the 16-bit base answered {acc('base_16bit'):.1f}% right, LoRA "
           f"{acc('lora_as_trained'):.1f}% and QLoRA {acc('a_nf4_plus_adapter'):.1f}% (training against none: "
           f"{reading(t)}, p = {t['p']:.2g}). QLoRA alone got {q['a_only']} questions right that LoRA missed, LoRA "
           f"alone {q['b_only']} (McNemar p = {q['p']:.2g}): ")
    if q["a_only"] + q["b_only"] == 0:
        out += "the two answer the same questions right"
    elif q["p"] < 0.05:
        out += (f"QLoRA is {abs(diff):.1f} points {'behind' if diff < 0 else 'ahead of'} LoRA, more than chance "
                "explains at this sample size" + (": here 4-bit did cost accuracy" if diff < 0 else ""))
    else:
        half = 50 * max(la["ci95"][1] - la["ci95"][0], lo["ci95"][1] - lo["ci95"][0])
        out += (f"the {diff:+.1f} points could be chance at this sample size; at ±{half:.0f} points per interval, "
                "a gap of a few points would need several times more questions to show (`--eval-generate`, "
                "`--eval-examples`)")
    differ = [f"{variant_names(P)[x['a']]} {acc(x['a']) - acc('a_nf4_plus_adapter'):+.1f} points" for x in pairs.values()
              if x["b"] == "a_nf4_plus_adapter" and x["a"] in VARIANTS and x["p"] < 0.05]
    return out + (". Merge paths that answer differently from (a) beyond chance: " + ", ".join(differ) + "." if differ
                  else ". No merge path answers differently from (a) beyond chance.")


if __name__ == "__main__":
    main()
