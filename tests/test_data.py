"""Datasets: the synthetic task's pair sampler follows Bradley-Terry on pi*, its exact metrics equal brute
force, its contexts are honoured and checked; generic preference files load, and bad rows are named."""

from __future__ import annotations

import itertools
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from prefopt.data import DATASETS, load_synthetic
from prefopt.data.exact_metrics import exact_metrics
from prefopt.data.preference import PreferenceFileConfig
from prefopt.data.synthetic import ContextSpec, SyntheticConfig, build_task

PI_STAR = [0.6, 0.3, 0.1]


def within_sigmas(successes: int, trials: int, p: float, sigmas: float = 4.0) -> bool:
    """|k/n - p| <= sigmas * sqrt(p (1 - p) / n): a binomial tolerance (scipy is not a dependency)."""
    return abs(successes / trials - p) <= sigmas * math.sqrt(p * (1 - p) / trials)


# ---- the synthetic pair sampler ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def drawn_pairs() -> np.ndarray:
    """30 000 uniform draws on one context pi* = [.6, .3, .1]; (N, 3) rows (prompt, chosen, rejected)."""
    task = build_task(SyntheticConfig(contexts=[ContextSpec(PI_STAR)]), seed=0)
    return task.sample_pairs(30_000, np.random.default_rng(123))


def test_sampler_drops_ties(drawn_pairs: np.ndarray):
    assert len(drawn_pairs) > 0
    assert (drawn_pairs[:, 1] != drawn_pairs[:, 2]).all()
    assert (drawn_pairs[:, 0] == 0).all()


def test_sampler_keeps_the_non_tie_share_of_uniform_draws(drawn_pairs: np.ndarray):
    """(y1, y2) uniform over 3 x 3: P(tie) = sum_k (1/3)^2 = 1/3, so 2/3 of 30 000 draws survive
    (20 000, sd sqrt(30 000 * 2/9) ~ 82)."""
    assert within_sigmas(len(drawn_pairs), 30_000, 1 - 3 * (1 / 3) ** 2)


@pytest.mark.parametrize(("i", "j"), list(itertools.combinations(range(3), 2)))
def test_sampler_prefers_by_bradley_terry_on_pi_star(drawn_pairs: np.ndarray, i: int, j: int):
    """Among pairs {y_i, y_j}: P(y_i chosen) = pi*_i / (pi*_i + pi*_j), i.e. .6/.9 = 2/3 for (0, 1),
    .6/.7 = 6/7 for (0, 2), .3/.4 = 3/4 for (1, 2). Each unordered pair is 1/3 of the non-ties."""
    pair = {i, j}
    among = [row for row in drawn_pairs if {int(row[1]), int(row[2])} == pair]
    i_wins = sum(int(row[1]) == i for row in among)
    assert within_sigmas(i_wins, len(among), PI_STAR[i] / (PI_STAR[i] + PI_STAR[j]))
    assert within_sigmas(len(among), len(drawn_pairs), 1 / 3)


def test_loaded_synthetic_text_pairs_follow_the_sampled_candidates():
    """load_synthetic turns (prompt, chosen, rejected) indices into the task's texts, hard labels."""
    cfg = SyntheticConfig(
        contexts=[ContextSpec(PI_STAR)], train_draws_per_prompt=300, eval_draws_per_prompt=90
    )
    data = load_synthetic(cfg, seed=0)
    candidates = data.task.candidates[0]
    assert set(data.train.prompts) == {data.task.prompts[0]}
    assert all(
        c in candidates and r in candidates and c != r for c, r in zip(data.train.chosen, data.train.rejected)
    )
    assert data.train.labels == [1.0] * len(data.train)
    assert within_sigmas(len(data.train), 300, 2 / 3) and within_sigmas(len(data.eval), 90, 2 / 3)


# ---- exact metrics against brute force ---------------------------------------------------------------


