import math

import pytest
import torch

from acestep_dist.flow import (
    DiscreteTimesteps,
    MaxLogitNormalTimesteps,
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


def _median_and_low_share(t: torch.Tensor) -> tuple[float, float]:
    return float(t.median()), float((t < 0.2).float().mean())


def _logit_normal_figures(mu: float, sigma: float, draws: int) -> tuple[float, float]:
    """Median and P(t < 0.2) of the max of ``draws`` sigmoid(N(mu, sigma)) values, in closed form:
    P(max < x) = Phi((logit x - mu) / sigma) ** draws."""
    z = torch.special.ndtri(torch.tensor(0.5 ** (1 / draws), dtype=torch.float64))
    median = torch.sigmoid(mu + sigma * z)
    low = torch.special.ndtr(torch.tensor((math.log(0.2 / 0.8) - mu) / sigma, dtype=torch.float64)) ** draws
    return float(median), float(low)


def test_base_sft_and_xl_draw_upstreams_max_of_two_logit_normals():
    """Upstream's sample_t_r(use_meanflow=False): two sigmoid(N(-0.4, 1)) draws, t = the larger:
    median 0.536 and P(t < 0.2) 2.6 % (one draw: 0.401 and 16.2 %)."""
    median_expected, low_expected = _logit_normal_figures(-0.4, 1.0, draws=2)
    assert abs(median_expected - 0.536) < 1e-3 and abs(low_expected - 0.026) < 1e-3
    for variant in ("base", "sft", "xl-base", "xl-sft"):
        spec = variant_spec(variant)
        assert spec.default_sampler == "max-logit-normal"
        sampler = spec.timestep_sampler
        assert isinstance(sampler, MaxLogitNormalTimesteps) and (sampler.mu, sampler.sigma) == (-0.4, 1.0)
        t = sampler.sample(N, torch.Generator().manual_seed(1))
        assert t.min() > 0 and t.max() < 1
        median, low = _median_and_low_share(t)
        assert abs(median - median_expected) <= 0.005, (variant, median)
        assert abs(low - low_expected) <= 0.002, (variant, low)


def test_single_logit_normal_stays_selectable():
    t = variant_spec("base").recipe("logit-normal").timestep_sampler.sample(N, torch.Generator().manual_seed(4))
    median, low = _median_and_low_share(t)
    median_expected, low_expected = _logit_normal_figures(-0.4, 1.0, draws=1)
    assert abs(median - median_expected) <= 0.005 and abs(low - low_expected) <= 0.004
    logit = torch.log(t / (1 - t)).double()
    assert abs(logit.mean().item() + 0.4) <= 0.02 and abs(logit.std().item() - 1.0) <= 0.02


@pytest.mark.parametrize("variant, median, low", [
    ("turbo", 0.7917, 0.0), ("xl-turbo", 0.7917, 0.0), ("turbo-shift1", 0.5625, 0.125),
    # uniform shifted by 3: t = 3u / (1 + 2u), median at u = .5 -> .75; t < .2 when u < 1/13
    ("turbo-continuous", 0.75, 1 / 13),
])
def test_turbo_variants_default_recipes(variant, median, low):
    recipe = variant_spec(variant).recipe()
    assert recipe.cfg_dropout == 0.0
    t = recipe.timestep_sampler.sample(N, torch.Generator().manual_seed(5))
    got_median, got_low = _median_and_low_share(t)
    # discrete tables: the median lies between the two middle values; compare the mean of those
    if isinstance(recipe.timestep_sampler, DiscreteTimesteps):
        values = sorted(recipe.timestep_sampler.values)
        assert got_median in values[3:5]
        assert abs((values[3] + values[4]) / 2 - median) <= 0.001
    else:
        assert abs(got_median - median) <= 0.006
    assert abs(got_low - low) <= 0.004


def test_recipe_can_be_chosen_per_run():
    # upstream's newer trainer: the continuous max-of-two sampler and 15 % dropout for turbo too
    recipe = variant_spec("turbo").recipe("max-logit-normal", 0.15)
    assert isinstance(recipe.timestep_sampler, MaxLogitNormalTimesteps) and recipe.cfg_dropout == 0.15
    # the original trainer's table on a base model: the 8 steps at the base's sampling shift
    assert variant_spec("base").recipe("discrete-turbo").timestep_sampler.values == pytest.approx(TURBO_VALUES, abs=1e-4)
    assert variant_spec("base").recipe("discrete-turbo", 0.0).cfg_dropout == 0.0
    plain = variant_spec("base").recipe("uniform", shift=None).timestep_sampler
    assert isinstance(plain, UniformTimesteps) and plain.shift == 1.0
    assert variant_spec("sft").recipe("max-logit-normal", mu=0.3, sigma=0.7).timestep_sampler == MaxLogitNormalTimesteps(0.3, 0.7)
    with pytest.raises(ValueError, match="unknown timestep sampler"):
        variant_spec("base").recipe("cosine")


def test_cfg_dropout_rate_per_variant():
    assert variant_spec("turbo").cfg_dropout == 0.0
    rate = variant_spec("base").recipe().cfg_dropout
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
