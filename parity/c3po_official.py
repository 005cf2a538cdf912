"""C3PO parity with the paper's own code (github.com/tianyi-lab/C3PO) on a tiny random OLMoE.

Checks moesteer's kernel-regression C3PO, configured as the released code's rule
(``surrogate='kernel', kernel='linear', alpha=0, k=3, layers=5, where='last', max_similarity=None``),
against ``re_infer_case`` of the repository's ``olmoe_optimizer.py`` (transformers 4.49, with the
repository's ``olmoe_modeling.py`` in place of transformers' ``modeling_olmoe.py``, as its README
instructs) on a random OLMoE with 64 experts (their code hard-codes 64), top-8, 6 decoder layers (so
the last 5 are the critical ones), fp32, eager attention. For each test question it compares

* the reference pathways ω_j (last-token router distributions, theirs from ``extract_routing_info``,
  ours from ``moesteer.c3po.references.last_token_routing``), to 1e-5: the two transformers
  versions' fp32 forwards differ by rounding (~1e-8 in the hidden states), which the tiny model's
  large router logits (~30) turn into ~1e-6 in the probabilities. Both sides' references then hold
  the same ω_j (ours, written to a file their side reads), so that the re-mix is compared on
  identical inputs;
* the neighbours chosen (k = 3) and the re-mixed ω of each critical layer (max |Δω|, bound 1e-6);
* the prompt ids their code feeds ``model.generate`` (their instruction prefix + the question: the
  text is read from their run, not copied here) and the greedy continuation, ``NEW_TOKENS`` new
  tokens, up to and including EOS (their ``generate`` stops there; so does moesteer's by default);
* as a check of the model itself, the unsteered greedy continuations.

Similarities are given, not computed: the released code embeds with SentenceTransformer
('all-MiniLM-L6-v2'), a model download that this check must not depend on, and which would only
test the embedding model, not C3PO. Each test question gets fixed cosine similarities s_j to the
references: both sides see unit embeddings built so that cos(query, ref_j) = s_j (query = e0,
ref_j = s_j e0 + sqrt(1 - s_j²) e_j). Their side is handed an embedder object whose ``encode`` returns
these vectors (``re_infer_case`` takes the embedder as an argument) and keeps their own
``util.cos_sim``; ours is a ``ReferenceSet`` in memory with these embeddings. Nothing of their code
is copied: their module is imported from ``--checkout``. Needs network once::

    python3 -m venv /tmp/c3povenv
    /tmp/c3povenv/bin/pip install torch==2.13.0 transformers==4.49.0
    printf 'torch==2.13.0\\ntransformers==4.49.0\\n' > /tmp/c3po-constraints.txt
    /tmp/c3povenv/bin/pip install -c /tmp/c3po-constraints.txt sentence-transformers==3.4.1 \\
        fvcore==0.1.5.post20221221 tqdm
    git clone https://github.com/tianyi-lab/C3PO /tmp/C3PO
    OMP_NUM_THREADS=1 .venv/bin/python parity/c3po_official.py --checkout /tmp/C3PO --python /tmp/c3povenv/bin/python
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import subprocess
import sys
import tempfile
from pathlib import Path

QUESTIONS = [
    "Which gas do green plants take in from the air? A. oxygen B. carbon dioxide C. helium D. neon",
    "What makes a compass needle point north? A. wind B. gravity C. the magnetic field of Earth D. heat",
    "Which of these is a mammal? A. shark B. frog C. eagle D. whale",
]
REFERENCES = [
    "Plants make food from sunlight. What gas do they release? A. oxygen B. argon C. methane D. ozone",
    "What force pulls objects toward Earth? A. friction B. gravity C. magnetism D. tension",
    "Which animal lays eggs? A. dog B. cow C. chicken D. horse",
    "What is the boiling point of water at sea level? A. 50 C B. 100 C C. 150 C D. 200 C",
    "Which planet is closest to the Sun? A. Venus B. Earth C. Mars D. Mercury",
]
SIMILARITIES = [  # cos(question t, reference j), given (see the docstring)
    [0.81, 0.62, 0.55, 0.30, 0.12],
    [0.25, 0.90, 0.47, 0.71, 0.05],
    [0.40, 0.33, 0.86, 0.58, 0.64],
]
K, CRITICAL, EXPERTS, TOP_K, LAYERS = 3, 5, 64, 8, 6
SEED = 3  # a random model whose greedy output C3PO changes on each of the three questions
NEW_TOKENS = 32
OMEGA_TOLERANCE = 1e-6
PATHWAY_TOLERANCE = 1e-5  # two transformers versions' fp32 forwards (see the docstring)
PATHWAYS = "c3po-reference-pathways.json"


def unit_embeddings(similarities: list[float]):
    """``(query [D], keys [N, D])`` float32 unit vectors with cos(query, keys[j]) = similarities[j]."""
    import torch

    n = len(similarities)
    query = torch.zeros(n + 1, dtype=torch.float64)
    query[0] = 1.0
    keys = torch.zeros(n, n + 1, dtype=torch.float64)
    for j, s in enumerate(similarities):
        keys[j, 0], keys[j, j + 1] = s, math.sqrt(1.0 - s * s)
    return query.float(), keys.float()


def official_side(checkout: str, model_dir: str) -> None:
    """In the throwaway venv: run their ``re_infer_case`` on QUESTIONS and print what it did as JSON."""
    import torch
    from safetensors.torch import load_file

    # Their README copies olmoe_modeling.py over transformers' modeling_olmoe.py; load it in its place.
    name = "transformers.models.olmoe.modeling_olmoe"
    spec = importlib.util.spec_from_file_location(name, Path(checkout) / "olmoe_modeling.py")
    patched = importlib.util.module_from_spec(spec)
    sys.modules[name] = patched
    spec.loader.exec_module(patched)
    sys.path.insert(0, checkout)
    import olmoe_optimizer as official  # patches OlmoeSparseMoeBlock.forward on import
    from transformers import OlmoeConfig, OlmoeForCausalLM, PreTrainedTokenizerFast

    assert official.OlmoeSparseMoeBlock is patched.OlmoeSparseMoeBlock
    c = json.loads((Path(model_dir) / "config.json").read_text())
    assert c["head_dim"] == c["hidden_size"] // c["num_attention_heads"]
    config = OlmoeConfig(
        vocab_size=c["vocab_size"],
        hidden_size=c["hidden_size"],
        intermediate_size=c["intermediate_size"],
        num_hidden_layers=c["num_hidden_layers"],
        num_attention_heads=c["num_attention_heads"],
        num_key_value_heads=c["num_key_value_heads"],
        max_position_embeddings=c["max_position_embeddings"],
        rms_norm_eps=c["rms_norm_eps"],
        rope_theta=c["rope_parameters"]["rope_theta"],
        attention_bias=c["attention_bias"],
        clip_qkv=c["clip_qkv"],
        num_experts=c["num_experts"],
        num_experts_per_tok=c["num_experts_per_tok"],
        norm_topk_prob=c["norm_topk_prob"],
        tie_word_embeddings=c["tie_word_embeddings"],
        pad_token_id=c["pad_token_id"],
        bos_token_id=c["bos_token_id"],
        eos_token_id=c["eos_token_id"],
    )
    config._attn_implementation = "eager"
    model = OlmoeForCausalLM(config).eval()
    missing, unexpected = model.load_state_dict(load_file(str(Path(model_dir) / "model.safetensors")), strict=False)
    assert not unexpected and not missing, (missing, unexpected)
    specials = json.loads((Path(model_dir) / "tokenizer_config.json").read_text())
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_file=str(Path(model_dir) / "tokenizer.json"),
        **{k: specials[k] for k in ("bos_token", "eos_token", "pad_token", "unk_token")},
    )

    calls = []  # (input ids, output ids) of every model.generate their code makes
    generate = model.generate

    def recording_generate(*args, **kwargs):
        out = generate(*args, **kwargs)
        calls.append((kwargs["input_ids"][0].tolist(), out[0].tolist()))
        return out

    model.generate = recording_generate

    def routing(text: str) -> dict:
        return official.extract_routing_info(text, model, tokenizer, max_length=len(tokenizer(text).input_ids) + 1)

    # Their own reference pathways are reported; the references hold the given ones (see the docstring).
    given = json.loads((Path(model_dir) / PATHWAYS).read_text())
    references, reference_routing = {}, []
    for j, text in enumerate(REFERENCES):
        info = routing(text)
        layers = info["last_token_routing"]["layers"]
        assert [layer["layer"] for layer in layers] == list(range(len(given[j])))
        reference_routing.append(
            [[layer["routing_weights"][f"expert_{e}"] for e in range(EXPERTS)] for layer in layers]
        )
        for layer, omega in zip(layers, given[j], strict=True):
            layer["routing_weights"] = {f"expert_{e}": w for e, w in enumerate(omega)}
        references[f"ref{j}"] = {"input_text": text, "correct_answer": "A", **info}

    class GivenEmbedder:
        """``encode`` of the texts re_infer_case embeds: the vectors of the given similarities."""

        def __init__(self, similarities):
            query, keys = unit_embeddings(similarities)
            self.table = {q: key for q, key in zip(REFERENCES, keys, strict=True)}
            self.query = query

        def encode(self, texts, convert_to_tensor=True):
            assert convert_to_tensor
            if isinstance(texts, str):
                return self.query
            return torch.stack([self.table[t] for t in texts])

    out = []
    for question, similarities in zip(QUESTIONS, SIMILARITIES, strict=True):
        case = {"input_text": question, "correct_answer": "A", "model_answer": "A", **routing(question)}
        before = len(calls)
        with torch.no_grad():
            result = official.re_infer_case(
                case, references, GivenEmbedder(similarities), model, tokenizer, max_length=NEW_TOKENS
            )
        assert result is not None and len(calls) == before + 1, "re_infer_case did not generate exactly once"
        assert result["custom_routing_used"], "re_infer_case set no custom routing weights"
        assert all(layer.mlp.custom_routing_weights is None for layer in model.model.layers)
        prompt_ids, output = calls[-1]
        with torch.no_grad():
            plain = generate(input_ids=torch.tensor([prompt_ids]), max_new_tokens=NEW_TOKENS)[0].tolist()
        out.append(
            {
                "prompt_ids": prompt_ids,
                "prompt": tokenizer.decode(prompt_ids),
                "neighbours": [[n["case_id"], n["similarity"]] for n in result["neighbors"]],
                "omega": {
                    str(layer["layer"]): [layer["routing_weights"][f"expert_{e}"] for e in range(EXPERTS)]
                    for layer in result["updated_routing_target_layers"]
                },
                "tokens": output[len(prompt_ids) :],
                "plain": plain[len(prompt_ids) :],
            }
        )
    print(json.dumps({"reference_routing": reference_routing, "questions": out}))


def up_to_eos(tokens: list[int], eos: int) -> list[int]:
    """``tokens`` cut after the first EOS (kept), as HF's generate stops there for one sequence."""
    return tokens[: tokens.index(eos) + 1] if eos in tokens else tokens


