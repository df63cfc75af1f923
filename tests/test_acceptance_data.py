"""Every dataset trains end to end on a local tiny pretrained model, with and without LoRA: the real
loaders on fixtures in each hub format, the tokenizer's BOS and chat template, the shared loop."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from conftest import compose_config, save_tiny_llama
from test_datasets import (
    OASST_TREE,
    hh_rows,
    shp_row,
    uf_row,
    write_hh,
    write_jsonl,
    write_parquet,
    write_shp,
    write_ultrafeedback,
)
from test_tokenization import bos_tokenizer

from prefopt.config import load_run_config
from prefopt.training.train import train

STEPS = ["trainer.max_steps=2", "trainer.batch_size=8", "eval.eval_every_steps=2", "logger=none"]


@pytest.fixture(scope="module")
def tiny_pretrained(tmp_path_factory) -> Path:
    """A 2-layer Llama saved with save_pretrained, its tokenizer adding BOS and carrying a chat template."""
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), bos_tokenizer(chat_template=True))


def oasst_trees(copies: int) -> list[dict]:
    """The test tree repeated under fresh ids, so each split has several ranked sibling pairs."""
    rows = []
    for c in range(copies):
        for message in OASST_TREE:
            parent = message["parent_id"]
            rows.append(
                {
                    **message,
                    "message_id": f"{c}-{message['message_id']}",
                    "parent_id": parent and f"{c}-{parent}",
                }
            )
            rows[-1]["message_tree_id"] = f"tree-{c}"
    return rows


def fixture(name: str, root: Path) -> list[str]:
    """Overrides pointing `dataset=<name>` at a local copy in its hub format."""
    if name == "preference":
        rows = [{"prompt": f"tell me {i}", "chosen": "yes the cat", "rejected": "no"} for i in range(40)]
        write_jsonl(root / "train.jsonl", rows)
        write_jsonl(root / "test.jsonl", rows[:8])
        return [f"dataset.path={root}"]
    if name == "hh_rlhf":
        return [f"dataset.path={write_hh(root, {'harmless-base': (hh_rows(40), hh_rows(8))})}"]
    if name == "ultrafeedback":
        rows = [uf_row(i, f"tell me about cats {i}", "the cat sat", "no") for i in range(40)]
        return [f"dataset.path={write_ultrafeedback(root, rows, rows[:8])}"]
    if name == "shp":
        rows = [shp_row(f"p{i}", f"yes {i}", f"no {i}", 1, 30, 10) for i in range(40)]
        return [f"dataset.path={write_shp(root, rows, rows[:8])}"]
    if name == "oasst":
        write_parquet(root / "data" / "train-00000-of-00001.parquet", oasst_trees(20))
        write_parquet(root / "data" / "validation-00000-of-00001.parquet", oasst_trees(4))
        return [f"dataset.path={root}"]
    if name == "imdb":
        rows = [{"prompt": f"The film {i}", "chosen": "great", "rejected": "awful"} for i in range(80)]
        return [f"dataset.pairs_path={write_jsonl(root / 'pairs.jsonl', rows)}", "dataset.eval_fraction=0.5"]
    if name == "mixture":
        hh = write_hh(root / "hh", {"harmless-base": (hh_rows(40, "h"), hh_rows(20, "h"))})
        rows = [shp_row(f"p{i}", f"yes {i}", f"no {i}", 1, 30, 10) for i in range(40)]
        shp = write_shp(root / "shp", rows, rows[:20])
        return [
            f"dataset.sources.hh_rlhf.path={hh}",
            f"dataset.sources.shp.path={shp}",
            "~dataset.sources.oasst",
        ]
    raise AssertionError(name)


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize(
    "name", ["preference", "hh_rlhf", "ultrafeedback", "shp", "oasst", "imdb", "mixture"]
)
def test_every_dataset_trains_on_a_local_tiny_model(tmp_path, monkeypatch, tiny_pretrained, name, lora):
    import datasets.config

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-datasets"))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    overrides = [f"dataset={name}", *fixture(name, tmp_path / "data"), "model=pretrained"]
    overrides += [f"model.name_or_path={tiny_pretrained}", *STEPS]
    overrides += ["model.lora.r=8"] if lora else []
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    summary = train(load_run_config(compose_config(*overrides)), run_dir)
    assert summary["status"] == "completed"
    assert math.isfinite(summary["final_train"]["train/loss"])
    assert summary["reference_eval"]["eval/rewards/accuracies"] == pytest.approx(0.5)  # policy = reference
    assert summary["data"]["train_pairs"] > 0 and summary["data"]["eval_pairs"] > 0
    saved = {p.name for p in (run_dir / "checkpoint").iterdir()}
    assert ("adapter_config.json" in saved) == lora
    assert json.loads((run_dir / "eval.json").read_text())["history"][-1]["step"] == 2
