"""YaraScanner: verdicts, externals, Content-Encoding, limits, timeouts."""

from __future__ import annotations

import gzip
import os
import zlib
from collections.abc import Callable
from pathlib import Path

import brotli
import pytest
import zstandard

from gateway.interfaces import ScanContext
from gateway.scanning.scanner import YaraScanner, externals_for

from .conftest import EICAR, SyncPool, SyncReactor, result_of, scan, write_rule

EICAR_RULE = "eicar.yar.EICAR_Test_File"
PAGE = b"<html><body>" + b"nothing to see here " * 200 + b"</body></html>"
INFECTED = PAGE[:500] + EICAR + PAGE[500:]

Make = Callable[..., YaraScanner]


def raw_deflate(data: bytes) -> bytes:
    c = zlib.compressobj(wbits=-15)
    return c.compress(data) + c.flush()


ENCODERS: dict[str, Callable[[bytes], bytes]] = {
    "gzip": gzip.compress,
    "x-gzip": gzip.compress,
    "deflate": zlib.compress,  # RFC 9110 "deflate": zlib-wrapped
    "br": lambda data: brotli.compress(data, quality=5),
    "zstd": zstandard.ZstdCompressor().compress,
}


def test_clean_and_blocked_raw(make_scanner: Make) -> None:
    scanner = make_scanner()
    clean = scan(scanner, PAGE)
    assert clean.outcome == "clean"
    assert clean.rules == ()
    assert clean.scanned_bytes == len(PAGE)
    assert clean.ruleset_version == scanner.version != ""
    blocked = scan(scanner, INFECTED)
    assert blocked.outcome == "blocked"
    assert blocked.rules == (EICAR_RULE,)
    assert blocked.scanned_bytes == len(INFECTED)
    assert blocked.duration > 0


@pytest.mark.parametrize("coding", sorted(ENCODERS))
def test_eicar_found_through_each_encoding(make_scanner: Make, coding: str) -> None:
    scanner = make_scanner()
    encoded = ENCODERS[coding](INFECTED)
    if coding != "zstd":  # zstd keeps a short, unrepeated run as a literal
        assert EICAR not in encoded
    verdict = scan(scanner, encoded, content_encoding=coding)
    assert (verdict.outcome, verdict.rules, verdict.detail) == ("blocked", (EICAR_RULE,), "")
    assert verdict.scanned_bytes == len(INFECTED)  # the decoded body, not the raw bytes
    assert scan(scanner, ENCODERS[coding](PAGE), content_encoding=coding).outcome == "clean"


def test_raw_deflate(make_scanner: Make) -> None:
    verdict = scan(make_scanner(), raw_deflate(INFECTED), content_encoding="deflate")
    assert (verdict.outcome, verdict.detail) == ("blocked", "")


@pytest.mark.parametrize("header", ["gzip, br", "deflate,zstd", "br, gzip, zstd", "identity, gzip"])
def test_stacked_encodings(make_scanner: Make, header: str) -> None:
    body = INFECTED
    for coding in (c.strip() for c in header.split(",")):
        if coding != "identity":
            body = ENCODERS[coding](body)
    verdict = scan(make_scanner(), body, content_encoding=header.upper())
    assert (verdict.outcome, verdict.rules, verdict.detail) == ("blocked", (EICAR_RULE,), "")


def test_multi_member_gzip(make_scanner: Make) -> None:
    body = gzip.compress(INFECTED[:520]) + gzip.compress(INFECTED[520:])
    verdict = scan(make_scanner(), body, content_encoding="gzip")
    assert verdict.outcome == "blocked"
    assert verdict.scanned_bytes == len(INFECTED)


def test_decode_error_scans_raw_bytes(make_scanner: Make) -> None:
    # A server labelling plain content as gzip: the raw bytes are still scanned.
    verdict = scan(make_scanner(), INFECTED, content_encoding="gzip")
    assert (verdict.outcome, verdict.reason) == ("blocked", "corrupt-encoding")
    assert verdict.detail.startswith("corrupt-encoding: gzip")
    # Nothing matched, but what was not decoded was not seen: blocked by default
    # (it was "clean" before).
    clean = scan(make_scanner(), PAGE, content_encoding="br")
    assert (clean.outcome, clean.reason, clean.action) == ("unscannable", "corrupt-encoding", "block")
    assert clean.detail.startswith("corrupt-encoding: br")
    assert clean.scanned_bytes == len(PAGE)
    passing = scan(make_scanner(unscannable_policy={"corrupt-encoding": "pass"}), PAGE, content_encoding="br")
    assert (passing.outcome, passing.action) == ("unscannable", "pass")


