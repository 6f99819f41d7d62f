"""nnU-Net's dataset fingerprint drawn from 10^5 foreground intensities instead of its fixed 10^8, for the test
fixtures that plan a few small cases with the stock ``nnUNetv2_plan_and_preprocess``.

The stock command skips its own extraction when ``dataset_fingerprint.json`` exists (without ``--clean``); its
integrity check, planning and preprocessing stay stock. With a few small cases the 10^8 samples are most of the
command's time (13 of 20 s for the small COVID example, 45 of 50 s for the four-channel MS volumes); the intensity
statistics from 10^5 samples agree with the stock ones within 0.3 % (identical on the 8-bit slices). The tests of stock
planning itself (``test_dataset.py``) and the library's runs (the demo, the downstream evaluation) extract the
stock fingerprint.

    python tests/sampled_fingerprint.py DATASET_ID      # with the nnU-Net folders in the environment
"""
import subprocess
import sys
from pathlib import Path

FOREGROUND_SAMPLES = 1e5


def write_sampled_fingerprint(dataset_id, env: dict):
    """Write the fingerprint of ``dataset_id`` in a subprocess with ``env`` (nnU-Net reads its folders from the
    environment when it is imported)."""
    result = subprocess.run([sys.executable, str(Path(__file__).resolve()), str(dataset_id)], env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]


if __name__ == "__main__":
    from nnunetv2.experiment_planning.dataset_fingerprint.fingerprint_extractor import DatasetFingerprintExtractor

    class SampledFingerprintExtractor(DatasetFingerprintExtractor):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.num_foreground_voxels_for_intensitystats = FOREGROUND_SAMPLES

    SampledFingerprintExtractor(sys.argv[1], num_processes=1).run()
