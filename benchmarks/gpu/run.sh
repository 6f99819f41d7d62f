#!/usr/bin/env bash
# The GPU kit's one device command (docs/gpu.md). From the repository root, with .gpu_kit/ from pack.sh carried:
#   OUT=/some/folder benchmarks/gpu/run.sh
# Stages, each writing its results into $OUT as soon as it ends (a run stopped at its limit keeps them):
#   install     untar the packages into a private folder, the project beside them  -> install.json
#   smoke       CUDA: generator steps (bf16, channels_last, fused AdamW, --compile) under accelerate, DDIM sampling,
#               same seed = same image whatever the batch, nnUNetv2_train -tr nnUNetTrainerSynthMix_debug -> smoke.json
#   throughput  benchmarks/generator_throughput.py, tiny and default presets, ours vs plain fp32 -> throughput.json
#   evidence    the inpainting CBMAT generator at its GPU preset (128 px crops) for a time budget, inpainted cases
#               and their model-free pass rate, real-only vs SynthMix nnU-Net on fold 0 (SynthMix with its default
#               quality filter), lesion-region fidelity per sampler against copy-paste
#                                                               -> evidence.json, synthetic_preview.png, fidelity_preview.png
# Environment: KIT_STAGES (default "smoke throughput evidence"; install always runs unless KIT_REHEARSAL=1),
# KIT_SKIP_DONE=1 skips stages whose JSON already lies in $OUT, KIT_REHEARSAL=1 (CPU, the current python, tiny
# sizes: rehearse.sh), budgets KIT_GENERATOR_SECONDS (150), KIT_NNUNET_EPOCHS (10) x KIT_NNUNET_ITERATIONS (50).
# A stage that fails writes its JSON with "failed" (the step; the log tail is in $OUT/log.txt) and the next stage runs;
# where torch.compile fails, the step is rerun without it and its figures say "compile": false.
set -euo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
cd "$repo"
# python -m / -c would put the repository first on sys.path, where nnunet_synth/ lacks the sub-packages the install
# maps in (dataset_tools, trainers): import the installed project only (Python >= 3.11)
export PYTHONSAFEPATH=1
: "${OUT:?set OUT to the folder that receives the results}"
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
kit=$(cd "${KIT:-.gpu_kit}" && pwd)
work=${KIT_WORK:-/tmp/nnsynth_gpu_kit}
rehearsal=${KIT_REHEARSAL:-0}
stages=" ${KIT_STAGES:-smoke throughput evidence} "
generator_seconds=${KIT_GENERATOR_SECONDS:-150}
export nnsynth_kit_epochs=${KIT_NNUNET_EPOCHS:-10} nnsynth_kit_iterations=${KIT_NNUNET_ITERATIONS:-50}
mkdir -p "$work/logs"
log="$OUT/log.txt"
started=$(date +%s)

note() { echo "[kit $(($(date +%s) - started))s] $*" | tee -a "$log"; }
# run a command with its output in $work/logs/<name>.log; its last lines go to $OUT/log.txt
step() {
  local name=$1; shift
  note "$name: $*"
  echo "$name" > "$work/last_step"
  local status=0
  "$@" > "$work/logs/$name.log" 2>&1 || status=$?
  tail -n 15 "$work/logs/$name.log" | sed "s/^/  $name| /" >> "$log"
  [ "$status" = 0 ] || note "$name failed with status $status"
  return "$status"
}
wanted() {  # stage named in KIT_STAGES and (with KIT_SKIP_DONE=1) without results yet
  [[ "$stages" == *" $1 "* ]] || return 1
  [ "${KIT_SKIP_DONE:-0}" = 1 ] && [ -s "$OUT/$1.json" ] && { note "$1: results exist, skipped"; return 1; }
  return 0
}
seconds_since() { echo $(( $(date +%s) - $1 )); }

# ---------------------------------------------------------------- a. install
if [ "$rehearsal" = 1 ]; then
  python=${KIT_PYTHON:-$repo/.venv/bin/python}
  export PATH="$(dirname "$python"):$PATH"
  device=cpu
  t0=$(date +%s)
else
  python=${KIT_PYTHON:-python3}
  device=cuda
  t0=$(date +%s)
  rm -rf "$work/site" "$work/site-fallback" "$work/site-extra" "$work/project"
  tar -C "$work" -xJf "$kit/site.tar.xz"
  # site-extra/ goes to the end of sys.path: the device's own packages win, these fill what it lacks
  printf 'import sys\nsys.path.append(%s)\n' "'$work/site-extra'" > "$work/site/sitecustomize.py"
  # the project as pyproject.toml's package-dir maps it (no build step, no setuptools needed)
  mkdir -p "$work/project/nnunet_synth" "$work/project/bin"
  cp -r nnunet_synth/. "$work/project/nnunet_synth/"
  cp -r dataset_tools "$work/project/nnunet_synth/dataset_tools"
  cp -r trainers "$work/project/nnunet_synth/trainers"
  "$python" - "$work/project/bin" "$(command -v "$python")" <<'PY'
