"""
Training speed and memory, LoRA vs QLoRA, each mode in its own process, optionally against
transformers + peft (+ bitsandbytes for QLoRA) on exactly the same batches, in the same run.

    python bench/train.py                        # default model, r=8, alpha=16, 7 targets, seq <= 256, batch 4
    python bench/train.py --steps 40 --peers     # also transformers+peft(+bitsandbytes): ~15 min more on 2 cores
    python bench/train.py --compile              # also ours with --compile: compile time, then steady-state speed
    python bench/train.py --dora --peers         # DoRA and QDoRA instead, ours against peft's use_dora=True
    python bench/train.py --device cuda --model path/to/Llama-3.2-1B

Prints real (non-padding) tokens/s, seconds/step and useful FLOP/s (medians over the steps after the
first; the FLOP count is written out in useful_flops), the matmul peak at our shapes, and the
peak memory of each process (CPU: peak RSS, loading included for both; CUDA: max allocated during
training, loading excluded for both).
"""
import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"


def useful_flops(args, rank: int, targets: list, examples: list) -> float:
    """FLOP of the useful work in one training step over `examples` ((tokens, target tokens) each), written
    out so a reader can check it. The base is frozen: its linears cost a forward and an input gradient,
    no weight gradient. Not counted: elementwise work (norms, SwiGLU, RoPE, softmax), NF4 dequantization.
      block linears   forward 2*P*T, input gradient 2*P*T        P = weights of the 7 projections, per layer
      adapters        forward 2r(in+out)*T, backward 4r(in+out)*T (gradients of A, B and the input)
      attention       causal QK^T and AV: forward 2*hd*H*T(T+1), backward twice that
      lm_head         target tokens only: logits 2*dim*V*n, their input gradient 2*dim*V*n"""
    from audit import linear_shapes
    shapes = linear_shapes(args)
    P = sum(i * o for i, o in shapes.values())
    adapted = sum(i + o for n, (i, o) in shapes.items() if n in targets)
    total = 0.0
    for T, n in examples:
        per_layer = 4 * P * T + 6 * rank * adapted * T + 3 * 2 * args.head_dim * args.n_heads * T * (T + 1)
        total += args.n_layers * per_layer + 4 * args.dim * args.vocab_size * n
    return total


def matmul_peak(dtype, device) -> float:
    """FLOP/s of the block's two largest matmuls at a micro-batch's size (837 tokens), best of repeats."""
    import time
    import torch
    dt, best = getattr(torch, dtype), 0.0
    for k, n in ((576, 1536), (1536, 576)):
        x, w = torch.randn(837, k, dtype=dt, device=device), torch.randn(k, n, dtype=dt, device=device)
        for _ in range(3):
            x @ w
        for _ in range(10):
            t = time.perf_counter()
            x @ w
            if device == "cuda":
                torch.cuda.synchronize()
            best = max(best, 2 * 837 * k * n / (time.perf_counter() - t))
    return best


def step_flops(a, steps: int) -> list:
    """useful_flops of each step the bench runs: the same examples, in the same order, as train.py."""
    from data import load_tokenizer
    from formats import read_args
    from train import TrainConfig, prepare_data, step_examples
    cfg = TrainConfig(model=a.model, seq_len=a.seq_len, eval_examples=0)
    ex, _ = prepare_data(cfg, load_tokenizer(a.model), log=lambda *x: None)
    args = read_args(a.model)
    return [useful_flops(args, 8, TARGETS.split(","), [(len(ex[j][0]), sum(t != -100 for t in ex[j][1]))
                                                     for j in step_examples(len(ex), len(ex), s, 4, 0)])
            for s in range(steps)]


