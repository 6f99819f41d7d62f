"""Small CPU plans for tests, demos and the iteration-time benchmark.

nnU-Net's default plans are GPU plans (e.g. 32..512 features over 7 stages): far too slow on a CPU. A CPU
variant keeps the configuration's ``data_identifier``, so it trains on the very same preprocessed data (and
the same synthetic pool) as the original plans, and only shrinks the network width and the batch size.
Train it with ``-p <plans_name>``. Conclusions about segmentation quality need the real plans on a GPU.
"""
import copy
import json
from pathlib import Path


def derive_cpu_plans(plans: dict, configuration: str, plans_name: str, max_features: int = 32,
                     base_features: int = 8, batch_size: int = 2) -> dict:
    """A copy of ``plans`` named ``plans_name`` whose ``configuration`` has a narrow network and small batch."""
    small = copy.deepcopy(plans)
    small["plans_name"] = plans_name
    config = small["configurations"][configuration]
    arch_kwargs = config["architecture"]["arch_kwargs"]
    arch_kwargs["features_per_stage"] = [min(base_features * 2 ** stage, max_features)
                                         for stage in range(arch_kwargs["n_stages"])]
    config["batch_size"] = batch_size
    return small


def write_cpu_plans(preprocessed_dataset_folder, configuration: str = "2d", source_plans: str = "nnUNetPlans",
                    plans_name: str = "nnUNetPlans_cpu", **kwargs) -> Path:
    """Write ``<plans_name>.json`` beside ``<source_plans>.json``; return its path."""
    folder = Path(preprocessed_dataset_folder)
    with open(folder / f"{source_plans}.json") as handle:
        plans = json.load(handle)
    target = folder / f"{plans_name}.json"
    with open(target, "w") as handle:
        json.dump(derive_cpu_plans(plans, configuration, plans_name, **kwargs), handle, indent=2)
    return target
