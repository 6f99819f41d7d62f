"""The generate step: label maps -> images -> quality -> synthetic pairs, for one dataset, one nnU-Net fold and
one generator.

Cross-validation: the cases made for fold ``k`` come from a generator trained on fold k's training cases only,
and their label maps from those cases only, so none of them depends on a validation case of fold k (checked
before anything is written; the dependencies are recorded, see ``provenance.py``). Several folds' cases live side
by side in one store.

Reruns resume: the label maps are seeded, so case ``synth_f<k>_<i>`` is always made from the same new map and
seed; cases already complete in the store are skipped. Settings that differ from those of the fold's cases
already written are refused (use ``overwrite`` or ``nnsynth_clean``) so that one fold never mixes two recipes.

Sharding: the cases are sampled in fixed blocks of ``batch_size`` consecutive indices (a case's noise is a pure
function of (seed, index), and a block is always sampled whole, so its batch never changes); shard ``i`` of
``n`` makes blocks ``i, i + n, ...``. Shards may run at once on one store, so the union of the shards' cases is
byte-identical to a one-process run with the same seed and batch size, and each shard resumes on its own.
"""
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from nnunet_synth.dataset import ImageWindows, RawDataset, fit_slice, restore_slice
from nnunet_synth.dataset.native_slices import NativeSlices, NativeVolumes, PackedRows, derived_rows, open_native_slices
from nnunet_synth.dataset.splits import fold_validation_cases
from nnunet_synth.errors import NnsynthError
from nnunet_synth.generator.checkpoints import load_generator, read_generator_config, resolve_generator_folder
from nnunet_synth.masks import (
    MaskGenerationConfig,
    NewLabelMapsOnDisk,
    body_mask,
    check_goals_raised,
    generate_label_maps,
    pixel_counts,
    resolve_class_roles,
)
from nnunet_synth.preview_grid import save_preview_grid
from nnunet_synth.provenance import GENERATOR_TRAINING_CASES, SOURCE_CASES, label_map_source_cases
from nnunet_synth.quality.model_free import channel_gates_to_dict, fit_channel_gates, model_free_channel_score
from nnunet_synth.sampling import sample_images
from nnunet_synth.writer.synthetic_store import SyntheticStore, synthetic_case_id

MODEL_MINIMUM = -1.0
PREVIEW_ROWS = 6


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
    balancing: dict = None              # class roles (label names) and MaskGenerationConfig overrides
    sampler: str = None                 # inpainting generators: ddim, dpmsolver++ or unipc (None: the default)

    def recipe(self, generator_folder) -> dict:
        """The fields that must agree between runs writing into one store (batch size does not matter)."""
        recipe = {k: v for k, v in asdict(self).items() if k not in ("batch_size", "num_cases")}
        recipe["generator"] = str(Path(generator_folder).resolve())
        return recipe


def first_channel_body_mask(image: np.ndarray) -> np.ndarray:
    return body_mask(image[0])


def num_cases_for_ratio(dataset: RawDataset, generator_folder, ratio: float) -> int:
    """``ratio`` synthetic cases per real slice of the generator's training cases (at least 1)."""
    config = read_generator_config(resolve_generator_folder(generator_folder))
    return max(1, round(ratio * len(open_native_slices(dataset, config.training_cases))))


def check_role_names(dataset: RawDataset, balancing=None):
    """Refuse class names in ``balancing`` that are not labels, or that name nnU-Net's ignore label."""
    balancing = balancing or {}
    for role in ("host_classes", "pathology_classes"):
        names = balancing.get(role) or []
        if dataset.ignore_label is not None and "ignore" in names:
            raise NnsynthError(f"{dataset.json_file}: 'ignore' marks unannotated pixels (nnU-Net's ignore "
                               f"label); it cannot be one of the {role.replace('_', ' ')}: name other labels")
        unknown = [name for name in names if name not in dataset.labels]
        if unknown:
            raise NnsynthError(f"{dataset.json_file}: {role.replace('_', ' ')} {unknown} are not labels (labels: "
                               f"{list(dataset.labels)}): use label names")


def class_roles(dataset: RawDataset, label_maps, balancing=None):
    """Host and pathology classes (values): named in ``balancing`` (label names; host ``[]`` = none), else the
    defaults of ``nnunet_synth.masks.default_class_roles``. nnU-Net's ignore label (unannotated pixels) is never
    either: it is not counted, never copied and never pasted over, so new maps keep it where their target had it."""
    check_role_names(dataset, balancing)
    balancing = balancing or {}
    labels, counts = dict(dataset.labels), pixel_counts(label_maps, dataset.num_classes)
    if dataset.ignore_label is not None:
        del labels["ignore"]
        counts[dataset.ignore_label] = 0
    return resolve_class_roles(labels, counts, balancing.get("host_classes"), balancing.get("pathology_classes"),
                               source=str(dataset.json_file))


