"""`acedist export`: a run's trained weights in the files diffusers, upstream ACE-Step and ComfyUI load.

LoRA -> ``diffusers/pytorch_lora_weights.safetensors`` (adapter config in the header),
``peft/`` (``adapter_config.json`` + ``adapter_model.safetensors``, upstream module names) and
``comfyui/<name>.safetensors`` (``.alpha`` per module). Full fine-tune -> ``diffusers/`` (a
pipeline folder ``AceStepPipeline.from_pretrained`` loads) and ``upstream/model.safetensors``
(upstream key names, with its ``config.json`` and ``silence_latent.pt``). Weights in a run are
already whole (ZeRO-3 parameters are gathered when a checkpoint is written).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import UserError
from .families.ace_step_15.lora_formats import read_lora, with_provenance, write_comfyui, write_diffusers, write_peft
from .train.layout import FINAL_DIR, LORA_FILE, LYRIC_ENCODER_FILE, STATE_FILE, TRANSFORMER_DIR

EXPORT_FORMATS = ("diffusers", "peft", "comfyui", "all")


# what export reads from a checkpoint's acedist_state.json (train/loop.py writes it), and its type
STATE_FIELDS = {"model_type": str, "variant": str, "model": str, "step": int}
MODEL_TYPES = ("lora", "full")


@dataclass
class TrainedWeights:
    folder: Path
    state: dict

    @property
    def is_lora(self) -> bool:
        return self.state["model_type"] == "lora"

    @property
    def provenance(self) -> dict:
        return {"variant": self.state["variant"], "model": self.state["model"], "step": self.state["step"]}


def read_state(file: Path) -> dict:
    """A checkpoint's state, with the fields export uses checked: a corrupt or cut-off file (a run
    killed while writing it, a copy that did not finish) is named, never a traceback."""
    try:
        state = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UserError(f"{file} is unreadable ({error}): the checkpoint is incomplete or corrupt") from None
    if not isinstance(state, dict):
        raise UserError(f"{file} holds a JSON {type(state).__name__}, not an acedist checkpoint state")
    for field, kind in STATE_FIELDS.items():
        if field not in state:
            raise UserError(f"{file} lacks the field {field!r}: the checkpoint is incomplete or not acedist's")
        value = state[field]
        if not isinstance(value, kind) or isinstance(value, bool):
            raise UserError(f"{file}: {field} is {value!r}, not a {kind.__name__}")
    if state["model_type"] not in MODEL_TYPES:
        raise UserError(f"{file}: model_type is {state['model_type']!r}, not one of {', '.join(MODEL_TYPES)}")
    return state


def find_trained_weights(path: str | Path) -> TrainedWeights:
    """A run folder (its ``final/``), a ``final/`` folder, or one ``checkpoint_*`` folder of a run."""
    path = Path(path)
    for folder in (path / FINAL_DIR, path):
        if (folder / STATE_FILE).is_file():
            state = read_state(folder / STATE_FILE)
            want = LORA_FILE if state["model_type"] == "lora" else TRANSFORMER_DIR
            if not (folder / want).exists():
                raise UserError(f"{folder} lacks {want}: not a complete acedist checkpoint")
            return TrainedWeights(folder, state)
    if path.is_dir() and sorted(path.glob("checkpoint_*")):
        raise UserError(f"{path} holds checkpoints but no final/ (the run did not finish); "
                        f"pass one of its checkpoint_* folders")
    raise UserError(f"{path} is not an acedist run, final/ or checkpoint folder (no {STATE_FILE})")


README_START = "Exported by acedist from"
README = """Exported by acedist from {source} (step {step}, {variant}, base model {model}).

{body}
"""

LORA_README = """LoRA rank {rank}, alpha {alpha:g}{rslora}, on the DiT's {targets}.

diffusers/pytorch_lora_weights.safetensors
    diffusers: pipe = AceStepPipeline.from_pretrained(BASE); pipe.load_lora_weights("diffusers/")
    The adapter config (rank, alpha) is in the file header, so it loads at scale 1.0 as trained.
