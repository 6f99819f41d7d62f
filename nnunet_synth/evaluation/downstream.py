"""Downstream evaluation (method.md §5, 000 Table 2) on nnU-Net: real-only vs real + synthetic arms.

Every arm is a copy of the real dataset (imagesTr/labelsTr/dataset.json copied, the user's dataset is never
written to) under its own dataset id, so each arm has its own synthetic store, preprocessed folder and results
folder. The stock planner gives every copy the same plans (same real data, same fingerprint) and nnU-Net's
seeded split gives the same folds; an arm's synthetic cases only ever enter training (SynthMix pool). Each arm
trains the same SynthMix trainer (same budget) with ``nnsynth_ratio`` = amount / (1 + amount): the share of
synthetic slices a pooled training set with ``amount`` synthetic slices per real slice would have. The
real-only arm uses ratio 0 (the same code path, the pool is not read).

Every generator must be one of the evaluated fold (trained on its training cases only, see
``check_generator_for_fold``): checked for all arms before anything is trained, and the synthetic cases are made
for that fold, so the trainer's leakage check passes them.
"""
import csv
from dataclasses import dataclass, field
from pathlib import Path

from nnunet_synth.atomic import atomic_path, copy_file_atomic
from nnunet_synth.dataset import RawDataset
from nnunet_synth.dataset.splits import real_crossval_split
from nnunet_synth.errors import NnsynthError
from nnunet_synth.evaluation.nnunet_runs import plan_and_preprocess, predict_and_score, train

BUDGET_TRAINERS = {"debug": "nnUNetTrainerSynthMix_debug",   # 100 iterations
                   "demo": "nnUNetTrainerSynthMix_demo",     # 500 iterations
                   "full": "nnUNetTrainerSynthMix"}          # nnU-Net's 1000 epochs
REAL_ONLY = "real_only"


@dataclass
class DownstreamSettings:
    generators: dict                        # arm name (e.g. "mat", "cbmat") -> generator folder
    amounts: list = field(default_factory=lambda: [1.0])   # synthetic slices per real training slice
    budget: str = "demo"
    cpu_plans: bool = True
    fold: int = 0
    seed: int = 0
    inference_steps: int = 50
    first_dataset_id: int = 700
    device: str = "cpu"


@dataclass
class Arm:
    name: str
    generator: Path = None
    amount: float = 0.0

    @property
    def label(self) -> str:
        return self.name if self.generator is None else f"{self.name}_x{self.amount:g}"

    @property
    def ratio(self) -> float:
        return self.amount / (1.0 + self.amount)


def plan_arms(settings: DownstreamSettings) -> list:
    arms = [Arm(REAL_ONLY)]
    for name, generator in settings.generators.items():
        for amount in settings.amounts:
            if amount <= 0:
                raise NnsynthError(f"synthetic amounts must be positive, got {amount}")
            arms.append(Arm(name, Path(generator), float(amount)))
    return arms


def check_generators_for_fold(dataset: RawDataset, settings: DownstreamSettings):
    """Refuse, before any training, a generator that saw a validation case of the evaluated fold."""
    from nnunet_synth.generation import check_generator_for_fold
    from nnunet_synth.generator.checkpoints import read_generator_config, resolve_generator_folder
    for generator in settings.generators.values():
        folder = resolve_generator_folder(generator)
        check_generator_for_fold(dataset, read_generator_config(folder), folder, settings.fold)


def copy_real_dataset(dataset: RawDataset, raw_root: Path, dataset_id: int, arm: Arm) -> RawDataset:
    """The real cases under a new id (copies; reused when a previous run made the same copy)."""
    source_name = dataset.name.split("_", 1)[1]
    name = f"Dataset{dataset_id:03d}_{source_name}Eval{arm.label.replace('_', '').replace('.', 'p')}"
    existing = [p for p in raw_root.glob(f"Dataset{dataset_id:03d}_*") if p.name != name]
    if existing:
        raise NnsynthError(f"dataset id {dataset_id} is taken by {existing[0]}: pass another --first-id")
    target = raw_root / name
    for sub in ("imagesTr", "labelsTr"):
        for source in sorted((dataset.folder / sub).iterdir()):
            destination = target / sub / source.name
            if not destination.is_file() or destination.stat().st_size != source.stat().st_size:
                copy_file_atomic(source, destination)
    copy_file_atomic(dataset.json_file, target / "dataset.json")
    return RawDataset(target)


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


