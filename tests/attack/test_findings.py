"""Findings of an attack on the hardened gateway (issue 8 done): each test
failed before its fix."""

from __future__ import annotations

import struct
import zlib
from collections.abc import Callable
from dataclasses import replace

import pytest
import zstandard

from gateway.decision import SERVICES
from gateway.interfaces import TransactionRecord
from gateway.scanning.decoding import decode_into
from gateway.scanning.scanner import YaraScanner
from monitoring.metrics import MAX_SERVICE_LABELS, SERVED_SERVICES, GatewayMetrics, metrics_registry
from monitoring.observer import MonitoringObserver
from tests.gateway.fakes import make_harness
from tests.gateway.test_protocol import REQ_HDR, RES_HDR
from tests.scanning.conftest import EICAR, scan

ScannerFactory = Callable[..., YaraScanner]


def raw_deflate(data: bytes) -> bytes:
    c = zlib.compressobj(wbits=-15)
    return c.compress(data) + c.flush()


# --- decoding ---------------------------------------------------------------


@pytest.mark.parametrize("size", [65_541, 65_542, 65_600, 131_100])
def test_raw_deflate_ending_in_pending_output_is_not_truncated(size: int) -> None:
    """A raw deflate stream (Content-Encoding: deflate without the zlib
    wrapper, as some servers send it) has no trailer: when inflate ran out of
    room in a match with all input read, the decoder called the stream
    truncated, and the default policy blocked a valid body as corrupt."""
    data = b"y" * size
    out = bytearray()
    result = decode_into(raw_deflate(data), ["deflate"], out.extend, limit=1 << 30)
    assert (result.error, result.size, bytes(out)) == ("", size, data)


def test_valid_raw_deflate_page_is_clean_not_corrupt(make_scanner: ScannerFactory) -> None:
    verdict = scan(make_scanner(), raw_deflate(b"y" * 65_542), content_encoding="deflate")
    assert (verdict.outcome, verdict.reason) == ("clean", "")


def _skippable_frame(payload: bytes = b"pad!") -> bytes:
    return struct.pack("<II", 0x184D2A50, len(payload)) + payload


def _hidden_eicar_frame() -> bytes:
    # EICAR preceded by its own halves: the compressor encodes the whole
    # string as back-references, so it never appears literally in the frame.
    payload = EICAR[:34] + b"|" + EICAR[34:] + b"|" + EICAR
    frame = zstandard.ZstdCompressor(level=19).compress(payload)
    assert EICAR not in frame
    return frame


def test_zstd_frame_after_a_skippable_frame_is_decoded(make_scanner: ScannerFactory) -> None:
    """zstd frame + skippable frame + zstd frame: libzstd (browsers, curl)
    skips the skippable frame and decodes the next one.  The decoder took the
    skippable frame for trailing data and passed the rest through still
    compressed: EICAR went out as "unscannable; trailing-data", passed by
    default."""
    body = zstandard.ZstdCompressor().compress(b"hello ") + _skippable_frame() + _hidden_eicar_frame()
    out = bytearray()
    result = decode_into(body, ["zstd"], out.extend, limit=1 << 20)
    assert (result.error, result.trailing) == ("", 0)
    assert EICAR in out
    verdict = scan(make_scanner(), body, content_encoding="zstd")
    assert verdict.outcome == "blocked"


# --- connection resources -----------------------------------------------------


def _respmod_head(*extra: str) -> bytes:
    enc = f"req-hdr=0, res-hdr={len(REQ_HDR)}, res-body={len(REQ_HDR) + len(RES_HDR)}"
    lines = ["RESPMOD icap://gw/respmod ICAP/1.0", "Host: gw", *extra, f"Encapsulated: {enc}"]
    return "\r\n".join(lines).encode() + b"\r\n\r\n" + REQ_HDR + RES_HDR


def test_unauthenticated_peer_cannot_hold_a_connection_by_draining() -> None:
    """After an early answer (401/403, 404/405, 503, an early 204) the rest
    of the body was read and dropped under the min_body_rate check only: a
    peer sending 8 KiB every 30 s held the connection for ever.  The drain
    now has one read_timeout deadline."""
    h = make_harness()
    h.send(_respmod_head())  # no Authorization: answered 401 at once
    assert h.output().startswith(b"ICAP/1.0 401 ")
    chunk = b"2000\r\n" + b"a" * 0x2000 + b"\r\n"  # 8 KiB, above min_body_rate * read_timeout
    for _ in range(40):  # 20 minutes: past every timeout the gateway has, idle_timeout included
        if h.transport.disconnecting:
            break
        h.send(chunk)
        h.clock.advance(30)
    assert h.transport.disconnecting