import sys, tomllib
from pathlib import Path
folder, python = Path(sys.argv[1]), sys.argv[2]
for name, target in tomllib.loads(Path("pyproject.toml").read_text())["project"]["scripts"].items():
    module, function = target.split(":")
    (folder / name).write_text(f"#!{python}\nimport sys\nfrom {module} import {function}\nsys.exit({function}())\n")
    (folder / name).chmod(0o755)
PY
  # pip wrote the packages' scripts with this machine's python in their first line
  sed -i "1s|^#!.*python.*$|#!$(command -v "$python")|" "$work"/site/bin/*
  export PYTHONPATH="$work/project:$work/site${PYTHONPATH:+:$PYTHONPATH}"
  export PATH="$work/project/bin:$work/site/bin:$PATH"
  if ! "$python" -c "import diffusers" 2> "$work/logs/diffusers_import.log"; then
    note "diffusers does not import with the device's huggingface-hub: using the kit's ($(tail -1 "$work/logs/diffusers_import.log"))"
    export PYTHONPATH="$work/project:$work/site-fallback:$work/site"
  fi
fi
step install "$python" benchmarks/gpu/kit_stages.py install "$OUT/install.json" "$(seconds_since "$t0")"
stages_py="$python benchmarks/gpu/kit_stages.py"

# nnU-Net folders in $work: the kit dataset is copied, the carried folder stays untouched
export nnUNet_raw="$work/nnUNet_raw" nnUNet_preprocessed="$work/nnUNet_preprocessed" nnUNet_results="$work/nnUNet_results"
mkdir -p "$nnUNet_raw" "$nnUNet_preprocessed" "$nnUNet_results"
[ -d "$nnUNet_raw/Dataset501_Covid19Lung" ] || cp -r "$kit/nnUNet_raw/Dataset501_Covid19Lung" "$nnUNet_raw/"
export nnUNet_extTrainer="$("$python" -m nnunet_synth.dataset_tools.trainer_dir):$repo/benchmarks/gpu/kit_trainers"
export nnUNet_n_proc_DA=${nnUNet_n_proc_DA:-$([ "$rehearsal" = 1 ] && echo 0 || echo 12)}
# processes nnU-Net spawns for exporting predictions (default 8: each imports torch and nnU-Net again)
export nnUNet_def_n_proc=${nnUNet_def_n_proc:-$([ "$rehearsal" = 1 ] && echo 1 || echo 8)}
# nnU-Net compiles its network by default on CUDA (a minute per run): off, alike for all its runs here
export nnUNet_compile=${nnUNet_compile:-f}
dataset=Dataset501_Covid19Lung
if [ "$rehearsal" = 1 ]; then
  precision=no; compile=(); train_device=(-device cpu); plans=nnUNetPlans_cpu
  smoke_generator=(--preset tiny --image-size 32 --steps 3 --batch-size 2)
  smoke_trainer=nnUNetTrainerKitSmoke_r50   # the SynthMix path with the rehearsal's budget, not 2 x 10 iterations
else
  precision=bf16; compile=(--compile); train_device=(); plans=nnUNetPlans
  smoke_generator=(--preset tiny --image-size 64 --steps 30 --batch-size 16)
  smoke_trainer=nnUNetTrainerSynthMix_debug
fi

preprocess() {  # plans and preprocessed data (once)
  [ -f "$nnUNet_preprocessed/$dataset/$plans.json" ] && return 0
  # nnU-Net 2.8.1's planner needs nnUNet_n_proc_DA > 0
  step plan_and_preprocess env nnUNet_n_proc_DA=2 nnUNetv2_plan_and_preprocess -d 501 -c 2d -np "$([ "$rehearsal" = 1 ] && echo 1 || echo 8)" -npfp "$([ "$rehearsal" = 1 ] && echo 1 || echo 8)"
  if [ "$rehearsal" = 1 ]; then
    "$python" -c "from nnunet_synth.evaluation.cpu_plans import write_cpu_plans; write_cpu_plans('$nnUNet_preprocessed/$dataset')"
  fi
}

# ---------------------------------------------------------------- b-d. the stages
stage_smoke() {
  local t0 compiled=true
  t0=$(date +%s)
  local accelerate_device=(); [ "$rehearsal" = 1 ] && accelerate_device=(--cpu)
  local launch=("$python" -m accelerate.commands.launch "${accelerate_device[@]}" --num_processes 1 --num_machines 1
                --mixed_precision "$precision" --dynamo_backend no -m nnunet_synth.dataset_tools.train_generator
                $dataset --fold 0 "${smoke_generator[@]}" --mixed-precision "$precision" --checkpoint-every 10
                --preview-every 1000 --preview-inference-steps 5 --output "$work/smoke_generator" --no-progress)
  if [ ${#compile[@]} = 0 ]; then
    compiled=false
    step smoke_train "${launch[@]}"
  elif ! step smoke_train "${launch[@]}" "${compile[@]}"; then
    compiled=false   # torch.compile failed: the log says why; the rest of the kit runs without it
    rm -rf "$work/smoke_generator"
    step smoke_train_without_compile "${launch[@]}"
  fi
  $stages_py merge "$json.partial" generator_training "{\"seconds\": $(seconds_since "$t0"), \"precision\": \"$precision\", \"compile\": $compiled, \"compile_requested\": $([ ${#compile[@]} = 0 ] && echo false || echo true), \"args\": \"${smoke_generator[*]}\"}"
  step smoke_sampling $stages_py sampling "$work/smoke_generator" $dataset "$json.partial" --device $device
  preprocess
  t0=$(date +%s)
  step smoke_generate nnsynth_generate $dataset --generator "$work/smoke_generator/final" -n 16 --inference-steps 10 \
      --device $device --overwrite
  # the smoke generator's 30 steps draw no case the model-free gate passes: the SynthMix path without the filter
  step smoke_nnunet env nnsynth_min_quality=none nnUNetv2_train $dataset 2d 0 -tr $smoke_trainer -p $plans \
      "${train_device[@]}"
  local fold="$nnUNet_results/$dataset/${smoke_trainer}__${plans}__2d/fold_0"
  $stages_py merge "$json.partial" nnunet_debug "{\"seconds\": $(seconds_since "$t0"), \"trainer\": \"$smoke_trainer\", \"plans\": \"$plans\", \"dice\": $($stages_py dice "$fold"), \"synthmix\": $(cat "$fold/synthmix.json")}"
}

stage_throughput() {
  local tiny default preset args_name
  if [ "$rehearsal" = 1 ]; then
    tiny=(--image-size 32 --batch-size 2 --steps 1 --warmup 1 --sample-count 2 --inference-steps 2)
    default=(--image-size 32 --batch-size 1 --steps 1 --warmup 1 --sample-count 0)
  else
    tiny=(--steps 30 --warmup 5)
    default=(--batch-size 16 --steps 10 --warmup 3 --max-batch-gib 24 --sample-count 16)
  fi
  for preset in tiny default; do
    args_name="${preset}[@]"
    local benchmark=("$python" benchmarks/generator_throughput.py --preset $preset --device $device
                     --precision $precision --dataset "$nnUNet_raw/$dataset" "${!args_name}"
                     --json "$work/throughput_$preset.json")
    if [ ${#compile[@]} = 0 ]; then
      step "throughput_$preset" "${benchmark[@]}"
    elif ! step "throughput_$preset" "${benchmark[@]}" "${compile[@]}"; then
      step "throughput_${preset}_without_compile" "${benchmark[@]}"   # figures then say "compile": false
    fi
    $stages_py merge "$json.partial" $preset "@$work/throughput_$preset.json"
  done
}

stage_evidence() {
  local generator calibration max_steps inference fidelity gate steps t0 trainer fold
  if [ "$rehearsal" = 1 ]; then
    generator=(--preset tiny --image-size 32 --batch-size 2); calibration=(4 2); max_steps=3
    inference=(--inference-steps 2 -n 8); fidelity=(--seeds 0 --max-slices 2 --samplers unipc:2)
    gate=(env nnsynth_min_quality=none)    # a 3-step model's lesions fail the gate; the GPU run keeps the default
  else
    # the GPU preset's network with 128 px crops: the kit's slices are 128 px (the preset's 160 px crops would be padding)
    generator=(--preset default --image-size 128 --batch-size 32); calibration=(30 10); max_steps=100000
    inference=(-r 0.5 --batch-size 64)
    fidelity=(--seeds 0 --max-slices 64 --samplers ddim:50 dpmsolver++:10 dpmsolver++:20 unipc:10 unipc:20)
    gate=()
  fi
  preprocess
  # seconds per step of the inpainting generator: the time between the first and last checkpoint of a short run
  # (start-up and data loading left out), then as many steps as the time budget holds
  step evidence_calibrate nnsynth_train_generator $dataset --fold 0 --mode inpaint "${generator[@]}" \
      --steps "${calibration[0]}" --checkpoint-every "${calibration[1]}" --keep-checkpoints 10 --preview-every 1000000 \
      --mixed-precision "$precision" --output "$work/calibration_generator" --no-progress
  steps=$("$python" -c "
import json
from pathlib import Path
done = sorted((json.loads(f.read_text())['trained_steps'], f.stat().st_mtime)
              for f in Path('$work/calibration_generator/checkpoints').glob('checkpoint_*/generator_config.json'))
