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
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ...errors import UserError
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
def detect_format(path: str | Path) -> str:
    path = Path(path)
    if path.is_dir():
        if (path / PEFT_CONFIG).is_file() and (path / PEFT_WEIGHTS).is_file():
            return "peft"
        for name in ("pytorch_lora_weights.safetensors", "lora.safetensors"):
            if (path / name).is_file():
                return detect_format(path / name)
        raise UserError(f"{path}: a LoRA folder needs {PEFT_CONFIG} + {PEFT_WEIGHTS} (PEFT) or a .safetensors file")
    if not path.is_file():
        raise UserError(f"LoRA {path} does not exist")
    if path.suffix != ".safetensors":
        raise UserError(f"LoRA {path}: only .safetensors files are read (pickled weights are never loaded)")
    with safe_open(str(path), "pt") as f:
        keys = list(f.keys())
    if keys and all(k.startswith(DIFFUSERS_PREFIX) for k in keys):
        return "diffusers"
    if keys and all(k.startswith(COMFY_PREFIX) for k in keys):
        return "comfyui"
    sample = ", ".join(keys[:3])
    raise UserError(f"LoRA {path}: keys are neither diffusers' (transformer.*) nor ComfyUI's (diffusion_model.decoder.*): "
                    f"{sample}")


def _file_of(path: Path) -> Path:
    if path.is_dir():
        for name in ("pytorch_lora_weights.safetensors", "lora.safetensors"):
            if (path / name).is_file():
                return path / name
    return path


def read_lora(path: str | Path) -> LoraWeights:
    """Any of the three formats -> ``LoraWeights`` in diffusers names."""
    path = Path(path)
    kind = detect_format(path)
    if kind == "peft":
        config = json.loads((path / PEFT_CONFIG).read_text())
        raw = load_file(str(path / PEFT_WEIGHTS))
        state = {}
        for key, value in raw.items():
            if not key.startswith(PEFT_PREFIX):
                raise UserError(f"{path / PEFT_WEIGHTS}: unexpected key {key!r} (want {PEFT_PREFIX}...)")
            module, _, rest = key[len(PEFT_PREFIX):].partition(".lora_")
            state[f"{_to_diffusers_module(module)}.lora_{rest}"] = value
        rank = int(config.get("r") or _rank_of(state))
        targets = config.get("target_modules") or ()
        targets = tuple(sorted({_to_diffusers_module(t) for t in ([targets] if isinstance(targets, str) else targets)}))
        weights = LoraWeights(state, rank, float(config.get("lora_alpha", rank)), bool(config.get("use_rslora")), targets)
    elif kind == "diffusers":
        file = _file_of(path)
        raw = load_file(str(file))
        state = {k[len(DIFFUSERS_PREFIX):]: v for k, v in raw.items()}
        with safe_open(str(file), "pt") as f:
            header = f.metadata() or {}
        meta = json.loads(header["lora_adapter_metadata"]) if "lora_adapter_metadata" in header else {}
        meta = {k[len(DIFFUSERS_PREFIX):] if k.startswith(DIFFUSERS_PREFIX) else k: v for k, v in meta.items()}
        rank = int(meta.get("r") or _rank_of(state))
        notes = [] if "lora_alpha" in meta else ["no adapter metadata in the file: alpha taken as the rank (scale 1)"]
        weights = LoraWeights(state, rank, float(meta.get("lora_alpha", rank)), bool(meta.get("use_rslora")),
                              tuple(meta.get("target_modules") or ()) and _targets_of(meta["target_modules"]), notes)
    else:
        raw = load_file(str(_file_of(path)))
        state, alphas = {}, {}
        for key, value in raw.items():
            name = key[len(COMFY_PREFIX):]
            if name.endswith(".alpha"):
                alphas[_to_diffusers_module(name[: -len(".alpha")])] = float(value)
                continue
            match = _LORA_KEY.match(name)
            if match is None:
                raise UserError(f"LoRA {path}: unexpected key {key!r}")
            part = {"down": "A", "up": "B"}.get(match["part"], match["part"])
            state[f"{_to_diffusers_module(match['module'])}.lora_{part}.weight"] = value
        rank = _rank_of(state)
        modules = sorted({k.rsplit(".lora_", 1)[0] for k in state})
        values = {alphas.get(m, float(rank)) for m in modules}
        if len(values) != 1:
            raise UserError(f"LoRA {path}: modules have different alphas {sorted(values)}; only a uniform alpha is supported")
        notes = [] if len(alphas) == len(modules) else ["some modules have no .alpha: scale 1.0 assumed for them"]
        weights = LoraWeights(state, rank, values.pop(), False, (), notes)
    if not weights.state_dict:
        raise UserError(f"LoRA {path} holds no LoRA weights")
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
    path = Path(path)
    files = [path] if path.is_file() else sorted(path.glob("*.safetensors"))
    for file in files:
        with safe_open(str(file), "pt") as f:
            raw = (f.metadata() or {}).get(PROVENANCE_KEY)
        if raw:
            return json.loads(raw)
    return None


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
