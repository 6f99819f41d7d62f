"""The benchmark scripts run and print their figures (tiny settings; the figures themselves are not asserted)."""
import os
import re
import subprocess
import sys
from pathlib import Path

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
