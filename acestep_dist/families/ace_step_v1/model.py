"""ACE-Step v1's operations on loaded parts: what prep encodes, how a batch is padded, the training
loss as upstream's trainer computes it, and rendering.

Data flow: audio -> ``encode_audio`` (DCAE latent) and records -> ``encode_text`` (UMT5 states,
lyric ids) at prep time; ``collate`` and ``training_loss`` in the training loop; ``generate`` for
validation and ``acedist generate``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from ...records import Record
from .loading import V1Components

SAMPLE_RATE = 48000
CAPTION_MAX_CHARS = 256  # upstream's dataset cuts the prompt to 256 characters
TRAIN_TIMESTEPS = 1000
SPEAKER_DIM_DEFAULT = 512


@dataclass
class V1Batch:
    """Padded tensors of B samples; the masks say which frames / tokens are real."""

    latents: torch.Tensor  # [B, 8, 16, T]
    frame_mask: torch.Tensor  # [B, T] bool
    text_states: torch.Tensor  # [B, Lt, D]
    text_mask: torch.Tensor  # [B, Lt] bool
    lyric_ids: torch.Tensor  # [B, Ll] int64
    lyric_mask: torch.Tensor  # [B, Ll] bool
    # upstream's SSL targets, by schema tensor name (``mert_states``, ``mhubert_states``): per
    # sample its states [F_i, d] (float32), or None for a sample without them; a kind no sample
    # of the batch carries is not listed
    ssl_states: dict[str, list[torch.Tensor | None]] = field(default_factory=dict)

    def to(self, device) -> "V1Batch":
        moved = {k: v.to(device) for k, v in vars(self).items() if isinstance(v, torch.Tensor)}
        ssl = {kind: [None if t is None else t.to(device) for t in states] for kind, states in self.ssl_states.items()}
        return V1Batch(**moved, ssl_states=ssl)


def pad_stack(tensors: Sequence[torch.Tensor], axis: int = 0, pad_value=0) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack tensors of different lengths along ``axis`` (padded at the end) and the length mask."""
    lengths = torch.tensor([t.shape[axis] for t in tensors])
    longest = int(lengths.max()) if len(tensors) else 0
    shape = list(tensors[0].shape)
    shape[axis] = longest
    out = tensors[0].new_full((len(tensors), *shape), pad_value)
    for i, t in enumerate(tensors):
        out[i].narrow(axis, 0, t.shape[axis]).copy_(t)
    return out, torch.arange(longest)[None, :] < lengths[:, None]


def caption_text(record: Record, caption: str | None = None) -> str:
    """The prompt as upstream's trainer feeds UMT5: the caption (tags), "music" when empty, cut to
    256 characters."""
    text = (record.caption if caption is None else caption).strip() or "music"
    return text[:CAPTION_MAX_CHARS]


def training_schedule(shift: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Upstream's training schedule (its FlowMatchEulerDiscreteScheduler(1000, shift)): float32
    ``sigmas`` and ``timesteps = sigmas * 1000``, index 0 the noisiest."""
    import numpy as np

    steps = torch.from_numpy(np.linspace(1.0, TRAIN_TIMESTEPS, TRAIN_TIMESTEPS, dtype=np.float32)[::-1].copy())
    sigmas = steps / TRAIN_TIMESTEPS
    sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
    return sigmas, sigmas * TRAIN_TIMESTEPS


class V1Operations:
    """Loaded v1 parts and what each stage does with them."""

    def __init__(self, components: V1Components):
        self.components = components

    def _require(self, *names: str):
        missing = [n for n in names if getattr(self.components, n) is None]
        if missing:
            raise RuntimeError(f"this ACE-Step v1 model was loaded without {', '.join(missing)}")
        return [getattr(self.components, n) for n in names]

    @property
    def speaker_dim(self) -> int:
        return int(self.components.transformer_config.get("speaker_embedding_dim", SPEAKER_DIM_DEFAULT))

    # ------------------------------------------------------------------- prep
    @torch.no_grad()
    def encode_audio(self, wave: torch.Tensor, ssl_models: dict | None = None) -> dict[str, torch.Tensor]:
        """``wave [2, n]`` at 48 kHz -> ``latent``: the DCAE latent ``[8, 16, T]`` (float32), prepared
        as upstream's dataset prepares audio (clamped, padded to 3 s, the first 240 s), alone: a
        clip's latent does not depend on what else is encoded. ``ssl_models`` (``ssl.SSLKind`` ->
        loaded model) add each kind's states ``[F, d]`` of that same audio, in bfloat16 (the stored
        dtype: a 240-s window's MERT states would be 74 MB in float32)."""
        from .dcae import upstream_training_audio
        from .ssl import hidden_states

        (dcae,) = self._require("dcae")
        if wave.dim() != 2 or wave.shape[0] != 2:
            raise ValueError(f"expected a [2, n] waveform, got {list(wave.shape)}")
        wave = upstream_training_audio(wave.float())
        device = next(dcae.parameters()).device
        latents, _ = dcae.encode(wave[None].to(device), sr=SAMPLE_RATE)
        encoded = {"latent": latents[0].float().cpu()}
        for kind, model in (ssl_models or {}).items():
            encoded[kind.tensor] = hidden_states(model, wave, kind).to(torch.bfloat16)
        return encoded

    @property
    def device(self) -> torch.device:
        part = next(p for p in (self.components.dcae, self.components.transformer, self.components.text_encoder)
                    if p is not None)
        return next(part.parameters()).device

    @torch.no_grad()
    def encode_captions(self, captions: Sequence[str], max_tokens: int) -> list[torch.Tensor]:
        """Per caption UMT5's ``last_hidden_state`` without padding ``[L_i, D]`` (float32).

        Captions of equal token length run together and others apart, so no row is ever padded:
        a row's states do not depend on what it was batched with."""
        from ..common import encode_unpadded

        text_encoder, tokenizer = self._require("text_encoder", "tokenizer")
        return encode_unpadded(text_encoder, tokenizer(list(captions), truncation=True, max_length=max_tokens).input_ids)

    # --------------------------------------------------------------- training
    @staticmethod
    def collate(samples: Sequence[dict]) -> V1Batch:
        """Pad per-sample ``latent [8, 16, T]``, ``text_states [L, D]``, ``lyric_ids [N]``; the SSL
        states a sample carries are passed per sample (float32, unpadded: their lengths differ).

        An empty ``lyric_ids`` is upstream's inference rule for no lyrics: one pad id, masked out."""
        from .ssl import KINDS

        latents, frame_mask = pad_stack([s["latent"].float() for s in samples], axis=2)
        text, text_mask = pad_stack([s["text_states"].float() for s in samples])
        lyrics = [s["lyric_ids"].long() for s in samples]
        empty = [len(ids) == 0 for ids in lyrics]
        lyric_ids, lyric_mask = pad_stack([ids if len(ids) else torch.zeros(1, dtype=torch.long) for ids in lyrics])
        for i, is_empty in enumerate(empty):
            if is_empty:
                lyric_mask[i] = False
        ssl = {kind.tensor: [None if s.get(kind.tensor) is None else s[kind.tensor].float() for s in samples]
               for kind in KINDS if any(s.get(kind.tensor) is not None for s in samples)}
        return V1Batch(latents, frame_mask, text, text_mask, lyric_ids, lyric_mask, ssl)
