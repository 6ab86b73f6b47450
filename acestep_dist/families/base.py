"""The model-family interface: everything a stage may ask of a model family.

A family is two objects:

- ``Family`` (one instance per family, registered by name, no weights): which checkpoints it
  claims, ``describe`` (variant, sizes, fingerprint from config files alone), the sample
  ``schema`` its shards hold, its variants, LoRA presets and formats, generation tasks, its own
  config keys, the tiny checkpoint writer, and the exports that need no loaded model.
- ``FamilyModel`` (returned by ``Family.load(description, purpose)``): the loaded parts one stage
  needs and what that stage does with them: ``encode_audio`` / ``encode_text`` (prep),
  ``collate`` and ``trainable`` (training: a module whose forward is the family's own loss),
  ``generate`` (validation renders and ``acedist generate``).

The stages (prep, shards, train, export, generate, the CLI) only ever hold these objects; they
never import a family's folder. Adding a family = a folder implementing these two classes plus
one ``register`` call (the test suite registers a worked example, a family of some 450 lines that
lives only under ``tests/``, unknown to every file here).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Mapping, Sequence

from pydantic import BaseModel, ConfigDict

if TYPE_CHECKING:
    import torch

    from ..records import Record

ALT_PREFIX = "alt_"  # alternative-caption copies of per-caption tensors: alt_<name>_<i>


class FamilyOptions(BaseModel):
    """A family's own config keys (prep or train); subclasses declare the fields."""

    model_config = ConfigDict(extra="forbid")


# ------------------------------------------------------------------------------- sample schema
@dataclass(frozen=True)
class TensorSpec:
    """One tensor of a sample: its stored dtype, which axis is its length, and the manifest count
    (``frames``, ``text_tokens``, ...) that length must equal.

    An ``optional`` tensor may be absent from a sample (a feature prep computes only when asked):
    a sample holds it exactly when its meta / manifest row has its count. Its count is its own
    (no other tensor is measured by it), so the count's presence says whether the tensor is there."""

    name: str
    dtype: str  # a torch dtype name: "bfloat16", "float32", "int32", ...
    length: str  # the count in the sample's meta / manifest row that gives its length
    axis: int = 0
    per_caption: bool = False  # an alternative caption stores its own copy: alt_<name>_<i>
    same_shape_as: str | None = None  # e.g. a posterior's std has its mean's shape
    optional: bool = False  # may be absent: present exactly when the sample's lengths have its count
    # other dtypes a sample may store it in (a prep option chooses, e.g. float32 for a lossless cache)
    also_stored_as: tuple[str, ...] = ()

    def torch_dtype(self):
        import torch

        return getattr(torch, self.dtype)

    def stored(self, tensor: "torch.Tensor") -> "torch.Tensor":
        """``tensor`` as a sample stores it: in its own dtype when that is one this spec allows, else in ``dtype``."""
        keep = tensor.dtype in self.allowed_dtypes()
        return tensor.detach().to("cpu", tensor.dtype if keep else self.torch_dtype()).contiguous()

    def allowed_dtypes(self) -> tuple:
        import torch

        return tuple(getattr(torch, name) for name in (self.dtype, *self.also_stored_as))


def alt_name(name: str, index: int) -> str:
    return f"{ALT_PREFIX}{name}_{index}"


def alt_count(length: str) -> str:
    """The meta field listing the lengths of a per-caption tensor's alternatives."""
    return f"{ALT_PREFIX}{length}"


