"""Lesions synthesised inside real cases (``--mode inpaint``, ``--image-source inpaint``) on the real COVID slices
of the embedded example, with tiny inpainting generators trained here (CPU): crops at native resolution with edit
regions as the balancer makes them, exact resume of training, the pipeline folder, in-place sampling that keeps
every real pixel outside the edit region and writes the new map as the label, resume and shards of the generate
step, a generator that follows both the label map and the known pixels, and lesion-region fidelity."""
import hashlib
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from nnunet_synth.dataset import ImageWindows, RawDataset, dataset_intensity_window
from nnunet_synth.dataset.native_slices import open_native_slices
from nnunet_synth.dataset.writing import write_dataset_json_atomic, write_volume
from nnunet_synth.generator import TrainingSettings, load_generator
from nnunet_synth.generator.checkpoints import FINAL_FOLDER
from nnunet_synth.generator.inpaint_data import (
    CropSampler,
    edit_region,
    pathology_components,
    take_crop,
)
from nnunet_synth.generator.inpaint_pipeline import SAMPLERS
from nnunet_synth.generator.inpaint_training import class_roles_of, inpaint_pipeline
from nnunet_synth.generator.training import train_generator
from nnunet_synth.masks.pixel_paste import replay_pastes
from nnunet_synth.sampling.inpaint import inpaint_slices, map_edit_region, plan_tiles
from nnunet_synth.writer.synthetic_store import SyntheticStore

CROP = 32


