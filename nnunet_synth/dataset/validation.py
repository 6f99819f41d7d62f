"""Checks that run before a command writes, deletes or trains anything: options, devices, budgets, folders,
dataset ids and every case of the dataset. Each failure is one ``NnsynthError`` line naming the file or option,
the problem and the fix (the list a user gets is in ``docs/checks.md``).

The dataset scan reads every case once (``RawDataset.read_case``: shapes, label values, NaN, image/label
geometry as nnU-Net's ``verify_dataset_integrity.check_cases`` compares it) and decodes NIfTI files a second
time with nibabel, because SimpleITK reads a truncated ``.nii(.gz)`` without an error (the missing voxels
come back as 0) and turns NaN/Inf into 0.0. A scan that passed is remembered beside the slice store, keyed by
the files' names, sizes and a sha256 of their bytes (``native_slices.case_files_key``), so later commands on
unchanged files skip the decoding, and a file changed in place is scanned again.
"""
import hashlib
import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from nnunet_synth.atomic import write_json_atomic
from nnunet_synth.dataset.raw_dataset import RawDataset
from nnunet_synth.errors import NnsynthError

SCAN_FORMAT = 3                      # 3: files keyed by their content (sha256), not their modification times
NIFTI_ENDINGS = (".nii", ".nii.gz")
MAX_SEED = 2 ** 32 - 1               # numpy's legacy seeding range; case seeds are seed * 1_000_003 + index
MAX_INFERENCE_STEPS = 1000           # the generator's training timesteps (DDIM cannot take more)
MAX_BATCH_SIZE = 4096
# measured on the real HU data: a record is 2.6 KB on disk (once in recordsSynth/, once in synthetic.json) and
# 9.3 KB as Python objects, held twice while synthetic.json is compiled
RECORD_MEMORY_BYTES = 20 * 1024
RECORD_FILE_BYTES = 8 * 1024


# ---- options ----------------------------------------------------------------------------------------------------

def check_int_range(value, option: str, low: int = None, high: int = None):
    """``low <= value <= high`` (either bound optional); None passes (option not given)."""
    if value is None:
        return
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = (f"at least {low}" if high is None else f"at most {high}" if low is None
                  else f"between {low} and {high}")
        raise NnsynthError(f"{option} must be {bounds}, got {value}: give a value in range")


def check_number_range(value, option: str, low: float = None, high: float = None, low_open=False, high_open=False):
    """A finite number in [low, high] (or an open end with ``low_open``/``high_open``); None passes."""
    if value is None:
        return
    inside = math.isfinite(value)
    if inside and low is not None:
        inside = value > low if low_open else value >= low
    if inside and high is not None:
        inside = value < high if high_open else value <= high
    if not inside:
        left = "(" if low_open or low is None else "["
        right = ")" if high_open or high is None else "]"
        interval = f"{left}{'-inf' if low is None else f'{low:g}'}, {'inf' if high is None else f'{high:g}'}{right}"
        raise NnsynthError(f"{option} must be a finite number in {interval}, got {value}: give a value in range")


def check_seed(seed: int, option: str = "--seed"):
    check_int_range(seed, option, 0, MAX_SEED)


def check_inference_steps(steps: int, option: str = "--inference-steps"):
    check_int_range(steps, option, 1, MAX_INFERENCE_STEPS)


def check_device(device: str) -> str:
    """``device`` parses as a torch device and exists on this machine; returns it."""
    import torch
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise NnsynthError(f"--device '{device}' is not a device: use cpu, cuda, cuda:N or mps") from None
    if parsed.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise NnsynthError(f"--device {device}: this machine has no usable CUDA GPU: use --device cpu")
        if parsed.index is not None and parsed.index >= count:
            raise NnsynthError(f"--device {device}: this machine has {count} CUDA GPU(s) (cuda:0 .. cuda:{count - 1}): "
                               f"choose one of them")
    elif parsed.type == "mps":
        if not torch.backends.mps.is_available():
            raise NnsynthError(f"--device {device}: MPS is not available on this machine: use --device cpu")
    elif parsed.type != "cpu":
        raise NnsynthError(f"--device '{device}' is not supported here: use cpu, cuda, cuda:N or mps")
    return device


# ---- folders, space, ids ----------------------------------------------------------------------------------------

def nearest_existing(folder) -> Path:
    folder = Path(folder).absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return folder


def check_writable(folder, what: str):
    """Create a file in ``folder`` (or in its nearest existing parent, where the command would create it) and
    remove it: refuses read-only mounts and missing permissions before anything is written."""
    target = nearest_existing(folder)
    try:
        with tempfile.TemporaryFile(dir=target, prefix=".nnsynth_write_check_"):
            pass
    except OSError as error:
        raise NnsynthError(f"{target}: cannot write {what} there "
                           f"({os.strerror(error.errno) if error.errno else error}): "
                           f"make the folder writable (permissions, a read-write mount) or point the command "
                           f"elsewhere") from None


