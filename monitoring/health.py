"""The monitoring HTTP site: /metrics, /healthz, /readyz."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry
from twisted.logger import Logger
from twisted.web import pages, resource, server
from twisted.web.iweb import IRequest

log = Logger()

ReadyCheck = Callable[[], tuple[bool, str]]


def _text(request: IRequest, code: int, body: str) -> bytes:
    request.setResponseCode(code)
    request.setHeader(b"content-type", b"text/plain; charset=utf-8")
    # A probe must see the state now, not a cache's copy.
    request.setHeader(b"cache-control", b"no-store")
    return body.encode("utf-8")


class HealthResource(resource.Resource):
    """/healthz: the process is alive and its reactor turns (it answered)."""

    isLeaf = True

    def render_GET(self, request: IRequest) -> bytes:
        return _text(request, 200, "ok\n")


class ReadyResource(resource.Resource):
    """/readyz: 200 when ``ready()`` says so, else 503 with its reason.

    ``ready`` is handed in by the wiring (rules loaded, register reachable or
    its queue within bounds); it runs on the reactor and must be cheap.
    """

    isLeaf = True

    def __init__(self, ready: ReadyCheck) -> None:
        super().__init__()
        self._ready = ready

    def render_GET(self, request: IRequest) -> bytes:
        try:
            ok, reason = self._ready()
        except Exception:
            log.failure("readiness check failed")
            return _text(request, 503, "not ready: readiness check failed\n")
        if ok:
            return _text(request, 200, f"ready{': ' + reason if reason else ''}\n")
        return _text(request, 503, f"not ready: {reason or 'unknown'}\n")


class IndexResource(resource.Resource):
    def render_GET(self, request: IRequest) -> bytes:
        return _text(request, 200, "icap-gateway monitoring: /metrics /healthz /readyz\n")

    def getChild(self, path: bytes, request: IRequest) -> resource.Resource:
        if path == b"":
            return self
        return pages.notFound()


class FoldFirst(resource.Resource):
    """Calls ``fold`` on the reactor thread, then lets ``inner`` render: the
    metric objects of this process fold their waiting counts
    (GatewayMetrics.flush) before the scrape reads them in a thread."""

    isLeaf = True

    def __init__(self, inner: resource.Resource, fold: Callable[[], None]) -> None:
        super().__init__()
        self._inner = inner
        self._fold = fold

    def render(self, request: IRequest) -> bytes | int:
        try:
            self._fold()
        except Exception:  # a scrape a moment behind beats no scrape
            log.failure("folding metrics before a scrape failed")
        return self._inner.render(request)  # type: ignore[no-any-return]


def build_root(registry: CollectorRegistry, ready: ReadyCheck,
               before_scrape: Callable[[], None] | None = None) -> resource.Resource:
    # Imported here: prometheus_client.twisted imports the global reactor,
    # which must not happen before the gateway has chosen and installed one.
    from prometheus_client.twisted import MetricsResource

    root = IndexResource()
    # MetricsResource renders in the reactor's thread pool, so a slow
    # collector (many multiprocess files) never stalls ICAP traffic.
    metrics: resource.Resource = MetricsResource(registry)
    if before_scrape is not None:
        metrics = FoldFirst(metrics, before_scrape)
    root.putChild(b"metrics", metrics)
    root.putChild(b"healthz", HealthResource())
    root.putChild(b"readyz", ReadyResource(ready))
    return root


class QuietSite(server.Site):
    """A Site that does not log every scrape and probe to the gateway log."""

    noisy = False

    def log(self, request: IRequest) -> None:
        pass


__all__ = ["FoldFirst", "HealthResource", "IndexResource", "QuietSite", "ReadyResource", "build_root"]
