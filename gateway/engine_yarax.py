"""The YARA-X engine (``[scan] engine = "yara-x"``): compile and match in worker processes.

yara-x's Python binding holds the GIL while it compiles and while it scans,
so in threads it would use one core and stall the reactor.  Here everything
yara-x does runs in worker processes (``forkserver``: they do not inherit
the reactor, its sockets or its threads), one per scanning thread.  The
thread that runs ``scan_blocking`` checks a worker out, sends the job down
its pipe and waits for the answer (the GIL released), so the rest of the
gateway is unchanged.  A plain pipe per worker, not a
``concurrent.futures.ProcessPoolExecutor``: the executor's queue and
management threads added about 2 ms of latency per scan (3.3 against 1.2 ms
for 1 KiB with signature-base, 2 threads), more than the scan itself, and it
cannot kill one stuck worker.

How it plugs in (see ``gateway.scanner``): :meth:`YaraXEngine.compile_directory`
is the ``RulesManager``'s compiler and returns an ordinary ``CompiledRules``
whose ``rules`` is a :class:`YaraXRules`.  That object answers
``match(data=|filepath=, externals=, timeout=)`` like ``yara.Rules`` does,
with objects carrying ``.namespace`` and ``.rule``, and raises
``yara.TimeoutError`` / ``yara.Error``: the scanner's verdict mapping
(timeout -> unscannable "scan-timeout", failure -> unscannable "engine-error")
applies as is.

Rules reach the workers without each one compiling (2-3 s for
signature-base): one worker compiles the sources the parent read (so the
version hash and the compiled text are the same bytes), serializes the
result, and the parent keeps those bytes and has the other workers load
them (about 1 s for signature-base) before the new set goes into service.
Each answer says which versions the worker holds; a scan job carries the
bytes only to a worker that lacks its version (a replacement for a dead
one).  Each worker keeps the two latest versions, so scans still running on
the old set during a reload do not make it reload back and forth.

A worker that dies fails the scan it was running (an unscannable verdict,
engine-error: its policy applies) and is replaced on demand; one that does not
answer within the scan timeout plus ``SLACK`` is killed.

Compile errors: YARA-X is stricter than YARA.  The compiler runs with
``relaxed_re_syntax`` (regular expressions read as YARA reads them: the
escapes and brace forms rule authors wrote for YARA).  Any error that
remains refuses the whole set, as with the yara engine: a reload keeps the
version in service, a first load fails, and the message is
``file:line: message``.  Silently dropping a file would drop protection
without anyone noticing.  signature-base (741 files, 5,883 rules) loads
completely this way.
"""

from __future__ import annotations

import contextlib
import io
import multiprocessing
import os
import signal
import threading
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, NamedTuple

__all__ = ["ENGINE_TAG", "YaraXEngine", "YaraXMatch", "YaraXRules"]

# Mixed into the ruleset hash: the ISTag changes with the engine, since the
# engine is part of what produced a verdict.
ENGINE_TAG = b"yara-x\0"

# How long a scanning thread waits beyond the scan's own timeout for a free
# worker (one may be compiling) and its answer; then the worker is killed.
SLACK = 5.0

_NEED_RULES = "need-rules"


class YaraXMatch(NamedTuple):
    """What the scanner reads from a match (``yara.Match`` has the same names)."""

    namespace: str
    rule: str


# --- worker process side ----------------------------------------------------
# Nothing here imports Twisted or yara-python: the workers stay small.

# version -> (yara_x.Scanner, each rule's position in the set), newest last;
# at most _KEEP versions.
_scanners: dict[str, tuple[Any, dict[tuple[str, str], int]]] = {}
_KEEP = 2


def _worker_init() -> None:
    # A Ctrl-C or SIGHUP sent to the process group is for the gateway, which
    # stops or reloads the workers itself.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    import yara_x  # noqa: F401  (loaded once, before the first job)


