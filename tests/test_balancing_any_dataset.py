"""Balanced label maps raise the rare classes on datasets built differently from the COVID slices.

Each dataset is made from real data (``tests/conftest.py``): a binary lesion dataset (background + lesion), two
lesion types of similar frequency without a host class, three lesion types inside a host class (normal lung), and
the MS volumes (4 MR channels, most slices lesion-free). ``nnsynth_generate D --image-source copy-paste -r 0.5``
runs with the default goals, and the shares are measured again from the written label files (real training
cases of fold 0 + the synthetic cases), independently of the command's report: every pathology class below its
goal ends at >= 1.5x its real share of the region, none below 0.9x. The 3D case also runs the balancing on whole
volumes (3D donors and placement).
"""
import json
import subprocess

import numpy as np
import pytest

from nnunet_synth.dataset import RawDataset
from nnunet_synth.dataset.splits import fold_training_cases
from nnunet_synth.masks import body_mask, generate_label_maps
from nnunet_synth.writer.synthetic_store import SyntheticStore

RAISED, KEPT = 1.5, 0.9


def class_shares_from_files(dataset: RawDataset, host, pathology, fold="0"):
    """(real shares, real + synthetic shares) per pathology class, from the label (and image) files: the region is
    host + pathology pixels, or without a host the body of each slice (first channel) plus its pathology pixels."""
    reader = dataset.reader_writer()

    def add(counts, image, label):
        for index in range(label.shape[0]):
            if host:
                region = np.isin(label[index], host + pathology)
            else:
                region = body_mask(image[0, index]) | np.isin(label[index], pathology)
            counts["region"] += int(region.sum())
            for c in pathology:
                counts[c] += int((label[index] == c).sum())

    real = dict.fromkeys(["region", *pathology], 0)
    for case_id in fold_training_cases(dataset, fold):
        image, label, _ = dataset.read_case(case_id)
        add(real, image, label)
    combined = dict(real)
    store = SyntheticStore(dataset)
    case_ids = store.complete_case_ids(fold)
    assert case_ids
    for case_id in case_ids:
        image = reader.read_images([str(p) for p in store.image_files(case_id)])[0]
        label = reader.read_seg(str(store.label_file(case_id)))[0][0].astype(int)
        add(combined, image, label)
    return ({c: real[c] / real["region"] for c in pathology},
            {c: combined[c] / combined["region"] for c in pathology})


