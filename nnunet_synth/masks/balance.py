"""Class balancing by copy-paste of real pathology regions into real label maps (000 §2.3, method.md §3).

Share definition: the share of class c is its pixel count over all pixels of the real maps *plus* the new maps
kept so far, i.e. the same f_c that CBMAT uses (``nnunet_synth.dataset.class_pixel_frequencies`` over the real
maps, extended by the new ones). A ``target_share`` is therefore directly comparable with those frequencies:
lesion at 1.8 % of all real pixels, target 4 % of all real + new pixels.

The loop, with a seeded ``numpy.random.Generator`` (same inputs and seed -> identical maps):

1. While some pathology class is below its target and fewer than ``max_new_maps`` maps were kept, draw a target
   map from the real maps (those with enough host tissue, by default) and start a new map as its copy.
2. Up to ``max_pastes_per_map`` times: pick the pathology class with the lowest running share among those still
   below target (running = real + kept + this map) and still under ``map_class_share_cap`` in this map; draw one
   of its connected regions (uniformly among all regions of at least ``min_donor_area`` pixels in all real maps);
   transform it with cascading probabilities, in this order, each with its own random parameter:
   rotation (p_rotate, angle uniform in +-max_angle_deg, about the region's box centre, nearest neighbour),
   copy-paste to another place (p_shift; the region's centroid is moved onto a random host pixel of the map),
   dilation (p_dilate, 1..max_dilation_iterations steps). Without the shift the region keeps its place from the
   donor map (slices of one anatomy are roughly aligned).
3. Paste: pasted pixels = transformed region AND current map == host class. Existing pathology, background and
   any other class never change. A paste is rejected when it covers fewer than ``min_pasted_pixels`` pixels or
   less than ``min_pasted_fraction`` of the transformed region (mostly outside the lung); another donor and
   placement are then drawn, up to ``max_attempts_per_map`` rejections per map.
4. A map with at least one paste is kept; one without is discarded (at most ``max_discarded_maps`` in a row,
   then the loop stops and reports ``no_placement``).

Provenance replays: crop the donor's component (``bbox``, ``component_index`` of ``scipy.ndimage.label`` of the
donor map == class), apply the operations in order with ``rotate_region`` / ``shift_region`` / ``dilate_region``
(the shift offset applies to the region as it is after rotation), then ``paste_region`` onto the target map as
modified by the pastes before it.
"""
from dataclasses import asdict, dataclass, field

import numpy as np

from nnunet_synth.errors import NnsynthError
from nnunet_synth.masks.paste import host_mask, paste_region
from nnunet_synth.masks.regions import Region, dilate_region, find_regions, rotate_region, shift_region

SHARE_DEFINITION = "pixel share of each class over all pixels of the real label maps plus the new maps"


