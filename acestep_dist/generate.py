"""`acedist generate`: render a prompt with a model and optionally a LoRA in any of its three formats.

The pipeline is diffusers' ``AceStepPipeline`` (via the family), noise from
``torch.Generator("cpu").manual_seed(seed)`` and diffusers' post-processing, so the same model,
LoRA, inputs and seed give the same audio here and in diffusers.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from .audio import decode_window, write_audio
from .errors import UserError
from .families.ace_step_15 import AceStep15
from .families.ace_step_15.lora_formats import LoraWeights, check_fits, read_lora, write_diffusers
from .records import Record

ADAPTER = "acedist"


@dataclass
class GenerateRequest:
    prompt: str
    lyrics: str | None = None
    duration: float = 30.0
    bpm: int | None = None
    keyscale: str | None = None
    timesignature: str | None = None
    language: str | None = None
    steps: int | None = None
    guidance: float | None = None
    shift: float | None = None
    seed: int = 0
    src_audio: str | None = None
    repaint: tuple[float, float] | None = None
    cover_strength: float = 1.0


def load_lora_into(pipe, family: AceStep15, path: str, scale: float = 1.0) -> LoraWeights:
    """Any of the three formats, through diffusers' own ``load_lora_weights`` (alpha kept)."""
    weights = read_lora(path)
    check_fits(weights, family.components.transformer, family.variant.name, path)
    with tempfile.TemporaryDirectory() as folder:
        pipe.load_lora_weights(str(write_diffusers(weights, folder)), adapter_name=ADAPTER)
    pipe.set_adapters([ADAPTER], [scale])
    return weights


def generate(model: str, request: GenerateRequest, out: str | Path, lora: str | None = None,
             lora_scale: float = 1.0, log=print) -> Path:
    out = Path(out)
    if out.suffix.lower() not in (".wav", ".flac"):
        raise UserError(f"--out {out}: write a .wav or .flac file")
    if request.duration <= 0:
        raise UserError("--duration must be positive")
    family = AceStep15.load(model)
    pipe = family.pipeline()
    if lora:
        weights = load_lora_into(pipe, family, lora, lora_scale)
        log(f"generate: LoRA {lora} (rank {weights.rank}, alpha {weights.alpha:g}) at scale {lora_scale:g}")
    extra: dict = {}
    if request.src_audio:
        try:
            window = decode_window(request.src_audio, 0.0, None, family.sample_rate)
        except Exception as error:
            raise UserError(f"--src-audio {request.src_audio}: {error}") from None
        extra["src_audio"] = torch.from_numpy(window.wave.copy())
        if request.repaint:
            start, end = request.repaint
            extra.update(task_type="repaint", repainting_start=start, repainting_end=end)
        else:
            extra.update(task_type="cover", audio_cover_strength=request.cover_strength)
    elif request.repaint:
        raise UserError("--repaint needs --src-audio (the audio to repaint)")
    record = Record(key="generate", audio="", caption=request.prompt, lyrics=request.lyrics, bpm=request.bpm,
                    keyscale=request.keyscale, timesignature=request.timesignature, language=request.language,
                    duration=request.duration)
    try:
        audio = family.generate(record, duration=request.duration, seed=request.seed, steps=request.steps,
                                guidance=request.guidance, shift=request.shift, pipeline=pipe, **extra)
    except (ValueError, RuntimeError) as error:
        task = extra.get("task_type", "text2music")
        raise UserError(f"{task} with this model failed in diffusers' AceStepPipeline: {error}") from None
    # the DiT works in whole latent frames (1920 samples); the file gets exactly the asked duration
    audio = audio[..., : int(round(request.duration * family.sample_rate))]
    write_audio(out, audio[0].numpy(), family.sample_rate)
    log(f"generate: wrote {out} ({audio.shape[-1] / family.sample_rate:.2f} s, {family.sample_rate} Hz, seed {request.seed})")
    return out
