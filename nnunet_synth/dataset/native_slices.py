"""Real slices at their own size, on disk: what generation reads (label maps for balancing, images for the gates,
the targets, the donors and the preview), so that its memory does not grow with the number of slices.

A store is a folder ``<root>/native_<digest>/`` (``<root>`` = ``$nnUNet_preprocessed/<Dataset>/nnsynth_slice_cache``,
else a temporary folder removed with the store object) holding:

- ``images.bin`` and ``label_maps.bin``: one blosc2-compressed array per slice (images (C, H, W) float32 in the
  dataset's units, label maps (H, W) int16 as ``RawDataset.read_case`` gives them), one after another;
- ``slices.npz``: per slice, the byte offset, size and shape of each compressed array, its case and slice index;
- ``properties.pkl``: nnU-Net's reader properties per case (the geometry that writing a case needs);
- ``store.json``: what the key covers.

The key is a hash of the cases' files (names, sizes and a sha256 of each file's bytes) and the labels: any change
makes a new store. One pass over the raw cases builds it (one case in memory at a time) under a temporary name of
its own process, renamed when complete; when several processes (shards) build it at once, each keeps the first
complete one. Rows are read with ``os.pread``, so a process holds only the slices it asks for.

``NativeVolumes`` reads the same store case by case: a 3D case is stacked from its slice rows when it is asked for
(copy-paste of whole volumes), so one store serves both and a volume is never held longer than it is used.
"""
import hashlib
import json
import os
import pickle
import shutil
import tempfile
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import blosc2
import numpy as np
from tqdm import tqdm

from nnunet_synth.atomic import write_json_atomic
from nnunet_synth.dataset.raw_dataset import RawDataset
from nnunet_synth.errors import NnsynthError, storage_error
from nnunet_synth.nnunet_paths import nnunet_folder

STORE_FORMAT = 1
IMAGE_DTYPE, LABEL_DTYPE = np.float32, np.int16      # what RawDataset.read_case gives
META_NAME = "store.json"
CACHE_FOLDER = "nnsynth_slice_cache"


_FINGERPRINTS = {}       # (path, inode, size, mtime, ctime) -> sha256 of the bytes, for the life of this process


def file_fingerprint(path) -> str:
    """sha256 of the file's bytes. A command reads the key of its caches several times: a file is hashed once per
    process while its inode, size, modification and status-change times stay the same (any write changes the
    status-change time, and it cannot be set back)."""
    stat = os.stat(path)
    memo_key = (os.path.abspath(path), stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)
    if memo_key not in _FINGERPRINTS:
        with open(path, "rb") as handle:
            _FINGERPRINTS[memo_key] = hashlib.file_digest(handle, "sha256").hexdigest()
    return _FINGERPRINTS[memo_key]


def case_files_key(dataset: RawDataset, case_ids) -> list:
    """[file name, size, sha256 of the bytes] of every image and label file of ``case_ids``: what a cache of these
    cases (and the remembered dataset scan) depends on. A file changed in place, even with its size and
    modification time put back, gets a new key."""
    files = []
    for case_id in case_ids:
        for path in [*dataset.cases[case_id]["images"], dataset.cases[case_id]["label"]]:
            files.append([os.path.basename(path), os.path.getsize(path), file_fingerprint(path)])
    return files


def dataset_cache_root(dataset: RawDataset):
    """``$nnUNet_preprocessed/<Dataset>/nnsynth_slice_cache``, or None when nnUNet_preprocessed is not set."""
    preprocessed = nnunet_folder("nnUNet_preprocessed")
    return preprocessed / dataset.name / CACHE_FOLDER if preprocessed else None


