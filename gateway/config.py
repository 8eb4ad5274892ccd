"""The gateway's whole configuration: one TOML file, embedded defaults.

Each package declares its own section (see ``gateway.settings``); this module
only puts them together, reads the file and applies command-line overrides.
"""

from __future__ import annotations

import dataclasses
import os
import textwrap
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from gateway.settings import (
    ConfigError,
    ConfigErrors,
    endpoint,
    load_section,
    non_negative,
    positive,
    setting,
)
from gateway.tls import tls_endpoint_problem
from monitoring.settings import MonitoringSettings
from register.keys import valid_tenant_name
from register.settings import AuthSettings, RegisterSettings

# The bundled rules and templates sit beside the package in a source checkout.
PROJECT_ROOT = Path(__file__).resolve().parent.parent

# What happens, by default, to a body the scanner could not scan whole, per
# reason (gateway.interfaces.UNSCANNABLE_REASONS; see gateway.scanning.scanner).
UNSCANNABLE_DEFAULTS: dict[str, Literal["block", "pass"]] = {
    # Honest big downloads (ISO images, videos) are common; blocking them is a
    # site's choice to make.  Same as oversize_policy's default.
    "too-large": "pass",
    # Decoded past max_decoded_size: an honest page rarely inflates to 256 MiB,
    # and what lies past the limit is not seen.
    "decode-limit": "block",
    # Past max_decode_ratio: a decompression bomb; padding a signature past
    # the limit must not get it through.
    "bomb": "block",
    # What a browser cannot decode it does not run, but a downloader saves the
    # raw bytes, and a broken stream hides what follows the damage.
    "corrupt-encoding": "block",
    # A coding the gateway does not know ("compress", or bogus values such as
    # "utf-8" that real servers send): browsers pass such bodies on as they
    # are, and those raw bytes are scanned whole; blocking would break sites.
    "unknown-encoding": "pass",
    # The trailing bytes are scanned (raw) along with the decoded stream, so
    # nothing went unseen; some servers do pad their streams.
    "trailing-data": "pass",
    # As error_policy's default (fail-closed).
    "scan-timeout": "block",
    "engine-error": "block",
}


@dataclass(frozen=True)
class ServerSettings:
    listen: list[str] = setting(
        ["tcp:1344:interface=127.0.0.1"],
        "ICAP listeners, Twisted endpoint strings (tcp:1344:interface=0.0.0.0, unix:/run/icap.sock, "
        "ssl:11344:privateKey=key.pem:certKey=cert.pem:interface=0.0.0.0 for ICAP over TLS; see [tls])",
        validate=lambda v: next(filter(None, map(endpoint, v)), None) or (None if v else "needs at least one listener"),
    )
    state_dir: str = setting("var", "Where the embedded SQLite register and spool files live")
    workers: int = setting(
        0, "Worker processes sharing the listeners; 0 means one per core", validate=non_negative
    )
    worker_balance: Literal["least-loaded", "kernel"] = setting(
        "least-loaded", "How workers share connections: least-loaded (the supervisor accepts and hands each "
        "connection to the worker holding the fewest; evens out Squid's few long-lived connections) or "
        "kernel (every worker accepts on the shared listeners; no hop through the supervisor)",
    )
    max_connections: int = setting(
        1000, "Connections the whole gateway (all workers together) keeps open, advertised in OPTIONS "
        "as Max-Connections. At the limit a new connection closes the longest-idle keep-alive "
        "connection of its worker; only when none is idle is it answered 503",
        validate=positive,
    )
    options_ttl: int = setting(3600, "Options-TTL in seconds advertised in OPTIONS", validate=positive)
    preview_size: int = setting(
        4096, "Preview bytes asked for in OPTIONS (0 disables preview)", kind="size", validate=non_negative
    )
    head_timeout: float = setting(
        30.0, "Seconds from a request's first byte until its ICAP head and encapsulated HTTP heads "
        "are complete, else 408 and close. A deadline, not extended by progress: a peer dripping "
        "bytes holds a connection no longer (heads are at most 320 KiB: Squid sends them at once)",
        kind="duration", validate=positive,
    )
    read_timeout: float = setting(
        30.0, "While a request body arrives, every this many seconds at least min_body_rate x "
        "read_timeout bytes (at least 1) must have come, else 408 and close. Windows, not a "
        "whole-body deadline: a 256 MiB upload over a slow link is never cut while it moves",
        kind="duration", validate=positive,
    )
    min_body_rate: int = setting(
        256, "Bytes per second a request body must average over each read_timeout window "
        "(0: one byte per window). Far below any honest link, costly for a slowloris holding "
        "many connections", kind="size", validate=non_negative,
    )
    idle_timeout: float = setting(
        300.0, "Seconds an idle persistent connection is kept open", kind="duration", validate=positive
    )
    write_timeout: float = setting(
        30.0, "Seconds our unsent output may stay above the transport's high-water mark (the peer "
        "stopped reading) before the connection is aborted and its spool freed",
        kind="duration", validate=positive,
    )
    max_pipelined_bytes: int = setting(
        256 * 1024, "Input bytes a connection may hold unprocessed while its answer is pending "
        "(pipelined requests); reading pauses before this, a peer past it is cut off",
        kind="size", validate=positive,
    )
    body_memory_budget: int = setting(
        64 * 1024**2, "Request and response body bytes one worker holds in memory, all connections "
        "together; past it bodies spool to disk at once ([scan] memory_threshold is the "
        "per-body limit). Bounds body memory per worker whatever the number of uploads",
        kind="size", validate=positive,
    )
    shutdown_timeout: float = setting(
        30.0, "Seconds SIGTERM waits for open connections to answer what their peers already sent "
        "(a scan may take [scan] timeout) before aborting them", kind="duration", validate=positive,
    )
    max_connection_age: float = setting(
        60.0, "Seconds after which a persistent connection closes at its next transaction boundary "
        "(the answer carries Connection: close; Squid opens a new one). Behind a load balancer a "
        "node back from a failure gets new connections only: recycling gives it its share within "
        "about this long, so a farm node sets a few seconds (deploy/gateway.toml: 5 s). A "
        "reconnect on loopback or a LAN costs far less than a scan, a TLS one a handshake (0: never)",
        kind="duration", validate=non_negative,
    )
    max_connection_transactions: int = setting(
        10000, "Transactions after which a persistent connection closes at the transaction boundary "
        "(Connection: close), bounding how long one connection stays pinned to one node under "
        "heavy load whatever its age (0: no limit)", validate=non_negative,
    )
    service_id: str = setting("yara", "Service-ID advertised in OPTIONS and ISTag prefix")
    early_response_after: int = setting(
        60 * 1024,
        "RESPMOD bodies past this size get our 200 head before the verdict, so Squid < 6.10 "
        "does not stall (Squid bug 5352); a block after that aborts the response (0: never)",
        kind="size", validate=non_negative,
    )


