"""The real training label maps of a raw dataset, as the balancing loop takes them."""
from nnunet_synth.dataset.raw_dataset import RawDataset
from nnunet_synth.dataset.slices import iter_slices


def load_label_maps(dataset: RawDataset, case_ids=None, skip_background_only=False):
    """Return (list of 2D label maps, list of (case_id, slice_index)) for ``case_ids`` (default: all training cases)."""
    label_maps, map_ids = [], []
    for labelled_slice in iter_slices(dataset, case_ids, skip_background_only=skip_background_only):
        label_maps.append(labelled_slice.label_map)
        map_ids.append((labelled_slice.case_id, labelled_slice.slice_index))
    return label_maps, map_ids
