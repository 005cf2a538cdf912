"""Training checkpoints: everything needed to continue a run exactly where it stopped.

A checkpoint holds the model, optimizer and learning-rate schedule states, the number of steps
done, the per-step losses so far and the training seconds spent. It is written to a temporary
file and renamed, so a crash while saving leaves the previous checkpoint intact.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch


@dataclass
class TrainState:
    """Progress of a run: steps done, per-step losses (``ce``, ``aux``), training seconds."""

    step: int = 0
    losses: dict[str, list[float]] = field(default_factory=lambda: {"ce": [], "aux": []})
    seconds: float = 0.0


def save(path: Path, model: torch.nn.Module, optimizer, schedule, state: TrainState) -> None:
    """Write the checkpoint atomically (temporary file, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(
        {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "schedule": schedule.state_dict(),
            "state": vars(state),
        },
        tmp,
    )
    os.replace(tmp, path)


def load(path: Path, model: torch.nn.Module, optimizer, schedule) -> TrainState:
    """Restore model, optimizer and schedule in place from ``path``; the run's progress."""
    saved = torch.load(path, weights_only=False)
    model.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    schedule.load_state_dict(saved["schedule"])
    return TrainState(**saved["state"])
