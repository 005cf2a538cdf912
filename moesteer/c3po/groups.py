"""Question groups: keys that C3PO's ``within`` restricts neighbours to (``GROUPS`` in :mod:`.retrieval`).

Each maps a question's text to its group; a group is an oracle label, since a real test question
comes with none.
"""

from __future__ import annotations


def operator_pattern(question: str) -> str:
    """The operators of an ``arith`` question in order, e.g. ``"+-*"`` for ``Q: 3 + 4 - 2 * 5 = ?``."""
    return "".join(token for token in question.split() if token in ("+", "-", "*"))
