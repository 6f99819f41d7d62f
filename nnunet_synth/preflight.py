"""Everything ``nnsynth_generate`` checks before it trains, deletes or writes anything: its options, the device,
every case of the dataset, the folds' classes, the folders it writes, the budget, the export id and the fold's
recipe. A command calls ``check_generate_request`` first; a bad request then costs a second, not a trained
generator (``docs/checks.md`` lists the checks)."""
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from nnunet_synth.dataset import RawDataset
from nnunet_synth.dataset.native_slices import dataset_cache_root
from nnunet_synth.dataset.splits import fold_training_cases
from nnunet_synth.dataset.validation import (
    DatasetScan,
    check_case_budget,
    check_dataset_id_free,
    check_device,
    check_fold_classes,
    check_inference_steps,
    check_int_range,
    check_number_range,
    check_seed,
    check_writable,
    fold_num_slices,
    scan_dataset,
)
from nnunet_synth.errors import NnsynthError, warn_once
from nnunet_synth.fold_cases import check_role_names, check_shard, class_roles_from_counts
from nnunet_synth.generator.checkpoints import (
    FINAL_FOLDER,
    generator_run_folder,
    read_generator_config,
    resolve_generator_folder,
)
from nnunet_synth.generator.config import TrainingSettings
from nnunet_synth.image_sources import IMAGE_SOURCES, case_count, check_generator_for_fold, image_source
from nnunet_synth.masks.settings import BalancingSettings
from nnunet_synth.sampling.inpaint import VOLUME_NOISES
from nnunet_synth.writer.standalone_export import export_folder_name
from nnunet_synth.writer.synthetic_store import SyntheticStore


@dataclass
class GenerateRequest:
    """What one generate step asks for (``nnsynth_generate``'s options; ``generate_step.generate`` runs it)."""

    folds: list
    image_source: str = "generator"        # an IMAGE_SOURCES name: generator | copy-paste | inpaint
    generator: str = None                  # a trained generator folder, else the fold's run folder (trained if needed)
    preset: str = "default"
    train_steps: int = None
    device: str = "cpu"
    seed: int = 0
    num_inference_steps: int = None        # None: the source's default (a resuming inpaint fold: its recorded steps)
    batch_size: int = 16
    num_cases: int = None
    ratio: float = 0.5
    target_share: float = None
    noise_seeding_strength: float = None
    balancing: BalancingSettings = field(default_factory=BalancingSettings)
    num_shards: int = 1
    shard_index: int = 0
    overwrite: bool = False
    export_id: int = None
    sampler: str = None                    # inpaint only: the scheduler of the inpainting generator
    unit: str = None                       # copy-paste and inpaint: slice | volume (None: volume for 3D data)
    volume_noise: str = "per-slice"        # inpaint volumes: the crops' initial noise
    training: dict = field(default_factory=dict)   # TrainingSettings fields of a generator trained here
    launched: bool = False                 # the shards are the processes of one accelerate launch

    @property
    def generator_mode(self) -> str:
        """The generator the image source needs (None: it needs none)."""
        return image_source(self.image_source).generator_mode

    def training_settings(self) -> TrainingSettings:
        """The settings of a generator that a fold without one gets trained."""
        return TrainingSettings(**{"preset": self.preset, "mode": self.generator_mode, "max_steps": self.train_steps,
                                   "seed": self.seed, **self.training})


@dataclass
class GeneratePlan:
    """What the checks found: the dataset scan and, per fold, its training cases and number of cases to make."""

    scan: DatasetScan
    training_cases: dict = field(default_factory=dict)      # fold -> the cases the generator / label maps see
    num_cases: dict = field(default_factory=dict)           # fold -> cases to make
    units: dict = field(default_factory=dict)               # fold -> slice | volume


def check_generation_options(request: GenerateRequest):
    """Ranges and finite numbers of every option, without reading the dataset."""
    check_shard(request.num_shards, request.shard_index)
    check_seed(request.seed)
    check_int_range(request.num_cases, "-n/--num-cases", 1)
    if request.num_cases is None:
        check_number_range(request.ratio, "-r/--ratio", 0, None, low_open=True)
    check_number_range(request.target_share, "--target-share", 0, 1, low_open=True, high_open=True)
    balancing = request.balancing
    check_number_range(balancing.target_factor, "--target-factor", 1, None, low_open=True)
    check_number_range(balancing.max_target_share, "--max-target-share", 0, 1, low_open=True)
    check_number_range(balancing.map_class_share_cap, "--map-cap", 0, 1, low_open=True)
    check_number_range(balancing.load_from_percentile, "--load-from-percentile", 0, 100)
    check_number_range(balancing.load_cap_percentile, "--load-cap-percentile", 0, 100)
    check_number_range(balancing.p_rotate, "--p-rotate", 0, 1)
    check_number_range(balancing.p_shift, "--p-shift", 0, 1)
    check_number_range(balancing.p_dilate, "--p-dilate", 0, 1)
    balancing.mask_config().validate()
    if request.volume_noise not in VOLUME_NOISES:
        raise NnsynthError(f"--volume-noise {request.volume_noise}: choose one of {', '.join(VOLUME_NOISES)}")
    source = image_source(request.image_source)
    for other in IMAGE_SOURCES.values():
        if other is not source:
            other.refuse_foreign_options(request)
    source.check_options(request)


