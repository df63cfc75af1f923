"""Dataset adapters on local fixtures written in each hub dataset's exact format (files, folders, columns),
read through the real `datasets.load_dataset`: the prompt/response split of each, bad rows (skipped and
reported by file line, or with dataset.strict an error), local files and dirs, the mixture's draw, and
every dataset yaml composing into its schema."""

from __future__ import annotations

import gzip
import json
import logging
from pathlib import Path

import pandas as pd
import pytest
from conftest import compose_config

from prefopt.config import load_run_config
from prefopt.data import DATASETS
from prefopt.data.hh_rlhf import HHConfig
from prefopt.data.imdb import IMDbConfig, load_prompts, pairs_from_samples, review_prefixes
from prefopt.data.mixture import MixtureConfig, allocate
from prefopt.data.oasst import OASSTConfig
from prefopt.data.preference import PreferenceFileConfig
from prefopt.data.shp import SHPConfig
from prefopt.data.ultrafeedback import UltraFeedbackConfig

H, A = "\n\nHuman:", "\n\nAssistant:"


@pytest.fixture(autouse=True)
def _private_datasets_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """`datasets` caches what it builds from local files: keep that out of the user's cache; no hub."""
    import datasets.config

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-datasets"))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


def load(name: str, seed: int = 0, **fields):
    spec = DATASETS[name]
    return spec.load(spec.config(**fields), seed)


def write_jsonl(path: Path, rows: list[dict], compress: bool = False) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(row) + "\n" for row in rows)
    if compress:
        with gzip.open(path, "wt") as handle:
            handle.write(text)
    else:
        path.write_text(text)
    return str(path)