def run_arm(dataset: RawDataset, arm: Arm, arm_dataset: RawDataset, settings: DownstreamSettings, raw_root: Path,
            preprocessed_root: Path, output_folder: Path, test_images=None, test_labels=None) -> dict:
    from nnunet_synth.generation import GenerationSettings, generate_synthetic_cases, num_cases_for_ratio
    if arm.generator is not None:
        num_cases = num_cases_for_ratio(arm_dataset, arm.generator, arm.amount)
        generate_synthetic_cases(arm_dataset, arm.generator, GenerationSettings(
            num_cases=num_cases, seed=settings.seed, num_inference_steps=settings.inference_steps),
            fold=settings.fold, device=settings.device)
    plans = plan_and_preprocess(arm_dataset, preprocessed_root, settings.cpu_plans)
    trainer = BUDGET_TRAINERS[settings.budget]
    train(arm_dataset, trainer, plans, settings.fold, settings.device, nnsynth_ratio=str(arm.ratio),
          nnsynth_min_quality="none")
    images, labels, description = evaluation_cases(arm_dataset, settings.fold, test_images, test_labels)
    dice = predict_and_score(arm_dataset, images, labels, output_folder / "predictions" / arm.label, trainer, plans,
                             settings.fold, settings.device)
    return {"arm": arm.name, "amount": arm.amount, "ratio": round(arm.ratio, 4), "dataset": arm_dataset.name,
            "fold": settings.fold, "evaluated_on": description, **{f"dice_{name}": round(value, 4) for name, value in dice.items()}}


def run_downstream(dataset: RawDataset, settings: DownstreamSettings, raw_root, preprocessed_root, output_folder,
                   test_images=None, test_labels=None) -> list:
    """Run every arm; write ``downstream.csv`` and ``downstream.png`` into ``output_folder``; return the rows."""
    if settings.budget not in BUDGET_TRAINERS:
        raise NnsynthError(f"unknown budget '{settings.budget}': choose one of {', '.join(BUDGET_TRAINERS)}")
    raw_root, output_folder = Path(raw_root), Path(output_folder)
    check_generators_for_fold(dataset, settings)
    output_folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for index, arm in enumerate(plan_arms(settings)):
        arm_dataset = copy_real_dataset(dataset, raw_root, settings.first_dataset_id + index, arm)
        print(f"[downstream] arm {arm.label}: {arm_dataset.name}, synthetic ratio {arm.ratio:.3f}", flush=True)
        rows.append(run_arm(dataset, arm, arm_dataset, settings, raw_root, Path(preprocessed_root), output_folder,
                            test_images, test_labels))
        write_rows_csv(rows, output_folder / "downstream.csv")
    plot_downstream(rows, output_folder / "downstream.png")
    return rows


def write_rows_csv(rows, path):
    columns = list(dict.fromkeys(key for row in rows for key in row))
    with atomic_path(path, suffix=".csv") as temp_name:
        with open(temp_name, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns)
            writer.writeheader()
            writer.writerows(rows)


def plot_downstream(rows, path):
    """Grouped bars: Dice per class (groups) for every arm (bars)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    classes = [key[len("dice_"):] for key in rows[0] if key.startswith("dice_")]
    labels = [row["arm"] if row["arm"] == REAL_ONLY else f"{row['arm']} x{row['amount']:g}" for row in rows]
    width = 0.8 / len(rows)
    figure, axis = plt.subplots(figsize=(1.5 + 1.6 * len(classes), 3.2))
    for index, (row, label) in enumerate(zip(rows, labels)):
        axis.bar(np.arange(len(classes)) + index * width, [row[f"dice_{c}"] for c in classes], width, label=label)
    axis.set_xticks(np.arange(len(classes)) + width * (len(rows) - 1) / 2, classes)
    axis.set_ylabel("Dice")
    axis.set_ylim(0, 1)
    axis.legend(fontsize=7)
    figure.tight_layout()
    with atomic_path(path, suffix=".png") as temp_name:
        figure.savefig(temp_name, dpi=90)
    plt.close(figure)
