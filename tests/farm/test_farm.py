"""The farm, started from scratch (tests/farm/farm.py): curl-like clients ->
Squid -> HAProxy (deploy/haproxy.cfg) -> two gateway nodes -> one PostgreSQL.

The tests share one farm and run in file order: node loss comes last.  The
figures the issue asks for (requests lost when a node dies, key propagation
time, throughput of two nodes against one) are printed at the end (-s)."""

from __future__ import annotations

import json
import os
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.test_proxy_protocol import Proxy
from tests.farm.farm import DETECTION_WINDOW, Farm, Outcome, running_farm
from tests.peers import wait_for

pytestmark = [pytest.mark.farm, pytest.mark.squid, pytest.mark.postgres, pytest.mark.haproxy]

KEY_PROPAGATION_LIMIT = 2.0  # seconds (issue 11)
RETURNING_SHARE = 0.25  # of two nodes' traffic, within RETURN_WINDOW of the node being UP again
RETURN_WINDOW = 20.0
THROUGHPUT_WINDOW = 4.0  # seconds of load with two nodes, then with one
MARKER = "FARM-ROLLING-UPDATE-MARKER-5c1e"
MARKER_RULE = f'rule farm_marker {{ strings: $m = "{MARKER}" condition: $m }}\n'

FIGURES: dict[str, object] = {}


@pytest.fixture(scope="module")
def farm() -> Iterator[Farm]:
    with running_farm() as f:
        yield f
    if FIGURES:
        print("\nfarm figures:", json.dumps(FIGURES, indent=1))


def served(outcomes: list[Outcome]) -> Counter[int]:
    return Counter(o.status for o in outcomes)


def test_traffic_spreads_over_both_nodes(farm: Farm) -> None:
    before = [n.transactions() for n in farm.nodes]
    outcomes = farm.load(3, max_requests=2000)
    assert served(outcomes) == {200: len(outcomes)} and len(outcomes) > 20
    shares = [n.transactions() - b for n, b in zip(farm.nodes, before, strict=True)]
    assert min(shares) >= 0.2 * sum(shares), shares


def test_same_rules_give_the_same_istag_on_every_node(farm: Farm) -> None:
    tags = {n.istag() for n in farm.nodes}
    assert len(tags) == 1, tags
    farm.load(1, max_requests=200)
    seen = wait_for(lambda: istags_seen_by_squid(farm), timeout=5)
    assert set(seen) == {tags.pop()}  # what Squid got on every answer so far


def istags_seen_by_squid(farm: Farm) -> list[str]:
    """The ISTag of every RESPMOD answer in Squid's ICAP log, in order."""
    log = Path(farm.squid_log_dir, "icap.log")
    if not log.exists():
        return []
    lines = [line.split() for line in log.read_text().splitlines()]
    return [parts[1].replace("%22", '"') for parts in lines if len(parts) == 3 and parts[0] == "RESPMOD"]


def _accepted_everywhere(farm: Farm, key: str, accepted: bool) -> bool:
    """``key`` is (or is no longer) accepted by each node, and through HAProxy."""
    for node in farm.nodes:
        proxy = node.direct()
        try:
            if (proxy.status(key) == 204) != accepted:
                return False
        finally:
            proxy.close()
    for _ in range(4):  # fresh connections: HAProxy spreads them (leastconn, ties in turn)
        through = Proxy(farm.haproxy_port, b"")  # HAProxy writes the PROXY header
        try:
            if (through.status(key) == 204) != accepted:
                return False
        finally:
            through.close()
    return True


def _propagation(farm: Farm, key: str, accepted: bool) -> float | None:
    began = time.monotonic()
    while time.monotonic() - began < KEY_PROPAGATION_LIMIT:
        if _accepted_everywhere(farm, key, accepted):
            return time.monotonic() - began
        time.sleep(0.02)
    return None


