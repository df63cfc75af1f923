"""Runs survive preemption, faults and bad state: kill a run at any moment, resume it, get the same run.

The kill tests run the real CLI in a subprocess, kill it with SIGKILL (or send SIGTERM) once metrics.jsonl
shows a given step, resume with `trainer.checkpoint.resume=auto` into the same run dir, and compare every
step's loss with an uninterrupted run's (CPU, one thread: equal as floats)."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import FAST, FAST_MODEL, ROOT, compose_config, read_jsonl, run_training
from waiting import wait_for_file_event

from prefopt.config import ConfigError, load_run_config
from prefopt.objectives import OBJECTIVES, ObjectiveOutput
from prefopt.training.checkpoint import CheckpointError, checkpoint_dir, find_checkpoint, save_checkpoint

PREFOPT = str(Path(sys.executable).with_name("prefopt"))
# the embedded default model (slow enough per step that a kill lands mid-run), on FAST's small task
KILL_RUN = [
    *[o for o in FAST if not o.startswith(("trainer.max_steps", "eval.eval_every_steps"))],
    "trainer.max_steps=40",
    "trainer.checkpoint.every_steps=10",
    "trainer.log_every_steps=1",
    "eval.eval_every_steps=20",
    "seed=5",
]


def cli(run_dir: Path, *overrides: str) -> subprocess.Popen:
    args = [PREFOPT, "train", *KILL_RUN, f"hydra.run.dir={run_dir}", *overrides]
    env = {**os.environ, "CI": "true"}
    return subprocess.Popen(
        args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def finish(process: subprocess.Popen) -> subprocess.CompletedProcess:
    out, err = process.communicate(timeout=600)
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


def logged_steps(metrics: Path) -> set[int]:
    """Steps with a training record in metrics.jsonl; a line still being written is not one yet."""
    steps = set()
    for line in metrics.read_text().splitlines() if metrics.exists() else []:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "train/loss" in record:
            steps.add(record["step"])
    return steps


def wait_for_step(process: subprocess.Popen, run_dir: Path, step: int) -> None:
    """Block until metrics.jsonl records training step `step` or later, woken by each change in the run
    dir; fail with the run's stderr if it ends first (the deadline only bounds a hang)."""
    wait_for_file_event(
        lambda: max(logged_steps(run_dir / "metrics.jsonl"), default=0) >= step,
        [run_dir],
        600,
        f"step {step} in {run_dir / 'metrics.jsonl'}",
        process=process,
    )


def losses(run_dir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["train/loss"]) for r in read_jsonl(run_dir / "metrics.jsonl") if "train/loss" in r]


def eval_steps(run_dir: Path) -> list[int]:
    return [r["step"] for r in read_jsonl(run_dir / "metrics.jsonl") if "eval/loss" in r]


