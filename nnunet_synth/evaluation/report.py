"""Evaluation outputs (one folder per dataset) and the markdown report that puts them together."""
import csv
import json
import shlex
import sys
from pathlib import Path

from nnunet_synth.atomic import atomic_path, copy_file_atomic, write_json_atomic
from nnunet_synth.writer.synthetic_store import PREVIEW_PREFIX, preview_name

FIDELITY_JSON = "fidelity.json"
FIDELITY_PREVIEW = "fidelity_preview.png"
DOWNSTREAM_CSV = "downstream.csv"
DOWNSTREAM_PNG = "downstream.png"
SUMMARY_MD = "summary.md"
COMMANDS_JSON = "commands.json"
REPORT_NAME = "report.md"


def record_command(output_folder: Path, step: str):
    """Remember the exact command line that made ``step``'s outputs (the report quotes it)."""
    path = Path(output_folder) / COMMANDS_JSON
    commands = json.loads(path.read_text()) if path.is_file() else {}
    commands[step] = " ".join(shlex.quote(part) for part in [Path(sys.argv[0]).name] + sys.argv[1:])
    write_json_atomic(commands, path)


def _markdown_table(header, rows) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def fidelity_section(folder: Path) -> str:
    results = json.loads((folder / FIDELITY_JSON).read_text())
    names = list(results["generators"])
    first = results["generators"][names[0]]
    class_values = sorted(first["class_intensity_w1"], key=int)
    header = ["generator", "ablation", "steps", "slices x seeds", "PSNR", "SSIM", "PSNR region", "SSIM region"]
    header += [f"W1 {results['class_names'][int(v)]}" for v in class_values]
    if "feature_distance" in first:
        header.append("feature distance")
    rows = []
    for name in names:
        s = results["generators"][name]
        row = [name, s["ablation_mode"], s["trained_steps"], f"{s['slices']} x {len(s['seeds'])}",
               f"{s['psnr']:.2f}", f"{s['ssim']:.3f}", f"{s['psnr_region']:.2f}", f"{s['ssim_region']:.3f}"]
        row += [f"{s['class_intensity_w1'][v]:.1f}" for v in class_values]
        if "feature_distance" in s:
            row.append(f"{s['feature_distance']:.3f}")
        rows.append(row)
    text = ["## Fidelity", "", f"Held-out slices of {results['dataset']} generated from their own label maps "
            f"({results['num_inference_steps']} DDIM steps); PSNR/SSIM in model space [-1, 1]; W1 = 1-Wasserstein "
            f"distance of the class's intensities, dataset units.", "", _markdown_table(header, rows)]
    if (folder / FIDELITY_PREVIEW).is_file():
        text += ["", f"![fidelity preview]({FIDELITY_PREVIEW})"]
    return "\n".join(text)


def downstream_section(folder: Path, raw_root: Path = None) -> str:
    with open(folder / DOWNSTREAM_CSV) as handle:
        rows = list(csv.DictReader(handle))
    dice_columns = [key for key in rows[0] if key.startswith("dice_")]
    header = ["setting", "arm", "synthetic per real slice", "batch share", "rare-class oversampling", "repeat",
              "seed"] + [c.replace("dice_", "Dice ") for c in dice_columns]
    table = [[row["setting"], row["label"], row["amount"], row["ratio"], row["rare_oversampling"], row["repeat"],
              row["seed"]] + [row[c] for c in dice_columns] for row in rows]
    trained = ", ".join(dict.fromkeys(f"{row.get('configuration') or '2d'}"
                                      + (f" with plans {row['plans']}" if row.get("plans") else "") for row in rows))
    text = ["## Downstream", "", f"nnU-Net {trained}, same plans, split, budget and test set for every arm of a "
            f"setting; evaluated on {rows[0]['evaluated_on']}."]
    if (folder / SUMMARY_MD).is_file():
        text += ["", "Mean Dice over runs and test cases; sd over the runs' means; 95 % intervals by bootstrap over "
                 "runs and test cases; differences paired by seed and test case.", "",
                 (folder / SUMMARY_MD).read_text().strip()]
    text += ["", "Every run:", "", _markdown_table(header, table), "", f"![downstream]({DOWNSTREAM_PNG})"]
    # each synthetic arm's own preview grid (it lives in the arm's copy of the raw dataset)
    for row in {row["dataset"]: row for row in rows}.values():
        arm_preview = (Path(raw_root) / row["dataset"] / preview_name(row.get("fold", 0))
                       if raw_root is not None else None)
        if arm_preview is not None and arm_preview.is_file():
            name = f"synthetic_preview_{row['setting']}_{row['label']}.png".replace("synthetic_preview_all_",
                                                                                    "synthetic_preview_")
            copy_file_atomic(arm_preview, folder / name)
            text += ["", f"Synthetic cases of arm {row['label']} ({row['setting']}; real target slice with labels | "
                     f"new label map | synthetic | synthetic with labels):", "", f"![{name}]({name})"]
    return "\n".join(text)


def write_report(folder: Path, raw_dataset_folder: Path = None) -> Path:
    """Assemble ``report.md`` from what the evaluation folder holds."""
    folder = Path(folder)
    sections = [f"# nnunet-synth evaluation: {folder.parent.name}"]
    commands = json.loads((folder / COMMANDS_JSON).read_text()) if (folder / COMMANDS_JSON).is_file() else {}
    previews = sorted(Path(raw_dataset_folder).glob(PREVIEW_PREFIX + "_fold*.png")) if raw_dataset_folder else []
    for preview in previews:
        copy_file_atomic(preview, folder / preview.name)
        fold = preview.stem[len(PREVIEW_PREFIX + "_fold"):]
        sections += [f"## Synthetic cases of fold {fold}", "", "Real target slice with labels | new label map | "
                     "synthetic | synthetic with labels.", "", f"![synthetic preview, fold {fold}]({preview.name})"]
    if (folder / FIDELITY_JSON).is_file():
        sections.append(fidelity_section(folder))
    if (folder / DOWNSTREAM_CSV).is_file():
        raw_root = Path(raw_dataset_folder).parent if raw_dataset_folder is not None else None
        sections.append(downstream_section(folder, raw_root))
    if commands:
        sections += ["## Commands", "\n".join(["```", *commands.values(), "```"])]
    if len(sections) == 1:
        sections.append("No evaluation results yet: run nnsynth_evaluate fidelity / downstream first.")
    path = folder / REPORT_NAME
    with atomic_path(path, suffix=".md") as temp_name:
        Path(temp_name).write_text("\n\n".join(sections) + "\n")
    return path
