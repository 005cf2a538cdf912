"""Controllers, and :func:`run`: the one front door that runs any strategy on an engine.

A :class:`Controller` is a sequence-level strategy: ``run(engine, prompts, sampling, context)``
orchestrates generations of an inner strategy (a token strategy or another controller) through the
engine's ``generate`` and ``session``. Engines run token strategies only (:mod:`moesteer.strategy`);
:func:`run` dispatches a controller, or hands a token strategy or routing policy to the engine.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, ClassVar

from moesteer.routing import Policy
from moesteer.sampling import Completion, SamplingParams
from moesteer.strategies.context import RunContext
from moesteer.strategy import Strategy, as_strategy

if TYPE_CHECKING:
    from moesteer.backends.base import Engine


class Controller(Strategy):
    """Sequence level: runs an inner strategy through an engine."""

    level: ClassVar[str] = "sequence"

    def run(
        self, engine: Engine, prompts: list, sampling: SamplingParams, context: RunContext, **options
    ) -> list[Completion]:
        """``sampling.n`` completions per prompt (prompt-major); ``options`` (``chat``, ``trace``,
        ``prompt_keys``) are passed on to every generation it starts."""
        raise NotImplementedError


def run(
    strategy: Strategy | Policy | Sequence[Strategy | Policy | None] | None,
    engine: Engine,
    prompts: Sequence[str] | Sequence[Sequence[int]],
    sampling: SamplingParams | None = None,
    *,
    chat: bool = False,
    trace: bool = False,
    prompt_keys: Sequence[int] | None = None,
    context: RunContext | None = None,
) -> list[Completion]:
    """``sampling.n`` completions per prompt, prompt-major, under ``strategy`` on ``engine``.

    ``strategy`` is one strategy, routing policy or controller for every prompt, or a list with
    one token strategy or policy per prompt. ``prompt_keys`` (default ``0..P-1``) key each
    prompt's randomness: pass a prompt's index in its dataset so that its samples do not depend on
    the batch it ran in. ``context`` reaches controllers (the task's extractor, shared resources).
    """
    sampling = sampling or SamplingParams()
    options = {"chat": chat, "trace": trace, "prompt_keys": prompt_keys}
    if not isinstance(strategy, list | tuple) and isinstance(controller := as_strategy(strategy), Controller):
        if trace and not engine.capabilities.routing_traces:
            raise ValueError(f"routing traces are not recorded by the {engine.backend} backend; use backend hf")
        return controller.run(engine, list(prompts), sampling, context or RunContext(), **options)
    return engine.generate(prompts, strategy, sampling, **options)
