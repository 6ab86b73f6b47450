"""Upstream v1's optional SSL targets: MERT-v1-330M and mHuBERT-147 hidden states of the training audio.

Upstream's trainer (``infer_mert_ssl`` / ``infer_mhubert_ssl``) computes them on the fly from the
48 kHz stereo clip its dataset feeds the DCAE; the DiT's projectors (after block 8) predict them and
``loss += ssl_coeff * mean(proj_losses)``. Prep computes them here instead, once per sample, from
the same audio the latent is encoded from (``upstream_training_audio``: the cropped window, padded to
3 s, cut at 240 s), with upstream's recipe per kind:

- the mono mean of the two channels, resampled (torchaudio's windowed sinc) to the model's rate;
- normalised to zero mean and unit variance over the clip's ``n // (48000 / rate)`` samples (torch's
  unbiased ``var`` + 1e-7): upstream's own normalisation; it loads the checkpoints'
  ``Wav2Vec2FeatureExtractor`` but never applies it, so neither does this;
- cut into chunks (MERT 5 s, mHuBERT 30 s), the last zero-padded to a full chunk, each run through
  the model without an attention mask; of each chunk the first ``(length + 319) // 320`` frames are
  kept (fewer when the model yields fewer: a full 5-s chunk gives 374 of 375) and concatenated.

Stored as bfloat16 ``[frames, hidden]``: ~9.2 MB (MERT, 75 Hz x 1024) + 4.6 MB (mHuBERT, 50 Hz x 768)
a minute.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ...errors import UserError

SOURCE_RATE = 48000
HOP = 320  # the wav2vec2-style feature extractor's stride: upstream's frame arithmetic
# chunks per forward are bounded by their samples (a 330M model's first conv holds 512 channels a
# sample): 8 MERT chunks or 2 mHuBERT chunks at a time; a chunk's states do not depend on its batch
BATCH_SAMPLES = 960_000


@dataclass(frozen=True)
class SSLKind:
    """One of upstream's SSL targets: the schema tensor and count, the prep option naming the
    checkpoint, the DiT projector it pairs with (by ``ssl_names``), and upstream's recipe."""

    tensor: str
    count: str
    option: str
    dit_name: str
    rate: int
    chunk_seconds: int
    hidden: int  # the released checkpoint's width (the DiT's projector output)
    title: str

    @property
    def chunk(self) -> int:
        return self.rate * self.chunk_seconds

    @property
    def frames_per_second(self) -> float:
        return self.rate / HOP


MERT = SSLKind("mert_states", "mert_frames", "ssl_mert", "mert", 24000, 5, 1024, "MERT-v1-330M")
MHUBERT = SSLKind("mhubert_states", "mhubert_frames", "ssl_mhubert", "m-hubert", 16000, 30, 768, "mHuBERT-147")
KINDS = (MERT, MHUBERT)


def normalised_input(wave: torch.Tensor, kind: SSLKind) -> tuple[torch.Tensor, int]:
    """``wave [2, n]`` at 48 kHz -> the model's input at its rate, normalised over the clip's
    samples as upstream does, and that sample count (``n // (48000 / rate)``)."""
    from .resample import resample

    mono = resample(wave.float().mean(dim=0), SOURCE_RATE, kind.rate)
    actual = wave.shape[-1] // (SOURCE_RATE // kind.rate)
    real = mono[:actual]
    return (mono - real.mean()) / torch.sqrt(real.var() + 1e-7), actual


def chunk_lengths(actual: int, kind: SSLKind) -> list[int]:
    """The real samples of each chunk of a clip of ``actual`` samples at the kind's rate."""
    return [min(kind.chunk, actual - start) for start in range(0, actual, kind.chunk)]


