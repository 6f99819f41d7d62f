"""Downstream evaluation (method.md §5, Diff-Lung Table 2) on nnU-Net: real-only, the cheap baselines and
generator arms.

Arms (``--arms``; every arm of a setting gets the same plans, split, budget and test set):

    real_only    nnU-Net on the real training cases (SynthMix ratio 0: the same code path, no pool)
    oversample   real only, with a share of the real draws centred on the rarest class (a slice that contains it;
                 ``nnsynth_rare_oversampling``, in the trainer, same iterations and batches)
    copy_paste   + synthetic cases from the balanced label maps with real donor pixels (no generator)
    copy_paste_online  real only, lesion components of other training cases pasted into the samples in the data
                 loader (nnUNetTrainerLesionPaste of the same budget; paste probability = the share of the batch the
                 synthetic arms give to balanced slices)
    mat, cbmat   + synthetic cases from a whole-slice generator of that ablation mode (``--generator NAME=FOLDER``,
                 or trained here on the setting's training patients); any other ``--generator`` name is an arm too
    inpaint      + synthetic cases whose new lesions the inpainting generator (CBMAT, ``--mode inpaint``) drew inside
                 the target's real slice (given as ``--generator inpaint=FOLDER``, or trained here the same way)

Configurations (``configuration``): every arm plans, trains and predicts the same nnU-Net configuration. With 3D
patches (``3d_fullres``, ``3d_lowres``) a synthetic case is a whole real volume with lesions added (copy-paste or
inpaint, unit "volume"), the amounts count volumes, and whole-slice generator arms are refused.

Planner (``planner``): every arm is planned by the same nnU-Net experiment planner, the stock ``ExperimentPlanner``
(plans ``nnUNetPlans``) or e.g. the residual-encoder preset ``nnUNetPlannerResEncM`` (plans
``nnUNetResEncUNetMPlans``); with ``cpu_plans`` the arms train the small CPU copy of those plans (``<plans>_cpu``,
``cpu_plans.py``).

Every arm is a copy of the real dataset (files copied, the user's dataset is never written to) under its own
dataset id, so each arm has its own synthetic store, preprocessed folder and results folder. nnU-Net plans and
preprocesses the first arm of a setting; the other arms, copies of the same real files, get copies of its plans and
preprocessed cases (``nnunet_runs.reuse_preprocessed``). The synthetic arms
train with ``nnsynth_ratio`` = amount / (1 + amount) (amount = synthetic slices per real training slice);
``oversample`` centres the same share of its draws on the rarest class.

Patients: by default the arms train on nnU-Net's fold ``fold`` of the whole dataset and are scored on its
validation cases (or on ``--test-images``). With ``test_patients`` / ``real_cases`` (``patients.py``) the copies
hold only the setting's training patients plus one validation patient (a one-fold ``splits_final.json``), the
test patients are scored and never seen by anything, and the generators are trained on the training patients
only. ``real_cases`` may list several values: a data-efficiency sweep, one setting per value.

Repeats: every arm trains ``repeats`` times with ``nnsynth_seed`` = seed + repeat (synthetic cases are made once
per arm); each run's Dice per test case goes to ``runs/<setting>/<arm>/repeat<r>/dice.json``. From them
(``statistics.py``): ``summary.csv`` / ``summary.md``, and the paired differences between arms in
``differences.csv`` and below the summary in ``summary.md``, with each synthetic arm's model-free gate pass rate
(``runs/<setting>/<arm>/model_free_gate.json``, read from the arm's synthetic store). Each run's model is moved
beside its Dice file, except the last repeat's, which stays where stock ``nnUNetv2_predict`` finds it.
"""
import csv
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from nnunet_synth.atomic import atomic_path, copy_file_atomic, write_json_atomic
from nnunet_synth.dataset import RawDataset
from nnunet_synth.dataset.splits import real_crossval_split
from nnunet_synth.errors import NnsynthError
from nnunet_synth.evaluation.arm_generators import (
    ARM_GENERATORS,
    ArmGeneratorSettings,
    check_arm_generator,
    train_arm_generator,
)
from nnunet_synth.evaluation.downstream_lesions import write_lesion_outputs, write_run_lesions
from nnunet_synth.evaluation.nnunet_runs import (
    STOCK_PLANNER,
    plan_and_preprocess,
    planner_plans_name,
    predict_and_score,
    reuse_preprocessed,
    train,
)
from nnunet_synth.evaluation.patients import PatientSplit, split_patients
from nnunet_synth.evaluation.statistics import (
    DICE_FILE,
    DIFFERENCE_COLUMNS,
    arm_order,
    compare_arms,
    load_runs,
    markdown_differences,
    markdown_pass_rates,
    markdown_summary,
    summarize_runs,
)
from nnunet_synth.generator.config import DDIM_INFERENCE_STEPS
from nnunet_synth.masks.balance import MAP_LOADS, MaskGenerationConfig

