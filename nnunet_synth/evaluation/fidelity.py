"""Fidelity (method.md §5): generate from the label maps of held-out real slices and compare with the real slice.

Held-out slices are those of the dataset's cases that the generator did not see (its checkpoint lists its
training cases; for a generator of fold F these are fold F's validation cases). Each slice is generated from
its own label map with several seeds, and compared in model space ([-1, 1], the generator's size), channel by
channel for multi-channel data (the figures are the means over channels; ``*_channel<k>`` keys give each):

- PSNR and SSIM (torchmetrics, data range 2) over the whole slice, and inside the labelled region
  (label > 0: PSNR of the region's pixels, mean of the SSIM map over the region);
- per class, the 1-Wasserstein distance between the real and the synthetic intensity distributions, in the
  dataset's units (scipy.stats.wasserstein_distance);
- optionally a Frechet feature distance (torchmetrics' FID with a custom feature extractor) on the bottleneck
  features of an nnU-Net network trained on the real data: a network we have locally, where FID's Inception
  would need hub weights. Few slices give a rank-deficient covariance: compare it between generators on the
  same slices, not with published FIDs.
"""
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy.stats import wasserstein_distance
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure
from tqdm import tqdm

from nnunet_synth.dataset import ImageWindows, RawDataset
from nnunet_synth.errors import NnsynthError
from nnunet_synth.generator.checkpoints import load_generator
from nnunet_synth.generator.config import DDIM_INFERENCE_STEPS
from nnunet_synth.generator.data import load_model_slices
from nnunet_synth.sampling import sample_images

MODEL_DATA_RANGE = 2.0   # model space is [-1, 1]


@dataclass
class FidelitySettings:
    seeds: tuple = (0, 1, 2)
    num_inference_steps: int = DDIM_INFERENCE_STEPS
    max_slices: int = None            # evaluate at most this many held-out slices (evenly spread)
    batch_size: int = 16
    labelled_slices_only: bool = True  # skip slices whose label map is all background
    extra: dict = field(default_factory=dict)


def held_out_case_ids(dataset: RawDataset, generator_config) -> list:
    held_out = sorted(set(dataset.case_ids) - set(generator_config.training_cases))
    if not held_out:
        raise NnsynthError(f"the generator was trained on every case of {dataset.name}: fidelity needs held-out "
                           f"cases; train it on one fold (nnsynth_train_generator {dataset.name} --fold 0)")
    return held_out


def slice_fidelity(real: np.ndarray, synthetic: np.ndarray, label_map: np.ndarray) -> dict:
    """PSNR/SSIM of one (C, S, S) pair in model space, whole slice and inside label > 0: means over the channels,
    and per channel (``psnr_channel1`` ...) when there are several."""
    per_channel = [channel_fidelity(r, s, label_map) for r, s in zip(real, synthetic)]
    metrics = {key: float(np.mean([m[key] for m in per_channel])) for key in per_channel[0]}
    if len(per_channel) > 1:
        for channel, channel_metrics in enumerate(per_channel):
            metrics.update({f"{key}_channel{channel}": value for key, value in channel_metrics.items()})
    return metrics


def channel_fidelity(real: np.ndarray, synthetic: np.ndarray, label_map: np.ndarray) -> dict:
    """PSNR/SSIM of one (S, S) channel pair in model space, whole slice and inside label > 0."""
    real_t = torch.from_numpy(real.astype(np.float32))[None, None]
    synthetic_t = torch.from_numpy(synthetic.astype(np.float32))[None, None]
    ssim, ssim_map = structural_similarity_index_measure(synthetic_t, real_t, data_range=MODEL_DATA_RANGE,
                                                         return_full_image=True)
    region = torch.from_numpy(label_map > 0)
    metrics = {"psnr": float(peak_signal_noise_ratio(synthetic_t, real_t, data_range=MODEL_DATA_RANGE)),
               "ssim": float(ssim)}
    if region.any():
        metrics["psnr_region"] = float(peak_signal_noise_ratio(synthetic_t[0, 0][region], real_t[0, 0][region],
                                                               data_range=MODEL_DATA_RANGE))
        metrics["ssim_region"] = float(ssim_map[0, 0][region].mean())
    return metrics


