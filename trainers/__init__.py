"""nnU-Net trainer classes (installed as ``nnunet_synth.trainers``)."""
