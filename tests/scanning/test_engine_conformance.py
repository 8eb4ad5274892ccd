"""Both engines, same rules, same bodies: the same verdicts and the same rule names.

``[scan] engine = "yara"`` (yara-python in threads) and ``"yara-x"`` (YARA-X
in worker processes, ``gateway.scanning.yarax``) must be interchangeable: a
verdict, its ``namespace.rule`` names and the externals' effect may not
depend on the engine.  Every body goes through ``YaraScanner.scan_blocking``
of each engine, as the gateway runs it (in memory, spooled to a file,
Content-Encoded).

signature-base (outside the repository, see ``test_rulesets.py``) is
compiled once per engine for the module.  Its bodies are generated: literal
strings taken from its own rule files, sampled with a fixed seed, behind
headers that rules test (MZ/PE, PHP, ASP, shell, ZIP), so hundreds of its
rules fire, plus random bytes and ordinary text that must stay clean.
"""

from __future__ import annotations

import base64
import dataclasses
import gzip
import os
import random
import re
import signal
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import brotli
import pytest

from gateway.config import ScanSettings, parse_config
from gateway.interfaces import ScanContext, Verdict
from gateway.scanning.discovery import rule_files
from gateway.scanning.engine import EngineError, EngineTimeout, RulesError
from gateway.scanning.rules import RulesManager, compile_directory
from gateway.scanning.scanner import YaraScanner
from gateway.scanning.yara_engine import YaraEngine
from gateway.scanning.yarax import YaraXEngine
from gateway.settings import ConfigErrors

from .conftest import BUNDLED_RULES, EICAR, SyncPool, SyncReactor, bump, result_of, write_rule
from .test_bundled_rules import BATCH, CLICKFIX, CSV_EXPORT, SMUGGLER, tiny_pe, zip_bytes
from .test_rulesets import ruleset

ENGINES = ("yara", "yara-x")


@pytest.fixture(scope="module")
def engine() -> Iterator[YaraXEngine]:
    e = YaraXEngine(2)
    yield e
    e.close()


def make_pair(
    directory: Path, engine: YaraXEngine, spool: Path, **settings: Any
) -> dict[str, YaraScanner]:
    """One scanner per engine over ``directory``, synchronous pool and reactor."""
    config = dataclasses.replace(ScanSettings(), **settings)
    scanners = {}
    for name in ENGINES:
        reactor, pool = SyncReactor(), SyncPool()
        manager = RulesManager(directory, reactor, pool, 0,  # type: ignore[arg-type]
                               engine=engine if name == "yara-x" else YaraEngine())
        manager.load_now()
        scanners[name] = YaraScanner(manager, reactor, pool, config, spool)  # type: ignore[arg-type]
    return scanners


def both(scanners: dict[str, YaraScanner], body: bytes | str, **context: Any) -> Verdict:
    """Scan with both engines; assert they agree (rule names in the same order:
    the first is what the block page shows); return the yara-python verdict."""
    context.setdefault("direction", "response")
    ctx = ScanContext(**context)
    verdicts = {name: s.scan_blocking(body, ctx) for name, s in scanners.items()}
    yara_v, yarax_v = verdicts["yara"], verdicts["yara-x"]
    assert (yarax_v.outcome, list(yarax_v.rules), yarax_v.detail, yarax_v.reason, yarax_v.action) == (
        yara_v.outcome, list(yara_v.rules), yara_v.detail, yara_v.reason, yara_v.action), context
    assert yarax_v.scanned_bytes == yara_v.scanned_bytes
    return yara_v


# --- the bundled rules ---------------------------------------------------------


@pytest.fixture(scope="module")
def bundled(engine: YaraXEngine, tmp_path_factory: pytest.TempPathFactory) -> dict[str, YaraScanner]:
    return make_pair(BUNDLED_RULES, engine, tmp_path_factory.mktemp("spool"))


def smuggler(payload: bytes, name: str) -> bytes:
    return SMUGGLER.format(payload=base64.b64encode(payload).decode(), name=name).encode()


