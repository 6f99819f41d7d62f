"""A fold's synthetic cases, whatever makes their images: the fold's balanced label maps (``prepare_fold_maps``),
then ``write_fold_cases``, which asks an image source for the cases of each block of new maps and writes them.

Cross-validation: the cases made for fold ``k`` come from fold k's training cases only (the label maps, the
model-free gate and, for the generators, the generator's training), so none of them depends on a validation case
of fold k (the dependencies are recorded, see ``provenance.py``). Several folds' cases live side by side in one
store.

Reruns resume: the label maps are seeded, so case ``synth_f<k>_<i>`` is always made from the same new map and
seed; cases already complete in the store are skipped. A recipe that differs from that of the fold's cases
already written is refused (use ``overwrite`` or ``nnsynth_clean``) so that one fold never mixes two recipes.

Sharding: the cases are made in fixed blocks of ``batch_size`` consecutive indices (a case's noise is a pure
function of (seed, index), and a block is always made whole, so its batch never changes); shard ``i`` of ``n``
makes blocks ``i, i + n, ...``. Shards may run at once on one store, so the union of the shards' cases is
byte-identical to a one-process run with the same seed and batch size, and each shard resumes on its own.

An image source (``image_sources/``) hands over a block source, ``blocks(batch, seeds) -> list[MadeCase]``: the
cases of the new maps with indices ``batch``, one ``MadeCase`` each. It only makes images; the maps, resume,
scores, store and summary are here.
"""
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from nnunet_synth.dataset import RawDataset
from nnunet_synth.dataset.native_slices import NativeSlices, NativeVolumes, PackedRows, derived_rows, open_native_slices
from nnunet_synth.dataset.raw_dataset import UNITS
from nnunet_synth.dataset.validation import scan_dataset
from nnunet_synth.errors import NnsynthError
from nnunet_synth.masks import (
    MaskGenerationConfig,
    NewLabelMapsOnDisk,
    body_mask,
    check_goals_raised,
    default_class_roles,
    generate_label_maps,
    pixel_counts,
    resolve_class_roles,
)
from nnunet_synth.masks.balance import Placement
from nnunet_synth.masks.settings import BalancingSettings
from nnunet_synth.provenance import GENERATOR_TRAINING_CASES, SOURCE_CASES, label_map_source_cases
from nnunet_synth.quality.edit_gate import EditGate, edit_gate_score, fit_edit_gate, joined_quality
from nnunet_synth.quality.model_free import channel_gates_to_dict, fit_channel_gates, model_free_channel_score
from nnunet_synth.writer.synthetic_store import SyntheticStore, synthetic_case_id


def check_role_names(dataset: RawDataset, balancing: BalancingSettings):
    """Refuse class names in ``balancing`` that are not labels, or that name nnU-Net's ignore label."""
    for role, names in (("host_classes", balancing.host_classes), ("pathology_classes", balancing.pathology_classes)):
        names = names or []
        if dataset.ignore_label is not None and "ignore" in names:
            raise NnsynthError(f"{dataset.json_file}: 'ignore' marks unannotated pixels (nnU-Net's ignore "
                               f"label); it cannot be one of the {role.replace('_', ' ')}: name other labels")
        unknown = [name for name in names if name not in dataset.labels]
        if unknown:
            raise NnsynthError(f"{dataset.json_file}: {role.replace('_', ' ')} {unknown} are not labels (labels: "
                               f"{list(dataset.labels)}): use label names")


def class_roles_from_counts(dataset: RawDataset, counts, balancing: BalancingSettings, dataset_counts=None):
    """Host and pathology classes (values) from pixel counts per label value (a fold's training cases). nnU-Net's
    ignore label (unannotated pixels) is never either: it is not counted, never copied and never pasted over, so
    new maps keep it where their target had it.

    A declared class without a pixel here (absent from the fold's training cases) is a pathology class with nothing
    to balance. Whether the class that is left is a host (normal lung) or a lesion type cannot be told from the
    fold alone, so then the default host is that of ``dataset_counts`` (every case of the dataset): only which
    class plays which role, no pixel of another case, reaches the fold."""
    check_role_names(dataset, balancing)
    labels = dict(dataset.labels)
    counts = _annotated_counts(dataset, counts)
    declared = [value for value in labels.values() if value != 0 and value != dataset.ignore_label]
    host_names = balancing.host_classes
    absent = [value for value in declared if counts[value] == 0]
    if absent and host_names is None and dataset_counts is not None and \
            _annotated_counts(dataset, dataset_counts)[1:].any():
        named = set(balancing.pathology_classes or [])
        whole_host, _ = default_class_roles(_annotated_counts(dataset, dataset_counts))
        names = {value: name for name, value in labels.items()}
        host_names = [names[value] for value in whole_host if names[value] not in named and counts[value] > 0]
    if not counts[1:].any():        # nothing annotated: the roles as named, every other class a pathology class
        host = sorted(labels[name] for name in host_names or [])
        named = balancing.pathology_classes
        return host, sorted(labels[name] for name in named) if named else [v for v in sorted(declared) if v not in host]
    if dataset.ignore_label is not None:
        del labels["ignore"]
    return resolve_class_roles(labels, counts, host_names, balancing.pathology_classes,
                               source=str(dataset.json_file), declared=declared)


