"""Stage 2: new label maps that over-represent rare classes (000 §2.3)."""
from nnunet_synth.masks.balance import (SHARE_DEFINITION, MaskGenerationConfig, NewLabelMap, default_class_roles,
                                        generate_label_maps, pixel_counts, transform_region)
from nnunet_synth.masks.loading import load_label_maps
from nnunet_synth.masks.paste import host_mask, paste_region, region_footprint
from nnunet_synth.masks.regions import (DonorRegion, Region, dilate_region, find_regions, rotate_region,
                                        shift_region)

__all__ = [
    "generate_label_maps", "MaskGenerationConfig", "NewLabelMap", "SHARE_DEFINITION", "default_class_roles",
    "pixel_counts", "transform_region", "load_label_maps", "host_mask", "paste_region", "region_footprint",
    "DonorRegion", "Region", "find_regions", "rotate_region", "shift_region", "dilate_region",
]