def _unscannable_policy_problems(table: dict[str, str]) -> str | None:
    """Every typo in the table at once, reason and action alike."""
    problems = [f"unknown reason {reason!r} (known: {', '.join(UNSCANNABLE_DEFAULTS)})"
                for reason in table if reason not in UNSCANNABLE_DEFAULTS]
    problems += [f"{reason}: expected \"block\" or \"pass\", got {action!r}"
                 for reason, action in table.items() if action not in ("block", "pass")]
    return "; ".join(problems) or None


@dataclass(frozen=True)
class ScanSettings:
    rules: str = setting("rules", "Directory of *.yar/*.yara files, each file its own namespace")
    threads: int = setting(0, "Scanning threads; 0 means one per core", validate=non_negative)
    engine: Literal["yara", "yara-x"] = setting(
        "yara", "Matching engine: yara (yara-python in the scanning threads) or yara-x "
        "(YARA-X in as many worker processes as threads); same rules, namespaces and verdicts"
    )
    timeout: float = setting(30.0, "Seconds one scan may take", kind="duration", validate=positive)
    inline_budget: float = setting(
        0.0002, "A scan measured to take less CPU than this (a body of at most 64 KiB, not encoded, "
        "engine yara) runs on the reactor thread: handing it to a scanning thread and back costs "
        "more (benchmarks/README.md, \"Inline scans\"). \"0.2ms\"; 0: every scan in a scanning thread",
        kind="duration",
        validate=non_negative,
    )
    error_policy: Literal["fail-open", "fail-closed"] = setting(
        "fail-closed", "On a scan error or timeout: pass the content (fail-open) or block it; "
        "unscannable_policy's scan-timeout and engine-error, when given, win"
    )
    max_scan_size: int = setting(
        256 * 1024**2, "Bodies larger than this (decoded) are not scanned", kind="size", validate=positive
    )
    oversize_policy: Literal["pass", "block"] = setting(
        "pass", "What happens to a body over max_scan_size: pass it unscanned (marked) or block it; "
        "unscannable_policy's too-large, when given, wins"
    )
    unscannable_policy: dict[str, str] = setting(
        {}, "What to do, \"block\" or \"pass\" (marked X-Scan-Status: unscanned; reason=...), with a "
        "body that could not be scanned whole, per reason; a rule match in what could be scanned "
        "blocks whatever this says. Reasons not listed take their defaults: "
        + ", ".join(f"{reason} {action}" for reason, action in UNSCANNABLE_DEFAULTS.items())
        + " (too-large follows oversize_policy, scan-timeout and engine-error follow error_policy). "
        "E.g. {too-large=\"block\", trailing-data=\"block\"}",
        validate=lambda table: _unscannable_policy_problems(table),
    )
    memory_threshold: int = setting(
        1024**2, "Bodies above this spool to a temporary file", kind="size", validate=positive
    )
    max_decoded_size: int = setting(
        256 * 1024**2, "Stop decoding Content-Encoding beyond this many bytes", kind="size", validate=positive
    )
    max_decode_ratio: int = setting(
        1000, "Stop decoding when decoded/encoded size exceeds this (zip bombs)", validate=positive
    )
    reload_interval: float = setting(
        2.0, "Seconds between checks of the rules directory for changes (0 disables)",
        kind="duration", validate=non_negative,
    )
    block_page: str = setting("", "HTML template of the block page (empty: config/blockpage.html)")
    skip_types: list[str] = setting(
        [], "File types not scanned, by magic bytes (not the claimed Content-Type), e.g. "
        "[\"video/*\", \"image/jpeg\"]; empty scans everything. See README, \"Scanning less\"",
    )
    cache_entries: int = setting(
        10000, "Verdicts kept for bodies seen again (same bytes, same rules, same externals the "
        "rules read); 0 disables the cache", validate=non_negative,
    )
    late_block_ttl: float = setting(
        600.0, "Seconds a verdict of a download cut after the early head (Squid bug 5352) is "
        "remembered for its tenant and URL: the next RESPMOD gets the block page at its head, a "
        "REQMOD is refused (0 disables; README, \"Late-block memory\")",
        kind="duration", validate=non_negative,
    )
    late_block_entries: int = setting(
        10000, "Most URLs the late-block memory holds per worker process (least recently used "
        "first out; 0 disables)", validate=non_negative,
    )

    def policy_for(self, reason: str) -> Literal["block", "pass"]:
        """What to do with a body unscannable for ``reason`` (UNSCANNABLE_REASONS)."""
        given = self.unscannable_policy.get(reason)
        if given in ("block", "pass"):
            return given  # type: ignore[return-value]
        if reason == "too-large":
            return self.oversize_policy
        if reason in ("scan-timeout", "engine-error"):
            return "pass" if self.error_policy == "fail-open" else "block"
        return UNSCANNABLE_DEFAULTS.get(reason, "block")


