"""Stage 2: label maps generated for class balance (Diff-Lung §2.3), on the real COVID-19 label maps.

Labels: 0 background (outside the lungs), 1 lung (normal tissue, the host), 2 lesion (the rare pathology).
Shares are of the region (lung + lesion). The balancing runs use every 4th real slice of every case (315 real
maps) to stay fast on 2 cores. Dataset503 (the same slices, lung merged into background, lesions split by
density into ground glass / dense) is the dataset without a host class.
"""
import json

import numpy as np
import pytest
from scipy import ndimage

from nnunet_synth.dataset import RawDataset, class_pixel_frequencies
from nnunet_synth.errors import NnsynthError
from nnunet_synth.masks import (
    MaskGenerationConfig,
    Region,
    body_mask,
    check_goals_raised,
    default_class_roles,
    dilate_region,
    find_regions,
    generate_label_maps,
    load_label_maps,
    paste_region,
    pixel_counts,
    region_footprint,
    region_shares,
    resolve_class_roles,
    rotate_region,
    shift_region,
)

BACKGROUND, LUNG, LESION = 0, 1, 2
TARGET_SHARE = 0.2   # of the region; the real lesion share of the region is 0.118


@pytest.fixture(scope="module")
def covid_dataset(covid_dataset_folder):
    return RawDataset(covid_dataset_folder)


@pytest.fixture(scope="module")
def all_label_maps(covid_dataset):
    return load_label_maps(covid_dataset)


@pytest.fixture(scope="module")
def real_maps(all_label_maps):
    label_maps, map_ids = all_label_maps
    return label_maps[::4], map_ids[::4]


@pytest.fixture(scope="module")
def balanced(real_maps):
    label_maps, map_ids = real_maps
    return generate_label_maps(label_maps, map_ids, host_classes=[LUNG], pathology_classes=[LESION],
                               target_share=TARGET_SHARE, max_new_maps=400, seed=0, num_classes=3)


def target_map_of(new_map, real_maps):
    label_maps, map_ids = real_maps
    target = new_map.provenance["target"]
    return label_maps[map_ids.index((target["case_id"], target["slice_index"]))]


def test_load_label_maps_returns_every_slice_with_its_id(covid_dataset, all_label_maps):
    label_maps, map_ids = all_label_maps
    assert len(label_maps) == len(map_ids) == 1258
    assert len(set(map_ids)) == len(map_ids)
    assert all(m.shape == (256, 256) for m in label_maps)
    shares = pixel_counts(label_maps, 3) / sum(m.size for m in label_maps)
    np.testing.assert_allclose(shares, class_pixel_frequencies(covid_dataset))
    assert 0.015 < shares[LESION] < 0.021


def test_default_roles_make_lung_the_host_and_lesion_the_pathology(all_label_maps):
    host, pathology = default_class_roles(pixel_counts(all_label_maps[0], 3))
    assert host == [LUNG] and pathology == [LESION]


def test_every_pasted_pixel_was_host_tissue_and_is_now_lesion(balanced, real_maps):
    new_maps, _ = balanced
    assert new_maps
    for new_map in new_maps:
        target = target_map_of(new_map, real_maps)
        changed = new_map.label_map != target
        assert changed.any()
        assert np.all(target[changed] == LUNG)
        assert np.all(new_map.label_map[changed] == LESION)
        assert changed.sum() == new_map.provenance["pasted_pixels"]


def test_existing_lesion_and_background_never_change(balanced, real_maps):
    new_maps, _ = balanced
    for new_map in new_maps:
        target = target_map_of(new_map, real_maps)
        assert np.all(new_map.label_map[target == LESION] == LESION)
        assert np.all(new_map.label_map[target == BACKGROUND] == BACKGROUND)
        assert new_map.label_map.dtype == target.dtype and new_map.label_map.shape == target.shape


