"""The Twisted protocol over StringTransport with stand-in policy objects."""

from __future__ import annotations

import pytest
from twisted.internet.task import Clock

from gateway.interfaces import AuthFailure, UserSeen, Verdict
from gateway.protocol import REQUESTS_PER_TURN
from tests.gateway.fakes import GOOD_KEY, make_harness
from tests.icap_responses import parse_responses

REQ_HDR = b"GET http://example.com/dl/file.txt HTTP/1.1\r\nHost: example.com\r\n\r\n"
RES_HDR = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 11\r\n\r\n"
AUTH = f"Authorization: Bearer {GOOD_KEY}"


def chunked(body: bytes, size: int = 7) -> bytes:
    out = b"".join(b"%x\r\n%s\r\n" % (len(body[i : i + size]), body[i : i + size]) for i in range(0, len(body), size))
    return out + b"0\r\n\r\n"


def respmod(body: bytes | None, *extra: str, service: str = "respmod", method: str = "RESPMOD") -> bytes:
    if body is None:
        enc = f"req-hdr=0, res-hdr={len(REQ_HDR)}, null-body={len(REQ_HDR) + len(RES_HDR)}"
    else:
        enc = f"req-hdr=0, res-hdr={len(REQ_HDR)}, res-body={len(REQ_HDR) + len(RES_HDR)}"
    head = "\r\n".join([f"{method} icap://gw/{service} ICAP/1.0", "Host: gw", *extra, f"Encapsulated: {enc}"])
    return head.encode() + b"\r\n\r\n" + REQ_HDR + RES_HDR + (b"" if body is None else body)


def options(service: str = "respmod") -> bytes:
    return f"OPTIONS icap://gw/{service} ICAP/1.0\r\nHost: gw\r\nEncapsulated: null-body=0\r\n\r\n".encode()


@pytest.mark.parametrize("bytewise", [False, True])
def test_options(bytewise: bool) -> None:
    h = make_harness(preview_size=1024, max_connections=77)
    h.send(options(), bytewise)
    [r] = parse_responses(h.output())
    assert r.status == 200
    assert r.headers["methods"] == "RESPMOD"
    assert r.headers["istag"] == '"yara-test1"'
    assert r.headers["preview"] == "1024"
    assert r.headers["max-connections"] == "77"
    assert r.headers["allow"] == "204"
    assert r.headers["transfer-preview"] == "*"
    assert "options-ttl" in r.headers and "date" in r.headers
    h.send(options("reqmod"))
    assert parse_responses(h.output())[0].headers["methods"] == "REQMOD"
    h.send(options("nope"))
    assert parse_responses(h.output())[0].status == 404
    assert not h.transport.disconnecting


@pytest.mark.parametrize("bytewise", [False, True])
def test_clean_with_allow_204(bytewise: bool) -> None:
    h = make_harness()
    h.send(respmod(chunked(b"hello world"), AUTH, "Allow: 204", "X-Client-Username: alice",
                   "X-Client-IP: 10.1.2.3"), bytewise)
    [r] = parse_responses(h.output())
    assert r.status == 204
    assert h.scanner.contexts[0].filename == "file.txt"
    assert h.scanner.contexts[0].extension == "txt"
    assert h.scanner.contexts[0].tenant == "acme"
    assert h.scanner.contexts[0].direction == "response"
    assert h.recorder.events == [UserSeen(1, "alice", "10.1.2.3", 1_700_000_000.0)]
    assert h.spools[0].closed
    rec = h.observer.records[0]
    assert (rec.outcome, rec.icap_status, rec.tenant) == ("clean", 204, "acme")
    assert (rec.user, rec.client_ip) == ("alice", "10.1.2.3")