def brute_force(task, policy_logps, reference_logps, aux) -> dict[str, float]:
    """The metrics by Python loops over prompts p and candidates i, j (floats, no tensors)."""
    num_prompts, k = task.pi_star.shape
    per = {"kl_star": [], "kl_policy_reference": [], "oracle_reward": [], "win_rate": []}
    per |= {"outside_mass": [], "aux_reward": []}
    policies = []
    for p in range(num_prompts):
        mass = [math.exp(float(policy_logps[p, i])) for i in range(k)]
        ref_mass = [math.exp(float(reference_logps[p, i])) for i in range(k)]
        pol = [m / sum(mass) for m in mass]
        ref = [m / sum(ref_mass) for m in ref_mass]
        star = [float(task.pi_star[p, i]) for i in range(k)]
        policies.append(pol)
        per["kl_star"].append(sum(star[i] * math.log(star[i] / pol[i]) for i in range(k)))
        per["kl_policy_reference"].append(sum(pol[i] * math.log(pol[i] / ref[i]) for i in range(k)))
        per["oracle_reward"].append(sum(pol[i] * math.log(star[i]) for i in range(k)))
        win = 0.0
        for i in range(k):
            for j in range(k):
                p_win = 0.5 if i == j else star[i] / (star[i] + star[j])
                win += pol[i] * ref[j] * p_win
        per["win_rate"].append(win)
        per["outside_mass"].append(1.0 - sum(mass))
        per["aux_reward"].append(sum(pol[i] * float(aux[p, i]) for i in range(k)))
    out = {name: sum(values) / num_prompts for name, values in per.items()}
    for subset, want in (("good", True), ("bad", False)):
        chosen = [per["kl_star"][p] for p in range(num_prompts) if bool(task.good[p]) == want]
        out[f"kl_star_{subset}"] = sum(chosen) / len(chosen)
    for p in range(num_prompts):
        out[f"outside_mass/p{p}"] = per["outside_mass"][p]
        for i in range(k):
            out[f"pi_theta/p{p}/y{i}"] = policies[p][i]
    return out


def test_exact_metrics_equal_brute_force_enumeration():
    """Four prompts (two good, two bad), random log-probs that leave mass outside the candidates."""
    contexts = [
        ContextSpec([0.6, 0.3, 0.1]),
        ContextSpec([0.2, 0.5, 0.3], [0.4, 0.4, 0.2]),
        ContextSpec([0.1, 0.1, 0.8]),
        ContextSpec([0.5, 0.25, 0.25], [0.1, 0.3, 0.6]),
    ]
    task = build_task(SyntheticConfig(contexts=contexts), seed=0)
    gen = torch.Generator().manual_seed(0)
    policy = torch.log_softmax(torch.randn(4, 4, generator=gen), -1)[:, :3]  # drop a 4th "outside" option
    reference = torch.randn(4, 3, generator=gen) - 2.0
    aux = torch.rand(4, 3, generator=gen)
    got = exact_metrics(task, policy, reference, aux)
    expected = brute_force(task, policy, reference, aux)
    assert expected.keys() <= got.keys()
    for name, value in expected.items():
        assert got[name] == pytest.approx(value, abs=1e-6), name
    assert expected["outside_mass"] > 0.05


def test_exact_metrics_at_pi_star_hand_values():
    """Policy = reference = pi* = [.5, .5] on one good prompt: KL* = 0, outside mass 0,
    oracle reward = log .5 = -0.693147, win rate = sum_ij .25 * 1/2 = 1/2 (every p* is 1/2)."""
    task = build_task(SyntheticConfig(contexts=[ContextSpec([0.5, 0.5])]), seed=0)
    logps = torch.log(torch.tensor([[0.5, 0.5]]))
    metrics = exact_metrics(task, logps, logps)
    assert metrics["kl_star"] == pytest.approx(0.0, abs=1e-12)
    assert metrics["outside_mass"] == pytest.approx(0.0, abs=1e-7)
    assert metrics["oracle_reward"] == pytest.approx(math.log(0.5))
    assert metrics["win_rate"] == pytest.approx(0.5)
    assert "aux_reward" not in metrics and "kl_star_bad" not in metrics


# ---- contexts and good prompts -----------------------------------------------------------------------


def test_good_prompts_have_the_optimal_reference():
    task = build_task(SyntheticConfig(num_prompts=40, num_candidates=4, good_fraction=0.5), seed=3)
    assert 0 < task.good.sum() < 40
    for p in range(40):
        if task.good[p]:
            assert task.pi_ref[p].tolist() == task.pi_star[p].tolist()
        else:
            assert not np.allclose(task.pi_ref[p], task.pi_star[p])
    for row in (*task.pi_star, *task.pi_ref):
        assert row.sum() == pytest.approx(1.0) and (row > 0).all()


