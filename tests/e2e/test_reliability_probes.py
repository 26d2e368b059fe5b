"""Hostile-user probes: each row runs the real CLI on one thing a user gets wrong and expects
its exit code and a one-line message naming the problem, never a traceback.

A row is (what the user did, how to set it up and the command line, expected exit code, a
fragment of the message). Commands that train (and install stop-signal handlers) or need another
environment run in a subprocess, as a user would run them; the others call
``kforcing_dist.cli.main`` in this process. The rows share one tiny trained run (teacher and
stage k1, two steps each) made once for the module.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest

from kforcing_dist.cli import EXIT_USER_ERROR, main
from tests.conftest import ROOT, SMOKE, run_cli

QUIET = ["--set", "logging.tensorboard=false", "--set", "logging.progress_bar=false"]
READ_ONLY = Path("/sys/kforcing-dist-probe")  # sysfs refuses new folders, even to root


@dataclasses.dataclass(frozen=True)
class Ctx:
    runs: Path  # teacher/ (export/) and k1/ (export/) of the shared run
    shards: Path
    tmp: Path  # this row's own folder

    def file(self) -> Path:
        """A plain file where a folder is expected."""
        f = self.tmp / "a-file"
        f.write_text("not a folder\n")
        return f

    def prompts(self) -> Path:
        p = self.tmp / "prompts.txt"
        p.write_text("The function returns\n")
        return p

    def run_with_truncated(self, *stages: str) -> Path:
        """A run folder holding copies of the shared exports of ``stages``, the last one's
        weights cut to half (an interrupted copy)."""
        run = self.tmp / "run"
        for stage in stages:
            shutil.copytree(self.runs / stage / "export", run / stage / "export")
        weights = run / stages[-1] / "export" / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
        return run

    def train(self, out, shards: Path | None = None, steps: int = 2) -> list[str]:
        return ["train-teacher", "-c", str(SMOKE), "-o", str(out), "--set",
                f"data.shards_dir={shards or self.shards}", "--set", f"train.max_steps={steps}", *QUIET]

    def random_shards(self) -> Path:
        """A copy of the shared shards whose training shard is replaced by random bytes of the
        same size (ids in range, so only the checksum can tell)."""
        import numpy as np

        copy = self.tmp / "shards"
        shutil.copytree(self.shards, copy)
        shard = next((copy / "train").glob("tokens-*.bin"))
        ids = np.random.default_rng(0).integers(0, 100, shard.stat().st_size // 2, dtype=np.uint16)
        shard.write_bytes(ids.tobytes())
        return copy

    def binary_data(self) -> list[str]:
        data = self.tmp / "docs.jsonl"
        data.write_bytes(bytes(range(256)) * 8)
        return ["prepare-data", "-c", str(SMOKE), "-o", str(self.tmp / "run"), "--set", "data.source=files",
                "--set", f"data.paths=[{data}]"]

    def empty_config(self) -> Path:
        path = self.tmp / "empty.yaml"
        path.write_text("# nothing yet\n")
        return path

    def teacher_copy(self) -> Path:
        """A copy of the shared teacher run folder (finished at step 2, one checkpoint)."""
        shutil.copytree(self.runs / "teacher", self.tmp / "teacher")
        return self.tmp / "teacher"

    def locked_teacher(self) -> Path:
        """A run folder locked by a live process on this host (this test process)."""
        import json
        import socket

        out = self.tmp / "run"
        out.mkdir()
        (out / ".lock").write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "job": None,
                                                "command": "train-teacher", "since": "then", "token": "x"}))
        return out

    def damaged_teacher(self, what: str) -> Path:
        """The teacher copy with its newest complete checkpoint damaged: a torch file cut in half or
        garbage in trainer_state.json."""
        run = self.teacher_copy()
        step = sorted((run / "checkpoints").glob("step-*"))[-1]
        if what == "trainer_state":
            (step / "trainer_state.json").write_text("{not json")
        else:
            victim = max((p for p in step.rglob("*.pt")), key=lambda p: p.stat().st_size)
            victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
        return run

    def distill(self, run: Path, stage: str) -> list[str]:
        return ["distill", "--stage", stage, "-c", str(SMOKE), "-o", str(run), "--set",
                f"data.shards_dir={self.shards}", "--set", "distill.stage_steps=[2,2,2]", *QUIET]

    def generate(self, *extra) -> list[str]:
        return ["generate", "--prompts", str(self.prompts()), "--set", "decode.max_new_tokens=4", *extra]


@dataclasses.dataclass(frozen=True)
class Probe:
    what: str
    argv: Callable[[Ctx], list[str]]
    code: int
    fragment: str
    subprocess: bool = False  # training commands (signal handlers) and other environments
    env: Callable[[], dict] = lambda: dict(os.environ)  # the subprocess's environment
    skip: str = ""  # a reason to skip on this machine

    def __str__(self) -> str:
        return self.what


def _launch_without_master() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT")}
    return {**env, "RANK": "0", "WORLD_SIZE": "2"}


PROBES = [
    Probe("torchrun-style launch without MASTER_ADDR",
          lambda c: c.train(c.tmp / "run"), 2, "MASTER_ADDR is not", subprocess=True, env=_launch_without_master),
    Probe("train-teacher -o an existing file",
          lambda c: c.train(c.file()), 2, "is a file, not a folder", subprocess=True),
    Probe("train-teacher -o a path under a file",
          lambda c: c.train(c.file() / "run"), 2, "which is a file", subprocess=True),
    Probe("train-teacher -o a read-only location",
          lambda c: c.train(READ_ONLY / "run"), 2, "cannot be created or written", subprocess=True,
          skip="" if Path("/sys/kernel").is_dir() else "needs Linux sysfs as a read-only location"),
    Probe("prepare-data -o an existing file",
          lambda c: ["prepare-data", "-c", str(SMOKE), "-o", str(c.file())], 2, "is a file, not a folder"),
    Probe("distill k1 from a truncated teacher export/model.safetensors",
          lambda c: c.distill(c.run_with_truncated("teacher"), "k1"), 2, "truncated", subprocess=True),
    Probe("distill k2 from a truncated k1 export/model.safetensors",
          lambda c: c.distill(c.run_with_truncated("teacher", "k1"), "k2"), 2, "truncated", subprocess=True),
    Probe("generate --mode pflm on an AR (teacher) folder",
          lambda c: c.generate("--model", str(c.runs / "teacher" / "export"), "--mode", "pflm"),
          2, "--mode pflm needs a PFLM decoder folder"),
    Probe("generate --mode ar on a PFLM folder",
          lambda c: c.generate("--model", str(c.runs / "k1" / "export"), "--mode", "ar"),
          2, "--mode ar needs an AR decoder folder"),
    Probe("generate --out a folder",
          lambda c: c.generate("--model", str(c.runs / "k1" / "export"), "--out", str(c.tmp)),
          2, "is a folder; give a file path"),
    Probe("generate --out in a missing folder",
          lambda c: c.generate("--model", str(c.runs / "k1" / "export"), "--out", str(c.tmp / "no" / "o.jsonl")),
          2, "does not exist; create it"),
    Probe("generate --model a missing folder",
          lambda c: c.generate("--model", str(c.tmp / "nothing")), 2, "does not exist"),
    Probe("generate --prompts a missing file",
          lambda c: ["generate", "--model", str(c.runs / "k1" / "export"), "--prompts", str(c.tmp / "none.txt")],
          2, "prompt file"),
    Probe("convert consolidate --out under a file",
          lambda c: ["convert", "consolidate", "--checkpoint", str(c.runs / "teacher"), "--out",
                     str(c.file() / "decoder")], 2, "is a file, not a folder"),
    Probe("bench -o an existing file",
          lambda c: ["bench", "--teacher", str(c.runs / "teacher" / "export"), "-o", str(c.file())],
          2, "is a file, not a folder"),
    Probe("train-teacher on a same-size shard of random bytes",
          lambda c: c.train(c.tmp / "run", shards=c.random_shards()), 2, "does not match its checksum",
          subprocess=True),
    Probe("prepare-data on a binary .jsonl",
          lambda c: c.binary_data(), 2, "is not UTF-8 text"),
    Probe("-c an empty YAML file",
          lambda c: ["show-config", "-c", str(c.empty_config())], 2, "is empty"),
    Probe("train-teacher on a folder another live run holds",
          lambda c: c.train(c.locked_teacher()), 2, f"pid {os.getpid()}", subprocess=True),
    Probe("resume from a complete checkpoint with a truncated engine file",
          lambda c: c.train(c.damaged_teacher("engine"), steps=4), 2, "is damaged", subprocess=True),
    Probe("resume from a complete checkpoint with garbage trainer_state.json",
          lambda c: c.train(c.damaged_teacher("trainer_state"), steps=4), 2, "trainer_state.json is not readable",
          subprocess=True),
    Probe("rerun a finished train-teacher",
          lambda c: c.train(c.teacher_copy()), 0, "already finished", subprocess=True),
    Probe("-c a missing config file",
          lambda c: ["show-config", "-c", str(c.tmp / "none.yaml")], 2, "does not exist"),
    Probe("--set an unknown key",
          lambda c: ["show-config", "-c", str(SMOKE), "--set", "train.bogus=1"], 2, "train.bogus: unknown key"),
]


@pytest.fixture(scope="module")
def runs(smoke_shards, tmp_path_factory) -> Path:
    """One tiny trained run: teacher/ and k1/ (two steps each), with their exports."""
    root = tmp_path_factory.mktemp("probe-runs")
    common = ["-c", SMOKE, "--set", f"data.shards_dir={smoke_shards}", "--set", "train.eval_interval=0",
              "--set", "distill.eval_interval=0", *QUIET]
    run_cli("train-teacher", "-o", root / "teacher", "--set", "train.max_steps=2", *common)
    run_cli("distill", "--stage", "k1", "-o", root, "--set", "distill.stage_steps=[2,2,2]", *common)
    return root


def _run(probe: Probe, argv: list[str], capsys) -> tuple[int, str]:
    if probe.subprocess:
        proc = subprocess.run([sys.executable, "-m", "kforcing_dist", *argv], cwd=ROOT, capture_output=True,
                              text=True, timeout=300, env={**probe.env(), "OMP_NUM_THREADS": "1"})
        return proc.returncode, proc.stderr
    code = main(argv)
    return code, capsys.readouterr().err


@pytest.mark.parametrize("probe", PROBES, ids=str)
def test_probe(probe: Probe, runs, smoke_shards, tmp_path, capsys):
    if probe.skip:
        pytest.skip(probe.skip)
    code, err = _run(probe, probe.argv(Ctx(runs, smoke_shards, tmp_path)), capsys)
    assert code == probe.code, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    assert probe.fragment in err, err[-3000:]
    if probe.code == EXIT_USER_ERROR:
        error = [line for line in err.splitlines() if line.startswith("kforcing-dist ") and ": error: " in line]
        assert len(error) == 1, err[-3000:]
        assert probe.fragment in err[err.index(error[0]):], err[-3000:]
