"""Online lesion copy-paste inside nnU-Net's data loading (TumorCP; Hu et al. found synthesis on the fly better
than the same synthesis written to disk once).

With probability ``nnsynth_paste_probability`` per training sample, 1..``nnsynth_paste_components`` connected
components of a pathology class, taken from *other* training cases of the fold, are pasted into the sample's
host tissue (normal lung), or, without a host class, onto background inside the body. Each component is moved as
the disk copy-paste moves it (``MaskGenerationConfig``: rotation, dilation, then its centre moved onto a random
pixel where it may land) and its pixels are blended over a feathered edge (``masks.pixel_paste.feather_weights``).

Where: ``LesionPasteTransform`` is the first of nnU-Net's training transforms, so it runs in the data
augmentation workers on the cropped patch (before the spatial augmentation) of the preprocessed data: images
normalised as nnU-Net normalises them, labels with nnU-Net's values. The ignore label and padding (-1) are never
pasted over, and only pixels of the pasted class are copied. Donors come from the fold's real training cases only,
so validation cases never reach training; they are extracted once per fold (``extract_donors``) as compact crops
(image channels + mask), at most ``max_components_per_class`` per class, and every worker gets a copy.

2d configurations take 2D components of single slices (``masks.find_regions`` and the transforms of
``masks.regions``, the image moved with ``masks.pixel_paste.rotate_patch``); 3d configurations take 3D components of
the volume (``scipy.ndimage.label``), rotated in the axial plane, with the same n-dimensional placement below.

Counts (samples, pastes, pixels added per class) are kept per process; each worker writes its own counts file
into ``<fold folder>/lesion_paste_counts/`` every ``COUNTS_EVERY`` samples, and the trainer sums them into
``synthmix.json`` at the end of every epoch: a worker's last < ``COUNTS_EVERY`` samples may be missing.
"""
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from batchgeneratorsv2.transforms.base.basic_transform import BasicTransform
from scipy import ndimage

from nnunet_synth.atomic import write_json_atomic
from nnunet_synth.errors import NnsynthError, warn_once
from nnunet_synth.masks import (
    MaskGenerationConfig,
    Region,
    body_mask,
    dilate_region,
    find_regions,
    host_mask,
    paste_region,
    resolve_class_roles,
    rotate_region,
    shift_region,
)
from nnunet_synth.masks.pixel_paste import (
    FEATHER_PIXELS,
    DonorPatch,
    donor_patch,
    feather_weights,
    place_patch,
    rotate_patch,
)

COUNTS_EVERY = 10
PLACEMENT_ATTEMPTS = 5      # draws of donor and place per component before it is given up


@dataclass(frozen=True)
class Donor:
    """One connected component of one pathology class in a real training case."""

    case_id: str
    pathology_class: int
    region: Region          # the component's mask cropped to its box; origin = its box start in the donor frame
    patch: DonorPatch       # the donor's image channels around the box (float32), in the same frame

    @property
    def nbytes(self) -> int:
        return int(self.region.mask.nbytes + self.patch.image.nbytes)


@dataclass(frozen=True)
class DonorBank:
    """The donors of one fold, by class, with the class roles they were chosen for."""

    by_class: dict           # class value -> list of Donor
    host_classes: tuple      # where pathology may be pasted; () = background inside the body
    paste_classes: tuple     # classes drawn for a paste (uniformly)
    pixel_counts: dict       # class value -> pixels over the fold's training cases

    @property
    def nbytes(self) -> int:
        return sum(donor.nbytes for donors in self.by_class.values() for donor in donors)

    def summary(self) -> dict:
        return {"host_classes": list(self.host_classes), "paste_classes": list(self.paste_classes),
                "donors_per_class": {str(c): len(d) for c, d in self.by_class.items()},
                "donor_cases": sorted({donor.case_id for donors in self.by_class.values() for donor in donors}),
                "donor_bytes": self.nbytes, "pixel_counts": {str(c): n for c, n in self.pixel_counts.items()}}


