#!/bin/bash
# Merge the real8 stream (run in parallel into exp/eval8) into exp/eval and resume the full command, which finds
# every run finished and writes patients.json, downstream.csv, summary.csv/md, downstream.png and report.md.
set -e
cd "$(dirname "$0")/../../.."   # the repository root; outputs go to exp/ (ignored by git)
.venv/bin/python - <<'PY'
import numpy as np, SimpleITK as sitk
from pathlib import Path
a, b = sorted(Path("exp/eval/test_set").rglob("*.nii.gz")), sorted(Path("exp/eval8/test_set").rglob("*.nii.gz"))
assert [p.relative_to("exp/eval") for p in a] == [p.relative_to("exp/eval8") for p in b]
for x, y in zip(a, b):
    assert np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(x))), sitk.GetArrayFromImage(sitk.ReadImage(str(y))))
print(f"test sets identical: {len(a)} files")
PY
mkdir -p exp/eval/runs exp/eval/generators
cp -rn exp/eval8/runs/real8 exp/eval/runs/
cp -rn exp/eval8/generators/real8_* exp/eval/generators/
docs/results/downstream-cpu-k4-k8/run_experiment.sh
