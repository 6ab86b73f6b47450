"""ACE-Step v1 adapter files (LoRA, DoRA, LoKr, LoHa): read any spelling its users have, write the
ones its consumers load.

Module paths are upstream's (``transformer_blocks.0.attn.to_q``, ``lyric_encoder.encoders.0.
self_attn.linear_q``, ``speaker_embedder``), the same in ComfyUI's port of the model.

- **upstream** ``pytorch_lora_weights.safetensors``: bare peft keys (``<module>.lora_A.weight`` /
  ``.lora_B.weight``, DoRA's ``.lora_magnitude_vector``), what upstream's trainer and SimpleTuner
  save and upstream's ``load_lora`` reads (diffusers ``load_lora_adapter(prefix=None)``). Neither
  reader honours a trained alpha reliably: old diffusers ignores it (scale 1), newer diffusers
  reads it from the header but peft's ``set_scale`` then drops rsLoRA. So we write the trained
  scale **baked into** the tensors with a header config of alpha = rank: every reader applies
  scale 1 and gets what training saw. Our own header entry keeps the trained spec. A run's LoKr /
  LoHa is kept in the same spelling (``<module>.lokr_w1`` ...); no upstream code loads those.
- **comfyui**: ``diffusion_model.<module>.<part>`` in LyCORIS's spelling with an ``alpha`` per
  module (``adapters.to_comfyui``), so ComfyUI applies the trained scale at strength 1.0, where
  upstream's own files need strength alpha/sqrt(rank).

Reading accepts both, bare or ``diffusion_model.`` / ``transformer.`` / ``base_model.model.``
prefixes and LyCORIS's part names, and takes the scale from (in order) ComfyUI-style ``alpha``
tensors, the diffusers header config, else 1.0 (what upstream's loader applies); our header entry
then restores the trained alpha (the change the adapter makes stays the same).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ...errors import UserError
from ..adapters import (ALPHA, PEFT_TYPES, AdapterSpec, AdapterWeights, check_init_adapter, fit_problem, from_lycoris,
                        from_peft, split_key, to_comfyui)
from ..common import json_table, safetensors_header

UPSTREAM_FILE = "pytorch_lora_weights.safetensors"
OURS_KEY = "acedist_lora"  # header: the trained adapter spec and its targets
PROVENANCE_KEY = "acedist"  # header: which model family a LoRA was trained on
DIFFUSERS_METADATA_KEY = "lora_adapter_metadata"  # diffusers' header entry: the peft config
COMFY_PREFIX = "diffusion_model."
_PREFIXES = ("diffusion_model.", "transformer.", "base_model.model.")


def targets_of(modules: Sequence[str]) -> tuple[str, ...]:
    """The module names adapted (``to_q``, ``to_out.0``, ``linear_q``, ``speaker_embedder``, ...)."""
    names = []
    for module in modules:
        parts = module.split(".")
        names.append(".".join(parts[-2:]) if parts[-1].isdigit() and len(parts) > 1 else parts[-1])
    return tuple(dict.fromkeys(names))


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


def _unprefixed(key: str) -> str:
    for prefix in _PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix):]
    return key


def read_lora(path: str | Path) -> AdapterWeights:
    """Any supported spelling -> the adapter with the spec it was trained with (or, for a foreign
    file, the scale its consumers apply)."""
    file = _weights_file(Path(path))
    where = f"LoRA {file}"
    header = safetensors_header(file)
    try:
        raw = load_file(str(file))
    except (SafetensorError, OSError) as error:
        raise UserError(f"{where}: cannot read its tensors (truncated or corrupt?): {error}") from None
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in raw.items():
        split = split_key(_unprefixed(key))
        if split is None:
            raise UserError(f"{where}: {key!r} is not an adapter weight (LoRA, DoRA, LoKr or LoHa parts)")
        module, part = split
        if part in modules.setdefault(module, {}):
            raise UserError(f"{where}: {module} has its {part} twice (in two spellings)")
        modules[module][part] = tensor
    if not modules:
        raise UserError(f"{where} holds no LoRA weights")
    ours = None
    if OURS_KEY in header:
        table = json_table(header[OURS_KEY], f"{where}: its {OURS_KEY!r} header entry")
        ours = AdapterSpec.from_json(table, f"{where}: its {OURS_KEY!r} header entry")
    if any(ALPHA in parts for parts in modules.values()) or DIFFUSERS_METADATA_KEY not in header:
        weights = from_lycoris(modules, where, spec_hint=ours)
    else:
        config = json_table(header[DIFFUSERS_METADATA_KEY], f"{where}: its {DIFFUSERS_METADATA_KEY!r} header entry")
        spec = AdapterSpec.from_peft_json(config, f"{where}: its {DIFFUSERS_METADATA_KEY!r} header entry")
        weights = from_peft(spec, modules, where)
    if ours is not None:  # the trained spec (the file may carry it baked in or in ComfyUI's alphas)
        if ours.kind != weights.spec.kind:
            raise UserError(f"{where}: its header says {ours.name}, its tensors are a {weights.spec.name}")
        weights = weights.converted(ours)
    weights.targets = targets_of(weights.modules)
    return weights


def check_fits(weights: AdapterWeights, transformer: torch.nn.Module, source: str | Path) -> None:
    """Every adapted module must exist in this DiT as a Linear, with the tensors peft builds for
    the adapter's spec there; a family recorded in the file must be ACE-Step v1."""
    provenance = read_provenance(source)
    if provenance and provenance.get("family") not in (None, "ace-step-v1"):
        raise UserError(f"LoRA {source} was trained on the model family {provenance['family']!r}, not ACE-Step v1")
    modules = dict(transformer.named_modules())
    for module_name in weights.modules:
        module = modules.get(module_name)
        if not isinstance(module, torch.nn.Linear):
            raise UserError(f"LoRA {source} adapts {module_name!r}, which this ACE-Step v1 DiT lacks "
                            f"(another model's LoRA?)")
        problem = fit_problem(weights, module_name, module.out_features, module.in_features)
        if problem:
            raise UserError(f"LoRA {source}: {module_name}: {problem}")


