"""
LoftQ on a real model: per layer, ||W - (Q + sBA)|| / ||W|| after each iteration, beside plain NF4's
||W - NF4(W)|| / ||W||, and what the iterations cost.

    python bench/loftq.py                           # the default model, rank 8, alpha 16, 4 iterations
    python bench/loftq.py --model path/to/hf_folder --rank 16 --iters 5

Prints one line per adapted layer and a summary: in how many layers each iteration lowered the error,
and in how many the first one is below plain NF4's (by construction all: the SVD removes part of it).
"""
import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from formats import load_model  # noqa: E402
from lora import ALL_TARGETS, _matches, loftq, lora_scaling  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--iters", type=int, default=4)
    a = p.parse_args()
    model = load_model(a.model, torch.float32, device="cpu")
    scaling = lora_scaling(a.rank, a.alpha)
    rows, t0 = [], time.perf_counter()
    print(f"{'layer':<36} {'NF4':>7} " + " ".join(f"{'iter ' + str(t + 1):>7}" for t in range(a.iters)))
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and _matches(name, ALL_TARGETS) and name.startswith("model.layers."):
            *_, errors = loftq(mod.weight, a.rank, scaling, a.iters)
            rows.append(errors)
            print(f"{name.removeprefix('model.'):<36} " + " ".join(f"{e:7.4f}" for e in errors), flush=True)
    secs = time.perf_counter() - t0
    n = len(rows)
    mean = [sum(r[i] for r in rows) / n for i in range(a.iters + 1)]
    print(f"\n{n} layers, rank {a.rank}, {a.iters} iterations in {secs:.1f} s ({secs / n / a.iters * 1e3:.0f} ms per "
          f"layer and iteration, CPU fp32)")
    print("mean over layers: NF4 " + f"{mean[0]:.4f}; " + "; ".join(f"iter {t + 1} {mean[t + 1]:.4f}" for t in range(a.iters)))
    print(f"iteration 1 below plain NF4 in {sum(r[1] < r[0] for r in rows)}/{n} layers; " + "; ".join(
        f"iteration {t + 1} below iteration {t} in {sum(r[t + 1] < r[t] for r in rows)}/{n}" for t in range(1, a.iters)))


if __name__ == "__main__":
    main()