def _label_values(dataset_json: dict) -> dict:
    """name -> integer label, without the ignore label (region labels are nnU-Net's integer values too)."""
    return {name: int(value) for name, value in dataset_json["labels"].items()
            if name != "ignore" and isinstance(value, int)}


def check_paste_class_names(names, dataset_json: dict):
    """Refuse label names of ``nnsynth_paste_classes`` that dataset.json does not declare."""
    if names in (("rarest",), ("pathology",)):
        return
    labels = _label_values(dataset_json)
    unknown = [name for name in names if name not in labels or labels[name] == 0]
    if unknown:
        raise NnsynthError(f"nnsynth_paste_classes={','.join(names)}: {', '.join(unknown)} not a foreground label of "
                           f"dataset.json: give 'rarest', 'pathology' or names of {[n for n in labels if labels[n]]}")


def _components(label_map: np.ndarray, pathology_class: int, min_area: int):
    """Regions of ``pathology_class`` in a 2D map (``masks.find_regions``) or a 3D volume (scipy.ndimage.label)."""
    if label_map.ndim == 2:
        return [donor.region for donor in find_regions(label_map, pathology_class, min_area=min_area)]
    components, _ = ndimage.label(label_map == pathology_class)
    regions = []
    for index, box in enumerate(ndimage.find_objects(components), start=1):
        if box is not None and (components[box] == index).sum() >= min_area:
            regions.append(Region(components[box] == index, tuple(s.start for s in box)))
    return regions


def _patch_around(image: np.ndarray, region: Region, margin: int) -> DonorPatch:
    """The image channels around the region's box, ``margin`` pixels wider on every side (edge-padded)."""
    if image.ndim == 3:
        row, col = region.origin
        bbox = [row, col, row + region.mask.shape[0], col + region.mask.shape[1]]
        patch = donor_patch(image, bbox, margin)
        return DonorPatch(patch.image.astype(np.float32), patch.origin)
    padded = np.pad(image, [(0, 0)] + [(margin, margin)] * (image.ndim - 1), mode="edge")
    box = tuple(slice(start, start + size + 2 * margin) for start, size in zip(region.origin, region.mask.shape))
    return DonorPatch(padded[(slice(None), *box)].astype(np.float32), tuple(s - margin for s in region.origin))