def _annotated_counts(dataset: RawDataset, counts) -> np.ndarray:
    counts = np.array(counts, dtype=np.int64)
    if dataset.ignore_label is not None:
        counts[dataset.ignore_label] = 0
    return counts


def slice_counts(slices: NativeSlices) -> dict:
    """{case id: its number of slices} of a store of real slices."""
    return {case_id: len(rows) for case_id, rows in slices.case_rows().items()}


def resolve_unit(dataset: RawDataset, num_slices: dict, unit=None) -> str:
    """``unit``, else the dataset's declared unit (``RawDataset.declared_unit``: "slice" for stacks of independent
    slices), else "volume" when one of the cases (``num_slices``: case id -> its slices) has more than one slice (3D
    data) and "slice" otherwise; "volume" on data whose every case is one slice is refused."""
    unit = unit or dataset.declared_unit
    is_3d = any(count > 1 for count in num_slices.values())
    if unit is None:
        return "volume" if is_3d else "slice"
    if unit not in UNITS:
        raise NnsynthError(f"--unit {unit}: choose one of {', '.join(UNITS)}")
    if unit == "volume" and not is_3d:
        raise NnsynthError(f"{dataset.json_file}: --unit volume needs 3D cases, but every case of {dataset.name} is "
                           f"one slice: leave out --unit (a case is then one slice)")
    return unit


def first_channel_body_mask(image: np.ndarray) -> np.ndarray:
    return body_mask(image[0])


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
    image_dtypes: dict                  # case id -> pixel type of each image channel's file
    edit_gate: EditGate = None          # the edit gate (None: the training cases hold no lesion component)

    def placement(self):
        """Where pastes may land on a dataset without a host class (``balance.Placement``); None with one."""
        if self.host:
            return None
        return Placement(self.real.label_maps, self.real.map_ids, [], self.pathology, self.mask_config,
                         self.body_masks)


def prepare_fold_maps(dataset: RawDataset, store: SyntheticStore, fold, recipe: dict, training_cases,
                      settings, unit: str = "slice") -> FoldMaps:
    """Check ``recipe`` against the fold's cases on disk and record it with the fold's training cases, make its
    balanced label maps from those cases only and fit its model-free gates on their slices; the fold record is
    saved. ``settings``: num_cases, seed, target_share, balancing (a ``BalancingSettings``). ``unit`` "volume": the
    maps are the cases' whole volumes (``FoldMaps.real`` is a ``NativeVolumes``)."""
    store.check_fold_recipe(fold, recipe)
    store.prepare()
    fold_record = store.fold_record(fold)
    fold_record["settings"] = recipe
    # targets and donors of the new maps come from these cases only (provenance.py)
    fold_record[GENERATOR_TRAINING_CASES] = sorted(training_cases)

    slices = open_native_slices(dataset, training_cases)    # read on demand from the on-disk store
    real = NativeVolumes(slices) if unit == "volume" else slices
    fold_counts = pixel_counts(real.label_maps, dataset.num_classes)
    dataset_counts = None
    if any(fold_counts[value] == 0 for value in dataset.annotated_labels if value != 0):    # a class the fold lacks
        dataset_counts = scan_dataset(dataset, progress=False).counts_of(dataset.case_ids, dataset.num_classes)
    host, pathology = class_roles_from_counts(dataset, fold_counts, settings.balancing, dataset_counts)
    mask_config = settings.balancing.mask_config()
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
    # on the fold's training lesions (whole volumes with unit "volume": 3D components)
    edit_gate = fit_edit_gate(real.images, real.label_maps, pathology)
    fold_record["edit_gate"] = None if edit_gate is None else edit_gate.to_dict()
    store.save_manifest()
    image_dtypes = {case_id: [dataset.source_dtype(case_id, channel) for channel in range(dataset.num_channels)]
                    for case_id in training_cases}
    return FoldMaps(real, new_maps, mask_report, quality_gates, host, pathology, mask_config, body_masks,
                    image_dtypes, edit_gate)


