"""The generate step with a generator: label maps -> images -> quality -> synthetic pairs, for one dataset, one
nnU-Net fold and one generator (``fold_cases.py``: the fold's maps, resume, shards, store and summary).

Cross-validation: the cases made for fold ``k`` come from a generator trained on fold k's training cases only (a
generator that saw one of fold k's validation cases is refused) and their label maps from those cases only.
The whole-slice generator's cases are ``SliceBlocks``; an inpainting generator's are ``inpainting.InpaintBlocks``.
"""
import functools
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from nnunet_synth.copy_paste import display_windows, write_volume_preview
from nnunet_synth.dataset import ImageWindows, RawDataset, fit_slice, restore_slice
from nnunet_synth.dataset.native_slices import open_native_slices
from nnunet_synth.dataset.splits import fold_validation_cases
from nnunet_synth.errors import NnsynthError
from nnunet_synth.fold_cases import (
    FoldMaps,
    MadeCase,
    check_role_names,
    check_shard,
    prepare_fold_maps,
    resolve_unit,
    slice_counts,
    write_fold_cases,
    write_slice_preview,
)
from nnunet_synth.generator.checkpoints import load_generator, read_generator_config, resolve_generator_folder
from nnunet_synth.generator.data import MODEL_MINIMUM
from nnunet_synth.generator.inpaint_training import sampling_defaults
from nnunet_synth.inpainting import InpaintBlocks, write_inpaint_preview
from nnunet_synth.masks.settings import BalancingSettings
from nnunet_synth.sampling import sample_images
from nnunet_synth.writer.synthetic_store import SyntheticStore


@dataclass
class GenerationSettings:
    """What decides the synthetic cases; recorded in the manifest."""

    num_cases: int
    seed: int = 0
    num_inference_steps: int = 50
    target_share: float = None          # stop early once every pathology class has this share of the region
    noise_seeding_strength: float = None  # Paired Diffusion §2.5: start from the target's real slice noised to
                                          # this strength
    batch_size: int = 16
    balancing: BalancingSettings = field(default_factory=BalancingSettings)
    sampler: str = None                 # inpainting generators: ddim, dpmsolver++ or unipc (None: the default)
    unit: str = None                    # inpainting generators: slice or volume (None: volume for 3D data)
    volume_noise: str = "per-slice"     # unit volume: the crops' initial noise (sampling.inpaint.VOLUME_NOISES)
    clip_x0: bool = None                # inpainting generators: the clean-image estimate clipped to [-1, 1] at
                                        # every step (inpaint_pipeline.make_scheduler); None: not clipped, as
                                        # stores written before the clipping was recorded
    renoise_x0: bool = None             # inpainting generators: DPM-Solver++ steps from x_t re-noised from the
                                        # clipped estimate, on trailing timesteps (inpaint_pipeline.RENOISE);
                                        # None: not, as stores written before it was recorded

    def recipe(self, generator_folder) -> dict:
        """The fields that must agree between runs writing into one store (batch size does not matter); the unit
        and the volume noise are named when a case is a volume."""
        left_out = ("batch_size", "num_cases") + (() if self.unit == "volume" else ("unit", "volume_noise"))
        left_out += tuple(name for name in ("clip_x0", "renoise_x0")    # as stores written before they were recorded
                          if getattr(self, name) is None)
        recipe = {k: v for k, v in asdict(self).items() if k not in left_out}
        recipe["balancing"] = self.balancing.to_recipe()
        recipe["generator"] = str(Path(generator_folder).resolve())
        return recipe


def inpaint_sampling(store: SyntheticStore, fold, unit: str, sampler: str = None, num_inference_steps: int = None):
    """The ``GenerationSettings`` fields sampler, num_inference_steps, clip_x0 and renoise_x0 of an inpainting fold:
    the sampler and steps given; with neither given, those of the fold's recipe in ``store`` (a store resumes as it
    was written, whatever today's default); else ``sampling_defaults``, the estimate clipped and, for a solver of
    ``inpaint_pipeline.RENOISE``, re-noised."""
    recorded = store.manifest["folds"].get(str(fold), {}).get("settings") or {}
    if sampler is None and num_inference_steps is None and recorded.get("sampler") is not None:
        return {"sampler": recorded["sampler"], "num_inference_steps": recorded["num_inference_steps"],
                "clip_x0": recorded.get("clip_x0"), "renoise_x0": recorded.get("renoise_x0")}
    from nnunet_synth.generator.inpaint_pipeline import renoises
    sampler, num_inference_steps = sampling_defaults(unit, sampler, num_inference_steps)
    # renoise_x0 named only for a solver it changes, so a DDIM or UniPC fold's recipe is as it was before
    return {"sampler": sampler, "num_inference_steps": num_inference_steps, "clip_x0": True,
            "renoise_x0": True if renoises(sampler) else None}


