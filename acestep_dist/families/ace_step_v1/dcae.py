"""ACE-Step v1's music DCAE: stereo 48 kHz audio <-> latents ``[B, 8, 16, frames]`` at ~10.77 frames/s.

Encode: resample to 44.1 kHz, zero-pad to a multiple of 4096 samples, take the vocoder's log-mel
(2 channels x 128 mels, one frame per 512 samples), map ``[-11, 3]`` to ``[-1, 1]``, run the
``AutoencoderDC`` encoder (8x down in both axes) and scale with ``(z + 1.9091) * 0.1786``.
Decode inverts the scaling, runs the DCAE decoder and the vocoder per channel, and resamples
44.1 kHz -> ``sr``. Semantics and return values are upstream's ``MusicDCAE`` (ACE-Step d612523).

Upstream's dataset, not this class, pads clips shorter than 3 s and cuts them at 240 s:
:func:`upstream_training_audio` does that part.
"""

from __future__ import annotations

import os
from typing import Sequence

import torch
from torch import Tensor, nn

from .resample import Resample, resample, resampled_length
from .vocoder import ADaMoSHiFiGANV1

SAMPLE_RATE = 48000  # what upstream trains and generates at
MODEL_SAMPLE_RATE = 44100  # the vocoder's mel front end
HOP_LENGTH = 512  # samples per mel frame at 44.1 kHz
TIME_DOWNSAMPLE = 8  # mel frames per latent frame
SAMPLES_PER_LATENT = HOP_LENGTH * TIME_DOWNSAMPLE  # 4096 at 44.1 kHz
LATENT_FPS = MODEL_SAMPLE_RATE / SAMPLES_PER_LATENT  # ~10.7666 latent frames per second
MEL_FPS = MODEL_SAMPLE_RATE / HOP_LENGTH  # ~86.13
LATENT_CHANNELS = 8
LATENT_HEIGHT = 16  # 128 mels / 8
MEL_BINS = 128
AUDIO_CHANNELS = 2

MEL_MIN = -11.0  # log-mel range mapped onto [0, 1] ...
MEL_MAX = 3.0
MEL_NORM_MEAN = 0.5  # ... then onto [-1, 1]
MEL_NORM_STD = 0.5
LATENT_SHIFT = -1.9091  # latents = (z - LATENT_SHIFT) * LATENT_SCALE
LATENT_SCALE = 0.1786

MIN_TRAIN_SECONDS = 3  # upstream's dataset zero-pads shorter clips to this
MAX_TRAIN_SECONDS = 240  # and cuts longer ones


def latent_lengths_for(audio_lengths: Tensor | Sequence[int] | int, sr: int = SAMPLE_RATE) -> Tensor:
    """Valid latent frames for ``audio_lengths`` samples at ``sr``: floor(len / sr * 44100 / 4096).

    The same float32 arithmetic as upstream, so boundary cases round identically. The latent
    tensor itself has ``ceil(resampled_len / 4096)`` frames, usually one more."""
    lengths = torch.as_tensor(audio_lengths)
    return (lengths / sr * MODEL_SAMPLE_RATE / HOP_LENGTH / TIME_DOWNSAMPLE).long()


