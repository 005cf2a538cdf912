"""Prompt tokenization shared by every backend: text (optionally in the chat template) or token ids."""

from __future__ import annotations

from collections.abc import Sequence


def encode_prompt(
    tokenizer, text: str | Sequence[int], *, chat: bool = False, special: bool = True, model_name: str = "model"
) -> list[int]:
    """Token ids of ``text``; ids pass through. ``chat`` wraps it as one user turn of the chat template."""
    if not isinstance(text, str):
        return [int(t) for t in text]
    if tokenizer is None:
        raise ValueError("this model has no tokenizer; pass token ids instead of strings")
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(f"the tokenizer of {model_name} has no chat template; drop --chat")
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
        )
        special = False
    return tokenizer(text, add_special_tokens=special)["input_ids"]
