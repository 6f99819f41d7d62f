"""Where a generator run lives, its checkpoints (exact resume) and loading a trained generator.

Run folder ``$nnUNet_results/<Dataset>/nnsynth_generator_<preset>_fold<F>/``::

    checkpoint-<step>/unet/            raw weights (save_pretrained, safetensors)
    checkpoint-<step>/unet_ema/        EMA weights and EMA counters (EMAModel.save_pretrained)
    checkpoint-<step>/scheduler/       the training DDPM scheduler
    checkpoint-<step>/training_state.pt  optimiser, LR schedule, RNG states, step
    checkpoint-<step>/generator_config.json
    final/unet/                        the EMA model, loadable with UNet2DModel.from_pretrained
    final/scheduler/, final/generator_config.json, final/preview.png
    previews/step-<step>.png

Every folder is written under a temporary name and renamed when complete.
"""
import json
import os
import re
import shutil
from pathlib import Path

from diffusers import UNet2DModel

from nnunet_synth.atomic import write_json_atomic
from nnunet_synth.errors import NnsynthError
from nnunet_synth.generator.config import GENERATOR_CONFIG_NAME, GeneratorConfig

CHECKPOINT_PATTERN = re.compile(r"checkpoint-(\d+)")
FINAL_FOLDER = "final"
TEMP_SUFFIX = ".incomplete"


def generator_run_folder(dataset_name: str, preset: str, fold) -> Path:
    """``$nnUNet_results/<dataset_name>/nnsynth_generator_<preset>_fold<fold>``."""
    results = os.environ.get("nnUNet_results")
    if not results:
        raise NnsynthError("the environment variable nnUNet_results is not set: export nnUNet_results=/path/to/results "
                           "or give --output")
    return Path(results) / dataset_name / f"nnsynth_generator_{preset}_fold{fold}"


def list_checkpoints(run_folder) -> list:
    """Complete checkpoint folders of a run, oldest first."""
    run_folder = Path(run_folder)
    if not run_folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in run_folder.iterdir()
             if (m := CHECKPOINT_PATTERN.fullmatch(p.name)) and (p / "training_state.pt").is_file()]
    return [path for _, path in sorted(found)]


def checkpoint_step(checkpoint_folder) -> int:
    return int(CHECKPOINT_PATTERN.fullmatch(Path(checkpoint_folder).name).group(1))


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
    """A folder holding generator_config.json: ``folder`` itself, its ``final/``, or its newest checkpoint."""
    folder = Path(folder)
    if (folder / GENERATOR_CONFIG_NAME).is_file():
        return folder
    if (folder / FINAL_FOLDER / GENERATOR_CONFIG_NAME).is_file():
        return folder / FINAL_FOLDER
    checkpoints = list_checkpoints(folder)
    if checkpoints:
        return checkpoints[-1]
    raise NnsynthError(f"{folder} holds no trained generator (no {GENERATOR_CONFIG_NAME}, final/ or checkpoint-*): "
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

    ``folder`` is a run folder (its ``final/`` or newest checkpoint is used), a ``final/`` or a ``checkpoint-*``
    folder. With ``dataset`` (a RawDataset) the labels must match the generator's, else NnsynthError.
    """
    generator_folder = resolve_generator_folder(folder)
    config = read_generator_config(generator_folder)
    if dataset is not None:
        check_dataset_matches(config, dataset, generator_folder)
    weights_folder = generator_folder / "unet_ema"
    if not weights_folder.is_dir():
        weights_folder = generator_folder / "unet"
    if not weights_folder.is_dir():
        raise NnsynthError(f"{generator_folder} has no unet/ or unet_ema/ weights: retrain or copy the folder again")
    unet = UNet2DModel.from_pretrained(weights_folder)
    return unet.to(device).eval(), config
