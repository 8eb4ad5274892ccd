"""Property-based tests (hypothesis) of the sans-IO core and the HTTP layer:
for any input they produce events, NEED_DATA/PAUSED, or a ProtocolError with
an ICAP status to answer; never another exception.

Example counts are modest by default; ``HYPOTHESIS_PROFILE=long`` runs a long
fuzz (see docs/fuzzing.md)."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.icap.connection import METHODS, REASONS, ServerConnection, parse_encapsulated
from gateway.icap.errors import ProtocolError
from gateway.icap.events import (
    NEED_DATA,
    PAUSED,
    BodyData,
    ConnectionClosed,
    EndOfMessage,
    PreviewEnd,
    Request,
)
from gateway.icap.headers import CONTROL_BYTES
from gateway.icap.http import (
    content_disposition_filename,
    message_facts,
    parse_request_head,
    parse_response_head,
)
from tests.icap.messages import REAL_MESSAGES

# Statuses a peer's bytes may earn; anything else (a 500) would be our bug.
PEER_STATUSES = frozenset({400, 404, 405, 408, 413, 501, 505})


@dataclass
class Outcome:
    """What a connection made of the input: events (bodies merged) and how
    it ended (None: waiting or closed cleanly, else the error status)."""

    events: list[object] = field(default_factory=list)
    status: int | None = None


def drive(pieces: list[bytes]) -> Outcome:
    """Feed ``pieces`` then EOF, answering like a server that scans nothing:
    100 Continue after a preview, 204 (or 200) when a request is complete."""
    conn = ServerConnection()
    out = Outcome()
    try:
        for piece in [*pieces, b""]:
            conn.receive_data(piece)
            _drain(conn, out)
    except ProtocolError as e:
        assert e.status in PEER_STATUSES, e
        assert e.reason.isprintable(), e.reason
        out.status = e.status
        answer = conn.send_error(e.status)
        assert answer == b"" or answer.startswith(f"ICAP/1.0 {e.status} {REASONS[e.status]}\r\n".encode())
    return out


def _drain(conn: ServerConnection, out: Outcome) -> None:
    while True:
        event = conn.next_event()
        if event is NEED_DATA:
            return
        if event is PAUSED:
            if conn.their_state == "PREVIEW_WAIT":
                conn.send_continue()
                continue
            if conn.our_state == "SEND_RESPONSE":
                conn.send_response(204 if conn.can_send_204 else 200, [])
                continue
            return  # closed, or waiting for EOF after Connection: close
        assert isinstance(event, Request | BodyData | PreviewEnd | EndOfMessage | ConnectionClosed)
        if isinstance(event, BodyData) and out.events and isinstance(out.events[-1], BodyData):
            out.events[-1] = BodyData(out.events[-1].data + event.data)
        elif isinstance(event, Request):
            out.events.append((event.method, event.uri, list(event.headers), event.req_hdr, event.res_hdr,
                               event.body, event.preview))
            _check_http_layer(event)
        else:
            out.events.append(event)


def _check_http_layer(request: Request) -> None:
    """What the protocol does next with a request's HTTP heads."""
    http_request = http_response = None
    try:
        if request.req_hdr is not None:
            http_request = parse_request_head(request.req_hdr)
        if request.res_hdr is not None:
            http_response = parse_response_head(request.res_hdr)
    except ProtocolError as e:
        assert e.status == 400
        return
    message_facts(http_request, http_response)


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True) if a < b]


# --- mutations of real messages ----------------------------------------------

@st.composite
def mutated_message(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(sorted(REAL_MESSAGES.values()))))
    hostile = st.sampled_from([b"\x00", b"\r", b"\n", b"\r\n", b"\r\n\r\n", b":", b";", b",", b" ", b"\t",
                               b"=", b"0", b"ffffffffffffffff", b"-1", b"[", b"%", b"\"", b"'", b"\xff",
                               b"filename*=", b"ieof", b"\xb2", b"Preview: 99\r\n", b"Encapsulated: req-body=0\r\n"])
    for _ in range(draw(st.integers(1, 4))):
        if not data:
            break
        pos = draw(st.integers(0, len(data)))
        op = draw(st.sampled_from(["insert", "delete", "replace", "duplicate", "truncate"]))
        if op == "insert":
            data[pos:pos] = draw(st.one_of(hostile, st.binary(max_size=8)))
        elif op == "delete":
            del data[pos : pos + draw(st.integers(1, 16))]
        elif op == "replace" and pos < len(data):
            data[pos] = draw(st.integers(0, 255))
        elif op == "duplicate":
            data[pos:pos] = data[pos : pos + draw(st.integers(1, 64))]
        elif op == "truncate":
            del data[pos:]
    return bytes(data)


@given(data=st.binary(max_size=512), cuts=st.lists(st.integers(min_value=0), max_size=6))
def test_any_bytes_give_events_or_a_peer_status(data: bytes, cuts: list[int]) -> None:
    assert drive([data]) == drive(split(data, cuts))


