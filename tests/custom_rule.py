"""A routing rule as a user writes it, in their own module (vLLM's workers import it by name)."""

from dataclasses import dataclass

from torch import Tensor

from moesteer.routing import Primitive, RouterCall, RouterSite


@dataclass(frozen=True)
class Nudge(Primitive):
    """Raise one expert's router logit by ``amount`` at every MoE layer."""

    expert: int
    amount: float = 4.0

    def on_logits(self, call: RouterCall) -> None:
        logits = call.logits.clone()
        logits[:, self.expert] += self.amount
        call.logits = logits


def nudge_expert_one(logits: Tensor, site: RouterSite) -> Tensor:
    """The same rule as a plain function: expert 1 up by 4 on every router call."""
    logits = logits.clone()
    logits[:, 1] += 4.0
    return logits
