"""Collect what the kit's device run wrote to $OUT into docs/results/gpu/<date>-<device>.json (+ PNGs).

    python benchmarks/gpu/collect.py FILES_AT "nvidia-h100-x1" [--date 2026-11-26] [--results docs/results/gpu]

FILES_AT is the folder the device tool copied $OUT into; the device name is the one the tool reported. A stage
stopped half-way keeps its finished steps ("incomplete": true); stages that never started are listed under
"missing"; nothing is invented for them.
"""
import argparse
import datetime
import json
import re
from pathlib import Path

from nnunet_synth.atomic import copy_file_atomic, write_json_atomic

STAGES = ("install", "smoke", "throughput", "evidence")
IMAGES = ("synthetic_preview.png", "fidelity_preview.png")


def collect(files_at, device, date, results_folder) -> Path:
    files_at, results_folder = Path(files_at), Path(results_folder)
    stem = f"{date}-{re.sub(r'[^A-Za-z0-9.-]+', '-', device).strip('-')}"
    record = {"device": device, "date": date, "stages": {}, "missing": [], "images": {}}
    for stage in STAGES:
        path, partial = files_at / f"{stage}.json", files_at / f"{stage}.json.partial"
        if path.is_file():
            record["stages"][stage] = json.loads(path.read_text())
        elif partial.is_file():  # the run was stopped during this stage: keep the steps it finished
            record["stages"][stage] = {**json.loads(partial.read_text()), "incomplete": True}
        else:
            record["missing"].append(stage)
    for image in IMAGES:
        if (files_at / image).is_file():
            target = results_folder / f"{stem}-{image}"
            copy_file_atomic(files_at / image, target)
            record["images"][image] = target.name
    if (files_at / "log.txt").is_file():
        record["log_tail"] = (files_at / "log.txt").read_text().splitlines()[-60:]
    target = results_folder / f"{stem}.json"
    write_json_atomic(record, target)
    return target


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files_at", help="the folder holding the run's $OUT files")
    parser.add_argument("device", help="the device name the tool reported, e.g. nvidia-h100-x1")
    parser.add_argument("--date", default=datetime.date.today().isoformat())
    parser.add_argument("--results", default=str(Path(__file__).resolve().parents[2] / "docs" / "results" / "gpu"))
    args = parser.parse_args(argv)
    target = collect(args.files_at, args.device, args.date, args.results)
    record = json.loads(target.read_text())
    stages = [name + (" (incomplete)" if data.get("incomplete") else "") for name, data in record["stages"].items()]
    print(f"{target}: {', '.join(stages) or 'no stage'}; missing: {', '.join(record['missing']) or 'none'}")


if __name__ == "__main__":
    main()
