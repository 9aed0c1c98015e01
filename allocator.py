"""
The memory allocator under the CPU tensors: tcmalloc, jemalloc or mimalloc when one is installed, else
glibc held lean.

A training step frees and reallocates gigabytes of activations. glibc either keeps freed pages
resident (fragmented between live blocks: RSS far above the live tensors) or, with a low mmap
threshold, returns each block to the OS at once and faults every page of the next one back in
(~1 us a page on a VM: training runs at half its speed). The other allocators keep freed memory for
reuse and reuse it without page faults, at 5-15% more peak RSS than the lean glibc setting. An
allocator replaces malloc only if it is loaded before the process starts, so each entry point
(train.py, merge.py, generate.py, audit.py) calls preload() first: it re-executes the same command
line once with LD_PRELOAD naming the allocator. Under torchrun every worker does so itself.

Measured side by side on this project's 2-core AVX2 machine, fp32 (python bench/allocator.py; LoRA / QLoRA
real tokens/s, peak RSS): tcmalloc 136 / 120 (1.78 / 1.41 GB), jemalloc 121 / 116 (1.78 / 1.43 GB), mimalloc
120 / 109 (1.87 / 1.50 GB), glibc with a 256 KB mmap threshold 83 / 69 (1.73 / 1.40 GB). mimalloc then still
returned memory freed for 10 ms to the OS; kept for reuse (preload() sets MIMALLOC_PURGE_DELAY), it ran as fast
as tcmalloc on a 2-core Xeon (AMX), fp32: tcmalloc 349 / 314 (1.82 / 1.45 GB), mimalloc 351 / 314 (1.95 / 1.59
GB), its 10 ms default 279 / 206 (1.89 / 1.50 GB), jemalloc 331 / 296, glibc 256 KB 194 / 172. So the first one
installed wins, in that order: tcmalloc is as fast and leaner. Only mimalloc comes from PyPI (the cmeel-mimalloc wheel, in
requirements.txt), so a fresh machine gets it; tcmalloc and jemalloc come from the system
(Debian/Ubuntu: libtcmalloc-minimal4, libjemalloc2). PURE_QLORA_ALLOCATOR=tcmalloc|jemalloc|mimalloc
picks one, =glibc keeps glibc.

    import allocator
    allocator.preload()          # first lines of an entry point, before torch is imported
    allocator.name()             # "tcmalloc", "jemalloc", "mimalloc" or "glibc"

This file imports nothing of the project.
"""
import ctypes
import ctypes.util
import glob
import os
import sys

FASTEST_FIRST = ("tcmalloc", "jemalloc", "mimalloc")


def mimalloc_path() -> str | None:
    """libmimalloc.so as the cmeel-mimalloc wheel installs it (site-packages/cmeel.prefix/lib)."""
    for d in sys.path:
        found = sorted(glob.glob(os.path.join(d, "cmeel.prefix", "lib", "libmimalloc.so*")))
        if found:
            return found[0]
    return None


def find(allocator: str) -> str | None:
    """Where an allocator's library is: a path, a soname the dynamic loader finds, or None."""
    if allocator == "mimalloc":
        return mimalloc_path()
    return ctypes.util.find_library({"tcmalloc": "tcmalloc_minimal", "jemalloc": "jemalloc"}[allocator])


def choose() -> tuple[str, str | None]:
    """(name, library) that preload() loads: PURE_QLORA_ALLOCATOR's choice, else the fastest installed."""
    want = os.environ.get("PURE_QLORA_ALLOCATOR", "auto")
    if want == "glibc" or not sys.platform.startswith("linux"):
        return "glibc", None
    for n in (FASTEST_FIRST if want == "auto" else (want,)):
        if n in FASTEST_FIRST and (lib := find(n)):
            return n, lib
    return "glibc", None


def name() -> str:
    """The allocator this process runs on: a preloaded one found in its memory map, else glibc."""
    try:
        with open("/proc/self/maps") as f:
            maps = f.read()
    except OSError:
        return "glibc"
    return next((n for n in FASTEST_FIRST if f"lib{n}" in maps), "glibc")


def preload():
    """Re-execute this command line with the chosen allocator preloaded, once, unless one already runs."""
    if os.environ.get("_PURE_QLORA_PRELOADED") or name() != "glibc":
        return   # the marker: a preload that did not take (an unloadable library) is not retried forever
    chosen, lib = choose()
    if lib is None:
        return
    env = dict(os.environ, _PURE_QLORA_PRELOADED="1",
               LD_PRELOAD=":".join(p for p in (lib, os.environ.get("LD_PRELOAD")) if p))
    if chosen == "mimalloc":
        # mimalloc hands memory freed for 10 ms back to the OS: between a step's backward and the next
        # forward is longer, so every activation was faulted in again, page by page (~800 MB a step
        # of the default model, 15% of its time). An hour keeps it for reuse through a run; an explicit
        # release (release_freed_memory(force=True)) still returns it. The caller's own setting wins.
        env.setdefault("MIMALLOC_PURGE_DELAY", str(3600 * 1000))
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


def release_freed_memory(force: bool = False):
    """Hand freed heap pages back to the OS. glibc: malloc_trim, cheap enough for every step (it keeps
    them otherwise, and they count as RSS). force=True also asks mimalloc or tcmalloc to return the free
    memory they keep for reuse: done once, before measuring what is resident besides the tensors."""
    try:
        if name() == "glibc":
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        elif force and name() == "mimalloc":
            ctypes.CDLL(None).mi_collect(ctypes.c_bool(True))
        elif force and name() == "tcmalloc":
            ctypes.CDLL(None).MallocExtension_ReleaseFreeMemory()
    except (OSError, AttributeError):
        pass   # not glibc, or the symbol is not there: nothing to do
