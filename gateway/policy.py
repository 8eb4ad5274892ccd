"""Per-tenant scan policy: ``[tenants.NAME]`` over ``[scan]``.

``Policies.policy_for(tenant name)`` is what the protocol asks, once per
transaction after authentication: a pure lookup in a table built from the
config file (a tenant without a table, or no tenant, gets ``[scan]``'s).
SIGHUP re-reads the file and swaps the table whole; a file that does not
parse, or a block page template that does not load, keeps the old table and
logs why.  Only the tenant tables reload: they apply over the running
``[scan]`` (the scanner's), and the other sections need a restart.

What each key overrides, and where it acts:

- ``mode``: ``gateway.decision.monitor`` turns a block into a pass recorded
  as "monitored";
- ``unscannable_policy``: ``gateway.decision.normalise`` overrides the
  scanner's action ([scan]'s) reason by reason; ``too-large`` and
  ``engine-error`` also decide what the transaction answers without a scan;
- ``max_scan_size``: the transaction's early too-large answer, and the
  scanner (``ScanContext.max_scan_size``);
- ``skip_types``: the transaction's sniffing;
- ``support_contact`` and ``block_page``: the block page's render;
- ``rules``: the scanner of that ruleset ([rulesets]; ``RulesetScanners``
  makes the ISTag change when any loaded set changes).
"""

from __future__ import annotations

import hashlib
import signal
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from gateway import decision
from gateway.blockpage import BlockPage
from gateway.config import PROJECT_ROOT, GatewayConfig, ScanSettings, TenantSettings, load_config
from gateway.interfaces import ScanContext, Scanner, Verdict
from gateway.settings import ConfigErrors

log = Logger()


@dataclass(frozen=True, slots=True)
class TenantPolicy:
    """Everything about one tenant's transactions the config decides."""

    decision: decision.Policy
    block_page: BlockPage
    skip_types: list[str] = field(default_factory=list)
    support_contact: str = ""
    scanner: Scanner | None = None  # the tenant's ruleset's ([rulesets]); None: [scan] rules


class RulesetScanners:
    """[scan] rules' scanner and one per ``[rulesets]`` entry, as the one
    ``Scanner`` the protocol holds: it scans with [scan] rules (a tenant's
    ruleset is its policy's ``scanner``), and its version, the ISTag's, is
    [scan] rules' alone when no other set is loaded, else a digest of every
    set's version: a reload of any set changes the ISTag, so Squid drops
    what it cached under the old one."""

    def __init__(self, default: Scanner, rulesets: Mapping[str, Scanner]) -> None:
        self.default = default
        self.rulesets = dict(rulesets)

    @property
    def version(self) -> str:
        if not self.rulesets:
            return self.default.version
        parts = [self.default.version, *(f"{name}={s.version}" for name, s in sorted(self.rulesets.items()))]
        return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]

    def scan(self, body: bytes | str, context: ScanContext) -> Deferred[Verdict]:
        return self.default.scan(body, context)

    def scan_then(self, body: bytes | str, context: ScanContext, on_verdict: Callable[[Verdict], object]) -> None:
        self.default.scan_then(body, context, on_verdict)


def _template(value: str) -> Path:
    # As gateway.service.resolve_path: relative to the working directory, or to a source checkout.
    path = Path(value)
    return PROJECT_ROOT / path if not path.is_absolute() and not path.exists() else path


def _decision(scan: ScanSettings, **tenant: Any) -> decision.Policy:
    # What the transaction decides without a scan (an oversize body, a
    # failed scan) follows the same table as the scanner's verdicts.
    return decision.Policy(
        error_policy="fail-open" if scan.policy_for("engine-error") == "pass" else "fail-closed",
        oversize_policy=scan.policy_for("too-large"), max_scan_size=scan.max_scan_size, **tenant)


def scan_policy(scan: ScanSettings, block_page: BlockPage) -> TenantPolicy:
    """[scan]'s policy: every tenant without a table of its own."""
    return TenantPolicy(decision=_decision(scan), block_page=block_page, skip_types=list(scan.skip_types))


