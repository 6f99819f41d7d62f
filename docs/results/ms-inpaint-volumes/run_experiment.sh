#!/bin/bash
# Through-plane consistency of inpainted MS volumes (CPU). The MS lesion MRI at half resolution (Dataset505,
# fold 0: training patients ms_19 and ms_26), the CPU inpainting preset trained on fold 0 (tiny, its default 1000
# steps), then one balanced label map (seed 0, --map-cap 0.04: about 1.7x a real volume's lesion load) drawn five
# ways into five copies of the dataset: inpaint with DDIM 50 (the volumes' default) and UniPC 10 (the slices'
# default), each with per-slice (default) and aligned noise, and copy-paste. Writes through_plane.txt and the two
# figures, then the lesion-region fidelity of the generator on held-out lesion slices of fold 0's validation
# patient (ms_07). Resumable: the generator and finished cases are reused.
set -e
cd "$(dirname "$0")/../../.."   # the repository root; outputs go to exp/ (ignored by git)
export nnUNet_raw=$PWD/exp/raw nnUNet_preprocessed=$PWD/exp/pre nnUNet_results=$PWD/exp/res
HERE=docs/results/ms-inpaint-volumes
[ -d exp/raw/Dataset505_MSLesions ] || .venv/bin/nnsynth_convert_ms_lesions ../shared/data/ms_lesions_3d --downsample 2 -d 505
.venv/bin/nnsynth_train_generator 505 --mode inpaint --preset tiny --fold 0
GENERATOR=$nnUNet_results/Dataset505_MSLesions/nnsynth_inpaint_tiny_fold0
copy() {   # copy ID NAME: the real files and the split of Dataset505 under another id
  mkdir -p "exp/raw/Dataset$1_$2" "exp/pre/Dataset$1_$2"
  [ -f "exp/raw/Dataset$1_$2/dataset.json" ] || cp -r exp/raw/Dataset505_MSLesions/{imagesTr,labelsTr,dataset.json} "exp/raw/Dataset$1_$2/"
  cp exp/pre/Dataset505_MSLesions/splits_final.json "exp/pre/Dataset$1_$2/"
}
inpaint() {   # inpaint ID SAMPLER STEPS NOISE
  .venv/bin/nnsynth_generate "$1" --image-source inpaint --generator "$GENERATOR" -n 1 --map-cap 0.04 --sampler "$2" \
      --inference-steps "$3" --volume-noise "$4" --device cpu
}
copy 522 MSCapDdimAligned && inpaint 522 ddim 50 aligned
copy 523 MSCapDdimPerSlice && inpaint 523 ddim 50 per-slice
copy 511 MSCap && inpaint 511 unipc 10 aligned
copy 512 MSCapPerSlice && inpaint 512 unipc 10 per-slice
copy 513 MSCapCopyPaste && .venv/bin/nnsynth_generate 513 --image-source copy-paste -n 1 --map-cap 0.04
for id in 522 523 511 512 513; do
  folder=$(ls -d exp/raw/Dataset${id}_*)
  echo "== Dataset$id: $(.venv/bin/python -c "import json, sys; s = json.load(open(sys.argv[1]))['folds']['0']['settings']; \
print(s.get('image_source', 'inpaint'), s.get('sampler'), s.get('num_inference_steps'), s.get('volume_noise'))" "$folder/synthetic.json")"
  .venv/bin/python -m nnunet_synth.evaluation.through_plane $id --fold 0
  .venv/bin/python -c "import json, sys; q = json.load(open(sys.argv[1]))['quality']['model_free']; \
print('  model-free gate:', 'passed' if q['passed'] else 'failed', 'worst slice score %.3f' % q['score'])" \
      "$folder/recordsSynth/synth_f0_00000.json"
done | tee $HERE/through_plane.txt
# the defaults on the default --map-cap (two dense maps), beside copy-paste of the same maps
copy 524 MSDenseDefault && .venv/bin/nnsynth_generate 524 --image-source inpaint --generator "$GENERATOR" -n 2 --device cpu
copy 509 MSCopyPaste && .venv/bin/nnsynth_generate 509 --image-source copy-paste -n 2
for id in 524 509; do .venv/bin/python -m nnunet_synth.evaluation.through_plane $id --fold 0; done | tee -a $HERE/through_plane.txt
.venv/bin/python $HERE/make_figure.py 522 523 513 -o $HERE/figure.png       # DDIM 50: aligned, per-slice
.venv/bin/python $HERE/make_figure.py 511 512 513 -o $HERE/figure_unipc10.png
.venv/bin/nnsynth_evaluate fidelity 505 --inpaint-generator "$GENERATOR" --samplers unipc:10 ddim:50 --max-slices 12 --seeds 0 \
    --device cpu --output exp/fidelity505
cp exp/fidelity505/lesion_fidelity.{json,md} exp/fidelity505/lesion_fidelity_preview.png $HERE/
