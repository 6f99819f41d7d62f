"""An nnU-Net raw dataset (dataset.json, imagesTr, labelsTr), read through nnU-Net's own reader-writers.

Every check here turns bad input into a one-line ``NnsynthError`` that names the file and the fix.
"""
import json
import os
import re
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_dataset_json
from nnunetv2.utilities.label_handling.label_handling import LabelManager
from nnunetv2.utilities.utils import get_filenames_of_train_images_and_targets

from nnunet_synth.errors import NnsynthError, warn_once
from nnunet_synth.nnunet_paths import require_nnunet_folder

REQUIRED_KEYS = ("labels", "numTraining", "file_ending")
# optional dataset.json key (nnU-Net ignores it): "slice" when each case is a stack of independent 2D slices
# (gaps between them, e.g. the COVID-19 slices), so that whole-volume copy-paste is not the default there
UNIT_KEY = "nnsynth_unit"
UNITS = ("slice", "volume")


def resolve_dataset_folder(dataset: str) -> Path:
    """Find a raw dataset from a folder path, a full name (Dataset501_X), a short name (Dataset501) or an id."""
    as_path = Path(dataset)
    if as_path.is_dir():
        return as_path.resolve()
    match = re.fullmatch(r"(?:Dataset)?(\d{1,3})(?:_.*)?", str(dataset))
    if match is None:
        raise NnsynthError(f"'{dataset}' is neither a folder nor a dataset name: give a path, an id like 501 "
                           f"or a name like Dataset501_Covid19Lung")
    raw_root = require_nnunet_folder("nnUNet_raw", f"finding dataset '{dataset}' by name")
    prefix = "Dataset%03d" % int(match.group(1))
    exact = raw_root / str(dataset)
    if str(dataset).startswith(prefix + "_") and exact.is_dir():
        return exact.resolve()
    candidates = sorted(p for p in raw_root.glob(prefix + "_*") if p.is_dir()) if raw_root.is_dir() else []
    if len(candidates) == 0:
        raise NnsynthError(f"unknown dataset '{dataset}': no folder {prefix}_* in nnUNet_raw={raw_root}; "
                           f"convert or copy the dataset there first")
    if len(candidates) > 1:
        names = ", ".join(p.name for p in candidates)
        raise NnsynthError(f"dataset id {prefix} is ambiguous in {raw_root} ({names}): give the full name")
    return candidates[0].resolve()


def _load_dataset_json(folder: Path) -> dict:
    json_file = folder / "dataset.json"
    if not json_file.is_file():
        raise NnsynthError(f"{json_file} is missing: write it with "
                           f"nnunetv2.dataset_conversion.generate_dataset_json.generate_dataset_json")
    try:
        with open(json_file) as handle:
            dataset_json = json.load(handle)
    except json.JSONDecodeError as error:
        raise NnsynthError(f"{json_file} is not valid JSON ({error.msg} at line {error.lineno}): "
                           f"fix the file or regenerate it with generate_dataset_json") from None
    if not isinstance(dataset_json, dict):
        raise NnsynthError(f"{json_file} must hold a JSON object: regenerate it with generate_dataset_json")
    missing = [key for key in REQUIRED_KEYS if key not in dataset_json]
    if "channel_names" not in dataset_json and "modality" not in dataset_json:
        missing.insert(0, "channel_names")
    if missing:
        raise NnsynthError(f"{json_file} lacks {', '.join(missing)}: regenerate it with generate_dataset_json")
    return dataset_json