def extract_donors(dataset, case_ids, dataset_json: dict, paste_classes, two_d: bool,
                   config: MaskGenerationConfig = None, max_components_per_class: int = 1000,
                   feather: float = FEATHER_PIXELS, seed: int = 0) -> DonorBank:
    """The donor components of ``case_ids`` (the fold's training cases) of ``dataset`` (an nnU-Net dataset of
    preprocessed cases). ``two_d``: components of single slices, else of the volume. At most
    ``max_components_per_class`` per class, spread over the cases (a seeded choice within each case)."""
    config = config or MaskGenerationConfig()
    rng = np.random.default_rng(seed)
    ignore = dataset_json["labels"].get("ignore")
    labels = _label_values(dataset_json)
    num_classes = max(labels.values()) + 1
    counts = np.zeros(num_classes, dtype=np.int64)
    classes_in_case = {}      # two passes over the cases, one case in memory at a time
    for case_id in case_ids:
        values, numbers = np.unique(np.asarray(dataset.load_case(case_id)[1][0]), return_counts=True)
        for value, number in zip(values.tolist(), numbers.tolist()):
            if 0 <= value < num_classes and value != ignore:
                counts[value] += number
        classes_in_case[case_id] = set(values.tolist())
    named = None if paste_classes in (("rarest",), ("pathology",)) else list(paste_classes)
    # a class absent from the fold's training cases stays a pathology class, without donors
    host, pathology = resolve_class_roles(labels, counts, pathology_names=named, source="nnsynth_paste_classes",
                                          declared=[value for value in labels.values() if value != 0])
    names = {value: name for name, value in labels.items()}
    for c in pathology:
        if counts[c] == 0:
            warn_once(("absent class", c), f"class {names.get(c, c)} occurs in none of the fold's training cases: it "
                      f"has no donor and is not pasted in this fold; the other classes are")
    if paste_classes == ("rarest",):
        present = [c for c in pathology if counts[c] > 0]
        if not present:
            raise NnsynthError("nnsynth_paste_classes=rarest: the fold's training cases hold no pathology class: "
                               "name the classes to paste")
        pathology = [min(present, key=lambda c: (counts[c], c))]
    margin = config.max_dilation_iterations + int(np.ceil(feather)) + 2
    per_case = max(1, int(np.ceil(max_components_per_class / max(1, len(case_ids)))))
    by_class = {c: [] for c in pathology}
    for case_id in case_ids:
        data = seg = None
        for pathology_class in pathology:
            if pathology_class not in classes_in_case[case_id]:
                continue
            if data is None:
                data, seg = (np.asarray(array) for array in dataset.load_case(case_id)[:2])
                seg = seg[0]
            found = []
            if two_d:
                for z in np.nonzero((seg == pathology_class).any(axis=tuple(range(1, seg.ndim))))[0]:
                    found += [(z, region) for region in _components(seg[z], pathology_class, config.min_donor_area)]
            else:
                found = [(None, region) for region in _components(seg, pathology_class, config.min_donor_area)]
            for index in sorted(rng.permutation(len(found))[:per_case]):
                z, region = found[index]
                image = data[:, z] if two_d else data
                by_class[pathology_class].append(Donor(case_id, pathology_class, region,
                                                       _patch_around(image, region, margin)))
    by_class = {c: donors[:max_components_per_class] for c, donors in by_class.items()}
    if not any(by_class.values()):
        raise NnsynthError(f"nnsynth_paste_classes={','.join(paste_classes)}: the fold's training cases have no "
                           f"component of class {pathology} with at least {config.min_donor_area} pixels: name "
                           f"other classes or set nnsynth_paste_probability=0")
    for c in pathology:
        if counts[c] > 0 and not by_class[c]:
            warn_once(("no donors", c), f"class {names.get(c, c)} has no component of at least "
                      f"{config.min_donor_area} pixels in the fold's training cases: it is not pasted in this fold; "
                      f"the other classes are")
    return DonorBank({c: d for c, d in by_class.items() if d}, tuple(host),
                     tuple(c for c in pathology if by_class[c]), {c: int(n) for c, n in enumerate(counts)})


# ------------------------------------------------------------------ n-dimensional moves (3d configurations)
def _rotate_nd(region: Region, patch: DonorPatch, angle_deg: float):
    """Rotate mask and image about the region's box centre in the last two axes (the axial plane of a volume)."""
    centre = np.asarray(region.origin) + (np.asarray(region.mask.shape) - 1) / 2
    mask = ndimage.rotate(region.mask.astype(np.uint8), angle_deg, axes=(-2, -1), reshape=True, order=0) > 0
    image = ndimage.rotate(patch.image, angle_deg, axes=(-2, -1), reshape=True, order=1, mode="nearest")

    def origin(shape):
        return tuple(int(v) for v in np.round(centre - (np.asarray(shape) - 1) / 2))
    return Region(mask, origin(mask.shape)), DonorPatch(image, origin(image.shape[1:]))


def _dilate_nd(region: Region, iterations: int) -> Region:
    grown = ndimage.binary_dilation(np.pad(region.mask, iterations), iterations=iterations)
    return Region(grown, tuple(o - iterations for o in region.origin))


def _crop_boxes(origin, size, shape):
    """(target box, source box) of an array of ``size`` at ``origin`` clipped to ``shape``; None if outside."""
    start = [max(o, 0) for o in origin]
    stop = [min(o + s, n) for o, s, n in zip(origin, size, shape)]
    if any(a >= b for a, b in zip(start, stop)):
        return None
    return (tuple(slice(a, b) for a, b in zip(start, stop)),
            tuple(slice(a - o, b - o) for a, b, o in zip(start, stop, origin)))


def _footprint_nd(region: Region, shape) -> np.ndarray:
    footprint = np.zeros(shape, dtype=bool)
    boxes = _crop_boxes(region.origin, region.mask.shape, shape)
    if boxes is not None:
        footprint[boxes[0]] = region.mask[boxes[1]]
    return footprint


