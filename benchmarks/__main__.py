"""``python -m benchmarks`` (``make bench ARGS=...``): see benchmarks/README.md."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from benchmarks.bodies import parse_size
from benchmarks.plot import plot_throughput
from benchmarks.runner import (
    ALL_RULESETS,
    ALL_SCENARIOS,
    ALL_TARGETS,
    KNOWN_TARGETS,
    QUICK_SCENARIOS,
    Options,
    Suite,
    markdown,
    table,
    write_json,
)
from benchmarks.scenarios import SCENARIOS
from benchmarks.servers import parse_option

# git-ignored, like every run's output; README links it and a committed snapshot
DEFAULT_PLOT = str(Path(__file__).resolve().parent / "results" / "throughput.png")


def _list(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="ICAP gateway benchmarks against raw YARA, pyicap and c-icap baselines.")
    p.add_argument("--quick", action="store_true",
                   help=f"scenarios {','.join(QUICK_SCENARIOS)}, signature-base and empty rules "
                        "(bundled for the block path), 2 s each, 2,000 idle connections "
                        "(5-6 minutes)")
    p.add_argument("--scenarios", type=_list,
                   help=f"body scenarios, from {','.join([*SCENARIOS, 'file'])}, or none "
                        f"(default {','.join(ALL_SCENARIOS)})")
    p.add_argument("--rulesets", type=_list,
                   help=f"rulesets: names ({','.join(ALL_RULESETS)},reversinglabs) or directories "
                        f"(default {','.join(ALL_RULESETS)})")
    p.add_argument("--targets", type=_list,
                   help=f"what to measure (default {','.join(ALL_TARGETS)}; also rawx: the "
                        "YARA-X limit, for --gateway-option scan.engine=yara-x)")
    p.add_argument("--concurrency", "-c", type=int, default=8, help="persistent connections (8)")
    p.add_argument("--clients", type=int, default=2, help="generator processes (2)")
    p.add_argument("--preview", choices=["off", "on", "both"], default="off",
                   help="send a Preview (size from the server's OPTIONS, or --preview-size)")
    p.add_argument("--preview-size", type=int)
    p.add_argument("--duration", type=float, help="measured seconds per row (3; --quick 2)")
    p.add_argument("--warmup", type=float, help="unmeasured seconds before each row (1; --quick 0.5)")
    p.add_argument("--repeat", type=int, default=1, metavar="N",
                   help="measure every row in N whole passes and report each row's median (1); "
                        "the targets are then decided on the medians")
    p.add_argument("--body-file", metavar="PATH",
                   help="send this file's bytes (scenario 'file'), made unique per request; a "
                        "directory: all its files, taken in turn")
    p.add_argument("--huge", action="store_true",
                   help="also stream one huge body through the gateway and pyicap, watching RSS")
    p.add_argument("--huge-size", type=parse_size, default=None, help="size of --huge (2 GiB)")
    p.add_argument("--idle", type=int, help="idle connections to open (10000; --quick 2000; 0 skips)")
    p.add_argument("--idle-targets", type=_list, default=None,
                   help="servers for the idle scenario (gateway,pyicap)")
    p.add_argument("--idle-rules", default="empty",
                   help="ruleset loaded during the idle scenario (empty)")
    p.add_argument("--gateway-option", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="extra gateway config, e.g. server.workers=2 (repeatable)")
    p.add_argument("--gateway-service", default="respmod", help="ICAP service path of the gateway")
    p.add_argument("--pause", type=float, default=0.0,
                   help="seconds of rest between servers (let other work on the machine run)")
    p.add_argument("--profile", metavar="DIR",
                   help="py-spy flame graph (SVG) of the gateway for every row, into DIR "
                        "(sampling slows it a little: do not quote those rows' figures)")
    p.add_argument("--profile-targets", type=_list, default=None,
                   help="servers to profile with --profile (gateway)")
    p.add_argument("--profile-format", choices=("flamegraph", "raw", "speedscope"), default="flamegraph",
                   help="py-spy's output: an SVG flame graph, or raw collapsed stacks (.txt, one line a "
                        "stack: to sum with a script), or speedscope JSON")
    p.add_argument("--balance", type=_list, default=None,
                   help="connection counts of the worker-balance rows (4,8; none skips)")
    p.add_argument("--plot", metavar="FILE", default=DEFAULT_PLOT,
                   help="PNG of throughput against body size (benchmarks/results/throughput.png; "
                        "none skips)")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    p.add_argument("--markdown", metavar="FILE", help="also write the results as Markdown tables")
    p.add_argument("--from-json", metavar="FILE",
                   help="run nothing: print the tables of an earlier --json file")
    return p


def options_from(args: argparse.Namespace) -> Options:
    o = Options()
    if args.quick:
        o.scenarios = list(QUICK_SCENARIOS)
        o.rulesets = ["signature-base", "empty"]
        o.warmup, o.duration, o.idle = 0.5, 2.0, 2000
    if args.body_file and not args.scenarios:
        o.scenarios = ["file"]
    o.scenarios = args.scenarios or o.scenarios
    if o.scenarios == ["none"]:  # only the memory scenarios (--huge, --idle)
        o.scenarios = []
    o.rulesets = args.rulesets or o.rulesets
    o.targets = args.targets or o.targets
    o.concurrency = args.concurrency
    o.clients = args.clients
    o.preview = args.preview
    o.preview_size = args.preview_size
    o.duration = args.duration if args.duration is not None else o.duration
    o.warmup = args.warmup if args.warmup is not None else o.warmup
    o.body_file = args.body_file
    if args.repeat < 1:
        raise SystemExit("--repeat takes a number of passes, 1 or more")
    o.repeat = args.repeat
    o.huge = args.huge
    if args.huge_size:
        o.huge_size = args.huge_size
    o.idle = args.idle if args.idle is not None else o.idle
    o.idle_rules = args.idle_rules
    if args.idle_targets is not None:
        o.idle_targets = args.idle_targets
    else:
        o.idle_targets = [t for t in o.idle_targets if t in o.targets]
    for text in args.gateway_option:
        section, key, value = parse_option(text)
        o.gateway_options.setdefault(section, {})[key] = value
    o.gateway_service = args.gateway_service
    o.pause = args.pause
    if args.balance is not None:
        o.balance = [] if args.balance == ["none"] else [int(n) for n in args.balance]
    o.profile = args.profile
    if args.profile_targets:
        o.profile_targets = args.profile_targets
    o.profile_format = args.profile_format
    unknown = [s for s in o.scenarios if s not in SCENARIOS and s != "file"]
    if unknown:
        raise SystemExit(f"unknown scenario(s): {', '.join(unknown)}")
    bad = [t for t in o.targets if t not in KNOWN_TARGETS]
    if bad:
        raise SystemExit(f"unknown target(s): {', '.join(bad)}")
    return o


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.from_json:
        report = json.loads(Path(args.from_json).read_text())
        # ratios and targets again, with this version's rules for them
        suite = Suite(Options(), log=lambda _msg: None)
        suite.rows, suite.special = report["results"], report["special"]
        report["ratios"] = suite.ratios()
        report["targets"] = suite.targets(report["ratios"])
    else:
        report = Suite(options_from(args)).run()
    plotted = None
    if args.plot and args.plot != "none":
        try:
            plotted = plot_throughput(report, args.plot)
        except ImportError as e:  # matplotlib comes with the bench extra
            report.setdefault("notes", []).append(f"no plot: {e}")
    print()
    print(table(report))
    if plotted is not None:
        print(f"\nthroughput against body size: {plotted}")
    if args.json and not args.from_json:
        write_json(report, args.json)
        print(f"\nJSON written to {args.json}")
    if args.markdown:
        Path(args.markdown).write_text(markdown(report) + "\n")
        print(f"Markdown written to {args.markdown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
