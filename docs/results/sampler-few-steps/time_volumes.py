"""One balanced MS volume per sampler, all in one process (the same machine load for each): each through the generate
step (maps, sampling, model-free gate, store) into its own copy of the dataset, timed (wall clock and CPU time of
the process, one thread), with the speckle of its edit region beside the real target's on the same voxels.

    python time_volumes.py GENERATOR DATASET:SAMPLER:STEPS[:SPACING] [...] --map-cap 0.04 --table FILE

A sampler given as ``-`` takes the volumes' default (``sampling_defaults``); SPACING replaces the re-noised
solver's timestep spacing (``inpaint_pipeline.RENOISE_OPTIONS``) for that run (an experiment: not recorded in the
store); DATASET is a copy of the real dataset with its splits, so every store gets the same label map.
"""
import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from volume_samplers import volume_speckle  # the script's folder (sys.path[0])

from nnunet_synth.dataset import ImageWindows, RawDataset
from nnunet_synth.generator import inpaint_pipeline
from nnunet_synth.generator.checkpoints import read_generator_config, resolve_generator_folder
from nnunet_synth.image_sources import generate_synthetic_cases
from nnunet_synth.image_sources.generators import GenerationSettings
from nnunet_synth.image_sources.inpaint import inpaint_sampling
from nnunet_synth.masks.settings import BalancingSettings
from nnunet_synth.writer.synthetic_store import SyntheticStore


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("generator")
    parser.add_argument("runs", nargs="+", help="DATASET:SAMPLER:STEPS")
    parser.add_argument("--map-cap", type=float, default=0.04)
    parser.add_argument("--table", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    window = ImageWindows.from_dict(read_generator_config(resolve_generator_folder(args.generator)).window)
    rows = []
    built = dict(inpaint_pipeline.RENOISE_OPTIONS)
    for run in args.runs:
        name, sampler, steps, *spacing = run.split(":")
        inpaint_pipeline.RENOISE_OPTIONS = {**built, "timestep_spacing": spacing[0]} if spacing else built
        dataset = RawDataset.from_name(name)
        sampling = inpaint_sampling(SyntheticStore(dataset), "0", "volume", None if sampler == "-" else sampler,
                                    None if steps == "-" else int(steps))
        settings = GenerationSettings(num_cases=1, seed=0, unit="volume", **sampling,
                                      balancing=BalancingSettings(map_class_share_cap=args.map_cap))
        wall, cpu = time.perf_counter(), time.process_time()
        generate_synthetic_cases(dataset, args.generator, settings, fold="0", device="cpu")
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        store = SyntheticStore(dataset)
        case_id = store.complete_case_ids("0")[0]
        entry = store.cases[case_id]
        image = np.stack(dataset.reader_writer().read_images([str(p) for p in store.image_files(case_id)])[0])
        real, _, _ = dataset.read_case(entry["source"]["target"]["case_id"])
        edit = (image != real).any(axis=0)
        model_free = entry["quality"]["model_free"]
        row = {"dataset": dataset.name, "sampler": sampling["sampler"], "steps": sampling["num_inference_steps"],
               "spacing": spacing[0] if spacing else None,
               "renoise_x0": entry["sampler"]["renoise_x0"], "wall_s": round(wall, 1), "cpu_s": round(cpu, 1),
               "edit_voxels": int(edit.sum()), "speckle": volume_speckle(image, edit, window),
               "real_speckle": volume_speckle(real, edit, window), "gate_passed": bool(model_free["passed"]),
               "gate_score": model_free.get("score")}
        print(json.dumps(row), flush=True)
        rows.append(row)
    lines = ["| sampler | wall clock (s) | CPU time (s, one thread) | edit voxels | speckle % (real target) | "
             "model-free gate (score) |", "|---|---|---|---|---|---|"]
    for row in rows:
        score = "" if row["gate_score"] is None else f" ({row['gate_score']:.3f})"
        spacing = f", {row['spacing']}" if row["spacing"] else ""
        lines.append(f"| {row['sampler']} {row['steps']}{', re-noised' if row['renoise_x0'] else ''}{spacing} | "
                     f"{row['wall_s']:.0f} | {row['cpu_s']:.0f} | {row['edit_voxels']} | "
                     f"{100 * row['speckle']:.2f} ({100 * row['real_speckle']:.2f}) | "
                     f"{'passed' if row['gate_passed'] else 'failed'}{score} |")
    args.table.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
