"""A toy model family that lives only under tests/: the proof that the family boundary holds.

``toy-mlp`` shares nothing with ACE-Step 1.5 but the interface (``acestep_dist.families.base``):

- audio: a fixed orthonormal projection of the mono wave, frame by frame (``hop`` samples), into a
  latent ``[8, 16, T]`` (length on axis 2, no posterior std); the decoder is its transpose;
- text: its own byte-level embedding of the caption, ``prompt_states [L, 12]`` (a BOS token first,
  at most ``prompt_max_tokens``, a prep key of this family's own); no lyrics;
- training: a two-layer velocity MLP over each latent frame, conditioned on the mean-pooled prompt
  states and t, flow matching with one generator per sample, padded frames masked out; LoRA (peft)
  on its two linears or a full fine-tune; ``velocity_loss`` (mse | huber) is its own train key;
- generation: Euler steps from noise, then the decoder.

A checkpoint is a folder: ``toy_family.json`` (the config, naming the family) + ``model.safetensors``.
Registered by the tests through ``ACEDIST_FAMILIES=toy_family:FAMILY``.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from acestep_dist.errors import ModelLoadError, UserError
from acestep_dist.families.base import (Family, FamilyModel, FamilyOptions, ModelDescription, RenderRequest,
                                        SampleSchema, TensorSpec, Trainable)

NAME = "toy-mlp"
CONFIG_FILE = "toy_family.json"
WEIGHTS_FILE = "model.safetensors"
LORA_FILE = "lora.safetensors"  # what a LoRA run saves
VELOCITY_FILE = "velocity.safetensors"  # what a full fine-tune saves
LORA_KIND = "acedist-toy-lora"  # the header tag of our LoRA files
CHANNELS, HEIGHT = 8, 16
FEATURES = CHANNELS * HEIGHT  # one latent frame, flattened
BOS = 256  # token ids are the caption's UTF-8 bytes after this one
TIME_FEATURES = 3
DEFAULT_STEPS = 8
SCHEMA = SampleSchema(NAME, 1, (
    TensorSpec("latent", "float32", "frames", axis=2),
    TensorSpec("prompt_states", "bfloat16", "prompt_tokens", per_caption=True),
))
LORA_PRESETS = {"mlp": ("fc1", "fc2"), "mlp-in": ("fc1",)}


class ToyPrepOptions(FamilyOptions):
    prompt_max_tokens: int = Field(64, gt=1, description="caption bytes kept, the BOS token included")


class ToyTrainOptions(FamilyOptions):
    velocity_loss: Literal["mse", "huber"] = "mse"


def _torch():
    import torch

    return torch


# ----------------------------------------------------------------------------------- modules
def _velocity_class():
    torch = _torch()

    class VelocityMLP(torch.nn.Module):
        """Two linears over each latent frame, conditioned on the pooled prompt and t."""

        def __init__(self, text_width: int, hidden: int):
            super().__init__()
            self.fc1 = torch.nn.Linear(FEATURES + text_width + TIME_FEATURES, hidden)
            self.fc2 = torch.nn.Linear(hidden, FEATURES)

        def forward(self, x, prompt, t):  # x [B, T, F], prompt [B, W], t [B]
            t = t.to(x.dtype)
            time = torch.stack([t, torch.sin(math.pi * t), torch.cos(math.pi * t)], dim=-1)
            condition = torch.cat([prompt.to(x.dtype), time], dim=-1)[:, None].expand(-1, x.shape[1], -1)
            return self.fc2(torch.nn.functional.silu(self.fc1(torch.cat([x, condition], dim=-1))))

    return VelocityMLP


def pooled(states, mask):
    """Mean of the real prompt states: ``[B, L, W]``, ``[B, L]`` -> ``[B, W]``."""
    weights = mask.to(states.dtype)[..., None]
    return (states * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)


@dataclass
class ToyBatch:
    latent: Any  # [B, T, F] frames first
    frame_mask: Any  # [B, T]
    prompt: Any  # [B, L, W]
    prompt_mask: Any  # [B, L]

    def to(self, device) -> "ToyBatch":
        return ToyBatch(*(value.to(device) for value in vars(self).values()))


def _pad(tensors):
    torch = _torch()
    lengths = torch.tensor([t.shape[0] for t in tensors])
    out = tensors[0].new_zeros((len(tensors), int(lengths.max()), *tensors[0].shape[1:]))
    for i, t in enumerate(tensors):
        out[i, : t.shape[0]] = t
    return out, torch.arange(out.shape[1])[None] < lengths[:, None]


def _recipe(config):
    from acestep_dist import flow

    name = config.timestep_sampler or "logit-normal"
    problem = flow.sampler_parameter_problem(name, config)
    if problem:
        raise UserError(f"{problem} ({NAME}'s default sampler)")
    mu, sigma = config.timestep_mu if config.timestep_mu is not None else 0.0, config.timestep_sigma or 1.0
    sampler = {"logit-normal": lambda: flow.LogitNormalTimesteps(mu, sigma),
               "max-logit-normal": lambda: flow.MaxLogitNormalTimesteps(mu, sigma),
               "uniform": lambda: flow.UniformTimesteps(config.timestep_shift or 1.0),
               "discrete-turbo": lambda: flow.DiscreteTimesteps.shifted(DEFAULT_STEPS, config.timestep_shift or 1.0)}[name]()
    dropout = 0.1 if config.cfg_dropout is None else config.cfg_dropout
    return flow.TrainingRecipe(name, sampler, dropout)


def _flow_module_class():
    torch = _torch()
    from acestep_dist.flow import cfg_dropout_mask, masked_mse_per_sample, noise_latents

    class ToyFlowModule(torch.nn.Module):
        def __init__(self, velocity, recipe, loss: str):
            super().__init__()
            self.velocity, self.recipe, self.loss = velocity, recipe, loss

        def forward(self, batch: ToyBatch, generators):
            B, T, F = batch.latent.shape
            device = batch.latent.device
            t, dropped, noise = torch.empty(B), torch.zeros(B, dtype=torch.bool), torch.zeros(B, T, F)
            for i, (generator, length) in enumerate(zip(generators, batch.frame_mask.sum(dim=1).tolist(), strict=True)):
                t[i] = self.recipe.timestep_sampler.sample(1, generator)[0]
                dropped[i] = cfg_dropout_mask(1, self.recipe.cfg_dropout, generator)[0]
                noise[i, :length] = torch.randn(length, F, generator=generator)  # over its own length only
            x_t, target = noise_latents(batch.latent, noise.to(device), t.to(device))
            prompt = pooled(batch.prompt, batch.prompt_mask)
            prompt = torch.where(dropped.to(device)[:, None], torch.zeros_like(prompt), prompt)
            prediction = self.velocity(x_t * batch.frame_mask[..., None], prompt, t.to(device))
            if self.loss == "mse":
                per_sample = masked_mse_per_sample(prediction, target, batch.frame_mask)
            else:
                error = torch.nn.functional.smooth_l1_loss(prediction, target, reduction="none").mean(dim=-1)
                mask = batch.frame_mask.to(error.dtype)
                per_sample = (error * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
            return per_sample.mean(), per_sample, t

    return ToyFlowModule


# ----------------------------------------------------------------------------------- the model
def read_config(folder: Path) -> dict[str, Any]:
    try:
        config = json.loads((folder / CONFIG_FILE).read_text())
    except (OSError, ValueError) as error:
        raise ModelLoadError(f"{folder}: unreadable {CONFIG_FILE} ({error})") from None
    if not isinstance(config, dict) or config.get("family") != NAME:
        raise ModelLoadError(f"{folder}/{CONFIG_FILE} does not name the family {NAME}")
    return config


class ToyModel(FamilyModel):
    def __init__(self, description: ModelDescription, purpose: str, device: str = "cpu"):
        from safetensors.torch import load_file

        self.description, self.purpose = description, purpose
        folder = Path(description.source)
        self.config = read_config(folder)
        try:
            weights = load_file(str(folder / WEIGHTS_FILE), device=device)
        except Exception as error:
            raise ModelLoadError(f"{folder}/{WEIGHTS_FILE} does not load: {error}") from None
        self.hop = int(self.config["hop"])
        self.projection = weights["encoder.projection"]  # [F, hop], orthonormal rows
        self.embedding = weights["text.embedding"]  # [257, W]
        self.velocity = _velocity_class()(int(self.config["text_width"]), int(self.config["hidden"])).to(device)
        self.velocity.load_state_dict({k.removeprefix("velocity."): v for k, v in weights.items()
                                       if k.startswith("velocity.")})

    # -------------------------------------------------------------------------- prep
    def encode_audio(self, wave, options=None):
        if wave.dim() != 2 or wave.shape[0] != 2:
            raise ValueError(f"expected a [2, n] waveform, got {list(wave.shape)}")
        frames = wave.shape[1] // self.hop
        mono = wave.mean(dim=0)[: frames * self.hop].reshape(frames, self.hop).to(self.projection)
        latent = mono @ self.projection.T  # [T, F]
        return {"latent": latent.reshape(frames, CHANNELS, HEIGHT).permute(1, 2, 0).cpu()}

    def prompt_states(self, caption: str, max_tokens: int):
        torch = _torch()
        ids = [BOS, *caption.encode("utf-8")][:max_tokens]
        return self.embedding[torch.tensor(ids, device=self.embedding.device)]

    def encode_text(self, records, options: ToyPrepOptions):
        return [{"prompt_states": self.prompt_states(r.caption, options.prompt_max_tokens).cpu()} for r in records]

    # ---------------------------------------------------------------------- training
    def collate(self, samples) -> ToyBatch:
        latent, frame_mask = _pad([s["latent"].float().reshape(FEATURES, -1).T for s in samples])
        prompt, prompt_mask = _pad([s["prompt_states"].float() for s in samples])
        return ToyBatch(latent, frame_mask, prompt, prompt_mask)

    def trainable(self, config, options: ToyTrainOptions, stored=None) -> "ToyTrainable":
        return ToyTrainable(self, config, options)

    # ---------------------------------------------------------------------- sampling
    def decode(self, latent):
        """``[T, F]`` -> ``[2, T * hop]``: the encoder's transpose (its rows are orthonormal)."""
        mono = (latent.to(self.projection) @ self.projection).reshape(-1)
        return mono[None].expand(2, -1).float().cpu()

    def render(self, velocity, request: RenderRequest):
        torch = _torch()
        from acestep_dist.flow import inference_timesteps

        frames = max(1, math.ceil(request.duration * self.sample_rate / self.hop))
        device = self.projection.device
        prompt = self.prompt_states(request.record.caption, ToyPrepOptions().prompt_max_tokens).float().mean(0)[None]
        guidance = 1.0 if request.guidance is None else request.guidance
        x = torch.randn(1, frames, FEATURES, generator=torch.Generator().manual_seed(int(request.seed))).to(device)
        schedule = [*inference_timesteps(request.steps or DEFAULT_STEPS, request.shift or 1.0).tolist(), 0.0]
        with torch.no_grad():
            for t, t_next in zip(schedule[:-1], schedule[1:]):
                time = torch.full((1,), t, device=device)
                v = velocity(x, prompt, time)
                if guidance != 1.0:
                    unconditioned = velocity(x, torch.zeros_like(prompt), time)
                    v = unconditioned + guidance * (v - unconditioned)
                x = x + (t_next - t) * v
        return self.decode(x[0])

    def generate(self, request: RenderRequest, lora: str | None = None, lora_scale: float = 1.0, log=print):
        if request.task != "text2music":
            raise UserError(f"{NAME} cannot {request.task}")
        if lora:
            weights = read_lora(lora)
            merge_lora(self.velocity, weights, lora_scale, lora)
            log(f"generate: LoRA {lora} (rank {weights['rank']}, alpha {weights['alpha']:g}) at scale {lora_scale:g}")
        return self.render(self.velocity.eval(), request)


