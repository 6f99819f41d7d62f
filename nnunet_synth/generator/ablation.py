"""Mask ablation during training (Diff-Lung §2.2, method.md §2) and offset noise (Paired Diffusion §2.4).

Ablating class c of a sample sets that class's pixels to background in the *conditioning* label map only; its
one-hot channel then is all zero and the background channel holds those pixels. The image is never altered.
"""
import math
from dataclasses import dataclass

import numpy as np
import torch

# How f_c is counted (method.md §2). Over "all" pixels the background dominates and delta_c is nearly the same for
# every class (Diff-Lung's shares give 0.4985 vs 0.481): CBMAT would be MAT plus protection. "foreground" (the
# default) counts over non-background pixels, "pathology" over the ablatable classes only.
FREQUENCY_DEFINITIONS = ("foreground", "all", "pathology")
# How f_c becomes delta_c. Diff-Lung's eq. (8) / Algorithm 1: delta_0 (1 - f_c), rare classes ablated (slightly) more.
# Diff-Lung's text: common pathologies ablated more often, read here as delta_0 * f_c. The equation is the default.
PROBABILITY_READINGS = ("equation", "text")


def cbmat_class_frequencies(pixel_counts, definition: str = "foreground", protected_values=()) -> np.ndarray:
    """f_c per class (index = label value) from training pixel counts, under ``definition``.

    ``all``: share of all pixels. ``foreground``: share of non-background pixels (background gets 0).
    ``pathology``: share of the pixels of the non-background, non-protected classes (the others get 0).
    """
    counts = np.asarray(pixel_counts, dtype=np.float64)
    counted = np.ones(len(counts), dtype=bool)
    if definition in ("foreground", "pathology"):
        counted[0] = False
    if definition == "pathology":
        counted[list(protected_values)] = False
    elif definition not in FREQUENCY_DEFINITIONS:
        raise ValueError(f"unknown frequency definition {definition!r}: choose one of {FREQUENCY_DEFINITIONS}")
    total = counts[counted].sum()
    return np.where(counted, counts / total, 0.0) if total > 0 else np.zeros(len(counts))


def cbmat_initial_probabilities(class_frequencies, delta_0: float, reading: str = "equation") -> np.ndarray:
    """delta_c from f_c: ``equation`` = delta_0 * (1 - f_c) (Diff-Lung eq. 8 and Algorithm 1 line 1), ``text`` =
    delta_0 * f_c (Diff-Lung's prose: common classes ablated more often).

    The paper's text and equation contradict each other (method.md §2); we implement the equation by default.
    Keep this the one place where frequencies become probabilities, so an evaluation can swap the mapping.
    """
    frequencies = np.asarray(class_frequencies, dtype=np.float64)
    if reading == "equation":
        return delta_0 * (1.0 - frequencies)
    if reading == "text":
        return delta_0 * frequencies
    raise ValueError(f"unknown probability reading {reading!r}: choose one of {PROBABILITY_READINGS}")


def cosine_annealing_factor(step: int, total_steps: int) -> float:
    """(1 + cos(pi t / T)) / 2: 1 at the start, 0 at the end of training."""
    return 0.5 * (1.0 + math.cos(math.pi * min(step, total_steps) / max(1, total_steps)))


@dataclass
class AblationSchedule:
    """Per-class ablation probabilities over training.

    ``initial_probabilities`` has one entry per class (index = label value); background and protected classes
    hold 0. ``annealed`` applies eq. (9) of Diff-Lung, delta_c(t) = delta_c * (1 + cos(pi t / T)) / 2, as a schedule of
    the *initial* value. (Algorithm 1 line 10 multiplies delta_c by the factor in every iteration, a compounding
    product that collapses to ~0 after a few iterations; method.md §2 reads it as eq. (9) and so do we.)
    """

    mode: str
    initial_probabilities: np.ndarray
    annealed: bool
    total_steps: int

    def probabilities(self, step: int) -> np.ndarray:
        """The ablation probability of each class at training step ``step`` (0-based)."""
        factor = cosine_annealing_factor(step, self.total_steps) if self.annealed else 1.0
        return self.initial_probabilities * factor

    def draw(self, batch_size: int, step: int, generator: torch.Generator) -> torch.Tensor:
        """Which classes to ablate, (batch_size, num_classes) bool, one draw per sample and class."""
        probabilities = torch.as_tensor(self.probabilities(step), dtype=torch.float64)
        uniform = torch.rand((batch_size, len(probabilities)), generator=generator, dtype=torch.float64)
        return uniform < probabilities[None, :]

    def to_dict(self) -> dict:
        return {"mode": self.mode, "initial_probabilities": [float(p) for p in self.initial_probabilities],
                "annealed": self.annealed, "total_steps": int(self.total_steps)}


