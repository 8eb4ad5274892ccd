"""The YARA-X engine (``[scan] engine = "yara-x"``): compile and match in worker processes.

yara-x's Python binding holds the GIL while it compiles and while it scans,
so in threads it would use one core and stall the reactor.  Here everything
yara-x does runs in a :class:`concurrent.futures.ProcessPoolExecutor`
(``forkserver``: the children do not inherit the reactor, its sockets or its
threads); the scanning thread-pool thread that runs ``scan_blocking`` just
waits on the future, so the rest of the gateway is unchanged.

How it plugs in (see ``gateway.scanner``): :meth:`YaraXEngine.compile_directory`
is the ``RulesManager``'s compiler and returns an ordinary ``CompiledRules``
whose ``rules`` is a :class:`YaraXRules`.  That object answers
``match(data=|filepath=, externals=, timeout=)`` like ``yara.Rules`` does,
with objects carrying ``.namespace`` and ``.rule``, and raises
``yara.TimeoutError`` / ``yara.Error``: the scanner's verdict mapping
(timeout -> error "timeout", failure -> error "yara: ...") applies as is.

Rules reach the workers without each one compiling (2-3 s for
signature-base): one worker compiles the sources the parent read (so the
version hash and the compiled text are the same bytes), serializes the
result, and the parent keeps those bytes.  A scan job carries only the
version; a worker that does not hold that version answers "need rules" and
the job is sent again with the bytes (about 1 s to load signature-base).
Each worker keeps the two latest versions, so scans still running on the
old set during a reload do not make it reload back and forth.

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
import hashlib
import io
import multiprocessing
import os
import signal
import threading
import time
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

__all__ = ["ENGINE_TAG", "YaraXEngine", "YaraXMatch", "YaraXRules"]

# Mixed into the ruleset hash: the ISTag changes with the engine, since the
# engine is part of what produced a verdict.
ENGINE_TAG = b"yara-x\0"

# How long the parent waits beyond the scan's own timeout for a worker to
# pick the job up (queued behind a compile) and answer, before calling it a timeout.
QUEUE_SLACK = 5.0

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
                for w in compiler.warnings()]
    if errors:
        return b"", 0, warnings, errors
    rules = compiler.build()
    _install(version, rules)
    buffer = io.BytesIO()
    rules.serialize_into(buffer)
    return buffer.getvalue(), sum(1 for _ in rules), warnings, []


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


# --- gateway process side ---------------------------------------------------


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
    """The process pool and what runs in it.  ``workers``: scanning processes
    (0: one per core).  Call :meth:`close` at shutdown."""

    def __init__(self, workers: int = 0, *, start_method: str = "forkserver") -> None:
        self.workers = workers or os.cpu_count() or 1
        self._context = multiprocessing.get_context(start_method)
        self._lock = threading.Lock()
        self._executor: ProcessPoolExecutor | None = None
        self._closed = False
        self.restarts = 0  # pools replaced after a worker died (tests, logs)

    # The pool ------------------------------------------------------------

    def _pool(self) -> ProcessPoolExecutor:
        with self._lock:
            if self._closed:
                raise RuntimeError("yara-x engine closed")
            if self._executor is None:
                self._executor = ProcessPoolExecutor(
                    self.workers, mp_context=self._context, initializer=_worker_init
                )
            return self._executor

    def _discard(self, broken: ProcessPoolExecutor) -> None:
        """A worker died (killed, out of memory): the whole executor is broken;
        the next job starts a fresh one, whose workers load rules on demand."""
        with self._lock:
            if self._executor is broken:
                self._executor = None
                self.restarts += 1
        broken.shutdown(wait=False, cancel_futures=True)

    def _run(self, timeout: float | None, fn: Any, *args: Any) -> Any:
        import yara

        try:
            pool = self._pool()
            future: Future[Any] = pool.submit(fn, *args)
        except RuntimeError as e:  # closed (shutting down): an error verdict, not a crash
            raise yara.Error(f"yara-x engine: {e}") from None
        except BrokenProcessPool:
            self._discard(pool)
            raise yara.Error("yara-x worker process died") from None
        try:
            return future.result(timeout=timeout)
        except BrokenProcessPool:
            self._discard(pool)
            raise yara.Error("yara-x worker process died") from None
        except FutureTimeout:
            future.cancel()  # still queued: never runs; running: its answer is dropped
            raise yara.TimeoutError("yara-x worker did not answer in time") from None

    def close(self) -> None:
        """Stop the workers (waits for running jobs, cancels queued ones)."""
        with self._lock:
            self._closed = True
            executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=True, cancel_futures=True)

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

        from gateway.scanner import (
            EXTERNALS,
            VERSION_LENGTH,
            CompiledRules,
            RulesError,
            mentioned_externals,
            rule_files,
        )

        files = rule_files(directory)
        if not files:
            raise RulesError(str(directory), 0, "no *.yar or *.yara rule files")
        digest = hashlib.sha256(ENGINE_TAG)
        sources = []
        for namespace, path in files:
            try:
                content = path.read_bytes()
            except OSError as e:
                raise RulesError(str(path), 0, e.strerror or str(e)) from None
            # The same framing as the yara engine, after the engine tag.
            digest.update(namespace.encode() + b"\0" + len(content).to_bytes(8, "big") + content)
            sources.append((namespace, str(path), content.decode("utf-8", "replace")))
        version = digest.hexdigest()[:VERSION_LENGTH]
        try:
            blob, count, warnings, errors = self._run(None, _compile_job, version, sources, EXTERNALS)
        except yara.Error as e:
            raise RulesError(str(directory), 0, f"yara-x: {e}") from None
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
        deadline = time.monotonic() + timeout + QUEUE_SLACK
        result = self._run(timeout + QUEUE_SLACK, _scan_job, rules.version, None, target, values, timeout)
        if result == _NEED_RULES:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise yara.TimeoutError("yara-x worker did not answer in time")
            result = self._run(remaining, _scan_job, rules.version, rules.blob, target, values, timeout)
        if isinstance(result, tuple):
            kind, why = result
            if kind == "timeout":
                raise yara.TimeoutError("yara-x scan timed out")
            raise yara.Error(why)
        return [YaraXMatch(namespace, rule) for namespace, rule in result]
