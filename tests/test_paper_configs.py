"""The papers' real-data configs compose and run end to end for a few steps with tiny stand-ins: a local
tiny Llama for Pythia/GPT-2, fixtures in the hub formats for the data, a tiny BERT for the classifiers and
a local fake OpenAI-compatible endpoint for the LLM judge."""

from __future__ import annotations

import json

import pytest
from conftest import compose_config
from test_acceptance_data import fixture, tiny_pretrained  # noqa: F401 - fixture
from test_classifier_rewards import bert_dir  # noqa: F401 - fixture
from test_datasets import write_jsonl
from test_judges import endpoint  # noqa: F401 - fixture

from prefopt.config import load_run_config
from prefopt.training.train import train

SMALL = [
    "model.dtype=float32",
    "logger=none",
    "eval.batch_size=8",
    "eval.generation.num_prompts=3",
    "eval.generation.max_new_tokens=6",
]


@pytest.fixture(autouse=True)
def _offline_datasets(tmp_path, monkeypatch):
    import datasets.config

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-datasets"))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


def run(tmp_path, *overrides: str) -> dict:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    summary = train(load_run_config(compose_config(*overrides, *SMALL)), run_dir)
    assert summary["status"] == "completed"
    assert (run_dir / "generations.jsonl").is_file()
    return summary