BUDGET_TRAINERS = {"smoke": "nnUNetTrainerSynthMix_smoke",   # 10 iterations: does the pipeline run
                   "debug": "nnUNetTrainerSynthMix_debug",   # 20 iterations
                   "short": "nnUNetTrainerSynthMix_short",   # 100 iterations, no final validation
                   "medium": "nnUNetTrainerSynthMix_medium", # 500 iterations, no final validation
                   "demo": "nnUNetTrainerSynthMix_demo",     # 250 iterations
                   "full": "nnUNetTrainerSynthMix"}          # nnU-Net's 1000 epochs
PASTE_BUDGET_TRAINERS = {budget: trainer.replace("SynthMix", "LesionPaste")
                         for budget, trainer in BUDGET_TRAINERS.items()}
REAL_ONLY, OVERSAMPLE, COPY_PASTE = "real_only", "oversample", "copy_paste"
COPY_PASTE_ONLINE = "copy_paste_online"
REAL_ARMS = (REAL_ONLY, OVERSAMPLE, COPY_PASTE_ONLINE)     # no synthetic cases
CONFIGURATIONS = ("2d", "3d_fullres", "3d_lowres")
TRAINABLE_GENERATORS = tuple(ARM_GENERATORS)        # arms that train their generator when none is given
SUMMARY_CSV, SUMMARY_MD, DIFFERENCES_CSV = "summary.csv", "summary.md", "differences.csv"
GATE_FILE = "model_free_gate.json"    # per synthetic arm: the pass rate of its store's cases, its maps' loads
DEFAULT_MAP_LOAD = MaskGenerationConfig.map_load


@dataclass
class DownstreamSettings:
    generators: dict                        # arm name (e.g. "mat", "cbmat") -> generator folder
    amounts: list = field(default_factory=lambda: [1.0])   # synthetic slices (volumes) per real training slice
                                                            # (volume)
    configuration: str = "2d"               # the nnU-Net configuration every arm trains and predicts
    budget: str = "demo"
    planner: str = STOCK_PLANNER            # nnU-Net's experiment planner (-pl) of every arm, e.g. nnUNetPlannerResEncM
    cpu_plans: bool = True
    fold: int = 0
    seed: int = 0
    inference_steps: int = DDIM_INFERENCE_STEPS   # DDIM steps of the whole-slice generators
    inpaint_inference_steps: int = None     # steps of the inpainting generators (None: sampling_defaults)
    first_dataset_id: int = 700
    device: str = "cpu"
    arms: list = None                       # arm names; None = real_only + every generator
    repeats: int = 1
    test_patients: int = None               # keep this many patients out of everything and test on them
    real_cases: list = None                 # training patients per setting (a sweep); None = all
    split_seed: int = 0
    generator: ArmGeneratorSettings = field(default_factory=ArmGeneratorSettings)
    tta: bool = True                        # nnUNetv2_predict's mirroring test-time augmentation
    test_slice_step: int = 1                # --test-patients: keep every n-th slice of each test patient
    compare: list = None                    # (arm, other arm) pairs of the differences table; None = the default
    map_loads: list = field(default_factory=lambda: ["dense"])   # per synthetic arm, the load of its new maps
                                                                  # (masks.balance.MAP_LOADS); each is an arm

    @property
    def chooses_patients(self) -> bool:
        return self.test_patients is not None or self.real_cases is not None


