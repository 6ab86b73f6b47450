"""The training data order: world-size independent, repeats honoured, captions sampled per epoch."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch

from acestep_dist.config import PrepConfig
from acestep_dist.errors import UserError
from acestep_dist.train.data import EpochPlan, SampleReader, SampleRef, open_training_data
from pipelines.prep import EXIT_OK, run_prep
from acestep_dist.families import get as get_family

SCHEMA = get_family("ace-step-1.5").schema


def _refs(repeats=(1, 1, 1, 1, 1, 1), alternatives=0) -> list[SampleRef]:
    return [SampleRef(f"s{i}", "x.tar", 0, 0, r, alternatives) for i, r in enumerate(repeats)]


def _global_batches(plan: EpochPlan, steps: int) -> list[list[tuple[int, int]]]:
    """Per step: the (epoch position, sample) pairs of all ranks and micro-steps, sorted."""
    out = []
    for step in range(steps):
        items = [i for micro in range(plan.accumulation) for rank in range(plan.world_size)
                 for i in plan.micro_batch_items(step, micro, rank)]
        out.append(sorted((i.position, i.ref) for i in items))
    return out


def test_the_samples_of_a_step_do_not_depend_on_the_worker_layout():
    refs = _refs()
    one = EpochPlan(refs, seed=7, micro_batch=4, accumulation=1, world_size=1)
    two = EpochPlan(refs, seed=7, micro_batch=1, accumulation=2, world_size=2)
    assert one.global_batch == two.global_batch == 4
    assert _global_batches(one, 6) == _global_batches(two, 6)
    # ranks never share a sample within a step
    for step in range(3):
        seen = [i.position for rank in range(2) for micro in range(2) for i in two.micro_batch_items(step, micro, rank)]
        assert len(set(seen)) == len(seen)


def test_epochs_are_reshuffled_from_the_seed_and_repeats_are_honoured():
    plan = EpochPlan(_refs(repeats=(1, 3, 1, 1)), seed=1, micro_batch=1, accumulation=1, world_size=1)
    assert plan.epoch_size == 6 and plan.steps_per_epoch == 6
    epoch0 = [plan.micro_batch_items(s, 0, 0)[0].ref for s in range(6)]
    epoch1 = [plan.micro_batch_items(s, 0, 0)[0].ref for s in range(6, 12)]
    assert Counter(epoch0) == Counter({0: 1, 1: 3, 2: 1, 3: 1}) == Counter(epoch1)
    orders = {tuple(EpochPlan(_refs(), seed=1, micro_batch=1, accumulation=1, world_size=1).order(e)) for e in range(5)}
    assert len(orders) > 1
    again = EpochPlan(_refs(repeats=(1, 3, 1, 1)), seed=1, micro_batch=1, accumulation=1, world_size=1)
    assert epoch0 == [again.micro_batch_items(s, 0, 0)[0].ref for s in range(6)]


def test_too_little_data_for_one_global_batch_is_a_clear_error():
    with pytest.raises(UserError, match="fewer than one global batch of 8"):
        EpochPlan(_refs(), seed=0, micro_batch=2, accumulation=2, world_size=2)


def test_caption_sampling_draws_both_captions_reproducibly():
    def draws(seed):
        plan = EpochPlan(_refs(repeats=(1,), alternatives=1), seed=seed, micro_batch=1, accumulation=1, world_size=1)
        return [plan.micro_batch_items(epoch, 0, 0)[0].caption for epoch in range(40)]

    first = draws(11)
    assert set(first) == {0, 1} and 8 <= first.count(1) <= 32
    assert draws(11) == first
    assert draws(12) != first
    plain = EpochPlan(_refs(repeats=(1,)), seed=11, micro_batch=1, accumulation=1, world_size=1)
    assert {plain.micro_batch_items(e, 0, 0)[0].caption for e in range(40)} == {0}


def test_the_reader_hands_out_the_sampled_caption_states(tmp_path, corpus, prep_model, ray_session):
    audio = sorted((corpus / "music").glob("*.wav"))[0]
    manifest = tmp_path / "songs.jsonl"
    manifest.write_text(json.dumps({"key": "song", "audio": str(audio), "caption": "tags, folk",
                                    "alt_captions": ["a long descriptive recaption of the song"]}) + "\n")
    out = tmp_path / "shards"
    assert run_prep(str(manifest), str(prep_model), str(out), PrepConfig(max_duration=2),
                    log=lambda _: None).exit_code == EXIT_OK
    refs = open_training_data(str(out)).refs
    assert [(r.key, r.alternatives) for r in refs] == [("song", 1)]
    plan, reader = EpochPlan(refs, seed=4, micro_batch=1, accumulation=1, world_size=1), SampleReader(refs, SCHEMA)
    seen = {}
    for epoch in range(30):
        item = plan.micro_batch_items(epoch, 0, 0)[0]
        seen.setdefault(item.caption, reader.read(item)["text_states"])
    assert set(seen) == {0, 1}
    assert seen[0].shape[0] < seen[1].shape[0]  # the recaption is the longer prompt
    assert not torch.equal(seen[0][:5], seen[1][:5]) or seen[0].shape != seen[1].shape
