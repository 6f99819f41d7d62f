"""Generator throughput: training images/s, sampling slices/s (DDIM), peak memory and model FLOPs utilisation.

"ours" is the training step ``nnsynth_train_generator`` runs: ``nnunet_synth.generator.training.training_step`` on a
state from ``build_training_state`` (host slices copied per step, mixed precision through accelerate, channels_last
and fused AdamW on CUDA, optional torch.compile, EMA). "plain fp32" is a diffusers-example loop over the same UNet
in the same process (one fixed batch on the device, no autocast, no channels_last, default AdamW, no compile).
Inputs are real slices: by default a small real example (5 patients, 37 slices of the COVID-19 CT slices in
../shared/data or ``--covid-source``, converted with ``nnsynth_convert_covid19`` into a temporary folder), or
``--dataset`` (an nnU-Net raw dataset folder).
Utilisation (MFU) is against a peak measured in this process (best large matmul in the training precision).

    python benchmarks/generator_throughput.py --preset tiny --device cpu --steps 10
    python benchmarks/generator_throughput.py --preset default --compile --max-batch-gib 24 --json out.json
"""
import argparse
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from diffusers.training_utils import EMAModel
from torch.utils.flop_counter import FlopCounterMode

from nnunet_synth.atomic import write_json_atomic
from nnunet_synth.dataset import RawDataset
from nnunet_synth.dataset.slices import class_pixel_frequencies, dataset_intensity_window
from nnunet_synth.generator import training
from nnunet_synth.generator.ablation import make_ablation_schedule, one_hot_condition
from nnunet_synth.generator.config import GeneratorConfig, TrainingSettings, build_noise_scheduler, build_unet
from nnunet_synth.generator.data import load_model_slices
from nnunet_synth.sampling import sample_images

MATMUL_DTYPES = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SHARED_COVID = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "covid19_ct_slices"
# the tests' small real example: the five shortest patients, at most 9 slices each (37 slices)
EXAMPLE_SELECTION = ["--cases", "case_10", "case_14", "case_15", "case_17", "case_18", "--max-slices-per-case", "9"]


