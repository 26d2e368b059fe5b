"""The batch scripts in slurm/ on a real (local) Slurm cluster, with a tiny smoke config:
the pipeline chain, a 2-task pipeline-parallel distillation, and a USR1 stop that saves, requeues
and resumes it exactly."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import ROOT, SMOKE

pytestmark = pytest.mark.slurm

SLURM_DIR = ROOT / "slurm"
K1_STEPS = 80  # long enough for a signal to land mid-run, short enough to keep the test fast

# Tiny data, model and schedules on top of configs/smoke.yaml.
TINY = [f"--set={kv}" for kv in (
    "data.builtin_min_bytes=300000", "tokenizer.train_max_bytes=300000", "data.num_workers=1",
    "data.valid_fraction=0.05", "model.hidden_size=32", "train.seq_len=32", "train.micro_batch_size=4",
    "train.max_steps=4", "train.eval_interval=0", "train.eval_batches=1", "train.log_interval=1",
    "logging.tensorboard=false", "checkpoint.save_interval=1000", "distill.stages=[1,2]",
    f"distill.stage_steps=[{K1_STEPS},2]", "distill.micro_batch_size=2", "distill.max_window_slots=16",
    "eval.num_contexts=8", "eval.context_len=8", "eval.num_samples=2", "eval.sample_len=8",
    "eval.speed_batches=[1]", "eval.speed_new_tokens=4", "eval.speed_context=4", "eval.speed_repeats=1")]


def job_env(cluster) -> dict:
    """The jobs run this checkout's code with this interpreter, one thread per task."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    # CPU only: two tasks must not share one GPU, and the exact-resume comparison is in fp32.
    return cluster.client_env(PYTHONPATH=path, KFORCING_DIST_CMD=f"{sys.executable} -m kforcing_dist",
                              OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", CUDA_VISIBLE_DEVICES="")


def submit_chain(cluster, run: Path, *extra: str) -> list[tuple[str, str]]:
    proc = cluster.run(str(SLURM_DIR / "submit_pipeline.sh"), "--stages", "1 2", "--sbatch", "--cpus-per-task=1",
                       str(SMOKE), str(run), *TINY, *extra, env=job_env(cluster), cwd=ROOT)
    return [tuple(line.split()) for line in proc.stdout.splitlines()]


def job_log(run: Path, name: str, job_id: str) -> str:
    return (run / "slurm-logs" / f"kf-{name}-{job_id}.out").read_text()


@pytest.fixture(scope="module")
def chain(slurm_cluster, tmp_path_factory):
    """The whole pipeline as a chain of jobs: data -> teacher -> k1 -> k2 -> evaluate."""
    run = tmp_path_factory.mktemp("chain")
    t0 = time.time()
    jobs = submit_chain(slurm_cluster, run)
    infos = slurm_cluster.wait_jobs([j for _, j in jobs], timeout=900)
    print(f"\npipeline chain: {time.time() - t0:.1f} s")
    return run, jobs, infos


def test_pipeline_chain_runs_stages_in_order(chain):
    run, jobs, infos = chain
    assert [name for name, _ in jobs] == ["data", "teacher", "k1", "k2", "evaluate"]
    for name, j in jobs:
        assert (infos[j].state, infos[j].exit_code) == ("COMPLETED", 0), (name, infos[j].fields, job_log(run, name, j))
    # afterok: each stage started only once the one before it had ended
    for (_, before), (name, after) in zip(jobs, jobs[1:]):
        assert infos[after].start >= infos[before].end, (name, infos[before].end, infos[after].start)
    assert (run / "data" / "metadata.json").is_file()
    for stage in ("teacher", "k1", "k2"):
        assert (run / stage / "export" / "config.json").is_file(), stage
    report = json.loads((run / "report.json").read_text())
    assert set(report["stages"]) == {"k1", "k2"}


def test_failed_stage_cancels_the_rest(slurm_cluster, tmp_path):
    run = tmp_path / "run"
    # data.source=files without data.paths: the first stage exits 2 (bad config)
    jobs = submit_chain(slurm_cluster, run, "--set=data.source=files")
    infos = slurm_cluster.wait_jobs([j for _, j in jobs], timeout=300)
    (name, first), rest = jobs[0], jobs[1:]
    assert name == "data" and (infos[first].state, infos[first].exit_code) == ("FAILED", 2)
    assert "data.source=files needs data.paths" in job_log(run, "data", first)
    for name, j in rest:
        assert infos[j].state == "CANCELLED", (name, infos[j].fields)
        assert not (run / "slurm-logs" / f"kf-{name}-{j}.out").exists(), f"{name} ran"
    assert not (run / "teacher").exists()


def distill_two_tasks(cluster, chain_run: Path, out: Path, wait: bool):
    """distill.sbatch, stage k1, 2 tasks (one per node when the cluster has two) as two pipeline
    stages: the teacher and the student each split over the tasks, ZeRO-1."""
    per_node = 2 // len(cluster.nodes)
    return cluster.sbatch(
        f"--nodes={len(cluster.nodes)}", f"--ntasks-per-node={per_node}", f"--output={out}/slurm-%j.out",
        str(SLURM_DIR / "distill.sbatch"), str(SMOKE), "--stage", "k1", "-o", str(out), *TINY,
        f"--set=data.shards_dir={chain_run / 'data'}", f"--set=distill.teacher={chain_run / 'teacher'}",
        "--set=parallel.pp=2", "--set=parallel.zero_stage=1",
        env=job_env(cluster), cwd=ROOT, wait=wait, timeout=600)


@pytest.fixture(scope="module")
def two_task_run(slurm_cluster, chain, tmp_path_factory):
    out = tmp_path_factory.mktemp("distill-2-tasks")
    t0 = time.time()
    job, rc = distill_two_tasks(slurm_cluster, chain[0], out, wait=True)
    print(f"\nsbatch --wait distill.sbatch (2 tasks): {time.time() - t0:.1f} s")
    return out, job, rc


def test_distill_sbatch_wait_two_tasks(slurm_cluster, two_task_run):
    out, job, rc = two_task_run
    assert rc == 0, (out / f"slurm-{job}.out").read_text()[-4000:]
    summary = json.loads((out / "k1" / "stage_summary.json").read_text())
    assert summary["world_size"] == 2 and summary["step"] == K1_STEPS and not summary["stopped_early"]
    assert summary["layout"]["pp"] == 2 and summary["layout"]["dp"] == 1
    assert (out / "k1" / "export" / "model.safetensors").is_file()
    info = slurm_cluster.job(job)
    assert info.state == "COMPLETED" and info.restarts == 0
    # on the two-node cluster the master is the job's first node, resolved from its node list
    assert info.fields["NumNodes"].split("-")[0] == str(len(slurm_cluster.nodes)), info.fields


def test_usr1_saves_requeues_and_resumes_exactly(slurm_cluster, chain, two_task_run, tmp_path):
    reference, _, ref_rc = two_task_run
    assert ref_rc == 0
    out = tmp_path / "stopped"
    out.mkdir()
    job, _ = distill_two_tasks(slurm_cluster, chain[0], out, wait=False)
    log = out / "k1" / "train_log.jsonl"
    deadline = time.time() + 300
    while not (log.exists() and any(json.loads(r).get("step", 0) >= 2 for r in log.read_text().splitlines())):
        assert time.time() < deadline, "training never started"
        assert slurm_cluster.job(job).state in ("PENDING", "RUNNING", "CONFIGURING"), slurm_cluster.job(job).fields
        time.sleep(0.1)
    # the advance warning as `#SBATCH --signal=B:USR1@N` delivers it: to the batch script only
    slurm_cluster.run("scancel", "--signal=USR1", "--batch", job)
    info = slurm_cluster.wait_jobs([job], timeout=600)[job]
    text = (out / f"slurm-{job}.out").read_text()  # both runs (--open-mode=append)
    assert (info.state, info.exit_code, info.restarts) == ("COMPLETED", 0, 1), (info.fields, text[-4000:])
    assert "received SIGUSR1" in text and "requeueing job" in text and "resumed from" in text, text[-4000:]
    stopped_at = int(text.split("stopping at step ")[1].split()[0])
    assert 2 <= stopped_at < K1_STEPS
    print(f"\nUSR1 test: stopped at step {stopped_at} of {K1_STEPS}, requeued, resumed")
    summary = json.loads((out / "k1" / "stage_summary.json").read_text())
    assert summary["step"] == K1_STEPS and not summary["stopped_early"]
    ref = load_file(str(reference / "k1" / "export" / "model.safetensors"))
    got = load_file(str(out / "k1" / "export" / "model.safetensors"))
    assert ref.keys() == got.keys()
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=0, atol=0, msg=lambda m, n=name: f"{n}: {m}")
