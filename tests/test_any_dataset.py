"""nnU-Net features other datasets use, on copies of the real data: the ignore label, region-based labels and
several input channels. Each dataset gets synthetic cases through the stock ``nnsynth_generate`` and passes
``nnUNetv2_plan_and_preprocess --verify_dataset_integrity`` with them present; the region-based and the
two-channel dataset are trained for a few (10) iterations with SynthMix through the stock ``nnUNetv2_train``. The
standalone export of each (real and synthetic cases together in imagesTr) passes nnU-Net's integrity check too.

- Dataset940: the small real example with the right 30 % of every slice unannotated (``"ignore": 3``).
- Dataset941: the small real example with region-based labels (``"lung": [1, 2], "lesion": 2``, as BraTS declares
  its tumour regions).
- Dataset942: the real HU CT as two channels, two CT windows (full HU range and soft tissue [-160, 240]).
"""
import json

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import run_entry_point
from sampled_fingerprint import write_sampled_fingerprint
from test_five_folds import CPU_PLANS, environment, run

from nnunet_synth.dataset import RawDataset, fit_slice
from nnunet_synth.dataset.writing import write_dataset_json_atomic, write_volume
from nnunet_synth.generator import TrainingSettings, load_generator
from nnunet_synth.generator.checkpoints import generator_run_folder, read_generator_config
from nnunet_synth.generator.training import train_generator
from nnunet_synth.nnunet_paths import nnunet_folder
from nnunet_synth.sampling import sample_images
from nnunet_synth.writer.synthetic_store import SyntheticStore

TRAINER = "nnUNetTrainerSynthMix_smoke"      # 10 iterations: the pipeline runs, nothing more

IGNORE_ID, REGION_ID, TWO_CHANNEL_ID = 940, 941, 942
EXPORT_IDS = {IGNORE_ID: 943, REGION_ID: 944, TWO_CHANNEL_ID: 945}
IGNORE = 3
SOFT_TISSUE = (-160, 240)
NUM_CASES = 4


def copy_with(source_folder, target_folder, labels, channel_names=None, transform_label=None,
              channel_images=None, **json_extra):
    """A copy of a real raw dataset with other labels (``transform_label``) or channels (``channel_images``)."""
    source = RawDataset(source_folder)
    for folder in ("imagesTr", "labelsTr"):
        (target_folder / folder).mkdir(parents=True, exist_ok=True)
    for case_id in source.case_ids:
        files = source.cases[case_id]
        image = sitk.ReadImage(files["images"][0])
        label = sitk.ReadImage(files["label"])
        images = [image] if channel_images is None else channel_images(image)
        for channel, channel_image in enumerate(images):
            sitk.WriteImage(channel_image, str(target_folder / "imagesTr" / f"{case_id}_{channel:04d}.nii.gz"))
        if transform_label is not None:
            array = transform_label(sitk.GetArrayFromImage(label))
            write_volume(array.astype(np.uint8), target_folder / "labelsTr" / f"{case_id}.nii.gz",
                         label.GetSpacing(), label.GetOrigin(), label.GetDirection())
        else:
            sitk.WriteImage(label, str(target_folder / "labelsTr" / f"{case_id}.nii.gz"))
    write_dataset_json_atomic(target_folder, channel_names=channel_names or source.channel_names, labels=labels,
                              num_training_cases=len(source.case_ids), file_ending=".nii.gz",
                              dataset_name=target_folder.name, **json_extra)
    return RawDataset(target_folder)


def generate(dataset, nnunet_folders):
    """A 2-step 32 px generator for fold 0 where nnsynth_generate looks for it, then the stock command."""
    fast = TrainingSettings(preset="tiny", image_size=32, batch_size=4, max_steps=2, warmup_steps=1,
                            checkpoint_every=100, preview_every=100, preview_inference_steps=2)
    train_generator(dataset, generator_run_folder(dataset.name, "tiny", 0), fast, fold=0, progress=False)
    dataset_id = dataset.name[len("Dataset"):len("Dataset") + 3]
    env = environment(nnunet_folders)
    result = run(["nnsynth_generate", dataset_id, "--fold", "0", "--preset", "tiny", "-n", str(NUM_CASES),
                  "--inference-steps", "2", "--device", "cpu"], env)
    write_sampled_fingerprint(dataset_id, env)           # the fingerprint's code on 10^5 samples, not 10^8
    run(["nnUNetv2_plan_and_preprocess", "-d", dataset_id, "-c", "2d", "-np", "1", "-npfp", "1",
         "--verify_dataset_integrity"],
        env)
    return SyntheticStore(dataset), result


