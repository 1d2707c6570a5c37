"""Many processes, one run: join the group torchrun describes, wrap the model for DDP or FSDP,
and the few collectives the loop needs.

Every process runs the same Trainer; each gets its own slice of every global batch (see
``Trainer._indices``). Outside torchrun (WORLD_SIZE unset or 1) every function here is a
plain single-process no-op, so the loop reads the same either way. Under FSDP the state
dicts are gathered to full tensors on the CPU, so checkpoints keep one format whatever
wrote them.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import load_state, unique_state_dict
from ..model import Block


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device_kind: str) -> Dist:
    """Join the process group torchrun describes in the environment (gloo on CPU, nccl on GPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if device_kind == "cuda" else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def init_device(wanted: str) -> tuple[Dist, torch.device]:
    """This process's place in the run and its device: ``auto`` is CUDA where there is one,
    and each process on a GPU machine takes the GPU of its local rank."""
    if wanted == "auto":
        wanted = "cuda" if torch.cuda.is_available() else "cpu"
    dist = init_distributed(torch.device(wanted).type)
    if wanted == "cuda":
        wanted = f"cuda:{dist.local_rank}"
        torch.cuda.set_device(wanted)
    return dist, torch.device(wanted)


def wrap_model(model: torch.nn.Module, strategy: str, dist: Dist, device: torch.device) -> torch.nn.Module:
    """DDP, or FSDP sharding each block and then the whole; the model itself when not distributed."""
    if not dist.enabled:
        return model
    if strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for module in model.modules():
            if isinstance(module, Block):
                fully_shard(module)
        return fully_shard(model)
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


def barrier(dist: Dist) -> None:
    if dist.enabled:
        import torch.distributed as td

        td.barrier()


def mean_across_ranks(value: torch.Tensor, dist: Dist) -> float:
    """The mean of a scalar over all processes, read back as a float."""
    if dist.enabled:
        import torch.distributed as td

        value = value.detach().clone()
        td.all_reduce(value)
        value /= dist.world
    return float(value)


def sum_across_ranks(value: torch.Tensor, dist: Dist) -> torch.Tensor:
    """``value`` summed over all processes, in place."""
    if dist.enabled:
        import torch.distributed as td

        td.all_reduce(value)
    return value


def gather_objects(obj: Any, dist: Dist) -> list:
    """Every process's ``obj``, in rank order (picklable objects, e.g. RNG states)."""
    if not dist.enabled:
        return [obj]
    import torch.distributed as td

    out: list = [None] * dist.world
    td.all_gather_object(out, obj)
    return out


def shutdown(dist: Dist) -> None:
    """Leave the process group at the end of a run."""
    if dist.enabled:
        import torch.distributed as td

        td.destroy_process_group()


def full_state_dicts(model: torch.nn.Module, wrapped: torch.nn.Module, optimizer: torch.optim.Optimizer,
                     fsdp: bool) -> tuple[dict, dict]:
    """Model and optimizer state as full (unsharded) dicts; under FSDP every rank must call this."""
    if fsdp:
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                             get_optimizer_state_dict)

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        model_state = get_model_state_dict(wrapped, options=options)
        return model_state, get_optimizer_state_dict(wrapped, optimizer, options=options)
    return unique_state_dict(model), optimizer.state_dict()


def load_full_state(model: torch.nn.Module, wrapped: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    tensors: dict, optimizer_state: dict, weights_path: Path, fsdp: bool) -> None:
    """The counterpart of ``full_state_dicts``: full tensors back into a (possibly sharded) model
    and its optimizer; tied weights saved once are shared out again."""
    if fsdp:
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                             set_optimizer_state_dict)

        options = StateDictOptions(full_state_dict=True)
        full = {k: tensors.get(k, tensors.get("embed_tokens.weight")) for k in model.state_dict()}
        set_model_state_dict(wrapped, full, options=options)
        set_optimizer_state_dict(wrapped, optimizer, optimizer_state, options=options)
    else:
        load_state(model, tensors, weights_path, strict=False)
        optimizer.load_state_dict(optimizer_state)


__all__ = ["Dist", "init_distributed", "init_device", "wrap_model", "barrier", "mean_across_ranks",
           "sum_across_ranks", "gather_objects", "shutdown", "full_state_dicts", "load_full_state"]
