"""The HTTP block page that replaces content a rule matched.

A ``string.Template`` HTML file per language (``config/blockpage.html`` in
English, ``config/blockpage.fi.html`` in Finnish by default; a tenant's own
template ``page.html`` may have ``page.fi.html`` beside it) with ``$url``,
``$rules``, ``$reference``, ``$explanation`` and ``$support_contact``.  The
language is chosen from the encapsulated HTTP request's ``Accept-Language``
(``choose_language``).  Every value is HTML-escaped (the URL first
percent-encoded and capped), and nothing secret is offered to it.
"""

from __future__ import annotations

import html
import re
import secrets
from collections.abc import Sequence
from pathlib import Path
from string import Template

from twisted.logger import Logger

from gateway import sanitise
from gateway.icap.http import build_response_head

log = Logger()

# The block page names the URL so the user knows what was blocked: its start
# says that; a longer URL (up to the request-line limit) would only bloat
# the page.  Percent-encoded outside visible ASCII like everywhere it leaves.
URL_SHOWN_MAX = 2048
# A support contact is a name, an address or a phone number: a line.
SUPPORT_CONTACT_MAX = 256

DEFAULT_LANGUAGE = "en"
# The languages a template may exist in; the default one is the template
# path itself, the others ``<stem>.<language><suffix>`` beside it.
LANGUAGES = ("en", "fi")
# Shown where the tenant named no support contact, in the page's language.
DEFAULT_CONTACT = {
    "en": "your organisation's IT support",
    "fi": "oman organisaatiosi IT-tuki",
}

# The explanation of an unscannable block (gateway.decision gives it in
# English, from UNSCANNABLE_REASONS) in the page's other languages.
EXPLANATIONS: dict[str, dict[str, str]] = {
    "fi": {
        "too-large": "Sisältö on liian suuri tarkastettavaksi.",
        "decode-limit": "Sisältö purkautuu suuremmaksi kuin yhdyskäytävä tarkastaa.",
        "bomb": "Sisältö on pakattu niin tiiviisti, että se näyttää pakkauspommilta.",
        "corrupt-encoding": "Sisällön pakkaus on viallinen tai katkennut.",
        "unknown-encoding": "Sisältö on pakattu tavalla, jota yhdyskäytävä ei osaa purkaa.",
        "trailing-data": "Sisällön pakatun osan perässä on ylimääräistä dataa.",
        "scan-timeout": "Sisällön tarkastus kesti liian kauan.",
        "engine-error": "Tarkastus epäonnistui tämän sisällön kohdalla.",
    },
}
POLICY_SENTENCE = {"fi": "Käytännön mukaan sisältö, jota ei voida tarkastaa, estetään."}

# Accept-Language is read only this far and for this many entries: a
# browser sends a handful; anything longer is a peer's attempt at our time.
ACCEPT_LANGUAGE_MAX = 1024
ACCEPT_LANGUAGE_ENTRIES = 32

DEFAULT_TEMPLATE = Path(__file__).resolve().parent.parent / "config" / "blockpage.html"
_FALLBACK = (
    "<!DOCTYPE html><html><body><h1>This content was blocked</h1><p>$url</p>"
    "<p>$rules</p><p>$explanation</p><p>Reference: $reference</p><p>$support_contact</p></body></html>"
)
# qvalue = ( "0" [ "." 0*3DIGIT ] ) / ( "1" [ "." 0*3("0") ] )
_QVALUE = re.compile(r"0(?:\.[0-9]{0,3})?|1(?:\.0{0,3})?")
_FIELDS = ("url", "rules", "reference", "explanation", "support_contact")


def new_reference() -> str:
    """A short id an end user can quote and an admin can find in the access log."""
    return secrets.token_hex(6)


def _qvalue(params: str) -> float | None:
    """The weight of ``;q=0.5`` (RFC 9110 12.4.2), 1 when absent, None when
    malformed or another parameter (the entry is then ignored, as if not
    sent)."""
    q = 1.0
    for param in params.split(";"):
        name, eq, value = param.partition("=")
        name = name.strip().lower()
        if not name:
            continue
        value = value.strip()
        if name != "q" or not eq or not _QVALUE.fullmatch(value):
            return None
        q = float(value)
    return q


def _language_range(text: str) -> str | None:
    """A lower-cased language-range (RFC 4647 2.1: ``*`` or 1*8ALPHA
    *("-" 1*8alphanum)), None for anything else."""
    text = text.strip().lower()
    if text == "*":
        return text
    parts = text.split("-")
    if not (parts[0].isascii() and parts[0].isalpha() and len(parts[0]) <= 8):
        return None
    for part in parts[1:]:
        if not (part.isascii() and part.isalnum() and 1 <= len(part) <= 8):
            return None
    return text


