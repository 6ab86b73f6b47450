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


def real_trainable(device: str, config, cached: bool = True):
    """ACE-Step 1.5 at the real 2B sizes (diffusers' default DiT and condition encoder, Qwen3-0.6B's
    token table) with random weights and ``config``'s adapters, on ``device`` (meta: no memory).
    ``cached``: the condition comes with the sample, so the DiT is the only model held."""
    from diffusers.models.transformers.ace_step_transformer import AceStepTransformer1DModel
    from diffusers.pipelines.ace_step import AceStepConditionEncoder

    from acestep_dist.families.ace_step_15 import AceStep15
    from acestep_dist.families.ace_step_15.loading import AceStep15Components
    from acestep_dist.families.ace_step_15.training import AceStep15Trainable
    from acestep_dist.families.ace_step_15.variants import variant_spec

    with torch.device(device):
        transformer = AceStepTransformer1DModel()
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
        hidden = family.components.transformer_config["hidden_size"]
        sample["condition_states"] = torch.randn(lyric_tokens + 1 + text_tokens, hidden,
                                                 generator=generator).to(torch.bfloat16)
    return sample
