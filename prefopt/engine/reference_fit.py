"""The supervised phase that makes the tiny policy a meaningful reference.

Before preference training the policy is fitted to the task's reference distribution over each prompt's
candidates by minimising the exact, full-batch cross-entropy
    L(theta) = mean_x sum_y pi_ref(y|x) * (-lp_theta(y|x)),
which equals KL(pi_ref || pi_theta) up to a constant. Two phases: AdamW at `lr` while it makes progress,
then, if the target is not reached (Adam stalls on the plateau where the model ignores the prompt), L-BFGS
with a strong-Wolfe line search, which is exact and cannot oscillate on a deterministic full-batch loss.
The stop test reads the current parameters. The fit is reported as KL(pi_ref || pi_theta0) over the
candidates (renormalised) and the probability mass left outside them; a fit worse than `max_kl` stops the
run. Fitted weights are cached by a hash of everything that determines them, in
`$PREFOPT_CACHE/reference/<key>/`: `model.safetensors` and `report.json`, the fit's report sealed with a
sha256 of itself and of the weights file. A damaged entry (a digest that does not match, a truncated or
unparsable file, a missing part) is deleted and fitted again with one warning naming the file; a cache dir
that cannot be written is one warning and the run goes on uncached. A run records the fit's key and the
digest of the fitted weights (`weights_sha256`) in summary.json's `reference_fit`, so `prefopt evaluate`
can check that it compares with the run's own reference.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
from torch import Tensor

from prefopt.data.batching import SequenceTable
from prefopt.data.synthetic import ReferenceFitConfig
from prefopt.files import DamagedFile, read_sealed_json, sealed, sha256_file
from prefopt.models.logps import model_logps
from prefopt.progress import progress

log = logging.getLogger(__name__)
STALL_STEPS = 50  # Adam hands over to L-BFGS when the loss improved by < STALL_RTOL over this many steps
STALL_RTOL = 1e-3
LBFGS_ITERATIONS_PER_STEP = 20
MODEL_FILE, REPORT_FILE = "model.safetensors", "report.json"  # a cache entry's two parts


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
    """Fit `policy` in place to `target` (P, K) over the candidate sequences `candidates` (P, K).

    Every step counts one loss evaluation (an Adam step, or one L-BFGS function evaluation); the policy is
    left in eval mode with no gradients, exactly as a cached fit loads."""
    start = time.perf_counter()
    rows = table.pad(candidates.flatten()).to(device)
    target = target.to(device)
    params = [p for p in policy.parameters() if p.requires_grad]
    policy.train()

    def loss_and_fit() -> tuple[Tensor, dict[str, float]]:
        logps = model_logps(policy, rows, chunk_tokens).view_as(target)  # (P, K)
        return -(target * logps).sum(-1).mean(), candidate_fit(logps.detach(), target)

    bar = progress(total=cfg.max_steps, desc="reference fit", unit="step")
    steps, fit = _adam_phase(loss_and_fit, params, cfg, bar)
    adam_steps = steps
    if fit["kl"] >= cfg.target_kl and steps < cfg.max_steps:  # phase 2: L-BFGS from where Adam stalled
        steps, fit = _lbfgs_phase(loss_and_fit, params, cfg, bar, steps, fit)
    bar.close()
    policy.eval()
    with torch.no_grad():
        _, fit = loss_and_fit()  # the report reads the parameters the policy keeps
    for p in params:
        p.grad = None  # nothing of the fit may leak into the first preference step
    return {
        **fit,
        "steps": steps,
        "adam_steps": adam_steps,
        "lbfgs_evaluations": steps - adam_steps,
        "seconds": round(time.perf_counter() - start, 2),
        "cached": False,
    }


def _adam_phase(loss_and_fit, params, cfg: ReferenceFitConfig, bar) -> tuple[int, dict[str, float]]:
    """Phase 1: AdamW at `cfg.lr` while it makes progress; (steps taken, the last fit)."""
    steps, fit, best, best_step = 0, {}, float("inf"), 0
    adam = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    while steps < cfg.max_steps:
        loss, fit = loss_and_fit()
        if fit["kl"] < cfg.target_kl:
            break
        if loss.item() < best * (1 - STALL_RTOL):
            best, best_step = loss.item(), steps
        elif steps - best_step >= STALL_STEPS:
            break
        adam.zero_grad(set_to_none=True)
        loss.backward()
        adam.step()
        steps += 1
        _tick(bar, fit, "adam")
    return steps, fit


def _lbfgs_phase(
    loss_and_fit, params, cfg: ReferenceFitConfig, bar, steps: int, fit: dict[str, float]
) -> tuple[int, dict[str, float]]:
    """Phase 2: L-BFGS with a strong-Wolfe line search, from where Adam stopped (`steps`, `fit`) until the
    target, the step budget or a stationary point; (steps taken in all, the last fit)."""
    lbfgs = torch.optim.LBFGS(
        params, lr=1.0, max_iter=LBFGS_ITERATIONS_PER_STEP, history_size=20, line_search_fn="strong_wolfe"
    )

    def closure() -> Tensor:
        nonlocal steps, fit
        lbfgs.zero_grad(set_to_none=True)
        loss, fit = loss_and_fit()
        loss.backward()
        steps += 1
        _tick(bar, fit, "lbfgs")
        return loss

    while steps < cfg.max_steps and fit["kl"] >= cfg.target_kl:
        before = steps
        lbfgs.step(closure)
        if steps == before + 1:  # converged to a stationary point: nothing left to gain
            break
    return steps, fit


def _tick(bar, fit: dict[str, float], phase: str) -> None:
    bar.update(1)
    bar.set_postfix(kl=f"{fit['kl']:.2e}", phase=phase)


def check_fit(report: dict[str, float], cfg: ReferenceFitConfig) -> None:
    if report["kl"] > cfg.max_kl:
        raise ReferenceFitError(
            f"reference fit ended at KL(pi_ref || pi_theta0) = {report['kl']:.4f} > "
            f"dataset.reference_fit.max_kl = {cfg.max_kl} after {report['steps']} steps "
            f"(worst prompt {report['kl_max']:.4f}, outside mass {report['outside_mass']:.3f}); raise "
            f"dataset.reference_fit.max_steps (now {cfg.max_steps}), give the model more capacity "
            "(model.hidden_size, model.num_layers) or accept a looser fit with dataset.reference_fit.max_kl"
        )


def cache_key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def cache_dir() -> Path:
    return Path(os.environ.get("PREFOPT_CACHE", Path.home() / ".cache" / "prefopt")) / "reference"


def weights_sha256(model) -> str:
    """sha256 of the weights a model holds (names, dtypes, shapes and bytes): what identifies a fit."""
    digest = hashlib.sha256()
    hash_weights(digest, model.state_dict().items())
    return digest.hexdigest()


def hash_weights(digest, named_tensors) -> None:
    """Feed (name, tensor) pairs into `digest` in name order: name, dtype and shape, then the bytes."""
    for name, tensor in sorted(named_tensors):
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}|{flat.dtype}|{tuple(tensor.shape)}\n".encode())
        digest.update(flat.view(torch.uint8).numpy())  # the buffer itself, no copy


def load_cached(policy, key: str) -> dict | None:
    """Load the fitted weights of `key` into `policy` and return the fit's report; None when absent or
    damaged (then the entry is deleted with a warning, and `policy` is left untouched)."""
    from safetensors.torch import load_model

    entry = cache_dir() / key
    if not entry.exists():
        return None
    try:
        record = read_sealed_json(entry / REPORT_FILE)
        model_file = entry / MODEL_FILE
        if sha256_file(model_file) != record.get("model_sha256") or "report" not in record:
            raise DamagedFile(f"{model_file}: damaged (sha256 digest mismatch)")
    except (DamagedFile, OSError) as error:  # an OSError names its file too (e.g. a missing part)
        log.warning("reference fit cache: %s; deleting %s and fitting again", error, entry)
        shutil.rmtree(entry, ignore_errors=True)
        return None
    load_model(policy, model_file)  # the bytes we wrote and checked
    return {**record["report"], "cached": True}


def store_cached(policy, key: str, report: dict) -> None:
    """Write atomically: a temporary folder renamed into place, so parallel jobs never read half a file. A
    failed write (read-only, no permission, disk full) is one warning: the run has its fit either way."""
    from safetensors import SafetensorError
    from safetensors.torch import save_model

    root, staging = cache_dir(), None
    try:
        root.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=root, prefix=".tmp-"))
        save_model(policy, str(staging / MODEL_FILE))
        record = sealed({"report": report, "model_sha256": sha256_file(staging / MODEL_FILE)})
        (staging / REPORT_FILE).write_text(json.dumps(record))  # the folder's rename publishes it
        os.replace(staging, root / key)
        staging = None
    except (OSError, SafetensorError) as error:
        if not (root / key).is_dir():  # else another job stored the same key first
            log.warning("reference fit cache: could not write to %s (%s); not cached", root, error)
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
