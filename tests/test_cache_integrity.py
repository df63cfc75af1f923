"""Every cache entry proves it reads back as written: reference log-probs, fitted references and LLM-judge
answers carry a sha256 checked on read. A damaged entry (flipped bytes under an intact header, truncated,
garbage) is one warning naming the file, deleted and recomputed, and the run's numbers are a clean run's;
a cache dir that cannot be written is one warning and the run goes on uncached."""

from __future__ import annotations

import errno
import json
import logging
import shutil
import struct
import subprocess

import pytest
from conftest import read_jsonl, run_training
from test_judges import MARKER, endpoint, judge_for  # noqa: F401 - the fake judge server, as a fixture

from prefopt.files import read_sealed_json

STEPS = ["trainer.max_steps=3", "trainer.log_every_steps=1"]
ENTRIES = {  # a cache entry's file, relative to $PREFOPT_CACHE
    "reference log-probs": "reference_logps/*.safetensors",
    "fitted reference weights": "reference/*/model.safetensors",
    "fitted reference report": "reference/*/report.json",
}


def flip_payload(path) -> None:
    """Flip bytes the reader parses: a safetensors file's tensor bytes (its header stays intact), a JSON
    record's first number (it stays valid JSON)."""
    data = bytearray(path.read_bytes())
    if path.suffix == ".safetensors":
        start = 8 + struct.unpack("<Q", bytes(data[:8]))[0]  # u64 header length, header, then the tensors
        for i in range(start + 4, start + 8):  # the second float32's bytes
            data[i] ^= 0x5A
    else:
        text = data.decode()
        at = next(i for i, c in enumerate(text) if c.isdigit() and text[i - 1] in " -:")
        data = bytearray((text[:at] + str((int(text[at]) + 1) % 10) + text[at + 1 :]).encode())
    path.write_bytes(bytes(data))


def truncate(path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def garbage(path) -> None:
    path.write_bytes(b"{not json, not safetensors")


def run_results(run_dir) -> tuple[list, dict]:
    losses = [r["train/loss"] for r in read_jsonl(run_dir / "metrics.jsonl") if "train/loss" in r]
    return losses, json.loads((run_dir / "eval.json").read_text())["final"]


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    """A clean run that filled its own cache: its numbers and a copy of the cache."""
    import os

    root = tmp_path_factory.mktemp("clean")
    saved = os.environ["PREFOPT_CACHE"]
    os.environ["PREFOPT_CACHE"] = str(root / "cache")
    try:
        summary = run_training(root / "run", *STEPS)
    finally:
        os.environ["PREFOPT_CACHE"] = saved
    assert summary["data"]["reference_logps_cache"] == "miss" and summary["reference_fit"]["cached"] is False
    return root / "cache", run_results(root / "run")


@pytest.mark.parametrize("damage", [flip_payload, truncate, garbage])
@pytest.mark.parametrize("entry", list(ENTRIES))
def test_a_damaged_entry_is_one_warning_naming_it_then_recomputed(
    entry, damage, clean, tmp_path, monkeypatch, caplog
):
    cache, expected = clean
    shutil.copytree(cache, tmp_path / "cache")
    monkeypatch.setenv("PREFOPT_CACHE", str(tmp_path / "cache"))
    (path,) = (tmp_path / "cache").glob(ENTRIES[entry])
    damage(path)
    with caplog.at_level(logging.WARNING):
        summary = run_training(tmp_path / "run", *STEPS)
    warnings = [
        r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "cache" in r.getMessage()
    ]
    assert len(warnings) == 1 and str(path) in warnings[0], warnings
    assert run_results(tmp_path / "run") == expected  # the same numbers as the clean run, bit for bit
    if entry == "reference log-probs":
        assert summary["data"]["reference_logps_cache"] == "miss" and summary["reference_fit"]["cached"]
    else:
        assert summary["reference_fit"]["cached"] is False
        assert summary["data"]["reference_logps_cache"] == "hit"  # the same fit: the same key, intact
    if path.suffix == ".json":  # rewritten whole (its report's timing differs from the clean run's)
        assert read_sealed_json(path)["report"]["kl"] == summary["reference_fit"]["kl"]
    else:  # the same tensors (a safetensors header's key order may differ)
        from safetensors.torch import load_file

        stored, original = load_file(path), load_file(cache / path.relative_to(tmp_path / "cache"))
        assert stored.keys() == original.keys() and all(stored[k].equal(original[k]) for k in stored)


@pytest.fixture
def read_only_cache(tmp_path, monkeypatch):
    """$PREFOPT_CACHE on a read-only tmpfs (root ignores permission bits); where mounting is not allowed,
    every cache write raises EROFS instead."""
    cache = tmp_path / "ro-cache"
    cache.mkdir()
    mounted = (
        subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(cache)]).returncode == 0
    )
    if not mounted:
        import safetensors.torch

        def read_only(*args, **kwargs):
            raise OSError(errno.EROFS, "Read-only file system")

        for name in ("save_file", "save_model"):
            monkeypatch.setattr(safetensors.torch, name, read_only)
    monkeypatch.setenv("PREFOPT_CACHE", str(cache))
    yield cache
    if mounted:
        subprocess.run(["umount", str(cache)], check=True)


def test_a_read_only_cache_is_one_warning_per_cache_and_the_run_completes(
    read_only_cache, clean, tmp_path, caplog
):
    with caplog.at_level(logging.WARNING):
        summary = run_training(tmp_path / "run", *STEPS)
    assert summary["status"] == "completed"
    assert run_results(tmp_path / "run") == clean[1]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    for cache in ("reference fit cache", "reference log-probs cache"):
        assert sum(cache in w and "could not write" in w for w in warnings) == 1, warnings
    assert not list(read_only_cache.iterdir())


def test_a_damaged_judge_answer_is_asked_again(endpoint, tmp_path, caplog):  # noqa: F811
    args = (["p"], [f"x {MARKER}"], ["y"])
    first = judge_for(endpoint, tmp_path).compare(*args)
    asked = len(endpoint.requests)
    paths = sorted((tmp_path / "judge_cache").glob("*.json"))
    assert len(paths) == 2  # both orders
    for path, damage in zip(paths, (flip_payload, truncate)):
        damage(path)
    with caplog.at_level(logging.WARNING):
        again = judge_for(endpoint, tmp_path).compare(*args)
    assert again == first and len(endpoint.requests) == asked + 2
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert all(sum(str(p) in w for w in warnings) == 1 for p in paths), warnings
    judge_for(endpoint, tmp_path).compare(*args)  # rewritten whole: answered from the cache
    assert len(endpoint.requests) == asked + 2


def test_an_unwritable_judge_cache_is_one_warning(endpoint, tmp_path, monkeypatch, caplog):  # noqa: F811
    from prefopt.evaluation import judges

    def read_only(path, value, indent=1):
        raise OSError(errno.EROFS, "Read-only file system", str(path))

    monkeypatch.setattr(judges, "atomic_write_json", read_only)
    with caplog.at_level(logging.WARNING):
        rows = judge_for(endpoint, tmp_path).compare(["p", "q"], [MARKER, "a"], ["b", MARKER])
    assert [r["p_first"] for r in rows] == [1.0, 0.0]
    assert sum("cannot write" in r.getMessage() for r in caplog.records) == 1
