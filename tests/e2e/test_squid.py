"""Real Squid in front of the gateway: curl -> Squid -> icap-gateway -> YARA."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.peers import (
    EICAR,
    GatewayProcess,
    Origin,
    SquidProcess,
    curl,
    gateway_process,
    gzipped,
    proc_status,
    read_json_lines,
    squid_process,
    wait_for,
)

pytestmark = pytest.mark.squid



@pytest.fixture(scope="module")
def gateway() -> Iterator[GatewayProcess]:
    with gateway_process(auth_required=False) as gw:
        yield gw


@pytest.fixture(scope="module")
def squid(gateway: GatewayProcess) -> Iterator[SquidProcess]:
    with squid_process(gateway.port) as sq:
        yield sq


def test_clean_download_is_byte_identical(squid: SquidProcess, origin: Origin) -> None:
    body = os.urandom(10_000)
    url = origin.add("/clean.bin", body)
    got = curl(squid.port, url)
    assert got.status == 200
    assert got.body == body


def test_eicar_download_is_blocked_with_block_page(squid: SquidProcess, origin: Origin,
                                                    gateway: GatewayProcess) -> None:
    url = origin.add("/eicar.com", EICAR, Content_Type="application/octet-stream")
    got = curl(squid.port, url)
    assert got.status == 403
    assert b"This content was blocked" in got.body
    assert b"EICAR" in got.body  # the rule's name
    assert url.encode() in got.body
    assert EICAR not in got.body


def test_upload_with_signature_is_blocked_through_reqmod(squid: SquidProcess, origin: Origin) -> None:
    before = len(origin.uploads)
    url = f"http://127.0.0.1:{origin.port}/upload"
    got = curl(squid.port, url, data=b"form data " + EICAR + b" more")
    assert got.status == 403
    assert b"This content was blocked" in got.body
    assert len(origin.uploads) == before  # it never reached the server


def test_clean_upload_reaches_origin_intact(squid: SquidProcess, origin: Origin) -> None:
    payload = os.urandom(200_000)
    got = curl(squid.port, f"http://127.0.0.1:{origin.port}/upload", data=payload)
    assert got.status == 200 and got.body == b"stored"
    assert origin.uploads[-1] == payload


def test_gzip_encoded_signature_is_blocked(squid: SquidProcess, origin: Origin) -> None:
    hidden = gzipped(b"<html>" + b"padding " * 500 + EICAR + b"</html>")
    assert EICAR not in hidden
    url = origin.add("/hidden.html", hidden, Content_Type="text/html", Content_Encoding="gzip")
    got = curl(squid.port, url)
    assert got.status == 403
    assert b"This content was blocked" in got.body


def test_gzip_bomb_and_trailing_bytes_are_blocked(squid: SquidProcess, origin: Origin) -> None:
    # gzip(10 MiB of zeros + EICAR), ~10 KiB on the wire, passed as
    # "unscanned; decode-limit"; EICAR after a gzip stream was never scanned.
    bomb = gzipped(bytes(10 * 1024**2) + EICAR)
    url = origin.add("/bomb.html", bomb, Content_Type="text/html", Content_Encoding="gzip")
    got = curl(squid.port, url)
    assert got.status == 403
    assert b"decompression bomb" in got.body
    tail = gzipped(b"<html>ok</html>") + EICAR
    url = origin.add("/tail.html", tail, Content_Type="text/html", Content_Encoding="gzip")
    got = curl(squid.port, url)
    assert got.status == 403
    assert b"This content was blocked" in got.body


def test_clean_gzip_passes_still_encoded(squid: SquidProcess, origin: Origin) -> None:
    encoded = gzipped(b"hello " * 20_000)
    url = origin.add("/text.html", encoded, Content_Type="text/html", Content_Encoding="gzip")
    got = curl(squid.port, url)
    assert got.status == 200
    assert got.body == encoded  # the original bytes, not the decoded ones
    assert "content-encoding: gzip" in got.headers.lower()


def test_clean_response_over_64k_passes_intact(squid: SquidProcess, origin: Origin) -> None:
    body = os.urandom(300 * 1024)
    url = origin.add("/big.bin", body)
    got = curl(squid.port, url)
    assert got.status == 200
    assert got.body == body


def test_large_infected_download_is_cut_off(squid: SquidProcess, origin: Origin, gateway: GatewayProcess) -> None:
    """Past early_response_after the head is already out (Squid 5 needs it,
    bug 5352), so a match can only abort the response: the client must get
    an incomplete transfer that never holds the signature."""
    body = os.urandom(400 * 1024) + EICAR
    url = origin.add("/infected-large.bin", body)
    got = curl(squid.port, url, check=False)
    assert got.exit_code != 0 or got.status != 200 or len(got.body) < len(body)
    assert EICAR not in got.body
    assert len(got.body) < 64 * 1024


def test_50mb_response_passes_intact_with_flat_memory(squid: SquidProcess, origin: Origin,
                                                      gateway: GatewayProcess, tmp_path: Path) -> None:
    size = 50 * 1024 * 1024
    block = os.urandom(1024 * 1024)

    def chunks() -> Iterator[bytes]:
        for _ in range(size // len(block)):
            yield block

    url = origin.add_stream("/huge.bin", size, chunks)
    # Warm up so one-time allocations (imports, pools) are not counted.
    curl(squid.port, origin.add("/warm.bin", os.urandom(2 * 1024 * 1024)))
    baseline = proc_status(gateway.proc.pid)["RssAnon"]
    peak = [baseline]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], proc_status(gateway.proc.pid)["RssAnon"])
            time.sleep(0.02)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        out = tmp_path / "huge.out"
        got = curl(squid.port, url, output=out)
    finally:
        stop.set()
        sampler.join()
    assert got.status == 200
    assert out.stat().st_size == size
    with open(out, "rb") as f:
        for _ in range(size // len(block)):
            assert f.read(len(block)) == block
    growth = peak[0] - baseline
    # The body spools to disk and streams back: anonymous memory must not
    # grow with the body (50 MiB); a few MiB of buffers is the budget.
    assert growth < 16 * 1024 * 1024, f"gateway anonymous memory grew by {growth / 2**20:.1f} MiB"


def test_access_log_shows_squid_transactions(squid: SquidProcess, origin: Origin, gateway: GatewayProcess) -> None:
    url = origin.add("/logged.txt", b"just text")
    curl(squid.port, url)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        lines = [r for r in read_json_lines(gateway.access_log) if r.get("url") == url]
        if any(r.get("method") == "RESPMOD" for r in lines):  # lines come in batches, up to 200 ms late
            break
        time.sleep(0.1)
    assert lines, gateway.log()
    assert lines[-1]["method"] == "RESPMOD" and lines[-1]["outcome"] == "clean"


def test_squid_reported_no_icap_errors(squid: SquidProcess) -> None:
    log = squid.cache_log()
    assert "essential ICAP service is down" not in log
    assert "suspended" not in log, log[-3000:]


def test_readme_shows_the_tested_squid_snippet() -> None:
    """The squid.conf lines the README tells admins to paste are the lines
    these tests run Squid with."""
    from tests.peers import REPO, SQUID_SNIPPET

    readme = (REPO / "README.md").read_text()
    snippet = SQUID_SNIPPET.read_text().strip().splitlines()
    indented = "\n".join(f"   {line}" for line in snippet)
    assert indented in readme


def test_finnish_reader_gets_the_finnish_block_page(squid: SquidProcess, origin: Origin) -> None:
    url = origin.add("/eicar-fi.com", EICAR, Content_Type="application/octet-stream")
    got = curl(squid.port, url, extra_headers=["Accept-Language: fi-FI,fi;q=0.9,en;q=0.8"])
    assert got.status == 403
    assert "Sisältö estettiin" in got.body.decode()
    assert "content-language: fi" in got.headers.lower()
    assert b"EICAR" in got.body


def test_a_cut_download_tried_again_gets_the_block_page(squid: SquidProcess, origin: Origin,
                                                        gateway: GatewayProcess) -> None:
    """Issue 10, "done when": a 1 MiB file with a signature near its end,
    downloaded twice through Squid 5.7: the first is cut (bug 5352), the
    second is the block page naming the rule (the late-block memory)."""
    body = os.urandom(1024**2 - 4096) + EICAR + os.urandom(2048)
    url = origin.add("/late-block.bin", body)
    first = curl(squid.port, url, check=False)
    assert first.exit_code != 0 or first.status != 200 or len(first.body) < len(body)
    assert EICAR not in first.body
    second = curl(squid.port, url, check=False)
    assert second.status == 403
    assert b"This content was blocked" in second.body
    assert b"EICAR" in second.body  # the rule's name
    assert url.encode() in second.body
    lines = wait_for(lambda: [rec for rec in read_json_lines(gateway.access_log)
                              if "late-block" in str(rec.get("detail", ""))])
    assert lines, "the access log shows no late-block answer"
