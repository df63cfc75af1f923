"""The sentiment frontier experiment's parts, without a model: its configs (CPU and GPU) with every sweep
of `make reproduce-real` compose and validate, the VADER reward's scores, and the frontier report on
synthetic run dirs (points, standard errors, the equal-KL comparison and its verdict, the figure)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from conftest import compose_config
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from prefopt.config import load_run_config
from prefopt.research.frontier import equal_kl_comparison, frontier_points, interpolate, write_frontier_report
from prefopt.research.reproduce import FRONTIER_SWEEPS, REAL_EXPERIMENTS
from prefopt.rewards import build_aux_reward


def sweep_combinations(sweep: list[str]) -> list[list[str]]:
    """Every job's overrides of one multirun sweep (the cross product of its comma lists)."""
    jobs = [[]]
    for override in OverridesParser.create().parse_overrides(sweep):
        key = override.get_key_element()
        values = list(override.sweep_string_iterator()) if override.is_sweep_override() else [None]
        if values == [None]:
            values = [override.get_value_element_as_str()]
        jobs = [job + [f"{key}={v}"] for job in jobs for v in values]
    return jobs


@pytest.mark.parametrize("experiment", sorted(REAL_EXPERIMENTS))
def test_every_job_of_the_frontier_sweeps_composes_and_validates(experiment: str):
    seen = set()
    for sweep in FRONTIER_SWEEPS:
        for job in sweep_combinations(sweep):
            rc = load_run_config(compose_config(f"+experiment={experiment}", *job, "dataset.pairs_path=."))
            seen.add(rc.objective_name)
            assert rc.eval.generate and "vader" in rc.aux_reward
            if rc.objective_name == "hpo":  # HPO's R is readability; sentiment is its preference
                assert rc.aux_reward["vader"]["weight"] == 0 and "readability" in rc.aux_reward
    assert seen == {"dpo", "ipo", "expo", "hpo"}


def test_the_cpu_experiment_is_smollm2_on_the_shipped_openings():
    rc = load_run_config(compose_config("+experiment=sentiment_frontier"))
    assert rc.model.name_or_path == "HuggingFaceTB/SmolLM2-135M-Instruct" and rc.model.lora.r == 8
    openings = Path(rc.dataset.path)
    rows = [json.loads(line) for f in ("train", "test") for line in (openings / f"{f}.jsonl").open()]
    assert len(rows) == 96 and len({r["text"] for r in rows}) == 96
    assert max(len(r["text"].split()) for r in rows) <= rc.dataset.min_prompt_words  # whole openings
    gpu = OmegaConf.to_container(compose_config("+experiment=sentiment_frontier_gpu"), resolve=False)
    assert gpu["model"]["name_or_path"] == "gpt2-large" and gpu["dataset"]["path"] == "stanfordnlp/imdb"


def test_vader_scores_compound_and_unit():
    """VADER's compound of "I loved it, wonderful!" is positive, of "terrible and boring" negative, of an
    empty text 0; scale=unit maps c to (c + 1) / 2."""
    texts = ["I loved it, wonderful!", "terrible and boring", ""]
    compound = build_aux_reward({"vader": {}})(["x"] * 3, texts)
    assert compound[0] > 0.5 and compound[1] < -0.5 and compound[2] == 0.0
    unit = build_aux_reward({"vader": {"scale": "unit"}})(["x"] * 3, texts)
    assert unit == pytest.approx([(c + 1) / 2 for c in compound])
    with pytest.raises(ValueError, match="aux_reward.vader.scale"):
        build_aux_reward({"vader": {"scale": "percent"}})


REFERENCE = [0.0, 0.2, -0.2, 0.0]  # the reference's sample rewards: mean 0, se sqrt(0.08/3)/2
RUNS = {  # objective, strength -> (KL, se, the policy's sample rewards)
    ("dpo", 0.1): (4.0, 0.5, [0.6, 0.8, 0.7, 0.7]),
    ("dpo", 1.0): (1.0, 0.2, [0.2, 0.3, 0.1, 0.2]),
    ("expo", 0.3): (2.0, 0.3, [0.1, 0.2, 0.0, 0.1]),
}


