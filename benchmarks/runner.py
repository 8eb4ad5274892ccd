"""Run the suite: every target x ruleset x body scenario, then ratios and targets.

Targets (what is measured):
- ``raw``: yara-python in this process, one thread per core (the limit);
- ``cicap``: c-icap's echo service (C, no scanning; the ICAP ceiling);
- ``pyicap``: the pyicap + yara-python thread-per-connection baseline;
- ``gateway``: ``icap-gateway serve``.

Targets run one after the other, never together, so none steals the other's
cores; the generator's own CPU is measured and reported with every row.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from benchmarks.bodies import GiB
from benchmarks.loadgen import LoadSpec, run_load
from benchmarks.procinfo import Sampler, requests_per_process
from benchmarks.raw_yara import run_raw
from benchmarks.rulesets import REPO, Ruleset, compile_yara, resolve
from benchmarks.scenarios import BLOCK_RULESET, blocks, method
from benchmarks.servers import (
    Server,
    ServerUnavailable,
    cicap_version,
    start_cicap,
    start_gateway,
    start_pyicap,
)
from benchmarks.special import raise_nofile, run_huge, run_idle

ALL_SCENARIOS = ["1k", "64k", "1m", "20m", "gzip", "up-1k", "up-1m", "block-1k", "webmix"]
QUICK_SCENARIOS = ["1k", "64k", "1m", "up-1k", "block-1k", "webmix"]
ALL_RULESETS = ["signature-base", "bundled", "empty"]
ALL_TARGETS = ["raw", "cicap", "pyicap", "gateway"]
# optional: the YARA-X limit (worker processes), for a gateway run with
# --gateway-option scan.engine=yara-x; compiling signature-base takes ~10 s
KNOWN_TARGETS = [*ALL_TARGETS, "rawx"]


@dataclass
class Options:
    scenarios: list[str] = field(default_factory=lambda: list(ALL_SCENARIOS))
    rulesets: list[str] = field(default_factory=lambda: list(ALL_RULESETS))
    targets: list[str] = field(default_factory=lambda: list(ALL_TARGETS))
    concurrency: int = 8
    clients: int = 2
    preview: str = "off"  # off | on | both
    preview_size: int | None = None  # None: what the server's OPTIONS advertises
    warmup: float = 1.0
    duration: float = 3.0
    body_file: str | None = None
    huge: bool = False
    huge_size: int = 2 * GiB
    idle: int = 10000  # 0: skip
    idle_targets: list[str] = field(default_factory=lambda: ["gateway", "pyicap"])
    idle_rules: str = "empty"  # ruleset loaded while the idle connections are held
    gateway_options: dict[str, dict[str, object]] = field(default_factory=dict)
    gateway_service: str = "respmod"
    pause: float = 0.0  # seconds of rest between servers, to let others' tests run
    profile: str | None = None  # directory for py-spy flame graphs of server rows
    profile_targets: list[str] = field(default_factory=lambda: ["gateway"])
    profile_format: str = "flamegraph"  # py-spy --format: flamegraph (.svg), raw (.txt), speedscope (.json)
    # connection counts of the worker-balance rows (gateway, 1 KiB, the empty
    # ruleset or else the first); empty: none
    balance: list[int] = field(default_factory=lambda: [4, 8])
    # Whole passes over the servers and rows; each row is then the median of
    # its passes (fold_passes): one pass's ratios move by 20-40 % here.
    repeat: int = 1


Row = dict[str, Any]
Log = Callable[[str], None]


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class Suite:
    def __init__(self, opts: Options, log: Log = _stderr) -> None:
        self.opts = opts
        self.log = log
        self.rows: list[Row] = []
        self.notes: list[str] = []
        self.special: list[Row] = []
        self.started = time.monotonic()
        self._rules: dict[str, Any] = {}
        self._pass = 0
        self.passes: list[Row] = []  # every row of every pass, with --repeat

    # --- running --------------------------------------------------------

    def run(self) -> dict[str, Any]:
        raise_nofile()
        rulesets: list[Ruleset] = []
        for name in self.opts.rulesets:
            rs = resolve(name)
            if rs is None:
                self.note(f"ruleset {name!r} not found here: skipped")
            else:
                rulesets.append(rs)
        if not self.opts.scenarios:
            rulesets = []  # only the memory scenarios
        # the block scenarios' bodies match the bundled rules only: they run
        # with those, in a pass of their own when the bundled rules are not chosen
        if any(blocks(sc) for sc in self.opts.scenarios) \
                and all(rs.name != BLOCK_RULESET for rs in rulesets):
            block_rs = resolve(BLOCK_RULESET)
            if block_rs is not None:
                rulesets.append(block_rs)
        for number in range(max(1, self.opts.repeat)):
            self._pass = number
            if self.opts.repeat > 1:
                self.log(f"pass {self._pass + 1} of {self.opts.repeat}")
            self._measure(rulesets)
        if self.opts.repeat > 1:
            self.passes = self.rows
            self.rows = fold_passes(self.rows)
        if self.opts.idle:
            for target in self.opts.idle_targets:
                self.run_idle(target)
        if self.opts.huge:
            for target in ("gateway", "pyicap"):
                if target in self.opts.targets:
                    self.run_huge(target)
        return self.report()

    def _measure(self, rulesets: list[Ruleset]) -> None:
        """One pass over the servers: every row once."""
        if "cicap" in self.opts.targets and self.opts.scenarios:
            self.run_server("cicap", None, start_cicap)
        # raw YARA runs right before each server row it is compared with (the
        # server idle meanwhile), so both see the same load from anything else
        # on the machine; alone when no scanning server is measured
        scanning = [t for t in ("pyicap", "gateway") if t in self.opts.targets]
        if "raw" in self.opts.targets and not scanning:
            for rs in rulesets:
                for sc in self.scenarios_for(rs):
                    self.run_raw(rs, sc, None)
        if "rawx" in self.opts.targets and "gateway" not in scanning:
            for rs in rulesets:
                for sc in self.scenarios_for(rs):
                    self.run_rawx(rs, sc, None)
        for target in scanning:
            start = self._start_pyicap if target == "pyicap" else self._start_gateway
            for rs in rulesets:
                balance = target == "gateway" and self.opts.balance \
                    and rs.name == self.balance_ruleset() and self._pass == 0
                if self.scenarios_for(rs) or balance:
                    self.run_server(target, rs, lambda rs=rs, start=start: start(rs))

    def note(self, msg: str) -> None:
        self.notes.append(msg)
        self.log(f"NOTE: {msg}")

    def _start_pyicap(self, rs: Ruleset | None) -> Server:
        return start_pyicap(rs.path if rs else None)

    def _start_gateway(self, rs: Ruleset | None) -> Server:
        rules = rs.path if rs else resolve("empty").path  # type: ignore[union-attr]
        return start_gateway(rules, self.opts.gateway_options, self.opts.gateway_service)

    def _previews(self, server: Server) -> list[int | None]:
        size = self.opts.preview_size or server.preview_size or 4096
        return {"off": [None], "on": [size], "both": [None, size]}[self.opts.preview]

    def _compiled(self, rs: Ruleset) -> Any:
        if rs.name not in self._rules:
            t = time.monotonic()
            try:
                self._rules[rs.name] = compile_yara(rs.path)
            except Exception as e:  # yara.Error: a ruleset that does not compile here
                self.note(f"raw yara [{rs.name}]: rules do not compile: {e}")
                self._rules[rs.name] = None
            else:
                self.log(f"raw yara: {rs.describe()} compiled in {time.monotonic() - t:.1f} s")
        return self._rules[rs.name]

    def run_raw(self, rs: Ruleset, sc: str, pair: str | None) -> None:
        """One raw YARA row; ``pair`` names the server row it is measured for."""
        rules = self._compiled(rs)
        if rules is None:
            return
        r = run_raw(rs.path, sc, warmup=min(self.opts.warmup, 0.5), duration=self.opts.duration,
                    body_file=self.opts.body_file, rules=rules)
        row = self._row("raw", rs.name, sc, None)
        row["pair"] = pair
        row.update(
            rps=r.rps, mbps=r.mbps, decoded_mbps=r.decoded_mbps, p50_ms=r.p50_ms,
            p99_ms=r.p99_ms, completed=r.completed, errors=0, threads=r.threads,
            server_cores=r.cpu / r.duration, matches=r.matches,
            machine_cores=r.machine_cpu / r.duration,
            body_bytes=r.body_length,
            cpu_ms_per_req=r.cpu / r.completed * 1e3 if r.completed else None,
        )
        self._add(row)

    def run_rawx(self, rs: Ruleset, sc: str, pair: str | None) -> None:
        """One raw YARA-X row (worker processes), like ``run_raw``."""
        from benchmarks.raw_yarax import compile_yarax, run_rawx

        key = "x:" + rs.name
        if key not in self._rules:
            t = time.monotonic()
            try:
                self._rules[key] = compile_yarax(rs.path)
            except Exception as e:  # yara_x.CompileError
                self.note(f"raw yara-x [{rs.name}]: rules do not compile: {e}")
                self._rules[key] = None
            else:
                self.log(f"raw yara-x: {rs.describe()} compiled in {time.monotonic() - t:.1f} s")
        blob = self._rules[key]
        if blob is None:
            return
        r = run_rawx(blob, sc, warmup=min(self.opts.warmup, 0.5), duration=self.opts.duration,
                     body_file=self.opts.body_file)
        row = self._row("rawx", rs.name, sc, None)
        row["pair"] = pair
        row.update(
            rps=r.rps, mbps=r.mbps, decoded_mbps=r.decoded_mbps, p50_ms=r.p50_ms,
            p99_ms=r.p99_ms, completed=r.completed, errors=0, threads=r.threads,
            server_cores=r.cpu / r.duration, matches=r.matches, body_bytes=r.body_length,
            cpu_ms_per_req=r.cpu / r.completed * 1e3 if r.completed else None,
        )
        self._add(row)

    def run_server(self, target: str, rs: Ruleset | None, start: Callable[[], Server]) -> None:
        label = f"{target}" + (f" [{rs.name}]" if rs else "")
        t = time.monotonic()
        try:
            server = start()
        except ServerUnavailable as e:
            self.note(f"{label}: not run: {e}")
            return
        self.log(f"{label}: ready on port {server.port} in {time.monotonic() - t:.1f} s")
        with server:
            for preview in self._previews(server):
                for sc in self.scenarios_for(rs):
                    if not server.alive():
                        break
                    if rs is not None and "raw" in self.opts.targets:
                        self.run_raw(rs, sc, target)
                    if rs is not None and "rawx" in self.opts.targets and target == "gateway":
                        self.run_rawx(rs, sc, target)
                    self.run_one(target, rs.name if rs else "-", sc, server, preview)
            # The worker balance in the first pass only: it is a share, not a speed.
            if target == "gateway" and rs is not None and rs.name == self.balance_ruleset() and self._pass == 0:
                for connections in self.opts.balance:
                    if server.alive():
                        self.run_balance(rs.name, server, connections)
        if server.proc.returncode is not None and server.info.get("kept_log"):
            self.note(f"{label}: the server exited by itself (status {server.proc.returncode}); "
                      f"its log: {server.info['kept_log']}")
        if self.opts.pause:
            time.sleep(self.opts.pause)

    def scenarios_for(self, rs: Ruleset | None) -> list[str]:
        """The scenarios a row runs with ``rs``: the block scenarios only with the
        rules their bodies match, and only those in the extra block pass."""
        if rs is None or (rs.name == BLOCK_RULESET and BLOCK_RULESET in self.opts.rulesets):
            return list(self.opts.scenarios)
        return [sc for sc in self.opts.scenarios if blocks(sc) == (rs.name == BLOCK_RULESET)]

    def balance_ruleset(self) -> str | None:
        names = [r for r in self.opts.rulesets if resolve(r) is not None]
        return "empty" if "empty" in names else (names[0] if names else None)

    def run_balance(self, ruleset: str, server: Server, connections: int) -> None:
        """Fresh connections, 1 KiB bodies: how many requests each worker served."""
        row = self.run_one("gateway", ruleset, "1k", server, None, concurrency=connections,
                           keep=False)
        if row is None:
            return
        served = [int(n) for n in (row.get("worker_requests") or "").split("/") if n]
        total = sum(served)
        special: Row = {"scenario": "balance", "target": "gateway", "ruleset": ruleset,
                        "concurrency": connections, "rps": row["rps"], "served": served,
                        "unknown": row.get("unknown_requests", 0), "errors": row["errors"],
                        "connections": row.get("connections"),
                        "max_share": max(served) / total if total else None}
        self.special.append(special)
        self.log(f"balance [gateway, {connections} connections]: requests per worker "
                 f"{row.get('worker_requests') or '-'} (connections {row.get('connections') or '-'})")

    def run_one(self, target: str, ruleset: str, sc: str, server: Server,
                preview: int | None, concurrency: int | None = None, keep: bool = True
                ) -> Row | None:
        spec = LoadSpec(server.host, server.port, server.service_for(method(sc)), sc,
                        concurrency=concurrency or self.opts.concurrency,
                        clients=self.opts.clients, preview=preview, warmup=self.opts.warmup,
                        duration=self.opts.duration, body_file=self.opts.body_file,
                        authorization=server.authorization)
        sampler = Sampler(server.pid, port=server.port)
        sampler.begin()
        spy = self._profile(target, ruleset, sc, preview, server)
        try:
            r = run_load(spec, sampler.during)
        except RuntimeError as e:
            self.note(f"{target} [{ruleset}] {sc}: load failed: {e}")
            return None
        finally:
            if spy is not None:
                try:
                    spy.wait(30)
                except subprocess.TimeoutExpired:
                    spy.kill()
        u = sampler.end()
        served, unknown = requests_per_process(u.owners or {}, r.per_port)
        row = self._row(target, ruleset, sc, preview)
        row["concurrency"] = spec.concurrency
        row.update(
            rps=r.rps, mbps=r.mbps, decoded_mbps=r.decoded_mbps, p50_ms=r.p50_ms,
            p99_ms=r.p99_ms, completed=r.completed, errors=r.errors,
            statuses={str(k): v for k, v in sorted(r.statuses.items())},
            error_samples=r.error_samples, reconnects=r.reconnects,
            server_cores=u.cpu / r.duration, generator_cores=r.generator_cores,
            machine_cores=u.machine_cpu / r.duration,
            generator_us_per_request=r.generator_us_per_request,
            rss_start_mib=u.rss_start_kib / 1024, rss_peak_mib=u.peak_mib,
            rss_growth_mib=u.growth_mib, body_bytes=r.body_length,
            cpu_ms_per_req=u.cpu / r.completed * 1e3 if r.completed else None,
            # how the server's processes share the connections, e.g. "8/0": a
            # multi-worker server that does not spread them uses one core
            connections="/".join(str(n) for n in sorted(
                (u.connections or {}).values(), reverse=True) if n or len(u.connections or {}) > 1)
            if u.connections else None,
            blocked=r.blocked,
            # requests each process served, largest first ("412/398": two workers)
            worker_requests="/".join(str(n) for n in sorted(served.values(), reverse=True))
            if served else None,
            unknown_requests=unknown,
        )
        if keep:
            self._add(row)
        return row

    def _profile(self, target: str, ruleset: str, sc: str, preview: int | None,
                 server: Server) -> subprocess.Popen[bytes] | None:
        """With --profile DIR: py-spy records the server tree for this row (a
        flame graph SVG per row; sampling slows the server a little)."""
        if not self.opts.profile or target not in self.opts.profile_targets:
            return None
        spy = Path(sys.executable).with_name("py-spy")
        exe = str(spy) if spy.exists() else shutil.which("py-spy")
        if exe is None:
            self.note("--profile: py-spy is not installed (pip install py-spy): not profiling")
            self.opts.profile = None
            return None
        out = Path(self.opts.profile)
        out.mkdir(parents=True, exist_ok=True)
        fmt = self.opts.profile_format
        suffix = {"flamegraph": ".svg", "raw": ".txt", "speedscope": ".json"}[fmt]
        name = f"{target}-{ruleset}-{sc}" + (f"-preview{preview}" if preview else "") + suffix
        seconds = max(1, round(self.opts.warmup + self.opts.duration))
        return subprocess.Popen(
            [exe, "record", "--subprocesses", "--nonblocking", "-r", "100", "-d", str(seconds),
             "--format", fmt, "-o", str(out / name), "-p", str(server.pid)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def run_idle(self, target: str) -> None:
        rs = resolve(self.opts.idle_rules)
        if rs is None:
            self.note(f"idle [{target}]: ruleset {self.opts.idle_rules!r} not found: not run")
            return
        starts = {"gateway": self._start_gateway, "pyicap": self._start_pyicap,
                  "cicap": lambda _rs: start_cicap()}
        try:
            server = starts[target](rs)
        except ServerUnavailable as e:
            self.note(f"idle [{target}]: not run: {e}")
            return
        with server:
            r = run_idle(server.host, server.port, server.service, server.pid, self.opts.idle)
        row: Row = {"scenario": "idle", "target": target, "ruleset": rs.name, **asdict(r),
                    "growth_mib": r.growth_mib, "kib_per_connection": r.kib_per_connection}
        self.special.append(row)
        self.log(f"idle [{target}]: {r.opened}/{r.requested} open, {r.answered} answered, "
                 f"{r.still_alive}/{r.checked} alive at the end; RSS {r.rss_before_mib:.1f} -> "
                 f"{r.rss_after_mib:.1f} MiB ({r.kib_per_connection:.1f} KiB/conn), PSS "
                 f"{r.pss_before_mib:.1f} -> {r.pss_after_mib:.1f} MiB, {r.processes} processes"
                 + (f"; error: {r.error}" if r.error else ""))

    def run_huge(self, target: str) -> None:
        rs = resolve("signature-base") or resolve("empty")
        assert rs is not None
        start = self._start_gateway if target == "gateway" else self._start_pyicap
        try:
            server = start(rs)
        except ServerUnavailable as e:
            self.note(f"huge [{target}]: not run: {e}")
            return
        with server:
            r = run_huge(server.host, server.port, server.service, server.pid, self.opts.huge_size,
                         authorization=server.authorization)
        row: Row = {"scenario": "huge", "target": target, "ruleset": rs.name, **asdict(r),
                    "growth_mib": r.growth_mib, "anon_growth_mib": r.anon_growth_mib,
                    "mbps": r.mbps}
        self.special.append(row)
        self.log(f"huge [{target}]: {_size(r.size)} in {r.seconds:.1f} s, status "
                 f"{r.status}, RSS {r.rss_start_mib:.1f} -> peak {r.rss_peak_mib:.1f} MiB "
                 f"(anonymous {r.anon_start_mib:.1f} -> {r.anon_peak_mib:.1f})"
                 + (f"; error: {r.error}" if r.error else ""))

    def _row(self, target: str, ruleset: str, scenario: str, preview: int | None) -> Row:
        return {"target": target, "ruleset": ruleset, "scenario": scenario,
                "preview": preview, "concurrency": self.opts.concurrency}

    def _add(self, row: Row) -> None:
        if self.opts.repeat > 1:
            row["pass"] = self._pass + 1
        self.rows.append(row)
        self.log(format_row(row))

    # --- results --------------------------------------------------------

    def ratios(self) -> list[Row]:
        """gateway and pyicap against raw YARA (same rules and body) and c-icap (same body)."""
        out: list[Row] = []
        index = {(r["target"], r["ruleset"], r["scenario"], r["preview"]): r for r in self.rows}
        # the raw row measured for this server (the last one before it)
        paired: dict[tuple[str, str, str], Row] = {}
        paired_x: dict[tuple[str, str, str], Row] = {}
        for r in self.rows:
            if r["target"] == "raw":
                paired[(r.get("pair") or "", r["ruleset"], r["scenario"])] = r
            if r["target"] == "rawx":
                paired_x[(r.get("pair") or "", r["ruleset"], r["scenario"])] = r
        for r in self.rows:
            if r["target"] not in ("gateway", "pyicap"):
                continue
            raw = paired.get((r["target"], r["ruleset"], r["scenario"])) \
                or paired.get(("", r["ruleset"], r["scenario"]))
            rawx = paired_x.get((r["target"], r["ruleset"], r["scenario"])) \
                or paired_x.get(("", r["ruleset"], r["scenario"]))
            cicap = index.get(("cicap", "-", r["scenario"], r["preview"]))
            pyicap = index.get(("pyicap", r["ruleset"], r["scenario"], r["preview"])) \
                if r["target"] == "gateway" else None
            out.append({
                "target": r["target"], "ruleset": r["ruleset"], "scenario": r["scenario"],
                "preview": r["preview"],
                "vs_raw": r["rps"] / raw["rps"] if raw and raw["rps"] else None,
                "vs_cicap": r["rps"] / cicap["rps"] if cicap and cicap["rps"] else None,
                # CPU efficiency: raw YARA's CPU per scan over the server's CPU per
                # request; unlike req/s it barely moves when other work shares the cores
                "cpu_vs_raw": _div(raw and raw.get("cpu_ms_per_req"), r.get("cpu_ms_per_req")),
                "cpu_vs_cicap": _div(r.get("cpu_ms_per_req"), cicap and cicap.get("cpu_ms_per_req"),
                                     invert=True),
                "vs_rawx": r["rps"] / rawx["rps"] if rawx and rawx["rps"] else None,
                "cpu_vs_rawx": _div(rawx and rawx.get("cpu_ms_per_req"), r.get("cpu_ms_per_req")),
                # the cores raw YARA's threads actually got: well under their
                # number means other work took the machine and the req/s ratio is noise
                "raw_cores": raw.get("server_cores") if raw else None,
                "raw_threads": raw.get("threads") if raw else None,
                # the server's CPU per request over pyicap's, same rules and body
                "cpu_vs_pyicap": _div(r.get("cpu_ms_per_req"), pyicap and pyicap.get("cpu_ms_per_req")),
                "cpu_seconds": _cpu_seconds(r),
                "pyicap_cpu_seconds": _cpu_seconds(pyicap),
                "cicap_cpu_seconds": _cpu_seconds(cicap),
                "body_bytes": r.get("body_bytes"),
                # cores busy with work neither the server nor the generator did,
                # in this row and in the c-icap row it is compared with
                "other_cores": _other_cores(r),
                "cicap_other_cores": _other_cores(cicap) if cicap else None,
            })
        return out

    def targets(self, ratios: list[Row]) -> list[Row]:
        """Issue 9's targets, each met (True), missed (False) or UNSURE (None, with
        ``why``) when the run was too contended to tell."""
        out: list[Row] = []
        for x in ratios:
            if x["target"] != "gateway":
                continue
            out += _cpu_vs_pyicap_target(x)
            if x["ruleset"] == "signature-base" and x["vs_raw"] is not None:
                out.append(_raw_target(x))
            if x["ruleset"] == "empty" and x["scenario"] == "1k" and x["preview"] is None:
                out += _cicap_targets(x)
        for s in self.special:
            if s["target"] == "gateway" and s["scenario"] == "balance":
                out.append(_balance_target(s))
        for s in self.special:
            if s["target"] != "gateway":
                continue
            if s["scenario"] == "huge":
                ok = s["status"] in (200, 204) and s["growth_mib"] < 64
                out.append({"target": f"RSS growth < 64 MiB streaming {_size(s['size'])}",
                            "value": s["growth_mib"], "goal": 64, "met": ok})
                if "anon_growth_mib" in s:  # without mapped files (page cache)
                    out.append({"target": f"anonymous RSS growth < 64 MiB streaming {_size(s['size'])}",
                                "value": s["anon_growth_mib"], "goal": 64,
                                "met": s["status"] in (200, 204) and s["anon_growth_mib"] < 64})
            if s["scenario"] == "idle":
                ok = s["opened"] == s["requested"] and s["still_alive"] == s["checked"] \
                    and s["rss_after_mib"] < 300
                out.append({"target": f"{s['requested']} idle connections in < 300 MiB RSS",
                            "value": s["rss_after_mib"], "goal": 300, "met": ok})
        return out

    def report(self) -> dict[str, Any]:
        ratios = self.ratios()
        return {
            "machine": machine_info(),
            "options": {k: v for k, v in asdict(self.opts).items()},
            "results": self.rows,
            "passes": self.passes,
            "special": self.special,
            "ratios": ratios,
            "targets": self.targets(ratios),
            "notes": self.notes,
            "wall_seconds": time.monotonic() - self.started,
        }


# a row's "other" cores (busy - server - generator) above this: something else ran
# on the machine (loopback kernel work alone stays under ~0.1 core here)
CONTENDED_CORES = 0.35
MIN_REQUESTS = 50  # fewer requests traced to workers than this: no balance verdict
# CPU is counted in clock ticks (10 ms): a row whose server used less CPU than
# this in its window gives a CPU-per-request figure too coarse for a verdict
MIN_CPU_SECONDS = 0.25
BALANCE_SHARE = 0.6
KEY_SIZE = 64 * 1024  # signature-base: under this 0.75 x raw YARA, from this 0.9 x


# What a row's passes are folded by: each its own median.  The rest of the
# row (statuses, requests per process, the window's request count) is the
# pass whose CPU per request is the median's, so it stays one real window.
MEDIAN_FIELDS = ("rps", "mbps", "decoded_mbps", "p50_ms", "p99_ms", "server_cores", "generator_cores",
                 "machine_cores", "generator_us_per_request", "cpu_ms_per_req")


def fold_passes(rows: list[Row]) -> list[Row]:
    """One row per (target, rules, body, preview, pairing, connections) in
    the order first measured: the median of each of MEDIAN_FIELDS over its
    passes, errors summed, ``runs`` and the spread of req/s and of CPU per
    request kept (``rps_range``, ``cpu_range``)."""
    groups: dict[tuple[Any, ...], list[Row]] = {}
    for row in rows:
        key = (row["target"], row["ruleset"], row["scenario"], row["preview"], row.get("pair"),
               row.get("concurrency"))
        groups.setdefault(key, []).append(row)
    out: list[Row] = []
    for group in groups.values():
        by_cpu = sorted(group, key=lambda r: (r.get("cpu_ms_per_req") is None, r.get("cpu_ms_per_req") or 0.0))
        folded = dict(by_cpu[(len(by_cpu) - 1) // 2])
        folded.pop("pass", None)
        for name in MEDIAN_FIELDS:
            values = [r[name] for r in group if r.get(name) is not None]
            if values:
                folded[name] = statistics.median(values)
        folded["errors"] = sum(int(r.get("errors") or 0) for r in group)
        # Passes, not rows: with --preview both, raw YARA runs before each
        # preview's row, twice a pass (both windows enter its medians).
        folded["runs"] = len({r.get("pass") for r in group})
        for name, spread in (("rps", "rps_range"), ("cpu_ms_per_req", "cpu_range")):
            values = [r[name] for r in group if r.get(name) is not None]
            folded[spread] = [min(values), max(values)] if values else None
        out.append(folded)
    return out


def _cpu_seconds(row: Row | None) -> float | None:
    """The server CPU seconds a row's window measured."""
    if not row or not row.get("cpu_ms_per_req") or not row.get("completed"):
        return None
    return float(row["cpu_ms_per_req"]) * int(row["completed"]) / 1e3


