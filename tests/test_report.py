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
import logging
import math
import re
from pathlib import Path

import pandas as pd
import pytest
import yaml

from prefopt.research import figures, report
from prefopt.research.sweep import job_value, load_job, parse_override

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
    assert list(summary.columns[4:6]) == ["eval/win_rate_mean", "eval/win_rate_std"]


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


def test_overrides_parse_as_hydra_types_them():
    assert parse_override("+experiment=expo_pres") == ("experiment", "expo_pres")
    assert parse_override("strength=0.1") == ("strength", 0.1)
    key, seed = parse_override("seed=1")
    assert (key, seed, type(seed)) == ("seed", 1, int)
    assert parse_override("++objective.beta=1e-2") == ("objective.beta", 0.01)


def test_a_jobs_overrides_are_read_by_hydras_parser(tmp_path: Path, caplog):
    """Typed as Hydra types them; a deletion sets nothing; a malformed line is left out with a warning."""
    lines = ["seed=1", "trainer.packing=false", "trainer.resume=null", "~objective.lam", "aux_reward=[a, b]"]
    lines.append("x=[")
    (tmp_path / ".hydra").mkdir()
    (tmp_path / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(lines))
    with caplog.at_level(logging.WARNING):
        job = load_job(tmp_path)
    expected = {"seed": 1, "trainer.packing": False, "trainer.resume": None, "aux_reward": "[a,b]"}
    assert job.overrides == expected
    assert type(job.overrides["seed"]) is int
    assert any("'x=['" in record.getMessage() for record in caplog.records)


def test_job_value_prefers_overrides_then_config_then_summary(sweep: Path):
    job = load_job(sweep / "4")  # expo, strength 0.1, seed 0
    assert job_value(job, "strength") == 0.1
    assert job_value(job, "objective.gamma") == 0.5
    assert job_value(job, "objective.lam") is None  # unresolvable interpolation, not a crash
    assert job_value(job, "status") == "completed"
    assert job_value(job, "no.such.key") is None


# --- The run-dir format with a convergence report and per-prompt detail in eval.json only ---
#
# Cells of `converged_sweep` (win rate 0.5 + 0.1 e + 0.1 s + 0.02 k as above):
#   (dpo, 0.1):  seeds 0, 1 converged, seed 2 not -> mean of 0.51, 0.53 = 0.52 ± 0.01414 (0.55 left out);
#                "2/3"
#   (dpo, 1.0):  seed 0 converged, seed 1 null, seed 2 without a convergence section (an old run dir): all
#                kept -> mean of 0.6, 0.62, 0.64 = 0.62 ± 0.02; "1/3 (2 not judged)"
#   (expo, 1.0): no seed converged -> all runs, 0.72 ± 0.02, marked "(not converged)"; "0/3"

CONVERGED_NODE = {
    "title": "Converged sweep",
    "figures": [
        {
            "name": "final",
            "kind": "line",
            "x": "strength",
            "logx": True,
            "y": ["eval/win_rate", "eval/pi_theta/p0/y0"],
            "logy": ["eval/win_rate"],
            "hue": "objective",
            "hlines": {"eval/pi_theta/p0/y0": "reference_eval/eval/pi_theta/p0/y0"},
        },
        {"name": "trajectory", "kind": "trajectory", "y": ["eval/win_rate"], "hue": "objective"},
    ],
}
CELLS = {("dpo", 0.1): [True, True, False], ("dpo", 1.0): [True, None, "absent"], ("expo", 1.0): [False] * 3}


def new_job_files(objective: str, strength: float, seed: int, converged, node: dict) -> tuple:
    """A job in the new format: summary.json without per-prompt keys, eval.json with them."""
    overrides, config, summary, _ = job_files(objective, strength, seed, node)
    detail = final_metrics(objective, strength, seed) | {"eval/outside_mass": 0.1 * seed}
    detail |= {"eval/outside_mass/p0": 0.1 * seed, "eval/pi_theta/p0/y1": 0.3}
    summary["final_eval"] = {k: v for k, v in detail.items() if "/p0" not in k}
    summary["reference_eval"] = {"eval/win_rate": 0.5, "eval/outside_mass": 0.01}
    if converged != "absent":
        reasons = [] if converged else ["training loss still changed 3.2% over the last 10% of steps"]
        summary["convergence"] = {
            "converged": converged,
            "reasons": reasons,
            "loss_change_last_10pct": 0.032,
            "final_grad_norm": 0.5,
            "outside_mass": 0.1 * seed,
            "tv_to_minimizer": 0.002,
            "minimizer": [[0.6, 0.3, 0.1]],
            "tv_per_prompt": [0.002],
        }
    reference = {"eval/win_rate": 0.5, "eval/pi_theta/p0/y0": 0.45}
    history = [{"step": 0, **reference}, {"step": 100, **detail}]
    return overrides, config, summary, {"history": history, "final": detail, "reference": reference}


