"""Unscannable bodies through the protocol: X-Scan-Status, the block answer,
the access-log field, with the real YaraScanner over the bundled rules (a
synchronous pool) and with the stand-in scanner's older verdict spellings."""

from __future__ import annotations

import dataclasses
import gzip
from pathlib import Path
from typing import Any

import pytest

from gateway.config import ScanSettings
from gateway.interfaces import UNSCANNABLE_REASONS, Verdict
from gateway.scanning.rules import RulesManager
from gateway.scanning.scanner import YaraScanner
from tests.gateway.fakes import GOOD_KEY, Harness, make_harness
from tests.icap_responses import ParsedResponse, parse_responses
from tests.scanning.conftest import BUNDLED_RULES, EICAR, SyncPool, SyncReactor

AUTH = f"Authorization: Bearer {GOOD_KEY}"
PAGE = b"<html><body>" + b"<p>nothing to see here</p>" * 200 + b"</body></html>"
# The bypass: 10 MiB of zeros then EICAR, about 10 KiB on the wire;
# decoding stops at the default ratio (1000x) long before EICAR.
BOMB = gzip.compress(bytes(10 * 1024**2) + EICAR, 9)


def chunked(body: bytes, size: int = 4096) -> bytes:
    out = b"".join(b"%x\r\n%s\r\n" % (len(body[i : i + size]), body[i : i + size])
                   for i in range(0, len(body), size))
    return out + b"0\r\n\r\n"


def respmod(body: bytes, encoding: str, *extra: str) -> bytes:
    req_hdr = b"GET http://example.com/dl/page.html HTTP/1.1\r\nHost: example.com\r\n\r\n"
    res_hdr = (b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Encoding: %s\r\n"
               b"Content-Length: %d\r\n\r\n" % (encoding.encode(), len(body)))
    enc = f"req-hdr=0, res-hdr={len(req_hdr)}, res-body={len(req_hdr) + len(res_hdr)}"
    head = "\r\n".join(["RESPMOD icap://gw/respmod ICAP/1.0", "Host: gw", AUTH, *extra, f"Encapsulated: {enc}"])
    return head.encode() + b"\r\n\r\n" + req_hdr + res_hdr + chunked(body)


def yara_harness(tmp_path: Path, **settings: Any) -> Harness:
    reactor, pool = SyncReactor(), SyncPool()
    manager = RulesManager(BUNDLED_RULES, reactor, pool, interval=0)  # type: ignore[arg-type]
    manager.load_now()
    config = dataclasses.replace(ScanSettings(), **settings)
    scanner = YaraScanner(manager, reactor, pool, config, tmp_path)  # type: ignore[arg-type]
    return make_harness(scanner=scanner)


def is_block_page(r: ParsedResponse) -> bool:
    return r.status == 200 and r.sections["res-hdr"].startswith(b"HTTP/1.1 403")


def test_gzip_bomb_is_blocked_by_default_with_its_explanation(tmp_path: Path) -> None:
    # Passed as "unscanned; decode-limit" before.
    h = yara_harness(tmp_path)
    h.send(respmod(BOMB, "gzip", "Allow: 204"))
    [r] = parse_responses(h.output())
    assert is_block_page(r)
    assert r.body is not None and UNSCANNABLE_REASONS["bomb"].encode() in r.body
    assert "x-infection-found" not in r.headers  # no rule matched: not an infection
    [record] = h.observer.records
    assert (record.outcome, record.unscannable, record.http_status) == ("unscanned", "bomb", 403)


@pytest.mark.parametrize("allow_204", [True, False])
def test_gzip_bomb_passes_marked_when_the_policy_says_pass(tmp_path: Path, allow_204: bool) -> None:
    h = yara_harness(tmp_path, unscannable_policy={"bomb": "pass"})
    h.send(respmod(BOMB, "gzip", *(["Allow: 204"] if allow_204 else [])))
    h.pump_producer()
    [r] = parse_responses(h.output())
    assert r.status == (204 if allow_204 else 200)
    assert r.headers["x-scan-status"] == "unscanned; reason=bomb"
    if not allow_204:
        assert r.body == BOMB  # echoed unchanged
    [record] = h.observer.records
    assert (record.outcome, record.unscannable) == ("unscanned", "bomb")


