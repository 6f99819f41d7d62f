"""Copy-paste synthetic cases: the balanced label maps with real pixels instead of a generator's.

Each new label map is a real target map with donor regions pasted into it (``masks/balance.py``); its provenance
records the donor map (a slice or a volume), the region (``bbox``, ``component_index``) and the operations. The image is
the target's real slice with the donor's real pixels moved exactly as the region was moved and pasted where the
region landed, blended at the edge (``masks/pixel_paste.py``). No generator is trained or loaded: the
cheap baseline a generator has to beat, and a way to balance a dataset without a GPU.

Volumes (unit "volume", the default for 3D data): the maps are whole real volumes, the donors 3D connected
components, and a case is its target's whole volume, every channel, at the real case's geometry, with the
donor's voxels moved as the component was moved (in-plane rotation of every slice with linear interpolation, 3D
shift) and the seam feathered in 3D; outside the recorded ``edit_box`` it is the target's voxels bit for bit. The
pastes are replayed on the label map first and the image is blended inside that box only, so memory stays about
one volume plus the donors' patches. nnU-Net's 2d, 3d_fullres and 3d_lowres configurations all see such a case
as a real one.

The cases go through the same store, quality gate, preview and trainer as generated ones. They depend on their
``source_cases`` (target and donors) and, recorded as the fold's ``generator_training_cases``, on the fold's
training cases the label maps and the quality gate were built from (no generator saw anything: the list says
which cases shaped the fold's cases, so ``provenance.select_for_fold`` applies unchanged).
"""
import functools
from dataclasses import asdict, dataclass, field, replace

import numpy as np

from nnunet_synth.dataset import RawDataset
from nnunet_synth.dataset.native_slices import open_native_slices
from nnunet_synth.dataset.splits import fold_training_cases
from nnunet_synth.errors import NnsynthError
from nnunet_synth.fold_cases import (
    FoldMaps,
    MadeCase,
    check_role_names,
    prepare_fold_maps,
    resolve_unit,
    slice_counts,
    write_fold_cases,
)
from nnunet_synth.image_sources.base import ImageSource
from nnunet_synth.image_sources.previews import display_windows, write_slice_preview, write_volume_preview
from nnunet_synth.masks.pixel_paste import FEATHER_PIXELS, replay_pastes
from nnunet_synth.masks.settings import BalancingSettings
from nnunet_synth.quality.model_free import model_free_volume_score
from nnunet_synth.writer.synthetic_store import SyntheticStore

IMAGE_SOURCE = "copy-paste"


@dataclass
class CopyPasteSettings:
    """What decides the copy-paste cases; recorded in the manifest as the fold's settings. ``unit``: "slice" (a
    case is one slice) or "volume" (a case is a whole real volume with lesions added); None = "volume" for 3D
    data, "slice" for 2D data (``resolve_unit``)."""

    num_cases: int
    seed: int = 0
    target_share: float = None
    balancing: BalancingSettings = field(default_factory=BalancingSettings)
    feather: float = FEATHER_PIXELS
    unit: str = None

    def recipe(self) -> dict:
        recipe = {k: v for k, v in asdict(self).items() if k != "num_cases"}
        recipe["balancing"] = self.balancing.to_recipe()
        recipe["image_source"] = IMAGE_SOURCE
        return recipe


def generate_copy_paste_cases(dataset: RawDataset, settings: CopyPasteSettings, fold="0", overwrite=False) -> dict:
    """Make and write ``settings.num_cases`` copy-paste cases for nnU-Net fold ``fold`` from its training cases
    only; returns the same summary as ``image_sources.generate_synthetic_cases``. With unit "volume" each case is its
    target's whole volume, its geometry and every channel, with the donors' voxels pasted in."""
    fold = str(fold)
    training_cases = fold_training_cases(dataset, fold)
    settings = replace(settings, unit=resolve_unit(
        dataset, slice_counts(open_native_slices(dataset, training_cases)), settings.unit))
    store = SyntheticStore(dataset)
    if overwrite:
        check_role_names(dataset, settings.balancing)      # bad names fail before anything is removed
        with store.exclusive_writer():
            store.remove_fold(fold)
    # as the generators' runs: the store shared (other folds may write at the same time), this fold claimed
    with store.shared_writer(), store.fold_writer(fold, settings.recipe(), batch_size=1):
        # no generator: generator_training_cases lists the cases the maps and the gate came from
        fold_maps = prepare_fold_maps(dataset, store, fold, settings.recipe(), training_cases, settings,
                                      settings.unit)
        write_preview = functools.partial(COPY_PASTE.preview, dataset, store, fold, fold_maps, settings)
        return write_fold_cases(store, fold, fold_maps, CopyPasteBlocks(settings, fold_maps), settings.seed,
                                write_preview, f"pasting real pixels ({settings.unit}s)", unit=settings.unit)


