"""Paired differences between any two downstream arms on hand-made Dice runs (known differences, pairing by repeat
and test case, missing repeats, the tables written), the inpaint arm's planning and generator (a generator of the
wrong mode is refused, its training patients are checked), and the model-free gate pass rate read from a real
synthetic store of the small real example."""
import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import run_entry_point
from scipy import ndimage

from nnunet_synth.dataset import RawDataset
from nnunet_synth.errors import NnsynthError
from nnunet_synth.evaluation.statistics import (
    bootstrap_interval,
    compare_arms,
    default_pairs,
    paired_difference,
    summarize_runs,
)

BIN = Path(sys.executable).parent
CASES = ("case_a", "case_b", "case_c", "case_d")


def make_runs(arm, dice, amount=0.5, setting="real4", cases=CASES, class_name="lesion"):
    """One run per row of ``dice`` [repeat, case] (repeat = row index unless ``dice`` is a {repeat: row} dict)."""
    rows = dice.items() if isinstance(dice, dict) else enumerate(dice)
    label = arm if arm in ("real_only", "oversample", "copy_paste_online") else f"{arm}_x{amount:g}"
    runs = []
    for repeat, values in rows:
        per_case = {case: {class_name: None if value is None else float(value)} for case, value in zip(cases, values)}
        present = [value for value in values if value is not None]
        runs.append({"setting": setting, "arm": arm, "label": label, "amount": 0.0 if label == arm else amount,
                     "repeat": repeat, "seed": repeat, "cases": per_case,
                     "mean": {class_name: float(np.mean(present)) if present else float("nan")}})
    return runs


def rng():
    return np.random.default_rng(0)


BASE = np.array([[0.20, 0.40, 0.60, 0.30], [0.25, 0.35, 0.55, 0.10], [0.10, 0.45, 0.70, 0.20]])


def test_a_constant_difference_is_found_exactly_and_read_from_its_interval():
    higher, lower = make_runs("inpaint", BASE + 0.1), make_runs("copy_paste", BASE)
    difference = paired_difference(higher, lower, "lesion", rng())
    assert difference["runs"] == 3 and difference["cases"] == 4
    assert difference["diff"] == pytest.approx(0.1)
    assert (difference["diff_low"], difference["diff_high"]) == pytest.approx((0.1, 0.1))
    rows = compare_arms(higher + lower, [], [("inpaint", "copy_paste"), ("copy_paste", "inpaint")])
    assert [(row["arm"], row["other"], row["reading"]) for row in rows] == [
        ("inpaint_x0.5", "copy_paste_x0.5", "higher"), ("copy_paste_x0.5", "inpaint_x0.5", "lower")]


def test_a_difference_that_changes_sign_is_not_different_and_reversing_negates_it_exactly():
    noise = np.array([[0.05, -0.04, 0.03, -0.06], [-0.05, 0.06, -0.02, 0.04], [0.02, -0.03, 0.05, -0.05]])
    arm, other = make_runs("cbmat", BASE + noise), make_runs("copy_paste", BASE)
    forward, backward = compare_arms(arm + other, [], [("cbmat", "copy_paste"), ("copy_paste", "cbmat")])
    assert forward["diff_low"] < 0 < forward["diff_high"] and forward["reading"] == "not different"
    assert forward["diff"] == pytest.approx(noise.mean())
    assert (backward["diff"], backward["diff_low"], backward["diff_high"]) == pytest.approx(
        (-forward["diff"], -forward["diff_high"], -forward["diff_low"]))
    # the interval is a bootstrap of the paired matrix: within its extreme entries, around its mean
    assert noise.min() <= forward["diff_low"] <= forward["diff"] <= forward["diff_high"] <= noise.max()
    # and a clear but noisy gain is read as higher
    gain = compare_arms(make_runs("cbmat", BASE + noise + 0.2) + other, [], [("cbmat", "copy_paste")])[0]
    assert gain["diff_low"] > 0 and gain["reading"] == "higher"


