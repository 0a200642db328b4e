"""The ``coordinator`` command line: its parser and environment fallbacks (the tables of
``serve``'s configuration flags are in cliflags.py).

Every ``serve`` flag falls back to an environment variable ``COORDINATOR_<NAME>``
(``--redis-url`` -> ``COORDINATOR_REDIS_URL``); ``coordinator/cli.py`` runs the commands.
"""

from __future__ import annotations

import argparse
import os
import re
from typing import Any, NoReturn

from .auth import ALGORITHMS, DEFAULT_MAX_LIFETIME, DEFAULT_TTL
from .cliflags import CONFIG_FLAGS, SERVER_FLAGS, number, switch
from .config import DEFAULT_AGENT, ENV_PREFIX
from .logformat import FORMATS
from .redact import redact

LOG_LEVELS = ("critical", "error", "warning", "info", "debug")
# Variables whose value is a credential: help says that they are set, never what to.
SECRET_VARIABLES = frozenset({ENV_PREFIX + "SECRET", ENV_PREFIX + "TOKEN"})


def _flag_name(flag: str) -> str:
    """``--redis-url`` -> ``redis_url``: the flag's environment variable, less the prefix."""
    return flag[2:].replace("-", "_")


class FromEnvironment:
    """A flag's default taken from its environment variable. argparse would convert a
    string default with the flag's type but never check it against the flag's choices,
    and its help would print it whole, a secret included: the parser (``_Parser``)
    converts and checks it as a flag's value, and help shows it redacted."""

    def __init__(self, variable: str, value: str) -> None:
        self.variable = variable
        self.value = value

    @property
    def shown(self) -> str:
        """The value as help and errors may show it: credentials left out (a URL's
        password, a token), a secret variable's value not at all."""
        return "set" if self.variable in SECRET_VARIABLES else redact(self.value)

    def __str__(self) -> str:
        return f"{self.shown}, from ${self.variable}"


def _env(name: str, default: Any = None) -> Any:
    variable = ENV_PREFIX + name.upper()
    value = os.environ.get(variable)
    return default if value is None else FromEnvironment(variable, value)


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser that converts and checks the defaults taken from the environment
    (``FromEnvironment``) as it does a flag's value, once the command line is parsed (a
    flag given overrides its variable, a wrong variable and all): an error names the
    variable (``error: COORDINATOR_LOG_LEVEL: invalid choice: ...``, exit code 2)."""

    def parse_known_args(  # type: ignore[override]
        self, args: Any = None, namespace: Any = None
    ) -> tuple[argparse.Namespace, list[str]]:
        parsed, extras = super().parse_known_args(args, namespace)
        for action in self._actions:
            value = getattr(parsed, action.dest, None)
            if isinstance(value, FromEnvironment):
                setattr(parsed, action.dest, self._converted(action, value))
        return parsed, extras

    def _converted(self, action: argparse.Action, given: FromEnvironment) -> Any:
        convert = action.type if callable(action.type) else str
        try:
            value = convert(given.value)
        except argparse.ArgumentTypeError as exc:
            self._refuse(given, str(exc))
        except (TypeError, ValueError):
            kind = getattr(convert, "__name__", "a")
            self._refuse(given, f"invalid {kind} value: {given.shown!r}")
        if action.choices is not None and value not in action.choices:
            choices = ", ".join(map(repr, action.choices))
            self._refuse(given, f"invalid choice: {value!r} (choose from {choices})")
        return value

    def _refuse(self, given: FromEnvironment, why: str) -> NoReturn:
        # As the CLI's own errors, without argparse's usage: the command line was right.
        self.exit(2, f"error: {given.variable}: {why}\n")


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if isinstance(action.default, FromEnvironment) and "(default" in text:
            # The help's own "(default: ...)" is the code's; the environment's wins.
            # Escaped for re.sub and for argparse, which %-formats help texts.
            shown = f"(default: {action.default})".replace("\\", "\\\\").replace("%", "%%")
            return _WRITTEN_DEFAULT.sub(shown, text, count=1)
        if "(default" in text or action.default in (None, argparse.SUPPRESS):
            return text
        return super()._get_help_string(action)


# A help text's own "(default: ...)", with one level of parentheses inside.
_WRITTEN_DEFAULT = re.compile(r"\(default[^()]*(?:\([^()]*\)[^()]*)*\)")


class _Given(argparse.Action):
    """Stores the value and notes that it was given on the command line, where every user
    of the machine can read it (``ps``): the CLI warns about secrets passed that way."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        setattr(namespace, self.dest, values)
        given = set(getattr(namespace, "on_command_line", ()))
        namespace.on_command_line = given | {self.dest}


