"""The block page's language (Accept-Language, RFC 9110 12.5.4) and its
two shipped templates."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.blockpage import (
    ACCEPT_LANGUAGE_ENTRIES,
    ACCEPT_LANGUAGE_MAX,
    DEFAULT_CONTACT,
    EXPLANATIONS,
    SUPPORT_CONTACT_MAX,
    BlockPage,
    choose_language,
)
from gateway.decision import BlockPage as BlockAnswer
from gateway.decision import PeerAllows, decide
from gateway.interfaces import UNSCANNABLE_REASONS, Verdict
from tests.gateway.fakes import GOOD_KEY, make_harness
from tests.gateway.test_protocol import RES_HDR, chunked
from tests.icap_responses import parse_responses

LANGUAGE_TABLE = [
    # (Accept-Language, chosen)
    (None, "en"),
    ("", "en"),
    ("fi", "fi"),
    ("FI", "fi"),
    ("fi-FI", "fi"),
    ("fi-FI,fi;q=0.9,en;q=0.8", "fi"),
    ("en-GB,en;q=0.9,fi;q=0.8", "en"),
    ("en;q=0.5, fi;q=0.6", "fi"),
    ("en;q=0.5,fi;q=0.5", "en"),  # a tie: the header's order
    ("fi;q=0.5,en;q=0.5", "fi"),
    ("sv-FI,fi;q=0.7", "fi"),  # no Swedish page: the next one acceptable
    ("sv, de", "en"),  # nothing we have: the default
    ("*", "en"),
    ("*;q=0.5, en;q=0", "fi"),  # English refused, anything else welcome
    ("fi;q=0", "en"),
    ("en;q=0, fi;q=0", "en"),  # nothing acceptable: still a page, in the default
    ("en;q=0.001, fi;q=0.002", "fi"),
    ("fi;q=1.000", "fi"),
    ("de, fi ; q = 0.3", "fi"),  # optional whitespace around the weight
    ("finnish", "en"),  # a 7-letter primary subtag is no "fi"
    ("fi-", "en"),  # an empty subtag: not a range
]


@pytest.mark.parametrize(("header", "chosen"), LANGUAGE_TABLE)
def test_language_choice(header: str | None, chosen: str) -> None:
    assert choose_language(header) == chosen


@pytest.mark.parametrize("header", [
    "fi;q=2", "fi;q=1.5", "fi;q=0.1234", "fi;q=", "fi;q", "fi;q=abc", "fi;q=-1", "fi;q=1.01",
    "fi;level=1", "fi;q=0.5;q=x", "f\u00efi", "fi\x00", "fi-\u0661", "fi-toolongsubtag", "*-fi",
])
def test_a_broken_entry_is_ignored(header: str) -> None:
    assert choose_language(header) == "en"
    assert choose_language(header + ", fi;q=0.1") == "fi"  # the rest of the header still counts


def test_only_the_first_entries_count() -> None:
    header = ",".join(["de"] * ACCEPT_LANGUAGE_ENTRIES + ["fi"])
    assert choose_language(header) == "en"
    header = ",".join(["de"] * (ACCEPT_LANGUAGE_ENTRIES - 1) + ["fi"])
    assert choose_language(header) == "fi"


def test_a_huge_header_is_read_to_its_bound() -> None:
    # The entry the bound cuts in two is dropped, not read as "f".
    pad = "de," * ((ACCEPT_LANGUAGE_MAX - 2) // 3)
    assert choose_language(pad + "fi" + ",x" * 1_000_000) == "en"
    assert choose_language("fi," + "a" * 10_000_000) == "fi"
    assert choose_language("," * 10_000_000 + "fi") == "en"
    assert choose_language(";" * 10_000_000) == "en"
    assert choose_language("fi" + ";q=1" * 1_000_000) == "en"  # cut: dropped


def test_english_page() -> None:
    head, body = BlockPage().render(url="http://example.com/x", rules=["Eicar"], reference="abc123",
                                    support_contact="Helpdesk, 010 123 4567")
    text = body.decode()
    assert b"\r\nContent-Language: en\r\n" in head
    assert '<html lang="en">' in text
    assert "This content was blocked" in text
    assert "Helpdesk, 010 123 4567" in text and "abc123" in text and "Eicar" in text


def test_finnish_page() -> None:
    head, body = BlockPage().render(url="http://example.com/x", rules=["Eicar"], reference="abc123",
                                    accept_language="fi-FI,fi;q=0.9,en;q=0.8",
                                    support_contact="Tietohallinto, tuki@example.fi")
    text = body.decode()
    assert b"\r\nContent-Language: fi\r\n" in head
    assert b"\r\nContent-Type: text/html; charset=utf-8\r\n" in head
    assert '<html lang="fi">' in text
    assert "Sisältö estettiin" in text and "viitetunnus" in text
    assert "Tietohallinto, tuki@example.fi" in text and "abc123" in text and "Eicar" in text
    length = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
    assert length == len(body)  # bytes, not characters: ä and ö are two each


@pytest.mark.parametrize("language", ["en", "fi"])
def test_no_contact_gets_the_default_phrase(language: str) -> None:
    _head, body = BlockPage().render(url="u", rules=[], reference="r", accept_language=language)
    assert DEFAULT_CONTACT[language].replace("'", "&#x27;") in body.decode()


@pytest.mark.parametrize("language", ["en", "fi"])
def test_contact_is_escaped_and_bounded(language: str) -> None:
    contact = "<script>alert(1)</script>\r\n\x00" + "x" * 10_000
    _head, body = BlockPage().render(url="u", rules=["<b>"], reference="<r>", accept_language=language,
                                     support_contact=contact)
    text = body.decode()
    assert "<script>" not in text and "&lt;script&gt;" in text
    assert "<b>" not in text and "<r>" not in text
    assert "\x00" not in text and "x" * SUPPORT_CONTACT_MAX not in text


def test_tenant_template_with_its_finnish_variant(tmp_path: Path) -> None:
    (tmp_path / "acme.html").write_text("EN $support_contact $reference", encoding="utf-8")
    (tmp_path / "acme.fi.html").write_text("FI $support_contact $reference", encoding="utf-8")
    (tmp_path / "solo.html").write_text("SOLO $reference", encoding="utf-8")
    pages = BlockPage()
    _head, body = pages.render(url="u", rules=[], reference="r1", accept_language="fi",
                               support_contact="Acme IT", template_path=tmp_path / "acme.html")
    assert body == b"FI Acme IT r1"
    _head, body = pages.render(url="u", rules=[], reference="r2", accept_language="en",
                               support_contact="Acme IT", template_path=tmp_path / "acme.html")
    assert body == b"EN Acme IT r2"
    # Only English: a Finnish reader gets it, labelled as English.
    head, body = pages.render(url="u", rules=[], reference="r3", accept_language="fi",
                              template_path=tmp_path / "solo.html")
    assert body == b"SOLO r3" and b"Content-Language: en\r\n" in head


def test_a_missing_tenant_template_falls_back_to_the_default(tmp_path: Path) -> None:
    pages = BlockPage()
    with pytest.raises(FileNotFoundError):
        pages.load(tmp_path / "missing.html")
    _head, body = pages.render(url="u", rules=[], reference="r", accept_language="fi",
                               template_path=tmp_path / "missing.html")
    assert "Sisältö estettiin" in body.decode()


def test_a_template_with_a_typo_fails_at_load(tmp_path: Path) -> None:
    (tmp_path / "typo.html").write_text("$refrence", encoding="utf-8")
    with pytest.raises(KeyError):
        BlockPage(tmp_path / "typo.html")


def test_the_encapsulated_requests_accept_language_picks_the_page() -> None:
    req_hdr = (b"GET http://example.com/dl/file.txt HTTP/1.1\r\nHost: example.com\r\n"
               b"Accept-Language: fi-FI,fi;q=0.9,en-US;q=0.8,en;q=0.7\r\n\r\n")
    enc = f"req-hdr=0, res-hdr={len(req_hdr)}, res-body={len(req_hdr) + len(RES_HDR)}"
    head = f"RESPMOD icap://gw/respmod ICAP/1.0\r\nHost: gw\r\nAuthorization: Bearer {GOOD_KEY}\r\nEncapsulated: {enc}"
    h = make_harness()
    h.send(head.encode() + b"\r\n\r\n" + req_hdr + RES_HDR + chunked(b"some EVIL bytes"))
    [r] = parse_responses(h.output())
    assert r.sections["res-hdr"].startswith(b"HTTP/1.1 403 Forbidden\r\n")
    assert b"\r\nContent-Language: fi\r\n" in r.sections["res-hdr"]
    assert "Sisältö estettiin" in r.body.decode()


def test_every_unscannable_reason_is_explained_in_finnish() -> None:
    assert EXPLANATIONS["fi"].keys() == UNSCANNABLE_REASONS.keys()


def test_an_unscannable_block_is_explained_in_the_pages_language() -> None:
    answer = decide(Verdict("unscannable", detail="bomb", reason="bomb", action="block"), PeerAllows(False))
    assert isinstance(answer, BlockAnswer) and answer.reason == "bomb"
    pages = BlockPage()
    kw = {"url": "u", "rules": [], "reference": "r", "explanation": answer.explanation, "reason": answer.reason}
    _head, body = pages.render(accept_language="fi", **kw)  # type: ignore[arg-type]
    assert "pakkauspommilta" in body.decode() and "decompression" not in body.decode()
    _head, body = pages.render(accept_language="en", **kw)  # type: ignore[arg-type]
    assert "decompression bomb" in body.decode()