def test_hpo_hh_runs_with_its_rewards_rmsprop_one_epoch_and_the_llm_judge(
    tmp_path,
    tiny_pretrained,  # noqa: F811
    bert_dir,  # noqa: F811
    endpoint,  # noqa: F811
):
    rc = load_run_config(compose_config("+experiment=hpo_hh"))
    assert (rc.objective_name, rc.trainer.optimizer.name, rc.trainer.optimizer.lr, rc.trainer.epochs) == (
        "hpo",
        "rmsprop",
        5e-7,
        1,
    )
    assert {k: v["weight"] for k, v in rc.aux_reward.items()} == {"readability": 0.05, "toxicity": 0.95}
    summary = run(
        tmp_path,
        "+experiment=hpo_hh",
        f"model.name_or_path={tiny_pretrained}",
        *fixture("mixture", tmp_path / "data"),
        f"aux_reward.toxicity.model={bert_dir}",
        "aux_reward.toxicity.max_length=64",
        f"+eval.generation.llm.base_url={endpoint.url}",
        "+eval.generation.llm.model=judge",
        "+eval.generation.llm.backoff_s=0.01",
    )
    final = summary["final_eval"]
    steps = -(-summary["data"]["train_pairs"] // 32)  # 1 epoch of batch 32
    assert json.loads((tmp_path / "run" / "eval.json").read_text())["history"][-1]["step"] == steps
    assert 0 <= final["eval/generate/win_rate_vs_chosen"] <= 1 and endpoint.requests
    assert "eval/generate/policy/violations" in final and "eval/generate/policy/readability_grade" in final
    assert "train/aux_reward/toxicity/chosen" in summary["final_train"]


def test_expo_hh_runs_with_the_token_kl_estimator(tmp_path, tiny_pretrained, endpoint):  # noqa: F811
    summary = run(
        tmp_path,
        "+experiment=expo_hh",
        f"model.name_or_path={tiny_pretrained}",
        *fixture("hh_rlhf", tmp_path / "data"),
        f"+eval.generation.llm.base_url={endpoint.url}",
        "+eval.generation.llm.model=judge",
    )
    assert (
        summary["final_eval"]["eval/kl"] >= 0
        and "eval/generate/win_rate_vs_reference" in summary["final_eval"]
    )


def test_dpo_imdb_runs_on_precomputed_pairs_with_the_sentiment_reward(tmp_path, tiny_pretrained, bert_dir):  # noqa: F811
    rows = [{"prompt": f"The film {i}", "chosen": "great fun", "rejected": "awful"} for i in range(80)]
    summary = run(
        tmp_path,
        "+experiment=dpo_imdb",
        f"model.name_or_path={tiny_pretrained}",
        f"dataset.pairs_path={write_jsonl(tmp_path / 'pairs.jsonl', rows)}",
        "dataset.eval_fraction=0.5",
        f"aux_reward.sentiment.model={bert_dir}",
        "aux_reward.sentiment.positive=0",
        "aux_reward.sentiment.max_length=64",
    )
    final = summary["final_eval"]
    assert 0 <= final["eval/generate/policy/aux_reward/sentiment"] <= 1
    assert 0 <= final["eval/generate/win_rate_vs_reference"] <= 1


def test_the_issue_9_command_writes_samples_judgements_and_the_win_rate_table(
    tmp_path,
    tiny_pretrained,  # noqa: F811
    bert_dir,  # noqa: F811
):
    """hh_rlhf from a local copy, a local tiny model, readability + toxicity with a local classifier, hpo,
    eval.generate=true: the reward judge compares by R (no oracle on real data)."""
    summary = run(
        tmp_path,
        "dataset=hh_rlhf",
        *fixture("hh_rlhf", tmp_path / "data"),
        "model=pretrained",
        f"model.name_or_path={tiny_pretrained}",
        "aux_reward=[readability,toxicity]",
        f"aux_reward.toxicity.model={bert_dir}",
        "aux_reward.toxicity.max_length=64",
        "objective=hpo",
        "eval.generate=true",
        "trainer.max_steps=2",
    )
    rows = [json.loads(line) for line in (tmp_path / "run" / "generations.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(
        "reference" in r["judgements"] and "chosen" in r["judgements"] for r in rows
    )
    r_policy = [r["scores"]["policy"]["aux_reward"] for r in rows]
    r_reference = [r["scores"]["reference"]["aux_reward"] for r in rows]
    wins = [0.5 if a == b else float(a > b) for a, b in zip(r_policy, r_reference)]
    assert summary["final_eval"]["eval/generate/win_rate_vs_reference"] == pytest.approx(sum(wins) / 3)
    table = (tmp_path / "run" / "generation_eval.md").read_text()
    assert "| reference |" in table and "| chosen |" in table and "aux_reward/toxicity" in table


def test_dpo_imdb_builds_its_pairs_from_the_references_samples_ranked_by_sentiment(
    tmp_path,
    tiny_pretrained,  # noqa: F811
    bert_dir,  # noqa: F811
):
    """No pairs file: the run samples 4 completions of each review prefix from the starting model, scores
    them with the sentiment classifier and trains on the differently scored pairs, as the DPO paper did."""
    from test_datasets import write_imdb

    reviews = [f"tell me about cats {i} the cat sat" for i in range(6)]
    summary = run(
        tmp_path,
        "+experiment=dpo_imdb",
        f"model.name_or_path={tiny_pretrained}",
        f"dataset.path={write_imdb(tmp_path / 'imdb', reviews)}",
        "dataset.max_new_tokens=4",
        f"aux_reward.sentiment.model={bert_dir}",
        "aux_reward.sentiment.positive=0",
        "aux_reward.sentiment.max_length=64",
        "trainer.batch_size=8",
    )
    sampled = summary["data"]["sampled_pairs"]
    assert 0 < sampled["train"] <= 6 * 6 and 0 < sampled["eval"] <= 6 * 6  # at most C(4, 2) per prompt
    assert summary["data"]["train_pairs"] == sampled["train"]
    assert 0 <= summary["final_eval"]["eval/generate/win_rate_vs_reference"] <= 1


def test_dpo_imdb_without_the_scorer_reward_fails_before_the_model_loads(tmp_path, tiny_pretrained):  # noqa: F811
    from test_datasets import write_imdb

    path = write_imdb(tmp_path / "imdb", ["a review"] * 3)
    rc = load_run_config(
        compose_config("+experiment=dpo_imdb", f"dataset.path={path}", "aux_reward=none", *SMALL)
    )
    with pytest.raises(ValueError, match="dataset.scorer=sentiment"):
        train(rc, tmp_path)
