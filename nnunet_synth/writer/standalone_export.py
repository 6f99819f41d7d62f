"""Export real + synthetic cases as one standalone nnU-Net raw dataset, for users of stock nnU-Net.

The new dataset's imagesTr/labelsTr hold copies of the real cases and the synthetic pairs; its
``splits_final.json`` (in the preprocessed folder, where nnU-Net reads it, and a copy in the raw folder) is the
real dataset's 5-fold split where fold k's training side gets only the synthetic cases fold k may use (none that
depends on one of its validation cases, ``nnunet_synth/provenance.py``), and no synthetic case is ever
validated on. Note that the fingerprint and plans of such a dataset include every synthetic case (the
normalisation statistics then see images of every fold's generator); the SynthMix trainer avoids that and is the
recommended route. nnU-Net's fold "all" trains on every case of the export, so export only the "all" cases for a
final model (``folds=["all"]``).
"""
from pathlib import Path

from nnunet_synth.atomic import copy_file_atomic, write_json_atomic
from nnunet_synth.dataset.raw_dataset import RawDataset
from nnunet_synth.dataset.splits import real_crossval_split
from nnunet_synth.dataset.validation import check_dataset_id_free
from nnunet_synth.dataset.writing import write_dataset_json_atomic
from nnunet_synth.errors import NnsynthError
from nnunet_synth.provenance import select_for_fold
from nnunet_synth.writer.synthetic_store import SyntheticStore


def export_folder_name(dataset: RawDataset, dataset_id: int, dataset_name=None) -> str:
    """``Dataset{id}_{name}``; the name defaults to the source's with ``Synth`` appended."""
    return "Dataset%03d_%s" % (dataset_id, dataset_name or (dataset.name.split("_", 1)[1] + "Synth"))


def export_standalone(dataset: RawDataset, output_root, preprocessed_root, dataset_id: int, dataset_name=None,
                      folds=None):
    """Write ``Dataset{id}_{name}`` under ``output_root`` and its split under ``preprocessed_root``.

    ``folds`` limits the exported synthetic cases to those made for these folds (default: all of them).
    """
    if preprocessed_root is None:
        raise NnsynthError("exporting a standalone dataset writes its splits_final.json into nnUNet_preprocessed: "
                           "export nnUNet_preprocessed=/path/to/nnUNet_preprocessed")
    store = SyntheticStore(dataset)
    synthetic_ids = [case_id for case_id in store.complete_case_ids()
                     if folds is None or str(store.cases[case_id].get("fold")) in {str(f) for f in folds}]
    if not synthetic_ids:
        raise NnsynthError(f"{dataset.folder} has no synthetic cases to export: run nnsynth_generate {dataset.name}")
    export_folder = Path(output_root) / export_folder_name(dataset, dataset_id, dataset_name)
    if export_folder.resolve() == dataset.folder:
        raise NnsynthError(f"the export target {export_folder} is the source dataset: choose another dataset id")
    check_dataset_id_free(dataset_id, dataset, export_folder.name)
    ending = dataset.file_ending
    for case_id in dataset.case_ids:
        for channel, image_file in enumerate(dataset.cases[case_id]["images"]):
            copy_file_atomic(image_file, export_folder / "imagesTr" / f"{case_id}_{channel:04d}{ending}")
        copy_file_atomic(dataset.cases[case_id]["label"], export_folder / "labelsTr" / f"{case_id}{ending}")
    for case_id in synthetic_ids:
        for channel, image_file in enumerate(store.image_files(case_id)):
            copy_file_atomic(image_file, export_folder / "imagesTr" / f"{case_id}_{channel:04d}{ending}")
        copy_file_atomic(store.label_file(case_id), export_folder / "labelsTr" / f"{case_id}{ending}")

    splits = []
    for index, fold in enumerate(real_crossval_split(dataset, preprocessed_root)[0]):
        usable = select_for_fold(store.manifest, synthetic_ids, index, fold["val"]).allowed
        splits.append({"train": sorted(fold["train"]) + usable, "val": sorted(fold["val"])})
    write_json_atomic(splits, Path(preprocessed_root) / export_folder.name / "splits_final.json")
    write_json_atomic(splits, export_folder / "splits_final.json")
    source_json = dataset.dataset_json
    write_dataset_json_atomic(
        export_folder, channel_names=dataset.channel_names, labels=source_json["labels"],
        regions_class_order=source_json.get("regions_class_order"),
        num_training_cases=len(dataset.case_ids) + len(synthetic_ids), file_ending=ending,
        dataset_name=export_folder.name, license=source_json.get("license", "see the source dataset"),
        description=f"{dataset.name} ({len(dataset.case_ids)} real cases) + {len(synthetic_ids)} synthetic cases "
                    f"from nnunet-synth; splits_final.json gives fold k only the synthetic cases made without its "
                    f"validation cases, and never validates on a synthetic case",
        converted_by="nnunet-synth export_standalone")
    return export_folder
