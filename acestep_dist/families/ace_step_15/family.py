"""The ACE-Step 1.5 family behind the model-family interface.

Data flow: audio -> ``encode_audio`` (latent mean/std) and records -> ``encode_text`` /
``tokenize_lyrics`` at prep time; ``condition`` and ``training_loss`` in the training loop;
``generate`` for validation and ``acedist generate``.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch

from ...flow import TrainingRecipe, cfg_dropout_mask, masked_mse_per_sample, noise_latents
from ...records import Record
from . import prompts
from .attention import install_padding_masks
from .loading import ALL_PARTS, AceStep15Components, load_components
from .options import PrepOptions, lora_targets
from .pipeline import AceStepRowPipeline, tokenize
from .variants import VariantSpec

TEXT_MAX_TOKENS = PrepOptions.model_fields["text_max_tokens"].default
LYRIC_MAX_TOKENS = PrepOptions.model_fields["lyric_max_tokens"].default
TIMBRE_SECONDS = 30  # no reference audio: the first 30 s of the silence latent feed the timbre encoder


@dataclass
class LatentStats:
    """The VAE posterior of one clip: ``[T, C]`` each. Training draws ``mean + std * eps`` every step."""

    mean: torch.Tensor
    std: torch.Tensor


@dataclass
class TrainingBatch:
    """Padded tensors of B samples; the masks say which frames / tokens are real."""

    latent_mean: torch.Tensor  # [B, T, C]
    latent_std: torch.Tensor  # [B, T, C]
    frame_mask: torch.Tensor  # [B, T] bool
    text_states: torch.Tensor  # [B, Lt, D]
    text_mask: torch.Tensor  # [B, Lt] bool
    lyric_ids: torch.Tensor  # [B, Ll] int64
    lyric_mask: torch.Tensor  # [B, Ll] bool
    # the condition encoder's output stored by prep (cache_condition), when every sample has it
    condition: torch.Tensor | None = None  # [B, Lc, H]
    condition_mask: torch.Tensor | None = None  # [B, Lc] bool

    def to(self, device) -> "TrainingBatch":
        return TrainingBatch(**{k: None if v is None else v.to(device) for k, v in vars(self).items()})


def _pad_stack(tensors: Sequence[torch.Tensor], pad_value=0) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = torch.tensor([t.shape[0] for t in tensors])
    longest = int(lengths.max()) if len(tensors) else 0
    out = tensors[0].new_full((len(tensors), longest, *tensors[0].shape[1:]), pad_value)
    for i, t in enumerate(tensors):
        out[i, : t.shape[0]] = t
    mask = torch.arange(longest)[None, :] < lengths[:, None]
    return out, mask


class AceStep15:
    """Loaded ACE-Step 1.5 components and the operations every stage needs."""

    name = "ace-step-1.5"

    def __init__(self, components: AceStep15Components):
        self.components = components

    @classmethod
    def load(
        cls,
        path_or_id: str | os.PathLike,
        parts: Iterable[str] = ALL_PARTS,
        *,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
    ) -> "AceStep15":
        return cls(load_components(path_or_id, parts, dtype=dtype, device=device))

    # ----------------------------------------------------------------- facts
    @property
    def variant(self) -> VariantSpec:
        return self.components.variant

    @property
    def sample_rate(self) -> int:
        vae = self.components.vae
        return int(vae.config.sampling_rate) if vae is not None else 48000

    @property
    def hop_length(self) -> int:
        vae = self.components.vae
        return int(math.prod(vae.config.downsampling_ratios)) if vae is not None else 1920

    @property
    def frames_per_second(self) -> float:
        return self.sample_rate / self.hop_length

    @property
    def latent_dim(self) -> int:
        return int(self.components.transformer_config["audio_acoustic_hidden_dim"])

    def _require(self, *names: str):
        missing = [n for n in names if getattr(self.components, n) is None]
        if missing:
            raise RuntimeError(f"this ACE-Step model was loaded without {', '.join(missing)}")
        return [getattr(self.components, n) for n in names]

    # ------------------------------------------------------------- prep time
    @torch.no_grad()
    def encode_audio(self, wave: torch.Tensor) -> LatentStats:
        """``wave [2, n]`` at ``sample_rate`` -> latent mean and std ``[n // hop, C]``."""
        (vae,) = self._require("vae")
        if wave.dim() != 2 or wave.shape[0] != vae.config.audio_channels:
            raise ValueError(f"expected a [{vae.config.audio_channels}, n] waveform, got {list(wave.shape)}")
        param = next(vae.parameters())
        posterior = vae.encode(wave[None].to(param.device, param.dtype)).latent_dist
        frames = wave.shape[1] // self.hop_length
        mean = posterior.mean[0].transpose(0, 1)[:frames]
        std = posterior.std[0].transpose(0, 1)[:frames]
        return LatentStats(mean=mean.float().cpu(), std=std.float().cpu())

    @torch.no_grad()
    def encode_condition(self, text_states: Sequence[torch.Tensor], lyric_ids: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Per sample, the condition encoder's packed output ``[Lc, H]`` (float32) for its stored text
        states and lyric ids, each sample alone (nothing padded: the result does not depend on other
        samples), computed exactly as training computes it in the loop."""
        (condition_encoder,) = self._require("condition_encoder")
        device = next(condition_encoder.parameters()).device
        conditions = []
        for text, lyrics in zip(text_states, lyric_ids, strict=True):
            text = text.to(device, torch.bfloat16).float()[None]  # as a shard stores and training reads it
            condition, mask = self.condition(text, torch.ones(text.shape[:2], dtype=torch.bool, device=device),
                                             lyrics.to(device).long()[None],
                                             torch.ones(1, lyrics.shape[0], dtype=torch.bool, device=device))
            conditions.append(condition[0, : int(mask[0].sum())].float().cpu())
        return conditions

    @torch.no_grad()
    def encode_text(self, records: Sequence[Record], max_tokens: int = TEXT_MAX_TOKENS) -> list[torch.Tensor]:
        """Per-record Qwen3 ``last_hidden_state`` of its own prompt, without padding: ``[L_i, D]``.

        Prompts of equal token length run together and others apart, so no row is ever padded: a
        row's states are bit-identical whatever it is batched with (padding would change them by
        float noise, and make prep's output depend on how rows happened to be batched)."""
        from ..common import encode_unpadded

        text_encoder, tokenizer = self._require("text_encoder", "tokenizer")
        ids = tokenizer([prompts.text_prompt(r) for r in records], truncation=True, max_length=max_tokens).input_ids
        return encode_unpadded(text_encoder, ids)

    def tokenize_lyrics(self, records: Sequence[Record], max_tokens: int = LYRIC_MAX_TOKENS) -> list[torch.Tensor]:
        """Per-record lyric token ids (int32, unpadded) of the lyric template."""
        (tokenizer,) = self._require("tokenizer")
        ids, mask = tokenize(tokenizer, [prompts.lyric_prompt(r) for r in records], max_tokens, "cpu")
        return [ids[i, : int(mask[i].sum())].to(torch.int32) for i in range(len(records))]

    # -------------------------------------------------------- training time
    def collate(self, samples: Sequence[dict]) -> TrainingBatch:
        """Pad per-sample tensors (``latent_mean``, ``latent_std``, ``text_states``, ``lyric_ids``)."""
        mean, frame_mask = _pad_stack([s["latent_mean"].float() for s in samples])
        std, _ = _pad_stack([s["latent_std"].float() for s in samples], pad_value=1.0)
        text, text_mask = _pad_stack([s["text_states"].float() for s in samples])
        pad_id = 0
        if self.components.tokenizer is not None and self.components.tokenizer.pad_token_id is not None:
            pad_id = self.components.tokenizer.pad_token_id
        lyrics, lyric_mask = _pad_stack([s["lyric_ids"].long() for s in samples], pad_value=pad_id)
        condition = condition_mask = None
        if all("condition_states" in s for s in samples):
            condition, condition_mask = _pad_stack([s["condition_states"].float() for s in samples])
        return TrainingBatch(mean, std, frame_mask, text, text_mask, lyrics, lyric_mask, condition, condition_mask)

    def lyric_embedding(self) -> torch.nn.Module:
        """Qwen3's input embedding table: lyrics go through it only, never the transformer."""
        (text_encoder,) = self._require("text_encoder")
        return text_encoder.get_input_embeddings()

    def null_condition(self) -> torch.Tensor:
        """The condition encoder's null condition ``[1, 1, H]`` (CFG dropout), from the encoder or, when
        it was not built (training on cached conditions), as read from its weights."""
        if self.components.condition_encoder is not None:
            return self.components.condition_encoder.null_condition_emb
        if self.components.null_condition is None:
            raise RuntimeError("this ACE-Step model was loaded without condition_encoder or condition_constants")
        return self.components.null_condition

    def silence_latents(self, frames: int, batch: int) -> torch.Tensor:
        if self.components.condition_encoder is not None:
            silence = self.components.condition_encoder.silence_latent
        elif self.components.silence_latent is not None:
            silence = self.components.silence_latent
        else:
            raise RuntimeError("this ACE-Step model was loaded without condition_encoder or condition_constants")
        if silence.shape[1] < frames:
            silence = silence.repeat(1, -(-frames // silence.shape[1]), 1)
        return silence[:, :frames].expand(batch, -1, -1)

    def condition(
        self,
        text_states: torch.Tensor,
        text_mask: torch.Tensor,
        lyric_ids: torch.Tensor,
        lyric_mask: torch.Tensor,
        lyric_embedding: torch.nn.Module | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Packed cross-attention condition ``[B, L, H]`` and its mask (real tokens first per row)."""
        (condition_encoder,) = self._require("condition_encoder")
        embed = lyric_embedding if lyric_embedding is not None else self.lyric_embedding()
        dtype = condition_encoder.text_projector.weight.dtype
        batch = text_states.shape[0]
        timbre = self.silence_latents(math.ceil(TIMBRE_SECONDS * self.frames_per_second), batch).to(dtype)
        return condition_encoder(
            text_hidden_states=text_states.to(dtype),
            text_attention_mask=text_mask,
            lyric_hidden_states=embed(lyric_ids).to(dtype),
            lyric_attention_mask=lyric_mask,
            refer_audio_acoustic_hidden_states_packed=timbre,
            refer_audio_order_mask=torch.arange(batch, device=text_states.device),
        )

    def context_latents(self, frames: int, batch: int) -> torch.Tensor:
        """text2music context: silence latents then an all-ones chunk mask, ``[B, T, 2C]``."""
        silence = self.silence_latents(frames, batch)
        return torch.cat([silence, torch.ones_like(silence)], dim=-1)

    def training_loss(
        self,
        batch: TrainingBatch,
        generators: Sequence[torch.Generator],
        lyric_embedding: torch.nn.Module | None = None,
        null_condition: torch.Tensor | None = None,
        recipe: TrainingRecipe | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Variant-aware flow-matching loss: ``(mean over samples, per-sample losses [B], timesteps [B])``.

        ``recipe`` is the timestep sampler and CFG dropout (default: the variant's upstream recipe).
        ``null_condition`` stands in for the condition encoder's ``null_condition_emb`` (a trainer
        passes a plain copy: under ZeRO-3 a parameter read outside its module's forward is empty).
        A batch carrying prep's cached ``condition`` uses it: the condition encoder does not run.

        Each sample's draws (t, CFG dropout, posterior eps, noise) come from its own generator over
        its own length, so a sample's loss does not depend on its batch mates.
        """
        (transformer,) = self._require("transformer")
        device = batch.latent_mean.device
        dtype = next(transformer.parameters()).dtype
        B, T, C = batch.latent_mean.shape
        lengths = batch.frame_mask.sum(dim=1).tolist()
        recipe = recipe or self.variant.recipe()
        sampler = recipe.timestep_sampler
        t = torch.empty(B)
        dropped = torch.zeros(B, dtype=torch.bool)
        eps = torch.zeros(B, T, C)
        noise = torch.zeros(B, T, C)
        for i, (generator, length) in enumerate(zip(generators, lengths, strict=True)):
            t[i] = sampler.sample(1, generator)[0]
            dropped[i] = cfg_dropout_mask(1, recipe.cfg_dropout, generator)[0]
            eps[i, :length] = torch.randn(length, C, generator=generator)
            noise[i, :length] = torch.randn(length, C, generator=generator)
        x0 = batch.latent_mean + batch.latent_std * eps.to(device)
        x_t, target = noise_latents(x0, noise.to(device), t.to(device))

        if batch.condition is not None:
            condition, condition_mask = batch.condition, batch.condition_mask
        else:
            (condition_encoder,) = self._require("condition_encoder")
            with torch.set_grad_enabled(torch.is_grad_enabled() and condition_encoder.training):
                condition, condition_mask = self.condition(
                    batch.text_states, batch.text_mask, batch.lyric_ids, batch.lyric_mask, lyric_embedding
                )
        if dropped.any():
            # the null embedding fills every position; identical keys attend the same however many
            null = self.null_condition() if null_condition is None else null_condition
            null = null.to(condition.device, condition.dtype).expand_as(condition)
            condition = torch.where(dropped.to(device)[:, None, None], null, condition)

        # Padded frames enter the DiT as zeros, exactly as its own patch padding of a lone sample,
        # and are masked as attention keys, as are padded condition tokens.
        frames = batch.frame_mask[:, :, None].to(dtype)
        context = self.context_latents(T, B).to(device, dtype) * frames
        patch = int(transformer.config.patch_size)
        patches = -(-T // patch)
        real_patches = torch.arange(patches, device=device)[None, :] < (
            batch.frame_mask.sum(dim=1, keepdim=True) + patch - 1) // patch
        t_in = t.to(device=device, dtype=dtype)
        with install_padding_masks(transformer).applied(latent=real_patches, condition=condition_mask.bool()):
            prediction = transformer(
                hidden_states=x_t.to(dtype) * frames,
                timestep=t_in,
                timestep_r=t_in,  # r = t: plain flow matching, no mean-flow
                encoder_hidden_states=condition.to(dtype),
                context_latents=context,
                return_dict=False,
            )[0]
        per_sample = masked_mse_per_sample(prediction, target, batch.frame_mask)
        return per_sample.mean(), per_sample, t

    def lora_targets(self, preset: str = "attention") -> tuple[str, ...]:
        return lora_targets(preset)

    # --------------------------------------------------------------- sampling
    def pipeline(self) -> AceStepRowPipeline:
        from diffusers import FlowMatchEulerDiscreteScheduler

        c = self.components
        self._require("transformer", "condition_encoder", "vae", "text_encoder", "tokenizer")
        # ACE-Step passes its own shifted sigmas in [0, 1]; the scheduler must not shift them again.
        scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1, shift=1.0)
        pipe = AceStepRowPipeline(
            vae=c.vae,
            text_encoder=c.text_encoder,
            tokenizer=c.tokenizer,
            transformer=c.transformer,
            condition_encoder=c.condition_encoder,
            scheduler=scheduler,
            audio_tokenizer=c.audio_tokenizer,
            audio_token_detokenizer=c.audio_token_detokenizer,
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe

    @torch.no_grad()
    def generate(
        self,
        records: Record | Sequence[Record],
        *,
        duration: float,
        seed: int = 0,
        steps: int | None = None,
        guidance: float | None = None,
        shift: float | None = None,
        pipeline: AceStepRowPipeline | None = None,
        **pipeline_kwargs,
    ) -> torch.Tensor:
        """text2music: ``[B, 2, n]`` float audio at ``sample_rate``, post-processed as diffusers does.

        The initial noise is drawn as diffusers draws it from ``torch.Generator("cpu").manual_seed(seed)``.
        Per-row captions, lyrics and metadata; one duration for the batch (one latent length)."""
        rows = [records] if isinstance(records, Record) else list(records)
        pipe = pipeline or self.pipeline()
        spec = self.variant
        output = pipe(
            prompt=[r.caption for r in rows],
            lyrics=[prompts.lyrics_text(r) for r in rows],
            vocal_language=[prompts.language_text(r) for r in rows],
            bpm=[prompts.normalize_bpm(r.bpm) for r in rows],
            keyscale=[r.keyscale for r in rows],
            timesignature=[r.timesignature for r in rows],
            audio_duration=float(duration),
            num_inference_steps=steps or spec.default_steps,
            guidance_scale=spec.default_guidance if guidance is None else guidance,
            shift=spec.default_shift if shift is None else shift,
            generator=torch.Generator("cpu").manual_seed(int(seed)),
            output_type="pt",
            **pipeline_kwargs,
        )
        return output.audios.float().cpu()
