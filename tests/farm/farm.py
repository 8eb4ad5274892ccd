"""A whole farm on 127.0.0.1, from scratch: two gateway nodes (each its own
state and rules directory, both on one fresh PostgreSQL schema, listening
with the PROXY protocol), real HAProxy running deploy/haproxy.cfg with this
farm's ports, and real Squid (Basic auth, so requests carry users) in front.

Node 2 reaches PostgreSQL through a TCPForwarder, so a test can cut its link
to the database alone.  Every load loop is bounded in count and in time."""

from __future__ import annotations

import base64
import contextlib
import http.client
import json
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from sqlalchemy import create_engine, text

from tests.deploy.test_deploy_files import HAPROXY_CFG
from tests.deploy.test_haproxy_proxy_protocol import _stat
from tests.e2e.test_proxy_protocol import Proxy, v1_header
from tests.peers import (
    REPO,
    GatewayProcess,
    Origin,
    SquidProcess,
    TCPForwarder,
    free_port,
    require_binary,
    squid_basic_auth,
    squid_process,
    stop_process,
    wait_for,
    wait_for_port,
    write_gateway_config,
)
from tests.register.conftest import _pg_admin, drop_pg_schema, new_pg_schema, pg_url

USERS = ("alice", "bob", "carol", "dave")
# Node settings: rules checked often (rolling updates show quickly); the
# key refresh timer at an hour, so key changes arrive by LISTEN/NOTIFY.
# Connection recycling as the shipped farm node config sets it.
_DEPLOY_NODE = tomllib.loads((Path(__file__).resolve().parents[2] / "deploy" / "gateway.toml").read_text())
NODE_SETTINGS: dict[str, dict[str, object]] = {
    "server": {"workers": 1, "max_connection_age": _DEPLOY_NODE["server"]["max_connection_age"]},
    "scan": {"reload_interval": "200ms", "threads": 1},
    "auth": {"refresh_interval": "1h"},
    "register": {"flush_interval": "200ms"},
}
# HAProxy's detection of a dead node: fall 2 checks, inter 1 s, plus one
# check's timeout (3 s) for a check under way when the node died.
DETECTION_WINDOW = 2 * 1.0 + 3.0


