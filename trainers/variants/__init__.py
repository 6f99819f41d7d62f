"""Trainer variants, grouped by what they change (as nnunetv2/training/nnUNetTrainer/variants/): ``ratios`` fix
the synthetic fraction in the class name, ``budgets`` the training length."""
