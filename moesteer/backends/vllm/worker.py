"""Worker-side entry points: methods vLLM adds to each of its workers, called through ``collective_rpc``.

``VLLMEngine`` passes ``worker_extension_cls=`` :data:`EXTENSION`; vLLM appends
:class:`MoesteerWorkerExtension` to the worker class of every rank (in this process, in a separate
engine-core process, in tensor-parallel worker processes), and the engine calls its methods by
name, with JSON-safe arguments and results only (they cross vLLM's msgpack transport):

* ``moesteer_install()`` — patch the worker's runner and MoE routers (:mod:`.router_hook`) once,
  after the model is loaded; returns the hooked router sites;
* ``moesteer_pop(seq_ids)`` — what the sequences produced (combined log-probs, an error, a trace)
  and forget them;
* ``moesteer_audit()`` / ``moesteer_digest()`` — start and read a digest of every steered routing,
  so the engine can check that all tensor-parallel ranks routed alike.
"""

from __future__ import annotations

from dataclasses import astuple

from moesteer.backends.vllm.registry import REGISTRY
from moesteer.backends.vllm.router_hook import RouterHook
from moesteer.models.adapters import get_adapter

EXTENSION = "moesteer.backends.vllm.worker.MoesteerWorkerExtension"


class MoesteerWorkerExtension:
    """Mixed into vLLM's worker class (``self`` is the worker; vLLM does not run an ``__init__`` here)."""

    def moesteer_install(self) -> list[list[int]]:
        """Install the router hook (idempotent); returns each MoE router's ``RouterSite`` fields."""
        hook = getattr(self, "_moesteer_hook", None)
        if hook is None:
            runner = self.model_runner
            hook = RouterHook(REGISTRY, get_adapter(runner.model_config.hf_config))
            hook.install(self)
            self._moesteer_hook = hook
        return [list(astuple(site)) for site in hook.sites.values()]

    def moesteer_pop(self, seq_ids: list[int]) -> list[dict]:
        return REGISTRY.pop(list(seq_ids))

    def moesteer_audit(self) -> None:
        self._moesteer_hook.audit()

    def moesteer_digest(self) -> list:
        """``[steered router calls, hex digest]`` since the last ``moesteer_audit``."""
        hook = self._moesteer_hook
        return [hook.steered_calls, None if hook.digest is None else hook.digest.hexdigest()]
