"""Routing traces over the API.

``"moesteer_trace": 1`` in a request's ``vllm_xargs`` returns branch 0's experts in each choice's
``routed_experts`` (vLLM's own field and form, :func:`routed_experts`), and keeps the full traces
(every branch, experts and weights) for ``GET /v1/moesteer/traces/{response id}``, which answers
them as a moesteer trace file (``moesteer generate --trace-out``'s JSON: ``replay`` reads it).
The server keeps the last :data:`KEPT` traced requests.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from http import HTTPStatus

import numpy as np
from vllm.entrypoints.serve.exception_handling.error_response import create_error_response
from vllm.exceptions import VLLMNotFoundError

from moesteer.serve.aliases import authorized, send_json
from moesteer.trace import RoutingTrace
from moesteer.trace_file import TracedCompletion, TraceFile

KEPT = 256
TRACE_PATH = "/v1/moesteer/traces/"
MIDDLEWARE = "moesteer.serve.traces.TraceMiddleware"


def routed_experts(trace: RoutingTrace, prompt_len: int, num_tokens: int) -> np.ndarray:
    """Branch 0's experts ``[prompt_len + num_tokens - 1, MoE layers, K]`` (int32, ``-1``: an
    inactive slot), positions in order: every token the model read (the last generated token is
    never read). Layers with different widths are padded to the widest."""
    joined = trace.joined(branch=0)
    length = prompt_len + num_tokens - 1
    layers = [joined[layer].experts[0, :length] for layer in sorted(joined)]
    width = max(int(e.shape[-1]) for e in layers)
    out = np.full((length, len(layers), width), -1, dtype=np.int32)
    for i, experts in enumerate(layers):
        out[: experts.shape[0], i, : experts.shape[-1]] = experts.numpy()
    return out


@dataclass
class TraceStore:
    """The last :data:`KEPT` traced engine requests' completions, by engine request id."""

    model: str
    num_experts: int
    moe_layers: tuple[int, ...]
    kept: OrderedDict[str, tuple[str, list[TracedCompletion]]] = field(default_factory=OrderedDict)

    def add(self, request_id: str, strategy: str, completion: TracedCompletion) -> None:
        self.kept.setdefault(request_id, (strategy, []))[1].append(completion)
        self.kept.move_to_end(request_id)
        while len(self.kept) > KEPT:
            self.kept.popitem(last=False)

    def file(self, response_id: str) -> TraceFile | None:
        """A response's traces: vLLM names its engine requests ``<id>``, ``<id>-<prompt>`` or
        ``<id>_<prompt>``; completions in prompt, then sample order."""
        found = sorted((index, key) for key in self.kept if (index := _prompt_index(key, response_id)) is not None)
        if not found:
            return None
        completions = [
            TracedCompletion(index, c.sample_index, c.text, c.trace)
            for index, key in found
            for c in sorted(self.kept[key][1], key=lambda c: c.sample_index)
        ]
        strategy = self.kept[found[0][1]][0]
        return TraceFile(self.model, strategy, self.num_experts, self.moe_layers, tuple(completions))


def _prompt_index(key: str, response_id: str) -> int | None:
    """The prompt index of engine request ``key`` of a response (``None``: another response's)."""
    if key == response_id:
        return 0
    rest = key.removeprefix(response_id)
    if rest == key or rest[:1] not in ("-", "_") or not rest[1:].isdigit():
        return None
    return int(rest[1:])


class TraceMiddleware:
    """ASGI middleware answering ``GET /v1/moesteer/traces/{response id}`` from the engine client's
    :class:`TraceStore` (404 when it keeps none); other requests pass through."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        get = scope["type"] == "http" and scope["method"] == "GET"
        if not get or not scope["path"].startswith(TRACE_PATH) or not authorized(scope):
            await self.app(scope, receive, send)
            return
        response_id = scope["path"].removeprefix(TRACE_PATH)
        found = scope["app"].state.engine_client.traces.file(response_id)
        if found is None:
            error = VLLMNotFoundError(
                f"no routing trace kept for {response_id!r}; ask for moesteer_trace in vllm_xargs"
            )
            await send_json(send, HTTPStatus.NOT_FOUND, create_error_response(error).model_dump())
        else:
            await send_json(send, HTTPStatus.OK, found.to_data())
