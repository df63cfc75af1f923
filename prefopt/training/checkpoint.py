"""Training-state checkpoints: everything a killed run needs to continue bit for bit.

    <run dir>/checkpoints/step-000120/
        state/                 torch.distributed.checkpoint in safetensors: the trainable weights (only the
                               adapter under LoRA, never a frozen weight, tied or not), the value head, the
                               optimizer's tensors, torch RNG states, the sampler's generator and queue
        trainer_state.json     step, scheduler, optimizer hyperparameters, Python and NumPy RNG states, the
                               loop's running records, the resolved config, the W&B run id, file sizes

The tensors go through `torch.distributed.checkpoint` with its Hugging Face (safetensors) storage, which
reads and writes the same way in one process and in a sharded FSDP2 job: nothing is pickled, nothing is
unpickled. A checkpoint is written into a temporary directory, fsynced and renamed, so a kill leaves
either the whole checkpoint or none; `trainer_state.json` records every file's size, so a truncated one is
seen before loading, and each safetensors file's header is checked (a file zeroed by a crash keeps its
size). A staging dir a dead process left behind is never read and is removed by the next save; a save
that fails (a full disk) removes its own.

Memory: the tensors are written from the live weights and optimizer state, with no copy of them. DCP's
safetensors writer builds each file in memory (twice: safetensors' buffer, then Python bytes), so the state
is spread over files of at most `FILE_BYTES` (a larger tensor gets a file of its own): a save needs about
twice the largest file on top of training, not twice the whole state (a 44 M-parameter full fine-tune,
500 MB of state: the save raised peak RSS by 880 MB and took 8.2 s; now it stays under the training's own
peak and takes 3.1 s, on 2 CPU cores).
"""

from __future__ import annotations

import logging
import os
import shutil
import warnings
from pathlib import Path

import torch
from torch import nn

from prefopt.engine.distributed import all_true, barrier, broadcast_object, world
from prefopt.training.checkpoint_dirs import (
    CheckpointError,
    checkpoint_dir,
    find_checkpoint,
    prune,
    publish,
    read_state,
    remove_staging,
    step_dirs,
)

# the run dir's side (naming, finding, checking, pruning) lives in checkpoint_dirs; resume.py reads it here
__all__ = [
    "CheckpointError",
    "checkpoint_dir",
    "find_checkpoint",
    "load_checkpoint",
    "read_state",
    "save_checkpoint",
    "step_dirs",
]
log = logging.getLogger(__name__)
FILE_BYTES = 64 * 2**20  # a safetensors file's size bound: what a save holds in memory at once (twice)


def _state_dict_options(strict: bool = True):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # frozen weights (a LoRA base model) come back from the model's own path, not from the checkpoint;
    # loading is not strict about them (`load_checkpoint` checks the trainable keys itself)
    return StateDictOptions(ignore_frozen_params=True, flatten_optimizer_state_dict=True, strict=strict)


def _split(optimizer_state: dict) -> tuple[dict, dict]:
    """Flattened optimizer state -> (tensors for safetensors, plain values for JSON)."""
    tensors = {k: v for k, v in optimizer_state.items() if torch.is_tensor(v)}
    values = {k: v for k, v in optimizer_state.items() if not torch.is_tensor(v)}
    return tensors, values