def ours(mode, a, out, compile=False):
    cmd = [sys.executable, str(ROOT / "train.py"), "--out", str(out), "--overwrite", "--max-steps", str(a.steps),
           "--model", a.model, "--seq-len", str(a.seq_len), "--batch-size", "4", "--rank", "8", "--alpha", "16",
           "--targets", TARGETS, "--dropout", str(a.dropout), "--eval-examples", "0", "--log-every", "1000"]
    cmd += ["--qlora"] if mode == "qlora" else []
    cmd += ["--device", a.device] if a.device else []
    cmd += ["--dtype", a.dtype] if a.dtype else []
    cmd += ["--compile"] if compile else []
    cmd += ["--dora"] if a.dora else []
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    dts = [b["elapsed"] - a_["elapsed"] for a_, b in zip(steps, steps[1:])]
    toks = [b["tokens"] - a_["tokens"] for a_, b in zip(steps, steps[1:])]
    flops = step_flops(a, a.steps)[1:]   # row i is step i + 1; its time is elapsed[i] - elapsed[i - 1]
    # The first step's time is elapsed[0] (no row before it); with --compile the first two steps compile
    # (static shapes, then dynamic ones), so what they took above the median is the compile time.
    first_two = steps[0]["elapsed"] + dts[0]
    summary = json.loads((out / "summary.json").read_text())
    return dict(s_step=statistics.median(dts), first_two=first_two, tok_s=statistics.median(t / d for t, d in zip(toks, dts)),
                flop_s=statistics.median(f / d for f, d in zip(flops, dts)),
                peak=max(r["peak_mem"] for r in steps), dtype=summary["dtype"], predicted=estimate(mode, out, summary))


def estimate(mode, out: Path, summary) -> float:
    """audit.py's memory estimate for this run as it ran (its flags, largest micro-batch, dtype, device)."""
    from audit import estimate_for_run
    from formats import read_args
    from train import TrainConfig
    cfg = TrainConfig(**json.loads((out / "train_config.json").read_text()))
    return estimate_for_run(read_args(cfg.model), cfg, mode, summary, dora=cfg.dora)["predicted_peak"]


PEER = r'''
import json, statistics, sys, time, torch
cfg = json.loads(sys.argv[1])
sys.path.insert(0, cfg["root"])
from data import IGNORE, collate, encode_example, load_examples, load_tokenizer, prompt_format
from train import step_examples, peak_memory
import transformers, peft
mode, model_dir, steps, seq_len, device = cfg["mode"], cfg["model"], cfg["steps"], cfg["seq_len"], cfg["device"]
tok = load_tokenizer(model_dir); fmt = prompt_format(tok)
train_convs, _ = load_examples("default", 0)
ex = [encode_example(tok, fmt, c, seq_len) for c in train_convs]
ex = [(i, t) for i, t, _ in ex if any(x != IGNORE for x in t)]
kw = dict(dtype=getattr(torch, cfg["dtype"]))
if mode == "qlora":
    kw["quantization_config"] = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=kw["dtype"])
m = transformers.AutoModelForCausalLM.from_pretrained(model_dir, device_map=device, **kw)
m = peft.get_peft_model(m, peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=cfg["dropout"], target_modules=cfg["targets"].split(","), task_type="CAUSAL_LM", use_dora=cfg["dora"]))
params = [p for p in m.parameters() if p.requires_grad]
if device == "cuda": torch.cuda.reset_peak_memory_stats()   # like train.py: the training peak, not the loading one
if cfg["compile"]:   # regionally, as ours: each decoder layer
    for layer in m.base_model.model.model.layers: layer.compile()
if mode == "qlora":
    import bitsandbytes as bnb
    opt = bnb.optim.PagedAdamW8bit(params, lr=5e-4)
else:
    opt = torch.optim.AdamW(params, lr=5e-4)
dts, toks = [], []
for s in range(steps):
    batch = [ex[j] for j in step_examples(len(ex), len(ex), s, 4, 0)]
    ids, tgt, seg = collate(batch)
    ids, tgt, seg = ids.to(device), tgt.to(device), seg.to(device)
    t = time.perf_counter()
    # HF shifts labels inside its loss (logits[t] scores labels[t + 1]); our targets are already shifted.
    labels = torch.cat([torch.full_like(tgt[:, :1], IGNORE), tgt[:, :-1]], 1)
    out = m(input_ids=ids, attention_mask=seg.clamp(max=1), labels=labels)
    out.loss.backward(); opt.step(); opt.zero_grad()
    if device == "cuda": torch.cuda.synchronize()
    dts.append(time.perf_counter() - t); toks.append(sum(len(e[0]) for e in batch))
print(json.dumps(dict(s_step=statistics.median(dts[1:]), first_two=dts[0] + dts[1], tok_s=statistics.median(n / d for n, d in zip(toks[1:], dts[1:])),
                      peak=peak_memory(torch.device(device)))))
'''


