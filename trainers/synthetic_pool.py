"""The preprocessed synthetic pool: synthetic cases preprocessed with the real dataset's own plans.

Layout, inside ``$nnUNet_preprocessed/<Dataset>/``::

    <data_identifier>/                  the real preprocessed cases (nnU-Net's; never touched here)
    <data_identifier>_synth/            the pool: <id>.b2nd, <id>_seg.b2nd, <id>.pkl per synthetic case
    <data_identifier>_synth.pool.json   what the pool holds: preprocessing signature + one content hash per case
    <data_identifier>_synth.partial/    staging folder of a running preprocessing (removed at the end)
    <data_identifier>_synth.lock        serialises concurrent updates (e.g. two folds starting together)

The pool folder holds case files only (nnU-Net infers the dataset class from the file endings in it), so the
record and the staging files live beside it. The pool is kept separate from the real folder: plans,
fingerprint and splits_final.json stay exactly those of a real-only run, and synthetic cases can never be
drawn into a validation split.

``update_synthetic_pool`` brings the pool up to date with the manifest: it is stale when the preprocessing
part of the plans changed (everything is rebuilt), or when manifest cases were added, changed or removed
(only those are redone or deleted). Each case is preprocessed into the staging folder and its files are moved
into the pool with ``os.replace``; the record lists it only afterwards, with the byte size of each of its files, so
an interrupted run leaves no half-written case and a rerun resumes where it stopped.

Every update also verifies the pool: a case whose pool file is missing or has another size than the one recorded
(truncated, overwritten) is preprocessed again, and the report names it with the reason (``repaired``). A raw
synthetic file that cannot be read or preprocessed (truncated, corrupt) stops the update with one line naming the
case and the command that replaces it (a gzip-compressed file is read to its end first: SimpleITK reads a
truncated .nii.gz without an error): the trainer never trains on such a case.
"""
import contextlib
import gzip
import hashlib
import json
import os
import shutil
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, List

from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager

from nnunet_synth.atomic import write_json_atomic
from nnunet_synth.dataset.raw_dataset import RawDataset
from nnunet_synth.errors import NnsynthError
from nnunet_synth.nnunet_paths import require_nnunet_folder
from nnunet_synth.writer.synthetic_store import SyntheticStore

POOL_SUFFIX = "_synth"
RECORD_FORMAT_VERSION = 2    # 2: per case {"content": hash, "sizes": bytes of each pool file}
CASE_FILE_SUFFIXES = (".b2nd", "_seg.b2nd", ".pkl")

# configuration keys that do not change a preprocessed case (network, batch and patch are training matters;
# the patch size only sets blosc2 chunking, i.e. read speed, not content). Every other key counts, so a key
# added by a later nnU-Net makes the pool stale rather than silently wrong.
NON_PREPROCESSING_CONFIGURATION_KEYS = frozenset({
    "batch_size", "patch_size", "architecture", "batch_dice", "median_image_size_in_voxels",
    "resampling_fn_probabilities", "resampling_fn_probabilities_kwargs", "next_stage", "previous_stage",
    "inherits_from",
})
NON_PREPROCESSING_PLANS_KEYS = frozenset({
    "plans_name", "configurations", "experiment_planner_used", "original_median_shape_after_transp",
    "original_median_spacing_after_transp",
})


def pool_folder(preprocessed_dataset_folder_base, data_identifier: str) -> Path:
    return Path(preprocessed_dataset_folder_base) / (data_identifier + POOL_SUFFIX)


def pool_record_file(pool: Path) -> Path:
    return pool.with_name(pool.name + ".pool.json")


def _staging_folder(pool: Path) -> Path:
    return pool.with_name(pool.name + ".partial")


def _lock_file(pool: Path) -> Path:
    return pool.with_name(pool.name + ".lock")


def preprocessing_signature(plans_manager: PlansManager, configuration_manager: ConfigurationManager,
                            dataset_json: dict) -> str:
    """A hash of everything in the plans and dataset.json that changes how a case is preprocessed."""
    relevant = {
        "plans": {k: v for k, v in plans_manager.plans.items() if k not in NON_PREPROCESSING_PLANS_KEYS},
        "configuration": {k: v for k, v in configuration_manager.configuration.items()
                          if k not in NON_PREPROCESSING_CONFIGURATION_KEYS},
        "labels": dataset_json.get("labels"),
        "regions_class_order": dataset_json.get("regions_class_order"),
    }
    return hashlib.sha256(json.dumps(relevant, sort_keys=True, default=str).encode()).hexdigest()


def case_content_hash(image_files, label_file: Path) -> str:
    """A hash of the bytes of one synthetic case, every channel and the label (small single-slice files; robust to
    copies and touches)."""
    digest = hashlib.sha256()
    for path in [*image_files, label_file]:
        digest.update(Path(path).read_bytes())
        digest.update(b"\0")
    return digest.hexdigest()


