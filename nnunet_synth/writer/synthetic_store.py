"""Synthetic cases of a raw dataset: ``imagesSynth/``, ``labelsSynth/`` and the manifest ``synthetic.json``.

Layout (inside the raw dataset folder, beside imagesTr/labelsTr, which are never touched)::

    imagesSynth/synth_f0_00000_0000{file_ending}  image in the dataset's units, pixel type and file ending
    imagesSynth/synth_f0_00000_0001{file_ending}  ... one file per input channel, as nnU-Net names them
    labelsSynth/synth_f0_00000{file_ending}       the conditioning label map
    recordsSynth/synth_f0_00000.json              the case's record (provenance, seed, sampler, quality)
    synthetic.json                                {"format_version": 2, "dataset": ...,
                                                   "folds": {fold: settings and reports of that fold's run},
                                                   "cases": {id: record}}
    synthetic_preview_fold0.png                   the preview grid of fold 0's cases
    synthetic.lock                                held shared by every generating process (shards, other folds)
                                                  and exclusively by clean / score / --overwrite
    synthetic.index.lock                          held while ``synthetic.json`` is compiled
    synthetic.writers.lock                        held shared by every generating process (alone: may clean up)
    synthetic.claims/fold_<k>.shard_<i>.lock      held by the process writing shard i of fold k, holding its recipe

Each case's record is written once, after both of its files (fsynced), so writing N cases costs O(N); the
records are the truth, and ``synthetic.json`` is the index compiled from them (and the fold records) at the end of
every writing command, rebuilt atomically. Readers take the records, so an interrupted run's cases count.
Several generating processes may write one store at once (shards of one fold, other folds): each writes only its
own cases, and the index is compiled under its own lock from the records on disk and the fold records (a
process's changed fold records merged into those on disk). Temporary files an interrupted run left are removed
only by a process that finds itself alone (the other processes' temporary files are in flight).

The cases of several nnU-Net folds live side by side: ``synth_f<fold>_<index>`` was made for fold ``<fold>``
(``0``-``4`` or ``all``) by a generator trained on that fold's training cases only, and its entry lists every
real case it depends on (``depends_on``, see ``nnunet_synth/provenance.py``).

One fold, one recipe: before its first case a generating process claims its fold and shard under the index lock
(``fold_writer``). Processes writing one fold at once must share the recipe, batch size and shard count and write
different shards; any other is refused in one line, as is a recipe that differs from the fold's cases on disk.
Each record carries its fold's recipe, so ``recipe_mismatches`` finds a fold whose cases disagree with it.

A case exists once its record is written, which happens after both files are in place; every file is
written atomically, so an interrupted run leaves no partial file and a rerun rewrites the same names.
Stock nnU-Net commands read imagesTr/labelsTr only, so the raw dataset stays real-only for them.
"""
import contextlib
import copy
import json
import os
import shutil
import socket
from pathlib import Path

import numpy as np

from nnunet_synth.atomic import TEMP_PREFIX, remove_stale_temp_files, write_json_atomic
from nnunet_synth.dataset.raw_dataset import RawDataset
from nnunet_synth.dataset.writing import write_volume
from nnunet_synth.errors import NnsynthError, storage_error

SYNTH_IMAGES_FOLDER = "imagesSynth"
SYNTH_LABELS_FOLDER = "labelsSynth"
SYNTH_RECORDS_FOLDER = "recordsSynth"
MANIFEST_NAME = "synthetic.json"
LOCK_NAME = "synthetic.lock"
INDEX_LOCK_NAME = "synthetic.index.lock"
WRITERS_LOCK_NAME = "synthetic.writers.lock"
CLAIMS_FOLDER = "synthetic.claims"
PREVIEW_PREFIX = "synthetic_preview"
FORMAT_VERSION = 2


def synthetic_case_id(index: int, fold) -> str:
    """``synth_f<fold>_<index>``: case ``index`` of the cases made for nnU-Net fold ``fold``."""
    return "synth_f%s_%05d" % (fold, index)


def preview_name(fold) -> str:
    return f"{PREVIEW_PREFIX}_fold{fold}.png"


