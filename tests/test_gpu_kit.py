"""The GPU kit rehearsed on CPU (benchmarks/gpu/rehearse.sh): every stage of run.sh writes its results with sane
content, and collect.py turns them into a results file. Nothing is downloaded (pack.sh --data-only)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SOURCE = REPO_ROOT.parent / "shared" / "data" / "covid19_ct_slices"
pytestmark = pytest.mark.slow    # every stage of the kit, with stock nnU-Net training


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_kit") / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "KIT_PYTHON": sys.executable}
    result = subprocess.run([str(REPO_ROOT / "benchmarks" / "gpu" / "rehearse.sh"), str(out), "--source", str(SOURCE)],
                            capture_output=True, text=True, env=env, timeout=1800)
    log = (out / "log.txt").read_text() if (out / "log.txt").is_file() else ""
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:] + log[-4000:]
    return out


def read(out, name):
    return json.loads((out / name).read_text())


def assert_dice(dice):
    assert {"lung", "lesion", "foreground_mean"} <= set(dice), dice
    assert all(0.0 <= value <= 1.0 for value in dice.values()), dice


def test_install_stage_reports_versions_and_imports(rehearsal):
    install = read(rehearsal, "install.json")
    assert install["import_failures"] == {} and install["versions"]["nnunetv2"] and install["versions"]["torch"]
    assert install["seconds"] >= 0 and install["cuda"] in (True, False)


def test_smoke_stage_trains_samples_and_runs_nnunet(rehearsal):
    smoke = read(rehearsal, "smoke.json")
    assert smoke["generator_training"]["seconds"] >= 0
    sampling = smoke["sampling"]
    assert sampling["slices"] == 4 and sampling["rerun_identical"], sampling
    # the same seed gives the same image whatever the batch, up to the summation order of the kernels
    assert 0.0 <= sampling["max_abs_difference_batch4_vs_batch1"] <= 1e-3 and sampling["same_within_1e-3"]
    assert_dice(smoke["nnunet_debug"]["dice"])
    assert smoke["nnunet_debug"]["synthmix"]


def test_throughput_stage_times_both_loops_for_both_presets(rehearsal):
    throughput = read(rehearsal, "throughput.json")
    for preset in ("tiny", "default"):
        figures = throughput[preset]
        assert figures["preset"] == preset and figures["flops_per_step"] > 0 and figures["speedup"] > 0
        for loop in ("plain fp32", "ours"):
            assert figures["training"][loop]["images_per_s"] > 0 and 0 < figures["training"][loop]["mfu"]
    assert throughput["tiny"]["sampling"]["slices_per_s"] > 0


def test_evidence_stage_trains_the_inpainting_generator_and_compares_real_only_and_synthmix_on_fold_0(rehearsal):
    evidence = read(rehearsal, "evidence.json")
    assert evidence["generator"]["steps"] >= 2 and "--mode inpaint" in evidence["generator"]["args"]
    assert evidence["generation"]["cases"] == 8 and 0 <= evidence["generation"]["model_free_passed"] <= 8
    for trainer in ("nnUNetTrainerKit_r0", "nnUNetTrainerKit_r50"):
        assert_dice(evidence[trainer]["dice"])
    assert evidence["nnUNetTrainerKit_r0"]["synthmix"]["settings"]["ratio"] == 0.0
    assert evidence["nnUNetTrainerKit_r50"]["synthmix"]["settings"]["ratio"] == 0.5
    rows = {(row["source"], row["sampler"]): row for row in evidence["fidelity"]["rows"]}
    assert set(rows) == {("inpaint", "unipc"), ("copy-paste", None)}
    assert all(row["psnr"] > 0 and -1.0 <= row["ssim"] <= 1.0 and row["w1"] >= 0 for row in rows.values())
    for image in ("synthetic_preview.png", "fidelity_preview.png"):
        assert (rehearsal / image).stat().st_size > 1000


def test_collect_writes_one_results_file_with_the_finished_stages(rehearsal, tmp_path):
    (tmp_path / "files").mkdir()
    for path in rehearsal.iterdir():
        if path.name != "evidence.json":  # as if the run had stopped before the evidence stage ...
            (tmp_path / "files" / path.name).write_bytes(path.read_bytes())
    # ... and during the throughput stage, after the tiny preset
    tiny = {"tiny": json.loads((rehearsal / "throughput.json").read_text())["tiny"]}
    (tmp_path / "files" / "throughput.json").unlink()
    (tmp_path / "files" / "throughput.json.partial").write_text(json.dumps(tiny))
    result = subprocess.run([sys.executable, str(REPO_ROOT / "benchmarks" / "gpu" / "collect.py"),
                             str(tmp_path / "files"), "cpu rehearsal", "--date", "2026-01-01", "--results",
                             str(tmp_path / "results")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    record = json.loads((tmp_path / "results" / "2026-01-01-cpu-rehearsal.json").read_text())
    assert sorted(record["stages"]) == ["install", "smoke", "throughput"] and record["missing"] == ["evidence"]
    assert record["stages"]["throughput"]["incomplete"] and "default" not in record["stages"]["throughput"]
    assert "incomplete" not in record["stages"]["smoke"]
    assert (tmp_path / "results" / "2026-01-01-cpu-rehearsal-synthetic_preview.png").is_file()