class PackedRows(Sequence):
    """Arrays of one dtype and any shape stored one after another in one file, each compressed with blosc2;
    ``rows[i]`` reads one with ``os.pread``. ``append`` adds one at the end of the file."""

    def __init__(self, path, dtype=None, offsets=(), sizes=(), shapes=()):
        self.path, self.dtype = Path(path), None if dtype is None else np.dtype(dtype)
        self.offsets, self.sizes = [int(v) for v in offsets], [int(v) for v in sizes]
        self.shapes = [tuple(int(n) for n in shape) for shape in shapes]
        self._fd, self._fd_pid = None, None
        self._keep_alive = None            # the TemporaryDirectory of ``temporary`` rows

    def __len__(self) -> int:
        return len(self.offsets)

    def _file(self) -> int:
        if self._fd is None or self._fd_pid != os.getpid():     # worker processes open their own
            self._fd, self._fd_pid = os.open(self.path, os.O_RDONLY), os.getpid()
        return self._fd

    def __getitem__(self, index: int) -> np.ndarray:
        if not isinstance(index, (int, np.integer)):
            raise TypeError(f"rows are read one at a time, got index {index!r}")
        if not -len(self) <= index < len(self):
            raise IndexError(f"row {index} of {len(self)}")
        index = int(index) % len(self)
        data = blosc2.decompress(os.pread(self._file(), self.sizes[index], self.offsets[index]))
        return np.frombuffer(data, dtype=self.dtype).reshape(self.shapes[index]).copy()

    def append(self, array: np.ndarray):
        array = np.ascontiguousarray(array)
        if self.dtype is None:
            self.dtype = array.dtype
        elif array.dtype != self.dtype:
            raise TypeError(f"{self.path} holds {self.dtype} rows, got {array.dtype}")
        # blosc2.compress (one block, byte shuffle) is ~20x faster than pack_array2 on a 256^2 slice
        packed = blosc2.compress(array, typesize=array.dtype.itemsize)
        offset = self.path.stat().st_size if self.path.exists() else 0
        with open(self.path, "ab") as handle:
            handle.write(packed)
        self.offsets.append(offset)
        self.sizes.append(len(packed))
        self.shapes.append(array.shape)

    def index_arrays(self, prefix: str) -> dict:
        """Offsets, sizes and shapes as arrays named ``<prefix>_...`` (what ``from_index`` reads back)."""
        return {f"{prefix}_offsets": np.asarray(self.offsets, dtype=np.int64),
                f"{prefix}_sizes": np.asarray(self.sizes, dtype=np.int64),
                f"{prefix}_shapes": np.asarray(self.shapes, dtype=np.int64)}

    @classmethod
    def from_index(cls, path, dtype, index, prefix: str) -> "PackedRows":
        return cls(path, dtype, index[f"{prefix}_offsets"], index[f"{prefix}_sizes"], index[f"{prefix}_shapes"])

    @classmethod
    def temporary(cls, prefix: str) -> "PackedRows":
        """Empty rows in a temporary folder that is removed with the object."""
        folder = tempfile.TemporaryDirectory(prefix=prefix)
        rows = cls(Path(folder.name) / "rows.bin")
        rows._keep_alive = folder
        return rows

    def __getstate__(self):
        return {**self.__dict__, "_fd": None, "_fd_pid": None, "_keep_alive": None}


class NativeSlices:
    """The slices of some cases at their own size: ``images`` ((C, H, W) float32, dataset units) and
    ``label_maps`` ((H, W) int16) read on demand, ``map_ids`` [(case_id, slice_index)], ``properties`` {case_id:
    nnU-Net reader properties}."""

    def __init__(self, folder, keep_alive=None):
        self.folder = Path(folder)
        self._keep_alive = keep_alive           # a TemporaryDirectory that must live as long as this store
        index = np.load(self.folder / "slices.npz")
        case_ids = json.loads((self.folder / META_NAME).read_text())["cases"]
        self.images = PackedRows.from_index(self.folder / "images.bin", IMAGE_DTYPE, index, "image")
        self.label_maps = PackedRows.from_index(self.folder / "label_maps.bin", LABEL_DTYPE, index, "label")
        self.map_ids = [(case_ids[case], int(slice_index)) for case, slice_index in zip(index["case"], index["slice"])]
        self._rows = {map_id: row for row, map_id in enumerate(self.map_ids)}
        with open(self.folder / "properties.pkl", "rb") as handle:
            self.properties = pickle.load(handle)

    def __len__(self) -> int:
        return len(self.map_ids)

    def row(self, case_id: str, slice_index: int) -> int:
        """The row of slice ``slice_index`` of ``case_id``."""
        return self._rows[(case_id, int(slice_index))]

    def slice(self, case_id: str, slice_index: int):
        """(image, label map) of slice ``slice_index`` of ``case_id``."""
        row = self.row(case_id, slice_index)
        return self.images[row], self.label_maps[row]

    def case_rows(self) -> dict:
        """{case_id: its rows, in slice order}."""
        rows = {}
        for row, (case_id, _) in enumerate(self.map_ids):
            rows.setdefault(case_id, []).append(row)
        return rows


class CaseStacks(Sequence):
    """The rows of a store stacked case by case: item ``i`` is case ``i``'s rows (``case_rows[i]``, in slice
    order) stacked along ``axis``, read on demand; the last ``cache_size`` items are kept (read-only)."""

    def __init__(self, rows: PackedRows, case_rows: list, axis: int, cache_size: int = 1):
        self.rows, self.case_rows, self.axis, self.cache_size = rows, case_rows, axis, cache_size
        self._cache = OrderedDict()

    def __len__(self) -> int:
        return len(self.case_rows)

    def __getitem__(self, index: int) -> np.ndarray:
        index = range(len(self))[index]
        if index not in self._cache:
            stacked = np.stack([self.rows[row] for row in self.case_rows[index]], axis=self.axis)
            stacked.flags.writeable = False        # shared by every caller of the cache
            self._cache[index] = stacked
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        self._cache.move_to_end(index)
        return self._cache[index]


