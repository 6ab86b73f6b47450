"""What both benchmarks share: where the checkout and the corpus are, ACE-Step 1.5 through the
registry, and its real sample dimensions."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
CORPUS = Path(os.environ.get("ACESTEP_CORPUS", ROOT.parent / "shared" / "corpus"))
sys.path.insert(0, str(ROOT))

from acestep_dist.families import get as get_family  # noqa: E402

ACE15 = get_family("ace-step-1.5")
REAL_LATENT_DIM, REAL_TEXT_DIM, FRAMES_PER_SECOND = 64, 1024, 25


def pack_tensors(latent_mean, latent_std, text_states, lyric_ids, **optional) -> bytes:
    """An ACE-Step 1.5 sample blob, as its schema packs it (``optional``: e.g. condition_states)."""
    return ACE15.schema.pack({"latent_mean": latent_mean, "latent_std": latent_std, "text_states": text_states,
                              "lyric_ids": lyric_ids, **optional})


class TokenTable(torch.nn.Module):
    """What training keeps of the text encoder: its token table (Qwen3-0.6B's 151669 x 1024)."""

    def __init__(self):
        super().__init__()
        self.embed_tokens = torch.nn.Embedding(151669, REAL_TEXT_DIM)

    def get_input_embeddings(self):
        return self.embed_tokens


# ACE-Step 1.5 XL's DiT (4.17 B parameters): wider and deeper than the 2B one, fed by the 2B's
# condition encoder (2048 wide). From the ports that load the XL checkpoints (DiffSynth-Studio's
# model configs, acestep.cpp's load log) and diffusers' converter notes; its config.json is not on
# this machine.
XL_TRANSFORMER = dict(hidden_size=2560, intermediate_size=9728, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, head_dim=128, encoder_hidden_size=2048)


def real_trainable(device: str, config, cached: bool = True, transformer_config: dict | None = None):
    """ACE-Step 1.5 at the real 2B sizes (diffusers' default DiT and condition encoder, Qwen3-0.6B's
    token table) with random weights and ``config``'s adapters, on ``device`` (meta: no memory).
    ``cached``: the condition comes with the sample, so the DiT is the only model held.
    ``transformer_config``: another DiT (``XL_TRANSFORMER``)."""
    from diffusers.models.transformers.ace_step_transformer import AceStepTransformer1DModel
    from diffusers.pipelines.ace_step import AceStepConditionEncoder

    from acestep_dist.families.ace_step_15 import AceStep15
    from acestep_dist.families.ace_step_15.loading import AceStep15Components
    from acestep_dist.families.ace_step_15.training import AceStep15Trainable
    from acestep_dist.families.ace_step_15.variants import variant_spec

    with torch.device(device):
        transformer = AceStepTransformer1DModel(**(transformer_config or {}))
        parts = {} if cached else dict(condition_encoder=AceStepConditionEncoder(), text_encoder=TokenTable())
    hidden = transformer.config.hidden_size
    # the condition constants are data the loss reads: real (and small) beside meta parts
    components = AceStep15Components(variant_spec("turbo"), "", "bench", transformer=transformer,
                                     transformer_config=dict(transformer.config),
                                     null_condition=torch.zeros(1, 1, hidden),
                                     silence_latent=torch.zeros(1, 750, REAL_LATENT_DIM), **parts)
    family = AceStep15(components)
    return family, AceStep15Trainable(family, config, ACE15.train_options(), cached_condition=cached)


def real_sample(clip_seconds: float, family, lyric_tokens: int = 300, text_tokens: int = 100,
                cached: bool = True) -> dict:
    """One sample of ``clip_seconds`` (random values) with its caption states and lyric ids, and
    (``cached``) a condition as long as the condition encoder makes it."""
    frames = int(clip_seconds * FRAMES_PER_SECOND)
    generator = torch.Generator().manual_seed(0)
    sample = {"latent_mean": torch.randn(frames, REAL_LATENT_DIM, generator=generator),
              "latent_std": torch.rand(frames, REAL_LATENT_DIM, generator=generator),
              "text_states": torch.randn(text_tokens, REAL_TEXT_DIM, generator=generator).to(torch.bfloat16),
              "lyric_ids": torch.randint(0, 151643, (lyric_tokens,), dtype=torch.int32, generator=generator)}
    if cached:
        config = family.components.transformer_config
        hidden = config.get("encoder_hidden_size") or config["hidden_size"]  # the condition encoder's width
        sample["condition_states"] = torch.randn(lyric_tokens + 1 + text_tokens, hidden,
                                                 generator=generator).to(torch.bfloat16)
    return sample


# ACE-Step v1 3.5B's DiT: its ace_step_transformer/config.json (upstream's acestep/models/config.json);
# the lyric Conformer takes upstream's defaults (1024 wide, 16 heads, 4096 units, 6 blocks)
V1_TRANSFORMER = {
    "in_channels": 8, "num_layers": 24, "inner_dim": 2560, "attention_head_dim": 128, "num_attention_heads": 20,
    "mlp_ratio": 2.5, "out_channels": 8, "max_position": 32768, "rope_theta": 1000000.0,
    "speaker_embedding_dim": 512, "text_embedding_dim": 768, "ssl_encoder_depths": [8, 8],
    "ssl_names": ["mert", "m-hubert"], "ssl_latent_dims": [1024, 768], "patch_size": [16, 1], "max_height": 16,
    "max_width": 32768, "lyric_encoder_vocab_size": 6693, "lyric_hidden_size": 1024,
}
V1_LATENT_RATE, V1_TEXT_DIM = 44100 / 512 / 8, 768


def real_v1_trainable(device: str, config):
    """ACE-Step v1 at the real 3.5B sizes with random weights and ``config``'s adapters."""
    from acestep_dist.families.ace_step_v1.loading import V1Components
    from acestep_dist.families.ace_step_v1.model import V1Operations
    from acestep_dist.families.ace_step_v1.training import V1Trainable
    from acestep_dist.families.ace_step_v1.transformer import ACEStepTransformer2DModel

    with torch.device(device):
        transformer = ACEStepTransformer2DModel.from_config(V1_TRANSFORMER)
    operations = V1Operations(V1Components(source="", transformer=transformer, transformer_config=dict(V1_TRANSFORMER)))
    v1 = get_family("ace-step-v1")
    return operations, V1Trainable(operations, config, v1.train_options())


def real_v1_sample(clip_seconds: float, lyric_tokens: int = 900, text_tokens: int = 48) -> dict:
    """One v1 sample of ``clip_seconds``: DCAE latent [8, 16, F], UMT5 states, lyric ids (a tag
    caption and a verse-chorus song)."""
    import math

    generator = torch.Generator().manual_seed(0)
    return {"latent": torch.randn(8, 16, math.ceil(clip_seconds * V1_LATENT_RATE), generator=generator),
            "text_states": torch.randn(text_tokens, V1_TEXT_DIM, generator=generator).to(torch.bfloat16),
            "lyric_ids": torch.randint(0, 6693, (lyric_tokens,), dtype=torch.int32, generator=generator)}