@given(data=mutated_message(), cuts=st.lists(st.integers(min_value=0), max_size=8))
def test_mutated_real_messages_whole_and_split_agree(data: bytes, cuts: list[int]) -> None:
    assert drive([data]) == drive(split(data, cuts))


@given(pipeline=st.lists(st.sampled_from(sorted(REAL_MESSAGES.values())), min_size=1, max_size=4),
       garbage=st.binary(max_size=32), cuts=st.lists(st.integers(min_value=0), max_size=8))
def test_pipelined_real_messages_then_garbage(pipeline: list[bytes], garbage: bytes, cuts: list[int]) -> None:
    data = b"".join(pipeline) + garbage
    assert drive([data]) == drive(split(data, cuts))


@pytest.mark.parametrize("name", sorted(REAL_MESSAGES))
def test_real_messages_parse_cleanly(name: str) -> None:
    data = REAL_MESSAGES[name]
    outcome = drive([data])
    assert outcome.status is None
    assert isinstance(outcome.events[0], tuple) and any(isinstance(e, EndOfMessage) for e in outcome.events)
    assert drive([data[i : i + 1] for i in range(len(data))]) == outcome


# --- the HTTP layer ------------------------------------------------------------

_TEXT = st.text(alphabet=st.characters(codec="latin-1"), max_size=200)
_URLISH = st.one_of(
    st.binary(max_size=80),
    st.builds(lambda scheme, host, rest: scheme + host + rest,
              st.sampled_from([b"http://", b"https://", b"ftp://", b"", b"//"]),
              st.sampled_from([b"[::1", b"[::1]", b"h", b"h:99999", b"h:x", b"[v1.x]", b"\xef\xbc\x8f", b"@:"]),
              st.binary(max_size=20)),
)


def _http_outcome(parse, raw: bytes):  # type: ignore[no-untyped-def]
    try:
        return parse(raw)
    except ProtocolError as e:
        assert e.status == 400, e
        return None


@given(st.binary(max_size=300))
def test_http_heads_from_any_bytes(raw: bytes) -> None:
    for parse in (parse_request_head, parse_response_head):
        _http_outcome(parse, raw)
        _http_outcome(parse, raw + b"\r\n\r\n")


@given(method=st.sampled_from([b"GET", b"CONNECT", b"OPTIONS", b"POST"]), target=_URLISH,
       host=st.one_of(st.none(), _URLISH), disposition=st.one_of(st.none(), _TEXT))
def test_request_heads_with_hostile_urls(method: bytes, target: bytes, host: bytes | None,
                                         disposition: str | None) -> None:
    raw = method + b" " + target + b" HTTP/1.1\r\n"
    if host is not None:
        raw += b"Host: " + host + b"\r\n"
    if disposition is not None:
        raw += b"Content-Disposition: " + disposition.encode("latin-1") + b"\r\n"
    head = _http_outcome(parse_request_head, raw + b"\r\n")
    if head is not None:
        facts = message_facts(head, None)
        assert isinstance(facts.host, str) and isinstance(facts.filename, str)
        sent = target + (host or b"") + (disposition or "").encode("latin-1")
        assert set(CONTROL_BYTES).isdisjoint(sent), "a control character passed the HTTP layer"


@given(_TEXT)
def test_content_disposition_any_text(value: str) -> None:
    name = content_disposition_filename(value)
    assert name is None or isinstance(name, str)
    content_disposition_filename("attachment; " + value)


@given(st.builds(lambda parts: "; ".join(parts),
                 st.lists(st.sampled_from(["attachment", "filename=", "filename*=", "'", '"', "\\", "utf-8''",
                                           "a.exe", "%", "%e2%82", "=", ";", " ", "iso-8859-1'en'"]), max_size=20)))
def test_content_disposition_structured(value: str) -> None:
    name = content_disposition_filename(value)
    assert name is None or isinstance(name, str)


@given(value=st.one_of(st.none(), _TEXT, st.lists(st.sampled_from(
    ["req-hdr=0", "res-hdr=10", "req-body=20", "res-body=30", "null-body=0", "opt-body=5", "x=1", "=", "",
     "res-body=-1", "null-body=999999999999999", "req-hdr=00", "null-body=\xb2", "res-body=\u0663"]),
    max_size=5).map(", ".join)),
       method=st.sampled_from(sorted(METHODS)))
def test_parse_encapsulated_any_value(value: str | None, method: str) -> None:
    try:
        entries = parse_encapsulated(value, method)
    except ProtocolError as e:
        assert e.status == 400
        return
    offsets = [offset for _, offset in entries]
    assert offsets == sorted(set(offsets)) and offsets[0] == 0


# A mutated message must not get further than a well-formed one would; this
# is a smoke check that the fixtures above are not all rejected early.
@settings(max_examples=20, suppress_health_check=[HealthCheck.too_slow])
@given(mutated_message())
def test_mutations_still_reach_the_parser(data: bytes) -> None:
    drive([data])
