"""Real datasets as they come: what nnU-Net trains on is accepted, on copies of the real data.

- Dataset930: 2D, binary (background + tumour, no host class), one case per real STS CT slice; a third of the cases
  are lesion-free slices (the tumour-free margin of each crop). Checked, balanced (lesion-free cases are targets,
  never donors, and the new maps hold more tumour per map than the real tumour-bearing ones), planned, trained
  with SynthMix and the paste trainer and predicted with the stock commands.
- Dataset931: 3D, binary, whole STS volumes (downsampled) and two lesion-free volumes (the tumour-free slab of two
  further patients); balanced as whole volumes, lesion-free volumes as targets.
- Dataset932: normal lung and two lesion types (the COVID slices' lesions split by density), the denser type only in
  fold 0's validation cases: fold 0 runs, balances the other type and names the missing one.
- Dataset933: region-based labels (``"lesion": [1, 2], "consolidation": 2``) with ``-n 4``: exactly four cases.
- Dataset934: a copy of Dataset930 whose first label's origin differs from its image's (nnU-Net warns): accepted
  with one warning, synthetic cases in the image's geometry.
"""
import json
import os
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import SHARED_DATA, lesion_density_thresholds, run_entry_point, split_lesions_by_density
from sampled_fingerprint import write_sampled_fingerprint
from test_five_folds import CPU_PLANS, environment, run

from nnunet_synth.dataset import RawDataset
from nnunet_synth.dataset.splits import fold_training_cases, fold_validation_cases
from nnunet_synth.dataset.writing import write_dataset_json_atomic, write_volume
from nnunet_synth.dataset_tools import check_dataset as check_dataset_command
from nnunet_synth.dataset_tools import generate as generate_command
from nnunet_synth.masks import body_mask
from nnunet_synth.writer.synthetic_store import SyntheticStore

STS_SOURCE = SHARED_DATA / "sts_ct_3d"
SLICES_ID, VOLUMES_ID, ABSENT_ID, REGIONS_ID, ORIGIN_ID, LESION_FREE_ONLY_ID = 930, 931, 932, 933, 934, 935
STS_PATIENTS = 10                       # the first ten patients that have a tumour-free margin
TUMOUR_FREE_MARGIN = 14                 # slices 0..13 of these crops hold no tumour (checked when built)
PER_MAP_RAISED = 1.5


def sts_patients():
    """(patient id, CT array HU (Z, Y, X), GTV array, spacing xyz) of the STS crops whose first
    TUMOUR_FREE_MARGIN slices hold no tumour, in id order."""
    found = []
    for folder in sorted(p for p in STS_SOURCE.iterdir() if p.is_dir()):
        ct, gtv = sitk.ReadImage(str(folder / "CT.nii.gz")), sitk.ReadImage(str(folder / "GTV.nii.gz"))
        mask = sitk.GetArrayFromImage(gtv)
        if mask[:TUMOUR_FREE_MARGIN].any():
            continue
        found.append((folder.name, sitk.GetArrayFromImage(ct), mask, ct.GetSpacing()))
        if len(found) == STS_PATIENTS:
            break
    return found


def write_patient_splits(dataset_folder, preprocessed_root, patient_of: dict, num_folds: int = 5):
    """nnU-Net's splits_final.json with every patient's cases in one fold (cases of a patient never split between
    training and validation), patients dealt round-robin to the folds in id order."""
    patients = sorted(set(patient_of.values()))
    splits = []
    for fold in range(num_folds):
        held = {p for i, p in enumerate(patients) if i % num_folds == fold}
        splits.append({"train": sorted(c for c, p in patient_of.items() if p not in held),
                       "val": sorted(c for c, p in patient_of.items() if p in held)})
    target = Path(preprocessed_root) / Path(dataset_folder).name
    target.mkdir(parents=True, exist_ok=True)
    (target / "splits_final.json").write_text(json.dumps(splits, indent=1))


