"""Load ACE-Step 1.5 components from a diffusers folder, the upstream layout, or a hub id.

Layouts:
- diffusers: ``model_index.json`` + ``transformer/ condition_encoder/ vae/ text_encoder/ tokenizer/``.
- upstream: a variant folder (``model.safetensors`` or a sharded index, ``config.json``,
  ``silence_latent.pt``) beside ``vae/`` and ``Qwen3-Embedding-0.6B/``; its keys are converted
  to diffusers' names at load time. The parent ``checkpoints/`` folder is accepted when it holds
  exactly one variant folder.
- hub id ``org/name`` (or ``org/name/subfolder`` for one variant of an upstream repo): downloaded
  with huggingface_hub into its cache, then loaded as above.

Only the parts asked for are loaded: prep needs the VAE and text encoder, training the DiT and the
condition encoder.
"""

from __future__ import annotations

import json
import os
import pickle
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch

from ...errors import ModelLoadError
from .keymap import NULL_CONDITION_KEY, SILENCE_LATENT_KEY, upstream_configs, upstream_to_diffusers
from .variants import VariantSpec, detect_variant

ALL_PARTS = ("transformer", "condition_encoder", "vae", "text_encoder", "tokenizer", "audio_tokenizer",
             "audio_token_detokenizer")
# the two tensors of the condition encoder a run on cached conditions still
# needs (the null condition for CFG dropout, the silence latent of the context), read from its
# weight file without building the encoder (the encoder itself holds them too)
CONDITION_CONSTANTS = "condition_constants"
# the 5 Hz audio codec: only cover generation needs it, and a checkpoint may lack it
AUDIO_CODEC_PARTS = ("audio_tokenizer", "audio_token_detokenizer")
UPSTREAM_TEXT_ENCODER_DIR = "Qwen3-Embedding-0.6B"
UPSTREAM_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")


@dataclass
class AceStep15Components:
    variant: VariantSpec
    source: str  # the folder the components were read from
    layout: str  # "diffusers" or "upstream"
    transformer: Any = None
    condition_encoder: Any = None
    vae: Any = None
    text_encoder: Any = None
    tokenizer: Any = None
    audio_tokenizer: Any = None
    audio_token_detokenizer: Any = None
    transformer_config: dict = field(default_factory=dict)
    null_condition: torch.Tensor | None = None  # [1, 1, H]; "condition_constants", or the encoder's own
    silence_latent: torch.Tensor | None = None  # [1, T, C]


def _is_diffusers_root(path: Path) -> bool:
    return (path / "model_index.json").is_file()


def _is_upstream_variant(path: Path) -> bool:
    """A DiT variant folder, not the text encoder or the 5 Hz LM that sit beside it."""
    config = path / "config.json"
    if not config.is_file() or not any((path / name).is_file() for name in UPSTREAM_WEIGHTS):
        return False
    try:
        return "audio_acoustic_hidden_dim" in json.loads(config.read_text())
    except (OSError, json.JSONDecodeError):
        return False


def looks_like_hub_id(text: str) -> bool:
    parts = text.split("/")
    return 2 <= len(parts) <= 3 and not text.startswith((".", "/", "~")) and all(parts)


def claims_folder(path: Path) -> bool:
    """An ACE-Step 1.5 checkpoint folder in any layout we load (or the parent of upstream variants)."""
    if not path.is_dir():
        return False
    if _is_diffusers_root(path):
        try:
            return str(json.loads((path / "model_index.json").read_text()).get("_class_name", "")).startswith("AceStep")
        except (OSError, ValueError, AttributeError):
            return False
    return _is_upstream_variant(path) or any(p.is_dir() and _is_upstream_variant(p) for p in path.iterdir())


def resolve_checkpoint(path_or_id: str | os.PathLike, *, local_files_only: bool = False) -> tuple[Path, str]:
    """Return (folder, layout) for a local folder or a hub id, downloading the latter if needed."""
    text = str(path_or_id)
    path = Path(text).expanduser()
    if path.exists():
        return _local_layout(path)
    if looks_like_hub_id(text):
        return _local_layout(_download(text, local_files_only=local_files_only))
    raise ModelLoadError(f"model {text!r}: no such folder, and not a hub id of the form org/name")


