"""``icap-gateway rules check|bench|compare``: rules as an admin sees them before serving them."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gateway.config import ScanSettings
from gateway.interfaces import ScanContext
from gateway.scanning.engine import Engine, RulesError
from gateway.scanning.rules import CompiledRules, RulesManager, compile_directory, find_errors
from gateway.scanning.scanner import YaraScanner, externals_for
from gateway.scanning.yara_engine import YaraEngine
from gateway.scanning.yarax import YaraXEngine

__all__ = ["add_commands", "compare_engines", "measure"]


def add_commands(subparsers: Any) -> None:
    """``icap-gateway rules check DIR [--json]``."""
    rules = subparsers.add_parser("rules", help="check YARA rules").add_subparsers(
        dest="rules_command", required=True, metavar="SUBCOMMAND")
    check = rules.add_parser(
        "check", help="compile a rules directory as the gateway would; errors as file:line: message")
    check.add_argument("directory", metavar="DIR")
    check.add_argument("--json", action="store_true", help="print the result as JSON")
    check.add_argument("--engine", choices=["yara", "yara-x"], default="yara",
                       help="compile with this engine (default yara), before switching [scan] engine")
    check.set_defaults(func=_rules_check)
    bench = rules.add_parser(
        "bench", help="measure a rules directory: compile time, per-scan cost, throughput")
    bench.add_argument("directory", metavar="DIR")
    bench.add_argument("--seconds", type=float, default=2.0, help="time per measurement (default 2)")
    bench.add_argument("--json", action="store_true", help="print the result as JSON")
    bench.set_defaults(func=_rules_bench)
    compare = rules.add_parser(
        "compare", help="yara against yara-x on a rules directory, through the gateway's scanner")
    compare.add_argument("directory", metavar="DIR")
    compare.add_argument("--seconds", type=float, default=3.0, help="time per measurement (default 3)")
    compare.add_argument("--threads", type=int, default=2, help="scanning threads (default 2)")
    compare.add_argument("--json", action="store_true", help="print the result as JSON")
    compare.set_defaults(func=_rules_compare)


def _rules_check(args: argparse.Namespace) -> int:
    directory = Path(args.directory)
    engine: Engine = YaraXEngine(1) if args.engine == "yara-x" else YaraEngine()
    try:
        compiled = compile_directory(directory, engine)
    except RulesError as first:
        # yara can list every broken file; yara-x reports the first error and a count
        errors = (find_errors(directory, engine) if engine.name == "yara" else []) or [first]
        if args.json:
            print(json.dumps({"ok": False, "errors": [e.as_dict() for e in errors]}))
        else:
            for e in errors:
                print(e, file=sys.stderr)
        return 1
    finally:
        engine.close()
    if args.json:
        print(json.dumps({
            "ok": True, "rules": compiled.rule_count, "files": compiled.file_count,
            "version": compiled.version, "warnings": list(compiled.warnings),
            "seconds": round(compiled.compile_seconds, 3),
        }))
    else:
        for warning in compiled.warnings:
            print(f"warning: {warning}", file=sys.stderr)
        print(f"{directory}: {compiled.rule_count} rules in {compiled.file_count} files, "
              f"version {compiled.version}")
    return 0


def measure(compiled: CompiledRules, seconds: float = 2.0) -> dict[str, float]:
    """Scan cost of a ruleset, measured in a worker thread as the gateway runs
    it (the main thread is slower: the interpreter's signal checks)."""
    rng = random.Random(0)
    random_mib = rng.randbytes(1024**2)
    words = [b"the", b"gateway", b"scans", b"bodies", b"with", b"rules", b"and", b"text", b"of", b"web"]
    text_mib = b" ".join(rng.choice(words) for _ in range(260_000))[: 1024**2]
    externals = externals_for(ScanContext(direction="response", filetype="text/html"))
    result: dict[str, float] = {}

    def run(name: str, data: bytes, per: Callable[[float, int], float]) -> None:
        compiled.match(data, externals)  # warm up
        n, started = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - started) < seconds:
            compiled.match(data, externals)
            n += 1
        result[name] = per(elapsed, n)

    def work() -> None:
        run("ms_per_1kib_scan", random_mib[:1024], lambda t, n: 1000 * t / n)
        run("mb_per_s_random", random_mib, lambda t, n: n * len(random_mib) / t / 1e6)
        run("mb_per_s_text", text_mib, lambda t, n: n * len(text_mib) / t / 1e6)

    thread = threading.Thread(target=work, name="bench")
    thread.start()
    thread.join()
    return result


