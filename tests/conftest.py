"""Shared fixtures: CLI runner and the smoke token shards (prepared once per test session)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "smoke.yaml"


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def run_cli(*args, env_extra: dict | None = None, check: bool = True, timeout: float = 600,
            module: str = "kforcing_dist") -> subprocess.CompletedProcess:
    """Run ``python -m kforcing_dist ARGS`` in a fresh process (as a user would)."""
    env = {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONUNBUFFERED": "1", **(env_extra or {})}
    proc = subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"command failed ({proc.returncode}): {args}\n{proc.stdout[-4000:]}\n"
                             f"{proc.stderr[-6000:]}")
    return proc


@pytest.fixture(scope="session")
def smoke_shards(tmp_path_factory) -> Path:
    """Token shards of the smoke config (built-in corpus, small SentencePiece), made once."""
    out = tmp_path_factory.mktemp("smoke-data")
    shards = out / "shards"
    run_cli("prepare-data", "-c", SMOKE, "-o", out, "--set", f"data.shards_dir={shards}")
    return shards


@pytest.fixture(scope="module")
def groups():
    """torch.distributed (gloo, world size 1) and megatron-core groups for one-process model tests."""
    from kforcing_dist.parallel.groups import init_distributed, init_model_parallel, shutdown
    from kforcing_dist.parallel.launch import resolve_launch

    saved_env = dict(os.environ)  # init_distributed exports RANK/MASTER_PORT/...; undo afterwards
    device = init_distributed(resolve_launch({}), backend="gloo")  # a plain single process
    g = init_model_parallel(1, 1, device)
    yield g
    shutdown()
    os.environ.clear()
    os.environ.update(saved_env)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run as fast on one intra-op thread, and it avoids the large slowdowns of
    spinning OpenMP threads on a shared, oversubscribed CPU. Restored afterwards."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)
