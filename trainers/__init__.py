"""nnU-Net trainer classes (installed as ``nnunet_synth.trainers``).

- ``synth_mix``: nnUNetTrainerSynthMix and its variants (_r0, _r25, _r50, _r75, _r100, _debug, _demo, _short,
  _medium, _smoke).
- ``mixing``: settings (nnsynth_ratio, nnsynth_min_quality, nnsynth_quality_key), quality filter, the mixed
  dataset and the mixing data loader.
- ``synthetic_pool``: synthetic cases preprocessed with the real plans into a pool beside the real data.
- ``cpu_plans``: small CPU plans for tests, demos and benchmarks.
- ``nnunet_ext``: re-export modules for nnU-Net's lookup: ``export nnUNet_extTrainer=$(nnsynth_trainer_dir)``.
"""
