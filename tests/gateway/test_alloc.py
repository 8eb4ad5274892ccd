"""gateway.alloc: in-memory bodies stay in the heap between transactions."""

from __future__ import annotations

import ast
import platform
import subprocess
import sys
import textwrap

import pytest

from gateway.alloc import MMAP_THRESHOLD, TCACHE_COUNT, with_tcache

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")

# Eight 1 MiB bodies held at once and freed, as a worker under load does,
# counting the page faults of twenty more such rounds.
_ROUNDS = textwrap.dedent("""
    import resource, sys
    from gateway.alloc import tune_malloc
    if sys.argv[1] == "tuned":
        tune_malloc(64 * 1024**2, environ={})
    def one_round():
        bodies = [bytearray(1 << 20) for _ in range(8)]
        for body in bodies:
            body[::4096] = b"x" * len(body[::4096])
    one_round(); one_round()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(20):
        one_round()
    print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) // 20)
""")


def _run(code: str, *args: str) -> str:
    """In a child: mallopt() would change this test process's allocator for good."""
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, check=True,
                         env={"PATH": "/usr/bin:/bin", "PYTHONPATH": ":".join(sys.path)})
    return out.stdout.strip()


def _tune(trim_threshold: int, environ: dict[str, str]) -> dict[str, int]:
    code = f"from gateway.alloc import tune_malloc; print(tune_malloc({trim_threshold}, environ={environ!r}))"
    done: dict[str, int] = ast.literal_eval(_run(code))
    return done


def test_freed_bodies_are_not_faulted_in_again() -> None:
    # 8 MiB a round is 2048 pages: glibc's own thresholds give it all back
    # to the kernel each round; tuned, the heap keeps it.
    assert int(_run(_ROUNDS, "default")) > 1000
    assert int(_run(_ROUNDS, "tuned")) < 50


def test_thresholds_set() -> None:
    assert _tune(64 * 1024**2, {}) == {"mmap_threshold": MMAP_THRESHOLD, "trim_threshold": 64 * 1024**2}


def test_an_administrators_environment_wins() -> None:
    assert _tune(64 * 1024**2, {"MALLOC_TRIM_THRESHOLD_": "131072"}) == {"mmap_threshold": MMAP_THRESHOLD}


def test_a_budget_past_a_c_int_is_clamped() -> None:
    assert _tune(2**40, {})["trim_threshold"] == 2**31 - 1


def test_the_thread_cache_joins_the_tunables() -> None:
    setting = f"glibc.malloc.tcache_count={TCACHE_COUNT}"
    assert with_tcache({"PATH": "/bin"}) == {"PATH": "/bin", "GLIBC_TUNABLES": setting}
    assert with_tcache({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}) == {
        "GLIBC_TUNABLES": f"glibc.malloc.arena_max=2:{setting}"}


def test_an_administrators_thread_cache_wins() -> None:
    assert with_tcache({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2:glibc.malloc.tcache_count=9"}) is None
    assert with_tcache({"GLIBC_TUNABLES": setting_of(TCACHE_COUNT)}) is None  # already there: no restart


def setting_of(count: int) -> str:
    return f"glibc.malloc.tcache_count={count}"
