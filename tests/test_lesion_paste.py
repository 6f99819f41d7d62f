"""Online lesion copy-paste (nnUNetTrainerLesionPaste): the paste on real 2D slices and a real 3D MR volume,
donors only from the fold's training cases, the batches of nnU-Net's data loader, and the stock commands."""
import subprocess

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import SHARED_DATA
from synthetic_fixtures import CPU_PLANS, SYNTHMIX_DATASET_ID, clean_environment, load_json, make_trainer, run_command

from nnunet_synth.trainers.pasting import extract_donors, paste_lesions

MS_SOURCE = SHARED_DATA / "ms_lesions_3d"
MS_CHANNELS = ("FLAIR", "T1", "T1POST", "T2")


def ms_case(patient: str, step: int = 2):
    """A real MS volume as nnU-Net hands it to the loader: (4, z, y, x) z-scored inside the brain, labels (1, ...)."""
    channels = []
    for name in MS_CHANNELS:
        volume = sitk.GetArrayFromImage(
            sitk.ReadImage(str(MS_SOURCE / patient / f"{name}.nii.gz")))[::step, ::step, ::step]
        brain = volume > 0
        channels.append(np.where(brain, (volume - volume[brain].mean()) / volume[brain].std(), volume.min()))
    lesions = sitk.GetArrayFromImage(
        sitk.ReadImage(str(MS_SOURCE / patient / "lesions.nii.gz")))[::step, ::step, ::step]
    return np.stack(channels).astype(np.float32), lesions[None].astype(np.int16)


@pytest.fixture(scope="module")
def ms_dataset(tmp_path_factory):
    """Two real MS patients saved as nnU-Net's numpy dataset (nnUNetDatasetNumpy.save_case)."""
    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetNumpy
    folder = tmp_path_factory.mktemp("ms_preprocessed")
    for patient in ("patient19", "patient26"):
        data, seg = ms_case(patient)
        nnUNetDatasetNumpy.save_case(data, seg, {"class_locations": {}}, str(folder / patient))
    return nnUNetDatasetNumpy(str(folder))


MS_JSON = {"labels": {"background": 0, "lesion": 1}}


def test_3d_components_are_pasted_into_the_brain_of_a_real_volume(ms_dataset):
    bank = extract_donors(ms_dataset, ["patient19", "patient26"], MS_JSON, ("rarest",), two_d=False)
    assert bank.host_classes == () and bank.paste_classes == (1,)      # no host class: background inside the body
    donors = bank.by_class[1]
    assert {donor.case_id for donor in donors} == {"patient19", "patient26"}
    assert all(donor.region.mask.ndim == 3 and donor.patch.image.shape[0] == 4 for donor in donors)
    assert any(donor.region.mask.shape[0] > 1 for donor in donors)        # components span several slices
    print(f"3D donor bank: {sum(len(d) for d in bank.by_class.values())} components, {bank.nbytes / 2 ** 20:.2f} MiB")
    image, seg = ms_case("patient07")
    patch = (slice(None), slice(20, 68), slice(25, 89), slice(15, 79))    # a 48 x 64 x 64 patch of the brain
    image, label_map = image[patch], seg[0][patch[1:]]
    rng = np.random.default_rng(0)
    new_image, new_map, pastes = paste_lesions(image, label_map, bank, 3, rng)
    assert pastes and all(paste["case_id"] in ("patient19", "patient26") for paste in pastes)
    changed = new_map != label_map
    assert changed.sum() == sum(paste["pixels"] for paste in pastes) > 0
    assert (label_map[changed] == 0).all() and (new_map[changed] == 1).all()     # only background gained lesion
    assert (image[0][changed] > image[0].min()).all()                           # inside the brain
    assert np.array_equal(new_map[~changed], label_map[~changed])
    # the image changes only at the pasted pixels and their feathered edge
    from scipy import ndimage
    near = ndimage.binary_dilation(changed, np.ones((3, 3, 3)), iterations=3)   # the feather: 2 pixels
    assert np.array_equal(new_image[:, ~near], image[:, ~near]) and not np.array_equal(new_image, image)


