"""Stage 6: write synthetic pairs next to (never over) the real data of an nnU-Net raw dataset."""
from nnunet_synth.writer.synthetic_store import MANIFEST_NAME, SYNTH_IMAGES_FOLDER, SYNTH_LABELS_FOLDER, SyntheticStore

__all__ = ["SyntheticStore", "MANIFEST_NAME", "SYNTH_IMAGES_FOLDER", "SYNTH_LABELS_FOLDER"]
