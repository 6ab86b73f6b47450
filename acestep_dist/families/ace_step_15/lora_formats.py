"""The DiT LoRA in its three spellings (REFERENCE.md, "LoRA file formats"), read and written.

Inside the toolkit a LoRA is a ``LoraWeights``: PEFT's state dict of diffusers' transformer
(``layers.0.self_attn.to_q.lora_A.weight``) plus rank, alpha, rsLoRA flag and target names.

- diffusers: one safetensors file, keys ``transformer.<module>.lora_{A,B}.weight``, the adapter
  config in the header (``lora_adapter_metadata``), as ``AceStepPipeline.save_lora_weights`` writes;
- PEFT (upstream ACE-Step 1.5): a folder with ``adapter_config.json`` and
  ``adapter_model.safetensors``, keys ``base_model.model.<upstream module>.lora_{A,B}.weight``;
- ComfyUI: one safetensors file, keys ``diffusion_model.decoder.<upstream module>.lora_{A,B}.weight``
  (or ``lora_down`` / ``lora_up``) and one ``<module>.alpha`` scalar per module.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from ...errors import UserError
from ..common import json_table, safetensors_header
from .keymap import ATTENTION_RENAMES, _rename, _unrename

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
DIFFUSERS_PREFIX = "transformer."
PEFT_PREFIX = "base_model.model."
COMFY_PREFIX = "diffusion_model.decoder."
FORMATS = ("diffusers", "peft", "comfyui")
_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<part>A|B|down|up)\.weight$")


@dataclass
class LoraWeights:
    state_dict: dict[str, torch.Tensor]  # diffusers module names, no prefix
    rank: int
    alpha: float
    use_rslora: bool = False
    targets: tuple[str, ...] = ()
    notes: list[str] = field(default_factory=list)  # what the reader had to assume

    @property
    def modules(self) -> list[str]:
        return sorted({key.rsplit(".lora_", 1)[0] for key in self.state_dict})

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)

    def peft_config(self, upstream_names: bool = False) -> dict:
        targets = sorted(self.targets or _targets_of(self.modules))
        if upstream_names:
            targets = sorted({_unrename(f".{t}.", ATTENTION_RENAMES).strip(".") for t in targets})
        return {"r": self.rank, "lora_alpha": self.alpha, "use_rslora": self.use_rslora, "target_modules": targets,
                "lora_dropout": 0.0, "bias": "none", "init_lora_weights": True}


def _targets_of(modules) -> tuple[str, ...]:
    found = set()
    for module in modules:
        found.add("to_out.0" if module.endswith("to_out.0") else module.rsplit(".", 1)[-1])
    return tuple(sorted(found))


def _rank_of(state_dict: dict[str, torch.Tensor]) -> int:
    ranks = {v.shape[0] for k, v in state_dict.items() if ".lora_A." in k}
    if len(ranks) != 1:
        raise UserError(f"LoRA modules have different ranks {sorted(ranks)}; only a uniform rank is supported")
    return ranks.pop()


def _to_diffusers_module(upstream_module: str) -> str:
    return _rename("." + upstream_module + ".", ATTENTION_RENAMES).strip(".")


def _to_upstream_module(module: str) -> str:
    return _unrename("." + module + ".", ATTENTION_RENAMES).strip(".")


# ------------------------------------------------------------------ reading
WEIGHT_FILES = ("pytorch_lora_weights.safetensors", "lora.safetensors")  # diffusers' name, a training run's
_PREFIXES = {"diffusers": DIFFUSERS_PREFIX, "peft": PEFT_PREFIX, "comfyui": COMFY_PREFIX}


def _weights_file(path: Path) -> Path:
    """The safetensors file a LoRA argument names: the file itself, or the one in a LoRA folder."""
    if path.is_dir():
        for name in (PEFT_WEIGHTS, *WEIGHT_FILES):
            if (path / name).is_file():
                return path / name
        raise UserError(f"{path}: a LoRA folder needs {PEFT_CONFIG} + {PEFT_WEIGHTS} (PEFT) or a .safetensors file "
                        f"({', '.join(WEIGHT_FILES)})")
    if not path.is_file():
        raise UserError(f"LoRA {path} does not exist")
    if path.suffix != ".safetensors":
        raise UserError(f"LoRA {path}: only .safetensors files are read (pickled weights are never loaded)")
    return path


def _read_safetensors(file: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and header entries of a LoRA file."""
    try:
        with safe_open(str(file), "pt") as f:
            return {key: f.get_tensor(key) for key in f.keys()}, dict(f.metadata() or {})
    except (SafetensorError, OSError) as error:
        raise UserError(f"LoRA {file}: not a readable safetensors file (truncated or corrupt?): {error}") from None


