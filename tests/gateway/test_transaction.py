"""The per-transaction object: its state table, the early commit and
trickle for Squid bug 5352, and the record it produces.  No Twisted."""

from __future__ import annotations

import pytest

from gateway.icap.connection import ServerConnection
from gateway.icap.events import Request
from gateway.interfaces import Tenant, Verdict
from gateway.transaction import TRANSITIONS, TRICKLE_PREFIX, State, Transaction, TransitionError
from tests.gateway.fakes import MemorySpool

RES_HDR = b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n\r\n"
REQ_HDR = b"GET http://example.com/f HTTP/1.1\r\nHost: example.com\r\n\r\n"


def _respmod(allow_204: bool = False) -> tuple[ServerConnection, Request]:
    conn = ServerConnection()
    extra = b"Allow: 204\r\n" if allow_204 else b""
    conn.receive_data(
        b"RESPMOD icap://gw/respmod ICAP/1.0\r\nHost: gw\r\n" + extra
        + b"Encapsulated: req-hdr=0, res-hdr=%d, res-body=%d\r\n\r\n" % (len(REQ_HDR), len(REQ_HDR) + len(RES_HDR))
        + REQ_HDR + RES_HDR)
    req = conn.next_event()
    assert isinstance(req, Request)
    return conn, req


def _tx(req: Request) -> Transaction:
    tx = Transaction(request=req, started=10.0, direction="response", peer="10.0.0.1", client_ip="10.0.0.2")
    tx.spool = MemorySpool()
    return tx


def _headers() -> list[tuple[str, str]]:
    return [("ISTag", '"t"')]


def test_every_state_can_be_answered_and_answered_is_final() -> None:
    for state, targets in TRANSITIONS.items():
        assert (State.ANSWERED in targets) is (state is not State.ANSWERED)
    assert TRANSITIONS[State.ANSWERED] == frozenset()


def test_a_body_past_the_threshold_commits_then_trickles_one_byte_per_piece() -> None:
    conn, req = _respmod()
    tx = _tx(req)
    piece = b"A" * 10
    tx.take(piece)
    assert tx.spool_body(piece, conn, 15, _headers) == b""
    assert tx.state is State.RECEIVING
    tx.take(piece)
    out = tx.spool_body(piece, conn, 15, _headers)
    assert out.startswith(b"ICAP/1.0 200 OK\r\n") and RES_HDR in out and out.endswith(b"1\r\nA\r\n")
    assert tx.state is State.TRICKLING and tx.committed and tx.trickled == 1
    tx.take(piece)
    assert tx.spool_body(piece, conn, 15, _headers) == b"1\r\nA\r\n"
    tx.body_complete()
    assert tx.state is State.SCANNING_COMMITTED and tx.committed


def test_trickle_stops_at_the_prefix() -> None:
    conn, req = _respmod()
    tx = _tx(req)
    tx.trickled = TRICKLE_PREFIX
    for _ in range(3):
        tx.take(b"x" * 2048)
    tx.spool_body(b"x", conn, 1, _headers)  # commits; no byte left to trickle
    assert tx.committed and tx.trickled == TRICKLE_PREFIX and len(tx.prefix) == TRICKLE_PREFIX


@pytest.mark.parametrize("early_after", [0, 10**9])
def test_no_commit_below_the_threshold_or_when_disabled(early_after: int) -> None:
    conn, req = _respmod()
    tx = _tx(req)
    tx.take(b"x" * 100)
    assert tx.spool_body(b"x" * 100, conn, early_after, _headers) == b""
    assert tx.state is State.RECEIVING


def test_allow_204_never_commits() -> None:
    conn, req = _respmod(allow_204=True)
    tx = _tx(req)
    tx.take(b"x" * 100)
    assert tx.spool_body(b"x" * 100, conn, 1, _headers) == b""
    tx.body_complete()
    assert tx.state is State.SCANNING


def test_the_record_goes_out_once() -> None:
    _, req = _respmod()
    tx = _tx(req)
    tx.tenant = Tenant(1, "acme")
    tx.take(b"abc")
    tx.body_complete()
    record = tx.answer(now=12.5, wall_time=1000.0, icap_status=200, outcome="blocked", detail="matched",
                       verdict=Verdict("blocked", rules=["ns.R"], duration=0.25), http_status=403, reference="R1")
    assert record is not None
    assert (record.started, record.duration, record.icap_status, record.http_status) == (997.5, 2.5, 200, 403)
    assert (record.tenant, record.rules, record.body_bytes, record.detail) == ("acme", ("ns.R",), 3, "ref=R1 matched")
    assert (record.client_ip, record.peer, record.direction, record.scan_duration) == (
        "10.0.0.2", "10.0.0.1", "response", 0.25)
    assert tx.answered
    assert tx.answer(now=13, wall_time=1000, icap_status=500, outcome="error", detail="again") is None


def test_the_record_names_an_unscannable_reason_given_as_detail() -> None:
    _, req = _respmod()
    record = _tx(req).answer(now=10, wall_time=0, icap_status=204, outcome="unscanned", detail="too-large")
    assert record is not None and record.unscannable == "too-large"


def test_a_transition_outside_the_table_is_an_error() -> None:
    _, req = _respmod()
    tx = _tx(req)
    tx.body_complete()
    with pytest.raises(TransitionError):
        tx.body_complete()


def test_release_closes_the_spool_once() -> None:
    _, req = _respmod()
    tx = _tx(req)
    spool = tx.spool
    assert isinstance(spool, MemorySpool)
    tx.release()
    tx.release()
    assert spool.closed and tx.spool is None


def test_url_is_empty_until_the_request_head_is_parsed_then_the_heads() -> None:
    from gateway.icap.http import parse_request_head

    _, req = _respmod()
    tx = _tx(req)
    assert tx.url == ""  # asked before the head is parsed (an early refusal's record): not kept
    tx.http_request = parse_request_head(b"GET /a?b HTTP/1.1\r\nHost: example.com\r\n\r\n")
    assert tx.url == "http://example.com/a?b" == tx.url


def test_committed_follows_the_state() -> None:
    conn, req = _respmod()
    tx = _tx(req)
    assert not tx.committed
    tx.take(b"x" * 10)
    tx.spool_body(b"x" * 10, conn, 5, _headers)
    assert tx.state is State.TRICKLING and tx.committed
    tx.body_complete()
    assert tx.state is State.SCANNING_COMMITTED and tx.committed
    tx.answer(now=11.0, wall_time=100.0, icap_status=200, outcome="clean", detail="")
    assert tx.state is State.ANSWERED and not tx.committed
