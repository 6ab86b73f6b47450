"""How close an estimate is to a reference value: what the benchmark reports and what a review
of estimated against given values shows."""

from __future__ import annotations

from .estimators import NOTE_NAMES

_SPELLINGS = {"Db": "C#", "D#": "Eb", "Gb": "F#", "G#": "Ab", "A#": "Bb", "Cb": "B", "Fb": "E", "E#": "F", "B#": "C"}
# the ratios beat trackers confuse, strongest first; "accuracy 2" allows the first five
TEMPO_RATIOS = (("1", 1.0), ("2", 2.0), ("1/2", 0.5), ("3", 3.0), ("1/3", 1 / 3), ("3/2", 1.5), ("2/3", 2 / 3))
ACCURACY_2 = ("1", "2", "1/2", "3", "1/3")


def pitch_class(name: str) -> int:
    return NOTE_NAMES.index(_SPELLINGS.get(name, name))


def mirex_key_score(estimate: str | None, reference: str) -> float:
    """MIREX's weighted key score: 1 the same key, 0.5 a fifth away either way in the same mode, 0.3
    the relative key, 0.2 the parallel key, else 0."""
    if not estimate:
        return 0.0
    (tonic, mode), (reference_tonic, reference_mode) = estimate.split(), reference.split()
    a, b = pitch_class(tonic), pitch_class(reference_tonic)
    if (a, mode) == (b, reference_mode):
        return 1.0
    if mode == reference_mode and (a - b) % 12 in (5, 7):
        return 0.5
    if mode != reference_mode and (a - b) % 12 == (9 if reference_mode == "major" else 3):
        return 0.3
    if mode != reference_mode and a == b:
        return 0.2
    return 0.0


def tempo_ratio(estimate: float | None, reference: float, tolerance: float = 0.04) -> str:
    """The ratio ``estimate`` is of ``reference`` within ``tolerance`` ("1", "2", "1/3", ...), or
    "x1.23" when it is none of them; "none" without an estimate."""
    if not estimate:
        return "none"
    for label, factor in TEMPO_RATIOS:
        if abs(estimate / (reference * factor) - 1) <= tolerance:
            return label
    return f"x{estimate / reference:.2f}"