def write_parquet(path: Path, rows: list[dict]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_parquet(path)
    return str(path)


# ---- Anthropic/hh-rlhf: <subset>/{train,test}.jsonl.gz of {"chosen": dialogue, "rejected": dialogue} ----


def hh_row(turns: list[str], chosen: str, rejected: str) -> dict:
    """Alternating Human/Assistant turns, then the final assistant turn (`chosen` or `rejected`)."""
    head = "".join(f"{H if i % 2 == 0 else A} {t}" for i, t in enumerate(turns))
    return {"chosen": f"{head}{A} {chosen}", "rejected": f"{head}{A} {rejected}"}


def hh_rows(n: int, tag: str = "") -> list[dict]:
    return [hh_row([f"question {tag}{i}?"], f"answer {i}.", f"no {i}.") for i in range(n)]


def write_hh(root: Path, subsets: dict[str, tuple[list[dict], list[dict]]]) -> Path:
    for subset, (train, test) in subsets.items():
        write_jsonl(root / subset / "train.jsonl.gz", train, compress=True)
        write_jsonl(root / subset / "test.jsonl.gz", test, compress=True)
    return root


def test_hh_multi_turn_prompt_ends_with_the_last_assistant_marker(tmp_path: Path):
    row = hh_row(["How do I bake bread?", "Flour, water, yeast.", "And then?"], "Knead it.", "Give up.")
    root = write_hh(tmp_path / "hh", {"helpful-base": ([row], [row])})
    data = load("hh_rlhf", path=str(root), data_dir="helpful-base")
    prompt = f"{H} How do I bake bread?{A} Flour, water, yeast.{H} And then?{A}"
    assert (data.train.prompts, data.train.chosen, data.train.rejected) == (
        [prompt],
        [" Knead it."],
        [" Give up."],
    )
    assert row["chosen"] == prompt + data.train.chosen[0]  # the split loses nothing
    assert data.train.labels == [1.0] and data.eval.prompts == [prompt]


@pytest.mark.parametrize(
    ("chosen", "rejected", "field", "reason"),
    [
        (f"{H} hi", f"{H} hi", "chosen", "no"),  # no assistant turn at all
        (f"{H} a{A} x", f"{H} b{A} y", "rejected", "does not continue"),  # another history
        (f"{H} a{A} x{H} more?", f"{H} a{A} y", "chosen", "human turn"),  # chosen ends on the human
        (f"{H} a{A} x", f"{H} a{A} y{H} b{A} z", "rejected", "more turns"),
    ],
)
def test_hh_dialogues_that_do_not_split_into_prompt_and_responses_are_bad(chosen, rejected, field, reason):
    from prefopt.data.dialogue import split_hh
    from prefopt.data.pairs import BadRow

    with pytest.raises(BadRow, match=reason) as error:
        split_hh(chosen, rejected)
    assert error.value.field == field


def test_hh_chat_mode_gives_messages_before_the_final_turn(tmp_path: Path):
    row = hh_row(["Hi there", "Hello! How can I help?", "Tell a joke"], "Why did the...", "No.")
    root = write_hh(tmp_path / "hh", {"harmless-base": ([row], [row])})
    data = load("hh_rlhf", path=str(root), chat=True)
    assert data.train.prompts[0] == [
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Tell a joke"},
    ]
    assert (data.train.chosen[0], data.train.rejected[0]) == ("Why did the...", "No.")


def test_hh_data_dir_selects_a_subset_and_none_reads_all(tmp_path: Path):
    root = write_hh(
        tmp_path / "hh",
        {
            "harmless-base": (hh_rows(3, "h"), hh_rows(2, "h")),
            "helpful-base": (hh_rows(4, "u"), hh_rows(1, "u")),
        },
    )
    assert (len(load("hh_rlhf", path=str(root)).train), len(load("hh_rlhf", path=str(root)).eval)) == (7, 3)
    harmless = load("hh_rlhf", path=str(root), data_dir="harmless-base")
    assert len(harmless.train) == 3 and all("question h" in p for p in harmless.train.prompts)


def test_hh_bad_rows_are_skipped_counted_and_named_by_line_of_the_gz_file(tmp_path: Path, caplog):
    """Line 2: chosen == rejected; line 4: rejected with another history; line 5: an empty response."""
    rows = hh_rows(6)
    rows[1]["rejected"] = rows[1]["chosen"]
    rows[3]["rejected"] = f"{H} something else{A} no."
    rows[4] = hh_row(["q?"], "", "no.")
    root = write_hh(tmp_path / "hh", {"harmless-base": (rows, hh_rows(2))})
    with caplog.at_level(logging.WARNING, logger="prefopt"):
        data = load("hh_rlhf", path=str(root))
    assert data.train.chosen == [" answer 0.", " answer 2.", " answer 5."]
    file = root / "harmless-base" / "train.jsonl.gz"
    report = data.report["splits"]["train"]
    assert (report["read"], report["kept"], report["skipped"]) == (6, 3, 3)
    assert [(b["row"], b["field"]) for b in report["first_bad"]] == [
        (f"{file} line 2", "rejected"),
        (f"{file} line 4", "rejected"),
        (f"{file} line 5", "chosen"),
    ]
    assert report["skipped_by_reason"]["rejected: identical to chosen"] == 1
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "bad rows" in r.getMessage()]
    assert len(warnings) == 1 and "skipped 3 bad rows (train 3 of 6)" in warnings[0].getMessage()
    assert f"{file} line 2" in warnings[0].getMessage()
    with pytest.raises(ValueError, match=r"train\.jsonl\.gz line 2: field 'rejected': identical to chosen"):
        load("hh_rlhf", path=str(root), strict=True)


def test_hh_a_single_local_jsonl_file_is_the_train_split(tmp_path: Path):
    file = write_jsonl(tmp_path / "hh.jsonl", hh_rows(40))
    data = load("hh_rlhf", path=file, eval_fraction=0.8)
    assert (len(data.train), len(data.eval)) == (8, 32)
    assert "held out" in data.report["eval_from"]


# ---- HuggingFaceH4/ultrafeedback_binarized: data/<split>-00000-of-00001.parquet -------------------------


def uf_row(i: int, prompt: str, chosen: str, rejected: str, s_c: float = 8.0, s_r: float = 5.0) -> dict:
    user = {"role": "user", "content": prompt}
    chosen_messages = [user, {"role": "assistant", "content": chosen}]
    return {
        "prompt": prompt,
        "prompt_id": f"id{i}",
        "chosen": chosen_messages,
        "rejected": [user, {"role": "assistant", "content": rejected}],
        "messages": chosen_messages,
        "score_chosen": s_c,
        "score_rejected": s_r,
    }


