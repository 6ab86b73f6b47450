"""ACE-Step v1's declarations: its variant, LoRA presets and own config keys (validated by the
family; the general keys are in config.py). Plain data, cheap to import."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from ..base import FamilyOptions

VARIANT_NAMES = ("base",)  # one released DiT: ACE-Step-v1-3.5B
# Module names are upstream's (ACEStepTransformer2DModel), so adapters load into upstream's code.
LORA_PRESETS = {
    # upstream's config/zh_rap_lora_config.json (r 256, alpha 32, rsLoRA)
    "upstream": ("speaker_embedder", "linear_q", "linear_k", "linear_v", "to_q", "to_k", "to_v", "to_out.0"),
    # SimpleTuner's ACE-Step default (acestep_lora_target): the same without the speaker embedder
    "simpletuner": ("linear_q", "linear_k", "linear_v", "to_q", "to_k", "to_v", "to_out.0"),
    # the DiT's self- and cross-attention projections only
    "attention": ("to_q", "to_k", "to_v", "to_out.0"),
}


def lora_targets(preset: str) -> tuple[str, ...]:
    """The DiT modules a LoRA preset adapts."""
    from ...errors import UserError

    if preset not in LORA_PRESETS:
        raise UserError(f"lora_preset {preset!r} is not one of ACE-Step v1's: {', '.join(LORA_PRESETS)}")
    return LORA_PRESETS[preset]


class PrepOptions(FamilyOptions):
    text_max_tokens: int = Field(256, gt=0, description="UMT5 tokens of the caption (upstream's limit)")
    lyrics_vocab: str | None = Field(None, description="upstream's lyric vocab.json (acestep/models/lyrics_utils/"
                                                       "vocab.json); default: an installed ACE-Step's")
    lyrics_tokenizer: Literal["training", "inference"] = Field(
        "training", description="upstream's tokenisation path: its trainer's (training) or its pipeline's (inference)")
    lyric_max_tokens: int = Field(4096, gt=0, description="longer lyric token lists are cut (with a warning)")
    # upstream's trainer aligns the DiT (after block 8) with these models' hidden states of the target
    # audio; prep stores them (bf16, of the cropped window) so training needs neither model
    ssl_mert: str | None = Field(None, description="MERT-v1-330M (folder or hub id m-a-p/MERT-v1-330M): store its "
                                                   "hidden states (mert_states) for the SSL alignment loss; its "
                                                   "checkpoint ships its own code (needs trust_remote_code)")
    ssl_mhubert: str | None = Field(None, description="mHuBERT-147 (folder or hub id utter-project/mHuBERT-147): store "
                                                      "its hidden states (mhubert_states) for the SSL alignment loss")
    trust_remote_code: bool = Field(False, description="let the SSL checkpoints run the model code they ship "
                                                       "(MERT's does); refused otherwise")


class TrainOptions(FamilyOptions):
    lyrics_embedder_train: bool = Field(False, description="also train the lyric embedding, Conformer and projection")
    lyrics_embedder_lr: float | None = Field(None, gt=0)
    flow_schedule_shift: float = Field(3.0, gt=0, description="shift of the 1000-step training schedule")
    cfg_dropout_text: float = Field(0.15, ge=0, le=1, description="zeroed caption states (upstream 15 %)")
    cfg_dropout_speaker: float = Field(0.5, ge=0, le=1, description="zeroed speaker embedding (upstream 50 %)")
    cfg_dropout_lyrics: float = Field(0.15, ge=0, le=1, description="zeroed lyric ids and mask (upstream 15 %)")
    lyrics_vocab: str | None = Field(None, description="the lyric vocab.json validation renders tokenise with "
                                                       "(default: an installed ACE-Step's)")
    ssl_loss_weight: float = Field(1.0, ge=0, description="weight of the SSL alignment loss (the mean over the MERT / "
                                                          "mHuBERT terms) for samples prepared with them: upstream's "
                                                          "ssl_coeff 1.0; SimpleTuner uses 0.1; 0 turns it off")

    @model_validator(mode="after")
    def _lyrics_lr(self) -> "TrainOptions":
        if self.lyrics_embedder_lr is not None and not self.lyrics_embedder_train:
            raise ValueError("lyrics_embedder_lr is set but lyrics_embedder_train is false")
        return self
