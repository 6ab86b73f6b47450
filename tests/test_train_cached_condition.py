"""Prep with ``cache_condition=true`` and training on its shards, through the real stages (Ray Data
prep, Ray Train + DeepSpeed): the run ends with the weights of the same run on plain shards, and
the cached shards cost the bytes of the condition they hold."""

from __future__ import annotations

import json

import pytest
import torch

from acestep_dist.config import PrepConfig, TrainConfig
from acestep_dist.families.ace_step_15.lora_formats import read_lora
from acestep_dist.inspect_report import inspect_output
from pipelines.prep import EXIT_OK, run_prep
from pipelines.train import run_train
from conftest import TRAIN_COMMON

torch.set_num_threads(1)


@pytest.mark.slow
def test_a_run_on_cached_conditions_ends_with_the_weights_of_the_run_on_plain_shards(
        tmp_path, corpus, prep_model, train_shards, reference_run):
    cached = tmp_path / "cached"
    # float32: lossless, so the two runs must agree to float noise (bf16, the default, rounds the condition)
    result = run_prep(str(corpus / "music"), str(prep_model), str(cached),
                      PrepConfig(max_duration=6, cache_condition=True, cache_condition_dtype="float32"),
                      log=lambda _: None)
    assert result.exit_code == EXIT_OK

    plain_rows = [json.loads(line) for line in (train_shards / "manifest.jsonl").read_text().splitlines()]
    cached_rows = [json.loads(line) for line in (cached / "manifest.jsonl").read_text().splitlines()]
    assert [r["key"] for r in cached_rows] == [r["key"] for r in plain_rows]
    for row in cached_rows:  # lyric tokens + one timbre token + caption tokens
        assert row["condition_tokens"] == row["lyric_tokens"] + 1 + row["text_tokens"]
    markers = [json.loads(p.read_text()) for p in sorted(cached.glob("shard-*.json"))]
    assert len({m["feature_sources"]["condition_states"] for m in markers}) == 1
    assert inspect_output(str(cached), log=lambda _: None)[1] == 0  # the schema's checks pass on float32 conditions

    config = TrainConfig(**TRAIN_COMMON, train_batch_size=2, zero_stage=2, validation_step_interval=5,
                         validation_audio_duration=2.0, validation_prompt="calm piano",
                         validation_lyrics="[verse]\nla la")  # the reference run's settings
    run = tmp_path / "run"
    assert run_train(config, str(cached), str(prep_model), str(run), workers=1, log=lambda _: None).steps == 10
    state = json.loads((run / "final" / "acedist_state.json").read_text())
    assert state["cached_condition"] is True
    # rank 0 loaded the whole model for its validation renders, and still trained on the cache
    assert sorted(p.name for p in (run / "samples").iterdir()) == ["step-10.wav", "step-5.wav"]

    ours = read_lora(run / "final" / "lora.safetensors").state
    reference = read_lora(reference_run / "final" / "lora.safetensors").state
    assert ours.keys() == reference.keys()
    for key in ours:
        torch.testing.assert_close(ours[key], reference[key], rtol=0, atol=1e-5)
