"""Sampling through diffusers' ``AceStepPipeline`` with per-row prompt formatting.

The pipeline's sampler (Euler over the shifted schedule, APG for base/SFT, the VAE decode and
loudness normalisation) is used as is. Only ``encode_prompt`` is replaced, so a batch may carry its
own bpm / key / time signature / language per row; with one row it gives the same strings, token ids
and hidden states as diffusers.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from diffusers import AceStepPipeline

from ...records import Record
from . import prompts


def _per_row(value: Any, n: int) -> list:
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"expected {n} per-row values, got {len(value)}")
        return list(value)
    return [value] * n


def tokenize(tokenizer, strings: Sequence[str], max_length: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids and mask. Qwen3 runs without an attention mask under causal attention, so
    right padding leaves every real token's state unchanged; left padding would not."""
    encoded = tokenizer(
        list(strings), padding="longest", truncation=True, max_length=max_length, return_tensors="pt", padding_side="right"
    )
    return encoded.input_ids.to(device), encoded.attention_mask.to(device).bool()


class AceStepRowPipeline(AceStepPipeline):
    """``AceStepPipeline`` whose metadata arguments may be lists, one value per prompt."""

    def encode_prompt(
        self,
        prompt,
        lyrics,
        device,
        vocal_language="en",
        audio_duration=60.0,
        instruction=None,
        bpm=None,
        keyscale=None,
        timesignature=None,
        max_text_length=256,
        max_lyric_length=2048,
    ):
        captions = [prompt] if isinstance(prompt, str) else list(prompt)
        n = len(captions)
        rows = [
            Record(key=str(i), caption=caption, lyrics=lyric, bpm=row_bpm, keyscale=row_key,
                   timesignature=row_ts, language=language, duration=duration)
            for i, (caption, lyric, row_bpm, row_key, row_ts, language, duration) in enumerate(
                zip(
                    captions,
                    _per_row(lyrics, n),
                    _per_row(bpm, n),
                    _per_row(keyscale, n),
                    _per_row(timesignature, n),
                    _per_row(vocal_language, n),
                    _per_row(audio_duration, n),
                )
            )
        ]
        instruction = instruction or prompts.TEXT2MUSIC_INSTRUCTION
        text_ids, text_mask = tokenize(self.tokenizer, [prompts.text_prompt(r, instruction) for r in rows], max_text_length, device)
        lyric_ids, lyric_mask = tokenize(self.tokenizer, [prompts.lyric_prompt(r) for r in rows], max_lyric_length, device)
        text_states = self.text_encoder(input_ids=text_ids).last_hidden_state
        lyric_states = self.text_encoder.get_input_embeddings()(lyric_ids)
        return text_states, text_mask, lyric_states, lyric_mask
