"""Scale-out under `torchrun`: one process per device, the step's pairs split across ranks, FSDP2
(`fully_shard`) or DDP around the trainable modules, sums all-reduced so every metric is global.

Nothing here branches on the objective. With one process (no `torchrun`) every function is the identity,
so the single-device loop is the same code. Under `torchrun` the launcher sets RANK / WORLD_SIZE /
LOCAL_RANK (a multi-task SLURM step gets them from its SLURM variables, through submitit);
`trainer.distributed.strategy` picks how the weights are shared:

    fsdp   FSDP2: each decoder layer its own unit, the rest (embeddings, final norm, lm_head, the value
           head) the root unit; parameters, gradients and optimizer state sharded across ranks
    ddp    DistributedDataParallel: replicated weights, gradients all-reduced
    auto   fsdp when several processes run, nothing otherwise

Gradients: rank r's loss is (sum of its pairs' losses) * world / (pairs in the global step), so the mean
the gradient reduction takes over ranks is the global mean over the step's pairs, exactly as on one device.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor, nn

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def world() -> World:
    if not (dist.is_available() and dist.is_initialized()):
        return World()
    return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))


def export_slurm_environment() -> bool:
    """A task of a multi-task SLURM job step (`hydra/launcher=slurm` with `tasks_per_node` > 1, through
    submitit): set RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT from SLURM's variables, as
    torchrun would. Returns whether it did."""
    in_submitit = os.environ.get("SUBMITIT_EXECUTOR") == "slurm"
    if not in_submitit or "WORLD_SIZE" in os.environ or int(os.environ.get("SLURM_NTASKS", 1)) <= 1:
        return False
    from submitit.helpers import TorchDistributedEnvironment

    TorchDistributedEnvironment().export(set_cuda_visible_devices=False)  # devices are cuda:LOCAL_RANK
    return True


def init_from_environment(device_name: str) -> World:
    """Join the process group torchrun (or a multi-task SLURM step) describes: gloo on CPU, nccl on
    CUDA; a no-op in a single process."""
    export_slurm_environment()
    size = int(os.environ.get("WORLD_SIZE", 1))
    if size <= 1 or dist.is_initialized():
        return world()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    cuda = torch.cuda.is_available() and device_name != "cpu"
    if cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if cuda else "gloo")
    log.info("process group: rank %d of %d (%s)", dist.get_rank(), size, dist.get_backend())
    return world()


def device_for(device_name: str, current: World) -> torch.device:
    if device_name == "auto":
        device_name = "cuda" if torch.cuda.is_available() else "cpu"
    if device_name == "cuda" and current.distributed:
        return torch.device("cuda", current.local_rank)
    return torch.device(device_name)


def my_share(items: list, current: World | None = None) -> list:
    """This rank's items of a list every rank holds the same (round robin)."""
    current = current or world()
    return items[current.rank :: current.size]


def my_pairs(examples: Tensor, current: World | None = None) -> Tensor:
    """This rank's contiguous slice of the step's global pairs (sizes differ by at most one)."""
    current = current or world()
    return examples.tensor_split(current.size)[current.rank] if current.distributed else examples


def sum_across_ranks(tensor: Tensor) -> Tensor:
    if world().distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def sum_floats(values: dict[str, float], device) -> dict[str, float]:
    """All-reduce a dict of per-rank sums (the same keys on every rank) into global sums."""
    if not world().distributed or not values:
        return values
    keys = sorted(values)
    totals = sum_across_ranks(torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device))
    return dict(zip(keys, totals.tolist()))


def all_true(flag: bool, device) -> bool:
    if not world().distributed:
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item())


def barrier() -> None:
    if world().distributed:
        dist.barrier()


def broadcast_object(value):
    """Rank 0's `value` on every rank."""
    if not world().distributed:
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


class TrainableModules(nn.ModuleDict):
    """The modules the optimizer updates (the policy; HPO's value head), with a `forward` that runs any
    function of them, so FSDP2 / DDP see one root module and one forward per micro-batch, whatever
    submodules (decoder, chunked lm_head, value head) the function calls."""

    def forward(self, fn, *args, **kwargs):
        return fn(*args, **kwargs)


def wrap(trainable: TrainableModules, strategy: str, device, param_dtype: str | None = None) -> nn.Module:
    """`trainable` as the loop calls it: FSDP2-sharded in place (the same object), DDP-wrapped, or as is.
    `param_dtype` (FSDP2): compute weights all-gathered in that dtype from fp32 master shards, gradients
    reduced in fp32; in a single process it shards over a one-rank group to get exactly that."""
    if strategy == "fsdp" and param_dtype and not dist.is_initialized():
        _one_rank_group(device)
    current = world()
    if not dist.is_initialized() or strategy == "single" or (not current.distributed and not param_dtype):
        return trainable
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [device.index] if device.type == "cuda" else None
        return DistributedDataParallel(trainable, device_ids=ids, find_unused_parameters=False)
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(
        param_dtype=getattr(torch, param_dtype) if param_dtype else None,
        reduce_dtype=torch.float32 if param_dtype else None,
        cast_forward_inputs=False,  # the inputs are token ids and the loop's own objects, nothing to cast
    )
    for layer in _decoder_layers(trainable["policy"]):
        fully_shard(layer, mp_policy=policy)
    fully_shard(trainable, mp_policy=policy)
    trainable(lambda: None)  # FSDP2 initializes from its root's first forward; evaluation calls layers first
    trainable.reshard()  # the root's sharded parameters back in place, for the optimizer to hold
    layers = len(_decoder_layers(trainable["policy"]))
    log.info("FSDP2: %d decoder layers and the root sharded over %d ranks", layers, current.size)
    return trainable


