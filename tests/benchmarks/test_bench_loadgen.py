"""Smoke tests of the benchmark load generator's correctness (no timed assertions).

The generator is checked against a strict in-process ICAP server that parses
every request completely, against c-icap's echo service, and against the
pyicap baseline; the wire helpers are checked on their own.
"""

from __future__ import annotations

import io
import os
import zlib
from pathlib import Path

import pytest

from benchmarks.bodies import decode, gzip_body, parse_size, random_body
from benchmarks.icapwire import (
    TOKEN_LEN,
    ProtocolError,
    RequestTemplate,
    ResponseParser,
    token,
)
from benchmarks.loadgen import LoadSpec, run_load
from benchmarks.raw_yara import run_raw
from benchmarks.rulesets import resolve
from benchmarks.scenarios import make_body
from benchmarks.servers import ServerUnavailable, start_cicap, start_pyicap
from benchmarks.special import run_huge, run_idle
from tests.benchmarks.strict_server import StrictServer, parse_request

# --- wire format, no sockets --------------------------------------------------


def _roundtrip(tpl: RequestTemplate, seq: int, tok: bytes, continue_: bool = True) -> bytes:
    first, after = tpl.build(seq, tok)
    wire = b"".join(bytes(b) for b in first) + b"".join(bytes(b) for b in after)
    asked: list[bool] = []

    def send_continue() -> bool:
        asked.append(True)
        return continue_

    parsed = parse_request(io.BytesIO(wire), send_continue)  # type: ignore[arg-type]
    assert parsed is not None
    headers, heads, body = parsed
    assert headers[b"allow"] == b"204"
    assert b"Content-Length: %d\r\n" % tpl.body_length in heads
    assert bool(asked) == bool(after)
    return body


@pytest.mark.parametrize("preview", [None, 0, 10, 1000, 1024, 5000])
def test_request_framing_carries_body_and_token(preview: int | None) -> None:
    body = random_body(1024)
    tpl = RequestTemplate("127.0.0.1", 1344, "respmod", body, preview)
    tok = token(3, 7)
    assert len(tok) == TOKEN_LEN
    got = _roundtrip(tpl, 7, tok)
    assert got == body.wire(tok)
    assert len(got) == 1024 and got.endswith(tok)


def test_preview_of_whole_body_ends_with_ieof() -> None:
    tpl = RequestTemplate("h", 1, "s", random_body(100), preview=4096)
    first, after = tpl.build(1, token(0, 1))
    assert after == []
    assert bytes(first[-1]) == b"0; ieof\r\n\r\n"


def test_gzip_body_is_unique_per_token_and_decodes() -> None:
    body = gzip_body(64 * 1024)
    a, b = body.wire(token(0, 1)), body.wire(token(0, 2))
    assert len(a) == len(b) == body.length  # Content-Length is the same for all
    da, db = decode(body, a), decode(body, b)
    assert da != db
    assert len(da) == body.decoded_length == 64 * 1024
    assert da.endswith(token(0, 1)) and db.endswith(token(0, 2))
    assert zlib.decompress(a, 31) == da  # a standard gzip decoder agrees


def test_response_parser_byte_by_byte() -> None:
    stream = (
        b"ICAP/1.0 100 Continue\r\n\r\n"
        b"ICAP/1.0 204 No Content\r\nISTag: \"x\"\r\nEncapsulated: null-body=0\r\n\r\n"
        b"ICAP/1.0 200 OK\r\nEncapsulated: res-hdr=0, res-body=19\r\n\r\n"
        b"HTTP/1.1 200 OK\r\n\r\n" b"5\r\nhello\r\n3;x=y\r\nabc\r\n0; ieof\r\n\r\n"
        b"ICAP/1.0 200 OK\r\nEncapsulated: res-hdr=0, null-body=19\r\n\r\nHTTP/1.1 403 No\r\n\r\n"
        b"ICAP/1.0 500 Server Error\r\n\r\n"
    )
    p = ResponseParser()
    got = []
    for i in range(len(stream)):
        got.extend(p.feed(stream[i : i + 1]))
    assert [r.status for r in got] == [100, 204, 200, 200, 500]
    assert got[2].body_bytes == 8
    assert got[1].headers[b"istag"] == b'"x"'
    assert p.idle


