"""
Training speed and memory, LoRA vs QLoRA, ours optionally against transformers + peft (+ bitsandbytes for
QLoRA), on exactly the same batches, in lockstep: every run is a process of its own (its own peak memory, its
own allocator), and the bench asks each for one step in turn, so that a burst of load on a shared machine
falls on all of them, not on whichever ran then. Ratios are medians of the per-step ratios.

    python bench/train.py                        # default model, r=8, alpha=16, 7 targets, seq <= 256, batch 4
    python bench/train.py --steps 16 --peers     # also transformers+peft(+bitsandbytes): 3.3 min on 2 cores (bf16)
    python bench/train.py --compile              # also ours with --compile: compile time, then steady-state speed
    python bench/train.py --dora --peers         # DoRA and QDoRA instead, ours against peft's use_dora=True
    python bench/train.py --device cuda --model path/to/Llama-3.2-1B

Ours is train.train_step, the function train.py's loop calls, on a model train.py's build_model made from the
same flags. Prints real (non-padding) tokens/s, seconds/step and useful FLOP/s (medians over the steps after
the first, the first two when compiled; the FLOP count is written out in useful_flops), the matmul peak at our
shapes, each process's peak memory (CPU: peak RSS, loading included for all; CUDA: max allocated during
training, loading excluded for all), and the first step's loss on each side (the same examples: they agree
to about 1%).
All processes stay loaded until the end: with the default model ~10 GB of RAM with --peers, ~20 GB with
--peers --compile (8 processes).
"""
import argparse
import json
import signal
import statistics
import subprocess
import sys
import tempfile
import time
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


# The workers. Each loads its model, says it is ready (with its dtype), then runs one optimizer step for every
# "step" line on its stdin and answers with that step's time, real tokens and loss; any other line ends it
# with its peak memory. Replies go to the original stdout; whatever else the process prints goes to stderr,
# which the bench keeps in a log and shows if the process fails.
OURS = r'''
import json, os, sys, time
cfg = json.loads(sys.argv[1])
sys.path.insert(0, cfg.pop("root"))
import allocator
allocator.preload()   # the allocator train.py runs on (this re-executes the process once)
reply = os.fdopen(os.dup(1), "w")
os.dup2(2, 1)
say = lambda **kw: print(json.dumps(kw), file=reply, flush=True)
import torch
from data import load_tokenizer
from train import TrainConfig, build_model, get_lr, micro_batches, peak_memory, prepare_data, runtime_bytes, start, train_step
run = start(TrainConfig(**cfg))
train_ex, _ = prepare_data(run.cfg, load_tokenizer(run.cfg.model), log=lambda *x: None)
model, params, opt, _ = build_model(run)
cuda = run.device.type == "cuda"
if cuda:
    torch.cuda.reset_peak_memory_stats(run.device)   # as train.py: the training peak, not the loading one
say(dtype=str(run.dtype).replace("torch.", ""))
step, max_micro = 0, 0
while sys.stdin.readline().strip() == "step":
    t = time.perf_counter()
    r = train_step(run, model, params, opt, micro_batches(train_ex, step, run), step, get_lr(step, run.cfg, run.cfg.max_steps))
    if cuda:
        torch.cuda.synchronize()
    say(dt=time.perf_counter() - t, tokens=r.tokens, loss=r.loss)
    step, max_micro = step + 1, max(max_micro, r.max_micro)
if not cuda:
    allocator.release_freed_memory(force=True)   # as train.py, before it counts what is resident besides tensors
say(peak=peak_memory(run.device), runtime_rss=None if cuda else runtime_bytes(model, opt), device=str(run.device),
    max_padded_tokens_per_micro_batch=max_micro)
'''

PEER = r'''
import json, os, sys, time
reply = os.fdopen(os.dup(1), "w")
os.dup2(2, 1)
say = lambda **kw: print(json.dumps(kw), file=reply, flush=True)
import torch
cfg = json.loads(sys.argv[1])
sys.path.insert(0, cfg["root"])
from data import IGNORE, collate, encode_example, load_examples, load_tokenizer, prompt_format
from train import step_examples, peak_memory
import transformers, peft
mode, model_dir, seq_len, device = cfg["mode"], cfg["model"], cfg["seq_len"], cfg["device"]
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
if device == "cuda": torch.cuda.reset_peak_memory_stats()   # like ours: the training peak, not the loading one
if cfg["compile"]:   # regionally, as ours: each decoder layer
    for layer in m.base_model.model.model.layers: layer.compile()
if mode == "qlora":
    import bitsandbytes as bnb
    opt = bnb.optim.PagedAdamW8bit(params, lr=5e-4)
else:
    opt = torch.optim.AdamW(params, lr=5e-4)
say(dtype=cfg["dtype"])
s = 0
while sys.stdin.readline().strip() == "step":
    batch = [ex[j] for j in step_examples(len(ex), len(ex), s, 4, 0)]
    ids, tgt, seg = collate(batch)
    ids, tgt, seg = ids.to(device), tgt.to(device), seg.to(device)
    t = time.perf_counter()
    # HF shifts labels inside its loss (logits[t] scores labels[t + 1]); our targets are already shifted.
    labels = torch.cat([torch.full_like(tgt[:, :1], IGNORE), tgt[:, :-1]], 1)
    out = m(input_ids=ids, attention_mask=seg.clamp(max=1), labels=labels)
    out.loss.backward(); opt.step(); opt.zero_grad()
    if device == "cuda": torch.cuda.synchronize()
    say(dt=time.perf_counter() - t, tokens=sum(len(e[0]) for e in batch), loss=out.loss.item())
    s += 1
say(peak=peak_memory(torch.device(device)))
'''


