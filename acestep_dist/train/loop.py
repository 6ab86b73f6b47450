"""The training loop each Ray Train worker runs: DeepSpeed engine, exact batches, checkpoints,
metrics and validation renders.

Everything random is keyed, not drawn from a running stream: a sample's timestep, condition
dropout and noise come from (seed, epoch, position), LoRA dropout from (seed, step, micro-step,
rank). A run restored from a checkpoint at step N therefore continues exactly as the
uninterrupted run, and the sample order does not depend on how many workers share the batch.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import TrainConfig
from ..families.ace_step_15 import AceStep15
from ..records import Record
from .checkpoints import write_files_list
from .data import EpochPlan, SampleReader, _seed, index_shards, iterate_micro_batches
from .layout import LORA_FILE, LYRIC_ENCODER_FILE, STATE_FILE, TRANSFORMER_DIR
from .model import build_trainable, lora_weights

CHECKPOINT_TAG = "engine"


def _skip_shm_op_build() -> None:
    """DeepSpeed compiles a shared-memory op (30-45 s) on its first CPU initialise; it is only used
    for inference all-reduce. The module must be patched through sys.modules (`import
    deepspeed.comm.torch` resolves to torch, not to DeepSpeed's module)."""
    import deepspeed.comm  # noqa: F401

    module = sys.modules.get("deepspeed.comm.torch")
    if module is not None and hasattr(module, "build_shm_op"):
        module.build_shm_op = lambda: None


def lr_lambda(config: TrainConfig, total_steps: int):
    warmup = min(config.lr_warmup_steps, max(total_steps - 1, 0))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if config.lr_scheduler == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total_steps - warmup)
        if config.lr_scheduler == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def deepspeed_config(config: TrainConfig, world_size: int, use_gpu: bool) -> dict[str, Any]:
    zero: dict[str, Any] = {"stage": config.zero_stage}
    if config.offload_optimizer:
        if config.zero_stage == 0:
            raise ValueError("offload_optimizer needs zero_stage 1, 2 or 3")
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": use_gpu}
    ds = {
        "train_micro_batch_size_per_gpu": config.train_batch_size,
        "gradient_accumulation_steps": config.gradient_accumulation_steps,
        "train_batch_size": config.train_batch_size * config.gradient_accumulation_steps * world_size,
        "zero_optimization": zero,
        # a torch AdamW: DeepSpeed's fused / CPU Adam compile for a minute and tie the build to the CPU
        "zero_force_ds_cpu_optimizer": False,
        "bf16": {"enabled": use_gpu and config.mixed_precision == "bf16"},
        "fp16": {"enabled": use_gpu and config.mixed_precision == "fp16"},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if config.max_grad_norm > 0:
        ds["gradient_clipping"] = config.max_grad_norm
    return ds


class _Gathered:
    """All parameters whole for the duration (ZeRO-3 partitions them); a no-op otherwise."""

    def __init__(self, module: torch.nn.Module, zero_stage: int):
        self.module, self.active = module, zero_stage == 3
        self._context = None

    def __enter__(self):
        if self.active:
            import deepspeed

            self._context = deepspeed.zero.GatheredParameters(list(self.module.parameters()), modifier_rank=None)
            self._context.__enter__()
        return self

    def __exit__(self, *exc):
        if self._context is not None:
            self._context.__exit__(*exc)


def _save_weights(folder: Path, trainable, config: TrainConfig, targets) -> None:
    """The trained weights in plain safetensors / diffusers form (rank 0, parameters gathered)."""
    from safetensors.torch import save_file

    from ..families.ace_step_15.lora_formats import write_diffusers

    transformer = trainable.family.components.transformer
    if config.model_type == "lora":
        written = write_diffusers(lora_weights(transformer, config, targets), folder)
        written.rename(folder / LORA_FILE)
    else:
        transformer.save_pretrained(str(folder / TRANSFORMER_DIR), safe_serialization=True)
    if config.lyrics_embedder_train:
        encoder = trainable.family.components.condition_encoder.lyric_encoder
        save_file({k: v.detach().cpu().contiguous() for k, v in encoder.state_dict().items()},
                  str(folder / LYRIC_ENCODER_FILE))


def train_worker(job: dict[str, Any]) -> None:
    """Ray Train entry point (one call per worker process)."""
    import deepspeed
    import ray.train
    from ray.train import Checkpoint

    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    config = TrainConfig.model_validate(job["config"])
    use_gpu = bool(job["use_gpu"]) and torch.cuda.is_available()
    device = torch.device(f"cuda:{context.get_local_rank()}" if use_gpu else "cpu")
    if use_gpu:
        torch.cuda.set_device(device)
    _skip_shm_op_build()
    run = job["run"]
    validate = config.validation_step_interval > 0 and rank == 0
    parts = ("transformer", "condition_encoder", "text_encoder", "tokenizer") + (("vae",) if validate else ())
    family = AceStep15.load(job["model"], parts, dtype=torch.float32, device=device)
    trainable = build_trainable(family, config)
    targets = family.lora_targets(config.lora_preset) if config.model_type == "lora" else ()
    if not validate:
        family.components.text_encoder = None  # only its token table is needed (kept by the module)

    refs = index_shards(job["data"])
    plan = EpochPlan(refs, config.seed, config.train_batch_size, config.gradient_accumulation_steps, world)
    total_steps = config.max_train_steps or config.num_train_epochs * plan.steps_per_epoch

    optimizer = torch.optim.AdamW(
        [{k: v for k, v in g.items() if k != "name"} for g in trainable.param_groups],
        lr=config.learning_rate, betas=(config.adam_beta1, config.adam_beta2), weight_decay=config.weight_decay,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config, total_steps))
    engine, _, _, _ = deepspeed.initialize(
        model=trainable.module, optimizer=optimizer, lr_scheduler=scheduler,
        config=deepspeed_config(config, world, use_gpu),
    )

    start_step = 0
    restored = ray.train.get_checkpoint()
    if restored is not None and Path(restored.path).name in job.get("earlier_checkpoints", ()):
        # Ray offers the latest checkpoint of an earlier launch, which may be damaged; the driver has
        # verified them and chosen the newest intact one. Checkpoints this launch reported (a restart
        # after a worker failure) are Ray's to give.
        restored = None
    if restored is None and job.get("resume_from"):
        restored = Checkpoint(job["resume_from"], filesystem=job.get("resume_filesystem"))
    if restored is not None:
        with restored.as_directory() as folder:
            saved = json.loads((Path(folder) / STATE_FILE).read_text())
            if saved["world_size"] != world and config.zero_stage > 0:
                # ZeRO keeps one optimizer partition per worker: another worker count cannot load them
                raise ValueError(f"the checkpoint was written by {saved['world_size']} workers under ZeRO-"
                                 f"{config.zero_stage}; resume with the same number of workers")
            engine.load_checkpoint(folder, tag=CHECKPOINT_TAG)  # our own checkpoint, written by this run
            start_step = saved["step"]
    if rank == 0:
        print(f"train: {len(refs)} samples ({plan.epoch_size} with repeats), {plan.steps_per_epoch} steps per epoch "
              f"of global batch {plan.global_batch}; {trainable.trainable_parameters:,} trainable parameters; "
              f"steps {start_step} -> {total_steps} on {world} worker(s), {'GPU' if use_gpu else 'CPU fp32'}, "
              f"ZeRO-{config.zero_stage}; {trainable.recipe.describe()}", flush=True)

    writer, tb_local = None, None
    if rank == 0:
        from torch.utils.tensorboard import SummaryWriter

        if "://" in run:  # an object store cannot append: events are written here and copied to RUN/tb
            tb_local = tempfile.mkdtemp(prefix="acedist-tb-")
        writer = SummaryWriter(tb_local or os.path.join(run, "tb"))

    crash_at = int(os.environ.get("ACEDIST_TRAIN_CRASH_AT_STEP", "-1"))  # test hook: a worker dies once
    stall_after = int(os.environ.get("ACEDIST_TRAIN_STALL_AFTER_STEP", "-1"))  # test hook: hang, to be killed

    reader = SampleReader(refs)
    step, window_loss, window_samples, window_start = start_step, [], 0, time.perf_counter()
    window_timesteps: list[torch.Tensor] = []
    for micro_batch in iterate_micro_batches(plan, reader, rank, start_step, total_steps, job.get("loader_workers", 0)):
        step, micro = micro_batch["step"], micro_batch["micro"]
        if step == crash_at and rank == world - 1 and start_step == 0 and micro == 0:
            time.sleep(3)  # Ray's controller picks up reported checkpoints by polling
            os.kill(os.getpid(), signal.SIGKILL)
        torch.manual_seed(_seed(config.seed, "dropout", step, micro, rank))
        batch = family.collate(micro_batch["samples"]).to(device)
        generators = [plan.generator(item) for item in micro_batch["items"]]
        loss, _, timesteps = engine(batch, generators)
        engine.backward(loss)
        engine.step()
        window_loss.append(loss.detach().float())
        window_timesteps.append(timesteps.detach().float().cpu())
        window_samples += len(generators)
        if micro != config.gradient_accumulation_steps - 1:
            continue
        done = step + 1

        if done % config.log_interval == 0 or done == total_steps:
            mean_loss = torch.stack(window_loss).mean()
            drawn = torch.cat(window_timesteps)
            if world > 1:
                torch.distributed.all_reduce(mean_loss)
                mean_loss /= world
                every_rank = [None] * world
                torch.distributed.all_gather_object(every_rank, drawn)
                drawn = torch.cat(every_rank)
            elapsed = time.perf_counter() - window_start
            steps_in_window = len(window_loss) / config.gradient_accumulation_steps
            metrics = {"loss": float(mean_loss), "lr": scheduler.get_last_lr()[0],
                       "grad_norm": float(engine.get_global_grad_norm() or 0.0),
                       "samples_per_s": window_samples * world / elapsed, "step_time_s": elapsed / steps_in_window}
            if use_gpu:
                metrics["gpu_memory_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
            if rank == 0:
                print(f"step {done}/{total_steps}  loss {metrics['loss']:.4f}  lr {metrics['lr']:.2e}  "
                      f"grad {metrics['grad_norm']:.3f}  {metrics['samples_per_s']:.1f} samples/s", flush=True)
                if writer is not None:
                    for name, value in metrics.items():
                        writer.add_scalar(f"train/{name}", value, done)
                    # the timesteps the recipe drew in this window: a user sees what the run trains on
                    writer.add_histogram("train/timesteps", drawn.numpy(), done, bins=np.linspace(0.0, 1.0, 41))
            window_loss, window_samples, window_timesteps, window_start = [], 0, [], time.perf_counter()

        if config.validation_step_interval and done % config.validation_step_interval == 0:
            _validate(engine, trainable, family, config, run, done, writer, rank)

        if done % config.checkpointing_steps == 0 or done == total_steps:
            with tempfile.TemporaryDirectory() as folder:
                engine.save_checkpoint(folder, tag=CHECKPOINT_TAG)
                with _Gathered(trainable.module, config.zero_stage):
                    if rank == 0:
                        _save_weights(Path(folder), trainable, config, targets)
                if rank == 0:
                    state = {"step": done, "total_steps": total_steps, "model": job["model"], "data": job["data"],
                             "variant": family.variant.name, "model_type": config.model_type,
                             "recipe": {"timestep_sampler": trainable.recipe.sampler_name,
                                        "cfg_dropout": trainable.recipe.cfg_dropout},
                             "config": config.model_dump(), "world_size": world, "started_at_step": start_step}
                    (Path(folder) / STATE_FILE).write_text(json.dumps(state, indent=1))
                # last: the list of this rank's files is what makes its part of the checkpoint count
                write_files_list(Path(folder), rank, world, done)
                ray.train.report({"step": done}, checkpoint=Checkpoint.from_directory(folder))
            if tb_local is not None:
                _upload_tensorboard(writer, tb_local, run)
        if done == stall_after and rank == 0:
            time.sleep(3600)
    reader.close()
    if writer is not None:
        writer.close()
    if tb_local is not None:
        _upload_tensorboard(writer, tb_local, run)
        shutil.rmtree(tb_local, ignore_errors=True)


def _upload_tensorboard(writer, folder: str, run: str) -> None:
    """Copy the event files written to ``folder`` into RUN/tb (a run at a URL), whole each time."""
    from ..storage import open_fs

    writer.flush()
    fs, root = open_fs(run)
    for file in sorted(Path(folder).iterdir()):
        fs.put_file(str(file), f"{root}/tb/{file.name}")


def _validate(engine, trainable, family: AceStep15, config: TrainConfig, run: str, step: int, writer, rank: int) -> None:
    """Render the validation prompt with the weights as they stand (all ranks gather under ZeRO-3)."""
    import fsspec

    from ..audio import write_audio

    with _Gathered(trainable.module, config.zero_stage), torch.no_grad():
        if rank != 0:
            return
        record = Record(key="validation", audio="", caption=config.validation_prompt or "",
                        lyrics=config.validation_lyrics, duration=config.validation_audio_duration)
        was_training = family.components.transformer.training
        family.components.transformer.eval()
        audio = family.generate(record, duration=config.validation_audio_duration, seed=config.validation_seed,
                                steps=config.validation_steps, guidance=config.validation_guidance)[0]
        audio = audio[..., : int(round(config.validation_audio_duration * family.sample_rate))]
        family.components.transformer.train(was_training)
    fs, root = fsspec.core.url_to_fs(run)
    fs.makedirs(f"{root}/samples", exist_ok=True)
    with tempfile.TemporaryDirectory() as folder:
        local = Path(folder) / f"step-{step}.wav"
        write_audio(local, audio.numpy(), family.sample_rate)
        fs.put_file(str(local), f"{root}/samples/step-{step}.wav")
    if writer is not None:
        writer.add_audio("validation", audio.mean(dim=0, keepdim=True), step, sample_rate=family.sample_rate)
