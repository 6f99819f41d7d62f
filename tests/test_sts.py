"""The soft-tissue sarcoma CT (3D, Hounsfield units, one binary tumour label, no host class): the converter
(geometry, voxels and labels of the source, nnU-Net's integrity check, one-line refusals), whole volumes with 3D
tumours added by copy-paste and by inpainting, and 3d_fullres training with nnUNetTrainerSynthMix (the
copy-paste volumes mixed in) and nnUNetTrainerLesionPaste (3D donors of the training patients)."""
import hashlib
import json
import shutil
import subprocess

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import STS_CASES, STS_HEALTHY, STS_HEALTHY_SLICES, STS_SOURCE, run_entry_point
from sampled_fingerprint import write_sampled_fingerprint
from test_volumes import BIN, channels_beside_target, check_whole_volumes, environment, inpaint_fold_one, read, run

from nnunet_synth.atomic import TEMP_PREFIX
from nnunet_synth.dataset import RawDataset
from nnunet_synth.dataset.splits import fold_validation_cases
from nnunet_synth.writer.synthetic_store import SyntheticStore

STS_ID = 550
CPU_PATCH_SIZE = (32, 48, 48)


def source_digests(patients):
    return {path: hashlib.sha256(path.read_bytes()).hexdigest()
            for patient in patients for path in sorted((STS_SOURCE / patient).iterdir())}


