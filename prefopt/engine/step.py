"""One forward pass over a batch of pairs: log-probs, the inputs the objective declared, the loss.

Shared by training and evaluation. `LossInputs` holds what is built once per run (cached reference
log-probs, cached auxiliary rewards, the value head); `pair_loss` never looks at the objective's name,
only at its `Requirements`.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from torch import Tensor, nn

from prefopt.data.batching import Batch
from prefopt.data.layout import Packing
from prefopt.engine.kl_estimators import NO_KL, StepView
from prefopt.models.logps import CHUNK_TOKENS, hidden_states, sequence_logps
from prefopt.models.value_head import last_prompt_hidden
from prefopt.objectives import Extras, Objective, ObjectiveConfig, ObjectiveOutput, PairLogps


@dataclass
class LossInputs:
    objective: Objective
    hparams: ObjectiveConfig
    reference_logps: Tensor | None  # (S,) per table sequence, on device
    aux_rewards: Tensor | None  # (S,) R(x, y) per table sequence, on device
    reference_model: nn.Module | None = None  # live frozen reference (token-level KL only)
    value_head: nn.Module | None = None
    kl_estimator: object = NO_KL  # a KL_ESTIMATORS part, when the objective needs a KL
    chunk_tokens: int = CHUNK_TOKENS
    aux_components: dict[str, Tensor] = field(default_factory=dict)  # name -> (S,) unweighted r_k
    packing: Packing = Packing()  # padded batch rows -> the rows each model's decoder reads
    # True while the policy's forward is the reference's (no optimizer step yet, pi_ref built from the
    # starting policy, no dropout): the reference side is then the policy's own log-probs of this very
    # pass (see `reference_side`), so step 0's margins are exactly 0 on any machine
    policy_is_reference: bool = False


def pair_loss(policy: nn.Module, batch: Batch, inputs: LossInputs, step: int, device) -> tuple[Tensor, dict]:
    """Returns the summed per-example loss (for `/ pairs in the step`) and summed per-example metrics."""
    needs = inputs.hparams.requirements()
    rows = inputs.packing.arrange(batch.rows, policy, device).to(device)
    hidden = hidden_states(policy, rows)  # (G, T, D): G rows, padded (G = R) or packed
    logps = sequence_logps(policy.get_output_embeddings(), hidden, rows, inputs.chunk_tokens)  # (R,)
    chosen, rejected = batch.chosen_rows.to(device), batch.rejected_rows.to(device)
    policy_pairs = PairLogps(logps[chosen], logps[rejected])
    row_reference = reference_side(inputs, logps, batch.sequence_ids.to(device))
    reference_pairs = PairLogps(row_reference[chosen], row_reference[rejected]) if needs.reference else None
    tokens = rows.response_tokens.float()
    extras = Extras(
        chosen_tokens=tokens[chosen],
        rejected_tokens=tokens[rejected],
        labels=batch.labels.to(device),
        step=step,
        kl=_kl(policy, hidden, logps, row_reference, rows, batch, inputs, device) if needs.kl else None,
        mismatched_logratios=_mismatched(logps, row_reference, batch, device) if needs.mismatched else None,
        aux_chosen=_rows_of(inputs.aux_rewards, batch, chosen, device) if needs.aux_reward else None,
        aux_rejected=_rows_of(inputs.aux_rewards, batch, rejected, device) if needs.aux_reward else None,
        values=_values(inputs.value_head, hidden, rows, chosen) if needs.value_head else None,
    )
    output = inputs.objective.loss(policy_pairs, reference_pairs, extras, **inputs.hparams.loss_kwargs())
    return output.losses.sum(), _metric_sums(output, policy_pairs, extras, inputs, batch, device)


def reference_side(inputs: LossInputs, policy_logps: Tensor, sequence_ids: Tensor) -> Tensor | None:
    """(R,) the reference's log-probs of the rows whose policy log-probs are `policy_logps`.

    The cached values come from one pass over the whole table in its own layout (packed or prompt-grouped
    rows), the policy's from this batch's layout; equal weights give equal log-probs only up to float
    rounding (+-1e-8 here, ties broken at random). While the policy *is* the reference, its own log-probs
    of this pass are the reference's exactly: margins are 0 and every pair a tie, as the math says."""
    if inputs.policy_is_reference:
        return policy_logps.detach()
    if inputs.reference_logps is None:
        return None
    return inputs.reference_logps[sequence_ids]


def _values(value_head, hidden: Tensor, rows, chosen: Tensor) -> Tensor:
    """V(x) (B,) from the hidden state at each pair's last prompt token (its chosen row's copy)."""
    at = rows.sequence_row[chosen], rows.sequence_start[chosen]
    return value_head(last_prompt_hidden(hidden, rows.prompt_lengths[chosen], *at))


def _rows_of(per_sequence: Tensor, batch: Batch, rows: Tensor, device) -> Tensor:
    return per_sequence[batch.sequence_ids.to(device)][rows]


def _mismatched(logps: Tensor, row_reference: Tensor, batch: Batch, device) -> Tensor:
    rows = batch.mismatched_rows.to(device)
    return logps[rows] - row_reference[rows]


def _kl(policy, hidden, logps, row_reference, rows, batch: Batch, inputs: LossInputs, device) -> Tensor:
    """(B,) estimate of KL(pi_ref(.|x) || pi_theta(.|x)) for each pair's prompt, by the run's estimator."""
    view = StepView(policy, hidden, logps, row_reference, rows, batch, inputs, device)
    return inputs.kl_estimator.estimate(view)


def _metric_sums(
    output: ObjectiveOutput, policy: PairLogps, extras: Extras, inputs: LossInputs, batch: Batch, device
) -> dict[str, float]:
    """Metric totals over the batch's pairs, so accumulation and evaluation average them exactly."""
    count = batch.num_pairs
    chosen_rewards, rejected_rewards = output.chosen_rewards.detach(), output.rejected_rewards.detach()
    per_example = {
        "loss": output.losses.detach(),
        "rewards/chosen": chosen_rewards,
        "rewards/rejected": rejected_rewards,
        "rewards/margins": chosen_rewards - rejected_rewards,
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float()
        + 0.5 * (chosen_rewards == rejected_rewards).float(),
        "logps/chosen": policy.chosen.detach(),
        "logps/rejected": policy.rejected.detach(),
    }
    chosen, rejected = batch.chosen_rows.to(device), batch.rejected_rows.to(device)
    rewards = {"aux_reward": inputs.aux_rewards} if inputs.aux_rewards is not None else {}
    rewards |= {f"aux_reward/{name}": scores for name, scores in inputs.aux_components.items()}
    for name, scores in rewards.items():  # R and each unweighted r_k
        per_example[f"{name}/chosen"] = _rows_of(scores, batch, chosen, device)
        per_example[f"{name}/rejected"] = _rows_of(scores, batch, rejected, device)
    for name, value in output.metrics.items():
        value = value.detach()
        per_example[name] = value if value.dim() else value.expand(count)
    sums = defaultdict(float)
    for name, value in per_example.items():
        sums[name] += float(value.float().sum())
    return dict(sums)
