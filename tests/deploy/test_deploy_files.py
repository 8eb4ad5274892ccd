"""deploy/: the systemd unit, the HAProxy config, the Prometheus scrape config
and the node config are valid to their own tools, and agree with each other.

systemd-analyze (Debian package systemd), haproxy (haproxy) and promtool
(prometheus) are installed by .ci/run; without them these tests skip on a
workstation and fail in CI (``CI`` set)."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

from tests.peers import REPO, require_binary

DEPLOY = REPO / "deploy"
UNIT = DEPLOY / "icap-gateway.service"
HAPROXY_CFG = DEPLOY / "haproxy.cfg"
PROMETHEUS = DEPLOY / "prometheus.yml"
NODE_CONFIG = DEPLOY / "gateway.toml"
INSTALLED_BINARY = "/opt/icap-gateway/.venv/bin/icap-gateway"


def unit_settings() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if line and not line.startswith(("#", "[")) and "=" in line:
            key, _, value = line.partition("=")
            out.setdefault(key, []).append(value)
    return out


def node_config() -> dict[str, dict[str, object]]:
    return tomllib.loads(NODE_CONFIG.read_text())


def port_of(endpoint: str) -> int:
    return int(next(p for p in endpoint.split(":")[1:] if p.isdigit()))


def test_systemd_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = require_binary("systemd-analyze")
    # verify checks that ExecStart is executable: point it at this install's script.
    script = Path(sys.executable).parent / "icap-gateway"
    assert INSTALLED_BINARY in UNIT.read_text()
    unit = tmp_path / UNIT.name
    unit.write_text(UNIT.read_text().replace(INSTALLED_BINARY, str(script if script.exists() else sys.executable)))
    result = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and not result.stderr.strip() and not result.stdout.strip(), result


def test_systemd_unit_hardening_and_lifecycle() -> None:
    s = unit_settings()
    assert s["User"] == ["icap-gateway"] and s["Group"] == ["icap-gateway"]
    assert s["ProtectSystem"] == ["strict"] and s["NoNewPrivileges"] == ["yes"] and s["PrivateTmp"] == ["yes"]
    assert s["ExecReload"] == ["/bin/kill -HUP $MAINPID"]  # SIGHUP reloads the rules
    assert s["Restart"] == ["on-failure"]
    # SIGTERM starts the 30 s graceful shutdown; systemd must not SIGKILL before it ends.
    assert s["KillSignal"] == ["SIGTERM"] and int(s["TimeoutStopSec"][0].rstrip("s")) > 30
    # The user the unit names is the one deploy/icap-gateway.sysusers creates.
    assert "u icap-gateway " in (DEPLOY / "icap-gateway.sysusers").read_text()


def test_unit_lets_the_node_config_write_only_where_it_must() -> None:
    """ProtectSystem=strict makes everything read-only but ReadWritePaths: the
    state dir and the access log's directory must be among them."""
    writable = " ".join(unit_settings()["ReadWritePaths"]).split()
    config = node_config()
    assert config["server"]["state_dir"] in writable
    assert str(Path(str(config["monitoring"]["access_log"])).parent) in writable
    assert f"--config /etc/icap-gateway/{NODE_CONFIG.name}" in unit_settings()["ExecStart"][0]


def test_node_config_passes_config_check() -> None:
    result = subprocess.run([sys.executable, "-m", "gateway", "config", "check", str(NODE_CONFIG)],
                            capture_output=True, text=True, timeout=60, cwd=REPO)
    assert result.returncode == 0, result.stderr


def test_haproxy_config_passes_haproxy_check() -> None:
    haproxy = require_binary("haproxy")
    result = subprocess.run([haproxy, "-c", "-f", str(HAPROXY_CFG)], capture_output=True, text=True, timeout=60)
    output = result.stdout + result.stderr
    assert result.returncode == 0 and "WARNING" not in output and "ALERT" not in output, output


def test_haproxy_config_matches_the_node_config() -> None:
    """HAProxy sends the PROXY header the nodes expect, to their ICAP port,
    and checks /readyz on their metrics port."""
    text = HAPROXY_CFG.read_text()
    config = node_config()
    [listen] = config["server"]["listen"]  # type: ignore[misc]
    assert listen.startswith("haproxy:")
    defaults = re.search(r"^\s*default-server (.*)$", text, re.M)
    assert defaults is not None
    options = defaults.group(1).split()
    assert "send-proxy-v2" in options and "check" in options
    assert options[options.index("port") + 1] == str(port_of(config["monitoring"]["metrics_listen"]))  # type: ignore[arg-type]
    assert "option httpchk GET /readyz" in text and "mode tcp" in text
    servers = re.findall(r"^\s*server \S+ (\S+)", text, re.M)
    assert len(servers) >= 2 and all(s.endswith(f":{port_of(listen)}") for s in servers)
    # Longer than the gateway's idle timeout: the gateway ends idle connections, at a boundary.
    from gateway.config import ServerSettings

    minutes = re.search(r"timeout server (\d+)m", text)
    assert minutes and int(minutes.group(1)) * 60 > ServerSettings().idle_timeout


def test_prometheus_config_passes_promtool(tmp_path: Path) -> None:
    promtool = require_binary("promtool")
    result = subprocess.run([promtool, "check", "config", str(PROMETHEUS)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_prometheus_scrapes_every_node_on_its_metrics_port() -> None:
    text = PROMETHEUS.read_text()
    metrics_port = port_of(node_config()["monitoring"]["metrics_listen"])  # type: ignore[arg-type]
    targets = re.findall(r"^\s*- (\S+:\d+)$", text, re.M)
    nodes = {s.rsplit(":", 1)[0] for s in re.findall(r"^\s*server \S+ (\S+)", HAPROXY_CFG.read_text(), re.M)}
    assert {t.rsplit(":", 1)[0] for t in targets} == nodes
    assert all(t.endswith(f":{metrics_port}") for t in targets)


def test_readme_documents_every_file() -> None:
    readme = (DEPLOY / "README.md").read_text()
    files = sorted(p.name for p in DEPLOY.iterdir() if p.name != "README.md")
    assert files and [f for f in files if f not in readme] == []


def test_ci_installs_the_tools() -> None:
    ci = (REPO / ".ci" / "run").read_text()
    apt = next(line for line in ci.splitlines() if "apt-get install" in line)
    assert {"haproxy", "systemd", "prometheus"} <= set(apt.split())


def test_licence_is_an_spdx_string_not_the_deprecated_table() -> None:
    """setuptools deprecates ``license = { text = ... }`` and said so on every
    install; the SPDX string form needs setuptools 77 or later."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert project["project"]["license"] == "LicenseRef-Proprietary"
    assert project["project"]["requires-python"] == ">=3.11"
    assert "setuptools>=77" in project["build-system"]["requires"]
