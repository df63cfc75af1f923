"""SFT: supervised fine-tuning on the chosen responses (no preference signal, no reference).

    loss = -lp(y_w) / |y_w|                                                     # (B,)

i.e. the per-token negative log-likelihood of the chosen response, averaged per example; the loop then
averages over examples. Implied rewards (for margins/accuracies only): lp(y) / |y|.
"""

from __future__ import annotations

from dataclasses import dataclass

from prefopt.objectives.base import (
    Extras,
    Objective,
    ObjectiveConfig,
    ObjectiveOutput,
    PairLogps,
    Requirements,
)


@dataclass
class SFTConfig(ObjectiveConfig):
    """SFT has no hyperparameters and needs no reference."""

    requires = Requirements(reference=False)


def loss(policy: PairLogps, reference: PairLogps | None, extras: Extras) -> ObjectiveOutput:
    """Per-token NLL of y_w; log-probs and token counts (B,) -> losses (B,). `reference` is ignored."""
    chosen = policy.chosen / extras.chosen_tokens  # (B,) mean token log-prob of y_w
    rejected = policy.rejected / extras.rejected_tokens  # (B,)
    return ObjectiveOutput(losses=-chosen, chosen_rewards=chosen.detach(), rejected_rewards=rejected.detach())


OBJECTIVE = Objective(
    loss=loss, config=SFTConfig, description="SFT: -lp(y_w) / |y_w| (chosen responses only)"
)
