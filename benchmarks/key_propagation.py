"""How soon a key created or revoked with the CLI is live on every node.

Two "nodes" (two RegisterService instances, each with its own engine and
its own LISTEN connection, as two gateway processes have) run in this
process; the key changes are made by the real CLI in a subprocess, and the
clock starts when that subprocess has exited (the moment an admin's command
returns).  The figure is the time until BOTH nodes answer with the change.
The reload timer is set to an hour, so only LISTEN/NOTIFY can do it.

    python -m benchmarks.key_propagation [--database URL] [--rounds N]

It uses a schema of its own in the database (created and dropped), as the
register tests do.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import queue
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

from sqlalchemy import create_engine, text
from twisted.internet import defer

from gateway.config import GatewayConfig, with_overrides
from gateway.interfaces import Authenticated, Credentials, Refused
from register.service import RegisterComponents, RegisterService, build_register

DEFAULT_DB = os.environ.get("REGISTER_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
GIVE_UP = 15.0  # seconds; longer than the old 10 s timer, so a failure shows as a number


class ThreadedClock:
    """The reactor's part for RegisterService: calls from other threads
    queue up and run in the main thread's polling loop."""

    def __init__(self) -> None:
        self.calls: queue.SimpleQueue[tuple[Callable[..., Any], tuple[Any, ...]]] = queue.SimpleQueue()

    def seconds(self) -> float:
        return time.time()

    def callLater(self, delay: float, f: Callable[..., Any], *args: Any) -> Any:  # the LoopingCall's
        class Call:
            def cancel(self) -> None: ...
            def active(self) -> bool:
                return False
        return Call()

    def callFromThread(self, f: Callable[..., Any], *args: Any) -> None:
        self.calls.put((f, args))

    def run_pending(self) -> None:
        while True:
            try:
                f, args = self.calls.get_nowait()
            except queue.Empty:
                return
            f(*args)


def cli(url: str, *argv: str, operator: bool = True) -> str:
    who = ["--operator", "bench"] if operator else []
    done = subprocess.run([sys.executable, "-m", "gateway", *argv, "--database", url, *who, "--json"],
                          capture_output=True, text=True, check=True)
    return done.stdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--database", default=DEFAULT_DB, help="PostgreSQL URL (a schema is made inside it)")
    ap.add_argument("--rounds", type=int, default=10)
    args = ap.parse_args()

    import json

    admin = create_engine(args.database, isolation_level="AUTOCOMMIT")
    schema = f"bench_keys_{uuid.uuid4().hex[:10]}"
    with admin.connect() as c:
        c.execute(text(f'CREATE SCHEMA "{schema}"'))
    url = f"{args.database}?options={quote(f'-csearch_path={schema}')}"
    nodes: list[tuple[RegisterComponents, ThreadedClock]] = []
    try:
        cli(url, "register", "upgrade", operator=False)
        cli(url, "operator", "add", "bench", "--role", "admin")
        cli(url, "tenant", "add", "acme")
        config = with_overrides(GatewayConfig(), register__database=url)
        config = dataclasses.replace(config, auth=dataclasses.replace(config.auth, refresh_interval=3600.0))
        for _ in range(2):
            clock = ThreadedClock()
            parts = build_register(config, clock, defer_to_thread=lambda f, *a: defer.maybeDeferred(f, *a))
            parts.service.startService()
            nodes.append((parts, clock))
        listeners = [p.service.listener for p, _c in nodes if isinstance(p.service, RegisterService)]
        while not all(lis is not None and lis.listening for lis in listeners):
            time.sleep(0.01)

        def until(ok: Callable[[RegisterComponents], bool]) -> float:
            began = time.monotonic()
            while time.monotonic() - began < GIVE_UP:
                for _parts, clock in nodes:
                    clock.run_pending()
                if all(ok(parts) for parts, _c in nodes):
                    return time.monotonic() - began
                time.sleep(0.002)
            return float("inf")

        created: list[float] = []
        revoked: list[float] = []
        for _ in range(args.rounds):
            made = json.loads(cli(url, "key", "create", "acme"))
            key, key_id = made["key"], made["key_id"]
            creds = Credentials(key, "192.0.2.1")
            created.append(until(lambda p, c=creds: isinstance(p.authenticator.authenticate(c), Authenticated)))
            cli(url, "key", "revoke", str(key_id))
            revoked.append(until(lambda p, c=creds: p.authenticator.authenticate(c) == Refused(403, "revoked-key")))
        for name, times in (("created", created), ("revoked", revoked)):
            ms = sorted(t * 1000 for t in times)
            print(f"key {name}: live on both of 2 nodes after the CLI returned: "
                  f"median {statistics.median(ms):.1f} ms, min {ms[0]:.1f} ms, max {ms[-1]:.1f} ms "
                  f"({len(ms)} rounds)")
    finally:
        for parts, _clock in nodes:
            parts.service.stopService()
        with admin.connect() as c:
            c.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        admin.dispose()


if __name__ == "__main__":
    main()
