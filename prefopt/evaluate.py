"""The evaluation stage: preference metrics on the held-out pairs and, on a task with a known ground
truth, exact metrics over every prompt's candidates (see `data.synthetic.exact_metrics`)."""

from __future__ import annotations

from collections import defaultdict

import torch

from prefopt.data.batching import make_batch
from prefopt.data.synthetic import exact_metrics
from prefopt.logps import model_logps
from prefopt.prepare import PreparedRun
from prefopt.step import pair_loss


@torch.no_grad()
def evaluate(run: PreparedRun, step: int, batch_size: int, device, autocast) -> dict[str, float]:
    modules = [m for m in (run.policy, run.inputs.value_head) if m is not None]
    for module in modules:
        module.eval()
    totals, needs = defaultdict(float), run.inputs.hparams.requirements()
    for examples in torch.arange(len(run.eval)).split(batch_size):
        batch = make_batch(run.table, run.eval, examples, run.kl_side, needs.mismatched)
        with autocast():
            loss_sum, sums = pair_loss(run.policy, batch, run.inputs, step, device)
        for name, value in sums.items():
            totals[name] += value
    metrics = {f"eval/{name}": value / len(run.eval) for name, value in totals.items()}
    if run.task is not None:
        metrics.update({f"eval/{k}": v for k, v in candidate_metrics(run, device, autocast).items()})
    for module in modules:
        module.train()
    return metrics


def candidate_metrics(run: PreparedRun, device, autocast) -> dict[str, float]:
    ids = run.candidates.flatten()
    with autocast():
        policy_logps = model_logps(run.policy, run.table.pad(ids).to(device), run.inputs.chunk_tokens)
    reference_logps = run.inputs.reference_logps[ids.to(device)]
    aux = (
        run.inputs.aux_rewards[ids.to(device)].view(run.candidates.shape)
        if run.inputs.aux_rewards is not None
        else None
    )
    shape = run.candidates.shape
    return exact_metrics(run.task, policy_logps.float().view(shape), reference_logps.view(shape), aux)