def check_init_lora(weights: AdapterWeights, config, targets: Sequence[str], transformer: torch.nn.Module) -> None:
    check_fits(weights, transformer, config.init_lora)
    check_init_adapter(weights, config, targets, transformer, f"init_lora {config.init_lora}")


def load_init_lora(config, targets: Sequence[str], transformer: torch.nn.Module) -> AdapterWeights:
    """``init_lora`` read, checked and expressed in the run's spec (its alpha / rsLoRA setting)."""
    weights = read_lora(config.init_lora)
    check_init_lora(weights, config, targets, transformer)
    return weights.converted(AdapterSpec.from_config(config))


# ----------------------------------------------------------------------------------- writing
def _save(state: dict[str, torch.Tensor], file: Path, header: dict[str, str]) -> Path:
    file.parent.mkdir(parents=True, exist_ok=True)
    temporary = file.with_name(file.name + ".partial")
    save_file({k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state.items()}, str(temporary),
              metadata={"format": "pt", **header})
    temporary.replace(file)
    return file


def _header(weights: AdapterWeights, provenance: dict | None) -> dict[str, str]:
    header = {OURS_KEY: json.dumps({**weights.spec.to_json(), "targets": list(weights.targets)})}
    if provenance:
        header[PROVENANCE_KEY] = json.dumps(provenance, sort_keys=True)
    return header


def peft_metadata(spec: AdapterSpec, targets: Sequence[str]) -> dict:
    """diffusers' ``lora_adapter_metadata``: the peft config of ``spec``."""
    if spec.kind in ("lora", "dora"):
        return {"r": spec.rank, "lora_alpha": spec.alpha, "use_rslora": spec.use_rslora, "use_dora": spec.kind == "dora",
                "target_modules": list(targets), "lora_dropout": 0.0, "bias": "none"}
    config = {"peft_type": PEFT_TYPES[spec.kind], "r": spec.rank, "alpha": spec.alpha, "target_modules": list(targets)}
    if spec.kind == "lokr":
        config.update(decompose_both=spec.decompose_both, decompose_factor=spec.decompose_factor)
    return config


def write_upstream(weights: AdapterWeights, file: Path, provenance: dict | None = None) -> Path:
    """Upstream's ``pytorch_lora_weights.safetensors`` with the trained scale baked in (see above)."""
    baked = weights.baked()
    header = {DIFFUSERS_METADATA_KEY: json.dumps(peft_metadata(baked.spec, weights.targets)),
              **_header(weights, provenance)}
    return _save(baked.state, file, header)


def write_comfyui(weights: AdapterWeights, file: Path, provenance: dict | None = None) -> Path:
    """ComfyUI's keys: ``diffusion_model.<module>.<part>`` in LyCORIS's spelling, ``alpha`` per module."""
    state = {f"{COMFY_PREFIX}{module}.{part}": tensor
             for module, parts in to_comfyui(weights).items() for part, tensor in parts.items()}
    return _save(state, file, _header(weights, provenance))


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
                   adapter_name: str = "generate") -> AdapterWeights:
    """Add the adapter at ``path`` to ``transformer`` applying ``scale`` x its trained scale, and the
    trained lyric encoder saved beside it, if any."""
    from peft import inject_adapter_in_model, set_peft_model_state_dict

    weights = read_lora(path)
    check_fits(weights, transformer, path)
    lyric_file = _weights_file(Path(path)).parent / LYRIC_ENCODER_FILE
    if lyric_file.is_file():
        load_lyric_encoder(transformer, lyric_file)
    baked = weights.baked(scale)  # scale 1 in peft's config: the tensors carry it (negative scales too)
    inject_adapter_in_model(baked.spec.peft_config(baked.modules), transformer, adapter_name=adapter_name)
    set_peft_model_state_dict(transformer, baked.state, adapter_name=adapter_name)
    return weights
