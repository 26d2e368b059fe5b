"""The scripts in slurm/ without a cluster: syntax, the options every batch script needs, and the
stop-signal logic of slurm/common.sh driven with stand-ins for srun and scontrol."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT

SLURM_DIR = ROOT / "slurm"
BATCH_SCRIPTS = sorted(SLURM_DIR.glob("*.sbatch"))


def test_every_script_passes_bash_n():
    scripts = [*BATCH_SCRIPTS, *SLURM_DIR.glob("*.sh")]
    assert {p.name for p in scripts} >= {"prepare_data.sbatch", "train_teacher.sbatch", "distill.sbatch",
                                         "convert.sbatch", "submit_pipeline.sh", "common.sh"}
    for script in scripts:
        proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert proc.returncode == 0, f"{script.name}: {proc.stderr}"


@pytest.mark.parametrize("script", BATCH_SCRIPTS, ids=lambda p: p.name)
def test_batch_script_requeues_and_keeps_its_log(script):
    directives = [line.split()[1] for line in script.read_text().splitlines() if line.startswith("#SBATCH")]
    assert "--requeue" in directives and "--open-mode=append" in directives
    assert any(d.startswith("--signal=B:USR1@") for d in directives), "the warning must go to the batch shell"


FAKE_SRUN = "#!/bin/bash\n# one task, in place of srun: signals sent to it reach the command itself\nexec \"$@\"\n"
FAKE_SCONTROL = "#!/bin/bash\necho \"$*\" >> \"$FAKE_OUT/scontrol.calls\"\n"
# A task that stops like kforcing-dist: USR1/TERM -> "save" -> exit 3; otherwise ends with
# FAKE_TASK_EXIT (0: finished; 3: stopped by its own time budget).
FAKE_TASK = """#!/bin/bash
echo "$*" > "$FAKE_OUT/task.args"
trap 'echo stopped > "$FAKE_OUT/task.stopped"; exit 3' USR1 TERM
touch "$FAKE_OUT/task.ready"
for _ in $(seq "${FAKE_TASK_LOOPS:-200}"); do sleep 0.05; done
exit "${FAKE_TASK_EXIT:-0}"
"""


DISTILL = ("distill.sbatch", ("configs/smoke.yaml", "--stage", "k2"), "distill -c configs/smoke.yaml --stage k2")


def _fake_job(tmp_path: Path, send=None, extra_env=None, job=DISTILL):
    """Run a batch script as Slurm would (SLURM_JOB_ID set) with the stand-ins on PATH; ``job``:
    (script, its arguments, the command line the task must get); ``send``: a signal for the batch
    shell once the task runs. Returns (exit code, scontrol calls, output)."""
    script, args, expected = job
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL), ("fake-kforcing-dist", FAKE_TASK)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_OUT": str(tmp_path),
           "SLURM_JOB_ID": "4242", "SLURM_NTASKS": "1", "KFORCING_DIST_SLURM_DIR": str(SLURM_DIR),
           "KFORCING_DIST_CMD": "fake-kforcing-dist", **(extra_env or {})}
    proc = subprocess.Popen(["bash", str(SLURM_DIR / script), *args],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if send is not None:
        deadline = time.time() + 20
        while not (tmp_path / "task.ready").exists():
            assert time.time() < deadline and proc.poll() is None, proc.communicate()[0]
            time.sleep(0.02)
        proc.send_signal(send)
    out = proc.communicate(timeout=30)[0]
    calls = (tmp_path / "scontrol.calls").read_text().splitlines() if (tmp_path / "scontrol.calls").exists() else []
    assert (tmp_path / "task.args").read_text().split() == expected.split(), out
    return proc.returncode, calls, out


def test_usr1_is_forwarded_and_the_job_requeues_itself(tmp_path):
    rc, calls, out = _fake_job(tmp_path, send=signal.SIGUSR1)
    assert (tmp_path / "task.stopped").exists(), out
    assert rc == 3 and calls == ["requeue 4242"], out


def test_finished_job_does_not_requeue(tmp_path):
    rc, calls, out = _fake_job(tmp_path, extra_env={"FAKE_TASK_LOOPS": "2"})
    assert rc == 0 and calls == [], out


def test_time_budget_stop_requeues(tmp_path):
    # train.time_budget_minutes: the command saves and exits 3 by itself, no signal involved
    rc, calls, out = _fake_job(tmp_path, extra_env={"FAKE_TASK_LOOPS": "2", "FAKE_TASK_EXIT": "3"})
    assert rc == 3 and calls == ["requeue 4242"], out


def test_requeues_stop_after_the_restart_limit(tmp_path):
    rc, calls, out = _fake_job(tmp_path, extra_env={"FAKE_TASK_LOOPS": "2", "FAKE_TASK_EXIT": "3",
                                                    "SLURM_RESTART_COUNT": "2", "KFORCING_DIST_MAX_RESTARTS": "2"})
    assert rc == 3 and calls == [] and "not requeueing again" in out, out


def test_term_is_not_requeued_by_the_script(tmp_path):
    # TERM means scancel, the time limit or Slurm's own requeue/preemption: never requeue on top of it
    rc, calls, out = _fake_job(tmp_path, send=signal.SIGTERM)
    assert (tmp_path / "task.stopped").exists(), out
    assert rc == 3 and calls == [], out


def test_requeue_can_be_turned_off(tmp_path):
    rc, calls, out = _fake_job(tmp_path, send=signal.SIGUSR1, extra_env={"KFORCING_DIST_REQUEUE": "0"})
    assert rc == 3 and calls == [] and "not requeueing" in out, out


@pytest.mark.parametrize("job", [
    ("prepare_data.sbatch", ("c.yaml", "-o", "runs/x"), "prepare-data -c c.yaml -o runs/x"),
    ("train_teacher.sbatch", ("c.yaml", "--set", "a.b=1"), "train-teacher -c c.yaml --set a.b=1"),
    DISTILL,
    ("convert.sbatch", ("c.yaml", "to-hf", "--out", "d"), "convert to-hf -c c.yaml --out d"),
    ("convert.sbatch", ("-", "consolidate", "ck"), "convert consolidate ck"),
    ("evaluate.sbatch", ("c.yaml", "-o", "runs/x"), "evaluate -c c.yaml -o runs/x"),
], ids=lambda j: f"{j[0]}:{j[1][0]}")
def test_config_first_then_the_arguments_go_to_kforcing_dist(tmp_path, job):
    rc, calls, out = _fake_job(tmp_path, extra_env={"FAKE_TASK_LOOPS": "1"}, job=job)
    assert rc == 0 and calls == [], out