def test_truncated_stream_scans_decoded_prefix(make_scanner: Make) -> None:
    body = INFECTED + os.urandom(200_000)
    encoded = gzip.compress(body)
    verdict = scan(make_scanner(), encoded[: len(encoded) // 2], content_encoding="gzip")
    assert verdict.outcome == "blocked"  # EICAR sits in the part that did decode
    assert verdict.detail == "corrupt-encoding: gzip: truncated stream"
    clean = gzip.compress(PAGE + os.urandom(200_000))
    verdict = scan(make_scanner(), clean[: len(clean) // 2], content_encoding="gzip")
    assert (verdict.outcome, verdict.reason, verdict.action) == ("unscannable", "corrupt-encoding", "block")


def test_unsupported_encoding(make_scanner: Make) -> None:
    verdict = scan(make_scanner(), INFECTED, content_encoding="compress")
    assert verdict.outcome == "blocked"
    assert verdict.detail == "unknown-encoding: 'compress'"
    # Browsers pass a body with an unknown coding on as it is, and those raw
    # bytes were scanned whole: passed (marked) by default, not a false block.
    verdict = scan(make_scanner(), PAGE, content_encoding="utf-8")
    assert (verdict.outcome, verdict.reason, verdict.action) == ("unscannable", "unknown-encoding", "pass")


def test_a_bogus_coding_label_does_not_hide_a_gzip_body(make_scanner: Make) -> None:
    verdict = scan(make_scanner(), gzip.compress(INFECTED), content_encoding="gzip, utf-8")
    assert verdict.outcome == "blocked"
    assert verdict.reason == "unknown-encoding"


def test_a_deep_stack_of_codings_is_a_corrupt_encoding(make_scanner: Make) -> None:
    # Was a RecursionError out of the scanning thread: an engine-error with a
    # traceback logged per request.
    verdict = scan(make_scanner(), INFECTED, content_encoding=", ".join(["gzip"] * 5000))
    assert (verdict.outcome, verdict.reason) == ("blocked", "corrupt-encoding")  # the raw bytes were scanned
    verdict = scan(make_scanner(), PAGE, content_encoding=", ".join(["gzip"] * 5000))
    assert (verdict.outcome, verdict.reason, verdict.action) == ("unscannable", "corrupt-encoding", "block")


def test_decode_bomb_is_bounded_and_prefix_scanned(make_scanner: Make) -> None:
    # 64 MiB of zeros in ~64 KiB: the ratio limit stops decoding at 100x.
    bomb_plain = EICAR + bytes(64 * 1024**2)
    bomb = zlib.compress(bomb_plain, 9)
    scanner = make_scanner(max_decode_ratio=100)
    verdict = scan(scanner, bomb, content_encoding="deflate")
    assert verdict.outcome == "blocked"  # found in the prefix
    assert (verdict.reason, verdict.detail) == ("bomb", "bomb")
    assert verdict.scanned_bytes == 100 * len(bomb) + len(bomb)  # prefix + raw bytes

    clean_bomb = zstandard.ZstdCompressor().compress(bytes(64 * 1024**2))
    verdict = scan(scanner, clean_bomb, content_encoding="zstd")
    assert (verdict.outcome, verdict.reason, verdict.action) == ("unscannable", "bomb", "block")
    assert verdict.scanned_bytes == 101 * len(clean_bomb)
    # The policy may pass it (marked); oversize_policy is about too-large only.
    passing = make_scanner(max_decode_ratio=100, unscannable_policy={"bomb": "pass"})
    assert scan(passing, clean_bomb, content_encoding="zstd").action == "pass"
    assert scan(make_scanner(max_decode_ratio=100, oversize_policy="block"), clean_bomb,
                content_encoding="zstd").action == "block"


def test_gzip_bomb_padding_an_eicar_blocks_by_default(make_scanner: Make) -> None:
    # The bypass: gzip(10 MiB of zeros + EICAR), about 10 KiB on the
    # wire, stops at the default ratio (1000x) before EICAR and passed as
    # "unscanned; decode-limit".  Now it is a bomb, and bombs block.
    body = gzip.compress(bytes(10 * 1024**2) + EICAR, 9)
    assert len(body) < 20_000
    verdict = scan(make_scanner(), body, content_encoding="gzip")
    assert (verdict.outcome, verdict.reason, verdict.action) == ("unscannable", "bomb", "block")
    assert verdict.scanned_bytes == 1000 * len(body) + len(body)
    passing = scan(make_scanner(unscannable_policy={"bomb": "pass"}), body, content_encoding="gzip")
    assert (passing.outcome, passing.reason, passing.action) == ("unscannable", "bomb", "pass")


@pytest.mark.parametrize("reason", ["bomb", "decode-limit", "too-large"])
def test_eicar_in_the_decoded_prefix_of_an_over_limit_body_blocks(make_scanner: Make, reason: str) -> None:
    # EICAR early, padding after it past each limit: the prefix is scanned,
    # the match blocks whatever the policy for the reason says.
    body = gzip.compress(PAGE + EICAR + bytes(400_000))  # 400x: under the default ratio
    assert len(body) < 100_000  # the raw body is within max_scan_size
    limits = {"bomb": {"max_decode_ratio": 10},
              "decode-limit": {"max_decoded_size": 100_000},
              "too-large": {"max_scan_size": 100_000}}[reason]
    everything_passes = {r: "pass" for r in ("bomb", "decode-limit", "too-large")}
    verdict = scan(make_scanner(**limits, unscannable_policy=everything_passes), body, content_encoding="gzip")
    assert (verdict.outcome, verdict.rules, verdict.reason) == ("blocked", (EICAR_RULE,), reason)


@pytest.mark.parametrize("coding", ["gzip", "deflate", "zstd", "br"])
def test_eicar_after_the_end_of_the_encoded_stream_blocks(make_scanner: Make, coding: str) -> None:
    # gzip(1), browsers and the old decoders ignore what follows the stream:
    # nothing scanned it.  (br: the library refuses it, read as corrupt.)
    body = ENCODERS[coding](PAGE) + EICAR
    verdict = scan(make_scanner(), body, content_encoding=coding)
    assert (verdict.outcome, verdict.rules) == ("blocked", (EICAR_RULE,))
    assert verdict.reason == ("corrupt-encoding" if coding == "br" else "trailing-data")


def test_eicar_after_an_inner_stream_of_stacked_codings_blocks(make_scanner: Make) -> None:
    # "gzip, zstd": the trailing bytes are inside the zstd frame, not in the raw body.
    body = ENCODERS["zstd"](gzip.compress(PAGE) + EICAR)
    verdict = scan(make_scanner(), body, content_encoding="gzip, zstd")
    assert (verdict.outcome, verdict.rules, verdict.reason) == ("blocked", (EICAR_RULE,), "trailing-data")


def test_eicar_hidden_by_a_broken_inner_coding_blocks_under_a_pass_policy(make_scanner: Make) -> None:
    # "gzip, gzip" whose inner gzip is broken at its start: the outer gzip
    # decodes to bytes holding EICAR, but only the broken inner stream's
    # (empty) output and the raw, compressed bytes were matched.
    inner = b"\x1f\x8b\x08\x00broken" + PAGE + EICAR + PAGE
    body = gzip.compress(inner, 9)
    assert EICAR not in body
    lenient = make_scanner(unscannable_policy={"corrupt-encoding": "pass"})
    verdict = scan(lenient, body, content_encoding="gzip, gzip")
    assert (verdict.outcome, verdict.rules, verdict.reason) == ("blocked", (EICAR_RULE,), "corrupt-encoding")
    # The outermost coding broken: nothing more to find, still unscannable.
    clean = scan(lenient, gzip.compress(gzip.compress(PAGE))[:-40], content_encoding="gzip, gzip, gzip")
    assert (clean.outcome, clean.reason, clean.action) == ("unscannable", "corrupt-encoding", "pass")


def test_trailing_data_without_a_match_passes_marked(make_scanner: Make) -> None:
    junk = b"\n<!-- padding -->\n"
    verdict = scan(make_scanner(), gzip.compress(PAGE) + junk, content_encoding="gzip")
    assert (verdict.outcome, verdict.reason, verdict.action) == ("unscannable", "trailing-data", "pass")
    assert verdict.detail == f"trailing-data: {len(junk)} bytes"
    assert verdict.scanned_bytes == len(PAGE) + len(junk) + len(gzip.compress(PAGE) + junk)
    strict = make_scanner(unscannable_policy={"trailing-data": "block"})
    assert scan(strict, gzip.compress(PAGE) + junk, content_encoding="gzip").action == "block"


def test_max_decoded_size(make_scanner: Make) -> None:
    body = brotli.compress(os.urandom(3 * 1024**2), quality=1)  # ratio ~1: the size limit bites
    verdict = scan(make_scanner(max_decoded_size=1024**2), body, content_encoding="br")
    assert (verdict.outcome, verdict.reason, verdict.action) == ("unscannable", "decode-limit", "block")
    assert verdict.scanned_bytes == 1024**2 + len(body)


def test_oversize_is_not_scanned(make_scanner: Make) -> None:
    body = INFECTED + bytes(10_000)
    verdict = scan(make_scanner(max_scan_size=10_000), body)
    assert (verdict.outcome, verdict.rules, verdict.detail) == ("unscannable", (), "too-large")
    assert (verdict.reason, verdict.action, verdict.scanned_bytes) == ("too-large", "pass", 0)
    assert scan(make_scanner(max_scan_size=10_000, oversize_policy="block"), body).action == "block"
    table = make_scanner(max_scan_size=10_000, oversize_policy="pass",
                         unscannable_policy={"too-large": "block"})
    assert scan(table, body).action == "block"  # the table wins over the older key
    # Exactly at the limit is scanned.
    assert scan(make_scanner(max_scan_size=len(body)), body).outcome == "blocked"


def test_decoded_oversize_is_too_large(make_scanner: Make) -> None:
    body = gzip.compress(PAGE + bytes(50_000))
    assert len(body) < 10_000
    verdict = scan(make_scanner(max_scan_size=10_000), body, content_encoding="gzip")
    # The decoded prefix (up to the limit) and the raw bytes were scanned.
    assert (verdict.outcome, verdict.reason, verdict.scanned_bytes) == ("unscannable", "too-large",
                                                                          10_000 + len(body))


def test_large_decoded_body_spools_to_file_and_is_removed(make_scanner: Make, tmp_path: Path) -> None:
    body = os.urandom(300_000) + EICAR + os.urandom(300_000)
    scanner = make_scanner(memory_threshold=64 * 1024)
    verdict = scan(scanner, gzip.compress(body), content_encoding="gzip")
    assert (verdict.outcome, verdict.scanned_bytes) == ("blocked", len(body))
    spool = tmp_path / "spool"
    assert spool.is_dir()  # the decoded body did go to a file ...
    assert list(spool.iterdir()) == []  # ... which is gone after the scan


def test_spooled_body_scanned_by_path(make_scanner: Make, tmp_path: Path) -> None:
    raw = tmp_path / "body"
    raw.write_bytes(INFECTED)
    assert scan(make_scanner(), str(raw)).rules == (EICAR_RULE,)
    gz = tmp_path / "body.gz"
    gz.write_bytes(gzip.compress(INFECTED))
    verdict = scan(make_scanner(), str(gz), content_encoding="gzip")
    assert (verdict.outcome, verdict.scanned_bytes) == ("blocked", len(INFECTED))
    missing = scan(make_scanner(), str(tmp_path / "gone"))
    assert (missing.outcome, missing.reason, missing.action) == ("unscannable", "engine-error", "block")
    assert "FileNotFoundError" in missing.detail


def test_externals_reach_rules(make_scanner: Make, tmp_path: Path) -> None:
    rules = tmp_path / "rules"
    write_rule(rules, "ctx.yar", """
rule tenant_acme { condition: tenant == "acme" }
rule uploads { condition: direction == "request" }
rule invoice { condition: filename matches /^invoice.*\\.pdf$/ and extension == "pdf" }
rule where { condition: host == "example.org" and url startswith "https://example.org/"
             and filepath == "/a/invoice-7.pdf" and filetype == "application/pdf" }
""")
    scanner = make_scanner(rules)
    verdict = scan(scanner, b"x", direction="request", tenant="acme", filename="invoice-7.pdf",
                   extension="pdf", host="example.org", url="https://example.org/a/invoice-7.pdf",
                   filepath="/a/invoice-7.pdf", filetype="application/pdf")
    assert sorted(verdict.rules) == [
        "ctx.yar.invoice", "ctx.yar.tenant_acme", "ctx.yar.uploads", "ctx.yar.where"]
    # Externals are per scan: the next transaction does not inherit them.
    assert scan(scanner, b"x", tenant="other").outcome == "clean"


def test_timeout_is_an_error_verdict(make_scanner: Make, tmp_path: Path) -> None:
    rules = tmp_path / "rules"
    write_rule(rules, "slow.yar", """
rule slow { condition: for any i in (0..4000000000) : (uint8(i % filesize) == 0xFF and i < 0) }
""")
    verdict = scan(make_scanner(rules, timeout=0.5), b"a" * 100)  # YARA counts whole seconds: 1 s
    assert (verdict.outcome, verdict.reason, verdict.action) == ("unscannable", "scan-timeout", "block")
    assert 0.9 < verdict.duration < 5


def test_decoding_past_deadline_is_a_timeout(make_scanner: Make) -> None:
    scanner = make_scanner(timeout=10)
    ticks = iter(range(0, 10_000, 5))
    scanner._clock = lambda: float(next(ticks))  # 5 s per look at the clock
    verdict = scan(scanner, gzip.compress(os.urandom(1024**2)), content_encoding="gzip")
    assert (verdict.outcome, verdict.detail) == ("unscannable", "scan-timeout")


def test_scan_never_errbacks(reactor: SyncReactor, make_scanner: Make) -> None:
    scanner = make_scanner()

    class BrokenPool(SyncPool):
        def callInThreadWithCallback(self, on_result, f, *args, **kw):  # type: ignore[no-untyped-def]
            raise_inside = lambda: 1 / 0  # noqa: E731
            super().callInThreadWithCallback(on_result, raise_inside)

    scanner._pool = BrokenPool()  # type: ignore[assignment]
    verdict = result_of(scanner.scan(b"x", ScanContext(direction="response")))
    assert (verdict.outcome, verdict.reason) == ("unscannable", "engine-error")
    assert "ZeroDivisionError" in verdict.detail


def test_no_rules_loaded_is_an_error(reactor: SyncReactor, pool: SyncPool, tmp_path: Path) -> None:
    from gateway.config import ScanSettings
    from gateway.scanning.rules import RulesManager

    manager = RulesManager(tmp_path, reactor, pool, 0)  # type: ignore[arg-type]
    scanner = YaraScanner(manager, reactor, pool, ScanSettings(), tmp_path)  # type: ignore[arg-type]
    assert scanner.version == ""
    verdict = result_of(scanner.scan(b"x", ScanContext(direction="request")))
    assert (verdict.outcome, verdict.reason, verdict.detail) == ("unscannable", "engine-error", "no rules loaded")
    fail_open = YaraScanner(manager, reactor, pool, ScanSettings(error_policy="fail-open"), tmp_path)  # type: ignore[arg-type]
    assert result_of(fail_open.scan(b"x", ScanContext(direction="request"))).action == "pass"


def test_bytes_like_bodies(make_scanner: Make) -> None:
    scanner = make_scanner()
    assert scan(scanner, bytearray(INFECTED)).outcome == "blocked"  # type: ignore[arg-type]
    verdict = scanner.scan_blocking(memoryview(INFECTED), ScanContext(direction="request"))
    assert verdict.rules == (EICAR_RULE,)


def test_empty_bodies(make_scanner: Make) -> None:
    scanner = make_scanner()
    assert scan(scanner, b"").outcome == "clean"
    verdict = scan(scanner, b"", content_encoding="gzip")
    assert (verdict.outcome, verdict.detail, verdict.scanned_bytes) == ("clean", "", 0)


def test_externals_are_c_strings_and_shared_when_clean() -> None:
    clean = ScanContext(direction="response", url="http://a.example/x", host="a.example", tenant="acme")
    externals = externals_for(clean)
    assert externals["url"] is clean.url and externals["tenant"] == "acme" and externals["filename"] == ""
    # A NUL would end the value in YARA's C string: it is dropped, from every value.
    nul = ScanContext(direction="response", url="http://a.example/\0evil", filename="a\0.exe")
    assert (externals_for(nul)["url"], externals_for(nul)["filename"]) == ("http://a.example/evil", "a.exe")
    odd = ScanContext(direction="response", host=None)  # type: ignore[arg-type]
    assert externals_for(odd)["host"] == ""


def test_as_inline_copies_every_field() -> None:
    """The hand-written copy of an inline verdict must not lose a field
    added to Verdict later: every field set to a value unlike its default."""
    from dataclasses import fields, replace

    from gateway.interfaces import Verdict
    from gateway.scanning.scanner import as_inline

    values = {"outcome": "blocked", "rules": ("a.b",), "detail": "d", "scanned_bytes": 7, "duration": 0.5,
              "ruleset_version": "v1", "reason": "too-large", "action": "block", "inline": False, "cache": "hit"}
    assert set(values) == {f.name for f in fields(Verdict)}, "a new Verdict field: add it here and to as_inline"
    verdict = Verdict(**values)  # type: ignore[arg-type]
    assert as_inline(verdict) == replace(verdict, inline=True)
