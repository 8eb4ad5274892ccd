"""glibc malloc thresholds for a serving process.

A body held in memory (up to ``[scan] memory_threshold``, 1 MiB by default)
is a large allocation on the reactor thread.  With glibc's dynamic
thresholds (mmap above about 1 MiB after the first such free, trim the
heap top above twice that) a few bodies freed together are handed back to
the kernel after each transaction and faulted in again, zero-filled, by
the next.  Measured with /work/prof/cpu.py (empty ruleset, 1 MiB RESPMOD,
2 workers): 84-244 minor page faults and 343-432 us of sys CPU per
transaction; with the thresholds below 1 fault and 136-224 us.

The mmap threshold is fixed at glibc's own ceiling for its dynamic one
(DEFAULT_MMAP_THRESHOLD_MAX, 32 MiB on 64-bit): bigger blocks (a decoded
body near ``max_decoded_size``) are still mapped and unmapped at once.  The
heap keeps at most ``trim_threshold`` bytes free at its top (the caller
passes ``[server] body_memory_budget``, what a worker may hold in bodies
anyway) before returning memory to the kernel, so what is kept is bounded.

An administrator's own ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_``
environment variables win: that value is not overridden.  Other C
libraries (musl) have no such knobs; nothing is done there.

The thread cache (:func:`with_tcache`).  A YARA scan allocates and frees
thousands of small objects (the ``pe`` module rebuilds its object tree for
every scan).  glibc's per-thread cache keeps 7 freed chunks per size; the
rest go back to the arena's bins.  In a scanning thread's own arena that is
cheap, but the reactor thread allocates from the main arena, which the
interpreter has fragmented, and there each overflow walks the bins: a
1 KiB signature-base scan cost 830-930 us of CPU on the main thread
against 410-430 us in a thread (``_int_malloc`` 22 % of the samples
against 3 %).  With ``glibc.malloc.tcache_count=1024`` both cost the same
(415 against 377 us; 256 is not enough: 776 us).  So the tunable is set to
TCACHE_COUNT in a serving process's environment: it holds what a scan
frees until the next scan takes it again, not more than the arena kept
anyway.  It must be there when the process starts (``GLIBC_TUNABLES`` is
read once): the supervisor starts its workers with it, and a
single-process gateway starts itself again with it
(``gateway.serve``).  An administrator's own ``glibc.malloc.tcache_count``
in ``GLIBC_TUNABLES`` wins.
"""

from __future__ import annotations

import ctypes
import os
import sys
from collections.abc import Mapping

__all__ = ["MMAP_THRESHOLD", "TCACHE_COUNT", "tune_malloc", "with_tcache"]

# mallopt() parameters, glibc's <malloc.h>.
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3

MMAP_THRESHOLD = 32 * 1024**2
_INT_MAX = 2**31 - 1  # mallopt takes a C int

# Chunks the thread cache keeps per size (glibc's default: 7; its maximum:
# 65535).  Four times what a signature-base scan needed (see above): other
# rule sets use more modules.
TCACHE_COUNT = 4096
_TCACHE_TUNABLE = "glibc.malloc.tcache_count"


def tune_malloc(trim_threshold: int, environ: Mapping[str, str] | None = None) -> dict[str, int]:
    """Set the thresholds; returns those set (name: bytes), empty when this
    is not glibc or the environment already chose them."""
    env = os.environ if environ is None else environ
    if not sys.platform.startswith("linux"):
        return {}
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library this process runs on
    except (OSError, AttributeError):
        return {}
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    done = {}
    for name, param, value in (("mmap_threshold", M_MMAP_THRESHOLD, MMAP_THRESHOLD),
                               ("trim_threshold", M_TRIM_THRESHOLD, min(max(trim_threshold, 0), _INT_MAX))):
        if f"MALLOC_{name.upper()}_" in env:
            continue
        if mallopt(param, value) == 1:  # 1: accepted
            done[name] = value
    return done


def with_tcache(environ: Mapping[str, str]) -> dict[str, str] | None:
    """``environ`` with TCACHE_COUNT added to ``GLIBC_TUNABLES``; None when
    there is nothing to add (not Linux, or the tunable is set already)."""
    if not sys.platform.startswith("linux"):
        return None
    tunables = environ.get("GLIBC_TUNABLES", "")
    if any(item.partition("=")[0].strip() == _TCACHE_TUNABLE for item in tunables.split(":")):
        return None
    setting = f"{_TCACHE_TUNABLE}={TCACHE_COUNT}"
    return {**environ, "GLIBC_TUNABLES": f"{tunables}:{setting}" if tunables else setting}
