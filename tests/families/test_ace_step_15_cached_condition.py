"""ACE-Step 1.5's cached condition (prep ``cache_condition=true``): the condition encoder's output
stored with each sample gives the loss and the gradients of the condition computed in the loop, and a
trainable on such data never builds the condition encoder nor the text encoder. Driver refusals:
a run training the lyric encoder, and a model whose condition encoder is not the one prep ran."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load as load_safetensors

from acestep_dist.config import TrainConfig
from acestep_dist.errors import UserError
from acestep_dist.families import get
from acestep_dist.flow import per_sample_generators
from acestep_dist.records import Record
from conftest import write_tiny

torch.set_num_threads(1)

FAMILY = get("ace-step-1.5")
ROWS = [
    Record(key="a", caption="calm piano", lyrics="[verse]\nla la la", bpm=80, language="en", duration=2.0,
           alt_captions=("slow solo piano, sparse",)),
    Record(key="b", caption="fast brass band with drums, festive, march", lyrics=None, bpm=130, duration=2.0),
    Record(key="c", caption="organ", lyrics="[verse]\nNimm von uns, Herr, du treuer Gott\n[chorus]\nAmen",
           language="de", duration=2.0),
]
SEEDS = [5, 4, 7]  # the base recipe drops the condition (CFG dropout 0.15) in seed 4's draws: see below
CONFIG = dict(lora_rank=4, lora_alpha=8.0, lora_dropout=0.0, seed=3)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return write_tiny(tmp_path_factory.mktemp("cached") / "model", "base")


def _prepared_samples(model, dtype: str) -> list[dict[str, torch.Tensor]]:
    """The three rows as prep stores them: text tensors from the family's encode-text model with
    cache_condition, random latents, packed into the schema's blob and read back (caption 0 for
    a, b, c; the alternative caption of a as a fourth sample)."""
    description = FAMILY.describe(str(model))
    options = FAMILY.prep_options(cache_condition=True, cache_condition_dtype=dtype)
    encoder = FAMILY.load(description, "encode-text")
    texts = encoder.encode_text(ROWS, options)
    alternative = encoder.encode_text([ROWS[0].with_(caption=ROWS[0].alt_captions[0])], options)
    generator = torch.Generator().manual_seed(0)
    samples = []
    for index, text in enumerate(texts):
        frames = (50, 39, 20)[index]  # one odd length: a patch straddles the padding
        mean = torch.randn(frames, description.dimensions["latent_dim"], generator=generator)
        audio = {"latent_mean": mean, "latent_std": 0.1 + torch.rand(mean.shape, generator=generator)}
        blob = FAMILY.schema.pack({**audio, **text}, alternative if index == 0 else ())
        stored = load_safetensors(blob)
        samples.append(FAMILY.schema.for_caption(stored, 0))
        if index == 0:
            samples.append(FAMILY.schema.for_caption(stored, 1))
    return samples


def _loss_and_grads(trainable, loaded, samples):
    batch = loaded.collate(samples)
    loss, per_sample, _ = trainable.module(batch, per_sample_generators(SEEDS + [8][: len(samples) - 3]))
    loss.backward()
    grads = {name: p.grad.clone() for name, p in trainable.module.named_parameters() if p.grad is not None}
    return per_sample.detach(), grads


def _refuse_to_build(monkeypatch) -> None:
    """Building the condition encoder or any transformers model (the text encoder) fails the test."""
    from diffusers.pipelines.ace_step import AceStepConditionEncoder
    from transformers import AutoModel

    def refused(*args, **kwargs):
        raise AssertionError("a run on cached conditions built the condition encoder or the text encoder")

    monkeypatch.setattr(AceStepConditionEncoder, "__init__", refused)
    monkeypatch.setattr(AutoModel, "from_pretrained", refused)


def test_cached_condition_gives_the_loss_and_gradients_of_the_condition_in_the_loop(model, monkeypatch):
    samples = _prepared_samples(model, "float32")
    assert [s["condition_states"].dtype for s in samples] == [torch.float32] * 4
    # each row's condition is as long as its lyric tokens + one timbre token + its caption tokens
    for sample in samples:
        assert sample["condition_states"].shape[0] == sample["lyric_ids"].shape[0] + 1 + sample["text_states"].shape[0]
    description = FAMILY.describe(str(model))
    config = TrainConfig(**CONFIG)
    options = FAMILY.options(config)

    in_loop = FAMILY.load(description, "train")
    reference, reference_grads = _loss_and_grads(in_loop.trainable(config, options),
                                                 in_loop, [{k: v for k, v in s.items() if k != "condition_states"}
                                                           for s in samples])

    # one sample trains on the null condition: the cached path replaces it the same way
    from acestep_dist.flow import cfg_dropout_mask

    recipe = in_loop.model.variant.recipe()
    drops = []
    for generator in per_sample_generators(SEEDS):
        recipe.timestep_sampler.sample(1, generator)
        drops.append(bool(cfg_dropout_mask(1, recipe.cfg_dropout, generator)[0]))
    assert drops == [False, True, False]

    _refuse_to_build(monkeypatch)
    cached = FAMILY.load(description, "train")
    trainable = cached.trainable(config, options, {"condition_states": "recorded"})
    components = cached.model.components
    assert components.condition_encoder is None and components.text_encoder is None
    assert "cached" in trainable.describe() and trainable.state()["cached_condition"] is True
    losses, grads = _loss_and_grads(trainable, cached, samples)

    torch.testing.assert_close(losses, reference, rtol=1e-5, atol=1e-7)
    assert grads.keys() == reference_grads.keys() and grads
    for name in grads:
        torch.testing.assert_close(grads[name], reference_grads[name], rtol=1e-4, atol=1e-6)


def test_a_bfloat16_cache_stays_within_its_rounding_of_the_loop(model):
    """The default store (bf16, half the bytes): the loss moves by bf16's rounding of the condition only."""
    samples = _prepared_samples(model, "bfloat16")
    assert {s["condition_states"].dtype for s in samples} == {torch.bfloat16}
    description = FAMILY.describe(str(model))
    config = TrainConfig(**CONFIG)
    options = FAMILY.options(config)
    with torch.no_grad():
        in_loop = FAMILY.load(description, "train")
        plain = [{k: v for k, v in s.items() if k != "condition_states"} for s in samples]
        reference = in_loop.trainable(config, options).module(in_loop.collate(plain), per_sample_generators(SEEDS + [8]))[1]
        cached = FAMILY.load(description, "train")
        losses = cached.trainable(config, options, {"condition_states": "x"}).module(
            cached.collate(samples), per_sample_generators(SEEDS + [8]))[1]
    assert not torch.equal(losses, reference)  # the rounding is there
    torch.testing.assert_close(losses, reference, rtol=2e-2, atol=0)


