"""The one compile path and the RulesManager: rules loading and reloading.

* :func:`compile_directory` compiles every rule file under a directory
  (``gateway.scanning.discovery``) with an engine
  (``gateway.scanning.engine.Engine``), the gateway's externals declared,
  whichever engine it is.
* :class:`RulesManager` owns the compiled rules: first load at startup,
  recompiles in the scanning pool on SIGHUP or when the directory changes,
  and swaps atomically; a broken file never replaces a working set, and a
  supervised worker whose directory does not compile at start serves the
  last good set (``gateway.scanning.snapshot``).
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from gateway.scanning.cache import mentioned_externals
from gateway.scanning.discovery import read_rule_files, rule_files, stat_snapshot
from gateway.scanning.engine import EXTERNALS, Engine, RulesError, RuleSource, Snapshot
from gateway.scanning.handoff import CompletionQueue, Pool, ScanPool
from gateway.scanning.snapshot import last_good_snapshot, save_snapshot
from gateway.scanning.yara_engine import YaraEngine

__all__ = ["CompiledRules", "RulesManager", "check_rules", "compile_directory", "find_errors", "make_rules_pool"]

log = Logger(namespace="gateway.scanning.rules")


@dataclass(frozen=True, slots=True)
class CompiledRules:
    """One compiled ruleset; never mutated, swapped as a whole.  ``rules`` is
    the engine's handle: match with ``engine.match(rules, ...)``."""

    engine: Engine
    rules: Any
    version: str
    rule_count: int
    file_count: int
    snapshot: Snapshot
    warnings: tuple[str, ...] = ()
    compile_seconds: float = 0.0
    # The externals the rule sources mention: only these enter a cache key.
    externals_used: frozenset[str] = frozenset(EXTERNALS)

    def match(self, target: bytes | str, externals: dict[str, str], timeout: int = 60) -> list[str]:
        """``namespace.rule`` of each match (see ``Engine.match``)."""
        return self.engine.match(self.rules, target, externals, timeout)


def compile_directory(directory: Path, engine: Engine | None = None) -> CompiledRules:
    """Compile every rule file under ``directory`` with ``engine`` (yara-python
    when None).  Raises :class:`RulesError`.

    Blocking (about a second for signature-base): call it from a thread,
    except for the first load at startup."""
    engine = engine or YaraEngine()
    directory = Path(directory)
    started = time.perf_counter()
    # Stat before reading: a change after this point makes the poller reload again.
    snapshot = stat_snapshot(directory)
    try:
        sources, version = read_rule_files(directory, engine.tag)
        compiled = engine.compile(version, sources)
    except RulesError as e:
        e.snapshot = snapshot  # what was tried: the poller waits for a change
        raise
    texts = [s.text for s in sources]
    return CompiledRules(
        engine=engine,
        rules=compiled.handle,
        version=version,
        rule_count=compiled.rule_count,
        file_count=len(sources),
        snapshot=snapshot,
        warnings=compiled.warnings,
        compile_seconds=time.perf_counter() - started,
        # An include'd file is not read here: its externals are then missed,
        # so a ruleset with includes keeps every external in the key.
        externals_used=(frozenset(EXTERNALS) if any("include" in text for text in texts)
                        else mentioned_externals(texts, EXTERNALS)),
    )


def check_rules(directory: Path, engine: Engine | None = None) -> tuple[int, str]:
    """(rule count, version) of a directory that compiles; raises RulesError."""
    compiled = compile_directory(directory, engine)
    return compiled.rule_count, compiled.version


def find_errors(directory: Path, engine: Engine | None = None) -> list[RulesError]:
    """Every broken file, not just the first (YARA stops at the first error):
    each file compiled on its own.  For ``rules check``; slower than a load."""
    engine = engine or YaraEngine()
    try:
        files = rule_files(directory)
    except RulesError as e:
        return [e]
    errors = []
    for namespace, path in files:
        try:
            source = RuleSource(namespace, path, path.read_text("utf-8", "replace"))
            engine.compile("check", [source])
        except OSError as e:
            errors.append(RulesError(str(path), 0, e.strerror or str(e)))
        except RulesError as e:
            errors.append(e)
    return errors


