"""gateway.reactor: Twisted's epoll reactor without the per-descriptor log
context, still serving every ready descriptor when one of them fails."""

from __future__ import annotations

import os

import pytest
from twisted.internet.epollreactor import EPollReactor
from twisted.logger import globalLogPublisher

from gateway.reactor import LeanEPollReactor


class PipeReader:
    """An IReadDescriptor on a pipe's read end; ``broken``: reading raises,
    and so does the clean-up that follows (the error _doReadOrWrite lets out)."""

    def __init__(self, fd: int, broken: bool = False) -> None:
        self.fd = fd
        self.broken = broken
        self.read: list[bytes] = []
        self.lost = 0

    def fileno(self) -> int:
        return self.fd

    def logPrefix(self) -> str:
        return "pipe"

    def doRead(self) -> None:
        if self.broken:
            raise RuntimeError("read failed")
        self.read.append(os.read(self.fd, 100))

    def connectionLost(self, reason: object) -> None:
        self.lost += 1
        if self.broken:
            raise RuntimeError("clean-up failed too")


@pytest.fixture
def reactor():  # type: ignore[no-untyped-def]
    r = LeanEPollReactor()
    yield r
    r.removeAll()
    r._poller.close()


def test_is_twisted_epoll_reactor(reactor: LeanEPollReactor) -> None:
    assert isinstance(reactor, EPollReactor)


def test_serves_ready_descriptors_and_timers(reactor: LeanEPollReactor) -> None:
    r, w = os.pipe()
    reader = PipeReader(r)
    reactor.addReader(reader)  # type: ignore[arg-type]
    fired: list[int] = []
    reactor.callLater(0, fired.append, 1)
    os.write(w, b"hello")
    for _ in range(3):
        reactor.iterate(0)
    assert reader.read == [b"hello"]
    assert fired == [1]
    os.close(w)
    reactor.iterate(0)  # EOF: the reader is told and removed
    assert reader.lost == 1
    assert reader not in reactor.getReaders()
    os.close(r)


def test_one_failing_descriptor_does_not_starve_the_others(reactor: LeanEPollReactor) -> None:
    events: list[dict[str, object]] = []
    globalLogPublisher.addObserver(events.append)
    fds = [os.pipe() for _ in range(2)]
    broken, good = PipeReader(fds[0][0], broken=True), PipeReader(fds[1][0])
    try:
        reactor.addReader(broken)  # type: ignore[arg-type]
        reactor.addReader(good)  # type: ignore[arg-type]
        for _, w in fds:
            os.write(w, b"x")
        reactor.iterate(0)
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert good.read == [b"x"]
    assert broken.lost == 1
    failures = [e for e in events if "log_failure" in e]
    assert any("clean-up failed too" in str(e["log_failure"].value) for e in failures)  # type: ignore[attr-defined]
    reactor.removeAll()
    for r, w in fds:
        os.close(r)
        os.close(w)


def test_install_keeps_a_reactor_already_installed() -> None:
    from twisted.internet import reactor as installed

    from gateway.reactor import install

    assert install() is installed  # the test run's own reactor stays