def build_sts_slices(folder, preprocessed_root):
    """Dataset930: per patient two tumour slices (its largest tumour section and the slice halfway to the tumour's
    top) and one tumour-free slice of its margin, 2x coarser in-plane, as 2D cases."""
    patient_of = {}
    for patient, ct, mask, spacing in sts_patients():
        z_tumour = np.nonzero(mask.any(axis=(1, 2)))[0]
        largest = int(np.argmax(mask.sum(axis=(1, 2))))
        for z in (largest, (int(z_tumour[0]) + largest) // 2, TUMOUR_FREE_MARGIN // 2):
            case_id = f"{patient}_z{z:02d}"
            spacing_xy = (spacing[0] * 2, spacing[1] * 2, spacing[2])
            write_volume(ct[z:z + 1, ::2, ::2].astype(np.int16), folder / "imagesTr" / f"{case_id}_0000.nii.gz",
                         spacing_xy)
            write_volume(mask[z:z + 1, ::2, ::2].astype(np.uint8), folder / "labelsTr" / f"{case_id}.nii.gz",
                         spacing_xy)
            patient_of[case_id] = patient
    write_dataset_json_atomic(folder, channel_names={0: "CT"}, labels={"background": 0, "tumour": 1},
                              num_training_cases=len(patient_of), file_ending=".nii.gz", dataset_name=folder.name)
    write_patient_splits(folder, preprocessed_root, patient_of)
    return folder


def build_sts_volumes(folder):
    """Dataset931: five whole STS volumes (3x coarser in-plane) and the tumour-free slab of two more patients."""
    patients = sts_patients()[:7]
    for index, (patient, ct, mask, spacing) in enumerate(patients):
        keep = slice(None) if index < 5 else slice(0, TUMOUR_FREE_MARGIN)
        spacing_xyz = (spacing[0] * 3, spacing[1] * 3, spacing[2])
        write_volume(ct[keep, ::3, ::3].astype(np.int16), folder / "imagesTr" / f"{patient}_0000.nii.gz", spacing_xyz)
        write_volume(mask[keep, ::3, ::3].astype(np.uint8), folder / "labelsTr" / f"{patient}.nii.gz", spacing_xyz)
    write_dataset_json_atomic(folder, channel_names={0: "CT"}, labels={"background": 0, "tumour": 1},
                              num_training_cases=len(patients), file_ending=".nii.gz", dataset_name=folder.name)
    return folder


@pytest.fixture(scope="module")
def sts_slices(nnunet_folders):
    return RawDataset(build_sts_slices(nnunet_folders["nnUNet_raw"] / f"Dataset{SLICES_ID}_STSSlices",
                                       nnunet_folders["nnUNet_preprocessed"]))


@pytest.fixture(scope="module")
def sts_volumes(nnunet_folders):
    return RawDataset(build_sts_volumes(nnunet_folders["nnUNet_raw"] / f"Dataset{VOLUMES_ID}_STSVolumes"))


def generate_here(capsys, dataset, *options):
    code, out, err = run_entry_point(generate_command.main, [dataset.folder, "--image-source", "copy-paste",
                                                            *options], capsys)
    assert code == 0, err[-3000:]
    return out, err


def nnunet_accepts(folder):
    """nnU-Net's own integrity check on the raw dataset (raises where nnU-Net refuses)."""
    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity
    verify_dataset_integrity(str(folder), num_processes=1)


def lesion_free(dataset, case_id) -> bool:
    return not dataset.read_case(case_id)[1].any()


def per_map_loads(label_maps, images, classes=(1,)):
    """Tumour share of the body (first channel above Otsu, holes filled, plus the tumour) per map that holds it."""
    loads = []
    for label, image in zip(label_maps, images):
        for z in range(label.shape[0]):
            tumour = np.isin(label[z], classes)
            if tumour.any():
                loads.append(tumour.sum() / (body_mask(image[z]) | tumour).sum())
    return loads


# ---------------------------------------------------------------- 2D, binary, lesion-free cases
def test_lesion_free_2d_cases_are_accepted_as_targets_and_never_donors(sts_slices, capsys):
    dataset = sts_slices
    free = [c for c in dataset.case_ids if lesion_free(dataset, c)]
    assert len(free) == len(dataset.case_ids) // 3
    nnunet_accepts(dataset.folder)
    code, out, err = run_entry_point(check_dataset_command.main, [dataset.folder], capsys)
    assert code == 0, err
    out, err = generate_here(capsys, dataset, "-r", "0.5")
    store = SyntheticStore(dataset)
    case_ids = store.complete_case_ids("0")
    training = fold_training_cases(dataset, "0")
    assert len(case_ids) == round(0.5 * len(training))
    report = store.fold_record("0")["label_map_report"]
    free_training = [c for c in training if c in free]
    assert report["num_lesion_free_real_maps"] == len(free_training)
    on_free = [c for c in case_ids if store.cases[c]["source"]["target"]["case_id"] in free]
    assert report["num_new_maps_on_lesion_free_targets"] == len(on_free) > 0
    assert f"targets: {len(on_free)} of {len(case_ids)} new maps start from a lesion-free real map" in out
    for case_id in case_ids:
        for paste in store.cases[case_id]["source"]["pastes"]:
            assert paste["donor"]["case_id"] not in free and paste["donor"]["case_id"] in training
    # the tumour per map, from the written files: new maps >= 1.5x the real tumour-bearing maps' mean
    reader = dataset.reader_writer()
    real = [dataset.read_case(c) for c in training if c not in free]
    real_loads = per_map_loads([r[1] for r in real], [r[0][0] for r in real])
    new_labels = [reader.read_seg(str(store.label_file(c)))[0][0].astype(int) for c in case_ids]
    new_images = [reader.read_images([str(p) for p in store.image_files(c)])[0][0] for c in case_ids]
    new_loads = per_map_loads(new_labels, new_images)
    assert len(new_loads) == len(case_ids)
    assert np.mean(new_loads) >= PER_MAP_RAISED * np.mean(real_loads), (np.mean(new_loads), np.mean(real_loads))


@pytest.mark.slow
def test_lesion_free_2d_cases_train_and_predict_with_the_stock_commands(sts_slices, nnunet_folders, capsys):
    """Plan, train SynthMix and the paste trainer (smoke budgets, CPU plans) and predict one lesion-free and one
    tumour case with the stock nnUNetv2_predict."""
    from nnunet_synth.evaluation.cpu_plans import write_cpu_plans
    dataset = sts_slices
    store = SyntheticStore(dataset)
    if not store.complete_case_ids("0"):
        generate_here(capsys, dataset, "-r", "0.5")
    dataset_id = str(SLICES_ID)
    env = environment(nnunet_folders)
    write_sampled_fingerprint(dataset_id, env)
    run(["nnUNetv2_plan_and_preprocess", "-d", dataset_id, "-c", "2d", "-np", "1", "--verify_dataset_integrity"], env)
    write_cpu_plans(nnunet_folders["nnUNet_preprocessed"] / dataset.name, "2d", "nnUNetPlans", CPU_PLANS)
    train_env = dict(env, nnUNet_n_proc_DA="0", nnsynth_min_quality="none")
    for trainer in ("nnUNetTrainerSynthMix_smoke", "nnUNetTrainerLesionPaste_smoke"):
        run(["nnUNetv2_train", dataset_id, "2d", "0", "-tr", trainer, "-p", CPU_PLANS, "-device", "cpu"], train_env)
    validation = fold_validation_cases(dataset, "0")
    picked = [next(c for c in validation if lesion_free(dataset, c)),
              next(c for c in validation if not lesion_free(dataset, c))]
    inputs = nnunet_folders["nnUNet_raw"].parent / "sts_slices_predict_in"
    inputs.mkdir(exist_ok=True)
    for case_id in picked:
        os.symlink(dataset.cases[case_id]["images"][0], inputs / f"{case_id}_0000.nii.gz")
    outputs = inputs.parent / "sts_slices_predict_out"
    run(["nnUNetv2_predict", "-i", str(inputs), "-o", str(outputs), "-d", dataset_id, "-c", "2d", "-f", "0",
         "-tr", "nnUNetTrainerSynthMix_smoke", "-p", CPU_PLANS, "-device", "cpu", "-npp", "1", "-nps", "1",
         "--disable_progress_bar"], env)
    for case_id in picked:
        prediction = sitk.GetArrayFromImage(sitk.ReadImage(str(outputs / f"{case_id}.nii.gz")))
        assert prediction.shape == dataset.read_case(case_id)[1].shape and set(np.unique(prediction)) <= {0, 1}


# ---------------------------------------------------------------- 3D, binary, lesion-free volumes
def test_lesion_free_volumes_are_targets_of_whole_volume_balancing(sts_volumes, capsys):
    dataset = sts_volumes
    free = [c for c in dataset.case_ids if lesion_free(dataset, c)]
    assert len(free) == 2
    nnunet_accepts(dataset.folder)
    out, _ = generate_here(capsys, dataset, "-n", "6")
    store = SyntheticStore(dataset)
    case_ids = store.complete_case_ids("0")
    assert len(case_ids) == 6
    report = store.fold_record("0")["label_map_report"]
    training = fold_training_cases(dataset, "0")
    assert report["num_lesion_free_real_maps"] == len([c for c in training if c in free]) > 0
    assert report["num_new_maps_on_lesion_free_targets"] > 0 and "lesion-free real map" in out
    for case_id in case_ids:
        record = store.cases[case_id]
        target = record["source"]["target"]
        assert target["slice_index"] is None                        # a whole volume
        label = sitk.GetArrayFromImage(sitk.ReadImage(str(store.label_file(case_id))))
        real_label = dataset.read_case(target["case_id"])[1]
        assert label.shape == real_label.shape and (label == 1).sum() > (real_label == 1).sum()
        for paste in record["source"]["pastes"]:
            assert len(paste["donor"]["bbox"]) == 6 and paste["donor"]["case_id"] not in free


# ---------------------------------------------------------------- a class only in the fold's validation cases
@pytest.fixture(scope="module")
def absent_class_dataset(nnunet_folders, covid_dataset_folder):
    """Normal lung (1) and two lesion types (lighter 2 / denser 3 at the median density), every 8th COVID slice; the
    denser type is relabelled lighter in every case but fold 0's validation cases."""
    from conftest import write_covid_variant
    folder = nnunet_folders["nnUNet_raw"] / f"Dataset{ABSENT_ID}_DenserOnlyInValidation"
    thresholds = lesion_density_thresholds(covid_dataset_folder, [0.5])

    def relabel(image, label):
        relabelled = split_lesions_by_density(image, label, thresholds, 2)
        relabelled[label == 1] = 1
        return relabelled

    write_covid_variant(covid_dataset_folder, folder, {"background": 0, "lung": 1, "lighter": 2, "denser": 3},
                        relabel, slice_step=8)
    dataset = RawDataset(folder)
    validation = set(fold_validation_cases(dataset, "0"))
    for case_id in dataset.case_ids:
        if case_id not in validation:
            label_file = dataset.cases[case_id]["label"]
            label = sitk.ReadImage(label_file)
            array = sitk.GetArrayFromImage(label)
            write_volume(np.where(array == 3, 2, array).astype(np.uint8), label_file, label.GetSpacing())
    return RawDataset(folder)


def test_a_class_absent_from_the_folds_training_cases_is_named_and_the_fold_runs(absent_class_dataset, capsys):
    dataset = absent_class_dataset
    training = fold_training_cases(dataset, "0")
    assert not any(3 in np.unique(dataset.read_case(c)[1]) for c in training)
    out, err = generate_here(capsys, dataset, "-r", "0.5")
    warnings = [line for line in err.splitlines() if line.startswith("nnsynth: warning:")]
    assert len(warnings) == 1 and "class denser occurs in none of fold 0's training cases" in warnings[0]
    report = SyntheticStore(dataset).fold_record("0")["label_map_report"]
    assert report["host_classes"] == [1] and report["pathology_classes"] == [2, 3]
    assert [entry["class"] for entry in report["not_balanced"]] == [3]
    assert "not balanced in this fold: denser" in out
    lighter = next(entry for entry in report["classes"] if entry["class"] == 2)
    assert lighter["share_after"] >= PER_MAP_RAISED * lighter["share_before"]


def test_a_fold_without_any_pathology_pixel_is_refused_in_one_line(sts_slices, nnunet_folders, capsys):
    """Only the lesion-free cases of Dataset930, as a dataset: nothing to balance in any fold."""
    folder = nnunet_folders["nnUNet_raw"] / f"Dataset{LESION_FREE_ONLY_ID}_STSLesionFreeOnly"
    free = [c for c in sts_slices.case_ids if lesion_free(sts_slices, c)]
    for case_id in free:
        for source, target in ((sts_slices.cases[case_id]["images"][0], f"imagesTr/{case_id}_0000.nii.gz"),
                               (sts_slices.cases[case_id]["label"], f"labelsTr/{case_id}.nii.gz")):
            (folder / target).parent.mkdir(parents=True, exist_ok=True)
            (folder / target).write_bytes(Path(source).read_bytes())
    write_dataset_json_atomic(folder, channel_names={0: "CT"}, labels={"background": 0, "tumour": 1},
                              num_training_cases=len(free), file_ending=".nii.gz", dataset_name=folder.name)
    code, out, err = run_entry_point(generate_command.main, [folder, "--image-source", "copy-paste", "-n", "2"],
                                     capsys)
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert "hold no pixel of any pathology class (tumour; host classes: none)" in err
    assert not (folder / "imagesSynth").exists()


# ---------------------------------------------------------------- any budget
def test_region_based_labels_with_four_cases_give_four_cases(example_dataset_folder, covid_dataset_folder,
                                                               nnunet_folders, capsys):
    """The small real example, lung merged into background, lesion pixels split at the median density:
    ``"lesion": [1, 2], "consolidation": 2``. Four new maps barely move the dataset's shares: still four cases."""
    source = RawDataset(example_dataset_folder)
    folder = nnunet_folders["nnUNet_raw"] / f"Dataset{REGIONS_ID}_RegionsFour"
    thresholds = lesion_density_thresholds(covid_dataset_folder, [0.5])
    for case_id in source.case_ids:
        image, label, _ = source.read_case(case_id)
        write_volume(image[0].astype(np.uint8), folder / "imagesTr" / f"{case_id}_0000.nii.gz")
        write_volume(split_lesions_by_density(image[0], label, thresholds, 1),
                     folder / "labelsTr" / f"{case_id}.nii.gz")
    write_dataset_json_atomic(folder, channel_names={0: "CT"}, labels={"background": 0, "lesion": [1, 2],
                                                                       "consolidation": 2},
                              regions_class_order=[1, 2], num_training_cases=len(source.case_ids),
                              file_ending=".nii.gz", dataset_name=folder.name, nnsynth_unit="slice")
    dataset = RawDataset(folder)
    generate_here(capsys, dataset, "-n", "4")
    store = SyntheticStore(dataset)
    assert len(store.complete_case_ids("0")) == 4
    nnunet_accepts(dataset.folder)


# ---------------------------------------------------------------- geometry as nnU-Net checks it
def test_a_label_origin_nnunet_only_warns_about_is_accepted_with_one_warning(sts_slices, nnunet_folders, capsys):
    folder = nnunet_folders["nnUNet_raw"] / f"Dataset{ORIGIN_ID}_STSOriginShift"
    for case_id in sts_slices.case_ids:
        for source, target in ((sts_slices.cases[case_id]["images"][0], f"imagesTr/{case_id}_0000.nii.gz"),
                               (sts_slices.cases[case_id]["label"], f"labelsTr/{case_id}.nii.gz")):
            (folder / target).parent.mkdir(parents=True, exist_ok=True)
            (folder / target).write_bytes(Path(source).read_bytes())
    shifted = sorted(c for c in sts_slices.case_ids if not lesion_free(sts_slices, c))[0]
    label = sitk.ReadImage(str(folder / "labelsTr" / f"{shifted}.nii.gz"))
    label.SetOrigin([o + 0.5 for o in label.GetOrigin()])
    sitk.WriteImage(label, str(folder / "labelsTr" / f"{shifted}.nii.gz"))
    write_dataset_json_atomic(folder, channel_names={0: "CT"}, labels={"background": 0, "tumour": 1},
                              num_training_cases=len(sts_slices.case_ids), file_ending=".nii.gz",
                              dataset_name=folder.name)
    nnunet_accepts(folder)                                   # nnU-Net prints a warning and goes on
    code, out, err = run_entry_point(check_dataset_command.main, [folder], capsys)
    assert code == 0, err
    warnings = [line for line in err.splitlines() if line.startswith("nnsynth: warning:")]
    assert len(warnings) == 1 and f"{shifted}.nii.gz has origin" in warnings[0]
    dataset = RawDataset(folder)
    generate_here(capsys, dataset, "-r", "1.0")
    store = SyntheticStore(dataset)
    for case_id in store.complete_case_ids("0"):
        target = store.cases[case_id]["source"]["target"]["case_id"]
        image = sitk.ReadImage(dataset.cases[target]["images"][0])
        for written in (store.image_file(case_id, 0), store.label_file(case_id)):
            assert sitk.ReadImage(str(written)).GetOrigin() == pytest.approx(image.GetOrigin())


def test_the_inpainting_generator_of_a_fold_without_a_class_trains_and_names_it(absent_class_dataset, tmp_path,
                                                                               capsys):
    from nnunet_synth.dataset_tools import train_generator as train_generator_command
    from nnunet_synth.generator.checkpoints import read_generator_config
    output = tmp_path / "inpaint_generator"
    code, out, err = run_entry_point(train_generator_command.main, [
        absent_class_dataset.folder, "--mode", "inpaint", "--preset", "tiny", "--image-size", "32", "--steps", "2",
        "--warmup-steps", "1", "--checkpoint-every", "100", "--preview-every", "100", "--output", output,
        "--no-progress"], capsys)
    assert code == 0, err[-3000:]
    warnings = [line for line in err.splitlines() if line.startswith("nnsynth: warning:")]
    assert len(warnings) == 1 and "denser" in warnings[0] and "the fold's generator cannot learn it" in warnings[0]
    config = read_generator_config(output / "final")
    assert sorted(config.training_cases) == fold_training_cases(absent_class_dataset, "0")


@pytest.mark.slow
def test_the_paste_trainer_of_a_fold_without_a_class_names_it_and_pastes_the_others(absent_class_dataset,
                                                                                   nnunet_folders, capsys):
    """The paste trainer's donors (``extract_donors``, as ``nnUNetTrainerLesionPaste`` calls it) from the stock
    preprocessed fold-0 training cases: the lighter lesions are donors, the denser type is named once."""
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

    from nnunet_synth.trainers.pasting import extract_donors
    dataset = absent_class_dataset
    env = environment(nnunet_folders)
    write_sampled_fingerprint(str(ABSENT_ID), env)
    run(["nnUNetv2_plan_and_preprocess", "-d", str(ABSENT_ID), "-c", "2d", "-np", "1"], env)
    preprocessed = nnunet_folders["nnUNet_preprocessed"] / dataset.name
    training = fold_training_cases(dataset, "0")
    data_folder = str(preprocessed / "nnUNetPlans_2d")
    real_dataset = infer_dataset_class(data_folder)(data_folder, training)
    capsys.readouterr()
    bank = extract_donors(real_dataset, training, json.loads((preprocessed / "dataset.json").read_text()),
                          ("pathology",), two_d=True)
    err = capsys.readouterr().err
    assert bank.host_classes == (1,) and bank.paste_classes == (2,) and bank.by_class[2]
    assert "class denser occurs in none of the fold's training cases" in err and err.count("nnsynth: warning:") == 1