@dataclass
class Arm:
    name: str
    generator: Path = None
    amount: float = 0.0
    map_load: str = DEFAULT_MAP_LOAD

    @property
    def synthetic(self) -> bool:
        return self.name not in REAL_ARMS

    @property
    def label(self) -> str:
        """``copy_paste_x0.5`` with the default maps, ``copy_paste_x0.5_real`` with ``--map-loads real``."""
        if not self.synthetic:
            return self.name
        suffix = "" if self.map_load == DEFAULT_MAP_LOAD else f"_{self.map_load}"
        return f"{self.name}_x{self.amount:g}{suffix}"

    @property
    def balancing(self):
        """The arm's BalancingSettings: the default maps leave map_load unset, as ``nnsynth_generate`` does."""
        from nnunet_synth.masks.settings import BalancingSettings
        return BalancingSettings(map_load=None if self.map_load == DEFAULT_MAP_LOAD else self.map_load)

    @property
    def ratio(self) -> float:
        return self.amount / (1.0 + self.amount) if self.synthetic else 0.0

    def rare_oversampling(self, amounts) -> float:
        """oversample: the share of the batch the synthetic arms give to balanced slices (first amount)."""
        return amounts[0] / (1.0 + amounts[0]) if self.name == OVERSAMPLE else 0.0

    def paste_probability(self, amounts) -> float:
        """copy_paste_online: the same share, as the probability that a sample receives pasted lesions."""
        return amounts[0] / (1.0 + amounts[0]) if self.name == COPY_PASTE_ONLINE else 0.0

    def trainer(self, budget: str) -> str:
        return (PASTE_BUDGET_TRAINERS if self.name == COPY_PASTE_ONLINE else BUDGET_TRAINERS)[budget]


def plan_arms(settings: DownstreamSettings) -> list:
    names = settings.arms or [REAL_ONLY] + list(settings.generators)
    for amount in settings.amounts:
        if amount <= 0:
            raise NnsynthError(f"synthetic amounts must be positive, got {amount}")
    for map_load in settings.map_loads:
        if map_load not in MAP_LOADS:
            raise NnsynthError(f"--map-loads {map_load}: choose among {', '.join(MAP_LOADS)}")
    arms = []
    for name in dict.fromkeys(names):
        if name in REAL_ARMS:
            arms.append(Arm(name))
            continue
        if name != COPY_PASTE and name not in settings.generators and name not in TRAINABLE_GENERATORS:
            raise NnsynthError(f"arm '{name}' has no generator: pass --generator {name}=FOLDER, or use one of "
                               f"{', '.join(REAL_ARMS)}, {COPY_PASTE}, {', '.join(TRAINABLE_GENERATORS)}")
        generator = settings.generators.get(name)
        if generator is not None:
            check_arm_generator(name, generator)
        for amount in settings.amounts:
            for map_load in dict.fromkeys(settings.map_loads):
                arms.append(Arm(name, None if generator is None else Path(generator), float(amount), map_load))
    return arms


def check_configuration(settings: DownstreamSettings):
    """Refuse an unknown configuration, and whole-slice generator arms or a slice step with 3D patches (their
    synthetic cases are single slices; a 3D model predicts whole volumes)."""
    if settings.configuration not in CONFIGURATIONS:
        raise NnsynthError(f"--configuration {settings.configuration}: choose one of {', '.join(CONFIGURATIONS)}")
    if settings.configuration == "2d":
        return
    if settings.test_slice_step != 1:
        raise NnsynthError(f"--test-slice-step thins the test patients' slices for 2d models; "
                           f"{settings.configuration} predicts whole volumes: leave it out")
    for arm in plan_arms(settings):
        mode = _generator_mode(arm)
        if mode == "slice":
            raise NnsynthError(f"arm '{arm.name}' draws whole slices, and {settings.configuration} trains 3D patches "
                               f"that need whole volumes: use the copy_paste and inpaint arms (or --configuration 2d)")


def _generator_mode(arm: Arm):
    """slice or inpaint for a generator arm, None for the arms without a generator."""
    if not arm.synthetic or arm.name == COPY_PASTE:
        return None
    if arm.generator is None:
        return ARM_GENERATORS[arm.name][0]
    from nnunet_synth.generator.checkpoints import read_generator_config, resolve_generator_folder
    return read_generator_config(resolve_generator_folder(arm.generator)).mode


def case_unit(settings: DownstreamSettings):
    """What one synthetic case is: a whole volume for 3D configurations; for 2d the source's default."""
    return None if settings.configuration == "2d" else "volume"


