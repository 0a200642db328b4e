"""Secrets on the command line (``cli.py``): the ``--secret-file`` read, and warnings
for secrets given where every user of the machine sees them."""

from __future__ import annotations

import argparse

from .errors import ConfigError
from .redact import redact_url


def read_secret_file(args: argparse.Namespace) -> None:
    """``--secret-file``: the secret is the file's first line (trailing whitespace off);
    ConfigError (exit code 2) when it cannot be read or the secret is given twice."""
    path = getattr(args, "secret_file", None)
    if not path:
        return
    if "secret" in getattr(args, "on_command_line", ()):
        raise ConfigError("give the secret once: --secret or --secret-file, not both")
    try:
        with open(path, encoding="utf-8") as f:
            secret = f.readline().rstrip("\r\n")
    except OSError as exc:
        raise ConfigError(f"cannot read --secret-file {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"--secret-file {path} is not UTF-8 text") from None
    if not secret.strip():
        raise ConfigError(f"--secret-file {path} is empty")
    args.secret = secret


def read_previous_secrets(path: str | None) -> tuple[str, ...]:
    """``--previous-secret-file``: every non-blank line a secret (trailing whitespace
    off); ConfigError (exit code 2) when it cannot be read or holds none."""
    if not path:
        return ()
    try:
        with open(path, encoding="utf-8") as f:
            secrets = tuple(line.rstrip("\r\n") for line in f if line.strip())
    except OSError as exc:
        raise ConfigError(
            f"cannot read --previous-secret-file {path}: {exc.strerror or exc}"
        ) from None
    except UnicodeDecodeError:
        raise ConfigError(f"--previous-secret-file {path} is not UTF-8 text") from None
    if not secrets:
        raise ConfigError(f"--previous-secret-file {path} holds no secret")
    return secrets


def visible_secrets(args: argparse.Namespace) -> list[str]:
    """Secrets on the command line are visible to every user of the machine (``ps``,
    /proc/PID/cmdline): what to say about each, and how to pass it instead."""
    given = getattr(args, "on_command_line", ())
    said = []
    if "secret" in given:
        said.append(
            "--secret on the command line is visible to other users (ps); "
            "use --secret-file or COORDINATOR_SECRET"
        )
    for name, variable in (
        ("redis_url", "COORDINATOR_REDIS_URL"),
        ("event_store", "COORDINATOR_EVENT_STORE"),
    ):
        url = getattr(args, name, None)
        if name in given and url and redact_url(url) != url:
            flag = "--" + name.replace("_", "-")
            said.append(
                f"{flag} carries a password, visible to other users (ps); set {variable} instead"
            )
    return said
