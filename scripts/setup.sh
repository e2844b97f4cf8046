#!/usr/bin/env bash
# Create .venv and install prefsel with its dev extras. CPU torch first, pinned by
# constraints.txt, so no dependency can pull a CUDA build (pass TORCH_SPEC to change it).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
DS_BUILD_OPS=0 python -m pip install -q -c constraints.txt -e ".[${EXTRAS:-dev}]"
python -c "import prefsel, torch, ray; print('prefsel', prefsel.__version__, '| torch', torch.__version__, '| ray', ray.__version__)"
