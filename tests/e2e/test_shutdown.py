"""SIGTERM under load loses no request; a restart next to a broken rule file
serves the last good rules instead of crash-looping.  A real gateway process
(one worker, and a supervisor with two), real sockets, no external peer."""

from __future__ import annotations

import re
import signal
import socket
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.icap_responses import parse_responses
from tests.peers import REPO, gateway_process

# Enough concurrent work that the gateway is still busy when the signal lands:
# each body is spooled, scanned and echoed back whole (no Allow: 204).
CLIENTS = 24
BODY_SIZE = 1024 * 1024

REQ_HDR = b"GET http://example.com/big.bin HTTP/1.1\r\nHost: example.com\r\n\r\n"


def _respmod(body: bytes) -> bytes:
    res_hdr = b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: %d\r\n\r\n" % len(body)
    head = (
        "RESPMOD icap://127.0.0.1/respmod ICAP/1.0\r\nHost: 127.0.0.1\r\n"
        f"Encapsulated: req-hdr=0, res-hdr={len(REQ_HDR)}, res-body={len(REQ_HDR) + len(res_hdr)}\r\n\r\n"
    ).encode()
    return head + REQ_HDR + res_hdr + b"%x\r\n" % len(body) + body + b"\r\n0\r\n\r\n"


def _complete(data: bytes) -> bool:
    """One whole answer carrying the whole body back."""
    try:
        [answer] = parse_responses(data)
    except (ValueError, KeyError, IndexError, AssertionError):
        return False
    return answer.status == 200 and answer.body is not None and len(answer.body) == BODY_SIZE


def _children(pid: int) -> list[int]:
    import subprocess

    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


def _readyz(metrics_port: int) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/readyz", timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()
    except OSError as e:  # not listening yet
        return 0, str(e)


def _wait_ready(metrics_port: int, timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    status, text = 0, ""
    while time.monotonic() < deadline:
        status, text = _readyz(metrics_port)
        if status == 200:
            return text
        time.sleep(0.1)
    raise AssertionError(f"not ready within {timeout}s: {status} {text}")


@pytest.mark.parametrize("workers", [1, 2])
def test_sigterm_under_load_answers_every_request_sent(workers: int) -> None:
    body = bytes(range(256)) * (BODY_SIZE // 256)
    request = _respmod(body)
    with gateway_process(settings={"server": {"workers": workers}}) as gw:
        _wait_ready(gw.metrics_port)
        sent = threading.Barrier(CLIENTS + 1)
        answers: list[bytes] = [b""] * CLIENTS

        def client(i: int) -> None:
            with socket.create_connection(("127.0.0.1", gw.port), timeout=60) as s:
                s.sendall(request)
                sent.wait()
                chunks = []
                while True:  # the last answer of a connection closes it
                    try:
                        data = s.recv(1 << 20)
                    except OSError:
                        break
                    if not data:
                        break
                    chunks.append(data)
                answers[i] = b"".join(chunks)

        threads = [threading.Thread(target=client, args=(i,)) for i in range(CLIENTS)]
        for t in threads:
            t.start()
        sent.wait(timeout=60)  # every request is fully sent: now stop the gateway
        gw.proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(90)
        code = gw.proc.wait(90)
        lost = sum(1 for a in answers if not _complete(a))
        print(f"workers={workers}: {CLIENTS} requests in flight at SIGTERM, {lost} lost")
        assert lost == 0, gw.log()[-3000:]
        assert code == 0
        assert "every connection finished" in gw.log()
        # Stopped accepting: nothing listens any more.
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", gw.port), timeout=2).close()


def test_restart_next_to_a_broken_rule_file_serves_the_last_good_rules(tmp_path: Path) -> None:
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "eicar.yar").write_bytes((REPO / "rules" / "eicar.yar").read_bytes())
    settings = {"server": {"workers": 2}, "scan": {"rules": str(rules), "reload_interval": "200ms"}}
    with gateway_process(rules=rules, settings=settings) as gw:
        assert "2 of 2 workers ready" in _wait_ready(gw.metrics_port)
        (rules / "broken.yar").write_text("rule broken { condition: }\n")
        deadline = time.monotonic() + 30
        while gw.log().count("rules not reloaded") < 2 and time.monotonic() < deadline:
            time.sleep(0.1)  # both running workers refused it and kept their rules
        assert gw.log().count("rules not reloaded") >= 2
        [victim, *_] = _children(gw.proc.pid)
        signal_sent = time.monotonic()
        import os

        os.kill(victim, signal.SIGKILL)
        deadline = signal_sent + 30
        while time.monotonic() < deadline:
            kids = _children(gw.proc.pid)
            if len(kids) == 2 and victim not in kids and "serving the last good set" in gw.log():
                break
            time.sleep(0.1)
        assert "serving the last good set" in gw.log(), gw.log()[-3000:]
        # The restarted worker logs that while it loads, before it listens and
        # says it is ready; /readyz answers 200 already with the other one.
        deadline = time.monotonic() + 30
        while "2 of 2 workers ready" not in _wait_ready(gw.metrics_port, timeout=30) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert "2 of 2 workers ready" in _wait_ready(gw.metrics_port, timeout=30), gw.log()[-3000:]
        time.sleep(3)  # before: a restart every second
        text = urllib.request.urlopen(f"http://127.0.0.1:{gw.metrics_port}/metrics", timeout=10).read().decode()
        restarts = re.search(r"^icap_gateway_worker_restarts_total (\S+)$", text, re.M)
        assert restarts is not None and float(restarts.group(1)) == 1.0
        assert len(_children(gw.proc.pid)) == 2


def test_workers_log_the_endpoint_they_adopted(tmp_path: Path) -> None:
    import subprocess
    import sys

    log_path = tmp_path / "gateway.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gateway", "serve", "--workers", "2", "--rules", str(REPO / "rules"),
             "--listen", "tcp:0:interface=127.0.0.1", "--metrics", "tcp:0:interface=127.0.0.1"],
            stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path,
        )
    try:
        deadline = time.monotonic() + 60
        while log_path.read_text().count("icap-gateway serving on") < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        text = log_path.read_text()
        [bound] = re.findall(r"supervising 2 workers on tcp:(\d+):interface=127\.0\.0\.1", text)
        served = re.findall(r"icap-gateway serving on (\S+),", text)
        # Before: each worker printed the config's default, tcp:1344:interface=127.0.0.1.
        assert served == [f"tcp:{bound}:interface=127.0.0.1"] * 2, text
        assert bound != "0"
    finally:
        proc.terminate()
        proc.wait(60)
