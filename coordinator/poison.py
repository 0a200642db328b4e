"""Why a dispatch in an agent worker failed, and the event that answers an action given up.

An action whose dispatch stalled or killed its worker ``max_dispatch_attempts`` times
(a poison action), or ran past ``agent_dispatch_timeout``, is not dispatched again: it is
answered with an ``error`` observation naming it and the reason, committed by the owner
like any agent event, so the loop goes on with the next action (``remoteagent.py``).
The count of an action's dispatches lives in Redis (``ATTEMPT``, in ``scripts.ALL``;
``state/attempts.py``), so it follows the action from node to node.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from workers.channel import MEMORY
from workers.protocol import Event

if TYPE_CHECKING:
    from .agentworker import AgentWorker

ATTEMPT = """
-- attempt: count one more dispatch of an action, before it starts (poison actions).
-- KEYS[1]  conversation attempts hash
-- ARGV[1]  action id   ARGV[2] time to live (ms)
-- ARGV[3]  the action counted before it by this loop ('': not known)
-- returns  {dispatches of the action so far, this one included; why the last failed, or ''}
-- A loop dispatches in order: another action's fields are of one processed (or given up)
-- since, and are dropped here (all of them when the previous one is not known), so the
-- hash holds one action.
local n = redis.call('HINCRBY', KEYS[1], ARGV[1], 1)
local why = redis.call('HGET', KEYS[1], ARGV[1] .. ':why') or ''
if ARGV[3] ~= '' then
  redis.call('HDEL', KEYS[1], ARGV[3], ARGV[3] .. ':why')
elseif redis.call('HLEN', KEYS[1]) > (why == '' and 1 or 2) then
  for _, f in ipairs(redis.call('HKEYS', KEYS[1])) do
    if f ~= ARGV[1] and f ~= ARGV[1] .. ':why' then redis.call('HDEL', KEYS[1], f) end
  end
end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return {n, why}
"""


# Reasons, as the error observation's ``extras.reason`` gives them.
STALLED = "stalled"
DIED = "worker died"
TIMEOUT = "timeout"
OUT_OF_MEMORY = MEMORY  # "memory"

_WHAT = {
    STALLED: "it stalled its agent's worker process",
    DIED: "its agent's worker process died",
    OUT_OF_MEMORY: "its agent ran out of memory",
}


class WorkerLost(Exception):
    """The worker holding an agent instance failed (``reason``); ``suspect``: a dispatch
    or start of this instance was running there and may be why."""

    def __init__(self, reason: str, suspect: bool, worker: AgentWorker) -> None:
        super().__init__(reason)
        self.reason = reason
        self.suspect = suspect
        self.worker = worker


def error_observation(action_id: int, reason: str, tries: int, timeout: float) -> Event:
    """The event that answers action ``action_id``, given up after ``tries`` dispatches
    for ``reason`` (OpenHands' observation shape)."""
    if reason == TIMEOUT:
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