def test_lesion_share_rises_to_target_within_budget(balanced, real_maps):
    new_maps, report = balanced
    label_maps, _ = real_maps
    assert report["target_reached"] and report["stopped_because"] == "target_reached"
    assert 0 < report["num_new_maps"] == len(new_maps) <= 400
    lung, lesion = report["classes"]
    assert lesion["class"] == LESION and lesion["reached"] and lung["role"] == "host" and lung["target_share"] is None
    assert 0.10 < lesion["share_before"] < 0.14
    assert TARGET_SHARE <= lesion["share_after"] < TARGET_SHARE + 0.01
    # the report's shares are the shares of the region (lung + lesion) over real + new maps
    all_maps = list(label_maps) + [m.label_map for m in new_maps]
    counts, real_counts = pixel_counts(all_maps, 3), pixel_counts(label_maps, 3)
    assert report["shares_after"] == pytest.approx({"1": counts[1] / counts[1:].sum(),
                                                    "2": counts[2] / counts[1:].sum()})
    assert report["shares_before"]["2"] == pytest.approx(real_counts[2] / real_counts[1:].sum())
    json.dumps(report)


def test_provenance_names_target_donor_region_operations_and_pasted_count(balanced, real_maps):
    new_maps, _ = balanced
    label_maps, map_ids = real_maps
    for index, new_map in enumerate(new_maps):
        provenance = json.loads(json.dumps(new_map.provenance))
        assert provenance == new_map.provenance
        assert provenance["index"] == index and provenance["seed"] == 0
        assert (provenance["target"]["case_id"], provenance["target"]["slice_index"]) in map_ids
        assert provenance["pastes"]
        assert provenance["pasted_pixels"] == sum(p["pasted_pixels"] for p in provenance["pastes"])
        assert provenance["pasted_pixels_per_class"] == {str(LESION): provenance["pasted_pixels"]}
        for paste in provenance["pastes"]:
            donor = paste["donor"]
            assert paste["class"] == donor["class"] == LESION
            donor_map = label_maps[map_ids.index((donor["case_id"], donor["slice_index"]))]
            components, _ = ndimage.label(donor_map == LESION)
            component = components == donor["component_index"]
            assert component.sum() == donor["area"] >= 20
            rows, cols = np.nonzero(component)
            assert [rows.min(), cols.min(), rows.max() + 1, cols.max() + 1] == donor["bbox"]
            assert paste["pasted_pixels"] >= 20
            for operation in paste["operations"]:
                assert operation["op"] in ("rotate", "shift", "dilate")
                if operation["op"] == "rotate":
                    assert -180 <= operation["angle_deg"] <= 180
                elif operation["op"] == "shift":
                    assert len(operation["offset"]) == 2
                else:
                    assert 1 <= operation["iterations"] <= 3
            ops = [operation["op"] for operation in paste["operations"]]
            assert ops == sorted(ops, key=["rotate", "shift", "dilate"].index)


def test_provenance_replays_to_the_same_map(balanced, real_maps):
    """Donor region + operations, applied in order to the target, rebuild each new map exactly."""
    new_maps, _ = balanced
    label_maps, map_ids = real_maps
    replay = {"rotate": lambda r, op: rotate_region(r, op["angle_deg"]),
              "shift": lambda r, op: shift_region(r, op["offset"]),
              "dilate": lambda r, op: dilate_region(r, op["iterations"])}
    for new_map in new_maps[:40]:
        rebuilt = target_map_of(new_map, real_maps)
        for paste in new_map.provenance["pastes"]:
            donor = paste["donor"]
            donor_map = label_maps[map_ids.index((donor["case_id"], donor["slice_index"]))]
            row_start, col_start, row_stop, col_stop = donor["bbox"]
            components, _ = ndimage.label(donor_map == donor["class"])
            region = Region(components[row_start:row_stop, col_start:col_stop] == donor["component_index"],
                            (row_start, col_start))
            for operation in paste["operations"]:
                region = replay[operation["op"]](region, operation)
            rebuilt, pasted = paste_region(rebuilt, region, paste["class"], [LUNG])
            assert pasted == paste["pasted_pixels"] and region.area == paste["region_area"]
        np.testing.assert_array_equal(rebuilt, new_map.label_map)