def test_response_parser_whole_responses_match_the_incremental_path() -> None:
    responses = [
        b"ICAP/1.0 100 Continue\r\n\r\n",
        b"ICAP/1.0 204 No Content\r\nEncapsulated: null-body=0\r\n\r\n",
        b"ICAP/1.0 200 OK\r\nEncapsulated: res-hdr=0, res-body=19\r\n\r\n"
        b"HTTP/1.1 200 OK\r\n\r\n5\r\nhello\r\n3;x=y\r\nabc\r\n0; ieof\r\n\r\n",
        b"ICAP/1.0 200 OK\r\nEncapsulated: res-hdr=0, null-body=19\r\n\r\nHTTP/1.1 403 No\r\n\r\n",
        # with a trailer: not "whole" for the fast path, still parsed
        b"ICAP/1.0 200 OK\r\nEncapsulated: res-body=0\r\n\r\n1\r\nx\r\n0\r\nX-T: 1\r\n\r\n",
    ]
    for raw in responses:
        whole = list(ResponseParser().feed(raw))
        p = ResponseParser()
        pieces = [r for i in range(len(raw)) for r in p.feed(raw[i : i + 1])]
        assert [(r.status, r.body_bytes) for r in whole] == [(r.status, r.body_bytes) for r in pieces]
        assert len(whole) == 1
    # two responses in one read, and one split over two reads
    p = ResponseParser()
    assert [r.status for r in p.feed(responses[1] + responses[2])] == [204, 200]
    assert list(p.feed(responses[2][:30])) == []
    assert [r.body_bytes for r in p.feed(responses[2][30:])] == [8]
    assert p.idle


def test_response_parser_refuses_garbage() -> None:
    with pytest.raises(ProtocolError):
        list(ResponseParser().feed(b"HTTP/1.1 200 OK\r\n\r\n"))
    with pytest.raises(ProtocolError):
        list(ResponseParser().feed(
            b"ICAP/1.0 200 OK\r\nEncapsulated: res-body=0\r\n\r\nzz\r\n"))


def test_parse_size() -> None:
    assert parse_size("2GiB") == 2 * 1024**3
    assert parse_size("64 MiB") == 64 * 1024**2
    assert parse_size("1000") == 1000
    with pytest.raises(ValueError):
        parse_size("lots")


# --- the generator against a strict server -----------------------------------


def _spec(port: int, scenario: str, **kw: object) -> LoadSpec:
    base: dict[str, object] = dict(concurrency=4, clients=2, warmup=0.1, duration=0.6, drain=5.0)
    base.update(kw)
    return LoadSpec("127.0.0.1", port, "respmod", scenario, **base)  # type: ignore[arg-type]


@pytest.mark.parametrize("scenario", ["1k", "gzip"])
def test_load_sends_valid_unique_bodies(scenario: str) -> None:
    with StrictServer("204") as srv:
        r = run_load(_spec(srv.port, scenario))
    seen = srv.seen
    assert seen.problems == []
    assert r.errors == 0, r.error_samples
    assert r.completed > 0 and set(r.statuses) == {204}
    # everything counted was really served, and no two bodies were alike
    assert r.completed <= seen.requests
    assert len(set(seen.digests)) == len(seen.digests) == seen.requests
    assert r.p50_ms is not None and r.p99_ms is not None and r.p50_ms <= r.p99_ms


def test_load_takes_the_files_of_a_directory_in_turn(tmp_path: Path) -> None:
    for name, size in (("a.bin", 10), ("b.txt", 5000), ("c/d.html", 70000)):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(os.urandom(size))
    (tmp_path / "empty").write_bytes(b"")
    with StrictServer("204") as srv:
        r = run_load(_spec(srv.port, "file", body_file=str(tmp_path), preview=1024))
    assert srv.seen.problems == []  # every Content-Length matched its body
    assert r.errors == 0 and r.completed >= 3
    assert r.body_name == "3 files"
    assert r.body_length == pytest.approx((10 + 5000 + 70000) / 3 + TOKEN_LEN)
    assert len(set(srv.seen.digests)) == len(srv.seen.digests)


def test_load_with_preview_continue_and_echo() -> None:
    with StrictServer("echo") as srv:
        r = run_load(_spec(srv.port, "64k", preview=1024, concurrency=2, clients=1))
    assert srv.seen.problems == []
    assert r.errors == 0, r.error_samples
    assert r.completed > 0 and set(r.statuses) == {200}
    assert srv.seen.continues >= r.completed
    assert len(set(srv.seen.digests)) == len(srv.seen.digests)


def test_load_with_preview_answered_204_early() -> None:
    with StrictServer("204-after-preview") as srv:
        r = run_load(_spec(srv.port, "64k", preview=1024, concurrency=2, clients=1))
    assert srv.seen.problems == []
    assert r.errors == 0, r.error_samples
    assert r.completed > 0 and set(r.statuses) == {204}
    assert srv.seen.continues == 0 and srv.seen.previews >= r.completed