def write_ultrafeedback(root: Path, train: list[dict], test: list[dict]) -> Path:
    for split, rows in (("train_prefs", train), ("test_prefs", test), ("train_sft", train)):
        write_parquet(root / "data" / f"{split}-00000-of-00001.parquet", rows)
    return root


def test_ultrafeedback_prompt_is_the_messages_before_the_final_turn_and_scores_are_kept(tmp_path: Path):
    root = write_ultrafeedback(
        tmp_path / "uf", [uf_row(0, "Name a color.", "Blue.", "Seven.")], [uf_row(1, "Hi", "Hello", "Bye")]
    )
    data = load("ultrafeedback", path=str(root))
    assert data.train.prompts == [[{"role": "user", "content": "Name a color."}]]
    assert (data.train.chosen, data.train.rejected, data.train.labels) == (["Blue."], ["Seven."], [1.0])
    assert (data.train.scores_chosen, data.train.scores_rejected) == ([8.0], [5.0])
    assert data.train.metadata == [{"prompt_id": "id0"}] and data.eval.chosen == ["Hello"]
    text = load("ultrafeedback", path=str(root), chat=False)
    assert (text.train.prompts, text.train.chosen) == ([f"{H} Name a color.{A}"], [" Blue."])


@pytest.mark.parametrize(("temperature", "expected"), [(1.0, 0.9525741268), (2.0, 0.8175744762)])
def test_ultrafeedback_score_label_is_bradley_terry_of_the_ratings(tmp_path: Path, temperature, expected):
    """8 vs 5: sigmoid(3 / T) = 1 / (1 + e^-3) = 0.952574 at T = 1, 1 / (1 + e^-1.5) = 0.817574 at T = 2;
    a tie gives 1/2."""
    rows = [uf_row(0, "q", "a", "b", 8.0, 5.0), uf_row(1, "r", "c", "d", 6.0, 6.0)]
    root = write_ultrafeedback(tmp_path / "uf", rows, rows)
    data = load("ultrafeedback", path=str(root), label="scores", score_temperature=temperature)
    assert data.train.labels == pytest.approx([expected, 0.5], abs=1e-9)


def test_ultrafeedback_a_bad_row_is_named_by_its_parquet_record(tmp_path: Path):
    rows = [uf_row(i, f"q{i}", f"a{i}", f"b{i}") for i in range(4)]
    rows[2]["rejected"] = [
        {"role": "user", "content": "another prompt"},
        {"role": "assistant", "content": "x"},
    ]
    root = write_ultrafeedback(tmp_path / "uf", rows, rows[:1])
    data = load("ultrafeedback", path=str(root))
    assert len(data.train) == 3
    with pytest.raises(
        ValueError, match=r"train_prefs-00000-of-00001\.parquet record 2 \(0-based\): field 'rejected'"
    ):
        load("ultrafeedback", path=str(root), strict=True)


# ---- stanfordnlp/SHP: <domain>/{train,validation,test}.json (JSON lines) ---------------------------------


def shp_row(post: str, a: str, b: str, label: int, score_a: int, score_b: int) -> dict:
    return {
        "post_id": post,
        "domain": "askscience_train",
        "upvote_ratio": 0.99,
        "history": f"Why is the sky blue? ({post})",
        "c_root_id_A": f"{post}-{a}",
        "c_root_id_B": f"{post}-{b}",
        "created_at_utc_A": 1_600_000_000,
        "created_at_utc_B": 1_600_000_100,
        "score_A": score_a,
        "score_B": score_b,
        "human_ref_A": a,
        "human_ref_B": b,
        "labels": label,
        "seconds_difference": 100.0,
        "score_ratio": max(score_a, score_b) / min(score_a, score_b),
    }


def write_shp(root: Path, train: list[dict], test: list[dict], domain: str = "askscience") -> Path:
    for split, rows in (("train", train), ("validation", test), ("test", test)):
        write_jsonl(root / domain / f"{split}.json", rows)
    return root