def _parse_labels(dataset_json: dict, json_file: Path):
    """(integer labels name -> value, ignore value or None, regions or None) through nnU-Net's ``LabelManager``.

    The label files of every nnU-Net dataset hold plain integers; with region-based labels (``"tumor": [1, 2]``)
    nnU-Net builds the regions only at training time. Generation works on the integers: each one gets the name
    of a label that is exactly that value (``"enhancing": 3`` or ``[3]``), else ``label_<value>``.
    """
    labels = dataset_json["labels"]
    if not isinstance(labels, dict) or not labels:
        raise NnsynthError(f"{json_file}: 'labels' must map names to integer values, e.g. "
                           f"{{\"background\": 0, \"lesion\": 1}}")
    for name, value in labels.items():
        values = value if isinstance(value, (list, tuple)) else [value]
        if not values or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            raise NnsynthError(f"{json_file}: label '{name}' has value {value!r}, expected an integer or a list "
                               f"of integers (a region)")
    try:
        manager = LabelManager(labels, dataset_json.get("regions_class_order"))
    except (AssertionError, RuntimeError, TypeError, ValueError) as error:
        raise NnsynthError(f"{json_file}: nnU-Net rejects 'labels' ({str(error).strip() or type(error).__name__}): "
                           f"fix 'labels' (and 'regions_class_order' for region-based labels)") from None
    values = sorted({int(value) for value in manager.all_labels} | {0})
    if values != list(range(len(values))):
        raise NnsynthError(f"{json_file}: label values {values} must be consecutive integers starting at 0 "
                           f"(0 = background)")
    ignore = None if manager.ignore_label is None else int(manager.ignore_label)
    if ignore is not None:
        values.append(ignore)
    exact_names = {}
    for name, value in labels.items():
        members = list(value) if isinstance(value, (list, tuple)) else [value]
        if len(members) == 1:
            exact_names.setdefault(members[0], name)
    integer_labels = {exact_names.get(value, f"label_{value}"): value for value in values}
    regions = dict(labels) if manager.has_regions else None
    return integer_labels, ignore, regions


def check_same_geometry(image_properties: dict, label_properties: dict, image_file, label_file, warn_key=None):
    """Image and label on one grid, compared as nnU-Net's ``verify_dataset_integrity.check_cases`` does
    (``np.allclose``): a different spacing is refused, as nnU-Net refuses it; a different origin or direction (for
    SimpleITK-read files) gets one warning per ``warn_key``, as nnU-Net only warns. nnU-Net then trains the label on
    the image's grid, and a synthetic case is written in the image's geometry, so both read the label the same way."""
    image_spacing, label_spacing = image_properties.get("spacing"), label_properties.get("spacing")
    if image_spacing is not None and label_spacing is not None and (
            len(image_spacing) != len(label_spacing) or not np.allclose(image_spacing, label_spacing)):
        raise NnsynthError(f"{label_file} has spacing {_rounded(label_spacing)} but its image {image_file} has "
                           f"{_rounded(image_spacing)}: label and image must share their spacing (resample the "
                           f"label onto the image's grid)")
    image_sitk, label_sitk = image_properties.get("sitk_stuff"), label_properties.get("sitk_stuff")
    if image_sitk is None or label_sitk is None:
        return
    for name in ("origin", "direction"):
        image_value, label_value = image_sitk[name], label_sitk[name]
        if len(image_value) != len(label_value) or not np.allclose(image_value, label_value):
            warn_once(("geometry", warn_key or str(label_file)),
                      f"{label_file} has {name} {_rounded(label_value)} but its image {image_file} has "
                      f"{_rounded(image_value)} (nnU-Net warns about this and trains the label on the image's grid; "
                      f"synthetic cases are written in the image's geometry; further cases of the dataset are not "
                      f"named): copy the image's geometry onto the label if it is meant to lie there")
            return


def _rounded(values) -> tuple:
    return tuple(round(float(v), 6) for v in values)


