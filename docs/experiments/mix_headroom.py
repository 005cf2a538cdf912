"""Routing headroom of the mix model on S1 validation: label-oracle router biases (docs/testbed.md, M1).

For each problem a bias δ ``[MoE layers, experts]`` on the router logits starts at zero and takes
``--steps`` Adam steps (lr ``--lr``) on the teacher-forced cross-entropy of the problem's **gold**
target (``engine.loss`` with one ``Bias`` row per problem); then the problem is decoded greedily
under δ. ``--scope all`` biases every position (rerouting's parameterisation), ``last_prompt`` only
the last prompt token (C3PO's); ``--last-layers N`` biases only the last N MoE layers (with
``last_prompt`` and N = 3, C3PO's critical layers and position: a free bias on the router logits
reaches any routing distribution there, so this is C3PO's label-oracle ω). The control fits δ to
another problem of the same family (the problem five places on, in the stratified list) and decodes
this problem under it: what a bias can dictate without knowing the answer. Prints greedy, oracle and
control accuracy per family with the problems fixed and broken. Run from the repository root (validation only):
``.venv/bin/python docs/experiments/mix_headroom.py --problems 100 --scope all``.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence

import torch

import moesteer
from moesteer.evals.tasks import get_task
from moesteer.routing import Bias, Scoped
from moesteer.sampling import SamplingParams


def fit_biases(
    lm, prompts: Sequence[str], targets: Sequence[str], scope: str, steps: int, lr: float, layers: Sequence[int]
) -> torch.Tensor:
    """δ ``[problems, layers, experts]`` minimising each problem's gold-target cross-entropy."""
    delta = torch.zeros(len(prompts), len(layers), lm.model.config.num_experts, requires_grad=True)
    optimizer = torch.optim.Adam([delta], lr=lr)
    for _ in range(steps):
        policy = _policy({layer: delta[:, j] for j, layer in enumerate(layers)}, scope)
        loss = lm.engine.loss(list(prompts), list(targets), policy, reduction="none").sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return delta.detach()


def _policy(biases: dict, scope: str):
    return Bias(biases) if scope == "all" else Scoped(Bias(biases), scope)


def decode(
    lm, task, prompts: Sequence[str], delta: torch.Tensor | None, scope: str, layers: Sequence[int]
) -> list[str]:
    """Greedy completions, each under its own row of ``delta`` (``None``: the model's own routing)."""
    sampling = SamplingParams(max_tokens=task.max_tokens, stop=task.stop)
    if delta is None:
        return [c.text for c in lm.generate(list(prompts), sampling=sampling)]
    policies = [_policy({layer: row[j] for j, layer in enumerate(layers)}, scope) for row in delta]
    return [c.text for c in lm.generate(list(prompts), policies, sampling=sampling)]


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mix")
    parser.add_argument("--task", default="mix_s1")
    parser.add_argument("--problems", type=int, default=100)
    parser.add_argument("--scope", choices=("all", "last_prompt"), default="all")
    parser.add_argument("--last-layers", type=int, default=None, help="bias only the last N MoE layers")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--batch", type=int, default=25)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    lm, task = moesteer.load(args.model), get_task(args.task)
    layers = lm.moe_layers[-args.last_layers :] if args.last_layers else lm.moe_layers
    records = task.load("validation")[: args.problems]
    prompts = [task.prompt(r) for r in records]
    others = [records[(i + 5) % len(records)] for i in range(len(records))]  # same family, another problem
    correct: dict[str, list[bool]] = {"greedy": [], "oracle": [], "control": []}
    for start in range(0, len(records), args.batch):
        chunk = slice(start, start + args.batch)
        greedy = decode(lm, task, prompts[chunk], None, args.scope, layers)
        runs = {"oracle": [r["target"] for r in records[chunk]], "control": [r["target"] for r in others[chunk]]}
        texts = {"greedy": greedy}
        for name, targets in runs.items():
            delta = fit_biases(lm, prompts[chunk], targets, args.scope, args.steps, args.lr, layers)
            texts[name] = decode(lm, task, prompts[chunk], delta, args.scope, layers)
        for name, completions in texts.items():
            correct[name] += [task.score(t, r) for t, r in zip(completions, records[chunk], strict=True)]
        print(f"{start + len(greedy)}/{len(records)}", {k: sum(v) for k, v in correct.items()}, flush=True)
    families = sorted({r["family"] for r in records})
    summary = {
        "model": args.model,
        "task": args.task,
        "problems": len(records),
        "scope": args.scope,
        "layers": list(layers),
        "steps": args.steps,
        "lr": args.lr,
        **{name: round(sum(v) / len(v), 4) for name, v in correct.items()},
        "fixed_broken": {
            name: [
                sum(o and not g for o, g in zip(correct[name], correct["greedy"], strict=True)),
                sum(g and not o for o, g in zip(correct[name], correct["greedy"], strict=True)),
            ]
            for name in ("oracle", "control")
        },
        "by_family": {
            f: {
                name: round(
                    sum(ok for ok, r in zip(v, records, strict=True) if r["family"] == f)
                    / sum(r["family"] == f for r in records),
                    4,
                )
                for name, v in correct.items()
            }
            for f in families
        },
    }
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
