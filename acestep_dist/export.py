"""`acedist export`: a run's trained weights in the files its model family's consumers load.

The run's state names its family; the family writes the formats (ACE-Step 1.5: a LoRA as
diffusers, PEFT and ComfyUI files; a full fine-tune as a diffusers pipeline folder and upstream's
checkpoint files). This module finds the run, checks it, keeps ``--out`` safe, and writes the
README. Weights in a run are already whole (ZeRO-3 parameters are gathered when a checkpoint is
written).
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .errors import UserError
from .families.adapters import NAMES as ADAPTER_NAMES
from .families import LEGACY_FAMILY, Family, get, open_model, union
from .train.layout import EMA_DIR, FINAL_DIR, STATE_FILE, weight_files

# what export reads from a checkpoint's acedist_state.json (train/loop.py writes it), and its type
STATE_FIELDS = {"model_type": str, "variant": str, "model": str, "step": int}
MODEL_TYPES = ("lora", "full")


def export_formats() -> list[str]:
    """Every format some family writes, and "all"."""
    return [*union("lora_formats"), *union("full_formats"), "all"]


@dataclass
class TrainedWeights:
    folder: Path
    state: dict

    @property
    def is_lora(self) -> bool:
        return self.state["model_type"] == "lora"

    @property
    def family(self) -> Family:
        return get(self.state.get("family", LEGACY_FAMILY))

    @property
    def weights(self) -> list[str]:
        return weight_files(self.state)

    @property
    def provenance(self) -> dict:
        return {"family": self.family.name, "variant": self.state["variant"], "model": self.state["model"],
                "step": self.state["step"]}


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
    if "weights" in state and not (isinstance(state["weights"], list) and all(isinstance(w, str) for w in state["weights"])):
        raise UserError(f"{file}: weights is {state['weights']!r}, not a list of file names")
    return state


def _average_of(folder, has_state, name: str):
    """The ``ema/`` folder of a run's ``final/`` or checkpoint folder (``use_ema``), refused when absent."""
    average = f"{folder}/{EMA_DIR}"
    if not has_state(f"{average}/{STATE_FILE}"):
        raise UserError(f"{name} holds no weight average ({EMA_DIR}/): the run trained without use_ema")
    return average


def find_trained_weights(path: str | Path, ema: bool = False) -> TrainedWeights:
    """A run folder (its ``final/``), a ``final/`` folder, or one ``checkpoint_*`` folder of a run;
    with ``ema``, the weight average saved beside its weights."""
    path = Path(path)
    for folder in (path / FINAL_DIR, path):
        if (folder / STATE_FILE).is_file():
            if ema:
                folder = Path(_average_of(folder, lambda p: Path(p).is_file(), str(folder)))
            trained = TrainedWeights(folder, read_state(folder / STATE_FILE))
            for name in trained.weights:
                if not (folder / name).exists():
                    raise UserError(f"{folder} lacks {name}: not a complete acedist checkpoint")
            return trained
    if path.is_dir() and sorted(path.glob("checkpoint_*")):
        raise UserError(f"{path} holds checkpoints but no final/ (the run did not finish); "
                        f"pass one of its checkpoint_* folders")
    raise UserError(f"{path} is not an acedist run, final/ or checkpoint folder (no {STATE_FILE})")


README_START = "Exported by acedist from"
README = """Exported by acedist from {source} (step {step}, {family} {variant}, base model {model}).

{body}
"""


def _fetch_weights(url: str, into: Path, ema: bool = False) -> str:
    """Copy the trained weights of a run at a URL (its ``final/``, or the ``final/`` or ``checkpoint_*``
    folder given; with ``ema``, the weight average beside them) into ``into``: the state and the weight
    files, never the DeepSpeed states. Returns the URL of the folder they came from."""
    from .storage import open_fs

    fs, root = open_fs(url)
    protocol = url.split("://", 1)[0]
    for folder in (f"{root}/{FINAL_DIR}", root):
        if not fs.isfile(f"{folder}/{STATE_FILE}"):
            continue
        if ema:
            folder = _average_of(folder, fs.isfile, f"{protocol}://{folder}")
        fs.get_file(f"{folder}/{STATE_FILE}", str(into / STATE_FILE))
        state = read_state(into / STATE_FILE)
        for item in weight_files(state):
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
           log=print, ema: bool = False) -> list[Path]:
    """Export the run, ``final/`` or ``checkpoint_*`` folder ``source`` (a local path or a URL such as
    ``s3://bucket/runs/x``, whose weights are downloaded first) into the local folder ``out``; with
    ``ema``, the weight average the run kept (``use_ema``) instead of its weights."""
    if fmt not in export_formats():
        raise UserError(f"unknown format {fmt!r}; choose one of {', '.join(export_formats())}")
    if "://" in str(source):
        with tempfile.TemporaryDirectory(prefix="acedist-export-") as folder:
            origin = _fetch_weights(str(source), Path(folder), ema)
            name = name or str(source).rstrip("/").rsplit("/", 1)[-1]
            return _export(find_trained_weights(folder), origin, out, fmt, name, log)
    return _export(find_trained_weights(source, ema), None, out, fmt, name or Path(source).resolve().name, log)


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
    family = trained.family
    adapter = (trained.state.get("config") or {}).get("adapter", "lora")
    offered = family.adapter_formats(adapter) if trained.is_lora else family.full_formats
    what = f"a {family.name} {ADAPTER_NAMES.get(adapter, adapter) if trained.is_lora else 'full fine-tune'}"
    if fmt != "all" and fmt not in offered:
        raise UserError(f"{what} exports as {', '.join(offered) or 'nothing'}; not {fmt}")
    formats = offered if fmt == "all" else (fmt,)
    # the weights are read (and checked) before anything is written: a corrupt run leaves no half export
    if trained.is_lora:
        written, body = family.export_lora(trained.folder, trained.weights, out, formats, name, trained.provenance)
    else:
        base, description = open_model(trained.state["model"])
        if base.name != family.name:
            raise UserError(f"{trained.folder} is a run of the model family {family.name}, but its base model "
                            f"{trained.state['model']} is {base.name}; export needs the model it was trained from")
        written, body = family.export_full(description, trained.folder, trained.weights, out, formats)
    (out / "README.txt").write_text(README.format(source=origin or trained.folder, body=body, **trained.provenance))
    for path in written:
        log(f"export: wrote {path}")
    return written
