"""ACE-Step 1.5 adapter files (LoRA, DoRA, LoKr, LoHa) in the spellings its consumers load
(REFERENCE.md, "LoRA file formats"), read and written.

Inside the toolkit an adapter is an ``adapters.AdapterWeights`` in diffusers' module names
(``layers.0.self_attn.to_q``) with peft's part names.

- diffusers (LoRA, DoRA): one safetensors file, keys ``transformer.<module>.<part>``, the peft
  config in the header (``lora_adapter_metadata``), as ``AceStepPipeline.save_lora_weights`` writes.
  A run keeps its LoKr / LoHa in the same layout (diffusers' loader builds LoRA layers only).
- peft (upstream ACE-Step 1.5's adapter folder; any kind): ``adapter_config.json`` +
  ``adapter_model.safetensors``, keys ``base_model.model.<upstream module>.<part>``.
- ComfyUI (any kind): one file, keys ``diffusion_model.decoder.<upstream module>.<part>`` in
  LyCORIS's spelling with an ``alpha`` per module.
- LyCORIS (LoKr: upstream 1.5's LoKr trainer and loader): ``lokr_weights.safetensors``, keys
  ``lycoris_<upstream module, . as _>.<part>`` and ``alpha``, the ``lokr_config`` header entry
  upstream's loader rebuilds the layers from.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from ...errors import UserError
from ..adapters import (ALPHA, DORA_MAGNITUDE, PEFT_TYPES, AdapterSpec, AdapterWeights, fit_problem, from_lycoris, from_peft, split_key,
                        to_comfyui, to_lycoris)
from ..common import json_table, safetensors_header
from .keymap import ATTENTION_RENAMES, _rename, _unrename

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
LYCORIS_WEIGHTS = "lokr_weights.safetensors"  # upstream 1.5's LoKr file name
DIFFUSERS_PREFIX = "transformer."
PEFT_PREFIX = "base_model.model."
COMFY_PREFIX = "diffusion_model.decoder."
LYCORIS_PREFIX = "lycoris_"
FORMATS = ("diffusers", "peft", "comfyui", "lycoris")
OURS_KEY = "acedist_adapter"  # header: the trained spec, where the format has no peft config
DIFFUSERS_METADATA_KEY = "lora_adapter_metadata"
LOKR_CONFIG_KEY = "lokr_config"  # upstream 1.5's header entry (its LoKRConfig)
# upstream 1.5's DiT module names, for LyCORIS's names (dots made underscores): name parts that
# contain an underscore themselves, longest first
_LYCORIS_PARTS = re.compile(r"(condition_embedder|time_embed_r|time_embed|time_proj|self_attn|cross_attn|"
                            r"[qkvo]_proj|gate_proj|up_proj|down_proj|proj_in|proj_out|linear_\d+|[a-z]+|\d+)(?:_|$)")


def targets_of(modules) -> tuple[str, ...]:
    found = set()
    for module in modules:
        found.add("to_out.0" if module.endswith("to_out.0") else module.rsplit(".", 1)[-1])
    return tuple(sorted(found))


def _to_diffusers_module(upstream_module: str) -> str:
    return _rename("." + upstream_module + ".", ATTENTION_RENAMES).strip(".")


def _to_upstream_module(module: str) -> str:
    return _unrename("." + module + ".", ATTENTION_RENAMES).strip(".")


def _from_lycoris_name(name: str, where: str) -> str:
    """``layers_0_self_attn_q_proj`` -> ``layers.0.self_attn.q_proj`` (upstream's name)."""
    parts, position = [], 0
    while position < len(name):
        match = _LYCORIS_PARTS.match(name, position)
        if match is None:
            raise UserError(f"{where}: {LYCORIS_PREFIX}{name} does not name a module of the ACE-Step 1.5 DiT")
        parts.append(match.group(1))
        position = match.end()
    return ".".join(parts)


def peft_config_json(spec: AdapterSpec, targets) -> dict:
    """peft's adapter config of ``spec`` (what ``adapter_config.json`` and diffusers' header hold)."""
    table = {"r": spec.rank, "target_modules": sorted(targets), "bias": "none"}
    if spec.kind in ("lora", "dora"):
        table.update(lora_alpha=spec.alpha, use_rslora=spec.use_rslora, use_dora=spec.kind == "dora",
                     lora_dropout=0.0, init_lora_weights=True)
    else:
        table.update(alpha=spec.alpha, rank_dropout=0.0, module_dropout=0.0, init_weights=True)
        if spec.kind == "lokr":
            table.update(decompose_both=spec.decompose_both, decompose_factor=spec.decompose_factor)
    return table


# ------------------------------------------------------------------ reading
WEIGHT_FILES = ("pytorch_lora_weights.safetensors", "lora.safetensors")  # diffusers' name, a training run's
_PREFIXES = {"diffusers": DIFFUSERS_PREFIX, "peft": PEFT_PREFIX, "comfyui": COMFY_PREFIX, "lycoris": LYCORIS_PREFIX}


def _weights_file(path: Path) -> Path:
    """The safetensors file an adapter argument names: the file itself, or the one in its folder."""
    if path.is_dir():
        for name in (PEFT_WEIGHTS, LYCORIS_WEIGHTS, *WEIGHT_FILES):
            if (path / name).is_file():
                return path / name
        raise UserError(f"{path}: a LoRA folder needs {PEFT_CONFIG} + {PEFT_WEIGHTS} (PEFT), {LYCORIS_WEIGHTS} "
                        f"(LyCORIS) or a .safetensors file ({', '.join(WEIGHT_FILES)})")
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
    raise UserError(f"LoRA {file}: not a LoRA of the ACE-Step DiT (nor a DoRA, LoKr or LoHa): its keys are not all diffusers' "
                    f"({DIFFUSERS_PREFIX}*), PEFT's ({PEFT_PREFIX}*), ComfyUI's ({COMFY_PREFIX}*) or LyCORIS's "
                    f"({LYCORIS_PREFIX}*): {sample}")


def _modules(tensors: dict[str, torch.Tensor], kind: str, file: Path) -> dict[str, dict[str, torch.Tensor]]:
    """module (diffusers' name) -> its parts (peft's part names, ``alpha``)."""
    prefix, where = _PREFIXES[kind], f"LoRA {file}"
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        name = key[len(prefix):]
        if kind == "lycoris":  # lycoris_<module with _>.<part>: the module name has no dots
            module_name, _, part_name = name.partition(".")
            split = (module_name, split_key("x." + part_name)[1]) if split_key("x." + part_name) else None
        else:
            split = split_key(name)
        if split is None:
            raise UserError(f"{where}: {key!r} is not a LoRA matrix (nor a part of a DoRA, LoKr or LoHa): "
                            f"not an adapter file, or one with other weights in it")
        module, part = split
        if kind == "lycoris":
            module = _to_diffusers_module(_from_lycoris_name(module, where))
        elif kind != "diffusers":
            module = _to_diffusers_module(module)
        if part in modules.setdefault(module, {}):
            raise UserError(f"{where}: {module} has its {part} twice (in two spellings)")
        modules[module][part] = value
    return modules


def _upstream_lokr_spec(header: dict, where: str) -> AdapterSpec | None:
    """The spec of upstream 1.5's ``lokr_config`` header entry (its LoKRConfig), if there is one."""
    if not header.get(LOKR_CONFIG_KEY):
        return None
    table = json_table(header[LOKR_CONFIG_KEY], f"{where}: its {LOKR_CONFIG_KEY!r} header entry")
    try:
        return AdapterSpec("lokr", int(table.get("linear_dim", 64)), float(table.get("linear_alpha", 128)), False,
                           bool(table.get("decompose_both", False)), int(table.get("factor", -1)))
    except (TypeError, ValueError) as error:
        raise UserError(f"{where}: its {LOKR_CONFIG_KEY!r} header entry is not a LoKr config ({error})") from None


def detect_format(path: str | Path) -> str:
    """``diffusers``, ``peft``, ``comfyui`` or ``lycoris``: how the adapter ``path`` names is spelled."""
    file = _weights_file(Path(path))
    return _format_of(_read_safetensors(file)[0].keys(), file)


def read_lora(path: str | Path) -> AdapterWeights:
    """Any of the four formats -> ``AdapterWeights`` in diffusers' module names, with the spec it
    was trained with (ours) or the scale its consumers apply (a foreign file). ``path`` is a file, a
    PEFT folder, PEFT's ``adapter_model.safetensors`` itself (its ``adapter_config.json`` beside it),
    or a folder holding one file. Anything else is refused, naming the file and why."""
    file = _weights_file(Path(path))
    where = f"LoRA {file}"
    tensors, header = _read_safetensors(file)
    kind = _format_of(tensors.keys(), file)
    modules = _modules(tensors, kind, file)
    ours = None
    if header.get(OURS_KEY):
        ours = AdapterSpec.from_json(json_table(header[OURS_KEY], f"{where}: its {OURS_KEY!r} header entry"),
                                     f"{where}: its {OURS_KEY!r} header entry")
    notes: list[str] = []
    targets = ()
    if kind == "peft":
        config_file = file.parent / PEFT_CONFIG
        if not config_file.is_file():
            raise UserError(f"LoRA {file}: PEFT weights need their {PEFT_CONFIG} (rank, alpha) beside them")
        try:
            config = json_table(config_file.read_text(encoding="utf-8"), f"LoRA config {config_file}")
        except (OSError, UnicodeDecodeError) as error:
            raise UserError(f"LoRA config {config_file}: unreadable ({error})") from None
        weights = from_peft(AdapterSpec.from_peft_json(config, f"LoRA config {config_file}"), modules, where)
        listed = config.get("target_modules") or ()
        targets = tuple(sorted({_to_diffusers_module(t) for t in ([listed] if isinstance(listed, str) else listed)}))
    elif kind == "diffusers" and DIFFUSERS_METADATA_KEY in header:
        meta = json_table(header[DIFFUSERS_METADATA_KEY], f"{where}: its {DIFFUSERS_METADATA_KEY} header entry")
        meta = {k[len(DIFFUSERS_PREFIX):] if k.startswith(DIFFUSERS_PREFIX) else k: v for k, v in meta.items()}
        weights = from_peft(AdapterSpec.from_peft_json(meta, f"{where}: its {DIFFUSERS_METADATA_KEY} header entry"),
                                modules, where)
        targets = tuple(meta.get("target_modules") or ()) and targets_of(meta["target_modules"])
    else:
        hint = ours or _upstream_lokr_spec(header, where)
        if kind == "lycoris":
            # upstream's LoKr trainer saves every Linear of the DiT; the ones it did not train change nothing
            # (LyCORIS starts one factor at zero: a product with an all-zero factor is no change; a
            # DoRA's magnitude changes the weight even then)
            untouched = [m for m, parts in modules.items() if DORA_MAGNITUDE not in parts and any(
                float(t.abs().max()) == 0 for name, t in parts.items() if name != ALPHA)]
            for module in untouched:
                del modules[module]
            if untouched:
                notes.append(f"{len(untouched)} modules whose adapter changes nothing were left out")
        weights = from_lycoris(modules, where, spec_hint=hint)
        notes += weights.notes
        if kind == "diffusers":
            notes.append("no adapter config in the file: alpha taken as the rank (scale 1)")
    if ours is not None:  # the trained spec (ComfyUI's alphas, a baked scale: the same change)
        if ours.kind != weights.spec.kind:
            raise UserError(f"{where}: its header says {ours.name}, its tensors are a {weights.spec.name}")
        weights = weights.converted(ours)
    weights.targets = targets or targets_of(weights.modules)
    weights.notes = sorted(set(notes))
    return weights


# ------------------------------------------------------------------ writing
def _ours_header(weights: AdapterWeights) -> dict[str, str]:
    return {OURS_KEY: json.dumps({**weights.spec.to_json(), "targets": list(weights.targets)})}


def write_diffusers(weights: AdapterWeights, out: str | Path) -> Path:
    """One file that ``AceStepPipeline.load_lora_weights`` loads at scale 1 with the trained alpha
    (a LoRA or DoRA; a LoKr / LoHa in the same layout is what a run keeps)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config = peft_config_json(weights.spec, weights.targets)
    if weights.spec.kind in ("lora", "dora"):
        from diffusers import AceStepPipeline

        AceStepPipeline.save_lora_weights(
            str(out), transformer_lora_layers={k: v.contiguous() for k, v in weights.state.items()},
            transformer_lora_adapter_metadata=config, safe_serialization=True,
        )
    else:
        meta = json.dumps({f"{DIFFUSERS_PREFIX}{k}": v for k, v in {**config, "peft_type": weights.spec.kind.upper()}.items()})
        save_file({DIFFUSERS_PREFIX + k: v.contiguous() for k, v in weights.state.items()},
                  str(out / "pytorch_lora_weights.safetensors"), metadata={"format": "pt", DIFFUSERS_METADATA_KEY: meta})
    return out / "pytorch_lora_weights.safetensors"


def write_peft(weights: AdapterWeights, out: str | Path) -> Path:
    """Upstream's folder: ``PeftModel.from_pretrained(model.decoder, out)`` loads it (any kind)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    state = {}
    for key, value in weights.state.items():
        module, part = split_key(key)
        state[f"{PEFT_PREFIX}{_to_upstream_module(module)}.{part}"] = value.contiguous()
    save_file(state, str(out / PEFT_WEIGHTS), metadata={"format": "pt"})
    targets = sorted({_to_upstream_module(t) for t in weights.targets})
    config = {**peft_config_json(weights.spec, targets), "peft_type": PEFT_TYPES[weights.spec.kind],
              "task_type": None, "base_model_name_or_path": None, "inference_mode": True, "fan_in_fan_out": False}
    (out / PEFT_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return out


def write_comfyui(weights: AdapterWeights, out: str | Path) -> Path:
    """One file in LyCORIS's spelling with an ``alpha`` per module (ComfyUI scales by alpha / rank,
    so rsLoRA's alpha / sqrt(rank) is folded into the stored alpha)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    state = {f"{COMFY_PREFIX}{_to_upstream_module(module)}.{part}": tensor.contiguous()
             for module, parts in to_comfyui(weights).items() for part, tensor in parts.items()}
    save_file(state, str(out), metadata={"format": "pt", **_ours_header(weights)})
    return out


def write_lycoris(weights: AdapterWeights, out: str | Path) -> Path:
    """Upstream 1.5's LoKr folder: ``lokr_weights.safetensors`` with its ``lokr_config``, which its
    loader (LyCORIS ``create_lycoris`` + ``load_weights``) rebuilds the same layers from."""
    from peft.tuners.lokr.layer import factorization

    spec = weights.spec
    if spec.kind != "lokr":
        raise UserError(f"the LyCORIS file upstream ACE-Step 1.5 loads holds a LoKr, not a {spec.name}")
    for module in weights.modules:
        out_features, in_features = weights.shape(module)
        for width in (out_features, in_features):
            small, large = factorization(width, spec.decompose_factor)
            if small > large:  # LyCORIS orders the pair the other way: its layers would not fit
                raise UserError(f"lokr_factor {spec.decompose_factor} splits width {width} as {small} x {large}; "
                                f"LyCORIS (upstream 1.5's LoKr loader) needs the smaller factor first: use a "
                                f"lokr_factor of at most sqrt({width}), or -1")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    state = {f"{LYCORIS_PREFIX}{_to_upstream_module(module).replace('.', '_')}.{part}": tensor.contiguous()
             for module, parts in to_lycoris(weights).items() for part, tensor in parts.items()}
    targets = sorted({_to_upstream_module(t) for t in weights.targets})
    config = {"linear_dim": spec.rank, "linear_alpha": spec.alpha, "factor": spec.decompose_factor,
              "decompose_both": spec.decompose_both, "use_tucker": False, "use_scalar": False,
              "weight_decompose": False, "full_matrix": False, "bypass_mode": False, "rs_lora": False,
              "unbalanced_factorization": False, "target_modules": targets}
    save_file(state, str(out / LYCORIS_WEIGHTS), metadata={
        "format": "pt", "algo": "lokr", LOKR_CONFIG_KEY: json.dumps(config), **_ours_header(weights)})
    return out / LYCORIS_WEIGHTS


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




def check_fits(weights: AdapterWeights, transformer: torch.nn.Module, variant: str, source: str | Path) -> None:
    """Every adapted module must exist in this DiT as a Linear holding the tensors peft builds for
    the adapter there; a variant recorded in the file must be this model's."""
    provenance = read_provenance(source)
    if provenance and provenance.get("variant") and provenance["variant"] != variant:
        raise UserError(f"LoRA {source} was trained on variant {provenance['variant']!r}, the model is "
                        f"{variant!r}; use the model it was trained on")
    modules = dict(transformer.named_modules())
    for module_name in weights.modules:
        module = modules.get(module_name)
        if not isinstance(module, torch.nn.Linear):
            raise UserError(f"LoRA {source} targets {module_name!r}, which this model's DiT lacks "
                            f"(a LoRA for another model size or family?)")
        problem = fit_problem(weights, module_name, module.out_features, module.in_features)
        if problem:
            raise UserError(f"LoRA {source}: {module_name}: {problem}")
