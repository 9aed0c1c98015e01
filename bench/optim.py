"""
Optimizer step time: our AdamW8bit against torch.optim.AdamW and bitsandbytes' AdamW8bit, same run.

    python bench/optim.py                 # the default model's LoRA adapters (2.4M parameters, 420 tensors) and one 67M tensor

Prints the median step time of each (ms) and ratios to torch's AdamW. State bytes per parameter too.
"""
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from optim import AdamW8bit  # noqa: E402


def lora_shapes():
    """The default model's adapters at r=8 on all 7 projections: 30 layers x 7 x (A, B)."""
    ins_outs = [(576, 576), (576, 192), (576, 192), (576, 576), (576, 1536), (576, 1536), (1536, 576)]
    return [s for _ in range(30) for i, o in ins_outs for s in ((8, i), (o, 8))]


def bench(make, shapes, steps=10):
    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(s) * 0.02) for s in shapes]
    opt = make(ps)
    for p in ps:
        p.grad = torch.randn_like(p) * 1e-3
    opt.step()   # states allocated
    ts = []
    for _ in range(steps):
        t = time.perf_counter()
        opt.step()
        ts.append(time.perf_counter() - t)
    state = sum(v.numel() * v.element_size() for st in opt.state.values() for v in st.values() if torch.is_tensor(v))
    return statistics.median(ts) * 1e3, state / sum(p.numel() for p in ps)


def main():
    makers = {"torch AdamW": lambda ps: torch.optim.AdamW(ps, lr=1e-3),
              "ours AdamW8bit": lambda ps: AdamW8bit(ps, lr=1e-3)}
    try:
        import bitsandbytes as bnb
        makers["bitsandbytes AdamW8bit"] = lambda ps: bnb.optim.AdamW8bit(ps, lr=1e-3)
    except ImportError:
        print("bitsandbytes not installed: no comparison")
    for name, shapes in (("LoRA adapters of the default model", lora_shapes()), ("one 8192x8192 tensor", [(8192, 8192)])):
        n = sum(torch.Size(s).numel() for s in shapes)
        print(f"\n{name}: {n / 1e6:.1f}M parameters in {len(shapes)} tensors")
        base = None
        for label, make in makers.items():
            ms, bpp = bench(make, shapes, steps=10 if n < 1e7 else 3)
            base = base or ms
            print(f"  {label:24s} {ms:9.1f} ms/step  {ms / base:5.2f}x torch   {bpp:.2f} state bytes/param")


if __name__ == "__main__":
    main()