def small_settings(**overrides) -> TrainingSettings:
    values = dict(preset="tiny", mode="inpaint", image_size=CROP, block_out_channels=(16, 32, 32, 32), batch_size=2,
                  max_steps=5, warmup_steps=1, checkpoint_every=2, preview_every=100, preview_inference_steps=2,
                  preview_count=2, learning_rate=5e-4)
    values.update(overrides)
    return TrainingSettings(**values)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """The machine is shared (2 cores): one intra-op thread."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def convert_example(nnunet_folders, dataset_id, name):
    from conftest import convert_example_subset
    return RawDataset(convert_example_subset(nnunet_folders["nnUNet_raw"], dataset_id, name))


@pytest.fixture(scope="module")
def example(nnunet_folders):
    return convert_example(nnunet_folders, 972, "InpaintExample")


@pytest.fixture(scope="module")
def uninterrupted_run(example, tmp_path_factory):
    """Five tiny inpainting steps on fold 0 of the example, without interruption."""
    return train_generator(example, tmp_path_factory.mktemp("inpaint") / "uninterrupted", small_settings(), fold=0,
                           progress=False)


def test_tiles_write_every_edit_pixel_once_from_inside_their_crop(example):
    store = open_native_slices(example, example.case_ids[:1], progress=False)
    label_map = max((store.label_maps[row] for row in range(len(store))), key=lambda m: int((m == 2).sum()))
    edit = edit_region(label_map == 2, 6)           # real lesions, grown: larger than one 32 px crop
    tiles = plan_tiles(edit, CROP)
    assert len(tiles) > 1
    writes = np.stack([tile.writes for tile in tiles])
    assert np.array_equal(writes.any(axis=0), edit) and writes.sum(axis=0).max() == 1
    for tile in tiles:
        window = np.zeros(edit.shape, dtype=bool)
        window[max(tile.origin[0], 0):tile.origin[0] + CROP, max(tile.origin[1], 0):tile.origin[1] + CROP] = True
        assert not (tile.writes & ~window).any()


def crop_sampler(example, **probabilities) -> CropSampler:
    """48 px crops of every example slice; host class lung (1), pathology lesion (2), margin 3."""
    store = open_native_slices(example, example.case_ids, progress=False)
    window = dataset_intensity_window(example, example.case_ids, store=store)
    return CropSampler(store.images, store.label_maps, pathology_components(store.label_maps, [2]), window, 48, [1],
                       None, 3, **probabilities)


def test_training_crops_are_native_pixels_with_edit_regions_drawn_like_the_balancer(example):
    rng = np.random.default_rng(0)
    lesion_edits = crop_sampler(example, p_lesion_crop=1.0, p_lesion_edit=1.0, p_moved_edit=0.0)
    for _ in range(12):
        image, label_map, edit = lesion_edits.draw(0, rng)
        assert image.shape == (1, 48, 48) and label_map.shape == edit.shape == (48, 48)
        # the edit region holds a whole lesion component of the crop (the lesion is drawn from its label) + margin
        edit = edit.astype(bool)
        assert (label_map[edit] == 2).any() and not (edit & ~edit_region(edit & (label_map == 2), 3)).any()
    host_blobs = crop_sampler(example, p_lesion_crop=0.0, p_lesion_edit=0.0, p_moved_edit=0.0)
    for _ in range(12):
        _, label_map, edit = host_blobs.draw(int(rng.integers(20)), rng)
        edit = edit.astype(bool)
        core = edit & ~edit_region(~edit, 3)        # the blob without its margin lies on host tissue (lung)
        assert edit.any() and (not core.any() or (label_map[core] == 1).all())
    # the crop's pixels are the slice's own pixels in model space (no resampling)
    store = open_native_slices(example, example.case_ids, progress=False)
    sampler = crop_sampler(example, p_lesion_crop=0.0, p_lesion_edit=0.0, p_moved_edit=0.0)
    image, label_map, _ = sampler.draw(3, np.random.default_rng(1))
    real = sampler.window.to_model(store.images[3])
    matches = [origin for origin in ((r, c) for r in range(256 - 47) for c in range(256 - 47))
               if np.array_equal(take_crop(real, origin, 48, -1.0), image)]
    assert len(matches) == 1
    assert np.array_equal(take_crop(store.label_maps[3].astype(np.int64), matches[0], 48, 0), label_map)


def test_interrupted_inpaint_training_resumes_exactly(example, uninterrupted_run, tmp_path):
    folder = tmp_path / "interrupted"

    def crash_at_step_3(step, loss):
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_generator(example, folder, small_settings(), fold=0, progress=False, step_callback=crash_at_step_3)
    assert not (folder / FINAL_FOLDER).exists()
    resumed = train_generator(example, folder, small_settings(), fold=0, progress=False)
    assert resumed.resumed_from_step == 2
    assert resumed.losses == uninterrupted_run.losses[2:]
    for name in ("final/unet/diffusion_pytorch_model.safetensors", "checkpoints/checkpoint_1/model.safetensors"):
        a, b = load_file(uninterrupted_run.run_folder / name), load_file(folder / name)
        assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a), name
    with pytest.raises(Exception, match="other settings .*edit_margin"):
        train_generator(example, folder, small_settings(max_steps=7, edit_margin=5), fold=0, progress=False)


def test_final_folder_loads_as_an_inpaint_pipeline_that_keeps_known_pixels(uninterrupted_run, example):
    from diffusers import DiffusionPipeline
    loaded = DiffusionPipeline.from_pretrained(uninterrupted_run.final_folder, trust_remote_code=True)
    assert type(loaded).__name__ == "NnsynthInpaintPipeline" and loaded.num_classes == example.num_classes
    rng = np.random.default_rng(0)
    known = rng.uniform(-1, 1, (3, 1, CROP, CROP)).astype(np.float32)
    masks = np.zeros((3, CROP, CROP), dtype=bool)
    masks[:, 8:20, 10:24] = True
    maps = rng.integers(0, 3, (3, CROP, CROP))
    unet, config = load_generator(uninterrupted_run.final_folder, example)
    for sampler in SAMPLERS:
        pipeline = inpaint_pipeline(unet, config, sampler)
        together = pipeline(known, masks, maps, [4, 5, 6], num_inference_steps=3, batch_size=3, progress=False)
        alone = pipeline(known[1:2], masks[1:2], maps[1:2], [5], num_inference_steps=3, progress=False)
        assert np.array_equal(together[:, :, ~masks[0]], known[:, :, ~masks[0]]), sampler
        assert not np.allclose(together[:, :, masks[0]], known[:, :, masks[0]]), sampler
        np.testing.assert_allclose(together[1], alone[0], atol=1e-4)   # float sums differ with the batch


def run_generate(dataset, generator, *extra):
    from nnunet_synth.dataset_tools.generate import main
    main([dataset.name, "--image-source", "inpaint", "--generator", str(generator), "-n", "4", "--inference-steps",
          "2", "--batch-size", "2", "--seed", "3", "--device", "cpu", *extra])


def checksums(store: SyntheticStore) -> dict:
    files = sorted(store.images_folder.glob("*")) + sorted(store.labels_folder.glob("*"))
    return {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in files}


@pytest.fixture(scope="module")
def generated(example, uninterrupted_run):
    run_generate(example, uninterrupted_run.final_folder)
    return SyntheticStore(example)


def test_inpainted_cases_keep_every_real_pixel_outside_the_edit_and_their_label_is_the_new_map(example, generated,
                                                                                                uninterrupted_run):
    store = generated
    reader = example.reader_writer()
    margin = json.loads(
        (uninterrupted_run.final_folder / "generator_config.json").read_text())["training"]["edit_margin"]
    real = open_native_slices(example, example.case_ids, progress=False)
    case_ids = store.complete_case_ids("0")
    assert len(case_ids) == 4
    for case_id in case_ids:
        entry = store.cases[case_id]
        target = entry["source"]["target"]
        image, _ = reader.read_images([str(p) for p in store.image_files(case_id)])
        label = reader.read_seg(str(store.label_file(case_id)))[0][0, 0]
        raw_image, raw_label, _ = example.read_case(target["case_id"])
        raw_image = raw_image[0, target["slice_index"]].astype(image.dtype)
        raw_label = raw_label[target["slice_index"]]
        # the label is the new map at native size: the target's map with the recorded pastes replayed
        real_image, _ = real.slice(target["case_id"], target["slice_index"])
        replayed = replay_pastes(real_image, raw_label, entry["source"], real.slice, [1]).label_map
        assert label.shape == raw_label.shape and np.array_equal(label, replayed)
        edit = map_edit_region(raw_label, label, margin)
        assert entry["inpaint"]["edit_pixels"] == int(edit.sum()) > 0
        assert np.array_equal(image[0, 0][~edit], raw_image[~edit])        # bit for bit outside the edit region
        assert not np.array_equal(image[0, 0][edit], raw_image[edit])
        assert entry["image_source"] == "inpaint" and entry["sampler"]["scheduler"] in SAMPLERS
        assert entry["generator"]["mode"] == "inpaint" and target["case_id"] in entry["source_cases"]
        quality = entry["quality"]["model_free"]
        assert "passed" in quality
        # the edit gate scored the edit wherever the fold has one; passed only when both gates pass
        assert ("edit_gate" in quality) == (store.manifest["folds"]["0"]["edit_gate"] is not None)
        if "edit_gate" in quality:
            assert quality["passed"] == (quality["slice_gate"]["passed"] and quality["edit_gate"]["passed"])
    fold_record = store.manifest["folds"]["0"]
    assert sorted(fold_record["generator_training_cases"]) == sorted(
        json.loads((uninterrupted_run.final_folder / "generator_config.json").read_text())["training_cases"])
    assert store.preview_file("0").is_file()


def test_inpaint_generation_resumes_without_duplicates_and_shards_give_the_same_files(example, generated,
                                                                                      uninterrupted_run, nnunet_folders,
                                                                                      capsys):
    before = checksums(generated)
    run_generate(example, uninterrupted_run.final_folder)
    assert "0 written now, 4 already there" in capsys.readouterr().out and checksums(SyntheticStore(example)) == before
    removed = sorted(generated.complete_case_ids("0"))[1]
    generated.record_file(removed).unlink()
    generated.label_file(removed).unlink()
    run_generate(example, uninterrupted_run.final_folder)
    assert "1 written now, 3 already there" in capsys.readouterr().out and checksums(SyntheticStore(example)) == before
    sharded = convert_example(nnunet_folders, 973, "InpaintShards")
    for shard in ("1", "0"):
        run_generate(sharded, uninterrupted_run.final_folder, "--num-shards", "2", "--shard-index", shard)
    assert checksums(SyntheticStore(sharded)) == before


def test_whole_slice_generator_for_inpaint_and_sampler_without_inpaint_are_refused_in_one_line(
        example, uninterrupted_run, nnunet_folders, tmp_path, capsys):
    from nnunet_synth.dataset_tools.generate import main
    slice_run = train_generator(example, tmp_path / "slice", small_settings(mode="slice", max_steps=1), fold=0,
                                progress=False)
    with pytest.raises(SystemExit) as exit_info:
        main([example.name, "--image-source", "inpaint", "--generator", str(slice_run.final_folder), "-n", "1"])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "holds a slice generator, --image-source inpaint needs a inpaint one" in error[0]
    with pytest.raises(SystemExit):
        main([example.name, "--generator", str(uninterrupted_run.final_folder), "--sampler", "unipc", "-n", "1"])
    assert "--sampler chooses the inpainting generator's scheduler" in capsys.readouterr().err


CLASS_INTENSITY = np.array([0.0, 60.0, 120.0])   # background, lung, lesion bands
SLICE_OFFSET = 60.0                              # added to every other slice: only the known pixels tell which


@pytest.fixture(scope="module")
def context_and_map_determined_generator(example, nnunet_folders, tmp_path_factory):
    """Dataset976: the example's real slices with each class in its own intensity band (the real texture at a
    quarter of its contrast) and every other slice brightened by SLICE_OFFSET; an inpainting generator trained on
    it briefly. Inside an edit region the right answer depends on the label map (the band) and on the known pixels
    (the offset)."""
    folder = nnunet_folders["nnUNet_raw"] / "Dataset976_InpaintConditioning"
    for case_id in example.case_ids:
        image, label_map, _ = example.read_case(case_id)
        offsets = SLICE_OFFSET * (np.arange(label_map.shape[0]) % 2)[:, None, None]
        shifted = 0.25 * image[0] + CLASS_INTENSITY[label_map] + offsets
        write_volume(shifted.astype(np.uint8), folder / "imagesTr" / f"{case_id}_0000.nii.gz")
        write_volume(label_map.astype(np.uint8), folder / "labelsTr" / f"{case_id}.nii.gz")
    write_dataset_json_atomic(folder, channel_names={0: "CT"}, labels=example.labels,
                              num_training_cases=len(example.case_ids), file_ending=".nii.gz",
                              dataset_name=folder.name)
    dataset = RawDataset(folder)
    settings = small_settings(batch_size=8, max_steps=150, warmup_steps=10, learning_rate=2e-3, checkpoint_every=1000,
                              ablation_mode="none")
    result = train_generator(dataset, tmp_path_factory.mktemp("conditioning") / "run", settings, fold="all",
                             progress=False)
    unet, config = load_generator(result.final_folder, dataset)
    return dataset, inpaint_pipeline(unet, config, "ddim"), config


def test_inpainting_follows_the_label_map_and_the_known_pixels(context_and_map_determined_generator):
    dataset, pipeline, config = context_and_map_determined_generator
    window = ImageWindows.from_dict(config.window)
    _, pathology = class_roles_of(config)
    store = open_native_slices(dataset, dataset.case_ids, progress=False)
    # dark slices (offset 0) with 30-2000 lesion pixels: the lesions plus the margin are redrawn
    rows = [row for row in range(len(store)) if store.map_ids[row][1] % 2 == 0
            and 30 <= (store.label_maps[row] == 2).sum() <= 2000][:3]
    assert len(rows) == 3
    images = [store.images[row] for row in rows]
    maps = [store.label_maps[row].astype(np.int64) for row in rows]
    edits = [edit_region(np.isin(m, pathology), 3) for m in maps]
    lesion = [m == 2 for m in maps]

    def mean_inside(images_, maps_, where):
        drawn = inpaint_slices(pipeline, window, images_, maps_, edits, [1, 2, 3], [[np.float32]] * 3, 10)
        return np.array([window.to_model(np.stack(d.channel_images))[0][w].mean() for d, w in zip(drawn, where)])

    as_is = mean_inside(images, maps, lesion)
    # the same known pixels, the lesion relabelled as lung: the redrawn pixels follow the map down one band
    as_lung = mean_inside(images, [np.where(m == 2, 1, m) for m in maps], lesion)
    # the same map, the known pixels of a bright slice (+SLICE_OFFSET): the redrawn pixels follow them up
    brighter = mean_inside([image + SLICE_OFFSET for image in images], maps, lesion)
    # measured after 150 steps: both shifts about 0.37 band (0.22 model units); a generator that ignored the map
    # or the known pixels would give about 0
    band = 2 * 60.0 / (window.channels[0].upper - window.channels[0].lower)      # one band in model units
    assert np.all(as_is - as_lung > 0.25 * band), (as_is, as_lung, band)
    assert np.all(brighter - as_is > 0.25 * band), (as_is, brighter, band)


def test_lesion_fidelity_compares_samplers_copy_paste_and_writes_the_table(example, uninterrupted_run, tmp_path,
                                                                           capsys):
    from nnunet_synth.dataset_tools.evaluate import main
    main(["fidelity", example.name, "--inpaint-generator", str(uninterrupted_run.run_folder), "--samplers", "ddim:2",
          "unipc:2", "--max-slices", "3", "--seeds", "0", "--device", "cpu", "--output", str(tmp_path)])
    result = json.loads((tmp_path / "lesion_fidelity.json").read_text())
    assert [(row["source"], row["sampler"]) for row in result["rows"]] == [
        ("inpaint", "ddim"), ("inpaint", "unipc"), ("copy-paste", None)]
    assert result["slices"] == 3 and result["edit_pixels"] > 0
    assert set(result["held_out_cases"]) <= set(
        json.loads((uninterrupted_run.final_folder / "generator_config.json").read_text())["training_cases"]) ^ set(
        example.case_ids)
    for row in result["rows"]:
        assert np.isfinite(row["psnr"]) and -1 <= row["ssim"] <= 1 and row["w1"] > 0
    assert "| copy-paste |" in (tmp_path / "lesion_fidelity.md").read_text()
    assert (tmp_path / "lesion_fidelity_preview.png").is_file() and "lesion-region fidelity" in capsys.readouterr().out


def test_two_channels_and_the_ignore_label_inpaint_with_real_pixels_kept_in_both_channels(example, nnunet_folders,
                                                                                         tmp_path):
    """Dataset977: the example with a second channel (the inverted slice) and the right 30 % of every slice
    unannotated (nnU-Net's ignore label 3)."""
    folder = nnunet_folders["nnUNet_raw"] / "Dataset977_InpaintTwoChannelsIgnore"
    for case_id in example.case_ids:
        image, label_map, _ = example.read_case(case_id)
        label_map = label_map.copy()
        label_map[:, :, int(0.7 * label_map.shape[2]):] = 3
        write_volume(image[0].astype(np.uint8), folder / "imagesTr" / f"{case_id}_0000.nii.gz")
        write_volume((255 - image[0]).astype(np.uint8), folder / "imagesTr" / f"{case_id}_0001.nii.gz")
        write_volume(label_map.astype(np.uint8), folder / "labelsTr" / f"{case_id}.nii.gz")
    write_dataset_json_atomic(folder, channel_names={0: "CT", 1: "inverted"},
                              labels={**example.labels, "ignore": 3}, num_training_cases=len(example.case_ids),
                              file_ending=".nii.gz", dataset_name=folder.name)
    dataset = RawDataset(folder)
    run = train_generator(dataset, tmp_path / "run", small_settings(max_steps=2), fold=0, progress=False)
    assert run.config.num_channels == 2 and run.config.unet_config["in_channels"] == 2 * 2 + 1 + 4
    from nnunet_synth.dataset_tools.generate import main
    # the example's cases are stacks of independent slices, and this dataset.json does not say so (nnsynth_unit)
    main([dataset.name, "--image-source", "inpaint", "--generator", str(run.final_folder), "-n", "2",
          "--inference-steps", "2", "--device", "cpu", "--unit", "slice"])
    store = SyntheticStore(dataset)
    reader = dataset.reader_writer()
    for case_id in store.complete_case_ids("0"):
        target = store.cases[case_id]["source"]["target"]
        image, _ = reader.read_images([str(p) for p in store.image_files(case_id)])
        label = reader.read_seg(str(store.label_file(case_id)))[0][0, 0]
        raw_image, raw_label, _ = dataset.read_case(target["case_id"])
        raw_label = raw_label[target["slice_index"]]
        assert np.array_equal(label == 3, raw_label == 3)           # unannotated pixels stay unannotated
        edit = map_edit_region(raw_label, label, run.config.training["edit_margin"])
        assert edit.any()
        for channel in range(2):
            real_channel = raw_image[channel, target["slice_index"]].astype(image.dtype)
            assert np.array_equal(image[channel, 0][~edit], real_channel[~edit])


def test_a_fold_written_before_the_clipped_default_resumes_with_its_recorded_sampler(uninterrupted_run,
                                                                                      nnunet_folders, capsys):
    """A store written by the earlier volume default (DDIM, recipe without clip_x0) resumes as it was recorded when
    rerun without --sampler / --inference-steps: the missing case is redrawn bit for bit, nothing is refused."""
    dataset = convert_example(nnunet_folders, 640, "InpaintOldRecipe")
    generator = uninterrupted_run.final_folder
    run_generate(dataset, generator, "--sampler", "ddim")
    store = SyntheticStore(dataset)
    before = checksums(store)
    for path in [store.manifest_file] + [store.record_file(case_id) for case_id in store.complete_case_ids("0")]:
        record = json.loads(path.read_text())      # as the earlier code wrote them: no clip_x0, no renoise_x0
        for recipe in [record.get("recipe")] + [fold.get("settings") for fold in record.get("folds", {}).values()]:
            if recipe is not None:
                recipe.pop("clip_x0")
                recipe.pop("renoise_x0", None)          # recorded for DPM-Solver++ only
        path.write_text(json.dumps(record))
    removed = sorted(store.complete_case_ids("0"))[2]
    store.record_file(removed).unlink()
    store.label_file(removed).unlink()
    capsys.readouterr()
    from nnunet_synth.dataset_tools.generate import main
    main([dataset.name, "--image-source", "inpaint", "--generator", str(generator), "-n", "4", "--batch-size", "2",
          "--seed", "3", "--device", "cpu"])                     # neither --sampler nor --inference-steps
    assert "1 written now, 3 already there" in capsys.readouterr().out
    assert checksums(SyntheticStore(dataset)) == before
    settings = SyntheticStore(dataset).manifest["folds"]["0"]["settings"]
    assert settings["sampler"] == "ddim" and settings["num_inference_steps"] == 2
    assert "clip_x0" not in settings and "renoise_x0" not in settings


@pytest.fixture(scope="module")
def briefly_trained_run(example, tmp_path_factory):
    """An undertrained inpainting generator on the example's real COVID slices (its clean-image estimates of a large
    edit region leave [-1, 1] at the first steps, as the CPU preset's do)."""
    settings = small_settings(batch_size=8, max_steps=SPECKLE_TRAINING_STEPS, warmup_steps=5, learning_rate=2e-3,
                              checkpoint_every=1000)
    return train_generator(example, tmp_path_factory.mktemp("brief") / "run", settings, fold=0, progress=False)


SPECKLE_TRAINING_STEPS = 300


def test_the_default_few_step_sampler_draws_a_large_edit_without_salt_and_pepper(example, briefly_trained_run):
    """UniPC 10 (the slices' default) and the volumes' default on real slices' lesions grown by 6 px: the share of
    speckle pixels (off their 3 x 3 median by a quarter of the range) inside the edit stays within the real pixels'
    range; unclipped, as the multistep solvers were built before, UniPC 10 does not."""
    from nnunet_synth.evaluation.lesion_fidelity import speckle_fraction
    from nnunet_synth.generator.inpaint_training import sampling_defaults
    unet, config = load_generator(briefly_trained_run.final_folder, example)
    window = ImageWindows.from_dict(config.window)
    _, pathology = class_roles_of(config)
    store = open_native_slices(example, example.case_ids, progress=False)
    rows = [row for row in range(len(store)) if 100 <= np.isin(store.label_maps[row], pathology).sum() <= 3000][:4]
    assert len(rows) == 4
    images = [store.images[row] for row in rows]
    maps = [store.label_maps[row].astype(np.int64) for row in rows]
    edits = [edit_region(np.isin(m, pathology), 6) for m in maps]

    def speckle(sampler, steps, clip_x0):
        pipeline = inpaint_pipeline(unet, config, sampler, "cpu", clip_x0)
        drawn = inpaint_slices(pipeline, window, images, maps, edits, [1, 2, 3, 4], [[np.float32]] * 4, steps)
        return np.mean([speckle_fraction(d.model_image, e) for d, e in zip(drawn, edits)])

    real = np.mean([speckle_fraction(window.to_model(image), edit) for image, edit in zip(images, edits)])
    allowed = max(2 * real, 0.02)
    assert sampling_defaults("slice")[0] in ("unipc", "dpmsolver++") and sampling_defaults("slice")[1] <= 20
    assert sampling_defaults("volume")[1] <= 20
    clipped, unclipped = speckle(*sampling_defaults("slice"), True), speckle("unipc", 10, False)
    volume_default = speckle(*sampling_defaults("volume"), True)
    print(f"speckle: real {real:.4f}, default {clipped:.4f}, unclipped UniPC 10 {unclipped:.4f}, volumes' default "
          f"{volume_default:.4f}")
    assert clipped <= allowed, (real, clipped)
    assert volume_default <= allowed, (real, volume_default)
    assert unclipped > allowed, (real, unclipped)             # the unclipped estimate: salt-and-pepper


def test_a_first_order_clipped_dpm_solver_run_draws_ddims_image(uninterrupted_run, example):
    """Re-noised from its clipped estimate before each step, first-order DPM-Solver++ takes DDIM's clipped step on
    the same timesteps, although this barely trained model's estimates leave [-1, 1] by far at the first steps;
    stepping from x_t with only the estimate clipped (the solvers' own clipping) it does not: the clipped-off excess
    stays in x_t, which is what drew salt-and-pepper into the MS volumes' large edits. The volumes' default sampler
    is such a re-noised solver of at most 20 steps."""
    from nnunet_synth.generator.inpaint_pipeline import NnsynthInpaintPipeline, make_scheduler
    from nnunet_synth.generator.inpaint_training import sampling_defaults
    unet, config = load_generator(uninterrupted_run.final_folder, example)
    rng = np.random.default_rng(1)
    known = rng.uniform(-1, 1, (2, 1, CROP, CROP)).astype(np.float32)
    masks = np.zeros((2, CROP, CROP), dtype=bool)
    masks[:, 4:28, 6:26] = True                                  # most of the crop: a large edit
    maps = rng.integers(0, example.num_classes, (2, CROP, CROP))
    trailing = {"timestep_spacing": "trailing"}                  # 999, 749, 499, 249 for both

    def draw(sampler, renoise_x0=True, **options):
        scheduler = make_scheduler(sampler, config.scheduler_config)
        scheduler = type(scheduler).from_config(scheduler.config, **trailing, **options)
        pipeline = NnsynthInpaintPipeline(unet, scheduler, renoise_x0=renoise_x0)
        return pipeline(known, masks, maps, [7, 8], num_inference_steps=4, progress=False), pipeline.renoises

    ddim, _ = draw("ddim")
    renoised, renoises = draw("dpmsolver++", solver_order=1)
    clipped_only, _ = draw("dpmsolver++", renoise_x0=False, solver_order=1)
    np.testing.assert_allclose(renoised, ddim, atol=1e-4)
    assert renoises
    assert np.abs(clipped_only - ddim)[:, :, masks[0]].max() > 0.1
    sampler, steps = sampling_defaults("volume")
    assert sampler in ("dpmsolver++", "unipc") and steps <= 20
    assert inpaint_pipeline(unet, config, sampler).renoises
