set -e
cd "$(dirname "$0")/../../.."   # the repository root; outputs go to exp/ (ignored by git)
export nnUNet_raw=$PWD/exp/raw nnUNet_preprocessed=$PWD/exp/pre nnUNet_results=$PWD/exp/res
export OMP_NUM_THREADS=1 nnsynth_cpu_threads=1
HERE=docs/results/sampler-few-steps
[ -d exp/raw/Dataset601_Covid19Lung ] || .venv/bin/nnsynth_convert_covid19 ../shared/data/covid19_ct_slices -d 601
MS=$nnUNet_results/Dataset605_MSLesions/nnsynth_inpaint_tiny_fold0
copy() {   # copy ID NAME: the real files and the split of Dataset605 under another id
  mkdir -p "exp/raw/Dataset$1_$2" "exp/pre/Dataset$1_$2"
  [ -f "exp/raw/Dataset$1_$2/dataset.json" ] || cp -r exp/raw/Dataset605_MSLesions/{imagesTr,labelsTr,dataset.json} "exp/raw/Dataset$1_$2/"
  cp exp/pre/Dataset605_MSLesions/splits_final.json "exp/pre/Dataset$1_$2/"
}
volume() {   # volume ID NAME [SAMPLER STEPS]: one balanced volume, timed (none given: the default sampler)
  copy "$1" "$2"
  options=()
  [ -n "$3" ] && options=(--sampler "$3" --inference-steps "$4")
  [ -f $HERE/time_$2.txt ] && return
  /usr/bin/time -v .venv/bin/nnsynth_generate "$1" --image-source inpaint --generator "$MS" -n 1 --map-cap 0.04 \
      "${options[@]}" --device cpu 2> exp/time_$2.txt
  grep -E "Elapsed|User time|Maximum resident" exp/time_$2.txt > $HERE/time_$2.txt
}
volume 606 MSDefault
volume 607 MSDpmSolver20 dpmsolver++ 20
volume 608 MSDdim50 ddim 50
.venv/bin/python $HERE/volume_samplers.py 608 606 607 -o $HERE/volumes.png --table $HERE/volumes.md