def test_runs_pair_by_repeat_and_cases_by_name_not_by_order():
    """Each repeat shifts both arms by its own offset (the seed's effect) and each case has its own level: paired
    by repeat and case the difference is exactly 0.05 everywhere, so its interval has no width."""
    offsets = np.array([[0.0], [0.3], [-0.2]])
    arm = make_runs("inpaint", BASE + offsets + 0.05)
    other = make_runs("copy_paste", BASE + offsets)
    shuffled = [other[2], other[0], other[1]]                  # files read in another order
    for run in shuffled:                                      # cases stored in another order
        run["cases"] = dict(reversed(list(run["cases"].items())))
    difference = paired_difference(arm, shuffled, "lesion", rng())
    assert (difference["diff"], difference["diff_low"], difference["diff_high"]) == pytest.approx((0.05,) * 3)
    # unpaired (run r with another seed's run), the same values give a spread interval
    matrix_arm, matrix_other = BASE + offsets + 0.05, (BASE + offsets)[[2, 0, 1]]
    low, high = bootstrap_interval(matrix_arm - matrix_other, rng())
    assert high - low > 0.1


def test_only_shared_repeats_and_cases_are_paired():
    arm = make_runs("inpaint", {0: BASE[0] + 0.1, 1: BASE[1] + 0.9, 2: BASE[2] + 0.1})   # repeat 1: an outlier
    other = make_runs("copy_paste", {0: BASE[0], 2: BASE[2], 3: BASE[1]})                 # repeat 1 missing
    difference = paired_difference(arm, other, "lesion", rng())
    assert difference["runs"] == 2 and difference["diff"] == pytest.approx(0.1)
    # a case missing from one arm is left out; a case without the class (None) is NaN and left out of the mean
    fewer = make_runs("copy_paste", BASE[:, :3], cases=CASES[:3])
    with_none = make_runs("inpaint", [[0.3, None, 0.7, 0.4]] * 3)
    difference = paired_difference(with_none, fewer, "lesion", rng())
    assert difference["cases"] == 3
    assert difference["diff"] == pytest.approx(np.nanmean(np.array([[0.3, np.nan, 0.7]] * 3) - BASE[:, :3]))
    nothing = paired_difference(arm, make_runs("copy_paste", {5: BASE[0]}), "lesion", rng())
    assert nothing["runs"] == 0 and np.isnan(nothing["diff"])


def test_default_pairs_compare_synthetic_arms_with_copy_paste_and_every_arm_with_real_only():
    runs = (make_runs("real_only", BASE) + make_runs("copy_paste", BASE + 0.1) + make_runs("cbmat", BASE + 0.2)
            + make_runs("inpaint", BASE + 0.3) + make_runs("oversample", BASE))
    assert default_pairs(runs) == [("cbmat", "copy_paste"), ("inpaint", "copy_paste"), ("oversample", "real_only"),
                                   ("copy_paste", "real_only"), ("cbmat", "real_only"), ("inpaint", "real_only")]
    assert default_pairs(make_runs("real_only", BASE) + make_runs("cbmat", BASE)) == [("cbmat", "real_only")]
    summary = summarize_runs(runs)
    rows = compare_arms(runs, summary)
    assert [(row["arm"], row["other"]) for row in rows][:2] == [("cbmat_x0.5", "copy_paste_x0.5"),
                                                                ("inpaint_x0.5", "copy_paste_x0.5")]
    # a difference to real only is the summary's own figure, either way round
    by_label = {row["label"]: row for row in summary}
    for row in rows:
        if row["other"] == "real_only":
            expected = by_label[row["arm"]]
            assert (row["diff"], row["diff_low"], row["diff_high"]) == (
                expected["diff"], expected["diff_low"], expected["diff_high"])
    reverse = compare_arms(runs, summary, [("real_only", "inpaint")])[0]
    assert (reverse["diff"], reverse["diff_low"]) == (-by_label["inpaint_x0.5"]["diff"],
                                                      -by_label["inpaint_x0.5"]["diff_high"])
    assert reverse["reading"] == "lower"


