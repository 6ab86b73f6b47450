"""What an ACE-Step v1 training worker optimises, with upstream's trainer.py loss.

Upstream's step: t index = clamp(floor(sigmoid(N(mu, sigma)) * 1000)) into its shift-3 schedule of
1000 steps; ``x_t = s * noise + (1 - s) * x0``; the DiT gets ``t = s * 1000``; its output is
preconditioned to an x0 estimate ``x_t - s * v`` and compared with x0 (MSE over the real frames);
CFG dropout zeroes the caption states (15 %), the speaker embedding (50 %) and the lyric ids and
mask (15 %), each drawn per sample. Here every draw comes from the sample's own generator and the
mean runs over its own frames, so a sample's loss does not depend on its batch mates or worker.

Samples prepared with SSL states (prep's ``ssl_mert`` / ``ssl_mhubert``) add upstream's alignment
term: the DiT's projectors predict them and a sample's loss gains ``ssl_loss_weight`` x the mean of
its terms (upstream: ``loss + ssl_coeff * mean(proj_losses)``, coeff 1.0; SimpleTuner 0.1), each term
over that sample's own frames. A batch may mix samples with and without them: each sample gets the
terms of what it carries (none: the denoising loss alone). One prep output is uniform (its options
are part of its fingerprint), so in practice every rank's batches are alike.

``config`` is an ``acestep_dist.config.TrainConfig`` (general keys), ``options`` the family's own.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from ...errors import UserError
from ..base import RenderRequest, Trainable
from ..common import adapter_config, adapter_parameters, adapter_state, is_adapter_key
from .lora_formats import LYRIC_ENCODER_FILE  # lyric embedding + Conformer + projection, when trained
from .model import V1Batch, V1Operations, training_schedule
from .options import TrainOptions, lora_targets

ADAPTER_NAME = "default"
LORA_FILE = "pytorch_lora_weights.safetensors"  # upstream's adapter file (keys without prefix)
TRANSFORMER_DIR = "ace_step_transformer"  # full fine-tunes: the DiT as upstream's folder
LYRIC_PARTS = ("lyric_embs", "lyric_encoder", "lyric_proj")
SAMPLERS = ("logit-normal",)  # upstream v1's only training draw


@dataclass(frozen=True)
class V1Recipe:
    """Upstream v1's per-sample draws."""

    shift: float = 3.0
    mu: float = 0.0
    sigma: float = 1.0
    text_dropout: float = 0.15
    speaker_dropout: float = 0.5
    lyric_dropout: float = 0.15
    ssl_weight: float = 1.0  # of the SSL alignment term, for samples that carry SSL states

    def describe(self) -> str:
        return (f"timesteps logit-normal index (mu={self.mu:g}, sigma={self.sigma:g}) over a 1000-step shift-"
                f"{self.shift:g} schedule, x0-preconditioned MSE, cfg dropout text {self.text_dropout:g} / speaker "
                f"{self.speaker_dropout:g} / lyrics {self.lyric_dropout:g}, SSL alignment weight {self.ssl_weight:g} "
                f"(samples prepared with SSL states)")


def training_recipe(config, options: TrainOptions) -> V1Recipe:
    sampler = config.timestep_sampler or "logit-normal"
    if sampler not in SAMPLERS:
        raise UserError(f"timestep_sampler {sampler!r}: ACE-Step v1 trains with upstream's logit-normal index "
                        f"(set timestep_mu / timestep_sigma, and flow_schedule_shift for its schedule)")
    if config.cfg_dropout is not None:
        raise UserError("cfg_dropout: ACE-Step v1 drops caption, speaker and lyrics apart; set cfg_dropout_text, "
                        "cfg_dropout_speaker and cfg_dropout_lyrics instead")
    return V1Recipe(shift=options.flow_schedule_shift,
                    mu=0.0 if config.timestep_mu is None else config.timestep_mu,
                    sigma=1.0 if config.timestep_sigma is None else config.timestep_sigma,
                    text_dropout=options.cfg_dropout_text, speaker_dropout=options.cfg_dropout_speaker,
                    lyric_dropout=options.cfg_dropout_lyrics, ssl_weight=options.ssl_loss_weight)


