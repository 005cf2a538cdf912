"""Family adapters: MoE-layer rules, router discovery, real published config shapes, load()."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import moesteer
from moesteer import steer
from moesteer.models.adapters import ADAPTERS, SUPPORTED_FAMILIES, find_routers, get_adapter
from moesteer.routing import TopK
from moesteer.testing import tiny_config

# Structural fields of published config.json files (sizes are shrunk below, structure kept).
DEEPSEEK_V3_CONFIG = {  # deepseek-ai/DeepSeek-V3 config.json
    "first_k_dense_replace": 3,
    "n_group": 8,
    "topk_group": 4,
    "n_routed_experts": 256,
    "num_experts_per_tok": 8,
    "n_shared_experts": 1,
    "norm_topk_prob": True,
    "routed_scaling_factor": 2.5,
    "num_hidden_layers": 61,
}
QWEN3_MOE_CONFIG = {  # Qwen/Qwen3-30B-A3B config.json
    "num_experts": 128,
    "num_experts_per_tok": 8,
    "decoder_sparse_step": 1,
    "mlp_only_layers": [],
    "norm_topk_prob": True,
    "num_hidden_layers": 48,
}
SHRINK = {
    "hidden_size": 64,
    "intermediate_size": 96,
    "moe_intermediate_size": 32,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "vocab_size": 128,
    "head_dim": 16,
    "max_position_embeddings": 256,
}


def test_every_family_supported():
    assert set(SUPPORTED_FAMILIES) >= {
        "mixtral",
        "olmoe",
        "qwen2_moe",
        "qwen3_moe",
        "deepseek_v2",
        "deepseek_v3",
        "gpt_oss",
        "phimoe",
        "granitemoe",
    }


def test_moe_layer_rule_matches_discovered_routers(family_model):
    adapter = get_adapter(family_model.config)
    assert tuple(find_routers(family_model, adapter)) == adapter.moe_layers(family_model.config)


def test_moe_layer_rules_on_published_configs():
    v3 = AutoConfig.for_model("deepseek_v3", **DEEPSEEK_V3_CONFIG)
    assert ADAPTERS["deepseek_v3"].moe_layers(v3) == tuple(range(3, 61))
    qwen = AutoConfig.for_model("qwen3_moe", **QWEN3_MOE_CONFIG)
    assert ADAPTERS["qwen3_moe"].moe_layers(qwen) == tuple(range(48))
    sparse = AutoConfig.for_model("qwen2_moe", num_hidden_layers=6, decoder_sparse_step=2, mlp_only_layers=[3])
    assert ADAPTERS["qwen2_moe"].moe_layers(sparse) == (1, 5)


@pytest.mark.parametrize(
    ("family", "published"), [("deepseek_v3", DEEPSEEK_V3_CONFIG), ("qwen3_moe", QWEN3_MOE_CONFIG)]
)
def test_shrunk_published_config_routes_identically(family, published):
    """The published structure (groups, dense prefix, renormalisation, scaling) at toy size."""
    layers = (
        {"num_hidden_layers": 5, "first_k_dense_replace": 3} if family == "deepseek_v3" else {"num_hidden_layers": 2}
    )
    extra = (
        {
            "qk_rope_head_dim": 8,
            "qk_nope_head_dim": 8,
            "v_head_dim": 16,
            "kv_lora_rank": 16,
            "q_lora_rank": 24,
            "head_dim": 8,
        }
        if family == "deepseek_v3"
        else {}
    )
    config = AutoConfig.for_model(family, **{**published, **SHRINK, **layers, **extra})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    for router in find_routers(model, get_adapter(config)).values():
        torch.nn.init.normal_(router.weight, std=1.0)
    ids = torch.randint(3, 128, (2, 9))
    with torch.no_grad():
        reference = model(ids).logits
        with steer(model, TopK(8)):
            neutral = model(ids).logits
        with steer(model, TopK(12)):
            wider = model(ids).logits
    assert torch.equal(reference, neutral)
    assert (reference - wider).abs().max() > 1e-5
    assert tuple(find_routers(model, get_adapter(config))) == get_adapter(config).moe_layers(config)


def test_tiny_configs_keep_family_structure():
    assert tiny_config("deepseek_v3").first_k_dense_replace > 0
    assert tiny_config("deepseek_v3").topk_group < tiny_config("deepseek_v3").n_group
    assert tiny_config("qwen2_moe").mlp_only_layers == [0]
    assert tiny_config("qwen2_moe").shared_expert_intermediate_size > 0


def test_load_wraps_a_model_and_rejects_dense(tmp_path):
    lm = moesteer.load(moesteer.testing.tiny_model("olmoe"))
    assert lm.adapter.model_type == "olmoe" and lm.moe_layers == (0, 1)
    from transformers import LlamaConfig, LlamaForCausalLM

    dense = LlamaForCausalLM(
        LlamaConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
            vocab_size=64,
        )
    )
    with pytest.raises(ValueError, match="not a supported MoE family"):
        moesteer.load(dense)
    with pytest.raises(OSError, match="cannot load model"):
        moesteer.load(str(tmp_path / "missing-model"))


def test_load_from_local_path(tmp_path):
    model = moesteer.testing.tiny_model("qwen3_moe")
    model.save_pretrained(tmp_path)
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<unk>": 0, "a": 1}, unk_token="<unk>")))
    tok.save_pretrained(tmp_path)
    lm = moesteer.load(str(tmp_path))
    ids = torch.tensor([[4, 5, 6]])
    with torch.no_grad():
        torch.testing.assert_close(lm.model(ids).logits, model(ids).logits, atol=1e-5, rtol=0)  # sdpa vs eager