def _format_of(keys, file: Path) -> str:
    """The format a file's keys are spelled in; every key must carry the one prefix."""
    if not keys:
        raise UserError(f"LoRA {file} holds no tensors")
    for kind, prefix in _PREFIXES.items():
        if all(key.startswith(prefix) for key in keys):
            return kind
    sample = ", ".join(sorted(keys)[:3])
    raise UserError(f"LoRA {file}: not a LoRA of the ACE-Step DiT: its keys are not all diffusers' "
                    f"({DIFFUSERS_PREFIX}*), PEFT's ({PEFT_PREFIX}*) or ComfyUI's ({COMFY_PREFIX}*): {sample}")


def _positive(table: dict, key: str, where: str, integer: bool = False) -> float | int | None:
    """``table[key]`` as a positive number, None when it is absent."""
    value = table.get(key)
    if value is None:
        return None
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not is_number or value <= 0 or (integer and value != int(value)):
        raise UserError(f"{where}: {key} is {value!r}, not a positive {'whole ' if integer else ''}number")
    return int(value) if integer else float(value)


def _lora_state(tensors: dict[str, torch.Tensor], prefix: str, file: Path, upstream_names: bool,
                alphas: dict[str, float] | None = None) -> dict[str, torch.Tensor]:
    """The file's lora_A / lora_B matrices in diffusers' module names (``lora_down`` / ``lora_up``
    are the same matrices). With ``alphas``, ComfyUI's per-module ``.alpha`` scalars are collected
    there; any other key is not part of a LoRA and stops the read."""
    state: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        name = key[len(prefix):]
        if alphas is not None and name.endswith(".alpha"):
            if value.numel() != 1:
                raise UserError(f"LoRA {file}: {key} holds {value.numel()} values, not one alpha")
            module = name[: -len(".alpha")]
            alphas[_to_diffusers_module(module) if upstream_names else module] = float(value)
            continue
        match = _LORA_KEY.match(name)
        if match is None:
            raise UserError(f"LoRA {file}: {key!r} is not a LoRA matrix (a LoRA holds only <module>.lora_A.weight "
                            f"and <module>.lora_B.weight): not a LoRA file, or one with other weights in it")
        if value.ndim != 2 or not value.is_floating_point():
            raise UserError(f"LoRA {file}: {key} is a {value.dtype} tensor of shape {tuple(value.shape)}, "
                            f"not a LoRA matrix")
        module = _to_diffusers_module(match["module"]) if upstream_names else match["module"]
        part = {"down": "A", "up": "B"}.get(match["part"], match["part"])
        name = f"{module}.lora_{part}.weight"
        if name in state:
            raise UserError(f"LoRA {file}: {module} has its lora_{part} matrix twice (lora_A/lora_down or lora_B/lora_up)")
        state[name] = value
    for module in sorted({key.rsplit(".lora_", 1)[0] for key in state}):
        down, up = state.get(f"{module}.lora_A.weight"), state.get(f"{module}.lora_B.weight")
        if down is None or up is None:
            raise UserError(f"LoRA {file}: {module} has lora_{'B' if down is None else 'A'} but no "
                            f"lora_{'A' if down is None else 'B'} (an incomplete file?)")
        if down.shape[0] != up.shape[1]:
            raise UserError(f"LoRA {file}: {module} has lora_A of rank {down.shape[0]} but lora_B of rank {up.shape[1]}")
    return state


