"""The embedded default model: a tiny OLMoE trained on the ``arith`` task (see its README.md)."""

from __future__ import annotations

from pathlib import Path

DEFAULT_MODEL_DIR = Path(__file__).parent / "tiny-arith-moe"
"""Directory of the shipped model (config, bf16 weights, tokenizer, model card)."""

_REQUIRED = ("config.json", "model.safetensors", "tokenizer.json")


def default_model_path() -> str:
    """Path of the shipped model, loadable with ``from_pretrained``; errors if files are missing."""
    missing = [name for name in _REQUIRED if not (DEFAULT_MODEL_DIR / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"the embedded model is incomplete: {', '.join(missing)} missing in {DEFAULT_MODEL_DIR}. "
            f"Recreate it with: python -m moesteer.assets.train --out {DEFAULT_MODEL_DIR}"
        )
    return str(DEFAULT_MODEL_DIR)
