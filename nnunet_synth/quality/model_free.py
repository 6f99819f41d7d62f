"""Model-free quality gate in the spirit of MAISI (method.md §4): in a synthetic image, each class's median
intensity must lie within the range that the real data shows for that class.

The real range of class c is the [0.5, 99.5] percentile interval of the per-slice medians of class-c pixels
over the real training slices (percentiles rather than min/max so that one odd slice does not open the gate).
"""
from dataclasses import dataclass

import numpy as np

RANGE_PERCENTILES = (0.5, 99.5)


@dataclass
class ClassIntensityRanges:
    """Per class value: (low, high) of the real per-slice median intensity, in dataset units."""

    ranges: dict

    def to_dict(self) -> dict:
        return {str(value): [float(low), float(high)] for value, (low, high) in self.ranges.items()}

    @classmethod
    def from_dict(cls, data: dict) -> "ClassIntensityRanges":
        return cls({int(value): (low, high) for value, (low, high) in data.items()})


def class_medians(image: np.ndarray, label_map: np.ndarray) -> dict:
    """Median intensity of each class present in ``label_map``."""
    return {int(value): float(np.median(image[label_map == value])) for value in np.unique(label_map)}


def real_class_intensity_ranges(slices) -> ClassIntensityRanges:
    """Ranges from an iterable of (image, label_map) pairs of real slices."""
    medians_per_class = {}
    for image, label_map in slices:
        for value, median in class_medians(image, label_map).items():
            medians_per_class.setdefault(value, []).append(median)
    return ClassIntensityRanges({value: tuple(np.percentile(medians, RANGE_PERCENTILES))
                                 for value, medians in sorted(medians_per_class.items())})


def model_free_score(image: np.ndarray, label_map: np.ndarray, real_ranges: ClassIntensityRanges) -> dict:
    """Score one synthetic pair: the fraction of its classes whose median lies in the real range.

    Returns ``{"score", "passed", "class_medians", "classes_outside"}``; ``passed`` means every class is inside.
    Classes the real data never showed count as outside.
    """
    medians = class_medians(image, label_map)
    outside = [value for value, median in medians.items()
               if value not in real_ranges.ranges
               or not real_ranges.ranges[value][0] <= median <= real_ranges.ranges[value][1]]
    score = 1.0 - len(outside) / len(medians)
    return {"score": float(score), "passed": not outside,
            "class_medians": {str(value): median for value, median in medians.items()},
            "classes_outside": [int(value) for value in outside]}
