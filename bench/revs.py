"""
One train.py command on an earlier commit and on this tree, side by side in one run: what a change did to
speed, memory and the losses.

    python bench/revs.py 278021e                          # the default run (python train.py --qlora) on both
    python bench/revs.py 278021e --max-steps 20 --dtype float32   # any other train.py flags

The base is checked out into a temporary git worktree; each side runs in its own process, the base first.
Prints real tokens/s (median over the steps after the first), the peak memory (CPU: peak RSS, loading
included), the eval losses before and after training and the last step's loss, then this tree / base.
"""
import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(tree: Path, flags: list, out: Path) -> dict:
    subprocess.run([sys.executable, str(tree / "train.py"), "--out", str(out), "--overwrite", *flags],
                   check=True, stdout=subprocess.DEVNULL, cwd=tree)
    steps = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    summary = json.loads((out / "summary.json").read_text())
    tps = [(b["tokens"] - a["tokens"]) / (b["elapsed"] - a["elapsed"]) for a, b in zip(steps, steps[1:])]
    return dict(tok_s=statistics.median(tps), peak=summary["peak_mem"], dtype=summary["dtype"], last=steps[-1]["loss"],
                evals=(summary.get("eval_loss_before"), summary.get("eval_loss_after")))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("base", help="the commit to compare against (anything git rev-parse takes)")
    a, flags = p.parse_known_args()
    flags = flags or ["--qlora"]
    res = {}
    with tempfile.TemporaryDirectory() as tmp:
        tree = Path(tmp) / "base"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(tree), a.base], check=True)
        try:
            for name, where in ((a.base, tree), ("this tree", ROOT)):
                r = res[name] = run(where, flags, Path(tmp) / "out")
                ev = " -> ".join(f"{e:.4f}" for e in r["evals"] if e is not None) or "none"
                print(f"{name:10s} {r['tok_s']:7.1f} real tok/s, peak {r['peak'] / 2**30:.2f} GB ({r['dtype']}), "
                      f"eval loss {ev}, last step's loss {r['last']:.4f}", flush=True)
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], check=True)
    new, old = res["this tree"], res[a.base]
    print(f"this tree / {a.base}: {new['tok_s'] / old['tok_s']:.2f}x speed, {new['peak'] / old['peak']:.2f}x peak memory "
          f"(train.py {' '.join(flags)})")


if __name__ == "__main__":
    main()