def fold_generator_folder(dataset: RawDataset, request: GenerateRequest, fold):
    """(the generator folder the fold uses, whether it must be trained first); (None, False) for a source without
    a generator."""
    if request.generator_mode is None:
        return None, False
    if request.generator is not None:
        return request.generator, False
    run_folder = generator_run_folder(dataset.name, request.preset, fold, request.generator_mode)
    return run_folder / FINAL_FOLDER, not (run_folder / FINAL_FOLDER).is_dir()


def check_generate_request(dataset: RawDataset, request: GenerateRequest, progress=True) -> GeneratePlan:
    """Every check of ``nnsynth_generate`` (see the module docstring); returns what generation needs from them."""
    check_generation_options(request)
    check_role_names(dataset, request.balancing)
    source = image_source(request.image_source)
    generators = {}
    for fold in request.folds:
        fold_training_cases(dataset, fold)                  # the fold exists in the split
        generators[fold] = fold_generator_folder(dataset, request, fold)
        if generators[fold][1]:
            if request.num_shards > 1 and not request.launched:
                raise NnsynthError(f"{generators[fold][0].parent} holds no trained generator and shards started as "
                                   f"separate commands would each train it: train it first (nnsynth_train_generator "
                                   f"{dataset.name} --fold {fold} --preset {request.preset}), then start the shards")
            request.training_settings().resolved()
            check_writable(generators[fold][0].parent, "the generator")
    if request.export_id is not None:
        from nnunet_synth.nnunet_paths import require_nnunet_folder
        require_nnunet_folder("nnUNet_preprocessed", "a standalone dataset's splits_final.json is written there")
        check_dataset_id_free(request.export_id, dataset, export_folder_name(dataset, request.export_id))
        check_writable(dataset.folder.parent, "the standalone dataset")
    check_writable(dataset.folder, "synthetic cases")
    if dataset_cache_root(dataset) is not None:
        check_writable(dataset_cache_root(dataset), "the slice store")

    plan = GeneratePlan(scan_dataset(dataset, progress))    # every case, not only the folds'
    store = SyntheticStore(dataset)
    for fold in request.folds:
        training_cases = fold_training_cases(dataset, fold)
        generator_folder, must_train = generators[fold]
        if generator_folder is not None and not must_train:
            folder = resolve_generator_folder(generator_folder)
            config = read_generator_config(folder)
            source.check_generator(folder, config)
            check_generator_for_fold(dataset, config, folder, str(fold))
            training_cases = list(config.training_cases)
        check_fold_pathology(dataset, plan.scan, fold, training_cases, request.balancing, request.generator_mode)
        plan.training_cases[fold] = training_cases
        plan.units[fold] = source.unit(dataset, {case: plan.scan.num_slices[case] for case in training_cases},
                                       request.unit)
        if request.volume_noise == "aligned" and plan.units[fold] != "volume":
            raise NnsynthError(f"--volume-noise aligned aligns the noise of a volume's slices, but a case of "
                               f"{dataset.name} is one slice (2D data, or --unit slice): leave out --volume-noise")
        # per real slice, or per real volume when a case is a volume
        units = len(training_cases) if plan.units[fold] == "volume" else fold_num_slices(plan.scan, training_cases)
        plan.num_cases[fold] = request.num_cases if request.num_cases is not None else case_count(request.ratio,
                                                                                                    units)
        if not request.overwrite:
            settings = source.settings(request, plan.num_cases[fold], plan.units[fold], store, fold)
            recipe_folder = None if generator_folder is None else resolve_generator_path(generator_folder)
            store.check_fold_recipe(str(fold), source.recipe(settings, recipe_folder))
    check_case_budget(dataset, sum(plan.num_cases.values()))
    return plan


