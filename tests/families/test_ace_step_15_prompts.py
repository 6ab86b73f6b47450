"""Per-row prompt formatting equals what diffusers' pipeline formats for each row alone."""

import pytest
import torch
from diffusers import AceStepPipeline

from acestep_dist.families.ace_step_15 import AceStep15
from acestep_dist.families.ace_step_15 import prompts
from acestep_dist.records import Record

ROWS = [
    Record(key="a", caption="baroque chorale, church organ, G major, 3/4", lyrics="[verse]\nNimm von uns, Herr",
           bpm=120, keyscale="G major", timesignature="3", language="de", duration=43.6),
    Record(key="b", caption="irish folk, fiddle, jig", lyrics="[verse]\nover the hills\n[chorus]\naway",
           bpm=132.4, keyscale="D major", timesignature="6", language="en", duration=21.2),
    Record(key="c", caption="solo piano, ragtime", lyrics=None, bpm=None, keyscale=None, timesignature=None,
           language=None, duration=180.0),
]


def _pipeline_strings(row: Record) -> tuple[str, str]:
    """What AceStepPipeline formats for this row alone (its metadata passed as the batch's)."""
    return AceStepPipeline._format_prompt(
        AceStepPipeline,
        prompt=row.caption,
        lyrics=prompts.lyrics_text(row),
        vocal_language=prompts.language_text(row),
        audio_duration=row.duration,
        bpm=prompts.normalize_bpm(row.bpm),
        keyscale=row.keyscale,
        timesignature=row.timesignature,
    )


def test_each_row_string_is_byte_equal_to_the_pipeline_alone():
    for row in ROWS:
        text, lyric = _pipeline_strings(row)
        assert prompts.text_prompt(row).encode() == text.encode()
        assert prompts.lyric_prompt(row).encode() == lyric.encode()


def test_rows_keep_their_own_metadata():
    texts = [prompts.text_prompt(r) for r in ROWS]
    assert "- bpm: 120\n" in texts[0] and "- bpm: 132\n" in texts[1] and "- bpm: N/A\n" in texts[2]
    assert "- keyscale: G major\n" in texts[0] and "- keyscale: D major\n" in texts[1]
    assert "- duration: 43 seconds\n" in texts[0] and "- duration: 180 seconds\n" in texts[2]
    assert prompts.lyric_prompt(ROWS[2]) == "# Languages\nunknown\n\n# Lyric\n[Instrumental]<|endoftext|>"


def test_batched_encoding_equals_the_pipeline_per_row(tiny_turbo):
    """Hidden states and lyric ids of a mixed batch equal diffusers' encode_prompt on each row alone."""
    family = AceStep15.load(tiny_turbo, ("text_encoder", "tokenizer"))
    pipe = AceStepPipeline.from_pretrained(tiny_turbo)
    text_states = family.encode_text(ROWS)
    lyric_ids = family.tokenize_lyrics(ROWS)
    for row, states, ids in zip(ROWS, text_states, lyric_ids):
        ref_text, ref_mask, ref_lyric, ref_lyric_mask = pipe.encode_prompt(
            prompt=row.caption,
            lyrics=prompts.lyrics_text(row),
            device="cpu",
            vocal_language=prompts.language_text(row),
            audio_duration=row.duration,
            bpm=prompts.normalize_bpm(row.bpm),
            keyscale=row.keyscale,
            timesignature=row.timesignature,
        )
        assert ref_mask.all() and ref_lyric_mask.all()  # one row: no padding
        assert states.shape == ref_text[0].shape
        assert torch.allclose(states, ref_text[0], atol=1e-5)
        assert ids.dtype == torch.int32
        assert torch.equal(ref_lyric[0], pipe.text_encoder.get_input_embeddings()(ids.long()))
    # the rows differ: different lengths and states
    assert len({s.shape[0] for s in text_states}) > 1


@pytest.mark.parametrize("bpm, expected", [(None, None), ("", None), (0, None), (-3, None), (119.6, 120), ("98", 98)])
def test_bpm_normalisation(bpm, expected):
    assert prompts.normalize_bpm(bpm) == expected
