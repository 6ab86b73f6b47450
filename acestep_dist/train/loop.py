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
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import faults
from ..config import TrainConfig
from ..families import RenderRequest, Trainable, get
from ..records import Record
from .checkpoints import write_files_list
from .data import EpochPlan, SampleReader, _seed, iterate_micro_batches, open_training_data
from .ema import WeightsAverage
from .frozen_precision import QuantizedBase, check_device_support, quantize_frozen_base
from .layout import EMA_AVERAGE_FILE, EMA_DIR, STATE_FILE
from .optimizers import build_optimizer, deepspeed_settings

CHECKPOINT_TAG = "engine"


def _skip_shm_op_build() -> None:
    """The one patch of DeepSpeed (a global side effect of each worker process): DeepSpeed compiles
    a shared-memory op (30-45 s) on its first CPU initialise; it is only used for inference
    all-reduce. The module must be patched through sys.modules (`import deepspeed.comm.torch`
    resolves to torch, not to DeepSpeed's module)."""
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


# DeepSpeed's default gradient bucket (5e8 elements, 1 GB in bf16) is allocated whole on the GPU
# at ZeRO 1-3, however few parameters train: a LoRA of a few million parameters needs a bucket of
# its own size. Buckets group the all-reduce of whole gradients (each element is still summed over
# the same workers), so their size does not change a result.
DEEPSPEED_REDUCE_BUCKET = 500_000_000
SMALLEST_REDUCE_BUCKET = 10_000_000


def reduce_bucket_size(trainable_parameters: int) -> int:
    """Elements of ZeRO's gradient bucket: every trained element at once, within DeepSpeed's default."""
    return int(min(DEEPSPEED_REDUCE_BUCKET, max(trainable_parameters, SMALLEST_REDUCE_BUCKET)))


def deepspeed_config(config: TrainConfig, world_size: int, use_gpu: bool,
                     trainable_parameters: int | None = None) -> dict[str, Any]:
    zero: dict[str, Any] = {"stage": config.zero_stage}
    if config.zero_stage > 0 and trainable_parameters is not None:
        zero["reduce_bucket_size"] = reduce_bucket_size(trainable_parameters)
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
    return {**ds, **deepspeed_settings(config)}


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


@dataclass
class _Window:
    """Metrics of the optimizer steps since the last log line."""

    losses: list = field(default_factory=list)
    timesteps: list = field(default_factory=list)
    samples: int = 0
    started: float = field(default_factory=time.perf_counter)


@dataclass
class _Worker:
    """One Ray Train worker's run: what the steps below share."""

    job: dict[str, Any]
    config: TrainConfig
    rank: int
    world: int
    use_gpu: bool
    device: torch.device
    model: Any = None  # the family's FamilyModel
    trainable: Trainable | None = None
    quantized: QuantizedBase | None = None  # base_model_precision other than no_change
    engine: Any = None
    average: WeightsAverage | None = None  # use_ema
    scheduler: Any = None
    plan: EpochPlan | None = None
    reader: SampleReader | None = None
    total_steps: int = 0
    start_step: int = 0
    writer: Any = None
    tb_local: str | None = None

    @property
    def validates(self) -> bool:
        return self.config.validation_step_interval > 0 and self.rank == 0


def train_worker(job: dict[str, Any]) -> None:
    """Ray Train entry point (one call per worker process)."""
    worker = _start(job)
    _load_model_and_data(worker)
    _build_engine(worker)
    _restore(worker)
    _open_metrics(worker)
    _train(worker)
    _close(worker)


def _start(job: dict[str, Any]) -> _Worker:
    import ray.train

    context = ray.train.get_context()
    config = TrainConfig.model_validate(job["config"])
    use_gpu = bool(job["use_gpu"]) and torch.cuda.is_available()
    device = torch.device(f"cuda:{context.get_local_rank()}" if use_gpu else "cpu")
    if use_gpu:
        torch.cuda.set_device(device)
    _skip_shm_op_build()
    return _Worker(job, config, context.get_world_rank(), context.get_world_size(), use_gpu, device)


