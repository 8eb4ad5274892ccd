"""YARA scanning: rules loading and reloading, the Scanner, ``rules check``.

* :func:`compile_directory` compiles every ``*.yar``/``*.yara`` file under a
  directory, each file in its own namespace (its path relative to the
  directory), with the gateway's external variables declared.  The ruleset's
  version (the ICAP ISTag) is a hash over the files' names and contents.
* :class:`RulesManager` owns the compiled rules: first load at startup,
  recompiles in the thread pool on SIGHUP or when the directory changes, and
  swaps atomically; a broken file never replaces a working set.
* :class:`YaraScanner` implements ``gateway.interfaces.Scanner``: in a worker
  thread it undoes Content-Encoding within limits, then matches.

Verdicts (what an admin sees in the access log as outcome/unscannable/detail).
A body the scanner cannot vouch for whole is "unscannable" with a reason from
a fixed set (``gateway.interfaces.UNSCANNABLE_REASONS``); the verdict carries
the action ``[scan] unscannable_policy`` gives that reason (``block`` or
``pass``, see ``ScanSettings.policy_for``).  Whatever could be scanned is
scanned first, and a rule match there blocks whatever the policy says: a
limit or padding never hides a signature that lies within what was decoded.

=====================================  ============================================
situation                              verdict (default action)
=====================================  ============================================
a rule matches                         blocked, rules=[namespace.rule, ...]
nothing matches, scanned whole         clean
raw body > max_scan_size               unscannable too-large (pass); nothing scanned
decoding passes max_scan_size          the decoded prefix (up to the limit) and the
                                       raw bytes are scanned: a match blocks, else
                                       unscannable too-large (pass)
decoding passes max_decoded_size       as above, unscannable decode-limit (block)
decoding passes max_decode_ratio       as above, unscannable bomb (block)
corrupt/truncated encoding             the decoded prefix and the raw bytes (and,
                                       for stacked codings, what the outer ones
                                       decode to) are scanned: a match blocks,
                                       else unscannable corrupt-encoding (block)
bytes after the end of an encoded      the decoded stream with the trailing bytes
stream (not another gzip member or     after it, and the raw bytes, are scanned: a
zstd frame)                            match blocks, else unscannable
                                       trailing-data (pass: nothing went unseen)
scan or decoding past ``timeout``      unscannable scan-timeout (block, as
                                       error_policy's fail-closed)
a coding the gateway does not know     its raw bytes (what a browser passes on) are
(compress, bogus "utf-8")              scanned whole, and what the known codings
                                       decode to (a bogus label must not hide a
                                       gzip body): a match blocks, else
                                       unscannable unknown-encoding (pass)
YARA or I/O failure, no rules loaded   unscannable engine-error (block)
=====================================  ============================================

Precedence when several apply: corrupt-encoding, then the limit that stopped
decoding (too-large before decode-limit before bomb on ties), then
trailing-data.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import re
import signal
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import yara
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from gateway.decoding import KNOWN_CODINGS, MAX_CODINGS, DecodeResult, DecodeTimeout, decode_into, parse_encodings
from gateway.interfaces import ScanContext, UnscannableReason, Verdict
from gateway.rulesnapshot import last_good_snapshot, save_snapshot
from gateway.scancache import VerdictCache, body_digest, mentioned_externals
from gateway.spool import BodySpool, purge_stale

if TYPE_CHECKING:
    from gateway.config import ScanSettings

__all__ = [
    "EXTERNALS",
    "BodySpool",
    "CompiledRules",
    "RulesError",
    "RulesManager",
    "YaraScanner",
    "add_commands",
    "check_rules",
    "compile_directory",
    "externals_for",
    "find_errors",
    "make_scan_pool",
    "purge_stale",
]

log = Logger(namespace="gateway.scanner")

RULE_SUFFIXES = (".yar", ".yara")
VERSION_LENGTH = 16  # hex digits of the ruleset hash: short enough for an ISTag

# Declared at compile time with these defaults, filled per transaction from
# ScanContext.  ``owner`` is declared because signature-base's rules use it
# (the gateway has no file owner and leaves it empty).
EXTERNALS: dict[str, str] = {
    "filename": "",
    "filepath": "",
    "extension": "",
    "filetype": "",
    "url": "",
    "host": "",
    "direction": "",
    "tenant": "",
    "owner": "",
}


# --- rules ----------------------------------------------------------------


class RulesError(Exception):
    """A rules directory that does not compile.  ``str()`` is ``file:line: message``
    (``line`` is 0 when the problem is not on a line: missing file, no rules...)."""

    def __init__(self, file: str, line: int, message: str) -> None:
        self.file = file
        self.line = line
        self.message = message
        self.snapshot: tuple[tuple[str, int, int, int], ...] | None = None
        super().__init__(f"{file}:{line}: {message}" if line else f"{file}: {message}")

    def as_dict(self) -> dict[str, Any]:
        return {"file": self.file, "line": self.line, "message": self.message}


# yara.SyntaxError reads "<path>(<line>): <message>".
_YARA_ERROR = re.compile(r"^(?P<file>.*?)\((?P<line>\d+)\): (?P<message>.*)$", re.S)


def _rules_error(error: yara.Error, fallback_file: str) -> RulesError:
    text = str(error)
    m = _YARA_ERROR.match(text)
    if m:
        return RulesError(m.group("file"), int(m.group("line")), m.group("message"))
    return RulesError(fallback_file, 0, text)


def rule_files(directory: Path) -> list[tuple[str, Path]]:
    """(namespace, path) of each rule file under ``directory``, sorted.

    Hidden files and directories (``.git``, editor lock files) are skipped."""
    directory = Path(directory)
    if not directory.is_dir():
        raise RulesError(str(directory), 0, "not a directory")
    found = []
    for root, dirs, files in os.walk(directory):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in files:
            if name.startswith(".") or not name.lower().endswith(RULE_SUFFIXES):
                continue
            path = Path(root, name)
            found.append((path.relative_to(directory).as_posix(), path))
    return sorted(found)


def stat_snapshot(directory: Path) -> tuple[tuple[str, int, int, int], ...]:
    """What the poller compares: each rule file's name, mtime, size and inode
    (an editor that saves by rename changes the inode)."""
    try:
        files = rule_files(directory)
    except RulesError:
        return ()
    snap = []
    for ns, path in files:
        try:
            st = path.stat()
        except OSError:
            continue
        snap.append((ns, st.st_mtime_ns, st.st_size, st.st_ino))
    return tuple(snap)


@dataclass(frozen=True, slots=True)
class CompiledRules:
    """One compiled ruleset; never mutated, swapped as a whole."""

    rules: yara.Rules
    version: str
    rule_count: int
    file_count: int
    snapshot: tuple[tuple[str, int, int, int], ...]
    warnings: tuple[str, ...] = ()
    compile_seconds: float = 0.0
    # The externals the rule sources mention: only these enter a cache key.
    externals_used: frozenset[str] = frozenset(EXTERNALS)


def compile_directory(directory: Path) -> CompiledRules:
    """Compile every rule file under ``directory``.  Raises :class:`RulesError`.

    Blocking (about a second for signature-base): call it from a thread,
    except for the first load at startup."""
    directory = Path(directory)
    started = time.perf_counter()
    # Stat before reading: a change after this point makes the poller reload again.
    snapshot = stat_snapshot(directory)
    try:
        return _compile(directory, snapshot, started)
    except RulesError as e:
        e.snapshot = snapshot  # what was tried: the poller waits for a change
        raise


def _compile(
    directory: Path, snapshot: tuple[tuple[str, int, int, int], ...], started: float
) -> CompiledRules:
    files, version = read_rule_files(directory)
    sources = [text for _, _, text in files]
    try:
        rules = yara.compile(
            filepaths={namespace: str(path) for namespace, path, _ in files}, externals=EXTERNALS
        )
    except yara.Error as e:
        raise _rules_error(e, str(directory)) from None
    return CompiledRules(
        rules=rules,
        version=version,
        rule_count=sum(1 for _ in rules),
        file_count=len(files),
        snapshot=snapshot,
        warnings=tuple(str(w) for w in getattr(rules, "warnings", None) or ()),
        compile_seconds=time.perf_counter() - started,
        # An include'd file is not read here: its externals are then missed,
        # so a ruleset with includes keeps every external in the key.
        externals_used=(frozenset(EXTERNALS) if any("include" in src for src in sources)
                        else mentioned_externals(sources, EXTERNALS)),
    )


def read_rule_files(directory: Path, engine_tag: bytes = b"") -> tuple[list[tuple[str, Path, str]], str]:
    """Every rule file as (namespace, path, text), and the ruleset version:
    a hash over the engine tag, the namespaces and the exact bytes compiled.
    Raises RulesError when there is no rule file or one cannot be read."""
    files = rule_files(directory)
    if not files:
        raise RulesError(str(directory), 0, "no *.yar or *.yara rule files")
    digest = hashlib.sha256(engine_tag)
    out = []
    for namespace, path in files:
        try:
            content = path.read_bytes()
        except OSError as e:
            raise RulesError(str(path), 0, e.strerror or str(e)) from None
        digest.update(namespace.encode() + b"\0" + len(content).to_bytes(8, "big") + content)
        out.append((namespace, path, content.decode("utf-8", "replace")))
    return out, digest.hexdigest()[:VERSION_LENGTH]


def check_rules(directory: Path) -> tuple[int, str]:
    """(rule count, version) of a directory that compiles; raises RulesError."""
    compiled = compile_directory(directory)
    return compiled.rule_count, compiled.version


def find_errors(directory: Path) -> list[RulesError]:
    """Every broken file, not just the first (YARA stops at the first error):
    each file compiled on its own.  For ``rules check``; slower than a load."""
    try:
        files = rule_files(directory)
    except RulesError as e:
        return [e]
    errors = []
    for namespace, path in files:
        try:
            yara.compile(filepaths={namespace: str(path)}, externals=EXTERNALS)
        except yara.Error as e:
            errors.append(_rules_error(e, str(path)))
    return errors


class RulesManager:
    """Owns the current :class:`CompiledRules` and replaces it safely.

    ``reload()`` compiles in ``pool`` and swaps on the reactor thread (one
    attribute assignment: a scan already running keeps the set it started
    with).  A failed compile keeps the old set, logs ``file:line: message``,
    keeps it in ``last_error`` and reports ``on_loaded(False, ...)`` with the
    count and version still in service.  ``start()`` polls the directory every
    ``interval`` seconds on ``reactor``'s clock; a failed set is not retried
    until the files change again.
    """

    def __init__(
        self,
        directory: Path,
        reactor: Any,
        pool: ThreadPool,
        interval: float,
        on_loaded: Callable[[bool, int, str], None] | None = None,
        compiler: Callable[[Path], CompiledRules] | None = None,
        snapshot_store: Path | None = None,
    ) -> None:
        self.directory = Path(directory)
        # Where the last good set is copied (gateway.rulesnapshot), and what
        # ``load_now`` falls back to when the directory does not compile:
        # set for supervised workers, whose restarts must not crash-loop.
        self.snapshot_store = snapshot_store
        self.loaded_from = self.directory  # the snapshot's copy after a fallback
        # The engine switch: ``compile_directory`` (yara-python) unless an engine
        # gives its own, e.g. ``YaraXEngine.compile_directory`` (gateway.engine_yarax),
        # whose CompiledRules.rules then matches with the same match() call.
        self._compiler = compiler or compile_directory
        self._reactor = reactor
        self._pool = pool
        self.interval = interval
        self._observers: list[Callable[[bool, int, str], None]] = [on_loaded] if on_loaded else []
        self.current: CompiledRules | None = None
        self.last_error: RulesError | None = None
        self._attempted: tuple[tuple[str, int, int, int], ...] | None = None
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
            compiled = self._compiler(self.directory)
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
        compiled = self._compiler(path)  # a RulesError here propagates: nothing good to serve
        self.loaded_from = path
        log.warn("rules directory {directory} does not compile: serving the last good set, version "
                 "{version}, from {path}", directory=str(self.directory), version=compiled.version,
                 path=str(path))
        return compiled

    def _save_snapshot(self, compiled: CompiledRules, *, in_thread: bool) -> None:
        """Keep a copy of a set compiled from the directory (gateway.rulesnapshot)."""
        if self.snapshot_store is None:
            return
        args = (self.directory, self.snapshot_store, compiled.version, compiled.snapshot)
        if not in_thread:
            try:
                save_snapshot(*args)
            except OSError as e:
                log.warn("cannot keep a copy of the rules: {error}", error=str(e))
            return
        d = deferToThreadPool(self._reactor, self._pool, save_snapshot, *args)
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
        d = deferToThreadPool(self._reactor, self._pool, self._compiler, self.directory)

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
        d = deferToThreadPool(self._reactor, self._pool, stat_snapshot, self.directory)

        def compare(snapshot: tuple[tuple[str, int, int, int], ...]) -> Deferred[bool] | None:
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


# --- scanning -------------------------------------------------------------


def make_scan_pool(settings: ScanSettings) -> ThreadPool:
    """The scanning pool: ``threads`` workers, one per core when 0.  yara-python
    releases the GIL while it matches, so the threads really run in parallel.
    The caller starts it and stops it at shutdown."""
    threads = settings.threads or os.cpu_count() or 1
    return ThreadPool(minthreads=threads, maxthreads=threads, name="yara-scan")


def externals_for(context: ScanContext) -> dict[str, str]:
    """The per-transaction values of the externals (NULs dropped: C strings)."""
    values = {
        "filename": context.filename,
        "filepath": context.filepath,
        "extension": context.extension,
        "filetype": context.filetype,
        "url": context.url,
        "host": context.host,
        "direction": context.direction,
        "tenant": context.tenant,
    }
    return {k: str(v or "").replace("\0", "") for k, v in values.items()}


class _Timeout(Exception):
    pass


class YaraScanner:
    """``gateway.interfaces.Scanner`` over a :class:`RulesManager`'s current set."""

    def __init__(
        self,
        rules: RulesManager,
        reactor: Any,
        pool: ThreadPool,
        settings: ScanSettings,
        spool_dir: Path,
        *,
        clock: Callable[[], float] = time.monotonic,
        cache: VerdictCache | None = None,
    ) -> None:
        self.cache = cache
        self._rules = rules
        self._reactor = reactor
        self._pool = pool
        self.settings = settings
        self.spool_dir = Path(spool_dir)
        self._clock = clock

    @property
    def version(self) -> str:
        return self._rules.version

    def scan(self, body: bytes | str, context: ScanContext) -> Deferred[Verdict]:
        # The set is picked here, on the reactor, so the verdict's version is
        # the one that really scanned, even if a reload swaps meanwhile.
        compiled = self._rules.current
        if compiled is None:
            return succeed(self.unscannable("engine-error", "no rules loaded"))
        d = deferToThreadPool(self._reactor, self._pool, self.scan_blocking, body, context, compiled)

        def failed(f: Failure) -> Verdict:  # a bug or a stopped pool: still a verdict
            log.failure("scan failed", f)
            return self.unscannable("engine-error", f"{f.type.__name__}: {f.value}",
                                    ruleset_version=compiled.version)

        d.addErrback(failed)
        return d

    def unscannable(self, reason: UnscannableReason, detail: str = "", rules: Iterable[str] = (),
                    **fields: Any) -> Verdict:
        """The verdict on a body not scanned whole: blocked when a rule matched
        what could be scanned, else unscannable with the policy's action."""
        matched = tuple(dict.fromkeys(rules))
        if matched:
            return Verdict("blocked", rules=matched, detail=detail or reason, reason=reason, **fields)
        return Verdict("unscannable", detail=detail or reason, reason=reason,
                       action=self.settings.policy_for(reason), **fields)

    def scan_blocking(
        self, body: bytes | bytearray | memoryview | str, context: ScanContext,
        compiled: CompiledRules | None = None,
    ) -> Verdict:
        """The whole scan, in the calling thread (a pool worker; benchmarks)."""
        compiled = compiled or self._rules.current
        if compiled is None:
            return self.unscannable("engine-error", "no rules loaded")
        started = time.perf_counter()
        if isinstance(body, bytearray | memoryview):
            body = bytes(body)
        if self.cache is None:
            return self._scan_uncached(body, context, compiled)
        try:
            key = self._cache_key(body, context, compiled)
        except OSError as e:
            return self.unscannable("engine-error", f"{type(e).__name__}: {e.strerror or e}",
                                    ruleset_version=compiled.version)
        cached = self.cache.get(key)
        if cached is not None:
            return Verdict(cached.outcome, rules=cached.rules, detail="cached", scanned_bytes=0,
                           duration=time.perf_counter() - started, ruleset_version=compiled.version,
                           reason=cached.reason)
        result = self._scan_uncached(body, context, compiled)
        self.cache.put(key, result)
        return result

    @staticmethod
    def _cache_key(body: bytes | str, context: ScanContext, compiled: CompiledRules) -> tuple[object, ...]:
        externals = externals_for(context)
        relevant = tuple(sorted((k, v) for k, v in externals.items() if k in compiled.externals_used))
        return (compiled.version, context.content_encoding, relevant, body_digest(body))

    def _scan_uncached(self, body: bytes | str, context: ScanContext, compiled: CompiledRules) -> Verdict:
        started = time.perf_counter()
        deadline = self._clock() + self.settings.timeout
        scanned = 0

        def verdict(rules: Iterable[str] = ()) -> Verdict:
            matched = tuple(dict.fromkeys(rules))
            return Verdict(
                "blocked" if matched else "clean", rules=matched, scanned_bytes=scanned,
                duration=time.perf_counter() - started, ruleset_version=compiled.version,
            )

        def unscannable(reason: UnscannableReason, detail: str = "", rules: Iterable[str] = ()) -> Verdict:
            return self.unscannable(
                reason, detail, rules, scanned_bytes=scanned, duration=time.perf_counter() - started,
                ruleset_version=compiled.version,
            )

        try:
            raw_size = len(body) if isinstance(body, bytes) else os.path.getsize(body)
            codings = parse_encodings(context.content_encoding)
            externals = externals_for(context)
            s = self.settings
            if raw_size > s.max_scan_size:
                return unscannable("too-large")
            if not codings:
                matches = self._match(compiled, body, externals, deadline)
                scanned = raw_size
                return verdict(matches)
            # The decoding stops at the smallest limit; max_scan_size wins ties,
            # so a big honest download reads "too-large", as it would unencoded.
            unknown = [c for c in codings if c not in KNOWN_CODINGS]
            if unknown and len(codings) <= MAX_CODINGS:
                # The raw bytes are what a browser passes on (it drops every
                # coding once one is unknown): scanned whole.  The known codings
                # are undone too, as if the unknown ones were bogus labels
                # ("gzip, utf-8"), so a made-up coding cannot hide a gzip body.
                matches = self._match(compiled, body, externals, deadline)
                scanned = raw_size
                known = [c for c in codings if c in KNOWN_CODINGS]
                if known:
                    limit = min(s.max_scan_size, s.max_decoded_size, s.max_decode_ratio * raw_size)
                    _, found, size = self._decode_and_match(compiled, body, known, limit, externals, deadline)
                    matches += found
                    scanned += size
                return unscannable("unknown-encoding", f"unknown-encoding: {unknown[0][:32]!r}", matches)
            limit = min(s.max_scan_size, s.max_decoded_size, s.max_decode_ratio * raw_size)
            result, matches, scanned = self._decode_and_match(
                compiled, body, codings, limit, externals, deadline)
            if not (result.exceeded or result.error or result.trailing):
                return verdict(matches)
            # Not decoded whole (or not only the stream): the raw bytes may
            # still carry something recognisable.
            matches += self._match(compiled, body, externals, deadline)
            scanned += raw_size
            if result.error and len(codings) > 1:
                # A stacked coding that breaks inside hides what the codings
                # around it decoded to (only the broken one's prefix of it was
                # matched): undo the outer codings alone, dropping inner ones
                # until a chain decodes cleanly (at most MAX_CODINGS - 1 more).
                for first in range(1, len(codings)):
                    outer, found, size = self._decode_and_match(
                        compiled, body, codings[first:], limit, externals, deadline)
                    matches += found
                    scanned += size
                    if not outer.error:
                        break
            if result.error:
                return unscannable("corrupt-encoding", f"corrupt-encoding: {result.error}", matches)
            if result.exceeded:
                if limit == s.max_scan_size:
                    return unscannable("too-large", rules=matches)
                return unscannable("decode-limit" if limit == s.max_decoded_size else "bomb", rules=matches)
            return unscannable("trailing-data", f"trailing-data: {result.trailing} bytes", matches)
        except (_Timeout, DecodeTimeout, yara.TimeoutError):
            return unscannable("scan-timeout")
        except yara.Error as e:
            return unscannable("engine-error", f"engine-error: yara: {e}")
        except OSError as e:
            return unscannable("engine-error", f"engine-error: {type(e).__name__}: {e.strerror or e}")

    def _decode_and_match(
        self, compiled: CompiledRules, body: bytes | str, codings: list[str], limit: int,
        externals: dict[str, str], deadline: float,
    ) -> tuple[DecodeResult, list[str], int]:
        """Decode up to ``limit`` and match what came out: (result, rules, bytes matched)."""
        s = self.settings
        decoded = BodySpool(s.memory_threshold, self.spool_dir, prefix="decoded-")
        try:
            with _open_source(body) as source:
                result = decode_into(
                    source, codings, decoded.write, limit=limit, deadline=deadline, clock=self._clock,
                )
            decoded.finish()
            # Whatever was decoded is scanned, up to the limit that stopped
            # it: padding past a limit cannot hide what lies before it.
            # (Trailing bytes are in it too: the decoders pass them through.)
            if result.size or not (result.exceeded or result.error):
                return result, self._match(compiled, decoded.scan_target(), externals, deadline), result.size
            return result, [], 0
        finally:
            decoded.close()

    def _match(
        self, compiled: CompiledRules, target: bytes | str, externals: dict[str, str],
        deadline: float,
    ) -> list[str]:
        remaining = deadline - self._clock()
        if remaining <= 0:
            raise _Timeout()
        timeout = max(1, math.ceil(remaining))  # YARA counts whole seconds
        if isinstance(target, bytes):
            found = compiled.rules.match(data=target, externals=externals, timeout=timeout)
        else:
            found = compiled.rules.match(filepath=target, externals=externals, timeout=timeout)
        return [f"{m.namespace}.{m.rule}" for m in found]


