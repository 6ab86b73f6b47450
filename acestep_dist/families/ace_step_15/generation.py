"""A LoRA in any of the three spellings, loaded through diffusers' own ``load_lora_weights``."""

from __future__ import annotations

import tempfile

from .family import AceStep15
from .lora_formats import LoraWeights, check_fits, read_lora, write_diffusers

ADAPTER = "acedist"


def load_lora_into(pipe, family: AceStep15, path: str, scale: float = 1.0) -> LoraWeights:
    """Any of the three formats, converted to diffusers' and loaded by the pipeline (alpha kept:
    diffusers' pipeline-level loader honours the header's adapter config)."""
    weights = read_lora(path)
    check_fits(weights, family.components.transformer, family.variant.name, path)
    with tempfile.TemporaryDirectory() as folder:
        pipe.load_lora_weights(str(write_diffusers(weights, folder)), adapter_name=ADAPTER)
    pipe.set_adapters([ADAPTER], [scale])
    return weights
