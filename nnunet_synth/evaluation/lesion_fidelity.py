"""Lesion-region fidelity: erase the real lesions of held-out slices (plus the edit margin), fill them again from
their own label maps, and compare the filled region with the real pixels.

Held-out slices are those of the cases the inpainting generator did not see (for a fold F generator: fold F's
validation cases) that hold a pathology component. The edit region is every pathology pixel grown by the
generator's ``edit_margin``, exactly as generation edits a map. Sources compared on the same regions:

- the inpainting generator, with each sampler and step count asked for (DDIM, DPM-Solver++, UniPC);
- copy-paste: every part of the edit region filled with a donor lesion's real pixels (a random pathology
  component of the generator's training slices, its centre put on the part's centre);
- the whole-slice generator (if given): the slice drawn from its map at the generator's size, back at native
  size, its pixels inside the edit region.

Figures (model space [-1, 1], data range 2): PSNR of the edit region's pixels, the mean of the SSIM map
(torchmetrics) over the edit region, and the 1-Wasserstein distance of the edit region's intensities (dataset
units, scipy) against the real pixels; means over channels. Speckle: the share of edit pixels that stand out from
their 3 x 3 median by more than ``SPECKLE_STEP`` (model space), the salt-and-pepper a sampler draws when its
clean-image estimates run out of range (``generator.inpaint_pipeline.CLIP_X0_OPTIONS``); real lesions have few.
"""
import time
from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage
from scipy.stats import wasserstein_distance
from torchmetrics.functional.image import (
    peak_signal_noise_ratio,
    structural_similarity_index_measure,
)
from tqdm import tqdm

from nnunet_synth.dataset import ImageWindows, RawDataset, fit_slice, restore_slice
from nnunet_synth.dataset.native_slices import evenly_spread, open_native_slices
from nnunet_synth.errors import NnsynthError
from nnunet_synth.evaluation.fidelity import MODEL_DATA_RANGE, held_out_case_ids
from nnunet_synth.generator.checkpoints import load_generator
from nnunet_synth.generator.config import DDIM_INFERENCE_STEPS
from nnunet_synth.generator.data import MODEL_MINIMUM
from nnunet_synth.generator.inpaint_data import edit_region, pathology_components
from nnunet_synth.generator.inpaint_training import class_roles_of, inpaint_pipeline
from nnunet_synth.sampling import sample_images
from nnunet_synth.sampling.inpaint import inpaint_slices

SPECKLE_STEP = 0.5     # a quarter of the model range [-1, 1]


def speckle_fraction(model_image: np.ndarray, edit: np.ndarray) -> float:
    """The share of ``edit`` (H, W) pixels of ``model_image`` (C, H, W, model space) that differ from their 3 x 3
    median by more than ``SPECKLE_STEP`` in any channel (0 for an empty edit)."""
    if not edit.any():
        return 0.0
    image = np.asarray(model_image, dtype=np.float32)
    outlier = np.zeros(edit.shape, dtype=bool)
    for channel in image:
        outlier |= np.abs(channel - ndimage.median_filter(channel, size=3, mode="nearest")) > SPECKLE_STEP
    return float(outlier[edit].mean())


@dataclass
class LesionFidelitySettings:
    samplers: tuple = (("ddim", 50), ("dpmsolver++", 10), ("dpmsolver++", 20), ("unipc", 10), ("unipc", 20))
    seeds: tuple = (0,)
    max_slices: int = 24              # held-out slices with a lesion, evenly spread
    slice_generator_steps: int = DDIM_INFERENCE_STEPS   # DDIM steps of the whole-slice generator
    batch_size: int = 16


@dataclass
class HeldOutLesions:
    """The held-out slices with a lesion: real images (dataset units), their maps and edit regions."""

    images: list
    label_maps: list
    edits: list
    map_ids: list


def held_out_lesions(dataset: RawDataset, config, max_slices: int) -> HeldOutLesions:
    """Held-out slices holding a pathology pixel (at most ``max_slices``, evenly spread) and their edit regions."""
    real = open_native_slices(dataset, held_out_case_ids(dataset, config), progress=False)
    _, pathology = class_roles_of(config)
    margin = int(config.training["edit_margin"])
    with_lesion = [row for row in range(len(real)) if np.isin(real.label_maps[row], pathology).any()]
    if not with_lesion:
        raise NnsynthError(f"no held-out slice of {dataset.name} holds a pathology class: nothing to inpaint")
    rows = [with_lesion[i] for i in evenly_spread(len(with_lesion), max_slices)]
    label_maps = [real.label_maps[row].astype(np.int64) for row in rows]
    return HeldOutLesions([real.images[row] for row in rows], label_maps,
                          [edit_region(np.isin(m, pathology), margin) for m in label_maps],
                          [real.map_ids[row] for row in rows])


