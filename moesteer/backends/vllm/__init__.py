"""The vLLM backend: routing policies inside vLLM's fused-MoE layers, branches as lock-step requests.

Runs vLLM's engine in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, eager mode), so the
router hook and the branch combiner read the engine's own state. Importing this package does not
import vLLM; building a :class:`VLLMEngine` does. Known differences from the HF backend are listed
in ``docs/vllm.md`` and each is pinned by a test in ``tests/test_vllm.py``.
"""

from moesteer.backends.vllm.engine import VLLMEngine

__all__ = ["VLLMEngine"]
