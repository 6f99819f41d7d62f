"""Scale benchmark: what grows when the dataset grows.

Builds a base dataset from the real COVID-19 CT slices (``nnsynth_convert_covid19``: 15 patients, 1258 slices of
256 x 256), then 1x / 4x / 16x versions whose cases are symbolic links to the base cases (no extra disk; 16x =
20128 slices), and for each, in a fresh process:

- ``cache``: the slice cache build (one pass over the raw cases) and its time, after the intensity window; then
  the store of real slices at their own size that generation reads (``dataset/native_slices.py``), its time and
  size;
- ``train``: a short ``train_generator`` run (tiny preset), which reads from that cache: peak RSS;
- ``generate``: a short ``generate_synthetic_cases`` run with the generator just trained, reading the store the
  cache stage built: peak RSS, and bytes written per synthetic case (``wchar`` of /proc/self/io over the run,
  divided by the cases written).

Targets: peak RSS grows < 1.3x from 1x to 16x; bytes written per case constant.

    python benchmarks/scale.py --scales 1 4 16 --stages cache train generate --json scale.json
"""
import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHARED_COVID = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "covid19_ct_slices"
BASE_ID, FIRST_SCALED_ID = 960, 961


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bytes_written() -> int:
    """Bytes this process passed to write() so far (Linux /proc/self/io ``wchar``)."""
    with open("/proc/self/io") as handle:
        return int(next(line for line in handle if line.startswith("wchar:")).split()[1])


def replicate(base_folder: Path, factor: int, folders: dict, dataset_id: int) -> Path:
    """A fresh dataset whose cases are ``factor`` copies (symbolic links) of the base dataset's cases; its slice
    cache, generator and synthetic cases of an earlier run are removed."""
    name = f"Dataset{dataset_id:03d}_ScaleX{factor}"
    for root in folders.values():
        shutil.rmtree(root / name, ignore_errors=True)
    folder = folders["nnUNet_raw"] / name
    dataset_json = json.loads((base_folder / "dataset.json").read_text())
    ending = dataset_json["file_ending"]
    for kind in ("imagesTr", "labelsTr"):
        (folder / kind).mkdir(parents=True)
        for source in sorted((base_folder / kind).glob("*" + ending)):
            stem = source.name[:-len(ending)]
            case_id, suffix = (stem[:-5], stem[-5:]) if kind == "imagesTr" else (stem, "")
            for copy in range(factor):
                (folder / kind / f"{case_id}_r{copy:02d}{suffix}{ending}").symlink_to(source)
    dataset_json["numTraining"] = dataset_json["numTraining"] * factor
    (folder / "dataset.json").write_text(json.dumps(dataset_json, indent=2))
    return folder


def child(stage: str, dataset_folder: str, args) -> dict:
    """One stage in this (fresh) process; returns its figures."""
    import torch
    torch.set_num_threads(args.threads)
    from nnunet_synth.dataset import RawDataset, dataset_intensity_window
    from nnunet_synth.generator import TrainingSettings
    from nnunet_synth.generator.training import train_generator
    dataset = RawDataset(dataset_folder)
    from nnunet_synth.nnunet_paths import require_nnunet_folder
    run_folder = require_nnunet_folder("nnUNet_results", "the benchmark's generator") / dataset.name / "scale_generator"
    result = {"stage": stage, "dataset": dataset.name, "cases": len(dataset.case_ids)}
    if stage == "cache":
        from nnunet_synth.generator.slice_cache import open_slice_cache, slice_cache_root
        started = time.perf_counter()
        window = dataset_intensity_window(dataset, dataset.case_ids)
        result["window_s"] = time.perf_counter() - started
        started = time.perf_counter()
        cache = open_slice_cache(dataset, dataset.case_ids, window, args.image_size,
                                 slice_cache_root(dataset, run_folder))
        result.update(cache_build_s=time.perf_counter() - started, slices=len(cache),
                      cache_bytes=sum(p.stat().st_size for p in cache.folder.iterdir()))
        from nnunet_synth.dataset.native_slices import open_native_slices
        started = time.perf_counter()
        native = open_native_slices(dataset, dataset.case_ids, progress=False)
        result.update(native_store_build_s=time.perf_counter() - started,
                      native_store_bytes=sum(p.stat().st_size for p in native.folder.iterdir()))
    elif stage == "train":
        settings = TrainingSettings(preset="tiny", image_size=args.image_size, batch_size=args.batch_size,
                                    max_steps=args.train_steps, warmup_steps=1, checkpoint_every=args.train_steps,
                                    preview_every=args.train_steps, preview_inference_steps=2, preview_count=2)
        started = time.perf_counter()
        train_generator(dataset, run_folder, settings, fold="all", progress=False)
        result["train_s"] = time.perf_counter() - started
    elif stage == "generate":
        from nnunet_synth.image_sources import GenerationSettings, generate_synthetic_cases
        settings = GenerationSettings(num_cases=args.cases, seed=0, num_inference_steps=args.inference_steps,
                                      batch_size=args.batch_size)
        written_before, started = bytes_written(), time.perf_counter()
        summary = generate_synthetic_cases(dataset, run_folder / "final", settings, fold="all", overwrite=True)
        result.update(generate_s=time.perf_counter() - started, synthetic_cases=summary["written"],
                      bytes_per_case=(bytes_written() - written_before) / max(1, summary["written"]))
    result["peak_rss_mib"] = peak_rss_mib()
    return result