def region_metrics(real_images, filled_images, edits, window: ImageWindows) -> dict:
    """PSNR and SSIM (model space) of the edit regions and the 1-Wasserstein distance of their intensities (dataset
    units), means over channels; images (C, H, W) in the dataset's units."""
    psnr, ssim, real_values, filled_values, speckle = [], [], [], [], []
    for real, filled, edit in zip(real_images, filled_images, edits):
        real_model, filled_model = window.to_model(real), window.to_model(filled)
        pixels = edit.sum()
        speckle.append((speckle_fraction(filled_model, edit) * pixels, speckle_fraction(real_model, edit) * pixels,
                        pixels))
        region = torch.from_numpy(edit)
        for channel in range(len(real)):
            real_t = torch.from_numpy(real_model[channel])[None, None]
            filled_t = torch.from_numpy(filled_model[channel])[None, None]
            psnr.append(float(peak_signal_noise_ratio(filled_t[0, 0][region], real_t[0, 0][region],
                                                      data_range=MODEL_DATA_RANGE)))
            _, ssim_map = structural_similarity_index_measure(filled_t, real_t, data_range=MODEL_DATA_RANGE,
                                                              return_full_image=True)
            ssim.append(float(ssim_map[0, 0][region].mean()))
        real_values.append(np.asarray(real)[:, edit])
        filled_values.append(np.asarray(filled)[:, edit])
    real_values, filled_values = np.concatenate(real_values, axis=1), np.concatenate(filled_values, axis=1)
    w1 = np.mean([wasserstein_distance(r, f) for r, f in zip(real_values, filled_values)])
    speckled, real_speckled, pixels = np.sum(speckle, axis=0)
    return {"psnr": float(np.mean(psnr)), "ssim": float(np.mean(ssim)), "w1": float(w1),
            "speckle": float(speckled / max(pixels, 1)), "real_speckle": float(real_speckled / max(pixels, 1))}


def copy_paste_fill(lesions: HeldOutLesions, donors, donor_components, pathology, seed: int) -> list:
    """Each part of every edit region filled with a random donor lesion's real pixels (its centre on the part's)."""
    rng = np.random.default_rng([seed, 5])
    filled_images = []
    for image, label_map, edit in zip(lesions.images, lesions.label_maps, lesions.edits):
        filled = np.array(image, dtype=np.float32, copy=True)
        parts, count = ndimage.label(edit)
        for part in range(1, count + 1):
            pixels = np.nonzero(parts == part)
            classes = label_map[pixels][np.isin(label_map[pixels], pathology)]
            wanted = np.bincount(classes).argmax() if classes.size else pathology[0]
            choices = np.flatnonzero(donor_components[:, 1] == wanted)
            donor = donor_components[choices[rng.integers(len(choices))] if choices.size
                                     else rng.integers(len(donor_components))]
            donor_image = donors.images[int(donor[0])]
            offset = np.asarray(donor[3:5]) - np.round([pixels[0].mean(), pixels[1].mean()]).astype(int)
            rows = np.clip(pixels[0] + offset[0], 0, donor_image.shape[1] - 1)
            cols = np.clip(pixels[1] + offset[1], 0, donor_image.shape[2] - 1)
            filled[:, pixels[0], pixels[1]] = donor_image[:, rows, cols]
        filled_images.append(filled)
    return filled_images


