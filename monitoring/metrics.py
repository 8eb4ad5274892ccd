"""The gateway's Prometheus metrics: definitions, label caps, registries.

Metric names and labels are an interface (dashboards and alerts use them);
``docs/metrics.md`` documents each one and a test keeps the two in step.

Every metric lives in a registry handed in, never the process-global default,
so tests and several gateways in one process stay apart.  Several worker
processes are supported through prometheus_client's multiprocess mode: see
:func:`metrics_registry`.

Recording sits on the request path, so label children are resolved once and
cached, and with a clock (the reactor) handed in, increments and observations
are summed in plain dicts and folded into the prometheus_client children
later: a transaction costs a few dict operations instead of seven locked
(in multiprocess mode: mmap-written) value updates.  See FLUSH_INTERVAL for
how far a scrape may lag.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator
from importlib import metadata
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, values
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector
from twisted.internet.interfaces import IDelayedCall, IReactorTime

from gateway.interfaces import BAD_HEADER_NAMES, UNSCANNABLE_REASONS
from gateway.lateblock import LATE_BLOCK_EVENTS
from gateway.sanitise import has_control

PREFIX = "icap_gateway"
OTHER = "other"  # the label value every capped-away value is counted under
NONE = "none"  # the label value for an empty tenant / absent outcome

METHODS = ("OPTIONS", "REQMOD", "RESPMOD")
OUTCOMES = ("clean", "blocked", "error", "unauthenticated", "unscanned", "monitored")
DIRECTIONS = ("request", "response")
RELOAD_RESULTS = ("success", "failure")
# What became of a body not scanned whole: its reason's policy blocked or
# passed it, or a rule matched in what could be scanned (blocked whatever the policy).
UNSCANNABLE_ACTIONS = ("block", "pass", "matched")

# ICAP round trips: an OPTIONS answers in well under a millisecond, a large
# RESPMOD scan may take tens of seconds (scan timeout defaults to 30 s).
REQUEST_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                   5.0, 10.0, 30.0, 60.0)
SCAN_BUCKETS = (0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                2.5, 5.0, 10.0, 30.0)

MAX_SERVICE_LABELS = 16  # the service is the ICAP URI path: a client may send anything
# The services the gateway serves (gateway.decision.SERVICES) always have
# their own label: else 16 made-up service names, sent by anyone before the
# first real request, left reqmod and respmod counted as "other" for good.
SERVED_SERVICES = ("reqmod", "respmod")
MAX_REASON_LABELS = 32  # auth failure reasons are a small fixed set; the cap is a seatbelt
# A label value longer than this, or holding a control character, is counted
# as "other": services and rule namespaces are the peer's and the rule
# files' text, and every distinct value is kept in every scrape.
MAX_LABEL_VALUE_LENGTH = 128
RAW_CACHE_SIZE = 4096  # (method, service, tenant, outcome) combinations remembered as seen

# Folding: with a clock, counts wait in memory and reach the metric children
# (and, in multiprocess mode, the files a scrape reads) when the gateway has
# been quiet for QUIET_INTERVAL (no record for one tick of it), when the last
# connection closed, or at the latest FLUSH_INTERVAL after the first waiting
# count.  So an idle gateway's scrape is current within ~2 QUIET_INTERVAL and
# a busy one's lags by at most FLUSH_INTERVAL (documented in docs/metrics.md).
# The service's stop folds the rest (GatewayMetrics.stop); a process killed
# outright (SIGKILL, OOM) loses at most that interval's counts.
FLUSH_INTERVAL = 1.0
QUIET_INTERVAL = 0.01


class MultiProcessRegistry(CollectorRegistry):
    """A registry that exposes the sum of every worker's metric files."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path
        MultiProcessCollector(self, path)


