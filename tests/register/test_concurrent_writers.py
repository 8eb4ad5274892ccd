"""Several gateway nodes write one register: their writers must never leave
one user at one IP with two overlapping login records (issue 11)."""

from __future__ import annotations

import threading
from collections import Counter

from sqlalchemy import select
from sqlalchemy.orm import Session

from gateway.interfaces import UserSeen
from register.db import create_register_engine
from register.models import LoginRecord, User
from register.recorder import BatchRecorder
from tests.register.helpers import T0, add_tenant

GAP = 1800.0
NODES = 2
ROUNDS = 30  # the old read-then-insert writer overlapped in most rounds of this


def _flush_together(writers: list[BatchRecorder]) -> list[BaseException]:
    """Each writer flushes from its own thread, released at the same instant."""
    barrier = threading.Barrier(len(writers))
    errors: list[BaseException] = []

    def run(writer: BatchRecorder) -> None:
        try:
            barrier.wait(10)
            writer.flush_all()
        except BaseException as e:  # reported by the test, not lost in a thread
            errors.append(e)

    threads = [threading.Thread(target=run, args=(w,)) for w in writers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return errors


def test_nodes_flushing_one_user_at_a_new_ip_leave_one_login_record(db_url: str) -> None:
    """Two nodes (separate engines, separate connections) see the same known
    user from a new IP and flush at the same moment, round after round."""
    engines = [create_register_engine(db_url) for _ in range(NODES)]
    try:
        tid, _key = add_tenant(engines[0], "acme")
        writers = [BatchRecorder(e, idle_gap=GAP) for e in engines]
        # A known user: the users row exists before the rounds start.
        writers[0].record(UserSeen(tid, "bob", "192.0.2.1", T0))
        writers[0].flush_all()
        for n in range(ROUNDS):
            ip = f"198.51.100.{n + 1}"
            for i, w in enumerate(writers):
                # The nodes' requests interleave: each saw bob a moment apart.
                w.record(UserSeen(tid, "bob", ip, T0 + 10 + n + i * 0.25))
            assert _flush_together(writers) == []
        with Session(engines[0]) as s:
            rows = s.execute(
                select(LoginRecord.client_ip, LoginRecord.login_at, LoginRecord.last_seen)
                .join(User).where(User.username == "bob")).all()
    finally:
        for e in engines:
            e.dispose()
    per_ip = Counter(ip for ip, _a, _b in rows)
    overlapping = sorted(ip for ip, count in per_ip.items() if count > 1)
    assert overlapping == [], f"{len(overlapping)} of {ROUNDS} rounds left overlapping records"
    assert len(per_ip) == ROUNDS + 1
    # The one record spans what both nodes saw.
    for ip, login_at, last_seen in rows:
        if ip != "192.0.2.1":
            n = int(ip.rsplit(".", 1)[1]) - 1
            assert (login_at.timestamp(), last_seen.timestamp()) == (T0 + 10 + n, T0 + 10 + n + 0.25)


def test_a_node_writing_late_an_earlier_part_of_a_stretch_widens_the_record(db_url: str) -> None:
    """Node B saw bob first but flushes after node A: B's span ends before
    A's record starts (within the idle gap), and it is the same stretch."""
    engine = create_register_engine(db_url)
    try:
        tid, _key = add_tenant(engine, "acme")
        node_a, node_b = BatchRecorder(engine, idle_gap=GAP), BatchRecorder(engine, idle_gap=GAP)
        node_a.record(UserSeen(tid, "bob", "198.51.100.7", T0 + 60))
        node_a.flush_all()
        node_b.record(UserSeen(tid, "bob", "198.51.100.7", T0))
        node_b.record(UserSeen(tid, "bob", "198.51.100.7", T0 + 30))
        node_b.flush_all()
        with Session(engine) as s:
            rows = s.execute(select(LoginRecord.login_at, LoginRecord.last_seen)).all()
    finally:
        engine.dispose()
    assert [(a.timestamp(), b.timestamp()) for a, b in rows] == [(T0, T0 + 60)]


def test_a_backlog_of_spans_joins_the_records_other_nodes_wrote(db_url: str) -> None:
    """Node B was cut off from the database for a while: its backlog holds
    two stretches of bob, and node A has meanwhile written the later one (and
    one more after a pause).  B's spans join A's records, never add a second
    record for a stretch, and a span that bridges two of A's records makes
    them one."""
    engine = create_register_engine(db_url)
    ip = "198.51.100.9"
    try:
        tid, _key = add_tenant(engine, "acme")
        node_a, node_b = BatchRecorder(engine, idle_gap=GAP), BatchRecorder(engine, idle_gap=GAP)
        node_a.record(UserSeen(tid, "bob", ip, T0 + 5000))
        node_a.record(UserSeen(tid, "bob", ip, T0 + 8000))  # after more than the gap: a record of its own
        node_a.flush_all()
        node_b.record(UserSeen(tid, "bob", ip, T0))
        node_b.record(UserSeen(tid, "bob", ip, T0 + 4990))
        node_b.record(UserSeen(tid, "bob", ip, T0 + 6500))  # within the gap of both of A's records
        assert node_b.queue_depth() == 2  # [T0], [T0+4990, T0+6500]
        node_b.flush_all()
        with Session(engine) as s:
            rows = s.execute(select(LoginRecord.login_at, LoginRecord.last_seen)
                             .order_by(LoginRecord.login_at)).all()
    finally:
        engine.dispose()
    assert [(a.timestamp() - T0, b.timestamp() - T0) for a, b in rows] == [(0, 0), (4990, 8000)]