# (body, context, the rule it must hit or None): the positives and negatives of
# test_bundled_rules, with the externals that decide them.
BUNDLED_CASES: list[tuple[bytes, dict[str, str], str | None]] = [
    (EICAR, {}, "EICAR_Test_File"),
    (b"preamble\n" + EICAR + b"\n", {"direction": "request"}, "EICAR_Test_File"),
    (EICAR[:-1], {}, None),
    (tiny_pe(), {"filetype": "image/png"}, "PE_Disguised_As_Content"),
    (tiny_pe(), {"filetype": "text/plain", "extension": "txt"}, "PE_Disguised_As_Content"),
    (tiny_pe(), {"filetype": "application/octet-stream", "extension": "exe"}, None),
    (tiny_pe(), {"filetype": "image/png", "direction": "request"}, None),
    (b"MZ" + bytes(300), {"filetype": "image/png"}, None),
    (smuggler(tiny_pe(), "update.exe"), {"filetype": "text/html"}, "HTML_Smuggling_Embedded_Payload"),
    (smuggler(zip_bytes(), "invoice.zip"), {"filetype": "text/html"}, "HTML_Smuggling_Embedded_Payload"),
    (CSV_EXPORT.encode(), {"filetype": "text/html"}, None),
    (BATCH, {"filetype": "application/octet-stream", "extension": "bat"}, "PowerShell_Hidden_Download_Cradle"),
    (BATCH, {"filetype": "text/plain", "direction": "request"}, None),
    (b"<html><pre>" + BATCH + b"</pre></html>", {"filetype": "text/html"}, None),
    (CLICKFIX, {"filetype": "text/html"}, "ClickFix_Clipboard_PowerShell"),
    (b"<!doctype html><html><body>" + b"<p>text</p>" * 500, {"filetype": "text/html"}, None),
]


# Explicit ids: a test id must not carry the EICAR string into CI logs.
@pytest.mark.parametrize(("body", "context", "expected"), BUNDLED_CASES,
                         ids=[f"{i}-{case[2] or 'clean'}" for i, case in enumerate(BUNDLED_CASES)])
def test_bundled_rules_same_verdicts(
    bundled: dict[str, YaraScanner], body: bytes, context: dict[str, str], expected: str | None
) -> None:
    verdict = both(bundled, body, **context)
    assert [r.split(".yar.", 1)[1] for r in verdict.rules] == ([expected] if expected else [])


def test_bundled_same_rules_spooled_and_encoded(
    bundled: dict[str, YaraScanner], engine: YaraXEngine, tmp_path: Path
) -> None:
    # A spooled body is scanned by path (scan_file in the worker).
    spooled = tmp_path / "body"
    spooled.write_bytes(b"x" * 5000 + EICAR + b"y" * 5000)
    assert both(bundled, str(spooled)).rules == ("eicar.yar.EICAR_Test_File",)
    # gzip: decoded first, then matched; a corrupt stream scans prefix and raw bytes.
    assert both(bundled, gzip.compress(EICAR), content_encoding="gzip").outcome == "blocked"
    broken = both(bundled, gzip.compress(b"<p>ok</p>" * 100)[:-30], content_encoding="gzip")
    assert (broken.outcome, broken.reason) == ("unscannable", "corrupt-encoding")
    assert broken.detail.startswith("corrupt-encoding")
    # Over max_scan_size: neither engine scans.
    small = make_pair(BUNDLED_RULES, engine, tmp_path, max_scan_size=100)
    assert (both(small, EICAR * 2).reason, both(small, EICAR * 2).detail) == ("too-large", "too-large")


def _zstd(data: bytes) -> bytes:
    import zstandard

    return zstandard.ZstdCompressor().compress(data)


