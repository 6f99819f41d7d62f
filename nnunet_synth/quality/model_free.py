"""Model-free quality gate (method.md §4): does a synthetic slice look like the real slices, class by class?
A synthetic volume is scored slice by slice where it was edited (``model_free_volume_score``).

In the spirit of MAISI's organ intensity ranges, but per-class medians alone pass pure noise (measured: 20 of 20
noise images passed). So each class present in the slice is described by its intensity histogram (the 10th,
50th and 90th percentiles of its pixels) and by two texture statistics inside the class (eroded by one pixel,
so edges between classes do not count), taken as logarithms (they are scales): the mean absolute Laplacian
(fine texture: noise raises it, blur lowers it) and the mean gradient magnitude after Gaussian smoothing with
sigma 2 (coarser structure). Fitted on the real training slices: per class and statistic the median and the
scaled MAD. A slice's distance is the root mean square of its robust z-scores |x - median| / (1.4826 MAD) over
classes and statistics (the largest z alone is too heavy-tailed on real slices to separate noise); it passes
when the distance is at most the ``calibration_percentile`` of the real slices' own distances (times
``margin``).

A class that spans very different tissues (the background of a dataset without a host class: air, body and bone)
has a spread that swallows noise. So each slice is also described without classes, inside its foreground (the
image's own body mask, ``masks.placement.body_mask``): the log energy of four difference-of-Gaussians bands
(sigma 0-1, 1-2, 2-4, 4-8: noise raises the finest, blur empties it), the log ratios of neighbouring bands (the
spectrum's shape: an untrained generator's images have the wrong one) and the lag-1 autocorrelation of the
finest band (white noise has none, blur a lot). Fitted on
the same real slices: per feature the median, the scaled MAD and a limit, the ``calibration_percentile`` of the
real slices' own |z|; a slice's class-free distance is its largest |z| / limit (one feature far out is enough)
and it passes below the ``calibration_percentile`` of the real slices' own class-free distances. A slice whose
foreground covers less than MIN_FOREGROUND of it (the empty ends of a volume) is judged by its classes alone.
A slice passes only when both pass; per channel, the lowest channel counts. Measured on Dataset501, the binary
no-host COVID variant, the 4-channel MS volumes and the STS CT (docs/quality.md): held-out real slices pass
(94-100 %), noise, blur and an untrained generator's images fail (0 %); the per-class part alone passed noise or
blur on all four.

``score`` = 1 / (1 + d), d the larger of distance / threshold and the class-free distance over its threshold: 1
for a slice at the real medians, 0.5 exactly at a threshold, so ``nnsynth_min_quality=0.5`` filters like the gate.
"""
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from nnunet_synth.dataset.native_slices import evenly_spread
from nnunet_synth.errors import NnsynthError
from nnunet_synth.masks.placement import body_mask

STATISTICS = ("p10", "p50", "p90", "laplacian", "gradient")
MIN_CLASS_PIXELS = 64          # a class with fewer pixels in a slice is not scored in that slice
CALIBRATION_PERCENTILE = 99.0
MARGIN = 1.0
GATE_MAX_SLICES = 2000         # real slices a gate is fitted on, at most (evenly spread)
PASS_SCORE = 0.5               # score of a slice exactly at the threshold: score >= PASS_SCORE <=> passed
BAND_SIGMAS = (1.0, 2.0, 4.0, 8.0)    # the difference-of-Gaussians bands: 0-1, 1-2, 2-4, 4-8 pixels
CLASS_FREE_FEATURES = ("band0", "band1", "band2", "band3", "slope1", "slope2", "slope3", "residual_correlation")
MIN_FOREGROUND = 0.05          # a slice whose foreground covers less of it has no class-free features


