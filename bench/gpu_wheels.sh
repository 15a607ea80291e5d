#!/usr/bin/env bash
# The wheels the lent GPU machine lacks (bench/gpu_wheels.txt, pinned), for CPython 3.12 on manylinux
# x86-64, downloaded into .whl/gpu/ (git-ignored; carry it with the run: docs/gpu.md). Prints their
# total size, which must stay under 56 MiB (the working tree travels in at most 64 MiB).
#   bash bench/gpu_wheels.sh [DEST [PYTHON_VERSION]]
# PYTHON_VERSION (default 3.12, the lent machine's) lets a rehearsal here use this Python's wheels:
#   bash bench/gpu_wheels.sh .whl/gpu-rehearsal 3.11 && python bench/lent_machine.py -- \
#     python bench/gpu_check.py --dry-run --wheels .whl/gpu-rehearsal
set -euo pipefail
cd "$(dirname "$0")/.."
dest=${1:-.whl/gpu}
pyver=${2:-3.12}
pip=${PIP:-}
if [ -z "$pip" ]; then
  if [ -x .venv/bin/pip ]; then pip=".venv/bin/pip"; else pip="python3 -m pip"; fi
fi
budget=$((56 * 1024 * 1024))
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
platforms=()
for tag in manylinux2014_x86_64 manylinux_2_17_x86_64 manylinux_2_24_x86_64 manylinux_2_27_x86_64 \
           manylinux_2_28_x86_64 manylinux_2_5_x86_64 manylinux1_x86_64 manylinux2010_x86_64 any; do
  platforms+=(--platform "$tag")
done
# --no-deps: the list is the whole closure already (what the machine has is left out on purpose)
$pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: --python-version "$pyver" \
  --implementation cp "${platforms[@]}" -d "$tmp" -r bench/gpu_wheels.txt
rm -rf "$dest"
mkdir -p "$(dirname "$dest")"
mv "$tmp" "$dest"
trap - EXIT
count=$(ls "$dest"/*.whl | wc -l)
total=$(cat "$dest"/*.whl | wc -c)
ls -S -l "$dest" | awk 'NR>1 && NR<=6 {printf "  %6.1f MiB  %s\n", $5/1048576, $9}'
printf 'gpu_wheels: %d wheels for CPython %s in %s, %.1f MiB in total (budget 56 MiB)\n' "$count" "$pyver" "$dest" \
  "$(awk -v b="$total" 'BEGIN {print b / 1048576}')"
if [ "$total" -ge "$budget" ]; then
  echo "gpu_wheels: over the 56 MiB budget: the working tree travels in at most 64 MiB" >&2
  exit 1
fi
