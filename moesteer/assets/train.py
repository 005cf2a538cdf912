"""Train an embedded tiny MoE (OLMoE architecture) from scratch on CPU.

    python -m moesteer.assets.train --out moesteer/assets/tiny-arith-moe
    python -m moesteer.assets.train --recipe mix --out moesteer/assets/tiny-mix-moe \
        --checkpoint runs/mix/checkpoint.pt --log runs/mix/train.log

Recipes: ``arith`` (the default model, loss on answers only), ``mix`` and ``mix3`` (revisions 2
and 3 of the ``mix`` test bed's five families in three formats, loss on every token). With
``--checkpoint`` the run saves its state every ``checkpoint_every`` steps and, started again,
continues from it (the data stream is deterministic, so a resumed run trains on the same batches
as an uninterrupted one).

Deterministic for a given seed, step count and thread count: the budget is a number of
optimizer steps, never wall time. The defaults reproduce the shipped model; they use one
thread because two threads on a shared 2-core machine slow down badly under contention.
Writes the bf16 model, a character-level tokenizer, a model card (``README.md``, see
:mod:`.arith_card` and :mod:`.mix_card`) and ``training_log.json`` with the final loss and the
measured metrics.
"""

from __future__ import annotations

import argparse
import json
import math
import string
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import transformers
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from tqdm import tqdm
from transformers import GenerationConfig, OlmoeConfig, OlmoeForCausalLM, PreTrainedTokenizerFast
from transformers.models.olmoe.modeling_olmoe import load_balancing_loss_func

from moesteer.assets import arith_card, checkpoint, mix_card
from moesteer.assets.arith_card import MAX_NEW_TOKENS, TASK
from moesteer.evals.tasks import arith
from moesteer.evals.tasks.mix import splits as mix

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>")
CHARACTERS = "0123456789 +-*=?#:.,\nQA" + string.ascii_lowercase
MIX_CHARACTERS = CHARACTERS + ";[]>)&|^"
"""The ``mix`` formats' characters: ``arith``'s, then the compact format's symbols (same ids)."""


