"""``prm``: a process reward model from the hub or a local directory (Qwen2.5-Math-PRM style).

The chain is written as the PRM was trained to read it — with the tokenizer's chat template when it
has one (system prompt, the question as the user turn, the steps as the assistant turn), else
``question + "\\n" + steps`` — with ``separator_token`` after every step, and the score of step
``j`` is the softmax probability of the positive class (label 1) at its separator.
Qwen2.5-Math-PRM-7B (``*ForProcessRewardModel``, remote code: ``trust_remote_code=True``) and any
two-label ``*ForTokenClassification`` model load. Chains run in batches of ``batch_size``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch

from moesteer.verifiers.base import Verifier

DEFAULT_PRM = "Qwen/Qwen2.5-Math-PRM-7B"
SYSTEM_PROMPT = "Please reason step by step, and put your final answer within \\boxed{}."


class ProcessRewardModel(Verifier):
    name: ClassVar[str] = "prm"

    def __init__(
        self,
        path: str = DEFAULT_PRM,
        *,
        separator_token: str = "<extra_0>",
        trust_remote_code: bool = False,
        batch_size: int = 8,
        device: str = "cpu",
    ) -> None:
        from transformers import AutoConfig, AutoModel, AutoModelForTokenClassification, AutoTokenizer

        try:
            config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
            architectures = list(getattr(config, "architectures", None) or [])
            if any(a.endswith("ForProcessRewardModel") for a in architectures):
                loader = AutoModel
            elif any(a.endswith("ForTokenClassification") for a in architectures) and config.num_labels == 2:
                loader = AutoModelForTokenClassification
            else:
                raise ValueError(
                    f"{path} is not a process reward model (architectures {architectures or 'unknown'}; expected "
                    "*ForProcessRewardModel or a 2-label *ForTokenClassification)"
                )
            self.tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
            self.model = loader.from_pretrained(path, trust_remote_code=trust_remote_code).to(device).eval()
        except OSError as err:
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ValueError(f"cannot load the PRM {path!r} (no hub here? pass a local directory): {reason}") from None
        separator_ids = self.tokenizer.encode(separator_token, add_special_tokens=False)
        if len(separator_ids) != 1:
            raise ValueError(f"the PRM {path!r} has no single token for the step separator {separator_token!r}")
        self.path, self.separator_token, self.separator_id = path, separator_token, separator_ids[0]
        self.batch_size, self.device = batch_size, device

    def text(self, question: str, steps: Sequence[str]) -> str:
        """The PRM's input for one chain."""
        answer = "".join(f"{step}{self.separator_token}" for step in steps)
        if getattr(self.tokenizer, "chat_template", None):
            messages = [
                {"role": "system", "content": SYSTEM_PROMPT},
                {"role": "user", "content": question},
                {"role": "assistant", "content": answer},
            ]
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
        return f"{question}\n{answer}"

    def score(self, questions, steps, logprobs=None) -> list[list[float]]:
        out: list[list[float]] = []
        for start in range(0, len(questions), self.batch_size):
            batch = slice(start, start + self.batch_size)
            texts = [self.text(q, s) for q, s in zip(questions[batch], steps[batch], strict=True)]
            out += self._score_batch(texts, [len(s) for s in steps[batch]])
        return out

    @torch.no_grad()
    def _score_batch(self, texts: list[str], counts: list[int]) -> list[list[float]]:
        ids = [self.tokenizer.encode(t, add_special_tokens=False) for t in texts]
        width = max(len(i) for i in ids)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        input_ids = torch.tensor([i + [pad] * (width - len(i)) for i in ids], device=self.device)
        mask = torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i in ids], device=self.device)
        output = self.model(input_ids=input_ids, attention_mask=mask)
        logits = output.logits if hasattr(output, "logits") else output[0]
        positive = torch.softmax(logits.float(), dim=-1)[..., 1]
        scores = []
        for row, count in enumerate(counts):
            at = (input_ids[row] == self.separator_id) & mask[row].bool()
            values = positive[row][at].tolist()
            if len(values) != count:
                raise ValueError(
                    f"the PRM input of a {count}-step chain holds {len(values)} separator tokens; a step contains "
                    f"{self.separator_token!r}"
                )
            scores.append(values)
        return scores
