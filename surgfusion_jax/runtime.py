"""Process settings for XLA on the CPU: glibc's allocator tuned for large, short-lived buffers.

XLA:CPU allocates a step's temporary buffers with malloc and frees them when the step
ends. glibc serves every block above its mmap threshold (at most 32 MiB) with a fresh
`mmap`, so the large activations of each step arrive as new 4 KiB pages, each one a page
fault that the kernel zeroes: ~105,000 faults per fusion step at the paper's shapes, a
fifth of the step's CPU time in the kernel (docs/performance.md, "glibc's allocator").
Three of glibc's tunables remove most of it:

  glibc.malloc.hugetlb=1            blocks glibc mmaps are advised into transparent huge
                                    pages (2 MiB, where the kernel's THP mode is
                                    `madvise` or `always`): ~500x fewer faults
  glibc.malloc.mmap_threshold=32M   blocks up to 32 MiB come from the heap and are reused
  glibc.malloc.trim_threshold=4G    the heap is not handed back to the kernel after a step

Same results bit for bit (the allocator moves no arithmetic). glibc reads its tunables
only when a process starts, so the command-line entry points call
`reexec_with_tuned_malloc()` first: it re-executes the same command once with them added
to GLIBC_TUNABLES. Tunables the user already set are kept as they are; set
SURGFUSION_MALLOC_TUNING=0 to leave the allocator alone. Nothing happens on systems
without glibc (macOS, musl) or when imported as a library.
"""

from __future__ import annotations

import os
import platform
import sys
from typing import Mapping

MALLOC_TUNABLES = {
    "glibc.malloc.hugetlb": "1",
    "glibc.malloc.mmap_threshold": str(32 * 1024 * 1024),  # glibc's upper limit
    "glibc.malloc.trim_threshold": str(4 * 1024 ** 3),
}
OPT_OUT = "SURGFUSION_MALLOC_TUNING"  # "0": leave glibc's defaults
_DONE = "SURGFUSION_MALLOC_TUNED"  # set in the re-executed process: never twice


def _parse(tunables: str) -> dict[str, str]:
    pairs = (item.partition("=") for item in tunables.split(":") if item)
    return {name: value for name, _, value in pairs}


def tuned_environ(environ: Mapping[str, str]) -> dict[str, str] | None:
    """`environ` with MALLOC_TUNABLES merged into GLIBC_TUNABLES (the ones it sets
    already keep their values), or None when nothing is to change: tuning turned off,
    already done, or every tunable already set."""
    if environ.get(OPT_OUT, "1") == "0" or environ.get(_DONE):
        return None
    current = environ.get("GLIBC_TUNABLES", "")
    have = _parse(current)
    missing = {k: v for k, v in MALLOC_TUNABLES.items() if k not in have}
    if not missing:
        return None
    added = ":".join(f"{k}={v}" for k, v in missing.items())
    return {**environ, "GLIBC_TUNABLES": f"{current}:{added}" if current else added,
            _DONE: "1"}


def uses_glibc() -> bool:
    return sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"


def reexec_with_tuned_malloc() -> None:
    """Re-executes this process's command once with `tuned_environ` (Linux with glibc
    only); returns when there is nothing to do. Call it first in a `__main__` block,
    before anything is printed or started."""
    env = tuned_environ(os.environ)
    if env is None or not uses_glibc() or not getattr(sys, "orig_argv", None):
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, list(sys.orig_argv), env)