@dataclass
class FoldMaps:
    """A fold's balanced label maps and what they were made from (``prepare_fold_maps``)."""

    real: NativeSlices                  # or NativeVolumes (unit "volume")
    new_maps: NewLabelMapsOnDisk        # NewLabelMap, in case index order
    report: dict                        # the label-map report
    gates: list                         # model-free gate per image channel
    host: list                          # host class values
    pathology: list                     # pathology class values
    mask_config: MaskGenerationConfig
    body_masks: PackedRows              # per real map (datasets without a host class), else None


def prepare_fold_maps(dataset: RawDataset, store: SyntheticStore, fold, recipe: dict, training_cases,
                      settings, unit: str = "slice") -> FoldMaps:
    """Record the fold's recipe and training cases, make its balanced label maps from those cases only and fit
    its model-free gates on their slices; the fold record is saved. Shared by generated and copy-paste cases
    (``settings``: num_cases, seed, target_share, balancing). ``unit`` "volume": the maps are the cases' whole
    volumes (``FoldMaps.real`` is a ``NativeVolumes``)."""
    store.prepare()
    fold_record = store.fold_record(fold)
    fold_record["settings"] = recipe
    # targets and donors of the new maps come from these cases only (provenance.py)
    fold_record[GENERATOR_TRAINING_CASES] = sorted(training_cases)

    slices = open_native_slices(dataset, training_cases)    # read on demand from the on-disk store
    real = NativeVolumes(slices) if unit == "volume" else slices
    host, pathology = class_roles(dataset, real.label_maps, settings.balancing)
    mask_config = MaskGenerationConfig(**{k: v for k, v in (settings.balancing or {}).items() if "classes" not in k})
    body_masks = None if host else derived_rows(real.images, first_channel_body_mask, "body masks")
    new_maps, mask_report = generate_label_maps(
        real.label_maps, real.map_ids, host_classes=host, pathology_classes=pathology,
        target_share=settings.target_share, max_new_maps=settings.num_cases, seed=settings.seed,
        num_classes=dataset.num_classes, config=mask_config, body_masks=body_masks,
        stop_at_target=settings.target_share is not None,   # without a share target the budget decides
        new_maps=NewLabelMapsOnDisk(), ignore_label=dataset.ignore_label)
    check_goals_raised(mask_report, dataset.json_file)
    quality_gates = fit_channel_gates(slices.images, slices.label_maps)    # on the fold's training slices
    fold_record["label_map_report"] = mask_report
    fold_record["model_free_gate"] = channel_gates_to_dict(quality_gates)
    store.save_manifest()
    return FoldMaps(real, new_maps, mask_report, quality_gates, host, pathology, mask_config, body_masks)


def _check_recipe(store: SyntheticStore, fold, recipe: dict):
    store.check_fold_recipe(fold, recipe)


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


def check_shard(num_shards: int, shard_index: int):
    if num_shards < 1 or not 0 <= shard_index < num_shards:
        raise NnsynthError(f"--shard-index must lie in [0, --num-shards - 1] and --num-shards be at least 1, got "
                           f"shard {shard_index} of {num_shards}")