@dataclass(frozen=True)
class SampleSchema:
    """What one sample of a family stores. Every schema has a tensor measured in ``frames`` (the
    audio's latent length, which training and reports read)."""

    family: str
    version: int
    tensors: tuple[TensorSpec, ...]

    def __post_init__(self) -> None:
        if not any(spec.length == "frames" and not spec.optional for spec in self.tensors):
            raise ValueError(f"schema of {self.family}: one tensor's length must be 'frames' (and not optional)")
        for spec in self.tensors:
            if spec.optional and [other.name for other in self.tensors if other.length == spec.length] != [spec.name]:
                raise ValueError(f"schema of {self.family}: optional tensor {spec.name} must have a count of its own "
                                 f"({spec.length!r} measures another tensor too)")

    @staticmethod
    def _present(spec: TensorSpec, lengths: dict[str, Any]) -> bool:
        """Whether a sample of these lengths holds ``spec``'s tensor."""
        return not spec.optional or lengths.get(spec.length) is not None

    @property
    def counts(self) -> tuple[str, ...]:
        """The meta / manifest fields holding lengths (``frames``, ``text_tokens``, ...)."""
        return tuple(dict.fromkeys(spec.length for spec in self.tensors))

    @property
    def caption_counts(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(spec.length for spec in self.tensors if spec.per_caption))

    def identity(self) -> dict[str, Any]:
        return {"family": self.family, "schema_version": self.version}

    def expected(self, lengths: dict[str, Any]) -> dict[str, tuple[TensorSpec, int]]:
        """Every tensor a sample with these lengths (a manifest row / meta) holds, with its length."""
        want: dict[str, tuple[TensorSpec, int]] = {}
        for spec in self.tensors:
            if not self._present(spec, lengths):
                continue
            want[spec.name] = (spec, int(lengths[spec.length]))
            if spec.per_caption:
                for index, length in enumerate(lengths.get(alt_count(spec.length), [])):
                    want[alt_name(spec.name, index)] = (spec, int(length))
        return want

    def lengths_of(self, tensors: dict[str, "torch.Tensor"], alternatives: Sequence[dict[str, "torch.Tensor"]] = ()) -> dict[str, Any]:
        """The counts of one sample: its own lengths, and per alternative caption its per-caption ones
        (an absent optional tensor has no count)."""
        lengths: dict[str, Any] = {}
        for spec in self.tensors:
            if spec.optional and spec.name not in tensors:
                continue
            lengths.setdefault(spec.length, int(tensors[spec.name].shape[spec.axis]))
        for count in self.caption_counts:
            specs = [spec for spec in self.tensors if spec.per_caption and spec.length == count]
            if specs[0].optional and specs[0].name not in tensors:
                continue
            lengths[alt_count(count)] = [int(alt[specs[0].name].shape[specs[0].axis]) for alt in alternatives]
        return lengths

    def pack(self, tensors: dict[str, "torch.Tensor"], alternatives: Sequence[dict[str, "torch.Tensor"]] = ()) -> bytes:
        """The sample's safetensors blob, each tensor in its declared dtype."""
        from safetensors.torch import save as save_safetensors

        unknown = sorted(set(tensors) - {spec.name for spec in self.tensors})
        missing = sorted({spec.name for spec in self.tensors if not spec.optional} - set(tensors))
        if unknown or missing:
            raise ValueError(f"{self.family} sample tensors do not match its schema "
                             f"(missing {missing}, undeclared {unknown})")
        blob: dict[str, Any] = {}
        for spec in self.tensors:
            if spec.name not in tensors:  # an optional tensor this sample lacks
                continue
            blob[spec.name] = spec.stored(tensors[spec.name])
            if spec.per_caption:
                for index, alternative in enumerate(alternatives):
                    blob[alt_name(spec.name, index)] = spec.stored(alternative[spec.name])
        return save_safetensors(blob)

    def problems(self, tensors: dict[str, "torch.Tensor"], lengths: dict[str, Any]) -> list[str]:
        """Why ``tensors`` are not a sample of these lengths (missing, wrong dtype or length)."""
        found = []
        expected = self.expected(lengths)
        for name, (spec, length) in expected.items():
            tensor = tensors.get(name)
            if tensor is None:
                found.append(f"lacks tensor {name}")
            elif tensor.dim() <= spec.axis or tensor.shape[spec.axis] != length or tensor.dtype not in spec.allowed_dtypes():
                found.append(f"{name} is {list(tensor.shape)} {tensor.dtype}, the manifest says {length} along axis "
                             f"{spec.axis} of {' or '.join((spec.dtype, *spec.also_stored_as))}")
            elif spec.same_shape_as and spec.same_shape_as in tensors and tensors[spec.same_shape_as].shape != tensor.shape:
                found.append(f"{name} and {spec.same_shape_as} shapes differ")
        uncounted = {spec.name: spec.length for spec in self.tensors
                     if spec.name in tensors and spec.name not in expected}
        for name, count in uncounted.items():  # an optional tensor the row does not count
            found.append(f"holds {name}, but the manifest gives no {count}")
        undeclared = sorted(set(tensors) - set(expected) - set(uncounted))
        if undeclared:
            found.append(f"holds tensors its schema does not declare: {', '.join(undeclared)}")
        return found

    def for_caption(self, tensors: dict[str, "torch.Tensor"], caption: int) -> dict[str, "torch.Tensor"]:
        """The sample's tensors as training uses them: caption 0 is the caption, i > 0 the
        (i-1)-th alternative, whose per-caption tensors take the place of the caption's."""
        chosen = {}
        for spec in self.tensors:
            name = spec.name if caption == 0 or not spec.per_caption else alt_name(spec.name, caption - 1)
            if spec.optional and spec.name not in tensors:  # absent from this sample
                continue
            if name not in tensors:
                raise KeyError(name)
            chosen[spec.name] = tensors[name]
        return chosen


