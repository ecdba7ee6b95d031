#!/usr/bin/env bash
# Download the wheels benchmarks/gpu_check.sh needs on the borrowed GPU machine (Python 3.12, no network) into
# .gpu_wheels/ (git-ignored; it travels with `carry`, see benchmarks/README.md): exactly the name==version lines of
# benchmarks/gpu_wheels.txt, for CPython 3.12 on manylinux x86_64, without their dependencies (the list names
# every one the image lacks). The folder is rebuilt from scratch, then checked against the list.
#
# Usage: benchmarks/gpu_wheels.sh [DIR]      (default: .gpu_wheels in the repository)
# Environment: PYTHON (default: .venv/bin/python of the repository if present, else python3). Needs PyPI access.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DEST=${1:-$REPO/.gpu_wheels}
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$REPO/.venv/bin/python" ]]; then PYTHON="$REPO/.venv/bin/python"; else PYTHON=python3; fi
fi
TMP=$(mktemp -d "${DEST%/}.partial.XXXXXX")
trap 'rm -rf "$TMP"' EXIT
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$p")
done
"$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --abi cp312 --abi abi3 --abi none "${platforms[@]}" --dest "$TMP" -r "$REPO/benchmarks/gpu_wheels.txt"
"$PYTHON" "$REPO/benchmarks/gpu_wheels.py" check --wheels "$TMP"
rm -rf "$DEST"
mv "$TMP" "$DEST"
trap - EXIT
echo "wheels: $DEST ($(du -sh "$DEST" | cut -f1), $(ls "$DEST"/*.whl | wc -l) files)"