def free_bytes(folder) -> int:
    stat = os.statvfs(nearest_existing(folder))
    return stat.f_bavail * stat.f_frsize


def available_memory_bytes() -> int:
    """MemAvailable of /proc/meminfo (Linux), else the free physical pages."""
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def bytes_per_real_slice(dataset: RawDataset) -> float:
    """The real files' bytes on disk per slice (images + label, compressed as stored): what one synthetic case,
    written in the same format, costs about."""
    total_bytes, total_slices = 0, 0
    for case_id in dataset.case_ids:
        files = [*dataset.cases[case_id]["images"], dataset.cases[case_id]["label"]]
        total_bytes += sum(os.path.getsize(path) for path in files)
        total_slices += _num_slices(dataset.cases[case_id]["label"], dataset.file_ending)
    return total_bytes / max(1, total_slices)


def _num_slices(label_file, file_ending: str) -> int:
    if file_ending in (".png", ".bmp", ".tif", ".tiff"):
        return 1
    import SimpleITK as sitk
    header = sitk.ImageFileReader()
    header.SetFileName(str(label_file))
    header.ReadImageInformation()
    size = header.GetSize()
    return int(size[2]) if len(size) == 3 else 1


def check_case_budget(dataset: RawDataset, num_cases: int, option: str = "-n/--num-cases"):
    """``num_cases`` synthetic cases fit the dataset folder's free disk space and their records this machine's
    memory (both with a factor 2 of headroom)."""
    check_int_range(num_cases, option, 1)
    disk_needed = num_cases * (bytes_per_real_slice(dataset) + RECORD_FILE_BYTES)
    disk_free = free_bytes(dataset.folder)
    if 2 * disk_needed > disk_free:
        raise NnsynthError(f"{dataset.folder}: {num_cases} synthetic cases need about {_size(disk_needed)} but the "
                           f"disk has {_size(disk_free)} free: ask for fewer cases (-n / -r) or free space")
    memory_needed = num_cases * RECORD_MEMORY_BYTES
    memory_free = available_memory_bytes()
    if 2 * memory_needed > memory_free:
        raise NnsynthError(f"{option} {num_cases}: the cases' records need about {_size(memory_needed)} of memory "
                           f"but {_size(memory_free)} are available: ask for fewer cases, in several runs or "
                           f"datasets")