# A support contact is a line of text on a block page, not a document.
SUPPORT_CONTACT_MAX = 200


def _support_contact_problem(value: str) -> str | None:
    if len(value) > SUPPORT_CONTACT_MAX:
        return f"at most {SUPPORT_CONTACT_MAX} characters"
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in value):
        return "no control characters (one line of text)"
    return None


def _template_problem(value: str) -> str | None:
    # Relative to the working directory, or to a source checkout (as [scan] rules).
    if Path(value).is_file() or (PROJECT_ROOT / value).is_file():
        return None
    return f"no such file: {value!r}"


@dataclass(frozen=True)
class TenantSettings:
    """``[tenants.NAME]``: one tenant's overrides of ``[scan]``.  A key not
    given (None) takes ``[scan]``'s value; ``unscannable_policy`` overrides
    ``[scan]``'s reason by reason (see gateway.policy)."""

    mode: Literal["block", "monitor"] = setting(
        "block", "block (the global behaviour) or monitor: nothing is ever blocked; a match or an "
        "unscannable body the policy would block passes, counted and logged with outcome \"monitored\"",
    )
    unscannable_policy: dict[str, str] = setting(
        {}, "As [scan] unscannable_policy, reason by reason; reasons not listed follow [scan]",
        validate=lambda table: _unscannable_policy_problems(table),
    )
    max_scan_size: int | None = setting(
        None, "As [scan] max_scan_size (absent: [scan]'s)", kind="size", validate=positive,
    )
    skip_types: list[str] | None = setting(None, "As [scan] skip_types, replacing it (absent: [scan]'s)")
    support_contact: str = setting(
        "", "Whom the person should contact, shown on this tenant's block page (one line, at most "
        f"{SUPPORT_CONTACT_MAX} characters)", validate=_support_contact_problem,
    )
    block_page: str | None = setting(
        None, "HTML template of this tenant's block page (absent: [scan]'s); must exist",
        validate=_template_problem,
    )
    rules: str | None = setting(
        None, "A ruleset named in [rulesets] that scans this tenant's bodies instead of [scan] rules "
        "(absent: [scan]'s)",
    )


