"""Typed settings for prep and training: YAML files plus ``key=value`` overrides, validated by pydantic.

Training keys use SimpleTuner's names where one exists, so settings carry over. Unknown keys are
errors (a typo must not silently fall back to a default) and the message suggests the closest key.
The keys here are every family's; a model family declares its own (``Family.prep_options`` /
``train_options``): a config accepts them while it is read, and the family validates them once
the model is known (``family_options``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal, Sequence, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .errors import ConfigError, explain_validation, suggest
from .flow import sampler_parameter_problem


# Measured with optimum-quanto 0.2.7, peft 0.21 and DeepSpeed 0.19 (not a matter of taste): the name
# SimpleTuner users know is answered with the reason rather than "unknown value".
QUANTO_REFUSED = (
    "base_model_precision int8-quanto is not offered: with optimum-quanto (0.2.7, in maintenance mode) peft has no "
    "quanto backend, so merging a LoRA into the quantized base silently leaves the LoRA out, quanto renames the base "
    "weights' keys, and a ZeRO-3 run cannot resume from its checkpoints. int8-torchao stores the frozen base in the "
    "same one byte per weight: use base_model_precision=int8-torchao")


class _Settings(BaseModel):
    model_config = ConfigDict(extra="allow", validate_assignment=True)
    family_options_attribute: ClassVar[str]  # the Family attribute declaring this kind's family keys

    @model_validator(mode="after")
    def _family_keys(self) -> "_Settings":
        """Keys that are not general must be some registered family's (checked by it later)."""
        extras = self.model_extra or {}
        if extras:
            from .families import families

            known = {key for family in families() for key in getattr(family, self.family_options_attribute).model_fields}
            unknown = [key for key in extras if key not in known]
            if unknown:
                everything = list(type(self).model_fields) + sorted(known)
                raise ValueError("; ".join(f"unknown key {key!r}{suggest(key, everything)}" for key in unknown))
        return self


class PrepConfig(_Settings):
    """How audio becomes training samples (``acedist prep``)."""

    family_options_attribute = "prep_options"

    max_duration: float = Field(240.0, gt=0, description="longest window in seconds; longer audio is cropped or split")
    min_duration: float = Field(1.0, ge=0, description="shorter audio is rejected")
    crop: Literal["start", "random", "segments"] = Field("start", description="what to do with audio over max_duration")
    crop_seed: int = Field(0, description="seed of crop=random (the chosen offset is recorded per sample)")
    silence_fraction: float = Field(0.95, gt=0, le=1, description="reject audio with more exact zeros than this")
    allow_truncated: bool = Field(False, description="keep what decodes of a file that ends before its header says "
                                                     "(with a warning) instead of rejecting it")
    estimate_missing: bool = Field(False, description="estimate the bpm, key, time signature and lyric language a "
                                                      "song's source does not give, from its decoded window (acedist "
                                                      "annotate's estimators); each sample's meta says which")
    caption_max_chars: int = Field(1024, gt=0, description="longer captions are truncated with a warning")
    lyrics_max_chars: int = Field(8192, gt=0, description="longer lyrics are truncated with a warning")
    allow_missing_caption: bool = Field(False, description="accept audio without a caption (empty caption, warning)")
    lyrics_file: str = Field("{stem}.lyrics", description="lyric sidecar name, e.g. {stem}_lyrics.txt")
    caption_file: str = Field("{stem}.txt", description="caption sidecar name")
    audio_caption_fields: list[str] = Field(["caption", "prompt", "tags"], min_length=1,
                                            description="HF datasets: caption columns, first non-empty wins")
    lyrics_column: str = Field("lyrics", description="HF datasets: the lyrics column")
    audio_column: str = Field("audio", description="HF datasets: Audio column or path column")
    dataset_split: str = Field("train", description="HF datasets: the split to prepare")
    shard_size_mb: float = Field(256.0, gt=0, description="target size of one WebDataset shard")
    encode_batch_size: int = Field(8, gt=0, description="records per text-encoder call")
    decode_workers: int | None = Field(None, gt=0, description="CPU decode tasks in flight (default: cluster CPUs)")
    encoder_actors: int | None = Field(None, gt=0, description="model actors per component (default: GPUs, else 1)")
    seed: int = 0

    @model_validator(mode="after")
    def _durations(self) -> "PrepConfig":
        if self.min_duration > self.max_duration:
            raise ValueError(f"min_duration ({self.min_duration}) is larger than max_duration ({self.max_duration})")
        return self


