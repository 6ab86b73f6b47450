"""The ACE-Step v1 DiT block: ReLU linear self-attention, softmax cross-attention, GLU conv FFN.

Module and parameter names follow upstream (``attn.to_q``, ``cross_attn.add_q_proj``,
``ff.depth_conv.conv``, ``scale_shift_table``) so upstream checkpoints and LoRAs load unchanged.
The arithmetic mirrors upstream op for op, including its dtype promotions, so float32 results match
upstream and bfloat16 runs (autocast or a cast model) round where upstream rounds.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

Rotary = tuple[torch.Tensor, torch.Tensor]

# Upstream's processor clips to the float16 range whenever CUDA autocast's *configured* dtype is
# float16, which is torch's default even with autocast off; only a bf16 CUDA autocast skips it.
_FP16_MAX = 65504.0


def _clip_like_upstream(x: torch.Tensor) -> torch.Tensor:
    if torch.get_autocast_dtype("cuda") == torch.float16:
        return x.clip(-_FP16_MAX, _FP16_MAX)
    return x


class RotaryEmbedding(nn.Module):
    """cos/sin tables for positions ``0..S-1`` (``inv_freq`` over even channels, repeated twice).

    The table is built once in float32 on the CPU, as upstream builds its cache at construction,
    then cached per device; callers get it cast to the activations' dtype, as upstream does. It is
    not a buffer, so it is absent from state dicts and unaffected by meta-device construction.
    """

    def __init__(self, dim: int, max_position_embeddings: int = 2048, base: float = 10000.0):
        super().__init__()
        self.dim = dim
        self.max_position_embeddings = max_position_embeddings
        self.base = base
        self._cpu: Rotary | None = None
        self._by_device: dict[torch.device, Rotary] = {}

    def _build(self, length: int) -> Rotary:
        exponents = torch.arange(0, self.dim, 2, dtype=torch.int64).float() / self.dim
        inv_freq = 1.0 / (self.base**exponents)
        positions = torch.arange(length, dtype=torch.int64).to(inv_freq.dtype)
        angles = torch.outer(positions, inv_freq)
        angles = torch.cat((angles, angles), dim=-1)
        return angles.cos(), angles.sin()

    def forward(self, x: torch.Tensor, seq_len: int) -> Rotary:
        if self._cpu is None or self._cpu[0].shape[0] < seq_len:
            self._cpu = self._build(max(seq_len, self.max_position_embeddings))
            self._by_device.clear()
        table = self._by_device.get(x.device)
        if table is None:
            table = tuple(t.to(x.device) for t in self._cpu)
            self._by_device[x.device] = table
        cos, sin = table
        return cos[:seq_len].to(x.dtype), sin[:seq_len].to(x.dtype)


def apply_rotary(x: torch.Tensor, rotary: Rotary) -> torch.Tensor:
    """RoPE on ``[B, H, S, D]`` the way upstream does it: channel pairs ``(2i, 2i+1)`` are rotated
    together, but the cos/sin tables use the half-split layout, so the two members of a pair turn
    at different frequencies. Checkpoints were trained with exactly this; do not "fix" it."""
    cos, sin = rotary
    pairs = x.unflatten(-1, (-1, 2))
    swapped = torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)
    return (x.float() * cos + swapped.float() * sin).to(x.dtype)


class RMSNorm(nn.Module):
    """Parameter-free RMS norm, computed like diffusers' ``RMSNorm(elementwise_affine=False)``."""

    def __init__(self, eps: float = 1e-6):
        super().__init__()
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        variance = x.to(torch.float32).pow(2).mean(-1, keepdim=True)
        return (x * torch.rsqrt(variance + self.eps)).to(x.dtype)


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """``[B, S, H*D]`` -> ``[B, H, S, D]`` (channel ``h*D + d``, upstream's split)."""
    return x.unflatten(-1, (heads, -1)).transpose(1, 2)


