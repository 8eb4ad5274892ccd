"""The Scanner the protocol calls: a body and its context in, a Verdict out.

:class:`YaraScanner` implements ``gateway.interfaces.Scanner`` over a
``RulesManager``'s current set (``gateway.scanning.rules``), whichever engine
compiled it: in a scanning thread (``gateway.scanning.handoff``) it undoes
Content-Encoding within limits, then matches; the verdict comes back to the
reactor through the completion queue.  A small unencoded body whose scan is
measured to cost less than that round trip (``[scan] inline_budget``) is
scanned on the reactor thread instead (``handoff.InlineScans``).

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

import contextlib
import math
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any, BinaryIO

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from gateway.config import ScanSettings
from gateway.interfaces import CacheUse, ScanContext, UnscannableReason, Verdict
from gateway.scanning.cache import VerdictCache, body_digest
from gateway.scanning.decoding import (
    KNOWN_CODINGS,
    MAX_CODINGS,
    DecodeResult,
    DecodeTimeout,
    decode_into,
    parse_encodings,
)
from gateway.scanning.engine import EngineError, EngineTimeout
from gateway.scanning.handoff import INLINE_TIMEOUT, CompletionQueue, InlineScans, Pool, ScanPool
from gateway.scanning.rules import CompiledRules, RulesManager
from gateway.scanning.spool import BodySpool

__all__ = ["YaraScanner", "externals_for", "make_scan_pool"]

log = Logger(namespace="gateway.scanning.scanner")


# --- scanning -------------------------------------------------------------


def make_scan_pool(settings: ScanSettings) -> ScanPool:
    """The scanning pool: ``threads`` workers, one per core when 0.  yara-python
    releases the GIL while it matches, so the threads really run in parallel.
    The caller starts it and stops it at shutdown."""
    threads = settings.threads or os.cpu_count() or 1
    return ScanPool(threads, name="yara-scan")


# Scans measured to cost less CPU than this (per ruleset version and body
# size class, learnt by gateway.scanning.handoff.InlineScans from whole
# scans, the cache's own work included) skip the verdict cache.  A body's
# digest, its key and the LRU's upkeep cost about 10 us in a busy worker
# (12 us a 1 KiB transaction, measured in process with the empty ruleset:
# its scan costs 22 us with the cache and 12 without), so for a scan under
# 50 us the cache pays only if over a fifth of such bodies repeat, which a
# proxy's own cache makes rare.  Expensive rulesets (signature-base: about
# 400 us a KiB) keep the cache for every body.
CACHE_MIN_SCAN_SECONDS = 50e-6


def as_inline(v: Verdict) -> Verdict:
    """``replace(v, inline=True)`` at a third of its cost (it looks each field
    up by name); tests/scanning check it copies every field."""
    return Verdict(v.outcome, v.rules, v.detail, v.scanned_bytes, v.duration, v.ruleset_version, v.reason,
                   v.action, True, v.cache)


def externals_for(context: ScanContext) -> dict[str, str]:
    """The per-transaction values of the externals (NULs dropped: C strings)."""
    values: dict[str, str] = {
        "filename": context.filename,
        "filepath": context.filepath,
        "extension": context.extension,
        "filetype": context.filetype,
        "url": context.url,
        "host": context.host,
        "direction": context.direction,
        "tenant": context.tenant,
    }
    try:
        # The usual case, strings without a NUL, is one join and one search.
        if "\0" not in "".join(values.values()):
            return values
    except TypeError:  # a value that is not a string (None): made one below
        pass
    return {k: str(v or "").replace("\0", "") for k, v in values.items()}


_TRANSACTION_EXTERNALS = frozenset(externals_for(ScanContext(direction="response")))


class _Timeout(Exception):
    pass


class YaraScanner:
    """``gateway.interfaces.Scanner`` over a :class:`RulesManager`'s current set."""

    def __init__(
        self,
        rules: RulesManager,
        reactor: Any,
        pool: Pool,
        settings: ScanSettings,
        spool_dir: Path,
        *,
        clock: Callable[[], float] = time.monotonic,
        cache: VerdictCache | None = None,
        on_inline_closed: Callable[[str], object] | None = None,
    ) -> None:
        """``on_inline_closed(version)``: on the reactor thread, once a stall
        ended inline scans of that ruleset version (the metrics count it)."""
        self.cache = cache
        self._on_inline_closed = on_inline_closed
        self._rules = rules
        self._reactor = reactor
        self._pool = pool
        self.settings = settings
        self.spool_dir = Path(spool_dir)
        self._clock = clock
        self._completions = CompletionQueue(reactor)
        self._key_names: tuple[CompiledRules | None, tuple[str, ...]] = (None, ())  # see _key_externals
        self._inline = InlineScans(settings.inline_budget)  # which scans skip the threads

    @property
    def version(self) -> str:
        return self._rules.version

    def scan(self, body: bytes | str, context: ScanContext) -> Deferred[Verdict]:
        """``gateway.interfaces.Scanner.scan``: :meth:`scan_then` with a Deferred."""
        d: Deferred[Verdict] = Deferred()
        self.scan_then(body, context, d.callback)
        return d

    def scan_then(self, body: bytes | str, context: ScanContext, on_verdict: Callable[[Verdict], object]) -> None:
        """Scan in a scanning thread and call ``on_verdict(verdict)`` on the
        reactor thread (with the other verdicts ready by then, in one reactor
        call).  Never fails: a bug or a stopped pool is an engine-error verdict.
        No Deferred: the lean form for a caller that only needs the verdict."""
        # The set is picked here, on the reactor, so the verdict's version is
        # the one that really scanned, even if a reload swaps meanwhile.
        compiled = self._rules.current
        if compiled is None:
            on_verdict(self.unscannable("engine-error", "no rules loaded"))
            return
        inline = self._inline
        if (type(body) is bytes and not context.content_encoding and compiled.engine.runs_in_caller
                and inline.allows(compiled.version, len(body))):
            self._scan_inline(body, context, compiled, on_verdict)
            return
        self._pool.callInThreadWithCallback(
            partial(self._verdict_ready, on_verdict, compiled.version), self._scan_measured, body, context, compiled)

    def _scan_measured(self, body: bytes | str, context: ScanContext, compiled: CompiledRules) -> Verdict:
        """``scan_blocking`` in a scanning thread, its CPU time taught to the
        inline estimate (unencoded bodies in memory only: what may run inline)."""
        started = time.thread_time()
        verdict = self.scan_blocking(body, context, compiled)
        # Not a set a reload replaced since (a scan queued before the swap):
        # its measurement would reset the current set's estimate, closure and all.
        if type(body) is bytes and not context.content_encoding and compiled.version == self._rules.version:
            took = time.thread_time() - started
            if self._inline.observe(compiled.version, len(body), took, full=_full_scan(verdict, body)):
                self._log_stall(len(body), took, compiled, "a scanning thread")
        return verdict

    def _scan_inline(self, body: bytes, context: ScanContext, compiled: CompiledRules,
                     on_verdict: Callable[[Verdict], object]) -> None:
        """A scan cheaper than the hand-off, here on the reactor thread (see
        ``gateway.scanning.handoff.InlineScans``), with YARA's shortest
        timeout: one that reaches it is scanned again in the threads."""
        started = time.thread_time()
        try:
            verdict = self.scan_blocking(body, context, compiled, timeout=INLINE_TIMEOUT)
        except Exception:
            self._failed(on_verdict, compiled.version, Failure())
            return
        # CPU time, not wall time: a reactor the kernel preempted is not a slow scan.
        took = time.thread_time() - started
        if self._inline.observe(compiled.version, len(body), took, full=_full_scan(verdict, body)):
            self._log_stall(len(body), took, compiled, "the reactor thread")
        # Not a verdict yet only when the threads have more time than the inline scan had.
        if verdict.reason == "scan-timeout" and self.settings.timeout > INLINE_TIMEOUT:
            self._pool.callInThreadWithCallback(
                partial(self._verdict_ready, on_verdict, compiled.version), self._scan_measured, body, context,
                compiled)
            return
        on_verdict(as_inline(verdict))

    def _log_stall(self, size: int, took: float, compiled: CompiledRules, where: str) -> None:
        """In the thread that measured the stall (a scanning thread or the reactor's)."""
        log.warn("a {size}-byte scan took {ms:.1f} ms of CPU in {where}: ruleset {version} is scanned only in "
                 "the scanning threads from now on", size=size, ms=took * 1000, where=where,
                 version=compiled.version)
        if self._on_inline_closed is not None:
            self._completions.deliver(self._on_inline_closed, compiled.version)

    def _verdict_ready(self, on_verdict: Callable[[Verdict], object], version: str, ok: bool, result: Any) -> None:
        """In the scanning thread (or the caller's, if the pool is stopped)."""
        if ok:
            self._completions.deliver(on_verdict, result)
        else:  # logged and answered on the reactor thread, like a verdict
            self._completions.deliver(partial(self._failed, on_verdict, version), result)

    def _failed(self, on_verdict: Callable[[Verdict], object], version: str, failure: Failure) -> None:
        """A bug or a stopped pool: still a verdict."""
        log.failure("scan failed", failure)
        kind = failure.type.__name__ if failure.type is not None else "error"
        on_verdict(self.unscannable("engine-error", f"{kind}: {failure.value}",
                                    ruleset_version=version))

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
        compiled: CompiledRules | None = None, timeout: float | None = None,
    ) -> Verdict:
        """The whole scan, in the calling thread (a pool worker; benchmarks).
        ``timeout``: seconds, when shorter than ``[scan] timeout``."""
        compiled = compiled or self._rules.current
        if compiled is None:
            return self.unscannable("engine-error", "no rules loaded")
        started = time.perf_counter()
        if isinstance(body, bytearray | memoryview):
            body = bytes(body)
        externals = externals_for(context)
        # The estimate speaks for unencoded bodies only (what it learns from):
        # a small gzip body may decode to megabytes, and keeps the cache.
        if self.cache is None or (type(body) is bytes and not context.content_encoding
                                  and self._inline.cheaper_than(compiled.version, len(body), CACHE_MIN_SCAN_SECONDS)):
            return self._scan_uncached(body, context, compiled, externals, timeout)
        try:
            key = self._cache_key(body, context, compiled, externals)
        except OSError as e:
            return self.unscannable("engine-error", f"{type(e).__name__}: {e.strerror or e}",
                                    ruleset_version=compiled.version)
        cached = self.cache.get(key)
        if cached is not None:
            return Verdict(cached.outcome, rules=cached.rules, detail="cached", scanned_bytes=0,
                           duration=time.perf_counter() - started, ruleset_version=compiled.version,
                           reason=cached.reason, cache="hit")
        result = self._scan_uncached(body, context, compiled, externals, timeout, cache="miss")
        self.cache.put(key, result)
        return result

    def _cache_key(self, body: bytes | str, context: ScanContext, compiled: CompiledRules,
                   externals: dict[str, str]) -> tuple[object, ...]:
        relevant = tuple([externals[name] for name in self._key_externals(compiled)])
        # A tenant's max_scan_size changes a verdict (too-large): part of the key.
        return (compiled.version, context.content_encoding, context.max_scan_size, relevant, body_digest(body))

    def _key_externals(self, compiled: CompiledRules) -> tuple[str, ...]:
        """The externals ``compiled`` mentions, in a fixed order: the values
        of these (and only these) enter a cache key.  Worked out once per
        compiled set (one entry: a reload makes a new set)."""
        known = self._key_names
        if known[0] is compiled:
            return known[1]
        # Only those a transaction gives a value (externals_for): "owner" is
        # declared for rule sets written for other scanners, and stays empty.
        names = tuple(sorted(n for n in compiled.externals_used if n in _TRANSACTION_EXTERNALS))
        self._key_names = (compiled, names)  # one assignment: safe between the scanning threads
        return names

    def _scan_uncached(self, body: bytes | str, context: ScanContext, compiled: CompiledRules,
                       externals: dict[str, str], timeout: float | None = None,
                       cache: CacheUse = "bypass") -> Verdict:
        """``cache``: what the verdict cache had to do with this scan (the
        metrics' hit, miss or bypass)."""
        started = time.perf_counter()
        deadline = self._clock() + min(timeout or self.settings.timeout, self.settings.timeout)
        scanned = 0

        def verdict(rules: Iterable[str] = ()) -> Verdict:
            matched = tuple(dict.fromkeys(rules))
            return Verdict(
                "blocked" if matched else "clean", rules=matched, scanned_bytes=scanned,
                duration=time.perf_counter() - started, ruleset_version=compiled.version, cache=cache,
            )

        def unscannable(reason: UnscannableReason, detail: str = "", rules: Iterable[str] = ()) -> Verdict:
            return self.unscannable(
                reason, detail, rules, scanned_bytes=scanned, duration=time.perf_counter() - started,
                ruleset_version=compiled.version, cache=cache,
            )

        try:
            raw_size = len(body) if isinstance(body, bytes) else os.path.getsize(body)
            s = self.settings
            if raw_size > (context.max_scan_size or s.max_scan_size):  # a tenant's, or [scan]'s
                return unscannable("too-large")
            if not context.content_encoding:  # the usual case: nothing to undo
                matches = self._match(compiled, body, externals, deadline)
                scanned = raw_size
                return verdict(matches)
            codings = parse_encodings(context.content_encoding)
            if context.max_scan_size and context.max_scan_size != s.max_scan_size:  # a tenant's
                s = replace(s, max_scan_size=context.max_scan_size)
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
        except (_Timeout, DecodeTimeout, EngineTimeout):
            return unscannable("scan-timeout")
        except EngineError as e:
            return unscannable("engine-error", f"engine-error: {e}")
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
        return compiled.engine.match(compiled.rules, target, externals, timeout)


def _full_scan(verdict: Verdict, body: bytes | str) -> bool:
    """The verdict of a real scan of all of ``body``: not the cache's, not a refusal."""
    return verdict.detail != "cached" and verdict.scanned_bytes == len(body)


@contextlib.contextmanager
def _open_source(body: bytes | str) -> Any:
    if isinstance(body, bytes):
        yield body
        return
    f: BinaryIO
    with open(body, "rb") as f:
        yield f