def load_rulesets(table: Any, source: str) -> tuple[dict[str, str], list[ConfigError]]:
    """``[rulesets] NAME = "dir"``: rule directories loaded beside ``[scan] rules``."""
    if not isinstance(table, dict):
        return {}, [ConfigError(source, "[rulesets]", "expected a table of NAME = \"directory\"")]
    rulesets: dict[str, str] = {}
    errors: list[ConfigError] = []
    for name, directory in table.items():
        if not valid_tenant_name(name):
            errors.append(ConfigError(source, f"[rulesets] {name!r}", "not a ruleset name (lower-case letters, "
                                      "digits, - and _, starting with a letter or digit, at most 63)"))
        elif not isinstance(directory, str) or not directory:
            errors.append(ConfigError(source, f"[rulesets] {name}", f"expected a directory, got {directory!r}"))
        else:
            rulesets[name] = directory
    return rulesets, errors


def load_tenants(table: Any, source: str) -> tuple[dict[str, TenantSettings], list[ConfigError]]:
    """``[tenants.NAME]`` tables: names checked for syntax only (tenants live
    in the register), every value strictly."""
    if not isinstance(table, dict):
        return {}, [ConfigError(source, "[tenants]", "expected tables such as [tenants.acme]")]
    tenants: dict[str, TenantSettings] = {}
    errors: list[ConfigError] = []
    for name, values in table.items():
        if not valid_tenant_name(name):
            errors.append(ConfigError(source, f"[tenants.{name!r}]", "not a tenant name (lower-case letters, "
                                      "digits, - and _, starting with a letter or digit, at most 63)"))
            continue
        tenants[name], errs = load_section(TenantSettings, values, source, f"tenants.{name}")
        errors.extend(errs)
    return tenants, errors


@dataclass(frozen=True)
class TLSSettings:
    """ICAPS (``ssl:`` listeners, gateway.tls): who may finish a handshake."""

    client_certificates: Literal["off", "optional", "required"] = setting(
        "off", "Client certificates on ssl: listeners: off (not asked for), optional (asked for; one "
        "presented must chain to client_ca) or required (no certificate, no handshake). A certificate "
        "bound to a tenant (icap-gateway tenant cert add) authenticates as that tenant without a key"
    )
    client_ca: str = setting(
        "", "PEM bundle of the CA certificates client certificates must chain to (needed unless "
        "client_certificates is off)"
    )


@dataclass(frozen=True)
class GatewayConfig:
    server: ServerSettings = field(default_factory=ServerSettings)
    scan: ScanSettings = field(default_factory=ScanSettings)
    register: RegisterSettings = field(default_factory=RegisterSettings)
    auth: AuthSettings = field(default_factory=AuthSettings)
    monitoring: MonitoringSettings = field(default_factory=MonitoringSettings)
    tls: TLSSettings = field(default_factory=TLSSettings)
    tenants: dict[str, TenantSettings] = field(default_factory=dict)  # [tenants.NAME]
    rulesets: dict[str, str] = field(default_factory=dict)  # [rulesets] NAME = "dir"
    source: str = "<defaults>"

    def state_path(self, *parts: str) -> Path:
        return Path(self.server.state_dir, *parts)

    def rules_path(self) -> Path:
        return Path(self.scan.rules)


def _section_types() -> dict[str, type]:
    hints = {f.name: f.default_factory for f in dataclasses.fields(GatewayConfig)
             if f.name not in ("source", "tenants", "rulesets")}
    return hints  # type: ignore[return-value]


def parse_config(data: dict[str, Any], source: str) -> GatewayConfig:
    """Build a config from parsed TOML; raise ConfigErrors listing every problem."""
    errors: list[ConfigError] = []
    sections: dict[str, Any] = {}
    types_ = _section_types()
    for name, table in data.items():
        if name in ("tenants", "rulesets"):
            sections[name], errs = (load_tenants if name == "tenants" else load_rulesets)(table, source)
            errors.extend(errs)
            continue
        cls = types_.get(name)
        if cls is None:
            errors.append(ConfigError(source, f"[{name}]",
                                      f"unknown section (known: {', '.join(types_)}, rulesets, tenants.NAME)"))
            continue
        sections[name], errs = load_section(cls, table, source, name)
        errors.extend(errs)
    server = sections.get("server")
    for description in server.listen if server is not None else []:
        problem = tls_endpoint_problem(description)
        if problem:
            errors.append(ConfigError(source, "[server] listen", problem))
    tls = sections.get("tls")
    if tls is not None and tls.client_certificates != "off" and not tls.client_ca:
        errors.append(ConfigError(source, "[tls] client_ca", f"client_certificates = {tls.client_certificates!r} "
                                  "needs the CA bundle client certificates chain to"))
    for name, tenant in sections.get("tenants", {}).items():
        if tenant.rules is not None and tenant.rules not in sections.get("rulesets", {}):
            errors.append(ConfigError(source, f"[tenants.{name}] rules", f"no ruleset {tenant.rules!r} in [rulesets]"))
    if errors:
        raise ConfigErrors(errors)
    return GatewayConfig(**sections, source=source)