class SyntheticStore:
    """Reads and writes the synthetic cases of one raw dataset."""

    def __init__(self, dataset: RawDataset):
        self.dataset = dataset
        self.images_folder = dataset.folder / SYNTH_IMAGES_FOLDER
        self.labels_folder = dataset.folder / SYNTH_LABELS_FOLDER
        self.records_folder = dataset.folder / SYNTH_RECORDS_FOLDER
        self.manifest_file = dataset.folder / MANIFEST_NAME
        self.manifest = self._read_manifest()

    @property
    def manifest(self) -> dict:
        return self._manifest

    @manifest.setter
    def manifest(self, manifest: dict):
        self._manifest = manifest
        self._folds_as_read = copy.deepcopy(manifest["folds"])     # to tell this process's fold changes apart

    def _read_manifest(self) -> dict:
        if not self.manifest_file.is_file():
            return {"format_version": FORMAT_VERSION, "dataset": self.dataset.name, "folds": {},
                    "cases": self._read_records()}
        try:
            with open(self.manifest_file) as handle:
                manifest = json.load(handle)
        except json.JSONDecodeError as error:
            raise NnsynthError(f"{self.manifest_file} is not valid JSON ({error.msg}): run nnsynth_clean "
                               f"{self.dataset.name} and generate again") from None
        if manifest.get("format_version") == 1:
            raise NnsynthError(f"{self.manifest_file} was written by an older nnunet-synth that did not record which "
                               f"real cases each synthetic case depends on (its cases could leak validation "
                               f"patients): run nnsynth_clean {self.dataset.name} and generate again")
        if manifest.get("format_version") != FORMAT_VERSION or "cases" not in manifest:
            raise NnsynthError(f"{self.manifest_file} has an unknown format: run nnsynth_clean {self.dataset.name}")
        manifest.setdefault("folds", {})
        manifest["cases"] = self._read_records()
        return manifest

    def _read_records(self) -> dict:
        records = {}
        if self.records_folder.is_dir():
            for path in sorted(self.records_folder.glob("*.json")):
                if path.name.startswith(TEMP_PREFIX):        # another process's record being written
                    continue
                try:
                    records[path.stem] = json.loads(path.read_text())
                except json.JSONDecodeError as error:
                    raise NnsynthError(f"{path} is not valid JSON ({error.msg}): delete it (its case is then made "
                                       f"again by the next nnsynth_generate run)") from None
        return records

    def record_file(self, case_id: str) -> Path:
        return self.records_folder / f"{case_id}.json"
    @property
    def cases(self) -> dict:
        return self.manifest["cases"]

    def image_file(self, case_id: str, channel: int = 0) -> Path:
        return self.images_folder / f"{case_id}_{channel:04d}{self.dataset.file_ending}"

    def image_files(self, case_id: str) -> list:
        """The case's image files, one per input channel, in nnU-Net's channel order."""
        return [self.image_file(case_id, channel) for channel in range(self.dataset.num_channels)]

    def label_file(self, case_id: str) -> Path:
        return self.labels_folder / f"{case_id}{self.dataset.file_ending}"

    def is_complete(self, case_id: str) -> bool:
        """True when the case has its record and all of its files exist."""
        return (case_id in self.cases and self.label_file(case_id).is_file()
                and all(path.is_file() for path in self.image_files(case_id)))

    def complete_case_ids(self, fold=None):
        """Cases whose entry and files exist; only those made for ``fold`` when it is given."""
        return sorted(case_id for case_id, entry in self.cases.items()
                      if (fold is None or str(entry.get("fold")) == str(fold)) and self.is_complete(case_id))

    def fold_record(self, fold) -> dict:
        """Settings and reports of the run that made fold ``fold``'s cases (created empty when missing)."""
        return self.manifest["folds"].setdefault(str(fold), {})

    def preview_file(self, fold) -> Path:
        return self.dataset.folder / preview_name(fold)

    @contextlib.contextmanager
    def exclusive_writer(self):
        """Hold the store's lock alone (removing or rewriting cases: clean, score, --overwrite): refused with a
        clear message while another process writes the store."""
        try:
            import fcntl
        except ImportError:          # no advisory locks on this platform (as in the synthetic pool): run unlocked
            self._enter_alone()
            yield self
            return
        with self._open_lock(LOCK_NAME) as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise NnsynthError(f"{self.dataset.folder / LOCK_NAME}: another process is writing synthetic cases "
                                   f"of {self.dataset.name}: wait for it to finish, then run this command "
                                   f"again") from None
            try:
                self._enter_alone()
                yield self
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    @contextlib.contextmanager
    def shared_writer(self):
        """Hold the store's lock shared while adding cases: several generating processes (shards, other folds)
        may, each writing only its own cases. Refused while clean / score / --overwrite holds it alone."""
        try:
            import fcntl
        except ImportError:
            self._enter_alone()
            yield self
            return
        with self._open_lock(LOCK_NAME) as handle, self._open_lock(WRITERS_LOCK_NAME) as writers:
            try:
                fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                raise NnsynthError(f"{self.dataset.folder / LOCK_NAME}: another process is removing or rescoring "
                                   f"synthetic cases of {self.dataset.name} (nnsynth_clean, nnsynth_score or "
                                   f"--overwrite): wait for it to finish, then run this command again") from None
            try:
                # every generating process holds the writers' lock shared; the one that gets it alone may drop
                # what interrupted runs left (no other process has temporary files in flight)
                try:
                    fcntl.flock(writers, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    self._remove_stale_temp_files()
                except BlockingIOError:
                    pass
                fcntl.flock(writers, fcntl.LOCK_SH)     # blocks only while another process is alone (briefly)
                self.manifest = self._read_manifest()
                yield self
            finally:
                fcntl.flock(writers, fcntl.LOCK_UN)
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _open_lock(self, name: str):
        path = self.dataset.folder / name
        try:
            return open(path, "a")
        except OSError as error:
            raise storage_error(path, error, "create the lock file") from None

    @contextlib.contextmanager
    def fold_writer(self, fold, recipe: dict, batch_size: int, num_shards: int = 1, shard_index: int = 0):
        """Claim shard ``shard_index`` of fold ``fold`` for this process (inside ``shared_writer``) before its first
        case is written, and hold the claim until the block ends. Refused in one line when another live process
        writes the fold with another recipe, batch size or shard count, or this very shard; or when the fold's
        cases on disk were made with another recipe (or disagree among themselves)."""
        claim = {"recipe": recipe, "batch_size": batch_size, "num_shards": num_shards}
        try:
            import fcntl
        except ImportError:
            self.check_fold_recipe(fold, recipe)
            yield
            return
        claims = self.dataset.folder / CLAIMS_FOLDER
        mine = claims / f"fold_{fold}.shard_{shard_index}.lock"
        with self._index_lock():
            try:
                claims.mkdir(exist_ok=True)
            except OSError as error:
                raise storage_error(claims, error, "create the folder") from None
            for path in sorted(claims.glob(f"fold_{fold}.shard_*.lock")):
                other = _live_claim(path, fcntl)
                if other is None:
                    continue
                who = f"another nnsynth_generate (pid {other.get('pid')} on {other.get('host')})"
                changed = claim_differences(other, claim)
                if changed:
                    raise NnsynthError(f"{path}: {who} is writing fold {fold} of {self.dataset.name} with other "
                                       f"settings ({', '.join(changed)}): wait for it to finish and rerun with its "
                                       f"settings, or write another fold (--fold)")
                if path == mine:
                    shards = "" if recipe.get("image_source") == "copy-paste" else \
                        ", or start another --shard-index of --num-shards"       # copy-paste runs unsharded
                    raise NnsynthError(f"{path}: {who} is writing shard {shard_index} of fold {fold} with the same "
                                       f"settings: wait for it to finish (a rerun then resumes){shards}")
            self.manifest = self._read_manifest()       # the fold's cases and recipe as they are on disk now
            self.check_fold_recipe(fold, recipe)
            try:
                handle = os.open(mine, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as error:
                raise storage_error(mine, error, "create the claim") from None
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)    # free: live claims were refused above
            os.ftruncate(handle, 0)
            os.write(handle, json.dumps({**claim, "shard_index": shard_index, "pid": os.getpid(),
                                         "host": socket.gethostname()}).encode())
        try:
            yield
        finally:
            mine.unlink(missing_ok=True)
            os.close(handle)

    def check_fold_recipe(self, fold, recipe: dict):
        """Refuse ``recipe`` when fold ``fold`` holds complete cases made with another one (recorded for the fold or
        in a case's record)."""
        fold_cases = self.complete_case_ids(fold)
        if not fold_cases:
            return
        previous = self.fold_record(fold).get("settings")
        changed = recipe_differences(previous, recipe) if previous is not None else []
        if not changed:
            mismatched = self.recipe_mismatches(fold)
            if mismatched:
                changed = recipe_differences(self.cases[mismatched[0]]["recipe"], recipe) or ["mixed recipes"]
        if changed:
            raise NnsynthError(f"{self.manifest_file} holds cases of fold {fold} made with other settings "
                               f"({', '.join(changed)}): rerun with --overwrite or remove them with nnsynth_clean "
                               f"{self.dataset.name} --fold {fold}")

    def recipe_mismatches(self, fold) -> list:
        """Complete cases of ``fold`` whose recorded recipe differs from the fold's (cases written before records
        carried a recipe are not compared)."""
        recipe = self.manifest["folds"].get(str(fold), {}).get("settings")
        return [case_id for case_id in self.complete_case_ids(fold)
                if "recipe" in self.cases[case_id] and self.cases[case_id]["recipe"] != recipe]

    def _enter_alone(self):
        """No other process writes the store: drop what an interrupted run left, read the current state."""
        self._remove_stale_temp_files()
        self.manifest = self._read_manifest()

    def _remove_stale_temp_files(self):
        for folder in (self.images_folder, self.labels_folder, self.records_folder, self.dataset.folder):
            remove_stale_temp_files(folder)

    def prepare(self):
        """Create the folders."""
        for folder in (self.images_folder, self.labels_folder, self.records_folder):
            folder.mkdir(exist_ok=True)

    def write_case(self, case_id: str, channel_images, label_map: np.ndarray, reference_properties: dict,
                   image_dtypes, entry: dict):
        """Write one synthetic case (one array per input channel in dataset units, a label map of the same shape:
        2D slices, or 3D volumes of a 3D dataset) and record ``entry``; ``image_dtypes`` gives each channel's pixel
        type.

        ``reference_properties`` are the nnU-Net reader properties of the real case the pair derives from;
        its geometry (spacing, direction, origin) is reused so the pair matches the real data: a slice of a 3D
        dataset is written as a one-slice volume, a whole volume with the real case's own geometry.
        """
        if len(channel_images) != self.dataset.num_channels or len(image_dtypes) != len(channel_images):
            raise ValueError(f"expected {self.dataset.num_channels} channel images and pixel types, got "
                             f"{len(channel_images)} and {len(image_dtypes)}")
        if any(image.ndim not in (2, 3) or image.shape != label_map.shape for image in channel_images):
            raise ValueError(f"expected 2D or 3D images and label of one shape, got "
                             f"{[image.shape for image in channel_images]} and {label_map.shape}")
        channel_images = [image.astype(dtype) for image, dtype in zip(channel_images, image_dtypes)]
        label_map = label_map.astype(np.uint8 if label_map.max() < 255 else np.uint16)
        geometry = {}
        sitk_geometry = reference_properties.get("sitk_stuff")
        if sitk_geometry is not None:
            geometry = dict(spacing_xyz=sitk_geometry["spacing"], origin=sitk_geometry["origin"],
                            direction=sitk_geometry["direction"])
            if len(sitk_geometry["spacing"]) == 3 and label_map.ndim == 2:    # a slice of a 3D dataset
                channel_images, label_map = [image[None] for image in channel_images], label_map[None]
        for channel, image in enumerate(channel_images):
            write_volume(image, self.image_file(case_id, channel), **geometry)
        write_volume(label_map, self.label_file(case_id), **geometry)
        relative_images = [str(path.relative_to(self.dataset.folder)) for path in self.image_files(case_id)]
        record = dict(entry, image=relative_images[0], images=relative_images,
                      label=str(self.label_file(case_id).relative_to(self.dataset.folder)))
        recipe = self.manifest["folds"].get(str(entry.get("fold")), {}).get("settings")
        if recipe is not None:
            record["recipe"] = recipe                   # what recipe_mismatches compares
        write_json_atomic(record, self.record_file(case_id))        # the case counts from here on
        self.cases[case_id] = record

    def save_record(self, case_id: str):
        """Write the in-memory record of ``case_id`` back to its file (after changing ``cases[case_id]``)."""
        write_json_atomic(self.cases[case_id], self.record_file(case_id))

    def update_entries(self, updates: dict):
        """Merge ``{case_id: {key: value}}`` into the records (e.g. quality scores) and recompile the index."""
        for case_id, fields in updates.items():
            self.cases[case_id].update(fields)
            self.save_record(case_id)
        self.save_manifest()

    def save_manifest(self):
        """Compile ``synthetic.json`` atomically from every case record on disk and the fold records: those this
        process changed, the others as the file on disk has them (another process may have written them)."""
        with self._index_lock():
            on_disk = self._read_manifest() if self.manifest_file.is_file() else {"folds": {}}
            folds = on_disk["folds"]
            for fold in set(self._folds_as_read) | set(self.manifest["folds"]):
                mine, as_read = self.manifest["folds"].get(fold), self._folds_as_read.get(fold)
                if mine != as_read:
                    if mine is None:
                        folds.pop(fold, None)
                    else:
                        folds[fold] = mine
            self.manifest = dict(self.manifest, folds=folds, cases=self._read_records())
            write_json_atomic(self.manifest, self.manifest_file)

    @contextlib.contextmanager
    def _index_lock(self):
        try:
            import fcntl
        except ImportError:
            yield
            return
        with self._open_lock(INDEX_LOCK_NAME) as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)          # short: the time to compile the index
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def remove_fold(self, fold) -> int:
        """Delete the cases made for ``fold`` (entries first, then files) and its preview; return the count."""
        case_ids = [case_id for case_id, entry in self.cases.items() if str(entry.get("fold")) == str(fold)]
        for case_id in case_ids:
            self.record_file(case_id).unlink(missing_ok=True)      # first: the case no longer counts
            del self.cases[case_id]
        self.manifest["folds"].pop(str(fold), None)
        self.save_manifest()
        for case_id in case_ids:
            for image_file in self.image_files(case_id):
                image_file.unlink(missing_ok=True)
            self.label_file(case_id).unlink(missing_ok=True)
        self.preview_file(fold).unlink(missing_ok=True)
        return len(case_ids)

    def remove_all(self) -> int:
        """Delete every synthetic file, the previews and the manifest; real files are untouched. Return the count."""
        count = len(self.cases)
        self.manifest_file.unlink(missing_ok=True)
        (self.dataset.folder / LOCK_NAME).unlink(missing_ok=True)
        (self.dataset.folder / INDEX_LOCK_NAME).unlink(missing_ok=True)
        (self.dataset.folder / WRITERS_LOCK_NAME).unlink(missing_ok=True)
        shutil.rmtree(self.dataset.folder / CLAIMS_FOLDER, ignore_errors=True)   # no writer runs: exclusive lock
        for folder in (self.records_folder, self.images_folder, self.labels_folder):
            if folder.is_dir():
                shutil.rmtree(folder)
        for preview in self.dataset.folder.glob(PREVIEW_PREFIX + "*.png"):
            preview.unlink()
        self.manifest = {"format_version": FORMAT_VERSION, "dataset": self.dataset.name, "folds": {}, "cases": {}}
        return count


def recipe_differences(previous: dict, recipe: dict) -> list:
    """The keys whose values differ between two recipes, as ``key old -> new``."""
    previous, recipe = previous or {}, recipe or {}
    return [f"{key} {previous.get(key)!r} -> {recipe.get(key)!r}"
            for key in sorted(set(previous) | set(recipe)) if previous.get(key) != recipe.get(key)]


def claim_differences(other: dict, claim: dict) -> list:
    """What differs between a live writer's claim and ours: recipe keys, batch size, shard count."""
    changed = recipe_differences(other.get("recipe"), claim["recipe"])
    changed += [f"{key} {other.get(key)!r} -> {claim[key]!r}" for key in ("batch_size", "num_shards")
                if other.get(key) != claim[key]]
    return changed


def _live_claim(path: Path, fcntl):
    """The claim in ``path`` if its process still holds it; a claim whose process ended is removed (None)."""
    try:
        handle = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                return json.loads(os.pread(handle, 1 << 20, 0).decode() or "{}")
            except ValueError:
                return {}                               # being written: live, settings unknown
        path.unlink(missing_ok=True)                    # its process ended
        return None
    finally:
        os.close(handle)