@dataclass
class MaskGenerationConfig:
    """Transform probabilities and paste limits of the copy-paste balancing; saved in every report."""

    p_rotate: float = 0.5
    max_angle_deg: float = 180.0
    p_shift: float = 0.8
    p_dilate: float = 0.3
    max_dilation_iterations: int = 3
    min_donor_area: int = 20            # regions smaller than this are never copied
    min_pasted_pixels: int = 20         # a paste covering fewer host pixels is rejected
    min_pasted_fraction: float = 0.3    # ... or covering less than this fraction of the transformed region
    max_pastes_per_map: int = 20
    map_class_share_cap: float = 0.08   # stop pasting a class into a map once it covers this share of the map
    max_attempts_per_map: int = 60      # rejected pastes allowed per new map
    max_discarded_maps: int = 50        # new maps in a row without any accepted paste before giving up
    targets_need_host: bool = True      # draw target maps only among maps with enough host tissue

    def validate(self):
        for name in ("p_rotate", "p_shift", "p_dilate", "min_pasted_fraction", "map_class_share_cap"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise NnsynthError(f"mask generation: {name}={getattr(self, name)} must lie in [0, 1]")
        for name in ("max_dilation_iterations", "min_donor_area", "min_pasted_pixels", "max_pastes_per_map",
                     "max_attempts_per_map", "max_discarded_maps"):
            if getattr(self, name) < 1:
                raise NnsynthError(f"mask generation: {name}={getattr(self, name)} must be at least 1")


@dataclass
class NewLabelMap:
    """A generated label map and where it came from (``provenance`` is a JSON-serialisable dict)."""

    label_map: np.ndarray
    provenance: dict = field(default_factory=dict)


def pixel_counts(label_maps, num_classes: int) -> np.ndarray:
    """Pixels per class (index = label value) over all maps."""
    counts = np.zeros(num_classes, dtype=np.int64)
    for label_map in label_maps:
        counts += np.bincount(np.asarray(label_map).ravel(), minlength=num_classes)[:num_classes]
    return counts


def default_class_roles(counts: np.ndarray):
    """(host classes, pathology classes) from pixel counts: host = the most frequent non-background class,
    pathology = the other non-background classes present."""
    present = [c for c in range(1, len(counts)) if counts[c] > 0]
    if len(present) < 2:
        raise NnsynthError("mask generation needs a host class and at least one pathology class in the real maps; "
                           f"found non-background classes {present}")
    host = max(present, key=lambda c: (counts[c], -c))
    return [host], [c for c in present if c != host]


def transform_region(region: Region, config: MaskGenerationConfig, rng: np.random.Generator, anchor_mask):
    """Rotation, then shift, then dilation, each applied with its probability; return (region, operations).

    The shift moves the region's centroid onto a pixel drawn from ``anchor_mask`` (the map's host tissue).
    """
    operations = []
    if rng.random() < config.p_rotate:
        angle = round(float(rng.uniform(-config.max_angle_deg, config.max_angle_deg)), 1)
        region = rotate_region(region, angle)
        operations.append({"op": "rotate", "angle_deg": angle})
    if rng.random() < config.p_shift and region.area > 0:
        anchors = np.flatnonzero(anchor_mask)
        if anchors.size:
            anchor = np.unravel_index(anchors[rng.integers(anchors.size)], anchor_mask.shape)
            offset = np.round(np.asarray(anchor) - region.centroid).astype(int)
            region = shift_region(region, offset)
            operations.append({"op": "shift", "offset": [int(offset[0]), int(offset[1])]})
    if rng.random() < config.p_dilate:
        iterations = int(rng.integers(1, config.max_dilation_iterations + 1))
        region = dilate_region(region, iterations)
        operations.append({"op": "dilate", "iterations": iterations})
    return region, operations


def _map_id(map_id) -> dict:
    case_id, slice_index = map_id
    return {"case_id": str(case_id), "slice_index": int(slice_index)}


def _classes_to_paste(counts, map_counts, targets, cap):
    """Pathology classes still below target (over real + kept + this map) and under the cap in this map,
    least frequent first."""
    running = (counts + map_counts) / (counts.sum() + map_counts.sum())
    map_shares = map_counts / map_counts.sum()
    open_classes = [c for c, target in targets.items() if running[c] < target and map_shares[c] < cap]
    return sorted(open_classes, key=lambda c: (running[c], c))


def _try_paste(working, pathology_class, donors, host_classes, config, rng, map_ids):
    """One attempt: draw a donor, transform, paste. Return (new map, paste record) or (None, None) if rejected."""
    donor = donors[pathology_class][rng.integers(len(donors[pathology_class]))]
    region, operations = transform_region(donor.region, config, rng, host_mask(working, host_classes))
    new_map, pasted = paste_region(working, region, pathology_class, host_classes)
    if pasted < config.min_pasted_pixels or pasted < config.min_pasted_fraction * region.area:
        return None, None
    record = {
        "class": int(pathology_class),
        "donor": {**_map_id(map_ids[donor.map_index]), "class": donor.pathology_class,
                  "component_index": donor.component_index, "bbox": donor.bbox, "area": donor.region.area},
        "operations": operations,
        "region_area": region.area,
        "pasted_pixels": pasted,
    }
    return new_map, record


def _make_new_map(label_maps, map_ids, target_index, counts, targets, donors, host_classes, config, rng):
    """Paste regions into a copy of one real map; return (NewLabelMap or None, rejected paste count)."""
    num_classes = len(counts)
    working = np.array(label_maps[target_index], copy=True)
    pastes, rejected = [], 0
    while len(pastes) < config.max_pastes_per_map and rejected < config.max_attempts_per_map:
        map_counts = np.bincount(working.ravel(), minlength=num_classes)[:num_classes]
        open_classes = _classes_to_paste(counts, map_counts, targets, config.map_class_share_cap)
        if not open_classes:
            break
        new_map, record = _try_paste(working, open_classes[0], donors, host_classes, config, rng, map_ids)
        if new_map is None:
            rejected += 1
            continue
        working = new_map
        pastes.append(record)
    if not pastes:
        return None, rejected
    per_class = {}
    for record in pastes:
        per_class[record["class"]] = per_class.get(record["class"], 0) + record["pasted_pixels"]
    provenance = {
        "target": _map_id(map_ids[target_index]),
        "pastes": pastes,
        "pasted_pixels": int(sum(per_class.values())),
        "pasted_pixels_per_class": {str(c): int(n) for c, n in sorted(per_class.items())},
        "rejected_pastes": rejected,
    }
    return NewLabelMap(working, provenance), rejected


def _resolve_targets(target_share, pathology_classes) -> dict:
    if isinstance(target_share, dict):
        targets = {int(c): float(target_share[c]) for c in target_share}
        missing = set(pathology_classes) - set(targets)
        if missing:
            raise NnsynthError(f"mask generation: no target share for pathology classes {sorted(missing)}")
    else:
        targets = {int(c): float(target_share) for c in pathology_classes}
    for c, share in targets.items():
        if not 0.0 < share < 1.0:
            raise NnsynthError(f"mask generation: target share {share} of class {c} must lie in (0, 1)")
    return {c: targets[c] for c in pathology_classes}


def _collect_donors(label_maps, pathology_classes, min_area) -> dict:
    donors = {}
    for c in pathology_classes:
        donors[c] = [donor for index, label_map in enumerate(label_maps)
                     for donor in find_regions(label_map, c, index, min_area)]
        if not donors[c]:
            raise NnsynthError(f"mask generation: class {c} has no connected region of at least {min_area} pixels "
                               f"in the real maps, so there is nothing to copy: lower min_donor_area or drop the "
                               f"class from pathology_classes")
    return donors


def _check_inputs(label_maps, map_ids, host_classes, pathology_classes, num_classes, max_new_maps):
    if len(label_maps) == 0:
        raise NnsynthError("mask generation: no real label maps given")
    if len(label_maps) != len(map_ids):
        raise NnsynthError(f"mask generation: {len(label_maps)} label maps but {len(map_ids)} map ids")
    if max_new_maps < 0:
        raise NnsynthError(f"mask generation: max_new_maps={max_new_maps} must not be negative")
    overlap = set(host_classes) & set(pathology_classes)
    if overlap:
        raise NnsynthError(f"mask generation: classes {sorted(overlap)} are both host and pathology")
    if 0 in pathology_classes:
        raise NnsynthError("mask generation: background (0) cannot be a pathology class")
    for c in list(host_classes) + list(pathology_classes):
        if not 0 <= c < num_classes:
            raise NnsynthError(f"mask generation: class {c} is outside 0..{num_classes - 1}")


def _report(real_counts, counts, targets, host_classes, new_maps, max_new_maps, seed, stopped_because,
            rejected, discarded, config, num_real_maps) -> dict:
    before, after = real_counts / real_counts.sum(), counts / counts.sum()
    classes = [{"class": c, "target_share": t, "share_before": float(before[c]), "share_after": float(after[c]),
                "reached": bool(after[c] >= t)} for c, t in targets.items()]
    return {
        "share_definition": SHARE_DEFINITION,
        "num_real_maps": num_real_maps,
        "num_new_maps": len(new_maps),
        "max_new_maps": int(max_new_maps),
        "seed": seed,
        "host_classes": [int(c) for c in host_classes],
        "pathology_classes": [int(c) for c in targets],
        "shares_before": [float(s) for s in before],
        "shares_after": [float(s) for s in after],
        "pixel_counts_before": [int(n) for n in real_counts],
        "pixel_counts_after": [int(n) for n in counts],
        "classes": classes,
        "target_reached": all(entry["reached"] for entry in classes),
        "stopped_because": stopped_because,
        "rejected_pastes": int(rejected),
        "discarded_maps": int(discarded),
        "config": asdict(config),
    }


def generate_label_maps(label_maps, map_ids, host_classes=None, pathology_classes=None, target_share=0.04,
                        max_new_maps=500, seed=0, num_classes=None, config=None):
    """New label maps that raise every pathology class to ``target_share`` (see the module docstring).

    label_maps: real 2D integer maps; map_ids: their (case_id, slice_index), same order.
    host_classes / pathology_classes: label values (default: ``default_class_roles``).
    target_share: one share for all pathology classes, or {class: share}.
    Return (list of ``NewLabelMap``, report dict with the shares before and after and why the loop stopped).
    """
    config = config or MaskGenerationConfig()
    config.validate()
    if len(label_maps) == 0:
        raise NnsynthError("mask generation: no real label maps given")
    if num_classes is None:
        num_classes = int(max(int(np.max(m)) for m in label_maps)) + 1
    real_counts = pixel_counts(label_maps, num_classes)
    if host_classes is None or pathology_classes is None:
        default_host, default_pathology = default_class_roles(real_counts)
        host_classes = default_host if host_classes is None else host_classes
        pathology_classes = default_pathology if pathology_classes is None else pathology_classes
    host_classes, pathology_classes = [int(c) for c in host_classes], [int(c) for c in pathology_classes]
    _check_inputs(label_maps, map_ids, host_classes, pathology_classes, num_classes, max_new_maps)
    targets = _resolve_targets(target_share, pathology_classes)
    donors = _collect_donors(label_maps, pathology_classes, config.min_donor_area)
    target_indices = [i for i, m in enumerate(label_maps)
                      if not config.targets_need_host or host_mask(m, host_classes).sum() >= config.min_pasted_pixels]
    if not target_indices:
        raise NnsynthError(f"mask generation: no real map has {config.min_pasted_pixels} pixels of host classes "
                           f"{host_classes} to paste onto")

    rng = np.random.default_rng(seed)
    seed = int(seed) if isinstance(seed, (int, np.integer)) else None   # recorded only when it replays the run
    counts, new_maps = real_counts.copy(), []
    rejected = discarded = discarded_in_row = 0
    stopped_because = "target_reached"
    while any(counts[c] / counts.sum() < t for c, t in targets.items()):
        if len(new_maps) >= max_new_maps:
            stopped_because = "budget"
            break
        if discarded_in_row >= config.max_discarded_maps:
            stopped_because = "no_placement"
            break
        target_index = target_indices[rng.integers(len(target_indices))]
        new_map, map_rejected = _make_new_map(label_maps, map_ids, target_index, counts, targets, donors,
                                              host_classes, config, rng)
        rejected += map_rejected
        if new_map is None:
            discarded += 1
            discarded_in_row += 1
            continue
        discarded_in_row = 0
        new_map.provenance["index"] = len(new_maps)
        new_map.provenance["seed"] = seed
        counts += np.bincount(new_map.label_map.ravel(), minlength=num_classes)[:num_classes]
        new_maps.append(new_map)
    report = _report(real_counts, counts, targets, host_classes, new_maps, max_new_maps, seed, stopped_because,
                     rejected, discarded, config, len(label_maps))
    return new_maps, report
