"""A run dir survives what goes wrong around it: a second writer, a killed sweep, a full disk, damaged files,
a failed first attempt, a read-only output dir.

The process tests run the real CLI in subprocesses (the embedded default model on a small task, slow
enough that a second process or a full disk lands mid-run); the file tests run the loop in-process on the
tiny model. The full-disk and read-only tests mount a small tmpfs (they run as root); where mounting is not
allowed they inject the same error in-process instead of skipping.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shlex
import signal
import subprocess
from pathlib import Path

import pytest
from conftest import FAST, FAST_MODEL, ROOT, compose_config, run_training
from test_resume import PREFOPT, cli, finish, losses, wait_for_step
from waiting import wait_for_exit, wait_for_file_event

from prefopt.config import load_run_config
from prefopt.training.checkpoint import checkpoint_dir, find_checkpoint

ENV = {**os.environ, "CI": "true"}


def train_steps(run_dir: Path) -> list[int]:
    return [step for step, _ in losses(run_dir)]


def one_line_naming(stderr: str, run_dir: Path) -> str:
    """The product's promise for these failures: exactly one line on stderr, naming the run dir (checked
    as structure, not wording); returns it."""
    lines = stderr.splitlines()
    assert len(lines) == 1 and str(run_dir) in lines[0], stderr
    return lines[0]


def resume_command(line: str) -> list[str]:
    """The `prefopt train ... trainer.checkpoint.resume=auto` command a one-line error ends with, as words."""
    words = shlex.split(line[line.index("prefopt train ") :])
    assert words[:2] == ["prefopt", "train"] and "trainer.checkpoint.resume=auto" in words, line
    return words


def leftovers(run_dir: Path) -> list[Path]:
    """Temporary files of atomic writes and staging dirs of checkpoint saves."""
    return [*run_dir.rglob("*.tmp"), *run_dir.glob("checkpoints/.step-*.tmp-*")]


@pytest.fixture
def tmpfs(tmp_path):
    """mount(size) -> a fresh tmpfs of that size under tmp_path, or None where mounting is not allowed;
    unmounted at teardown."""
    mounted = []

    def mount(size: str) -> Path | None:
        point = tmp_path / f"mnt{len(mounted)}"
        point.mkdir()
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(point)], check=False
        )
        if done.returncode != 0:
            return None
        mounted.append(point)
        return point

    yield mount
    for point in mounted:
        subprocess.run(["umount", "-l", str(point)], check=False)


# --- one writer per run dir ---------------------------------------------------------------------------


def test_a_second_writer_exits_2_in_one_line_and_the_first_completes_cleanly(tmp_path):
    """The measured race: the same `trainer.checkpoint.resume=auto` command twice on one run dir. The second
    is refused before it writes; the first's metrics.jsonl holds each step once, no NUL bytes."""
    run_dir = tmp_path / "run"
    same = ["trainer.checkpoint.resume=auto", "trainer.max_steps=150"]  # long enough for the second to start
    first = cli(run_dir, *same)
    wait_for_step(first, run_dir, 2)  # the first holds the lock and is training
    second = finish(cli(run_dir, *same))
    assert first.poll() is None, "the first run ended before the second started"
    assert second.returncode == 2
    lines = second.stderr.splitlines()  # one line naming the run dir and the process that holds it
    assert len(lines) == 1 and str(run_dir) in lines[0] and str(first.pid) in lines[0], second.stderr
    done = finish(first)
    assert done.returncode == 0, done.stderr
    assert b"\0" not in (run_dir / "metrics.jsonl").read_bytes()
    assert train_steps(run_dir) == list(range(1, 151))  # every step once


# --- a sweep's workers die with their parent ----------------------------------------------------------


def _children(pid: int) -> set[int]:
    found = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.add(int(stat.parent.name))
    return found


def _descendants(pid: int) -> set[int]:
    found, todo = set(), [pid]
    while todo:
        new = _children(todo.pop()) - found
        found |= new
        todo += new
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie has ended; only its parent's wait is missing


