"""Where training metrics go: TensorBoard event files, a JSONL log and the console.

Only the logging rank (first rank of the last pipeline stage) writes; every other rank's
calls are no-ops, so the trainer can call them unconditionally.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from ..fsio import write_text_atomic

log = logging.getLogger("kforcing_dist")


class MetricsWriter:
    def __init__(self, output_dir: Path, enabled: bool, tensorboard: bool):
        self.enabled = enabled
        self.path = output_dir / "train_log.jsonl"
        self.tb_dir = output_dir / "tensorboard"
        self.tb = None
        if enabled and tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=str(self.tb_dir))

    def truncate_after(self, step: int) -> None:
        """Forget the records of steps after ``step``: a run resumed at ``step`` replays them, and
        each step must appear once (in ``train_log.jsonl`` and in TensorBoard)."""
        if not self.enabled:
            return
        if self.path.exists():
            lines = self.path.read_text().splitlines()
            kept = []
            for line in lines:
                try:
                    record = json.loads(line)
                except ValueError:  # a line cut short when the previous run died
                    continue
                if record.get("step", 0) <= step:
                    kept.append(line)
            if len(kept) != len(lines):
                write_text_atomic(self.path, "".join(f"{line}\n" for line in kept))
                log.info("%s: dropped %d records after step %d (this run replays those steps)",
                         self.path, len(lines) - len(kept), step)
        if self.tb is not None:
            from torch.utils.tensorboard import SummaryWriter

            # TensorBoard hides the earlier runs' events from purge_step on
            self.tb.close()
            self.tb = SummaryWriter(log_dir=str(self.tb_dir), purge_step=step + 1)

    def write(self, step: int, scalars: dict[str, float], tag: str = "train") -> None:
        if not self.enabled:
            return
        record = {"step": step, "kind": tag, "time": round(time.time(), 3), **scalars}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(f"{tag}/{k}", float(v), step)
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
            self.tb = None


def read_log(output_dir: Path, kind: str = "train") -> list[dict]:
    """The records of one kind from a run's ``train_log.jsonl`` (tests and reports read this)."""
    path = Path(output_dir) / "train_log.jsonl"
    if not path.exists():
        return []
    return [r for r in map(json.loads, path.read_text().splitlines()) if r.get("kind") == kind]
