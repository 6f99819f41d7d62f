"""nnsynth_generate on the small real example with a tiny generator trained here (CPU): real files untouched,
kill + rerun resumes without duplicates or partial files, one seed gives identical files, no case depends on a
validation case of its fold (and a generator of another fold is refused), the exported standalone dataset passes
nnU-Net's integrity check without leaking, overwrite/clean touch synthetic cases only."""
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import run_entry_point
from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity

from nnunet_synth.atomic import TEMP_PREFIX
from nnunet_synth.dataset import RawDataset
from nnunet_synth.dataset.splits import fold_training_cases, fold_validation_cases, real_crossval_split
from nnunet_synth.errors import NnsynthError
from nnunet_synth.generator import TrainingSettings
from nnunet_synth.generator.checkpoints import FINAL_FOLDER
from nnunet_synth.generator.training import train_generator
from nnunet_synth.nnunet_paths import nnunet_folder
from nnunet_synth.provenance import case_dependencies, select_for_fold
from nnunet_synth.quality.model_free import fit_model_free_gate, model_free_score
from nnunet_synth.writer.synthetic_store import MANIFEST_NAME, SyntheticStore, preview_name, synthetic_case_id

BIN = Path(sys.executable).parent
NUM_CASES = 12


def one_thread_environment():
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def convert_example(nnunet_folders, dataset_id, name):
    from conftest import convert_example_subset
    return convert_example_subset(nnunet_folders["nnUNet_raw"], dataset_id, name)


@pytest.fixture(scope="module")
def tiny_generator(nnunet_folders, tmp_path_factory):
    """A tiny-preset generator (32x32) trained for a few steps on fold 0 of the example; returns its final/."""
    dataset = RawDataset(convert_example(nnunet_folders, 983, "GenerateExample"))
    settings = TrainingSettings(preset="tiny", image_size=32, batch_size=4, max_steps=4, warmup_steps=1,
                                checkpoint_every=100, preview_every=100, preview_inference_steps=2)
    run_folder = tmp_path_factory.mktemp("generator") / "run"
    train_generator(dataset, run_folder, settings, fold=0, progress=False)
    return run_folder / FINAL_FOLDER


def generate_command(dataset_id, generator, *extra):
    return [str(BIN / "nnsynth_generate"), str(dataset_id), "--generator", str(generator), "-n", str(NUM_CASES),
            "--inference-steps", "8", "--batch-size", "1", "--seed", "7", "--device", "cpu", *extra]


def checksums(folder: Path) -> dict:
    return {str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(folder.rglob("*")) if path.is_file()}


def synthetic_files(dataset_folder: Path) -> dict:
    return {name: digest for name, digest in checksums(dataset_folder).items()
            if name.startswith(("imagesSynth", "labelsSynth"))}


def real_files(dataset_folder: Path) -> dict:
    return {name: digest for name, digest in checksums(dataset_folder).items()
            if name.startswith(("imagesTr", "labelsTr")) or name == "dataset.json"}


