"""Every connection state has a deadline, every buffer a bound (issue 8, item 4).

StringTransport and a Clock: no sleeping, no sockets."""

from __future__ import annotations

from pathlib import Path

import pytest
from twisted.internet.testing import StringTransport

from gateway.connections import SharedConnectionCount, clear_slot, count_from_environment, create_slots
from gateway.protocol import ICAPServerProtocol
from gateway.scanning.spool import BodySpool, MemoryBudget
from tests.gateway.fakes import BufferingTransport, Harness, make_harness
from tests.gateway.test_protocol import AUTH, chunked, options, respmod
from tests.icap_responses import parse_responses

# --- finding 1: deadlines that progress does not extend ----------------------


def test_head_dripped_a_byte_a_second_is_cut_at_head_timeout() -> None:
    h = make_harness(head_timeout=30.0, read_timeout=30.0)
    data = respmod(chunked(b"hello"), AUTH)
    for i in range(29):  # 29 bytes in 29 seconds: the head is far from complete
        h.send(data[i : i + 1])
        h.clock.advance(1.0)
    assert not h.transport.disconnecting
    h.send(data[29:30])
    h.clock.advance(1.0)  # 30 s after the first byte, progress or not
    [r] = parse_responses(h.output())
    assert r.status == 408
    assert h.transport.disconnecting
    assert h.observer.dropped == ["head-timeout"]


def test_each_pipelined_request_head_gets_its_own_deadline() -> None:
    h = make_harness(head_timeout=30.0)
    first, second = options(), options("reqmod")
    h.send(first[:10])
    h.clock.advance(25)
    h.send(first[10:] + second[:10])  # the first completes, the second begins at t=25
    assert [r.status for r in parse_responses(h.output())] == [200]
    h.clock.advance(10)  # t=35: past the first head's deadline, not the second's
    assert not h.transport.disconnecting
    h.clock.advance(21)  # t=56: 31 s into the second head
    assert [r.status for r in parse_responses(h.output())] == [408]


def test_body_dripped_a_byte_a_second_is_cut_after_one_window() -> None:
    h = make_harness(read_timeout=30.0, min_body_rate=256)
    data = respmod(chunked(b"x" * 10_000, 1000), AUTH)
    head_end = data.index(b"\r\n\r\n", data.index(b"Content-Length")) + 4
    h.send(data[:head_end])  # the whole head at once: the body phase begins
    for i in range(head_end, head_end + 30):
        h.send(data[i : i + 1])
        h.clock.advance(1.0)
    [r] = parse_responses(h.output())
    assert r.status == 408
    assert h.transport.disconnecting
    assert h.observer.dropped == ["read-timeout"]
    assert h.observer.records[-1].detail == "read-timeout"


def test_honest_slow_upload_runs_as_long_as_it_moves() -> None:
    # 1 KiB a second for 10 minutes: longer than any whole-body deadline
    # would allow, but well above min_body_rate, so never cut.
    h = make_harness(read_timeout=30.0, min_body_rate=256)
    body = bytes(range(256)) * 4 * 600
    data = respmod(chunked(body, 1024), AUTH, "Allow: 204")
    h.send(data[:2048])
    for offset in range(2048, len(data), 1024):
        h.clock.advance(1.0)
        h.send(data[offset : offset + 1024])
    [r] = parse_responses(h.output())
    assert r.status == 204
    assert not h.transport.disconnecting
    assert h.observer.dropped == []


def test_idle_keep_alive_still_gets_idle_timeout() -> None:
    h = make_harness(head_timeout=5.0, idle_timeout=60.0)
    h.send(options())
    h.output()
    h.clock.advance(59)
    assert not h.transport.disconnecting
    h.clock.advance(2)
    assert h.transport.disconnecting and h.transport.value() == b""


# --- finding 2: a peer that stops reading ------------------------------------


def _echo_harness(body: bytes, **overrides: object) -> tuple[Harness, BufferingTransport]:
    transport = BufferingTransport(high_water=64 * 1024)
    h = make_harness(transport=transport, early_response_after=0, **overrides)
    h.send(respmod(chunked(body, 64 * 1024), AUTH))  # no Allow: 204: the body is echoed
    return h, transport