def shard_blocks(num_cases: int, batch_size: int, num_shards: int = 1, shard_index: int = 0) -> list:
    """The case indices of shard ``shard_index``, as the fixed blocks of ``batch_size`` it samples."""
    blocks = [list(range(start, min(start + batch_size, num_cases))) for start in range(0, num_cases, batch_size)]
    return blocks[shard_index::num_shards]


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
    window = ImageWindows.from_dict(config.window)
    recipe = settings.recipe(generator_folder)     # claimed by fold_writer, checked against the cases on disk
    fold_maps = prepare_fold_maps(dataset, store, fold, recipe, config.training_cases, settings)
    real, new_maps, mask_report, quality_gates = (fold_maps.real, fold_maps.new_maps, fold_maps.report,
                                                  fold_maps.gates)

    image_dtypes = {case_id: [dataset.source_dtype(case_id, channel) for channel in range(dataset.num_channels)]
                    for case_id in config.training_cases}
    if config.mode == "inpaint":      # lesions drawn inside the target's real slice (inpainting.py)
        from nnunet_synth.inpainting import InpaintBlocks
        sample_block = InpaintBlocks(unet, config, settings, real, new_maps, image_dtypes, dataset.ignore_label,
                                     device)
    else:
        sample_block = SliceBlocks(unet, config, settings, real, new_maps, image_dtypes, device)
    generator_record = {"folder": str(generator_folder), "mode": config.mode, "preset": config.preset,
                        "trained_steps": config.trained_steps, "ablation_mode": config.ablation.get("mode")}
    blocks = shard_blocks(len(new_maps), settings.batch_size, num_shards, shard_index)
    todo = [block for block in blocks if not all(store.is_complete(synthetic_case_id(i, fold)) for i in block)]
    written = 0
    progress = tqdm(total=sum(len(block) for block in todo), desc="sampling synthetic cases", unit="case")
    for batch in todo:        # a whole block, even when some of its cases are done: its batch never changes
        seeds = [settings.seed * 1_000_003 + index for index in batch]
        for index, seed, made in zip(batch, seeds, sample_block(batch, seeds)):
            if store.is_complete(synthetic_case_id(index, fold)):
                progress.update(1)
                continue
            target_case = new_maps[index].provenance["target"]["case_id"]
            entry = {
                "fold": fold,
                SOURCE_CASES: label_map_source_cases(new_maps[index].provenance),
                "source": new_maps[index].provenance,
                "seed": seed,
                "generator": generator_record,
                **made.record,
                "quality": {"model_free": model_free_channel_score(
                    np.stack(made.channel_images).astype(np.float32), made.label_map, quality_gates)},
            }
            store.write_case(synthetic_case_id(index, fold), made.channel_images, made.label_map,
                             real.properties[target_case], image_dtypes[target_case], entry)
            written += 1
            progress.update(1)
    progress.close()
    store.save_manifest()       # the index of every record, compiled once per run

    if config.mode == "inpaint":
        from nnunet_synth.inpainting import write_inpaint_preview
        preview_path = write_inpaint_preview(dataset, store, fold, real, fold_maps)
    else:
        preview_path = write_generation_preview(dataset, store, fold, real, window)
    fold_cases = store.complete_case_ids(fold)
    passed = [c for c in fold_cases if store.cases[c].get("quality", {}).get("model_free", {}).get("passed")]
    shard_cases = sum(len(block) for block in blocks)
    return {"fold": fold, "written": written, "skipped": shard_cases - written, "total": len(fold_cases),
            "label_map_report": mask_report, "model_free_passed": len(passed), "preview": str(preview_path),
            "store": str(store.manifest_file)}


@dataclass
class MadeCase:
    """One synthetic case of a block: its image channels (dataset units and pixel types), its label map and what
    the manifest records of how it was made (``sampler`` and the like)."""

    channel_images: list
    label_map: np.ndarray
    record: dict


class SliceBlocks:
    """Whole slices drawn by the mask-conditioned generator from the new maps fitted to its size (Diff-Lung)."""

    def __init__(self, unet, config, settings: GenerationSettings, real: NativeSlices, new_maps, image_dtypes,
                 device):
        self.unet, self.config, self.settings, self.real, self.new_maps = unet, config, settings, real, new_maps
        self.window, self.image_dtypes, self.device = ImageWindows.from_dict(config.window), image_dtypes, device

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
        for generated_image, model_map, (fit, target_case) in zip(generated, model_label_maps, fits):
            # The label written is the conditioning map taken back to the slice's geometry (nearest), not the full
            # resolution map: below the slice size, a small pasted region can vanish when the map is fitted, and
            # would then be in the written label but not in the image.
            restored, label_map = restore_slice(generated_image, model_map, fit)
            made.append(MadeCase(self.window.from_model(restored, self.image_dtypes[target_case]), label_map,
                                 {"sampler": {"scheduler": "DDIM",
                                              "num_inference_steps": self.settings.num_inference_steps,
                                              "conditioning_size": self.config.image_size,
                                              "noise_seeding_strength": strength}}))
        return made


def write_generation_preview(dataset: RawDataset, store: SyntheticStore, fold, real: NativeSlices,
                             window: ImageWindows, num_rows=PREVIEW_ROWS):
    """Grid: target real slice with its label | new label map | synthetic image | synthetic with overlay.
    Images are shown in model space (each channel through its own window), channels side by side."""
    reader = dataset.reader_writer()
    rows = []
    for case_id in store.complete_case_ids(fold)[:num_rows]:
        target = store.cases[case_id]["source"]["target"]
        real_image, real_label_map = real.slice(target["case_id"], target["slice_index"])
        synthetic_image = window.to_model(reader.read_images([str(p) for p in store.image_files(case_id)])[0][:, 0])
        synthetic_label = reader.read_seg(str(store.label_file(case_id)))[0][0, 0].astype(int)
        rows.append([(window.to_model(real_image), real_label_map), (None, synthetic_label),
                     (synthetic_image, None), (synthetic_image, synthetic_label)])
    path = store.preview_file(fold)
    if rows:
        save_preview_grid(rows, ["real target + labels", "new label map", "synthetic", "synthetic + labels"],
                          path, dataset.num_classes, window=(-1.0, 1.0))
    return path
