"""ACE-Step 1.5 exports: an adapter in the spellings its consumers load, a full fine-tune as a
diffusers pipeline folder and as upstream's checkpoint files.

Adapter -> ``diffusers/pytorch_lora_weights.safetensors`` (LoRA / DoRA; adapter config in the
header), ``peft/`` (``adapter_config.json`` + ``adapter_model.safetensors``, upstream module names),
``comfyui/<name>.safetensors`` (``alpha`` per module) and, for a LoKr, ``lycoris/`` (upstream's). Full fine-tune -> ``diffusers/`` (a
pipeline folder ``AceStepPipeline.from_pretrained`` loads) and ``upstream/model.safetensors``
(upstream key names, with its ``config.json`` and ``silence_latent.pt``).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Sequence

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ...errors import UserError
from .lora_formats import read_lora, with_provenance, write_comfyui, write_diffusers, write_lycoris, write_peft
from .training import LORA_FILE, LYRIC_ENCODER_FILE, TRANSFORMER_DIR

LORA_README = """{description}, on the DiT's {targets}.
{files}acedist: acedist generate --model BASE --lora <any of these> ...
"""
FORMAT_NOTES = {
    "diffusers": """
diffusers/pytorch_lora_weights.safetensors
    diffusers: pipe = AceStepPipeline.from_pretrained(BASE); pipe.load_lora_weights("diffusers/")
    The adapter config (rank, alpha) is in the file header, so it loads at scale 1.0 as trained.
""",
    "peft": """
peft/ (adapter_config.json + adapter_model.safetensors)
    upstream ACE-Step 1.5: PeftModel.from_pretrained(model.decoder, "peft/") - its adapter folder.
""",
    "comfyui": """
comfyui/{name}.safetensors
    ComfyUI: copy into ComfyUI/models/loras/ and use a LoRA loader node on the ACE-Step 1.5 model
    at strength 1.0 (keys diffusion_model.decoder.*, LyCORIS part names, an alpha per module).{dora}
""",
    "lycoris": """
lycoris/lokr_weights.safetensors
    upstream ACE-Step 1.5's LoKr loader (LyCORIS; its lokr_config header entry rebuilds the layers):
    pass the lycoris/ folder (or the file) where it takes a LoKr.
""",
}
DORA_NOTE = """ ComfyUI (through 2026) normalises a DoRA's rows by the base weight's norm, not the
    adapted weight's as training did: its output differs by the relative change the adapter makes
    to each row's norm (small for a trained adapter); acedist, peft and LyCORIS apply it exactly."""

FULL_README = """A full fine-tune of the DiT{lyric}.

diffusers/
    diffusers: AceStepPipeline.from_pretrained("diffusers/") - the whole pipeline folder.
upstream/model.safetensors (+ config.json, silence_latent.pt)
    upstream ACE-Step 1.5: replace the variant folder's model.safetensors and config.json (e.g.
    checkpoints/acestep-v15-turbo/) with these; vae/ and Qwen3-Embedding-0.6B/ are unchanged.
acedist: acedist generate --model diffusers/ ...
"""


def export_lora(run_folder: Path, weights: Sequence[str], out: Path, formats: Sequence[str], name: str,
                provenance: dict) -> tuple[list[Path], str]:
    if LORA_FILE not in weights:
        raise UserError(f"{run_folder} lists no {LORA_FILE} among its weights ({', '.join(weights)})")
    lora = read_lora(run_folder / LORA_FILE)  # read (and checked) before anything is written
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    if "diffusers" in formats:
        written.append(write_diffusers(lora, out / "diffusers"))
    if "peft" in formats:
        written.append(write_peft(lora, out / "peft") / "adapter_model.safetensors")
    if "comfyui" in formats:
        written.append(write_comfyui(lora, out / "comfyui" / f"{name}.safetensors"))
    if "lycoris" in formats:
        written.append(write_lycoris(lora, out / "lycoris"))
    for file in written:
        with_provenance(file, provenance)
    files = "".join(FORMAT_NOTES[f].format(name=name, dora=DORA_NOTE if lora.spec.kind == "dora" else "")
                    for f in FORMAT_NOTES if f in formats)
    body = LORA_README.format(description=lora.spec.describe(), targets=", ".join(lora.targets), files=files)
    return written, body


def _swap_in_trained(model, run_folder: Path, weights: Sequence[str]) -> None:
    """The base model's DiT (and lyric encoder) replaced by the trained ones."""
    from diffusers import AceStepTransformer1DModel

    components = model.model.components
    folder = run_folder / TRANSFORMER_DIR
    try:  # safetensors only: diffusers would otherwise fall back to a pickled .bin in the folder
        components.transformer = AceStepTransformer1DModel.from_pretrained(str(folder), use_safetensors=True)
    except (OSError, ValueError, RuntimeError, SafetensorError) as error:
        raise UserError(f"{folder}: the trained DiT does not load (incomplete or corrupt?): {error}") from None
    if LYRIC_ENCODER_FILE in weights:
        lyric_file = run_folder / LYRIC_ENCODER_FILE
        try:
            components.condition_encoder.lyric_encoder.load_state_dict(load_file(str(lyric_file)))
        except (OSError, RuntimeError, SafetensorError) as error:
            raise UserError(f"{lyric_file}: the trained lyric encoder does not load (incomplete or corrupt?): "
                            f"{error}") from None


def export_full(model, run_folder: Path, weights: Sequence[str], out: Path,
                formats: Sequence[str]) -> tuple[list[Path], str]:
    from .keymap import diffusers_to_upstream, upstream_config

    if TRANSFORMER_DIR not in weights:
        raise UserError(f"{run_folder} lists no {TRANSFORMER_DIR}/ among its weights ({', '.join(weights)})")
    _swap_in_trained(model, run_folder, weights)
    components = model.model.components
    out.mkdir(parents=True, exist_ok=True)
    written = []
    if "diffusers" in formats:
        target = out / "diffusers"
        if target.exists():
            shutil.rmtree(target)  # an earlier export's (the caller checked the folder is ours)
        model.model.pipeline().save_pretrained(str(target), safe_serialization=True)
        written.append(target)
    if "upstream" in formats:
        target = out / "upstream"
        target.mkdir(parents=True, exist_ok=True)
        state = diffusers_to_upstream(components.transformer.state_dict(), components.condition_encoder.state_dict())
        save_file({k: v.contiguous() for k, v in state.items()}, str(target / "model.safetensors"),
                  metadata={"format": "pt"})
        config = upstream_config(components.transformer.config, components.condition_encoder.config)
        (target / "config.json").write_text(json.dumps(config, indent=2, default=str) + "\n")
        # upstream reads this with torch.load; a plain tensor is all it holds
        torch.save(components.condition_encoder.silence_latent.detach().transpose(1, 2).contiguous().cpu(),
                   target / "silence_latent.pt")
        written.append(target / "model.safetensors")
    lyric = " and the lyric encoder" if LYRIC_ENCODER_FILE in weights else ""
    return written, FULL_README.format(lyric=lyric)