def test_peer_that_stops_reading_an_echo_is_aborted_and_its_spool_freed() -> None:
    h, transport = _echo_harness(b"z" * (2 * 1024 * 1024), write_timeout=30.0)
    assert 0 < transport.unsent < 256 * 1024  # the echo stopped at the high-water mark
    h.clock.advance(29)
    assert not transport.disconnecting
    h.clock.advance(2)
    assert transport.disconnected  # aborted, not a graceful close waiting for the peer
    assert h.spools[0].closed
    assert h.observer.dropped == ["write-timeout"]


def test_echo_to_a_slow_reader_completes_while_it_reads() -> None:
    body = bytes(range(256)) * 4096  # 1 MiB
    h, transport = _echo_harness(body, write_timeout=30.0)
    out = b""
    while True:
        h.clock.advance(20)  # slower than one block a write_timeout would abort
        chunk = transport.drain()
        if not chunk:
            break
        out += chunk
    [r] = parse_responses(out)
    assert r.status == 200 and r.body == body
    assert not transport.disconnecting and h.observer.dropped == []
    assert h.spools[0].closed


# --- finding 3: pipelined requests whose answers are never read --------------


def test_pipelining_peer_that_never_reads_is_paused_not_buffered() -> None:
    transport = BufferingTransport(high_water=4096)
    h = make_harness(transport=transport)
    h.send(options() * 2000)  # about 150 KB of requests in one read, about 600 KB of answers
    assert transport.unsent < 4096 + 1024  # stopped at the high-water mark (+ one answer)
    assert transport.producerState == "paused"  # and stopped reading
    answered = 0
    while chunk := transport.drain():  # the peer reads at last: everything is answered
        answered += len(parse_responses(chunk))
    assert answered == 2000
    assert transport.producerState == "producing"


def test_input_past_max_pipelined_bytes_while_paused_is_cut_off() -> None:
    h = make_harness(max_pipelined_bytes=64 * 1024)
    h.scanner.hold = True
    h.send(respmod(chunked(b"one"), AUTH, "Allow: 204"))
    h.send(options() * 100)  # waits: reading pauses
    assert not h.transport.disconnecting
    h.send(options() * 1000)  # a transport that goes on delivering regardless
    assert h.transport.disconnected
    assert h.observer.dropped == ["pipelined-overflow"]
    assert h.spools[0].closed


def test_output_close_waits_for_a_paused_producer_to_be_unregistered() -> None:
    # loseConnection with a registered producer closes only once it is
    # unregistered: a protocol-error close while paused must still close.
    transport = BufferingTransport(high_water=100)
    h = make_harness(transport=transport)
    h.send(options() + b"nonsense\r\n\r\n")
    assert transport.producer is h.proto
    transport.drain()
    h.proto.resumeProducing()
    assert transport.disconnecting and transport.producer is None


# --- finding 5: Max-Connections for the gateway, idle connections make room -


def _connect(h: Harness) -> tuple[ICAPServerProtocol, StringTransport]:
    proto = ICAPServerProtocol(h.proto.ctx)
    transport = StringTransport()
    proto.makeConnection(transport)
    return proto, transport


def test_new_client_at_the_limit_closes_the_longest_idle_connection() -> None:
    h = make_harness(max_connections=2)
    h.send(options())
    h.output()  # h is idle since t=0
    h.clock.advance(10)
    _second, second_t = _connect(h)  # idle since t=10
    third, third_t = _connect(h)
    assert h.transport.disconnecting and not second_t.disconnecting
    third.dataReceived(options())
    assert parse_responses(third_t.value())[0].status == 200
    assert h.observer.dropped == ["evicted-idle"]
    h.proto.connectionLost(None)  # the evicted connection's close is not counted twice
    assert h.proto.ctx.connections == 2


def test_no_idle_connection_to_close_means_503() -> None:
    h = make_harness(max_connections=1)
    h.send(respmod(b"5\r\nhel", AUTH))  # mid-request: not idle
    second, t = _connect(h)
    second.dataReceived(options())
    assert parse_responses(t.value())[0].status == 503
    assert t.disconnecting and not h.transport.disconnecting


