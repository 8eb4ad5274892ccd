"""Start and stop the servers under test on loopback ports.

- ``cicap``: Debian's c-icap with its echo service (C, no scanning): the
  ceiling for an ICAP server on this machine.
- ``pyicap``: ``benchmarks/baseline_pyicap.py``, pyicap with yara-python in
  threads: the naive Python design.
- ``gateway``: ``icap-gateway serve`` with a generated config, the thing
  being measured, run as users run it: a tenant created with the CLI in its
  state directory, whose key every request carries (``Authorization:
  Bearer``), and its access log written to a file.

Each runs in its own process group so that stopping it stops its children.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.icapwire import Response
from benchmarks.loadgen import wait_ready
from gateway.config import toml_literal

REPO = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"


class ServerUnavailable(RuntimeError):
    """The server cannot be run here (not installed, or it does not start)."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    name: str
    service: str
    port: int
    proc: subprocess.Popen[bytes]
    workdir: Path
    options: Response | None = None
    log: Path | None = None
    info: dict[str, str] = field(default_factory=dict)
    authorization: str | None = None  # what requests send as ICAP Authorization
    reqmod_service: str | None = None  # the REQMOD service path when not ``service``

    def service_for(self, method: str) -> str:
        """The service path a request of ``method`` goes to."""
        return (self.reqmod_service or self.service) if method == "REQMOD" else self.service

    @property
    def host(self) -> str:
        return HOST

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def preview_size(self) -> int | None:
        if self.options is None:
            return None
        value = self.options.headers.get(b"preview")
        return int(value) if value is not None and value.strip().isdigit() else None

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, lines: int = 20) -> str:
        if self.log is None or not self.log.exists():
            return ""
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        died = self.proc.poll() is not None
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        if died and self.log is not None and self.log.exists():
            # it stopped by itself: keep its log for the post-mortem
            kept = Path(tempfile.gettempdir()) / f"bench-{self.name}-{self.proc.pid}.log"
            shutil.copyfile(self.log, kept)
            self.info["kept_log"] = str(kept)
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _spawn(cmd: list[str], workdir: Path, log: Path, env: dict[str, str] | None = None
           ) -> subprocess.Popen[bytes]:
    with open(log, "wb") as out:
        return subprocess.Popen(cmd, cwd=workdir, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True,
                                env={**os.environ, **(env or {})})


def _ready(server: Server, timeout: float) -> Server:
    try:
        server.options = wait_ready(server.host, server.port, server.service, timeout,
                                    alive=server.alive)
    except TimeoutError as e:
        tail = server.log_tail()
        server.stop()
        raise ServerUnavailable(f"{server.name} did not answer OPTIONS: {e}\n{tail}") from None
    return server


# --- c-icap ---------------------------------------------------------------

CICAP_BINARY = "/usr/bin/c-icap"


def cicap_module_dir() -> Path | None:
    """Where srv_echo.so is (asks dpkg, then tries the Debian path)."""
    for pkg in ("c-icap", "libicapapi5"):
        try:
            out = subprocess.run(["dpkg", "-L", pkg], capture_output=True, text=True,
                                 check=False).stdout
        except OSError:
            break
        for line in out.splitlines():
            if line.endswith("/srv_echo.so"):
                return Path(line).parent
    for guess in Path("/usr/lib").glob("*/c_icap/srv_echo.so"):
        return guess.parent
    return None