@dataclass
class MadeCase:
    """One synthetic case of a block: its image channels (dataset units and pixel types), its label map, what the
    manifest records of how it was made (seed, generator, sampler and the like) and, when the source scores it
    itself, its model-free score (None: the score of the whole image, ``model_free_channel_score``); ``edited``:
    where the source changed the real image (an inpainted or pasted case; None: the whole image was made), the
    region the edit gate scores."""

    channel_images: list
    label_map: np.ndarray
    record: dict
    quality: dict = None
    edited: np.ndarray = None


def check_shard(num_shards: int, shard_index: int):
    if num_shards < 1 or not 0 <= shard_index < num_shards:
        raise NnsynthError(f"--shard-index must lie in [0, --num-shards - 1] and --num-shards be at least 1, got "
                           f"shard {shard_index} of {num_shards}")


def shard_blocks(num_cases: int, batch_size: int, num_shards: int = 1, shard_index: int = 0) -> list:
    """The case indices of shard ``shard_index``, as the fixed blocks of ``batch_size`` it makes."""
    blocks = [list(range(start, min(start + batch_size, num_cases))) for start in range(0, num_cases, batch_size)]
    return blocks[shard_index::num_shards]


def case_seed(seed: int, index: int) -> int:
    """The noise seed of case ``index`` of a run seeded ``seed``."""
    return seed * 1_000_003 + index


def write_fold_cases(store: SyntheticStore, fold, fold_maps: FoldMaps, make_cases, seed: int, write_preview,
                     description: str, batch_size: int = 1, unit: str = "slice", num_shards: int = 1,
                     shard_index: int = 0) -> dict:
    """Make the cases of shard ``shard_index``'s blocks that are not complete yet with the block source
    ``make_cases``, score them with the fold's model-free gate (and an edited case with the edit gate too: it
    passes only when both pass) and write them; then save the manifest and the
    preview (``write_preview()``, its path). Returns the summary: counts written/skipped/total, the label-map
    report, how many passed the gate, the preview and manifest paths, and the unit."""
    new_maps = fold_maps.new_maps
    blocks = shard_blocks(len(new_maps), batch_size, num_shards, shard_index)
    todo = [block for block in blocks if not all(store.is_complete(synthetic_case_id(i, fold)) for i in block)]
    written = 0
    progress = tqdm(total=sum(len(block) for block in todo), desc=description, unit="case")
    for batch in todo:        # a whole block, even when some of its cases are done: its batch never changes
        for index, made in zip(batch, make_cases(batch, [case_seed(seed, index) for index in batch])):
            if store.is_complete(synthetic_case_id(index, fold)):
                progress.update(1)
                continue
            provenance = new_maps[index].provenance
            target_case = provenance["target"]["case_id"]
            image = np.stack(made.channel_images).astype(np.float32)
            quality = made.quality if made.quality is not None else model_free_channel_score(
                image, made.label_map, fold_maps.gates)
            if made.edited is not None and fold_maps.edit_gate is not None:
                quality = joined_quality(quality, edit_gate_score(image, made.label_map, made.edited,
                                                                  fold_maps.edit_gate, fold_maps.pathology))
            entry = {"fold": fold, SOURCE_CASES: label_map_source_cases(provenance), "source": provenance,
                     **made.record, "quality": {"model_free": quality}}
            store.write_case(synthetic_case_id(index, fold), made.channel_images, made.label_map,
                             fold_maps.real.properties[target_case], fold_maps.image_dtypes[target_case], entry)
            written += 1
            progress.update(1)
    progress.close()
    store.save_manifest()       # the index of every record, compiled once per run
    preview = write_preview()
    fold_cases = store.complete_case_ids(fold)
    passed = [c for c in fold_cases if store.cases[c].get("quality", {}).get("model_free", {}).get("passed")]
    shard_cases = sum(len(block) for block in blocks)
    return {"fold": fold, "written": written, "skipped": shard_cases - written, "total": len(fold_cases),
            "label_map_report": fold_maps.report, "model_free_passed": len(passed), "preview": str(preview),
            "store": str(store.manifest_file), "unit": unit}