PAGE = b"<html><body>" + b"<p>nothing to see here</p>" * 200 + b"</body></html>"
# (body, Content-Encoding, settings, outcome, reason, action): each unscannable
# reason, clean and with EICAR inside what can still be scanned.
UNSCANNABLE_CASES: list[tuple[bytes, str, dict[str, Any], str, str, str]] = [
    (gzip.compress(bytes(10 * 1024**2) + EICAR, 9), "gzip", {}, "unscannable", "bomb", "block"),
    (gzip.compress(bytes(10 * 1024**2) + EICAR, 9), "gzip", {"unscannable_policy": {"bomb": "pass"}},
     "unscannable", "bomb", "pass"),
    (gzip.compress(EICAR + bytes(10 * 1024**2), 9), "gzip", {"unscannable_policy": {"bomb": "pass"}},
     "blocked", "bomb", ""),
    (gzip.compress(PAGE + EICAR + bytes(200_000)), "gzip", {"max_decoded_size": 100_000},
     "blocked", "decode-limit", ""),
    (gzip.compress(PAGE + bytes(200_000)), "gzip", {"max_decoded_size": 100_000},
     "unscannable", "decode-limit", "block"),
    (gzip.compress(PAGE + EICAR + bytes(200_000)), "gzip", {"max_scan_size": 100_000},
     "blocked", "too-large", ""),
    (gzip.compress(PAGE + bytes(200_000)), "gzip", {"max_scan_size": 100_000},
     "unscannable", "too-large", "pass"),
    (gzip.compress(PAGE)[:-30], "gzip", {}, "unscannable", "corrupt-encoding", "block"),
    (PAGE, "compress", {}, "unscannable", "unknown-encoding", "pass"),
    (gzip.compress(PAGE + EICAR), "gzip, utf-8", {}, "blocked", "unknown-encoding", ""),
    (gzip.compress(PAGE) + EICAR, "gzip", {}, "blocked", "trailing-data", ""),
    (zlib.compress(PAGE) + EICAR, "deflate", {}, "blocked", "trailing-data", ""),
    (_zstd(PAGE) + EICAR, "zstd", {}, "blocked", "trailing-data", ""),
    (brotli.compress(PAGE) + EICAR, "br", {}, "blocked", "corrupt-encoding", ""),
    (_zstd(gzip.compress(PAGE) + EICAR), "gzip, zstd", {}, "blocked", "trailing-data", ""),
    (gzip.compress(PAGE) + b"\n", "gzip", {}, "unscannable", "trailing-data", "pass"),
    (gzip.compress(b"\x1f\x8b\x08\x00broken" + PAGE + EICAR, 9), "gzip, gzip",
     {"unscannable_policy": {"corrupt-encoding": "pass"}}, "blocked", "corrupt-encoding", ""),
]


@pytest.mark.parametrize("spooled", [False, True], ids=["memory", "spooled"])
@pytest.mark.parametrize(("body", "coding", "settings", "outcome", "reason", "action"), UNSCANNABLE_CASES,
                         ids=[f"{i}-{case[4]}-{case[3]}" for i, case in enumerate(UNSCANNABLE_CASES)])
def test_unscannable_same_verdicts(
    engine: YaraXEngine, tmp_path: Path, body: bytes, coding: str, settings: dict[str, Any],
    outcome: str, reason: str, action: str, spooled: bool,
) -> None:
    scanners = make_pair(BUNDLED_RULES, engine, tmp_path, **settings)
    target: bytes | str = body
    if spooled:  # a body past memory_threshold: decoded from, and matched by, its file
        (tmp_path / "body").write_bytes(body)
        target = str(tmp_path / "body")
    verdict = both(scanners, target, content_encoding=coding)
    assert (verdict.outcome, verdict.reason, verdict.action) == (outcome, reason, action)
    if outcome == "blocked":
        assert verdict.rules == ("eicar.yar.EICAR_Test_File",)


def test_bundled_versions_differ_by_engine(bundled: dict[str, YaraScanner]) -> None:
    # The ISTag changes with the engine; both are 16 hex digits.
    versions = {name: s.version for name, s in bundled.items()}
    assert versions["yara"] != versions["yara-x"]
    assert all(re.fullmatch(r"[0-9a-f]{16}", v) for v in versions.values())


# --- signature-base --------------------------------------------------------------

_LITERAL = re.compile(r'^\s*\$\w*\s*=\s*"((?:[^"\\]|\\.)*)"(.*)$', re.M)
_ESCAPES = {"n": b"\n", "t": b"\t", "r": b"\r", "\\": b"\\", '"': b'"'}


def _unescape(text: str) -> bytes:
    out, i = bytearray(), 0
    while i < len(text):
        if text[i] == "\\" and i + 1 < len(text):
            if text[i + 1] == "x":
                out.append(int(text[i + 2:i + 4], 16))
                i += 4
            else:
                out += _ESCAPES.get(text[i + 1], text[i + 1].encode())
                i += 2
        else:
            out += text[i].encode()
            i += 1
    return bytes(out)