class V1LossModule(torch.nn.Module):
    """``forward(batch, generators)`` -> (mean loss, per-sample losses [B], sigmas [B]). The DiT is
    its child, so DeepSpeed (ZeRO-3 included) partitions and hooks it."""

    def __init__(self, transformer: torch.nn.Module, recipe: V1Recipe, speaker_dim: int):
        super().__init__()
        self.transformer = transformer
        transformer.mask_padding = True  # a padded sample's loss is its loss alone
        self.recipe = recipe
        self.speaker_dim = speaker_dim
        sigmas, timesteps = training_schedule(recipe.shift)
        self.register_buffer("sigmas", sigmas, persistent=False)
        self.register_buffer("timesteps", timesteps, persistent=False)

    def draws(self, batch: V1Batch, generators: Sequence[torch.Generator]):
        """Per sample, from its own generator: schedule index, the three CFG keeps, the noise."""
        recipe = self.recipe
        B, C, H, T = batch.latents.shape
        lengths = batch.frame_mask.sum(dim=1).tolist()
        index = torch.empty(B, dtype=torch.long)
        keep = torch.ones(3, B, dtype=torch.bool)  # text, speaker, lyrics
        noise = torch.zeros(B, C, H, T)
        for i, (generator, length) in enumerate(zip(generators, lengths, strict=True)):
            u = torch.sigmoid(torch.randn(1, generator=generator) * recipe.sigma + recipe.mu)
            index[i] = (u * len(self.sigmas)).long().clamp(0, len(self.sigmas) - 1)[0]
            for row, rate in enumerate((recipe.text_dropout, recipe.speaker_dropout, recipe.lyric_dropout)):
                keep[row, i] = not bool(torch.rand(1, generator=generator)[0] < rate)
            noise[i, :, :, :length] = torch.randn(C, H, length, generator=generator)
        return index, keep, noise

    def forward(self, batch: V1Batch, generators: Sequence[torch.Generator]):
        device = batch.latents.device
        dtype = next(self.transformer.parameters()).dtype
        index, keep, noise = self.draws(batch, generators)
        index, keep, noise = index.to(device), keep.to(device), noise.to(device)
        sigma = self.sigmas[index].view(-1, 1, 1, 1)
        x0 = batch.latents
        x_t = sigma * noise + (1.0 - sigma) * x0  # padded frames stay 0: x0 and noise are 0 there
        text = batch.text_states * keep[0].view(-1, 1, 1).to(batch.text_states.dtype)
        speaker = torch.zeros(len(index), self.speaker_dim, device=device, dtype=dtype)  # upstream: no speaker
        lyric_ids = batch.lyric_ids * keep[2].view(-1, 1)
        lyric_mask = batch.lyric_mask & keep[2].view(-1, 1)
        output = self.transformer(
            hidden_states=x_t.to(dtype),
            attention_mask=batch.frame_mask.to(dtype),
            encoder_text_hidden_states=text.to(dtype),
            text_attention_mask=batch.text_mask.long(),
            speaker_embeds=speaker,
            lyric_token_idx=lyric_ids,
            lyric_mask=lyric_mask.long(),
            timestep=self.timesteps[index].to(dtype),
            ssl_hidden_states=self.ssl_targets(batch),
            return_dict=True,
        )
        x0_hat = output.sample.float() * (-sigma) + x_t
        squared = (x0_hat - x0.float()).pow(2).mean(dim=(1, 2))  # [B, T]
        frames = batch.frame_mask.to(squared.dtype)
        per_sample = (squared * frames).sum(dim=1) / frames.sum(dim=1).clamp(min=1.0)
        if output.proj_losses:
            per_sample = per_sample + self.recipe.ssl_weight * self.ssl_term(output.proj_losses)
        return per_sample.mean(), per_sample, self.sigmas[index].detach().cpu()

    def ssl_targets(self, batch: V1Batch) -> list | None:
        """The batch's SSL states in the DiT's projector order (``ssl_names``), None where a kind is
        absent; None when there is nothing to align (or the weight is 0)."""
        from .ssl import KINDS

        if not batch.ssl_states or self.recipe.ssl_weight == 0:
            return None
        names, dims = list(self.transformer.ssl_names), list(self.transformer.ssl_latent_dims)
        targets: list = [None] * len(names)
        for kind in KINDS:
            states = batch.ssl_states.get(kind.tensor)
            if states is None:
                continue
            if kind.dit_name not in names:
                raise UserError(f"the data holds {kind.tensor} but this DiT has no {kind.dit_name!r} projector "
                                f"(its ssl_names: {names}); prepare without {kind.option} or set ssl_loss_weight: 0")
            slot = names.index(kind.dit_name)
            wrong = {int(t.shape[-1]) for t in states if t is not None} - {dims[slot]}
            if wrong:
                raise UserError(f"{kind.tensor} of width {sorted(wrong)} in the data, but this DiT's {kind.dit_name} "
                                f"projector predicts {dims[slot]}: the data was prepared with another SSL model "
                                f"than {kind.title}")
            targets[slot] = states
        return targets

    @staticmethod
    def ssl_term(proj_losses) -> torch.Tensor:
        """Per sample, the mean of the SSL terms it has (0 without any): ``[B]``."""
        total, count = None, None
        for _, (losses, present) in proj_losses:
            weight = present.to(losses.dtype)
            total = losses * weight if total is None else total + losses * weight
            count = weight if count is None else count + weight
        return total / count.clamp(min=1.0)


def lyric_parameters(transformer: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for part in LYRIC_PARTS for p in getattr(transformer, part).parameters()]