def latent_frames_for(n_samples: int, sr: int = SAMPLE_RATE) -> int:
    """Frames of the latent ``encode`` returns for ``n_samples`` samples at ``sr``."""
    resampled = resampled_length(n_samples, sr, MODEL_SAMPLE_RATE) if sr != MODEL_SAMPLE_RATE else n_samples
    return -(-resampled // SAMPLES_PER_LATENT)


def decoded_length_for(latent_frames: int, sr: int = SAMPLE_RATE) -> int:
    """Samples per channel ``decode`` returns for ``latent_frames`` frames (no ``audio_lengths``)."""
    n = latent_frames * SAMPLES_PER_LATENT
    return resampled_length(n, MODEL_SAMPLE_RATE, sr) if sr != MODEL_SAMPLE_RATE else n


def upstream_training_audio(audio: Tensor) -> Tensor:
    """What upstream's dataset feeds the encoder for a 48 kHz ``[channels, time]`` clip: mono
    duplicated, first two channels, clamped to [-1, 1], zero-padded to 3 s, cut at 240 s."""
    if audio.ndim != 2:
        raise ValueError(f"expected [channels, time], got {tuple(audio.shape)}")
    if audio.shape[0] == 1:
        audio = audio.repeat(2, 1)
    audio = audio[:2].clamp(-1.0, 1.0)
    minimum = MIN_TRAIN_SECONDS * SAMPLE_RATE
    if audio.shape[-1] < minimum:
        audio = nn.functional.pad(audio, (0, minimum - audio.shape[-1]))
    return audio[:, :MAX_TRAIN_SECONDS * SAMPLE_RATE]


class MusicDCAE(nn.Module):
    """The DCAE (``diffusers.AutoencoderDC``) plus the vocoder, with upstream's encode / decode.

    Build from checkpoint folders (upstream's signature, by keyword) or from loaded modules::

        MusicDCAE(dcae_checkpoint_path="music_dcae_f8c8", vocoder_checkpoint_path="music_vocoder")
        MusicDCAE.from_modules(dcae, vocoder)
    """

    def __init__(self, source_sample_rate: int | None = None,
                 dcae_checkpoint_path: str | os.PathLike | None = None,
                 vocoder_checkpoint_path: str | os.PathLike | None = None, *,
                 dcae: nn.Module | None = None, vocoder: ADaMoSHiFiGANV1 | None = None):
        super().__init__()
        if source_sample_rate is not None and not isinstance(source_sample_rate, int):
            raise TypeError("MusicDCAE's first argument is source_sample_rate (upstream's order); "
                            "pass the checkpoint folders by keyword")
        if dcae is None:
            if dcae_checkpoint_path is None:
                raise ValueError("give dcae_checkpoint_path or a loaded dcae")
            from diffusers import AutoencoderDC

            dcae = AutoencoderDC.from_pretrained(str(dcae_checkpoint_path))
        if vocoder is None:
            if vocoder_checkpoint_path is None:
                raise ValueError("give vocoder_checkpoint_path or a loaded vocoder")
            vocoder = ADaMoSHiFiGANV1.from_pretrained(str(vocoder_checkpoint_path))
        self.dcae = dcae
        self.vocoder = vocoder
        self.source_sample_rate = source_sample_rate or SAMPLE_RATE
        self.resampler = Resample(self.source_sample_rate, MODEL_SAMPLE_RATE)
        # upstream's attribute names, for code written against its MusicDCAE
        self.min_mel_value = MEL_MIN
        self.max_mel_value = MEL_MAX
        self.audio_chunk_size = int(round(1024 * HOP_LENGTH / MODEL_SAMPLE_RATE * SAMPLE_RATE))
        self.mel_chunk_size = 1024
        self.time_dimention_multiple = TIME_DOWNSAMPLE
        self.latent_chunk_size = self.mel_chunk_size // self.time_dimention_multiple
        self.scale_factor = LATENT_SCALE
        self.shift_factor = LATENT_SHIFT

    @classmethod
    def from_modules(cls, dcae: nn.Module, vocoder: ADaMoSHiFiGANV1,
                     source_sample_rate: int | None = None) -> "MusicDCAE":
        return cls(source_sample_rate, dcae=dcae, vocoder=vocoder)

    @property
    def device(self) -> torch.device:
        return next(self.dcae.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.dcae.parameters()).dtype

    # --- pieces ----------------------------------------------------------------------------------

    def forward_mel(self, audios: Tensor) -> Tensor:
        """44.1 kHz ``[B, 2, T]`` -> float32 log-mel ``[B, 2, 128, T / 512]``, one item at a time
        (as upstream: the STFT buffers of a long clip are large)."""
        return torch.stack([self.vocoder.mel_transform(audio) for audio in audios])

    @staticmethod
    def normalize_mel(mel: Tensor) -> Tensor:
        mel = (mel - MEL_MIN) / (MEL_MAX - MEL_MIN)
        return (mel - MEL_NORM_MEAN) / MEL_NORM_STD

    @staticmethod
    def denormalize_mel(mel: Tensor) -> Tensor:
        mel = mel * MEL_NORM_STD + MEL_NORM_MEAN
        return mel * (MEL_MAX - MEL_MIN) + MEL_MIN

    @staticmethod
    def scale_latents(z: Tensor) -> Tensor:
        return (z - LATENT_SHIFT) * LATENT_SCALE

    @staticmethod
    def unscale_latents(latents: Tensor) -> Tensor:
        return latents / LATENT_SCALE + LATENT_SHIFT

    def to_model_rate(self, audios: Tensor, sr: int | None = None) -> Tensor:
        """Resample to 44.1 kHz in float32 (``sr`` None: the constructor's source rate)."""
        # the shared float32 kernel, not self.resampler's buffer: a .to(bfloat16) of the whole
        # module would have rounded that one
        return resample(audios.float(), self.source_sample_rate if sr is None else sr, MODEL_SAMPLE_RATE)

    # --- upstream's API --------------------------------------------------------------------------

    @torch.no_grad()
    def encode(self, audios: Tensor, audio_lengths: Tensor | Sequence[int] | None = None,
               sr: int | None = None) -> tuple[Tensor, Tensor]:
        """Stereo ``[B, 2, T]`` at ``sr`` (default: the source rate, 48 kHz) -> ``(latents
        [B, 8, 16, F], latent_lengths [B] int64)`` with ``F = ceil(T44 / 4096)`` and
        ``latent_lengths = floor(audio_lengths / sr * 44100 / 4096)``.

        The resampler and mel run in float32; the encoder in the DCAE's dtype; latents come back
        in that dtype. ``audio_lengths`` (samples at ``sr``, default ``T``) only sets the lengths:
        the padding inside the batch is encoded like the rest (as upstream)."""
        if audios.ndim != 3 or audios.shape[1] != AUDIO_CHANNELS:
            raise ValueError(f"expected stereo audios [batch, 2, time], got {tuple(audios.shape)}")
        if audio_lengths is None:
            audio_lengths = torch.full((audios.shape[0],), audios.shape[2], device=audios.device)
        lengths_sr = self.source_sample_rate if sr is None else sr
        audio = self.to_model_rate(audios, sr)
        remainder = audio.shape[-1] % SAMPLES_PER_LATENT
        if remainder:
            audio = nn.functional.pad(audio, (0, SAMPLES_PER_LATENT - remainder))
        mels = self.normalize_mel(self.forward_mel(audio))
        dtype = self.dtype
        # one item per call, as upstream: batching changes the kernels' summation order
        z = torch.cat([self.dcae.encoder(mel[None].to(dtype)) for mel in mels])
        latent_lengths = latent_lengths_for(torch.as_tensor(audio_lengths, device=audios.device), lengths_sr)
        return self.scale_latents(z), latent_lengths

    @torch.no_grad()
    def decode(self, latents: Tensor, audio_lengths: Tensor | Sequence[int] | None = None,
               sr: int | None = None) -> tuple[int, list[Tensor]]:
        """Latents ``[B, 8, 16, F]`` -> ``(sr, [wav [2, N] float32 on CPU per item])``.

        ``sr`` None returns 44.1 kHz (``N = F * 4096``); otherwise resampled to ``sr``
        (``N = ceil(F * 4096 * sr / 44100)``). ``audio_lengths`` (samples at the output rate)
        truncates each item."""
        out_sr = MODEL_SAMPLE_RATE if sr is None else int(sr)
        z_all = self.unscale_latents(latents)
        dtype = self.dtype
        wavs = []
        for z in z_all:
            mel = self.denormalize_mel(self.dcae.decoder(z[None].to(dtype)))
            # one channel at a time keeps the vocoder's activations at half the size
            wav = torch.cat([self.vocoder.decode(mel[:, c]).squeeze(1) for c in range(mel.shape[1])])
            wav = wav.float()
            if out_sr != MODEL_SAMPLE_RATE:
                wav = resample(wav, MODEL_SAMPLE_RATE, out_sr)
            wavs.append(wav.cpu())
        if audio_lengths is not None:
            wavs = [wav[:, :int(n)] for wav, n in zip(wavs, audio_lengths)]
        return out_sr, wavs

    def forward(self, audios: Tensor, audio_lengths: Tensor | Sequence[int] | None = None,
                sr: int | None = None) -> tuple[int, list[Tensor], Tensor, Tensor]:
        """Round trip, as upstream: ``(sr, wavs, latents, latent_lengths)``."""
        latents, latent_lengths = self.encode(audios, audio_lengths, sr)
        out_sr, wavs = self.decode(latents, audio_lengths, sr)
        return out_sr, wavs, latents, latent_lengths