def choose_language(accept_language: str | None, available: Sequence[str] = LANGUAGES,
                    default: str = DEFAULT_LANGUAGE) -> str:
    """The language of ``available`` the person prefers (RFC 9110 12.5.4,
    RFC 4647 basic filtering by primary subtag: ``fi-FI`` picks ``fi``),
    ``default`` when none is acceptable or the header is absent or broken.
    Highest weight wins, the earlier entry on a tie; ``*`` weighs the
    languages not named; ``q=0`` refuses one.  Linear in the header, which
    is read only to its first ``ACCEPT_LANGUAGE_MAX`` characters and
    ``ACCEPT_LANGUAGE_ENTRIES`` entries."""
    if not accept_language:
        return default
    value = accept_language[:ACCEPT_LANGUAGE_MAX]
    entries = value.split(",", ACCEPT_LANGUAGE_ENTRIES)[:ACCEPT_LANGUAGE_ENTRIES]
    if len(value) < len(accept_language) and entries:
        entries.pop()  # cut in the middle: the last entry is not what was sent
    named: dict[str, float] = {}  # available language -> weight of its first matching range
    wildcard: float | None = None
    for entry in entries:
        text, _, params = entry.partition(";")
        tag = _language_range(text)
        q = _qvalue(params) if params else 1.0
        if tag is None or q is None:
            continue
        if tag == "*":
            wildcard = q if wildcard is None else wildcard
            continue
        primary = tag.partition("-")[0]
        if primary in available and primary not in named:
            named[primary] = q
    # Equal weights: the header's order for the named ones, then (for "*")
    # the default first.
    unnamed = sorted((lang for lang in available if lang not in named), key=lambda lang: lang != default)
    best, best_q = default, 0.0
    for language in (*named, *unnamed):
        q = named.get(language, wildcard if wildcard is not None else 0.0)
        if q > best_q:
            best, best_q = language, q
    return best


class _Templates:
    """One block page's templates, by language."""

    def __init__(self, path: Path, *, is_default: bool) -> None:
        self.by_language: dict[str, Template] = {}
        try:
            self.by_language[DEFAULT_LANGUAGE] = _load(path)
        except FileNotFoundError:
            if not is_default:
                raise
            # an installed package without config/: still block clearly
            self.by_language[DEFAULT_LANGUAGE] = Template(_FALLBACK)
        for language in LANGUAGES:
            variant = path.with_name(f"{path.stem}.{language}{path.suffix}")
            if language != DEFAULT_LANGUAGE and variant.is_file():
                self.by_language[language] = _load(variant)
        self.languages = tuple(self.by_language)


def _load(path: Path) -> Template:
    template = Template(path.read_text(encoding="utf-8"))
    template.substitute(dict.fromkeys(_FIELDS, ""))  # fail early on typos
    return template


class BlockPage:
    """The block pages: the configured (or shipped) templates, and the
    tenants' own, loaded on first use (``load`` loads one ahead, to fail
    at configuration time rather than at a block)."""

    def __init__(self, template_path: str | Path | None = None) -> None:
        path = Path(template_path) if template_path else DEFAULT_TEMPLATE
        self._default = _Templates(path, is_default=not template_path)
        self._tenant_templates: dict[Path, _Templates] = {}

    @property
    def template(self) -> Template:
        """The default template in the default language."""
        return self._default.by_language[DEFAULT_LANGUAGE]

    def load(self, template_path: str | Path) -> None:
        """Load (again) a tenant's template; raises when it is missing or broken."""
        path = Path(template_path)
        self._tenant_templates[path] = _Templates(path, is_default=False)

    def _templates(self, template_path: str | Path | None) -> _Templates:
        if not template_path:
            return self._default
        path = Path(template_path)
        templates = self._tenant_templates.get(path)
        if templates is None:
            try:
                self.load(path)
            except (OSError, ValueError, KeyError):
                # A block must still be answered: with the default page.
                log.warn("block page template {path} unusable: the default page is shown", path=str(path))
                self._tenant_templates[path] = self._default
            templates = self._tenant_templates[path]
        return templates

    def render(
        self, *, url: str, rules: Sequence[str], reference: str, explanation: str = "",
        accept_language: str | None = None, support_contact: str = "",
        template_path: str | Path | None = None, reason: str = "",
    ) -> tuple[bytes, bytes]:
        """The HTTP response head and body of the block page, in the
        language ``accept_language`` prefers among those the template has;
        ``explanation`` is English, replaced in another language when
        ``reason`` (an unscannable reason) has a translation."""
        templates = self._templates(template_path)
        language = choose_language(accept_language, templates.languages)
        translated = EXPLANATIONS.get(language, {}).get(reason)
        if explanation and translated:
            explanation = f"{translated} {POLICY_SENTENCE[language]}"
        contact = sanitise.text(support_contact, SUPPORT_CONTACT_MAX).strip() or DEFAULT_CONTACT.get(language, "")
        body = templates.by_language[language].substitute(
            url=html.escape(sanitise.url(url, URL_SHOWN_MAX)),
            rules=html.escape(", ".join(rules) or "-"),
            reference=html.escape(reference),
            explanation=html.escape(explanation),
            support_contact=html.escape(contact),
        ).encode("utf-8")
        head = build_response_head(
            403,
            "Forbidden",
            [
                ("Content-Type", "text/html; charset=utf-8"),
                ("Content-Language", language),
                ("Content-Length", str(len(body))),
                ("Cache-Control", "no-store"),
                ("Connection", "close"),
            ],
        )
        return head, body
