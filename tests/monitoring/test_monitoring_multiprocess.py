"""Several worker processes: prometheus_client multiprocess mode sums them.

Each worker runs in its own subprocess (multiprocess mode switches
prometheus_client's value storage for the whole process, so it must not
happen inside the test process).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer
from twisted.web.client import Agent, readBody

from gateway.config import GatewayConfig
from monitoring.metrics import (
    MultiProcessRegistry,
    drop_stale_gauges,
    prepare_multiprocess_dir,
    worker_exited,
)
from monitoring.service import build_metrics_service
from monitoring.settings import MonitoringSettings

WORKER = textwrap.dedent("""
    import json, os, sys
    from twisted.internet import task
    from gateway.config import GatewayConfig, ServerSettings
    from gateway.interfaces import TransactionRecord, Verdict
    from monitoring.service import build_monitoring
    from monitoring.settings import MonitoringSettings

    state_dir, tenant, rules, depth, errors = sys.argv[1:6]
    config = GatewayConfig(
        server=ServerSettings(state_dir=state_dir, workers=2),
        # as gateway.workers' supervisor hands it to its workers
        monitoring=MonitoringSettings(access_log="none",
                                      multiprocess_dir=os.path.join(state_dir, "prometheus")),
    )
    clock = task.Clock()
    c = build_monitoring(config, clock, ready=lambda: (True, ""),
                         queue_depth=lambda: int(depth), write_errors=lambda: int(errors),
                         serve_http=False)
    c.service.startService()  # starts the register refresh loop on the clock
    c.observer.connection_opened()
    c.observer.connection_opened()
    c.observer.connection_closed()
    c.observer.transaction_finished(TransactionRecord(
        started=0.0, duration=0.02, method="RESPMOD", service="yara", icap_status=200,
        client_ip="10.0.0.1", peer="127.0.0.1", tenant=tenant, outcome="clean"))
    c.observer.scan_finished(Verdict("clean", scanned_bytes=1000, duration=0.01), "response")
    c.observer.rules_loaded(True, int(rules), "v")
    clock.advance(1.0)
    print(json.dumps({"pid": os.getpid(), "env": os.environ["PROMETHEUS_MULTIPROC_DIR"],
                      "own": c.registry.get_sample_value("icap_gateway_connections_total")}), flush=True)
    sys.stdin.read()  # stay alive (a running worker) until the test closes stdin
