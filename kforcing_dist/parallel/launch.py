"""Resolve rank, local rank, world size and master address for one process.

The one place that knows the launchers: Slurm (``srun``), torchrun (and the
``deepspeed`` launcher, which sets the same variables) or a plain single process.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import subprocess

from ..errors import LaunchError


@dataclasses.dataclass(frozen=True)
class LaunchInfo:
    rank: int
    local_rank: int
    world_size: int
    master_addr: str
    master_port: int
    launcher: str  # "single" | "torchrun" | "slurm"

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


def _int(env: dict, key: str) -> int:
    try:
        return int(env[key])
    except ValueError as exc:
        raise LaunchError(f"environment variable {key}={env[key]!r} is not an integer") from exc


def _slurm_master_addr(env: dict) -> str:
    nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if not nodelist:
        raise LaunchError(
            "Slurm launch without SLURM_JOB_NODELIST: cannot find the master node; "
            "run the tasks with srun inside an sbatch/salloc allocation or set MASTER_ADDR"
        )
    try:
        out = subprocess.run(
            ["scontrol", "show", "hostnames", nodelist],
            check=True, capture_output=True, text=True, timeout=30,
        ).stdout.split()
    except (OSError, subprocess.SubprocessError) as exc:
        raise LaunchError(
            f"could not expand SLURM_JOB_NODELIST={nodelist!r} with `scontrol show hostnames` "
            f"({exc}); set MASTER_ADDR explicitly in the batch script"
        ) from exc
    if not out:
        raise LaunchError(f"`scontrol show hostnames {nodelist}` returned no host")
    return out[0]


def _slurm_port(env: dict) -> int:
    # Derive the port from the job id so two jobs sharing a node do not collide.
    job = env.get("SLURM_JOB_ID", "0")
    try:
        return 20000 + int(job) % 20000
    except ValueError:
        return 29500


def resolve_launch(env: dict | None = None) -> LaunchInfo:
    """Work out this process's place in the job from its environment.

    torchrun's variables win over Slurm's (torchrun may itself run under srun with one
    task per node); a multi-node Slurm job never falls back to localhost.
    """
    env = dict(os.environ if env is None else env)
    if "RANK" in env and "WORLD_SIZE" in env:
        world = _int(env, "WORLD_SIZE")
        rank = _int(env, "RANK")
        local = _int(env, "LOCAL_RANK") if "LOCAL_RANK" in env else rank
        addr = env.get("MASTER_ADDR")
        if world > 1 and not addr:
            raise LaunchError("RANK/WORLD_SIZE are set but MASTER_ADDR is not; launch with torchrun")
        port = _int(env, "MASTER_PORT") if "MASTER_PORT" in env else 29500
        info = LaunchInfo(rank, local, world, addr or "127.0.0.1", port, "torchrun")
    elif "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        world = _int(env, "SLURM_NTASKS")
        rank = _int(env, "SLURM_PROCID")
        local = _int(env, "SLURM_LOCALID") if "SLURM_LOCALID" in env else 0
        if world == 1:
            addr = env.get("MASTER_ADDR", "127.0.0.1")
        else:
            addr = env.get("MASTER_ADDR") or _slurm_master_addr(env)
        port = _int(env, "MASTER_PORT") if "MASTER_PORT" in env else _slurm_port(env)
        info = LaunchInfo(rank, local, world, addr, port, "slurm")
    else:
        port = _int(env, "MASTER_PORT") if "MASTER_PORT" in env else _free_port()
        info = LaunchInfo(0, 0, 1, env.get("MASTER_ADDR", "127.0.0.1"), port, "single")
    if not 0 <= info.rank < info.world_size:
        raise LaunchError(f"rank {info.rank} is outside world size {info.world_size}")
    return info


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def export_for_torch(info: LaunchInfo) -> None:
    """Publish the resolved launch as the env:// variables torch and DeepSpeed read."""
    os.environ.update(
        RANK=str(info.rank), LOCAL_RANK=str(info.local_rank), WORLD_SIZE=str(info.world_size),
        LOCAL_SIZE=os.environ.get("LOCAL_SIZE", "1"),
        MASTER_ADDR=info.master_addr, MASTER_PORT=str(info.master_port),
    )