def test_shp_labels_pick_chosen_and_the_score_ratio_filters_train_only(tmp_path: Path):
    rows = [
        shp_row("p1", "Rayleigh scattering.", "Magic.", 1, 30, 10),  # A preferred, ratio 3
        shp_row("p2", "Dunno.", "Shorter wavelengths scatter more.", 0, 4, 20),  # B preferred, ratio 5
        shp_row("p3", "Close call A.", "Close call B.", 1, 11, 10),  # ratio 1.1: filtered from train
    ]
    root = write_shp(tmp_path / "shp", rows, rows)
    data = load("shp", path=str(root), data_dir="askscience")
    assert data.train.prompts == [f"{H} Why is the sky blue? (p1){A}", f"{H} Why is the sky blue? (p2){A}"]
    assert data.train.chosen == [" Rayleigh scattering.", " Shorter wavelengths scatter more."]
    assert data.train.rejected == [" Magic.", " Dunno."]
    assert (data.train.scores_chosen, data.train.scores_rejected) == ([30, 20], [10, 4])
    assert data.report["splits"]["train"]["filtered"] == {"score_ratio below 2": 1}
    assert len(data.eval) == 3  # eval pairs are not filtered
    chat = load("shp", path=str(root), chat=True, min_score_ratio=1.0)
    assert chat.train.prompts[2] == [{"role": "user", "content": "Why is the sky blue? (p3)"}]


def test_shp_keeps_at_most_max_pairs_per_post_drawn_with_the_seed(tmp_path: Path):
    rows = [shp_row("big", f"good {i}", f"bad {i}", 1, 50 + i, 5) for i in range(7)]
    rows += [shp_row("small", "good", "bad", 1, 9, 3)]
    root = write_shp(tmp_path / "shp", rows, rows)
    data = load("shp", path=str(root), max_pairs_per_post=5)
    posts = [m["post_id"] for m in data.train.metadata]
    assert (posts.count("big"), posts.count("small")) == (5, 1)
    assert data.report["splits"]["train"]["filtered"] == {"beyond 5 pairs of its post": 2}
    again = load("shp", path=str(root), max_pairs_per_post=5)
    assert again.train.chosen == data.train.chosen  # same seed, same draw
    assert len(load("shp", path=str(root), max_pairs_per_post=None).train) == 8


# ---- OpenAssistant/oasst1: data/{train,validation}-00000-of-00001.parquet, one row per message ---------


def oasst_message(
    mid: str, parent: str | None, text: str, role: str, rank: int | None, lang: str = "en"
) -> dict:
    return {
        "message_id": mid,
        "parent_id": parent,
        "user_id": f"user-{mid}",
        "created_date": "2023-02-05T14:23:50.983374+00:00",
        "text": text,
        "role": role,
        "lang": lang,
        "review_count": 3,
        "review_result": True,
        "deleted": False,
        "rank": rank,
        "synthetic": False,
        "model_name": None,
        "detoxify": None,
        "message_tree_id": "tree-1",
        "tree_state": "ready_for_export",
        "emojis": {"name": ["+1"], "count": [2]},
        "labels": {"name": ["spam", "quality"], "value": [0.0, 0.75], "count": [3, 3]},
    }


OASST_TREE = [
    oasst_message("p", None, "What is 2 + 2?", "prompter", None),
    oasst_message("a0", "p", "4.", "assistant", 0),
    oasst_message("a1", "p", "Four, I think.", "assistant", 1),
    oasst_message("a2", "p", "5.", "assistant", 2),
    oasst_message("q", "a0", "And 3 + 3?", "prompter", None),
    oasst_message("b0", "q", "6.", "assistant", 0),
    oasst_message("b1", "q", "Sechs.", "assistant", 1, lang="de"),
    oasst_message("c", "q", "unranked", "assistant", None),
]


