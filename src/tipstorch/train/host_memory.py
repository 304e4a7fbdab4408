"""Host memory kept by the process between training steps (glibc malloc on Linux), the CPU's counterpart of
the caching allocator CUDA tensors get from torch.

A training step on a CPU allocates and frees the same large tensors every step (activations, gradients,
the [tokens, K] prototype scores: hundreds of MB at S/14 batch 8). glibc serves every block above its
mmap threshold (128 kB to 32 MB) with a fresh ``mmap`` and gives it back with ``munmap`` on free, and trims
the top of its heap above 128 kB: each step then faults every page of those tensors in again, the
kernel zeroing each one (S/14 batch 8: ~500k minor page faults and 0.8-2 s of system time per step;
the A/B: ``benchmarks/train_step.py --host-memory default`` against ``keep``, README "Benchmarks").
``keep_freed_memory`` tells malloc to take every block from its heap and never to return freed memory to
the system, so from the second step on a step reuses the pages of the one before: the resident set
stays at a step's peak instead of falling back between steps. Values are untouched: this changes where bytes live,
not what is computed. Elsewhere (no glibc, macOS, Windows) it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

# mallopt parameters (glibc malloc.h)
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -2, -3, -4
KEEP, DEFAULT = "keep", "default"
_SETTINGS = {
    KEEP: {M_MMAP_MAX: 0, M_TRIM_THRESHOLD: 2**31 - 1, M_TOP_PAD: 64 * 2**20},
    # glibc's steady state once a block of 32 MB or more was freed (its dynamic thresholds then stay at
    # their ceilings): every larger block mmapped and unmapped, the heap top trimmed above 64 MB. For a
    # process-level A/B (``benchmarks/train_step.py --host-memory default``): switching within a process
    # would trim the pages ``keep`` holds.
    DEFAULT: {
        M_MMAP_MAX: 65536,
        M_MMAP_THRESHOLD: 32 * 2**20,
        M_TRIM_THRESHOLD: 64 * 2**20,
        M_TOP_PAD: 128 * 1024,
    },
}


@functools.cache
def _glibc_mallopt():
    """glibc's ``mallopt`` (None without glibc)."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
        libc.gnu_get_libc_version  # noqa: B018 (only glibc has it)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return None
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt


def use_host_memory(policy: str) -> bool:
    """``keep`` (freed memory stays with the process, no block is mmapped) or ``default`` (glibc's
    mmapped large blocks, as in a run without ``keep``). Returns whether malloc took the settings (False
    without glibc)."""
    if policy not in _SETTINGS:
        raise ValueError(f"host memory policy must be one of {sorted(_SETTINGS)}, got {policy!r}")
    mallopt = _glibc_mallopt()
    if mallopt is None:
        return False
    return all(mallopt(parameter, value) == 1 for parameter, value in _SETTINGS[policy].items())


def keep_freed_memory() -> bool:
    """``use_host_memory("keep")``: what a CPU training run sets once, before its first step."""
    return use_host_memory(KEEP)
