"""Why a dispatch in an agent worker failed, and the event that answers an action given up.

An action whose dispatch stalled or killed its worker ``max_dispatch_attempts`` times
(a poison action), or ran past ``agent_dispatch_timeout``, is not dispatched again: it is
answered with an ``error`` observation naming it and the reason, committed by the owner
like any agent event, so the loop goes on with the next action (``remoteagent.py``).

The failures are counted in Redis with the inbox (``scripts/attempts.py``,
``state/attempts.py``), so the count follows the action from node to node. What is
counted is what the node saw happen to a worker while the dispatch ran there (stalled,
died, out of memory), not every dispatch started: a dispatch cut short by a failover, a
lease lapse or a drain is no sign against the action, and counting those turned
acknowledged actions into errors when Redis failed over twice (the Sentinel failover
test, with a count made before each dispatch). What that gives up: an action that kills
its whole node is not counted; with agents in worker processes it would have to get the
node killed from outside (workers are the kernel's first choice when memory runs out).
"""

from __future__ import annotations

from workers.channel import MEMORY
from workers.protocol import AgentState, Event

from .codec import agent_event, state_changed
from .errors import AgentFailed

# Reasons, as the error observation's ``extras.reason`` gives them.
RAISED = "agent error"  # the agent raised (``runner.py``), on this dispatch alone
STALLED = "stalled"
DIED = "worker died"
TIMEOUT = "timeout"
OUT_OF_MEMORY = MEMORY  # "memory"

_WHAT = {
    STALLED: "it stalled its agent's worker process",
    DIED: "its agent's worker process died",
    OUT_OF_MEMORY: "its agent ran out of memory",
}


def error_observation(
    action_id: int, reason: str, tries: int, timeout: float, detail: str = ""
) -> Event:
    """The event that answers action ``action_id``, given up after ``tries`` dispatches
    for ``reason`` (OpenHands' observation shape); ``detail``: what the agent raised."""
    if reason == RAISED:
        content = f"Action {action_id} failed: the agent raised {detail or 'an error'}."
    elif reason == TIMEOUT:
        content = f"Action {action_id} was not completed: it ran longer than {timeout:g} s."
    else:
        content = (
            f"Action {action_id} was not processed: {_WHAT.get(reason, reason)}; "
            f"given up after {tries} attempt(s)."
        )
    return {
        "observation": "error",
        "content": content,
        "extras": {"action_id": action_id, "reason": reason},
        "source": "environment",
    }


def agent_failure(n: int, exc: Exception) -> list[Event]:
    """What answers action ``n`` when its agent raised ``exc``: an ``error``
    observation, the agent state ``error``, then back to awaiting input."""
    what = exc.what if isinstance(exc, AgentFailed) else type(exc).__name__
    error = agent_event(error_observation(n, RAISED, 1, 0.0, what))
    return [
        error,
        state_changed(AgentState.ERROR, "", error["content"]),
        state_changed(AgentState.AWAITING_USER_INPUT),
    ]
