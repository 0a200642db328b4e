"""Load an agent class from an import path such as ``workers.echo:EchoAgent``."""

from __future__ import annotations

import importlib
import inspect

from .protocol import AgentContext, AgentFactory


class AgentLoadError(ValueError):
    """The import path does not name a usable agent class."""


def load_agent(path: str) -> AgentFactory:
    """Return the class named by ``package.module:Class``, checked against AgentLoop."""
    if not isinstance(path, str) or path.count(":") != 1:
        raise AgentLoadError(f"agent must be given as 'package.module:Class', got {path!r}")
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise AgentLoadError(f"agent must be given as 'package.module:Class', got {path!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise AgentLoadError(f"cannot import agent module {module_name!r}: {exc}") from exc
    except KeyboardInterrupt:
        raise  # Ctrl-C while it imports: the user's, not the module's
    except BaseException as exc:  # its own code failed: a raise, sys.exit(), at import
        raise AgentLoadError(
            f"agent module {module_name!r} failed on import: {type(exc).__name__}: {exc}"
        ) from None
    target = module
    for part in attr.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise AgentLoadError(f"module {module_name!r} has no attribute {attr!r}") from None
    if not inspect.isclass(target):
        raise AgentLoadError(f"{path!r} is not a class")
    missing = [
        name
        for name in ("start", "dispatch", "aclose", "state", "speculative")
        if not hasattr(target, name)
    ]
    if missing:
        raise AgentLoadError(f"{path!r} is not an AgentLoop: missing {', '.join(missing)}")
    if not isinstance(target.speculative, bool):
        raise AgentLoadError(f"{path!r}: 'speculative' must be True or False")
    try:  # refused now, not at the first join: the node makes one per loop this way
        inspect.signature(target).bind(AgentContext("check", None))
    except TypeError as exc:
        raise AgentLoadError(
            f"{path!r} cannot be constructed with one argument, the AgentContext "
            f"({exc}); its __init__ must be (self, context)"
        ) from None
    except ValueError:
        pass  # no signature to check (a class implemented in C)
    factory: AgentFactory = target
    return factory
