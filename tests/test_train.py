"""The one training loop, end to end, on the embedded default task (scaled down)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
from conftest import FAST, ROOT, compose_config, read_jsonl, run_training

from prefopt.objectives import OBJECTIVES


def test_default_task_training_lowers_loss_and_beats_the_reference(tmp_path):
    """A short DPO run moves every measure the right way from the reference's own numbers. No threshold is
    read off earlier runs: each is the reference's value, known exactly (its implicit reward margin is zero,
    so its DPO loss is log 2, its held-out accuracy 1/2 with every margin a tie, and it ties with itself:
    win rate 1/2), and the final value is compared with it (win rate, oracle reward and loss are exact
    expectations over the task, not samples)."""
    summary = run_training(
        tmp_path,
        "trainer.max_steps=60",
        "trainer.optimizer.lr=3e-3",
        "eval.eval_every_steps=30",
        "trainer.log_every_steps=5",
    )
    train_losses = [r["train/loss"] for r in read_jsonl(tmp_path / "metrics.jsonl") if "train/loss" in r]
    assert train_losses[-1] < train_losses[0]
    start, final = summary["reference_eval"], summary["final_eval"]
    assert start["eval/loss"] == pytest.approx(math.log(2))
    assert start["eval/rewards/accuracies"] == pytest.approx(0.5)
    assert start["eval/win_rate"] == pytest.approx(0.5, abs=1e-6)
    assert final["eval/loss"] < start["eval/loss"]
    assert final["eval/rewards/accuracies"] > start["eval/rewards/accuracies"]
    assert final["eval/win_rate"] > start["eval/win_rate"]
    assert final["eval/oracle_reward"] > start["eval/oracle_reward"]
    # the fit's own gate: preference training starts only when the fit ends within this run's max_kl
    max_kl = float(next(o for o in FAST if o.startswith("dataset.reference_fit.max_kl=")).split("=")[1])
    assert summary["reference_fit"]["kl"] <= max_kl


def test_run_dir_holds_metrics_eval_and_a_loadable_checkpoint(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run_training(tmp_path, "trainer.log_every_steps=5")
    records = read_jsonl(tmp_path / "metrics.jsonl")
    train_keys = set().union(*(r for r in records if "train/loss" in r))
    for key in [
        "loss",
        "rewards/chosen",
        "rewards/rejected",
        "rewards/margins",
        "rewards/accuracies",
        "logps/chosen",
        "logps/rejected",
        "grad_norm",
        "lr",
        "tokens_per_s",
        "elapsed_s",
    ]:
        assert f"train/{key}" in train_keys, key
    evaluation = json.loads((tmp_path / "eval.json").read_text())
    assert [h["step"] for h in evaluation["history"]] == [0, 5, 10]
    for key in ["eval/rewards/accuracies", "eval/oracle_reward", "eval/kl_policy_reference", "eval/win_rate"]:
        assert key in evaluation["final"]
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "checkpoint")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "checkpoint")
    ids = tokenizer("tell me about topic0 .", return_tensors="pt")["input_ids"]
    assert model(ids).logits.shape[-1] == len(tokenizer)


def test_a_checkpoint_is_the_next_runs_model_and_continues_without_a_new_reference_fit(tmp_path):
    """The Hugging Face loading path on a tiny model saved with save_pretrained: same task, same numbers
    at step 0 as the policy that was saved; the supervised reference fit does not run again (it would undo
    the first run's training)."""
    first = run_training(tmp_path / "first", "trainer.max_steps=4")
    second = run_training(
        tmp_path / "second",
        "model=pretrained",
        f"model.name_or_path={tmp_path / 'first' / 'checkpoint'}",
        "trainer.max_steps=2",
        tiny_model=False,
    )
    assert second["reference_fit"] is None
    assert second["reference_eval"]["eval/kl_star"] == pytest.approx(
        first["final_eval"]["eval/kl_star"], rel=1e-4
    )


def step_records(run_dir, key="train/loss") -> list[tuple[int, float]]:
    return [(r["step"], r[key]) for r in read_jsonl(run_dir / "metrics.jsonl") if key in r]


def test_a_fresh_and_a_cached_reference_fit_train_identically(tmp_path, monkeypatch):
    """The fit leaves no gradient and no random state behind: the run that fits the reference and the run
    that loads it from the cache take bit-identical steps."""
    monkeypatch.setenv("PREFOPT_CACHE", str(tmp_path / "cache"))
    steps = ["trainer.max_steps=6", "trainer.log_every_steps=1", "seed=3"]
    fresh = run_training(tmp_path / "fresh", *steps)
    cached = run_training(tmp_path / "cached", *steps)
    assert not fresh["reference_fit"]["cached"] and cached["reference_fit"]["cached"]
    for key in ["train/loss", "train/grad_norm"]:
        assert step_records(tmp_path / "cached", key) == step_records(tmp_path / "fresh", key)
    assert len(step_records(tmp_path / "fresh")) == 6
    assert cached["final_eval"] == fresh["final_eval"]


def test_hpo_with_its_extra_terms_off_takes_exactly_dpos_steps(tmp_path):
    """gamma = value_coef = margin_alpha = 0 leaves HPO's dpo base alone; the value head it still builds
    must not move the policy's numbers (nor, through the random state, anything else)."""
    steps = ["trainer.max_steps=6", "trainer.log_every_steps=1"]
    dpo = run_training(tmp_path / "dpo", "objective=dpo", *steps)
    hpo = run_training(
        tmp_path / "hpo",
        "objective=hpo",
        "objective.gamma=0",
        "objective.value_coef=0",
        "objective.margin_alpha=0",
        *steps,
    )
    # exact: hpo adds no term whose coefficient is 0, and the idle value head gets no gradient (so the
    # gradient norm is over the same tensors)
    for key in ["train/loss", "train/grad_norm", "train/rewards/margins"]:
        assert step_records(tmp_path / "hpo", key) == step_records(tmp_path / "dpo", key)
    assert hpo["final_eval"]["eval/loss"] == dpo["final_eval"]["eval/loss"]


def test_step_metrics_leave_per_prompt_detail_to_eval_json(tmp_path):
    summary = run_training(tmp_path, "trainer.max_steps=4")
    logged = set().union(*read_jsonl(tmp_path / "metrics.jsonl"))
    assert not [k for k in logged if "/p0" in k]
    assert not [k for k in summary["final_eval"] if "/p0" in k]
    evals = json.loads((tmp_path / "eval.json").read_text())
    final = evals["final"]
    assert final["eval/pi_theta/p0/y0"] > 0 and "eval/outside_mass/p0" in final
    assert len(evals["task"]["pi_star"]) == 6 and sum(evals["task"]["pi_ref"][0]) == pytest.approx(1.0)
    data = summary["data"]
    assert data["train_pairs"] > 0 and data["eval_pairs"] > 0
    assert data["tokenization"]["pairs_dropped"] == 0
    assert summary["final_eval"]["eval/outside_mass"] == pytest.approx(
        sum(final[f"eval/outside_mass/p{p}"] for p in range(6)) / 6
    )


def test_convergence_report_against_the_minimizer_of_the_runs_own_pairs(tmp_path):
    """A long full-batch EXPO run on a 2-prompt task settles: converged, and its renormalised policy is
    within 0.02 (total variation) of the exact minimizer of its own training pairs."""
    summary = run_training(
        tmp_path,
        "objective=expo",
        "objective.lam=1.0",
        "dataset.num_prompts=2",
        "trainer.batch_size=1000",
        "trainer.max_steps=150",
        "trainer.optimizer.lr=3e-3",
        "trainer.optimizer.lr_schedule=constant_with_warmup",
        "dataset.reference_fit.max_kl=0.01",
        "eval.eval_every_steps=150",
    )
    convergence = summary["convergence"]
    assert convergence["converged"], convergence["reasons"]
    assert abs(convergence["loss_change_last_10pct"]) <= loss_rtol()  # the configured criterion
    minimizer = convergence["minimizer"]
    assert len(minimizer) == 2 and len(minimizer[0]) == 3
    assert sum(minimizer[0]) == pytest.approx(1.0)
    # direction of change, no picked distance: the run moved toward the minimizer, and ended nearer to it
    # than to where it started (the reference, the policy at step 0 in eval.json)
    history = json.loads((tmp_path / "eval.json").read_text())["history"]
    start, end = candidate_policy(history[0], 2, 3), candidate_policy(history[-1], 2, 3)
    assert convergence["tv_to_minimizer"] == pytest.approx(mean_tv(end, minimizer), rel=1e-4)
    assert convergence["tv_to_minimizer"] < mean_tv(start, minimizer)
    assert convergence["tv_to_minimizer"] < mean_tv(end, start)
    assert convergence["outside_mass"] == summary["final_eval"]["eval/outside_mass"]  # a copy: exact


def test_a_short_run_is_reported_as_not_converged(tmp_path):
    convergence = run_training(tmp_path, "trainer.max_steps=10", "trainer.optimizer.lr=3e-3")["convergence"]
    assert convergence["converged"] is False
    assert convergence["reasons"]
    # why, by the configured criterion: its loss was still moving in its last tenth of steps
    assert abs(convergence["loss_change_last_10pct"]) > loss_rtol()
    assert convergence["tv_to_minimizer"] > 0  # reported, and not at the minimizer


def loss_rtol() -> float:
    """eval.convergence.loss_rtol as the tests' runs compose it."""
    return float(compose_config(*FAST).eval.convergence.loss_rtol)


def candidate_policy(evaluation: dict, prompts: int, candidates: int) -> list[list[float]]:
    """pi_theta over each prompt's candidates, renormalised (as convergence.tv_to_minimizer takes it)."""
    rows = [[evaluation[f"eval/pi_theta/p{p}/y{k}"] for k in range(candidates)] for p in range(prompts)]
    return [[x / sum(row) for x in row] for row in rows]


def mean_tv(a: list[list[float]], b: list[list[float]]) -> float:
    """Mean over prompts of the total variation distance 1/2 sum_y |a(y) - b(y)|."""
    return sum(0.5 * sum(abs(x - y) for x, y in zip(p, q)) for p, q in zip(a, b)) / len(a)


def test_a_run_dir_that_holds_a_run_is_refused_and_left_as_it_was(tmp_path):
    from prefopt.training.train import RunDirInUse

    run_training(tmp_path, "trainer.max_steps=2")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    with pytest.raises(RunDirInUse, match="metrics.jsonl"):
        run_training(tmp_path, "trainer.max_steps=2")
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == before


def test_a_failing_run_writes_a_failed_summary_and_closes_the_tracker(tmp_path, monkeypatch):
    from prefopt.engine.reference_fit import ReferenceFitError
    from prefopt.training.tracking import Tracker

    closed = []
    finish = Tracker.finish
    monkeypatch.setattr(
        Tracker, "finish", lambda self, exit_code=0, **kw: closed.append(exit_code) or finish(self)
    )
    with pytest.raises(ReferenceFitError, match="dataset.reference_fit.max_steps"):
        run_training(tmp_path, "dataset.reference_fit.max_steps=3", "dataset.reference_fit.max_kl=1e-6")
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "failed" and "ReferenceFitError" in summary["error"]
    assert closed == [1]


def test_same_seed_same_run_on_cpu(tmp_path):
    """Exact: the same computation, repeated in one process with the same thread count."""
    a = run_training(tmp_path / "a", "trainer.max_steps=6")
    b = run_training(tmp_path / "b", "trainer.max_steps=6")
    assert a["final_eval"] == b["final_eval"]
    assert a["final_train"]["train/loss"] == b["final_train"]["train/loss"]


def test_gradient_accumulation_matches_the_full_batch(tmp_path):
    """micro_batch_size=4 with batch_size=16 takes the same steps as one 16-pair forward (fp32)."""
    full = run_training(
        tmp_path / "full", "trainer.batch_size=16", "trainer.max_steps=3", "trainer.log_every_steps=1"
    )
    split = run_training(
        tmp_path / "split",
        "trainer.batch_size=16",
        "trainer.micro_batch_size=4",
        "trainer.max_steps=3",
        "trainer.log_every_steps=1",
    )
    # 4-pair forwards sum in another order than one 16-pair forward: rounding, carried over 3 steps
    for key in ["train/loss", "train/grad_norm"]:
        assert split["final_train"][key] == pytest.approx(full["final_train"][key], rel=1e-4, abs=1e-6)
    # a count of 16 pairs' margin signs: one pair within rounding of a tie may land either side (1/16)
    accuracies = [run["final_train"]["train/rewards/accuracies"] for run in (split, full)]
    assert accuracies[0] == pytest.approx(accuracies[1], abs=1 / 16 + 1e-9)
    assert split["final_eval"]["eval/loss"] == pytest.approx(full["final_eval"]["eval/loss"], rel=1e-4)


@pytest.mark.parametrize("name", list(OBJECTIVES))
def test_every_objective_trains_on_the_default_task(tmp_path, name):
    overrides = [f"objective={name}", "trainer.max_steps=4"]
    if name == "hpo":
        overrides.append("objective.actor_warmup_steps=2")  # so the actor term is exercised
    summary = run_training(tmp_path, *overrides)
    assert summary["status"] == "completed"
    assert math.isfinite(summary["final_train"]["train/loss"])
    assert math.isfinite(summary["final_eval"]["eval/win_rate"])


@pytest.mark.parametrize("estimator", ["exact", "token", "samples"])
def test_expo_kl_estimators_all_run_and_start_near_zero(tmp_path, estimator):
    """At step 0 the policy is the reference. The token and sample estimates are then exactly 0; the exact
    one compares pi_ref renormalised over the candidates with the unnormalised policy, so it starts at
    -log(candidate mass) = -log(1 - outside_mass) per prompt, small after a good reference fit."""
    summary = run_training(tmp_path, "objective=expo", f"kl={estimator}", "trainer.max_steps=3")
    start = summary["reference_eval"]
    if estimator == "exact":
        # eval/kl is a mean over the held-out pairs of their prompt's -log(1 - outside mass) (eval.json has
        # each prompt's mass): weighted by pairs per prompt, so it lies within the per-prompt values' range
        at_start = json.loads((tmp_path / "eval.json").read_text())["history"][0]
        masses = [v for k, v in at_start.items() if k.startswith("eval/outside_mass/p")]
        per_prompt = [-math.log(1 - m) for m in masses]
        assert len(masses) == 6 and min(per_prompt) <= start["eval/kl"] <= max(per_prompt)
    else:
        assert abs(start["eval/kl"]) < 1e-5
    final = summary["final_eval"]["eval/kl"]
    assert final != start["eval/kl"]
    if estimator != "samples":  # exact and token are true KLs; the sampled one is unbiased, not >= 0
        assert final > 0


def test_hpo_logs_aux_rewards_and_its_terms(tmp_path):
    summary = run_training(
        tmp_path,
        "objective=hpo",
        "aux_reward=keyword",
        "objective.actor_warmup_steps=2",
        "trainer.max_steps=4",
    )
    final = summary["final_train"]
    assert {
        "train/aux_reward/chosen",
        "train/aux_reward/rejected",
        "train/actor_loss",
        "train/value_loss",
    } <= set(final)
    assert final["train/actor_loss"] != 0.0
    assert "eval/aux_reward" in summary["final_eval"]


def test_each_component_of_a_composite_reward_is_logged_on_its_own(tmp_path):
    """R = 0.5 length + 1 keyword: the logged R of the chosen responses is the weighted sum of the logged
    unweighted components, in training and in the exact evaluation."""
    summary = run_training(
        tmp_path,
        "objective=hpo",
        "aux_reward=[length,keyword]",
        "aux_reward.length.weight=0.5",
        "trainer.max_steps=2",
        "trainer.log_every_steps=1",
    )
    train, final = summary["final_train"], summary["final_eval"]
    for side in ("chosen", "rejected"):
        parts = 0.5 * train[f"train/aux_reward/length/{side}"] + train[f"train/aux_reward/keyword/{side}"]
        assert train[f"train/aux_reward/{side}"] == pytest.approx(parts, rel=1e-5)
    parts = 0.5 * final["eval/aux_reward/length"] + final["eval/aux_reward/keyword"]
    assert final["eval/aux_reward"] == pytest.approx(parts, rel=1e-5)


def test_wandb_offline_run_is_written_next_to_the_run(tmp_path):
    run_training(tmp_path, "logger=wandb", "logger.mode=offline", "trainer.max_steps=2")
    assert list((tmp_path / "wandb").glob("offline-run-*"))


TINY_CLI = [
    "trainer.max_steps=2",
    "dataset.reference_fit.max_steps=50",
    "dataset.reference_fit.max_kl=10",
    "model.num_layers=1",
    "model.hidden_size=32",
    "model.num_heads=2",
    "model.intermediate_size=64",
    "dataset.num_prompts=4",
    "logger=none",
]


def prefopt_train(*args: str, cache) -> subprocess.CompletedProcess:
    env = {**os.environ, "PREFOPT_CACHE": str(cache)}
    command = [sys.executable, "-m", "prefopt", "train", *args]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)