class LinearSelfAttention(nn.Module):
    """Non-causal ReLU linear attention over the latent frames, RoPE on queries and keys.

    Padding frames are removed by multiplying q, k and v with the frame mask, so they add nothing
    to the key/value summary; their own output rows become 0 before ``to_out`` (i.e. the bias).
    """

    eps = 1e-15

    def __init__(self, dim: int, heads: int, head_dim: int):
        super().__init__()
        inner = heads * head_dim
        self.heads = heads
        self.to_q = nn.Linear(dim, inner)
        self.to_k = nn.Linear(dim, inner)
        self.to_v = nn.Linear(dim, inner)
        self.to_out = nn.ModuleList([nn.Linear(inner, dim), nn.Dropout(0.0)])

    def forward(
        self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None, rotary: Rotary | None
    ) -> torch.Tensor:
        dtype = hidden_states.dtype
        query = _split_heads(self.to_q(hidden_states), self.heads)
        key = _split_heads(self.to_k(hidden_states), self.heads)
        value = _split_heads(self.to_v(hidden_states), self.heads)
        if rotary is not None:
            query = apply_rotary(query, rotary)
            key = apply_rotary(key, rotary)
        if attention_mask is not None:
            mask = attention_mask[:, None, :, None].to(key.dtype)
            query, key, value = query * mask, key * mask, value * mask
        query, key, value = F.relu(query).float(), F.relu(key).float(), value.float()
        # A row of ones under v^T makes the same two matmuls also produce the normaliser q . sum(k).
        # Operands are laid out channels-by-frames like upstream's, so BLAS rounds identically
        # (a transposed formulation drifts by an ulp, which bf16 outputs then show).
        value = F.pad(value.transpose(-1, -2), (0, 0, 0, 1), value=1.0)  # [B, H, D+1, S]
        summary = torch.matmul(value, key)  # [B, H, D+1, D]
        out = torch.matmul(summary, query.transpose(-1, -2)).float()  # autocast may have run it in bf16
        out = out[:, :, :-1] / (out[:, :, -1:] + self.eps)  # [B, H, D, S]
        out = out.flatten(1, 2).transpose(1, 2).to(dtype)
        out = self.to_out[1](self.to_out[0](out))
        return _clip_like_upstream(out)


class CrossAttention(nn.Module):
    """Softmax attention from latent frames to the condition sequence, RoPE on both sides.

    ``add_q_proj``/``add_k_proj``/``add_v_proj``/``to_add_out`` exist only because upstream's
    diffusers ``Attention`` created them; upstream never uses them, and neither does this module
    (they get no gradient: freeze them, or let DDP find unused parameters, when fine-tuning fully).
    """

    def __init__(self, dim: int, heads: int, head_dim: int, context_dim: int):
        super().__init__()
        inner = heads * head_dim
        self.heads = heads
        self.to_q = nn.Linear(dim, inner)
        self.to_k = nn.Linear(context_dim, inner)
        self.to_v = nn.Linear(context_dim, inner)
        self.add_k_proj = nn.Linear(context_dim, inner)
        self.add_v_proj = nn.Linear(context_dim, inner)
        self.add_q_proj = nn.Linear(context_dim, inner)
        self.to_out = nn.ModuleList([nn.Linear(inner, dim), nn.Dropout(0.0)])
        self.to_add_out = nn.Linear(inner, dim)

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None,
        encoder_attention_mask: torch.Tensor | None,
        rotary: Rotary | None,
        rotary_cross: Rotary | None,
    ) -> torch.Tensor:
        batch, frames = hidden_states.shape[:2]
        query = _split_heads(self.to_q(hidden_states), self.heads)
        key = _split_heads(self.to_k(encoder_hidden_states), self.heads)
        value = _split_heads(self.to_v(encoder_hidden_states), self.heads)
        if rotary is not None:
            query = apply_rotary(query, rotary)
            if rotary_cross is not None:
                key = apply_rotary(key, rotary_cross)

        # Upstream builds a [B, H, S, L] additive mask, valid where frame mask * token mask == 1, and
        # relies on SDPA returning 0 for fully masked rows (padded frames). A key-only mask plus
        # zeroing those rows afterwards is the same function, needs no [B, H, S, L] tensor and never
        # hands SDPA an all -inf row (whose result depends on the backend and torch version).
        device = hidden_states.device
        key_valid = (
            torch.ones(batch, key.shape[2], dtype=torch.bool, device=device)
            if encoder_attention_mask is None
            else encoder_attention_mask == 1
        )
        has_key = key_valid.any(dim=-1)
        key_valid = key_valid | ~has_key[:, None]
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=key_valid[:, None, None, :])
        row_valid = has_key[:, None]
        if attention_mask is not None:
            row_valid = row_valid & (attention_mask == 1)
        out = out.transpose(1, 2).flatten(2).to(query.dtype)
        out = out.masked_fill(~row_valid[..., None], 0.0)
        return self.to_out[1](self.to_out[0](out))


