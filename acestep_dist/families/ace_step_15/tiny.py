"""Tiny random-weight ACE-Step 1.5 checkpoints of the real architecture, for tests and the demo.

Every component is the real class (diffusers ``AceStepTransformer1DModel``, ``AceStepConditionEncoder``,
``AutoencoderOobleck``; transformers ``Qwen3Model`` and Qwen2 byte-level BPE tokenizer) with small
widths. The VAE keeps the real 48 kHz rate and 1920x hop, so latents run at 25 frames per second and
every audio path (decode, resample, windows, latent lengths) is exercised as with the real model.
The tokenizer is trained here on a small built-in text so nothing is downloaded.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .variants import VARIANT_NAMES, variant_spec

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# Text the tiny tokenizer learns its merges from: the prompt templates and the kind of words
# captions and lyrics use, so tokens per string are in a realistic range.
_TOKENIZER_TEXT = """
# Instruction
Fill the audio semantic mask based on the given conditions:
# Caption
# Metas
- bpm: 120
- timesignature: 4
- keyscale: C major
- duration: 30 seconds
# Languages
en de fr es it ja zh ko unknown
# Lyric
[Instrumental] [verse] [chorus] [bridge] [intro] [outro] [pre-chorus]
baroque chorale, church organ, four-part harmony, hymn, devotional, moderate tempo, G major, 3/4
string quartet, brass quintet, trumpet, trombone, tuba, festive, majestic, fast tempo, slow tempo
piano, solo piano, ragtime, classical, sonata, allegro, presto, irish folk, fiddle, flute, jig, reel
pop, rock, hip hop, electronic, jazz, blues, ambient, synth, guitar, drums, bass, vocals, choir aahs
male vocals, female vocals, upbeat, melancholic, calm, warm, energetic, dark, bright, dreamy
A minor, E minor, D major, F# minor, Bb major, Eb major, B minor, C# minor, 6/8, 2/4
Nimm von uns, Herr, du treuer Gott, die schwere Straf und grosse Not
Soft notes in the morning light, music fills the air tonight
We sing together under the stars, hold on, never let go, dancing in the rain
"""


def build_tokenizer(vocab_size: int = 1024):
    """A Qwen2-style byte-level BPE tokenizer with the special tokens the prompt templates use."""
    from tokenizers import pre_tokenizers, processors, trainers
    from transformers import Qwen2Tokenizer

    byte_alphabet = pre_tokenizers.ByteLevel.alphabet()
    base = Qwen2Tokenizer(vocab={ch: i for i, ch in enumerate(sorted(byte_alphabet))}, merges=[])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=byte_alphabet, show_progress=False)
    lines = [line for line in _TOKENIZER_TEXT.splitlines() if line.strip()]
    # Train through the Qwen2 backend so merges are learnt over Qwen's own pre-tokenisation.
    base._tokenizer.train_from_iterator(lines * 4, trainer=trainer)
    tokenizer = Qwen2Tokenizer(
        vocab=json.loads(base._tokenizer.to_str())["model"]["vocab"],
        merges=_merges_of(base._tokenizer),
        unk_token=None,
        eos_token=None,
        pad_token=None,
        padding_side="right",
        model_max_length=32768,
    )
    # As Qwen3-Embedding-0.6B: special tokens after the BPE vocabulary, <|endoftext|> first;
    # pad <|endoftext|> (on the right), eos <|im_end|>, no BOS, and a post-processor that
    # appends <|endoftext|> to every sequence.
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS})
    tokenizer.pad_token = "<|endoftext|>"
    tokenizer.eos_token = "<|im_end|>"
    end_of_text_id = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    tokenizer._tokenizer.post_processor = processors.TemplateProcessing(
        single="$A <|endoftext|>",
        pair="$A <|endoftext|> $B:1 <|endoftext|>:1",
        special_tokens=[("<|endoftext|>", end_of_text_id)],
    )
    return tokenizer


def _merges_of(backend) -> list[tuple[str, str]]:
    model = json.loads(backend.to_str())["model"]
    return [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]


def tiny_component_configs(variant: str = "turbo", latent_dim: int = 8) -> dict[str, dict]:
    """Small widths, real structure. ``latent_dim`` is 64 in the real model."""
    spec = variant_spec(variant)
    text_dim = 64
    condition_width = 64
    dit_width = 96 if spec.is_xl else condition_width
    heads = dict(num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    return {
        "transformer": dict(
            hidden_size=dit_width,
            intermediate_size=2 * dit_width,
            num_hidden_layers=3 if spec.is_xl else 2,
            in_channels=3 * latent_dim,  # context (silence latent + chunk mask) + noisy latent
            audio_acoustic_hidden_dim=latent_dim,
            patch_size=2,
            rope_theta=1000000.0,
            sliding_window=16,
            encoder_hidden_size=condition_width,
            is_turbo=spec.is_turbo,
            model_version=variant,  # the full variant name; diffusers reads is_turbo
            **heads,
        ),
        "condition_encoder": dict(
            hidden_size=condition_width,
            intermediate_size=2 * condition_width,
            text_hidden_dim=text_dim,
            timbre_hidden_dim=latent_dim,
            num_lyric_encoder_hidden_layers=2,
            num_timbre_encoder_hidden_layers=2,
            rope_theta=1000000.0,
            sliding_window=16,
            **heads,
        ),
        "text_encoder": dict(
            hidden_size=text_dim,
            intermediate_size=2 * text_dim,
            num_hidden_layers=2,
            max_position_embeddings=4096,
            rope_theta=1000000.0,
            tie_word_embeddings=True,
            **heads,
        ),
        # the 5 Hz audio codec (cover conditioning): FSQ levels 8x8x8x5x5x5 as upstream
        "audio_tokenizer": dict(
            hidden_size=condition_width, intermediate_size=2 * condition_width, audio_acoustic_hidden_dim=latent_dim,
            pool_window_size=5, fsq_dim=condition_width, num_attention_pooler_hidden_layers=1, sliding_window=16,
            **heads,
        ),
        "audio_token_detokenizer": dict(
            hidden_size=condition_width, intermediate_size=2 * condition_width, audio_acoustic_hidden_dim=latent_dim,
            pool_window_size=5, num_attention_pooler_hidden_layers=1, sliding_window=16, **heads,
        ),
        "vae": dict(
            encoder_hidden_size=2 * latent_dim,  # the encoder emits mean and scale
            downsampling_ratios=[2, 4, 4, 6, 10],  # 1920x, as the real ACE-Step VAE
            channel_multiples=[1, 2, 4, 8, 16],
            decoder_channels=8,
            decoder_input_channels=latent_dim,
            audio_channels=2,
            sampling_rate=48000,
        ),
    }


def build_tiny_pipeline(variant: str = "turbo", latent_dim: int = 8, seed: int = 0):
    """An ``AceStepPipeline`` of random-weight components for ``variant``."""
    from diffusers import AceStepPipeline, AutoencoderOobleck, FlowMatchEulerDiscreteScheduler
    from diffusers.models.transformers.ace_step_transformer import AceStepTransformer1DModel
    from diffusers.pipelines.ace_step import AceStepConditionEncoder
    from diffusers.pipelines.ace_step.modeling_ace_step import AceStepAudioTokenDetokenizer, AceStepAudioTokenizer
    from transformers import Qwen3Config, Qwen3Model

    if variant not in VARIANT_NAMES:
        raise ValueError(f"unknown variant {variant!r}; known: {', '.join(VARIANT_NAMES)}")
    configs = tiny_component_configs(variant, latent_dim)
    tokenizer = build_tokenizer()
    torch.manual_seed(seed)
    transformer = AceStepTransformer1DModel(**configs["transformer"])
    condition_encoder = AceStepConditionEncoder(**configs["condition_encoder"])
    text_encoder = Qwen3Model(
        Qwen3Config(
            vocab_size=len(tokenizer),
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            **configs["text_encoder"],
        )
    )
    vae = AutoencoderOobleck(**configs["vae"])
    with torch.no_grad():
        # The real silence_latent is the VAE's encoding of digital silence; make the tiny one the same way.
        silence = torch.zeros(1, 2, 10 * configs["vae"]["sampling_rate"])
        frames = vae.encode(silence).latent_dist.mean.transpose(1, 2)  # [1, 250, C]
        total = condition_encoder.silence_latent.shape[1]
        reps = -(-total // frames.shape[1])
        condition_encoder.silence_latent.copy_(frames.repeat(1, reps, 1)[:, :total])
    # built last, from their own seed, so the other components' weights do not depend on them
    torch.manual_seed(seed + 1)
    audio_tokenizer = AceStepAudioTokenizer(**configs["audio_tokenizer"])
    audio_token_detokenizer = AceStepAudioTokenDetokenizer(**configs["audio_token_detokenizer"])
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1, shift=1.0)
    return AceStepPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
        condition_encoder=condition_encoder,
        scheduler=scheduler,
        audio_tokenizer=audio_tokenizer,
        audio_token_detokenizer=audio_token_detokenizer,
    )


def write_tiny_checkpoint(out_dir: str | Path, variant: str = "turbo", latent_dim: int = 8, seed: int = 0) -> Path:
    """Write a diffusers-layout folder (``model_index.json`` + subfolders) that
    ``diffusers.AceStepPipeline.from_pretrained`` loads."""
    from .loading import follow_hub_progress_switch

    follow_hub_progress_switch()
    out = Path(out_dir)
    pipeline = build_tiny_pipeline(variant, latent_dim, seed)
    pipeline.save_pretrained(out, safe_serialization=True)
    return out
