"""ACE-Step v1 text2music sampling as upstream's ``ACEStepPipeline`` runs it by default.

Upstream's defaults: 60 Euler steps on its flow-match schedule (shift 3), APG guidance 15 (momentum
-0.75, norm threshold 2.5) inside the middle half of the steps only, the step's update rescaled
around its mean by omega (10 -> 1.046), and "ERG" (energy-rescaled guidance): the unconditional
branch is not zeros but the condition seen through attention queries scaled by 0.01 in a few
layers (UMT5 blocks 8-9 for the caption, Conformer blocks 4-5 for the lyrics, DiT blocks 15-19 for
the diffusion pass). Layer numbers are upstream's absolute indices: a smaller (tiny) model that
lacks those layers runs them unscaled, as upstream's hooks would find nothing to hook.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch

from ..base import RenderRequest
from .dcae import LATENT_FPS as LATENT_RATE
from .model import SAMPLE_RATE, V1Operations

ERG_TEXT_BLOCKS = range(8, 10)
ERG_LYRIC_BLOCKS = range(4, 6)
ERG_DIT_BLOCKS = range(15, 20)
ERG_TEMPERATURE = 0.01
APG_MOMENTUM = -0.75
APG_NORM_THRESHOLD = 2.5


@dataclass(frozen=True)
class SamplerSettings:
    """Upstream ``ACEStepPipeline.__call__``'s defaults."""

    steps: int = 60
    guidance: float = 15.0
    shift: float = 3.0
    omega: float = 10.0
    guidance_interval: float = 0.5
    guidance_interval_decay: float = 0.0
    min_guidance: float = 3.0
    erg_tag: bool = True
    erg_lyric: bool = True
    erg_diffusion: bool = True


def sampling_sigmas(steps: int, shift: float, train_steps: int = 1000) -> torch.Tensor:
    """Upstream's inference sigmas (``steps`` + a final 0): its scheduler spaces timesteps between
    the shifted training extremes and shifts them again, so the last sigma sits below 1/1000."""
    base = np.linspace(1.0, train_steps, train_steps, dtype=np.float32)[::-1].copy() / train_steps
    base = shift * base / (1 + (shift - 1) * base)
    spaced = np.linspace(float(base[0]) * train_steps, float(base[-1]) * train_steps, steps) / train_steps
    spaced = shift * spaced / (1 + (shift - 1) * spaced)
    sigmas = torch.from_numpy(spaced).to(torch.float32)
    return torch.cat([sigmas, torch.zeros(1)])


def omega_scale(omega: float) -> float:
    """The logistic map upstream's Euler step applies to omega (0.9 .. 1.1, k = 0.1)."""
    return 0.9 + 0.2 / (1 + math.exp(-0.1 * omega))


@contextlib.contextmanager
def scaled_outputs(modules: Sequence[torch.nn.Module], factor: float) -> Iterator[None]:
    """Multiply the outputs of ``modules`` by ``factor`` inside the block (attention temperature)."""
    handles = [m.register_forward_hook(lambda _m, _i, output: output * factor) for m in modules]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _existing(blocks, indices: range) -> list:
    return [blocks[i] for i in indices if i < len(blocks)]


def apg(cond: torch.Tensor, uncond: torch.Tensor, scale: float, running: list) -> torch.Tensor:
    """Adaptive projected guidance: the momentum-averaged, norm-clipped guidance difference with
    its component along the conditional prediction removed (eta 0)."""
    diff = cond - uncond
    running[0] = diff + APG_MOMENTUM * running[0]
    diff = running[0]
    norm = diff.norm(p=2, dim=(-1, -2), keepdim=True)
    diff = diff * torch.minimum(torch.ones_like(diff), APG_NORM_THRESHOLD / norm)
    d64, c64 = diff.double(), torch.nn.functional.normalize(cond.double(), dim=(-1, -2))
    orthogonal = (d64 - (d64 * c64).sum(dim=(-1, -2), keepdim=True) * c64).to(diff.dtype)
    return cond + (scale - 1) * orthogonal


