"""Real peers for end-to-end tests: the gateway as a process, Squid, an origin
web server, curl and c-icap-client.

A peer that is missing skips its tests on a developer machine but fails them
under CI (``CI`` set), so a green CI always means the real peers ran.
"""

from __future__ import annotations

import base64
import contextlib
import gzip
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, NoReturn

import pytest

from gateway.config import toml_literal

REPO = Path(__file__).resolve().parent.parent
SQUID_SNIPPET = REPO / "config" / "squid.conf.example"
EICAR = rb"X5O!P%@AP[4\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*"


def unavailable(message: str) -> NoReturn:
    """What this machine lacks for a test: a skip, or under CI a failure."""
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def require_binary(name: str) -> str:
    path = shutil.which(name) or (f"/usr/sbin/{name}" if os.path.exists(f"/usr/sbin/{name}") else None)
    if path is None:
        unavailable(f"{name} is not installed (Debian package: see .ci/run)")
    return path


_TAKEN: set[int] = set()  # handed out by free_port in this process


def free_port() -> int:
    """A free port below Linux's ephemeral range (32768-60999).  A port the
    kernel picks for bind(0) comes from that range, and between our check
    and the server's own bind any outgoing connection (curl, Squid, a
    database client) may take it as its local port: "Address already in
    use".  Below the range only another listener can; never the same one
    twice in a run."""
    for _ in range(200):
        candidate = random.randrange(20000, 32000)
        if candidate in _TAKEN:
            continue
        with socket.socket() as s, contextlib.suppress(OSError):
            s.bind(("127.0.0.1", candidate))
            _TAKEN.add(candidate)
            return candidate
    raise RuntimeError("no free port below the ephemeral range")


def wait_for_port(port: int, proc: subprocess.Popen[bytes] | None = None, timeout: float = 30.0,
                  what: str = "server", log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            detail = log.read_text(errors="replace")[-4000:] if log and log.exists() else ""
            raise RuntimeError(f"{what} exited with {proc.returncode} before listening:\n{detail}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return
        time.sleep(0.05)
    detail = log.read_text(errors="replace")[-4000:] if log and log.exists() else ""
    raise RuntimeError(f"{what} did not listen on {port} within {timeout}s:\n{detail}")


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM, RssAnon ... of a process, in bytes."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        parts = value.split()
        if len(parts) == 2 and parts[1] == "kB":
            out[name] = int(parts[0]) * 1024
    return out


# --- the gateway as a process -------------------------------------------------


@dataclass
class GatewayProcess:
    proc: subprocess.Popen[bytes]
    port: int
    metrics_port: int
    workdir: Path
    config_path: Path
    log_path: Path
    access_log: Path

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run ``icap-gateway ARGS --config <this gateway's config>``."""
        cmd = [sys.executable, "-m", "gateway", *args, "--config", str(self.config_path)]
        result = subprocess.run(cmd, capture_output=True, text=True, cwd=self.workdir, timeout=120)
        if check and result.returncode != 0:
            raise AssertionError(f"{' '.join(args)} failed ({result.returncode}): {result.stderr}")
        return result

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        stop_process(self.proc)


def write_gateway_config(workdir: Path, port: int, metrics_port: int, *, rules: Path | str,
                         auth_required: bool, database: str | None = None,
                         settings: dict[str, dict[str, object]] | None = None,
                         proxy_protocol: bool = False, tls: str = "") -> Path:
    """A config file for a test gateway; ``settings`` adds or replaces keys by section;
    ``proxy_protocol`` makes the ICAP listener read a PROXY header first (``haproxy:``);
    ``tls`` (``privateKey=...:certKey=...``) makes it an ICAPS (``ssl:``) listener."""
    prefix = "haproxy:" if proxy_protocol else ""
    listener = f"ssl:{port}:{tls}:interface=127.0.0.1" if tls else f"tcp:{port}:interface=127.0.0.1"
    sections: dict[str, dict[str, object]] = {
        "server": {"listen": [prefix + listener], "state_dir": str(workdir / "var"),
                   "workers": 1},
        "scan": {"rules": str(rules)},
        "register": {"database": database or f"sqlite:///{workdir / 'register.sqlite3'}",
                     "flush_interval": "200ms"},
        "auth": {"required": auth_required},
        "monitoring": {"metrics_listen": f"tcp:{metrics_port}:interface=127.0.0.1",
                       "access_log": str(workdir / "access.log")},
    }
    for name, values in (settings or {}).items():
        sections.setdefault(name, {}).update(values)
    text = "".join(
        f"[{name}]\n" + "".join(f"{k} = {toml_literal(v)}\n" for k, v in values.items()) + "\n"
        for name, values in sections.items()
    )
    config = workdir / "gateway.toml"
    config.write_text(text)
    return config


@contextlib.contextmanager
def gateway_process(*, rules: Path | str = REPO / "rules", auth_required: bool = False,
                    database: str | None = None, settings: dict[str, dict[str, object]] | None = None,
                    before_start: Callable[[GatewayProcess], None] | None = None,
                    proxy_protocol: bool = False, tls: str = "") -> Iterator[GatewayProcess]:
    workdir = Path(tempfile.mkdtemp(prefix="icapgw-"))
    port, metrics_port = free_port(), free_port()
    config = write_gateway_config(workdir, port, metrics_port, rules=rules, auth_required=auth_required,
                                  database=database, settings=settings, proxy_protocol=proxy_protocol, tls=tls)
    log_path = workdir / "gateway.log"
    gw = GatewayProcess(None, port, metrics_port, workdir, config, log_path,  # type: ignore[arg-type]
                        workdir / "access.log")
    if before_start:
        before_start(gw)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "gateway", "serve", "--config", str(config)],
                                stdout=log, stderr=subprocess.STDOUT, cwd=workdir)
    gw.proc = proc
    try:
        wait_for_port(port, proc, what="icap-gateway", log=log_path)
        yield gw
    finally:
        gw.stop()
        shutil.rmtree(workdir, ignore_errors=True)