# ------------------------------------------------------------------------------------------- the converter
def test_the_converted_volumes_are_the_sources_averaged_in_plane_on_the_sources_grid(sts_dataset_folder):
    dataset = RawDataset(sts_dataset_folder)
    case_ids = ["sts_" + patient.removeprefix("STS_") for patient in STS_CASES]
    healthy = "sts_" + STS_HEALTHY.removeprefix("STS_")
    assert dataset.case_ids == sorted([*case_ids, healthy])
    dataset_json = json.loads((sts_dataset_folder / "dataset.json").read_text())
    assert dataset_json["channel_names"] == {"0": "CT"} and dataset_json["labels"] == {"background": 0, "tumour": 1}
    assert dataset_json["numTraining"] == len(STS_CASES) + 1 and dataset_json["file_ending"] == ".nii.gz"
    healthy_image, healthy_label = (read(sts_dataset_folder / folder / name)[0] for folder, name in
                                    (("imagesTr", f"{healthy}_0000.nii.gz"), ("labelsTr", f"{healthy}.nii.gz")))
    assert healthy_image.shape[0] == STS_HEALTHY_SLICES and not healthy_label.any()      # the lesion-free case
    for patient, case_id in zip(STS_CASES, case_ids):
        source_image, source_header = read(STS_SOURCE / patient / "CT.nii.gz")
        source_mask, _ = read(STS_SOURCE / patient / "GTV.nii.gz")
        image, header = read(sts_dataset_folder / "imagesTr" / f"{case_id}_0000.nii.gz")
        label, label_header = read(sts_dataset_folder / "labelsTr" / f"{case_id}.nii.gz")
        z, y, x = image.shape
        assert (z, 2 * y, 2 * x) == (source_image.shape[0], *(2 * (np.array(source_image.shape[1:]) // 2)))
        # each voxel the mean HU of its 2 x 2 in-plane block, still float32 HU (air -1000, bone above 300)
        blocks = source_image[:, :2 * y, :2 * x].reshape(z, y, 2, x, 2)
        assert image.dtype == np.float32 and np.allclose(image, blocks.mean(axis=(2, 4)), atol=1e-3)
        assert image.min() <= -900 and image.max() > 300
        # the tumour is the blocks at least half tumour
        assert set(np.unique(label)) == {0, 1} and label.dtype == np.uint8
        fraction = source_mask[:, :2 * y, :2 * x].reshape(z, y, 2, x, 2).mean(axis=(2, 4))
        assert np.array_equal(label, (fraction >= 0.5).astype(np.uint8))
        # the source's grid: spacing twice in-plane, the origin moved to the first block's centre, same axes
        expected_spacing = np.array(source_header.GetSpacing()) * [2, 2, 1]
        direction = np.array(source_header.GetDirection()).reshape(3, 3)
        expected_origin = np.array(source_header.GetOrigin()) + direction @ (np.array(source_header.GetSpacing())
                                                                             * [0.5, 0.5, 0])
        for written in (header, label_header):
            assert np.allclose(written.GetSpacing(), expected_spacing, atol=1e-6)
            assert np.allclose(written.GetOrigin(), expected_origin, atol=1e-4)
            assert written.GetDirection() == source_header.GetDirection()
    assert not [path for path in sts_dataset_folder.parent.iterdir() if path.name.startswith(TEMP_PREFIX)]


def test_nnunets_integrity_check_accepts_the_converted_dataset(sts_dataset_folder):
    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity
    # the function nnUNetv2_plan_and_preprocess --verify_dataset_integrity runs (the stock command runs with it
    # before the 3d_fullres trainings)
    verify_dataset_integrity(str(sts_dataset_folder), num_processes=1)          # raises on a bad dataset


def test_the_command_copies_a_full_resolution_patient_bit_for_bit_and_leaves_the_source_alone(tmp_path, capsys):
    from nnunet_synth.dataset_tools.convert_sts_ct import main
    before = source_digests(["STS_019"])
    code, out, err = run_entry_point(main, [STS_SOURCE, "-o", tmp_path, "-d", 551, "--cases", "sts_019"], capsys)
    assert code == 0, err
    assert "tumour voxels per case: {'sts_019': " in out and "Dataset551_STSCT" in out
    folder = tmp_path / "Dataset551_STSCT"
    for source_name, written_file in (("CT.nii.gz", "imagesTr/sts_019_0000.nii.gz"),
                                      ("GTV.nii.gz", "labelsTr/sts_019.nii.gz")):
        source, source_header = read(STS_SOURCE / "STS_019" / source_name)
        written, header = read(folder / written_file)
        assert written.dtype == source.dtype and np.array_equal(written, source)
        for name in ("GetSpacing", "GetOrigin", "GetDirection"):
            assert getattr(header, name)() == getattr(source_header, name)()
    # a rerun is refused (the dataset exists); with --overwrite it writes the dataset again, whole: here the first
    # patient of the folder, which replaces sts_019
    code, _, err = run_entry_point(main, [STS_SOURCE, "-o", tmp_path, "-d", 551, "--max-cases", 1], capsys)
    assert code == 2 and err.startswith(f"nnsynth: error: {folder}: dataset id 551 already exists") \
        and "--overwrite" in err, err
    assert sorted(path.name for path in (folder / "labelsTr").iterdir()) == ["sts_019.nii.gz"]
    code, _, err = run_entry_point(main, [STS_SOURCE, "-o", tmp_path, "-d", 551, "--max-cases", 1, "--overwrite"],
                                   capsys)
    assert code == 0, err
    assert sorted(path.name for path in (folder / "labelsTr").iterdir()) == ["sts_004.nii.gz"]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["Dataset551_STSCT"]
    assert source_digests(["STS_019"]) == before


@pytest.mark.parametrize("problem", ["missing mask", "mask on another grid", "unknown case"])
def test_bad_source_input_is_refused_in_one_line_before_anything_is_written(problem, tmp_path, capsys):
    from nnunet_synth.dataset_tools.convert_sts_ct import main
    source = tmp_path / "source"
    source.mkdir()
    for patient in ("STS_008", "STS_019"):           # copies of real patients, one of them made faulty
        shutil.copytree(STS_SOURCE / patient, source / patient)
        (source / patient).chmod(0o755)
    cases, broken = ["sts_008", "sts_019"], source / "STS_019" / "GTV.nii.gz"
    if problem == "missing mask":
        broken.chmod(0o644)
        broken.unlink()
        expected = f"{broken} is missing: each STS_xxx folder needs CT.nii.gz and GTV.nii.gz"
    elif problem == "mask on another grid":
        broken.chmod(0o644)
        sitk.WriteImage(sitk.BinShrink(sitk.ReadImage(str(broken)), [2, 2, 1]), str(broken), True)
        expected = f"{broken}: size (68, 67, 47) differs from CT.nii.gz's (136, 134, 47): the mask must share"
    else:
        cases.append("sts_999")
        expected = f"{source}: no case sts_999: pick from sts_008, sts_019"
    output = tmp_path / "raw"
    code, out, err = run_entry_point(main, [source, "-o", output, "--cases", *cases], capsys)
    assert code == 2 and err.startswith(f"nnsynth: error: {expected}") and err.count("\n") == 1, err
    assert not output.exists()


# ------------------------------------------------------------------------------------------- copy-paste volumes
@pytest.fixture(scope="module")
def sts_generated(sts_dataset_folder):
    """``nnsynth_generate 550 --image-source copy-paste`` (fold 0, the default ratio)."""
    real_before = {path.name: path.read_bytes() for path in sorted(sts_dataset_folder.rglob("*Tr/*"))}
    result = run([BIN / "nnsynth_generate", sts_dataset_folder, "--image-source", "copy-paste"])
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    return RawDataset(sts_dataset_folder), result, real_before


def test_copy_paste_adds_3d_tumours_to_whole_real_volumes_and_the_tumour_voxels_go_up(sts_generated):
    dataset, result, real_before = sts_generated
    store = SyntheticStore(dataset)
    fold_record = store.manifest["folds"]["0"]
    assert fold_record["settings"]["unit"] == "volume"
    case_ids = check_whole_volumes(dataset, store)      # whole volumes, real voxels outside the feathered pastes
    assert len(case_ids) >= 1 and f"fold 0: {len(case_ids)} synthetic cases" in result.stdout
    validation = set(fold_validation_cases(dataset, 0))
    real_tumour = synthetic_tumour = 0
    for case_id in case_ids:
        entry = store.cases[case_id]
        assert entry["source"]["target"]["slice_index"] is None and not set(entry["source_cases"]) & validation
        for paste in entry["source"]["pastes"]:
            bbox = paste["donor"]["bbox"]                 # a 3D component: several slices, of a training patient
            assert len(bbox) == 6 and bbox[3] - bbox[0] > 1 and paste["donor"]["slice_index"] is None
            assert paste["donor"]["case_id"] not in validation
        label, _ = read(store.label_file(case_id))
        target_label, _ = read(dataset.cases[entry["source"]["target"]["case_id"]]["label"])
        assert np.unique(np.nonzero(label != target_label)[0]).size > 1          # tumour added on several slices
        real_tumour, synthetic_tumour = real_tumour + int(target_label.sum()), synthetic_tumour + int(label.sum())
    assert synthetic_tumour >= 1.5 * real_tumour, (synthetic_tumour, real_tumour)
    report = fold_record["label_map_report"]
    assert report["shares_after"]["1"] > report["shares_before"]["1"]
    image, _ = read(store.image_file(case_ids[0]))
    assert image.dtype == np.float32 and image.min() <= -900                    # still Hounsfield units
    assert (dataset.folder / "synthetic_preview_fold0.png").is_file()
    assert {path.name: path.read_bytes() for path in sorted(dataset.folder.rglob("*Tr/*"))} == real_before


# ------------------------------------------------------------------------------------------- inpainted volumes
@pytest.fixture(scope="module")
def sts_inpainted(sts_generated, tmp_path_factory):
    """Fold 1 beside fold 0's copy-paste volumes: a tiny inpainting generator (3 steps, 32 px crops) trained on
    fold 1's training patients, then ``nnsynth_generate 550 --image-source inpaint --fold 1 -n 1``."""
    return inpaint_fold_one(sts_generated, tmp_path_factory.mktemp("sts_inpaint"))


def test_inpaint_draws_3d_tumours_into_whole_hu_volumes_with_the_real_voxels_outside_the_edit(sts_inpainted):
    from nnunet_synth.sampling.inpaint import volume_edit_region
    dataset, generator, result, real_before = sts_inpainted
    store = SyntheticStore(dataset)
    assert store.manifest["folds"]["1"]["settings"]["unit"] == "volume"
    (case_id,) = store.complete_case_ids("1")
    entry = store.cases[case_id]
    assert entry["inpaint"]["unit"] == "volume"
    assert not set(entry["source_cases"]) & set(fold_validation_cases(dataset, 1))
    target = dataset.cases[entry["source"]["target"]["case_id"]]
    label, label_image = read(store.label_file(case_id))
    target_label, _ = read(target["label"])
    assert label.shape == target_label.shape and label.shape[0] > 1
    pasted = entry["source"]["pasted_pixels_per_class"]["1"]
    assert pasted > 0 and int(label.sum()) == int(target_label.sum()) + pasted
    assert np.unique(np.nonzero(label != target_label)[0]).size > 1             # a 3D tumour, not one slice
    edit = volume_edit_region(target_label, label, generator.config.training["edit_margin"])
    assert int(edit.sum()) == entry["inpaint"]["edit_voxels"]
    ((image, target_image),) = channels_beside_target(store, case_id, target, label_image)
    assert image.dtype == np.float32
    assert np.array_equal(image[~edit], target_image[~edit]) and not np.array_equal(image[edit], target_image[edit])
    assert {path.name: path.read_bytes() for path in sorted(dataset.folder.rglob("*Tr/*"))} == real_before


# ------------------------------------------------------------------------------------------- 3d_fullres training
@pytest.fixture(scope="module")
def sts_planned_3d(sts_generated, nnunet_folders):
    """Dataset550 checked, planned and preprocessed by the stock command for 3d_fullres (sampled fingerprint), with
    the small CPU plans (nnUNetPlans_cpu); its preprocessed folder."""
    from nnunet_synth.evaluation.cpu_plans import write_cpu_plans
    dataset, _, _ = sts_generated
    planning = {name: value for name, value in environment().items() if name != "nnUNet_n_proc_DA"}
    write_sampled_fingerprint(STS_ID, planning)
    result = subprocess.run(["nnUNetv2_plan_and_preprocess", "-d", str(STS_ID), "-c", "3d_fullres", "-np", "1",
                             "-npfp", "1", "--verify_dataset_integrity"], capture_output=True, text=True, env=planning,
                            timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    preprocessed = nnunet_folders["nnUNet_preprocessed"] / dataset.name
    plans_file = write_cpu_plans(preprocessed, "3d_fullres")
    # nnU-Net plans a patch of about the whole volume here (56 x 80 x 80); a quarter of it (divisible by the
    # network's strides) trains and predicts 3D patches as well, several times faster on a CPU
    plans = json.loads(plans_file.read_text())
    plans["configurations"]["3d_fullres"]["patch_size"] = list(CPU_PATCH_SIZE)
    plans_file.write_text(json.dumps(plans, indent=2))
    return preprocessed


def train_3d(trainer, **extra_environment) -> dict:
    """The stock nnUNetv2_train 3d_fullres of fold 0 with the CPU plans; the environment that finds our trainers."""
    from nnunet_synth.dataset_tools.trainer_dir import trainer_directory
    trainers = {"nnUNet_extTrainer": str(trainer_directory())}
    result = run(["nnUNetv2_train", STS_ID, "3d_fullres", "0", "-tr", trainer, "-p", "nnUNetPlans_cpu", "-device",
                  "cpu"], timeout=1500, **trainers, **extra_environment)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    return trainers


@pytest.mark.slow
def test_synthmix_trains_3d_fullres_on_the_copy_paste_volumes_and_predicts_at_the_real_geometry(
        sts_generated, sts_planned_3d, nnunet_folders, tmp_path):
    """The stock nnUNetv2_train 3d_fullres with nnUNetTrainerSynthMix_smoke mixes fold 0's whole copy-paste volumes
    (preprocessed into the 3d_fullres pool) into the 3D patches; the stock nnUNetv2_predict writes a validation
    patient at its geometry. (The _debug budget's final validation predicts with 8-fold mirroring: over a minute per
    case on a CPU core; the prediction here runs without it.)"""
    from nnunet_synth.trainers.synthetic_pool import pool_folder
    dataset, _, _ = sts_generated
    trainer = "nnUNetTrainerSynthMix_smoke"
    trainers = train_3d(trainer, nnsynth_ratio="0.5")
    fold = nnunet_folders["nnUNet_results"] / dataset.name / f"{trainer}__nnUNetPlans_cpu__3d_fullres" / "fold_0"
    summary = json.loads((fold / "synthmix.json").read_text())
    assert summary["configuration"] == "3d_fullres" and summary["settings"]["ratio"] == 0.5
    assert summary["used_synthetic_cases"] == SyntheticStore(dataset).complete_case_ids("0")
    pool = pool_folder(sts_planned_3d, "nnUNetPlans_3d_fullres")
    assert summary["pool_folder"] == str(pool) and any(pool.glob("*_seg.b2nd"))
    split = json.loads((sts_planned_3d / "splits_final.json").read_text())[0]
    assert summary["exposure"]["num_real_slices"] == len(split["train"])       # 3D patches: a draw is a case
    case_id = split["val"][0]
    inputs, outputs = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    shutil.copy(dataset.cases[case_id]["images"][0], inputs)
    result = run(["nnUNetv2_predict", "-i", inputs, "-o", outputs, "-d", STS_ID, "-c", "3d_fullres", "-p",
                  "nnUNetPlans_cpu", "-tr", trainer, "-f", "0", "-device", "cpu", "-npp", "0", "-nps", "0",
                  "--disable_tta"], **trainers)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    prediction, header = read(outputs / f"{case_id}.nii.gz")
    reference, reference_header = read(dataset.cases[case_id]["label"])
    assert prediction.shape == reference.shape and set(np.unique(prediction)) <= {0, 1}
    for name in ("GetSpacing", "GetOrigin", "GetDirection"):
        assert getattr(header, name)() == getattr(reference_header, name)()


@pytest.mark.slow
def test_the_paste_trainer_trains_3d_fullres_with_3d_tumours_of_the_training_patients(sts_generated, sts_planned_3d,
                                                                                     nnunet_folders):
    """The stock nnUNetv2_train 3d_fullres with nnUNetTrainerLesionPaste_smoke (real cases only): the donors are
    whole 3D tumours of fold 0's training patients, pasted into the background inside the body."""
    dataset, _, _ = sts_generated
    trainer = "nnUNetTrainerLesionPaste_smoke"
    train_3d(trainer, nnsynth_paste_probability="1")
    fold = nnunet_folders["nnUNet_results"] / dataset.name / f"{trainer}__nnUNetPlans_cpu__3d_fullres" / "fold_0"
    summary = json.loads((fold / "synthmix.json").read_text())
    split = json.loads((sts_planned_3d / "splits_final.json").read_text())[0]
    paste = summary["lesion_paste"]
    assert summary["configuration"] == "3d_fullres" and summary["settings"]["ratio"] == 0.0
    assert paste["donor_cases"] and set(paste["donor_cases"]) <= set(split["train"])
    assert paste["donors_per_class"]["1"] > 0 and paste["host_classes"] == []     # no host class: inside the body
    counts = paste["counts"]
    assert counts["samples"] >= 10 * summary["batch_size"] and counts["samples_pasted"] > 0
    assert int(counts["pixels_added"]["1"]) > 0
    assert (fold / "checkpoint_final.pth").is_file()
