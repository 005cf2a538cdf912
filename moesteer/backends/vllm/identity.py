"""Who a vLLM request is: sequence ids unique across front ends, and the prefix-cache salt that
names the routing its KV blocks are computed under."""

from __future__ import annotations

import itertools
import secrets

from moesteer.backends.vllm.registry import Sequence
from moesteer.routing import ExpertValues, Policy, policy_fingerprint

# Sequence ids: a random 30-bit base per process above a 32-bit counter, unique among the front ends
# (engines, API server processes) that share one engine core's registry, not only within a process
SEQ_IDS = itertools.count(secrets.randbits(30) << 32)


def cache_salt(
    policy: Policy | None, seed: int, seq: Sequence, branch: int, seq_id: int, client: str | None = None
) -> str | None:
    """Names the routing a request's KV blocks are computed under (``None``: the model's own). A
    traced request shares no blocks, so that its trace holds every position's routing. A client's
    own ``cache_salt`` is kept in front: blocks are shared only within its salt and within one routing."""
    if seq.trace is not None:
        salt = f"moesteer:trace:{seq_id}:{branch}"
    elif policy is None:
        salt = None
    else:
        salt = f"moesteer:{policy_fingerprint(policy)}"
        if policy.stochastic:
            salt += f":seed={seed}:prompt={seq.prompt_key}:sample={seq.sample}:branch={branch}"
    if client is None:
        return salt
    return f"client:{len(client)}:{client}" + ("" if salt is None else f"|{salt}")


def holds_per_row_tensors(policy: Policy) -> bool:
    return any(v.dim() == 2 for step in policy.steps if isinstance(step, ExpertValues) for _, v in step.items())
