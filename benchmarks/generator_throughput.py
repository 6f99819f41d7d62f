"""Generator throughput: training images/s, sampling slices/s (DDIM), peak memory and model FLOPs utilisation.

Compares our training step (autocast in --precision, channels_last, fused AdamW on CUDA, optional torch.compile,
the same code as nnunet_synth.generator.training) with a plain fp32 diffusers-style loop over the same UNet in the
same run (no autocast, no channels_last, default AdamW, no compile). Inputs are real slices and label maps: the
embedded example (5 patients of the COVID-19 CT slices) converted into a temporary nnU-Net dataset and fitted to
the model size, repeated when the batch is larger than the 37 slices.

    python benchmarks/generator_throughput.py --preset tiny --device cpu --steps 10
    python benchmarks/generator_throughput.py --preset default --precision bf16 --peak-tflops 989   # H100 SXM
"""
import argparse
import contextlib
import resource
import tempfile
import time
from typing import NamedTuple

import numpy as np

import torch
import torch.nn.functional as F
from diffusers.training_utils import EMAModel
from torch.utils.flop_counter import FlopCounterMode

from nnunet_synth.generator.ablation import make_ablation_schedule, one_hot_condition
from nnunet_synth.dataset import RawDataset
from nnunet_synth.dataset.slices import class_pixel_frequencies, dataset_intensity_window
from nnunet_synth.dataset_tools.convert_covid19_ct_slices import convert_covid19_ct_slices
from nnunet_synth.example import example_source_folder
from nnunet_synth.generator.config import GeneratorConfig, TrainingSettings, build_noise_scheduler, build_unet
from nnunet_synth.generator.data import load_model_slices
from nnunet_synth.generator.training import denoising_loss, draw_step_randomness
from nnunet_synth.sampling import sample_images

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
ASSUMED_CUDA_PEAK_TFLOPS = {"fp32": 67.0, "bf16": 989.0, "fp16": 989.0}   # H100 SXM dense (datasheet)


def measured_cpu_peak_tflops(size=2048, repeats=5) -> float:
    """A CPU has no datasheet peak we can rely on: use the best fp32 matmul rate of this process's threads."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * size ** 3 / best / 1e12


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def reset_peak_memory(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()


def peak_memory_gib(device) -> float:
    """CUDA: peak allocated since the last reset. CPU: peak resident set size of the whole process so far."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2 ** 30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


class ExampleSlices(NamedTuple):
    images: torch.Tensor            # (N, 1, S, S) in [-1, 1]
    label_maps: torch.Tensor        # (N, S, S)
    num_classes: int
    class_frequencies: list         # pixel share per class, for the CBMAT schedule


def load_example_slices(image_size) -> ExampleSlices:
    """All slices of the embedded example in model space."""
    with tempfile.TemporaryDirectory() as workdir:
        dataset = RawDataset(convert_covid19_ct_slices(example_source_folder(), workdir, 983, "ThroughputBenchmark"))
        images, label_maps, _ = load_model_slices(dataset, dataset.case_ids, dataset_intensity_window(dataset),
                                                  image_size)
        frequencies = class_pixel_frequencies(dataset).tolist()
    return ExampleSlices(torch.from_numpy(images[:, None]), torch.from_numpy(label_maps), dataset.num_classes,
                         frequencies)


def real_batch(slices: ExampleSlices, batch_size, device):
    """The first ``batch_size`` example slices (cycled) on ``device``."""
    chosen = np.arange(batch_size) % len(slices.images)
    return slices.images[chosen].to(device), slices.label_maps[chosen].to(device)


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


def plain_training_step_factory(settings, slices, device):
    """A plain fp32 diffusers-example loop over the same UNet."""
    num_classes = slices.num_classes
    torch.manual_seed(0)
    unet = build_unet(settings, num_classes).to(device).train()
    optimizer = torch.optim.AdamW(unet.parameters(), lr=settings.learning_rate)
    ema = EMAModel(unet.parameters(), decay=0.9999, use_ema_warmup=True, power=0.75)
    ema.to(device)
    noise_scheduler = build_noise_scheduler()
    images, label_maps = real_batch(slices, settings.batch_size, device)
    condition = one_hot_condition(label_maps, num_classes)

    def step():
        noise = torch.randn_like(images)
        timesteps = torch.randint(0, 1000, (len(images),), device=device)
        noisy = noise_scheduler.add_noise(images, noise, timesteps)
        prediction = unet(torch.cat([noisy, condition], 1), timesteps).sample
        loss = F.mse_loss(prediction, noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), settings.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ema.step(unet.parameters())

    return unet, step


def our_training_step_factory(settings, slices, device, precision, use_compile):
    """Our training step: the functions of nnunet_synth.generator.training plus the GPU speed settings."""
    num_classes = slices.num_classes
    torch.manual_seed(0)
    on_cuda = device.type == "cuda"
    memory_format = torch.channels_last if on_cuda else torch.contiguous_format
    unet = build_unet(settings, num_classes).to(device, memory_format=memory_format).train()
    optimizer = torch.optim.AdamW(unet.parameters(), lr=settings.learning_rate, fused=on_cuda)
    ema = EMAModel(unet.parameters(), decay=0.9999, use_ema_warmup=True, power=0.75, foreach=on_cuda)
    ema.to(device)
    model = torch.compile(unet) if use_compile else unet
    noise_scheduler = build_noise_scheduler()
    schedule = make_ablation_schedule("cbmat", slices.class_frequencies, [1], 0.5, 1000)
    images, label_maps = real_batch(slices, settings.batch_size, device)
    dtype = PRECISIONS[precision]
    autocast = (torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext())
    scaler = torch.amp.GradScaler(device.type, enabled=(precision == "fp16"))
    counter = {"step": 0}

    def step():
        generator = torch.Generator().manual_seed(counter["step"])
        noise, timesteps, ablated = draw_step_randomness(len(images), settings.image_size, counter["step"], schedule,
                                                         0.1, generator)
        with autocast:
            loss = denoising_loss(model, noise_scheduler, images, label_maps, noise.to(device), timesteps.to(device),
                                  ablated, num_classes, memory_format)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(unet.parameters(), settings.max_grad_norm)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        ema.step(unet.parameters())
        counter["step"] += 1

    return unet, step


