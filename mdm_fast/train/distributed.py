"""torch.distributed set-up for torchrun (single node or multi-node): DDP, or FSDP for big models."""
from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn

from mdm_fast.engine import side_stream


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    control: Any = None  # a gloo group for host-side flags (the world's where it is gloo); None: one process

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(graph_safe: bool = False) -> DistInfo:
    """Join the process group torchrun describes (WORLD_SIZE/RANK/LOCAL_RANK/MASTER_ADDR); one process
    without them. NCCL on CUDA, gloo on CPU. ``graph_safe``: NCCL without asynchronous error handling,
    which PyTorch requires for capturing its collectives in a CUDA graph."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank)
            if graph_safe:
                os.environ["TORCH_NCCL_ASYNC_ERROR_HANDLING"] = "0"
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    control = dist.group.WORLD if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, control)


def any_rank(flag: bool, info: DistInfo) -> bool:
    """Whether ``flag`` holds on any rank: a collective on the host (the gloo control group), which leaves
    the GPU's queue alone."""
    return sum_over_ranks([float(flag)], info)[0] > 0


def sum_over_ranks(values: Sequence[float], info: DistInfo) -> List[float]:
    """Each value summed over the ranks: a collective on the host (the gloo control group), in float64."""
    if info.world_size <= 1:
        return list(values)
    summed = torch.tensor(list(values), dtype=torch.float64)
    dist.all_reduce(summed, group=info.control)
    return summed.tolist()


def check_ranks_agree(info: DistInfo, **values: int) -> None:
    """Every rank holds the same ``values`` (its resume step, its dataset's length, ...), or every rank
    raises, naming them rank by rank: a rank resuming elsewhere hangs the job at its first collective, and
    datasets of other lengths give overlapping shards silently."""
    if info.world_size <= 1:
        return
    mine = torch.tensor(list(values.values()), dtype=torch.long)
    every = [torch.empty_like(mine) for _ in range(info.world_size)]
    dist.all_gather(every, mine, group=info.control)
    for i, name in enumerate(values):
        seen = [int(t[i]) for t in every]
        if len(set(seen)) > 1:
            raise ValueError(f"the ranks disagree on {name}: {seen} (rank 0 first); every rank must see the same "
                             "output_dir (a shared file system) and the same data")


def wrap_model(model: nn.Module, info: DistInfo, mode: str = "ddp", for_capture: bool = False) -> nn.Module:
    """DDP (every rank holds the whole model) or FSDP (FSDP2 ``fully_shard``: parameters, gradients and
    optimizer state sharded; each down/mid/up block of every level is one unit, gathered when it runs).
    ``for_capture``: DDP is built on a side stream, as capturing its backward in a CUDA graph requires."""
    if info.world_size <= 1:
        return model
    device_ids = [info.local_rank] if torch.cuda.is_available() else None
    if mode == "ddp":
        # parameters the forward never reads (``unused_parameters``: e.g. interp_conditioning's layers): DDP
        # would wait for their gradients and fail the next step
        unused = getattr(model, "unused_parameters", lambda: [])()
        if unused:
            nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, unused)
        if not for_capture:
            return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
        with side_stream():
            ddp = nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
        # DDP times its first 10 iterations, then one in 100: never inside a capture after the first
        ddp._set_ddp_runtime_logging_sample_rate(2 ** 31 - 1)
        return ddp
    if mode == "fsdp":
        from torch.distributed.fsdp import fully_shard

        from mdm_fast.models import set_channels_last

        set_channels_last(model, False)  # FSDP2 shards contiguous parameters only
        for block in fsdp_units(model):
            fully_shard(block)
        fully_shard(model)  # the root unit: stems, embeddings, adapters
        return model
    raise ValueError(f"distributed: expected 'ddp' or 'fsdp', got {mode!r}")


FSDP_BLOCK_LISTS = ("down_blocks", "mid_blocks", "up_blocks")


def fsdp_units(model: nn.Module):
    """The blocks sharded one by one: every entry of a level's down/mid/up block lists (the bulk of
    the parameters, each called as a module so FSDP can gather it just in time), at every level."""
    for name, module in model.named_modules():
        if name.split(".")[-1] in FSDP_BLOCK_LISTS and isinstance(module, nn.ModuleList):
            yield from module


def unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)


def barrier(info: DistInfo) -> None:
    if info.world_size > 1 and dist.is_initialized():
        dist.barrier()


@contextmanager
def grad_sync(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Skip the gradient all-reduce on accumulation micro-steps (DDP no_sync / FSDP2 equivalent)."""
    if enabled:
        yield
    elif hasattr(model, "no_sync"):
        with model.no_sync():
            yield
    elif hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield


def _is_sharded(model: nn.Module) -> bool:
    return any(hasattr(p, "full_tensor") for p in model.parameters())


def full_model_state(model: nn.Module) -> Dict[str, Any]:
    """The whole model's state dict (gathered on every rank's CPU under FSDP; a collective there)."""
    model = unwrap(model)
    if not _is_sharded(model):
        return model.state_dict()
    return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).cpu() for k, v in model.state_dict().items()}


def full_optimizer_state(model: nn.Module, optimizer) -> Dict[str, Any]:
    """The optimizer state keyed by parameter name, whole, so any world size and either wrapper can resume
    from it: in host memory, on rank 0 only under torch.distributed (the others get {}; under FSDP every
    rank gathered all of it in GPU memory, twice the parameters in fp32, at every save)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(unwrap(model), optimizer,
                                    options=StateDictOptions(full_state_dict=True, cpu_offload=True))
