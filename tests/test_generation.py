"""Generation-based evaluation: samples from the policy and the reference, scored and judged, with win
rates and intervals that match hand counts over the written samples."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import run_training
from test_judges import endpoint  # noqa: F401 - the fake judge server, as a fixture here

from prefopt.evaluation.generation import reward_judge


def test_reward_judge_counts_a_tie_as_half():
    assert reward_judge(np.array([1.0, 0.0, 2.0]), np.array([0.0, 0.0, 3.0])) == [1.0, 0.5, 0.0]


def test_generation_eval_writes_samples_and_win_rates_that_match_their_hand_count(tmp_path):
    summary = run_training(
        tmp_path,
        "trainer.max_steps=6",
        "aux_reward=keyword",
        "eval.generate=true",
        "eval.generation.num_prompts=4",
        "eval.generation.num_samples=3",
        "eval.generation.max_new_tokens=6",
    )
    final = summary["final_eval"]
    rows = [json.loads(line) for line in (tmp_path / "generations.jsonl").read_text().splitlines()]
    assert len(rows) == 4 * 3 and len({r["prompt"] for r in rows}) == 4
    oracle = [
        (r["scores"]["policy"]["oracle_reward"], r["scores"]["reference"]["oracle_reward"]) for r in rows
    ]
    wins = [0.5 * (np.sign(p - q) + 1) for p, q in oracle]
    assert [r["judgements"]["reference"] for r in rows] == pytest.approx(wins)
    assert final["eval/generate/win_rate_vs_reference"] == pytest.approx(np.mean(wins))
    assert final["eval/generate/win_rate_vs_reference_low"] <= np.mean(wins)
    assert final["eval/generate/policy/oracle_reward"] == pytest.approx(np.mean([p for p, _ in oracle]))
    keyword = [r["scores"]["policy"]["aux_reward/keyword"] for r in rows]
    assert final["eval/generate/policy/aux_reward/keyword"] == pytest.approx(np.mean(keyword))
    assert "eval/generate/win_rate_vs_chosen" in final and "eval/generate/policy/length_tokens" in final
    assert all(isinstance(r["policy"], str) and isinstance(r["reference"], str) for r in rows)


def test_the_llm_judge_answers_in_both_orders_and_its_answers_are_written(tmp_path, endpoint, monkeypatch):  # noqa: F811
    """The fake OpenAI-compatible endpoint answers "A" when response A holds the task's marker word
    `please`: asked in both orders, p_first = (1[policy has it] + 1[reference lacks it]) / 2, and the
    reported win rate is their mean."""
    import test_judges

    monkeypatch.setattr(test_judges, "MARKER", "please")
    summary = run_training(
        tmp_path,
        "trainer.max_steps=2",
        "eval.generate=true",
        "eval.generation.num_prompts=2",
        "eval.generation.num_samples=2",
        "eval.generation.max_new_tokens=4",
        "eval.generation.judge=llm",
        f"+eval.generation.llm.base_url={endpoint.url}",
        "+eval.generation.llm.model=judge",
        "+eval.generation.llm.backoff_s=0.01",
    )
    rows = [json.loads(line) for line in (tmp_path / "generations.jsonl").read_text().splitlines()]
    expected = [0.5 * (("please" in r["policy"]) + ("please" not in r["reference"])) for r in rows]
    assert [r["judgements"]["reference"] for r in rows] == pytest.approx(expected)
    assert summary["final_eval"]["eval/generate/win_rate_vs_reference"] == pytest.approx(np.mean(expected))
    asked = {  # both orders, against the reference and chosen; a repeat is cached once it is answered
        (r["prompt"], *order)
        for r in rows
        for other in ("reference", "chosen")
        for order in ((r["policy"], r[other]), (r[other], r["policy"]))
    }
    assert len(asked) <= len(endpoint.requests) <= 2 * 2 * len(rows)
    assert (tmp_path / "judge_cache").is_dir()


# `prefopt evaluate`: tests/test_evaluate_saved.py
