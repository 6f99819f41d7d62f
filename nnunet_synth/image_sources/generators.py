"""What the two generator image sources share (``GeneratorSource``): the settings of their cases, the checks of a
generator against the fold and the source, and the write of a fold's cases: label maps -> images -> quality ->
synthetic pairs, for one dataset, one nnU-Net fold and one generator (``fold_cases.py``: the fold's maps, resume,
shards, store and summary).

Cross-validation: the cases made for fold ``k`` come from a generator trained on fold k's training cases only (a
generator that saw one of fold k's validation cases is refused) and their label maps from those cases only.
"""
import functools
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from nnunet_synth.dataset import RawDataset
from nnunet_synth.dataset.native_slices import open_native_slices
from nnunet_synth.dataset.splits import fold_validation_cases
from nnunet_synth.dataset.validation import (
    MAX_BATCH_SIZE,
    check_device,
    check_inference_steps,
    check_int_range,
    check_number_range,
)
from nnunet_synth.errors import NnsynthError
from nnunet_synth.fold_cases import check_role_names, check_shard, prepare_fold_maps, slice_counts, write_fold_cases
from nnunet_synth.generator.checkpoints import load_generator, resolve_generator_folder
from nnunet_synth.generator.config import DDIM_INFERENCE_STEPS
from nnunet_synth.image_sources.base import ImageSource
from nnunet_synth.masks.settings import BalancingSettings
from nnunet_synth.writer.synthetic_store import SyntheticStore


@dataclass
class GenerationSettings:
    """What decides the synthetic cases; recorded in the manifest."""

    num_cases: int
    seed: int = 0
    num_inference_steps: int = DDIM_INFERENCE_STEPS
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


@dataclass
class LoadedGenerator:
    """A generator ready to sample: its UNet, its ``generator_config.json`` and what a case records of it."""

    unet: object
    config: object
    record: dict


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



class GeneratorSource(ImageSource):
    """An image source that samples a trained generator of mode ``generator_mode``."""

    def check_options(self, request):
        check_device(request.device)
        check_inference_steps(request.num_inference_steps)
        check_int_range(request.batch_size, "--batch-size", 1, MAX_BATCH_SIZE)
        check_number_range(request.noise_seeding_strength, "--noise-seeding", 0, 1, low_open=True)
        check_int_range(request.train_steps, "--train-steps", 1)
        if request.generator is not None and len(request.folds) > 1:
            raise NnsynthError(f"--generator serves one fold (a generator sees one fold's training cases), got folds "
                               f"{' '.join(request.folds)}: leave out --generator to train one per fold")
        if request.overwrite and request.num_shards > 1:
            raise NnsynthError("--overwrite with --num-shards would let each shard remove the others' cases: remove "
                               "the fold's cases first (nnsynth_clean D --fold F), then start the shards without "
                               "--overwrite")

    def check_generator(self, generator_folder, config):
        """Refuse a generator of another mode than this source samples."""
        if config.mode != self.generator_mode:
            from nnunet_synth.image_sources import source_of_generator
            raise NnsynthError(f"{generator_folder} holds a {config.mode} generator, --image-source {self.name} needs "
                               f"a {self.generator_mode} one: use --image-source "
                               f"{source_of_generator(config.mode).name} with it, or leave out --generator to train "
                               f"one")

    def recipe(self, settings: GenerationSettings, generator_folder=None) -> dict:
        return settings.recipe(generator_folder)

    def write_cases(self, dataset: RawDataset, settings: GenerationSettings, fold, generator_folder=None,
                    device="cpu", overwrite=False, num_shards: int = 1, shard_index: int = 0) -> dict:
        """``fold`` defaults to the generator's own fold; a generator that saw one of the fold's validation cases,
        or one of another mode, is refused; with ``num_shards`` > 1 only shard ``shard_index``'s part is made."""
        check_shard(num_shards, shard_index)
        generator_folder = resolve_generator_folder(generator_folder)
        unet, config = load_generator(generator_folder, dataset, device)
        self.check_generator(generator_folder, config)
        fold = str(config.fold if fold is None else fold)
        check_generator_for_fold(dataset, config, generator_folder, fold)
        num_slices = slice_counts(open_native_slices(dataset, config.training_cases))
        settings = replace(settings, unit=self.unit(dataset, num_slices, settings.unit))
        store = SyntheticStore(dataset)
        check_role_names(dataset, settings.balancing)      # bad names fail before anything is removed
        if overwrite:
            if num_shards > 1:
                raise NnsynthError(f"--overwrite with --num-shards would let each shard remove the others' cases: "
                                   f"remove fold {fold}'s cases first (nnsynth_clean {dataset.name} --fold {fold}), "
                                   f"then start the shards without --overwrite")
            with store.exclusive_writer():
                store.remove_fold(fold)
        recipe = settings.recipe(generator_folder)
        with store.shared_writer(), store.fold_writer(fold, recipe, settings.batch_size, num_shards, shard_index):
            # the recipe claimed by fold_writer, checked against the cases on disk
            fold_maps = prepare_fold_maps(dataset, store, fold, recipe, config.training_cases, settings,
                                          settings.unit)
            generator = LoadedGenerator(unet, config, {
                "folder": str(generator_folder), "mode": config.mode, "preset": config.preset,
                "trained_steps": config.trained_steps, "ablation_mode": config.ablation.get("mode")})
            write_preview = functools.partial(self.preview, dataset, store, fold, fold_maps, settings, generator)
            blocks = self.blocks(dataset, settings, fold_maps, generator, device)
            return write_fold_cases(store, fold, fold_maps, blocks, settings.seed, write_preview,
                                    f"sampling synthetic cases ({settings.unit}s)", settings.batch_size,
                                    unit=settings.unit, num_shards=num_shards, shard_index=shard_index)
