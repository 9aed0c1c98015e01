"""
Training speed and memory, LoRA vs QLoRA, each mode in its own process, optionally against
transformers + peft (+ bitsandbytes for QLoRA) on exactly the same batches, in the same run.

    python bench/train.py                        # default model, r=8, alpha=16, 7 targets, seq <= 256, batch 4
    python bench/train.py --steps 40 --peers     # also transformers+peft(+bitsandbytes): ~15 min more on 2 cores
    python bench/train.py --device cuda --model path/to/Llama-3.2-1B

Prints real (non-padding) tokens/s and seconds/step (medians over the steps after the first) and the
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
TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"


def ours(mode, a, out):
    cmd = [sys.executable, str(ROOT / "train.py"), "--out", str(out), "--overwrite", "--max-steps", str(a.steps),
           "--model", a.model, "--seq-len", str(a.seq_len), "--batch-size", "4", "--rank", "8", "--alpha", "16",
           "--targets", TARGETS, "--dropout", "0", "--eval-examples", "0", "--log-every", "1000"]
    cmd += ["--qlora"] if mode == "qlora" else []
    cmd += ["--device", a.device] if a.device else []
    cmd += ["--dtype", a.dtype] if a.dtype else []
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    dts = [b["elapsed"] - a_["elapsed"] for a_, b in zip(steps, steps[1:])]
    toks = [b["tokens"] - a_["tokens"] for a_, b in zip(steps, steps[1:])]
    return dict(s_step=statistics.median(dts), tok_s=statistics.median(t / d for t, d in zip(toks, dts)),
                peak=max(r["peak_mem"] for r in steps), dtype=json.loads((out / "summary.json").read_text())["dtype"])


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
m = peft.get_peft_model(m, peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=cfg["targets"].split(","), task_type="CAUSAL_LM"))
params = [p for p in m.parameters() if p.requires_grad]
if device == "cuda": torch.cuda.reset_peak_memory_stats()   # like train.py: the training peak, not the loading one
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
print(json.dumps(dict(s_step=statistics.median(dts[1:]), tok_s=statistics.median(n / d for n, d in zip(toks[1:], dts[1:])),
                      peak=peak_memory(torch.device(device)))))
'''


def peer(mode, a, dtype):
    sys.path.insert(0, str(ROOT))
    from formats import default_model_dir
    model_dir = str(default_model_dir()) if a.model == "default" else a.model
    cfg = dict(root=str(ROOT), mode=mode, model=model_dir, steps=a.steps, seq_len=a.seq_len,
               device=a.device or "cpu", targets=TARGETS, dtype=dtype)
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
    p.add_argument("--peers", action="store_true", help="also run transformers+peft(+bitsandbytes) on the same batches")
    a = p.parse_args()
    res = {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in ("lora", "qlora"):
            res[mode] = ours(mode, a, Path(tmp) / mode)
            print(f"ours {mode:5s}: {res[mode]['tok_s']:6.1f} real tok/s, {res[mode]['s_step']:.2f} s/step, "
                  f"peak {res[mode]['peak'] / 2**30:.2f} GB ({res[mode]['dtype']})", flush=True)
    if a.peers:
        for mode in ("lora", "qlora"):
            r = peer(mode, a, res[mode]["dtype"])   # the dtype ours ran in: like with like
            if r:
                res["peer_" + mode] = r
                print(f"peer {mode:5s}: {r['tok_s']:6.1f} real tok/s, {r['s_step']:.2f} s/step, peak {r['peak'] / 2**30:.2f} GB "
                      f"(ours: {res[mode]['tok_s'] / r['tok_s']:.2f}x speed, {res[mode]['peak'] / r['peak']:.2f}x memory)",
                      flush=True)
    L, Q = res["lora"], res["qlora"]
    print(f"QLoRA / LoRA: step time {Q['s_step'] / L['s_step']:.2f}x (goal <= 1.25), peak memory {Q['peak'] / L['peak']:.2f}x")


if __name__ == "__main__":
    main()
