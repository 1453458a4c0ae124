"""Which process of how many this is: one answer for the harvest, the readers and the trainer."""

from __future__ import annotations

import os
import sys

from activation_store.errors import ConfigError


def resolve_rank(rank: int | None = None, world_size: int | None = None,
                 launcher_env: bool = False) -> tuple[int, int]:
    """(rank, world size). Explicit values win; then an initialised torch.distributed process group;
    then, with `launcher_env` (the harvest, whose ranks share no process group), torchrun's
    RANK/WORLD_SIZE or SLURM's SLURM_PROCID/SLURM_NTASKS; else a single process. Readers and the
    trainer leave the environment alone: a SLURM allocation of several tasks does not make a
    single reader read half of the data.

    torch is consulted only when something already imported it, so store-only tools stay light."""
    dist = getattr(sys.modules.get("torch"), "distributed", None)
    if dist is not None and dist.is_available() and dist.is_initialized():
        rank = dist.get_rank() if rank is None else rank
        world_size = dist.get_world_size() if world_size is None else world_size
    env = os.environ if launcher_env else {}
    try:
        if rank is None:
            rank = int(env.get("RANK", env.get("SLURM_PROCID", 0)))
        if world_size is None:
            world_size = int(env.get("WORLD_SIZE", env.get("SLURM_NTASKS", 1)))
    except ValueError as exc:
        raise ConfigError(f"RANK/WORLD_SIZE (or SLURM_PROCID/SLURM_NTASKS) must be integers: {exc}") from exc
    if world_size < 1 or not 0 <= rank < world_size:
        raise ConfigError(f"rank {rank} is not in [0, world size {world_size}); check --rank/--world-size "
                          f"or the launcher's RANK/WORLD_SIZE")
    return int(rank), int(world_size)


def launched_by_torchrun() -> bool:
    """torchrun (or torch.distributed.launch) started this process as one of several."""
    return "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1") or 1) > 1
