"""Model families behind one small interface (see DESIGN.md): load, encode_audio, encode_text,
tokenize_lyrics, condition, training_loss, generate, lora_targets."""

from __future__ import annotations

FAMILIES = ("ace-step-1.5",)


def load_family(path_or_id: str, parts=None, **kwargs):
    """Load a checkpoint with the family that reads it. Only ACE-Step 1.5 exists so far."""
    from .ace_step_15 import ALL_PARTS, AceStep15

    return AceStep15.load(path_or_id, parts if parts is not None else ALL_PARTS, **kwargs)
