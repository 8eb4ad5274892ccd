from base64 import b64encode

import pytest

from register.settings import AuthSettings
from register.users import identify

SQUID = AuthSettings()
PLAIN = AuthSettings(user_header="X-Client-Username", user_encoding="plain")


def b64(s: str) -> str:
    return b64encode(s.encode()).decode()


def test_squid_default_base64_user_and_client_ip() -> None:
    headers = {"x-authenticated-user": b64("matti.meikäläinen"), "x-client-ip": "10.1.2.3"}
    assert identify(headers, "192.0.2.1", SQUID) == ("matti.meikäläinen", "10.1.2.3")


def test_plain_header_from_config() -> None:
    headers = {"x-client-username": " bob ", "x-authenticated-user": b64("ignored")}
    assert identify(headers, "192.0.2.1", PLAIN) == ("bob", "192.0.2.1")


@pytest.mark.parametrize("value", ["not base64!", b64("a\nb"), b64("x" * 256), "", "/w=="])
def test_bad_user_values_give_no_user(value: str) -> None:
    assert identify({"x-authenticated-user": value}, "192.0.2.1", SQUID)[0] is None


def test_missing_or_bad_client_ip_falls_back_to_peer() -> None:
    assert identify({}, "192.0.2.9", SQUID) == (None, "192.0.2.9")
    assert identify({"x-client-ip": "10.0.0.999"}, "192.0.2.9", SQUID)[1] == "192.0.2.9"
    assert identify({"x-client-ip": "2001:DB8:0::1"}, "192.0.2.9", SQUID)[1] == "2001:db8::1"


def test_authorization_is_never_read() -> None:
    # The user comes only from the configured header, never from credentials.
    headers = {"authorization": "Bearer icgw.acme.secret", "proxy-authorization": "Basic " + b64("u:p")}
    assert identify(headers, "192.0.2.1", SQUID) == (None, "192.0.2.1")
