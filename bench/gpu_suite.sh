#!/usr/bin/env bash
# The GPU issue's measurements, sized for a 15-minute device budget: the steps run in priority
# order, and with --deadline S none outlasts S seconds from the script's start (a step starts only
# when its minimum still fits, under min(its own limit, the time left)); the steps left out are
# printed with the command that runs them next, for a second call on the still-warm machine.
#
#   bash bench/gpu_suite.sh all --deadline 500             # call 1 (timeout_s 560)
#   bash bench/gpu_suite.sh pipeline_1b serve_1b --deadline 170   # call 2: what call 1 printed as next
#   bash bench/gpu_suite.sh all --tiny                     # every step on CPU with tiny shapes: the rehearsal
#
# Steps (the order of `all`): score_1b score_8b train_1b pipeline_1b serve_1b; parts name groups of
# them: score (score_1b score_8b), train (train_1b), serving (pipeline_1b serve_1b).
#
# On the GPU machine it first installs the carried wheels (.gpu/wheels.tar.xz, made here by
# ../shared/tools/gpu-wheels.sh; carry `.gpu`; about 11 s here). Each step's log, JSON and
# profiler table land in $STAGE/suite/ (outside $OUT: the device returns at most 8 files), and
# after every step that folder is archived to $OUT/suite.tar.gz and the tables to $OUT/suite.md
# (temporary name, then rename), so a call cut off returns the steps before.
set -u
tiny=0 deadline=0 names=()
while [ $# -gt 0 ]; do
  case $1 in
  --tiny) tiny=1 ;;
  --deadline) deadline=${2:?--deadline needs seconds}; shift ;;
  *) names+=("$1") ;;
  esac
  shift
done
[ ${#names[@]} -gt 0 ] || { echo "usage: gpu_suite.sh [--tiny] [--deadline S] all|score|train|serving|STEP..."; exit 2; }
t_start=$(date +%s)
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
OUT=${OUT:-$root/runs/gpu_suite}
STAGE=${STAGE:-$(mktemp -d /tmp/gpu_suite.XXXXXX)}
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

dir=$STAGE/suite
mkdir -p "$dir" "$OUT"
: >"$dir/steps.txt"

# One line a step: NAME OWN_LIMIT_S MIN_S COMMAND (the minimum: below it a step measures nothing
# worth its time, so it is left for the next call). Limits are guesses until a GPU run: no
# session has had one; the deadline, not these, keeps a call inside the device budget.
if [ $tiny = 1 ]; then
  d=$dir
  STEPS="score_tiny 300 30 $py bench/score_gpu.py --tiny --exactness --exactness-pairs 8 --profile $d/profile_tiny.txt --json $d/score_tiny.json
train_tiny 400 30 $py bench/train_gpu.py --tiny --json $d/train_tiny.json
pipeline_tiny 300 30 $py bench/score_pipeline.py --shape tiny --pairs 256 --json $d/pipeline_tiny.json
serve_tiny 300 30 $py bench/serve_load.py --shape tiny --levels 1 16 --json $d/serve_tiny.json"
  ALL="score_tiny train_tiny pipeline_tiny serve_tiny"
else
  d=$dir
  STEPS="score_1b 180 60 $py bench/score_gpu.py --shape 1b --pairs 512 --exactness --exactness-pairs 256 --profile $d/profile_1b.txt --json $d/score_1b.json
score_8b 180 60 $py bench/score_gpu.py --shape 8b --pairs 160 --profile $d/profile_8b.txt --json $d/score_8b.json
train_1b 210 90 $py bench/train_gpu.py --shape 1b --trl-weights fp32 --json $d/train_1b.json
pipeline_1b 120 60 $py bench/score_pipeline.py --shape 1b --pairs 2048 --workdir /tmp/pb --json $d/pipeline_1b.json
serve_1b 120 60 $py bench/serve_load.py --shape 1b --levels 1 16 --max-seconds 10 --workdir /tmp/pb --json $d/serve_1b.json"
  ALL="score_1b score_8b train_1b pipeline_1b serve_1b"
fi

expand() {  # names -> steps, in the order given (parts and `all` expand in priority order)
  local n
  for n in "$@"; do
    case $n in
    all) echo $ALL ;;
    score) echo $ALL | tr ' ' '\n' | grep '^score_' ;;
    train) echo $ALL | tr ' ' '\n' | grep '^train_' ;;
    serving) echo $ALL | tr ' ' '\n' | grep -E '^(pipeline|serve)_' ;;
    *) echo "$STEPS" | grep -q "^$n " && echo "$n" || { echo "unknown step $n" >&2; return 2; } ;;
    esac
  done
}

archive() {  # $OUT/suite.md (each step's table: its JSON's, else the end of its log) and $OUT/suite.tar.gz
  $py - "$dir" >"$OUT/suite.md.tmp" <<'PY'
import json, pathlib, sys
d = pathlib.Path(sys.argv[1])
print((d / "env.txt").read_text())
for line in (d / "steps.txt").read_text().splitlines():
    name, _, status = line.partition(" ")
    log, js = d / f"{name}.log", d / f"{name}.json"
    table = json.loads(js.read_text()).get("table") if js.exists() else None
    tail = "".join(log.read_text().splitlines(True)[-40:]) if log.exists() else ""
    print(f"## {name} ({status})\n\n{table or tail}\n")
PY
  mv "$OUT/suite.md.tmp" "$OUT/suite.md"
  tar -czf "$OUT/suite.tar.gz.tmp" -C "$STAGE" suite && mv "$OUT/suite.tar.gz.tmp" "$OUT/suite.tar.gz"
}

todo=$(expand "${names[@]}") || exit 2
{ echo "# GPU suite on $($py -c 'import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU")'), $(date -u +%F)"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null
  $py -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)'
} >"$dir/env.txt" 2>&1

left_out=()
for name in $todo; do
  read -r _ limit min cmd <<<"$(echo "$STEPS" | grep "^$name ")"
  if [ "$deadline" -gt 0 ]; then
    remaining=$(( deadline - ($(date +%s) - t_start) ))
    if [ "$remaining" -lt "$min" ]; then
      echo "== $name: not run, ${remaining} s left of the deadline (needs ${min} s)"
      left_out+=("$name")
      continue
    fi
    [ "$remaining" -lt "$limit" ] && limit=$remaining
  fi
  echo "== $name (limit ${limit}s): $cmd"
  t0=$(date +%s)
  timeout --kill-after=15 "$limit" $cmd >"$dir/$name.log" 2>&1
  rc=$?
  echo "== $name: rc $rc, $(( $(date +%s) - t0 )) s"
  tail -n 25 "$dir/$name.log"
  echo "$name rc $rc in $(( $(date +%s) - t0 )) s of ${limit} s" >>"$dir/steps.txt"
  archive  # after every step: a call cut off by the device's limit still returns the steps before
done
archive
echo "tables: $OUT/suite.md; everything: $OUT/suite.tar.gz; $(( $(date +%s) - t_start )) s in all"
if [ ${#left_out[@]} -gt 0 ]; then
  echo "next: bash bench/gpu_suite.sh ${left_out[*]}$([ $tiny = 1 ] && echo ' --tiny') --deadline SECONDS"
fi
