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

How it plugs in: :class:`YaraXEngine` implements
``gateway.scanning.engine.Engine``.  The one compile path
(``gateway.scanning.rules.compile_directory``) hands it the sources it read;
its handle is a :class:`YaraXRuleSet` (the version and the serialized
rules); ``match`` raises ``EngineTimeout`` / ``EngineError``, which the
scanner maps as for yara-python (timeout -> unscannable "scan-timeout",
failure -> unscannable "engine-error").

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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

# Stdlib-only modules: the worker processes import this one.
from gateway.scanning.engine import EXTERNALS, EngineError, EngineRules, EngineTimeout, RulesError, RuleSource

__all__ = ["ENGINE_TAG", "YaraXEngine", "YaraXRuleSet"]

# Mixed into the ruleset hash: the ISTag changes with the engine, since the
# engine is part of what produced a verdict.
ENGINE_TAG = b"yara-x\0"

# How long a scanning thread waits beyond the scan's own timeout for a free
# worker (one may be compiling) and its answer; then the worker is killed.
SLACK = 5.0

_NEED_RULES = "need-rules"


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
    (file, line, message); when there are any, nothing is serialized.

    The worker scans with the set deserialized from the bytes it sends, as
    every other worker does, not with the compiler's own object: scanning with
    the latter cost 0.63-0.66 CPU ms per 1 KiB signature-base scan against
    0.42-0.47 for a worker that loaded the bytes (its memory is laid out as
    the compile went; and the set is the same bytes everywhere)."""
    import yara_x

    rules, warnings, errors = _build(sources, externals)
    if errors:
        return b"", 0, warnings, errors
    buffer = io.BytesIO()
    rules.serialize_into(buffer)
    blob = buffer.getvalue()
    count = sum(1 for _ in rules)
    del rules
    _install(version, yara_x.Rules.deserialize_from(io.BytesIO(blob)))
    return blob, count, warnings, []


def _build(
    sources: list[tuple[str, str, str]], externals: dict[str, str]
) -> tuple[Any, list[str], list[tuple[str, int, str]]]:
    """(yara_x.Rules or None, warnings, errors) of ``sources``."""
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
        return None, warnings, errors
    return compiler.build(), warnings, []


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
            raise EngineError(f"yara-x: {value}")
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
class YaraXRuleSet:
    """The handle of a set the workers hold: its version and serialized rules
    (sent to a worker that lacks them)."""

    version: str
    blob: bytes = b""


class YaraXEngine:
    """``gateway.scanning.engine.Engine`` over YARA-X: the worker processes and what
    runs in them.  ``workers``: scanning
    processes (0: one per core), started on demand; a dead or stuck one is
    replaced.  Call :meth:`close` at shutdown."""

    name = "yara-x"
    tag = ENGINE_TAG
    runs_in_caller = False  # see Engine.runs_in_caller

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
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while True:
                if self._closed:
                    raise EngineError("yara-x: engine closed")
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
                    raise EngineTimeout("yara-x: no worker free in time")
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
        EngineTimeout (the worker is killed: it may be stuck in a scan) or
        EngineError (it died, or the job failed)."""
        try:
            result = worker.call(timeout, op, *args)
        except _Stuck:
            self._checkin(worker, healthy=False)
            raise EngineTimeout("yara-x: worker did not answer in time") from None
        except _Dead:
            self._checkin(worker, healthy=False)
            raise EngineError("yara-x: worker process died") from None
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

    def compile(self, version: str, sources: Sequence[RuleSource]) -> EngineRules:
        """Compile in a worker; the others load the result before it serves.
        Blocks until a worker compiled (call from a thread, except at startup)."""
        texts = [(s.namespace, str(s.path), s.text) for s in sources]
        fallback = str(sources[0].path.parent) if sources else ""
        try:
            worker = self._checkout(None)
            blob, count, warnings, errors = self._call(worker, None, "compile", version, texts, EXTERNALS)
        except EngineError as e:
            raise RulesError(fallback, 0, str(e)) from None
        if errors:
            file, line, message = errors[0]
            more = f" (and {len(errors) - 1} more errors)" if len(errors) > 1 else ""
            raise RulesError(file or fallback, line, message + more)
        self._prime(version, blob)  # the compiling worker holds it; the others load it now
        return EngineRules(YaraXRuleSet(version, blob), count, tuple(warnings))

    # Matching ------------------------------------------------------------

    def match(self, rules: Any, target: bytes | str, externals: Mapping[str, str], timeout: int) -> list[str]:
        """Blocking (a scanning thread).  Raises EngineTimeout / EngineError."""
        ruleset: YaraXRuleSet = rules
        values = {**EXTERNALS, **externals}
        deadline = time.monotonic() + timeout + SLACK
        worker = self._checkout(timeout + SLACK, ruleset.version)
        blob = None if ruleset.version in worker.versions else ruleset.blob
        result = self._call(worker, deadline - time.monotonic(), "scan",
                            ruleset.version, blob, target, values, timeout)
        if result == _NEED_RULES:  # evicted since its last answer: send them
            worker = self._checkout(deadline - time.monotonic(), ruleset.version)
            result = self._call(worker, deadline - time.monotonic(), "scan",
                                ruleset.version, ruleset.blob, target, values, timeout)
        if isinstance(result, tuple):
            kind, why = result
            if kind == "timeout":
                raise EngineTimeout("yara-x: scan timed out")
            raise EngineError(f"yara-x: {why}")
        return [f"{namespace}.{rule}" for namespace, rule in result]
