"""Several worker processes share the listener; /metrics sums them."""

from __future__ import annotations

import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from tests.peers import EICAR, gateway_process, require_binary

pytestmark = pytest.mark.cicap


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


def test_two_workers_serve_and_metrics_sum_them(tmp_path: Path) -> None:
    client = require_binary("c-icap-client")
    with gateway_process(settings={"server": {"workers": 2}}) as gw:
        deadline = time.monotonic() + 20
        while len(_children(gw.proc.pid)) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(_children(gw.proc.pid)) == 2
        sample = tmp_path / "eicar.com"
        sample.write_bytes(EICAR)
        for _ in range(20):
            result = subprocess.run([client, "-i", "127.0.0.1", "-p", str(gw.port), "-s", "respmod",
                                     "-f", str(sample), "-v"], stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True, timeout=30)
            assert "X-Infection-Found" in result.stdout
        # Each worker flushes its counters to the shared files; the parent sums them.
        text = urllib.request.urlopen(f"http://127.0.0.1:{gw.metrics_port}/metrics", timeout=10).read().decode()
        blocked = [line for line in text.splitlines()
                   if line.startswith("icap_gateway_requests_total{") and 'outcome="blocked"' in line]
        assert blocked and sum(float(line.rsplit(" ", 1)[1]) for line in blocked) == 20.0
        ready = urllib.request.urlopen(f"http://127.0.0.1:{gw.metrics_port}/readyz", timeout=10).read().decode()
        assert "2 of 2 workers" in ready
        # a worker that dies is replaced
        victim = _children(gw.proc.pid)[0]
        subprocess.run(["kill", "-KILL", str(victim)], check=True)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            kids = _children(gw.proc.pid)
            if len(kids) == 2 and victim not in kids:
                break
            time.sleep(0.1)
        assert len(kids) == 2 and victim not in kids


def test_supervisor_refuses_broken_rules_once(tmp_path: Path) -> None:
    import sys

    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "broken.yar").write_text("rule broken { condition: }\n")
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "serve", "--workers", "2", "--rules", str(rules),
         "--listen", "tcp:0:interface=127.0.0.1", "--metrics", "tcp:0:interface=127.0.0.1"],
        capture_output=True, text=True, timeout=60, cwd=tmp_path,
    )
    assert result.returncode == 1
    assert f"{rules / 'broken.yar'}:1:" in result.stderr
