"""The frozen reference: built from the starting policy (or the checkpoint the config names), fitted to
a ground truth's pi_ref where the task has one, and its log-probs of every table sequence (cached)."""

from __future__ import annotations

import copy
import logging

import torch
from torch import Tensor

from prefopt.config import RunConfig
from prefopt.data.batching import SequenceTable
from prefopt.data.ground_truth import GroundTruth
from prefopt.data.layout import Packing
from prefopt.data.packing import prompt_group_passes, whole_table_passes
from prefopt.engine.distributed import my_share, sum_across_ranks
from prefopt.engine.reference_cache import cached_reference_logps
from prefopt.engine.reference_fit import (
    cache_key,
    check_fit,
    fit_reference,
    load_cached,
    store_cached,
    weights_sha256,
)
from prefopt.progress import progress

log = logging.getLogger(__name__)


def wants_reference_fit(truth: GroundTruth, dataset, random_init: bool) -> bool:
    """Fit pi_ref only where it means something: a ground truth that knows pi_ref over its candidates,
    and a policy that starts untrained (`random_init`: a checkpoint continues as it is) unless
    `dataset.reference_fit.enabled` says otherwise."""
    if truth.fit_target() is None:
        return False
    cfg = dataset.reference_fit  # a dataset whose ground truth has a pi_ref has the fit's options
    enabled = random_init if cfg.enabled is None else cfg.enabled
    return bool(enabled) and cfg.max_steps > 0


def fit_to_task(rc: RunConfig, policy, table, candidates, truth: GroundTruth, device) -> dict:
    """Fit the starting policy to the ground truth's pi_ref over its candidates (cached per model, data,
    fit settings and seed); the fit's report for summary.json."""
    cfg = rc.dataset.reference_fit
    dataset = {k: v for k, v in rc.raw["dataset"].items() if k != "reference_fit"}  # the fit's own: vars(cfg)
    key = cache_key(rc.raw["model"], dataset, vars(cfg), rc.seed, truth.vocabulary())
    report = load_cached(policy, key) if cfg.cache else None
    if report is None:
        target = truth.fit_target()
        chunk_tokens = rc.trainer.layout.logps_chunk_tokens
        report = fit_reference(policy, table, candidates, target, cfg, device, chunk_tokens)
        if cfg.cache and report["kl"] <= cfg.max_kl:
            store_cached(policy, key, report)
    # Where the fitted reference is and what it is, for summary.json: `prefopt evaluate` checks its digest
    report |= {"cache_key": key, "weights_sha256": weights_sha256(policy)}
    log.info(
        "reference fit: KL(pi_ref || pi_theta0) = %.5f (target %g), mass outside candidates = %.4f, "
        "%d steps%s",
        report["kl"],
        cfg.target_kl,
        report["outside_mass"],
        report["steps"],
        " (cached)" if report["cached"] else f" in {report['seconds']:.1f} s",
    )
    check_fit(report, cfg)
    return report


def frozen_reference(separate, policy, device):
    """The frozen pi_ref: `separate` (the model config's `separate_reference()`) when the config names
    one; else the starting policy, which under LoRA is the policy itself with its adapters disabled (no
    second copy in memory)."""
    from prefopt.models.lora import adapter_reference, is_lora

    if separate is None and is_lora(policy):
        return adapter_reference(policy)
    reference = separate.to(device) if separate is not None else copy.deepcopy(policy)
    reference.eval()
    reference.requires_grad_(False)
    return reference


@torch.no_grad()
def all_sequence_logps(
    model,
    table: SequenceTable,
    chunk_tokens: int,
    device,
    packing: Packing | None = None,
    rows_per_pass: int | None = None,
) -> Tensor:
    """(S,) every table sequence's log-prob, in passes of at most `rows_per_pass` rows as wide as the
    longest sequence (or `pack_tokens`): where the model shares prompts, sequences grouped by prompt, as
    many tokens per pass; else the whole table packed at once where the model packs (`packing`, None:
    auto), else length-sorted. `rows_per_pass` None: 16 on CPU, where passes that stay in cache
    run faster (9k against 6k tokens/s for 256 rows, 5.5 M-parameter Llama, 1 thread), 256 elsewhere."""
    from dataclasses import replace

    if rows_per_pass is None:
        rows_per_pass = 16 if torch.device(device).type == "cpu" else 256
    lengths, packing = table.lengths(), packing or Packing()
    if packing.shares_prompts(model, device):  # prompt groups, as many tokens per pass as packed rows
        prompt_lengths = torch.tensor([len(table.prompt_ids[p]) for p in table.sequence_prompt])
        prompts = torch.tensor(table.sequence_prompt)
        passes = prompt_group_passes(prompts, lengths, prompt_lengths, rows_per_pass * int(lengths.max()))
    else:
        budget = (packing.pack_tokens or int(lengths.max())) if packing.packs(model, device) else None
        packing = replace(packing, pack_tokens=budget)  # each pass re-packs its rows' sequences, as wide
        passes = whole_table_passes(lengths, rows_per_pass, budget)
    logps = torch.zeros(len(table), dtype=torch.float32, device=device)
    for part in progress(my_share(passes), desc="reference log-probs", unit="batch"):  # under torchrun
        logps[part.to(device)] = packing.logps(model, table.pad(part).to(device), chunk_tokens)
    return sum_across_ranks(logps)  # each rank computed its share of the passes


def reference_logps(reference, table, packing: Packing, layout, precision: str, device) -> tuple[Tensor, str]:
    """(S,) the reference's log-prob of every table sequence, from the cache when it holds them
    (`trainer.layout.reference_cache`); the cache's key has the chunk size, precision and layout."""
    chunk = layout.logps_chunk_tokens
    return cached_reference_logps(
        reference,
        table,
        lambda: all_sequence_logps(reference, table, chunk, device, packing),
        device,
        enabled=layout.reference_cache,
        chunk_tokens=chunk,
        precision=precision,
        packing=[packing.mode, packing.pack_tokens, packing.shares_prompts(reference, device)],
    )
