"""The package's example: a chest-CT-like 2D dataset generated at run time (no data files are shipped)."""
from nnunet_synth.example.phantom import PhantomSettings, write_chest_phantom

__all__ = ["PhantomSettings", "write_chest_phantom"]
