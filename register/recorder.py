"""The batched background writer of login records and authentication failures.

``record()`` runs on the reactor thread for every request: it only takes a
lock for a dictionary update or a deque append.  A writer thread wakes every
``[register] flush_interval`` (or sooner when a batch is full), takes up to
``batch_size`` records and writes them in ONE transaction.

UserSeen events are coalesced as they arrive: the events of one
(tenant, user, client IP) closer together than ``login_idle_gap`` are one
span (first seen, last seen), so a busy user costs one queue slot, not one
per request.  The writer turns a span into a new login record, or moves the
``last_seen`` of the record it continues.

When the database is unreachable the batch goes back to the front of the
queue and the writer retries with exponential backoff; scanning goes on.  The
queue holds at most ``max_queue`` records: beyond that a record is dropped,
logged (at most once a minute) and counted; nothing is lost silently.  A
record the database refuses as invalid (a constraint, not a connection
problem) is written alone, and if it still fails it is dropped and counted,
so one bad record cannot wedge the queue.  ``stop()`` flushes what is queued.
"""

from __future__ import annotations

import bisect
import datetime as dt
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from sqlalchemy import Engine, delete, insert, select, tuple_, update
from sqlalchemy import text as sql_text
from sqlalchemy.exc import DataError, IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session
from twisted.logger import Logger

from gateway.interfaces import AuthFailure, RegisterEvent, UserSeen
from gateway.sanitise import has_control, text
from register.models import (
    IP_MAX,
    REASON_MAX,
    SHA256_HEX,
    TENANT_NAME_MAX,
    USERNAME_MAX,
    AuthFailureRecord,
    LoginRecord,
    User,
)
from register.models import Tenant as TenantRow

log = Logger()

SessionKey = tuple[int, str, str]  # (tenant id, username, client ip)
MAX_BACKOFF = 60.0


def _storable(value: str, limit: int) -> bool:
    """Whether a peer-derived value may be stored as it is: it fits its
    column and holds no control character."""
    return 0 < len(value) <= limit and not has_control(value)


