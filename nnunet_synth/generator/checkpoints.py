"""Where a generator run lives, its checkpoints (accelerate state, exact resume) and loading a trained generator.

Run folder ``$nnUNet_results/<Dataset>/nnsynth_generator_<preset>_fold<F>/``::

    checkpoints/checkpoint_<i>/        accelerate ``save_state``: model, optimiser, RNG states per process and the
                                       registered LR schedule, EMA and step (custom_checkpoint_*.pkl)
    checkpoints/checkpoint_<i>/generator_config.json  written last (with ``trained_steps``): the checkpoint is complete
    final/                             a diffusers pipeline (NnsynthPipeline): model_index.json, nnsynth_pipeline.py,
                                       unet/ (EMA weights), scheduler/ (DDIM), generator_config.json, preview.png
    previews/step-<step>.png

accelerate keeps the newest ``keep_checkpoints`` checkpoints (``ProjectConfiguration(total_limit=...)``); a
checkpoint without its generator_config.json was cut short and is ignored. ``final/`` is written under a
temporary name and renamed when complete.
"""
import json
import os
import re
import shutil
import sys
from pathlib import Path

from diffusers import UNet2DModel
from safetensors import SafetensorError

from nnunet_synth.atomic import copy_file_atomic, write_json_atomic
from nnunet_synth.errors import NnsynthError, first_line
from nnunet_synth.generator.config import GENERATOR_CONFIG_NAME, GeneratorConfig
from nnunet_synth.nnunet_paths import require_nnunet_folder

CHECKPOINT_PATTERN = re.compile(r"checkpoint_(\d+)")      # accelerate's automatic checkpoint naming
OLD_CHECKPOINT_PATTERN = re.compile(r"checkpoint-(\d+)")   # before accelerate state: hand-written checkpoints
CHECKPOINTS_FOLDER = "checkpoints"
FINAL_FOLDER = "final"
PIPELINE_FILE = "nnsynth_pipeline.py"
TEMP_SUFFIX = ".incomplete"


def generator_run_folder(dataset_name: str, preset: str, fold, mode: str = "slice") -> Path:
    """``$nnUNet_results/<dataset_name>/nnsynth_generator_<preset>_fold<fold>`` (inpainting generators:
    ``nnsynth_inpaint_<preset>_fold<fold>``)."""
    results = require_nnunet_folder("nnUNet_results", "the default generator folder; or give --output")
    kind = "inpaint" if mode == "inpaint" else "generator"
    return results / dataset_name / f"nnsynth_{kind}_{preset}_fold{fold}"


def list_checkpoints(run_folder) -> list:
    """Complete checkpoint folders of a run (accelerate state + generator_config.json), oldest first."""
    return [path for path in checkpoint_folders(run_folder) if (path / GENERATOR_CONFIG_NAME).is_file()]


def checkpoint_folders(run_folder) -> list:
    """Every ``checkpoints/checkpoint_<i>`` folder, complete or not, by iteration."""
    folder = Path(run_folder) / CHECKPOINTS_FOLDER
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := CHECKPOINT_PATTERN.fullmatch(p.name))]
    return [path for _, path in sorted(found)]


def checkpoint_iteration(checkpoint_folder) -> int:
    return int(CHECKPOINT_PATTERN.fullmatch(Path(checkpoint_folder).name).group(1))


def check_no_old_checkpoints(run_folder):
    """Checkpoints of the older hand-written format (``checkpoint-<step>/training_state.pt``) cannot be resumed."""
    run_folder = Path(run_folder)
    old = sorted(p.name for p in run_folder.iterdir() if OLD_CHECKPOINT_PATTERN.fullmatch(p.name)) \
        if run_folder.is_dir() else []
    if old:
        raise NnsynthError(f"{run_folder} holds checkpoints of an older nnunet-synth ({old[-1]}/) that cannot be "
                           f"resumed: delete {run_folder} (or give another --output) and run nnsynth_train_generator "
                           f"again")


def replace_folder(temp_folder: Path, final_folder: Path):
    """Rename a completely written ``temp_folder`` onto ``final_folder`` (replacing an older one)."""
    if final_folder.exists():
        old = final_folder.with_name(final_folder.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final_folder, old)
        os.replace(temp_folder, final_folder)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(temp_folder, final_folder)


def fresh_temp_folder(final_folder: Path) -> Path:
    temp_folder = final_folder.with_name(final_folder.name + TEMP_SUFFIX)
    shutil.rmtree(temp_folder, ignore_errors=True)
    temp_folder.mkdir(parents=True)
    return temp_folder