def _install(version: str, rules: Any) -> tuple[Any, dict[tuple[str, str], int]]:
    import yara_x

    # yara-python reports matches in declaration order (files sorted by
    # namespace, then rules as written); yara-x in its own.  The position
    # lets a verdict list the rules in yara's order: the first one is what a
    # block page and the access log show first.
    entry = (yara_x.Scanner(rules), {(r.namespace, r.identifier): i for i, r in enumerate(rules)})
    _scanners.pop(version, None)
    _scanners[version] = entry
    while len(_scanners) > _KEEP:
        del _scanners[next(iter(_scanners))]
    return entry


def _compile_job(
    version: str, sources: list[tuple[str, str, str]], externals: dict[str, str]
) -> tuple[bytes, int, list[str], list[tuple[str, int, str]]]:
    """Compile in a worker: (serialized rules, rule count, warnings, errors).

    ``sources``: (namespace, origin path, text) per file.  Errors are
    (file, line, message); when there are any, nothing is serialized."""
    import yara_x

    compiler = yara_x.Compiler(relaxed_re_syntax=True)
    for name, value in externals.items():
        compiler.define_global(name, value)
    for namespace, origin, text in sources:
        compiler.new_namespace(namespace)
        with contextlib.suppress(yara_x.CompileError):  # collected by errors() below
            compiler.add_source(text, origin=origin)
    # Read before build(), which resets the compiler.
    errors = [_error_location(e) for e in compiler.errors()]
    warnings = [str(w.get("text", w.get("title", ""))).splitlines()[0] + _where(w)
                for w in compiler.warnings() if w.get("code") not in _STYLE_ONLY]
    if errors:
        return b"", 0, warnings, errors
    rules = compiler.build()
    _install(version, rules)
    buffer = io.BytesIO()
    rules.serialize_into(buffer)
    return buffer.getvalue(), sum(1 for _ in rules), warnings, []


# Lints about how a rule is written, not what it matches: not worth a log line
# at every load (the bundled EICAR rule is hex on purpose, so that no file of
# the repository holds the test string).
_STYLE_ONLY = frozenset({"text_as_hex"})


def _where(report: dict[str, Any]) -> str:
    labels = report.get("labels") or [{}]
    origin = labels[0].get("code_origin")
    return f" ({origin}:{labels[0].get('line', 0)})" if origin else ""


def _error_location(report: dict[str, Any]) -> tuple[str, int, str]:
    labels = report.get("labels") or [{}]
    origin = str(labels[0].get("code_origin") or "")
    line = int(labels[0].get("line") or report.get("line") or 0)
    title = str(report.get("title") or report.get("text") or "compile error")
    detail = str(labels[0].get("text") or "")
    return origin, line, f"{title}: {detail}" if detail else title


def _scan_job(
    version: str, blob: bytes | None, target: bytes | str, externals: dict[str, str], timeout: int
) -> list[tuple[str, str]] | str | tuple[str, str]:
    """Match in a worker: [(namespace, rule), ...], or ``_NEED_RULES`` when this
    worker does not hold ``version`` and no ``blob`` came with the job, or
    ("timeout"|"error", why)."""
    import yara_x

    entry = _scanners.get(version)
    if entry is None:
        if blob is None:
            return _NEED_RULES
        entry = _install(version, yara_x.Rules.deserialize_from(io.BytesIO(blob)))
    scanner, position = entry
    # Every external each time: a yara-x scanner keeps the last value set,
    # yara-python falls back to the compile-time default; this matches the latter.
    for name, value in externals.items():
        scanner.set_global(name, value)
    scanner.set_timeout(max(1, int(timeout)))
    try:
        if isinstance(target, bytes):
            results = scanner.scan(target)
        else:
            results = scanner.scan_file(target)
    except yara_x.TimeoutError:
        return ("timeout", "")
    except yara_x.ScanError as e:
        return ("error", str(e))
    found = [(r.namespace, r.identifier) for r in results.matching_rules]
    return sorted(found, key=lambda m: position.get(m, len(position)))


# The worker's loop: one job at a time, answered on the same pipe.
_JOBS: dict[str, Any] = {}


def _load_job(version: str, blob: bytes) -> bool:
    """Hold ``version`` ahead of its first scan (priming after a compile)."""
    import yara_x

    if version not in _scanners:
        _install(version, yara_x.Rules.deserialize_from(io.BytesIO(blob)))
    return True