@dataclass(frozen=True)
class ModelSpec:
    """OLMoE architecture of the embedded model."""

    hidden: int = 128
    layers: int = 4
    heads: int = 4
    experts: int = 16
    top_k: int = 2
    intermediate: int = 256
    vocab: int = 64
    aux_loss_coef: float = 0.01
    balance_per_layer: bool = False
    """Balance each layer's load (the mean over layers of the Switch loss) instead of HF OLMoE's
    pooled loss, which counts all layers' assignments together and so lets one layer starve
    experts that another layer uses."""


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings (AdamW, linear warmup then cosine to ``min_lr_ratio``)."""

    seed: int = 0
    steps: int = 1800
    batch: int = 16
    seq_len: int = 256
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    threads: int = 1
    checkpoint_every: int = 50


TINY_MODEL = ModelSpec(hidden=32, layers=2, heads=2, experts=4, intermediate=32)
"""A few-second configuration for tests (``--tiny``)."""


@dataclass(frozen=True)
class Recipe:
    """A model shape, its optimisation and its data: ``bed`` names a revision of the ``mix`` test
    bed (:data:`~moesteer.evals.tasks.mix.splits.BEDS`) whose documents train every token;
    ``None`` trains on the ``arith`` answers only."""

    name: str
    model: ModelSpec
    train: TrainConfig
    characters: str
    bed: str | None


RECIPES = {
    "arith": Recipe("arith", ModelSpec(), TrainConfig(), CHARACTERS, bed=None),
    "mix": Recipe(
        "mix",
        ModelSpec(layers=8, experts=64, top_k=8, intermediate=48, aux_loss_coef=0.02),
        TrainConfig(steps=1800),
        MIX_CHARACTERS,
        bed="mix",
    ),
    "mix3": Recipe(
        "mix3",
        ModelSpec(layers=8, experts=64, top_k=8, intermediate=48, aux_loss_coef=0.02, balance_per_layer=True),
        TrainConfig(steps=1800),
        MIX_CHARACTERS,
        bed="mix3",
    ),
}


def build_tokenizer(characters: str = CHARACTERS) -> PreTrainedTokenizerFast:
    """Character-level WordLevel tokenizer; encoding prepends ``<bos>``, padding is on the left."""
    vocab = {token: i for i, token in enumerate([*SPECIAL_TOKENS, *characters])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), "isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A <bos> $B:1", special_tokens=[("<bos>", vocab["<bos>"])]
    )
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        padding_side="left",
        model_max_length=512,
    )


def build_model(spec: ModelSpec, tokenizer: PreTrainedTokenizerFast) -> OlmoeForCausalLM:
    """A randomly initialised OLMoE that returns router logits (for the aux loss) in training."""
    assert len(tokenizer) <= spec.vocab
    config = OlmoeConfig(
        vocab_size=spec.vocab,
        hidden_size=spec.hidden,
        intermediate_size=spec.intermediate,
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads,
        num_key_value_heads=spec.heads,
        num_experts=spec.experts,
        num_experts_per_tok=spec.top_k,
        norm_topk_prob=False,
        router_aux_loss_coef=spec.aux_loss_coef,
        output_router_logits=True,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return OlmoeForCausalLM(config)


def packed_batches(
    tokenizer: PreTrainedTokenizerFast, config: TrainConfig
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless ``(input_ids, labels)`` of shape ``[batch, seq_len]``.

    Examples ``<bos> prompt target <eos>`` are concatenated and cut into rows; only the target
    and ``<eos>`` carry loss (prompt labels are -100).
    """
    vocab = tokenizer.get_vocab()
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    size = config.batch * config.seq_len
    stream = arith.train_stream(TASK, config.seed)
    ids: list[int] = []
    labels: list[int] = []
    while True:
        while len(ids) < size:
            problem = next(stream)
            prompt = [bos] + [vocab[c] for c in problem["prompt"]]
            target = [vocab[c] for c in problem["target"]] + [eos]
            ids += prompt + target
            labels += [-100] * len(prompt) + target
        shape = (config.batch, config.seq_len)
        yield torch.tensor(ids[:size]).view(shape), torch.tensor(labels[:size]).view(shape)
        ids, labels = ids[size:], labels[size:]


