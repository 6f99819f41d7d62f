"""Edit gate: does each edited lesion of an inpainted or pasted case look like the real lesions of its class?

The slice gate (``model_free``) scores whole slices, so an edit of a few per cent of the pixels hardly moves it.
This gate looks only where the image changed. Every connected component of a pathology class that touches the
edit (3D components for volumes) is described, per channel, by

- ``p10``, ``p50``, ``p90``: its intensity percentiles; ``contrast``: its median minus the median of a thin ring
  around it (the real tissue next to the lesion);
- texture against the tissue outside the ring (logarithmic ratios, so they compare across cases of different
  contrast): ``spread`` (standard deviation), ``laplacian`` and ``ring_laplacian`` (mean absolute Laplacian
  inside and in the ring: noise raises it, blur and flat fills lower it), ``roughness`` (Laplacian over standard
  deviation inside) and ``laplacian_tail`` (share of lesion and ring pixels whose Laplacian exceeds the outside
  tissue's 95th percentile: salt-and-pepper);
- the step across the edit's border: ``seam`` (ring median minus the median of the band outside it) and
  ``border_step`` (median of the one-pixel layer inside the border minus that of the layer outside), both over
  the outside tissue's standard deviation.

Fitted on the real lesion components of the fold's training cases, per class and channel: per feature the median,
the scaled MAD and a limit, the ``calibration_percentile`` of the real components' own |z|. A component's
distance is the largest |z| / limit over the features (one feature far out is enough: a seam or a flat fill
moves one or two features a long way, which an average over eleven would dilute); it passes at distance <=
``margin``. ``score`` = 1 / (1 + distance / margin) (0.5 at the threshold, as the slice gate's); a case's score is
its worst component's and channel's, and it passes when every component passes in every channel.
"""
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from nnunet_synth.dataset.native_slices import evenly_spread

FEATURES = ("p10", "p50", "p90", "contrast", "spread", "laplacian", "ring_laplacian", "roughness",
            "laplacian_tail", "seam",
            "border_step")
RING = 2                    # pixels (voxels) of the ring around a lesion, and of the band outside the ring
MIN_COMPONENT_PIXELS = 8    # smaller lesion components are too few pixels for percentiles
CALIBRATION_PERCENTILE = 99.0
MARGIN = 1.0
MIN_COMPONENTS = 50         # fewer real components of a class: too few to set its limits, not scored
MAX_COMPONENTS = 3000       # real components a gate is fitted on, per class (evenly spread)
MAX_CASES = 2000            # real slices or volumes read for the fit (evenly spread)


def _rings(component: np.ndarray):
    """(ring, outside band, border) of a boolean component: the ring of width RING around it, the band of width
    RING outside the ring, and the border between them (the edge of the edit) as its two one-pixel layers
    (inside, outside)."""
    inner = ndimage.binary_dilation(component, iterations=RING)
    outer = ndimage.binary_dilation(inner, iterations=RING)
    return inner & ~component, outer & ~inner, (inner & ~ndimage.binary_erosion(inner),
                                                ndimage.binary_dilation(inner) & ~inner)


def _log(x) -> float:
    return float(np.log(x + 1e-6))


def component_features(image: np.ndarray, component_box: tuple, component: np.ndarray, laplacian: np.ndarray) -> dict:
    """The features of one lesion component (a boolean mask inside the crop ``component_box`` of ``image``).
    Texture is measured against the real tissue outside the ring (scale-free logarithmic ratios), so that it
    compares across cases of different contrast."""
    crop = image[component_box]
    ring, outside, border = _rings(component)
    if ring.sum() < 2 or outside.sum() < 2:
        return None
    inside_values, ring_values, outside_values = crop[component], crop[ring], crop[outside]
    p10, p50, p90 = np.percentile(inside_values, (10, 50, 90))
    ring_median, outside_median = float(np.median(ring_values)), float(np.median(outside_values))
    lap = laplacian[component_box]
    outside_lap, outside_std = _log(lap[outside].mean()), _log(outside_values.std())
    return {"p10": float(p10), "p50": float(p50), "p90": float(p90), "contrast": float(p50) - ring_median,
            "spread": _log(inside_values.std()) - outside_std,
            "laplacian": _log(lap[component].mean()) - outside_lap,
            "ring_laplacian": _log(lap[ring].mean()) - outside_lap,
            "roughness": _log(lap[component].mean()) - _log(inside_values.std()),
            "laplacian_tail": float(np.log(np.mean(lap[component | ring] > np.percentile(lap[outside], 95)) + 0.01)),
            "seam": (ring_median - outside_median) / (outside_values.std() + 1e-6),
            "border_step": float(np.median(crop[border[0]]) - np.median(crop[border[1]]))
            / (outside_values.std() + 1e-6)}


