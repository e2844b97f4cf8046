#!/usr/bin/env bash
# Create .venv and install prefsel with its dev extras (EXTRAS=... for others, e.g. EXTRAS=train:
# the demo and training without the test tools). torch first (TORCH_SPEC, default the CPU build
# torch==2.13.0), then everything else pinned by constraints.txt, so no dependency can pull a
# CUDA build.
#
# Installer: uv (from PyPI, into .venv; it downloads and installs in parallel, and is told to
# compile bytecode as pip does), or pip when uv cannot be had or PREFSEL_INSTALLER=pip. uv reads no pip
# configuration: the find-links location pip is configured with (where a machine keeps its CPU
# torch wheel) is handed to it, and torch goes through pip when there is none, as before.
# Where the time goes, before and after: README, Quick start.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
EXTRAS=${EXTRAS:-dev}
TORCH=${TORCH_SPEC:-torch==2.13.0}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
installer=${PREFSEL_INSTALLER:-uv}
if [ "$installer" = uv ] && ! python -m pip install -q -c constraints.txt uv; then
    echo "setup.sh: uv could not be installed; using pip" >&2
    installer=pip
fi
links=${PIP_FIND_LINKS:-$(python -m pip config get global.find-links 2>/dev/null || true)}
if [ "$installer" = uv ] && [ -n "$links" ] && [ -d "$links" ] \
        && ls "$links"/"$(echo "${TORCH%%[=<>~!]*}")"-* >/dev/null 2>&1; then
    python -m uv pip install --quiet --python .venv/bin/python --compile-bytecode --find-links "$links" "$TORCH"
else
    python -m pip install -q "$TORCH"
fi
if [ "$installer" = uv ]; then
    # torch is already there and meets the constraint (2.13.0+cpu is a 2.13.0), so uv keeps it
    # --compile-bytecode (here and for torch above; uv compiles only what each call installs):
    # where PYTHONDONTWRITEBYTECODE is set (as on CI) imports never cache bytecode, and every
    # process (each Ray worker, each CLI run) would compile torch, transformers and ray again
    DS_BUILD_OPS=0 python -m uv pip install --quiet --python .venv/bin/python -c constraints.txt \
        --compile-bytecode -e ".[${EXTRAS}]"
else
    DS_BUILD_OPS=0 python -m pip install -q -c constraints.txt -e ".[${EXTRAS}]"
fi
python -c "import prefsel, torch, ray; print('prefsel', prefsel.__version__, '| torch', torch.__version__, '| ray', ray.__version__)"
