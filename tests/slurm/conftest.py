"""The session's local Slurm cluster (started once, stopped by PID at the end)."""

from __future__ import annotations

import pytest

from tests.slurm.cluster import ClusterUnavailable, LocalSlurm


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    cluster = LocalSlurm(tmp_path_factory.mktemp("slurm"), num_nodes=2)
    try:
        cluster.start()
    except ClusterUnavailable as exc:
        pytest.skip(f"no local Slurm cluster: {exc}")
    try:
        yield cluster
    finally:
        cluster.stop()