def test_connections_of_other_workers_count(tmp_path: Path) -> None:
    slots = tmp_path / "connections.slots"
    create_slots(slots, 2)
    other_worker = SharedConnectionCount(slots, 1)
    other_worker.publish(5)  # the other worker holds 5 (busy) connections
    h = make_harness(max_connections=6, connection_count=SharedConnectionCount(slots, 0))
    h.send(respmod(b"5\r\nhel", AUTH))  # ours: 1 busy, 6 in all
    assert other_worker.total(5) == 6
    second, t = _connect(h)  # the 7th for the gateway
    second.dataReceived(options())
    assert parse_responses(t.value())[0].status == 503
    clear_slot(slots, 1)  # the other worker died: its connections are gone
    third, t3 = _connect(h)
    third.dataReceived(options())
    assert parse_responses(t3.value())[0].status == 200


def test_shared_count_from_environment(tmp_path: Path) -> None:
    slots = tmp_path / "c.slots"
    create_slots(slots, 3)
    count = count_from_environment({"ICAP_GATEWAY_CONNECTION_SLOTS": f"{slots}:2"})
    count.publish(7)
    assert SharedConnectionCount(slots, 0).total(1) == 8
    assert count_from_environment({}).total(4) == 4
    with pytest.raises(ValueError):
        SharedConnectionCount(slots, 3)


# --- finding 4: body memory per worker ---------------------------------------


def test_body_memory_budget_sends_bodies_to_disk_earlier(tmp_path: Path) -> None:
    budget = MemoryBudget(1000)
    first = BodySpool(600, tmp_path, budget=budget)
    second = BodySpool(600, tmp_path, budget=budget)
    third = BodySpool(600, tmp_path, budget=budget)
    first.write(b"a" * 500)
    second.write(b"b" * 400)
    assert first.in_memory and second.in_memory and budget.used == 900
    third.write(b"c" * 200)  # under its own threshold, over the worker's budget
    assert not third.in_memory and budget.used == 900
    second.write(b"b" * 300)  # grows past its threshold: its memory goes back
    assert not second.in_memory and budget.used == 500
    assert second.size == 700 and b"".join(second.iter_chunks()) == b"b" * 700
    first.close()
    assert budget.used == 0
    fourth = BodySpool(600, tmp_path, budget=budget)
    fourth.write(b"d" * 600)
    assert fourth.in_memory and fourth.scan_target() == b"d" * 600
    for spool in (second, third, fourth):
        spool.close()
    assert budget.used == 0


def test_four_hundred_parallel_uploads_stay_within_the_budget(tmp_path: Path) -> None:
    budget = MemoryBudget(64 * 1024**2)
    spools = [BodySpool(1024**2, tmp_path, budget=budget) for _ in range(400)]
    for _ in range(16):
        for spool in spools:
            spool.write(b"u" * 64 * 1024)  # 400 bodies of 1 MiB arriving together
    assert budget.used <= budget.limit
    assert sum(s.in_memory for s in spools) == 64
    for spool in spools:
        spool.close()
    assert budget.used == 0


class _FakeReactor:
    def __init__(self) -> None:
        self.spawned: list[dict[str, str]] = []

    def spawnProcess(self, proto: object, exe: str, argv: list[str], env: dict[str, str],
                     childFDs: dict[int, object]) -> None:
        self.spawned.append(env)

    def callLater(self, delay: float, f: object, *args: object) -> None:
        pass

    def seconds(self) -> float:
        return 0.0


def test_supervisor_gives_each_worker_a_slot_and_clears_a_dead_ones(tmp_path: Path) -> None:
    from twisted.python.failure import Failure

    from gateway.workers import Supervisor

    slots = tmp_path / "connections.slots"
    create_slots(slots, 2)
    reactor = _FakeReactor()
    supervisor = Supervisor(reactor, 2, ["python"], [], {"A": "1"}, connection_slots=slots)
    supervisor.startService()
    assert [env["ICAP_GATEWAY_CONNECTION_SLOTS"] for env in reactor.spawned] == [f"{slots}:0", f"{slots}:1"]
    SharedConnectionCount(slots, 1).publish(40)  # worker 1 holds 40 connections, then dies
    supervisor._worker_ended(supervisor.workers[1], Failure(RuntimeError("killed")))
    assert SharedConnectionCount(slots, 0).total(0) == 0
