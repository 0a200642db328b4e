"""Bearer tokens as standard JWTs (PyJWT): the user id in ``sub``, ``exp`` required.

By default tokens are HS256, signed with the secret the nodes share (``issue_token``, or
any JWT library). RS256 or ES256 tokens from an identity provider are verified against a
public key (PEM) or a JWKS file instead; the nodes then hold no signing key at all. A
token may live at most ``max_lifetime`` (``exp - iat``, or ``exp - now`` without ``iat``),
and ``iss``/``aud`` are checked when configured.

``TokenSettings`` is configuration without I/O; ``TokenVerifier.from_settings`` reads and
parses the key file once (``keyfiles``). PyJWT checks the signature, the algorithm (only
the configured one is accepted: no algorithm confusion), the token's shape, ``iss``,
``aud`` and the required claims; the times are checked here, against a clock tests can
set. Refusals say what is wrong and never quote the token or a key.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import math
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import jwt

from .errors import ConfigError, InvalidInput
from .inputs import check_user_id
from .keyfiles import read_jwks, read_pem

ALGORITHMS = ("HS256", "RS256", "ES256")
DEFAULT_TTL = 86_400
ADMIN_ROLE = "admin"
DEFAULT_MAX_LIFETIME = 7 * 86_400
MAX_TOKEN_CHARS = 8192
VERIFIED_KEPT = 10_000  # verified tokens remembered (see TokenVerifier)
# How far an ``iat`` or ``nbf`` may lie in the future: the issuer's clock may run ahead.
CLOCK_SKEW = 60.0
# RFC 7518 section 3.2: an HS256 key should have at least 256 bits.
MIN_SECRET_BYTES = 32

# PyJWT (2.10 on) warns on every use of an HMAC key under 32 bytes; the node warns once
# at start-up instead (cli), and short secrets keep working as they did.
_SHORT_KEY_WARNING = getattr(jwt, "InsecureKeyLengthWarning", None)


class AuthError(InvalidInput):
    """A token is missing, malformed, wrongly signed, expired or not meant for us."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Identity:
    """Who a verified token speaks for: ``user`` (its ``sub``); ``org``, the organisation
    of its ``org`` claim ('' if none; checked like a user id), whose cap its loops count
    against too; ``admin``, whether it grants the cluster-wide views: a ``role`` of
    ``admin`` (what ``coordinator token --admin`` issues) or an ``admin`` claim that is
    ``true`` (as some identity providers spell it); ``expires``, the token's ``exp``
    (Unix time): a socket.io connection ends then (``handlers.SocketHandlers``);
    ``issued``, its ``iat`` (None without one): a revocation of the user refuses the
    tokens issued before it (``revocations.py``)."""

    user: str
    org: str = ""
    admin: bool = False
    expires: float = math.inf
    issued: float | None = None


class _Verified(NamedTuple):
    """A token whose signature and claims checked out: who it speaks for (its ``exp``
    too), and the other times every later use checks again (``iat``/``nbf`` where it
    has them)."""

    identity: Identity
    iat: float | None
    nbf: float | None