def rule_literals(directory: Path) -> list[tuple[bytes, bool]]:
    """(bytes, wide only) of the text strings (6 bytes and more) in the rule files."""
    found = []
    for _, path in rule_files(directory):
        for m in _LITERAL.finditer(path.read_text(errors="replace")):
            try:
                literal = _unescape(m.group(1))
            except ValueError:
                continue
            if len(literal) >= 6:
                found.append((literal, "wide" in m.group(2) and "ascii" not in m.group(2)))
    return found


SIG_PREFIXES = (b"", tiny_pe(), b"<?php ", b'<%@ Page Language="C#" %>', b"#!/bin/sh\n", b"PK\x03\x04")


@pytest.fixture(scope="module")
def sigbase_dir() -> Path:
    return ruleset("signature-base")


@pytest.fixture(scope="module")
def sigbase(
    sigbase_dir: Path, engine: YaraXEngine, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, YaraScanner]:
    return make_pair(sigbase_dir, engine, tmp_path_factory.mktemp("spool"))


def test_signature_base_loads_completely_under_yarax(sigbase: dict[str, YaraScanner]) -> None:
    # Every file and every rule: YARA-X (relaxed regular expressions) refuses nothing.
    yara_set, yarax_set = (sigbase[n]._rules.current for n in ENGINES)
    assert yara_set is not None and yarax_set is not None
    assert yarax_set.file_count == yara_set.file_count > 700
    assert yarax_set.rule_count == yara_set.rule_count > 5000
    assert yarax_set.externals_used == yara_set.externals_used


def test_signature_base_generated_bodies(sigbase: dict[str, YaraScanner], sigbase_dir: Path) -> None:
    rng = random.Random(20261126)
    literals = rule_literals(sigbase_dir)
    assert len(literals) > 10_000
    hit: set[str] = set()
    blocked = 0
    for prefix in SIG_PREFIXES:
        for count in (40, 400):
            parts = rng.sample(literals, count)
            body = prefix + b" ".join(
                p.decode("latin-1").encode("utf-16le") if wide else p for p, wide in parts)
            verdict = both(sigbase, body, filetype="application/octet-stream", filename="a.bin")
            hit.update(verdict.rules)
            blocked += verdict.outcome == "blocked"
    # Not a vacuous comparison: hundreds of distinct rules fired, in both engines.
    assert blocked >= 10
    assert len(hit) > 200


def test_signature_base_clean_bodies(sigbase: dict[str, YaraScanner]) -> None:
    rng = random.Random(7)
    for size in (0, 1, 1024, 64 * 1024):
        assert both(sigbase, rng.randbytes(size)).outcome == "clean"
    words = [b"the", b"gateway", b"scans", b"bodies", b"with", b"rules", b"and", b"text"]
    page = b"<html><body><p>" + b" ".join(rng.choice(words) for _ in range(5000)) + b"</p></body></html>"
    assert both(sigbase, page, filetype="text/html").outcome == "clean"


def test_signature_base_known_strings_and_externals(sigbase: dict[str, YaraScanner], tmp_path: Path) -> None:
    # Its EICAR rule (uint16(0) and filesize conditions) next to the bundled one.
    assert "gen_suspicious_strings.yar.SUSP_Just_EICAR" in both(sigbase, EICAR).rules
    # Rules that read the externals: they fire only with the right filename/filepath,
    # which proves the values reach the YARA-X workers (and are reset between scans).
    sudoers = b"deploy ALL=(ALL) NOPASSWD: /usr/bin/vim /etc/hosts\n"
    name = "configured_vulns_ext_vars.yar.VULN_Linux_Sudoers_Commands"
    assert name in both(sigbase, sudoers, filename="sudoers", direction="request").rules
    assert name not in both(sigbase, sudoers, filename="notes.txt", direction="request").rules
    exports = b"# shares\n/srv/data *(rw,insecure,no_root_squash)\n"
    nfs = "configured_vulns_ext_vars.yar.VULN_Linux_NFS_Exports"
    assert nfs in both(sigbase, exports, filename="exports", filepath="/etc/exports").rules
    assert nfs not in both(sigbase, exports, filename="exports", filepath="/srv/exports").rules
    # The same by path, from a spooled file.
    spooled = tmp_path / "sudoers"
    spooled.write_bytes(sudoers)
    assert name in both(sigbase, str(spooled), filename="sudoers", tenant="acme").rules


