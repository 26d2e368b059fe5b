"""Process groups: torch.distributed start-up, megatron-core ``parallel_state`` and DeepSpeed's ``mpu``.

Library code receives a :class:`ParallelGroups` and never reads megatron's globals itself, so a
model or trainer can be built for any group layout (and tested against a one-process reference).
"""

from __future__ import annotations

import dataclasses
import datetime

import torch
import torch.distributed as dist

from .cpu_compat import apply_cpu_patches
from .launch import LaunchInfo, export_for_torch
from ..megatron_compat import allow_import_without_triton


@dataclasses.dataclass
class ParallelGroups:
    """The groups of this rank and its coordinates in the TP x PP x DP grid."""

    tp_group: dist.ProcessGroup | None
    dp_group: dist.ProcessGroup | None
    pp_group: dist.ProcessGroup | None
    tp_rank: int
    tp_size: int
    dp_rank: int
    dp_size: int
    pp_rank: int
    pp_size: int
    world_rank: int
    world_size: int
    device: torch.device

    @property
    def is_logging_rank(self) -> bool:
        """Metrics are logged from one rank: the first rank of the last pipeline stage."""
        return self.tp_rank == 0 and self.dp_rank == 0 and self.pp_rank == self.pp_size - 1


def pick_backend(requested: str) -> str:
    if requested != "auto":
        return requested
    return "nccl" if torch.cuda.is_available() else "gloo"


def init_distributed(info: LaunchInfo, backend: str = "auto", timeout_minutes: int = 30) -> torch.device:
    """Start torch.distributed (also at world size 1) and return this rank's device."""
    apply_cpu_patches()
    export_for_torch(info)
    if torch.cuda.is_available():
        torch.cuda.set_device(info.local_rank % torch.cuda.device_count())
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group(
            backend=pick_backend(backend), init_method="env://", rank=info.rank,
            world_size=info.world_size, timeout=datetime.timedelta(minutes=timeout_minutes),
        )
    return device


def init_model_parallel(tp: int, pp: int, device: torch.device) -> ParallelGroups:
    """Initialise megatron-core's parallel_state (order tp-cp-ep-dp-pp) and return our view of it."""
    allow_import_without_triton()
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    return ParallelGroups(
        tp_group=ps.get_tensor_model_parallel_group(),
        dp_group=ps.get_data_parallel_group(),
        pp_group=ps.get_pipeline_model_parallel_group(),
        tp_rank=ps.get_tensor_model_parallel_rank(),
        tp_size=ps.get_tensor_model_parallel_world_size(),
        dp_rank=ps.get_data_parallel_rank(),
        dp_size=ps.get_data_parallel_world_size(),
        pp_rank=ps.get_pipeline_model_parallel_rank(),
        pp_size=ps.get_pipeline_model_parallel_world_size(),
        world_rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        device=device,
    )


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when ``flag`` is true on any rank (a collective over the world: every
    rank must call it, so it also orders what the ranks did before it). ``device``: the rank's
    (NCCL reduces CUDA tensors only)."""
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


class DeepSpeedMPU:
    """The ``mpu`` object DeepSpeed expects, backed by explicit groups.

    DeepSpeed calls ``get_model_parallel_*`` (megatron-core's parallel_state lacks them) and
    ``get_data_parallel_*``; "model parallel" here is the TP group (pp = 1 engines).
    """

    def __init__(self, groups: ParallelGroups):
        self.g = groups

    def get_model_parallel_rank(self):
        return self.g.tp_rank

    def get_model_parallel_world_size(self):
        return self.g.tp_size

    def get_model_parallel_group(self):
        return self.g.tp_group

    def get_tensor_model_parallel_rank(self):
        return self.g.tp_rank

    def get_tensor_model_parallel_world_size(self):
        return self.g.tp_size

    def get_tensor_model_parallel_group(self):
        return self.g.tp_group

    def get_data_parallel_rank(self):
        return self.g.dp_rank

    def get_data_parallel_world_size(self):
        return self.g.dp_size

    def get_data_parallel_group(self):
        return self.g.dp_group


def shutdown(barrier: bool = True) -> None:
    """End a distributed program: barrier, then destroy (gloo crashes at exit without both).

    Pass ``barrier=False`` on an error path, where another rank may never reach the barrier.
    """
    if dist.is_available() and dist.is_initialized():
        try:
            from megatron.core import parallel_state as ps

            ps.destroy_model_parallel()
        except ImportError:
            pass
        if barrier:
            dist.barrier()
        dist.destroy_process_group()
