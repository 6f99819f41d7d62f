"""nnU-Net's residual-encoder preset (``-pl nnUNetPlannerResEncM``, plans ``nnUNetResEncUNetMPlans``) with the
SynthMix and LesionPaste trainers, 2d, on the small real COVID example (Dataset981 of the trainer tests, planned
by the stock planner first, so its fingerprint and preprocessed slices are reused).

The ResEnc M plans are GPU plans (32..512 features, 6 residual blocks per deep stage, batch 40 on this example):
on a CPU the trainings use their CPU copy ``nnUNetResEncUNetMPlans_cpu`` (``cpu_plans.py``), which keeps the
residual encoder, its blocks per stage, kernels, strides and patch, and narrows the features to 8..32 with batch 2.
The 3d_fullres counterpart is in ``test_volumes.py`` (beside the MS volumes it reuses)."""
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import SimpleITK as sitk
from resenc import (
    RESENC_CPU_PLANS,
    RESENC_PLANNER,
    RESENC_PLANS,
    RESIDUAL_ENCODER_UNET,
    assert_residual_encoder_checkpoint,
)
from synthetic_fixtures import (
    PLANS,
    SYNTHMIX_DATASET_ID,
    clean_environment,
    load_json,
    load_plans,
    run_command,
)

from nnunet_synth.dataset import RawDataset
from nnunet_synth.evaluation.nnunet_runs import plan_and_preprocess, planner_plans_name, reuse_preprocessed
from nnunet_synth.trainers.synthetic_pool import pool_folder, pool_record_file, preprocessing_signature


@pytest.fixture(scope="module")
def resenc_planned(planned_dataset, synthetic_example_dataset, nnunet_folders):
    """The downstream evaluation's planning step with ``--planner nnUNetPlannerResEncM``: the stock
    ``nnUNetv2_plan_and_preprocess -d 981 -c 2d -pl nnUNetPlannerResEncM --verify_dataset_integrity`` (the
    fingerprint of the stock planning reused), plus the CPU copy of its plans. Returns the preprocessed folder."""
    plans = plan_and_preprocess(RawDataset(synthetic_example_dataset), nnunet_folders["nnUNet_preprocessed"],
                                cpu_plans=True, configuration="2d", planner=RESENC_PLANNER)
    assert plans == RESENC_CPU_PLANS
    return planned_dataset


def test_the_plans_name_of_a_planner_is_the_one_nnunet_writes():
    assert planner_plans_name("ExperimentPlanner") == PLANS
    assert planner_plans_name(RESENC_PLANNER) == RESENC_PLANS
    assert planner_plans_name("nnUNetPlannerResEncL") == "nnUNetResEncUNetLPlans"


def train_and_read_summary(nnunet_folders, dataset_folder, trainer, **environment):
    env = clean_environment(nnunet_folders, nnUNet_n_proc_DA="0", **environment)
    run_command(["nnUNetv2_train", str(SYNTHMIX_DATASET_ID), "2d", "0", "-tr", trainer, "-p", RESENC_CPU_PLANS,
                 "-device", "cpu"], env)
    fold = nnunet_folders["nnUNet_results"] / dataset_folder.name / f"{trainer}__{RESENC_CPU_PLANS}__2d" / "fold_0"
    return fold, load_json(fold / "synthmix.json"), env


