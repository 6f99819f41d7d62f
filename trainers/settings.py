"""Every ``nnsynth_*`` training setting, resolved in one place.

A trainer's settings come, per setting, from (first match wins):

1. the trainer class's ``fixed_settings`` (a variant such as ``nnUNetTrainerSynthMix_r25`` fixes ``ratio`` in its
   name); the environment may repeat the value but not contradict it, because the results folder is named after
   the class and a silent override would mix settings in one folder;
2. the environment variable (``nnsynth_ratio=0.25``);
3. the trainer class's ``default_settings`` (``nnUNetTrainerLesionPaste`` pastes by default, SynthMix does not);
4. the project default in ``SETTINGS``.

A bad value is one ``NnsynthError`` line ``<variable>=<value>: <problem>: <fix>``. ``TrainerSettings.comparable()``
is what a continued run (``nnUNetv2_train ... --c``) must repeat.
"""
import math
import os
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, Optional, Tuple

from nnunet_synth.errors import NnsynthError
from nnunet_synth.quality.model_free import PASS_SCORE

# quality key -> (group in the manifest entry's "quality" dict, field holding the score)
# pathology_iou: DiffAug's gate, the lowest IoU over the pathology classes (nnsynth_score)
QUALITY_SCORES = {"model_free": ("model_free", "score"), "segmentation": ("segmentation", "mean_dice"),
                  "pathology_iou": ("segmentation", "min_pathology_iou")}
NO_VALUE_WORDS = ("", "none", "off")
PASTE_CLASS_WORDS = ("rarest", "pathology")     # the rarest pathology class | every pathology class


class SettingError(NnsynthError):
    """A bad value of one setting: ``<variable>=<value>: <problem>: <fix>``."""

    def __init__(self, variable: str, value: str, problem: str, fix: str):
        super().__init__(f"{variable}={value}: {problem}: {fix}")