def test_arm_names_pair_labels_of_the_same_amount_and_labels_pair_as_named():
    runs = []
    for amount in (0.5, 1.0):
        runs += make_runs("inpaint", BASE + amount, amount) + make_runs("copy_paste", BASE, amount)
    named = compare_arms(runs, [], [("inpaint", "copy_paste")])
    assert [(row["arm"], row["other"]) for row in named] == [("inpaint_x0.5", "copy_paste_x0.5"),
                                                             ("inpaint_x1", "copy_paste_x1")]
    crossed = compare_arms(runs, [], [("inpaint_x1", "copy_paste_x0.5")])
    assert [(row["arm"], row["other"], round(row["diff"], 6)) for row in crossed] == [
        ("inpaint_x1", "copy_paste_x0.5", 1.0)]
    # settings are compared within themselves only
    other_setting = make_runs("copy_paste", BASE, setting="real8")
    assert not compare_arms(make_runs("inpaint", BASE) + other_setting, [], [("inpaint", "copy_paste")])


def write_runs(folder, runs):
    for run in runs:
        path = folder / "runs" / run["setting"] / run["label"] / f"repeat{run['repeat']}" / "dice.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({**run, "ratio": 0.0, "rare_oversampling": 0.0, "dataset": "Dataset000_X",
                                    "fold": 0, "evaluated_on": "test set"}))


def test_the_outputs_hold_the_differences_table_and_the_pass_rates(tmp_path):
    from nnunet_synth.evaluation.downstream import GATE_FILE, write_outputs
    runs = make_runs("real_only", BASE) + make_runs("copy_paste", BASE + 0.1) + make_runs("inpaint", BASE + 0.3)
    write_runs(tmp_path, runs)
    (tmp_path / "runs" / "real4" / "inpaint_x0.5" / GATE_FILE).write_text(json.dumps(
        {"setting": "real4", "arm": "inpaint", "label": "inpaint_x0.5", "model_free": {"cases": 20, "scored": 20,
                                                                                     "passed": 17}}))
    write_outputs(tmp_path, [("inpaint", "copy_paste")])
    with open(tmp_path / "differences.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [(row["arm"], row["other"], row["reading"]) for row in rows] == [("inpaint_x0.5", "copy_paste_x0.5",
                                                                             "higher")]
    assert float(rows[0]["diff"]) == pytest.approx(0.2) and int(rows[0]["runs"]) == 3
    summary = (tmp_path / "summary.md").read_text()
    assert "| real4 | inpaint_x0.5 | copy_paste_x0.5 | lesion | 3 x 4 | +0.200 [+0.200, +0.200] | higher |" in summary
    assert "| real4 | inpaint_x0.5 | 20 | 20 | 17 | 85.0% |" in summary
    assert summary.index("difference to real only") < summary.index("### Paired differences")


def test_the_report_names_the_configuration_and_plans_the_arms_trained(tmp_path):
    """downstream.csv and report.md say which configuration and plans (e.g. the ResEnc preset's CPU copy) trained."""
    from nnunet_synth.evaluation.downstream import write_outputs
    from nnunet_synth.evaluation.report import write_report
    runs = [dict(run, configuration="3d_fullres", plans="nnUNetResEncUNetMPlans_cpu")
            for run in make_runs("real_only", BASE) + make_runs("copy_paste", BASE + 0.1)]
    write_runs(tmp_path, runs)
    rows = write_outputs(tmp_path)
    assert {(row["configuration"], row["plans"]) for row in rows} == {("3d_fullres", "nnUNetResEncUNetMPlans_cpu")}
    report = write_report(tmp_path).read_text()
    assert "nnU-Net 3d_fullres with plans nnUNetResEncUNetMPlans_cpu, same plans" in report


@pytest.fixture(scope="module")
def example(nnunet_folders):
    from conftest import convert_example_subset
    return RawDataset(convert_example_subset(nnunet_folders["nnUNet_raw"], 968, "ArmExample"))


