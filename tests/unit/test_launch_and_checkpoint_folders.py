"""Launch resolution (single, torchrun, Slurm) and checkpoint folder semantics."""

import json
import os
import stat

import pytest

from kforcing_dist.parallel.launch import LaunchError, resolve_launch
from kforcing_dist.training import checkpoint as ckpt


def test_single_process_defaults():
    info = resolve_launch({})
    assert (info.rank, info.world_size, info.launcher) == (0, 1, "single")


def test_torchrun_variables_win_over_slurm():
    env = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "n1", "MASTER_PORT": "1234",
           "SLURM_PROCID": "0", "SLURM_NTASKS": "1"}
    info = resolve_launch(env)
    assert (info.rank, info.local_rank, info.world_size, info.master_addr, info.master_port, info.launcher) == \
        (3, 1, 4, "n1", 1234, "torchrun")


def test_torchrun_without_master_addr_is_an_error():
    with pytest.raises(LaunchError, match="MASTER_ADDR"):
        resolve_launch({"RANK": "0", "WORLD_SIZE": "2"})


def test_slurm_multi_node_resolves_head_node_not_localhost(tmp_path, monkeypatch):
    # a stand-in `scontrol` that expands the node list like the real one
    fake = tmp_path / "scontrol"
    fake.write_text("#!/bin/sh\necho gpu-017\necho gpu-018\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    env = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1",
           "SLURM_JOB_NODELIST": "gpu-[017-018]", "SLURM_JOB_ID": "4242"}
    info = resolve_launch(env)
    assert (info.rank, info.local_rank, info.world_size, info.launcher) == (5, 1, 8, "slurm")
    assert info.master_addr == "gpu-017"
    assert info.master_port == 20000 + 4242  # derived from the job id: no collisions between jobs


def test_slurm_multi_node_without_nodelist_is_an_error():
    with pytest.raises(LaunchError, match="SLURM_JOB_NODELIST"):
        resolve_launch({"SLURM_PROCID": "0", "SLURM_NTASKS": "2"})


def test_rank_outside_world_is_an_error():
    with pytest.raises(LaunchError, match="outside world size"):
        resolve_launch({"RANK": "2", "WORLD_SIZE": "2", "MASTER_ADDR": "x"})


def _save(root, step):
    tmp = ckpt.begin_save(root, step)
    (tmp / "payload").write_text(str(step))
    return ckpt.finish_save(root, step, {})


def test_checkpoint_folders_marker_latest_and_prune(tmp_path):
    for step in (10, 20, 30):
        _save(tmp_path, step)
    # an incomplete newer folder (crash between rename and marker) and a stale temporary
    (tmp_path / "step-00000040").mkdir()
    (tmp_path / ".tmp-step-00000050").mkdir()
    assert ckpt.latest_complete(tmp_path).name == "step-00000030"
    assert json.loads((tmp_path / "step-00000030" / "COMPLETE").read_text())["step"] == 30
    ckpt.prune(tmp_path, keep_last=2)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["step-00000020", "step-00000030", "step-00000040"]
    # saving the step of an incomplete folder replaces it
    _save(tmp_path, 40)
    assert (tmp_path / "step-00000040" / "payload").read_text() == "40"
    assert ckpt.latest_complete(tmp_path).name == "step-00000040"


def test_empty_or_missing_root_has_no_checkpoint(tmp_path):
    assert ckpt.latest_complete(tmp_path / "nope") is None
    assert ckpt.latest_complete(tmp_path) is None