def _number(variable: str, text: str, fix: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise SettingError(variable, text, "not a number", fix) from None
    if not math.isfinite(value):
        raise SettingError(variable, text, "not a finite number", fix)
    return value


def _fraction(variable: str, fix: str) -> Callable[[str], float]:
    def parse(text: str) -> float:
        value = _number(variable, text, fix)
        if not 0.0 <= value <= 1.0:
            raise SettingError(variable, text, "outside [0, 1]", fix)
        return value
    return parse


def _positive_integer(variable: str, fix: str, allow_unset: bool) -> Callable[[str], Optional[int]]:
    def parse(text: str) -> Optional[int]:
        if allow_unset and text.strip().lower() in NO_VALUE_WORDS:
            return None
        try:
            value = int(text)
        except ValueError:
            raise SettingError(variable, text, "not an integer", fix) from None
        if value < 1:
            raise SettingError(variable, text, "must be at least 1", fix)
        return value
    return parse


def _min_quality(text: str) -> Optional[float]:
    if text.strip().lower() in NO_VALUE_WORDS:
        return None
    fix = "give the lowest quality score a synthetic case needs, e.g. nnsynth_min_quality=0.5, or 'none' for no filter"
    value = _number("nnsynth_min_quality", text, fix)
    if not 0.0 <= value <= 1.0:            # every quality score (model-free score, Dice, IoU) lies in [0, 1]
        raise SettingError("nnsynth_min_quality", text, "outside [0, 1], the range of every quality score", fix)
    return value


def _quality_key(text: str) -> str:
    if text not in QUALITY_SCORES:
        raise SettingError("nnsynth_quality_key", text, "unknown quality key",
                           f"use one of {', '.join(QUALITY_SCORES)}")
    return text


MAX_SEED = 2 ** 32 - 1       # numpy's limit (np.random.seed)


def _seed(text: str) -> Optional[int]:
    if text.strip().lower() in NO_VALUE_WORDS:
        return None
    fix = f"give the training seed, an integer in 0 .. {MAX_SEED}, e.g. nnsynth_seed=1, or unset it"
    try:
        value = int(text)
    except ValueError:
        raise SettingError("nnsynth_seed", text, "not an integer", fix) from None
    if not 0 <= value <= MAX_SEED:
        raise SettingError("nnsynth_seed", text, f"outside 0 .. {MAX_SEED}", fix)
    return value


def _paste_classes(text: str) -> Tuple[str, ...]:
    """'rarest' | 'pathology' | label names separated by commas (checked against dataset.json by the trainer)."""
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    if not names:
        raise SettingError("nnsynth_paste_classes", text, "no class named",
                           "give 'rarest', 'pathology' or label names from dataset.json separated by commas")
    if any(name in PASTE_CLASS_WORDS for name in names) and len(names) > 1:
        raise SettingError("nnsynth_paste_classes", text, f"{' or '.join(PASTE_CLASS_WORDS)} cannot be combined "
                           f"with other names", "give one of them alone, or label names")
    return names


@dataclass(frozen=True)
class Setting:
    name: str                         # field of TrainerSettings
    variable: str                     # environment variable
    parse: Callable[[str], object]
    default: object
    compared_on_continue: bool = True  # False: changes speed only, not what is trained


SETTINGS = (
    Setting("ratio", "nnsynth_ratio",
            _fraction("nnsynth_ratio", "give the synthetic share of each batch, e.g. nnsynth_ratio=0.25"), 0.5),
    # by default only the cases that pass the model-free gate are mixed in (a score of 0.5 is its threshold)
    Setting("min_quality", "nnsynth_min_quality", _min_quality, PASS_SCORE),
    Setting("quality_key", "nnsynth_quality_key", _quality_key, "model_free"),
    Setting("rare_oversampling", "nnsynth_rare_oversampling",
            _fraction("nnsynth_rare_oversampling", "give the share of real draws centred on the rarest class, e.g. "
                                                   "nnsynth_rare_oversampling=0.5"), 0.0),
    Setting("seed", "nnsynth_seed", _seed, None),
    Setting("cpu_threads", "nnsynth_cpu_threads",
            _positive_integer("nnsynth_cpu_threads", "give the torch threads of a CPU run, e.g. nnsynth_cpu_threads=1, "
                                                     "or unset it for nnU-Net's choice", allow_unset=True),
            None, compared_on_continue=False),
    Setting("paste_probability", "nnsynth_paste_probability",
            _fraction("nnsynth_paste_probability", "give the probability that a training sample receives pasted "
                                                   "lesions, e.g. nnsynth_paste_probability=0.5"), 0.0),
    Setting("paste_components", "nnsynth_paste_components",
            _positive_integer("nnsynth_paste_components", "give the most components pasted into one sample, e.g. "
                                                          "nnsynth_paste_components=2", allow_unset=False), 1),
    Setting("paste_classes", "nnsynth_paste_classes", _paste_classes, ("rarest",)),
)
SETTINGS_BY_NAME = {setting.name: setting for setting in SETTINGS}


@dataclass(frozen=True)
class TrainerSettings:
    """The effective settings of one training run and where each value came from."""

    ratio: float                        # the batch share (nnsynth_ratio): the synthetic share of each batch
    min_quality: Optional[float]
    quality_key: str
    rare_oversampling: float
    seed: Optional[int]
    cpu_threads: Optional[int]
    paste_probability: float
    paste_components: int
    paste_classes: Tuple[str, ...]
    # setting -> trainer | environment | trainer default | default
    sources: Dict[str, str] = field(default_factory=dict)

    def comparable(self) -> dict:
        """The settings a continued run must repeat (JSON types: lists, not tuples)."""
        values = asdict(self)
        return {s.name: list(values[s.name]) if isinstance(values[s.name], tuple) else values[s.name]
                for s in SETTINGS if s.compared_on_continue}

    def to_json(self) -> dict:
        values = asdict(self)
        values["paste_classes"] = list(self.paste_classes)
        return values


def resolve_settings(trainer_name: str, fixed: dict = None, defaults: dict = None, environ=None) -> TrainerSettings:
    """The settings of trainer ``trainer_name``: ``fixed`` (its class's ``fixed_settings``), the environment,
    ``defaults`` (its class's ``default_settings``), then the project defaults. Raises SettingError."""
    environ = os.environ if environ is None else environ
    fixed, defaults = fixed or {}, defaults or {}
    unknown = (set(fixed) | set(defaults)) - set(SETTINGS_BY_NAME)
    if unknown:
        raise ValueError(f"{trainer_name} names unknown settings {sorted(unknown)}")
    values, sources = {}, {}
    for setting in SETTINGS:
        from_environment = setting.parse(environ[setting.variable]) if setting.variable in environ else None
        if setting.name in fixed:
            value = fixed[setting.name]
            if setting.variable in environ and from_environment != value:
                raise SettingError(setting.variable, environ[setting.variable],
                                   f"trainer {trainer_name} fixes {setting.name}={value}",
                                   f"unset {setting.variable}, or train a trainer that reads it")
            values[setting.name], sources[setting.name] = value, "trainer"
        elif setting.variable in environ:
            values[setting.name], sources[setting.name] = from_environment, "environment"
        elif setting.name in defaults:
            values[setting.name], sources[setting.name] = defaults[setting.name], "trainer default"
        else:
            values[setting.name], sources[setting.name] = setting.default, "default"
    return TrainerSettings(sources=sources, **values)


def changed_settings(previous: dict, current: TrainerSettings) -> dict:
    """{name: (previous, current)} of the compared settings that differ from ``previous`` (a stored
    ``comparable()``); a setting the previous run did not record (an older version) is not compared."""
    now = current.comparable()
    return {name: (previous[name], value) for name, value in now.items()
            if name in previous and previous[name] != value}
