"""Class balancing by copy-paste of real pathology regions into real label maps (Diff-Lung §2.3, method.md §3).

**The region.** Shares are measured inside a region of interest, as Diff-Lung reports them (emphysema 1.8 % -> 6 %
*of the lung*): with a host class, the region is the host classes plus the pathology classes (normal lung +
lesion for the COVID data); without one, it is the body of each map (``body_masks``: the image above Otsu's
threshold, holes filled) plus its pathology pixels, or the whole map when no body masks are given. nnU-Net's
ignore label is never part of it. The share of class c is its pixel count over the region's pixel count, summed
over the real maps plus the new maps kept so far. So without a host class a lesion's share is its fraction of
the body, and raising one pathology class never lowers another's share by definition.

**Goals, one per pathology class.** Default: a *rare* class (at most ``common_share`` of the region; every lesion
class of a typical dataset) has the goal ``target_factor`` x its real share, at most ``max_target_share``; a
*common* class (above ``common_share``, like ILD at 23 % of the lung in Diff-Lung) keeps its real share as its
goal, so it is pasted only to hold that share, never raised. Diff-Lung roughly tripled the rarest class and left
the common pathology about where it was. A ``target_share`` (one value for every pathology class, or
{class: share}) replaces the default goals; a class is never given a goal below its real share.

**Targets.** A new map starts as a copy of a real target map, drawn among the maps with room for a paste with a
probability proportional to the free fraction of its region (host tissue, or background body): a map whose region
is half lesion weighs half, and a lesion-free map (no pixel of a pathology class) weighs ``lesion_free_target_weight``
times its free fraction. Adding lesions to healthy tissue is the main use; a lesion-free map is never a donor.

**Per-map loads.** ``map_load="dense"`` (the default) pastes each new map until the running shares are back at the
goals, up to ``max(map_class_share_cap, goal)`` of the map's region: with a fixed budget (``-r 0.5``) the goals can
only be approached by filling every map to that cap. ``map_load="real"`` gives each new map one pathology class
(the one furthest below its goal) and a load drawn from the real maps that hold it: the load (share of the map's
region) of one such map, drawn uniformly among those at or above the ``load_from_percentile`` of the real loads
(the shift toward the rare class: the upper half by default), never above their ``load_cap_percentile``; the map is
pasted until it carries that load (at least one paste) and a paste that would take it beyond the cap is rejected.
The number of maps then decides the dataset-level shares.
Diff-Lung reports only shares over the whole augmented set; which load lifts the lesion without costing the common
class is measured (docs/label-maps.md).

Host classes: where pathology may be pasted (normal lung). By default the most frequent non-background class is
the host only when it holds at least ``HOST_MIN_FOREGROUND_SHARE`` of the labelled foreground (normal lung: 88 %
of the COVID foreground); otherwise there is no host (e.g. ground glass + consolidation on unlabelled background,
where making ground glass the host would only trade one lesion type for another). Without a host, a class is
pasted onto background pixels where that class occurs in the real maps (``placement.class_occurrence_prior``,
relative to the body's box) and, when body masks are given, inside the body of the target map: never off the
body, never over another class.

Maps may be 2D slices or 3D volumes: a 3D donor is a 3D connected component, rotated in-plane, shifted and dilated
in 3D.

The loop, with a seeded ``numpy.random.Generator`` (same inputs and seed -> identical maps):

1. While new maps are wanted (``stop_at_target``: until every goal is reached; otherwise until the budget
   ``max_new_maps``), draw a target map (weighted as above) and start a new map as its copy.
2. Up to ``max_pastes_per_map`` times: pick the class to paste: first any class whose running share (real + kept +
   this map) fell below its real share, then the class furthest below its goal, among those covering less than
   ``max(map_class_share_cap, goal)`` of this map's region; draw one of its connected regions (uniformly among
   all regions of at least ``min_donor_area`` pixels in all real maps); transform it with cascading
   probabilities, in this order, each with its own random parameter: rotation (p_rotate, angle uniform in
   +-max_angle_deg, about the region's box centre, nearest neighbour), copy-paste to another place (p_shift; the
   region's centroid is moved onto a random pixel where the class may be pasted), dilation (p_dilate,
   1..max_dilation_iterations steps). Without the shift the region keeps its place from the donor map.
3. Paste: pasted pixels = transformed region AND where the class may be pasted. A paste is rejected when it covers
   fewer than ``min_pasted_pixels`` pixels or less than ``min_pasted_fraction`` of the transformed region; another
   donor and placement are then drawn, up to ``max_attempts_per_map`` rejections per map.
4. A map with at least one paste is kept; one without is discarded (at most ``max_discarded_maps`` in a row, then
   the loop stops and reports ``no_placement``).

Provenance replays (with a host class): crop the donor's component (``bbox``, ``component_index`` of
``scipy.ndimage.label`` of the donor map == class), apply the operations in order with ``rotate_region`` /
``shift_region`` / ``dilate_region`` (the shift offset applies to the region as it is after rotation), then
``paste_region`` onto the target map as modified by the pastes before it. Without a host class, each paste also
records the cases whose maps formed the occurrence prior (``placement``).
"""
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from nnunet_synth.dataset.native_slices import PackedRows
from nnunet_synth.errors import NnsynthError
from nnunet_synth.masks.paste import host_mask, region_window
from nnunet_synth.masks.placement import class_occurrence_prior, mask_box, prior_on_map
from nnunet_synth.masks.regions import Region, dilate_region, find_regions, rotate_region, shift_region