# --- the engine itself -------------------------------------------------------------


def test_yarax_compile_error_names_file_and_line(engine: YaraXEngine, tmp_path: Path) -> None:
    write_rule(tmp_path, "good.yar", 'rule ok { strings: $a = "fine" condition: $a }')
    bad = write_rule(tmp_path, "sub/bad.yar", "rule broken {\n condition:\n  undefined_thing\n}\n")
    with pytest.raises(RulesError) as caught:
        compile_directory(tmp_path, engine)
    assert caught.value.file == str(bad) and caught.value.line == 3
    assert "unknown identifier" in caught.value.message


def test_yarax_reload_swaps_and_refuses_broken(engine: YaraXEngine, tmp_path: Path) -> None:
    rules_dir = tmp_path / "rules"
    path = write_rule(rules_dir, "a.yar", 'rule first { strings: $a = "alpha" condition: $a }')
    reactor, pool = SyncReactor(), SyncPool()
    manager = RulesManager(rules_dir, reactor, pool, 0, engine=engine)  # type: ignore[arg-type]
    manager.load_now()
    scanner = YaraScanner(manager, reactor, pool, ScanSettings(), tmp_path)  # type: ignore[arg-type]
    ctx = ScanContext(direction="response")
    old = scanner.version
    assert scanner.scan_blocking(b"alpha", ctx).rules == ("a.yar.first",)
    path.write_text('rule second { strings: $a = "beta" condition: $a }')
    bump(path)
    assert result_of(manager.reload()) is True
    assert scanner.version != old
    assert scanner.scan_blocking(b"alpha beta", ctx).rules == ("a.yar.second",)
    path.write_text("rule broken { condition: nope }")
    bump(path)
    assert result_of(manager.reload()) is False  # refused: the working set stays
    assert scanner.scan_blocking(b"beta", ctx).rules == ("a.yar.second",)


def test_yarax_worker_death_is_an_error_then_recovers(tmp_path: Path) -> None:
    engine = YaraXEngine(1)
    try:
        write_rule(tmp_path / "r", "e.yar", 'rule e { strings: $a = "needle" condition: $a }')
        compiled = compile_directory(tmp_path / "r", engine)
        assert compiled.match(b"a needle", {}, timeout=5) == ["e.yar.e"]
        [pid] = engine.pids()
        os.kill(pid, signal.SIGKILL)
        # The scan that finds it dead is an error; the next starts a new worker,
        # which gets the rules with its first job.
        with pytest.raises(EngineError, match="died"):
            compiled.match(b"needle", {}, timeout=5)
        assert compiled.match(b"a needle", {}, timeout=5) == ["e.yar.e"]
        assert engine.restarts == 1 and engine.pids() != [pid]
    finally:
        engine.close()


def test_yarax_closed_engine_gives_error_verdict(tmp_path: Path) -> None:
    engine = YaraXEngine(1)
    write_rule(tmp_path / "r", "e.yar", 'rule e { strings: $a = "needle" condition: $a }')
    reactor, pool = SyncReactor(), SyncPool()
    manager = RulesManager(tmp_path / "r", reactor, pool, 0, engine=engine)  # type: ignore[arg-type]
    manager.load_now()
    scanner = YaraScanner(manager, reactor, pool, ScanSettings(), tmp_path)  # type: ignore[arg-type]
    engine.close()
    verdict = result_of(scanner.scan(b"needle", ScanContext(direction="response")))
    # fail-closed applies, never a crash
    assert (verdict.outcome, verdict.reason, verdict.action) == ("unscannable", "engine-error", "block")


def test_engine_setting() -> None:
    assert ScanSettings().engine == "yara"
    assert parse_config({"scan": {"engine": "yara-x"}}, "gw.toml").scan.engine == "yara-x"
    with pytest.raises(ConfigErrors) as caught:
        parse_config({"scan": {"engine": "yarax"}}, "gw.toml")
    assert "gw.toml" in str(caught.value) and "engine" in str(caught.value)


# --- the real gateway with engine = "yara-x" ---------------------------------------