def metrics_registry(multiprocess_dir: str | None) -> CollectorRegistry:
    """The registry to expose at /metrics.

    ``None``: a private single-process registry with the process collector.

    A directory: multiprocess mode.  Every worker writes its values to files
    there (prometheus_client's mmap files) and the returned registry reads and
    sums all of them, so any process may answer a scrape.  The metric objects
    are then *not* registered in it (they would count this process twice).
    The directory should be emptied before the first worker starts
    (:func:`prepare_multiprocess_dir`) and a dead worker's live gauges
    dropped (:func:`worker_exited`); as a safety net each process drops the
    gauge files of dead processes when it starts (:func:`drop_stale_gauges`).  The process collector is left out: it
    would describe only the process that happens to answer.
    """
    if multiprocess_dir is None:
        registry = CollectorRegistry()
        ProcessCollector(registry=registry)
        return registry
    os.makedirs(multiprocess_dir, exist_ok=True)
    drop_stale_gauges(multiprocess_dir)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = multiprocess_dir
    # prometheus_client picks its value class from the environment when it is
    # first imported; a worker that set the variable later (the usual case
    # when the directory comes from the config file) switches it here, before
    # any metric object exists.
    if not getattr(values.ValueClass, "_multiprocess", False):
        values.ValueClass = values.MultiProcessValue()
    return MultiProcessRegistry(multiprocess_dir)


def prepare_multiprocess_dir(path: str) -> None:
    """Empty (or create) the multiprocess directory.  Call once in the parent
    before workers start: files of a previous run would be summed in."""
    if os.path.isdir(path):
        for name in os.listdir(path):
            if name.endswith(".db"):
                os.unlink(os.path.join(path, name))
    else:
        os.makedirs(path, exist_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def drop_stale_gauges(path: str) -> None:
    """Remove gauge files no live worker owns: live gauges of dead processes
    (a worker that died without :func:`worker_exited`, or a previous run's
    when nobody emptied the directory), and any gauge file carrying this
    process's pid (a previous process with the same pid: prometheus_client
    would carry its values on, so active connections would start above 0).
    Counter and histogram files stay: summing them keeps counters monotonic.
    Called before this process creates any metric."""
    me = os.getpid()
    for name in os.listdir(path):
        if not (name.startswith("gauge_") and name.endswith(".db")):
            continue
        mode, _, pid_text = name[len("gauge_"):-len(".db")].rpartition("_")
        if not pid_text.isdigit():
            continue
        pid = int(pid_text)
        if pid == me or (mode.startswith("live") and not _alive(pid)):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(path, name))


def worker_exited(pid: int, path: str) -> None:
    """Drop a dead worker's live gauges (active connections, queue depth)."""
    mark_process_dead(pid, path)


def remove_multiprocess_dir(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)


class LabelCap:
    """Maps label values to themselves until ``limit`` distinct values have
    been seen; any later new value maps to "other", and so does a value
    longer than MAX_LABEL_VALUE_LENGTH or holding a control character.  Values in ``fixed`` are
    always their own label and do not use up the limit."""

    __slots__ = ("_limit", "_seen")

    def __init__(self, limit: int, fixed: Iterable[str] = ()) -> None:
        self._seen: dict[str, str] = {v: v for v in fixed}
        self._limit = limit + len(self._seen)

    def __call__(self, value: str) -> str:
        label = self._seen.get(value)
        if label is not None:
            return label
        if len(value) > MAX_LABEL_VALUE_LENGTH or has_control(value):
            return OTHER
        if len(self._seen) < self._limit:
            self._seen[value] = value
            return value
        return OTHER

    def __len__(self) -> int:
        return len(self._seen)


class _RegisterCollector(Collector):
    """Reads the register writer's queue depth and error count at scrape time."""

    def __init__(self, queue_depth: Callable[[], int], write_errors: Callable[[], int]) -> None:
        self._queue_depth = queue_depth
        self._write_errors = write_errors

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(
            f"{PREFIX}_register_queue_depth",
            "Register events waiting to be written",
            value=_safe_number(self._queue_depth),
        )
        yield CounterMetricFamily(
            f"{PREFIX}_register_write_errors",
            "Register batches that failed to be written",
            value=_safe_number(self._write_errors),
        )

    def describe(self) -> Iterator[Metric]:
        # Describing without calling the callables keeps registration cheap
        # and free of side effects.
        yield GaugeMetricFamily(f"{PREFIX}_register_queue_depth", "Register events waiting to be written")
        yield CounterMetricFamily(f"{PREFIX}_register_write_errors", "Register batches that failed to be written")


