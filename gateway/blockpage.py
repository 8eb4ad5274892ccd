"""The HTTP block page that replaces content a rule matched.

A ``string.Template`` HTML file (``config/blockpage.html`` by default) with
``$url``, ``$rules``, ``$reference``, ``$explanation`` and ``$support_contact``; every value is
HTML-escaped (the URL first percent-encoded and capped), and nothing secret
is offered to it.
"""

from __future__ import annotations

import html
import secrets
from collections.abc import Sequence
from pathlib import Path
from string import Template

from gateway import sanitise
from gateway.icap.http import build_response_head

# The block page names the URL so the user knows what was blocked: its start
# says that; a longer URL (up to the request-line limit) would only bloat
# the page.  Percent-encoded outside visible ASCII like everywhere it leaves.
URL_SHOWN_MAX = 2048

DEFAULT_TEMPLATE = Path(__file__).resolve().parent.parent / "config" / "blockpage.html"
_FALLBACK = (
    "<!DOCTYPE html><html><body><h1>This content was blocked</h1><p>$url</p>"
    "<p>$rules</p><p>$explanation</p><p>Reference: $reference</p></body></html>"
)


def new_reference() -> str:
    """A short id an end user can quote and an admin can find in the access log."""
    return secrets.token_hex(6)


class BlockPage:
    def __init__(self, template_path: str | Path | None = None) -> None:
        path = Path(template_path) if template_path else DEFAULT_TEMPLATE
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            if template_path:
                raise
            text = _FALLBACK  # an installed package without config/: still block clearly
        self.template = Template(text)
        self.template.substitute(url="", rules="", reference="", explanation="",
                                 support_contact="")  # fail early on typos

    def render(
        self, *, url: str, rules: Sequence[str], reference: str, explanation: str = "",
        support_contact: str = "",
    ) -> tuple[bytes, bytes]:
        """The HTTP response head and body of the block page (``support_contact``:
        the tenant's, [tenants.NAME]; ``$support_contact`` in a template)."""
        body = self.template.substitute(
            url=html.escape(sanitise.url(url, URL_SHOWN_MAX)),
            rules=html.escape(", ".join(rules) or "-"),
            reference=html.escape(reference),
            explanation=html.escape(explanation),
            support_contact=html.escape(support_contact),
        ).encode("utf-8")
        head = build_response_head(
            403,
            "Forbidden",
            [
                ("Content-Type", "text/html; charset=utf-8"),
                ("Content-Length", str(len(body))),
                ("Cache-Control", "no-store"),
                ("Connection", "close"),
            ],
        )
        return head, body
