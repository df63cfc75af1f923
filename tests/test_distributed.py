"""Scale-out under torchrun, on CPU with gloo: two processes with FSDP2 (or DDP) take the same steps as one
process with the same global batch, and a sharded checkpoint resumes exactly.

Tolerance: the ranks sum their pairs' losses and gradients in another order than one process does, so the
runs agree to float32 rounding, not bit for bit, and Adam amplifies that rounding step by step (m / sqrt(v)
divides tiny gradient differences by tiny numbers). Measured over 12 steps: losses within 3e-8 for the first
4 steps, 1.2e-6 at step 5, 6e-5 at step 12. Asserted: 1e-6 for steps 1-4, 2e-4 for all 12; gradient
norms 1e-4 relative for steps 1-4."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import FAST, ROOT, read_jsonl, run_training

from prefopt.engine.distributed import World, my_pairs, my_share
from prefopt.training.checkpoint import checkpoint_dir

PYTHON = sys.executable
RUN = [
    *[o for o in FAST if not o.startswith(("trainer.max_steps", "eval.eval_every_steps"))],
    "trainer.max_steps=12",
    "trainer.batch_size=8",
    "trainer.optimizer.lr=3e-4",
    "trainer.checkpoint.every_steps=6",
    "trainer.log_every_steps=1",
    "eval.eval_every_steps=6",
    "seed=5",
]


def prefopt(run_dir: Path, *overrides: str, processes: int = 1) -> None:
    launcher = [PYTHON, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    command = [*(launcher if processes > 1 else [PYTHON]), "-m", "prefopt.cli", "train", *RUN]
    command += [f"hydra.run.dir={run_dir}", *overrides]
    env = {**os.environ, "CI": "true", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


def losses(run_dir: Path) -> list[float]:
    return [r["train/loss"] for r in train_records(run_dir)]


def train_records(run_dir: Path) -> list[dict]:
    return [r for r in read_jsonl(run_dir / "metrics.jsonl") if "train/loss" in r]


def assert_same_steps(a: Path, b: Path) -> None:
    first, second = train_records(a), train_records(b)
    assert [r["step"] for r in first] == [r["step"] for r in second] == list(range(1, 13))
    for x, y in zip(first, second):
        early = x["step"] <= 4
        assert x["train/loss"] == pytest.approx(y["train/loss"], abs=1e-6 if early else 2e-4), x["step"]
        if early:
            assert x["train/grad_norm"] == pytest.approx(y["train/grad_norm"], rel=1e-4), x["step"]
        assert 0 <= y["train/rewards/accuracies"] <= 1  # a global mean, not a sum over ranks


def test_two_ranks_with_fsdp2_take_the_steps_of_one_process_and_resume_from_sharded_checkpoints(tmp_path):
    prefopt(tmp_path / "one")
    prefopt(tmp_path / "fsdp", "trainer=fsdp", processes=2)
    assert_same_steps(tmp_path / "one", tmp_path / "fsdp")
    shards = sorted(p.name for p in (checkpoint_dir(tmp_path / "fsdp", 6) / "state").iterdir())
    assert len(shards) == 2 and all(name.startswith("shard-") for name in shards)  # one file per rank
    assert (tmp_path / "fsdp" / "train.rank1.log").exists()
    summary = json.loads((tmp_path / "fsdp" / "summary.json").read_text())
    single = json.loads((tmp_path / "one" / "summary.json").read_text())
    assert summary["final_eval"]["eval/loss"] == pytest.approx(single["final_eval"]["eval/loss"], abs=2e-4)

    # the sharded checkpoint of step 6, continued by two ranks in another run dir: the same steps 7-12, bit
    # for bit (the same ranks, threads and reduction order on the same machine, from the saved state)
    step6 = checkpoint_dir(tmp_path / "fsdp", 6)
    prefopt(tmp_path / "resumed", "trainer=fsdp", f"trainer.checkpoint.resume={step6}", processes=2)
    assert train_records(tmp_path / "resumed") == [
        {
            **r,
            "time_s": s["time_s"],
            "train/tokens_per_s": s["train/tokens_per_s"],
            "train/elapsed_s": s["train/elapsed_s"],
        }
        for r, s in zip(train_records(tmp_path / "fsdp"), train_records(tmp_path / "resumed"))
    ]


def test_two_ranks_with_ddp_take_the_steps_of_one_process(tmp_path):
    prefopt(tmp_path / "one")
    prefopt(tmp_path / "ddp", "trainer.distributed.strategy=ddp", processes=2)
    assert_same_steps(tmp_path / "one", tmp_path / "ddp")


def test_each_rank_takes_an_equal_contiguous_share_of_the_steps_pairs():
    examples = torch.arange(8)
    shares = [my_pairs(examples, World(rank, 2)).tolist() for rank in range(2)]
    assert shares == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert my_pairs(examples, World()).tolist() == list(range(8))  # one process: all of them
    assert [my_share(list("abcde"), World(rank, 2)) for rank in range(2)] == [list("ace"), list("bd")]


def test_a_batch_that_does_not_split_over_the_ranks_is_refused(monkeypatch):
    from prefopt.engine import distributed

    monkeypatch.setattr(distributed, "world", lambda: World(0, 2))
    with pytest.raises(ValueError, match="trainer.batch_size"):
        distributed.check_divisible(7, 7)  # pairs per step, pairs per micro-batch
    with pytest.raises(ValueError, match="trainer.micro_batch_size"):
        distributed.check_divisible(8, 3)
    distributed.check_divisible(8, 2)


def test_a_multi_task_slurm_step_describes_its_ranks_as_torchrun_would(monkeypatch):
    """hydra/launcher=slurm with tasks_per_node > 1: each task is a rank (no torchrun on the node)."""
    from prefopt.engine.distributed import export_slurm_environment

    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.setenv(name, "")  # recorded, so teardown restores what the export below sets
        monkeypatch.delenv(name)
    slurm = {
        "SUBMITIT_EXECUTOR": "slurm",
        "SLURM_JOB_ID": "4242",
        "SLURM_NTASKS": "4",
        "SLURM_PROCID": "3",
        "SLURM_LOCALID": "1",
    }
    slurm |= {"SLURM_JOB_NUM_NODES": "2", "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_NODEID": "1"}
    for name, value in slurm.items():
        monkeypatch.setenv(name, value)
    assert export_slurm_environment()
    assert (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["LOCAL_RANK"]) == ("3", "4", "1")
    assert os.environ["MASTER_ADDR"] == "gpu07"
    monkeypatch.setenv("SLURM_NTASKS", "1")
    monkeypatch.delenv("WORLD_SIZE")
    assert not export_slurm_environment()  # one task: a single process


def test_bf16_compute_weights_over_fp32_master_shards_in_one_process(tmp_path):
    """trainer=fsdp trainer.distributed.param_dtype=bfloat16 without torchrun: FSDP2 over a one-rank group
    computes in bf16 (losses near, not equal to, fp32's) while the optimizer's weights and checkpoints stay
    fp32."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    steps = ["trainer.max_steps=6", "trainer.log_every_steps=1", "trainer.checkpoint.every_steps=6"]
    run_training(tmp_path / "fp32", *steps)
    run_training(tmp_path / "bf16", *steps, "trainer=fsdp", "trainer.distributed.param_dtype=bfloat16")
    fp32, bf16 = (losses(tmp_path / name) for name in ("fp32", "bf16"))
    assert bf16 == pytest.approx(fp32, abs=2e-2) and bf16 != fp32
    state = next((checkpoint_dir(tmp_path / "bf16", 6) / "state").glob("*.safetensors"))
    with safe_open(str(state), framework="pt") as handle:
        weights = [handle.get_tensor(k) for k in handle.keys() if k.startswith("model.")]  # noqa: SIM118
    assert weights and all(w.dtype == torch.float32 for w in weights)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "bf16" / "checkpoint")
    assert next(model.parameters()).dtype == torch.float32
    assert not torch.distributed.is_initialized()  # the one-rank group is gone with the run
