"""nnUNetTrainerSynthMix: settings, quality filter, synthetic pool, mixing data loader, discovery, and a real
end-to-end run of the stock nnU-Net commands on the example data (CPU, small plans)."""
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk
from synthetic_fixtures import (
    CPU_PLANS,
    NUM_SCORED_CASES,
    PLANS,
    SYNTHMIX_DATASET_ID,
    clean_environment,
    load_json,
    load_plans,
    make_trainer,
    run_command,
    stand_in_pathology_iou,
    stand_in_score,
)

from nnunet_synth.dataset.raw_dataset import RawDataset
from nnunet_synth.errors import NnsynthError
from nnunet_synth.trainers.mixing import SynthMixDataLoader, SynthMixDataset, select_synthetic_cases, synthetic_count
from nnunet_synth.trainers.settings import resolve_settings
from nnunet_synth.trainers.synthetic_pool import pool_folder, pool_record_file, update_synthetic_pool
from nnunet_synth.trainers.variants.budgets import BUDGETS
from nnunet_synth.writer.synthetic_store import SyntheticStore, synthetic_case_id

TRAINER = "nnUNetTrainerSynthMix_debug"
MIN_QUALITY = 0.3
SYNTH_99 = synthetic_case_id(99, 0)


def update_pool(raw_folder, preprocessed, plans=None):
    return update_synthetic_pool(raw_folder, preprocessed, plans or load_plans(preprocessed), "2d",
                                 load_json(preprocessed / "dataset.json"), log=lambda message: None)


# ------------------------------------------------------------------------------------------- settings
def test_settings_come_from_environment_or_defaults():
    settings = resolve_settings("nnUNetTrainerSynthMix", {}, environ={})
    # by default only the cases that pass the model-free gate are used (0.5 is its threshold score)
    assert (settings.ratio, settings.min_quality, settings.quality_key) == (0.5, 0.5, "model_free")
    settings = resolve_settings("nnUNetTrainerSynthMix", {}, environ={
        "nnsynth_ratio": "0.3", "nnsynth_min_quality": "0.7", "nnsynth_quality_key": "segmentation"})
    assert (settings.ratio, settings.min_quality, settings.quality_key) == (0.3, 0.7, "segmentation")
    assert {name: settings.sources[name] for name in ("ratio", "min_quality", "quality_key")} == {
        "ratio": "environment", "min_quality": "environment", "quality_key": "environment"}
    assert settings.sources["seed"] == "default"
    assert resolve_settings("x", {}, environ={"nnsynth_min_quality": "none"}).min_quality is None


def test_ratio_variant_refuses_a_contradicting_environment_ratio():
    fixed = {"ratio": 0.25}
    assert resolve_settings("nnUNetTrainerSynthMix_r25", fixed, environ={}).sources["ratio"] == "trainer"
    assert resolve_settings("nnUNetTrainerSynthMix_r25", fixed, environ={"nnsynth_ratio": "0.25"}).ratio == 0.25
    with pytest.raises(NnsynthError, match="nnsynth_ratio=0.5: trainer nnUNetTrainerSynthMix_r25 fixes ratio=0.25"):
        resolve_settings("nnUNetTrainerSynthMix_r25", fixed, environ={"nnsynth_ratio": "0.5"})


@pytest.mark.parametrize("variable, value", [("nnsynth_ratio", "1.5"), ("nnsynth_ratio", "half"),
                                             ("nnsynth_min_quality", "good"), ("nnsynth_quality_key", "fid")])
def test_bad_setting_values_are_one_line_errors(variable, value):
    with pytest.raises(NnsynthError, match=variable):
        resolve_settings("nnUNetTrainerSynthMix", {}, environ={variable: value})


def test_stochastic_rounding_of_the_synthetic_count():
    assert [synthetic_count(0.25, 2, u) for u in (0.0, 0.49, 0.5, 0.99)] == [1, 1, 0, 0]
    assert synthetic_count(0.3, 10, 0.999) == 3           # no spurious extra case from 3.0000000000000004
    assert synthetic_count(1.0, 4, 0.0) == 4 and synthetic_count(0.0, 4, 0.0) == 0