def _utc(ts: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(ts, dt.UTC)


def _add_span(spans: list[list[float]], start: float, last: float, gap: float) -> int:
    """Insert [start, last] into sorted, gap-separated spans, merging neighbours
    closer than ``gap``.  Returns the change in the number of spans."""
    before = len(spans)
    i = bisect.bisect_left(spans, [start, last])
    spans.insert(i, [start, last])
    # Merge with the previous span, then swallow following ones while they touch.
    if i > 0 and start - spans[i - 1][1] <= gap:
        spans[i - 1][1] = max(spans[i - 1][1], last)
        del spans[i]
        i -= 1
    while i + 1 < len(spans) and spans[i + 1][0] - spans[i][1] <= gap:
        spans[i][1] = max(spans[i][1], spans[i + 1][1])
        del spans[i + 1]
    return len(spans) - before


@dataclass
class Batch:
    failures: list[AuthFailure] = field(default_factory=list)
    sessions: dict[SessionKey, list[list[float]]] = field(default_factory=dict)

    def size(self) -> int:
        return len(self.failures) + sum(len(s) for s in self.sessions.values())


@dataclass
class _Stored:
    """A login record already in the database, as the writer extends it."""

    id: int
    login_at: dt.datetime
    last_seen: dt.datetime


class Transient(Exception):
    """The database could not be reached; the batch is back in the queue."""


class BatchRecorder:
    """``gateway.interfaces.Recorder`` writing batches from its own thread."""

    def __init__(
        self,
        engine: Engine,
        *,
        idle_gap: float = 1800.0,
        batch_size: int = 1000,
        max_queue: int = 100_000,
        flush_interval: float = 1.0,
        shutdown_timeout: float = 10.0,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.engine = engine
        self.idle_gap = idle_gap
        self.batch_size = batch_size
        self.max_queue = max_queue
        self.flush_interval = flush_interval
        self.shutdown_timeout = shutdown_timeout
        self._monotonic = monotonic
        self._lock = threading.Lock()
        self._failures: deque[AuthFailure] = deque()
        self._sessions: dict[SessionKey, list[list[float]]] = {}
        self._depth = 0
        self._wake = threading.Event()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._stopped_callbacks: list[Callable[[], None]] = []
        self._last_drop_log = -1e9
        # Counters, read by monitoring; written under the lock or by the writer only.
        self.dropped = 0
        self.write_errors = 0
        self.written = 0
        self.discarded = 0  # users of tenants erased meanwhile: not an error
        self.refused = 0  # login records with a control character or over-long value: never stored
        self.db_ok = True

    # --- the reactor side -------------------------------------------------

    def record(self, event: RegisterEvent) -> None:
        try:
            if isinstance(event, UserSeen):
                self._record_seen(event)
            elif isinstance(event, AuthFailure):
                self._record_failure(event)
        except Exception:  # the interface promises never to raise into the protocol
            log.failure("register: could not queue a record")

    def _record_seen(self, e: UserSeen) -> None:
        if e.tenant_id <= 0:
            return  # the built-in tenant of [auth] required = false has no register row
        if not _storable(e.username, USERNAME_MAX) or not _storable(e.client_ip, IP_MAX):
            # register.users refuses such values before they get here; a cut
            # or repaired IP or username would be a record of someone else.
            self.refused += 1
            if self.refused == 1 or self.refused % 10000 == 0:
                log.warn("register: refused a login record with an unstorable username or client IP "
                         "({n} so far)", n=self.refused)
            return
        key = (e.tenant_id, e.username, e.client_ip)
        with self._lock:
            spans = self._sessions.get(key)
            if spans:
                last = spans[-1]
                if last[0] - self.idle_gap <= e.at <= last[1] + self.idle_gap and e.at >= last[0]:
                    if e.at > last[1]:  # the common case: the same user's next request
                        last[1] = e.at
                    return
            if self._depth >= self.max_queue:
                self._drop()
                return
            if spans is None:
                self._sessions[key] = [[e.at, e.at]]
                self._depth += 1
            else:
                self._depth += _add_span(spans, e.at, e.at, self.idle_gap)
            full = self._depth >= self.batch_size
        if full:
            self._wake.set()

    def _record_failure(self, e: AuthFailure) -> None:
        with self._lock:
            if self._depth >= self.max_queue:
                self._drop()
                return
            self._failures.append(e)
            self._depth += 1
            full = self._depth >= self.batch_size
        if full:
            self._wake.set()

    def _drop(self) -> None:  # called with the lock held
        self.dropped += 1
        now = self._monotonic()
        if now - self._last_drop_log >= 60.0:
            self._last_drop_log = now
            log.error(
                "register: queue full ({max_queue} records, database unreachable?): "
                "dropping records; {dropped} dropped so far",
                max_queue=self.max_queue, dropped=self.dropped)

    def queue_depth(self) -> int:
        return self._depth

    def healthy(self) -> bool:
        """The database takes writes, or the queue still holds everything
        (and the writer thread, once started, is alive to write it)."""
        if self._thread is not None and not self._thread.is_alive() and not self._stopping:
            return False
        return self.db_ok or self._depth < self.max_queue

    # --- taking and returning batches --------------------------------------

    def _take(self) -> Batch:
        batch = Batch()
        with self._lock:
            room = self.batch_size
            while self._failures and room > 0:
                batch.failures.append(self._failures.popleft())
                room -= 1
            while self._sessions and room > 0:
                key = next(iter(self._sessions))
                spans = self._sessions.pop(key)
                batch.sessions[key] = spans
                room -= len(spans)
            self._depth -= batch.size()
        return batch

    def _put_back(self, batch: Batch) -> None:
        with self._lock:
            self._failures.extendleft(reversed(batch.failures))
            self._depth += len(batch.failures)
            for key, spans in batch.sessions.items():
                mine = self._sessions.get(key)
                if mine is None:
                    self._sessions[key] = spans
                    self._depth += len(spans)
                else:
                    for start, last in spans:
                        self._depth += _add_span(mine, start, last, self.idle_gap)

    # --- the writer side --------------------------------------------------

    def flush(self) -> int:
        """Write one batch; returns how many records left the queue.
        Raises Transient (batch kept) when the database is unreachable."""
        batch = self._take()
        n = batch.size()
        if n == 0:
            return 0
        try:
            self._write(batch)
        except (IntegrityError, DataError) as e:
            log.warn("register: a batch was refused ({err}); writing its records one by one",
                     err=type(e).__name__)
            self._write_singly(batch)
        except SQLAlchemyError as e:
            self.write_errors += 1
            self.db_ok = False
            self._put_back(batch)
            raise Transient(str(getattr(e, "orig", None) or e).strip().splitlines()[0]) from e
        else:
            self.written += n
        self.db_ok = True
        return n

    def flush_all(self) -> int:
        """Write until the queue is empty (raises Transient like ``flush``)."""
        total = 0
        while self._depth > 0:
            n = self.flush()
            if n == 0:
                break
            total += n
        return total

    def _write_singly(self, batch: Batch) -> None:
        singles: Iterable[Batch] = [Batch(failures=[f]) for f in batch.failures] + [
            Batch(sessions={k: v}) for k, v in batch.sessions.items()]
        for single in singles:
            try:
                self._write(single)
                self.written += single.size()
            except (IntegrityError, DataError) as e:
                with self._lock:  # record() counts drops on the reactor thread
                    self.dropped += single.size()
                self.write_errors += 1
                log.error("register: record refused by the database, dropped: {err}",
                          err=str(getattr(e, "orig", None) or e).strip().splitlines()[0])
            except SQLAlchemyError:
                self._put_back(single)  # the connection went away meanwhile: retry later
                self.write_errors += 1

    def _write(self, batch: Batch) -> None:
        with Session(self.engine) as s, s.begin():
            if batch.sessions and s.bind.dialect.name == "sqlite":  # type: ignore[union-attr]
                # Python's sqlite3 opens a transaction only at the first write,
                # so the read of _write_sessions would see no lock at all: take
                # the database's write lock first (another process on the same
                # file waits for it, up to the busy timeout).
                s.execute(sql_text("BEGIN IMMEDIATE"))
            if batch.failures:
                s.execute(insert(AuthFailureRecord), [
                    # Only our own values (the socket's peer address, a name the
                    # register knows, a reason from a fixed set): a seatbelt, no more.
                    {"at": _utc(f.at), "source_ip": text(f.source_ip, IP_MAX),
                     "tenant_presented": (f.tenant_presented or None) and text(f.tenant_presented, TENANT_NAME_MAX),
                     "reason": text(f.reason, REASON_MAX),
                     "client_cert_sha256": f.client_cert_sha256 and text(f.client_cert_sha256, SHA256_HEX)}
                    for f in batch.failures])
            if batch.sessions:
                self._write_sessions(s, batch.sessions)

    def _write_sessions(self, s: Session, sessions: dict[SessionKey, list[list[float]]]) -> None:
        tenant_ids = {k[0] for k in sessions}
        live = set(s.scalars(select(TenantRow.id).where(
            TenantRow.id.in_(tenant_ids), TenantRow.status != "erased")))
        for key in [k for k in sessions if k[0] not in live]:
            self.discarded += len(sessions.pop(key))
        if not sessions:
            return
        pairs = sorted({(k[0], k[1]) for k in sessions})
        user_ids = self._user_ids(s, pairs)
        gap = dt.timedelta(seconds=self.idle_gap)
        earliest = _utc(min(spans[0][0] for spans in sessions.values())) - gap
        uids = set(user_ids.values())
        self._lock_users(s, uids)
        # Every record a span could continue: one that ends within the gap
        # before the earliest span, or later.  Other nodes may have written
        # any of them, before or after the stretch this node saw.
        known: dict[tuple[int, str], list[_Stored]] = {}
        for rid, uid, ip, login_at, last_seen in s.execute(
            select(LoginRecord.id, LoginRecord.user_id, LoginRecord.client_ip,
                   LoginRecord.login_at, LoginRecord.last_seen)
            .where(LoginRecord.user_id.in_(uids), LoginRecord.last_seen >= earliest)
            .order_by(LoginRecord.login_at)
        ):
            known.setdefault((uid, ip), []).append(_Stored(rid, login_at, last_seen))
        inserts: list[dict[str, object]] = []
        widened: dict[int, _Stored] = {}
        merged_away: list[int] = []
        for (tid, username, ip), spans in sessions.items():
            uid = user_ids[(tid, username)]
            records = known.get((uid, ip), [])
            for a, b in spans:
                start, last = _utc(a), _utc(b)
                touching = [r for r in records if start - r.last_seen <= gap and r.login_at - last <= gap]
                if not touching:
                    inserts.append({"user_id": uid, "client_ip": ip, "login_at": start, "last_seen": last})
                    continue
                # The same stretch of activity: widen the first record it
                # touches; records it bridges become part of that one.
                keep, *bridged = touching
                login_at = min([start, *(r.login_at for r in touching)])
                last_seen = max([last, *(r.last_seen for r in touching)])
                if (login_at, last_seen) != (keep.login_at, keep.last_seen):
                    keep.login_at, keep.last_seen = login_at, last_seen
                    widened[keep.id] = keep
                for r in bridged:
                    records.remove(r)
                    widened.pop(r.id, None)
                    merged_away.append(r.id)
        if merged_away:
            s.execute(delete(LoginRecord).where(LoginRecord.id.in_(merged_away)))
        if widened:
            s.execute(update(LoginRecord), [
                {"id": r.id, "login_at": r.login_at, "last_seen": r.last_seen} for r in widened.values()])
        if inserts:
            s.execute(insert(LoginRecord), inserts)

    @staticmethod
    def _lock_users(s: Session, uids: set[int]) -> None:
        """Serialise the writers of several gateway nodes per user, so that
        reading a user's latest login records and then inserting or moving
        them is one step: without it, two nodes flushing the same user from
        a new IP at once each insert a record.  PostgreSQL locks the users'
        rows until commit (in id order: no deadlock between two batches;
        FOR NO KEY UPDATE still lets login records refer to the row), and
        the read that follows sees what the other writer committed.  SQLite
        has no row locks: the whole database is locked by BEGIN IMMEDIATE
        in ``_write``, and with_for_update() renders nothing there."""
        s.execute(select(User.id).where(User.id.in_(uids)).order_by(User.id)
                  .with_for_update(key_share=True))

    @staticmethod
    def _user_ids(s: Session, pairs: list[tuple[int, str]]) -> dict[tuple[int, str], int]:
        rows = [{"tenant_id": t, "username": u} for t, u in pairs]
        if s.bind.dialect.name == "postgresql":  # type: ignore[union-attr]
            from sqlalchemy.dialects.postgresql import insert as dialect_insert
        else:
            from sqlalchemy.dialects.sqlite import insert as dialect_insert
        # Another gateway process may add the same user at the same moment.
        s.execute(dialect_insert(User).on_conflict_do_nothing(), rows)
        found = s.execute(
            select(User.tenant_id, User.username, User.id)
            .where(tuple_(User.tenant_id, User.username).in_(pairs)))
        return {(t, u): i for t, u, i in found}

    # --- the thread -------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="register-writer", daemon=True)
        self._thread.start()

    def stop(self, on_stopped: Callable[[], None] | None = None) -> None:
        """Ask the writer to flush and finish; ``on_stopped`` runs in the
        writer thread when it has (use reactor.callFromThread in it)."""
        if on_stopped is not None:
            self._stopped_callbacks.append(on_stopped)
        self._stopping = True
        self._wake.set()
        if self._thread is None:  # never started (tools, tests): one synchronous attempt
            try:
                self.flush_all()
            except Transient:
                pass
            self._finish()

    def join(self, timeout: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        backoff = 0.0
        deadline: float | None = None
        while True:
            self._wake.wait(backoff or self.flush_interval)
            self._wake.clear()
            if self._stopping and deadline is None:
                deadline = self._monotonic() + self.shutdown_timeout
            try:
                self.flush_all()
                backoff = 0.0
            except Transient as e:
                backoff = min(MAX_BACKOFF, max(self.flush_interval, backoff * 2 or 0.5))
                log.warn("register: database write failed ({err}); {depth} records queued, "
                         "retrying in {backoff:.1f}s", err=str(e), depth=self._depth, backoff=backoff)
                if deadline is not None:
                    backoff = min(backoff, 1.0)
            except Exception:
                log.failure("register: writer error")
                backoff = self.flush_interval
            if deadline is not None and (self._depth == 0 or self._monotonic() >= deadline):
                break
        self._finish()

    def _finish(self) -> None:
        if self._depth:
            lost = self._depth
            with self._lock:
                self._failures.clear()
                self._sessions.clear()
                self._depth = 0
                self.dropped += lost
            log.error("register: stopped with the database unreachable: {lost} records lost",
                      lost=lost)
        callbacks, self._stopped_callbacks = self._stopped_callbacks, []
        for cb in callbacks:
            cb()
