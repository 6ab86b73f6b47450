"""ACE-Step v1 (3.5B) behind the family interface (``..base``): what the stages see of it.

Importing this module is cheap (the registry imports it to list the family); torch and the model
code load when a method needs them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from ...errors import UserError
from ..base import Family, FamilyModel, ModelDescription, RenderRequest, SampleSchema, TensorSpec
from ..common import module_fields
from .options import LORA_PRESETS, VARIANT_NAMES, PrepOptions, TrainOptions

NAME = "ace-step-v1"
SCHEMA = SampleSchema(NAME, 1, (
    # the DCAE latent [8, 16, T] as upstream's trainer feeds the DiT (no posterior: the DCAE is
    # deterministic). float32, as upstream trains on it: 0.33 MB a minute, and bf16 would move it by
    # up to 0.4 % (a latent of magnitude 3 by 0.01)
    TensorSpec("latent", "float32", "frames", axis=2),
    # UMT5's last hidden state of the caption, unpadded [L, 768]
    TensorSpec("text_states", "bfloat16", "text_tokens", per_caption=True),
    # the lyric token ids (start 261 ... line breaks 2); empty = upstream's inference rule for no lyrics
    TensorSpec("lyric_ids", "int32", "lyric_tokens"),
    # upstream's SSL alignment targets (prep's ssl_mert / ssl_mhubert; absent otherwise, and from
    # shards written before them): MERT-v1-330M [F, 1024] at 75 Hz, mHuBERT-147 [F, 768] at 50 Hz,
    # of the same audio as the latent, bf16 (~9.2 + 4.6 MB a minute)
    TensorSpec("mert_states", "bfloat16", "mert_frames", optional=True),
    TensorSpec("mhubert_states", "bfloat16", "mhubert_frames", optional=True),
))
PURPOSE_PARTS = {
    "encode-audio": ("dcae",),
    "encode-text": ("text_encoder", "tokenizer"),
    "train": ("transformer",),
    "export": ("transformer",),
}
MAX_GENERATE_SECONDS = 240.0  # upstream's longest render (and its dataset's crop)
_TEXT_TOKENS_ESTIMATE = 64  # v1 captions are tag lists: what shard planning budgets
_LYRIC_TOKENS_ESTIMATE = 1024


class AceStepV1Family(Family):
    name = NAME
    title = "ACE-Step v1"
    schema = SCHEMA
    variants = VARIANT_NAMES
    default_variant = "base"
    lora_presets = tuple(LORA_PRESETS)
    adapters = ("lora", "dora", "lokr", "loha")
    lora_formats = ("upstream", "comfyui")
    full_formats = ("upstream",)
    tasks = ("text2music",)
    max_generate_seconds = MAX_GENERATE_SECONDS
    prep_options = PrepOptions
    train_options = TrainOptions

    # ------------------------------------------------------------------- checkpoints
    def claims(self, model: str) -> int:
        from .loading import is_v1_folder, is_v1_hub_id

        path = Path(model).expanduser()
        if path.exists():
            return 2 if is_v1_folder(path) else 0
        return 2 if is_v1_hub_id(model) else 0

    def describe(self, model: str) -> ModelDescription:
        from .loading import model_dimensions, model_fingerprint, resolve_checkpoint

        folder = resolve_checkpoint(model)
        dims = model_dimensions(folder)
        return ModelDescription(
            family=NAME, variant="base", source=str(folder), layout="upstream", sample_rate=48000,
            frames_per_second=44100 / 512 / 8, fingerprint=model_fingerprint(folder), dimensions=dims,
            details={"timestep_sampler": "logit-normal index, shift 3 over 1000 steps", "default_steps": 60,
                     "default_guidance": 15.0, "default_shift": 3.0, "guidance": "APG + ERG (upstream's defaults)"},
        )

    def load(self, description: ModelDescription, purpose: str, *, dtype=None, device: str = "cpu") -> "AceStepV1Model":
        from .loading import ALL_PARTS, load_components
        from .model import V1Operations

        parts = PURPOSE_PARTS.get(purpose, ALL_PARTS)
        return AceStepV1Model(description, V1Operations(load_components(description.source, parts, dtype=dtype,
                                                                        device=device)), purpose)

    def sample_bytes(self, description: ModelDescription, seconds: float, options: PrepOptions | None = None) -> float:
        from .ssl import KINDS

        dims = description.dimensions
        latent = 4 * dims["latent_channels"] * dims["latent_height"] * description.frames_per_second * seconds
        ssl = sum(2 * kind.hidden * kind.frames_per_second * seconds for kind in KINDS
                  if options is not None and getattr(options, kind.option, None))  # the released widths, bf16
        return latent + ssl + 2 * dims["text_dim"] * _TEXT_TOKENS_ESTIMATE + 4 * _LYRIC_TOKENS_ESTIMATE

    def write_tiny(self, out: Path, variant: str, seed: int = 0, **options: Any) -> Path:
        from .tiny import write_tiny_checkpoint

        self.variant_name(variant)
        unknown = set(options) - {"dcae", "vocoder"}
        if unknown:
            raise UserError(f"{NAME} tiny checkpoints take no {', '.join(sorted(unknown))} (only dcae=, vocoder=)")
        return write_tiny_checkpoint(out, seed=seed, **options)

    def options(self, config):
        """The family keys, with the lyric vocabulary and the SSL checkpoints found on the driver
        (an error here, before any worker starts) and passed to workers as absolute paths (an SSL
        hub id stays as given, its config.json read: each node fills its own cache)."""
        from .lyrics import find_lyrics_vocab
        from .ssl import KINDS, checked_source

        options = super().options(config)
        needs_vocab = isinstance(options, PrepOptions) or bool(
            getattr(config, "validation_step_interval", 0) and getattr(config, "validation_lyrics", None))
        if needs_vocab or options.lyrics_vocab:
            options = options.model_copy(update={"lyrics_vocab": str(find_lyrics_vocab(options.lyrics_vocab))})
        if isinstance(options, PrepOptions):
            options = options.model_copy(update={
                kind.option: checked_source(getattr(options, kind.option), kind, options.trust_remote_code)
                for kind in KINDS if getattr(options, kind.option)})
        return options

    # ----------------------------------------------------------------------- training
    def check_training(self, description: ModelDescription, config, options: TrainOptions, stored=None) -> str:
        from .loading import read_json, TRANSFORMER_DIR
        from .training import check_training

        transformer_config = read_json(Path(description.source) / TRANSFORMER_DIR / "config.json")
        return check_training(transformer_config, config, options).describe()

    # ------------------------------------------------------------------------ exports
    def lora_info(self, path: str) -> dict[str, Any]:
        from .lora_formats import read_lora, read_provenance

        weights = read_lora(path)
        return {"adapter": weights.spec.kind, "rank": weights.spec.rank, "alpha": weights.spec.alpha,
                "provenance": read_provenance(path) or {}}

    def adapter_formats(self, adapter: str) -> tuple[str, ...]:
        # upstream's load_lora (diffusers' load_lora_adapter) builds LoRA / DoRA layers only
        return self.lora_formats if adapter in ("lora", "dora") else ("comfyui",)

    def export_lora(self, run_folder: Path, weights: Sequence[str], out: Path, formats: Sequence[str], name: str,
                    provenance: dict[str, Any]) -> tuple[list[Path], str]:
        from .export import export_lora

        return export_lora(run_folder, weights, out, formats, name, provenance)

    def export_full(self, description: ModelDescription, run_folder: Path, weights: Sequence[str], out: Path,
                    formats: Sequence[str]) -> tuple[list[Path], str]:
        from .export import export_full

        return export_full(description, run_folder, weights, out, formats)


class AceStepV1Model(FamilyModel):
    def __init__(self, description: ModelDescription, operations, purpose: str):
        from .ssl import SSLModels

        self.description, self.operations, self.purpose = description, operations, purpose
        self.ssl_models = SSLModels()  # loaded on first use, once per process (a prep actor)

    # --------------------------------------------------------------------------- prep
    def encode_audio(self, wave, options: PrepOptions | None = None):
        """The latent, and the SSL states ``options`` ask for (``ssl_mert`` / ``ssl_mhubert``)."""
        from .ssl import KINDS

        options = options or PrepOptions()
        wanted = {kind: self.ssl_models.get(getattr(options, kind.option), options.trust_remote_code,
                                            self.operations.device, kind)
                  for kind in KINDS if getattr(options, kind.option)}
        return self.operations.encode_audio(wave, wanted)

    def encode_text(self, records, options: PrepOptions):
        import torch

        from .lyrics import lyric_ids_and_mask
        from .model import caption_text

        states = self.operations.encode_captions([caption_text(r) for r in records], options.text_max_tokens)
        encoded = []
        for record, text in zip(records, states, strict=True):
            ids, mask = lyric_ids_and_mask(record.lyrics or "", options.lyrics_vocab, options.lyrics_tokenizer,
                                           options.lyric_max_tokens)
            # no lyrics: upstream's training path keeps one pad id the model attends to, its
            # inference path masks it out (stored as no ids; collate gives the masked pad id)
            stored = ids if all(mask) else []
            encoded.append({"text_states": text, "lyric_ids": torch.tensor(stored, dtype=torch.int32)})
        return encoded

    # ----------------------------------------------------------------------- training
    def parts(self):
        return module_fields(self.operations.components)

    def collate(self, samples):
        return self.operations.collate(samples)

    def trainable(self, config, options: TrainOptions, stored=None):
        from .training import V1Trainable

        return V1Trainable(self.operations, config, options)

    # ----------------------------------------------------------------------- sampling
    def generate(self, request: RenderRequest, lora: str | None = None, lora_scale: float = 1.0, log=print):
        from .generation import render
        from .lora_formats import load_lora_into

        if lora:
            weights = load_lora_into(self.operations.components.transformer, lora, lora_scale)
            log(f"generate: {weights.spec.name} {lora} ({weights.spec.describe()}) at scale {lora_scale:g}")
        return render(self.operations, request, lyrics_vocab=request.options.get("lyrics_vocab"))


FAMILY = AceStepV1Family()