def _load_model_and_data(worker: _Worker) -> None:
    job, config = worker.job, worker.config
    family = get(job["family"])
    description = family.describe(job["model"])
    data = open_training_data(job["data"])
    check_device_support(config.base_model_precision, worker.device)
    worker.model = family.load(description, "validate" if worker.validates else "train",
                               dtype=compute_dtype(config, worker.use_gpu), device=str(worker.device))
    worker.trainable = worker.model.trainable(config, family.train_options.model_validate(job["family_options"]),
                                              data.stored)
    # after the adapters wrap their layers: what stays frozen now is the base (and frozen encoders)
    worker.quantized = quantize_frozen_base(worker.trainable.module, config.base_model_precision)
    worker.plan = EpochPlan(data.refs, config.seed, config.train_batch_size, config.gradient_accumulation_steps,
                            worker.world)
    worker.reader = SampleReader(data.refs, data.schema)
    worker.total_steps = config.max_train_steps or config.num_train_epochs * worker.plan.steps_per_epoch


def compute_dtype(config: TrainConfig, use_gpu: bool) -> torch.dtype:
    """What workers hold the model in, and load it in: on GPUs the run's mixed precision, which
    DeepSpeed casts the whole module to at initialise anyway (loaded in float32 first, a 2B model
    with its condition path would take 11 GB of the GPU for a moment: more than the run then
    needs); float32 on CPU."""
    if not use_gpu:
        return torch.float32
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(config.mixed_precision, torch.float32)


def _build_engine(worker: _Worker) -> None:
    import deepspeed

    config = worker.config
    optimizer = build_optimizer(config, worker.trainable.param_groups, worker.world, worker.use_gpu)
    worker.scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config, worker.total_steps))
    worker.engine, _, _, _ = deepspeed.initialize(
        model=worker.trainable.module, optimizer=optimizer, lr_scheduler=worker.scheduler,
        config=deepspeed_config(config, worker.world, worker.use_gpu, worker.trainable.trainable_parameters),
    )
    if config.use_ema:  # of the weights as the engine holds them (ZeRO 0-2: whole on every worker)
        device = worker.device if config.ema_device == "accelerator" else torch.device("cpu")
        worker.average = WeightsAverage(worker.trainable.module, config.ema_decay, device)


def _restore(worker: _Worker) -> None:
    """Continue from a checkpoint: Ray's (a restart after a worker failure) or the one the driver chose."""
    import ray.train
    from ray.train import Checkpoint

    job, config = worker.job, worker.config
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
            if saved["world_size"] != worker.world and config.zero_stage > 0:
                # ZeRO keeps one optimizer partition per worker: another worker count cannot load them
                raise ValueError(f"the checkpoint was written by {saved['world_size']} workers under ZeRO-"
                                 f"{config.zero_stage}; resume with the same number of workers")
            worker.engine.load_checkpoint(folder, tag=CHECKPOINT_TAG)  # our own checkpoint, written by this run
            worker.start_step = saved["step"]
            if worker.average is not None:
                _restore_average(worker, Path(folder), saved)
    if worker.rank == 0:
        plan, trainable = worker.plan, worker.trainable
        print(f"train: {len(plan.refs)} samples ({plan.epoch_size} with repeats), {plan.steps_per_epoch} steps per "
              f"epoch of global batch {plan.global_batch}; {trainable.trainable_parameters:,} trainable parameters; "
              f"steps {worker.start_step} -> {worker.total_steps} on {worker.world} worker(s), "
              f"{'GPU' if worker.use_gpu else 'CPU fp32'}, ZeRO-{config.zero_stage}; {trainable.describe()}"
              f"{'; ' + worker.quantized.describe() if worker.quantized else ''}", flush=True)


def _open_metrics(worker: _Worker) -> None:
    if worker.rank != 0:
        return
    from torch.utils.tensorboard import SummaryWriter

    run = worker.job["run"]
    if "://" in run:  # an object store cannot append: events are written here and copied to RUN/tb
        worker.tb_local = tempfile.mkdtemp(prefix="acedist-tb-")
    worker.writer = SummaryWriter(worker.tb_local or os.path.join(run, "tb"))


