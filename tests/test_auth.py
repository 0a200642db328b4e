"""JWT bearer tokens: HS256 round trip, RS256/ES256 with a key file or a JWKS file, and
every way a token can be wrong (expired, forged, spliced, alg confusion, iss/aud, lifetime)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import math
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from coordinator.auth import (
    DEFAULT_MAX_LIFETIME,
    VERIFIED_KEPT,
    AuthError,
    TokenSettings,
    TokenVerifier,
    issue_token,
    thumbprint,
    verify_token,
)
from coordinator.errors import ConfigError, InvalidInput

NOW = 1_800_000_000


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _part(token: str, i: int) -> dict[str, Any]:
    text = token.split(".")[i]
    value = json.loads(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)))
    assert isinstance(value, dict)
    return value


def _hs256(header: dict[str, Any], payload: dict[str, Any], key: bytes) -> str:
    """A token signed by hand, for shapes PyJWT would not produce."""
    body = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(payload).encode())}"
    return f"{body}.{_b64(hmac.new(key, body.encode(), hashlib.sha256).digest())}"


def _refusal(verify: Callable[[], object]) -> str:
    with pytest.raises(AuthError) as info:
        verify()
    assert isinstance(info.value, InvalidInput)
    return info.value.reason


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _pem(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _claims(user: str = "alice", ttl: int = 600, **extra: Any) -> dict[str, Any]:
    now = int(time.time())
    return {"sub": user, "iat": now, "exp": now + ttl, **extra}


# -- HS256 -----------------------------------------------------------------------------
def test_round_trip_and_expiry() -> None:
    token = issue_token("alice@example.com", "s", 60, now=NOW)
    assert verify_token(token, "s", now=NOW + 59) == "alice@example.com"
    assert _refusal(lambda: verify_token(token, "s", now=NOW + 60)) == "token expired"
    assert _part(token, 0) == {"alg": "HS256", "typ": "JWT", "kid": thumbprint(b"s")}
    assert _part(token, 1) == {"sub": "alice@example.com", "iat": NOW, "exp": NOW + 60}
    # Any JWT library can issue tokens with the shared secret (no kid needed).
    plain = jwt.encode({"sub": "bob", "exp": NOW + 60}, "a" * 32, algorithm="HS256")
    assert verify_token(plain, "a" * 32, now=NOW) == "bob"


def test_secrets_being_rotated_out_still_verify_and_never_show() -> None:
    """A rotation of the HS256 secret: nodes verify with the new secret and accept tokens
    signed with the previous ones (``previous_secrets``) until those expire; a token
    signed with neither is refused as before, and no repr shows them."""
    new, old, older = "n" * 32, "o" * 32, "p" * 32
    settings = TokenSettings(secret=new, previous_secrets=(old, older))
    verifier = TokenVerifier.from_settings(settings)
    for secret, user in ((new, "ann"), (old, "bob"), (older, "cat")):
        assert verifier.verify(issue_token(user, secret, 60, now=NOW), now=NOW).user == user
    # Another library's token, without a kid, signed with a previous secret.
    plain = jwt.encode({"sub": "dan", "exp": NOW + 60}, old, algorithm="HS256")
    assert verifier.verify(plain, now=NOW).user == "dan"
    forged = issue_token("eve", "x" * 32, 60, now=NOW)
    assert _refusal(lambda: verifier.verify(forged, now=NOW)) == "bad token signature"
    assert old not in repr(settings) and older not in repr(settings)
    with pytest.raises(ConfigError, match="previous secrets are HS256's"):
        TokenSettings(algorithm="RS256", public_key_file="k.pem", previous_secrets=(old,))
    with pytest.raises(ConfigError, match="non-empty string"):
        TokenSettings(secret=new, previous_secrets=("",))


def test_a_token_verified_once_is_remembered_but_still_expires() -> None:
    """A verifier remembers tokens it verified (a reconnecting client presents its token
    again): the signature is not checked twice, the times are, on every use."""
    verifier = TokenVerifier.from_settings(TokenSettings(secret="s"))
    token = issue_token("alice", "s", 60, now=NOW)
    assert verifier.verify(token, now=NOW + 1).user == "alice"
    assert verifier.verify(token, now=NOW + 59).user == "alice"
    assert _refusal(lambda: verifier.verify(token, now=NOW + 60)) == "token expired"
    forged = token[:-2] + ("AA" if token[-2:] != "AA" else "BB")
    assert _refusal(lambda: verifier.verify(forged, now=NOW + 1)) == "bad token signature"


@pytest.mark.parametrize(
    ("claims", "org", "admin"),
    [
        ({}, "", False),
        ({"org": "acme", "role": "admin"}, "acme", True),
        ({"role": "admin"}, "", True),
        ({"admin": True}, "", False),  # only the role counts: one claim makes an admin
        ({"role": ["admin"]}, "", False),
        ({"role": "user", "admin": "yes"}, "", False),
    ],
)
def test_identity_carries_the_org_and_the_admin_role(
    claims: dict[str, Any], org: str, admin: bool
) -> None:
    verifier = TokenVerifier.from_settings(TokenSettings(secret="s"))
    token = issue_token("alice", "s", claims=claims)
    for _ in range(2):  # verified, then remembered
        identity = verifier.verify(token)
        assert (identity.user, identity.org, identity.admin) == ("alice", org, admin)
    assert verifier.user(token) == "alice"


def test_remembered_tokens_are_bounded_and_held_by_their_digest() -> None:
    verifier = TokenVerifier.from_settings(TokenSettings(secret="s"))
    tokens = [issue_token(f"u{i}", "s", now=NOW) for i in range(VERIFIED_KEPT + 5)]
    for token in tokens:
        verifier.verify(token, now=NOW)
    kept = verifier._verified
    assert len(kept) == VERIFIED_KEPT
    assert all(isinstance(key, bytes) and len(key) == 32 for key in kept)
    # The oldest went first; a forgotten token is verified again, not refused.
    assert hashlib.sha256(tokens[0].encode()).digest() not in kept
    assert verifier.verify(tokens[0], now=NOW).user == "u0"


def test_thumbprint_is_rfc7638() -> None:
    # RFC 7638 over {"k": base64url(key), "kty": "oct"} in canonical form.
    canonical = '{"k":"c2VjcmV0","kty":"oct"}'
    assert thumbprint(b"secret") == _b64(hashlib.sha256(canonical.encode()).digest())


@pytest.mark.parametrize(
    ("token", "reason"),
    [
        (None, "missing token"),
        ("", "missing token"),
        (42, "malformed token"),
        ("no-dot", "malformed token"),
        ("a.b", "malformed token"),
        ("a.b.c", "malformed token"),
        ("!!.??.##", "malformed token"),
        ("eyJ1IjoiYSJ9.e30.", "token algorithm not accepted (this node accepts HS256)"),
        ("x" * 9000, "malformed token"),
        ("a.\ud800.c", "malformed token"),  # a lone surrogate (JSON can carry one)
        ("\u00e9.b.c", "malformed token"),
    ],
)
def test_malformed_tokens(token: object, reason: str) -> None:
    assert _refusal(lambda: verify_token(token, "s")) == reason


def test_signature_is_checked_before_the_payload() -> None:
    token = issue_token("alice", "s")
    assert _refusal(lambda: verify_token(token, "other")) == "bad token signature"
    header, payload, sig = token.split(".")
    mallory = issue_token("mallory", "s").split(".")[1]
    assert _refusal(lambda: verify_token(f"{header}.{mallory}.{sig}", "s")) == (
        "bad token signature"
    )
    # The header of a token signed with another secret: its kid differs, so does the MAC.
    other_header = issue_token("alice", "x").split(".")[0]
    assert other_header != header
    assert _refusal(lambda: verify_token(f"{other_header}.{payload}.{sig}", "s")) == (
        "bad token signature"
    )


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        ({"sub": "alice"}, "malformed token: no exp claim"),
        ({"exp": NOW + 60}, "malformed token: no sub claim"),
        ({"sub": "has space", "exp": NOW + 60}, "malformed token"),
        ({"sub": "alice", "exp": "soon"}, "malformed token: exp is not a number"),
        ({"sub": "alice", "exp": NOW + 60, "iat": True}, "malformed token: iat is not a number"),
        # JSON as Python reads it: NaN compares false with everything (a token that never
        # expired, or whose lifetime was never bounded), and an int past a float's range.
        ({"sub": "alice", "exp": math.nan}, "malformed token: exp is not a finite number"),
        ({"sub": "alice", "exp": math.inf}, "malformed token: exp is not a finite number"),
        ({"sub": "alice", "exp": 10**400}, "malformed token: exp is not a finite number"),
        ({"sub": "a", "exp": NOW + 60, "iat": math.nan}, "malformed token: iat is not a finite"),
        ({"sub": "a", "exp": NOW + 60, "nbf": math.nan}, "malformed token: nbf is not a finite"),
        ({"sub": "a", "exp": NOW + 60, "iat": -(10**400)}, "malformed token: iat is not a finite"),
    ],
)
def test_correctly_signed_tokens_of_the_wrong_shape(payload: dict[str, Any], reason: str) -> None:
    token = _hs256({"alg": "HS256", "typ": "JWT"}, payload, b"s")
    assert _refusal(lambda: verify_token(token, "s", now=NOW)).startswith(reason)


def test_unsigned_and_foreign_algorithms_are_refused() -> None:
    header = _b64(json.dumps({"alg": "none"}).encode())
    none = f"{header}.{_b64(json.dumps(_claims()).encode())}."
    assert _refusal(lambda: verify_token(none, "s")).startswith("token algorithm not accepted")
    hs512 = jwt.encode(_claims(), "s" * 64, algorithm="HS512")
    assert _refusal(lambda: verify_token(hs512, "s" * 64)) == (
        "token algorithm not accepted (this node accepts HS256)"
    )


def test_unknown_critical_header_extensions_are_refused() -> None:
    """RFC 7515 4.1.11 (PyJWT enforces it from 2.12; pyproject's floor is above)."""
    header = {"alg": "HS256", "crit": ["x-policy"], "x-policy": "ignored"}
    token = _hs256(header, {"sub": "alice", "exp": NOW + 60}, b"s")
    assert _refusal(lambda: verify_token(token, "s", now=NOW)) == "malformed token"


def test_lifetime_is_bounded() -> None:
    day = 86_400
    verifier = TokenVerifier.from_settings(TokenSettings(secret="s", max_lifetime=day))
    assert verifier.verify(issue_token("alice", "s", day, now=NOW), now=NOW).user == "alice"
    long = issue_token("alice", "s", day + 1, now=NOW)
    assert _refusal(lambda: verifier.verify(long, now=NOW)) == (
        "token lifetime exceeds the maximum of 86400 seconds"
    )
    # Without iat the time left counts: a token issued long ago is fine near its end.
    no_iat = jwt.encode({"sub": "alice", "exp": NOW + 2 * day}, "s" * 32, algorithm="HS256")
    strict = TokenVerifier.from_settings(TokenSettings(secret="s" * 32, max_lifetime=day))
    assert _refusal(lambda: strict.verify(no_iat, now=NOW)).startswith("token lifetime exceeds")
    assert strict.verify(no_iat, now=NOW + day + 1).user == "alice"
    # An iat in the future beyond the tolerated clock skew is refused.
    early = issue_token("alice", "s", 60, now=NOW + 600)
    assert _refusal(lambda: verifier.verify(early, now=NOW)) == "token issued in the future (iat)"
    assert verifier.verify(issue_token("alice", "s", 60, now=NOW + 30), now=NOW).user == "alice"
    assert TokenSettings(secret="s").max_lifetime == DEFAULT_MAX_LIFETIME == 7 * day


def test_issuer_and_audience() -> None:
    verifier = TokenVerifier.from_settings(
        TokenSettings(secret="s", issuer="https://idp", audience="coordinator")
    )
    good = issue_token("alice", "s", issuer="https://idp", audience="coordinator")
    assert verifier.user(good) == "alice"
    for token, reason in [
        (issue_token("alice", "s", issuer="https://evil", audience="coordinator"), "issuer"),
        (issue_token("alice", "s", issuer="https://idp", audience="billing"), "audience"),
    ]:
        assert _refusal(partial(verifier.user, token)) == f"wrong token {reason}"
    assert _refusal(lambda: verifier.user(issue_token("alice", "s", audience="coordinator"))) == (
        "malformed token: no iss claim"
    )
    # A token meant for an audience is refused by a node that names none.
    plain = TokenVerifier.from_settings(TokenSettings(secret="s"))
    assert _refusal(lambda: plain.user(good)) == "wrong token audience"


def test_refusals_never_quote_the_token_or_the_secret() -> None:
    secret = "correct-horse-battery-staple"
    token = issue_token("alice", secret, 1, now=NOW)
    for attempt in (
        lambda: verify_token(token, secret),
        lambda: verify_token(token, "other"),
        lambda: verify_token(token[:-3], secret),
    ):
        reason = _refusal(attempt)
        assert secret not in reason and token[:20] not in reason and token[-20:] not in reason


# -- RS256 / ES256 ---------------------------------------------------------------------
def _private_pem(key: rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def test_rs256_with_a_public_key_file(rsa_key: rsa.RSAPrivateKey, tmp_path: Path) -> None:
    pem = tmp_path / "idp.pem"
    pem.write_bytes(_pem(rsa_key))
    verifier = TokenVerifier.from_settings(
        TokenSettings(algorithm="RS256", public_key_file=str(pem))
    )
    pem.unlink()  # read once, at build
    token = jwt.encode(_claims(), rsa_key, algorithm="RS256", headers={"kid": "any"})
    assert verifier.user(token) == "alice"
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    forged = jwt.encode(_claims(), other, algorithm="RS256")
    assert _refusal(lambda: verifier.user(forged)) == "bad token signature"
    # An HS256 token is refused, whatever secret signed it.
    assert _refusal(lambda: verifier.user(issue_token("alice", "s"))) == (
        "token algorithm not accepted (this node accepts RS256)"
    )


def test_alg_confusion_hs256_signed_with_the_public_key(
    rsa_key: rsa.RSAPrivateKey, tmp_path: Path
) -> None:
    """The classic attack: the public key (which anyone may have) used as an HMAC secret."""
    pem = _pem(rsa_key)
    (tmp_path / "idp.pem").write_bytes(pem)
    jwks = {"keys": [{**json.loads(RSAAlgorithm.to_jwk(rsa_key.public_key())), "kid": "k1"}]}
    (tmp_path / "jwks.json").write_text(json.dumps(jwks))
    for settings in (
        TokenSettings(algorithm="RS256", public_key_file=str(tmp_path / "idp.pem")),
        TokenSettings(algorithm="RS256", jwks_file=str(tmp_path / "jwks.json")),
    ):
        verifier = TokenVerifier.from_settings(settings)
        for header in ({"alg": "HS256", "typ": "JWT"}, {"alg": "HS256", "kid": "k1"}):
            forged = _hs256(header, _claims(), pem)
            assert _refusal(partial(verifier.user, forged)).startswith(
                "token algorithm not accepted"
            )


def test_es256_with_a_public_key_file(tmp_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    (tmp_path / "es.pem").write_bytes(_pem(key))
    verifier = TokenVerifier.from_settings(
        TokenSettings(algorithm="ES256", public_key_file=str(tmp_path / "es.pem"))
    )
    assert verifier.user(jwt.encode(_claims("eve"), key, algorithm="ES256")) == "eve"


def test_rs256_with_a_jwks_file(rsa_key: rsa.RSAPrivateKey, tmp_path: Path) -> None:
    second = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    es = ec.generate_private_key(ec.SECP256R1())

    def jwk(key: Any, **extra: str) -> dict[str, Any]:
        algorithm = RSAAlgorithm if isinstance(key, rsa.RSAPublicKey) else ECAlgorithm
        return {**json.loads(algorithm.to_jwk(key)), **extra}

    path = tmp_path / "jwks.json"
    path.write_text(
        json.dumps(
            {
                "keys": [
                    jwk(rsa_key.public_key(), kid="2024", use="sig"),
                    jwk(second.public_key(), kid="2025", alg="RS256"),
                    jwk(es.public_key(), kid="ec"),  # another kind of key: skipped
                    jwk(second.public_key(), kid="enc", use="enc"),  # not for signatures
                ]
            }
        )
    )
    verifier = TokenVerifier.from_settings(TokenSettings(algorithm="RS256", jwks_file=str(path)))
    for key, kid in ((rsa_key, "2024"), (second, "2025")):
        token = jwt.encode(_claims(), key, algorithm="RS256", headers={"kid": kid})
        assert verifier.user(token) == "alice"
    crossed = jwt.encode(_claims(), second, algorithm="RS256", headers={"kid": "2024"})
    assert _refusal(lambda: verifier.user(crossed)) == "bad token signature"
    unknown = jwt.encode(_claims(), second, algorithm="RS256", headers={"kid": "enc"})
    assert _refusal(lambda: verifier.user(unknown)) == "token signed with an unknown key (kid)"
    no_kid = jwt.encode(_claims(), second, algorithm="RS256")
    assert _refusal(lambda: verifier.user(no_kid)).startswith("token names no key id (kid)")

    # A set with one key: tokens without a kid use it.
    path.write_text(json.dumps({"keys": [jwk(second.public_key(), kid="only")]}))
    single = TokenVerifier.from_settings(TokenSettings(algorithm="RS256", jwks_file=str(path)))
    assert single.user(no_kid) == "alice"


# -- configuration -----------------------------------------------------------------------
def test_settings_are_checked_without_io() -> None:
    for kwargs, message in [
        ({"algorithm": "none", "secret": "s"}, "token algorithm must be one of"),
        ({}, "the token secret must be a non-empty string"),
        ({"secret": ""}, "the token secret must be a non-empty string"),
        ({"algorithm": "RS256"}, "RS256 tokens need a public key file or a JWKS file"),
        (
            {"algorithm": "RS256", "public_key_file": "a", "jwks_file": "b"},
            "(one of them)",
        ),
        ({"secret": "s", "jwks_file": "b"}, "HS256 tokens are verified with the secret"),
        ({"secret": "s", "issuer": ""}, "token issuer must be a non-empty string"),
        ({"secret": "s", "max_lifetime": 0}, "token max lifetime must be > 0"),
    ]:
        with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
            TokenSettings(**kwargs)
    with pytest.raises(ConfigError):
        issue_token("alice", "")
    with pytest.raises(InvalidInput, match="invalid user id"):
        issue_token("has space", "s")
    with pytest.raises(InvalidInput, match="ttl"):
        issue_token("alice", "s", 0)


def test_key_files_that_cannot_serve_name_the_file(
    rsa_key: rsa.RSAPrivateKey, tmp_path: Path
) -> None:
    es_pem = _pem(ec.generate_private_key(ec.SECP256R1()))
    cases: list[tuple[str, str, bytes, str]] = [
        ("RS256", "missing.pem", b"", "cannot read token key file"),
        ("RS256", "garbage.pem", b"hello", "is not a PEM public key"),
        ("RS256", "private.pem", _private_pem(rsa_key), "holds a private key"),
        ("RS256", "ec.pem", es_pem, "is not an RSA public key"),
        ("ES256", "rsa.pem", _pem(rsa_key), "is not a P-256 EC public key"),
    ]
    for algorithm, name, data, message in cases:
        path = tmp_path / name
        if data:
            path.write_bytes(data)
        with pytest.raises(ConfigError, match=message) as info:
            TokenVerifier.from_settings(
                TokenSettings(algorithm=algorithm, public_key_file=str(path))
            )
        assert str(path) in str(info.value)

    public = json.loads(RSAAlgorithm.to_jwk(rsa_key.public_key()))
    private = json.loads(RSAAlgorithm.to_jwk(rsa_key))
    for name, content, message in [
        ("list.json", "[]", "is not a JSON object with 'keys'"),
        ("text.json", "{not json", "is not a JSON object with 'keys'"),
        ("empty.json", '{"keys": []}', "has no RS256 signing key"),
        ("private.json", json.dumps({"keys": [private]}), "holds private key material"),
        ("twins.json", json.dumps({"keys": [public, public]}), "keys need distinct kids"),
        ("bad.json", json.dumps({"keys": [{"kty": "RSA", "n": "x"}]}), "is not a valid key"),
    ]:
        path = tmp_path / name
        path.write_text(content)
        with pytest.raises(ConfigError, match=message) as info:
            TokenVerifier.from_settings(TokenSettings(algorithm="RS256", jwks_file=str(path)))
        assert str(path) in str(info.value)
