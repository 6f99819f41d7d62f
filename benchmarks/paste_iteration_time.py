"""Per-iteration training time of nnUNetTrainerLesionPaste (online lesion copy-paste) against the stock
nnUNetTrainer, same data, same plans and batch, one process.

    python benchmarks/paste_iteration_time.py                        # example data, temporary folders, CPU
    python benchmarks/paste_iteration_time.py --dataset 501 -p nnUNetPlans --device cuda   # your own setup

As ``synthmix_iteration_time.py`` (whose workspace and timing it reuses): an iteration is
``train_step(next(dataloader_train))``; the two trainers run in alternating blocks (stock, paste, paste, stock,
...) after warm-up, and the median is the robust figure on a shared machine. Target: paste / stock <= 1.10. Data
augmentation runs in this process (nnUNet_n_proc_DA=0) unless you set it, so the paste's cost is not hidden by
worker processes.
"""
import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from synthmix_iteration_time import (  # noqa: E402
    EXAMPLE_ID,
    SHARED_COVID,
    build_example_workspace,
    make_trainer,
    time_iterations,
    trimmed_mean,
)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", help="a planned dataset (default: build the example)")
    parser.add_argument("--covid-source", type=Path, default=SHARED_COVID,
                        help="the COVID-19 CT slices the example is built from (default: ../shared/data)")
    parser.add_argument("-p", "--plans", default=None, help="plans identifier (default: nnUNetPlans, or the "
                                                            "small CPU plans for the example)")
    parser.add_argument("-c", "--configuration", default="2d")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--probability", default="0.5", help="nnsynth_paste_probability (default 0.5)")
    parser.add_argument("--components", default="1", help="nnsynth_paste_components (default 1)")
    parser.add_argument("--blocks", type=int, default=6, help="alternating blocks per trainer")
    parser.add_argument("--block-iterations", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores, as "
                                                                      "nnUNetv2_train -device cpu)")
    parser.add_argument("--workdir", help="folder for the example workspace (default: a temporary folder)")
    args = parser.parse_args(argv)

    os.environ.setdefault("nnUNet_def_n_proc", "1")
    os.environ.setdefault("nnUNet_compile", "f")
    os.environ["nnsynth_paste_probability"] = args.probability
    os.environ["nnsynth_paste_components"] = args.components
    os.environ.pop("nnsynth_ratio", None)
    import torch
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    from nnunet_synth.trainers.lesion_paste import nnUNetTrainerLesionPaste

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
                    "nnUNetTrainerLesionPaste": make_trainer(nnUNetTrainerLesionPaste, dataset, args.configuration,
                                                             plans, device)}
        for trainer in trainers.values():
            time_iterations(trainer, args.warmup)
        times = {name: [] for name in trainers}
        order = list(trainers)
        for block in range(args.blocks):
            for name in (order if block % 2 == 0 else order[::-1]):     # ABBA: no trainer always goes first
                times[name] += time_iterations(trainers[name], args.block_iterations)
        paste = trainers["nnUNetTrainerLesionPaste"]
        step = next(t for t in paste.dataloader_train.data_loader.transforms.transforms
                    if type(t).__name__ == "LesionPasteTransform")
        counts, bank = dict(step.counts), paste.paste_report

    loading = {name: [load for _, load in values] for name, values in times.items()}
    times = {name: [total for total, _ in values] for name, values in times.items()}
    stock, pasted = times["nnUNetTrainer"], times["nnUNetTrainerLesionPaste"]
    print(f"dataset {dataset}, plans {plans}/{args.configuration}, device {args.device}, batch size "
          f"{paste.batch_size}, paste probability {args.probability}, up to {args.components} components; donor "
          f"bank {bank['donors_per_class']} components, {bank['donor_bytes'] / 2 ** 20:.2f} MiB per process, "
          f"extracted in {bank['extraction_seconds']} s; {counts['samples_pasted']} of {counts['samples']} samples "
          f"pasted; {len(stock)} timed iterations each in {args.blocks} alternating blocks")
    for name, values in times.items():
        print(f"{name:26s} mean {1000 * statistics.mean(values):8.1f} ms   10%-trimmed mean "
              f"{1000 * trimmed_mean(values):8.1f} ms   median {1000 * statistics.median(values):8.1f} ms   "
              f"stdev {1000 * statistics.stdev(values):6.1f} ms   (data loading median "
              f"{1000 * statistics.median(loading[name]):6.1f} ms)")
    print(f"LesionPaste / stock: mean {statistics.mean(pasted) / statistics.mean(stock):.3f}, trimmed mean "
          f"{trimmed_mean(pasted) / trimmed_mean(stock):.3f}, median "
          f"{statistics.median(pasted) / statistics.median(stock):.3f} (target <= 1.10; on a shared machine the "
          f"median is the robust figure)")


if __name__ == "__main__":
    main()
