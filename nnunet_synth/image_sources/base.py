"""What every image source answers (``ImageSource``) and the rule they share for how many cases a fold gets."""
from nnunet_synth.dataset import RawDataset


def case_count(ratio: float, units: int) -> int:
    """``ratio`` synthetic cases per real unit of a fold's training cases (a slice, or a volume when a case is a
    whole volume), at least 1."""
    return max(1, round(ratio * units))


class ImageSource:
    """One way of making the images of a fold's balanced label maps (``fold_cases.py`` does the rest: maps,
    resume, shards, gates, store). The sources stand side by side in ``IMAGE_SOURCES`` (``__init__.py``), named
    by their ``--image-source`` value; each answers every question in which they differ."""

    name: str = None                # the --image-source value
    generator_mode: str = None      # the generator it samples ("slice", "inpaint": TrainingSettings.mode), or None

    def check_options(self, request):
        """Refuse the options of a ``GenerateRequest`` that this source does not take (before any file is read)."""

    def refuse_foreign_options(self, request):
        """Refuse, for a request of another source, the options that only this source takes."""

    def default_inference_steps(self, unit: str = "slice") -> int:
        """The sampling steps of a case of ``unit`` when none are asked for (None: the source does not sample)."""
        return None

    def unit(self, dataset: RawDataset, num_slices: dict, unit: str = None) -> str:
        """What one case is, "slice" or "volume", from the training cases' slice counts (case id -> slices) and
        the unit asked for (None: the source's default)."""
        raise NotImplementedError

    def settings(self, request, num_cases: int, unit: str, store, fold):
        """The settings of one fold's cases (``GenerationSettings``, ``CopyPasteSettings``) from the request; a
        fold that resumes keeps what ``store`` recorded where the request leaves it open."""
        raise NotImplementedError

    def recipe(self, settings, generator_folder=None) -> dict:
        """What must agree between the runs that write one fold's cases (the fold's record in the manifest)."""
        raise NotImplementedError

    def blocks(self, dataset: RawDataset, settings, fold_maps, generator=None, device="cpu"):
        """The block source of ``fold_cases.write_fold_cases``: ``(batch, seeds) -> list[MadeCase]``."""
        raise NotImplementedError

    def preview(self, dataset: RawDataset, store, fold, fold_maps, settings, generator=None):
        """Write the fold's preview grid; returns its path."""
        raise NotImplementedError

    def write_cases(self, dataset: RawDataset, settings, fold, generator_folder=None, device="cpu",
                    overwrite=False, num_shards: int = 1, shard_index: int = 0) -> dict:
        """Make and write the fold's cases (``settings.num_cases``, fewer when the target share is met first);
        returns the summary of ``fold_cases.write_fold_cases``."""
        raise NotImplementedError