def _local_layout(path: Path) -> tuple[Path, str]:
    if not path.is_dir():
        raise ModelLoadError(f"model {path}: expected a folder, got a file")
    if _is_diffusers_root(path):
        return path, "diffusers"
    if _is_upstream_variant(path):
        return path, "upstream"
    variants = sorted(p for p in path.iterdir() if p.is_dir() and _is_upstream_variant(p))
    if len(variants) == 1 and (path / "vae").is_dir():
        return variants[0], "upstream"
    if variants:
        names = ", ".join(p.name for p in variants)
        raise ModelLoadError(f"model {path} holds several ACE-Step variants ({names}); pass one of them, e.g. {variants[0]}")
    raise ModelLoadError(
        f"model {path} is neither a diffusers ACE-Step folder (model_index.json) nor an upstream "
        f"variant folder (config.json + model.safetensors beside vae/ and {UPSTREAM_TEXT_ENCODER_DIR}/)"
    )


def _download(hub_id: str, *, local_files_only: bool) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    parts = hub_id.split("/")
    repo_id, subfolder = "/".join(parts[:2]), (parts[2] if len(parts) == 3 else None)
    patterns = None
    if subfolder:
        # one upstream variant: its folder plus the shared VAE and text encoder, not every variant and LM
        patterns = [f"{subfolder}/*", "vae/*", f"{UPSTREAM_TEXT_ENCODER_DIR}/*"]
    try:
        root = Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=local_files_only))
    except LocalEntryNotFoundError as error:
        raise ModelLoadError(f"model {hub_id}: not in the local Hugging Face cache and the hub is unreachable ({error})") from error
    except HfHubHTTPError as error:
        raise ModelLoadError(f"model {hub_id}: download failed: {error}") from error
    return root / subfolder if subfolder else root


def load_components(
    path_or_id: str | os.PathLike,
    parts: Iterable[str] = ALL_PARTS,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    local_files_only: bool = False,
) -> AceStep15Components:
    follow_hub_progress_switch()
    parts = tuple(parts)
    unknown = set(parts) - {*ALL_PARTS, CONDITION_CONSTANTS}
    if unknown:
        raise ValueError(f"unknown component(s) {sorted(unknown)}; known: {(*ALL_PARTS, CONDITION_CONSTANTS)}")
    folder, layout = resolve_checkpoint(path_or_id, local_files_only=local_files_only)
    # on the meta device the parts are built from their configs and no weight is read (what
    # ``acedist train --dry-run`` sizes)
    weights = torch.device(device).type != "meta"
    if layout == "diffusers":
        components = _load_diffusers(folder, parts, dtype, weights)
    else:
        components = _load_upstream(folder, parts, dtype, weights)
    for name in ("transformer", "condition_encoder", "vae", "text_encoder") + AUDIO_CODEC_PARTS:
        module = getattr(components, name)
        if module is not None:
            module.to(device).eval().requires_grad_(False)
    if CONDITION_CONSTANTS in parts:
        constants = read_condition_tensors(folder, layout, (NULL_CONDITION_KEY, SILENCE_LATENT_KEY))
        # small, and read as data by the loss: real even beside meta parts
        where = device if weights else "cpu"
        components.null_condition = constants[NULL_CONDITION_KEY].to(where, dtype)
        components.silence_latent = constants[SILENCE_LATENT_KEY].to(where, dtype)
    return components


def _condition_weight_files(folder: Path, layout: str) -> tuple[list[Path], str]:
    """The safetensors files holding the condition encoder's weights, and the prefix its keys carry."""
    if layout == "diffusers":
        root = folder / "condition_encoder"
        files = sorted(root.glob("*.safetensors"))
        if not files:
            raise ModelLoadError(f"{root}: no condition encoder weights (*.safetensors)")
        return files, ""
    return _upstream_weight_files(folder), "encoder."


def _condition_keys(keys, prefix: str) -> list[str]:
    """The keys of a weight file that belong to the condition encoder (upstream: ``encoder.*`` and
    the top-level null condition; diffusers: every key of its own file)."""
    return sorted(k for k in keys if not prefix or k.startswith(prefix) or k == NULL_CONDITION_KEY)


