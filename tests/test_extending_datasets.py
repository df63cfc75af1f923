"""Adding a toy dataset with a ground truth in a test touches only its own files and gets exact metrics.

Everything the toy needs lives here: its config dataclass, its loader, its ground truth (a class of this
file answering `prefopt.data.ground_truth.GroundTruth`), its registration through the public
`prefopt.data.register`, and its Hydra node (`dataset/toy.yaml` in a temporary config dir on Hydra's search
path). No file of `prefopt/` or `conf/` names it; the run asks the truth for its candidates, exact
metrics and convergence target, as it asks the synthetic task.

The toy: two prompts, three one-word answers each, pi* known. Pairs are every ordered pair of distinct
candidates, the one with the larger pi* chosen (a noiseless oracle). Its truth has no pi_ref to fit: the
starting policy is the reference as it is (`fit_target()` is None), so the run fits nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch
from conftest import FAST_MODEL, compose_config, read_jsonl

from prefopt.config import load_run_config
from prefopt.data import DATASETS, DatasetSpec, register
from prefopt.data.exact_metrics import exact_metrics
from prefopt.data.pairs import TextData, TextPairs

PROMPTS = ["pick a colour", "pick a number"]
CANDIDATES = [["red", "green", "blue"], ["one", "two", "three"]]
PI_STAR = np.array([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]])


@dataclass
class ToyConfig:
    max_prompt_tokens: int = 8
    max_response_tokens: int = 4


class ToyTruth:
    """pi* over each prompt's three answers; no pi_ref of its own (good: no prompt)."""

    enumerates_responses = True
    prompts = PROMPTS
    candidates = CANDIDATES
    pi_star = PI_STAR
    good = np.zeros(len(PROMPTS), dtype=bool)

    def candidate_ids(self, table) -> torch.Tensor:
        return torch.tensor([[table.add(p, y) for y in ys] for p, ys in zip(PROMPTS, CANDIDATES)])

    def fit_target(self) -> None:
        return None

    def exact_metrics(self, scores) -> dict[str, float]:
        s = scores()
        return exact_metrics(self, s.policy_logps, s.reference_logps, s.aux_rewards, s.aux_components)

    def convergence_target(self, target):
        return target()

    def oracle_reward(self, prompts, responses) -> list[float]:
        where = {(p, y): (i, k) for i, p in enumerate(PROMPTS) for k, y in enumerate(CANDIDATES[i])}
        return [float(np.log(PI_STAR[where[(p, y)]])) for p, y in zip(prompts, responses)]

    def record(self) -> dict:
        return {"prompts": PROMPTS, "candidates": CANDIDATES, "pi_star": PI_STAR.tolist()}

    def vocabulary(self) -> list[str]:
        return sorted({w for text in PROMPTS + sum(CANDIDATES, []) for w in text.split()})


def load_toy(cfg: ToyConfig, seed: int) -> TextData:
    rows = [
        (p, CANDIDATES[p][i], CANDIDATES[p][j])
        for p in range(len(PROMPTS))
        for i in range(3)
        for j in range(3)
        if PI_STAR[p, i] > PI_STAR[p, j]
    ]
    pairs = TextPairs(
        prompts=[PROMPTS[p] for p, _, _ in rows] * 4,
        chosen=[c for _, c, _ in rows] * 4,
        rejected=[r for _, _, r in rows] * 4,
        labels=[1.0] * (4 * len(rows)),
    )
    return TextData(pairs, pairs, cfg.max_prompt_tokens, cfg.max_response_tokens, ToyTruth())


@pytest.fixture
def toy(tmp_path):
    conf = tmp_path / "conf"
    (conf / "dataset").mkdir(parents=True)
    (conf / "dataset" / "toy.yaml").write_text("name: toy\nmax_prompt_tokens: 8\nmax_response_tokens: 4\n")
    register("toy", DatasetSpec(ToyConfig, load_toy, "two prompts, three answers, pi* known", True))
    try:
        yield [f"hydra.searchpath=[file://{conf}]", "dataset=toy"]
    finally:
        del DATASETS["toy"]


def test_register_refuses_a_taken_dataset_name():
    with pytest.raises(ValueError, match="already registered"):
        register("synthetic", DATASETS["preference"])


def test_a_toy_dataset_with_a_ground_truth_gets_exact_metrics(toy, tmp_path):
    """At step 0 the policy is the reference, so its exact KL to the reference is 0 and its win rate
    against it sum_{y,y'} pi(y) pi(y') p*(y > y') is exactly 1/2 (p*(y > y') + p*(y' > y) = 1). DPO on
    pairs that always prefer the larger pi* then raises the oracle reward E_pi log pi* and the win rate."""
    from prefopt.training.train import train

    overrides = ["logger=none", *FAST_MODEL, "trainer.max_steps=20", "eval.eval_every_steps=20"]
    rc = load_run_config(compose_config(*toy, *overrides))
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    summary = train(rc, run_dir)
    start, final = summary["reference_eval"], summary["final_eval"]
    assert start["eval/kl_policy_reference"] == pytest.approx(0.0, abs=1e-6)
    assert start["eval/win_rate"] == pytest.approx(0.5, abs=1e-6)
    assert final["eval/oracle_reward"] > start["eval/oracle_reward"]
    assert final["eval/win_rate"] > 0.5
    assert summary["reference_fit"] is None  # the truth has no pi_ref to fit
    evaluation = (run_dir / "eval.json").read_text()
    assert '"pi_star"' in evaluation and "eval/pi_theta/p1/y2" in evaluation  # the truth and its detail
    assert summary["convergence"]["tv_to_minimizer"] is not None  # DPO's minimizer on the toy's pairs
    assert all("train/loss" in r or "eval/loss" in r for r in read_jsonl(run_dir / "metrics.jsonl"))
