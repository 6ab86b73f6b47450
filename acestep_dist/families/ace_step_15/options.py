"""ACE-Step 1.5's declarations: its variants, LoRA presets and own config keys (validated by the
family; the general keys are in config.py). Plain data, cheap to import."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from ..base import FamilyOptions

VARIANT_NAMES = (
    "turbo", "turbo-shift1", "turbo-shift3", "turbo-continuous", "base", "sft", "xl-turbo", "xl-base", "xl-sft",
)
LORA_PRESETS = {
    # diffusers module names; upstream calls them q_proj k_proj v_proj o_proj
    "attention": ("to_q", "to_k", "to_v", "to_out.0"),
    "attention+mlp": ("to_q", "to_k", "to_v", "to_out.0", "gate_proj", "up_proj", "down_proj"),
}


def lora_targets(preset: str) -> tuple[str, ...]:
    """The DiT modules a LoRA preset adapts."""
    from ...errors import UserError

    if preset not in LORA_PRESETS:
        raise UserError(f"lora_preset {preset!r} is not one of ACE-Step 1.5's: {', '.join(LORA_PRESETS)}")
    return LORA_PRESETS[preset]


class PrepOptions(FamilyOptions):
    text_max_tokens: int = Field(256, gt=0, description="the text encoder's limit at inference")
    lyric_max_tokens: int = Field(2048, gt=0)
    cache_condition: bool = Field(False, description="also store the condition encoder's output, so training "
                                                     "loads neither it nor the text encoder's token table")
    cache_condition_dtype: Literal["bfloat16", "float32"] | None = Field(
        None, description="how the cached condition is stored (default bfloat16; float32 is lossless, twice the bytes)")

    @model_validator(mode="after")
    def _cache_dtype(self) -> "PrepOptions":
        if self.cache_condition_dtype is not None and not self.cache_condition:
            raise ValueError("cache_condition_dtype is set but cache_condition is false")
        return self

    @property
    def condition_dtype(self) -> str:
        return self.cache_condition_dtype or "bfloat16"


class TrainOptions(FamilyOptions):
    lyrics_embedder_train: bool = Field(False, description="also train the condition encoder's lyric encoder")
    lyrics_embedder_lr: float | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _lyrics_lr(self) -> "TrainOptions":
        if self.lyrics_embedder_lr is not None and not self.lyrics_embedder_train:
            raise ValueError("lyrics_embedder_lr is set but lyrics_embedder_train is false")
        return self