def first_difference(a: list[int], b: list[int]) -> int | None:
    if a == b:
        return None
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkout", required=True, help="a clone of github.com/tianyi-lab/C3PO")
    parser.add_argument("--python", required=True, help="python of a venv with transformers==4.49.0")
    parser.add_argument("--official-side", metavar="MODEL_DIR", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.official_side:
        official_side(args.checkout, args.official_side)
        return

    import torch

    import moesteer
    from moesteer.c3po.references import Manifest, Reference, ReferenceSet, last_token_routing
    from moesteer.c3po.retrieval import neighbours
    from moesteer.routing import Scoped
    from moesteer.sampling import SamplingParams
    from moesteer.strategies.c3po import C3PO
    from moesteer.strategies.combinators import WithPolicy
    from moesteer.strategy import Plain
    from moesteer.testing import save_tiny

    with tempfile.TemporaryDirectory() as tmp:
        sizes = {"num_experts": EXPERTS, "num_experts_per_tok": TOP_K, "num_hidden_layers": LAYERS}
        model_dir = str(save_tiny(Path(tmp) / "tiny-olmoe", "olmoe", seed=SEED, **sizes))
        lm = moesteer.load(model_dir)
        engine = lm.engine
        (eos,) = engine.eos_ids
        routing = torch.stack([last_token_routing(engine, q) for q in REFERENCES]).float()  # [N, L, E]
        (Path(model_dir) / PATHWAYS).write_text(json.dumps(routing.tolist()))
        command = [args.python, __file__, "--checkout", args.checkout, "--python", args.python]
        official_out = subprocess.run([*command, "--official-side", model_dir], capture_output=True, text=True)
        if official_out.returncode != 0:
            sys.exit(official_out.stderr)
        official = json.loads(official_out.stdout.strip().splitlines()[-1])
        routing_diff = float((routing - torch.tensor(official["reference_routing"])).abs().max())
        strategy = C3PO(
            refs="(in memory)", surrogate="kernel", alpha=0.0, kernel="linear", max_similarity=None, k=K,
            layers=CRITICAL, where="last",
        )  # fmt: skip
        prompts, policies, rows, ok = [], [], [], routing_diff <= PATHWAY_TOLERANCE
        for t, (question, theirs) in enumerate(zip(QUESTIONS, official["questions"], strict=True)):
            prompt = theirs["prompt"]
            same_prompt = prompt.endswith(question) and engine.encode(prompt) == theirs["prompt_ids"]
            query, keys = unit_embeddings(SIMILARITIES[t])
            manifest = Manifest(
                model=lm.name, model_type="olmoe", moe_layers=tuple(lm.moe_layers), num_experts=EXPERTS,
                embedding_model="given similarities", embedding_dim=len(query), task="parity", split="given",
                count=len(REFERENCES), attempted=len(REFERENCES),
            )  # fmt: skip
            refs = ReferenceSet(
                manifest, tuple(Reference(f"ref{j}", q, "A") for j, q in enumerate(REFERENCES)), keys, routing
            )
            found = neighbours(query, refs.embeddings, strategy.neighbourhood(), strategy.max_similarity)
            same_neighbours = [f"ref{int(i)}" for i in found.index] == [n[0] for n in theirs["neighbours"]]
            (policy,) = strategy.policies(engine, refs, [prompt], query[None])
            ours = {str(layer): omega for layer, omega in policy.policy.values.items()}
            assert policy.where == "last", f"moesteer re-mixes at {policy.where!r}, the released code at 'last'"
            assert set(ours) == set(theirs["omega"]), (
                f"critical layers: ours {set(ours)}, theirs {set(theirs['omega'])}"
            )
            delta = max(float((ours[k] - torch.tensor(theirs["omega"][k])).abs().max()) for k in ours)
            ok &= same_prompt and same_neighbours and delta <= OMEGA_TOLERANCE
            prompts.append(prompt)
            policies.append(policy)
            rows.append((same_prompt, same_neighbours, delta, sorted(int(k) for k in ours)))
        sampling = SamplingParams(max_tokens=NEW_TOKENS)
        steered = lm.generate(prompts, [WithPolicy(Plain(), p) for p in policies], sampling)
        plain = lm.generate(prompts, Plain(), sampling)
        # Sensitivity: the same ω at the last prompt token only (moesteer's default scope) instead.
        prompt_only = [WithPolicy(Plain(), Scoped(p.policy, "last_prompt")) for p in policies]
        last_prompt = lm.generate(prompts, prompt_only, sampling)

    print(
        "reference pathways (their extract_routing_info vs last_token_routing): "
        f"max |Δ| = {routing_diff:.2e} (bound {PATHWAY_TOLERANCE:.0e})"
    )
    for t, (theirs, ours, own, (same_prompt, same_neighbours, delta, layers)) in enumerate(
        zip(official["questions"], steered, plain, rows, strict=True)
    ):
        mine, official_tokens = up_to_eos(ours.token_ids, eos), up_to_eos(theirs["tokens"], eos)
        step = first_difference(mine, official_tokens)
        plain_step = first_difference(up_to_eos(own.token_ids, eos), up_to_eos(theirs["plain"], eos))
        ok &= step is None and plain_step is None
        chosen = ", ".join(f"{key} ({s:.2f})" for key, s in theirs["neighbours"])
        print(f"question {t}: prompt ids ({len(theirs['prompt_ids'])}) {'equal' if same_prompt else 'DIFFER'}")
        print(f"  neighbours {chosen}: {'same' if same_neighbours else 'DIFFERENT'}; critical layers {layers}")
        print(f"  max |Δω| = {delta:.2e} (bound {OMEGA_TOLERANCE:.0e})")
        verdict = f"equal ({len(mine)} tokens)" if step is None else f"DIFFER from step {step}"
        print(f"  C3PO greedy tokens: {verdict}; unsteered: {'equal' if plain_step is None else 'DIFFER'}")
        print(f"  steering changed the greedy output: {mine != up_to_eos(own.token_ids, eos)}")
    scope = sum(
        up_to_eos(o.token_ids, eos) == up_to_eos(t["tokens"], eos)
        for o, t in zip(last_prompt, official["questions"], strict=True)
    )
    print(f"with where='last_prompt' instead of 'last': {scope}/{len(QUESTIONS)} questions equal to theirs")
    print("PASS" if ok else "FAIL")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
