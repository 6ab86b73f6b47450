"""ACE-Step v1 LoRA files: read any spelling its users have, write the ones its consumers load.

Module paths are upstream's (``transformer_blocks.0.attn.to_q``, ``lyric_encoder.encoders.0.
self_attn.linear_q``, ``speaker_embedder``), the same in ComfyUI's port of the model.

- **upstream** ``pytorch_lora_weights.safetensors``: bare PEFT keys (``<module>.lora_A.weight`` /
  ``.lora_B.weight``), what upstream's trainer and SimpleTuner save and upstream's ``load_lora``
  reads (diffusers ``load_lora_adapter(prefix=None)``). Neither reader honours a trained alpha
  reliably: old diffusers ignores it (scale 1), newer diffusers reads it from the header but PEFT's
  ``set_scale`` then drops rsLoRA. So we write the trained scale **baked into** A and B (each times
  sqrt(scale)) with a header config of alpha = rank: every reader applies scale 1 and gets what
  training saw. Our own header entry keeps the trained rank, alpha and rsLoRA flag.
- **comfyui**: ``diffusion_model.<module>.lora_A/B.weight`` as trained plus ``<module>.alpha`` =
  scale x rank, so ComfyUI (strength x alpha / rank) applies the trained scale at strength 1.0,
  where upstream's own files need strength alpha/sqrt(rank).

Reading accepts both, bare or ``diffusion_model.`` / ``transformer.`` / ``base_model.model.``
prefixes, ``lora_up/lora_down`` names, and derives the scale from (in order) our header entry, a
ComfyUI ``.alpha``, the diffusers header config, else 1.0 (what upstream's loader applies).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ...errors import UserError
from ..common import json_table, safetensors_header

UPSTREAM_FILE = "pytorch_lora_weights.safetensors"
OURS_KEY = "acedist_lora"  # header: the trained rank / alpha / rsLoRA and the baked factor
PROVENANCE_KEY = "acedist"  # header: which model family a LoRA was trained on
DIFFUSERS_METADATA_KEY = "lora_adapter_metadata"  # diffusers' header entry: the LoraConfig
COMFY_PREFIX = "diffusion_model."
_PREFIXES = ("diffusion_model.", "transformer.", "base_model.model.")


@dataclass
class LoraWeights:
    """An adapter: ``state`` maps ``<module>.lora_A.weight`` / ``.lora_B.weight`` (unscaled, as
    PEFT holds them) for each adapted module; its effect is ``scale * B @ A``."""

    state: dict[str, torch.Tensor]
    rank: int
    alpha: float
    use_rslora: bool = False

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)

    @property
    def modules(self) -> list[str]:
        return sorted({key.rsplit(".lora_", 1)[0] for key in self.state})

    @property
    def targets(self) -> tuple[str, ...]:
        """The module names adapted (``to_q``, ``to_out.0``, ``linear_q``, ``speaker_embedder``, ...)."""
        names = []
        for module in self.modules:
            parts = module.split(".")
            names.append(".".join(parts[-2:]) if parts[-1].isdigit() and len(parts) > 1 else parts[-1])
        return tuple(dict.fromkeys(names))

    @classmethod
    def from_peft(cls, state: dict[str, torch.Tensor], rank: int, alpha: float, use_rslora: bool) -> "LoraWeights":
        return cls({k: v for k, v in state.items() if ".lora_" in k}, rank, alpha, use_rslora)

    def peft_state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.state)

    def rescaled(self, rank: int, alpha: float, use_rslora: bool) -> "LoraWeights":
        """The same adapter (same ``scale * B @ A``) under another alpha / rsLoRA setting."""
        target = LoraWeights({}, rank, alpha, use_rslora)
        factor = math.sqrt(self.scale / target.scale)
        target.state = {k: v * factor for k, v in self.state.items()}
        return target


# ----------------------------------------------------------------------------------- reading
def _weights_file(path: Path) -> Path:
    if path.is_dir():
        candidates = [path / UPSTREAM_FILE] + sorted(p for p in path.glob("*.safetensors") if p.name != LYRIC_ENCODER_FILE)
        for candidate in candidates:
            if candidate.is_file():
                return candidate
        raise UserError(f"LoRA folder {path} holds no {UPSTREAM_FILE} (nor any .safetensors file)")
    if not path.is_file():
        raise UserError(f"LoRA {path}: no such file or folder")
    return path


def read_provenance(path: str | Path) -> dict | None:
    raw = safetensors_header(_weights_file(Path(path))).get(PROVENANCE_KEY)
    return json_table(raw, f"LoRA {path}: its {PROVENANCE_KEY!r} header entry") if raw else None


def _canonical(key: str) -> str:
    for prefix in _PREFIXES:
        if key.startswith(prefix):
            key = key[len(prefix):]
            break
    return (key.replace(".lora_down.weight", ".lora_A.weight").replace(".lora_up.weight", ".lora_B.weight")
            .replace(".default.weight", ".weight"))


def read_lora(path: str | Path) -> LoraWeights:
    """Any supported spelling -> unscaled weights with the rank, alpha and rsLoRA flag they carry."""
    file = _weights_file(Path(path))
    header = safetensors_header(file)
    try:
        raw = load_file(str(file))
    except (SafetensorError, OSError) as error:
        raise UserError(f"LoRA {file}: cannot read its tensors (truncated or corrupt?): {error}") from None
    alphas = {_canonical(k)[: -len(".alpha")]: float(v) for k, v in raw.items() if k.endswith(".alpha")}
    state = {}
    for key, tensor in raw.items():
        if key.endswith(".alpha"):
            continue
        name = _canonical(key)
        if not name.endswith((".lora_A.weight", ".lora_B.weight")):
            raise UserError(f"LoRA {file}: {key!r} is not a LoRA weight (lora_A / lora_B / lora_down / lora_up)")
        state[name] = tensor.float()
    if not state:
        raise UserError(f"LoRA {file} holds no LoRA weights")
    ranks = {v.shape[0] for k, v in state.items() if k.endswith(".lora_A.weight")}
    if len(ranks) != 1:
        raise UserError(f"LoRA {file}: its modules have different ranks ({sorted(ranks)}); one rank is supported")
    rank = ranks.pop()
    for module in {k.rsplit(".lora_", 1)[0] for k in state}:
        if f"{module}.lora_A.weight" not in state or f"{module}.lora_B.weight" not in state:
            raise UserError(f"LoRA {file}: module {module!r} lacks its lora_A or lora_B weight")
    if OURS_KEY in header:
        ours = json_table(header[OURS_KEY], f"LoRA {file}: its {OURS_KEY!r} header entry")
        weights = LoraWeights(state, rank, float(ours["alpha"]), bool(ours["use_rslora"]))
        baked = float(ours.get("baked", 1.0))
        weights.state = {k: v / math.sqrt(baked) for k, v in state.items()}
        return weights
    if alphas:
        values = set(alphas.values())
        if len(values) != 1:
            raise UserError(f"LoRA {file}: its modules have different alphas ({sorted(values)}); one is supported")
        return LoraWeights(state, rank, values.pop(), False)
    if DIFFUSERS_METADATA_KEY in header:
        config = json_table(header[DIFFUSERS_METADATA_KEY], f"LoRA {file}: its {DIFFUSERS_METADATA_KEY!r} header entry")
        return LoraWeights(state, rank, float(config.get("lora_alpha", rank)), bool(config.get("use_rslora", False)))
    return LoraWeights(state, rank, float(rank), False)  # what upstream's loader applies: scale 1


def check_fits(weights: LoraWeights, transformer: torch.nn.Module, source: str | Path) -> None:
    """Every adapted module must exist in this DiT as a Linear of the adapter's widths; a family
    recorded in the file must be ACE-Step v1."""
    provenance = read_provenance(source)
    if provenance and provenance.get("family") not in (None, "ace-step-v1"):
        raise UserError(f"LoRA {source} was trained on the model family {provenance['family']!r}, not ACE-Step v1")
    modules = dict(transformer.named_modules())
    for module_name in weights.modules:
        module = modules.get(module_name)
        if not isinstance(module, torch.nn.Linear):
            raise UserError(f"LoRA {source} adapts {module_name!r}, which this ACE-Step v1 DiT lacks "
                            f"(another model's LoRA?)")
        a, b = weights.state[f"{module_name}.lora_A.weight"], weights.state[f"{module_name}.lora_B.weight"]
        if a.shape[1] != module.in_features or b.shape[0] != module.out_features:
            raise UserError(f"LoRA {source}: {module_name} is {b.shape[0]}x{a.shape[1]}, this DiT's is "
                            f"{module.out_features}x{module.in_features} (a LoRA of another model size)")


def check_init_lora(weights: LoraWeights, config, targets: Sequence[str], transformer: torch.nn.Module) -> None:
    """``init_lora`` must have the run's rank and adapt only the preset's modules (its scale is
    converted to the run's alpha: the adapter's effect is kept)."""
    problems = []
    if weights.rank != config.lora_rank:
        problems.append(f"rank {weights.rank} (lora_rank is {config.lora_rank})")
    extra = set(weights.targets) - set(targets)
    if extra:
        problems.append(f"targets {sorted(extra)} outside lora_preset {config.lora_preset!r} ({', '.join(targets)})")
    if problems:
        raise UserError(f"init_lora {config.init_lora} does not fit this run: " + "; ".join(problems))
    check_fits(weights, transformer, config.init_lora)


def load_init_lora(config, targets: Sequence[str], transformer: torch.nn.Module) -> LoraWeights:
    """``init_lora`` read, checked and expressed in the run's alpha / rsLoRA setting."""
    weights = read_lora(config.init_lora)
    check_init_lora(weights, config, targets, transformer)
    return weights.rescaled(config.lora_rank, config.lora_alpha, config.use_rslora)


