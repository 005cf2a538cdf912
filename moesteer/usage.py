"""Expert usage of a routing trace: per-layer shares, a text summary, a heatmap (``inspect``, ``report``)."""

from __future__ import annotations

import math
from pathlib import Path

from torch import Tensor

from moesteer.trace import RoutingTrace


def shares(load_: Tensor) -> Tensor:
    """Each layer's expert counts as fractions of that layer's routed assignments."""
    return load_.double() / load_.sum(-1, keepdim=True).clamp(min=1)


def usage_summary(trace: RoutingTrace, num_experts: int, busiest: int = 3) -> list[str]:
    """Per MoE layer: the normalised entropy of its expert load (1 = uniform) and its busiest experts."""
    layer_shares = shares(trace.expert_load(num_experts))
    lines = [f"expert usage ({num_experts} experts; entropy / ln {num_experts}, 1 = uniform)"]
    for layer, row in zip(trace.layers(), layer_shares, strict=True):
        used = row[row > 0]
        entropy = float(-(used * used.log()).sum() / math.log(num_experts))
        top = row.topk(min(busiest, num_experts))
        experts = ", ".join(f"e{int(e)} {float(s):.0%}" for s, e in zip(top.values, top.indices, strict=True))
        lines.append(f"layer {layer}: entropy {entropy:.3f}, busiest {experts}")
    return lines


def plot_usage(trace: RoutingTrace, num_experts: int, out: Path, title: str, counts: bool) -> None:
    """Heatmap of expert usage, MoE layer × expert, written with matplotlib's Agg backend."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    load_ = trace.expert_load(num_experts)
    values = load_ if counts else shares(load_)
    layers = trace.layers()
    fig = Figure(figsize=(min(max(3 + 0.3 * num_experts, 6), 20), min(max(1.5 + 0.4 * len(layers), 3), 14)))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    image = ax.imshow(values.numpy(), aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_xlabel("expert")
    ax.set_ylabel("decoder layer")
    ax.set_yticks(range(len(layers)), [str(layer) for layer in layers])
    if num_experts <= 32:
        ax.set_xticks(range(num_experts))
    ax.set_title(title)
    fig.colorbar(image, ax=ax).set_label("routed tokens" if counts else "share of the layer's routed tokens")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