def _too_little_cpu(x: Row, other: str) -> str | None:
    """Why a CPU-per-request ratio of the gateway and ``other`` is too coarse, if it is."""
    for name, seconds in (("gateway", x.get("cpu_seconds")), (other, x.get(f"{other}_cpu_seconds"))):
        if seconds is not None and seconds < MIN_CPU_SECONDS:
            return (f"the {name} row measured only {seconds:.2f} s of server CPU "
                    f"(clock ticks of 10 ms): longer rows (--duration)")
    return None


def _other_cores(row: Row | None) -> float | None:
    if not row or row.get("machine_cores") is None or row.get("server_cores") is None:
        return None
    return float(row["machine_cores"]) - float(row["server_cores"]) - float(row.get("generator_cores") or 0)


def _scenario_label(x: Row) -> str:
    return f"{x['ruleset']} {x['scenario']}" + (f" (preview {x['preview']})" if x["preview"] else "")


def _cpu_vs_pyicap_target(x: Row) -> list[Row]:
    value = x.get("cpu_vs_pyicap")
    if value is None:
        return []
    t: Row = {"target": f"gateway CPU/transaction <= pyicap's, {_scenario_label(x)}",
              "value": value, "goal": 1.0, "met": value <= 1.0}
    why = _too_little_cpu(x, "pyicap")
    if why:
        t["met"], t["why"] = None, why
    return [t]


