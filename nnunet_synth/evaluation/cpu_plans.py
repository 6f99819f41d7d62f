"""Small CPU plans for tests, demos and the iteration-time benchmark.

nnU-Net's default plans are GPU plans (e.g. 32..512 features over 7 stages): far too slow on a CPU. A CPU
variant keeps the configuration's ``data_identifier``, so it trains on the very same preprocessed data (and
the same synthetic pool) as the original plans, and only shrinks the network width and the batch size; with
``patch_scale`` below 1 also the patch (each axis scaled, rounded down to a size the network's strides divide:
for 3D tests, where a full patch costs seconds per iteration on a CPU core). The network class, its stages,
blocks per stage, kernels and strides stay those of the source plans (the plain UNet of ``nnUNetPlans`` or the
residual encoder of ``nnUNetResEncUNet*Plans``). Train it with ``-p <plans_name>``. Conclusions about
segmentation quality need the real plans on a GPU.
"""
import copy
import json
from pathlib import Path

from nnunet_synth.atomic import write_json_atomic


def scaled_patch_size(patch_size, strides, scale: float) -> list:
    """Each axis of ``patch_size`` times ``scale``, rounded down to a multiple of the product of the strides along
    it (at least one multiple): a patch the network can still pool down to its lowest stage."""
    sizes = []
    for axis, size in enumerate(patch_size):
        divisor = 1
        for stride in strides:
            divisor *= stride[axis] if isinstance(stride, (list, tuple)) else stride
        sizes.append(max(divisor, int(size * scale) // divisor * divisor))
    return sizes


def derive_cpu_plans(plans: dict, configuration: str, plans_name: str, max_features: int = 32,
                     base_features: int = 8, batch_size: int = 2, patch_scale: float = 1.0) -> dict:
    """A copy of ``plans`` named ``plans_name`` whose ``configuration`` has a narrow network and small batch (and,
    with ``patch_scale`` < 1, a smaller patch)."""
    small = copy.deepcopy(plans)
    small["plans_name"] = plans_name
    config = small["configurations"][configuration]
    arch_kwargs = config["architecture"]["arch_kwargs"]
    arch_kwargs["features_per_stage"] = [min(base_features * 2 ** stage, max_features)
                                         for stage in range(arch_kwargs["n_stages"])]
    config["batch_size"] = batch_size
    if patch_scale != 1.0:
        config["patch_size"] = scaled_patch_size(config["patch_size"], arch_kwargs["strides"], patch_scale)
    return small


def write_cpu_plans(preprocessed_dataset_folder, configuration: str = "2d", source_plans: str = "nnUNetPlans",
                    plans_name: str = "nnUNetPlans_cpu", **kwargs) -> Path:
    """Write ``<plans_name>.json`` beside ``<source_plans>.json``; return its path."""
    folder = Path(preprocessed_dataset_folder)
    with open(folder / f"{source_plans}.json") as handle:
        plans = json.load(handle)
    target = folder / f"{plans_name}.json"
    write_json_atomic(derive_cpu_plans(plans, configuration, plans_name, **kwargs), target)
    return target
