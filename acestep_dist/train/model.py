"""What a training worker optimises: the DiT (LoRA or full), optionally the lyric encoder, and the
frozen rest of the condition path, wrapped as one module for DeepSpeed."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from ..config import TrainConfig, sampler_parameter_problem
from ..errors import UserError
from ..flow import TrainingRecipe
from ..families.ace_step_15 import AceStep15, AceStep15Components, VariantSpec
from ..families.ace_step_15.family import TrainingBatch
from ..families.ace_step_15.lora_formats import LoraWeights, check_fits, read_lora

ADAPTER_NAME = "default"


class FlowMatchingModule(torch.nn.Module):
    """``forward(batch, generators)`` -> (mean loss, per-sample losses): the family's variant-aware loss.

    Holds the modules as children so DeepSpeed (ZeRO-3 included) partitions and hooks them all;
    the family's loss calls the same module objects."""

    def __init__(self, family: AceStep15, lyric_embedding: torch.nn.Module, recipe: TrainingRecipe):
        super().__init__()
        self.family = [family]  # a list: not a submodule, just a handle
        self.recipe = recipe
        self.transformer = family.components.transformer
        self.condition_encoder = family.components.condition_encoder
        self.lyric_embedding = lyric_embedding
        # a buffer, not a parameter: ZeRO-3 leaves it whole (the embedding is never trained)
        self.register_buffer("null_condition", self.condition_encoder.null_condition_emb.detach().clone(),
                             persistent=False)

    def forward(self, batch: TrainingBatch, generators: Sequence[torch.Generator]):
        return self.family[0].training_loss(batch, generators, self.lyric_embedding, self.null_condition, self.recipe)


@dataclass
class TrainableModel:
    family: AceStep15
    module: FlowMatchingModule
    param_groups: list[dict]
    trainable_parameters: int

    @property
    def recipe(self) -> TrainingRecipe:
        return self.module.recipe


def training_recipe(variant: VariantSpec, config: TrainConfig) -> TrainingRecipe:
    """The run's timestep sampler and CFG dropout: the variant's upstream recipe unless the config
    names its own."""
    sampler = config.timestep_sampler or variant.default_sampler
    problem = sampler_parameter_problem(sampler, config)
    if problem:
        raise UserError(f"{problem} (the {variant.name} variant's default sampler)")
    return variant.recipe(sampler, config.cfg_dropout, mu=config.timestep_mu, sigma=config.timestep_sigma,
                                 shift=config.timestep_shift)


def lora_config(config: TrainConfig, targets: Sequence[str]):
    from peft import LoraConfig

    return LoraConfig(r=config.lora_rank, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                      target_modules=list(targets), use_rslora=config.use_rslora, init_lora_weights=True)


def _check_init_lora(weights: LoraWeights, config: TrainConfig, targets: Sequence[str], path: str) -> None:
    problems = []
    if weights.rank != config.lora_rank:
        problems.append(f"rank {weights.rank} (lora_rank is {config.lora_rank})")
    if abs(weights.scale - config.lora_alpha / (config.lora_rank ** 0.5 if config.use_rslora else config.lora_rank)) > 1e-6:
        problems.append(f"alpha {weights.alpha:g}{' with rsLoRA' if weights.use_rslora else ''} "
                        f"(lora_alpha is {config.lora_alpha:g}{' with rsLoRA' if config.use_rslora else ''})")
    extra = set(weights.targets) - set(targets)
    if extra:
        problems.append(f"targets {sorted(extra)} outside lora_preset {config.lora_preset!r} ({', '.join(targets)})")
    if problems:
        raise UserError(f"init_lora {path} does not fit this run: " + "; ".join(problems))


def read_init_lora(path: str) -> LoraWeights:
    """``init_lora`` read, any failure to read it as a LoRA turned into a UserError naming the file."""
    try:
        return read_lora(path)
    except UserError:
        raise
    except Exception as error:  # a corrupt file fails inside safetensors or JSON with their own exceptions
        raise UserError(f"init_lora {path} cannot be read as a LoRA: {type(error).__name__}: {error}") from None