def test_oasst_pairs_each_ranked_reply_with_its_sibling_ranked_one_better(tmp_path: Path):
    root = tmp_path / "oasst"
    write_parquet(root / "data" / "train-00000-of-00001.parquet", OASST_TREE)
    write_parquet(root / "data" / "validation-00000-of-00001.parquet", OASST_TREE[:3])
    data = load("oasst", path=str(root), chat=True)
    user, assistant = (
        (lambda t: {"role": "user", "content": t}),
        (lambda t: {"role": "assistant", "content": t}),
    )
    assert data.train.prompts == [[user("What is 2 + 2?")], [user("What is 2 + 2?")]]
    assert (data.train.chosen, data.train.rejected) == (["4.", "Four, I think."], ["Four, I think.", "5."])
    assert data.report["splits"]["train"]["filtered"] == {"lang not in ['en']": 1}  # b1 is German
    everything = load("oasst", path=str(root), chat=True, languages=[])
    assert everything.train.prompts[-1] == [user("What is 2 + 2?"), assistant("4."), user("And 3 + 3?")]
    assert (everything.train.chosen[-1], everything.train.rejected[-1]) == ("6.", "Sechs.")
    text = load("oasst", path=str(root))
    assert (text.train.prompts[0], text.train.chosen[0]) == (f"{H} What is 2 + 2?{A}", " 4.")
    assert data.eval.chosen == ["4."]


# ---- stanfordnlp/imdb: plain_text/{train,test}-00000-of-00001.parquet of text, label --------------------


def test_imdb_prompts_are_review_prefixes_of_2_to_8_words(tmp_path: Path):
    import numpy as np

    review = "This movie was<br /><br />absolutely wonderful, the best film of the year by far and away."
    prefixes = review_prefixes([review] * 200, 2, 8, np.random.default_rng(0))
    assert {len(p.split()) for p in prefixes} == set(range(2, 9))
    assert all("This movie was absolutely wonderful, the best film".startswith(p) for p in prefixes)
    root = tmp_path / "imdb"
    for split in ("train", "test"):
        write_parquet(
            root / "plain_text" / f"{split}-00000-of-00001.parquet", [{"text": review, "label": 1}] * 5
        )
    prompts = load_prompts(IMDbConfig(path=str(root), max_train_examples=3), seed=0)
    assert (len(prompts["train"]), len(prompts["eval"])) == (3, 5)


def test_imdb_pairs_from_samples_rank_by_score_and_skip_ties():
    """Scores .9, .2, .9: pairs (0 > 1), (2 > 1); the tie (0, 2) is no preference."""
    pairs = pairs_from_samples(["The film"], [["great fun", "dull", "a joy"]], [[0.9, 0.2, 0.9]])
    assert (pairs.chosen, pairs.rejected) == (["great fun", "a joy"], ["dull", "dull"])
    assert (pairs.scores_chosen, pairs.scores_rejected, pairs.labels) == ([0.9, 0.9], [0.2, 0.2], [1.0, 1.0])
    assert len(pairs_from_samples(["x"], [["a", "b", "c", "d"]], [[4, 3, 2, 1]], max_pairs_per_prompt=2)) == 2


def write_imdb(root: Path, reviews: list[str]) -> Path:
    for split in ("train", "test"):
        rows = [{"text": review, "label": 1} for review in reviews]
        write_parquet(root / "plain_text" / f"{split}-00000-of-00001.parquet", rows)
    return root


def test_imdb_without_precomputed_pairs_asks_for_pairs_from_the_references_samples(tmp_path: Path):
    root = write_imdb(
        tmp_path / "imdb", ["This movie was absolutely wonderful, the best film of the year."] * 6
    )
    data = load("imdb", path=str(root), samples_per_prompt=3, scorer="sentiment")
    request = data.pairs_from_samples
    assert (len(data.train), len(data.eval)) == (0, 0)
    assert (len(request.train_prompts), len(request.eval_prompts), request.samples_per_prompt) == (6, 6, 3)
    assert request.scorer == "sentiment" and all(p.startswith("This movie") for p in request.train_prompts)


def test_imdb_trains_on_a_file_of_precomputed_pairs(tmp_path: Path):
    pairs = pairs_from_samples(["The film"] * 40, [["great", "awful"]] * 40, [[0.9, 0.1]] * 40)
    rows = [
        {"prompt": p, "chosen": c, "rejected": r}
        for p, c, r in zip(pairs.prompts, pairs.chosen, pairs.rejected)
    ]
    data = load("imdb", pairs_path=write_jsonl(tmp_path / "pairs.jsonl", rows), eval_fraction=0.8)
    assert (len(data.train), len(data.eval), data.train.chosen[0]) == (8, 32, "great")


