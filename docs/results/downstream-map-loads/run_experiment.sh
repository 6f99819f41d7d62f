#!/bin/bash
# Realistic against dense label maps on held-out patients (CPU): the copy_paste and inpaint arms with --map-loads
# real, beside the stored real_only and dense-map runs of downstream-cpu-inpaint (same 4 test patients, split seed,
# budget medium, seeds 0-4, 4 and 8 training patients, the same generator settings), which are copied in and reused.
# Resumable: rerun it and finished runs, generator checkpoints and synthetic cases are reused.
# Two settings side by side (one process each; convert Dataset501 first so that they do not both convert it), then one run of both, which finds every run finished and writes
# the joint summary, differences and patients.json:
#   REAL_CASES=4 FIRST_ID=800 run_experiment.sh & REAL_CASES=8 FIRST_ID=805 run_experiment.sh & wait
#   run_experiment.sh
# (setting i of one command takes dataset ids FIRST_ID + 5 i, so the joint run finds the same dataset copies).
# The dense copy_paste arm's per-map loads: its cases are made again (same seed, same count) by nnsynth_generate in
# the arm's dataset copy, and the joint run reads them from its store.
set -e
cd "$(dirname "$0")/../../.."   # the repository root; outputs go to exp/ (ignored by git)
export nnUNet_raw=$PWD/exp/raw nnUNet_preprocessed=$PWD/exp/pre nnUNet_results=$PWD/exp/res
export nnUNet_n_proc_DA=0 nnUNet_def_n_proc=1 nnUNet_compile=f OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 nnsynth_cpu_threads=1
OUTPUT=${OUTPUT:-exp/eval-map-loads}
STORED=docs/results/downstream-cpu-inpaint/runs
[ -d exp/raw/Dataset501_Covid19Lung ] || .venv/bin/nnsynth_convert_covid19 ../shared/data/covid19_ct_slices
for cases in ${REAL_CASES:-4 8}; do
  setting=real$cases
  for label in real_only copy_paste_x0.5 inpaint_x0.5; do
    if [ ! -d "$OUTPUT/runs/$setting/$label" ]; then
      mkdir -p "$OUTPUT/runs/$setting"
      cp -r "$STORED/$setting/$label" "$OUTPUT/runs/$setting/$label"
      rm -f "$OUTPUT/runs/$setting/copy_paste_x0.5/model_free_gate.json"   # remade with its per-map loads
    fi
  done
done
run() {
  # shellcheck disable=SC2086   # REAL_CASES is a list
  .venv/bin/nnsynth_evaluate downstream 501 -o "$OUTPUT" \
      --arms real_only copy_paste inpaint --map-loads dense real --repeats "${REPEATS:-5}" --test-patients 4 \
      --split-seed 0 --real-cases ${REAL_CASES:-4 8} --budget medium --plans cpu --amounts 0.5 --no-tta \
      --test-slice-step 2 --first-id "${FIRST_ID:-800}" --device cpu \
      --generator-preset tiny --generator-steps 400 --generator-lr 1e-3 --inference-steps 20 \
      --inpaint-steps 300 --inpaint-batch-size 4 --inpaint-inference-steps 10 \
      --compare copy_paste_x0.5_real:copy_paste_x0.5 inpaint_x0.5_real:inpaint_x0.5 \
      inpaint_x0.5_real:copy_paste_x0.5_real inpaint_x0.5:copy_paste_x0.5 copy_paste_x0.5_real:real_only \
      inpaint_x0.5_real:real_only copy_paste_x0.5:real_only inpaint_x0.5:real_only
}
run
if [ -z "$REAL_CASES" ]; then     # the joint run: the dense copy_paste arm's cases, for its per-map loads
  remade=0
  for dataset in exp/raw/Dataset801_* exp/raw/Dataset806_*; do
    if [ ! -f "$dataset/synthetic.json" ]; then
      .venv/bin/nnsynth_generate "$(basename "$dataset")" --image-source copy-paste -r 0.5 --seed 0 --fold 0
      remade=1
    fi
  done
  [ "$remade" = 0 ] || run
fi