def test_cli_key_changes_are_live_on_both_nodes_within_2s(farm: Farm) -> None:
    created = json.loads(farm.cli("key", "create", "acme", "--json", "--operator", "e2e").stdout)
    took_create = _propagation(farm, created["key"], accepted=True)
    assert took_create is not None, [n.log() for n in farm.nodes]
    farm.cli("key", "revoke", str(created["key_id"]), "--operator", "e2e")
    took_revoke = _propagation(farm, created["key"], accepted=False)
    assert took_revoke is not None, "a revoked key still worked somewhere 2 s after the CLI returned"
    FIGURES["key_propagation_s"] = {"create": round(took_create, 3), "revoke": round(took_revoke, 3)}


def _queues_empty(farm: Farm) -> bool:
    return all(n.metric("icap_gateway_register_queue_depth") == 0 for n in farm.nodes)


def _records_by_pair(farm: Farm) -> dict[tuple[str, str], list[tuple[object, object]]]:
    pairs: dict[tuple[str, str], list[tuple[object, object]]] = {}
    for user, ip, login_at, last_seen in farm.login_records():
        pairs.setdefault((user, ip), []).append((login_at, last_seen))
    return pairs


def test_one_user_at_one_ip_never_gets_overlapping_records_across_nodes(farm: Farm) -> None:
    """Users move to a new address in rounds, each round's requests spread
    over both nodes at once: each node queues the same new (user, ip) and
    flushes it; the register keeps one record per pair."""
    sources = ["127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5"]
    before = [n.transactions() for n in farm.nodes]
    for source in sources:
        outcomes = farm.load(1, clients=4, max_requests=400, users=("alice", "bob"), source=source)
        assert served(outcomes) == {200: len(outcomes)}
    assert all(n.transactions() > b for n, b in zip(farm.nodes, before, strict=True))  # both served them
    assert wait_for(lambda: _queues_empty(farm), timeout=10)
    pairs = _records_by_pair(farm)
    for source in sources:
        for user in ("alice", "bob"):
            assert len(pairs.get((user, source), [])) == 1, (user, source, pairs.get((user, source)))


def test_node_without_the_database_keeps_scanning_and_loses_no_record(farm: Farm) -> None:
    node2 = farm.nodes[1]  # reaches PostgreSQL through the forwarder
    source = "127.0.0.6"
    farm.forwarder.cut()
    try:
        before = node2.transactions()
        outcomes = farm.load(2, clients=4, max_requests=400, users=("carol", "dave"), source=source)
        assert served(outcomes) == {200: len(outcomes)}  # scanning went on, on both nodes
        assert node2.transactions() > before
        assert wait_for(lambda: node2.metric("icap_gateway_register_queue_depth") >= 1, timeout=5)
        assert farm.status()["node2"] == "UP"  # a queue within bounds keeps the node ready
    finally:
        farm.forwarder.restore()
    assert wait_for(lambda: _queues_empty(farm), timeout=30), node2.log()
    pairs = _records_by_pair(farm)
    for user in ("carol", "dave"):
        assert len(pairs.get((user, source), [])) == 1, pairs