# --- an origin web server -------------------------------------------------------


@dataclass
class Resource:
    body: bytes | Callable[[], Iterator[bytes]]
    length: int
    headers: dict[str, str] = field(default_factory=dict)


class Origin:
    """A threaded HTTP/1.1 server for Squid to fetch from; records uploads."""

    def __init__(self) -> None:
        self.resources: dict[str, Resource] = {}
        self.uploads: list[bytes] = []
        origin = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                res = origin.resources.get(self.path)
                if res is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                for k, v in {"Content-Type": "application/octet-stream", **res.headers}.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(res.length))
                self.end_headers()
                if callable(res.body):
                    for piece in res.body():
                        self.wfile.write(piece)
                else:
                    self.wfile.write(res.body)

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                origin.uploads.append(self.rfile.read(length))
                body = b"stored"
                self.send_response(200)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def add(self, path: str, body: bytes, **headers: str) -> str:
        self.resources[path] = Resource(body, len(body), {k.replace("_", "-"): v for k, v in headers.items()})
        return f"http://127.0.0.1:{self.port}{path}"

    def add_stream(self, path: str, length: int, chunks: Callable[[], Iterator[bytes]], **headers: str) -> str:
        self.resources[path] = Resource(chunks, length, {k.replace("_", "-"): v for k, v in headers.items()})
        return f"http://127.0.0.1:{self.port}{path}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def gzipped(data: bytes) -> bytes:
    return gzip.compress(data)


# --- Squid ----------------------------------------------------------------------


def squid_snippet(icap_port: int, key: str = "") -> str:
    """config/squid.conf.example as an admin would paste it, pointed at our port."""
    text = SQUID_SNIPPET.read_text()
    text = text.replace("127.0.0.1:1344", f"127.0.0.1:{icap_port}")
    if key:
        text = text.replace("TENANT_KEY", key)
    else:
        text = "\n".join(line for line in text.splitlines() if "TENANT_KEY" not in line)
    return text


@dataclass
class SquidProcess:
    proc: subprocess.Popen[bytes]
    port: int
    workdir: Path

    def cache_log(self) -> str:
        path = self.workdir / "cache.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def access_log(self) -> str:
        path = self.workdir / "access.log"
        return path.read_text(errors="replace") if path.exists() else ""


@contextlib.contextmanager
def squid_process(icap_port: int, *, key: str = "", extra: str = "", tls: str = "") -> Iterator[SquidProcess]:
    """Squid with the README's snippet; ``tls`` (``tls-cafile=... tls-cert=... tls-key=...``)
    makes its ICAP services icaps:// ones with those options (squid-openssl)."""
    squid = require_binary("squid")
    snippet = squid_snippet(icap_port, key)
    if tls:
        snippet = "\n".join(line.replace("icap://", "icaps://") + f" {tls}" if line.startswith("icap_service")
                             else line for line in snippet.splitlines())
    workdir = Path(tempfile.mkdtemp(prefix="squid-"))
    os.chmod(workdir, 0o777)  # Squid drops root for its effective user
    port = free_port()
    conf = workdir / "squid.conf"
    conf.write_text(
        f"""
http_port 127.0.0.1:{port}
pid_filename {workdir}/squid.pid
cache_log {workdir}/cache.log
access_log stdio:{workdir}/access.log
coredump_dir {workdir}
cache deny all
cache_mem 8 MB
shutdown_lifetime 0 seconds
dns_nameservers 127.0.0.1
acl localhost src 127.0.0.1/32
{extra}
http_access allow localhost
http_access deny all
forwarded_for on
{snippet}
"""
    )
    proc = subprocess.Popen([squid, "-N", "-f", str(conf)], stdout=subprocess.DEVNULL,
                            stderr=open(workdir / "stderr.log", "wb"), cwd=workdir)
    sq = SquidProcess(proc, port, workdir)
    try:
        wait_for_port(port, proc, what="squid", log=workdir / "cache.log", timeout=60)
        yield sq
    finally:
        stop_process(proc)
        shutil.rmtree(workdir, ignore_errors=True)


