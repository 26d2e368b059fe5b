"""The run folder: one run at a time (the lock), leftovers of dead runs, the metrics log after a
resume, and a failed save's clean-up and message."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys

import pytest

from kforcing_dist.training import checkpoint as ckpt
from kforcing_dist.training.metrics import MetricsWriter, read_log
from kforcing_dist.training.runlock import LOCK_FILE, RunFolderBusy, RunFolderLock, _process_start


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def write_lock(folder, **record):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / LOCK_FILE).write_text(json.dumps({"host": socket.gethostname(), "command": "train-teacher",
                                                "since": "then", "job": None, "token": "theirs", **record}))


def test_second_run_is_refused_naming_the_holder_and_the_fix(tmp_path):
    with RunFolderLock(tmp_path, "train-teacher"):
        with pytest.raises(RunFolderBusy) as err:
            RunFolderLock(tmp_path, "distill --stage k1").acquire()
        msg = str(err.value)
        assert "\n" not in msg and f"host {socket.gethostname()}" in msg and f"pid {os.getpid()}" in msg
        assert "another -o/--output-dir" in msg and str(tmp_path / LOCK_FILE) in msg
        assert (tmp_path / LOCK_FILE).exists()  # the refused run did not remove it
    assert not (tmp_path / LOCK_FILE).exists()
    with RunFolderLock(tmp_path, "train-teacher"):  # free again
        pass


def test_release_never_removes_another_runs_lock(tmp_path):
    lock = RunFolderLock(tmp_path, "train-teacher")
    lock.acquire()
    write_lock(tmp_path, pid=os.getpid())  # replaced behind its back (someone deleted and retook it)
    lock.release()
    assert json.loads((tmp_path / LOCK_FILE).read_text())["token"] == "theirs"


def test_stale_lock_of_a_dead_process_on_this_host_is_taken_over(tmp_path, caplog):
    write_lock(tmp_path, pid=dead_pid())
    with caplog.at_level(logging.WARNING, logger="kforcing_dist"), RunFolderLock(tmp_path, "train-teacher"):
        assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    assert "took over the lock" in caplog.text and "no longer runs" in caplog.text


def test_reused_pid_is_stale_but_a_live_one_is_not(tmp_path):
    # our own pid, recorded with another start time: the pid now belongs to a younger process
    write_lock(tmp_path, pid=os.getpid(), process_start="1")
    with RunFolderLock(tmp_path, "train-teacher"):
        pass
    write_lock(tmp_path, pid=os.getpid(), process_start=_process_start(os.getpid()))
    with pytest.raises(RunFolderBusy):
        RunFolderLock(tmp_path, "train-teacher").acquire()


def test_lock_from_another_host_is_never_guessed_about(tmp_path):
    write_lock(tmp_path, host="gpu-node-17", pid=dead_pid())
    with pytest.raises(RunFolderBusy, match="host gpu-node-17"):
        RunFolderLock(tmp_path, "train-teacher").acquire()


def test_earlier_run_of_the_same_requeued_slurm_job_is_taken_over(tmp_path):
    write_lock(tmp_path, host="gpu-node-17", pid=1234, job={"id": "77", "restart": 0})
    with pytest.raises(RunFolderBusy):  # another job
        RunFolderLock(tmp_path, "train-teacher", job={"id": "78", "restart": 1}).acquire()
    with pytest.raises(RunFolderBusy):  # the same incarnation (a second srun step of the job)
        RunFolderLock(tmp_path, "train-teacher", job={"id": "77", "restart": 0}).acquire()
    with RunFolderLock(tmp_path, "train-teacher", job={"id": "77", "restart": 1}):
        assert json.loads((tmp_path / LOCK_FILE).read_text())["job"]["restart"] == 1


def test_unreadable_lock_is_refused(tmp_path):
    (tmp_path / LOCK_FILE).write_text("{")
    with pytest.raises(RunFolderBusy, match="unreadable"):
        RunFolderLock(tmp_path, "train-teacher").acquire()


def test_lock_is_held_even_when_its_record_cannot_be_written(tmp_path, monkeypatch):
    # a full disk: the exclusive create is the lock; released all the same
    lock = RunFolderLock(tmp_path, "train-teacher")
    monkeypatch.setattr(lock, "write_record", lambda: False)
    lock.acquire()
    with pytest.raises(RunFolderBusy, match="unreadable"):
        RunFolderLock(tmp_path, "train-teacher").acquire()
    lock.release()
    assert not (tmp_path / LOCK_FILE).exists()


def test_leftovers_of_dead_runs_are_removed_with_their_sizes(tmp_path):
    (tmp_path / "checkpoints" / ".tmp-step-00000006" / "engine").mkdir(parents=True)
    (tmp_path / "checkpoints" / ".tmp-step-00000006" / "engine" / "a.pt").write_bytes(b"x" * 1000)
    (tmp_path / "checkpoints" / "step-00000003").mkdir()
    (tmp_path / ".export.partial-0123abcd").mkdir()
    (tmp_path / ".export.partial-0123abcd" / "model.safetensors").write_bytes(b"y" * 500)
    (tmp_path / "export").mkdir()
    removed = ckpt.remove_leftovers(tmp_path)
    assert sorted((p.name, n) for p, n in removed) == [(".export.partial-0123abcd", 500), (".tmp-step-00000006", 1000)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoints", "export"]
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-00000003"]


def test_metrics_log_is_cut_back_to_the_resumed_step(tmp_path):
    writer = MetricsWriter(tmp_path, enabled=True, tensorboard=False)
    for step in range(1, 7):
        writer.write(step, {"loss": float(step)})
    writer.write(3, {"val_loss": 1.0}, tag="valid")
    with open(tmp_path / "train_log.jsonl", "a") as f:
        f.write('{"step": 7, "kind": "tr')  # the line a killed run was writing
    writer.truncate_after(3)
    assert [r["step"] for r in read_log(tmp_path, "train")] == [1, 2, 3]
    assert [r["step"] for r in read_log(tmp_path, "valid")] == [3]
    writer.write(4, {"loss": 4.5})  # the replayed step, once
    assert [r["step"] for r in read_log(tmp_path, "train")] == [1, 2, 3, 4]