peft/ (adapter_config.json + adapter_model.safetensors)
    upstream ACE-Step 1.5: PeftModel.from_pretrained(model.decoder, "peft/") - its LoRA folder.
comfyui/{name}.safetensors
    ComfyUI: copy into ComfyUI/models/loras/ and use a LoRA loader node on the ACE-Step 1.5 model
    (keys diffusion_model.decoder.*, one .alpha per module).
acedist: acedist generate --model BASE --lora <any of the three> ...
"""

FULL_README = """A full fine-tune of the DiT{lyric}.

diffusers/
    diffusers: AceStepPipeline.from_pretrained("diffusers/") - the whole pipeline folder.
upstream/model.safetensors (+ config.json, silence_latent.pt)
    upstream ACE-Step 1.5: replace the variant folder's model.safetensors and config.json (e.g.
    checkpoints/acestep-v15-turbo/) with these; vae/ and Qwen3-Embedding-0.6B/ are unchanged.
acedist: acedist generate --model diffusers/ ...
"""


def _fetch_weights(url: str, into: Path) -> str:
    """Copy the trained weights of a run at a URL (its ``final/``, or the ``final/`` or ``checkpoint_*``
    folder given) into ``into``: the state and the weight files, never the DeepSpeed states. Returns the
    URL of the folder they came from."""
    from .storage import open_fs

    fs, root = open_fs(url)
    protocol = url.split("://", 1)[0]
    for folder in (f"{root}/{FINAL_DIR}", root):
        if not fs.isfile(f"{folder}/{STATE_FILE}"):
            continue
        for item in (STATE_FILE, LORA_FILE, LYRIC_ENCODER_FILE, TRANSFORMER_DIR):
            path = f"{folder}/{item}"
            for remote in (fs.find(path) if fs.isdir(path) else [path] if fs.isfile(path) else []):
                local = into / item / remote[len(path) + 1:] if remote != path else into / item
                local.parent.mkdir(parents=True, exist_ok=True)
                fs.get_file(remote, str(local))
        return f"{protocol}://{folder}"
    if fs.glob(f"{root}/checkpoint_*"):
        raise UserError(f"{url} holds checkpoints but no final/ (the run did not finish); "
                        f"pass one of its checkpoint_* folders")
    raise UserError(f"{url} is not an acedist run, final/ or checkpoint folder (no {STATE_FILE})")


def export(source: str | Path, out: str | Path, fmt: str = "all", name: str | None = None,
           log=print) -> list[Path]:
    """Export the run, ``final/`` or ``checkpoint_*`` folder ``source`` (a local path or a URL such as
    ``s3://bucket/runs/x``, whose weights are downloaded first) into the local folder ``out``."""
    if fmt not in EXPORT_FORMATS:
        raise UserError(f"unknown format {fmt!r}; choose one of {', '.join(EXPORT_FORMATS)}")
    if "://" in str(source):
        with tempfile.TemporaryDirectory(prefix="acedist-export-") as folder:
            origin = _fetch_weights(str(source), Path(folder))
            name = name or str(source).rstrip("/").rsplit("/", 1)[-1]
            return _export(find_trained_weights(folder), origin, out, fmt, name, log)
    return _export(find_trained_weights(source), None, out, fmt, name or Path(source).resolve().name, log)


def _check_out(out: Path) -> None:
    """An export replaces its own files: ``out`` must be new, empty, or an earlier export (its
    README.txt says so); a folder of the user's is never written into."""
    if not out.exists():
        return
    if not out.is_dir():
        raise UserError(f"--out {out} is a file; give a folder")
    if not any(out.iterdir()):
        return
    readme = out / "README.txt"
    try:
        ours = readme.is_file() and readme.read_text(encoding="utf-8", errors="replace").startswith(README_START)
    except OSError:
        ours = False
    if not ours:
        raise UserError(f"--out {out} holds files that are not an acedist export (no README.txt of ours); "
                        f"export into a new or empty folder")


def _export(trained: TrainedWeights, origin: str | None, out: str | Path, fmt: str, name: str, log) -> list[Path]:
    out = Path(out)
    _check_out(out)
    wanted = ("diffusers", "peft", "comfyui") if fmt == "all" else (fmt,)
    written: list[Path] = []
    # the weights are read (and checked) before anything is written: a corrupt run leaves no half export
    if trained.is_lora:
        weights = read_lora(trained.folder / LORA_FILE)
        out.mkdir(parents=True, exist_ok=True)
        if "diffusers" in wanted:
            written.append(write_diffusers(weights, out / "diffusers"))
        if "peft" in wanted:
            written.append(write_peft(weights, out / "peft") / "adapter_model.safetensors")
        if "comfyui" in wanted:
            written.append(write_comfyui(weights, out / "comfyui" / f"{name}.safetensors"))
        for file in written:
            with_provenance(file, trained.provenance)
        body = LORA_README.format(rank=weights.rank, alpha=weights.alpha, name=name,
                                  rslora=" (rsLoRA)" if weights.use_rslora else "", targets=", ".join(weights.targets))
    else:
        if "comfyui" in wanted and fmt != "all":
            raise UserError("a full fine-tune exports as diffusers or upstream weights; comfyui is for LoRAs")
        family = _load_full(trained)
        out.mkdir(parents=True, exist_ok=True)
        written += _export_full(family, out, wanted)
        lyric = " and the lyric encoder" if (trained.folder / LYRIC_ENCODER_FILE).is_file() else ""
        body = FULL_README.format(lyric=lyric)
    (out / "README.txt").write_text(README.format(source=origin or trained.folder, body=body, **trained.provenance))
    for path in written:
        log(f"export: wrote {path}")
    return written


def _load_full(trained: TrainedWeights):
    """The base pipeline with the trained DiT (and lyric encoder) swapped in."""
    from diffusers import AceStepTransformer1DModel

    from .families.ace_step_15 import AceStep15

    family = AceStep15.load(trained.state["model"])
    components = family.components
    folder = trained.folder / TRANSFORMER_DIR
    try:  # safetensors only: diffusers would otherwise fall back to a pickled .bin in the folder
        components.transformer = AceStepTransformer1DModel.from_pretrained(str(folder), use_safetensors=True)
    except (OSError, ValueError, RuntimeError, SafetensorError) as error:
        raise UserError(f"{folder}: the trained DiT does not load (incomplete or corrupt?): {error}") from None
    lyric_file = trained.folder / LYRIC_ENCODER_FILE
    if lyric_file.is_file():
        try:
            components.condition_encoder.lyric_encoder.load_state_dict(load_file(str(lyric_file)))
        except (OSError, RuntimeError, SafetensorError) as error:
            raise UserError(f"{lyric_file}: the trained lyric encoder does not load (incomplete or corrupt?): "
                            f"{error}") from None
    return family


def _export_full(family, out: Path, wanted) -> list[Path]:
    from .families.ace_step_15.keymap import diffusers_to_upstream, upstream_config

    components = family.components
    written = []
    if "diffusers" in wanted or "peft" in wanted:  # "peft" has no meaning for a full model: diffusers it is
        target = out / "diffusers"
        if target.exists():
            shutil.rmtree(target)
        family.pipeline().save_pretrained(str(target), safe_serialization=True)
        written.append(target)
    target = out / "upstream"
    target.mkdir(parents=True, exist_ok=True)
    state = diffusers_to_upstream(components.transformer.state_dict(), components.condition_encoder.state_dict())
    save_file({k: v.contiguous() for k, v in state.items()}, str(target / "model.safetensors"),
              metadata={"format": "pt"})
    config = upstream_config(components.transformer.config, components.condition_encoder.config)
    (target / "config.json").write_text(json.dumps(config, indent=2, default=str) + "\n")
    # upstream reads this with torch.load; a plain tensor is all it holds
    torch.save(components.condition_encoder.silence_latent.detach().transpose(1, 2).contiguous().cpu(),
               target / "silence_latent.pt")
    written.append(target / "model.safetensors")
    return written
