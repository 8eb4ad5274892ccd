"""The last good ruleset, kept in the state directory for worker restarts.

A worker that dies is restarted by its supervisor.  If the rules directory
meanwhile holds a broken file (the running workers refused it and kept their
rules), compiling the directory fails, and without a fallback the new worker
would exit and be restarted into a loop, leaving the gateway short of a
worker.  So each worker, once a set compiled from the directory is in
service, copies exactly those files to ``<state_dir>/rules-last-good/<version>/``
and names that version in ``<state_dir>/rules-last-good/current``; a worker
whose directory does not compile at start loads that copy instead
(``gateway.scanning.rules.RulesManager(snapshot_store=...)``, set for supervised workers).
A broken set never becomes the snapshot: only a set that compiled and was
installed is copied, and the copy is kept only if no rule file changed
while it was made.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from twisted.logger import Logger

from gateway.scanning.discovery import rule_files, stat_snapshot
from gateway.scanning.engine import Snapshot

log = Logger()

# The file in the store naming the version of the last good set.
CURRENT = "current"


def save_snapshot(
    directory: Path, store: Path, version: str, compiled_stat: Snapshot
) -> Path | None:
    """Copy the rule files of ``directory`` (just compiled as ``version``,
    whose files then had ``compiled_stat``) to ``store/version`` and make it
    current.  Returns the copy, or None when the files changed in between (the
    poller compiles the new files and saves again).  Blocking: run it in a
    thread, except at startup.  Several workers may save the same version at
    once: each copies to a private directory and the first rename wins."""
    store.mkdir(parents=True, exist_ok=True)
    final = store / version
    if not final.is_dir():
        private = store / f".{version}.tmp-{os.getpid()}"
        shutil.rmtree(private, ignore_errors=True)
        for namespace, path in rule_files(directory):
            target = private / namespace
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target)
        if stat_snapshot(directory) != compiled_stat:
            shutil.rmtree(private, ignore_errors=True)
            return None
        try:
            os.rename(private, final)
        except OSError:  # another worker saved the same version first
            shutil.rmtree(private, ignore_errors=True)
            if not final.is_dir():
                raise
    pointer = store / f".{CURRENT}.tmp-{os.getpid()}"
    pointer.write_text(version + "\n")
    os.replace(pointer, store / CURRENT)
    _prune(store, keep=version)
    return final


def last_good_snapshot(store: Path) -> Path | None:
    """The directory of the last good set, or None if there is none."""
    try:
        version = (store / CURRENT).read_text().strip()
    except OSError:
        return None
    if not version or "/" in version or version.startswith("."):
        return None
    path = store / version
    return path if path.is_dir() else None


def _prune(store: Path, keep: str) -> None:
    """Older versions go; private copies in progress (dot names) stay."""
    for entry in store.iterdir():
        if entry.name.startswith(".") or entry.name in (keep, CURRENT) or not entry.is_dir():
            continue
        shutil.rmtree(entry, ignore_errors=True)


__all__ = ["CURRENT", "last_good_snapshot", "save_snapshot"]