def _rules_bench(args: argparse.Namespace) -> int:
    try:
        compiled = compile_directory(Path(args.directory))
    except RulesError as e:
        print(e, file=sys.stderr)
        return 1
    figures = {"rules": compiled.rule_count, "compile_seconds": compiled.compile_seconds,
               **measure(compiled, args.seconds)}
    if args.json:
        print(json.dumps({k: round(v, 3) for k, v in figures.items()}))
    else:
        print(f"{args.directory}: {compiled.rule_count} rules, compiled in "
              f"{compiled.compile_seconds:.2f} s; one thread: "
              f"{figures['ms_per_1kib_scan']:.2f} ms per 1 KiB scan, "
              f"{figures['mb_per_s_random']:.0f} MB/s random bytes, "
              f"{figures['mb_per_s_text']:.0f} MB/s text")
    return 0




def _cpu_seconds(pids: list[int]) -> float:
    """utime + stime of live processes, from /proc (Linux)."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def compare_engines(directory: Path, seconds: float = 3.0, threads: int = 2) -> list[dict[str, Any]]:
    """Both engines through ``YaraScanner.scan_blocking`` from ``threads``
    threads (yara-x: as many worker processes), no verdict cache: scans per
    second, latency and CPU per scan, MB/s.  Bodies: 1 KiB, 64 KiB and 1 MiB of random
    bytes in memory, and 1 MiB spooled to a file (scanned by path)."""
    rng = random.Random(0)
    spool = Path(tempfile.mkdtemp(prefix="engine-bench-"))
    spooled = spool / "body.bin"
    mib = rng.randbytes(1024**2)
    spooled.write_bytes(mib)
    bodies: list[tuple[str, bytes | str, int]] = [
        ("1 KiB", mib[:1024], 1024), ("64 KiB", mib[:65536], 65536), ("1 MiB", mib, len(mib)),
        ("1 MiB file", str(spooled), len(mib))]
    context = ScanContext(direction="response", filetype="application/octet-stream", filename="a.bin")
    rows: list[dict[str, Any]] = []
    for name in ("yara", "yara-x"):
        engine: Engine = YaraXEngine(threads) if name == "yara-x" else YaraEngine()
        manager = RulesManager(directory, None, None, 0, engine=engine)  # type: ignore[arg-type]
        started = time.perf_counter()
        manager.load_now()
        compile_s = time.perf_counter() - started
        scanner = YaraScanner(manager, None, None, ScanSettings(), spool)  # type: ignore[arg-type]
        try:
            for label, body, size in bodies:
                for _ in range(3 * threads):  # warm: every worker holds the rules
                    assert scanner.scan_blocking(body, context).outcome == "clean"
                pids = [os.getpid(), *(engine.pids() if isinstance(engine, YaraXEngine) else [])]
                counts = [0] * threads
                stop = time.perf_counter() + seconds

                def work(i: int, body: bytes | str = body, stop: float = stop,
                         scanner: YaraScanner = scanner, counts: list[int] = counts) -> None:
                    while time.perf_counter() < stop:
                        scanner.scan_blocking(body, context)
                        counts[i] += 1

                cpu0, t0 = _cpu_seconds(pids), time.perf_counter()
                workers = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
                for t in workers:
                    t.start()
                for t in workers:
                    t.join()
                elapsed, cpu = time.perf_counter() - t0, _cpu_seconds(pids) - cpu0
                n = sum(counts)
                rows.append({
                    "engine": name, "body": label, "threads": threads, "scans": n,
                    "scans_per_s": n / elapsed, "ms_per_scan": 1000 * elapsed * threads / n,
                    "cpu_ms_per_scan": 1000 * cpu / n, "mb_per_s": n * size / elapsed / 1e6,
                    "compile_s": compile_s,
                })
        finally:
            engine.close()
    spooled.unlink()
    spool.rmdir()
    return rows


def _rules_compare(args: argparse.Namespace) -> int:
    try:
        results = compare_engines(Path(args.directory), args.seconds, args.threads)
    except RulesError as e:
        print(e, file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(results))
        return 0
    for r in results:
        print(f"{r['engine']:7} {r['body']:10} {r['threads']} threads: {r['scans_per_s']:8.0f} scans/s "
              f"{r['ms_per_scan']:7.2f} ms/scan  {r['cpu_ms_per_scan']:7.2f} CPU ms/scan "
              f"{r['mb_per_s']:7.0f} MB/s  (compile {r['compile_s']:.1f} s)")
    return 0
