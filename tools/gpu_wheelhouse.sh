#!/usr/bin/env bash
# Wheels for an offline GPU machine with Python 3.12 and a CUDA torch already installed: what it
# lacks (megatron-core, DeepSpeed, datasets and their small dependencies) plus this project.
# Run on any online Linux machine with this project's environment (DeepSpeed's wheel is built here,
# with its ops left to JIT, which needs torch importable); then copy the folder over and run
#     python bench/gpu_check.py -o gpu_check --wheels wheelhouse
# (docs/gpu.md). Usage: tools/gpu_wheelhouse.sh [OUT_DIR]   (default: wheelhouse/, git-ignored)
# Environment: PYTHON (default .venv/bin/python, else python3); MEGATRON_CORE, DEEPSPEED, DATASETS
# pin the versions (megatron-core 0.19.2 is the newest with a cp312 wheel; the others follow
# requirements.txt).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
OUT="${1:-$ROOT/wheelhouse}"
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$ROOT/.venv/bin/python" ]]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi
pin() { sed -n "s/^$1==//p" "$ROOT/requirements.txt"; }
MEGATRON_CORE="${MEGATRON_CORE:-0.19.2}"
DEEPSPEED="${DEEPSPEED:-$(pin deepspeed)}"
DATASETS="${DATASETS:-$(pin datasets)}"
PSUTIL="$(pin psutil)"
# The target: CPython 3.12 on manylinux x86_64. pip matches manylinux tags exactly, so list several.
TARGET=(--only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64
        --platform any)
# Dependencies the GPU machine does not have (its torch, numpy, pyarrow, transformers (with
# huggingface-hub, pyyaml, tqdm, filelock, packaging, requests), matplotlib (with python-dateutil)
# are used as they are):
#   DeepSpeed: hjson ninja msgpack py-cpuinfo einops psutil pydantic (+ pydantic-core,
#              annotated-types, typing-inspection)
#   datasets:  dill multiprocess xxhash fsspec pandas (+ tzdata)
# gpu_check installs only the wheels whose distribution is missing there, so extra ones are harmless.
DEPS=(hjson ninja msgpack py-cpuinfo einops "psutil==$PSUTIL" pydantic pydantic-core annotated-types
      typing-inspection "dill<0.4.2" "multiprocess<0.70.20" xxhash "fsspec<=2026.9.0" pandas tzdata)

mkdir -p "$OUT"
rm -f "$OUT"/*.whl
pipq() { "$PYTHON" -m pip "$@" 2> >(grep -v "^WARNING: Location" >&2); }
echo "== binary wheels for cp312 manylinux x86_64"
pipq download -q --no-deps "${TARGET[@]}" -d "$OUT" "megatron-core==$MEGATRON_CORE" "datasets==$DATASETS" "${DEPS[@]}"
# pydantic pins pydantic-core exactly: fetch the one it names, for the same target
CORE=$(unzip -p "$OUT"/pydantic-[0-9]*.whl '*/METADATA' | sed -n 's/^Requires-Dist: pydantic-core==\([^ ;]*\).*/\1/p')
rm -f "$OUT"/pydantic_core-*.whl
pipq download -q --no-deps "${TARGET[@]}" -d "$OUT" "pydantic-core==$CORE"

echo "== DeepSpeed $DEEPSPEED: sdist -> pure wheel (DS_BUILD_OPS=0: ops JIT-compile on first use)"
BUILD="$(mktemp -d)"
trap 'rm -rf "$BUILD"' EXIT
pipq download -q --no-deps --no-binary=:all: -d "$BUILD" "deepspeed==$DEEPSPEED"
DS_BUILD_OPS=0 pipq wheel -q --no-deps --no-build-isolation -w "$OUT" "$BUILD"/deepspeed-*.tar.gz

echo "== this project"
cp -r "$ROOT/pyproject.toml" "$ROOT/README.md" "$ROOT/kforcing_dist" "$BUILD/"  # no build/ litter here
find "$BUILD/kforcing_dist" -name __pycache__ -prune -exec rm -rf {} +
pipq wheel -q --no-deps --no-build-isolation -w "$OUT" "$BUILD"

echo "== $OUT"
ls -l "$OUT"/*.whl | awk '{printf "%10d  %s\n", $5, $NF}'
# Requirements of these wheels that are neither here nor in the list the GPU machine is known to have
"$PYTHON" - "$OUT" <<'PY'
import re, sys, zipfile
from pathlib import Path
norm = lambda s: re.sub(r"[-_.]+", "-", s).lower()
wheels = sorted(Path(sys.argv[1]).glob("*.whl"))
have = {norm(w.name.split("-")[0]) for w in wheels}
preinstalled = {"torch", "numpy", "pyarrow", "safetensors", "sentencepiece", "tokenizers", "tensorboard",
                "transformers", "matplotlib", "pytest", "huggingface-hub", "pyyaml", "tqdm", "filelock",
                "packaging", "requests", "typing-extensions", "python-dateutil", "triton"}
missing = set()
for w in wheels:
    meta = zipfile.ZipFile(w).read(next(n for n in zipfile.ZipFile(w).namelist()
                                        if n.endswith(".dist-info/METADATA"))).decode()
    for line in meta.splitlines():
        if line.startswith("Requires-Dist:") and "extra ==" not in line:
            name = norm(re.match(r"Requires-Dist:\s*([A-Za-z0-9_.-]+)", line).group(1))
            if name not in have and name not in preinstalled:
                missing.add(f"{name} (for {w.name.split('-')[0]})")
print("requirements assumed present on the GPU machine but not in its known list:",
      ", ".join(sorted(missing)) or "none")
PY
du -sh "$OUT" | awk '{print "total size: " $1}'
