"""nnsynth_evaluate on the small real example with tiny budgets: fidelity numbers against scikit-image / numpy,
the downstream arms with stock nnU-Net runs and Dice recomputed from the prediction files, and the report."""
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import run_entry_point
from scipy.linalg import sqrtm
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from nnunet_synth.dataset import ImageWindows, RawDataset
from nnunet_synth.dataset_tools import evaluate as evaluate_command
from nnunet_synth.evaluation.fidelity import FidelitySettings, evaluate_generator_fidelity
from nnunet_synth.generator import TrainingSettings
from nnunet_synth.generator.training import train_generator
from nnunet_synth.nnunet_paths import nnunet_folder

BIN = Path(sys.executable).parent
DATASET_ID = 987


def one_thread_environment():
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def evaluation_dataset(nnunet_folders):
    from conftest import convert_example_subset
    return RawDataset(convert_example_subset(nnunet_folders["nnUNet_raw"], DATASET_ID, "EvaluateExample"))


@pytest.fixture(scope="module")
def generators(evaluation_dataset, tmp_path_factory):
    """Tiny cbmat and mat generators (32x32, a few steps) on fold 0; name -> run folder."""
    root = tmp_path_factory.mktemp("evaluation_generators")
    folders = {}
    for mode in ("cbmat", "mat"):
        settings = TrainingSettings(preset="tiny", image_size=32, batch_size=4, max_steps=3, warmup_steps=1,
                                    checkpoint_every=100, preview_every=100, preview_inference_steps=2,
                                    ablation_mode=mode)
        train_generator(evaluation_dataset, root / mode, settings, fold=0, progress=False)
        folders[mode] = root / mode
    return folders


def test_fidelity_numbers_agree_with_scikit_image_and_numpy(evaluation_dataset, generators):
    settings = FidelitySettings(seeds=(0, 1), num_inference_steps=3, max_slices=3)
    result = evaluate_generator_fidelity(evaluation_dataset, generators["cbmat"], settings)
    summary, rows = result["summary"], result["rows"]
    assert summary["slices"] == 3 and len(rows) == 6
    # held out = fold 0's validation case, never seen by the generator
    assert {row["case_id"] for row in rows} == set(summary["held_out_cases"])
    assert not set(summary["held_out_cases"]) & set(json.loads(
        (Path(generators["cbmat"]) / "final" / "generator_config.json").read_text())["training_cases"])
    for index, row in enumerate(rows[:3]):                          # seed 0
        # one channel: (S, S) slices
        real, synthetic = result["real"][index][0], result["synthetic"][index][0]
        label_map = result["label_maps"][index]
        assert row["psnr"] == pytest.approx(peak_signal_noise_ratio(real, synthetic, data_range=2.0), abs=1e-3)
        ssim = structural_similarity(real, synthetic, data_range=2.0, gaussian_weights=True, sigma=1.5,
                                     use_sample_covariance=False)
        assert row["ssim"] == pytest.approx(ssim, abs=0.02)
        region = label_map > 0
        mse = np.mean((real[region] - synthetic[region]) ** 2)
        assert row["psnr_region"] == pytest.approx(10 * np.log10(4.0 / mse), abs=1e-3)
    # W1 between equal-size samples is the mean distance of the sorted values
    window = ImageWindows.from_dict(json.loads(
        (Path(generators["cbmat"]) / "final" / "generator_config.json").read_text())["window"]).channels[0]
    real_all = np.concatenate([result["real"][:, 0]] * 2)
    labels_all = np.concatenate([result["label_maps"]] * 2)
    for value, distance in summary["class_intensity_w1"].items():
        a = np.sort(real_all[labels_all == value])
        b = np.sort(result["synthetic"][:, 0][labels_all == value])
        assert distance == pytest.approx(np.mean(np.abs(a - b)) * (window.upper - window.lower) / 2, rel=1e-4)


