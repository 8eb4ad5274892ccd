"""Connection recycling (``[server] max_connection_age`` and
``max_connection_transactions``): a persistent connection past its age or
its transaction count closes at a transaction boundary, its last answer
carrying ``Connection: close``, so that behind a load balancer a node back
from a failure gets new connections.  StringTransport and a Clock."""

from __future__ import annotations

from gateway.config import ServerSettings
from tests.gateway.fakes import make_harness
from tests.gateway.test_protocol import AUTH, chunked, options, respmod
from tests.icap_responses import parse_responses


def clean() -> bytes:
    return respmod(chunked(b"hello world"), AUTH, "Allow: 204")


def connection_headers(data: bytes) -> list[str | None]:
    return [r.headers.get("connection") for r in parse_responses(data)]


def test_recycling_is_on_by_default() -> None:
    """A returning node must regain its share without anyone tuning anything."""
    server = ServerSettings()
    assert server.max_connection_age > 0 and server.max_connection_transactions > 0


def test_connection_closes_after_its_last_allowed_transaction() -> None:
    h = make_harness(max_connection_transactions=3, max_connection_age=0)
    h.proto.dataReceived(clean())
    h.proto.dataReceived(options())
    assert connection_headers(h.transport.value()) == [None, None]
    assert not h.transport.disconnecting
    h.proto.dataReceived(clean())
    answers = parse_responses(h.transport.value())
    assert [r.status for r in answers] == [204, 200, 204]
    assert answers[-1].headers["connection"] == "close"
    assert h.transport.disconnecting


def test_connection_past_its_age_closes_at_the_next_answer() -> None:
    h = make_harness(max_connection_age=10, max_connection_transactions=0)
    h.proto.dataReceived(clean())
    h.clock.advance(9)
    h.proto.dataReceived(clean())
    assert connection_headers(h.transport.value()) == [None, None] and not h.transport.disconnecting
    h.clock.advance(2)  # 11 s old, idle: not closed while idle (idle_timeout does that)
    assert not h.transport.disconnecting and len(parse_responses(h.transport.value())) == 2
    h.proto.dataReceived(clean())
    assert connection_headers(h.transport.value()) == [None, None, "close"]
    assert h.transport.disconnecting


def test_age_reached_during_a_scan_closes_after_that_answer() -> None:
    h = make_harness(max_connection_age=10, max_connection_transactions=0)
    h.scanner.hold = True
    h.proto.dataReceived(clean())
    h.clock.advance(15)  # the scan takes long; the transaction is never cut
    assert h.transport.value() == b"" and not h.transport.disconnecting
    h.scanner.release()
    [answer] = parse_responses(h.transport.value())
    assert answer.status == 204 and answer.headers["connection"] == "close"
    assert h.transport.disconnecting


def test_pipelined_requests_are_all_answered_before_the_close() -> None:
    """The boundary is one after which the peer sent nothing more: closing
    earlier would drop a request already sent."""
    h = make_harness(max_connection_transactions=1, max_connection_age=0)
    h.scanner.hold = True
    h.proto.dataReceived(clean() + options())
    h.scanner.release()
    answers = parse_responses(h.transport.value())
    assert [r.status for r in answers] == [204, 200]
    assert [r.headers.get("connection") for r in answers] == [None, "close"]
    assert h.transport.disconnecting


def test_zero_disables_recycling() -> None:
    h = make_harness(max_connection_age=0, max_connection_transactions=0)
    for _ in range(50):
        h.proto.dataReceived(clean())
        h.clock.advance(100)  # under idle_timeout (300 s) each time
    assert connection_headers(h.transport.value()) == [None] * 50
    assert not h.transport.disconnecting