def slice_generator_fill(lesions: HeldOutLesions, slice_generator, dataset, seed: int, steps: int, device) -> list:
    """The whole-slice generator's image of each map (at its size, back at native size) inside the edit regions."""
    unet, config = load_generator(slice_generator, dataset, device)
    window = ImageWindows.from_dict(config.window)
    fitted = [fit_slice(window.to_model(image), label_map, config.image_size, MODEL_MINIMUM)
              for image, label_map in zip(lesions.images, lesions.label_maps)]
    seeds = [seed * 1_000_003 + i for i in range(len(fitted))]
    generated = sample_images(unet, config, np.stack([f[1] for f in fitted]), seeds, num_inference_steps=steps,
                              device=device, progress=False)
    filled_images = []
    for image, edit, drawn, (_, model_map, fit) in zip(lesions.images, lesions.edits, generated, fitted):
        restored, _ = restore_slice(drawn, model_map, fit)
        filled = np.array(image, dtype=np.float32, copy=True)
        drawn_units = np.stack(window.from_model(restored, [np.float32] * len(image)))
        filled[:, edit] = drawn_units[:, edit]
        filled_images.append(filled)
    return filled_images


def evaluate_lesion_fidelity(dataset: RawDataset, inpaint_generator, settings: LesionFidelitySettings,
                             slice_generator=None, device="cpu") -> dict:
    """One row per source (and sampler): PSNR, SSIM and W1 of the edit regions, seconds taken; plus the images of
    the first seed for a preview."""
    unet, config = load_generator(inpaint_generator, dataset, device)
    if config.mode != "inpaint":
        raise NnsynthError(f"{inpaint_generator} holds a {config.mode} generator: lesion-region fidelity needs an "
                           f"inpainting generator (nnsynth_train_generator {dataset.name} --mode inpaint)")
    window = ImageWindows.from_dict(config.window)
    lesions = held_out_lesions(dataset, config, settings.max_slices)
    _, pathology = class_roles_of(config)
    donors = open_native_slices(dataset, config.training_cases, progress=False)
    donor_components = pathology_components(donors.label_maps, pathology)
    dtypes = [[np.float32] * dataset.num_channels] * len(lesions.images)
    rows, previews = [], {}

    def add_row(source, sampler, steps, fill):
        started, metrics = time.perf_counter(), []
        for seed in settings.seeds:
            filled = fill(seed)
            metrics.append(region_metrics(lesions.images, filled, lesions.edits, window))
            previews.setdefault(f"{source} {sampler or ''} {steps or ''}".strip(), filled)
        rows.append({"source": source, "sampler": sampler, "steps": steps,
                     **{key: float(np.mean([m[key] for m in metrics]))
                        for key in ("psnr", "ssim", "w1", "speckle", "real_speckle")},
                     "seconds_per_slice": ((time.perf_counter() - started)
                                           / (len(settings.seeds) * len(lesions.images)))})

    for sampler, steps in tqdm(settings.samplers, desc="inpainting samplers", unit="sampler"):
        pipeline = inpaint_pipeline(unet, config, sampler, device)
        add_row("inpaint", sampler, steps, lambda seed, pipeline=pipeline, steps=steps: [
            np.stack(result.channel_images) for result in inpaint_slices(
                pipeline, window, lesions.images, lesions.label_maps, lesions.edits,
                [seed * 1_000_003 + i for i in range(len(lesions.images))], dtypes, steps, dataset.ignore_label,
                settings.batch_size)])
    add_row("copy-paste", None, None, lambda seed: copy_paste_fill(lesions, donors, donor_components, pathology, seed))
    if slice_generator is not None:
        add_row("whole-slice generator", "ddim", settings.slice_generator_steps,
                lambda seed: slice_generator_fill(lesions, slice_generator, dataset, seed,
                                                  settings.slice_generator_steps, device))
    return {"rows": rows, "slices": len(lesions.images), "held_out_cases": sorted({c for c, _ in lesions.map_ids}),
            "seeds": list(settings.seeds), "edit_margin": int(config.training["edit_margin"]),
            "edit_pixels": int(sum(int(e.sum()) for e in lesions.edits)), "lesions": lesions, "previews": previews,
            "window": window}


def format_fidelity_table(result: dict) -> str:
    """A Markdown table of the rows."""
    lines = ["| source | sampler | steps | PSNR (dB) | SSIM | W1 (dataset units) | speckle % (real) | s / slice |",
             "|---|---|---|---|---|---|---|---|"]
    for row in result["rows"]:
        lines.append(f"| {row['source']} | {row['sampler'] or '-'} | {row['steps'] or '-'} | {row['psnr']:.2f} | "
                     f"{row['ssim']:.3f} | {row['w1']:.2f} | {100 * row['speckle']:.2f} "
                     f"({100 * row['real_speckle']:.2f}) | {row['seconds_per_slice']:.2f} |")
    return "\n".join(lines)
