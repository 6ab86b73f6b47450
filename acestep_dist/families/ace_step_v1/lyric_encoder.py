"""The ACE-Step v1 lyric encoder: a Conformer (no conv module, no macaron FFN) with ESPnet-style
relative positional self-attention, pre-norm, full (non-causal) context.

Upstream hard-codes its size (output 1024, 16 heads, 4096 FF units, 6 blocks) and released configs
do not record it, so ``ConformerEncoder`` takes the size explicitly and
``lyric_encoder_config_from_shapes`` reads it back off a checkpoint's tensor shapes. Parameter
names (``linear_q``, ``pos_bias_u``, ``feed_forward.w_1``, ``embed.out.0`` ...) are upstream's.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

# What upstream builds when nothing overrides it (the released 3.5B checkpoint).
RELEASED_LYRIC_ENCODER = {"output_size": 1024, "attention_heads": 16, "linear_units": 4096, "num_blocks": 6}
LYRIC_ENCODER_KEYS = tuple(RELEASED_LYRIC_ENCODER)

_BLOCK_KEY = re.compile(r"(?:^|\.)lyric_encoder\.encoders\.(\d+)\.")


def lyric_encoder_config_from_shapes(shapes: Mapping[str, Sequence[int]]) -> dict[str, int]:
    """The Conformer size implied by a state dict's ``{key: shape}``.

    ``output_size`` is ``after_norm.weight``'s length, ``attention_heads`` the first dimension of
    ``pos_bias_u`` (``[heads, d_k]``), ``linear_units`` the rows of ``feed_forward.w_1.weight`` and
    ``num_blocks`` the number of ``encoders.N`` indices. Keys may carry a prefix before
    ``lyric_encoder.``.
    """

    def find(suffix: str) -> Sequence[int]:
        for key, shape in shapes.items():
            if key == suffix or key.endswith("." + suffix):
                return shape
        raise KeyError(f"no '{suffix}' among the checkpoint's tensors: is this an ACE-Step v1 transformer?")

    blocks = {int(m.group(1)) for key in shapes if (m := _BLOCK_KEY.search(key))}
    if not blocks:
        raise KeyError("no 'lyric_encoder.encoders.N.' tensors in the checkpoint: is this an ACE-Step v1 transformer?")
    if blocks != set(range(len(blocks))):
        raise ValueError(f"lyric encoder block indices are not contiguous: {sorted(blocks)}")
    return {
        "output_size": int(find("lyric_encoder.after_norm.weight")[0]),
        "attention_heads": int(find("lyric_encoder.encoders.0.self_attn.pos_bias_u")[0]),
        "linear_units": int(find("lyric_encoder.encoders.0.feed_forward.w_1.weight")[0]),
        "num_blocks": len(blocks),
    }


def resolve_lyric_encoder_config(config: Mapping[str, int] | None, lyric_hidden_size: int) -> dict[str, int]:
    """Fill a partial size from the released one and check it can run.

    ``output_size`` defaults to ``lyric_hidden_size``: the DiT's ``lyric_proj`` reads the encoder's
    output with ``lyric_hidden_size`` inputs, so any working checkpoint has them equal.
    """
    config = dict(config or {})
    unknown = set(config) - set(LYRIC_ENCODER_KEYS)
    if unknown:
        raise ValueError(f"unknown lyric_encoder_config keys {sorted(unknown)}; known: {list(LYRIC_ENCODER_KEYS)}")
    resolved = {**RELEASED_LYRIC_ENCODER, "output_size": lyric_hidden_size, **config}
    resolved = {key: int(value) for key, value in resolved.items()}
    if resolved["output_size"] != lyric_hidden_size:
        raise ValueError(
            f"lyric encoder output_size {resolved['output_size']} must equal lyric_hidden_size {lyric_hidden_size}"
        )
    if resolved["output_size"] % resolved["attention_heads"]:
        raise ValueError(
            f"lyric encoder output_size {resolved['output_size']} is not divisible by "
            f"attention_heads {resolved['attention_heads']}; pass lyric_encoder_config"
        )
    return resolved


class RelPositionalEncoding(nn.Module):
    """Scales the input by ``sqrt(d_model)`` and returns the sinusoidal table for relative offsets
    ``T-1 .. -(T-1)`` (``[1, 2T-1, d]``), each with dropout, as ESPnet's ``rel_pos_espnet``.

    The table is float32 from the CPU (covering at least 5000 positions) like upstream's, cached per
    device and cast to the input's dtype.
    """

    def __init__(self, d_model: int, dropout_rate: float, max_len: int = 5000):
        super().__init__()
        self.d_model = d_model
        self.xscale = math.sqrt(d_model)
        self.max_len = max_len
        self.dropout = nn.Dropout(dropout_rate)
        self._cpu: torch.Tensor | None = None
        self._by_key: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}

    def _build(self, length: int) -> torch.Tensor:
        position = torch.arange(0, length, dtype=torch.float32, device="cpu").unsqueeze(1)
        div_term = torch.exp(
            torch.arange(0, self.d_model, 2, dtype=torch.float32, device="cpu") * -(math.log(10000.0) / self.d_model)
        )
        ahead = torch.zeros(length, self.d_model, dtype=torch.float32, device="cpu")
        behind = torch.zeros(length, self.d_model, dtype=torch.float32, device="cpu")
        ahead[:, 0::2] = torch.sin(position * div_term)
        ahead[:, 1::2] = torch.cos(position * div_term)
        behind[:, 0::2] = torch.sin(-position * div_term)
        behind[:, 1::2] = torch.cos(-position * div_term)
        # Row i is offset (length-1-i): positive offsets descending, then the negative ones.
        return torch.cat([ahead.flip(0), behind[1:]], dim=0).unsqueeze(0)

    def table(self, length: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        if self._cpu is None or self._cpu.shape[1] < 2 * length - 1:
            self._cpu = self._build(max(length, self.max_len))
            self._by_key.clear()
        full = self._by_key.get((device, dtype))
        if full is None:
            full = self._cpu.to(device=device, dtype=dtype)
            self._by_key[(device, dtype)] = full
        centre = full.shape[1] // 2
        return full[:, centre - length + 1 : centre + length]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pos_emb = self.table(x.shape[1], x.device, x.dtype)
        return self.dropout(x * self.xscale), self.dropout(pos_emb)


class LinearEmbed(nn.Module):
    """Linear -> LayerNorm -> dropout, then the relative positional encoding."""

    def __init__(self, idim: int, odim: int, dropout_rate: float, positional_dropout_rate: float):
        super().__init__()
        self.out = nn.Sequential(nn.Linear(idim, odim), nn.LayerNorm(odim, eps=1e-5), nn.Dropout(dropout_rate))
        self.pos_enc = RelPositionalEncoding(odim, positional_dropout_rate)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.pos_enc(self.out(x))


def relative_shift(scores: torch.Tensor) -> torch.Tensor:
    """``[B, H, T, 2T-1]`` scores indexed by relative-offset row -> ``[B, H, T, T]`` indexed by key,
    i.e. ``out[i, j] = scores[i, T-1-i+j]`` (Transformer-XL's pad-and-reshape skew)."""
    batch, heads, length, width = scores.shape
    padded = F.pad(scores, (1, 0)).view(batch, heads, width + 1, length)
    return padded[:, :, 1:].reshape(batch, heads, length, width)[..., :length]


class RelPositionMultiHeadedAttention(nn.Module):
    """Self-attention with Transformer-XL relative position terms (``pos_bias_u``/``pos_bias_v``)."""

    def __init__(self, n_head: int, n_feat: int, dropout_rate: float, key_bias: bool = True):
        super().__init__()
        self.h = n_head
        self.d_k = n_feat // n_head
        self.linear_q = nn.Linear(n_feat, n_feat)
        self.linear_k = nn.Linear(n_feat, n_feat, bias=key_bias)
        self.linear_v = nn.Linear(n_feat, n_feat)
        self.linear_out = nn.Linear(n_feat, n_feat)
        self.linear_pos = nn.Linear(n_feat, n_feat, bias=False)
        self.pos_bias_u = nn.Parameter(torch.empty(n_head, self.d_k))
        self.pos_bias_v = nn.Parameter(torch.empty(n_head, self.d_k))
        nn.init.xavier_uniform_(self.pos_bias_u)
        nn.init.xavier_uniform_(self.pos_bias_v)
        self.dropout = nn.Dropout(dropout_rate)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, pos_emb: torch.Tensor) -> torch.Tensor:
        """``x`` [B, T, C]; ``mask`` [B, 1, T] bool (True = real token); ``pos_emb`` [1, 2T-1, C]."""
        batch, length, _ = x.shape
        query = self.linear_q(x).view(batch, length, self.h, self.d_k)
        key = self.linear_k(x).view(batch, length, self.h, self.d_k).transpose(1, 2)
        value = self.linear_v(x).view(batch, length, self.h, self.d_k).transpose(1, 2)
        pos = self.linear_pos(pos_emb).view(pos_emb.shape[0], -1, self.h, self.d_k).transpose(1, 2)

        content = torch.matmul((query + self.pos_bias_u).transpose(1, 2), key.transpose(-2, -1))
        position = torch.matmul((query + self.pos_bias_v).transpose(1, 2), pos.transpose(-2, -1))
        scores = (content + relative_shift(position)) / math.sqrt(self.d_k)

        # Zeroing after the softmax turns a sample with no real token (all -inf -> NaN) into zeros.
        padding = ~mask.unsqueeze(1)  # [B, 1, 1, T]
        weights = torch.softmax(scores.masked_fill(padding, -float("inf")), dim=-1).masked_fill(padding, 0.0)
        out = torch.matmul(self.dropout(weights), value)
        return self.linear_out(out.transpose(1, 2).reshape(batch, length, self.h * self.d_k))