# ---- mixture -------------------------------------------------------------------------------------------


def test_allocate_splits_by_weight_with_largest_remainders():
    """1:1 of sizes 100 and 10: the most without repeats is 20 (b's 10 is half), 10 each. 3:1 of 8: 6 + 2.
    1:1:1 of 10: 3.33 each, the largest remainders (ties in order) give 4, 3, 3."""
    assert allocate({"a": 100, "b": 10}, {"a": 1, "b": 1}, None, "train_examples") == {"a": 10, "b": 10}
    assert allocate({"a": 100, "b": 10}, {"a": 3, "b": 1}, 8, "train_examples") == {"a": 6, "b": 2}
    assert allocate({"a": 9, "b": 9, "c": 9}, {"a": 1, "b": 1, "c": 1}, 10, "k") == {"a": 4, "b": 3, "c": 3}
    with pytest.raises(ValueError, match=r"dataset\.train_examples=30: source b has 10 pairs.*at most 20"):
        allocate({"a": 100, "b": 10}, {"a": 1, "b": 1}, 30, "train_examples")


def test_mixture_draws_by_weight_tags_sources_and_reports_counts(tmp_path: Path, caplog):
    hh = write_hh(tmp_path / "hh", {"harmless-base": (hh_rows(60, "h"), hh_rows(40, "h"))})
    shp_rows = [shp_row(f"p{i}", f"good {i}", f"bad {i}", 1, 30, 10) for i in range(20)]
    shp = write_shp(tmp_path / "shp", shp_rows, shp_rows)
    sources = {
        "hh": {"name": "hh_rlhf", "weight": 3.0, "path": str(hh)},
        "shp": {"weight": 1.0, "path": str(shp)},
    }
    with caplog.at_level(logging.INFO, logger="prefopt"):
        data = load("mixture", sources=sources, eval_examples=8)
    assert (len(data.train), len(data.eval)) == (60 + 20, 8)  # train: hh's 60 is 3/4 of 80, shp's 20 is 1/4
    report = data.report["sources"]
    counts = {label: (entry["train"], entry["eval"]) for label, entry in report.items()}
    assert counts == {"hh": (60, 6), "shp": (20, 2)}
    assert (report["hh"]["eval_available"], report["shp"]["dataset"]) == (40, "shp")
    sources_of = [m["source"] for m in data.train.metadata]
    assert (sources_of.count("hh"), sources_of.count("shp")) == (60, 20)
    assert sources_of != ["hh"] * 60 + ["shp"] * 20  # shuffled together
    assert load("mixture", sources=sources, eval_examples=8).train.chosen == data.train.chosen  # seeded
    assert load("mixture", sources=sources, eval_examples=8, seed=1).train.chosen != data.train.chosen
    assert any("hh 60 of 60, shp 20 of 20" in r.getMessage() for r in caplog.records)


def test_mixture_refuses_sources_of_different_formats(tmp_path: Path):
    hh = write_hh(tmp_path / "hh", {"harmless-base": (hh_rows(4), hh_rows(4))})
    uf = write_ultrafeedback(tmp_path / "uf", [uf_row(0, "q", "a", "b")], [uf_row(1, "r", "c", "d")])
    sources = {"hh_rlhf": {"path": str(hh)}, "ultrafeedback": {"path": str(uf)}}
    with pytest.raises(ValueError, match=r"different prompt formats.*dataset\.chat"):
        load("mixture", sources=sources)
    assert len(load("mixture", sources=sources, chat=True).train) == 2


# ---- local data: files, dirs, data_files, missing paths ------------------------------------------------


