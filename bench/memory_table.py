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

from common import ACE15, FRAMES_PER_SECOND, REAL_LATENT_DIM, REAL_TEXT_DIM  # noqa: E402

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


class _TokenTable(torch.nn.Module):
    """What training keeps of the text encoder: its token table (Qwen3-0.6B's 151669 x 1024)."""

    def __init__(self):
        super().__init__()
        self.embed_tokens = torch.nn.Embedding(151669, REAL_TEXT_DIM)

    def get_input_embeddings(self):
        return self.embed_tokens


def _trainable(config: TrainConfig, cached: bool):
    from diffusers.models.transformers.ace_step_transformer import AceStepTransformer1DModel
    from diffusers.pipelines.ace_step import AceStepConditionEncoder

    from acestep_dist.families.ace_step_15 import AceStep15
    from acestep_dist.families.ace_step_15.loading import AceStep15Components
    from acestep_dist.families.ace_step_15.training import AceStep15Trainable
    from acestep_dist.families.ace_step_15.variants import variant_spec

    with torch.device("meta"):
        transformer = AceStepTransformer1DModel()
        parts = {} if cached else dict(condition_encoder=AceStepConditionEncoder(), text_encoder=_TokenTable())
    hidden = transformer.config.hidden_size
    # the condition constants are data the loss reads: real (and small) beside the meta parts
    components = AceStep15Components(variant_spec("turbo"), "", "bench", transformer=transformer,
                                     transformer_config=dict(transformer.config),
                                     null_condition=torch.zeros(1, 1, hidden),
                                     silence_latent=torch.zeros(1, 750, REAL_LATENT_DIM), **parts)
    family = AceStep15(components)
    return family, AceStep15Trainable(family, config, ACE15.train_options(), cached_condition=cached)


def _sample(clip_seconds: float, hidden: int, cached: bool) -> dict:
    frames = int(clip_seconds * FRAMES_PER_SECOND)
    sample = {"latent_mean": torch.zeros(frames, REAL_LATENT_DIM), "latent_std": torch.ones(frames, REAL_LATENT_DIM),
              "text_states": torch.zeros(100, REAL_TEXT_DIM, dtype=torch.bfloat16),
              "lyric_ids": torch.ones(300, dtype=torch.int32)}
    if cached:
        sample["condition_states"] = torch.zeros(401, hidden, dtype=torch.bfloat16)
    return sample


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
        family, trainable = _trainable(config, cached)
        batch = family.collate([_sample(args.clip_seconds, family.components.transformer_config["hidden_size"],
                                        cached)] * config.train_batch_size)
        generators = [torch.Generator().manual_seed(i) for i in range(config.train_batch_size)]
        estimate = estimate_trainable(trainable, batch, config.train_batch_size, generators, config, world=workers,
                                      use_gpu=True, setting=title, activations=activations if same_step else None)
        activations = estimate.activations
        fits = estimate.fits()
        print(f"| {title} | {workers} | {estimate.peak / GB:.1f} GB | "
              + " | ".join("yes" if size in fits else "no" for size in GPU_SIZES_GB) + " |", flush=True)


if __name__ == "__main__":
    main()