# ----------------------------------------------------------------------------- descriptions
@dataclass(frozen=True)
class ModelDescription:
    """A checkpoint as read from its config files, without weights."""

    family: str
    variant: str
    source: str  # the resolved local folder (a hub id is downloaded once, on the driver)
    layout: str  # how the folder is organised (e.g. "diffusers", "upstream")
    sample_rate: int
    frames_per_second: float
    fingerprint: str  # identity of the parts prep encodes with: prep output depends on it
    dimensions: dict[str, int] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)  # family-specific facts for `acedist model info`

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class RenderRequest:
    """What to render: the record (caption, lyrics, bpm, ...) and how."""

    record: "Record"
    duration: float  # seconds of the output
    task: str = "text2music"  # one of the family's tasks
    seed: int = 0
    steps: int | None = None
    guidance: float | None = None
    shift: float | None = None
    source_audio: Any = None  # [channels, n] float tensor at the model's rate (repaint / cover)
    repaint: tuple[float, float] | None = None
    cover_strength: float = 1.0
    options: dict[str, Any] = field(default_factory=dict)  # family-specific settings (ACE-Step v1: lyrics_vocab)


class Trainable(ABC):
    """What a training worker optimises. ``module`` holds every part the loss touches as a child
    (so DeepSpeed partitions and hooks them all); its ``forward(batch, generators)`` returns
    ``(mean loss, per-sample losses [B], timesteps [B])``, one generator per sample."""

    module: "torch.nn.Module"
    param_groups: list[dict]

    @property
    def trainable_parameters(self) -> int:
        return sum(p.numel() for group in self.param_groups for p in group["params"])

    @abstractmethod
    def describe(self) -> str:
        """One line: what trains and with which recipe (the first log line of a run)."""

    @abstractmethod
    def state(self) -> dict[str, Any]:
        """Facts for the run state (variant, recipe, ...), JSON-serialisable."""

    @abstractmethod
    def save(self, folder: Path) -> list[str]:
        """Write the trained weights (parameters gathered) into ``folder``; return their paths."""

    @abstractmethod
    def render(self, request: RenderRequest) -> "torch.Tensor":
        """A validation render with the weights as they stand: ``[channels, n]``."""


class FamilyModel(ABC):
    """The parts of one checkpoint a stage loaded (``Family.load``) and what the stage does with them."""

    description: ModelDescription

    @property
    def sample_rate(self) -> int:
        return self.description.sample_rate

    def encode_audio(self, wave: "torch.Tensor", options: FamilyOptions | None = None) -> dict[str, "torch.Tensor"]:
        """``wave [channels, n]`` at ``sample_rate`` -> the sample's audio tensors (schema names).
        ``options``: the family's prep options (``Family.options`` of the prep config, as
        ``encode_text`` gets them); prep always passes them, None means the family's defaults."""
        raise NotImplementedError(f"{self.description.family} cannot encode audio with the parts loaded")

    def encode_text(self, records: Sequence["Record"], options: FamilyOptions) -> list[dict[str, "torch.Tensor"]]:
        """Per record, its text tensors (schema names, unpadded), each row as it would be alone."""
        raise NotImplementedError(f"{self.description.family} cannot encode text with the parts loaded")

    def parts(self) -> dict[str, "torch.nn.Module"]:
        """The modules this model holds now, by name (what the process keeps in memory: the dry run
        sizes rank 0's validation parts with it)."""
        raise NotImplementedError(f"{self.description.family} does not list its loaded parts")

    def collate(self, samples: Sequence[dict[str, "torch.Tensor"]]) -> Any:
        """Schema tensors of B samples -> the batch ``Trainable.module`` takes (with ``.to(device)``)."""
        raise NotImplementedError

    def trainable(self, config, options: FamilyOptions, stored: Mapping[str, str] | None = None) -> Trainable:
        """What trains. ``stored``: the optional schema tensors every training sample holds, each
        with what prep recorded about the part that computed it (``Family.feature_sources``); a
        family may use them instead of running that part (and so never load it)."""
        raise NotImplementedError(f"{self.description.family} was loaded without its training parts")

    def generate(self, request: RenderRequest, lora: str | None = None, lora_scale: float = 1.0,
                 log=print) -> "torch.Tensor":
        """Render ``request``: ``[channels, n]`` float audio at ``sample_rate``."""
        raise NotImplementedError


