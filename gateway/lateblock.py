"""Late-block memory: a download cut after our early commit (Squid bug
5352: past Squid 5's 64 KiB buffer the original head is out before the
verdict, so a late match can only abort the transfer) leaves the person
with a broken file and no reason.  The verdict is remembered here, keyed by
tenant and URL, so the next RESPMOD for that URL gets the block page at
its head, before any byte is committed, and a REQMOD for it is refused
before it reaches the origin.

Per worker process, in memory: bounded to ``max_entries`` (least recently
used first out) and each entry to ``ttl`` seconds.  README, "Late-block
memory", says what that means with several workers and a farm.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable
from typing import Literal

from gateway.interfaces import Verdict

# What icap_gateway_late_block_total counts: a fixed set.
LateBlockEvent = Literal["remembered", "respmod-blocked", "reqmod-refused", "expired", "evicted"]
LATE_BLOCK_EVENTS: tuple[LateBlockEvent, ...] = (
    "remembered", "respmod-blocked", "reqmod-refused", "expired", "evicted")


def _key(tenant_id: int, url: str) -> tuple[int, bytes]:
    # A digest, not the URL: an entry's size does not depend on what the
    # peer sent (a URL may be as long as the request-line limit), and no
    # URL is kept in memory past the transaction.
    return tenant_id, hashlib.sha256(url.encode("utf-8", "surrogatepass")).digest()


class LateBlockMemory:
    def __init__(self, *, ttl: float, max_entries: int, clock: Callable[[], float],
                 count: Callable[[LateBlockEvent], None] = lambda event: None) -> None:
        self.ttl = ttl
        self.max_entries = max_entries
        self._clock = clock
        self._count = count
        # key -> (expires at, the verdict); oldest use first
        self._entries: OrderedDict[tuple[int, bytes], tuple[float, Verdict]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def remember(self, tenant_id: int, url: str, verdict: Verdict) -> None:
        """A transfer of ``url`` was cut for ``verdict``."""
        if not url or self.max_entries <= 0 or self.ttl <= 0:
            return
        key = _key(tenant_id, url)
        self._entries[key] = (self._clock() + self.ttl, verdict)
        self._entries.move_to_end(key)
        self._count("remembered")
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
            self._count("evicted")

    def recall(self, tenant_id: int, url: str) -> Verdict | None:
        """The verdict remembered for ``url`` (this tenant's), None when none
        is or it expired."""
        if not self._entries or not url:
            return None
        key = _key(tenant_id, url)
        entry = self._entries.get(key)
        if entry is None:
            return None
        expires, verdict = entry
        if self._clock() >= expires:
            del self._entries[key]
            self._count("expired")
            return None
        self._entries.move_to_end(key)
        return verdict
