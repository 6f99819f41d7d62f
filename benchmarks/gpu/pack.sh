#!/usr/bin/env bash
# Prepares the GPU kit on this CPU machine, into .gpu_kit/ (git-ignored), for one `run` call on the lent device:
#   .gpu_kit/site.tar.xz   the packages the device lacks (requirements-device.txt), unpacked and re-packed:
#                          site/ (first on the path), site-fallback/ (if needed), site-extra/ (last on the path)
#   .gpu_kit/nnUNet_raw/   the kit dataset: Dataset501_Covid19Lung (real COVID-19 CT slices, all 15 patients, every
#                          2nd slice: ~8 MB) at 128 x 128
# and prints the size that travels (working tree + .gpu_kit; the device accepts 64 MiB, the kit wants < 60 MiB).
#
#   benchmarks/gpu/pack.sh [--data-only] [--source ../shared/data/covid19_ct_slices] [--kit .gpu_kit]
#                          [--size 128] [--max-cases N] [--slice-step 2]
set -euo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
cd "$repo"
kit=.gpu_kit
source_folder=../shared/data/covid19_ct_slices
size=128
slice_step=2   # all slices (17 MB) would leave < 1 MiB of the 60 MiB beside the packages (40 MB)
data_only=0
extra=()
while [ $# -gt 0 ]; do
  case "$1" in
    --data-only) data_only=1 ;;
    --source) source_folder=$2; shift ;;
    --kit) kit=$2; shift ;;
    --size) size=$2; shift ;;
    --slice-step) slice_step=$2; shift ;;
    --max-cases) extra+=("$1" "$2"); shift ;;
    *) echo "pack.sh: unknown option $1" >&2; exit 2 ;;
  esac
  shift
done
python=${PYTHON:-$repo/.venv/bin/python}
[ -x "$python" ] || { echo "pack.sh: $python missing: create the venv first (python3 -m venv .venv && .venv/bin/pip install -e '.[test]')" >&2; exit 2; }
[ -d "$source_folder" ] || { echo "pack.sh: $source_folder missing: pass --source FOLDER with the COVID-19 CT slices" >&2; exit 2; }
mkdir -p "$kit"

# 1. the kit dataset (real slices, resized), made afresh so that the options always hold
rm -rf "$kit/nnUNet_raw"
"$python" benchmarks/gpu/kit_dataset.py "$source_folder" "$kit/nnUNet_raw" --size "$size" --slice-step "$slice_step" \
    "${extra[@]}"

# 2. the packages, unless only the data was asked for
if [ "$data_only" = 0 ]; then
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  requirements=benchmarks/gpu/requirements-device.txt
  wheel_args=(--python-version 3.12 --implementation cp --abi cp312 --platform manylinux2014_x86_64
              --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 --only-binary=:all: --no-deps)
  plain=$(grep -v '^#' "$requirements" | grep -v '# sdist\|# fallback\|# extra' | sed 's/#.*//' | xargs)
  extra_packages=$(grep -v '^#' "$requirements" | grep '# extra' | sed 's/#.*//' | xargs)
  sdist=$(grep -v '^#' "$requirements" | grep '# sdist' | sed 's/#.*//' | xargs)
  fallback=$(grep -v '^#' "$requirements" | grep '# fallback' | sed 's/#.*//' | xargs)
  "$python" -m pip download -q "${wheel_args[@]}" -d "$work/wheels" $plain
  "$python" -m pip download -q "${wheel_args[@]}" -d "$work/fallback-wheels" $fallback
  "$python" -m pip download -q "${wheel_args[@]}" -d "$work/extra-wheels" $extra_packages
  # published as sdist only: build a (pure-Python) wheel here
  "$python" -m pip download -q --no-deps --no-binary=:all: -d "$work/sdist" $sdist
  for archive in "$work"/sdist/*; do
    "$python" -m pip wheel -q --no-deps --no-build-isolation -w "$work/wheels" "$archive"
  done
  echo "downloaded: $(ls "$work/wheels" "$work/fallback-wheels" "$work/extra-wheels" | grep -c whl) wheels, $(du -shc "$work"/*wheels | tail -1 | cut -f1)"
  # unpack (pip --target writes the console scripts to site/bin too), then one xz archive
  "$python" -m pip install -q --no-index --no-deps --no-compile "${wheel_args[@]}" --target "$work/kit/site" "$work"/wheels/*.whl
  "$python" -m pip install -q --no-index --no-deps --no-compile "${wheel_args[@]}" --target "$work/kit/site-fallback" "$work"/fallback-wheels/*.whl
  "$python" -m pip install -q --no-index --no-deps --no-compile "${wheel_args[@]}" --target "$work/kit/site-extra" "$work"/extra-wheels/*.whl
  find "$work/kit" -name __pycache__ -prune -exec rm -rf {} +
  (cd "$work/kit" && ls site site-fallback site-extra | grep -i 'dist-info$' | sed 's/.dist-info//' > "$work/kit/versions.txt")
  tar -C "$work/kit" -cf - site site-fallback site-extra versions.txt | xz -9 -T2 > "$kit/site.tar.xz.part"
  mv "$kit/site.tar.xz.part" "$kit/site.tar.xz"
  echo "packages: $kit/site.tar.xz ($(du -h "$kit/site.tar.xz" | cut -f1), unpacked $(du -sh "$work/kit" | cut -f1))"
fi

# 3. what travels: the working tree (tracked + untracked, not ignored) plus the kit folder
tree_bytes=$(git ls-files -z --cached --others --exclude-standard | xargs -0 -r du -cb 2>/dev/null | tail -1 | cut -f1)
kit_bytes=$(du -sb "$kit" | cut -f1)
total=$((tree_bytes + kit_bytes))
awk -v t="$tree_bytes" -v k="$kit_bytes" -v s="$total" 'BEGIN {
  printf "travels: working tree %.1f MiB + %s %.1f MiB = %.1f MiB (limit 64 MiB, kit target < 60 MiB)\n",
         t / 2^20, "'"$kit"'", k / 2^20, s / 2^20 }'
if [ "$total" -ge $((60 * 1024 * 1024)) ]; then
  echo "pack.sh: the kit travels $((total / 1024 / 1024)) MiB, not < 60 MiB: pass --slice-step 2 or shrink the packages" >&2
  exit 1
fi
