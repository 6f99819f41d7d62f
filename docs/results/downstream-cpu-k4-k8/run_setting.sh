#!/bin/bash
# One setting of the held-out-patient downstream experiment (CPU): 5 arms x 5 repeats (REPEATS=N for N) with K real
# training patients, 4 held-out test patients. Usage: run_setting.sh K OUTPUT FIRST_ID [BUDGET]   (e.g. run_setting.sh 4 exp/eval 740 medium)
# The settings run as parallel processes (one torch thread each) and merge.sh joins them.
set -e
k=$1 output=$2 first_id=$3 budget=${4:-medium}
cd "$(dirname "$0")/../../.."   # the repository root; outputs go to exp/ (ignored by git)
export nnUNet_raw=$PWD/exp/raw nnUNet_preprocessed=$PWD/exp/pre nnUNet_results=$PWD/exp/res
export nnUNet_n_proc_DA=0 nnUNet_def_n_proc=1 nnUNet_compile=f OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 nnsynth_cpu_threads=1
[ -d exp/raw/Dataset501_Covid19Lung ] || .venv/bin/nnsynth_convert_covid19 ../shared/data/covid19_ct_slices
.venv/bin/nnsynth_evaluate downstream 501 -o "$output" \
    --arms real_only oversample copy_paste mat cbmat --repeats "${REPEATS:-5}" --test-patients 4 --real-cases "$k" \
    --budget "$budget" --plans cpu --amounts 0.5 --inference-steps 20 --no-tta --test-slice-step 2 \
    --first-id "$first_id" --device cpu --generator-preset tiny --generator-steps 400 --generator-lr 1e-3