def tiny_generator(dataset, folder, mode, case_ids=None):
    from nnunet_synth.generator import TrainingSettings
    from nnunet_synth.generator.training import train_generator
    extra = dict(block_out_channels=(16, 32, 32, 32), preview_count=2) if mode == "inpaint" else {}
    settings = TrainingSettings(preset="tiny", mode=mode, image_size=32, batch_size=2, max_steps=1, warmup_steps=0,
                                checkpoint_every=100, preview_every=100, preview_inference_steps=1, **extra)
    train_generator(dataset, folder, settings, fold=0, case_ids=case_ids, progress=False)
    return folder


@pytest.fixture(scope="module")
def slice_and_inpaint_generators(example, tmp_path_factory):
    root = tmp_path_factory.mktemp("arm_generators")
    return tiny_generator(example, root / "slice", "slice"), tiny_generator(example, root / "inpaint", "inpaint")


def test_the_inpaint_arm_is_planned_and_takes_an_inpainting_generator_only(slice_and_inpaint_generators):
    from nnunet_synth.evaluation.downstream import DownstreamSettings, plan_arms
    slice_generator, inpaint_generator = slice_and_inpaint_generators
    arms = plan_arms(DownstreamSettings(generators={}, arms=["real_only", "copy_paste", "inpaint"], amounts=[0.5]))
    assert [(arm.label, arm.synthetic, arm.generator, arm.ratio) for arm in arms] == [
        ("real_only", False, None, 0.0), ("copy_paste_x0.5", True, None, pytest.approx(1 / 3)),
        ("inpaint_x0.5", True, None, pytest.approx(1 / 3))]
    given = plan_arms(DownstreamSettings(generators={"inpaint": inpaint_generator}, arms=["inpaint"]))
    assert given[0].generator == Path(inpaint_generator)
    with pytest.raises(NnsynthError, match="arm 'inpaint' needs a inpaint generator, this one is a slice"):
        plan_arms(DownstreamSettings(generators={"inpaint": slice_generator}))
    with pytest.raises(NnsynthError, match="arm 'cbmat' needs a slice generator, this one is a inpaint"):
        plan_arms(DownstreamSettings(generators={"cbmat": inpaint_generator}))
    # any other name takes either kind
    assert plan_arms(DownstreamSettings(generators={"lesions": inpaint_generator}))[1].label == "lesions_x1"


def test_a_slice_generator_as_inpaint_is_refused_in_one_line_before_anything_is_copied(
        example, slice_and_inpaint_generators, nnunet_folders, tmp_path, capsys):
    from nnunet_synth.dataset_tools.evaluate import main
    slice_generator, _ = slice_and_inpaint_generators
    code, _, error = run_entry_point(main, ["downstream", example.folder, "-o", tmp_path, "--generator",
                                            f"inpaint={slice_generator}", "--arms", "real_only", "inpaint",
                                            "--first-id", "764", "--device", "cpu"], capsys)
    assert code == 2 and error.count("\n") == 1
    assert error.startswith("nnsynth: error: ") and "needs a inpaint generator" in error
    assert not list(nnunet_folders["nnUNet_raw"].glob("Dataset764_*"))


def test_a_compared_arm_must_be_an_arm_of_the_run():
    from nnunet_synth.evaluation.downstream import DownstreamSettings, check_compared_arms
    settings = DownstreamSettings(generators={}, arms=["real_only", "copy_paste", "inpaint"], amounts=[0.5])
    check_compared_arms(DownstreamSettings(**{**vars(settings), "compare": [("inpaint_x0.5", "copy_paste")]}))
    with pytest.raises(NnsynthError, match="--compare inpaint:cbmat: 'cbmat' is not an arm of this run"):
        check_compared_arms(DownstreamSettings(**{**vars(settings), "compare": [("inpaint", "cbmat")]}))