""")


class Worker:
    """A worker process that stays alive until :meth:`exit`."""

    def __init__(self, state_dir: Path, tenant: str, rules: int, depth: int, errors: int) -> None:
        env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
        self.proc = subprocess.Popen(
            [sys.executable, "-c", WORKER, str(state_dir), tenant, str(rules), str(depth), str(errors)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise AssertionError(self.proc.communicate(timeout=30)[1])
        self.info = json.loads(line)
        self.pid = int(self.info["pid"])

    def exit(self) -> None:
        self.proc.communicate(timeout=30)


def run_worker(state_dir: Path, tenant: str, rules: int, depth: int, errors: int) -> dict[str, object]:
    w = Worker(state_dir, tenant, rules, depth, errors)
    w.exit()
    return w.info


def test_workers_are_summed(tmp_path: Path) -> None:
    mp_dir = tmp_path / "prometheus"
    prepare_multiprocess_dir(str(mp_dir))
    (mp_dir / "counter_99999.db").write_bytes(b"stale")  # a previous run's file
    prepare_multiprocess_dir(str(mp_dir))
    assert list(mp_dir.iterdir()) == []

    a = Worker(tmp_path, "acme", rules=100, depth=4, errors=1)
    b = Worker(tmp_path, "beta", rules=90, depth=6, errors=2)
    try:
        assert a.info["env"] == str(mp_dir)
        registry = MultiProcessRegistry(str(mp_dir))

        def v(name: str, **labels: str) -> float | None:
            return registry.get_sample_value(name, labels)

        assert v("icap_gateway_requests_total", method="RESPMOD", service="yara", tenant="acme",
                 outcome="clean") == 1
        assert v("icap_gateway_requests_total", method="RESPMOD", service="yara", tenant="beta",
                 outcome="clean") == 1
        assert v("icap_gateway_connections_total") == 4
        assert v("icap_gateway_request_duration_seconds_count", method="RESPMOD") == 2
        assert v("icap_gateway_scanned_bytes_total", direction="response") == 2000
        assert v("icap_gateway_active_connections") == 2  # livesum: 1 + 1
        assert v("icap_gateway_rules_loaded") == 90  # livemin: the worker with fewer rules shows
        assert v("icap_gateway_register_queue_depth") == 10  # livesum
        assert v("icap_gateway_register_write_errors_total") == 3

        # a worker that died takes its live gauges with it; its counters stay
        a.exit()
        worker_exited(a.pid, str(mp_dir))
        assert v("icap_gateway_active_connections") == 1
        assert v("icap_gateway_register_queue_depth") == 6
        assert v("icap_gateway_rules_loaded") == 90
        assert v("icap_gateway_connections_total") == 4
    finally:
        if a.proc.returncode is None:
            a.exit()
        b.exit()

    # b died unannounced (no worker_exited): the next worker to start drops
    # its live gauges, so they do not haunt the sums; counters stay monotonic.
    c = Worker(tmp_path, "acme", rules=120, depth=5, errors=0)
    try:
        assert v("icap_gateway_active_connections") == 1
        assert v("icap_gateway_register_queue_depth") == 5
        assert v("icap_gateway_rules_loaded") == 120
        assert v("icap_gateway_connections_total") == 6
    finally:
        c.exit()


def test_same_pid_does_not_inherit_gauges(tmp_path: Path) -> None:
    # A gauge file under this very pid can only be a previous process's.
    mp_dir = tmp_path / "prometheus"
    prepare_multiprocess_dir(str(mp_dir))
    run_worker(tmp_path, "acme", rules=1, depth=0, errors=0)
    [old] = [p for p in mp_dir.iterdir() if p.name.startswith("gauge_livesum_")]
    mine = mp_dir / f"gauge_livesum_{os.getpid()}.db"
    old.rename(mine)
    drop_stale_gauges(str(mp_dir))
    assert not mine.exists()
    assert any(p.name.startswith("counter_") for p in mp_dir.iterdir())


@pytest.mark.filterwarnings("ignore:Using readBody with a transport:DeprecationWarning")
@pytest_twisted.inlineCallbacks
def test_parent_serves_the_sum_of_its_workers(tmp_path: Path) -> Any:
    from twisted.internet import reactor

    mp_dir = tmp_path / "prometheus"
    prepare_multiprocess_dir(str(mp_dir))
    workers = [Worker(tmp_path, "acme", rules=100, depth=1, errors=0),
               Worker(tmp_path, "acme", rules=100, depth=2, errors=0)]
    config = GatewayConfig(monitoring=MonitoringSettings(metrics_listen="tcp:0:interface=127.0.0.1"))
    service = build_metrics_service(config, reactor, ready=lambda: (True, "workers up"),
                                    multiprocess_dir=str(mp_dir))
    service.startService()
    try:
        port = yield service.whenListening()
        base = f"http://127.0.0.1:{port.getHost().port}"
        response = yield Agent(reactor).request(b"GET", (base + "/metrics").encode())
        body = (yield readBody(response)).decode()
        ready = yield Agent(reactor).request(b"GET", (base + "/readyz").encode())
        ready_body = (yield readBody(ready)).decode()
    finally:
        yield defer.maybeDeferred(service.stopService)
        for w in workers:
            w.exit()
    assert response.code == 200
    assert ('icap_gateway_requests_total{method="RESPMOD",outcome="clean",service="yara",tenant="acme"} 2.0'
            in body)
    assert "icap_gateway_register_queue_depth 3.0" in body
    assert "icap_gateway_rules_loaded 100.0" in body  # the parent adds no zero of its own
    assert "process_cpu_seconds_total" not in body
    assert (ready.code, ready_body) == (200, "ready: workers up\n")
