#!/usr/bin/env bash
# The GPU issue's measurements in three device calls, each inside the 10-minute limit: the
# steps' own limits add up to at most 470 s a part, beside about 90 s for the wheels.
#
#   bash bench/gpu_suite.sh score      # score_gpu.py: 1B (+ bf16 exactness, profiler) and 8B
#   bash bench/gpu_suite.sh train      # train_gpu.py: prefsel DPO (Ray Train, ZeRO-2) vs TRL, 1B
#   bash bench/gpu_suite.sh serving    # score_pipeline.py and serve_load.py on the 1B shape
#   bash bench/gpu_suite.sh all --tiny # every part on CPU with tiny shapes: the rehearsal
#
# On the GPU machine it first installs the carried wheels (.gpu/wheels.tar.xz, made here by
# ../shared/tools/gpu-wheels.sh; carry `.gpu`). Each step runs under its own time limit and the
# next step runs whatever happened; a step's log, JSON and table land in $STAGE/PART/ (outside
# $OUT: the device returns at most 8 files), and that folder comes back as $OUT/PART.tar.gz,
# with the tables also in $OUT/PART.md: bench/RESULTS.md is written from those.
set -u
part=${1:?usage: gpu_suite.sh score|train|serving|all [--tiny]}
tiny=0
[ "${2:-}" = "--tiny" ] && tiny=1
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
OUT=${OUT:-$root/runs/gpu_suite}
STAGE=${STAGE:-$(mktemp -d /tmp/gpu_suite.XXXXXX)}  # the steps' files; only the archive goes to $OUT
py=${PYTHON:-python3}  # the GPU machine's python3 holds its torch; here, the venv's
[ -z "${PYTHON:-}" ] && [ -x "$root/.venv/bin/python" ] && [ $tiny = 1 ] && py="$root/.venv/bin/python"
export PYTHONUNBUFFERED=1 RAY_AUTH_MODE=${RAY_AUTH_MODE:-disabled} TOKENIZERS_PARALLELISM=false

if [ $tiny = 0 ] && [ -f .gpu/wheels.tar.xz ] && [ ! -d /tmp/site/ray ]; then  # the GPU machine lacks them
  t0=$(date +%s)
  $py -c "import tarfile; tarfile.open('.gpu/wheels.tar.xz').extractall('/tmp/whl')" &&
    $py -m pip install -q --no-index --no-deps --no-compile --target /tmp/site /tmp/whl/*.whl ||
    { echo "wheel install failed"; exit 1; }
  echo "wheels installed in $(( $(date +%s) - t0 )) s"
fi
[ $tiny = 0 ] && [ -d /tmp/site ] && export PYTHONPATH=$root:/tmp/site${PYTHONPATH:+:$PYTHONPATH} PATH=/tmp/site/bin:$PATH
export PYTHONPATH=$root${PYTHONPATH:+:$PYTHONPATH}

step() {  # step NAME SECONDS CMD...: one benchmark, its own limit, its output in $dir/NAME.log
  local name=$1 limit=$2
  shift 2
  echo "== $name (limit ${limit}s): $*"
  echo "$name" >>"$dir/steps.txt"
  local t0=$(date +%s)
  timeout --kill-after=20 "$limit" "$@" >"$dir/$name.log" 2>&1
  local rc=$?
  echo "== $name: rc $rc, $(( $(date +%s) - t0 )) s"
  tail -n 25 "$dir/$name.log"
  archive  # after every step: a call cut off by the device's limit still returns the steps before
}

archive() {  # $OUT/PART.md (each step's table: its JSON's, else the end of its log) and $OUT/PART.tar.gz
  $py - "$dir" >"$OUT/$part_name.md.tmp" <<'PY'
import json, pathlib, sys
d = pathlib.Path(sys.argv[1])
print((d / "env.txt").read_text())
for name in (d / "steps.txt").read_text().split():
    log, js = d / f"{name}.log", d / f"{name}.json"
    table = json.loads(js.read_text()).get("table") if js.exists() else None
    print(f"## {log.stem}\n\n{table or ''.join(log.read_text().splitlines(True)[-40:])}\n")
PY
  mv "$OUT/$part_name.md.tmp" "$OUT/$part_name.md"
  tar -czf "$OUT/$part_name.tar.gz.tmp" -C "$STAGE" "$part_name" && mv "$OUT/$part_name.tar.gz.tmp" "$OUT/$part_name.tar.gz"
}

run_part() {
  part_name=$1 dir=$STAGE/$1
  mkdir -p "$dir" "$OUT"
  : >"$dir/steps.txt"
  { echo "# $1 on $($py -c 'import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU")'), $(date -u +%F)"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null
    $py -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)'
  } >"$dir/env.txt" 2>&1
  case $1 in
  score)
    if [ $tiny = 1 ]; then
      step score_tiny 300 $py bench/score_gpu.py --tiny --exactness --profile "$dir/profile_tiny.txt" --json "$dir/score_tiny.json"
    else
      step score_1b 250 $py bench/score_gpu.py --shape 1b --pairs 512 --exactness --profile "$dir/profile_1b.txt" \
        --json "$dir/score_1b.json"
      step score_8b 220 $py bench/score_gpu.py --shape 8b --pairs 192 --profile "$dir/profile_8b.txt" \
        --json "$dir/score_8b.json"
    fi ;;
  serving)
    if [ $tiny = 1 ]; then
      step pipeline_tiny 300 $py bench/score_pipeline.py --shape tiny --pairs 256 --json "$dir/pipeline_tiny.json"
      step serve_tiny 300 $py bench/serve_load.py --shape tiny --levels 1 16 --json "$dir/serve_tiny.json"
    else
      step pipeline_1b 260 $py bench/score_pipeline.py --shape 1b --pairs 3072 --workdir /tmp/pb \
        --json "$dir/pipeline_1b.json"
      step serve_1b 200 $py bench/serve_load.py --shape 1b --levels 1 16 --workdir /tmp/pb --json "$dir/serve_1b.json"
    fi ;;
  train)
    if [ $tiny = 1 ]; then
      step train_tiny 400 $py bench/train_gpu.py --tiny --json "$dir/train_tiny.json"
    else
      step train_1b 470 $py bench/train_gpu.py --shape 1b --trl-weights fp32 --json "$dir/train_1b.json"
    fi ;;
  *) echo "unknown part $1"; return 2 ;;
  esac
  echo "tables: $OUT/$1.md; everything: $OUT/$1.tar.gz"
}

if [ "$part" = all ]; then
  for p in score train serving; do run_part $p; done
else
  run_part "$part"
fi