def pref_rows(n: int) -> list[dict]:
    return [{"prompt": f"q{i}", "chosen": f"yes {i}", "rejected": f"no {i}"} for i in range(n)]


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".parquet"])
def test_a_local_file_of_each_kind_just_works(tmp_path: Path, suffix: str):
    rows, file = pref_rows(40), tmp_path / f"pairs{suffix}"
    if suffix == ".jsonl":
        write_jsonl(file, rows)
    elif suffix == ".json":
        file.write_text(json.dumps(rows))
    else:
        getattr(pd.DataFrame(rows), "to_csv" if suffix == ".csv" else "to_parquet")(file, index=False)
    data = load("preference", path=str(file), eval_fraction=0.8)
    assert (len(data.train), len(data.eval)) == (8, 32)
    assert sorted(data.train.prompts + data.eval.prompts) == sorted(r["prompt"] for r in rows)


def test_a_dir_of_split_files_gives_train_and_test(tmp_path: Path):
    write_jsonl(tmp_path / "d" / "train.jsonl", pref_rows(5))
    write_jsonl(tmp_path / "d" / "test.jsonl", pref_rows(3))
    data = load("preference", path=str(tmp_path / "d"))
    assert (len(data.train), len(data.eval), data.report["eval_from"]) == (5, 3, "split 'test'")


def test_data_files_as_a_plain_string_composes_and_loads(tmp_path: Path):
    """The issue's `dataset.data_files=<file>` ("Cannot assign str to Dict[str, str]" before)."""
    file = write_jsonl(tmp_path / "pairs.jsonl", pref_rows(40))
    overrides = [
        "dataset=preference",
        "dataset.path=json",
        f"dataset.data_files={file}",
        "dataset.eval_fraction=0.8",
    ]
    rc = load_run_config(compose_config(*overrides))
    assert rc.dataset.data_files == file
    data = DATASETS[rc.dataset_name].load(rc.dataset, rc.seed)
    assert (len(data.train), len(data.eval)) == (8, 32)


def test_chat_message_rows_give_message_prompts_and_text_responses(tmp_path: Path):
    user, reply = [{"role": "user", "content": "Hi"}], lambda t: [{"role": "assistant", "content": t}]
    rows = [
        {"prompt": user, "chosen": reply("Hello!"), "rejected": reply("Go away.")},  # TRL conversational
        {"prompt": "Hi", "chosen": reply("Hey."), "rejected": reply("No.")},  # text prompt: one user message
        {
            "prompt": "Hi",
            "chosen": user + reply("Yo."),
            "rejected": user + reply("Meh."),
        },  # UltraFeedback style
    ]
    write_jsonl(tmp_path / "d" / "train.jsonl", rows)
    write_jsonl(tmp_path / "d" / "test.jsonl", rows)
    data = load("preference", path=str(tmp_path / "d"))
    assert data.train.prompts == [user, user, user]
    assert (data.train.chosen, data.train.rejected) == (
        ["Hello!", "Hey.", "Yo."],
        ["Go away.", "No.", "Meh."],
    )
    implicit = [{"chosen": user + reply("Yo."), "rejected": user + reply("Meh.")}]
    write_jsonl(tmp_path / "i" / "train.jsonl", implicit)
    write_jsonl(tmp_path / "i" / "test.jsonl", implicit)
    data = load("preference", path=str(tmp_path / "i"), prompt_column=None)
    assert (data.train.prompts, data.train.chosen) == ([user], ["Yo."])


def test_a_missing_local_path_is_a_one_line_error_naming_dataset_path(tmp_path: Path):
    for path in (str(tmp_path / "nope.jsonl"), str(tmp_path / "no_dir"), "./data/nope"):
        with pytest.raises(FileNotFoundError) as error:
            load("preference", path=path)
        assert f"dataset.path={path}" in str(error.value) and "\n" not in str(error.value)
    with pytest.raises(FileNotFoundError, match=r"dataset\.data_files: no such file"):
        load("preference", path="json", data_files=str(tmp_path / "missing.jsonl"))
    with pytest.raises(ValueError, match=r"dataset\.path=json reads dataset\.data_files"):
        load("preference", path="json")


# ---- bad rows: numbered as the file's lines, missing reported as missing -------------------------------