def write_sweep(sweep_dir: Path) -> Path:
    for index, ((objective, strength), (kl, se, rewards)) in enumerate(RUNS.items()):
        job = sweep_dir / f"0_{index}"
        (job / ".hydra").mkdir(parents=True)
        config = {"strength": strength, "objective": {"name": objective}}
        (job / ".hydra" / "config.yaml").write_text(OmegaConf.to_yaml(config))
        (job / ".hydra" / "overrides.yaml").write_text(f"- objective={objective}\n- strength={strength}\n")
        final = {"eval/generate/kl_samples": kl, "eval/generate/kl_samples_se": se}
        summary = {"status": "completed", "final_eval": final, "runtime_s": 100.0 + index}
        (job / "summary.json").write_text(json.dumps(summary))
        rows = [
            {"scores": {"policy": {"aux_reward/vader": p}, "reference": {"aux_reward/vader": q}}}
            for p, q in zip(rewards, REFERENCE)
        ]
        (job / "generations.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return sweep_dir


def test_frontier_points_read_kl_from_summaries_and_reward_se_from_samples(tmp_path):
    points, reference = frontier_points(write_sweep(tmp_path / "sweep"))
    assert reference["reward"] == pytest.approx(0.0)
    assert reference["reward_se"] == pytest.approx(math.sqrt(0.08 / 3) / 2)
    dpo = points[(points.objective == "dpo") & (points.strength == 0.1)].iloc[0]
    assert (dpo.kl, dpo.kl_se, dpo.samples) == (4.0, 0.5, 4)
    assert dpo.reward == pytest.approx(0.7) and dpo.reward_se == pytest.approx(
        np.std([0.6, 0.8, 0.7, 0.7], ddof=1) / 2
    )


def test_equal_kl_comparison_interpolates_from_the_reference_and_names_the_leader(tmp_path):
    """EXPO's curve reaches KL 2, so the KLs compared are 2/3, 4/3 and 2. At KL 2, DPO is between its
    points at KL 1 (0.2) and 4 (0.7): t = 1/3, 0.2 + 0.5/3 = 0.3667; EXPO is at its own point, 0.1: DPO
    leads by 0.2667, with se^2 = (2/3)^2 se(1.0)^2 + (1/3)^2 se(0.1)^2 + se(expo)^2."""
    points, reference = frontier_points(write_sweep(tmp_path / "sweep"))
    comparison = equal_kl_comparison(points, reference)
    assert comparison["kl"].tolist() == pytest.approx([2 / 3, 4 / 3, 2.0])
    last = comparison.iloc[-1]
    assert last["best"] == "dpo" and last["next"] == "expo"
    assert last["dpo"] == pytest.approx(0.2 + 0.5 / 3) and last["expo"] == pytest.approx(0.1)
    se = dict(zip(points.objective + points.strength.astype(str), points.reward_se))
    expected = math.sqrt(
        (2 / 3) ** 2 * se["dpo1.0"] ** 2 + (1 / 3) ** 2 * se["dpo0.1"] ** 2 + se["expo0.3"] ** 2
    )
    assert last["lead"] == pytest.approx(0.2 + 0.5 / 3 - 0.1) and last["lead_se"] == pytest.approx(expected)
    curve = points[points.objective == "dpo"][["kl", "reward", "reward_se"]]
    assert interpolate(curve.sort_values("kl").reset_index(drop=True), 1.0)[0] == pytest.approx(0.2)


def test_the_report_has_the_figure_the_table_and_a_verdict(tmp_path):
    sweep = write_sweep(tmp_path / "sweep")
    report = write_frontier_report(sweep).read_text()
    assert (sweep / "frontier.png").stat().st_size > 1000 and (sweep / "frontier.csv").is_file()
    assert "![frontier](frontier.png)" in report and "| dpo | 0.1 | 4.00 ± 0.50 | 0.700 ± 0.041 |" in report
    assert "**dpo** highest" in report and "| reference | - | 0 |" in report
