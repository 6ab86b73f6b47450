"""ACE-Step 1.5 (turbo, shift variants, base, SFT, XL) on diffusers' components."""

from .family import AceStep15, LatentStats, TrainingBatch
from .loading import ALL_PARTS, AceStep15Components, load_components
from .variants import VARIANT_NAMES, VariantSpec, detect_variant, variant_spec

__all__ = [
    "ALL_PARTS",
    "AceStep15",
    "AceStep15Components",
    "LatentStats",
    "TrainingBatch",
    "VARIANT_NAMES",
    "VariantSpec",
    "detect_variant",
    "load_components",
    "variant_spec",
]
