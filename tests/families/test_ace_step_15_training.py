"""Condition building and the variant-aware loss of the ACE-Step 1.5 family."""

import torch

from acestep_dist.families.ace_step_15 import AceStep15
from acestep_dist.flow import per_sample_generators
from acestep_dist.records import Record

ROWS = [
    Record(key="a", caption="calm piano", lyrics="[verse]\nla la la", bpm=80, language="en", duration=2.0),
    Record(key="b", caption="fast brass band with drums, festive, march", lyrics=None, bpm=130, duration=2.0),
    Record(key="c", caption="organ", lyrics="[verse]\nNimm von uns, Herr, du treuer Gott", language="de", duration=2.0),
]


def _samples(family, seconds=(2.0, 2.0, 2.0)):
    gen = torch.Generator().manual_seed(0)
    samples = []
    for row, states, ids, length in zip(ROWS, family.encode_text(ROWS), family.tokenize_lyrics(ROWS), seconds):
        stats = family.encode_audio(0.1 * torch.randn(2, int(length * family.sample_rate), generator=gen))
        samples.append(dict(latent_mean=stats.mean, latent_std=stats.std, text_states=states, lyric_ids=ids))
    return samples


def test_encode_audio_gives_25_frames_per_second_of_mean_and_positive_std(tiny_turbo):
    family = AceStep15.load(tiny_turbo, ("vae", "transformer"))
    stats = family.encode_audio(torch.zeros(2, 48000 * 3 + 1000))
    assert family.frames_per_second == 25.0
    assert stats.mean.shape == stats.std.shape == (75, family.latent_dim)
    assert (stats.std > 0).all()


def test_batched_condition_equals_each_row_alone_on_real_tokens(tiny_base):
    family = AceStep15.load(tiny_base)
    samples = _samples(family)
    batch = family.collate(samples)
    with torch.no_grad():
        states, mask = family.condition(batch.text_states, batch.text_mask, batch.lyric_ids, batch.lyric_mask)
        for i, sample in enumerate(samples):
            alone = family.collate([sample])
            ref, ref_mask = family.condition(alone.text_states, alone.text_mask, alone.lyric_ids, alone.lyric_mask)
            n = int(ref_mask.sum())
            assert int(mask[i].sum()) == n
            assert torch.allclose(states[i, :n], ref[0, :n], atol=1e-5)


def test_padded_batch_loss_is_mean_of_single_sample_losses(tiny_base):
    """Different latent lengths (one odd, so a patch straddles the padding) and prompt lengths."""
    family = AceStep15.load(tiny_base)
    samples = _samples(family, seconds=(2.0, 1.56, 0.8))
    assert [s["latent_mean"].shape[0] for s in samples] == [50, 39, 20]
    seeds = [11, 12, 13]
    with torch.no_grad():
        loss, per_sample, _ = family.training_loss(family.collate(samples), per_sample_generators(seeds))
        alone = [family.training_loss(family.collate([s]), per_sample_generators([seed]))[0] for s, seed in zip(samples, seeds)]
    assert torch.allclose(per_sample, torch.stack(alone), atol=1e-5)
    assert torch.allclose(loss, torch.stack(alone).mean(), atol=1e-6)
    assert loss.item() > 0


def test_padding_masks_hold_for_one_forward_and_its_checkpointed_recompute(tiny_base):
    """The masks are set for one DiT forward only (nothing stale for the next call), and activation
    checkpointing recomputes the blocks with them: a padded batch's gradients with checkpointing equal
    those without (they would not if the recompute ran unmasked)."""
    from acestep_dist.families.ace_step_15.attention import install_padding_masks

    def grads(checkpointing: bool):
        family = AceStep15.load(tiny_base)
        transformer = family.components.transformer
        transformer.requires_grad_(True).train()
        if checkpointing:
            transformer.enable_gradient_checkpointing(install_padding_masks(transformer).checkpoint)
        samples = _samples(family, seconds=(2.0, 0.8))
        loss, _, _ = family.training_loss(family.collate(samples), per_sample_generators([3, 4]))
        masks = install_padding_masks(transformer)
        assert masks.latent is None and masks.condition is None  # nothing left set after the forward
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in transformer.named_parameters() if p.grad is not None}

    plain_loss, plain = grads(False)
    checkpointed_loss, checkpointed = grads(True)
    assert torch.allclose(plain_loss, checkpointed_loss, atol=1e-6) and plain.keys() == checkpointed.keys()
    assert max((plain[n] - checkpointed[n]).abs().max().item() for n in plain) <= 1e-5


