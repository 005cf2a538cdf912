"""SCMoE parity with the paper's own code (github.com/DavidFanzz/SCMoE) on a tiny random Mixtral.

The official decoding runs in a throwaway venv with transformers 4.40 and the repository's patched
``modeling_mixtral.py`` (installed into that venv's transformers, as its README instructs); moesteer
runs here. Greedy, α=0.1, β=0.5, strong = top-2, weak = rank 3 only (``--student_routed_tok 2``,
the README's Mixtral example), EOS banned (their ``early_stop=False``). Needs network once::

    python3 -m venv /tmp/scvenv && /tmp/scvenv/bin/pip install torch==2.13.0 transformers==4.40.0
    git clone https://github.com/DavidFanzz/SCMoE /tmp/SCMoE
    .venv/bin/python parity/scmoe_official.py --checkout /tmp/SCMoE --python /tmp/scvenv/bin/python
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

PROMPTS = [[5, 17, 42, 9, 77, 31, 12], [8, 64, 23, 99, 3, 50, 11, 40, 41], [70, 71]]
NEW_TOKENS = 24


def official_side(checkout: str, model_dir: str) -> None:
    """In the throwaway venv: decode PROMPTS with the official ``scmoe`` and print the tokens."""
    import types

    import torch
    from safetensors.torch import load_file
    from transformers.models.mixtral.configuration_mixtral import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralForCausalLM

    sys.path.insert(0, str(Path(checkout) / "decodingmethod"))
    from moe_utils import scmoe

    c = json.loads((Path(model_dir) / "config.json").read_text())
    config = MixtralConfig(
        vocab_size=c["vocab_size"],
        hidden_size=c["hidden_size"],
        intermediate_size=c["intermediate_size"],
        num_hidden_layers=c["num_hidden_layers"],
        num_attention_heads=c["num_attention_heads"],
        num_key_value_heads=c["num_key_value_heads"],
        num_local_experts=c["num_local_experts"],
        num_experts_per_tok=c["num_experts_per_tok"],
        rope_theta=c["rope_parameters"]["rope_theta"],
        rms_norm_eps=c["rms_norm_eps"],
        max_position_embeddings=c["max_position_embeddings"],
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        sliding_window=None,
    )
    config._attn_implementation = "eager"
    model = MixtralForCausalLM(config).eval()
    missing, unexpected = model.load_state_dict(load_file(str(Path(model_dir) / "model.safetensors")), strict=False)
    assert not unexpected and all("rotary" in m for m in missing), (missing, unexpected)
    tokenizer = types.SimpleNamespace(eos_token_id=2, pad_token_id=0)
    out = []
    for ids in PROMPTS:
        x = torch.tensor([ids])
        seq = scmoe(
            model, 1.0, 1.0, tokenizer, x, torch.ones_like(x), max_new_tokens=NEW_TOKENS, alpha=0.1, beta=0.5,
            teacher_routed_tok=[0, 1], teacher_num_experts_per_tok=2, student_routed_tok=[2],
            student_num_experts_per_tok=1,
        )  # fmt: skip
        out.append(seq[0, len(ids) :].tolist())
    print(json.dumps(out))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkout", required=True, help="a clone of github.com/DavidFanzz/SCMoE")
    parser.add_argument("--python", required=True, help="python of a venv with transformers==4.40.0")
    parser.add_argument("--official-side", metavar="MODEL_DIR", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.official_side:
        official_side(args.checkout, args.official_side)
        return

    import moesteer
    from moesteer.sampling import SamplingParams
    from moesteer.strategies.scmoe import SCMoE
    from moesteer.strategy import Plain
    from moesteer.testing import save_tiny

    site = subprocess.run(
        [args.python, "-c", "import transformers, os; print(os.path.dirname(transformers.__file__))"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    shutil.copy(Path(args.checkout) / "modeling_models/Mixtral/modeling_mixtral.py", Path(site) / "models/mixtral")
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = str(save_tiny(Path(tmp) / "tiny-mixtral", "mixtral"))
        command = [args.python, __file__, "--checkout", args.checkout, "--python", args.python]
        official_out = subprocess.run([*command, "--official-side", model_dir], capture_output=True, text=True)
        if official_out.returncode != 0:
            sys.exit(official_out.stderr)
        official = json.loads(official_out.stdout.strip().splitlines()[-1])
        lm = moesteer.load(model_dir)
        ours = lm.generate(PROMPTS, SCMoE(beta=0.5, alpha=0.1, ban_eos=True), SamplingParams(max_tokens=NEW_TOKENS))
        plain = lm.generate(PROMPTS, Plain(), SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True))
    same = [o.token_ids == r for o, r in zip(ours, official, strict=True)]
    steered = [o.token_ids != p.token_ids for o, p in zip(ours, plain, strict=True)]
    print(f"identical to the official SCMoE: {sum(same)}/{len(same)} prompts x {NEW_TOKENS} tokens")
    print(f"different from plain greedy: {sum(steered)}/{len(steered)}")
    sys.exit(0 if all(same) else 1)


if __name__ == "__main__":
    main()
