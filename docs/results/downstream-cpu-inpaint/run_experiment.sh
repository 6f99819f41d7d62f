#!/bin/bash
# The held-out-patient downstream experiment of the inpaint arm (CPU): real_only, copy_paste, inpaint,
# copy_paste_online and cbmat x
# REPEATS seeds (default 5) x REAL_CASES training patients (default "4 8"), on the 4 test patients of
# downstream-cpu-k4-k8 (same --test-patients and split seed), 500 training iterations (budget medium).
# Resumable: rerun it and finished arms, repeats, generator checkpoints and synthetic cases are reused.
# Two settings side by side (one process each; convert Dataset501 first so that they do not both convert it), then
# one run of both, which finds every run finished and writes the joint summary, differences and patients.json:
#   REAL_CASES=4 FIRST_ID=760 run_experiment.sh & REAL_CASES=8 FIRST_ID=765 run_experiment.sh & wait
#   run_experiment.sh
# (setting i of one command takes dataset ids FIRST_ID + 5 i, so the joint run finds the same dataset copies).
set -e
cd "$(dirname "$0")/../../.."   # the repository root; outputs go to exp/ (ignored by git)
export nnUNet_raw=$PWD/exp/raw nnUNet_preprocessed=$PWD/exp/pre nnUNet_results=$PWD/exp/res
export nnUNet_n_proc_DA=0 nnUNet_def_n_proc=1 nnUNet_compile=f OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 nnsynth_cpu_threads=1
[ -d exp/raw/Dataset501_Covid19Lung ] || .venv/bin/nnsynth_convert_covid19 ../shared/data/covid19_ct_slices
# shellcheck disable=SC2086   # REAL_CASES is a list
.venv/bin/nnsynth_evaluate downstream 501 -o "${OUTPUT:-exp/eval-inpaint}" \
    --arms real_only copy_paste inpaint copy_paste_online cbmat --repeats "${REPEATS:-5}" --test-patients 4 --split-seed 0 \
    --real-cases ${REAL_CASES:-4 8} --budget medium --plans cpu --amounts 0.5 --no-tta --test-slice-step 2 \
    --first-id "${FIRST_ID:-760}" --device cpu \
    --generator-preset tiny --generator-steps 400 --generator-lr 1e-3 --inference-steps 20 \
    --inpaint-steps 300 --inpaint-batch-size 4 --inpaint-inference-steps 10 \
    --compare inpaint:copy_paste cbmat:copy_paste inpaint:cbmat copy_paste_online:copy_paste \
    inpaint:copy_paste_online copy_paste:real_only inpaint:real_only cbmat:real_only copy_paste_online:real_only