def _train(worker: _Worker) -> None:
    config, engine, plan = worker.config, worker.engine, worker.plan
    window = _Window()
    for micro_batch in iterate_micro_batches(plan, worker.reader, worker.rank, worker.start_step, worker.total_steps,
                                             worker.job.get("loader_workers", 0)):
        step, micro = micro_batch["step"], micro_batch["micro"]
        faults.point("train.micro_step", step=step, micro=micro, rank=worker.rank, first_step=worker.start_step)
        # The global torch RNG is seeded here, per micro-step: peft's LoRA dropout draws from it,
        # and keyed seeds make a resumed or restarted run drop exactly what the uninterrupted one did.
        # Dropping whole adapter modules (LoKr / LoHa) must agree across workers: a module dropped on
        # one worker only would leave the workers different gradients for ZeRO's all-reduce.
        worker_key = "every worker" if config.adapter_module_dropout > 0 else worker.rank
        torch.manual_seed(_seed(config.seed, "dropout", step, micro, worker_key))
        batch = worker.model.collate(micro_batch["samples"]).to(worker.device)
        generators = [plan.generator(item) for item in micro_batch["items"]]
        loss, _, timesteps = engine(batch, generators)
        engine.backward(loss)
        engine.step()
        window.losses.append(loss.detach().float())
        window.timesteps.append(timesteps.detach().float().cpu())
        window.samples += len(generators)
        if micro != config.gradient_accumulation_steps - 1:
            continue
        if worker.average is not None:  # engine.step() above was this step's optimizer step
            worker.average.update()
        done = step + 1
        if done % config.log_interval == 0 or done == worker.total_steps:
            _log_metrics(worker, window, done)
            window = _Window()
        if config.validation_step_interval and done % config.validation_step_interval == 0:
            _validate(worker, done)
        if done % config.checkpointing_steps == 0 or done == worker.total_steps:
            _checkpoint(worker, done)
        faults.point("train.after_step", step=done, rank=worker.rank)


def _log_metrics(worker: _Worker, window: _Window, done: int) -> None:
    config, world = worker.config, worker.world
    mean_loss = torch.stack(window.losses).mean()
    drawn = torch.cat(window.timesteps)
    if world > 1:
        torch.distributed.all_reduce(mean_loss)
        mean_loss /= world
        every_rank = [None] * world
        torch.distributed.all_gather_object(every_rank, drawn)
        drawn = torch.cat(every_rank)
    elapsed = time.perf_counter() - window.started
    steps_in_window = len(window.losses) / config.gradient_accumulation_steps
    metrics = {"loss": float(mean_loss), "lr": worker.scheduler.get_last_lr()[0],
               "grad_norm": float(worker.engine.get_global_grad_norm() or 0.0),
               "samples_per_s": window.samples * world / elapsed, "step_time_s": elapsed / steps_in_window}
    if worker.use_gpu:
        metrics["gpu_memory_gb"] = torch.cuda.max_memory_allocated(worker.device) / 1e9
    if worker.rank != 0:
        return
    print(f"step {done}/{worker.total_steps}  loss {metrics['loss']:.4f}  lr {metrics['lr']:.2e}  "
          f"grad {metrics['grad_norm']:.3f}  {metrics['samples_per_s']:.1f} samples/s", flush=True)
    if worker.writer is not None:
        for name, value in metrics.items():
            worker.writer.add_scalar(f"train/{name}", value, done)
        # the timesteps the recipe drew in this window: a user sees what the run trains on
        worker.writer.add_histogram("train/timesteps", drawn.numpy(), done, bins=np.linspace(0.0, 1.0, 41))


