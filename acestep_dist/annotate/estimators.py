"""Tempo, key and scale, time-signature numerator from a song's audio; language from its lyrics.

Chosen by measurement against librosa's estimators and several key profiles (bench/README.md,
"annotate"); numpy and scipy only, about 0.3 CPU-seconds per minute of audio. Every parameter is
a published value or a stated convention; none was fitted to any collection.

- Onsets: spectral flux of a log-compressed log-frequency spectrogram (2048-point STFT, 256 hop at
  22050 Hz; triangular filters 12 to the octave from 30 Hz to 11025 Hz, the front end of Böck's
  onset and beat detectors, merged where the STFT cannot resolve them), minus its 1-s moving mean,
  half-wave rectified. A semitone filter sees a legato note change that a mel band, two or more
  semitones wide above 1 kHz, averages away (measured: bench/README.md, "annotate").
- Tempo: the onset envelope's autocorrelation combed over the beat period and its multiples 2-4,
  for 40-240 beats per minute, weighted by a log-Gaussian prior at 120 bpm, 1.4 octaves wide
  (Ellis 2007). bpm is written in quarter notes per minute, as DAWs and MIDI count it: the beat
  of a compound metre (6/8, 9/8, 12/8) is a dotted quarter, so its rate is multiplied by 1.5.
- Beats: Ellis's (2007) dynamic-programming tracker at that period.
- Key: pitch-class power (55-2000 Hz, 8192-point STFT, each frame scaled to its maximum) averaged
  over the song, correlated with the 24 rotations of Temperley's (2007) Kostka-Payne major and
  minor profiles (Krumhansl-Schmuckler matching).
- Metre: per beat, the onset accent and the harmonic change; for each bar length L in {2, 3, 4}
  beats, a one-way analysis of variance of each cue grouped by position in the bar, the two
  p-values joined by Fisher's method. The bar is the most significant length (at the conventional
  5 %); a duple bar is 2 where two beats are significant and four explain no more (nested F-test),
  else 4. Where no length is significant, the commonest metre is written (4/4; 6/8 for a beat in
  threes) with no confidence and a note: a default a reviewer can see, not a guess dressed up as
  a finding. The beat is divided in three when onsets at 1/3 and 2/3 of it outweigh onsets at
  1/2, and the numerator is then 3L (6, 9, 12).
- Language: py3langid (its model ships in the package) on the lyrics without section tags, choosing
  among the languages ACE-Step's prompt knows.

Confidences are in [0, 1]: tempo, the comb's mean autocorrelation at the chosen period (1 would be
perfectly periodic onsets); key, the correlation margin over the runner-up key; metre, 1 minus
the chosen bar length's p-value (0 for the commonest-metre default); language, py3langid's
normalised probability. They rank songs for review; they are not calibrated probabilities.
"""

from __future__ import annotations

import functools
import re
import warnings
from dataclasses import dataclass

import numpy as np

ANALYSIS_RATE = 22050
ONSET_FFT, ONSET_HOP = 2048, 256
CHROMA_FFT, CHROMA_HOP = 8192, 2048
BANDS_PER_OCTAVE, BANDS_LOW, BANDS_HIGH = 12, 30.0, 11025.0
BPM_GRID = np.arange(40.0, 240.0 + 1e-9, 0.5)
PRIOR_BPM, PRIOR_OCTAVES = 120.0, 1.4
BPM_RANGE = (30, 300)  # what the prompt accepts (fields.BPM_MIN / BPM_MAX)
CHROMA_LOW, CHROMA_HIGH = 55.0, 2000.0
DP_TIGHTNESS = 100.0  # Ellis's default
BAR_LENGTHS = (2, 3, 4)  # beats; a compound bar of 2, 3 or 4 dotted quarters is 6/8, 9/8 or 12/8
SIGNIFICANCE = 0.05  # the conventional level: weaker bar patterns are not taken as evidence
# with no evident bar, the commonest metre of its kind: 4/4 (simple beat), 6/8 (compound beat)
COMMONEST_BAR = {False: 4, True: 2}
NO_BAR_EVIDENT = f"no bar pattern significant at {SIGNIFICANCE:.0%}: the commonest metre"
MIN_BEATS = 8  # fewer beats say nothing about bars
MIN_SECONDS = 4.0
NOTE_NAMES = ("C", "C#", "D", "Eb", "E", "F", "F#", "G", "Ab", "A", "Bb", "B")  # ACE-Step's spellings
# Temperley, "Music and Probability" (2007): the share of Kostka-Payne textbook segments holding
# each scale degree, tonic first
TEMPERLEY_MAJOR = (0.748, 0.060, 0.488, 0.082, 0.670, 0.460, 0.096, 0.715, 0.104, 0.366, 0.057, 0.400)
TEMPERLEY_MINOR = (0.712, 0.084, 0.474, 0.618, 0.049, 0.460, 0.105, 0.747, 0.404, 0.067, 0.133, 0.330)
_SECTION = re.compile(r"\[[^\]]*\]")