def _raw_target(x: Row) -> Row:
    goal = 0.9 if (x.get("body_bytes") or 0) >= KEY_SIZE else 0.75
    t: Row = {"target": f"gateway >= {goal} x raw YARA req/s, {_scenario_label(x)}",
              "value": x["vs_raw"], "goal": goal, "met": x["vs_raw"] >= goal,
              "cpu_value": x.get("cpu_vs_raw")}
    cores, threads = x.get("raw_cores"), x.get("raw_threads")
    if cores is not None and threads and cores < 0.75 * threads:
        t["met"] = None
        t["why"] = (f"raw YARA got {cores:.2f} of its {threads} cores: the machine "
                    f"was busy, rerun (CPU ratio {_fmt(x.get('cpu_vs_raw'), '.2f')})")
    elif (x.get("other_cores") or 0) > CONTENDED_CORES:
        t["met"] = None
        t["why"] = (f"{x['other_cores']:.2f} cores went to other work during the gateway row "
                    f"(CPU ratio {_fmt(x.get('cpu_vs_raw'), '.2f')})")
    return t


def _cicap_targets(x: Row) -> list[Row]:
    out: list[Row] = []
    busy = max(x.get("other_cores") or 0, x.get("cicap_other_cores") or 0)
    if x.get("vs_cicap") is not None:
        t: Row = {"target": "gateway empty ruleset 1 KiB >= 0.4 x c-icap echo req/s",
                  "value": x["vs_cicap"], "goal": 0.4, "met": x["vs_cicap"] >= 0.4}
        if busy > CONTENDED_CORES:
            t["met"], t["why"] = None, f"{busy:.2f} cores went to other work in one of the rows"
        out.append(t)
    ratio = x.get("cpu_vs_cicap")
    if ratio is not None:
        # cpu_vs_cicap is c-icap's CPU over the gateway's: its inverse is "x c-icap's"
        times = 1 / ratio
        t = {"target": "gateway empty ruleset 1 KiB server CPU/transaction <= 3 x c-icap's",
             "value": times, "goal": 3.0, "met": times <= 3.0}
        why = _too_little_cpu(x, "cicap")
        if why:
            t["met"], t["why"] = None, why
        out.append(t)
    return out