def training_flops(settings, slices, device) -> int:
    """FLOPs of one forward + backward of the UNet at the training batch size (counted, not estimated)."""
    num_classes = slices.num_classes
    unet = build_unet(settings, num_classes).to(device)
    images, label_maps = real_batch(slices, settings.batch_size, device)
    model_input = torch.cat([images, one_hot_condition(label_maps, num_classes)], 1)
    timesteps = torch.randint(0, 1000, (len(images),), device=device)
    with FlopCounterMode(display=False) as counter:
        unet(model_input, timesteps).sample.square().mean().backward()
    return counter.get_total_flops()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--image-size", type=int)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--precision", choices=sorted(PRECISIONS), default=None,
                        help="autocast precision of our step (default: bf16 on CUDA, fp32 on CPU)")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=10, help="timed training steps per loop")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--sample-count", type=int, help="slices to sample (default: the batch size)")
    parser.add_argument("--inference-steps", type=int, default=50)
    parser.add_argument("--threads", type=int, help="CPU intra-op threads (torch.set_num_threads)")
    parser.add_argument("--peak-tflops", type=float, help="peak TFLOP/s of the device for MFU (default: the H100 "
                        "datasheet on CUDA, a measured matmul rate on CPU)")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    settings = TrainingSettings(preset=args.preset, image_size=args.image_size, batch_size=args.batch_size).resolved()
    if args.peak_tflops:
        peak_tflops, peak_source = args.peak_tflops, "given"
    elif device.type == "cuda":
        peak_tflops, peak_source = ASSUMED_CUDA_PEAK_TFLOPS[precision], "assumed: H100 SXM datasheet"
    else:
        peak_tflops, peak_source = measured_cpu_peak_tflops(), "measured: best fp32 2048x2048 matmul"
    print(f"device {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else f'{torch.get_num_threads()} threads'}), "
          f"preset {settings.preset}, {settings.image_size}x{settings.image_size}, batch {settings.batch_size}, "
          f"precision {precision}, compile {args.compile}")

    slices = load_example_slices(settings.image_size)
    num_classes = slices.num_classes
    flops_per_step = training_flops(settings, slices, device)
    results = {}
    for name, factory in (("plain fp32", lambda: plain_training_step_factory(settings, slices, device)),
                          ("ours", lambda: our_training_step_factory(settings, slices, device, precision,
                                                                     args.compile))):
        reset_peak_memory(device)
        unet, step = factory()
        seconds = time_steps(step, args.steps, args.warmup, device)
        results[name] = {"images_per_s": settings.batch_size / seconds, "seconds_per_step": seconds,
                         "mfu": flops_per_step / seconds / (peak_tflops * 1e12), "peak_gib": peak_memory_gib(device)}
        num_parameters = sum(p.numel() for p in unet.parameters())
        del unet, step
    print(f"UNet {num_parameters / 1e6:.2f} M parameters; {flops_per_step / 1e9:.2f} GFLOP per training step "
          f"(forward + backward, FlopCounterMode); peak {peak_tflops:.3g} TFLOP/s ({peak_source})")
    for name, result in results.items():
        print(f"training {name:>10}: {result['images_per_s']:8.2f} images/s  ({1000 * result['seconds_per_step']:.1f} "
              f"ms/step)  MFU {100 * result['mfu']:.2f} %  peak memory {result['peak_gib']:.2f} GiB")
    print(f"speed-up ours / plain fp32: {results['ours']['images_per_s'] / results['plain fp32']['images_per_s']:.2f}x")

    # sampling with our sample_images (DDIM, autocast on CUDA)
    unet = build_unet(settings, num_classes).to(device)
    config = GeneratorConfig(dataset_name="benchmark", labels={f"class{c}": c for c in range(num_classes)},
                             window={}, image_size=settings.image_size, preset=settings.preset, fold="all",
                             training_cases=[], class_frequencies={}, ablation={}, region_classes=None,
                             unet_config=dict(unet.config), scheduler_config=dict(build_noise_scheduler().config),
                             training={})
    count = args.sample_count or settings.batch_size
    label_maps = real_batch(slices, count, torch.device("cpu"))[1].numpy()
    sample_images(unet, config, label_maps[:1], [0], num_inference_steps=2, device=device, progress=False)  # warm-up
    reset_peak_memory(device)
    synchronize(device)
    start = time.perf_counter()
    sample_images(unet, config, label_maps, list(range(count)), num_inference_steps=args.inference_steps,
                  batch_size=settings.batch_size, device=device, progress=False)
    synchronize(device)
    seconds = time.perf_counter() - start
    print(f"sampling: {count / seconds:.2f} slices/s ({args.inference_steps} DDIM steps, batch {settings.batch_size}), "
          f"peak memory {peak_memory_gib(device):.2f} GiB")


if __name__ == "__main__":
    main()
