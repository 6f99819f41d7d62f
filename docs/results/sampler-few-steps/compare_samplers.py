"""Lesion-region fidelity and speckle of one inpainting generator's samplers, each with and without the clean-image
estimate clipped to [-1, 1] (and UniPC with trailing timesteps), on the held-out lesions of its fold grown by each
margin asked for (the generator's own edit margin first; a larger one makes the large edits of a balanced map).
The pipeline does not re-noise from the clipped estimate here (``renoise_x0=False``; see ``renoise_probe.py``).

    python compare_samplers.py DATASET GENERATOR --margins 0 8 --max-slices 8 --output DIR

Writes DIR/samplers.json, DIR/samplers.md and DIR/preview_margin<M>.png (zoomed on the edits).
"""
import argparse
import json
import time
from pathlib import Path

import numpy as np

from nnunet_synth.dataset import ImageWindows, RawDataset
from nnunet_synth.evaluation.lesion_fidelity import held_out_lesions, region_metrics
from nnunet_synth.generator.checkpoints import load_generator
from nnunet_synth.generator.inpaint_data import edit_region
from nnunet_synth.generator.inpaint_pipeline import SAMPLERS, NnsynthInpaintPipeline, make_scheduler
from nnunet_synth.preview_grid import save_preview_grid
from nnunet_synth.sampling.inpaint import inpaint_slices

# label -> (sampler, steps, clip x0, extra scheduler options)
CONFIGURATIONS = {
    "ddim 50": ("ddim", 50, True, {}),
    "ddim 50, no clip": ("ddim", 50, False, {"clip_sample": False}),
    "unipc 10, no clip": ("unipc", 10, False, {}),
    "unipc 10, no clip, trailing": ("unipc", 10, False, {"timestep_spacing": "trailing"}),
    "unipc 10, clip": ("unipc", 10, True, {}),
    "unipc 20, clip": ("unipc", 20, True, {}),
    "dpmsolver++ 10, no clip": ("dpmsolver++", 10, False, {}),
    "dpmsolver++ 10, clip": ("dpmsolver++", 10, True, {}),
    "dpmsolver++ 20, clip": ("dpmsolver++", 20, True, {}),
    # which part of the gap to DDIM 50 is the step count and which the solver
    "ddim 10": ("ddim", 10, True, {}),
    "ddim 20": ("ddim", 20, True, {}),
    "unipc 10, clip, order 1": ("unipc", 10, True, {"solver_order": 1}),
    "unipc 50, clip": ("unipc", 50, True, {}),
    "unipc 10, clip, leading": ("unipc", 10, True, {"timestep_spacing": "leading"}),
    "dpmsolver++ 10, clip, leading": ("dpmsolver++", 10, True, {"timestep_spacing": "leading"}),
    "unipc 10, clip, final sigma_min": ("unipc", 10, True, {"final_sigmas_type": "sigma_min"}),
}


def scheduler_for(config, sampler, clip_x0, extra):
    scheduler = make_scheduler(sampler, config.scheduler_config, clip_x0)
    return SAMPLERS[sampler][0].from_config(scheduler.config, **extra) if extra else scheduler


def zoom(image, edit, size=48):
    rows, cols = np.nonzero(edit)
    r0 = int(np.clip((rows.min() + rows.max()) // 2 - size // 2, 0, max(0, edit.shape[0] - size)))
    c0 = int(np.clip((cols.min() + cols.max()) // 2 - size // 2, 0, max(0, edit.shape[1] - size)))
    return image[..., r0:r0 + size, c0:c0 + size]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("dataset")
    parser.add_argument("generator")
    parser.add_argument("--margins", type=int, nargs="+", default=[0])
    parser.add_argument("--max-slices", type=int, default=8)
    parser.add_argument("--configurations", nargs="+", default=list(CONFIGURATIONS))
    parser.add_argument("--output", type=Path, required=True)
    args = parser.parse_args()
    dataset = RawDataset.from_name(args.dataset)
    unet, config = load_generator(args.generator, dataset, "cpu")
    window = ImageWindows.from_dict(config.window)
    base = held_out_lesions(dataset, config, args.max_slices)
    dtypes = [[np.float32] * dataset.num_channels] * len(base.images)
    seeds = list(range(len(base.images)))
    args.output.mkdir(parents=True, exist_ok=True)
    results_file = args.output / "samplers.json"
    results = json.loads(results_file.read_text()) if results_file.is_file() else {}
    for margin in args.margins:
        edits = [edit_region(edit, margin) if margin else edit for edit in base.edits]
        previews = {}
        for label in args.configurations:
            sampler, steps, clip_x0, extra = CONFIGURATIONS[label]
            pipeline = NnsynthInpaintPipeline(unet, scheduler_for(config, sampler, clip_x0, extra),
                                              renoise_x0=False)      # the solvers' own clipping only
            started = time.perf_counter()
            filled = [np.stack(r.channel_images) for r in inpaint_slices(
                pipeline, window, base.images, base.label_maps, edits, seeds, dtypes, steps, dataset.ignore_label)]
            seconds = (time.perf_counter() - started) / len(filled)
            metrics = region_metrics(base.images, filled, edits, window)
            results[f"{label} | margin +{margin}"] = {**metrics, "seconds_per_slice": seconds,
                                                      "edit_pixels": int(sum(e.sum() for e in edits))}
            print(label, f"margin +{margin}", {k: round(v, 4) for k, v in metrics.items()}, f"{seconds:.2f} s/slice",
                  flush=True)
            previews[label] = filled
            results_file.write_text(json.dumps(results, indent=1))
        shown = range(min(4, len(base.images)))
        rows = []
        for i in shown:
            row = [(zoom(window.to_model(base.images[i]), edits[i])[:1], zoom(edits[i], edits[i]).astype(int))]
            row += [(zoom(window.to_model(previews[label][i]), edits[i])[:1], None) for label in previews]
            rows.append(row)
        save_preview_grid(rows, ["real + edit"] + list(previews), args.output / f"preview_margin{margin}.png",
                          2, window=(-1, 1),
                          title=f"{dataset.name}: held-out lesions, edit +{margin} px, first channel")
    lines = ["| sampler | edit | PSNR (dB) | SSIM | W1 | speckle % (real) | s / slice |",
             "|---|---|---|---|---|---|---|"]
    for key, m in results.items():
        label, margin = key.split(" | ")
        lines.append(f"| {label} | {margin} ({m['edit_pixels']} px) | {m['psnr']:.2f} | {m['ssim']:.3f} | "
                     f"{m['w1']:.2f} | {100 * m['speckle']:.2f} ({100 * m['real_speckle']:.2f}) | "
                     f"{m['seconds_per_slice']:.2f} |")
    (args.output / "samplers.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
