"""`acedist generate`: render a prompt with a model (any registered family) and optionally a LoRA.

This module checks what can be checked from config files before any weights load (output file,
duration, task, source audio range, the LoRA's family), decodes the source audio at the model's
rate, and writes the file; the family renders (``FamilyModel.generate``). ACE-Step 1.5 renders
through diffusers' ``AceStepPipeline``, so the same model, LoRA, inputs and seed give the same
audio here and in diffusers.

Repaint and cover keep the source's length, as upstream ACE-Step 1.5 and diffusers do: the output
is as long as the source, and the prompt's metas line gives the source's duration.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .audio import decode_window, write_audio
from .errors import UserError
from .families import Family, RenderRequest, open_model
from .records import Record

TEXT2MUSIC_DURATION = 30.0  # seconds, when --duration is not given and there is no source
# The source is decoded at this rate before the model is even opened, so a range that does not fit
# fails first; again at the model's own rate when that differs. A length in seconds does not
# depend on the rate.
CHECK_RATE = 48000
# a --duration given with --src-audio must name the source's length to within this
DURATION_TOLERANCE = 0.05


@dataclass
class GenerateRequest:
    """What ``acedist generate`` was asked: the record to render (caption, lyrics, bpm, ...) and how."""

    record: Record
    duration: float | None = None  # seconds; text2music: 30 when None; repaint / cover: the source's length
    steps: int | None = None
    guidance: float | None = None
    shift: float | None = None
    seed: int = 0
    src_audio: str | None = None
    repaint: tuple[float, float] | None = None
    cover_strength: float = 1.0
    task: str | None = None  # default: repaint with --repaint, cover with --src-audio alone, else text2music
    options: dict = field(default_factory=dict)  # family-specific render settings (ACE-Step v1: lyrics_vocab)

    @classmethod
    def text(cls, prompt: str, lyrics: str | None = None, bpm: int | None = None, keyscale: str | None = None,
             timesignature: str | None = None, language: str | None = None, **settings) -> "GenerateRequest":
        """A request from the prompt's texts (what the command line takes)."""
        record = Record(key="generate", caption=prompt, lyrics=lyrics, bpm=bpm, keyscale=keyscale,
                        timesignature=timesignature, language=language)
        return cls(record, **settings)

    @property
    def chosen_task(self) -> str:
        if self.task:
            return self.task
        if self.src_audio:
            return "repaint" if self.repaint else "cover"
        return "text2music"


def _check_duration(duration: float | None, family: Family) -> None:
    if duration is None:
        return
    limit = family.max_generate_seconds
    if not math.isfinite(duration) or duration <= 0:
        raise UserError(f"--duration {duration:g}: give a number of seconds above 0"
                        + (f" and at most {limit:g}" if limit else ""))
    if limit and duration > limit:
        raise UserError(f"--duration {duration:g}: {family.title} generates at most {limit:g} s "
                        f"({limit / 60:g} minutes)")


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


def _check_task(request: GenerateRequest, family: Family) -> str:
    task = request.chosen_task
    if task not in family.tasks:
        raise UserError(f"{family.name} cannot {task}; its tasks: {', '.join(family.tasks)}")
    if task in ("repaint", "cover") and not request.src_audio:
        raise UserError(f"{task} needs --src-audio")
    if task == "repaint" and not request.repaint:
        raise UserError("repaint needs --repaint START END")
    if task == "text2music" and request.src_audio:
        raise UserError("text2music takes no --src-audio")
    return task


def _check_lora(family: Family, lora: str) -> None:
    """A LoRA another family or variant trained is refused before the model loads."""
    provenance = family.lora_info(lora).get("provenance") or {}
    other = provenance.get("family")
    if other and other != family.name:
        raise UserError(f"LoRA {lora} was trained on the model family {other!r}, the model is {family.name!r}; "
                        f"use a model of its family")


def generate(model: str, request: GenerateRequest, out: str | Path, lora: str | None = None,
             lora_scale: float = 1.0, log=print) -> Path:
    out = Path(out)
    if out.suffix.lower() not in (".wav", ".flac"):
        raise UserError(f"--out {out}: write a .wav or .flac file")
    if request.repaint and not request.src_audio:
        raise UserError("--repaint needs --src-audio (the audio to repaint)")
    source = None
    if request.src_audio:
        source = _read_source(request.src_audio, CHECK_RATE)
        _check_against_source(request, source.shape[-1] / CHECK_RATE)
    family, description = open_model(model)  # config files only: every check below runs before weights load
    _check_duration(request.duration, family)
    task = _check_task(request, family)
    rate = description.sample_rate
    if source is not None and rate != CHECK_RATE:
        source = _read_source(request.src_audio, rate)
    if lora:
        _check_lora(family, lora)  # a bad LoRA fails before the model loads
    if source is not None:
        samples = source.shape[-1]
        duration = samples / rate  # the metas line says the source's length, as upstream's does
    else:
        duration = TEXT2MUSIC_DURATION if request.duration is None else request.duration
        samples = int(round(duration * rate))
    loaded = family.load(description, "generate")
    render = RenderRequest(request.record.with_(duration=duration), duration, task=task, seed=request.seed,
                           steps=request.steps, guidance=request.guidance, shift=request.shift,
                           source_audio=source, repaint=request.repaint, cover_strength=request.cover_strength,
                           options=dict(request.options))
    audio = loaded.generate(render, lora=lora, lora_scale=lora_scale, log=log)
    # the model works in whole latent frames; the file gets exactly the asked (or the source's) length
    audio = audio[..., :samples]
    write_audio(out, audio.numpy(), rate)
    log(f"generate: wrote {out} ({audio.shape[-1] / rate:.2f} s, {rate} Hz, seed {request.seed})")
    return out
