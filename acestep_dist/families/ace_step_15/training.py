"""What an ACE-Step 1.5 training worker optimises: the DiT (LoRA or full), optionally the lyric
encoder, and the frozen rest of the condition path, wrapped as one module for DeepSpeed.

``config`` below is always an ``acestep_dist.config.TrainConfig`` (its general keys), ``options``
the family's own ``TrainOptions``."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from ...errors import UserError
from ...flow import TrainingRecipe, sampler_parameter_problem
from ..base import RenderRequest, Trainable
from ..adapters import AdapterSpec, AdapterWeights, check_init_adapter
from ..common import adapter_config, adapter_parameters, adapter_state
from .attention import install_padding_masks
from .family import AceStep15, TrainingBatch
from .lora_formats import check_fits, read_lora, targets_of, write_diffusers
from .options import TrainOptions, lora_targets
from .variants import VariantSpec

ADAPTER_NAME = "default"
LORA_FILE = "lora.safetensors"  # the adapter in diffusers' format
TRANSFORMER_DIR = "transformer"  # full fine-tunes: the DiT in diffusers' format
LYRIC_ENCODER_FILE = "lyric_encoder.safetensors"  # when the lyric encoder was trained


class FlowMatchingModule(torch.nn.Module):
    """``forward(batch, generators)`` -> (mean loss, per-sample losses, timesteps): the family's
    variant-aware loss. Holds every module the loss runs as a child, so DeepSpeed (ZeRO-3
    included) partitions and hooks them all."""

    def __init__(self, family: AceStep15, recipe: TrainingRecipe, cached_condition: bool = False):
        super().__init__()
        self.family = [family]  # a list: not a submodule, just a handle
        self.recipe = recipe
        self.transformer = family.components.transformer
        if not cached_condition:  # on cached conditions neither runs (and neither was loaded)
            self.condition_encoder = family.components.condition_encoder
            self.lyric_embedding = family.lyric_embedding()
        # a buffer, not a parameter: ZeRO-3 leaves it whole (the embedding is never trained)
        self.register_buffer("null_condition", family.null_condition().detach().clone(), persistent=False)

    def forward(self, batch: TrainingBatch, generators: Sequence[torch.Generator]):
        return self.family[0].training_loss(batch, generators, getattr(self, "lyric_embedding", None),
                                            self.null_condition, self.recipe)


def training_recipe(variant: VariantSpec, config) -> TrainingRecipe:
    """The run's timestep sampler and CFG dropout: the variant's upstream recipe unless the config
    names its own."""
    sampler = config.timestep_sampler or variant.default_sampler
    problem = sampler_parameter_problem(sampler, config)
    if problem:
        raise UserError(f"{problem} (the {variant.name} variant's default sampler)")
    return variant.recipe(sampler, config.cfg_dropout, mu=config.timestep_mu, sigma=config.timestep_sigma,
                          shift=config.timestep_shift)


def read_init_lora(path: str) -> AdapterWeights:
    """``init_lora`` read, any failure to read it as a LoRA turned into a UserError naming the file."""
    try:
        return read_lora(path)
    except UserError:
        raise
    except Exception as error:  # a corrupt file fails inside safetensors or JSON with their own exceptions
        raise UserError(f"init_lora {path} cannot be read as a LoRA: {type(error).__name__}: {error}") from None


def refuse_trained_lyric_encoder(options: TrainOptions) -> None:
    if options.lyrics_embedder_train:
        raise UserError("lyrics_embedder_train: the data holds the condition prep computed with the lyric encoder "
                        "as it was (prep cache_condition=true), which a run that trains the lyric encoder cannot use; "
                        "prepare the data again without cache_condition, or leave the lyric encoder frozen")


def check_cached_condition(options: TrainOptions, recorded: str | None, model_condition: str) -> None:
    """A run may use the data's cached condition only when it would compute that condition itself:
    the lyric encoder frozen, and the model's condition encoder the one prep ran (``recorded``:
    its fingerprint in the shard markers; ``model_condition``: this model's)."""
    if recorded is None:
        return
    refuse_trained_lyric_encoder(options)
    if recorded != model_condition:
        raise UserError(f"the data's cached condition was computed by another condition encoder (fingerprint "
                        f"{recorded or 'unrecorded'}, this model's is {model_condition}): prepare the data again with "
                        f"this model, or without cache_condition")


def check_training(transformer_config: dict, variant: VariantSpec, config,
                   options: TrainOptions) -> TrainingRecipe:
    """On the driver, before any worker starts: the recipe, the LoRA preset, and ``init_lora``
    readable and fitting the run's rank, alpha, preset and the model's DiT. The DiT is built on the
    meta device from its config (no weights are read); a worker checks the same again when it
    loads the adapter."""
    recipe = training_recipe(variant, config)
    if config.model_type == "lora":
        targets = lora_targets(config.lora_preset)
    if not config.init_lora:
        return recipe
    if config.model_type != "lora":
        raise UserError("init_lora applies to model_type: lora only")
    from diffusers.models.transformers.ace_step_transformer import AceStepTransformer1DModel

    weights = read_init_lora(config.init_lora)
    with torch.device("meta"):
        transformer = AceStepTransformer1DModel.from_config(transformer_config)
    check_fits(weights, transformer, variant.name, config.init_lora)
    check_init_adapter(weights, config, targets, transformer, f"init_lora {config.init_lora}")
    return recipe