class Family(ABC):
    """One model family (see the module docstring). Subclasses set the class attributes."""

    name: ClassVar[str]
    title: ClassVar[str] = ""  # how messages name it ("ACE-Step 1.5"); the name when empty
    schema: ClassVar[SampleSchema]
    variants: ClassVar[tuple[str, ...]]
    variant_aliases: ClassVar[dict[str, str]] = {}
    default_variant: ClassVar[str]
    lora_presets: ClassVar[tuple[str, ...]] = ()
    adapters: ClassVar[tuple[str, ...]] = ("lora",)  # the adapter kinds (config ``adapter``) it trains
    lora_formats: ClassVar[tuple[str, ...]] = ()  # what export writes for an adapter run (some kinds fewer)
    full_formats: ClassVar[tuple[str, ...]] = ()  # what export writes for a full fine-tune
    tasks: ClassVar[tuple[str, ...]] = ("text2music",)
    max_generate_seconds: ClassVar[float | None] = None  # the longest render the model was trained for
    prep_options: ClassVar[type[FamilyOptions]] = FamilyOptions
    train_options: ClassVar[type[FamilyOptions]] = FamilyOptions

    @abstractmethod
    def claims(self, model: str) -> int:
        """How surely ``model`` (a local folder or a hub id) is a checkpoint of this family:
        0 not mine, 1 could be (a hub id not yet downloaded), 2 certainly (its files say so)."""

    @abstractmethod
    def describe(self, model: str) -> ModelDescription:
        """Read config files only (a hub id is downloaded first); raise ModelLoadError when unusable."""

    @abstractmethod
    def load(self, description: ModelDescription, purpose: str, *, dtype=None, device: str = "cpu") -> FamilyModel:
        """Load the parts ``purpose`` needs: "encode-audio", "encode-text", "train", "validate"
        (train + what renders), "generate", "export". On ``device="meta"`` (``acedist train
        --dry-run``: counts and a fake step) the parts need the right shapes only: build them from
        their configs without reading weights where the family can."""

    def sample_bytes(self, description: ModelDescription, seconds: float,
                     options: FamilyOptions | None = None) -> float:
        """Estimated bytes of one sample of ``seconds`` of audio prepared with the prep ``options``
        (None: the defaults); plans shard sizes."""
        return 0.0

    @abstractmethod
    def write_tiny(self, out: Path, variant: str, seed: int = 0, **options: Any) -> Path:
        """A random-weight checkpoint of the real architecture, small enough for tests and demos."""

    def check_training(self, description: ModelDescription, config, options: FamilyOptions,
                       stored: Mapping[str, str] | None = None) -> str:
        """On the driver before any worker starts: refuse settings that cannot train this model
        (``UserError``), also with the data's ``stored`` optional tensors (see ``FamilyModel.trainable``);
        return a one-line description of the recipe."""
        return ""

    def feature_sources(self, description: ModelDescription, options: FamilyOptions) -> dict[str, str]:
        """For the optional tensors prep computes with the prep ``options``: the identity of the part
        of this model that computes each (recorded in the shard markers), so training can tell
        whether a sample's stored tensor is what its model would compute."""
        return {}

    def legacy_weights(self, state: dict[str, Any]) -> list[str]:
        """The weight files of a run state written before states listed them (none: unreadable)."""
        return []

    def adapter_formats(self, adapter: str) -> tuple[str, ...]:
        """The export formats of ``lora_formats`` whose consumers load an adapter of kind ``adapter``."""
        return self.lora_formats if adapter in self.adapters else ()

    def lora_info(self, path: str) -> dict[str, Any]:
        """Read a LoRA file or folder (rank, alpha, provenance) without a model; raise UserError."""
        raise NotImplementedError(f"{self.name} has no LoRA support")

    def export_lora(self, run_folder: Path, weights: Sequence[str], out: Path, formats: Sequence[str], name: str,
                    provenance: dict[str, Any]) -> tuple[list[Path], str]:
        """Write the LoRA a run saved (``weights``: its files in ``run_folder``) in ``formats``;
        return the files written and the README text that says where each goes."""
        raise NotImplementedError(f"{self.name} has no LoRA export")

    def export_full(self, description: ModelDescription, run_folder: Path, weights: Sequence[str], out: Path,
                    formats: Sequence[str]) -> tuple[list[Path], str]:
        """Write the base model with the trained weights swapped in; return the files and README text."""
        raise NotImplementedError(f"{self.name} has no full-weight export")

    def __init__(self) -> None:
        if not self.title:
            self.title = self.name

    def options(self, config) -> FamilyOptions:
        """This family's own keys of a prep or train config (``prep_options`` / ``train_options``),
        validated; a key of another family is named."""
        from pydantic import ValidationError

        from ..errors import ConfigError, explain_validation

        cls = getattr(self, config.family_options_attribute)
        extras = dict(config.model_extra or {})
        foreign = [key for key in extras if key not in cls.model_fields]
        if foreign:
            raise ConfigError(f"{', '.join(map(repr, foreign))}: not a setting of the model family {self.name} "
                              f"(its own keys: {', '.join(cls.model_fields) or 'none'})")
        try:
            return cls.model_validate(extras)
        except ValidationError as error:
            raise explain_validation(error, list(cls.model_fields), f"{self.name} settings") from None

    def variant_name(self, name: str) -> str:
        name = self.variant_aliases.get(name, name)
        if name not in self.variants:
            from ..errors import UserError

            raise UserError(f"{self.name} has no variant {name!r}; known: {', '.join(self.variants)}")
        return name