# ------------------------------------------------------------------------------------------- quality filter
@pytest.mark.parametrize("threshold", [0.0, 0.3, 0.45, 0.93, 0.95])
def test_quality_filter_drops_exactly_the_cases_below_the_threshold(synthetic_example_dataset, threshold):
    store = SyntheticStore(RawDataset(synthetic_example_dataset))
    case_ids = store.complete_case_ids()
    scores = {synthetic_case_id(i, 0): stand_in_score(i) for i in range(NUM_SCORED_CASES)}
    selection = select_synthetic_cases(store.cases, case_ids, threshold, "model_free")
    assert selection.below_threshold == sorted(c for c, s in scores.items() if s < threshold)
    assert selection.used == sorted(c for c, s in scores.items() if s >= threshold)
    assert selection.unscored == sorted(set(case_ids) - set(scores))     # no quality entry: left out


def test_quality_filter_reads_the_chosen_quality_key(synthetic_example_dataset):
    store = SyntheticStore(RawDataset(synthetic_example_dataset))
    case_ids = store.complete_case_ids()
    by_dice = select_synthetic_cases(store.cases, case_ids, 0.5, "segmentation")
    assert by_dice.used == sorted(c for c in case_ids[:NUM_SCORED_CASES]
                                  if store.cases[c]["quality"]["segmentation"]["mean_dice"] >= 0.5)
    assert by_dice.used != select_synthetic_cases(store.cases, case_ids, 0.5, "model_free").used
    assert select_synthetic_cases(store.cases, case_ids, None, "model_free").used == case_ids   # no filter
    by_iou = select_synthetic_cases(store.cases, case_ids, 0.7, "pathology_iou")     # DiffAug's gate
    assert by_iou.used == sorted(synthetic_case_id(i, 0) for i in range(NUM_SCORED_CASES)
                                 if stand_in_pathology_iou(i) >= 0.7)
    assert by_iou.used != by_dice.used
    # scores of fold 0's model are not used to filter fold 1's training data (that model saw fold 1's validation)
    assert select_synthetic_cases(store.cases, case_ids, 0.7, "pathology_iou", fold=0).used == by_iou.used
    for key in ("pathology_iou", "segmentation"):
        fold_1 = select_synthetic_cases(store.cases, case_ids, 0.7, key, fold=1)
        assert fold_1.used == [] and fold_1.scored_by_another_fold == case_ids[:NUM_SCORED_CASES]


# ------------------------------------------------------------------------------------------- synthetic pool
def test_pool_is_preprocessed_beside_the_real_data_with_the_real_plans(planned_dataset, synthetic_example_dataset):
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

    from nnunet_synth.dataset_tools.preprocess_synthetic import main
    real_folder = planned_dataset / "nnUNetPlans_2d"
    real_files = sorted(os.listdir(real_folder))
    main([str(SYNTHMIX_DATASET_ID), "-c", "2d", "-p", PLANS])
    pool = pool_folder(planned_dataset, "nnUNetPlans_2d")
    store = SyntheticStore(RawDataset(synthetic_example_dataset))
    expected = {f"{c}{suffix}" for c in store.complete_case_ids() for suffix in (".b2nd", "_seg.b2nd", ".pkl")}
    assert set(os.listdir(pool)) == expected                       # case files only: no json in the pool
    infer_dataset_class(str(pool))                                 # nnU-Net can read it
    assert sorted(os.listdir(real_folder)) == real_files           # the real folder is untouched
    assert pool_record_file(pool).parent == planned_dataset        # metadata lives outside the pool
    # the CPU plans share the data identifier and the preprocessing: the same pool, nothing redone
    report = update_pool(synthetic_example_dataset, planned_dataset, load_plans(planned_dataset, CPU_PLANS))
    assert report.preprocessed == [] and len(report.reused) == len(store.complete_case_ids())


