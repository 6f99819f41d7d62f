"""Whole synthetic volumes for 3D datasets (copy-paste): the MS lesion MRI (4 channels, no host class, 3D lesions)
at half resolution and the real Hounsfield-unit CT. Each synthetic case is its target's whole volume with the
donors' voxels pasted in: the real voxels elsewhere bit for bit, the real geometry, every channel; nnU-Net's
integrity check passes on the standalone export; a killed run resumes; adjacent slices inside the pasted regions
differ as they do inside real lesions."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from resenc import RESENC_CPU_PLANS, RESENC_PLANNER, RESENC_PLANS, assert_residual_encoder_checkpoint
from sampled_fingerprint import write_sampled_fingerprint
from scipy import ndimage

from nnunet_synth.atomic import TEMP_PREFIX
from nnunet_synth.dataset import RawDataset
from nnunet_synth.dataset.native_slices import NativeVolumes, open_native_slices
from nnunet_synth.evaluation.through_plane import (
    adjacent_slice_difference,
    format_through_plane,
    through_plane_consistency,
)
from nnunet_synth.generator.inpaint_training import VOLUME_SAMPLER
from nnunet_synth.masks.pixel_paste import FEATHER_PIXELS, replay_pastes
from nnunet_synth.masks.regions import find_regions
from nnunet_synth.nnunet_paths import nnunet_folder
from nnunet_synth.trainers.synthetic_pool import pool_folder
from nnunet_synth.writer.synthetic_store import SyntheticStore

BIN = Path(sys.executable).parent
MS_SOURCE = Path(__file__).resolve().parents[2] / "shared" / "data" / "ms_lesions_3d"
MS_ID, MS_EXPORT_ID, MS_RESUME_ID, MS_REFERENCE_ID, HU_COPY_ID = 515, 516, 517, 518, 519
MS_INPAINT_EXPORT_ID, DOWNSTREAM_FIRST_ID = 520, 530
RESUME_CASES = 3


def environment():
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "nnUNet_n_proc_DA": "0",
            "nnsynth_cpu_threads": "1", "nnUNet_def_n_proc": "1"}


def run(command, timeout=900, **extra_environment):
    return subprocess.run([str(command[0]), *map(str, command[1:])], capture_output=True, text=True,
                          env={**environment(), **extra_environment}, timeout=timeout)


def read(path):
    image = sitk.ReadImage(str(path))
    return sitk.GetArrayFromImage(image), image


def copy_dataset(folder: Path, dataset_id: int, name: str) -> Path:
    """A copy of a converted dataset's real files under another id (its splits file too)."""
    target = folder.parent / f"Dataset{dataset_id:03d}_{name}"
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir()
    for part in ("imagesTr", "labelsTr", "dataset.json"):
        (shutil.copytree if (folder / part).is_dir() else shutil.copy)(folder / part, target / part)
    splits = nnunet_folder("nnUNet_preprocessed") / folder.name / "splits_final.json"
    if splits.is_file():
        (nnunet_folder("nnUNet_preprocessed") / target.name).mkdir(exist_ok=True)
        shutil.copy(splits, nnunet_folder("nnUNet_preprocessed") / target.name / "splits_final.json")
    return target


@pytest.fixture(scope="session")
def ms_volumes_dataset_folder(nnunet_folders):
    """The MS lesion MRI at half resolution (91 x 109 x 91 voxels of 2 mm, 4 channels), Dataset515, with one
    fold per patient in splits_final.json."""
    from nnunet_synth.dataset_tools.convert_ms_lesions import convert_ms_lesions
    return convert_ms_lesions(MS_SOURCE, nnunet_folders["nnUNet_raw"], MS_ID, "MSLesionsHalf", downsample=2)


@pytest.fixture(scope="module")
def ms_generated(ms_volumes_dataset_folder):
    """``nnsynth_generate 515 --image-source copy-paste -r 0.5 --export-standalone 516`` (fold 0)."""
    real_before = {path.name: path.read_bytes() for path in sorted(ms_volumes_dataset_folder.rglob("*Tr/*"))}
    result = run([BIN / "nnsynth_generate", ms_volumes_dataset_folder, "--image-source", "copy-paste", "-r", "0.5",
                  "--export-standalone", MS_EXPORT_ID])
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    return RawDataset(ms_volumes_dataset_folder), result, real_before


