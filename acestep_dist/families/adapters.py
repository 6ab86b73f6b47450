"""Adapter kinds a run trains (LoRA, DoRA, LoKr, LoHa), one form for their weights, and the one
spelling every consumer outside peft reads (LyCORIS's, which ComfyUI's loader also follows).

A family keeps its own containers (prefixes, module names, folders, headers); what an adapter *is*
lives here, so each kind behaves the same in every family.

Weights are held as peft holds them (``AdapterWeights.state``: ``<module>.<part>`` with peft's part
names, unscaled) with the ``AdapterSpec`` that says how peft scales them:

- LoRA / DoRA: ``lora_A.weight`` [r, in], ``lora_B.weight`` [out, r] (DoRA adds
  ``lora_magnitude_vector`` [out]); scale ``alpha / r`` (``alpha / sqrt(r)`` with rsLoRA).
- LoKr: ``lokr_w1`` or ``lokr_w1_a`` @ ``lokr_w1_b``, and ``lokr_w2`` or ``lokr_w2_a`` @ ``lokr_w2_b``;
  the change is ``kron(w1, w2)`` times ``alpha / r``, always (peft ``lokr/layer.py``).
- LoHa: ``hada_w1_a`` @ ``hada_w1_b`` times (elementwise) ``hada_w2_a`` @ ``hada_w2_b``, times ``alpha / r``.

LyCORIS / ComfyUI differ in three places (LyCORIS ``modules/*.py``, ComfyUI ``comfy/weight_adapter``):
every module carries a scalar ``alpha`` and the scale is ``alpha / rank`` with the rank read from
the tensors (so rsLoRA is folded into alpha); a LoKr whose two factors are both whole matrices has
no rank and scale 1 (so peft's ``alpha / r`` is folded into ``lokr_w1``); LoRA matrices are
``lora_down`` / ``lora_up`` and DoRA's magnitude is ``dora_scale`` shaped [out, 1].
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Iterable, Mapping, Sequence

import torch

from ..errors import UserError

KINDS = ("lora", "dora", "lokr", "loha")
NAMES = {"lora": "LoRA", "dora": "DoRA", "lokr": "LoKr", "loha": "LoHa"}
PEFT_TYPES = {"lora": "LORA", "dora": "LORA", "lokr": "LOKR", "loha": "LOHA"}

# peft's part names per kind (what ``get_peft_model_state_dict`` gives after the module path)
LORA_PARTS = ("lora_A.weight", "lora_B.weight")
DORA_MAGNITUDE = "lora_magnitude_vector"
LOKR_PARTS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")
LOHA_PARTS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
PARTS = {"lora": LORA_PARTS, "dora": (*LORA_PARTS, DORA_MAGNITUDE), "lokr": LOKR_PARTS, "loha": LOHA_PARTS}
# other spellings of the same tensors: LyCORIS / kohya (lora_down / lora_up, dora_scale) and peft's
# in-model names (the adapter name left in)
ALIASES = {"lora_down.weight": "lora_A.weight", "lora_up.weight": "lora_B.weight",
           "lora_A.default.weight": "lora_A.weight", "lora_B.default.weight": "lora_B.weight",
           "lora_magnitude_vector.default.weight": DORA_MAGNITUDE, "lora_magnitude_vector.weight": DORA_MAGNITUDE,
           "dora_scale": DORA_MAGNITUDE}
ALPHA = "alpha"
# every suffix a key may end in, longest first (so ``lokr_w1_a`` is not read as ``lokr_w1``)
_SUFFIXES = sorted({*LORA_PARTS, DORA_MAGNITUDE, *LOKR_PARTS, *LOHA_PARTS, *ALIASES, ALPHA}, key=len, reverse=True)


def split_key(key: str) -> tuple[str, str] | None:
    """``("<module>", "<part>")`` of an adapter key in any spelling (the part in peft's name, or
    ``alpha``), None for a key that is not part of an adapter."""
    for suffix in _SUFFIXES:
        if key.endswith("." + suffix):
            return key[: -len(suffix) - 1], ALIASES.get(suffix, suffix)
    return None


def kind_of_parts(parts: Iterable[str]) -> str | None:
    """The kind a module's part names belong to (None when they mix kinds or name none)."""
    names = set(parts) - {ALPHA}
    if names and names <= set(LOHA_PARTS):
        return "loha"
    if names and names <= set(LOKR_PARTS):
        return "lokr"
    if names and names <= set(LORA_PARTS):
        return "lora"
    if DORA_MAGNITUDE in names and names <= set(PARTS["dora"]):
        return "dora"
    return None


