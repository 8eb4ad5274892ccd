"""Late-block memory: a transfer cut after our early commit (Squid bug 5352)
is remembered, and the next request for its URL gets the block page at its
head.  The protocol over StringTransport, time on a Clock."""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from gateway.interfaces import Verdict
from gateway.lateblock import LateBlockMemory
from gateway.protocol import ICAPServerProtocol
from tests.gateway.fakes import GOOD_KEY, Harness, RecordingObserver, make_harness
from tests.gateway.test_protocol import AUTH, REQ_HDR, RES_HDR, chunked, respmod
from tests.icap_responses import parse_responses

TTL = 600.0
INFECTED = b"x" * (100 * 1024) + b"EVIL"  # past early_response_after: the head goes out first


class LateBlockObserver(RecordingObserver):
    def __init__(self) -> None:
        super().__init__()
        self.late_blocks: list[str] = []

    def late_block(self, event: str) -> None:
        self.late_blocks.append(event)


def harness(entries: int = 100) -> tuple[Harness, LateBlockObserver]:
    observer = LateBlockObserver()
    h = make_harness(early_response_after=60 * 1024, observer=observer)
    h.proto.ctx.late_blocks = LateBlockMemory(ttl=TTL, max_entries=entries, clock=h.clock.seconds,
                                              count=observer.late_block)
    return h, observer


def another_connection(h: Harness) -> Harness:
    """A new connection to the same worker (the same context and memory)."""
    proto = ICAPServerProtocol(h.proto.ctx)
    transport = StringTransport()
    proto.makeConnection(transport)
    return Harness(proto, transport, h.clock, h.scanner, h.recorder, h.observer, h.spools)


def cut_download(h: Harness, body: bytes = INFECTED) -> None:
    h.send(respmod(chunked(body, 16 * 1024), AUTH))
    out = h.output()
    assert out.startswith(b"ICAP/1.0 200 OK\r\n") and h.transport.disconnecting  # cut
    assert b"EVIL" not in out


def reqmod_get(url: bytes = b"http://example.com/dl/file.txt") -> bytes:
    req = b"GET " + url + b" HTTP/1.1\r\nHost: example.com\r\nAccept-Language: fi\r\n\r\n"
    head = (f"REQMOD icap://gw/reqmod ICAP/1.0\r\nHost: gw\r\n{AUTH}\r\n"
            f"Encapsulated: req-hdr=0, null-body={len(req)}\r\n\r\n")
    return head.encode() + req


