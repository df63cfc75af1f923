"""`prefopt evaluate` on a saved run reports the run's own final eval: it prepares the run as it trained
(data, tokenizer, the run's own reference: fitted, starting model or LoRA base), loads the checkpoint into
the policy and runs the evaluation stage, never the training loop.

Equality is exact (==), by construction: on CPU with the run's thread count the same float32 weights (the
checkpoint holds the trained policy's bits), the same reference log-probs (the same fitted reference,
checked by its sha256, or the same starting model) and the same code give the same bits, and generation
samples under the same seed."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import pytest
from conftest import FAST, ROOT, read_jsonl, run_training

GENERATION = ["eval.generation.num_prompts=3", "eval.generation.max_new_tokens=4"]


def evaluate(run_dir, *overrides: str) -> tuple[dict, dict, object]:
    """Run `prefopt evaluate <run_dir>`; (its eval.json "final", its summary.json, its run dir)."""
    from prefopt.training.evaluate_saved import main

    before = set((run_dir / "evaluate").iterdir()) if (run_dir / "evaluate").exists() else set()
    assert main([str(run_dir), "logger=none", *GENERATION, *overrides]) == 0
    (out,) = set((run_dir / "evaluate").iterdir()) - before
    final = json.loads((out / "eval.json").read_text())["final"]
    return final, json.loads((out / "summary.json").read_text()), out


def assert_same_final(run_dir, final: dict) -> None:
    """Every number of the run's final eval (held-out accuracy, loss, margins, exact synthetic metrics,
    generation win rates when the run generated) comes back bit for bit."""
    expected = json.loads((run_dir / "eval.json").read_text())["final"]
    assert "eval/rewards/accuracies" in expected and "eval/win_rate" in expected
    assert {k: final.get(k) for k in expected} == expected


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """The default config (model=tiny: a fitted reference; eval.generate as the default has it: off)."""
    run_dir = tmp_path_factory.mktemp("tiny") / "run"
    run_training(run_dir, "trainer.max_steps=6")
    return run_dir


def test_evaluate_reports_the_tiny_runs_own_final_eval(tiny_run):
    final, summary, out = evaluate(tiny_run)
    assert_same_final(tiny_run, final)
    assert summary["reference"]["source"] == "fitted" and summary["reference"]["matches_run"] is True
    recorded = json.loads((tiny_run / "summary.json").read_text())["reference_fit"]
    assert summary["reference"]["weights_sha256"] == recorded["weights_sha256"]
    assert summary["step"] == 6
    # the evaluation stage only: one eval record at the run's last step, the generation eval's rows
    assert {r["step"] for r in read_jsonl(out / "metrics.jsonl")} == {6}
    assert len((out / "generations.jsonl").read_text().splitlines()) == 3
    assert "eval/generate/win_rate_vs_reference" in final
    assert not (out / "checkpoint").exists() and not (out / "checkpoints").exists()


def test_evaluate_reports_the_generation_win_rate_of_a_run_that_generated(tmp_path):
    run_training(tmp_path, "trainer.max_steps=4", "eval.generate=true", *GENERATION)
    final, _, _ = evaluate(tmp_path)
    assert_same_final(tmp_path, final)
    assert "eval/generate/win_rate_vs_reference" in json.loads((tmp_path / "eval.json").read_text())["final"]


def test_a_missing_fitted_reference_is_fitted_again_and_checked(tiny_run, tmp_path, monkeypatch):
    monkeypatch.setenv("PREFOPT_CACHE", str(tmp_path / "empty-cache"))
    final, summary, _ = evaluate(tiny_run)
    assert summary["reference_fit"]["cached"] is False and summary["reference"]["matches_run"] is True
    assert_same_final(tiny_run, final)


def test_a_cached_fit_with_other_weights_is_fitted_again(tiny_run, tmp_path, monkeypatch, caplog):
    """A sound cache entry under the run's key whose weights are not the run's reference (another
    machine's fit; here the trained policy): the digest the run recorded tells them apart, and the
    reference is fitted again from the run's config and seed."""
    from transformers import AutoModelForCausalLM

    from prefopt.engine.reference_fit import store_cached

    monkeypatch.setenv("PREFOPT_CACHE", str(tmp_path / "cache"))
    recorded = json.loads((tiny_run / "summary.json").read_text())["reference_fit"]
    other = AutoModelForCausalLM.from_pretrained(tiny_run / "checkpoint")
    store_cached(other, recorded["cache_key"], {k: v for k, v in recorded.items() if k != "cached"})
    with caplog.at_level(logging.WARNING):
        final, summary, _ = evaluate(tiny_run)
    assert any("fitting it again" in r.getMessage() for r in caplog.records)
    assert summary["reference"]["matches_run"] is True
    assert_same_final(tiny_run, final)


def test_evaluate_reports_a_lora_runs_own_final_eval(tmp_path):
    """Under LoRA the checkpoint is the adapter; the base is the run's fitted reference, rebuilt."""
    run_training(tmp_path, "trainer.max_steps=4", "model.lora.r=2")
    assert (tmp_path / "checkpoint" / "adapter_config.json").is_file()
    final, _, _ = evaluate(tmp_path)
    assert_same_final(tmp_path, final)


def test_evaluate_reports_a_pretrained_runs_own_final_eval(tiny_run, tmp_path):
    """A run that started from a saved model: its reference is that starting model, not the checkpoint."""
    start = tiny_run / "checkpoint"
    run_training(
        tmp_path, "trainer.max_steps=4", "model=pretrained", f"model.name_or_path={start}", tiny_model=False
    )
    final, summary, _ = evaluate(tmp_path)
    assert summary["reference_fit"] is None
    assert_same_final(tmp_path, final)
    assert final["eval/rewards/margins"] != 0.0  # the checkpoint is not compared with itself


def test_evaluate_refuses_a_run_dir_another_process_holds(tiny_run, capsys):
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from prefopt.files import RunDirLock; RunDirLock(sys.argv[1]).acquire(); "
            "print('held', flush=True); time.sleep(60)",
            str(tiny_run),
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        from prefopt.training.evaluate_saved import main

        before = sorted((tiny_run / "evaluate").iterdir()) if (tiny_run / "evaluate").exists() else []
        assert main([str(tiny_run), "logger=none"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and str(tiny_run) in err and f"pid {holder.pid}" in err
        after = sorted((tiny_run / "evaluate").iterdir()) if (tiny_run / "evaluate").exists() else []
        assert after == before  # nothing written
    finally:
        holder.kill()
        holder.wait()


def test_a_bare_checkpoint_is_its_own_reference(tiny_run, tmp_path, monkeypatch):
    """Without a run dir nothing says what the reference was: the checkpoint is its own, so with the same
    seed both sample the same responses, every comparison ties and the win rate is exactly 1/2."""
    from prefopt.training.evaluate_saved import main

    monkeypatch.chdir(tmp_path)  # the output goes to ./outputs/evaluate/<time>
    data = [o for o in FAST if o.startswith("dataset.")]  # the run's task: its words are the tokenizer's
    assert main([str(tiny_run / "checkpoint"), "logger=none", *data, *GENERATION]) == 0
    (out,) = (tmp_path / "outputs" / "evaluate").iterdir()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["final_eval"]["eval/generate/win_rate_vs_reference"] == 0.5


def test_evaluate_refuses_a_dir_without_a_saved_model(tmp_path, capsys):
    from prefopt.training.evaluate_saved import main

    assert main([str(tmp_path)]) == 2
    assert "no saved model" in capsys.readouterr().err


def test_evaluate_reports_an_hpo_runs_own_final_eval_with_its_trained_value_head(tmp_path):
    """HPO's critic is exported beside the policy (value_head.safetensors) and loaded back."""
    run_training(tmp_path, "objective=hpo", "aux_reward=length", "trainer.max_steps=4")
    assert (tmp_path / "checkpoint" / "value_head.safetensors").is_file()
    final, _, _ = evaluate(tmp_path)
    assert_same_final(tmp_path, final)


@pytest.fixture
def fake_run(tmp_path):
    """A run dir as far as `evaluation_config` reads it: the default config and a checkpoint's config.json."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from prefopt import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        config = compose("train", ["trainer.layout.pack_tokens=???"])
    (tmp_path / "config.yaml").write_text(OmegaConf.to_yaml(config))
    (tmp_path / "checkpoint").mkdir()
    (tmp_path / "checkpoint" / "config.json").write_text("{}")
    return tmp_path


def test_evaluate_overrides_are_typed_and_applied_as_hydra_applies_them(fake_run):
    """Hydra's parser types the values (`seed=3` is the int 3, not the string or 3.0); `+` adds a key the
    config lacks, `++` sets one either way, `~` deletes one, `group=option` takes conf/<group>/<option>.yaml
    and a ??? key is set without `+`."""
    from prefopt.training.evaluate_saved import evaluation_config

    overrides = [
        "seed=3",
        "objective.label_smoothing=0.25",
        "trainer.layout.share_prompts=false",
        "trainer.checkpoint.resume_allow_changes=[logger]",
        "+eval.generation.llm.model=gpt-4o",
        "++eval.generation.judge='llm'",
        "++dataset.extra=null",
        "logger=none",
        "~logger.entity",
        "~trainer.optimizer.fused=null",
        "trainer.layout.pack_tokens=64",
    ]
    raw, out, source = evaluation_config(fake_run, overrides)
    assert (source, out) == (fake_run, fake_run / "evaluate")
    assert type(raw["seed"]) is int and raw["seed"] == 3
    assert raw["objective"]["label_smoothing"] == 0.25
    assert raw["trainer"]["layout"]["share_prompts"] is False
    assert raw["trainer"]["checkpoint"]["resume_allow_changes"] == ["logger"]
    assert raw["eval"]["generation"]["llm"] == {"model": "gpt-4o"}
    assert raw["eval"]["generation"]["judge"] == "llm"
    assert "extra" in raw["dataset"] and raw["dataset"]["extra"] is None
    assert "fused" not in raw["trainer"]["optimizer"]
    assert raw["logger"]["name"] == "none" and "entity" not in raw["logger"]
    assert raw["trainer"]["layout"]["pack_tokens"] == 64
    assert (
        raw["eval"]["generate"] is True and raw["trainer"]["checkpoint"]["export"] is False
    )  # evaluate's own


@pytest.mark.parametrize(
    "override",
    [
        "trainer.max_steps=[",  # malformed
        "trainer.max_step=5",  # no such key, and no + to add it
        "+seed=1",  # + adds; seed is there
        "~trainer.no_such_key",
        "~seed=5",  # seed is 0
        "logger=nonesuch",  # no such option
        "trainer.max_steps=5,6",  # a sweep
        "logger@trainer=none",  # a package
        "=5",
    ],
)
def test_a_bad_evaluate_override_is_one_line_naming_it(fake_run, capsys, override):
    from prefopt.training.evaluate_saved import main

    assert main([str(fake_run), "logger=none", override]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and repr(override) in err
    assert not (fake_run / "evaluate").exists()  # nothing written
