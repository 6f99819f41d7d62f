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
``margin``). Measured on Dataset501 (fold 0 fit, 181 held-out slices): every held-out slice passes; uniform
noise, Gaussian blur (sigma 1.5 and 3) and 40 images of an untrained generator all fail.

``score`` = 1 / (1 + distance / threshold): 1 for a slice at the real medians, 0.5 exactly at the threshold,
so ``nnsynth_min_quality=0.5`` filters like the gate.
"""
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from nnunet_synth.dataset.native_slices import evenly_spread

STATISTICS = ("p10", "p50", "p90", "laplacian", "gradient")
MIN_CLASS_PIXELS = 64          # a class with fewer pixels in a slice is not scored in that slice
CALIBRATION_PERCENTILE = 99.0
MARGIN = 1.0
GATE_MAX_SLICES = 2000         # real slices a gate is fitted on, at most (evenly spread)
PASS_SCORE = 0.5               # score of a slice exactly at the threshold: score >= PASS_SCORE <=> passed


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


@dataclass
class ModelFreeGate:
    """Per class value and statistic: (median, scale) over the real slices; the distance threshold."""

    reference: dict
    threshold: float

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
                              for value, stats in self.reference.items()}}

    @classmethod
    def from_dict(cls, data: dict) -> "ModelFreeGate":
        reference = {int(value): {name: tuple(pair) for name, pair in stats.items()}
                     for value, stats in data["reference"].items()}
        return cls(reference, float(data["threshold"]))


def fit_model_free_gate(slices, calibration_percentile=CALIBRATION_PERCENTILE, margin=MARGIN) -> ModelFreeGate:
    """Fit the gate on an iterable of real (image, label_map) pairs."""
    per_slice = [slice_statistics(image, label_map) for image, label_map in slices]
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
    gate = ModelFreeGate(reference, threshold=1.0)
    distances = [gate.distance(statistics)[0] for statistics in per_slice if statistics]
    gate.threshold = float(margin * np.percentile(distances, calibration_percentile))
    return gate


def model_free_score(image: np.ndarray, label_map: np.ndarray, gate: ModelFreeGate) -> dict:
    """Score one pair: ``{"score", "passed", "distance", "threshold", "class_medians", "worst"}``."""
    statistics = slice_statistics(image, label_map)
    distance, z_scores = gate.distance(statistics)
    worst = None
    if z_scores:
        worst_class, worst_name = max(((v, n) for v, zs in z_scores.items() for n in zs),
                                      key=lambda item: z_scores[item[0]][item[1]])
        z = z_scores[worst_class][worst_name]
        worst = {"class": int(worst_class), "statistic": worst_name, "z": float(z) if np.isfinite(z) else None}
    finite = bool(np.isfinite(distance))
    score = 1.0 / (1.0 + distance / gate.threshold) if finite else 0.0
    return {"score": float(score), "passed": bool(finite and distance <= gate.threshold),
            "distance": float(distance) if finite else None,
            "threshold": float(gate.threshold),
            "class_medians": {str(v): values["p50"] for v, values in statistics.items()}, "worst": worst}


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