def _secret_arg(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument(
        "--secret",
        action=_Given,
        default=_env("secret"),
        help=f"HS256 (HMAC) secret {what} (env COORDINATOR_SECRET; on the command line "
        "it is visible in `ps`: prefer --secret-file or the variable)",
    )
    parser.add_argument(
        "--secret-file",
        default=_env("secret_file"),
        metavar="FILE",
        help="read the secret from FILE (its first line), e.g. a Docker or Kubernetes "
        "secret (env COORDINATOR_SECRET_FILE)",
    )


def _claim_args(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument(
        "--token-issuer",
        default=_env("token_issuer"),
        metavar="ISS",
        help=f"{what} 'iss' claim (env COORDINATOR_TOKEN_ISSUER)",
    )
    parser.add_argument(
        "--token-audience",
        default=_env("token_audience"),
        metavar="AUD",
        help=f"{what} 'aud' claim (env COORDINATOR_TOKEN_AUDIENCE)",
    )


def _token_args(serve: argparse.ArgumentParser) -> None:
    """How ``serve`` verifies client tokens (JWTs; see coordinator/auth.py)."""
    serve.add_argument(
        "--token-algorithm",
        default=_env("token_algorithm", "HS256"),
        type=str.upper,
        choices=ALGORITHMS,
        help="JWT algorithm: HS256 with --secret, or RS256/ES256 with "
        "--token-public-key or --token-jwks (env COORDINATOR_TOKEN_ALGORITHM)",
    )
    serve.add_argument(
        "--previous-secret-file",
        default=_env("previous_secret_file"),
        metavar="FILE",
        help="HS256 secrets being rotated out, one per line: tokens signed with any of them "
        "are still accepted, none signs (a rotation: give every node the new --secret and "
        "the old one here, issue tokens with the new one, drop this once the old tokens "
        "expired) (env COORDINATOR_PREVIOUS_SECRET_FILE)",
    )
    serve.add_argument(
        "--token-public-key",
        default=_env("token_public_key"),
        metavar="FILE",
        help="PEM public key that verifies RS256/ES256 tokens (env COORDINATOR_TOKEN_PUBLIC_KEY)",
    )
    serve.add_argument(
        "--token-jwks",
        default=_env("token_jwks"),
        metavar="FILE",
        help="local JWKS file (JSON Web Key Set) whose keys verify RS256/ES256 tokens, "
        "chosen by the token's kid; read once at start (env COORDINATOR_TOKEN_JWKS)",
    )
    _claim_args(serve, "refuse tokens without this")
    serve.add_argument(
        "--token-max-lifetime",
        type=number,
        default=_env("token_max_lifetime", DEFAULT_MAX_LIFETIME),
        metavar="SECONDS",
        help="refuse tokens living longer (exp - iat, or exp - now without iat) "
        "(env COORDINATOR_TOKEN_MAX_LIFETIME)",
    )


def _name_environment(parser: argparse.ArgumentParser) -> None:
    """Say in each flag's help which environment variable it falls back to."""
    for action in parser._actions:
        flags = [f for f in action.option_strings if f.startswith("--") and f != "--help"]
        if flags and ENV_PREFIX not in (action.help or ""):
            name = ENV_PREFIX + _flag_name(flags[0]).upper()
            action.help = f"{action.help} (env {name})" if action.help else f"env {name}"


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="coordinator",
        description=(
            "Redis-backed distributed conversation coordinator: run nodes that share one "
            "Redis, so a socket.io client may connect to any node."
        ),
        epilog=(
            "quick start:\n"
            "  coordinator cluster                 # 3 local nodes + a private Redis\n"
            "  coordinator chat --url http://127.0.0.1:8000 --conversation demo1 "
            "--secret-file FILE\n"
            "                                      # the command 'cluster' prints, its FILE"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    serve = sub.add_parser(
        "serve",
        help="run one node (socket.io + REST + /healthz + /metrics)",
        description=(
            "Run one coordinator node. Without --redis-url it starts a private embedded "
            "Redis (fine for trying it out; a cluster needs a shared Redis URL). Every flag "
            "falls back to the environment variable COORDINATOR_<FLAG>, e.g. "
            "COORDINATOR_REDIS_URL. SIGINT/SIGTERM stop it gracefully."
        ),
        formatter_class=_Formatter,
    )
    serve.add_argument("--host", default=_env("host", "127.0.0.1"), help="address to listen on")
    serve.add_argument("--port", type=int, default=_env("port", 8000), help="port to listen on")
    serve.add_argument(
        "--public-url",
        default=_env("public_url"),
        metavar="URL",
        help="where clients reach this node, advertised in Redis so the browser pages "
        "can move to another node (GET /api/nodes) (default: http://HOST:PORT)",
    )
    serve.add_argument(
        "--redis-url",
        action=_Given,
        default=_env("redis_url"),
        help="shared Redis, e.g. redis://host:6379/0; a Redis Cluster's seeds "
        "redis://h1:7000,h2:7000/0; Sentinel redis+sentinel://h1:26379,h2:26379/MASTER "
        "(default: start a private embedded one)",
    )
    for dest, (flag, kind, help_text) in (CONFIG_FLAGS | SERVER_FLAGS).items():
        default = _env(_flag_name(flag))
        # A store URL may carry a password too: noted, for the warning.
        action = _Given if dest == "event_store" else "store"
        serve.add_argument(
            flag, dest=dest, type=kind, default=default, help=help_text, action=action
        )
    serve.add_argument(
        "--agent",
        default=_env("agent", DEFAULT_AGENT),
        help="agent class as package.module:Class, importable by this Python (PYTHONPATH or "
        "an installed package)",
    )
    _secret_arg(serve, "that signs client tokens (required with HS256)")
    _token_args(serve)
    serve.add_argument(
        "--log-level",
        default=_env("log_level", "info"),
        type=str.lower,
        choices=LOG_LEVELS,
        help="log level",
    )
    serve.add_argument(
        "--log-format",
        default=_env("log_format", "text"),
        type=str.lower,
        choices=FORMATS,
        help="the log on stderr: text, or json (one object per line: time, level, logger, "
        "node, message, exc) for log collectors",
    )
    check = serve.add_argument(
        "--check",
        action="store_true",
        default=_env("check", False),
        help="do not serve: check what this node needs to start (tokens, Redis and its "
        "memory policy, the scripts, the event store, the node id, the agent class, the "
        "port), print one line per check and exit (0: none failed, 1: one did). Nothing "
        "is written to Redis and no port is held (default: off)",
    )
    check.type = switch  # its variable: on/off (the flag itself takes no value)
    _name_environment(serve)

    cluster = sub.add_parser(
        "cluster",
        help="run a local demo cluster: a private Redis and N serve processes",
        description=(
            "Start a private embedded Redis and N `coordinator serve` processes on "
            "consecutive ports, wait until each is healthy, then print the URLs, a token for "
            "user 'demo' and how to chat. A node that dies stays down while the others "
            "carry on; type 'restart N' (or send SIGUSR1: every dead node) to start it "
            "again, 'status' to list them. Ctrl-C stops the nodes, then Redis. A secret is "
            "generated unless --secret or COORDINATOR_SECRET is given."
        ),
        formatter_class=_Formatter,
    )
    cluster.add_argument("--nodes", type=int, default=3, help="number of nodes")
    cluster.add_argument("--base-port", type=int, default=8000, help="port of the first node")
    cluster.add_argument("--host", default="127.0.0.1", help="address the nodes listen on")
    cluster.add_argument(
        "--agent",
        default=None,
        help=f"agent class as package.module:Class, importable here (default: {DEFAULT_AGENT})",
    )
    _secret_arg(cluster, "shared by the nodes (default: generated)")
    cluster.add_argument(
        "--log-level",
        default="warning",
        type=str.lower,
        choices=LOG_LEVELS,
        help="nodes' log level",
    )

    token = sub.add_parser(
        "token",
        help="print a signed token for a user",
        description=(
            "Print a JWT for USER (HS256, claims sub, iat, exp), signed with the secret the "
            "nodes use. Nodes refuse tokens living longer than their --token-max-lifetime "
            f"(default {DEFAULT_MAX_LIFETIME:.0f} s, 7 days)."
        ),
        formatter_class=_Formatter,
    )
    token.add_argument("user", metavar="USER", help="user id, e.g. alice or alice@example.com")
    token.add_argument("--ttl", type=number, default=DEFAULT_TTL, help="lifetime in seconds")
    token.add_argument(
        "--admin",
        action="store_true",
        help='add the claim "role": "admin": the token sees every user\'s loops and '
        "connections in /api/cluster and /api/node",
    )
    token.add_argument(
        "--org",
        metavar="ORG",
        help='add the claim "org": ORG: the user\'s loops count against the '
        "organisation's cap (--max-concurrent-conversations-per-org) too",
    )
    _secret_arg(token, "the nodes use (required)")
    _claim_args(token, "the")

    chat = sub.add_parser(
        "chat",
        help="chat in a conversation from the terminal",
        description=(
            "Connect to a node over socket.io, join a conversation (created when new), print "
            "every event as '[id] source: content' and send each line of stdin as a message. "
            "Works with piped input: after end of input it waits for the last answer. When "
            "the node dies or drains, it reconnects to another (--url, or the nodes it "
            "learnt from GET /api/nodes) from the last event it printed. "
            "Connect a second terminal to another node with the same --conversation to see "
            "location transparency."
        ),
        formatter_class=_Formatter,
    )
    chat.add_argument(
        "--url",
        required=True,
        action="append",
        help="node URL, e.g. http://127.0.0.1:8000, or a load balancer's; give --url again "
        "for more nodes to reconnect to (the live nodes' URLs are learnt as well)",
    )
    chat.add_argument("--conversation", required=True, help="conversation id ([A-Za-z0-9_-])")
    chat.add_argument("--user", default="demo", help="user to issue a token for (with --secret)")
    chat.add_argument("--token", default=_env("token"), help="token (env COORDINATOR_TOKEN)")
    _secret_arg(chat, "to issue a token for --user when no --token is given")
    chat.add_argument(
        "--latest-event-id",
        type=int,
        default=-1,
        help="id of the last event already seen (-1: replay the whole conversation)",
    )
    chat.add_argument(
        "--wait", type=number, default=10.0, help="seconds to wait for the last answer after EOF"
    )
    chat.add_argument(
        "--reconnect-for",
        type=number,
        default=60.0,
        metavar="SECONDS",
        help="when the node goes away, keep trying the other nodes this long",
    )
    chat.add_argument(
        "--settings",
        metavar="JSON",
        help="agent settings (a JSON object, e.g. '{\"replies\": 2}'), used if this "
        "connection starts the conversation's loop",
    )
    return parser