def test_cfg_dropout_replaces_the_whole_condition_with_the_null_embedding(tiny_base):
    """Base drops 15 % of conditions: find a seed that drops and check the loss then ignores the text."""
    family = AceStep15.load(tiny_base)
    samples = _samples(family)[:1]
    other_text = dict(samples[0], text_states=torch.randn_like(samples[0]["text_states"]))
    dropped_seed = next(s for s in range(1000) if _drops(family, s))
    kept_seed = next(s for s in range(1000) if not _drops(family, s))
    with torch.no_grad():
        def loss(sample, seed):
            return family.training_loss(family.collate([sample]), per_sample_generators([seed]))[0]
        assert torch.equal(loss(samples[0], dropped_seed), loss(other_text, dropped_seed))
        assert not torch.equal(loss(samples[0], kept_seed), loss(other_text, kept_seed))


def _drops(family, seed: int) -> bool:
    generator = torch.Generator().manual_seed(seed)
    family.variant.timestep_sampler.sample(1, generator)  # same draw order as training_loss
    return bool(torch.rand(1, generator=generator)[0] < family.variant.cfg_dropout)


def test_turbo_never_drops_the_condition(tiny_turbo):
    family = AceStep15.load(tiny_turbo)
    samples = _samples(family)[:1]
    other_text = dict(samples[0], text_states=torch.randn_like(samples[0]["text_states"]))
    with torch.no_grad():
        for seed in range(20):
            a = family.training_loss(family.collate([samples[0]]), per_sample_generators([seed]))[0]
            b = family.training_loss(family.collate([other_text]), per_sample_generators([seed]))[0]
            assert not torch.equal(a, b)


def test_loss_trains_the_dit(tiny_turbo):
    family = AceStep15.load(tiny_turbo)
    transformer = family.components.transformer.train().requires_grad_(True)
    batch = family.collate(_samples(family))
    loss, _, _ = family.training_loss(batch, per_sample_generators([1, 2, 3]))
    loss.backward()
    grads = [p.grad for p in transformer.parameters()]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)
    assert family.lora_targets("attention") == ("to_q", "to_k", "to_v", "to_out.0")


def test_the_run_config_chooses_the_recipe_the_loss_draws_from(tiny_turbo, tiny_base):
    """timestep_sampler / cfg_dropout from the config reach the loss; parameters of a sampler the run
    does not use are refused, also when the sampler is the variant's default."""
    import pytest

    from acestep_dist.config import TrainConfig, load_config
    from acestep_dist.errors import ConfigError, UserError
    from acestep_dist.flow import MaxLogitNormalTimesteps
    from acestep_dist.families.ace_step_15.options import TrainOptions
    from acestep_dist.families.ace_step_15.training import AceStep15Trainable, training_recipe

    turbo = AceStep15.load(tiny_turbo)
    assert training_recipe(turbo.variant, TrainConfig()).sampler_name == "discrete-turbo"
    chosen = AceStep15Trainable(turbo, TrainConfig(timestep_sampler="max-logit-normal", cfg_dropout=1.0),
                                TrainOptions()).recipe
    assert isinstance(chosen.timestep_sampler, MaxLogitNormalTimesteps) and chosen.cfg_dropout == 1.0
    samples = _samples(turbo)[:1]
    other_text = dict(samples[0], text_states=torch.randn_like(samples[0]["text_states"]))
    with torch.no_grad():
        def loss(sample, recipe):
            return turbo.training_loss(turbo.collate([sample]), per_sample_generators([7]), recipe=recipe)
        dropped, _, t = loss(samples[0], chosen)
        # every condition dropped: the text no longer matters, and t is a continuous draw, not a table value
        assert torch.equal(dropped, loss(other_text, chosen)[0])
        assert float(t[0]) not in turbo.variant.recipe().timestep_sampler.values

    with pytest.raises(ConfigError, match="timestep_mu / timestep_sigma apply to the logit-normal samplers"):
        load_config(TrainConfig, None, ["timestep_sampler=discrete-turbo", "timestep_mu=0.2"])
    with pytest.raises(ConfigError, match="timestep_sampler"):
        load_config(TrainConfig, None, ["timestep_sampler=cosine"])
    with pytest.raises(ConfigError, match="cfg_dropout"):
        load_config(TrainConfig, None, ["cfg_dropout=1.5"])
    base = AceStep15.load(tiny_base, ("transformer", "condition_encoder"))
    with pytest.raises(UserError, match="timestep_shift applies .* not max-logit-normal .*base variant's default"):
        training_recipe(base.variant, TrainConfig(timestep_shift=2.0))
    assert training_recipe(base.variant, TrainConfig(timestep_mu=0.1)).timestep_sampler == MaxLogitNormalTimesteps(0.1, 1.0)
