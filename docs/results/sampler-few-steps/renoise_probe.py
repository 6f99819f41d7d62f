"""Where the multistep solvers' speckle comes from: the held-out lesions of an inpainting generator's fold erased and
refilled (``inpaint_slices``, as ``compare_samplers.py``) by a copy of the pipeline's sampling loop that can step
DDIM with the noise implied by its clipped estimate (``use_clipped_model_output=True``: what a multistep solver's
update from x_t and the clipped estimate amounts to) and re-noise x_t from the clipped estimate before the step
(the library's ``renoise_x0``). Prints one JSON line per configuration: the region metrics, seconds per slice and,
per step, the share of edit pixels whose clean-image estimate lies outside [-1, 1].

    python renoise_probe.py DATASET GENERATOR MARGIN MAX_SLICES [LABEL ...] >> results.jsonl
"""
import json
import sys
import time

import numpy as np
import torch

from nnunet_synth.dataset import ImageWindows, RawDataset
from nnunet_synth.evaluation.lesion_fidelity import held_out_lesions, region_metrics
from nnunet_synth.generator.checkpoints import load_generator
from nnunet_synth.generator.inpaint_data import edit_region
from nnunet_synth.generator.inpaint_pipeline import (
    SAMPLERS,
    NnsynthInpaintPipeline,
    initial_noise,
    inpainting_condition,
    make_scheduler,
)
from nnunet_synth.sampling.inpaint import inpaint_slices

# label -> (sampler, steps, how x_t meets the clipped estimate, extra scheduler options); every estimate is clipped
CONFIGURATIONS = {
    "ddim 20": ("ddim", 20, "clipped estimate only", {}),
    "ddim 20, clipped noise": ("ddim", 20, "clipped noise", {}),
    "ddim 10": ("ddim", 10, "clipped estimate only", {}),
    "unipc 10, clip": ("unipc", 10, "clipped estimate only", {}),
    "unipc 10, clip, no corrector": ("unipc", 10, "clipped estimate only", {"disable_corrector": list(range(10))}),
    "unipc 10, clip, re-noised": ("unipc", 10, "re-noised", {}),
    "unipc 20, clip, re-noised": ("unipc", 20, "re-noised", {}),
    "unipc 10, clip, order 1, re-noised": ("unipc", 10, "re-noised", {"solver_order": 1}),
    "unipc 10, clip, no corrector, re-noised": ("unipc", 10, "re-noised", {"disable_corrector": list(range(10))}),
    "dpmsolver++ 10, clip, re-noised": ("dpmsolver++", 10, "re-noised", {}),
    "dpmsolver++ 12, clip, re-noised": ("dpmsolver++", 12, "re-noised", {}),
    "dpmsolver++ 15, clip, re-noised": ("dpmsolver++", 15, "re-noised", {}),
    "dpmsolver++ 20, clip, re-noised": ("dpmsolver++", 20, "re-noised", {}),
    "dpmsolver++ 10, clip, re-noised, order 1": ("dpmsolver++", 10, "re-noised", {"solver_order": 1}),
    "dpmsolver++ 10, clip, re-noised, order 3": ("dpmsolver++", 10, "re-noised", {"solver_order": 3}),
    "dpmsolver++ 10, clip, re-noised, trailing": ("dpmsolver++", 10, "re-noised", {"timestep_spacing": "trailing"}),
    "dpmsolver++ 10, clip, re-noised, karras": ("dpmsolver++", 10, "re-noised", {"use_karras_sigmas": True}),
    "dpmsolver++ 10, clip, re-noised, linspace": ("dpmsolver++", 10, "re-noised", {"timestep_spacing": "linspace"}),
    "dpmsolver++ 12, clip, re-noised, trailing": ("dpmsolver++", 12, "re-noised", {"timestep_spacing": "trailing"}),
    "dpmsolver++ 15, clip, re-noised, trailing": ("dpmsolver++", 15, "re-noised", {"timestep_spacing": "trailing"}),
    "dpmsolver++ 8, clip, re-noised, trailing": ("dpmsolver++", 8, "re-noised", {"timestep_spacing": "trailing"}),
    "unipc 10, clip, trailing": ("unipc", 10, "clipped estimate only", {"timestep_spacing": "trailing"}),
    "dpmsolver++ 10, clip, trailing": ("dpmsolver++", 10, "clipped estimate only", {"timestep_spacing": "trailing"}),
    "ddim 20, re-noised": ("ddim", 20, "re-noised", {}),
}