def _trainable_state(modules: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict, set[str]]:
    """(model state, flattened optimizer state, frozen keys): the weights the optimizer trains, none frozen.
    `ignore_frozen_params` drops a frozen weight under its first name only (`named_parameters()` lists a tied
    weight once), so a frozen tied embedding came back as `lm_head.weight`: every name of it is dropped."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optimizer_state = get_state_dict(modules, optimizer, options=_state_dict_options())
    frozen = {name for name, p in modules.named_parameters(remove_duplicate=False) if not p.requires_grad}
    return {k: v for k, v in model_state.items() if k not in frozen}, optimizer_state, frozen


def _files(tensors: dict[str, torch.Tensor]) -> dict[str, int]:
    """key -> safetensors file (1, 2, ...): consecutive tensors up to FILE_BYTES a file."""
    index, size, files = 1, 0, {}
    for key, value in tensors.items():
        nbytes = _local(value).numel() * value.element_size()
        if size and size + nbytes > FILE_BYTES:
            index, size = index + 1, 0
        files[key], size = index, size + nbytes
    return files


def _dcp(save: bool, tensors: dict, path: Path) -> None:
    """Collective under torchrun: each rank writes (reads) its own shards, in files of its own."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader, HuggingFaceStorageWriter
    from torch.distributed.checkpoint.api import CheckpointException

    with warnings.catch_warnings():  # "assuming the intent is to save in a single process": it is
        warnings.filterwarnings("ignore", message=".*single process.*")
        try:
            if save:
                files = broadcast_object(_files(tensors))  # DCP takes rank 0's; the same on every rank
                writer = HuggingFaceStorageWriter(str(path), files, save_distributed=world().distributed)
                dcp.save(tensors, storage_writer=writer)
            else:
                dcp.load(tensors, storage_reader=HuggingFaceStorageReader(str(path)))
        except CheckpointException as error:  # a BaseException: `except Exception` would miss a full disk
            rank, (cause, _) = next(iter(error.failures.items()))
            verb = "write" if save else "read"
            raise CheckpointError(f"{path}: could not {verb} it (rank {rank}): {cause}") from cause


def save_checkpoint(
    run_dir: Path,
    step: int,
    modules: nn.ModuleDict,
    optimizer: torch.optim.Optimizer,
    scheduler,
    sampler,
    record: dict,
    keep_last: int,
) -> Path:
    """Write step `step` atomically; keep the newest `keep_last`. `record` is JSON: the loop's running
    state, the config, the W&B id. Refuses a model with a non-finite weight."""
    from prefopt.training.seeding import rng_state

    bad = [
        n for n, p in modules.named_parameters() if p.requires_grad and not torch.isfinite(_local(p)).all()
    ]
    if not all_true(not bad, next(modules.parameters()).device):
        raise CheckpointError(f"not checkpointing step {step}: non-finite weights in {bad[:3]}")
    model_state, optimizer_state, _ = _trainable_state(modules, optimizer)
    optimizer_tensors, optimizer_values = _split(optimizer_state)
    torch_rng, python_rng = rng_state()
    tensors = {f"model.{k}": v for k, v in model_state.items()}
    tensors |= {f"optimizer.{k}": v for k, v in optimizer_tensors.items()}
    tensors |= {f"rng.{k}": v for k, v in torch_rng.items()}
    sampler_state = sampler.state_dict()
    tensors |= {"sampler.generator": sampler_state["generator"], "sampler.queue": sampler_state["queue"]}
    aliases = _aliases(tensors)  # tied weights (embeddings and lm_head) are stored once
    # contiguous() returns a contiguous tensor (weights, Adam's moments) itself: only a strided view is copied
    tensors = {k: v.detach().contiguous() for k, v in tensors.items() if k not in aliases}

    final = checkpoint_dir(run_dir, step)
    staging = final.parent / f".{final.name}.tmp-{broadcast_object(os.getpid())}"  # rank 0's, on every rank
    if world().is_main:
        remove_staging(run_dir)  # a killed or failed earlier save's (one writer per run dir: never live)
        (staging / "state").mkdir(parents=True)
    barrier()
    try:
        _dcp(True, tensors, staging / "state")
        barrier()  # every rank's shards are written
        if world().is_main:
            publish(staging, final, tensors, aliases, optimizer_values, scheduler, python_rng, record)
    except BaseException:
        if world().is_main:  # a full disk, a signal: leave no half checkpoint taking space
            shutil.rmtree(staging, ignore_errors=True)
        raise
    if world().is_main:
        prune(run_dir, keep_last)
        log.info("checkpoint: step %d -> %s", step, final)
    barrier()
    return final


