"""`acedist annotate`'s estimators measured: accuracy on labelled music, CPU cost, and baselines.

    python bench/annotate_bench.py [--folder DIR] [--synthetic 20] [--baselines]

``--folder``: audio with a ``metadata.csv`` (``file, bpm, keyscale, timesignature, language``) and
``NAME.lyrics`` files; default ../shared/corpus/music. ``--synthetic N``: also N generated 30-s clips
of known tempo (60-180 quarter notes per minute), key (any of 24) and metre (3/4, 4/4, 6/8 in turn),
a check that does not depend on any one collection. ``--baselines``: the same scores for the
candidates annotate was chosen against, where their packages are installed (librosa's tempo and
beat tracker and chroma_cqt; Krumhansl-Kessler profiles; langdetect), none of which acedist needs.

Scores: tempo "accuracy 2" (within 4 %, allowing x1/2, x2, x1/3, x3) and strict accuracy (within
4 %); key: MIREX weighted score (1 exact, 0.5 a fifth either way in the same mode, 0.3 relative,
0.2 parallel); metre: exact numerator; language: exact code. CPU-seconds per minute of audio, decode
excluded: the estimators alone, and the whole per-song analysis (quality checks, fingerprint).
"""

from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

import numpy as np

from common import CORPUS  # noqa: F401  (puts the checkout on sys.path)

from acestep_dist.annotate.analysis import analyse_wave  # noqa: E402
from acestep_dist.annotate.estimators import (  # noqa: E402
    ANALYSIS_RATE, NOTE_NAMES, estimate_language, estimate_music, key_from_chroma,
)
from acestep_dist.annotate.scores import ACCURACY_2, mirex_key_score, tempo_ratio  # noqa: E402
from acestep_dist.audio import decode_window, probe_audio  # noqa: E402

# ----------------------------------------------------------------------------- labelled songs
def labelled_folder(folder: Path) -> list[dict]:
    songs = []
    for row in csv.DictReader(open(folder / "metadata.csv", encoding="utf-8")):
        path = folder / row["file"]
        lyrics = path.with_suffix(".lyrics")
        window = decode_window(path, 0.0, 600.0, probe_audio(path).sample_rate)
        songs.append({"name": row["file"], "wave": window.wave, "rate": window.sample_rate,
                      "bpm": float(row["bpm"]), "keyscale": row["keyscale"], "timesignature": row["timesignature"],
                      "language": row.get("language") or "unknown",
                      "lyrics": lyrics.read_text(encoding="utf-8") if lyrics.is_file() else None})
    return songs


def _tone(out: np.ndarray, start: float, seconds: float, midi: int, gain: float, partials: int, tilt: float,
          decay: float, rng) -> None:
    first, count = int(start * ANALYSIS_RATE), int(seconds * ANALYSIS_RATE)
    count = min(count, out.size - first)
    if count <= 0:
        return
    t = np.arange(count) / ANALYSIS_RATE
    pitch = 440.0 * 2 ** ((midi - 69) / 12)
    wave = sum(np.sin(2 * np.pi * pitch * k * t + rng.uniform(0, 2 * np.pi)) / k**tilt
               for k in range(1, partials + 1) if pitch * k < ANALYSIS_RATE / 2 - 500)
    envelope = np.minimum(1.0, t / 0.005) * np.exp(-t / decay) * np.minimum(1.0, (count - np.arange(count)) / 220)
    out[first: first + count] += gain * wave * envelope


def _click(out: np.ndarray, start: float, gain: float, rng) -> None:
    first = int(start * ANALYSIS_RATE)
    count = min(int(0.03 * ANALYSIS_RATE), out.size - first)
    if count > 0:
        noise = np.diff(rng.standard_normal(count), prepend=0.0)
        out[first: first + count] += gain * noise * np.exp(-np.arange(count) / ANALYSIS_RATE / 0.006)