def lesion_components(label_map: np.ndarray, classes, edited: np.ndarray = None):
    """[(class, crop box, component mask in the box)] of every connected component of ``classes`` with at least
    MIN_COMPONENT_PIXELS pixels (3D components for a volume); with ``edited``, only those that touch it. The box
    is padded by 2 * RING + 1 so the ring and outside band fit (clipped at the image edge)."""
    found = []
    pad = 2 * RING + 1
    for value in classes:
        parts, count = ndimage.label(label_map == value)
        for index, box in enumerate(ndimage.find_objects(parts), start=1):
            if box is None:
                continue
            padded = tuple(slice(max(0, s.start - pad), min(n, s.stop + pad)) for s, n in zip(box, label_map.shape))
            component = parts[padded] == index
            if component.sum() < MIN_COMPONENT_PIXELS:
                continue
            if edited is not None and not edited[padded][component].any():
                continue
            found.append((int(value), padded, component))
    return found




def case_features(image: np.ndarray, label_map: np.ndarray, classes, edited: np.ndarray = None) -> list:
    """Per channel of ``image`` ((C, ...) beside ``label_map``): [(class, features)] of its lesion components."""
    components = lesion_components(np.asarray(label_map), classes, edited)
    per_channel = []
    for channel_image in np.asarray(image, dtype=np.float32):
        if not components:
            per_channel.append([])
            continue
        laplacian = np.abs(ndimage.laplace(channel_image))
        features = [(value, component_features(channel_image, box, component, laplacian))
                    for value, box, component in components]
        per_channel.append([(value, f) for value, f in features if f is not None])
    return per_channel


@dataclass
class EditGate:
    """Per channel and class, per feature: the real lesion components' median, scale and limit (the
    ``calibration_percentile`` of their own |z|); the distance threshold (``margin``)."""

    reference: list       # per channel: {class: {"median": [..], "scale": [..], "limit": [..]}}
    threshold: float

    def distance(self, channel: int, value: int, features: dict) -> float:
        """The largest |z| / limit over the features: above 1, a feature lies further out than all but
        (100 - calibration_percentile) % of the real lesions."""
        if value not in self.reference[channel]:
            return float("inf")
        reference = self.reference[channel][value]
        z = (np.array([features[name] for name in FEATURES]) - reference["median"]) / reference["scale"]
        return float(np.max(np.abs(z) / reference["limit"]))

    def to_dict(self) -> dict:
        return {"features": list(FEATURES), "ring": RING, "threshold": float(self.threshold),
                "reference": [{str(value): {key: np.asarray(array).tolist() for key, array in stats.items()}
                               for value, stats in channel.items()} for channel in self.reference]}

    @classmethod
    def from_dict(cls, data: dict) -> "EditGate":
        reference = [{int(value): {key: np.asarray(array, dtype=np.float64) for key, array in stats.items()}
                      for value, stats in channel.items()} for channel in data["reference"]]
        return cls(reference, float(data["threshold"]))