def load_checkpoint(path: Path, modules: nn.ModuleDict, optimizer, scheduler, sampler, state=None) -> dict:
    """Restore weights, optimizer, scheduler, sampler and RNG states from `path`; returns its state
    (`state`: its trainer_state.json when the caller has read it already)."""
    from torch.distributed.checkpoint.state_dict import set_state_dict

    from prefopt.training.seeding import set_rng_state

    state = state or read_state(path)
    model_state, optimizer_state, frozen = _trainable_state(modules, optimizer)
    optimizer_tensors, _ = _split(optimizer_state)
    templates = {f"model.{k}": v for k, v in model_state.items()}
    templates |= {f"optimizer.{k}": v for k, v in optimizer_tensors.items()}
    expected = set(templates) - set(state["aliases"])
    saved = {k for k in state["tensor_keys"] if k.split(".")[0] != "rng"}
    saved -= {"sampler.generator", "sampler.queue"}
    saved -= {f"model.{k}" for k in frozen}  # an older checkpoint's frozen tied weight: not read
    if expected != saved:
        missing, extra = sorted(expected - saved)[:3], sorted(saved - expected)[:3]
        raise CheckpointError(
            f"{path}: holds other weights than this run's (missing {missing}, extra {extra})"
        )
    tensors = {k: torch.empty_like(v) for k, v in templates.items() if k in expected}
    try:
        _dcp(False, tensors, path / "state")
        small = {k for k in state["tensor_keys"] if k.split(".")[0] in ("rng", "sampler")}
        tensors |= _saved_tensors(path, small)
    except Exception as error:  # a damaged file that kept its size
        raise CheckpointError(f"{path}: cannot read its tensors ({type(error).__name__}: {error})") from None
    tensors |= {alias: tensors[kept] for alias, kept in state["aliases"].items()}
    model_part = {k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")}
    optimizer_part = {
        k.removeprefix("optimizer."): v for k, v in tensors.items() if k.startswith("optimizer.")
    }
    optimizer_part |= {k: _as_saved(k, v) for k, v in state["optimizer_values"].items()}
    set_state_dict(
        modules,
        optimizer,
        model_state_dict=model_part,
        optim_state_dict=optimizer_part,
        options=_state_dict_options(strict=False),
    )
    scheduler.load_state_dict(state["scheduler"])
    sampler.load_state_dict({"generator": tensors["sampler.generator"], "queue": tensors["sampler.queue"]})
    set_rng_state(
        {k.removeprefix("rng."): v for k, v in tensors.items() if k.startswith("rng.")}, state["rng"]
    )
    return state


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor  # a DTensor's own shard


def _aliases(tensors: dict[str, torch.Tensor]) -> dict[str, str]:
    """key -> the first key holding the very same tensor (same memory, shape and strides)."""
    first, aliases = {}, {}
    for key, value in tensors.items():
        local = _local(value)
        identity = (local.data_ptr(), tuple(local.shape), local.stride(), local.dtype)
        if local.numel() and identity in first:
            aliases[key] = first[identity]
        else:
            first.setdefault(identity, key)
    return aliases


def _as_saved(key: str, value):
    """JSON turned tuples (AdamW's betas) into lists; the optimizer wants them back as they were."""
    return tuple(value) if key.endswith(".betas") and isinstance(value, list) else value


def _saved_tensors(path: Path, keys: set[str]) -> dict[str, torch.Tensor]:
    """The small unsharded tensors (RNG and sampler states), read from the safetensors files directly."""
    from safetensors import safe_open

    found = {}
    for file in sorted((path / "state").glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            found |= {key: handle.get_tensor(key) for key in keys & set(handle.keys())}
    if keys - set(found):
        raise CheckpointError(f"{path}: {sorted(keys - set(found))[:3]} missing")
    return found