class AceStep15Trainable(Trainable):
    """Freezes everything, then opens what the config trains: LoRA adapters (optionally initialised
    from ``init_lora``) or the whole DiT, and optionally the lyric encoder with its own rate.

    ``cached_condition``: the batches carry prep's condition (the driver checked it is this model's
    and that the lyric encoder stays frozen); the condition encoder and the text encoder's token
    table then need not be loaded, and are not used if they were."""

    def __init__(self, family: AceStep15, config, options: TrainOptions, cached_condition: bool = False):
        from peft import set_peft_model_state_dict

        self.family, self.config, self.options = family, config, options
        self.cached_condition = cached_condition
        if cached_condition:  # the driver refuses this; a direct caller is refused alike
            refuse_trained_lyric_encoder(options)
        components = family.components
        transformer, condition_encoder = components.transformer, components.condition_encoder
        frozen = (transformer,) if cached_condition else (transformer, condition_encoder, family.lyric_embedding())
        for module in frozen:
            module.requires_grad_(False)
        self.targets: tuple[str, ...] = ()
        if config.model_type == "lora":
            self.targets = lora_targets(config.lora_preset)
            init = read_init_lora(config.init_lora) if config.init_lora else None
            if init is not None:  # checked against the plain DiT, before adapters wrap its layers
                check_fits(init, transformer, family.variant.name, config.init_lora)
                check_init_adapter(init, config, self.targets, transformer, f"init_lora {config.init_lora}")
                init = init.converted(AdapterSpec.from_config(config))  # the run's alpha: the same change
            # adapters start random: seed them, so the start does not depend on what was loaded before
            torch.manual_seed(config.seed)
            transformer.add_adapter(adapter_config(config, self.targets), adapter_name=ADAPTER_NAME)
            if init is not None:
                set_peft_model_state_dict(transformer, init.state, adapter_name=ADAPTER_NAME)
            dit_params = adapter_parameters(transformer)
            for p in dit_params:
                p.requires_grad_(True)
        else:
            if config.init_lora:
                raise UserError("init_lora applies to model_type: lora only")
            transformer.requires_grad_(True)
            dit_params = list(transformer.parameters())
        self.param_groups = [{"params": dit_params, "lr": config.learning_rate, "name": "dit"}]
        if options.lyrics_embedder_train:
            lyric_params = list(condition_encoder.lyric_encoder.parameters())
            for p in lyric_params:
                p.requires_grad_(True)
            self.param_groups.append({"params": lyric_params, "lr": options.lyrics_embedder_lr or config.learning_rate,
                                      "name": "lyric_encoder"})
        transformer.train()
        if not cached_condition:  # dropout and grad tracking in the condition path only when part of it trains
            condition_encoder.train(options.lyrics_embedder_train)
        if config.gradient_checkpointing:  # recomputed blocks need the forward's padding masks
            transformer.enable_gradient_checkpointing(install_padding_masks(transformer).checkpoint)
        if self.trainable_parameters == 0:
            raise UserError("nothing to train: the configuration leaves every parameter frozen")
        self.module = FlowMatchingModule(family, training_recipe(family.variant, config), cached_condition)

    @property
    def recipe(self) -> TrainingRecipe:
        return self.module.recipe

    def describe(self) -> str:
        condition = "; condition cached by prep (condition encoder not loaded)" if self.cached_condition else ""
        return self.recipe.describe() + condition

    def state(self) -> dict:
        return {"variant": self.family.variant.name, "cached_condition": self.cached_condition,
                "recipe": {"timestep_sampler": self.recipe.sampler_name, "cfg_dropout": self.recipe.cfg_dropout}}

    def lora_weights(self) -> AdapterWeights:
        """The adapter as it stands (call under ZeRO-3 parameter gathering)."""
        state = adapter_state(self.family.components.transformer, ADAPTER_NAME)
        return AdapterWeights(AdapterSpec.from_config(self.config), state, targets_of(self.targets))

    def save(self, folder: Path) -> list[str]:
        from safetensors.torch import save_file

        components = self.family.components
        if self.config.model_type == "lora":
            write_diffusers(self.lora_weights(), folder).rename(folder / LORA_FILE)
            written = [LORA_FILE]
        else:
            components.transformer.save_pretrained(str(folder / TRANSFORMER_DIR), safe_serialization=True)
            written = [TRANSFORMER_DIR]
        if self.options.lyrics_embedder_train:
            encoder = components.condition_encoder.lyric_encoder
            save_file({k: v.detach().cpu().contiguous() for k, v in encoder.state_dict().items()},
                      str(folder / LYRIC_ENCODER_FILE))
            written.append(LYRIC_ENCODER_FILE)
        return written

    def render(self, request: RenderRequest) -> torch.Tensor:
        transformer = self.family.components.transformer
        was_training = transformer.training
        transformer.eval()
        try:
            audio = self.family.generate(request.record, duration=request.duration, seed=request.seed,
                                         steps=request.steps, guidance=request.guidance)[0]
        finally:
            transformer.train(was_training)
        return audio[..., : int(round(request.duration * self.family.sample_rate))]


def legacy_weights(state: dict) -> list[str]:
    """The weight files of a run state written before states listed them."""
    files = [LORA_FILE if state.get("model_type") == "lora" else TRANSFORMER_DIR]
    if (state.get("config") or {}).get("lyrics_embedder_train"):
        files.append(LYRIC_ENCODER_FILE)
    return files


def build_trainable(family: AceStep15, config) -> AceStep15Trainable:
    """The trainable of ``config`` for code that works with ACE-Step 1.5 directly (its own keys in
    ``config`` validated here, as the training pipeline does)."""
    return AceStep15Trainable(family, config, TrainOptions.model_validate(config.model_extra or {}))