def tenant_policy(scan: ScanSettings, tenant: TenantSettings, default: TenantPolicy,
                  templates: Mapping[str, BlockPage], scanners: Mapping[str, Scanner]) -> TenantPolicy:
    """[scan] with ``tenant``'s overrides.  Raises what BlockPage raises for a
    template that does not load (``templates`` shares one per path), and
    ValueError for a ruleset not loaded (``scanners``: [rulesets] at start)."""
    if tenant.rules is not None and tenant.rules not in scanners:
        raise ValueError(f"ruleset {tenant.rules!r} is not loaded ([rulesets] load at a restart)")
    overrides = dict(tenant.unscannable_policy)
    effective = replace(scan, unscannable_policy={**scan.unscannable_policy, **overrides},
                        max_scan_size=tenant.max_scan_size or scan.max_scan_size)
    return TenantPolicy(
        decision=_decision(effective, mode=tenant.mode, unscannable_policy=overrides),
        block_page=templates[tenant.block_page] if tenant.block_page else default.block_page,
        skip_types=list(default.skip_types if tenant.skip_types is None else tenant.skip_types),
        support_contact=tenant.support_contact,
        scanner=scanners[tenant.rules] if tenant.rules is not None else None,
    )


class PolicyTable:
    """The policies of one config file, by tenant name."""

    def __init__(self, config: GatewayConfig, default_block_page: BlockPage,
                 scanners: Mapping[str, Scanner] | None = None) -> None:
        self.default = scan_policy(config.scan, default_block_page)
        templates = {t.block_page: BlockPage(_template(t.block_page))
                     for t in config.tenants.values() if t.block_page}
        self.tenants = {name: tenant_policy(config.scan, t, self.default, templates, scanners or {})
                        for name, t in config.tenants.items()}

    def __call__(self, tenant: str) -> TenantPolicy:
        return self.tenants.get(tenant, self.default)


class Policies:
    """The current table, swapped whole on reload (SIGHUP)."""

    def __init__(self, config: GatewayConfig, default_block_page: BlockPage,
                 load: Callable[[str], GatewayConfig] = load_config,
                 scanners: Mapping[str, Scanner] | None = None) -> None:
        self.source = config.source
        self._scanners = dict(scanners or {})  # by [rulesets] name, as loaded at start
        self._scan = config.scan  # what the scanner runs with: [scan] reloads only at a restart
        self._default_block_page = default_block_page
        self._load = load
        self.table = PolicyTable(config, default_block_page, self._scanners)

    def policy_for(self, tenant: str) -> TenantPolicy:
        return self.table(tenant)

    def reload(self) -> bool:
        """Re-read the config file; on any problem keep the old table, log why."""
        if self.source == "<defaults>":
            return False
        try:
            config = self._load(self.source)
            table = PolicyTable(replace(config, scan=self._scan), self._default_block_page, self._scanners)
        except (ConfigErrors, OSError, ValueError, KeyError) as e:
            # ValueError, KeyError: a template with a bad placeholder (string.Template).
            log.error("SIGHUP: tenant policies not reloaded, keeping the old ones: {why}", why=str(e))
            return False
        self.table = table
        if config.scan != self._scan:
            log.warn("SIGHUP: [scan] changed in {source}: the tenant tables apply over the running [scan] "
                     "until a restart", source=self.source)
        log.info("SIGHUP: tenant policies reloaded from {source} ({count} tenants with a table)",
                 source=self.source, count=len(table.tenants))
        return True

    def install_sighup(self, reactor: Any) -> None:
        """Reload on SIGHUP too, keeping the handlers already installed
        (rules, certificates).  Call from the main thread."""
        chain_sighup(reactor, self.reload)


def chain_sighup(reactor: Any, reload: Callable[[], object]) -> None:
    """Call ``reload`` on the reactor thread at SIGHUP, after the handler
    already installed.  Call from the main thread."""
    previous: Callable[..., Any] | int | None = signal.getsignal(signal.SIGHUP)

    def handler(signum: int, frame: Any) -> None:
        if callable(previous):
            previous(signum, frame)
        reactor.callFromThread(reload)

    signal.signal(signal.SIGHUP, handler)