@dataclass(frozen=True)
class Estimate:
    value: int | str | None  # None: no estimate (``note`` says why)
    confidence: float = 0.0
    note: str = ""

    def to_dict(self) -> dict:
        return {"value": self.value, "confidence": round(float(self.confidence), 3), "note": self.note}


# ---------------------------------------------------------------------------------- front end
def _frames(mono: np.ndarray, size: int, hop: int) -> np.ndarray:
    padded = np.pad(mono, (size // 2, size // 2))
    count = 1 + max(0, (padded.size - size) // hop)
    return np.lib.stride_tricks.sliding_window_view(padded, size)[::hop][:count]


def magnitude(mono: np.ndarray, size: int, hop: int) -> np.ndarray:
    """``[bins, frames]`` Hann-windowed STFT magnitude."""
    from scipy.signal import get_window

    window = get_window("hann", size).astype(np.float32)
    return np.abs(np.fft.rfft(_frames(mono, size, hop) * window, axis=1)).T


@functools.lru_cache(maxsize=4)
def _log_filters(size: int, rate: int) -> np.ndarray:
    """Triangular filters centred 12 to the octave (on A440), each of unit area; where neighbouring
    centres fall in the same STFT bin (low notes) they are one filter."""
    lowest, highest = BANDS_PER_OCTAVE * np.log2(np.array([BANDS_LOW, BANDS_HIGH]) / 440.0)
    semitones = np.arange(np.ceil(lowest), np.floor(highest) + 1)
    centres = np.unique(np.round(440.0 * 2 ** (semitones / BANDS_PER_OCTAVE) * size / rate).astype(int))
    filters = np.zeros((centres.size - 2, size // 2 + 1), np.float32)
    for band, (low, centre, high) in enumerate(zip(centres[:-2], centres[1:-1], centres[2:])):
        filters[band, low: centre + 1] = np.linspace(0.0, 1.0, centre - low + 1)
        filters[band, centre: high + 1] = np.linspace(1.0, 0.0, high - centre + 1)
    return filters / filters.sum(axis=1, keepdims=True)


def onset_envelope(spectrum: np.ndarray) -> tuple[np.ndarray, float]:
    """Spectral flux of ``spectrum`` (``ONSET_FFT`` / ``ONSET_HOP``), frames per second."""
    from scipy.ndimage import uniform_filter1d

    bands = np.log1p(100.0 * (_log_filters(ONSET_FFT, ANALYSIS_RATE) @ spectrum))
    flux = np.concatenate([[0.0], np.maximum(0.0, np.diff(bands, axis=1)).sum(axis=0)])
    rate = ANALYSIS_RATE / ONSET_HOP
    flux = flux - uniform_filter1d(flux, size=int(round(rate)), mode="nearest")
    return np.maximum(flux, 0.0), rate


def _autocorrelation(x: np.ndarray) -> np.ndarray:
    x = x - x.mean()
    spectrum = np.fft.rfft(x, 2 * x.size)
    result = np.fft.irfft(spectrum * np.conj(spectrum))[: x.size]
    return result / result[0] if result[0] > 0 else np.zeros_like(result)


def chroma_frames(spectrum: np.ndarray, compress: bool) -> np.ndarray:
    """``[12, frames]`` pitch classes (C first) of ``spectrum`` (``CHROMA_FFT``), 55-2000 Hz:
    ``compress``: log-compressed magnitude (for change between beats); else power, each frame
    scaled to its maximum (for the key)."""
    freqs = np.arange(spectrum.shape[0]) * ANALYSIS_RATE / CHROMA_FFT
    inside = (freqs >= CHROMA_LOW) & (freqs <= CHROMA_HIGH)
    classes = (np.round(12 * np.log2(freqs[inside] / 440.0)).astype(int) + 9) % 12
    pooling = np.zeros((12, int(inside.sum())), np.float32)
    pooling[classes, np.arange(classes.size)] = 1.0
    if compress:
        return pooling @ np.log1p(100.0 * spectrum[inside])
    chroma = pooling @ spectrum[inside] ** 2
    return chroma / (chroma.max(axis=0, keepdims=True) + 1e-12)


# ---------------------------------------------------------------------------------- tempo, beats
def beat_rate(envelope: np.ndarray, rate: float) -> tuple[float, float]:
    """Beats per minute of the strongest periodicity (comb with the prior) and its comb score."""
    correlation = _autocorrelation(envelope)
    lags = np.arange(correlation.size)
    periods = 60.0 * rate / BPM_GRID
    comb = np.maximum(np.mean([np.interp(k * periods, lags, correlation, right=0.0) for k in (1, 2, 3, 4)], axis=0), 0)
    weighted = comb * np.exp(-0.5 * (np.log2(BPM_GRID / PRIOR_BPM) / PRIOR_OCTAVES) ** 2)
    best = int(np.argmax(weighted))
    return float(BPM_GRID[best]), float(comb[best])


def track_beats(envelope: np.ndarray, rate: float, bpm: float) -> np.ndarray:
    """Beat frames: Ellis's dynamic programme (onset strength at the beats, minus
    ``DP_TIGHTNESS`` x log(interval / period)^2 between them)."""
    from scipy.signal.windows import gaussian

    period = 60.0 * rate / bpm
    strength = envelope / (envelope.std() + 1e-12)
    local = np.convolve(strength, gaussian(int(period) | 1, period / 32.0), "same")
    score, previous = local.copy(), -np.ones(local.size, dtype=int)
    low, high = int(round(period / 2)), int(round(2 * period))
    steps = np.arange(-high, -low + 1)
    penalty = -DP_TIGHTNESS * np.log(-steps / period) ** 2
    for frame in range(high, local.size):
        candidates = score[frame + steps] + penalty
        best = int(np.argmax(candidates))
        if candidates[best] > 0:
            score[frame] += candidates[best]
            previous[frame] = frame + steps[best]
    tail = np.arange(max(0, local.size - int(period)), local.size)
    frame = int(tail[np.argmax(score[tail])])
    beats = [frame]
    while previous[frame] >= 0:
        frame = previous[frame]
        beats.append(frame)
    return np.asarray(beats[::-1])


# ---------------------------------------------------------------------------------- key
def key_from_chroma(chroma: np.ndarray) -> Estimate:
    """Krumhansl-Schmuckler matching of a 12-bin profile (C first) with Temperley's profiles."""
    if not np.any(chroma > 0) or np.allclose(chroma, chroma[0]):
        return Estimate(None, 0.0, "no pitched content")
    scores = []
    for mode, profile in (("major", TEMPERLEY_MAJOR), ("minor", TEMPERLEY_MINOR)):
        for tonic in range(12):
            scores.append((float(np.corrcoef(chroma, np.roll(profile, tonic))[0, 1]), f"{NOTE_NAMES[tonic]} {mode}"))
    scores.sort(reverse=True)
    return Estimate(scores[0][1], min(1.0, max(0.0, scores[0][0] - scores[1][0])))


# ---------------------------------------------------------------------------------- metre
def _by_position(x: np.ndarray, length: int) -> list[np.ndarray]:
    """``x`` (one value per beat) split by the beat's position in a bar of ``length`` beats."""
    return [x[position::length] for position in range(length)]


def _phase_test(x: np.ndarray, length: int) -> float:
    """p-value of a one-way analysis of variance of ``x`` grouped by position in a bar of
    ``length`` beats (1: the positions do not differ)."""
    from scipy.stats import f_oneway

    with warnings.catch_warnings():  # constant input: no evidence, p is nan
        warnings.simplefilter("ignore")
        p = float(f_oneway(*_by_position(x, length)).pvalue)
    return 1.0 if np.isnan(p) else p


def _residual(x: np.ndarray, length: int) -> float:
    """Sum of squares left after each position in a bar of ``length`` beats takes its own mean."""
    return float(sum(((group - group.mean()) ** 2).sum() for group in _by_position(x, length)))


def _four_over_two(x: np.ndarray) -> float:
    """p-value of the nested F-test that positions in a bar of 4 explain ``x`` better than
    positions in a bar of 2 (1: four adds nothing)."""
    from scipy.stats import f

    two, four = _residual(x, 2), _residual(x, 4)
    if x.size <= 4 or two <= four:
        return 1.0
    if four <= 0:
        return 0.0
    return float(f.sf(((two - four) / 2) / (four / (x.size - 4)), 2, x.size - 4))


def _beat_features(envelope: np.ndarray, rate: float, beats: np.ndarray, chroma: np.ndarray,
                   chroma_rate: float) -> tuple[np.ndarray, np.ndarray]:
    """Per beat: its onset accent (envelope peak within 2 frames) and its harmonic change (1 minus
    the cosine between the chroma of the beat before and of this one)."""
    accents = np.array([envelope[max(0, b - 2): b + 3].max() for b in beats])
    columns = np.clip(np.round(beats / rate * chroma_rate).astype(int), 0, chroma.shape[1] - 1)
    segments = np.array([chroma[:, columns[j]: max(columns[j + 1], columns[j] + 1)].mean(axis=1)
                         for j in range(columns.size - 1)])
    change = np.zeros(beats.size)
    for j in range(1, len(segments)):
        a, b = segments[j - 1], segments[j]
        change[j] = 1.0 - a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-12)
    return accents, change


def _divided_in_three(envelope: np.ndarray, beats: np.ndarray) -> bool:
    """Onsets at 1/3 and 2/3 of the beats outweigh onsets at their middle."""
    halves, thirds = [], []
    for start, end in zip(beats[:-1], beats[1:]):
        def peak(fraction: float) -> float:
            at = int(round(start + fraction * (end - start)))
            return float(envelope[max(0, at - 1): at + 2].max())

        halves.append(peak(0.5))
        thirds.append(0.5 * (peak(1 / 3) + peak(2 / 3)))
    return float(np.mean(thirds)) > float(np.mean(halves))


def metre(envelope: np.ndarray, rate: float, beats: np.ndarray, chroma: np.ndarray,
          chroma_rate: float) -> tuple[Estimate, bool]:
    """The time-signature numerator, and whether the beat is divided in three (compound)."""
    from scipy.stats import combine_pvalues

    accents, change = _beat_features(envelope, rate, beats, chroma, chroma_rate)
    cues = (accents, change[1:])  # the first beat has no change to measure

    def evidence(p_values: list[float]) -> float:  # Fisher's combination of the two cues
        return float(combine_pvalues(np.maximum(p_values, 1e-300), method="fisher").pvalue)

    p = {length: evidence([_phase_test(cue, length) for cue in cues]) for length in BAR_LENGTHS}
    compound = _divided_in_three(envelope, beats)
    strongest = min(p, key=p.get)
    if p[strongest] >= SIGNIFICANCE:
        length, confidence, note = COMMONEST_BAR[compound], 0.0, NO_BAR_EVIDENT
    elif strongest == 3:
        length, confidence, note = 3, 1.0 - p[3], ""
    else:  # a duple bar: two beats where they are evident and four explain no more
        two = p[2] < SIGNIFICANCE and evidence([_four_over_two(cue) for cue in cues]) >= SIGNIFICANCE
        length = 2 if two else 4
        confidence, note = 1.0 - p[length], ""
    return Estimate(str(3 * length if compound else length), confidence, note), compound


# ---------------------------------------------------------------------------------- together
def estimate_music(mono: np.ndarray, rate: int = ANALYSIS_RATE) -> dict[str, Estimate]:
    """bpm, keyscale and timesignature of ``mono`` (float, at ``ANALYSIS_RATE``)."""
    if rate != ANALYSIS_RATE:
        raise ValueError(f"estimate_music takes audio at {ANALYSIS_RATE} Hz, not {rate}")
    mono = np.asarray(mono, dtype=np.float32)
    if mono.size < MIN_SECONDS * rate:
        why = f"shorter than {MIN_SECONDS:g} s"
        return {"bpm": Estimate(None, 0, why), "keyscale": Estimate(None, 0, why), "timesignature": Estimate(None, 0, why)}
    pitches = magnitude(mono, CHROMA_FFT, CHROMA_HOP)
    key = key_from_chroma(chroma_frames(pitches, compress=False).mean(axis=1))
    envelope, onset_rate = onset_envelope(magnitude(mono, ONSET_FFT, ONSET_HOP))
    if not np.any(envelope > 0):
        why = "no onsets"
        return {"bpm": Estimate(None, 0, why), "keyscale": key, "timesignature": Estimate(None, 0, why)}
    bpm, periodicity = beat_rate(envelope, onset_rate)
    beats = track_beats(envelope, onset_rate, bpm)
    if beats.size < MIN_BEATS:
        return {"bpm": _quarter_notes(bpm, periodicity, False), "keyscale": key,
                "timesignature": Estimate(None, 0, f"fewer than {MIN_BEATS} beats")}
    numerator, compound = metre(envelope, onset_rate, beats, chroma_frames(pitches, compress=True),
                                ANALYSIS_RATE / CHROMA_HOP)
    return {"bpm": _quarter_notes(bpm, periodicity, compound), "keyscale": key, "timesignature": numerator}


def _quarter_notes(beat_bpm: float, periodicity: float, compound: bool) -> Estimate:
    """The beat rate in quarter notes per minute (a compound beat is a dotted quarter), kept in
    the prompt's range by octaves."""
    bpm = beat_bpm * (1.5 if compound else 1.0)
    while bpm > BPM_RANGE[1]:
        bpm /= 2
    while bpm < BPM_RANGE[0]:
        bpm *= 2
    return Estimate(int(round(bpm)), min(1.0, periodicity))


# ---------------------------------------------------------------------------------- language
@functools.lru_cache(maxsize=1)
def _language_identifier():
    from py3langid.langid import MODEL_FILE, LanguageIdentifier

    from ..sources.fields import LANGUAGES

    identifier = LanguageIdentifier.from_pickled_model(MODEL_FILE, norm_probs=True)  # the package's own model
    # answer only with languages ACE-Step's prompt knows (a Galician guess for Portuguese lyrics
    # would be dropped by prep; Portuguese is what the model can use)
    identifier.set_languages(sorted(set(identifier.nb_classes) & LANGUAGES))
    return identifier


def estimate_language(lyrics: str | None) -> Estimate:
    """ISO 639-1 code of ``lyrics``; ``unknown`` for an instrumental (no lyrics, or only tags)."""
    text = " ".join(_SECTION.sub(" ", lyrics or "").split())
    if not any(character.isalpha() for character in text):
        return Estimate("unknown", 1.0, "no lyrics")
    code, probability = _language_identifier().classify(text)
    return Estimate(code, float(probability))