def check_generators_for_fold(dataset: RawDataset, settings: DownstreamSettings):
    """Refuse, before any training, a generator that saw a validation case of the evaluated fold."""
    from nnunet_synth.generator.checkpoints import read_generator_config, resolve_generator_folder
    from nnunet_synth.image_sources import check_generator_for_fold
    for generator in settings.generators.values():
        folder = resolve_generator_folder(generator)
        check_generator_for_fold(dataset, read_generator_config(folder), folder, settings.fold)


def check_generators_for_patients(settings: DownstreamSettings, split: PatientSplit):
    """Refuse a given generator that saw a patient outside the setting's training patients."""
    from nnunet_synth.generator.checkpoints import read_generator_config, resolve_generator_folder
    for generator in settings.generators.values():
        folder = resolve_generator_folder(generator)
        outside = sorted(set(read_generator_config(folder).training_cases) - set(split.training))
        if outside:
            raise NnsynthError(f"{folder} was trained on {', '.join(outside[:3])}, which this setting keeps out of "
                               f"training (test, validation or left-out patients): leave out --generator and let "
                               f"the evaluation train it on the setting's training patients")


def copy_real_dataset(dataset: RawDataset, raw_root: Path, dataset_id: int, arm: Arm, case_ids=None,
                      setting: str = "") -> RawDataset:
    """The real cases (all, or ``case_ids``) under a new id (copies; reused when a previous run made the same)."""
    source_name = dataset.name.split("_", 1)[1]
    tag = (("" if setting == "all" else setting) + arm.label).replace("_", "").replace(".", "p")
    name = f"Dataset{dataset_id:03d}_{source_name}Eval{tag}"
    existing = [p for p in raw_root.glob(f"Dataset{dataset_id:03d}_*") if p.name != name]
    if existing:
        raise NnsynthError(f"dataset id {dataset_id} is taken by {existing[0]}: pass another --first-id")
    target = raw_root / name
    keep = None if case_ids is None else set(case_ids)
    for case_id in dataset.case_ids:
        if keep is not None and case_id not in keep:
            continue
        sources = list(dataset.cases[case_id]["images"]) + [dataset.cases[case_id]["label"]]
        for source in map(Path, sources):
            destination = target / source.parent.name / source.name
            if not destination.is_file() or destination.stat().st_size != source.stat().st_size:
                copy_file_atomic(source, destination)
    description = json.loads(Path(dataset.json_file).read_text())
    description["numTraining"] = len(dataset.case_ids) if keep is None else len(keep)
    write_json_atomic(description, target / "dataset.json")
    return RawDataset(target)


def write_test_set(dataset: RawDataset, case_ids, folder: Path, slice_step: int = 1):
    """The test patients' images and labels (imagesTs/, labelsTs/) in the evaluation folder: copies, or every
    ``slice_step``-th slice (2d models predict slice by slice, so a subset of slices is a smaller test of the same
    patients)."""
    for case_id in case_ids:
        images, label = list(map(Path, dataset.cases[case_id]["images"])), Path(dataset.cases[case_id]["label"])
        if slice_step == 1:
            for image in images:
                copy_file_atomic(image, folder / "imagesTs" / image.name)
            copy_file_atomic(label, folder / "labelsTs" / label.name)
            continue
        if len(images) != 1 or dataset.file_ending != ".nii.gz":
            raise NnsynthError(f"{dataset.json_file}: --test-slice-step needs single-channel .nii.gz volumes: "
                               f"leave it out")
        import SimpleITK as sitk

        from nnunet_synth.dataset.writing import write_volume
        for source, target in ((images[0], folder / "imagesTs" / images[0].name),
                               (label, folder / "labelsTs" / label.name)):
            volume = sitk.ReadImage(str(source))
            array = sitk.GetArrayFromImage(volume)[::slice_step]
            spacing = list(volume.GetSpacing())
            spacing[2] *= slice_step
            write_volume(array, target, spacing_xyz=spacing, origin=volume.GetOrigin(), direction=volume.GetDirection())
    return folder / "imagesTs", folder / "labelsTs"


def evaluation_cases(dataset: RawDataset, fold: int, test_images=None, test_labels=None):
    """(image files, label folder, description): the test set when given, else fold ``fold``'s validation cases."""
    if test_images is not None:
        images = sorted(Path(test_images).glob(f"*{dataset.file_ending}"))
        if not images or test_labels is None or not Path(test_labels).is_dir():
            raise NnsynthError(f"{test_images}: a test set needs image files ({dataset.file_ending}) and a labels "
                               f"folder: pass --test-images imagesTs --test-labels labelsTs")
        return images, Path(test_labels), f"test set {test_images}"
    cases = sorted(real_crossval_split(dataset)[0][fold]["val"])
    images = [image for case_id in cases for image in dataset.cases[case_id]["images"]]
    return images, dataset.folder / "labelsTr", f"fold {fold} validation cases {cases}"


