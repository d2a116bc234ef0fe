"""Process-group set-up for torchrun (and SLURM's srun), CPU (gloo) or CUDA (NCCL), and the
fault-injection hooks the reliability tests use (``docs/reliability.md``)."""

from __future__ import annotations

import datetime
import os
import signal
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def world_info_from_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's or SLURM's variables; (0, 1, 0) if none."""
    for rank_key, world_key, local_key in (("RANK", "WORLD_SIZE", "LOCAL_RANK"),
                                           ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID")):
        if rank_key in os.environ and world_key in os.environ:
            return int(os.environ[rank_key]), int(os.environ[world_key]), int(os.environ.get(local_key, 0))
    return 0, 1, 0


def init_distributed(device: str = "auto", timeout_s: float = 1800) -> DistInfo:
    """Join the process group when launched with several processes; pick the device.

    :param device: "auto" (CUDA if available), "cpu" or "cuda".
    :param timeout_s: collective timeout (``train.dist_timeout_s``): a rank that stops taking
        part in collectives without dying makes the others fail after this long instead of hanging.
        (A rank that dies is noticed sooner: torchrun stops the whole job when one worker exits.)
    """
    rank, world, local = world_info_from_env()
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    dev = torch.device(f"cuda:{local}") if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        if "MASTER_ADDR" not in os.environ:
            raise RuntimeError("distributed launch without MASTER_ADDR/MASTER_PORT: use torchrun, or "
                               "export them in the SLURM script (see docs/distributed.md)")
        os.environ.setdefault("RANK", str(rank))
        os.environ.setdefault("WORLD_SIZE", str(world))
        dist.init_process_group("nccl" if use_cuda else "gloo", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=timeout_s))
    return DistInfo(rank, world, local, dev)


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_ranks_true(flag: torch.Tensor) -> bool:
    """``flag`` (a bool scalar) is true on every rank; the local value without a process group.

    Used for the non-finite-loss check: gradients are averaged across ranks, so a NaN on one rank
    reaches all of them, and every rank must skip the same step.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return bool(flag.item())
    t = flag.to(torch.int32).reshape(1)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def union_over_ranks(items: set[int]) -> set[int]:
    """The union of every rank's ``items``; ``items`` itself without a process group."""
    if not (dist.is_available() and dist.is_initialized()):
        return set(items)
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, sorted(items))
    return set().union(*gathered)


_nan_fired = False


def nan_fault(step: int, rank: int) -> bool:
    """Testing hook, inert by default: ``G2D_FAULT_NAN_RANK=R`` with ``G2D_FAULT_NAN_AT_STEP=N``
    (default 1) makes rank ``R``'s loss non-finite once, on its first batch while ``N`` optimizer
    steps are done (a skipped step leaves the count at ``N``, so "once" needs the flag)."""
    global _nan_fired
    env = os.environ
    fire = (not _nan_fired and "G2D_FAULT_NAN_RANK" in env and rank == int(env["G2D_FAULT_NAN_RANK"])
            and step == int(env.get("G2D_FAULT_NAN_AT_STEP", "1")))
    _nan_fired |= fire
    return fire


class InjectedFault(RuntimeError):
    """Raised by :func:`fault_point` when ``G2D_FAULT_DIE_RANK`` selects this rank."""


def fault_point(step: int, rank: int) -> None:
    """Testing hooks, inert unless their environment variable is set; called by the training loop
    after each optimizer step (and after that step's checkpoint, when one is due).

    - ``G2D_FAULT_KILL_AT_STEP=N``: every rank SIGKILLs itself right after step ``N``, as a power
      loss or the OOM killer would (no cleanup, no final checkpoint).
    - ``G2D_FAULT_DIE_RANK=R`` (with ``G2D_FAULT_DIE_AT_STEP=N``, default 1): rank ``R`` fails after
      step ``N``; ``G2D_FAULT_DIE_MODE=raise`` (default) raises :class:`InjectedFault`, ``kill``
      SIGKILLs the process.
    """
    env = os.environ
    if "G2D_FAULT_KILL_AT_STEP" in env and step == int(env["G2D_FAULT_KILL_AT_STEP"]):
        os.kill(os.getpid(), signal.SIGKILL)
    if "G2D_FAULT_DIE_RANK" in env and rank == int(env["G2D_FAULT_DIE_RANK"]) \
            and step == int(env.get("G2D_FAULT_DIE_AT_STEP", "1")):
        if env.get("G2D_FAULT_DIE_MODE", "raise") == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        raise InjectedFault(f"injected fault (G2D_FAULT_DIE_RANK={rank}) after step {step}")