def channels_beside_target(store: SyntheticStore, case_id: str, target: dict, label_image):
    """(synthetic channel, target channel) arrays of every channel, after checking that each written channel and
    the label have the target's pixel type, shape, spacing, origin and direction."""
    for image_file, target_file in zip(store.image_files(case_id), target["images"]):
        image, header = read(image_file)
        target_image, target_header = read(target_file)
        assert image.dtype == target_image.dtype and image.shape == target_image.shape
        for written in (header, label_image):
            assert written.GetSpacing() == target_header.GetSpacing()
            assert written.GetOrigin() == target_header.GetOrigin()
            assert written.GetDirection() == target_header.GetDirection()
        yield image, target_image


def check_whole_volumes(dataset: RawDataset, store: SyntheticStore, fold="0"):
    """Every case of ``fold``: the target's shape, geometry and pixel type in every channel; the target's voxels
    outside the pasted region's feathered edge and outside the recorded edit box, bit for bit; the label is the
    target's plus the pasted voxels, as many as the record reports. Returns the cases checked."""
    case_ids = store.complete_case_ids(fold)
    for case_id in case_ids:
        entry = store.cases[case_id]
        assert entry["copy_paste"]["unit"] == "volume"
        target = dataset.cases[entry["source"]["target"]["case_id"]]
        label, label_image = read(store.label_file(case_id))
        target_label, _ = read(target["label"])
        assert label.shape == target_label.shape and label.shape[0] > 1            # a whole volume
        changed = label != target_label
        assert changed.any()
        pasted = entry["source"]["pasted_pixels_per_class"]
        for value in np.unique(label[changed]):
            assert int((label == value).sum()) == int((target_label == value).sum()) + pasted[str(value)]
        assert set(np.unique(target_label[changed])) == {0}                      # only background received lesion
        # the feather's reach: voxels nearer to a pasted voxel than its half-width (3D Euclidean distance)
        reach = ndimage.distance_transform_edt(~changed) - 0.5 < FEATHER_PIXELS
        outside_box = np.ones(label.shape, dtype=bool)
        box = entry["copy_paste"]["edit_box"]
        outside_box[tuple(slice(start, stop) for start, stop in zip(box[:3], box[3:]))] = False
        assert not (changed & outside_box).any()
        edited_somewhere = False
        for channel, (image, target_image) in enumerate(channels_beside_target(store, case_id, target, label_image)):
            assert np.array_equal(image[~reach], target_image[~reach]), (case_id, channel)
            assert np.array_equal(image[outside_box], target_image[outside_box]), (case_id, channel)
            edited_somewhere |= not np.array_equal(image[changed], target_image[changed])
        assert edited_somewhere                                                   # donor voxels went in
    return case_ids


def test_copy_paste_writes_whole_four_channel_volumes_with_the_real_voxels_outside_the_pastes(ms_generated):
    dataset, result, real_before = ms_generated
    store = SyntheticStore(dataset)
    fold_record = store.manifest["folds"]["0"]
    assert fold_record["settings"]["unit"] == "volume" and fold_record["settings"]["image_source"] == "copy-paste"
    assert "fold 0: 1 synthetic cases" in result.stdout          # -r 0.5 of 2 training volumes
    case_ids = check_whole_volumes(dataset, store)
    assert len(case_ids) == 1 and len(store.image_files(case_ids[0])) == 4
    entry = store.cases[case_ids[0]]
    validation = {"ms_07"}                                        # fold 0 of the converter's splits
    assert not set(entry["source_cases"]) & validation
    assert entry["source"]["target"]["slice_index"] is None
    for paste in entry["source"]["pastes"]:
        assert len(paste["donor"]["bbox"]) == 6 and paste["donor"]["case_id"] not in validation
    report = fold_record["label_map_report"]
    assert report["shares_after"]["1"] > report["shares_before"]["1"]     # the lesion share of the body rose
    assert entry["quality"]["model_free"]["scored_slices"] > 0
    assert {path.name: path.read_bytes() for path in sorted(dataset.folder.rglob("*Tr/*"))} == real_before


def test_the_standalone_export_of_the_volumes_passes_nnunets_integrity_check(ms_generated, nnunet_folders):
    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity
    export = next(nnunet_folders["nnUNet_raw"].glob(f"Dataset{MS_EXPORT_ID}_*"))
    assert len(list((export / "imagesTr").glob("synth_*"))) == 4
    # the function nnUNetv2_plan_and_preprocess --verify_dataset_integrity runs (the stock planning of 3D volumes
    # runs in the 3d_fullres tests)
    verify_dataset_integrity(str(export), num_processes=1)                         # raises on a bad dataset


