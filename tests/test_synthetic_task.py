"""The ground-truth testbed: pair sampling follows p*, exact metrics equal brute-force enumeration."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from prefopt.data import DATASETS
from prefopt.data.preference import PreferenceFileConfig
from prefopt.data.synthetic import ContextSpec, SyntheticConfig, build_task, exact_metrics


def test_pair_sampler_matches_bradley_terry_on_pi_star():
    """pi* = [.6, .3, .1]: non-tie share 1 - 3 (1/3)^2 = 2/3; P(i beats j) = pi*_i / (pi*_i + pi*_j),
    e.g. P(y0 > y1) = .6/.9 = 2/3, P(y0 > y2) = .6/.7 = 6/7, P(y1 > y2) = .3/.4 = 3/4."""
    task = build_task(SyntheticConfig(contexts=[ContextSpec(pi_star=[0.6, 0.3, 0.1])]), seed=0)
    draws = 30_000
    rows = task.sample_pairs(draws, np.random.default_rng(1))
    assert (rows[:, 1] != rows[:, 2]).all()
    assert len(rows) / draws == pytest.approx(2 / 3, abs=4 * math.sqrt(2 / 9 / draws))
    for i, j in [(0, 1), (0, 2), (1, 2)]:
        pair = ((rows[:, 1] == i) & (rows[:, 2] == j)) | ((rows[:, 1] == j) & (rows[:, 2] == i))
        n, wins = pair.sum(), ((rows[:, 1] == i) & (rows[:, 2] == j)).sum()
        p = 0.6 / 0.9 if (i, j) == (0, 1) else (0.6 / 0.7 if (i, j) == (0, 2) else 0.75)
        assert wins / n == pytest.approx(p, abs=4 * math.sqrt(p * (1 - p) / n)), (i, j)


def test_good_prompts_have_the_optimal_reference_and_contexts_are_checked():
    task = build_task(SyntheticConfig(num_prompts=40, good_fraction=0.5), seed=3)
    assert 5 < task.good.sum() < 35
    assert np.allclose(task.pi_star[task.good], task.pi_ref[task.good])
    assert not np.allclose(task.pi_star[~task.good], task.pi_ref[~task.good])
    with pytest.raises(ValueError, match=r"dataset\.contexts\[1\]\.pi_ref"):
        build_task(
            SyntheticConfig(contexts=[ContextSpec([0.5, 0.5]), ContextSpec([0.5, 0.5], [0.7, 0.7])]), 0
        )


def test_exact_metrics_equal_brute_force_enumeration():
    cfg = SyntheticConfig(
        contexts=[ContextSpec([0.6, 0.3, 0.1]), ContextSpec([0.6, 0.2, 0.2], [0.4, 0.2, 0.4])]
    )
    task = build_task(cfg, seed=0)
    generator = torch.Generator().manual_seed(0)
    policy = torch.randn(2, 3, generator=generator) - 1.5  # unnormalised: some mass outside
    reference = torch.randn(2, 3, generator=generator)
    aux = torch.rand(2, 3, generator=generator)
    got = exact_metrics(task, policy, reference, aux)
    per_prompt = {
        k: [] for k in ["kl_star", "kl_policy_reference", "oracle_reward", "win_rate", "outside_mass", "aux"]
    }
    for p in range(2):
        pi = [math.exp(v) for v in policy[p].tolist()]
        mass = sum(pi)
        pi = [v / mass for v in pi]
        ref = [math.exp(v) for v in reference[p].tolist()]
        ref = [v / sum(ref) for v in ref]
        star = task.pi_star[p]
        per_prompt["kl_star"].append(sum(s * math.log(s / q) for s, q in zip(star, pi)))
        per_prompt["kl_policy_reference"].append(sum(q * math.log(q / r) for q, r in zip(pi, ref)))
        per_prompt["oracle_reward"].append(sum(q * math.log(s) for q, s in zip(pi, star)))
        win = 0.0
        for i in range(3):
            for j in range(3):
                win += pi[i] * ref[j] * (0.5 if i == j else star[i] / (star[i] + star[j]))
        per_prompt["win_rate"].append(win)
        per_prompt["outside_mass"].append(1 - mass)
        per_prompt["aux"].append(sum(q * a for q, a in zip(pi, aux[p].tolist())))
    for key, values in per_prompt.items():
        assert got["aux_reward" if key == "aux" else key] == pytest.approx(
            sum(values) / 2, rel=1e-6, abs=1e-9
        ), key
    assert got["kl_star_good"] == pytest.approx(per_prompt["kl_star"][0], rel=1e-6)
    assert got["kl_star_bad"] == pytest.approx(per_prompt["kl_star"][1], rel=1e-6)
    assert sum(got[f"pi_theta/p1/y{k}"] for k in range(3)) == pytest.approx(1.0)


def write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows))


def test_preference_files_load_through_load_dataset(tmp_path):
    write_jsonl(
        tmp_path / "train.jsonl",
        [{"prompt": f"q{i}", "chosen": "good", "rejected": "bad", "p": 0.8} for i in range(20)],
    )
    write_jsonl(tmp_path / "test.jsonl", [{"prompt": "q", "chosen": "yes", "rejected": "no", "p": 1.0}])
    files = {"train": str(tmp_path / "train.jsonl"), "test": str(tmp_path / "test.jsonl")}
    data = DATASETS["preference"].load(
        PreferenceFileConfig(path="json", data_files=files, label_column="p"), 0
    )
    assert len(data.train) == 20 and data.train.labels[0] == pytest.approx(0.8)
    assert data.eval.prompts == ["q"] and data.eval.chosen == ["yes"]
    held_out = DATASETS["preference"].load(
        PreferenceFileConfig(path="json", data_files={"train": files["train"]}, eval_fraction=0.25), 0
    )
    assert (len(held_out.train), len(held_out.eval)) == (15, 5)


def test_a_bad_row_is_reported_with_its_index_and_column(tmp_path):
    rows = [{"prompt": "q", "chosen": "a", "rejected": "b"}] * 3 + [
        {"prompt": "q", "chosen": "", "rejected": "b"}
    ]
    write_jsonl(tmp_path / "train.jsonl", rows)
    cfg = PreferenceFileConfig(
        path="json", data_files={"train": str(tmp_path / "train.jsonl")}, eval_split="train"
    )
    with pytest.raises(ValueError, match=r"row 3: chosen"):
        DATASETS["preference"].load(cfg, 0)
    missing = PreferenceFileConfig(
        path="json", data_files={"train": str(tmp_path / "train.jsonl")}, chosen_column="win"
    )
    with pytest.raises(ValueError, match="missing columns.*win"):
        DATASETS["preference"].load(missing, 0)