@dataclass
class Node:
    name: str
    gw: GatewayProcess

    @property
    def port(self) -> int:
        return self.gw.port

    def start(self) -> None:
        with open(self.gw.log_path, "ab") as log:
            self.gw.proc = subprocess.Popen(
                [sys.executable, "-m", "gateway", "serve", "--config", str(self.gw.config_path)],
                stdout=log, stderr=subprocess.STDOUT, cwd=self.gw.workdir)
        wait_for_port(self.port, self.gw.proc, what=f"gateway {self.name}", log=self.gw.log_path)

    def kill9(self) -> None:
        self.gw.proc.kill()
        self.gw.proc.wait()

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.gw.metrics_port}/metrics", timeout=5) as r:
            return r.read().decode()

    def metric(self, name: str) -> float:
        """The sum of every sample of ``name`` (all label sets)."""
        pattern = re.compile(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", re.M)
        return sum(float(v) for v in pattern.findall(self.metrics()))

    def transactions(self) -> float:
        return self.metric("icap_gateway_requests_total")

    def direct(self, source: str = "198.51.100.7") -> Proxy:
        """A connection to this node as HAProxy makes it (a PROXY header first)."""
        return Proxy(self.port, v1_header(source))

    def istag(self) -> str:
        proxy = self.direct()
        try:
            proxy.sock.sendall(b"OPTIONS icap://127.0.0.1/respmod ICAP/1.0\r\nHost: 127.0.0.1\r\n"
                               b"Encapsulated: null-body=0\r\n\r\n")
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = proxy.sock.recv(65536)
                assert chunk, "connection closed"
                data += chunk
        finally:
            proxy.close()
        found = re.search(rb"\r\nISTag: *(\S+)", data, re.I)
        assert found, data
        return found.group(1).decode()

    def log(self) -> str:
        return self.gw.log()[-3000:]


@dataclass
class Outcome:
    started: float  # time.monotonic()
    ended: float
    status: int  # HTTP status; 0: no answer, -1: an answer cut short


@dataclass
class Farm:
    nodes: list[Node]
    haproxy_port: int
    stats_socket: Path
    squid: SquidProcess
    origin: Origin
    forwarder: TCPForwarder
    database: str  # node 1's URL (direct)
    schema: str
    key: str
    squid_log_dir: Path  # Squid's ICAP log (squid_extra)
    page: str = ""
    outcomes: list[Outcome] = field(default_factory=list)

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return self.nodes[0].gw.cli(*args)

    def status(self) -> dict[str, str]:
        """HAProxy's view of each node: UP, DOWN, ..."""
        rows = _stat(self.stats_socket).decode().splitlines()
        return {name: state for name, _, state in (r.partition(",") for r in rows)
                if name.startswith("node")}

    def haproxy(self, command: str) -> str:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(5)
            s.connect(str(self.stats_socket))
            s.sendall(command.encode() + b"\n")
            out = b""
            while chunk := s.recv(65536):
                out += chunk
        return out.decode()

    def wait_up(self, names: tuple[str, ...] = ("node1", "node2"), timeout: float = 30) -> None:
        up = wait_for(lambda: all(self.status().get(n) == "UP" for n in names), timeout)
        assert up, (self.status(), [n.log() for n in self.nodes])

    def fetch(self, url: str, user: str = "alice", source: str = "127.0.0.1") -> Outcome:
        """One GET through Squid as ``user`` from ``source`` (a new connection)."""
        began = time.monotonic()
        auth = base64.b64encode(f"{user}:secret-{user}".encode()).decode()
        conn = http.client.HTTPConnection("127.0.0.1", self.squid.port, timeout=30,
                                          source_address=(source, 0))
        try:
            conn.request("GET", url, headers={"Proxy-Authorization": f"Basic {auth}"})
            response = conn.getresponse()
            response.read()
            status = response.status
        except OSError:
            status = 0  # no answer
        except http.client.HTTPException:
            status = -1  # an answer cut short (a body streamed while the node died)
        finally:
            conn.close()
        return Outcome(began, time.monotonic(), status)

    def load(self, seconds: float, *, clients: int = 4, max_requests: int = 20_000,
             users: tuple[str, ...] = ("alice",), source: str = "127.0.0.1") -> list[Outcome]:
        """``clients`` threads fetching the farm's page back to back, for at
        most ``seconds`` and ``max_requests`` requests in all."""
        return self.load_until(time.monotonic() + seconds, clients=clients, max_requests=max_requests,
                               users=users, source=source)

    def load_until(self, deadline: float, *, clients: int = 4, max_requests: int = 20_000,
                   users: tuple[str, ...] = ("alice",), source: str = "127.0.0.1",
                   url: str = "", stop: threading.Event | None = None) -> list[Outcome]:
        outcomes: list[Outcome] = []
        lock = threading.Lock()

        def client(index: int) -> None:
            user = users[index % len(users)]
            while time.monotonic() < deadline and not (stop and stop.is_set()):
                with lock:
                    if len(outcomes) >= max_requests:
                        return
                got = self.fetch(url or self.page, user, source)
                with lock:
                    outcomes.append(got)

        threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()) + 60)
        return sorted(outcomes, key=lambda o: o.started)

    def login_records(self) -> list[tuple[str, str, object, object]]:
        """(user, client ip, login_at, last_seen) of every login record."""
        engine = create_engine(self.database)
        try:
            with engine.connect() as c:
                rows = c.execute(text(
                    "SELECT u.username, l.client_ip, l.login_at, l.last_seen FROM login_records l "
                    "JOIN users u ON u.id = l.user_id ORDER BY u.username, l.client_ip, l.login_at"))
                return [tuple(r) for r in rows]  # type: ignore[misc]
        finally:
            engine.dispose()


def haproxy_config(nodes: list[Node], port: int, stats_socket: Path) -> str:
    """deploy/haproxy.cfg with this farm's addresses: the bind, one server
    line per node with its own health-check port; in the foreground as the
    test's user, logging to stderr, with an admin socket."""
    text_ = HAPROXY_CFG.read_text()
    text_ = re.sub(r"^\s*(user|group) .*\n", "", text_, flags=re.M)
    text_ = text_.replace("log /dev/log", "log stderr format raw")
    text_ = re.sub(r"maxconn \d+", "maxconn 1000", text_)
    text_ = text_.replace("bind :1344", f"bind 127.0.0.1:{port}")
    text_ = re.sub(r" port \d+", "", text_)  # each node's check port is on its own line
    servers = "".join(f"    server {n.name} 127.0.0.1:{n.port} port {n.gw.metrics_port}\n" for n in nodes)
    text_ = re.sub(r"^(\s*server .*\n)+", servers, text_, flags=re.M)
    return text_.replace("global\n", f"global\n    stats socket {stats_socket} level admin\n", 1)