def test_pool_update_follows_the_manifest_and_the_plans(planned_dataset, synthetic_example_dataset):
    update_pool(synthetic_example_dataset, planned_dataset)
    dataset = RawDataset(synthetic_example_dataset)
    store = SyntheticStore(dataset)
    image, label_map, properties = dataset.read_case(dataset.case_ids[0])
    store.write_case(SYNTH_99, [image[0, 0]], label_map[0], properties, [dataset.source_dtype(dataset.case_ids[0])],
                     {"quality": {"model_free": {"score": 0.9, "passed": True}}})
    report = update_pool(synthetic_example_dataset, planned_dataset)
    assert report.preprocessed == [SYNTH_99] and not report.rebuilt
    store.image_file(SYNTH_99).unlink()
    store.label_file(SYNTH_99).unlink()
    store.record_file(SYNTH_99).unlink()
    report = update_pool(synthetic_example_dataset, planned_dataset)
    assert report.removed == [SYNTH_99] and report.preprocessed == []
    assert not (report.folder / f"{SYNTH_99}.b2nd").exists()
    changed_plans = load_plans(planned_dataset)
    changed_plans["foreground_intensity_properties_per_channel"]["0"]["mean"] += 1.0
    report = update_pool(synthetic_example_dataset, planned_dataset, changed_plans)
    assert report.rebuilt and len(report.preprocessed) == len(store.complete_case_ids())
    report = update_pool(synthetic_example_dataset, planned_dataset)          # back to the real plans
    assert report.rebuilt and report.reused == []


def test_interrupted_pool_preprocessing_leaves_whole_cases_and_resumes(planned_dataset, synthetic_example_dataset,
                                                                      monkeypatch):
    from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor
    pool = pool_folder(planned_dataset, "nnUNetPlans_2d")
    shutil.rmtree(pool)
    pool_record_file(pool).unlink()
    original, calls = DefaultPreprocessor.run_case_save, []

    def interrupted_after_three(self, output_filename_truncated, *args, **kwargs):
        if len(calls) == 3:
            open(output_filename_truncated + ".b2nd", "w").close()       # a half-written file in staging
            raise KeyboardInterrupt
        calls.append(output_filename_truncated)
        return original(self, output_filename_truncated, *args, **kwargs)

    monkeypatch.setattr(DefaultPreprocessor, "run_case_save", interrupted_after_three)
    with pytest.raises(KeyboardInterrupt):
        update_pool(synthetic_example_dataset, planned_dataset)
    monkeypatch.setattr(DefaultPreprocessor, "run_case_save", original)
    files = sorted(os.listdir(pool))
    assert len(files) == 9 and all(f.startswith("synth_f0_0000") for f in files)   # three whole cases, nothing else
    assert sorted(load_json(pool_record_file(pool))["cases"]) == [synthetic_case_id(i, 0) for i in range(3)]
    report = update_pool(synthetic_example_dataset, planned_dataset)
    assert report.reused == [synthetic_case_id(i, 0) for i in range(3)]
    assert len(report.preprocessed) == len(report.case_ids) - 3
    assert not pool.with_name(pool.name + ".partial").exists()


def test_preprocess_command_reports_missing_plans_in_one_line(planned_dataset, capsys):
    from nnunet_synth.dataset_tools.preprocess_synthetic import main
    with pytest.raises(SystemExit) as exit_info:
        main([str(SYNTHMIX_DATASET_ID), "-c", "2d", "-p", "NoSuchPlans"])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and "NoSuchPlans.json is missing" in error


# ------------------------------------------------------------------------------------------- data loader
@pytest.fixture(scope="module")
def mixed_dataset(planned_dataset, synthetic_example_dataset):
    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    report = update_pool(synthetic_example_dataset, planned_dataset)
    real_ids = nnUNetDatasetBlosc2.get_identifiers(str(planned_dataset / "nnUNetPlans_2d"))
    data = SynthMixDataset(nnUNetDatasetBlosc2(str(planned_dataset / "nnUNetPlans_2d"), real_ids),
                           nnUNetDatasetBlosc2(str(report.folder), report.case_ids))
    label_manager = PlansManager(load_plans(planned_dataset)).get_label_manager(
        load_json(planned_dataset / "dataset.json"))
    return data, label_manager


