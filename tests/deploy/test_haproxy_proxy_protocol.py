"""Real HAProxy, running deploy/haproxy.cfg pointed at a real gateway that
listens with ``haproxy:``: the gateway sees each client's own address (sent
with send-proxy-v2), not HAProxy's, so a client sending wrong keys is rate
limited alone.  The clients connect from two loopback addresses (127.0.0.2
and 127.0.0.3) while HAProxy connects to the gateway from 127.0.0.1."""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import tempfile
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.deploy.test_deploy_files import HAPROXY_CFG
from tests.e2e.test_proxy_protocol import BURST, WRONG_KEY, Proxy, _bootstrap, failures
from tests.e2e.test_shutdown import _wait_ready
from tests.peers import (
    GatewayProcess,
    free_port,
    gateway_process,
    require_binary,
    stop_process,
    wait_for,
    wait_for_port,
)

pytestmark = pytest.mark.haproxy

SQUID_A, SQUID_B = "127.0.0.2", "127.0.0.3"


def haproxy_config(gw: GatewayProcess, port: int, stats_socket: Path) -> str:
    """deploy/haproxy.cfg with this test's addresses: the bind, one server
    (the gateway); in the foreground as the test's user, logging to stderr,
    and a maxconn within a test machine's file descriptor limit."""
    text = HAPROXY_CFG.read_text()
    text = re.sub(r"^\s*(user|group) .*\n", "", text, flags=re.M)
    text = re.sub(r"log /dev/log", "log stderr format raw", text)
    text = re.sub(r"maxconn \d+", "maxconn 1000", text)
    text = text.replace("bind :1344", f"bind 127.0.0.1:{port}")
    text = re.sub(r"check port \d+", f"check port {gw.metrics_port}", text)
    text = re.sub(r"^(\s*server .*\n)+", f"    server node1 127.0.0.1:{gw.port}\n", text, flags=re.M)
    return text.replace("global\n", f"global\n    stats socket {stats_socket} level admin\n", 1)


@pytest.fixture(scope="module")
def farm() -> Iterator[tuple[GatewayProcess, int, Path]]:
    haproxy = require_binary("haproxy")
    with gateway_process(auth_required=True, before_start=_bootstrap, proxy_protocol=True,
                         settings={"server": {"workers": 2},
                                   "auth": {"failure_burst": BURST, "failure_interval": "1h"}}) as gw:
        # HAProxy counts a server UP before its first check: start it only once
        # the gateway is ready, or its first checks (503 while the workers
        # load) mark the node down and cut the test's connections.
        _wait_ready(gw.metrics_port)
        workdir = Path(tempfile.mkdtemp(prefix="haproxy-"))
        port = free_port()
        stats = workdir / "stats.sock"
        cfg = workdir / "haproxy.cfg"
        cfg.write_text(haproxy_config(gw, port, stats))
        log = workdir / "haproxy.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen([haproxy, "-db", "-f", str(cfg)], stdout=out, stderr=subprocess.STDOUT)
        try:
            wait_for_port(port, proc, what="haproxy", log=log)
            # Ready once the health check (GET /readyz on the metrics port) passed.
            up = wait_for(lambda: b"node1,UP" in _stat(stats), timeout=30)
            assert up, (_stat(stats), log.read_text(errors="replace"))
            yield gw, port, stats
        finally:
            stop_process(proc)
            shutil.rmtree(workdir, ignore_errors=True)


def _stat(sock_path: Path) -> bytes:
    """``show stat`` rows on HAProxy's admin socket, reduced to name,status."""
    try:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(5)
            s.connect(str(sock_path))
            s.sendall(b"show stat\n")
            data = b""
            while chunk := s.recv(65536):
                data += chunk
    except OSError:
        return b""
    rows = [line.split(b",") for line in data.splitlines() if line and not line.startswith(b"#")]
    return b"\n".join(b"%s,%s" % (r[1], r[17]) for r in rows if len(r) > 17)


def connect_from(source: str, port: int) -> Proxy:
    """A Proxy whose connection to HAProxy comes from ``source``; HAProxy
    writes the PROXY header itself, so ours is empty."""
    proxy = Proxy.__new__(Proxy)
    proxy.sock = socket.create_connection(("127.0.0.1", port), timeout=30, source_address=(source, 0))
    proxy.buffer = b""
    return proxy


def test_gateway_behind_real_haproxy_sees_each_client(farm: tuple[GatewayProcess, int, Path]) -> None:
    gw, port, _ = farm
    key = gw.key  # type: ignore[attr-defined]
    wrong = connect_from(SQUID_A, port)
    try:
        assert [wrong.status(WRONG_KEY) for _ in range(BURST + 1)] == [403] * (BURST + 1)
        assert wrong.status(key) == 403  # limited now, even with the right key
    finally:
        wrong.close()
    other = connect_from(SQUID_B, port)
    try:
        assert other.status(key) == 204  # through the same HAProxy, another client: served
    finally:
        other.close()
    recorded = wait_for(lambda: [f for f in failures(gw) if f["source_ip"] == SQUID_A], timeout=15)
    assert [f["reason"] for f in recorded] == ["unknown-key"] * BURST + ["rate-limited"]
    sources = {f["source_ip"] for f in failures(gw)}
    assert "127.0.0.1" not in sources and SQUID_B not in sources  # HAProxy's own address is never blamed


def test_haproxy_health_check_reads_readyz(farm: tuple[GatewayProcess, int, Path]) -> None:
    """The node is UP by HAProxy's own check (GET /readyz on the metrics port,
    which speaks no PROXY protocol), and /readyz says why."""
    gw, _, stats = farm
    assert b"node1,UP" in _stat(stats)
    ready = urllib.request.urlopen(f"http://127.0.0.1:{gw.metrics_port}/readyz", timeout=10)
    assert ready.status == 200
