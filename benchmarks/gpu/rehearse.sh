#!/usr/bin/env bash
# The GPU kit's run.sh on this CPU machine with tiny sizes, so the kit cannot rot (tests/test_gpu_kit.py runs it).
# Same stages and code paths, except what is CUDA-only (bf16, torch.compile, fused AdamW, the batch search); uses the
# project's venv instead of the packed packages and packs its own small dataset (5 real cases, every 10th slice).
#   benchmarks/gpu/rehearse.sh OUT_FOLDER [--source ../shared/data/covid19_ct_slices]
set -euo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
out=${1:?usage: rehearse.sh OUT_FOLDER [--source FOLDER]}
shift
source_folder=$repo/../shared/data/covid19_ct_slices
[ "${1:-}" = --source ] && source_folder=$2
mkdir -p "$out"
out=$(cd "$out" && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$repo/benchmarks/gpu/pack.sh" --data-only --kit "$work/kit" --source "$source_folder" --size 64 --max-cases 5 \
    --slice-step 10
OUT=$out KIT=$work/kit KIT_WORK=$work/run KIT_REHEARSAL=1 KIT_GENERATOR_SECONDS=5 KIT_NNUNET_EPOCHS=1 \
    KIT_NNUNET_ITERATIONS=2 OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} "$repo/benchmarks/gpu/run.sh"
