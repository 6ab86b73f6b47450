"""The exact text-prompt and lyric strings ACE-Step 1.5 was trained and is run with, one row at a time.

diffusers' ``AceStepPipeline.encode_prompt`` applies one bpm / key / time signature / duration to a
whole batch; training batches mix songs, so every row is formatted from its own record here. The
strings are byte-equal to what the pipeline formats for that row alone (tested).
"""

from __future__ import annotations

from ...records import Record

TEXT2MUSIC_INSTRUCTION = "Fill the audio semantic mask based on the given conditions:"
INSTRUMENTAL_LYRICS = "[Instrumental]"
UNKNOWN_LANGUAGE = "unknown"
# Used only when a record has no duration at all (the pipeline's fallback too).
FALLBACK_DURATION_SECONDS = 30
END_OF_TEXT = "<|endoftext|>"


def _or_na(value: str | None) -> str:
    return value if value and value.strip() else "N/A"


def normalize_bpm(bpm: float | int | str | None) -> int | None:
    """bpm as the model saw it: a positive integer, or None when unknown."""
    if bpm is None or bpm == "":
        return None
    value = int(round(float(bpm)))
    return value if value > 0 else None


def metadata_block(record: Record) -> str:
    bpm = normalize_bpm(record.bpm)
    duration = record.duration
    duration_text = f"{int(duration)} seconds" if duration and duration > 0 else f"{FALLBACK_DURATION_SECONDS} seconds"
    return (
        f"- bpm: {bpm if bpm is not None else 'N/A'}\n"
        f"- timesignature: {_or_na(record.timesignature)}\n"
        f"- keyscale: {_or_na(record.keyscale)}\n"
        f"- duration: {duration_text}\n"
    )


def text_prompt(record: Record, instruction: str = TEXT2MUSIC_INSTRUCTION) -> str:
    """The caption prompt fed through the full Qwen3 text encoder."""
    if not instruction.endswith(":"):
        instruction += ":"
    return f"# Instruction\n{instruction}\n\n# Caption\n{record.caption}\n\n# Metas\n{metadata_block(record)}{END_OF_TEXT}\n"


def lyrics_text(record: Record) -> str:
    """Plain lyrics with the instrumental default applied."""
    return record.lyrics if record.lyrics and record.lyrics.strip() else INSTRUMENTAL_LYRICS


def language_text(record: Record) -> str:
    return record.language if record.language and record.language.strip() else UNKNOWN_LANGUAGE


def lyric_prompt(record: Record) -> str:
    """The lyric string: only embedded by Qwen3's token table, then encoded by the lyric encoder."""
    return f"# Languages\n{language_text(record)}\n\n# Lyric\n{lyrics_text(record)}{END_OF_TEXT}"