@pytest.mark.parametrize("objective", [[], ["objective=hpo"]], ids=["dpo", "hpo-with-value-head"])
def test_a_run_killed_with_sigkill_and_resumed_takes_the_uninterrupted_runs_steps(tmp_path, objective):
    whole = finish(cli(tmp_path / "whole", *objective))
    assert whole.returncode == 0, whole.stderr
    killed = cli(tmp_path / "killed", *objective)
    wait_for_step(killed, tmp_path / "killed", 15)
    killed.kill()  # SIGKILL: no handler runs, nothing is flushed or closed
    killed.wait()
    # the newest whole checkpoint it left (step 10 unless the kill landed after step 20's save)
    kept = find_checkpoint("auto", tmp_path / "killed")
    saved_at = [step for step in (10, 20, 30) if checkpoint_dir(tmp_path / "killed", step) == kept]
    resumed = finish(cli(tmp_path / "killed", *objective, "trainer.checkpoint.resume=auto"))
    assert resumed.returncode == 0, resumed.stderr

    expected = losses(tmp_path / "whole")
    assert [step for step, _ in expected] == list(range(1, 41))
    assert losses(tmp_path / "killed") == expected  # every step once, each loss the same float
    assert eval_steps(tmp_path / "killed") == eval_steps(tmp_path / "whole") == [0, 20, 40]
    summary = json.loads((tmp_path / "killed" / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["resumed_at"] == saved_at != []
    whole_summary = json.loads((tmp_path / "whole" / "summary.json").read_text())
    assert summary["final_eval"] == whole_summary["final_eval"]


def test_sigterm_checkpoints_the_current_step_and_prints_the_command_that_resumes(tmp_path):
    whole = finish(cli(tmp_path / "whole"))
    run = cli(tmp_path / "run")
    wait_for_step(run, tmp_path / "run", 5)
    run.send_signal(signal.SIGTERM)
    stopped = finish(run)
    assert stopped.returncode == 128 + signal.SIGTERM
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "preempted"
    step = summary["step"]
    assert 5 <= step < 40 and Path(summary["checkpoint"]) == checkpoint_dir(tmp_path / "run", step)
    # what the terminal must show is the resume command itself (summary.json's, verbatim), not a wording
    command = summary["resume"]
    assert command in stopped.stderr and "Traceback" not in stopped.stderr
    words = shlex.split(command)
    assert "trainer.checkpoint.resume=auto" in words
    assert words[:2] == ["prefopt", "train"] and f"hydra.run.dir={tmp_path / 'run'}" in words
    resumed = subprocess.run(
        [PREFOPT, *words[1:]], cwd=ROOT, env={**os.environ, "CI": "true"}, capture_output=True, text=True
    )
    assert resumed.returncode == 0, resumed.stderr
    assert losses(tmp_path / "run") == losses(tmp_path / "whole")
    assert whole.returncode == 0


def test_a_second_signal_stops_at_once():
    from prefopt.training.preemption import PreemptionGuard

    with PreemptionGuard(["SIGUSR1"]) as guard:
        os.kill(os.getpid(), signal.SIGUSR1)
        assert guard.requested == "SIGUSR1"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGUSR1)
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL  # the previous handler is back


def nan_at(steps: set[int]):
    """DPO whose loss is NaN at the given (0-based) steps: a fault injected through a test objective."""
    dpo = OBJECTIVES["dpo"]

    def loss(policy, reference, extras, **hparams) -> ObjectiveOutput:
        output = dpo.loss(policy, reference, extras, **hparams)
        if extras.step in steps:
            return replace(output, losses=output.losses * float("nan"))
        return output

    return replace(dpo, loss=loss)


def test_a_non_finite_step_is_skipped_counted_and_logged_with_its_pairs(tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(OBJECTIVES, "nan_dpo", nan_at({2, 3}))
    summary = run_training(tmp_path, "objective.name=nan_dpo", "trainer.log_every_steps=1")
    assert [bad["step"] for bad in summary["bad_steps"]] == [3, 4]
    assert all(len(bad["pairs"]) == 32 and bad["loss"] != bad["loss"] for bad in summary["bad_steps"])
    assert "train pairs [" in caplog.text
    records = {r["step"]: r for r in read_jsonl(tmp_path / "metrics.jsonl") if "train/loss" in r}
    assert records[10]["train/bad_steps"] == 2
    assert all(r["train/loss"] == r["train/loss"] for r in records.values())  # NaN never averaged in
    assert summary["final_eval"]["eval/loss"] == summary["final_eval"]["eval/loss"]  # weights stayed finite


def test_max_bad_steps_in_a_row_stop_the_run_with_a_clear_error(tmp_path, monkeypatch):
    from prefopt.training.train import NonFiniteTraining

    monkeypatch.setitem(OBJECTIVES, "nan_dpo", nan_at(set(range(4, 100))))
    with pytest.raises(NonFiniteTraining, match="trainer.max_bad_steps=3"):
        run_training(tmp_path, "objective.name=nan_dpo", "trainer.max_bad_steps=3")
    assert json.loads((tmp_path / "summary.json").read_text())["status"] == "failed"


def test_a_model_with_a_non_finite_weight_is_never_checkpointed(tmp_path):
    from prefopt.data.sampler import PairSampler

    model = torch.nn.ModuleDict({"policy": torch.nn.Linear(2, 2)})
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    with torch.no_grad():
        model["policy"].weight[0, 0] = float("inf")
    with pytest.raises(CheckpointError, match="non-finite"):
        save_checkpoint(tmp_path, 1, model, optimizer, scheduler, PairSampler(4, 2, 0), {}, 2)
    assert not (tmp_path / "checkpoints").exists() or not list((tmp_path / "checkpoints").iterdir())


def test_a_truncated_checkpoint_falls_back_to_the_previous_one_with_one_warning(tmp_path, caplog):
    first = run_training(tmp_path, "trainer.max_steps=20", "trainer.checkpoint.every_steps=10")
    newest = checkpoint_dir(tmp_path, 20)
    weights = next((newest / "state").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="truncated"):
        find_checkpoint(str(newest), tmp_path)  # an explicit path: no silent fallback
    caplog.clear()
    assert find_checkpoint("auto", tmp_path) == checkpoint_dir(tmp_path, 10)
    assert len([r for r in caplog.records if r.levelname == "WARNING"]) == 1
    (tmp_path / "summary.json").unlink()  # as if killed during the final evaluation
    resumed = run_training(
        tmp_path,
        "trainer.max_steps=20",
        "trainer.checkpoint.every_steps=10",
        "trainer.checkpoint.resume=auto",
    )
    assert resumed["resumed_at"] == [10]
    assert resumed["final_eval"] == first["final_eval"]


def test_a_write_killed_midway_leaves_nothing_a_resume_reads_and_is_cleaned_up(tmp_path):
    run_training(tmp_path, "trainer.max_steps=4", "trainer.checkpoint.every_steps=2")
    half = tmp_path / "checkpoints" / ".step-000006.tmp-999"  # as a SIGKILL during a write leaves it
    (half / "state").mkdir(parents=True)
    assert find_checkpoint("auto", tmp_path) == checkpoint_dir(tmp_path, 4)
    (tmp_path / "summary.json").unlink()
    run_training(
        tmp_path, "trainer.max_steps=6", "trainer.checkpoint.every_steps=2", "trainer.checkpoint.resume=auto"
    )
    assert not half.exists()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-000004", "step-000006"]


def test_a_missing_checkpoint_file_is_named(tmp_path):
    run_training(tmp_path, "trainer.max_steps=10", "trainer.checkpoint.every_steps=10")
    state = checkpoint_dir(tmp_path, 10) / "trainer_state.json"
    state.unlink()
    with pytest.raises(CheckpointError, match="trainer_state.json"):
        find_checkpoint(str(checkpoint_dir(tmp_path, 10)), tmp_path)


def test_resuming_with_a_changed_config_names_the_keys_unless_they_may_change(tmp_path):
    from prefopt.training.resume import plan_resume

    run_training(tmp_path, "trainer.max_steps=10", "trainer.checkpoint.every_steps=5")
    (tmp_path / "summary.json").unlink()

    def plan(*overrides):
        rc = load_run_config(
            compose_config(
                *FAST, *FAST_MODEL, "trainer.max_steps=10", "trainer.checkpoint.every_steps=5", *overrides
            )
        )
        return plan_resume(rc, tmp_path)

    with pytest.raises(ConfigError, match=r"objective\.beta \(0\.1 -> 0\.3\).*trainer\.optimizer\.lr"):
        plan("trainer.checkpoint.resume=auto", "objective.beta=0.3", "trainer.optimizer.lr=0.5")
    assert plan("trainer.checkpoint.resume=auto", "trainer.max_steps=30").checkpoint == checkpoint_dir(
        tmp_path, 10
    )
    assert plan(
        "trainer.checkpoint.resume=auto",
        "objective.beta=0.3",
        "trainer.checkpoint.resume_allow_changes=[objective]",
    ).checkpoint
    with pytest.raises(ConfigError, match="trainer.checkpoint.resume"):
        plan(f"trainer.checkpoint.resume={tmp_path / 'nowhere'}")


def test_a_longer_run_continues_from_a_finished_ones_checkpoint(tmp_path):
    """trainer.max_steps may change on resume (the default allowlist): 10 steps, then 10 more."""
    run_training(tmp_path / "a", "trainer.max_steps=10", "trainer.checkpoint.every_steps=5")
    longer = run_training(
        tmp_path / "b",
        "trainer.max_steps=20",
        f"trainer.checkpoint.resume={tmp_path / 'a'}",
        "trainer.checkpoint.every_steps=5",
    )
    assert longer["resumed_at"] == [10]
    assert [step for step, _ in losses(tmp_path / "b")][-1] == 20
    assert losses(tmp_path / "b")[:1] == losses(tmp_path / "a")[:1]  # the first run's records came along


def test_a_finished_run_is_skipped_on_resume(tmp_path):
    first = run_training(tmp_path, "trainer.max_steps=4")
    before = (tmp_path / "metrics.jsonl").read_text()
    again = run_training(tmp_path, "trainer.max_steps=4", "trainer.checkpoint.resume=auto")
    assert again == first and (tmp_path / "metrics.jsonl").read_text() == before


def test_a_multirun_is_resumed_as_a_whole_skipping_finished_jobs(tmp_path):
    sweep = tmp_path / "sweep"
    args = [PREFOPT, "train", "-m", *FAST, "trainer.max_steps=6", "seed=0,1", f"hydra.sweep.dir={sweep}"]
    env = {**os.environ, "CI": "true"}
    first = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True)
    assert first.returncode == 0, first.stderr
    done = (sweep / "0" / "metrics.jsonl").read_text()
    for name in ("summary.json", "eval.json"):  # job 1 as if killed after its last checkpoint
        (sweep / "1" / name).unlink()
    again = subprocess.run(
        [*args, "trainer.checkpoint.resume=auto"], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert again.returncode == 0, again.stderr
    assert (sweep / "0" / "metrics.jsonl").read_text() == done  # skipped
    resumed = json.loads((sweep / "1" / "summary.json").read_text())
    assert resumed["status"] == "completed" and resumed["resumed_at"] == [6]


class BrokenWandbRun:
    """Logs twice, then fails as a W&B crash (a dead service process) would."""

    id, dir = "broken", "."
    settings = type("Settings", (), {"mode": "offline"})()

    def __init__(self):
        self.calls = 0
        self.summary = {}

    def log(self, *args, **kwargs):
        self.calls += 1
        if self.calls > 2:
            raise ConnectionError("wandb service died")

    def finish(self, *args, **kwargs):
        pass


def test_wandb_failing_to_start_or_crashing_mid_run_never_stops_training(tmp_path, monkeypatch, caplog):
    import wandb

    def refuse(*args, **kwargs):
        raise wandb.errors.CommError("no network")

    monkeypatch.setattr(wandb, "init", refuse)
    summary = run_training(tmp_path / "no-start", "logger=wandb", "logger.mode=online")
    assert summary["status"] == "completed"
    assert "W&B is off for this run" in caplog.text
    assert eval_steps(tmp_path / "no-start")[-1] == 10

    monkeypatch.setattr(wandb, "init", lambda *args, **kwargs: BrokenWandbRun())
    summary = run_training(
        tmp_path / "crash", "logger=wandb", "logger.mode=offline", "trainer.log_every_steps=1"
    )
    assert summary["status"] == "completed"
    assert "W&B is off for the rest of the run" in caplog.text
    assert [step for step, _ in losses(tmp_path / "crash")] == list(range(1, 11))  # metrics.jsonl whole


def test_a_lora_checkpoint_holds_only_the_adapter_and_resumes_exactly(tmp_path):
    """3 steps, then resumed to 6 (a constant schedule, so the first 3 are the same steps): the same
    losses as 6 steps in one go; the checkpoint's weights are the adapter's alone."""
    from conftest import save_tiny_llama
    from test_acceptance_data import fixture
    from test_tokenization import bos_tokenizer

    from prefopt.training.checkpoint import read_state
    from prefopt.training.train import train

    model = save_tiny_llama(tmp_path / "model", bos_tokenizer())
    common = [*fixture("preference", tmp_path / "data"), "dataset=preference", "model=pretrained"]
    common += [f"model.name_or_path={model}", "model.lora.r=4", "logger=none", "trainer.batch_size=8"]
    common += ["trainer.optimizer.lr_schedule=constant_with_warmup", "trainer.log_every_steps=1"]
    common += ["trainer.checkpoint.every_steps=3", "eval.eval_every_steps=100"]

    def run(run_dir: Path, *overrides: str) -> dict:
        run_dir.mkdir(exist_ok=True)
        return train(load_run_config(compose_config(*common, *overrides)), run_dir)

    run(tmp_path / "whole", "trainer.max_steps=6")
    run(tmp_path / "parts", "trainer.max_steps=3")
    (tmp_path / "parts" / "summary.json").unlink()
    resumed = run(tmp_path / "parts", "trainer.max_steps=6", "trainer.checkpoint.resume=auto")
    assert resumed["resumed_at"] == [3]
    assert losses(tmp_path / "parts") == losses(tmp_path / "whole")
    weights = [
        k for k in read_state(checkpoint_dir(tmp_path / "whole", 6))["tensor_keys"] if k.startswith("model.")
    ]
    assert weights and all("lora_" in k for k in weights)


def test_a_resumed_run_continues_the_same_wandb_run(tmp_path, monkeypatch):
    import wandb

    calls = []

    class Run(BrokenWandbRun):
        def log(self, *args, **kwargs):
            pass

    def init(**kwargs):
        calls.append(kwargs)
        run = Run()
        run.id = kwargs["id"] or "run-7"
        return run

    monkeypatch.setattr(wandb, "init", init)
    overrides = [
        "logger=wandb",
        "logger.mode=offline",
        "trainer.max_steps=6",
        "trainer.checkpoint.every_steps=3",
    ]
    run_training(tmp_path, *overrides)
    (tmp_path / "summary.json").unlink()
    run_training(tmp_path, *overrides, "trainer.checkpoint.resume=auto")
    assert [(c["id"], c["resume"]) for c in calls] == [(None, None), ("run-7", "allow")]


def test_with_checkpointing_off_a_run_ends_with_the_export_alone_and_a_preempted_one_still_checkpoints(
    tmp_path, monkeypatch
):
    """trainer.checkpoint.every_steps=null: a finished run writes its Hugging Face export, no training state
    (nothing to resume: summary.json says completed, resume=auto skips it); one that failed in its final
    evaluation left no checkpoint and starts over; a preempted one writes its step, and resumes exactly."""
    import prefopt.engine.distributed
    import prefopt.evaluation.convergence
    from prefopt.training.preemption import Preempted

    off = ["trainer.max_steps=4", "trainer.checkpoint.every_steps=null", "trainer.log_every_steps=1"]
    done = run_training(tmp_path / "done", *off)
    assert not (tmp_path / "done" / "checkpoints").exists() and (tmp_path / "done" / "checkpoint").is_dir()
    assert run_training(tmp_path / "done", *off, "trainer.checkpoint.resume=auto") == done

    def fail(*args, **kwargs):
        raise RuntimeError("final evaluation failed")

    with monkeypatch.context() as patch:
        patch.setattr(prefopt.evaluation.convergence, "run_convergence", fail)
        with pytest.raises(RuntimeError, match="final evaluation"):
            run_training(tmp_path / "failed", *off)
    assert not (tmp_path / "failed" / "checkpoints").exists()
    again = run_training(tmp_path / "failed", *off, "trainer.checkpoint.resume=auto")
    assert again["resumed_at"] == [] and losses(tmp_path / "failed") == losses(tmp_path / "done")

    calls = []
    with monkeypatch.context() as patch:  # a SIGTERM seen after step 2
        patch.setattr(
            prefopt.engine.distributed,
            "agreed_stop",
            lambda requested, device: calls.append(1) or ("SIGTERM" if len(calls) == 2 else None),
        )
        with pytest.raises(Preempted):
            run_training(tmp_path / "preempted", *off)
    assert find_checkpoint("auto", tmp_path / "preempted") == checkpoint_dir(tmp_path / "preempted", 2)
    resumed = run_training(tmp_path / "preempted", *off, "trainer.checkpoint.resume=auto")
    assert resumed["resumed_at"] == [2] and losses(tmp_path / "preempted") == losses(tmp_path / "done")
    assert [p.name for p in (tmp_path / "preempted" / "checkpoints").iterdir()] == ["step-000002"]