@pytest.mark.parametrize("ratio, batch_size", [(0.25, 2), (0.3, 5), (0.5, 2), (0.75, 3)])
def test_empirical_synthetic_fraction_matches_the_ratio(mixed_dataset, ratio, batch_size):
    data, label_manager = mixed_dataset
    loader = SynthMixDataLoader(data, batch_size, (256, 256), (256, 256), label_manager, synthetic_share=ratio,
                                oversample_foreground_percent=0.33)
    np.random.seed(1234)
    num_batches = 4000
    per_batch = np.zeros(num_batches, dtype=int)
    per_position = np.zeros(batch_size, dtype=int)
    for b in range(num_batches):
        synthetic = [data.is_synthetic(key) for key in loader.get_indices()]
        per_batch[b] = sum(synthetic)
        per_position += synthetic
    expected = ratio * batch_size
    frac = expected - np.floor(expected)
    assert set(per_batch) <= {int(np.floor(expected)), int(np.ceil(expected))}
    # total synthetic count: N * floor(rB) + Binomial(N, frac(rB)); allow 4.5 standard deviations
    tolerance = 4.5 * np.sqrt(num_batches * frac * (1 - frac)) + 1e-9
    assert abs(per_batch.sum() - num_batches * expected) <= tolerance
    assert abs(per_batch.mean() / batch_size - ratio) <= tolerance / (num_batches * batch_size) + 1e-9
    if 0 < expected < batch_size:       # shuffled: synthetic keys reach every position of the batch
        assert per_position.min() > 0


def test_mixed_batches_load_real_and_synthetic_cases(mixed_dataset):
    data, label_manager = mixed_dataset
    loader = SynthMixDataLoader(data, 4, (256, 256), (256, 256), label_manager, synthetic_share=0.5,
                                oversample_foreground_percent=0.33)
    np.random.seed(0)
    batch = loader.generate_train_batch()
    assert tuple(batch["data"].shape) == (4, 1, 256, 256) and tuple(batch["target"].shape) == (4, 1, 256, 256)
    assert sum(data.is_synthetic(key) for key in batch["keys"]) == 2


def test_rare_class_oversampling_draws_slices_that_contain_the_rarest_class(mixed_dataset):
    """With the lesion's locations of a real case cut down to one slice, oversampling with probability 1 always draws
    that slice; without it, on the same seed, other slices are drawn."""
    data, label_manager = mixed_dataset
    case = data.real_identifiers[0]
    image, _, _, properties = data.load_case(case)
    locations = {key: np.asarray(value) for key, value in properties["class_locations"].items()}
    one_slice = int(locations[2][0][1])
    locations[2] = locations[2][locations[2][:, 1] == one_slice]

    def drawn_slices(probability):
        loader = SynthMixDataLoader(data, 2, (256, 256), (256, 256), label_manager, synthetic_share=0.0,
                                    oversample_foreground_percent=0.0)
        if probability:
            loader.enable_rare_oversampling(2, probability)
        np.random.seed(7)
        return {int(loader.get_bbox(image.shape[1:], False, locations)[0][0]) for _ in range(200)}

    assert drawn_slices(1.0) == {one_slice}
    assert len(drawn_slices(0.0)) > 1


def test_mixing_loader_works_in_a_spawned_worker(mixed_dataset):
    """Data-augmentation workers unpickle the loader; under spawn they import it from the installed package."""
    import multiprocessing
    data, label_manager = mixed_dataset
    loader = SynthMixDataLoader(data, 4, (256, 256), (256, 256), label_manager, synthetic_share=0.5)
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        keys = pool.apply(SynthMixDataLoader.get_indices, (loader,))
    assert len(keys) == 4 and sum(data.is_synthetic(key) for key in keys) == 2