def num_cases_for_ratio(dataset: RawDataset, generator_folder, amount: float, unit=None) -> int:
    """The number of cases for an amount (``-r``): ``amount`` synthetic cases per real slice of the generator's
    training cases, or per real volume when a case is a volume (``generation_unit``; at least 1)."""
    config = read_generator_config(resolve_generator_folder(generator_folder))
    slices = open_native_slices(dataset, config.training_cases)
    counts = slice_counts(slices)
    units = len(counts) if generation_unit(dataset, config.mode, counts, unit) == "volume" else len(slices)
    return max(1, round(amount * units))


def generation_unit(dataset: RawDataset, generator_mode: str, num_slices: dict, unit=None) -> str:
    """What one case of a generator's is: "slice" for the whole-slice generator; for an inpainting generator
    ``fold_cases.resolve_unit`` of the cases' slice counts ``num_slices`` (volume for 3D data)."""
    if generator_mode != "inpaint":
        if unit == "volume":
            raise NnsynthError("--unit volume needs --image-source copy-paste or inpaint: the whole-slice generator "
                               "draws slices")
        return "slice"
    return resolve_unit(dataset, num_slices, unit)


def check_generator_for_fold(dataset: RawDataset, generator_config, generator_folder, fold):
    """Refuse a generator that saw a validation case of ``fold`` (or a case the dataset does not have)."""
    unknown = sorted(set(generator_config.training_cases) - set(dataset.case_ids))
    if unknown:
        raise NnsynthError(f"{generator_folder} was trained on cases {unknown[:3]} that {dataset.name} does not have: "
                           f"use a generator trained on this dataset")
    seen = sorted(set(generator_config.training_cases) & set(fold_validation_cases(dataset, fold)))
    if seen:
        raise NnsynthError(f"{generator_folder} was trained on fold {fold}'s validation case(s) "
                           f"{', '.join(seen[:3])}{' ...' if len(seen) > 3 else ''} (it is a fold "
                           f"{generator_config.fold} generator), so its images would leak them into fold {fold}'s "
                           f"training: run nnsynth_generate {dataset.name} --fold {fold} without --generator, which "
                           f"trains a generator on fold {fold}'s training cases")


def generate_synthetic_cases(dataset: RawDataset, generator_folder, settings: GenerationSettings, fold=None,
                             device="cpu", overwrite=False, num_shards: int = 1, shard_index: int = 0) -> dict:
    """Make and write ``settings.num_cases`` synthetic pairs for nnU-Net fold ``fold`` (fewer if the target share
    is met first); with ``num_shards`` > 1 only shard ``shard_index``'s part of them. ``fold`` defaults to the
    generator's own fold; a generator that saw one of the fold's validation cases is refused.

    Returns a summary: counts written/skipped, the label-map report, quality pass rate and the preview path.
    """
    check_shard(num_shards, shard_index)
    generator_folder = resolve_generator_folder(generator_folder)
    unet, config = load_generator(generator_folder, dataset, device)
    fold = str(config.fold if fold is None else fold)
    check_generator_for_fold(dataset, config, generator_folder, fold)
    num_slices = slice_counts(open_native_slices(dataset, config.training_cases)) if config.mode == "inpaint" else {}
    settings = replace(settings, unit=generation_unit(dataset, config.mode, num_slices, settings.unit))
    store = SyntheticStore(dataset)
    check_role_names(dataset, settings.balancing)      # bad names fail before anything is removed
    if overwrite:
        if num_shards > 1:
            raise NnsynthError(f"--overwrite with --num-shards would let each shard remove the others' cases: "
                               f"remove fold {fold}'s cases first (nnsynth_clean {dataset.name} --fold {fold}), then "
                               f"start the shards without --overwrite")
        with store.exclusive_writer():
            store.remove_fold(fold)
    with store.shared_writer(), store.fold_writer(fold, settings.recipe(generator_folder), settings.batch_size,
                                                  num_shards, shard_index):
        return _generate_into_store(dataset, store, unet, config, generator_folder, settings, fold, device,
                                    num_shards, shard_index)