def make_ablation_schedule(mode: str, class_frequencies, protected_values, delta_0: float,
                           total_steps: int, reading: str = "equation", ignore_label=None) -> AblationSchedule:
    """``cbmat``: delta_c from f_c (``cbmat_initial_probabilities``, ``reading``), cosine annealed, protected
    classes and background never ablated.
    ``mat`` (Konz et al., the baseline): every non-background class with probability 0.5, no annealing, no
    protected classes. ``none``: never ablate."""
    num_classes = len(class_frequencies)
    probabilities = np.zeros(num_classes, dtype=np.float64)
    if mode == "cbmat":
        probabilities = cbmat_initial_probabilities(class_frequencies, delta_0, reading)
        probabilities[list(protected_values)] = 0.0
    elif mode == "mat":
        probabilities[:] = 0.5
    elif mode != "none":
        raise ValueError(f"unknown ablation mode {mode!r}")
    probabilities[0] = 0.0  # background is never ablated
    if ignore_label is not None:
        probabilities[ignore_label] = 0.0   # never in a conditioning map (mark_unannotated): nothing to ablate
    return AblationSchedule(mode, probabilities, annealed=(mode == "cbmat"), total_steps=int(total_steps))


def ablate_label_maps(label_maps: torch.Tensor, ablated_classes: torch.Tensor) -> torch.Tensor:
    """Set the pixels of each sample's ablated classes to background. ``label_maps`` (B, H, W) int64,
    ``ablated_classes`` (B, C) bool; returns a new tensor, the input is not modified."""
    ablated_classes = ablated_classes.to(label_maps.device)
    batch_size = label_maps.shape[0]
    pixel_is_ablated = torch.gather(ablated_classes, 1, label_maps.reshape(batch_size, -1)).reshape(label_maps.shape)
    return torch.where(pixel_is_ablated, torch.zeros_like(label_maps), label_maps)


def mark_unannotated(label_maps, ignore_label):
    """Conditioning maps for nnU-Net's ignore label (unannotated pixels, "unknown"): those pixels become background,
    exactly as an ablated class's pixels do, so the ignore label's one-hot channel is always zero. The generator
    thus reads an unannotated pixel as "anything may be here", the meaning mask ablation teaches it (Konz et al.,
    CBMAT). Works on numpy arrays and torch tensors; returns a new array, the input is not modified."""
    if ignore_label is None:
        return label_maps
    if isinstance(label_maps, torch.Tensor):
        return torch.where(label_maps == ignore_label, torch.zeros_like(label_maps), label_maps)
    return np.where(label_maps == ignore_label, 0, label_maps).astype(np.asarray(label_maps).dtype)


def one_hot_condition(label_maps: torch.Tensor, num_classes: int, dtype=torch.float32) -> torch.Tensor:
    """(B, H, W) int label maps -> (B, C, H, W) one-hot channels."""
    return torch.nn.functional.one_hot(label_maps.long(), num_classes).permute(0, 3, 1, 2).to(dtype)


def training_noise(shape, offset_noise: float, generator: torch.Generator) -> torch.Tensor:
    """Gaussian noise N, plus C ~ offset_noise * N(0, 1) per sample and channel broadcast over pixels
    (Paired Diffusion §2.4) when ``offset_noise`` > 0."""
    noise = torch.randn(shape, generator=generator)
    if offset_noise > 0:
        noise = noise + offset_noise * torch.randn((shape[0], shape[1], 1, 1), generator=generator)
    return noise
