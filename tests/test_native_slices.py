"""The on-disk store of real slices that generation reads: exact, rebuilt when
the data changes, safe when two processes build it at once, and generation's memory does not hold the slices."""
import json
import os
import shutil
import tracemalloc

import numpy as np
import SimpleITK as sitk

from nnunet_synth.dataset import RawDataset, class_pixel_frequencies, dataset_intensity_window, iter_slices
from nnunet_synth.dataset.native_slices import (
    META_NAME,
    build_native_slices,
    derived_rows,
    evenly_spread,
    open_native_slices,
)
from nnunet_synth.dataset.splits import fold_training_cases
from nnunet_synth.fold_cases import prepare_fold_maps
from nnunet_synth.image_sources import GenerationSettings
from nnunet_synth.masks import NewLabelMapsOnDisk, body_mask, generate_label_maps
from nnunet_synth.quality.model_free import fit_channel_gates
from nnunet_synth.writer.synthetic_store import SyntheticStore


def test_the_store_holds_every_slice_bit_for_bit_and_follows_changes_of_the_files(example_dataset_folder, tmp_path):
    folder = tmp_path / example_dataset_folder.name
    shutil.copytree(example_dataset_folder, folder)
    dataset = RawDataset(folder)
    store = open_native_slices(dataset, dataset.case_ids, root=tmp_path / "cache", progress=False)
    position = 0
    for case_id in dataset.case_ids:
        image, label_map, properties = dataset.read_case(case_id)
        assert store.properties[case_id]["spacing"] == properties["spacing"]
        for slice_index in range(image.shape[1]):
            assert store.map_ids[position] == (case_id, slice_index)
            assert np.array_equal(store.images[position], image[:, slice_index])
            assert store.images[position].dtype == np.float32
            assert np.array_equal(store.label_maps[position], label_map[slice_index])
            position += 1
    assert position == len(store) == len(store.images) == len(store.label_maps)
    assert np.array_equal(store.label_maps[-1], store.label_maps[len(store) - 1])

    # training reads its frequencies, window and slice cache from the store: the same values as from the raw files
    assert np.array_equal(class_pixel_frequencies(dataset, store=store), class_pixel_frequencies(dataset))
    assert dataset_intensity_window(dataset, store=store).to_dict() == dataset_intensity_window(dataset).to_dict()
    for from_store, from_files in zip(iter_slices(dataset, store=store), iter_slices(dataset), strict=True):
        assert np.array_equal(from_store.image, from_files.image) and from_store.spacing == from_files.spacing

    built = (store.folder / META_NAME).stat().st_mtime_ns
    again = open_native_slices(dataset, dataset.case_ids, root=tmp_path / "cache", progress=False)
    assert again.folder == store.folder and (again.folder / META_NAME).stat().st_mtime_ns == built   # not rebuilt

    label_file = dataset.cases[dataset.case_ids[0]]["label"]
    os.utime(label_file, ns=(built + 10**9, built + 10**9))      # touched, same bytes: the same store
    touched = open_native_slices(RawDataset(folder), dataset.case_ids, root=tmp_path / "cache", progress=False)
    assert touched.folder == store.folder
    label = sitk.ReadImage(label_file)
    array = sitk.GetArrayFromImage(label)
    array[0, 0, 0] = 1 - min(array[0, 0, 0], 1)                  # one voxel relabelled: the content changed
    changed_label = sitk.GetImageFromArray(array)
    changed_label.CopyInformation(label)
    sitk.WriteImage(changed_label, label_file, True)
    changed = open_native_slices(RawDataset(folder), dataset.case_ids, root=tmp_path / "cache", progress=False)
    assert changed.folder != store.folder