def slice_statistics(image: np.ndarray, label_map: np.ndarray) -> dict:
    """{class value: {statistic: value}} for every class with at least MIN_CLASS_PIXELS pixels."""
    image = np.asarray(image, dtype=np.float32)
    laplacian = np.abs(ndimage.laplace(image))
    gradient = ndimage.gaussian_gradient_magnitude(image, 2.0)
    statistics = {}
    for value in np.unique(label_map):
        mask = label_map == value
        if mask.sum() < MIN_CLASS_PIXELS:
            continue
        interior = ndimage.binary_erosion(mask)
        if interior.sum() < MIN_CLASS_PIXELS // 2:
            interior = mask
        p10, p50, p90 = np.percentile(image[mask], (10, 50, 90))
        statistics[int(value)] = {"p10": float(p10), "p50": float(p50), "p90": float(p90),
                                  "laplacian": float(np.log(laplacian[interior].mean() + 1e-6)),
                                  "gradient": float(np.log(gradient[interior].mean() + 1e-6))}
    return statistics


def class_free_features(image: np.ndarray):
    """{feature: value} of one channel inside its foreground (``body_mask``), None when the foreground covers less
    than MIN_FOREGROUND of the slice."""
    image = np.asarray(image, dtype=np.float32)
    foreground = body_mask(image)
    if foreground.mean() < MIN_FOREGROUND:
        return None
    levels = [image] + [ndimage.gaussian_filter(image, sigma) for sigma in BAND_SIGMAS]
    bands = [finer - coarser for finer, coarser in zip(levels, levels[1:])]
    features = {f"band{k}": float(np.log(np.mean(band[foreground] ** 2) + 1e-12)) for k, band in enumerate(bands)}
    for k in range(1, len(bands)):      # the spectrum's shape: log energy ratios of neighbouring bands
        features[f"slope{k}"] = features[f"band{k}"] - features[f"band{k - 1}"]
    finest = bands[0]
    rows, columns = foreground[1:] & foreground[:-1], foreground[:, 1:] & foreground[:, :-1]
    products = np.sum((finest[1:] * finest[:-1])[rows]) + np.sum((finest[:, 1:] * finest[:, :-1])[columns])
    energy = np.sum(finest[1:][rows] ** 2) + np.sum(finest[:, 1:][columns] ** 2)
    features["residual_correlation"] = float(products / (energy + 1e-12))
    return features


@dataclass
class ClassFreeGate:
    """Per class-free feature: (median, scale, limit) over the real slices' foregrounds; the distance threshold."""

    reference: dict
    threshold: float

    def distance(self, features: dict):
        """(largest |z| / limit, the feature that gives it)."""
        ratios = {name: abs(features[name] - median) / scale / limit
                  for name, (median, scale, limit) in self.reference.items()}
        worst = max(ratios, key=ratios.get)
        return float(ratios[worst]), worst

    def to_dict(self) -> dict:
        return {"features": list(self.reference), "threshold": float(self.threshold),
                "reference": {name: [float(x) for x in values] for name, values in self.reference.items()}}

    @classmethod
    def from_dict(cls, data: dict) -> "ClassFreeGate":
        return cls({name: tuple(values) for name, values in data["reference"].items()}, float(data["threshold"]))


def fit_class_free_gate(per_slice: list, calibration_percentile=CALIBRATION_PERCENTILE, margin=MARGIN):
    """Fit on the ``class_free_features`` of real slices (None entries skipped); None when none has a foreground."""
    found = [features for features in per_slice if features is not None]
    if not found:
        return None
    xs = np.array([[features[name] for name in CLASS_FREE_FEATURES] for features in found])
    median = np.median(xs, axis=0)
    scale = np.maximum(1.4826 * np.median(np.abs(xs - median), axis=0), np.maximum(0.05 * xs.std(axis=0), 1e-6))
    limit = np.maximum(np.percentile(np.abs(xs - median) / scale, calibration_percentile, axis=0), 1.0)
    gate = ClassFreeGate({name: (median[k], scale[k], limit[k]) for k, name in enumerate(CLASS_FREE_FEATURES)}, 1.0)
    # floored: a single real slice (or identical ones) has distance 0 to itself
    gate.threshold = max(float(margin * np.percentile([gate.distance(f)[0] for f in found], calibration_percentile)),
                         1e-6)
    return gate


