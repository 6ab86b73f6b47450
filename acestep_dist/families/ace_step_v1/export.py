"""ACE-Step v1 exports: a LoRA for upstream / SimpleTuner and for ComfyUI, a full fine-tune as a
checkpoint folder in upstream's layout (the trained DiT beside the unchanged DCAE, vocoder, UMT5)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Sequence

from safetensors import SafetensorError

from ...errors import UserError
from ..base import ModelDescription
from .lora_formats import read_lora, write_comfyui, write_upstream
from .training import LORA_FILE, LYRIC_ENCODER_FILE, TRANSFORMER_DIR

LORA_README = """ACE-Step v1 {description} (scale {scale:g}), on {targets}.
{files}acedist: acedist generate --model BASE --lora <any of these files> ...
{lyric}"""
UPSTREAM_NOTE = """
upstream/pytorch_lora_weights.safetensors
    upstream ACE-Step v1: pass the folder as lora_name_or_path (ACEStepPipeline(...)(lora_name_or_path=
    "upstream/", lora_weight=1.0)) or to its Gradio app; SimpleTuner and diffusers'
    load_lora_adapter(..., prefix=None) read it too. The trained scale is baked into the weights,
    so every loader applies it at weight 1.0 (upstream's own files need alpha/sqrt(rank) elsewhere).
"""
COMFYUI_NOTE = """
comfyui/{name}.safetensors
    ComfyUI: copy into ComfyUI/models/loras/ and use a LoRA loader node on the ACE-Step v1 model
    at strength 1.0 (keys diffusion_model.*, LyCORIS part names, an alpha per module that gives the
    trained scale).{dora}
"""
DORA_NOTE = """ ComfyUI (through 2026) normalises a DoRA's rows by the base weight's norm, not the
    adapted weight's as training did: its output differs by the relative change the adapter makes
    to each row's norm (small for a trained adapter); acedist and LyCORIS apply it exactly."""
LYRIC_NOTE = """
upstream/lyric_encoder.safetensors
    the lyric embedding, Conformer and projection trained in full (lyrics_embedder_train), upstream
    key names (lyric_embs.*, lyric_encoder.*, lyric_proj.*): load them into the DiT with
    load_state_dict(strict=False) beside the LoRA. acedist generate --lora upstream/ does; upstream's
    load_lora and ComfyUI read the LoRA only.
"""
FULL_README = """A full fine-tune of the ACE-Step v1 DiT.

upstream/ (ace_step_transformer/ + the base model's music_dcae_f8c8/, music_vocoder/, umt5-base/)
    upstream ACE-Step v1: ACEStepPipeline(checkpoint_dir="upstream/"); acedist generate --model upstream/.
    ace_step_transformer/ alone replaces the folder of that name in an existing checkpoint.
"""


def export_lora(run_folder: Path, weights: Sequence[str], out: Path, formats: Sequence[str], name: str,
                provenance: dict) -> tuple[list[Path], str]:
    if LORA_FILE not in weights:
        raise UserError(f"{run_folder} lists no {LORA_FILE} among its weights ({', '.join(weights)})")
    lora = read_lora(run_folder / LORA_FILE)  # read (and checked) before anything is written
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    if "upstream" in formats:
        written.append(write_upstream(lora, out / "upstream" / LORA_FILE, provenance))
    if "comfyui" in formats:
        written.append(write_comfyui(lora, out / "comfyui" / f"{name}.safetensors", provenance))
    lyric = ""
    if LYRIC_ENCODER_FILE in weights:
        # beside the upstream-format LoRA, where `acedist generate --lora upstream/` loads it too
        target = out / "upstream" / LYRIC_ENCODER_FILE
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(run_folder / LYRIC_ENCODER_FILE, target)
        written.append(target)
        lyric = LYRIC_NOTE
    files = (UPSTREAM_NOTE if "upstream" in formats else "") + (
        COMFYUI_NOTE.format(name=name, dora=DORA_NOTE if lora.spec.kind == "dora" else "") if "comfyui" in formats else "")
    body = LORA_README.format(description=lora.spec.describe(), scale=lora.spec.scale, files=files, lyric=lyric,
                              targets=", ".join(lora.targets))
    return written, body


def export_full(description: ModelDescription, run_folder: Path, weights: Sequence[str], out: Path,
                formats: Sequence[str]) -> tuple[list[Path], str]:
    from .loading import DCAE_DIR, TEXT_ENCODER_DIR, VOCODER_DIR
    from .transformer import ACEStepTransformer2DModel

    if TRANSFORMER_DIR not in weights:
        raise UserError(f"{run_folder} lists no {TRANSFORMER_DIR}/ among its weights ({', '.join(weights)})")
    folder = run_folder / TRANSFORMER_DIR
    try:  # loaded before anything is written: a truncated save fails here
        ACEStepTransformer2DModel.from_pretrained(str(folder))
    except (OSError, ValueError, RuntimeError, SafetensorError) as error:
        raise UserError(f"{folder}: the trained DiT does not load (incomplete or corrupt?): {error}") from None
    target = out / "upstream"
    target.mkdir(parents=True, exist_ok=True)
    if (target / TRANSFORMER_DIR).exists():
        shutil.rmtree(target / TRANSFORMER_DIR)  # an earlier export's (the caller checked the folder is ours)
    shutil.copytree(folder, target / TRANSFORMER_DIR)
    base = Path(description.source)
    for part in (DCAE_DIR, VOCODER_DIR, TEXT_ENCODER_DIR):
        if (target / part).exists():
            shutil.rmtree(target / part)
        shutil.copytree(base / part, target / part, copy_function=_link_or_copy)
    return [target / TRANSFORMER_DIR], FULL_README


def _link_or_copy(source: str, destination: str) -> None:
    """Hard-link the unchanged base weights where the file system allows (GBs otherwise)."""
    try:
        os.link(source, destination)
    except OSError:
        shutil.copy2(source, destination)
