#!/usr/bin/env bash
# One prepared GPU check (issues 13 and 21), at most 6 minutes on one CUDA GPU, runnable on the borrowed machine as
# it is (Python 3.12, torch 2.11, no network): when seg's packages are missing there, the wheels of .gpu_wheels/
# (benchmarks/gpu_wheels.sh, run beforehand where PyPI is reachable) are installed offline into a folder put on
# PYTHONPATH. Then, in order, each under `timeout`:
#   (w) the installed wheels: versions and requirements met; every seg and tools module imports;
#   (a) pytest -m gpu (tests/test_gpu.py): AMP bf16/fp16 steps, float32 whitening, isqrt iterate vs eigh,
#       fold/TorchScript export, NCCL and SyncBatchNorm, IterNorm under autocast;
#   (p) FastDeconv forward and backward on CUDA against the CPU, float32, TF32 off: relative errors <= 1e-3;
#   (t) tools/train.py on a synthetic Cityscapes, bf16, 160 iterations (past the stem's freeze point, 101):
#       loss falling, no NaN; then tools/eval.py on its last.pth, whose mIoU must equal the run's validation;
#   (s) train and eval step time and memory, BN vs deconvolution, DeepLabV3-ResNet-50 OS 8, at the paper's
#       8x480x480 and the config's 8x512x1024 (benchmarks/train_sweep.py, bf16 autocast);
#   (f) inference frames/s at 1024x2048, OS 16 and 8, BN vs folded deconvolution (benchmarks/inference_fps.py).
# Writes ONE markdown report and ONE JSON report beside it (default benchmarks/results/gpu_check.{md,json}); the
# sweep's .md/.json/.png, the parity and training results (.json) and every step's full log go next to them. A
# failing or timed-out step is recorded and the next one runs.
#
# Usage: benchmarks/gpu_check.sh [--dry-run] [--out FILE]
#   --dry-run  no GPU needed, nothing heavy: the wheel list covers what seg needs beyond the GPU image
#              (benchmarks/gpu_wheels.py check; with .gpu_wheels/ present, its files and an offline install for
#              Python 3.12 too); then, in a simulation of the GPU image (this environment with every package that
#              is neither on the image nor in the list hidden: benchmarks/gpu_wheels.py simulate), every seg and
#              tools module imports, the gpu tests collect, (p) and (t) run tiny on the CPU, and (s) and (f) accept
#              their exact flags (--help, --check-args). Prints the plan.
#   --out FILE the markdown report (relative to the current directory); the JSON report is FILE with .json.
# Environment: PYTHON (default: .venv/bin/python of the repository if present, else python3);
#   GPU_WHEELS (default .gpu_wheels in the repository); GPU_SITE (where they are installed, default
#   ${TMPDIR:-/tmp}/deconvseg_gpu_site).
# Exit status: 0 all steps passed (dry run: every check passed); 1 a step (or dry-run check) failed;
#              2 no CUDA device (nothing run); 64 bad arguments.
set -euo pipefail

TOTAL_BUDGET=350            # seconds for the steps, each with its KILL grace: under 6 minutes with the set-up
GRACE=5                     # seconds between timeout's TERM and KILL
STEPS=(w a p t s f)
TRAIN_ITERATIONS=160
declare -A TITLE=(
  [w]="wheels and imports: every listed wheel at its version with its requirements met; every seg/tools module imports"
  [a]="pytest -m gpu (tests/test_gpu.py)"
  [p]="FastDeconv forward and backward, CUDA vs CPU, float32, TF32 off (relative error <= 1e-3)"
  [t]="tools/train.py on the synthetic set, bf16, $TRAIN_ITERATIONS iterations; then tools/eval.py on its last.pth"
  [s]="train/eval step time and memory, BN vs deconv, DeepLabV3-ResNet-50 OS 8, 8x480x480 and 8x512x1024, bf16"
  [f]="inference frames/s at 1024x2048 (DeepLabV3-ResNet-50, OS 16 and 8, BN vs folded deconvolution)"
)
declare -A BUDGET=([w]=20 [a]=75 [p]=20 [t]=70 [s]=90 [f]=45)

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}"; }
die_usage() { echo "gpu_check.sh: $1" >&2; echo "usage: benchmarks/gpu_check.sh [--dry-run] [--out FILE]" >&2; exit 64; }