class TrainConfig(_Settings):
    """Fine-tuning settings (``acedist train``). Defaults follow upstream ACE-Step 1.5's LoRA trainer."""

    family_options_attribute = "train_options"

    model_type: Literal["lora", "full"] = "lora"
    learning_rate: float = Field(1e-4, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    adam_beta1: float = Field(0.9, ge=0, lt=1)
    adam_beta2: float = Field(0.999, ge=0, lt=1)
    max_train_steps: int | None = Field(None, gt=0, description="stop after this many optimizer steps")
    num_train_epochs: int = Field(1, gt=0, description="used when max_train_steps is not set")
    train_batch_size: int = Field(1, gt=0, description="samples per worker per micro-step")
    gradient_accumulation_steps: int = Field(4, gt=0)
    max_grad_norm: float = Field(1.0, ge=0, description="0 disables clipping")
    lr_scheduler: Literal["cosine", "constant", "linear"] = "cosine"
    lr_warmup_steps: int = Field(100, ge=0)
    checkpointing_steps: int = Field(500, gt=0)
    checkpoints_total_limit: int | None = Field(3, gt=0)
    mixed_precision: Literal["no", "bf16", "fp16"] = Field("bf16", description="ignored on CPU, which trains in fp32")
    gradient_checkpointing: bool = False
    adapter: Literal["lora", "dora", "lokr", "loha"] = Field(
        "lora", description="model_type lora: the adapter peft trains: LoRA, DoRA (LoRA with a learnt magnitude per "
                            "output row), LoKr (Kronecker product), LoHa (Hadamard product of two low-rank pairs)")
    lora_rank: int = Field(8, gt=0, description="the adapter's rank (LoKr: of its split factors)")
    lora_alpha: float = Field(16.0, gt=0, description="the adapter's scale is alpha / rank (rsLoRA: alpha / sqrt(rank))")
    lora_dropout: float = Field(0.1, ge=0, lt=1, description="LoRA / DoRA: dropout on the adapter's input")
    lora_preset: str = Field("attention", description="which layers get adapters: one of the model family's presets")
    use_rslora: bool = Field(False, description="LoRA / DoRA: scale alpha / sqrt(rank)")
    lokr_factor: int = Field(-1, ge=-1, description="LoKr: split each layer width into this factor and the rest "
                                                    "(-1: near its square root)")
    lokr_decompose_both: bool = Field(False, description="LoKr: also split the small Kronecker factor into two "
                                                         "rank-r matrices")
    adapter_module_dropout: float = Field(0.0, ge=0, lt=1, description="LoKr / LoHa: probability of leaving a "
                                                                       "layer's adapter out of a step")
    init_lora: str | None = Field(None, description="continue from a LoRA in diffusers, PEFT or ComfyUI format")
    timestep_sampler: Literal["discrete-turbo", "max-logit-normal", "logit-normal", "uniform"] | None = Field(
        None, description="default: the variant's upstream recipe (turbo: discrete-turbo; turbo-continuous: uniform; "
                          "base/SFT/XL: max-logit-normal)")
    cfg_dropout: float | None = Field(None, ge=0, le=1, description="null-condition dropout; default: the variant's "
                                                                      "(turbo 0, base/SFT 0.15)")
    timestep_mu: float | None = Field(None, description="logit-normal samplers; default: the checkpoint's (-0.4)")
    timestep_sigma: float | None = Field(None, gt=0, description="logit-normal samplers; default: the checkpoint's (1.0)")
    timestep_shift: float | None = Field(None, gt=0, description="discrete-turbo and uniform samplers; default: the "
                                                                   "variant's sampling shift (uniform on base/SFT: 1)")
    validation_prompt: str | None = None
    validation_lyrics: str | None = None
    validation_audio_duration: float = Field(30.0, gt=0)
    validation_guidance: float | None = Field(None, ge=0, description="default: the variant's")
    validation_steps: int | None = Field(None, gt=0, description="sampler steps; default: the variant's")
    validation_step_interval: int = Field(0, ge=0, description="0 disables validation")
    validation_seed: int = 0
    log_interval: int = Field(10, gt=0)
    seed: int = 0
    zero_stage: Literal[0, 1, 2, 3] = 2
    offload_optimizer: bool = False
    max_failures: int = Field(0, ge=-1, description="-1: retry forever")
    optimizer: Literal["adamw", "adamw8bit", "adafactor", "prodigy"] = Field(
        "adamw", description="adamw (torch); adamw8bit (bitsandbytes, CUDA GPUs: 8-bit states); adafactor "
                             "(transformers: factored second moments, no momentum); prodigy (prodigyopt: learns its "
                             "step size; learning_rate is a multiplier, default 1.0)")
    prodigy_d_coef: float = Field(1.0, gt=0, description="prodigy: scales the step size it estimates")
    prodigy_d0: float = Field(1e-6, gt=0, description="prodigy: its first step-size estimate (it grows from there "
                                                      "over the first tens of steps)")
    use_ema: bool = Field(False, description="keep an exponential moving average of the trained weights, saved "
                                             "beside them (final/ema) and exported with --ema")
    ema_decay: float = Field(0.999, gt=0, lt=1, description="use_ema: the average's decay per optimizer step")
    ema_device: Literal["accelerator", "cpu"] = Field("accelerator", description="use_ema: where the average is "
                                                                                 "kept (cpu: no GPU memory)")
    base_model_precision: Literal["no_change", "int8-torchao", "fp8-torchao", "int8-quanto"] = Field(
        "no_change", description="model_type lora: store the frozen base's linear weights in 8 bits (torchao; extra "
                                 "[quant]): int8-torchao on any device, fp8-torchao on GPUs of compute capability 8.9+ "
                                 "(and CPUs); the adapters train in the run's precision on top")

    @model_validator(mode="before")
    @classmethod
    def _prodigy_rate(cls, data: Any) -> Any:
        # Prodigy estimates the step size itself; its learning_rate multiplies that estimate (its
        # authors' default 1.0). The AdamW default 1e-4 would make it barely move.
        if isinstance(data, dict) and data.get("optimizer") == "prodigy" and data.get("learning_rate") is None:
            data = {**data, "learning_rate": 1.0}
        return data

    def _changed(self) -> set[str]:
        """The general keys set to other than their default (a dumped config, as workers receive it,
        sets every key; a family's own keys are extras, checked by the family)."""
        fields = type(self).model_fields
        return {key for key in self.model_fields_set if key in fields and getattr(self, key) != fields[key].default}

    @model_validator(mode="after")
    def _optimizer_settings(self) -> "TrainConfig":
        # settings of an optimizer or an average the run does not use would be silently ignored
        given = self._changed()
        stray = [key for key in ("prodigy_d_coef", "prodigy_d0") if key in given and self.optimizer != "prodigy"]
        if stray:
            raise ValueError(f"{', '.join(stray)} appl{'ies' if len(stray) == 1 else 'y'} to optimizer prodigy, "
                             f"not {self.optimizer}")
        stray = [key for key in ("ema_decay", "ema_device") if key in given and not self.use_ema]
        if stray:
            raise ValueError(f"{', '.join(stray)} set{'s' if len(stray) == 1 else ''} the EMA, but use_ema is false")
        return self

    @model_validator(mode="after")
    def _base_precision(self) -> "TrainConfig":
        if self.base_model_precision == "int8-quanto":
            raise ValueError(QUANTO_REFUSED)
        if self.base_model_precision != "no_change" and self.model_type != "lora":
            raise ValueError(f"base_model_precision {self.base_model_precision} stores the frozen base in 8 bits: a "
                             f"full fine-tune trains those weights themselves (use model_type lora, or "
                             f"base_model_precision no_change)")
        return self

    @model_validator(mode="after")
    def _adapter_settings(self) -> "TrainConfig":
        # settings of another adapter kind would be silently ignored: refused when the user set them
        given = self._changed()
        own = {"lora": ("lora_dropout", "use_rslora"), "dora": ("lora_dropout", "use_rslora"),
               "lokr": ("lokr_factor", "lokr_decompose_both", "adapter_module_dropout"),
               "loha": ("adapter_module_dropout",)}
        foreign = sorted({key for keys in own.values() for key in keys} - set(own[self.adapter]))
        set_here = [key for key in foreign if key in given]
        if set_here:
            raise ValueError(f"{', '.join(set_here)} do{'es' if len(set_here) == 1 else ''} not apply to adapter "
                             f"{self.adapter!r}")
        if self.lokr_factor == 0:
            raise ValueError("lokr_factor must be -1 (near the square root) or a positive factor")
        return self

    @model_validator(mode="after")
    def _sampler_parameters(self) -> "TrainConfig":
        # parameters of a sampler the run does not use would be silently ignored; only knowable
        # here when the sampler is named (the variant's default is checked when the model loads)
        problem = sampler_parameter_problem(self.timestep_sampler, self) if self.timestep_sampler else None
        if problem:
            raise ValueError(problem)
        return self


Settings = TypeVar("Settings", bound=_Settings)


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """``["learning_rate=3e-4", "validation_prompt=calm piano"]`` -> typed dict (values read as YAML)."""
    overrides: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        try:
            overrides[key] = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            overrides[key] = raw
    return overrides


def load_config(
    cls: type[Settings],
    path: str | Path | None = None,
    overrides: Sequence[str] | dict[str, Any] = (),
) -> Settings:
    """Read ``path`` (YAML mapping, optional), apply overrides, validate."""
    data: dict[str, Any] = {}
    source = "config"
    if path is not None:
        source = str(path)
        try:
            loaded = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
            raise ConfigError(f"config file {path} cannot be read: {error}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must be a mapping of key: value, got {type(loaded).__name__}")
        data.update(loaded or {})
    extra = overrides if isinstance(overrides, dict) else parse_overrides(overrides)
    if extra:
        source += " + overrides" if path is not None else " overrides"
    data.update(extra)
    try:
        return cls.model_validate(data)
    except ValidationError as error:
        raise explain_validation(error, list(cls.model_fields), source) from None