class ProbePipeline(NnsynthInpaintPipeline):
    """``NnsynthInpaintPipeline.__call__``'s loop (CPU, float32) with the step variants of ``CONFIGURATIONS``."""

    variant = "clipped estimate only"

    @torch.no_grad()
    def __call__(self, known_images, edit_masks, label_maps, seeds, num_inference_steps=20, batch_size=16,
                 progress=True, noise=None):
        known_images = np.asarray(known_images, dtype=np.float32)
        edit_masks = np.asarray(edit_masks, dtype=bool)
        outputs = known_images.copy()
        alphas_cumprod = self.scheduler.alphas_cumprod.float()
        for start in range(0, len(label_maps), batch_size):
            stop = min(start + batch_size, len(label_maps))
            known, mask = torch.from_numpy(known_images[start:stop]), torch.from_numpy(edit_masks[start:stop])
            condition = inpainting_condition(known, mask, torch.from_numpy(np.asarray(label_maps[start:stop])),
                                             self.num_classes)
            edit = mask[:, None].float()
            self.scheduler.set_timesteps(num_inference_steps)
            sample = initial_noise(seeds[start:stop], self.image_size, self.num_channels) * \
                self.scheduler.init_noise_sigma
            for number, timestep in enumerate(self.scheduler.timesteps):
                model_input = torch.cat([self.scheduler.scale_model_input(sample, timestep), condition], dim=1)
                noise_prediction = self.unet.eval()(model_input, timestep).sample.float()
                alpha = alphas_cumprod[int(timestep)]
                known_noise = (sample - alpha.sqrt() * known) / (1 - alpha).sqrt()
                noise_prediction = edit * noise_prediction + (1 - edit) * known_noise
                estimate = (sample - (1 - alpha).sqrt() * noise_prediction) / alpha.sqrt()
                inside = edit.expand_as(estimate).bool()
                if inside.any():
                    self.out_of_range.setdefault(number, []).append(float((estimate[inside].abs() > 1).float().mean()))
                if self.variant == "re-noised":
                    sample = alpha.sqrt() * estimate.clamp(-1, 1) + (1 - alpha).sqrt() * noise_prediction
                extra = {"use_clipped_model_output": True} if self.variant == "clipped noise" else {}
                sample = self.scheduler.step(noise_prediction, timestep, sample, **extra).prev_sample
            region = edit_masks[start:stop][:, None].repeat(self.num_channels, axis=1)
            outputs[start:stop][region] = sample.clamp(-1, 1).numpy()[region]
        return outputs


def main():
    dataset_name, generator, margin, max_slices = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    torch.set_num_threads(1)
    dataset = RawDataset.from_name(dataset_name)
    unet, config = load_generator(generator, dataset, "cpu")
    window = ImageWindows.from_dict(config.window)
    base = held_out_lesions(dataset, config, max_slices)
    edits = [edit_region(edit, margin) if margin else edit for edit in base.edits]
    dtypes = [[np.float32] * dataset.num_channels] * len(base.images)
    for label in sys.argv[5:] or list(CONFIGURATIONS):
        sampler, steps, variant, extra = CONFIGURATIONS[label]
        scheduler = make_scheduler(sampler, config.scheduler_config, True)
        if extra:
            scheduler = SAMPLERS[sampler][0].from_config(scheduler.config, **extra)
        pipeline = ProbePipeline(unet, scheduler, renoise_x0=False)
        pipeline.variant, pipeline.out_of_range = variant, {}
        started = time.perf_counter()
        filled = [np.stack(r.channel_images) for r in inpaint_slices(
            pipeline, window, base.images, base.label_maps, edits, list(range(len(base.images))), dtypes, steps,
            dataset.ignore_label)]
        seconds = (time.perf_counter() - started) / len(filled)
        metrics = region_metrics(base.images, filled, edits, window)
        print(json.dumps({"label": label, "margin": margin, "edit_pixels": int(sum(e.sum() for e in edits)),
                          **{k: round(v, 4) for k, v in metrics.items()}, "seconds_per_slice": round(seconds, 2),
                          "estimate_out_of_range": [round(float(np.mean(v)), 3)
                                                    for _, v in sorted(pipeline.out_of_range.items())]}), flush=True)


if __name__ == "__main__":
    main()
