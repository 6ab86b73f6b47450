"""Prep stages as plain functions and classes over dict rows (what Ray Data passes around).

    plan_input (per record, on the driver)  ->  expand_windows (hash, one row per window)
      ->  decode_row (CPU task)  ->  AudioEncoder (the family's audio
      encoder, an actor)  ->  TextEncoder (its text encoders, an actor, batched)  ->  the driver
      groups rows into shards

The model is the family's (``families``): these stages hold a ``FamilyModel`` and its schema and
know no tensor names.

A row that fails a stage is marked ``status = "rejected"`` with its stage and reason and passes the
later stages untouched, so one bad file never fails the job or a block of good ones. A stage that
handles several rows at once (the text encoder) retries them one by one when the batch fails, so
only the row at fault is rejected.
"""

from __future__ import annotations

import json
import math
import random
import traceback
from typing import Any

import numpy as np

from .audio import AudioError, decode_window, probe_audio
from .config import PrepConfig
from .records import Record
from .shards import file_sha256

OK, REJECTED = "ok", "rejected"
# Audio may end this much before its header says without counting as truncated (codec priming and
# end padding: MP3 ~0.03 s, AAC/Opus a few ms).
TRUNCATION_TOLERANCE = 0.25

# Every row carries every column from the start (Ray Data batches rows of one schema); stages
# fill values in and empty the heavy ones they consume.
ROW_DEFAULTS: dict[str, Any] = {
    "status": OK, "stage": "", "reason": "", "warnings": "[]", "key": "", "windows": "[]", "window": 0, "sha256": "",
    "offset": 0.0, "length": 0.0, "duration": 0.0, "wave": b"", "wave_samples": 0,
    "audio_tensors": b"", "tensors": b"", "meta": "",
    # the source's duration as its container states it; 0 when it states none or FFmpeg guessed it
    "header_duration": 0.0,
    # a rejection that condemns the whole input, not just this window (a truncated file)
    "whole_input": False,
}


def _reject(row: dict, stage: str, reason: str) -> dict:
    return {**row, "status": REJECTED, "stage": stage, "reason": reason}


def _warn(row: dict, stage: str, *messages: str) -> dict:
    """Append warnings as ``[stage, message]`` pairs (JSON, so rows keep one flat schema)."""
    notes = json.loads(row.get("warnings") or "[]") + [[stage, m] for m in messages]
    return {**row, "warnings": json.dumps(notes)}


def source_sha256(path: str) -> str:
    import fsspec

    fs, local = fsspec.core.url_to_fs(path)
    return file_sha256(fs, local)[0]


def window_offsets(duration: float, config: PrepConfig, key: str) -> tuple[list[tuple[float, float]], list[str]]:
    """Windows ``(offset, length)`` of a source of ``duration`` seconds, and the warnings they imply."""
    limit = config.max_duration
    if duration <= limit:
        return [(0.0, duration)], []
    if config.crop == "start":
        return [(0.0, limit)], [f"{duration:.0f} s exceeds max {limit:.0f} s; cropped to the first {limit:.0f} s"]
    if config.crop == "random":
        # seeded per key, so a rerun (or another worker) picks the same window
        rng = random.Random(f"{config.crop_seed}:{key}")
        offset = round(rng.uniform(0.0, duration - limit), 3)
        return [(offset, limit)], [f"{duration:.0f} s exceeds max {limit:.0f} s; cropped to {limit:.0f} s at {offset:.3f} s (random, seed {config.crop_seed})"]
    windows = [(k * limit, min(limit, duration - k * limit)) for k in range(math.ceil(duration / limit))]
    warnings = [f"{duration:.0f} s exceeds max {limit:.0f} s; split into segments of {limit:.0f} s"]
    if len(windows) > 1 and windows[-1][1] < config.min_duration:
        warnings.append(f"last segment ({windows[-1][1]:.2f} s) is shorter than the minimum and was dropped")
        windows.pop()
    return windows, warnings


def plan_input(record: Record, config: PrepConfig) -> dict:
    """Probe one input's audio (headers only) and plan its windows: the one place prep probes. The
    row carries the windows as JSON; ``expand_windows`` turns it into one row per window. The
    driver plans every input (shard sizes depend on how many windows each input becomes)."""
    base = {**ROW_DEFAULTS, "record": json.dumps(record.to_dict(), ensure_ascii=False), "key": record.key}
    try:
        return _plan_input(base, record, config)
    except Exception as error:  # a record no stage foresaw must cost this input only
        return _reject(base, "probe", f"{type(error).__name__}: {error}")


