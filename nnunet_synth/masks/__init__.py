"""Stage 2: new label maps that over-represent rare classes (Diff-Lung §2.3)."""
from nnunet_synth.masks.balance import (
                                        HOST_MIN_FOREGROUND_SHARE,
                                        SHARE_DEFINITION,
                                        MaskGenerationConfig,
                                        NewLabelMap,
                                        NewLabelMapsOnDisk,
                                        check_goals_raised,
                                        default_class_roles,
                                        generate_label_maps,
                                        pixel_counts,
                                        region_shares,
                                        resolve_class_roles,
                                        transform_region,
)
from nnunet_synth.masks.loading import load_label_maps
from nnunet_synth.masks.paste import host_mask, paste_region, region_footprint
from nnunet_synth.masks.placement import body_mask, class_occurrence_prior, prior_on_map
from nnunet_synth.masks.regions import DonorRegion, Region, dilate_region, find_regions, rotate_region, shift_region

__all__ = [
    "generate_label_maps", "MaskGenerationConfig", "NewLabelMap", "NewLabelMapsOnDisk", "SHARE_DEFINITION",
    "HOST_MIN_FOREGROUND_SHARE", "default_class_roles", "resolve_class_roles", "region_shares", "check_goals_raised",
    "pixel_counts", "transform_region",
    "load_label_maps", "host_mask", "paste_region", "region_footprint", "body_mask", "class_occurrence_prior",
    "prior_on_map", "DonorRegion", "Region", "find_regions", "rotate_region", "shift_region", "dilate_region",
]