def make_synthetic_cases(arm: Arm, arm_dataset: RawDataset, settings: DownstreamSettings, generator_folder):
    """The arm's synthetic cases of the evaluated fold: ``arm.amount`` per real unit, by the generate step of
    ``nnsynth_generate`` (copy-paste, or the image source of the arm's generator)."""
    from nnunet_synth.generate_step import generate
    from nnunet_synth.generator.checkpoints import read_generator_config, resolve_generator_folder
    from nnunet_synth.image_sources import image_source, source_of_generator
    from nnunet_synth.preflight import GenerateRequest
    if arm.name == COPY_PASTE:
        source, generator_folder, steps = image_source("copy-paste"), None, None
    else:
        source = source_of_generator(read_generator_config(resolve_generator_folder(generator_folder)).mode)
        steps = settings.inference_steps if source.generator_mode == "slice" else settings.inpaint_inference_steps
    request = GenerateRequest(folds=[str(settings.fold)], image_source=source.name,
                              generator=None if generator_folder is None else str(generator_folder),
                              device=settings.device, seed=settings.seed, num_inference_steps=steps,
                              ratio=arm.amount, unit=case_unit(settings), balancing=arm.balancing)
    [summary] = generate(arm_dataset, request, progress=False)
    return summary


def model_free_pass_rate(arm_dataset: RawDataset, fold) -> dict:
    """The model-free gate's verdicts on the arm's synthetic cases of ``fold`` (``quality.model_free.passed`` of
    each complete case in its store's manifest)."""
    from nnunet_synth.writer.synthetic_store import SyntheticStore
    store = SyntheticStore(arm_dataset)
    verdicts = [store.cases[case_id].get("quality", {}).get("model_free", {}).get("passed")
                for case_id in store.complete_case_ids(str(fold))]
    scored = [verdict for verdict in verdicts if verdict is not None]
    return {"cases": len(verdicts), "scored": len(scored), "passed": sum(bool(v) for v in scored)}


def write_pass_rate(arm: Arm, arm_dataset: RawDataset, settings: DownstreamSettings, setting: str, folder: Path):
    """The arm's gate pass rate and, per pathology class, the real and new maps' per-map loads (the fold's
    label-map report)."""
    from nnunet_synth.writer.synthetic_store import SyntheticStore
    rate = model_free_pass_rate(arm_dataset, settings.fold)
    if rate["cases"]:
        report = SyntheticStore(arm_dataset).manifest["folds"].get(str(settings.fold), {}).get("label_map_report", {})
        write_json_atomic({"setting": setting, "arm": arm.name, "label": arm.label, "dataset": arm_dataset.name,
                           "fold": settings.fold, "map_load": arm.map_load, "model_free": rate,
                           "region": report.get("region"), "per_map_load": report.get("per_map_load")},
                          folder / GATE_FILE)


def run_repeat(arm: Arm, arm_dataset: RawDataset, settings: DownstreamSettings, plans: str, repeat: int,
               run_folder: Path, setting: str, preprocessed_root: Path, test_images, test_labels) -> dict:
    """Train one run of an arm, predict the test set with stock nnU-Net, write its ``dice.json``."""
    trainer = arm.trainer(settings.budget)
    seed = settings.seed + repeat
    train(arm_dataset, trainer, plans, settings.fold, settings.device, settings.configuration,
          nnsynth_ratio=str(arm.ratio),
          nnsynth_min_quality="none", nnsynth_seed=str(seed),
          nnsynth_rare_oversampling=str(arm.rare_oversampling(settings.amounts)),
          nnsynth_paste_probability=str(arm.paste_probability(settings.amounts)))
    images, labels, description = evaluation_cases(arm_dataset, settings.fold, test_images, test_labels)
    means, cases = predict_and_score(arm_dataset, images, labels, run_folder / "predictions", trainer, plans,
                                     settings.fold, settings.device, per_case=True, tta=settings.tta,
                                     configuration=settings.configuration)
    run = {"setting": setting, "arm": arm.name, "label": arm.label, "amount": arm.amount,
           "map_load": arm.map_load if arm.synthetic else None, "ratio": round(arm.ratio, 4),
           "rare_oversampling": round(arm.rare_oversampling(settings.amounts), 4),
           "paste_probability": round(arm.paste_probability(settings.amounts), 4),
           "repeat": repeat, "seed": seed, "dataset": arm_dataset.name, "fold": settings.fold,
           "trainer": trainer, "plans": plans, "configuration": settings.configuration, "tta": settings.tta,
           "evaluated_on": description, "mean": means,
           "cases": cases}
    write_json_atomic(run, run_folder / DICE_FILE)
    return run


