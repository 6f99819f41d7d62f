"""Synthetic cases of a raw dataset: ``imagesSynth/``, ``labelsSynth/`` and the manifest ``synthetic.json``.

Layout (inside the raw dataset folder, beside imagesTr/labelsTr, which are never touched)::

    imagesSynth/synth_00000_0000{file_ending}    image in the dataset's units, pixel type and file ending
    labelsSynth/synth_00000{file_ending}         the conditioning label map
    synthetic.json                               {"format_version": 1, "dataset": ..., "cases": {id: entry}}

A case exists once its manifest entry is written, which happens after both files are in place; every file is
written atomically, so an interrupted run leaves no partial file and a rerun rewrites the same names.
Stock nnU-Net commands read imagesTr/labelsTr only, so the raw dataset stays real-only for them.
"""
import json
import shutil
from pathlib import Path

import numpy as np

from nnunet_synth.atomic import remove_stale_temp_files, write_json_atomic
from nnunet_synth.dataset.raw_dataset import RawDataset
from nnunet_synth.dataset.writing import write_volume
from nnunet_synth.errors import NnsynthError

SYNTH_IMAGES_FOLDER = "imagesSynth"
SYNTH_LABELS_FOLDER = "labelsSynth"
MANIFEST_NAME = "synthetic.json"
PREVIEW_NAME = "synthetic_preview.png"
FORMAT_VERSION = 1


def synthetic_case_id(index: int) -> str:
    return "synth_%05d" % index


class SyntheticStore:
    """Reads and writes the synthetic cases of one raw dataset."""

    def __init__(self, dataset: RawDataset):
        self.dataset = dataset
        self.images_folder = dataset.folder / SYNTH_IMAGES_FOLDER
        self.labels_folder = dataset.folder / SYNTH_LABELS_FOLDER
        self.manifest_file = dataset.folder / MANIFEST_NAME
        self.manifest = self._read_manifest()

    def _read_manifest(self) -> dict:
        if not self.manifest_file.is_file():
            return {"format_version": FORMAT_VERSION, "dataset": self.dataset.name, "cases": {}}
        try:
            with open(self.manifest_file) as handle:
                manifest = json.load(handle)
        except json.JSONDecodeError as error:
            raise NnsynthError(f"{self.manifest_file} is not valid JSON ({error.msg}): run nnsynth_clean "
                               f"{self.dataset.name} and generate again") from None
        if manifest.get("format_version") != FORMAT_VERSION or "cases" not in manifest:
            raise NnsynthError(f"{self.manifest_file} has an unknown format: run nnsynth_clean {self.dataset.name}")
        return manifest

    @property
    def cases(self) -> dict:
        return self.manifest["cases"]

    def image_file(self, case_id: str) -> Path:
        return self.images_folder / f"{case_id}_0000{self.dataset.file_ending}"

    def label_file(self, case_id: str) -> Path:
        return self.labels_folder / f"{case_id}{self.dataset.file_ending}"

    def is_complete(self, case_id: str) -> bool:
        """True when the manifest lists the case and both of its files exist."""
        return case_id in self.cases and self.image_file(case_id).is_file() and self.label_file(case_id).is_file()

    def complete_case_ids(self):
        return sorted(case_id for case_id in self.cases if self.is_complete(case_id))

    def prepare(self):
        """Create the folders and drop temporary files of an interrupted run."""
        self.images_folder.mkdir(exist_ok=True)
        self.labels_folder.mkdir(exist_ok=True)
        remove_stale_temp_files(self.images_folder)
        remove_stale_temp_files(self.labels_folder)
        remove_stale_temp_files(self.dataset.folder)

    def write_case(self, case_id: str, image: np.ndarray, label_map: np.ndarray, reference_properties: dict,
                   image_dtype, entry: dict):
        """Write one synthetic pair (2D arrays in dataset units / label values) and record ``entry``.

        ``reference_properties`` are the nnU-Net reader properties of the real case the pair derives from;
        its geometry (spacing, direction, origin) is reused so the pair matches the real data.
        """
        if image.ndim != 2 or image.shape != label_map.shape:
            raise ValueError(f"expected 2D image and label of one shape, got {image.shape} and {label_map.shape}")
        image = image.astype(image_dtype)
        label_map = label_map.astype(np.uint8 if label_map.max() < 255 else np.uint16)
        geometry = {}
        sitk_geometry = reference_properties.get("sitk_stuff")
        if sitk_geometry is not None:
            geometry = dict(spacing_xyz=sitk_geometry["spacing"], origin=sitk_geometry["origin"],
                            direction=sitk_geometry["direction"])
            if len(sitk_geometry["spacing"]) == 3:      # a 3D dataset: the pair is a one-slice volume
                image, label_map = image[None], label_map[None]
        write_volume(image, self.image_file(case_id), **geometry)
        write_volume(label_map, self.label_file(case_id), **geometry)
        self.cases[case_id] = dict(entry, image=str(self.image_file(case_id).relative_to(self.dataset.folder)),
                                   label=str(self.label_file(case_id).relative_to(self.dataset.folder)))
        self.save_manifest()

    def update_entries(self, updates: dict):
        """Merge ``{case_id: {key: value}}`` into the manifest (e.g. quality scores) and save it."""
        for case_id, fields in updates.items():
            self.cases[case_id].update(fields)
        self.save_manifest()

    def save_manifest(self):
        write_json_atomic(self.manifest, self.manifest_file)

    def remove_all(self) -> int:
        """Delete every synthetic file and the manifest; real files are untouched. Return the case count."""
        count = len(self.cases)
        for folder in (self.images_folder, self.labels_folder):
            if folder.is_dir():
                shutil.rmtree(folder)
        self.manifest_file.unlink(missing_ok=True)
        self.manifest = self._read_manifest()
        return count