def _worker_main(conn: Connection) -> None:
    _worker_init()
    _JOBS.update(compile=_compile_job, load=_load_job, scan=_scan_job)
    while True:
        try:
            op, args = conn.recv()
        except (EOFError, OSError):  # the gateway closed the pipe or died: done
            return
        try:
            reply = ("ok", _JOBS[op](*args), list(_scanners))
        except Exception as e:  # a bug or bad input: answer it, keep serving
            reply = ("error", f"{type(e).__name__}: {e}", list(_scanners))
        try:
            conn.send(reply)
        except OSError:
            return


# --- gateway process side ---------------------------------------------------


class _Dead(Exception):
    """The worker process died (killed, out of memory) or its pipe broke."""


class _Stuck(Exception):
    """The worker did not answer in time."""


class _Worker:
    """One scanning process and the pipe to it.  Used by one thread at a time
    (checked out of the engine), so a job is a plain send and receive: no
    queue or helper thread between the scanning thread and the process."""

    def __init__(self, context: Any) -> None:
        mine, theirs = context.Pipe()
        # daemon: multiprocessing ends it if the gateway exits without close().
        self.process = context.Process(target=_worker_main, args=(theirs,), name="yara-x", daemon=True)
        self.process.start()
        theirs.close()
        self.conn: Connection = mine
        self.versions: list[str] = []  # the rules versions it holds, as of its last answer

    def send(self, op: str, *args: Any) -> None:
        try:
            self.conn.send((op, args))
        except (OSError, ValueError) as e:
            raise _Dead(str(e)) from None

    def receive(self, timeout: float | None) -> Any:
        try:
            if not self.conn.poll(timeout):
                raise _Stuck()
            status, value, self.versions = self.conn.recv()
        except (EOFError, OSError) as e:
            raise _Dead(str(e) or "pipe closed") from None
        if status != "ok":
            import yara

            raise yara.Error(value)
        return value

    def call(self, timeout: float | None, op: str, *args: Any) -> Any:
        self.send(op, *args)
        return self.receive(timeout)

    def stop(self, kill: bool = False) -> None:
        if kill:
            self.process.kill()
        self.conn.close()  # the worker reads EOF and exits
        self.process.join(2)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(2)


@dataclass(frozen=True, eq=False)
class YaraXRules:
    """A compiled ruleset held by the workers; the ``rules`` of a ``CompiledRules``."""

    engine: YaraXEngine
    version: str
    blob: bytes = b""
    count: int = 0

    def __iter__(self) -> Any:  # ``sum(1 for _ in rules)`` as with yara.Rules
        return iter(range(self.count))

    def match(
        self, *, data: bytes | None = None, filepath: str | None = None,
        externals: dict[str, str] | None = None, timeout: int = 60,
    ) -> list[YaraXMatch]:
        target: bytes | str
        if data is not None:
            target = data
        elif filepath is not None:
            target = filepath
        else:
            raise TypeError("match() needs data= or filepath=")
        return self.engine.match(self, target, externals or {}, timeout)