@torch.no_grad()
def text_states(operations: V1Operations, caption: str, erg: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """UMT5 states and mask of the caption, and (ERG) its tempered copy for the unconditional branch."""
    text_encoder, tokenizer = operations._require("text_encoder", "tokenizer")
    device = next(text_encoder.parameters()).device
    inputs = tokenizer([caption], return_tensors="pt", padding=True, truncation=True, max_length=256).to(device)
    states = text_encoder(**inputs).last_hidden_state
    null = None
    if erg:
        queries = [block.layer[0].SelfAttention.q for block in _existing(text_encoder.encoder.block, ERG_TEXT_BLOCKS)]
        with scaled_outputs(queries, ERG_TEMPERATURE):
            null = text_encoder(**inputs).last_hidden_state
    return states, inputs["attention_mask"], null


def lyric_tensors(lyrics: str, vocab_path) -> tuple[torch.Tensor, torch.Tensor]:
    """Upstream's inference rule: tokenised lyrics, or one pad id masked out when there are none."""
    from .lyrics import lyric_ids_and_mask

    ids, mask = lyric_ids_and_mask(lyrics, vocab_path, path="inference")
    return torch.tensor([ids], dtype=torch.long), torch.tensor([mask], dtype=torch.long)


@torch.no_grad()
def sample_latents(operations: V1Operations, caption: str, lyric_ids: torch.Tensor, lyric_mask: torch.Tensor,
                   frames: int, seed: int, settings: SamplerSettings) -> torch.Tensor:
    """The text2music latents ``[1, 8, 16, frames]`` from seed ``seed``."""
    (transformer,) = operations._require("transformer")
    param = next(transformer.parameters())
    device, dtype = param.device, param.dtype
    states, text_mask, null_states = text_states(operations, caption, settings.erg_tag)
    states, null_states = states.to(dtype), None if null_states is None else null_states.to(dtype)
    speaker = torch.zeros(1, operations.speaker_dim, device=device, dtype=dtype)
    lyric_ids, lyric_mask = lyric_ids.to(device), lyric_mask.to(device)
    condition, condition_mask = transformer.encode(states, text_mask, speaker, lyric_ids, lyric_mask)
    if settings.erg_lyric:
        queries = [block.self_attn.linear_q for block in _existing(transformer.lyric_encoder.encoders, ERG_LYRIC_BLOCKS)]
        with scaled_outputs(queries, ERG_TEMPERATURE):
            null_condition, _ = transformer.encode(null_states if null_states is not None else torch.zeros_like(states),
                                                   text_mask, torch.zeros_like(speaker), lyric_ids, lyric_mask)
    else:
        null_condition, _ = transformer.encode(torch.zeros_like(states), text_mask, torch.zeros_like(speaker),
                                               torch.zeros_like(lyric_ids), lyric_mask)
    dit_queries = []
    if settings.erg_diffusion:
        for block in _existing(transformer.transformer_blocks, ERG_DIT_BLOCKS):
            dit_queries += [block.attn.to_q, block.cross_attn.to_q]

    sigmas = sampling_sigmas(settings.steps, settings.shift).to(device)
    generator = torch.Generator("cpu").manual_seed(int(seed))
    latents = torch.randn((1, 8, 16, frames), generator=generator, dtype=torch.float32).to(device, dtype)
    frame_mask = torch.ones(1, frames, device=device, dtype=dtype)
    start = int(settings.steps * ((1 - settings.guidance_interval) / 2))
    end = int(settings.steps * (settings.guidance_interval / 2 + 0.5))
    guided = settings.guidance not in (0.0, 1.0)
    running = [0]
    omega = omega_scale(settings.omega)

    def velocity(encoder_states, timestep, queries=()):
        with scaled_outputs(queries, ERG_TEMPERATURE):
            return transformer.decode(hidden_states=latents, attention_mask=frame_mask, encoder_hidden_states=encoder_states,
                                      encoder_hidden_mask=condition_mask, output_length=frames, timestep=timestep).sample

    for i in range(settings.steps):
        timestep = (sigmas[i] * 1000).expand(1).to(dtype)
        prediction = velocity(condition, timestep)
        if guided and start <= i < end:
            scale = settings.guidance
            if settings.guidance_interval_decay > 0:
                progress = (i - start) / max(end - start - 1, 1)
                scale -= (settings.guidance - settings.min_guidance) * progress * settings.guidance_interval_decay
            unconditional = velocity(null_condition, timestep, dit_queries)
            prediction = apg(prediction, unconditional, scale, running)
        step = (sigmas[i + 1] - sigmas[i]) * prediction.float()
        mean = step.mean()
        latents = (latents.float() + (step - mean) * omega + mean).to(prediction.dtype)
    return latents


@torch.no_grad()
def render(operations: V1Operations, request: RenderRequest, lyrics_vocab=None,
           settings: SamplerSettings | None = None) -> torch.Tensor:
    """``request`` rendered and decoded through the vocoder: ``[2, n]`` float at 48 kHz."""
    if request.task != "text2music":
        raise NotImplementedError(f"ACE-Step v1 renders text2music only, not {request.task}")
    from ...errors import UserError
    from .lyrics import find_lyrics_vocab

    settings = settings or SamplerSettings()
    changes = {k: v for k, v in (("steps", request.steps), ("guidance", request.guidance), ("shift", request.shift))
               if v is not None}
    settings = SamplerSettings(**{**vars(settings), **changes})
    if settings.steps < 1:
        raise UserError("steps must be at least 1")
    record = request.record
    lyrics = record.lyrics or ""
    lyric_ids, lyric_mask = lyric_tensors(lyrics, find_lyrics_vocab(lyrics_vocab) if lyrics else None)
    # whole frames covering the request (upstream floors, so its audio falls short of the duration)
    frames = max(math.ceil(request.duration * LATENT_RATE), 1)
    latents = sample_latents(operations, record.caption, lyric_ids, lyric_mask, frames, request.seed, settings)
    (dcae,) = operations._require("dcae")
    _, waves = dcae.decode(latents.float(), sr=SAMPLE_RATE)
    audio = waves[0].float().cpu()
    return audio[..., : int(round(request.duration * SAMPLE_RATE))]
