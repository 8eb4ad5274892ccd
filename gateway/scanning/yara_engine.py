"""The yara-python engine (``[scan] engine = "yara"``, the default).

yara-python releases the GIL while it matches, so the scanning threads
(``gateway.scanning.handoff``) run in parallel in the gateway's process.
Files are compiled by path (``filepaths=``), so an ``include`` resolves
relative to the including file as YARA users expect.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import yara

from gateway.scanning.engine import EXTERNALS, EngineError, EngineRules, EngineTimeout, RulesError, RuleSource

__all__ = ["YaraEngine"]

# yara.SyntaxError reads "<path>(<line>): <message>".
_YARA_ERROR = re.compile(r"^(?P<file>.*?)\((?P<line>\d+)\): (?P<message>.*)$", re.S)


def _rules_error(error: yara.Error, fallback_file: str) -> RulesError:
    text = str(error)
    m = _YARA_ERROR.match(text)
    if m:
        return RulesError(m.group("file"), int(m.group("line")), m.group("message"))
    return RulesError(fallback_file, 0, text)


class YaraEngine:
    """:class:`gateway.scanning.engine.Engine` over yara-python; ``handle`` is a ``yara.Rules``."""

    name = "yara"
    tag = b""  # versions of yara-compiled sets stay what they were before the engine switch
    runs_in_caller = True  # see Engine.runs_in_caller

    def compile(self, version: str, sources: Sequence[RuleSource]) -> EngineRules:
        fallback = str(sources[0].path if len(sources) == 1 else sources[0].path.parent) if sources else ""
        try:
            rules = yara.compile(filepaths={s.namespace: str(s.path) for s in sources}, externals=EXTERNALS)
        except yara.Error as e:
            raise _rules_error(e, fallback) from None
        return EngineRules(rules, sum(1 for _ in rules),
                           tuple(str(w) for w in getattr(rules, "warnings", None) or ()))

    def match(self, rules: Any, target: bytes | str, externals: Mapping[str, str], timeout: int) -> list[str]:
        # yara-python only reads the dict: the scanner's own is passed as it is.
        values = externals if type(externals) is dict else dict(externals)
        try:
            if isinstance(target, bytes):
                found = rules.match(data=target, externals=values, timeout=timeout)
            else:
                found = rules.match(filepath=target, externals=values, timeout=timeout)
        except yara.TimeoutError as e:
            raise EngineTimeout(str(e) or "yara scan timed out") from None
        except yara.Error as e:
            raise EngineError(f"yara: {e}") from None
        return [f"{m.namespace}.{m.rule}" for m in found]

    def close(self) -> None:
        pass