def _size(num_bytes: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if num_bytes < 1024 or unit == "TB":
            return f"{num_bytes:.0f} {unit}" if unit == "B" else f"{num_bytes:.1f} {unit}"
        num_bytes /= 1024


def check_dataset_id_free(dataset_id: int, source: RawDataset, export_name: str):
    """An export id must be a valid nnU-Net id that no other dataset uses in nnUNet_raw, nnUNet_preprocessed or
    nnUNet_results (nnU-Net refuses an id with two names); rerunning one export into its own folder is allowed."""
    from nnunetv2.utilities.dataset_name_id_conversion import find_candidate_datasets
    check_int_range(dataset_id, "--export-standalone", 1, 999)
    if export_name == source.name or source.name.startswith("Dataset%03d_" % dataset_id):
        raise NnsynthError(f"--export-standalone {dataset_id} is the id of the source dataset {source.name}: "
                           f"choose a free dataset id")
    taken = sorted(set(find_candidate_datasets(dataset_id)) - {export_name})
    if taken:
        raise NnsynthError(f"--export-standalone {dataset_id}: dataset id {dataset_id} is already used by "
                           f"{', '.join(taken)} (nnU-Net refuses two names for one id): choose a free id or remove "
                           f"that dataset")


# ---- the dataset ------------------------------------------------------------------------------------------------

@dataclass
class DatasetScan:
    """What a full read of the dataset found: per case its slice count, the label values present and the pixels
    of each label value."""

    num_slices: dict = field(default_factory=dict)      # case_id -> slices
    classes: dict = field(default_factory=dict)         # case_id -> sorted label values present
    pixel_counts: dict = field(default_factory=dict)    # case_id -> pixels per label value (index = value)

    def to_dict(self) -> dict:
        return {"num_slices": self.num_slices, "classes": self.classes, "pixel_counts": self.pixel_counts}

    def counts_of(self, case_ids, num_values: int) -> np.ndarray:
        """Pixels per label value (index = value, ``num_values`` entries) over ``case_ids``."""
        counts = np.zeros(num_values, dtype=np.int64)
        for case_id in case_ids:
            found = self.pixel_counts[case_id][:num_values]
            counts[:len(found)] += found
        return counts


def verify_nifti_file(path, role: str):
    """Decode a NIfTI file with nibabel: refuses truncated or corrupt files (SimpleITK pads them with zeros) and,
    for images, NaN/Inf (SimpleITK reads them as 0.0)."""
    import nibabel
    try:
        data = np.asanyarray(nibabel.load(str(path)).dataobj)
    except Exception as error:        # nibabel raises EOFError, OSError, zlib.error, ImageFileError, ValueError ...
        raise NnsynthError(f"{path}: the file is truncated or corrupt ({str(error).strip() or type(error).__name__}): "
                           f"copy or convert the {role} again") from None
    if role == "image" and data.dtype.kind in "fc" and not np.all(np.isfinite(data)):
        raise NnsynthError(f"{path} contains NaN or infinite values: replace them (e.g. with the minimum intensity) "
                           f"before using the dataset")


def _check_case_content(dataset: RawDataset, case_id: str, image: np.ndarray):
    for channel, channel_image in enumerate(image):
        if channel_image.size and channel_image.min() == channel_image.max():
            raise NnsynthError(f"{dataset.cases[case_id]['images'][channel]} is constant (every voxel "
                               f"{channel_image.min():g}): the image carries no content; replace it or remove case "
                               f"{case_id}")


def scan_key(dataset: RawDataset) -> dict:
    from nnunet_synth.dataset.native_slices import case_files_key
    return {"format": SCAN_FORMAT, "dataset": dataset.name, "labels": dict(dataset.labels),
            "channels": dataset.channel_list, "files": case_files_key(dataset, dataset.case_ids)}


def _scan_file(dataset: RawDataset, key: dict):
    from nnunet_synth.dataset.native_slices import dataset_cache_root
    root = dataset_cache_root(dataset)
    if root is None:
        return None
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    return root / f"validated_{digest}.json"


def scan_dataset(dataset: RawDataset, progress=True) -> DatasetScan:
    """Read and check every case of ``dataset`` (not only one fold's): see the module docstring. Remembered for
    unchanged files."""
    dataset.declared_unit                           # dataset.json's nnsynth_unit, when given, is slice or volume
    key = scan_key(dataset)
    remembered = _scan_file(dataset, key)
    if remembered is not None and remembered.is_file():
        try:
            saved = json.loads(remembered.read_text())
            return DatasetScan(saved["num_slices"], saved["classes"], saved["pixel_counts"])
        except (OSError, ValueError, KeyError):
            pass                                    # scan again
    scan = DatasetScan()
    nifti = dataset.file_ending in NIFTI_ENDINGS
    # progress on a terminal only: a refused command prints its one line and nothing else
    for case_id in tqdm(dataset.case_ids, desc=f"checking {dataset.name}", unit="case",
                        disable=None if progress else True):
        if nifti:
            for image_file in dataset.cases[case_id]["images"]:
                verify_nifti_file(image_file, "image")
            verify_nifti_file(dataset.cases[case_id]["label"], "label")
        image, label_map, _ = dataset.read_case(case_id)
        _check_case_content(dataset, case_id, image)
        scan.num_slices[case_id] = int(label_map.shape[0])
        scan.classes[case_id] = sorted(int(v) for v in np.unique(label_map))
        scan.pixel_counts[case_id] = [int(n) for n in np.bincount(label_map.ravel().astype(np.int64))]
    if remembered is not None:
        try:
            write_json_atomic({**key, **scan.to_dict()}, remembered)
        except (OSError, NnsynthError):
            pass                                    # read-only nnUNet_preprocessed: scan again next time
    return scan


def check_fold_classes(dataset: RawDataset, scan: DatasetScan, fold, training_cases, pathology_values,
                       host_values=()) -> list:
    """The pathology classes (values) that occur in none of the fold's training cases, with the cases that hold
    them: such a class can be neither learnt by the fold's generator nor balanced in its label maps, so the fold goes
    on without it (the caller says so). Refused only when the fold's training cases hold no pixel of any pathology
    class at all: there is nothing to copy, paste or learn."""
    present = set()
    for case_id in training_cases:
        present.update(scan.classes[case_id])
    missing = [value for value in pathology_values if value not in present]
    names = {value: name for name, value in dataset.labels.items()}
    if missing and len(missing) == len(pathology_values):
        raise NnsynthError(f"{dataset.json_file}: fold {fold}'s {len(training_cases)} training cases hold no pixel of "
                           f"any pathology class ({', '.join(names[v] for v in missing)}; host classes: "
                           f"{', '.join(names[v] for v in host_values) or 'none'}), so there is nothing to balance or "
                           f"learn: add annotated cases to the fold's training cases (splits_final.json), use another "
                           f"fold, or name the classes with --host-classes / --pathology-classes")
    absent = []
    for value in missing:
        holders = sorted(case_id for case_id, values in scan.classes.items() if value in values)
        absent.append({"class": int(value), "name": names[value], "held_by": holders})
    return absent


def fold_num_slices(scan: DatasetScan, case_ids) -> int:
    return sum(scan.num_slices[case_id] for case_id in case_ids)
