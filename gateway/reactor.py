"""The reactor the gateway serves on: Twisted's epoll reactor without the
legacy log context around each ready descriptor.

``EPollReactor.doPoll`` calls every ready descriptor through
``twisted.python.log.callWithLogger``, which asks the descriptor for its log
prefix and pushes it as the legacy ``system`` context: four Python frames
and two dict copies per reactor wake-up, 5-6 % of a worker's CPU under load
(py-spy, issue 9).  The gateway logs through ``twisted.logger``, whose
events never read that context.  What the wrapper also did, catching what
``_doReadOrWrite`` lets escape, stays: such an exception is logged, and the
other ready descriptors are still served.
"""

from __future__ import annotations

import sys
from typing import Any

from twisted.internet.epollreactor import EPollReactor
from twisted.logger import Logger

log = Logger()


class LeanEPollReactor(EPollReactor):
    def doPoll(self, timeout: float | None) -> None:
        """Poll once, as ``EPollReactor.doPoll``, and serve what is ready."""
        # epoll.poll retries by itself on EINTR (PEP 475).
        events = self._poller.poll(-1 if timeout is None else timeout, len(self._selectables))
        selectables = self._selectables
        serve = self._doReadOrWrite
        for fd, event in events:
            selectable = selectables.get(fd)
            if selectable is None:
                continue  # removed by a descriptor served before it in this poll
            try:
                serve(selectable, fd, event)
            except KeyboardInterrupt:
                raise
            except BaseException:  # as callWithLogger: SystemExit in a callback too
                log.failure("unhandled error serving {selectable}", selectable=type(selectable).__name__)

    doIteration = doPoll


def install() -> Any:
    """Install ``LeanEPollReactor`` as the global reactor, unless one is
    installed already (a test's, or another process's choice); returns the
    global reactor either way."""
    if "twisted.internet.reactor" not in sys.modules:
        from twisted.internet.main import installReactor

        installReactor(LeanEPollReactor())
    from twisted.internet import reactor

    return reactor