@dataclass(frozen=True)
class AdapterSpec:
    """What peft needs to rebuild an adapter's layers and scale: its kind, rank and alpha, and the
    kind's own shape options."""

    kind: str = "lora"
    rank: int = 8
    alpha: float = 16.0
    use_rslora: bool = False  # LoRA / DoRA: scale alpha / sqrt(rank)
    decompose_both: bool = False  # LoKr: split the small Kronecker factor into two rank-r matrices too
    decompose_factor: int = -1  # LoKr: -1 splits each width near its square root

    def __post_init__(self):
        if self.kind not in KINDS:
            raise UserError(f"adapter {self.kind!r} is not one of {', '.join(KINDS)}")

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora and self.kind in ("lora", "dora") else self.rank)

    @property
    def name(self) -> str:
        return NAMES[self.kind]

    @classmethod
    def from_config(cls, config) -> "AdapterSpec":
        """The spec of a training config's adapter keys (``adapter``, ``lora_rank``, ``lora_alpha``,
        ``use_rslora``, ``lokr_decompose_both``, ``lokr_factor``)."""
        return cls(getattr(config, "adapter", "lora"), config.lora_rank, float(config.lora_alpha),
                   bool(config.use_rslora), bool(getattr(config, "lokr_decompose_both", False)),
                   int(getattr(config, "lokr_factor", -1)))

    def describe(self) -> str:
        extra = ""
        if self.kind in ("lora", "dora") and self.use_rslora:
            extra = ", rsLoRA"
        elif self.kind == "lokr":
            extra = (", both factors decomposed" if self.decompose_both else "") + (
                f", factor {self.decompose_factor}" if self.decompose_factor > 0 else "")
        return f"{self.name} rank {self.rank} alpha {self.alpha:g}{extra}"

    def peft_config(self, targets: Iterable[str], dropout: float = 0.0):
        """peft's config that builds this adapter on ``targets`` (module names or suffixes)."""
        targets = list(targets)
        if self.kind in ("lora", "dora"):
            from peft import LoraConfig

            return LoraConfig(r=self.rank, lora_alpha=self.alpha, lora_dropout=dropout, target_modules=targets,
                              use_rslora=self.use_rslora, use_dora=self.kind == "dora", init_lora_weights=True)
        if self.kind == "lokr":
            from peft import LoKrConfig

            # module_dropout: LyCORIS's regularisation (the whole adapter skipped for a step)
            return LoKrConfig(r=self.rank, alpha=self.alpha, module_dropout=dropout, target_modules=targets,
                              decompose_both=self.decompose_both, decompose_factor=self.decompose_factor,
                              init_weights=True)
        from peft import LoHaConfig

        return LoHaConfig(r=self.rank, alpha=self.alpha, module_dropout=dropout, target_modules=targets,
                          init_weights=True)

    def to_json(self) -> dict[str, Any]:
        """For a file header: everything needed to rebuild the layers."""
        table: dict[str, Any] = {"adapter": self.kind, "rank": self.rank, "alpha": self.alpha}
        if self.kind in ("lora", "dora"):
            table["use_rslora"] = self.use_rslora
        if self.kind == "lokr":
            table.update(decompose_both=self.decompose_both, decompose_factor=self.decompose_factor)
        return table

    @classmethod
    def from_json(cls, table: Mapping[str, Any], where: str) -> "AdapterSpec":
        try:
            return cls(str(table.get("adapter", "lora")), int(table["rank"]), float(table["alpha"]),
                       bool(table.get("use_rslora", False)), bool(table.get("decompose_both", False)),
                       int(table.get("decompose_factor", -1)))
        except (KeyError, TypeError, ValueError) as error:
            raise UserError(f"{where}: not an adapter description ({type(error).__name__}: {error})") from None

    @classmethod
    def from_peft_json(cls, table: Mapping[str, Any], where: str) -> "AdapterSpec":
        """From peft's ``adapter_config.json`` (or diffusers' ``lora_adapter_metadata``)."""
        peft_type = str(table.get("peft_type") or "LORA").upper()
        for key, what in (("rank_pattern", "per-module ranks"), ("alpha_pattern", "per-module alphas")):
            if table.get(key):
                raise UserError(f"{where}: {what} ({key}) are not supported; only one rank and alpha")
        try:
            rank = int(table["r"])
            if peft_type == "LORA":
                return cls("dora" if table.get("use_dora") else "lora", rank, float(table.get("lora_alpha", rank)),
                           bool(table.get("use_rslora", False)))
            if peft_type == "LOKR":
                return cls("lokr", rank, float(table.get("alpha", rank)), False, bool(table.get("decompose_both")),
                           int(table.get("decompose_factor", -1)))
            if peft_type == "LOHA":
                return cls("loha", rank, float(table.get("alpha", rank)))
        except (KeyError, TypeError, ValueError) as error:
            raise UserError(f"{where}: not a peft adapter config ({type(error).__name__}: {error})") from None
        raise UserError(f"{where}: a {peft_type} adapter; LoRA, DoRA, LoKr and LoHa are supported")


