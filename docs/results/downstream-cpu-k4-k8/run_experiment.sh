#!/bin/bash
# The held-out-patient downstream experiment (CPU): 5 arms x 5 repeats (REPEATS=N for N) x (4, 8 real training
# patients), 4 held-out test patients, 500 training iterations (budget medium).
cd "$(dirname "$0")/../../.."   # the repository root; outputs go to exp/ (ignored by git)
export nnUNet_raw=$PWD/exp/raw nnUNet_preprocessed=$PWD/exp/pre nnUNet_results=$PWD/exp/res
export nnUNet_n_proc_DA=0 nnUNet_def_n_proc=1 nnUNet_compile=f OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 nnsynth_cpu_threads=1
.venv/bin/nnsynth_evaluate downstream 501 -o exp/eval \
    --arms real_only oversample copy_paste mat cbmat --repeats "${REPEATS:-5}" --test-patients 4 --real-cases 4 8 \
    --budget medium --plans cpu --amounts 0.5 --inference-steps 20 --no-tta --test-slice-step 2 --first-id 740 --device cpu \
    --generator-preset tiny --generator-steps 400 --generator-lr 1e-3