@pytest.fixture(scope="module")
def generated(nnunet_folders, tiny_generator):
    """Dataset983 after one uninterrupted run; returns (folder, real checksums before the run, completed process)."""
    folder = nnunet_folder("nnUNet_raw") / "Dataset983_GenerateExample"
    real_before = real_files(folder)
    result = subprocess.run(generate_command(983, tiny_generator), capture_output=True, text=True,
                            env=one_thread_environment(), timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return folder, real_before, result


def test_generate_writes_the_cases_and_leaves_real_files_byte_identical(generated):
    folder, real_before, result = generated
    assert real_files(folder) == real_before
    dataset = RawDataset(folder)
    store = SyntheticStore(dataset)
    assert store.complete_case_ids() == [synthetic_case_id(i, 0) for i in range(NUM_CASES)]
    assert len(list((folder / "imagesSynth").iterdir())) == NUM_CASES
    assert len(list((folder / "labelsSynth").iterdir())) == NUM_CASES
    assert (folder / preview_name(0)).stat().st_size > 0 and str(folder / preview_name(0)) in result.stdout
    assert len(dataset.case_ids) == 5   # imagesTr/labelsTr (what stock nnU-Net reads) hold the real cases only
    training_cases = set(fold_training_cases(dataset, 0))
    reader = dataset.reader_writer()
    for case_id, entry in store.cases.items():
        assert entry["source"]["target"]["case_id"] in training_cases   # validation cases stay unseen
        # provenance: the target, every donor and the generator's training cases, all of fold 0's training side
        donors = {paste["donor"]["case_id"] for paste in entry["source"]["pastes"]}
        assert set(entry["source_cases"]) == {entry["source"]["target"]["case_id"]} | donors
        assert case_dependencies(entry, store.manifest["folds"]) == training_cases
        assert entry["fold"] == "0"
        assert {"seed", "generator", "sampler", "quality"} <= set(entry)
        assert entry["sampler"]["num_inference_steps"] == 8
        assert set(entry["quality"]["model_free"]) >= {"score", "passed"}
        image, image_properties = reader.read_images([str(store.image_file(case_id))])
        label, _ = reader.read_seg(str(store.label_file(case_id)))
        # label = the conditioning map, in the dataset's geometry; image in the dataset's pixel type
        assert image.shape == label.shape and image.shape[1] == 1
        assert set(np.unique(label)) <= {0, 1, 2}
        real_case = dataset.cases[entry["source"]["target"]["case_id"]]
        _, real_properties = reader.read_images(real_case["images"])
        assert list(image_properties["spacing"]) == list(real_properties["spacing"])


@pytest.mark.slow
def test_a_run_killed_half_way_and_rerun_ends_full_without_duplicates_and_matches_one_seed(
        nnunet_folders, tiny_generator, generated):
    folder = convert_example(nnunet_folders, 984, "GenerateResume")
    records = folder / "recordsSynth"
    process = subprocess.Popen(generate_command(984, tiny_generator), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, env=one_thread_environment())
    written_at_kill = 0
    deadline = time.time() + 600
    while time.time() < deadline and process.poll() is None:
        if records.is_dir():
            written_at_kill = len([p for p in records.glob("synth_*.json")])    # complete records only
            if written_at_kill >= 3:
                break
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert 3 <= written_at_kill < NUM_CASES, f"the run was not interrupted half-way ({written_at_kill} cases)"

    rerun = subprocess.run(generate_command(984, tiny_generator), capture_output=True, text=True,
                           env=one_thread_environment(), timeout=900)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "already there" in rerun.stdout
    stray = [p for p in folder.rglob("*") if p.name.startswith(TEMP_PREFIX)]
    assert not stray
    resumed = synthetic_files(folder)
    assert len(resumed) == 2 * NUM_CASES
    # the compiled index lists every case once, as the records do
    assert sorted(json.loads((folder / MANIFEST_NAME).read_text())["cases"]) == SyntheticStore(
        RawDataset(folder)).complete_case_ids()
    # same seed, same generator -> the same files as the uninterrupted run on Dataset983
    assert resumed == synthetic_files(generated[0])


def test_a_rerun_with_the_same_settings_writes_nothing_and_other_settings_are_refused(tiny_generator, generated):
    folder = generated[0]
    before = synthetic_files(folder)
    again = subprocess.run(generate_command(983, tiny_generator), capture_output=True, text=True,
                           env=one_thread_environment(), timeout=900)
    assert again.returncode == 0 and f"0 written now, {NUM_CASES} already there" in again.stdout
    assert synthetic_files(folder) == before
    other_seed = generate_command(983, tiny_generator)
    other_seed[other_seed.index("--seed") + 1] = "8"
    refused = subprocess.run(other_seed, capture_output=True, text=True, env=one_thread_environment(), timeout=900)
    assert refused.returncode != 0
    message = refused.stderr.strip().splitlines()
    assert (len(message) == 1 and "seed" in message[0] and "--overwrite" in message[0]
            and "Traceback" not in refused.stderr)
    assert synthetic_files(folder) == before


def test_the_recipe_records_only_the_balancing_options_given_so_stores_written_before_resume(tmp_path):
    """A fold's recipe is compared as a dict: the balancing records the options given, nothing for the others
    (None when none was given), and the mask config takes them over its defaults."""
    from nnunet_synth.image_sources import CopyPasteSettings, GenerationSettings
    from nnunet_synth.masks import MaskGenerationConfig
    from nnunet_synth.masks.settings import BalancingSettings
    given = BalancingSettings(host_classes=[], pathology_classes=["lesion"], target_factor=2.5, p_shift=0.0)
    recorded = {"host_classes": [], "pathology_classes": ["lesion"], "target_factor": 2.5, "p_shift": 0.0}
    assert GenerationSettings(num_cases=4, balancing=given).recipe(tmp_path)["balancing"] == recorded
    assert CopyPasteSettings(num_cases=4, balancing=given).recipe()["balancing"] == recorded
    assert BalancingSettings.from_dict(recorded) == given
    assert GenerationSettings(num_cases=4).recipe(tmp_path)["balancing"] is None
    assert CopyPasteSettings(num_cases=4).recipe() == {"seed": 0, "target_share": None, "balancing": None,
                                                       "feather": 2.0, "unit": None, "image_source": "copy-paste"}
    config = given.mask_config()
    assert (config.target_factor, config.p_shift) == (2.5, 0.0)
    assert config.p_rotate == MaskGenerationConfig().p_rotate


def test_each_image_source_answers_for_itself_and_the_case_count_rule_is_shared():
    """The registry: every --image-source value has one source, each generator mode leads back to its source, and
    -r gives ratio x units cases (rounded, at least one)."""
    from nnunet_synth.generator.config import GENERATOR_MODES
    from nnunet_synth.image_sources import IMAGE_SOURCES, case_count, image_source, source_of_generator
    assert sorted(IMAGE_SOURCES) == ["copy-paste", "generator", "inpaint"]
    assert {mode: source_of_generator(mode).name for mode in GENERATOR_MODES} == {"slice": "generator",
                                                                                 "inpaint": "inpaint"}
    assert image_source("copy-paste").generator_mode is None
    assert [case_count(0.5, units) for units in (1, 3, 10)] == [1, 2, 5] and case_count(0.01, 10) == 1
    with pytest.raises(NnsynthError, match="choose one of"):
        image_source("paint")


def test_no_fold_may_use_a_case_that_depends_on_its_validation_cases(generated):
    """Only fold-0 cases exist: fold 0 may use all of them, folds 1-4 none (their generator and maps saw those
    folds' validation patients)."""
    dataset = RawDataset(generated[0])
    store = SyntheticStore(dataset)
    case_ids = store.complete_case_ids()
    for fold in range(5):
        selection = select_for_fold(store.manifest, case_ids, fold, fold_validation_cases(dataset, fold))
        for case_id in selection.allowed:
            assert not case_dependencies(store.cases[case_id], store.manifest["folds"]) & set(
                fold_validation_cases(dataset, fold))
        assert selection.allowed == (case_ids if fold == 0 else [])
        assert selection.leaking == ([] if fold == 0 else case_ids)
    assert select_for_fold(store.manifest, case_ids, "all", []).allowed == []     # made for fold 0, not "all"
    # what nnsynth_check_dataset prints per fold
    from nnunet_synth.dataset_tools.check_dataset import synthetic_usability
    usability = synthetic_usability(dataset)
    assert {fold: counts["allowed"] for fold, counts in usability.items()} == {
        "0": NUM_CASES, "1": 0, "2": 0, "3": 0, "4": 0, "all": 0}


def test_a_generator_of_another_fold_is_refused_in_one_line(tiny_generator, generated, capsys):
    from nnunet_synth.dataset_tools.generate import main
    folder = generated[0]
    before = synthetic_files(folder)
    code, _, error = run_entry_point(main, generate_command(983, tiny_generator, "--fold", "1")[1:], capsys)
    assert code == 2
    message = error.strip().splitlines()
    assert len(message) == 1 and "fold 1's validation case" in message[0] and "--fold 1" in message[0]
    assert synthetic_files(folder) == before


def test_the_standalone_export_passes_nnunets_integrity_check_and_gives_each_fold_only_its_cases(generated):
    folder = generated[0]
    from nnunet_synth.writer.standalone_export import export_standalone
    dataset = RawDataset(folder)
    export = export_standalone(dataset, nnunet_folder("nnUNet_raw"), nnunet_folder("nnUNet_preprocessed"), 985)
    verify_dataset_integrity(str(export), num_processes=1)
    dataset_json = json.loads((export / "dataset.json").read_text())
    assert dataset_json["numTraining"] == 5 + NUM_CASES
    splits = json.loads((nnunet_folder("nnUNet_preprocessed") / export.name / "splits_final.json").read_text())
    real_splits = real_crossval_split(dataset)[0]
    assert len(splits) == 5
    store = SyntheticStore(dataset)
    synthetic = set(store.complete_case_ids())
    for fold, (split, real_split) in enumerate(zip(splits, real_splits)):
        assert not synthetic & set(split["val"]) and sorted(split["val"]) == sorted(real_split["val"])
        used = synthetic & set(split["train"])
        for case_id in used:          # no synthetic case of fold k's training side depends on its validation cases
            assert not case_dependencies(store.cases[case_id], store.manifest["folds"]) & set(split["val"])
        assert used == (synthetic if fold == 0 else set())
    assert sorted(c for fold in splits for c in fold["val"]) == sorted(dataset.case_ids)


@pytest.mark.slow
def test_overwrite_and_clean_touch_synthetic_cases_only(nnunet_folders, tiny_generator):
    folder = convert_example(nnunet_folders, 986, "GenerateClean")
    real_before = real_files(folder)
    first = subprocess.run(generate_command(986, tiny_generator, "-n", "2"), capture_output=True, text=True,
                           env=one_thread_environment(), timeout=900)
    assert first.returncode == 0, first.stderr[-3000:]
    replaced = subprocess.run(generate_command(986, tiny_generator, "-n", "3", "--seed", "9", "--overwrite"),
                              capture_output=True, text=True, env=one_thread_environment(), timeout=900)
    assert replaced.returncode == 0, replaced.stderr[-3000:]
    store = SyntheticStore(RawDataset(folder))
    assert store.complete_case_ids() == [synthetic_case_id(i, 0) for i in range(3)]
    assert all(entry["seed"] // 1_000_003 == 9 for entry in store.cases.values())
    cleaned = subprocess.run([str(BIN / "nnsynth_clean"), "986"], capture_output=True, text=True)
    assert cleaned.returncode == 0 and "removed 3 synthetic cases" in cleaned.stdout
    assert not (folder / "imagesSynth").exists() and not (folder / "labelsSynth").exists()
    assert not (folder / MANIFEST_NAME).exists() and not (folder / preview_name(0)).exists()
    assert not (folder / "recordsSynth").exists()
    assert real_files(folder) == real_before


def test_model_free_score_accepts_real_slices_and_rejects_a_flat_image(example_dataset_folder):
    dataset = RawDataset(example_dataset_folder)
    pairs = []
    for case_id in dataset.case_ids:
        image, label_map, _ = dataset.read_case(case_id)
        pairs += list(zip(image[0].astype(np.float32), label_map))
    gate = fit_model_free_gate(pairs)
    scores = [model_free_score(image, label_map, gate) for image, label_map in pairs]
    # the threshold is the 99th percentile of the real slices' own distances
    assert sum(s["passed"] for s in scores) >= 0.9 * len(scores)
    image, label_map = pairs[len(pairs) // 2]
    flat = np.full_like(image, image[label_map == 1].max() + 10 * (image.max() - image.min() + 1))
    flat_score = model_free_score(flat, label_map, gate)
    assert not flat_score["passed"] and flat_score["score"] < 0.5


def test_the_written_label_is_the_conditioning_map_at_the_slice_geometry(generated, tiny_generator):
    """The generator (32 px) saw the new map fitted to 32x32; the label written beside the image must be that
    map taken back to the slice's size, so fitting it again gives the very map the image was generated from."""
    from nnunet_synth.dataset import fit_slice, restore_slice
    from nnunet_synth.generator.checkpoints import read_generator_config
    folder, _, result = generated
    size = read_generator_config(tiny_generator).image_size
    dataset = RawDataset(folder)
    store = SyntheticStore(dataset)
    reader = dataset.reader_writer()
    blocky = 0
    for case_id in store.complete_case_ids():
        assert store.cases[case_id]["sampler"]["conditioning_size"] == size
        label = reader.read_seg(str(store.label_file(case_id)))[0][0, 0].astype(np.int16)
        image = reader.read_images([str(store.image_file(case_id))])[0][:, 0]
        _, model_map, fit = fit_slice(image, label, size)
        assert label.shape != model_map.shape
        np.testing.assert_array_equal(restore_slice(image, model_map, fit)[1], label)
        # a full-resolution map (what was written before) does not survive this round trip
        target = store.cases[case_id]["source"]["target"]
        real_label = dataset.read_case(target["case_id"])[1][target["slice_index"]]
        blocky += not np.array_equal(restore_slice(image, fit_slice(image, real_label, size)[1], fit)[1], real_label)
    assert blocky == len(store.complete_case_ids())
    assert "goal" in result.stdout and "share of the region" in result.stdout


def test_generate_exits_with_one_line_when_a_goal_cannot_be_reached(nnunet_folders, tiny_generator, capsys):
    from nnunet_synth.dataset_tools.generate import main
    folder = convert_example(nnunet_folders, 979, "NoRaiseExample")
    code, _, error = run_entry_point(main, generate_command(979, tiny_generator, "--min-donor-area", "100000")[1:],
                                     capsys)
    assert code == 2
    lines = [line for line in error.splitlines() if line.startswith("nnsynth: error:")]
    assert len(lines) == 1 and "the goal of class 2 cannot be reached" in lines[0]
    assert not (folder / MANIFEST_NAME).exists()


def test_generating_processes_share_the_store_and_removal_waits_for_them(generated):
    dataset = RawDataset(generated[0])
    with SyntheticStore(dataset).shared_writer():
        with SyntheticStore(dataset).shared_writer() as other:         # e.g. another shard or fold
            assert len(other.complete_case_ids()) == NUM_CASES
            with pytest.raises(NnsynthError, match="another process is writing synthetic cases"):
                with SyntheticStore(dataset).exclusive_writer():
                    pass
    with SyntheticStore(dataset).exclusive_writer():
        with pytest.raises(NnsynthError, match="another process is removing or rescoring"):
            with SyntheticStore(dataset).shared_writer():
                pass
    with SyntheticStore(dataset).exclusive_writer() as store:      # released: the next writer gets it
        assert len(store.complete_case_ids()) == NUM_CASES


def synthetic_outputs(dataset_folder: Path) -> dict:
    """Images, labels and per-case records, by file name."""
    return {name: digest for name, digest in checksums(dataset_folder).items()
            if name.startswith(("imagesSynth", "labelsSynth", "recordsSynth"))}


@pytest.mark.slow
def test_two_shards_one_killed_and_rerun_and_launched_processes_give_the_files_of_one_process(
        nnunet_folders, tiny_generator):
    batch = ["--batch-size", "3"]        # blocks of 3 cases: shard 0 makes cases 0-2 and 6-8, shard 1 3-5 and 9-11
    single = convert_example(nnunet_folders, 960, "GenerateOneProcess")
    one_process = subprocess.run(generate_command(960, tiny_generator, *batch), capture_output=True, text=True,
                                 env=one_thread_environment(), timeout=900)
    assert one_process.returncode == 0, one_process.stderr[-3000:]

    folder = convert_example(nnunet_folders, 961, "GenerateShards")
    shard_command = [generate_command(961, tiny_generator, *batch, "--num-shards", "2", "--shard-index", str(i))
                     for i in range(2)]
    shard_0 = subprocess.Popen(shard_command[0], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=one_thread_environment())
    shard_1 = subprocess.Popen(shard_command[1], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               env=one_thread_environment())
    shard_1_records = [folder / "recordsSynth" / f"{synthetic_case_id(i, 0)}.json" for i in (3, 4, 5, 9, 10, 11)]
    deadline = time.time() + 600
    while time.time() < deadline and shard_1.poll() is None and not any(p.is_file() for p in shard_1_records):
        time.sleep(0.005)
    shard_1.send_signal(signal.SIGKILL)
    shard_1.wait()
    written_at_kill = sum(p.is_file() for p in shard_1_records)
    assert 1 <= written_at_kill < 6, f"shard 1 was not interrupted half-way ({written_at_kill} cases)"
    stdout, stderr = shard_0.communicate(timeout=900)       # ran beside shard 1 on the same store
    assert shard_0.returncode == 0, stderr[-3000:]
    assert "shard 0 of 2" in stdout and "6 written now" in stdout

    rerun = subprocess.run(shard_command[1], capture_output=True, text=True, env=one_thread_environment(),
                           timeout=900)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"{6 - written_at_kill} written now, {written_at_kill} already there" in rerun.stdout
    assert not [p for p in folder.rglob("*") if p.name.startswith(TEMP_PREFIX)]
    sharded = synthetic_outputs(folder)
    assert len(sharded) == 3 * NUM_CASES and sharded == synthetic_outputs(single)
    # the compiled index: every case once, and the fold's record as the one-process run wrote it
    index, single_index = (json.loads((f / MANIFEST_NAME).read_text()) for f in (folder, single))
    assert sorted(index["cases"]) == [synthetic_case_id(i, 0) for i in range(NUM_CASES)]
    assert index["cases"] == single_index["cases"] and index["folds"] == single_index["folds"]

    # the same shards as the processes of a launcher: 2 CPU processes of torchrun, which accelerate runs with gloo
    # when ACCELERATE_USE_CPU is set (the README's command for machines without GPUs)
    launched = convert_example(nnunet_folders, 962, "GenerateLaunched")
    command = [str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", str(BIN / "nnsynth_generate"),
               *generate_command(962, tiny_generator, *batch)[1:]]
    result = subprocess.run(command, capture_output=True, text=True, timeout=900,
                            env={**one_thread_environment(), "ACCELERATE_USE_CPU": "true"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "shard 0 of 2" in result.stdout and "shard 1 of 2" in result.stdout
    assert synthetic_outputs(launched) == synthetic_outputs(single)


def test_shard_options_that_would_lose_cases_are_refused(generated, tiny_generator):
    from nnunet_synth.fold_cases import shard_blocks
    from nnunet_synth.image_sources import GenerationSettings, generate_synthetic_cases
    assert shard_blocks(7, 2, 2, 0) == [[0, 1], [4, 5]] and shard_blocks(7, 2, 2, 1) == [[2, 3], [6]]
    dataset = RawDataset(generated[0])
    settings = GenerationSettings(num_cases=NUM_CASES, seed=7, num_inference_steps=8, batch_size=1)
    with pytest.raises(NnsynthError, match="--overwrite with --num-shards .*nnsynth_clean"):
        generate_synthetic_cases(dataset, tiny_generator, settings, overwrite=True, num_shards=2, shard_index=0)
    with pytest.raises(NnsynthError, match="--shard-index must lie in"):
        generate_synthetic_cases(dataset, tiny_generator, settings, num_shards=2, shard_index=2)
    assert len(SyntheticStore(dataset).complete_case_ids()) == NUM_CASES