# ------------------------------------------------------------------------------ LoRA files
def write_lora(path: Path, state: dict, rank: int, alpha: float, rslora: bool, targets, provenance=None) -> Path:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    header = {"kind": LORA_KIND, "rank": str(rank), "alpha": repr(float(alpha)), "rslora": json.dumps(rslora),
              "targets": json.dumps(list(targets)), "provenance": json.dumps(provenance or {})}
    save_file({k: v.detach().to("cpu").float().contiguous() for k, v in state.items()}, str(path), metadata=header)
    return path


def read_lora(path: str | Path) -> dict[str, Any]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            header = f.metadata() or {}
            if header.get("kind") != LORA_KIND:
                raise UserError(f"{path} is not a {NAME} LoRA (no {LORA_KIND} header)")
            state = {key: f.get_tensor(key) for key in f.keys()}
        return {"state": state, "rank": int(header["rank"]), "alpha": float(header["alpha"]),
                "rslora": json.loads(header["rslora"]), "targets": json.loads(header["targets"]),
                "provenance": json.loads(header["provenance"])}
    except UserError:
        raise
    except Exception as error:  # a missing or corrupt file
        raise UserError(f"{path} cannot be read as a {NAME} LoRA: {type(error).__name__}: {error}") from None


def merge_lora(velocity, weights: dict[str, Any], scale: float, where) -> None:
    """W += scale * alpha / r (or / sqrt r) * B @ A, per target linear."""
    torch = _torch()
    factor = weights["alpha"] / (math.sqrt(weights["rank"]) if weights["rslora"] else weights["rank"])
    with torch.no_grad():
        for target in weights["targets"]:
            layer = getattr(velocity, target, None)
            a, b = weights["state"].get(f"{target}.lora_A.weight"), weights["state"].get(f"{target}.lora_B.weight")
            if layer is None or a is None or b is None or (b @ a).shape != layer.weight.shape:
                raise UserError(f"LoRA {where} does not fit this {NAME} model at {target}")
            layer.weight += scale * factor * (b @ a).to(layer.weight)