@dataclass(frozen=True)
class TokenSettings:
    """How a node verifies tokens; checked on creation, no I/O."""

    algorithm: str = "HS256"
    secret: str | None = field(default=None, repr=False)  # HS256 only; never in a repr
    public_key_file: str | None = None  # RS256/ES256: a PEM public key ...
    jwks_file: str | None = None  # ... or a JSON Web Key Set, one of the two
    issuer: str | None = None
    audience: str | None = None
    max_lifetime: float = DEFAULT_MAX_LIFETIME
    # HS256: secrets being rotated out. Tokens signed with one are still accepted; none
    # signs anything. Never in a repr.
    previous_secrets: tuple[str, ...] = field(default=(), repr=False)

    def __post_init__(self) -> None:
        if self.algorithm not in ALGORITHMS:
            raise ConfigError(
                f"token algorithm must be one of {', '.join(ALGORITHMS)}, got {self.algorithm!r}"
            )
        files = [f for f in (self.public_key_file, self.jwks_file) if f]
        if self.algorithm == "HS256":
            _check_secret(self.secret)
            for previous in self.previous_secrets:
                _check_secret(previous)
            if files:
                raise ConfigError("HS256 tokens are verified with the secret, not a key file")
        elif self.previous_secrets:
            raise ConfigError("previous secrets are HS256's; other algorithms rotate keys by kid")
        elif len(files) != 1:
            raise ConfigError(
                f"{self.algorithm} tokens need a public key file or a JWKS file (one of them)"
            )
        for name in ("issuer", "audience"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ConfigError(f"token {name} must be a non-empty string, got {value!r}")
        lifetime = self.max_lifetime
        if isinstance(lifetime, bool) or not isinstance(lifetime, int | float) or lifetime <= 0:
            raise ConfigError(f"token max lifetime must be > 0 seconds, got {lifetime!r}")


class TokenVerifier:
    """Verifies bearer tokens for one node; build it with ``from_settings``."""

    def __init__(self, settings: TokenSettings, keys: dict[str | None, Any]) -> None:
        self.settings = settings
        self._keys = keys  # kid -> key; the key None is used whatever the token's kid
        self._short_secret = short_secret(settings)
        # Whether a verified token's user revoked it since (``revocations.Revocations``).
        self.revoked: Callable[[Identity], bool] = _never
        # Tokens whose signature and claims checked out (their times are checked again on
        # every use): a client reconnecting, or a REST caller, presents the same token
        # again, and a signature check costs ~70 us. By the token's SHA-256 (not the token
        # itself, nor its claims: a few hundred bytes less per remembered token, and the
        # node holds one for about every connection). Bounded, oldest dropped first.
        self._verified: OrderedDict[bytes, _Verified] = OrderedDict()

    @classmethod
    def from_settings(cls, settings: TokenSettings) -> TokenVerifier:
        """A verifier; reads the key file once (ConfigError naming it if unusable)."""
        if settings.algorithm == "HS256":
            assert settings.secret is not None  # TokenSettings checked it
            return cls(settings, {None: settings.secret})
        if settings.public_key_file:
            return cls(settings, {None: read_pem(settings.public_key_file, settings.algorithm)})
        assert settings.jwks_file is not None
        return cls(settings, read_jwks(settings.jwks_file, settings.algorithm))

    def user(self, token: object) -> str:
        """The user id of a valid token; raises AuthError saying what is wrong."""
        return self.verify(token).user

    def verify(self, token: object, *, now: float | None = None) -> Identity:
        """The identity of a valid token; raises AuthError saying what is wrong."""
        if token is None or token == "":
            raise AuthError("missing token")
        if not isinstance(token, str) or len(token) > MAX_TOKEN_CHARS or not token.isascii():
            raise AuthError("malformed token")  # a JWT is base64url parts and dots
        now = time.time() if now is None else now
        digest = hashlib.sha256(token.encode()).digest()
        known = self._verified.get(digest)
        if known is None:
            known = self._verify_new(token)
            self._check_times(known, now)
            self._verified[digest] = known
            if len(self._verified) > VERIFIED_KEPT:
                self._verified.popitem(last=False)
        else:
            self._check_times(known, now)
        if self.revoked(known.identity):
            raise AuthError("token revoked")
        return known.identity

    def _verify_new(self, token: str) -> _Verified:
        try:
            try:
                claims = self._decode(token, self._key_for(token))
            except jwt.InvalidSignatureError:
                claims = self._decode_previous(token)
        except jwt.PyJWTError as exc:
            raise AuthError(self._reason(exc)) from None
        user = claims["sub"]
        try:
            check_user_id(user)
        except InvalidInput:
            raise AuthError("malformed token: sub is not a valid user id") from None
        org = claims.get("org")
        if org is not None:
            try:
                check_user_id(org)
            except InvalidInput:
                raise AuthError("malformed token: org is not a valid organisation id") from None
        exp, iat, nbf = (_numeric(claims, name) for name in ("exp", "iat", "nbf"))
        assert exp is not None  # required
        # One claim makes an admin: an identity provider may let users set others.
        admin = claims.get("role") == ADMIN_ROLE
        return _Verified(Identity(user, org or "", admin, exp, iat), iat, nbf)

    def _decode(self, token: str, key: Any) -> dict[str, Any]:
        s = self.settings
        with _quiet_if(self._short_secret):
            claims: dict[str, Any] = jwt.decode(
                token,
                key,
                algorithms=[s.algorithm],
                audience=s.audience,
                issuer=s.issuer,
                options={
                    "require": ["exp", "sub"],
                    "verify_exp": False,
                    "verify_iat": False,
                    "verify_nbf": False,
                },
            )
        return claims

    def _decode_previous(self, token: str) -> dict[str, Any]:
        """A token the current secret does not verify, signed with a secret being rotated
        out (``previous_secrets``); InvalidSignatureError when none verifies it either."""
        for secret in self.settings.previous_secrets:
            with contextlib.suppress(jwt.InvalidSignatureError):
                return self._decode(token, secret)
        raise jwt.InvalidSignatureError("Signature verification failed")

    def _key_for(self, token: str) -> Any:
        if None in self._keys:
            return self._keys[None]
        kid = jwt.get_unverified_header(token).get("kid")
        if kid is not None and not isinstance(kid, str):
            raise AuthError("malformed token")
        if kid is None and len(self._keys) > 1:
            raise AuthError("token names no key id (kid) and the key set has several keys")
        key = self._keys.get(kid) if kid is not None else next(iter(self._keys.values()))
        if key is None:
            raise AuthError("token signed with an unknown key (kid)")
        return key

    def _check_times(self, token: _Verified, now: float) -> None:
        exp, iat, nbf = token.identity.expires, token.iat, token.nbf
        if now >= exp:
            raise AuthError("token expired")
        if nbf is not None and nbf > now + CLOCK_SKEW:
            raise AuthError("token not valid yet (nbf)")
        if iat is not None and iat > now + CLOCK_SKEW:
            raise AuthError("token issued in the future (iat)")
        limit = self.settings.max_lifetime
        if exp - (now if iat is None else iat) > limit:
            raise AuthError(f"token lifetime exceeds the maximum of {limit:.10g} seconds")

    def _reason(self, exc: jwt.PyJWTError) -> str:
        if isinstance(exc, jwt.InvalidSignatureError | jwt.InvalidKeyError):
            return "bad token signature"
        if isinstance(exc, jwt.InvalidAlgorithmError):
            return f"token algorithm not accepted (this node accepts {self.settings.algorithm})"
        if isinstance(exc, jwt.InvalidAudienceError):
            return "wrong token audience"
        if isinstance(exc, jwt.InvalidIssuerError):
            return "wrong token issuer"
        if isinstance(exc, jwt.MissingRequiredClaimError):
            return f"malformed token: no {exc.claim} claim"
        return "malformed token"


def as_verifier(auth: str | TokenVerifier) -> TokenVerifier:
    """``auth`` itself, or for a secret, an HS256 verifier with default settings."""
    if isinstance(auth, TokenVerifier):
        return auth
    return TokenVerifier.from_settings(TokenSettings(secret=auth))


def _never(who: Identity) -> bool:
    return False


def verify_token(token: object, secret: str, *, now: float | None = None) -> str:
    """The user an HS256 token signed with ``secret`` names (default settings)."""
    return as_verifier(secret).verify(token, now=now).user


def issue_token(
    user: str,
    secret: str,
    ttl_seconds: float = DEFAULT_TTL,
    *,
    now: float | None = None,
    issuer: str | None = None,
    audience: str | None = None,
    claims: Mapping[str, Any] | None = None,
) -> str:
    """An HS256 token for ``user`` that expires ``ttl_seconds`` from now.

    Its header's ``kid`` is the secret's RFC 7638 thumbprint: which secret signed a token
    is visible (and a spliced token fails), the secret is not. ``claims`` adds claims."""
    key = _check_secret(secret)
    check_user_id(user)
    if (
        isinstance(ttl_seconds, bool)
        or not isinstance(ttl_seconds, int | float)
        or not math.isfinite(ttl_seconds)  # nan passes "<= 0"; inf makes no exp
        or ttl_seconds <= 0
    ):
        raise InvalidInput(f"token ttl must be a positive number of seconds, got {ttl_seconds!r}")
    issued = int(time.time() if now is None else now)
    payload: dict[str, Any] = {**(claims or {}), "sub": user, "iat": issued}
    payload["exp"] = int(issued + ttl_seconds)
    if issuer is not None:
        payload["iss"] = issuer
    if audience is not None:
        payload["aud"] = audience
    with _quiet_if(len(key) < MIN_SECRET_BYTES):
        return jwt.encode(payload, secret, algorithm="HS256", headers={"kid": thumbprint(key)})


def thumbprint(key: bytes) -> str:
    """The RFC 7638 thumbprint of a symmetric key (SHA-256 of its canonical JWK)."""
    jwk = json.dumps({"k": _b64(key), "kty": "oct"}, separators=(",", ":"))
    return _b64(hashlib.sha256(jwk.encode()).digest())


def short_secret(settings: TokenSettings) -> bool:
    """Whether an HS256 secret is shorter than RFC 7518 asks (a warning, not an error)."""
    if settings.algorithm != "HS256" or settings.secret is None:
        return False
    secrets = (settings.secret, *settings.previous_secrets)
    return any(len(secret.encode()) < MIN_SECRET_BYTES for secret in secrets)


@contextlib.contextmanager
def _quiet_if(short_key: bool) -> Iterator[None]:
    """Without PyJWT's warning about a short HMAC key (the node warns once at start-up)."""
    if not short_key or _SHORT_KEY_WARNING is None:
        yield
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", _SHORT_KEY_WARNING)
        yield


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _check_secret(secret: object) -> bytes:
    if not isinstance(secret, str) or not secret:
        raise ConfigError("the token secret must be a non-empty string")
    try:
        return secret.encode()
    except UnicodeEncodeError:  # bytes that are not UTF-8, as os.environ keeps them
        raise ConfigError("the token secret must be UTF-8 text") from None


def _numeric(claims: Mapping[str, Any], name: str) -> float | None:
    value = claims.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise AuthError(f"malformed token: {name} is not a number")
    # JSON as Python reads it has NaN, which compares false with every bound (a token
    # that never expires), Infinity, and integers past a float's range.
    try:
        number = float(value)
    except OverflowError:
        number = math.inf
    if not math.isfinite(number):
        raise AuthError(f"malformed token: {name} is not a finite number")
    return number