def test_sweep_workers_die_when_the_sweep_process_is_killed_with_sigkill(tmp_path):
    sweep = tmp_path / "sweep"
    args = [PREFOPT, "train", "-m", *FAST, *FAST_MODEL, "trainer.max_steps=100000", "seed=0,1"]
    quiet = dict(stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    parent = subprocess.Popen([*args, f"hydra.sweep.dir={sweep}"], cwd=ROOT, env=ENV, **quiet)
    started = set()
    try:
        locks = [sweep / job / ".lock" for job in ("0", "1")]  # a job holds it while it trains
        wait_for_file_event(
            lambda: all(lock.exists() and lock.read_text() for lock in locks),
            [lock.parent for lock in locks],
            300,
            "both jobs to hold their run dir's lock",
            process=parent,
        )
        workers = {int(lock.read_text()) for lock in locks}
        started = _descendants(parent.pid)  # the workers and joblib's resource tracker
        assert workers <= started and parent.pid not in workers
        parent.kill()
        parent.wait()
        # each process's exit, through its pidfd (a zombie counts as ended: only its parent's wait is left)
        wait_for_exit(workers, 60, f"workers {workers} to end")
        wait_for_exit(started, 60, "every child to end")
        assert not any(_alive(pid) for pid in started)
    finally:
        parent.kill()
        for pid in started | _descendants(parent.pid):
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


# --- a full disk --------------------------------------------------------------------------------------


def fill(directory: Path) -> Path:
    """Write a file in `directory` until its file system is full; returns the file."""
    filler = directory / "filler"
    with open(filler, "wb") as sink:
        try:
            while True:
                sink.write(b"\1" * 65536)
                sink.flush()
        except OSError as error:
            assert error.errno == errno.ENOSPC
    return filler


def test_a_full_disk_ends_the_run_in_one_line_that_resumes_it_once_space_is_freed(
    tmp_path, tmpfs, monkeypatch
):
    disk = tmpfs("64m")
    if disk is None:  # mounting not allowed here: the same error, injected in-process
        return disk_full_at_a_checkpoint_save(tmp_path, monkeypatch)
    run_dir = disk / "run"
    run = cli(run_dir)
    wait_for_step(run, run_dir, 12)
    filler = fill(disk)
    stopped = finish(run)
    assert stopped.returncode == 1
    line = one_line_naming(stopped.stderr, run_dir)
    assert (run_dir / "summary.json").stat().st_size > 0 if (run_dir / "summary.json").exists() else True
    assert not leftovers(run_dir)
    filler.unlink()

    words = resume_command(line)
    resumed = subprocess.run([PREFOPT, *words[1:]], cwd=ROOT, env=ENV, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "completed"
    assert train_steps(run_dir) == list(range(1, 41))
    assert not leftovers(run_dir)


def test_a_disk_full_checkpoint_save_leaves_a_resumable_run_dir(tmp_path, monkeypatch):
    disk_full_at_a_checkpoint_save(tmp_path, monkeypatch)


def disk_full_at_a_checkpoint_save(tmp_path: Path, monkeypatch) -> None:
    """ENOSPC injected into the second checkpoint's tensor write (step 4): the failure names no space,
    summary.json says failed, no staging dir is left, and a resume completes every step once."""
    from prefopt.files import is_disk_full
    from prefopt.training import checkpoint

    real = checkpoint._dcp

    def full_at_step_4(save, tensors, path):
        if save and ".step-000004." in str(path):
            (path / "partial.safetensors").write_bytes(b"\0" * 100)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        real(save, tensors, path)

    overrides = ["trainer.max_steps=6", "trainer.checkpoint.every_steps=2", "trainer.log_every_steps=1"]
    monkeypatch.setattr(checkpoint, "_dcp", full_at_step_4)
    with pytest.raises(OSError) as raised:
        run_training(tmp_path, *overrides)
    assert is_disk_full(raised.value)
    assert json.loads((tmp_path / "summary.json").read_text())["status"] == "failed"
    assert not leftovers(tmp_path)
    monkeypatch.setattr(checkpoint, "_dcp", real)
    summary = run_training(tmp_path, *overrides, "trainer.checkpoint.resume=auto")
    assert summary["status"] == "completed" and summary["resumed_at"] == [2]
    assert train_steps(tmp_path) == list(range(1, 7))


# --- damaged files on resume --------------------------------------------------------------------------


@pytest.mark.parametrize("content", [b"", b'{"status": "compl'], ids=["empty", "truncated"])
def test_a_damaged_summary_is_named_and_the_run_resumed(tmp_path, caplog, content):
    overrides = ["trainer.max_steps=4", "trainer.checkpoint.every_steps=2"]
    first = run_training(tmp_path, *overrides)
    (tmp_path / "summary.json").write_bytes(content)
    caplog.clear()
    again = run_training(tmp_path, *overrides, "trainer.checkpoint.resume=auto")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and str(tmp_path / "summary.json") in warnings[0]
    assert again["status"] == "completed" and again["resumed_at"] == [4]
    assert again["final_eval"] == first["final_eval"]


@pytest.mark.parametrize("damage", ["state_json", "zeroed_tensors", "missing_tensors"])
def test_a_damaged_newest_checkpoint_is_named_and_the_older_one_used(tmp_path, caplog, damage):
    overrides = ["trainer.max_steps=6", "trainer.checkpoint.every_steps=3", "trainer.log_every_steps=1"]
    first = run_training(tmp_path, *overrides)
    newest = checkpoint_dir(tmp_path, 6)
    weights = next((newest / "state").glob("*.safetensors"))
    if damage == "state_json":
        (newest / "trainer_state.json").write_text('{"format_version": 1, "fi')
    elif damage == "zeroed_tensors":  # as a crash can leave a file: its size, no content
        weights.write_bytes(b"\0" * weights.stat().st_size)
    else:
        weights.unlink()
    (tmp_path / "summary.json").unlink()
    caplog.clear()
    assert find_checkpoint("auto", tmp_path) == checkpoint_dir(tmp_path, 3)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and str(newest) in warnings[0]
    resumed = run_training(tmp_path, *overrides, "trainer.checkpoint.resume=auto")
    assert resumed["resumed_at"] == [3] and resumed["final_eval"] == first["final_eval"]
    assert train_steps(tmp_path) == list(range(1, 7))


def test_a_stale_staging_dir_is_ignored_and_removed_by_the_next_save(tmp_path):
    overrides = ["trainer.max_steps=4", "trainer.checkpoint.every_steps=2"]
    run_training(tmp_path, *overrides)
    stale = tmp_path / "checkpoints" / ".step-000004.tmp-999999"  # a dead process's
    (stale / "state").mkdir(parents=True)
    (stale / "trainer_state.json").write_text("{}")
    (tmp_path / "summary.json").unlink()
    assert find_checkpoint("auto", tmp_path) == checkpoint_dir(tmp_path, 4)
    run_training(
        tmp_path, "trainer.max_steps=6", "trainer.checkpoint.every_steps=2", "trainer.checkpoint.resume=auto"
    )
    assert not stale.exists() and not leftovers(tmp_path)


def test_state_files_are_whole_json_and_no_temporary_file_is_left(tmp_path):
    run_training(tmp_path, "trainer.max_steps=4", "trainer.checkpoint.every_steps=2")
    for name in (
        "summary.json",
        "eval.json",
        *(f"checkpoints/step-00000{s}/trainer_state.json" for s in (2, 4)),
    ):
        assert isinstance(json.loads((tmp_path / name).read_text()), dict)
    assert (tmp_path / "config.yaml").read_text().startswith(("model:", "seed:", "dataset:", "objective:"))
    assert not leftovers(tmp_path)


# --- a first attempt that failed before its first step ------------------------------------------------


def test_an_attempt_that_failed_before_step_1_is_replaced_by_the_same_command(tmp_path, monkeypatch, caplog):
    import prefopt.engine.prepare as prepare_module
    from prefopt.training.resume import RunDirInUse

    real = prepare_module.prepare

    def broken(*args, **kwargs):
        raise RuntimeError("dataset server down")

    monkeypatch.setattr(prepare_module, "prepare", broken)
    steps = ["trainer.max_steps=4", "trainer.log_every_steps=1"]
    with pytest.raises(RuntimeError, match="dataset server down"):
        run_training(tmp_path, *steps)
    assert (tmp_path / "metrics.jsonl").read_text() == ""
    monkeypatch.setattr(prepare_module, "prepare", real)
    caplog.set_level(logging.INFO, logger="prefopt.training.resume")
    summary = run_training(tmp_path, *steps)
    assert summary["status"] == "completed" and train_steps(tmp_path) == [1, 2, 3, 4]
    assert "replacing an earlier attempt" in caplog.text
    with pytest.raises(RunDirInUse):  # a run that trained is never replaced
        run_training(tmp_path, *steps)


def test_a_run_dir_with_a_trained_step_is_still_refused(tmp_path):
    from prefopt.training.resume import RunDirInUse, plan_resume

    (tmp_path / "metrics.jsonl").write_text('{"step": 0, "eval/loss": 0.7}\n{"step": 1, "train/loss": 0.6}\n')
    rc = load_run_config(compose_config(*FAST, *FAST_MODEL))
    with pytest.raises(RunDirInUse):
        plan_resume(rc, tmp_path)
    (tmp_path / "metrics.jsonl").write_text('{"step": 0, "eval/loss": 0.7}\n')  # the reference eval only
    assert plan_resume(rc, tmp_path).restart


# --- an output dir that cannot be written -------------------------------------------------------------


def test_a_read_only_or_impossible_output_dir_is_one_line_and_exit_2(tmp_path, tmpfs):
    a_file = tmp_path / "a_file"
    a_file.write_text("not a dir")
    # each case's cause as the OS words it (strerror), compared without case
    cases = {a_file / "run": os.strerror(errno.ENOTDIR)}
    disk = tmpfs("1m")
    if disk is not None:
        subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
        cases[disk / "run"] = os.strerror(errno.EROFS)
    for run_dir, cause in cases.items():
        done = subprocess.run(
            [PREFOPT, "train", "logger=none", f"hydra.run.dir={run_dir}"],
            cwd=ROOT,
            env=ENV,
            capture_output=True,
            text=True,
        )
        assert done.returncode == 2
        assert cause.lower() in one_line_naming(done.stderr, run_dir).lower()


# --- prefopt report -----------------------------------------------------------------------------------


def test_report_counts_a_damaged_or_incomplete_job_as_failed_naming_the_file(tmp_path, caplog):
    from prefopt.research import report
    from prefopt.research.sweep import load_sweep

    summaries = {
        "0": json.dumps({"status": "completed", "final_eval": {"eval/loss": 0.5}, "seed": 0}),
        "1": '{"status": "completed", "final_ev',  # torn
        "2": json.dumps({"status": "completed"}),  # no final eval
        "3": "",
    }
    for name, text in summaries.items():
        (tmp_path / name / ".hydra").mkdir(parents=True)
        (tmp_path / name / ".hydra" / "overrides.yaml").write_text(f"- seed={name}\n")
        (tmp_path / name / "summary.json").write_text(text)
    caplog.clear()
    jobs = load_sweep(tmp_path)
    assert [job.status for job in jobs] == ["completed", "failed", "failed", "failed"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 3
    assert all(str(tmp_path / name / "summary.json") in w for name, w in zip("123", warnings))
    text = report.write_report(tmp_path).read_text()
    assert "(1 completed, 3 failed, 0 missing)" in text


def test_a_run_dir_too_small_for_one_checkpoint_ends_in_one_line_and_resumes_once_it_grows(tmpfs, tmp_path):
    """The issue's case: a 2 MB file system cannot hold the default model's first checkpoint (about
    12 MB). DCP reports the failed write as a CheckpointException, a BaseException: it must still end in
    the one 'no space left' line, and the printed command must finish the run once the disk has room."""
    disk = tmpfs("2m")
    if disk is None:  # mounting not allowed here: the conversion of DCP's exception, in-process
        return test_a_failed_dcp_write_is_a_checkpoint_error_that_says_no_space(tmp_path)
    run_dir = disk / "run"
    stopped = finish(cli(run_dir))
    assert stopped.returncode == 1
    line = one_line_naming(stopped.stderr, run_dir)
    assert not leftovers(run_dir)
    subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)
    words = resume_command(line)
    resumed = subprocess.run([PREFOPT, *words[1:]], cwd=ROOT, env=ENV, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "completed"
    assert train_steps(run_dir) == list(range(1, 41))


def test_a_failed_dcp_write_is_a_checkpoint_error_that_says_no_space(tmp_path, monkeypatch):
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException, _wrap_exception

    from prefopt.files import is_disk_full
    from prefopt.training import checkpoint

    def full(*args, **kwargs):
        try:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        except OSError as error:
            raise CheckpointException("save failed", {0: _wrap_exception(error)}) from None

    monkeypatch.setattr(dcp, "save", full)
    with pytest.raises(checkpoint.CheckpointError) as raised:
        checkpoint._dcp(True, {"w": torch.zeros(2)}, tmp_path / "state")
    assert isinstance(raised.value, Exception)  # caught by the CLI's one-line handler
    assert is_disk_full(raised.value) and str(tmp_path / "state") in str(raised.value)