def _one_rank_group(device) -> None:
    import socket

    with socket.socket() as free:  # a free local port for the one-rank rendezvous
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    _OWN_GROUP.append(True)


_OWN_GROUP: list[bool] = []  # a one-rank group this module started (torchrun's is the launcher's)


def release_own_group() -> None:
    """End the one-rank group `wrap` may have started, so the next run in this process starts clean."""
    if _OWN_GROUP and dist.is_initialized():
        dist.destroy_process_group()
    _OWN_GROUP.clear()


def sharded() -> bool:
    """Whether the weights may be FSDP2 shards (any process group is up)."""
    return dist.is_available() and dist.is_initialized()


def _decoder_layers(policy: nn.Module) -> list[nn.Module]:
    """The repeated blocks of the decoder (Llama's `layers`, GPT-2's `h`, GPT-NeoX's `layers`, ...)."""
    decoder = policy.get_decoder()
    for name in ("layers", "h", "blocks"):
        blocks = getattr(decoder, name, None)
        if isinstance(blocks, nn.ModuleList):
            return list(blocks)
    raise ValueError(
        f"trainer.distributed.strategy=fsdp: no decoder layers found in {type(decoder).__name__}"
    )


@contextlib.contextmanager
def gathered(model: nn.Module):
    """Root parameters all-gathered for calls that bypass the root's forward (evaluation, generation);
    layer units gather themselves. The identity when nothing is sharded."""
    unshard = getattr(model, "unshard", None)
    if unshard is None:
        yield
        return
    unshard()
    try:
        yield
    finally:
        model.reshard()


def clip_grad_norm(params: list[Tensor], max_norm: float) -> float:
    """Scale the gradients to a global L2 norm of at most `max_norm`; returns the norm before clipping.
    Under FSDP2 each rank holds shards of the gradients: their squared sums are all-reduced."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads or not hasattr(grads[0], "to_local"):
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    local = [g.to_local() for g in grads]
    squares = torch.stack([torch.linalg.vector_norm(g, dtype=torch.float32) ** 2 for g in local]).sum()
    total = sum_across_ranks(squares).sqrt()
    coefficient = torch.clamp(max_norm / (total + 1e-6), max=1.0)  # as torch.nn.utils.clip_grad_norm_
    for g in local:
        g.mul_(coefficient.to(g.dtype))
    return float(total)


def strategy_of(trainer) -> str:
    return "fsdp" if trainer.distributed.strategy == "auto" else trainer.distributed.strategy


def check_divisible(pairs_per_step: int, micro: int) -> None:
    """Every rank must run the same number of forward passes (they meet in collectives)."""
    size = world().size
    if size > 1 and (pairs_per_step % size or (pairs_per_step // size) % min(micro, pairs_per_step // size)):
        raise ValueError(
            f"trainer.batch_size: {pairs_per_step} pairs per step do not split evenly over {size} ranks "
            f"in micro-batches of {micro} (trainer.micro_batch_size); choose a multiple"
        )


def agreed_stop(requested: str | None, device) -> str | None:
    """A signal seen by any rank stops every rank after the same step."""
    if world().distributed:
        return None if all_true(requested is None, device) else (requested or "SIGTERM")
    return requested


def export_policy(run, rc, directory: Path) -> None:
    """The final policy in Hugging Face format; under FSDP2 gathered to rank 0, which writes it."""
    from prefopt.models import save_checkpoint as export_model

    value_head = run.inputs.value_head
    if not sharded():
        export_model(run.policy, run.tokenizer, directory, rc.model.lora.save_merged)
        if value_head is not None:
            _save_value_head(value_head.state_dict(), directory)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    full = get_model_state_dict(run.policy, options=options)  # collective: every rank takes part
    head = get_model_state_dict(value_head, options=options) if value_head is not None else None
    if world().is_main:
        run.policy.save_pretrained(directory, state_dict=full, safe_serialization=True)
        run.tokenizer.save_pretrained(directory)
        if head is not None:
            _save_value_head(head, directory)
    barrier()


VALUE_HEAD_FILE = "value_head.safetensors"


def _save_value_head(state: dict, directory: Path) -> None:
    """HPO's critic beside the policy, so `prefopt evaluate` computes the run's own value-head metrics."""
    from safetensors.torch import save_file

    save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(directory / VALUE_HEAD_FILE))
