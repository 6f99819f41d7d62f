"""nnU-Net trainer classes (installed as ``nnunet_synth.trainers``).

- ``settings``: every ``nnsynth_*`` setting, parsed and resolved in one place.
- ``synth_mix``: nnUNetTrainerSynthMix, the base trainer (real + synthetic cases in every training batch).
- ``lesion_paste``: nnUNetTrainerLesionPaste, online lesion copy-paste in the data loader (composes with SynthMix).
- ``variants``: ``ratios`` (_r0, _r25, _r50, _r75, _r100), ``budgets`` (_smoke, _debug, _short, _demo, _medium) and
  ``paste`` (nnUNetTrainerLesionPaste_p50 and the same budgets).
- ``mixing``: quality filter, the mixed dataset and the mixing data loader.
- ``pasting``: the donor components of a fold and the paste transform of nnUNetTrainerLesionPaste.
- ``synthetic_pool``: synthetic cases preprocessed with the real plans into a verified pool beside the real data.
- ``discovery`` and ``nnunet_ext``: nnU-Net's lookup: ``export nnUNet_extTrainer=$(nnsynth_trainer_dir)``.
"""