# ----------------------------------------------------------------------------------- writing
def _save(state: dict[str, torch.Tensor], file: Path, header: dict[str, str]) -> Path:
    file.parent.mkdir(parents=True, exist_ok=True)
    temporary = file.with_name(file.name + ".partial")
    save_file({k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state.items()}, str(temporary),
              metadata={"format": "pt", **header})
    temporary.replace(file)
    return file


def _ours(weights: LoraWeights, baked: float) -> str:
    return json.dumps({"rank": weights.rank, "alpha": weights.alpha, "use_rslora": weights.use_rslora,
                       "targets": list(weights.targets), "baked": baked})


def write_upstream(weights: LoraWeights, file: Path, provenance: dict | None = None) -> Path:
    """Upstream's ``pytorch_lora_weights.safetensors`` with the trained scale baked in (see above)."""
    factor = math.sqrt(weights.scale)
    config = {"r": weights.rank, "lora_alpha": weights.rank, "use_rslora": False,
              "target_modules": list(weights.targets), "lora_dropout": 0.0, "bias": "none"}
    header = {DIFFUSERS_METADATA_KEY: json.dumps(config), OURS_KEY: _ours(weights, weights.scale)}
    if provenance:
        header[PROVENANCE_KEY] = json.dumps(provenance, sort_keys=True)
    return _save({k: v * factor for k, v in weights.state.items()}, file, header)


