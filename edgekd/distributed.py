"""Multi-process training through torchrun (NCCL on GPUs, gloo on CPU): the process group and the collectives
the trainer and the methods with an optimisation step of their own (DistPro, MetaDistiller) use."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None  # nccl | gloo under torchrun; None: a plain single process

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.backend is not None


def init_distributed(use_cuda: bool) -> DistEnv:
    """Reads torchrun's environment; a plain `python`/`edgekd` call is a single process. Under torchrun even one
    process joins a process group (of one), so `torchrun --nproc_per_node=1` runs the DDP code path."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return DistEnv()
    backend = "nccl" if use_cuda else "gloo"
    env = DistEnv(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", "0")),
                  backend)
    if not dist.is_initialized():
        if use_cuda:
            torch.cuda.set_device(env.local_rank)
        dist.init_process_group(backend=backend)
    return env


def all_reduce_sum(values: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """The sum over all processes, on the device `values` came from (NCCL reduces only CUDA tensors)."""
    if not env.enabled:
        return values
    on_backend = values.to(torch.device("cuda", env.local_rank)) if env.backend == "nccl" else values
    dist.all_reduce(on_backend, op=dist.ReduceOp.SUM)
    return on_backend.to(values.device)


def average_gradients(grads: list[torch.Tensor]) -> None:
    """In place: the mean of each tensor over all processes (no-op in a single process)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        for g in grads:
            dist.all_reduce(g, op=dist.ReduceOp.SUM)
            g.div_(dist.get_world_size())


def barrier(env: DistEnv) -> None:
    if env.enabled:
        dist.barrier()


def shutdown(env: DistEnv) -> None:
    if env.enabled and dist.is_initialized():
        dist.destroy_process_group()