@pytest.mark.parametrize("bytewise", [False, True])
def test_clean_without_allow_204_echoes_everything(bytewise: bool) -> None:
    h = make_harness()
    body = bytes(range(256)) * 1000
    h.send(respmod(chunked(body, 5000), AUTH), bytewise)
    h.pump_producer()
    [r] = parse_responses(h.output())
    assert r.status == 200
    assert r.sections["res-hdr"] == RES_HDR
    assert r.body == body
    assert h.spools[0].closed


def test_blocked_gets_block_page() -> None:
    h = make_harness()
    h.send(respmod(chunked(b"some EVIL bytes"), AUTH, "Allow: 204"))
    [r] = parse_responses(h.output())
    assert r.status == 200
    assert r.headers["x-infection-found"] == "Type=0; Resolution=2; Threat=test.evil;"
    assert "x-violations-found" in r.headers
    assert r.sections["res-hdr"].startswith(b"HTTP/1.1 403 Forbidden\r\n")
    assert b"test.evil" in r.body and b"http://example.com/dl/file.txt" in r.body
    assert h.observer.records[0].outcome == "blocked"
    assert h.observer.records[0].detail.startswith("ref=")


def test_reqmod_post_blocked_and_clean_echo() -> None:
    post = b"POST http://example.com/up HTTP/1.1\r\nHost: example.com\r\nContent-Length: 9\r\n\r\n"

    def reqmod(body: bytes) -> bytes:
        head = (f"REQMOD icap://gw/reqmod ICAP/1.0\r\nHost: gw\r\n{AUTH}\r\n"
                f"Encapsulated: req-hdr=0, req-body={len(post)}\r\n\r\n")
        return head.encode() + post + chunked(body)

    h = make_harness()
    h.send(reqmod(b"EVIL data"))
    [r] = parse_responses(h.output())
    assert r.sections["res-hdr"].startswith(b"HTTP/1.1 403")
    assert h.scanner.contexts[0].direction == "request"
    h.send(reqmod(b"good data"))
    h.pump_producer()
    [r] = parse_responses(h.output())
    assert r.status == 200 and r.sections["req-hdr"] == post and r.body == b"good data"


@pytest.mark.parametrize("bytewise", [False, True])
def test_preview_continue_then_verdict(bytewise: bool) -> None:
    h = make_harness()
    body = b"0123456789" * 3
    h.send(respmod(chunked(body[:10]), AUTH, "Preview: 10"), bytewise)
    [cont] = parse_responses(h.output())
    assert cont.status == 100
    h.send(chunked(body[10:]), bytewise)
    h.pump_producer()
    [r] = parse_responses(h.output())
    assert r.status == 200 and r.body == body  # no Allow: 204 after the preview


def test_preview_ieof_allows_204() -> None:
    h = make_harness()
    h.send(respmod(b"5\r\nhello\r\n0; ieof\r\n\r\n", AUTH, "Preview: 10"))
    [r] = parse_responses(h.output())
    assert r.status == 204


def test_null_body_passes_without_scan() -> None:
    h = make_harness()
    h.send(respmod(None, AUTH, "Allow: 204"))
    assert parse_responses(h.output())[0].status == 204
    h.send(respmod(None, AUTH))
    [r] = parse_responses(h.output())
    assert r.status == 200 and r.body is None and r.sections["res-hdr"] == RES_HDR
    assert h.scanner.contexts == []


@pytest.mark.parametrize(
    ("extra", "status", "reason"),
    [((), 401, "missing-key"), (("Authorization: Bearer wrong",), 403, "unknown-key"),
     (("Authorization: Basic Zm9vOmJhcg==",), 401, "missing-key")],
)
def test_unauthenticated_is_refused_and_recorded(extra: tuple[str, ...], status: int, reason: str) -> None:
    h = make_harness()
    h.send(respmod(chunked(b"hello EVIL"), *extra, "Allow: 204"))
    [r] = parse_responses(h.output())
    assert r.status == status
    assert h.scanner.contexts == []  # neither scanned nor passed
    [failure] = h.recorder.events
    assert isinstance(failure, AuthFailure) and failure.reason == reason
    assert h.observer.records[0].outcome == "unauthenticated"
    # the connection stays in frame: the next request is served
    h.send(options())
    assert parse_responses(h.output())[0].status == 200