def read_condition_tensors(folder: Path, layout: str, names) -> dict[str, torch.Tensor]:
    """Single tensors of the condition encoder by their diffusers names, without building it."""
    from safetensors import safe_open

    found: dict[str, torch.Tensor] = {}
    files, _ = _condition_weight_files(folder, layout)
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            for name in names:
                if name in f.keys() and name not in found:
                    found[name] = f.get_tensor(name)
    if layout == "upstream" and SILENCE_LATENT_KEY in names:
        silence = _load_silence_latent(folder)
        if silence is None:  # what the encoder holds then: diffusers' zero placeholder [1, 15000, C]
            _, condition_config = upstream_configs(_read_json(folder / "config.json"))
            silence = torch.zeros(1, 15000, int(condition_config["timbre_hidden_dim"]))
        found[SILENCE_LATENT_KEY] = silence
    missing = [name for name in names if name not in found]
    if missing:
        raise ModelLoadError(f"{folder}: the condition encoder's weights lack {', '.join(missing)}")
    return found


def condition_fingerprint(folder: Path, layout: str) -> str:
    """Identity of the condition encoder's weights: a hash of its config and of every one of its
    tensors' bytes (names, dtypes, shapes and data), read from the weight files without building it.

    Its content, not file names and sizes: ACE-Step's variants share every shape, and a cached
    condition is only right for the encoder that computed it. About 1.3 GB is read for the 2B
    models' encoder (seconds from the page cache)."""
    import hashlib
    import struct

    sha = hashlib.sha256()
    config = folder / ("condition_encoder/config.json" if layout == "diffusers" else "config.json")
    sha.update(config.read_bytes())
    files, prefix = _condition_weight_files(folder, layout)
    for path in files:
        with open(path, "rb") as f:
            (header_size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(header_size))
            start = 8 + header_size
            for key in _condition_keys((k for k in header if k != "__metadata__"), prefix):
                entry = header[key]
                begin, end = entry["data_offsets"]
                sha.update(f"{key}:{entry['dtype']}:{entry['shape']}\n".encode())
                f.seek(start + begin)
                remaining = end - begin
                while remaining:
                    chunk = f.read(min(remaining, 1 << 24))
                    if not chunk:
                        raise ModelLoadError(f"{path}: truncated (tensor {key} ends past the file)")
                    sha.update(chunk)
                    remaining -= len(chunk)
    if layout == "upstream" and (folder / "silence_latent.pt").is_file():
        sha.update((folder / "silence_latent.pt").read_bytes())
    return sha.hexdigest()[:16]


def follow_hub_progress_switch() -> None:
    """diffusers' progress bars ignore HF_HUB_DISABLE_PROGRESS_BARS (transformers' follow it): when
    the hub's bars are off (``acedist`` without ``-v``), diffusers' are turned off too."""
    from huggingface_hub.utils import are_progress_bars_disabled

    if are_progress_bars_disabled():
        import diffusers.utils.logging

        diffusers.utils.logging.disable_progress_bar()


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ModelLoadError(f"cannot read {path}: {error}") from error


def _load_text_parts(folder: Path, parts, dtype, components: AceStep15Components, *, tokenizer_folder: Path,
                     weights: bool = True) -> None:
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    if "text_encoder" in parts:
        # Qwen3Model through AutoModel: the architecture comes from config.json, never from remote code.
        if weights:
            components.text_encoder = AutoModel.from_pretrained(folder, dtype=dtype, trust_remote_code=False)
        else:
            with _on_meta(dtype):
                components.text_encoder = AutoModel.from_config(AutoConfig.from_pretrained(folder, trust_remote_code=False),
                                                                trust_remote_code=False)
    if "tokenizer" in parts:
        components.tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder, trust_remote_code=False)


