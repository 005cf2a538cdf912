"""Recorded completions, as hashes: a refactor must not change what users see.

``completion_digest`` runs the first ``PROBLEMS`` arith test problems through the eval runner's
``evaluate`` (batches of 32, as ``moesteer eval`` does) and hashes every output text. The digests in
``GOLDEN`` were computed by this function at commit 9b4b36a; every change since reproduces them.
"""

from __future__ import annotations

import hashlib
import json

PROBLEMS = 50
RUNS = {  # strategy spec -> temperature
    "plain()": 0.0,
    "scmoe(beta=0.1)": 0.0,
    "roe(samples=4, tau=0.1917, skip=0)": 0.0,
    "self_consistency(plain(), n=8)": 0.7,
    "roe(samples=4, tau=0.25, cache='clean')": 0.0,
    "self_consistency(roe(samples=2, tau=0.25, cache='clean'), n=4)": 0.7,
}
GOLDEN = {
    "plain()": "266bd28cb756c50b",
    "scmoe(beta=0.1)": "1683f3c62c42b6fe",
    "roe(samples=4, tau=0.1917, skip=0)": "4bc3ac8639f1fcf5",
    "self_consistency(plain(), n=8)": "74a96318acdc44fa",
    "roe(samples=4, tau=0.25, cache='clean')": "a84efc43fbf74234",
    "self_consistency(roe(samples=2, tau=0.25, cache='clean'), n=4)": "bb890975116f31b4",
}


def completion_digest(lm, spec: str, temperature: float) -> str:
    from moesteer.evals.runner import evaluate, task_sampling
    from moesteer.evals.tasks import get_task
    from moesteer.strategies.spec import parse

    task = get_task("arith")
    problems = task.load("test")[:PROBLEMS]
    sampling = task_sampling(task, temperature=temperature)
    records = list(evaluate(lm, task, parse(spec), sampling, list(enumerate(problems)), 32))
    texts = [(r["id"], r["outputs"], r["tokens"], r["forward_passes"], r["token_rows"]) for r in records]
    return hashlib.sha256(json.dumps(texts).encode()).hexdigest()[:16]
