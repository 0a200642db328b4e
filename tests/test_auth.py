"""Signed tokens: round trip and every way a token can be wrong."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json

import pytest

from coordinator.auth import AuthError, issue_token, verify_token
from coordinator.errors import ConfigError, InvalidInput


def test_round_trip_and_expiry() -> None:
    token = issue_token("alice@example.com", "s", 60, now=1000)
    assert verify_token(token, "s", now=1059) == "alice@example.com"
    with pytest.raises(AuthError, match=r"^token expired$"):
        verify_token(token, "s", now=1060)
    body = token.split(".")[0]
    payload = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    assert payload == {"u": "alice@example.com", "exp": 1060}


@pytest.mark.parametrize(
    ("token", "reason"),
    [
        (None, "missing token"),
        ("", "missing token"),
        (42, "malformed token"),
        ("no-dot", "malformed token"),
        ("a.b.c", "malformed token"),
        ("!!.??", "malformed token"),
        ("eyJ1IjoiYSJ9.", "malformed token"),
    ],
)
def test_malformed_tokens(token: object, reason: str) -> None:
    with pytest.raises(AuthError) as info:
        verify_token(token, "s")
    assert info.value.reason == reason
    assert isinstance(info.value, InvalidInput)


def test_signature_is_checked_before_the_payload() -> None:
    token = issue_token("alice", "s")
    with pytest.raises(AuthError, match=r"^bad token signature$"):
        verify_token(token, "other")
    sig = token.split(".")[1]
    mallory = issue_token("mallory", "s").split(".")[0]
    with pytest.raises(AuthError, match=r"^bad token signature$"):
        verify_token(f"{mallory}.{sig}", "s")
    # A correctly signed payload of the wrong shape is still refused.
    bogus = base64.urlsafe_b64encode(b'{"u": 1, "exp": "x"}').rstrip(b"=").decode()
    sig2 = base64.urlsafe_b64encode(hmac.new(b"s", bogus.encode(), hashlib.sha256).digest()).rstrip(
        b"="
    )
    with pytest.raises(AuthError, match=r"^malformed token$"):
        verify_token(f"{bogus}.{sig2.decode()}", "s")


def test_secret_and_user_are_validated() -> None:
    with pytest.raises(ConfigError):
        issue_token("alice", "")
    with pytest.raises(ConfigError):
        verify_token("a.b", "")
    with pytest.raises(InvalidInput, match="invalid user id"):
        issue_token("has space", "s")
    with pytest.raises(InvalidInput, match="ttl"):
        issue_token("alice", "s", 0)
