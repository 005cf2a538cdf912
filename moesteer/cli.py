"""The ``moesteer`` command line: a thin layer over the Python API.

User mistakes (bad model, policy or parameter) print one line and exit with code 2, no traceback.
"""

from __future__ import annotations

import sys

import click
import torch

from moesteer.lm import LM, load
from moesteer.routing import Policy, Ranks, TopK
from moesteer.steer import steer

DEMO_POLICIES: dict[str, Policy | None] = {"plain": None, "top1": TopK(1), "rank2": Ranks(2)}


def _fail(message: str) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(2)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="moesteer")
def main() -> None:
    """Steer Mixture-of-Experts language models at test time through their routers."""


def _demo_model(model: str | None) -> tuple[LM, str]:
    """The embedded arith model (or ``--model``); a tiny random OLMoE if no weights are shipped yet."""
    try:
        lm = load(model)
    except FileNotFoundError:
        from moesteer.models.tiny import tiny_model

        click.echo("embedded model not found; using a tiny random-init OLMoE", err=True)
        lm = load(tiny_model("olmoe"))
        lm.name = "tiny-random-olmoe"
        return lm, ""
    from moesteer.evals.tasks import get_task

    problem = get_task("arith").split("test")[0]
    return lm, problem["prompt"]


@main.command()
@click.option("--model", default=None, help="Hub id or local path (default: the embedded tiny MoE).")
@click.option("--max-tokens", default=48, show_default=True, help="Tokens to generate per policy.")
def demo(model: str | None, max_tokens: int) -> None:
    """Route one prompt under plain routing, TopK(1) and Ranks(2); print experts per layer and text.

    \b
    Example:
      moesteer demo
      moesteer demo --model allenai/OLMoE-1B-7B-0924
    """
    try:
        lm, prompt = _demo_model(model)
    except (OSError, ValueError) as err:
        _fail(str(err))
    if lm.tokenizer is not None:
        inputs = lm.tokenizer(prompt, return_tensors="pt")
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
    else:
        ids = torch.tensor([[5, 17, 42, 9, 77, 31, 12]])
        mask = torch.ones_like(ids)
    click.echo(f"model: {lm.name} ({lm.adapter.model_type}, MoE layers {list(lm.moe_layers)})")
    click.echo(f"prompt: {prompt!r}" if prompt else f"prompt ids: {ids.tolist()[0]}")
    for name, policy in DEMO_POLICIES.items():
        with steer(lm.model, policy, trace=True) as handle:
            out = lm.model.generate(
                ids,
                attention_mask=mask,
                max_new_tokens=max_tokens,
                do_sample=False,
                pad_token_id=lm.model.config.pad_token_id,
                output_router_logits=False,
            )
        new = out[0, ids.shape[1] :]
        text = lm.tokenizer.decode(new, skip_special_tokens=True) if lm.tokenizer is not None else str(new.tolist())
        click.echo(f"\n[{name}] {policy!r}" if policy is not None else f"\n[{name}] the model's own routing")
        load_ = handle.trace.expert_load(handle.num_experts)
        for row, layer in enumerate(handle.trace.layers()):
            prefill = next(r for r in handle.trace.records if r.layer == layer)
            first_token = [e for e in prefill.experts[0, -1].tolist() if e >= 0]
            top = load_[row].topk(3)
            busiest = ", ".join(f"e{int(e)}:{int(c)}" for c, e in zip(top.values, top.indices, strict=True))
            click.echo(f"  layer {layer}: last prompt token -> experts {first_token}; busiest {busiest}")
        click.echo(f"  output: {text.strip()!r}")


if __name__ == "__main__":
    main()