def test_eicar_after_the_gzip_stream_is_blocked_as_an_infection(tmp_path: Path) -> None:
    h = yara_harness(tmp_path)
    h.send(respmod(gzip.compress(PAGE) + EICAR, "gzip", "Allow: 204"))
    [r] = parse_responses(h.output())
    assert is_block_page(r)
    assert "EICAR_Test_File" in r.headers["x-infection-found"]
    [record] = h.observer.records
    assert (record.outcome, record.unscannable) == ("blocked", "trailing-data")


def test_trailing_bytes_without_a_match_pass_marked(tmp_path: Path) -> None:
    h = yara_harness(tmp_path)
    h.send(respmod(gzip.compress(PAGE) + b"\n", "gzip", "Allow: 204"))
    [r] = parse_responses(h.output())
    assert (r.status, r.headers["x-scan-status"]) == (204, "unscanned; reason=trailing-data")


def test_corrupt_encoding_is_blocked_by_default(tmp_path: Path) -> None:
    # A browser cannot decode it, but "clean" was a pass for what lies past the damage.
    h = yara_harness(tmp_path)
    h.send(respmod(gzip.compress(PAGE)[:-30], "gzip", "Allow: 204"))
    [r] = parse_responses(h.output())
    assert is_block_page(r)
    assert r.body is not None and b"compression is corrupt" in r.body
    assert h.observer.records[-1].unscannable == "corrupt-encoding"


def test_a_clean_body_has_no_scan_status(tmp_path: Path) -> None:
    h = yara_harness(tmp_path)
    h.send(respmod(gzip.compress(PAGE), "gzip", "Allow: 204"))
    [r] = parse_responses(h.output())
    assert r.status == 204 and "x-scan-status" not in r.headers
    assert h.observer.records[-1].unscannable == ""


@pytest.mark.parametrize(
    ("verdict", "policy_kw", "status", "reason"),
    [
        (Verdict("error", detail="internal scanner error"), {"error_policy": "fail-open"}, 204, "engine-error"),
        (Verdict("error", detail="internal scanner error"), {"error_policy": "fail-closed"}, 403, "engine-error"),
        (Verdict("unscanned", detail="too-large"), {"oversize_policy": "pass"}, 204, "too-large"),
        (Verdict("unscannable", reason="scan-timeout", action="pass"), {}, 204, "scan-timeout"),
        (Verdict("unscannable", reason="scan-timeout", action="block"), {}, 403, "scan-timeout"),
    ],
)
def test_each_verdict_spelling_gives_a_status_and_a_field(
    verdict: Verdict, policy_kw: dict[str, str], status: int, reason: str
) -> None:
    # A fail-open error had no X-Scan-Status before: the proxy could not tell it from clean.
    h = make_harness(**policy_kw)
    h.scanner.result = verdict
    h.send(respmod(b"data", "identity", "Allow: 204"))
    [r] = parse_responses(h.output())
    if status == 204:
        assert (r.status, r.headers["x-scan-status"]) == (204, f"unscanned; reason={reason}")
    else:
        assert is_block_page(r)
        assert r.body is not None and UNSCANNABLE_REASONS[reason].encode() in r.body
    [record] = h.observer.records
    assert record.unscannable == reason
    assert record.outcome == ("error" if reason in ("engine-error", "scan-timeout") else "unscanned")


def test_oversize_passed_before_the_scan_is_recorded_too_large() -> None:
    h = make_harness(max_scan_size=10_000, oversize_policy="pass")
    h.send(respmod(bytes(20_000), "identity", "Allow: 204"))
    [r] = parse_responses(h.output())
    assert (r.status, r.headers["x-scan-status"]) == (204, "unscanned; reason=too-large")
    assert h.observer.records[-1].unscannable == "too-large"