def test_cli_multirun_leaves_one_complete_run_dir_per_job_with_the_numbers_of_a_run_alone(tmp_path):
    """Two jobs side by side, then job 0's config alone in a fresh cache: a job's thread count does not
    depend on how many run at once, so its numbers are the same."""
    sweep = tmp_path / "sweep"
    result = prefopt_train(
        "-m", "objective.beta=0.05,0.5", *TINY_CLI, f"hydra.sweep.dir={sweep}", cache=tmp_path / "c1"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert [p.name for p in jobs] == ["0", "1"]
    betas = set()
    for job in jobs:
        for name in [
            ".hydra/config.yaml",
            "config.yaml",
            "metrics.jsonl",
            "eval.json",
            "summary.json",
            "checkpoint/config.json",
        ]:
            assert (job / name).exists(), job / name
        summary = json.loads((job / "summary.json").read_text())
        assert summary["status"] == "completed"
        betas.add(summary["final_eval"] and _beta_of(job))
        log = (job / "train.log").read_text()  # the run's whole log, not only the terminal's
        assert "reference fit: KL(pi_ref || pi_theta0)" in log and "eval @ step 2" in log
        assert "finished" in log
    assert betas == {0.05, 0.5}
    alone = tmp_path / "alone"
    result = prefopt_train("objective.beta=0.05", *TINY_CLI, f"hydra.run.dir={alone}", cache=tmp_path / "c2")
    assert result.returncode == 0, result.stderr[-3000:]
    in_sweep = json.loads((sweep / "0" / "summary.json").read_text())
    by_itself = json.loads((alone / "summary.json").read_text())
    assert by_itself["final_eval"] == in_sweep["final_eval"]
    assert by_itself["final_train"]["train/loss"] == in_sweep["final_train"]["train/loss"]


def test_cli_errors_are_one_line_and_the_traceback_goes_to_train_log(tmp_path):
    """A reference fit that cannot reach max_kl fails at run time: one line on the terminal naming what to
    change, the traceback in train.log, a failed summary.json."""
    run_dir = tmp_path / "run"
    result = prefopt_train(
        *TINY_CLI,
        "dataset.reference_fit.max_steps=2",
        "dataset.reference_fit.max_kl=1e-6",
        f"hydra.run.dir={run_dir}",
        cache=tmp_path / "cache",
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout
    assert "dataset.reference_fit.max_steps" in result.stderr
    assert "Traceback" in (run_dir / "train.log").read_text()
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "failed"
    # it failed before its first training step: the dir is not "in use", a corrected command runs there
    again = prefopt_train(*TINY_CLI, f"hydra.run.dir={run_dir}", cache=tmp_path / "cache")
    assert again.returncode == 0, again.stderr
    assert "replacing an earlier attempt" in (run_dir / "train.log").read_text()
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "completed"


def _beta_of(job):
    from omegaconf import OmegaConf

    return OmegaConf.load(job / ".hydra" / "config.yaml").objective.beta
