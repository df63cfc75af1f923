"""The evaluation stage: preference metrics on the held-out pairs and, on a task with a known ground
truth, exact metrics over every prompt's candidates (the dataset's `GroundTruth.exact_metrics`).

`evaluate` returns scalar metrics (logged every evaluation) and per-prompt detail (`pi_theta/p<i>/y<k>`,
`outside_mass/p<i>`: kept in eval.json only, so step metrics, W&B and reports stay readable)."""

from __future__ import annotations

import re
from collections import defaultdict

import torch

from prefopt.data.batching import make_batch
from prefopt.data.ground_truth import CandidateScores
from prefopt.engine.prepare import PreparedRun
from prefopt.engine.step import pair_loss, reference_side
from prefopt.progress import progress

PER_PROMPT = re.compile(r"/p\d+(/|$)")  # a metric key with a per-prompt path segment


def is_per_prompt(key: str) -> bool:
    return bool(PER_PROMPT.search(key))


@torch.no_grad()
def evaluate(
    run: PreparedRun, step: int, batch_size: int, device, autocast
) -> tuple[dict[str, float], dict[str, float]]:
    """(metrics, per-prompt detail) of the current policy, keys prefixed `eval/`."""
    modules = [m for m in (run.policy, run.inputs.value_head) if m is not None]
    for module in modules:
        module.eval()
    totals, needs = defaultdict(float), run.inputs.hparams.requirements()
    batches = torch.arange(len(run.eval)).split(batch_size)
    for examples in progress(batches, desc=f"eval @ step {step}", unit="batch"):
        batch = make_batch(run.table, run.eval, examples, run.kl_side, needs.mismatched)
        with autocast():
            _, sums = pair_loss(run.policy, batch, run.inputs, step, device)
        for name, value in sums.items():
            totals[name] += value
    metrics = {f"eval/{name}": value / len(run.eval) for name, value in totals.items()}
    exact = run.truth.exact_metrics(lambda: candidate_scores(run, device, autocast))
    metrics.update({f"eval/{k}": v for k, v in exact.items()})
    for module in modules:
        module.train()
    detail = {k: v for k, v in metrics.items() if is_per_prompt(k)}
    return {k: v for k, v in metrics.items() if k not in detail}, detail


def candidate_logps(run: PreparedRun, device, autocast) -> torch.Tensor:
    """(P, K) the policy's sequence log-probs of every prompt's candidates."""
    ids = run.candidates.flatten()
    with autocast():
        rows = run.table.pad(ids).to(device)
        logps = run.inputs.packing.logps(run.policy, rows, run.inputs.chunk_tokens)
    return logps.float().view(run.candidates.shape)


def candidate_scores(run: PreparedRun, device, autocast) -> CandidateScores:
    """The policy's and the reference's log-probs of every prompt's candidates, and their aux rewards."""
    ids, shape = run.candidates.flatten().to(device), run.candidates.shape
    policy_logps = candidate_logps(run, device, autocast)
    reference_logps = reference_side(run.inputs, policy_logps.flatten(), ids).view(shape)

    def per_candidate(scores):
        return scores[ids].view(shape)

    aux = per_candidate(run.inputs.aux_rewards) if run.inputs.aux_rewards is not None else None
    components = {name: per_candidate(scores) for name, scores in run.aux_components.items()}
    return CandidateScores(policy_logps, reference_logps, aux, components)
