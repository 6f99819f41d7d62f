"""Re-export modules for nnU-Net's ``nnUNet_extTrainer`` lookup: ``export nnUNet_extTrainer=$(nnsynth_trainer_dir)``.

Only modules that re-export trainer classes defined elsewhere in the installed package belong here (see
nnsynth_trainers.py); nnU-Net imports each of them as a top-level module during a trainer lookup.
"""