def test_rolling_rules_update_never_shows_two_istags_for_one_ruleset(farm: Farm) -> None:
    """Node 1 gets a new rule, then node 2.  Squid, fetching a page the new
    rule blocks, sees the old ISTag with the old verdict and the new ISTag
    with the new one, and the new ruleset has one ISTag on both nodes."""
    old = farm.nodes[0].istag()
    page = farm.origin.add("/marker.txt", f"some text {MARKER} more text\n".encode())
    seen_before = len(istags_seen_by_squid(farm))
    statuses: list[int] = []

    def fetch_for(seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end and len(statuses) < 1000:
            statuses.append(farm.fetch(page, "alice").status)  # one at a time: the log lines follow in order

    fetch_for(0.5)
    for node in farm.nodes:
        (node.gw.workdir / "rules" / "farm_marker.yar").write_text(MARKER_RULE)
        assert wait_for(lambda n=node: n.istag() != old, timeout=10), node.log()
        fetch_for(1.0)
    new_tags = {n.istag() for n in farm.nodes}
    assert len(new_tags) == 1, new_tags
    new = new_tags.pop()
    assert wait_for(lambda: len(istags_seen_by_squid(farm)) - seen_before >= len(statuses), timeout=5)
    seen = istags_seen_by_squid(farm)[seen_before:]
    assert len(seen) == len(statuses)
    assert set(seen) == {old, new}, set(seen)
    for tag, status in zip(seen, statuses, strict=True):
        assert status == (403 if tag == new else 200), (tag, status)
    assert statuses[-1] == 403


def test_two_nodes_against_one(farm: Farm) -> None:
    """Throughput through the whole farm with both nodes, then with node 2
    in maintenance.  Both nodes share this machine's two cores (with Squid,
    HAProxy and the clients): a ratio, reported, not asserted."""
    two = farm.load(THROUGHPUT_WINDOW, clients=8, max_requests=10_000)
    farm.haproxy("set server icap_gateways/node2 state maint")
    farm.haproxy("shutdown sessions server icap_gateways/node2")
    try:
        one = farm.load(THROUGHPUT_WINDOW, clients=8, max_requests=10_000)
    finally:
        farm.haproxy("set server icap_gateways/node2 state ready")
    assert served(two) == {200: len(two)} and served(one) == {200: len(one)}
    FIGURES["throughput_rps"] = {"two_nodes": len(two) / THROUGHPUT_WINDOW, "one_node": len(one) / THROUGHPUT_WINDOW,
                                 "ratio": round(len(two) / max(1, len(one)), 2)}
    farm.wait_up()


def test_node_killed_under_load_fails_only_in_flight_requests_then_returns(farm: Farm) -> None:
    node2 = farm.nodes[1]
    # 1 MiB bodies: each transaction lasts long enough for the kill to catch some under way.
    large = farm.origin.add("/large.bin", os.urandom(1 << 20))
    results: list[Outcome] = []
    began = time.monotonic()
    killed_after = 3.0
    end = began + killed_after + DETECTION_WINDOW + 3.0
    loader = threading.Thread(target=lambda: results.extend(farm.load_until(end, max_requests=5000, url=large)))
    loader.start()
    time.sleep(killed_after)
    killed_at = time.monotonic()
    node2.kill9()
    loader.join(end - time.monotonic() + 90)
    assert not loader.is_alive()
    failed = [o for o in results if o.status != 200]
    # What fails was under way at the kill or started within the detection window.
    assert all(o.ended >= killed_at and o.started < killed_at + DETECTION_WINDOW for o in failed), failed
    late = [o for o in results if o.started >= killed_at + DETECTION_WINDOW]
    assert late and all(o.status == 200 for o in late)
    FIGURES["node_kill"] = {
        "requests": len(results), "failed": len(failed),
        "failed_within_s_of_kill": round(max((o.ended - killed_at for o in failed), default=0.0), 3),
    }

    # The node comes back and, Squid's connections being recycled, takes its
    # share within RETURN_WINDOW of HAProxy putting it back in the rotation.
    node1 = farm.nodes[0]
    node2.start()
    stop = threading.Event()
    outcomes: list[Outcome] = []
    loader = threading.Thread(target=lambda: outcomes.extend(
        farm.load_until(time.monotonic() + 30 + RETURN_WINDOW, max_requests=20_000, stop=stop)))
    loader.start()
    try:
        farm.wait_up(("node2",))
        before = [n.transactions() for n in (node1, node2)]
        time.sleep(RETURN_WINDOW)
        after = [n.transactions() for n in (node1, node2)]
    finally:
        stop.set()
        loader.join(90)
    assert served(outcomes) == {200: len(outcomes)}
    node1_served, node2_served = (a - b for a, b in zip(after, before, strict=True))
    share = node2_served / (node1_served + node2_served)
    FIGURES["returning_node_share"] = round(share, 3)
    assert share >= RETURNING_SHARE, (node1_served, node2_served, farm.status())