def check_export_integrity(dataset):
    """Real and synthetic cases side by side in one imagesTr (the standalone export): nnU-Net's integrity check."""
    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity

    from nnunet_synth.writer.standalone_export import export_standalone
    dataset_id = int(dataset.name[len("Dataset"):len("Dataset") + 3])
    export = export_standalone(dataset, nnunet_folder("nnUNet_raw"), nnunet_folder("nnUNet_preprocessed"),
                               EXPORT_IDS[dataset_id])
    verify_dataset_integrity(str(export), num_processes=1)      # raises on any problem
    exported = RawDataset(export)
    assert len(exported.case_ids) == len(dataset.case_ids) + len(SyntheticStore(dataset).complete_case_ids())
    return exported


def train_synthmix(dataset, nnunet_folders):
    """The stock nnUNetv2_train, smoke budget, CPU plans, half of every batch synthetic (a 2-step generator's cases:
    the quality filter off); returns synthmix.json."""
    from nnunet_synth.evaluation.cpu_plans import write_cpu_plans
    write_cpu_plans(nnunet_folders["nnUNet_preprocessed"] / dataset.name, "2d", "nnUNetPlans", CPU_PLANS)
    env = dict(environment(nnunet_folders), nnUNet_n_proc_DA="0", nnsynth_ratio="0.5", nnsynth_min_quality="none")
    run(["nnUNetv2_train", dataset.name[len("Dataset"):len("Dataset") + 3], "2d", "0", "-tr", TRAINER, "-p",
         CPU_PLANS, "-device", "cpu"], env)
    fold_folder = nnunet_folders["nnUNet_results"] / dataset.name / f"{TRAINER}__{CPU_PLANS}__2d" / "fold_0"
    assert (fold_folder / "checkpoint_final.pth").is_file()
    return json.loads((fold_folder / "synthmix.json").read_text())


# ---------------------------------------------------------------- the ignore label
@pytest.fixture(scope="module")
def ignore_dataset(example_dataset_folder, nnunet_folders):
    def unannotated_right_side(label):
        label = label.copy()
        label[..., int(0.7 * label.shape[-1]):] = IGNORE
        return label
    dataset = copy_with(example_dataset_folder, nnunet_folders["nnUNet_raw"] / f"Dataset{IGNORE_ID}_IgnoreExample",
                        {"background": 0, "lung": 1, "lesion": 2, "ignore": IGNORE},
                        transform_label=unannotated_right_side)
    store, result = generate(dataset, nnunet_folders)
    return dataset, store, result


@pytest.mark.slow
def test_ignore_is_never_counted_balanced_or_pasted_and_written_labels_keep_it(ignore_dataset):
    dataset, store, result = ignore_dataset
    assert dataset.ignore_label == IGNORE and dataset.annotated_labels == [0, 1, 2]
    config = read_generator_config(generator_run_folder(dataset.name, "tiny", 0) / "final")
    assert config.class_frequencies["ignore"] == 0.0
    assert config.ablation["delta_c"]["ignore"] == 0.0 and config.ablation["delta_c"]["lesion"] > 0
    report = store.fold_record("0")["label_map_report"]
    assert report["host_classes"] == [1] and report["pathology_classes"] == [2]
    case_ids = store.complete_case_ids("0")
    assert len(case_ids) == NUM_CASES
    reader = dataset.reader_writer()
    size = config.image_size
    lesion_added = 0
    for case_id in case_ids:
        entry = store.cases[case_id]
        assert {paste["class"] for paste in entry["source"]["pastes"]} == {2}
        assert all(paste["donor"]["class"] == 2 for paste in entry["source"]["pastes"])
        written = reader.read_seg(str(store.label_file(case_id)))[0][0, 0].astype(np.int16)
        target = entry["source"]["target"]
        real_image, real_label, _ = dataset.read_case(target["case_id"])
        real_slice = real_label[target["slice_index"]]
        assert (real_slice == IGNORE).any()
        # the label written is the conditioning map at the slice's geometry; at the model size (where the map was
        # made and pasted into) ignore lies exactly where the target slice had it
        image = real_image[:, target["slice_index"]]
        written_model_map = fit_slice(image, written, size)[1]
        target_model_map = fit_slice(image, real_slice, size)[1]
        np.testing.assert_array_equal(written_model_map == IGNORE, target_model_map == IGNORE)
        lesion_added += int((written_model_map == 2).sum() - (target_model_map == 2).sum())
        assert (written_model_map[target_model_map == 2] == 2).all()      # pastes only add lesion
    assert lesion_added > 0
    assert check_export_integrity(dataset).ignore_label == IGNORE


def test_ignore_pixels_condition_the_generator_as_unknown(ignore_dataset):
    """In the condition an unannotated pixel is background, as an ablated class's pixel is (CBMAT's "unknown")."""
    dataset, store, _ = ignore_dataset
    unet, config = load_generator(generator_run_folder(dataset.name, "tiny", 0), dataset)
    _, label, _ = dataset.read_case(dataset.case_ids[0])
    maps = np.stack([fit_slice(np.zeros((1, *s.shape)), s, config.image_size)[1] for s in label[:3]])
    assert (maps == IGNORE).any()
    with_ignore = sample_images(unet, config, maps, [1, 2, 3], num_inference_steps=2, progress=False)
    as_background = sample_images(unet, config, np.where(maps == IGNORE, 0, maps), [1, 2, 3],
                                  num_inference_steps=2, progress=False)
    np.testing.assert_array_equal(with_ignore, as_background)


