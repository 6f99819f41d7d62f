"""nnunet-synth: class-balanced synthetic cases for nnU-Net v2 from a mask-conditioned diffusion model.

The sub-packages follow the pipeline: ``dataset`` (raw nnU-Net data in, slices out) -> ``masks`` (new label
maps) -> ``generator`` (CBMAT training) -> ``sampling`` -> ``quality`` -> ``writer`` -> ``trainers``.
"""

__version__ = "0.1.0"
