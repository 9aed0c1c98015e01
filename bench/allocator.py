"""
Which CPU allocator trains fastest, and at what memory: the candidates side by side, same steps, in one run.

    python bench/allocator.py                    # glibc at three mmap thresholds, and each allocator installed
    python bench/allocator.py --preload jemalloc=/usr/lib/x86_64-linux-gnu/libjemalloc.so.2 \\
                              --preload tcmalloc=/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4

Each candidate runs train.py in its own process (default model, batch 4, sequences <= 256, no dropout),
LoRA and QLoRA; prints real tokens/s (median over the steps after the first) and peak RSS.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from allocator import FASTEST_FIRST, find  # noqa: E402


def run(mode, env, extra, steps, out):
    cmd = [sys.executable, str(ROOT / "train.py"), "--out", str(out), "--overwrite", "--max-steps", str(steps),
           "--dropout", "0", "--eval-examples", "0", "--log-every", "1000", *extra] + (["--qlora"] if mode == "qlora" else [])
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env=dict(os.environ, **env))
    steps = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in l]
    tps = [(b["tokens"] - a["tokens"]) / (b["elapsed"] - a["elapsed"]) for a, b in zip(steps, steps[1:])]
    return statistics.median(tps), max(s["peak_mem"] for s in steps)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=10, help="optimizer steps per candidate and mode")
    p.add_argument("--preload", action="append", default=[], metavar="NAME=PATH", help="another allocator library to try")
    p.add_argument("--dtype", default="", help="float32 | bfloat16 (default: train.py's choice)")
    a = p.parse_args()
    glibc = dict(PURE_QLORA_ALLOCATOR="glibc")
    cands = {f"glibc, mmap threshold {kb} KB": (glibc, ["--cpu-mmap-kb", str(kb)]) for kb in (256, 1024, 32768)}
    cands.update({n: (dict(PURE_QLORA_ALLOCATOR=n), []) for n in FASTEST_FIRST if find(n)})
    if find("mimalloc"):   # what preload() changes: mimalloc's own default returns memory freed for 10 ms
        cands["mimalloc, purge delay 10 ms"] = (dict(PURE_QLORA_ALLOCATOR="mimalloc", MIMALLOC_PURGE_DELAY="10"), [])
    for spec in a.preload:
        name, _, path = spec.partition("=")
        cands[name] = (dict(glibc, LD_PRELOAD=path), [])
    extra = ["--dtype", a.dtype] if a.dtype else []
    print(f"{'':34s} {'LoRA tok/s':>10s} {'peak':>8s} {'QLoRA tok/s':>12s} {'peak':>8s}")
    with tempfile.TemporaryDirectory() as tmp:
        for name, (env, flags) in cands.items():
            (lt, lp), (qt, qp) = (run(m, env, flags + extra, a.steps, Path(tmp) / m) for m in ("lora", "qlora"))
            print(f"{name:34s} {lt:10.1f} {lp / 2**30:6.2f} GB {qt:12.1f} {qp / 2**30:6.2f} GB", flush=True)


if __name__ == "__main__":
    main()