@dataclass
class PoolReport:
    folder: Path
    preprocessed: List[str] = field(default_factory=list)
    reused: List[str] = field(default_factory=list)
    removed: List[str] = field(default_factory=list)       # no longer in the manifest
    repaired: dict = field(default_factory=dict)            # case id -> why its pool files were redone
    rebuilt: bool = False

    @property
    def case_ids(self) -> List[str]:
        return sorted(self.preprocessed + self.reused)

    def summary(self) -> str:
        named = "".join(f"; {case_id} {reason}" for case_id, reason in sorted(self.repaired.items()))
        return (f"synthetic pool {self.folder}: {len(self.case_ids)} cases ({len(self.preprocessed)} preprocessed, "
                f"{len(self.reused)} up to date, {len(self.removed)} removed as no longer in the manifest"
                f"{': ' + ', '.join(self.removed) if self.removed else ''}"
                f"{', rebuilt because the plans changed' if self.rebuilt else ''}){named}")

    def to_json(self) -> dict:
        return {"folder": str(self.folder), "cases": len(self.case_ids), "preprocessed": self.preprocessed,
                "removed": self.removed, "repaired": self.repaired, "rebuilt": self.rebuilt}


@contextlib.contextmanager
def _exclusive_lock(lock_file: Path):
    try:
        import fcntl
    except ImportError:          # no advisory locks on this platform: run unlocked
        yield
        return
    with open(lock_file, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _read_record(record_file: Path):
    try:
        with open(record_file) as handle:
            record = json.load(handle)
    except (OSError, json.JSONDecodeError):
        return None
    if not isinstance(record, dict) or record.get("format_version") != RECORD_FORMAT_VERSION:
        return None
    return record


def _case_files(folder: Path, case_id: str):
    return [folder / (case_id + suffix) for suffix in CASE_FILE_SUFFIXES]


def _remove_case(pool: Path, case_id: str):
    for path in _case_files(pool, case_id):
        path.unlink(missing_ok=True)


def _file_sizes(folder: Path, case_id: str) -> list:
    return [path.stat().st_size for path in _case_files(folder, case_id)]


def _damage(pool: Path, case_id: str, expected_sizes) -> str:
    """Why the pool files of a recorded case cannot be used ('' when they are whole)."""
    for path, expected in zip(_case_files(pool, case_id), expected_sizes):
        if not path.is_file():
            return f"{path.name} was missing"
        if path.stat().st_size != expected:
            return f"{path.name} had {path.stat().st_size} bytes instead of {expected} (truncated or overwritten)"
    return ""


def _raw_content_hash(store: SyntheticStore, case_id: str) -> str:
    try:
        return case_content_hash(store.image_files(case_id), store.label_file(case_id))
    except OSError as error:
        raise NnsynthError(_raw_case_problem(store, case_id, f"cannot be read ({error.strerror or error})")) from None


def _truncated_file(store: SyntheticStore, case_id: str) -> str:
    """'' when every gzip-compressed file of the case decompresses to its end, else what is wrong (SimpleITK reads a
    truncated .nii.gz without an error, as zeros)."""
    for path in [*store.image_files(case_id), store.label_file(case_id)]:
        if not path.name.endswith(".gz"):
            continue
        try:
            with gzip.open(path) as handle:
                while handle.read(1 << 20):
                    pass
        except (OSError, EOFError, zlib.error) as error:
            return f"has a truncated or corrupt file {path.name} ({error})"
    return ""


def _raw_case_problem(store: SyntheticStore, case_id: str, problem: str) -> str:
    fold = store.cases[case_id].get("fold")
    return (f"{store.label_file(case_id).parent.parent / 'imagesSynth'}/{case_id}_*: synthetic case {case_id} (fold "
            f"{fold}) {problem}: replace the fold's cases with nnsynth_generate {store.dataset.name} --fold {fold} "
            f"--overwrite (or remove them with nnsynth_clean {store.dataset.name} --fold {fold})")


def _identifier_of(file_name: str) -> str:
    for suffix in ("_seg.b2nd", ".b2nd", ".pkl"):   # "_seg.b2nd" before ".b2nd"
        if file_name.endswith(suffix):
            return file_name[:-len(suffix)]
    return file_name


def update_synthetic_pool(raw_dataset_folder, preprocessed_dataset_folder_base, plans: dict,
                          configuration_name: str, dataset_json: dict,
                          log: Callable[[str], None] = print, case_ids=None) -> PoolReport:
    """Bring the pool of ``configuration_name`` up to date with the synthetic manifest; return what it holds.

    ``plans`` and ``dataset_json`` are the real dataset's (``$nnUNet_preprocessed/<Dataset>/<plans>.json`` and
    ``dataset.json``); the configuration's own preprocessor class does the work (``run_case_save``).
    ``case_ids`` limits the work to these cases (e.g. the ones a fold may use): other cases already in the pool
    stay while the manifest lists them, and the report lists ``case_ids`` only.
    """
    plans_manager = PlansManager(plans)
    configuration_manager = plans_manager.get_configuration(configuration_name)
    if len(configuration_manager.patch_size) == 2 and list(plans_manager.transpose_forward)[0] != 0:
        raise NnsynthError(f"the plans transpose axes ({plans_manager.transpose_forward}), so a single-slice "
                           f"synthetic case would not lie in the slicing plane of configuration "
                           f"{configuration_name}: mixing needs transpose_forward starting with 0")
    store = SyntheticStore(RawDataset(raw_dataset_folder))
    pool = pool_folder(preprocessed_dataset_folder_base, configuration_manager.data_identifier)
    record_file, staging = pool_record_file(pool), _staging_folder(pool)
    signature = preprocessing_signature(plans_manager, configuration_manager, dataset_json)
    report = PoolReport(pool)

    with _exclusive_lock(_lock_file(pool)):
        record = _read_record(record_file)
        if record is None or record.get("preprocessing_signature") != signature:
            report.rebuilt = record is not None
            if pool.exists():
                shutil.rmtree(pool)
            record = {"format_version": RECORD_FORMAT_VERSION, "dataset": store.dataset.name,
                      "configuration": configuration_name, "data_identifier": configuration_manager.data_identifier,
                      "preprocessing_signature": signature, "cases": {}}
        pool.mkdir(parents=True, exist_ok=True)
        if staging.exists():
            shutil.rmtree(staging)        # files of an interrupted case; the case is redone below
        staging.mkdir()
        done = record["cases"]

        in_manifest = set(store.complete_case_ids())
        wanted_ids = in_manifest if case_ids is None else in_manifest & set(case_ids)
        wanted = {case_id: _raw_content_hash(store, case_id) for case_id in sorted(wanted_ids)}
        for case_id in sorted(done):
            damage = _damage(pool, case_id, done[case_id]["sizes"])
            outdated = case_id in wanted and wanted[case_id] != done[case_id]["content"]
            if case_id not in in_manifest or outdated or damage:
                _remove_case(pool, case_id)
                del done[case_id]
                if case_id not in in_manifest:
                    report.removed.append(case_id)
                elif damage and not outdated:
                    report.repaired[case_id] = f"preprocessed again: {damage}"
        for path in pool.iterdir():       # files the record does not list (e.g. copied in by hand)
            if _identifier_of(path.name) not in done:
                shutil.rmtree(path) if path.is_dir() else path.unlink()
        write_json_atomic(record, record_file)

        preprocessor = configuration_manager.preprocessor_class(verbose=False)
        todo = [case_id for case_id in sorted(wanted) if case_id not in done]
        report.reused = sorted(case_id for case_id in done if case_id in wanted)
        if todo:
            log(f"preprocessing {len(todo)} synthetic cases with {plans_manager.plans_name}/{configuration_name} "
                f"into {pool}")
        for case_id in todo:
            staged = str(staging / case_id)
            truncated = _truncated_file(store, case_id)
            if truncated:
                raise NnsynthError(_raw_case_problem(store, case_id, truncated))
            try:
                preprocessor.run_case_save(staged, [str(path) for path in store.image_files(case_id)],
                                           str(store.label_file(case_id)), plans_manager, configuration_manager,
                                           dataset_json)
            except (KeyboardInterrupt, SystemExit):
                raise
            except Exception as error:  # noqa: BLE001 - a reader's error on a damaged file, named in one line
                raise NnsynthError(_raw_case_problem(store, case_id, f"cannot be preprocessed ({type(error).__name__}: "
                                                                     f"{error})")) from None
            sizes = _file_sizes(staging, case_id)
            for staged_file, pool_file in zip(_case_files(staging, case_id), _case_files(pool, case_id)):
                os.replace(staged_file, pool_file)     # each file whole; the record lists the case after all three
            done[case_id] = {"content": wanted[case_id], "sizes": sizes}
            write_json_atomic(record, record_file)
            report.preprocessed.append(case_id)
        shutil.rmtree(staging)
    return report


def update_pool_for_preprocessed_dataset(dataset_name: str, configuration_name: str, plans_identifier: str,
                                         log: Callable[[str], None] = print) -> PoolReport:
    """``update_synthetic_pool`` for a dataset by name, reading plans and dataset.json from nnUNet_preprocessed."""
    raw_folder = require_nnunet_folder("nnUNet_raw", "the synthetic pool's manifest") / dataset_name
    base = require_nnunet_folder("nnUNet_preprocessed", "the synthetic pool") / dataset_name
    plans_file = base / (plans_identifier + ".json")
    if not plans_file.is_file():
        raise NnsynthError(f"{plans_file} is missing: run nnUNetv2_plan_and_preprocess -d {dataset_name} first "
                           f"(or give the plans with -p)")
    with open(plans_file) as handle:
        plans = json.load(handle)
    if configuration_name not in plans.get("configurations", {}):
        raise NnsynthError(f"{plans_file} has no configuration '{configuration_name}': choose one of "
                           f"{', '.join(plans.get('configurations', {}))}")
    with open(base / "dataset.json") as handle:
        dataset_json = json.load(handle)
    return update_synthetic_pool(raw_folder, base, plans, configuration_name, dataset_json, log=log)
