import pytest
import torch

from acestep_dist.flow import (
    DiscreteTimesteps,
    LogitNormalTimesteps,
    UniformTimesteps,
    cfg_dropout_mask,
    inference_timesteps,
    masked_mse_per_sample,
    noise_latents,
)
from acestep_dist.families.ace_step_15 import variant_spec

N = 100_000
TURBO_VALUES = [1.0, 0.9545, 0.9, 0.8333, 0.75, 0.6429, 0.5, 0.3]


def test_turbo_sampler_draws_only_the_eight_shifted_values_uniformly():
    sampler = variant_spec("turbo").timestep_sampler
    assert isinstance(sampler, DiscreteTimesteps)
    draws = sampler.sample(N, torch.Generator().manual_seed(0))
    values, counts = torch.unique(draws, return_counts=True)
    assert len(values) == 8
    assert sorted(values.tolist(), reverse=True) == pytest.approx(TURBO_VALUES, abs=1e-4)
    for fraction in (counts.float() / N).tolist():
        assert abs(fraction - 1 / 8) <= 0.01


def test_turbo_shift1_uses_the_unshifted_schedule():
    values = variant_spec("turbo-shift1").timestep_sampler.values
    assert values == pytest.approx([1 - i / 8 for i in range(8)])


def test_base_sampler_is_logit_normal_with_upstream_mu_and_sigma():
    for variant in ("base", "sft", "xl-base"):
        sampler = variant_spec(variant).timestep_sampler
        assert isinstance(sampler, LogitNormalTimesteps)
        t = sampler.sample(N, torch.Generator().manual_seed(1))
        assert t.min() > 0 and t.max() < 1
        logit = torch.log(t / (1 - t)).double()
        assert abs(logit.mean().item() - (-0.4)) <= 0.02
        assert abs(logit.std().item() - 1.0) <= 0.02


def test_cfg_dropout_rate_per_variant():
    assert variant_spec("turbo").cfg_dropout == 0.0
    rate = variant_spec("base").cfg_dropout
    dropped = cfg_dropout_mask(N, rate, torch.Generator().manual_seed(2))
    assert abs(dropped.float().mean().item() - 0.15) <= 0.01
    assert not cfg_dropout_mask(N, 0.0, torch.Generator()).any()


def test_continuous_turbo_draws_in_the_open_unit_interval():
    t = UniformTimesteps(shift=3.0).sample(N, torch.Generator().manual_seed(3))
    assert t.min() > 0 and t.max() <= 1
    assert len(torch.unique(t)) > 1000


def test_inference_schedule_matches_diffusers():
    from diffusers import AceStepPipeline

    for steps, shift in [(8, 3.0), (30, 1.0), (4, 2.0)]:
        expected = AceStepPipeline._get_timestep_schedule(None, num_inference_steps=steps, shift=shift, dtype=torch.float32)
        assert torch.allclose(inference_timesteps(steps, shift), expected, atol=1e-6)


def test_noising_and_velocity_target():
    x0, noise = torch.randn(2, 5, 3), torch.randn(2, 5, 3)
    t = torch.tensor([0.0, 1.0])
    x_t, v = noise_latents(x0, noise, t)
    assert torch.allclose(x_t[0], x0[0]) and torch.allclose(x_t[1], noise[1])
    assert torch.allclose(v, noise - x0)


def test_masked_loss_ignores_padded_frames():
    prediction, target = torch.zeros(2, 4, 3), torch.ones(2, 4, 3)
    prediction[0, 2:] = 100.0  # garbage in the padded frames of sample 0
    mask = torch.tensor([[True, True, False, False], [True, True, True, True]])
    assert masked_mse_per_sample(prediction, target, mask).tolist() == [1.0, 1.0]
