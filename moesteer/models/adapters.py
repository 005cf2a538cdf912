"""Family adapters: the one place that knows where a family's routers are and how they score.

Keyed by HF ``config.model_type``. Routers are found by class, preferring the model's own
declaration (``_can_record_outputs["router_logits"]`` names the router class in transformers 5)
over the table below; the decoder layer of a router is the ``layers.<i>.`` in its module path.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn
from transformers import PretrainedConfig

from moesteer.checks import did_you_mean
from moesteer.models.scoring import (
    GroupLimited,
    Scoring,
    SoftmaxTopK,
    SparseMixer,
    TopKSoftmax,
)
from moesteer.registry import Registry

LOGITS_WEIGHTS_INDEX = ("logits", "weights", "index")


def _all_layers(config: PretrainedConfig) -> tuple[int, ...]:
    return tuple(range(config.num_hidden_layers))


def _sparse_step_layers(config: PretrainedConfig) -> tuple[int, ...]:
    """Qwen MoE rule: MoE where ``(i+1) % decoder_sparse_step == 0`` and not in ``mlp_only_layers``."""
    if config.num_experts <= 0:
        return ()
    return tuple(
        i
        for i in range(config.num_hidden_layers)
        if i not in config.mlp_only_layers and (i + 1) % config.decoder_sparse_step == 0
    )


def _after_dense_layers(config: PretrainedConfig) -> tuple[int, ...]:
    """DeepSeek rule: the first ``first_k_dense_replace`` layers are dense."""
    return tuple(range(config.first_k_dense_replace, config.num_hidden_layers))


@dataclass(frozen=True)
class FamilyAdapter:
    """Per-family facts: router class and location, scoring rule, MoE layers, shared experts."""

    model_type: str
    router_class: str
    router_path: str  # attribute path inside a decoder layer
    scoring: Scoring
    moe_layers: Callable[[PretrainedConfig], tuple[int, ...]] = _all_layers
    output_order: tuple[str, str, str] = LOGITS_WEIGHTS_INDEX
    shared_experts: str | None = None  # module path inside a decoder layer; never routed

    @staticmethod
    def layer_of(name: str) -> int | None:
        """The decoder-layer index in a module or parameter name (``model.layers.3.mlp`` → 3), else ``None``."""
        parts = name.split(".")
        if "layers" not in parts[:-1] or not parts[parts.index("layers") + 1].isdigit():
            return None
        return int(parts[parts.index("layers") + 1])

    def router_weight_layer(self, key: str) -> int | None:
        """The decoder layer whose router weight the checkpoint tensor ``key`` is, else ``None``."""
        suffix = f".{self.router_path}.weight"
        return self.layer_of(key.removesuffix(suffix)) if key.endswith(suffix) else None

    def pack(self, logits, weights, index) -> tuple:
        """Return the router's outputs in the family's own tuple order."""
        named = {"logits": logits, "weights": weights, "index": index}
        return tuple(named[name] for name in self.output_order)

    def unpack(self, outputs: tuple) -> tuple:
        """``(logits, weights, index)`` from the router's own tuple."""
        named = dict(zip(self.output_order, outputs, strict=True))
        return named["logits"], named["weights"], named["index"]


_softmax = SoftmaxTopK()
ADAPTERS: Registry[FamilyAdapter] = Registry(
    "MoE family",
    {
        adapter.model_type: adapter
        for adapter in (
            FamilyAdapter(
                "mixtral", "MixtralTopKRouter", "mlp.gate", SoftmaxTopK(always_renormalise=True, cast_weights=False)
            ),
            FamilyAdapter("olmoe", "OlmoeTopKRouter", "mlp.gate", _softmax),
            FamilyAdapter(
                "qwen2_moe",
                "Qwen2MoeTopKRouter",
                "mlp.gate",
                _softmax,
                _sparse_step_layers,
                shared_experts="mlp.shared_expert",
            ),
            FamilyAdapter("qwen3_moe", "Qwen3MoeTopKRouter", "mlp.gate", _softmax, _sparse_step_layers),
            FamilyAdapter(
                "qwen3_next",
                "Qwen3NextTopKRouter",
                "mlp.gate",
                _softmax,
                _sparse_step_layers,
                shared_experts="mlp.shared_expert",
            ),
            FamilyAdapter(
                "deepseek_v2",
                "DeepseekV2TopkRouter",
                "mlp.gate",
                GroupLimited(),
                _after_dense_layers,
                shared_experts="mlp.shared_experts",
            ),
            FamilyAdapter(
                "deepseek_v3",
                "DeepseekV3TopkRouter",
                "mlp.gate",
                GroupLimited(sigmoid=True),
                _after_dense_layers,
                shared_experts="mlp.shared_experts",
            ),
            FamilyAdapter("gpt_oss", "GptOssTopKRouter", "mlp.router", TopKSoftmax()),
            FamilyAdapter(
                "granitemoe",
                "GraniteMoeTopKRouter",
                "block_sparse_moe.router",
                TopKSoftmax(fp32_logits=True),
                output_order=("index", "weights", "logits"),
            ),
            FamilyAdapter(
                "granitemoeshared",
                "GraniteMoeSharedTopKRouter",
                "block_sparse_moe.router",
                TopKSoftmax(fp32_logits=True),
                output_order=("index", "weights", "logits"),
                shared_experts="shared_mlp",
            ),
            FamilyAdapter("phimoe", "PhimoeTopKRouter", "mlp.router", SparseMixer()),
        )
    },
)
"""Family adapters by HF ``config.model_type``."""

SUPPORTED_FAMILIES = tuple(ADAPTERS.names())


def get_adapter(config: PretrainedConfig) -> FamilyAdapter:
    """The adapter for a model config; a one-line ``ValueError`` for dense or unknown models."""
    model_type = getattr(config, "model_type", None)
    if model_type in ADAPTERS:
        return ADAPTERS.get(model_type)
    raise ValueError(
        f"model_type {model_type!r} is not a supported MoE family{did_you_mean(model_type, SUPPORTED_FAMILIES)}; "
        f"supported: {', '.join(SUPPORTED_FAMILIES)}"
    )


def router_class_name(model: nn.Module, adapter: FamilyAdapter) -> str:
    """The router class the model itself declares for ``router_logits``, else the adapter's."""
    recorders = getattr(model, "_can_record_outputs", None) or {}
    recorder = recorders.get("router_logits")
    target = getattr(recorder, "target_class", None)
    return target.__name__ if isinstance(target, type) else adapter.router_class


def find_routers(model: nn.Module, adapter: FamilyAdapter) -> dict[int, nn.Module]:
    """Map decoder-layer index -> router module, for every MoE layer of ``model``."""
    class_name = router_class_name(model, adapter)
    routers: dict[int, nn.Module] = {}
    for name, module in model.named_modules():
        if type(module).__name__ != class_name:
            continue
        layer = adapter.layer_of(name)
        if layer is not None:
            routers[layer] = module
    if not routers:
        raise ValueError(f"no {class_name} routers found in this {adapter.model_type} model")
    return dict(sorted(routers.items()))