class NativeVolumes:
    """The cases of a ``NativeSlices`` store as whole volumes, assembled from their slices when asked for (one
    volume of each kind kept): ``images`` ((C, D, H, W) float32), ``label_maps`` ((D, H, W) int16), ``map_ids``
    [(case_id, None)], ``properties`` (the real cases' reader properties). ``slices`` is the store itself.

    ``row`` and ``slice`` take the same arguments as ``NativeSlices``'s (slice index None), so code written for
    one map at a time (the balancer, the copy-paste replay) takes volumes unchanged."""

    def __init__(self, slices: NativeSlices, cache_size: int = 1):
        self.slices = slices
        by_case = slices.case_rows()
        case_ids = list(by_case)
        self.map_ids = [(case_id, None) for case_id in case_ids]
        self._rows = {case_id: row for row, case_id in enumerate(case_ids)}
        self.images = CaseStacks(slices.images, list(by_case.values()), axis=1, cache_size=cache_size)
        self.label_maps = CaseStacks(slices.label_maps, list(by_case.values()), axis=0, cache_size=cache_size)
        self.properties = slices.properties

    def __len__(self) -> int:
        return len(self.map_ids)

    def row(self, case_id: str, slice_index=None) -> int:
        """The row of case ``case_id`` (``slice_index`` must be None: a row is a whole case)."""
        if slice_index is not None:
            raise ValueError(f"a volume row is a whole case; got slice {slice_index} of {case_id}")
        return self._rows[case_id]

    def slice(self, case_id: str, slice_index=None):
        """(image, label map) of the whole volume of ``case_id``."""
        row = self.row(case_id, slice_index)
        return self.images[row], self.label_maps[row]


def open_native_slices(dataset: RawDataset, case_ids, root=None, progress=True) -> NativeSlices:
    """The store of these cases' slices under ``root`` (default ``dataset_cache_root``; without one a temporary
    folder), built now when missing."""
    case_ids = list(case_ids)
    if not case_ids:
        raise NnsynthError(f"{dataset.name}: no cases to read slices from")
    key = {"format": STORE_FORMAT, "dataset": dataset.name, "labels": dict(dataset.labels), "cases": case_ids,
           "files": case_files_key(dataset, case_ids)}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    root = root if root is not None else dataset_cache_root(dataset)
    keep_alive = None
    if root is None:
        keep_alive = tempfile.TemporaryDirectory(prefix="nnsynth_native_slices_")
        root = keep_alive.name
    folder = Path(root) / f"native_{digest}"
    if not (folder / META_NAME).is_file():
        try:
            build_native_slices(dataset, key, folder, progress)
        except OSError as error:         # a full or read-only disk: drop the partial store, say which folder
            shutil.rmtree(folder.with_name(f"{folder.name}.incomplete.{os.getpid()}"), ignore_errors=True)
            raise storage_error(folder, error, "write the slice store") from None
    return NativeSlices(folder, keep_alive)


def build_native_slices(dataset: RawDataset, key: dict, folder: Path, progress=True):
    """Read every slice of ``key['cases']`` into ``folder``, one case in memory at a time."""
    temp = folder.with_name(f"{folder.name}.incomplete.{os.getpid()}")
    shutil.rmtree(temp, ignore_errors=True)
    temp.mkdir(parents=True)
    images, label_maps = PackedRows(temp / "images.bin", IMAGE_DTYPE), PackedRows(temp / "label_maps.bin", LABEL_DTYPE)
    cases, slice_indices, properties = [], [], {}
    for case_number, case_id in enumerate(tqdm(key["cases"], desc=f"reading {dataset.name} slices", unit="case",
                                               disable=not progress)):
        image, label_map, properties[case_id] = dataset.read_case(case_id)
        for slice_index in range(image.shape[1]):
            images.append(image[:, slice_index].astype(IMAGE_DTYPE, copy=False))
            label_maps.append(label_map[slice_index].astype(LABEL_DTYPE, copy=False))
            cases.append(case_number)
            slice_indices.append(slice_index)
    for name in ("images.bin", "label_maps.bin"):
        with open(temp / name, "rb+") as handle:
            os.fsync(handle.fileno())
    with open(temp / "slices.npz", "wb") as handle:
        np.savez(handle, **images.index_arrays("image"), **label_maps.index_arrays("label"),
                 case=np.asarray(cases, dtype=np.int32), slice=np.asarray(slice_indices, dtype=np.int32))
        handle.flush()
        os.fsync(handle.fileno())
    with open(temp / "properties.pkl", "wb") as handle:
        pickle.dump(properties, handle)
        handle.flush()
        os.fsync(handle.fileno())
    write_json_atomic({**key, "num_slices": len(cases)}, temp / META_NAME)
    try:
        os.rename(temp, folder)
    except OSError:
        if not (folder / META_NAME).is_file():      # not another process's complete store: a real failure
            raise
        shutil.rmtree(temp, ignore_errors=True)     # another process finished the same store first


def derived_rows(rows: Sequence, fn, description: str = None) -> PackedRows:
    """``fn(rows[i])`` for every row, computed once in one pass and kept in a temporary ``PackedRows`` (e.g. the
    body mask of every real slice)."""
    derived = PackedRows.temporary("nnsynth_derived_")
    for row in tqdm(rows, desc=description, unit="map", disable=description is None):
        derived.append(fn(row))
    return derived


def evenly_spread(count: int, at_most: int) -> list:
    """At most ``at_most`` indices of ``range(count)``, evenly spread (all of them when there are few enough)."""
    if count <= at_most:
        return list(range(count))
    return sorted(set(np.linspace(0, count - 1, at_most).round().astype(int).tolist()))