def measured_peak_tflops(device, dtype, size=None, repeats=10) -> float:
    """Best rate of a square matmul in ``dtype`` on ``device``: the peak MFU is measured against."""
    size = size or (8192 if device.type == "cuda" else 2048)
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        a @ b
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * size ** 3 / best / 1e12


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def reset_peak_memory(device):
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_memory_gib(device) -> float:
    """CUDA: peak allocated since the last reset. CPU: peak resident set size of the whole process so far."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2 ** 30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


def load_real_slices(dataset_folder, image_size, covid_source=SHARED_COVID):
    """All slices of the dataset (default: the small real example) in model space, and its class pixel shares."""
    with tempfile.TemporaryDirectory() as workdir:
        if dataset_folder is None:
            if not (Path(covid_source) / "cases.csv").is_file():
                raise SystemExit(f"{covid_source}: the COVID-19 CT slices are missing: pass --covid-source FOLDER "
                                 f"(cases.csv, ct/, lungs/, covid/) or --dataset")
            # the project's command, not its module: benchmarks stay off the command-line layer's internals
            subprocess.run([str(Path(sys.executable).parent / "nnsynth_convert_covid19"), str(covid_source),
                            *EXAMPLE_SELECTION, "-o", workdir, "-d", "983", "-n", "ThroughputBenchmark"],
                           check=True, capture_output=True)
            dataset_folder = f"{workdir}/Dataset983_ThroughputBenchmark"
        dataset = RawDataset(dataset_folder)
        images, label_maps, _ = load_model_slices(dataset, dataset.case_ids, dataset_intensity_window(dataset),
                                                  image_size)
        frequencies = class_pixel_frequencies(dataset).tolist()
    return images, label_maps, dataset.num_classes, frequencies


def fixed_batch(images, label_maps, batch_size, device):
    chosen = np.arange(batch_size) % len(images)
    return torch.from_numpy(images[chosen]).to(device), torch.from_numpy(label_maps[chosen]).to(device)


def time_steps(step_function, steps, warmup, device) -> float:
    """Seconds per call of ``step_function`` after ``warmup`` untimed calls."""
    for _ in range(warmup):
        step_function()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        step_function()
    synchronize(device)
    return (time.perf_counter() - start) / steps


def plain_training_step_factory(settings, images, label_maps, num_classes, device):
    """A plain fp32 diffusers-example loop over the same UNet."""
    torch.manual_seed(0)
    unet = build_unet(settings, num_classes).to(device).train()
    optimizer = torch.optim.AdamW(unet.parameters(), lr=settings.learning_rate)
    ema = EMAModel(unet.parameters(), decay=0.9999, use_ema_warmup=True, power=0.75)
    ema.to(device)
    noise_scheduler = build_noise_scheduler()
    batch_images, batch_label_maps = fixed_batch(images, label_maps, settings.batch_size, device)
    condition = one_hot_condition(batch_label_maps, num_classes)

    def step():
        noise = torch.randn_like(batch_images)
        timesteps = torch.randint(0, 1000, (len(batch_images),), device=device)
        noisy = noise_scheduler.add_noise(batch_images, noise, timesteps)
        prediction = unet(torch.cat([noisy, condition], 1), timesteps).sample
        loss = F.mse_loss(prediction, noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), settings.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ema.step(unet.parameters())

    return unet, step


def our_training_step_factory(settings, images, label_maps, num_classes, frequencies, accelerator):
    """The training step of nnsynth_train_generator, on a state built as train_generator builds it."""
    schedule = make_ablation_schedule(settings.ablation_mode, frequencies, [1], settings.delta_0, settings.max_steps)
    state = training.build_training_state(settings, images, label_maps, num_classes, schedule, accelerator)
    counter = {"step": 0}

    def step():
        # looked up on the module at call time, so a test can see that this is the trainer's function
        training.training_step(state, counter["step"])
        counter["step"] += 1

    return state.unet, step


def training_flops(settings, images, label_maps, num_classes, device) -> int:
    """FLOPs of one forward + backward of the UNet at the training batch size (counted, not estimated)."""
    unet = build_unet(settings, num_classes).to(device)
    batch_images, batch_label_maps = fixed_batch(images, label_maps, settings.batch_size, device)
    model_input = torch.cat([batch_images, one_hot_condition(batch_label_maps, num_classes)], 1)
    timesteps = torch.randint(0, 1000, (len(batch_images),), device=device)
    with FlopCounterMode(display=False) as counter:
        unet(model_input, timesteps).sample.square().mean().backward()
    return counter.get_total_flops()


def largest_batch_within(limit_gib, settings, slices, accelerator, start=16, steps=2):
    """Peak memory of our step per batch size (16, 32, 48, ...) until it exceeds ``limit_gib`` or runs out of
    memory; returns {batch: peak GiB or None (OOM)} and the largest batch within the limit. Without compile."""
    device = accelerator.device
    peaks, largest, batch = {}, None, start
    while batch <= 1024:
        trial = TrainingSettings(**{**settings.__dict__, "batch_size": batch, "compile": False})
        reset_peak_memory(device)
        try:
            unet, step = our_training_step_factory(trial, *slices, accelerator)
            time_steps(step, steps, 1, device)
            peaks[batch] = round(peak_memory_gib(device), 3)
        except torch.OutOfMemoryError:
            peaks[batch] = None
        unet = step = None  # noqa: F841  (drops the model and optimiser before the next, larger batch)
        accelerator.free_memory()
        if peaks[batch] is None or peaks[batch] > limit_gib:
            break
        largest = batch
        batch += 16
    return peaks, largest


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--image-size", type=int)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--dataset", help="an nnU-Net raw dataset folder (default: the small real example)")
    parser.add_argument("--covid-source", default=str(SHARED_COVID),
                        help="the COVID-19 CT slices the default example comes from (default: ../shared/data)")
    parser.add_argument("--precision", choices=("no", "bf16", "fp16"),
                        help="mixed precision of our step (default: bf16 on CUDA, no on CPU)")
    parser.add_argument("--compile", action="store_true", help="torch.compile our step's UNet")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=10, help="timed training steps per loop")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--no-plain", action="store_true", help="time only our step")
    parser.add_argument("--sample-count", type=int, help="slices to sample (default: the batch size; 0 = skip)")
    parser.add_argument("--inference-steps", type=int, default=50)
    parser.add_argument("--max-batch-gib", type=float, help="also find the largest batch of our step within this "
                        "much memory (CUDA)")
    parser.add_argument("--threads", type=int, help="CPU intra-op threads (torch.set_num_threads)")
    parser.add_argument("--peak-tflops", type=float, help="peak TFLOP/s for MFU (default: measured matmul peak)")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    precision = args.precision or ("bf16" if device.type == "cuda" else "no")
    settings = TrainingSettings(preset=args.preset, image_size=args.image_size, batch_size=args.batch_size,
                                compile=args.compile, mixed_precision=precision).resolved()
    accelerator = Accelerator(mixed_precision=precision, cpu=device.type == "cpu")
    if args.peak_tflops:
        peak_tflops, peak_source = args.peak_tflops, "given"
    else:
        peak_tflops = measured_peak_tflops(device, MATMUL_DTYPES[precision])
        peak_source = f"measured: best {MATMUL_DTYPES[precision]} matmul"
    device_name = (torch.cuda.get_device_name(device) if device.type == "cuda"
                   else f"cpu, {torch.get_num_threads()} threads")
    print(f"device {device} ({device_name}), preset {settings.preset}, {settings.image_size}x{settings.image_size}, "
          f"batch {settings.batch_size}, precision {precision}, compile {args.compile}")

    images, label_maps, num_classes, frequencies = load_real_slices(args.dataset, settings.image_size,
                                                                    args.covid_source)
    flops_per_step = training_flops(settings, images, label_maps, num_classes, device)
    loops = {"ours": lambda: our_training_step_factory(settings, images, label_maps, num_classes, frequencies,
                                                       accelerator)}
    if not args.no_plain:
        loops = {"plain fp32": lambda: plain_training_step_factory(settings, images, label_maps, num_classes,
                                                                   device), **loops}
    results = {"device": device_name, "preset": settings.preset, "image_size": settings.image_size,
               "batch_size": settings.batch_size, "precision": precision, "compile": args.compile,
               "flops_per_step": flops_per_step, "peak_tflops": peak_tflops, "peak_source": peak_source,
               "torch": torch.__version__, "training": {}}
    for name, factory in loops.items():
        reset_peak_memory(device)
        unet, step = factory()
        seconds = time_steps(step, args.steps, args.warmup, device)
        results["training"][name] = {"images_per_s": settings.batch_size / seconds, "seconds_per_step": seconds,
                                     "mfu": flops_per_step / seconds / (peak_tflops * 1e12),
                                     "peak_gib": peak_memory_gib(device)}
        results["num_parameters"] = sum(p.numel() for p in unet.parameters())
        unet = step = None  # noqa: F841  (drops the model and optimiser before the next, larger batch)
        accelerator.free_memory()
    print(f"UNet {results['num_parameters'] / 1e6:.2f} M parameters; {flops_per_step / 1e9:.2f} GFLOP per training "
          f"step (forward + backward, FlopCounterMode); peak {peak_tflops:.3g} TFLOP/s ({peak_source})")
    for name, result in results["training"].items():
        print(f"training {name:>10}: {result['images_per_s']:8.2f} images/s  ({1000 * result['seconds_per_step']:.1f} "
              f"ms/step)  MFU {100 * result['mfu']:.2f} %  peak memory {result['peak_gib']:.2f} GiB")
    if "plain fp32" in results["training"]:
        results["speedup"] = (results["training"]["ours"]["images_per_s"]
                              / results["training"]["plain fp32"]["images_per_s"])
        print(f"speed-up ours / plain fp32: {results['speedup']:.2f}x")

    if args.max_batch_gib:
        peaks, largest = largest_batch_within(args.max_batch_gib, settings,
                                              (images, label_maps, num_classes, frequencies), accelerator)
        results["batch_memory_gib"], results["largest_batch_within"] = peaks, {str(args.max_batch_gib): largest}
        print(f"peak memory per batch (GiB): {peaks}; largest batch within {args.max_batch_gib:g} GiB: {largest}")

    count = settings.batch_size if args.sample_count is None else args.sample_count
    if count:
        # sampling with our sample_images (DDIM, autocast on CUDA)
        unet = build_unet(settings, num_classes).to(device)
        config = GeneratorConfig(dataset_name="benchmark", labels={f"class{c}": c for c in range(num_classes)},
                                 window={}, image_size=settings.image_size, preset=settings.preset, fold="all",
                                 training_cases=[], class_frequencies={}, ablation={}, region_classes=None,
                                 unet_config=dict(unet.config), scheduler_config=dict(build_noise_scheduler().config),
                                 training={})
        sample_label_maps = label_maps[np.arange(count) % len(label_maps)]
        sample_images(unet, config, sample_label_maps[:1], [0], num_inference_steps=2, device=device, progress=False)
        reset_peak_memory(device)
        synchronize(device)
        start = time.perf_counter()
        sample_images(unet, config, sample_label_maps, list(range(count)), num_inference_steps=args.inference_steps,
                      batch_size=settings.batch_size, device=device, progress=False)
        synchronize(device)
        seconds = time.perf_counter() - start
        results["sampling"] = {"slices_per_s": count / seconds, "inference_steps": args.inference_steps,
                               "peak_gib": peak_memory_gib(device)}
        print(f"sampling: {count / seconds:.2f} slices/s ({args.inference_steps} DDIM steps, batch "
              f"{settings.batch_size}), peak memory {results['sampling']['peak_gib']:.2f} GiB")
    if args.json:
        write_json_atomic(results, args.json)
    return results


if __name__ == "__main__":
    main()
