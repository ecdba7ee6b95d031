#!/usr/bin/env bash
# One prepared GPU check (issue 13), at most 8 minutes on one CUDA GPU. In order, each under `timeout`:
#   (a) pytest -m gpu (tests/test_gpu.py): AMP bf16/fp16 steps, float32 whitening, isqrt iterate vs eigh,
#       fold/TorchScript export, NCCL and SyncBatchNorm, IterNorm under autocast;
#   (b) benchmarks/train_step.py --sweep on CUDA (bf16 autocast) at the paper's 8x480x480 and the config's
#       8x512x1024, DeepLabV3-ResNet-50 OS 8, --norm bn deconv gn iternorm;
#   (c) benchmarks/inference_fps.py on CUDA: frames/s at 1024x2048, OS 16 and 8;
#   (d) benchmarks/deconv_layer.py on CUDA: one layer, Conv2d+BatchNorm2d vs FastDeconv (float32).
# Writes ONE markdown report (default benchmarks/results/gpu_check.md; the sweep's .md/.json/.png, the layer's
# .md/.json and every
# step's full log go next to it). A failing or timed-out step is recorded and the next one runs.
#
# Usage: benchmarks/gpu_check.sh [--dry-run] [--out FILE]
#   --dry-run  check the arguments and that every command exists and accepts the exact flags it will get
#              (scripts' --help and --check-args, pytest --collect-only -m gpu), print the plan; runs nothing
#              heavy, works without CUDA.
#   --out FILE the markdown report (relative to the current directory).
# Environment: PYTHON (default: .venv/bin/python of the repository if present, else python3).
# Exit status: 0 all steps passed (dry run: every check passed); 1 a step (or dry-run check) failed;
#              2 no CUDA device (nothing run); 64 bad arguments.
set -euo pipefail

TOTAL_BUDGET=470            # seconds for everything, checks included: under 8 minutes
GRACE=5                     # seconds between timeout's TERM and KILL
STEPS=(a b c d)
declare -A TITLE=(
  [a]="pytest -m gpu (tests/test_gpu.py)"
  [b]="train-step sweep on CUDA, bf16: DeepLabV3-ResNet-50 OS 8 at 8x480x480 and 8x512x1024, bn deconv gn iternorm"
  [c]="inference frames/s at 1024x2048 (DeepLabV3-ResNet-50, OS 16 and 8, BN vs folded deconvolution)"
  [d]="one layer on CUDA, float32: Conv2d+BatchNorm2d vs FastDeconv (benchmarks/deconv_layer.py)"
)
declare -A BUDGET=([a]=100 [b]=210 [c]=80 [d]=30)

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
SWEEP_NAME="${STEM}_sweep"

cd "$REPO"
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$REPO/.venv/bin/python" ]]; then PYTHON="$REPO/.venv/bin/python"; else PYTHON=python3; fi
fi
export NO_ALBUMENTATIONS_UPDATE=1 PYTHONUNBUFFERED=1

# The exact command of each step, in CMD.
step_command() {
  case "$1" in
    a) CMD=("$PYTHON" -m pytest -m gpu -q -rsx -p no:cacheprovider tests/test_gpu.py) ;;
    b) CMD=("$PYTHON" benchmarks/train_step.py --sweep --device cuda --sizes 8x480x480 8x512x1024
            --archs deeplabv3 --output-strides 8 --encoder resnet50 --norm bn deconv gn iternorm
            --warmup 2 --repeats 5 --out-dir "$OUT_DIR" --name "$SWEEP_NAME") ;;
    c) CMD=("$PYTHON" benchmarks/inference_fps.py --device cuda --arch deeplabv3 --os 16 8 --encoder resnet50
            --size 1024 2048 --warmup 3 --frames 10) ;;
    d) CMD=("$PYTHON" benchmarks/deconv_layer.py --device cuda --repeats 20 --output "$OUT_DIR/${STEM}_layer") ;;
  esac
}

print_plan() {
  local total=0 s
  echo "gpu_check.sh plan: at most $TOTAL_BUDGET s in all (steps run under timeout, KILL ${GRACE} s after TERM)"
  for s in "${STEPS[@]}"; do
    step_command "$s"
    total=$((total + BUDGET[$s] + GRACE))
    printf '  (%s) %4d s  %s\n        %s\n' "$s" "${BUDGET[$s]}" "${TITLE[$s]}" "${CMD[*]}"
  done
  echo "  steps: $total s at most, within the $TOTAL_BUDGET s budget (the rest: CUDA check, machine description)"
  echo "  report: $OUT (sweep: $OUT_DIR/$SWEEP_NAME.{md,json,png}; layer: $OUT_DIR/${STEM}_layer.{md,json}; logs: $OUT_DIR/${STEM}_{a,b,c,d}.log)"
  echo "  python: $PYTHON"
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

dry_run() {
  print_plan
  echo "checks:"
  check "timeout (coreutils) is installed" command -v timeout
  local cuda
  cuda=$(cuda_available)
  check "$PYTHON: Python >= 3.10 with torch (CUDA here: $cuda)" test "$cuda" != "?"
  check "report folder writable: $OUT_DIR" writable_dir "$OUT_DIR"
  check "benchmarks/gpu_check.py env" "$PYTHON" benchmarks/gpu_check.py env
  check "(a) pytest --collect-only -m gpu tests/test_gpu.py" collect_gpu_tests
  local s
  for s in b c d; do
    step_command "$s"
    check "($s) ${CMD[1]} --help" "${CMD[@]:0:2}" --help
    check "($s) ${CMD[1]} accepts the step's flags (--check-args)" "${CMD[@]}" --check-args
  done
  if ((FAILED_CHECKS)); then
    echo "dry run: $FAILED_CHECKS check(s) failed"
    exit 1
  fi
  echo "dry run: every check passed; nothing was run"
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
mkdir -p "$OUT_DIR"
rm -f "$OUT_DIR/$SWEEP_NAME".{md,json,png}  # a report shows this run's sweep or none
ENV_LINES=$("$PYTHON" benchmarks/gpu_check.py env 2>&1) || ENV_LINES="- (machine description failed) $ENV_LINES"
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

write_report() {
  local s failed=0
  for s in "${STEPS[@]}"; do [[ -n "${RESULT[$s]:-}" && "${RESULT[$s]}" != ok ]] && failed=$((failed + 1)); done
  {
    echo "# GPU check (benchmarks/gpu_check.sh)"
    echo
    echo "$ENV_LINES"
    echo "- took $((SECONDS - START)) s of the $TOTAL_BUDGET s budget; $failed step(s) not ok"
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
      if [[ $s == b && -f "$OUT_DIR/$SWEEP_NAME.md" ]]; then
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
  echo "== ($s) ${RESULT[$s]} in ${TOOK[$s]} s"
  write_report
}

for s in "${STEPS[@]}"; do run_step "$s"; done
echo "report: $OUT"
for s in "${STEPS[@]}"; do [[ "${RESULT[$s]}" == ok ]] || exit 1; done
exit 0
