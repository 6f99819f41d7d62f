"""Where a converter writes its dataset: a valid id, no silent overwrite, and a swap that never leaves a mix.

Every converter (``nnsynth_convert_covid19``, ``nnsynth_convert_real_hu``, ``nnsynth_convert_ms_lesions``,
``nnsynth_convert_sts_ct``) writes ``Dataset<id>_<name>`` through ``converted_dataset``:

- the id must be one nnU-Net accepts (1 .. 999);
- a dataset already there with that id (any name) is refused unless ``overwrite``;
- the new dataset is written into a hidden folder beside the target (``.nnsynth_tmp_Dataset<id>_<name>_...``,
  which nnU-Net's dataset search does not see) and renamed into place only once it is complete. With
  ``overwrite`` the old dataset is first renamed aside, then removed; a failed rename puts it back. The target
  name therefore holds either the old dataset or the new one, never a mix of both; a failed conversion removes
  its hidden folder and leaves the old dataset as it was.
"""
import contextlib
import os
import shutil
import tempfile
from pathlib import Path

from nnunet_synth.atomic import TEMP_PREFIX
from nnunet_synth.errors import NnsynthError, storage_error

MIN_DATASET_ID, MAX_DATASET_ID = 1, 999      # nnU-Net's ids: three digits, Dataset000 is not a dataset


def dataset_folder_name(dataset_id: int, name: str) -> str:
    return "Dataset%03d_%s" % (dataset_id, name)


def check_dataset_id(dataset_id: int):
    if not MIN_DATASET_ID <= dataset_id <= MAX_DATASET_ID:
        raise NnsynthError(f"-d/--dataset-id {dataset_id}: nnU-Net dataset ids are {MIN_DATASET_ID} .. "
                           f"{MAX_DATASET_ID}: choose an id in that range")


def existing_datasets(output_root, dataset_id: int) -> list:
    """The folders under ``output_root`` that hold a dataset with ``dataset_id`` (whatever its name)."""
    root = Path(output_root)
    if not root.is_dir():
        return []
    return sorted(path for path in root.glob("Dataset%03d_*" % dataset_id) if path.is_dir())


def check_target(output_root, dataset_id: int, name: str, overwrite: bool) -> Path:
    """The target folder of a conversion, after the checks above; nothing is written."""
    check_dataset_id(dataset_id)
    if not name or "/" in name or name.startswith("."):
        raise NnsynthError(f"-n/--dataset-name '{name}': not a folder name: give a name such as Covid19Lung")
    target = Path(output_root) / dataset_folder_name(dataset_id, name)
    taken = existing_datasets(output_root, dataset_id)
    if taken and not overwrite:
        raise NnsynthError(f"{taken[0]}: dataset id {dataset_id} already exists: pass --overwrite to replace it "
                           f"(the old dataset is removed), or choose a free id with -d")
    return target


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def converted_dataset(output_root, dataset_id: int, name: str, overwrite: bool = False):
    """Yield (the hidden folder to write the dataset into, the target folder); when the block ends without an
    error, swap the hidden folder in as ``Dataset<id>_<name>``; on an error remove it.

    The checks run before the hidden folder is made. Used as::

        with converted_dataset(root, 501, "Covid19Lung", overwrite) as (staging, target):
            ... write into staging ...
    """
    target = check_target(output_root, dataset_id, name, overwrite)
    root = target.parent
    try:
        root.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}{target.name}_", dir=root))
        staging.chmod(0o777 & ~_umask())          # mkdtemp makes it private; a dataset folder is not
    except OSError as error:
        raise storage_error(target, error) from None
    try:
        yield staging, target
        old = existing_datasets(root, dataset_id) if overwrite else []
        aside = Path(tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}{target.name}_old_", dir=root))
        moved = []
        try:
            for folder in old:
                os.replace(folder, aside / folder.name)
                moved.append(folder)
            os.replace(staging, target)
        except OSError:
            for folder in moved:                    # the previous dataset back in its place
                os.replace(aside / folder.name, folder)
            raise
        finally:
            shutil.rmtree(aside, ignore_errors=True)
    except OSError as error:
        raise storage_error(target, error) from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def add_overwrite_argument(parser):
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a dataset that already has this id (default: refuse)")
