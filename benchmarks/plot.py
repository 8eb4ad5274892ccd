"""A PNG of throughput against body size, from one run's report.

One column per ruleset, two rows: requests/s and MB/s (of body on the wire),
both axes logarithmic; a line per target (gateway, pyicap, c-icap echo, raw
YARA).  Only the RESPMOD scenarios of plain random bytes are plotted (``1k``,
``64k``, ``1m``, ``20m``): the other scenarios are not a size.  c-icap has no
ruleset: its line (the same one) is drawn in every column.  matplotlib with
the Agg backend, so no display is needed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from benchmarks.scenarios import plotted_size

STYLE = {  # target -> (label, colour, marker)
    "gateway": ("icap-gateway", "tab:blue", "o"),
    "pyicap": ("pyicap 1.0b1", "tab:orange", "s"),
    "cicap": ("c-icap echo (no scan)", "tab:green", "^"),
    "raw": ("raw YARA (limit)", "tab:gray", "D"),
    "rawx": ("raw YARA-X", "tab:purple", "v"),
}

Series = dict[str, list[tuple[int, float, float]]]  # target -> [(size, req/s, MB/s)]


def series(report: dict[str, Any]) -> dict[str, Series]:
    """ruleset -> target -> points sorted by size (previewless rows; raw: the row
    measured for the gateway when there is one, else the last)."""
    out: dict[str, Series] = {}
    cicap: list[tuple[int, float, float]] = []
    raw: dict[tuple[str, str, int], tuple[str, tuple[int, float, float]]] = {}
    for r in report["results"]:
        size = plotted_size(r["scenario"])
        if size is None or r.get("preview") or not r.get("rps"):
            continue
        point = (size, float(r["rps"]), float(r["mbps"]))
        if r["target"] == "cicap":
            cicap.append(point)
        elif r["target"] in ("raw", "rawx"):
            seen = raw.get((r["target"], r["ruleset"], size))
            if seen is None or seen[0] != "gateway":
                raw[(r["target"], r["ruleset"], size)] = (r.get("pair") or "", point)
        else:
            out.setdefault(r["ruleset"], {}).setdefault(r["target"], []).append(point)
    for (target, ruleset, _size), (_pair, point) in raw.items():
        out.setdefault(ruleset, {}).setdefault(target, []).append(point)
    if cicap:
        for ruleset in out or {"-": {}}:
            out.setdefault(ruleset, {})["cicap"] = list(cicap)
    for by_target in out.values():
        for points in by_target.values():
            points.sort()
    return out


def _size_label(n: int) -> str:
    for unit, k in (("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= k:
            return f"{n // k} {unit}"
    return f"{n} B"


def plot_throughput(report: dict[str, Any], path: str | Path) -> Path | None:
    """Write the PNG; None (nothing written) when the run has no plottable rows."""
    data = series(report)
    if not data:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # in the order the run took them (signature-base first by default)
    order = [*report.get("options", {}).get("rulesets", []), *sorted(data)]
    rulesets = sorted(data, key=order.index)
    fig, axes = plt.subplots(2, len(rulesets), figsize=(max(7.0, 5.2 * len(rulesets)), 8.5),
                             squeeze=False)
    sizes = sorted({p[0] for by in data.values() for pts in by.values() for p in pts})
    for col, ruleset in enumerate(rulesets):
        for row, (index, unit) in enumerate(((1, "requests/s"), (2, "MB/s (body on the wire)"))):
            ax = axes[row][col]
            for target, (label, colour, marker) in STYLE.items():
                points = data[ruleset].get(target)
                if not points:
                    continue
                ax.plot([p[0] for p in points], [p[index] for p in points], marker=marker,
                        color=colour, label=label,
                        linestyle="--" if target in ("raw", "rawx", "cicap") else "-")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xticks(sizes, [_size_label(n) for n in sizes])
            ax.minorticks_off()
            ax.grid(True, which="major", alpha=0.3)
            ax.set_ylabel(unit)
            if row == 0:
                ax.set_title(f"rules: {ruleset}")
            else:
                ax.set_xlabel("body size (RESPMOD, random bytes, unique per request)")
            ax.legend(fontsize="small")
    m = report.get("machine", {})
    opts = report.get("options", {})
    passes = int(opts.get("repeat") or 1)
    which = f"the median of {passes} passes" if passes > 1 else "one run"
    fig.suptitle(f"Throughput against body size, {which}\n{m.get('cores', '?')} cores, "
                 f"{opts.get('concurrency', '?')} connections, commit {m.get('commit', '?')}, "
                 f"{m.get('date', '')}", fontsize="medium")
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