class PositionwiseFeedForward(nn.Module):
    def __init__(self, idim: int, hidden_units: int, dropout_rate: float):
        super().__init__()
        self.w_1 = nn.Linear(idim, hidden_units)
        self.activation = nn.SiLU()
        self.dropout = nn.Dropout(dropout_rate)
        self.w_2 = nn.Linear(hidden_units, idim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_2(self.dropout(self.activation(self.w_1(x))))


class ConformerEncoderLayer(nn.Module):
    """Pre-norm: ``x + drop(attn(norm_mha(x)))`` then ``x + drop(ff(norm_ff(x)))``."""

    def __init__(self, size: int, heads: int, linear_units: int, dropout_rate: float, attention_dropout_rate: float):
        super().__init__()
        self.self_attn = RelPositionMultiHeadedAttention(heads, size, attention_dropout_rate)
        self.feed_forward = PositionwiseFeedForward(size, linear_units, dropout_rate)
        self.norm_ff = nn.LayerNorm(size, eps=1e-5)
        self.norm_mha = nn.LayerNorm(size, eps=1e-5)
        self.dropout = nn.Dropout(dropout_rate)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, pos_emb: torch.Tensor) -> torch.Tensor:
        x = x + self.dropout(self.self_attn(self.norm_mha(x), mask, pos_emb))
        return x + self.dropout(self.feed_forward(self.norm_ff(x)))


