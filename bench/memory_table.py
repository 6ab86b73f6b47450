"""The README's memory tables: ``acedist train --dry-run``'s estimate (the model on the meta device,
one fake step; see acestep_dist/train/memory_estimate.py) at a model's real sizes on GPUs, per
setting: ACE-Step 1.5 2B (diffusers' default DiT and condition encoder, Qwen3-0.6B's token table),
1.5 XL (its 4B DiT, the same condition path) or v1 3.5B (its DiT with the lyric Conformer).

    python bench/memory_table.py [--model 2b|xl|v1] [--clip-seconds 30] [--rows 3-5]

Prints one Markdown row per setting: the estimated peak per GPU and which of 8 / 12 / 16 / 24 /
80 GB it fits. Estimates, checked against a measured step on CPU by
``train_bench.py dry-run-accuracy`` (bench/README.md), not measured on GPUs (there are none here).
"""

from __future__ import annotations

import argparse

import torch

from common import XL_TRANSFORMER, real_sample, real_trainable, real_v1_sample, real_v1_trainable  # noqa: E402

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


# v1 has no condition encoder to cache (its text states are prep's; the lyric encoder is in the DiT)
V1_SETTINGS = [
    ("LoRA r64, AdamW", dict(lora_rank=64, lora_alpha=64), 1, False, False),
    ("+ gradient checkpointing", dict(lora_rank=64, lora_alpha=64, gradient_checkpointing=True), 1, False, False),
    ("+ int8 base (base_model_precision: int8-torchao)",
     dict(lora_rank=64, lora_alpha=64, gradient_checkpointing=True, base_model_precision="int8-torchao"), 1, False,
     True),
    ("+ adamw8bit, rank 16",
     dict(lora_rank=16, lora_alpha=16, gradient_checkpointing=True, base_model_precision="int8-torchao",
          optimizer="adamw8bit"), 1, False, True),
    ("full fine-tune of the DiT, ZeRO-2, 8 GPUs, checkpointing",
     dict(model_type="full", gradient_checkpointing=True), 8, False, False),
    ("full fine-tune, ZeRO-3, 8 GPUs, optimizer offloaded, checkpointing",
     dict(model_type="full", gradient_checkpointing=True, zero_stage=3, offload_optimizer=True), 8, False, True),
]
MODELS = {"2b": ("ACE-Step 1.5 2B", SETTINGS), "xl": ("ACE-Step 1.5 XL (4B)", SETTINGS),
          "v1": ("ACE-Step v1 3.5B", V1_SETTINGS)}


def _model_and_batch(model: str, config, cached: bool, clip_seconds: float):
    if model == "v1":
        operations, trainable = real_v1_trainable("meta", config)
        return trainable, operations.collate([real_v1_sample(clip_seconds)] * config.train_batch_size)
    family, trainable = real_trainable("meta", config, cached, XL_TRANSFORMER if model == "xl" else None)
    return trainable, family.collate([real_sample(clip_seconds, family, cached=cached)] * config.train_batch_size)


def main() -> None:
    from acestep_dist.train.memory_estimate import GB, GPU_SIZES_GB, estimate_trainable

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="2b")
    parser.add_argument("--clip-seconds", type=float, default=30.0)
    parser.add_argument("--rows", default=None, help="row numbers to estimate, e.g. 3-5 (default: all); a row "
                                                      "reusing the one before starts from it")
    args = parser.parse_args()
    name, settings_table = MODELS[args.model]
    first, _, last = (args.rows or f"1-{len(settings_table)}").partition("-")
    wanted = range(int(first), int(last or first) + 1)
    print(f"| {name}, {args.clip_seconds:g} s clips, bf16 | workers | est. peak per GPU | "
          + " | ".join(f"{size} GB" for size in GPU_SIZES_GB) + " |")
    print("|---|---|---|" + "---|" * len(GPU_SIZES_GB))
    activations = None
    for number, (title, settings, workers, cached, same_step) in enumerate(settings_table, start=1):
        if number not in wanted:
            continue
        config = TrainConfig(lr_warmup_steps=0, **settings)
        trainable, batch = _model_and_batch(args.model, config, cached, args.clip_seconds)
        generators = [torch.Generator().manual_seed(i) for i in range(config.train_batch_size)]
        estimate = estimate_trainable(trainable, batch, config.train_batch_size, generators, config, world=workers,
                                      use_gpu=True, setting=title, activations=activations if same_step else None)
        activations = estimate.activations
        fits = estimate.fits()
        started = " *" if estimate.start_up >= estimate.steady else ""  # the peak is the start-up's
        print(f"| {title} | {workers} | {estimate.peak / GB:.1f} GB{started} | "
              + " | ".join("yes" if size in fits else "no" for size in GPU_SIZES_GB) + " |", flush=True)


if __name__ == "__main__":
    main()