def test_an_inpainting_generator_that_saw_a_test_patient_is_refused(example, slice_and_inpaint_generators):
    from nnunet_synth.evaluation.downstream import DownstreamSettings, check_generators_for_patients
    from nnunet_synth.evaluation.patients import split_patients
    _, inpaint_generator = slice_and_inpaint_generators      # trained on fold 0's training cases
    split = split_patients(example.case_ids, 1, 3, seed=0)
    settings = DownstreamSettings(generators={"inpaint": inpaint_generator}, arms=["inpaint"])
    trained_on = set(json.loads((inpaint_generator / "final" / "generator_config.json").read_text())["training_cases"])
    assert trained_on - set(split.training)
    with pytest.raises(NnsynthError, match="which this setting keeps out of training"):
        check_generators_for_patients(settings, split)


def test_the_inpaint_arm_trains_a_cbmat_inpainting_generator_on_the_training_patients_only(example, tmp_path):
    from nnunet_synth.evaluation.arm_generators import ArmGeneratorSettings, train_arm_generator
    from nnunet_synth.generator.checkpoints import read_generator_config
    training = example.case_ids[:3]
    settings = ArmGeneratorSettings(steps=50, inpaint_steps=1, inpaint_batch_size=2)
    final = train_arm_generator(example, tmp_path / "inpaint", training, "inpaint", settings)
    config = read_generator_config(final)
    assert config.mode == "inpaint" and config.ablation["mode"] == "cbmat" and config.preset == "tiny"
    assert sorted(config.training_cases) == sorted(training) and config.trained_steps == 1
    assert config.training["batch_size"] == 2


def test_the_pass_rate_is_read_from_the_arms_store(example, tmp_path):
    """Copy-paste cases written into a copy of the example: the counts are those of the manifest's records."""
    import shutil

    from nnunet_synth.evaluation.downstream import Arm, DownstreamSettings, model_free_pass_rate, write_pass_rate
    from nnunet_synth.image_sources import CopyPasteSettings, generate_copy_paste_cases
    folder = example.folder.parent / "Dataset969_ArmExampleCopy"
    shutil.copytree(example.folder, folder)
    copy = RawDataset(folder)
    assert model_free_pass_rate(copy, 0) == {"cases": 0, "scored": 0, "passed": 0}
    generate_copy_paste_cases(copy, CopyPasteSettings(num_cases=6, seed=0), fold=0)
    manifest = json.loads((folder / "synthetic.json").read_text())
    verdicts = [entry["quality"]["model_free"]["passed"] for entry in manifest["cases"].values()]
    assert len(verdicts) == 6
    assert model_free_pass_rate(copy, 0) == {"cases": 6, "scored": 6, "passed": sum(verdicts)}
    write_pass_rate(Arm("copy_paste", None, 0.5), copy, DownstreamSettings(generators={}), "real3", tmp_path)
    record = json.loads((tmp_path / "model_free_gate.json").read_text())
    assert record["label"] == "copy_paste_x0.5" and record["model_free"]["passed"] == sum(verdicts)


