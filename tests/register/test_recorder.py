"""The batched writer: coalescing, one transaction per batch, outages, bounds."""

from __future__ import annotations

import threading

import pytest
from sqlalchemy import Engine, event, select
from sqlalchemy.orm import Session

from gateway.interfaces import AuthFailure, UserSeen
from register import gdpr
from register import recorder as recorder_module
from register.db import create_register_engine
from register.models import AuthFailureRecord, LoginRecord, User
from register.recorder import BatchRecorder, Transient
from register.settings import RegisterSettings
from tests.register.helpers import ADMIN, T0, add_tenant, utc

GAP = 1800.0


def logins(engine: Engine) -> list[tuple[str, str, float, float]]:
    with Session(engine) as s:
        rows = s.execute(
            select(User.username, LoginRecord.client_ip, LoginRecord.login_at, LoginRecord.last_seen)
            .join(User).order_by(User.username, LoginRecord.client_ip, LoginRecord.login_at))
        return [(u, ip, a.timestamp(), b.timestamp()) for u, ip, a, b in rows]


def count_transactions(engine: Engine) -> list[int]:
    commits = [0]
    event.listen(engine, "commit", lambda conn: commits.__setitem__(0, commits[0] + 1))
    return commits


def test_user_seen_coalesced_into_one_login_record(engine: Engine) -> None:
    tid, _ = add_tenant(engine, "acme")
    rec = BatchRecorder(engine, idle_gap=GAP)
    for i in range(500):
        rec.record(UserSeen(tid, "bob", "10.0.0.5", T0 + i))
    rec.record(UserSeen(tid, "bob", "10.0.0.6", T0 + 3))
    rec.record(UserSeen(tid, "carol", "10.0.0.5", T0 + 4))
    assert rec.queue_depth() == 3  # one span per (tenant, user, ip), not per request
    commits = count_transactions(engine)
    assert rec.flush() == 3
    assert commits[0] == 1  # the whole batch in one transaction
    assert logins(engine) == [
        ("bob", "10.0.0.5", T0, T0 + 499),
        ("bob", "10.0.0.6", T0 + 3, T0 + 3),
        ("carol", "10.0.0.5", T0 + 4, T0 + 4),
    ]
    assert rec.queue_depth() == 0 and rec.written == 3


def test_later_batches_move_last_seen_until_an_idle_gap(engine: Engine) -> None:
    tid, _ = add_tenant(engine, "acme")
    rec = BatchRecorder(engine, idle_gap=GAP)
    rec.record(UserSeen(tid, "bob", "10.0.0.5", T0))
    rec.flush()
    rec.record(UserSeen(tid, "bob", "10.0.0.5", T0 + 600))
    rec.flush()
    assert logins(engine) == [("bob", "10.0.0.5", T0, T0 + 600)]
    # Idle for longer than the gap: a new login record starts.
    rec.record(UserSeen(tid, "bob", "10.0.0.5", T0 + 600 + GAP + 1))
    # Within one batch too: a gap splits the span.
    rec.record(UserSeen(tid, "bob", "10.0.0.5", T0 + 600 + 3 * GAP))
    rec.record(UserSeen(tid, "bob", "10.0.0.5", T0 + 600 + 3 * GAP + 5))
    assert rec.queue_depth() == 2
    rec.flush()
    assert logins(engine) == [
        ("bob", "10.0.0.5", T0, T0 + 600),
        ("bob", "10.0.0.5", T0 + 600 + GAP + 1, T0 + 600 + GAP + 1),
        ("bob", "10.0.0.5", T0 + 600 + 3 * GAP, T0 + 600 + 3 * GAP + 5),
    ]
    with Session(engine) as s:
        assert s.scalar(select(User.id).where(User.username == "bob")) is not None
        assert len(list(s.scalars(select(User)))) == 1


def test_failures_written_without_keys(engine: Engine) -> None:
    add_tenant(engine, "acme")
    rec = BatchRecorder(engine)
    rec.record(AuthFailure(T0, "192.0.2.7", "acme", "unknown-key"))
    rec.record(AuthFailure(T0 + 1, "2001:db8::7", None, "missing-key"))
    assert rec.flush_all() == 2
    with Session(engine) as s:
        rows = [(r.at.timestamp(), r.source_ip, r.tenant_presented, r.reason)
                for r in s.scalars(select(AuthFailureRecord).order_by(AuthFailureRecord.at))]
    assert rows == [(T0, "192.0.2.7", "acme", "unknown-key"),
                    (T0 + 1, "2001:db8::7", None, "missing-key")]


