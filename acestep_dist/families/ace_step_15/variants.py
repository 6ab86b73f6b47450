"""ACE-Step 1.5 variants and what each one trains and samples with.

The variant is read from the checkpoint's config (``is_turbo``, ``model_version``, the DiT and
condition widths), never from a folder name the user happened to choose.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from ...errors import ModelLoadError
from ...flow import (
    TIMESTEP_SAMPLERS,
    DiscreteTimesteps,
    LogitNormalTimesteps,
    MaxLogitNormalTimesteps,
    TimestepSampler,
    TrainingRecipe,
    UniformTimesteps,
)

from .options import VARIANT_NAMES

# The real DiT is 2048 wide; XL DiTs are wider than the condition encoder that feeds them.
_XL_MIN_HIDDEN = 2560


@dataclass(frozen=True)
class VariantSpec:
    name: str
    is_turbo: bool
    is_xl: bool
    default_sampler: str  # one of flow.TIMESTEP_SAMPLERS: how upstream trains this variant
    cfg_dropout: float  # fraction of training samples whose condition becomes null_condition_emb
    default_steps: int
    default_guidance: float
    default_shift: float
    timestep_mu: float = -0.4  # the checkpoint's logit-normal parameters (config.json)
    timestep_sigma: float = 1.0

    @property
    def family_variant(self) -> str:
        """turbo / base / sft without the XL prefix or the shift suffix."""
        return self.name.removeprefix("xl-").split("-")[0]

    @property
    def timestep_sampler(self) -> TimestepSampler:
        return self.recipe().timestep_sampler

    def recipe(
        self,
        sampler: str | None = None,
        cfg_dropout: float | None = None,
        *,
        mu: float | None = None,
        sigma: float | None = None,
        shift: float | None = None,
    ) -> TrainingRecipe:
        """The training draws: this variant's upstream defaults, or the ones a run chooses.

        ``shift`` applies to ``discrete-turbo`` (the table of the 8-step sampler at that shift) and
        ``uniform`` (shifted uniform draws); it defaults to the variant's sampling shift for turbo
        variants, and to 1 (unshifted) for uniform draws on base / SFT, which sample with many steps.
        """
        name = sampler or self.default_sampler
        if name not in TIMESTEP_SAMPLERS:
            raise ValueError(f"unknown timestep sampler {name!r}; known: {', '.join(TIMESTEP_SAMPLERS)}")
        mu = self.timestep_mu if mu is None else mu
        sigma = self.timestep_sigma if sigma is None else sigma
        if name == "discrete-turbo":
            chosen: TimestepSampler = DiscreteTimesteps.shifted(8, self.default_shift if shift is None else shift)
        elif name == "uniform":
            chosen = UniformTimesteps(shift=(self.default_shift if self.is_turbo else 1.0) if shift is None else shift)
        elif name == "logit-normal":
            chosen = LogitNormalTimesteps(mu=mu, sigma=sigma)
        else:
            chosen = MaxLogitNormalTimesteps(mu=mu, sigma=sigma)
        return TrainingRecipe(name, chosen, self.cfg_dropout if cfg_dropout is None else cfg_dropout)


def variant_spec(name: str, timestep_mu: float = -0.4, timestep_sigma: float = 1.0) -> VariantSpec:
    if name not in VARIANT_NAMES:
        raise ModelLoadError(f"unknown ACE-Step 1.5 variant {name!r}; known: {', '.join(VARIANT_NAMES)}")
    is_xl = name.startswith("xl-")
    kind = name.removeprefix("xl-")
    if kind.startswith("turbo"):
        # Turbo is distilled for 8 shifted steps; the original trainer draws t from that same schedule.
        shift = 1.0 if kind == "turbo-shift1" else 3.0
        sampler = "uniform" if kind == "turbo-continuous" else "discrete-turbo"
        return VariantSpec(name, True, is_xl, sampler, 0.0, 8, 1.0, shift, timestep_mu, timestep_sigma)
    # upstream base/SFT: the model's own sample_t_r (max of two logit-normal draws), 15 % null
    # condition; inference: 30 steps, guidance 7 through APG
    return VariantSpec(name, False, is_xl, "max-logit-normal", 0.15, 30, 7.0, 3.0, timestep_mu, timestep_sigma)


def detect_variant(transformer_config: Mapping[str, Any], extra: Mapping[str, Any] | None = None) -> VariantSpec:
    """Decide the variant from a DiT config (diffusers or upstream keys) plus optional upstream extras.

    ``extra`` may carry upstream-only fields: ``timestep_mu``, ``timestep_sigma``, ``shift``.
    A ``model_version`` that is one of ``VARIANT_NAMES`` (as our tiny checkpoints and exports write
    it) is taken as is.
    """
    merged = {**transformer_config, **(extra or {})}
    version = str(merged.get("model_version") or "").lower()
    hidden = int(merged.get("hidden_size", 2048))
    encoder_hidden = merged.get("encoder_hidden_size")
    is_xl = version.startswith("xl") or hidden >= _XL_MIN_HIDDEN or (encoder_hidden is not None and encoder_hidden != hidden)
    kind = version.removeprefix("xl-")
    if kind not in VARIANT_NAMES:
        if bool(merged.get("is_turbo")) or "turbo" in version:
            shift = merged.get("shift")
            if "continuous" in version:
                kind = "turbo-continuous"
            elif "shift1" in version or (shift is not None and float(shift) == 1.0):
                kind = "turbo-shift1"
            elif "shift3" in version:
                kind = "turbo-shift3"
            else:
                kind = "turbo"
        else:
            kind = "sft" if "sft" in version else "base"
    # XL ships one turbo schedule
    name = f"xl-{kind.split('-')[0]}" if is_xl else kind
    return variant_spec(
        name,
        timestep_mu=float(merged.get("timestep_mu", -0.4)),
        timestep_sigma=float(merged.get("timestep_sigma", 1.0)),
    )