def peer(mode, a, dtype, compile=False):
    from formats import default_model_dir
    model_dir = str(default_model_dir()) if a.model == "default" else a.model
    cfg = dict(root=str(ROOT), mode=mode, model=model_dir, steps=a.steps, seq_len=a.seq_len,
               device=a.device or "cpu", targets=TARGETS, dtype=dtype, compile=compile, dora=a.dora, dropout=a.dropout)
    r = subprocess.run([sys.executable, "-c", PEER, json.dumps(cfg)], capture_output=True, text=True)
    if r.returncode:
        print(r.stderr[-2000:])
        return None
    return json.loads(r.stdout.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=16, help="optimizer steps per mode (medians exclude the first)")
    p.add_argument("--model", default="default")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--device", default="", help="cpu or cuda (default: cuda if available)")
    p.add_argument("--dtype", default="", help="float32 | bfloat16 (default: train.py's choice); the peers run in "
                   "the dtype ours ran in")
    p.add_argument("--dropout", type=float, default=0.0, help="LoRA dropout on every run (train.py's default is 0.05)")
    p.add_argument("--peers", action="store_true", help="also run transformers+peft(+bitsandbytes) on the same batches")
    p.add_argument("--compile", action="store_true", help="also run ours with --compile (and the peers with their decoder "
                   "layers compiled, with --peers): compile time and steady-state speed against eager")
    p.add_argument("--dora", action="store_true", help="DoRA on every run (ours --dora, QDoRA with the NF4 base; the "
                   "peers with peft's use_dora=True); the FLOP count leaves out DoRA's row norms")
    a = p.parse_args()
    lab = lambda m: ("qdora" if m == "qlora" else "dora") if a.dora else m
    res = {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in ("lora", "qlora"):
            res[mode] = ours(mode, a, Path(tmp) / mode)
            print(f"ours {lab(mode):5s}: {res[mode]['tok_s']:6.1f} real tok/s, {res[mode]['s_step']:.2f} s/step, "
                  f"peak {res[mode]['peak'] / 2**30:.2f} GB ({res[mode]['dtype']}; estimated "
                  f"{res[mode]['predicted'] / 2**30:.2f}, {res[mode]['predicted'] / res[mode]['peak'] - 1:+.0%}), "
                  f"useful {res[mode]['flop_s'] / 1e9:.0f} GFLOP/s", flush=True)
        peak = matmul_peak(res["lora"]["dtype"], a.device or "cpu")
        print(f"matmul peak at our shapes, {res['lora']['dtype']}: {peak / 1e9:.0f} GFLOP/s; useful work reaches "
              f"{res['lora']['flop_s'] / peak:.0%} of it (LoRA), {res['qlora']['flop_s'] / peak:.0%} (QLoRA)", flush=True)
        if a.compile:
            for mode in ("lora", "qlora"):
                c = res[mode + "_compiled"] = ours(mode, a, Path(tmp) / (mode + "_compiled"), compile=True)
                print(f"ours {lab(mode):5s} compiled: {c['tok_s']:6.1f} real tok/s ({c['tok_s'] / res[mode]['tok_s']:.2f}x eager), "
                      f"{c['s_step']:.2f} s/step, peak {c['peak'] / 2**30:.2f} GB; compiling took "
                      f"{c['first_two'] - 2 * c['s_step']:.0f} s (the first two steps above the median)", flush=True)
    if a.peers:
        for mode in ("lora", "qlora"):
            for compiled in (False, True) if a.compile else (False,):
                key = mode + ("_compiled" if compiled else "")
                r = peer(mode, a, res[mode]["dtype"], compiled)   # the dtype ours ran in: like with like
                if r:
                    res["peer_" + key] = r
                    print(f"peer {lab(mode):5s}{' compiled' if compiled else ''}: {r['tok_s']:6.1f} real tok/s, "
                          f"{r['s_step']:.2f} s/step, peak {r['peak'] / 2**30:.2f} GB (ours{' compiled' if compiled else ''}: "
                          f"{res[key]['tok_s'] / r['tok_s']:.2f}x speed, {res[key]['peak'] / r['peak']:.2f}x memory)"
                          + (f"; compiling took {r['first_two'] - 2 * r['s_step']:.0f} s" if compiled else ""), flush=True)
    L, Q = res["lora"], res["qlora"]
    print(f"{'QDoRA / DoRA' if a.dora else 'QLoRA / LoRA'}: step time {Q['s_step'] / L['s_step']:.2f}x (goal <= 1.15), peak memory {Q['peak'] / L['peak']:.2f}x")


if __name__ == "__main__":
    main()
