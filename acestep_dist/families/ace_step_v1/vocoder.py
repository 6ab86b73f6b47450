"""ACE-Step v1's music vocoder, ``ADaMoSHiFiGANV1``: 128-bin log-mel at 44.1 kHz -> mono waveform.

A ConvNeXt backbone (mel -> ``num_mels`` features) feeds a HiFi-GAN generator whose transposed
convolutions upsample by ``prod(upsample_rates)`` = the hop (512). The module also owns the log-mel
front end that the music DCAE is trained on; its mel filterbank and window are buffers stored in the
checkpoint. Parameter and buffer names are upstream's, so ``music_vocoder/`` folders
(config.json + diffusion_pytorch_model.safetensors) load unchanged with ``from_pretrained``.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Sequence

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import Tensor, nn

LOG_CLAMP = 1e-5  # floor before the log: log(1e-5) ~ -11.5, the bottom of the mel range


# --- mel front end -------------------------------------------------------------------------------

# Slaney's mel scale: linear below 1 kHz (200/3 Hz per mel), logarithmic above (27 mels per
# factor 6.4). The constants are spelled as torchaudio computes them so the float32 filterbank of
# a new model is bit-identical to the checkpoints'.
_HZ_PER_MEL = 200.0 / 3
_LOG_START_HZ = 1000.0
_LOG_START_MEL = _LOG_START_HZ / _HZ_PER_MEL
_LOG_STEP = math.log(6.4) / 27.0


def _hz_to_mel_slaney(freq: float) -> float:
    if freq >= _LOG_START_HZ:
        return _LOG_START_MEL + math.log(freq / _LOG_START_HZ) / _LOG_STEP
    return freq / _HZ_PER_MEL


def _mel_to_hz_slaney(mels: Tensor) -> Tensor:
    linear = _HZ_PER_MEL * mels
    logarithmic = _LOG_START_HZ * torch.exp(_LOG_STEP * (mels - _LOG_START_MEL))
    return torch.where(mels >= _LOG_START_MEL, logarithmic, linear)


def slaney_mel_filterbank(n_freqs: int, f_min: float, f_max: float, n_mels: int, sample_rate: int) -> Tensor:
    """Triangular Slaney-scale, area-normalised filters ``[n_freqs, n_mels]`` in float32.

    Equal to ``torchaudio.functional.melscale_fbanks(..., norm="slaney", mel_scale="slaney")``,
    which builds it in float32 too; checkpoints carry their own copy, this is for new models.

    Always computed on the CPU, whatever device context the module is built under: under
    ``torch.device("meta")`` (dry runs) it is a small real constant, and every factory here names
    its device so no ambient context or patched constructor can mix devices."""
    bins = torch.linspace(0, sample_rate // 2, n_freqs, dtype=torch.float32, device="cpu")
    mel_points = torch.linspace(_hz_to_mel_slaney(f_min), _hz_to_mel_slaney(f_max), n_mels + 2,
                                dtype=torch.float32, device="cpu")
    edges = _mel_to_hz_slaney(mel_points)
    spacing = edges[1:] - edges[:-1]
    offsets = edges[None, :] - bins[:, None]
    rising = (-1.0 * offsets[:, :-2]) / spacing[:-1]
    falling = offsets[:, 2:] / spacing[1:]
    filters = torch.minimum(rising, falling).clamp_min(0.0)
    return filters * (2.0 / (edges[2:] - edges[:-2]))[None, :]


class _Float32Buffers(nn.Module):
    """Keeps its buffers float32 through ``.to(dtype)`` / ``.half()``: they are constants of the
    front end, and casting them would change every mel (only the device follows the module)."""

    def _apply(self, fn, recurse=True):
        kept = dict(self._buffers)
        super()._apply(fn, recurse)
        for name, original in kept.items():
            moved = self._buffers[name]
            if original is not None and moved is not None and moved.dtype != original.dtype:
                self._buffers[name] = original.to(device=moved.device)
        return self


class LinearSpectrogram(_Float32Buffers):
    """Magnitude STFT with reflect padding instead of centring (frames = samples / hop)."""

    def __init__(self, n_fft: int = 2048, win_length: int = 2048, hop_length: int = 512,
                 center: bool = False, mode: str = "pow2_sqrt"):
        super().__init__()
        self.n_fft = n_fft
        self.win_length = win_length
        self.hop_length = hop_length
        self.center = center
        self.mode = mode
        self.register_buffer("window", torch.hann_window(win_length))

    def forward(self, y: Tensor) -> Tensor:
        if y.ndim == 3:
            y = y.squeeze(1)
        *lead, length = y.shape
        extra = self.win_length - self.hop_length
        y = F.pad(y.reshape(-1, 1, length), (extra // 2, (extra + 1) // 2), mode="reflect").squeeze(1)
        spec = torch.stft(y.float(), self.n_fft, hop_length=self.hop_length, win_length=self.win_length,
                          window=self.window.float(), center=self.center, pad_mode="reflect",
                          normalized=False, onesided=True, return_complex=True)
        spec = torch.view_as_real(spec)
        if self.mode == "pow2_sqrt":
            # the epsilon keeps sqrt's gradient finite on silence
            spec = torch.sqrt(spec.pow(2).sum(-1) + 1e-6)
        return spec.reshape(*lead, *spec.shape[-2:])


class MelScale(_Float32Buffers):
    """Linear magnitude ``[..., n_stft, frames]`` -> mel ``[..., n_mels, frames]`` (Slaney)."""

    def __init__(self, n_mels: int = 128, sample_rate: int = 44100, f_min: float = 0.0,
                 f_max: float | None = None, n_stft: int = 1025):
        super().__init__()
        self.n_mels = n_mels
        self.sample_rate = sample_rate
        self.f_min = f_min
        self.f_max = f_max if f_max is not None else float(sample_rate // 2)
        self.register_buffer("fb", slaney_mel_filterbank(n_stft, f_min, self.f_max, n_mels, sample_rate))

    def forward(self, spec: Tensor) -> Tensor:
        return torch.matmul(spec.transpose(-1, -2), self.fb).transpose(-1, -2)


class LogMelSpectrogram(nn.Module):
    """Waveform ``[..., time]`` at ``sample_rate`` -> natural-log mel ``[..., n_mels, time / hop]``.

    Always computed in float32; the result is float32 whatever the input dtype."""

    def __init__(self, sample_rate: int = 44100, n_fft: int = 2048, win_length: int = 2048,
                 hop_length: int = 512, n_mels: int = 128, center: bool = False, f_min: float = 0.0,
                 f_max: float | None = None):
        super().__init__()
        self.sample_rate = sample_rate
        self.n_fft = n_fft
        self.win_length = win_length
        self.hop_length = hop_length
        self.center = center
        self.n_mels = n_mels
        self.f_min = f_min
        self.f_max = f_max or sample_rate // 2
        self.spectrogram = LinearSpectrogram(n_fft, win_length, hop_length, center)
        self.mel_scale = MelScale(n_mels, sample_rate, f_min, self.f_max, n_fft // 2 + 1)

    def compress(self, x: Tensor) -> Tensor:
        return torch.log(torch.clamp(x, min=LOG_CLAMP))

    def decompress(self, x: Tensor) -> Tensor:
        return torch.exp(x)

    def forward(self, x: Tensor, return_linear: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        linear = self.spectrogram(x)
        mel = self.compress(self.mel_scale(linear))
        if return_linear:
            return mel, self.compress(linear)
        return mel


# --- ConvNeXt backbone ---------------------------------------------------------------------------

class DropPath(nn.Module):
    """Stochastic depth: drops the whole residual branch per sample while training."""

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: Tensor) -> Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep


class LayerNorm(nn.Module):
    """LayerNorm over the last dim (``channels_last``) or over dim 1 (``channels_first``)."""

    def __init__(self, normalized_shape: int, eps: float = 1e-6, data_format: str = "channels_last"):
        super().__init__()
        if data_format not in ("channels_last", "channels_first"):
            raise ValueError(f"unknown data_format {data_format!r}")
        self.weight = nn.Parameter(torch.ones(normalized_shape))
        self.bias = nn.Parameter(torch.zeros(normalized_shape))
        self.eps = eps
        self.data_format = data_format
        self.normalized_shape = (normalized_shape,)

    def forward(self, x: Tensor) -> Tensor:
        if self.data_format == "channels_last":
            return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        # written out (not F.layer_norm on a transpose) to keep upstream's exact arithmetic
        mean = x.mean(1, keepdim=True)
        var = (x - mean).pow(2).mean(1, keepdim=True)
        x = (x - mean) / torch.sqrt(var + self.eps)
        return self.weight[:, None] * x + self.bias[:, None]


class ConvNeXtBlock(nn.Module):
    """Depthwise conv -> LayerNorm -> 4x MLP (GELU) -> layer scale, with a residual."""

    def __init__(self, dim: int, drop_path: float = 0.0, layer_scale_init_value: float = 1e-6,
                 mlp_ratio: float = 4.0, kernel_size: int = 7, dilation: int = 1):
        super().__init__()
        self.dwconv = nn.Conv1d(dim, dim, kernel_size=kernel_size, padding=int(dilation * (kernel_size - 1) / 2),
                                groups=dim)
        self.norm = LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, int(mlp_ratio * dim))
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(int(mlp_ratio * dim), dim)
        self.gamma = (nn.Parameter(layer_scale_init_value * torch.ones(dim))
                      if layer_scale_init_value > 0 else None)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x: Tensor, apply_residual: bool = True) -> Tensor:
        y = self.dwconv(x).permute(0, 2, 1)
        y = self.pwconv2(self.act(self.pwconv1(self.norm(y))))
        if self.gamma is not None:
            y = self.gamma * y
        y = self.drop_path(y.permute(0, 2, 1))
        return x + y if apply_residual else y


class ParallelConvNeXtBlock(nn.Module):
    """Several ConvNeXt blocks of different kernel sizes on the same input, summed with it."""

    def __init__(self, kernel_sizes: Sequence[int], *args, **kwargs):
        super().__init__()
        self.blocks = nn.ModuleList([ConvNeXtBlock(*args, kernel_size=k, **kwargs) for k in kernel_sizes])

    def forward(self, x: Tensor) -> Tensor:
        branches = [block(x, apply_residual=False) for block in self.blocks] + [x]
        return torch.stack(branches, dim=1).sum(dim=1)


class ConvNeXtEncoder(nn.Module):
    """Stem conv + ConvNeXt stages (channel changes between stages), final LayerNorm."""

    def __init__(self, input_channels: int = 3, depths: Sequence[int] = (3, 3, 9, 3),
                 dims: Sequence[int] = (96, 192, 384, 768), drop_path_rate: float = 0.0,
                 layer_scale_init_value: float = 1e-6, kernel_sizes: Sequence[int] = (7,)):
        super().__init__()
        if len(depths) != len(dims):
            raise ValueError("depths and dims must have the same length")
        self.channel_layers = nn.ModuleList([nn.Sequential(
            nn.Conv1d(input_channels, dims[0], kernel_size=7, padding=3, padding_mode="replicate"),
            LayerNorm(dims[0], eps=1e-6, data_format="channels_first"),
        )])
        for i in range(len(depths) - 1):
            self.channel_layers.append(nn.Sequential(
                LayerNorm(dims[i], eps=1e-6, data_format="channels_first"),
                nn.Conv1d(dims[i], dims[i + 1], kernel_size=1),
            ))
        if len(kernel_sizes) == 1:
            block = partial(ConvNeXtBlock, kernel_size=kernel_sizes[0])
        else:
            block = partial(ParallelConvNeXtBlock, kernel_sizes=kernel_sizes)
        rates = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()  # plain numbers, on any default device
        self.stages = nn.ModuleList()
        start = 0
        for depth, dim in zip(depths, dims):
            self.stages.append(nn.Sequential(*[
                block(dim=dim, drop_path=rates[start + j], layer_scale_init_value=layer_scale_init_value)
                for j in range(depth)]))
            start += depth
        self.norm = LayerNorm(dims[-1], eps=1e-6, data_format="channels_first")
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Conv1d, nn.Linear)):
            nn.init.trunc_normal_(module.weight, std=0.02)
            nn.init.constant_(module.bias, 0)

    def forward(self, x: Tensor) -> Tensor:
        for channel_layer, stage in zip(self.channel_layers, self.stages):
            x = stage(channel_layer(x))
        return self.norm(x)


# --- HiFi-GAN head -------------------------------------------------------------------------------

class _WeightNormMixin:
    """Weight normalisation stored as ``weight_g`` / ``weight_v`` (the keys of the old
    ``torch.nn.utils.weight_norm`` the checkpoints were saved with); norm over all dims but 0."""

    def _split_weight(self) -> None:
        v = self.weight.detach()
        del self.weight
        self.weight_v = nn.Parameter(v.clone())
        self.weight_g = nn.Parameter(torch.norm_except_dim(v, 2, 0))

    @property
    def weight(self) -> Tensor:
        params = self._parameters
        if "weight_v" in params:
            # the fused op the old weight_norm hook called: bit-identical weights
            return torch._weight_norm(params["weight_v"], params["weight_g"], 0)
        if "weight" in params:  # during the base class's __init__
            return params["weight"]
        raise AttributeError("weight")


class WNConv1d(_WeightNormMixin, nn.Conv1d):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._split_weight()

    def forward(self, x: Tensor) -> Tensor:
        return self._conv_forward(x, self.weight, self.bias)


class WNConvTranspose1d(_WeightNormMixin, nn.ConvTranspose1d):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._split_weight()

    def forward(self, x: Tensor) -> Tensor:
        return F.conv_transpose1d(x, self.weight, self.bias, self.stride, self.padding, self.output_padding,
                                  self.groups, self.dilation)


def get_padding(kernel_size: int, dilation: int = 1) -> int:
    return (kernel_size * dilation - dilation) // 2


def _init_wn_conv(module: nn.Module, std: float = 0.01) -> None:
    if isinstance(module, _WeightNormMixin):
        with torch.no_grad():
            module.weight_v.normal_(0.0, std)
            module.weight_g.copy_(torch.norm_except_dim(module.weight_v, 2, 0))


class ResBlock1(nn.Module):
    """Three (dilated conv, conv) pairs with SiLU, each added back to its input."""

    def __init__(self, channels: int, kernel_size: int = 3, dilation: Sequence[int] = (1, 3, 5)):
        super().__init__()
        self.convs1 = nn.ModuleList([
            WNConv1d(channels, channels, kernel_size, 1, dilation=d, padding=get_padding(kernel_size, d))
            for d in dilation])
        self.convs2 = nn.ModuleList([
            WNConv1d(channels, channels, kernel_size, 1, dilation=1, padding=get_padding(kernel_size, 1))
            for _ in dilation])
        self.apply(_init_wn_conv)

    def forward(self, x: Tensor) -> Tensor:
        for conv1, conv2 in zip(self.convs1, self.convs2):
            x = conv2(F.silu(conv1(F.silu(x)))) + x
        return x


class HiFiGANGenerator(nn.Module):
    """Features ``[B, num_mels, frames]`` -> waveform ``[B, 1, frames * hop]`` in (-1, 1)."""

    def __init__(self, *, hop_length: int = 512, upsample_rates: Sequence[int] = (8, 8, 2, 2, 2),
                 upsample_kernel_sizes: Sequence[int] = (16, 16, 8, 2, 2),
                 resblock_kernel_sizes: Sequence[int] = (3, 7, 11),
                 resblock_dilation_sizes: Sequence[Sequence[int]] = ((1, 3, 5), (1, 3, 5), (1, 3, 5)),
                 num_mels: int = 128, upsample_initial_channel: int = 512, use_template: bool = True,
                 pre_conv_kernel_size: int = 7, post_conv_kernel_size: int = 7):
        super().__init__()
        if math.prod(upsample_rates) != hop_length:
            raise ValueError(f"prod(upsample_rates) = {math.prod(upsample_rates)} must equal hop_length {hop_length}")
        if use_template:
            # upstream's f0-template branch; no released vocoder uses it
            raise NotImplementedError("use_template=True is not supported")
        self.use_template = use_template
        self.num_upsamples = len(upsample_rates)
        self.num_kernels = len(resblock_kernel_sizes)
        self.conv_pre = WNConv1d(num_mels, upsample_initial_channel, pre_conv_kernel_size, 1,
                                 padding=get_padding(pre_conv_kernel_size))
        self.noise_convs = nn.ModuleList()
        self.ups = nn.ModuleList()
        self.resblocks = nn.ModuleList()
        channels = upsample_initial_channel
        for rate, kernel in zip(upsample_rates, upsample_kernel_sizes):
            self.ups.append(WNConvTranspose1d(channels, channels // 2, kernel, rate, padding=(kernel - rate) // 2))
            channels //= 2
            for k, d in zip(resblock_kernel_sizes, resblock_dilation_sizes):
                self.resblocks.append(ResBlock1(channels, k, d))
        self.activation_post = nn.SiLU()
        self.conv_post = WNConv1d(channels, 1, post_conv_kernel_size, 1, padding=get_padding(post_conv_kernel_size))
        self.ups.apply(_init_wn_conv)
        self.conv_post.apply(_init_wn_conv)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv_pre(x)
        for i, up in enumerate(self.ups):
            x = up(F.silu(x))
            blocks = self.resblocks[i * self.num_kernels:(i + 1) * self.num_kernels]
            total = blocks[0](x)
            for block in blocks[1:]:
                total = total + block(x)
            x = total / self.num_kernels
        return torch.tanh(self.conv_post(self.activation_post(x)))


# --- the vocoder ---------------------------------------------------------------------------------

class ADaMoSHiFiGANV1(ModelMixin, ConfigMixin):
    """Log-mel (44.1 kHz, hop 512, 128 Slaney mels) -> mono 44.1 kHz waveform, with its mel front end."""

    @register_to_config
    def __init__(
        self,
        input_channels: int = 128,
        depths: Sequence[int] = (3, 3, 9, 3),
        dims: Sequence[int] = (128, 256, 384, 512),
        drop_path_rate: float = 0.0,
        kernel_sizes: Sequence[int] = (7,),
        upsample_rates: Sequence[int] = (4, 4, 2, 2, 2, 2, 2),
        upsample_kernel_sizes: Sequence[int] = (8, 8, 4, 4, 4, 4, 4),
        resblock_kernel_sizes: Sequence[int] = (3, 7, 11, 13),
        resblock_dilation_sizes: Sequence[Sequence[int]] = ((1, 3, 5), (1, 3, 5), (1, 3, 5), (1, 3, 5)),
        num_mels: int = 512,
        upsample_initial_channel: int = 1024,
        use_template: bool = False,
        pre_conv_kernel_size: int = 13,
        post_conv_kernel_size: int = 13,
        sampling_rate: int = 44100,
        n_fft: int = 2048,
        win_length: int = 2048,
        hop_length: int = 512,
        f_min: int = 40,
        f_max: int = 16000,
        n_mels: int = 128,
    ):
        super().__init__()
        self.backbone = ConvNeXtEncoder(input_channels=input_channels, depths=depths, dims=dims,
                                        drop_path_rate=drop_path_rate, kernel_sizes=kernel_sizes)
        self.head = HiFiGANGenerator(
            hop_length=hop_length, upsample_rates=upsample_rates, upsample_kernel_sizes=upsample_kernel_sizes,
            resblock_kernel_sizes=resblock_kernel_sizes, resblock_dilation_sizes=resblock_dilation_sizes,
            num_mels=num_mels, upsample_initial_channel=upsample_initial_channel, use_template=use_template,
            pre_conv_kernel_size=pre_conv_kernel_size, post_conv_kernel_size=post_conv_kernel_size)
        self.sampling_rate = sampling_rate
        self.mel_transform = LogMelSpectrogram(sample_rate=sampling_rate, n_fft=n_fft, win_length=win_length,
                                               hop_length=hop_length, f_min=f_min, f_max=f_max, n_mels=n_mels)
        self.eval()

    def forward(self, mel: Tensor) -> Tensor:
        """Log-mel ``[B, n_mels, frames]`` -> waveform ``[B, 1, frames * hop]``."""
        return self.head(self.backbone(mel))

    @torch.no_grad()
    def decode(self, mel: Tensor) -> Tensor:
        """``forward`` without gradients; ``mel`` is cast to the vocoder's dtype."""
        return self.forward(mel.to(self.dtype))

    @torch.no_grad()
    def encode(self, x: Tensor) -> Tensor:
        """Waveform ``[..., time]`` at 44.1 kHz -> float32 log-mel ``[..., n_mels, time / hop]``."""
        return self.mel_transform(x)
