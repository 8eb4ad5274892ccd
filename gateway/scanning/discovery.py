"""Which files of a rules directory are rules, and what identifies a set.

Each ``*.yar``/``*.yara`` file under the directory is its own namespace (its
path relative to the directory).  The ruleset's version (the ICAP ISTag) is
a hash over the engine's tag, the namespaces and the exact bytes compiled.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from gateway.scanning.engine import RulesError, RuleSource, Snapshot

__all__ = ["RULE_SUFFIXES", "VERSION_LENGTH", "read_rule_files", "rule_files", "stat_snapshot"]

RULE_SUFFIXES = (".yar", ".yara")
VERSION_LENGTH = 16  # hex digits of the ruleset hash: short enough for an ISTag


def rule_files(directory: Path) -> list[tuple[str, Path]]:
    """(namespace, path) of each rule file under ``directory``, sorted.

    Hidden files and directories (``.git``, editor lock files) are skipped."""
    directory = Path(directory)
    if not directory.is_dir():
        raise RulesError(str(directory), 0, "not a directory")
    found = []
    for root, dirs, files in os.walk(directory):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in files:
            if name.startswith(".") or not name.lower().endswith(RULE_SUFFIXES):
                continue
            path = Path(root, name)
            found.append((path.relative_to(directory).as_posix(), path))
    return sorted(found)


def stat_snapshot(directory: Path) -> Snapshot:
    """What the poller compares: each rule file's name, mtime, size and inode
    (an editor that saves by rename changes the inode)."""
    try:
        files = rule_files(directory)
    except RulesError:
        return ()
    snap = []
    for ns, path in files:
        try:
            st = path.stat()
        except OSError:
            continue
        snap.append((ns, st.st_mtime_ns, st.st_size, st.st_ino))
    return tuple(snap)


def read_rule_files(directory: Path, engine_tag: bytes = b"") -> tuple[list[RuleSource], str]:
    """Every rule file, and the ruleset version: a hash over the engine tag,
    the namespaces and the exact bytes compiled.  Raises RulesError when there
    is no rule file or one cannot be read."""
    files = rule_files(directory)
    if not files:
        raise RulesError(str(directory), 0, "no *.yar or *.yara rule files")
    digest = hashlib.sha256(engine_tag)
    out = []
    for namespace, path in files:
        try:
            content = path.read_bytes()
        except OSError as e:
            raise RulesError(str(path), 0, e.strerror or str(e)) from None
        digest.update(namespace.encode() + b"\0" + len(content).to_bytes(8, "big") + content)
        out.append(RuleSource(namespace, path, content.decode("utf-8", "replace")))
    return out, digest.hexdigest()[:VERSION_LENGTH]
