"""Process-level set-up shared by every command: logging, launch, groups, signals, clean exit."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
from pathlib import Path

from ..config import Config, check
from ..parallel.launch import LaunchInfo, resolve_launch
from ..training.trainer import StopFlag
from .paths import RUN_FOLDER, output_folder

log = logging.getLogger("kforcing_dist")

# Test-only fault injection: exit abruptly (no save, no clean-up) right after this step, to
# prove that a crashed run resumes exactly. Never set in normal use.
CRASH_ENV = "KFORCING_DIST_CRASH_AFTER_STEP"
CRASH_EXIT_CODE = 17


def setup_logging(rank: int) -> None:
    """INFO on rank 0, warnings only elsewhere, so a multi-process run prints one story."""
    level = logging.INFO if rank == 0 else logging.WARNING
    logging.basicConfig(level=level, stream=sys.stderr,
                        format=f"%(asctime)s [rank {rank}] %(levelname)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("kforcing_dist").setLevel(level)
    for noisy in ("DeepSpeed", "deepspeed", "megatron", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def crash_hook_from_env():
    """The trainer's ``after_step`` hook that kills the process (exit 17, nothing saved or closed)
    once the step named by ``KFORCING_DIST_CRASH_AFTER_STEP`` is done; None when it is not set."""
    crash_after = int(os.environ.get(CRASH_ENV, "0") or 0)
    if not crash_after:
        return None

    def crash(step: int) -> None:
        if step == crash_after:
            os._exit(CRASH_EXIT_CODE)

    return crash


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


def slurm_job() -> dict | None:
    """This process's Slurm job id and restart count (a requeued job counts up), for the run-folder
    lock; None outside Slurm."""
    job = os.environ.get("SLURM_JOB_ID")
    return {"id": job, "restart": int(os.environ.get("SLURM_RESTART_COUNT") or 0)} if job else None


@contextlib.contextmanager
def own_run_folder(folder: Path, command: str, groups):
    """Hold ``folder``'s lock for the block and clear what dead runs left in it.

    Rank 0 takes the lock (one holder per job, however many ranks), removes the temporary
    checkpoints and exports of dead runs, and every rank learns whether it may go on: when the
    folder is busy, all ranks raise the error (exit 2).
    """
    from ..fsio import human_bytes
    from ..parallel.groups import any_rank
    from ..training.checkpoint import CheckpointError, remove_leftovers
    from ..training.runlock import RunFolderBusy, RunFolderLock

    lock = RunFolderLock(folder, command, slurm_job())
    refusal = None
    if groups.world_rank == 0:
        try:
            lock.acquire()
            removed = remove_leftovers(folder)
            for path, size in removed:
                log.info("removed %s (%s), left by a run that died", path, human_bytes(size))
            if removed:
                log.info("freed %s in %s", human_bytes(sum(size for _, size in removed)), folder)
                lock.write_record()  # in case a full disk kept it from being written
        except RunFolderBusy as exc:
            refusal = exc
        except OSError as exc:  # e.g. no permission: every rank must hear of it, not wait on rank 0
            refusal = CheckpointError(f"cannot lock run folder {folder} ({exc}); check its permissions "
                                      f"or use another -o/--output-dir")
    try:
        if any_rank(refusal is not None, groups.device):
            raise refusal or RunFolderBusy(f"rank 0 could not take the lock on run folder {folder} (its message "
                                           f"says why: another run holds it, or the folder is not writable)")
        yield
    finally:
        lock.release()


def finished_result(folder: Path, max_steps: int, summary_name: str):
    """The result of a run in ``folder`` that already trained ``max_steps`` steps and exported
    that step, read from its summary; None when there is work left (or no summary to keep)."""
    import json

    from ..training.checkpoint import list_complete
    from ..training.trainer import TrainResult

    complete = list_complete(folder / "checkpoints")
    summary_path, export_config = folder / summary_name, folder / "export" / "config.json"
    if not complete or complete[-1][0] < max_steps or not summary_path.is_file() or not export_config.is_file():
        return None
    step, checkpoint = complete[-1]
    try:
        exported_step = json.loads(export_config.read_text()).get("source", {}).get("step")
        summary = json.loads(summary_path.read_text())
    except (OSError, ValueError):
        return None
    if exported_step != step or summary.get("step") != step or summary.get("stopped_early"):
        return None
    log.info("%s is already finished at step %d: the model is in %s, the summary in %s (nothing to do; "
             "raise the step count to train further)", folder, step, folder / "export", summary_path)
    val = {k: v for k, v in summary.items() if k.startswith("val_")}
    return TrainResult(step, False, summary.get("train_loss", float("nan")), val or None,
                       summary.get("tokens_per_s", 0.0), checkpoint)