def check_training(transformer_config: dict, config, options: TrainOptions) -> V1Recipe:
    """On the driver, before any worker starts: the recipe, the preset, and ``init_lora`` fitting
    the run (rank, alpha, targets) and the DiT (built on the meta device: no weights read)."""
    recipe = training_recipe(config, options)
    if config.model_type == "lora":
        lora_targets(config.lora_preset)
    if config.init_lora:
        if config.model_type != "lora":
            raise UserError("init_lora applies to model_type: lora only")
        from .lora_formats import check_init_lora, read_lora
        from .transformer import ACEStepTransformer2DModel

        weights = read_lora(config.init_lora)
        with torch.device("meta"):
            transformer = ACEStepTransformer2DModel.from_config(transformer_config)
        check_init_lora(weights, config, lora_targets(config.lora_preset), transformer)
    return recipe


class V1Trainable(Trainable):
    """Freezes everything, then opens what the config trains: LoRA adapters (optionally from
    ``init_lora``) or the whole DiT, and optionally the lyric embedding + Conformer + projection in
    full with their own rate (SimpleTuner's ``lyrics_embedder_train``)."""

    def __init__(self, operations: V1Operations, config, options: TrainOptions):
        from peft import set_peft_model_state_dict

        self.operations, self.config, self.options = operations, config, options
        transformer = operations.components.transformer
        transformer.requires_grad_(False)
        self.targets: tuple[str, ...] = ()
        if config.model_type == "lora":
            from .lora_formats import load_init_lora

            self.targets = lora_targets(config.lora_preset)
            # read and checked against the plain DiT, before adapters wrap its layers
            init = load_init_lora(config, self.targets, transformer) if config.init_lora else None
            torch.manual_seed(config.seed)  # adapters start random: the same start on every worker
            transformer.add_adapter(adapter_config(config, self.targets), adapter_name=ADAPTER_NAME)
            if init is not None:
                set_peft_model_state_dict(transformer, init.state, adapter_name=ADAPTER_NAME)
            dit_params = adapter_parameters(transformer)
            for p in dit_params:
                p.requires_grad_(True)
        else:
            if config.init_lora:
                raise UserError("init_lora applies to model_type: lora only")
            transformer.requires_grad_(True)
            dit_params = list(transformer.parameters())
        groups = [{"params": dit_params, "lr": config.learning_rate, "name": "dit"}]
        if options.lyrics_embedder_train:
            lyric = lyric_parameters(transformer)
            for p in lyric:
                p.requires_grad_(True)
            if config.model_type == "full":  # already in the DiT's group: give them their own rate
                ids = {id(p) for p in lyric}
                groups[0]["params"] = [p for p in dit_params if id(p) not in ids]
            groups.append({"params": lyric, "lr": options.lyrics_embedder_lr or config.learning_rate,
                           "name": "lyric_encoder"})
        self.param_groups = groups
        transformer.train()
        # The Conformer's dropout draws from the global generator, which would make a sample's loss
        # depend on its batch mates and worker: it runs without dropout unless it trains in full.
        transformer.lyric_encoder.train(options.lyrics_embedder_train)
        if config.gradient_checkpointing:
            transformer.enable_gradient_checkpointing()
        if self.trainable_parameters == 0:
            raise UserError("nothing to train: the configuration leaves every parameter frozen")
        self.module = V1LossModule(transformer, training_recipe(config, options), operations.speaker_dim)

    @property
    def recipe(self) -> V1Recipe:
        return self.module.recipe

    def describe(self) -> str:
        return self.recipe.describe()

    def state(self) -> dict:
        return {"variant": "base", "recipe": vars(self.recipe)}

    def lora_weights(self):
        """The adapter as it stands (call under ZeRO-3 parameter gathering)."""
        from ..adapters import AdapterSpec, AdapterWeights
        from .lora_formats import targets_of

        state = adapter_state(self.operations.components.transformer, ADAPTER_NAME)
        weights = AdapterWeights(AdapterSpec.from_config(self.config), state)
        weights.targets = targets_of(weights.modules)
        return weights

    def save(self, folder: Path) -> list[str]:
        from safetensors.torch import save_file

        from .lora_formats import write_upstream

        transformer = self.operations.components.transformer
        if self.config.model_type == "lora":
            write_upstream(self.lora_weights(), folder / LORA_FILE)
            written = [LORA_FILE]
        else:
            transformer.save_pretrained(str(folder / TRANSFORMER_DIR), safe_serialization=True)
            written = [TRANSFORMER_DIR]
        if self.options.lyrics_embedder_train and self.config.model_type == "lora":
            state = {f"{part}.{k}": v.detach().cpu().contiguous() for part in LYRIC_PARTS
                     for k, v in getattr(transformer, part).state_dict().items() if not is_adapter_key("." + k)}
            save_file({k.replace(".base_layer", ""): v for k, v in state.items()}, str(folder / LYRIC_ENCODER_FILE))
            written.append(LYRIC_ENCODER_FILE)
        return written

    def render(self, request: RenderRequest) -> torch.Tensor:
        from .generation import render

        transformer = self.operations.components.transformer
        was_training = transformer.training
        transformer.eval()
        try:
            audio = render(self.operations, request, lyrics_vocab=self.options.lyrics_vocab)
        finally:
            transformer.train(was_training)
            transformer.lyric_encoder.train(was_training and self.options.lyrics_embedder_train)
        return audio
