"""Python steps of the GPU kit (run.sh): reports, the sampling check, Dice collection, JSON merging.

    python kit_stages.py install OUT_JSON SECONDS
    python kit_stages.py sampling GENERATOR DATASET OUT_JSON [--device cuda]
    python kit_stages.py dice RESULTS_FOLD_FOLDER        (prints {"class": dice} as JSON)
    python kit_stages.py merge OUT_JSON KEY VALUE_JSON   (sets OUT_JSON[KEY] = VALUE_JSON, atomically)
"""
import argparse
import importlib
import json
import platform
import sys
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from nnunet_synth.atomic import write_json_atomic

PACKAGES = ("nnunetv2", "diffusers", "SimpleITK", "blosc2", "batchgenerators", "batchgeneratorsv2", "acvl-utils",
            "dynamic-network-architectures", "huggingface-hub", "accelerate", "torch", "numpy")
MODULES = ("nnunetv2", "diffusers", "SimpleITK", "blosc2", "batchgenerators", "batchgeneratorsv2", "acvl_utils",
           "dynamic_network_architectures", "nibabel", "seaborn", "cc3d", "nnunet_synth.trainers.synth_mix")


def read_json(path):
    path = Path(path)
    return json.loads(path.read_text()) if path.is_file() else {}


def merge(path, key, value):
    data = read_json(path)
    data[key] = value
    write_json_atomic(data, path)


def install_report(out_json, seconds):
    import torch
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = None
    failed = {}
    for module in MODULES:
        try:
            importlib.import_module(module)
        except Exception as error:  # noqa: BLE001 - reported, not raised: later stages say what they need
            failed[module] = f"{type(error).__name__}: {error}"
    cuda = torch.cuda.is_available()
    write_json_atomic({"seconds": float(seconds), "python": platform.python_version(), "versions": versions,
                       "import_failures": failed, "cuda": cuda,
                       "device_name": torch.cuda.get_device_name() if cuda else platform.processor() or "cpu",
                       "bf16_supported": bool(cuda and torch.cuda.is_bf16_supported())}, out_json)
    if failed:
        sys.exit(f"kit install: imports failed: {failed}")


def sampling_check(generator, dataset_name, out_json, device):
    """DDIM sampling timed, and the same seed giving the same image whatever the batch (1 vs 4 at once)."""
    import numpy as np
    import torch

    from nnunet_synth.dataset import RawDataset, dataset_intensity_window
    from nnunet_synth.generator import load_generator, load_model_slices
    from nnunet_synth.sampling import sample_images
    dataset = RawDataset.from_name(dataset_name)
    unet, config = load_generator(generator, dataset=dataset, device=device)
    _, label_maps, _ = load_model_slices(dataset, dataset.case_ids[:1], dataset_intensity_window(dataset),
                                         config.image_size)
    maps = label_maps[np.linspace(0, len(label_maps) - 1, 4).astype(int)]
    seeds = [11, 12, 13, 14]
    start = time.perf_counter()
    together = sample_images(unet, config, maps, seeds, num_inference_steps=20, batch_size=4, device=device,
                             progress=False)
    seconds = time.perf_counter() - start
    alone = np.concatenate([sample_images(unet, config, maps[i:i + 1], seeds[i:i + 1], num_inference_steps=20,
                                          batch_size=1, device=device, progress=False) for i in range(4)])
    again = sample_images(unet, config, maps, seeds, num_inference_steps=20, batch_size=4, device=device,
                          progress=False)
    difference = float(np.abs(np.asarray(together, dtype=np.float64) - np.asarray(alone, dtype=np.float64)).max())
    # kernels may sum in another order for another batch size: expect tiny differences, report the largest
    result = {"device": str(device), "slices": 4, "inference_steps": 20, "seconds_batch_of_4": seconds,
              "max_abs_difference_batch4_vs_batch1": difference, "same_within_1e-3": difference <= 1e-3,
              "rerun_identical": bool(np.array_equal(together, again)), "torch": torch.__version__}
    merge(out_json, "sampling", result)
    print(json.dumps(result))


def dice(fold_folder):
    """Per-class Dice of nnU-Net's own validation summary (fold_X/validation/summary.json)."""
    summary = json.loads((Path(fold_folder) / "validation" / "summary.json").read_text())
    labels = json.loads((Path(fold_folder).parent / "dataset.json").read_text())["labels"]
    names = {str(value): name for name, value in labels.items()}
    result = {names.get(key, key): values["Dice"] for key, values in summary["mean"].items()}
    result["foreground_mean"] = summary["foreground_mean"]["Dice"]
    print(json.dumps(result))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    install = commands.add_parser("install")
    install.add_argument("out_json")
    install.add_argument("seconds", type=float)
    sampling = commands.add_parser("sampling")
    sampling.add_argument("generator")
    sampling.add_argument("dataset")
    sampling.add_argument("out_json")
    sampling.add_argument("--device", default="cuda")
    dice_parser = commands.add_parser("dice")
    dice_parser.add_argument("fold_folder")
    merge_parser = commands.add_parser("merge")
    merge_parser.add_argument("out_json")
    merge_parser.add_argument("key")
    merge_parser.add_argument("value", help="JSON text, or @FILE to read it from a file")
    args = parser.parse_args(argv)
    if args.command == "install":
        install_report(args.out_json, args.seconds)
    elif args.command == "sampling":
        sampling_check(args.generator, args.dataset, args.out_json, args.device)
    elif args.command == "dice":
        dice(args.fold_folder)
    else:
        value = Path(args.value[1:]).read_text() if args.value.startswith("@") else args.value
        merge(args.out_json, args.key, json.loads(value))


if __name__ == "__main__":
    main()