NCSA = "/usr/lib/squid/basic_ncsa_auth"


def squid_basic_auth(users: tuple[str, ...], workdir: Path) -> str:
    """squid.conf lines making every request authenticate (Basic, Squid's
    NCSA helper) as one of ``users``, each with password ``secret-<user>``;
    the password file goes in ``workdir``."""
    if not Path(NCSA).exists():
        require_binary("basic_ncsa_auth")
    openssl = require_binary("openssl")
    workdir.chmod(0o755)  # Squid's helper runs as Squid's effective user
    passwd = workdir / "passwd"
    lines = []
    for user in users:
        hashed = subprocess.run([openssl, "passwd", "-apr1", "secret-" + user], capture_output=True,
                                text=True, check=True).stdout.strip()
        lines.append(f"{user}:{hashed}")
    passwd.write_text("\n".join(lines) + "\n")
    passwd.chmod(0o644)
    return (f"auth_param basic program {NCSA} {passwd}\nauth_param basic realm test\n"
            "acl authed proxy_auth REQUIRED\nhttp_access deny !authed\n")


@dataclass
class Fetched:
    status: int
    body: bytes
    headers: str
    exit_code: int = 0


def curl(proxy_port: int, url: str, *, data: bytes | None = None, user: str | None = None,
         timeout: float = 120, output: Path | None = None, compressed: bool = False,
         check: bool = True, extra_headers: Sequence[str] = ()) -> Fetched:
    """Fetch ``url`` through the proxy with real curl (``extra_headers``: more
    request header lines)."""
    require_binary("curl")
    with tempfile.TemporaryDirectory() as tmp:
        out = output or Path(tmp, "body")
        headers = Path(tmp, "headers")
        cmd = ["curl", "-sS", "--max-time", str(int(timeout)), "-x", f"http://127.0.0.1:{proxy_port}",
               "-o", str(out), "-D", str(headers), "-w", "%{http_code}"]
        if user:
            cmd += ["--proxy-user", user]
        if compressed:
            cmd += ["-H", "Accept-Encoding: gzip"]
        for line in extra_headers:
            cmd += ["-H", line]
        if data is not None:
            body_file = Path(tmp, "upload")
            body_file.write_bytes(data)
            cmd += ["--data-binary", f"@{body_file}", "-H", "Content-Type: application/octet-stream"]
        cmd.append(url)
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout + 10)
        if check and result.returncode != 0:
            raise AssertionError(f"curl failed ({result.returncode}): {result.stderr}")
        body = out.read_bytes() if output is None and out.exists() else b""
        head_text = headers.read_text(errors="replace") if headers.exists() else ""
        return Fetched(int(result.stdout.strip() or 0), body, head_text, result.returncode)


def wait_for(check: Callable[[], Any], timeout: float = 10.0) -> Any:
    """Poll ``check`` until it returns something true or ``timeout`` passes;
    returns its last value (asserting it is the caller's job)."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.2)


def basic_user(name: str) -> str:
    return base64.b64encode(name.encode()).decode()


def read_json_lines(path: Path) -> list[dict[str, object]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# --- a TCP forwarder whose link can be cut (database outages) --------------------


class TCPForwarder:
    """127.0.0.1:port -> 127.0.0.1:target, with ``cut()`` (close every
    connection and refuse new ones, as a database outage would) and
    ``restore()``."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self.restore()

    def restore(self) -> None:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", self.port))
        sock.listen(64)
        self._listener = sock
        threading.Thread(target=self._accept, args=(sock,), daemon=True).start()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # cut
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        if self._listener is not None:
            # shutdown() first: close() alone leaves the kernel socket listening
            # while another thread sits in accept() on it.
            with contextlib.suppress(OSError):
                self._listener.shutdown(socket.SHUT_RDWR)
            self._listener.close()
            self._listener = None
        with self._lock:
            conns, self._conns = self._conns, []
        for s in conns:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def close(self) -> None:
        self.cut()
