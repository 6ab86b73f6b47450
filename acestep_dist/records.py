"""The one record type every source produces and every later stage consumes.

A record is metadata only: where the audio is and the texts that describe it. Which windows of the
audio become samples is prep's plan (``prep.plan_input``), recorded per sample (its ``offset``).
Times are in seconds, like lhotse's cuts.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any


@dataclass(frozen=True)
class Record:
    key: str
    audio: str = ""  # path or URL of the source audio; empty for text-only uses (generation)
    caption: str = ""
    lyrics: str | None = None  # None: no lyrics known (instrumental)
    bpm: int | None = None
    keyscale: str | None = None
    timesignature: str | None = None
    language: str | None = None
    duration: float | None = None  # seconds of audio this record stands for (the prompt's metas line)
    alt_captions: tuple[str, ...] = ()  # alternative captions sampled at training time
    repeat: int = 1  # epoch multiplier
    extra: dict[str, Any] = field(default_factory=dict)
    # Where in the source the record came from (``FILE:LINE``, ``DATASET[INDEX]``, a folder's audio
    # file), for reports and messages. Not part of what is prepared: ``to_dict`` leaves it out and
    # equality ignores it, so the same songs listed by two sources (or a renumbered manifest) give
    # equal records and the same shards.
    row: str = field(default="", compare=False)

    def with_(self, **changes: Any) -> "Record":
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        del data["row"]
        data["alt_captions"] = list(self.alt_captions)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Record":
        data = dict(data)
        data["alt_captions"] = tuple(data.get("alt_captions") or ())
        return cls(**data)
