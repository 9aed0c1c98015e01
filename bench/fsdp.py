"""
train.py --fsdp at 1, 2 and 3 ranks (torchrun, gloo on CPU, or nccl with --device cuda): what each rank
holds of the base, its peak memory, and the speed, on the same global batch.

    python bench/fsdp.py                          # default model, QLoRA, 6 examples per step, 4 steps
    python bench/fsdp.py --lora --worlds 1,2      # LoRA on the 16-bit base
    python bench/fsdp.py --device cuda --worlds 1,2 --model path/to/model   # per-GPU memory on the GPUs at hand
    python bench/fsdp.py --device cuda --worlds 1 --cpu-offload             # the shards in host memory (FSDP2's CPUOffloadPolicy)

Peak memory is the process's peak RSS on CPU (loading included: a rank holds its shards and one block
whole while loading) and max_memory_allocated on CUDA (training only).
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default")
    p.add_argument("--worlds", default="1,2,3", help="numbers of ranks to run (default: 1,2,3)")
    p.add_argument("--batch", type=int, default=6, help="examples per step over all ranks (divisible by each world)")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--lora", action="store_true", help="LoRA on the 16-bit base instead of QLoRA")
    p.add_argument("--device", default="cpu")
    p.add_argument("--cpu-offload", action="store_true", help="--fsdp-cpu-offload: each GPU's shards in host memory (GPUs only)")
    a = p.parse_args()
    rows = []
    for world in map(int, a.worlds.split(",")):
        if a.batch % world:
            sys.exit(f"--batch {a.batch} does not divide over {world} ranks")
        with tempfile.TemporaryDirectory() as tmp:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world),
                   "--master_port", str(29600 + world), str(ROOT / "train.py"), "--fsdp", "--model", a.model,
                   "--out", f"{tmp}/run", "--max-steps", str(a.steps), "--batch-size", str(a.batch // world),
                   "--eval-examples", "8", "--warmup-steps", "1", "--device", a.device, "--log-every", "100"]
            cmd += ([] if a.lora else ["--qlora"]) + (["--fsdp-cpu-offload"] if a.cpu_offload else [])
            r = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
            if r.returncode:
                sys.exit(f"world {world} failed:\n{r.stderr[-3000:]}")
            s = json.loads(Path(f"{tmp}/run/summary.json").read_text())
        rows.append((world, s))
        print(f"world {world}: base held per rank {', '.join(f'{b / 2**20:.1f}' for b in s['base_bytes_per_rank'])} MB; "
              f"peak memory per rank {', '.join(f'{m / 2**30:.2f}' for m in s['peak_mem_per_rank'])} GB (while loading "
              f"{', '.join(f'{m / 2**30:.2f}' for m in s['load_peak_mem_per_rank'])}); "
              f"{s['tokens_per_s']:.1f} real tokens/s in all; final loss {s['final_loss']:.4f}", flush=True)
    one = rows[0][1]
    for world, s in rows[1:]:
        print(f"world {world} vs {rows[0][0]}: base per rank {max(s['base_bytes_per_rank']) / max(one['base_bytes_per_rank']):.2f}x, "
              f"peak per rank {max(s['peak_mem_per_rank']) / max(one['peak_mem_per_rank']):.2f}x (loading "
              f"{max(s['load_peak_mem_per_rank']) / max(one['load_peak_mem_per_rank']):.2f}x), "
              f"losses equal to {max(abs(x - y) for x, y in zip(s['losses'], one['losses'])):.1e}")


if __name__ == "__main__":
    main()