# ------------------------------------------------------------------------------------------- trainer
def one_line_exit(capsys, function, *args) -> str:
    """Call ``function``; it must exit with status 2 and one ``nnsynth: error:`` line on stderr, returned."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        function(*args)
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("nnsynth: error: ") and "\n" not in error, error
    return error


def test_a_fold_without_cases_of_its_own_stops_in_one_line_naming_the_command(planned_dataset, nnunet_folders,
                                                                              monkeypatch, capsys):
    """Only fold-0 synthetic cases exist: they depend on fold 1's validation cases, so fold 1 may use none."""
    from nnunet_synth.trainers.variants.budgets import nnUNetTrainerSynthMix_debug
    monkeypatch.delenv("nnsynth_ratio", raising=False)
    monkeypatch.delenv("nnsynth_min_quality", raising=False)
    expected = f"nnsynth_generate Dataset{SYNTHMIX_DATASET_ID}_SynthMixExample --fold 1"
    assert expected in one_line_exit(capsys, make_trainer(planned_dataset, nnUNetTrainerSynthMix_debug,
                                                          fold=1).get_tr_and_val_datasets)
    dataset_tr, _ = make_trainer(planned_dataset, nnUNetTrainerSynthMix_debug, fold=0).get_tr_and_val_datasets()
    # by default only the cases that pass the model-free gate (score >= 0.5); the unscored case is left out
    passing = sorted(synthetic_case_id(i, 0) for i in range(NUM_SCORED_CASES) if stand_in_score(i) >= 0.5)
    assert sorted(dataset_tr.synthetic_identifiers) == passing and 0 < len(passing) < NUM_SCORED_CASES
    monkeypatch.setenv("nnsynth_min_quality", "none")
    dataset_tr, _ = make_trainer(planned_dataset, nnUNetTrainerSynthMix_debug, fold=0).get_tr_and_val_datasets()
    assert len(dataset_tr.synthetic_identifiers) == NUM_SCORED_CASES + 1
    monkeypatch.delenv("nnsynth_min_quality")
    # the stock command: exit status 2 and one line, no traceback
    result = subprocess.run(["nnUNetv2_train", str(SYNTHMIX_DATASET_ID), "2d", "1", "-tr", TRAINER, "-p", CPU_PLANS,
                             "-device", "cpu"], env=clean_environment(nnunet_folders, nnUNet_n_proc_DA="0"),
                            capture_output=True, text=True, timeout=1200)
    assert result.returncode == 2, result.stderr[-2000:]
    # stderr also holds torch's FutureWarnings from nnU-Net's imports; ours is the one last line
    last_line = result.stderr.strip().splitlines()[-1]
    assert "Traceback" not in result.stderr and result.stderr.count("nnsynth: error:") == 1
    assert last_line.startswith("nnsynth: error:") and expected in last_line


def test_no_case_passing_the_quality_filter_stops_in_one_line_naming_the_override(planned_dataset, monkeypatch,
                                                                                 capsys):
    from nnunet_synth.trainers.variants.budgets import nnUNetTrainerSynthMix_debug
    monkeypatch.delenv("nnsynth_ratio", raising=False)
    monkeypatch.setenv("nnsynth_min_quality", "0.99")       # above every stand-in score
    error = one_line_exit(capsys, make_trainer(planned_dataset, nnUNetTrainerSynthMix_debug).get_tr_and_val_datasets)
    assert "passes the model_free quality gate (score >= 0.99)" in error and "nnsynth_min_quality=none" in error


def test_variant_trainer_refuses_contradicting_environment(planned_dataset, monkeypatch, capsys):
    from nnunet_synth.trainers.variants.ratios import nnUNetTrainerSynthMix_r25
    monkeypatch.setenv("nnsynth_ratio", "0.5")
    error = one_line_exit(capsys, make_trainer, planned_dataset, nnUNetTrainerSynthMix_r25)
    assert "nnsynth_ratio=0.5: trainer nnUNetTrainerSynthMix_r25 fixes ratio=0.25" in error


def test_3d_patches_refuse_single_slice_synthetic_cases_unless_real_only(planned_dataset, monkeypatch, capsys):
    from nnunet_synth.trainers.synth_mix import nnUNetTrainerSynthMix
    from nnunet_synth.trainers.variants.ratios import nnUNetTrainerSynthMix_r0
    plans = load_plans(planned_dataset, CPU_PLANS)
    pseudo_3d = dict(plans["configurations"]["2d"], patch_size=[4, 128, 128], spacing=[1.0, 1.0, 1.0])
    plans["configurations"]["3d_test"] = pseudo_3d
    monkeypatch.delenv("nnsynth_ratio", raising=False)
    error = one_line_exit(capsys, make_trainer(planned_dataset, nnUNetTrainerSynthMix, "3d_test",
                                               plans).get_tr_and_val_datasets)
    assert "are single slices, and '3d_test' trains 3D patches" in error and "--unit volume" in error
    dataset_tr, _ = make_trainer(planned_dataset, nnUNetTrainerSynthMix_r0, "3d_test", plans).get_tr_and_val_datasets()
    assert dataset_tr.synthetic_identifiers == []


