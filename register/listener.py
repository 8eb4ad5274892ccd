"""Hearing at once that keys or tenants changed (PostgreSQL LISTEN/NOTIFY).

Migration 0002 makes every change of ``api_keys`` or ``tenants`` send a
NOTIFY on ``KEY_CHANNEL`` when its transaction commits (the CLI's, or an
admin's in psql).  ``KeyChangeListener`` holds one dedicated connection per
gateway process, outside the engine's pool, in its own thread (the reactor
never waits on it), and calls ``on_change`` for each notification of its own
register.  ``on_change`` runs in the listener's thread: hand it to the
reactor (``register.service`` does, with ``callFromThread``).

When the link drops the thread reconnects with back-off and calls
``on_change`` once it listens again, since changes made meanwhile were not
heard.  The reload timer of ``[auth] refresh_interval`` stays the fallback
while the link is down (and the only mechanism on SQLite).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import psycopg
from twisted.logger import Logger

if TYPE_CHECKING:
    from sqlalchemy import Engine

log = Logger()

# Must match the channel frozen in migration 0002.
KEY_CHANNEL = "icap_gateway_keys"
# Silence after which the link is probed with a query: a link that died
# without a word (a cut cable, a failed-over server) is found this soon, not
# when TCP gives up; the probe is one round trip, so a short period costs nothing.
HEARTBEAT = 5.0
# How often the waiting thread looks at its stop flag: stop() takes effect
# this soon (a wake-up of an idle thread, no network traffic).
STOP_POLL = 0.25
# Reconnect back-off: the first retry soon (a restarted server is back in a
# second), doubling to a ceiling that keeps a long outage from filling the
# server's log with connection attempts of every node.
RECONNECT_MIN = 0.5
RECONNECT_MAX = 30.0
CONNECT_TIMEOUT = 5  # seconds; as the engine's (register.db)
# TCP keepalives on the dedicated connection: a dead peer is noticed by the
# kernel too, even while a heartbeat query waits for its answer.
KEEPALIVES = {"keepalives": 1, "keepalives_idle": 10, "keepalives_interval": 5, "keepalives_count": 3}


class KeyChangeListener:
    """LISTEN on ``KEY_CHANNEL`` in a thread; ``on_change()`` for each change."""

    def __init__(
        self,
        engine: Engine,
        on_change: Callable[[], None],
        *,
        heartbeat: float = HEARTBEAT,
        reconnect_min: float = RECONNECT_MIN,
        reconnect_max: float = RECONNECT_MAX,
    ) -> None:
        if engine.dialect.name != "postgresql":
            raise ValueError("LISTEN/NOTIFY needs PostgreSQL")
        self.engine = engine
        self.on_change = on_change
        self.heartbeat = heartbeat
        self.reconnect_min = reconnect_min
        self.reconnect_max = reconnect_max
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # Read by tests and monitoring; written by the listener thread only.
        self.listening = False
        self.backend_pid: int | None = None  # the server process of the link
        self.connects = 0  # successful LISTENs, the first included
        self.notifications = 0

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="register-listener", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Ask the thread to end; it does within ``STOP_POLL`` seconds, or
        when a connect or heartbeat under way returns (a daemon thread: a
        process that exits does not wait for it)."""
        self._stop.set()

    def join(self, timeout: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    def _connect(self) -> psycopg.Connection[Any]:
        # The engine's own connection arguments (host, user, password,
        # search_path options), but a connection of its own, outside the
        # pool: it stays in LISTEN for the life of the process.
        cargs, cparams = self.engine.dialect.create_connect_args(self.engine.url)
        return psycopg.Connection.connect(
            *cargs, **{**cparams, **KEEPALIVES, "connect_timeout": CONNECT_TIMEOUT, "autocommit": True})

    def _run(self) -> None:
        delay = self.reconnect_min
        warned = False
        while not self._stop.is_set():
            connects = self.connects
            try:
                with self._connect() as conn:
                    self._listen(conn)  # returns only when asked to stop
            except Exception as e:  # psycopg.Error or OSError: the link is down
                if self.connects > connects:  # it had listened: a new outage
                    delay, warned = self.reconnect_min, False
                if not warned:  # log the change, not every retry of an outage
                    log.warn("register: no key-change link ({err}); reconnecting, "
                             "the reload timer covers meanwhile", err=_first_line(e))
                    warned = True
            finally:
                self.listening = False
            if self._stop.wait(delay):
                break
            delay = min(self.reconnect_max, delay * 2)

    def _listen(self, conn: psycopg.Connection[Any]) -> None:
        # The schema the register's tables are found in through this
        # connection's search_path, as the gateway's own queries find them:
        # the payload the trigger of migration 0002 sends for them.
        row = conn.execute(
            "SELECT n.nspname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE c.oid = to_regclass('api_keys')").fetchone()
        schema = row[0] if row else ""
        conn.execute(f"LISTEN {KEY_CHANNEL}")
        self.backend_pid = conn.info.backend_pid
        self.listening = True
        self.connects += 1
        if self.connects > 1:
            log.info("register: key-change link back")
        # Changes committed while nobody listened were not heard.
        self.on_change()
        last_heard = time.monotonic()
        while not self._stop.is_set():
            for n in conn.notifies(timeout=min(STOP_POLL, self.heartbeat)):
                last_heard = time.monotonic()
                # An empty payload: a NOTIFY sent by hand, for every register.
                if n.payload in ("", schema):
                    self.notifications += 1
                    self.on_change()
            if time.monotonic() - last_heard >= self.heartbeat:
                conn.execute("SELECT 1")  # the heartbeat: raises when the link is gone
                last_heard = time.monotonic()


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__