def _safe_number(f: Callable[[], float]) -> float:
    try:
        return float(f())
    except Exception:
        # A scrape must not fail because the register is gone; NaN says "unknown".
        return float("nan")


class _PendingHistogram:
    """Observations of one histogram child not yet folded into it: a count
    per bucket and their sum, as Histogram.observe would have added them."""

    __slots__ = ("bounds", "buckets", "child", "sum", "waiting")

    def __init__(self, child: Histogram) -> None:
        self.child = child
        # prometheus_client's own bounds (ending in +Inf): the first bound
        # >= the value is the bucket observe() increments, as bisect_left finds.
        self.bounds: list[float] = list(child._upper_bounds)  # type: ignore[attr-defined]
        self.buckets = [0] * len(self.bounds)
        self.sum = 0.0
        self.waiting = False

    def observe(self, value: float) -> None:
        if value == value:  # NaN: observe() counts it in no bucket, only in the sum
            self.buckets[bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.waiting = True

    def fold(self) -> None:
        if not self.waiting:
            return
        buckets, self.buckets = self.buckets, [0] * len(self.bounds)
        total, self.sum, self.waiting = self.sum, 0.0, False
        # observe() adds to _sum and to one bucket's value; the same values,
        # added once per bucket.  A test pins the result to observe()'s.
        child = self.child
        child._sum.inc(total)  # type: ignore[attr-defined]
        for value, n in zip(child._buckets, buckets, strict=True):  # type: ignore[attr-defined]
            if n:
                value.inc(n)


def _foldable(child: Histogram) -> bool:
    """Whether this prometheus_client's histogram children have the parts
    _PendingHistogram folds into (else observations go to them at once)."""
    return all(hasattr(child, name) for name in ("_upper_bounds", "_buckets", "_sum"))


def _version() -> str:
    try:
        return metadata.version("icap-gateway")
    except metadata.PackageNotFoundError:
        return "unknown"


class GatewayMetrics:
    """All metric objects of one gateway process, with cached label children.

    Methods here are the hot path: they take plain values and touch only
    pre-resolved children where they can.
    """

    def __init__(
        self,
        registry: CollectorRegistry,
        *,
        max_tenants: int = 100,
        max_rules: int = 200,
        queue_depth: Callable[[], int] = lambda: 0,
        write_errors: Callable[[], int] = lambda: 0,
        clock: IReactorTime | None = None,
        flush_interval: float = FLUSH_INTERVAL,
        quiet_interval: float = QUIET_INTERVAL,
    ) -> None:
        self.registry = registry
        self.multiprocess = isinstance(registry, MultiProcessRegistry)
        # In multiprocess mode the objects write to files that the registry
        # reads back; registering them too would count this process twice.
        reg: CollectorRegistry | None = None if self.multiprocess else registry

        self.requests = Counter(
            f"{PREFIX}_requests", "ICAP transactions finished, by verdict",
            ["method", "service", "tenant", "outcome"], registry=reg,
        )
        self.request_duration = Histogram(
            f"{PREFIX}_request_duration_seconds",
            "Time from an ICAP request's first byte to the end of its response",
            ["method"], buckets=REQUEST_BUCKETS, registry=reg,
        )
        self.scanned_bytes = Counter(
            f"{PREFIX}_scanned_bytes", "Decoded body bytes handed to YARA", ["direction"], registry=reg,
        )
        self.scan_duration = Histogram(
            f"{PREFIX}_scan_duration_seconds", "Time one YARA scan took (decoding included)",
            ["direction"], buckets=SCAN_BUCKETS, registry=reg,
        )
        self.rule_matches = Counter(
            f"{PREFIX}_rule_matches", "YARA rule matches, by rule (namespace.rule)", ["rule"], registry=reg,
        )
        self.scan_cache = Counter(
            f"{PREFIX}_scan_cache", "Verdicts asked for, by what the verdict cache did: hit (it answered), miss "
            "(asked, then scanned) or bypass (not asked: no cache, a scan cheaper than a lookup, or a verdict made "
            "without a scan)",
            ["result"], registry=reg,
        )
        self._cache_children = {r: self.scan_cache.labels(r) for r in ("hit", "miss", "bypass")}
        self.scan_thread = Counter(
            f"{PREFIX}_scan_thread", "Verdicts asked for, by the thread that scanned: reactor (a small body of a "
            "cheap ruleset, [scan] inline_budget) or pool (a scanning thread)", ["thread"], registry=reg,
        )
        self._thread_children = {t: self.scan_thread.labels(t) for t in ("reactor", "pool")}
        self.inline_closures = Counter(
            f"{PREFIX}_inline_scans_closed", "Times a scan of a small body took over 20 ms of CPU, which ends "
            "inline scans of its ruleset: its small bodies then go through the scanning threads until a reload "
            "changes the rules", registry=reg,
        )
        self.unscannable = Counter(
            f"{PREFIX}_unscannable", "Bodies not scanned whole, by reason and what became of them",
            ["direction", "reason", "action"], registry=reg,
        )
        # Every label is from a fixed set: resolved once, a dict lookup per body.
        self._unscannable_children = {
            (d, r, a): self.unscannable.labels(d, r, a)
            for d in DIRECTIONS for r in (*UNSCANNABLE_REASONS, OTHER) for a in UNSCANNABLE_ACTIONS
        }
        self.connections = Counter(f"{PREFIX}_connections", "ICAP connections accepted", registry=reg)
        self.active_connections = Gauge(
            f"{PREFIX}_active_connections", "ICAP connections open now",
            registry=reg, multiprocess_mode="livesum",
        )
        self.bad_headers = Counter(
            f"{PREFIX}_bad_header", "Identity header values refused (the peer's address used, nothing stored)",
            ["header"], registry=reg,
        )
        self._bad_header_children = {h: self.bad_headers.labels(h) for h in BAD_HEADER_NAMES}
        self.internal_errors = Counter(
            f"{PREFIX}_internal_errors",
            "Transactions ended by an unexpected exception (answered ICAP 500, or aborted)", registry=reg,
        )
        self.auth_failures = Counter(
            f"{PREFIX}_auth_failures", "Refused ICAP requests, by reason", ["reason"], registry=reg,
        )
        # The reasons are the protocol's fixed set (Observer.connection_dropped):
        # no label from a peer.
        self.connections_dropped = Counter(
            f"{PREFIX}_connections_dropped", "ICAP connections closed by a limit, by reason "
            "(head-timeout, read-timeout, drain-timeout, write-timeout, pipelined-overflow, evicted-idle)",
            ["reason"], registry=reg,
        )
        # The events are gateway.lateblock's fixed set, all exposed from the start.
        self.late_blocks = Counter(
            f"{PREFIX}_late_block", "Late-block memory: verdicts of cut transfers remembered, the "
            "requests they blocked at the head (respmod-blocked, reqmod-refused), entries expired or evicted",
            ["event"], registry=reg,
        )
        self._late_block_children = {event: self.late_blocks.labels(event) for event in LATE_BLOCK_EVENTS}
        # livemin: with several workers the smallest count shows a worker
        # that has no (or fewer) rules, which is what an operator must see.
        self.rules_loaded_gauge = Gauge(
            f"{PREFIX}_rules_loaded", "YARA rules in force (0: none loaded)",
            registry=reg, multiprocess_mode="livemin",
        )
        self.rules_reloads = Counter(
            f"{PREFIX}_rules_reload", "Rule (re)load attempts, by result", ["result"], registry=reg,
        )
        # 1 until a reload fails; the reload-failing alert needs a state, not
        # an event: a failure followed by no further attempt stays visible.
        self.rules_last_reload_ok = Gauge(
            f"{PREFIX}_rules_last_reload_success",
            "1 if the last rule (re)load succeeded, 0 if it failed (the previous rules stay in force)",
            registry=reg, multiprocess_mode="livemin",
        )
        self.rules_last_reload_ok.set(1)
        self.rules_last_success = Gauge(
            f"{PREFIX}_rules_last_success_timestamp_seconds",
            "When rules were last loaded successfully (POSIX seconds)",
            registry=reg, multiprocess_mode="livemax",
        )
        self.build_info = Gauge(
            f"{PREFIX}_build_info", "Always 1; the version label names the running gateway",
            ["version"], registry=reg, multiprocess_mode="livemax",
        )
        self.build_info.labels(_version()).set(1)

        self._queue_depth = queue_depth
        self._write_errors = write_errors
        self._write_errors_seen = 0
        if self.multiprocess:
            # A collector's callables would only describe the answering
            # process: in multiprocess mode the values go through files,
            # refreshed by :meth:`refresh_register` on a timer.
            self.register_queue_depth: Gauge | None = Gauge(
                f"{PREFIX}_register_queue_depth", "Register events waiting to be written",
                registry=None, multiprocess_mode="livesum",
            )
            self.register_write_errors: Counter | None = Counter(
                f"{PREFIX}_register_write_errors", "Register batches that failed to be written",
                registry=None,
            )
        else:
            self.register_queue_depth = None
            self.register_write_errors = None
            registry.register(_RegisterCollector(queue_depth, write_errors))

        # Label caps and pre-resolved children.
        self.tenant_label = LabelCap(max_tenants, fixed=(NONE,))
        self.rule_label = LabelCap(max_rules)
        self.service_label = LabelCap(MAX_SERVICE_LABELS, fixed=SERVED_SERVICES)
        self.reason_label = LabelCap(MAX_REASON_LABELS)
        self._requests_children: dict[tuple[str, str, str, str], Counter] = {}
        self._requests_by_raw: dict[tuple[str, str, str, str | None], tuple[Counter, Callable[[float], None]]] = {}
        self._method_label = {m: m for m in METHODS}
        self._outcome_label: dict[str | None, str] = {o: o for o in OUTCOMES}
        self._outcome_label[None] = NONE
        self._duration_children = {m: self.request_duration.labels(m) for m in (*METHODS, OTHER)}
        self._scanned_children = {d: self.scanned_bytes.labels(d) for d in DIRECTIONS}
        self._scan_duration_children = {d: self.scan_duration.labels(d) for d in DIRECTIONS}
        self._rule_children: dict[str, Counter] = {}
        self._reason_children: dict[str, Counter] = {}
        self._reload_children = {r: self.rules_reloads.labels(r) for r in RELOAD_RESULTS}

        # Waiting counts (see FLUSH_INTERVAL): counter or gauge child -> amount
        # to add; the dict's keys are bounded by the label caps above.
        self._counts: dict[Any, float] = {}
        self._pending_histograms: dict[Any, _PendingHistogram] = {}
        for child in (*self._duration_children.values(), *self._scan_duration_children.values()):
            if _foldable(child):
                self._pending_histograms[child] = _PendingHistogram(child)
        # direction -> (scanned bytes child, how to observe a scan's duration)
        self._scan_children = {
            d: (self._scanned_children[d], self._observer_of(self._scan_duration_children[d])) for d in DIRECTIONS
        }
        self._clock = clock
        self._flush_interval = flush_interval
        self._quiet_interval = quiet_interval
        self._timer: IDelayedCall | None = None
        self._records = 0  # records so far; unchanged over a tick means quiet
        self._records_at_tick = 0
        self._waiting_since = 0.0
        self._open_connections = 0

    # --- hot path -----------------------------------------------------------

    def request_finished(
        self, method: str, service: str, tenant: str, outcome: str | None, duration: float
    ) -> None:
        raw = (method, service, tenant, outcome)
        hit = self._requests_by_raw.get(raw)
        if hit is None:
            hit = self._resolve_request(raw)
        counts = self._counts
        child = hit[0]
        counts[child] = counts.get(child, 0) + 1
        hit[1](duration)
        self._records += 1
        if self._timer is None:
            self._arm()

    def _resolve_request(
        self, raw: tuple[str, str, str, str | None]
    ) -> tuple[Counter, Callable[[float], None]]:
        """Cap the labels of a new combination and find its children.

        The cache is keyed by the raw values so the usual call is one tuple
        and one dict lookup; it stops growing at RAW_CACHE_SIZE entries (a
        flood of odd service names), after which misses are resolved anew.
        """
        method, service, tenant, outcome = raw
        method_label = self._method_label.get(method, OTHER)
        key = (
            method_label,
            self.service_label(service),
            self.tenant_label(tenant or NONE),
            self._outcome_label.get(outcome, OTHER),
        )
        child = self._requests_children.get(key)
        if child is None:
            child = self._requests_children[key] = self.requests.labels(*key)
        hit = (child, self._observer_of(self._duration_children[method_label]))
        if len(self._requests_by_raw) < RAW_CACHE_SIZE:
            self._requests_by_raw[raw] = hit
        return hit

    def _observer_of(self, child: Histogram) -> Callable[[float], None]:
        pending = self._pending_histograms.get(child)
        return child.observe if pending is None else pending.observe

    def _add(self, child: Any, amount: float = 1) -> None:
        counts = self._counts
        counts[child] = counts.get(child, 0) + amount
        if self._timer is None:
            self._arm()

    def scan_finished(self, direction: str, outcome: str, scanned_bytes: int, duration: float,
                      rules: Iterable[str], cache: str = "bypass", inline: bool = False) -> None:
        """``cache``: hit, miss or bypass (``Verdict.cache``)."""
        children = self._scan_children.get(direction)
        if children is None:  # not a Direction: nothing sensible to count it under
            return
        self._records += 1
        counts = self._counts
        if outcome != "unscanned":
            child = self._cache_children.get(cache) or self._cache_children["bypass"]
            counts[child] = counts.get(child, 0) + 1
            child = self._thread_children["reactor" if inline else "pool"]
            counts[child] = counts.get(child, 0) + 1
        # A cached verdict: YARA did not run, neither bytes nor time belong to a scan.
        if cache != "hit":
            scanned, observe = children
            if scanned_bytes:
                counts[scanned] = counts.get(scanned, 0) + scanned_bytes
            # An "unscanned" verdict (too large, passed) never ran YARA: a zero
            # there would drag the latency quantiles down.
            if outcome != "unscanned":
                observe(duration)
        for rule in rules:
            matched = self._rule_child(rule)
            counts[matched] = counts.get(matched, 0) + 1
        if self._timer is None:
            self._arm()

    def unscannable_body(self, direction: str | None, reason: str, action: str) -> None:
        """A body not scanned whole (``reason`` from UNSCANNABLE_REASONS)."""
        child = self._unscannable_children.get(
            (direction or "", reason if reason in UNSCANNABLE_REASONS else OTHER, action))
        if child is not None:  # not a Direction or an action: nothing sensible to count it under
            self._add(child)

    def _rule_child(self, rule: str) -> Any:
        label = self.rule_label(rule)
        child = self._rule_children.get(label)
        if child is None:
            child = self._rule_children[label] = self.rule_matches.labels(label)
        return child

    def connection_opened(self) -> None:
        self._open_connections += 1
        self._add(self.connections)
        self._add(self.active_connections)

    def connection_closed(self) -> None:
        self._open_connections -= 1
        self._add(self.active_connections, -1)
        if self._open_connections <= 0:
            # Nothing in flight: a scrape now must see every transaction so far.
            self.flush()

    def connection_dropped(self, reason: str) -> None:
        self._add(self.connections_dropped.labels(reason))

    def inline_scans_closed(self) -> None:
        self._add(self.inline_closures)

    def late_block(self, event: str) -> None:
        child = self._late_block_children.get(event)
        if child is not None:  # a fixed set: anything else is not ours to count
            self._add(child)

    def auth_failed(self, reason: str) -> None:
        label = self.reason_label(reason or NONE)
        child = self._reason_children.get(label)
        if child is None:
            child = self._reason_children[label] = self.auth_failures.labels(label)
        self._add(child)

    def bad_header(self, header: str) -> None:
        child = self._bad_header_children.get(header)
        if child is not None:  # a fixed set: anything else is not ours to count
            self._add(child)

    # --- folding ------------------------------------------------------------

    def _arm(self) -> None:
        """Counts wait now: fold them at the next quiet tick (or at once
        without a clock)."""
        clock = self._clock
        if clock is None:
            self.flush()
            return
        self._waiting_since = clock.seconds()
        self._records_at_tick = self._records
        self._timer = clock.callLater(self._quiet_interval, self._tick)

    def _tick(self) -> None:
        self._timer = None
        clock = self._clock
        if not self._counts and not any(p.waiting for p in self._pending_histograms.values()):
            return  # a close folded everything already: the next count arms anew
        if (clock is None or self._records == self._records_at_tick
                or clock.seconds() - self._waiting_since >= self._flush_interval):
            self.flush()
            return
        self._records_at_tick = self._records
        self._timer = clock.callLater(self._quiet_interval, self._tick)

    def flush(self) -> None:
        """Fold every waiting count and observation into the metric children."""
        # A pending tick stays: it finds nothing or what came since, and costs
        # less than cancelling and scheduling one per closing connection.
        counts, self._counts = self._counts, {}
        for child, amount in counts.items():
            if amount:  # a gauge's +1 -1 nets to 0: nothing to write
                child.inc(amount)
        for pending in self._pending_histograms.values():
            if pending.waiting:
                pending.fold()

    def stop(self) -> None:
        """Fold what waits and record at once from now on (the service's
        stop: nothing may be left in memory at exit)."""
        self._clock = None
        timer, self._timer = self._timer, None
        if timer is not None and timer.active():
            timer.cancel()
        self.flush()

    # --- rare events --------------------------------------------------------

    def internal_error(self) -> None:
        self._add(self.internal_errors)

    def rules_loaded(self, ok: bool, rule_count: int, now: float) -> None:
        """A (re)load finished.  On failure the previous rules stay in force,
        so the gauge keeps its value (0 if nothing was ever loaded)."""
        if ok:
            self.rules_loaded_gauge.set(rule_count)
            self.rules_last_success.set(now)
            self.rules_last_reload_ok.set(1)
            self._reload_children["success"].inc()
        else:
            self.rules_last_reload_ok.set(0)
            self._reload_children["failure"].inc()

    def refresh_register(self) -> None:
        """Multiprocess mode: copy the register writer's figures into files."""
        if self.register_queue_depth is None or self.register_write_errors is None:
            return
        depth = _safe_number(self._queue_depth)
        if depth == depth:  # not NaN
            self.register_queue_depth.set(depth)
        errors = _safe_number(self._write_errors)
        if errors == errors and errors > self._write_errors_seen:
            self.register_write_errors.inc(errors - self._write_errors_seen)
            self._write_errors_seen = int(errors)


__all__ = [
    "FLUSH_INTERVAL",
    "NONE",
    "OTHER",
    "PREFIX",
    "QUIET_INTERVAL",
    "GatewayMetrics",
    "LabelCap",
    "MultiProcessRegistry",
    "drop_stale_gauges",
    "metrics_registry",
    "prepare_multiprocess_dir",
    "remove_multiprocess_dir",
    "worker_exited",
]
