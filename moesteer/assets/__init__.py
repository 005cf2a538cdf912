"""The embedded models: tiny OLMoEs trained by :mod:`moesteer.assets.train` (see each one's README.md).

``tiny-arith-moe`` (the default, trained on the ``arith`` task), ``tiny-mix-moe`` (revision 2 of
the ``mix`` test bed, loaded by the name ``mix``) and ``tiny-mix3-moe`` (revision 3, ``mix3``).
"""

from __future__ import annotations

from pathlib import Path

DEFAULT_MODEL_DIR = Path(__file__).parent / "tiny-arith-moe"
"""Directory of the shipped default model (config, bf16 weights, tokenizer, model card)."""
MIX_MODEL_DIR = Path(__file__).parent / "tiny-mix-moe"
"""Directory of the shipped ``mix`` test-bed model (revision 2)."""
MIX3_MODEL_DIR = Path(__file__).parent / "tiny-mix3-moe"
"""Directory of the shipped ``mix3`` test-bed model (revision 3)."""
EMBEDDED_MODELS = {"mix": ("mix", MIX_MODEL_DIR), "mix3": ("mix3", MIX3_MODEL_DIR)}
"""Names that load an embedded model instead of a hub id or path: name -> (recipe, directory)."""

_REQUIRED = ("config.json", "model.safetensors", "tokenizer.json")


def _checked(directory: Path, recipe: str) -> str:
    missing = [name for name in _REQUIRED if not (directory / name).is_file()]
    if missing:
        recipe_flag = "" if recipe == "arith" else f" --recipe {recipe}"
        raise FileNotFoundError(
            f"the embedded model is incomplete: {', '.join(missing)} missing in {directory}. "
            f"Recreate it with: python -m moesteer.assets.train{recipe_flag} --out {directory}"
        )
    return str(directory)


def default_model_path() -> str:
    """Path of the shipped default model, loadable with ``from_pretrained``; errors if files are missing."""
    return _checked(DEFAULT_MODEL_DIR, "arith")


def resolve_model(model: str | None) -> str:
    """``None``: the default model's path; an embedded model's name (``mix``, ``mix3``): its path; else ``model``."""
    if model is None:
        return default_model_path()
    if model in EMBEDDED_MODELS:
        recipe, directory = EMBEDDED_MODELS[model]
        return _checked(directory, recipe)
    return model