def test_ignore_cannot_be_named_a_pathology_class(ignore_dataset, nnunet_folders, capsys):
    from nnunet_synth.dataset_tools.generate import main
    dataset, _, _ = ignore_dataset
    code, _, error = run_entry_point(main, [IGNORE_ID, "--fold", "0", "--preset", "tiny", "-n", "1",
                                            "--pathology-classes", "ignore", "--device", "cpu", "--overwrite"], capsys)
    assert code != 0 and "Traceback" not in error
    assert "unannotated pixels" in error and "dataset.json" in error


# ---------------------------------------------------------------- region-based labels
@pytest.mark.slow
def test_region_based_dataset_generates_and_trains_with_synthmix(example_dataset_folder, nnunet_folders):
    dataset = copy_with(example_dataset_folder, nnunet_folders["nnUNet_raw"] / f"Dataset{REGION_ID}_RegionExample",
                        {"background": 0, "lung": [1, 2], "lesion": 2}, regions_class_order=[1, 2])
    # generation works on the integers in the label files; the regions go to nnU-Net untouched
    assert dataset.regions == {"background": 0, "lung": [1, 2], "lesion": 2}
    assert dataset.labels == {"background": 0, "label_1": 1, "lesion": 2}
    store, _ = generate(dataset, nnunet_folders)
    report = store.fold_record("0")["label_map_report"]
    assert report["pathology_classes"] == [2]        # the rarest integer label is balanced
    assert len(store.complete_case_ids("0")) == NUM_CASES
    preprocessed_json = json.loads((nnunet_folders["nnUNet_preprocessed"] / dataset.name / "dataset.json").read_text())
    assert preprocessed_json["labels"]["lung"] == [1, 2] and preprocessed_json["regions_class_order"] == [1, 2]
    summary = train_synthmix(dataset, nnunet_folders)
    assert len(summary["used_synthetic_cases"]) == NUM_CASES
    assert check_export_integrity(dataset).regions == dataset.regions


# ---------------------------------------------------------------- several input channels
@pytest.mark.slow
def test_two_channel_dataset_generates_both_channels_and_trains(real_hu_dataset_folder, nnunet_folders):
    def two_ct_windows(image):
        soft_tissue = sitk.Clamp(sitk.Cast(image, sitk.sitkInt16), sitk.sitkInt16, *SOFT_TISSUE)
        return [image, soft_tissue]
    source = RawDataset(real_hu_dataset_folder)
    dataset = copy_with(real_hu_dataset_folder, nnunet_folders["nnUNet_raw"] / f"Dataset{TWO_CHANNEL_ID}_TwoWindowCT",
                        source.dataset_json["labels"], channel_names={0: "CT", 1: "soft tissue"},
                        channel_images=two_ct_windows)
    assert dataset.num_channels == 2
    store, _ = generate(dataset, nnunet_folders)
    config = read_generator_config(generator_run_folder(dataset.name, "tiny", 0) / "final")
    assert config.num_channels == 2
    assert [window["source"] for window in config.window] == ["hounsfield", "percentile_0.5_99.5"]
    assert config.window[1]["lower"] >= SOFT_TISSUE[0] and config.window[1]["upper"] <= SOFT_TISSUE[1]
    case_ids = store.complete_case_ids("0")
    assert len(case_ids) == NUM_CASES
    for case_id in case_ids:
        files = [store.image_file(case_id, channel) for channel in (0, 1)]
        assert [path.name for path in files] == [f"{case_id}_0000.nii.gz", f"{case_id}_0001.nii.gz"]
        channels = [sitk.GetArrayFromImage(sitk.ReadImage(str(path))) for path in files]
        label = sitk.GetArrayFromImage(sitk.ReadImage(str(store.label_file(case_id))))
        assert channels[0].shape == channels[1].shape == label.shape
        # each channel in its own window and pixel type, as the real files are
        assert channels[1].dtype == np.int16
        assert SOFT_TISSUE[0] <= channels[1].min() and channels[1].max() <= SOFT_TISSUE[1]
        assert channels[0].min() >= -1000 and channels[0].max() <= 1000
        quality = store.cases[case_id]["quality"]["model_free"]
        assert len(quality["channels"]) == 2
        assert quality["score"] == min(channel["score"] for channel in quality["channels"])
        assert store.cases[case_id]["images"] == [f"imagesSynth/{path.name}" for path in files]
    summary = train_synthmix(dataset, nnunet_folders)
    assert len(summary["used_synthetic_cases"]) == NUM_CASES
    assert check_export_integrity(dataset).num_channels == 2