def test_database_outage_keeps_records_and_retries(engine: Engine) -> None:
    tid, _ = add_tenant(engine, "acme")
    rec = BatchRecorder(engine, idle_gap=GAP)
    good = rec.engine
    rec.engine = create_register_engine("postgresql+psycopg://postgres@127.0.0.1:1/down")
    rec.record(UserSeen(tid, "bob", "10.0.0.5", T0))
    rec.record(AuthFailure(T0, "192.0.2.7", None, "missing-key"))
    with pytest.raises(Transient):
        rec.flush()
    assert rec.queue_depth() == 2 and rec.write_errors == 1 and rec.dropped == 0
    assert rec.healthy()  # buffering within bounds
    # While down, more of the same user only extends the queued span.
    rec.record(UserSeen(tid, "bob", "10.0.0.5", T0 + 60))
    assert rec.queue_depth() == 2
    rec.engine = good
    assert rec.flush_all() == 2
    assert rec.db_ok and rec.queue_depth() == 0
    assert logins(engine) == [("bob", "10.0.0.5", T0, T0 + 60)]


def test_queue_bound_drops_and_counts(engine: Engine) -> None:
    tid, _ = add_tenant(engine, "acme")
    rec = BatchRecorder(engine, max_queue=5)
    rec.engine = create_register_engine("postgresql+psycopg://postgres@127.0.0.1:1/down")
    for i in range(10):
        rec.record(UserSeen(tid, f"user{i}", "10.0.0.5", T0))
    rec.record(AuthFailure(T0, "192.0.2.7", None, "missing-key"))
    assert rec.queue_depth() == 5 and rec.dropped == 6
    with pytest.raises(Transient):
        rec.flush()
    assert not rec.healthy()


def test_users_of_erased_tenants_are_discarded_not_retried(engine: Engine) -> None:
    tid, _ = add_tenant(engine, "acme")
    other, _ = add_tenant(engine, "beta")
    rec = BatchRecorder(engine)
    rec.record(UserSeen(tid, "bob", "10.0.0.5", T0))
    rec.record(UserSeen(other, "eve", "10.0.0.6", T0))
    rec.record(UserSeen(0, "nobody", "10.0.0.7", T0))  # the built-in tenant of auth-off
    rec.record(UserSeen(999, "ghost", "10.0.0.8", T0))  # never existed
    with Session(engine) as s, s.begin():
        from register import ops
        ops.set_tenant_status(s, ADMIN, "beta", "disabled", utc(T0))
        gdpr.erase(s, ADMIN, "beta", utc(T0), RegisterSettings())
    assert rec.flush_all() == 3
    assert rec.discarded == 2 and rec.dropped == 0 and rec.queue_depth() == 0
    assert [r[0] for r in logins(engine)] == ["bob"]


