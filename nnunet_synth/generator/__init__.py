"""Stage 3: the mask-conditioned diffusion generator and its CBMAT training (000 §2.1-2.2)."""