def test_load_counts_error_statuses() -> None:
    with StrictServer("500") as srv:
        r = run_load(_spec(srv.port, "1k", concurrency=2, clients=1))
    assert r.completed == 0
    assert r.errors > 0 and set(r.statuses) == {500}
    assert "ICAP status 500" in r.error_samples


def test_load_reports_a_dead_server() -> None:
    with StrictServer("204") as srv:
        port = srv.port
    with pytest.raises(RuntimeError, match="generator process failed"):
        run_load(_spec(port, "1k", concurrency=1, clients=1))


def test_huge_body_streams_with_exact_length() -> None:
    size = 8 * 1024 * 1024 + 5
    with StrictServer("204") as srv:
        r = run_huge("127.0.0.1", srv.port, "respmod", os.getpid(), size)
    assert srv.seen.problems == []
    assert r.status == 204 and r.error is None
    assert r.size == size


def test_idle_connections_are_opened_used_and_checked() -> None:
    with StrictServer("204") as srv:
        r = run_idle("127.0.0.1", srv.port, "respmod", os.getpid(), 60, batch=25, settle=0.1)
    assert (r.opened, r.answered, r.checked, r.still_alive) == (60, 60, 60, 60)
    assert srv.seen.options == 120


# --- the baselines --------------------------------------------------------------


def test_raw_yara_scans_unique_bodies(tmp_path: Path) -> None:
    (tmp_path / "bench.yar").write_text('rule bench_token { strings: $t = "#bench c1" condition: $t }')
    rs = resolve(str(tmp_path))
    assert rs is not None
    r = run_raw(rs.path, "1k", threads=2, warmup=0.05, duration=0.3)
    assert r.completed > 0
    assert r.matches >= r.completed  # every body carries a token from thread 100+i
    empty = resolve("empty")
    assert empty is not None
    r = run_raw(empty.path, "gzip", threads=1, warmup=0.05, duration=0.3)
    assert r.completed > 0 and r.matches == 0


def test_pyicap_baseline_scans(tmp_path: Path) -> None:
    (tmp_path / "bench.yar").write_text('rule bench_token { strings: $t = "#bench c" condition: $t }')
    with start_pyicap(tmp_path) as srv:
        r = run_load(LoadSpec(srv.host, srv.port, srv.service, "gzip", concurrency=2, clients=1,
                              warmup=0.1, duration=0.5))
        blocked = set(r.statuses)
        r2 = run_load(LoadSpec(srv.host, srv.port, srv.service, "64k", concurrency=2, clients=1,
                               preview=1024, warmup=0.1, duration=0.5))
    # the token is inside the gzip stream: only a decoder that scans finds it
    assert r.errors == 0 and blocked == {200}
    assert r2.errors == 0 and set(r2.statuses) == {200}
    empty = resolve("empty")
    assert empty is not None
    with start_pyicap(empty.path) as srv:
        r3 = run_load(LoadSpec(srv.host, srv.port, srv.service, "1k", concurrency=2, clients=1,
                               warmup=0.1, duration=0.5))
    assert r3.errors == 0 and set(r3.statuses) == {204}


@pytest.mark.cicap
def test_cicap_echo_baseline() -> None:
    try:
        srv = start_cicap()
    except ServerUnavailable as e:
        if os.environ.get("CI"):
            pytest.fail(str(e))
        pytest.skip(str(e))
    with srv:
        assert srv.preview_size == 1024
        plain = run_load(LoadSpec(srv.host, srv.port, srv.service, "64k", concurrency=2,
                                  clients=1, warmup=0.1, duration=0.5))
        preview = run_load(LoadSpec(srv.host, srv.port, srv.service, "1k", concurrency=2,
                                    clients=1, preview=1024, warmup=0.1, duration=0.5))
    # without preview the echo service echoes; with preview it alternates 200 and 204
    assert plain.errors == 0 and set(plain.statuses) == {200}
    assert preview.errors == 0 and set(preview.statuses) == {200, 204}


def test_make_body_names() -> None:
    assert make_body("1k").length == 1024
    assert make_body("20m").length == 20 * 1024 * 1024
    assert make_body("gzip").decoded_length == 1024 * 1024


# --- the report ----------------------------------------------------------------


def _r(target: str, ruleset: str, scenario: str, rps: float, cpu_ms: float,
       pair: str | None = None) -> dict[str, object]:
    return {"target": target, "ruleset": ruleset, "scenario": scenario, "preview": None,
            "rps": rps, "cpu_ms_per_req": cpu_ms, "pair": pair, "mbps": 0.0, "p50_ms": 1.0,
            "p99_ms": 2.0, "completed": int(rps * 3)}