def _model_folder(arm: Arm, arm_dataset: RawDataset, settings: DownstreamSettings, plans: str) -> Path:
    from nnunet_synth.nnunet_paths import require_nnunet_folder
    return (require_nnunet_folder("nnUNet_results", "nnU-Net's trained models") / arm_dataset.name /
            f"{arm.trainer(settings.budget)}__{plans}__{settings.configuration}" / f"fold_{settings.fold}")


def run_setting(dataset: RawDataset, settings: DownstreamSettings, setting: str, split, first_id: int, raw_root: Path,
                preprocessed_root: Path, output_folder: Path, test_images, test_labels) -> list:
    """All arms and repeats of one setting (one set of training patients); returns the runs."""
    arms = plan_arms(settings)
    if split is not None:
        check_generators_for_patients(settings, split)
    runs, planned = [], None      # planned: the setting's arm planned first, and its plans name
    for index, arm in enumerate(arms):
        case_ids = None if split is None else split.training + split.validation
        arm_dataset = copy_real_dataset(dataset, raw_root, first_id + index, arm, case_ids, setting)
        if split is not None:   # one fold: the setting's training patients, validated on its validation patient
            write_json_atomic([{"train": list(split.training), "val": list(split.validation)}],
                              preprocessed_root / arm_dataset.name / "splits_final.json")
        run_folders = [output_folder / "runs" / setting / arm.label / f"repeat{r}" for r in range(settings.repeats)]
        arm_folder = output_folder / "runs" / setting / arm.label
        if all((folder / DICE_FILE).is_file() for folder in run_folders):       # a finished arm of a rerun
            runs += [json.loads((folder / DICE_FILE).read_text()) for folder in run_folders]
            for folder in run_folders:
                write_run_lesions(dataset, folder, evaluation_cases(arm_dataset, settings.fold, test_images,
                                                                    test_labels)[1], output_folder)
            if arm.synthetic and not (arm_folder / GATE_FILE).is_file():
                write_pass_rate(arm, arm_dataset, settings, setting, arm_folder)
            continue
        print(f"[downstream] {setting} arm {arm.label}: {arm_dataset.name}, synthetic ratio {arm.ratio:.3f}, "
              f"rare-class oversampling {arm.rare_oversampling(settings.amounts):.3f}", flush=True)
        if arm.synthetic:
            generator = arm.generator
            if generator is None and arm.name != COPY_PASTE:
                training = split.training if split is not None else None
                if training is None:
                    from nnunet_synth.dataset.splits import fold_training_cases
                    training = fold_training_cases(dataset, settings.fold)
                generator = train_arm_generator(dataset, output_folder / "generators" / f"{setting}_{arm.name}",
                                                training, arm.name, settings.generator)
            make_synthetic_cases(arm, arm_dataset, settings, generator)
            write_pass_rate(arm, arm_dataset, settings, setting, arm_folder)
        if planned is None:
            planned = arm_dataset, plan_and_preprocess(arm_dataset, preprocessed_root, settings.cpu_plans,
                                                       settings.configuration, settings.planner)
        plans = planned[1] if planned[0] is arm_dataset else reuse_preprocessed(
            planned[0], arm_dataset, preprocessed_root, planned[1], settings.configuration, settings.planner)
        for repeat, run_folder in enumerate(run_folders):
            if (run_folder / DICE_FILE).is_file():
                runs.append(json.loads((run_folder / DICE_FILE).read_text()))
                continue
            print(f"[downstream] {setting} {arm.label} repeat {repeat + 1}/{settings.repeats} "
                  f"(seed {settings.seed + repeat})", flush=True)
            runs.append(run_repeat(arm, arm_dataset, settings, plans, repeat, run_folder, setting,
                                   preprocessed_root, test_images, test_labels))
            write_run_lesions(dataset, run_folder, evaluation_cases(arm_dataset, settings.fold, test_images,
                                                                    test_labels)[1], output_folder)
            model = _model_folder(arm, arm_dataset, settings, plans)
            if repeat < settings.repeats - 1 and model.is_dir():     # the next run starts from an empty folder
                shutil.rmtree(run_folder / "model", ignore_errors=True)
                shutil.move(str(model), str(run_folder / "model"))
            write_outputs(output_folder, settings.compare)
    return runs


