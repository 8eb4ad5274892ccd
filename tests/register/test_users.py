import ipaddress
from base64 import b64encode

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.sanitise import has_control
from register.models import IP_MAX, USERNAME_MAX
from register.settings import AuthSettings
from register.users import BAD_CLIENT_IP, BAD_USER, CLIENT_IP_HEADER_MAX, USER_HEADER_MAX, identify

SQUID = AuthSettings()
PLAIN = AuthSettings(user_header="X-Client-Username", user_encoding="plain")


def b64(s: str) -> str:
    return b64encode(s.encode()).decode()


def test_squid_default_base64_user_and_client_ip() -> None:
    headers = {"x-authenticated-user": b64("matti.meikäläinen"), "x-client-ip": "10.1.2.3"}
    assert identify(headers, "192.0.2.1", SQUID) == ("matti.meikäläinen", "10.1.2.3", ())


def test_plain_header_from_config() -> None:
    headers = {"x-client-username": " bob ", "x-authenticated-user": b64("ignored")}
    assert identify(headers, "192.0.2.1", PLAIN) == ("bob", "192.0.2.1", ())


@pytest.mark.parametrize("value", ["not base64!", b64("a\nb"), b64("x" * 256), "", "/w=="])
def test_bad_user_values_give_no_user(value: str) -> None:
    assert identify({"x-authenticated-user": value}, "192.0.2.1", SQUID)[0] is None


def test_missing_or_bad_client_ip_falls_back_to_peer() -> None:
    assert identify({}, "192.0.2.9", SQUID) == (None, "192.0.2.9", ())
    assert identify({"x-client-ip": "10.0.0.999"}, "192.0.2.9", SQUID)[1] == "192.0.2.9"
    assert identify({"x-client-ip": "2001:DB8:0::1"}, "192.0.2.9", SQUID)[1] == "2001:db8::1"


def test_authorization_is_never_read() -> None:
    # The user comes only from the configured header, never from credentials.
    headers = {"authorization": "Bearer icgw.acme.secret", "proxy-authorization": "Basic " + b64("u:p")}
    assert identify(headers, "192.0.2.1", SQUID) == (None, "192.0.2.1", ())


@pytest.mark.parametrize("value", [
    "fe80::1%\rX-Evil: 1",  # a zone holding a header of the attacker's choosing
    "10.0.0.1\x00",
    "1" * 3000,  # a 3,000-character value
    "fe80::1%" + "e" * 16,  # a zone longer than any interface name
    "10.0.0.999",
    "",
])
def test_hostile_client_ip_is_refused_and_named(value: str) -> None:
    identity = identify({"x-client-ip": value}, "192.0.2.9", SQUID)
    assert identity.client_ip == "192.0.2.9"
    assert identity.bad_headers == ((BAD_CLIENT_IP,) if value else ())


@pytest.mark.parametrize(("value", "stored"), [
    ("::ffff:192.0.2.7", "192.0.2.7"),  # IPv4-mapped: the IPv4 address it is
    ("fe80::1%eth0", "fe80::1"),  # a zone names the proxy's interface: dropped
    (" 2001:DB8:0:0::1 ", "2001:db8::1"),
    ("0:0:0:0:0:ffff:c000:0207", "192.0.2.7"),
])
def test_client_ip_is_stored_canonical(value: str, stored: str) -> None:
    assert identify({"x-client-ip": value}, "192.0.2.9", SQUID) == (None, stored, ())


def test_client_ip_cap_fits_the_longest_address_with_a_zone() -> None:
    longest = "ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.255%" + "e" * 15
    assert len(longest) <= CLIENT_IP_HEADER_MAX
    assert identify({"x-client-ip": longest}, "192.0.2.9", SQUID).bad_headers == ()


@pytest.mark.parametrize("name", ["a\x85b", "a\u2028b", "a\x7fb", "a\rX-Evil: 1"])
def test_control_characters_refuse_a_username(name: str) -> None:
    identity = identify({"x-authenticated-user": b64(name)}, "192.0.2.1", SQUID)
    assert identity.username is None
    assert identity.bad_headers == (BAD_USER,)
    assert identify({"x-client-username": name}, "192.0.2.1", PLAIN).bad_headers == (BAD_USER,)


def test_username_length_cap() -> None:
    longest = "ä" * 255  # USERNAME_MAX characters, two UTF-8 bytes each
    assert identify({"x-authenticated-user": b64(longest)}, "192.0.2.1", SQUID).username == longest
    assert len(b64("\U0001f600" * 255)) <= USER_HEADER_MAX  # even 4-byte characters fit the raw cap
    huge = identify({"x-authenticated-user": "QUFB" * 100_000}, "192.0.2.1", SQUID)
    assert huge == (None, "192.0.2.1", (BAD_USER,))


@given(st.text(max_size=200), st.text(max_size=200))
def test_whatever_the_headers_say_only_clean_values_come_out(ip: str, user: str) -> None:
    identity = identify({"x-client-ip": ip, "x-authenticated-user": user}, "192.0.2.9", SQUID)
    stored = identity.client_ip
    assert stored == "192.0.2.9" or str(ipaddress.ip_address(stored)) == stored  # canonical
    assert len(stored) <= IP_MAX and not has_control(stored)
    if identity.username is not None:
        assert 0 < len(identity.username) <= USERNAME_MAX and not has_control(identity.username)
    assert set(identity.bad_headers) <= {BAD_CLIENT_IP, BAD_USER}


def test_canonical_ip_cache_is_bounded_and_answers_as_the_parse() -> None:
    from register import users

    users._canonical_ip_cached.cache_clear()
    padded = " " * 200 + "192.0.2.1"  # too long to be kept: parsed every time, same answer
    for value in ("::ffff:192.0.2.1", "192.0.2.1", "junk", padded, "::ffff:192.0.2.1"):
        assert users.canonical_ip(value) == users._canonical_ip(value)
    info = users._canonical_ip_cached.cache_info()
    assert (info.hits, info.currsize) == (1, 3)
    for i in range(users._CANONICAL_CACHE_SIZE + 10):
        users.canonical_ip(f"10.0.{i // 256}.{i % 256}")
    assert users._canonical_ip_cached.cache_info().currsize == users._CANONICAL_CACHE_SIZE
