"""Prefill/decode disaggregation: what ``kv_role`` changes, and the hand-off between the engines.

- ``kv_both`` (default): an ordinary cache, saves and loads.
- ``kv_producer`` (a prefill engine): saves every prompt, never looks up or loads. A request
  keeps its blocks until its chunks are durable in the store (every tier written, the shared one
  included): ``request_finished`` returns True and ``get_finished`` reports it in
  ``finished_sending`` once the save queue has written them. The last partial chunk is saved at
  token granularity (``SaveOp.tokens``), so a consumer with the same prompt computes one token.
  Its output carries ``kv_transfer_params = {"kvlayer_pd": {"tokens": n}}``: n prompt tokens
  saved (or being saved).
- ``kv_consumer`` (a decode engine): loads, never saves. A request whose ``kv_transfer_params``
  carry ``kvlayer_pd`` (the proxy copies them from the prefill answer) waits up to ``pd_wait_s``
  for those tokens to appear in the store, since vLLM answers the prefill request before the
  producer's save lands, then loads what is there (asynchronously for tiers outside the process)
  and computes the rest: a miss (evicted, producer died) recomputes. A consumer never declines a
  hit on its load-or-recompute estimate: the point of disaggregation is to keep prefills off the
  decode engine, so recomputing there costs the other requests' inter-token latency, which the
  estimate does not count.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from kvlayer.errors import ConfigError

from .stats import SchedulerCounters

Role = Literal["kv_both", "kv_producer", "kv_consumer"]
ROLES: tuple[Role, ...] = ("kv_both", "kv_producer", "kv_consumer")
#: the key of kvlayer's hand-off in vLLM's ``kv_transfer_params``
PD_PARAM = "kvlayer_pd"


def parse_role(value: Any) -> Role:
    role = str(value or "kv_both")
    if role not in ROLES:
        raise ConfigError(f"kvlayer's vLLM connector supports kv_role {', '.join(ROLES)}; got {role!r}")
    return role  # type: ignore[return-value]


def handoff_params(tokens: int) -> dict[str, Any]:
    """What a producer's output carries: ``tokens`` prompt tokens are saved (or being saved)."""
    return {PD_PARAM: {"tokens": int(tokens)}}


def handoff_tokens(request: Any) -> int:
    """Prompt tokens a producer said it saved for this request (0: no hand-off)."""
    params = getattr(request, "kv_transfer_params", None)
    if not isinstance(params, dict):
        return 0
    pd = params.get(PD_PARAM)
    if not isinstance(pd, dict):
        return 0
    try:
        return max(0, int(pd.get("tokens", 0)))
    except (TypeError, ValueError):
        return 0


@dataclass
class RoleCounters(SchedulerCounters):
    """The scheduler's counters plus the hand-off's."""

    handoffs: int = 0  # requests that arrived with a producer's hand-off (consumer)
    handoff_waits: int = 0  # of those, requests that had to wait for the producer's save to land
    handoff_timeouts: int = 0  # hand-offs not complete after pd_wait_s: the missing tokens were computed
    handed_off: int = 0  # requests whose prompt a producer saved and announced (producer)