def test_the_inpaint_arms_cases_are_made_as_the_inpaint_source_makes_them(example, slice_and_inpaint_generators):
    """A copy of the example (the arm's dataset): amount x the generator's training slices, UniPC at
    --inpaint-inference-steps, the sampler in the fold's recipe, every real pixel outside the edit kept."""
    import shutil

    from nnunet_synth.dataset.native_slices import open_native_slices
    from nnunet_synth.evaluation.downstream import Arm, DownstreamSettings, make_synthetic_cases, model_free_pass_rate
    from nnunet_synth.generator.checkpoints import read_generator_config
    _, inpaint_generator = slice_and_inpaint_generators
    folder = example.folder.parent / "Dataset967_ArmExampleInpaint"
    shutil.copytree(example.folder, folder)
    arm_dataset = RawDataset(folder)
    settings = DownstreamSettings(generators={}, inpaint_inference_steps=2, inference_steps=50)
    summary = make_synthetic_cases(Arm("inpaint", inpaint_generator, 0.1), arm_dataset, settings, inpaint_generator)
    training = read_generator_config(inpaint_generator / "final").training_cases
    expected = max(1, round(0.1 * len(open_native_slices(arm_dataset, training, progress=False))))
    assert summary["total"] == expected
    manifest = json.loads((folder / "synthetic.json").read_text())
    assert manifest["folds"]["0"]["settings"]["sampler"] == "unipc"
    assert manifest["folds"]["0"]["settings"]["num_inference_steps"] == 2
    for entry in manifest["cases"].values():
        assert entry["image_source"] == "inpaint" and entry["sampler"]["num_inference_steps"] == 2
        target = entry["source"]["target"]
        real = sitk.GetArrayFromImage(sitk.ReadImage(str(arm_dataset.cases[target["case_id"]]["images"][0])))
        image = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / entry["image"])))[0]
        label = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / entry["label"])))[0]
        real_label = sitk.GetArrayFromImage(sitk.ReadImage(str(arm_dataset.cases[target["case_id"]]["label"])))
        outside = ~ndimage.binary_dilation(label != real_label[target["slice_index"]], iterations=3)
        assert np.array_equal(image[outside], real[target["slice_index"]][outside])
    assert model_free_pass_rate(arm_dataset, 0)["cases"] == expected


def test_map_loads_make_one_arm_each_and_a_bad_load_is_refused_in_one_line(example, nnunet_folders, tmp_path,
                                                                            capsys):
    from nnunet_synth.dataset_tools.evaluate import main
    from nnunet_synth.evaluation.downstream import DownstreamSettings, plan_arms
    arms = plan_arms(DownstreamSettings(generators={}, arms=["real_only", "copy_paste", "inpaint"], amounts=[0.5],
                                        map_loads=["dense", "real"]))
    assert [arm.label for arm in arms] == ["real_only", "copy_paste_x0.5", "copy_paste_x0.5_real", "inpaint_x0.5",
                                           "inpaint_x0.5_real"]
    assert arms[1].balancing.to_recipe() is None        # the default maps: a recipe as nnsynth_generate's
    assert arms[2].balancing.to_recipe() == {"map_load": "real"}
    code, _, error = run_entry_point(main, ["downstream", example.folder, "-o", tmp_path, "--arms", "real_only",
                                            "copy_paste", "--map-loads", "sparse", "--first-id", "763",
                                            "--device", "cpu"], capsys)
    assert code == 2 and error.count("\n") == 1
    assert error.startswith("nnsynth: error: --map-loads sparse: choose among dense, real")
    assert not list(nnunet_folders["nnUNet_raw"].glob("Dataset763_*"))


def test_a_real_load_arm_writes_maps_at_real_loads_and_records_them(example, tmp_path):
    """Copy-paste cases of a ``--map-loads real`` arm in a copy of the example: the store's recipe asks for real
    loads, and the arm's record holds the real and new maps' per-map loads, the new ones within the real ones."""
    import shutil

    from nnunet_synth.evaluation.downstream import Arm, DownstreamSettings, make_synthetic_cases, write_pass_rate
    folder = example.folder.parent / "Dataset966_ArmExampleRealLoads"
    shutil.copytree(example.folder, folder)
    arm = Arm("copy_paste", None, 0.5, "real")
    make_synthetic_cases(arm, RawDataset(folder), DownstreamSettings(generators={}), None)
    manifest = json.loads((folder / "synthetic.json").read_text())
    assert manifest["folds"]["0"]["settings"]["balancing"] == {"map_load": "real"}
    write_pass_rate(arm, RawDataset(folder), DownstreamSettings(generators={}), "real3", tmp_path)
    record = json.loads((tmp_path / "model_free_gate.json").read_text())
    assert record["label"] == "copy_paste_x0.5_real" and record["map_load"] == "real"
    for loads in record["per_map_load"].values():
        if loads["new"] is not None:
            assert loads["new"]["p50"] <= loads["real"]["p90"] + 1e-9