def load_config(path: str | os.PathLike[str] | None) -> GatewayConfig:
    """Read ``path`` (None: embedded defaults)."""
    if path is None:
        return GatewayConfig()
    source = str(path)
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigErrors([ConfigError(source, "-", "file not found")]) from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigErrors([ConfigError(source, "-", f"not valid TOML: {e}")]) from None
    return parse_config(data, source)


def with_overrides(config: GatewayConfig, **overrides: Any) -> GatewayConfig:
    """Apply command-line overrides given as ``section__key=value`` (None: not given)."""
    by_section: dict[str, dict[str, Any]] = {}
    for name, value in overrides.items():
        if value is None:
            continue
        section, key = name.split("__", 1)
        by_section.setdefault(section, {})[key] = value
    if not by_section:
        return config
    changes = {
        section: dataclasses.replace(getattr(config, section), **values)
        for section, values in by_section.items()
    }
    return dataclasses.replace(config, **changes)


def resolve_path(value: str, config: GatewayConfig) -> Path:
    """Relative paths in a config file are relative to the working directory,
    but the embedded default ``rules`` also works from anywhere in a checkout."""
    path = Path(value)
    if not path.is_absolute() and not path.exists() and (PROJECT_ROOT / path).exists():
        return PROJECT_ROOT / path
    return path


def toml_literal(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):  # an inline table; keys are bare (letters, digits, - and _)
        return "{" + ", ".join(f"{k} = {toml_literal(v)}" for k, v in value.items()) + "}"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_literal(v) for v in value) + "]"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def render_example() -> str:
    """``config/gateway.toml``: every key, commented out at its embedded
    default, with its documentation.  Generated so it cannot drift."""
    from gateway.settings import describe

    lines = [
        "# icap-gateway configuration: every key, at its embedded default.",
        "# Copy this file, uncomment what you change, and check it with:",
        "#   icap-gateway config check gateway.toml",
        "# Sizes take bytes or units (\"64 KiB\", \"1 MiB\"); durations take seconds or",
        "# units (\"500ms\", \"30s\", \"5m\", \"90d\").  Relative paths are relative to the",
        "# working directory.",
        "# Regenerate after adding a key: icap-gateway config example > config/gateway.toml",
    ]
    for section, factory in _section_types().items():
        lines += ["", f"[{section}]"]
        for key, default, doc in describe(factory):
            lines += [f"# {line}" for line in textwrap.wrap(doc, 76, break_on_hyphens=False)]
            lines.append(f"# {key} = {toml_literal(default)}")
            lines.append("")
        lines.pop()
    lines += ["", "# [rulesets]: rule directories loaded beside [scan] rules, each compiled, watched",
              "# and versioned on its own (the ISTag changes when any set changes); a tenant",
              "# uses one by its name in [tenants.NAME] rules.  They load at a restart.",
              "#   [rulesets]", "#   strict = \"/etc/icap-gateway/rules-strict\""]
    # Tenant tables: commented deeper ("#   "), an example, not defaults.
    lines += ["", "# [tenants.NAME]: one tenant's policy (NAME as in the register: icap-gateway",
              "# tenant add NAME), overriding [scan] for that tenant's transactions; keys not",
              "# given take [scan]'s.  SIGHUP re-reads these tables (a bad file keeps the old).",
              "#   [tenants.acme]"]
    examples = {"mode": "monitor", "unscannable_policy": {"too-large": "block"}, "max_scan_size": "64 MiB",
                "skip_types": ["video/*"], "support_contact": "IT helpdesk, +358 9 123 4567",
                "block_page": "config/blockpage.html", "rules": "strict"}
    for key, _, doc in describe(TenantSettings):
        lines += [f"#   # {line}" for line in textwrap.wrap(doc, 72, break_on_hyphens=False)]
        lines.append(f"#   {key} = {toml_literal(examples[key])}")
    return "\n".join(lines) + "\n"