def test_jsonl_rows_are_numbered_by_file_line_counting_blank_lines(tmp_path: Path):
    rows = pref_rows(3)
    del rows[2]["rejected"]
    file = tmp_path / "d" / "train.jsonl"
    file.parent.mkdir()
    file.write_text(json.dumps(rows[0]) + "\n\n" + json.dumps(rows[1]) + "\n" + json.dumps(rows[2]) + "\n")
    write_jsonl(tmp_path / "d" / "test.jsonl", pref_rows(2))
    with pytest.raises(ValueError, match=r"train\.jsonl line 4: field 'rejected': missing"):
        load("preference", path=str(tmp_path / "d"), strict=True)
    data = load("preference", path=str(tmp_path / "d"))
    assert data.report["splits"]["train"]["first_bad"][0]["reason"] == "missing"


def test_csv_rows_are_numbered_by_line_with_the_header_as_line_1(tmp_path: Path):
    """Row 0 spans lines 2-3 (a quoted line break), row 1 is line 4, row 2 (empty chosen) line 5."""
    file = tmp_path / "pairs.csv"
    file.write_text('prompt,chosen,rejected\n"two\nlines",yes,no\nq1,yes 1,no 1\nq2,,no 2\n')
    with pytest.raises(ValueError, match=r"pairs\.csv line 5: field 'chosen': missing"):
        load("preference", path=str(file), strict=True, min_eval_pairs=1, eval_fraction=0.5)


def test_json_array_rows_are_numbered_by_record_index(tmp_path: Path):
    rows = pref_rows(3)
    rows[1]["chosen"] = rows[1]["rejected"]
    file = tmp_path / "pairs.json"
    file.write_text(json.dumps(rows))
    with pytest.raises(ValueError, match=r"pairs\.json record 1 \(0-based\): field 'rejected': identical"):
        load("preference", path=str(file), strict=True, min_eval_pairs=1, eval_fraction=0.5)


def test_a_non_text_response_and_an_all_bad_split(tmp_path: Path):
    rows = [{"prompt": "q", "chosen": 7, "rejected": "no"}, {"prompt": "q", "chosen": "", "rejected": "no"}]
    file = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(ValueError, match=r"split 'train': no usable pairs in 2 rows"):
        load("preference", path="json", data_files={"train": file, "test": file})


def test_both_split_sizes_are_logged(tmp_path: Path, caplog):
    write_jsonl(tmp_path / "d" / "train.jsonl", pref_rows(5))
    write_jsonl(tmp_path / "d" / "test.jsonl", pref_rows(3))
    with caplog.at_level(logging.INFO, logger="prefopt.data"):
        load("preference", path=str(tmp_path / "d"))
    assert any("5 train pairs" in r.getMessage() and "3 eval pairs" in r.getMessage() for r in caplog.records)


# ---- configs -------------------------------------------------------------------------------------------

SCHEMAS = {
    "hh_rlhf": HHConfig,
    "ultrafeedback": UltraFeedbackConfig,
    "shp": SHPConfig,
    "oasst": OASSTConfig,
    "imdb": IMDbConfig,
    "mixture": MixtureConfig,
    "preference": PreferenceFileConfig,
}


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_every_dataset_yaml_composes_and_validates(name: str):
    extra = ["dataset.path=org/pairs"] if name == "preference" else []  # a hub name: a local file must exist
    rc = load_run_config(compose_config(f"dataset={name}", *extra))
    assert rc.dataset_name == name and type(rc.dataset) is SCHEMAS[name]
    assert rc.dataset.max_length is None and rc.dataset.max_prompt_tokens == 256


def test_the_default_mixture_is_hh_oasst_shp_and_a_composed_hh_config_loads_a_local_copy(tmp_path: Path):
    rc = load_run_config(compose_config("dataset=mixture"))
    assert [(s.name, s.weight) for s in rc.dataset.parsed] == [("hh_rlhf", 1.0), ("oasst", 1.0), ("shp", 1.0)]
    root = write_hh(tmp_path / "hh", {"helpful-base": (hh_rows(3), hh_rows(2))})
    rc = load_run_config(
        compose_config("dataset=hh_rlhf", f"dataset.path={root}", "dataset.data_dir=helpful-base")
    )
    data = DATASETS[rc.dataset_name].load(rc.dataset, rc.seed)
    assert (len(data.train), len(data.eval), data.max_length) == (3, 2, None)
