"""Near-duplicate recordings: spectral-peak landmarks (Wang's pairs of peaks, as audio
identification services use), matched at one consistent time offset.

The same recording under two names, re-encoded, or cut to an excerpt keeps its strongest
spectrogram peaks where they were; two different songs share only chance coincidences, which
scatter over offsets. A pair counts as the same recording when the landmarks agreeing on one
offset are at least ``MATCH_FRACTION`` of the shorter file's landmarks and at least ``MIN_MATCHES``:
identical audio agrees on most of its landmarks, a lossy re-encode on a large part, and chance
coincidences between unrelated songs on a handful at most (about ``n_a * n_b / 2**HASH_BITS`` spread
over all offsets).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

ANALYSIS_RATE = 11025
N_FFT, HOP = 1024, 256  # 93 ms windows, 23 ms steps
PEAK_NEIGHBOURHOOD = (15, 11)  # frequency bins x frames a peak must be the maximum of
PEAKS_PER_SECOND = 30
FAN_OUT = 5  # partners per anchor peak
TARGET_FRAMES = (1, 63)  # partner time distance, frames
TARGET_BINS = 63  # partner frequency distance, bins either side
HASH_BITS = 9 + 7 + 6  # anchor bin, bin distance, frame distance
MATCH_FRACTION = 0.05
MIN_MATCHES = 20
COMMON_HASH_FILES = 16
OFFSET_LIMIT = 60 * 60 * ANALYSIS_RATE // HOP  # an hour of frames: any offset within a song


@dataclass(frozen=True)
class Fingerprint:
    hashes: np.ndarray  # int64 [m]
    times: np.ndarray  # int32 [m], anchor frame of each hash

    def to_dict(self) -> dict:
        return {"hashes": self.hashes.tolist(), "times": self.times.tolist()}

    @classmethod
    def from_dict(cls, data: Mapping) -> "Fingerprint":
        return cls(np.asarray(data["hashes"], dtype=np.int64), np.asarray(data["times"], dtype=np.int32))


def fingerprint(mono: np.ndarray) -> Fingerprint:
    """Landmarks of ``mono`` at ``ANALYSIS_RATE``."""
    from scipy.ndimage import maximum_filter

    if mono.size < N_FFT:
        return Fingerprint(np.zeros(0, np.int64), np.zeros(0, np.int32))
    frames = np.lib.stride_tricks.sliding_window_view(mono.astype(np.float32), N_FFT)[::HOP]
    spectrum = np.abs(np.fft.rfft(frames * np.hanning(N_FFT).astype(np.float32), axis=1))[:, :512].T
    level = np.log(spectrum + 1e-6)
    peaks = (level == maximum_filter(level, size=PEAK_NEIGHBOURHOOD, mode="constant", cval=-np.inf))
    peaks &= spectrum > 1e-4  # not in digital silence
    bins, times = np.nonzero(peaks)
    # the strongest peaks, about PEAKS_PER_SECOND: the ones a re-encode keeps
    keep = int(PEAKS_PER_SECOND * mono.size / ANALYSIS_RATE) + 1
    if bins.size > keep:
        strongest = np.argpartition(-level[bins, times], keep)[:keep]
        bins, times = bins[strongest], times[strongest]
    order = np.lexsort((bins, times))
    bins, times = bins[order], times[order]
    hashes, anchors = [], []
    for i in range(bins.size):
        partners = 0
        for j in range(i + 1, bins.size):
            dt = times[j] - times[i]
            if dt > TARGET_FRAMES[1]:
                break
            df = int(bins[j]) - int(bins[i])
            if dt < TARGET_FRAMES[0] or abs(df) > TARGET_BINS:
                continue
            hashes.append((int(bins[i]) << 13) | ((df + TARGET_BINS) << 6) | int(dt))
            anchors.append(times[i])
            partners += 1
            if partners == FAN_OUT:
                break
    return Fingerprint(np.asarray(hashes, np.int64), np.asarray(anchors, np.int32))


def match_strength(a: Fingerprint, b: Fingerprint) -> tuple[int, float]:
    """Landmarks of ``a`` and ``b`` agreeing on their best time offset (a frame either side merged:
    decoders shift audio by a few ms), and that count over the smaller fingerprint."""
    if not a.hashes.size or not b.hashes.size:
        return 0, 0.0
    where = defaultdict(list)
    for h, t in zip(b.hashes.tolist(), b.times.tolist()):
        where[h].append(t)
    offsets = Counter()
    for h, t in zip(a.hashes.tolist(), a.times.tolist()):
        for u in where.get(h, ()):
            offsets[u - t] += 1
    if not offsets:
        return 0, 0.0
    best = max(offsets[o - 1] + offsets[o] + offsets[o + 1] for o in list(offsets))
    return best, best / min(a.hashes.size, b.hashes.size)


def near_duplicate_groups(prints: Mapping[str, Fingerprint]) -> list[list[str]]:
    """Groups (two or more names) of the same recording, each sorted, in order of first name.

    One pass over every landmark of every file, sorted by hash: each pair of files sharing a hash
    votes for the time offset between the two landmarks, and a pair is the same recording when its
    best offset (a frame either side merged) gathers ``MIN_MATCHES`` votes and ``MATCH_FRACTION`` of
    the smaller file's landmarks. Hashes held by more than ``COMMON_HASH_FILES`` files (silence,
    steady tones) carry no identity and are skipped."""
    names = sorted(prints)
    if len(names) < 2:
        return []
    hashes = np.concatenate([prints[name].hashes for name in names])
    times = np.concatenate([prints[name].times for name in names]).astype(np.int64)
    owners = np.concatenate([np.full(prints[name].hashes.size, number, np.int64) for number, name in enumerate(names)])
    order = np.lexsort((owners, hashes))
    hashes, times, owners = hashes[order], times[order], owners[order]
    starts = np.flatnonzero(np.r_[True, hashes[1:] != hashes[:-1]])
    sizes = np.diff(np.r_[starts, hashes.size])
    votes = []  # pair * OFFSETS + offset
    offsets = 2 * OFFSET_LIMIT + 1
    for size in range(2, COMMON_HASH_FILES + 1):
        first = starts[sizes == size]
        if not first.size:
            continue
        members = first[:, None] + np.arange(size)
        for a in range(size):
            for b in range(a + 1, size):
                left, right = owners[members[:, a]], owners[members[:, b]]
                shift = times[members[:, b]] - times[members[:, a]]
                keep = (left != right) & (np.abs(shift) <= OFFSET_LIMIT)  # (owners ascend within a hash)
                votes.append((left[keep] * len(names) + right[keep]) * offsets + shift[keep] + OFFSET_LIMIT)
    if not votes:
        return []
    codes, counts = np.unique(np.concatenate(votes), return_counts=True)
    pairs, shift = codes // offsets, codes % offsets
    parent = list(range(len(names)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    sizes_of = np.array([prints[name].hashes.size for name in names])
    for pair in np.unique(pairs[counts >= MIN_MATCHES // 3]):
        mine = pairs == pair
        histogram = np.zeros(offsets + 2, np.int64)
        histogram[shift[mine] + 1] = counts[mine]
        best = int((histogram[:-2] + histogram[1:-1] + histogram[2:]).max())
        a, b = divmod(int(pair), len(names))
        if best >= MIN_MATCHES and best >= MATCH_FRACTION * min(sizes_of[a], sizes_of[b]):
            parent[root(b)] = root(a)
    groups: dict[int, list[str]] = defaultdict(list)
    for number, name in enumerate(names):
        groups[root(number)].append(name)
    return sorted((sorted(g) for g in groups.values() if len(g) > 1), key=lambda g: g[0])


def analysis_mono(wave: np.ndarray, sample_rate: int) -> np.ndarray:
    """``[C, n]`` at ``sample_rate`` -> mono float32 at ``ANALYSIS_RATE`` (soxr, high quality)."""
    import soxr

    mono = np.atleast_2d(wave).mean(axis=0).astype(np.float32)
    if sample_rate == ANALYSIS_RATE:
        return mono
    return soxr.resample(mono, sample_rate, ANALYSIS_RATE, quality="HQ").astype(np.float32)


def describe(groups: Sequence[Sequence[str]]) -> str:
    return "; ".join(" = ".join(g) for g in groups)
