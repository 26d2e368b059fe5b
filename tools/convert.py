#!/usr/bin/env python
"""Checkpoint tools, for people who look for them here: the same as ``kforcing-dist convert``.

    python tools/convert.py consolidate --checkpoint runs/demo/teacher --out teacher-decoder
    python tools/convert.py from-hf --model ./gpt2-local --out gpt2-decoder
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from kforcing_dist.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["convert", *sys.argv[1:]]))