def _balance_target(s: Row) -> Row:
    share = s.get("max_share")
    t: Row = {"target": f"with {s['concurrency']} connections no worker serves > 60 % of requests "
                        f"({'/'.join(str(n) for n in s.get('served') or []) or '-'})",
              "value": share if share is not None else float("nan"), "goal": BALANCE_SHARE,
              "met": share is not None and share <= BALANCE_SHARE}
    total = sum(s.get("served") or [])
    if share is None or total < MIN_REQUESTS:
        t["met"], t["why"] = None, f"only {total} requests traced to a worker"
    elif (s.get("unknown") or 0) > total:
        t["met"], t["why"] = None, (f"{s['unknown']} requests went over connections opened after "
                                    f"the mid-row sample, only {total} traced to a worker")
    return t


def _div(a: Any, b: Any, invert: bool = False) -> float | None:
    """a / b (or b / a with ``invert``), None when either is missing or zero."""
    if not a or not b:
        return None
    return b / a if invert else a / b


def _verdict(t: Row) -> str:
    if t["met"] is None:
        return "UNSURE: " + t.get("why", "")
    return "MET" if t["met"] else "MISSED"


def _size(n: int) -> str:
    return f"{n / GiB:.2f} GiB" if n >= GiB else f"{n / 1024**2:.0f} MiB"