def test_the_next_respmod_gets_the_block_page_at_its_head() -> None:
    h, observer = harness()
    cut_download(h)
    assert observer.late_blocks == ["remembered"]
    scans = len(h.scanner.contexts)
    again = another_connection(h)
    # Only the head and the start of the body: the answer does not wait for the rest.
    data = respmod(chunked(INFECTED, 16 * 1024), AUTH)
    again.send(data[:len(data) // 2])
    [r] = parse_responses(again.output())
    assert r.status == 200
    assert r.sections["res-hdr"].startswith(b"HTTP/1.1 403 Forbidden\r\n")
    assert b"test.evil" in r.body and b"http://example.com/dl/file.txt" in r.body
    assert r.headers["x-infection-found"] == "Type=0; Resolution=2; Threat=test.evil;"
    assert len(h.scanner.contexts) == scans  # not scanned again
    record = observer.records[-1]
    assert (record.outcome, record.rules, record.http_status) == ("blocked", ("test.evil",), 403)
    assert record.detail.startswith("ref=") and "late-block" in record.detail
    assert observer.late_blocks == ["remembered", "respmod-blocked"]
    # The rest of the body is read and dropped; the connection stays usable.
    again.send(data[len(data) // 2:])
    assert again.output() == b""
    assert not again.transport.disconnecting
    again.send(respmod(chunked(b"hello"), AUTH, "Allow: 204").replace(b"file.txt", b"evil.txt"))
    [r] = parse_responses(again.output())
    assert r.status == 204


def test_a_reqmod_for_it_is_refused_before_the_origin() -> None:
    h, observer = harness()
    cut_download(h)
    again = another_connection(h)
    again.send(reqmod_get())
    [r] = parse_responses(again.output())
    assert r.sections["res-hdr"].startswith(b"HTTP/1.1 403 Forbidden\r\n")
    assert b"Content-Language: fi\r\n" in r.sections["res-hdr"]  # the person's language here too
    assert "Sisältö estettiin" in r.body.decode()
    assert observer.late_blocks == ["remembered", "reqmod-refused"]
    # Another URL goes on as usual.
    again.send(reqmod_get(b"http://example.com/dl/evil.txt"))
    [r] = parse_responses(again.output())
    assert r.status == 200 and r.sections["req-hdr"].startswith(b"GET http://example.com/dl/evil.txt")


def test_only_the_same_tenant_is_refused() -> None:
    h, _observer = harness()
    memory = h.proto.ctx.late_blocks
    assert memory is not None
    memory.remember(999, "http://example.com/dl/file.txt", Verdict("blocked", rules=("test.evil",)))
    h.send(respmod(chunked(b"hello"), AUTH, "Allow: 204"))
    [r] = parse_responses(h.output())
    assert r.status == 204  # acme (tenant 1) never had it cut


def test_the_memory_expires_after_its_ttl() -> None:
    h, observer = harness()
    cut_download(h)
    h.clock.advance(TTL - 1)
    again = another_connection(h)
    again.send(reqmod_get())
    assert parse_responses(again.output())[0].sections["res-hdr"].startswith(b"HTTP/1.1 403")
    h.clock.advance(1)
    again.send(reqmod_get())
    [r] = parse_responses(again.output())
    assert r.status == 200 and "res-hdr" not in r.sections  # passed on to the origin
    assert observer.late_blocks == ["remembered", "reqmod-refused", "expired"]


def test_the_memory_is_bounded_least_recently_used_out() -> None:
    clock = Clock()
    events: list[str] = []
    memory = LateBlockMemory(ttl=TTL, max_entries=2, clock=clock.seconds, count=events.append)
    bad = Verdict("blocked", rules=("r",))
    memory.remember(1, "http://a/", bad)
    memory.remember(1, "http://b/", bad)
    assert memory.recall(1, "http://a/") == bad  # a is now the most recently used
    memory.remember(1, "http://c/", bad)  # b goes
    assert len(memory) == 2
    assert memory.recall(1, "http://b/") is None
    assert memory.recall(1, "http://a/") == bad and memory.recall(1, "http://c/") == bad
    assert events == ["remembered", "remembered", "remembered", "evicted"]
    # An entry's size does not depend on the URL's.
    memory.remember(1, "http://d/" + "x" * 1_000_000, bad)
    assert all(len(key[1]) == 32 for key in memory._entries)


def test_the_bound_through_the_protocol() -> None:
    h, observer = harness(entries=1)
    cut_download(h)
    other = another_connection(h)
    cut_download_of = respmod(chunked(INFECTED, 16 * 1024), AUTH).replace(b"file.txt", b"evil.txt")
    other.send(cut_download_of)
    assert other.transport.disconnecting
    assert observer.late_blocks == ["remembered", "remembered", "evicted"]
    third = another_connection(h)
    third.send(reqmod_get())  # the first URL was pushed out
    [r] = parse_responses(third.output())
    assert "res-hdr" not in r.sections
    third.send(reqmod_get(b"http://example.com/dl/evil.txt"))
    [r] = parse_responses(third.output())
    assert r.sections["res-hdr"].startswith(b"HTTP/1.1 403")


def test_off_when_no_memory() -> None:
    h = make_harness(early_response_after=60 * 1024)
    cut_download(h)
    again = another_connection(h)
    again.send(reqmod_get())
    assert "res-hdr" not in parse_responses(again.output())[0].sections


def test_a_clean_url_is_never_remembered() -> None:
    h, observer = harness()
    h.send(respmod(chunked(b"x" * (100 * 1024)), AUTH))
    h.pump_producer()
    assert not h.transport.disconnecting
    assert observer.late_blocks == []
    assert GOOD_KEY  # the harness's key authenticated these
    assert REQ_HDR and RES_HDR


def test_the_page_answers_a_preview_without_asking_for_the_rest() -> None:
    h, _observer = harness()
    cut_download(h)
    again = another_connection(h)
    preview = INFECTED[:4096]
    again.send(respmod(chunked(preview, 4096)[:-len(b"0\r\n\r\n")] + b"0\r\n\r\n", AUTH, "Preview: 4096",
                       "Allow: 204"))
    out = again.output()
    assert b"100 Continue" not in out
    [r] = parse_responses(out)
    assert r.sections["res-hdr"].startswith(b"HTTP/1.1 403 Forbidden\r\n")
    assert not again.transport.disconnecting
    again.send(respmod(chunked(b"hello"), AUTH, "Allow: 204").replace(b"file.txt", b"evil.txt"))
    assert parse_responses(again.output())[0].status == 204  # the connection goes on


def test_new_rules_forget_what_the_old_ones_cut() -> None:
    h, _observer = harness()
    h.scanner.result = Verdict("blocked", rules=("test.evil",), ruleset_version="test1")
    cut_download(h)
    again = another_connection(h)
    again.send(reqmod_get())
    assert parse_responses(again.output())[0].sections["res-hdr"].startswith(b"HTTP/1.1 403")
    h.scanner.version = "test2"  # a reload: the rule may be the false positive just fixed
    again.send(reqmod_get())
    assert "res-hdr" not in parse_responses(again.output())[0].sections


def test_a_tenant_switched_to_monitor_mode_is_not_refused_by_an_older_entry() -> None:
    from dataclasses import replace

    from gateway import decision

    h, observer = harness()
    cut_download(h)
    assert observer.late_blocks == ["remembered"]
    # The tenant goes to monitor mode (a SIGHUP-reloaded [tenants.NAME]) while
    # its entry is still fresh: monitor never blocks, remembered or not.
    ctx = h.proto.ctx
    monitored = replace(ctx.tenant_policy("acme"), decision=decision.Policy(mode="monitor"))
    ctx.policy_for = lambda tenant: monitored
    again = another_connection(h)
    again.send(reqmod_get())
    [r] = parse_responses(again.output())
    assert r.status in (200, 204) and b"403 Forbidden" not in again.transport.value()
    assert observer.late_blocks == ["remembered"]
