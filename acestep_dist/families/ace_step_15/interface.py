"""ACE-Step 1.5 behind the family interface (``..base``): what the stages see of it.

Importing this module is cheap (the registry imports it to list the family); torch, diffusers and
the model code load when a method needs them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from ...errors import UserError
from ..base import Family, FamilyModel, RenderRequest, ModelDescription, SampleSchema, TensorSpec
from ..common import module_fields
from .options import LORA_PRESETS, VARIANT_NAMES, PrepOptions, TrainOptions

NAME = "ace-step-1.5"
SCHEMA = SampleSchema(NAME, 1, (
    # the VAE posterior [T, C]: training draws mean + std * eps every step
    TensorSpec("latent_mean", "bfloat16", "frames"),
    TensorSpec("latent_std", "bfloat16", "frames", same_shape_as="latent_mean"),
    # Qwen3's last hidden state of the caption prompt, unpadded [L, 1024]
    TensorSpec("text_states", "bfloat16", "text_tokens", per_caption=True),
    # token ids of the lyric prompt; the condition encoder embeds them at training time
    TensorSpec("lyric_ids", "int32", "lyric_tokens"),
    # prep cache_condition=true: the condition encoder's packed output for this caption and the
    # lyrics [Lc, H] (every token real), so training runs neither it nor the token table
    TensorSpec("condition_states", "bfloat16", "condition_tokens", per_caption=True, optional=True,
               also_stored_as=("float32",)),
))
CONDITION = "condition_states"
# which components each purpose loads
PURPOSE_PARTS = {
    "encode-audio": ("vae",),
    "encode-text": ("text_encoder", "tokenizer"),  # + the condition encoder on first use with cache_condition
    # the DiT; the trainable adds the condition path its data needs (see AceStep15Model.trainable)
    "train": ("transformer",),
    "validate": ("transformer", "condition_encoder", "text_encoder", "tokenizer", "vae"),
}
# what a run computing the condition in the loop adds to "train": the condition encoder, and the
# text encoder for its token table (lyrics are embedded by it during training)
IN_LOOP_CONDITION_PARTS = ("condition_encoder", "text_encoder", "tokenizer")
# ACE-Step 1.5 generates up to 10 minutes: upstream's acestep/constants.py has DURATION_MAX = 600
# (github.com/ace-step/ACE-Step-1.5), diffusers' AceStepPipeline docs say "from 10 seconds to 10
# minutes". Upstream's DURATION_MIN = 10 is a quality floor, not a limit of the model: shorter
# renders work and keep tests and demos quick, so it is not enforced.
MAX_GENERATE_SECONDS = 600.0
_TEXT_TOKENS_ESTIMATE = 200  # a caption prompt is ~200 tokens: what shard planning budgets
_LYRIC_TOKENS_ESTIMATE = 500  # a sung minute's lyric prompt, a few hundred tokens


class AceStep15Family(Family):
    name = NAME
    title = "ACE-Step 1.5"
    schema = SCHEMA
    variants = VARIANT_NAMES
    variant_aliases = {"xl": "xl-base"}
    default_variant = "turbo"
    lora_presets = tuple(LORA_PRESETS)
    adapters = ("lora", "dora", "lokr", "loha")
    lora_formats = ("diffusers", "peft", "comfyui", "lycoris")
    full_formats = ("diffusers", "upstream")
    tasks = ("text2music", "repaint", "cover")
    max_generate_seconds = MAX_GENERATE_SECONDS
    prep_options = PrepOptions
    train_options = TrainOptions

    # ------------------------------------------------------------------- checkpoints
    def claims(self, model: str) -> int:
        from .loading import claims_folder, looks_like_hub_id

        path = Path(model).expanduser()
        if path.exists():
            return 2 if claims_folder(path) else 0
        return 1 if looks_like_hub_id(model) else 0

    def describe(self, model: str) -> ModelDescription:
        from .loading import load_components, model_dimensions, model_fingerprint

        components = load_components(model, parts=())  # configs only; a hub id is downloaded here
        folder = Path(components.source)
        dims = model_dimensions(folder, components.layout)
        spec = components.variant
        return ModelDescription(
            family=NAME, variant=spec.name, source=str(folder), layout=components.layout,
            sample_rate=dims.sample_rate, frames_per_second=dims.frames_per_second,
            fingerprint=model_fingerprint(folder, components.layout),
            dimensions={"latent_dim": dims.latent_dim, "text_dim": dims.text_dim, "hop_length": dims.hop_length,
                        "dit_hidden": int(components.transformer_config.get("hidden_size", 0)),
                        "condition_width": int(components.transformer_config.get("encoder_hidden_size")
                                               or components.transformer_config.get("hidden_size", 0))},
            details={"timestep_sampler": spec.default_sampler, "timestep_sampler_parameters": repr(spec.timestep_sampler),
                     "cfg_dropout": spec.cfg_dropout, "default_steps": spec.default_steps,
                     "default_guidance": spec.default_guidance, "default_shift": spec.default_shift},
        )

    def load(self, description: ModelDescription, purpose: str, *, dtype=None, device: str = "cpu") -> "AceStep15Model":
        import torch

        from .family import AceStep15
        from .loading import ALL_PARTS

        parts = PURPOSE_PARTS.get(purpose, ALL_PARTS)
        model = AceStep15.load(description.source, parts, dtype=dtype or torch.float32, device=device)
        if purpose == "encode-audio":
            model.components.vae.enable_tiling()  # bounded memory on long windows
        return AceStep15Model(description, model, purpose)

    def sample_bytes(self, description: ModelDescription, seconds: float, options: PrepOptions | None = None) -> float:
        dims = description.dimensions
        estimate = (2 * 2 * dims["latent_dim"] * description.frames_per_second * seconds  # mean + std, bf16
                    + 2 * dims["text_dim"] * _TEXT_TOKENS_ESTIMATE)
        if options is not None and options.cache_condition:  # lyrics + one timbre token + caption, [L, H]
            width = 4 if options.condition_dtype == "float32" else 2
            estimate += width * dims["condition_width"] * (_LYRIC_TOKENS_ESTIMATE + 1 + _TEXT_TOKENS_ESTIMATE)
        return estimate

    def write_tiny(self, out: Path, variant: str, seed: int = 0, **options: Any) -> Path:
        from .tiny import write_tiny_checkpoint

        unknown = set(options) - {"latent_dim"}
        if unknown:
            raise UserError(f"{NAME} tiny checkpoints take no {', '.join(sorted(unknown))}")
        return write_tiny_checkpoint(out, variant=self.variant_name(variant), seed=seed, **options)

    # ----------------------------------------------------------------------- training
    def check_training(self, description: ModelDescription, config, options: TrainOptions, stored=None) -> str:
        from .loading import condition_fingerprint, load_components
        from .training import check_cached_condition, check_training

        components = load_components(description.source, parts=())
        recipe = check_training(components.transformer_config, components.variant, config, options).describe()
        if CONDITION in (stored or {}):
            check_cached_condition(options, stored[CONDITION],
                                   condition_fingerprint(Path(description.source), description.layout))
            recipe += "; condition cached by prep"
        return recipe

    def feature_sources(self, description: ModelDescription, options: PrepOptions) -> dict[str, str]:
        from .loading import condition_fingerprint

        if not options.cache_condition:
            return {}
        return {CONDITION: condition_fingerprint(Path(description.source), description.layout)}

    def legacy_weights(self, state: dict) -> list[str]:
        from .training import legacy_weights

        return legacy_weights(state)

    # ------------------------------------------------------------------------ exports
    def lora_info(self, path: str) -> dict[str, Any]:
        from .lora_formats import read_lora, read_provenance

        weights = read_lora(path)
        return {"adapter": weights.spec.kind, "rank": weights.spec.rank, "alpha": weights.spec.alpha,
                "provenance": read_provenance(path) or {}}

    def adapter_formats(self, adapter: str) -> tuple[str, ...]:
        # diffusers' loader builds LoRA / DoRA layers; upstream loads a LoKr from LyCORIS's file
        return {"lora": ("diffusers", "peft", "comfyui"), "dora": ("diffusers", "peft", "comfyui"),
                "lokr": ("peft", "comfyui", "lycoris"), "loha": ("peft", "comfyui")}.get(adapter, ())

    def export_lora(self, run_folder: Path, weights: Sequence[str], out: Path, formats: Sequence[str], name: str,
                    provenance: dict[str, Any]) -> tuple[list[Path], str]:
        from .export import export_lora

        return export_lora(run_folder, weights, out, formats, name, provenance)

    def export_full(self, description: ModelDescription, run_folder: Path, weights: Sequence[str], out: Path,
                    formats: Sequence[str]) -> tuple[list[Path], str]:
        from .export import export_full

        return export_full(self.load(description, "export"), run_folder, weights, out, formats)


class AceStep15Model(FamilyModel):
    def __init__(self, description: ModelDescription, model, purpose: str):
        self.description, self.model, self.purpose = description, model, purpose

    # --------------------------------------------------------------------------- prep
    def encode_audio(self, wave, options: PrepOptions | None = None):
        stats = self.model.encode_audio(wave)  # no audio option changes the latent
        return {"latent_mean": stats.mean, "latent_std": stats.std}

    def encode_text(self, records, options: PrepOptions):
        states = self.model.encode_text(records, options.text_max_tokens)
        lyric_ids = self.model.tokenize_lyrics(records, options.lyric_max_tokens)
        samples = [{"text_states": text, "lyric_ids": lyrics} for text, lyrics in zip(states, lyric_ids, strict=True)]
        if options.cache_condition:
            import torch

            self._add_parts(("condition_encoder",))  # once per process (a prep actor)
            dtype = getattr(torch, options.condition_dtype)
            for sample, condition in zip(samples, self.model.encode_condition(states, lyric_ids), strict=True):
                sample[CONDITION] = condition.to(dtype)
        return samples

    def _add_parts(self, parts) -> None:
        """Load the parts of ``parts`` this model was loaded without, beside those it has, in their dtype
        and on their device."""
        import torch

        from .loading import CONDITION_CONSTANTS, load_components

        components = self.model.components
        # the constants' part fills two fields (and the condition encoder holds them itself)
        fields = {CONDITION_CONSTANTS: ("null_condition", "silence_latent")}
        missing = [part for part in parts if all(getattr(components, f) is None for f in fields.get(part, (part,)))]
        if not missing:
            return
        reference = next((m for m in (components.transformer, components.text_encoder, components.vae) if m is not None), None)
        dtype, device = (reference.dtype, reference.device) if reference is not None else (torch.float32, "cpu")
        loaded = load_components(self.description.source, missing, dtype=dtype, device=device)
        for part in missing:
            for name in fields.get(part, (part,)):
                setattr(components, name, getattr(loaded, name))

    # ----------------------------------------------------------------------- training
    def parts(self):
        return module_fields(self.model.components)

    def collate(self, samples):
        return self.model.collate(samples)

    def trainable(self, config, options: TrainOptions, stored=None):
        from .training import AceStep15Trainable

        from .loading import CONDITION_CONSTANTS

        cached = CONDITION in (stored or {})
        if cached:
            if self.model.components.condition_encoder is None:  # which holds the constants itself
                self._add_parts((CONDITION_CONSTANTS,))
        else:
            self._add_parts(IN_LOOP_CONDITION_PARTS)
        trainable = AceStep15Trainable(self.model, config, options, cached_condition=cached)
        if self.purpose == "train" and not cached:
            self.model.components.text_encoder = None  # only its token table is needed (the module keeps it)
        return trainable

    # ----------------------------------------------------------------------- sampling
    def generate(self, request: RenderRequest, lora: str | None = None, lora_scale: float = 1.0, log=print):
        import torch

        from .generation import load_lora_into

        family = self.model
        pipe = family.pipeline()
        if lora:
            weights = load_lora_into(pipe, family, lora, lora_scale)
            log(f"generate: {weights.spec.name} {lora} ({weights.spec.describe()}) at scale {lora_scale:g}")
        extra: dict = {}
        if request.source_audio is not None:
            # The VAE encodes whole latent frames only (floor): pad the source with silence to the
            # next whole frame so the output covers all of it (the caller trims it back).
            extra["src_audio"] = torch.nn.functional.pad(request.source_audio, (0, -request.source_audio.shape[-1] % family.hop_length))
            if request.task == "repaint":
                start, end = request.repaint
                extra.update(task_type="repaint", repainting_start=start, repainting_end=end)
            else:
                extra.update(task_type="cover", audio_cover_strength=request.cover_strength)
        try:
            audio = family.generate(request.record, duration=request.duration, seed=request.seed, steps=request.steps,
                                    guidance=request.guidance, shift=request.shift, pipeline=pipe, **extra)
        except (ValueError, RuntimeError) as error:
            raise UserError(f"{request.task} with this model failed in diffusers' AceStepPipeline: {error}") from None
        return audio[0]


FAMILY = AceStep15Family()

