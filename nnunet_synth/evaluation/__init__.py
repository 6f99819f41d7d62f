"""Evaluation: fidelity of generated slices, downstream nnU-Net arms, and the report."""