def class_intensity_distances(real_images, synthetic_images, label_maps, windows: ImageWindows,
                              classes) -> list:
    """Per channel, per class value in ``classes``: 1-Wasserstein distance of real vs synthetic pixel
    intensities, in that channel's dataset units. Images (N, C, S, S) in model space."""
    per_channel = []
    for channel, window in enumerate(windows.channels):
        distances = {}
        scale = (window.upper - window.lower) / 2.0      # model space -> dataset units
        for value in classes:
            real_values = np.concatenate([image[channel][label_map == value]
                                          for image, label_map in zip(real_images, label_maps)])
            if real_values.size == 0:
                continue
            synthetic_values = np.concatenate([image[channel][label_map == value]
                                               for image, label_map in zip(synthetic_images, label_maps)])
            distances[value] = float(wasserstein_distance(real_values, synthetic_values) * scale)
        per_channel.append(distances)
    return per_channel


def select_held_out_slices(images, label_maps, provenance, settings: FidelitySettings):
    keep = [i for i in range(len(images)) if not settings.labelled_slices_only or label_maps[i].any()]
    if settings.max_slices is not None and len(keep) > settings.max_slices:
        keep = [keep[int(round(j))] for j in np.linspace(0, len(keep) - 1, settings.max_slices)]
    if not keep:
        raise NnsynthError("no held-out slice has a label: nothing to generate from")
    return images[keep], label_maps[keep], [provenance[i] for i in keep]


def evaluate_generator_fidelity(dataset: RawDataset, generator_folder, settings: FidelitySettings, device="cpu",
                                feature_extractor=None) -> dict:
    """Fidelity of one generator on the dataset's held-out slices; returns means and per-slice rows.

    ``feature_extractor``: a ``FeatureDistance`` (see ``features.py``) or None.
    """
    unet, config = load_generator(generator_folder, dataset, device)
    window = ImageWindows.from_dict(config.window)
    cases = held_out_case_ids(dataset, config)
    region_values = None
    if config.region_classes:
        region_values = [dataset.labels[name] for name in config.region_classes]
    images, label_maps, provenance = load_model_slices(dataset, cases, window, config.image_size, region_values)
    images, label_maps, provenance = select_held_out_slices(images, label_maps, provenance, settings)
    rows, synthetic_all = [], []
    for seed in tqdm(settings.seeds, desc=f"fidelity of {generator_folder}", unit="seed"):
        seeds = [seed * 1_000_003 + i for i in range(len(images))]
        synthetic = sample_images(unet, config, label_maps, seeds, num_inference_steps=settings.num_inference_steps,
                                  batch_size=settings.batch_size, device=device, progress=False)
        synthetic_all.append(synthetic)
        for index, (real, generated, label_map) in enumerate(zip(images, synthetic, label_maps)):
            case_id, slice_index, _ = provenance[index]
            rows.append({"case_id": case_id, "slice_index": int(slice_index), "seed": seed,
                         **slice_fidelity(real, generated, label_map)})
    synthetic_stack = np.concatenate(synthetic_all)
    repeated_labels = np.concatenate([label_maps] * len(settings.seeds))
    repeated_real = np.concatenate([images] * len(settings.seeds))
    summary = {key: float(np.mean([row[key] for row in rows if key in row]))
               for key in ("psnr", "ssim", "psnr_region", "ssim_region")}
    per_channel_w1 = class_intensity_distances(repeated_real, synthetic_stack, repeated_labels, window,
                                               dataset.annotated_labels)
    summary["class_intensity_w1"] = per_channel_w1[0]
    if len(per_channel_w1) > 1:
        summary["class_intensity_w1_per_channel"] = per_channel_w1
    if feature_extractor is not None:
        def dataset_units(model_images):
            return np.stack([np.stack(window.from_model(image, [np.float32] * window.num_channels))
                             for image in model_images])
        summary["feature_distance"] = feature_extractor.distance(dataset_units(images),
                                                                 dataset_units(synthetic_stack))
    summary.update({"slices": len(images), "seeds": list(settings.seeds), "held_out_cases": cases,
                    "ablation_mode": config.ablation.get("mode"), "trained_steps": config.trained_steps,
                    "image_size": config.image_size, "num_inference_steps": settings.num_inference_steps})
    return {"summary": summary, "rows": rows, "real": images, "synthetic": synthetic_stack, "label_maps": label_maps}