CALLER_PWD=$PWD
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DRY_RUN=0
OUT="$REPO/benchmarks/results/gpu_check.md"
while (($#)); do
  case "$1" in
    --dry-run) DRY_RUN=1 ;;
    --out) [[ $# -ge 2 && -n "$2" && "$2" != --* ]] || die_usage "--out needs a file name"; OUT=$2; shift ;;
    --out=*) OUT=${1#--out=}; [[ -n "$OUT" ]] || die_usage "--out needs a file name" ;;
    -h|--help) usage; exit 0 ;;
    *) die_usage "unknown argument: $1" ;;
  esac
  shift
done
[[ "$OUT" == /* ]] || OUT="$CALLER_PWD/$OUT"
[[ "$OUT" == *.md ]] || die_usage "--out $OUT: the report is markdown, give a .md file"
[[ ! -d "$OUT" ]] || die_usage "--out $OUT is a directory"
OUT_DIR=$(dirname "$OUT")
STEM=$(basename "$OUT" .md)
JSON="$OUT_DIR/$STEM.json"
SWEEP_NAME="${STEM}_sweep"
PARITY_JSON="$OUT_DIR/${STEM}_parity.json"
TRAIN_JSON="$OUT_DIR/${STEM}_train.json"

cd "$REPO"
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$REPO/.venv/bin/python" ]]; then PYTHON="$REPO/.venv/bin/python"; else PYTHON=python3; fi
fi
WHEELS=${GPU_WHEELS:-$REPO/.gpu_wheels}
SITE=${GPU_SITE:-${TMPDIR:-/tmp}/deconvseg_gpu_site}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")  # the training run's data and checkpoints (not kept)
trap 'rm -rf "$WORK"' EXIT
export NO_ALBUMENTATIONS_UPDATE=1 PYTHONUNBUFFERED=1

# The exact command of each step, in CMD.
step_command() {
  case "$1" in
    w) CMD=(bash -c '"$0" benchmarks/gpu_wheels.py verify; v=$?; "$0" benchmarks/gpu_wheels.py imports && exit $v'
            "$PYTHON") ;;
    a) CMD=("$PYTHON" -m pytest -m gpu -q -rsx -p no:cacheprovider tests/test_gpu.py) ;;
    p) CMD=("$PYTHON" benchmarks/gpu_check.py parity --device cuda --out "$PARITY_JSON") ;;
    t) CMD=("$PYTHON" benchmarks/gpu_check.py train --device cuda --iterations "$TRAIN_ITERATIONS"
            --out-dir "$WORK/train") ;;
    s) CMD=("$PYTHON" benchmarks/train_sweep.py --device cuda --sizes 8x480x480 8x512x1024
            --archs deeplabv3 --output-strides 8 --encoder resnet50 --norm bn deconv
            --warmup 2 --repeats 4 --out-dir "$OUT_DIR" --name "$SWEEP_NAME") ;;
    f) CMD=("$PYTHON" benchmarks/inference_fps.py --device cuda --arch deeplabv3 --os 16 8 --encoder resnet50
            --size 1024 2048 --warmup 3 --frames 10) ;;
  esac
}

print_plan() {
  local total=0 s
  echo "gpu_check.sh plan: at most $TOTAL_BUDGET s for the steps (each under timeout, KILL ${GRACE} s after TERM)"
  for s in "${STEPS[@]}"; do
    step_command "$s"
    total=$((total + BUDGET[$s] + GRACE))
    printf '  (%s) %4d s  %s\n        %s\n' "$s" "${BUDGET[$s]}" "${TITLE[$s]}" "${CMD[*]}"
  done
  echo "  steps: $total s at most, within the $TOTAL_BUDGET s budget (before them: the offline wheel install"
  echo "         when needed, the CUDA check, the machine description)"
  echo "  report: $OUT and $JSON (sweep: $OUT_DIR/$SWEEP_NAME.{md,json,png}; $PARITY_JSON; $TRAIN_JSON;"
  echo "          logs: $OUT_DIR/${STEM}_{$(IFS=,; echo "${STEPS[*]}")}.log)"
  echo "  python: $PYTHON; wheels: $WHEELS (installed, when needed, into $SITE)"
}

# -- dry run -------------------------------------------------------------------------------------------------

FAILED_CHECKS=0
check() {  # check DESCRIPTION CMD...: run a light command, print ok/FAILED with its output on failure
  local what=$1 out rc=0
  shift
  out=$("$@" 2>&1) || rc=$?
  if ((rc == 0)); then
    echo "  ok      $what"
  else
    echo "  FAILED  $what (exit $rc)"
    printf '%s\n' "$out" | tail -n 15 | sed 's/^/          /'
    FAILED_CHECKS=$((FAILED_CHECKS + 1))
  fi
}

writable_dir() {  # the report's directory, or the nearest existing folder above it, is writable
  local d=$1
  while [[ ! -e "$d" ]]; do d=$(dirname "$d"); done
  [[ -d "$d" && -w "$d" ]]
}

collect_gpu_tests() {
  local log rc=0
  log=$(mktemp)
  "$PYTHON" -m pytest --collect-only -q -m gpu -p no:cacheprovider tests/test_gpu.py >"$log" 2>&1 || rc=$?
  if ((rc == 0)) && n=$("$PYTHON" benchmarks/gpu_check.py collected "$log"); then
    echo "$n gpu tests collected"
    rm -f "$log"
    return 0
  fi
  cat "$log"
  rm -f "$log"
  return 1
}

cuda_available() {  # True / False, or ? when python or torch does not run
  "$PYTHON" -c 'import sys; assert sys.version_info >= (3, 10); import torch; print(torch.cuda.is_available())' \
    2>/dev/null || echo "?"
}

has_wheels() { compgen -G "$WHEELS/*.whl" >/dev/null; }

install_for_312() {  # the offline install the GPU machine runs, here for CPython 3.12 on manylinux x86_64
  local p platforms=()
  for p in manylinux_2_28_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64; do platforms+=(--platform "$p"); done
  "$PYTHON" -m pip install -q --disable-pip-version-check --no-index --no-deps --no-compile --no-cache-dir \
    --only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none \
    "${platforms[@]}" --target "$1" "$WHEELS"/*.whl
  [[ -d "$1/segmentation_models_pytorch" && -d "$1/albumentations" && -d "$1/cityscapesscripts" ]]
}

dry_run() {
  print_plan
  echo "checks:"
  check "timeout (coreutils) is installed" command -v timeout
  local cuda sim="$WORK/sim" s
  cuda=$(cuda_available)
  check "$PYTHON: Python >= 3.10 with torch (CUDA here: $cuda)" test "$cuda" != "?"
  check "report folder writable: $OUT_DIR" writable_dir "$OUT_DIR"
  check "benchmarks/gpu_wheels.txt lists every package seg needs beyond the GPU image, at this environment's versions" \
    "$PYTHON" benchmarks/gpu_wheels.py check
  if has_wheels; then
    check "$WHEELS: one cp312 manylinux x86_64 wheel per listed package" "$PYTHON" benchmarks/gpu_wheels.py check \
      --wheels "$WHEELS"
    check "$WHEELS installs offline for CPython 3.12 (pip --no-index --no-deps --target)" install_for_312 "$WORK/site"
  else
    echo "  note    no wheels in $WHEELS: run benchmarks/gpu_wheels.sh before borrowing a GPU (checked when present)"
  fi
  check "simulated GPU image: the import hook is written" "$PYTHON" benchmarks/gpu_wheels.py simulate "$sim/image"
  check "simulation bites: with cityscapesscripts left out of the list, 'import cityscapesscripts' fails" \
    bash -c '"$0" benchmarks/gpu_wheels.py simulate "$1" --without cityscapesscripts >/dev/null &&
             ! PYTHONPATH="$1${PYTHONPATH:+:$PYTHONPATH}" "$0" -c "import cityscapesscripts" 2>/dev/null' \
    "$PYTHON" "$sim/without"
  # Every check from here on runs in the simulated image.
  export PYTHONPATH="$sim/image${PYTHONPATH:+:$PYTHONPATH}"
  check "(w) simulated GPU image: every seg and tools module imports" "$PYTHON" benchmarks/gpu_wheels.py imports
  check "benchmarks/gpu_check.py env" "$PYTHON" benchmarks/gpu_check.py env
  check "(a) pytest --collect-only -m gpu tests/test_gpu.py" collect_gpu_tests
  check "(p) parity, tiny, CPU against CPU (the code path)" "$PYTHON" benchmarks/gpu_check.py parity --device cpu \
    --tiny
  check "(t) train and eval, tiny, on the CPU: synthetic set, tools/train.py 2 iterations, tools/eval.py" \
    "$PYTHON" benchmarks/gpu_check.py train --device cpu --iterations 2 --tiny --out-dir "$WORK/train"
  for s in t s f; do
    step_command "$s"
    [[ $s == t ]] || check "($s) ${CMD[1]} --help" "${CMD[@]:0:2}" --help
    check "($s) ${CMD[1]} accepts the step's flags (--check-args)" "${CMD[@]}" --check-args
  done
  if ((FAILED_CHECKS)); then
    echo "dry run: $FAILED_CHECKS check(s) failed"
    exit 1
  fi
  echo "dry run: every check passed; nothing was run on a GPU"
  exit 0
}

if ((DRY_RUN)); then dry_run; fi

# -- the run -------------------------------------------------------------------------------------------------

START=$SECONDS
cuda=$("$PYTHON" -c 'import torch; print(torch.cuda.is_available())' 2>&1) || true
if [[ "$cuda" != "True" ]]; then
  {
    echo "gpu_check.sh: no CUDA device: \`$PYTHON -c 'import torch; print(torch.cuda.is_available())'\` printed:"
    echo "  ${cuda//$'\n'/$'\n'  }"
    echo "This check needs one CUDA GPU; nothing was run. On this machine use: benchmarks/gpu_check.sh --dry-run"
  } >&2
  exit 2
fi

# seg's packages the image lacks: the carried wheels, installed offline (pip --no-index) ahead on PYTHONPATH.
if "$PYTHON" -c 'import segmentation_models_pytorch, albumentations, cityscapesscripts' 2>/dev/null; then
  WHEELS_LINE="- packages: seg's requirements import as they are; no wheels installed"
elif has_wheels; then
  rm -rf "$SITE"
  if "$PYTHON" -m pip install -q --disable-pip-version-check --root-user-action=ignore --no-index --no-deps \
       --no-compile --no-cache-dir --target "$SITE" "$WHEELS"/*.whl; then
    WHEELS_LINE="- packages: $(ls "$WHEELS"/*.whl | wc -l) wheels from $WHEELS installed offline into $SITE (PYTHONPATH)"
  else
    WHEELS_LINE="- packages: FAILED to install the wheels of $WHEELS into $SITE (steps will fail at import)"
  fi
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
else
  WHEELS_LINE="- packages: seg's requirements are missing and $WHEELS holds no wheels (run benchmarks/gpu_wheels.sh"
  WHEELS_LINE+=" where PyPI is reachable and carry .gpu_wheels); steps will fail at import"
fi
echo "${WHEELS_LINE#- }"
mkdir -p "$OUT_DIR"
rm -f "$OUT_DIR/$SWEEP_NAME".{md,json,png} "$PARITY_JSON" "$TRAIN_JSON"  # a report shows this run's results or none
ENV_LINES=$("$PYTHON" benchmarks/gpu_check.py env 2>&1) || ENV_LINES="- (machine description failed) $ENV_LINES"
ENV_LINES+=$'\n'"$WHEELS_LINE"
printf '%s\n' "$ENV_LINES" >"$WORK/env.md"
declare -A RESULT=() TOOK=() USED_BUDGET=()

status_text() {  # status_text EXIT_CODE SECONDS_TAKEN LIMIT -> words
  if (($1 == 0)); then
    echo "ok"
  elif (($1 == 124 || $1 == 137)) && (($2 >= $3)); then
    echo "TIMED OUT after $3 s (exit $1)"
  else
    echo "FAILED (exit $1)"
  fi
}

fence() {  # a log's last N lines in a text block
  echo '```text'
  tail -n "$2" "$1" 2>/dev/null || echo "(no output)"
  echo '```'
}

write_json() {
  local s
  for s in "${STEPS[@]}"; do
    step_command "$s"
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$s" "${TITLE[$s]}" "${CMD[*]}" "${USED_BUDGET[$s]:-${BUDGET[$s]}}" \
      "${TOOK[$s]:-}" "${RESULT[$s]:-not run yet}" "${STEM}_$s.log"
  done >"$WORK/steps.tsv"
  "$PYTHON" benchmarks/gpu_check.py report-json "$WORK/steps.tsv" "$JSON" --env-file "$WORK/env.md" --result \
    "parity=$PARITY_JSON" "train=$TRAIN_JSON" "sweep=$OUT_DIR/$SWEEP_NAME.json" || echo "(JSON report failed)" >&2
}

write_report() {
  local s failed=0
  for s in "${STEPS[@]}"; do [[ -n "${RESULT[$s]:-}" && "${RESULT[$s]}" != ok ]] && failed=$((failed + 1)); done
  {
    echo "# GPU check (benchmarks/gpu_check.sh)"
    echo
    echo "$ENV_LINES"
    echo "- took $((SECONDS - START)) s (steps' budget $TOTAL_BUDGET s); $failed step(s) not ok; JSON: $STEM.json"
    echo
    echo "| step | what | budget (s) | time (s) | result |"
    echo "|---|---|---|---|---|"
    for s in "${STEPS[@]}"; do
      echo "| ($s) | ${TITLE[$s]} | ${USED_BUDGET[$s]:-${BUDGET[$s]}} | ${TOOK[$s]:--} | ${RESULT[$s]:-not run yet} |"
    done
    for s in "${STEPS[@]}"; do
      [[ -n "${RESULT[$s]:-}" ]] || continue
      step_command "$s"
      echo
      echo "## ($s) ${TITLE[$s]}"
      echo
      echo "\`${CMD[*]}\`: ${RESULT[$s]}, ${TOOK[$s]} s (budget ${USED_BUDGET[$s]} s); full log: ${STEM}_$s.log"
      echo
      if [[ $s == s && -f "$OUT_DIR/$SWEEP_NAME.md" ]]; then
        sed 's/^#/##/' "$OUT_DIR/$SWEEP_NAME.md"
        echo
        echo "Output (last 40 lines):"
        echo
        fence "$OUT_DIR/${STEM}_$s.log" 40
      else
        fence "$OUT_DIR/${STEM}_$s.log" 150
      fi
    done
  } >"$OUT"
  write_json
}

run_step() {
  local s=$1 left limit rc=0 t0=$SECONDS log="$OUT_DIR/${STEM}_$1.log"
  step_command "$s"
  left=$((TOTAL_BUDGET - (SECONDS - START) - GRACE))
  limit=$((BUDGET[$s] < left ? BUDGET[$s] : left))
  USED_BUDGET[$s]=$limit
  echo "== ($s) ${TITLE[$s]} [budget $limit s]"
  if ((limit < 10)); then
    RESULT[$s]="SKIPPED: ${left} s left of the total budget"
    TOOK[$s]=0
    echo "not run: out of time" >"$log"
  else
    timeout --kill-after="$GRACE" "$limit" "${CMD[@]}" 2>&1 | tee "$log" || rc=$?
    TOOK[$s]=$((SECONDS - t0))
    RESULT[$s]=$(status_text "$rc" "${TOOK[$s]}" "$limit")
  fi
  if [[ $s == t && -f "$WORK/train/train.json" ]]; then cp "$WORK/train/train.json" "$TRAIN_JSON"; fi
  echo "== ($s) ${RESULT[$s]} in ${TOOK[$s]} s"
  write_report
}

for s in "${STEPS[@]}"; do run_step "$s"; done
echo "report: $OUT and $JSON"
for s in "${STEPS[@]}"; do [[ "${RESULT[$s]}" == ok ]] || exit 1; done
exit 0