class Worker:
    """One run in a process of its own, stepped by the bench (the protocol above)."""

    def __init__(self, name: str, script: str, cfg: dict, logs: Path):
        self.name, self.steps, self.final = name, [], None
        # Steps the medians leave out: the first (kernel caches, allocator warm-up); compiled, the first two
        # (they compile: static shapes, then dynamic ones).
        self.skip = 2 if cfg["compile"] else 1
        self.log = open(logs / f"{name.replace(' ', '_')}.log", "w+")
        self.p = subprocess.Popen([sys.executable, "-c", script, json.dumps(cfg)], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, stderr=self.log, text=True)

    def ask(self, line: str | None = None) -> dict:
        """Send a line (None: send nothing) and wait for the answer; a process that ended says why."""
        try:
            if line is not None:
                self.p.stdin.write(line + "\n")
                self.p.stdin.flush()
        except BrokenPipeError:
            pass   # it has ended: its stdout is at its end too, and its log says why
        answer = self.p.stdout.readline()
        if not answer:
            self.p.wait()
            self.log.seek(0)
            raise RuntimeError(f"{self.name} stopped (exit code {self.p.returncode}); the end of its log:\n"
                               + self.log.read()[-3000:])
        return json.loads(answer)

    def step(self) -> float:
        self.steps.append(self.ask("step"))
        return self.steps[-1]["dt"]

    def end(self) -> dict:
        self.final = self.ask("end")
        self.p.wait()
        return self.final

    def summary(self, flops: list) -> dict:
        """Medians over the steps after the first `skip`; compile_s: what those took above the median."""
        skip = self.skip
        dts, toks = [r["dt"] for r in self.steps], [r["tokens"] for r in self.steps]
        s_step = statistics.median(dts[skip:])
        return dict(s_step=s_step, compile_s=sum(dts[:skip]) - skip * s_step, loss=self.steps[0]["loss"],
                    tok_s=statistics.median(t / d for t, d in zip(toks[skip:], dts[skip:])),
                    flop_s=statistics.median(f / d for f, d in zip(flops[skip:], dts[skip:])), peak=self.final["peak"])


def peer_does(action, k: str, workers: dict):
    """action's result; a peer that fails (no bitsandbytes build for this machine, a layer its compiler
    cannot take) is left out of the bench with its log's end printed, instead of ending it."""
    try:
        return action()
    except RuntimeError as e:
        if not k.startswith("peer"):
            raise
        print(f"{e}\n{k}: left out", flush=True)
        workers.pop(k).p.kill()


def paired(slow: Worker, fast: Worker) -> float:
    """Median over the steps of slow's time / fast's: the same examples, run within seconds of each other."""
    return statistics.median(a["dt"] / b["dt"] for a, b in list(zip(slow.steps, fast.steps))[max(slow.skip, fast.skip):])