class ToyTrainable(Trainable):
    def __init__(self, model: ToyModel, config, options: ToyTrainOptions):
        torch = _torch()
        from peft import LoraConfig, inject_adapter_in_model

        self.model, self.config, self.options = model, config, options
        velocity = model.velocity
        velocity.requires_grad_(False)
        self.targets: tuple[str, ...] = ()
        if config.model_type == "lora":
            self.targets = LORA_PRESETS[config.lora_preset]
            torch.manual_seed(config.seed)  # LoRA A starts random
            inject_adapter_in_model(LoraConfig(r=config.lora_rank, lora_alpha=config.lora_alpha,
                                               lora_dropout=config.lora_dropout, use_rslora=config.use_rslora,
                                               target_modules=list(self.targets)), velocity, adapter_name="default")
            params = [p for n, p in velocity.named_parameters() if "lora_" in n]
            for p in params:
                p.requires_grad_(True)
        else:
            velocity.requires_grad_(True)
            params = list(velocity.parameters())
        self.param_groups = [{"params": params, "lr": config.learning_rate, "name": "velocity"}]
        self.module = _flow_module_class()(velocity.train(), _recipe(config), options.velocity_loss)

    def describe(self) -> str:
        return f"{NAME} {self.config.model_type}, {self.options.velocity_loss} loss, {self.module.recipe.describe()}"

    def state(self) -> dict:
        return {"variant": self.model.description.variant, "velocity_loss": self.options.velocity_loss,
                "recipe": {"timestep_sampler": self.module.recipe.sampler_name,
                           "cfg_dropout": self.module.recipe.cfg_dropout}}

    def save(self, folder: Path) -> list[str]:
        from peft import get_peft_model_state_dict
        from safetensors.torch import save_file

        velocity = self.module.velocity
        if self.config.model_type == "lora":
            state = get_peft_model_state_dict(velocity, adapter_name="default")
            write_lora(folder / LORA_FILE, state, self.config.lora_rank, self.config.lora_alpha,
                       self.config.use_rslora, self.targets)
            return [LORA_FILE]
        save_file({k: v.detach().cpu().contiguous() for k, v in velocity.state_dict().items()},
                  str(folder / VELOCITY_FILE))
        return [VELOCITY_FILE]

    def render(self, request: RenderRequest):
        velocity = self.module.velocity
        was_training = velocity.training
        try:
            return self.model.render(velocity.eval(), request)
        finally:
            velocity.train(was_training)


