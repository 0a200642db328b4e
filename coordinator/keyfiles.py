"""A node's public keys for RS256/ES256 tokens, read once from a PEM or a JWKS file.

Each reader checks the key against the configured algorithm and refuses private key
material; errors name the file and what is wrong, never a key.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric.ec import SECP256R1, EllipticCurvePublicKey
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from .errors import ConfigError

_JWKS_KTY = {"RS256": ("RSA", None), "ES256": ("EC", "P-256")}


def _read(path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read token key file {path}: {exc.strerror or exc}") from None


def read_pem(path: str, algorithm: str) -> Any:
    """The public key in a PEM file, checked against the algorithm."""
    data = _read(path)
    if b"PRIVATE KEY" in data:
        raise ConfigError(f"token key file {path} holds a private key; give the public key")
    try:
        key = load_pem_public_key(data)
    except ValueError:
        raise ConfigError(f"token key file {path} is not a PEM public key") from None
    if algorithm == "RS256" and not isinstance(key, RSAPublicKey):
        raise ConfigError(f"token key file {path} is not an RSA public key (RS256 needs one)")
    if algorithm == "ES256" and not (
        isinstance(key, EllipticCurvePublicKey) and isinstance(key.curve, SECP256R1)
    ):
        raise ConfigError(f"token key file {path} is not a P-256 EC public key (ES256)")
    return key


def read_jwks(path: str, algorithm: str) -> dict[str | None, Any]:
    """kid -> key of the JWKS file's signing keys for the algorithm (at least one)."""
    try:
        keys = json.loads(_read(path))["keys"]
        if not isinstance(keys, list):
            raise TypeError
    except (ValueError, KeyError, TypeError):
        raise ConfigError(f"token JWKS file {path} is not a JSON object with 'keys'") from None
    kty, crv = _JWKS_KTY[algorithm]
    found: dict[str | None, Any] = {}
    for i, jwk in enumerate(keys):
        if (
            not isinstance(jwk, dict)
            or jwk.get("kty") != kty
            or jwk.get("crv", crv) != crv
            or jwk.get("use", "sig") != "sig"
            or jwk.get("alg", algorithm) != algorithm
        ):
            continue  # another kind of key: a key set may hold several
        kid = jwk.get("kid")
        where = f"key {i}" + (f" ({kid})" if kid is not None else "")
        if kid is not None and not isinstance(kid, str):
            raise ConfigError(f"token JWKS file {path}: {where}: kid must be a string")
        if "d" in jwk:
            raise ConfigError(f"token JWKS file {path}: {where} holds private key material")
        # A lone key without a kid verifies every token (it is kept under None); beside
        # others, each key needs a kid of its own.
        if kid in found or None in found or (kid is None and found):
            raise ConfigError(f"token JWKS file {path}: {where}: keys need distinct kids")
        try:
            found[kid] = jwt.PyJWK(jwk, algorithm).key
        except jwt.PyJWTError:
            raise ConfigError(f"token JWKS file {path}: {where} is not a valid key") from None
    if not found:
        raise ConfigError(f"token JWKS file {path} has no {algorithm} signing key")
    return found