def _generate_into_store(dataset, store, unet, config, generator_folder, settings, fold, device, num_shards,
                         shard_index) -> dict:
    recipe = settings.recipe(generator_folder)     # claimed by fold_writer, checked against the cases on disk
    fold_maps = prepare_fold_maps(dataset, store, fold, recipe, config.training_cases, settings, settings.unit)
    generator_record = {"folder": str(generator_folder), "mode": config.mode, "preset": config.preset,
                        "trained_steps": config.trained_steps, "ablation_mode": config.ablation.get("mode")}
    if config.mode == "inpaint":      # lesions drawn inside the target's real slice (inpainting.py)
        make_cases = InpaintBlocks(unet, config, settings, fold_maps, generator_record, dataset.ignore_label, device)
        write_preview = functools.partial(write_inpaint_preview, dataset, store, fold, fold_maps.real, fold_maps)
        if settings.unit == "volume":
            write_preview = functools.partial(write_volume_preview, dataset, store, fold, fold_maps.real,
                                              display_windows(dataset, fold_maps.real.slices.images))
    else:
        make_cases = SliceBlocks(unet, config, settings, fold_maps, generator_record, device)
        write_preview = functools.partial(write_slice_preview, dataset, store, fold, fold_maps.real,
                                          ImageWindows.from_dict(config.window))
    return write_fold_cases(store, fold, fold_maps, make_cases, settings.seed, write_preview,
                            f"sampling synthetic cases ({settings.unit}s)", settings.batch_size, unit=settings.unit,
                            num_shards=num_shards, shard_index=shard_index)


class SliceBlocks:
    """Whole slices drawn by the mask-conditioned generator from the new maps fitted to its size (Diff-Lung)."""

    def __init__(self, unet, config, settings: GenerationSettings, fold_maps: FoldMaps, generator_record: dict,
                 device):
        self.unet, self.config, self.settings, self.device = unet, config, settings, device
        self.real, self.new_maps, self.image_dtypes = fold_maps.real, fold_maps.new_maps, fold_maps.image_dtypes
        self.window, self.generator_record = ImageWindows.from_dict(config.window), generator_record

    def __call__(self, batch, seeds) -> list:
        model_label_maps, references, fits = [], [], []
        for index in batch:
            target = self.new_maps[index].provenance["target"]
            real_image, _ = self.real.slice(target["case_id"], target["slice_index"])
            reference, model_map, fit = fit_slice(self.window.to_model(real_image), self.new_maps[index].label_map,
                                                  self.config.image_size, MODEL_MINIMUM)
            model_label_maps.append(model_map)
            references.append(reference)
            fits.append((fit, target["case_id"]))
        strength = self.settings.noise_seeding_strength
        generated = sample_images(self.unet, self.config, np.stack(model_label_maps), seeds,
                                  num_inference_steps=self.settings.num_inference_steps, batch_size=len(batch),
                                  device=self.device, progress=False,
                                  reference_images=None if strength is None else np.stack(references),
                                  strength=strength)
        made = []
        for seed, generated_image, model_map, (fit, target_case) in zip(seeds, generated, model_label_maps, fits):
            # The label written is the conditioning map taken back to the slice's geometry (nearest), not the full
            # resolution map: below the slice size, a small pasted region can vanish when the map is fitted, and
            # would then be in the written label but not in the image.
            restored, label_map = restore_slice(generated_image, model_map, fit)
            made.append(MadeCase(self.window.from_model(restored, self.image_dtypes[target_case]), label_map,
                                 {"seed": seed, "generator": self.generator_record,
                                  "sampler": {"scheduler": "DDIM",
                                              "num_inference_steps": self.settings.num_inference_steps,
                                              "conditioning_size": self.config.image_size,
                                              "noise_seeding_strength": strength}}))
        return made