def run_stage(stage: str, dataset_folder: Path, args, environment) -> dict:
    command = [sys.executable, __file__, "--child", stage, "--child-dataset", str(dataset_folder),
               "--image-size", str(args.image_size), "--batch-size", str(args.batch_size),
               "--train-steps", str(args.train_steps), "--cases", str(args.cases),
               "--inference-steps", str(args.inference_steps), "--threads", str(args.threads)]
    done = subprocess.run(command, capture_output=True, text=True, env=environment)
    if done.returncode != 0:
        raise SystemExit(f"{stage} on {dataset_folder.name} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scales", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--stages", nargs="+", default=["cache", "train", "generate"],
                        choices=["cache", "train", "generate"])
    parser.add_argument("--generate-scales", type=int, nargs="+", help="scales to run the generate stage at "
                        "(default: all)")
    parser.add_argument("--source", default=str(SHARED_COVID), help="the COVID-19 CT slices folder")
    parser.add_argument("--workdir", help="where the datasets go (default: a temporary folder, removed)")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--train-steps", type=int, default=10)
    parser.add_argument("--cases", type=int, default=16, help="synthetic cases of the generate stage")
    parser.add_argument("--inference-steps", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", help="also write the figures here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--child-dataset", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.child_dataset, args)))
        return {}

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="nnsynth_scale_"))
    folders = {name: workdir / name for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}
    for folder in folders.values():
        folder.mkdir(parents=True, exist_ok=True)
    environment = {**os.environ, **{name: str(folder) for name, folder in folders.items()},
                   "OMP_NUM_THREADS": str(args.threads)}
    base = folders["nnUNet_raw"] / f"Dataset{BASE_ID}_ScaleBase"
    if not base.is_dir():
        subprocess.run([str(Path(sys.executable).parent / "nnsynth_convert_covid19"), args.source, "-o",
                        str(folders["nnUNet_raw"]), "-d", str(BASE_ID), "-n", "ScaleBase"], check=True,
                       capture_output=True)
    results = {"settings": {k: v for k, v in vars(args).items() if not k.startswith("child")}, "scales": {}}
    try:
        for index, factor in enumerate(args.scales):
            folder = replicate(base, factor, folders, FIRST_SCALED_ID + index)
            figures = {}
            for stage in args.stages:
                if stage == "generate" and args.generate_scales and factor not in args.generate_scales:
                    continue
                figures[stage] = run_stage(stage, folder, args, environment)
                print(f"{factor:>3}x {stage:<9} " + ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}"
                                                             for k, v in figures[stage].items()
                                                             if k not in ("stage", "dataset")), flush=True)
            results["scales"][factor] = figures
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    for stage in ("train", "generate"):
        measured = [factor for factor in args.scales if stage in results["scales"][factor]]
        if len(measured) > 1:
            first, last = (results["scales"][factor][stage] for factor in (measured[0], measured[-1]))
            ratio = last["peak_rss_mib"] / first["peak_rss_mib"]
            results[f"{stage}_peak_rss_ratio"] = {f"{measured[-1]}x/{measured[0]}x": ratio}
            print(f"{stage}: peak RSS {measured[-1]}x / {measured[0]}x = {ratio:.2f} (target < 1.3)")
            if stage == "generate":
                ratio = last["bytes_per_case"] / first["bytes_per_case"]
                results["bytes_per_case_ratio"] = {f"{measured[-1]}x/{measured[0]}x": ratio}
                print(f"bytes written per synthetic case {measured[-1]}x / {measured[0]}x = {ratio:.2f} (target 1)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