def write_generator_config(config: GeneratorConfig, folder):
    write_json_atomic(config.to_dict(), Path(folder) / GENERATOR_CONFIG_NAME)


def read_generator_config(folder) -> GeneratorConfig:
    config_file = Path(folder) / GENERATOR_CONFIG_NAME
    try:
        with open(config_file) as handle:
            return GeneratorConfig.from_dict(json.load(handle))
    except (OSError, json.JSONDecodeError, TypeError) as error:
        raise NnsynthError(f"cannot read {config_file} ({error}): retrain the generator "
                           f"(nnsynth_train_generator)") from None


def resolve_generator_folder(folder) -> Path:
    """A folder holding generator_config.json and weights: ``folder`` itself or its ``final/``."""
    folder = Path(folder)
    if (folder / GENERATOR_CONFIG_NAME).is_file() and (folder / "unet").is_dir():
        return folder
    if (folder / FINAL_FOLDER / GENERATOR_CONFIG_NAME).is_file():
        return folder / FINAL_FOLDER
    if list_checkpoints(folder) or (folder / CHECKPOINTS_FOLDER).is_dir():
        raise NnsynthError(f"{folder} holds an unfinished training run (no {FINAL_FOLDER}/): rerun the same "
                           f"nnsynth_train_generator command to resume it")
    raise NnsynthError(f"{folder} holds no trained generator (no {GENERATOR_CONFIG_NAME} or {FINAL_FOLDER}/): "
                       f"train one with nnsynth_train_generator")


def check_dataset_matches(config: GeneratorConfig, dataset, checkpoint_folder):
    """Raise when ``dataset``'s labels (names and values) or channel count differ from the generator's."""
    if dict(dataset.labels) != dict(config.labels):
        raise NnsynthError(f"checkpoint {checkpoint_folder} was trained for classes {dict(config.labels)} but dataset "
                           f"{dataset.name} has {dict(dataset.labels)}: train a generator for this dataset "
                           f"(nnsynth_train_generator {dataset.name})")
    if config.num_channels != dataset.num_channels:
        raise NnsynthError(f"checkpoint {checkpoint_folder} draws {config.num_channels} image channel(s) but dataset "
                           f"{dataset.name} has {dataset.num_channels} ({', '.join(dataset.channel_list)}): train a "
                           f"generator for this dataset (nnsynth_train_generator {dataset.name})")


def load_generator(folder, dataset=None, device="cpu"):
    """Load the EMA denoiser (eval mode, on ``device``) and its ``GeneratorConfig``.

    ``folder`` is a run folder (its ``final/`` is used) or a ``final/`` folder, also one written before final
    folders were pipelines (no model_index.json). With ``dataset`` (a RawDataset) the labels must match the
    generator's, else NnsynthError.
    """
    generator_folder = resolve_generator_folder(folder)
    config = read_generator_config(generator_folder)
    if dataset is not None:
        check_dataset_matches(config, dataset, generator_folder)
    weights_folder = generator_folder / "unet"
    if not (weights_folder / "config.json").is_file():
        raise NnsynthError(f"{generator_folder} has no unet/ weights: retrain (nnsynth_train_generator) or copy the "
                           f"folder again")
    try:
        unet = UNet2DModel.from_pretrained(weights_folder)
    except (OSError, ValueError, RuntimeError, EOFError, SafetensorError) as error:   # truncated or garbled weights
        raise NnsynthError(f"{weights_folder}: the generator's weights cannot be read ({first_line(error)}): the "
                           f"file is truncated or damaged; copy the generator again or retrain it "
                           f"(nnsynth_train_generator)") from None
    return unet.to(device).eval(), config


def save_pipeline_folder(pipeline, folder, pipeline_file: str = PIPELINE_FILE):
    """Save ``pipeline`` (an NnsynthPipeline or NnsynthInpaintPipeline) so that ``DiffusionPipeline.from_pretrained(
    folder, trust_remote_code=True)`` finds its class: diffusers takes a list ``_class_name`` [module, class] as the
    class in ``<folder>/<module>.py``, so model_index.json names it and the pipeline's source file goes beside."""
    pipeline_module = sys.modules[type(pipeline).__module__]
    folder = Path(folder)
    pipeline.save_pretrained(folder)
    index_file = folder / "model_index.json"
    index = json.loads(index_file.read_text())
    index["_class_name"] = [Path(pipeline_file).stem, type(pipeline).__name__]
    write_json_atomic(index, index_file)
    copy_file_atomic(pipeline_module.__file__, folder / pipeline_file)
