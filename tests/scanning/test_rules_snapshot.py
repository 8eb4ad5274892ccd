"""A restarted worker serves the last good rules, never a broken file on disk
(gateway.scanning.snapshot and RulesManager's ``snapshot_store``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.scanning.discovery import stat_snapshot
from gateway.scanning.engine import RulesError
from gateway.scanning.rules import RulesManager
from gateway.scanning.snapshot import last_good_snapshot, save_snapshot

from .conftest import SyncPool, SyncReactor, bump, result_of, write_rule

ONE = 'rule one { strings: $a = "alpha" condition: $a }\n'
TWO = 'rule two { strings: $a = "beta" condition: $a }\n'
BROKEN = 'rule broken {\n  condition:\n    true and\n}\n'


def worker(rules: Path, store: Path, reactor: SyncReactor, pool: SyncPool) -> RulesManager:
    """A (re)starting worker's rules, as build_gateway makes them for workers."""
    m = RulesManager(rules, reactor, pool, 2.0, snapshot_store=store)  # type: ignore[arg-type]
    m.load_now()
    return m


def test_restart_with_a_broken_file_serves_what_the_running_workers_serve(
    tmp_path: Path, reactor: SyncReactor, pool: SyncPool
) -> None:
    rules, store = tmp_path / "rules", tmp_path / "state" / "rules-last-good"
    write_rule(rules, "sub/one.yar", ONE)
    running = worker(rules, store, reactor, pool)
    write_rule(rules, "broken.yar", BROKEN)
    assert result_of(running.reload()) is False  # the running worker keeps its set
    restarted = worker(rules, store, reactor, pool)  # before: RulesError, exit, restart, ...
    assert restarted.version == running.version
    assert restarted.rule_count == 1
    assert restarted.loaded_from == store / running.version
    assert restarted.last_error is not None and "broken.yar:4" in str(restarted.last_error)
    # The directory is fixed: the restarted worker's poller takes it up like the others'.
    (rules / "broken.yar").unlink()
    write_rule(rules, "two.yar", TWO)
    assert result_of(restarted.poll()) is True
    assert restarted.rule_count == 2 and restarted.loaded_from == rules


def test_broken_set_never_replaces_the_snapshot_a_good_one_does(
    tmp_path: Path, reactor: SyncReactor, pool: SyncPool
) -> None:
    rules, store = tmp_path / "rules", tmp_path / "store"
    write_rule(rules, "one.yar", ONE)
    m = worker(rules, store, reactor, pool)
    first = m.version
    assert last_good_snapshot(store) == store / first
    write_rule(rules, "two.yar", TWO)
    assert result_of(m.reload()) is True  # SIGHUP or the poller: a good new set
    assert last_good_snapshot(store) == store / m.version != store / first
    assert not (store / first).exists()  # the older copy is pruned
    bump(write_rule(rules, "two.yar", BROKEN))
    assert result_of(m.reload()) is False
    good = last_good_snapshot(store)
    assert good == store / m.version
    assert (good / "two.yar").read_text() == TWO


def test_no_snapshot_and_a_broken_directory_still_fails(
    tmp_path: Path, reactor: SyncReactor, pool: SyncPool
) -> None:
    rules = tmp_path / "rules"
    write_rule(rules, "bad.yar", BROKEN)
    with pytest.raises(RulesError, match=r"bad\.yar:4: "):
        worker(rules, tmp_path / "store", reactor, pool)


def test_files_changed_while_copying_are_not_kept(tmp_path: Path) -> None:
    rules, store = tmp_path / "rules", tmp_path / "store"
    write_rule(rules, "one.yar", ONE)
    compiled_stat = stat_snapshot(rules)
    bump(write_rule(rules, "one.yar", BROKEN))  # an admin's edit lands between compile and copy
    assert save_snapshot(rules, store, "v1", compiled_stat) is None
    assert last_good_snapshot(store) is None


def test_two_workers_saving_the_same_version(tmp_path: Path) -> None:
    rules, store = tmp_path / "rules", tmp_path / "store"
    write_rule(rules, "one.yar", ONE)
    stat = stat_snapshot(rules)
    assert save_snapshot(rules, store, "v1", stat) == store / "v1"
    assert save_snapshot(rules, store, "v1", stat) == store / "v1"  # already there: kept, still current
    assert sorted(p.name for p in store.iterdir()) == ["current", "v1"]
