"""Did a run converge, and (on a task with a ground truth) where should it have converged to?

The report goes into summary.json and every sweep report:
  loss_change_last_10pct  the share of the run's whole loss change made in its last tenth of steps: mean loss
                          over the last tenth minus the mean over the tenth before, over the mean of the
                          first tenth minus that of the last (scale-free, also where the loss tends to 0);
                          a loss still moving means the run stopped too early
  final_grad_norm         the last step's gradient norm (before clipping), and its share of the run's largest
  outside_mass            the policy's probability of every sequence that is not a candidate (synthetic task)
  tv_to_minimizer         mean over prompts of TV(pi_theta, pi_min), pi_theta renormalised over the candidates
                          and pi_min the exact minimizer of the objective on the run's OWN training pairs with
                          the run's own reference (`population.tabular_minimizer`): what a converged run must
                          reach, free of the sampling noise of its data
A run counts as converged when the loss has settled and, for full-batch steps (where the gradient is the
objective's own, not a mini-batch's noisy estimate of it), the gradient has shrunk; the distance to the
minimizer is reported beside it (a converged run far from its minimizer is a finding, not a failure to train).
"""

from __future__ import annotations

import math
from dataclasses import asdict
from typing import TYPE_CHECKING

import torch

from prefopt.config import ConvergenceConfig
from prefopt.evaluation.population import empirical_weights, is_tabular, tabular_minimizer, total_variation

if TYPE_CHECKING:
    from prefopt.engine.prepare import PreparedRun


def loss_change(step_losses: list[float], share: float = 0.1) -> float | None:
    """(mean of the last `share` of the losses - mean of the `share` before) / (mean of the first `share`
    - mean of the last); 0 when the loss did not move at all, None with too few steps to tell."""
    window = max(1, math.ceil(share * len(step_losses)))
    if len(step_losses) < 3 * window:
        return None
    mean = lambda values: sum(values) / len(values)  # noqa: E731
    first, before = mean(step_losses[:window]), mean(step_losses[-2 * window : -window])
    last = mean(step_losses[-window:])
    total = first - last
    if abs(total) <= 1e-9 * max(abs(first), 1.0):
        return 0.0
    return (last - before) / abs(total)


def convergence_report(
    step_losses: list[float],
    grad_norms: list[float],
    cfg: ConvergenceConfig,
    outside_mass: float | None = None,
    minimizer: list[list[float]] | None = None,
    policy: list[list[float]] | None = None,
    full_batch: bool = True,
) -> dict:
    """The run's convergence section; `minimizer` and `policy` are (P, K) candidate distributions.
    With mini-batches the gradient norm is reported but not judged: at the optimum it is noise."""
    change = loss_change(step_losses)
    final_norm = grad_norms[-1] if grad_norms else None
    peak = max(grad_norms, default=0.0)
    ratio = final_norm / peak if final_norm is not None and peak > 0 else None
    reasons = []
    if change is None:
        reasons.append(f"too few steps ({len(step_losses)}) to judge")
    elif not math.isfinite(change) or abs(change) > cfg.loss_rtol:
        reasons.append(
            f"the last tenth of the steps made {100 * change:+.1f}% of the run's loss change "
            f"(eval.convergence.loss_rtol = {100 * cfg.loss_rtol:g}%)"
        )
    if full_batch and ratio is not None and not ratio <= cfg.grad_norm_ratio:
        reasons.append(
            f"final gradient norm {final_norm:.3g} is {100 * ratio:.2g}% of the run's largest "
            f"(eval.convergence.grad_norm_ratio = {100 * cfg.grad_norm_ratio:g}%)"
        )
    tv_per_prompt = None
    if minimizer is not None and policy is not None:
        tv_per_prompt = [total_variation(p, m) for p, m in zip(policy, minimizer)]
    return {
        "converged": None if change is None else not reasons,
        "reasons": reasons,
        "loss_change_last_10pct": change,
        "final_grad_norm": final_norm,
        "grad_norm_ratio": ratio,
        "full_batch": full_batch,
        "outside_mass": outside_mass,
        "tv_to_minimizer": sum(tv_per_prompt) / len(tv_per_prompt) if tv_per_prompt else None,
        "tv_per_prompt": tv_per_prompt,
        "minimizer": minimizer,
    }


def own_pairs_minimizer(
    objective_name: str,
    hparams,
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    reference_logps: torch.Tensor,
    tokens: torch.Tensor,
) -> list[list[float]] | None:
    """(P, K) minimizer of the objective on the given pairs, per prompt; None without a tabular form.

    chosen, rejected: (N, 2) (prompt, candidate) indices of the training pairs; reference_logps: (P, K)
    the reference's candidate log-probs (renormalised here); tokens: (P, K) response lengths."""
    if not is_tabular(objective_name):
        return None
    reference = torch.softmax(reference_logps.double(), dim=-1)
    result = []
    for p in range(reference.shape[0]):
        mine = chosen[:, 0] == p
        weights = empirical_weights(chosen[mine, 1], rejected[mine, 1], reference.shape[1])
        pi = tabular_minimizer(objective_name, weights, reference[p], tokens[p], **asdict(hparams))
        result.append([float(v) for v in pi])
    return result


def run_convergence(
    objective_name: str,
    objective,
    criteria: ConvergenceConfig,
    run: PreparedRun,
    series: tuple[list[float], list[float]],
    final: tuple[dict, dict],
    full_batch: bool,
) -> dict:
    """A finished run's convergence section from its (step losses, grad norms) `series` and its `final`
    (metrics, per-prompt detail); where the dataset has a ground truth, against the minimizer of the
    run's own training pairs, with the policy read from the final evaluation's per-prompt detail."""
    final_eval, final_detail = final
    minimizer, policy = run.truth.convergence_target(
        lambda: _own_pairs_target(objective_name, objective, run, final_detail)
    )
    outside = final_eval.get("eval/outside_mass")
    return convergence_report(*series, criteria, outside, minimizer, policy, full_batch)


def _own_pairs_target(objective_name: str, objective, run: PreparedRun, final_detail: dict) -> tuple:
    """(the minimizer of the objective on the run's own training pairs, the final policy), both (P, K)
    lists over the candidates; the minimizer None where the objective has no tabular form."""
    num_prompts, num_candidates = run.candidates.shape
    where = {int(s): (p, k) for p, row in enumerate(run.candidates.tolist()) for k, s in enumerate(row)}
    chosen = torch.tensor([where[int(s)] for s in run.train.chosen])  # (N, 2) (prompt, candidate)
    rejected = torch.tensor([where[int(s)] for s in run.train.rejected])
    ids = run.candidates.flatten()
    reference = run.inputs.reference_logps[ids.to(run.inputs.reference_logps.device)].cpu()
    tokens = run.table.pad(ids).response_tokens.view(num_prompts, num_candidates)
    shape = (num_prompts, num_candidates)
    minimizer = own_pairs_minimizer(
        objective_name, objective, chosen, rejected, reference.view(shape), tokens
    )
    policy = [
        [final_detail[f"eval/pi_theta/p{p}/y{k}"] for k in range(num_candidates)] for p in range(num_prompts)
    ]
    return minimizer, policy