class YaraXEngine:
    """The worker processes and what runs in them.  ``workers``: scanning
    processes (0: one per core), started on demand; a dead or stuck one is
    replaced.  Call :meth:`close` at shutdown."""

    def __init__(self, workers: int = 0, *, start_method: str = "forkserver") -> None:
        self.size = workers or os.cpu_count() or 1
        self._context = multiprocessing.get_context(start_method)
        if start_method == "forkserver":
            # The fork server imports yara_x once and every worker is forked from
            # it, rather than importing the gateway's __main__ there (the default).
            self._context.set_forkserver_preload(["yara_x"])
        self._cond = threading.Condition()
        self._idle: list[_Worker] = []
        self._busy: set[_Worker] = set()
        self._count = 0  # workers started and not discarded (idle + busy + starting)
        self._closed = False
        self.restarts = 0  # workers lost (died or stuck) and replaced

    # Workers ---------------------------------------------------------------

    def _checkout(self, timeout: float | None, version: str = "") -> _Worker:
        """An idle worker (one that holds ``version`` if any does), or a new one
        while fewer than ``size`` run; else wait."""
        import yara

        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while True:
                if self._closed:
                    raise yara.Error("yara-x engine closed")
                if self._idle:
                    worker = next((w for w in reversed(self._idle) if version in w.versions), self._idle[-1])
                    self._idle.remove(worker)
                    self._busy.add(worker)
                    return worker
                if self._count < self.size:
                    self._count += 1
                    break
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise yara.TimeoutError("no yara-x worker free in time")
                self._cond.wait(remaining)
        return self._start()

    def _start(self) -> _Worker:
        """A new worker; ``_count`` already includes it."""
        try:
            worker = _Worker(self._context)
        except BaseException:
            with self._cond:
                self._count -= 1
                self._cond.notify()
            raise
        with self._cond:
            self._busy.add(worker)
        return worker

    def _checkin(self, worker: _Worker, healthy: bool) -> None:
        with self._cond:
            self._busy.discard(worker)
            keep = healthy and not self._closed
            if keep:
                self._idle.append(worker)
            else:
                self._count -= 1
                if not healthy:
                    self.restarts += 1
            self._cond.notify()
        if not keep:
            worker.stop(kill=not healthy)

    def _call(self, worker: _Worker, timeout: float | None, op: str, *args: Any) -> Any:
        """A job on a checked-out worker; checks it back in.  Raises
        yara.TimeoutError (the worker is killed: it may be stuck in a scan) or
        yara.Error (it died, or the job failed)."""
        import yara

        try:
            result = worker.call(timeout, op, *args)
        except _Stuck:
            self._checkin(worker, healthy=False)
            raise yara.TimeoutError("yara-x worker did not answer in time") from None
        except _Dead:
            self._checkin(worker, healthy=False)
            raise yara.Error("yara-x worker process died") from None
        except BaseException:
            self._checkin(worker, healthy=True)  # the job failed, the worker is fine
            raise
        self._checkin(worker, healthy=True)
        return result

    def close(self) -> None:
        """Stop the workers.  A scan still running gets an error verdict."""
        with self._cond:
            self._closed = True
            idle, self._idle = self._idle, []
            busy = list(self._busy)
            self._cond.notify_all()
        for worker in idle:
            worker.stop()
        for worker in busy:  # its thread reads EOF, checks it in as dead
            worker.process.kill()

    def pids(self) -> list[int]:
        """The workers' process ids (tests, measurements)."""
        with self._cond:
            return [w.process.pid for w in (*self._idle, *self._busy) if w.process.pid]

    def _prime(self, version: str, blob: bytes) -> None:
        """Have every idle worker (and the ones not started yet) load ``version``
        now, in parallel, rather than on its first scan (about 1 s each for
        signature-base).  Busy workers load it when they next need it."""
        with self._cond:
            if self._closed:
                return
            take = [w for w in self._idle if version not in w.versions]
            for w in take:
                self._idle.remove(w)
                self._busy.add(w)
            missing = self.size - self._count
            self._count += missing
        workers = take
        for _ in range(missing):
            with contextlib.suppress(Exception):  # a start failure: on demand later
                workers.append(self._start())
        sent = []
        for worker in workers:
            try:
                worker.send("load", version, blob)
                sent.append(worker)
            except _Dead:
                self._checkin(worker, healthy=False)
        for worker in sent:
            try:
                worker.receive(None)
                self._checkin(worker, healthy=True)
            except _Dead:
                self._checkin(worker, healthy=False)
            except Exception:  # could not load: it will get the rules with a scan
                self._checkin(worker, healthy=True)

    # Compiling -----------------------------------------------------------

    def compile_directory(self, directory: Path) -> Any:
        """``gateway.scanner.compile_directory`` for yara-x: same files, same
        namespaces, same snapshot/version/externals bookkeeping; raises
        ``RulesError``.  Blocks until a worker compiled (call from a thread,
        except at startup)."""
        from gateway.scanner import RulesError, stat_snapshot

        directory = Path(directory)
        started = time.perf_counter()
        snapshot = stat_snapshot(directory)
        try:
            return self._compile(directory, snapshot, started)
        except RulesError as e:
            e.snapshot = snapshot
            raise

    def _compile(self, directory: Path, snapshot: Any, started: float) -> Any:
        import yara

        from gateway.scancache import mentioned_externals
        from gateway.scanner import EXTERNALS, CompiledRules, RulesError, read_rule_files

        files, version = read_rule_files(directory, ENGINE_TAG)
        sources = [(namespace, str(path), text) for namespace, path, text in files]
        try:
            worker = self._checkout(None)
            blob, count, warnings, errors = self._call(worker, None, "compile", version, sources, EXTERNALS)
        except yara.Error as e:
            raise RulesError(str(directory), 0, f"yara-x: {e}") from None
        if not errors:  # the compiling worker holds it; the others load it now
            self._prime(version, blob)
        if errors:
            file, line, message = errors[0]
            more = f" (and {len(errors) - 1} more errors)" if len(errors) > 1 else ""
            raise RulesError(file or str(directory), line, message + more)
        texts = [text for _, _, text in sources]
        return CompiledRules(
            rules=YaraXRules(self, version, blob, count),  # type: ignore[arg-type]
            version=version,
            rule_count=count,
            file_count=len(files),
            snapshot=snapshot,
            warnings=tuple(warnings),
            compile_seconds=time.perf_counter() - started,
            externals_used=(frozenset(EXTERNALS) if any("include" in t for t in texts)
                            else mentioned_externals(texts, EXTERNALS)),
        )

    # Matching ------------------------------------------------------------

    def match(
        self, rules: YaraXRules, target: bytes | str, externals: dict[str, str], timeout: int
    ) -> list[YaraXMatch]:
        """Blocking (a scanning thread).  Raises yara.TimeoutError / yara.Error."""
        import yara

        from gateway.scanner import EXTERNALS

        values = {**EXTERNALS, **externals}
        deadline = time.monotonic() + timeout + SLACK
        worker = self._checkout(timeout + SLACK, rules.version)
        blob = None if rules.version in worker.versions else rules.blob
        result = self._call(worker, deadline - time.monotonic(), "scan",
                            rules.version, blob, target, values, timeout)
        if result == _NEED_RULES:  # evicted since its last answer: send them
            worker = self._checkout(deadline - time.monotonic(), rules.version)
            result = self._call(worker, deadline - time.monotonic(), "scan",
                                rules.version, rules.blob, target, values, timeout)
        if isinstance(result, tuple):
            kind, why = result
            if kind == "timeout":
                raise yara.TimeoutError("yara-x scan timed out")
            raise yara.Error(why)
        return [YaraXMatch(namespace, rule) for namespace, rule in result]