@dataclass
class AdapterWeights:
    """An adapter's tensors as peft holds them (``<module>.<part>``, unscaled) with its spec;
    ``targets`` names the module kinds it adapts, ``notes`` what a reader had to assume."""

    spec: AdapterSpec
    state: dict[str, torch.Tensor]
    targets: tuple[str, ...] = ()
    notes: list[str] = field(default_factory=list)

    @property
    def modules(self) -> list[str]:
        return sorted({split_key(key)[0] for key in self.state})

    def parts(self, module: str) -> dict[str, torch.Tensor]:
        prefix = module + "."
        return {key[len(prefix):]: value for key, value in self.state.items()
                if key.startswith(prefix) and split_key(key)[0] == module}

    def check_complete(self, where: str) -> None:
        """Every module has the parts its kind needs, with shapes that fit together."""
        for module in self.modules:
            problem = _parts_problem(self.spec.kind, self.parts(module))
            if problem:
                raise UserError(f"{where}: {module}: {problem}")

    def shape(self, module: str) -> tuple[int, int]:
        """(out, in) of the weight the module's adapter changes."""
        return _shape(self.spec.kind, self.parts(module))

    def delta(self, module: str, base_weight: torch.Tensor | None = None) -> torch.Tensor:
        """The change the adapter makes to the module's weight (DoRA needs the base weight)."""
        return _delta(self.spec, self.parts(module), base_weight)

    def rescaled(self, alpha: float, use_rslora: bool = False, strength: float = 1.0) -> "AdapterWeights":
        """The same adapter under another alpha / rsLoRA: the same change to every weight, times
        ``strength`` (DoRA: its low-rank term times ``strength``, as peft's adapter scale does)."""
        return self.converted(replace(self.spec, alpha=float(alpha), use_rslora=use_rslora), strength)

    def converted(self, target: AdapterSpec, strength: float = 1.0) -> "AdapterWeights":
        """The same adapter described by ``target`` (another alpha, rsLoRA flag, or the rank a
        LoKr of whole matrices is given): tensors rescaled so the change stays (times ``strength``)."""
        if target.kind != self.spec.kind:
            raise ValueError(f"a {self.spec.name} cannot become a {target.name}")
        factor = self.spec.scale * strength / target.scale
        state = {}
        for key, value in self.state.items():
            part = split_key(key)[1]
            if self.spec.kind in ("lora", "dora") and part in LORA_PARTS:
                # both matrices, their sizes kept balanced; a negative factor turns B
                value = value * math.sqrt(abs(factor)) * (-1.0 if factor < 0 and part == "lora_B.weight" else 1.0)
            elif part in ("lokr_w1", "lokr_w1_a", "hada_w1_a"):  # one factor of the product
                value = value * factor
            state[key] = value
        return AdapterWeights(target, state, self.targets, list(self.notes))

    def baked(self, strength: float = 1.0) -> "AdapterWeights":
        """The same change (times ``strength``) carried by the tensors alone: alpha = rank, so any
        reader that assumes scale 1 (or takes alpha from a header) applies it."""
        return self.rescaled(float(self.spec.rank), False, strength)