def write_new_job(job_dir: Path, overrides: dict, config: dict, summary: dict, evals: dict) -> None:
    write_job(job_dir, overrides, config, summary, history=None)
    (job_dir / "eval.json").write_text(json.dumps(evals))


@pytest.fixture(scope="module")
def converged_out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    sweep_dir = tmp_path_factory.mktemp("converged") / "multirun"
    for index, ((objective, strength), verdicts) in enumerate(CELLS.items()):
        for seed, verdict in enumerate(verdicts):
            files = new_job_files(objective, strength, seed, verdict, CONVERGED_NODE)
            write_new_job(sweep_dir / str(3 * index + seed), *files)
    report.write_report(sweep_dir)
    return sweep_dir


def markdown_tables(text: str) -> list[list[list[str]]]:
    """Every Markdown table of `text` as rows of cells; asserts each is set off by blank lines."""
    lines, tables = text.splitlines(), []
    for i, line in enumerate(lines):
        if line.startswith("|") and (i == 0 or not lines[i - 1].startswith("|")):
            assert i == 0 or lines[i - 1].strip() == "", f"no blank line before the table at line {i + 1}"
            end = next((j for j in range(i, len(lines)) if not lines[j].startswith("|")), len(lines))
            assert end == len(lines) or lines[end].strip() == "", f"no blank line after line {end}"
            tables.append([split_row(row) for row in lines[i:end]])
    return tables


def split_row(row: str) -> list[str]:
    assert row.startswith("|") and row.endswith("|"), row
    return [cell.strip() for cell in re.split(r"(?<!\\)\|", row[1:-1])]


def assert_well_formed(text: str) -> list[list[list[str]]]:
    tables = markdown_tables(text)
    for table in tables:
        assert len(table) >= 2 and set("".join(table[1])) <= set("-:"), table[:2]
        assert {len(row) for row in table} == {len(table[0])}, table
    return tables


def test_runs_csv_has_no_per_prompt_columns_and_the_convergence_report(out: Path, converged_out: Path):
    old = pd.read_csv(out / "runs.csv")
    assert "eval/pi_theta/p0/y0" not in old.columns  # old run dirs kept per-prompt keys in summary.json
    runs = pd.read_csv(converged_out / "runs.csv", dtype={"job": str}).set_index("job")
    assert not [column for column in runs.columns if re.search(r"/p\d+(/|$)", column)]
    for column in (
        "converged",
        "loss_change_last_10pct",
        "final_grad_norm",
        "grad_norm_ratio",
        "tv_to_minimizer",
    ):
        assert column in runs.columns
    assert "outside_mass" not in runs.columns  # eval/outside_mass already says it
    assert runs.loc["2", "converged"] == False  # noqa: E712 (the CSV holds True/False/empty)
    assert pd.isna(runs.loc["4", "converged"]) and pd.isna(runs.loc["5", "converged"])
    assert runs.loc["0", "tv_to_minimizer"] == pytest.approx(0.002)
    assert runs.loc["5", "eval/outside_mass"] == pytest.approx(0.2)


def test_unconverged_runs_are_left_out_of_the_means(converged_out: Path):
    summary = pd.read_csv(converged_out / "summary.csv")
    cell = {(row.objective, row.strength): row for row in summary.itertuples()}
    dpo_small, dpo_big, expo = cell["dpo", 0.1], cell["dpo", 1.0], cell["expo", 1.0]
    assert (dpo_small.n, dpo_small.converged, dpo_small.stats_over) == (3, "2/3", "converged")
    assert summary.loc[dpo_small.Index, "eval/win_rate_mean"] == pytest.approx(0.52)
    assert summary.loc[dpo_small.Index, "eval/win_rate_std"] == pytest.approx(math.sqrt(2 * 0.01**2))
    assert dpo_big.converged == "1/3 (2 not judged)"
    assert summary.loc[dpo_big.Index, "eval/win_rate_mean"] == pytest.approx(0.62)
    assert (expo.converged, expo.stats_over) == ("0/3", "all runs")
    assert summary.loc[expo.Index, "eval/win_rate_mean"] == pytest.approx(0.72)
    assert summary.loc[expo.Index, "eval/win_rate_std"] == pytest.approx(0.02)


