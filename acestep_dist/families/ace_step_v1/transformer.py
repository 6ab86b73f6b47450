"""ACE-Step v1's DiT (``ACEStepTransformer2DModel``), numerically equal to upstream on the same weights.

Constructor kwargs, ``config.json`` and state-dict keys are upstream's, so upstream's
``ace_step_transformer/`` folder, SimpleTuner checkpoints and upstream LoRAs (targets ``to_q``,
``to_k``, ``to_v``, ``to_out.0``, ``linear_q``, ``linear_k``, ``linear_v``, ``speaker_embedder``)
load unchanged. One addition: ``lyric_encoder_config`` records the lyric Conformer's size, which
upstream hard-codes; ``from_pretrained`` reads it off the weights when a config lacks it.

Conventions a caller must follow (all upstream's):

- ``hidden_states`` is the DCAE latent ``[B, 8, 16, T]``; ``attention_mask`` ``[B, T]`` is 1 for real
  frames. Padded frames still feed the patch GroupNorm, the FFN's kernel-3 conv and the SSL
  projectors, so their content changes valid outputs; upstream trains with unpadded batches.
  ``mask_padding`` (our trainer's mode) keeps padding out of each, the SSL terms included.
- ``timestep`` is the flow-matching time scaled to ``[0, 1000]`` (``sigma * 1000``), shape ``[B]``.
- the condition sequence is ``[speaker (1), text (L_text), lyric (L_lyric)]``; its mask is float.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.loaders import PeftAdapterMixin
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput
from torch import nn

from .linear_attention import LinearTransformerBlock, RotaryEmbedding
from .lyric_encoder import (
    ConformerEncoder,
    lyric_encoder_config_from_shapes,
    resolve_lyric_encoder_config,
)

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
WEIGHTS_INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"


@dataclass
class Transformer2DModelOutput(BaseOutput):
    """``sample`` [B, out_channels, 16, T]; ``proj_losses`` a list of ``(ssl_name, loss)`` (empty
    without SSL targets): upstream's batch mean, or with ``mask_padding`` each sample's term over its
    own frames, ``(ssl_name, (losses [B], present [B]))`` (a sample whose target is None: 0, absent)."""

    sample: torch.FloatTensor
    proj_losses: list[tuple[str, torch.Tensor]] | None = None


def cross_norm(hidden_states: torch.Tensor, control: torch.Tensor) -> torch.Tensor:
    """Give ``control`` the per-sample mean and (unbiased) std of ``hidden_states`` (ControlNet input)."""
    mean, std = hidden_states.mean(dim=(1, 2), keepdim=True), hidden_states.std(dim=(1, 2), keepdim=True)
    control_mean, control_std = control.mean(dim=(1, 2), keepdim=True), control.std(dim=(1, 2), keepdim=True)
    return (control - control_mean) * (std / (control_std + 1e-12)) + mean


class PatchEmbed(nn.Module):
    """``[B, C, 16, T]`` -> ``[B, T, dim]``: a (16, 1) patch conv to ``C*256`` channels, GroupNorm(32)
    over all frames of a sample (padding included), then a 1x1 conv."""

    def __init__(self, height: int, width: int, patch_size: Sequence[int], in_channels: int, embed_dim: int):
        super().__init__()
        patch_size = tuple(patch_size)
        wide = in_channels * 256
        self.early_conv_layers = nn.Sequential(
            nn.Conv2d(in_channels, wide, kernel_size=patch_size, stride=patch_size),
            nn.GroupNorm(num_groups=32, num_channels=wide, eps=1e-6, affine=True),
            nn.Conv2d(wide, embed_dim, kernel_size=1),
        )
        self.patch_size = patch_size
        self.height, self.width = height // patch_size[0], width // patch_size[1]

    def forward(self, latent: torch.Tensor, frame_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``frame_mask [B, T]`` given: the GroupNorm takes its statistics over the real frames only,
        so a padded sample embeds as it would alone (upstream's includes the padding)."""
        patch, norm, project = self.early_conv_layers
        x = patch(latent)
        if frame_mask is None:
            x = norm(x)
        else:
            x = masked_group_norm(x, norm, frame_mask[..., :: self.patch_size[1]][..., : x.shape[-1]])
        return project(x).flatten(2).transpose(1, 2)


