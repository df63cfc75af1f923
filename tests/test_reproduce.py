"""The theory check and REPORT.md of `make reproduce` on fake sweep dirs (no training).

Interpolation fake (one context, pi* = [.6, .3, .1], fitted reference [.4, .4, .2]), strength 1, seeds 0, 1;
a run's own-pairs minimizer m and its policy pi (eval.json final, before renormalisation):
    expo: m = [.55, .3, .15] (seed 0), [.57, .3, .13] (seed 1); pi = m + [.002, 0, -.002], seed 1 scaled by
          0.9 (renormalising undoes it) -> TV .002 each, agrees; measured pi(y0) .552, .572 -> .562 ± .01414
          (std = .02 / sqrt 2); own-pairs .56 ± .01414.
    dpo:  m = [.9, .08, .02]; pi = m + [-.03, 0, .03] (seed 0) and m + [-.002, 0, .002] (seed 1), both
          converged -> max TV .03 > .01: disagrees.
    ipo:  seed 1 did not converge (its TV .001 does not matter) -> "not converged (1/2)".
    hpo:  no tabular minimizer (convergence.minimizer null) -> skipped with a note.
Headline: 1 of 3 cells agree; 1 not converged; 1 disagree.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from prefopt.evaluation.population import population_minimizer
from prefopt.research import report, reproduce, theory
from prefopt.research.sweep import load_sweep

ROOT = Path(__file__).resolve().parent.parent
PI_STAR, PI_REF = [0.6, 0.3, 0.1], [0.4, 0.4, 0.2]
INTERPOLATION = {  # objective -> per seed: (own-pairs minimizer, policy, converged)
    "expo": [
        ([0.55, 0.3, 0.15], [0.552, 0.3, 0.148], True),
        ([0.57, 0.3, 0.13], [0.9 * 0.572, 0.9 * 0.3, 0.9 * 0.128], True),
    ],
    "dpo": [([0.9, 0.08, 0.02], [0.87, 0.08, 0.05], True), ([0.9, 0.08, 0.02], [0.898, 0.08, 0.022], True)],
    "ipo": [([0.7, 0.2, 0.1], [0.7, 0.2, 0.1], True), ([0.7, 0.2, 0.1], [0.699, 0.2, 0.101], False)],
    "hpo": [(None, [0.5, 0.3, 0.2], True), (None, [0.5, 0.3, 0.2], True)],
}


def report_node(name: str) -> dict:
    return OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "experiment" / f"{name}.yaml").report)


def per_prompt(policies: list[list[float]]) -> dict[str, float]:
    return {f"eval/pi_theta/p{i}/y{k}": p for i, policy in enumerate(policies) for k, p in enumerate(policy)}


def write_run(job_dir: Path, overrides: dict, config: dict, final: dict, evals: dict, convergence) -> None:
    """A run dir in the training side's format: per-prompt keys in eval.json only."""
    (job_dir / ".hydra").mkdir(parents=True)
    (job_dir / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    (job_dir / ".hydra" / "overrides.yaml").write_text(
        yaml.safe_dump([f"{k}={v}" for k, v in overrides.items()])
    )
    summary = {
        "status": "completed",
        "objective": overrides.get("objective"),
        "seed": overrides["seed"],
        "final_eval": {k: v for k, v in final.items() if not re.search(r"/p\d+(/|$)", k)},
        "reference_eval": {k: v for k, v in evals["reference"].items() if not re.search(r"/p\d+(/|$)", k)},
        "final_train": {"train/loss": 0.5},
        "runtime_s": 1.0,
    }
    if convergence is not None:
        summary["convergence"] = convergence
    (job_dir / "summary.json").write_text(json.dumps(summary))
    (job_dir / "eval.json").write_text(json.dumps({**evals, "final": final}))


def convergence(converged, minimizer, tv) -> dict:
    reasons = [] if converged else ["final gradient norm 0.3 is 40% of the largest"]
    return {
        "converged": converged,
        "reasons": reasons,
        "loss_change_last_10pct": 0.001,
        "final_grad_norm": 0.01,
        "outside_mass": 0.02,
        "tv_to_minimizer": tv,
        "minimizer": minimizer,
        "tv_per_prompt": None if minimizer is None else [tv],
    }


def interpolation_sweep(sweep_dir: Path) -> Path:
    node = report_node("expo_interpolation")
    index = 0
    for objective, seeds in INTERPOLATION.items():
        for seed, (minimizer, policy, converged) in enumerate(seeds):
            overrides = {"objective": objective, "strength": 1.0, "seed": seed}
            config = {
                "seed": seed,
                "strength": 1.0,
                "objective": {"name": objective},
                "dataset": {"contexts": [{"pi_star": PI_STAR, "pi_ref": PI_REF}]},
                "report": node,
            }
            reference = {"eval/win_rate": 0.5, "eval/outside_mass": 0.01, **per_prompt([PI_REF])}
            final = {"eval/win_rate": 0.6, "eval/outside_mass": 0.02, **per_prompt([policy])}
            evals = {"history": [{"step": 0, **reference}, {"step": 150, **final}], "reference": reference}
            own = None if minimizer is None else [minimizer]
            write_run(
                sweep_dir / str(index), overrides, config, final, evals, convergence(converged, own, 0.0)
            )
            index += 1
    return sweep_dir


def preservation_sweep(sweep_dir: Path) -> Path:
    """Two contexts (good, bad) and two strengths; every run sits on its own-pairs minimizer."""
    contexts = [{"pi_star": PI_STAR, "pi_ref": None}, {"pi_star": [0.6, 0.2, 0.2], "pi_ref": [0.4, 0.2, 0.4]}]
    node, index = report_node("expo_preservation"), 0
    for objective in ("dpo", "expo"):
        for strength in (0.1, 10.0):
            for seed in (0, 1):
                own = [[0.6 - 0.01 * seed, 0.3, 0.1 + 0.01 * seed], [0.55, 0.22, 0.23]]
                overrides = {"objective": objective, "strength": strength, "seed": seed}
                config = {"seed": seed, "strength": strength, "objective": {"name": objective}}
                config |= {"dataset": {"contexts": contexts}, "report": node}
                reference = {"eval/kl_star_bad": 0.1, **per_prompt([PI_STAR, [0.4, 0.2, 0.4]])}
                final = {"eval/kl_star_good": 0.01, "eval/kl_star_bad": 0.02, "eval/outside_mass": 0.3}
                final |= per_prompt(own)
                evals = {
                    "history": [{"step": 0, **reference}, {"step": 150, **final}],
                    "reference": reference,
                }
                write_run(
                    sweep_dir / str(index), overrides, config, final, evals, convergence(True, own, 0.0)
                )
                index += 1
    return sweep_dir


def hpo_sweep(sweep_dir: Path) -> Path:
    node, index = report_node("hpo_aux"), 0
    for weight in (0.5, 1.0):
        for objective, gamma in (("dpo", None), ("hpo", 0.0), ("hpo", 0.5)):
            for seed in (0, 1):
                overrides = {"objective": objective, "aux_reward.keyword.weight": weight, "seed": seed}
                overrides |= {} if gamma is None else {"objective.gamma": gamma}
                config = {"seed": seed, "objective": {"name": objective}, "report": node}
                rate = 0.5 + (gamma or 0.0) * weight * 0.4
                final = {"eval/win_rate": 0.7 - 0.1 * rate, "eval/aux_reward": weight * rate}
                final |= {"eval/aux_reward/keyword": rate, "eval/outside_mass": 0.4}
                evals = {"history": [{"step": 250, **final}], "reference": {"eval/win_rate": 0.5}}
                write_run(
                    sweep_dir / str(index), overrides, config, final, evals, convergence(True, None, None)
                )
                index += 1
    return sweep_dir


def markdown_tables(text: str) -> list[list[list[str]]]:
    """Every Markdown table as rows of cells, asserting that each has a blank line before and after it,
    a separator row and the same number of cells in every row."""
    lines, tables = text.splitlines(), []
    for i, line in enumerate(lines):
        if line.startswith("|") and (i == 0 or not lines[i - 1].startswith("|")):
            assert i == 0 or lines[i - 1].strip() == "", f"no blank line before line {i + 1}: {line}"
            end = next((j for j in range(i, len(lines)) if not lines[j].startswith("|")), len(lines))
            assert end == len(lines) or lines[end].strip() == "", f"no blank line after line {end}"
            rows = [[c.strip() for c in re.split(r"(?<!\\)\|", row.strip()[1:-1])] for row in lines[i:end]]
            assert len(rows) >= 2 and set("".join(rows[1])) <= set("-:"), rows[:2]
            assert {len(row) for row in rows} == {len(rows[0])}, rows
            tables.append(rows)
    return tables


@pytest.fixture(scope="module")
def interpolation(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return interpolation_sweep(tmp_path_factory.mktemp("interpolation") / "expo_interpolation")


def test_theory_rows_compare_each_run_with_its_own_pairs_minimizer(interpolation: Path):
    rows, notes = theory.theory_rows(load_sweep(interpolation))
    assert set(rows["objective"]) == {"expo", "dpo", "ipo"} and set(rows["context"]) == {"single"}
    expo = rows[rows["objective"] == "expo"].set_index("job")
    assert expo["tv"].tolist() == pytest.approx([0.002, 0.002])  # seed 1's policy renormalised first
    assert expo["measured"].tolist() == pytest.approx([0.552, 0.572])
    assert expo["own"].tolist() == pytest.approx([0.55, 0.57])
    expected = float(population_minimizer("expo", PI_STAR, PI_REF, lam=1.0)[0])
    assert expo["infinite"].tolist() == pytest.approx([expected, expected])
    assert 0.4 < expected < 0.6  # between pi_ref(y0) and pi*(y0)
    assert notes == [next(note for note in notes if note.startswith("Skipped hpo (2 runs)"))]


def test_theory_cells_verdicts(interpolation: Path):
    cells = theory.theory_cells(theory.theory_rows(load_sweep(interpolation))[0])
    verdict = dict(zip(cells["objective"], cells["verdict"]))
    assert verdict == {"dpo": "disagrees", "expo": "agrees", "ipo": "not converged (1/2)"}
    expo = cells.set_index("objective").loc["expo"]
    assert (expo["measured_mean"], expo["measured_std"]) == pytest.approx((0.562, 0.02 / math.sqrt(2)))
    assert (expo["own_mean"], expo["own_std"]) == pytest.approx((0.56, 0.02 / math.sqrt(2)))
    assert cells.set_index("objective").loc["dpo", "max_tv"] == pytest.approx(0.03)


def test_theory_check_markdown_headline_and_table(interpolation: Path):
    lines = theory.theory_check(interpolation)
    text = "\n".join(lines)
    assert "**1 of 3 cells agree with the minimizer of their own training pairs (TV <= 0.01); " in text
    assert "1 not converged; 1 disagree.**" in text
    (table,) = markdown_tables(text)
    assert table[0] == theory.THEORY_HEADER
    rows = {row[0]: dict(zip(table[0], row)) for row in table[2:]}
    assert rows["expo"]["measured (mean ± std)"] == "0.562 ± 0.01414"
    assert rows["expo"]["own-pairs minimizer (mean ± std)"] == "0.56 ± 0.01414"
    assert (rows["expo"]["converged"], rows["expo"]["verdict"]) == ("2/2", "agrees")
    assert rows["dpo"]["verdict"] == "**disagrees**" and rows["ipo"]["converged"] == "1/2"
    assert "- Skipped hpo (2 runs)" in text
    assert "within 2 std" not in text


def test_preservation_cells_are_per_context_and_agree(tmp_path: Path):
    sweep = preservation_sweep(tmp_path / "expo_preservation")
    rows, notes = theory.theory_rows(load_sweep(sweep))
    assert set(rows["context"]) == {"good", "bad"} and set(rows["quantity"]) == {"KL(pi* || pi_theta)"}
    good = rows[(rows["context"] == "good") & (rows["job"] == "0")].iloc[0]
    assert good["own"] == pytest.approx(0.0)  # seed 0's own minimizer is pi* itself
    cells = theory.theory_cells(rows)
    assert len(cells) == 8 and set(cells["verdict"]) == {"agrees"} and notes == []


def test_reproduce_report_is_well_formed_and_shows_outside_mass(tmp_path: Path):
    out = tmp_path / "reproduce"
    preservation_sweep(out / "expo_preservation")
    interpolation_sweep(out / "expo_interpolation")
    hpo_sweep(out / "hpo_aux")
    names = ["expo_preservation", "expo_interpolation", "hpo_aux"]
    for name in names:
        sub = report.write_report(out / name).read_text()
        assert "Warning" not in sub, sub  # every figure of the real report nodes found its data
        (summary,) = markdown_tables(sub)
        assert "eval/outside_mass" in summary[0]
    text = reproduce.assemble_report(out, names, wall_s=12.0).read_text()
    tables = markdown_tables(text)
    assert len(tables) == 5  # three summaries, two theory checks
    assert "within 2 std" not in text and "Total wall time: 12 s." in text
    assert "8 of 8 cells agree" in text and "1 of 3 cells agree" in text
    assert "(expo_preservation/preservation.png)" in text and "(hpo_aux/pareto.png)" in text
    assert "## Reading the theory checks" in text and "outside_mass" in theory.EXPLANATION


def test_old_run_dirs_are_skipped_not_crashed(tmp_path: Path):
    job = tmp_path / "sweep" / "0"
    overrides = {"objective": "expo", "strength": 1.0, "seed": 0}
    config = {
        "objective": {"name": "expo"},
        "dataset": {"contexts": [{"pi_star": PI_STAR, "pi_ref": PI_REF}]},
    }
    final = {"eval/win_rate": 0.6, **per_prompt([PI_STAR])}
    write_run(job, overrides, config, final, {"history": [], "reference": {}}, convergence=None)
    lines = theory.theory_check(tmp_path / "sweep")
    assert any(line.startswith("**0 of 0 cells agree") for line in lines)
    assert any(line.startswith("- Skipped expo (1 runs)") for line in lines)


def test_a_drawn_task_is_checked_against_the_ground_truth_its_runs_recorded(tmp_path: Path):
    """No contexts in the config (pi* drawn from the seed): the theory check reads pi* and which prompts
    are good from eval.json's task record, so it measures KL(pi* || pi) and the infinite-data minimizer."""
    sweep = preservation_sweep(tmp_path / "drawn")
    task = {
        "pi_star": [PI_STAR, [0.6, 0.2, 0.2]],
        "pi_ref": [PI_STAR, [0.4, 0.2, 0.4]],
        "good": [True, False],
    }
    for job in sweep.iterdir():
        config = yaml.safe_load((job / ".hydra" / "config.yaml").read_text())
        config["dataset"] = {"contexts": None, "num_prompts": 2}
        (job / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
        evals = json.loads((job / "eval.json").read_text())
        (job / "eval.json").write_text(json.dumps({**evals, "task": task}))
    rows, _ = theory.theory_rows(load_sweep(sweep))
    assert set(rows["context"]) == {"good", "bad"}
    assert set(rows["quantity"]) == {"KL(pi* || pi_theta)"}
    assert rows["infinite"].notna().all()