def _checkpoint(worker: _Worker, done: int) -> None:
    """Engine states of every rank, the trained weights (rank 0, gathered) and the state, reported
    to Ray Train; each rank's file list last."""
    import ray.train
    from ray.train import Checkpoint

    job, config = worker.job, worker.config
    with tempfile.TemporaryDirectory() as folder:
        worker.engine.save_checkpoint(folder, tag=CHECKPOINT_TAG)
        weights: list[str] = []
        with _Gathered(worker.trainable.module, config.zero_stage):
            if worker.rank == 0:
                weights = worker.trainable.save(Path(folder))
        if worker.rank == 0:
            state = {"step": done, "total_steps": worker.total_steps, "model": job["model"], "data": job["data"],
                     "family": job["family"], "schema_version": job["schema_version"], **worker.trainable.state(),
                     "model_type": config.model_type,
                     "weights": weights, "config": config.model_dump(), "family_options": job["family_options"],
                     "world_size": worker.world, "started_at_step": worker.start_step}
            if worker.quantized is not None:  # what the run trained on top of
                state["frozen_base"] = asdict(worker.quantized)
            if worker.average is not None:
                state["ema"] = {"decay": config.ema_decay}
                _save_average(worker, Path(folder), state)
            (Path(folder) / STATE_FILE).write_text(json.dumps(state, indent=1))
        # last: the list of this rank's files is what makes its part of the checkpoint count
        write_files_list(Path(folder), worker.rank, worker.world, done)
        ray.train.report({"step": done}, checkpoint=Checkpoint.from_directory(folder))
    if worker.tb_local is not None:
        _upload_tensorboard(worker.writer, worker.tb_local, job["run"])


def _save_average(worker: _Worker, folder: Path, state: dict) -> None:
    """The weight average: float32 for a resume, and saved as the family saves its weights into
    ``ema/`` with a state of its own (so export and generate read it as they read ``final/``)."""
    from safetensors.torch import save_file

    save_file(worker.average.state(), str(folder / EMA_AVERAGE_FILE))
    (folder / EMA_DIR).mkdir()
    with worker.average.swapped_in():
        weights = worker.trainable.save(folder / EMA_DIR)
    averaged = {**state, "weights": weights, "averaged": {"decay": worker.config.ema_decay, "of_step": state["step"]}}
    averaged.pop("ema")
    (folder / EMA_DIR / STATE_FILE).write_text(json.dumps(averaged, indent=1))


def _restore_average(worker: _Worker, folder: Path, saved: dict) -> None:
    from safetensors.torch import load_file

    if saved.get("ema") and (folder / EMA_AVERAGE_FILE).is_file():
        worker.average.load(load_file(str(folder / EMA_AVERAGE_FILE)))
    elif worker.rank == 0:
        print(f"train: the checkpoint of step {saved['step']} holds no weight average (its run had no use_ema); "
              f"the average starts from its weights", flush=True)


def _close(worker: _Worker) -> None:
    worker.reader.close()
    if worker.writer is not None:
        worker.writer.close()
    if worker.tb_local is not None:
        _upload_tensorboard(worker.writer, worker.tb_local, worker.job["run"])
        shutil.rmtree(worker.tb_local, ignore_errors=True)


def _upload_tensorboard(writer, folder: str, run: str) -> None:
    """Copy the event files written to ``folder`` into RUN/tb (a run at a URL), whole each time."""
    from ..storage import open_fs

    writer.flush()
    fs, root = open_fs(run)
    for file in sorted(Path(folder).iterdir()):
        fs.put_file(str(file), f"{root}/tb/{file.name}")


def _validate(worker: _Worker, step: int) -> None:
    """Render the validation prompt with the weights as they stand (all ranks gather under ZeRO-3)."""
    import fsspec

    from ..audio import write_audio

    config = worker.config
    with _Gathered(worker.trainable.module, config.zero_stage), torch.no_grad():
        if worker.rank != 0:
            return
        record = Record(key="validation", audio="", caption=config.validation_prompt or "",
                        lyrics=config.validation_lyrics, duration=config.validation_audio_duration)
        audio = worker.trainable.render(RenderRequest(record, config.validation_audio_duration,
                                                        seed=config.validation_seed, steps=config.validation_steps,
                                                        guidance=config.validation_guidance))
    rate = worker.model.sample_rate
    fs, root = fsspec.core.url_to_fs(worker.job["run"])
    fs.makedirs(f"{root}/samples", exist_ok=True)
    with tempfile.TemporaryDirectory() as folder:
        local = Path(folder) / f"step-{step}.wav"
        write_audio(local, audio.numpy(), rate)
        fs.put_file(str(local), f"{root}/samples/step-{step}.wav")
    if worker.writer is not None:
        worker.writer.add_audio("validation", audio.mean(dim=0, keepdim=True), step, sample_rate=rate)