def make_rules_pool() -> ScanPool:
    """The thread a ``RulesManager`` compiles, polls and copies in: never a
    scanning thread.  A compile leaves the malloc arena of the thread that ran
    it fragmented (about 100,000 small blocks freed in no order), and glibc
    keeps a thread on its arena: every later scan in that thread then spent a
    fifth of its time in ``_int_malloc``, 1.26 instead of 0.45 CPU ms per
    1 KiB signature-base scan (the same cost that makes YARA on the main
    thread slow after the startup compile).  The caller starts and stops it."""
    return ScanPool(1, name="rules-compile")


class RulesManager:
    """Owns the current :class:`CompiledRules` and replaces it safely.

    ``reload()`` compiles in ``pool`` and swaps on the reactor thread (one
    attribute assignment: a scan already running keeps the set it started
    with).  A failed compile keeps the old set, logs ``file:line: message``,
    keeps it in ``last_error`` and reports ``on_loaded(False, ...)`` with the
    count and version still in service.  ``start()`` polls the directory every
    ``interval`` seconds on ``reactor``'s clock; a failed set is not retried
    until the files change again.

    ``pool`` runs the compiles, the polls' stat calls and the snapshot copies:
    give it :func:`make_rules_pool`, not the scanning pool.
    """

    def __init__(
        self,
        directory: Path,
        reactor: Any,
        pool: Pool,
        interval: float,
        on_loaded: Callable[[bool, int, str], None] | None = None,
        engine: Engine | None = None,
        snapshot_store: Path | None = None,
    ) -> None:
        self.directory = Path(directory)
        # Where the last good set is copied (gateway.scanning.snapshot), and what
        # ``load_now`` falls back to when the directory does not compile:
        # set for supervised workers, whose restarts must not crash-loop.
        self.snapshot_store = snapshot_store
        self.loaded_from = self.directory  # the snapshot's copy after a fallback
        # yara-python unless the caller gives another engine (``[scan] engine``).
        self.engine: Engine = engine or YaraEngine()
        self._reactor = reactor
        self._pool = pool
        self._completions = CompletionQueue(reactor)
        self.interval = interval
        self._observers: list[Callable[[bool, int, str], None]] = [on_loaded] if on_loaded else []
        self.current: CompiledRules | None = None
        self.last_error: RulesError | None = None
        self._attempted: Snapshot | None = None
        self._running = False
        self._waiters: list[Deferred[bool]] = []
        self._loop: LoopingCall | None = None

    # What the rest of the gateway reads.
    @property
    def version(self) -> str:
        return self.current.version if self.current else ""

    @property
    def rule_count(self) -> int:
        return self.current.rule_count if self.current else 0

    def add_observer(self, callback: Callable[[bool, int, str], None]) -> None:
        self._observers.append(callback)

    def load_now(self) -> None:
        """The first load, synchronously (startup).  Raises RulesError.

        With a ``snapshot_store``, a directory that does not compile loads the
        last good set instead (what the running workers serve); the error
        stays in ``last_error`` and the directory is compiled again when its
        files change."""
        try:
            compiled = compile_directory(self.directory, self.engine)
        except RulesError as e:
            self._attempted = e.snapshot
            self._failed(e)
            fallback = self._load_last_good()
            if fallback is None:
                raise
            self._install(fallback)
            self._attempted, self.last_error = e.snapshot, e  # the directory is still broken
            return
        self._install(compiled)
        self._save_snapshot(compiled, in_thread=False)

    def _load_last_good(self) -> CompiledRules | None:
        path = last_good_snapshot(self.snapshot_store) if self.snapshot_store is not None else None
        if path is None:
            return None
        compiled = compile_directory(path, self.engine)  # a RulesError here propagates: nothing good to serve
        self.loaded_from = path
        log.warn("rules directory {directory} does not compile: serving the last good set, version "
                 "{version}, from {path}", directory=str(self.directory), version=compiled.version,
                 path=str(path))
        return compiled

    def _save_snapshot(self, compiled: CompiledRules, *, in_thread: bool) -> None:
        """Keep a copy of a set compiled from the directory (gateway.scanning.snapshot)."""
        if self.snapshot_store is None:
            return
        args = (self.directory, self.snapshot_store, compiled.version, compiled.snapshot)
        if not in_thread:
            try:
                save_snapshot(*args)
            except OSError as e:
                log.warn("cannot keep a copy of the rules: {error}", error=str(e))
            return
        d = self._completions.run(self._pool, save_snapshot, *args)
        d.addErrback(lambda f: log.warn("cannot keep a copy of the rules: {error}", error=str(f.value)))

    def reload(self) -> Deferred[bool]:
        """Recompile in the pool; fires True when the new set is in service,
        False when it was refused (never errbacks).  Calls made while one
        runs are served by a single follow-up compile."""
        d: Deferred[bool] = Deferred()
        self._waiters.append(d)
        if not self._running:
            self._compile()
        return d

    def _compile(self) -> None:
        self._running = True
        waiters, self._waiters = self._waiters, []
        d = self._completions.run(self._pool, compile_directory, self.directory, self.engine)

        def done(result: CompiledRules | Failure) -> None:
            if isinstance(result, CompiledRules):
                self._install(result)
                self.loaded_from = self.directory
                self._save_snapshot(result, in_thread=True)
                ok = True
            else:
                error = result.value
                if not isinstance(error, RulesError):  # a bug: log it, retry on the next poll
                    log.failure("rules compile failed", result)
                    error = RulesError(str(self.directory), 0, f"{type(error).__name__}: {error}")
                self._attempted = error.snapshot
                self._failed(error)
                ok = False
            self._running = False
            if self._waiters:  # asked again while compiling: the files may have changed since
                self._compile()
            for w in waiters:
                w.callback(ok)

        d.addBoth(done)

    def _install(self, compiled: CompiledRules) -> None:
        previous = self.current
        self.current = compiled
        self._attempted = compiled.snapshot
        self.last_error = None
        if previous is None or previous.version != compiled.version:
            log.info(
                "rules loaded from {directory}: {count} rules in {files} files, version {version}"
                " ({seconds:.2f}s)",
                directory=str(self.directory), count=compiled.rule_count,
                files=compiled.file_count, version=compiled.version,
                seconds=compiled.compile_seconds,
            )
        for warning in compiled.warnings[:20]:
            log.warn("rules warning: {warning}", warning=warning)
        self._notify(True, compiled.rule_count, compiled.version)

    def _failed(self, error: RulesError) -> None:
        self.last_error = error
        if self.current is None:
            log.error("rules not loaded: {error}", error=str(error))
        else:
            log.error(
                "rules not reloaded, version {version} stays in service: {error}",
                version=self.current.version, error=str(error),
            )
        self._notify(False, self.rule_count, self.version)

    def _notify(self, ok: bool, count: int, version: str) -> None:
        for callback in self._observers:
            try:
                callback(ok, count, version)
            except Exception:
                log.failure("rules observer failed")

    # Triggers: the directory changing, SIGHUP.
    def start(self) -> None:
        """Poll the directory for changes every ``interval`` seconds (0: never)."""
        if self.interval <= 0 or self._loop is not None:
            return
        self._loop = LoopingCall(self.poll)
        self._loop.clock = self._reactor
        self._loop.start(self.interval, now=False).addErrback(
            lambda f: log.failure("rules polling stopped", f)
        )

    def stop(self) -> None:
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None

    def poll(self) -> Deferred[bool | None]:
        """Reload if the files changed since the last attempt.  The stat calls run
        in the pool (hundreds of files: not on the reactor)."""
        d: Deferred[Any] = self._completions.run(self._pool, stat_snapshot, self.directory)

        def compare(snapshot: Snapshot) -> Deferred[bool] | None:
            if snapshot == self._attempted or self._running:
                return None
            log.info("rules directory {directory} changed: reloading", directory=str(self.directory))
            return self.reload()

        d.addCallback(compare)
        d.addErrback(lambda f: log.failure("rules poll failed", f))
        return d

    def install_sighup(self) -> None:
        """Reload on SIGHUP.  Call from the main thread (``serve``)."""

        def handler(signum: int, frame: object) -> None:
            # Signal context: only hand over to the reactor thread.
            self._reactor.callFromThread(self._on_sighup)

        signal.signal(signal.SIGHUP, handler)

    def _on_sighup(self) -> None:
        log.info("SIGHUP: reloading rules from {directory}", directory=str(self.directory))
        self.reload()