def _place_nd(patch: DonorPatch, shape):
    canvas, valid = np.zeros((len(patch.image), *shape), dtype=np.float32), np.zeros(shape, dtype=bool)
    boxes = _crop_boxes(patch.origin, patch.image.shape[1:], shape)
    if boxes is not None:
        canvas[(slice(None), *boxes[0])] = patch.image[(slice(None), *boxes[1])]
        valid[boxes[0]] = True
    return canvas, valid


# ------------------------------------------------------------------ one paste
def _moved(donor: Donor, config: MaskGenerationConfig, rng: np.random.Generator):
    """The donor's region and image after a random rotation and dilation (MaskGenerationConfig's probabilities)."""
    region, patch = donor.region, donor.patch
    two_d = region.mask.ndim == 2
    if rng.uniform() < config.p_rotate:
        angle = float(rng.uniform(-config.max_angle_deg, config.max_angle_deg))
        if two_d:
            centre = np.asarray(region.origin) + (np.asarray(region.mask.shape) - 1) / 2
            region, patch = rotate_region(region, angle), rotate_patch(patch, angle, centre)
        else:
            region, patch = _rotate_nd(region, patch, angle)
    if rng.uniform() < config.p_dilate:
        iterations = int(rng.integers(1, config.max_dilation_iterations + 1))
        region = dilate_region(region, iterations) if two_d else _dilate_nd(region, iterations)
    return region, patch


def _shifted(region: Region, patch: DonorPatch, offset):
    if region.mask.ndim == 2:
        return shift_region(region, offset), DonorPatch(patch.image, (patch.origin[0] + offset[0],
                                                                      patch.origin[1] + offset[1]))
    return (Region(region.mask, tuple(int(o + d) for o, d in zip(region.origin, offset))),
            DonorPatch(patch.image, tuple(int(o + d) for o, d in zip(patch.origin, offset))))


def body_of(image: np.ndarray) -> np.ndarray:
    """The body in a sample (C, *spatial): 2D ``masks.body_mask`` of the first channel; 3D the voxels above the
    first channel's minimum, i.e. inside the region nnU-Net cropped to the non-zero image."""
    return body_mask(image[0]) if image.ndim == 3 else image[0] > image[0].min()


def where_paste_may_land(label_map: np.ndarray, host_classes, body=None) -> np.ndarray:
    """Host tissue; without a host class, background inside ``body``."""
    if host_classes:
        return host_mask(label_map, host_classes)
    return (label_map == 0) & body


def paste_lesions(image: np.ndarray, label_map: np.ndarray, bank: DonorBank, num_components: int,
                  rng: np.random.Generator, config: MaskGenerationConfig = None, exclude_case: str = None,
                  feather: float = FEATHER_PIXELS):
    """(image, label map, pastes): up to ``num_components`` donor components pasted into one sample
    (``image`` (C, *spatial) float, ``label_map`` (*spatial) int). ``label_map`` pixels change only where they
    were host tissue (or background inside the body); donors of ``exclude_case`` (the sample's own case) are not
    drawn. ``pastes``: one {"case_id", "class", "pixels"} per pasted component (its donor case)."""
    config = config or MaskGenerationConfig()
    image, label_map = image.copy(), label_map.copy()
    pastes = []
    body = None if bank.host_classes else body_of(image)
    for _ in range(num_components):
        pathology_class = bank.paste_classes[rng.integers(len(bank.paste_classes))]
        donors = [d for d in bank.by_class[pathology_class] if d.case_id != exclude_case]
        allowed = where_paste_may_land(label_map, bank.host_classes, body)
        if not donors or not allowed.any():
            continue
        anchors = np.argwhere(allowed)
        for _attempt in range(PLACEMENT_ATTEMPTS):
            donor = donors[rng.integers(len(donors))]
            region, patch = _moved(donor, config, rng)
            anchor = anchors[rng.integers(len(anchors))]
            offset = np.round(anchor - region.centroid).astype(int) if region.mask.ndim == 2 else np.round(
                anchor - (np.asarray(ndimage.center_of_mass(region.mask)) + np.asarray(region.origin))).astype(int)
            region, patch = _shifted(region, patch, offset)
            if label_map.ndim == 2:
                new_map, count = paste_region(label_map, region, pathology_class, bank.host_classes, allowed)
                canvas, valid = place_patch(patch, label_map.shape)
                pasted = new_map != label_map
            else:
                pasted = _footprint_nd(region, label_map.shape) & allowed
                count = int(pasted.sum())
                canvas, valid = _place_nd(patch, label_map.shape)
            if count < config.min_pasted_pixels or count < config.min_pasted_fraction * region.area:
                continue
            weights = (feather_weights(pasted, allowed, feather) * valid).astype(image.dtype)
            image = weights * canvas.astype(image.dtype) + (1 - weights) * image
            label_map[pasted] = pathology_class
            pastes.append({"case_id": donor.case_id, "class": int(pathology_class), "pixels": count})
            break
    return image, label_map, pastes


