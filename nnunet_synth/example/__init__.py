"""A small real example shipped with the package (see covid19_ct_slices_subset/SOURCE.md)."""
from importlib import resources
from pathlib import Path


def example_source_folder() -> Path:
    """Folder of the embedded COVID-19 CT slice subset (cases.csv, ct/, lungs/, covid/)."""
    return Path(str(resources.files("nnunet_synth.example") / "covid19_ct_slices_subset"))