def test_report_marks_unconverged_cells_and_has_outside_mass(converged_out: Path):
    text = (converged_out / "REPORT.md").read_text()
    (table,) = assert_well_formed(text)
    header = table[0]
    assert header[:4] == ["objective", "strength", "n", "converged"]
    assert "eval/outside_mass" in header  # not named by any figure, still a column
    rows = {(row[0], row[1]): dict(zip(header, row)) for row in table[2:]}
    assert rows["dpo", "0.1"]["eval/win_rate"] == "0.52 ± 0.01414"
    assert rows["expo", "1"]["eval/win_rate"] == "0.72 ± 0.02 (not converged)"
    assert rows["expo", "1"]["converged"] == "0/3"
    assert "- Convergence: 3 of 9 completed runs converged, 4 did not, 2 not judged" in text
    assert "- Not converged: objective=dpo, strength=0.1: 1 of 3 runs (`2`): training loss still" in text
    assert "- Not converged: objective=expo, strength=1: 3 of 3 runs (`6`, `7`, `8`)" in text


def test_readings_and_figures_use_converged_runs_only(converged_out: Path):
    text = (converged_out / "REPORT.md").read_text()
    reading = next(line for line in text.splitlines() if line.startswith("- eval/win_rate vs strength"))
    assert "dpo: rises from 0.52 to 0.62" in reading and "expo: no converged run" in reading
    per_prompt = next(line for line in text.splitlines() if line.startswith("- eval/pi_theta/p0/y0 vs"))
    assert "dpo: rises from 0.41 to 0.5" in per_prompt  # read from eval.json's final
    assert "4 run(s) did not converge: drawn as x" in text
    assert "Warning" not in text  # the per-prompt hline came from eval.json's reference
    for name in ("final", "trajectory"):
        assert (converged_out / f"{name}.png").read_bytes()[:8] == PNG_MAGIC


def test_old_run_dirs_report_with_convergence_not_recorded(out: Path):
    text = (out / "REPORT.md").read_text()
    assert "- Convergence: not recorded" in text
    (table,) = assert_well_formed(text)
    assert table[0][3] == "converged" and {row[3] for row in table[2:]} == {"not judged"}
    assert all(not cell.endswith("(not converged)") for row in table[2:] for cell in row)


def test_scatter_style_draws_a_marker_per_value_and_readable_labels():
    """Four runs: dpo (no gamma: no label) and hpo gamma 0 at the same place, hpo gamma 0.5 elsewhere, and an
    hpo run that did not converge. Weight 0.5 gets one marker, weight 1 another; the unconverged run an x."""
    runs = pd.DataFrame(
        {
            "job": ["0", "1", "2", "3"],
            "objective": ["dpo", "hpo", "hpo", "hpo"],
            "objective.gamma": [None, 0.0, 0.5, 0.5],
            "weight": [0.5, 0.5, 1.0, 1.0],
            "eval/aux_reward/keyword": [0.4, 0.4, 0.8, 0.9],
            "eval/win_rate": [0.6, 0.6, 0.55, 0.5],
            "converged": [True, True, True, False],
        }
    )
    spec = figures.FigureSpec.from_dict(
        {
            "name": "pareto",
            "kind": "scatter",
            "x": "eval/aux_reward/keyword",
            "y": "eval/win_rate",
            "hue": "objective",
            "style": "weight",
            "label": "objective.gamma",
            "label_format": "γ={}",
        },
        0,
    )
    fig, readings = figures.draw_figure(spec, ["eval/win_rate"], runs, pd.DataFrame(), ["objective"], {})
    ax = fig.axes[0]
    drawn = {line.get_marker() for line in ax.lines if len(line.get_xdata())}
    assert {"o", "s", "x"} <= drawn
    labels = {text.get_text(): text for text in ax.texts}
    assert set(labels) == {"γ=0", "γ=0.5"}  # dpo has no gamma and no label
    legend = {text.get_text() for text in fig.legends[0].get_texts()}
    assert {"dpo", "hpo", "weight=0.5", "weight=1"} <= legend
    assert any("did not converge" in reading for reading in readings)


def test_scatter_labels_of_coincident_points_do_not_overlap():
    runs = pd.DataFrame(
        {
            "job": ["0", "1", "2"],
            "variant": ["a", "b", "c"],
            "x": [0.5, 0.5, 0.5],
            "y": [0.5, 0.5, 0.5],
        }
    )
    spec = figures.FigureSpec("same", "scatter", ["y"], x="x", hue="variant", label="variant")
    fig, _ = figures.draw_figure(spec, ["y"], runs, pd.DataFrame(), ["variant"], {})
    offsets = [(text.xyann, text.get_horizontalalignment()) for text in fig.axes[0].texts]
    assert len(offsets) == 3 and len(set(offsets)) == 3
