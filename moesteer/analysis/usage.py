"""Expert usage of a routing trace: per-layer shares, a text summary, a heatmap, and the top-k
overlap of two policies on the same tokens (``inspect``, ``report``)."""

from __future__ import annotations

import math
from pathlib import Path

from torch import Tensor

from moesteer.trace import RouterRecord, RoutingTrace


def shares(load_: Tensor) -> Tensor:
    """Each layer's expert counts as fractions of that layer's routed assignments."""
    return load_.double() / load_.sum(-1, keepdim=True).clamp(min=1)


def k_histogram(trace: RoutingTrace, layer: int) -> dict[int, int]:
    """How many routed tokens of ``layer`` had k active experts, for each k that occurs."""
    ks, counts = trace.active_counts(layer).unique(return_counts=True)
    return {int(k): int(n) for k, n in zip(ks, counts, strict=True)}


def by_branch(trace: RoutingTrace) -> list[tuple[str, RoutingTrace]]:
    """``[("", trace)]`` for one branch, else ``("branch b", its calls)`` for each branch of the
    strategy (SCMoE's strong and weak routing are summarised apart, never mixed)."""
    branches = trace.branches()
    if len(branches) <= 1:
        return [("", trace)]
    return [(f"branch {b}", trace.branch(b)) for b in branches]


def usage_panels(title: str, trace: RoutingTrace, num_experts: int) -> list[tuple[str, Tensor]]:
    """The (title, load) panels of :func:`plot_usage` for ``trace``: one a branch."""
    return [(f"{title}\n{name}" if name else title, part.expert_load(num_experts)) for name, part in by_branch(trace)]


def usage_summary(trace: RoutingTrace, num_experts: int, busiest: int = 3) -> list[str]:
    """Per MoE layer (and branch): the normalised entropy of its expert load (1 = uniform) and its
    busiest experts; where the number of active experts varies per token (``topp``, ``capacity``),
    its histogram."""
    lines = [f"expert usage ({num_experts} experts; entropy / ln {num_experts}, 1 = uniform)"]
    for name, part in by_branch(trace):
        if name:
            lines.append(f"{name}:")
        lines += [("  " if name else "") + line for line in _layer_lines(part, num_experts, busiest)]
    return lines


def _layer_lines(trace: RoutingTrace, num_experts: int, busiest: int) -> list[str]:
    layer_shares = shares(trace.expert_load(num_experts))
    histograms = {layer: k_histogram(trace, layer) for layer in trace.layers()}
    dynamic = any(len(h) > 1 for h in histograms.values())
    lines = []
    for layer, row in zip(trace.layers(), layer_shares, strict=True):
        used = row[row > 0]
        entropy = float(-(used * used.log()).sum() / math.log(num_experts))
        top = row.topk(min(busiest, num_experts))
        experts = ", ".join(f"e{int(e)} {float(s):.0%}" for s, e in zip(top.values, top.indices, strict=True))
        line = f"layer {layer}: entropy {entropy:.3f}, busiest {experts}"
        if dynamic:
            tokens = sum(histograms[layer].values())
            mean = sum(k * n for k, n in histograms[layer].items()) / tokens
            spread = ", ".join(f"{k}: {n / tokens:.0%}" for k, n in histograms[layer].items())
            line += f"; experts per token: mean {mean:.2f} ({spread})"
        lines.append(line)
    return lines


def plot_usage(panels: list[tuple[str, Tensor]], layers: list[int], out: Path, counts: bool) -> None:
    """Heatmaps of expert usage, MoE layer × expert: one panel per (title, load ``[layers, E]``),
    side by side on one colour scale, written with matplotlib's Agg backend."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    values = [load_ if counts else shares(load_) for _, load_ in panels]
    top = max(float(v.max()) for v in values) or 1.0
    num_experts = values[0].shape[-1]
    width = min(max(3 + 0.3 * num_experts, 6), 20)
    fig = Figure(figsize=(width * len(panels), min(max(1.5 + 0.4 * len(layers), 3), 14)))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (title, _), value in zip(axes, panels, values, strict=True):
        image = ax.imshow(value.numpy(), aspect="auto", cmap="viridis", interpolation="nearest", vmin=0, vmax=top)
        ax.set_xlabel("expert")
        ax.set_ylabel("decoder layer")
        ax.set_yticks(range(len(layers)), [str(layer) for layer in layers])
        if num_experts <= 32:
            ax.set_xticks(range(num_experts))
        ax.set_title(title)
    fig.colorbar(image, ax=list(axes)).set_label("routed tokens" if counts else "share of the layer's routed tokens")
    fig.savefig(out, dpi=120, bbox_inches="tight")


def load_distance(first: Tensor, second: Tensor) -> Tensor:
    """Per layer, the total-variation distance ½ Σ_i |a_i − b_i| of two expert loads' shares (0: the
    same usage, 1: disjoint experts)."""
    return 0.5 * (shares(first) - shares(second)).abs().sum(-1)


def topk_overlap(first: dict[int, RouterRecord], second: dict[int, RouterRecord]) -> dict[int, float]:
    """Per layer, the mean over tokens of the Jaccard overlap |A ∩ B| / |A ∪ B| of the expert sets
    of two routings of the same tokens (``HFEngine.routing``)."""
    out = {}
    for layer in sorted(first):
        a, b = first[layer].experts[0], second[layer].experts[0]
        scores = []
        for row_a, row_b in zip(a.tolist(), b.tolist(), strict=True):
            set_a, set_b = {e for e in row_a if e >= 0}, {e for e in row_b if e >= 0}
            union = set_a | set_b
            scores.append(len(set_a & set_b) / len(union) if union else 1.0)
        out[layer] = sum(scores) / len(scores)
    return out
