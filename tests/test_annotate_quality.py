"""Quality checks and near-duplicate fingerprints on signals whose answer is known by construction."""

from __future__ import annotations

import numpy as np
import pytest

from acestep_dist.annotate.fingerprint import ANALYSIS_RATE, fingerprint, match_strength, near_duplicate_groups
from acestep_dist.annotate.quality import (
    LOW_LOUDNESS_LUFS, check_quality, clip_overs, inner_silences, integrated_loudness, sung_syllables,
)

RATE = 44100


def _music(seconds: float, seed: int, rate: int = RATE) -> np.ndarray:
    """Stereo notes of random pitch and length (a different piece per seed), about -20 dBFS."""
    rng = np.random.default_rng(seed)
    out = np.zeros(int(seconds * rate), np.float32)
    start = 0
    while start < out.size:
        length = int(rng.uniform(0.1, 0.5) * rate)
        t = np.arange(min(length, out.size - start)) / rate
        pitch = 110 * 2 ** (rng.integers(0, 36) / 12)
        note = sum(np.sin(2 * np.pi * pitch * h * t) / h for h in (1, 2, 3)) * np.exp(-3 * t)
        out[start:start + t.size] += 0.15 * note.astype(np.float32)
        start += length
    return np.stack([out, 0.8 * out])


def test_clipping_counts_runs_of_full_scale_samples():
    wave = 0.5 * _music(5, 0)
    assert clip_overs(wave) == 0
    wave[0, 1000:1002] = 1.0  # two samples: a peak at full scale, not an over
    wave[0, 5000:5010] = 1.0
    wave[1, 9000:9003] = -1.0
    assert clip_overs(wave) == 2
    flagged = check_quality(np.clip(wave * 30, -1, 1), RATE, None)  # driven hard into the limits
    assert "clipping" in flagged.flags and flagged.clip_overs > 5


def test_loudness_follows_the_gain_and_quiet_songs_are_flagged():
    wave = _music(10, 1)
    loud = integrated_loudness(wave, RATE)
    assert integrated_loudness(0.1 * wave, RATE) == pytest.approx(loud - 20, abs=0.1)
    quiet_gain = 10 ** ((LOW_LOUDNESS_LUFS - 6 - loud) / 20)
    assert "low-loudness" in check_quality(quiet_gain * wave, RATE, None).flags
    assert "low-loudness" not in check_quality(wave, RATE, None).flags
    assert integrated_loudness(wave[:, :1000], RATE) is None  # shorter than one gating block


def test_digital_silence_inside_a_song_is_found_but_not_at_its_ends():
    wave = _music(12, 2)
    wave[:, : RATE * 3] = 0  # a silent lead-in: not a problem
    wave[:, RATE * 6: int(RATE * 8.5)] = 0  # 2.5 s inside
    wave[:, RATE * 10: int(RATE * 11)] = 0  # 1 s inside: a rest, not a gap
    [(start, end)] = inner_silences(wave, RATE)
    assert start == pytest.approx(6, abs=0.02) and end == pytest.approx(8.5, abs=0.02)
    assert "digital-silence" in check_quality(wave, RATE, None).flags


def test_lyrics_far_too_long_for_the_audio_are_flagged():
    assert sung_syllables("[verse]\nla la la\n[chorus]\nhello") == 5
    assert sung_syllables("我爱你\n사랑해요") == 7
    verse = "[verse]\nthe morning light is falling on the water\n" * 4
    assert "lyrics-too-long" not in check_quality(_music(20, 3), RATE, verse).flags
    assert "lyrics-too-long" in check_quality(_music(5, 3), RATE, verse * 3).flags


def _prints(waves: dict[str, np.ndarray]) -> dict:
    import soxr

    return {name: fingerprint(soxr.resample(wave.mean(axis=0), RATE, ANALYSIS_RATE)) for name, wave in waves.items()}


def test_the_same_recording_cut_or_requantised_is_grouped_and_other_songs_are_not():
    song = _music(40, 4)
    quantised = np.round(song * 127) / 127  # 8-bit: every sample changed
    excerpt = song[:, int(13.37 * RATE): int(33.37 * RATE)]  # 20 s, off the analysis frame grid
    prints = _prints({"song": song, "song_8bit": quantised, "song_excerpt": excerpt,
                      "other": _music(40, 5), "another": _music(30, 6)})
    assert near_duplicate_groups(prints) == [["song", "song_8bit", "song_excerpt"]]
    same, fraction = match_strength(prints["song"], prints["song_excerpt"])
    unrelated, chance = match_strength(prints["song"], prints["other"])
    assert fraction > 0.3 and chance < 0.01, (same, fraction, unrelated, chance)
