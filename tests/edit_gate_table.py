"""The edit gate's table on real lesions: fitted on a fold's training cases, tested on held-out real lesions
and on corruptions of them (``tests/test_edit_gate.py`` measures and checks it)."""
import numpy as np
from scipy import ndimage

from nnunet_synth.quality.edit_gate import RING, edit_gate_score, lesion_components

CORRUPTIONS = ("salt_and_pepper", "gaussian_noise", "blur", "flat_fill", "wrong_class", "hard_seam")
EXTRA_PAD = 4        # pixels beyond the scored band around a lesion in its crop: the filters' reach


def lesion_crops(image, label_map, classes):
    """[(crop of image (C, ...), crop of label_map, the lesion's mask in the crop)] of each lesion component."""
    crops = []
    for _, box, component in lesion_components(label_map, classes):
        crop = tuple(slice(max(0, s.start - EXTRA_PAD), min(n, s.stop + EXTRA_PAD))
                     for s, n in zip(box, label_map.shape))
        mask = np.zeros([c.stop - c.start for c in crop], dtype=bool)
        mask[tuple(slice(s.start - c.start, s.stop - c.start) for s, c in zip(box, crop))] = component
        crops.append((np.asarray(image[(slice(None), *crop)], dtype=np.float32), label_map[crop], mask))
    return crops


def corrupt(name, image, component, rng, value_range, other_class_median):
    """``image`` (C, ...) with the corruption ``name`` inside ``component`` (plus its ring, as an edit would).
    ``value_range``: per channel the 0.5th and 99.5th percentiles of the case; ``other_class_median``: per channel
    the median of another class (``other_class``)."""
    region = ndimage.binary_dilation(component, iterations=RING)
    low, high = value_range
    spread = high - low
    out = image.copy()
    for c, channel in enumerate(out):
        if name == "salt_and_pepper":
            hit = region & (rng.random(region.shape) < 0.2)
            channel[hit] = np.where(rng.random(hit.sum()) < 0.5, low[c], high[c])
        elif name == "gaussian_noise":
            channel[region] += rng.normal(0, 0.25 * spread[c], region.sum())
        elif name == "blur":
            channel[region] = ndimage.gaussian_filter(image[c], 2.0)[region]
        elif name == "flat_fill":
            channel[component] = np.median(image[c][component])
        elif name == "wrong_class":      # the lesion moved to another class's median intensity
            channel[component] += other_class_median[c] - np.median(image[c][component])
        elif name == "hard_seam":
            channel[region] += 0.3 * spread[c]
    return out


def other_class(label_map, classes):
    """Where another class lies: the largest labelled class other than ``classes`` (e.g. the lung beside a lung
    lesion), else the unlabelled tissue within 5 pixels of the lesions (e.g. brain beside MS lesions)."""
    values, counts = np.unique(label_map[~np.isin(label_map, classes)], return_counts=True)
    labelled = [(n, v) for v, n in zip(values, counts) if v != 0]
    if labelled:
        return label_map == max(labelled)[1]
    lesions = np.isin(label_map, classes)
    return ndimage.binary_dilation(lesions, iterations=5) & ~lesions


def pass_rates(gate, held_out_pairs, classes, seed=0):
    """{"held-out real lesions": (passed, total), corruption: (passed, total)}, one lesion component at a time."""
    rng = np.random.default_rng(seed)
    counts = {name: [0, 0] for name in ("held-out real lesions", *CORRUPTIONS)}
    for image, label_map in held_out_pairs:
        image = np.asarray(image, dtype=np.float32)
        value_range = tuple(np.percentile(image.reshape(len(image), -1), q, axis=1) for q in (0.5, 99.5))
        other = other_class(label_map, classes)
        other_median = [float(np.median(channel[other])) for channel in image]
        for crop, crop_map, component in lesion_crops(image, label_map, classes):
            for name in counts:
                edited_image = crop if name == "held-out real lesions" else corrupt(name, crop, component, rng,
                                                                                      value_range, other_median)
                result = edit_gate_score(edited_image, crop_map, component, gate, classes)
                counts[name][0] += int(result["passed"])
                counts[name][1] += 1
    return {name: tuple(c) for name, c in counts.items()}