def test_wrong_service_and_method() -> None:
    h = make_harness()
    h.send(respmod(chunked(b"x"), AUTH, service="nothing"))
    assert parse_responses(h.output())[0].status == 404
    h.send(respmod(chunked(b"x"), AUTH, service="reqmod"))
    assert parse_responses(h.output())[0].status == 405
    assert not h.transport.disconnecting


@pytest.mark.parametrize(
    ("data", "status"),
    [(b"OPTIONS icap://gw/respmod ICAP/1.1\r\n\r\n", 505), (b"BREW icap://gw/x ICAP/1.0\r\n\r\n", 501),
     (b"nonsense\r\n\r\n", 400)],
)
def test_protocol_errors_answer_and_close(data: bytes, status: int) -> None:
    h = make_harness()
    h.send(data)
    [r] = parse_responses(h.output())
    assert r.status == status
    assert r.headers["connection"] == "close"
    assert h.transport.disconnecting


def test_bad_encapsulated_http_head_is_400() -> None:
    h = make_harness()
    bad = b"NOT HTTP\r\n\r\n"
    head = f"RESPMOD icap://gw/respmod ICAP/1.0\r\n{AUTH}\r\nEncapsulated: res-hdr=0, res-body={len(bad)}\r\n\r\n"
    h.send(head.encode() + bad + chunked(b"abc") + options())
    rs = parse_responses(h.output())
    assert [r.status for r in rs] == [400, 200]


def test_read_timeout_mid_request_answers_408() -> None:
    h = make_harness(read_timeout=5.0)
    h.send(respmod(b"5\r\nhel", AUTH))
    h.clock.advance(4.9)
    assert not h.transport.disconnecting
    h.clock.advance(0.2)
    [r] = parse_responses(h.output())
    assert r.status == 408
    assert h.transport.disconnecting


def test_idle_timeout_closes_quietly() -> None:
    h = make_harness(idle_timeout=60.0)
    h.send(options())
    h.output()
    h.clock.advance(61)
    assert h.transport.value() == b""
    assert h.transport.disconnecting


def test_idle_timeout_counts_from_the_last_answer_with_one_timer() -> None:
    # The idle timer is armed once and outlives idle periods (one
    # DelayedCall, not one per request): when it fires it must still measure
    # idle_timeout from the latest answer, and then close on time.
    h = make_harness(idle_timeout=60.0)
    for _ in range(5):
        h.send(respmod(chunked(b"hello"), AUTH, "Allow: 204"))
        assert [r.status for r in parse_responses(h.output())] == [204]
        assert len(h.clock.getDelayedCalls()) == 1
        h.clock.advance(50)
    # The first timer fired 10 s ago and found the connection idle 40 s only.
    assert not h.transport.disconnecting
    h.clock.advance(9.5)
    assert not h.transport.disconnecting
    h.clock.advance(0.5)  # 60 s after the last answer
    assert h.transport.disconnecting
    assert h.transport.value() == b""


def test_idle_timer_waits_out_a_request_under_way() -> None:
    # Fired while a request is being read (head timer running): the idle
    # timer does nothing; after the answer the connection idles in full again.
    h = make_harness(idle_timeout=60.0, head_timeout=100.0)
    h.send(options())
    h.output()
    h.clock.advance(59)
    h.send(b"OPTIONS icap://gw/respmod ICAP/1.0\r\n")  # a head, slowly
    h.clock.advance(30)  # the idle timer fired meanwhile
    assert not h.transport.disconnecting
    h.send(b"Host: gw\r\nEncapsulated: null-body=0\r\n\r\n")
    assert [r.status for r in parse_responses(h.output())] == [200]
    h.clock.advance(59)
    assert not h.transport.disconnecting
    h.clock.advance(1)
    assert h.transport.disconnecting
    h.proto.connectionLost(None)
    assert h.clock.getDelayedCalls() == []