def document_batches(
    tokenizer: PreTrainedTokenizerFast, config: TrainConfig, bed: mix.MixConfig = mix.BEDS["mix"]
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless ``(input_ids, labels)`` of shape ``[batch, seq_len]`` from the documents of ``bed``.

    Documents ``<bos> example\\n\\nexample ... <eos>`` are concatenated and cut into rows; every
    token carries loss (labels = input ids).
    """
    vocab = tokenizer.get_vocab()
    size = config.batch * config.seq_len
    documents = mix.train_documents(bed, config.seed)
    ids: list[int] = []
    while True:
        while len(ids) < size:
            text = mix.document_text(next(documents))
            ids += [tokenizer.bos_token_id, *(vocab[c] for c in text), tokenizer.eos_token_id]
        batch = torch.tensor(ids[:size]).view(config.batch, config.seq_len)
        yield batch, batch.clone()
        ids = ids[size:]


def lr_factor(step: int, config: TrainConfig) -> float:
    """Linear warmup, then cosine decay from 1 to ``min_lr_ratio`` at the last step."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def per_layer_balance_loss(router_logits: Sequence[torch.Tensor], config: OlmoeConfig) -> torch.Tensor:
    """Mean over layers of each layer's Switch load-balancing loss, E · Σ_e f_e · P_e (Fedus et al.
    2021, eq. 4), with f_e the layer's share of top-k assignments to expert e and P_e its mean
    router probability."""
    return torch.stack(
        [
            load_balancing_loss_func((logits,), config.num_experts, config.num_experts_per_tok)
            for logits in router_logits
        ]
    ).mean()


def train(
    model: OlmoeForCausalLM,
    batches: Iterator[tuple[torch.Tensor, torch.Tensor]],
    config: TrainConfig,
    checkpoint_path: Path | None = None,
    log_path: Path | None = None,
    balance_per_layer: bool = False,
) -> checkpoint.TrainState:
    """Train in place; returns the per-step cross-entropy and aux losses and the seconds spent.

    The aux loss is HF OLMoE's pooled one, or with ``balance_per_layer``
    :func:`per_layer_balance_loss`, at the model's ``router_aux_loss_coef`` either way.

    With ``checkpoint_path`` the state is saved every ``config.checkpoint_every`` steps and at the
    end, and a run that finds a checkpoint there continues from it (skipping the batches it
    trained on). ``log_path`` gets one line every 10 steps: step, mean losses of those steps,
    tokens per second since this process started, training seconds.
    """
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed_tokens" not in n]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2 or "embed_tokens" in n]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.lr,
        betas=(0.9, 0.95),
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, config))
    resume = checkpoint_path is not None and checkpoint_path.exists()
    state = checkpoint.load(checkpoint_path, model, optimizer, schedule) if resume else checkpoint.TrainState()
    for _ in range(state.step):
        next(batches)
    coef = model.config.router_aux_loss_coef
    log = log_path.open("a") if log_path is not None else None
    if log is not None:
        log.write(f"{'resumed at' if resume else 'started'} step {state.step} of {config.steps}\n")
    model.train()
    start, seconds_before, tokens = time.perf_counter(), state.seconds, 0
    progress = tqdm(range(state.step, config.steps), desc="train", mininterval=2.0, initial=state.step)
    for step in progress:
        input_ids, labels = next(batches)
        out = model(input_ids=input_ids, labels=labels)
        loss, aux = out.loss, out.aux_loss
        if balance_per_layer:  # swap HF's pooled aux term in out.loss for the per-layer one
            aux = per_layer_balance_loss(out.router_logits, model.config)
            loss = out.loss + coef * (aux - out.aux_loss)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        state.losses["ce"].append(out.loss.item() - coef * out.aux_loss.item())
        state.losses["aux"].append(aux.item())
        state.step, tokens = step + 1, tokens + input_ids.numel()
        state.seconds = seconds_before + time.perf_counter() - start
        last = state.step == config.steps
        if state.step % 10 == 0 or last:
            ce = state.losses["ce"][-10:]
            progress.set_postfix(loss=f"{sum(ce) / len(ce):.4f}")
            if log is not None:
                rate = tokens / (time.perf_counter() - start)
                log.write(
                    f"step {state.step} ce {sum(ce) / len(ce):.4f} aux {state.losses['aux'][-1]:.4f} "
                    f"tok/s {rate:.0f} seconds {state.seconds:.0f}\n"
                )
                log.flush()
        if checkpoint_path is not None and (state.step % config.checkpoint_every == 0 or last):
            checkpoint.save(checkpoint_path, model, optimizer, schedule, state)
    if log is not None:
        log.close()
    model.eval()
    return state


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m moesteer.assets.train", description=__doc__)
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--recipe", choices=sorted(RECIPES), default="arith", help="model and data (default arith)")
    parser.add_argument("--seed", type=int, default=TrainConfig.seed)
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps (default: the recipe's)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: the recipe's)")
    parser.add_argument("--tiny", action="store_true", help="tiny model and batch (for tests)")
    parser.add_argument("--eval-problems", type=int, default=None, help="evaluate only the first N of each split")
    parser.add_argument("--checkpoint", type=Path, default=None, help="checkpoint file: save periodically, resume")
    parser.add_argument("--log", type=Path, default=None, help="append training progress to this file")
    stage = parser.add_mutually_exclusive_group()
    stage.add_argument("--no-eval", action="store_true", help="train and save only (evaluate later)")
    stage.add_argument("--eval-only", action="store_true", help="evaluate the model in --out and rewrite its card")
    return parser.parse_args(argv)


