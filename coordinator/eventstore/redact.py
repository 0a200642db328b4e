"""Keeping passwords out of errors and logs: store URLs are shown redacted, and any text
from a driver is scrubbed of the URL's secrets before it is shown."""

from __future__ import annotations

from urllib.parse import parse_qsl, unquote, urlencode, urlsplit

HIDDEN = "***"
# Query parameters of a libpq-style URL that carry a secret.
SECRET_PARAMS = frozenset({"password", "sslpassword", "passfile"})


def _split_userinfo(netloc: str) -> tuple[str | None, str]:
    userinfo, at, hosts = netloc.rpartition("@")
    return (userinfo, hosts) if at else (None, netloc)


def redact_url(url: str) -> str:
    """``url`` with its password (in the user part or the query) replaced by ``***``."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable URL>"
    # The parts with a secret are replaced in the text as given: rebuilt from its parts,
    # a URL changes shape ("file:rel" came out as "file:///rel", "postgresql:///db" as
    # "postgresql:/db"), and an error quoting it would name another URL.
    shown = url
    userinfo, hosts = _split_userinfo(parts.netloc)
    if userinfo is not None and ":" in userinfo:
        netloc = f"{userinfo.partition(':')[0]}:{HIDDEN}@{hosts}"
        shown = shown.replace(f"//{parts.netloc}", f"//{netloc}", 1)
    if parts.query:
        pairs = parse_qsl(parts.query, keep_blank_values=True)
        if any(key.lower() in SECRET_PARAMS for key, _ in pairs):
            query = urlencode(
                [(k, HIDDEN if k.lower() in SECRET_PARAMS else v) for k, v in pairs], safe="*/:"
            )
            shown = shown.replace(f"?{parts.query}", f"?{query}", 1)
    return shown


def url_secrets(url: str) -> list[str]:
    """The secrets written in ``url``, as written and decoded (to scrub from text)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return []
    found: list[str] = []
    userinfo, _ = _split_userinfo(parts.netloc)
    if userinfo is not None and ":" in userinfo:
        found.append(userinfo.partition(":")[2])
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        if key.lower() in SECRET_PARAMS:
            found.append(value)
    out: set[str] = set()
    for secret in found:
        if secret:
            out.update((secret, unquote(secret)))
    return sorted(out, key=len, reverse=True)


def scrub(text: str, secrets: list[str]) -> str:
    """``text`` with every one of ``secrets`` replaced by ``***``."""
    for secret in secrets:
        text = text.replace(secret, HIDDEN)
    return text