class LesionPasteTransform(BasicTransform):
    """nnU-Net training transform: with probability ``probability`` paste 1..``max_components`` donor components
    into the sample. ``dataset`` is the loader's dataset (its ``last_loaded_case`` is the case being transformed,
    so a sample never receives its own case's components); ``counts_folder`` receives this process's counts."""

    def __init__(self, bank: DonorBank, probability: float, max_components: int, counts_folder, dataset=None,
                 config: MaskGenerationConfig = None):
        super().__init__()
        self.bank, self.probability, self.max_components = bank, probability, max_components
        self.counts_folder, self.dataset = str(counts_folder), dataset
        self.config = config or MaskGenerationConfig()
        self.rng = None          # seeded per process on first use (workers must not share a stream)
        self.counts = {"samples": 0, "samples_pasted": 0, "components": 0, "pixels_added": {}}

    def __repr__(self):
        return (f"LesionPasteTransform(probability={self.probability}, max_components={self.max_components}, "
                f"donors={ {c: len(d) for c, d in self.bank.by_class.items()} })")

    def apply(self, data_dict, **params):
        import torch
        if self.rng is None:
            self.rng = np.random.default_rng([os.getpid(), int(np.random.randint(2 ** 31))])
        self.counts["samples"] += 1
        if self.rng.uniform() < self.probability:
            image = data_dict["image"].numpy()
            segmentation = data_dict["segmentation"]
            case = getattr(self.dataset, "last_loaded_case", None)
            synthetic = case is not None and getattr(self.dataset, "is_synthetic", lambda _: False)(case)
            if not synthetic:      # real samples only: a synthetic case keeps its own label map
                image, label_map, pastes = paste_lesions(
                    image, segmentation[0].numpy(), self.bank, int(self.rng.integers(1, self.max_components + 1)),
                    self.rng, self.config, exclude_case=case)
                if pastes:
                    data_dict["image"] = torch.from_numpy(np.ascontiguousarray(image))
                    data_dict["segmentation"] = torch.from_numpy(
                        label_map[None].astype(np.int16)).to(segmentation.dtype)
                    self.counts["samples_pasted"] += 1
                    self.counts["components"] += len(pastes)
                    for paste in pastes:
                        added = self.counts["pixels_added"]
                        added[str(paste["class"])] = added.get(str(paste["class"]), 0) + paste["pixels"]
        if self.counts["samples"] % COUNTS_EVERY == 0:
            self.write_counts()
        return data_dict

    def write_counts(self):
        folder = Path(self.counts_folder)
        folder.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.counts, folder / f"process_{os.getpid()}.json")


def gather_counts(counts_folder) -> dict:
    """The sum of every process's counts file (see the module docstring for what may be missing)."""
    total = {"samples": 0, "samples_pasted": 0, "components": 0, "pixels_added": {}, "processes": 0}
    for path in sorted(Path(counts_folder).glob("process_*.json")):
        try:
            counts = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        total["processes"] += 1
        for key in ("samples", "samples_pasted", "components"):
            total[key] += counts[key]
        for c, n in counts["pixels_added"].items():
            total["pixels_added"][c] = total["pixels_added"].get(c, 0) + n
    return total
