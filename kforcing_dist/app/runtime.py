"""Process-level set-up shared by every command: logging, launch, groups, signals, clean exit."""

from __future__ import annotations

import contextlib
import logging
import signal
import sys

from ..config import Config, check
from ..parallel.launch import LaunchInfo, resolve_launch
from ..training.trainer import StopFlag
from .paths import RUN_FOLDER, output_folder

log = logging.getLogger("kforcing_dist")


def setup_logging(rank: int) -> None:
    """INFO on rank 0, warnings only elsewhere, so a multi-process run prints one story."""
    level = logging.INFO if rank == 0 else logging.WARNING
    logging.basicConfig(level=level, stream=sys.stderr,
                        format=f"%(asctime)s [rank {rank}] %(levelname)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("kforcing_dist").setLevel(level)
    for noisy in ("DeepSpeed", "deepspeed", "megatron", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def install_stop_signals(flag: StopFlag) -> None:
    """SIGUSR1 (Slurm's advance warning) and SIGTERM only set a flag; ranks act on it together."""
    def handler(signum, _frame):
        flag.request(signal.Signals(signum).name)
        log.warning("received %s: will save and stop at the next step boundary", signal.Signals(signum).name)

    from .early_signals import STOP_SIGNALS, take

    for sig in STOP_SIGNALS:
        signal.signal(sig, handler)
    for name in take():  # arrived while the command was still starting up
        flag.request(name)
        log.warning("received %s during start-up: will save and stop at the first step boundary", name)


def validated_launch(cfg: Config, source: str) -> LaunchInfo:
    """Resolve the launch, validate the config for its world size and make sure the run folder
    can be written, before any process group."""
    info = resolve_launch()
    setup_logging(info.rank)
    check(cfg, info.world_size, source=source)
    output_folder(cfg.output_dir, RUN_FOLDER)
    return info


@contextlib.contextmanager
def distributed(info: LaunchInfo, cfg: Config):
    """Start torch.distributed and megatron-core groups; always end with barrier + destroy."""
    from ..parallel.groups import init_distributed, init_model_parallel, shutdown

    device = init_distributed(info, cfg.parallel.backend, cfg.parallel.timeout_minutes)
    groups = init_model_parallel(cfg.parallel.tp, cfg.parallel.pp, device)
    if groups.is_logging_rank and info.rank != 0:
        # with pp > 1 the losses and metrics exist on the last stage: let its first rank speak too
        logging.getLogger("kforcing_dist").setLevel(logging.INFO)
    try:
        yield groups
    except BaseException:
        shutdown(barrier=False)
        raise
    shutdown()