def _label(r: Row) -> str:
    return f"{r['target']}>{r['pair']}" if r.get("pair") else r["target"]


def _fmt(v: Any, spec: str = ".1f") -> str:
    if v is None:
        return "-"
    return format(v, spec)


def format_row(r: Row) -> str:
    pv = f" pv{r['preview']}" if r.get("preview") else ""
    extra = ""
    if r["target"] not in ("raw", "rawx"):
        extra = (f" err={r.get('errors', 0)} srv={_fmt(r.get('server_cores'), '.2f')}c"
                 f" gen={_fmt(r.get('generator_cores'), '.2f')}c"
                 f" machine={_fmt(r.get('machine_cores'), '.2f')}c"
                 f" rss={_fmt(r.get('rss_peak_mib'))}MiB conns={r.get('connections') or '-'}")
    return (f"{_label(r):10} {r['ruleset']:15} {r['scenario']:5}{pv} "
            f"{_fmt(r['rps'], '9.1f')} req/s {_fmt(r['mbps'], '8.1f')} MB/s "
            f"p50={_fmt(r['p50_ms'], '.2f')}ms p99={_fmt(r['p99_ms'], '.2f')}ms{extra}")


def markdown(report: dict[str, Any]) -> str:
    """The results as Markdown tables (for benchmarks/README.md)."""
    m = report["machine"]
    out = [f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory']}, Linux {m['kernel']}; "
           f"Python {m['python']}, yara-python {m['yara-python']}, yara-x {m['yara-x']}, "
           f"pyicap {m['pyicap']}, Twisted {m['twisted']}, c-icap {m['c-icap']}; "
           f"commit {m['commit']}; {m['date']}.", ""]
    runs = int(report.get("options", {}).get("repeat") or 1)
    if runs > 1:
        out[-1:] = ["", f"Each row is the median of its {runs} passes (`--repeat {runs}`).", ""]
    ratio = {(x["target"], x["ruleset"], x["scenario"], x["preview"]): x for x in report["ratios"]}
    out.append("| target | rules | body | req/s | MB/s | p50 ms | p99 ms | err | srv cores | "
               "gen cores | busy cores | srv CPU ms/req | peak RSS MiB | conns/process | "
               "req/process | blocked | x raw | x c-icap | CPU x raw | CPU x pyicap |")
    out.append("|" + "---|" * 20)
    for r in report["results"]:
        x = ratio.get((r["target"], r["ruleset"], r["scenario"], r["preview"]), {})
        body = r["scenario"] + (f" (preview {r['preview']})" if r["preview"] else "")
        out.append("| " + " | ".join([
            _label(r), r["ruleset"], body, _fmt(r["rps"]), _fmt(r["mbps"]),
            _fmt(r["p50_ms"], ".2f"), _fmt(r["p99_ms"], ".2f"), str(r.get("errors", 0)),
            _fmt(r.get("server_cores"), ".2f"), _fmt(r.get("generator_cores"), ".2f"),
            _fmt(r.get("machine_cores"), ".2f"), _fmt(r.get("cpu_ms_per_req"), ".3f"),
            _fmt(r.get("rss_peak_mib")), r.get("connections") or "-",
            r.get("worker_requests") or "-", str(r.get("blocked", "-")),
            _fmt(x.get("vs_raw"), ".2f"),
            _fmt(x.get("vs_cicap"), ".2f"), _fmt(x.get("cpu_vs_raw"), ".2f"),
            _fmt(x.get("cpu_vs_pyicap"), ".2f"),
        ]) + " |")
    if report["targets"]:
        out += ["", "| target | measured | goal | |", "|---|---|---|---|"]
        for t in report["targets"]:
            out.append(f"| {t['target']} | {t['value']:.2f} | {t['goal']} | "
                       f"{_verdict(t).lower()} |")
    return "\n".join(out)


