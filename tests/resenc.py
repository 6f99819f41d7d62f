"""nnU-Net's residual-encoder preset M in the tests (``test_resenc.py`` 2d, ``test_volumes.py`` 3d_fullres): its
planner and plans names, the CPU copy's name, and the check that a trained checkpoint holds a residual encoder."""
import torch

RESENC_PLANNER = "nnUNetPlannerResEncM"
RESENC_PLANS = "nnUNetResEncUNetMPlans"
RESENC_CPU_PLANS = RESENC_PLANS + "_cpu"
RESIDUAL_ENCODER_UNET = "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet"


def assert_residual_encoder_checkpoint(fold_folder, configuration: str, resenc_plans: dict, cpu_plans: dict):
    """``checkpoint_final.pth`` of ``fold_folder`` was trained with the CPU copy and holds a ResidualEncoderUNet
    with the preset's residual blocks per stage (stage by stage in its weights) and the copy's narrow widths."""
    checkpoint = torch.load(fold_folder / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert checkpoint["init_args"]["plans"]["plans_name"] == RESENC_CPU_PLANS
    architecture = cpu_plans["configurations"][configuration]["architecture"]
    assert architecture["network_class_name"] == RESIDUAL_ENCODER_UNET
    blocks = resenc_plans["configurations"][configuration]["architecture"]["arch_kwargs"]["n_blocks_per_stage"]
    assert architecture["arch_kwargs"]["n_blocks_per_stage"] == blocks and max(blocks) == 6
    weights = checkpoint["network_weights"]
    for stage, count in enumerate(blocks):
        assert f"encoder.stages.{stage}.blocks.{count - 1}.conv1.conv.weight" in weights
        assert f"encoder.stages.{stage}.blocks.{count}.conv1.conv.weight" not in weights
        width = weights[f"encoder.stages.{stage}.blocks.0.conv1.conv.weight"].shape[0]
        assert width == architecture["arch_kwargs"]["features_per_stage"][stage]
