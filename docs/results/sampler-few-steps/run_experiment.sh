#!/bin/bash
# Few-step samplers of the inpainting generator (CPU, one thread; the machine's other core busy with other jobs).
# Two tiny inpainting generators trained for 300 steps of batch 4 (undertrained on purpose: where the few-step
# noise shows): COVID slices (Dataset601, fold 0) and the MS volumes at half resolution (Dataset605, fold 0).
# 1. compare_samplers.py: the held-out lesions of fold 0 erased and refilled by DDIM 50, UniPC 10/20 and
#    DPM-Solver++ 10/20, with and without the clean-image estimate clipped to [-1, 1] (UniPC also with trailing
#    timesteps; DDIM also without its clip), at the generator's edit margin and grown by 8 px (large edits).
#    (The "leading" rows came out identical to the default spacing: the option did not take; left out of the docs.)
# 2. One balanced MS volume (seed 0, --map-cap 0.04: large edit regions) per sampler through nnsynth_generate,
#    timed with /usr/bin/time; volume_samplers.py: the speckle of each edit region and a figure.
# Resumable: generators, finished stores and the sampler table's rows are reused.
set -e
cd "$(dirname "$0")/../../.."   # the repository root; outputs go to exp/ (ignored by git)
export nnUNet_raw=$PWD/exp/raw nnUNet_preprocessed=$PWD/exp/pre nnUNet_results=$PWD/exp/res
export OMP_NUM_THREADS=1 nnsynth_cpu_threads=1
HERE=docs/results/sampler-few-steps
[ -d exp/raw/Dataset601_Covid19Lung ] || .venv/bin/nnsynth_convert_covid19 ../shared/data/covid19_ct_slices -d 601
[ -d exp/raw/Dataset605_MSLesions ] || .venv/bin/nnsynth_convert_ms_lesions ../shared/data/ms_lesions_3d --downsample 2 -d 605
for id in 601 605; do
  .venv/bin/nnsynth_train_generator $id --mode inpaint --preset tiny --fold 0 --batch-size 4 --steps 300 \
      --checkpoint-every 100 --preview-every 300 --preview-inference-steps 20 --no-progress
done
COVID=$nnUNet_results/Dataset601_Covid19Lung/nnsynth_inpaint_tiny_fold0
MS=$nnUNet_results/Dataset605_MSLesions/nnsynth_inpaint_tiny_fold0
[ -f $HERE/covid/samplers.md ] || .venv/bin/python $HERE/compare_samplers.py 601 $COVID --margins 0 8 --max-slices 8 --output $HERE/covid
[ -f $HERE/ms/samplers.md ] || .venv/bin/python $HERE/compare_samplers.py 605 $MS --margins 0 8 --max-slices 8 --output $HERE/ms
# the step count against the solver: DDIM at 10 and 20 steps, first-order UniPC, UniPC at 50
[ -f $HERE/ms_solver/samplers.md ] || .venv/bin/python $HERE/compare_samplers.py 605 $MS --margins 0 8 --max-slices 8 \
    --output $HERE/ms_solver --configurations "ddim 50" "ddim 10" "ddim 20" "unipc 10, clip" "unipc 10, clip, order 1" \
    "unipc 10, clip, leading" "unipc 50, clip"
copy() {   # copy ID NAME: the real files and the split of Dataset605 under another id
  mkdir -p "exp/raw/Dataset$1_$2" "exp/pre/Dataset$1_$2"
  [ -f "exp/raw/Dataset$1_$2/dataset.json" ] || cp -r exp/raw/Dataset605_MSLesions/{imagesTr,labelsTr,dataset.json} "exp/raw/Dataset$1_$2/"
  cp exp/pre/Dataset605_MSLesions/splits_final.json "exp/pre/Dataset$1_$2/"
}
volume() {   # volume ID NAME SAMPLER STEPS: one balanced volume, timed
  copy "$1" "$2"
  options=()
  [ -n "$3" ] && options=(--sampler "$3" --inference-steps "$4")
  [ -f $HERE/time_$2.txt ] && return
  /usr/bin/time -v .venv/bin/nnsynth_generate "$1" --image-source inpaint --generator "$MS" -n 1 --map-cap 0.04 \
      "${options[@]}" --device cpu 2> exp/time_$2.txt
  grep -E "Elapsed|User time|Maximum resident" exp/time_$2.txt > $HERE/time_$2.txt
}
volume 606 MSUniPC10 unipc 10
volume 607 MSDpmSolver20 dpmsolver++ 20
volume 609 MSDdim20 ddim 20   # the volumes' default
volume 608 MSDdim50 ddim 50
.venv/bin/python $HERE/volume_samplers.py 608 609 606 607 -o $HERE/volumes.png --table $HERE/volumes.md
# 3. The re-noising (inpaint_pipeline.RENOISE), measured on a second training of the MS generator (the same command
#    in exp2/; the stores above came from the first): renoise_probe.py on the held-out lesions (both margins), then
#    one balanced volume per sampler in one process (time_volumes.py: CPU time, speckle, gate), the library's
#    volume default ("-") beside DDIM 20.
export nnUNet_raw=$PWD/exp2/raw nnUNet_preprocessed=$PWD/exp2/pre nnUNet_results=$PWD/exp2/res
[ -d exp2/raw/Dataset605_MSLesions ] || .venv/bin/nnsynth_convert_ms_lesions ../shared/data/ms_lesions_3d --downsample 2 -d 605
.venv/bin/nnsynth_train_generator 605 --mode inpaint --preset tiny --fold 0 --batch-size 4 --steps 300 \
    --checkpoint-every 100 --preview-every 300 --preview-inference-steps 20 --no-progress
MS=$nnUNet_results/Dataset605_MSLesions/nnsynth_inpaint_tiny_fold0
if [ ! -f $HERE/renoise/results.jsonl ]; then
  mkdir -p $HERE/renoise
  for margin in 8 0; do .venv/bin/python $HERE/renoise_probe.py 605 $MS $margin 8 >> $HERE/renoise/results.jsonl; done
fi
copy2() {   # copy2 ID NAME: as copy, in exp2/
  mkdir -p "exp2/raw/Dataset$1_$2" "exp2/pre/Dataset$1_$2"
  [ -f "exp2/raw/Dataset$1_$2/dataset.json" ] || cp -r exp2/raw/Dataset605_MSLesions/{imagesTr,labelsTr,dataset.json} "exp2/raw/Dataset$1_$2/"
  cp exp2/pre/Dataset605_MSLesions/splits_final.json "exp2/pre/Dataset$1_$2/"
}
copy2 617 MSVolDefault; copy2 618 MSVolDdim20c
[ -f $HERE/renoise/volumes.md ] || .venv/bin/python $HERE/time_volumes.py $MS Dataset617_MSVolDefault:-:- \
    Dataset618_MSVolDdim20c:ddim:20 --map-cap 0.04 --table $HERE/renoise/volumes.md > $HERE/renoise/volumes.jsonl
# volumes_table.md: time_*.txt, volumes.md and the gate verdicts of recordsSynth/synth_f0_00000.json, put together by hand
