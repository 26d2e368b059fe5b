"""The run-folder lock under several ranks: rank 0 alone holds it, and a busy folder stops every rank."""

from __future__ import annotations

import json
import os
import types

from tests.distributed.launcher import run_distributed


def _worker(rank, world, folder):
    from pathlib import Path

    import torch
    import torch.distributed as dist

    from kforcing_dist.app.runtime import own_run_folder
    from kforcing_dist.parallel.groups import init_distributed
    from kforcing_dist.parallel.launch import resolve_launch
    from kforcing_dist.training.runlock import LOCK_FILE, RunFolderBusy

    init_distributed(resolve_launch(), "gloo")
    groups = types.SimpleNamespace(world_rank=dist.get_rank(), device=torch.device("cpu"))
    folder = Path(folder)
    out = {"pid": os.getpid()}
    with own_run_folder(folder / "free", "train-teacher", groups):
        out["holder"] = json.loads((folder / "free" / LOCK_FILE).read_text())["pid"]
        out["leftover_gone"] = not (folder / "free" / ".export.partial-0123").exists()
        dist.barrier()
    dist.barrier()
    out["released"] = not (folder / "free" / LOCK_FILE).exists()
    try:
        with own_run_folder(folder / "busy", "train-teacher", groups):
            out["busy"] = "entered"
    except RunFolderBusy as exc:
        out["busy"] = str(exc)
    dist.destroy_process_group()
    return out


def test_rank0_alone_holds_the_lock_and_a_busy_folder_stops_every_rank(tmp_path):
    (tmp_path / "free" / ".export.partial-0123").mkdir(parents=True)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / ".lock").write_text(json.dumps({"host": "gpu-node-17", "pid": 4242, "command": "distill",
                                                         "since": "then", "job": None, "token": "x"}))
    r0, r1 = run_distributed(_worker, 2, str(tmp_path), timeout=120)
    assert r0["holder"] == r1["holder"] == r0["pid"] != r1["pid"]
    assert r0["leftover_gone"] and r1["leftover_gone"] and r0["released"] and r1["released"]
    assert "host gpu-node-17, pid 4242" in r0["busy"] and "rank 0 could not take the lock" in r1["busy"]
    assert (tmp_path / "busy" / ".lock").exists()