def test_trainers_are_found_through_nnunet_ext_trainer(monkeypatch):
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    from nnunet_synth.dataset_tools.trainer_dir import trainer_directory
    from nnunet_synth.trainers.discovery import TRAINER_MODULES, trainer_classes
    monkeypatch.setenv("nnUNet_extTrainer", str(trainer_directory()))
    classes = trainer_classes()
    assert {"nnUNetTrainerSynthMix", "nnUNetTrainerSynthMix_r25", TRAINER,
            "nnUNetTrainerSynthMix_medium"} <= set(classes)
    for name, trainer_class in classes.items():
        assert recursive_find_trainer_class_by_name(name) is trainer_class
        assert trainer_class.__module__ in TRAINER_MODULES   # defined in the installed package: picklable under spawn


def test_a_failing_import_does_not_abort_nnunet_lookup(monkeypatch):
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    from nnunet_synth.dataset_tools.trainer_dir import trainer_directory
    monkeypatch.setenv("nnUNet_extTrainer", str(trainer_directory()))
    monkeypatch.setitem(sys.modules, "nnunet_synth.trainers.synth_mix", None)     # import now fails
    with pytest.warns(UserWarning, match="nnunet-synth trainers are unavailable"):
        with pytest.raises(RuntimeError, match="Could not find requested nnunet trainer"):
            recursive_find_trainer_class_by_name("nnUNetTrainerSynthMix")


# ------------------------------------------------------------------------------------------- end to end
def dice(prediction: np.ndarray, reference: np.ndarray, value: int) -> float:
    predicted, expected = prediction == value, reference == value
    denominator = predicted.sum() + expected.sum()
    return float(2 * (predicted & expected).sum() / denominator) if denominator else float("nan")


