"""Differential tests: the fast parsers (one pass over a block, fewer calls
per line) against the line-at-a-time ones they replaced (tests/icap/reference.py).
For any input both accept with the same result or refuse with the same
status and reason."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.icap import limits
from gateway.icap.connection import ServerConnection, _safe_fields, parse_encapsulated
from gateway.icap.errors import LocalProtocolError, ProtocolError
from gateway.icap.events import NEED_DATA, PAUSED, BodyData, Request
from gateway.icap.headers import parse_header_block, parse_header_lines
from gateway.icap.http import parse_request_head, parse_response_head
from tests.icap import reference
from tests.icap.test_fuzz import drive

# Pieces that exercise every rule: separators, blanks, controls (bare CR and
# LF, NUL, DEL), obs-text, token and non-token name characters, folds.
PIECES = [b"Host", b"X-A", b"a", b"Z9", b":", b": ", b" ", b"\t", b"\r", b"\n", b"\r\n", b"\r\n ", b"\r\n\t",
          b"\x00", b"\x01", b"\x7f", b"\xe9", b"\xb2", b"=", b",", b";", b"\"", b"(", b"/", b"@", b"example.com",
          b"http://h/p", b"[::1", b"99999", b"GET", b"HTTP/1.1", b"HTTP/1.0", b"200", b"OK", b"1", b"Host: a"]

text = st.lists(st.sampled_from(PIECES), max_size=14).map(b"".join)
lines = st.lists(text, max_size=6)


def outcome(parse: Callable[..., Any], *args: Any) -> tuple[object, ...]:
    try:
        result = parse(*args)
    except ProtocolError as e:
        return ("error", e.status, e.reason)
    return ("ok", result)


@given(lines)
def test_header_block_matches_line_parser(block_lines: list[bytes]) -> None:
    block = b"\r\n".join(block_lines)
    assert outcome(parse_header_block, block, 4, "HTTP") == outcome(
        parse_header_lines, block.split(b"\r\n"), 4, "HTTP")


def test_header_block_edges() -> None:
    for block in (b"", b"\r\n", b"A: 1\r\n", b"\r\nA: 1", b"A:", b":a", b"A :1", b"A: 1\r\n\r\nB: 2",
                  b"A: 1\rB: 2", b"A: 1\nB: 2", b"A: \x00", b"A\x00: 1", b"A: 1\r\n B", b"\xe9: 1", b"A: \xe9 "):
        assert outcome(parse_header_block, block, 4, "ICAP") == outcome(
            parse_header_lines, block.split(b"\r\n"), 4, "ICAP"), block
    many = b"\r\n".join(b"A: %d" % i for i in range(5))
    assert outcome(parse_header_block, many, 4, "ICAP")[:2] == ("error", 400)
    assert outcome(parse_header_block, many, 5, "ICAP")[0] == "ok"


@given(st.lists(text, min_size=1, max_size=5))
def test_http_heads_match_line_parsers(parts: list[bytes]) -> None:
    raw = b"\r\n".join(parts) + b"\r\n\r\n"
    assert outcome(parse_request_head, raw) == outcome(reference.parse_request_head, raw)
    assert outcome(parse_response_head, raw) == outcome(reference.parse_response_head, raw)


@given(st.sampled_from(["GET", "POST", "CONNECT"]), st.sampled_from(["/p", "http://h/p", "h:443", "*", "[::1"]),
       st.lists(st.sampled_from([b"Host: a", b"Host: b:99999", b"Host: [::1", b"X: \x01", b"Bad Name: 1",
                                 b"X: \xe9", b""]), max_size=3))
def test_request_heads_match_line_parser(method: str, target: str, fields: list[bytes]) -> None:
    raw = b"\r\n".join([f"{method} {target} HTTP/1.1".encode(), *fields]) + b"\r\n\r\n"
    assert outcome(parse_request_head, raw) == outcome(reference.parse_request_head, raw)


ENCAPSULATED_PIECES = ["req-hdr", "res-hdr", "req-body", "res-body", "null-body", "opt-body", "REQ-HDR", "=",
                       "0", "12", "7", "\xb2", "1234567890123", " ", ",", "\t", "x"]


@given(st.lists(st.sampled_from(ENCAPSULATED_PIECES), max_size=12).map("".join),
       st.sampled_from(["REQMOD", "RESPMOD", "OPTIONS"]))
def test_encapsulated_matches_reference(value: str, method: str) -> None:
    assert outcome(parse_encapsulated, value, method) == outcome(reference.parse_encapsulated, value, method)


@pytest.mark.parametrize("value", [
    "req-hdr=0, res-hdr=45, res-body=100", "res-hdr=0, req-hdr=10, res-body=20", "req-hdr=0, req-hdr=5, null-body=9",
    "req-hdr=0,res-body=0", "req-hdr=1, res-body=5", " req-hdr = 0 , null-body = 7 ", "null-body=0",
    f"res-body={limits.MAX_ENCAPSULATED_HEAD_SIZE + 1}", "res-body=\xb2", "res-body=", "=0", "res-body=0,",
])
def test_encapsulated_cases_match_reference(value: str) -> None:
    for method in ("REQMOD", "RESPMOD", "OPTIONS"):
        assert outcome(parse_encapsulated, value, method) == outcome(reference.parse_encapsulated, value, method)


def icap_head(head: bytes) -> tuple[object, ...]:
    """What the connection makes of an ICAP head with no body."""
    conn = ServerConnection()
    conn.receive_data(head + b"\r\n\r\n")
    try:
        event = conn.next_event()
    except ProtocolError as e:
        return ("error", e.status, e.reason)
    if event is NEED_DATA or event is PAUSED:
        return ("waiting",)
    assert isinstance(event, Request)
    return ("ok", event.method, event.uri, event.headers)


def reference_icap_head(head: bytes) -> tuple[object, ...]:
    try:
        method, uri, headers = reference.parse_icap_head(head)
        reference.parse_encapsulated(headers.get("Encapsulated"), method)
    except ProtocolError as e:
        return ("error", e.status, e.reason)
    return ("ok", method, uri, headers)


@given(st.sampled_from([b"OPTIONS", b"REQMOD", b"FOO", b"get", b"OPT\xe9"]),
       st.sampled_from([b"icap://gw/respmod", b"/x", b"icaps://gw/x", b"http://x", b"icap://\x01"]),
       st.sampled_from([b"ICAP/1.0", b"ICAP/2.0", b"HTTP/1.1"]),
       st.lists(st.sampled_from([b"Host: gw", b"Encapsulated: null-body=0", b"Allow: 204", b"X: \x00",
                                 b"Bad Name: 1", b"X: \xe9", b"X\r: 1", b": 1", b" X: 1"]), max_size=4),
       st.sampled_from([b" ", b"  ", b"\t"]))
def test_icap_head_matches_reference(method: bytes, uri: bytes, version: bytes, fields: list[bytes],
                                     space: bytes) -> None:
    head = b"\r\n".join([method + space + uri + b" " + version, *fields])
    if b"\r\n\r\n" in head or head.endswith(b"\r\n"):
        return  # not one head: a different framing
    assert icap_head(head) == reference_icap_head(head)


FIELD_PIECES = ["X-A", "a", " ", "\t", "\r", "\n", "\r\n", "\r\n ", "\r\n\t", "\x00", "\x7f", "\xe9", ":", "\"", ""]
field_text = st.lists(st.sampled_from(FIELD_PIECES), max_size=6).map("".join)


def answer_outcome(build: Callable[[list[tuple[str, str]]], bytes], headers: list[tuple[str, str]]) -> object:
    try:
        return build(headers)
    except LocalProtocolError as e:
        return ("unsafe", str(e))


@given(st.lists(st.tuples(field_text, field_text), min_size=1, max_size=4))
def test_response_fields_match_field_by_field_check(headers: list[tuple[str, str]]) -> None:
    assert answer_outcome(_safe_fields, headers) == answer_outcome(reference.response_fields, headers)


@pytest.mark.parametrize("headers", [
    [("X-Violations-Found", "1\r\n\tfile\r\n\tEICAR\r\n\t0"), ("ISTag", '"a"')],
    [("A", "1\r\n"), ("B", "2")], [("A", "1\r"), ("\nB", "2")], [("A", "1"), (" B", "2")], [("A", "x\r\n \r\n")],
    [("A", "1\r\n\r\n b")], [("", "1")], [("A", "\x00")], [("Bad Name", "1")], [("A", "é")],
])
def test_response_fields_cases(headers: list[tuple[str, str]]) -> None:
    assert answer_outcome(_safe_fields, headers) == answer_outcome(reference.response_fields, headers)


def test_input_after_a_bad_encapsulated_block_does_not_break_the_buffer() -> None:
    """The error is raised while the head's blocks are being cut out: the
    buffer must stay resizable for what the peer still sends."""
    conn = ServerConnection()
    bad = b"GET / HTTP/1.1\r\nHost: a\r\n"  # no empty line at its end
    conn.receive_data(b"REQMOD icap://gw/reqmod ICAP/1.0\r\nHost: gw\r\n"
                      b"Encapsulated: req-hdr=0, null-body=%d\r\n\r\n" % len(bad) + bad)
    with pytest.raises(ProtocolError) as caught:
        conn.next_event()
    assert caught.value.status == 400
    conn.receive_data(b"more bytes from the peer")  # no BufferError
    assert conn.send_error(400).startswith(b"ICAP/1.0 400 Bad Request\r\n")


# --- the chunked body: one pass (ServerConnection._read_whole_chunks) against
# one step per state.  Fed whole, a body takes the one-pass path wherever it
# can; fed a byte at a time, never (no chunk is ever all buffered).

CHUNK_PIECES = [b"0", b"1", b"5", b"a", b"A", b"f", b"10", b"ffffffffffffffff", b"1ffffffffffffffff", b"x", b"-",
                b" ", b"\t", b";", b";ieof", b"; ieof", b"\r\n", b"\r", b"\n", b"\r\n\r\n", b"abcde", b"\x00",
                b"Trailer: x\r\n", b"\xb2", b"+1", b"0x1"]


@st.composite
def chunked_requests(draw: st.DrawFn) -> bytes:
    method, encapsulated, head = draw(st.sampled_from([
        (b"RESPMOD", b"res-hdr=0, res-body=19", b"HTTP/1.1 200 OK\r\n\r\n"),
        (b"REQMOD", b"req-hdr=0, req-body=18", b"POST / HTTP/1.1\r\n\r\n"),
        (b"OPTIONS", b"opt-body=0", b""),
    ]))
    preview = draw(st.sampled_from([b"", b"Preview: 0\r\n", b"Preview: 5\r\n"]))
    body = b"".join(draw(st.lists(st.one_of(
        st.sampled_from(CHUNK_PIECES),
        st.integers(0, 40).map(lambda n: b"%x\r\n%s\r\n" % (n, bytes(range(65, 65 + n)))),
    ), max_size=10)))
    ending = draw(st.sampled_from([b"0\r\n\r\n", b"0; ieof\r\n\r\n", b"0\r\nX: 1\r\n\r\n", b""]))
    request = (method + b" icap://gw/svc ICAP/1.0\r\nHost: gw\r\nAllow: 204\r\n" + preview
               + b"Encapsulated: " + encapsulated + b"\r\n\r\n" + head + body + ending)
    return request * draw(st.integers(1, 2))  # a second request after the first: pipelined


def chunk_events(pieces: list[bytes]) -> tuple[object, ...]:
    out = drive(pieces)
    return (tuple(out.events), out.status)


@given(chunked_requests())
def test_chunked_body_one_pass_matches_step_by_step(data: bytes) -> None:
    assert chunk_events([data]) == chunk_events([data[i : i + 1] for i in range(len(data))])


def test_chunked_body_one_pass_edges() -> None:
    head = b"RESPMOD icap://gw/svc ICAP/1.0\r\nHost: gw\r\nEncapsulated: res-hdr=0, res-body=19\r\n\r\n"
    head += b"HTTP/1.1 200 OK\r\n\r\n"
    for body in (b"3\r\nabc\r\n0\r\n\r\n", b"3\r\nabcX\r\n0\r\n\r\n", b"3;x\r\nabc\r\n0\r\n\r\n",
                 b"ffffffffffffffff\r\nab", b"10000000000000000\r\n", b"3\r\nabc\r\n0\r\nA: b\r\n\r\n",
                 b"3\r\nab", b"\r\n3\r\nabc\r\n0\r\n\r\n", b"3 \r\nabc\r\n0\r\n\r\n", b"0\r\n\r\n"):
        data = head + body
        assert chunk_events([data]) == chunk_events([data[i : i + 1] for i in range(len(data))]), body


def events_answering_early(pieces: list[bytes]) -> list[object]:
    """Events until the connection idles, answering 403 at the first body
    piece, as the gateway does for a body over max_scan_size."""
    conn = ServerConnection()
    seen: list[object] = []
    for piece in pieces:
        conn.receive_data(piece)
        while True:
            event = conn.next_event()
            if event is NEED_DATA or event is PAUSED:
                break
            seen.append(type(event).__name__ if not isinstance(event, Request) else ("Request", event.method))
            if isinstance(event, BodyData) and conn.our_state == "SEND_RESPONSE":
                conn.send_response(403, [])
                seen.append("answered")
    return seen


def test_nothing_of_an_answered_body_comes_out_of_the_one_pass_path() -> None:
    # Found by an attack on the one-pass chunk reader: it queued every
    # buffered chunk, and the body's end, before the caller could answer the
    # first; their events then came after the answer (and after the cycle
    # reset), where the step-per-state path drops them.
    data = (b"RESPMOD icap://x/respmod ICAP/1.0\r\nHost: x\r\nEncapsulated: res-hdr=0, res-body=19\r\n\r\n"
            b"HTTP/1.1 200 OK\r\n\r\n3\r\nabc\r\n3\r\ndef\r\n0\r\n\r\n"
            b"OPTIONS icap://x/respmod ICAP/1.0\r\nEncapsulated: null-body=0\r\n\r\n")
    whole = events_answering_early([data])
    assert whole == [("Request", "RESPMOD"), "BodyData", "answered", ("Request", "OPTIONS"), "EndOfMessage"]
    assert whole == events_answering_early([data[i : i + 1] for i in range(len(data))])


def test_the_one_pass_path_queues_one_chunk_at_a_time() -> None:
    # Input not yet turned into events is what max_pipelined_bytes bounds:
    # a megabyte of one-byte chunks must stay input, not become events.
    head = (b"RESPMOD icap://x/respmod ICAP/1.0\r\nHost: x\r\nEncapsulated: res-hdr=0, res-body=19\r\n\r\n"
            b"HTTP/1.1 200 OK\r\n\r\n")
    conn = ServerConnection()
    conn.receive_data(head + b"1\r\nx\r\n" * 200_000)
    assert isinstance(conn.next_event(), Request)
    assert conn.next_event() is not NEED_DATA
    assert len(conn._events) == 0
    assert conn.buffered_bytes == 6 * (200_000 - 1)