def test_options_body_is_bounded() -> None:
    """OPTIONS is answered at the end of its body, to anyone: an endless
    opt-body sent at the minimum body rate kept the connection for ever
    without a single answer.  Past limits.MAX_OPTIONS_BODY it is a 400."""
    h = make_harness()
    h.send(b"OPTIONS icap://gw/respmod ICAP/1.0\r\nHost: gw\r\nEncapsulated: opt-body=0\r\n\r\n")
    chunk = b"2000\r\n" + b"a" * 0x2000 + b"\r\n"
    for _ in range(40):
        if h.transport.disconnecting:
            break
        h.send(chunk)
        h.clock.advance(30)
    assert h.output().startswith(b"ICAP/1.0 400 ")
    assert h.transport.disconnecting


def test_small_options_body_is_still_answered() -> None:
    h = make_harness()
    h.send(b"OPTIONS icap://gw/respmod ICAP/1.0\r\nHost: gw\r\nEncapsulated: opt-body=0\r\n\r\n"
           b"5\r\nhello\r\n0\r\n\r\n")
    assert h.output().startswith(b"ICAP/1.0 200 ")
    assert not h.transport.disconnecting


def test_body_past_max_scan_size_is_not_spooled_under_block_policy() -> None:
    """Past max_scan_size under a block policy every further byte was still
    spooled (to disk past memory_threshold, with no cap) before the verdict
    "too-large": one upload could fill the spool directory.  It is blocked
    as soon as the size is crossed, and the rest is read and dropped."""
    h = make_harness(max_scan_size=10_000, oversize_policy="block")
    h.send(_respmod_head("Authorization: Bearer good-key", "Allow: 204"))
    chunk = b"1000\r\n" + b"a" * 0x1000 + b"\r\n"
    for _ in range(100):  # 400 KiB, 40 times max_scan_size
        h.send(chunk)
    assert h.spools[0].size <= 10_000 + 0x1000
    out = h.output()
    assert out.startswith(b"ICAP/1.0 200 ") and b"403" in out.split(b"\r\n\r\n", 2)[1]  # the block page


def test_long_preview_is_continued_not_an_internal_error() -> None:
    """A client Preview longer than early_response_after made the gateway
    send its early 200 head inside the preview; at the preview's end the
    100 Continue could not be sent: an internal error per request, at will."""
    h = make_harness()
    h.send(_respmod_head("Authorization: Bearer good-key", "Preview: 70000"))
    preview = b"a" * 70_000
    h.send(b"%x\r\n%s\r\n0\r\n\r\n" % (len(preview), preview))
    assert b"ICAP/1.0 100 Continue\r\n" in h.output()
    h.send(b"5\r\nhello\r\n0\r\n\r\n")
    assert [r.detail for r in h.observer.records if "internal-error" in r.detail] == []


# --- metrics -------------------------------------------------------------------


def test_made_up_services_cannot_push_the_real_ones_into_other() -> None:
    """The service label is the ICAP URI's path, capped at 16 values per
    process.  16 OPTIONS to made-up services (no key needed) used the cap up,
    and from then on every reqmod and respmod request was counted as
    service="other": dashboards and alerts on the real services went blind."""
    registry = metrics_registry(None)
    observer = MonitoringObserver(GatewayMetrics(registry), None, clock=lambda: 0.0)
    base = TransactionRecord(started=0.0, duration=0.001, method="OPTIONS", service="", icap_status=404,
                             client_ip="10.0.0.1", peer="10.0.0.1", tenant="", outcome="error")
    for i in range(MAX_SERVICE_LABELS + 4):
        observer.transaction_finished(replace(base, service=f"junk{i}"))
    for service in SERVICES:
        observer.transaction_finished(replace(base, method=SERVICES[service], service=service,
                                              icap_status=204, tenant="acme", outcome="clean"))
    for service, method in SERVICES.items():
        labels = {"method": method, "service": service, "tenant": "acme", "outcome": "clean"}
        assert registry.get_sample_value("icap_gateway_requests_total", labels) == 1
    assert set(SERVED_SERVICES) == set(SERVICES)
