"""Which real patients an experiment trains on, validates on and tests on.

One seeded permutation of the dataset's cases decides everything, so the settings of a data-efficiency sweep are
nested (the 4 training patients of ``--real-cases 4`` are among the 8 of ``--real-cases 8``) and every arm and
repeat of a setting sees the same patients:

    test patients        the first ``test_patients`` cases: never seen by a generator, a label map or nnU-Net
    validation patient   the next case: nnU-Net's fold-0 validation (its checkpoint selection), nothing else
    training patients    the next ``real_cases`` cases (default: all the rest)
"""
from dataclasses import dataclass

import numpy as np

from nnunet_synth.errors import NnsynthError


@dataclass(frozen=True)
class PatientSplit:
    test: tuple
    validation: tuple
    training: tuple

    def to_json(self) -> dict:
        return {"test": list(self.test), "validation": list(self.validation), "training": list(self.training)}


def split_patients(case_ids, test_patients: int, real_cases: int = None, seed: int = 0,
                   source="dataset") -> PatientSplit:
    """Test, validation and training patients (see the module docstring); ``real_cases=None`` trains on all the
    rest."""
    case_ids = sorted(str(c) for c in case_ids)
    available = len(case_ids) - test_patients - 1
    if test_patients < 0 or available < 1:
        raise NnsynthError(f"{source}: {len(case_ids)} cases cannot keep {test_patients} test patients plus one "
                           f"validation and one training patient: lower --test-patients")
    if real_cases is not None and not 1 <= real_cases <= available:
        raise NnsynthError(f"{source}: --real-cases {real_cases} is not in 1..{available} (cases left after "
                           f"{test_patients} test patients and one validation patient)")
    order = [case_ids[i] for i in np.random.default_rng(seed).permutation(len(case_ids))]
    training = order[test_patients + 1:]
    if real_cases is not None:
        training = training[:real_cases]
    return PatientSplit(tuple(sorted(order[:test_patients])), (order[test_patients],), tuple(sorted(training)))