def check_init_lora(config: TrainConfig, components: AceStep15Components) -> None:
    """On the driver, before any worker starts: ``init_lora`` readable and fitting the run's rank,
    alpha, preset and the model's DiT. The DiT is built on the meta device from its config (no
    weights are read); a worker checks the same again when it loads the adapter."""
    if not config.init_lora:
        return
    if config.model_type != "lora":
        raise UserError("init_lora applies to model_type: lora only")
    from diffusers.models.transformers.ace_step_transformer import AceStepTransformer1DModel

    weights = read_init_lora(config.init_lora)
    family = AceStep15(components)
    _check_init_lora(weights, config, family.lora_targets(config.lora_preset), config.init_lora)
    with torch.device("meta"):
        transformer = AceStepTransformer1DModel.from_config(components.transformer_config)
    check_fits(weights, transformer, family.variant.name, config.init_lora)


def build_trainable(family: AceStep15, config: TrainConfig) -> TrainableModel:
    """Freeze everything, then open what the config trains: LoRA adapters (optionally initialised
    from ``init_lora``) or the whole DiT, and optionally the lyric encoder with its own rate."""
    from peft import set_peft_model_state_dict

    components = family.components
    transformer, condition_encoder = components.transformer, components.condition_encoder
    lyric_embedding = family.lyric_embedding()
    for module in (transformer, condition_encoder, lyric_embedding):
        module.requires_grad_(False)

    if config.model_type == "lora":
        targets = family.lora_targets(config.lora_preset)
        init = read_init_lora(config.init_lora) if config.init_lora else None
        if init is not None:  # checked against the plain DiT, before adapters wrap its layers
            _check_init_lora(init, config, targets, config.init_lora)
            check_fits(init, transformer, family.variant.name, config.init_lora)
        # LoRA A starts random: seed it, so the start does not depend on what was loaded before
        torch.manual_seed(config.seed)
        transformer.add_adapter(lora_config(config, targets), adapter_name=ADAPTER_NAME)
        if init is not None:
            set_peft_model_state_dict(transformer, init.state_dict, adapter_name=ADAPTER_NAME)
        dit_params = [p for n, p in transformer.named_parameters() if "lora_" in n]
        for p in dit_params:
            p.requires_grad_(True)
    else:
        if config.init_lora:
            raise UserError("init_lora applies to model_type: lora only")
        transformer.requires_grad_(True)
        dit_params = list(transformer.parameters())
    groups = [{"params": dit_params, "lr": config.learning_rate, "name": "dit"}]

    if config.lyrics_embedder_train:
        lyric_params = list(condition_encoder.lyric_encoder.parameters())
        for p in lyric_params:
            p.requires_grad_(True)
        groups.append({"params": lyric_params, "lr": config.lyrics_embedder_lr or config.learning_rate,
                       "name": "lyric_encoder"})
    transformer.train()
    # dropout and grad tracking in the condition path only when part of it trains
    condition_encoder.train(config.lyrics_embedder_train)
    if config.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    total = sum(p.numel() for group in groups for p in group["params"])
    if total == 0:
        raise UserError("nothing to train: the configuration leaves every parameter frozen")
    module = FlowMatchingModule(family, lyric_embedding, training_recipe(family.variant, config))
    return TrainableModel(family, module, groups, total)


def lora_weights(transformer: torch.nn.Module, config: TrainConfig, targets: Sequence[str]) -> LoraWeights:
    """The adapter as it stands (call under ZeRO-3 parameter gathering)."""
    from peft import get_peft_model_state_dict

    state = {k: v.detach().to("cpu", torch.float32).clone()
             for k, v in get_peft_model_state_dict(transformer, adapter_name=ADAPTER_NAME).items()}
    return LoraWeights(state, config.lora_rank, config.lora_alpha, config.use_rslora, tuple(targets))