def estimate(mode: str, cfg: dict, final: dict, dtype: str) -> float:
    """audit.py's memory estimate for this run as it ran (its flags, largest micro-batch, dtype, device)."""
    from audit import estimate_for_run
    from formats import read_args
    from train import TrainConfig
    c = TrainConfig(**{k: v for k, v in cfg.items() if k != "root"})
    return estimate_for_run(read_args(c.model), c, mode, dict(final, dtype=dtype, peak_mem=final["peak"]),
                            dora=c.dora)["predicted_peak"]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=16, help="optimizer steps per run (medians exclude the first)")
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
    # A timeout's SIGTERM (bench/gpu.sh) ends us through `finally`, which stops the workers with us.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if a.steps < 3:
        p.error("--steps must be at least 3: the medians leave out the first step (the first two when compiled)")
    from formats import default_model_dir
    lab = lambda m: ("qdora" if m == "qlora" else "dora") if a.dora else m
    modes, variants = ("lora", "qlora"), (False, True) if a.compile else (False,)
    key = lambda mode, compiled, peer=False: ("peer " if peer else "") + mode + (" compiled" if compiled else "")
    cfgs, workers = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        try:
            for mode in modes:
                for compiled in variants:
                    k = key(mode, compiled)
                    cfgs[k] = dict(root=str(ROOT), out=str(Path(tmp) / k.replace(" ", "_")), overwrite=True,
                                   max_steps=a.steps, model=a.model, seq_len=a.seq_len, batch_size=4, rank=8, alpha=16.0,
                                   targets=TARGETS, dropout=a.dropout, eval_examples=0, qlora=mode == "qlora",
                                   device=a.device, dtype=a.dtype, compile=compiled, dora=a.dora)
                    workers[k] = Worker(k, OURS, cfgs[k], Path(tmp))
            dtype = {k: w.ask()["dtype"] for k, w in workers.items()}   # loaded: the peers take ours' dtype
            if a.peers:
                model_dir = str(default_model_dir()) if a.model == "default" else a.model
                for mode in modes:
                    for compiled in variants:
                        k = key(mode, compiled, peer=True)
                        workers[k] = Worker(k, PEER, dict(root=str(ROOT), mode=mode, model=model_dir, seq_len=a.seq_len,
                                                          device=a.device or "cpu", targets=TARGETS, dtype=dtype[mode],
                                                          compile=compiled, dora=a.dora, dropout=a.dropout), Path(tmp))
                for k in [k for k in workers if k.startswith("peer")]:
                    peer_does(workers[k].ask, k, workers)
            names = list(workers)
            print(f"{len(names)} runs loaded ({', '.join(names)}); {a.steps} steps each, one run at a time in turn",
                  file=sys.stderr, flush=True)
            t0 = time.time()
            for s in range(a.steps):
                turn = names[s % len(names):] + names[:s % len(names)]   # who goes first rotates
                dts = {k: peer_does(workers[k].step, k, workers) for k in turn}
                names = list(workers)
                elapsed = time.time() - t0
                print(f"step {s + 1}/{a.steps}: " + ", ".join(f"{k} {dts[k]:.2f} s" for k in names)
                      + f" | ETA {elapsed / (s + 1) * (a.steps - s - 1) / 60:.1f} min", file=sys.stderr, flush=True)
            for w in workers.values():
                w.end()
        except RuntimeError as e:   # one of ours stopped: its log says why
            raise SystemExit(str(e))
        finally:
            for w in workers.values():
                if w.p.poll() is None:
                    w.p.kill()
    flops = step_flops(a, a.steps)
    res = {k: w.summary(flops) for k, w in workers.items()}
    peak = matmul_peak(dtype["lora"], a.device or "cpu")
    for mode in modes:
        r = res[mode]
        predicted = estimate(mode, cfgs[mode], workers[mode].final, dtype[mode])
        print(f"ours {lab(mode):5s}: {r['tok_s']:6.1f} real tok/s, {r['s_step']:.2f} s/step, peak {r['peak'] / 2**30:.2f} GB "
              f"({dtype[mode]}; estimated {predicted / 2**30:.2f}, {predicted / r['peak'] - 1:+.0%}), useful "
              f"{r['flop_s'] / 1e9:.0f} GFLOP/s, first loss {r['loss']:.4f}", flush=True)
    print(f"matmul peak at our shapes, {dtype['lora']}: {peak / 1e9:.0f} GFLOP/s; useful work reaches "
          f"{res['lora']['flop_s'] / peak:.0%} of it (LoRA), {res['qlora']['flop_s'] / peak:.0%} (QLoRA)", flush=True)
    if a.compile:
        for mode in modes:
            c, k = res[key(mode, True)], key(mode, True)
            print(f"ours {lab(mode):5s} compiled: {c['tok_s']:6.1f} real tok/s ({paired(workers[mode], workers[k]):.2f}x "
                  f"eager), {c['s_step']:.2f} s/step, peak {c['peak'] / 2**30:.2f} GB; compiling took {c['compile_s']:.0f} s "
                  "(the first two steps above the median)", flush=True)
    for mode in modes:
        for compiled in variants:
            k, ok = key(mode, compiled, peer=True), key(mode, compiled)
            if k not in res:
                continue
            r, c = res[k], " compiled" if compiled else ""
            print(f"peer {lab(mode):5s}{c}: {r['tok_s']:6.1f} real tok/s, {r['s_step']:.2f} s/step, peak {r['peak'] / 2**30:.2f} GB, "
                  f"first loss {r['loss']:.4f} (ours{c}: {paired(workers[k], workers[ok]):.2f}x speed, "
                  f"{res[ok]['peak'] / r['peak']:.2f}x memory)" + (f"; compiling took {r['compile_s']:.0f} s" if compiled else ""),
                  flush=True)
    print(f"{'QDoRA / DoRA' if a.dora else 'QLoRA / LoRA'}: step time {paired(workers['qlora'], workers['lora']):.2f}x "
          f"(goal <= 1.15), peak memory {res['qlora']['peak'] / res['lora']['peak']:.2f}x")
    print("(ratios: medians of the per-step ratios; each step's runs went one after another, within seconds)")


if __name__ == "__main__":
    main()
