"""Tiny random-weight ACE-Step v1 checkpoints of the real architecture, in upstream's layout.

Every part is the real class (our ``ACEStepTransformer2DModel`` with upstream's key names,
diffusers' ``AutoencoderDC``, the HiFi-GAN vocoder, transformers' ``UMT5EncoderModel``) with small
widths. The audio geometry is the real one (48 kHz in, 44.1 kHz mels of 128 bins, latent 8 x 16 at
~10.77 frames/s), and the lyric vocabulary keeps upstream's 6693 ids, so real lyric token ids and
every audio path are exercised as with the 3.5B model. The UMT5 tokenizer is a small Unigram model
trained here, so nothing is downloaded.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from .loading import DCAE_DIR, TEXT_ENCODER_DIR, TRANSFORMER_DIR, VOCODER_DIR

TEXT_DIM = 32
LYRIC_VOCAB = 6693  # upstream's vocab.json size: the ids prep stores index this table

# Text the tiny tokenizer learns its pieces from: the kind of words v1 captions (tag lists) use.
_TOKENIZER_TEXT = """
pop, rock, hip hop, electronic, jazz, blues, ambient, synth, guitar, drums, bass, vocals, choir
male vocals, female vocals, upbeat, melancholic, calm, warm, energetic, dark, bright, dreamy
baroque chorale, church organ, four-part harmony, hymn, devotional, moderate tempo, G major
string quartet, brass quintet, trumpet, trombone, tuba, festive, majestic, fast tempo, slow tempo
piano, solo piano, ragtime, classical, sonata, allegro, presto, irish folk, fiddle, flute, jig, reel
funk, soul, disco, house, techno, trap, lo-fi, acoustic, orchestral, cinematic, rap, chinese rap
120 bpm, 90 bpm, A minor, E minor, D major, F# minor, Bb major, 3/4, 6/8, music
"""


def transformer_config() -> dict[str, Any]:
    """Upstream's constructor keywords at tiny widths (the Conformer's own size recorded too)."""
    return {
        "in_channels": 8, "num_layers": 2, "inner_dim": 64, "attention_head_dim": 16, "num_attention_heads": 4,
        "mlp_ratio": 2.5, "out_channels": 8, "max_position": 32768, "rope_theta": 1000000.0,
        "speaker_embedding_dim": 512, "text_embedding_dim": TEXT_DIM,
        # the released projector inputs (MERT 1024, mHuBERT 768), so real SSL features fit
        "ssl_encoder_depths": [1, 1], "ssl_names": ["mert", "m-hubert"], "ssl_latent_dims": [1024, 768],
        "lyric_encoder_vocab_size": LYRIC_VOCAB, "lyric_hidden_size": 32, "patch_size": [16, 1],
        "max_height": 16, "max_width": 32768,
        "lyric_encoder_config": {"output_size": 32, "attention_heads": 2, "linear_units": 64, "num_blocks": 1},
    }


def dcae_config() -> dict[str, Any]:
    """diffusers ``AutoencoderDC`` with the music geometry (2 mel channels in, 8 latent channels,
    height 128 -> 16) and small widths."""
    return {
        "in_channels": 2, "latent_channels": 8, "attention_head_dim": 8,
        "encoder_block_types": ["ResBlock", "ResBlock", "ResBlock", "EfficientViTBlock"],
        "decoder_block_types": ["ResBlock", "ResBlock", "ResBlock", "EfficientViTBlock"],
        "encoder_block_out_channels": [8, 16, 32, 64], "decoder_block_out_channels": [8, 16, 32, 64],
        "encoder_layers_per_block": [1, 1, 1, 2], "decoder_layers_per_block": [1, 1, 1, 2],
        "encoder_qkv_multiscales": [[], [], [5], [5]], "decoder_qkv_multiscales": [[], [], [5], [5]],
        "upsample_block_type": "interpolate", "downsample_block_type": "Conv",
        "decoder_norm_types": "rms_norm", "decoder_act_fns": "silu", "scaling_factor": 0.41407,
    }


def vocoder_config() -> dict[str, Any]:
    """The vocoder with upstream's mel front end (44.1 kHz, 128 mels, hop 512) and a small head."""
    return {
        "input_channels": 128, "depths": [1, 1], "dims": [16, 32], "kernel_sizes": [7], "num_mels": 32,
        "upsample_rates": [8, 8, 2, 2, 2], "upsample_kernel_sizes": [16, 16, 8, 2, 2],
        "resblock_kernel_sizes": [3, 5], "resblock_dilation_sizes": [[1, 3, 5], [1, 3, 5]],
        "upsample_initial_channel": 32, "pre_conv_kernel_size": 13, "post_conv_kernel_size": 13,
        "sampling_rate": 44100, "n_fft": 2048, "win_length": 2048, "hop_length": 512, "f_min": 40,
        "f_max": 16000, "n_mels": 128,
    }


def build_tokenizer(vocab_size: int = 400):
    """A T5-style Unigram tokenizer (``<pad>`` 0, ``</s>`` 1 appended, ``<unk>`` 2), as UMT5's."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import T5Tokenizer

    backend = Tokenizer(models.Unigram())
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    trainer = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "</s>", "<unk>"],
                                      unk_token="<unk>", show_progress=False)
    lines = [line for line in _TOKENIZER_TEXT.splitlines() if line.strip()]
    backend.train_from_iterator(lines * 4, trainer=trainer)
    vocab = [tuple(piece) for piece in json.loads(backend.to_str())["model"]["vocab"]]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=512)


def write_tiny_checkpoint(out_dir: str | Path, seed: int = 0, dcae: str | Path | None = None,
                          vocoder: str | Path | None = None) -> Path:
    """Write a tiny v1 checkpoint to ``out_dir``. ``dcae`` / ``vocoder``: copy those component
    folders (e.g. from another checkpoint) instead of making random ones."""
    import torch
    from diffusers import AutoencoderDC
    from transformers import UMT5Config, UMT5EncoderModel

    from .transformer import ACEStepTransformer2DModel
    from .vocoder import ADaMoSHiFiGANV1

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    ACEStepTransformer2DModel(**transformer_config()).save_pretrained(str(out / TRANSFORMER_DIR), safe_serialization=True)
    for name, given, build in ((DCAE_DIR, dcae, lambda: AutoencoderDC(**dcae_config())),
                               (VOCODER_DIR, vocoder, lambda: ADaMoSHiFiGANV1(**vocoder_config()))):
        target = out / name
        if given is not None:
            if target.exists():
                shutil.rmtree(target)
            shutil.copytree(Path(given), target)
        else:
            build().save_pretrained(str(target), safe_serialization=True)
    tokenizer = build_tokenizer()
    text_config = UMT5Config(vocab_size=len(tokenizer), d_model=TEXT_DIM, d_kv=8, d_ff=64, num_layers=2,
                             num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=32,
                             feed_forward_proj="gated-gelu", pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=tokenizer.pad_token_id)
    UMT5EncoderModel(text_config).save_pretrained(str(out / TEXT_ENCODER_DIR), safe_serialization=True)
    tokenizer.save_pretrained(str(out / TEXT_ENCODER_DIR))
    return out