@dataclass
class ModelFreeGate:
    """Per class value and statistic: (median, scale) over the real slices; the distance threshold; the class-free
    gate (None: the real slices had no foreground)."""

    reference: dict
    threshold: float
    class_free: ClassFreeGate = None

    def distance(self, statistics: dict):
        """(RMS of the robust z-scores, {class: {statistic: z}}); a class the real data never showed makes it
        infinite; a slice without any scored class has distance 0."""
        z_scores = {}
        for value, values in statistics.items():
            if value not in self.reference:
                z_scores[value] = {name: float("inf") for name in values}
                continue
            z_scores[value] = {name: abs(x - self.reference[value][name][0]) / self.reference[value][name][1]
                               for name, x in values.items()}
        all_z = np.array([z for zs in z_scores.values() for z in zs.values()])
        return (float(np.sqrt(np.mean(all_z ** 2))) if all_z.size else 0.0), z_scores

    def to_dict(self) -> dict:
        return {"statistics": list(STATISTICS), "threshold": float(self.threshold),
                "reference": {str(value): {name: [float(m), float(s)] for name, (m, s) in stats.items()}
                              for value, stats in self.reference.items()},
                "class_free": None if self.class_free is None else self.class_free.to_dict()}

    @classmethod
    def from_dict(cls, data: dict) -> "ModelFreeGate":
        if "class_free" not in data:
            raise NnsynthError("the stored model-free gate has no class-free reference (a per-class gate alone "
                               "passes noise on datasets without a host class): rerun nnsynth_generate with "
                               "--overwrite for that fold")
        reference = {int(value): {name: tuple(pair) for name, pair in stats.items()}
                     for value, stats in data["reference"].items()}
        class_free = None if data["class_free"] is None else ClassFreeGate.from_dict(data["class_free"])
        return cls(reference, float(data["threshold"]), class_free)


def fit_model_free_gate(slices, calibration_percentile=CALIBRATION_PERCENTILE, margin=MARGIN) -> ModelFreeGate:
    """Fit the gate on an iterable of real (image, label_map) pairs."""
    per_slice, per_slice_free = [], []
    for image, label_map in slices:
        per_slice.append(slice_statistics(image, label_map))
        per_slice_free.append(class_free_features(image))
    values_per_class = {}
    for statistics in per_slice:
        for value, values in statistics.items():
            for name, x in values.items():
                values_per_class.setdefault(value, {}).setdefault(name, []).append(x)
    reference = {}
    for value, per_name in sorted(values_per_class.items()):
        reference[value] = {}
        for name, xs in per_name.items():
            xs = np.asarray(xs)
            median = float(np.median(xs))
            # scaled MAD, floored so that a statistic that hardly varies does not make every slice an outlier
            scale = max(1.4826 * float(np.median(np.abs(xs - median))), 0.05 * float(np.std(xs)), 1e-6)
            reference[value][name] = (median, scale)
    gate = ModelFreeGate(reference, threshold=1.0,
                         class_free=fit_class_free_gate(per_slice_free, calibration_percentile, margin))
    distances = [gate.distance(statistics)[0] for statistics in per_slice if statistics]
    gate.threshold = max(float(margin * np.percentile(distances, calibration_percentile)), 1e-6)
    return gate


