"""Findings of an attack on inline scans (gateway.scanning.handoff.InlineScans,
YaraScanner._scan_inline) and on the single-process restart with the thread
cache (gateway.serve): each test failed before its fix."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from gateway.interfaces import ScanContext, Verdict
from gateway.scanning.cache import VerdictCache
from gateway.scanning.handoff import INLINE_LEARN_SCANS, INLINE_TIMEOUT
from gateway.scanning.scanner import YaraScanner
from tests.peers import require_binary, unavailable
from tests.scanning.conftest import SyncPool, write_rule

REPO = Path(__file__).resolve().parents[2]
CONTEXT = ScanContext(direction="response")

# An administrator's rule (trusted) with a quadratic condition: cheap on
# ordinary bodies (no "AB"), a worst case on 64 KiB of "ABAB..." (hostile).
LOOP_RULE = """
rule pair_distance {
  strings: $a = "AB"
  condition: for any i in (1..#a) : ( for any j in (1..#a) : ( @a[j] == @a[i] + 3 ) )
}
"""
# A web-shell style regex: about 1 ms of CPU per KiB of "<script<script...".
REGEX_RULE = """
rule script_evil {
  strings: $r = /<script[^>]{0,200}evil/
  condition: $r
}
"""


def _scan(scanner: YaraScanner, pool: SyncPool, body: bytes) -> tuple[Verdict, bool, float]:
    """(verdict, scanned inline?, CPU seconds of the calling thread, the reactor's
    stand-in, spent before it was given the pool's work)."""
    out: list[Verdict] = []
    calls = pool.calls
    started = time.thread_time()
    pool.started_at = None
    scanner.scan_then(body, CONTEXT, out.append)
    before_pool = (pool.started_at or time.thread_time()) - started
    assert len(out) == 1
    return out[0], pool.calls == calls, before_pool


class TimedPool(SyncPool):
    """SyncPool that notes when work was handed to it (the reactor's part ends there)."""

    started_at: float | None = None

    def callInThreadWithCallback(self, on_result, f, *args, **kw):  # type: ignore[no-untyped-def]
        self.started_at = time.thread_time()
        super().callInThreadWithCallback(on_result, f, *args, **kw)


def _cheap(scanner: YaraScanner, pool: SyncPool, n: int, size: int = 40_000) -> None:
    for i in range(n):
        _scan(scanner, pool, b"%08d" % i + b"x" * (size - 8))


def test_a_hostile_body_stalls_the_reactor_once_and_no_longer_than_yaras_shortest_timeout(
        tmp_path: Path, reactor: object) -> None:
    # Before: cheap bodies taught "32-64 KiB is cheap", then a 64 KiB body hit
    # the rule's worst case on the reactor for all of [scan] timeout (30 s by
    # default), and again after every 10 s cooldown.
    from gateway.config import ScanSettings
    from gateway.scanning.rules import RulesManager

    write_rule(tmp_path / "rules", "loop.yar", LOOP_RULE)
    pool = TimedPool()
    manager = RulesManager(tmp_path / "rules", reactor, pool, interval=0)  # type: ignore[arg-type]
    manager.load_now()
    closed: list[str] = []
    scanner = YaraScanner(manager, reactor, pool, ScanSettings(timeout=2.0), tmp_path / "spool",  # type: ignore[arg-type]
                          on_inline_closed=closed.append)
    hostile = b"AB" * 32768  # 64 KiB: within INLINE_MAX_BYTES
    held = []
    for _ in range(2):
        _cheap(scanner, pool, 3 * INLINE_LEARN_SCANS)
        verdict, inline, reactor_cpu = _scan(scanner, pool, hostile)
        held.append(reactor_cpu)
        # Reaching the inline timeout is no verdict: the threads scan it again
        # with all of [scan] timeout (2 s here), which this rule still exceeds.
        assert not inline and verdict.reason == "scan-timeout"
    assert held[0] <= INLINE_TIMEOUT + 0.5, held  # once, bounded by YARA's shortest timeout
    assert held[1] < 0.1, held  # never again for this ruleset: straight to the threads
    assert scanner._inline.stalls == 1
    assert closed == [manager.version]  # the metrics hear of it once (icap_gateway_inline_scans_closed_total)


def test_verdict_cache_hits_do_not_make_a_costly_size_class_look_cheap(
        tmp_path: Path, make_scanner: Callable[..., YaraScanner], pool: SyncPool) -> None:
    # Before: one popular body sent again and again was a cache hit (a digest,
    # ~25 us) each time, and the estimate learnt those: its unique variants,
    # ~30 ms of CPU each, then ran on the reactor.
    write_rule(tmp_path / "rules", "script.yar", REGEX_RULE)
    scanner = make_scanner(tmp_path / "rules")
    scanner.cache = VerdictCache(1000)
    body = (b"<script" * 5000)[:30_000]
    for _ in range(3 * INLINE_LEARN_SCANS):  # one miss, then hits
        _scan(scanner, pool, body)
    verdict, inline, _ = _scan(scanner, pool, b"!" + body[1:])  # not cached
    assert verdict.outcome == "clean"
    assert not inline


def _setcap_python() -> Path:
    """A copy of the system Python (Debian's, linked so that it runs from
    anywhere) with a file capability: secure execution when a non-root user
    runs it.  .ci/run installs what it takes."""
    if os.geteuid() != 0:
        unavailable("needs root: setcap, and setpriv to drop to another user")
    setcap = require_binary("setcap")
    require_binary("setpriv")  # the test runs it by name
    system = Path(f"/usr/bin/python{sys.version_info.major}.{sys.version_info.minor}")
    if not system.exists():
        unavailable(f"{system} is not installed (Debian package: see .ci/run)")
    copy = Path(f"/tmp/icap-gateway-test-python-cap-{os.getpid()}")
    shutil.copy2(system, copy)
    done = subprocess.run([setcap, "cap_net_bind_service+ep", str(copy)], capture_output=True, text=True)
    if done.returncode:
        copy.unlink()
        unavailable(f"setcap failed (a file system without capabilities?): {done.stderr.strip()}")
    return copy


def test_a_single_process_gateway_restarts_itself_once_even_when_the_loader_drops_the_tunable() -> None:
    # Before: glibc erases GLIBC_TUNABLES under secure execution (an interpreter
    # with file capabilities run by another user), so gateway.serve found it
    # missing after every restart and started itself again, forever.
    python = _setcap_python()
    work = Path(tempfile.mkdtemp(prefix="icap-gateway-test-"))  # pytest's own is closed to other users
    try:
        work.chmod(0o777)
        starts = work / "starts"
        site = next((Path(sys.prefix) / "lib").glob("python*/site-packages"))
        # -c code is in sys.orig_argv: it runs again at every start and counts it.
        code = (f"import sys; open({str(starts)!r}, 'a').write('x\\n'); "
                "sys.argv = ['icap-gateway', 'serve', '--listen', 'tcp:0:interface=127.0.0.1', "
                f"'--workers', '1', '--rules', {str(REPO / 'rules')!r}]; "
                "from gateway.cli import main; sys.exit(main())")
        env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "ICAP_GATEWAY_RESTARTED")}
        env["PYTHONPATH"] = f"{REPO}:{site}"
        proc = subprocess.Popen(
            ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", str(python), "-c", code],
            cwd=work, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            time.sleep(4)
        finally:
            proc.kill()  # the process this test started (the same pid across the restart)
            proc.wait()
        count = len(starts.read_text().splitlines()) if starts.exists() else 0
        assert 1 <= count <= 2, f"started {count} times in 4 s"
    finally:
        python.unlink()
        shutil.rmtree(work, ignore_errors=True)