def write_comfyui(weights: LoraWeights, file: Path, provenance: dict | None = None) -> Path:
    """ComfyUI's keys: ``diffusion_model.<module>.lora_A/B.weight`` + ``.alpha`` = scale x rank."""
    state = {COMFY_PREFIX + k: v for k, v in weights.state.items()}
    for module in weights.modules:
        state[f"{COMFY_PREFIX}{module}.alpha"] = torch.tensor(weights.scale * weights.rank)
    header = {OURS_KEY: _ours(weights, 1.0)}
    if provenance:
        header[PROVENANCE_KEY] = json.dumps(provenance, sort_keys=True)
    return _save(state, file, header)


# ------------------------------------------------------------------------------ generation
LYRIC_ENCODER_FILE = "lyric_encoder.safetensors"  # a run's fully trained lyric parts (lyrics_embedder_train)


def load_lyric_encoder(transformer: torch.nn.Module, file: Path) -> None:
    """The lyric embedding / Conformer / projection weights of ``file`` into ``transformer``."""
    try:
        state = load_file(str(file))
    except (SafetensorError, OSError) as error:
        raise UserError(f"{file}: cannot read the trained lyric encoder (truncated or corrupt?): {error}") from None
    own = transformer.state_dict()
    wrong = [k for k, v in state.items() if k not in own or own[k].shape != v.shape]
    if not state or wrong or not all(k.startswith(("lyric_embs.", "lyric_encoder.", "lyric_proj.")) for k in state):
        raise UserError(f"{file} is not a lyric encoder of this ACE-Step v1 DiT (keys {wrong[:3] or 'none'} do not fit)")
    transformer.load_state_dict(state, strict=False)


def load_lora_into(transformer: torch.nn.Module, path: str | Path, scale: float = 1.0,
                   adapter_name: str = "generate") -> LoraWeights:
    """Add the LoRA at ``path`` to ``transformer`` applying ``scale`` x its trained scale, and the
    trained lyric encoder saved beside it, if any."""
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict

    weights = read_lora(path)
    check_fits(weights, transformer, path)
    lyric_file = _weights_file(Path(path)).parent / LYRIC_ENCODER_FILE
    if lyric_file.is_file():
        load_lyric_encoder(transformer, lyric_file)
    factor = math.sqrt(abs(weights.scale * scale))
    sign = -1.0 if weights.scale * scale < 0 else 1.0
    state = {k: v * factor * (sign if k.endswith(".lora_B.weight") else 1.0) for k, v in weights.state.items()}
    config = LoraConfig(r=weights.rank, lora_alpha=weights.rank, target_modules=weights.modules, lora_dropout=0.0)
    inject_adapter_in_model(config, transformer, adapter_name=adapter_name)
    set_peft_model_state_dict(transformer, state, adapter_name=adapter_name)
    return weights