def test_reading_pauses_while_scanning_and_pipelined_requests_wait() -> None:
    h = make_harness()
    h.scanner.hold = True
    h.send(respmod(chunked(b"one"), AUTH, "Allow: 204") + options())
    assert h.output() == b""  # the pipelined OPTIONS waits for the first answer
    h.send(options())  # more bytes while we scan: reading stops
    assert h.transport.producerState == "paused"
    h.clock.advance(1000)  # no read timeout while we scan
    assert not h.transport.disconnecting
    h.scanner.release()
    assert [r.status for r in parse_responses(h.output())] == [204, 200, 200]
    assert h.transport.producerState == "producing"


@pytest.mark.parametrize(
    ("verdict", "policy_kw", "expected"),
    [
        (Verdict("error", detail="timeout"), {"error_policy": "fail-closed"}, 403),
        (Verdict("error", detail="timeout"), {"error_policy": "fail-open"}, 204),
        (Verdict("unscanned", detail="too-large"), {"oversize_policy": "pass"}, 204),
        (Verdict("unscanned", detail="too-large"), {"oversize_policy": "block"}, 403),
    ],
)
def test_error_and_oversize_policies(verdict: Verdict, policy_kw: dict[str, str], expected: int) -> None:
    h = make_harness(**policy_kw)
    h.scanner.result = verdict
    h.send(respmod(chunked(b"data"), AUTH, "Allow: 204"))
    [r] = parse_responses(h.output())
    if expected == 204:
        assert r.status == 204
    else:
        assert r.status == 200 and r.sections["res-hdr"].startswith(b"HTTP/1.1 403")


def test_too_many_connections_get_503() -> None:
    h1 = make_harness(max_connections=1)
    h1.send(respmod(b"5\r\nhel", AUTH))  # busy: an idle one would be closed to make room
    ctx = h1.proto.ctx
    from twisted.internet.testing import StringTransport

    from gateway.protocol import ICAPServerProtocol

    second = ICAPServerProtocol(ctx)
    t = StringTransport()
    second.makeConnection(t)
    second.dataReceived(options())
    assert parse_responses(t.value())[0].status == 503
    assert t.disconnecting


def test_connection_counts_reach_observer() -> None:
    h = make_harness()
    assert h.observer.opened == 1
    h.proto.connectionLost(None)
    assert h.observer.closed == 1
    assert h.proto.ctx.connections == 0


def _big_respmod(body: bytes) -> bytes:
    return respmod(chunked(body, 16 * 1024), AUTH)


def test_large_response_commits_head_early_and_trickles_a_little() -> None:
    h = make_harness(early_response_after=60 * 1024)
    body = bytes(range(256)) * 800  # 200 KiB, no Allow: 204
    data = _big_respmod(body)
    h.scanner.hold = True
    h.send(data[: len(data) - 5])  # all but the last chunk: the verdict is not in
    early = h.output()
    assert early.startswith(b"ICAP/1.0 200 OK\r\n")  # the head went out before the verdict
    released = early.split(b"\r\n\r\n", 1)[1][len(RES_HDR):]
    # only single-byte chunks of the body's start, never a usable part
    pieces = released.split(b"\r\n")
    trickled = b"".join(pieces[i + 1] for i in range(0, len(pieces) - 1, 2) if pieces[i] == b"1")
    assert 0 < len(trickled) < 64
    assert body.startswith(trickled)
    h.send(data[len(data) - 5 :])
    h.scanner.release()
    h.pump_producer()
    [r] = parse_responses(early + h.output())
    assert r.status == 200 and r.body == body  # byte-identical in the end
    assert not h.transport.disconnecting