@contextlib.contextmanager
def _open_source(body: bytes | str) -> Any:
    if isinstance(body, bytes):
        yield body
        return
    f: BinaryIO
    with open(body, "rb") as f:
        yield f


# --- command line ---------------------------------------------------------


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


def _rules_check(args: argparse.Namespace) -> int:
    directory = Path(args.directory)
    engine = None
    if args.engine == "yara-x":
        from gateway.engine_yarax import YaraXEngine

        engine = YaraXEngine(1)
    try:
        compiled = engine.compile_directory(directory) if engine else compile_directory(directory)
    except RulesError as first:
        # yara can list every broken file; yara-x reports the first error
        errors = (find_errors(directory) if engine is None else []) or [first]
        if args.json:
            print(json.dumps({"ok": False, "errors": [e.as_dict() for e in errors]}))
        else:
            for e in errors:
                print(e, file=sys.stderr)
        return 1
    finally:
        if engine is not None:
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
    import random
    import threading

    rng = random.Random(0)
    random_mib = rng.randbytes(1024**2)
    words = [b"the", b"gateway", b"scans", b"bodies", b"with", b"rules", b"and", b"text", b"of", b"web"]
    text_mib = b" ".join(rng.choice(words) for _ in range(260_000))[: 1024**2]
    externals = externals_for(ScanContext(direction="response", filetype="text/html"))
    result: dict[str, float] = {}

    def run(name: str, data: bytes, per: Callable[[float, int], float]) -> None:
        compiled.rules.match(data=data, externals=externals)  # warm up
        n, started = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - started) < seconds:
            compiled.rules.match(data=data, externals=externals)
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