def test_ratios_pair_each_server_with_its_own_raw_row() -> None:
    from benchmarks.runner import Options, Suite, markdown, table

    suite = Suite(Options(), log=lambda _msg: None)
    suite.rows = [
        _r("cicap", "-", "1k", 10000, 0.05),
        _r("raw", "signature-base", "1k", 4000, 0.5, pair="pyicap"),
        _r("pyicap", "signature-base", "1k", 1000, 1.0),
        _r("raw", "signature-base", "1k", 2000, 0.5, pair="gateway"),
        _r("gateway", "signature-base", "1k", 1900, 0.55),
        _r("raw", "empty", "1k", 100000, 0.01, pair="gateway"),
        _r("gateway", "empty", "1k", 6000, 0.3),
    ]
    suite.special = [{"scenario": "idle", "target": "gateway", "requested": 10000, "opened": 10000,
                      "still_alive": 100, "checked": 100, "rss_before_mib": 50.0,
                      "rss_after_mib": 290.0, "kib_per_connection": 24.6},
                     {"scenario": "huge", "target": "gateway", "size": 2 * 1024**3, "status": 204,
                      "seconds": 10.0, "mbps": 214.7, "rss_start_mib": 50.0, "rss_peak_mib": 130.0,
                      "growth_mib": 80.0, "error": None}]
    report = suite.report()
    by = {(x["target"], x["ruleset"]): x for x in report["ratios"]}
    assert by[("pyicap", "signature-base")]["vs_raw"] == pytest.approx(0.25)
    assert by[("gateway", "signature-base")]["vs_raw"] == pytest.approx(0.95)  # its own raw row
    assert by[("gateway", "signature-base")]["cpu_vs_raw"] == pytest.approx(0.5 / 0.55)
    assert by[("gateway", "empty")]["vs_cicap"] == pytest.approx(0.6)
    met = {t["target"]: t["met"] for t in report["targets"]}
    assert met["gateway >= 0.75 x raw YARA req/s, signature-base 1k"] is True
    assert met["gateway empty ruleset 1 KiB >= 0.4 x c-icap echo req/s"] is True
    assert met["gateway empty ruleset 1 KiB server CPU/transaction <= 3 x c-icap's"] is False
    assert met["gateway CPU/transaction <= pyicap's, signature-base 1k"] is True
    assert met["10000 idle connections in < 300 MiB RSS"] is True
    assert met["RSS growth < 64 MiB streaming 2.00 GiB"] is False
    assert "raw>gateway" in table(report) and "| gateway | empty | 1k |" in markdown(report)


def test_cli_options() -> None:
    from benchmarks.__main__ import build_parser, options_from
    from benchmarks.runner import QUICK_SCENARIOS

    o = options_from(build_parser().parse_args(["--quick"]))
    assert o.scenarios == QUICK_SCENARIOS and o.idle == 2000 and o.duration == 2.0
    assert {"up-1k", "block-1k", "webmix"} <= set(o.scenarios) and o.balance == [4, 8]
    o = options_from(build_parser().parse_args(
        ["--scenarios", "none", "--huge", "--huge-size", "1GiB", "--gateway-option",
         "server.workers=2", "--targets", "gateway"]))
    assert o.scenarios == [] and o.huge and o.huge_size == 1024**3
    assert o.gateway_options == {"server": {"workers": 2}} and o.idle_targets == ["gateway"]
    with pytest.raises(SystemExit):
        options_from(build_parser().parse_args(["--scenarios", "2k"]))


def test_raw_yarax_scans_in_worker_processes(tmp_path: Path) -> None:
    from benchmarks.raw_yarax import compile_yarax, run_rawx

    (tmp_path / "bench.yar").write_text(
        'rule bench_token { strings: $t = "#bench c2" condition: $t and filename == "" }')
    blob = compile_yarax(tmp_path)  # the externals are declared as globals
    r = run_rawx(blob, "gzip", processes=2, warmup=0.05, duration=0.3)
    assert r.threads == 2 and r.completed > 0
    assert r.matches >= r.completed  # the token (from worker 200+i) is inside the gzip stream


def test_target_is_unsure_when_raw_yara_did_not_get_its_cores() -> None:
    from benchmarks.runner import Options, Suite

    suite = Suite(Options(), log=lambda _msg: None)
    starved = _r("raw", "signature-base", "1m", 50, 9.0, pair="gateway")
    starved.update(server_cores=0.4, threads=2)
    suite.rows = [starved, _r("gateway", "signature-base", "1m", 80, 12.0)]
    (t,) = suite.targets(suite.ratios())
    assert t["goal"] == 0.75  # the rows carry no body size: taken as small
    assert t["value"] == pytest.approx(1.6) and t["met"] is None
    assert "0.40 of its 2 cores" in t["why"] and t["cpu_value"] == pytest.approx(0.75)
