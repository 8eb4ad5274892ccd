"""Table-driven tests of the sans-IO ICAP core; every case is fed whole and byte by byte."""

from __future__ import annotations

import pytest

from gateway.icap import limits
from gateway.icap.connection import MUST_CLOSE, ServerConnection, parse_encapsulated, service_of
from gateway.icap.errors import LocalProtocolError, ProtocolError
from gateway.icap.events import (
    NEED_DATA,
    PAUSED,
    BodyData,
    ConnectionClosed,
    EndOfMessage,
    PreviewEnd,
    Request,
)

REQ_HDR = b"GET http://example.com/file.txt HTTP/1.1\r\nHost: example.com\r\n\r\n"
RES_HDR = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\n"
POST_HDR = b"POST http://example.com/up HTTP/1.1\r\nHost: example.com\r\nContent-Length: 11\r\n\r\n"


def icap(method: str, encapsulated: str | None, *extra: str, uri: str = "icap://gw:1344/respmod") -> bytes:
    lines = [f"{method} {uri} ICAP/1.0", "Host: gw"]
    lines += extra
    if encapsulated is not None:
        lines.append(f"Encapsulated: {encapsulated}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def respmod(body: bytes, *extra: str) -> bytes:
    enc = f"req-hdr=0, res-hdr={len(REQ_HDR)}, res-body={len(REQ_HDR) + len(RES_HDR)}"
    return icap("RESPMOD", enc, *extra) + REQ_HDR + RES_HDR + body


def feed(data: bytes, *, bytewise: bool) -> list[object]:
    """Feed ``data`` and collect events until the connection waits; adjacent
    BodyData are merged so whole and byte-by-byte runs compare equal."""
    conn = ServerConnection()
    events: list[object] = []
    pieces = [data[i : i + 1] for i in range(len(data))] if bytewise else [data]
    for piece in pieces:
        conn.receive_data(piece)
        while True:
            ev = conn.next_event()
            if ev is NEED_DATA or ev is PAUSED:
                break
            if isinstance(ev, BodyData) and events and isinstance(events[-1], BodyData):
                events[-1] = BodyData(events[-1].data + ev.data)
            else:
                events.append(ev)
    return events


def summary(events: list[object]) -> list[object]:
    out: list[object] = []
    for ev in events:
        if isinstance(ev, Request):
            out.append((ev.method, ev.service, ev.body, ev.req_hdr, ev.res_hdr, ev.preview, ev.allow_204))
        elif isinstance(ev, BodyData):
            out.append(ev.data)
        else:
            out.append(ev)
    return out


GOOD_CASES = {
    "options without Encapsulated": (
        icap("OPTIONS", None),
        [("OPTIONS", "respmod", "null-body", None, None, None, False), EndOfMessage()],
    ),
    "options null-body": (
        icap("OPTIONS", "null-body=0", uri="icap://gw/reqmod?x=1"),
        [("OPTIONS", "reqmod", "null-body", None, None, None, False), EndOfMessage()],
    ),
    "reqmod GET without body": (
        icap("REQMOD", f"req-hdr=0, null-body={len(REQ_HDR)}", uri="icap://gw/reqmod") + REQ_HDR,
        [("REQMOD", "reqmod", "null-body", REQ_HDR, None, None, False), EndOfMessage()],
    ),
    "reqmod POST with chunked body": (
        icap("REQMOD", f"req-hdr=0, req-body={len(POST_HDR)}", "Allow: 204", uri="icap://gw/reqmod")
        + POST_HDR + b"b\r\nhello world\r\n0\r\n\r\n",
        [("REQMOD", "reqmod", "req-body", POST_HDR, None, None, True), b"hello world", EndOfMessage()],
    ),
    "respmod with chunk extensions and several chunks": (
        respmod(b"5;name=value\r\nhello\r\n1 ; x\r\n \r\n5\r\nworld\r\n0\r\n\r\n"),
        [("RESPMOD", "respmod", "res-body", REQ_HDR, RES_HDR, None, False), b"hello world", EndOfMessage()],
    ),
    "respmod with upper-case hex and trailers": (
        respmod(b"A\r\n0123456789\r\n0\r\nX-Trailer: yes\r\n\r\n"),
        [("RESPMOD", "respmod", "res-body", REQ_HDR, RES_HDR, None, False), b"0123456789", EndOfMessage()],
    ),
    "respmod res-hdr only": (
        icap("RESPMOD", f"res-hdr=0, res-body={len(RES_HDR)}") + RES_HDR + b"3\r\nabc\r\n0\r\n\r\n",
        [("RESPMOD", "respmod", "res-body", None, RES_HDR, None, False), b"abc", EndOfMessage()],
    ),
    "respmod null-body (HEAD, 304)": (
        icap("RESPMOD", f"req-hdr=0, res-hdr={len(REQ_HDR)}, null-body={len(REQ_HDR) + len(RES_HDR)}")
        + REQ_HDR + RES_HDR,
        [("RESPMOD", "respmod", "null-body", REQ_HDR, RES_HDR, None, False), EndOfMessage()],
    ),
    "preview with ieof": (
        respmod(b"5\r\nhello\r\n0; ieof\r\n\r\n", "Preview: 10", "Allow: 204"),
        [("RESPMOD", "respmod", "res-body", REQ_HDR, RES_HDR, 10, True), b"hello", EndOfMessage(ieof=True)],
    ),
    "empty preview with ieof": (
        respmod(b"0; ieof\r\n\r\n", "Preview: 0"),
        [("RESPMOD", "respmod", "res-body", REQ_HDR, RES_HDR, 0, False), EndOfMessage(ieof=True)],
    ),
    "preview without ieof waits": (
        respmod(b"4\r\nabcd\r\n0\r\n\r\n", "Preview: 4"),
        [("RESPMOD", "respmod", "res-body", REQ_HDR, RES_HDR, 4, False), b"abcd", PreviewEnd()],
    ),
    "leading empty lines are ignored": (
        b"\r\n\r\n" + icap("OPTIONS", "null-body=0"),
        [("OPTIONS", "respmod", "null-body", None, None, None, False), EndOfMessage()],
    ),
}


@pytest.mark.parametrize("bytewise", [False, True], ids=["whole", "bytewise"])
@pytest.mark.parametrize("name", list(GOOD_CASES))
def test_good_requests(name: str, bytewise: bool) -> None:
    data, expected = GOOD_CASES[name]
    assert summary(feed(data, bytewise=bytewise)) == expected


BAD_CASES = {
    "wrong version": (b"OPTIONS icap://gw/x ICAP/2.0\r\n\r\n", 505),
    "http instead of icap": (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    "unknown method": (b"PATCH icap://gw/x ICAP/1.0\r\n\r\n", 501),
    "lower-case method": (b"options icap://gw/x ICAP/1.0\r\n\r\n", 400),
    "garbage request line": (b"hello\r\n\r\n", 400),
    "missing Encapsulated on respmod": (icap("RESPMOD", None), 400),
    "Encapsulated ends with a header": (icap("RESPMOD", "res-hdr=0") + RES_HDR, 400),
    "Encapsulated sections out of order": (
        icap("RESPMOD", f"res-hdr=0, req-hdr={len(RES_HDR)}, null-body=99"), 400),
    "Encapsulated req-body on respmod": (icap("RESPMOD", "req-hdr=0, req-body=60"), 400),
    "Encapsulated offsets decrease": (icap("REQMOD", "req-hdr=10, req-body=5"), 400),
    "Encapsulated garbage": (icap("REQMOD", "req-hdr=zero, req-body=5"), 400),
    "Encapsulated head too large": (
        icap("REQMOD", f"req-hdr=0, req-body={limits.MAX_ENCAPSULATED_HEAD_SIZE + 1}"), 400),
    "encapsulated block without empty line": (
        icap("REQMOD", "req-hdr=0, null-body=20") + b"GET / HTTP/1.1\r\nA: bc", 400),
    "folded ICAP header": (b"OPTIONS icap://gw/x ICAP/1.0\r\nA: b\r\n c\r\n\r\n", 400),
    "header without colon": (b"OPTIONS icap://gw/x ICAP/1.0\r\nNoColon\r\n\r\n", 400),
    "bad header name": (b"OPTIONS icap://gw/x ICAP/1.0\r\nBad Name: x\r\n\r\n", 400),
    "too many headers": (
        b"OPTIONS icap://gw/x ICAP/1.0\r\n"
        + b"".join(b"X-%d: y\r\n" % i for i in range(limits.MAX_ICAP_HEADERS + 1)) + b"\r\n", 400),
    "head too large": (b"OPTIONS icap://gw/x ICAP/1.0\r\nX: " + b"a" * limits.MAX_ICAP_HEAD_SIZE, 400),
    "chunk-size line too long": (respmod(b"5" + b" " * (limits.MAX_CHUNK_SIZE_LINE + 1)), 400),
    "chunk size not hex": (respmod(b"zz\r\nhello\r\n"), 400),
    "chunk size empty": (respmod(b"\r\nhello\r\n"), 400),
    "chunk data without CRLF": (respmod(b"5\r\nhelloXX0\r\n\r\n"), 400),
    "preview longer than announced": (respmod(b"6\r\nabcdef\r\n0\r\n\r\n", "Preview: 4"), 400),
    "bad Preview value": (respmod(b"0\r\n\r\n", "Preview: lots"), 400),
    "relative garbage URI": (b"OPTIONS gw/x ICAP/1.0\r\n\r\n", 400),
}


@pytest.mark.parametrize("bytewise", [False, True], ids=["whole", "bytewise"])
@pytest.mark.parametrize("name", list(BAD_CASES))
def test_bad_requests(name: str, bytewise: bool) -> None:
    data, status = BAD_CASES[name]
    with pytest.raises(ProtocolError) as info:
        feed(data, bytewise=bytewise)
    assert info.value.status == status


def test_error_answer_closes() -> None:
    conn = ServerConnection()
    conn.receive_data(b"OPTIONS icap://gw/x ICAP/9.9\r\n\r\n")
    with pytest.raises(ProtocolError) as info:
        conn.next_event()
    out = conn.send_error(info.value.status, [("ISTag", '"x"')])
    assert out.startswith(b"ICAP/1.0 505 ICAP Version Not Supported\r\n")
    assert b"Connection: close\r\n" in out and b"Encapsulated: null-body=0\r\n\r\n" in out
    assert conn.our_state == MUST_CLOSE
    with pytest.raises(LocalProtocolError):
        conn.next_event()


def drain(conn: ServerConnection) -> list[object]:
    events = []
    while True:
        ev = conn.next_event()
        if ev is NEED_DATA or ev is PAUSED:
            return events
        events.append(ev)


def test_pipelined_requests_wait_for_the_answer() -> None:
    conn = ServerConnection()
    conn.receive_data(icap("OPTIONS", "null-body=0") + respmod(b"3\r\nabc\r\n0\r\n\r\n", "Allow: 204"))
    first = drain(conn)
    assert [type(e) for e in first] == [Request, EndOfMessage]
    assert conn.next_event() is PAUSED  # the second request waits for our answer
    conn.send_response(200, [("Methods", "RESPMOD")])
    second = drain(conn)
    assert [type(e) for e in second] == [Request, BodyData, EndOfMessage]
    assert conn.can_send_204
    assert conn.send_response(204, []).startswith(b"ICAP/1.0 204 No Content\r\n")
    assert conn.requests_seen == 2
    assert conn.next_event() is NEED_DATA


def test_preview_continue_then_rest_of_body() -> None:
    conn = ServerConnection()
    conn.receive_data(respmod(b"4\r\nabcd\r\n0\r\n\r\n", "Preview: 4"))
    events = drain(conn)
    assert isinstance(events[-1], PreviewEnd)
    assert conn.can_send_204  # answering a preview
    assert conn.send_continue() == b"ICAP/1.0 100 Continue\r\n\r\n"
    assert not conn.can_send_204  # no Allow: 204, preview over
    conn.receive_data(b"2\r\nef\r\n0\r\n\r\n")
    assert drain(conn) == [BodyData(b"ef"), EndOfMessage()]
    with pytest.raises(LocalProtocolError):
        conn.send_response(204, [])
    head = conn.send_response(200, [], res_hdr=RES_HDR, body=True)
    assert b"Encapsulated: res-hdr=0, res-body=%d\r\n\r\n" % len(RES_HDR) in head
    assert conn.send_data(b"abcdef") == b"6\r\nabcdef\r\n"
    assert conn.send_end() == b"0\r\n\r\n"
    assert conn.our_state == "IDLE" and conn.their_state == "IDLE"


def test_answer_to_preview_ends_the_request() -> None:
    conn = ServerConnection()
    conn.receive_data(respmod(b"4\r\nabcd\r\n0\r\n\r\n", "Preview: 4") + icap("OPTIONS", None))
    drain(conn)
    conn.send_response(204, [])
    assert [type(e) for e in drain(conn)] == [Request, EndOfMessage]


def test_early_answer_discards_rest_of_body_and_stays_in_frame() -> None:
    conn = ServerConnection()
    conn.receive_data(respmod(b"3\r\nabc\r\n"))
    assert [type(e) for e in drain(conn)] == [Request, BodyData]
    conn.send_response(403, [])
    conn.receive_data(b"3\r\ndef\r\n0\r\n\r\n" + icap("OPTIONS", None))
    events = drain(conn)
    assert [type(e) for e in events] == [Request, EndOfMessage]
    assert events[0].method == "OPTIONS"


def test_early_answer_during_preview() -> None:
    conn = ServerConnection()
    conn.receive_data(respmod(b"", "Preview: 4"))
    assert [type(e) for e in drain(conn)] == [Request]
    conn.send_response(401, [])
    conn.receive_data(b"4\r\nabcd\r\n0\r\n\r\n" + icap("OPTIONS", None))
    assert [type(e) for e in drain(conn)] == [Request, EndOfMessage]


def test_connection_close_from_client() -> None:
    conn = ServerConnection()
    conn.receive_data(icap("OPTIONS", None, "Connection: close"))
    drain(conn)
    assert not conn.keep_alive
    assert b"Connection: close" in conn.send_response(200, [])
    assert conn.our_state == MUST_CLOSE


def test_eof_between_requests_and_mid_request() -> None:
    conn = ServerConnection()
    conn.receive_data(b"")
    assert isinstance(conn.next_event(), ConnectionClosed)

    conn = ServerConnection()
    conn.receive_data(respmod(b"5\r\nhel"))
    drain(conn)
    assert conn.mid_request
    conn.receive_data(b"")
    with pytest.raises(ProtocolError):
        conn.next_event()


def test_large_chunk_streams_in_pieces() -> None:
    conn = ServerConnection()
    conn.receive_data(respmod(b"100000\r\n"))
    drain(conn)
    got = 0
    for _ in range(16):
        conn.receive_data(b"x" * 65536)
        for ev in drain(conn):
            assert isinstance(ev, BodyData)
            got += len(ev.data)
    assert got == 0x100000
    conn.receive_data(b"\r\n0\r\n\r\n")
    assert drain(conn) == [EndOfMessage()]


def test_body_read_inside_a_chunk_is_handed_on_uncopied() -> None:
    """A read that falls inside a chunk becomes the event's data as it is:
    the bytes object received, not a copy of it."""
    conn = ServerConnection()
    conn.receive_data(respmod(b"30000\r\n"))
    drain(conn)
    piece = bytes(range(256)) * 256
    conn.receive_data(piece)
    (event,) = drain(conn)
    assert isinstance(event, BodyData) and event.data is piece
    # the rest of the chunk and what follows it in one read: split correctly
    conn.receive_data(b"y" * (0x30000 - len(piece)) + b"\r\n5\r\nhello\r\n0\r\n\r\n")
    events = drain(conn)
    assert b"".join(e.data for e in events if isinstance(e, BodyData)) == b"y" * (0x30000 - len(piece)) + b"hello"
    assert events[-1] == EndOfMessage()


def test_mutable_input_is_copied_not_held() -> None:
    conn = ServerConnection()
    conn.receive_data(respmod(b"4\r\n"))
    drain(conn)
    data = bytearray(b"abcd")
    conn.receive_data(data)
    data[:] = b"XXXX"  # the caller reuses its buffer
    (event,) = drain(conn)
    assert isinstance(event, BodyData) and event.data == b"abcd"


def test_buffered_bytes_counts_input_held_while_paused() -> None:
    """What waits unparsed counts against the pipelining bound whether it
    sits in the buffer or is the last read held as it came."""
    conn = ServerConnection()
    conn.receive_data(respmod(b"10\r\n"))
    drain(conn)
    assert conn.buffered_bytes == 0 and not conn.has_buffered_input
    conn.receive_data(b"a" * 10)
    assert conn.buffered_bytes == 10 and conn.has_buffered_input
    conn.receive_data(b"b" * 6 + b"\r\n0\r\n\r\n")
    assert conn.buffered_bytes == 10 + 6 + 7
    events = drain(conn)
    assert b"".join(e.data for e in events if isinstance(e, BodyData)) == b"a" * 10 + b"b" * 6
    assert events[-1] == EndOfMessage() and conn.buffered_bytes == 0


def test_response_encapsulated_forms() -> None:
    conn = ServerConnection()
    conn.receive_data(icap("REQMOD", f"req-hdr=0, null-body={len(REQ_HDR)}") + REQ_HDR)
    drain(conn)
    out = conn.send_response(200, [], req_hdr=REQ_HDR)
    assert f"Encapsulated: req-hdr=0, null-body={len(REQ_HDR)}\r\n".encode() in out
    assert out.endswith(REQ_HDR)


@pytest.mark.parametrize(
    ("value", "method", "expected"),
    [
        ("req-hdr=0, res-hdr=137, res-body=296", "RESPMOD", [("req-hdr", 0), ("res-hdr", 137), ("res-body", 296)]),
        ("opt-body=0", "OPTIONS", [("opt-body", 0)]),
        ("null-body=0", "RESPMOD", [("null-body", 0)]),
        ("REQ-HDR=0,REQ-BODY=10", "REQMOD", [("req-hdr", 0), ("req-body", 10)]),
    ],
)
def test_parse_encapsulated(value: str, method: str, expected: list[tuple[str, int]]) -> None:
    assert parse_encapsulated(value, method) == expected


@pytest.mark.parametrize(
    ("uri", "service"),
    [("icap://gw:1344/respmod", "respmod"), ("icap://gw/reqmod?x=1", "reqmod"), ("icap://gw", ""), ("/echo", "echo")],
)
def test_service_of(uri: str, service: str) -> None:
    assert service_of(uri) == service


def test_request_line_memo_is_bounded_and_gives_the_same_requests() -> None:
    """Request lines are remembered (a proxy repeats its own), within
    limits.MEMO_ENTRIES whatever a peer sends, and a remembered line parses
    to what it parsed to the first time."""
    from gateway.icap import connection

    def first_request(line: bytes) -> Request:
        conn = ServerConnection()
        conn.receive_data(line + b"\r\nHost: gw\r\nEncapsulated: null-body=0\r\n\r\n")
        event = conn.next_event()
        assert isinstance(event, Request)
        return event

    seen = []
    for i in range(limits.MEMO_ENTRIES * 2 + 5):
        line = b"OPTIONS icap://gw/svc%d ICAP/1.0" % i
        request = first_request(line)
        assert (request.method, request.uri, request.service) == ("OPTIONS", f"icap://gw/svc{i}", f"svc{i}")
        assert len(connection._request_lines._values) <= limits.MEMO_ENTRIES
        seen.append(line)
    again = first_request(seen[-1])
    assert again.service == f"svc{len(seen) - 1}"
    long_line = b"OPTIONS icap://gw/" + b"a" * limits.MEMO_KEY_MAX + b" ICAP/1.0"
    first_request(long_line)
    assert long_line not in connection._request_lines._values