class ConvLayer(nn.Module):
    """A Conv1d (kept as ``.conv`` for upstream's key names) with an optional SiLU."""

    def __init__(self, in_dim: int, out_dim: int, kernel_size: int, groups: int = 1, bias: bool = True, act: bool = False):
        super().__init__()
        self.conv = nn.Conv1d(in_dim, out_dim, kernel_size, padding=kernel_size // 2, groups=groups, bias=bias)
        self.act = nn.SiLU() if act else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        return self.act(x) if self.act is not None else x


class GLUMBConv(nn.Module):
    """1x1 expand + SiLU, depthwise kernel-3 conv over time, SiLU-gated GLU, 1x1 project.

    Upstream does not mask the depthwise conv: padded frames leak into their real neighbours. With
    ``frame_mask`` the conv sees zeros there, as at the end of a sample alone.
    """

    def __init__(self, dim: int, hidden: int, kernel_size: int = 3):
        super().__init__()
        self.inverted_conv = ConvLayer(dim, hidden * 2, 1, act=True)
        self.depth_conv = ConvLayer(hidden * 2, hidden * 2, kernel_size, groups=hidden * 2)
        self.point_conv = ConvLayer(hidden, dim, 1, bias=False)
        self.glu_act = nn.SiLU()

    def forward(self, x: torch.Tensor, frame_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = self.inverted_conv(x.transpose(1, 2))
        if frame_mask is not None:
            x = x * frame_mask[:, None, :].to(x.dtype)
        x = self.depth_conv(x)
        x, gate = x.chunk(2, dim=1)
        return self.point_conv(x * self.glu_act(gate)).transpose(1, 2)


class LinearTransformerBlock(nn.Module):
    """adaLN-single block: modulated linear self-attention (gated), cross-attention on the
    un-normalised stream (neither modulated nor gated), modulated GLU conv FFN (gated)."""

    def __init__(self, dim: int, num_attention_heads: int, attention_head_dim: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = RMSNorm(1e-6)
        self.attn = LinearSelfAttention(dim, num_attention_heads, attention_head_dim)
        self.cross_attn = CrossAttention(dim, num_attention_heads, attention_head_dim, dim)
        self.norm2 = RMSNorm(1e-6)
        self.ff = GLUMBConv(dim, int(dim * mlp_ratio))
        self.scale_shift_table = nn.Parameter(torch.randn(6, dim) / dim**0.5)

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None,
        encoder_attention_mask: torch.Tensor | None,
        rotary_freqs_cis: Rotary | None,
        rotary_freqs_cis_cross: Rotary | None,
        temb: torch.Tensor,
        frame_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        modulation = self.scale_shift_table[None] + temb.reshape(hidden_states.shape[0], 6, -1)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = modulation.chunk(6, dim=1)

        normed = self.norm1(hidden_states) * (1 + scale_msa) + shift_msa
        hidden_states = gate_msa * self.attn(normed, attention_mask, rotary_freqs_cis) + hidden_states

        hidden_states = (
            self.cross_attn(
                hidden_states,
                encoder_hidden_states,
                attention_mask,
                encoder_attention_mask,
                rotary_freqs_cis,
                rotary_freqs_cis_cross,
            )
            + hidden_states
        )

        normed = self.norm2(hidden_states) * (1 + scale_mlp) + shift_mlp
        return hidden_states + gate_mlp * self.ff(normed, frame_mask)
