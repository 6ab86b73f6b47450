"""Flow-matching maths shared by every family: timestep samplers, noising, CFG dropout, the loss.

Conventions (ACE-Step 1.5 and diffusers): t in [0, 1], t = 1 is pure noise,
``x_t = t * noise + (1 - t) * x0`` and the model predicts the velocity ``v = noise - x0``.
Every draw takes an explicit ``torch.Generator`` so that a sample's randomness depends only on
its own seed, never on which other samples share its batch or which worker runs it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch


def shift_timesteps(t: torch.Tensor, shift: float) -> torch.Tensor:
    """The flow-matching shift ``t' = s t / (1 + (s - 1) t)`` (identity for s = 1)."""
    if shift == 1.0:
        return t
    return shift * t / (1 + (shift - 1) * t)


def inference_timesteps(num_steps: int, shift: float) -> torch.Tensor:
    """The sampling schedule: ``linspace(1, 0, N + 1)`` shifted, final 0 dropped (as diffusers does)."""
    t = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)
    return shift_timesteps(t, shift)[:-1].to(torch.float32)


@dataclass(frozen=True)
class DiscreteTimesteps:
    """Turbo (guidance-distilled) training: t drawn uniformly from the sampler's fixed schedule."""

    values: tuple[float, ...]

    @classmethod
    def shifted(cls, num_steps: int = 8, shift: float = 3.0) -> "DiscreteTimesteps":
        return cls(tuple(float(v) for v in inference_timesteps(num_steps, shift)))

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        index = torch.randint(len(self.values), (n,), generator=generator)
        return torch.tensor(self.values, dtype=torch.float32)[index]


@dataclass(frozen=True)
class LogitNormalTimesteps:
    """One logit-normal draw: ``t = sigmoid(N(mu, sigma))`` (the common SD3-style recipe)."""

    mu: float = -0.4
    sigma: float = 1.0

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        logits = torch.randn(n, generator=generator) * self.sigma + self.mu
        return torch.sigmoid(logits)


@dataclass(frozen=True)
class MaxLogitNormalTimesteps:
    """ACE-Step 1.5's own training draw (the model files' ``sample_t_r`` with mean-flow off): two
    logit-normal values, t = the larger (r = t). It leans towards noise: with mu -0.4, sigma 1 the
    median t is 0.536 and P(t < 0.2) 2.6 %, where one draw gives 0.401 and 16.2 %."""

    mu: float = -0.4
    sigma: float = 1.0

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        # t first, then r, as upstream draws them; the max is symmetric, the order keeps streams comparable
        first = torch.sigmoid(torch.randn(n, generator=generator) * self.sigma + self.mu)
        second = torch.sigmoid(torch.randn(n, generator=generator) * self.sigma + self.mu)
        return torch.maximum(first, second)


@dataclass(frozen=True)
class UniformTimesteps:
    """Continuous-time turbo variants: t uniform in (0, 1], shifted."""

    shift: float = 1.0

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        # 1 - U[0, 1) lies in (0, 1]: t = 0 would be a clean input with nothing to denoise.
        return shift_timesteps(1.0 - torch.rand(n, generator=generator), self.shift)


TimestepSampler = DiscreteTimesteps | LogitNormalTimesteps | MaxLogitNormalTimesteps | UniformTimesteps

# The names a training config picks a sampler by.
TIMESTEP_SAMPLERS = ("discrete-turbo", "max-logit-normal", "logit-normal", "uniform")


@dataclass(frozen=True)
class TrainingRecipe:
    """What the loss draws per sample: its timestep sampler and the CFG (null-condition) dropout rate."""

    sampler_name: str
    timestep_sampler: TimestepSampler
    cfg_dropout: float

    def describe(self) -> str:
        def short(value):
            return [round(v, 4) for v in value] if isinstance(value, tuple) else round(value, 4)

        parameters = ", ".join(f"{name}={short(value)}" for name, value in vars(self.timestep_sampler).items())
        return f"timesteps {self.sampler_name} ({parameters}), cfg_dropout {self.cfg_dropout:g}"


def cfg_dropout_mask(n: int, rate: float, generator: torch.Generator) -> torch.Tensor:
    """True where a sample's whole condition is replaced by the null condition."""
    if rate <= 0.0:
        return torch.zeros(n, dtype=torch.bool)
    return torch.rand(n, generator=generator) < rate


def noise_latents(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(x_t, v_target)`` for latents ``[B, T, C]`` and timesteps ``[B]``."""
    t = t.to(x0.dtype).view(-1, *([1] * (x0.dim() - 1)))
    return t * noise + (1 - t) * x0, noise - x0


def masked_mse_per_sample(prediction: torch.Tensor, target: torch.Tensor, frame_mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error per sample over its valid frames only: ``[B, T, C]`` x2, ``[B, T]`` -> ``[B]``.

    Padded frames contribute nothing, so a sample's loss does not depend on what it was batched with.
    """
    squared = (prediction.float() - target.float()).pow(2).mean(dim=-1)
    mask = frame_mask.to(squared.dtype)
    return (squared * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)


def per_sample_generators(seeds: Sequence[int]) -> list[torch.Generator]:
    """One CPU generator per sample (CPU so draws are identical on every device)."""
    return [torch.Generator("cpu").manual_seed(int(seed)) for seed in seeds]


_LOGIT_NORMAL = ("max-logit-normal", "logit-normal")


def sampler_parameter_problem(sampler: str, config) -> str | None:
    """Why the timestep_* settings do not fit ``sampler``, or None when they do."""
    if sampler in _LOGIT_NORMAL and config.timestep_shift is not None:
        return f"timestep_shift applies to the discrete-turbo and uniform samplers, not {sampler}"
    if sampler not in _LOGIT_NORMAL and (config.timestep_mu is not None or config.timestep_sigma is not None):
        return f"timestep_mu / timestep_sigma apply to the logit-normal samplers, not {sampler}"
    return None
