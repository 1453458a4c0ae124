"""Which process of how many this is: one answer for the harvest, the readers and the trainer.

Launchers and what they set (each process of a job gets its own values):

    torchrun --nnodes=N --nproc-per-node=P   RANK (global), WORLD_SIZE (N*P), LOCAL_RANK, LOCAL_WORLD_SIZE,
                                             GROUP_RANK (the node's index)
    srun -N N --ntasks-per-node=P            SLURM_PROCID (global), SLURM_NTASKS (N*P), SLURM_LOCALID,
                                             SLURM_NODEID

A launcher's variables are read together (torchrun's first: `srun torchrun ...` sets both, and
torchrun's are the processes' own), never mixed: a rank of one launcher with the world size of the
other would split the work wrongly without a word."""

from __future__ import annotations

import os
import sys

from activation_store.errors import ConfigError

TORCHRUN = ("RANK", "WORLD_SIZE")
SLURM = ("SLURM_PROCID", "SLURM_NTASKS")


def _launcher_vars(env) -> tuple[str, str] | None:
    """The (rank, world size) variable names of the launcher that started this process, if any."""
    if any(v in env for v in TORCHRUN):
        return TORCHRUN
    if SLURM[0] in env:
        return SLURM
    return None


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
    names = _launcher_vars(env)
    if names is not None and (rank is None or world_size is None):
        rank_var, world_var = names
        missing = [v for v, given in ((rank_var, rank), (world_var, world_size)) if given is None and v not in env]
        if missing:
            raise ConfigError(f"{' and '.join(missing)} not set, but {rank_var if rank_var in env else world_var} is: "
                              f"the launcher sets both (set both, or pass --rank and --world-size)")
        try:
            rank = int(env[rank_var]) if rank is None else rank
            world_size = int(env[world_var]) if world_size is None else world_size
        except ValueError as exc:
            raise ConfigError(f"{rank_var}/{world_var} must be integers: {exc}") from exc
    rank = 0 if rank is None else rank
    world_size = 1 if world_size is None else world_size
    if world_size < 1 or not 0 <= rank < world_size:
        raise ConfigError(f"rank {rank} is not in [0, world size {world_size}); check --rank/--world-size "
                          f"or the launcher's RANK/WORLD_SIZE (SLURM_PROCID/SLURM_NTASKS)")
    return int(rank), int(world_size)


def rank_source(rank: int | None = None, world_size: int | None = None) -> str:
    """Where the harvest's rank and world size come from, for its messages."""
    if rank is not None and world_size is not None:
        return "--rank/--world-size"
    names = _launcher_vars(os.environ)
    if names is None:
        return "--rank/--world-size" if rank is not None or world_size is not None else "no launcher: one process"
    return f"{'torchrun' if names == TORCHRUN else 'srun'}'s {names[0]}/{names[1]}"


def local_rank() -> int | None:
    """This process's index among those of the launcher on its machine (torchrun's LOCAL_RANK,
    srun's SLURM_LOCALID), None when no launcher says; what picks its GPU."""
    names = _launcher_vars(os.environ)
    var = {TORCHRUN: "LOCAL_RANK", SLURM: "SLURM_LOCALID"}.get(names)
    if var is None or var not in os.environ:
        return None
    try:
        return int(os.environ[var])
    except ValueError as exc:
        raise ConfigError(f"{var} must be an integer: {exc}") from exc


def launched_by_torchrun() -> bool:
    """torchrun (or torch.distributed.launch) started this process as one of several."""
    return "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1") or 1) > 1