@pytest.mark.parametrize(("fraction", "good"), [(0.0, 0), (1.0, 12)])
def test_good_fraction_extremes(fraction: float, good: int):
    assert build_task(SyntheticConfig(num_prompts=12, good_fraction=fraction), seed=0).good.sum() == good


def test_explicit_contexts_are_honoured():
    contexts = [ContextSpec([0.6, 0.3, 0.1]), ContextSpec([0.6, 0.2, 0.2], [0.4, 0.2, 0.4])]
    task = build_task(SyntheticConfig(num_prompts=16, num_candidates=4, contexts=contexts), seed=0)
    assert task.pi_star.tolist() == [[0.6, 0.3, 0.1], [0.6, 0.2, 0.2]]
    assert task.pi_ref.tolist() == [[0.6, 0.3, 0.1], [0.4, 0.2, 0.4]]
    assert task.good.tolist() == [True, False]
    assert len(task.prompts) == 2 and [len(c) for c in task.candidates] == [3, 3]
    assert all(len(set(c)) == len(c) for c in task.candidates)  # candidates are distinct


@pytest.mark.parametrize(
    ("contexts", "bad_index"),
    [
        ([ContextSpec([0.5, 0.5]), ContextSpec([0.7, 0.7])], 1),  # does not sum to 1
        ([ContextSpec([1.2, -0.2])], 0),  # negative
        ([ContextSpec([0.5, 0.5]), ContextSpec([0.5, 0.5], [0.0, 1.0])], 1),  # zero reference mass
        ([ContextSpec([0.6, 0.3, 0.1], [0.5, 0.5])], 0),  # pi_ref of another length than pi_star
    ],
)
def test_invalid_contexts_raise_naming_the_context(contexts, bad_index: int):
    with pytest.raises(ValueError, match=re.escape(f"dataset.contexts[{bad_index}]")):
        build_task(SyntheticConfig(contexts=contexts), seed=0)


def test_contexts_of_different_sizes_raise_naming_dataset_contexts():
    with pytest.raises(ValueError, match=re.escape("dataset.contexts")):
        build_task(SyntheticConfig(contexts=[ContextSpec([0.5, 0.5]), ContextSpec([0.6, 0.3, 0.1])]), seed=0)


# ---- generic preference files ------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _private_datasets_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """`datasets` caches what it builds from local files: keep that out of the user's cache."""
    import datasets.config

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-datasets"))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def split_files(tmp_path: Path, train: list[dict], test: list[dict]) -> dict[str, str]:
    """data_files with a train and a test split."""
    return {
        "train": write_jsonl(tmp_path / "train.jsonl", train),
        "test": write_jsonl(tmp_path / "test.jsonl", test),
    }


def rows_of(n: int, start: int = 0) -> list[dict]:
    return [
        {"prompt": f"question {i}", "chosen": f"a good answer {i}", "rejected": f"bad {i}"}
        for i in range(start, start + n)
    ]


def load_files(**fields):
    return DATASETS["preference"].load(PreferenceFileConfig(path="json", **fields), seed=0)


def test_train_and_test_files_load_as_text_pairs(tmp_path: Path):
    train, test = rows_of(6), rows_of(3, start=100)
    files = split_files(tmp_path, train, test)
    data = load_files(data_files=files, max_prompt_tokens=7, max_response_tokens=9)
    assert data.train.prompts == [r["prompt"] for r in train]
    assert data.train.chosen == [r["chosen"] for r in train]
    assert data.train.rejected == [r["rejected"] for r in train]
    assert data.train.labels == [1.0] * 6
    assert data.eval.prompts == [r["prompt"] for r in test]
    assert data.eval.chosen == [r["chosen"] for r in test]
    assert (data.max_prompt_tokens, data.max_response_tokens, data.task) == (7, 9, None)


def test_renamed_columns_and_a_soft_label_column_are_read(tmp_path: Path):
    rows = [{"q": f"x{i}", "good": f"yes {i}", "bad": f"no {i}", "p": 0.5 + i / 10} for i in range(4)]
    files = split_files(tmp_path, rows, rows)
    data = load_files(
        data_files=files, prompt_column="q", chosen_column="good", rejected_column="bad", label_column="p"
    )
    assert data.train.labels == pytest.approx([0.5, 0.6, 0.7, 0.8])
    assert data.train.chosen == [f"yes {i}" for i in range(4)]


