"""Find and load ACE-Step v1 checkpoints: upstream's folder layout, a hub id of it, our tiny ones.

Layout (``ACE-Step/ACE-Step-v1-3.5B`` on the hub, and what ``acedist model tiny`` writes)::

    ace_step_transformer/   config.json + diffusion_pytorch_model.safetensors (the DiT)
    music_dcae_f8c8/        diffusers AutoencoderDC (mel -> 8 x 16 latent)
    music_vocoder/          the HiFi-GAN vocoder (mel -> 44.1 kHz audio); its mel front end
    umt5-base/              UMT5 encoder + tokenizer (captions)

Only the parts a stage needs are loaded: prep the DCAE (+ vocoder front end) and UMT5, training
the DiT, validation all of them.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from ...errors import ModelLoadError

TRANSFORMER_DIR = "ace_step_transformer"
DCAE_DIR = "music_dcae_f8c8"
VOCODER_DIR = "music_vocoder"
TEXT_ENCODER_DIR = "umt5-base"
PART_DIRS = {"transformer": TRANSFORMER_DIR, "dcae": DCAE_DIR, "vocoder": VOCODER_DIR, "text_encoder": TEXT_ENCODER_DIR}
ALL_PARTS = ("transformer", "dcae", "text_encoder", "tokenizer")
TRANSFORMER_CLASS = "ACEStepTransformer2DModel"
# hub repositories of v1 checkpoints are named after it (ACE-Step-v1-3.5B, forks and fine-tunes)
_V1_HUB_NAME = re.compile(r"ace[-_]?step[-_]?v1", re.IGNORECASE)


@dataclass
class V1Components:
    source: str  # the checkpoint folder
    transformer: Any = None  # ACEStepTransformer2DModel
    dcae: Any = None  # MusicDCAE (DCAE + vocoder)
    text_encoder: Any = None  # UMT5EncoderModel
    tokenizer: Any = None
    transformer_config: dict = field(default_factory=dict)


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ModelLoadError(f"cannot read {path}: {error}") from error


def is_v1_folder(path: Path) -> bool:
    config = path / TRANSFORMER_DIR / "config.json"
    if not config.is_file():
        return False
    try:
        return json.loads(config.read_text()).get("_class_name") == TRANSFORMER_CLASS
    except (OSError, json.JSONDecodeError):
        return False


def is_v1_hub_id(text: str) -> bool:
    parts = text.split("/")
    return (len(parts) == 2 and all(parts) and not text.startswith((".", "/", "~"))
            and bool(_V1_HUB_NAME.search(parts[1])))


def resolve_checkpoint(path_or_id: str | os.PathLike, *, local_files_only: bool = False) -> Path:
    """The local checkpoint folder of a path or a hub id (downloaded into the hub cache once)."""
    text = str(path_or_id)
    path = Path(text).expanduser()
    if not path.exists() and is_v1_hub_id(text):
        path = _download(text, local_files_only=local_files_only)
    if not path.is_dir():
        raise ModelLoadError(f"model {text!r}: no such folder, and not a hub id of an ACE-Step v1 checkpoint")
    missing = [name for name in PART_DIRS.values() if not (path / name).is_dir()]
    if missing or not is_v1_folder(path):
        raise ModelLoadError(
            f"model {path} is not an ACE-Step v1 checkpoint: it needs {', '.join(f'{d}/' for d in PART_DIRS.values())}"
            + (f" (missing: {', '.join(missing)})" if missing else f" with a {TRANSFORMER_CLASS} config"))
    return path.resolve()


def _download(hub_id: str, *, local_files_only: bool) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    patterns = [f"{name}/*" for name in PART_DIRS.values()]
    try:
        return Path(snapshot_download(hub_id, allow_patterns=patterns, local_files_only=local_files_only))
    except LocalEntryNotFoundError as error:
        raise ModelLoadError(f"model {hub_id}: not in the local Hugging Face cache and the hub is unreachable ({error})") from error
    except HfHubHTTPError as error:
        raise ModelLoadError(f"model {hub_id}: download failed: {error}") from error


def load_components(path_or_id: str | os.PathLike, parts: Iterable[str] = ALL_PARTS, *, dtype=None,
                    device: str = "cpu") -> V1Components:
    """Load ``parts`` (of ``ALL_PARTS``; "dcae" includes the vocoder) frozen, in eval mode."""
    import torch

    parts = tuple(parts)
    unknown = set(parts) - set(ALL_PARTS)
    if unknown:
        raise ValueError(f"unknown component(s) {sorted(unknown)}; known: {ALL_PARTS}")
    folder = resolve_checkpoint(path_or_id)
    dtype = dtype or torch.float32
    components = V1Components(source=str(folder), transformer_config=read_json(folder / TRANSFORMER_DIR / "config.json"))
    # on the meta device every part is built from its config and no weight is read (what
    # ``acedist train --dry-run`` sizes)
    weights = torch.device(device).type != "meta"
    try:
        if "transformer" in parts:
            from .transformer import ACEStepTransformer2DModel

            if weights:
                components.transformer = ACEStepTransformer2DModel.from_pretrained(str(folder / TRANSFORMER_DIR))
            else:
                with torch.device("meta"):
                    components.transformer = ACEStepTransformer2DModel.from_config(
                        ACEStepTransformer2DModel.load_config(str(folder / TRANSFORMER_DIR)))
        if "dcae" in parts:
            from diffusers import AutoencoderDC

            from .dcae import MusicDCAE
            from .vocoder import ADaMoSHiFiGANV1

            if weights:
                components.dcae = MusicDCAE(dcae_checkpoint_path=str(folder / DCAE_DIR),
                                            vocoder_checkpoint_path=str(folder / VOCODER_DIR))
            else:
                with torch.device("meta"):
                    components.dcae = MusicDCAE.from_modules(
                        AutoencoderDC.from_config(AutoencoderDC.load_config(str(folder / DCAE_DIR))),
                        ADaMoSHiFiGANV1.from_config(ADaMoSHiFiGANV1.load_config(str(folder / VOCODER_DIR))))
        if "text_encoder" in parts:
            from transformers import UMT5Config, UMT5EncoderModel

            if weights:
                components.text_encoder = UMT5EncoderModel.from_pretrained(str(folder / TEXT_ENCODER_DIR), dtype=dtype)
            else:
                with torch.device("meta"):
                    components.text_encoder = UMT5EncoderModel(UMT5Config.from_pretrained(str(folder / TEXT_ENCODER_DIR)))
        if "tokenizer" in parts:
            from transformers import AutoTokenizer

            components.tokenizer = AutoTokenizer.from_pretrained(str(folder / TEXT_ENCODER_DIR), trust_remote_code=False)
    except (OSError, ValueError, KeyError) as error:
        raise ModelLoadError(f"model {folder}: cannot load ACE-Step v1 parts: {type(error).__name__}: {error}") from error
    for name in ("transformer", "text_encoder"):
        module = getattr(components, name)
        if module is not None:
            if next(module.parameters()).dtype != dtype:  # diffusers warns on every .to(dtype) call
                module.to(dtype=dtype)
            module.to(device).eval().requires_grad_(False)
    if components.dcae is not None:
        # the mel front end and DCAE run in float32 (the parity of prep's latents depends on it)
        components.dcae.to(device).eval().requires_grad_(False)
    return components


def model_dimensions(folder: Path) -> dict[str, int]:
    transformer = read_json(folder / TRANSFORMER_DIR / "config.json")
    text = read_json(folder / TEXT_ENCODER_DIR / "config.json")
    dcae = read_json(folder / DCAE_DIR / "config.json")
    return {
        "latent_channels": int(dcae.get("latent_channels", 8)),
        "latent_height": int(transformer.get("max_height", 16)),
        "text_dim": int(text.get("d_model", transformer.get("text_embedding_dim", 768))),
        "dit_hidden": int(transformer.get("inner_dim", 0)) or
        int(transformer.get("num_attention_heads", 0)) * int(transformer.get("attention_head_dim", 0)),
        "dit_layers": int(transformer.get("num_layers", 0)),
        "speaker_dim": int(transformer.get("speaker_embedding_dim", 512)),
        "lyric_vocab": int(transformer.get("lyric_encoder_vocab_size", 6693)),
    }


def model_fingerprint(folder: Path) -> str:
    """Identity of what prep encodes with (DCAE, vocoder front end, UMT5): every config file's
    content and every weight file's name and size, hashed. Cheap: no weights are read."""
    sha = hashlib.sha256()
    for name in (DCAE_DIR, VOCODER_DIR, TEXT_ENCODER_DIR):
        root = folder / name
        for path in sorted(p for p in root.rglob("*") if p.is_file()):
            sha.update(f"{path.relative_to(folder)}:{path.stat().st_size}\n".encode())
            if path.suffix in (".json", ".txt", ".model"):
                sha.update(path.read_bytes())
    return sha.hexdigest()[:16]