def _peft_config(file: Path) -> dict:
    where = f"LoRA config {file}"
    try:
        config = json_table(file.read_text(encoding="utf-8"), where)
    except (OSError, UnicodeDecodeError) as error:
        raise UserError(f"{where}: unreadable ({error})") from None
    if config.get("peft_type") not in (None, "LORA"):
        raise UserError(f"{where}: a {config['peft_type']} adapter, not a LoRA")
    for key, what in (("rank_pattern", "per-module ranks"), ("alpha_pattern", "per-module alphas")):
        if config.get(key):
            raise UserError(f"{where}: {what} ({key}) are not supported; only a uniform rank and alpha")
    if config.get("use_dora"):
        raise UserError(f"{where}: a DoRA adapter (use_dora); only plain LoRA is supported")
    return config


def detect_format(path: str | Path) -> str:
    """``diffusers``, ``peft`` or ``comfyui``: how the LoRA ``path`` names is spelled."""
    file = _weights_file(Path(path))
    return _format_of(_read_safetensors(file)[0].keys(), file)


def read_lora(path: str | Path) -> LoraWeights:
    """Any of the three formats -> ``LoraWeights`` in diffusers names. ``path`` is a LoRA file, a
    PEFT folder, PEFT's ``adapter_model.safetensors`` itself (its ``adapter_config.json`` beside
    it), or a folder holding one diffusers file. Anything else is refused, naming the file and why."""
    file = _weights_file(Path(path))
    tensors, header = _read_safetensors(file)
    kind = _format_of(tensors.keys(), file)
    if kind == "peft":
        config_file = file.parent / PEFT_CONFIG
        if not config_file.is_file():
            raise UserError(f"LoRA {file}: PEFT weights need their {PEFT_CONFIG} (rank, alpha) beside them")
        config = _peft_config(config_file)
        state = _lora_state(tensors, PEFT_PREFIX, file, upstream_names=True)
        rank = _positive(config, "r", f"LoRA config {config_file}", integer=True) or _rank_of(state)
        alpha = _positive(config, "lora_alpha", f"LoRA config {config_file}") or float(rank)
        targets = config.get("target_modules") or ()
        targets = tuple(sorted({_to_diffusers_module(t) for t in ([targets] if isinstance(targets, str) else targets)}))
        weights = LoraWeights(state, rank, alpha, bool(config.get("use_rslora")), targets)
    elif kind == "diffusers":
        state = _lora_state(tensors, DIFFUSERS_PREFIX, file, upstream_names=False)
        where = f"LoRA {file}: its lora_adapter_metadata header entry"
        meta = json_table(header["lora_adapter_metadata"], where) if "lora_adapter_metadata" in header else {}
        meta = {k[len(DIFFUSERS_PREFIX):] if k.startswith(DIFFUSERS_PREFIX) else k: v for k, v in meta.items()}
        rank = _positive(meta, "r", where, integer=True) or _rank_of(state)
        alpha = _positive(meta, "lora_alpha", where)
        notes = [] if alpha is not None else ["no adapter metadata in the file: alpha taken as the rank (scale 1)"]
        weights = LoraWeights(state, rank, float(rank) if alpha is None else alpha, bool(meta.get("use_rslora")),
                              tuple(meta.get("target_modules") or ()) and _targets_of(meta["target_modules"]), notes)
    else:
        alphas: dict[str, float] = {}
        state = _lora_state(tensors, COMFY_PREFIX, file, upstream_names=True, alphas=alphas)
        if not state:
            raise UserError(f"LoRA {file} holds no LoRA weights")
        rank = _rank_of(state)
        modules = sorted({k.rsplit(".lora_", 1)[0] for k in state})
        values = {alphas.get(m, float(rank)) for m in modules}
        if len(values) != 1:
            raise UserError(f"LoRA {file}: modules have different alphas {sorted(values)}; only a uniform alpha is supported")
        notes = [] if len(alphas) == len(modules) else ["some modules have no .alpha: scale 1.0 assumed for them"]
        weights = LoraWeights(state, rank, values.pop(), False, (), notes)
    if not weights.state_dict:
        raise UserError(f"LoRA {file} holds no LoRA weights")
    if not weights.targets:
        weights.targets = _targets_of(weights.modules)
    return weights


# ------------------------------------------------------------------ writing
def write_diffusers(weights: LoraWeights, out: str | Path) -> Path:
    """One file that ``AceStepPipeline.load_lora_weights`` loads at scale 1 with the trained alpha."""
    from diffusers import AceStepPipeline

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    AceStepPipeline.save_lora_weights(
        str(out), transformer_lora_layers={k: v.contiguous() for k, v in weights.state_dict.items()},
        transformer_lora_adapter_metadata=weights.peft_config(), safe_serialization=True,
    )
    return out / "pytorch_lora_weights.safetensors"