def generate_copy_paste(dataset_folder, *options):
    result = subprocess.run(["nnsynth_generate", dataset_folder.name, "--image-source", "copy-paste", "-r", "0.5",
                             *options], capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def assert_balanced(dataset_folder, host, pathology):
    dataset = RawDataset(dataset_folder)
    report = json.loads((dataset_folder / "synthetic.json").read_text())["folds"]["0"]["label_map_report"]
    assert report["host_classes"] == host and report["pathology_classes"] == pathology
    before, after = class_shares_from_files(dataset, host, pathology)
    goals = {entry["class"]: entry["target_share"] for entry in report["classes"] if entry["role"] == "pathology"}
    for c in pathology:
        factor = after[c] / before[c]
        assert factor >= KEPT, (c, before, after)
        if goals[c] is not None and goals[c] > before[c] * 1.0001:
            assert factor >= RAISED, (c, before, after, report["classes"])
    return report, before, after


@pytest.mark.slow
def test_binary_lesion_dataset_raises_the_lesion_in_the_body(covid_binary_lesion_dataset_folder):
    """Background + lesion: the region is the body, not the lesion itself (which would always be 100 %)."""
    output = generate_copy_paste(covid_binary_lesion_dataset_folder)
    assert "the body" in output and "lesion" in output
    report, before, after = assert_balanced(covid_binary_lesion_dataset_folder, [], [1])
    assert report["region"].startswith("the body") and before[1] < 0.2


@pytest.mark.slow
def test_two_comparable_lesion_types_without_a_host_are_both_raised(covid_two_lesion_types_dataset_folder):
    generate_copy_paste(covid_two_lesion_types_dataset_folder)
    report, before, after = assert_balanced(covid_two_lesion_types_dataset_folder, [], [1, 2])
    assert 0.5 < before[1] / before[2] < 2          # comparable frequencies
    assert all(entry["goal_rule"].startswith("rare") for entry in report["classes"])


@pytest.mark.slow
def test_three_lesion_types_in_a_host_class_are_raised_and_the_host_is_the_region(
        covid_three_lesion_types_dataset_folder):
    generate_copy_paste(covid_three_lesion_types_dataset_folder)
    report, before, after = assert_balanced(covid_three_lesion_types_dataset_folder, [1], [2, 3, 4])
    assert report["region"] == "host + pathology classes"
    assert before[4] < before[3] < before[2]


@pytest.mark.slow
def test_naming_only_the_pathology_class_does_not_make_it_the_region(covid_binary_lesion_dataset_folder, tmp_path):
    """--pathology-classes lesion alone keeps the body as the region (a 100 % share could never rise)."""
    generate_copy_paste(covid_binary_lesion_dataset_folder, "--pathology-classes", "lesion", "--overwrite")
    report, _, _ = assert_balanced(covid_binary_lesion_dataset_folder, [], [1])
    assert report["shares_before"]["1"] < 0.2


@pytest.mark.slow
def test_ms_volumes_most_slices_lesion_free_raise_the_lesion(ms_lesions_dataset_folder):
    dataset = RawDataset(ms_lesions_dataset_folder)
    lesion_free = sum(int(not (dataset.read_case(c)[1][z] == 1).any()) for c in dataset.case_ids
                      for z in range(dataset.read_case(c)[1].shape[0]))
    assert lesion_free > 0.5 * sum(dataset.read_case(c)[1].shape[0] for c in dataset.case_ids)
    generate_copy_paste(ms_lesions_dataset_folder)
    report, before, after = assert_balanced(ms_lesions_dataset_folder, [], [1])
    assert before[1] < 0.05


def test_balancing_whole_volumes_uses_3d_components_inside_the_brain(ms_lesions_dataset_folder):
    """The same goals on whole MS volumes: 3D donors pasted inside the 3D body (brain) mask, where lesions occur;
    the lesion's share of the brain over real + new volumes rises by >= 1.5x."""
    dataset = RawDataset(ms_lesions_dataset_folder)
    training = fold_training_cases(dataset, "0")
    volumes, bodies = [], []
    for case_id in training:
        image, label, _ = dataset.read_case(case_id)
        volumes.append(label.astype(np.int16))
        bodies.append(body_mask(image[0]))
    new_maps, report = generate_label_maps(volumes, [(c, None) for c in training], max_new_maps=len(volumes),
                                           seed=0, body_masks=bodies, stop_at_target=False, num_classes=2)
    assert report["region"].startswith("the body") and len(new_maps) == len(volumes)
    assert report["shares_after"]["1"] >= RAISED * report["shares_before"]["1"]
    for new_map in new_maps:
        target = training.index(new_map.provenance["target"]["case_id"])
        changed = new_map.label_map != volumes[target]
        assert changed.any() and np.all(volumes[target][changed] == 0) and np.all(new_map.label_map[changed] == 1)
        assert not np.any(changed & ~bodies[target])            # never outside the brain
        for paste in new_map.provenance["pastes"]:
            assert len(paste["donor"]["bbox"]) == 6 and paste["donor"]["case_id"] in training
            shifts = [op["offset"] for op in paste["operations"] if op["op"] == "shift"]
            assert all(len(offset) == 3 for offset in shifts)
    # from the maps themselves: lesion voxels over brain voxels
    real_share = sum(int((v == 1).sum()) for v in volumes) / sum(int((b | (v == 1)).sum())
                                                                 for v, b in zip(volumes, bodies))
    new_voxels = sum(int((m.label_map == 1).sum()) for m in new_maps)
    new_brain = sum(int((bodies[training.index(m.provenance["target"]["case_id"])] | (m.label_map == 1)).sum())
                    for m in new_maps)
    combined = (real_share * sum(int((b | (v == 1)).sum()) for v, b in zip(volumes, bodies)) + new_voxels) / (
        sum(int((b | (v == 1)).sum()) for v, b in zip(volumes, bodies)) + new_brain)
    assert combined == pytest.approx(report["shares_after"]["1"], rel=1e-9)


def per_map_loads_from_files(dataset: RawDataset, host, pathology, fold="0"):
    """(real, new) per-map loads of the pathology classes (their share of the map's region: host + pathology, or
    without a host the body plus the pathology), from the label and image files: per slice for 2D data, per
    volume for 3D; real maps without the class are left out."""
    reader = dataset.reader_writer()
    volumes = dataset.declared_unit != "slice"

    def loads(image, label):
        maps = [(image[:, z], label[z]) for z in range(label.shape[0])] if not volumes else [(image, label)]
        found = []
        for map_image, map_label in maps:
            lesion = np.isin(map_label, pathology)
            region = np.isin(map_label, host + pathology) if host else body_mask(map_image[0]) | lesion
            if lesion.any():
                found.append(lesion.sum() / region.sum())
        return found

    real = [load for case_id in fold_training_cases(dataset, fold) for load in loads(*dataset.read_case(case_id)[:2])]
    store = SyntheticStore(dataset)
    new = []
    for case_id in store.complete_case_ids(fold):
        image = reader.read_images([str(p) for p in store.image_files(case_id)])[0]
        new += loads(image, reader.read_seg(str(store.label_file(case_id)))[0][0].astype(int))
    return np.asarray(real), np.asarray(new)


@pytest.mark.slow
@pytest.mark.parametrize("which", ["covid", "ms"])
def test_real_map_loads_lie_inside_the_real_distribution(which, covid_dataset_folder, ms_lesions_dataset_folder):
    """``--map-load real``: the new maps' median load lies between the real lesion-bearing maps' median and p90,
    and their p90 is at most the real p95 (Dataset501 fold 0 at -r 0.5: per slice, lesion share of the lung;
    the MS volumes: per volume, lesion share of the brain)."""
    folder, host, pathology = ((covid_dataset_folder, [1], [2]) if which == "covid" else
                               (ms_lesions_dataset_folder, [], [1]))
    output = generate_copy_paste(folder, "--map-load", "real", "--overwrite")
    assert "per-map load of lesion" in output
    real, new = per_map_loads_from_files(RawDataset(folder), host, pathology)
    assert len(new) == len(SyntheticStore(RawDataset(folder)).complete_case_ids("0"))
    real_p50, real_p90, real_p95 = np.percentile(real, [50, 90, 95])
    assert real_p50 <= np.median(new) <= real_p90, (np.percentile(real, [10, 50, 90, 95]), np.percentile(new, [50, 90]))
    assert np.percentile(new, 90) <= real_p95 * 1.0001, (real_p95, np.percentile(new, 90))
