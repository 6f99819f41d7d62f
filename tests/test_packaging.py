"""The installed package claims only the `nnunet_synth` name and ships no data files; the demo runs on the generated
example by default and on real slices with --source."""
import ast
import importlib.metadata
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import COVID_SOURCE

import nnunet_synth

REPO_ROOT = Path(__file__).resolve().parents[1]
IMAGE_ENDINGS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".nii", ".nii.gz", ".nrrd", ".mha", ".mhd", ".dcm",
                 ".npy", ".npz", ".b2nd")


def test_no_generic_top_level_packages_are_installed(tmp_path):
    # from a neutral folder, so that the repository's own top-level folders are not on sys.path
    probe = ("import importlib.util as u; import nnunet_synth.trainers, nnunet_synth.dataset_tools; "
             "print(u.find_spec('trainers'), u.find_spec('dataset_tools'))")
    result = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["None", "None"]
    import nnunet_synth.dataset_tools
    import nnunet_synth.trainers
    distribution = importlib.metadata.distribution("nnunet-synth")
    top_level_modules = {str(f).split("/")[0] for f in distribution.files or [] if str(f).endswith(".py")}
    assert top_level_modules <= {"nnunet_synth"} | {m for m in top_level_modules if m.startswith("__editable__")}


def test_every_command_is_an_nnsynth_console_script():
    distribution = importlib.metadata.distribution("nnunet-synth")
    scripts = [e for e in distribution.entry_points if e.group == "console_scripts"]
    assert scripts and all(e.name.startswith("nnsynth_") for e in scripts)


def test_the_package_and_the_repository_hold_no_image_or_volume_files():
    package_files = [p for p in Path(nnunet_synth.__file__).parent.rglob("*") if p.name.endswith(IMAGE_ENDINGS)]
    assert package_files == []
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO_ROOT, capture_output=True, text=True, check=True).stdout
    # the only images under version control are figures the project made (results of its own runs)
    images = [name for name in tracked.splitlines() if name.endswith(IMAGE_ENDINGS)]
    assert images and all(name.startswith("docs/results/") for name in images), images
    assert "package-data" not in (REPO_ROOT / "pyproject.toml").read_text()


def test_demo_converts_the_generated_example_and_reruns_it_unchanged(tmp_path):
    result = subprocess.run(["nnsynth_demo", "-o", str(tmp_path), "--stop-after", "convert"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Dataset990_ChestPhantom" in result.stdout and "5 cases, 40 slices" in result.stdout
    assert "generated example (no real data)" in result.stdout
    phantom_files = {p: p.stat().st_mtime_ns for p in (tmp_path / "chest_phantom").rglob("*.png")}
    rerun = subprocess.run(["nnsynth_demo", "-o", str(tmp_path), "--stop-after", "convert"],
                           capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "chest_phantom").rglob("*.png")} == phantom_files


def test_demo_converts_a_few_patients_of_real_slices_and_refuses_another_input_in_the_same_folder(tmp_path):
    result = subprocess.run(["nnsynth_demo", "-o", str(tmp_path), "--stop-after", "convert", "--source",
                             str(COVID_SOURCE), "--patients", "2", "--slices-per-patient", "4"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Dataset991_DemoSlices" in result.stdout and "2 cases, 8 slices" in result.stdout
    assert not (tmp_path / "chest_phantom").exists()
    other = subprocess.run(["nnsynth_demo", "-o", str(tmp_path), "--stop-after", "convert"],
                           capture_output=True, text=True, timeout=600)
    assert other.returncode == 2 and "Traceback" not in other.stderr
    assert other.stderr.startswith("nnsynth: error: ") and "pass another -o" in other.stderr, other.stderr
    # a folder of an earlier demo (its dataset, no record of the input) is refused too: same id, other name
    earlier = tmp_path / "earlier"
    (earlier / "nnUNet_raw" / "Dataset990_Covid19Example").mkdir(parents=True)
    refused = subprocess.run(["nnsynth_demo", "-o", str(earlier), "--stop-after", "convert"],
                             capture_output=True, text=True, timeout=600)
    assert refused.returncode == 2 and "earlier nnsynth_demo version" in refused.stderr, refused.stderr
    assert not (earlier / "chest_phantom").exists()


@pytest.mark.slow
def test_demo_runs_the_whole_loop_with_stock_nnunet_commands(tmp_path):
    """The main job on the generated example as the README runs it, called by path, with PATH not naming the venv;
    with 150 generator steps instead of the default 300 (two of the demo's seven minutes; the defaults are timed in
    docs/demo.md). At 150 steps part of the inpainted lesions are salt-and-pepper noise, which the slice gate rejects
    (9 of 16 passed, docs/testing.md)."""
    demo = Path(sys.executable).parent / "nnsynth_demo"
    env = {"PATH": "/usr/bin:/bin", "HOME": os.environ["HOME"], "OMP_NUM_THREADS": "1", "nnsynth_cpu_threads": "1"}
    result = subprocess.run([str(demo), "-o", str(tmp_path), "--generator-steps", "150"],
                            capture_output=True, text=True, timeout=2400, env=env)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    raw = tmp_path / "nnUNet_raw" / "Dataset990_ChestPhantom"
    manifest = json.loads((raw / "synthetic.json").read_text())
    assert len(manifest["cases"]) == 16                      # half of fold 0's 32 real training slices
    assert (raw / "synthetic_preview_fold0.png").is_file() and str(raw / "synthetic_preview_fold0.png") in result.stdout
    fold = tmp_path / "nnUNet_results" / raw.name / "nnUNetTrainerSynthMix_demo__nnUNetPlans_cpu__2d" / "fold_0"
    synthmix = json.loads((fold / "synthmix.json").read_text())
    # the inpaint source by default; the trainer mixes in the cases that pass the model-free gate, and says so
    assert {case["image_source"] for case in manifest["cases"].values()} == {"inpaint"}
    passed = sorted(c for c, case in manifest["cases"].items() if case["quality"]["model_free"]["passed"])
    assert synthmix["settings"]["ratio"] == 0.5 and synthmix["settings"]["min_quality"] == 0.5
    assert synthmix["used_synthetic_cases"] == passed and len(passed) >= 0.25 * 16, len(passed)
    assert f"nnU-Net trained on {len(passed)} of 16 synthetic cases" in result.stdout
    predictions = sorted((tmp_path / "predictions").glob("*.nii.gz"))
    assert len(predictions) == 1                            # fold 0 validates one of the five patients
    dice = re.search(r"Dice per class: (\{.*\})", result.stdout)
    assert dice, result.stdout[-2000:]
    dice_per_class = ast.literal_eval(dice.group(1))
    assert dice_per_class["lung"] > 0.5, dice_per_class     # 250 iterations learn the lung