def synthetic_song(index: int, seconds: float = 30.0, metres: tuple[int, ...] = (3, 4, 6)) -> dict:
    """A clip of known tempo, key and metre (``metres`` in turn): I-IV-V-I (minor: harmonic-minor
    V), one chord a bar, the bass root and a click on every beat (the downbeat louder), softer
    clicks on the subdivisions (in 6/8, 9/8 and 12/8 eighths in threes under a dotted-quarter
    beat), a diatonic melody."""
    rng = np.random.default_rng(12345 + 7919 * index)
    numerator = metres[index % len(metres)]
    bpm = float(rng.uniform(60, 180))
    tonic, mode = int(rng.integers(12)), ("major", "minor")[int(rng.integers(2))]
    scale = (0, 2, 4, 5, 7, 9, 11) if mode == "major" else (0, 2, 3, 5, 7, 8, 11)
    quarter = 60.0 / bpm
    compound = numerator in (6, 9, 12)
    beat, beats_per_bar, division = (1.5 * quarter, numerator // 3, 3) if compound else (quarter, numerator, 2)
    out = np.zeros(int(seconds * ANALYSIS_RATE))
    bar_start, bar = 0.0, 0
    while bar_start < seconds:
        degree = (0, 3, 4, 0)[bar % 4]
        triad = [(tonic + scale[(degree + step) % 7]) % 12 for step in (0, 2, 4)]
        for number in range(beats_per_bar):
            at, down = bar_start + number * beat, number == 0
            _tone(out, at, 0.95 * beat, 36 + triad[0], 0.5 if down else 0.3, 8, 1.0, 0.4, rng)
            _click(out, at, 0.35 if down else 0.18, rng)
            for pitch in triad:
                _tone(out, at, 0.9 * beat, 60 + pitch, 0.12 if down else 0.08, 3, 1.5, 0.3, rng)
            for step in range(1, division):
                _click(out, at + step * beat / division, 0.07, rng)
            for step in range(division):
                if rng.random() < 0.6:
                    pitch = triad[int(rng.integers(3))] if step == 0 else (tonic + scale[int(rng.integers(7))]) % 12
                    _tone(out, at + step * beat / division, 0.95 * beat / division, 72 + pitch, 0.15, 6, 1.0, 0.25, rng)
        bar_start += beat * beats_per_bar
        bar += 1
    out += 10 ** (-50 / 20) * rng.standard_normal(out.size)
    out = (0.9 * out / np.abs(out).max()).astype(np.float32)
    return {"name": f"synthetic {index:02d}", "wave": out[None], "rate": ANALYSIS_RATE, "bpm": bpm,
            "keyscale": f"{NOTE_NAMES[tonic]} {mode}", "timesignature": str(numerator), "language": None, "lyrics": None}


# ----------------------------------------------------------------------------- candidates
def _mono(song: dict) -> np.ndarray:
    import soxr

    mono = song["wave"].mean(axis=0).astype(np.float32)
    return mono if song["rate"] == ANALYSIS_RATE else soxr.resample(mono, song["rate"], ANALYSIS_RATE, "HQ")


def acedist_estimates(song: dict) -> dict:
    found = estimate_music(_mono(song))
    return {name: estimate.value for name, estimate in found.items()} | {
        "language": estimate_language(song["lyrics"]).value}


# Krumhansl & Kessler's probe-tone ratings (Krumhansl 1990, table 2.1), tonic first
_KK_MAJOR = (6.35, 2.23, 3.48, 2.33, 4.38, 4.09, 2.52, 5.19, 2.39, 3.66, 2.29, 2.88)
_KK_MINOR = (6.33, 2.68, 3.52, 5.38, 2.60, 3.53, 2.54, 4.75, 3.98, 2.69, 3.34, 3.17)


def _kk_key(chroma: np.ndarray) -> str:
    scores = [(float(np.corrcoef(chroma, np.roll(profile, tonic))[0, 1]), f"{NOTE_NAMES[tonic]} {mode}")
              for mode, profile in (("major", _KK_MAJOR), ("minor", _KK_MINOR)) for tonic in range(12)]
    return max(scores)[1]


def baseline_candidates() -> dict:
    """name -> song -> {field: value}, for the baselines whose packages are installed."""
    candidates = {}
    try:
        import librosa
    except ImportError:
        print("(librosa not installed: its baselines are skipped)")
    else:
        def librosa_tempo(song, prior):
            mono = _mono(song)
            envelope = librosa.onset.onset_strength(y=mono, sr=ANALYSIS_RATE)
            bpm = librosa.feature.tempo(onset_envelope=envelope, sr=ANALYSIS_RATE, prior=prior)
            return float(np.atleast_1d(bpm)[0])

        def librosa_keys(song):
            chroma = librosa.feature.chroma_cqt(y=_mono(song), sr=ANALYSIS_RATE).mean(axis=1)
            return key_from_chroma(chroma).value, _kk_key(chroma)

        candidates["librosa tempo (its log-normal prior)"] = lambda song: {"bpm": librosa_tempo(song, None)}
        uniform = __import__("scipy.stats", fromlist=["uniform"]).uniform(40, 200)
        candidates["librosa tempo (uniform 40-240 prior)"] = lambda song: {"bpm": librosa_tempo(song, uniform)}
        candidates["librosa chroma_cqt + Temperley"] = lambda song: {"keyscale": librosa_keys(song)[0]}
        candidates["librosa chroma_cqt + Krumhansl-Kessler"] = lambda song: {"keyscale": librosa_keys(song)[1]}
    try:
        from langdetect import DetectorFactory, detect
    except ImportError:
        print("(langdetect not installed: its baseline is skipped)")
    else:
        def langdetect_language(song):
            text = " ".join(line for line in (song["lyrics"] or "").splitlines() if not line.startswith("["))
            if not text.strip():
                return {"language": "unknown"}
            DetectorFactory.seed = 0
            return {"language": detect(text).split("-")[0]}

        candidates["langdetect"] = langdetect_language
    return candidates


# ----------------------------------------------------------------------------- scoring
def score(songs: list[dict], estimates: list[dict]) -> dict:
    result = {}
    with_bpm = [(e["bpm"], s["bpm"]) for s, e in zip(songs, estimates) if "bpm" in e]
    if with_bpm:
        ratios = [tempo_ratio(e, r) for e, r in with_bpm]
        result["tempo strict"] = sum(r == "1" for r in ratios) / len(ratios)
        result["tempo accuracy 2"] = sum(r in ACCURACY_2 for r in ratios) / len(ratios)
    with_key = [(e["keyscale"], s["keyscale"]) for s, e in zip(songs, estimates) if "keyscale" in e]
    if with_key:
        result["key MIREX"] = float(np.mean([mirex_key_score(e, r) for e, r in with_key]))
    with_metre = [(e["timesignature"], s["timesignature"]) for s, e in zip(songs, estimates) if "timesignature" in e]
    if with_metre:
        result["metre exact"] = sum(str(e) == r for e, r in with_metre) / len(with_metre)
    with_language = [(e["language"], s["language"]) for s, e in zip(songs, estimates)
                     if "language" in e and s["language"] is not None]
    if with_language:
        result["language exact"] = sum(e == r for e, r in with_language) / len(with_language)
    return result


def _cpu_per_minute(songs: list[dict], run) -> tuple[list, float]:
    started = time.process_time()
    results = [run(song) for song in songs]
    minutes = sum(song["wave"].shape[1] / song["rate"] for song in songs) / 60
    return results, (time.process_time() - started) / minutes


def report(title: str, songs: list[dict], baselines: bool) -> None:
    acedist_estimates(songs[0])  # imports and first-call set-up are not per-song costs
    estimates, estimator_cost = _cpu_per_minute(songs, acedist_estimates)
    _, analysis_cost = _cpu_per_minute(songs, lambda song: analyse_wave(song["wave"], song["rate"], song["lyrics"]))
    print(f"\n## {title}: {len(songs)} songs\n")
    print("| candidate | " + " | ".join(score(songs, estimates)) + " | CPU-s per audio minute |")
    print("|---|" + "---|" * (len(score(songs, estimates)) + 1))
    print("| acedist annotate | " + " | ".join(f"{v:.3f}" for v in score(songs, estimates).values())
          + f" | {estimator_cost:.2f} (whole analysis with quality checks and fingerprint: {analysis_cost:.2f}) |")
    if baselines:
        for name, run in baseline_candidates().items():
            run(songs[0])
            found, cost = _cpu_per_minute(songs, run)
            print(f"| {name} | " + ", ".join(f"{k} {v:.3f}" for k, v in score(songs, found).items()) + f" | {cost:.2f} |")
    print("\n| song | bpm (ratio) | key (score) | metre | language |\n|---|---|---|---|---|")
    for song, found in zip(songs, estimates):
        print(f"| {song['name']} | {found['bpm']} of {song['bpm']:g} ({tempo_ratio(found['bpm'], song['bpm'])}) | "
              f"{found['keyscale']} of {song['keyscale']} ({mirex_key_score(found['keyscale'], song['keyscale']):g}) | "
              f"{found['timesignature']} of {song['timesignature']} | {found['language']} of {song['language']} |")


def _numerators(text: str) -> tuple[int, ...]:
    """``--metres``: comma-separated numerators the synthetic clips can be written in."""
    numerators = tuple(int(part) for part in text.split(",") if part.strip().isdigit())
    if not numerators or len(numerators) != len(text.split(",")) or not set(numerators) <= {2, 3, 4, 6, 9, 12}:
        raise argparse.ArgumentTypeError(f"numerators among 2,3,4,6,9,12, comma-separated, not {text!r}")
    return numerators


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", type=Path, default=CORPUS / "music")
    parser.add_argument("--synthetic", type=int, default=20, help="generated clips (0: none)")
    parser.add_argument("--metres", type=_numerators, default=(3, 4, 6),
                        help="the synthetic clips' numerators, in turn (any of 2,3,4,6,9,12; default 3,4,6)")
    parser.add_argument("--baselines", action="store_true")
    args = parser.parse_args()
    report(str(args.folder), labelled_folder(args.folder), args.baselines)
    if args.synthetic:
        report("synthetic clips", [synthetic_song(index, metres=args.metres) for index in range(args.synthetic)], args.baselines)


if __name__ == "__main__":
    main()