def test_a_second_process_building_the_same_store_keeps_the_first_and_leaves_no_temporary_folder(
        example_dataset_folder, tmp_path):
    dataset = RawDataset(example_dataset_folder)
    cases = dataset.case_ids[:2]
    store = open_native_slices(dataset, cases, root=tmp_path, progress=False)
    key = {k: v for k, v in json.loads((store.folder / META_NAME).read_text()).items() if k != "num_slices"}
    first = (store.folder / META_NAME).stat().st_mtime_ns
    build_native_slices(dataset, key, store.folder, progress=False)     # as a shard that finished second would
    assert (store.folder / META_NAME).stat().st_mtime_ns == first
    assert [p.name for p in tmp_path.iterdir()] == [store.folder.name]
    assert np.array_equal(open_native_slices(dataset, cases, root=tmp_path).label_maps[3], store.label_maps[3])


def test_new_maps_kept_on_disk_equal_those_kept_in_a_list(covid_dataset_folder, tmp_path):
    dataset = RawDataset(covid_dataset_folder)
    real = open_native_slices(dataset, dataset.case_ids[:4], root=tmp_path, progress=False)
    in_list, report_list = generate_label_maps(real.label_maps, real.map_ids, max_new_maps=12, seed=3,
                                               num_classes=dataset.num_classes, stop_at_target=False)
    on_disk, report_disk = generate_label_maps(real.label_maps, real.map_ids, max_new_maps=12, seed=3,
                                               num_classes=dataset.num_classes, stop_at_target=False,
                                               new_maps=NewLabelMapsOnDisk())
    assert isinstance(on_disk, NewLabelMapsOnDisk) and len(on_disk) == len(in_list) == 12
    assert report_disk == report_list
    for kept, stored in zip(in_list, on_disk):
        assert np.array_equal(kept.label_map, stored.label_map) and kept.provenance == stored.provenance
    bodies = derived_rows(real.images, lambda image: body_mask(image[0]))
    assert all(np.array_equal(bodies[i], body_mask(real.images[i][0])) for i in (0, 7, len(real) - 1))


def test_the_gate_is_fitted_on_at_most_max_slices_evenly_spread(example_dataset_folder):
    assert evenly_spread(5, 10) == [0, 1, 2, 3, 4]
    assert evenly_spread(10, 4) == [0, 3, 6, 9]
    dataset = RawDataset(example_dataset_folder)
    real = open_native_slices(dataset, dataset.case_ids, progress=False)
    every = fit_channel_gates(real.images, real.label_maps)
    listed = fit_channel_gates([real.images[i] for i in range(len(real))], list(real.label_maps))
    assert every[0].to_dict() == listed[0].to_dict()
    chosen = evenly_spread(len(real), 10)
    subset = fit_channel_gates([real.images[i] for i in chosen], [real.label_maps[i] for i in chosen])
    assert fit_channel_gates(real.images, real.label_maps, max_slices=10)[0].to_dict() == subset[0].to_dict()
    assert subset[0].to_dict() != every[0].to_dict()


def test_preparing_a_folds_maps_does_not_hold_the_real_slices_in_memory(covid_dataset_folder, tmp_path):
    """Fold 0 of the COVID data: 1000+ training slices of 256 x 256, i.e. ~280 MB as float32 images and int16
    maps held in lists. Read from the store, the traced peak stays far below that."""
    folder = tmp_path / covid_dataset_folder.name         # a real-only copy: the session's dataset stays untouched
    for part in ("imagesTr", "labelsTr", "dataset.json"):
        (shutil.copytree if part.endswith("Tr") else shutil.copy2)(covid_dataset_folder / part, folder / part)
    dataset = RawDataset(folder)
    training_cases = fold_training_cases(dataset, "0")
    open_native_slices(dataset, training_cases, progress=False)      # built outside the measurement
    store = SyntheticStore(dataset)
    settings = GenerationSettings(num_cases=64, seed=0)
    tracemalloc.start()
    try:
        with store.shared_writer():
            fold_maps = prepare_fold_maps(dataset, store, "0", {"check": True}, training_cases, settings)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    slices = len(fold_maps.real)
    held_as_lists = slices * 256 * 256 * (4 + 2)
    assert slices > 1000 and len(fold_maps.new_maps) == 64
    assert peak < 60 * 2**20 < held_as_lists / 4, f"peak {peak / 2**20:.0f} MiB"