def test_block_after_early_head_aborts_the_response() -> None:
    h = make_harness(early_response_after=60 * 1024)
    body = b"x" * (100 * 1024) + b"EVIL"
    h.send(_big_respmod(body))
    out = h.output()
    assert out.startswith(b"ICAP/1.0 200 OK\r\n")
    assert b"EVIL" not in out
    assert not out.endswith(b"0\r\n\r\n")  # never a complete message
    assert h.transport.disconnecting
    assert h.observer.records[-1].outcome == "blocked"
    assert h.observer.records[-1].detail.startswith("ref=")


def test_no_early_head_with_allow_204_or_below_threshold() -> None:
    h = make_harness(early_response_after=60 * 1024)
    h.send(respmod(chunked(b"y" * (100 * 1024), 16 * 1024), AUTH, "Allow: 204"))
    assert [r.status for r in parse_responses(h.output())] == [204]
    h.send(respmod(chunked(b"EVIL" + b"y" * 50_000, 16 * 1024), AUTH))
    [r] = parse_responses(h.output())
    assert r.sections["res-hdr"].startswith(b"HTTP/1.1 403")  # small enough for a block page


PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 100


def test_skipped_type_is_decided_on_the_preview() -> None:
    h = make_harness(skip_types=["image/*"])
    h.send(respmod(chunked(PNG), AUTH, "Preview: 108"))  # exactly the preview, no ieof
    [r] = parse_responses(h.output())
    assert r.status == 204  # no 100 Continue: the rest never crosses the wire
    assert r.headers["x-scan-status"] == "unscanned; reason=type:image/png"
    assert h.scanner.contexts == []
    assert h.observer.records[-1].outcome == "unscanned"


def test_skip_types_go_by_magic_bytes_not_content_type() -> None:
    h = make_harness(skip_types=["image/*"])
    # RES_HDR claims text/plain, the bytes are a PNG: skipped
    h.send(respmod(chunked(PNG), AUTH, "Allow: 204"))
    assert parse_responses(h.output())[0].status == 204 and h.scanner.contexts == []
    # bytes that are no image are scanned, whatever the headers say
    h.send(respmod(chunked(b"MZ EVIL"), AUTH, "Allow: 204"))
    [r] = parse_responses(h.output())
    assert r.sections["res-hdr"].startswith(b"HTTP/1.1 403")


def test_no_skip_list_scans_everything() -> None:
    h = make_harness()
    h.send(respmod(chunked(PNG + b"EVIL"), AUTH, "Allow: 204"))
    [r] = parse_responses(h.output())
    assert r.sections["res-hdr"].startswith(b"HTTP/1.1 403")


def test_oversize_body_is_passed_at_once_with_allow_204() -> None:
    h = make_harness(max_scan_size=10_000, oversize_policy="pass")
    data = respmod(chunked(b"z" * 50_000, 4096), AUTH, "Allow: 204")
    cut = len(data) // 2
    h.send(data[:cut])
    [r] = parse_responses(h.output())  # answered mid-body: no need to read it all
    assert r.status == 204 and r.headers["x-scan-status"] == "unscanned; reason=too-large"
    assert h.spools[0].closed and h.scanner.contexts == []
    h.send(data[cut:] + options())  # the rest is dropped, the connection stays in frame
    assert [x.status for x in parse_responses(h.output())] == [200]


def test_oversize_without_allow_204_is_still_echoed_whole() -> None:
    h = make_harness(max_scan_size=10_000, oversize_policy="pass", early_response_after=0)
    body = b"z" * 50_000
    h.scanner.result = Verdict("unscanned", detail="too-large")
    h.send(respmod(chunked(body, 4096), AUTH))
    h.pump_producer()
    [r] = parse_responses(h.output())
    assert r.status == 200 and r.body == body