def run_downstream(dataset: RawDataset, settings: DownstreamSettings, raw_root, preprocessed_root, output_folder,
                   test_images=None, test_labels=None) -> list:
    """Run every setting, arm and repeat; write ``downstream.csv`` (one row per run), ``summary.csv/md`` and
    ``downstream.png`` into ``output_folder``; return the per-run rows."""
    if settings.budget not in BUDGET_TRAINERS:
        raise NnsynthError(f"unknown budget '{settings.budget}': choose one of {', '.join(BUDGET_TRAINERS)}")
    if settings.repeats < 1:
        raise NnsynthError(f"--repeats must be at least 1, got {settings.repeats}")
    raw_root, output_folder, preprocessed_root = Path(raw_root), Path(output_folder), Path(preprocessed_root)
    check_downstream_settings(settings, dataset)
    if not settings.chooses_patients:
        output_folder.mkdir(parents=True, exist_ok=True)
        check_generators_for_fold(dataset, settings)
        run_setting(dataset, settings, "all", None, settings.first_dataset_id, raw_root, preprocessed_root,
                    output_folder, test_images, test_labels)
    else:
        if test_images is not None:
            raise NnsynthError("--test-patients keeps its own test patients: leave out --test-images/--test-labels")
        splits = patient_splits(dataset, settings)
        output_folder.mkdir(parents=True, exist_ok=True)
        write_json_atomic({name: split.to_json() for name, split in splits.items()}, output_folder / "patients.json")
        test_cases = next(iter(splits.values())).test
        if test_cases:
            test_images, test_labels = write_test_set(dataset, test_cases, output_folder / "test_set",
                                                      settings.test_slice_step)
        for index, (setting, split) in enumerate(splits.items()):
            first_id = settings.first_dataset_id + index * len(plan_arms(settings))
            run_setting(dataset, settings, setting, split, first_id, raw_root, preprocessed_root, output_folder,
                        test_images, test_labels)
    return write_outputs(output_folder, settings.compare)


def patient_splits(dataset: RawDataset, settings: DownstreamSettings) -> dict:
    """--test-patients / --real-cases: setting name (``real<N>``) -> its patient split."""
    splits = {}
    for real_cases in settings.real_cases or [None]:
        split = split_patients(dataset.case_ids, settings.test_patients or 0, real_cases, settings.split_seed,
                               source=str(dataset.json_file))
        splits[f"real{len(split.training)}"] = split
    return splits


def check_online_paste_donors(settings: DownstreamSettings, splits: dict):
    """copy_paste_online pastes lesions of the other training patients into a sample (never its own): a setting
    with one training patient would train it as real_only."""
    if COPY_PASTE_ONLINE not in {arm.name for arm in plan_arms(settings)}:
        return
    for setting, split in splits.items():
        if len(split.training) < 2:
            raise NnsynthError(f"{COPY_PASTE_ONLINE} pastes the lesions of other training patients into each sample, "
                               f"and setting {setting} has {len(split.training)} training patient: keep fewer "
                               f"--test-patients, pass --real-cases 2 or more, or leave out {COPY_PASTE_ONLINE}")


def check_downstream_settings(settings: DownstreamSettings, dataset: RawDataset = None):
    """Unknown arm names, generators of the wrong mode, arms a configuration cannot train, an unknown planner,
    unknown --compare names and (given the dataset) an online paste arm without donors stop here, before anything
    is copied or trained."""
    plan_arms(settings)
    planner_plans_name(settings.planner)
    check_configuration(settings)
    check_compared_arms(settings)
    if dataset is not None and settings.chooses_patients:
        check_online_paste_donors(settings, patient_splits(dataset, settings))


