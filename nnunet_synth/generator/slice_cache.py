"""Model-ready training slices on disk: the raw cases are read once into a compact cache that training streams
from, so that memory does not grow with the number of slices.

A cache is a folder ``<root>/<key>/`` (``<root>`` = ``$nnUNet_preprocessed/<Dataset>/nnsynth_slice_cache`` or the
run folder's ``slice_cache``) holding ``images.bin`` (N, C, S, S) float16 in model space [-1, 1] (C image
channels), ``label_maps.bin`` (N, S, S) uint8/uint16 conditioning maps (nnU-Net's ignore label already set to
background, ``mark_unannotated``) and ``cache.json`` (shape, dtypes, what the key covers). The key is a hash of the
dataset's files (names, sizes, modification times), the cases, the window, the model size and the region classes: any
change makes a new cache. It is written under a temporary name and renamed when complete. Rows are read with
``os.pread`` (no memory map), so a process holds only the batches it asks for.
"""
import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np

from nnunet_synth.atomic import write_json_atomic
from nnunet_synth.dataset import ImageWindows, RawDataset, fit_slice, iter_slices
from nnunet_synth.dataset.native_slices import case_files_key, dataset_cache_root
from nnunet_synth.errors import NnsynthError, storage_error
from nnunet_synth.generator.ablation import mark_unannotated
from nnunet_synth.generator.data import MODEL_MINIMUM, mask_outside_region

CACHE_FORMAT = 2
IMAGE_DTYPE = np.float16
META_NAME = "cache.json"
TEMP_SUFFIX = ".incomplete"


def slice_cache_root(dataset: RawDataset, run_folder) -> Path:
    """``$nnUNet_preprocessed/<Dataset>/nnsynth_slice_cache`` (shared by runs), else ``<run_folder>/slice_cache``."""
    return dataset_cache_root(dataset) or Path(run_folder) / "slice_cache"


def cache_key(dataset: RawDataset, case_ids, window: ImageWindows, image_size: int, region_values=None) -> dict:
    """What a cache depends on; its hash names the cache folder."""
    return {"format": CACHE_FORMAT, "dataset": dataset.name, "labels": dict(dataset.labels), "cases": list(case_ids),
            "files": case_files_key(dataset, case_ids), "window": window.to_dict(), "image_size": int(image_size),
            "region_values": None if region_values is None else [int(v) for v in region_values]}


class CachedArray:
    """A (N, ...) array on disk; ``array[indices]`` reads those rows (as ``dtype``) with ``os.pread``."""

    def __init__(self, path: Path, shape, stored_dtype, dtype):
        self.path, self.shape = Path(path), tuple(shape)
        self.stored_dtype, self.dtype = np.dtype(stored_dtype), np.dtype(dtype)
        self._row_items = int(np.prod(self.shape[1:]))
        self._row_bytes = self._row_items * self.stored_dtype.itemsize
        self._fd, self._fd_pid = None, None

    def __len__(self) -> int:
        return self.shape[0]

    def _file(self) -> int:
        if self._fd is None or self._fd_pid != os.getpid():     # DataLoader workers open their own
            self._fd, self._fd_pid = os.open(self.path, os.O_RDONLY), os.getpid()
        return self._fd

    def __getitem__(self, index) -> np.ndarray:
        if isinstance(index, slice):
            index = np.arange(len(self))[index]
        indices = np.asarray(index, dtype=np.int64)
        rows = np.empty((indices.size, *self.shape[1:]), dtype=self.dtype)
        for out, row in enumerate(indices.ravel()):
            if not -len(self) <= row < len(self):
                raise IndexError(f"row {row} of {len(self)}")
            data = os.pread(self._file(), self._row_bytes, int(row % len(self)) * self._row_bytes)
            rows[out] = np.frombuffer(data, dtype=self.stored_dtype).reshape(self.shape[1:])
        return rows[0] if indices.ndim == 0 else rows.reshape(*indices.shape, *self.shape[1:])

    def __getstate__(self):
        return {**self.__dict__, "_fd": None, "_fd_pid": None}


class SliceCache:
    """The cached slices of one cache folder: ``images`` (float32 rows) and ``label_maps`` (int64 rows)."""

    def __init__(self, folder):
        self.folder = Path(folder)
        meta = json.loads((self.folder / META_NAME).read_text())
        shape = (meta["num_slices"], meta["image_size"], meta["image_size"])
        image_shape = (meta["num_slices"], meta["num_channels"], meta["image_size"], meta["image_size"])
        self.images = CachedArray(self.folder / "images.bin", image_shape, meta["image_dtype"], np.float32)
        self.label_maps = CachedArray(self.folder / "label_maps.bin", shape, meta["label_dtype"], np.int64)
        self.meta = meta

    def __len__(self) -> int:
        return len(self.images)


def open_slice_cache(dataset: RawDataset, case_ids, window: ImageWindows, image_size: int, root,
                     region_values=None, progress=False, store=None) -> SliceCache:
    """The cache of these slices under ``root``, built now when missing (one pass over ``store``, the cases'
    ``NativeSlices``, when given; else over the raw cases)."""
    key = cache_key(dataset, case_ids, window, image_size, region_values)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    folder = Path(root) / digest
    if not (folder / META_NAME).is_file():
        try:
            build_slice_cache(dataset, key, window, folder, region_values, progress, store)
        except OSError as error:         # a full or read-only disk: drop the partial cache, say which folder
            shutil.rmtree(folder.with_name(folder.name + TEMP_SUFFIX), ignore_errors=True)
            raise storage_error(folder, error, "write the slice cache") from None
    return SliceCache(folder)


def build_slice_cache(dataset: RawDataset, key: dict, window: ImageWindows, folder: Path, region_values=None,
                      progress=False, store=None):
    """Stream every slice (window, ``fit_slice`` to the model size, region masking) into ``folder``: one slice in
    memory at a time."""
    temp = folder.with_name(folder.name + TEMP_SUFFIX)
    shutil.rmtree(temp, ignore_errors=True)
    temp.mkdir(parents=True)
    label_dtype = np.uint8 if dataset.num_classes <= 256 else np.uint16
    count = 0
    with open(temp / "images.bin", "wb") as images, open(temp / "label_maps.bin", "wb") as label_maps:
        for labelled in iter_slices(dataset, key["cases"], progress=progress, store=store):
            image, label_map, _ = fit_slice(window.to_model(labelled.image), labelled.label_map, key["image_size"],
                                            image_pad_value=MODEL_MINIMUM)
            if region_values is not None:
                image = mask_outside_region(image[None], label_map[None], region_values)[0]
            label_map = mark_unannotated(label_map, dataset.ignore_label)
            images.write(np.ascontiguousarray(image, dtype=IMAGE_DTYPE).tobytes())
            label_maps.write(np.ascontiguousarray(label_map, dtype=label_dtype).tobytes())
            count += 1
        for handle in (images, label_maps):
            handle.flush()
            os.fsync(handle.fileno())
    if count == 0:
        shutil.rmtree(temp, ignore_errors=True)
        raise NnsynthError(f"{dataset.name}: the cases {list(key['cases'])[:5]} hold no slices")
    write_json_atomic({**key, "num_slices": count, "num_channels": window.num_channels,
                       "image_dtype": np.dtype(IMAGE_DTYPE).name, "label_dtype": np.dtype(label_dtype).name},
                      temp / META_NAME)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(temp, folder)