def test_a_rerun_with_slices_instead_of_volumes_is_refused_in_one_line(ms_generated, capsys):
    from nnunet_synth.dataset_tools.generate import main
    dataset, _, _ = ms_generated
    with pytest.raises(SystemExit) as stop:          # the console script's entry point, in this process
        main([str(dataset.folder), "--image-source", "copy-paste", "-r", "0.5", "--unit", "slice"])
    error = capsys.readouterr().err
    assert stop.value.code == 2 and "unit" in error and "Traceback" not in error
    assert error.startswith("nnsynth: error: ") and error.count("\n") == 1


@pytest.mark.slow
def test_a_killed_volume_run_resumes_and_ends_with_the_files_of_an_uninterrupted_run(ms_volumes_dataset_folder):
    resumed_folder = copy_dataset(ms_volumes_dataset_folder, MS_RESUME_ID, "MSResume")
    reference_folder = copy_dataset(ms_volumes_dataset_folder, MS_REFERENCE_ID, "MSReference")
    command = ["--image-source", "copy-paste", "-n", RESUME_CASES, "--seed", "4"]
    reference = run([BIN / "nnsynth_generate", reference_folder, *command])
    assert reference.returncode == 0, reference.stderr[-3000:]
    process = subprocess.Popen([str(BIN / "nnsynth_generate"), str(resumed_folder), *map(str, command)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=environment())
    records, written_at_kill, deadline = resumed_folder / "recordsSynth", 0, time.time() + 600
    while time.time() < deadline and process.poll() is None:
        written_at_kill = len(list(records.glob("synth_*.json"))) if records.is_dir() else 0
        if written_at_kill >= 1:
            break
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert 1 <= written_at_kill < RESUME_CASES, f"the run was not interrupted half-way ({written_at_kill} cases)"
    rerun = run([BIN / "nnsynth_generate", resumed_folder, *command])
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"{RESUME_CASES - written_at_kill} written now, {written_at_kill} already there" in rerun.stdout
    assert not [path for path in resumed_folder.rglob("*") if path.name.startswith(TEMP_PREFIX)]

    def synthetic_files(folder):
        return {path.relative_to(folder): path.read_bytes() for folder_name in ("imagesSynth", "labelsSynth")
                for path in sorted((folder / folder_name).iterdir())}
    assert len(synthetic_files(resumed_folder)) == 5 * RESUME_CASES
    assert synthetic_files(resumed_folder) == synthetic_files(reference_folder)


def test_the_real_hu_ct_gets_whole_volumes_in_its_units_and_geometry(real_hu_dataset_folder):
    folder = copy_dataset(real_hu_dataset_folder, HU_COPY_ID, "RealHUVolumes")
    result = run([BIN / "nnsynth_generate", folder, "--image-source", "copy-paste", "-n", "2"])
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    dataset = RawDataset(folder)
    store = SyntheticStore(dataset)
    assert store.manifest["folds"]["0"]["settings"]["unit"] == "volume"
    case_ids = check_whole_volumes(dataset, store)
    assert len(case_ids) == 2
    image, _ = read(store.image_file(case_ids[0]))
    assert image.dtype == np.int16 and image.shape[0] == 6 and image.min() < -500     # Hounsfield units


def test_volumes_are_the_cases_as_nnunets_reader_gives_them(ms_volumes_dataset_folder):
    dataset = RawDataset(ms_volumes_dataset_folder)
    volumes = NativeVolumes(open_native_slices(dataset, dataset.case_ids, progress=False))
    assert volumes.map_ids == [(case_id, None) for case_id in dataset.case_ids]
    image, label_map, properties = dataset.read_case("ms_19")
    stored_image, stored_label_map = volumes.slice("ms_19")
    assert np.array_equal(stored_image, image) and np.array_equal(stored_label_map, label_map)
    assert volumes.properties["ms_19"]["spacing"] == properties["spacing"]
    assert not stored_image.flags.writeable        # shared by the cache: callers copy before they change it


def test_a_3d_shift_moves_every_channel_of_the_donor_component_exactly(ms_volumes_dataset_folder):
    """A provenance with one shift-only paste of the largest real 3D lesion of ms_19 into ms_26: where the feather
    weight is 1 (deeper than the seam inside the pasted voxels), every channel holds the donor's voxels moved by the
    offset; outside the edit box the target's."""
    dataset = RawDataset(ms_volumes_dataset_folder)
    volumes = NativeVolumes(open_native_slices(dataset, dataset.case_ids, progress=False), cache_size=2)
    donor_image, donor_map = volumes.slice("ms_19")
    donor = max(find_regions(np.asarray(donor_map), 1), key=lambda found: found.region.area)
    target_image, target_map = volumes.slice("ms_26")
    offset = [2, -3, 4]
    provenance = {"target": {"case_id": "ms_26", "slice_index": None}, "pastes": [{
        "class": 1, "operations": [{"op": "shift", "offset": offset}],
        "donor": {"case_id": "ms_19", "slice_index": None, "class": 1, "component_index": donor.component_index,
                  "bbox": donor.bbox}}]}
    replayed = replay_pastes(target_image, target_map, provenance, volumes.slice, [],
                             lambda working, _: working == 0)
    pasted = replayed.label_map != target_map
    assert pasted.sum() > 0.5 * donor.region.area
    images = np.stack(replayed.channel_images(target_image, [np.float32] * 4))
    # weight 1: the pasted voxels more than the feather's half-width from any other voxel
    deep = ndimage.distance_transform_edt(pasted) - 0.5 >= FEATHER_PIXELS
    assert np.array_equal(deep, replayed.exact)
    z, y, x = np.nonzero(deep)
    assert z.size > 20 and np.unique(z).size > 2              # several slices of the component
    assert np.array_equal(images[:, z, y, x], donor_image[:, z - offset[0], y - offset[1], x - offset[2]])
    box = replayed.edit_box
    outside = np.ones(target_map.shape, dtype=bool)
    outside[box[0]:box[3], box[1]:box[4], box[2]:box[5]] = False
    assert outside.sum() > 0.5 * outside.size
    assert np.array_equal(images[:, outside], target_image[:, outside])


def test_adjacent_slices_inside_the_pasted_lesions_differ_as_in_real_lesions(ms_generated):
    """The through-plane figure of the written volume is close to that of the real lesions (3D components moved
    whole), and the same figure flags a paste whose slices were moved apart (a slice-by-slice paste)."""
    dataset, _, _ = ms_generated
    report = through_plane_consistency(dataset, "0")
    print(format_through_plane(report))
    assert report["synthetic_pairs"] > 50 and report["real_pairs"] > 1000
    for entry in report["channels"]:
        assert 0.5 < entry["ratio"] < 2.0, entry
    store = SyntheticStore(dataset)
    case_id = store.complete_case_ids("0")[0]
    image, _ = read(store.image_file(case_id, 0))
    target_label, _ = read(dataset.cases[store.cases[case_id]["source"]["target"]["case_id"]]["label"])
    label, _ = read(store.label_file(case_id))
    edited = label != target_label
    whole, pairs = adjacent_slice_difference(image, edited)
    # the same voxels, every slice's content moved by its own in-plane offset (neighbouring slices disagree)
    rng = np.random.default_rng(0)
    moved_apart = np.stack([np.roll(plane, tuple(rng.integers(-4, 5, size=2)), axis=(0, 1)) for plane in image])
    apart, same_pairs = adjacent_slice_difference(moved_apart, edited)
    assert same_pairs == pairs and apart / pairs > 1.3 * whole / pairs


@pytest.fixture(scope="module")
def ms_planned_3d(ms_generated, nnunet_folders):
    """Dataset515 planned and preprocessed by the stock command for 3d_fullres (on a sampled fingerprint,
    ``sampled_fingerprint.py``), with the small CPU plans (nnUNetPlans_cpu); its preprocessed folder."""
    from nnunet_synth.evaluation.cpu_plans import write_cpu_plans
    dataset, _, _ = ms_generated
    planning = {name: value for name, value in environment().items() if name != "nnUNet_n_proc_DA"}  # 2.8.1's planner
    write_sampled_fingerprint(MS_ID, planning)
    result = subprocess.run(["nnUNetv2_plan_and_preprocess", "-d", str(MS_ID), "-c", "3d_fullres", "-np", "1",
                             "-npfp", "1"], capture_output=True, text=True, env=planning, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    preprocessed = nnunet_folders["nnUNet_preprocessed"] / dataset.name
    write_cpu_plans(preprocessed, "3d_fullres")
    return preprocessed


def predict_validation_patient(dataset, trainer, folder, extra_environment, fold=0):
    """Stock nnUNetv2_predict (3d_fullres, CPU plans, fold ``fold``) of the fold's validation patient; its
    prediction and the reference label, each as (array, image)."""
    validation = json.loads((nnunet_folder("nnUNet_preprocessed") / dataset.name / "splits_final.json")
                            .read_text())[fold]["val"]
    inputs, outputs = folder / "in", folder / "out"
    inputs.mkdir()
    for image in dataset.cases[validation[0]]["images"]:
        shutil.copy(image, inputs)
    result = run(["nnUNetv2_predict", "-i", inputs, "-o", outputs, "-d", MS_ID, "-c", "3d_fullres", "-p",
                  "nnUNetPlans_cpu", "-tr", trainer, "-f", str(fold), "-device", "cpu", "-npp", "0", "-nps", "0",
                  "--disable_tta"], **extra_environment)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    return read(outputs / f"{validation[0]}.nii.gz"), read(dataset.cases[validation[0]]["label"])


@pytest.mark.slow
def test_the_paste_trainer_trains_3d_fullres_with_3d_donors_of_the_training_patients(ms_generated, ms_planned_3d,
                                                                                   nnunet_folders, tmp_path):
    """The stock nnUNetv2_train 3d_fullres with nnUNetTrainerLesionPaste_smoke on Dataset515 (real cases only):
    the donors are whole 3D lesion components of fold 0's training patients, pastes land in the 3D patches, and
    nnUNetv2_predict runs."""
    from nnunet_synth.dataset_tools.trainer_dir import trainer_directory
    dataset, _, _ = ms_generated
    trainers = {"nnUNet_extTrainer": str(trainer_directory())}
    trainer = "nnUNetTrainerLesionPaste_smoke"
    result = run(["nnUNetv2_train", MS_ID, "3d_fullres", "0", "-tr", trainer, "-p", "nnUNetPlans_cpu", "-device",
                  "cpu"], timeout=1500, nnsynth_paste_probability="1", **trainers)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    fold = nnunet_folders["nnUNet_results"] / dataset.name / f"{trainer}__nnUNetPlans_cpu__3d_fullres" / "fold_0"
    summary = json.loads((fold / "synthmix.json").read_text())
    split = json.loads((ms_planned_3d / "splits_final.json").read_text())[0]
    paste = summary["lesion_paste"]
    assert summary["configuration"] == "3d_fullres" and summary["settings"]["ratio"] == 0.0
    assert paste["donor_cases"] and set(paste["donor_cases"]) <= set(split["train"])
    assert not set(paste["donor_cases"]) & set(split["val"])
    assert paste["donors_per_class"]["1"] > 0 and paste["host_classes"] == []     # no host class: inside the body
    counts = paste["counts"]
    assert counts["samples"] >= 10 * summary["batch_size"] and counts["samples_pasted"] > 0
    assert int(counts["pixels_added"]["1"]) > 0
    (prediction, header), (reference, reference_header) = predict_validation_patient(dataset, trainer, tmp_path,
                                                                                     trainers)
    assert prediction.shape == reference.shape and header.GetSpacing() == reference_header.GetSpacing()


@pytest.fixture(scope="module")
def ms_planned_resenc(ms_planned_3d):
    """nnU-Net's residual-encoder preset M for Dataset515's 3d_fullres: the stock ``nnUNetv2_plan_experiment -pl
    nnUNetPlannerResEncM`` (its 3d_fullres data identifier is the stock plans' ``nnUNetPlans_3d_fullres``, so the
    cases ``ms_planned_3d`` preprocessed are those ``nnUNetv2_plan_and_preprocess -pl`` would write again; the 2d
    test runs that command), and its CPU copy with the patch halved per axis (64 x 96 x 80 -> 32 x 48 x 32, a
    tenth of the voxels: a full patch costs about 6 s per iteration on a CPU core). Its preprocessed folder."""
    from nnunet_synth.evaluation.cpu_plans import write_cpu_plans
    planning = {name: value for name, value in environment().items() if name != "nnUNet_n_proc_DA"}  # 2.8.1's planner
    result = subprocess.run(["nnUNetv2_plan_experiment", "-d", str(MS_ID), "-pl", RESENC_PLANNER], capture_output=True,
                            text=True, env=planning, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    write_cpu_plans(ms_planned_3d, "3d_fullres", RESENC_PLANS, RESENC_CPU_PLANS, patch_scale=0.5)
    return ms_planned_3d


def train_resenc_3d(dataset, trainer, **extra_environment):
    """The stock nnUNetv2_train 515 3d_fullres 0 -p nnUNetResEncUNetMPlans_cpu; the fold folder and synthmix.json."""
    from nnunet_synth.dataset_tools.trainer_dir import trainer_directory
    result = run(["nnUNetv2_train", MS_ID, "3d_fullres", "0", "-tr", trainer, "-p", RESENC_CPU_PLANS, "-device", "cpu"],
                 timeout=1500, nnUNet_extTrainer=str(trainer_directory()), **extra_environment)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    fold = (nnunet_folder("nnUNet_results") / dataset.name / f"{trainer}__{RESENC_CPU_PLANS}__3d_fullres" /
            "fold_0")
    return fold, json.loads((fold / "synthmix.json").read_text())


@pytest.mark.slow
def test_synthmix_trains_3d_fullres_with_the_resenc_m_plans(ms_generated, ms_planned_resenc):
    """nnUNetv2_train 515 3d_fullres 0 -tr nnUNetTrainerSynthMix_smoke -p nnUNetResEncUNetMPlans_cpu mixes fold 0's
    copy-paste volumes from the 3d_fullres pool the stock plans share into the patches of a residual-encoder
    UNet. (The stock prediction with these plans is tested in 2d, test_resenc.py: with the halved patch a 3D
    prediction takes 36 sliding windows, 34 s on the 2-core test machine.)"""
    dataset, _, _ = ms_generated
    resenc = json.loads((ms_planned_resenc / f"{RESENC_PLANS}.json").read_text())
    cpu = json.loads((ms_planned_resenc / f"{RESENC_CPU_PLANS}.json").read_text())
    assert resenc["configurations"]["3d_fullres"]["data_identifier"] == "nnUNetPlans_3d_fullres"
    assert resenc["configurations"]["3d_fullres"]["patch_size"] == [64, 96, 80]
    assert cpu["configurations"]["3d_fullres"]["patch_size"] == [32, 48, 32]       # halved, divisible by 2^4
    fold, summary = train_resenc_3d(dataset, "nnUNetTrainerSynthMix_smoke", nnsynth_ratio="0.5",
                                    nnsynth_min_quality="none")
    store = SyntheticStore(dataset)
    assert summary["configuration"] == "3d_fullres" and summary["settings"]["ratio"] == 0.5
    assert summary["used_synthetic_cases"] == store.complete_case_ids("0")
    assert summary["pool_folder"] == str(pool_folder(ms_planned_resenc, "nnUNetPlans_3d_fullres"))
    assert_residual_encoder_checkpoint(fold, "3d_fullres", resenc, cpu)


@pytest.mark.slow
def test_the_paste_trainer_trains_3d_fullres_with_the_resenc_m_plans(ms_generated, ms_planned_resenc):
    """nnUNetv2_train 515 3d_fullres 0 -tr nnUNetTrainerLesionPaste_smoke -p nnUNetResEncUNetMPlans_cpu pastes 3D
    lesion components of fold 0's training patients into the patches of a residual-encoder UNet."""
    dataset, _, _ = ms_generated
    fold, summary = train_resenc_3d(dataset, "nnUNetTrainerLesionPaste_smoke", nnsynth_paste_probability="1")
    split = json.loads((ms_planned_resenc / "splits_final.json").read_text())[0]
    paste = summary["lesion_paste"]
    assert set(paste["donor_cases"]) <= set(split["train"]) and paste["counts"]["samples_pasted"] > 0
    assert int(paste["counts"]["pixels_added"]["1"]) > 0
    resenc, cpu = (json.loads((ms_planned_resenc / f"{name}.json").read_text()) for name in (RESENC_PLANS,
                                                                                             RESENC_CPU_PLANS))
    assert_residual_encoder_checkpoint(fold, "3d_fullres", resenc, cpu)


@pytest.fixture(scope="module")
def ms_inpainted(ms_generated, tmp_path_factory):
    """Fold 1 of Dataset515 (training patients ms_07, ms_26) beside fold 0's copy-paste volumes: a tiny inpainting
    generator (3 steps, 32 px crops) trained on fold 1's training patients, then
    ``nnsynth_generate 515 --image-source inpaint --fold 1 -n 1`` (whole volumes, the default for 3D data)."""
    return inpaint_fold_one(ms_generated, tmp_path_factory.mktemp("ms_inpaint"))


def inpaint_fold_one(generated, work_folder):
    """Fold 1 of a generated 3D dataset: a tiny inpainting generator (3 steps, 32 px crops) trained on fold 1's
    training patients in ``work_folder``, then ``nnsynth_generate D --image-source inpaint --fold 1 -n 1``.
    Returns (dataset, generator, the command's result, the real files before)."""
    import torch

    from nnunet_synth.generator import TrainingSettings
    from nnunet_synth.generator.training import train_generator
    dataset, _, real_before = generated
    settings = TrainingSettings(preset="tiny", mode="inpaint", image_size=32, block_out_channels=(16, 32, 32, 32),
                                batch_size=2, max_steps=3, warmup_steps=1, checkpoint_every=3, preview_every=100,
                                preview_inference_steps=2, preview_count=1)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        generator = train_generator(dataset, work_folder / "run", settings, fold=1, progress=False)
    finally:
        torch.set_num_threads(threads)
    result = run([BIN / "nnsynth_generate", dataset.folder, "--image-source", "inpaint", "--fold", "1",
                  "--generator", generator.final_folder, "-n", "1", "--inference-steps", "2", "--device", "cpu"])
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    return dataset, generator, result, real_before


def test_inpaint_writes_whole_four_channel_volumes_with_the_real_voxels_outside_the_edit_region(ms_inpainted):
    from nnunet_synth.sampling.inpaint import volume_edit_region
    dataset, generator, result, real_before = ms_inpainted
    store = SyntheticStore(dataset)
    assert store.manifest["folds"]["1"]["settings"]["unit"] == "volume"
    assert "fold 1: 1 synthetic cases" in result.stdout
    case_ids = store.complete_case_ids("1")
    assert len(case_ids) == 1
    entry = store.cases[case_ids[0]]
    assert entry["inpaint"]["unit"] == "volume" and entry["sampler"]["volume_noise"] == "per-slice"
    assert entry["sampler"]["scheduler"] == VOLUME_SAMPLER and entry["sampler"]["clip_x0"]   # the volumes' default
    assert entry["sampler"]["renoise_x0"]             # stepped from the re-noised clipped estimate, as DDIM
    assert store.manifest["folds"]["1"]["settings"]["clip_x0"] is True
    assert store.manifest["folds"]["1"]["settings"]["renoise_x0"] is True
    assert not set(entry["source_cases"]) & {"ms_19"}                  # fold 1's validation patient
    target = dataset.cases[entry["source"]["target"]["case_id"]]
    label, label_image = read(store.label_file(case_ids[0]))
    target_label, _ = read(target["label"])
    assert label.shape == target_label.shape and label.shape[0] > 1                # a whole volume
    pasted = entry["source"]["pasted_pixels_per_class"]["1"]
    assert pasted > 0 and int((label == 1).sum()) == int((target_label == 1).sum()) + pasted
    edit = volume_edit_region(target_label, label, generator.config.training["edit_margin"])
    assert int(edit.sum()) == entry["inpaint"]["edit_voxels"] and edit.any()
    assert entry["quality"]["model_free"]["scored_slices"] == int(edit.reshape(len(edit), -1).any(axis=1).sum())
    redrawn = False
    for channel, (image, target_image) in enumerate(channels_beside_target(store, case_ids[0], target, label_image)):
        assert np.array_equal(image[~edit], target_image[~edit]), channel           # real voxels, bit for bit
        redrawn |= not np.array_equal(image[edit], target_image[edit])
    assert redrawn and len(store.image_files(case_ids[0])) == 4
    assert {path.name: path.read_bytes() for path in sorted(dataset.folder.rglob("*Tr/*"))} == real_before


def test_the_inpainted_volumes_pass_nnunets_integrity_check_in_a_standalone_export(ms_inpainted, nnunet_folders):
    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity

    from nnunet_synth.writer.standalone_export import export_standalone
    dataset, _, _, _ = ms_inpainted
    export = export_standalone(dataset, nnunet_folders["nnUNet_raw"], nnunet_folders["nnUNet_preprocessed"],
                               MS_INPAINT_EXPORT_ID, folds=["1"])
    assert len(list((Path(export) / "imagesTr").glob("synth_*"))) == 4          # one volume, 4 channels
    verify_dataset_integrity(str(export), num_processes=1)                         # raises on a bad dataset


def test_a_whole_slice_generator_arm_with_3d_patches_is_refused_in_one_line(ms_volumes_dataset_folder, tmp_path,
                                                                            capsys):
    from nnunet_synth.dataset_tools.evaluate import main
    with pytest.raises(SystemExit) as stop:
        main(["downstream", str(ms_volumes_dataset_folder), "--configuration", "3d_fullres", "--arms", "real_only",
              "cbmat", "--test-patients", "1", "--output", str(tmp_path / "evaluation")])
    error = capsys.readouterr().err
    assert stop.value.code == 2 and error.count("\n") == 1 and "whole volumes" in error and "cbmat" in error
    assert not (tmp_path / "evaluation").exists()


def test_online_paste_with_one_training_patient_is_refused_in_one_line(ms_volumes_dataset_folder, tmp_path,
                                                                       capsys):
    from nnunet_synth.dataset_tools.evaluate import main
    with pytest.raises(SystemExit) as stop:    # 3 patients: one tests, one validates, one trains
        main(["downstream", str(ms_volumes_dataset_folder), "--configuration", "3d_fullres", "--arms", "real_only",
              "copy_paste_online", "--test-patients", "1", "--output", str(tmp_path / "evaluation")])
    error = capsys.readouterr().err
    assert stop.value.code == 2 and error.count("\n") == 1 and "copy_paste_online" in error
    assert "1 training patient" in error and not (tmp_path / "evaluation").exists()


@pytest.mark.slow
def test_the_downstream_evaluation_trains_and_predicts_3d_fullres_with_whole_synthetic_volumes(
        ms_volumes_dataset_folder, nnunet_folders, tmp_path):
    """nnsynth_evaluate downstream --configuration 3d_fullres on the MS volumes, one test patient kept out: the stock
    nnUNetv2_train 3d_fullres of the copy_paste and inpaint arms (nnUNetTrainerSynthMix_smoke; the inpainting
    generator trained here on the training patient only) mixes their whole synthetic volumes, preprocessed into the
    3d_fullres pool, into the 3D patches; both train on the same plans (nnU-Net plans the first arm, the second gets
    copies) and the stock nnUNetv2_predict writes the test patient at its geometry. (copy_paste_online has one
    training patient here, whose own lesions it never pastes: the paste trainer's 3D test trains on fold 0.)"""
    output = tmp_path / "evaluation"
    arms = ("copy_paste", "inpaint")
    result = run([BIN / "nnsynth_evaluate", "downstream", ms_volumes_dataset_folder, "--configuration", "3d_fullres",
                  "--arms", *arms, "--budget", "smoke", "--test-patients", "1", "--amounts", "1", "--inpaint-steps",
                  "2", "--inpaint-batch-size", "2", "--inpaint-inference-steps", "2", "--no-tta", "--first-id",
                  DOWNSTREAM_FIRST_ID, "--device", "cpu", "--output", output], timeout=2400)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    patients = json.loads((output / "patients.json").read_text())
    (setting, split), = patients.items()
    runs = [json.loads(path.read_text()) for path in sorted((output / "runs").glob("*/*/repeat0/dice.json"))]
    assert sorted(run["arm"] for run in runs) == sorted(arms)
    for run_record in runs:
        assert run_record["configuration"] == "3d_fullres" and set(run_record["cases"]) == set(split["test"])
    for prediction in (output / "runs").glob("*/*/repeat0/predictions"):
        (array, image), (reference, reference_image) = (read(prediction / f"{split['test'][0]}.nii.gz"),
                                                        read(output / "test_set" / "labelsTs" /
                                                             f"{split['test'][0]}.nii.gz"))
        assert array.shape == reference.shape and image.GetSpacing() == reference_image.GetSpacing()
    plans = []
    for index, arm in enumerate(arms):
        arm_dataset = RawDataset(next(nnunet_folders["nnUNet_raw"].glob(f"Dataset{DOWNSTREAM_FIRST_ID + index:03d}_*")))
        preprocessed = nnunet_folders["nnUNet_preprocessed"] / arm_dataset.name
        arm_plans = json.loads((preprocessed / "nnUNetPlans_cpu.json").read_text())
        assert arm_plans.pop("dataset_name") == arm_dataset.name          # nnU-Net finds its folder by this name
        plans.append(arm_plans)
        fold, = (nnunet_folders["nnUNet_results"] / arm_dataset.name).glob("*__nnUNetPlans_cpu__3d_fullres/fold_0")
        summary = json.loads((fold / "synthmix.json").read_text())
        assert summary["configuration"] == "3d_fullres"
        store = SyntheticStore(arm_dataset)
        case_ids = store.complete_case_ids("0")
        assert len(case_ids) == 1                                       # amount 1 x one training volume
        entry = store.cases[case_ids[0]]
        assert store.manifest["folds"]["0"]["settings"]["unit"] == "volume"
        assert entry["source"]["target"]["slice_index"] is None
        assert entry["image_source"] == {"copy_paste": "copy-paste", "inpaint": "inpaint"}[arm]
        assert set(entry["source_cases"]) <= set(split["training"])
        label, _ = read(store.label_file(case_ids[0]))
        assert label.shape[0] > 1                                       # a whole volume
        # the trainer mixed it in: the whole volume, preprocessed with the 3d_fullres plans
        assert summary["used_synthetic_cases"] == case_ids
        pool = Path(summary["pool_folder"])
        assert pool == pool_folder(preprocessed, "nnUNetPlans_3d_fullres") and any(pool.glob("*_seg.b2nd"))
        assert summary["exposure"]["num_real_slices"] == len(split["training"])  # 3D patches: a draw is a case
    assert plans[0] == plans[1]
    assert "inpaint_x1 | copy_paste_x1" in (output / "summary.md").read_text()
