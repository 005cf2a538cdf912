"""``moesteer serve``: an OpenAI-compatible server (vLLM's own app) where each request picks its strategy.

A request steers with ``extra_body={"vllm_xargs": {"moesteer": "scmoe(beta=0.5)"}}`` (a spec, the
text ``moesteer generate --strategy`` takes) or with ``model="<served>+<alias>"`` (``--alias``);
without either it is vLLM's own. ``docs/serve.md`` has the request shape and what is served.
Importing this package imports no vLLM; :mod:`.server` and :mod:`.engine_client` do.
"""

from moesteer.serve.requests import ALLOWABLE, STRATEGY_KEY, TRACE_KEY, ServeOptions

__all__ = ["ALLOWABLE", "STRATEGY_KEY", "TRACE_KEY", "ServeOptions"]