@pytest.mark.parametrize("allow_204", [True, False])
def test_pipelined_requests_with_verdicts_given_at_once_do_not_nest(allow_204: bool) -> None:
    # An inline scan (gateway.scanning.handoff.InlineScans) gives its verdict
    # while the protocol is still dispatching the request: the answer must not
    # process the next pipelined request from inside that call, or each
    # request nests the stack deeper until Python's recursion limit answers 500.
    h = make_harness()
    count = 600  # well past sys.getrecursionlimit() / a few frames per request
    one = respmod(chunked(b"hello world"), AUTH, *(["Allow: 204"] if allow_204 else []))
    assert len(one) * count < 256 * 1024  # within max_pipelined_bytes: all buffered at once is fine
    h.send(one * count)
    out = h.output()
    for _ in range(count // REQUESTS_PER_TURN):  # the rest of them, a turn at a time
        h.clock.advance(0)
        out += h.output()
    statuses = [r.status for r in parse_responses(out)]
    assert statuses == [204 if allow_204 else 200] * count
    assert not h.transport.disconnecting
    assert [rec.icap_status for rec in h.observer.records] == statuses


class TurnClock(Clock):
    """Reactor turns: a call scheduled while the due ones run waits for the
    next turn, as in ``ReactorBase.runUntilCurrent`` (``Clock`` runs it at once)."""

    def advance(self, amount: float) -> None:
        self.rightNow += amount
        due = [call for call in self.calls if call.getTime() <= self.seconds()]
        for call in due:
            self.calls.remove(call)
            call.called = 1
            call.func(*call.args, **call.kw)


def test_a_pipelining_peer_yields_the_reactor_every_few_requests() -> None:
    # Each answered at once (a verdict given synchronously, as by an inline
    # scan): without a limit one peer's buffered requests would all be
    # served in one reactor turn, the other connections waiting.
    clock = TurnClock()
    h = make_harness(clock=clock)
    h.clock = clock
    count = 2 * REQUESTS_PER_TURN + 3
    h.send(respmod(chunked(b"hello world"), AUTH, "Allow: 204") * count)
    turns = [len(parse_responses(h.output()))]
    while sum(turns) < count and len(turns) < 10:
        clock.advance(0)  # the next reactor turn
        turns.append(len(parse_responses(h.output())))
    assert turns == [REQUESTS_PER_TURN, REQUESTS_PER_TURN, 3]
    # A connection closed while its next turn waits: the turn is cancelled.
    h.send(respmod(chunked(b"hello world"), AUTH, "Allow: 204") * (REQUESTS_PER_TURN + 1))
    assert len(parse_responses(h.output())) == REQUESTS_PER_TURN
    assert [call.active() for call in clock.getDelayedCalls() if call.getTime() == clock.seconds()] == [True]
    h.proto.connectionLost(None)
    assert not [call for call in clock.getDelayedCalls() if call.getTime() == clock.seconds()]
    clock.advance(0)
    assert h.output() == b""


def test_input_waiting_for_its_turn_is_bounded_like_pipelined_input() -> None:
    # Before: a peer whose requests waited for their next turn was still read
    # at full speed, and each read brought more requests than a turn answers:
    # its buffered input grew without bound.
    clock = TurnClock()
    h = make_harness(clock=clock, max_pipelined_bytes=64 * 1024)
    one = respmod(chunked(b"hello world"), AUTH, "Allow: 204")
    h.send(one * (REQUESTS_PER_TURN + 1))
    assert len(parse_responses(h.output())) == REQUESTS_PER_TURN
    h.send(one)  # arrives while the 17th waits for its turn: no more reading
    assert h.transport.producerState == "paused"
    clock.advance(0)
    assert len(parse_responses(h.output())) == 2
    assert h.transport.producerState == "producing"  # all answered: reading again
    h.send(one * (REQUESTS_PER_TURN + 1))
    h.output()
    h.send(one * (64 * 1024 // len(one) + 1))  # past max_pipelined_bytes while a turn waits
    assert h.transport.disconnecting or h.transport.disconnected
    assert h.observer.dropped == ["pipelined-overflow"]