def descendants(pid: int) -> set[int]:
    """Every live process under ``pid`` (its forkserver and scanning workers)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


@pytest.mark.cicap
def test_gateway_serves_with_yarax_and_stops_its_workers(tmp_path: Path) -> None:
    import subprocess
    import time

    from tests.peers import gateway_process, require_binary

    binary = require_binary("c-icap-client")
    import shutil

    rules = tmp_path / "rules"
    shutil.copytree(BUNDLED_RULES, rules)
    with gateway_process(rules=rules, settings={"scan": {"engine": "yara-x", "threads": 2}}) as gw:

        def respmod(body: bytes, name: str) -> str:
            src = tmp_path / name
            src.write_bytes(body)
            return subprocess.run(
                [binary, "-i", "127.0.0.1", "-p", str(gw.port), "-s", "respmod",
                 "-resp", f"http://example.com/{name}", "-f", str(src), "-o", str(tmp_path / f"{name}.out"), "-v"],
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=60).stdout

        assert "X-Infection-Found" in respmod(EICAR, "eicar.com")
        # Past memory_threshold (1 MiB): spooled, scanned by path in a worker.
        big = os.urandom(2 * 1024**2)
        assert "X-Infection-Found" in respmod(big + EICAR, "big.bin")
        assert "ICAP/1.0 204" in respmod(big, "clean.bin")
        # SIGHUP: compiled in a worker, loaded by the others, then in service.
        needle = b"conformance-needle-" + os.urandom(4).hex().encode()
        assert "ICAP/1.0 204" in respmod(needle, "n1.txt")
        write_rule(rules, "extra.yar", f'rule Extra {{ strings: $a = "{needle.decode()}" condition: $a }}')
        gw.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 20
        while "X-Infection-Found" not in (out := respmod(needle, f"n{time.monotonic()}.txt")):
            assert time.monotonic() < deadline, out
            time.sleep(0.2)
        assert "extra.yar.Extra" in out
        workers = descendants(gw.proc.pid)
        assert len(workers) >= 3  # the forkserver and 2 scanning processes
        gw.stop()
        deadline = time.monotonic() + 10
        while (left := {p for p in workers if Path(f"/proc/{p}").exists()}) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not left, f"scanning processes left running: {left}"


SLOW_RULE = """rule slow {
  condition:
    for all i in (0..filesize - 1) : ( for all j in (0..filesize - 1) : ( uint8(i) != uint8(j) + 1000 ) )
}
"""


def test_timeout_is_the_same_verdict(engine: YaraXEngine, tmp_path: Path) -> None:
    write_rule(tmp_path / "r", "slow.yar", SLOW_RULE)
    scanners = make_pair(tmp_path / "r", engine, tmp_path, timeout=1.0)
    verdict = both(scanners, bytes(200_000))
    assert (verdict.outcome, verdict.reason, verdict.detail) == ("unscannable", "scan-timeout", "scan-timeout")
    # The yara-x worker stopped the scan itself and serves the next one.
    write_rule(tmp_path / "q", "e.yar", 'rule e { strings: $a = "needle" condition: $a }')
    quick = make_pair(tmp_path / "q", engine, tmp_path)
    assert both(quick, b"a needle").outcome == "blocked"


def test_stuck_worker_is_killed_and_replaced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from gateway.scanning import yarax as engine_yarax

    monkeypatch.setattr(engine_yarax, "SLACK", 0.5)
    engine = YaraXEngine(1)
    try:
        write_rule(tmp_path, "e.yar", 'rule e { strings: $a = "needle" condition: $a }')
        compiled = compile_directory(tmp_path, engine)
        [pid] = engine.pids()
        os.kill(pid, signal.SIGSTOP)  # answers nothing, as if stuck in a scan
        with pytest.raises(EngineTimeout):
            compiled.match(b"needle", {}, timeout=1)
        assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]
        assert compiled.match(b"needle", {}, timeout=1) == ["e.yar.e"]
        assert engine.restarts == 1
    finally:
        engine.close()


def test_yarax_warnings_skip_style_lints(bundled: dict[str, YaraScanner]) -> None:
    # The bundled EICAR rule is hex on purpose: yara-x's text_as_hex lint is not logged.
    compiled = bundled["yara-x"]._rules.current
    assert compiled is not None and compiled.warnings == ()
