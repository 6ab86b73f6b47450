"""`acedist generate`: render a prompt with a model and optionally a LoRA in any of its three formats.

The pipeline is diffusers' ``AceStepPipeline`` (via the family), noise from
``torch.Generator("cpu").manual_seed(seed)`` and diffusers' post-processing, so the same model,
LoRA, inputs and seed give the same audio here and in diffusers.

Repaint and cover keep the source's length, as upstream ACE-Step 1.5 and diffusers do: the latent
length comes from the encoded source, and the prompt's metas line gives the source's duration
(upstream's ``prepare_batch_data`` takes it from the source audio; diffusers' pipeline uses
``audio_duration`` for the metas when one is passed, so we pass the source's).
"""

from __future__ import annotations

import math
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
TEXT2MUSIC_DURATION = 30.0  # seconds, when --duration is not given and there is no source
# ACE-Step 1.5 runs at 48 kHz; the source is decoded at this rate before the model loads (so bad
# ranges fail fast) and again at the model's own rate should that ever differ.
SOURCE_RATE = 48000
# a --duration given with --src-audio must name the source's length to within this
DURATION_TOLERANCE = 0.05
# ACE-Step 1.5 generates up to 10 minutes: upstream's acestep/constants.py has DURATION_MAX = 600
# (github.com/ace-step/ACE-Step-1.5), diffusers' AceStepPipeline docs say "from 10 seconds to 10
# minutes". Beyond it the model was never trained, and the latents alone outgrow any memory
# (100000 s would ask for terabytes). Upstream's DURATION_MIN = 10 is a quality floor, not a limit
# of the model: shorter renders work and keep tests and demos quick, so it is not enforced.
MAX_DURATION = 600.0


@dataclass
class GenerateRequest:
    prompt: str
    lyrics: str | None = None
    duration: float | None = None  # seconds; text2music: 30 when None; repaint / cover: the source's length
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


def load_lora_into(pipe, family: AceStep15, path: str, scale: float = 1.0,
                   weights: LoraWeights | None = None) -> LoraWeights:
    """Any of the three formats, through diffusers' own ``load_lora_weights`` (alpha kept);
    ``weights`` is ``read_lora(path)`` when the caller has read it already."""
    weights = weights if weights is not None else read_lora(path)
    check_fits(weights, family.components.transformer, family.variant.name, path)
    with tempfile.TemporaryDirectory() as folder:
        pipe.load_lora_weights(str(write_diffusers(weights, folder)), adapter_name=ADAPTER)
    pipe.set_adapters([ADAPTER], [scale])
    return weights


def _check_duration(duration: float | None) -> None:
    if duration is None:
        return
    if not math.isfinite(duration) or duration <= 0:
        raise UserError(f"--duration {duration:g}: give a number of seconds above 0 and at most {MAX_DURATION:g}")
    if duration > MAX_DURATION:
        raise UserError(f"--duration {duration:g}: ACE-Step 1.5 generates at most {MAX_DURATION:g} s (10 minutes)")


def _read_source(path: str, rate: int) -> torch.Tensor:
    try:
        window = decode_window(path, 0.0, None, rate)
    except Exception as error:
        raise UserError(f"--src-audio {path}: {error}") from None
    if window.wave.shape[-1] == 0:
        raise UserError(f"--src-audio {path}: no audio decoded")
    return torch.from_numpy(window.wave.copy())


def _check_against_source(request: GenerateRequest, seconds: float) -> None:
    """Repaint and cover render the whole source: a --duration or a --repaint range that does not
    fit it is refused rather than cut (upstream would outpaint past the ends; diffusers' pipeline
    clamps the range to the source, so the asked span would silently change)."""
    where = f"--src-audio {request.src_audio} ({seconds:.2f} s)"
    if request.duration is not None and abs(request.duration - seconds) > DURATION_TOLERANCE:
        raise UserError(f"--duration {request.duration:g} does not fit {where}: repaint and cover keep the "
                        f"source's length; leave --duration out")
    if request.repaint:
        start, end = request.repaint
        if not (0.0 <= start < end <= seconds):
            raise UserError(f"--repaint {start:g} {end:g} does not fit {where}: "
                            f"need 0 <= START < END <= {seconds:.2f}")


def generate(model: str, request: GenerateRequest, out: str | Path, lora: str | None = None,
             lora_scale: float = 1.0, log=print) -> Path:
    out = Path(out)
    if out.suffix.lower() not in (".wav", ".flac"):
        raise UserError(f"--out {out}: write a .wav or .flac file")
    _check_duration(request.duration)
    if request.repaint and not request.src_audio:
        raise UserError("--repaint needs --src-audio (the audio to repaint)")
    source = None
    if request.src_audio:
        source = _read_source(request.src_audio, SOURCE_RATE)
        _check_against_source(request, source.shape[-1] / SOURCE_RATE)
    weights = read_lora(lora) if lora else None  # a bad LoRA fails before the model loads
    family = AceStep15.load(model)
    pipe = family.pipeline()
    if weights is not None:
        load_lora_into(pipe, family, lora, lora_scale, weights)
        log(f"generate: LoRA {lora} (rank {weights.rank}, alpha {weights.alpha:g}) at scale {lora_scale:g}")
    rate = family.sample_rate
    extra: dict = {}
    if source is not None:
        if rate != SOURCE_RATE:
            source = _read_source(request.src_audio, rate)
        samples = source.shape[-1]
        duration = samples / rate  # the metas line says the source's length, as upstream's does
        # The VAE encodes whole latent frames only (floor): pad the source with silence to the next
        # whole frame so the output covers all of it, then trim the output back to the source's length.
        hop = family.hop_length
        extra["src_audio"] = torch.nn.functional.pad(source, (0, -samples % hop))
        if request.repaint:
            start, end = request.repaint
            extra.update(task_type="repaint", repainting_start=start, repainting_end=end)
        else:
            extra.update(task_type="cover", audio_cover_strength=request.cover_strength)
    else:
        duration = TEXT2MUSIC_DURATION if request.duration is None else request.duration
        samples = int(round(duration * rate))
    record = Record(key="generate", audio="", caption=request.prompt, lyrics=request.lyrics, bpm=request.bpm,
                    keyscale=request.keyscale, timesignature=request.timesignature, language=request.language,
                    duration=duration)
    try:
        audio = family.generate(record, duration=duration, seed=request.seed, steps=request.steps,
                                guidance=request.guidance, shift=request.shift, pipeline=pipe, **extra)
    except (ValueError, RuntimeError) as error:
        task = extra.get("task_type", "text2music")
        raise UserError(f"{task} with this model failed in diffusers' AceStepPipeline: {error}") from None
    # the DiT works in whole latent frames; the file gets exactly the asked (or the source's) length
    audio = audio[..., :samples]
    write_audio(out, audio[0].numpy(), rate)
    log(f"generate: wrote {out} ({audio.shape[-1] / rate:.2f} s, {rate} Hz, seed {request.seed})")
    return out