@pytest.mark.slow
def test_synthmix_trains_and_stock_predict_runs_with_the_resenc_m_plans(resenc_planned, synthetic_example_dataset,
                                                                        nnunet_folders, tmp_path):
    """nnUNetv2_train 981 2d 0 -tr nnUNetTrainerSynthMix_smoke -p nnUNetResEncUNetMPlans_cpu mixes the synthetic
    slices from the pool that the stock plans share (ResEnc M keeps the stock 2d data identifier and preprocessing);
    the stock nnUNetv2_predict -p nnUNetResEncUNetMPlans_cpu writes a validation case in its geometry with the
    declared labels."""
    stock, resenc, cpu = (load_plans(resenc_planned, name) for name in (PLANS, RESENC_PLANS, RESENC_CPU_PLANS))
    configuration = resenc["configurations"]["2d"]
    assert resenc["experiment_planner_used"] == RESENC_PLANNER
    assert configuration["architecture"]["network_class_name"] == RESIDUAL_ENCODER_UNET
    assert configuration["data_identifier"] == stock["configurations"]["2d"]["data_identifier"] == "nnUNetPlans_2d"
    for key in ("patch_size", "spacing", "normalization_schemes"):
        assert cpu["configurations"]["2d"][key] == configuration[key]
    trainer = "nnUNetTrainerSynthMix_smoke"
    fold, summary, env = train_and_read_summary(nnunet_folders, synthetic_example_dataset, trainer,
                                                nnsynth_ratio="0.5", nnsynth_min_quality="none")
    assert summary["settings"]["ratio"] == 0.5 and summary["batch_size"] == 2
    assert summary["synthetic_cases"]["used"] > 0 and summary["used_synthetic_cases"]
    pool = pool_folder(resenc_planned, "nnUNetPlans_2d")
    assert summary["pool_folder"] == str(pool)
    # one pool for both plans: training with the stock plans after this (or before) never rebuilds it
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    record = load_json(pool_record_file(pool))
    signatures = {name: preprocessing_signature(PlansManager(plans), PlansManager(plans).get_configuration("2d"),
                                                load_json(resenc_planned / "dataset.json"))
                  for name, plans in (("stock", stock), ("resenc", resenc))}
    assert record["preprocessing_signature"] == signatures["stock"] == signatures["resenc"]
    assert_residual_encoder_checkpoint(fold, "2d", resenc, cpu)

    splits = load_json(resenc_planned / "splits_final.json")
    case_id = splits[0]["val"][0]
    input_folder, output_folder = tmp_path / "input", tmp_path / "predicted"
    input_folder.mkdir()
    shutil.copy(synthetic_example_dataset / "imagesTr" / f"{case_id}_0000.nii.gz", input_folder)
    run_command(["nnUNetv2_predict", "-i", str(input_folder), "-o", str(output_folder), "-d", str(SYNTHMIX_DATASET_ID),
                 "-c", "2d", "-p", RESENC_CPU_PLANS, "-tr", trainer, "-f", "0", "-device", "cpu", "-npp", "0", "-nps",
                 "0", "--disable_tta"], env)
    predicted = sitk.ReadImage(str(output_folder / f"{case_id}.nii.gz"))
    reference = sitk.ReadImage(str(synthetic_example_dataset / "labelsTr" / f"{case_id}.nii.gz"))
    assert predicted.GetSize() == reference.GetSize() and predicted.GetSpacing() == reference.GetSpacing()
    assert set(np.unique(sitk.GetArrayFromImage(predicted))) <= {0, 1, 2}


@pytest.mark.slow
def test_lesion_paste_trains_with_the_resenc_m_plans(resenc_planned, synthetic_example_dataset, nnunet_folders):
    """nnUNetv2_train 981 2d 0 -tr nnUNetTrainerLesionPaste_smoke -p nnUNetResEncUNetMPlans_cpu pastes lesions of
    the fold's training cases into its samples."""
    fold, summary, _ = train_and_read_summary(nnunet_folders, synthetic_example_dataset,
                                              "nnUNetTrainerLesionPaste_smoke", nnsynth_paste_probability="1")
    counts = summary["lesion_paste"]["counts"]
    assert summary["settings"]["ratio"] == 0.0 and counts["samples_pasted"] > 0
    assert int(counts["pixels_added"]["2"]) > 0
    assert_residual_encoder_checkpoint(fold, "2d", load_plans(resenc_planned, RESENC_PLANS),
                                       load_plans(resenc_planned, RESENC_CPU_PLANS))


@pytest.mark.slow
def test_another_arm_gets_the_resenc_plans_and_their_preprocessed_cases(resenc_planned, synthetic_example_dataset,
                                                                       nnunet_folders):
    """The downstream evaluation plans its first arm and copies the plans to the others: with --planner
    nnUNetPlannerResEncM the copies are the ResEnc M plans and their CPU copy (nnUNetPlans is not needed)."""
    other = SimpleNamespace(name="Dataset982_SynthMixExampleResEncCopy")       # only its name is used
    root = nnunet_folders["nnUNet_preprocessed"]
    assert reuse_preprocessed(RawDataset(synthetic_example_dataset), other, root, RESENC_CPU_PLANS, "2d",
                              RESENC_PLANNER) == RESENC_CPU_PLANS
    target = root / other.name
    assert sorted(path.name for path in target.glob("*Plans*.json")) == [f"{RESENC_PLANS}.json",
                                                                        f"{RESENC_CPU_PLANS}.json"]
    for name in (RESENC_PLANS, RESENC_CPU_PLANS):
        copied, source = load_plans(target, name), load_plans(resenc_planned, name)
        assert copied.pop("dataset_name") == other.name
        assert copied == {key: value for key, value in source.items() if key != "dataset_name"}
    assert sorted(path.name for path in (target / "nnUNetPlans_2d").iterdir()) == sorted(
        path.name for path in (resenc_planned / "nnUNetPlans_2d").iterdir())