def _parts_problem(kind: str, parts: Mapping[str, torch.Tensor]) -> str | None:
    names = set(parts)
    needed = set(PARTS[kind])
    if kind == "lokr":  # each factor whole or split in two
        needed = {"lokr_w1"} if "lokr_w1" in names else {"lokr_w1_a", "lokr_w1_b"}
        needed |= {"lokr_w2"} if "lokr_w2" in names else {"lokr_w2_a", "lokr_w2_b"}
    if names != needed:
        missing, extra = sorted(needed - names), sorted(names - needed)
        return (f"a {NAMES[kind]} module needs {', '.join(sorted(needed))}"
                + (f"; missing {', '.join(missing)}" if missing else "") + (f"; unexpected {', '.join(extra)}" if extra else ""))
    if any(v.ndim != (1 if k == DORA_MAGNITUDE else 2) or not v.is_floating_point() for k, v in parts.items()):
        return "its tensors are not floating-point matrices (and a DoRA magnitude vector)"
    try:
        _shape(kind, parts)
        if kind == "lokr":
            _lokr_factors(parts)
        elif kind == "loha":
            _loha_product(parts)
    except RuntimeError as error:
        return f"its matrices do not fit together ({error})"
    if kind in ("lora", "dora") and parts["lora_A.weight"].shape[0] != parts["lora_B.weight"].shape[1]:
        return f"lora_A has rank {parts['lora_A.weight'].shape[0]} but lora_B rank {parts['lora_B.weight'].shape[1]}"
    if kind == "dora" and parts[DORA_MAGNITUDE].shape[0] != parts["lora_B.weight"].shape[0]:
        return "its magnitude vector does not match lora_B's outputs"
    return None