def _plan_input(base: dict, record: Record, config: PrepConfig) -> dict:
    try:
        info = probe_audio(record.audio)
    except AudioError as error:
        return _reject(base, "probe", str(error))
    except OSError as error:
        return _reject(base, "probe", f"cannot read file: {error.strerror or error}")
    base = _warn(base, "probe", *info.warnings)
    base["header_duration"] = info.duration if info.duration_known else 0.0
    if not math.isfinite(info.duration):
        # no duration in the container: decode from the start and let the decoded length decide
        windows, notes = [(0.0, config.max_duration)], []
    else:
        if info.duration < config.min_duration:
            return _reject(base, "probe", f"too short: {info.duration:.2f} s < minimum {config.min_duration:.2f} s")
        windows, notes = window_offsets(info.duration, config, record.key)
    return {**_warn(base, "plan", *notes), "windows": json.dumps(windows)}


def window_count(planned: dict) -> int:
    """How many samples a planned input can become (a rejected one counts 1, as its report line)."""
    return len(json.loads(planned["windows"])) if planned["status"] == OK else 1


def expand_windows(row: dict) -> list[dict]:
    """Ray task: hash the input's file once (its samples record the sha256) and fan it out into one
    row per planned window."""
    if row["status"] != OK:
        return [row]
    record = Record.from_dict(json.loads(row["record"]))
    try:
        sha256 = source_sha256(record.audio)
    except OSError as error:
        return [_reject(row, "probe", f"cannot read file: {error.strerror or error}")]
    windows = json.loads(row["windows"])
    return [{**row, "sha256": sha256, "window": index, "offset": offset, "length": length,
             "key": record.key if len(windows) == 1 else f"{record.key}__seg{index:03d}"}
            for index, (offset, length) in enumerate(windows)]


def decode_row(row: dict, config: PrepConfig, sample_rate: int) -> dict:
    """Decode one window to float32 stereo at the model's rate (bytes in the row)."""
    if row["status"] != OK:
        return row
    record = Record.from_dict(json.loads(row["record"]))
    try:
        window = decode_window(record.audio, row["offset"], row["length"], sample_rate)
    except AudioError as error:
        return _reject(row, "decode", str(error))
    except Exception as error:  # a decoder crash must cost this file only
        return _reject(row, "decode", f"{type(error).__name__}: {error}")
    end = row["offset"] + window.duration
    header = row["header_duration"]
    if header and end < min(row["offset"] + row["length"], header) - TRUNCATION_TOLERANCE:
        # the file ends before its header says: the caption describes audio that is not there
        found = f"the audio ends at {end:.2f} s" if window.duration else f"no audio decodes at {row['offset']:.2f} s"
        problem = f"truncated file: its header says {header:.2f} s, but {found}"
        if not config.allow_truncated:
            cause = f" (decoder: {window.stopped_by})" if window.stopped_by else ""
            return {**_reject(row, "decode", problem + cause), "whole_input": True}
        window.warnings = [f"{problem}; kept what decodes (allow_truncated)"]
    row = _warn(row, "decode", *window.warnings)
    if window.zero_fraction > config.silence_fraction:
        return _reject(row, "decode", f"silent audio: {100 * window.zero_fraction:.1f} % exact zeros "
                                      f"(limit {100 * config.silence_fraction:.0f} %)")
    if window.duration < config.min_duration:
        return _reject(row, "decode", f"too short: {window.duration:.2f} s < minimum {config.min_duration:.2f} s")
    if config.estimate_missing:  # on the window just decoded: no second decode
        from .annotate.analysis import fill_missing

        try:
            filled = fill_missing(record, window.wave, window.sample_rate)
        except Exception as error:  # an estimate that fails costs the estimate, not the sample
            row = _warn(row, "estimate", f"values not estimated: {type(error).__name__}: {error}")
        else:
            row = {**row, "record": json.dumps(filled.to_dict(), ensure_ascii=False)}
    return {**row, "wave": window.wave.tobytes(), "wave_samples": window.wave.shape[1], "duration": window.duration}


def _load_model(family_name: str, model: str, purpose: str, device: str | None):
    import torch

    from .families import get

    family = get(family_name)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    return family, family.load(family.describe(model), purpose, dtype=dtype, device=device)