def test_same_seed_gives_identical_maps_and_another_seed_different_ones(real_maps):
    label_maps, map_ids = real_maps

    def run(seed):
        return generate_label_maps(label_maps, map_ids, target_share=TARGET_SHARE, max_new_maps=15, seed=seed)

    first, first_report = run(7)
    again, again_report = run(7)
    other, _ = run(8)
    assert len(first) == len(again) == 15
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a.label_map, b.label_map)
        assert a.provenance == b.provenance
    assert first_report == again_report
    assert any(a.label_map.shape != b.label_map.shape or np.any(a.label_map != b.label_map)
               for a, b in zip(first, other))


def test_small_budget_stops_at_budget_and_reports_the_share_reached(real_maps):
    label_maps, map_ids = real_maps
    new_maps, report = generate_label_maps(label_maps, map_ids, target_share=TARGET_SHARE, max_new_maps=5, seed=3)
    assert len(new_maps) == report["num_new_maps"] == 5
    assert report["stopped_because"] == "budget" and not report["target_reached"]
    _, lesion = report["classes"]
    assert not lesion["reached"]
    assert lesion["share_before"] < lesion["share_after"] < TARGET_SHARE
    assert report["shares_after"][str(LESION)] == lesion["share_after"]


def test_target_already_reached_makes_no_maps(real_maps):
    label_maps, map_ids = real_maps
    new_maps, report = generate_label_maps(label_maps, map_ids, target_share=0.05, max_new_maps=50, seed=0)
    assert new_maps == [] and report["target_reached"] and report["stopped_because"] == "target_reached"


def test_transforms_keep_the_region_shape_where_expected(real_maps):
    label_maps, _ = real_maps
    donor = max((d for i, m in enumerate(label_maps[:20]) for d in find_regions(m, LESION, i, 20)),
                key=lambda d: d.region.area)
    region = donor.region
    np.testing.assert_array_equal(rotate_region(region, 0.0).mask, region.mask)
    quarter = rotate_region(region, 90.0)
    assert quarter.area == region.area and quarter.mask.shape == region.mask.shape[::-1]
    grown = dilate_region(region, 2)
    expected = ndimage.binary_dilation(region_footprint(region, (256, 256)), iterations=2)
    np.testing.assert_array_equal(region_footprint(grown, (256, 256)), expected)


def test_paste_writes_only_onto_host_pixels(real_maps):
    label_maps, _ = real_maps
    target = label_maps[10]
    whole_map = Region(np.ones((256, 256), dtype=bool), (0, 0))
    pasted_map, pasted = paste_region(target, whole_map, LESION, [LUNG])
    assert pasted == (target == LUNG).sum()
    assert np.all(pasted_map[target != LUNG] == target[target != LUNG])
    assert np.all(pasted_map[target == LUNG] == LESION)


def test_bad_class_roles_are_one_line_errors(real_maps):
    label_maps, map_ids = real_maps
    with pytest.raises(NnsynthError, match="both host and pathology"):
        generate_label_maps(label_maps, map_ids, host_classes=[1], pathology_classes=[1, 2], max_new_maps=1)
    no_lesion = [np.where(m == LESION, LUNG, m) for m in label_maps[:5]]
    with pytest.raises(NnsynthError, match="nothing to copy"):
        generate_label_maps(no_lesion, map_ids[:5], host_classes=[1], pathology_classes=[2], max_new_maps=1,
                            num_classes=3)
    with pytest.raises(NnsynthError, match="map ids"):
        generate_label_maps(label_maps, map_ids[:3], max_new_maps=1)


def test_config_limits_are_checked():
    with pytest.raises(NnsynthError, match="p_rotate"):
        MaskGenerationConfig(p_rotate=1.5).validate()