def squid_extra(workdir: Path) -> str:
    """Basic auth for USERS from any loopback address, and an ICAP log of
    the ISTag Squid sees on every answer."""
    auth = squid_basic_auth(USERS, workdir)
    workdir.chmod(0o777)  # Squid writes its ICAP log here as its effective user
    return (auth
            + "acl loopback src 127.0.0.0/8\nhttp_access allow loopback\n"
            # HAProxy does the failing over: Squid must not suspend the
            # whole service after a few errors from one dead node.
            + "icap_service_failure_limit -1\n"
            + "logformat farm_istag %icap::rm %{ISTag}icap::<h %icap::Hs\n"
            + f"icap_log stdio:{workdir}/icap.log farm_istag\n")


def _node(name: str, database: str, rules: Path) -> Node:
    workdir = Path(tempfile.mkdtemp(prefix=f"farm-{name}-"))
    shutil.copytree(rules, workdir / "rules")
    port, metrics_port = free_port(), free_port()
    config = write_gateway_config(workdir, port, metrics_port, rules=workdir / "rules", auth_required=True,
                                  database=database, settings=NODE_SETTINGS, proxy_protocol=True)
    gw = GatewayProcess(None, port, metrics_port, workdir, config,  # type: ignore[arg-type]
                        workdir / "gateway.log", workdir / "access.log")
    return Node(name, gw)


@contextlib.contextmanager
def running_farm() -> Iterator[Farm]:
    haproxy = require_binary("haproxy")
    require_binary("squid")
    _pg_admin()  # fails (CI) or skips when PostgreSQL is unreachable
    schema = new_pg_schema()
    direct = pg_url(schema)
    pg_port = urlsplit(direct.replace("postgresql+psycopg", "http")).port or 5432
    forwarder = TCPForwarder(pg_port)
    via_forwarder = direct.replace(f"127.0.0.1:{pg_port}", f"127.0.0.1:{forwarder.port}")
    origin = Origin()
    workdir = Path(tempfile.mkdtemp(prefix="farm-"))
    nodes = [_node("node1", direct, REPO / "rules"), _node("node2", via_forwarder, REPO / "rules")]
    procs: list[subprocess.Popen[bytes]] = []
    try:
        nodes[0].gw.cli("register", "upgrade")
        nodes[0].gw.cli("operator", "add", "e2e", "--role", "admin", "--operator", "e2e")
        key = json.loads(nodes[0].gw.cli("tenant", "add", "acme", "--json", "--operator", "e2e").stdout)["key"]
        for node in nodes:
            node.start()
        port = free_port()
        stats = workdir / "stats.sock"
        cfg = workdir / "haproxy.cfg"
        cfg.write_text(haproxy_config(nodes, port, stats))
        log = workdir / "haproxy.log"
        with open(log, "wb") as out:
            procs.append(subprocess.Popen([haproxy, "-db", "-f", str(cfg)], stdout=out, stderr=subprocess.STDOUT))
        wait_for_port(port, procs[0], what="haproxy", log=log)
        squid_dir = Path(tempfile.mkdtemp(prefix="farm-squid-"))
        try:
            with squid_process(port, key=key, extra=squid_extra(squid_dir)) as squid:
                farm = Farm(nodes, port, stats, squid, origin, forwarder, direct, schema, key, squid_dir)
                farm.page = origin.add("/page.txt", b"an ordinary page\n" * 64)
                farm.wait_up()
                yield farm
        finally:
            shutil.rmtree(squid_dir, ignore_errors=True)
    finally:
        for proc in procs:
            stop_process(proc)
        for node in nodes:
            if node.gw.proc is not None:
                node.gw.stop()
            shutil.rmtree(node.gw.workdir, ignore_errors=True)
        shutil.rmtree(workdir, ignore_errors=True)
        forwarder.close()
        origin.close()
        drop_pg_schema(schema)