def _lokr_factors(parts: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    w1 = parts["lokr_w1"] if "lokr_w1" in parts else parts["lokr_w1_a"] @ parts["lokr_w1_b"]
    w2 = parts["lokr_w2"] if "lokr_w2" in parts else parts["lokr_w2_a"] @ parts["lokr_w2_b"]
    return w1, w2


def _loha_product(parts: Mapping[str, torch.Tensor]) -> torch.Tensor:
    return (parts["hada_w1_a"] @ parts["hada_w1_b"]) * (parts["hada_w2_a"] @ parts["hada_w2_b"])


def _shape(kind: str, parts: Mapping[str, torch.Tensor]) -> tuple[int, int]:
    if kind in ("lora", "dora"):
        return parts["lora_B.weight"].shape[0], parts["lora_A.weight"].shape[1]
    if kind == "loha":
        return parts["hada_w1_a"].shape[0], parts["hada_w1_b"].shape[1]
    w1, w2 = _lokr_factors(parts)
    return w1.shape[0] * w2.shape[0], w1.shape[1] * w2.shape[1]


def _delta(spec: AdapterSpec, parts: Mapping[str, torch.Tensor], base_weight: torch.Tensor | None) -> torch.Tensor:
    if spec.kind == "lokr":
        return spec.scale * torch.kron(*_lokr_factors(parts))
    if spec.kind == "loha":
        return spec.scale * _loha_product(parts)
    change = spec.scale * (parts["lora_B.weight"] @ parts["lora_A.weight"])
    if spec.kind == "lora":
        return change
    if base_weight is None:
        raise ValueError("a DoRA adapter's change depends on the base weight")
    merged = base_weight + change  # DoRA: each output row rescaled to the learnt magnitude
    norm = torch.linalg.norm(merged, dim=1, keepdim=True)
    return parts[DORA_MAGNITUDE].unsqueeze(1) * merged / norm - base_weight


def expected_shapes(spec: AdapterSpec, out_features: int, in_features: int) -> dict[str, tuple[int, ...]]:
    """The parts (and their shapes) peft builds for ``spec`` on a Linear of these widths."""
    r = spec.rank
    if spec.kind in ("lora", "dora"):
        shapes = {"lora_A.weight": (r, in_features), "lora_B.weight": (out_features, r)}
        if spec.kind == "dora":
            shapes[DORA_MAGNITUDE] = (out_features,)
        return shapes
    if spec.kind == "loha":
        return {"hada_w1_a": (out_features, r), "hada_w1_b": (r, in_features),
                "hada_w2_a": (out_features, r), "hada_w2_b": (r, in_features)}
    from peft.tuners.lokr.layer import factorization  # peft's own rule, so the shapes are what it builds

    out_l, out_k = factorization(out_features, spec.decompose_factor)
    in_m, in_n = factorization(in_features, spec.decompose_factor)
    shapes: dict[str, tuple[int, ...]] = {}
    if spec.decompose_both and r < max(out_l, in_m) / 2:
        shapes.update(lokr_w1_a=(out_l, r), lokr_w1_b=(r, in_m))
    else:
        shapes["lokr_w1"] = (out_l, in_m)
    if r < max(out_k, in_n) / 2:
        shapes.update(lokr_w2_a=(out_k, r), lokr_w2_b=(r, in_n))
    else:
        shapes["lokr_w2"] = (out_k, in_n)
    return shapes


def fit_problem(weights: AdapterWeights, module: str, out_features: int, in_features: int) -> str | None:
    """Why the module's tensors are not what peft builds for ``weights.spec`` on this Linear (None: they are)."""
    have = {part: tuple(t.shape) for part, t in weights.parts(module).items()}
    want = expected_shapes(weights.spec, out_features, in_features)
    if have == want:
        return None
    if weights.shape(module) != (out_features, in_features):
        out, inp = weights.shape(module)
        return f"it is {out}x{inp}, the model's layer {out_features}x{in_features} (an adapter of another model size?)"
    return (f"its tensors ({', '.join(f'{k} {v}' for k, v in sorted(have.items()))}) are not those of a "
            f"{weights.spec.describe()} ({', '.join(f'{k} {v}' for k, v in sorted(want.items()))})")


def rank_of(kind: str, parts: Mapping[str, torch.Tensor]) -> int | None:
    """The rank a module's tensors show (None: a LoKr of two whole matrices has none)."""
    if kind in ("lora", "dora"):
        return parts["lora_A.weight"].shape[0]
    if kind == "loha":
        return parts["hada_w1_b"].shape[0]
    if "lokr_w2_b" in parts:
        return parts["lokr_w2_b"].shape[0]
    if "lokr_w1_b" in parts:
        return parts["lokr_w1_b"].shape[0]
    return None


# ------------------------------------------------------------------------ LyCORIS / ComfyUI
def to_lycoris(weights: AdapterWeights) -> dict[str, dict[str, torch.Tensor]]:
    """module -> its tensors in LyCORIS's spelling (``alpha`` included): what LyCORIS's loader and
    ComfyUI's apply with the same effect as peft (at strength 1).

    DoRA's magnitude is written as trained (LyCORIS's convention, which every DoRA trainer's files
    follow): LyCORIS and peft rescale each row of ``W0 + dW`` by that row's norm; ComfyUI's
    ``weight_decompose`` (through 2026) divides by the norm of ``W0`` instead, which differs by the
    relative change the adapter makes to each row's norm."""
    spec = weights.spec
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for module in weights.modules:
        parts = dict(weights.parts(module))
        rank = rank_of(spec.kind, parts)
        out: dict[str, torch.Tensor] = {}
        if spec.kind in ("lora", "dora"):
            out["lora_down.weight"], out["lora_up.weight"] = parts["lora_A.weight"], parts["lora_B.weight"]
            if spec.kind == "dora":
                out["dora_scale"] = parts[DORA_MAGNITUDE].reshape(-1, 1)
        elif spec.kind == "lokr" and rank is None:
            # two whole matrices: LyCORIS and ComfyUI apply scale 1 whatever alpha says
            parts["lokr_w1"] = parts["lokr_w1"] * spec.scale
            out.update(parts)
            rank = 1
        else:
            out.update(parts)
        # the consumers scale by alpha / (the rank they read): our scale times that rank
        out[ALPHA] = torch.tensor(float(spec.scale * (rank or 1)))
        modules[module] = out
    return modules


def to_comfyui(weights: AdapterWeights) -> dict[str, dict[str, torch.Tensor]]:
    """``to_lycoris`` with LoRA matrices under peft's names (``lora_A`` / ``lora_B``), which
    ComfyUI's loader reads as ``lora_down`` / ``lora_up`` (REFERENCE.md's ComfyUI spelling)."""
    renames = {"lora_down.weight": "lora_A.weight", "lora_up.weight": "lora_B.weight"}
    return {module: {renames.get(part, part): tensor for part, tensor in parts.items()}
            for module, parts in to_lycoris(weights).items()}


def from_peft(spec: AdapterSpec, modules: Mapping[str, Mapping[str, torch.Tensor]], where: str) -> AdapterWeights:
    """Modules spelled as peft holds them (part names read by ``split_key``), scaled as ``spec`` (a
    peft config's) says; their ranks must be the config's."""
    if any(ALPHA in parts for parts in modules.values()):
        raise UserError(f"{where}: alpha tensors beside a peft config (two scales for one adapter)")
    state = {f"{module}.{part}": t.reshape(-1).float() if part == DORA_MAGNITUDE else t.float()
             for module, parts in modules.items() for part, t in parts.items()}
    weights = AdapterWeights(spec, state)
    weights.check_complete(where)
    for module in weights.modules:
        rank = rank_of(spec.kind, weights.parts(module))
        if rank is not None and rank != spec.rank:
            raise UserError(f"{where}: {module} has rank {rank}, the adapter config says {spec.rank}")
    return weights


def from_lycoris(modules: Mapping[str, Mapping[str, torch.Tensor]], where: str,
                 spec_hint: AdapterSpec | None = None) -> AdapterWeights:
    """Modules in LyCORIS's / ComfyUI's spelling (part names already read by ``split_key``, so
    ``alpha`` and peft's part names) -> ``AdapterWeights`` with the scale those consumers apply:
    alpha / rank, 1 without alpha, 1 for a LoKr of two whole matrices. ``spec_hint`` (a header's
    description) supplies what the tensors cannot show (a LoKr's factor and decompose_both)."""
    if not modules:
        raise UserError(f"{where} holds no adapter weights")
    kinds = {module: kind_of_parts(parts) for module, parts in modules.items()}
    unknown = [m for m, k in kinds.items() if k is None]
    if unknown:
        raise UserError(f"{where}: {unknown[0]} holds {', '.join(sorted(modules[unknown[0]]))}, which are not the parts "
                        f"of one LoRA, DoRA, LoKr or LoHa module")
    if len(set(kinds.values())) != 1:
        raise UserError(f"{where}: its modules mix adapter kinds ({', '.join(sorted(set(kinds.values())))})")
    kind = next(iter(kinds.values()))
    state: dict[str, torch.Tensor] = {}
    ranks, scales, notes = set(), set(), []
    for module, parts in modules.items():
        tensors = {k: v for k, v in parts.items() if k != ALPHA}
        if kind == "dora" and tensors[DORA_MAGNITUDE].ndim == 2:
            if tensors[DORA_MAGNITUDE].shape[1] != 1:
                raise UserError(f"{where}: {module}.dora_scale is {tuple(tensors[DORA_MAGNITUDE].shape)}: only DoRA over "
                                f"output rows ([out, 1]) is supported")
            tensors[DORA_MAGNITUDE] = tensors[DORA_MAGNITUDE][:, 0]
        problem = _parts_problem(kind, tensors)
        if problem:
            raise UserError(f"{where}: {module}: {problem}")
        rank = rank_of(kind, tensors)
        alpha = parts.get(ALPHA)
        if alpha is not None and alpha.numel() != 1:
            raise UserError(f"{where}: {module}.alpha holds {alpha.numel()} values, not one")
        if alpha is None and rank is not None:
            notes.append("modules without alpha: scale 1 assumed (what ComfyUI applies)")
        scales.add(round(float(alpha) / rank, 9) if alpha is not None and rank is not None else 1.0)
        ranks.add(rank)
        state.update({f"{module}.{k}": v.float() for k, v in tensors.items()})
    if len(ranks) != 1:
        raise UserError(f"{where}: its modules have different ranks ({sorted(map(str, ranks))}); one rank is supported")
    if len(scales) != 1:
        raise UserError(f"{where}: its modules have different scales (alpha / rank: {sorted(scales)}); one is supported")
    rank, scale = ranks.pop(), scales.pop()
    hint = spec_hint if spec_hint is not None and spec_hint.kind == kind else None
    if rank is None:  # LoKr of two whole matrices: any rank at least half the larger factor keeps them whole
        rank = max(max(_lokr_factors(modules[m])[1].shape) for m in modules)
        if hint is not None and hint.rank >= rank:
            rank = hint.rank
    spec = AdapterSpec(kind, rank, scale * rank, False,
                       hint.decompose_both if hint else any("lokr_w1_a" in p for p in modules.values()),
                       hint.decompose_factor if hint else lokr_factor(modules, where) if kind == "lokr" else -1)
    return AdapterWeights(spec, state, notes=sorted(set(notes)))


def lokr_factor(modules: Mapping[str, Mapping[str, torch.Tensor]], where: str) -> int:
    """peft's ``decompose_factor`` that splits every module's widths as its LoKr factors are split
    (-1, near the square root, unless a file says otherwise)."""
    from peft.tuners.lokr.layer import factorization

    factors = {module: [t.shape for t in _lokr_factors(parts)] for module, parts in modules.items()}
    candidates = dict.fromkeys([-1, *(w1[0] for w1, _ in factors.values()), *(w1[1] for w1, _ in factors.values())])
    for candidate in candidates:
        if all(factorization(w1[0] * w2[0], candidate) == (w1[0], w2[0])
               and factorization(w1[1] * w2[1], candidate) == (w1[1], w2[1]) for w1, w2 in factors.values()):
            return candidate
    raise UserError(f"{where}: its LoKr factors split the layer widths in a way peft cannot rebuild "
                    f"(an unbalanced factorisation?)")


def check_init_adapter(weights: AdapterWeights, config, targets: Sequence[str], model: torch.nn.Module,
                       where: str) -> None:
    """An adapter a run continues from (``init_lora``) must be the run's kind with the tensors peft
    builds for the run's settings (rank, LoKr factors) on ``model``'s layers, adapting only the
    preset's modules. Its alpha may differ: it is converted, keeping the change it makes."""
    run = AdapterSpec.from_config(config)
    if weights.spec.kind != run.kind:
        raise UserError(f"{where} is a {weights.spec.name}; this run trains a {run.name} (adapter: {run.kind})")
    extra = set(weights.targets) - set(targets)
    if extra:
        raise UserError(f"{where} does not fit this run: targets {sorted(extra)} outside lora_preset "
                        f"{config.lora_preset!r} ({', '.join(targets)})")
    as_run = AdapterWeights(replace(run, alpha=weights.spec.alpha, use_rslora=weights.spec.use_rslora), weights.state)
    for module_name in weights.modules:
        module = model.get_submodule(module_name)
        problem = fit_problem(as_run, module_name, module.out_features, module.in_features)
        if problem:
            detail = f"rank {weights.spec.rank} (lora_rank is {run.rank})" if weights.spec.rank != run.rank else problem
            raise UserError(f"{where} does not fit this run: {detail}")
