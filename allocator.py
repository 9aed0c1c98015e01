"""
The memory allocator under the CPU tensors: mimalloc when it is installed, else glibc held lean.

A training step frees and reallocates gigabytes of activations. glibc either keeps freed pages
resident (fragmented between live blocks: RSS far above the live tensors) or, with a low mmap
threshold, returns each block to the OS at once and faults every page of the next one back in
(~1 us a page on a VM: training ran at less than half its speed). mimalloc keeps freed memory for
reuse a short while and reuses it without page faults, at 10-15% more peak RSS than the lean glibc
setting. An allocator replaces malloc only if it is loaded before the process starts, so each
entry point (train.py, merge.py, generate.py, audit.py) calls preload() first: it re-executes the
same command line once with LD_PRELOAD naming the libmimalloc.so of the cmeel-mimalloc wheel
(requirements.txt). Under torchrun every worker does so itself. PURE_QLORA_ALLOCATOR=glibc turns it off.

    import allocator
    allocator.preload()          # first line of an entry point's __main__
    allocator.name()             # "mimalloc" or "glibc"

This file imports nothing of the project.
"""
import ctypes
import glob
import os
import sys


def mimalloc_path() -> str | None:
    """libmimalloc.so as the cmeel-mimalloc wheel installs it (site-packages/cmeel.prefix/lib)."""
    for d in sys.path:
        found = sorted(glob.glob(os.path.join(d, "cmeel.prefix", "lib", "libmimalloc.so*")))
        if found:
            return found[0]
    return None


def name() -> str:
    try:
        with open("/proc/self/maps") as f:
            return "mimalloc" if "libmimalloc" in f.read() else "glibc"
    except OSError:
        return "glibc"


def preload():
    """Re-execute this command line with mimalloc preloaded, once, if it is installed and not yet loaded."""
    if os.environ.get("PURE_QLORA_ALLOCATOR", "mimalloc") != "mimalloc" or not sys.platform.startswith("linux"):
        return
    if os.environ.get("_PURE_QLORA_PRELOADED") or name() == "mimalloc":
        return   # the marker: a preload that did not take (an unloadable library) is not retried forever
    lib = mimalloc_path()
    if lib is None:
        return
    env = dict(os.environ, _PURE_QLORA_PRELOADED="1",
               LD_PRELOAD=":".join(p for p in (lib, os.environ.get("LD_PRELOAD")) if p))
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, sys.orig_argv, env)   # orig_argv keeps the interpreter's own flags (-u, -X ...)


def limit_heap_retention(kb: int = 256):
    """glibc only: send every allocation over `kb` KB to its own mapping, returned to the OS when freed,
    so that resident memory follows the live tensors (what the audit's estimator counts).

    glibc raises its mmap threshold as large blocks are freed; activations then come from the heap,
    and freed pages stay resident, fragmented between live blocks: the default QLoRA run peaked at
    3.5 GB for ~1.5 GB of live tensors. Even at a fixed 1 MB threshold, big blocks are served from
    free heap space that smaller saved tensors keep fragmented (forward grew 70-100 KB per token and
    layer for 41 KB of saved tensors). At 256 KB the heap holds only small objects and the peak is
    the saved tensors plus one loss chunk; the price is a page fault for every page of every new block."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, kb << 10)   # -3 = M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass   # not glibc


def release_freed_memory():
    """Hand freed heap pages back to the OS (glibc keeps them otherwise, and they count as RSS)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass   # not glibc: nothing to do
