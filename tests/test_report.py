"""`prefopt report` on a fake multirun written to tmp_path: 2 objectives x 2 strengths x 2 seeds, plus one
job that never wrote summary.json.

Final metrics of a job (objective o, strength s, seed k), with e = 1 for expo and 0 for dpo:
    eval/win_rate     = 0.5 + 0.1 e + 0.1 s + 0.02 k
    eval/kl_star_good = 0.05 (expo) or 0.3 - 0.2 s (dpo)
    eval/aux_reward   = 1 + e + s
    train/loss        = 0.7 - 0.1 s
Group (dpo, s=0.1): win rates 0.51 (k=0) and 0.53 (k=1) -> mean 0.52, std (ddof=1) = sqrt(2 * 0.01^2 / 1)
= 0.014142. Group (expo, s=1): 0.7 and 0.72 -> mean 0.71, same std.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest
import yaml

from prefopt import report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

REPORT_NODE = {
    "title": "Fake preservation sweep",
    "notes": "Synthetic numbers.",
    "figures": [
        {
            "name": "preservation",
            "kind": "line",
            "x": "strength",
            "logx": True,
            "y": ["eval/kl_star_good", "eval/win_rate"],
            "hue": "objective",
            "hlines": {"eval/kl_star_good": "reference_eval/eval/kl_star_good"},
        },
        {
            "name": "trajectory",
            "kind": "trajectory",
            "y": ["eval/win_rate", "eval/pi_theta/p0/y0"],
            "hue": "objective",
            "facet": "strength",
            "hlines": {"eval/pi_theta/p0/y0": 0.6},
        },
        {
            "name": "pareto",
            "kind": "scatter",
            "x": "eval/aux_reward",
            "y": "eval/win_rate",
            "hue": "objective.name",
            "label": "objective.gamma",
        },
    ],
}


def final_metrics(objective: str, strength: float, seed: int) -> dict[str, float]:
    expo = objective == "expo"
    return {
        "eval/win_rate": 0.5 + 0.1 * expo + 0.1 * strength + 0.02 * seed,
        "eval/kl_star_good": 0.05 if expo else 0.3 - 0.2 * strength,
        "eval/aux_reward": 1.0 + expo + strength,
        "eval/pi_theta/p0/y0": 0.4 + 0.1 * strength,
    }


def write_job(
    job_dir: Path, overrides: dict, config: dict, summary: dict | None, history: list | None
) -> None:
    (job_dir / ".hydra").mkdir(parents=True)
    (job_dir / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    lines = [f"{key}={value}" for key, value in overrides.items()]
    (job_dir / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(lines))
    if summary is not None:
        (job_dir / "summary.json").write_text(json.dumps(summary))
    if history is not None:
        (job_dir / "eval.json").write_text(json.dumps({"history": history, "final": history[-1]}))


def job_files(objective: str, strength: float, seed: int, report_node: dict | None) -> tuple:
    overrides = {"objective": objective, "strength": strength, "seed": seed, "+experiment": "fake"}
    config = {
        "seed": seed,
        "strength": strength,
        "objective": {
            "name": objective,
            "gamma": 0.5 if objective == "expo" else 0.0,
            "lam": "${unregistered_resolver:0.1}",  # a resolver that exists only at train time
        },
        "run_dir": "${hydra:runtime.output_dir}",  # resolvers that only exist inside a Hydra run
    }
    if report_node is not None:
        config["report"] = report_node
    final = final_metrics(objective, strength, seed)
    summary = {
        "status": "completed",
        "objective": objective,
        "seed": seed,
        "overrides": [f"{k}={v}" for k, v in overrides.items()],
        "final_eval": final,
        "reference_eval": {"eval/win_rate": 0.5, "eval/kl_star_good": 0.02},
        "final_train": {"train/loss": 0.7 - 0.1 * strength},
        "reference_fit": {"kl": 0.004, "outside_mass": 0.01, "steps": 300},
        "runtime_s": 10.0 + seed,
    }
    start = {"step": 0, "eval/win_rate": 0.5, "eval/pi_theta/p0/y0": 0.4}
    history = [start, {"step": 50, **final}, {"step": 100, **final}]
    return overrides, config, summary, history


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory) -> Path:
    sweep_dir = tmp_path_factory.mktemp("fake") / "multirun"
    index = 0
    for objective in ("dpo", "expo"):
        for strength in (0.1, 1.0):
            for seed in (0, 1):
                write_job(sweep_dir / str(index), *job_files(objective, strength, seed, REPORT_NODE))
                index += 1
    overrides, config, _, _ = job_files("expo", 1.0, 2, REPORT_NODE)
    write_job(sweep_dir / str(index), overrides, config, summary=None, history=None)
    write_job(sweep_dir / "crashed", overrides, config, {"status": "failed", "error": "OOM"}, history=None)
    (sweep_dir / "multirun.yaml").write_text("hydra: {}\n")
    (sweep_dir / "not_a_job").mkdir()
    return sweep_dir


@pytest.fixture(scope="module")
def out(sweep: Path) -> Path:
    """The report of the fake sweep, written once (figures take about a second each) to a separate dir."""
    out_dir = sweep.parent / "report"
    assert report.write_report(sweep, out_dir) == out_dir / "REPORT.md"
    return out_dir


def test_runs_csv_has_one_row_per_job_with_values(out: Path):
    runs = pd.read_csv(out / "runs.csv", dtype={"job": str})
    completed = runs[runs["status"] == "completed"]
    assert len(completed) == 8
    assert runs.set_index("job").loc[["8", "crashed"], "status"].tolist() == ["missing", "failed"]
    job = runs[runs["job"] == "3"].iloc[0]  # dpo, strength 1.0, seed 1
    assert (job["objective"], job["strength"], job["seed"], job["experiment"]) == ("dpo", 1.0, 1.0, "fake")
    assert job["runtime_s"] == pytest.approx(11.0)
    assert job["eval/win_rate"] == pytest.approx(0.62)
    assert job["eval/kl_star_good"] == pytest.approx(0.1)
    assert job["train/loss"] == pytest.approx(0.6)


def test_summary_mean_and_std_over_seeds_match_hand_computed(out: Path):
    summary = pd.read_csv(out / "summary.csv")
    assert len(summary) == 4
    assert "seed" not in summary.columns and "experiment" not in summary.columns
    dpo = summary[(summary["objective"] == "dpo") & (summary["strength"] == 0.1)].iloc[0]
    assert dpo["n"] == 2
    assert dpo["eval/win_rate_mean"] == pytest.approx(0.52)
    assert dpo["eval/win_rate_std"] == pytest.approx(math.sqrt(2 * 0.01**2))
    expo = summary[(summary["objective"] == "expo") & (summary["strength"] == 1.0)].iloc[0]
    assert expo["eval/win_rate_mean"] == pytest.approx(0.71)
    assert expo["eval/kl_star_good_std"] == pytest.approx(0.0)
    assert "0.52 ± 0.01414" in (out / "REPORT.md").read_text()


def test_every_figure_is_a_png_referenced_in_report(sweep: Path, out: Path):
    text = (out / "REPORT.md").read_text()
    for name in ("preservation", "trajectory", "pareto"):
        png = out / f"{name}.png"
        assert png.read_bytes()[:8] == PNG_MAGIC
        assert f"({name}.png)" in text
    assert "Warning" not in text
    assert not (sweep / "REPORT.md").exists()  # --out leaves the sweep dir alone


def test_readings_are_computed_from_the_data(out: Path):
    text = (out / "REPORT.md").read_text()
    win_rate = next(line for line in text.splitlines() if line.startswith("- eval/win_rate vs strength"))
    assert "dpo: rises from 0.52 to 0.61" in win_rate  # mean win rate at strength 0.1 and at 1.0
    kl = next(line for line in text.splitlines() if line.startswith("- eval/kl_star_good vs strength"))
    assert "dpo: falls from 0.28 to 0.1" in kl and "expo: stays within [0.05, 0.05]" in kl


def test_header_counts_jobs_and_names_missing_and_failed_ones(out: Path):
    text = (out / "REPORT.md").read_text()
    assert text.startswith("# Fake preservation sweep")
    assert "10 (8 completed, 1 failed, 1 missing)" in text
    assert "- Missing: `8` (no summary.json)" in text and "- Failed: `crashed`" in text
    assert "`objective` (dpo, expo)" in text and "`strength` (0.1, 1)" in text


def test_bad_figure_specs_become_warnings(tmp_path: Path):
    node = {
        "figures": [
            {"name": "odd", "kind": "violin", "y": ["eval/win_rate"]},
            {
                "name": "ghost",
                "kind": "line",
                "x": "strength",
                "y": ["eval/nope", "eval/win_rate"],
                "hue": "nokey",
            },
            {"name": "void", "kind": "trajectory", "y": ["eval/nope"]},
        ]
    }
    for index, (objective, strength) in enumerate([("dpo", 0.1), ("dpo", 1.0), ("expo", 0.1)]):
        write_job(tmp_path / "sweep" / str(index), *job_files(objective, strength, 0, node))
    text = report.write_report(tmp_path / "sweep").read_text()
    assert "unknown kind 'violin'" in text
    assert "figure 'ghost': metric 'eval/nope' is absent from every run" in text
    assert "figure 'void': metric 'eval/nope' is absent from every run" in text
    assert "figure 'ghost': key 'nokey' not found" in text
    assert (tmp_path / "sweep" / "ghost.png").read_bytes()[:8] == PNG_MAGIC
    assert not (tmp_path / "sweep" / "odd.png").exists()


def test_sweep_without_report_node_gets_default_figures(tmp_path: Path):
    for index, strength in enumerate((0.1, 1.0)):
        write_job(tmp_path / "sweep" / str(index), *job_files("dpo", strength, 0, report_node=None))
    text = report.write_report(tmp_path / "sweep").read_text()
    for name in ("vs_strength", "trajectory"):
        assert (tmp_path / "sweep" / f"{name}.png").read_bytes()[:8] == PNG_MAGIC
        assert f"({name}.png)" in text
    summary = pd.read_csv(tmp_path / "sweep" / "summary.csv")
    assert list(summary["strength"]) == [0.1, 1.0]
    assert "eval/pi_theta/p0/y0_mean" not in summary.columns  # per-candidate metrics stay out of the table
    assert list(summary.columns[2:4]) == ["eval/win_rate_mean", "eval/win_rate_std"]


def test_main_returns_0_and_prints_report_path(tmp_path: Path, capsys: pytest.CaptureFixture):
    sweep = tmp_path / "sweep"
    for index, seed in enumerate((0, 1)):
        write_job(sweep / str(index), *job_files("dpo", 0.1, seed, {"figures": []}))
    assert report.main([str(sweep)]) == 0
    assert capsys.readouterr().out.strip() == str(sweep / "REPORT.md")
    assert (sweep / "REPORT.md").is_file() and (sweep / "runs.csv").is_file()


def test_main_without_jobs_returns_1(tmp_path: Path):
    assert report.main([str(tmp_path)]) == 1
    assert report.main([str(tmp_path / "absent")]) == 1


def test_overrides_parse_numbers_as_floats():
    assert report.parse_override("+experiment=expo_pres") == ("experiment", "expo_pres")
    assert report.parse_override("strength=0.1") == ("strength", 0.1)
    assert report.parse_override("seed=1") == ("seed", 1.0)
    assert report.parse_override("++objective.beta=1e-2") == ("objective.beta", 0.01)


def test_job_value_prefers_overrides_then_config_then_summary(sweep: Path):
    job = report.load_job(sweep / "4")  # expo, strength 0.1, seed 0
    assert report.job_value(job, "strength") == 0.1
    assert report.job_value(job, "objective.gamma") == 0.5
    assert report.job_value(job, "objective.lam") is None  # unresolvable interpolation, not a crash
    assert report.job_value(job, "status") == "completed"
    assert report.job_value(job, "no.such.key") is None
