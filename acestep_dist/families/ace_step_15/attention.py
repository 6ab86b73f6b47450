"""Padding masks for the ACE-Step DiT, so a padded batch computes what each sample computes alone.

diffusers' DiT masks nothing: padded latent frames reach its self-attention and padded condition
tokens its cross-attention. ``PaddingMaskProcessor`` wraps diffusers' own attention processor and
adds key-padding masks. The DiT's ``forward`` has no argument to carry them, so they are set for
exactly one forward (``with masks.applied(...)``) and nothing is left set after it: a later call
(sampling, another batch) sees no stale masks. Under activation checkpointing the blocks run again
during backward, after the ``with`` has ended; ``masks.checkpoint`` (the DiT's checkpointing
function) replays each block with the masks its forward saw.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from diffusers.models.transformers.ace_step_transformer import AceStepAttnProcessor2_0


class PaddingMasks:
    """Key masks shared by every attention module of one DiT: ``[B, T_patches]`` and ``[B, L]``, True = real;
    None outside a forward."""

    def __init__(self) -> None:
        self.latent: torch.Tensor | None = None
        self.condition: torch.Tensor | None = None

    @contextmanager
    def applied(self, latent: torch.Tensor | None, condition: torch.Tensor | None):
        saved = self.latent, self.condition
        self.latent, self.condition = latent, condition
        try:
            yield self
        finally:
            self.latent, self.condition = saved

    def checkpoint(self, block, *args):
        """Activation checkpointing of one block that recomputes it with the masks of this forward."""
        latent, condition = self.latent, self.condition

        def run(*inputs):
            with self.applied(latent, condition):
                return block(*inputs)

        return torch.utils.checkpoint.checkpoint(run, *args, use_reentrant=False)


def _with_key_mask(mask: torch.Tensor | None, keys: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive mask ``[B, 1, Q|1, K]``: the given one (e.g. the sliding window) plus key padding."""
    padding = torch.zeros(keys.shape, dtype=dtype, device=keys.device).masked_fill(~keys, torch.finfo(dtype).min)
    padding = padding[:, None, None, :]
    return padding if mask is None else mask.to(dtype) + padding


class PaddingMaskProcessor(AceStepAttnProcessor2_0):
    def __init__(self, masks: PaddingMasks):
        super().__init__()
        self.masks = masks

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        is_cross = attn.is_cross_attention and encoder_hidden_states is not None
        keys = self.masks.condition if is_cross else self.masks.latent
        if keys is not None:
            kv = encoder_hidden_states if is_cross else hidden_states
            if keys.shape != kv.shape[:2]:
                raise RuntimeError(
                    f"padding mask {tuple(keys.shape)} does not fit the attention keys {tuple(kv.shape[:2])}; "
                    "the masks were applied to another forward than this one"
                )
            attention_mask = _with_key_mask(attention_mask, keys.to(kv.device), hidden_states.dtype)
        return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)


def install_padding_masks(transformer) -> PaddingMasks:
    """Put a masking processor on every attention module of ``transformer`` (once), and make its
    activation checkpointing replay the masks; return the shared masks."""
    existing = getattr(transformer, "_acedist_padding_masks", None)
    if existing is not None:
        return existing
    masks = PaddingMasks()
    processor = PaddingMaskProcessor(masks)
    for block in transformer.layers:
        block.self_attn.set_processor(processor)
        if getattr(block, "use_cross_attention", False):
            block.cross_attn.set_processor(processor)
    transformer._acedist_padding_masks = masks  # the processors' masks, found again by the next forward
    if getattr(transformer, "gradient_checkpointing", False):
        transformer.enable_gradient_checkpointing(masks.checkpoint)
    return masks
