"""
Two variants of our training step in one process, step by step in alternation on the same batches: on a
shared, noisy machine a burst of load then falls on both sides, not on one process's run. Prints each side's
total time over the timed steps and their ratio.

    python bench/alternate.py compile                  # eager blocks vs compiled blocks (--dropout 0)
    python bench/alternate.py compile --dropout 0.05   # the same with LoRA dropout (train.py's default)
    python bench/alternate.py dropout --qlora          # dropout 0.05 vs none, on one model

Defaults as bench/train.py: the default model, r=8, alpha=16, all seven projections, sequences <= 256,
micro-batches of 4 examples, one optimizer step each; the dtype train.py picks unless --dtype says.
"""
import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import allocator  # noqa: E402

allocator.preload()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("vs", choices=("compile", "dropout"), help="compile: eager vs --compile; dropout: --dropout vs 0")
    p.add_argument("--qlora", action="store_true")
    p.add_argument("--dropout", type=float, default=None, help="LoRA dropout (default: 0 for compile, 0.05 for dropout)")
    p.add_argument("--dtype", default="", help="float32 | bfloat16 (default: train.py's choice)")
    p.add_argument("--batches", type=int, default=8, help="distinct steps (train.py's first ones), each timed twice per side")
    a = p.parse_args()
    import torch
    from data import load_tokenizer
    from lora import lora_layers
    from train import TrainConfig, build_model, micro_batches, prepare_data, start, train_step
    dropout = a.dropout if a.dropout is not None else (0.05 if a.vs == "dropout" else 0.0)
    cfg = TrainConfig(qlora=a.qlora, out=tempfile.mkdtemp(), overwrite=True, eval_examples=0,
                      dtype=a.dtype, dropout=dropout, targets="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj")
    run = start(cfg)
    ex, _ = prepare_data(cfg, load_tokenizer(cfg.model), log=lambda *x: None)
    names = ("eager", "compiled") if a.vs == "compile" else (f"dropout {dropout}", "dropout 0")
    sides = {}
    for name in names:   # each side its own model (compile) or the same one (dropout)
        if name == "compiled" or not sides:
            model, params, opt, _ = build_model(run)
            if name == "compiled":
                model.compile_blocks()
        sides[name] = (model, params, opt, 0.0 if name == "dropout 0" else dropout)

    def step(name, i):   # train.py's step i: its examples, train_step (as train() runs it)
        model, params, opt, p_ = sides[name]
        for m in lora_layers(model).values():
            if isinstance(m.dropout, torch.nn.Dropout):
                m.dropout.p = p_
        train_step(run, model, params, opt, micro_batches(ex, i, run), i, cfg.lr)
        if run.device.type == "cuda":
            torch.cuda.synchronize()

    for name in names:   # warm-up: compiling (static, then dynamic shapes), kernel caches, allocator
        t = time.perf_counter()
        for i in range(3):
            step(name, i)
        print(f"{name}: warm-up (3 steps) {time.perf_counter() - t:.1f} s", flush=True)
    total = dict.fromkeys(names, 0.0)
    for _ in range(2):
        for i in range(a.batches):
            for name in names:
                t = time.perf_counter()
                step(name, i)
                total[name] += time.perf_counter() - t
    first, second = names
    print(f"{'QLoRA' if a.qlora else 'LoRA'}, {str(run.dtype).replace('torch.', '')}, {2 * a.batches} steps each, "
          f"alternating: {first} {total[first]:.2f} s, {second} {total[second]:.2f} s; "
          f"{first} / {second} = {total[first] / total[second]:.3f}x the time")


if __name__ == "__main__":
    main()
