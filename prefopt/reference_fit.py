"""The supervised phase that makes the tiny policy a meaningful reference.

Before preference training the policy is fitted to the task's reference distribution over each prompt's
candidates by minimising the exact cross-entropy
    L = mean_x sum_y pi_ref(y|x) * (-lp_theta(y|x)),
which equals KL(pi_ref || pi_theta) up to a constant. The fit is reported as KL(pi_ref || pi_theta0) over
the candidates (renormalised) and the probability mass left outside them; a fit worse than `max_kl` stops
the run. Fitted weights are cached by a hash of everything that determines them.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
from torch import Tensor

from prefopt.config import ReferenceFitConfig
from prefopt.data.batching import SequenceTable
from prefopt.logps import model_logps


class ReferenceFitError(RuntimeError):
    """The supervised phase could not bring the policy close enough to pi_ref."""


def candidate_fit(logps: Tensor, target: Tensor) -> dict[str, float]:
    """KL(target || softmax(logps)) per prompt and mass outside the candidates, averaged over prompts.
    logps: (P, K) unnormalised sequence log-probs; target: (P, K) distributions."""
    log_normalised = logps - torch.logsumexp(logps, dim=-1, keepdim=True)
    kl = (target * (target.log() - log_normalised)).sum(-1)
    outside = 1.0 - logps.exp().sum(-1)
    return {"kl": float(kl.mean()), "kl_max": float(kl.max()), "outside_mass": float(outside.mean())}


def fit_reference(
    policy,
    table: SequenceTable,
    candidates: Tensor,
    target: Tensor,
    cfg: ReferenceFitConfig,
    device,
    chunk_tokens: int,
) -> dict[str, float]:
    """Fit `policy` in place to `target` (P, K) over the candidate sequences `candidates` (P, K)."""
    start = time.perf_counter()
    rows = table.pad(candidates.flatten()).to(device)
    target = target.to(device)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=cfg.lr, weight_decay=0.0)
    policy.train()
    steps = 0
    for steps in range(1, cfg.max_steps + 1):
        logps = model_logps(policy, rows, chunk_tokens).view_as(target)
        loss = -(target * logps).sum(-1).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if steps % 10 == 0 and candidate_fit(logps.detach(), target)["kl"] < cfg.target_kl:
            break
    policy.eval()
    with torch.no_grad():
        report = candidate_fit(model_logps(policy, rows, chunk_tokens).view_as(target), target)
    report.update(steps=steps, seconds=round(time.perf_counter() - start, 2), cached=False)
    return report


def check_fit(report: dict[str, float], cfg: ReferenceFitConfig) -> None:
    if report["kl"] > cfg.max_kl:
        raise ReferenceFitError(
            f"reference fit ended at KL(pi_ref || pi_theta0) = {report['kl']:.4f} > "
            f"trainer.reference_fit.max_kl = {cfg.max_kl} after {report['steps']} steps; raise "
            "trainer.reference_fit.max_steps or .lr, or give the model more capacity"
        )


def cache_key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def cache_dir() -> Path:
    return Path(os.environ.get("PREFOPT_CACHE", Path.home() / ".cache" / "prefopt")) / "reference"


def load_cached(policy, key: str) -> dict | None:
    from safetensors.torch import load_model

    entry = cache_dir() / key
    if not (entry / "report.json").exists():
        return None
    load_model(policy, entry / "model.safetensors")
    return {**json.loads((entry / "report.json").read_text()), "cached": True}


def store_cached(policy, key: str, report: dict) -> None:
    """Write atomically: a temporary folder renamed into place, so parallel jobs never read half a file."""
    from safetensors.torch import save_model

    root = cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=root, prefix=".tmp-"))
    save_model(policy, str(staging / "model.safetensors"))
    (staging / "report.json").write_text(json.dumps(report))
    try:
        os.replace(staging, root / key)
    except OSError:  # another job stored the same key first
        shutil.rmtree(staging, ignore_errors=True)
