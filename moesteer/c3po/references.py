"""Reference sets: problems the model answers correctly, with their routing, for C3PO.

A reference ``(x_i, y_i, ω_i)`` [paper §3] is a question the model answers correctly greedily, its
answer, the question's sentence embedding ``E(x_i)`` and its pathway ``ω_i ∈ R^{L×E}``: the
router's full distribution over the experts at every MoE layer, at the re-mixed position — the
last prompt token (the paper's best choice; the released code reads the same position).

On disk a reference set is one folder, written atomically (built in a temporary sibling, then
renamed; a previous set at the same place stays intact until the new one is complete):

* ``manifest.json`` — model, MoE layers, expert count, embedding model, task, split, count, ...;
* ``references.safetensors`` — ``embeddings [N, D]`` and ``routing [N, L, E]`` (float32);
* ``references.jsonl`` — one ``{"id", "question", "answer"}`` a line, in row order.

Building a set runs an eval (:func:`moesteer.evals.references.build`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from moesteer.backends.base import Engine

MANIFEST, TENSORS, RECORDS = "manifest.json", "references.safetensors", "references.jsonl"
FORMAT = 1
POSITION = "last_prompt_token"
POSITION_TEXT = {POSITION: "router distribution at the last prompt token"}


@dataclass(frozen=True)
class Manifest:
    """The header of a reference set: what it was built from and the shapes it holds."""

    model: str
    model_type: str
    moe_layers: tuple[int, ...]
    num_experts: int
    embedding_model: str
    embedding_dim: int
    task: str
    split: str
    count: int
    attempted: int  # problems run; ``count`` of them were answered correctly
    router_sha256: str = ""  # :func:`router_sha256` of the model (empty: not checked)
    position: str = POSITION
    created: str = ""
    format: int = FORMAT

    @classmethod
    def from_json(cls, data: dict, source: str) -> Manifest:
        if data.get("format") != FORMAT:
            raise ValueError(f"{source}: reference-set format {data.get('format')!r}, this moesteer reads {FORMAT}")
        try:
            return cls(**{**data, "moe_layers": tuple(data["moe_layers"])})
        except (KeyError, TypeError) as err:
            raise ValueError(f"{source}: not a reference-set manifest ({err})") from None


@dataclass(frozen=True)
class Reference:
    id: str
    question: str
    answer: str


@dataclass(frozen=True)
class ReferenceSet:
    """References in row order with ``embeddings [N, D]`` and ``routing [N, L, E]``."""

    manifest: Manifest
    references: tuple[Reference, ...]
    embeddings: Tensor
    routing: Tensor

    def __post_init__(self) -> None:
        m, n = self.manifest, len(self.references)
        expected = {"embeddings": (n, m.embedding_dim), "routing": (n, len(m.moe_layers), m.num_experts)}
        for name, shape in expected.items():
            if tuple(getattr(self, name).shape) != shape:
                raise ValueError(
                    f"reference set: {name} has shape {tuple(getattr(self, name).shape)}, expected {shape}"
                )
        if m.count != n:
            raise ValueError(f"reference set: the manifest says {m.count} references, the records hold {n}")

    def __len__(self) -> int:
        return len(self.references)

    def save(self, folder: str | Path) -> Path:
        """Write the set to ``folder`` atomically (see the module docstring); returns ``folder``."""
        folder = Path(folder)
        if folder.exists() and not (folder / MANIFEST).is_file():
            raise FileExistsError(f"{folder} exists and is not a reference set; refusing to replace it")
        folder.absolute().parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.absolute().parent))
        try:
            save_file(
                {"embeddings": self.embeddings.contiguous(), "routing": self.routing.contiguous()}, staging / TENSORS
            )
            lines = (json.dumps(asdict(r), ensure_ascii=False) for r in self.references)
            (staging / RECORDS).write_text("".join(line + "\n" for line in lines), encoding="utf-8")
            (staging / MANIFEST).write_text(json.dumps(asdict(self.manifest), indent=2) + "\n", encoding="utf-8")
            for path in staging.iterdir():
                path.chmod(0o644)  # a set to share: readable by all, like the folder
            staging.chmod(0o755)
            _swap(staging, folder)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> ReferenceSet:
        folder = Path(folder)
        if not (folder / MANIFEST).is_file():
            raise FileNotFoundError(
                f"no reference set at {folder} (no {MANIFEST}); build one with moesteer references build"
            )
        manifest = Manifest.from_json(json.loads((folder / MANIFEST).read_text(encoding="utf-8")), str(folder))
        for name in (TENSORS, RECORDS):
            if not (folder / name).is_file():
                raise FileNotFoundError(f"reference set {folder} is missing {name}")
        tensors = load_file(folder / TENSORS)
        lines = (folder / RECORDS).read_text(encoding="utf-8").splitlines()
        references = tuple(Reference(**json.loads(line)) for line in lines if line.strip())
        return cls(manifest, references, tensors["embeddings"], tensors["routing"])

    def summary(self) -> str:
        """What the set holds, one ``key: value`` a line."""
        m = self.manifest
        rate = f" of {m.attempted} attempted ({m.count / m.attempted:.0%} correct)" if m.attempted else ""
        return "\n".join(
            [
                f"references: {m.count}{rate}",
                f"model: {m.model} ({m.model_type})",
                f"MoE layers: {len(m.moe_layers)} {list(m.moe_layers)}, experts: {m.num_experts}",
                f"routing: {POSITION_TEXT.get(m.position, m.position)}, tensor {list(self.routing.shape)}",
                f"embedding model: {m.embedding_model}, dim {m.embedding_dim}",
                f"task: {m.task}, split: {m.split}",
                f"created: {m.created}",
            ]
        )


def _swap(staging: Path, folder: Path) -> None:
    """Put ``staging`` at ``folder``, replacing a previous set only once the new one is complete."""
    if not folder.exists():
        os.rename(staging, folder)
        return
    retired = Path(tempfile.mkdtemp(prefix=f".{folder.name}.old.", dir=folder.absolute().parent))
    try:
        os.rename(folder, retired / folder.name)
        try:
            os.rename(staging, folder)
        except BaseException:
            os.rename(retired / folder.name, folder)
            raise
    finally:
        shutil.rmtree(retired, ignore_errors=True)


def router_sha256(weights: dict[int, Tensor]) -> str:
    """A hash of a model's router weights, layer by layer, rounded to bfloat16 — so the same weights
    loaded in float32 or bfloat16, from a hub id or a local path, by either backend, hash alike."""
    digest = hashlib.sha256()
    for layer, weight in sorted(weights.items()):
        rounded = weight.detach().to("cpu", torch.bfloat16).contiguous().view(torch.int16)
        digest.update(f"{layer}:{tuple(weight.shape)}".encode() + rounded.numpy().tobytes())
    return digest.hexdigest()


def check_compatible(refs: ReferenceSet, engine: Engine, source: str) -> None:
    """``ValueError`` naming the mismatch if ``refs`` was built for another model: its MoE layers,
    expert count or router weights differ from ``engine``'s."""
    m = refs.manifest
    experts, _ = engine.routing_sizes()
    if (m.num_experts, tuple(m.moe_layers)) != (experts, tuple(engine.moe_layers)):
        raise ValueError(
            f"{source} holds routing over {m.num_experts} experts in MoE layers {list(m.moe_layers)}; "
            f"the model has {experts} experts in {list(engine.moe_layers)}"
        )
    if m.router_sha256 and m.router_sha256 != router_sha256(engine.router_weights()):
        raise ValueError(
            f"{source} was built with another model ({m.model}): its router weights differ from {engine.name}'s"
        )
    if not len(refs):
        raise ValueError(f"{source} holds no references")


@torch.no_grad()
def last_token_routing(engine: Engine, prompt: str) -> Tensor:
    """The router distribution ``[L, E]`` of the last token of ``prompt`` at every MoE layer (in
    layer order), from one unsteered forward of the prompt alone on an HF engine."""
    if getattr(engine, "model", None) is None:
        raise ValueError("reference routing needs router distributions, which only backend hf records")
    records = engine.routing(engine.encode(prompt), distributions=True)
    return torch.stack([records[layer].probs[0, -1] for layer in sorted(records)])
