"""Per-file quality checks: clipping, very low loudness, long digital silence inside a song, and
lyrics far too long for the audio. Each check measures; a file over a limit is flagged (a person
decides), never dropped.

The limits are stated conventions, not values fitted to any collection:

- clipping: an "over" is a run of 3 or more consecutive samples at full scale (the count CD
  mastering meters report); a file is flagged at one over per minute or more.
- loudness: ITU-R BS.1770-4 integrated loudness (``pyloudnorm``); flagged below -30 LUFS, 16 LU
  under the -14 LUFS that streaming services normalise to.
- digital silence: 2 s or more whose peak stays under -80 dBFS, not at the start or end.
- lyrics: more than 8 sung syllables per second of audio (fast rap peaks around 7).
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass, field

import numpy as np

CLIP_LEVEL = 1.0 - 2.0**-15  # full scale, to within one 16-bit step
CLIP_RUN = 3
CLIPS_PER_MINUTE = 1.0
LOW_LOUDNESS_LUFS = -30.0
SILENCE_DBFS = -80.0
SILENCE_SECONDS = 2.0
SYLLABLES_PER_SECOND = 8.0
_SILENCE_HOP_SECONDS = 0.01

# section markers ([verse], [chorus 2]) and bracketed performance notes are not sung
_SECTION = re.compile(r"\[[^\]]*\]")
_VOWELS = set("aeiouy") | set("аеёиоуыэюяіїєө") | set("αεηιουω")
# one syllable per character in these scripts: Han, kana, Hangul syllables
_SYLLABIC = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff]")


@dataclass
class QualityChecks:
    seconds: float
    loudness_lufs: float | None  # None: too short to measure (under 0.4 s)
    clip_overs: int
    silences: list[tuple[float, float]]  # (start, end) seconds of long digital silence inside the song
    syllables: int | None  # None: no lyrics
    flags: dict[str, str] = field(default_factory=dict)  # check -> why it is flagged

    def to_dict(self) -> dict:
        return {"loudness_lufs": None if self.loudness_lufs is None else round(self.loudness_lufs, 1),
                "clip_overs": self.clip_overs, "silences": [[round(a, 2), round(b, 2)] for a, b in self.silences],
                "syllables": self.syllables, "flags": dict(self.flags)}


def clip_overs(wave: np.ndarray) -> int:
    """Runs of ``CLIP_RUN`` or more consecutive samples at full scale, over all channels of ``[C, n]``."""
    total = 0
    for channel in np.atleast_2d(wave):
        edges = np.diff(np.concatenate(([0], (np.abs(channel) >= CLIP_LEVEL).astype(np.int8), [0])))
        starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
        total += int(np.count_nonzero(ends - starts >= CLIP_RUN))
    return total


def integrated_loudness(wave: np.ndarray, sample_rate: int) -> float | None:
    """BS.1770-4 integrated loudness of ``[C, n]`` in LUFS (-inf for digital silence)."""
    import pyloudnorm

    if wave.shape[-1] < int(0.4 * sample_rate):  # one gating block
        return None
    return float(pyloudnorm.Meter(sample_rate).integrated_loudness(np.atleast_2d(wave).T.astype(np.float64)))


def inner_silences(wave: np.ndarray, sample_rate: int) -> list[tuple[float, float]]:
    """Spans of ``SILENCE_SECONDS`` or more under ``SILENCE_DBFS`` (peak over 10 ms), leading and
    trailing silence excepted."""
    hop = max(1, int(_SILENCE_HOP_SECONDS * sample_rate))
    frames = np.atleast_2d(wave)[:, : wave.shape[-1] // hop * hop]
    if frames.shape[-1] == 0:
        return []
    peaks = np.abs(frames).reshape(frames.shape[0], -1, hop).max(axis=(0, 2))
    quiet = peaks < 10 ** (SILENCE_DBFS / 20)
    edges = np.diff(np.concatenate(([0], quiet.astype(np.int8), [0])))
    spans = []
    for start, end in zip(np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)):
        if start == 0 or end == quiet.size:
            continue  # before the music starts or after it ends
        if (end - start) * hop >= SILENCE_SECONDS * sample_rate:
            spans.append((start * hop / sample_rate, end * hop / sample_rate))
    return spans


def sung_syllables(lyrics: str) -> int:
    """About how many syllables ``lyrics`` sing: one per character in Han, kana and Hangul, one per
    vowel group elsewhere (accents stripped), one per word without a vowel letter."""
    text = _SECTION.sub(" ", lyrics)
    count = len(_SYLLABIC.findall(text))
    for word in re.findall(r"[^\W\d_]+", _SYLLABIC.sub(" ", text)):
        letters = "".join(c for c in unicodedata.normalize("NFD", word.lower()) if not unicodedata.combining(c))
        groups = len(re.findall(f"[{''.join(sorted(_VOWELS))}]+", letters))
        count += max(groups, 1)
    return count


def check_quality(wave: np.ndarray, sample_rate: int, lyrics: str | None) -> QualityChecks:
    """Every check on one decoded song ``[C, n]`` (float, full scale 1.0)."""
    seconds = wave.shape[-1] / sample_rate
    loudness = integrated_loudness(wave, sample_rate)
    checks = QualityChecks(seconds, loudness, clip_overs(wave), inner_silences(wave, sample_rate),
                           sung_syllables(lyrics) if lyrics and lyrics.strip() else None)
    minutes = max(seconds / 60, 1e-9)
    if checks.clip_overs / minutes >= CLIPS_PER_MINUTE:
        checks.flags["clipping"] = (f"{checks.clip_overs} clipped runs of {CLIP_RUN}+ full-scale samples "
                                    f"({checks.clip_overs / minutes:.1f} per minute)")
    if loudness is not None and loudness < LOW_LOUDNESS_LUFS:
        shown = "digital silence" if not np.isfinite(loudness) else f"{loudness:.1f} LUFS"
        checks.flags["low-loudness"] = f"integrated loudness {shown} (below {LOW_LOUDNESS_LUFS:g} LUFS)"
    if checks.silences:
        longest = max(end - start for start, end in checks.silences)
        checks.flags["digital-silence"] = (f"{len(checks.silences)} span(s) of digital silence inside the song, "
                                           f"longest {longest:.1f} s at {checks.silences[0][0]:.1f} s")
    if checks.syllables is not None and seconds > 0 and checks.syllables / seconds > SYLLABLES_PER_SECOND:
        checks.flags["lyrics-too-long"] = (f"about {checks.syllables} sung syllables in {seconds:.1f} s of audio "
                                           f"({checks.syllables / seconds:.1f} per second; limit "
                                           f"{SYLLABLES_PER_SECOND:g})")
    return checks