SHARE_DEFINITION = ("pixel share of each class inside the region of interest (host + pathology classes; without a "
                    "host class, the body plus the pathology pixels) over the real label maps plus the new maps")
HOST_MIN_FOREGROUND_SHARE = 0.8   # the most frequent class is a host by default only if it is this much of the
                                  # foreground
MAP_LOADS = ("dense", "real")
TARGET_WEIGHTING = ("free fraction of the target's region (host tissue or background body), maps with room only; "
                    "lesion-free maps (no pixel of a pathology class) weigh lesion_free_target_weight times more")


@dataclass
class MaskGenerationConfig:
    """Transform probabilities, goals and paste limits of the copy-paste balancing; saved in every report."""

    p_rotate: float = 0.5
    max_angle_deg: float = 180.0
    p_shift: float = 0.8
    p_dilate: float = 0.3
    max_dilation_iterations: int = 3
    min_donor_area: int = 20            # regions smaller than this are never copied
    min_pasted_pixels: int = 20         # a paste covering fewer host pixels is rejected
    min_pasted_fraction: float = 0.3    # ... or covering less than this fraction of the transformed region
    max_pastes_per_map: int = 20
    max_pastes_per_volume: int = 400    # the same limit for a 3D map (a volume holds many slices' worth of room)
    target_factor: float = 3.0          # default goal of a rare pathology class: this multiple of its real share
    max_target_share: float = 0.5       # ... but at most this share of the region
    common_share: float = 0.15          # a pathology class holding more of the region is common: kept, not raised
    map_class_share_cap: float = 0.3    # stop pasting a class into a map once it covers max(this, its goal) of
                                        # the map's region (Diff-Lung did not fill maps with disease)
    map_load: str = "dense"             # dense: each map pasted up to the cap above; real: one class per map, to a
                                        # load drawn from the real maps holding it (module docstring)
    load_from_percentile: float = 50.0  # real loads: drawn among the real maps' loads at or above this percentile
    load_cap_percentile: float = 90.0   # ... and never above this one
    max_attempts_per_map: int = 60      # rejected pastes allowed per new map
    max_discarded_maps: int = 50        # new maps in a row without any accepted paste before giving up
    targets_need_host: bool = True      # draw target maps only among maps with room to paste
    lesion_free_target_weight: float = 2.0  # a lesion-free real map is this much more likely a target (healthy
                                            # tissue is where new lesions are most needed); never a donor
    prior_min_maps: int = 10            # no host class: paste where the class occurs in at least this many real maps
    prior_min_fraction: float = 0.1     # ... or this fraction of the maps that hold the class, if fewer (few volumes)
    prior_dilation: int = 2             # ... grown by this many pixels of the prior's grid

    def validate(self):
        for name in ("p_rotate", "p_shift", "p_dilate", "min_pasted_fraction", "map_class_share_cap",
                     "max_target_share", "common_share", "prior_min_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise NnsynthError(f"mask generation: {name}={getattr(self, name)} must lie in [0, 1]")
        for name in ("max_dilation_iterations", "min_donor_area", "prior_min_maps", "min_pasted_pixels",
                     "max_pastes_per_map", "max_pastes_per_volume", "max_attempts_per_map", "max_discarded_maps"):
            if getattr(self, name) < 1:
                raise NnsynthError(f"mask generation: {name}={getattr(self, name)} must be at least 1")
        if self.map_load not in MAP_LOADS:
            raise NnsynthError(f"mask generation: map_load={self.map_load!r} must be one of {', '.join(MAP_LOADS)}")
        if not 0.0 <= self.load_from_percentile <= self.load_cap_percentile <= 100.0:
            raise NnsynthError(f"mask generation: load_from_percentile={self.load_from_percentile} and "
                               f"load_cap_percentile={self.load_cap_percentile} must satisfy 0 <= from <= cap <= 100")
        if not self.lesion_free_target_weight > 0.0:
            raise NnsynthError(f"mask generation: lesion_free_target_weight={self.lesion_free_target_weight} must be "
                               f"above 0")
        if not self.target_factor > 1.0:
            raise NnsynthError(f"mask generation: target_factor={self.target_factor} must be above 1")


@dataclass
class NewLabelMap:
    """A generated label map and where it came from (``provenance`` is a JSON-serialisable dict)."""

    label_map: np.ndarray
    provenance: dict = field(default_factory=dict)


class NewLabelMapsOnDisk(Sequence):
    """New label maps kept in a temporary file (blosc2-compressed) and their provenance in memory: what
    ``generate_label_maps`` fills when the number of new maps grows with the dataset. ``maps[i]`` is a
    ``NewLabelMap``; the file goes with the object."""

    def __init__(self):
        self._label_maps = PackedRows.temporary("nnsynth_new_maps_")
        self._provenance = []

    def append(self, new_map: NewLabelMap):
        self._label_maps.append(new_map.label_map)
        self._provenance.append(new_map.provenance)

    def __len__(self) -> int:
        return len(self._provenance)

    def __getitem__(self, index: int) -> NewLabelMap:
        return NewLabelMap(self._label_maps[index], self._provenance[index])


def pixel_counts(label_maps, num_classes: int) -> np.ndarray:
    """Pixels per class (index = label value) over all maps."""
    counts = np.zeros(num_classes, dtype=np.int64)
    for label_map in label_maps:
        counts += np.bincount(np.asarray(label_map).ravel(), minlength=num_classes)[:num_classes]
    return counts


def default_class_roles(counts: np.ndarray, declared=None):
    """(host classes, pathology classes) from pixel counts: host = the most frequent non-background class if it
    holds at least HOST_MIN_FOREGROUND_SHARE of the foreground (normal tissue) and another class is present, else
    none; pathology = the other non-background classes present.

    ``declared``: the annotated classes of the dataset (default: those present). A declared class absent from these
    maps (a fold whose training cases lack it) is still a pathology class, with no pixel to balance."""
    present = [c for c in range(1, len(counts)) if counts[c] > 0]
    if not present:
        raise NnsynthError("mask generation needs at least one pathology class in the real maps; found only background")
    classes = sorted(set(present) | set(declared or ()))
    most_frequent = max(present, key=lambda c: (counts[c], -c))
    if len(present) > 1 and counts[most_frequent] >= HOST_MIN_FOREGROUND_SHARE * sum(counts[c] for c in present):
        return [most_frequent], [c for c in classes if c != most_frequent]
    return [], classes


def resolve_class_roles(labels: dict, counts, host_names=None, pathology_names=None, source="mask generation",
                        declared=None):
    """(host values, pathology values) from label names (``labels`` name -> value); a missing list takes the
    default of ``default_class_roles``, the other list is respected. ``host_names=[]`` means no host class.
    Naming only the pathology classes never makes the region those classes alone: without a host the region is
    the body (module docstring)."""
    def values(names, what):
        unknown = [name for name in names if name not in labels]
        if unknown:
            raise NnsynthError(f"{source}: {what} {unknown} are not labels (labels: {list(labels)}): use label names")
        return sorted(labels[name] for name in names)

    host = None if host_names is None else values(host_names, "host classes")
    pathology = None if pathology_names is None else values(pathology_names, "pathology classes")
    return complete_class_roles(counts, host, pathology, declared)


def complete_class_roles(counts, host_classes=None, pathology_classes=None, declared=None):
    """(host values, pathology values): a missing (None) list is the default of ``default_class_roles`` without the
    classes of the other list; a given list is kept. Pathology values sorted."""
    default_host, default_pathology = default_class_roles(np.asarray(counts), declared)
    if host_classes is None:
        host_classes = [c for c in default_host if pathology_classes is None or c not in pathology_classes]
    if pathology_classes is None:
        pathology_classes = [c for c in set(default_host) | set(default_pathology) if c not in host_classes]
    return list(host_classes), sorted(pathology_classes)


def region_shares(counts: np.ndarray, region_classes, region_pixels=None) -> np.ndarray:
    """Share of each class inside the region (0 for classes outside it). The region's size is
    ``region_pixels`` when given (a region that is not a set of classes: the body), else the pixels of
    ``region_classes``."""
    region = np.zeros(len(counts), dtype=bool)
    region[list(region_classes)] = True
    total = counts[region].sum() if region_pixels is None else region_pixels
    return np.where(region, counts / total, 0.0) if total > 0 else np.zeros(len(counts))


class BalanceRegion:
    """The region shares are measured in (module docstring), map by map: host + pathology pixels; without a host
    class, the body (``body_masks``) plus the pathology pixels, or the whole map; never the ignore label."""

    def __init__(self, host_classes, pathology_classes, body_masks=None, ignore_label=None):
        self.host_classes, self.pathology_classes = list(host_classes), list(pathology_classes)
        self.body_masks, self.ignore_label = body_masks, ignore_label

    @property
    def description(self) -> str:
        if self.host_classes:
            return "host + pathology classes"
        if self.body_masks is not None:
            return "the body (image above Otsu's threshold, holes filled) plus the pathology pixels"
        return "the whole map (no host class and no body masks)"

    def pixels(self, label_map, real_index) -> int:
        """Region pixels of ``label_map``, a real map or a new map made from real map ``real_index``."""
        label_map = np.asarray(label_map)
        if self.host_classes:
            return int(np.isin(label_map, self.host_classes + self.pathology_classes).sum())
        region = (np.ones(label_map.shape, dtype=bool) if self.body_masks is None
                  else np.asarray(self.body_masks[real_index], dtype=bool) | np.isin(label_map, self.pathology_classes))
        if self.ignore_label is not None:
            region &= label_map != self.ignore_label
        return int(region.sum())


def transform_region(region: Region, config: MaskGenerationConfig, rng: np.random.Generator, anchor_mask,
                     anchors=None):
    """Rotation, then shift, then dilation, each applied with its probability; return (region, operations).

    The shift moves the region's centroid onto a pixel drawn from ``anchor_mask`` (where the class may go);
    ``anchors`` = ``np.flatnonzero(anchor_mask)`` when the caller has it already.
    """
    operations = []
    if rng.random() < config.p_rotate:
        angle = round(float(rng.uniform(-config.max_angle_deg, config.max_angle_deg)), 1)
        region = rotate_region(region, angle)
        operations.append({"op": "rotate", "angle_deg": angle})
    if rng.random() < config.p_shift and region.area > 0:
        anchors = np.flatnonzero(anchor_mask) if anchors is None else anchors
        if anchors.size:
            anchor = np.unravel_index(anchors[rng.integers(anchors.size)], anchor_mask.shape)
            offset = np.round(np.asarray(anchor) - region.centroid).astype(int)
            region = shift_region(region, offset)
            operations.append({"op": "shift", "offset": [int(o) for o in offset]})
    if rng.random() < config.p_dilate:
        iterations = int(rng.integers(1, config.max_dilation_iterations + 1))
        region = dilate_region(region, iterations)
        operations.append({"op": "dilate", "iterations": iterations})
    return region, operations


def _map_id(map_id) -> dict:
    case_id, slice_index = map_id
    return {"case_id": str(case_id), "slice_index": None if slice_index is None else int(slice_index)}


@dataclass
class Goals:
    """Per pathology class: its real share of the region (the floor no class goes below) and its goal share."""

    real: dict       # class -> real share
    goal: dict       # class -> goal share (>= real); classes absent from the real maps have none
    rule: dict       # class -> how the goal was chosen

    def classes_to_paste(self, running, map_shares, cap) -> list:
        """Classes that may be pasted now, most urgent first: below their real share (a common class diluted by
        the new maps), then below their goal, furthest first; none that covers max(cap, goal) of this map."""
        may = [c for c in self.goal if map_shares[c] < max(cap, self.goal[c])]
        below_floor = sorted((c for c in may if running[c] < self.real[c]),
                             key=lambda c: (running[c] / self.real[c], c))
        below_goal = sorted((c for c in may if c not in below_floor and running[c] < self.goal[c]),
                            key=lambda c: (running[c] / self.goal[c], c))
        return below_floor + below_goal

    def open(self, shares) -> bool:
        return any(shares[c] < goal for c, goal in self.goal.items())


def resolve_goals(target_share, pathology_classes, real_shares, config: MaskGenerationConfig) -> Goals:
    """The goal of every pathology class (module docstring): default rare x target_factor / common kept; or the
    given ``target_share`` (one value, or {class: share}); never below the real share."""
    real = {c: float(real_shares[c]) for c in pathology_classes}
    goal, rule = {}, {}
    if isinstance(target_share, dict):
        given = {int(c): float(v) for c, v in target_share.items()}
        unknown = set(given) - set(pathology_classes)
        if unknown:
            raise NnsynthError(f"mask generation: target shares for classes {sorted(unknown)} that are not pathology "
                               f"classes {list(pathology_classes)}")
    elif target_share is not None:
        given = {c: float(target_share) for c in pathology_classes}
    else:
        given = None
    for c, share in (given or {}).items():
        if not 0.0 < share < 1.0:
            raise NnsynthError(f"mask generation: target share {share} of class {c} must lie in (0, 1)")
    for c in pathology_classes:
        if real[c] <= 0:
            rule[c] = "absent from the real maps: no goal"
            continue
        if given is not None:
            goal[c] = max(given.get(c, real[c]), real[c])
            rule[c] = "given target share" if c in given else "kept at its real share"
        elif real[c] <= config.common_share:
            goal[c] = max(real[c], min(config.target_factor * real[c], config.max_target_share))
            rule[c] = f"rare (<= {config.common_share:g} of the region): {config.target_factor:g} x its real share"
        else:
            goal[c] = real[c]
            rule[c] = f"common (> {config.common_share:g} of the region): kept at its real share"
    return Goals(real, goal, rule)


class Placement:
    """Where each pathology class may be pasted in a map: host tissue, or (no host class) background pixels where
    the class occurs in the real maps and inside the body (``body_masks``, one per real map, optional)."""

    def __init__(self, label_maps, map_ids, host_classes, pathology_classes, config, body_masks=None):
        self.host_classes = list(host_classes)
        self.body_masks = body_masks
        self.priors, self.prior_case_ids = {}, {}
        self.boxes = None if body_masks is None else [mask_box(mask) for mask in body_masks]
        self.min_maps = {}
        if not self.host_classes:
            for c in pathology_classes:
                holding = [i for i, m in enumerate(label_maps) if np.any(np.asarray(m) == c)]
                self.min_maps[c] = min(config.prior_min_maps, max(1, int(np.ceil(config.prior_min_fraction *
                                                                                 len(holding)))))
                self.priors[c] = class_occurrence_prior(label_maps, c, config.prior_dilation, self.boxes,
                                                        self.min_maps[c])
                self.prior_case_ids[c] = sorted({str(map_ids[i][0]) for i in holding})

    def mask(self, label_map, pathology_class, target_index) -> np.ndarray:
        if self.host_classes:
            return host_mask(label_map, self.host_classes)
        box = None if self.boxes is None else self.boxes[target_index]
        allowed = (label_map == 0) & prior_on_map(self.priors[pathology_class], label_map.shape, box)
        if self.body_masks is not None:
            allowed &= self.body_masks[target_index]
        return allowed

    def record(self, pathology_class) -> dict:
        if self.host_classes:
            return {}
        frame = "the body's box, inside the target's body" if self.body_masks is not None else "the map"
        rule = (f"background where the class occurs in >= {self.min_maps[pathology_class]} real maps (positions "
                f"relative to {frame})")
        return {"placement": {"rule": rule, "prior_case_ids": self.prior_case_ids[pathology_class]}}


@dataclass
class _Allowed:
    """Where one class may be pasted in the map being made (``mask``) and its flat indices (``anchors``)."""

    mask: np.ndarray
    anchors: np.ndarray = None

    def flat(self) -> np.ndarray:
        if self.anchors is None:
            self.anchors = np.flatnonzero(self.mask)
        return self.anchors

    def remove(self, window, pasted_crop):
        self.mask[window] &= ~pasted_crop
        self.anchors = None


def _try_paste(working, allowed: _Allowed, pathology_class, donors, placement, config, rng, map_ids):
    """One attempt: draw a donor, transform it, place it where allowed. Return (map window, pasted pixels inside
    the window, paste record), or None when the paste is rejected; ``working`` is not modified."""
    donor = donors[pathology_class][rng.integers(len(donors[pathology_class]))]
    region, operations = transform_region(donor.region, config, rng, allowed.mask, allowed.flat())
    window = region_window(region, working.shape)     # what paste_region writes, computed on the region's box
    pasted_crop = None if window is None else region.mask[window[1]] & allowed.mask[window[0]]
    pasted = 0 if pasted_crop is None else int(pasted_crop.sum())
    if pasted < config.min_pasted_pixels or pasted < config.min_pasted_fraction * region.area:
        return None
    record = {
        "class": int(pathology_class),
        "donor": {**_map_id(map_ids[donor.map_index]), "class": donor.pathology_class,
                  "component_index": donor.component_index, "bbox": donor.bbox, "area": donor.region.area},
        "operations": operations,
        "region_area": region.area,
        "pasted_pixels": pasted,
        **placement.record(pathology_class),
    }
    return window[0], pasted_crop, record


@dataclass
class _Running:
    """Pixel counts per class and region pixels over the real maps plus the new maps kept so far."""

    counts: np.ndarray
    region_pixels: int

    def shares(self, extra_counts=None, extra_region=0) -> np.ndarray:
        counts = self.counts if extra_counts is None else self.counts + extra_counts
        total = self.region_pixels + extra_region
        return counts / total if total > 0 else np.zeros(len(counts))


@dataclass
class _Load:
    """What one new map of the ``real`` map load carries: one class, pasted until it covers ``wanted`` of the map's
    region, never beyond ``cap`` (a high percentile of the real maps' loads)."""

    pathology_class: int
    drawn: float          # the load of a real map holding the class, drawn uniformly from the upper part
    wanted: float         # drawn, at most cap
    cap: float

    def record(self) -> dict:
        return {"class": self.pathology_class, "drawn_real_load": self.drawn, "wanted": self.wanted, "cap": self.cap}


def _draw_load(goals, running, real_loads, config, rng) -> _Load:
    """The class a ``real``-load map serves (the one furthest below its goal, or least above it) and its load."""
    shares = running.shares()
    pathology_class = min(goals.goal, key=lambda c: (shares[c] / goals.goal[c], c))
    loads = np.asarray(real_loads[pathology_class])
    cap = float(np.percentile(loads, config.load_cap_percentile))
    upper = loads[loads >= np.percentile(loads, config.load_from_percentile)]
    drawn = float(upper[rng.integers(upper.size)])
    return _Load(int(pathology_class), drawn, min(drawn, cap), cap)


def _make_new_map(label_maps, map_ids, target_index, running, goals, donors, placement, region, config, rng, tally,
                  real_loads=None):
    """Paste regions into a copy of one real map; return (NewLabelMap or None, its region pixels, rejected).
    ``tally``: class -> [paste attempts, accepted pastes], updated. ``real_loads`` (the ``real`` map load): class ->
    the loads of the real maps holding it."""
    num_classes = len(running.counts)
    load = None if config.map_load == "dense" else _draw_load(goals, running, real_loads, config, rng)
    working = np.array(label_maps[target_index], copy=True)
    map_region = region.pixels(working, target_index)   # pastes stay inside the region: it does not change
    map_counts = np.bincount(working.ravel(), minlength=num_classes)[:num_classes]
    allowed = {}          # class -> where it may be pasted in ``working`` (kept up to date after each paste)
    max_pastes = config.max_pastes_per_map if working.ndim == 2 else config.max_pastes_per_volume
    max_rejected = config.max_attempts_per_map * max_pastes // config.max_pastes_per_map
    pastes, rejected = [], 0
    while len(pastes) < max_pastes and rejected < max_rejected:
        if load is None:
            open_classes = goals.classes_to_paste(running.shares(map_counts, map_region),
                                                  map_counts / max(1, map_region), config.map_class_share_cap)
            if not open_classes:
                break
            pathology_class = open_classes[0]
        else:
            pathology_class = load.pathology_class
            if pastes and map_counts[pathology_class] >= load.wanted * map_region:
                break
        if pathology_class not in allowed:
            allowed[pathology_class] = _Allowed(placement.mask(working, pathology_class, target_index))
        attempt = _try_paste(working, allowed[pathology_class], pathology_class, donors, placement, config, rng,
                             map_ids)
        tally.setdefault(pathology_class, [0, 0])[0] += 1
        if attempt is None:
            rejected += 1
            continue
        window, pasted_crop, record = attempt
        if load is not None and map_counts[pathology_class] + record["pasted_pixels"] > load.cap * map_region:
            rejected += 1                   # beyond what real maps show
            continue
        replaced = working[window][pasted_crop]
        map_counts -= np.bincount(replaced, minlength=num_classes)[:num_classes]
        map_counts[pathology_class] += record["pasted_pixels"]
        working[window][pasted_crop] = pathology_class
        tally[pathology_class][1] += 1
        for mask in allowed.values():       # pasted pixels are pathology now: no longer host or background
            mask.remove(window, pasted_crop)
        pastes.append(record)
    if not pastes:
        return None, map_region, rejected
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
    if load is not None:
        provenance["load"] = load.record()
    return NewLabelMap(working, provenance), map_region, rejected


def _collect_donors(label_maps, goals: Goals, min_area) -> dict:
    """Donor regions of every class with a goal; a class that must be raised but has none is a one-line error."""
    if not goals.goal:
        raise NnsynthError(f"mask generation: none of the pathology classes {sorted(goals.real)} occurs in the real "
                           f"maps, so there is nothing to copy: check the labels, or name the classes to balance "
                           f"with --pathology-classes")
    donors = {}
    for c in goals.goal:
        donors[c] = [donor for index, label_map in enumerate(label_maps)
                     for donor in find_regions(np.asarray(label_map), c, index, min_area)]
        if not donors[c] and goals.goal[c] > goals.real[c]:
            raise NnsynthError(f"mask generation: the goal of class {c} cannot be reached: it has no connected region "
                               f"of at least {min_area} pixels in the real maps, so there is nothing to copy: lower "
                               f"--min-donor-area or leave the class out of --pathology-classes")
    return {c: found for c, found in donors.items() if found}


@dataclass
class _Targets:
    """The real maps a new map may start from, their probabilities, which of them are lesion-free, and the
    pathology load (class share of the region) of every real map that holds the class."""

    indices: list
    probabilities: np.ndarray
    lesion_free: set                 # indices of real maps without a pathology pixel
    num_lesion_free_maps: int        # among all real maps (targets or not)
    real_loads: dict                 # class -> [share of the map's region, per real map holding the class]


def _target_weights(label_maps, goals, donors, placement, region, config) -> _Targets:
    """The target maps (module docstring: weighted by the free fraction of the map's region, among maps with room
    for a paste of a class that has donors; lesion-free maps ``lesion_free_target_weight`` times more)."""
    indices, weights, lesion_free = [], [], set()
    real_loads = {c: [] for c in goals.real}
    num_lesion_free = 0
    for index, label_map in enumerate(label_maps):
        label_map = np.asarray(label_map)
        region_pixels = region.pixels(label_map, index)
        class_pixels = {c: int((label_map == c).sum()) for c in goals.real}
        for c, pixels in class_pixels.items():
            if pixels and region_pixels:
                real_loads[c].append(pixels / region_pixels)
        free_of_lesion = not any(class_pixels.values())
        num_lesion_free += free_of_lesion
        if config.targets_need_host and not any(placement.mask(label_map, c, index).sum() >= config.min_pasted_pixels
                                                for c in donors):
            continue
        if region_pixels == 0:
            continue
        weight = max(region_pixels - sum(class_pixels.values()), 0) / region_pixels + 1e-3
        if free_of_lesion:
            lesion_free.add(index)
            weight *= config.lesion_free_target_weight
        indices.append(index)
        weights.append(weight)
    weights = np.asarray(weights)
    return _Targets(indices, weights / weights.sum() if len(weights) else weights, lesion_free, num_lesion_free,
                    real_loads)


def load_quantiles(loads) -> dict:
    """Mean and p10 / p50 / p90 of per-map loads (shares of the map's region); None for no map."""
    if not len(loads):
        return None
    loads = np.asarray(loads, dtype=float)
    p10, p50, p90 = np.percentile(loads, [10, 50, 90])
    return {"maps": int(loads.size), "mean": float(loads.mean()), "p10": float(p10), "p50": float(p50),
            "p90": float(p90)}


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
    if 0 in pathology_classes or 0 in host_classes:
        raise NnsynthError("mask generation: background (0) cannot be a host or pathology class")
    if not pathology_classes:
        raise NnsynthError("mask generation: no pathology class to balance")
    for c in list(host_classes) + list(pathology_classes):
        if not 0 <= c < num_classes:
            raise NnsynthError(f"mask generation: class {c} is outside 0..{num_classes - 1}")


@dataclass
class _LoopEnd:
    """Where the balancing loop ended: the counts before and after, what it made and threw away, and why it
    stopped."""

    real: _Running
    running: _Running
    num_real_maps: int
    num_new_maps: int
    max_new_maps: int
    seed: int | None                    # None when the run cannot be replayed from it
    stopped_because: str
    rejected: int
    discarded: int


def _report(end: _LoopEnd, goals, region: BalanceRegion, placement, config) -> dict:
    host_classes, pathology_classes = region.host_classes, region.pathology_classes
    real, running = end.real, end.running
    region_classes = sorted(host_classes + pathology_classes)
    before, after = real.shares(), running.shares()
    rarest = min(pathology_classes, key=lambda c: (before[c], c))
    classes = []
    for c in region_classes:
        goal = goals.goal.get(c)
        classes.append({"class": c, "role": "host" if c in host_classes else "pathology", "target_share": goal,
                        "goal_rule": goals.rule.get(c), "share_before": float(before[c]),
                        "share_after": float(after[c]),
                        "factor": float(after[c] / before[c]) if before[c] > 0 else None,
                        "reached": None if goal is None else bool(after[c] >= goal)})
    return {
        "share_definition": SHARE_DEFINITION,
        "region": region.description,
        "num_real_maps": end.num_real_maps,
        "num_new_maps": end.num_new_maps,
        "max_new_maps": int(end.max_new_maps),
        "seed": end.seed,
        "host_classes": [int(c) for c in host_classes],
        "pathology_classes": [int(c) for c in pathology_classes],
        "region_classes": region_classes,
        "region_pixels_before": int(real.region_pixels),
        "region_pixels_after": int(running.region_pixels),
        "target_weighting": TARGET_WEIGHTING,
        "rarest_class": int(rarest),
        "rarest_share_factor": float(after[rarest] / before[rarest]) if before[rarest] > 0 else None,
        "placement": ("host tissue" if host_classes else
                      {str(c): placement.prior_case_ids[c] for c in pathology_classes}),
        "shares_before": {str(c): float(before[c]) for c in region_classes},
        "shares_after": {str(c): float(after[c]) for c in region_classes},
        "pixel_counts_before": [int(n) for n in real.counts],
        "pixel_counts_after": [int(n) for n in running.counts],
        "classes": classes,
        "target_reached": not goals.open(after),
        "stopped_because": end.stopped_because,
        "rejected_pastes": int(end.rejected),
        "discarded_maps": int(end.discarded),
        "config": asdict(config),
    }


def check_goals_raised(report: dict, source) -> None:
    """Raise a one-line error for a pathology class below its goal that could not be pasted at all: every attempt
    to paste it was rejected (no room where it may go, or no donor that fits), over a whole map's attempts or until
    the loop gave up. A class that a small budget (``-n``) raised little, or not at all because other classes came
    first, is not an error: the budget is honoured (``unraised_classes`` names them)."""
    attempts_per_map = report["config"]["max_attempts_per_map"]
    for entry in report["classes"]:
        if entry["role"] != "pathology" or entry["target_share"] is None or \
                not entry["target_share"] > entry["share_before"]:
            continue
        tally = report.get("pastes_per_class", {}).get(str(entry["class"]), {"attempts": 0, "accepted": 0})
        if tally["accepted"] == 0 and tally["attempts"] > 0 and (
                tally["attempts"] >= attempts_per_map or report["stopped_because"] == "no_placement"):
            raise NnsynthError(f"{source}: balancing could not paste pathology class {entry['class']} at all "
                               f"({tally['attempts']} attempts rejected: no room where it may go in "
                               f"{report['region']}, or no donor that fits; stopped: {report['stopped_because']}): "
                               f"name the classes with --host-classes / --pathology-classes, or lower "
                               f"--min-donor-area")


def unraised_classes(report: dict) -> list:
    """Pathology classes below their goal whose share did not rise (the budget ran out first), as report entries."""
    return [entry for entry in report["classes"] if entry["role"] == "pathology" and entry["target_share"] is not None
            and entry["target_share"] > entry["share_before"] and not entry["share_after"] > entry["share_before"]]


def generate_label_maps(label_maps, map_ids, host_classes=None, pathology_classes=None, target_share=None,
                        max_new_maps=500, seed=0, num_classes=None, config=None, body_masks=None,
                        stop_at_target=True, new_maps=None, ignore_label=None):
    """New label maps that raise every rare pathology class's share of the region (see the module docstring).

    label_maps: real integer maps, 2D slices or 3D volumes (a list, or a sequence read on demand such as
    ``NativeSlices.label_maps``: the loop takes one map at a time); map_ids: their (case_id, slice_index or None),
    same order.
    host_classes / pathology_classes: label values (default: ``default_class_roles``; ``[]`` = no host class).
    target_share: None (the default goals), one share of the region for all pathology classes, or {class: share}.
    body_masks: optional boolean body mask per real map; without a host class pastes stay inside it and it is
    the region.
    stop_at_target: stop once every goal is reached; otherwise make ``max_new_maps`` maps, each pasted until the
    running shares are back at the goals.
    new_maps: where the new maps go (``append``; e.g. ``NewLabelMapsOnDisk``); default a list.
    ignore_label: nnU-Net's ignore label (never part of the region, never pasted over).
    Return (list of ``NewLabelMap``, report dict with the region shares before and after and why the loop stopped).
    """
    config = config or MaskGenerationConfig()
    config.validate()
    if len(label_maps) == 0:
        raise NnsynthError("mask generation: no real label maps given")
    if num_classes is None:
        num_classes = int(max(int(np.max(m)) for m in label_maps)) + 1
    real_counts = pixel_counts(label_maps, num_classes)
    if host_classes is None or pathology_classes is None:
        role_counts = real_counts.copy()
        if ignore_label is not None:
            role_counts[ignore_label] = 0
        host_classes, pathology_classes = complete_class_roles(role_counts, host_classes, pathology_classes)
    host_classes, pathology_classes = [int(c) for c in host_classes], sorted(int(c) for c in pathology_classes)
    _check_inputs(label_maps, map_ids, host_classes, pathology_classes, num_classes, max_new_maps)
    region = BalanceRegion(host_classes, pathology_classes, body_masks, ignore_label)
    real = _Running(real_counts, sum(region.pixels(m, i) for i, m in enumerate(label_maps)))
    goals = resolve_goals(target_share, pathology_classes, real.shares(), config)
    donors = _collect_donors(label_maps, goals, config.min_donor_area)
    placement = Placement(label_maps, map_ids, host_classes, pathology_classes, config, body_masks)
    targets = _target_weights(label_maps, goals, donors, placement, region, config)
    target_indices, target_probabilities = targets.indices, targets.probabilities
    if not target_indices:
        raise NnsynthError(f"mask generation: no real map has {config.min_pasted_pixels} pixels where classes "
                           f"{list(donors)} may be pasted (host classes {host_classes})")
    for c in [c for c in goals.goal if c not in donors]:                # a kept class without donors is left as is
        goals.rule[c] = f"no connected region of at least {config.min_donor_area} pixels to copy: kept as is"
        del goals.goal[c]

    rng = np.random.default_rng(seed)
    seed = int(seed) if isinstance(seed, (int, np.integer)) else None   # recorded only when it replays the run
    running = _Running(real.counts.copy(), real.region_pixels)
    new_maps = [] if new_maps is None else new_maps
    rejected = discarded = discarded_in_row = 0
    stopped_because = "target_reached" if stop_at_target else "budget"
    tally, new_loads = {}, {c: [] for c in pathology_classes}
    on_lesion_free = 0

    while not stop_at_target or goals.open(running.shares()):
        if len(new_maps) >= max_new_maps:
            stopped_because = "budget"
            break
        if discarded_in_row >= config.max_discarded_maps:
            stopped_because = "no_placement"
            break
        target_index = target_indices[rng.choice(len(target_indices), p=target_probabilities)]
        new_map, map_region, map_rejected = _make_new_map(label_maps, map_ids, target_index, running, goals, donors,
                                                          placement, region, config, rng, tally, targets.real_loads)
        rejected += map_rejected
        if new_map is None:
            discarded += 1
            discarded_in_row += 1
            continue
        discarded_in_row = 0
        new_map.provenance["index"] = len(new_maps)
        new_map.provenance["seed"] = seed
        map_counts = np.bincount(new_map.label_map.ravel(), minlength=num_classes)[:num_classes]
        running.counts += map_counts
        running.region_pixels += map_region
        on_lesion_free += target_index in targets.lesion_free
        for c in pathology_classes:
            if map_counts[c] and map_region:
                new_loads[c].append(map_counts[c] / map_region)
        new_maps.append(new_map)
    end = _LoopEnd(real, running, len(label_maps), len(new_maps), max_new_maps, seed, stopped_because, rejected,
                   discarded)
    report = _report(end, goals, region, placement, config)
    report.update({
        "num_lesion_free_real_maps": int(targets.num_lesion_free_maps),
        "num_new_maps_on_lesion_free_targets": int(on_lesion_free),
        "pastes_per_class": {str(c): {"attempts": tally.get(c, [0, 0])[0], "accepted": tally.get(c, [0, 0])[1]}
                             for c in pathology_classes},
        "not_balanced": [{"class": int(c), "reason": goals.rule[c]} for c in pathology_classes
                         if c not in goals.goal],
        "per_map_load": {str(c): {"real": load_quantiles(targets.real_loads.get(c, [])),
                                  "new": load_quantiles(new_loads[c])} for c in pathology_classes},
    })
    return new_maps, report