@torch.no_grad()
def hidden_states(model: torch.nn.Module, wave: torch.Tensor, kind: SSLKind) -> torch.Tensor:
    """``wave [2, n]`` at 48 kHz -> the kind's states ``[frames, hidden]`` (float32) by upstream's recipe."""
    audio, actual = normalised_input(wave, kind)
    lengths = chunk_lengths(actual, kind)
    chunks = torch.stack([F.pad(audio[start:start + length], (0, kind.chunk - length))
                          for start, length in zip(range(0, actual, kind.chunk), lengths)])
    parameter = next(model.parameters())
    per_forward = max(1, BATCH_SAMPLES // kind.chunk)
    kept = []
    for first in range(0, len(chunks), per_forward):
        batch = chunks[first:first + per_forward].to(parameter.device, parameter.dtype)
        states = model(batch).last_hidden_state.float().cpu()
        kept += [states[i, :(length + HOP - 1) // HOP] for i, length in enumerate(lengths[first:first + per_forward])]
    return torch.cat(kept, dim=0)


# -------------------------------------------------------------------------------- checkpoints
def read_config(source: str, option: str) -> dict[str, Any]:
    """The checkpoint's config.json: a local folder's, or a hub id's (downloaded alone)."""
    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir():
            raise UserError(f"{option} {source!r} is a file; give the checkpoint's folder (or a hub id)")
        config = path / "config.json"
        if not config.is_file():
            raise UserError(f"{option} {source!r}: no config.json in the folder (not a transformers checkpoint)")
    else:
        if "://" in source or source.count("/") != 1 or source.startswith((".", "/", "~")):
            raise UserError(f"{option} {source!r}: no such folder, and not a hub id (org/name)")
        from huggingface_hub import hf_hub_download

        try:
            config = Path(hf_hub_download(source, "config.json"))
        except Exception as error:  # offline, unknown repository, no config.json: all say the same
            raise UserError(f"{option} {source!r}: no such folder, and its config.json cannot be fetched from "
                            f"the hub ({type(error).__name__}: {error})") from None
    try:
        loaded = json.loads(config.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise UserError(f"{option} {source!r}: unreadable config.json ({error})") from None
    if not isinstance(loaded, dict):
        raise UserError(f"{option} {source!r}: config.json is not a JSON object")
    return loaded


def checked_source(source: str, kind: SSLKind, trust_remote_code: bool) -> str:
    """On the driver: ``source`` as workers load it (a local folder made absolute, a hub id as
    given), after its config.json is read. A checkpoint whose config names its own code
    (``auto_map``, as MERT's does) is refused unless ``trust_remote_code`` allows running it."""
    config = read_config(source, kind.option)
    custom = config.get("auto_map")
    if custom and not trust_remote_code:
        named = ", ".join(f"{k} -> {v}" for k, v in custom.items()) if isinstance(custom, dict) else str(custom)
        raise UserError(f"{kind.option} {source!r}: the checkpoint ships its own model code (config.json auto_map: "
                        f"{named}); loading it runs that code. Set trust_remote_code: true in the prep config to "
                        f"allow it (upstream loads {kind.title} so), or give a checkpoint without custom code")
    if not custom and not config.get("model_type"):
        raise UserError(f"{kind.option} {source!r}: its config.json has no model_type (not a transformers checkpoint)")
    path = Path(source).expanduser()
    return str(path.absolute()) if path.exists() else source


class SSLModels:
    """The SSL checkpoints of one prep actor, each loaded once (on first use) in float32, frozen,
    in eval mode, on the device of the actor's other parts. A checkpoint that fails to load fails
    every later call at once, with the first error (each window is rejected with it)."""

    def __init__(self) -> None:
        self._loaded: dict[tuple[str, bool, str], torch.nn.Module | RuntimeError] = {}

    def get(self, source: str, trust_remote_code: bool, device: torch.device | str,
            kind: SSLKind | None = None) -> torch.nn.Module:
        key = (source, bool(trust_remote_code), str(device))
        if key not in self._loaded:
            from transformers import AutoModel

            try:
                model = AutoModel.from_pretrained(source, trust_remote_code=trust_remote_code, dtype=torch.float32)
                self._loaded[key] = model.to(device).eval().requires_grad_(False)
            except Exception as error:
                named = f"{kind.option} " if kind else ""
                self._loaded[key] = RuntimeError(f"{named}{source}: cannot load the SSL model "
                                                 f"({type(error).__name__}: {error})")
        found = self._loaded[key]
        if isinstance(found, RuntimeError):
            raise found
        return found