def test_default_goal_raises_the_rarest_class_1_5x_inside_the_region_and_caps_each_map(real_maps):
    """As Diff-Lung §2.3 (emphysema 1.8 % -> 6 % of the lung): the rarest class's share of the region rises towards
    3x, and no new map is filled with disease (not half of the lung field)."""
    label_maps, map_ids = real_maps
    config = MaskGenerationConfig()
    new_maps, report = generate_label_maps(label_maps, map_ids, max_new_maps=len(label_maps) // 2, seed=0,
                                           stop_at_target=False)
    assert report["host_classes"] == [LUNG] and report["rarest_class"] == LESION
    assert len(new_maps) == len(label_maps) // 2 and report["stopped_because"] == "budget"
    before, after = report["shares_before"][str(LESION)], report["shares_after"][str(LESION)]
    target = report["classes"][1]["target_share"]
    assert target == pytest.approx(3 * before) and after >= 1.5 * before and report["rarest_share_factor"] >= 1.5
    check_goals_raised(report, "test")
    map_shares = [region_shares(pixel_counts([m.label_map], 3), [LUNG, LESION])[LESION] for m in new_maps]
    # the cap is checked before each paste, so one region may overshoot it
    assert np.median(map_shares) <= max(config.map_class_share_cap, target) + 0.1


def test_without_a_host_class_pastes_land_on_background_inside_the_body_where_the_class_occurs(
        covid_lesion_types_dataset_folder, covid_dataset_folder):
    dataset = RawDataset(covid_lesion_types_dataset_folder)
    label_maps, map_ids, images = [], [], []
    for case_id in dataset.case_ids:
        image, label_map, _ = dataset.read_case(case_id)
        for index in range(0, len(label_map), 4):
            label_maps.append(label_map[index])
            map_ids.append((case_id, index))
            images.append(image[0, index])
    counts = pixel_counts(label_maps, 3)
    assert default_class_roles(counts) == ([], [1, 2])          # ground glass is no host: 75 % of the foreground
    assert resolve_class_roles(dataset.labels, counts, ["ground_glass"]) == ([1], [2])
    bodies = [body_mask(image) for image in images]
    new_maps, report = generate_label_maps(label_maps, map_ids, max_new_maps=len(label_maps) // 2, seed=0,
                                           body_masks=bodies, stop_at_target=False)
    assert report["region"].startswith("the body")
    for c in ("1", "2"):       # both lesion types are rare in the body: both raised, neither only traded
        assert report["shares_after"][c] >= 1.5 * report["shares_before"][c], (c, report["classes"])
    for new_map in new_maps:
        target = new_map.provenance["target"]
        index = map_ids.index((target["case_id"], target["slice_index"]))
        changed = new_map.label_map != label_maps[index]
        assert np.all(label_maps[index][changed] == 0) and np.all(np.isin(new_map.label_map[changed], [1, 2]))
        assert not np.any(changed & ~bodies[index])                     # never off the body
        assert np.all(new_map.label_map[label_maps[index] > 0] == label_maps[index][label_maps[index] > 0])
        for paste in new_map.provenance["pastes"]:
            assert paste["placement"]["prior_case_ids"] and paste["donor"]["case_id"] in dataset.case_ids
    targets = [label_maps[map_ids.index((m.provenance["target"]["case_id"], m.provenance["target"]["slice_index"]))]
               for m in new_maps]
    # pastes land where the lesions occur: inside the lung fields (Dataset501's lung + lesion labels)
    lung_source = RawDataset(covid_dataset_folder)
    lung_fields = {case_id: lung_source.read_case(case_id)[1] > 0 for case_id in lung_source.case_ids}
    inside = total = 0
    for new_map, target in zip(new_maps, targets):
        pasted = new_map.label_map != target
        field = lung_fields[new_map.provenance["target"]["case_id"]][new_map.provenance["target"]["slice_index"]]
        inside, total = inside + (pasted & field).sum(), total + pasted.sum()
    assert inside >= 0.5 * total, inside / total   # measured 0.58; the rest: chest wall, mediastinum near the lungs


def test_a_goal_that_cannot_be_reached_is_a_one_line_error(real_maps):
    """Every paste is rejected (no donor covers 5000 pixels): the lesion's goal is impossible."""
    label_maps, map_ids = real_maps
    config = MaskGenerationConfig(min_pasted_pixels=5000, max_discarded_maps=3)
    new_maps, report = generate_label_maps(label_maps, map_ids, max_new_maps=10, config=config, stop_at_target=False)
    assert new_maps == [] and report["stopped_because"] == "no_placement"
    with pytest.raises(NnsynthError, match="could not paste pathology class 2 at all") as error:
        check_goals_raised(report, "dataset.json")
    assert "\n" not in str(error.value)