def cicap_version() -> str:
    try:
        out = subprocess.run([CICAP_BINARY, "-VV"], capture_output=True, text=True,
                             check=False, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    first = out.splitlines()[0] if out else "?"
    return first.split(":", 1)[-1].strip()


def start_cicap(threads_per_child: int = 10, servers: int = 2) -> Server:
    binary = shutil.which("c-icap") or (CICAP_BINARY if Path(CICAP_BINARY).exists() else None)
    modules = cicap_module_dir()
    if binary is None or modules is None:
        raise ServerUnavailable("c-icap (or its srv_echo.so) is not installed")
    workdir = Path(tempfile.mkdtemp(prefix="bench-cicap-"))
    port = free_port()
    # No access log: the echo service is the C ceiling, not a logging benchmark.
    conf = f"""\
PidFile {workdir}/c-icap.pid
CommandsSocket {workdir}/c-icap.ctl
Timeout 300
MaxKeepAliveRequests 0
KeepAliveTimeout 600
StartServers {servers}
MaxServers {servers * 2}
MinSpareThreads {threads_per_child // 2}
MaxSpareThreads {threads_per_child * servers}
ThreadsPerChild {threads_per_child}
MaxRequestsPerChild 0
Port {HOST}:{port}
TmpDir {workdir}
MaxMemObject 1048576
DebugLevel 0
Pipelining on
ModulesDir {modules}
ServicesDir {modules}
TemplateDir /usr/share/c_icap/templates/
ServerLog {workdir}/server.log
Service echo srv_echo.so
"""
    (workdir / "c-icap.conf").write_text(conf)
    log = workdir / "stdout.log"
    proc = _spawn([binary, "-N", "-D", "-f", str(workdir / "c-icap.conf")], workdir, log)
    server = Server("c-icap", "echo", port, proc, workdir, log=log,
                    info={"version": cicap_version()})
    return _ready(server, 15)


# --- pyicap baseline --------------------------------------------------------


def start_pyicap(rules: Path | None, preview: int = 4096) -> Server:
    workdir = Path(tempfile.mkdtemp(prefix="bench-pyicap-"))
    port = free_port()
    log = workdir / "server.log"
    cmd = [sys.executable, "-m", "benchmarks.baseline_pyicap", "--port", str(port),
           "--preview", str(preview)]
    if rules is not None:
        cmd += ["--rules", str(rules)]
    proc = _spawn(cmd, REPO, log, env={"PYTHONPATH": str(REPO)})
    server = Server("pyicap", "yara", port, proc, workdir, log=log)
    return _ready(server, 120)


# --- the gateway -----------------------------------------------------------


def gateway_command() -> list[str] | None:
    exe = Path(sys.executable).with_name("icap-gateway")
    if exe.exists():
        return [str(exe)]
    found = shutil.which("icap-gateway")
    return [found] if found else None


def gateway_config(workdir: Path, extra: dict[str, dict[str, object]] | None = None,
                   tenant: bool = True) -> Path:
    """A config for benchmarking, state in a temp dir; without ``tenant`` no key is
    required (``[auth] required = false``, for the hostile-peer scenarios)."""
    # a free metrics port so runs never collide; the access log goes to a
    # file as in a deployment (its cost is part of the gateway's)
    sections: dict[str, dict[str, object]] = {
        "server": {"state_dir": str(workdir / "state"), "max_connections": 20000},
        "monitoring": {"metrics_listen": f"tcp:{free_port()}:interface={HOST}",
                       "access_log": str(workdir / "access.log")},
    }
    if not tenant:
        sections["auth"] = {"required": False}
    for section, values in (extra or {}).items():
        sections.setdefault(section, {}).update(values)
    lines: list[str] = []
    for section, values in sections.items():
        lines.append(f"[{section}]")
        for key, value in values.items():
            lines.append(f"{key} = {toml_literal(value)}")
        lines.append("")
    path = workdir / "gateway.toml"
    path.write_text("\n".join(lines))
    return path


def parse_option(text: str) -> tuple[str, str, object]:
    """``section.key=value`` (value parsed as TOML scalar when it looks like one)."""
    name, sep, raw = text.partition("=")
    section, dot, key = name.strip().partition(".")
    if not sep or not dot:
        raise ValueError(f"expected section.key=value, got {text!r}")
    value: object = raw.strip()
    low = raw.strip().lower()
    if low in ("true", "false"):
        value = low == "true"
    else:
        try:
            value = int(raw)
        except ValueError:
            try:
                value = float(raw)
            except ValueError:
                pass
    return section, key.strip(), value


BENCH_OPERATOR = "bench"
BENCH_TENANT = "bench"


def create_tenant(cmd: list[str], config: Path) -> str:
    """Create the benchmark's operator and tenant with the CLI, as an admin
    would (README, "Connecting Squid"); returns the tenant's key."""
    env = {**os.environ, "ICAP_GATEWAY_OPERATOR": BENCH_OPERATOR}
    steps = [["operator", "add", BENCH_OPERATOR, "--role", "admin", "--config", str(config)],
             ["tenant", "add", BENCH_TENANT, "--company", "Benchmark Oy", "--config", str(config),
              "--json"]]
    out = ""
    for step in steps:
        done = subprocess.run([*cmd, *step], capture_output=True, text=True, env=env,
                              cwd=REPO, timeout=120, check=False)
        if done.returncode != 0:
            raise ServerUnavailable(f"icap-gateway {' '.join(step[:2])} failed: "
                                    f"{done.stderr.strip()[-500:]}")
        out = done.stdout
    try:
        return str(json.loads(out)["key"])
    except (ValueError, KeyError, TypeError):
        raise ServerUnavailable("icap-gateway tenant add --json printed no key") from None


def start_gateway(rules: Path, extra: dict[str, dict[str, object]] | None = None,
                  service: str = "respmod", timeout: float = 120, tenant: bool = True) -> Server:
    """``icap-gateway serve`` on a free port; with ``tenant`` (the default) a tenant
    is created first and the returned server's requests carry its key."""
    cmd = gateway_command()
    if cmd is None:
        raise ServerUnavailable("icap-gateway is not installed in this environment")
    workdir = Path(tempfile.mkdtemp(prefix="bench-gateway-"))
    (workdir / "state").mkdir()
    config = gateway_config(workdir, extra, tenant=tenant)
    try:
        key = create_tenant(cmd, config) if tenant else None
    except (ServerUnavailable, OSError, subprocess.TimeoutExpired) as e:
        shutil.rmtree(workdir, ignore_errors=True)
        raise ServerUnavailable(str(e)) from None
    port = free_port()
    log = workdir / "gateway.log"
    proc = _spawn([*cmd, "serve", "--config", str(config),
                   "--listen", f"tcp:{port}:interface={HOST}", "--rules", str(rules)],
                  REPO, log)
    server = Server("gateway", service, port, proc, workdir, log=log,
                    authorization=f"Bearer {key}" if key else None, reqmod_service="reqmod")
    # the gateway may refuse to start for a plain reason (bad option): say it fast
    time.sleep(0.2)
    if proc.poll() is not None:
        tail = server.log_tail()
        server.stop()
        raise ServerUnavailable(f"icap-gateway serve exited with {proc.returncode}:\n{tail}")
    return _ready(server, timeout)
