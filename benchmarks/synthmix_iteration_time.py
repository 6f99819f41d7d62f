"""Per-iteration training time of nnUNetTrainerSynthMix against the stock nnUNetTrainer, same data, one run.

    python benchmarks/synthmix_iteration_time.py                       # example data, temporary folders, CPU
    python benchmarks/synthmix_iteration_time.py --dataset 501 -p nnUNetPlans --device cuda   # your own setup

An iteration is what nnUNetTrainer.run_training does per batch: ``train_step(next(dataloader_train))``, i.e.
data loading + augmentation + forward/backward. The two trainers run in alternating blocks (stock, SynthMix,
SynthMix, stock, ...) after warm-up iterations, so drift of the machine hits both alike. Target: SynthMix within 5 %.

Without --dataset the script builds a private workspace: a small real example (5 patients, 37 slices of the
COVID-19 CT slices in ../shared/data, or --covid-source) converted to an nnU-Net dataset, 13 synthetic cases
from a tiny generator (train_generator + generate_synthetic_cases), stock nnUNetv2_plan_and_preprocess for 2d,
and small CPU plans (nnunet_synth.evaluation.cpu_plans) that keep the preprocessed data. Data augmentation runs in
this process (nnUNet_n_proc_DA=0) unless you set it.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_COVID = REPO_ROOT.parent / "shared" / "data" / "covid19_ct_slices"
# the tests' small real example: the five shortest patients, at most 9 slices each (37 slices)
EXAMPLE_SELECTION = ["--cases", "case_10", "case_14", "case_15", "case_17", "case_18", "--max-slices-per-case", "9"]
EXAMPLE_ID, EXAMPLE_NAME = 982, "SynthMixBenchmark"


def build_example_workspace(workdir: Path, covid_source: Path) -> str:
    """nnU-Net folders under ``workdir`` with the example dataset, synthetic cases, plans and CPU plans."""
    if not (covid_source / "cases.csv").is_file():
        raise SystemExit(f"{covid_source}: the COVID-19 CT slices are missing: pass --covid-source FOLDER "
                         f"(cases.csv, ct/, lungs/, covid/) or --dataset")
    for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        (workdir / name).mkdir(parents=True, exist_ok=True)
        os.environ[name] = str(workdir / name)
    from nnunet_synth.dataset import RawDataset
    from nnunet_synth.evaluation.cpu_plans import write_cpu_plans
    from nnunet_synth.generator import TrainingSettings, train_generator
    from nnunet_synth.generator.checkpoints import FINAL_FOLDER
    from nnunet_synth.image_sources import GenerationSettings, generate_synthetic_cases
    subprocess.run([str(Path(sys.executable).parent / "nnsynth_convert_covid19"),
                    str(covid_source), *EXAMPLE_SELECTION, "-o", str(workdir / "nnUNet_raw"), "-d",
                    str(EXAMPLE_ID), "-n", EXAMPLE_NAME, "--overwrite"], check=True, capture_output=True)
    folder = workdir / "nnUNet_raw" / f"Dataset{EXAMPLE_ID}_{EXAMPLE_NAME}"
    dataset = RawDataset(folder)
    settings = TrainingSettings(preset="tiny", image_size=32, batch_size=4, max_steps=3, warmup_steps=1,
                                checkpoint_every=100, preview_every=100, preview_inference_steps=2)
    train_generator(dataset, workdir / "generator", settings, fold=0, progress=False)
    generate_synthetic_cases(dataset, workdir / "generator" / FINAL_FOLDER,
                             GenerationSettings(num_cases=13, num_inference_steps=4))
    env = {key: value for key, value in os.environ.items() if key != "nnUNet_n_proc_DA"}  # 2.8.1 planner needs it >0
    subprocess.run([str(Path(sys.executable).parent / "nnUNetv2_plan_and_preprocess"), "-d", str(EXAMPLE_ID),
                    "-c", "2d", "-np", "1", "-npfp", "1"], env=env, check=True, capture_output=True)
    write_cpu_plans(workdir / "nnUNet_preprocessed" / folder.name, "2d", "nnUNetPlans", "nnUNetPlans_cpu")
    return "nnUNetPlans_cpu"


def make_trainer(trainer_class, dataset: str, configuration: str, plans_identifier: str, device):
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    from nnunet_synth.nnunet_paths import require_nnunet_folder
    name = maybe_convert_to_dataset_name(dataset)
    base = require_nnunet_folder("nnUNet_preprocessed", "the benchmark's plans") / name
    with open(base / f"{plans_identifier}.json") as handle:
        plans = json.load(handle)
    with open(base / "dataset.json") as handle:
        dataset_json = json.load(handle)
    trainer = trainer_class(dict(plans, continue_training=False), configuration, 0, dataset_json, device)
    trainer.print_to_log_file = lambda *args, **kwargs: None
    trainer.on_train_start()
    trainer.on_train_epoch_start()
    return trainer


def time_iterations(trainer, count: int):
    """Per iteration: (total seconds, seconds spent loading + augmenting the batch)."""
    times = []
    for _ in range(count):
        start = time.perf_counter()
        batch = next(trainer.dataloader_train)
        loaded = time.perf_counter()
        trainer.train_step(batch)
        times.append((time.perf_counter() - start, loaded - start))
    return times


def trimmed_mean(values, fraction: float = 0.1) -> float:
    """Mean without the lowest and highest ``fraction`` of the values (outliers from other load)."""
    ordered = sorted(values)
    cut = int(len(ordered) * fraction)
    return statistics.mean(ordered[cut:len(ordered) - cut] or ordered)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", help="a planned dataset with synthetic cases (default: build the example)")
    parser.add_argument("-p", "--plans", default=None, help="plans identifier (default: nnUNetPlans, or the "
                                                            "small CPU plans for the example)")
    parser.add_argument("-c", "--configuration", default="2d")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--ratio", default="0.5", help="nnsynth_ratio for SynthMix (default 0.5)")
    parser.add_argument("--blocks", type=int, default=6, help="alternating blocks per trainer")
    parser.add_argument("--block-iterations", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores, as "
                                                                      "nnUNetv2_train -device cpu)")
    parser.add_argument("--workdir", help="folder for the example workspace (default: a temporary folder)")
    parser.add_argument("--covid-source", type=Path, default=SHARED_COVID,
                        help="the COVID-19 CT slices the example comes from (default: ../shared/data beside the repo)")
    args = parser.parse_args(argv)

    os.environ.setdefault("nnUNet_def_n_proc", "1")
    os.environ.setdefault("nnUNet_compile", "f")
    os.environ["nnsynth_ratio"] = args.ratio
    import torch
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    from nnunet_synth.trainers.synth_mix import nnUNetTrainerSynthMix

    with tempfile.TemporaryDirectory() as temporary:
        if args.dataset is None:
            plans = build_example_workspace(Path(args.workdir or temporary), args.covid_source)
            dataset = str(EXAMPLE_ID)
        else:
            plans, dataset = args.plans or "nnUNetPlans", args.dataset
        plans = args.plans or plans
        os.environ.setdefault("nnUNet_n_proc_DA", "0")
        device = torch.device(args.device)
        if device.type == "cpu":
            torch.set_num_threads(args.threads or os.cpu_count())    # as nnUNetv2_train -device cpu does
        trainers = {"nnUNetTrainer": make_trainer(nnUNetTrainer, dataset, args.configuration, plans, device),
                    "nnUNetTrainerSynthMix": make_trainer(nnUNetTrainerSynthMix, dataset, args.configuration,
                                                          plans, device)}
        for trainer in trainers.values():
            time_iterations(trainer, args.warmup)
        times = {name: [] for name in trainers}
        order = list(trainers)
        for block in range(args.blocks):
            for name in (order if block % 2 == 0 else order[::-1]):     # ABBA: no trainer always goes first
                times[name] += time_iterations(trainers[name], args.block_iterations)

    loading = {name: [load for _, load in values] for name, values in times.items()}
    times = {name: [total for total, _ in values] for name, values in times.items()}
    stock, mixed = times["nnUNetTrainer"], times["nnUNetTrainerSynthMix"]
    summary = trainers["nnUNetTrainerSynthMix"].synth_summary
    print(f"dataset {dataset}, plans {plans}/{args.configuration}, device {args.device}, batch size "
          f"{summary['batch_size']}, SynthMix ratio {summary['settings']['ratio']} "
          f"({summary['synthetic_cases']['used']} synthetic cases), {len(stock)} timed iterations each "
          f"in {args.blocks} alternating blocks")
    for name, values in times.items():
        print(f"{name:24s} mean {1000 * statistics.mean(values):8.1f} ms   10%-trimmed mean "
              f"{1000 * trimmed_mean(values):8.1f} ms   median {1000 * statistics.median(values):8.1f} ms   "
              f"stdev {1000 * statistics.stdev(values):6.1f} ms   (data loading median "
              f"{1000 * statistics.median(loading[name]):6.1f} ms)")
    print(f"SynthMix / stock: mean {statistics.mean(mixed) / statistics.mean(stock):.3f}, trimmed mean "
          f"{trimmed_mean(mixed) / trimmed_mean(stock):.3f}, median "
          f"{statistics.median(mixed) / statistics.median(stock):.3f} (target <= 1.05; on a shared machine the "
          f"median is the robust figure)")


if __name__ == "__main__":
    main()
