"""The interface a YARA implementation gives the gateway, and its errors.

Two engines implement :class:`Engine`: ``gateway.scanning.yara_engine``
(yara-python in the scanning threads) and ``gateway.scanning.yarax``
(YARA-X in worker processes).  Each maps its library's exceptions to the
ones here, so the scanner's verdict mapping is written once:
:class:`EngineTimeout` becomes an unscannable "scan-timeout" verdict,
:class:`EngineError` an unscannable "engine-error" one, and a set that does
not compile a :class:`RulesError` (``file:line: message``).

Rule discovery, versions and reloads are not the engine's business
(``gateway.scanning.rules``): an engine compiles the sources it is given
and matches with what it compiled.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

__all__ = [
    "EXTERNALS",
    "Engine",
    "EngineError",
    "EngineRules",
    "EngineTimeout",
    "RuleSource",
    "RulesError",
    "Snapshot",
]

# Declared at compile time with these defaults, filled per transaction from
# ScanContext.  ``owner`` is declared because signature-base's rules use it
# (the gateway has no file owner and leaves it empty).
EXTERNALS: dict[str, str] = {
    "filename": "",
    "filepath": "",
    "extension": "",
    "filetype": "",
    "url": "",
    "host": "",
    "direction": "",
    "tenant": "",
    "owner": "",
}

# (namespace, mtime_ns, size, inode) of each rule file: what the poller compares.
Snapshot = tuple[tuple[str, int, int, int], ...]


class EngineError(Exception):
    """A match that failed: the library raised, a worker died, no rules."""


class EngineTimeout(EngineError):
    """A match that did not finish within its timeout."""


class RulesError(Exception):
    """A rules directory that does not compile.  ``str()`` is ``file:line: message``
    (``line`` is 0 when the problem is not on a line: missing file, no rules...)."""

    def __init__(self, file: str, line: int, message: str) -> None:
        self.file = file
        self.line = line
        self.message = message
        # The stat snapshot of what was tried (set by the compile path): the
        # poller waits for a change before trying again.
        self.snapshot: Snapshot | None = None
        super().__init__(f"{file}:{line}: {message}" if line else f"{file}: {message}")

    def as_dict(self) -> dict[str, Any]:
        return {"file": self.file, "line": self.line, "message": self.message}


@dataclass(frozen=True, slots=True)
class RuleSource:
    """One rule file as the engine compiles it: its namespace (its path relative
    to the rules directory), where it lies and the exact text hashed into the
    version."""

    namespace: str
    path: Path
    text: str


@dataclass(frozen=True, slots=True)
class EngineRules:
    """What an engine compiled: ``handle`` is the engine's own object, passed
    back to its :meth:`Engine.match`; nobody else looks inside."""

    handle: Any
    rule_count: int
    warnings: tuple[str, ...] = ()


class Engine(Protocol):
    """A YARA implementation.  ``match`` is called from several threads at once."""

    name: str  # "yara" or "yara-x": logs and the ``rules check --engine`` choice
    tag: bytes  # mixed into the ruleset version: the engine is part of a verdict
    # True: ``match`` runs in the caller's thread and only as long as the
    # match itself (yara-python); False: it waits on another process
    # (YARA-X), which a reactor must never do.
    runs_in_caller: bool

    def compile(self, version: str, sources: Sequence[RuleSource]) -> EngineRules:
        """Compile ``sources`` (each its own namespace, ``EXTERNALS`` declared).
        Raises RulesError.  Blocking: call it from a thread, except at startup."""
        ...

    def match(self, rules: Any, target: bytes | str, externals: Mapping[str, str], timeout: int) -> list[str]:
        """The rules of ``rules`` (a handle from :meth:`compile`) that match
        ``target`` (bytes, or the path of a spooled body) as ``namespace.rule``,
        in declaration order.  ``timeout`` in whole seconds.  Raises
        EngineTimeout or EngineError."""
        ...

    def close(self) -> None:
        """Release what the engine holds (threads, processes).  Idempotent."""
        ...
