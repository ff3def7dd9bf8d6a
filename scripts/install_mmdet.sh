#!/usr/bin/env bash
# Builds the optional MMDetection stack into its own virtual environment, .venv-mmdet:
#   torch 2.14.1 / torchvision 0.29.1 (the project's pins), mmengine 0.10.7,
#   mmcv 2.1.0 built from source with its C++ ops, mmdet 3.3.0, and alrun itself (editable).
#
# Why from source: mmcv publishes no wheels for this torch, and its 2.1.0 sdist does not build
# as is: setup.py imports pkg_resources (gone from setuptools >= 70, hence setuptools<70 and
# --no-build-isolation, so the build sees this venv's setuptools and torch) and compiles with
# -std=c++14/17 while torch 2.14's headers need C++20 (patched below). MMCV_WITH_OPS=1 builds
# the ops mmdet needs (nms, RoIAlign, ...); with no GPU visible it builds the CPU versions.
#
# A separate venv keeps mmdet's pins (mmcv<2.2, its numpy/opencv needs) away from the main
# .venv that the test suite and the README demo use.
#
# The built mmcv wheel is kept in $ALRUN_WHEELS (default ~/.cache/alrun/wheels): a second run
# installs it instead of compiling again (minutes instead of the build time).
#
# Usage: bash scripts/install_mmdet.sh            (MAX_JOBS=N: parallel compile jobs, default 2)
#        PY=/path/to/python3.11 bash scripts/install_mmdet.sh   (the interpreter of the new venv)
# Then:  .venv-mmdet/bin/python -m pytest -m mmdet tests/detectors/test_mmdet.py
#        .venv-mmdet/bin/alrun detector=mmdet_retinanet_r50 ...
set -euo pipefail
cd "$(dirname "$0")/.."

PY="${PY:-.venv/bin/python}"
VENV="${MMDET_VENV:-.venv-mmdet}"
WHEELS="${ALRUN_WHEELS:-$HOME/.cache/alrun/wheels}"
TORCH_PINS="torch==2.14.1 torchvision==0.29.1"
MMCV_VERSION=2.1.0
MMENGINE_VERSION=0.10.7
MMDET_VERSION=3.3.0
export MAX_JOBS="${MAX_JOBS:-2}"

start=$(date +%s)
stamp() { echo "[install_mmdet $(( $(date +%s) - start ))s] $*"; }

if [ ! -x "$PY" ]; then
  PY="$(command -v python3)"
fi
if [ ! -x "$VENV/bin/python" ]; then
  stamp "creating $VENV from $PY"
  "$PY" -m venv "$VENV"
fi
PIP="$VENV/bin/python -m pip"

stamp "torch pins, build tools, mmengine"
$PIP install -q $TORCH_PINS
$PIP install -q "setuptools<70" wheel ninja packaging
$PIP install -q "mmengine==$MMENGINE_VERSION"

mkdir -p "$WHEELS"
wheel=$(ls "$WHEELS"/mmcv-"$MMCV_VERSION"-*.whl 2>/dev/null | head -n 1 || true)
if [ -n "$wheel" ] && $VENV/bin/python - "$wheel" <<'PYEOF'
import sys, torch
# a cached wheel is only reused for the torch it was built against (recorded beside it)
meta = sys.argv[1] + ".torch"
sys.exit(0 if open(meta).read().strip() == torch.__version__ else 1)
PYEOF
then
  stamp "reusing cached $wheel"
else
  src=$(mktemp -d)
  stamp "downloading the mmcv $MMCV_VERSION sdist into $src"
  $PIP download -q --no-binary :all: --no-deps "mmcv==$MMCV_VERSION" -d "$src"
  tar -xzf "$src"/mmcv-"$MMCV_VERSION".tar.gz -C "$src"
  # torch 2.14's headers need C++20; mmcv 2.1.0 asks for C++14 (and C++17 in places)
  sed -i -e 's/-std=c++14/-std=c++20/g' -e 's/-std=c++17/-std=c++20/g' \
    "$src/mmcv-$MMCV_VERSION/setup.py"
  grep -q -- '-std=c++20' "$src/mmcv-$MMCV_VERSION/setup.py" \
    || { echo "install_mmdet: error: setup.py patch found no -std flag to replace" >&2; exit 1; }
  stamp "building mmcv $MMCV_VERSION with ops (MAX_JOBS=$MAX_JOBS; the long step)"
  MMCV_WITH_OPS=1 FORCE_CUDA=0 $PIP wheel --no-build-isolation --no-deps \
    -w "$WHEELS" "$src/mmcv-$MMCV_VERSION"
  wheel=$(ls "$WHEELS"/mmcv-"$MMCV_VERSION"-*.whl | head -n 1)
  $VENV/bin/python -c "import torch; print(torch.__version__)" > "$wheel.torch"
  rm -rf "$src"
  stamp "built $wheel"
fi
$PIP install -q "$wheel"

stamp "mmdet $MMDET_VERSION and alrun (editable, with the dev extra)"
$PIP install -q "mmdet==$MMDET_VERSION"
$PIP install -q -e '.[dev]'

stamp "checking the stack"
$VENV/bin/python - <<'PYEOF'
import mmcv, mmdet, mmengine, torch
from mmcv.ops import batched_nms, RoIAlign  # the compiled ops mmdet needs
from alrun.detectors.mmdet import require_mmdet
require_mmdet()
print(f"torch {torch.__version__} mmengine {mmengine.__version__} mmcv {mmcv.__version__} "
      f"mmdet {mmdet.__version__}: ops import")
PYEOF
stamp "done: $VENV ready"
