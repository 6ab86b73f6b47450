"""The FLOPs behind cluster/README.md's sizing guide, counted at the real sizes on shapes alone
(fake tensors: no weights, no compute), each per second of audio: one LoRA training step (the DiT's
forward + backward) of ACE-Step 1.5 2B and XL (condition cached, as a cluster run should) and of
v1 3.5B, and the 1.5 VAE encoder that prep runs on every song.

    python bench/cluster_sizing.py [--clip-seconds 30]

FLOPs are counted by torch's FlopCounterMode (matmuls, attention, convolutions: what a GPU spends
its time on); elementwise work is not counted. Turning FLOPs into hours needs a GPU's achieved
throughput: cluster/README.md takes it from upstream's published training speed.
"""

from __future__ import annotations

import argparse

import torch

from common import XL_TRANSFORMER, real_sample, real_trainable, real_v1_sample, real_v1_trainable  # noqa: E402

from acestep_dist.config import TrainConfig  # noqa: E402

SAMPLE_RATE = 48000


def dit_step_flops(clip_seconds: float, transformer_config: dict | str | None) -> float:
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils.flop_counter import FlopCounterMode

    from acestep_dist.train.memory_estimate import _fake_copy_of_parameters

    config = TrainConfig(lora_rank=64, lora_alpha=64, lr_warmup_steps=0)
    if transformer_config == "v1":
        operations, trainable = real_v1_trainable("meta", config)
        batch = operations.collate([real_v1_sample(clip_seconds)])
    else:
        family, trainable = real_trainable("meta", config, True, transformer_config)
        batch = family.collate([real_sample(clip_seconds, family, cached=True)])
    module = trainable.module
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    _fake_copy_of_parameters(module, torch.bfloat16, mode)
    counter = FlopCounterMode(display=False)
    with counter:
        loss = module(batch, [torch.Generator().manual_seed(0)])[0]
        loss.backward()
    return float(counter.get_total_flops())


def vae_encode_flops(seconds: float) -> float:
    from diffusers import AutoencoderOobleck
    from torch.utils.flop_counter import FlopCounterMode

    # ACE-Step 1.5's VAE: 48 kHz stereo, hop 1920, 64 latent channels (its vae/config.json)
    with torch.device("meta"):
        vae = AutoencoderOobleck(encoder_hidden_size=128, downsampling_ratios=[2, 4, 4, 6, 10],
                                 channel_multiples=[1, 2, 4, 8, 16], decoder_channels=128,
                                 decoder_input_channels=64, audio_channels=2, sampling_rate=SAMPLE_RATE)
        audio = torch.empty(1, 2, int(seconds * SAMPLE_RATE))
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        vae.encode(audio)
    return float(counter.get_total_flops())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clip-seconds", type=float, default=30.0)
    args = parser.parse_args()
    vae = vae_encode_flops(args.clip_seconds) / args.clip_seconds
    print(f"VAE encode: {vae / 1e9:.1f} GFLOP per second of audio")
    for name, config in (("1.5 2B", None), ("1.5 XL", XL_TRANSFORMER), ("v1 3.5B", "v1")):
        step = dit_step_flops(args.clip_seconds, config) / args.clip_seconds
        print(f"LoRA step, {name} DiT, {args.clip_seconds:g} s clip: {step / 1e9:.1f} GFLOP per second of audio "
              f"(forward + backward)")


if __name__ == "__main__":
    main()