def check_fold_pathology(dataset: RawDataset, scan: DatasetScan, fold, training_cases, balancing: BalancingSettings,
                         generator_mode=None) -> list:
    """The fold's pathology classes (the balancer's roles on its training cases' pixel counts) that none of its
    training cases holds: one warning line each, since the fold goes on without them. A fold with no pathology
    pixel at all is refused (``validation.check_fold_classes``). Returns the absent classes."""
    counts = scan.counts_of(training_cases, dataset.num_classes)
    host, pathology = class_roles_from_counts(dataset, counts, balancing, scan.counts_of(dataset.case_ids,
                                                                                         dataset.num_classes))
    absent = check_fold_classes(dataset, scan, fold, training_cases, pathology, host)
    for entry in absent:
        learnt = "; the fold's generator cannot learn it" if generator_mode is not None else ""
        warn_once(("absent class", str(fold), entry["class"]),
                  f"{dataset.json_file}: class {entry['name']} occurs in none of fold {fold}'s training cases (only "
                  f"in {', '.join(entry['held_by'][:5]) or 'no case'}): it is not balanced in this fold{learnt}; "
                  f"the other classes are")
    return absent


def resolve_generator_path(folder):
    """The folder a recipe names: ``final/`` of a run folder, or the folder itself (also before it exists)."""
    folder = Path(folder)
    if folder.name != FINAL_FOLDER and (folder / FINAL_FOLDER).is_dir():
        return resolve_generator_folder(folder)
    return folder


def check_training_request(dataset: RawDataset, settings, fold, run_folder, device=None, progress=True):
    """Every check of ``nnsynth_train_generator`` before it trains: the settings (``TrainingSettings.resolved``),
    the device, every case of the dataset, the fold's classes and a writable run folder. Returns the settings
    resolved."""
    resolved = settings.resolved()
    if device is not None:
        check_device(device)
    check_writable(run_folder, "the generator run")
    if dataset_cache_root(dataset) is not None:
        check_writable(dataset_cache_root(dataset), "the slice store")
    scan = scan_dataset(dataset, progress)
    check_fold_pathology(dataset, scan, fold, fold_training_cases(dataset, fold), BalancingSettings(), resolved.mode)
    return resolved


def check_evaluation_request(dataset: RawDataset, command: str, options, progress=True):
    """The checks of ``nnsynth_evaluate`` before it creates its folder, trains or samples: ``options`` is the
    parsed namespace of the sub-command (fidelity, downstream or report)."""
    if command == "report":
        return
    check_device(options.device)
    check_inference_steps(options.inference_steps)
    if command == "fidelity":
        for seed in options.seeds:
            check_seed(seed, "--seeds")
        check_int_range(options.max_slices, "--max-slices", 1)
        check_int_range(options.feature_fold, "--feature-fold", 0)
        for name, folder in options.generator:
            mode = read_generator_config(resolve_generator_folder(folder)).mode
            if mode != "slice":
                raise NnsynthError(f"{folder}: --generator {name}=... holds an {mode} generator, and fidelity "
                                   f"--generator scores whole-slice generators: pass it as --inpaint-generator "
                                   f"{folder} (lesion-region fidelity)")
    else:
        check_seed(options.seed)
        check_seed(options.split_seed, "--split-seed")
        for amount in options.amounts:
            check_number_range(amount, "--amounts", 0, None, low_open=True)
        check_int_range(options.repeats, "--repeats", 1)
        check_int_range(options.test_patients, "--test-patients", 1, len(dataset.case_ids) - 1)
        for count in options.real_cases or []:
            check_int_range(count, "--real-cases", 1, len(dataset.case_ids))
        check_int_range(options.test_slice_step, "--test-slice-step", 1)
        check_int_range(options.generator_steps, "--generator-steps", 1)
        check_number_range(options.generator_lr, "--generator-lr", 0, 1, low_open=True)
        check_int_range(options.inpaint_steps, "--inpaint-steps", 1)
        check_int_range(options.inpaint_batch_size, "--inpaint-batch-size", 1)
        check_int_range(options.inpaint_inference_steps, "--inpaint-inference-steps", 1)
        check_int_range(options.first_id, "--first-id", 1, 999)
    scan = scan_dataset(dataset, progress)
    if command == "downstream" and options.configuration != "2d" and \
            statistics.median(scan.num_slices.values()) == 1:
        # nnU-Net plans 3D configurations only when the median case is more than one slice thick
        raise NnsynthError(f"--configuration {options.configuration}: the cases of {dataset.name} are 2D (one slice "
                           f"each), for which nnU-Net plans only the 2d configuration: use --configuration 2d")
