"""The README's memory table: ``acedist train --dry-run``'s estimate (the model on the meta device,
one fake step; see acestep_dist/train/memory_estimate.py) for the real ACE-Step 1.5 2B sizes
(diffusers' default DiT and condition encoder, Qwen3-0.6B's token table) on GPUs, per setting.

    python bench/memory_table.py [--clip-seconds 30]

Prints one Markdown row per setting: the estimated peak per GPU and which of 8 / 12 / 16 / 24 /
80 GB it fits. Estimates, checked against a measured step on CPU by
``train_bench.py dry-run-accuracy`` (bench/README.md), not measured on GPUs (there are none here).
"""

from __future__ import annotations

import argparse

import torch

from common import real_sample, real_trainable  # noqa: E402

from acestep_dist.config import TrainConfig  # noqa: E402

# (title, settings, workers, condition cached, same step as the row before: its activations reused)
SETTINGS = [
    ("LoRA r64, AdamW, condition in the loop", dict(lora_rank=64, lora_alpha=64), 1, False, False),
    ("+ gradient checkpointing", dict(lora_rank=64, lora_alpha=64, gradient_checkpointing=True), 1, False, False),
    ("+ cached condition (prep cache_condition=true)", dict(lora_rank=64, lora_alpha=64, gradient_checkpointing=True),
     1, True, False),
    ("+ int8 base (base_model_precision: int8-torchao)",
     dict(lora_rank=64, lora_alpha=64, gradient_checkpointing=True, base_model_precision="int8-torchao"), 1, True, True),
    ("+ adamw8bit, rank 16",
     dict(lora_rank=16, lora_alpha=16, gradient_checkpointing=True, base_model_precision="int8-torchao",
          optimizer="adamw8bit"), 1, True, True),
    ("full fine-tune of the DiT, ZeRO-2, 8 GPUs, checkpointing, cached",
     dict(model_type="full", gradient_checkpointing=True), 8, True, False),
    ("full fine-tune, ZeRO-3, 8 GPUs, optimizer offloaded, checkpointing, cached",
     dict(model_type="full", gradient_checkpointing=True, zero_stage=3, offload_optimizer=True), 8, True, True),
]


def main() -> None:
    from acestep_dist.train.memory_estimate import GB, GPU_SIZES_GB, estimate_trainable

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clip-seconds", type=float, default=30.0)
    parser.add_argument("--rows", default=None, help="row numbers to estimate, e.g. 3-5 (default: all); a row "
                                                      "reusing the one before starts from it")
    args = parser.parse_args()
    first, _, last = (args.rows or f"1-{len(SETTINGS)}").partition("-")
    wanted = range(int(first), int(last or first) + 1)
    print(f"| ACE-Step 1.5 2B, {args.clip_seconds:g} s clips, bf16 | workers | est. peak per GPU | "
          + " | ".join(f"{size} GB" for size in GPU_SIZES_GB) + " |")
    print("|---|---|---|" + "---|" * len(GPU_SIZES_GB))
    activations = None
    for number, (title, settings, workers, cached, same_step) in enumerate(SETTINGS, start=1):
        if number not in wanted:
            continue
        config = TrainConfig(lr_warmup_steps=0, **settings)
        family, trainable = real_trainable("meta", config, cached)
        batch = family.collate([real_sample(args.clip_seconds, family, cached=cached)] * config.train_batch_size)
        generators = [torch.Generator().manual_seed(i) for i in range(config.train_batch_size)]
        estimate = estimate_trainable(trainable, batch, config.train_batch_size, generators, config, world=workers,
                                      use_gpu=True, setting=title, activations=activations if same_step else None)
        activations = estimate.activations
        fits = estimate.fits()
        print(f"| {title} | {workers} | {estimate.peak / GB:.1f} GB | "
              + " | ".join("yes" if size in fits else "no" for size in GPU_SIZES_GB) + " |", flush=True)


if __name__ == "__main__":
    main()