def table(report: dict[str, Any]) -> str:
    ratio = {(x["target"], x["ruleset"], x["scenario"], x["preview"]): x for x in report["ratios"]}
    head = ["target", "rules", "body", "preview", "req/s", "MB/s", "p50 ms", "p99 ms", "errors",
            "srv cores", "gen cores", "busy cores", "srv CPU ms/req", "peak RSS MiB",
            "conns/process", "req/process", "blocked", "x raw", "x c-icap", "CPU x raw",
            "CPU x c-icap", "CPU x pyicap"]
    with_x = any(r["target"] == "rawx" for r in report["results"])
    if with_x:
        head += ["x rawx", "CPU x rawx"]
    folded = any(r.get("runs", 1) > 1 for r in report["results"])
    if folded:  # --repeat: each row is a median; how far its passes spread
        head += ["passes", "CPU ms/req range"]
    lines = [head]
    for r in report["results"]:
        x = ratio.get((r["target"], r["ruleset"], r["scenario"], r["preview"]), {})
        extra = [_fmt(x.get("vs_rawx"), ".2f"), _fmt(x.get("cpu_vs_rawx"), ".2f")] if with_x else []
        if folded:
            spread = r.get("cpu_range")
            extra += [str(r.get("runs", 1)), f"{spread[0]:.3f}-{spread[1]:.3f}" if spread else "-"]
        lines.append([
            _label(r), r["ruleset"], r["scenario"], str(r["preview"] or "off"),
            _fmt(r["rps"]), _fmt(r["mbps"]), _fmt(r["p50_ms"], ".2f"), _fmt(r["p99_ms"], ".2f"),
            str(r.get("errors", 0)), _fmt(r.get("server_cores"), ".2f"),
            _fmt(r.get("generator_cores"), ".2f"), _fmt(r.get("machine_cores"), ".2f"),
            _fmt(r.get("cpu_ms_per_req"), ".3f"), _fmt(r.get("rss_peak_mib")),
            r.get("connections") or "-", r.get("worker_requests") or "-",
            str(r.get("blocked", "-")),
            _fmt(x.get("vs_raw"), ".2f"), _fmt(x.get("vs_cicap"), ".2f"),
            _fmt(x.get("cpu_vs_raw"), ".2f"), _fmt(x.get("cpu_vs_cicap"), ".2f"),
            _fmt(x.get("cpu_vs_pyicap"), ".2f"), *extra,
        ])
    widths = [max(len(row[i]) for row in lines) for i in range(len(head))]
    out = ["  ".join(c.ljust(w) if i < 4 else c.rjust(w) for i, (c, w) in enumerate(
        zip(row, widths, strict=True))) for row in lines]
    out.insert(1, "  ".join("-" * w for w in widths))
    if not report["results"]:
        out = []
    for s in report["special"]:
        if s["scenario"] == "idle":
            out.append(f"idle [{s['target']}]: {s['opened']}/{s['requested']} connections, "
                       f"{s['still_alive']}/{s['checked']} alive at the end, server RSS "
                       f"{s['rss_before_mib']:.1f} -> {s['rss_after_mib']:.1f} MiB "
                       f"({s['kib_per_connection']:.1f} KiB per connection; PSS "
                       f"{s.get('pss_before_mib', 0):.1f} -> {s.get('pss_after_mib', 0):.1f} MiB; "
                       f"{s.get('processes', 1)} processes)")
        elif s["scenario"] == "balance":
            out.append(f"balance [{s['target']}, {s['ruleset']}, 1k, {s['concurrency']} connections]: "
                       f"{_fmt(s.get('rps'))} req/s, requests per worker "
                       f"{'/'.join(str(n) for n in s.get('served') or []) or '-'} "
                       f"({s.get('unknown', 0)} untraced), connections {s.get('connections') or '-'}")
        else:
            out.append(f"huge [{s['target']}]: {_size(s['size'])}, status {s['status']}, "
                       f"{s['seconds']:.1f} s ({s['mbps']:.0f} MB/s), server RSS "
                       f"{s['rss_start_mib']:.1f} -> peak {s['rss_peak_mib']:.1f} MiB "
                       f"(+{s['growth_mib']:.1f}; anonymous +{s.get('anon_growth_mib', 0):.1f})"
                       + (f", error: {s['error']}" if s["error"] else ""))
    if report["targets"]:
        out.append("")
        out.append("targets:")
        for t in report["targets"]:
            cpu = f", CPU ratio {t['cpu_value']:.2f}" if t.get("cpu_value") is not None else ""
            out.append(f"  [{_verdict(t)}] {t['target']}: "
                       f"{t['value']:.2f} (goal {t['goal']}{cpu})")
    for n in report["notes"]:
        out.append(f"note: {n}")
    return "\n".join(out)


def machine_info() -> dict[str, Any]:
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = "?"
    try:
        kib = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f"{kib / 1024 / 1024:.1f} GiB"
    except (OSError, ValueError, IndexError):
        pass

    def version(mod: str) -> str:
        try:
            from importlib.metadata import version as v

            return v(mod)
        except Exception:
            return "-"

    try:
        commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                                capture_output=True, text=True, check=False).stdout.strip()
    except OSError:
        commit = "?"
    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory": mem,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "yara-python": version("yara-python"),
        "yara-x": version("yara-x"),
        "pyicap": version("pyicap"),
        "twisted": version("twisted"),
        "c-icap": cicap_version(),
        "commit": commit,
    }


def write_json(report: dict[str, Any], path: str) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(report, indent=2, default=str) + "\n")
