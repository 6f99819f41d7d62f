"""Re-export modules for nnU-Net's nnUNet_extTrainer lookup (see trainers/README in the main README)."""
