"""One song analysed: decoded once at its own rate, checked, estimated and fingerprinted.

What a Ray task runs per source row (``pipelines/annotate.py``); the result is a plain dict, so it
travels back to the driver as it is. A file that cannot be analysed comes back with the reason.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from ..audio import AudioError, decode_window, probe_audio
from ..records import Record
from .estimators import ANALYSIS_RATE, estimate_language, estimate_music
from .fingerprint import ANALYSIS_RATE as PRINT_RATE
from .fingerprint import fingerprint
from .quality import check_quality

MAX_SECONDS = 600.0  # the first ten minutes: enough for every estimate, bounded memory per task


def _resample(mono: np.ndarray, rate: int, target: int) -> np.ndarray:
    import soxr

    return mono if rate == target else soxr.resample(mono, rate, target, quality="HQ").astype(np.float32)


def analyse_wave(wave: np.ndarray, sample_rate: int, lyrics: str | None) -> dict[str, Any]:
    """Quality checks, estimates and fingerprint of one decoded song ``[C, n]``."""
    quality = check_quality(wave, sample_rate, lyrics)
    mono = np.atleast_2d(wave).mean(axis=0).astype(np.float32)
    analysis = _resample(mono, sample_rate, ANALYSIS_RATE)
    estimates = {name: estimate.to_dict() for name, estimate in estimate_music(analysis, ANALYSIS_RATE).items()}
    estimates["language"] = estimate_language(lyrics).to_dict()
    prints = fingerprint(_resample(analysis, ANALYSIS_RATE, PRINT_RATE))
    return {"seconds": round(quality.seconds, 3), "quality": quality.to_dict(), "estimates": estimates,
            "fingerprint": prints.to_dict()}


def fill_missing(record: Record, wave: np.ndarray, sample_rate: int) -> Record:
    """``record`` with the bpm, keyscale, timesignature and language it lacks estimated from ``wave``
    ``[C, n]`` (and its lyrics); ``extra["estimated"]`` maps each filled field to its confidence.
    Given values are never touched; a field no estimate fits stays empty."""
    missing = [name for name in ("bpm", "keyscale", "timesignature") if getattr(record, name) is None]
    found = {}
    if missing:
        mono = _resample(np.atleast_2d(wave).mean(axis=0).astype(np.float32), sample_rate, ANALYSIS_RATE)
        found = {name: estimate for name, estimate in estimate_music(mono, ANALYSIS_RATE).items() if name in missing}
    if record.language is None:
        found["language"] = estimate_language(record.lyrics)
    found = {name: estimate for name, estimate in found.items() if estimate.value is not None}
    if not found:
        return record
    estimated = {name: round(float(estimate.confidence), 3) for name, estimate in found.items()}
    return record.with_(**{name: estimate.value for name, estimate in found.items()},
                        extra={**record.extra, "estimated": estimated})


def analyse_row(row: dict[str, Any]) -> dict[str, Any]:
    """``{"key", "record"}`` -> the row with ``analysis`` (or ``error``: why it was not analysed)."""
    record = Record.from_dict(json.loads(row["record"]))
    try:
        info = probe_audio(record.audio)
        window = decode_window(record.audio, 0.0, MAX_SECONDS, info.sample_rate)
        if window.wave.shape[1] == 0:
            raise AudioError("no audio decodes")
        analysis = analyse_wave(window.wave, window.sample_rate, record.lyrics)
        analysis["warnings"] = list(info.warnings) + list(window.warnings)
        return {**row, "analysis": json.dumps(analysis)}
    except AudioError as error:
        return {**row, "error": str(error)}
    except Exception as error:  # one file's failure must cost that file only
        return {**row, "error": f"{type(error).__name__}: {error}"}