def test_an_empty_chosen_is_skipped_and_in_strict_mode_names_file_line_and_field(tmp_path: Path):
    """rows[3] sits on line 4 of train.jsonl (lines count from 1)."""
    rows = rows_of(5)
    rows[3]["chosen"] = "   "
    files = split_files(tmp_path, rows, rows_of(2))
    data = load_files(data_files=files)
    assert len(data.train) == 4 and "question 3" not in data.train.prompts
    bad = data.report["splits"]["train"]["first_bad"]
    assert bad == [{"row": f"{files['train']} line 4", "field": "chosen", "reason": "empty response"}]
    with pytest.raises(ValueError, match=r"train\.jsonl line 4: field 'chosen': empty response"):
        load_files(data_files=files, strict=True)


def test_a_bad_row_is_named_by_its_line_in_the_file_even_when_eval_is_cut_from_train(tmp_path: Path):
    """No test file: the held-out cut shuffles train. The error must still point at the file's line 4
    (rows[3]), whichever side of the cut it lands: rows are checked before the cut."""
    rows = rows_of(80)
    rows[3]["chosen"] = ""
    files = {"train": write_jsonl(tmp_path / "train.jsonl", rows)}
    with pytest.raises(ValueError, match=r"train\.jsonl line 4: field 'chosen'"):
        load_files(data_files=files, eval_fraction=0.5, strict=True)


def test_a_missing_column_is_named(tmp_path: Path):
    rows = [{"prompt": r["prompt"], "chosen": r["chosen"]} for r in rows_of(4)]
    files = split_files(tmp_path, rows, rows)
    with pytest.raises(ValueError, match=r"no column \['rejected'\]"):
        load_files(data_files=files)
    with pytest.raises(ValueError, match="label"):
        load_files(data_files={"train": files["train"]}, label_column="label", rejected_column="chosen")


def test_a_label_outside_0_1_is_skipped_or_in_strict_mode_refused(tmp_path: Path):
    rows = [{**r, "p": 1.5 if i == 0 else 0.75} for i, r in enumerate(rows_of(3))]
    files = split_files(tmp_path, rows, rows)
    data = load_files(data_files=files, label_column="p")
    assert data.train.labels == [0.75, 0.75]
    with pytest.raises(ValueError, match=r"line 1: field 'label': 1.5 outside \[0, 1\]"):
        load_files(data_files=files, label_column="p", strict=True)


def test_without_an_eval_split_eval_fraction_of_train_is_held_out(tmp_path: Path):
    """80 rows, eval_fraction 0.4 -> 48 train + 32 held out (the minimum), disjoint, together the file."""
    rows = rows_of(80)
    data = load_files(data_files={"train": write_jsonl(tmp_path / "train.jsonl", rows)}, eval_fraction=0.4)
    assert (len(data.train), len(data.eval)) == (48, 32)
    assert not set(data.train.prompts) & set(data.eval.prompts)
    assert sorted(data.train.prompts + data.eval.prompts) == sorted(r["prompt"] for r in rows)
    for pairs in (data.train, data.eval):
        by_prompt = {r["prompt"]: r for r in rows}
        assert all(by_prompt[p]["chosen"] == c for p, c in zip(pairs.prompts, pairs.chosen))


def test_a_held_out_cut_below_the_minimum_is_refused_saying_what_to_change(tmp_path: Path):
    """The issue's case: 100 rows at the default 5% left 5 eval pairs (accuracy 1.0 means nothing)."""
    files = {"train": write_jsonl(tmp_path / "train.jsonl", rows_of(100))}
    with pytest.raises(ValueError, match=r"holds out 5, fewer than dataset\.min_eval_pairs=32") as error:
        load_files(data_files=files)
    assert "dataset.eval_fraction" in str(error.value) and "test file" in str(error.value)
    assert len(load_files(data_files=files, min_eval_pairs=5).eval) == 5


def test_example_limits_keep_the_first_rows(tmp_path: Path):
    rows = rows_of(10)
    files = split_files(tmp_path, rows, rows)
    data = load_files(data_files=files, max_train_examples=4, max_eval_examples=2)
    assert data.train.prompts == [r["prompt"] for r in rows[:4]]
    assert data.eval.prompts == [r["prompt"] for r in rows[:2]]