# --- measuring (python -m gateway.engine_yarax DIR) ---------------------------


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
    import random
    import tempfile

    from gateway.config import ScanSettings
    from gateway.interfaces import ScanContext
    from gateway.scanner import RulesManager, YaraScanner

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
        engine = YaraXEngine(threads) if name == "yara-x" else None
        manager = RulesManager(directory, None, None, 0,  # type: ignore[arg-type]
                               compiler=engine.compile_directory if engine else None)
        started = time.perf_counter()
        manager.load_now()
        compile_s = time.perf_counter() - started
        scanner = YaraScanner(manager, None, None, ScanSettings(), spool)  # type: ignore[arg-type]
        try:
            for label, body, size in bodies:
                for _ in range(3 * threads):  # warm: every worker holds the rules
                    assert scanner.scan_blocking(body, context).outcome == "clean"
                pids = [os.getpid(), *(engine.pids() if engine else [])]
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
            if engine is not None:
                engine.close()
    spooled.unlink()
    spool.rmdir()
    return rows


if __name__ == "__main__":
    import argparse
    import json

    parser = argparse.ArgumentParser(description="yara vs yara-x through the gateway's scanner")
    parser.add_argument("directory", type=Path)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    results = compare_engines(args.directory, args.seconds, args.threads)
    if args.json:
        print(json.dumps(results))
    for r in results:
        print(f"{r['engine']:7} {r['body']:10} {r['threads']} threads: {r['scans_per_s']:8.0f} scans/s "
              f"{r['ms_per_scan']:7.2f} ms/scan  {r['cpu_ms_per_scan']:7.2f} CPU ms/scan "
              f"{r['mb_per_s']:7.0f} MB/s  (compile {r['compile_s']:.1f} s)")