def _class_reference(found: list, calibration_percentile: float) -> dict:
    """Per feature of the feature dicts ``found``: median, scaled MAD (floored) and limit."""
    xs = np.array([[f[name] for name in FEATURES] for f in found])
    median = np.median(xs, axis=0)
    scale = np.maximum(1.4826 * np.median(np.abs(xs - median), axis=0), np.maximum(0.05 * xs.std(axis=0), 1e-6))
    limit = np.maximum(np.percentile(np.abs(xs - median) / scale, calibration_percentile, axis=0), 1.0)
    return {"median": median, "scale": scale, "limit": limit}


def fit_edit_gate(images, label_maps, classes, calibration_percentile=CALIBRATION_PERCENTILE, margin=MARGIN,
                  max_cases: int = MAX_CASES) -> EditGate:
    """Fit on real pairs (``images[i]`` (C, ...) beside ``label_maps[i]``: slices or volumes, lists or on-disk
    sequences): the lesion components of ``classes``. A class with fewer than MIN_COMPONENTS real components is
    left out (its edits are not scored); None when no class is left."""
    per_channel_values = None
    for i in evenly_spread(len(images), max_cases):
        label_map = np.asarray(label_maps[i])
        if not np.isin(label_map, list(classes)).any():
            continue
        features = case_features(images[i], label_map, classes)
        if per_channel_values is None:
            per_channel_values = [{} for _ in features]
        for channel, found in enumerate(features):
            for value, f in found:
                per_channel_values[channel].setdefault(value, []).append(f)
    if per_channel_values is None or not any(per_channel_values):
        return None
    per_channel_values = [{value: [found[j] for j in evenly_spread(len(found), MAX_COMPONENTS)]
                           for value, found in sorted(channel_values.items()) if len(found) >= MIN_COMPONENTS}
                          for channel_values in per_channel_values]
    if not any(per_channel_values):
        return None
    return EditGate([{value: _class_reference(found, calibration_percentile) for value, found in channel_values.items()}
                     for channel_values in per_channel_values], margin)


def edit_gate_score(image: np.ndarray, label_map: np.ndarray, edited: np.ndarray, gate: EditGate,
                    classes=None) -> dict:
    """Score the lesion components of ``label_map`` that touch ``edited`` in ``image`` (C, ...):
    ``{"score", "passed", "components", "worst"}``; without an edited lesion component, score 1 and passed
    (nothing to judge). ``classes``: the pathology classes (those the gate holds no reference for are not
    scored; default: those it was fitted on)."""
    classes = sorted(gate.reference[0]) if classes is None else [v for v in classes if v in gate.reference[0]]
    per_channel = case_features(image, label_map, classes, np.asarray(edited, dtype=bool))
    worst, passed, count = None, True, 0
    for channel, found in enumerate(per_channel):
        count = len(found)
        for index, (value, features) in enumerate(found):
            distance = gate.distance(channel, value, features)
            finite = bool(np.isfinite(distance))
            score = 1.0 / (1.0 + distance / gate.threshold) if finite else 0.0
            passed = passed and finite and distance <= gate.threshold
            if worst is None or score < worst["score"]:
                worst = {"score": float(score), "channel": channel, "class": value, "component": index,
                         "distance": float(distance) if finite else None,
                         "threshold": float(gate.threshold)}
    if worst is None:
        return {"score": 1.0, "passed": True, "components": 0, "worst": None}
    return {"score": worst["score"], "passed": bool(passed), "components": count, "worst": worst}


def joined_quality(slice_quality: dict, edit_quality: dict) -> dict:
    """The stored model-free record of an edited case: the slice gate's fields, ``score`` the lower of the two
    scores, ``passed`` only when both gates pass; ``slice_gate`` and ``edit_gate`` hold each gate's verdict.
    A record without ``edit_gate`` (an image made whole, or a store written before the edit gate) is the slice
    gate's alone."""
    return {**slice_quality, "score": min(slice_quality["score"], edit_quality["score"]),
            "passed": bool(slice_quality["passed"] and edit_quality["passed"]),
            "slice_gate": {"score": slice_quality["score"], "passed": slice_quality["passed"]},
            "edit_gate": edit_quality}
