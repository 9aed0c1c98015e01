"""
NF4 speed against bitsandbytes' CPU backend (and torchao's NF4 if it is installed), same run.

    python bench/nf4.py                  # 1536 x 576 (a SmolLM2 MLP weight), 1024 tokens
    python bench/nf4.py --rows 4096 --cols 4096

Prints milliseconds (median of repeats) and ratios; lower is better. Then a pass as training makes one:
every linear of the default model's 30 blocks (7 shapes each, 210 weights) dequantized to bf16 one after
another, so that each starts with cold caches: ours, ours with nf4.CPU_CAST_CHUNK off (whole layers), and
bitsandbytes, in alternation, mean of 6 passes each.
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import allocator  # noqa: E402

allocator.preload()   # the allocator train.py runs on (bitsandbytes runs on it too, in this process)
import torch  # noqa: E402
from nf4 import NF4Linear, dequantize_nf4, quantize_nf4  # noqa: E402


def timeit(fn, repeat=20, warmup=3):
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts) * 1e3


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=1536)
    p.add_argument("--cols", type=int, default=576)
    p.add_argument("--tokens", type=int, default=1024)
    a = p.parse_args()
    torch.manual_seed(0)
    w = torch.randn(a.rows, a.cols)
    st = quantize_nf4(w)
    rows = [("quantize (double quant)", timeit(lambda: quantize_nf4(w))),
            ("dequantize", timeit(lambda: dequantize_nf4(st, torch.float32)))]
    try:
        import bitsandbytes.functional as F
        packed, qs = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
        rows.append(("bitsandbytes quantize", timeit(lambda: F.quantize_4bit(w, quant_type="nf4", compress_statistics=True))))
        rows.append(("bitsandbytes dequantize", timeit(lambda: F.dequantize_4bit(packed, qs))))
    except ImportError:
        print("bitsandbytes not installed: no comparison")
    try:
        from torchao.dtypes.nf4tensor import to_nf4
        t = to_nf4(w)
        rows.append(("torchao quantize", timeit(lambda: to_nf4(w))))
        rows.append(("torchao dequantize", timeit(lambda: t.get_original_weight())))
    except Exception as e:   # torchao may not install against this torch
        print(f"torchao not available ({type(e).__name__}): skipped")

    x = torch.randn(a.tokens, a.cols, requires_grad=True)
    lin = torch.nn.Linear(a.cols, a.rows, bias=False).requires_grad_(False)
    q = NF4Linear.from_linear(lin)

    def fb(layer):
        y = layer(x)
        y.backward(torch.ones_like(y))
    t_lin, t_q = timeit(lambda: fb(lin)), timeit(lambda: fb(q))
    rows += [("nn.Linear fwd+bwd (frozen weight)", t_lin), ("NF4Linear fwd+bwd", t_q)]
    print(f"\n{a.rows}x{a.cols} weight, {a.tokens} tokens, fp32, {torch.get_num_threads()} threads")
    for name, ms in rows:
        print(f"  {name:36s} {ms:8.3f} ms")
    d = dict(rows)
    if "bitsandbytes dequantize" in d:
        print(f"  dequantize: ours / bitsandbytes = {d['dequantize'] / d['bitsandbytes dequantize']:.2f}x")
        print(f"  quantize:   ours / bitsandbytes = {d['quantize (double quant)'] / d['bitsandbytes quantize']:.2f}x")
    print(f"  NF4Linear / nn.Linear fwd+bwd = {t_q / t_lin:.2f}x (goal <= 1.3x)")
    model_pass()


def model_pass(rounds: int = 6):
    import nf4
    from audit import linear_shapes
    from formats import read_args
    args = read_args("default")
    ws = [torch.randn(o, i).bfloat16() for _ in range(args.n_layers) for i, o in linear_shapes(args).values()]
    states = [quantize_nf4(w) for w in ws]

    def ours(chunk):
        def run():
            nf4.CPU_CAST_CHUNK, keep = chunk, nf4.CPU_CAST_CHUNK
            for st in states:
                dequantize_nf4(st, torch.bfloat16)
            nf4.CPU_CAST_CHUNK = keep
        return run
    sides = {f"ours (pieces of {nf4.CPU_CAST_CHUNK})": ours(nf4.CPU_CAST_CHUNK), "ours, whole layers": ours(1 << 62)}
    try:
        import bitsandbytes.functional as F
        theirs = [F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True) for w in ws]
        sides["bitsandbytes"] = lambda: [F.dequantize_4bit(p, qs) for p, qs in theirs]
    except ImportError:
        pass
    total = dict.fromkeys(sides, 0.0)
    for _ in range(rounds):
        for name, run in sides.items():
            t = time.perf_counter()
            run()
            total[name] += time.perf_counter() - t
    print(f"\na pass over the default model's {len(ws)} block linears, dequantized to bf16 (mean of {rounds}, in alternation)")
    for name, t in total.items():
        print(f"  {name:36s} {t / rounds * 1e3:8.1f} ms")
    first, *_ = total
    print(f"  ours, whole layers / ours = {total['ours, whole layers'] / total[first]:.2f}x"
          + (f"; ours / bitsandbytes = {total[first] / total['bitsandbytes']:.2f}x" if "bitsandbytes" in total else ""))


if __name__ == "__main__":
    main()