@pytest.mark.slow
def test_stock_commands_train_validate_continue_and_predict(planned_dataset, synthetic_example_dataset,
                                                           nnunet_folders, tmp_path, monkeypatch):
    env = clean_environment(nnunet_folders, nnUNet_n_proc_DA="0", nnsynth_ratio="0.5",
                            nnsynth_min_quality=str(MIN_QUALITY))
    dataset = str(SYNTHMIX_DATASET_ID)
    train = ["nnUNetv2_train", dataset, "2d", "0", "-tr", TRAINER, "-p", CPU_PLANS, "-device", "cpu"]
    run_command(train, env)
    model_folder = nnunet_folders["nnUNet_results"] / synthetic_example_dataset.name / f"{TRAINER}__{CPU_PLANS}__2d"
    fold_folder = model_folder / "fold_0"
    assert (fold_folder / "checkpoint_final.pth").is_file()

    # effective settings and counts, in the results folder and the log
    summary = load_json(fold_folder / "synthmix.json")
    assert summary["settings"]["ratio"] == 0.5 and summary["settings"]["min_quality"] == MIN_QUALITY
    below = sorted(synthetic_case_id(i, 0) for i in range(NUM_SCORED_CASES) if stand_in_score(i) < MIN_QUALITY)
    assert summary["left_out"] == {"below_threshold": below, "unscored": [synthetic_case_id(NUM_SCORED_CASES, 0)],
                                   "scored_by_another_fold": []}
    assert summary["synthetic_cases"]["used"] == NUM_SCORED_CASES - len(below)
    assert summary["provenance"] == {"allowed": NUM_SCORED_CASES + 1, "dropped_for_leakage": 0,
                                     "not_made_for_fold_all": 0}
    assert len(summary["used_synthetic_cases"]) == summary["synthetic_cases"]["used"]
    # N iterations of batch B, ratio 0.5: each synthetic case drawn N B / 2 / used times in expectation
    iterations = BUDGETS["debug"].epochs * BUDGETS["debug"].iterations_per_epoch
    expected_draws = 0.5 * summary["batch_size"] * iterations / summary["synthetic_cases"]["used"]
    assert summary["exposure"]["draws_per_synthetic_case"] == pytest.approx(expected_draws, abs=0.01)
    log_text = "".join(path.read_text() for path in fold_folder.glob("training_log_*.txt"))
    assert "SynthMix: ratio 0.5 (environment)" in log_text

    # validation is real-only: the split, the validation outputs
    splits = load_json(planned_dataset / "splits_final.json")
    for split in splits:
        assert not any(key.startswith("synth_") for key in split["train"] + split["val"])
    validated = {path.name[:-len(".nii.gz")] for path in (fold_folder / "validation").glob("*.nii.gz")}
    assert validated == set(splits[0]["val"])

    run_command(train + ["--val"], env)
    run_command(train + ["--c"], env)                        # same settings: continues (already final)
    changed = dict(env, nnsynth_min_quality="0.9")
    refused = subprocess.run(train + ["--c"], env=changed, capture_output=True, text=True, timeout=1200)
    assert refused.returncode != 0 and "restore the environment" in refused.stderr

    # stock prediction with the trainer name, Dice computed here against labelsTr
    input_folder, output_folder = tmp_path / "input", tmp_path / "predicted"
    input_folder.mkdir()
    cases = [splits[0]["val"][0], splits[0]["train"][0]]
    for case_id in cases:
        shutil.copy(synthetic_example_dataset / "imagesTr" / f"{case_id}_0000.nii.gz", input_folder)
    run_command(["nnUNetv2_predict", "-i", str(input_folder), "-o", str(output_folder), "-d", dataset, "-c", "2d",
                 "-p", CPU_PLANS, "-tr", TRAINER, "-f", "0", "-device", "cpu", "-npp", "0", "-nps", "0"], env)
    lung_dice = []
    for case_id in cases:
        predicted_image = sitk.ReadImage(str(output_folder / f"{case_id}.nii.gz"))
        input_image = sitk.ReadImage(str(input_folder / f"{case_id}_0000.nii.gz"))
        prediction = sitk.GetArrayFromImage(predicted_image)
        reference = sitk.GetArrayFromImage(sitk.ReadImage(str(synthetic_example_dataset / "labelsTr" /
                                                              f"{case_id}.nii.gz")))
        # exported in the input's geometry with declared labels only
        assert prediction.shape == reference.shape
        assert predicted_image.GetSpacing() == input_image.GetSpacing()
        assert predicted_image.GetOrigin() == input_image.GetOrigin()
        assert set(np.unique(prediction)) <= {0, 1, 2}
        lung_dice.append(dice(prediction, reference, 1))
    # a debug budget is too short for a quality bound that holds on every run; the demo test checks learning after
    # 250 iterations
    print(f"lung Dice of the debug-budget CPU model: {dict(zip(cases, lung_dice))}")

    # nnsynth_score writes quality.segmentation and keeps quality.model_free
    manifest_file = synthetic_example_dataset / "synthetic.json"
    backup = {path: path.read_bytes()
              for path in [manifest_file, *(synthetic_example_dataset / "recordsSynth").iterdir()]}
    try:
        from nnunet_synth.quality.segmentation import calibrate_on_real_validation, score_synthetic_cases
        monkeypatch.setenv("nnUNet_extTrainer", env["nnUNet_extTrainer"])
        store = SyntheticStore(RawDataset(synthetic_example_dataset))
        results = score_synthetic_cases(store, model_folder, [0], log=lambda message: None)
        cases_after = load_json(manifest_file)["cases"]
        for case_id, scores in results.items():
            quality = cases_after[case_id]["quality"]
            assert quality["segmentation"]["mean_dice"] == scores["mean_dice"]
            assert set(quality["segmentation"]["dice"]) == {"lung", "lesion"}
            # DiffAug's gate: the lesion IoU (the pathology class of the label-map report), kept if > 0.7
            assert set(quality["segmentation"]["pathology_iou"]) == {"lesion"} and scores["threshold"] == 0.7
            assert scores["min_pathology_iou"] == scores["iou"]["lesion"]
            assert scores["passed"] == (scores["min_pathology_iou"] > 0.7)
        calibration = calibrate_on_real_validation(store, model_folder, 0, log=lambda m: None)
        lesion = calibration["classes"]["lesion"]
        assert (sorted(calibration["validation_cases"]) == sorted(splits[0]["val"])
                and lesion["slices"] == len(lesion["iou"]) > 0)
        assert all(0.0 <= iou <= 1.0 for iou in lesion["iou"])
        assert (model_folder / "nnsynth_calibration_fold0.json").is_file()
        assert cases_after[synthetic_case_id(0, 0)]["quality"]["model_free"]["score"] == stand_in_score(0)
        assert {scores["model_fold"] for scores in results.values()} == {"0"}
    finally:
        for path, content in backup.items():      # the stand-in scores other tests select on
            path.write_bytes(content)
