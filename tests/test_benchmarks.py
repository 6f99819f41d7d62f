"""The benchmark scripts run and print their figures (tiny settings; the figures themselves are not asserted), time
the code users run, and stay off the tests and the command-line layer."""
import ast
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nnunet_synth.dataset import RawDataset
from nnunet_synth.generator import TrainingSettings, training

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_generator_throughput_prints_training_sampling_and_ratio_on_real_slices():
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, str(REPO_ROOT / "benchmarks" / "generator_throughput.py"), "--preset",
                             "tiny", "--image-size", "32", "--batch-size", "2", "--steps", "1", "--warmup", "1",
                             "--inference-steps", "2", "--device", "cpu"],
                            capture_output=True, text=True, env=env, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout
    assert re.search(r"training plain fp32: +[\d.]+ images/s", output), output
    assert re.search(r"training +ours: +[\d.]+ images/s .* MFU [\d.]+ %", output), output
    assert re.search(r"speed-up ours / plain fp32: [\d.]+x", output), output
    assert re.search(r"sampling: [\d.]+ slices/s \(2 DDIM steps", output), output


def load_benchmark(name):
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", REPO_ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_throughput_benchmark_times_the_step_function_the_trainer_runs(example_dataset_folder, tmp_path,
                                                                        monkeypatch):
    calls = []
    original = training.training_step

    def counting_step(state, step):
        calls.append(step)
        return original(state, step)

    monkeypatch.setattr(training, "training_step", counting_step)
    torch.set_num_threads(1)
    settings = TrainingSettings(preset="tiny", image_size=32, batch_size=2, max_steps=2, warmup_steps=1,
                                checkpoint_every=10, preview_every=10, preview_inference_steps=1, preview_count=1)
    training.train_generator(RawDataset(example_dataset_folder), tmp_path / "run", settings, progress=False)
    assert calls == [0, 1]
    calls.clear()
    results = load_benchmark("generator_throughput").main(
        ["--preset", "tiny", "--image-size", "32", "--batch-size", "2", "--steps", "2", "--warmup", "1",
         "--no-plain", "--sample-count", "0", "--device", "cpu", "--peak-tflops", "1", "--max-batch-gib", "0.01",
         "--dataset", str(example_dataset_folder), "--json", str(tmp_path / "throughput.json")])
    # one warm-up and two timed steps, then the same for batch 16 of the memory search (which is over 0.01 GiB),
    # all through the trainer's function
    assert calls == [0, 1, 2, 0, 1, 2]
    assert list(results["batch_memory_gib"]) == [16] and results["largest_batch_within"] == {"0.01": None}
    assert json.loads((tmp_path / "throughput.json").read_text())["training"]["ours"]["images_per_s"] > 0
    assert results["flops_per_step"] > 0


def test_benchmarks_import_neither_tests_nor_the_command_line_layer():
    for path in sorted((REPO_ROOT / "benchmarks").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                continue
            for name in names:
                assert not name.startswith(("tests", "synthetic_fixtures", "nnunet_synth.dataset_tools")), \
                    f"{path.relative_to(REPO_ROOT)} imports {name}"


def test_volume_generation_benchmark_prints_time_and_peak_rss_of_one_whole_volume():
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, str(REPO_ROOT / "benchmarks" / "volume_generation.py"), "--shape", "24",
                             "96", "96"], capture_output=True, text=True, env=env, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert re.search(r"one whole synthetic volume 24x96x96 \(copy-paste, unit volume, \d+ voxels pasted\)",
                     result.stdout), result.stdout
    assert re.search(r"time [\d.]+ s from scratch; .* \(ratio [\d.]+x\)", result.stdout), result.stdout
    assert re.search(r"peak RSS [\d.]+ GiB \(target <= 4 GB\)", result.stdout), result.stdout


@pytest.mark.slow
def test_paste_iteration_benchmark_prints_the_ratio_of_the_paste_trainer_to_the_stock_one(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, str(REPO_ROOT / "benchmarks" / "paste_iteration_time.py"), "--threads",
                             "1", "--blocks", "2", "--block-iterations", "2", "--warmup", "1", "--workdir",
                             str(tmp_path)], capture_output=True, text=True, env=env, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert re.search(r"donor bank \{'2': \d+\} components", result.stdout), result.stdout
    assert re.search(r"LesionPaste / stock: mean [\d.]+, trimmed mean [\d.]+, median [\d.]+ \(target <= 1.10",
                     result.stdout), result.stdout