def test_fidelity_command_compares_ablation_modes_and_writes_the_report(evaluation_dataset, generators, tmp_path):
    command = [str(BIN / "nnsynth_evaluate"), "fidelity", str(DATASET_ID), "-o", str(tmp_path),
               "--generator", f"cbmat={generators['cbmat']}", "--generator", f"mat={generators['mat']}",
               "--seeds", "0", "--max-slices", "2", "--inference-steps", "3", "--device", "cpu"]
    result = subprocess.run(command, capture_output=True, text=True, env=one_thread_environment(), timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    fidelity = json.loads((tmp_path / "fidelity.json").read_text())
    assert list(fidelity["generators"]) == ["cbmat", "mat"]
    assert fidelity["generators"]["mat"]["ablation_mode"] == "mat"
    report = (tmp_path / "report.md").read_text()
    assert "## Fidelity" in report and "| cbmat | cbmat |" in report and "| mat | mat |" in report
    assert "nnsynth_evaluate fidelity" in report and (tmp_path / "fidelity_preview.png").stat().st_size > 0


def test_a_generator_trained_on_every_case_is_refused_for_fidelity(evaluation_dataset, tmp_path, capsys):
    settings = TrainingSettings(preset="tiny", image_size=32, batch_size=2, max_steps=1, warmup_steps=0,
                                checkpoint_every=100, preview_every=100, preview_inference_steps=1)
    train_generator(evaluation_dataset, tmp_path / "all", settings, fold="all", progress=False)
    code, _, error = run_entry_point(evaluate_command.main, ["fidelity", DATASET_ID, "-o", tmp_path / "out",
                                                             "--generator", f"all={tmp_path / 'all'}",
                                                             "--inference-steps", "2"], capsys)
    assert code == 2
    assert error.count("\n") == 1 and "held-out" in error and "--fold 0" in error


def dice(prediction, reference, value):
    predicted, expected = prediction == value, reference == value
    total = predicted.sum() + expected.sum()
    return 2.0 * (predicted & expected).sum() / total if total else float("nan")


@pytest.mark.slow
def test_downstream_arms_run_stock_nnunet_and_their_dice_is_recomputed(evaluation_dataset, generators, nnunet_folders,
                                                                        tmp_path):
    output = tmp_path / "evaluation"
    real_before = {p.name: p.read_bytes() for p in sorted((evaluation_dataset.folder / "labelsTr").iterdir())}
    command = [str(BIN / "nnsynth_evaluate"), "downstream", str(DATASET_ID), "-o", str(output),
               "--generator", f"cbmat={generators['cbmat']}",
               "--budget", "smoke", "--plans", "cpu", "--inference-steps", "3", "--first-id", "710", "--device", "cpu"]
    env = {**one_thread_environment(), "nnUNet_n_proc_DA": "0"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=1500)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    with open(output / "downstream.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [(row["arm"], float(row["ratio"])) for row in rows] == [("real_only", 0.0), ("cbmat", 0.5)]
    assert (output / "downstream.png").stat().st_size > 0
    report = (output / "report.md").read_text()
    assert "## Downstream" in report and "```\nnnsynth_evaluate downstream" in report
    # the synthetic arm's preview grid is in the report
    assert "![synthetic_preview_cbmat_x1.png]" in report and (output / "synthetic_preview_cbmat_x1.png").is_file()
    # the user's dataset is untouched; the arms are copies with their own synthetic stores
    assert {p.name: p.read_bytes() for p in sorted((evaluation_dataset.folder / "labelsTr").iterdir())} == real_before
    assert not (evaluation_dataset.folder / "imagesSynth").exists()
    raw = nnunet_folders["nnUNet_raw"]
    assert not list(raw.glob("Dataset710_*/imagesSynth"))
    assert len(list(next(raw.glob("Dataset711_*")).glob("imagesSynth/*"))) == 31   # 1 x fold 0's 31 real slices
    # Dice recomputed from the prediction files
    for row in rows:
        label = "real_only" if row["arm"] == "real_only" else f"{row['arm']}_x1"
        predictions = sorted((output / "runs" / "all" / label / "repeat0" / "predictions").glob("*.nii.gz"))
        assert len(predictions) == 1
        prediction = sitk.GetArrayFromImage(sitk.ReadImage(str(predictions[0])))
        reference = sitk.GetArrayFromImage(sitk.ReadImage(str(evaluation_dataset.folder / "labelsTr" /
                                                              predictions[0].name)))
        for name, value in evaluation_dataset.labels.items():
            if value and not np.isnan(dice(prediction, reference, value)):
                assert float(row[f"dice_{name}"]) == pytest.approx(dice(prediction, reference, value), abs=1e-3)

    # the real-only arm's model is the feature network of the fidelity feature distance
    from nnunet_synth.evaluation.features import FeatureDistance
    model = nnunet_folders["nnUNet_results"] / next(raw.glob("Dataset710_*")).name / \
        "nnUNetTrainerSynthMix_smoke__nnUNetPlans_cpu__2d"
    features = FeatureDistance(model, fold=0)
    dataset = RawDataset(next(raw.glob("Dataset710_*")))
    # (N, 1, H, W): slices with their one channel
    images = np.concatenate([dataset.read_case(case_id)[0][:, :, ::4, ::4].transpose(1, 0, 2, 3)
                             for case_id in dataset.case_ids[:3]])
    real, other = images[: len(images) // 2].astype(np.float32), images[len(images) // 2:].astype(np.float32)
    assert features.distance(real, real) == pytest.approx(0.0, abs=1e-3)
    # independent Frechet distance from the same features with scipy
    import torch
    with torch.no_grad():
        f_real = features.extractor(features.normalise(real)).numpy()
        f_other = features.extractor(features.normalise(other)).numpy()
    mu1, mu2 = f_real.mean(0), f_other.mean(0)
    s1, s2 = np.cov(f_real, rowvar=False), np.cov(f_other, rowvar=False)
    expected = float(np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * np.real(sqrtm(s1 @ s2))))
    assert features.distance(real, other) == pytest.approx(expected, rel=0.02, abs=1e-3)


def test_downstream_refuses_a_generator_of_another_fold_before_training(evaluation_dataset, generators, tmp_path,
                                                                       capsys):
    """A fold-0 generator saw fold 1's validation case: evaluating fold 1 with it would leak that case."""
    code, _, error = run_entry_point(evaluate_command.main, [
        "downstream", DATASET_ID, "-o", tmp_path, "--generator", f"cbmat={generators['cbmat']}", "--fold", "1",
        "--first-id", "720", "--device", "cpu"], capsys)
    assert code == 2
    assert error.count("\n") == 1 and "fold 1's validation case" in error
    assert not list(nnunet_folder("nnUNet_raw").glob("Dataset720_*"))      # nothing copied or trained
