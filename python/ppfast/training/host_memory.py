"""CPU ranks keep the memory a step frees for the next step, so steps stop faulting pages in."""

from __future__ import annotations

import ctypes
import os
import platform

# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# glibc's largest M_MMAP_THRESHOLD on 64-bit (HEAP_MAX_SIZE / 2): larger blocks are mmapped
_MMAP_THRESHOLD_MAX = 32 << 20
_USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")


def keep_freed_memory() -> bool:
    """Have glibc's malloc keep freed memory in the process (blocks up to 32 MiB on its heap,
    and the heap's top never given back). Returns whether the settings were applied.

    A CPU tensor's memory comes from malloc. By default glibc serves large blocks with fresh
    mmaps (every page faulted in at its first touch, given back at free) and trims the top of
    its heap whenever more than a moving threshold is free there. A pipeline step's memory
    rises and falls, and a split backward holds each microbatch's layer inputs and output
    gradients from its I to its W, so the heap's top is freed and grown again every step: a
    zero-bubble step on a transformer faults thousands of pages in (tens of ms of kernel time
    per step), where the same step with a fused backward faults none. With these settings
    each step reuses the pages of the step before; the process keeps its peak, which every
    step reaches anyway.

    Nothing changes off Linux/glibc, under another malloc (``LD_PRELOAD``), where the user
    set glibc's own variables (``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_``,
    ``MALLOC_TOP_PAD_``), or with ``PPFAST_KEEP_HOST_MEMORY=0``.
    """
    if os.environ.get("PPFAST_KEEP_HOST_MEMORY", "1") == "0":
        return False
    if any(var in os.environ for var in _USER_SETTINGS):
        return False
    if "malloc" in os.environ.get("LD_PRELOAD", ""):
        return False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    ok = mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX) == 1
    # -1: the heap's top is never trimmed
    return mallopt(_M_TRIM_THRESHOLD, -1) == 1 and ok