def _checkpoint(module: nn.Module, *args):
    return torch.utils.checkpoint.checkpoint(module.__call__, *args, use_reentrant=False)


class ConformerEncoder(nn.Module):
    """Upstream's lyric ``ConformerEncoder`` as the DiT uses it (``static_chunk_size=0``: every
    token sees every real token). Dropout (0.1 by default) is active in ``train()`` mode, as in
    upstream's LoRA training."""

    def __init__(
        self,
        input_size: int,
        output_size: int = 1024,
        attention_heads: int = 16,
        linear_units: int = 4096,
        num_blocks: int = 6,
        dropout_rate: float = 0.1,
        positional_dropout_rate: float = 0.1,
        attention_dropout_rate: float = 0.0,
    ):
        super().__init__()
        self.output_size = output_size
        self.embed = LinearEmbed(input_size, output_size, dropout_rate, positional_dropout_rate)
        self.encoders = nn.ModuleList(
            ConformerEncoderLayer(output_size, attention_heads, linear_units, dropout_rate, attention_dropout_rate)
            for _ in range(num_blocks)
        )
        self.after_norm = nn.LayerNorm(output_size, eps=1e-5)
        self.gradient_checkpointing = False

    def forward(self, xs: torch.Tensor, pad_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``xs`` [B, T, input_size], ``pad_mask`` [B, T] (nonzero = real) -> ``([B, T, output_size], [B, 1, T] bool)``.

        Padded positions are computed like real ones (they only stop being attended to); the DiT's
        cross-attention masks them later."""
        masks = pad_mask.to(torch.bool).unsqueeze(1)
        xs, pos_emb = self.embed(xs)
        run = getattr(self, "_gradient_checkpointing_func", None) or _checkpoint
        for layer in self.encoders:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                xs = run(layer, xs, masks, pos_emb)
            else:
                xs = layer(xs, masks, pos_emb)
        return self.after_norm(xs), masks