def model_free_score(image: np.ndarray, label_map: np.ndarray, gate: ModelFreeGate) -> dict:
    """Score one pair: ``{"score", "passed", "distance", "threshold", "class_medians", "worst", "class_free"}``
    (``distance``, ``threshold`` and ``worst``: the per-class part; ``class_free``: its distance, threshold and
    worst feature, None when the slice has no foreground or the gate no class-free reference)."""
    statistics = slice_statistics(image, label_map)
    distance, z_scores = gate.distance(statistics)
    worst = None
    if z_scores:
        worst_class, worst_name = max(((v, n) for v, zs in z_scores.items() for n in zs),
                                      key=lambda item: z_scores[item[0]][item[1]])
        z = z_scores[worst_class][worst_name]
        worst = {"class": int(worst_class), "statistic": worst_name, "z": float(z) if np.isfinite(z) else None}
    finite = bool(np.isfinite(distance))
    relative = distance / gate.threshold if finite else float("inf")
    class_free = None
    features = class_free_features(image) if gate.class_free is not None else None
    if features is not None:
        free_distance, feature = gate.class_free.distance(features)
        class_free = {"distance": free_distance, "threshold": gate.class_free.threshold, "worst_feature": feature,
                      "passed": bool(free_distance <= gate.class_free.threshold)}
        relative = max(relative, free_distance / gate.class_free.threshold)
    score = 1.0 / (1.0 + relative) if np.isfinite(relative) else 0.0
    passed = finite and distance <= gate.threshold and (class_free is None or class_free["passed"])
    return {"score": float(score), "passed": bool(passed),
            "distance": float(distance) if finite else None,
            "threshold": float(gate.threshold),
            "class_medians": {str(v): values["p50"] for v, values in statistics.items()}, "worst": worst,
            "class_free": class_free}


def fit_channel_gates(images, label_maps, max_slices: int = GATE_MAX_SLICES) -> list:
    """One gate per image channel, fitted on real pairs (``images[i]`` (C, H, W), ``label_maps[i]``; lists or
    on-disk sequences): multi-channel data (MRI sequences, CT windows) is judged channel by channel, each against
    its own real statistics. At most ``max_slices`` pairs, evenly spread, are used: the robust medians and scales
    are settled long before that, and time and memory stay bounded on large datasets."""
    chosen = evenly_spread(len(images), max_slices)
    num_channels = images[chosen[0]].shape[0]
    return [fit_model_free_gate((images[i][channel], label_maps[i]) for i in chosen)
            for channel in range(num_channels)]


def channel_gates_to_dict(gates) -> dict:
    """The gates of ``fit_channel_gates`` for the manifest: the single gate's dict for one channel."""
    return gates[0].to_dict() if len(gates) == 1 else {"channels": [gate.to_dict() for gate in gates]}


def model_free_channel_score(image: np.ndarray, label_map: np.ndarray, gates) -> dict:
    """Score a (C, H, W) pair with one gate per channel: the lowest channel score, passed only when every channel
    passes; with several channels, ``channels`` holds each channel's ``model_free_score``."""
    per_channel = [model_free_score(channel_image, label_map, gate) for channel_image, gate in zip(image, gates)]
    if len(per_channel) == 1:
        return per_channel[0]
    worst = min(per_channel, key=lambda result: result["score"])
    return {"score": worst["score"], "passed": all(result["passed"] for result in per_channel),
            "worst_channel": per_channel.index(worst), "channels": per_channel}


def model_free_volume_score(image: np.ndarray, label_map: np.ndarray, edited: np.ndarray, gates) -> dict:
    """Score a (C, D, H, W) volume with the per-slice gates of ``fit_channel_gates``, slice by slice over the
    slices that hold ``edited`` voxels (the rest is the real case): the lowest slice score, passed only when
    every scored slice passes; ``worst_slice`` is that slice's index and result."""
    scored = [int(z) for z in np.flatnonzero(np.asarray(edited).reshape(len(edited), -1).any(axis=1))]
    if not scored:
        return {"score": 1.0, "passed": True, "scored_slices": 0, "worst_slice": None}
    results = {z: model_free_channel_score(image[:, z], label_map[z], gates) for z in scored}
    worst = min(scored, key=lambda z: results[z]["score"])
    return {"score": results[worst]["score"], "passed": all(result["passed"] for result in results.values()),
            "scored_slices": len(scored), "worst_slice": {"index": worst, **results[worst]}}