# ------------------------------------------------------------------------------------------- 2d, the trainer
@pytest.fixture
def paste_trainer(planned_dataset, monkeypatch):
    from nnunet_synth.trainers.lesion_paste import nnUNetTrainerLesionPaste
    for variable in ("nnsynth_ratio", "nnsynth_min_quality", "nnsynth_paste_classes"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("nnsynth_paste_probability", "1")
    monkeypatch.setenv("nnsynth_paste_components", "2")
    trainer = make_trainer(planned_dataset, nnUNetTrainerLesionPaste)
    trainer.batch_size = 4
    dataset_tr, dataset_val = trainer.get_tr_and_val_datasets()
    return trainer, dataset_tr, dataset_val


def test_donors_come_from_the_folds_training_cases_only(paste_trainer):
    trainer, dataset_tr, dataset_val = paste_trainer
    transform = trainer._paste_transform(dataset_tr)
    donor_cases = {donor.case_id for donors in transform.bank.by_class.values() for donor in donors}
    assert donor_cases and donor_cases <= set(dataset_tr.real_identifiers)
    assert not donor_cases & set(dataset_val.identifiers)
    assert transform.bank.host_classes == (1,) and transform.bank.paste_classes == (2,)    # lung hosts lesion
    report = load_json(trainer.output_folder + "/synthmix.json")["lesion_paste"]
    assert report["donor_cases"] == sorted(donor_cases) and report["donor_bytes"] == transform.bank.nbytes > 0
    print(f"2D donor bank of fold 0: {report['donors_per_class']} components, {report['donor_bytes'] / 2 ** 20:.2f} "
          f"MiB per process")


def test_pastes_overwrite_host_pixels_only_and_never_the_ignore_label(paste_trainer):
    trainer, dataset_tr, _ = paste_trainer
    bank = trainer._paste_transform(dataset_tr).bank
    case = dataset_tr.real_identifiers[0]
    data, seg, _, _ = dataset_tr.load_case(case)
    z = int(np.argmax((np.asarray(seg[0]) == 1).sum(axis=(1, 2))))      # the slice with the most lung
    image, label_map = np.asarray(data[:, z], dtype=np.float32), np.asarray(seg[0, z]).astype(np.int16)
    label_map[: label_map.shape[0] // 2][label_map[: label_map.shape[0] // 2] == 1] = 3   # upper half: as ignore
    rng = np.random.default_rng(1)
    for _ in range(20):
        new_image, new_map, pastes = paste_lesions(image, label_map, bank, 2, rng, exclude_case=case)
        changed = new_map != label_map
        assert (label_map[changed] == 1).all() and (new_map[changed] == 2).all()   # lung -> lesion, nothing else
        assert all(paste["case_id"] != case and paste["case_id"] in dataset_tr.real_identifiers for paste in pastes)
        assert changed.sum() == sum(paste["pixels"] for paste in pastes)


def batches_rare_share(trainer, dataset_tr, probability: float, batches: int = 12):
    """Share of lesion among lung + lesion pixels in the targets of nnU-Net's training loader, and the counts."""
    from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms

    from nnunet_synth.trainers.mixing import SynthMixDataLoader
    transform = trainer._paste_transform(dataset_tr)
    transform.probability = probability
    patch = trainer.configuration_manager.patch_size
    loader = SynthMixDataLoader(dataset_tr, 4, patch, patch, trainer.label_manager, synthetic_share=0.0,
                                oversample_foreground_percent=0.33, transforms=ComposeTransforms([transform]))
    np.random.seed(3)
    lung = lesion = 0
    for _ in range(batches):
        target = loader.generate_train_batch()["target"].numpy()
        lung, lesion = lung + (target == 1).sum(), lesion + (target == 2).sum()
    return lesion / (lung + lesion), transform.counts


def test_the_batches_rare_class_share_rises_with_the_paste_probability(paste_trainer):
    trainer, dataset_tr, _ = paste_trainer
    share_off, counts_off = batches_rare_share(trainer, dataset_tr, 0.0)
    share_on, counts_on = batches_rare_share(trainer, dataset_tr, 1.0)
    print(f"lesion share of lung + lesion in 48 training samples: p=0 {share_off:.4f}, p=1 {share_on:.4f}")
    assert counts_off["samples_pasted"] == 0 and counts_on["samples"] == 48
    assert counts_on["samples_pasted"] >= 40          # a sample without lung in its patch cannot receive a paste
    assert share_on > share_off + 0.01


@pytest.mark.slow
def test_stock_train_and_predict_with_the_paste_trainer(planned_dataset, synthetic_example_dataset, nnunet_folders,
                                                        tmp_path):
    trainer = "nnUNetTrainerLesionPaste_smoke"
    env = clean_environment(nnunet_folders, nnUNet_n_proc_DA="0", nnsynth_paste_probability="0.5")
    dataset = str(SYNTHMIX_DATASET_ID)
    run_command(["nnUNetv2_train", dataset, "2d", "0", "-tr", trainer, "-p", CPU_PLANS, "-device", "cpu"], env)
    fold_folder = (nnunet_folders["nnUNet_results"] / synthetic_example_dataset.name / f"{trainer}__{CPU_PLANS}__2d"
                   / "fold_0")
    report = load_json(fold_folder / "synthmix.json")
    assert report["settings"]["paste_probability"] == 0.5 and report["settings"]["ratio"] == 0.0
    counts = report["lesion_paste"]["counts"]
    assert counts["samples"] >= 10 * report["batch_size"] and 0 < counts["samples_pasted"] < counts["samples"]
    assert int(counts["pixels_added"]["2"]) > 0
    # --c with another paste probability is refused
    refused = subprocess.run(["nnUNetv2_train", dataset, "2d", "0", "-tr", trainer, "-p", CPU_PLANS, "-device", "cpu",
                              "--c"], env=dict(env, nnsynth_paste_probability="0.2"), capture_output=True, text=True,
                             timeout=600)
    assert refused.returncode == 2 and "nnsynth_paste_probability=0.5" in refused.stderr.strip().splitlines()[-1]
    splits = load_json(planned_dataset / "splits_final.json")
    input_folder, output_folder = tmp_path / "input", tmp_path / "predicted"
    input_folder.mkdir()
    case_id = splits[0]["val"][0]
    (input_folder / f"{case_id}_0000.nii.gz").write_bytes(
        (synthetic_example_dataset / "imagesTr" / f"{case_id}_0000.nii.gz").read_bytes())
    run_command(["nnUNetv2_predict", "-i", str(input_folder), "-o", str(output_folder), "-d", dataset, "-c", "2d",
                 "-p", CPU_PLANS, "-tr", trainer, "-f", "0", "-device", "cpu", "-npp", "0", "-nps", "0"], env)
    assert (output_folder / f"{case_id}.nii.gz").is_file()


def test_the_online_copy_paste_arm_trains_the_paste_trainer_of_the_same_budget():
    from nnunet_synth.evaluation.downstream import BUDGET_TRAINERS, PASTE_BUDGET_TRAINERS, DownstreamSettings, plan_arms
    from nnunet_synth.trainers.discovery import trainer_classes
    arms = plan_arms(DownstreamSettings(generators={}, arms=["real_only", "copy_paste_online"], amounts=[0.5]))
    real_only, online = arms
    assert not online.synthetic and online.ratio == 0.0 and online.paste_probability([0.5]) == pytest.approx(1 / 3)
    assert real_only.paste_probability([0.5]) == 0.0
    classes = trainer_classes()
    for budget in BUDGET_TRAINERS:
        assert online.trainer(budget) == PASTE_BUDGET_TRAINERS[budget] and online.trainer(budget) in classes
        assert classes[online.trainer(budget)].budget == classes[real_only.trainer(budget)].budget