def masked_group_norm(x: torch.Tensor, norm: nn.GroupNorm, frame_mask: torch.Tensor) -> torch.Tensor:
    """``norm`` on ``x [B, C, H, T]`` with mean and variance over the frames ``frame_mask [B, T]``
    marks (padded frames come out 0)."""
    batch, channels, height, frames = x.shape
    grouped = x.float().reshape(batch, norm.num_groups, channels // norm.num_groups, height, frames)
    mask = frame_mask.to(grouped.dtype)[:, None, None, None, :]
    count = mask.sum(dim=(2, 3, 4), keepdim=True) * (channels // norm.num_groups) * height
    mean = (grouped * mask).sum(dim=(2, 3, 4), keepdim=True) / count.clamp(min=1)
    variance = (((grouped - mean) * mask) ** 2).sum(dim=(2, 3, 4), keepdim=True) / count.clamp(min=1)
    normed = ((grouped - mean) * torch.rsqrt(variance + norm.eps) * mask).reshape(x.shape).to(x.dtype)
    if norm.affine:
        normed = normed * norm.weight[None, :, None, None] + norm.bias[None, :, None, None] * frame_mask[:, None, None, :].to(x.dtype)
    return normed


class T2IFinalLayer(nn.Module):
    """RMS norm modulated by the timestep embedding, a linear to one patch per frame, unpatchify."""

    def __init__(self, hidden_size: int, patch_size: Sequence[int], out_channels: int):
        super().__init__()
        self.norm_final = nn.RMSNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size[0] * patch_size[1] * out_channels)
        self.scale_shift_table = nn.Parameter(torch.randn(2, hidden_size) / hidden_size**0.5)
        self.out_channels = out_channels
        self.patch_size = tuple(patch_size)

    def unpatchify(self, x: torch.Tensor, width: int) -> torch.Tensor:
        """``[B, W, p*q*C]`` (feature ``(i*q + j)*C + c`` for patch row i, column j, channel c) ->
        ``[B, C, p, W*q]``, zero-padded or cut to ``width`` frames."""
        batch, frames = x.shape[:2]
        p, q = self.patch_size
        out = x.reshape(batch, frames, p, q, self.out_channels).permute(0, 4, 2, 1, 3)
        out = out.reshape(batch, self.out_channels, p, frames * q)
        if width > out.shape[-1]:
            return F.pad(out, (0, width - out.shape[-1]))
        return out[..., :width].contiguous()

    def forward(self, x: torch.Tensor, t: torch.Tensor, output_length: int) -> torch.Tensor:
        shift, scale = (self.scale_shift_table[None] + t[:, None]).chunk(2, dim=1)
        x = self.linear(self.norm_final(x) * (1 + scale) + shift)
        return self.unpatchify(x, output_length)


def _projector(dim: int, out_dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(dim, 2 * dim), nn.SiLU(), nn.Linear(2 * dim, 2 * dim), nn.SiLU(), nn.Linear(2 * dim, out_dim))


def _resample(frames_first: torch.Tensor, length: int) -> torch.Tensor:
    """``[B, T, d]`` -> ``[B, length, d]`` by linear interpolation over time (align_corners=False)."""
    return F.interpolate(frames_first.transpose(1, 2), size=length, mode="linear", align_corners=False).transpose(1, 2)


def ssl_alignment_loss(prediction: torch.Tensor, target: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
    """Upstream's REPA term: per sample, the projector output ``[T, d]`` (padded frames included) is
    linearly resampled to the SSL length, both are L2-normalised per frame, the loss is
    ``mean_t(1 - cos)``; the result is the batch mean. ``target`` is ``[B, T_ssl, d]`` or a list of
    per-sample ``[T_ssl_b, d]`` (ragged, as upstream's trainer builds it)."""
    if not isinstance(target, torch.Tensor) and len({t.shape[0] for t in target}) == 1:
        target = torch.stack(list(target))
    if isinstance(target, torch.Tensor):
        pairs = [(_resample(prediction, target.shape[1]), target)]
    else:  # ragged: each sample needs its own output length
        pairs = [(_resample(p[None], t.shape[0]), t[None]) for p, t in zip(prediction, target)]
    per_sample = []
    for estimate, truth in pairs:
        batch, frames, dim = truth.shape
        estimate, truth = F.normalize(estimate, dim=-1), F.normalize(truth, dim=-1)
        ones = torch.ones(batch * frames, device=truth.device, dtype=truth.dtype)
        loss = F.cosine_embedding_loss(truth.reshape(-1, dim), estimate.reshape(-1, dim), ones, reduction="none")
        per_sample.append(loss.view(batch, frames).mean(dim=1))
    return torch.cat(per_sample).sum() / prediction.shape[0]


def ssl_alignment_losses(prediction: torch.Tensor, target: torch.Tensor | Sequence[torch.Tensor | None],
                         frames: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The REPA term per sample, each over its own real frames: sample ``b``'s projector output
    ``prediction[b, :frames[b]]`` is resampled to its target's length and compared as
    :func:`ssl_alignment_loss` does (in float32), so a padded sample's term is its term alone
    (upstream's, whose batches are unpadded). ``target``: ``[B, T_ssl, d]`` or per sample
    ``[T_ssl_b, d]`` or None (no target). Returns the losses ``[B]`` (0 without a target) and
    which samples had one ``[B]`` (bool)."""
    batch = prediction.shape[0]
    losses, present = [], []
    for b in range(batch):
        truth = target[b]
        if truth is None:
            losses.append(prediction.new_zeros((), dtype=torch.float32))
            present.append(False)
            continue
        estimate = _resample(prediction[b : b + 1, : int(frames[b])].float(), truth.shape[0])[0]
        estimate, truth = F.normalize(estimate, dim=-1), F.normalize(truth.float(), dim=-1)
        ones = torch.ones(truth.shape[0], device=truth.device, dtype=truth.dtype)
        losses.append(F.cosine_embedding_loss(truth, estimate, ones, reduction="none").mean())
        present.append(True)
    return torch.stack(losses), torch.tensor(present, device=prediction.device)


class ACEStepTransformer2DModel(ModelMixin, ConfigMixin, PeftAdapterMixin):
    """The ACE-Step v1 DiT (3.5B when released: 24 layers, 20 heads x 128)."""

    _supports_gradient_checkpointing = True
    _no_split_modules = ["LinearTransformerBlock"]

    @register_to_config
    def __init__(
        self,
        in_channels: int | None = 8,
        num_layers: int = 28,
        inner_dim: int = 1536,
        attention_head_dim: int = 64,
        num_attention_heads: int = 24,
        mlp_ratio: float = 4.0,
        out_channels: int = 8,
        max_position: int = 32768,
        rope_theta: float = 1000000.0,
        speaker_embedding_dim: int = 512,
        text_embedding_dim: int = 768,
        ssl_encoder_depths: Sequence[int] = (9, 9),
        ssl_names: Sequence[str] = ("mert", "m-hubert"),
        ssl_latent_dims: Sequence[int] = (1024, 768),
        lyric_encoder_vocab_size: int = 6681,
        lyric_hidden_size: int = 1024,
        patch_size: Sequence[int] = (16, 1),
        max_height: int = 16,
        max_width: int = 4096,
        lyric_encoder_config: dict[str, int] | None = None,
        **kwargs: Any,
    ):
        """Upstream's kwargs; ``inner_dim`` is ignored as upstream ignores it (the width is
        ``num_attention_heads * attention_head_dim``). ``lyric_encoder_config`` (``output_size``,
        ``attention_heads``, ``linear_units``, ``num_blocks``) defaults to the released size and is
        written back to the config in full, so ``save_pretrained`` records it."""
        super().__init__()
        lyric_size = resolve_lyric_encoder_config(lyric_encoder_config, lyric_hidden_size)
        self.register_to_config(lyric_encoder_config=lyric_size)

        width = num_attention_heads * attention_head_dim
        self.num_attention_heads = num_attention_heads
        self.attention_head_dim = attention_head_dim
        self.inner_dim = width
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.max_position = max_position
        self.rope_theta = rope_theta
        self.patch_size = list(patch_size)
        self.num_layers = num_layers
        self.ssl_encoder_depths = list(ssl_encoder_depths)
        self.ssl_names = list(ssl_names)
        self.ssl_latent_dims = list(ssl_latent_dims)

        self.rotary_emb = RotaryEmbedding(attention_head_dim, max_position_embeddings=max_position, base=rope_theta)
        self.transformer_blocks = nn.ModuleList(
            LinearTransformerBlock(width, num_attention_heads, attention_head_dim, mlp_ratio) for _ in range(num_layers)
        )
        self.time_proj = Timesteps(num_channels=256, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.timestep_embedder = TimestepEmbedding(in_channels=256, time_embed_dim=width)
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(width, 6 * width))

        self.speaker_embedder = nn.Linear(speaker_embedding_dim, width)
        self.genre_embedder = nn.Linear(text_embedding_dim, width)
        self.lyric_embs = nn.Embedding(lyric_encoder_vocab_size, lyric_hidden_size)
        self.lyric_encoder = ConformerEncoder(input_size=lyric_hidden_size, **lyric_size)
        self.lyric_proj = nn.Linear(lyric_hidden_size, width)

        self.projectors = nn.ModuleList(_projector(width, dim) for dim in self.ssl_latent_dims)
        self.proj_in = PatchEmbed(max_height, max_width, patch_size, in_channels or 8, width)
        self.final_layer = T2IFinalLayer(width, patch_size, out_channels)
        self.gradient_checkpointing = False
        # Upstream lets padded frames reach real ones (the patch GroupNorm's statistics, the FFN's
        # time conv). True: masked there too, so a padded sample predicts as it would alone (our
        # trainer sets it; upstream's behaviour stays the default).
        self.mask_padding = False

    def _as_weights(self, x: torch.Tensor) -> torch.Tensor:
        """Float inputs in the weights' dtype when autocast is off (upstream would raise on a
        mismatch); under autocast they are left alone so autocast rounds them as upstream's would."""
        if torch.is_autocast_enabled(x.device.type):
            return x
        return x.to(self.speaker_embedder.weight.dtype)

    # ------------------------------------------------------------------------------ conditions
    def forward_lyric_encoder(self, lyric_token_idx: torch.LongTensor, lyric_mask: torch.Tensor) -> torch.Tensor:
        """Lyric ids ``[B, L]`` -> ``[B, L, width]``."""
        encoded, _ = self.lyric_encoder(self.lyric_embs(lyric_token_idx), lyric_mask)
        return self.lyric_proj(encoded)

    def encode(
        self,
        encoder_text_hidden_states: torch.Tensor,
        text_attention_mask: torch.Tensor,
        speaker_embeds: torch.Tensor,
        lyric_token_idx: torch.LongTensor,
        lyric_mask: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The condition sequence ``[B, 1 + L_text + L_lyric, width]`` and its mask (float32, like
        upstream: a float ones column for the speaker promotes the integer masks)."""
        batch, device = encoder_text_hidden_states.shape[0], encoder_text_hidden_states.device
        speaker = self.speaker_embedder(self._as_weights(speaker_embeds)).unsqueeze(1)
        text = self.genre_embedder(self._as_weights(encoder_text_hidden_states))
        lyric = self.forward_lyric_encoder(lyric_token_idx, lyric_mask)
        hidden = torch.cat([speaker, text, lyric], dim=1)
        mask = torch.cat([torch.ones(batch, 1, device=device), text_attention_mask, lyric_mask], dim=1)
        if self.mask_padding:
            # Rotary positions of the condition count padded caption tokens too: packed (real tokens
            # first, in order), the lyrics sit where they would in a sample alone.
            order = torch.sort((mask <= 0).to(torch.int8), dim=1, stable=True).indices
            hidden = hidden.gather(1, order[..., None].expand_as(hidden))
            mask = mask.gather(1, order)
        return hidden, mask

    # ------------------------------------------------------------------------------ denoiser
    def decode(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        encoder_hidden_mask: torch.Tensor,
        timestep: torch.Tensor,
        ssl_hidden_states: Sequence[torch.Tensor | Sequence[torch.Tensor] | None] | None = None,
        output_length: int = 0,
        block_controlnet_hidden_states: torch.Tensor | None = None,
        controlnet_scale: float | torch.Tensor = 1.0,
        return_dict: bool = True,
    ) -> Transformer2DModelOutput | tuple[torch.Tensor, list[tuple[str, torch.Tensor]]]:
        """Predict from a noisy latent given ``encode()``'s outputs (upstream's pipeline encodes once
        and decodes per step). ``output_length`` frames are returned; upstream's default 0 would
        return an empty tensor, here 0 means "as many frames as the input".

        ``ssl_hidden_states``: per projector (``ssl_names`` order) its targets ``[B, T_ssl, d]`` or a
        list of per-sample ``[T_ssl_b, d]`` (with ``mask_padding`` also None for a sample without),
        or None for no target of that kind."""
        hidden_states = self._as_weights(hidden_states)
        encoder_hidden_states = self._as_weights(encoder_hidden_states)
        if timestep.ndim == 0:
            timestep = timestep.expand(hidden_states.shape[0])
        output_length = output_length or hidden_states.shape[-1]

        embedded_timestep = self.timestep_embedder(self.time_proj(timestep).to(dtype=hidden_states.dtype))
        temb = self.t_block(embedded_timestep)
        frame_mask = attention_mask if self.mask_padding else None
        hidden_states = self.proj_in(hidden_states, frame_mask)
        if block_controlnet_hidden_states is not None:
            hidden_states = hidden_states + cross_norm(hidden_states, block_controlnet_hidden_states) * controlnet_scale

        rotary = self.rotary_emb(hidden_states, seq_len=hidden_states.shape[1])
        rotary_cross = self.rotary_emb(encoder_hidden_states, seq_len=encoder_hidden_states.shape[1])
        checkpointing = self.gradient_checkpointing and torch.is_grad_enabled()
        run = getattr(self, "_gradient_checkpointing_func", None) or _checkpoint

        tapped = []
        for index, block in enumerate(self.transformer_blocks):
            args = (hidden_states, encoder_hidden_states, attention_mask, encoder_hidden_mask, rotary, rotary_cross, temb,
                    frame_mask)
            hidden_states = run(block, *args) if checkpointing else block(*args)
            # One entry per matching depth, in block order; they pair with projectors/names by position.
            tapped.extend(hidden_states for depth in self.ssl_encoder_depths if depth == index)

        proj_losses = []
        if tapped and ssl_hidden_states:
            if self.mask_padding:  # each sample's term over its own frames: (name, (losses [B], present [B]))
                patch = self.patch_size[1]
                frames = attention_mask[:, ::patch][:, : tapped[0].shape[1]].sum(dim=1).long().tolist()
            for hidden, projector, target, name in zip(tapped, self.projectors, ssl_hidden_states, self.ssl_names):
                if target is None:
                    continue
                if self.mask_padding:
                    proj_losses.append((name, ssl_alignment_losses(projector(hidden), target, frames)))
                else:
                    proj_losses.append((name, ssl_alignment_loss(projector(hidden), target)))

        output = self.final_layer(hidden_states, embedded_timestep, output_length)
        if not return_dict:
            return output, proj_losses
        return Transformer2DModelOutput(sample=output, proj_losses=proj_losses)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor,
        encoder_text_hidden_states: torch.Tensor | None = None,
        text_attention_mask: torch.Tensor | None = None,
        speaker_embeds: torch.Tensor | None = None,
        lyric_token_idx: torch.LongTensor | None = None,
        lyric_mask: torch.Tensor | None = None,
        timestep: torch.Tensor | None = None,
        ssl_hidden_states: Sequence[torch.Tensor | Sequence[torch.Tensor] | None] | None = None,
        block_controlnet_hidden_states: torch.Tensor | None = None,
        controlnet_scale: float | torch.Tensor = 1.0,
        return_dict: bool = True,
    ) -> Transformer2DModelOutput | tuple[torch.Tensor, list[tuple[str, torch.Tensor]]]:
        """``decode(encode(...))`` with ``output_length`` = the latent's frame count."""
        encoder_hidden_states, encoder_hidden_mask = self.encode(
            encoder_text_hidden_states, text_attention_mask, speaker_embeds, lyric_token_idx, lyric_mask
        )
        return self.decode(
            hidden_states,
            attention_mask,
            encoder_hidden_states,
            encoder_hidden_mask,
            timestep,
            ssl_hidden_states=ssl_hidden_states,
            output_length=hidden_states.shape[-1],
            block_controlnet_hidden_states=block_controlnet_hidden_states,
            controlnet_scale=controlnet_scale,
            return_dict=return_dict,
        )

    # ------------------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any):
        """diffusers' loader (safetensors only), after reading the lyric Conformer's size off the
        weights when neither the kwargs nor ``config.json`` give it (upstream's configs never do)."""
        kwargs.setdefault("use_safetensors", True)
        if not kwargs["use_safetensors"]:
            raise ValueError("ACE-Step v1 transformers load from safetensors only")
        if kwargs.get("lyric_encoder_config") is None:
            hub = {k: kwargs[k] for k in _HUB_KWARGS if k in kwargs}
            config = cls.load_config(pretrained_model_name_or_path, subfolder=kwargs.get("subfolder"), **hub)
            if not config.get("lyric_encoder_config"):
                files = _weight_files(pretrained_model_name_or_path, kwargs.get("subfolder"), kwargs.get("variant"), hub)
                kwargs["lyric_encoder_config"] = lyric_encoder_config_from_files(files)
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)


def _checkpoint(module: nn.Module, *args):
    return torch.utils.checkpoint.checkpoint(module.__call__, *args, use_reentrant=False)


_HUB_KWARGS = ("cache_dir", "force_download", "proxies", "local_files_only", "token", "revision")


def _weights_name(variant: str | None, index: bool = False) -> str:
    name = WEIGHTS_INDEX_NAME if index else WEIGHTS_NAME
    if not variant:
        return name
    stem, _, rest = name.partition(".safetensors")
    return f"{stem}.{variant}.safetensors{rest}"


def _weight_files(source: str | os.PathLike, subfolder: str | None, variant: str | None, hub: dict) -> list[Path]:
    """The safetensors files holding the lyric encoder: the single file, or the shards an index
    maps ``lyric_encoder.*`` to. Local folders are read in place; hub ids go through the HF cache."""
    folder = Path(source) / (subfolder or "")
    if Path(source).is_dir():

        def fetch(name: str) -> Path | None:
            return folder / name if (folder / name).is_file() else None

    else:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.utils import EntryNotFoundError

        def fetch(name: str) -> Path | None:
            try:
                return Path(hf_hub_download(str(source), name, subfolder=subfolder, **hub))
            except EntryNotFoundError:
                return None

    single = fetch(_weights_name(variant))
    if single is not None:
        return [single]
    index = fetch(_weights_name(variant, index=True))
    if index is None:
        raise FileNotFoundError(f"no {_weights_name(variant)} (or its .index.json) in {folder}")
    weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
    shards = sorted({file for key, file in weight_map.items() if "lyric_encoder." in key})
    found = [fetch(name) for name in shards]
    missing = [name for name, path in zip(shards, found) if path is None]
    if missing or not found:
        raise FileNotFoundError(f"lyric encoder shards {missing or shards} missing from {folder}")
    return found


def lyric_encoder_config_from_files(files: Sequence[str | os.PathLike]) -> dict[str, int]:
    """The lyric Conformer's size from safetensors headers (no tensor data is read)."""
    from safetensors import safe_open

    shapes: dict[str, list[int]] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():
                if "lyric_encoder." in key:
                    shapes[key] = handle.get_slice(key).get_shape()
    return lyric_encoder_config_from_shapes(shapes)