class CopyPasteBlocks:
    """The cases of a block of new maps: each map's pastes replayed on its target's real pixels (a slice, or a
    whole volume with unit "volume"); a volume is scored inside the pasted voxels (``model_free_volume_score``)."""

    def __init__(self, settings: CopyPasteSettings, fold_maps: FoldMaps):
        self.settings, self.real, self.new_maps = settings, fold_maps.real, fold_maps.new_maps
        self.host, self.gates, self.image_dtypes = fold_maps.host, fold_maps.gates, fold_maps.image_dtypes
        self.placement = fold_maps.placement()
        self.donor_cache = {}

    def __call__(self, batch, seeds) -> list:
        return [self.paste(index) for index in batch]

    def paste(self, index: int) -> MadeCase:
        provenance = self.new_maps[index].provenance
        target = (provenance["target"]["case_id"], provenance["target"]["slice_index"])
        allowed = None if self.placement is None else functools.partial(self.placement.mask,
                                                                         target_index=self.real.row(*target))
        target_image, target_map = self.real.slice(*target)
        replayed = replay_pastes(target_image, target_map, provenance, self.real.slice, self.host, allowed,
                                 self.settings.feather, self.donor_cache)
        label_map = replayed.label_map
        if not np.array_equal(label_map, self.new_maps[index].label_map):
            raise RuntimeError(f"replaying the pastes of new map {index} did not give the map (a bug)")
        channel_images = replayed.channel_images(target_image, self.image_dtypes[target[0]])
        copy_paste = {"feather_pixels": self.settings.feather}
        quality = None      # a slice: the score of the whole image
        if self.settings.unit == "volume":
            # outside this box the volume is its target's voxels, bit for bit
            copy_paste.update(unit="volume", edit_box=[int(v) for v in replayed.edit_box])
            quality = model_free_volume_score(np.stack(channel_images).astype(np.float32), label_map,
                                              label_map != target_map, self.gates)
        return MadeCase(channel_images, label_map, {"seed": self.settings.seed, "image_source": IMAGE_SOURCE,
                                                    "generator": None, "copy_paste": copy_paste}, quality,
                        label_map != target_map)


class CopyPaste(ImageSource):
    """No generator: the donors' real pixels pasted where the maps were, a slice or a whole volume a case."""

    name = IMAGE_SOURCE

    def check_options(self, request):
        if request.noise_seeding_strength is not None:
            raise NnsynthError("--noise-seeding needs a generator: leave it out with --image-source copy-paste")
        if request.generator is not None:
            raise NnsynthError("--image-source copy-paste uses no generator: leave out --generator")
        if request.num_shards > 1:
            raise NnsynthError("--image-source copy-paste runs in one process (no sampling to spread): leave out "
                               "--num-shards")

    def unit(self, dataset: RawDataset, num_slices: dict, unit: str = None) -> str:
        return resolve_unit(dataset, num_slices, unit)

    def settings(self, request, num_cases: int, unit: str, store, fold) -> CopyPasteSettings:
        return CopyPasteSettings(num_cases=num_cases, seed=request.seed, target_share=request.target_share,
                                 balancing=request.balancing, unit=unit)

    def recipe(self, settings: CopyPasteSettings, generator_folder=None) -> dict:
        return settings.recipe()

    def blocks(self, dataset: RawDataset, settings, fold_maps: FoldMaps, generator=None, device="cpu"):
        return CopyPasteBlocks(settings, fold_maps)

    def preview(self, dataset: RawDataset, store: SyntheticStore, fold, fold_maps: FoldMaps, settings,
                generator=None):
        """The preview grid of slices (``previews.write_slice_preview``) or of whole volumes."""
        real = fold_maps.real
        window = display_windows(dataset, real.images if settings.unit == "slice" else real.slices.images)
        if settings.unit == "slice":
            return write_slice_preview(dataset, store, fold, real, window)
        return write_volume_preview(dataset, store, fold, real, window)

    def write_cases(self, dataset: RawDataset, settings, fold, generator_folder=None, device="cpu",
                    overwrite=False, num_shards: int = 1, shard_index: int = 0) -> dict:
        return generate_copy_paste_cases(dataset, settings, fold, overwrite)


COPY_PASTE = CopyPaste()
