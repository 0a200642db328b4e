"""Signed bearer tokens: ``base64url(JSON {"u": user, "exp": unix}) "." base64url(HMAC)``.

The HMAC-SHA256 covers the encoded payload exactly as sent, so verification never
re-serializes anything. No I/O here; the clock is injectable for tests.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import time

from .config import check_user_id
from .errors import ConfigError, InvalidInput

DEFAULT_TTL = 86_400


class AuthError(InvalidInput):
    """A token is missing, malformed, wrongly signed or expired."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _b64encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64decode(text: str) -> bytes:
    if not text or any(c not in _B64_ALPHABET for c in text):
        raise ValueError("not base64url")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


_B64_ALPHABET = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")


def _check_secret(secret: object) -> bytes:
    if not isinstance(secret, str) or not secret:
        raise ConfigError("the token secret must be a non-empty string")
    return secret.encode()


def _sign(key: bytes, body: str) -> bytes:
    return hmac.new(key, body.encode("ascii"), hashlib.sha256).digest()


def issue_token(
    user: str, secret: str, ttl_seconds: float = DEFAULT_TTL, *, now: float | None = None
) -> str:
    """A token for ``user`` that expires ``ttl_seconds`` from now."""
    key = _check_secret(secret)
    check_user_id(user)
    if (
        isinstance(ttl_seconds, bool)
        or not isinstance(ttl_seconds, int | float)
        or ttl_seconds <= 0
    ):
        raise InvalidInput(f"token ttl must be a positive number of seconds, got {ttl_seconds!r}")
    exp = int((time.time() if now is None else now) + ttl_seconds)
    payload = json.dumps({"u": user, "exp": exp}, separators=(",", ":")).encode()
    body = _b64encode(payload)
    return f"{body}.{_b64encode(_sign(key, body))}"


def verify_token(token: object, secret: str, *, now: float | None = None) -> str:
    """The user a valid token names; raises AuthError saying what is wrong otherwise."""
    key = _check_secret(secret)
    if token is None or token == "":
        raise AuthError("missing token")
    if not isinstance(token, str) or len(token) > 4096 or token.count(".") != 1:
        raise AuthError("malformed token")
    body, _, sig_text = token.partition(".")
    try:
        sig = _b64decode(sig_text)
        _b64decode(body)
    except (ValueError, binascii.Error):
        raise AuthError("malformed token") from None
    if not hmac.compare_digest(sig, _sign(key, body)):
        raise AuthError("bad token signature")
    try:
        payload = json.loads(_b64decode(body))
    except (ValueError, binascii.Error):
        raise AuthError("malformed token") from None
    if not isinstance(payload, dict):
        raise AuthError("malformed token")
    user, exp = payload.get("u"), payload.get("exp")
    if isinstance(exp, bool) or not isinstance(exp, int) or not isinstance(user, str):
        raise AuthError("malformed token")
    try:
        check_user_id(user)
    except InvalidInput:
        raise AuthError("malformed token") from None
    if (time.time() if now is None else now) >= exp:
        raise AuthError("token expired")
    return user
