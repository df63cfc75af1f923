"""The supervised reference fit: it reaches its target where Adam alone stalls, and what it reports is
what the policy it leaves behind has."""

from __future__ import annotations

import pytest
import torch
from conftest import compose_config, torch_threads

from prefopt.config import load_run_config
from prefopt.data import DATASETS
from prefopt.data.batching import SequenceTable
from prefopt.engine.reference_fit import (
    cache_dir,
    candidate_fit,
    fit_reference,
    load_cached,
    store_cached,
    weights_sha256,
)
from prefopt.engine.sampled_data import data_vocabulary
from prefopt.models import MODELS
from prefopt.models.logps import model_logps

# Two 5-candidate contexts, the second's reference reversed, on the experiments' 2-layer width-64 model:
# Adam at lr 1e-2 sits on a plateau at KL 0.07 for its whole budget (the model ignores the prompt token).
HARD = [
    "+experiment=expo_preservation",
    "dataset.contexts=[{pi_star:[0.4,0.25,0.15,0.12,0.08],pi_ref:null},"
    "{pi_star:[0.4,0.25,0.15,0.12,0.08],pi_ref:[0.08,0.12,0.15,0.25,0.4]}]",
    "seed=0",
    "dataset.reference_fit.lr=1e-2",
]


@pytest.fixture(autouse=True)
def one_thread():
    """A fit's path depends on the thread count (summation order); pin it as every run does."""
    with torch_threads(1):
        yield


def build(*overrides: str):
    rc = load_run_config(compose_config("logger=none", *overrides))
    text = DATASETS[rc.dataset_name].load(rc.dataset, rc.seed)
    torch.manual_seed(rc.seed)
    policy, tokenizer = MODELS[rc.model_name].build(rc.model, data_vocabulary(text))
    table = SequenceTable(tokenizer, text.max_prompt_tokens, text.max_response_tokens)
    target = torch.as_tensor(text.task.pi_ref, dtype=torch.float32)
    return rc, policy, table, text.task.candidate_ids(table), target


@torch.no_grad()
def current_fit(policy, table, candidates, target) -> dict[str, float]:
    return candidate_fit(model_logps(policy, table.pad(candidates.flatten()), 2048).view_as(target), target)


def test_the_fit_reaches_its_target_where_adam_stalls_and_reports_the_policy_it_leaves():
    rc, policy, table, candidates, target = build(*HARD)
    cfg = rc.dataset.reference_fit
    report = fit_reference(policy, table, candidates, target, cfg, torch.device("cpu"), 2048)
    assert report["kl"] < cfg.target_kl
    assert report["lbfgs_evaluations"] > 0  # Adam handed over
    assert report["steps"] <= cfg.max_steps + 25  # an L-BFGS step may finish its line search
    now = current_fit(policy, table, candidates, target)
    assert now["kl"] == pytest.approx(report["kl"], rel=1e-5)
    assert now["outside_mass"] == pytest.approx(report["outside_mass"], rel=1e-4, abs=1e-7)
    assert all(p.grad is None for p in policy.parameters())
    assert not policy.training


def test_the_stop_test_reads_the_current_parameters():
    """Stopping at a loose target: the reported KL is below it and is the returned policy's own."""
    rc, policy, table, candidates, target = build("+experiment=expo_preservation", "seed=1")
    cfg = rc.dataset.reference_fit
    cfg.target_kl = 0.02
    report = fit_reference(policy, table, candidates, target, cfg, torch.device("cpu"), 2048)
    now = current_fit(policy, table, candidates, target)
    assert report["kl"] < 0.02
    assert now["kl"] == pytest.approx(report["kl"], rel=1e-5)


@pytest.mark.parametrize("part", ["model.safetensors", "report.json"])
def test_a_cache_entry_missing_a_part_is_deleted_with_a_warning_and_the_policy_untouched(
    part, tmp_path, monkeypatch, caplog
):
    import logging

    monkeypatch.setenv("PREFOPT_CACHE", str(tmp_path))
    _, policy, *_ = build("+experiment=expo_preservation")
    store_cached(policy, "key", {"kl": 0.0})
    assert load_cached(policy, "key") == {"kl": 0.0, "cached": True}
    (cache_dir() / "key" / part).unlink()
    before = weights_sha256(policy)
    with caplog.at_level(logging.WARNING):
        assert load_cached(policy, "key") is None
    assert any(str(cache_dir() / "key" / part) in r.getMessage() for r in caplog.records)
    assert not (cache_dir() / "key").exists() and weights_sha256(policy) == before
