"""An experiment's sampled pairs, computed once and shared by all its runs (`make reproduce-real`).

A dataset=imdb run builds its pairs from the starting model's samples of each prompt, ranked by an aux
reward (`prefopt.data.imdb.pairs_from_samples`); twelve runs would sample the same pairs twelve times.
`precompute_pairs` does it once, with the same code (`prefopt.engine.prepare`), and writes them as a
dataset=preference dir (train.jsonl + test.jsonl) that the runs read through `dataset.pairs_path`. The
pairs are cached in `$PREFOPT_CACHE/sampled_pairs/<key>.json` (sealed: a sha256 of the content, checked on
read; a damaged entry is one warning and sampled again), the key a hash of the starting model's weights
and name, the prompts, the sampling settings, the scorer's config, the seed, the thread count and the
library versions.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict
from pathlib import Path

import torch
import transformers

from prefopt.files import (
    DamagedFile,
    atomic_write_json,
    atomic_write_text,
    json_sha256,
    read_sealed_json,
    sealed,
)

log = logging.getLogger(__name__)


def cache_dir() -> Path:
    return Path(os.environ.get("PREFOPT_CACHE", Path.home() / ".cache" / "prefopt")) / "sampled_pairs"


def precompute_pairs(rc, out_dir: Path, threads: int = 2) -> Path:
    """The pairs of `rc`'s dataset=imdb request as `<out_dir>/train.jsonl` and `test.jsonl`; returns
    out_dir, for `dataset.pairs_path`."""
    from prefopt.data import DATASETS
    from prefopt.engine.reference_fit import weights_sha256
    from prefopt.engine.sampled_data import data_vocabulary, pairs_from_model_samples
    from prefopt.models import MODELS
    from prefopt.rewards import build_aux_reward

    torch.set_num_threads(threads)
    text = DATASETS[rc.dataset_name].load(rc.dataset, rc.seed)
    request = text.pairs_from_samples
    if request is None:
        raise ValueError(f"dataset={rc.dataset_name}: no sampled-pairs request (pairs_path already given?)")
    aux_reward = build_aux_reward(rc.aux_reward_configs, text.task)
    torch.manual_seed(rc.seed)
    model, tokenizer = MODELS[rc.model_name].build(rc.model, data_vocabulary(text))
    key = json_sha256(
        {
            "weights": weights_sha256(model),
            "model": getattr(rc.model, "name_or_path", rc.model_name),
            "request": asdict(request),
            "scorer": rc.aux_reward.get(request.scorer),
            "limits": [text.max_prompt_tokens, text.max_response_tokens, text.max_length],
            "threads": threads,
            "versions": [torch.__version__, transformers.__version__],
        }
    )
    entry = cache_dir() / f"{key}.json"
    record = _read(entry)
    if record is None:
        pairs = pairs_from_model_samples(text, model, tokenizer, aux_reward, torch.device("cpu"))
        record = {name: _rows(getattr(pairs, name)) for name in ("train", "eval")}
        record["report"] = pairs.report
        _write(entry, record)
    else:
        log.info("sampled pairs: cache hit %s", entry)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, file in (("train", "train.jsonl"), ("eval", "test.jsonl")):
        atomic_write_text(out_dir / file, "".join(json.dumps(row) + "\n" for row in record[name]))
    atomic_write_json(out_dir / "report.json", {"cache_key": key, **record["report"]})
    return out_dir


def _rows(pairs) -> list[dict]:
    columns = zip(pairs.prompts, pairs.chosen, pairs.rejected, pairs.scores_chosen, pairs.scores_rejected)
    return [
        {"prompt": x, "chosen": w, "rejected": lose, "score_chosen": sw, "score_rejected": sl}
        for x, w, lose, sw, sl in columns
    ]


def _read(entry: Path) -> dict | None:
    if not entry.exists():
        return None
    try:
        return read_sealed_json(entry)
    except (DamagedFile, OSError) as error:
        log.warning("%s; sampling the pairs again", error)
        entry.unlink(missing_ok=True)
        return None


def _write(entry: Path, record: dict) -> None:
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(entry, sealed(record))
    except OSError as error:
        log.warning("sampled pairs not cached (%s)", error)
