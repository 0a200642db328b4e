"""`coordinator serve --help` names the environment variable of every flag, and each one
is read (the README's table lists the same)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from coordinator.cliargs import build_parser

README = Path(__file__).resolve().parent.parent / "README.md"


def serve_parser() -> Any:
    # argparse has no public way to list a parser's subparsers and actions: _actions it is.
    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.dest == "command")
    return subparsers.choices["serve"]


def test_every_serve_flag_names_its_environment_variable(monkeypatch: Any) -> None:
    serve = serve_parser()
    flags = [a for a in serve._actions if any(f.startswith("--") for f in a.option_strings)]
    flags = [a for a in flags if a.dest != "help"]
    help_text = " ".join(serve.format_help().split())
    readme = README.read_text()
    for action in flags:
        flag = next(f for f in action.option_strings if f.startswith("--"))
        name = "COORDINATOR_" + flag[2:].replace("-", "_").upper()
        assert f"(env {name}" in help_text, name
        assert f"`{name}`" in readme, f"README's table lacks {name}"
    monkeypatch.setenv("COORDINATOR_PUBLIC_URL", "https://node.example.test")
    monkeypatch.setenv("COORDINATOR_LOG_LEVEL", "debug")
    args = build_parser().parse_args(["serve"])
    assert args.public_url == "https://node.example.test" and args.log_level == "debug"
    assert re.search(r"--public-url URL", serve.format_help())