class RawDataset:
    """A validated nnU-Net raw dataset: its dataset.json, its training cases and a reader for them."""

    def __init__(self, folder):
        self.folder = Path(folder).resolve()
        if not self.folder.is_dir():
            raise NnsynthError(f"dataset folder {self.folder} does not exist: check the path or nnUNet_raw")
        self.json_file = self.folder / "dataset.json"
        self.dataset_json = _load_dataset_json(self.folder)
        self.name = self.folder.name
        self.file_ending = self.dataset_json["file_ending"]
        self.channel_names = self.dataset_json.get("channel_names", self.dataset_json.get("modality"))
        if not isinstance(self.channel_names, dict) or not self.channel_names:
            raise NnsynthError(f"{self.json_file}: 'channel_names' must map channel indices to names, e.g. "
                               f"{{\"0\": \"CT\"}}")
        # one name per input channel, in nnU-Net's file order (_0000, _0001, ...)
        self.channel_list = [str(name) for _, name in sorted(self.channel_names.items(), key=lambda kv: int(kv[0]))]
        self.num_channels = len(self.channel_list)
        # integer labels (name -> value, the values in the label files), the ignore label and nnU-Net's regions
        self.labels, self.ignore_label, self.regions = _parse_labels(self.dataset_json, self.json_file)
        self.class_names = [name for name, _ in sorted(self.labels.items(), key=lambda item: item[1])]
        self.num_classes = len(self.class_names)
        self.cases = self._find_cases()
        try:
            self.reader_writer_class = determine_reader_writer_from_dataset_json(self.dataset_json, verbose=False)
        except RuntimeError:
            raise NnsynthError(f"{self.json_file}: nnU-Net has no reader for file ending '{self.file_ending}': "
                               f"convert the images to .nii.gz or .png") from None

    @classmethod
    def from_name(cls, dataset: str) -> "RawDataset":
        """Open a dataset by path, name or id (see ``resolve_dataset_folder``)."""
        return cls(resolve_dataset_folder(dataset))

    @property
    def case_ids(self):
        return sorted(self.cases)

    def _find_cases(self) -> dict:
        images_folder = self.folder / "imagesTr"
        if "dataset" not in self.dataset_json and not images_folder.is_dir():
            raise NnsynthError(f"{images_folder} does not exist: put the training images there as "
                               f"CASE_0000{self.file_ending}")
        cases = get_filenames_of_train_images_and_targets(str(self.folder), dict(self.dataset_json))
        if not cases:
            raise NnsynthError(f"{images_folder} holds no image ending in {self.file_ending}: check "
                               f"'file_ending' in {self.json_file}")
        for case_id, files in cases.items():
            if len(files["images"]) != self.num_channels:
                expected = [f"{case_id}_{channel:04d}{self.file_ending}" for channel in range(self.num_channels)]
                found = [os.path.basename(path) for path in files["images"]]
                missing = sorted(set(expected) - set(found)) or expected
                raise NnsynthError(f"case {case_id} has {len(found)} image file(s) but {self.json_file} declares "
                                   f"{self.num_channels} channels: add {', '.join(missing)} to imagesTr or correct "
                                   f"'channel_names'")
            for image_file in files["images"]:
                if not os.path.isfile(image_file):
                    raise NnsynthError(f"image {image_file} of case {case_id} is missing: add it or remove the case")
            if not os.path.isfile(files["label"]):
                raise NnsynthError(f"label {files['label']} of case {case_id} is missing: add it to labelsTr")
        if len(cases) != self.dataset_json["numTraining"]:
            raise NnsynthError(f"{self.json_file} says numTraining={self.dataset_json['numTraining']} but "
                               f"{len(cases)} cases were found: correct numTraining")
        return cases

    @property
    def declared_unit(self):
        """``dataset.json``'s ``nnsynth_unit`` ("slice" or "volume"), or None when it has none."""
        unit = self.dataset_json.get(UNIT_KEY)
        if unit is not None and unit not in UNITS:
            raise NnsynthError(f"{self.json_file}: {UNIT_KEY} is {unit!r}, expected one of {', '.join(UNITS)}: fix "
                               f"or remove it")
        return unit

    def reader_writer(self):
        return self.reader_writer_class()

    @property
    def annotated_labels(self):
        """Label values that mark annotated classes: every value but the ignore label."""
        return [value for value in sorted(self.labels.values()) if value != self.ignore_label]

    def read_case(self, case_id: str):
        """Read one case; return (image (C, Z, Y, X) float32, label (Z, Y, X) int16, properties) after validation.
        2D images have Z = 1."""
        files = self.cases[case_id]
        reader = self.reader_writer()
        image_file, label_file = files["images"][0], files["label"]

        def read(path, read_function, argument):
            try:
                return read_function(argument)
            except (RuntimeError, ValueError, OSError, AssertionError, SyntaxError) as error:
                raise NnsynthError(f"cannot read case {case_id} ({path}): "
                                   f"{str(error).strip() or type(error).__name__}; "
                                   f"store images and labels as 2D or 3D {self.file_ending} files, "
                                   f"one per channel") from None

        image, properties = read(image_file, reader.read_images, files["images"])
        label, label_properties = read(label_file, reader.read_seg, label_file)     # a bad label is named itself
        if label.shape[0] != 1:
            raise NnsynthError(f"{label_file} has {label.shape[0]} channels (an RGB or RGBA image?): a label map has "
                               f"one: save it as a single-channel (greyscale) file, e.g. skimage.io.imsave(path, "
                               f"skimage.io.imread(path)[..., 0])")
        if image.ndim != 4 or image.shape[0] != self.num_channels:
            raise NnsynthError(f"{image_file} has shape {image.shape[1:]} with {image.shape[0]} channels where "
                               f"{self.json_file} declares {self.num_channels}: give one 2D or 3D file per channel "
                               f"(CASE_0000, CASE_0001, ...)")
        if label.shape[1:] != image.shape[1:]:
            raise NnsynthError(f"{label_file} has shape {label.shape[1:]} but its image {image_file} has "
                               f"{image.shape[1:]}: label and image must lie on the same grid")
        check_same_geometry(properties, label_properties, image_file, label_file, warn_key=str(self.folder))
        if not np.all(np.isfinite(image)):
            raise NnsynthError(f"{image_file} contains NaN or infinite values: replace them (e.g. with the "
                               f"minimum intensity) before using the dataset")
        label_values = np.unique(label)
        if not np.all(np.isfinite(label_values)) or not np.all(label_values == np.round(label_values)):
            raise NnsynthError(f"{label_file} holds non-integer label values: store labels as integers")
        if label_values[0] < 0:
            negative = [int(v) for v in label_values if v < 0]
            raise NnsynthError(f"{label_file} holds negative label values {negative}: labels are 0 (background) .. "
                               f"{max(self.labels.values())}; remap them")
        undeclared = sorted(set(label_values.astype(int).tolist()) - set(self.labels.values()))
        if undeclared:
            raise NnsynthError(f"{label_file} holds label values {undeclared} that {self.json_file} does not declare: "
                               f"add them to 'labels' or remap them")
        return image, label[0].astype(np.int16), properties

    def source_dtype(self, case_id: str, channel: int = 0) -> np.dtype:
        """The pixel type the image file of ``channel`` stores (nnU-Net's readers return float32; writers need the
        original)."""
        image_file = self.cases[case_id]["images"][channel]
        if self.file_ending in (".png", ".bmp", ".tif", ".tiff"):
            from skimage import io
            return io.imread(image_file).dtype
        header = sitk.ImageFileReader()
        header.SetFileName(image_file)
        header.ReadImageInformation()
        return np.dtype(sitk.GetArrayViewFromImage(sitk.Image([1] * header.GetDimension(),
                                                                  header.GetPixelID())).dtype)

    def summary(self) -> str:
        extras = (f", ignore label {self.ignore_label}" if self.ignore_label is not None else "") + \
                 (f", regions {self.regions}" if self.regions else "")
        return (f"{self.name}: {len(self.cases)} training cases, channels {self.channel_list}, "
                f"labels {self.labels}{extras}, file ending {self.file_ending}")