def test_refused_record_is_isolated_not_wedging_the_queue(
    engine: Engine, backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The recorder refuses a NUL itself now (see the next test): let it
    # through to show what the database's refusal does.
    monkeypatch.setattr(recorder_module, "_storable", lambda value, limit: True)
    tid, _ = add_tenant(engine, "acme")
    rec = BatchRecorder(engine)
    rec.record(AuthFailure(T0, "192.0.2.7", None, "missing-key"))
    rec.record(UserSeen(tid, "bob", "10.0.0.5", T0))
    rec.record(UserSeen(tid, "bad\x00name", "10.0.0.5", T0))  # NUL: PostgreSQL refuses it
    rec.flush_all()
    assert rec.queue_depth() == 0
    names = sorted(r[0] for r in logins(engine))
    assert "bob" in names
    if backend == "postgresql":
        assert rec.dropped == 1 and names == ["bob"]
    with Session(engine) as s:
        assert len(list(s.scalars(select(AuthFailureRecord)))) == 1


def test_nul_in_a_username_never_reaches_the_database(engine: Engine) -> None:
    tid, _ = add_tenant(engine, "acme")
    rec = BatchRecorder(engine)
    rec.record(UserSeen(tid, "bob", "10.0.0.5", T0))
    rec.record(UserSeen(tid, "bad\x00name", "10.0.0.5", T0))
    rec.flush_all()
    assert [r[0] for r in logins(engine)] == ["bob"]
    assert rec.refused == 1 and rec.dropped == 0 and rec.write_errors == 0


def test_writer_thread_flushes_on_stop(engine: Engine) -> None:
    tid, _ = add_tenant(engine, "acme")
    rec = BatchRecorder(engine, flush_interval=3600)  # only the stop makes it write
    rec.start()
    for i in range(20):
        rec.record(UserSeen(tid, f"u{i}", "10.0.0.5", T0))
    done = threading.Event()
    rec.stop(done.set)
    assert done.wait(10)
    rec.join(5)
    assert len(logins(engine)) == 20 and rec.queue_depth() == 0


def test_writer_thread_wakes_when_a_batch_is_full(engine: Engine) -> None:
    tid, _ = add_tenant(engine, "acme")
    rec = BatchRecorder(engine, flush_interval=3600, batch_size=10)
    rec.start()
    try:
        for i in range(10):
            rec.record(UserSeen(tid, f"u{i}", "10.0.0.5", T0))
        for _ in range(100):
            if rec.written == 10:
                break
            threading.Event().wait(0.05)
        assert rec.written == 10
    finally:
        rec.stop()
        rec.join(5)


def test_spans_merge_in_any_order() -> None:
    from register.recorder import _add_span

    spans: list[list[float]] = []
    assert _add_span(spans, 100, 100, 10) == 1
    assert _add_span(spans, 130, 135, 10) == 1  # 30 s later: its own span
    assert _add_span(spans, 50, 60, 10) == 1
    assert spans == [[50, 60], [100, 100], [130, 135]]
    assert _add_span(spans, 105, 125, 10) == -1  # bridges two spans into one
    assert spans == [[50, 60], [100, 135]]
    assert _add_span(spans, 61, 99, 10) == -1
    assert spans == [[50, 135]]


def test_record_never_raises() -> None:
    rec = BatchRecorder(None, max_queue=1)  # type: ignore[arg-type]
    rec.record(None)  # type: ignore[arg-type]
    rec.record(UserSeen(1, "x" * 10_000, "10.0.0.1", T0))  # too long to store: refused, counted
    rec.record(UserSeen(1, "y", "10.0.0.1", T0))
    rec.record(UserSeen(1, "z", "10.0.0.1", T0))  # over the bound: dropped, counted
    assert rec.queue_depth() == 1 and rec.dropped == 1 and rec.refused == 1


@pytest.mark.parametrize(("username", "client_ip"), [
    ("bob", "fe80::1%\rX-Evil: 1"),  # what the old register stored as a client IP
    ("bob", "1" * 3000),  # the old register stored its first 45 characters
    ("bob\nX-Evil: 1", "10.0.0.5"),
    ("b" * 256, "10.0.0.5"),
    ("", "10.0.0.5"),
])
def test_unstorable_login_values_are_refused_not_cut(engine: Engine, username: str, client_ip: str) -> None:
    tid, _ = add_tenant(engine, "acme")
    rec = BatchRecorder(engine, idle_gap=GAP)
    rec.record(UserSeen(tid, username, client_ip, T0))
    rec.record(UserSeen(tid, "carol", "10.0.0.5", T0))
    rec.flush_all()
    assert logins(engine) == [("carol", "10.0.0.5", T0, T0)]
    assert rec.refused == 1 and rec.dropped == 0


def test_auth_failure_fields_are_bounded_and_clean(engine: Engine) -> None:
    rec = BatchRecorder(engine, idle_gap=GAP)
    rec.record(AuthFailure(T0, "10.0.0.9\x00" + "9" * 100, None, "unknown-key\r\n" + "x" * 100))
    rec.flush_all()
    with Session(engine) as s:
        (ip, reason), = s.execute(select(AuthFailureRecord.source_ip, AuthFailureRecord.reason))
    assert len(ip) <= 45 and "\x00" not in ip
    assert len(reason) <= 32 and "\r" not in reason and "\n" not in reason