class AudioEncoder:
    """Ray actor: the family's audio tensors of each decoded window, one window per call (no
    padding, so the result does not depend on other windows), as a safetensors blob in the row.
    ``options``: the family's prep options as the driver validated them (None: its defaults)."""

    def __init__(self, family: str, model: str, options: dict | None = None, device: str | None = None):
        self.family, self.model = _load_model(family, model, "encode-audio", device)
        self.options = self.family.prep_options.model_validate(options or {})

    def __call__(self, row: dict) -> dict:
        if row["status"] != OK:
            return row
        import torch
        from safetensors.torch import save as save_safetensors

        try:
            wave = np.frombuffer(row["wave"], dtype=np.float32).reshape(2, row["wave_samples"])
            tensors = self.model.encode_audio(torch.from_numpy(wave.copy()), self.options)
            # float32 on the way to the text stage (the schema's dtype is applied when the sample is
            # packed); bfloat16 stays so: losslessly half the bytes of large features
            blob = save_safetensors({name: value.detach().float().cpu().contiguous()
                                     if value.is_floating_point() and value.dtype != torch.bfloat16
                                     else value.detach().cpu().contiguous() for name, value in tensors.items()})
        except Exception as error:
            return _reject({**row, "wave": b""}, "encode_audio", f"{type(error).__name__}: {error}")
        return {**row, "wave": b"", "audio_tensors": blob}


class TextEncoder:
    """Ray actor: the family's text tensors of a batch of windows (each row as it would be alone),
    packed with the audio tensors into the sample blob of the family's schema, and the sample's meta."""

    def __init__(self, family: str, model: str, config: PrepConfig, options: dict, device: str | None = None):
        self.family, self.model = _load_model(family, model, "encode-text", device)
        self.options = self.family.prep_options.model_validate(options)
        self.config = config

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["key"])
        blobs = np.array([b""] * n, dtype=object)
        metas = np.array([""] * n, dtype=object)
        # object arrays: a fixed-width string array would cut "rejected" to the width of "ok"
        status, stage, reason = (np.array(batch[name], dtype=object) for name in ("status", "stage", "reason"))
        live = [i for i in range(n) if status[i] == OK]
        try:
            encoded = self._encode(batch, live)
        except Exception:
            # One bad row must not cost the rows batched with it: each alone, so only it is rejected.
            # (A row's tensors do not depend on its batch: encode_text never pads.)
            encoded = []
            for i in live:
                try:
                    encoded += self._encode(batch, [i])
                except Exception:
                    status[i], stage[i], reason[i] = REJECTED, "encode_text", _last_error_line()
        for i, blob, meta in encoded:
            blobs[i], metas[i] = blob, meta
        empty = np.array([b""] * n, dtype=object)
        return {**batch, "status": status, "stage": stage, "reason": reason, "tensors": blobs, "meta": metas,
                "audio_tensors": empty}

    def _encode(self, batch: dict[str, np.ndarray], rows: list[int]) -> list[tuple[int, bytes, str]]:
        """(row, sample blob, meta JSON) of the given rows of ``batch``, encoded together."""
        from safetensors.torch import load as load_safetensors

        if not rows:
            return []
        schema = self.family.schema
        records = [
            Record.from_dict(json.loads(batch["record"][i])).with_(duration=float(batch["duration"][i])) for i in rows
        ]
        texts = self.model.encode_text(records, self.options)
        # alternative captions (e.g. upstream recaptions) are encoded too: training samples one per epoch
        alternatives = [(slot, record.with_(caption=alt)) for slot, record in enumerate(records) for alt in record.alt_captions]
        alt_texts: list[list[dict]] = [[] for _ in records]
        if alternatives:
            for (slot, _), encoded in zip(alternatives, self.model.encode_text([r for _, r in alternatives], self.options)):
                alt_texts[slot].append(encoded)
        results = []
        for slot, i in enumerate(rows):
            record = records[slot]
            sample = {**load_safetensors(bytes(batch["audio_tensors"][i])), **texts[slot]}
            meta = {
                "caption": record.caption, "lyrics": record.lyrics, "bpm": record.bpm, "keyscale": record.keyscale,
                "timesignature": record.timesignature, "language": record.language,
                "duration": round(float(batch["duration"][i]), 4), "source": record.audio,
                "sha256": str(batch["sha256"][i]), "offset": float(batch["offset"][i]), "crop": self.config.crop,
                "alt_captions": list(record.alt_captions), "repeat": record.repeat,
                # fields prep estimated (estimate_missing), each with its confidence
                **({"estimated": record.extra["estimated"]} if "estimated" in record.extra else {}),
                **schema.lengths_of(sample, alt_texts[slot]), **schema.identity(),
            }
            results.append((i, schema.pack(sample, alt_texts[slot]), json.dumps(meta, ensure_ascii=False)))
        return results


def _last_error_line() -> str:
    """``ExceptionType: message`` of the exception being handled."""
    return traceback.format_exc(limit=1).strip().splitlines()[-1]
