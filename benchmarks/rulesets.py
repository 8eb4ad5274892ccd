"""The rulesets a benchmark runs with, and how the baselines compile them.

- ``signature-base``: the real-world ruleset (~5,800 rules) read in place
  from ``<repo>/../shared/rulesets/signature-base/yara`` or from
  ``$ICAP_GATEWAY_RULESETS/signature-base/yara``; never copied into the repo.
- ``bundled``: the project's own ``rules/`` directory.
- ``empty``: one rule file without rules (the gateway refuses a directory
  with no rule files): measures everything but YARA's matching.

The baselines compile the way the gateway is specified to: every
``*.yar``/``*.yara`` file its own namespace, signature-base's external
variables declared.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RULE_SUFFIXES = (".yar", ".yara")
# signature-base's rules refer to the file ones, the bundled rules to the
# transaction ones; the gateway declares the same set (gateway.scanning.engine.EXTERNALS)
EXTERNALS = {
    "filename": "", "filepath": "", "extension": "", "filetype": "", "owner": "",
    "url": "", "host": "", "direction": "", "tenant": "",
}


@dataclass(frozen=True)
class Ruleset:
    name: str
    path: Path
    files: int

    def describe(self) -> str:
        return f"{self.name} ({self.files} files, {self.path})"


def rulesets_root() -> Path | None:
    env = os.environ.get("ICAP_GATEWAY_RULESETS")
    candidates = [Path(env)] if env else []
    candidates.append(REPO.parent / "shared" / "rulesets")
    for c in candidates:
        if c.is_dir():
            return c
    return None


def rule_files(path: Path) -> dict[str, str]:
    """namespace -> file path, every rule file under ``path`` (sorted, recursive)."""
    return {
        str(p.relative_to(path)): str(p)
        for p in sorted(path.rglob("*"))
        if p.suffix in RULE_SUFFIXES and p.is_file()
    }


_EMPTY_DIR: Path | None = None


def empty_dir() -> Path:
    global _EMPTY_DIR
    if _EMPTY_DIR is None or not _EMPTY_DIR.is_dir():
        _EMPTY_DIR = Path(tempfile.mkdtemp(prefix="bench-empty-rules-"))
        (_EMPTY_DIR / "empty.yar").write_text("// no rules: the empty ruleset of the benchmarks\n")
    return _EMPTY_DIR


def resolve(name: str) -> Ruleset | None:
    """A named ruleset, or a directory path; None when it is not available here."""
    if name == "empty":
        d = empty_dir()
        return Ruleset("empty", d, 1)
    if name == "bundled":
        d = REPO / "rules"
        return Ruleset("bundled", d, len(rule_files(d))) if d.is_dir() else None
    if name in ("signature-base", "reversinglabs"):
        root = rulesets_root()
        if root is None:
            return None
        d = root / name / "yara"
        return Ruleset(name, d, len(rule_files(d))) if d.is_dir() else None
    d = Path(name)
    if d.is_dir():
        return Ruleset(d.name, d, len(rule_files(d)))
    return None


def compile_yara(path: Path):  # -> yara.Rules (yara has no type stubs)
    import yara

    return yara.compile(filepaths=rule_files(path), externals=EXTERNALS)