def check_compared_arms(settings: DownstreamSettings):
    """Refuse a ``--compare`` name that is none of the arms (an arm name, e.g. cbmat, or a label, cbmat_x0.5)."""
    arms = plan_arms(settings)
    known = {arm.name for arm in arms} | {arm.label for arm in arms}
    for pair in settings.compare or []:
        for name in pair:
            if name not in known:
                raise NnsynthError(f"--compare {':'.join(pair)}: '{name}' is not an arm of this run: use the names "
                                   f"of --arms ({', '.join(dict.fromkeys(arm.name for arm in arms))}) or their "
                                   f"labels ({', '.join(arm.label for arm in arms)})")


def write_outputs(output_folder: Path, compare=None) -> list:
    """downstream.csv (one row per run), summary.csv / summary.md, differences.csv (paired differences of the
    ``compare`` pairs, or the default pairs) and downstream.png from the runs' Dice files and the synthetic arms'
    pass rates."""
    runs = load_runs(output_folder / "runs")
    if not runs:
        return []
    runs.sort(key=lambda run: (run["setting"], arm_order(run), run["repeat"]))
    rows = [{key: run[key] for key in ("setting", "arm", "label", "amount", "ratio", "rare_oversampling", "repeat",
                                       "seed", "dataset", "fold", "evaluated_on")}
            | {"configuration": run.get("configuration", "2d"), "plans": run.get("plans", ""),
               "map_load": run.get("map_load", DEFAULT_MAP_LOAD if run["amount"] else None)}
            | {f"dice_{name}": round(value, 4) for name, value in run["mean"].items()} for run in runs]
    write_rows_csv(rows, output_folder / "downstream.csv")
    summary = summarize_runs(runs)
    write_rows_csv([{k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()} for row in summary],
                   output_folder / SUMMARY_CSV)
    differences = compare_arms(runs, summary, compare)
    write_rows_csv([{k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()} for row in differences],
                   output_folder / DIFFERENCES_CSV, DIFFERENCE_COLUMNS)
    gate_files = sorted((output_folder / "runs").glob(f"*/*/{GATE_FILE}"))
    pass_rates = [json.loads(path.read_text()) for path in gate_files]
    lesions = write_lesion_outputs(output_folder, compare, write_rows_csv)
    with atomic_path(output_folder / SUMMARY_MD, suffix=".md") as temp_name:
        Path(temp_name).write_text("\n\n".join([markdown_summary(summary), markdown_differences(differences)]
                                                + ([lesions] if lesions else []) + [markdown_pass_rates(pass_rates)])
                                   + "\n")
    plot_downstream(runs, summary, output_folder / "downstream.png")
    return rows


def write_rows_csv(rows, path, columns=None):
    columns = columns or list(dict.fromkeys(key for row in rows for key in row))
    with atomic_path(path, suffix=".csv") as temp_name:
        with open(temp_name, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns)
            writer.writeheader()
            writer.writerows(rows)


def plot_downstream(runs, summary, path):
    """Per setting and class: every run's mean Dice (dots) and the arm's mean with its 95 % interval (bar)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    panels = list(dict.fromkeys((row["setting"], row["class"]) for row in summary))
    figure, axes = plt.subplots(1, len(panels), figsize=(0.6 + 3.2 * len(panels), 3.4), squeeze=False)
    for axis, (setting, class_name) in zip(axes[0], panels):
        rows = [row for row in summary if row["setting"] == setting and row["class"] == class_name]
        for x, row in enumerate(rows):
            values = [run["mean"][class_name] for run in runs
                      if run["setting"] == setting and run["label"] == row["label"]]
            axis.scatter(x + np.linspace(-0.12, 0.12, len(values)), values, s=12, color="grey", zorder=2)
            axis.errorbar(x, row["mean"], yerr=[[row["mean"] - row["ci_low"]], [row["ci_high"] - row["mean"]]],
                          fmt="o", color="C0", capsize=4, zorder=3)
        axis.set_xticks(range(len(rows)), [row["label"] for row in rows], rotation=45, ha="right", fontsize=7)
        axis.set_title(f"{setting}: {class_name}", fontsize=9)
        axis.set_ylim(0, 1)
        axis.set_ylabel("Dice")
    figure.tight_layout()
    with atomic_path(path, suffix=".png") as temp_name:
        figure.savefig(temp_name, dpi=90)
    plt.close(figure)
