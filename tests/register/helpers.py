"""Small helpers shared by the register tests."""

from __future__ import annotations

import datetime as dt

from sqlalchemy import Engine
from sqlalchemy.orm import Session

from gateway.interfaces import RegisterEvent
from register import ops
from register.access import Actor

ADMIN = Actor("alice", "admin")
T0 = 1_800_000_000.0  # a fixed "now" (2027-01-15) for the injected clocks


def utc(ts: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(ts, dt.UTC)


class ListRecorder:
    """A Recorder that keeps what it is given."""

    def __init__(self) -> None:
        self.events: list[RegisterEvent] = []

    def record(self, event: RegisterEvent) -> None:
        self.events.append(event)


def add_tenant(engine: Engine, name: str, now: float = T0, **kwargs: object) -> tuple[int, str]:
    """Create a tenant; returns (tenant id, its first key)."""
    with Session(engine) as s, s.begin():
        t, _k, key = ops.add_tenant(s, ADMIN, name, utc(now), **kwargs)  # type: ignore[arg-type]
        return t.id, key