@contextmanager
def _on_meta(dtype):
    """Modules built in here hold meta tensors of ``dtype`` (no memory, no weights read)."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            yield
    finally:
        torch.set_default_dtype(default)


def _pretrained(cls, root: Path, subfolder: str, dtype, weights: bool):
    """A diffusers model from its folder, or (``weights`` False) built from its config on the meta device."""
    if weights:
        return cls.from_pretrained(root, subfolder=subfolder, torch_dtype=dtype)
    with _on_meta(dtype):
        return cls.from_config(cls.load_config(root, subfolder=subfolder))


def _load_diffusers(root: Path, parts, dtype, weights: bool = True) -> AceStep15Components:
    from diffusers import AutoencoderOobleck
    from diffusers.models.transformers.ace_step_transformer import AceStepTransformer1DModel
    from diffusers.pipelines.ace_step import AceStepConditionEncoder

    transformer_config = _read_json(root / "transformer" / "config.json")
    components = AceStep15Components(
        variant=detect_variant(transformer_config),
        source=str(root),
        layout="diffusers",
        transformer_config=transformer_config,
    )
    if "transformer" in parts:
        components.transformer = _pretrained(AceStepTransformer1DModel, root, "transformer", dtype, weights)
    if "condition_encoder" in parts:
        components.condition_encoder = _pretrained(AceStepConditionEncoder, root, "condition_encoder", dtype, weights)
    if "vae" in parts:
        components.vae = _pretrained(AutoencoderOobleck, root, "vae", dtype, weights)
    _load_text_parts(root / "text_encoder", parts, dtype, components, tokenizer_folder=root / "tokenizer",
                     weights=weights)
    from diffusers.pipelines.ace_step.modeling_ace_step import AceStepAudioTokenDetokenizer, AceStepAudioTokenizer

    for name, cls in zip(AUDIO_CODEC_PARTS, (AceStepAudioTokenizer, AceStepAudioTokenDetokenizer)):
        if name in parts and (root / name / "config.json").is_file():
            setattr(components, name, _pretrained(cls, root, name, dtype, weights))
    return components


def _upstream_weight_files(variant_dir: Path) -> list[Path]:
    """``model.safetensors``, or the shards its index lists."""
    single = variant_dir / "model.safetensors"
    if single.is_file():
        return [single]
    index = _read_json(variant_dir / "model.safetensors.index.json")
    # names only: the index cannot point outside the folder
    return [variant_dir / Path(shard).name for shard in sorted(set(index["weight_map"].values()))]


def _load_upstream_state_dict(variant_dir: Path, prefixes: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """The tensors of the upstream weight file(s) whose keys start with one of ``prefixes`` (the
    parts asked for only: the DiT and the condition encoder share one file)."""
    from safetensors import safe_open

    state: dict[str, torch.Tensor] = {}
    for path in _upstream_weight_files(variant_dir):
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                if key.startswith(prefixes):
                    state[key] = f.get_tensor(key)
    return state


def _load_silence_latent(variant_dir: Path) -> torch.Tensor | None:
    path = variant_dir / "silence_latent.pt"
    if not path.is_file():
        return None
    # weights_only: a plain tensor, never arbitrary pickled objects
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise ModelLoadError(f"{path}: holds pickled objects other than tensors; not loaded (only a plain tensor "
                             f"is read, with torch.load(weights_only=True))") from None
    if not isinstance(raw, torch.Tensor) or raw.dim() != 3:
        raise ModelLoadError(f"{path}: expected a [1, C, T] tensor, got {type(raw).__name__}")
    return raw.transpose(1, 2).contiguous()  # upstream stores [1, C, T]; the encoder keeps [1, T, C]


def _load_upstream(variant_dir: Path, parts, dtype, weights: bool = True) -> AceStep15Components:
    from diffusers import AutoencoderOobleck
    from diffusers.models.transformers.ace_step_transformer import AceStepTransformer1DModel
    from diffusers.pipelines.ace_step import AceStepConditionEncoder

    root = variant_dir.parent
    raw_config = _read_json(variant_dir / "config.json")
    try:
        dit_config, condition_config = upstream_configs(raw_config)
    except KeyError as error:
        raise ModelLoadError(f"{variant_dir / 'config.json'}: missing field {error}") from error
    components = AceStep15Components(
        variant=detect_variant(dit_config, raw_config),
        source=str(variant_dir),
        layout="upstream",
        transformer_config=dit_config,
    )
    if not weights:  # built from the configs on the meta device
        with _on_meta(dtype):
            if "transformer" in parts:
                components.transformer = _from_config(AceStepTransformer1DModel, dit_config)
            if "condition_encoder" in parts:
                components.condition_encoder = _from_config(AceStepConditionEncoder, condition_config)
    elif "transformer" in parts or "condition_encoder" in parts:
        prefixes = (("decoder.",) if "transformer" in parts else ()) + (
            ("encoder.", NULL_CONDITION_KEY) if "condition_encoder" in parts else ())
        transformer_sd, condition_sd, _ignored = upstream_to_diffusers(_load_upstream_state_dict(variant_dir, prefixes))
        if "transformer" in parts:
            components.transformer = _instantiate(AceStepTransformer1DModel, dit_config, transformer_sd, dtype, variant_dir)
        if "condition_encoder" in parts:
            silence = _load_silence_latent(variant_dir)
            if silence is not None:
                condition_sd[SILENCE_LATENT_KEY] = silence
            components.condition_encoder = _instantiate(
                AceStepConditionEncoder, condition_config, condition_sd, dtype, variant_dir,
                optional={SILENCE_LATENT_KEY} if silence is None else set(),
            )
    if "vae" in parts:
        vae_dir = root / "vae"
        if not vae_dir.is_dir():
            raise ModelLoadError(f"upstream layout: no vae/ folder beside {variant_dir}")
        components.vae = _pretrained(AutoencoderOobleck, vae_dir, None, dtype, weights)
    text_dir = root / UPSTREAM_TEXT_ENCODER_DIR
    if ("text_encoder" in parts or "tokenizer" in parts) and not text_dir.is_dir():
        raise ModelLoadError(f"upstream layout: no {UPSTREAM_TEXT_ENCODER_DIR}/ folder beside {variant_dir}")
    _load_text_parts(text_dir, parts, dtype, components, tokenizer_folder=text_dir, weights=weights)
    return components


def _from_config(cls, config: dict):
    return cls(**{k: v for k, v in config.items() if v is not None})


def _instantiate(cls, config: dict, state_dict: dict, dtype, where: Path, optional: set[str] = frozenset()):
    model = _from_config(cls, config)
    expected = set(model.state_dict())
    missing = sorted(expected - set(state_dict) - set(optional))
    unexpected = sorted(set(state_dict) - expected)
    if missing or unexpected:
        raise ModelLoadError(
            f"{where}: weights do not fit {cls.__name__} built from config.json "
            f"(missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''})"
        )
    try:
        model.load_state_dict(state_dict, strict=not optional)
    except RuntimeError as error:  # shapes that do not fit the config
        raise ModelLoadError(f"{where}: weights do not fit {cls.__name__} built from config.json: {error}") from error
    return model if model.dtype == dtype else model.to(dtype)


@dataclass(frozen=True)
class ModelDimensions:
    """Sizes read from config files alone (no weights): what prep needs to plan shards."""

    sample_rate: int
    hop_length: int
    latent_dim: int
    text_dim: int

    @property
    def frames_per_second(self) -> float:
        return self.sample_rate / self.hop_length


def model_dimensions(folder: Path, layout: str) -> ModelDimensions:
    if layout == "diffusers":
        vae, text = folder / "vae" / "config.json", folder / "text_encoder" / "config.json"
    else:
        vae, text = folder.parent / "vae" / "config.json", folder.parent / UPSTREAM_TEXT_ENCODER_DIR / "config.json"
    vae_config, text_config = _read_json(vae), _read_json(text)
    hop = 1
    for ratio in vae_config.get("downsampling_ratios", [2, 4, 4, 6, 10]):
        hop *= int(ratio)
    return ModelDimensions(
        sample_rate=int(vae_config.get("sampling_rate", 48000)),
        hop_length=hop,
        latent_dim=int(vae_config.get("decoder_input_channels", 64)),
        text_dim=int(text_config["hidden_size"]),
    )


def model_fingerprint(folder: Path, layout: str) -> str:
    """Identity of the weights prep uses (VAE, text encoder, tokenizer): every config file's content
    and every weight file's name and size, hashed. Cheap: no weights are read."""
    import hashlib

    roots = [folder / "vae", folder / "text_encoder", folder / "tokenizer"] if layout == "diffusers" else [
        folder.parent / "vae", folder.parent / UPSTREAM_TEXT_ENCODER_DIR]
    sha = hashlib.sha256()
    for root in roots:
        for path in sorted(p for p in root.rglob("*") if p.is_file()):
            sha.update(f"{path.relative_to(root.parent)}:{path.stat().st_size}\n".encode())
            if path.suffix in (".json", ".txt", ".model"):
                sha.update(path.read_bytes())
    return sha.hexdigest()[:16]
