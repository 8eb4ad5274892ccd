"""How many ICAP connections the whole gateway holds, across its workers.

``[server] max_connections`` is advertised in OPTIONS as Max-Connections: a
promise for the gateway, not for one worker.  With several workers (see
``gateway.workers``) the supervisor creates a small file of one 8-byte slot
per worker, mapped by every worker (``mmap``, shared pages, no disk I/O).
Each worker writes only its own slot (its open connections, and how many
connections it took from the supervisor's hand-off, see ``gateway.handoff``)
and reads the sum when it accepts a connection.  The supervisor reads every
slot to hand each new connection to the least-loaded worker.  No lock is
needed: each field has one writer, and a reader that sees a slot mid-update
is off by at most that worker's last change, for one decision.  The
supervisor zeroes a dead worker's slot (its connections died with it)
before restarting it.

A single process keeps the count in memory (``LocalConnectionCount``).
"""

from __future__ import annotations

import mmap
import os
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

# The worker's slot, given by the supervisor: "<path>:<slot index>".
SLOTS_ENV = "ICAP_GATEWAY_CONNECTION_SLOTS"

# One slot: open connections, connections adopted from the hand-off (ever).
_SLOT = struct.Struct("<qq")
_OPEN = struct.Struct("<q")
_ADOPTED_OFFSET = _OPEN.size


class ConnectionCount(Protocol):
    def publish(self, local: int) -> None:
        """This process now holds ``local`` connections."""

    def total(self, local: int) -> int:
        """Connections held by the whole gateway (this process: ``local``)."""

    def adopted(self) -> None:
        """This process took one more connection from the supervisor's hand-off."""


class LocalConnectionCount:
    """One process: the gateway's count is this process's."""

    def publish(self, local: int) -> None:
        pass

    def total(self, local: int) -> int:
        return local

    def adopted(self) -> None:
        pass


def create_slots(path: Path, workers: int) -> None:
    """The supervisor's file: ``workers`` zeroed slots (replaces an old one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(bytes(_SLOT.size * workers))
    os.replace(tmp, path)


def clear_slot(path: Path, slot: int) -> None:
    """A worker died: its connections are gone with it."""
    with open(path, "r+b") as f:
        f.seek(slot * _SLOT.size)
        f.write(_SLOT.pack(0, 0))


class SharedConnectionCount:
    """One worker's view of the supervisor's slot file."""

    def __init__(self, path: Path, slot: int) -> None:
        with open(path, "r+b") as f:
            self._map = mmap.mmap(f.fileno(), 0)
        self.slots = len(self._map) // _SLOT.size
        if not 0 <= slot < self.slots:
            raise ValueError(f"connection slot {slot} outside {path} ({self.slots} slots)")
        self.slot = slot
        self._adopted = 0
        _SLOT.pack_into(self._map, slot * _SLOT.size, 0, 0)

    def publish(self, local: int) -> None:
        _OPEN.pack_into(self._map, self.slot * _SLOT.size, local)

    def total(self, local: int) -> int:
        others = sum(
            max(0, _OPEN.unpack_from(self._map, i * _SLOT.size)[0]) for i in range(self.slots) if i != self.slot
        )
        return others + local

    def adopted(self) -> None:
        self._adopted += 1
        _OPEN.pack_into(self._map, self.slot * _SLOT.size + _ADOPTED_OFFSET, self._adopted)


class SlotTable:
    """The supervisor's read-only view of every worker's slot."""

    def __init__(self, path: Path) -> None:
        with open(path, "rb") as f:
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self.slots = len(self._map) // _SLOT.size

    def read(self, slot: int) -> tuple[int, int]:
        """(open connections, connections adopted from the hand-off) of one worker."""
        opened, adopted = _SLOT.unpack_from(self._map, slot * _SLOT.size)
        return max(0, opened), max(0, adopted)

    def close(self) -> None:
        self._map.close()


def count_from_environment(env: Mapping[str, str]) -> ConnectionCount:
    """A worker's shared count when the supervisor gave it a slot, else a local one."""
    value = env.get(SLOTS_ENV)
    if not value:
        return LocalConnectionCount()
    path, _, slot = value.rpartition(":")
    return SharedConnectionCount(Path(path), int(slot))
