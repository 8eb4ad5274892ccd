"""The headers every answer carries, and the OPTIONS answer, built once per
ISTag (the ruleset's identity) instead of once per request.  Pure: the
ruleset version and the wall time are handed in."""

from __future__ import annotations

from email.utils import formatdate

from gateway.decision import SERVICES

Headers = list[tuple[str, str]]

SERVER = ("Server", "icap-gateway")


def istag(service_id: str, version: str) -> str:
    # RFC 3507 4.7: at most 32 characters, quoted; it changes with the rules
    # so Squid's cached OPTIONS and adapted responses are invalidated.
    return f'"{(service_id + "-" + (version or "none"))[:30]}"'


class AnswerHeaders:
    """Caches keyed by what they are built from (the ISTag above all): a
    rules reload changes the version and so rebuilds them on the next answer."""

    def __init__(self) -> None:
        self._common_key: tuple[str, str] = ("", "")
        self._common: tuple[tuple[str, str], ...] = ()
        self._options: dict[tuple[object, ...], tuple[tuple[str, str], ...]] = {}
        self._date_second = -1
        self._date = ""

    def common(self, service_id: str, version: str) -> Headers:
        """ISTag and Server: a fresh list the caller may extend."""
        if (service_id, version) != self._common_key:
            self._common_key = (service_id, version)
            self._common = (("ISTag", istag(service_id, version)), SERVER)
        return list(self._common)

    def options(self, service: str, *, service_id: str, version: str, max_connections: int,
                options_ttl: int, preview_size: int, now: float) -> Headers | None:
        """The OPTIONS answer's headers for ``service``; None when there is no
        such service (404)."""
        method = SERVICES.get(service)
        if method is None:
            return None
        key = (method, service_id, version, max_connections, options_ttl, preview_size)
        fixed = self._options.get(key)
        if fixed is None:
            if len(self._options) > 16:  # old rulesets' answers
                self._options.clear()
            common = self.common(service_id, version)
            headers = [
                ("Methods", method),
                ("Service", "icap-gateway YARA scanner"),
                *common,
                ("Service-ID", service_id),
                ("Max-Connections", str(max_connections)),
                ("Options-TTL", str(options_ttl)),
                ("Allow", "204"),
                ("Transfer-Preview", "*"),
            ]
            fixed = self._options[key] = tuple(headers)
        answer = list(fixed)
        answer.append(("Date", self._http_date(now)))
        if preview_size > 0:
            answer.append(("Preview", str(preview_size)))
        return answer

    def _http_date(self, now: float) -> str:
        second = int(now)
        if second != self._date_second:
            self._date_second = second
            self._date = formatdate(second, usegmt=True)
        return self._date