def save_model(model: OlmoeForCausalLM, tokenizer: PreTrainedTokenizerFast, out: Path) -> None:
    """Save bf16 weights (config dtype float32: loading upcasts exactly), generation config, tokenizer."""
    out.mkdir(parents=True, exist_ok=True)
    model.config.output_router_logits = False
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
        max_new_tokens=MAX_NEW_TOKENS,
    )
    model.to(torch.bfloat16).save_pretrained(out)
    model.config.dtype = torch.float32  # stored in bf16, loaded (exactly upcast) in fp32
    model.config.save_pretrained(out)
    tokenizer.save_pretrained(out)


def training_log(recipe: Recipe, spec: ModelSpec, config: TrainConfig, args: argparse.Namespace, model, state) -> dict:
    """What the run was and how it went (the metrics are added by the evaluation)."""
    flags = "".join(f" --{flag}" for flag in ("tiny",) if getattr(args, flag))
    recipe_flag = "" if recipe.name == "arith" else f" --recipe {recipe.name}"
    window = min(100, len(state.losses["ce"]))
    return {
        "command": f"python -m moesteer.assets.train{recipe_flag} --out {args.out} --seed {config.seed} "
        f"--steps {config.steps} --threads {config.threads}{flags}",
        "recipe": recipe.name,
        "model": asdict(spec),
        "train": asdict(config),
        "task": asdict(TASK) if recipe.bed is None else repr(mix.BEDS[recipe.bed]),
        "tokenizer_size": len(build_tokenizer(recipe.characters)),
        "params_total": sum(p.numel() for p in model.parameters()),
        "params_active": sum(
            p.numel() * (spec.top_k / spec.experts if "experts" in n else 1) for n, p in model.named_parameters()
        ),
        "tokens_seen": config.steps * config.batch * config.seq_len,
        "train_seconds": round(state.seconds, 1),
        "final_loss": sum(state.losses["ce"][-window:]) / window,
        "last_step_loss": state.losses["ce"][-1],
        "last_step_aux_loss": state.losses["aux"][-1],
        "loss_curve": [
            [step, round(sum(state.losses["ce"][max(0, step - 100) : step]) / min(step, 100), 4)]
            for step in range(100, config.steps + 1, 100)
        ],
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
    }


def main(argv: Sequence[str] | None = None) -> dict:
    """Train, save, evaluate, write the card and log; returns the log."""
    args = parse_args(argv)
    recipe = RECIPES[args.recipe]
    spec = TINY_MODEL if args.tiny else recipe.model
    config = replace(
        recipe.train,
        seed=args.seed,
        steps=args.steps if args.steps is not None else recipe.train.steps,
        threads=args.threads if args.threads is not None else recipe.train.threads,
    )
    if args.tiny:
        config = replace(config, batch=4, seq_len=64, warmup_steps=min(config.warmup_steps, 2))
    torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    out: Path = args.out
    log_file = out / "training_log.json"

    if args.eval_only:
        log = json.loads(log_file.read_text())
    else:
        tokenizer = build_tokenizer(recipe.characters)
        model = build_model(spec, tokenizer)
        batches = (
            packed_batches(tokenizer, config)
            if recipe.bed is None
            else document_batches(tokenizer, config, mix.BEDS[recipe.bed])
        )
        state = train(model, batches, config, args.checkpoint, args.log, spec.balance_per_layer)
        save_model(model, tokenizer, out)
        log = training_log(recipe, spec, config, args, model, state)
        log_file.write_text(json.dumps(log, indent=2) + "\n")
    if args.no_eval:
        return log

    # the saved files, as a user loads them
    if recipe.bed is None:
        log["metrics"] = arith_card.evaluate(out, args.eval_problems)
        arith_card.write_card(out, log)
    else:
        log["metrics"] = mix_card.evaluate(out, args.eval_problems, recipe.bed)
        mix_card.write_card(out, log, recipe.bed)
    log_file.write_text(json.dumps(log, indent=2) + "\n")
    print(json.dumps({k: log[k] for k in ("final_loss", "train_seconds", "metrics")}, indent=2))
    return log


if __name__ == "__main__":
    main()