def test_the_driver_refuses_a_cache_the_run_cannot_use(model, tmp_path):
    description = FAMILY.describe(str(model))
    recorded = FAMILY.feature_sources(description, FAMILY.prep_options(cache_condition=True))["condition_states"]
    assert FAMILY.feature_sources(description, FAMILY.prep_options()) == {}
    config = TrainConfig(**CONFIG)
    assert "condition cached by prep" in FAMILY.check_training(description, config, FAMILY.options(config),
                                                               {"condition_states": recorded})

    lyric = TrainConfig(**CONFIG, lyrics_embedder_train=True)
    with pytest.raises(UserError, match="trains the lyric encoder cannot use"):
        FAMILY.check_training(description, lyric, FAMILY.options(lyric), {"condition_states": recorded})
    assert FAMILY.check_training(description, lyric, FAMILY.options(lyric), {})  # without a cache it trains

    # the same architecture, other weights (a fine-tuned or another variant's encoder): refused
    other = FAMILY.describe(str(write_tiny(tmp_path / "other", "base", seed=1)))
    with pytest.raises(UserError, match="another condition encoder"):
        FAMILY.check_training(other, config, FAMILY.options(config), {"condition_states": recorded})


def test_cache_condition_dtype_needs_cache_condition():
    with pytest.raises(ValueError, match="cache_condition is false"):
        FAMILY.prep_options(cache_condition_dtype="float32")
