"""``steer(model, policy)``: run code you already have (``model.generate``) under a routing policy."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from moesteer.backends.hf.hook import BatchLayout, RouterHandle
from moesteer.routing import Policy
from moesteer.sampling import check_seed
from moesteer.trace import RoutingTrace


def _positions(args: tuple, kwargs: dict) -> Tensor:
    """Absolute positions ``[B, S]`` of this forward's tokens (real tokens only count, left pads don't)."""
    ids = kwargs.get("input_ids", args[0] if args else None)
    embeds = kwargs.get("inputs_embeds")
    batch, seq = (ids if ids is not None else embeds).shape[:2]
    device = (ids if ids is not None else embeds).device
    position_ids = kwargs.get("position_ids")
    if position_ids is not None:
        return position_ids.expand(batch, seq)
    mask = kwargs.get("attention_mask")
    if mask is not None and mask.dim() == 2:
        return (mask.long().cumsum(-1) - 1).clamp(min=0)[:, -seq:]
    cache_position = kwargs.get("cache_position")  # the tokens' positions, on the device (no host read)
    if cache_position is not None:
        return cache_position[-seq:].to(device).expand(batch, seq)
    return torch.arange(seq, device=device).expand(batch, seq)


def _as_policy(policy: object) -> Policy | None:
    if policy is None or isinstance(policy, Policy):
        return policy
    branches = getattr(policy, "branches", None)
    if callable(branches):
        routes = branches()
        if len(routes) == 1:
            return routes[0]
        raise ValueError(
            f"{policy} decodes with {len(routes)} branches, which plain model.generate cannot run; "
            "use lm = moesteer.load(model, tokenizer=...) and lm.generate(prompts, strategy=...)"
        )
    raise TypeError(f"steer() takes a routing policy from moesteer.routing (e.g. TopK(1)) or None, got {policy!r}")


@contextmanager
def steer(model: nn.Module, policy: Policy | None, *, seed: int = 0, trace: bool = False) -> Iterator[RouterHandle]:
    """Patch ``model``'s routers so that every forward inside the block routes under ``policy``.

    Row ``b`` of each forward is prompt ``b`` for the noise keys (seed, prompt, layer, position).
    The model is restored exactly on exit, also when the body raises or installing on a router
    fails; nesting on one model is an error. ``steer(model, None)`` is the no-op. Yields the
    handle; ``handle.trace`` holds the routing trace when ``trace=True``.

    Example:
        >>> with moesteer.steer(model, TopK(1)):
        ...     out = model.generate(**inputs, max_new_tokens=20)
    """
    check_seed(seed, "steer(seed)")
    policy = _as_policy(policy)
    handle = RouterHandle(model, trace=RoutingTrace() if trace else None)
    hooks = []
    try:
        handle.check(policy)

        def set_layout(module, args, kwargs):  # the layout lives for one forward of the model
            handle.layout = BatchLayout.uniform(policy, _positions(args, kwargs), seed)

        def clear_layout(module, args, kwargs, output):
            handle.layout = None

        hooks.append(model.register_forward_pre_hook(set_layout, with_kwargs=True))
        hooks.append(model.register_forward_hook(clear_layout, with_kwargs=True, always_call=True))
        yield handle
    finally:
        for hook in hooks:
            hook.remove()
        handle.remove()