def write_peft(weights: LoraWeights, out: str | Path) -> Path:
    """Upstream's folder: ``PeftModel.from_pretrained(model.decoder, out)`` loads it."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    state = {}
    for key, value in weights.state_dict.items():
        module, _, rest = key.partition(".lora_")
        state[f"{PEFT_PREFIX}{_to_upstream_module(module)}.lora_{rest}"] = value.contiguous()
    save_file(state, str(out / PEFT_WEIGHTS), metadata={"format": "pt"})
    config = {**weights.peft_config(upstream_names=True), "peft_type": "LORA", "task_type": None,
              "base_model_name_or_path": None, "inference_mode": True, "fan_in_fan_out": False}
    (out / PEFT_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return out


def write_comfyui(weights: LoraWeights, out: str | Path) -> Path:
    """One file with an ``.alpha`` per module; ComfyUI scales by alpha / rank, so rsLoRA's
    alpha / sqrt(rank) is folded into the stored alpha."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    state = {}
    alpha = weights.scale * weights.rank
    for key, value in weights.state_dict.items():
        module, _, rest = key.partition(".lora_")
        upstream = _to_upstream_module(module)
        state[f"{COMFY_PREFIX}{upstream}.lora_{rest}"] = value.contiguous()
        state[f"{COMFY_PREFIX}{upstream}.alpha"] = torch.tensor(float(alpha))
    save_file(state, str(out), metadata={"format": "pt"})
    return out


# ------------------------------------------------------------------ provenance and fit
PROVENANCE_KEY = "acedist"  # safetensors header entry: which model and variant a LoRA was trained on


def with_provenance(file: Path, provenance: dict) -> None:
    """Add our provenance entry to a safetensors header (the tensors are rewritten unchanged)."""
    with safe_open(str(file), "pt") as f:
        header = dict(f.metadata() or {})
    header[PROVENANCE_KEY] = json.dumps(provenance, sort_keys=True)
    save_file(load_file(str(file)), str(file), metadata=header)


def read_provenance(path: str | Path) -> dict | None:
    """Our provenance entry in the header of the LoRA file ``path`` names (as ``read_lora`` finds it)."""
    file = _weights_file(Path(path))
    raw = safetensors_header(file).get(PROVENANCE_KEY)
    if not raw:
        return None
    return json_table(raw, f"LoRA {file}: its {PROVENANCE_KEY!r} header entry")




def check_fits(weights: LoraWeights, transformer: torch.nn.Module, variant: str, source: str | Path) -> None:
    """Every LoRA module must exist in this DiT with matching widths and the adapter's rank; a
    variant recorded in the file must be this model's."""
    provenance = read_provenance(source)
    if provenance and provenance.get("variant") and provenance["variant"] != variant:
        raise UserError(f"LoRA {source} was trained on variant {provenance['variant']!r}, the model is "
                        f"{variant!r}; use the model it was trained on")
    modules = dict(transformer.named_modules())
    for key, tensor in weights.state_dict.items():
        module_name, _, part = key.rpartition(".lora_")
        module = modules.get(module_name)
        if not isinstance(module, torch.nn.Linear):
            raise UserError(f"LoRA {source} targets {module_name!r}, which this model's DiT lacks "
                            f"(a LoRA for another model size or family?)")
        is_a = part.startswith("A")
        if is_a and tensor.shape[1] != module.in_features:
            raise UserError(f"LoRA {source}: {module_name} takes {tensor.shape[1]} inputs, the model's has "
                            f"{module.in_features} (a LoRA for another model size?)")
        if not is_a and tensor.shape[0] != module.out_features:
            raise UserError(f"LoRA {source}: {module_name} gives {tensor.shape[0]} outputs, the model's has "
                            f"{module.out_features} (a LoRA for another model size?)")
        rank = tensor.shape[0 if is_a else 1]
        if rank != weights.rank:
            raise UserError(f"LoRA {source}: {module_name} has rank {rank}, the adapter config says {weights.rank}")