per_step = (done[-1][1] - done[0][1]) / (done[-1][0] - done[0][0])
print(max(2, min($max_steps, int($generator_seconds / max(per_step, 1e-3)))))")
  t0=$(date +%s)
  step evidence_generator nnsynth_train_generator $dataset --fold 0 --mode inpaint "${generator[@]}" --steps "$steps" \
      --mixed-precision "$precision" --checkpoint-every "$steps" --preview-every "$steps" \
      --preview-inference-steps 10 --output "$work/evidence_generator" --no-progress
  $stages_py merge "$json.partial" generator "{\"steps\": $steps, \"seconds\": $(seconds_since "$t0"), \"budget_seconds\": $generator_seconds, \"args\": \"--mode inpaint ${generator[*]}\", \"ablation\": \"cbmat\"}"
  t0=$(date +%s)
  step evidence_generate nnsynth_generate $dataset --image-source inpaint --generator "$work/evidence_generator/final" \
      --fold 0 "${inference[@]}" --device $device --overwrite
  cp "$nnUNet_raw/$dataset/synthetic_preview_fold0.png" "$OUT/synthetic_preview.png"
  $stages_py merge "$json.partial" generation "{\"seconds\": $(seconds_since "$t0"), \"cases\": $("$python" -c "import json; print(len(json.load(open('$nnUNet_raw/$dataset/synthetic.json'))['cases']))"), \"model_free_passed\": $("$python" -c "import json; print(sum(bool(c.get('quality', {}).get('model_free', {}).get('passed')) for c in json.load(open('$nnUNet_raw/$dataset/synthetic.json'))['cases'].values()))"), \"args\": \"--image-source inpaint ${inference[*]}\"}"
  for trainer in nnUNetTrainerKit_r0 nnUNetTrainerKit_r50; do
    t0=$(date +%s)
    step "evidence_$trainer" "${gate[@]}" nnUNetv2_train $dataset 2d 0 -tr $trainer -p $plans "${train_device[@]}"
    fold="$nnUNet_results/$dataset/${trainer}__${plans}__2d/fold_0"
    $stages_py merge "$json.partial" "$trainer" "{\"seconds\": $(seconds_since "$t0"), \"plans\": \"$plans\", \"epochs\": $nnsynth_kit_epochs, \"iterations_per_epoch\": $nnsynth_kit_iterations, \"nnUNet_compile\": \"$nnUNet_compile\", \"dice\": $($stages_py dice "$fold"), \"synthmix\": $(cat "$fold/synthmix.json")}"
  done
  # lesion-region fidelity: held-out lesions erased and filled again, per sampler, against copy-paste
  step evidence_fidelity nnsynth_evaluate fidelity $dataset --inpaint-generator "$work/evidence_generator" \
      "${fidelity[@]}" --device $device -o "$work/evaluation"
  cp "$work/evaluation/lesion_fidelity_preview.png" "$OUT/fidelity_preview.png"
  $stages_py merge "$json.partial" fidelity "@$work/evaluation/lesion_fidelity.json"
}

# A stage that fails keeps what it measured: $OUT/<stage>.json then holds "failed" (the step and its log tail is in
# log.txt), and the next stages still run.
run_stage() {
  local name=$1 status
  wanted "$name" || return 0
  json="$OUT/$name.json"
  rm -f "$json.partial"
  set +e
  (set -e; "stage_$name")
  status=$?
  set -e
  if [ "$status" != 0 ]; then
    $stages_py merge "$json.partial" failed "{\"step\": \"$(cat "$work/last_step")\", \"status\": $status}"
    note "$name: failed in step $(cat "$work/last_step")"
  fi
  mv "$json.partial" "$json"
  note "$name: $json"
  return "$status"
}

failures=0
for stage in smoke throughput evidence; do
  run_stage $stage || failures=$((failures + 1))
done
note "done ($failures stage(s) failed)"
[ "$failures" = 0 ]
