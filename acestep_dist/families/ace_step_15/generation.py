"""An adapter in any of the four spellings, loaded into the pipeline's DiT: a LoRA / DoRA through
diffusers' own ``load_lora_weights``, a LoKr / LoHa through peft (diffusers builds LoRA layers only)."""

from __future__ import annotations

import tempfile

from ..adapters import AdapterWeights
from .family import AceStep15
from .lora_formats import check_fits, read_lora, write_diffusers

ADAPTER = "acedist"


def load_lora_into(pipe, family: AceStep15, path: str, scale: float = 1.0) -> AdapterWeights:
    """Any of the formats, applied at ``scale`` x the trained scale (alpha kept: diffusers'
    pipeline-level loader honours the header's adapter config)."""
    weights = read_lora(path)
    check_fits(weights, family.components.transformer, family.variant.name, path)
    if weights.spec.kind in ("lora", "dora"):
        with tempfile.TemporaryDirectory() as folder:
            pipe.load_lora_weights(str(write_diffusers(weights, folder)), adapter_name=ADAPTER)
        pipe.set_adapters([ADAPTER], [scale])
        return weights
    from peft import inject_adapter_in_model, set_peft_model_state_dict

    baked = weights.baked(scale)  # scale 1 in peft's config: the tensors carry it
    inject_adapter_in_model(baked.spec.peft_config(baked.modules), pipe.transformer, adapter_name=ADAPTER)
    set_peft_model_state_dict(pipe.transformer, baked.state, adapter_name=ADAPTER)
    return weights