# ------------------------------------------------------------------------------ the family
class ToyFamily(Family):
    name = NAME
    schema = SCHEMA
    variants = ("small",)
    default_variant = "small"
    lora_presets = tuple(LORA_PRESETS)
    lora_formats = ("safetensors",)
    full_formats = ("safetensors",)
    tasks = ("text2music",)
    max_generate_seconds = 30.0
    prep_options = ToyPrepOptions
    train_options = ToyTrainOptions

    def claims(self, model: str) -> int:
        path = Path(model).expanduser()
        try:
            return 2 if json.loads((path / CONFIG_FILE).read_text()).get("family") == NAME else 0
        except (OSError, ValueError, AttributeError):
            return 0  # not a folder of ours; never a hub id

    def describe(self, model: str) -> ModelDescription:
        folder = Path(model).expanduser().resolve()
        config = read_config(folder)
        weights = folder / WEIGHTS_FILE
        if not weights.is_file():
            raise ModelLoadError(f"{folder} lacks {WEIGHTS_FILE}")
        raw = (folder / CONFIG_FILE).read_bytes()
        rate, hop = int(config["sample_rate"]), int(config["hop"])
        return ModelDescription(
            family=NAME, variant=self.variant_name(config["variant"]), source=str(folder), layout="toy",
            sample_rate=rate, frames_per_second=rate / hop,
            fingerprint=hashlib.sha256(raw + str(weights.stat().st_size).encode()).hexdigest()[:16],
            dimensions={"channels": CHANNELS, "height": HEIGHT, "hop_length": hop,
                        "text_width": int(config["text_width"]), "hidden": int(config["hidden"])},
            details={"default_steps": DEFAULT_STEPS})

    def load(self, description: ModelDescription, purpose: str, *, dtype=None, device: str = "cpu") -> ToyModel:
        return ToyModel(description, purpose, device)  # tiny: every purpose gets every part, in float32

    def sample_bytes(self, description: ModelDescription, seconds: float, options=None) -> float:
        return 4 * FEATURES * description.frames_per_second * seconds + 2 * description.dimensions["text_width"] * 64

    def write_tiny(self, out: Path, variant: str, seed: int = 0, **options: Any) -> Path:
        torch = _torch()
        from safetensors.torch import save_file

        if options:
            raise UserError(f"{NAME} tiny checkpoints take no {', '.join(sorted(options))}")
        config = {"family": NAME, "variant": self.variant_name(variant), "sample_rate": 16000, "hop": 320,
                  "text_width": 12, "hidden": 48, "seed": seed}
        generator = torch.Generator().manual_seed(seed)
        columns, _ = torch.linalg.qr(torch.randn(config["hop"], FEATURES, generator=generator))
        torch.manual_seed(seed)
        velocity = _velocity_class()(config["text_width"], config["hidden"])
        weights = {"encoder.projection": columns.T.contiguous(),
                   "text.embedding": 0.5 * torch.randn(BOS + 1, config["text_width"], generator=generator),
                   **{f"velocity.{k}": v.detach().contiguous() for k, v in velocity.state_dict().items()}}
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        save_file(weights, str(out / WEIGHTS_FILE))
        (out / CONFIG_FILE).write_text(json.dumps(config, indent=1) + "\n")
        return out

    def check_training(self, description: ModelDescription, config, options: ToyTrainOptions, stored=None) -> str:
        if config.model_type == "lora" and config.lora_preset not in LORA_PRESETS:
            raise UserError(f"lora_preset {config.lora_preset!r} is not one of {NAME}'s: {', '.join(LORA_PRESETS)}")
        if config.init_lora:
            raise UserError(f"{NAME} does not continue from an init_lora")
        return _recipe(config).describe()

    def lora_info(self, path: str) -> dict[str, Any]:
        weights = read_lora(path)
        return {"rank": weights["rank"], "alpha": weights["alpha"], "provenance": weights["provenance"]}

    def export_lora(self, run_folder, weights, out, formats, name, provenance):
        if LORA_FILE not in weights:
            raise UserError(f"{run_folder} lists no {LORA_FILE} among its weights ({', '.join(weights)})")
        lora = read_lora(run_folder / LORA_FILE)
        target = write_lora(Path(out) / "safetensors" / f"{name}.safetensors", lora["state"], lora["rank"],
                            lora["alpha"], lora["rslora"], lora["targets"], provenance)
        body = (f"safetensors/{name}.safetensors: a {NAME} LoRA, rank {lora['rank']}, alpha {lora['alpha']:g}, on "
                f"{', '.join(lora['targets'])}.\nacedist: acedist generate --model BASE --lora {target.name} ...")
        return [target], body

    def export_full(self, description, run_folder, weights, out, formats):
        from safetensors.torch import load_file, save_file

        if VELOCITY_FILE not in weights:
            raise UserError(f"{run_folder} lists no {VELOCITY_FILE} among its weights ({', '.join(weights)})")
        base = Path(description.source)
        merged = load_file(str(base / WEIGHTS_FILE))
        merged.update({f"velocity.{k}": v for k, v in load_file(str(Path(run_folder) / VELOCITY_FILE)).items()})
        target = Path(out) / "safetensors"
        target.mkdir(parents=True, exist_ok=True)
        save_file(merged, str(target / WEIGHTS_FILE))
        (target / CONFIG_FILE).write_bytes((base / CONFIG_FILE).read_bytes())
        return [target / WEIGHTS_FILE], f"safetensors/: a whole {NAME} checkpoint folder (acedist generate --model it)"


FAMILY = ToyFamily()
