"""Synthetic cases for the trainer tests, written through the real SyntheticStore.

Until the generator is ready, the "synthetic" pairs are 2D slices of the example dataset's real cases with a
model-free quality score chosen here (so a threshold has cases on both sides). To test with real generator
output later, replace ``write_synthetic_cases`` (the only data source) by a call to the generator that writes
into the same store; everything downstream reads the manifest only.
"""
import numpy as np
import pytest

from nnunet_synth.dataset.raw_dataset import RawDataset
from nnunet_synth.writer.synthetic_store import SyntheticStore, synthetic_case_id

SYNTHMIX_DATASET_ID = 981
SYNTHMIX_DATASET_NAME = "SynthMixExample"
NUM_SCORED_CASES = 12


def stand_in_score(index: int) -> float:
    """Model-free scores 0.05, 0.13, ..., 0.93 (one per case, spread across [0, 1])."""
    return round(0.05 + 0.08 * index, 2)


def write_synthetic_cases(dataset_folder) -> SyntheticStore:
    """Write the synthetic pairs of ``dataset_folder``; return the store. THE data source to replace.

    NUM_SCORED_CASES cases carry quality.model_free.score (``stand_in_score``) and
    quality.segmentation.mean_dice (= 1 - score, so the two quality keys select different cases); one more
    case has no quality entry at all (as a case written before any scoring).
    """
    dataset = RawDataset(dataset_folder)
    store = SyntheticStore(dataset)
    store.prepare()
    case_ids = dataset.case_ids
    for index in range(NUM_SCORED_CASES + 1):
        source_case = case_ids[index % len(case_ids)]
        image, label_map, properties = dataset.read_case(source_case)
        slices_with_foreground = np.flatnonzero(label_map.reshape(label_map.shape[0], -1).max(axis=1) > 0)
        z = int(slices_with_foreground[(index // len(case_ids)) % len(slices_with_foreground)])
        entry = {"source_case": source_case, "source_slice": z, "generator": "stand-in: real slice"}
        if index < NUM_SCORED_CASES:
            score = stand_in_score(index)
            entry["quality"] = {"model_free": {"score": score, "passed": score >= 0.5},
                                "segmentation": {"mean_dice": round(1.0 - score, 2), "dice": {}}}
        store.write_case(synthetic_case_id(index), image[z], label_map[z], properties,
                         dataset.source_dtype(source_case), entry)
    return store


@pytest.fixture(scope="session")
def synthetic_example_dataset(nnunet_folders):
    """The embedded example as Dataset981_SynthMixExample (a private copy: other tests' Dataset990 stays
    real-only), with synthetic cases from ``write_synthetic_cases``. Returns the raw dataset folder."""
    from nnunet_synth.dataset_tools.convert_covid19_ct_slices import convert_covid19_ct_slices
    from nnunet_synth.example import example_source_folder
    folder = convert_covid19_ct_slices(example_source_folder(), nnunet_folders["nnUNet_raw"],
                                       SYNTHMIX_DATASET_ID, SYNTHMIX_DATASET_NAME)
    write_synthetic_cases(folder)
    return folder
