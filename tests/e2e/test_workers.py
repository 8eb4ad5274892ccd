"""Several worker processes share the listener; /metrics sums them."""

from __future__ import annotations

import re
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from gateway.alloc import TCACHE_COUNT
from tests.peers import EICAR, gateway_process, require_binary

pytestmark = pytest.mark.cicap


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


def _libraries(pid: int) -> str:
    return Path(f"/proc/{pid}/maps").read_text()


def _tunables(pid: int) -> str | None:
    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    found = [item.partition(b"=")[2].decode() for item in environ if item.startswith(b"GLIBC_TUNABLES=")]
    return found[0] if found else None


def test_a_single_process_gateway_starts_again_with_the_thread_cache() -> None:
    client = require_binary("c-icap-client")
    with gateway_process(settings={"server": {"workers": 1}}) as gw:
        assert _tunables(gw.proc.pid) == f"glibc.malloc.tcache_count={TCACHE_COUNT}"  # the same pid
        result = subprocess.run([client, "-i", "127.0.0.1", "-p", str(gw.port), "-s", "respmod", "-v"],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=30)
        assert "ICAP/1.0 200" in result.stdout  # OPTIONS


def _assert_supervisor_is_lean(supervisor: int, workers: list[int]) -> None:
    """The supervisor never scans nor opens the register: YARA and the
    register's modules stay out of it, about 45 MiB of a worker's baseline;
    the workers load YARA.  psycopg (its compiled library shows in the memory
    map) is for a PostgreSQL register only: not loaded with this SQLite one."""
    for worker in workers:
        assert "/yara" in _libraries(worker)
        assert "psycopg" not in _libraries(worker)
    assert "/yara" not in _libraries(supervisor)
    assert "psycopg" not in _libraries(supervisor)


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
        _assert_supervisor_is_lean(gw.proc.pid, _children(gw.proc.pid))  # every worker is serving now
        for worker in _children(gw.proc.pid):  # YARA on their reactor threads needs it (gateway.alloc)
            assert _tunables(worker) == f"glibc.malloc.tcache_count={TCACHE_COUNT}"
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


@pytest.mark.parametrize("connections", [4, 8])
def test_persistent_connections_spread_evenly_over_the_workers(connections: int) -> None:
    """Squid's few long-lived connections: before (each worker accepting on the
    shared listener) 6/2 splits of 8 and 4/0 of 4 were common; now the
    supervisor hands each to the worker holding the fewest."""
    from benchmarks.worker_split import TARGET_SHARE, one_run, worker_connections
    from tests.e2e.test_shutdown import _wait_ready

    requests = 5
    with gateway_process(settings={"server": {"workers": 2}}) as gw:
        assert "2 of 2 workers ready" in _wait_ready(gw.metrics_port)
        for _ in range(5):
            split, answered = one_run(gw.port, gw.metrics_port, connections, requests)
            assert answered == connections * requests
            assert len(split) == 2 and sum(split) == connections
            # each connection carried the same requests: a worker's share of
            # the connections is its share of the requests
            assert split[0] / connections <= TARGET_SHARE, split
        assert worker_connections(gw.metrics_port) == {0: 0, 1: 0}
        text = urllib.request.urlopen(f"http://127.0.0.1:{gw.metrics_port}/metrics", timeout=10).read().decode()
        handed = re.search(r"^icap_gateway_handoffs_total (\S+)$", text, re.M)
        # (and the start-up probes' connections)
        assert handed is not None and float(handed.group(1)) >= 5 * connections


def test_unix_listener_connections_are_handed_off(tmp_path: Path) -> None:
    import socket

    from tests.e2e.test_shutdown import _wait_ready
    from tests.peers import GatewayProcess

    path = tmp_path / "icap.sock"

    def add_unix_listener(gw: GatewayProcess) -> None:
        tcp = f'"tcp:{gw.port}:interface=127.0.0.1"'
        gw.config_path.write_text(gw.config_path.read_text().replace(tcp, f'{tcp}, "unix:{path}"'))

    with gateway_process(settings={"server": {"workers": 2}}, before_start=add_unix_listener) as gw:
        _wait_ready(gw.metrics_port)
        for _ in range(4):  # to both workers
            with socket.socket(socket.AF_UNIX) as s:
                s.settimeout(30)
                s.connect(str(path))
                s.sendall(b"OPTIONS icap://localhost/respmod ICAP/1.0\r\nHost: localhost\r\n"
                          b"Encapsulated: null-body=0\r\n\r\n")
                assert s.recv(4096).startswith(b"ICAP/1.0 200 ")
