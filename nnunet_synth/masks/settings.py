"""What a run asks of the balancing: the class roles by label name and the ``MaskGenerationConfig`` values it
overrides. Unset fields (None) keep the defaults, and only the set ones are recorded in a fold's recipe, so a
later default never mixes into a fold's cases and a store written before keeps resuming."""
from dataclasses import dataclass, fields

from nnunet_synth.masks.balance import MaskGenerationConfig


@dataclass
class BalancingSettings:
    """Class roles (label names) and MaskGenerationConfig overrides; None = the default."""

    host_classes: list = None           # [] = no host class; None = the host of masks.default_class_roles
    pathology_classes: list = None      # None = every other class present
    target_factor: float = None
    max_target_share: float = None
    common_share: float = None
    min_donor_area: int = None
    map_class_share_cap: float = None
    map_load: str = None
    load_from_percentile: float = None
    load_cap_percentile: float = None
    p_rotate: float = None
    p_shift: float = None
    p_dilate: float = None

    @classmethod
    def from_dict(cls, values: dict = None) -> "BalancingSettings":
        """From a recipe's ``balancing`` (None: nothing set)."""
        return cls(**(values or {}))

    def to_recipe(self) -> dict:
        """The fields that were set, in field order; None when none was (as the recipe records it)."""
        given = {field.name: getattr(self, field.name) for field in fields(self)
                 if getattr(self, field.name) is not None}
        return given or None

    def mask_config(self) -> MaskGenerationConfig:
        """The balancing's MaskGenerationConfig: its defaults with the values set here."""
        overrides = {field.name: getattr(self, field.name) for field in fields(self)
                     if not field.name.endswith("_classes") and getattr(self, field.name) is not None}
        return MaskGenerationConfig(**overrides)
