"""Golden losses: the first STEPS teacher-training losses of configs/smoke.yaml must not drift.

One process on the CPU, float32, fixed seeds, the smoke token shards. The reference values live in
tests/fixtures/golden_loss_smoke.json with the command that made them. A numerics change that is
intended (a new init, a fixed bug) is recorded by regenerating the file:

    PYTHONPATH=. python -m tests.e2e.test_golden_loss --update [--shards DIR]

(``--shards``: reuse token shards prepared from configs/smoke.yaml; by default they are prepared in a
temporary folder.) Review the diff of the JSON file like code.

Tolerance: 1e-4 absolute on every step's loss. Measured, the same run with OMP_NUM_THREADS=1 and 2
(different reduction orders in the CPU kernels) differed by at most 9.5e-7 over 20 steps (losses
near 6, so 2e-7 relative): the bound leaves two orders of magnitude for other BLAS builds and CPUs,
while a real change (a 1% different Adam beta2, another init) moves the losses by far more.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import pytest

from kforcing_dist.training.metrics import read_log
from tests.conftest import ROOT, SMOKE, run_cli

GOLDEN = ROOT / "tests" / "fixtures" / "golden_loss_smoke.json"
STEPS = 10
TOLERANCE = 1e-4
OVERRIDES = ("train.precision=fp32", f"train.max_steps={STEPS}", "train.log_interval=1", "train.eval_interval=0",
             "train.eval_batches=1", "logging.tensorboard=false")
# the CPU even where a GPU is present: the reference was recorded with CPU kernels
CPU_ONLY = {"CUDA_VISIBLE_DEVICES": ""}


def train_command(shards, out) -> list[str]:
    args = ["train-teacher", "-c", str(SMOKE), "-o", str(out), "--set", f"data.shards_dir={shards}"]
    for o in OVERRIDES:
        args += ["--set", o]
    return args


def train_losses(shards, out, threads: int) -> list[float]:
    run_cli(*train_command(shards, out), env_extra={"OMP_NUM_THREADS": str(threads), **CPU_ONLY})
    records = sorted(read_log(out, "train"), key=lambda r: r["step"])
    return [float(r["loss"]) for r in records]


def data_fingerprint(shards) -> dict:
    """What the losses depend on besides the code: the training tokens (sha256 of each shard)."""
    meta = json.loads((Path(shards) / "metadata.json").read_text())
    return {"tokenizer": meta["tokenizer"]["fingerprint"],
            "train_shards_sha256": [s["sha256"] for s in meta["splits"]["train"]["shards"]]}


def test_smoke_teacher_losses_match_golden(smoke_shards, tmp_path):
    golden = json.loads(GOLDEN.read_text())
    if golden["data"] != data_fingerprint(smoke_shards):
        pytest.fail("the smoke token shards differ from those the golden losses were made on (tokenizer or "
                    "corpus changed); if intended, regenerate: PYTHONPATH=. python -m tests.e2e.test_golden_loss "
                    "--update")
    got = train_losses(smoke_shards, tmp_path / "run", threads=2)  # the golden was made with 1 thread
    want = golden["losses"]
    assert len(got) == len(want) == golden["steps"]
    worst = max(range(len(want)), key=lambda i: abs(got[i] - want[i]))
    assert abs(got[worst] - want[worst]) <= golden["tolerance"], (
        f"step {worst + 1}: loss {got[worst]!r}, golden {want[worst]!r} (tolerance {golden['tolerance']}); "
        f"all: {got}. If the change is intended, regenerate with --update (see this file's docstring)")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--update", action="store_true", help=f"rewrite {GOLDEN.relative_to(ROOT)}")
    parser.add_argument("--shards", type=Path, help="token shards of configs/smoke.yaml to reuse")
    args = parser.parse_args(argv)
    if not args.update:
        parser.error("pass --update to regenerate the golden losses (the check itself runs under pytest)")
    with tempfile.TemporaryDirectory() as tmp:
        shards = args.shards
        if shards is None:
            shards = Path(tmp) / "shards"
            run_cli("prepare-data", "-c", SMOKE, "-o", Path(tmp) / "prep", "--set", f"data.shards_dir={shards}")
        losses = train_losses(shards, Path(tmp) / "run", threads=1)
        record = {
            "made_by": "PYTHONPATH=. python -m tests.e2e.test_golden_loss --update",
            "train_command": "CUDA_VISIBLE_DEVICES= OMP_NUM_THREADS=1 python -m kforcing_dist "
                             + " ".join(train_command("<smoke shards>", "<out>"))
                             .replace(str(ROOT) + "/", ""),
            "steps": STEPS, "tolerance": TOLERANCE, "data": data_fingerprint(shards), "losses": losses,
        }
    GOLDEN.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {GOLDEN}: {losses}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
