"""Helpers several families' own code shares (a family folder may use them; stages never do)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from ..errors import UserError


def adapter_config(config, targets: Sequence[str]):
    """peft's config of a training config's adapter (``adapter``, ``lora_rank``, ...) on ``targets``."""
    from .adapters import AdapterSpec

    spec = AdapterSpec.from_config(config)
    dropout = config.lora_dropout if spec.kind in ("lora", "dora") else config.adapter_module_dropout
    return spec.peft_config(targets, dropout)


# peft names an adapter's layers after its kind: lora_A / lora_B / lora_magnitude_vector, lokr_w*, hada_w*
ADAPTER_MARKERS = (".lora_", ".lokr_", ".hada_")


def is_adapter_key(name: str) -> bool:
    """Whether a parameter or state-dict name is one of an adapter's (not the base model's)."""
    return any(marker in name for marker in ADAPTER_MARKERS)


def adapter_state(module, adapter_name: str) -> dict:
    """peft's state dict of ``module``'s adapter ``adapter_name``: float32 CPU copies (call under
    ZeRO-3 parameter gathering)."""
    import torch
    from peft import get_peft_model_state_dict

    return {k: v.detach().to("cpu", torch.float32).clone()
            for k, v in get_peft_model_state_dict(module, adapter_name=adapter_name).items() if is_adapter_key("." + k)}


def adapter_parameters(module) -> list:
    """The parameters peft added to ``module`` for its adapters."""
    return [p for name, p in module.named_parameters() if is_adapter_key(name)]


def encode_unpadded(text_encoder, ids: Sequence[Sequence[int]]) -> list:
    """Per row of token ids the encoder's ``last_hidden_state`` ``[L_i, D]`` (float32, CPU).

    Rows of equal length run together and others apart, so no row is ever padded: a row's states
    are bit-identical whatever it is batched with (padding would move them by float noise and make
    prep's output depend on how rows happened to be batched)."""
    import torch

    device = next(text_encoder.parameters()).device
    states: list = [None] * len(ids)
    by_length: dict[int, list[int]] = {}
    for i, row in enumerate(ids):
        by_length.setdefault(len(row), []).append(i)
    for rows in by_length.values():
        batch = torch.tensor([list(ids[i]) for i in rows], device=device)
        hidden = text_encoder(input_ids=batch).last_hidden_state.float().cpu()
        for slot, i in enumerate(rows):
            states[i] = hidden[slot]
    return states


def json_table(text: str, where: str) -> dict:
    """``text`` as a JSON object, or a UserError naming ``where``."""
    try:
        table = json.loads(text)
    except json.JSONDecodeError as error:
        raise UserError(f"{where}: not valid JSON ({error})") from None
    if not isinstance(table, dict):
        raise UserError(f"{where}: a JSON {type(table).__name__}, not an object of settings")
    return table


def safetensors_header(file: Path, what: str = "LoRA") -> dict[str, str]:
    """The metadata of a safetensors file, or a UserError saying it is unreadable."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(file), "pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError) as error:
        raise UserError(f"{what} {file}: not a readable safetensors file (truncated or corrupt?): {error}") from None


def module_fields(components) -> dict:
    """The ``torch.nn.Module`` fields of a dataclass of loaded parts, by field name."""
    import dataclasses

    import torch

    return {f.name: getattr(components, f.name) for f in dataclasses.fields(components)
            if isinstance(getattr(components, f.name), torch.nn.Module)}
